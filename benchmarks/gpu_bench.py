"""GPU timings for issue 5: fastnn's CUDA path against PyTorch CUDA, one process.

    python3 benchmarks/gpu_bench.py [--json FILE] [--skip-lenet] [--data DIR]

1. conv 3x3 forward + backward, N=64, C=K=128, 32x32, padding 1 (the issue's
   target): fastnn in float32 and with TF32 GEMMs, against PyTorch/cuDNN with
   its default (TF32 allowed for convolutions) and with TF32 off; plus where
   fastnn's time goes (im2col, the GEMMs, the layout passes, col2im).
2. LeNet-5 training at batch 256 (SGD momentum 0.9, one epoch over 60000
   MNIST-shaped samples, in order): fastnn ``Network.fit`` (NumPy inputs, as
   the API takes them, and CuPy inputs) against a PyTorch eager loop (the
   same model; the loss read back each batch as fit does), and a per-layer
   breakdown of one fastnn step (CPU time of the launches vs GPU time).

Timing: cudaDeviceSynchronize before and after each timed call (it covers
CuPy's and PyTorch's streams alike), warm-up first, median of the repeats.
Needs CuPy, a GPU and PyTorch with CUDA.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np


def _sync():
    import cupy
    cupy.cuda.runtime.deviceSynchronize()


def timed(run, repeats=10, warmup=2, inner=1):
    """Median seconds of one ``run()`` (each repeat runs it ``inner`` times)."""
    for _ in range(warmup):
        run()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            run()
        _sync()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), min(times), max(times)


def versions():
    import cupy
    import torch
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "cupy": cupy.__version__, "torch": torch.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver_api": cupy.cuda.runtime.driverGetVersion(),
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    props = cupy.cuda.runtime.getDeviceProperties(0)
    info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info["sm_count"] = props["multiProcessorCount"]
    return info


def conv_parts(n, c, k, h, w, ksize, pad, tag="part"):
    """Median time of each launch of fastnn's conv forward and backward (float32)."""
    import cupy as cp
    from fastnn.kernels import _cuda
    rng = np.random.default_rng(1)
    x = cp.asarray(rng.standard_normal((n, c, h, w), dtype=np.float32))
    W = cp.asarray(rng.standard_normal((k, c, ksize, ksize), dtype=np.float32))
    b = cp.asarray(rng.standard_normal(k, dtype=np.float32))
    oh, ow = h + 2 * pad - ksize + 1, w + 2 * pad - ksize + 1
    p, ckk = oh * ow, c * ksize * ksize
    gy = cp.asarray(rng.standard_normal((n, k, oh, ow), dtype=np.float32))
    cols = cp.empty((n, ckk, p), cp.float32)
    y = cp.empty((n, k, oh, ow), cp.float32)
    partials = cp.empty((n, k, ckk), cp.float32)
    gW = cp.empty((k, ckk), cp.float32)
    gx = cp.empty_like(x)
    gb = cp.empty(k, cp.float32)
    s, pd = (1, 1), (pad, pad)
    kern = _cuda._kernel
    i32 = np.int32
    t = {}
    t[f"{tag} im2col"] = timed(lambda: _cuda._im2col_into(x, ksize, ksize, s, pd, oh, ow, cols, True))
    t[f"{tag} GEMM y=W@cols (batched)"] = timed(lambda: _cuda._gemm(
        W, cols, y, k, p, ckk, batch=n, stride_b=ckk * p, stride_out=k * p))
    t[f"{tag} bias"] = timed(lambda: kern("bias_nkp_kernel", np.float32)(
        _cuda._plane_grid(p, k, n), (256,), (y, b, i32(n), i32(k), i32(p))))
    t[f"{tag} GEMM partials=gy@cols.T"] = timed(lambda: _cuda._gemm(
        gy, cols, partials, k, ckk, p, trans_b=True, batch=n, stride_a=k * p,
        stride_b=ckk * p, stride_out=k * ckk))
    t[f"{tag} sum partials"] = timed(lambda: _cuda._sum_rows(partials, n, k * ckk, gW))
    t[f"{tag} GEMM gcols=W.T@gy (batched)"] = timed(lambda: _cuda._gemm(
        W, gy, cols, ckk, p, k, trans_a=True, batch=n, stride_b=k * p, stride_out=ckk * p))
    t[f"{tag} col2im"] = timed(lambda: _cuda._col2im_into(cols, gx, ksize, ksize, s, pd, oh, ow, True))
    t[f"{tag} grad_b"] = timed(lambda: _cuda._channel_sums(gy, n, k, p, gb))
    if ksize - 1 - pad >= 0:      # stride-1 grad_x: im2col of grad_y + GEMM with the flipped kernel
        kk = ksize * ksize
        w_flip = cp.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        gcols = cp.empty((n, k * kk, h * w), cp.float32)
        pad_t = (ksize - 1 - pad, ksize - 1 - pad)
        t[f"{tag} im2col(grad_y)"] = timed(lambda: _cuda._im2col_into(
            gy, ksize, ksize, s, pad_t, h, w, gcols, True))
        t[f"{tag} GEMM grad_x=Wflip@cols(gy)"] = timed(lambda: _cuda._gemm(
            w_flip, gcols, gx, c, h * w, k * kk, batch=n, stride_b=k * kk * h * w,
            stride_out=c * h * w))
    t[f"{tag} whole fwd"] = timed(lambda: _cuda.conv2d_forward(x, W, b, s, pd))
    t[f"{tag} whole bwd"] = timed(lambda: _cuda.conv2d_backward(gy, x, W, s, pd))
    return t


def bench_launch_overhead():
    """Host microseconds per call (no sync inside the loop) of the GEMM routes."""
    import cupy as cp
    from cupy_backends.cuda.libs import cublas
    from fastnn.kernels import _cuda
    rng = np.random.default_rng(2)
    a = cp.asarray(rng.standard_normal((256, 400), dtype=np.float32))
    b = cp.asarray(rng.standard_normal((400, 120), dtype=np.float32))
    out = cp.empty((256, 120), cp.float32)
    one, zero = np.array(1, np.float32), np.array(0, np.float32)
    handle = cp.cuda.device.get_cublas_handle()

    def legacy():   # cublasSgemm, column-major out.T = b.T a.T
        cublas.sgemm(handle, 0, 0, 120, 256, 400, one.ctypes.data, b.data.ptr, 120,
                     a.data.ptr, 400, zero.ctypes.data, out.data.ptr, 120)
    routes = {"fastnn _gemm (gemmStridedBatchedEx)": lambda: _cuda._gemm(a, b, out, 256, 120, 400),
              "cupy.matmul(out=)": lambda: cp.matmul(a, b, out=out),
              "cublas.sgemm direct": legacy,
              "relu RawKernel": lambda: _cuda.relu_forward(out),
              "cupy.empty": lambda: cp.empty((256, 120), cp.float32)}
    print("\n== host time per launch (us, 2000 calls, no sync inside) ==")
    for name, run in routes.items():
        for _ in range(50):
            run()
        _sync()
        t0 = time.perf_counter()
        for _ in range(2000):
            run()
        host = (time.perf_counter() - t0) / 2000
        _sync()
        print(f"  {name:40s} {host * 1e6:7.1f} us")
    np.testing.assert_allclose(cp.asnumpy(out), cp.asnumpy(a) @ cp.asnumpy(b), rtol=1e-3, atol=1e-3)


def bench_conv(results):
    import cupy as cp
    import torch
    from fastnn import kernels
    from fastnn.kernels import _cuda

    n, c, k, h, w = 64, 128, 128, 32, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    W = (rng.standard_normal((k, c, 3, 3), dtype=np.float32) * 0.05).astype(np.float32)
    b = rng.standard_normal(k, dtype=np.float32)
    gy = rng.standard_normal((n, k, h, w), dtype=np.float32)
    gflop = 3 * 2 * n * k * c * 9 * h * w / 1e9
    cx, cW, cb, cgy = (cp.asarray(a) for a in (x, W, b, gy))
    tx, tW, tb, tgy = (torch.from_numpy(a).cuda() for a in (x, W, b, gy))

    def fastnn_both():
        kernels.conv2d_forward(cx, cW, cb, 1, 1)
        kernels.conv2d_backward(cgy, cx, cW, 1, 1)

    def torch_both():
        torch.nn.functional.conv2d(tx, tW, tb, padding=1)
        torch.ops.aten.convolution_backward(tgy, tx, tW, [k], [1, 1], [1, 1], [1, 1], False,
                                            [0, 0], 1, [True, True, True])

    rows = {}
    _cuda.set_tf32(False)
    rows["fastnn fp32 fwd"] = timed(lambda: kernels.conv2d_forward(cx, cW, cb, 1, 1))
    rows["fastnn fp32 bwd"] = timed(lambda: kernels.conv2d_backward(cgy, cx, cW, 1, 1))
    rows["fastnn fp32 fwd+bwd"] = timed(fastnn_both)
    _cuda.set_tf32(True)
    rows["fastnn tf32 fwd+bwd"] = timed(fastnn_both)
    _cuda.set_tf32(False)
    default_tf32 = torch.backends.cudnn.allow_tf32
    rows[f"torch default (cudnn.allow_tf32={default_tf32}) fwd+bwd"] = timed(torch_both)
    torch.backends.cudnn.allow_tf32 = False
    rows["torch fp32 (allow_tf32=False) fwd+bwd"] = timed(torch_both)
    torch.backends.cudnn.allow_tf32 = default_tf32
    torch.backends.cudnn.allow_tf32 = True
    rows["torch tf32 fwd+bwd"] = timed(torch_both)
    torch.backends.cudnn.allow_tf32 = default_tf32

    rows.update(conv_parts(n, c, k, h, w, 3, 1))
    _cuda.set_tf32(True)
    rows.update({name: v for name, v in conv_parts(n, c, k, h, w, 3, 1, tag="tf32 part").items()
                 if "GEMM" in name or "whole" in name})
    _cuda.set_tf32(False)
    # the single-GEMM formulation, for comparison with the batched one
    cols = _cuda.im2col(cx, 3, 3, (1, 1), (1, 1))
    wm = cW.reshape(k, c * 9)
    out = cp.matmul(wm, cols)
    rows["alt cupy.matmul W@cols (K, N*P)"] = timed(lambda: cp.matmul(wm, cols, out=out))

    print(f"\n== conv 3x3 fwd+bwd N={n} C=K={c} {h}x{w} pad 1 ({gflop:.1f} GFLOP) ==")
    for name, (med, lo, hi) in rows.items():
        rate = f"{gflop / med:9.0f} GFLOP/s" if "fwd+bwd" in name else ""
        print(f"  {name:45s} {med * 1e3:8.3f} ms  [{lo * 1e3:.3f}-{hi * 1e3:.3f}] {rate}")
    base = rows["fastnn fp32 fwd+bwd"][0]
    tf = rows["fastnn tf32 fwd+bwd"][0]
    tdef = rows[f"torch default (cudnn.allow_tf32={default_tf32}) fwd+bwd"][0]
    t32 = rows["torch fp32 (allow_tf32=False) fwd+bwd"][0]
    print(f"  ratio fastnn fp32 / torch fp32 (speed):    {t32 / base:.2f}x")
    print(f"  ratio fastnn fp32 / torch default (speed): {tdef / base:.2f}x")
    print(f"  ratio fastnn tf32 / torch default (speed): {tdef / tf:.2f}x")
    results["conv"] = {name: v[0] for name, v in rows.items()}
    results["conv_gflop"] = gflop


def _lenet_fastnn(seed=0):
    import fastnn as fn
    return fn.Network([
        fn.Conv2D(1, 6, 5, padding=2, seed=seed), fn.ReLU(), fn.MaxPool2D(2),
        fn.Conv2D(6, 16, 5, seed=seed + 1), fn.ReLU(), fn.MaxPool2D(2), fn.Flatten(),
        fn.Dense(400, 120, seed=seed + 2), fn.ReLU(), fn.Dense(120, 84, seed=seed + 3), fn.ReLU(),
        fn.Dense(84, 10, seed=seed + 4)])


def _lenet_torch(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def bench_lenet(results, data=None, batch=256):
    import cupy as cp
    import torch
    import fastnn as fn

    if data:
        (x, y), _ = fn.datasets.load_mnist(data)
    else:
        rng = np.random.default_rng(0)
        x = rng.random((60000, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 60000).astype(np.int64)
    n = x.shape[0]
    rows = {}

    def fit_epoch(net, xs, ys):
        return lambda: net.fit(xs, ys, epochs=1, batch_size=batch, shuffle=False, verbose=0)

    net = _lenet_fastnn().to("cuda")
    net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.01, momentum=0.9))
    rows["fastnn fit, NumPy inputs"] = timed(fit_epoch(net, x, y), repeats=3, warmup=1)
    xd, yd = cp.asarray(x), cp.asarray(y)
    try:
        rows["fastnn fit, CuPy inputs"] = timed(fit_epoch(net, xd, yd), repeats=3, warmup=1)
    except Exception as exc:  # fit may accept NumPy only
        print(f"  fastnn fit on CuPy inputs: {type(exc).__name__}: {exc}")

    torch.manual_seed(0)
    model = _lenet_torch(torch).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()

    def torch_epoch(read_loss=True):
        def run():
            total = 0.0
            for i in range(0, n, batch):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(tx[i:i + batch]), ty[i:i + batch])
                loss.backward()
                opt.step()
                if read_loss:
                    total += loss.item()
            return total
        return run

    rows["torch eager, loss.item() per batch"] = timed(torch_epoch(True), repeats=3, warmup=1)
    rows["torch eager, no readback"] = timed(torch_epoch(False), repeats=3, warmup=1)

    print(f"\n== LeNet-5 train, batch {batch}, {n} samples, SGD momentum ==")
    for name, (med, lo, hi) in rows.items():
        print(f"  {name:40s} {n / med:10.0f} samples/s  ({med:.3f} s/epoch)")
    ref = rows["torch eager, loss.item() per batch"][0]
    for name in [r for r in rows if r.startswith("fastnn")]:
        print(f"  ratio {name} / torch (item): {ref / rows[name][0]:.2f}x"
              f"   / torch (no readback): {rows['torch eager, no readback'][0] / rows[name][0]:.2f}x")
    results["lenet"] = {name: n / v[0] for name, v in rows.items()}

    print("\n  LeNet conv launches at batch 256 (median ms):")
    for tag, args in (("conv1", (batch, 1, 6, 28, 28, 5, 2)), ("conv2", (batch, 6, 16, 14, 14, 5, 0))):
        for name, (med, lo, hi) in conv_parts(*args, tag=tag).items():
            print(f"  {name:45s} {med * 1e3:8.3f} ms")

    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    fit_epoch(net, xd, yd)()
    _sync()
    prof.disable()
    print("\n  cProfile of one fastnn epoch (CuPy inputs), top 25 by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    # per-layer: CPU (launch) time vs GPU time of one step's pieces
    try:
        from cupyx.profiler import benchmark
    except ImportError:
        return
    xb = cp.asarray(x[:batch])
    acts = [xb]
    for layer in net.layers:
        acts.append(layer.forward(acts[-1], training=True))
    print("\n  one batch-256 step, per layer (cupyx.profiler.benchmark, mean us):")
    print(f"  {'layer':14s} {'fwd cpu':>9s} {'fwd gpu':>9s} {'bwd cpu':>9s} {'bwd gpu':>9s}")
    for layer, a_in, a_out in zip(net.layers, acts[:-1], acts[1:]):
        f = benchmark(layer.forward, (a_in, True), n_repeat=50, n_warmup=5)
        layer.forward(a_in, True)
        g = cp.ones_like(a_out)
        bk = benchmark(layer.backward, (g,), n_repeat=50, n_warmup=5)
        print(f"  {type(layer).__name__:14s} {f.cpu_times.mean() * 1e6:9.1f} "
              f"{f.gpu_times.mean() * 1e6:9.1f} {bk.cpu_times.mean() * 1e6:9.1f} "
              f"{bk.gpu_times.mean() * 1e6:9.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--data", default=None, help="MNIST folder (default: synthetic data)")
    p.add_argument("--skip-lenet", action="store_true")
    p.add_argument("--skip-conv", action="store_true")
    args = p.parse_args(argv)
    results = {"versions": versions()}
    print(json.dumps(results["versions"]))
    failed = False
    for name, run in (("launch", bench_launch_overhead),
                      ("conv", None if args.skip_conv else lambda: bench_conv(results)),
                      ("lenet", None if args.skip_lenet else lambda: bench_lenet(results, args.data))):
        if run is None:
            continue
        try:
            run()
        except Exception as exc:   # report and go on to the next section
            import traceback
            traceback.print_exc()
            print(f"section {name} failed: {type(exc).__name__}: {exc}")
            failed = True
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
