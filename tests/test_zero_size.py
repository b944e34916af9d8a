"""Zero-size edge cases (issue 14, defect 9): an empty batch (N = 0) or no channels /
features gives an empty output (or the sum of no terms, 0) on every backend alike;
the mean loss of an empty batch is a clear ValueError, never NaN. Kernels on numpy,
cpu and, where a GPU is usable, CUDA; layers and losses on numpy and cpu."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import kernels, losses
from _helpers import run_on
from test_kernels import BACKENDS, CUDA

DTYPES = [np.float32, np.float64]
EMPTY_CONVS = [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)]      # (N, C, K)


@pytest.fixture(params=BACKENDS + CUDA)
def on(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c, k", EMPTY_CONVS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_with_an_empty_dimension(on, dtype, n, c, k, with_bias):
    """y is the bias (no input channel adds anything); grad_W sums no samples: zeros."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, 7, 6)).astype(dtype)
    W = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype) if with_bias else None
    y = run_on(on, kernels.conv2d_forward, x, W, b, 1, 1)
    want = np.broadcast_to((b if with_bias else np.zeros(k, dtype)).reshape(1, k, 1, 1),
                           (n, k, 7, 6))
    assert y.shape == want.shape and y.dtype == dtype
    np.testing.assert_array_equal(y, want)
    grad_y = rng.standard_normal(want.shape).astype(dtype)
    grad_x, grad_W, grad_b = run_on(on, kernels.conv2d_backward, grad_y, x, W, 1, 1)
    assert grad_x.shape == x.shape and grad_W.shape == W.shape and grad_b.shape == (k,)
    np.testing.assert_array_equal(grad_x, np.zeros_like(x))     # K = 0: no filter reads x
    np.testing.assert_array_equal(grad_W, np.zeros_like(W))
    np.testing.assert_allclose(grad_b, grad_y.sum(axis=(0, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c", [(0, 3), (2, 0), (0, 0)])
def test_im2col_col2im_and_pools_with_an_empty_dimension(on, dtype, n, c):
    x = np.ones((n, c, 6, 5), dtype)
    cols = run_on(on, kernels.im2col, x, 3, 3, 2, 1)
    assert cols.shape == (c * 9, n * 3 * 3) and cols.dtype == dtype
    dx = run_on(on, kernels.col2im, cols, x.shape, 3, 3, 2, 1)
    assert dx.shape == x.shape and dx.dtype == dtype
    y, argmax = run_on(on, kernels.maxpool2d_forward, x, 2, 2, 2)
    assert y.shape == argmax.shape == (n, c, 3, 2)
    assert run_on(on, kernels.maxpool2d_backward, y, argmax, x.shape).shape == x.shape
    avg = run_on(on, kernels.avgpool2d_forward, x, 2, 2, 2)
    assert avg.shape == (n, c, 3, 2)
    assert run_on(on, kernels.avgpool2d_backward, avg, x.shape, 2, 2, 2).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, i, o", [(0, 4, 3), (2, 0, 3), (2, 4, 0), (0, 0, 0)])
@pytest.mark.parametrize("relu", [False, True])
def test_dense_with_an_empty_dimension(on, dtype, n, i, o, relu):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, i)).astype(dtype)
    W = rng.standard_normal((i, o)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    y = run_on(on, kernels.dense_forward, x, W, b, relu)
    want = np.broadcast_to(np.maximum(b, 0) if relu else b, (n, o))
    np.testing.assert_allclose(y, x @ W + want if i else want, rtol=1e-5)
    assert y.shape == (n, o) and y.dtype == dtype
    grad_y = rng.standard_normal((n, o)).astype(dtype)
    grad_x, grad_W, grad_b = run_on(on, kernels.dense_backward, grad_y, x, W)
    np.testing.assert_allclose(grad_x, grad_y @ W.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(grad_W, np.zeros_like(W) if n == 0 else grad_W)
    assert grad_W.shape == W.shape and grad_b.shape == (o,)
    np.testing.assert_allclose(grad_b, grad_y.sum(axis=0), rtol=1e-5)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (0, 2, 0, 4)])
def test_elementwise_kernels_on_empty_arrays(on, shape):
    x = np.ones(shape, np.float32)
    for f, args in ((kernels.relu_forward, (x,)), (kernels.relu_backward, (x, x)),
                    (kernels.leaky_relu_forward, (x,)), (kernels.leaky_relu_backward, (x, x))):
        out = run_on(on, f, *args)
        assert out.shape == shape and out.dtype == np.float32


@pytest.mark.parametrize("shape, message", [((0, 4), "empty batch"), ((0, 0), "empty batch"),
                                            ((3, 0), "at least one class")])
def test_cross_entropy_of_nothing_is_a_clear_error(on, shape, message):
    logits = np.zeros(shape, np.float32)
    for labels in (np.zeros(shape[0], np.int64), np.zeros(shape, np.float32)):
        with pytest.raises(ValueError, match=f"softmax_cross_entropy: .*{message}"):
            run_on(on, kernels.softmax_cross_entropy, logits, labels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_updates_of_empty_parameters(on, dtype):
    p, g = np.zeros((0, 3), dtype), np.zeros((0, 3), dtype)
    run_on(on, lambda p, g: kernels.sgd_step(p, g, lr=0.1, momentum=0.9), p, g)
    run_on(on, lambda p, g: kernels.adam_step(p, g, g.copy(), g.copy(), lr=0.1, step=1), p, g)


# --- layers and losses ---------------------------------------------------------------

def _forward_backward(layer, x, training=True):
    y = layer.forward(x, training=training)
    return y, layer.backward(np.ones_like(y))


LAYERS = [  # (layer, input shape with N = 0, expected output shape)
    (lambda: fn.Conv2D(3, 4, 3, padding=1), (0, 3, 6, 6), (0, 4, 6, 6)),
    (lambda: fn.Dense(3, 4), (0, 3), (0, 4)),
    (lambda: fn.MaxPool2D(2), (0, 3, 6, 6), (0, 3, 3, 3)),
    (lambda: fn.AvgPool2D(2), (0, 3, 6, 6), (0, 3, 3, 3)),
    (lambda: fn.Flatten(), (0, 3, 6, 6), (0, 108)),
    (lambda: fn.ReLU(), (0, 5), (0, 5)),
    (lambda: fn.LeakyReLU(), (0, 5), (0, 5)),
    (lambda: fn.Sigmoid(), (0, 5), (0, 5)),
    (lambda: fn.Tanh(), (0, 5), (0, 5)),
    (lambda: fn.Softmax(), (0, 5), (0, 5)),
    (lambda: fn.Dropout(0.5), (0, 5), (0, 5)),
]


@pytest.mark.parametrize("make, shape, out_shape", LAYERS)
def test_every_layer_on_an_empty_batch(cpu_backend, make, shape, out_shape):
    layer = make()
    x = np.zeros(shape, np.float32)
    y, grad_x = _forward_backward(layer, x)
    assert y.shape == out_shape and grad_x.shape == shape
    assert y.dtype == grad_x.dtype == np.float32


@pytest.mark.parametrize("make, shape", [
    (lambda: fn.MaxPool2D(2), (2, 0, 6, 6)), (lambda: fn.AvgPool2D(2), (2, 0, 6, 6)),
    (lambda: fn.Flatten(), (2, 0, 6, 6)), (lambda: fn.Softmax(), (2, 0)),
    (lambda: fn.ReLU(), (2, 0)), (lambda: fn.Sigmoid(), (2, 0)), (lambda: fn.Tanh(), (2, 0)),
    (lambda: fn.LeakyReLU(), (2, 0)), (lambda: fn.Dropout(0.5), (2, 0))])
def test_layers_without_channels_or_features(cpu_backend, make, shape):
    y, grad_x = _forward_backward(make(), np.zeros(shape, np.float32))
    assert y.size == 0 and grad_x.shape == shape


@pytest.mark.parametrize("make", [lambda c: fn.Conv2D(c, 4, 3), lambda c: fn.Dense(c, 4),
                                  lambda c: fn.Dense(4, c), lambda c: fn.BatchNorm1d(c),
                                  lambda c: fn.BatchNorm2d(c)])
def test_layers_with_zero_features_are_refused_when_built(make):
    with pytest.raises(ValueError, match="positive"):
        make(0)


@pytest.mark.parametrize("norm, shape", [(fn.BatchNorm1d, (0, 3)), (fn.BatchNorm2d, (0, 3, 4, 4))])
def test_batchnorm_on_an_empty_batch(cpu_backend, norm, shape):
    """Evaluation: an empty output; training: the batch statistics of nothing, an error."""
    y = norm(3).forward(np.zeros(shape, np.float32), training=False)
    assert y.shape == shape
    with pytest.raises(ValueError, match=f"{norm.__name__}.*more than 1 value"):
        norm(3).forward(np.zeros(shape, np.float32), training=True)


@pytest.mark.parametrize("loss", [losses.MSE(), losses.BinaryCrossEntropy(),
                                  losses.CrossEntropy()])
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_losses_of_nothing_are_a_clear_error(cpu_backend, loss, shape):
    y = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=f"{type(loss).__name__}: .*(empty|at least one class)"):
        loss(y, np.full(shape, 0.5, np.float32))
