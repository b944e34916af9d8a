"""Layers and a training step on the GPU (CuPy) against the same on the CPU.

Each layer is built on the CPU, deep-copied, and the copy moved with
``Network.to("cuda")``; forward, backward and the gradients must agree
(float32: 1e-4 of the largest magnitude, float64: 1e-10). Skipped without
CuPy or without a usable GPU.
"""
import copy

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

import fastnn as fn  # noqa: E402
from fastnn import backend  # noqa: E402

if backend.cupy() is None:
    pytest.skip("CuPy is installed but no CUDA device is usable", allow_module_level=True)

TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def assert_close(gpu, cpu, what=""):
    assert backend.is_cuda_array(gpu), f"{what}: expected a CuPy array, got {type(gpu).__name__}"
    got, cpu = cp.asnumpy(gpu), np.asarray(cpu)
    assert got.shape == cpu.shape and got.dtype == cpu.dtype, what
    tol = TOL[cpu.dtype]
    scale = max(1.0, float(np.max(np.abs(cpu)))) if cpu.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - cpu))) if cpu.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def on_gpu(layer):
    """A deep copy of ``layer`` with its state moved to the GPU by Network.to."""
    twin = copy.deepcopy(layer)
    fn.Network([twin]).to("cuda")
    return twin


# (name, factory(dtype), input shape)
LAYERS = [
    ("dense", lambda dt: fn.Dense(7, 5, seed=0, dtype=dt), (4, 7)),
    ("dense-3d", lambda dt: fn.Dense(6, 3, seed=1, dtype=dt), (5, 1, 6)),
    ("dense-nobias", lambda dt: fn.Dense(6, 4, bias=False, seed=2, dtype=dt), (1, 6)),
    ("conv", lambda dt: fn.Conv2D(3, 4, 3, padding=1, seed=3, dtype=dt), (2, 3, 7, 6)),
    ("conv-stride", lambda dt: fn.Conv2D(2, 5, (3, 2), stride=2, padding=(1, 0), seed=4,
                                         dtype=dt), (3, 2, 9, 8)),
    ("conv-b1", lambda dt: fn.Conv2D(1, 6, 5, padding=2, seed=5, dtype=dt), (1, 1, 28, 28)),
    ("maxpool", lambda dt: fn.MaxPool2D(2), (2, 3, 8, 7)),
    ("maxpool-overlap", lambda dt: fn.MaxPool2D(3, stride=2), (2, 2, 9, 9)),
    ("avgpool", lambda dt: fn.AvgPool2D(2), (2, 3, 8, 6)),
    ("flatten", lambda dt: fn.Flatten(), (3, 2, 4, 5)),
    ("relu", lambda dt: fn.ReLU(), (4, 9)),
    ("leaky", lambda dt: fn.LeakyReLU(0.1), (4, 9)),
    ("sigmoid", lambda dt: fn.Sigmoid(), (4, 9)),
    ("tanh", lambda dt: fn.Tanh(), (4, 9)),
    ("softmax", lambda dt: fn.Softmax(), (4, 9)),
    ("bn1d", lambda dt: fn.BatchNorm1d(5, dtype=dt), (6, 5)),
    ("bn2d", lambda dt: fn.BatchNorm2d(3, dtype=dt), (4, 3, 5, 5)),
    # the twin's generator is a copy: the same draw, so the same shifts and flips
    ("translate", lambda dt: fn.RandomTranslation(0.3, 2, fill=0.5, seed=6), (5, 2, 7, 6)),
    ("flip", lambda dt: fn.RandomFlip(seed=7), (6, 3, 5, 4)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_forward_backward_match_cpu(name, factory, shape, training, dtype):
    rng = np.random.default_rng(0)
    layer = factory(dtype)
    gpu = on_gpu(layer)
    x = rng.standard_normal(shape).astype(dtype)
    y = layer.forward(x, training=training)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = layer.backward(gy)
    cy = gpu.forward(cp.asarray(x), training=training)
    assert_close(cy, y, f"{name} forward")
    assert_close(gpu.backward(cp.asarray(gy)), gx, f"{name} backward")
    assert set(gpu.grads) == set(layer.grads)
    for key in layer.grads:
        assert_close(gpu.grads[key], layer.grads[key], f"{name} grad {key}")
    for key in getattr(layer, "buffers", {}) or {}:
        assert_close(gpu.buffers[key], layer.buffers[key], f"{name} buffer {key}")


def test_dropout_on_gpu_is_inverted_dropout():
    layer = on_gpu(fn.Dropout(0.25, seed=0))
    x = cp.asarray(np.random.default_rng(1).standard_normal((50, 40)).astype(np.float32)) + 3
    y = layer.forward(x, training=True)
    assert backend.is_cuda_array(y)
    ratio = cp.asnumpy(y / x)
    assert np.allclose(np.unique(np.round(ratio, 5)), [0.0, round(1 / 0.75, 5)])
    assert abs((ratio == 0).mean() - 0.25) < 0.03
    gy = cp.ones_like(x)
    np.testing.assert_allclose(cp.asnumpy(layer.backward(gy)), ratio, rtol=1e-6)
    np.testing.assert_array_equal(cp.asnumpy(layer.forward(x, training=False)), cp.asnumpy(x))


def _small_lenet(dtype):
    return fn.Network([
        fn.Conv2D(1, 4, 5, padding=2, seed=0, dtype=dtype), fn.ReLU(), fn.MaxPool2D(2),
        fn.Conv2D(4, 6, 3, seed=1, dtype=dtype), fn.ReLU(), fn.MaxPool2D(2), fn.Flatten(),
        fn.Dense(6 * 2 * 2, 16, seed=2, dtype=dtype), fn.ReLU(),
        fn.Dense(16, 10, seed=3, dtype=dtype)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_steps_on_gpu_equal_cpu(dtype):
    rng = np.random.default_rng(2)
    x = rng.random((24, 1, 12, 12)).astype(dtype)
    y = rng.integers(0, 10, 24)
    cpu = _small_lenet(dtype)
    gpu = copy.deepcopy(cpu)
    for net in (cpu, gpu):
        net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.1, momentum=0.9))
    gpu.to("cuda")
    assert gpu.device == "cuda"
    # two epochs of two batches: momentum state carried across steps
    h_cpu = cpu.fit(x, y, epochs=2, batch_size=12, shuffle=False, verbose=0)
    h_gpu = gpu.fit(x, y, epochs=2, batch_size=12, shuffle=False, verbose=0)
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(h_gpu.history["loss"], h_cpu.history["loss"], rtol=tol * 10)
    for lc, lg in zip(cpu.layers, gpu.layers):
        for key in lc.params:
            assert_close(lg.params[key], lc.params[key], f"{type(lc).__name__}.{key}")
    # predictions: NumPy in, NumPy out, on either device
    p_cpu, p_gpu = cpu.predict(x), gpu.predict(x)
    assert isinstance(p_gpu, np.ndarray)
    np.testing.assert_allclose(p_gpu, p_cpu, rtol=0, atol=tol * max(1.0, np.abs(p_cpu).max()))
    # and back to the CPU: identical parameters, training goes on there
    gpu.to("cpu")
    for lc, lg in zip(cpu.layers, gpu.layers):
        for key in lc.params:
            assert isinstance(lg.params[key], np.ndarray)
    gpu.fit(x, y, epochs=1, batch_size=12, shuffle=False, verbose=0)


def test_adam_step_on_gpu_equals_cpu():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 8))
    y = rng.integers(0, 3, 16)
    cpu = fn.Network([fn.Dense(8, 6, seed=0, dtype="float64"), fn.Tanh(),
                      fn.Dense(6, 3, seed=1, dtype="float64")])
    gpu = copy.deepcopy(cpu)
    for net in (cpu, gpu):
        net.compile(loss="cross_entropy", optimizer=fn.optim.Adam(lr=0.01, weight_decay=0.01))
    gpu.to("cuda")
    cpu.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    gpu.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    for lc, lg in zip(cpu.layers, gpu.layers):
        for key in lc.params:
            assert_close(lg.params[key], lc.params[key], f"{type(lc).__name__}.{key}")


@pytest.mark.parametrize("make_optimizer", [
    lambda: fn.optim.SGD(lr=0.05),
    lambda: fn.optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda: fn.optim.SGD(lr=0.05, momentum=0.5, l1=0.001),
    lambda: fn.optim.Adam(lr=0.01),
], ids=["sgd", "sgd-nesterov-l2", "sgd-momentum-l1", "adam"])
def test_fused_optimizer_steps_on_gpu_equal_cpu(make_optimizer):
    """The CUDA path of the optimizers (one fused kernel per parameter) follows
    the CPU path step by step; biases get no weight decay on either."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 6))
    y = rng.integers(0, 4, 20)
    cpu = fn.Network([fn.Dense(6, 8, seed=0, dtype="float64"), fn.ReLU(),
                      fn.Dense(8, 4, seed=1, dtype="float64")])
    gpu = copy.deepcopy(cpu)
    for net in (cpu, gpu):
        net.compile(loss="cross_entropy", optimizer=make_optimizer())
    gpu.to("cuda")
    cpu.fit(x, y, epochs=3, batch_size=7, shuffle=False, verbose=0)
    gpu.fit(x, y, epochs=3, batch_size=7, shuffle=False, verbose=0)
    for lc, lg in zip(cpu.layers, gpu.layers):
        for key in lc.params:
            assert_close(lg.params[key], lc.params[key], f"{type(lc).__name__}.{key}")
