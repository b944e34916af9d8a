"""pytest-benchmark suites of the fastnn-bench workloads W0-W7.

    pytest benchmarks/bench_workloads.py                      # quick sizes
    FASTNN_BENCH_FULL=1 pytest benchmarks/bench_workloads.py  # the issue's sizes
    pytest benchmarks/bench_workloads.py -k W3 --benchmark-group-by=group

One benchmark per (workload metric, implementation): fastnn, the NumPy peer,
the PyTorch peer (skipped when not installed) and the limits (copy, sgemm).
They are the very callables ``fastnn-bench`` times (``fastnn.bench.workloads``),
so both tools measure the same thing; each benchmark's ``extra_info`` holds the
work per call and the median figure in the workload's unit. Threads and the
OpenBLAS kernel are whatever the environment gives this pytest process; use
``fastnn-bench --threads N`` for runs that set them.
"""
import os

import pytest

from fastnn.bench.workloads import WORKLOADS, Config

FULL = os.environ.get("FASTNN_BENCH_FULL") == "1"
_built = {}


def _metrics(name):
    """Workload ``name`` built once per session (inputs, models, peers)."""
    if name not in _built:
        _built[name] = WORKLOADS[name](Config(quick=not FULL))
    return _built[name]


def _cases():
    """(workload, metric index, implementation) triples. Listed statically because
    building the workloads at collection time would allocate every input (W6
    alone is 16M floats); ``test_workload`` checks the list against the builder."""
    return [(w, m, impl) for w, metrics in EXPECTED.items()
            for m, impls in enumerate(metrics) for impl in impls]


EXPECTED = {
    "W0": [("fastnn", "numpy", "torch")],
    "W1": [("fastnn", "numpy", "torch", "sgemm (W0)")],
    "W2": [("fastnn", "numpy", "torch")],
    "W3": [("fastnn", "numpy", "torch")],
    "W4": [("fastnn", "numpy", "torch")],
    "W5": [("fastnn", "numpy", "torch"), ("fastnn", "numpy", "torch")],
    "W6": [("fastnn", "numpy", "torch", "copy"), ("fastnn", "numpy", "torch", "copy")],
    "W7": [("fastnn", "numpy", "torch"), ("fastnn", "fastnn.forward", "numpy", "torch")],
}


@pytest.mark.parametrize("workload, index, impl_name", _cases(),
                         ids=[f"{w}-{m}-{i}" for w, m, i in _cases()])
def test_workload(benchmark, workload, index, impl_name):
    metrics = _metrics(workload)
    assert [tuple(i.name for i in m.impls) for m in metrics] == EXPECTED[workload]
    metric = metrics[index]
    impl = next(i for i in metric.impls if i.name == impl_name)
    if impl.run is None:
        pytest.skip(f"{workload} {metric.name} {impl_name}: {impl.note}")
    benchmark.group = f"{workload} {metric.name}"
    benchmark.extra_info.update(unit=metric.unit, work_per_call=impl.work)
    benchmark.pedantic(impl.run, rounds=5 if FULL else 3, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:          # --benchmark-disable: ran once, nothing timed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_" + metric.unit] = (
        impl.work / median if metric.kind == "rate" else median * metric.scale / impl.work)
