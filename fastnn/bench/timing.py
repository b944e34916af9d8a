"""Timing harness: warm-up, calibrated inner loops, several repeats, median and min.

The implementations of a metric are timed in rounds, one repeat of each in
turn, so that the load of a shared machine drifting during a run hits them
alike; a short pause before each turn lets the previous library's spinning
worker threads go to sleep first. Each repeat runs the callable ``inner``
times, with ``inner`` chosen so that a repeat lasts at least ``min_repeat_s``;
the recorded figure is the time of one call. The garbage collector is off
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

    def speed(self, best=False):
        """Proportional to speed (median, or best repeat), comparable across impls of one metric."""
        value = self.best if best else self.median
        return value if self.kind == "rate" else 1.0 / value


# Pause before each implementation's turn: the previous library's worker threads
# (OpenBLAS spins about 2**28 cycles, ~0.1 s, after its last call; libgomp spins
# too unless passive) must be asleep before the next library starts timing.
SETTLE_S = 0.15
# A call shorter than this gets untimed calls before each timed repeat, so its
# data and weights are back in cache after another implementation's turn.
SHORT_CALL_S = 0.05


def _timed(run, sync, calls):
    start = time.perf_counter()
    for _ in range(calls):
        run()
    sync()
    return time.perf_counter() - start


def measure_interleaved(impls, *, repeats, warmup, min_repeat_s, max_inner=100000,
                        settle_s=SETTLE_S):
    """Time every ``impl.run`` in rounds (A B C, A B C, ...), so that a change in
    the machine's load hits all implementations alike.

    Each implementation first gets ``warmup`` untimed calls and one timed call
    that fixes ``inner`` (calls per repeat, so that a repeat lasts at least
    ``min_repeat_s``). Returns one entry per impl: ``(inner, [seconds per call
    for each repeat])``, or the exception it raised.
    """
    plan = {}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for impl in impls:
            sync = impl.sync or (lambda: None)
            try:
                time.sleep(settle_s)
                for _ in range(warmup):
                    impl.run()
                first = _timed(impl.run, sync, 1)
            except Exception as exc:  # reported in the table; the others go on
                plan[impl.name] = exc
                continue
            inner = max(1, min(max_inner, math.ceil(min_repeat_s / max(first, 1e-9))))
            rewarm = max(1, inner // 10) if first < SHORT_CALL_S else 0
            plan[impl.name] = (inner, rewarm, sync, [])
        for _ in range(repeats):
            for impl in impls:
                entry = plan[impl.name]
                if isinstance(entry, Exception):
                    continue
                inner, rewarm, sync, times = entry
                try:
                    time.sleep(settle_s)
                    if rewarm:
                        _timed(impl.run, sync, rewarm)
                    times.append(_timed(impl.run, sync, inner) / inner)
                except Exception as exc:
                    plan[impl.name] = exc
    finally:
        if gc_was_enabled:
            gc.enable()
    return [plan[i.name] if isinstance(plan[i.name], Exception) else
            (plan[i.name][0], plan[i.name][3]) for i in impls]
