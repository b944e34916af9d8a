"""Data-parallel training throughput: W2 (the MLP) and W3 (LeNet-5 b64) of
``fastnn.bench.workloads`` with 1 and 2 processes under mpiexec, one thread each
(OMP/OpenBLAS/MKL_NUM_THREADS=1), and the measured allreduce and compute time per step.

    python benchmarks/bench_distributed.py [--quick] [--procs 1,2] [--workloads W2,W3]
                                           [--samples N] [--repeat R] [--json FILE]
                                           [--estimate FILE.md]

For each (workload, processes): one fit epoch over the same data with the same global
batch, ``DistributedOptimizer(SGD(lr=0.01, momentum=0.9))``, after one warm-up epoch.
Reported per step (rank 0): ``step_s`` (wall time / steps), ``allreduce_s`` (time
inside the step's allreduce, waiting for the slower rank included), ``compute_s``
(step_s - allreduce_s) and ``pure_allreduce_s`` (the packed gradient buffer allreduced
alone, ranks in step: the network's cost), plus samples/s and the speed-up over one
process. ``--estimate`` also writes the scaling estimate of ``scaling_model.py`` from
these numbers. Times are medians of ``--repeat`` runs; run on a quiet machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

WORKLOADS = {"W2": (128, 60000, 3200), "W3": (64, 6400, 640)}   # batch, samples, quick samples
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _network(name):
    from fastnn.bench import workloads
    cfg = workloads.Config(quick=True, compare=frozenset())
    return workloads._fastnn_mlp(cfg) if name == "W2" else workloads._fastnn_lenet(cfg)


def _data(name, n):
    from fastnn.bench import workloads
    x, y = workloads._mnist_like(workloads.Config(), n)
    return (x.reshape(n, 784) if name == "W2" else x), y


def worker(name, n, repeat):
    """In each rank: time the fit epochs; rank 0 prints one JSON line."""
    import fastnn as fn
    from fastnn import distributed as dist
    dist.init()
    batch = WORKLOADS[name][0]
    x, y = _data(name, n)
    net = _network(name)
    opt = dist.DistributedOptimizer(fn.optim.SGD(lr=0.01, momentum=0.9))
    net.compile(loss="cross_entropy", optimizer=opt)
    spent = [0.0]
    allreduce = dist.allreduce

    def timed(buf):
        t = time.perf_counter()
        allreduce(buf)
        spent[0] += time.perf_counter() - t
        return buf
    dist.allreduce = timed
    net.fit(x[:batch * 4], y[:batch * 4], epochs=1, batch_size=batch, shuffle=False, verbose=0)
    steps = -(-n // batch)
    runs = []
    for _ in range(repeat):
        spent[0] = 0.0
        _barrier()
        t = time.perf_counter()
        net.fit(x, y, epochs=1, batch_size=batch, shuffle=False, verbose=0)
        wall = time.perf_counter() - t
        runs.append((wall, spent[0]))
    dist.allreduce = allreduce
    wall, inside = sorted(runs)[len(runs) // 2]
    pure, nbytes = _pure_allreduce(opt)
    if dist.rank() == 0:
        print(json.dumps({"workload": name, "procs": dist.size(), "batch": batch, "samples": n,
                          "steps": steps, "samples_per_s": n / wall, "step_s": wall / steps,
                          "allreduce_s": inside / steps, "compute_s": (wall - inside) / steps,
                          "pure_allreduce_s": pure, "allreduce_bytes": nbytes}), flush=True)


def _barrier():
    from fastnn import distributed as dist
    if dist.size() > 1:
        dist._World.comm.Barrier()


def _pure_allreduce(opt, reps=200):
    """Median time of one allreduce of the optimizer's packed buffer, ranks in step."""
    from fastnn import distributed as dist
    buf = opt._packed.buf
    times = []
    for _ in range(reps):
        _barrier()
        t = time.perf_counter()
        dist.allreduce(buf)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), int(buf.nbytes)


def measure(args):
    """Launch one mpiexec job per (workload, processes) -> list of result dicts."""
    from fastnn import distributed as dist
    env = dict(os.environ, **{v: "1" for v in THREAD_VARS})
    results = []
    for name in args.workloads:
        batch, full, quick = WORKLOADS[name]
        n = args.samples or (quick if args.quick else full)
        for p in args.procs:
            cmd = dist.mpiexec_command(p, [sys.executable, os.path.abspath(__file__), "--worker",
                                           name, "--samples", str(n), "--repeat",
                                           str(args.repeat)])
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if done.returncode:
                raise SystemExit(f"bench_distributed: {name} on {p} processes failed:\n"
                                 f"{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in results:
        one = next((o for o in results if o["workload"] == r["workload"] and o["procs"] == 1),
                   None)
        r["speedup"] = r["samples_per_s"] / one["samples_per_s"] if one else None
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps (a smoke test, no claims)")
    p.add_argument("--procs", default="1,2", help="process counts (default 1,2)")
    p.add_argument("--workloads", default="W2,W3")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--estimate", metavar="FILE", help="write the scaling estimate (Markdown)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, help="samples per epoch (default: the workload's, "
                                                "6400 for W3, 60000 for W2)")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.samples, args.repeat)
        return 0
    args.procs = [int(v) for v in args.procs.split(",")]
    args.workloads = [w.strip() for w in args.workloads.split(",")]
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workloads {unknown}; expected W2, W3")
    results = measure(args)
    for r in results:
        speed = "" if r["speedup"] is None else f"  x{r['speedup']:.2f}"
        print(f"{r['workload']} p={r['procs']}: {r['samples_per_s']:9.0f} samples/s{speed}  "
              f"step {1e3 * r['step_s']:.3f} ms = compute {1e3 * r['compute_s']:.3f} + "
              f"allreduce {1e3 * r['allreduce_s']:.3f} ms (alone {1e6 * r['pure_allreduce_s']:.1f}"
              f" us, {r['allreduce_bytes']} B)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "threads_per_process": 1}, f, indent=1)
    if args.estimate:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import scaling_model
        with open(args.estimate, "w") as f:
            f.write(scaling_model.report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
