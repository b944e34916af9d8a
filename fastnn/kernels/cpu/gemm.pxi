# fastnn/kernels/cpu/gemm.pxi -- included by _cpu.pyx.
#
# GEMM and dense layers: who runs a GEMM (fastnn's own AVX-512 float32 kernel,
# csrc/sgemm.c, or BLAS), its epilogue (bias, ReLU, ReLU backward on the tiles),
# GEMMs split in blocks over the worker pool, the one-sample GEMV, and
# dense_forward / dense_backward. Threading: the worker pool for GEMM blocks
# (from 2^23 flops; BLAS held to one thread) and for large one-sample GEMVs;
# BLAS's own threads for GEMMs from 2^27 flops, outside any parallel region;
# one BLAS thread below (see the module docstring of _cpu.pyx).

# Variants (fastnn/kernels/variants.py): each op's code paths have ids (below, and
# V_* in conv.pxi); a chooser picks one per call unless one is forced (0: not
# forced). A forced variant that cannot run a call raises this error there.
cdef int _forced_error(str op, dict variants, int forced, why) except -1:
    """Raise ValueError: the forced variant of ``op`` cannot run this call (``why``)."""
    name = [key for key, value in variants.items() if value == forced][0]
    raise ValueError(f"{op}: variant {name!r} is forced (fastnn.kernels.variants.force or "
                     f"FASTNN_VARIANT_{op.upper()}) but cannot run this call: {why}")


# Who runs float32 GEMMs (op "gemm"): fastnn's own AVX-512 kernel (csrc/sgemm.c) where
# the CPU has AVX-512 and the GEMM is not tiny, else BLAS; "own_packed" is the own
# kernel packing every A (it reads an untransposed A in place otherwise: the same
# bits). float64 GEMMs always run on BLAS.
DEF GEMM_OWN = 1
DEF GEMM_OWN_PACKED = 2
DEF GEMM_BLAS = 3
GEMM_VARIANTS = {"own": GEMM_OWN, "own_packed": GEMM_OWN_PACKED, "blas": GEMM_BLAS}
cdef bint _sgemm_supported = fnn_sgemm_supported()
cdef int _gemm_forced = 0
# From this many flops the own kernel runs a GEMM. One thread, interleaved medians
# (own / OpenBLAS): 1.09-1.29x on the dense, MLP, LeNet and Winograd shapes of W1-W4
# from 2 MFLOP up (98-102 GFLOP/s against 78-91); below, thin ones lose: 128x10x128
# 0.55-0.75x, LeNet's 64x84x120 (1.3 MFLOP) 0.80x. Tuned on: AMD EPYC Zen 4, 2 vCPUs,
# KVM.
DEF OWN_SGEMM_MIN_FLOPS = 2097152.0


cdef str _gemm_why_not(int variant, bint single):
    """None where the GEMM variant can run a GEMM of this dtype, else why not."""
    if variant == GEMM_BLAS:
        return None
    if not _sgemm_supported:
        return "fastnn's own GEMM kernel needs a CPU with AVX-512F and AVX-512VL (and this build)"
    return None if single else "fastnn's own GEMM kernel runs float32 only"


cdef int _check_gemm_forced(bint single) except -1:
    """Raise where the forced GEMM variant cannot run GEMMs of this dtype."""
    if _gemm_forced != 0 and _gemm_why_not(_gemm_forced, single) is not None:
        _forced_error("gemm", GEMM_VARIANTS, _gemm_forced, _gemm_why_not(_gemm_forced, single))
    return 0


cdef void _force_gemm(int variant):
    global _gemm_forced, fnn_sgemm_direct_a
    _gemm_forced = variant
    fnn_sgemm_direct_a = variant != GEMM_OWN_PACKED


def own_sgemm_supported():
    """Whether fastnn's own float32 GEMM kernel runs on this CPU (AVX-512F and VL)."""
    return bool(_sgemm_supported)


cdef inline bint _own_gemm_pick(bint single, double m, double n, double k) noexcept nogil:
    """The chooser: does fastnn's own kernel run this GEMM (float32 when ``single``)?"""
    return single and _sgemm_supported and 2.0 * m * n * k >= OWN_SGEMM_MIN_FLOPS


cdef inline bint _own_gemm(bint single, double m, double n, double k) noexcept nogil:
    """Does fastnn's own kernel run this GEMM: the forced variant, else the chooser's."""
    if _gemm_forced == 0:
        return _own_gemm_pick(single, m, n, k)
    return single and _sgemm_supported and _gemm_forced != GEMM_BLAS


cdef inline void _gemm(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                       const floating *a, int lda, const floating *b, int ldb,
                       floating beta, floating *c, int ldc) noexcept nogil:
    """Row-major c (m, n) = alpha * op(a) @ op(b) + beta * c: fastnn's own float32
    kernel (see _own_gemm) or BLAS, single-threaded or as BLAS's thread count allows.

    BLAS is column-major: row-major C = A @ B is column-major C^T = B^T @ A^T,
    so the operands are swapped and no data moves.
    """
    cdef char op_first = b'T' if trans_b else b'N'
    cdef char op_second = b'T' if trans_a else b'N'
    cdef Py_ssize_t i
    if m == 0 or n == 0:
        return
    if k == 0:                       # BLAS rejects a leading dimension of 0
        for i in range(<Py_ssize_t>m * n):
            c[i] = beta * c[i] if beta != 0 else 0
        return
    if floating is float:
        if _own_gemm(True, m, n, k) and fnn_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda,
                                                   b, ldb, beta, c, ldc) == 0:
            return                   # (it fails only when its buffers cannot be allocated)
        sgemm(&op_first, &op_second, &n, &m, &k, &alpha, <float*>b, &ldb,
              <float*>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&op_first, &op_second, &n, &m, &k, &alpha, <double*>b, &ldb,
              <double*>a, &lda, &beta, c, &ldc)


ctypedef struct _epilogue:           # fnn_epilogue for either dtype (NULL: not wanted)
    const void *bias                 # (n,) added to every row in place of beta * c
    const void *mask                 # (m, n), ldc apart: c = 0 where mask is not > 0
    void *relu                       # (m, n), ldc apart: max(0, c) stored there too


cdef void _gemm_epi(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                    const floating *a, int lda, const floating *b, int ldb, floating beta,
                    floating *c, int ldc, const _epilogue *ep) noexcept nogil:
    """_gemm, then ``ep`` (or NULL): a dense layer's bias and its ReLU forward, or the
    ReLU backward of the layer below its input gradient, done on each C tile in the
    own kernel's registers (W2: the separate passes took 15 us of fc1's forward,
    mostly reading the other core's half of y); elsewhere in passes over c's rows
    (the bias before the GEMM, with beta 1). The same bits either way."""
    cdef fnn_epilogue own
    cdef Py_ssize_t r, rows = 1 if ldc == n else m, cols = <Py_ssize_t>m * n if ldc == n else n
    if ep == NULL or (ep.bias == NULL and ep.mask == NULL and ep.relu == NULL):
        _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return
    if m <= 0 or n <= 0:
        return
    if floating is float:
        if _own_gemm(True, m, n, k):
            own.bias, own.mask, own.relu = <const float*>ep.bias, <const float*>ep.mask, \
                <float*>ep.relu
            if fnn_sgemm_ex(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                            &own) == 0:
                return
    if ep.bias != NULL:
        for r in range(m):
            memcpy(c + r * ldc, ep.bias, n * sizeof(floating))
        beta = 1
    _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    for r in range(rows):           # the ReLU kernels, on all of c when its rows are contiguous
        if floating is float:
            if ep.mask != NULL:
                fnn_relu_backward_f(c + r * ldc, <const float*>ep.mask + r * ldc, c + r * ldc,
                                    cols)
            if ep.relu != NULL:
                fnn_relu_forward_f(c + r * ldc, <float*>ep.relu + r * ldc, cols)
        else:
            if ep.mask != NULL:
                fnn_relu_backward_d(c + r * ldc, <const double*>ep.mask + r * ldc,
                                    c + r * ldc, cols)
            if ep.relu != NULL:
                fnn_relu_forward_d(c + r * ldc, <double*>ep.relu + r * ldc, cols)


def _gemm_into(cnp.ndarray a, cnp.ndarray b, cnp.ndarray c, bint trans_a=False,
               bint trans_b=False, double alpha=1, double beta=0, bint split=False,
               cnp.ndarray bias=None, cnp.ndarray mask=None, cnp.ndarray relu=None):
    """c = alpha * op(a) @ op(b) + beta * c in place through _gemm (or _gemm_split over
    the worker pool), for tests. a, b, c: 2-D, one dtype (float32 or float64), rows
    of unit stride; row strides are the leading dimensions (views may be strided).
    The epilogue (see _gemm_epi): ``bias`` (n,) in place of beta * c; ``mask``: c = 0
    where mask is not > 0; ``relu``: max(0, c) stored there; mask and relu C-contiguous
    (m, n) arrays, for a C-contiguous c."""
    cdef cnp.ndarray arr
    cdef _epilogue ep
    ep.bias = ep.mask = ep.relu = NULL
    for arr, shape in ((bias, (c.shape[1],)), (mask, (<object>c).shape), (relu, (<object>c).shape)):
        if arr is not None and (arr.dtype != c.dtype or (<object>arr).shape != shape
                                or not arr.flags.c_contiguous or not c.flags.c_contiguous):
            raise ValueError("_gemm_into: bias (n,), mask and relu (m, n), C-contiguous, of "
                             "c's dtype, for a C-contiguous c")
    if bias is not None:
        ep.bias = _data(bias)
    if mask is not None:
        ep.mask = _data(mask)
    if relu is not None:
        ep.relu = _data(relu)
    for arr in (a, b, c):
        if arr.ndim != 2 or arr.dtype != c.dtype or arr.strides[1] != arr.itemsize \
                or arr.strides[0] % arr.itemsize or arr.strides[0] < arr.shape[1] * arr.itemsize:
            raise ValueError("_gemm_into: a, b, c must be 2-D of one dtype with unit-stride rows")
    if c.dtype != np.float32 and c.dtype != np.float64:
        raise ValueError(f"_gemm_into: dtype must be float32 or float64, got {c.dtype}")
    _check_gemm_forced(c.dtype == np.float32)
    cdef int m = c.shape[0], n = c.shape[1]
    cdef int k = a.shape[0] if trans_a else a.shape[1]
    if (a.shape[1] if trans_a else a.shape[0]) != m or \
            (b.shape[1] if trans_b else b.shape[0]) != k or \
            (b.shape[0] if trans_b else b.shape[1]) != n:
        raise ValueError(f"_gemm_into: shapes {(<object>a).shape} {(<object>b).shape} -> "
                         f"{(<object>c).shape} do not match")
    cdef int lda = max(1, a.strides[0] // a.itemsize), ldb = max(1, b.strides[0] // b.itemsize)
    cdef int ldc = max(1, c.strides[0] // c.itemsize)
    cdef void *pa = _data(a)
    cdef void *pb = _data(b)
    cdef void *pc = _data(c)
    cdef bint single = c.dtype == np.float32
    with nogil:
        fnn_blas_single_begin()
        if single:
            _gemm_any(split, trans_a, trans_b, m, n, k, <float>alpha, <float*>pa, lda,
                      <float*>pb, ldb, <float>beta, <float*>pc, ldc, &ep)
        else:
            _gemm_any(split, trans_a, trans_b, m, n, k, alpha, <double*>pa, lda, <double*>pb,
                      ldb, beta, <double*>pc, ldc, &ep)
        fnn_blas_single_end()
    return c


DEF MAX_SPLIT_BLOCKS = 64


ctypedef struct _gemm_job:           # one GEMM cut into blocks of c (see _gemm_split)
    bint single, trans_a, trans_b, by_rows
    int m, n, k, lda, ldb, ldc, width
    double alpha, beta
    const void *a
    const void *b
    void *c
    _epilogue ep                     # for the whole of c (see _gemm_epi)


cdef inline void _gemm_block(const _gemm_job *job, Py_ssize_t block, floating kind) noexcept nogil:
    """Rows (by_rows) or columns [j0, j0 + width) of the job's c, j0 = block * width."""
    cdef int j0 = <int>block * job.width
    cdef floating alpha = <floating>job.alpha, beta = <floating>job.beta
    cdef const floating *a = <const floating*>job.a
    cdef const floating *b = <const floating*>job.b
    cdef floating *c = <floating*>job.c
    cdef _epilogue ep = job.ep
    cdef Py_ssize_t at = <Py_ssize_t>j0 * job.ldc if job.by_rows else j0     # the block's corner in c
    if ep.bias != NULL and not job.by_rows:
        ep.bias = <const floating*>ep.bias + j0
    if ep.mask != NULL:
        ep.mask = <const floating*>ep.mask + at
    if ep.relu != NULL:
        ep.relu = <floating*>ep.relu + at
    if job.by_rows:
        _gemm_epi(job.trans_a, job.trans_b, min(job.width, job.m - j0), job.n, job.k, alpha,
                  a + (j0 if job.trans_a else <Py_ssize_t>j0 * job.lda), job.lda, b, job.ldb, beta,
                  c + at, job.ldc, &ep)
    else:
        _gemm_epi(job.trans_a, job.trans_b, job.m, min(job.width, job.n - j0), job.k, alpha,
                  a, job.lda, b + (<Py_ssize_t>j0 * job.ldb if job.trans_b else j0), job.ldb, beta,
                  c + at, job.ldc, &ep)


cdef void _gemm_task(void *ctx, Py_ssize_t block) noexcept nogil:
    cdef const _gemm_job *job = <const _gemm_job*>ctx
    if job.single:
        _gemm_block(job, block, _F32)
    else:
        _gemm_block(job, block, _F64)


cdef int _gemm_plan(_gemm_job *job, bint trans_a, bint trans_b, int m, int n, int k,
                    floating alpha, const floating *a, int lda, const floating *b, int ldb,
                    floating beta, floating *c, int ldc, int most,
                    const _epilogue *ep) noexcept nogil:
    """Fill ``job``, c cut into at most ``most`` blocks (see _gemm_split); returns the
    number of blocks."""
    cdef bint own = _own_gemm(floating is float, m, n, k)
    job.by_rows = m > n
    cdef int extent = m if job.by_rows else n
    # blocks of at least 64 rows or columns: thinner ones waste the packing; the own
    # kernel's columns in whole tiles of 32
    cdef int threads = max(1, min(most, extent // 64))
    cdef int unit = 32 if own and not job.by_rows else 16
    job.width = ((extent + threads - 1) // threads + unit - 1) // unit * unit
    job.single = floating is float
    job.trans_a, job.trans_b = trans_a, trans_b
    job.m, job.n, job.k, job.lda, job.ldb, job.ldc = m, n, k, lda, ldb, ldc
    job.alpha, job.beta = alpha, beta
    job.a, job.b, job.c = a, b, c
    if ep != NULL:
        job.ep = ep[0]
    else:
        job.ep.bias = job.ep.mask = job.ep.relu = NULL
    return (extent + job.width - 1) // job.width


cdef void _gemm_split(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                      const floating *a, int lda, const floating *b, int ldb,
                      floating beta, floating *c, int ldc, const _epilogue *ep) noexcept nogil:
    """_gemm split into one block of c per thread, each block on one BLAS thread (the
    caller holds BLAS to one thread), run by fastnn's worker pool (csrc/pool.c):
    blocks are taken dynamically, so a thread that the scheduler keeps waiting leaves
    its block to the others. Blocks of rows when op(a) is the larger operand, else of
    columns (each thread packs the whole of the other one, so the smaller is packed
    twice). Own kernel, 2 threads, 41 interleaved rounds, rows / columns (GFLOP/s):
    m > n 1024x256x784 203 / 187, 784x256x128 199 / 189, 256x128x128 184 / 170; m < n
    128x256x784 153 / 177. The blocks depend only on the shapes and the thread count,
    so the result does not depend on which thread computes which block, nor on the
    machine's load (an unsplit GEMM can round differently in its tail rows).

    While the other cores are busy elsewhere, the blocks run one after the other on
    the calling thread: the pool does that by itself (it runs jobs on the caller for
    a while after its workers slowed one down)."""
    cdef _gemm_job job
    cdef int count = _gemm_plan(&job, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta,
                                c, ldc, max(1, min(fnn_max_threads(), MAX_SPLIT_BLOCKS)), ep)
    fnn_pool_run(_gemm_task, &job, count)


ctypedef struct _gemm_pair:          # two independent GEMMs as one pool job
    _gemm_job first, second
    int first_blocks


cdef void _gemm_pair_task(void *ctx, Py_ssize_t block) noexcept nogil:
    cdef _gemm_pair *pair = <_gemm_pair*>ctx
    if block < pair.first_blocks:
        _gemm_task(&pair.first, block)
    else:
        _gemm_task(&pair.second, block - pair.first_blocks)


cdef void _gemm_split_pair(bint trans_a1, bint trans_b1, int m1, int n1, int k1,
                           const floating *a1, int lda1, const floating *b1, int ldb1,
                           floating *c1, int ldc1, bint trans_a2, bint trans_b2, int m2,
                           int n2, int k2, const floating *a2, int lda2,
                           const floating *b2, int ldb2, floating *c2, int ldc2,
                           const _epilogue *ep1) noexcept nogil:
    """Two independent GEMMs (alpha 1, beta 0) as one pool job, each in blocks for half
    the threads: on two threads, one whole GEMM per thread, with no operand packed
    twice: a dense layer's grad_x and grad_W (interleaved medians against each GEMM
    split in turn: W1's backward 6.3 / 6.7 ms, W2's second layer 96 / 109 us)."""
    cdef _gemm_pair pair
    cdef int half = max(1, min(fnn_max_threads(), MAX_SPLIT_BLOCKS) // 2)
    pair.first_blocks = _gemm_plan(&pair.first, trans_a1, trans_b1, m1, n1, k1, <floating>1,
                                   a1, lda1, b1, ldb1, <floating>0, c1, ldc1, half, ep1)
    cdef int blocks = pair.first_blocks + _gemm_plan(
        &pair.second, trans_a2, trans_b2, m2, n2, k2, <floating>1, a2, lda2, b2, ldb2,
        <floating>0, c2, ldc2, half, NULL)
    fnn_pool_run(_gemm_pair_task, &pair, blocks)


cdef inline void _gemm_any(bint split, bint trans_a, bint trans_b, int m, int n, int k,
                           floating alpha, const floating *a, int lda, const floating *b,
                           int ldb, floating beta, floating *c, int ldc,
                           const _epilogue *ep=NULL) noexcept nogil:
    if split:
        _gemm_split(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep)
    else:
        _gemm_epi(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep)


# --- dense ------------------------------------------------------------------------

# A GEMM of fewer flops than this runs on one BLAS thread: waking BLAS's sleeping
# workers costs more than they save (LeNet's 64x400x120 dense forward took 17 ms
# threaded on this shared machine and 0.05 ms on one thread), and a threaded GEMM
# of a millisecond or so stalls whenever another process holds the second core
# (the MLP's 128x784x256 GEMMs: 0.43 ms threaded when quiet, 2.5 ms under load,
# against 0.6 ms on one thread; one training pass interleaved 10 times at load
# ~1.9: median 10.7k samples/s with 2^25 here, 48.5k with 2^27). Below m*n*k =
# 65536*4 OpenBLAS stays on one thread by itself, and the thread count is left
# alone (it costs microseconds, which batch-1 inference cannot spare). Tuned on: AMD
# EPYC Zen 4, 2 vCPUs, KVM (the two BLAS_OWN_* values are OpenBLAS 0.3.30's own).
DEF THREADED_GEMM_MIN_FLOPS = 134217728.0     # 2^27, about 1.5 ms on one core
DEF BLAS_OWN_SINGLE_THREAD_MNK = 262144.0
# OpenBLAS threads a GEMV from m*n = 2304 * 4 (GEMM_MULTITHREAD_THRESHOLD); a batch-1
# dense forward holds BLAS to one thread from there: its GEMVs take microseconds, and
# large ones are split over fastnn's pool (_split_gemv) instead.
DEF BLAS_OWN_SINGLE_THREAD_MN = 9216.0


# From 2^23 flops up to the threaded threshold, a GEMM is split over the worker pool
# in blocks, each on one BLAS thread (_gemm_split): a late thread only loses its
# block instead of stalling the GEMM, and after the workers slowed a job down the
# pool runs the next ones on the caller alone. Measured on the MLP of W2 (one pass
# of 12,800 samples, quiet machine, interleaved): from 2^25 (its 128x784x256 GEMMs
# split) median 101k, best 108k samples/s; from 2^23 (also its 128x256x128 ones,
# ~100 us each on one core) 122k / 127k; blocks over OpenMP (passive) from 2^25:
# 106k / 107k. With the other core busy all run about 70k. Tuned on: AMD EPYC Zen 4,
# 2 vCPUs, KVM.
DEF SPLIT_GEMM_MIN_FLOPS = 8388608.0           # 2^23


# A one-sample dense forward whose W has at least this many bytes runs as a GEMV in
# blocks of inputs over the worker pool (each core streams its part of W from its
# own L2). float32 GEMV, quiet machine, 15 interleaved rounds, medians split /
# whole: 256x128 (128 KB) 2.71 / 2.79 us, 384x128 2.34 / 2.41, 512x128 2.72 / 3.47,
# 784x128 3.16 / 4.41, 784x256 5.87 / 10.55; float64 784x256 15.1 / 28.9. With the
# other core busy the pool runs the blocks on the caller: 784x256 10.2 / 9.8 us.
# Tuned on: AMD EPYC Zen 4, 2 vCPUs, KVM.
DEF SPLIT_GEMV_MIN_BYTES = 262144
# The same for fastnn's own float32 GEMV (see _gemv_own). NOT measured to win here: the
# other core was busy with other jobs (load 3-4), so the split's second block mostly
# waited for it or ran on the caller (own split / whole, medians, us: 784x256 5.5-6.6 /
# 5.6-5.8, with the pool's busy flag cleared 6.38 / 6.25; 784x128 3.3-3.4 / 3.2-3.3;
# 512x128 2.3-2.5 / 2.2-2.3). From 512 KB (784x256 splits, 784x128 does not) on the
# estimate that halving 784x256's 4.5 us stream beats the pool's ~1 us, as BLAS's
# split did on a quiet Zen 4 (above); recheck on a quiet machine.
# Tuned on: 2-core Intel Xeon (Sapphire Rapids class, AVX-512), 2026-12-07.
DEF SPLIT_OWN_GEMV_MIN_BYTES = 524288


cdef inline bint _split(double m, double n, double k) noexcept nogil:
    """Split a GEMM kept off BLAS's threads over the worker pool (see _gemm_split)?"""
    return 2.0 * m * n * k >= SPLIT_GEMM_MIN_FLOPS and fnn_max_threads() > 1


cdef inline bint _small_gemm(double m, double n, double k) noexcept nogil:
    """A GEMM that BLAS would thread but should not."""
    return BLAS_OWN_SINGLE_THREAD_MNK <= m * n * k and 2.0 * m * n * k < THREADED_GEMM_MIN_FLOPS


DEF GEMV_SCRATCH = 4096             # outputs of the partial sums of a split GEMV


ctypedef struct _gemv_job:           # one sample's dense forward, cut into blocks of inputs
    bint single, own                 # own: fastnn's own AVX-512 GEMV (float32), else BLAS
    int i, o, rows                   # rows: inputs (rows of W) per block
    const void *x
    const void *weights
    const void *bias
    void *y                          # block 0 adds its product onto the bias here,
    void *partial                    # block b > 0 writes its own to partial[(b-1)*o:]


cdef inline void _gemv(const floating *x, const floating *weights, const floating *bias,
                       floating *y, int i, int o) noexcept nogil:
    """y (o,) = x (i,) @ W (i, o) + bias (NULL: none) for one sample and row-major W,
    which BLAS reads as column-major (o, i). A GEMM would pack all of W first
    (784x256: 20 against 10 us)."""
    cdef floating beta = 0, one = 1
    cdef int inc = 1, k
    cdef char no_trans = b'N'
    if bias != NULL:                 # bias first, then the GEMV adds onto it
        for k in range(o):
            y[k] = bias[k]
        beta = 1
    if floating is float:
        sgemv(&no_trans, &o, &i, &one, <float*>weights, &o, <float*>x, &inc, &beta, y, &inc)
    else:
        dgemv(&no_trans, &o, &i, &one, <double*>weights, &o, <double*>x, &inc, &beta, y, &inc)


cdef bint _own_gemv_supported = fnn_avx512_supported()
# A one-sample float32 dense forward runs on fastnn's own GEMV (csrc/gemv_avx512.c)
# wherever the CPU has AVX-512F: it beat BLAS's sgemv on every shape timed. Shared
# machine (load 2-4 on 2 cores: rough), medians of 7 rounds of timeit of
# dense_forward(x, W, b, True), own / BLAS, whole: 784x256 5.6-5.8 / 7.3-11.4 us (BLAS
# split 8.2-9.8), 784x128 3.2-3.3 / 3.8-5.1, 512x128 2.3 / 2.7-3.4, 384x128 1.8-1.9 /
# 2.6-2.7, 256x128 1.3 / 1.6-1.9, 128x10 0.44 / 0.55. The kernel alone (C loop, W in
# L2): 784x256 4.5 us (178 GB/s) with W 64-byte aligned, 5.3 at numpy's usual 16.
# Tuned on: 2-core Intel Xeon (Sapphire Rapids class, AVX-512), 2026-12-07.


cdef inline void _gemv_own(const float *x, const float *weights, const float *bias,
                           float *y, int i, int o) noexcept nogil:
    """_gemv by fastnn's own AVX-512 kernel (csrc/gemv_avx512.c; only where
    _own_gemv_supported): y (o,) = x (i,) @ W (i, o) + bias (NULL: none), the bias
    copied into y first and the products added onto it."""
    if bias != NULL:
        memcpy(y, bias, o * sizeof(float))
    fnn_sgemv_f(x, weights, o, i, o, y, bias != NULL)


cdef inline void _gemv_block(const _gemv_job *job, Py_ssize_t block, floating kind) noexcept nogil:
    """Block ``block`` of a _gemv_job: its rows of W, onto the bias (block 0) or into
    its own partial sums."""
    cdef Py_ssize_t r0 = block * job.rows, offset = r0 * job.o
    cdef int rows = min(job.rows, job.i - <int>r0)
    cdef const floating *x = <const floating*>job.x + r0
    cdef const floating *weights = <const floating*>job.weights + offset
    cdef const floating *bias = <const floating*>job.bias if block == 0 else NULL
    cdef floating *y = <floating*>job.y if block == 0 else <floating*>job.partial + (block - 1) * job.o
    if floating is float:
        if job.own:
            _gemv_own(x, weights, bias, y, rows, job.o)
            return
    _gemv(x, weights, bias, y, rows, job.o)


cdef void _gemv_task(void *ctx, Py_ssize_t block) noexcept nogil:
    cdef const _gemv_job *job = <const _gemv_job*>ctx
    if job.single:
        _gemv_block(job, block, _F32)
    else:
        _gemv_block(job, block, _F64)


cdef inline int _gemv_blocks(Py_ssize_t i, Py_ssize_t o) noexcept nogil:
    """Blocks of inputs of a split one-sample dense forward: one per thread, of at least
    64 inputs, their partial sums within GEMV_SCRATCH."""
    return <int>max(1, min(fnn_max_threads(), i // 64, 1 + GEMV_SCRATCH // o))


cdef inline bint _split_gemv(Py_ssize_t i, Py_ssize_t o, Py_ssize_t itemsize) noexcept nogil:
    """Split a one-sample dense forward of W (i, o) over the worker pool?"""
    return i * o * itemsize >= SPLIT_GEMV_MIN_BYTES and _gemv_blocks(i, o) > 1


cdef inline bint _split_own_gemv(Py_ssize_t i, Py_ssize_t o) noexcept nogil:
    """Split a one-sample float32 dense forward on the own GEMV over the worker pool?"""
    return i * o * 4 >= SPLIT_OWN_GEMV_MIN_BYTES and _gemv_blocks(i, o) > 1


cdef void _split_gemv_run(const floating *x, const floating *weights, const floating *bias,
                          floating *y, int i, int o, bint own=False) noexcept nogil:
    """_gemv (or, ``own`` and float32, _gemv_own) in blocks of rows of W (contiguous, so each core streams its own part of
    W from its own cache; blocks of output columns would read W in strided pieces, 20%
    slower on one core) over the worker pool, each on one BLAS thread (the caller holds
    BLAS to one thread); y = block 0 + block 1 + ..., in that order. The blocks depend
    only on the shape and the thread count: the same bits whoever runs them."""
    cdef floating partial[GEMV_SCRATCH]
    cdef _gemv_job job
    cdef int count = _gemv_blocks(i, o), block, k
    job.single = floating is float
    job.own = own and floating is float
    job.i, job.o = i, o
    job.rows = ((i + count - 1) // count + 15) // 16 * 16
    count = (i + job.rows - 1) // job.rows
    job.x, job.weights, job.bias, job.y, job.partial = x, weights, bias, y, partial
    fnn_pool_run(_gemv_task, &job, count)
    for block in range(count - 1):
        for k in range(o):
            y[k] += partial[block * o + k]


# dense_forward's variants: one sample's GEMV on BLAS or fastnn's own AVX-512 kernel
# (float32), whole or in blocks of inputs over the pool (_split_gemv_run); a GEMM,
# whole or in blocks over the pool (_gemm_split).
DEF D_GEMV = 1
DEF D_GEMV_SPLIT = 2
DEF D_GEMM = 3
DEF D_GEMM_SPLIT = 4
DEF D_GEMV_OWN = 5
DEF D_GEMV_OWN_SPLIT = 6
DENSE_FORWARD_VARIANTS = {"gemv": D_GEMV, "gemv_split": D_GEMV_SPLIT,
                          "gemv_own": D_GEMV_OWN, "gemv_own_split": D_GEMV_OWN_SPLIT,
                          "gemm": D_GEMM, "gemm_split": D_GEMM_SPLIT}
cdef int _dense_forward_forced = 0


def _dense_forward_empty(Py_ssize_t n, Py_ssize_t o, dtype, b, bint relu):
    """dense_forward where N, I or O is 0 (no GEMM, whatever N is): y (N, O) = b."""
    y = np.zeros((n, o), dtype) if b is None else np.broadcast_to(b, (n, o)).copy()
    return np.maximum(y, 0, out=y) if relu else y


def _dense_backward_empty(cnp.ndarray grad_y, Py_ssize_t i, bint need_grad_x):
    """dense_backward where N, I or O is 0: zero gradients, grad_b the column sums."""
    cdef Py_ssize_t n = grad_y.shape[0], o = grad_y.shape[1]
    cdef cnp.ndarray grad_b = np.empty(o, dtype=grad_y.dtype)
    cdef void *pg = _data(grad_y)
    cdef void *pgb = _data(grad_b)
    if _is_float32(grad_y):
        fnn_column_sums_f(<float*>pg, n, o, <float*>pgb)
    else:
        fnn_column_sums_d(<double*>pg, n, o, <double*>pgb)
    grad_x = np.zeros((n, i), grad_y.dtype) if need_grad_x else None
    return grad_x, np.zeros((i, o), grad_y.dtype), grad_b


cdef int _gemm_dim(str who, Py_ssize_t size, str what) except -1:
    """``size`` as a BLAS dimension (a C int), else ValueError: never truncated."""
    if size > INT_MAX:
        raise ValueError(f"{who}: {what} {size} exceeds the largest GEMM dimension "
                         f"BLAS takes ({INT_MAX})")
    return <int>size


cdef void _dense_forward(const floating *x, const floating *weights, const floating *bias,
                         floating *y, int n, int i, int o, int variant,
                         floating *relu=NULL) noexcept nogil:
    """y (n, o) = x (n, i) @ W (i, o) + bias, and ``relu`` (n, o) = max(y, 0) unless
    NULL, by dense_forward's ``variant`` (D_GEMV* only for n == 1, i > 0, o > 0; the
    own ones only for float32 where _own_gemv_supported)."""
    cdef _epilogue ep
    cdef Py_ssize_t k
    if variant != D_GEMM and variant != D_GEMM_SPLIT:
        if variant == D_GEMV_SPLIT or variant == D_GEMV_OWN_SPLIT:
            _split_gemv_run(x, weights, bias, y, i, o, variant == D_GEMV_OWN_SPLIT)
        elif floating is float and variant == D_GEMV_OWN:
            _gemv_own(x, weights, bias, y, i, o)
        else:
            _gemv(x, weights, bias, y, i, o)
        if relu != NULL:             # relu_forward's rule, here: o is small, and an OpenMP
            for k in range(o):       # region (even of one thread) costs ~0.4 us to enter
                relu[k] = 0 if y[k] < 0 else y[k]
        return
    # the bias and the ReLU on the GEMM's tiles (see _gemm_epi)
    ep.bias, ep.mask, ep.relu = bias, NULL, relu
    _gemm_any(variant == D_GEMM_SPLIT, False, False, n, o, i, 1, x, i, weights, o, 0, y, o,
              &ep)


cdef int _dense_forward_pick(int n, int i, int o, Py_ssize_t itemsize, bint *small) except -1:
    """The chooser: dense_forward's variant for x (n, i) @ W (i, o); sets ``small``
    (BLAS must be held to one thread around it)."""
    cdef bint split
    if n == 1:                       # BLAS would thread a GEMV of this size by itself
        small[0] = <double>i * o >= BLAS_OWN_SINGLE_THREAD_MN and blas_thread_control()
        if i == 0 or o == 0:
            return D_GEMM
        if itemsize == 4 and _own_gemv_supported:      # no BLAS call to hold
            split, small[0] = _split_own_gemv(i, o), False
            return D_GEMV_OWN_SPLIT if split else D_GEMV_OWN
        split = small[0] and _split_gemv(i, o, itemsize)
        return D_GEMV_SPLIT if split else D_GEMV
    small[0] = _small_gemm(n, i, o) and blas_thread_control()
    split = (small[0] or _own_gemm(itemsize == 4, n, i, o)) and _split(n, i, o)
    return D_GEMM_SPLIT if split else D_GEMM


cdef str _dense_forward_cpu_why_not(int variant):
    """None where this CPU and build can run dense_forward's ``variant`` at all."""
    if (variant == D_GEMV_OWN or variant == D_GEMV_OWN_SPLIT) and not _own_gemv_supported:
        return "fastnn's own GEMV needs a CPU with AVX-512F (and this build)"
    return None


cdef str _dense_forward_why_not(int variant, int n, int i, int o, bint single):
    """None where dense_forward's ``variant`` can run x (n, i) @ W (i, o) of float32
    (``single``) or float64, else why not."""
    if variant == D_GEMM or variant == D_GEMM_SPLIT:
        return None
    if _dense_forward_cpu_why_not(variant) is not None:
        return _dense_forward_cpu_why_not(variant)
    if (variant == D_GEMV_OWN or variant == D_GEMV_OWN_SPLIT) and not single:
        return "fastnn's own GEMV runs float32 only"
    if not (n == 1 and i > 0 and o > 0):
        return f"a GEMV needs one sample, inputs and outputs, got x ({n}, {i}), W ({i}, {o})"
    return None


cdef int _dense_forward_variant(int n, int i, int o, Py_ssize_t itemsize, bint *small) except -1:
    """The variant dense_forward runs: the forced one, else the chooser's; sets ``small``
    (a forced split also holds BLAS to one thread, where it can)."""
    cdef int variant = _dense_forward_pick(n, i, o, itemsize, small)
    if _dense_forward_forced == 0:
        return variant
    why = _dense_forward_why_not(_dense_forward_forced, n, i, o, itemsize == 4)
    if why is not None:
        _forced_error("dense_forward", DENSE_FORWARD_VARIANTS, _dense_forward_forced, why)
    if n == 1:                       # BLAS's rule for a forced BLAS path; the own GEMV has none
        small[0] = (_dense_forward_forced != D_GEMV_OWN and _dense_forward_forced !=
                    D_GEMV_OWN_SPLIT and <double>i * o >= BLAS_OWN_SINGLE_THREAD_MN
                    and blas_thread_control())
    if _dense_forward_forced == D_GEMV_SPLIT or _dense_forward_forced == D_GEMM_SPLIT:
        small[0] = small[0] or blas_thread_control()
    return _dense_forward_forced


def dense_forward(cnp.ndarray x, cnp.ndarray W, b, bint relu=False):
    """x: (N, I), W: (I, O), b: (O,) or None -> y (N, O) = x @ W + b, then max(y, 0)
    when ``relu`` (the bits of relu_forward(dense_forward(x, W, b))): one GEMM (own
    kernel in blocks over the worker pool, or BLAS, see the module docstring), the bias
    and the ReLU on the own kernel's tiles (else the bias pre-broadcast, beta = 1, and
    the ReLU in a pass over y); one sample: a GEMV, in slices over the worker pool when
    W is large."""
    cdef int t = _float_input("dense_forward", "x", x, (None, None))
    _need("dense_forward", "W", W, t, (x.shape[1], None))
    if b is not None:
        _need("dense_forward", "b", b, t, (W.shape[1],))
    if x.shape[0] == 0 or x.shape[1] == 0 or W.shape[1] == 0:   # no product: the bias alone
        return _dense_forward_empty(x.shape[0], W.shape[1], x.dtype, b, relu)
    cdef int n = _gemm_dim("dense_forward", x.shape[0], "batch size")
    cdef int i = _gemm_dim("dense_forward", x.shape[1], "input features")
    cdef int o = _gemm_dim("dense_forward", W.shape[1], "output features")
    cdef cnp.ndarray y = _output_array((n, o), x.dtype)
    cdef void *px = _data(x)
    cdef void *pw = _data(W)
    cdef void *pb = NULL if b is None else _data(b)
    cdef void *py = _data(y)
    cdef void *pr = py if relu else NULL         # the ReLU in place, over y
    cdef bint single = _is_float32(x)
    cdef bint small
    _check_gemm_forced(single)
    cdef int variant = _dense_forward_variant(n, i, o, x.itemsize, &small)
    with nogil:
        if small:
            fnn_blas_single_begin()
        if single:
            _dense_forward(<float*>px, <float*>pw, <float*>pb, <float*>py, n, i, o, variant,
                           <float*>pr)
        else:
            _dense_forward(<double*>px, <double*>pw, <double*>pb, <double*>py, n, i, o, variant,
                           <double*>pr)
        if small:
            fnn_blas_single_end()
    return y


cdef void _dense_backward(const floating *grad_y, const floating *x, const floating *weights,
                          floating *grad_x, floating *grad_w, floating *grad_b,
                          int n, int i, int o, bint split=False,
                          bint pair=False, const floating *relu_y=NULL) noexcept nogil:
    """``split``: each GEMM in blocks over the pool; ``pair`` (with grad_x): the two
    GEMMs as one pool job, side by side (_gemm_split_pair). ``relu_y`` (n, i), unless
    NULL: x is a ReLU's output, y, and grad_x comes through its backward (0 where y is
    not > 0; on the GEMM's tiles, see _gemm_epi)."""
    cdef _epilogue ep
    ep.bias, ep.mask, ep.relu = NULL, relu_y, NULL
    if pair and grad_x != NULL:      # grad_y @ W.T and x.T @ grad_y side by side
        _gemm_split_pair(False, True, n, i, o, grad_y, o, weights, o, grad_x, i,
                         True, False, i, o, n, x, i, grad_y, o, grad_w, o, &ep)
    else:
        if grad_x != NULL:
            _gemm_any(split, False, True, n, i, o, 1, grad_y, o, weights, o, 0, grad_x, i,
                      &ep)
        _gemm_any(split, True, False, i, o, n, 1, x, i, grad_y, o, 0, grad_w, o)
    if floating is float:
        fnn_column_sums_f(grad_y, n, o, grad_b)
    else:
        fnn_column_sums_d(grad_y, n, o, grad_b)


# dense_backward's variants: its two GEMMs in turn, each whole or in blocks over the
# pool, or side by side as one pool job (_gemm_split_pair; with grad_x only).
DEF D_SERIAL = 1
DEF D_SPLIT = 2
DEF D_PAIR = 3
DENSE_BACKWARD_VARIANTS = {"serial": D_SERIAL, "split": D_SPLIT, "pair": D_PAIR}
cdef int _dense_backward_forced = 0
# both GEMMs of a small dense backward, see below. Tuned on: AMD EPYC Zen 4, 2 vCPUs, KVM.
DEF PAIR_MIN_FLOPS = 262144.0


cdef int _dense_backward_pick(int n, int i, int o, bint single, bint need_grad_x,
                              bint blas_control, bint *small) noexcept:
    """The chooser: dense_backward's variant; sets ``small`` (BLAS must be held to one
    thread around it)."""
    small[0] = _small_gemm(n, i, o) and blas_control
    cdef bint pooled = small[0] or _own_gemm(single, n, i, o)     # kept off BLAS's threads
    # the pair from the split size of both GEMMs together: LeNet's 64x400x120 backward
    # 141 us on one thread, about 70 on two
    if pooled and need_grad_x and _split(2.0 * n, i, o):
        return D_PAIR
    if (need_grad_x and blas_control and fnn_max_threads() > 1
            and 4.0 * n * i * o >= PAIR_MIN_FLOPS
            and 2.0 * n * i * o < THREADED_GEMM_MIN_FLOPS):
        # two GEMMs too small to split, each worth a thread of its own: side by side,
        # BLAS held to one thread (interleaved medians, serial / pair: W2's 128x128x10
        # output layer 10.3 / 6.9 us, LeNet's 64x120x84 29.6 / 18.9, 32x64x32 4.6 /
        # 4.0; on two threads each GEMM whole on its own: the serial calls' bits)
        small[0] = True
        return D_PAIR
    return D_SPLIT if pooled and _split(n, i, o) else D_SERIAL


cdef int _dense_backward_variant(int n, int i, int o, bint single, bint need_grad_x,
                                 bint *small) except -1:
    """The variant dense_backward runs: the forced one, else the chooser's; sets
    ``small`` (a forced split or pair also holds BLAS to one thread, where it can)."""
    cdef bint control = blas_thread_control()
    cdef int variant = _dense_backward_pick(n, i, o, single, need_grad_x, control, small)
    if _dense_backward_forced == 0:
        return variant
    if _dense_backward_forced == D_PAIR and not need_grad_x:
        _forced_error("dense_backward", DENSE_BACKWARD_VARIANTS, D_PAIR,
                      "the pair runs grad_x's GEMM beside grad_W's: needs need_grad_x=True")
    if _dense_backward_forced != D_SERIAL:
        small[0] = small[0] or control
    return _dense_backward_forced


def dense_backward(cnp.ndarray grad_y, cnp.ndarray x, cnp.ndarray W, bint need_grad_x=True,
                   bint relu_x=False):
    """-> (grad_x (N, I) or None, grad_W (I, O), grad_b (O,)): two GEMMs (one without
    grad_x), side by side over the worker pool when both are worth a thread (else each
    threaded as in dense_forward), and a column sum. ``relu_x``: x is the output of a
    ReLU, whose backward is fused into grad_x's GEMM (0 where x is not > 0, on the own
    kernel's tiles, else in a pass): the bits of relu_backward(grad_x, x)."""
    cdef int t = _float_input("dense_backward", "x", x, (None, None))
    _need("dense_backward", "W", W, t, (x.shape[1], None))
    _need("dense_backward", "grad_y", grad_y, t, (x.shape[0], W.shape[1]))
    if x.shape[0] == 0 or x.shape[1] == 0 or W.shape[1] == 0:   # no product: zeros, bias sums
        return _dense_backward_empty(grad_y, x.shape[1], need_grad_x)
    cdef int n = _gemm_dim("dense_backward", x.shape[0], "batch size")
    cdef int i = _gemm_dim("dense_backward", x.shape[1], "input features")
    cdef int o = _gemm_dim("dense_backward", W.shape[1], "output features")
    cdef cnp.ndarray grad_x = _output_array((n, i), x.dtype) if need_grad_x else None
    cdef cnp.ndarray grad_w = _output_array((i, o), x.dtype)
    cdef cnp.ndarray grad_b = np.empty(o, dtype=x.dtype)
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(x)
    cdef void *pw = _data(W)
    cdef void *pgx = _data(grad_x) if need_grad_x else NULL
    cdef void *pgw = _data(grad_w)
    cdef void *pgb = _data(grad_b)
    cdef void *pm = px if relu_x else NULL
    cdef bint single = _is_float32(x)
    cdef bint small
    _check_gemm_forced(single)
    cdef int variant = _dense_backward_variant(n, i, o, single, need_grad_x, &small)
    cdef bint split = variant == D_SPLIT, pair = variant == D_PAIR
    with nogil:
        if small:
            fnn_blas_single_begin()
        if single:
            _dense_backward(<float*>pg, <float*>px, <float*>pw, <float*>pgx, <float*>pgw,
                            <float*>pgb, n, i, o, split, pair, <float*>pm)
        else:
            _dense_backward(<double*>pg, <double*>px, <double*>pw, <double*>pgx, <double*>pgw,
                            <double*>pgb, n, i, o, split, pair, <double*>pm)
        if small:
            fnn_blas_single_end()
    return grad_x, grad_w, grad_b
