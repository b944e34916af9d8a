# fastnn/kernels/cpu/variants.pxi -- included by _cpu.pyx.
#
# The variant registry's compiled half (fastnn/kernels/variants.py is the public API):
# each op's variants by name, which one is forced, and what the choosers pick. The
# choosers and what each variant needs live beside the code they choose for
# (conv.pxi, gemm.pxi). Threading: none; forcing is process-wide state, set from
# Python with the GIL held.

VARIANTS = {"conv2d_forward": CONV_FORWARD_VARIANTS,
            "conv2d_backward": CONV_BACKWARD_VARIANTS,
            "gemm": GEMM_VARIANTS,
            "dense_forward": DENSE_FORWARD_VARIANTS,
            "dense_backward": DENSE_BACKWARD_VARIANTS,
            "row_kernels": ROW_KERNEL_VARIANTS,
            "sgd_step": SGD_VARIANTS}
# forced variants of the ops whose choice is the CPU's alone (AVX-512 or not)
cdef dict _cpu_only_forced = {"row_kernels": 0, "sgd_step": 0}


cdef int _forced_id(str op):
    if op in _cpu_only_forced:
        return _cpu_only_forced[op]
    if op == "conv2d_forward":
        return _conv_forward_forced
    if op == "conv2d_backward":
        return _conv_backward_forced
    if op == "gemm":
        return _gemm_forced
    return _dense_forward_forced if op == "dense_forward" else _dense_backward_forced


def _forced_variant(str op):
    """The name of the variant of ``op`` forced now, or None (the chooser's)."""
    cdef int forced = _forced_id(op)
    return None if forced == 0 else [k for k, v in VARIANTS[op].items() if v == forced][0]


def _force_variant(str op, name):
    """Force variant ``name`` of ``op`` for every later call (None: the chooser again);
    returns the name forced before (or None). ValueError where this CPU or build cannot
    run that variant at all."""
    global _dense_forward_forced, _dense_backward_forced
    old = _forced_variant(op)
    cdef int variant = 0 if name is None else VARIANTS[op][name]
    why = _cpu_why_not(op, variant)
    if why is not None:
        raise ValueError(f"{op}: variant {name!r} cannot run here: {why}")
    if name == "direct" and not _direct_conv_supported():
        raise ValueError(f"{op}: variant 'direct' cannot run here: needs a CPU with AVX2 + FMA "
                         "(and a GCC build)")
    if op in _cpu_only_forced:
        _force_cpu_only(op, variant)
    elif op.startswith("conv2d_"):
        _force_conv(op == "conv2d_backward", variant)
    elif op == "gemm":
        _force_gemm(variant)
    elif op == "dense_forward":
        _dense_forward_forced = variant
    else:
        _dense_backward_forced = variant
    fnn_pool_set_busy(0)         # a forced split goes to the pool's workers first
    return old


cdef str _cpu_why_not(str op, int variant):
    """None where this CPU and build can run ``variant`` of ``op`` at all, else why not."""
    if op == "gemm" and variant != 0:
        return _gemm_why_not(variant, True)
    if op == "dense_forward":
        return _dense_forward_cpu_why_not(variant)
    if op == "row_kernels" and variant == 1 and not fnn_avx512_supported():
        return "needs a CPU with AVX-512F (and this build)"
    if op == "sgd_step" and variant == 1 and not _sgemm_supported:
        return "needs a CPU with AVX-512F and AVX-512VL (and this build)"
    return None


cdef void _force_cpu_only(str op, int variant):
    global fnn_avx512_rows, _avx_sgd
    _cpu_only_forced[op] = variant
    if op == "row_kernels":
        fnn_avx512_rows = variant != 2
    else:
        _avx_sgd = variant != 2


def _cpu_variants(str op):
    """(the chooser's variant, {variant: None where it can run, else why not}) of an op
    whose choice is the CPU's alone (row_kernels, sgd_step): AVX-512 where it has it."""
    why = {name: _cpu_why_not(op, v) for name, v in VARIANTS[op].items()}
    return ("avx512" if why["avx512"] is None else "portable"), why


def _gemm_variants(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, dtype):
    """(the chooser's variant, {variant: None where it can run, else why not}) for a
    GEMM (m, k) @ (k, n) of ``dtype``."""
    cdef bint single = np.dtype(dtype) == np.float32
    pick = "own" if _own_gemm_pick(single, m, n, k) else "blas"
    return pick, {name: _gemm_why_not(v, single) for name, v in GEMM_VARIANTS.items()}


def _dense_variants(bint backward, int n, int i, int o, dtype, bint need_grad_x=True):
    """(the chooser's variant, {variant: None where it can run, else why not}) of
    dense_backward (``backward``) or dense_forward for x (n, i) and W (i, o)."""
    cdef bint single = np.dtype(dtype) == np.float32, small
    cdef int pick
    if backward:
        pick = _dense_backward_pick(n, i, o, single, need_grad_x, blas_thread_control(), &small)
        why = {name: None for name in DENSE_BACKWARD_VARIANTS}
        if not need_grad_x:
            why["pair"] = "the pair runs grad_x's GEMM beside grad_W's: needs need_grad_x=True"
        return [k for k, v in DENSE_BACKWARD_VARIANTS.items() if v == pick][0], why
    pick = _dense_forward_pick(n, i, o, np.dtype(dtype).itemsize, &small)
    why = {}
    for name, variant in DENSE_FORWARD_VARIANTS.items():
        why[name] = _dense_forward_why_not(variant, n, i, o, single)
    return [k for k, v in DENSE_FORWARD_VARIANTS.items() if v == pick][0], why
