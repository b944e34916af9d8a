"""fastnn's own float32 GEMM (csrc/sgemm.c) against the BLAS it replaces, one thread,
on the GEMM shapes of the fastnn-bench workloads W1-W4.

    python3 benchmarks/bench_gemm.py [--rounds 21] [--threads]

Each shape runs the two engines in alternating rounds (the machine's load hits both
alike); the table gives median GFLOP/s and the ratio own / BLAS. ``--threads`` adds
the same GEMMs split over fastnn's worker pool (all threads), as the dense layers
run them; after a worker was late (a busy machine) the pool runs jobs on the caller
alone for a while, so under load those columns fall to one thread's rate. Needs a
CPU with AVX-512 (elsewhere only BLAS runs)."""
import argparse
import os
import platform
import sys
import time

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):   # as fastnn-bench: the BLAS as installed
    os.environ.pop(_var, None)

import numpy as np  # noqa: E402

from fastnn.kernels import _cpu, variants  # noqa: E402

# (name, m, n, k, trans_a, trans_b): C (m, n) = op(A) (m, k) @ op(B) (k, n)
SHAPES = [
    ("W1 forward x @ W", 256, 1024, 1024, False, False),
    ("W1 grad_x g @ W.T", 256, 1024, 1024, False, True),
    ("W1 grad_W x.T @ g", 1024, 1024, 256, True, False),
    ("W2 fc1 forward", 128, 256, 784, False, False),
    ("W2 fc1 grad_W", 784, 256, 128, True, False),
    ("W2 fc2 forward", 128, 128, 256, False, False),
    ("W2 fc2 grad_x", 128, 256, 128, False, True),
    ("W2 fc2 grad_W", 256, 128, 128, True, False),
    ("W3 fc1 forward", 64, 120, 400, False, False),
    ("W3 fc1 grad_W", 400, 120, 64, True, False),
    ("W3 fc1 grad_x", 64, 400, 120, False, True),
    ("W4 Winograd product", 256, 64, 64, False, False),
    ("W4 Winograd grad_W", 64, 64, 256, True, False),
    ("sgemm 2048^3", 2048, 2048, 2048, False, False),
]


def time_engines(a, b, out, trans_a, trans_b, split, rounds):
    flops = 2.0 * out.shape[0] * out.shape[1] * (a.shape[0] if trans_a else a.shape[1])
    calls = max(1, int(3e7 // flops))          # about 0.3 ms or more per timed round
    times = {"blas": [], "own": []}
    for _ in range(rounds):
        for engine in times:
            with variants.force("gemm", engine):
                start = time.perf_counter()
                for _ in range(calls):
                    _cpu._gemm_into(a, b, out, trans_a, trans_b, split=split)
                times[engine].append((time.perf_counter() - start) / calls)
    return {engine: flops / np.median(t) / 1e9 for engine, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", action="store_true",
                        help="also time the GEMMs split over all threads")
    args = parser.parse_args(argv)
    if not _cpu.own_sgemm_supported():
        print("no AVX-512 on this CPU: fastnn runs every GEMM on BLAS")
        return 0
    if not _cpu.blas_thread_control():
        print("cannot hold BLAS to one thread here: the one-thread figures would be wrong")
        return 1
    rng = np.random.default_rng(0)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"{_cpu.threads()} threads; median GFLOP/s of {args.rounds} alternating rounds")
    header = f"{'GEMM':24s} {'m':>5s} {'n':>5s} {'k':>5s} {'op':4s} {'BLAS':>7s} {'own':>7s} {'own/BLAS':>8s}"
    if args.threads:
        header += f" {'BLAS xT':>8s} {'own xT':>7s} {'ratio':>6s}"
    print(header)
    for name, m, n, k, trans_a, trans_b in SHAPES:
        a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
        out = np.empty((m, n), np.float32)
        one = time_engines(a, b, out, trans_a, trans_b, False, args.rounds)
        ops = ("T" if trans_a else "N") + ("T" if trans_b else "N")
        line = (f"{name:24s} {m:5d} {n:5d} {k:5d} {ops:4s} {one['blas']:7.1f} {one['own']:7.1f} "
                f"{one['own'] / one['blas']:7.2f}x")
        if args.threads:
            many = time_engines(a, b, out, trans_a, trans_b, True, args.rounds)
            line += f" {many['blas']:8.1f} {many['own']:7.1f} {many['own'] / many['blas']:5.2f}x"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
