"""The fused dense kernels: dense_forward(..., relu=True) and dense_backward(...,
relu_x=True) give the bits of the unfused calls (relu_forward after the forward,
relu_backward on grad_x) on every path (own AVX-512 GEMM with its tile epilogue,
BLAS with a pass, GEMM blocks over the worker pool, the one-sample GEMV), and
match the NumPy reference within rounding."""
import contextlib

import numpy as np
import pytest

from fastnn import backend

if "cpu" not in backend.available():
    pytest.skip("compiled kernels not built", allow_module_level=True)

from fastnn.kernels import _cpu, _reference, variants  # noqa: E402

DTYPES = [np.float32, np.float64]
# (n, i, o): batch 1 (the GEMV), empty batch, odd sizes, own-kernel sizes (>= 2 MFLOP)
SHAPES = [(1, 7, 5), (1, 785, 257), (0, 9, 4), (3, 1, 2), (5, 13, 11), (64, 257, 129),
          (130, 300, 70)]
ENGINES = [None, "blas"] + (["own"] if _cpu.own_sgemm_supported() else [])    # None: chosen


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(params=["chosen", "split"])
def pooled(request):
    """-> shape (n, i, o) -> context: the dense kernels' variants as the choosers pick
    them, or every one split over the worker pool (the backward's GEMMs as one job)."""
    def split(shape):
        stack = contextlib.ExitStack()
        if request.param == "split":
            stack.enter_context(variants.force("dense_forward", "gemv_split" if shape[0] == 1
                                               and min(shape) > 0 else "gemm_split"))
            stack.enter_context(variants.force("dense_backward", "pair"))
        return stack
    return split


@pytest.fixture(params=ENGINES, ids=lambda engine: engine or "chosen")
def engine(request, dtype):
    if request.param == "own" and dtype == np.float64:
        pytest.skip("float64 GEMMs run on BLAS only (variant 'own' raises there)")
    with variants.force("gemm", request.param):
        yield request.param


def _case(n, i, o, dtype, seed=0):
    rng = np.random.default_rng(seed + 7 * n + 31 * i + o)
    x = rng.standard_normal((n, i)).astype(dtype)
    W = (rng.standard_normal((i, o)) / np.sqrt(max(i, 1))).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    grad_y = rng.standard_normal((n, o)).astype(dtype)
    return x, W, b, grad_y


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{i}x{o}" for n, i, o in SHAPES])
def test_dense_forward_relu_is_relu_of_dense_forward(pooled, engine, dtype, shape):
    x, W, b, _ = _case(*shape, dtype)
    with pooled(shape):
        _forward_relu_checks(x, W, b, dtype)


def _forward_relu_checks(x, W, b, dtype):
    for bias in (b, None):
        fused = _cpu.dense_forward(x, W, bias, relu=True)
        plain = _cpu.dense_forward(x, W, bias)
        assert fused.shape == plain.shape and fused.dtype == dtype
        np.testing.assert_array_equal(fused, _cpu.relu_forward(plain))
        np.testing.assert_allclose(fused, _reference.dense_forward(x, W, bias, relu=True),
                                   **tolerance(dtype))
        assert (fused >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{i}x{o}" for n, i, o in SHAPES])
def test_dense_backward_relu_x_is_relu_backward_of_grad_x(pooled, engine, dtype, shape):
    x, W, _, grad_y = _case(*shape, dtype, seed=1)
    x = np.maximum(x, 0)                  # a ReLU's output: zeros where it cut
    with pooled(shape):
        grad_x, grad_w, grad_b = _cpu.dense_backward(grad_y, x, W, relu_x=True)
        plain_x, plain_w, plain_b = _cpu.dense_backward(grad_y, x, W)
    np.testing.assert_array_equal(grad_x, _cpu.relu_backward(plain_x, x))
    np.testing.assert_array_equal(grad_w, plain_w)
    np.testing.assert_array_equal(grad_b, plain_b)
    want = _reference.dense_backward(grad_y, x, W, relu_x=True)
    for got, expected in zip((grad_x, grad_w, grad_b), want):
        np.testing.assert_allclose(got, expected, **tolerance(dtype))
    # without grad_x (so not as a pair), relu_x changes nothing
    none_x, *rest = _cpu.dense_backward(grad_y, x, W, need_grad_x=False, relu_x=True)
    assert none_x is None
    np.testing.assert_array_equal(rest[0], plain_w)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_dense_backward_relu_x_nan_as_relu_backward(engine, dtype):
    """NaN in grad_y reaches grad_x only where x > 0; NaN, -0.0 and 0 in x cut."""
    x, W, _, grad_y = _case(6, 40, 33, dtype, seed=2)
    x[0, :4] = [np.nan, -0.0, 0.0, -1.0]
    grad_y[1:3] = np.nan                  # rows of grad_x all NaN before the ReLU
    grad_x = _cpu.dense_backward(grad_y, x, W, relu_x=True)[0]
    want = _reference.dense_backward(grad_y, x, W, relu_x=True)[0]
    np.testing.assert_array_equal(np.isnan(grad_x), np.isnan(want))
    np.testing.assert_array_equal(grad_x[~(x > 0)], 0)
    assert np.isnan(grad_x[1:3][x[1:3] > 0]).all()
    np.testing.assert_array_equal(grad_x, _cpu.relu_backward(_cpu.dense_backward(grad_y, x, W)[0], x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_dense_forward_relu_keeps_nan(engine, dtype):
    x, W, b, _ = _case(4, 20, 35, dtype, seed=3)
    x[2, 0] = np.nan
    y = _cpu.dense_forward(x, W, b, relu=True)
    assert np.isnan(y[2]).all() and not np.isnan(np.delete(y, 2, axis=0)).any()
    np.testing.assert_array_equal(y, _cpu.relu_forward(_cpu.dense_forward(x, W, b)))


def test_reference_dense_relu_against_torch():
    torch = pytest.importorskip("torch")
    x, W, b, grad_y = _case(9, 17, 12, np.float64, seed=4)
    tx = torch.tensor(x, requires_grad=True)
    tW = torch.tensor(W, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    z = torch.relu(tx) @ tW + tb
    y = torch.relu(z)
    y.backward(torch.tensor(grad_y))
    x_relu = np.maximum(x, 0)
    got = _reference.dense_forward(x_relu, W, b, relu=True)
    np.testing.assert_allclose(got, y.detach().numpy(), rtol=1e-12, atol=1e-12)
    grad_z = _reference.relu_backward(grad_y, got)
    grad_x, grad_w, grad_b = _reference.dense_backward(grad_z, x_relu, W, relu_x=True)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_w, tW.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_b, tb.grad.numpy(), rtol=1e-12, atol=1e-12)
