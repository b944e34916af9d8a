"""Timing harness: warm-up, calibrated inner loops, several repeats, median and min.

A workload metric is timed per implementation, one implementation after the
other, a whole block each after a short pause, so one library's spinning
worker threads have gone quiet before the next one starts. Each repeat runs
the callable ``inner`` times, with ``inner`` chosen so that a repeat lasts at
least ``min_repeat_s``; the recorded figure is the time of one call. The garbage collector is off
while timing, as in ``timeit``.
"""
import gc
import math
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Impl:
    """One implementation of a metric: ``run()`` does ``work`` units of work
    (GFLOP, GB or samples for a rate; items for a per-item time)."""
    name: str
    run: callable
    work: float
    sync: callable = None          # called after each timed block (CUDA: wait for the device)
    note: str = ""


@dataclass
class Metric:
    """A figure of a workload, e.g. W6 "forward" in GB/s.

    ``kind`` is ``"rate"`` (value = work / seconds, higher is better) or
    ``"time"`` (value = seconds * scale / work, lower is better).
    ``targets`` are ``(peer, min_speedup, text)``: fastnn must be at least
    ``min_speedup`` times as fast as ``peer`` (speed ratio, whatever the unit).
    """
    workload: str
    name: str
    unit: str
    kind: str
    impls: list
    scale: float = 1.0
    targets: tuple = ()
    description: str = ""


@dataclass
class Result:
    workload: str
    metric: str
    impl: str
    unit: str
    kind: str
    work: float
    inner: int = 0
    times_s: list = field(default_factory=list)   # seconds per call, one entry per repeat
    error: str = ""
    note: str = ""
    scale: float = 1.0

    def value(self, seconds):
        if self.kind == "rate":
            return self.work / seconds
        return seconds * self.scale / self.work

    @property
    def ok(self):
        return not self.error and bool(self.times_s)

    @property
    def median(self):
        return self.value(statistics.median(self.times_s))

    @property
    def best(self):
        """Figure of the fastest repeat (min time)."""
        return self.value(min(self.times_s))

    def speed(self):
        """Something proportional to speed, comparable across impls of one metric."""
        return self.median if self.kind == "rate" else 1.0 / self.median


# Pause before each implementation's block: the previous library's worker threads
# (OpenBLAS spins about 2**28 cycles, ~0.1 s, after its last call; libgomp spins
# too unless passive) must be asleep before the next library starts timing.
SETTLE_S = 0.2


def measure(impl, *, repeats, warmup, min_repeat_s, max_inner=100000, settle_s=SETTLE_S):
    """Time ``impl.run``: returns ``(inner, [seconds per call for each repeat])``."""
    sync = impl.sync or (lambda: None)
    time.sleep(settle_s)
    for _ in range(warmup):
        impl.run()
    sync()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        impl.run()
        sync()
        first = time.perf_counter() - start
        inner = max(1, min(max_inner, math.ceil(min_repeat_s / max(first, 1e-9))))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                impl.run()
            sync()
            times.append((time.perf_counter() - start) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return inner, times
