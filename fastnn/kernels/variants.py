"""Named variants of the compiled CPU kernels: list them, ask which apply and which the
chooser picks, force one (for tests and benchmarks).

An op's variants are its code paths; a chooser picks one per call from the shapes, the
dtype and the CPU, with thresholds timed on one machine (each says which, in
``fastnn/kernels/cpu/*.pxi``). Ops and variants:

- ``conv2d_forward``: ``winograd`` (F(2x2, 3x3)), ``direct`` (float32, AVX2 + FMA),
  ``pointwise`` (1x1 stride 1, no padding), ``rows`` (patch rows + GEMM), ``columns``
  (im2col columns + GEMM), ``implicit`` (float32, AVX-512, stride 1: the patch rows'
  GEMM reading the patches in place, no patch matrix);
- ``conv2d_backward``: ``winograd``, ``direct`` (grad_W by the direct conv),
  ``pointwise``, ``rows_transposed`` (grad_W on patch rows, grad_x as the transposed
  conv), ``rows_col2im`` (grad_W on patch rows, grad_x by col2im), ``columns``,
  ``implicit`` (grad_W by the implicit GEMM, grad_x by col2im, or from 12 input channels
  summed tap by tap into the padded sample);
- ``gemm`` (every float32 GEMM of the kernels above and below): ``own`` (fastnn's
  AVX-512 kernel), ``own_packed`` (the same, every A packed), ``blas``;
- ``dense_forward``: ``gemv``, ``gemv_split`` (one sample on BLAS's GEMV; the split
  runs blocks of inputs over the worker pool), ``gemv_own``, ``gemv_own_split`` (the
  same on fastnn's own AVX-512 GEMV, float32), ``gemm``, ``gemm_split`` (blocks of the
  GEMM over the pool);
- ``dense_backward``: ``serial`` (the two GEMMs in turn), ``split`` (each in blocks over
  the pool), ``pair`` (both as one pool job; with grad_x only);
- ``row_kernels`` (the float32 loops of softmax_cross_entropy's rows, all_finite and the
  dropout masks) and ``sgd_step`` (float32 momentum steps): ``avx512``, ``portable``;
  the CPU alone decides (no geometry), and float64 has one loop.

What "this CPU" has is what the run-time checks answer, capped by
``FASTNN_CPU_FEATURES`` (read once at import): ``avx2`` leaves out every AVX-512 variant
(``own``, ``own_packed``, ``avx512``, ``implicit``), ``portable`` the direct conv too, as on
an older CPU.

Geometry keywords: conv ops ``x_shape, w_shape, stride=1, padding=0, dtype``; ``gemm``
``m, n, k, dtype``; dense ops ``x_shape, w_shape, dtype`` (and ``need_grad_x=True`` for
dense_backward). ``force(op, name)`` is a context manager; ``FASTNN_VARIANT_<OP>=name``
in the environment (e.g. ``FASTNN_VARIANT_CONV2D_FORWARD=winograd``,
``FASTNN_VARIANT_GEMM=blas``) forces a variant from import on. A forced variant that
cannot run a call makes that call raise ValueError naming the op, the variant and why.
"""
import contextlib
import os

import numpy as np

OPS = ("conv2d_forward", "conv2d_backward", "gemm", "dense_forward", "dense_backward",
       "row_kernels", "sgd_step")


def _cpu():
    from . import _cpu as module      # ImportError where the extension is not built
    return module


def _check_op(op, name=None):
    if op not in OPS:
        raise ValueError(f"fastnn.kernels.variants: op must be one of {list(OPS)}, got {op!r}")
    if name is not None and name not in _cpu().VARIANTS[op]:
        raise ValueError(f"fastnn.kernels.variants: {op} has no variant {name!r} (it has "
                         f"{list(_cpu().VARIANTS[op])})")


def names(op):
    """The variants of ``op``, as a tuple of names."""
    _check_op(op)
    return tuple(_cpu().VARIANTS[op])


def _pairs(stride, padding):
    from . import pair
    return (pair(stride, "stride", "fastnn.kernels.variants", 1),
            pair(padding, "padding", "fastnn.kernels.variants", 0))


def _report(op, **geometry):
    """(the chooser's pick, {variant: None where it applies, else why not})."""
    _check_op(op)
    cpu = _cpu()
    if op in ("row_kernels", "sgd_step"):
        return cpu._cpu_variants(op)
    if op == "gemm":
        return cpu._gemm_variants(geometry["m"], geometry["n"], geometry["k"],
                                  geometry.get("dtype", np.float32))
    dtype = geometry.get("dtype", np.float32)
    x_shape, w_shape = tuple(geometry["x_shape"]), tuple(geometry["w_shape"])
    if op.startswith("conv2d_"):
        stride, padding = _pairs(geometry.get("stride", 1), geometry.get("padding", 0))
        return cpu._conv_variants(op == "conv2d_backward", x_shape, w_shape, stride, padding,
                                  dtype)
    return cpu._dense_variants(op == "dense_backward", x_shape[0], x_shape[1], w_shape[1],
                               dtype, geometry.get("need_grad_x", True))


def why_not(op, name, **geometry):
    """None where variant ``name`` of ``op`` can run these arguments, else why not."""
    _check_op(op, name)
    return _report(op, **geometry)[1][name]


def applicable(op, **geometry):
    """The variants of ``op`` that can run these arguments on this CPU (a tuple)."""
    return tuple(name for name, why in _report(op, **geometry)[1].items() if why is None)


def chosen(op, **geometry):
    """The variant that ``op``'s chooser picks for these arguments (forced or not)."""
    return _report(op, **geometry)[0]


def forced(op):
    """The variant of ``op`` forced now, or None."""
    _check_op(op)
    return _cpu()._forced_variant(op)


@contextlib.contextmanager
def force(op, name):
    """Run every call of ``op`` inside the block on variant ``name`` (None: the
    chooser's), restoring the previous setting after. ValueError at once for an unknown
    op or name or a variant this CPU cannot run; at the call for one that cannot run
    that call's arguments."""
    _check_op(op, name)
    old = _cpu()._force_variant(op, name)
    try:
        yield
    finally:
        _cpu()._force_variant(op, old)


def _apply_environment():
    """Force the variants named by FASTNN_VARIANT_<OP> (called once, at import)."""
    for op in OPS:
        name = os.environ.get(f"FASTNN_VARIANT_{op.upper()}")
        if name:
            try:
                _check_op(op, name)
                _cpu()._force_variant(op, name)
            except ValueError as exc:
                raise ValueError(f"FASTNN_VARIANT_{op.upper()}={name}: {exc}") from None


try:
    _cpu()
except ImportError:      # the NumPy reference only: nothing to choose (backend warns)
    pass
else:
    _apply_environment()
