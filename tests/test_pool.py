"""fastnn's worker pool (csrc/pool.c) and the dense kernels that run on it: the
one-sample GEMV in output slices and the medium GEMMs in blocks (_gemm_split).

The pool may run a job's tasks on its workers or, while their cores are busy,
all on the caller: both must give the same bits, equal to the NumPy reference
within rounding."""
import textwrap
import threading

import numpy as np
import pytest

from _helpers import run_python
from fastnn import backend

if "cpu" not in backend.available():
    pytest.skip("compiled kernels not built", allow_module_level=True)

from fastnn.kernels import _cpu, _reference, variants  # noqa: E402

DTYPES = [np.float32, np.float64]


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.fixture
def split_everything():
    """Every dense GEMM goes to the pool: the forward in blocks of the GEMM (or of the
    GEMV's inputs, for one sample), the backward's two GEMMs as one job."""
    with variants.force("dense_backward", "pair"):
        yield lambda n: variants.force("dense_forward", "gemv_split" if n == 1 else "gemm_split")


def _dense_case(rng, n, i, o, dtype):
    x = rng.standard_normal((n, i)).astype(dtype)
    W = rng.standard_normal((i, o)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    return x, W, b


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("i, o", [(7, 5), (130, 40), (784, 256), (785, 257), (200, 1001)])
def test_one_sample_dense_forward_same_bits_on_workers_or_caller(split_everything, dtype, i, o):
    rng = np.random.default_rng(i * o)
    x, W, b = _dense_case(rng, 1, i, o, dtype)
    runs = []
    for busy in (False, True, False):
        if busy:
            _cpu._assume_busy_cores()          # the same slices, all on the caller
        else:
            _cpu._forget_busy_cores()
        with split_everything(1):
            runs.append(_cpu.dense_forward(x, W, b))
            runs.append(_cpu.dense_forward(x, W, None))
    for got in runs[2::2]:
        np.testing.assert_array_equal(got, runs[0])
    for got in runs[3::2]:
        np.testing.assert_array_equal(got, runs[1])
    np.testing.assert_allclose(runs[0], _reference.dense_forward(x, W, b), **tolerance(dtype))
    np.testing.assert_allclose(runs[1], _reference.dense_forward(x, W, None), **tolerance(dtype))
    with variants.force("dense_forward", "gemv"):
        np.testing.assert_allclose(_cpu.dense_forward(x, W, b), runs[0], **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("n, i, o", [(3, 70, 130), (130, 65, 9), (64, 300, 200)])
def test_split_gemms_same_bits_on_workers_or_caller(split_everything, dtype, n, i, o):
    rng = np.random.default_rng(n + i + o)
    x, W, b = _dense_case(rng, n, i, o, dtype)
    grad_y = rng.standard_normal((n, o)).astype(dtype)
    runs = []
    for busy in (False, True):
        _cpu._forget_busy_cores()
        if busy:
            _cpu._assume_busy_cores()
        with split_everything(n):
            runs.append([_cpu.dense_forward(x, W, b), *_cpu.dense_backward(grad_y, x, W)])
    for pool, caller in zip(*runs):
        np.testing.assert_array_equal(pool, caller)
    want = [_reference.dense_forward(x, W, b), *_reference.dense_backward(grad_y, x, W)]
    for got, expected in zip(runs[0], want):
        np.testing.assert_allclose(got, expected, **tolerance(dtype))


def test_predict_of_non_contiguous_or_other_dtype_input_is_the_forward_pass():
    import fastnn as fn
    net = fn.Network([fn.Dense(785, 257, seed=1), fn.ReLU(), fn.Dense(257, 10, seed=2)])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 785)).astype(np.float32)
    want = net.forward(x, training=False)
    for variant in (x, np.asfortranarray(x), x.astype(np.float64), x[:1], x[::2]):
        expected = want[:1] if len(variant) == 1 else want[::2] if len(variant) == 3 else want
        np.testing.assert_allclose(net.predict(variant), expected, rtol=1e-5, atol=1e-6)


def test_nested_pool_jobs_run_serially_on_their_caller():
    inner = 9
    for in_openmp in (False, True):
        out = _cpu._pool_nested(6, inner, in_openmp)
        np.testing.assert_array_equal(out[:, 0], inner * (inner + 1) // 2)
        if not in_openmp or _cpu.threads() > 1:
            np.testing.assert_array_equal(out[:, 1], 1)


def test_concurrent_calls_from_python_threads(split_everything):
    rng = np.random.default_rng(5)
    one = _dense_case(rng, 1, 785, 257, np.float32)
    many = _dense_case(rng, 64, 600, 200, np.float64)
    grad_y = rng.standard_normal((64, 200))
    if _cpu.threads() > 1 and _cpu.blas_thread_control():     # both split by the chooser
        own = variants.why_not("dense_forward", "gemv_own_split", x_shape=(1, 785),
                               w_shape=(785, 257)) is None
        assert variants.chosen("dense_forward", x_shape=(1, 785), w_shape=(785, 257)) == \
            ("gemv_own_split" if own else "gemv_split")
        assert variants.chosen("dense_forward", x_shape=(64, 600), w_shape=(600, 200),
                               dtype=np.float64) == "gemm_split"
    want_one = _cpu.dense_forward(*one)
    want_many = [_cpu.dense_forward(*many), *_cpu.dense_backward(grad_y, *many[:2])]
    failures = []

    def work():
        try:
            for _ in range(40):
                np.testing.assert_allclose(_cpu.dense_forward(*one), want_one, **tolerance(np.float32))
                got = [_cpu.dense_forward(*many), *_cpu.dense_backward(grad_y, *many[:2])]
                for g, w in zip(got, want_many):
                    np.testing.assert_allclose(g, w, **tolerance(np.float64))
        except Exception as exc:          # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "pool calls from 4 threads did not finish"
    assert not failures, failures[0]


FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys
    import numpy as np
    from fastnn.kernels import _cpu
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 785)).astype(np.float32)
    W = rng.standard_normal((785, 257)).astype(np.float32)
    xs = rng.standard_normal((64, 300))
    Ws = rng.standard_normal((300, 200))
    want = (_cpu.dense_forward(x, W, None), _cpu.dense_forward(xs, Ws, None))
    started = _cpu._pool_workers()       # one per task beyond the first, up to threads - 1
    assert 1 <= started <= _cpu.threads() - 1, (started, _cpu.threads())

    def check(_=None):
        ok = all(np.array_equal(_cpu.dense_forward(a, b, None), w)
                 for a, b, w in ((x, W, want[0]), (xs, Ws, want[1])))
        return ok, _cpu._pool_workers()

    pid = os.fork()
    if pid == 0:
        before = _cpu._pool_workers()
        ok, after = check()
        os._exit(0 if ok and before == 0 and after == started else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "os.fork child failed"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for ok, workers in pool.map(check, range(4)):
            assert ok and workers == started, (ok, workers)
    print("fork ok")
""")


def test_pool_after_fork_recreates_its_workers():
    if _cpu.threads() < 2 or not _cpu.blas_thread_control():
        pytest.skip("one thread: the pool starts no workers")
    # every dense forward in blocks over the pool (the one sample's too)
    done = run_python(FORK_SCRIPT, env={"FASTNN_VARIANT_DENSE_FORWARD": "gemm_split"})
    assert done.returncode == 0 and "fork ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", [
    (9, 1, 12, 11, 6, 5, 5, 2, "columns", "columns"),     # LeNet's conv1 shape
    (7, 6, 14, 13, 16, 5, 5, 0, "rows", "rows_col2im"),
    (5, 33, 7, 9, 5, 3, 3, 1, "rows", "rows_transposed"),
])
def test_conv_samples_same_bits_on_workers_or_caller(dtype, case):
    """Conv samples (forward) and sample chunks (backward) run on the pool: the
    same bits whether the workers take some or the caller takes all, and the
    NumPy reference's values."""
    n, c, h, w, k, kh, kw, pad, forward, backward = case
    rng = np.random.default_rng(n * c * k)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    runs = []
    for busy in (False, True, False):
        if busy:
            _cpu._assume_busy_cores()
        else:
            _cpu._forget_busy_cores()
        with variants.force("conv2d_forward", forward), \
                variants.force("conv2d_backward", backward):
            y = _cpu.conv2d_forward(x, W, b, (1, 1), (pad, pad))
            grad_y = np.cos(y)
            runs.append((y, *_cpu.conv2d_backward(grad_y, x, W, (1, 1), (pad, pad))))
    for run in runs[1:]:
        for got, first in zip(run, runs[0]):
            np.testing.assert_array_equal(got, first)
    y, grad_x, grad_w, grad_b = runs[0]
    np.testing.assert_allclose(y, _reference.conv2d_forward(x, W, b, (1, 1), (pad, pad)),
                               **tolerance(dtype))
    for got, ref in zip((grad_x, grad_w, grad_b),
                        _reference.conv2d_backward(np.cos(y), x, W, (1, 1), (pad, pad))):
        scale = np.abs(ref).max()            # sums of hundreds of terms: relative to the largest
        np.testing.assert_allclose(got / scale, ref / scale, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("momentum, weight_decay, l1, nesterov", [
    (0.9, 0.0, 0.0, False), (0.9, 1e-3, 1e-4, True), (0.0, 1e-3, 0.0, False)])
@pytest.mark.parametrize("n", [7, 16383, 32768, 70001])   # one task; its largest; 2 blocks; ragged
def test_sgd_step_in_blocks_same_bits_on_workers_or_caller(dtype, momentum, weight_decay, l1,
                                                          nesterov, n):
    """A large parameter is updated in blocks over the pool: the same bits as on the
    caller alone (element-wise), and PyTorch's rule written in NumPy."""
    rng = np.random.default_rng(5)
    p0, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    buf0 = rng.standard_normal(n).astype(dtype)
    runs = []
    for busy in (False, True):
        if busy:
            _cpu._assume_busy_cores()
        else:
            _cpu._forget_busy_cores()
        p, buf = p0.copy(), buf0.copy()
        _cpu.sgd_step(p, g, buf if momentum else None, 0.1, momentum, weight_decay, l1,
                      nesterov, False)
        runs.append((p, buf))
    _cpu._forget_busy_cores()
    for got, first in zip(runs[1], runs[0]):
        np.testing.assert_array_equal(got, first)
    if dtype == np.float32 and momentum and not weight_decay:   # the AVX-512 loop: same bits
        with variants.force("sgd_step", "portable"):
            p, buf = p0.copy(), buf0.copy()
            _cpu.sgd_step(p, g, buf, 0.1, momentum, 0.0, 0.0, nesterov, False)
        np.testing.assert_array_equal(p, runs[0][0])
        np.testing.assert_array_equal(buf, runs[0][1])
    d = g.astype(np.float64) + weight_decay * p0 + l1 * np.sign(p0)
    if momentum:
        v = momentum * buf0 + d
        d = d + momentum * v if nesterov else v
        np.testing.assert_allclose(runs[0][1], v, **tolerance(dtype))
    np.testing.assert_allclose(runs[0][0], p0 - 0.1 * d, **tolerance(dtype))
