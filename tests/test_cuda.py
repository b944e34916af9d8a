"""GPU-only tests of the CUDA kernels: device-side strided views, the conv workspace's
chunks, determinism, dropout masks, TF32, host/device copies, in-place buffers, the
fused dense + ReLU kernels. The kernels' shared cases against the NumPy reference run
in tests/test_kernels.py (its "cuda" backend, on the lists of tests/cases.py).

Skipped without CuPy or without a usable GPU. Tolerances: the largest error
over the largest reference magnitude stays under 1e-4 in float32 and 1e-10 in
float64; integer outputs (argmax) and selections (ReLU, max) are exact.
"""
import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from fastnn import backend, kernels  # noqa: E402
from fastnn.kernels import _reference as ref  # noqa: E402
from cases import DENSE_CASES  # noqa: E402

if backend.cupy() is None:
    pytest.skip("CuPy is installed but no CUDA device is usable", allow_module_level=True)

from fastnn.kernels import _cuda  # noqa: E402

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def assert_close(gpu, cpu, dtype=None):
    """max|gpu - cpu| <= tol * max(1, max|cpu|), with dtype checked as well."""
    assert backend.is_cuda_array(gpu), f"expected a CuPy result, got {type(gpu).__name__}"
    got = cp.asnumpy(gpu)
    cpu = np.asarray(cpu)
    assert got.shape == cpu.shape
    if dtype is not None:
        assert got.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(got)), "non-finite value (unwritten output?)"
    tol = TOL[np.dtype(dtype or cpu.dtype)]
    scale = max(1.0, float(np.max(np.abs(cpu)))) if cpu.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - cpu))) if cpu.size else 0.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def test_available_lists_cuda():
    assert "cuda" in backend.available()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,k", [(3, 4), (4, 3)])      # grad_x by col2im / by im2col of grad_y
def test_conv2d_chunked_batch_matches_reference(monkeypatch, c, k, dtype):
    """A small workspace cuts the batch into chunks with a smaller last one."""
    rng = np.random.default_rng(2)
    x = rand(rng, (7, c, 9, 8), dtype)
    W = rand(rng, (k, c, 3, 3), dtype)
    b = rand(rng, (k,), dtype)
    per_sample = max(c, k) * 9 * 9 * 8 * np.dtype(dtype).itemsize
    monkeypatch.setattr(_cuda, "CONV_WORKSPACE_BYTES", 3 * per_sample)   # chunks of 2 or 3
    y = ref.conv2d_forward(x, W, b, (1, 1), (1, 1))
    gy = rand(rng, y.shape, dtype)
    expected = ref.conv2d_backward(gy, x, W, (1, 1), (1, 1))
    assert_close(kernels.conv2d_forward(cp.asarray(x), cp.asarray(W), cp.asarray(b), 1, 1), y, dtype)
    got = kernels.conv2d_backward(cp.asarray(gy), cp.asarray(x), cp.asarray(W), 1, 1)
    for g, e in zip(got, expected):
        assert_close(g, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_non_contiguous_inputs(dtype):
    rng = np.random.default_rng(3)
    big = rand(rng, (3, 4, 12, 14), dtype)
    wide = rand(rng, (2, 5, 3, 3), dtype)
    x = big[:, 1:, 1:-1, ::2]                                  # (3, 3, 10, 7), strided
    W = wide[:, 1:4].transpose(0, 1, 3, 2)                     # (2, 3, 3, 3), strided
    gy_reversed = rand(rng, (7, 10, 2, 3), dtype)
    gy = gy_reversed.transpose(3, 2, 1, 0)                     # (3, 2, 10, 7), transposed
    c = np.ascontiguousarray
    y = ref.conv2d_forward(c(x), c(W), None, (1, 1), (1, 1))
    expected = ref.conv2d_backward(c(gy), c(x), c(W), (1, 1), (1, 1))
    cx = cp.asarray(big)[:, 1:, 1:-1, ::2]
    cW = cp.asarray(wide)[:, 1:4].transpose(0, 1, 3, 2)
    cgy = cp.asarray(gy_reversed).transpose(3, 2, 1, 0)
    assert not (cx.flags.c_contiguous or cW.flags.c_contiguous or cgy.flags.c_contiguous)
    assert_close(kernels.conv2d_forward(cx, cW, None, 1, 1), y, dtype)
    for g, e in zip(kernels.conv2d_backward(cgy, cx, cW, 1, 1), expected):
        assert_close(g, e, dtype)


def test_maxpool_non_contiguous_input():
    rng = np.random.default_rng(5)
    x = rand(rng, (2, 3, 9, 10), np.float32)
    y, argmax = ref.maxpool2d_forward(np.ascontiguousarray(x[:, ::-1, :, 1:]), 3, 3, (3, 3))
    cy, cargmax = kernels.maxpool2d_forward(cp.asarray(x)[:, ::-1, :, 1:], 3, 3, 3)
    np.testing.assert_array_equal(cp.asnumpy(cy), y)
    np.testing.assert_array_equal(cp.asnumpy(cargmax), argmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,i,o", DENSE_CASES + [(70000, 3, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_fused_relu_matches_reference(n, i, o, bias, dtype):
    """dense_forward(relu=True) is relu_forward of the product plus bias;
    dense_backward(relu_x=True) zeroes grad_x where x <= 0 or x is NaN, as relu_backward
    (the shared dense cases, and more rows than a grid's y dimension). Called on _cuda
    directly until the public wrappers take relu / relu_x; then it belongs with the
    shared tests of tests/test_kernels.py."""
    rng = np.random.default_rng(19)
    x, W = rand(rng, (n, i), dtype), rand(rng, (i, o), dtype)
    b = rand(rng, (o,), dtype) if bias else None
    gy = rand(rng, (n, o), dtype)
    x.flat[:3] = [0.0, np.nan, -0.0][:x.size]                     # the ReLU's edge values
    cx, cW = cp.asarray(x), cp.asarray(W)
    cb = None if b is None else cp.asarray(b)
    finite = np.nan_to_num(x)                                     # NaN rows: checked below
    want = ref.relu_forward(ref.dense_forward(finite, W, b))
    y = _cuda.dense_forward(cp.asarray(finite), cW, cb, True)
    assert y.dtype == dtype and y.shape == (n, o)
    assert_close(y, want, dtype)
    assert not (cp.asnumpy(y) < 0).any()
    nan_row = 1 // i                                              # x.flat[1] is NaN:
    if n > nan_row:                                               # its row of y stays NaN
        assert np.isnan(cp.asnumpy(_cuda.dense_forward(cx, cW, cb, True))[nan_row]).all()
    grad_x, grad_W, grad_b = _cuda.dense_backward(cp.asarray(gy), cx, cW, True, True)
    plain = ref.dense_backward(gy, x, W)
    assert_close(grad_x, ref.relu_backward(plain[0], x), dtype)
    dead = ~(x > 0)                                               # x <= 0 or NaN
    assert (cp.asnumpy(grad_x)[dead] == 0).all()
    for got, want in zip((grad_W, grad_b), plain[1:]):
        if np.isfinite(want).all():                               # x's NaN reaches grad_W
            assert_close(got, want, dtype)
    assert _cuda.dense_backward(cp.asarray(gy), cx, cW, False, True)[0] is None


def test_dense_non_contiguous_inputs():
    rng = np.random.default_rng(8)
    x, W = rand(rng, (9, 6), np.float64), rand(rng, (5, 9), np.float64)
    got = kernels.dense_forward(cp.asarray(x).T[::1], cp.asarray(W).T, None)   # (6, 9) @ (9, 5)
    assert_close(got, x.T @ W.T, np.float64)


def test_softmax_cross_entropy_non_contiguous_logits():
    rng = np.random.default_rng(10)
    logits = rand(rng, (10, 6), np.float64)
    labels = rng.integers(0, 10, 6)
    loss, grad = ref.softmax_cross_entropy(np.ascontiguousarray(logits.T), labels)
    closs, cgrad = kernels.softmax_cross_entropy(cp.asarray(logits).T, cp.asarray(labels))
    assert_close(closs, np.asarray(loss), np.float64)
    assert_close(cgrad, grad, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_stay_on_device_and_kernels_are_deterministic(dtype):
    rng = np.random.default_rng(11)
    x = cp.asarray(rand(rng, (4, 3, 9, 9), dtype))
    W = cp.asarray(rand(rng, (5, 3, 3, 3), dtype))
    gy = cp.asarray(rand(rng, (4, 5, 9, 9), dtype))
    first = kernels.conv2d_backward(gy, x, W, 1, 1)
    second = kernels.conv2d_backward(gy, x, W, 1, 1)
    for a, b in zip(first, second):
        assert backend.is_cuda_array(a)
        np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


# --- fused pieces for layers ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_scale_rate_and_seed(dtype):
    p = 0.3
    x = cp.asarray(np.random.default_rng(12).standard_normal((64, 33, 17)).astype(dtype))
    y, mask = _cuda.dropout_forward(x, p, seed=123)
    m = cp.asnumpy(mask)
    values = np.unique(m)
    np.testing.assert_allclose(values, [0.0, 1.0 / (1.0 - p)], rtol=1e-6)
    assert abs((m == 0).mean() - p) < 0.01                         # 35904 draws
    np.testing.assert_array_equal(cp.asnumpy(y), cp.asnumpy(x) * m)
    y2, mask2 = _cuda.dropout_forward(x, p, seed=123)
    np.testing.assert_array_equal(cp.asnumpy(mask2), m)
    _, mask3 = _cuda.dropout_forward(x, p, seed=124)
    assert (cp.asnumpy(mask3) != m).mean() > 0.2
    gy = cp.asarray(np.ones(x.shape, dtype))
    np.testing.assert_array_equal(cp.asnumpy(_cuda.dropout_backward(gy, mask)), m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_is_the_cpu_reference_mask(dtype):
    """The same seed drops the same elements on the GPU and the CPU (the reference's
    uint64 splitmix64; the compiled CPU kernels are tested against it too)."""
    x = np.random.default_rng(13).standard_normal((5, 7, 33)).astype(dtype)
    for p, seed in ((0.3, 123), (0.5, 2**64 - 1), (0.9, 0)):
        y, mask = _cuda.dropout_forward(cp.asarray(x), p, seed)
        want_y, want_mask = ref.dropout_forward(x, p, seed)
        np.testing.assert_array_equal(cp.asnumpy(mask), want_mask)
        np.testing.assert_array_equal(cp.asnumpy(y), want_y)


def _batchnorm_numpy(x, gamma, beta, eps, gy):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    inv_std = 1 / np.sqrt(var + eps)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    m = x.size // x.shape[1]
    g_beta = gy.sum(axis=axes)
    g_gamma = (gy * x_hat).sum(axis=axes)
    gx = (gamma * inv_std).reshape(shape) / m * (m * gy - g_beta.reshape(shape)
                                                 - x_hat * g_gamma.reshape(shape))
    return y, mean, var, gx, g_gamma, g_beta


def test_tf32_switch_is_opt_in_and_leaves_cupy_alone():
    from cupy._core import _routines_linalg as linalg
    before = linalg.get_compute_type(np.float32)
    rng = np.random.default_rng(14)
    a, b = rand(rng, (256, 512), np.float32), rand(rng, (512, 128), np.float32)
    want = a.astype(np.float64) @ b
    assert not backend.allow_tf32()
    strict = cp.asnumpy(kernels.dense_forward(cp.asarray(a), cp.asarray(b), None))
    try:
        assert backend.allow_tf32(True)
        fast = cp.asnumpy(kernels.dense_forward(cp.asarray(a), cp.asarray(b), None))
    finally:
        backend.allow_tf32(False)
    assert linalg.get_compute_type(np.float32) == before
    def rel(got):
        return np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel(strict) < 1e-6             # full float32
    assert rel(fast) < 1e-2               # TF32: about 1e-3 relative


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_to_device_copies_are_right_back_to_back(dtype):
    """Asynchronous host->GPU copies through the two pinned staging buffers:
    several large copies queued without a sync, sources overwritten right after,
    every result still holds its own data; small and empty arrays too."""
    rng = np.random.default_rng(15)
    sources = [(rng.standard_normal((300, 257)) * 100).astype(dtype) for _ in range(5)]
    expected = [s.copy() for s in sources]
    copies = []
    for s in sources:
        copies.append(backend.to_device(s, "cuda"))
        s[...] = 0                                   # the host buffer is reused at once
    bigger = (rng.standard_normal((700, 300)) * 100).astype(dtype)   # grows a staging buffer
    copies.append(backend.to_device(bigger, "cuda"))
    expected.append(bigger.copy())
    small = np.arange(7, dtype=dtype)
    copies.append(backend.to_device(small[::2], "cuda"))             # non-contiguous, small
    expected.append(small[::2].copy())
    copies.append(backend.to_device(np.empty((0, 3), dtype), "cuda"))
    expected.append(np.empty((0, 3), dtype))
    for got, want in zip(copies, expected):
        assert backend.is_cuda_array(got) and got.dtype == want.dtype
        np.testing.assert_array_equal(cp.asnumpy(got), want)
        np.testing.assert_array_equal(backend.to_device(got, "cpu"), want)


def test_relu_into_out_buffers_in_place():
    rng = np.random.default_rng(17)
    x = rand(rng, (4, 33), np.float32)
    gy = rand(rng, x.shape, np.float32)
    cx, cgy = cp.asarray(x), cp.asarray(gy)
    y = kernels.relu_forward(cx, out=cx)
    assert y is cx
    np.testing.assert_array_equal(cp.asnumpy(cx), ref.relu_forward(x))
    g = kernels.relu_backward(cgy, cx, out=cgy)
    assert g is cgy
    np.testing.assert_array_equal(cp.asnumpy(cgy), ref.relu_backward(gy, ref.relu_forward(x)))


def test_fused_layer_pieces_accept_strided_views():
    rng = np.random.default_rng(18)
    base = rand(rng, (8, 6, 5), np.float64)
    view = cp.asarray(base).transpose(1, 0, 2)           # (6, 8, 5), not contiguous
    y, mask = _cuda.dropout_forward(view, 0.5, seed=7)
    np.testing.assert_array_equal(cp.asnumpy(y), base.transpose(1, 0, 2) * cp.asnumpy(mask))
    gamma, beta = np.ones(8), np.zeros(8)
    want = _batchnorm_numpy(base.transpose(1, 0, 2), gamma, beta, 1e-5,
                            np.ones_like(base.transpose(1, 0, 2)))[0]
    got = _cuda.batchnorm_forward(view, cp.asarray(gamma), cp.asarray(beta), 1e-5)[0]
    assert_close(got, want, np.float64)
