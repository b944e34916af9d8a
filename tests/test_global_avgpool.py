"""GlobalAvgPool2D, added by following ARCHITECTURE.md's recipe: the reference against
finite differences and PyTorch, every backend against the reference on the shared cases,
the layer in a network, save/load."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import backend, kernels
from _helpers import numerical_grad, run_on
from cases import GLOBAL_POOL_CASES

BACKENDS = [b for b in ("numpy", "cpu", "cuda") if b in backend.available()]
DTYPES = [np.float32, np.float64]


def test_reference_gradient_is_the_finite_difference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    weights = rng.standard_normal((2, 3))

    def loss():
        return float((run_on("numpy", kernels.global_avgpool2d_forward, x) * weights).sum())
    np.testing.assert_allclose(run_on("numpy", kernels.global_avgpool2d_backward, weights, x.shape),
                               numerical_grad(loss, x), rtol=1e-7, atol=1e-9)


def test_reference_is_torchs_adaptive_average_pool():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((3, 4, 6, 7))
    want = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x), 1).flatten(1).numpy()
    np.testing.assert_allclose(run_on("numpy", kernels.global_avgpool2d_forward, x), want,
                               rtol=1e-14)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", GLOBAL_POOL_CASES)
def test_backends_match_reference(name, dtype, shape):
    """Forward: the sum of doubles in another order than NumPy's pairwise one, so equal to
    a float64 round-off before the one rounding to dtype; backward: the same bits."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    grad_y = rng.standard_normal(shape[:2]).astype(dtype)
    y = run_on(name, kernels.global_avgpool2d_forward, x)
    want = run_on("numpy", kernels.global_avgpool2d_forward, x)
    assert y.shape == shape[:2] and y.dtype == dtype
    np.testing.assert_allclose(y, want, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-15)
    grad_x = run_on(name, kernels.global_avgpool2d_backward, grad_y, shape)
    np.testing.assert_array_equal(
        grad_x, run_on("numpy", kernels.global_avgpool2d_backward, grad_y, shape))
    # a non-contiguous input gives the result of its contiguous copy
    strided = np.ascontiguousarray(np.repeat(x, 2, axis=3))[..., ::2]
    np.testing.assert_array_equal(run_on(name, kernels.global_avgpool2d_forward, strided), y)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="global_avgpool2d_forward.*4 dimensions"):
        kernels.global_avgpool2d_forward(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="H, W >= 1"):
        kernels.global_avgpool2d_forward(np.zeros((2, 3, 0, 4), np.float32))
    with pytest.raises(ValueError, match="global_avgpool2d_backward: x_shape"):
        kernels.global_avgpool2d_backward(np.zeros((2, 3), np.float32), (2, 4, 5, 5))
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.global_avgpool2d_forward(np.zeros((2, 3, 4, 4), np.int64))


def test_layer_trains_in_a_cnn_and_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    net = fn.Network([fn.Conv2D(2, 6, 3, padding=1, seed=0), fn.ReLU(), fn.GlobalAvgPool2D(),
                      fn.Dense(6, 3, seed=1)])
    net.compile("cross_entropy", fn.optim.SGD(lr=0.1, momentum=0.9))
    history = net.fit(x, y, epochs=5, batch_size=8, verbose=0, seed=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert net.layers[2].output_shape((6, 8, 8)) == (6,)
    net.save(tmp_path / "gap.npz")
    loaded = fn.Network.load(tmp_path / "gap.npz")
    assert type(loaded.layers[2]) is fn.GlobalAvgPool2D
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    with pytest.raises(ValueError, match="GlobalAvgPool2D: expected input"):
        fn.GlobalAvgPool2D().forward(np.zeros((2, 3), np.float32))


def test_compiled_kernels_refuse_what_they_cannot_read():
    """Called directly, as the layers do, the compiled kernels check their arguments too."""
    if "cpu" not in backend.available():
        pytest.skip("no compiled kernels")
    from fastnn.kernels import _cpu
    with pytest.raises(TypeError, match="global_avgpool2d_forward"):
        _cpu.global_avgpool2d_forward(np.zeros((2, 3, 4, 4), np.int32))
    with pytest.raises(ValueError, match="global_avgpool2d_forward"):
        _cpu.global_avgpool2d_forward(np.zeros((2, 3, 8, 4), np.float32)[:, :, ::2])
    with pytest.raises(ValueError, match="global_avgpool2d_backward"):
        _cpu.global_avgpool2d_backward(np.zeros((2, 3), np.float32), (2, 4, 5, 5))
    with pytest.raises(ValueError, match="global_avgpool2d_backward"):
        _cpu.global_avgpool2d_backward(np.zeros((2, 3), np.float32), (2, 3, 0, 5))
