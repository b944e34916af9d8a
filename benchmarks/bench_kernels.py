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


# --- ReLU on 16M floats ------------------------------------------------------------------

RELU_SIZE = 16 * 2**20


@pytest.mark.parametrize("impl", IMPLS)
def test_relu_forward(benchmark, impl):
    x = rng.standard_normal(RELU_SIZE, dtype=np.float32)
    measure(benchmark, "relu 16M forward", impl, on_backend(impl, lambda: kernels.relu_forward(x)),
            rounds=20)


@pytest.mark.parametrize("impl", IMPLS)
def test_relu_backward(benchmark, impl):
    grad_y = rng.standard_normal(RELU_SIZE, dtype=np.float32)
    y = np.maximum(rng.standard_normal(RELU_SIZE, dtype=np.float32), 0)
    measure(benchmark, "relu 16M backward", impl,
            on_backend(impl, lambda: kernels.relu_backward(grad_y, y)), rounds=20)


def test_relu_torch(benchmark):
    need_torch()
    x = torch.from_numpy(rng.standard_normal(RELU_SIZE, dtype=np.float32))
    grad_y = torch.from_numpy(rng.standard_normal(RELU_SIZE, dtype=np.float32))

    def step():
        y = torch.relu(x)
        torch.ops.aten.threshold_backward(grad_y, y, 0)
    measure(benchmark, "relu 16M fwd+bwd", "torch", step, rounds=20)


def test_memory_copy(benchmark):
    """The limit for a memory-bound pass: copying 16M floats into a fresh array."""
    x = rng.standard_normal(RELU_SIZE, dtype=np.float32)
    measure(benchmark, "copy 16M floats", "numpy", x.copy, rounds=20)


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
    fwd, bwd = m(("relu 16M forward", "cpu")), m(("relu 16M backward", "cpu"))
    if fwd and bwd:
        nbytes = RELU_SIZE * 4
        add("relu forward GB/s (cpu)", 2 * nbytes / fwd / 1e9)
        add("relu backward GB/s (cpu)", 3 * nbytes / bwd / 1e9)
        ref_fwd, ref_bwd = m(("relu 16M forward", "numpy")), m(("relu 16M backward", "numpy"))
        if ref_fwd and ref_bwd:
            add("relu fwd+bwd: cpu / numpy speed", (ref_fwd + ref_bwd) / (fwd + bwd), 2)
        if m(("relu 16M fwd+bwd", "torch")):
            add("relu fwd+bwd: cpu / torch speed", m(("relu 16M fwd+bwd", "torch")) / (fwd + bwd), 1.0)
        copy = m(("copy 16M floats", "numpy"))
        if copy:
            add("copy GB/s", 2 * nbytes / copy / 1e9)
            add("relu forward GB/s / copy GB/s", copy / fwd, 0.8)
    for group in ("im2col 3x3 pad 1", "col2im 3x3 pad 1", "softmax xent 4096x1000"):
        if m((group, "cpu")) and m((group, "numpy")):
            add(f"{group}: cpu / numpy speed", m((group, "numpy")) / m((group, "cpu")))
    return lines


@pytest.fixture(scope="module", autouse=True)
def print_summary(request):
    """Print the machine and the ratios against the targets after the module's benchmarks."""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    yield
    lines = ["", f"=== fastnn kernels, {started} ==="] + _machine() + _ratio_lines()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():    # shown without -s
        print("\n".join(lines))
