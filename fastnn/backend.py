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
           "to_device", "device_of", "compiled_error", "cupy", "allow_tf32"]

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


def allow_tf32(enabled=None):
    """Whether float32 GEMMs on the GPU may use TF32 tensor cores; ``allow_tf32(True)`` allows it.

    Off by default: float32 results then agree with the CPU to float32
    round-off. On, convolutions and dense layers run on the tensor cores with
    about 1e-3 relative error, as PyTorch's cuDNN convolutions do by default
    (``torch.backends.cudnn.allow_tf32``). ``FASTNN_TF32=1`` turns it on at import.
    ``enabled``: True / False sets it, None only asks; returns the setting in effect.
    """
    from .kernels import _cuda
    if enabled is not None:
        _cuda.set_tf32(enabled)
    return _cuda.tf32_enabled()


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
    """Choose the kernels NumPy arrays run: ``name`` is ``"cpu"`` (compiled, the default)
    or ``"numpy"`` (the pure-NumPy reference). CuPy arrays always run the CUDA kernels.

    >>> from fastnn import backend
    >>> backend.use("numpy"); backend.current()
    'numpy'
    >>> backend.use("cpu")
    """
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
    """True when ``x`` is a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def get_array_module(x):
    """``cupy`` when ``x`` is a CuPy array, ``numpy`` otherwise (Chainer's idiom)."""
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
        return x if is_cuda_array(x) else _host_to_cuda(cp, x)
    raise ValueError(f"expected device 'cpu' or 'cuda', got {device!r}")


def convert(x, target):
    """``x`` moved to device ``target`` (``"cpu"`` or ``"cuda"``) or, for ``"float32"`` /
    ``"float64"``, cast to that dtype on its device; a no-op where it already is. None
    stays None."""
    if target in ("float32", "float64"):
        return None if x is None else x.astype(target, copy=False)
    return to_device(x, target)


# --- host -> GPU copies: asynchronous on the current stream ---------------------------------
# A plain cupy.asarray of pageable host memory is a synchronous copy: it waits for
# every kernel already queued, so the CPU cannot launch the next training step
# while the GPU finishes this one. Large arrays are staged through two pinned
# buffers used in turn (an event tells when the copy that last read a buffer is
# done); small ones go through the driver's own staging, which does not wait.
_STAGING_MIN_BYTES = 1 << 16
_staging = [None, None]          # [pinned memory, capacity in bytes, cupy Event]
_staging_turn = 0


def _host_to_cuda(cp, x):
    """A CuPy copy of host array ``x``, queued asynchronously on the current stream."""
    global _staging_turn
    x = np.ascontiguousarray(x)
    if x.size == 0:
        return cp.asarray(x)
    out = cp.empty(x.shape, dtype=x.dtype)
    stream = cp.cuda.get_current_stream()
    if x.nbytes < _STAGING_MIN_BYTES:
        out.set(x, stream=stream)
        return out
    slot = _staging[_staging_turn]
    if slot is None or slot[1] < x.nbytes:
        if slot is not None:
            slot[2].synchronize()
        slot = [cp.cuda.alloc_pinned_memory(x.nbytes), x.nbytes, cp.cuda.Event()]
        _staging[_staging_turn] = slot
    else:
        slot[2].synchronize()        # the copy that last read this buffer has finished
    _staging_turn ^= 1
    staging = np.frombuffer(slot[0], dtype=x.dtype, count=x.size).reshape(x.shape)
    np.copyto(staging, x)
    out.set(staging, stream=stream)
    slot[2].record(stream)
    return out
