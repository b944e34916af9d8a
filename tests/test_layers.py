"""Layers: gradients by finite differences (float64), against PyTorch, shapes, bad input."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import backend
from _helpers import numerical_grad

CPU_BACKENDS = [b for b in ("cpu", "numpy") if b in backend.available()]


def check_gradients(layer, x, training=True, before_forward=lambda: None, atol=1e-6):
    """Compare backward() with finite differences of sum(forward(x) * g) for x and every param."""
    rng = np.random.default_rng(1)
    before_forward()
    y = layer.forward(x, training)
    g = rng.standard_normal(y.shape)

    def objective():
        before_forward()
        return float((layer.forward(x, training) * g).sum())

    before_forward()
    layer.forward(x, training)
    grad_x = layer.backward(g)
    analytic = {name: layer.grads[name].copy() for name in layer.params}
    np.testing.assert_allclose(grad_x, numerical_grad(objective, x), rtol=1e-5, atol=atol)
    for name, p in layer.params.items():
        np.testing.assert_allclose(analytic[name], numerical_grad(objective, p), rtol=1e-5, atol=atol,
                                   err_msg=f"grad of {name}")


def rand(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --- finite differences, float64 -------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4), (1, 4), (2, 3, 4)])
def test_dense_gradients(cpu_backend, shape):
    layer = fn.Dense(4, 5, seed=0, dtype="float64")
    layer.params["b"][:] = rand(5, seed=3)
    check_gradients(layer, rand(*shape))


def test_dense_without_bias_has_no_b():
    layer = fn.Dense(4, 2, bias=False, seed=0, dtype="float64")
    assert set(layer.params) == {"W"}
    check_gradients(layer, rand(3, 4))
    assert set(layer.grads) == {"W"}


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (2, 0))])
def test_conv2d_gradients(cpu_backend, stride, padding):
    layer = fn.Conv2D(2, 3, (3, 2), stride=stride, padding=padding, seed=0, dtype="float64")
    layer.params["b"][:] = rand(3, seed=5)
    check_gradients(layer, rand(2, 2, 5, 6))


@pytest.mark.parametrize("cls,kernel,stride", [(fn.MaxPool2D, 2, None), (fn.MaxPool2D, 3, 2),
                                               (fn.AvgPool2D, 2, None), (fn.AvgPool2D, (3, 2), (2, 1))])
def test_pool_gradients(cpu_backend, cls, kernel, stride):
    check_gradients(cls(kernel, stride), rand(2, 3, 7, 6))


@pytest.mark.parametrize("layer", [fn.ReLU(), fn.LeakyReLU(0.1), fn.Sigmoid(), fn.Tanh(), fn.Softmax(),
                                   fn.Flatten(),
                                   fn.ActivationLayer(fn.activations.tanh, fn.activations.tanh_prime),
                                   fn.ActivationLayer(fn.activations.sigmoid, fn.activations.sigmoid_prime)],
                         ids=lambda l: type(l).__name__)
def test_parameter_free_gradients(layer):
    x = rand(3, 4, 5)
    x[np.abs(x) < 1e-3] = 0.5        # keep ReLU's kink out of the finite differences
    check_gradients(layer, x)


@pytest.mark.parametrize("cls,shape", [(fn.BatchNorm1d, (6, 3)), (fn.BatchNorm1d, (4, 3, 5)),
                                       (fn.BatchNorm2d, (3, 3, 4, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(cls, shape, training):
    layer = cls(3, dtype="float64")
    layer.params["gamma"][:] = rand(3, seed=7)
    layer.params["beta"][:] = rand(3, seed=8)
    layer.buffers["running_mean"][:] = rand(3, seed=9)
    layer.buffers["running_var"][:] = 1.5
    check_gradients(layer, rand(*shape), training=training)


def test_dropout_gradients_with_a_fixed_mask():
    layer = fn.Dropout(0.3)

    def same_mask():
        layer.rng = np.random.default_rng(4)
    check_gradients(layer, rand(5, 7), before_forward=same_mask)


# --- against PyTorch ----------------------------------------------------------------------
def torch_grads(fn_torch, x, *params, g):
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x, requires_grad=True)
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    y = fn_torch(tx, *tparams)
    y.backward(torch.tensor(g))
    return y.detach().numpy(), tx.grad.numpy(), [p.grad.numpy() for p in tparams]


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("stride,padding,kernel,batch", [(1, 0, 3, 2), (1, 2, 5, 1), (2, 1, 3, 3),
                                                         ((2, 1), (0, 1), (3, 2), 2)])
def test_conv2d_matches_torch(cpu_backend, dtype, tol, stride, padding, kernel, batch):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    layer = fn.Conv2D(3, 4, kernel, stride=stride, padding=padding, seed=1, dtype=dtype)
    layer.params["b"][:] = rand(4, seed=2, dtype=dtype)
    x = rand(batch, 3, 9, 8, seed=3, dtype=dtype)
    y = layer.forward(x)
    g = rand(*y.shape, seed=4, dtype=dtype)
    grad_x = layer.backward(g)
    ty, tgx, (tgW, tgb) = torch_grads(
        lambda a, W, b: F.conv2d(a, W, b, stride=stride, padding=padding),
        x, layer.params["W"], layer.params["b"], g=g)
    scale = np.abs(ty).max()
    np.testing.assert_allclose(y, ty, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(grad_x, tgx, atol=tol * np.abs(tgx).max(), rtol=tol)
    np.testing.assert_allclose(layer.grads["W"], tgW, atol=tol * np.abs(tgW).max(), rtol=tol)
    np.testing.assert_allclose(layer.grads["b"], tgb, atol=tol * np.abs(tgb).max(), rtol=tol)
    assert y.dtype == grad_x.dtype == layer.grads["W"].dtype == dtype


def test_dense_matches_torch_linear(cpu_backend):
    torch = pytest.importorskip("torch")
    layer = fn.Dense(7, 5, seed=0, dtype="float32")
    layer.params["b"][:] = rand(5, seed=1, dtype=np.float32)
    x = rand(9, 7, seed=2, dtype=np.float32)
    y = layer.forward(x)
    g = rand(9, 5, seed=3, dtype=np.float32)
    grad_x = layer.backward(g)
    ty, tgx, (tgW, tgb) = torch_grads(lambda a, W, b: torch.nn.functional.linear(a, W, b),
                                      x, layer.params["W"].T.copy(), layer.params["b"], g=g)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, tgx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.grads["W"], tgW.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.grads["b"], tgb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,kernel,stride", [("max", 2, 2), ("max", 3, 2), ("max", (2, 3), (1, 2)),
                                                ("avg", 2, 2), ("avg", 3, 1)])
def test_pools_match_torch(cpu_backend, kind, kernel, stride):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    layer = (fn.MaxPool2D if kind == "max" else fn.AvgPool2D)(kernel, stride)
    x = rand(1, 3, 8, 7, seed=5, dtype=np.float32)           # batch of 1, odd width
    y = layer.forward(x)
    g = rand(*y.shape, seed=6, dtype=np.float32)
    grad_x = layer.backward(g)
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    ty, tgx, _ = torch_grads(lambda a: pool(a, kernel, stride), x, g=g)
    np.testing.assert_allclose(y, ty, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_x, tgx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours,theirs", [
    (lambda: fn.LeakyReLU(0.2), lambda t: t.nn.LeakyReLU(0.2)),
    (fn.Sigmoid, lambda t: t.nn.Sigmoid()), (fn.Tanh, lambda t: t.nn.Tanh()),
    (fn.ReLU, lambda t: t.nn.ReLU()), (fn.Softmax, lambda t: t.nn.Softmax(dim=-1))])
def test_activations_match_torch(ours, theirs):
    torch = pytest.importorskip("torch")
    layer = ours()
    x = rand(6, 5, seed=1, dtype=np.float32) * 3
    x[0, 0] = 40.0       # saturation: no overflow, no NaN
    y = layer.forward(x)
    g = rand(6, 5, seed=2, dtype=np.float32)
    grad_x = layer.backward(g)
    ty, tgx, _ = torch_grads(theirs(torch), x, g=g)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_x, tgx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours,theirs,shape", [
    (fn.BatchNorm1d, "BatchNorm1d", (8, 4)), (fn.BatchNorm1d, "BatchNorm1d", (5, 4, 3)),
    (fn.BatchNorm2d, "BatchNorm2d", (3, 4, 5, 6))])
def test_batchnorm_matches_torch_train_and_eval(ours, theirs, shape):
    torch = pytest.importorskip("torch")
    layer = ours(4, momentum=0.2, dtype="float64")
    tlayer = getattr(torch.nn, theirs)(4, momentum=0.2).double()
    gamma, beta = rand(4, seed=1), rand(4, seed=2)
    layer.params["gamma"][:], layer.params["beta"][:] = gamma, beta
    with torch.no_grad():
        tlayer.weight.copy_(torch.tensor(gamma))
        tlayer.bias.copy_(torch.tensor(beta))
    for step in range(3):       # running statistics over several batches
        x = rand(*shape, seed=10 + step) * 2 + 1
        g = rand(*shape, seed=20 + step)
        y = layer.forward(x, training=True)
        grad_x = layer.backward(g)
        tx = torch.tensor(x, requires_grad=True)
        tlayer.zero_grad()
        ty = tlayer.train()(tx)
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(layer.grads["gamma"], tlayer.weight.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(layer.grads["beta"], tlayer.bias.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(layer.running_mean, tlayer.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, tlayer.running_var.numpy(), rtol=1e-12)
    x = rand(*shape, seed=99)
    g = rand(*shape, seed=98)
    y = layer.forward(x, training=False)
    grad_x = layer.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = tlayer.eval()(tx)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    # eval mode leaves the running statistics alone
    np.testing.assert_allclose(layer.running_mean, tlayer.running_mean.numpy(), rtol=1e-12)


# --- behaviour -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_masks_are_the_same_on_every_cpu_backend(dtype):
    """A layer seeded alike drops the same elements on the compiled kernels and the
    NumPy reference (and on CUDA: tests/test_cuda.py); non-contiguous inputs too."""
    x = rand(6, 40, seed=3, dtype=dtype)[:, ::2]
    results = {}
    for name in CPU_BACKENDS:
        before = backend.current()
        backend.use(name)
        try:
            layer = fn.Dropout(0.4, seed=11)
            y = layer.forward(x)
            results[name] = (y, layer.backward(np.ones_like(y)))
        finally:
            backend.use(before)
    first = next(iter(results.values()))
    for y, grad in results.values():
        np.testing.assert_array_equal(y, first[0])
        np.testing.assert_array_equal(grad, first[1])
    assert 0 < (first[0] == 0).sum() < x.size


def test_dropout_is_inverted_and_identity_at_eval():
    layer = fn.Dropout(0.25, seed=0)
    x = np.ones((200, 500), dtype=np.float32)
    y = layer.forward(x, training=True)
    kept = y != 0
    assert abs(1 - kept.mean() - 0.25) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    assert abs(y.mean() - 1) < 0.02                      # expectation preserved
    g = np.full_like(x, 2.0)
    np.testing.assert_array_equal(layer.backward(g), np.where(kept, 2.0 / 0.75, 0).astype(np.float32))
    assert layer.forward(x, training=False) is x
    np.testing.assert_array_equal(layer.backward(g), g)
    a, b = fn.Dropout(0.5, seed=3), fn.Dropout(0.5, seed=3)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    with pytest.raises(ValueError, match="Dropout"):
        fn.Dropout(1.0)


def test_dense_applies_to_last_axis_like_the_tutorial():
    layer = fn.Dense(2, 3, seed=0, dtype="float64")
    x = rand(4, 1, 2)
    y = layer.forward(x)
    assert y.shape == (4, 1, 3)
    np.testing.assert_allclose(y[:, 0], x[:, 0] @ layer.params["W"] + layer.params["b"])
    assert layer.backward(np.ones_like(y)).shape == x.shape
    assert layer.output_shape((1, 2)) == (1, 3)


def test_init_schemes_and_seed():
    he = fn.Dense(400, 300, seed=0).params["W"]
    assert he.dtype == np.float32 and abs(he.std() - np.sqrt(2 / 400)) < 0.003
    xav = fn.Dense(400, 300, init="xavier", seed=0).params["W"]
    limit = np.sqrt(6 / 700)
    assert np.abs(xav).max() <= limit and np.abs(xav).max() > 0.95 * limit
    uni = fn.Dense(400, 300, init="uniform", seed=0).params["W"]
    assert -0.5 <= uni.min() and uni.max() <= 0.5 and abs(uni.mean()) < 0.01
    conv = fn.Conv2D(3, 8, 5, seed=0, dtype="float64").params["W"]
    assert conv.shape == (8, 3, 5, 5) and conv.dtype == np.float64
    assert abs(conv.std() - np.sqrt(2 / 75)) < 0.02
    custom = fn.Dense(3, 2, init=lambda shape, rng: np.full(shape, 0.25)).params["W"]
    np.testing.assert_array_equal(custom, np.full((3, 2), 0.25, np.float32))
    np.testing.assert_array_equal(fn.Dense(5, 4, seed=7).params["W"], fn.Dense(5, 4, seed=7).params["W"])
    assert not np.array_equal(fn.Dense(5, 4, seed=7).params["W"], fn.Dense(5, 4, seed=8).params["W"])
    with pytest.raises(ValueError, match="init"):
        fn.Dense(3, 2, init="zeros")
    with pytest.raises(TypeError, match="dtype"):
        fn.Dense(3, 2, dtype="int32")


def test_output_shapes():
    assert fn.Conv2D(1, 6, 5, padding=2).output_shape((1, 28, 28)) == (6, 28, 28)
    assert fn.Conv2D(3, 2, 3, stride=2).output_shape((3, 9, 8)) == (2, 4, 3)
    assert fn.MaxPool2D(2).output_shape((6, 28, 28)) == (6, 14, 14)
    assert fn.MaxPool2D(3, 2).output_shape((6, 7, 7)) == (6, 3, 3)
    assert fn.AvgPool2D((2, 3)).output_shape((1, 4, 9)) == (1, 2, 3)
    assert fn.Flatten().output_shape((16, 5, 5)) == (400,)
    assert fn.BatchNorm2d(6).output_shape((6, 4, 4)) == (6, 4, 4)
    x = rand(2, 1, 28, 28, dtype=np.float32)
    assert fn.Conv2D(1, 6, 5, padding=2).forward(x).shape == (2, 6, 28, 28)


@pytest.mark.parametrize("make,shape", [
    (lambda: fn.Dense(6, 4, seed=0), (5, 6)), (lambda: fn.Conv2D(3, 2, 3, padding=1, seed=0), (2, 3, 6, 5)),
    (lambda: fn.MaxPool2D(2), (2, 3, 6, 4)), (lambda: fn.AvgPool2D(2), (2, 3, 6, 4)),
    (fn.ReLU, (5, 6)), (fn.Softmax, (5, 6)), (lambda: fn.BatchNorm2d(3), (2, 3, 6, 4))])
def test_non_contiguous_input_gives_the_contiguous_result(make, shape):
    big = rand(*(s * 2 for s in shape), dtype=np.float32)
    x = big[tuple(slice(None, None, 2) for _ in shape)]
    assert not x.flags.c_contiguous
    a, b = make(), make()
    y = a.forward(x)
    y_ref = b.forward(np.ascontiguousarray(x))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    g = rand(*y.shape, seed=3, dtype=np.float32)[..., ::1]
    gT = np.asfortranarray(g)
    np.testing.assert_allclose(a.backward(gT), b.backward(g), rtol=1e-5, atol=1e-6)


# --- bad input ------------------------------------------------------------------------------
def test_dense_rejects_wrong_shape_and_dtype_naming_itself():
    layer = fn.Dense(4, 3, seed=0)
    with pytest.raises(ValueError, match=r"Dense\(4 -> 3\).*\(\.\.\., 4\).*\(2, 5\)"):
        layer.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match=r"Dense\(4 -> 3\).*float32.*float64"):
        layer.forward(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="Dense"):
        layer.forward([[0, 0, 0, 0]])
    layer.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"Dense\(4 -> 3\).*grad_y"):
        layer.backward(np.zeros((2, 4), np.float32))


def test_conv_and_pool_reject_bad_shapes_naming_themselves():
    conv = fn.Conv2D(3, 4, 5, seed=0)
    with pytest.raises(ValueError, match=r"Conv2D\(3 -> 4, 5x5\).*\(N, 3, H, W\).*\(2, 1, 8, 8\)"):
        conv.forward(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"Conv2D.*larger than the padded input"):
        conv.forward(np.zeros((2, 3, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"Conv2D.*\(N, 3, H, W\)"):
        conv.forward(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(TypeError, match=r"Conv2D.*float32.*float64"):
        conv.forward(np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"MaxPool2D\(2x2\).*\(N, C, H, W\)"):
        fn.MaxPool2D(2).forward(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"AvgPool2D\(3x3\).*larger"):
        fn.AvgPool2D(3).forward(np.zeros((1, 1, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\).*\(N, 3, H, W\).*\(2, 4, 5, 5\)"):
        fn.BatchNorm2d(3).forward(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\).*more than 1 value"):
        fn.BatchNorm1d(3).forward(np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="ReLU.*int64"):
        fn.ReLU().forward(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="kernel_size"):
        fn.Conv2D(1, 1, 0)
    with pytest.raises(ValueError, match=r"BatchNorm1d: momentum must lie in \[0, 1\], got 1.5"):
        fn.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(TypeError, match="BatchNorm2d: momentum must be a number, got None"):
        fn.BatchNorm2d(3, momentum=None)
    with pytest.raises(TypeError, match="LeakyReLU: alpha must be a number, got '0.1'"):
        fn.LeakyReLU("0.1")


# --- the tutorial protocol and user layers -------------------------------------------------------
def test_backward_propagation_is_backward_plus_sgd_step():
    layer = fn.Dense(3, 2, seed=0, dtype="float64")
    W0, b0 = layer.params["W"].copy(), layer.params["b"].copy()
    x, g = rand(4, 3), rand(4, 2, seed=1)
    y = layer.forward_propagation(x)
    np.testing.assert_allclose(y, x @ W0 + b0)
    grad_x = layer.backward_propagation(g, 0.1)
    np.testing.assert_allclose(grad_x, g @ W0.T)
    np.testing.assert_allclose(layer.params["W"], W0 - 0.1 * x.T @ g)
    np.testing.assert_allclose(layer.params["b"], b0 - 0.1 * g.sum(0))
    assert layer.weights is layer.params["W"]


def test_layer_base_without_implementation_says_so():
    class Empty(fn.Layer):
        pass
    with pytest.raises(NotImplementedError, match="Empty"):
        Empty().forward(np.zeros(2))


@pytest.mark.parametrize("make, shape", [(lambda: fn.Dense(5, 3, seed=0, dtype="float64"), (4, 1, 5)),
                                         (lambda: fn.Conv2D(2, 3, 3, padding=1, seed=0,
                                                            dtype="float64"), (2, 2, 5, 4))])
def test_backward_without_grad_x_gives_the_same_parameter_gradients(cpu_backend, make, shape):
    layer = make()
    x = rand(*shape)
    grad_y = rand(*layer.forward(x).shape)
    grad_x = layer.backward(grad_y)
    full = {k: g.copy() for k, g in layer.grads.items()}
    assert grad_x.shape == x.shape
    assert layer.backward(grad_y, need_grad_x=False) is None
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, full[k])
