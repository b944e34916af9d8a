"""Backends: which implementation a kernel runs, and on which device an array lives.

Three implementations of every kernel exist:

- ``"cpu"``   compiled C/Cython kernels (default when the extension imported),
- ``"numpy"`` the pure-NumPy reference (``fastnn.kernels._reference``),
- ``"cuda"``  CuPy kernels, chosen automatically for CuPy arrays.

``use`` picks between the two CPU implementations for NumPy arrays; CuPy
arrays always run the CUDA kernels.
"""
import warnings

import numpy as np

__all__ = ["available", "use", "current", "get_array_module", "is_cuda_array",
           "to_device", "device_of", "compiled_error", "cupy"]

# --- compiled CPU extension -------------------------------------------------


def _import_compiled():
    """Import the extension with libgomp's idle workers set to sleep, not spin.

    libgomp reads OMP_WAIT_POLICY once, when the extension loads it. Its default
    spins idle workers after each parallel region; on a machine shared with other
    threads (NumPy's BLAS, other processes) the spinners steal the cores those
    need and a barrier waits on descheduled spinners: measured here with a loaded
    2-core machine, 20 small dense kernels took 244 ms spinning against 26 ms
    passive, and a NumPy matmul right after a fastnn kernel 71 against 53 ms.
    The policy is set only for the import (libgomp has read it by then), and
    never when the user chose one (OMP_WAIT_POLICY or GOMP_SPINCOUNT).
    """
    import os
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if not chosen:
        os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        from .kernels import _cpu
    finally:
        if not chosen:
            del os.environ["OMP_WAIT_POLICY"]
    return _cpu


try:
    _compiled = _import_compiled()
    _COMPILED_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _compiled = None
    _COMPILED_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "fastnn: the compiled CPU kernels could not be imported "
        f"({_COMPILED_ERROR}); running on the slower NumPy reference kernels. "
        "Reinstall with a working C compiler (pip install .) to get them.",
        RuntimeWarning, stacklevel=2)

_current = "cpu" if _compiled is not None else "numpy"

# --- optional CuPy ------------------------------------------------------------
_cupy = None
_cuda_checked = False
_cuda_error = None


def cupy():
    """Return the ``cupy`` module if a CUDA device is really usable, else None."""
    global _cupy, _cuda_checked, _cuda_error
    if not _cuda_checked:
        _cuda_checked = True
        try:
            import cupy as cp
            if cp.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no CUDA device found")
            (cp.arange(4, dtype=cp.float32) * 2).sum().item()  # a real launch
            _cupy = cp
        except Exception as exc:  # ImportError, CUDA driver errors, ...
            _cuda_error = f"{type(exc).__name__}: {exc}"
            _cupy = None
    return _cupy


def compiled_error():
    """Why the compiled CPU kernels are unavailable (None when they loaded)."""
    return _COMPILED_ERROR


def available():
    """List the usable backends, e.g. ``["cpu", "numpy"]`` or ``["cpu", "numpy", "cuda"]``."""
    names = []
    if _compiled is not None:
        names.append("cpu")
    names.append("numpy")
    if cupy() is not None:
        names.append("cuda")
    return names


def use(name):
    """Choose the kernels NumPy arrays run: ``"cpu"`` (compiled) or ``"numpy"`` (reference)."""
    global _current
    if name not in ("cpu", "numpy"):
        raise ValueError(f"backend.use: expected 'cpu' or 'numpy', got {name!r} "
                         "(CuPy arrays always run the CUDA kernels)")
    if name == "cpu" and _compiled is None:
        raise ValueError(f"backend.use('cpu'): the compiled kernels are unavailable ({_COMPILED_ERROR})")
    _current = name


def current():
    """The implementation NumPy arrays run now: ``"cpu"`` or ``"numpy"``."""
    return _current


def is_cuda_array(x):
    """True for a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def get_array_module(x):
    """``cupy`` for CuPy arrays, ``numpy`` otherwise (Chainer's idiom)."""
    if is_cuda_array(x):
        import cupy as cp
        return cp
    return np


def device_of(x):
    """``"cuda"`` or ``"cpu"``: where array ``x`` lives."""
    return "cuda" if is_cuda_array(x) else "cpu"


def to_device(x, device):
    """Return ``x`` on ``device`` (``"cpu"`` or ``"cuda"``); a no-op when already there."""
    if x is None:
        return None
    if device == "cpu":
        return x.get() if is_cuda_array(x) else x
    if device == "cuda":
        cp = cupy()
        if cp is None:
            raise RuntimeError(f"device 'cuda' is not usable here ({_cuda_error})")
        return x if is_cuda_array(x) else cp.asarray(x)
    raise ValueError(f"expected device 'cpu' or 'cuda', got {device!r}")
