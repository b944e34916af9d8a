"""fastnn.kernels: every kernel on every CPU backend ("numpy" reference and
"cpu" compiled), float32 and float64, against PyTorch where installed, against
finite differences (float64), and the compiled kernels and, where a GPU is usable, the
CUDA kernels against the reference, on the case lists of tests/cases.py."""
import numpy as np
import pytest

from fastnn import backend, kernels
from fastnn.kernels import _reference
from _helpers import numerical_grad, run_on
from cases import (AVGPOOL_CASES, BATCHNORM_SHAPES, CONV_CASES, CONV_IDS, DENSE_CASES,
                   GEOMETRIES, LENET_CONV2, POOL_CASES, SOFTMAX_CASES)

BACKENDS = ["numpy", "cpu"]
# where a GPU is usable, the CUDA kernels (NumPy inputs copied over, results copied back)
CUDA = ["cuda"] if "cuda" in backend.available() else []
DTYPES = [np.float32, np.float64]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    """Run the test under one CPU backend, restoring the previous one after."""
    if request.param not in backend.available():
        pytest.fail(f"backend {request.param!r} unavailable: {backend.compiled_error()}")
    previous = backend.current()
    backend.use(request.param)
    yield request.param
    backend.use(previous)


@pytest.fixture(params=["cpu"] + CUDA)
def fast_backend(request):
    """A backend tested against the NumPy reference: the compiled CPU kernels, CUDA."""
    return request.param


@pytest.fixture(params=BACKENDS + CUDA)
def any_backend(request):
    """Every backend, for tests that call through ``run_on``."""
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return request.param


def assert_close(got, want, dtype, on=None):
    """Equal to round-off: relative 1e-5 (float32) or 1e-12 (float64) of the largest value,
    since a sum of many products has an absolute error that scales with its terms; for
    results ``on="cuda"`` 1e-4 / 1e-10 (cuBLAS and the GPU's reductions add in other orders)."""
    eps = (1e-4 if on == "cuda" else 1e-5) if dtype == np.float32 else (
        1e-10 if on == "cuda" else 1e-12)
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps * max(1.0, float(np.abs(want).max(initial=0))))


def random(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _impl_module(name):
    """The implementation module of a fast backend, for its layer pieces (BatchNorm)."""
    from fastnn.kernels import _cpu, _cuda
    return {"cpu": _cpu, "cuda": _cuda}[name]


def test_compiled_kernels_loaded():
    """CI must exercise the compiled kernels, not silently only the reference."""
    assert backend.compiled_error() is None
    assert "cpu" in backend.available()
    from fastnn.kernels import _cpu
    assert _cpu.conv2d_forward is not None


# --- convolution ------------------------------------------------------------------

def conv_inputs(case, dtype, seed=0):
    n, c, h, w, k, kh, kw, stride, padding = case
    rng = np.random.default_rng(seed)
    return (random(rng, (n, c, h, w), dtype), random(rng, (k, c, kh, kw), dtype),
            random(rng, (k,), dtype), stride, padding)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_matches_torch(backend_name, dtype, case):
    torch = pytest.importorskip("torch")
    x, W, b, stride, padding = conv_inputs(case, dtype)
    y = kernels.conv2d_forward(x, W, b, stride=stride, padding=padding)
    tx, tW, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, W, b))
    ty = torch.nn.functional.conv2d(tx, tW, tb, stride=stride, padding=padding)
    assert y.dtype == dtype and y.shape == tuple(ty.shape)
    assert_close(y, ty.detach().numpy(), dtype)
    grad_y = random(np.random.default_rng(1), y.shape, dtype)
    ty.backward(torch.tensor(grad_y, dtype=torch.float64))
    grads = kernels.conv2d_backward(grad_y, x, W, stride=stride, padding=padding)
    for got, want in zip(grads, (tx.grad, tW.grad, tb.grad)):
        assert got.dtype == dtype
        assert_close(got, want.numpy(), dtype)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_backends_match_reference(fast_backend, dtype, case):
    x, W, b, stride, padding = conv_inputs(case, dtype)
    for bias in (b, None):
        ref = run_on("numpy", kernels.conv2d_forward, x, W, bias, stride, padding)
        got = run_on(fast_backend, kernels.conv2d_forward, x, W, bias, stride, padding)
        assert got.dtype == dtype
        assert_close(got, ref, dtype, fast_backend)
    grad_y = random(np.random.default_rng(2), ref.shape, dtype)
    want = run_on("numpy", kernels.conv2d_backward, grad_y, x, W, stride, padding)
    got = run_on(fast_backend, kernels.conv2d_backward, grad_y, x, W, stride, padding)
    for g, r in zip(got, want):
        assert_close(g, r, dtype, fast_backend)
    size = first_outputs(ref.shape)                  # the first rows and columns only
    got = run_on(fast_backend, kernels.conv2d_forward, x, W, None, stride, padding,
                 output_size=size)                   # ref: the loop's last, without bias
    assert_close(got, ref[:, :, :size[0], :size[1]], dtype, fast_backend)
    grad_y = np.ascontiguousarray(grad_y[:, :, :size[0], :size[1]])
    want = run_on("numpy", kernels.conv2d_backward, grad_y, x, W, stride, padding,
                  output_size=size)
    got = run_on(fast_backend, kernels.conv2d_backward, grad_y, x, W, stride, padding,
                 output_size=size)
    for g, r in zip(got, want):
        assert_close(g, r, dtype, fast_backend)


def first_outputs(shape):
    """An output_size (oh, ow) below an output (..., OH, OW): one row and two columns
    fewer where there are that many (a 2x2 pool dropping the last row and column)."""
    return max(1, shape[-2] - 1), max(1, shape[-1] - 2)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_first_outputs_match_torch(backend_name, dtype, case):
    """conv2d_forward(output_size=(oh, ow)) is the first oh rows and ow columns of the
    conv; its backward, the gradient of that slice (the other outputs get none)."""
    torch = pytest.importorskip("torch")
    x, W, b, stride, padding = conv_inputs(case, dtype)
    tx, tW, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, W, b))
    ty = torch.nn.functional.conv2d(tx, tW, tb, stride=stride, padding=padding)
    oh, ow = first_outputs(ty.shape)
    ty = ty[:, :, :oh, :ow]
    y = kernels.conv2d_forward(x, W, b, stride=stride, padding=padding, output_size=(oh, ow))
    assert y.dtype == dtype and y.shape == tuple(ty.shape) and y.flags.c_contiguous
    assert_close(y, ty.detach().numpy(), dtype)
    grad_y = random(np.random.default_rng(1), y.shape, dtype)
    ty.backward(torch.tensor(grad_y, dtype=torch.float64))
    grads = kernels.conv2d_backward(grad_y, x, W, stride=stride, padding=padding,
                                    output_size=[oh, ow])
    for got, want in zip(grads, (tx.grad, tW.grad, tb.grad)):
        assert got.dtype == dtype
        assert_close(got, want.numpy(), dtype)
    _, grad_W, _ = kernels.conv2d_backward(grad_y, x, W, stride, padding, need_grad_x=False,
                                           output_size=(oh, ow))
    assert_close(grad_W, tW.grad.numpy(), dtype)


@pytest.mark.parametrize("output_size", [(0, 1), (1, 0), (9, 9), (3,), 3, (2.0, 1), (True, 1),
                                         "ab"])
def test_conv2d_output_size_must_fit_the_output(backend_name, output_size):
    x, W, b, stride, padding = conv_inputs(CONV_CASES[0], np.float32)     # y (2, 4, 7, 9)
    grad_y = np.zeros((2, 4, 7, 9), np.float32)
    with pytest.raises(ValueError, match=r"conv2d_forward: output_size must be .*oh <= 7 .*got"):
        kernels.conv2d_forward(x, W, b, stride, padding, output_size=output_size)
    with pytest.raises(ValueError, match=r"conv2d_backward: output_size must be .*oh <= 7 .*got"):
        kernels.conv2d_backward(grad_y, x, W, stride, padding, output_size=output_size)
    # the whole output is the plain call; grad_y must have output_size's shape
    whole = kernels.conv2d_forward(x, W, b, stride, padding, output_size=(7, 9))
    assert whole.shape == (2, 4, 7, 9)
    with pytest.raises(ValueError, match=r"grad_y must have shape \(2, 4, 6, 9\)"):
        kernels.conv2d_backward(grad_y, x, W, stride, padding, output_size=(6, 9))


def conv_then_pool(x, W, b, stride, padding):
    """maxpool2d_forward of conv2d_forward's first even rows and columns, one by one."""
    y = kernels.conv2d_forward(x, W, b, stride, padding)
    size = (y.shape[2] // 2 * 2, y.shape[3] // 2 * 2)
    return kernels.maxpool2d_forward(kernels.conv2d_forward(x, W, b, stride, padding,
                                                            output_size=size), 2, 2, 2)


def conv_case_output(case):
    """(OH, OW) of a CONV_CASES entry."""
    _, _, h, w, _, kh, kw, stride, padding = case
    (sh, sw), (ph, pw) = (kernels.pair(stride, "stride", "test", 1),
                          kernels.pair(padding, "padding", "test", 0))
    return kernels.conv_output_size(h, kh, sh, ph), kernels.conv_output_size(w, kw, sw, pw)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if min(conv_case_output(c)) >= 2],
                         ids=lambda c: "x".join(map(str, c[:7])))
def test_conv2d_maxpool_is_the_conv_then_the_pool(backend_name, dtype, case):
    """conv2d_maxpool_forward gives the bits of the conv and the max pool one by one
    (argmax included), on ties and NaNs too; against PyTorch's pool of its conv."""
    x, W, b, stride, padding = conv_inputs(case, dtype)
    x, W = np.round(x), np.round(W)             # small integers: ties between outputs
    x.flat[::7] = np.nan
    for bias in (b, None):
        y, argmax = kernels.conv2d_maxpool_forward(x, W, bias, stride, padding)
        want_y, want_argmax = conv_then_pool(x, W, bias, stride, padding)
        assert y.dtype == dtype and argmax.dtype == np.int64
        np.testing.assert_array_equal(y.view(np.uint8), want_y.view(np.uint8))
        np.testing.assert_array_equal(argmax, want_argmax)
    torch = pytest.importorskip("torch")
    x = conv_inputs(case, dtype)[0]
    ty = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(
        *(torch.tensor(a, dtype=torch.float64) for a in (x, W, b)), stride=stride,
        padding=padding), 2)
    assert_close(kernels.conv2d_maxpool_forward(x, W, b, stride, padding)[0], ty.numpy(), dtype)


def test_conv2d_maxpool_needs_a_2x2_output(backend_name):
    x, W = np.zeros((1, 2, 3, 3), np.float32), np.zeros((4, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"conv2d_maxpool_forward: the conv's output \(1x1\) "
                                         r"is smaller than the 2x2 pool window"):
        kernels.conv2d_maxpool_forward(x, W)


def test_conv2d_gradients_by_finite_differences(backend_name):
    x, W, b, stride, padding = conv_inputs((2, 2, 5, 4, 3, 3, 2, (2, 1), 1), np.float64)
    grad_y = random(np.random.default_rng(3), kernels.conv2d_forward(x, W, b, stride, padding).shape,
                    np.float64)

    def loss():
        return float((kernels.conv2d_forward(x, W, b, stride, padding) * grad_y).sum())

    grad_x, grad_W, grad_b = kernels.conv2d_backward(grad_y, x, W, stride, padding)
    for analytic, array in ((grad_x, x), (grad_W, W), (grad_b, b)):
        np.testing.assert_allclose(analytic, numerical_grad(loss, array), rtol=1e-6, atol=1e-7)


def test_conv2d_reference_chunks_the_batch(monkeypatch):
    """A workspace bound smaller than the batch's columns splits the batch; same result."""
    x, W, b, _, _ = conv_inputs((5, 3, 6, 7, 2, 3, 3, 1, 1), np.float64)
    stride, padding = (1, 1), (1, 1)      # the internal functions take (h, w) pairs
    grad_y = random(np.random.default_rng(4), (5, 2, 6, 7), np.float64)
    whole = (_reference.conv2d_forward(x, W, b, stride, padding),
             *_reference.conv2d_backward(grad_y, x, W, stride, padding))
    per_sample = 3 * 9 * 6 * 7 * 8
    monkeypatch.setattr(_reference, "CONV_WORKSPACE_BYTES", 2 * per_sample)
    assert _reference._conv_chunk(x.shape, 3, 3, 6, 7, 8) == 2
    chunked = (_reference.conv2d_forward(x, W, b, stride, padding),
               *_reference.conv2d_backward(grad_y, x, W, stride, padding))
    for c, w in zip(chunked, whole):
        np.testing.assert_allclose(c, w, rtol=1e-13, atol=1e-13)


def test_conv2d_direct_is_deterministic():
    """The direct float32 conv (LeNet's shapes): the same bits call after call."""
    x, W, b, stride, padding = conv_inputs((64, 1, 28, 28, 6, 5, 5, 1, 2), np.float32)
    grad_y = random(np.random.default_rng(6), (64, 6, 28, 28), np.float32)
    first = (kernels.conv2d_forward(x, W, b, stride, padding),
             *kernels.conv2d_backward(grad_y, x, W, stride, padding))
    for _ in range(3):
        again = (kernels.conv2d_forward(x, W, b, stride, padding),
                 *kernels.conv2d_backward(grad_y, x, W, stride, padding))
        for a, f in zip(again, first):
            np.testing.assert_array_equal(a, f)


def test_compiled_kernels_restore_the_blas_thread_count():
    """BLAS is held to one thread only while a compiled kernel runs."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    x, W, b, stride, padding = conv_inputs(LENET_CONV2, np.float32)
    run_on("cpu", kernels.conv2d_forward, x, W, b, stride, padding)
    run_on("cpu", kernels.dense_forward, np.ones((300, 300), np.float32), np.ones((300, 300), np.float32), None)
    small = np.ones((64, 40), np.float32), np.ones((40, 12), np.float32)   # a one-thread GEMM
    run_on("cpu", kernels.dense_forward, *small, None)
    run_on("cpu", kernels.dense_backward, np.ones((64, 12), np.float32), *small)
    after = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert after == before


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[4], CONV_CASES[7],
                                  CONV_CASES[8], LENET_CONV2],
                         ids=["columns", "1x1", "stride2", "rows-batch1", "rows", "rows-stride2"])
def test_backward_without_grad_x(any_backend, case):
    """need_grad_x=False (a first layer): grad_x is None, the parameter gradients unchanged."""
    x, W, b, stride, padding = conv_inputs(case, np.float64)
    grad_y = random(np.random.default_rng(24), kernels.conv2d_forward(x, W, b, stride, padding).shape,
                    np.float64)
    full = run_on(any_backend, kernels.conv2d_backward, grad_y, x, W, stride, padding)
    part = run_on(any_backend, kernels.conv2d_backward, grad_y, x, W, stride, padding,
                  need_grad_x=False)
    assert part[0] is None
    np.testing.assert_array_equal(part[1], full[1])
    np.testing.assert_array_equal(part[2], full[2])
    xd, Wd, gd = (random(np.random.default_rng(25), s, np.float64) for s in ((5, 7), (7, 3), (5, 3)))
    full = run_on(any_backend, kernels.dense_backward, gd, xd, Wd)
    part = run_on(any_backend, kernels.dense_backward, gd, xd, Wd, need_grad_x=False)
    assert part[0] is None
    np.testing.assert_array_equal(part[1], full[1])
    np.testing.assert_array_equal(part[2], full[2])


# --- im2col / col2im ---------------------------------------------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2col_layout(backend_name, dtype, geometry):
    """Row c*kh*kw + i*kw + j, column n*OH*OW + oh*OW + ow holds x_padded[n, c, oh*sh+i, ow*sw+j]."""
    n, c, h, w, kh, kw, stride, padding = geometry
    x = random(np.random.default_rng(5), (n, c, h, w), dtype)
    cols = kernels.im2col(x, kh, kw, stride, padding)
    (sh, sw), (ph, pw) = kernels.pair(stride, "s", "t", 1), kernels.pair(padding, "p", "t", 0)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    assert cols.shape == (c * kh * kw, n * oh * ow) and cols.dtype == dtype
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                expected = padded[:, ci, i:i + sh * oh:sh, j:j + sw * ow:sw].reshape(-1)
                np.testing.assert_array_equal(cols[ci * kh * kw + i * kw + j], expected)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_col2im_is_the_adjoint_of_im2col(backend_name, geometry):
    """<im2col(x), c> == <x, col2im(c)> for random x and c."""
    n, c, h, w, kh, kw, stride, padding = geometry
    rng = np.random.default_rng(6)
    x = random(rng, (n, c, h, w), np.float64)
    cols = kernels.im2col(x, kh, kw, stride, padding)
    other = random(rng, cols.shape, np.float64)
    dx = kernels.col2im(other, x.shape, kh, kw, stride, padding)
    assert dx.shape == x.shape
    np.testing.assert_allclose((cols * other).sum(), (x * dx).sum(), rtol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2col_col2im_backends_match_reference(fast_backend, dtype, geometry):
    n, c, h, w, kh, kw, stride, padding = geometry
    x = random(np.random.default_rng(7), (n, c, h, w), dtype)
    cols = run_on("numpy", kernels.im2col, x, kh, kw, stride, padding)
    # im2col only copies: the same values exactly
    np.testing.assert_array_equal(run_on(fast_backend, kernels.im2col, x, kh, kw, stride, padding),
                                  cols)
    assert_close(run_on(fast_backend, kernels.col2im, cols, x.shape, kh, kw, stride, padding),
                 run_on("numpy", kernels.col2im, cols, x.shape, kh, kw, stride, padding), dtype,
                 fast_backend)


# --- max pooling ------------------------------------------------------------------

@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool2d_matches_torch(backend_name, dtype, case):
    torch = pytest.importorskip("torch")
    n, c, h, w, kh, kw, stride = case
    x = random(np.random.default_rng(8), (n, c, h, w), dtype)
    y, argmax = kernels.maxpool2d_forward(x, kh, kw, stride)
    tx = torch.tensor(x, requires_grad=True)
    ty, tidx = torch.nn.functional.max_pool2d(tx, (kh, kw), stride=stride, return_indices=True)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(argmax, tidx.numpy())
    assert argmax.dtype == np.int64
    grad_y = random(np.random.default_rng(9), y.shape, dtype)
    ty.backward(torch.tensor(grad_y))
    assert_close(kernels.maxpool2d_backward(grad_y, argmax, x.shape),
                               tx.grad.numpy(), dtype)


@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool2d_backends_match_reference(fast_backend, dtype, case):
    n, c, h, w, kh, kw, stride = case
    rng = np.random.default_rng(10)
    # rounded values make ties common: both must pick the first maximum of a window
    x = np.round(random(rng, (n, c, h, w), dtype))
    y_ref, arg_ref = run_on("numpy", kernels.maxpool2d_forward, x, kh, kw, stride)
    y, arg = run_on(fast_backend, kernels.maxpool2d_forward, x, kh, kw, stride)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    assert arg.dtype == np.int64
    grad_y = random(rng, y.shape, dtype)
    assert_close(run_on(fast_backend, kernels.maxpool2d_backward, grad_y, arg, x.shape),
                 run_on("numpy", kernels.maxpool2d_backward, grad_y, arg, x.shape), dtype,
                 fast_backend)


@pytest.mark.parametrize("shape, window, stride", [((3, 2, 8, 10), 2, 2), ((2, 2, 4, 4), 3, 1)])
def test_maxpool2d_backward_bits_in_cells(fast_backend, dtype, shape, window, stride):
    """Where 2x2 cells tile the plane the compiled backward writes each cell whole (no
    scatter): the reference's bits still, -0.0 added to 0 (0.0) and NaN included, also
    where a plane's later maximum lies outside its cell (3x3/1 on 4x4: the scatter)."""
    rng = np.random.default_rng(13)
    x = random(rng, shape, dtype)
    _, arg = run_on("numpy", kernels.maxpool2d_forward, x, window, window, stride)
    grad_y = random(rng, arg.shape, dtype)
    grad_y.flat[:3] = [-0.0, np.nan, 1e-30]
    want = run_on("numpy", kernels.maxpool2d_backward, grad_y, arg, shape)
    got = run_on(fast_backend, kernels.maxpool2d_backward, grad_y, arg, shape)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))


# --- average pooling ---------------------------------------------------------------

@pytest.mark.parametrize("case", AVGPOOL_CASES)
def test_avgpool2d_matches_torch(backend_name, dtype, case):
    torch = pytest.importorskip("torch")
    n, c, h, w, kh, kw, stride = case
    x = random(np.random.default_rng(14), (n, c, h, w), dtype)
    y = kernels.avgpool2d_forward(x, kh, kw, stride)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, (kh, kw), stride=stride)
    assert y.dtype == dtype
    assert_close(y, ty.detach().numpy(), dtype)
    grad_y = random(np.random.default_rng(15), y.shape, dtype)
    ty.backward(torch.tensor(grad_y))
    assert_close(kernels.avgpool2d_backward(grad_y, x.shape, kh, kw, stride),
                 tx.grad.numpy(), dtype)


@pytest.mark.parametrize("case", AVGPOOL_CASES)
def test_avgpool2d_backends_match_reference_bits(fast_backend, dtype, case):
    """The compiled kernels add in the reference's order (CUDA runs the reference on
    CuPy): the same bits, -0.0 and NaN included; a non-contiguous input is made
    contiguous first."""
    n, c, h, w, kh, kw, stride = case
    rng = np.random.default_rng(16)
    x = random(rng, (n, c, h, 2 * w), dtype)[..., ::2]           # non-contiguous
    x[0, 0, 0, :2] = [np.nan, -0.0]
    y_ref = run_on("numpy", kernels.avgpool2d_forward, x, kh, kw, stride)
    y = run_on(fast_backend, kernels.avgpool2d_forward, x, kh, kw, stride)
    np.testing.assert_array_equal(y, y_ref)
    assert np.array_equal(np.signbit(y), np.signbit(y_ref))
    grad_y = random(rng, y.shape, dtype)
    grad_y.flat[:3] = [-0.0, np.nan, 1e-30]
    want = run_on("numpy", kernels.avgpool2d_backward, grad_y, x.shape, kh, kw, stride)
    got = run_on(fast_backend, kernels.avgpool2d_backward, grad_y, x.shape, kh, kw, stride)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_avgpool2d_parallel_matches_reference():
    """A large array: the compiled kernels split their planes over the worker pool."""
    rng = np.random.default_rng(17)
    x = random(rng, (2, 8, 383, 385), np.float32)
    y = run_on("cpu", kernels.avgpool2d_forward, x, 3, 3, 2)
    np.testing.assert_array_equal(y, run_on("numpy", kernels.avgpool2d_forward, x, 3, 3, 2))
    grad_y = random(rng, y.shape, np.float32)
    np.testing.assert_array_equal(
        run_on("cpu", kernels.avgpool2d_backward, grad_y, x.shape, 3, 3, 2),
        run_on("numpy", kernels.avgpool2d_backward, grad_y, x.shape, 3, 3, 2))


def test_avgpool2d_gradient_by_finite_differences(backend_name):
    x = random(np.random.default_rng(18), (2, 2, 7, 6), np.float64)
    grad_y = random(np.random.default_rng(19), kernels.avgpool2d_forward(x, 3, 2, (2, 1)).shape,
                    np.float64)

    def loss():
        return float((kernels.avgpool2d_forward(x, 3, 2, (2, 1)) * grad_y).sum())

    np.testing.assert_allclose(kernels.avgpool2d_backward(grad_y, x.shape, 3, 2, (2, 1)),
                               numerical_grad(loss, x), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kh, kw, stride", [(2, 2, 2), (3, 3, 2)])
def test_maxpool2d_parallel_matches_reference(kh, kw, stride):
    """A large array: the compiled pool splits its planes over the worker pool."""
    rng = np.random.default_rng(11)
    x = np.round(random(rng, (2, 8, 383, 385), np.float32))     # 2.36M elements
    y_ref, arg_ref = run_on("numpy", kernels.maxpool2d_forward, x, kh, kw, stride)
    y, arg = run_on("cpu", kernels.maxpool2d_forward, x, kh, kw, stride)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    grad_y = random(rng, y.shape, np.float32)
    np.testing.assert_array_equal(run_on("cpu", kernels.maxpool2d_backward, grad_y, arg, x.shape),
                                  run_on("numpy", kernels.maxpool2d_backward, grad_y, arg, x.shape))


@pytest.mark.parametrize("kh, kw, stride", [(2, 2, 2), (3, 3, 2)])
def test_maxpool2d_large_outputs_reuse_memory_only_when_free(kh, kw, stride):
    """Outputs from 64 KiB take their memory from the caching allocator (_output_array):
    a dropped result's block is zeroed again for the next scatter-add, a live one (or
    one a view keeps) is never written."""
    rng = np.random.default_rng(12)
    x = np.round(random(rng, (2, 8, 383, 385), np.float32))      # grad_x: 9.4 MB
    _, arg = run_on("cpu", kernels.maxpool2d_forward, x, kh, kw, stride)
    grads = [random(rng, arg.shape, np.float32) for _ in range(3)]
    want = [run_on("numpy", kernels.maxpool2d_backward, g, arg, x.shape) for g in grads]
    first = run_on("cpu", kernels.maxpool2d_backward, grads[0], arg, x.shape)
    address = first.ctypes.data
    np.testing.assert_array_equal(first, want[0])
    del first                                       # free: the next result reuses it
    second = run_on("cpu", kernels.maxpool2d_backward, grads[1], arg, x.shape)
    assert second.ctypes.data == address
    np.testing.assert_array_equal(second, want[1])
    third = run_on("cpu", kernels.maxpool2d_backward, grads[2], arg, x.shape)   # second lives
    assert third.ctypes.data != address
    np.testing.assert_array_equal(third, want[2])
    np.testing.assert_array_equal(second, want[1])
    view = third[:, 1]                              # a view keeps its buffer taken
    del third
    again = run_on("cpu", kernels.maxpool2d_backward, grads[0], arg, x.shape)
    np.testing.assert_array_equal(view, want[2][:, 1])
    np.testing.assert_array_equal(again, want[0])


def test_maxpool2d_ties_and_nan(backend_name, dtype):
    """Rows of fewer than 4 outputs (float32: copied into a block of 4 first)."""
    x = np.zeros((1, 1, 4, 4), dtype=dtype)
    x[0, 0, 3, 2] = np.nan
    y, argmax = kernels.maxpool2d_forward(x, 2, 2, 2)
    np.testing.assert_array_equal(argmax[0, 0], [[0, 2], [8, 14]])   # first of equal values
    assert np.isnan(y[0, 0, 1, 1]) and not np.isnan(y[0, 0, 0, 0])    # NaN propagates
    x = np.full((2, 1, 5, 7), -np.inf, dtype=dtype)                   # 2x3 outputs a plane
    for q, (i, j) in enumerate([(0, 1), (1, 0), (1, 1)]):
        x[1, 0, i, 2 * q + j] = np.nan
    x[0, 0, 3, 5], x[0, 0, 4, 6] = 2, 9          # the 7th column and 5th row: no window's
    y, argmax = kernels.maxpool2d_forward(x, 2, 2, 2)
    assert np.isnan(y[1, 0, 0]).all()
    np.testing.assert_array_equal(argmax[1, 0, 0], [1, 9, 12])
    np.testing.assert_array_equal(y[0, 0, 1], [-np.inf, -np.inf, 2])
    np.testing.assert_array_equal(argmax[0, 0], [[0, 2, 4], [14, 16, 26]])


def test_maxpool2d_ties_and_nan_wide_rows(backend_name, dtype):
    """The same rules on rows wide enough for the 4-at-a-time 2x2 path (and its
    overlapping last block): NaN in each window position, ties, -inf."""
    x = np.zeros((1, 1, 4, 14), dtype=dtype)
    for q, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (1, 1), (0, 1), (1, 0)]):
        x[0, 0, i, 2 * q + j] = np.nan
    x[0, 0, 2:, :] = -np.inf
    x[0, 0, 3, 13] = 1
    x[0, 0, 2, 5] = -1
    y, argmax = kernels.maxpool2d_forward(x, 2, 2, 2)
    assert np.isnan(y[0, 0, 0]).all()
    np.testing.assert_array_equal(argmax[0, 0, 0], [0, 3, 18, 21, 23, 11, 26])
    np.testing.assert_array_equal(y[0, 0, 1], [-np.inf, -np.inf, -1, -np.inf, -np.inf, -np.inf, 1])
    np.testing.assert_array_equal(argmax[0, 0, 1], [28, 30, 33, 34, 36, 38, 55])


def test_maxpool2d_gradient_by_finite_differences(backend_name):
    x = random(np.random.default_rng(11), (2, 2, 7, 6), np.float64)
    grad_y = random(np.random.default_rng(12), kernels.maxpool2d_forward(x, 3, 2, 2)[0].shape,
                    np.float64)

    def loss():
        return float((kernels.maxpool2d_forward(x, 3, 2, 2)[0] * grad_y).sum())

    _, argmax = kernels.maxpool2d_forward(x, 3, 2, 2)
    np.testing.assert_allclose(kernels.maxpool2d_backward(grad_y, argmax, x.shape),
                               numerical_grad(loss, x), rtol=1e-6, atol=1e-8)


# --- ReLU -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (1500, 1500)])  # last one runs in parallel
def test_relu(backend_name, dtype, shape):
    rng = np.random.default_rng(13)
    x = random(rng, shape, dtype)
    y = kernels.relu_forward(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    grad_y = random(rng, shape, dtype)
    grad_x = kernels.relu_backward(grad_y, y)
    assert grad_x.dtype == dtype
    np.testing.assert_array_equal(grad_x, np.where(x > 0, grad_y, 0))


@pytest.mark.parametrize("shape", [(3, 5, 7), (6, 4), (1000003,)])
def test_relu_backends_match_reference_bits(fast_backend, dtype, shape):
    """Odd sizes (the CUDA kernels' 4-per-thread loop and its remainder), a
    non-contiguous input, NaN (stays NaN forward; a NaN output passes no gradient)
    and zeros."""
    rng = np.random.default_rng(6)
    x = random(rng, shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    x.flat[::97] = np.nan
    x.flat[1:3] = 0
    grad_y = random(rng, shape, dtype)
    y = run_on(fast_backend, kernels.relu_forward, x)
    want = run_on("numpy", kernels.relu_forward, x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(run_on(fast_backend, kernels.relu_backward, grad_y, y),
                                  run_on("numpy", kernels.relu_backward, grad_y, want))


def test_relu_out_buffers(backend_name, dtype):
    """out= receives the result, also in place (out=x, out=grad_y, out=y)."""
    rng = np.random.default_rng(23)
    x = random(rng, (300, 301), dtype)
    grad_y = random(rng, x.shape, dtype)
    y, grad_x = kernels.relu_forward(x), kernels.relu_backward(grad_y, x)
    out = np.empty_like(x)
    assert kernels.relu_forward(x, out=out) is out
    np.testing.assert_array_equal(out, y)
    assert kernels.relu_backward(grad_y, x, out=out) is out
    np.testing.assert_array_equal(out, grad_x)
    for target in ("grad_y", "y"):
        g, yy = grad_y.copy(), x.copy()
        result = kernels.relu_backward(g, yy, out=g if target == "grad_y" else yy)
        np.testing.assert_array_equal(result, grad_x)
    in_place = x.copy()
    assert kernels.relu_forward(in_place, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, y)


@pytest.mark.parametrize("out, error, words", [
    (np.empty((3, 4), np.float32), ValueError, ["relu_forward", "(4, 3)", "(3, 4)"]),
    (np.empty((4, 3), np.float64), TypeError, ["relu_forward", "float32", "float64"]),
    (np.empty((3, 4), np.float32).T, ValueError, ["relu_forward", "C-contiguous"]),
])
def test_relu_bad_out_buffer(backend_name, out, error, words):
    with pytest.raises(error) as info:
        kernels.relu_forward(np.zeros((4, 3), np.float32), out=out)
    for word in words:
        assert word in str(info.value)


def test_relu_nan_and_gradient(backend_name):
    x = np.array([np.nan, -1.0, 0.0, 2.0])
    assert np.isnan(kernels.relu_forward(x)[0])
    x = random(np.random.default_rng(14), (4, 5), np.float64)
    x[np.abs(x) < 1e-3] = 0.5     # keep finite differences away from the kink
    grad_y = random(np.random.default_rng(15), x.shape, np.float64)
    np.testing.assert_allclose(
        kernels.relu_backward(grad_y, kernels.relu_forward(x)),
        numerical_grad(lambda: float((kernels.relu_forward(x) * grad_y).sum()), x), rtol=1e-6)


# --- leaky ReLU -------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_leaky_relu_matches_torch(backend_name, dtype, alpha):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(24)
    x = random(rng, (3, 5, 7), dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.leaky_relu(tx, alpha)
    y = kernels.leaky_relu_forward(x, alpha)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, ty.detach().numpy())
    grad_y = random(rng, x.shape, dtype)
    ty.backward(torch.tensor(grad_y))
    np.testing.assert_array_equal(kernels.leaky_relu_backward(grad_y, x, alpha), tx.grad.numpy())


@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 1, 9, 11), (2**21 + 3,)])
def test_leaky_relu_backends_match_reference_bits(fast_backend, dtype, shape):
    """Odd sizes, the threaded size, a non-contiguous input, NaN, infinities and -0.0
    (CUDA runs the reference on CuPy)."""
    rng = np.random.default_rng(25)
    x = random(rng, shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    specials = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, -1e-30], dtype)
    x.flat[:min(x.size, 6)] = specials[:min(x.size, 6)]
    grad_y = random(rng, x.shape, dtype)
    for alpha in (0.01, 0.2):
        want = run_on("numpy", kernels.leaky_relu_forward, x, alpha)
        got = run_on(fast_backend, kernels.leaky_relu_forward, x, alpha)
        np.testing.assert_array_equal(got, want)
        assert np.array_equal(np.signbit(got), np.signbit(want))
        want = run_on("numpy", kernels.leaky_relu_backward, grad_y, x, alpha)
        got = run_on(fast_backend, kernels.leaky_relu_backward, grad_y, x, alpha)
        np.testing.assert_array_equal(got, want)


def test_leaky_relu_gradient_by_finite_differences(backend_name):
    x = random(np.random.default_rng(26), (4, 5), np.float64)
    x[np.abs(x) < 1e-3] = 0.5     # keep finite differences away from the kink
    grad_y = random(np.random.default_rng(27), x.shape, np.float64)
    np.testing.assert_allclose(
        kernels.leaky_relu_backward(grad_y, x, 0.1),
        numerical_grad(lambda: float((kernels.leaky_relu_forward(x, 0.1) * grad_y).sum()), x),
        rtol=1e-6)


# --- dropout (the layer's kernels: a counter-based mask, the same on every backend) -----

@pytest.mark.parametrize("shape", [(1,), (7,), (64, 256), (3, 5, 9, 11), (2**21 + 5,)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_compiled_matches_reference_bits(avx512_rows, dtype, shape, p):
    """The AVX-512 and portable loops, odd sizes and the threaded size: the reference's
    mask and output, bit for bit, for small, large and negative seeds."""
    from fastnn.kernels import _cpu
    x = random(np.random.default_rng(30), shape, dtype)
    for seed in (0, 12345, 2**64 - 1, -3):
        y, mask = _cpu.dropout_forward(x, p, seed)
        want_y, want_mask = _reference.dropout_forward(x, p, seed)
        assert y.dtype == mask.dtype == dtype and y.shape == mask.shape == shape
        np.testing.assert_array_equal(mask, want_mask)
        np.testing.assert_array_equal(y, want_y)
    grad_y = random(np.random.default_rng(31), shape, dtype)
    np.testing.assert_array_equal(_cpu.dropout_backward(grad_y, mask),
                                  _reference.dropout_backward(grad_y, mask))


def test_dropout_mask_rate_scale_and_seed():
    from fastnn.kernels import _cpu
    x = np.ones((1000, 1000), np.float32)
    _, mask = _cpu.dropout_forward(x, 0.3, 7)
    assert set(np.unique(mask)) == {np.float32(0), np.float32(1 / 0.7)}
    assert abs((mask == 0).mean() - 0.3) < 0.003          # 1e6 draws: ~0.0005 std
    assert np.array_equal(_cpu.dropout_forward(x, 0.3, 7)[1], mask)
    assert not np.array_equal(_cpu.dropout_forward(x, 0.3, 8)[1], mask)
    # neighbouring elements are independent: the rate of both kept is (1 - p)^2
    kept = mask.reshape(-1) > 0
    assert abs((kept[:-1] & kept[1:]).mean() - 0.49) < 0.003


# --- batch normalisation (the layers' kernels; the public layers are tested too) --------

@pytest.mark.parametrize("shape", BATCHNORM_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_backends_match_reference(fast_backend, dtype, shape, training):
    impl = _impl_module(fast_backend)
    rng = np.random.default_rng(28)
    c = shape[1]
    x = random(rng, shape, dtype) * dtype(3) + dtype(5)      # an offset mean, as activations have
    gamma, beta = random(rng, (c,), dtype), random(rng, (c,), dtype)
    stats = () if training else (random(rng, (c,), dtype), np.abs(random(rng, (c,), dtype)) + 0.5)
    want = _reference.batchnorm_forward(x, gamma, beta, 1e-5, *stats)
    got = run_on(fast_backend, impl.batchnorm_forward, x, gamma, beta, 1e-5, *stats)
    for g, w in zip(got, want):                          # y, x_hat, mean, var, inv_std
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, dtype, fast_backend)
    grad_y = random(rng, shape, dtype)
    want = _reference.batchnorm_backward(grad_y, want[1], gamma, want[4])
    got = run_on(fast_backend, impl.batchnorm_backward, grad_y, got[1], gamma, got[4])
    for g, w in zip(got, want):                          # grad_x, grad_gamma, grad_beta
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, dtype, fast_backend)


@pytest.mark.parametrize("shape", BATCHNORM_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_fused_relu_is_the_relu_kernels_one_by_one(fast_backend, dtype, shape,
                                                             training):
    """batchnorm_forward(relu=True) gives relu_forward(y), batchnorm_backward(relu_y=y)
    the backward of relu_backward(grad_y, y), bit for bit (NaN and -0.0 in y cut the
    gradient, a NaN in grad_y passes only where y > 0), and the reference's values."""
    impl = _impl_module(fast_backend)
    rng = np.random.default_rng(30)
    c = shape[1]
    x = random(rng, shape, dtype)
    gamma, beta = random(rng, (c,), dtype), random(rng, (c,), dtype)
    stats = () if training else (random(rng, (c,), dtype), np.abs(random(rng, (c,), dtype)) + 0.5)
    y, x_hat, *_, inv_std = run_on(fast_backend, impl.batchnorm_forward, x, gamma, beta, 1e-5,
                                   *stats, relu=True)
    plain = run_on(fast_backend, impl.batchnorm_forward, x, gamma, beta, 1e-5, *stats)
    np.testing.assert_array_equal(y, run_on(fast_backend, impl.relu_forward, plain[0]))
    want = _reference.batchnorm_forward(x, gamma, beta, 1e-5, *stats, relu=True)
    assert_close(y, want[0], dtype, fast_backend)
    grad_y = random(rng, shape, dtype)
    flat_y, flat_g = y.reshape(-1), grad_y.reshape(-1)
    flat_y[:3] = [np.nan, -0.0, 0.0][:flat_y.size]      # each cuts the gradient
    flat_g[-1:] = np.nan                                  # passes where y > 0 only
    got = run_on(fast_backend, impl.batchnorm_backward, grad_y, x_hat, gamma, inv_std,
                 relu_y=y)
    masked = run_on(fast_backend, impl.relu_backward, grad_y, y)
    one_by_one = run_on(fast_backend, impl.batchnorm_backward, masked, x_hat, gamma, inv_std)
    want = _reference.batchnorm_backward(grad_y, x_hat, gamma, inv_std, relu_y=y)
    for g, o, w in zip(got, one_by_one, want):           # grad_x, grad_gamma, grad_beta
        np.testing.assert_array_equal(g, o)
        assert_close(g, w, dtype, fast_backend)


def test_reference_batchnorm_relu_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(31)
    x, grad_y = rng.standard_normal((6, 3, 4, 5)), rng.standard_normal((6, 3, 4, 5))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    ty = torch.relu(torch.nn.functional.batch_norm(tx, None, None, tg, tb, training=True,
                                                   eps=1e-5))
    ty.backward(torch.tensor(grad_y))
    y, x_hat, _, _, inv_std = _reference.batchnorm_forward(x, gamma, beta, 1e-5, relu=True)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    got = _reference.batchnorm_backward(grad_y, x_hat, gamma, inv_std, relu_y=y)
    for g, t in zip(got, (tx.grad, tg.grad, tb.grad)):
        np.testing.assert_allclose(g, t.numpy(), rtol=1e-10, atol=1e-12)


def test_batchnorm_statistics_in_double():
    """float32 inputs, but the sums run in double: the mean and variance of a large
    batch with a large offset are the float64 ones, rounded once."""
    from fastnn.kernels import _cpu
    x = (random(np.random.default_rng(29), (256, 4, 32, 32), np.float64) + 1000).astype(np.float32)
    _, _, mean, var, _ = _cpu.batchnorm_forward(x, np.ones(4, np.float32), np.zeros(4, np.float32),
                                                1e-5)
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(mean, x64.mean(axis=(0, 2, 3)).astype(np.float32))
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-6)


# --- dense ----------------------------------------------------------------------

@pytest.mark.parametrize("n, i, o", [(1, 3, 2), (7, 11, 13), (64, 33, 17)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_matches_torch(backend_name, dtype, n, i, o, with_bias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    x, W, b, grad_y = (random(rng, s, dtype) for s in ((n, i), (i, o), (o,), (n, o)))
    bias = b if with_bias else None
    y = kernels.dense_forward(x, W, bias)
    tx, tW, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, W, b))
    ty = torch.nn.functional.linear(tx, tW.T, tb if with_bias else None)
    assert y.dtype == dtype
    assert_close(y, ty.detach().numpy(), dtype)
    ty.backward(torch.tensor(grad_y, dtype=torch.float64))
    grads = kernels.dense_backward(grad_y, x, W)
    for got, want in zip(grads, (tx.grad, tW.grad, None)):
        assert got.dtype == dtype
        if want is not None:
            assert_close(got, want.numpy(), dtype)
    assert_close(grads[2], grad_y.astype(np.float64).sum(axis=0), dtype)


@pytest.mark.parametrize("n, i, o", DENSE_CASES)
def test_dense_backends_match_reference(fast_backend, dtype, n, i, o):
    rng = np.random.default_rng(17)
    x, W, b, grad_y = (random(rng, s, dtype) for s in ((n, i), (i, o), (o,), (n, o)))
    for bias in (b, None):
        got = run_on(fast_backend, kernels.dense_forward, x, W, bias)
        assert got.dtype == dtype and got.shape == (n, o)
        assert_close(got, run_on("numpy", kernels.dense_forward, x, W, bias), dtype, fast_backend)
    for got, want in zip(run_on(fast_backend, kernels.dense_backward, grad_y, x, W),
                         run_on("numpy", kernels.dense_backward, grad_y, x, W)):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, dtype, fast_backend)


def test_dense_gradients_by_finite_differences(backend_name):
    rng = np.random.default_rng(18)
    x, W, b, grad_y = (random(rng, s, np.float64) for s in ((3, 4), (4, 5), (5,), (3, 5)))

    def loss():
        return float((kernels.dense_forward(x, W, b) * grad_y).sum())

    grads = kernels.dense_backward(grad_y, x, W)
    for analytic, array in zip(grads, (x, W, b)):
        np.testing.assert_allclose(analytic, numerical_grad(loss, array), rtol=1e-7, atol=1e-9)


# --- softmax cross-entropy ------------------------------------------------------------

@pytest.mark.parametrize("n, c", [(1, 3), (9, 10), (300, 257)])
def test_softmax_cross_entropy_matches_torch(backend_name, dtype, n, c):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(19)
    logits = random(rng, (n, c), dtype) * 3
    labels = rng.integers(0, c, n)
    probabilities = rng.random((n, c)).astype(dtype)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for target in (labels, probabilities):
        loss, grad = kernels.softmax_cross_entropy(logits, target)
        assert type(loss) is np.dtype(dtype).type and grad.dtype == dtype
        tl = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        tloss = torch.nn.functional.cross_entropy(tl, torch.tensor(target))
        tloss.backward()
        assert_close(loss, tloss.item(), dtype)
        assert_close(grad, tl.grad.numpy(), dtype)


def test_softmax_cross_entropy_is_stable_at_large_logits(any_backend, dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype)
    loss, grad = run_on(any_backend, kernels.softmax_cross_entropy, logits, np.array([1, 2, 0]))
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, (2e4 + np.log(3) + np.log(2)) / 3, rtol=1e-6)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-6)


@pytest.mark.parametrize("n, c", SOFTMAX_CASES)
def test_softmax_cross_entropy_backends_match_reference(fast_backend, dtype, n, c):
    """Class indices (int64 and int32) and one-hot rows."""
    rng = np.random.default_rng(20)
    logits = random(rng, (n, c), dtype) * 5
    labels = rng.integers(0, c, n)
    onehot = np.eye(c, dtype=dtype)[labels]
    for target in (labels, labels.astype(np.int32), onehot):
        got = run_on(fast_backend, kernels.softmax_cross_entropy, logits, target)
        want = run_on("numpy", kernels.softmax_cross_entropy, logits, target)
        assert np.asarray(got[0]).dtype == dtype and got[1].dtype == dtype
        assert_close(got[0], want[0], dtype, fast_backend)
        assert_close(got[1], want[1], dtype, fast_backend)


@pytest.fixture(params=[True, False], ids=["avx512-rows", "portable"])
def avx512_rows(request):
    """The compiled float32 softmax rows and finiteness checks in AVX-512 lanes (where
    the CPU has them) or on the portable loops."""
    if "cpu" not in backend.available():
        pytest.skip("compiled kernels not built")
    from fastnn.kernels import variants
    name = "avx512" if request.param else "portable"
    if name not in variants.applicable("row_kernels"):
        pytest.skip("this CPU has no AVX-512")
    with variants.force("row_kernels", name):
        yield request.param


@pytest.mark.parametrize("c", [1, 2, 10, 16, 17, 33, 100])
def test_softmax_cross_entropy_float32_rows_match_float64(avx512_rows, c):
    """Row widths around the 16 lanes; labels and probabilities; batch of 1."""
    rng = np.random.default_rng(c)
    for n in (1, 7, 128):
        logits = (rng.standard_normal((n, c)) * 5).astype(np.float32)
        labels = rng.integers(0, c, n)
        probs = rng.random((n, c)).astype(np.float32)
        probs /= probs.sum(axis=1, keepdims=True)
        for target in (labels, probs):
            loss, grad = run_on("cpu", kernels.softmax_cross_entropy, logits, target)
            z = logits.astype(np.float64)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            t = np.eye(c)[labels] if target.ndim == 1 else probs.astype(np.float64)
            np.testing.assert_allclose(loss, -(t * np.log(p)).sum() / n, rtol=2e-6)
            np.testing.assert_allclose(grad, (p - t) / n, rtol=0, atol=4e-7 / n)


def test_softmax_cross_entropy_float32_special_logits(avx512_rows):
    """-inf and very negative logits weigh 0; NaN or +inf make the loss NaN."""
    def run(row):
        return run_on("cpu", kernels.softmax_cross_entropy, np.array([row], np.float32),
                      np.array([1]))
    for low in (-np.inf, -200.0):
        loss, grad = run([low, 0.0, 1.0])
        np.testing.assert_allclose(loss, np.log1p(np.e), rtol=1e-6)
        assert grad[0, 0] == 0
    for bad in (np.nan, np.inf):
        loss, grad = run([bad, 0.0, 1.0])
        assert np.isnan(loss) and np.isnan(grad).all()


def test_softmax_cross_entropy_gradient_by_finite_differences(backend_name):
    rng = np.random.default_rng(21)
    logits = random(rng, (4, 5), np.float64)
    labels = rng.integers(0, 5, 4)
    _, grad = kernels.softmax_cross_entropy(logits, labels)
    numeric = numerical_grad(lambda: float(kernels.softmax_cross_entropy(logits, labels)[0]), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# --- non-contiguous inputs --------------------------------------------------------

def test_non_contiguous_inputs_match_contiguous_copies(backend_name, dtype):
    rng = np.random.default_rng(22)
    x = random(rng, (4, 3, 10, 12), dtype)[::2, :, 1:8, ::-1]     # sliced, strided, reversed
    W = random(rng, (3, 2, 3, 3), dtype).transpose(1, 0, 2, 3)     # (2, 3, 3, 3) view
    b = random(rng, (4,), dtype)[::2]
    x2 = x[:, :2]                                                  # (2, 2, 7, 12)
    copies = [np.ascontiguousarray(a) for a in (x, W, b, x2)]
    y = kernels.conv2d_forward(x2, W[:, :2], b, 1, 1)
    np.testing.assert_array_equal(
        y, kernels.conv2d_forward(copies[3], np.ascontiguousarray(W[:, :2]), copies[2], 1, 1))
    grad_y = random(rng, (y.shape[0], y.shape[1], y.shape[3], y.shape[2]), dtype).transpose(0, 1, 3, 2)
    for got, want in zip(kernels.conv2d_backward(grad_y, x2, W[:, :2], 1, 1),
                         kernels.conv2d_backward(np.ascontiguousarray(grad_y), copies[3],
                                                 np.ascontiguousarray(W[:, :2]), 1, 1)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kernels.im2col(x, 3, 2, 2, 1), kernels.im2col(copies[0], 3, 2, 2, 1))
    cols = kernels.im2col(copies[0], 2, 2, 1, 0)
    np.testing.assert_array_equal(kernels.col2im(np.asfortranarray(cols), x.shape, 2, 2, 1, 0),
                                  kernels.col2im(cols, x.shape, 2, 2, 1, 0))
    y, argmax = kernels.maxpool2d_forward(x, 2, 3, 2)
    y_c, argmax_c = kernels.maxpool2d_forward(copies[0], 2, 3, 2)
    np.testing.assert_array_equal(y, y_c)
    np.testing.assert_array_equal(argmax, argmax_c)
    grad_y = random(rng, y.shape[::-1], dtype).T
    np.testing.assert_array_equal(kernels.maxpool2d_backward(grad_y, np.asfortranarray(argmax), x.shape),
                                  kernels.maxpool2d_backward(np.ascontiguousarray(grad_y), argmax, x.shape))
    np.testing.assert_array_equal(kernels.relu_forward(x), kernels.relu_forward(copies[0]))
    np.testing.assert_array_equal(kernels.relu_backward(x, x[::-1]),
                                  kernels.relu_backward(copies[0], np.ascontiguousarray(x[::-1])))
    m = random(rng, (9, 6), dtype).T                                # (6, 9) Fortran-ordered
    Wd = random(rng, (5, 9), dtype).T
    bd = random(rng, (10,), dtype)[::2]
    assert_close(kernels.dense_forward(m, Wd, bd),
                 kernels.dense_forward(*map(np.ascontiguousarray, (m, Wd, bd))), dtype)
    gd = random(rng, (5, 6), dtype).T
    for got, want in zip(kernels.dense_backward(gd, m, Wd),
                         kernels.dense_backward(*map(np.ascontiguousarray, (gd, m, Wd)))):
        assert_close(got, want, dtype)
    labels = np.arange(12)[::2] % 9
    np.testing.assert_array_equal(kernels.softmax_cross_entropy(m, labels)[1],
                                  kernels.softmax_cross_entropy(np.ascontiguousarray(m),
                                                                np.ascontiguousarray(labels))[1])


# --- bad input -------------------------------------------------------------------

def _x(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


BAD_CALLS = [
    # (kernel, args, exception, words the message must contain)
    ("im2col", (_x(3, 4, 4), 2, 2), ValueError, ["im2col", "4 dimensions", "(3, 4, 4)"]),
    ("im2col", (_x(1, 1, 4, 4, dtype=np.int64), 2, 2), TypeError, ["im2col", "float32", "int64"]),
    ("im2col", (_x(1, 1, 4, 4, dtype=np.float16), 2, 2), TypeError, ["im2col", "float16"]),
    ("im2col", (_x(1, 1, 4, 4), 5, 2), ValueError, ["im2col", "larger than the padded input"]),
    ("im2col", (_x(1, 1, 4, 4), 2, 2, 0), ValueError, ["im2col", "stride", ">= 1"]),
    ("im2col", ([[1.0]], 1, 1), TypeError, ["im2col", "list"]),
    ("col2im", (_x(8, 9), (2, 4, 4), 2, 2), ValueError, ["col2im", "(N, C, H, W)", "(2, 4, 4)"]),
    ("col2im", (_x(8, 10), (1, 2, 4, 4), 2, 2), ValueError, ["col2im", "(8, 9)", "(8, 10)"]),
    ("maxpool2d_forward", (_x(1, 1, 3, 3), 4, 4, 1), ValueError, ["maxpool2d_forward", "larger"]),
    ("maxpool2d_forward", (_x(1, 1, 3, 3), 2, 2, (1, 0)), ValueError, ["maxpool2d_forward", "stride"]),
    ("maxpool2d_forward", (_x(1, 3, 3), 2, 2, 2), ValueError, ["maxpool2d_forward", "4 dimensions"]),
    ("maxpool2d_backward", (_x(1, 1, 2, 2), np.zeros((1, 1, 2, 3), np.int64), (1, 1, 4, 4)),
     ValueError, ["maxpool2d_backward", "argmax", "(1, 1, 2, 2)"]),
    ("maxpool2d_backward", (_x(1, 1, 2, 2), np.full((1, 1, 2, 2), 16), (1, 1, 4, 4)),
     ValueError, ["maxpool2d_backward", "[0, 16)"]),
    ("maxpool2d_backward", (_x(1, 1, 2, 2), np.full((1, 1, 2, 2), -1), (1, 1, 4, 4)),
     ValueError, ["maxpool2d_backward", "[0, 16)"]),
    ("avgpool2d_forward", (_x(1, 1, 3, 3), 4, 4, 1), ValueError, ["avgpool2d_forward", "larger"]),
    ("avgpool2d_forward", (_x(1, 3, 3), 2, 2, 2), ValueError, ["avgpool2d_forward", "4 dimensions"]),
    ("avgpool2d_forward", (_x(1, 1, 3, 3, dtype=np.int32), 2, 2, 2), TypeError,
     ["avgpool2d_forward", "int32"]),
    ("avgpool2d_backward", (_x(1, 1, 2, 3), (1, 1, 4, 4), 2, 2, 2), ValueError,
     ["avgpool2d_backward", "(1, 1, 2, 2)", "(1, 1, 2, 3)"]),
    ("avgpool2d_backward", (_x(1, 1, 2, 2), (1, 4, 4), 2, 2, 2), ValueError,
     ["avgpool2d_backward", "(N, C, H, W)"]),
    ("avgpool2d_backward", (_x(1, 1, 2, 2), (1, 1, 4, 4), 2, 2, 0), ValueError,
     ["avgpool2d_backward", "stride"]),
    ("leaky_relu_forward", (np.arange(4),), TypeError, ["leaky_relu_forward", "int64"]),
    ("leaky_relu_forward", (_x(3), "0.1"), TypeError, ["leaky_relu_forward", "alpha", "str"]),
    ("leaky_relu_backward", (_x(3), _x(4)), ValueError, ["leaky_relu_backward", "(3,)", "(4,)"]),
    ("leaky_relu_backward", (_x(3), _x(3, dtype=np.float64)), TypeError,
     ["leaky_relu_backward", "float64"]),
    ("relu_forward", (np.arange(4),), TypeError, ["relu_forward", "int64"]),
    ("relu_backward", (_x(3), _x(4)), ValueError, ["relu_backward", "(3,)", "(4,)"]),
    ("relu_backward", (_x(3), _x(3, dtype=np.float64)), TypeError, ["relu_backward", "float64"]),
    ("dense_forward", (_x(2, 3), _x(4, 5), None), ValueError, ["dense_forward", "3 features", "4"]),
    ("dense_forward", (_x(2, 3), _x(3, 5), _x(4)), ValueError, ["dense_forward", "(5,)", "(4,)"]),
    ("dense_forward", (_x(2, 3), _x(3, 5, dtype=np.float64), None), TypeError, ["dense_forward", "W"]),
    ("dense_backward", (_x(2, 4), _x(2, 3), _x(3, 5)), ValueError, ["dense_backward", "(2, 5)", "(2, 4)"]),
    ("softmax_cross_entropy", (_x(2, 3), np.array([0, 3])), ValueError, ["softmax_cross_entropy", "[0, 3)"]),
    ("softmax_cross_entropy", (_x(2, 3), np.array([0.0, 1.0])), TypeError, ["softmax_cross_entropy", "integer"]),
    ("softmax_cross_entropy", (_x(2, 3), np.array([0, 1, 2])), ValueError, ["softmax_cross_entropy", "3 labels"]),
    ("conv2d_forward", (_x(1, 2, 5, 5), _x(3, 4, 3, 3)), ValueError, ["conv2d_forward", "2 channels", "4"]),
    ("conv2d_forward", (_x(1, 2, 5, 5), _x(3, 2, 3, 3), _x(2)), ValueError, ["conv2d_forward", "(3,)", "(2,)"]),
    ("conv2d_forward", (_x(1, 2, 2, 2), _x(3, 2, 3, 3)), ValueError, ["conv2d_forward", "larger"]),
    ("conv2d_forward", (_x(1, 2, 5, 5), _x(3, 2, 3, 3), None, 0), ValueError, ["conv2d_forward", "stride"]),
    ("conv2d_forward", (_x(1, 2, 5, 5), _x(3, 2, 3, 3), None, 1, -1), ValueError, ["conv2d_forward", "padding"]),
    ("conv2d_forward", (_x(2, 5, 5), _x(3, 2, 3, 3)), ValueError, ["conv2d_forward", "4 dimensions"]),
    ("conv2d_forward", (_x(1, 2, 5, 5, dtype=np.float16), _x(3, 2, 3, 3)), TypeError, ["conv2d_forward", "float16"]),
    ("conv2d_forward", (_x(1, 2, 5, 5), _x(3, 2, 3, 3, dtype=np.float64)), TypeError, ["conv2d_forward", "W"]),
    ("conv2d_backward", (_x(1, 3, 4, 4), _x(1, 2, 5, 5), _x(3, 2, 3, 3)), ValueError,
     ["conv2d_backward", "(1, 3, 3, 3)", "(1, 3, 4, 4)"]),
]


@pytest.mark.parametrize("name, args, error, words", BAD_CALLS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_input_raises_clear_errors(backend_name, name, args, error, words):
    with pytest.raises(error) as info:
        getattr(kernels, name)(*args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_dense_split_gemms_give_the_same_bits_on_a_busy_machine(dtype):
    """Medium dense GEMMs run in blocks over the OpenMP team, or the same blocks on
    one thread while the other cores are busy: the result must not depend on which
    (same seed, same weights), and must be the product."""
    if "cpu" not in backend.available():
        pytest.skip("compiled kernels not built")
    from fastnn.kernels import _cpu, variants
    rng = np.random.default_rng(0)
    for n, i, o in ((128, 300, 500), (130, 700, 250)):      # split by columns, by rows
        x = rng.standard_normal((n, i)).astype(dtype)       # about 2^25 flops: split
        W = rng.standard_normal((i, o)).astype(dtype)
        b = rng.standard_normal(o).astype(dtype)
        grad_y = rng.standard_normal((n, o)).astype(dtype)
        results = []
        with variants.force("dense_forward", "gemm_split"), \
                variants.force("dense_backward", "pair"):
            for busy in (False, True):
                _cpu._forget_busy_cores()                # wakes the team again
                if busy:
                    _cpu._assume_busy_cores()
                results.append([_cpu.dense_forward(x, W, b), *_cpu.dense_backward(grad_y, x, W)])
        for team, one_thread in zip(*results):
            np.testing.assert_array_equal(team, one_thread)
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(results[0][0], x @ W + b, **tol)
        np.testing.assert_allclose(results[0][1], grad_y @ W.T, **tol)
        np.testing.assert_allclose(results[0][2], x.T @ grad_y, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite(avx512_rows, dtype):
    """One pass over the bits, blocks of 16384: a bad value anywhere is found (ragged
    ends of the 16 lanes too), the largest finite values are not taken for infinity."""
    for bad in (np.nan, np.inf, -np.inf):
        for pos in (0, 5, 16383, 16384, 39999, 40000):
            a = np.ones(40001, dtype)
            a[pos] = bad
            assert not kernels.all_finite(a)
            assert not kernels.all_finite(a.reshape(1, -1)[:, ::-1])   # strided: NumPy path
    big = np.full(9, np.finfo(dtype).max, dtype)
    big[3] = -big[3]
    assert kernels.all_finite(big)
    assert kernels.all_finite(np.zeros(0, dtype))
    assert kernels.all_finite(np.array([np.finfo(dtype).tiny, -0.0], dtype))
    # from 2**21 elements in blocks over the worker pool: a bad value in any block
    n = 3 * 2**21 + 7
    a = np.ones(n, dtype)
    assert kernels.all_finite(a)
    for pos in (0, 2**20 - 1, 2**20, n // 2, n - 1):
        a[pos] = np.nan
        assert not kernels.all_finite(a)
        a[pos] = 1
