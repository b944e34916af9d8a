"""Network.train_step, the one step every network takes (fit runs it per batch), the
optimizer seam it ends in, the plan's fusions inside it (Dense/BatchNorm + ReLU, a conv
computing only what the pool after it reads), and Ctrl-C at step boundaries."""
import contextlib
import sys

import numpy as np
import pytest

import fastnn as fn
from fastnn import optim
from fastnn.kernels import variants
from _helpers import run_python



def blobs(n=48, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n, features)) + 2 * np.eye(classes, features)[y]
    return x, y


class Identity(fn.Layer):
    """A user layer between two built-in ones: it stops the plan from fusing them."""

    def forward(self, x, training=True):
        return x

    def backward(self, grad_y):
        return grad_y


def mlp(dtype, unfused=False, seed=0):
    gap = (lambda: [Identity()]) if unfused else (lambda: [])
    layers = [fn.Dense(6, 9, seed=seed, dtype=dtype), *gap(), fn.ReLU(), *gap(),
              fn.Dense(9, 7, seed=seed + 1, dtype=dtype), *gap(), fn.ReLU(), *gap(),
              fn.Dense(7, 3, seed=seed + 2, dtype=dtype)]
    return fn.Network(layers)


def weights(net):
    return [layer.params[name].copy() for layer, name in net.parameters()]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_train_step_is_one_batch_of_fit(cpu_backend, dtype):
    x, y = blobs()
    a, b = mlp(dtype), mlp(dtype)
    for net in (a, b):
        net.compile("cross_entropy", optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01))
    history = a.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    logs = b.train_step(x, y)
    assert set(logs) == {"loss", "accuracy"}
    assert logs["loss"] == history.history["loss"][0]
    for p, q in zip(weights(a), weights(b)):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", [lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
                                 lambda: optim.Adam(lr=0.01, weight_decay=0.01)],
                         ids=["sgd", "adam"])
def test_fused_dense_relu_steps_give_the_bits_of_the_layers_one_by_one(cpu_backend, dtype, opt):
    """The plan fuses a ReLU into the Dense before it (forward) and the Dense after it
    (backward); identity layers between them stop that fusion. Same bits either way."""
    x, y = blobs()
    fused, plain = mlp(dtype), mlp(dtype, unfused=True)
    for net in (fused, plain):
        net.compile("cross_entropy", opt())
    h1 = fused.fit(x, y, epochs=3, batch_size=5, seed=3, verbose=0)
    h2 = plain.fit(x, y, epochs=3, batch_size=5, seed=3, verbose=0)
    assert h1.history == h2.history
    for p, q in zip(weights(fused), weights(plain)):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(fused.predict(x), plain.predict(x))


def cnn(dtype, unfused=False, seed=0):
    """(N, 2, 6, 6) -> (N, 3): BatchNorm -> ReLU before a Conv2D, a MaxPool2D and a Dense."""
    gap = (lambda: [Identity()]) if unfused else (lambda: [])
    return fn.Network([
        fn.Conv2D(2, 4, 3, padding=1, bias=False, seed=seed, dtype=dtype),
        fn.BatchNorm2d(4, dtype=dtype), *gap(), fn.ReLU(), *gap(),
        fn.Conv2D(4, 5, 3, seed=seed + 1, dtype=dtype),
        fn.BatchNorm2d(5, dtype=dtype), *gap(), fn.ReLU(), *gap(), fn.MaxPool2D(2),
        fn.Flatten(), fn.Dense(5 * 2 * 2, 8, bias=False, seed=seed + 2, dtype=dtype),
        fn.BatchNorm1d(8, dtype=dtype), *gap(), fn.ReLU(), *gap(),
        fn.Dense(8, 3, seed=seed + 3, dtype=dtype)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_batchnorm_relu_steps_give_the_bits_of_the_layers_one_by_one(cpu_backend, dtype):
    """The plan fuses a ReLU into the BatchNorm before it (forward, and backward unless a
    Dense after it takes the ReLU's backward); identity layers stop that. Same bits, and
    the same running statistics, either way."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((24, 2, 6, 6)).astype(dtype), rng.integers(0, 3, 24)
    fused, plain = cnn(dtype), cnn(dtype, unfused=True)
    for net in (fused, plain):
        net.compile("cross_entropy", optim.SGD(lr=0.05, momentum=0.9, nesterov=True))
    h1 = fused.fit(x, y, epochs=3, batch_size=8, seed=3, verbose=0)
    h2 = plain.fit(x, y, epochs=3, batch_size=8, seed=3, verbose=0)
    assert h1.history == h2.history
    for p, q in zip(weights(fused), weights(plain)):
        np.testing.assert_array_equal(p, q)
    buffers = lambda net: [b for layer in net.layers for b in getattr(layer, "buffers", {}).values()]  # noqa: E731
    for p, q in zip(buffers(fused), buffers(plain)):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(fused.predict(x), plain.predict(x))
    grad = rng.standard_normal((24, 3)).astype(dtype)      # Network.forward / backward too
    for training in (False, True):
        np.testing.assert_array_equal(fused.forward(x, training=training),
                                      plain.forward(x, training=training))
        np.testing.assert_array_equal(fused.backward(grad), plain.backward(grad))


def pooled_cnn(dtype, pool, side, unfused=False):
    """(N, 4, side, side) -> (N, 3): a padded 3x3 Conv2D and a 2x2 pool (side 7: the pool
    reads 6x6 of its 7x7 output), a second one (3x3 output, 2x2 read), and a Dense."""
    gap = (lambda: [Identity()]) if unfused else (lambda: [])
    return fn.Network([
        fn.Conv2D(4, 6, 3, padding=1, seed=0, dtype=dtype), *gap(), pool(2), fn.ReLU(),
        fn.Conv2D(6, 5, 3, padding=1, seed=1, dtype=dtype), *gap(), pool(2),
        fn.Flatten(), fn.Dense(5 * (side // 4) ** 2, 3, seed=2, dtype=dtype)])


@pytest.mark.parametrize("variant", ["auto", "winograd"])
@pytest.mark.parametrize("pool", [fn.MaxPool2D, fn.AvgPool2D])
@pytest.mark.parametrize("dtype, side", [("float32", 7), ("float64", 7), ("float32", 8)])
def test_conv_before_a_pool_computes_only_what_the_pool_reads(cpu_backend, dtype, side, pool,
                                                              variant):
    """The plan has a Conv2D followed by a pool compute only the output rows and columns
    the pool reads (7x7 -> 6x6, 3x3 -> 2x2), a MaxPool2D(2) in the same kernel as the
    conv; training and predictions are those of the layers one by one (an identity
    layer between stops it), to round-off: Winograd's weight gradient sums fewer tiles."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((20, 4, side, side)).astype(dtype), rng.integers(0, 3, 20)
    forced = (contextlib.nullcontext() if variant == "auto" else
              variants.force("conv2d_forward", variant))
    with forced, (contextlib.nullcontext() if variant == "auto" else
                  variants.force("conv2d_backward", variant)):
        cropped, plain = pooled_cnn(dtype, pool, side), pooled_cnn(dtype, pool, side, True)
        for net in (cropped, plain):
            net.compile("cross_entropy", optim.SGD(lr=0.05, momentum=0.9))
        h1 = cropped.fit(x, y, epochs=2, batch_size=8, seed=3, verbose=0)
        h2 = plain.fit(x, y, epochs=2, batch_size=8, seed=3, verbose=0)
        # the pools' inputs in the last batch: the conv's output, or what the pool read
        read = side // 2 * 2
        assert cropped.layers[1]._x_shape == (4, 6, read, read)
        assert plain.layers[2]._x_shape == (4, 6, side, side)
        assert cropped.layers[4]._x_shape == (4, 5, 2 * (side // 4), 2 * (side // 4))
        fused = pool is fn.MaxPool2D         # then the conv's output is never made whole
        assert (cropped.layers[0].output is None) == fused
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], **tol)
        for p, q in zip(weights(cropped), weights(plain)):
            np.testing.assert_allclose(p, q, **tol)
        np.testing.assert_allclose(cropped.predict(x), plain.predict(x), **tol)
        assert cropped.layers[1]._x_shape == (20, 6, read, read)
        grad = rng.standard_normal((20, 3)).astype(dtype)   # Network.forward / backward too
        np.testing.assert_allclose(cropped.forward(x), plain.forward(x), **tol)
        np.testing.assert_allclose(cropped.backward(grad), plain.backward(grad), **tol)


def test_conv2d_output_size_sets_the_backward_shape():
    """Conv2D.forward(output_size=) returns those rows and columns, and its backward
    takes grad_y of that shape and says so for any other."""
    conv = fn.Conv2D(2, 3, 3, padding=1, seed=0)
    x = np.ones((2, 2, 7, 7), np.float32)
    assert conv.forward(x, output_size=(6, 5)).shape == (2, 3, 6, 5)
    with pytest.raises(ValueError, match=r"Conv2D\(2 -> 3, 3x3\): expected grad_y of shape "
                                         r"\(2, 3, 6, 5\), got \(2, 3, 7, 7\)"):
        conv.backward(np.ones((2, 3, 7, 7), np.float32))
    assert conv.backward(np.ones((2, 3, 6, 5), np.float32)).shape == x.shape
    assert conv.forward(x).shape == (2, 3, 7, 7)      # the next call: the whole output
    with pytest.raises(ValueError, match=r"Conv2D\(2 -> 3, 3x3\): output_size must be"):
        conv.forward(x, output_size=(8, 7))


def test_pool_read_size():
    assert fn.MaxPool2D(2).read_size(7, 6) == (6, 6)
    assert fn.MaxPool2D(3, stride=2).read_size(8, 9) == (7, 9)
    assert fn.AvgPool2D((2, 3)).read_size(5, 5) == (4, 3)
    assert fn.MaxPool2D(4).read_size(3, 9) == (3, 9)     # too small: forward raises


def test_every_update_passes_through_optimizer_step():
    """The seam: an optimizer whose step does nothing leaves every parameter unchanged
    (MLP, CNN with BatchNorm and Dropout), and its step sees each batch once."""
    class Counting(optim.SGD):
        calls = 0

        def step(self, params, grads, decay=None):
            Counting.calls += 1
            assert len(params) == len(grads) == len(decay)
            for p, g in zip(params, grads):
                assert p.shape == g.shape

    cnn = fn.Network([fn.Conv2D(1, 3, 3, padding=1, seed=0), fn.BatchNorm2d(3), fn.ReLU(),
                      fn.MaxPool2D(2), fn.Flatten(), fn.Dropout(0.3, seed=0),
                      fn.Dense(3 * 4 * 4, 3, seed=1)])
    rng = np.random.default_rng(0)
    cases = [(mlp("float32"), *blobs()),
             (cnn, rng.standard_normal((20, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 20))]
    for net, x, y in cases:
        net.compile("cross_entropy", Counting(lr=0.1))
        before = weights(net)
        Counting.calls = 0
        net.fit(x, y, epochs=2, batch_size=8, verbose=0)
        assert Counting.calls == 2 * -(-len(x) // 8)
        for p, q in zip(before, weights(net)):
            np.testing.assert_array_equal(p, q)


def test_train_step_checks_and_leaves_parameters_on_a_nan_loss():
    x, y = blobs()
    net = mlp("float64")
    with pytest.raises(ValueError, match="compile"):
        net.train_step(x, y)
    net.compile("cross_entropy", optim.SGD(lr=0.1))
    with pytest.raises(ValueError, match="same number of samples"):
        net.train_step(x, y[:-1])
    net.layers[0].params["W"][0, 0] = np.nan
    before = weights(net)
    with pytest.raises(FloatingPointError, match="parameters are left"):
        net.train_step(x, y)
    for p, q in zip(before, weights(net)):
        np.testing.assert_array_equal(p, q)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_in_fit_stops_at_a_step_boundary():
    """SIGINT at a random moment of fit: KeyboardInterrupt names the step, and the weights
    are exactly those of an uninterrupted run of that many steps."""
    code = r"""
    import os, re, signal, threading, time
    import numpy as np
    import fastnn as fn
    # a child of a shell's background job starts with SIGINT ignored: Ctrl-C then does
    # nothing at all (fit leaves such a setting alone), so give it Python's default
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 64)).astype(np.float32)
    y = rng.integers(0, 10, 4000)
    def make():
        net = fn.Network([fn.Dense(64, 256, seed=0), fn.ReLU(), fn.Dense(256, 256, seed=1),
                          fn.ReLU(), fn.Dense(256, 10, seed=2)])
        net.compile("cross_entropy", fn.optim.SGD(lr=0.01, momentum=0.9))
        return net
    for trial in range(6):
        net = make()
        steps = []
        class Count(fn.callbacks.Callback):
            def on_batch_end(self, network, batch, logs):
                steps.append(batch)
        delay = 0.02 + 0.03 * trial
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            net.fit(x, y, epochs=50, batch_size=16, shuffle=False, verbose=0,
                    callbacks=[Count()])
            raise SystemExit("fit was not interrupted")
        except KeyboardInterrupt as exc:
            assert "interrupted before epoch" in str(exc), str(exc)
        done = len(steps)
        ref = make()
        per_epoch = 4000 // 16
        epochs, rest = divmod(done, per_epoch)
        if epochs:
            ref.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0)
        for b in range(rest):
            ref.train_step(x[b * 16:(b + 1) * 16], y[b * 16:(b + 1) * 16])
        for (la, na), (lb, nb) in zip(net.parameters(), ref.parameters()):
            assert np.array_equal(la.params[na], lb.params[nb]), (trial, done)
        print("ok", trial, done)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.count("ok") == 6
