"""``fastnn-bench``: the workloads W0-W7 on fastnn against NumPy and PyTorch.

    fastnn-bench [--workload NAME ...] [--device cpu|cuda]
                 [--compare numpy,torch,torch-alone] [--threads N] [--quick]
                 [--json FILE] [--keep-blas-env]

(all three peers by default).

Each workload's speed targets (e.g. ">= 0.9 x sgemm") are printed with a verdict:
met, not met, unsure (the ratio of medians and that of the best repeats disagree:
the load changed) or n/a. They are goals for a quiet machine, not tests: the exit
status is 0 after a run whatever the verdicts, 2 for a bad option, 1 when
``--device cuda`` finds no usable GPU.

Thread counts and OpenBLAS's kernel choice are fixed when the libraries load,
and ``import fastnn`` has already loaded NumPy by the time this module runs.
So the command line sets OMP/OPENBLAS/MKL_NUM_THREADS (``--threads``), unsets
``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` (which pin an older kernel; kept
with ``--keep-blas-env``), and re-executes itself once with that environment.
Called in-process as ``main([...])`` (tests), it cannot change an already
loaded library: it limits threads with threadpoolctl and reports the BLAS
kernel as it finds it. The kernel actually running is always reported
(threadpoolctl: internal_api, architecture, num_threads).

PyTorch's wheel bundles a libgomp with the same soname as the one fastnn's
extension loads, so in one process both run under one OpenMP runtime,
configured by whichever loaded first: the ``torch`` peer runs under fastnn's
``OMP_WAIT_POLICY=passive``. The ``torch-alone`` peer times PyTorch's
implementations again in a process of their own that loads PyTorch first
(libgomp's defaults), before the in-process rounds; its rows are not
interleaved with fastnn's, so a change of load between the two is not evened out.
"""
import argparse
import json
import os
import platform
import sys
import time

__all__ = ["main"]

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
BLAS_PIN_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_EXEC_MARK = "FASTNN_BENCH_ORIGINAL_ENV"        # set in the re-executed child: the parent's env
_WORKLOAD_NAMES = ("W0", "W1", "W2", "W3", "W4", "W5", "W6", "W7")
_PEERS = ("numpy", "torch", "torch-alone")
_ALONE = "torch-alone"

# timing settings: (repeats, warm-up calls, minimum seconds per repeat, pause before each turn)
_FULL = (5, 1, 0.2, 0.15)
_QUICK = (3, 1, 0.02, 0.12)


def _parser():
    p = argparse.ArgumentParser(
        prog="fastnn-bench",
        description="Time fastnn on the workloads W0-W7 against the NumPy reference and "
                    "PyTorch (where installed), in one process on the same inputs.",
        epilog="Speed targets print as met / not met / unsure; they are goals, not tests: "
               "the exit status is 0 after a run whatever they say (2: a bad option).")
    p.add_argument("--workload", action="extend", nargs="+", metavar="NAME", default=None,
                   help="workloads to run (W0..W7, default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda (CuPy arrays against PyTorch CUDA)")
    p.add_argument("--compare", default="numpy,torch,torch-alone", metavar="PEERS",
                   help="comma-separated peers among numpy,torch,torch-alone (default all "
                        "three; torch-alone: PyTorch timed again in a process of its own, "
                        "with its own OpenMP settings; 'none' for none)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for OpenMP, BLAS and PyTorch (set before they load)")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: under a minute")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write machine, versions, BLAS kernel and every repeat to FILE")
    p.add_argument("--keep-blas-env", action="store_true",
                   help="keep OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE (default: unset for this run)")
    p.add_argument("--only-impl", default=None, help=argparse.SUPPRESS)   # the torch-alone child
    return p


def _parse(argv):
    parser = _parser()
    args = parser.parse_args(argv)
    names = []
    for name in args.workload or _WORKLOAD_NAMES:
        for part in name.split(","):
            part = part.strip().upper()
            if part == "ALL":
                names.extend(_WORKLOAD_NAMES)
            elif part in _WORKLOAD_NAMES:
                names.append(part)
            elif part:
                parser.error(f"--workload: unknown workload {part!r}; choose among "
                             f"{', '.join(_WORKLOAD_NAMES)}")
    args.workloads = list(dict.fromkeys(names))
    peers = [s.strip().lower() for s in args.compare.split(",") if s.strip()]
    if peers == ["none"]:
        peers = []
    bad = [s for s in peers if s not in _PEERS]
    if bad:
        parser.error(f"--compare: unknown peer(s) {bad}; choose among {', '.join(_PEERS)} or none")
    args.peers = frozenset(peers)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _initial_environ():
    """The environment this process started with: ``import fastnn`` may have set
    variables since (``OMP_WAIT_POLICY``); the child starts from the user's
    environment and fastnn makes its own choices there again."""
    try:
        with open("/proc/self/environ", "rb") as f:
            items = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
        return {os.fsdecode(k): os.fsdecode(v) for k, v in items}
    except OSError:
        return dict(os.environ)


def _wanted_env(args, start):
    env = dict(start)
    if args.threads is not None:
        for var in THREAD_VARS:
            env[var] = str(args.threads)
    if not args.keep_blas_env:
        for var in BLAS_PIN_VARS:
            env.pop(var, None)
    return env


def _env_record(environ=None):
    environ = os.environ if environ is None else environ
    return {v: environ.get(v) for v in THREAD_VARS + BLAS_PIN_VARS + ("OMP_WAIT_POLICY",)}


def _maybe_reexec(args):
    """From the command line: re-execute once with the wanted environment.
    Returns the environment the run started from (the parent's, in the child).

    Import order stays that of any fastnn program (fastnn, then PyTorch): the
    two share one OpenMP runtime (libgomp), configured once by whichever loads
    it first, so the OMP_WAIT_POLICY fastnn chooses applies to both; the report
    records it (``environment_of_run``)."""
    if _EXEC_MARK in os.environ:
        return json.loads(os.environ[_EXEC_MARK])
    start = _initial_environ()
    wanted = _wanted_env(args, start)
    wanted[_EXEC_MARK] = json.dumps(_env_record(start))
    sys.stdout.flush()
    sys.stderr.flush()
    # the child imports this very fastnn (not one that the working directory may shadow)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {package_root!r}); "
            "from fastnn.bench import main; sys.exit(main())")
    os.execve(sys.executable, [sys.executable, "-c", code, *sys.argv[1:]], wanted)


# --- machine and library facts ---------------------------------------------------------

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions():
    import numpy
    import fastnn
    out = {"python": platform.python_version(), "numpy": numpy.__version__,
           "fastnn": fastnn.__version__}
    from importlib import metadata
    for mod, dists in (("scipy", ("scipy",)), ("torch", ("torch",)),
                       ("threadpoolctl", ("threadpoolctl",)),
                       ("cupy", ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"))):
        loaded = sys.modules.get(mod)
        out[mod] = getattr(loaded, "__version__", None) if loaded is not None else None
        for dist in dists if out[mod] is None else ():   # installed but not loaded: no import
            try:
                out[mod] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _blas_info():
    """Every BLAS/OpenMP pool loaded in this process, as threadpoolctl sees it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl is not installed"}]
    keys = ("user_api", "internal_api", "prefix", "version", "architecture",
            "threading_layer", "num_threads", "filepath")
    return [{k: info.get(k) for k in keys if k in info} for info in threadpool_info()]


def _source_revision():
    """``git describe`` of the fastnn checkout the run imported, when it is one."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _machine():
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
            "platform": platform.platform(), "loadavg_start": list(os.getloadavg())}


# --- running and reporting ---------------------------------------------------------------

def _fmt(v):
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _speed_ratio(fast, peer, best=False):
    """fastnn's speed over the peer's, from the medians (or the best repeats)."""
    if not (fast and fast.ok and peer and peer.ok):
        return None
    return fast.speed(best) / peer.speed(best)


def _run_metric(metric, timing, log, only_impl=None):
    from .timing import Result, measure_interleaved
    repeats, warmup, min_repeat_s, settle_s = timing
    impls = [i for i in metric.impls if only_impl is None or i.name == only_impl]
    metric.impls = impls
    results = [Result(metric.workload, metric.name, impl.name, metric.unit, metric.kind,
                      impl.work, note=impl.note, scale=metric.scale) for impl in impls]
    runnable = [(impl, res) for impl, res in zip(metric.impls, results) if impl.run is not None]
    measured = measure_interleaved([impl for impl, _ in runnable], repeats=repeats,
                                   warmup=warmup, min_repeat_s=min_repeat_s, settle_s=settle_s)
    for (impl, res), outcome in zip(runnable, measured):
        if isinstance(outcome, Exception):   # report a failing implementation, keep going
            res.error = f"{type(outcome).__name__}: {outcome}"
        else:
            res.inner, res.times_s = outcome
    for impl, res in zip(metric.impls, results):
        if impl.run is None:
            res.error = impl.note or "unavailable"
        log(f"  {metric.workload} {metric.name:<36} {impl.name:<15} "
            + (f"{_fmt(res.median):>10} {metric.unit}" if res.ok else res.error))
    return results


def _torch_alone(args, log):
    """Time the ``torch`` implementations of the selected workloads in a child
    process that loads PyTorch before fastnn (so libgomp keeps PyTorch's
    defaults); returns its results as ``Result`` rows named ``torch-alone``."""
    import importlib.util
    import subprocess
    import tempfile
    from .timing import Result
    if importlib.util.find_spec("torch") is None:   # the torch rows say it is not installed
        return [], None
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {package_root!r}); import torch; "
            "from fastnn.bench import main; sys.exit(main(sys.argv[1:]))")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "alone.json")
        argv = ["--workload", *args.workloads, "--device", args.device, "--compare", "torch",
                "--only-impl", "torch", "--json", out]
        argv += ["--quick"] if args.quick else []
        argv += ["--threads", str(args.threads)] if args.threads is not None else []
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        log("  timing PyTorch alone in a process of its own ...")
        done = subprocess.run([sys.executable, "-c", code, *argv], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            log(f"  torch-alone failed: {tail[0]}")
            return [], f"torch-alone failed: {tail[0]}"
        with open(out) as f:
            report = json.load(f)
    rows = []
    for r in report["results"]:
        rows.append(Result(r["workload"], r["metric"], _ALONE, r["unit"], r["kind"],
                           r["work_per_call"], inner=r["calls_per_repeat"],
                           times_s=r["seconds_per_call"] or [], error=r["error"],
                           note="PyTorch in its own process (libgomp defaults)",
                           scale=r.get("scale", 1.0)))
    return rows, None


def _targets(metrics, results):
    rows = []
    for metric in metrics:
        mine = [r for r in results if r.workload == metric.workload and r.metric == metric.name]
        by_name = {r.impl: r for r in mine}
        goals = list(metric.targets)
        if _ALONE in by_name:        # PyTorch's targets hold against both of its rows
            goals += [(_ALONE, need, text) for peer, need, text in metric.targets if peer == "torch"]
        for fast in (r for r in mine if r.impl.startswith("fastnn")):
            for peer, need, text in goals:
                ratio = _speed_ratio(fast, by_name.get(peer))
                ratio_best = _speed_ratio(fast, by_name.get(peer), best=True)
                if ratio is None:
                    verdict = "n/a"
                elif ratio >= need and ratio_best >= need:
                    verdict = "met"
                elif ratio < need and ratio_best < need:
                    verdict = "not met"
                else:   # medians and best repeats disagree: the load changed during the run
                    verdict = "unsure"
                rows.append({"workload": metric.workload, "metric": metric.name, "impl": fast.impl,
                             "peer": peer, "ratio": ratio, "ratio_of_best": ratio_best,
                             "target": text, "need": need, "verdict": verdict})
    return rows


def _table(results, targets):
    lines = []
    head = (f"{'workload':<8} {'metric':<36} {'impl':<15} {'median':>10} {'best':>10} "
            f"{'unit':<10} {'fastnn/peer':>11}  note")
    lines += [head, "-" * len(head)]
    for r in results:
        fast = next((f for f in results if f.workload == r.workload and f.metric == r.metric
                     and f.impl == "fastnn"), None)
        ratio = None if r.impl == "fastnn" else _speed_ratio(fast, r)
        ratio_s = "" if ratio is None else f"{ratio:.2f}x"
        if r.ok:
            lines.append(f"{r.workload:<8} {r.metric:<36} {r.impl:<15} {_fmt(r.median):>10} "
                         f"{_fmt(r.best):>10} {r.unit:<10} {ratio_s:>11}  {r.note}")
        else:
            lines.append(f"{r.workload:<8} {r.metric:<36} {r.impl:<15} {'-':>10} {'-':>10} "
                         f"{r.unit:<10} {'':>11}  {r.error}")
    lines.append("")
    lines.append("fastnn/peer is a speed ratio (for ms and us: peer time / fastnn time); "
                 "best = the fastest repeat.")
    if targets:
        lines.append("")
        head = (f"{'workload':<8} {'metric':<36} {'impl':<15} {'vs':<11} {'ratio':>7} "
                f"{'(best)':>7}  speed target")
        lines += [head, "-" * (len(head) + 30)]
        for t in targets:
            ratio, best = ("-" if v is None else f"{v:.2f}x"
                           for v in (t["ratio"], t["ratio_of_best"]))
            lines.append(f"{t['workload']:<8} {t['metric']:<36} {t['impl']:<15} {t['peer']:<11} "
                         f"{ratio:>7} {best:>7}  target: {t['target']} -- {t['verdict']}")
        lines.append("ratio: of the medians; (best): of the fastest repeats. A target is met or "
                     "not met when both agree, unsure when they do not (the machine's load "
                     "changed).")
        lines.append(_target_tally(targets))
    return "\n".join(lines)


def _target_tally(targets):
    """One line counting the verdicts; targets are goals, not tests (exit status 0)."""
    counts = {}
    for t in targets:
        counts[t["verdict"]] = counts.get(t["verdict"], 0) + 1
    tally = ", ".join(f"{counts[v]} {v}" for v in ("met", "not met", "unsure", "n/a") if v in counts)
    return (f"speed targets: {tally} (goals for a quiet machine, not tests: they do not change "
            "the exit status)")


def _check_cuda():
    from fastnn import backend
    if backend.cupy() is None:
        reason = getattr(backend, "_cuda_error", None) or "CuPy is not installed"
        raise SystemExit("fastnn-bench --device cuda: no usable CUDA GPU in this process "
                         f"({reason}). Install CuPy (pip install 'fastnn[gpu]') on a machine "
                         "with an NVIDIA GPU, or run the CPU workloads with --device cpu.")


def _report_start(args, original_env, torch, timing):
    """The report's first entries: the command, machine, versions of the run's setup."""
    from fastnn import backend
    report = {
        "command": "fastnn-bench " + " ".join(args.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": _machine(),
        "fastnn_backend": backend.current(),
        "fastnn_source": _source_revision(),
        "compiled_kernels_error": backend.compiled_error(),
        "environment_at_start": original_env,
        "environment_of_run": _env_record(),
        "blas_pin_unset": not args.keep_blas_env and args.reexec,
        "threads_requested": args.threads,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "timing": dict(zip(("repeats", "warmup", "min_repeat_s", "settle_s"), timing)),
        "device": args.device, "quick": args.quick,
    }
    if args.device == "cuda":
        cp = backend.cupy()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        report["machine"]["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) \
            else str(props["name"])
    return report


def run(args, original_env, log=print):
    """Run the selected workloads; return the JSON-ready report dict."""
    from .workloads import WORKLOADS, Config
    import fastnn
    from fastnn import backend

    if args.device == "cuda":
        _check_cuda()
    limiter = None
    if args.threads is not None:
        # a no-op where the environment already did it; needed when called in-process
        try:
            from threadpoolctl import threadpool_limits
            limiter = threadpool_limits(limits=args.threads)
        except ImportError:
            pass
    alone, alone_error = [], None
    if _ALONE in args.peers:         # first, before this process warms anything up
        alone, alone_error = _torch_alone(args, log)
    cfg = Config(quick=args.quick, device=args.device, compare=args.peers)
    torch = cfg.torch()
    if torch is not None and args.threads is not None:
        torch.set_num_threads(args.threads)
    import scipy.linalg.blas  # noqa: F401  (fastnn's BLAS: loaded now so it is reported)

    timing = _QUICK if args.quick else _FULL
    report = _report_start(args, original_env, torch, timing)
    log(f"fastnn-bench {fastnn.__version__}: backend {backend.current()}, device {args.device}, "
        f"{'quick' if args.quick else 'full'} run, {report['machine']['cpu_model']}, "
        f"{report['machine']['usable_cpus']} cpus, "
        f"load {report['machine']['loadavg_start'][0]:.2f}")
    results, metrics = [], []
    try:
        for name in args.workloads:
            try:
                built = WORKLOADS[name](cfg)
            except Exception as exc:   # e.g. a fastnn module not there yet
                log(f"  {name}: could not be built: {type(exc).__name__}: {exc}")
                report.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            for metric in built:
                metrics.append(metric)
                results.extend(_run_metric(metric, timing, log, args.only_impl))
                results.extend(r for r in alone
                               if (r.workload, r.metric) == (metric.workload, metric.name))
            del built
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    if alone_error:
        report.setdefault("errors", []).append(alone_error)
    targets = _targets(metrics, results)
    report["versions"] = _versions()
    report["blas"] = _blas_info()
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["metrics"] = [{"workload": m.workload, "metric": m.name, "unit": m.unit,
                          "description": m.description} for m in metrics]
    report["results"] = [{"workload": r.workload, "metric": r.metric, "impl": r.impl,
                          "unit": r.unit, "kind": r.kind, "work_per_call": r.work,
                          "calls_per_repeat": r.inner, "seconds_per_call": r.times_s,
                          "median": r.median if r.ok else None, "best": r.best if r.ok else None,
                          "scale": r.scale, "note": r.note, "error": r.error} for r in results]
    report["targets"] = targets
    report["table"] = _table(results, targets)
    return report


def _blas_line(blas):
    parts = []
    for b in blas:
        if b.get("user_api") == "blas":
            parts.append(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')} "
                         f"{b.get('num_threads')} threads "
                         f"({os.path.basename(b.get('filepath') or '?')})")
    return "; ".join(parts) or "none found"


def main(argv=None):
    """Entry point of ``fastnn-bench`` and ``python -m fastnn.bench``."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    args.argv = argv
    if from_command_line:
        original_env = _maybe_reexec(args)
        args.reexec = True
    else:
        original_env = _env_record()
        args.reexec = False
    report = run(args, original_env)
    print()
    print(report["table"])
    print()
    print(f"BLAS in use: {_blas_line(report['blas'])}; blas pin "
          f"{'unset for this run' if report['blas_pin_unset'] else 'as found'} "
          f"(at start: {', '.join(f'{k}={original_env.get(k)}' for k in BLAS_PIN_VARS)}); "
          f"load {report['machine']['loadavg_start'][0]:.2f} -> "
          f"{report['machine']['loadavg_end'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
