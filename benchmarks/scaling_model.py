"""The scaling estimate of fastnn's data-parallel training beyond one machine, from the
measurements of ``bench_distributed.py`` (compute time per step with 1 and 2 processes,
the size of the packed gradient buffer), by the alpha-beta model of an allreduce.

    python benchmarks/scaling_model.py RESULTS.json [> estimate.md]

Model (stated assumptions, not measurements):
- compute per step on one rank: ``t(b) = o + c * b`` for a per-rank batch b, c and o
  (per-sample time, fixed per-step overhead) solved from the 1- and 2-process runs
  of the same global batch (o clamped at >= 0);
- an allreduce of M bytes over p nodes, link latency alpha, bandwidth B:
  ring ``2 (p-1) alpha + 2 (p-1)/p * M/B``; tree (pipelined double binary tree, as
  NCCL's) ``2 ceil(log2 p) alpha + 2 M/B``;
- networks: 25 Gb/s Ethernet (TCP, alpha = 15 us) and 100 Gb/s (InfiniBand / RoCE
  RDMA, alpha = 3 us), bandwidth 80% of the line rate;
- no overlap: step = t(b) + allreduce. Efficiency = one node's throughput per node:
  strong scaling (global batch fixed, b = G / p): t(G) / (p * step); weak scaling
  (b = G per node): t(G) / step;
- overlap of the allreduce with the backward (bucketed, as PyTorch DDP): the backward
  is taken as 2/3 of the compute, so step = max(t(b), t(b) / 3 + allreduce);
- fp16 gradients halve M.
"""
import json
import math
import sys

NETWORKS = {"25 Gb/s": (15e-6, 0.8 * 25e9 / 8), "100 Gb/s": (3e-6, 0.8 * 100e9 / 8)}
NODES = (8, 64)


def allreduce_time(kind, p, nbytes, alpha, bandwidth):
    """Seconds for one allreduce of ``nbytes`` over ``p`` nodes (``kind``: ring | tree)."""
    if p == 1:
        return 0.0
    if kind == "ring":
        return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / bandwidth
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * nbytes / bandwidth


def compute_model(results, workload):
    """(c, o, G, M): per-sample and per-step compute seconds, global batch, buffer bytes."""
    runs = {r["procs"]: r for r in results if r["workload"] == workload}
    one = runs[1]
    G, M = one["batch"], one["allreduce_bytes"]
    if 2 in runs:       # t(G) = o + c G, t(G/2) = o + c G / 2
        c = max(2 * (one["compute_s"] - runs[2]["compute_s"]) / G, 0.0)
        o = max(one["compute_s"] - c * G, 0.0)
        c = (one["compute_s"] - o) / G
    else:
        c, o = one["compute_s"] / G, 0.0
    return c, o, G, M


def step_time(c, o, b, t_ar, overlap=False):
    t = o + c * b
    return max(t, t / 3 + t_ar) if overlap else t + t_ar


def batch_for(target, c, o, t_ar, overlap=False):
    """The smallest per-rank batch whose weak-scaling efficiency reaches ``target``."""
    b = 1
    while b < 1 << 24:
        t = o + c * b
        if t / step_time(c, o, b, t_ar, overlap) >= target:
            return b
        b = math.ceil(b * 1.1) if b > 16 else b + 1
    return None


def _rows(results, workload):
    c, o, G, M = compute_model(results, workload)
    rows = []
    for net, (alpha, bw) in NETWORKS.items():
        for p in NODES:
            for kind in ("ring", "tree"):
                t_ar = allreduce_time(kind, p, M, alpha, bw)
                strong = (o + c * G) / (p * step_time(c, o, G / p, t_ar))
                weak = (o + c * G) / step_time(c, o, G, t_ar)
                rows.append((workload, net, p, kind, t_ar, strong, weak))
    return rows


def _needs(results, workload, target=0.8, p=64):
    """Per-rank batch for ``target`` at ``p`` nodes: plain, fp16, overlap, both."""
    c, o, G, M = compute_model(results, workload)
    out = []
    for net, (alpha, bw) in NETWORKS.items():
        best = lambda m: min(allreduce_time(k, p, m, alpha, bw) for k in ("ring", "tree"))  # noqa: E731
        out.append((workload, net, batch_for(target, c, o, best(M)),
                    batch_for(target, c, o, best(M / 2)),
                    batch_for(target, c, o, best(M), overlap=True),
                    batch_for(target, c, o, best(M / 2), overlap=True)))
    return out


def report(results):
    """The estimate as Markdown."""
    workloads = sorted({r["workload"] for r in results if r["procs"] == 1})
    lines = ["| workload | network | nodes | allreduce | time/step | strong eff. | weak eff. |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for w in workloads:
        c, o, G, M = compute_model(results, w)
        for wl, net, p, kind, t_ar, strong, weak in _rows(results, w):
            lines.append(f"| {wl} (b{G}, {M / 1e3:.0f} kB) | {net} | {p} | {kind} | "
                         f"{1e6 * t_ar:.0f} us | {100 * strong:.0f}% | {100 * weak:.0f}% |")
    lines += ["", "Per-rank batch for >= 80% (weak scaling) at 64 nodes, the better of ring "
              "and tree:", "",
              "| workload | network | as is | fp16 grads | overlap | fp16 + overlap |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for w in workloads:
        for row in _needs(results, w):
            lines.append("| " + " | ".join(str(v) for v in row) + " |")
    for w in workloads:
        c, o, G, M = compute_model(results, w)
        lines.append(f"\n{w}: compute {1e6 * c:.1f} us/sample + {1e6 * o:.0f} us/step "
                     f"(from the 1- and 2-process runs), gradient buffer {M} bytes.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(report(json.load(f)["results"]), end="")
