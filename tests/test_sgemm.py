"""fastnn's own float32 GEMM (csrc/sgemm.c, AVX-512): every transpose combination,
ragged sizes around its tile (12 x 32) and block (KC 384, MC 516, NC 320) edges,
alpha/beta, strided views, against float64 NumPy; and the layers that run on it.
Skipped where the CPU has no AVX-512 (there BLAS runs every GEMM)."""
import numpy as np
import pytest

from fastnn import backend

if "cpu" not in backend.available():
    pytest.skip("compiled kernels not built", allow_module_level=True)

from fastnn.kernels import _cpu, _reference, variants  # noqa: E402

if not _cpu.own_sgemm_supported():
    pytest.skip("no AVX-512 on this CPU: BLAS runs every GEMM", allow_module_level=True)

SHAPES = [  # (m, n, k)
    (1, 1, 1), (1, 37, 5), (13, 1, 9), (12, 32, 8), (11, 31, 7), (13, 33, 17),
    (4, 16, 3), (8, 17, 40), (25, 70, 385), (530, 40, 9), (20, 650, 33),
    (100, 100, 800), (129, 257, 130),
]


@pytest.fixture
def own_engine():
    with variants.force("gemm", "own"):
        yield


def operands(rng, m, n, k, trans_a, trans_b):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    return a, b


def expected(a, b, trans_a, trans_b, alpha=1.0, beta=0.0, c=None):
    """float64 result and a bound on float32 round-off for each element."""
    a64 = (a.T if trans_a else a).astype(np.float64)
    b64 = (b.T if trans_b else b).astype(np.float64)
    ref = alpha * (a64 @ b64)
    scale = abs(alpha) * (np.abs(a64) @ np.abs(b64))
    if beta != 0:
        ref += beta * c.astype(np.float64)
        scale += abs(beta) * np.abs(c.astype(np.float64))
    k = a64.shape[1]
    return ref, 4 * (k + 2) * np.finfo(np.float32).eps * scale + 1e-30


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_float64(own_engine, m, n, k, trans_a, trans_b):
    rng = np.random.default_rng(m * 10007 + n * 101 + k)
    a, b = operands(rng, m, n, k, trans_a, trans_b)
    c = np.full((m, n), np.nan, np.float32)          # beta = 0: c must not be read
    _cpu._gemm_into(a, b, c, trans_a, trans_b)
    ref, bound = expected(a, b, trans_a, trans_b)
    assert np.all(np.abs(c - ref) <= bound)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.0), (2.0, 1.0), (-1.0, 0.25), (0.0, 2.0),
                                        (0.0, 0.0)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, True)])
def test_alpha_beta(own_engine, alpha, beta, trans_a, trans_b):
    m, n, k = 29, 45, 400                             # two blocks of k: the second adds on
    rng = np.random.default_rng(7)
    a, b = operands(rng, m, n, k, trans_a, trans_b)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    c = c0.copy()
    _cpu._gemm_into(a, b, c, trans_a, trans_b, alpha, beta)
    ref, bound = expected(a, b, trans_a, trans_b, alpha, beta, c0)
    assert np.all(np.abs(c - ref) <= bound)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)])
def test_strided_views_leave_the_rest_alone(own_engine, trans_a, trans_b):
    m, n, k = 27, 35, 50
    rng = np.random.default_rng(3)
    a_big = rng.standard_normal((60, 70)).astype(np.float32)
    b_big = rng.standard_normal((60, 70)).astype(np.float32)
    a = a_big[3:3 + (k if trans_a else m), 5:5 + (m if trans_a else k)]
    b = b_big[1:1 + (n if trans_b else k), 2:2 + (k if trans_b else n)]
    c_big = np.full((40, 50), -7.0, np.float32)
    c = c_big[2:2 + m, 4:4 + n]
    _cpu._gemm_into(a, b, c, trans_a, trans_b)
    ref, bound = expected(a, b, trans_a, trans_b)
    assert np.all(np.abs(c - ref) <= bound)
    untouched = np.ones(c_big.shape, bool)
    untouched[2:2 + m, 4:4 + n] = False
    assert np.all(c_big[untouched] == -7.0)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)])
def test_blocks_over_the_pool_give_the_same_bits(own_engine, trans_a, trans_b):
    """Each value's sum runs in the same order whatever the block of C: split over
    the pool (rows or columns) or not, the bits are equal."""
    _cpu._forget_busy_cores()                  # the blocks on the pool's workers
    rng = np.random.default_rng(11)
    for m, n, k in [(300, 70, 500), (70, 300, 129)]:
        a, b = operands(rng, m, n, k, trans_a, trans_b)
        whole = _cpu._gemm_into(a, b, np.empty((m, n), np.float32), trans_a, trans_b)
        split = _cpu._gemm_into(a, b, np.empty((m, n), np.float32), trans_a, trans_b,
                                split=True)
        np.testing.assert_array_equal(whole, split)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k,lda", [(13, 33, 17, 17), (129, 257, 130, 130), (25, 70, 385, 400),
                                       (30, 40, 1000, 1024), (530, 40, 9, 9)])
def test_a_read_in_place_gives_the_bits_of_a_packed_a(m, n, k, lda, trans_b):
    """An untransposed A is read where it lies (variant "own"; rows a multiple of 4 KB
    apart excepted), ragged row tiles reading row 0 again for their missing rows: the
    bits of "own_packed"."""
    rng = np.random.default_rng(m + n + k)
    a = rng.standard_normal((m, lda)).astype(np.float32)[:, :k]
    _, b = operands(rng, m, n, k, False, trans_b)
    out = {}
    for variant in ("own", "own_packed"):
        with variants.force("gemm", variant):
            out[variant] = np.full((m, n), np.nan, np.float32)
            _cpu._gemm_into(a, b, out[variant], False, trans_b)
    np.testing.assert_array_equal(out["own"], out["own_packed"])
    ref, bound = expected(a, b, False, trans_b)
    assert np.all(np.abs(out["own"] - ref) <= bound)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (13, 33, 17), (25, 70, 385), (128, 256, 784),
                                   (530, 40, 9), (129, 257, 130)])
def test_epilogue_gives_the_bits_of_the_separate_passes(own_engine, m, n, k, trans_a, trans_b,
                                                        split):
    """The bias, ReLU forward and ReLU backward (mask) on the tiles: the bits of a
    pre-broadcast bias with beta 1 and the ReLU kernels after, over K blocks (k 385,
    784), ragged tiles and blocks over the pool; a mask with NaN, 0 and -0.0."""
    rng = np.random.default_rng(m + n + k)
    a, b = operands(rng, m, n, k, trans_a, trans_b)
    bias = rng.standard_normal(n).astype(np.float32)
    mask = rng.standard_normal((m, n)).astype(np.float32)
    mask.flat[::7] = np.nan
    mask.flat[::11] = 0.0
    mask.flat[::13] = -0.0
    plain = np.empty((m, n), np.float32)
    plain[:] = bias
    _cpu._gemm_into(a, b, plain, trans_a, trans_b, beta=1.0, split=split)

    def fused(**epilogue):
        c = np.full((m, n), np.nan, np.float32)             # not read
        _cpu._gemm_into(a, b, c, trans_a, trans_b, split=split, **epilogue)
        return c
    np.testing.assert_array_equal(fused(bias=bias), plain)
    relu = np.full((m, n), np.nan, np.float32)
    np.testing.assert_array_equal(fused(bias=bias, relu=relu), plain)
    np.testing.assert_array_equal(relu, _cpu.relu_forward(plain))
    masked = _cpu.relu_backward(plain, mask)
    np.testing.assert_array_equal(fused(bias=bias, mask=mask, relu=relu), masked)
    np.testing.assert_array_equal(relu, _cpu.relu_forward(masked))


def test_epilogue_relu_keeps_nan():
    """max(0, c) in the tiles, as relu_forward's x < 0 ? 0 : x: NaN stays NaN; a NaN
    in the mask zeroes, as relu_backward's y > 0 ? g : 0. On both engines."""
    a = np.ones((20, 1), np.float32)
    b = np.array([[np.nan, -0.0, -2.0, 3.0] * 10], np.float32)    # (1, 40)
    mask = np.tile(np.array([1.0, np.nan, 0.0, -1.0] * 10, np.float32), (20, 1))
    for engine in ("own", "blas"):
        with variants.force("gemm", engine):
            c, relu = np.empty((20, 40), np.float32), np.empty((20, 40), np.float32)
            _cpu._gemm_into(a, b, c, relu=relu)
            np.testing.assert_array_equal(relu, _cpu.relu_forward(c))
            assert np.isnan(relu[:, ::4]).all()
            _cpu._gemm_into(a, b, c, mask=mask)
            assert np.isnan(c[:, ::4]).all() and (c[:, 1::4] == 0).all()
            np.testing.assert_array_equal(c[:, 2::4], 0)


def test_engine_names():
    assert variants.names("gemm") == ("own", "own_packed", "blas")
    with pytest.raises(ValueError, match="gemm has no variant 'mkl'"):
        with variants.force("gemm", "mkl"):
            pass
    with variants.force("gemm", "blas"):
        assert variants.forced("gemm") == "blas"


def test_gemm_into_rejects_bad_operands():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        _cpu._gemm_into(a, np.zeros((5, 2), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="one dtype"):
        _cpu._gemm_into(a, np.zeros((4, 2)), np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("n", [1, 5, 64, 130])
def test_dense_layer_on_the_own_kernel(own_engine, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 70)).astype(np.float32)
    W = rng.standard_normal((70, 45)).astype(np.float32)
    b = rng.standard_normal(45).astype(np.float32)
    g = rng.standard_normal((n, 45)).astype(np.float32)
    np.testing.assert_allclose(_cpu.dense_forward(x, W, b), _reference.dense_forward(x, W, b),
                               rtol=1e-4, atol=1e-4)
    for got, want in zip(_cpu.dense_backward(g, x, W), _reference.dense_backward(g, x, W)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("forward, backward", [("rows", "rows_col2im"),
                                               ("winograd", "winograd")])
def test_conv_on_the_own_kernel(own_engine, forward, backward):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 8, 11, 9)).astype(np.float32)
    W = rng.standard_normal((20, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    with variants.force("conv2d_forward", forward), variants.force("conv2d_backward", backward):
        y = _cpu.conv2d_forward(x, W, b, (1, 1), (1, 1))
        g = rng.standard_normal(y.shape).astype(np.float32)
        grads = _cpu.conv2d_backward(g, x, W, (1, 1), (1, 1))
    np.testing.assert_allclose(y, _reference.conv2d_forward(x, W, b, (1, 1), (1, 1)),
                               rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, _reference.conv2d_backward(g, x, W, (1, 1), (1, 1))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_python_threads_each_pack_in_their_own_buffers(own_engine):
    """Four Python threads (each with its packing buffers, plus the pool's) run the own
    kernel at once, whole and split over the pool: every result has the bits of the
    same GEMM run alone (one shared buffer would mix their panels)."""
    import threading
    rng = np.random.default_rng(17)
    cases = [operands(rng, m, n, k, ta, tb) + (ta, tb)
             for (m, n, k), (ta, tb) in zip([(130, 200, 400), (64, 300, 120), (200, 96, 777)],
                                            [(False, False), (True, False), (False, True)])]
    # alone, on the own kernel (under FASTNN_VARIANT_GEMM=blas too)
    want = [_cpu._gemm_into(a, b, np.empty((a.shape[1] if ta else a.shape[0],
                                            b.shape[0] if tb else b.shape[1]), np.float32), ta, tb)
            for a, b, ta, tb in cases]
    failures = []

    def work(seed):
        try:
            for rep in range(30):
                i = (seed + rep) % len(cases)
                a, b, ta, tb = cases[i]
                got = _cpu._gemm_into(a, b, np.empty_like(want[i]), ta, tb, split=bool(rep % 2))
                np.testing.assert_array_equal(got, want[i])
        except Exception as exc:          # reported by the main thread
            failures.append(exc)

    _cpu._forget_busy_cores()
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
