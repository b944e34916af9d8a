"""pytest-benchmark suite of the kernels: compiled ("cpu") against the NumPy
reference ("numpy"), PyTorch where installed, on the shapes of issue 2.

    python3 -m pytest benchmarks/bench_kernels.py --benchmark-columns=median,min,rounds

Prints the benchmark tables, then a summary with the ratios against the targets
(every figure from this one run; medians of the timed rounds after a warm-up).
"""
import os
import sys

# The environment pins OpenBLAS to an older kernel (OPENBLAS_CORETYPE /
# OPENBLAS_L2_SIZE: about half the GEMM speed on this CPU). The benchmark
# measures the libraries as installed, so it unsets both for its own process;
# that only works if NumPy/SciPy are not loaded yet, which the summary reports.
_BLAS_LOADED_BEFORE = "numpy" in sys.modules or "scipy" in sys.modules
_UNSET = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.pop(v, None) is not None]

import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg.blas  # noqa: E402

from fastnn import backend, kernels  # noqa: E402

try:
    import torch
except ImportError:  # the torch rows are skipped
    torch = None

IMPLS = ["cpu", "numpy"]
MEDIANS = {}   # (group, impl) -> median seconds, filled as the benchmarks run


def measure(benchmark, group, impl, fn, rounds):
    """Benchmark ``fn`` (after one warm-up call) and keep its median for the summary."""
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:     # None under --benchmark-disable
        MEDIANS[group, impl] = benchmark.stats.stats.median


def on_backend(impl, fn):
    """fn() with the NumPy arrays running on backend ``impl``."""
    def run():
        previous = backend.current()
        backend.use(impl)
        try:
            return fn()
        finally:
            backend.use(previous)
    return run


def need_torch():
    if torch is None:
        pytest.skip("PyTorch is not installed")
    torch.set_num_threads(os.cpu_count())


rng = np.random.default_rng(0)


# --- W0: the BLAS peak --------------------------------------------------------------

def test_sgemm_2048(benchmark):
    """Plain 2048^3 sgemm through scipy.linalg.blas: the same BLAS fastnn's GEMMs use."""
    a = np.asfortranarray(rng.standard_normal((2048, 2048), dtype=np.float32))
    b = np.asfortranarray(rng.standard_normal((2048, 2048), dtype=np.float32))
    c = np.zeros((2048, 2048), np.float32, order="F")
    measure(benchmark, "sgemm 2048^3", "blas",
            lambda: scipy.linalg.blas.sgemm(1.0, a, b, c=c, overwrite_c=True), rounds=10)


# --- dense 1024 -> 1024, batch 256, forward + backward ------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_dense(benchmark, impl):
    x = rng.standard_normal((256, 1024), dtype=np.float32)
    W = rng.standard_normal((1024, 1024), dtype=np.float32) * 0.03
    b = rng.standard_normal(1024, dtype=np.float32)
    grad_y = rng.standard_normal((256, 1024), dtype=np.float32)

    def step():
        kernels.dense_forward(x, W, b)
        kernels.dense_backward(grad_y, x, W)
    measure(benchmark, "dense 1024x1024 b256 fwd+bwd", impl, on_backend(impl, step), rounds=20)


# --- conv 3x3, N=32, C=K=64, 32x32, pad 1, forward + backward -------------------------------

CONV = dict(n=32, c=64, k=64, h=32, w=32)
CONV_FLOPS = 3 * 2 * CONV["n"] * CONV["k"] * CONV["c"] * 9 * CONV["h"] * CONV["w"]


def conv_arrays():
    x = rng.standard_normal((CONV["n"], CONV["c"], CONV["h"], CONV["w"]), dtype=np.float32)
    W = rng.standard_normal((CONV["k"], CONV["c"], 3, 3), dtype=np.float32) * 0.05
    b = rng.standard_normal(CONV["k"], dtype=np.float32)
    grad_y = rng.standard_normal((CONV["n"], CONV["k"], CONV["h"], CONV["w"]), dtype=np.float32)
    return x, W, b, grad_y


@pytest.mark.parametrize("impl", IMPLS)
def test_conv3x3(benchmark, impl):
    x, W, b, grad_y = conv_arrays()

    def step():
        kernels.conv2d_forward(x, W, b, 1, 1)
        kernels.conv2d_backward(grad_y, x, W, 1, 1)
    measure(benchmark, "conv3x3 fwd+bwd", impl, on_backend(impl, step),
            rounds=10 if impl == "cpu" else 3)


def test_conv3x3_torch(benchmark):
    need_torch()
    x, W, b, grad_y = (torch.from_numpy(a) for a in conv_arrays())
    x.requires_grad_(True)
    W.requires_grad_(True)
    b.requires_grad_(True)

    def step():
        x.grad = W.grad = b.grad = None
        torch.nn.functional.conv2d(x, W, b, padding=1).backward(grad_y)
    measure(benchmark, "conv3x3 fwd+bwd", "torch", step, rounds=10)


# --- max pooling 2x2 / 2 on (32, 64, 64, 64), forward + backward ------------------------

POOL_SHAPE = (32, 64, 64, 64)


@pytest.mark.parametrize("impl", IMPLS)
def test_maxpool2x2(benchmark, impl):
    x = rng.standard_normal(POOL_SHAPE, dtype=np.float32)
    grad_y = rng.standard_normal((32, 64, 32, 32), dtype=np.float32)

    def step():
        _, argmax = kernels.maxpool2d_forward(x, 2, 2, 2)
        kernels.maxpool2d_backward(grad_y, argmax, x.shape)
    measure(benchmark, "maxpool2x2 fwd+bwd", impl, on_backend(impl, step),
            rounds=10 if impl == "cpu" else 3)


def test_maxpool2x2_torch(benchmark):
    need_torch()
    x = torch.from_numpy(rng.standard_normal(POOL_SHAPE, dtype=np.float32)).requires_grad_(True)
    grad_y = torch.from_numpy(rng.standard_normal((32, 64, 32, 32), dtype=np.float32))

    def step():
        x.grad = None
        torch.nn.functional.max_pool2d(x, 2, 2).backward(grad_y)
    measure(benchmark, "maxpool2x2 fwd+bwd", "torch", step, rounds=10)


# --- average pooling 2x2 / 2 on LeNet's first activations (64, 6, 28, 28) ---------------

AVGPOOL_SHAPE = (64, 6, 28, 28)


@pytest.mark.parametrize("impl", IMPLS)
def test_avgpool2x2(benchmark, impl):
    x = rng.standard_normal(AVGPOOL_SHAPE, dtype=np.float32)
    grad_y = rng.standard_normal((64, 6, 14, 14), dtype=np.float32)

    def step():
        kernels.avgpool2d_forward(x, 2, 2, 2)
        kernels.avgpool2d_backward(grad_y, x.shape, 2, 2, 2)
    measure(benchmark, "avgpool2x2 fwd+bwd", impl, on_backend(impl, step), rounds=50)


def test_avgpool2x2_torch(benchmark):
    need_torch()
    x = torch.from_numpy(rng.standard_normal(AVGPOOL_SHAPE, dtype=np.float32)).requires_grad_(True)
    grad_y = torch.from_numpy(rng.standard_normal((64, 6, 14, 14), dtype=np.float32))

    def step():
        x.grad = None
        torch.nn.functional.avg_pool2d(x, 2, 2).backward(grad_y)
    measure(benchmark, "avgpool2x2 fwd+bwd", "torch", step, rounds=50)


# --- ReLU on 16M floats ------------------------------------------------------------------

RELU_SIZE = 16 * 2**20


# "fresh": each call returns a new 64 MB array (and pays its page faults);
# "out": each call writes into the same caller's buffer (out=).
@pytest.mark.parametrize("buffer", ["fresh", "out"])
@pytest.mark.parametrize("impl", IMPLS)
def test_relu_forward(benchmark, impl, buffer):
    x = rng.standard_normal(RELU_SIZE, dtype=np.float32)
    out = np.empty_like(x) if buffer == "out" else None
    measure(benchmark, f"relu 16M forward {buffer}", impl,
            on_backend(impl, lambda: kernels.relu_forward(x, out=out)), rounds=20)


@pytest.mark.parametrize("buffer", ["fresh", "out"])
@pytest.mark.parametrize("impl", IMPLS)
def test_relu_backward(benchmark, impl, buffer):
    grad_y = rng.standard_normal(RELU_SIZE, dtype=np.float32)
    y = np.maximum(rng.standard_normal(RELU_SIZE, dtype=np.float32), 0)
    out = np.empty_like(y) if buffer == "out" else None
    measure(benchmark, f"relu 16M backward {buffer}", impl,
            on_backend(impl, lambda: kernels.relu_backward(grad_y, y, out=out)), rounds=20)


def test_relu_torch(benchmark):
    need_torch()
    x = torch.from_numpy(rng.standard_normal(RELU_SIZE, dtype=np.float32))
    grad_y = torch.from_numpy(rng.standard_normal(RELU_SIZE, dtype=np.float32))

    def step():
        y = torch.relu(x)
        torch.ops.aten.threshold_backward(grad_y, y, 0)
    measure(benchmark, "relu 16M fwd+bwd fresh", "torch", step, rounds=20)


@pytest.mark.parametrize("buffer", ["fresh", "out"])
def test_memory_copy(benchmark, buffer):
    """The limit of a memory-bound pass: copying 16M floats (into a new array or a buffer)."""
    x = rng.standard_normal(RELU_SIZE, dtype=np.float32)
    dst = np.empty_like(x)
    measure(benchmark, f"copy 16M floats {buffer}", "numpy",
            x.copy if buffer == "fresh" else (lambda: np.copyto(dst, x)), rounds=20)


# --- the other kernels: im2col, col2im, softmax cross-entropy ------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_im2col(benchmark, impl):
    x = conv_arrays()[0]
    measure(benchmark, "im2col 3x3 pad 1", impl,
            on_backend(impl, lambda: kernels.im2col(x[:8], 3, 3, 1, 1)), rounds=10)


@pytest.mark.parametrize("impl", IMPLS)
def test_col2im(benchmark, impl):
    cols = kernels.im2col(conv_arrays()[0][:8], 3, 3, 1, 1)
    measure(benchmark, "col2im 3x3 pad 1", impl,
            on_backend(impl, lambda: kernels.col2im(cols, (8, 64, 32, 32), 3, 3, 1, 1)), rounds=10)


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_cross_entropy(benchmark, impl):
    logits = rng.standard_normal((4096, 1000), dtype=np.float32)
    labels = rng.integers(0, 1000, 4096)
    measure(benchmark, "softmax xent 4096x1000", impl,
            on_backend(impl, lambda: kernels.softmax_cross_entropy(logits, labels)), rounds=10)


# --- summary -----------------------------------------------------------------------------

def _machine():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    from fastnn.kernels import _cpu
    try:
        from threadpoolctl import threadpool_info
        libs = ", ".join(f"{lib['internal_api']} {lib.get('version')} {lib.get('architecture')} "
                         f"({os.path.basename(lib['filepath'])}, {lib['num_threads']} threads)"
                         for lib in threadpool_info())
    except ImportError:
        libs = "threadpoolctl missing"
    return [f"CPU: {model}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()}",
            f"OpenMP threads (fastnn): {_cpu.threads()}; BLAS held to 1 thread in fastnn: "
            f"{_cpu.blas_thread_control()}",
            f"thread pools: {libs}",
            f"unset for this process: {_UNSET or 'nothing (not set)'}"
            + ("; NumPy/SciPy were loaded before, so it may not apply" if _BLAS_LOADED_BEFORE else "")]


def _ratio_lines():
    m = MEDIANS.get
    lines = []

    def add(text, got, target=None):
        if got is None:
            return
        mark = "" if target is None else ("  [target >= %g: %s]" % (target, "met" if got >= target else "NOT met"))
        lines.append(f"{text}: {got:.2f}{mark}")

    sgemm = m(("sgemm 2048^3", "blas"))
    if sgemm:
        add("sgemm 2048^3 GFLOP/s", 2 * 2048**3 / sgemm / 1e9)
    dense = m(("dense 1024x1024 b256 fwd+bwd", "cpu"))
    if dense and sgemm:
        dense_gflops = 6 * 256 * 1024 * 1024 / dense / 1e9
        add("dense fwd+bwd GFLOP/s", dense_gflops)
        add("dense / sgemm GFLOP/s", dense_gflops / (2 * 2048**3 / sgemm / 1e9), 0.9)
    if dense and m(("dense 1024x1024 b256 fwd+bwd", "numpy")):
        add("dense: cpu / numpy speed", m(("dense 1024x1024 b256 fwd+bwd", "numpy")) / dense)
    conv = m(("conv3x3 fwd+bwd", "cpu"))
    if conv:
        add("conv3x3 fwd+bwd GFLOP/s (cpu)", CONV_FLOPS / conv / 1e9)
        if m(("conv3x3 fwd+bwd", "numpy")):
            add("conv3x3: cpu / numpy speed", m(("conv3x3 fwd+bwd", "numpy")) / conv, 10)
        if m(("conv3x3 fwd+bwd", "torch")):
            add("conv3x3 GFLOP/s (torch)", CONV_FLOPS / m(("conv3x3 fwd+bwd", "torch")) / 1e9)
            add("conv3x3: cpu / torch speed", m(("conv3x3 fwd+bwd", "torch")) / conv, 1.0)
    pool = m(("maxpool2x2 fwd+bwd", "cpu"))
    if pool:
        add("maxpool fwd+bwd ms (cpu)", pool * 1e3)
        if m(("maxpool2x2 fwd+bwd", "numpy")):
            add("maxpool: cpu / numpy speed", m(("maxpool2x2 fwd+bwd", "numpy")) / pool, 10)
        if m(("maxpool2x2 fwd+bwd", "torch")):
            add("maxpool: cpu / torch speed", m(("maxpool2x2 fwd+bwd", "torch")) / pool, 4)
    avgpool = m(("avgpool2x2 fwd+bwd", "cpu"))
    if avgpool:
        add("avgpool (LeNet-sized) fwd+bwd us (cpu)", avgpool * 1e6)
        for peer in ("numpy", "torch"):
            if m(("avgpool2x2 fwd+bwd", peer)):
                add(f"avgpool: cpu / {peer} speed", m(("avgpool2x2 fwd+bwd", peer)) / avgpool)
    nbytes = RELU_SIZE * 4
    for buffer in ("fresh", "out"):
        fwd, bwd = m((f"relu 16M forward {buffer}", "cpu")), m((f"relu 16M backward {buffer}", "cpu"))
        if not (fwd and bwd):
            continue
        add(f"relu forward GB/s (cpu, {buffer})", 2 * nbytes / fwd / 1e9)
        add(f"relu backward GB/s (cpu, {buffer})", 3 * nbytes / bwd / 1e9)
        ref_fwd = m((f"relu 16M forward {buffer}", "numpy"))
        ref_bwd = m((f"relu 16M backward {buffer}", "numpy"))
        if ref_fwd and ref_bwd:
            add(f"relu fwd+bwd ({buffer}): cpu / numpy speed", (ref_fwd + ref_bwd) / (fwd + bwd), 2)
        if m((f"relu 16M fwd+bwd {buffer}", "torch")):
            add(f"relu fwd+bwd ({buffer}): cpu / torch speed",
                m((f"relu 16M fwd+bwd {buffer}", "torch")) / (fwd + bwd), 1.0)
        copy = m((f"copy 16M floats {buffer}", "numpy"))
        if copy:
            add(f"copy GB/s ({buffer})", 2 * nbytes / copy / 1e9)
            add(f"relu forward GB/s / copy GB/s ({buffer})", copy / fwd, 0.8)
    for group in ("im2col 3x3 pad 1", "col2im 3x3 pad 1", "softmax xent 4096x1000"):
        if m((group, "cpu")) and m((group, "numpy")):
            add(f"{group}: cpu / numpy speed", m((group, "numpy")) / m((group, "cpu")))
    return lines


def _interleaved(first, second, rounds=7, repeat_second=1):
    """Median seconds of first() and of second() timed alternately, so that load
    from other processes hits both alike (the ratio is then the fairer figure)."""
    first()
    second()
    times_first, times_second = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        first()
        times_first.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(repeat_second):
            second()
        times_second.append((time.perf_counter() - start) / repeat_second)
    return float(np.median(times_first)), float(np.median(times_second))


def _interleaved_lines():
    """dense vs sgemm and conv vs PyTorch, measured alternately."""
    a = np.asfortranarray(rng.standard_normal((2048, 2048), dtype=np.float32))
    c = np.zeros((2048, 2048), np.float32, order="F")
    x = rng.standard_normal((256, 1024), dtype=np.float32)
    W = rng.standard_normal((1024, 1024), dtype=np.float32) * 0.03
    b = rng.standard_normal(1024, dtype=np.float32)

    def dense():
        kernels.dense_forward(x, W, b)
        kernels.dense_backward(x, x, W)
    sgemm, dense_time = _interleaved(
        lambda: scipy.linalg.blas.sgemm(1.0, a, a, c=c, overwrite_c=True), on_backend("cpu", dense),
        repeat_second=8)
    sgemm_gflops = 2 * 2048**3 / sgemm / 1e9
    dense_gflops = 6 * 256 * 1024 * 1024 / dense_time / 1e9
    lines = [f"interleaved: sgemm {sgemm_gflops:.1f} GFLOP/s, dense fwd+bwd {dense_gflops:.1f} GFLOP/s, "
             f"ratio {dense_gflops / sgemm_gflops:.2f} [target >= 0.9]"]
    if torch is not None:
        cx, cW, cb, cg = conv_arrays()
        tx, tW, tb = (torch.from_numpy(v).requires_grad_(True) for v in (cx, cW, cb))
        tg = torch.from_numpy(cg)

        def conv_torch():
            tx.grad = tW.grad = tb.grad = None
            torch.nn.functional.conv2d(tx, tW, tb, padding=1).backward(tg)

        def conv_fastnn():
            kernels.conv2d_forward(cx, cW, cb, 1, 1)
            kernels.conv2d_backward(cg, cx, cW, 1, 1)
        torch_time, fastnn_time = _interleaved(conv_torch, on_backend("cpu", conv_fastnn))
        lines.append(f"interleaved: conv3x3 fwd+bwd fastnn {CONV_FLOPS / fastnn_time / 1e9:.1f} GFLOP/s, "
                     f"torch {CONV_FLOPS / torch_time / 1e9:.1f} GFLOP/s, "
                     f"ratio {torch_time / fastnn_time:.2f} [target >= 1.0]")
    return lines


@pytest.fixture(scope="module", autouse=True)
def print_summary(request):
    """Print the machine and the ratios against the targets after the module's benchmarks."""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    yield
    lines = ["", f"=== fastnn kernels, {started} ==="] + _machine() + _ratio_lines()
    if MEDIANS:                  # not under --benchmark-disable
        lines += _interleaved_lines()
    lines.append(f"load average at the end {os.getloadavg()}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():    # shown without -s
        print("\n".join(lines))
