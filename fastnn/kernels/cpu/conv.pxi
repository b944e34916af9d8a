# fastnn/kernels/cpu/conv.pxi -- included by _cpu.pyx.
#
# Convolution: im2col/col2im, the conv chooser (Winograd F(2x2, 3x3), direct conv
# for few output channels, patch rows or im2col columns + GEMM) and the forward and
# backward passes. Threading: conv samples (forward) and fixed sample chunks
# (backward) over the worker pool with BLAS held to one thread
# (_sample_threads; samples in turn with BLAS threading each GEMM when the hold
# is impossible or the batch is 1); Winograd: OpenMP over blocks of tiles, the
# same hold; public im2col/col2im: OpenMP inside the C kernels.

cdef inline void _im2col(const floating *x, Py_ssize_t n, const fnn_geometry *g, floating *cols,
                         Py_ssize_t ld, int parallel) noexcept nogil:
    if floating is float:
        fnn_im2col_f(x, n, g, cols, ld, parallel)
    else:
        fnn_im2col_d(x, n, g, cols, ld, parallel)


cdef inline void _col2im(const floating *cols, Py_ssize_t n, const fnn_geometry *g, floating *x,
                         Py_ssize_t ld, int parallel) noexcept nogil:
    if floating is float:
        fnn_col2im_f(cols, n, g, x, ld, parallel)
    else:
        fnn_col2im_d(cols, n, g, x, ld, parallel)


cdef inline void _pad_rows(const floating *a, Py_ssize_t planes, Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t wp,
                           floating *out) noexcept nogil:
    if floating is float:
        fnn_pad_rows_f(a, planes, oh, ow, wp, out)
    else:
        fnn_pad_rows_d(a, planes, oh, ow, wp, out)


cdef inline void _col2im_rows(const floating *cols, const fnn_geometry *g, floating *x,
                              floating *work) noexcept nogil:
    if floating is float:
        fnn_col2im_rows_f(cols, g, x, work)
    else:
        fnn_col2im_rows_d(cols, g, x, work)


cdef inline void _im2row(const floating *x_hwc, const fnn_geometry *g, floating *rows,
                         int parallel) noexcept nogil:
    if floating is float:
        fnn_im2row_f(x_hwc, g, rows, parallel)
    else:
        fnn_im2row_d(x_hwc, g, rows, parallel)


cdef inline void _transpose(const floating *a, Py_ssize_t rows, Py_ssize_t cols, floating *out,
                            int parallel) noexcept nogil:
    if floating is float:
        fnn_transpose_f(a, rows, cols, out, parallel)
    else:
        fnn_transpose_d(a, rows, cols, out, parallel)


cdef inline void _transpose_bias(const floating *a, Py_ssize_t rows, Py_ssize_t cols,
                                 const floating *bias, floating *out, int parallel) noexcept nogil:
    """out (cols, rows) = a.T, plus bias (cols,) on each output row unless bias is NULL."""
    if bias == NULL:
        _transpose(a, rows, cols, out, parallel)
    elif floating is float:
        fnn_transpose_bias_f(a, rows, cols, bias, out, parallel)
    else:
        fnn_transpose_bias_d(a, rows, cols, bias, out, parallel)


cdef inline void _row_sums(const floating *a, Py_ssize_t rows, Py_ssize_t cols, floating *out,
                           int accumulate) noexcept nogil:
    if floating is float:
        fnn_row_sums_f(a, rows, cols, out, accumulate)
    else:
        fnn_row_sums_d(a, rows, cols, out, accumulate)


cdef inline void _broadcast(floating *a, const floating *value, Py_ssize_t rows, Py_ssize_t cols,
                            int per_row) noexcept nogil:
    if floating is float:
        fnn_broadcast_f(a, value, rows, cols, per_row)
    else:
        fnn_broadcast_d(a, value, rows, cols, per_row)


cdef fnn_geometry _geometry(Py_ssize_t c, Py_ssize_t h, Py_ssize_t w, Py_ssize_t kh,
                            Py_ssize_t kw, tuple stride, tuple padding,
                            str who="conv") except *:
    """Window geometry of an input (C, H, W) and a kh x kw window; ValueError (naming
    ``who``) where the window does not fit the padded input, a stride is below 1, or a
    value exceeds what the C kernels take (kernel, stride and padding are C ints)."""
    cdef fnn_geometry g
    sh, sw = stride
    ph, pw = padding
    if not (c >= 0 and h >= 0 and w >= 0 and 1 <= kh <= INT_MAX and 1 <= kw <= INT_MAX
            and 1 <= sh <= INT_MAX and 1 <= sw <= INT_MAX and 0 <= ph <= INT_MAX
            and 0 <= pw <= INT_MAX and kh <= h + 2 * ph and kw <= w + 2 * pw):
        raise ValueError(f"{who}: a {kh}x{kw} window with stride {stride} and padding "
                         f"{padding} does not fit a {h}x{w} input (window at most the padded "
                         f"input, stride >= 1, padding >= 0, each at most {INT_MAX})")
    g.c, g.h, g.w = c, h, w
    g.kh, g.kw = kh, kw
    g.sh, g.sw = sh, sw
    g.ph, g.pw = ph, pw
    g.oh = (h + 2 * <Py_ssize_t>ph - kh) // sh + 1
    g.ow = (w + 2 * <Py_ssize_t>pw - kw) // sw + 1
    return g


# --- im2col / col2im -----------------------------------------------------------------

def im2col(cnp.ndarray x, int kh, int kw, tuple stride, tuple padding):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*OH*OW); parallel over (row, sample)."""
    _float_input("im2col", "x", x, (None, None, None, None))
    cdef fnn_geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, stride,
                                    padding, "im2col")
    cdef Py_ssize_t n = x.shape[0]
    cdef cnp.ndarray cols = _output_array((g.c * kh * kw, n * g.oh * g.ow), x.dtype)
    cdef void *px = _data(x)
    cdef void *pc = _data(cols)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            _im2col(<float*>px, n, &g, <float*>pc, n * g.oh * g.ow, 1)
        else:
            _im2col(<double*>px, n, &g, <double*>pc, n * g.oh * g.ow, 1)
    return cols


def col2im(cnp.ndarray cols, tuple x_shape, int kh, int kw, tuple stride, tuple padding):
    """cols: (C*kh*kw, N*OH*OW) -> dx: (N, C, H, W); parallel over (n, c) planes."""
    cdef int t = _float_input("col2im", "cols", cols, (None, None))
    if len(x_shape) != 4 or x_shape[0] < 0:
        raise ValueError(f"col2im: x_shape must be (N, C, H, W), got {x_shape}")
    cdef fnn_geometry g = _geometry(x_shape[1], x_shape[2], x_shape[3], kh, kw, stride,
                                    padding, "col2im")
    cdef Py_ssize_t n = x_shape[0]
    _need("col2im", "cols", cols, t, (g.c * kh * kw, n * g.oh * g.ow))
    cdef cnp.ndarray dx = _output_array(x_shape, cols.dtype)
    cdef void *pc = _data(cols)
    cdef void *px = _data(dx)
    cdef bint single = _is_float32(cols)
    with nogil:
        if single:
            _col2im(<float*>pc, n, &g, <float*>px, n * g.oh * g.ow, 1)
        else:
            _col2im(<double*>pc, n, &g, <double*>px, n * g.oh * g.ow, 1)
    return dx


cdef int _sample_threads(Py_ssize_t n):
    """OpenMP threads for per-sample conv work: all of them when BLAS can be held
    to one thread and there is a sample for each, else 1."""
    if not blas_thread_control() or n < 2:
        return 1
    return max(1, min(fnn_max_threads(), n))


# --- convolution --------------------------------------------------------------------
#
# Per sample (from 4 input channels up, see ROWS_MIN_CHANNELS; im2col columns
# below), the patches are laid out as rows with the channels last ("im2row":
# one row of kh*kw*C values per output pixel), built from the sample transposed
# to (H, W, C); the weights are reordered to match, (K, kh, kw, C). On this
# layout the BLAS reads its operands with unit stride, and the input gradient
# of a stride-1 conv becomes a conv too (no col2im). Measured here against
# im2col + GEMM + col2im on the conv of issue 2 (N=32, C=K=64, 32x32, 3x3,
# pad 1; one thread, CPU time, best of 12): forward 32.6 against 33.0 ms,
# backward 66.5 against 79 ms. The GEMMs compute y.T = rows @ W_rows.T (and
# grad_x.T), the patch matrix being BLAS's second operand (N = OH*OW): per
# sample 0.81 against 0.99 ms for y = W_rows @ rows.T on one thread (OpenBLAS
# 0.3.30 SkylakeX); a blocked transpose then writes NCHW, adding the bias.
#
# Workspaces come from the caching allocator (runtime.pxi, csrc/alloc.c): allocating
# and freeing megabytes per call would pay the page faults every time (DESIGN.md).
# Each call takes its own block, so concurrent callers never share one.

# Which conv variant runs (one id per code path; fastnn/kernels/variants.py names
# them): chosen per call by _conv_forward_pick / _conv_backward_pick, or forced
# (_force_conv, see "variants" at the end of this file). 0: not forced.
DEF V_WINOGRAD = 1
DEF V_DIRECT = 2         # float32 direct conv (forward), grad_W by it (backward)
DEF V_POINTWISE = 3      # 1x1 stride 1 unpadded: x is its own patch matrix
DEF V_ROWS = 4           # patch rows; backward: grad_x by the transposed conv
DEF V_ROWS_COL2IM = 5    # backward: grad_W on patch rows, grad_x by col2im
DEF V_COLUMNS = 6        # im2col columns, grad_x by col2im
DEF V_IMPLICIT = 7       # float32, AVX-512: patches read in place (csrc/conv_implicit.c)
cdef int _conv_forward_forced = 0
cdef int _conv_backward_forced = 0


cdef _Block _take_workspace(Py_ssize_t count, dtype):
    """A block of at least ``count`` elements of ``dtype``, for one call's workspace."""
    cdef Py_ssize_t itemsize = np.dtype(dtype).itemsize
    if count < 0 or count > PY_SSIZE_T_MAX // itemsize:
        raise ValueError(f"conv workspace of {count} elements exceeds the address space")
    return _take_block(max(count * itemsize, 1))


cdef inline void _give_back(_Block workspace):
    workspace.release()


cdef inline bint _pointwise(const fnn_geometry *g) noexcept nogil:
    """A 1x1 conv with stride 1 and no padding: the input is its own patch matrix."""
    return g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and g.ph == 0 and g.pw == 0


cdef inline bint _transposable(const fnn_geometry *g) noexcept nogil:
    """Stride 1 and padding < kernel: grad_x is then the stride-1 conv of grad_y with
    the flipped, transposed weights (padding k-1-p), with the forward pass's GEMM
    shape and no col2im."""
    return g.sh == 1 and g.sw == 1 and g.ph < g.kh and g.pw < g.kw


# Below this many input channels the patch rows are too short (C values per
# copy) and im2col's long rows win: measured per thread, LeNet's 1->6 5x5 conv
# took 0.48 + 1.2 ms (forward + backward) on columns against 1.6 + 2.9 on rows;
# from 6 channels up the rows are as fast or faster (64 -> 64 3x3: 15.5 + 31.4
# against 16.1 + 37.0 ms). Tuned on: AMD EPYC Zen 4, 2 vCPUs, KVM.
DEF ROWS_MIN_CHANNELS = 4


cdef inline bint _by_rows(const fnn_geometry *g) noexcept nogil:
    """Whether the chooser takes patch rows (else im2col columns) for this geometry."""
    return g.c >= ROWS_MIN_CHANNELS and not _pointwise(g)


# From this many input channels up, grad_x is the transposed conv (patch rows of
# grad_y, a GEMM with C columns); below, W.T @ grad_y and col2im: the transposed
# conv runs over every input pixel with all kh*kw taps (about twice the flops of a
# valid conv) and a GEMM only C wide. Backward, one thread, best of 7 x 20 calls
# (two alternated rounds, load 1-1.5), col2im against transposed: LeNet's conv
# (N64 C6 14x14 K16 5x5) 1.27-1.39 against 1.89-2.15 ms; N32 C16 16x16 K32 3x3
# 2.70-3.13 against 3.00-3.04; N16 C32 2.56-2.79 against 2.36-2.75; N8 C64
# 32x32 K64 3x3 16.6-17.0 against 16.4-17.0 ms. Tuned on: AMD EPYC Zen 4, 2 vCPUs,
# KVM.
DEF TRANSPOSED_MIN_CHANNELS = 32

# A float32 backward pass takes grad_W by the direct conv (V_DIRECT: grad_W in
# (K, C, kh, kw) order; grad_x, if wanted, by W.T @ grad_y and col2im) where the
# direct conv fits and the patches would be im2col columns (few channels). One
# thread, batch 64: LeNet's conv1 backward (grad_W, grad_b) 424 -> 310 us; on
# LeNet's conv2 (10-pixel rows, 6 channels) it took 1650 us against 1220 on rows.
# With AVX-512, below ROWS_MIN_CHANNELS channels and from 8 filters up, the forward takes
# im2col columns (MNIST's 1 -> 12 5x5 pad 2, batch 128: 918 against 1340 us; LeNet's 6
# filters 236 against 176). Tuned on: Intel Xeon (AVX-512), 2 vCPUs, KVM.
cdef bint _avx512_cpu = fnn_avx512_supported()


cdef fnn_geometry _transposed_geometry(const fnn_geometry *g, Py_ssize_t k) noexcept nogil:
    """Geometry of that conv: input grad_y (K, OH, OW), output (C, H, W)."""
    cdef fnn_geometry t
    t.c, t.h, t.w = k, g.oh, g.ow
    t.kh, t.kw, t.sh, t.sw = g.kh, g.kw, 1, 1
    t.ph, t.pw = g.kh - 1 - g.ph, g.kw - 1 - g.pw
    t.oh, t.ow = g.h, g.w
    return t


cdef inline Py_ssize_t _forward_first(const fnn_geometry *g, Py_ssize_t k) noexcept nogil:
    """Elements of the first per-sample forward buffer: x, then y, channels last."""
    return max(g.c * g.h * g.w, k * g.oh * g.ow)


cdef inline Py_ssize_t _forward_workspace(const fnn_geometry *g, Py_ssize_t k) noexcept nogil:
    """Elements of one thread's forward workspace: that buffer + the patch matrix
    (or the direct conv's padded input, or the implicit conv's and its y.T)."""
    return max(_forward_first(g, k) + g.oh * g.ow * g.c * g.kh * g.kw,
               fnn_direct_conv_workspace(g), _hwc_padded(g) + g.oh * g.ow * k)


cdef inline Py_ssize_t _hwc_padded(const fnn_geometry *g) noexcept nogil:
    """Elements of one sample padded and channels last (fnn_pad_hwc_f)."""
    return (g.h + 2 * g.ph) * (g.w + 2 * g.pw) * g.c


cdef inline Py_ssize_t _lanes16(Py_ssize_t k) noexcept nogil:
    """k rounded up to 16: the implicit conv's packed weight columns."""
    return (k + 15) // 16 * 16


cdef void _conv_forward_sample(const floating *x, const floating *weights,
                               const floating *bias, floating *y, floating *work,
                               const fnn_geometry *g, Py_ssize_t k, int parallel,
                               int variant) noexcept nogil:
    """One sample: y (K, OH*OW) = (im2row(x) @ weights (K, kh*kw*C).T).T + b on
    patch rows (V_ROWS), or weights (K, C*kh*kw) @ im2col(x) + b on columns, or the
    direct conv (V_DIRECT, float32), or W @ x (V_POINTWISE). work:
    ``_forward_workspace`` elements. ``parallel``: split the copies over OpenMP
    (when samples run one after the other)."""
    cdef Py_ssize_t kkc = g.c * g.kh * g.kw, ohw = g.oh * g.ow
    cdef floating beta = 0
    cdef floating *rows = work + _forward_first(g, k)
    if floating is float:
        if variant == V_DIRECT:  # weights (C*kh*kw, kp), bias (kp,): see conv2d_forward
            fnn_direct_conv_forward_f(x, g, weights, k, bias, y, work)
            return
        if variant == V_IMPLICIT:    # weights (kh*kw*C, kp): see conv2d_forward
            fnn_pad_hwc_f(x, g.c, g.h, g.w, g.ph, g.pw, work)
            fnn_conv_implicit_f(work, g.w + 2 * g.pw, g.c, g.kh, g.kw, g.oh, g.ow, weights,
                                k, work + _hwc_padded(g))
            _transpose_bias(work + _hwc_padded(g), ohw, k, bias, y, parallel)
            return
    if bias != NULL and variant != V_ROWS:
        _broadcast(y, bias, k, ohw, 1)
        beta = 1
    if variant == V_POINTWISE:      # y = W (K, C) @ x (C, H*W)
        _gemm(False, False, <int>k, <int>ohw, <int>g.c, 1, weights, <int>g.c,
              x, <int>ohw, beta, y, <int>ohw)
    elif variant == V_ROWS:
        _transpose(x, g.c, g.h * g.w, work, parallel)
        _im2row(work, g, rows, parallel)
        # y.T (OH*OW, K) = rows @ weights.T into the first buffer (free again), then
        # transposed into y with the bias: with the patch matrix as BLAS's second
        # operand the 64x1024x576 GEMM took 0.81 against 0.99 ms (one thread).
        _gemm(False, True, <int>ohw, <int>k, <int>kkc, 1, rows, <int>kkc, weights,
              <int>kkc, 0, work, <int>k)
        _transpose_bias(work, ohw, k, bias, y, parallel)
    else:
        _im2col(x, 1, g, work, ohw, parallel)
        _gemm(False, False, <int>k, <int>ohw, <int>kkc, 1, weights, <int>kkc, work,
              <int>ohw, beta, y, <int>ohw)


# Conv samples (forward) and sample chunks (backward) run on fastnn's worker pool
# (csrc/pool.c), not OpenMP: LeNet's per-layer regions last 0.2-1 ms, and waking
# the passive OpenMP team costs 50-60 us per region on this KVM guest.
ctypedef struct _conv_job:
    bint single
    const void *x
    const void *weights
    const void *bias
    void *y
    const void *grad_y
    void *grad_x
    void *workspace
    const fnn_geometry *g
    Py_ssize_t n, k, per_thread, chunks, first, stride_c
    int threads, variant


cdef inline void _conv_forward_job_sample(const _conv_job *job, Py_ssize_t s,
                                          floating kind) noexcept nogil:
    """Sample s of a _conv_job, in the workspace of the thread that runs it."""
    cdef const fnn_geometry *g = job.g
    cdef Py_ssize_t chw = g.c * g.h * g.w, kohw = job.k * g.oh * g.ow
    cdef Py_ssize_t mine = fnn_pool_thread_index() * job.per_thread
    _conv_forward_sample(<const floating*>job.x + s * chw, <const floating*>job.weights,
                         <const floating*>job.bias, <floating*>job.y + s * kohw,
                         <floating*>job.workspace + mine, g, job.k, 0, job.variant)


cdef void _conv_forward_task(void *ctx, Py_ssize_t s) noexcept nogil:
    cdef const _conv_job *job = <const _conv_job*>ctx
    if job.single:
        _conv_forward_job_sample(job, s, _F32)
    else:
        _conv_forward_job_sample(job, s, _F64)


cdef void _conv_forward(const floating *x, const floating *weights, const floating *bias,
                        floating *y, floating *workspace, Py_ssize_t n, const fnn_geometry *g,
                        Py_ssize_t k, int threads, int variant) noexcept nogil:
    cdef Py_ssize_t s
    cdef Py_ssize_t ohw = g.oh * g.ow, chw = g.c * g.h * g.w
    cdef Py_ssize_t per_thread = _forward_workspace(g, k)
    cdef bint small = _small_gemm(k, ohw, g.c * g.kh * g.kw)
    if threads <= 1:         # one sample after the other, BLAS threading each large GEMM
        if small:
            fnn_blas_single_begin()
        for s in range(n):
            _conv_forward_sample(x + s * chw, weights, bias, y + s * k * ohw, workspace,
                                 g, k, fnn_max_threads() > 1, variant)
        if small:
            fnn_blas_single_end()
        return
    cdef _conv_job job
    job.single = floating is float
    job.x, job.weights, job.bias, job.y, job.workspace = x, weights, bias, y, workspace
    job.g, job.k, job.per_thread, job.variant = g, k, per_thread, variant
    fnn_blas_single_begin()
    # on the worker pool, samples taken dynamically: a thread that loses its core
    # for a while (shared machine) leaves its samples to the others
    fnn_pool_run(_conv_forward_task, &job, n)
    fnn_blas_single_end()


# --- Winograd F(2x2, 3x3) (csrc/winograd_template.h) ---------------------------------
#
# For 3x3 stride-1 convs with padding 0..2: 16 multiply-adds per input channel,
# output channel and 2x2 output tile instead of 36, in 16 small GEMMs per block
# of tiles, plus the tile transforms. ``auto`` takes it for float32 from
# WINOGRAD_MIN_CHANNELS input and output channels on outputs of at least
# WINOGRAD_MIN_PIXELS pixels per sample and WINOGRAD_MIN_BATCH_PIXELS in all
# (below, the per-call work on the 16*C*K transformed weights is not repaid);
# float64 keeps the patch-row GEMMs (Winograd's transforms add a few ulps of
# round-off, see tests/test_winograd.py).
# Measured here (N=32, 32x32, pad 1, forward + backward, one thread, best of 5,
# patch rows / Winograd time): C=K=64 1.8x, C=K=16 1.8x, C=K=8 1.0-1.1x,
# C=K=4 1.04x, C=4 K=64 1.27x, C=64 K=4 1.78x, but C=3 K=64 0.62x (below 4
# input channels the patch-matrix path takes im2col columns, faster there); C=K=64
# on 4x4 outputs 1.32x, on 3x3 0.87x, on 2x2 0.93x (mostly padding tiles);
# N=1 16x16 C=K=64 1.06x, C=K=128 0.94x, N=1 14x14 C=K=256 0.78x, N=2 8x8
# C=K=64 0.89x, but N=8 8x8 C=K=128 1.33x and N=4 14x14 C=K=512 1.21x.
# Tuned on: AMD EPYC Zen 4, 2 vCPUs, KVM.
DEF WINOGRAD_MIN_CHANNELS = 4
DEF WINOGRAD_MIN_PIXELS = 16
DEF WINOGRAD_MIN_BATCH_PIXELS = 512


def _set_winograd_tiles(Py_ssize_t tiles):
    """Tiles per Winograd block (for tests and measurements; 0: chosen from the channel
    counts, see csrc/winograd_template.h); returns the old setting."""
    return fnn_winograd_set_tiles(tiles)


cdef inline bint _winograd_fits(const fnn_geometry *g, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Whether Winograd F(2x2, 3x3) can run this conv (either dtype)."""
    return (g.kh == 3 and g.kw == 3 and g.sh == 1 and g.sw == 1 and g.ph <= 2 and g.pw <= 2
            and n > 0 and k > 0 and g.c > 0)


cdef bint _use_winograd(const fnn_geometry *g, Py_ssize_t n, Py_ssize_t k, bint single) noexcept nogil:
    """Whether the chooser takes Winograd F(2x2, 3x3) for this conv (see above)."""
    return (_winograd_fits(g, n, k) and single
            and g.c >= WINOGRAD_MIN_CHANNELS and k >= WINOGRAD_MIN_CHANNELS
            and g.oh * g.ow >= WINOGRAD_MIN_PIXELS
            and n * g.oh * g.ow >= WINOGRAD_MIN_BATCH_PIXELS)


cdef int _winograd_threads():
    """All OpenMP threads when BLAS can be held to one thread inside them, else 1."""
    return fnn_max_threads() if blas_thread_control() else 1


cdef void _gemm_f(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                  int lda, const float *b, int ldb, float beta, float *c, int ldc) noexcept nogil:
    _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef void _gemm_d(int trans_a, int trans_b, int m, int n, int k, double alpha, const double *a,
                  int lda, const double *b, int ldb, double beta, double *c, int ldc) noexcept nogil:
    _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef object _winograd_forward(cnp.ndarray x, cnp.ndarray W, b, const fnn_geometry *g,
                              Py_ssize_t k, bint max_pool=False):
    """y (N, K, OH, OW) for g's output size; with ``max_pool`` (OH, OW even) the output's
    2x2 stride-2 max pool in the same pass, (y (N, K, OH/2, OW/2), argmax)."""
    cdef Py_ssize_t n = x.shape[0]
    cdef int threads = _winograd_threads()
    cdef bint single = _is_float32(x)
    cdef Py_ssize_t count = (fnn_winograd_forward_workspace_f(n, g, k, threads) if single
                       else fnn_winograd_forward_workspace_d(n, g, k, threads))
    cdef Py_ssize_t pool = 2 if max_pool else 1
    cdef cnp.ndarray y = _output_array((n, k, g.oh // pool, g.ow // pool), x.dtype)
    cdef cnp.ndarray argmax = _output_array((n, k, g.oh // 2, g.ow // 2), np.int64) if max_pool else None
    cdef _Block workspace = _take_workspace(count, x.dtype)
    cdef void *px = _data(x)
    cdef void *pw = _data(W)
    cdef void *pb = NULL if b is None else _data(b)
    cdef void *py = _data(y)
    cdef int64_t *pa = <int64_t*>_data(argmax) if max_pool else NULL
    cdef void *pws = workspace.ptr
    with nogil:
        if single:
            fnn_winograd_forward_f(<float*>px, n, g, <float*>pw, k, <float*>pb, <float*>py,
                                   pa, <float*>pws, threads, _gemm_f)
        else:
            fnn_winograd_forward_d(<double*>px, n, g, <double*>pw, k, <double*>pb, <double*>py,
                                   pa, <double*>pws, threads, _gemm_d)
    _give_back(workspace)
    return (y, argmax) if max_pool else y


cdef tuple _winograd_backward(cnp.ndarray grad_y, cnp.ndarray x, cnp.ndarray W,
                              const fnn_geometry *g, Py_ssize_t k, bint need_grad_x):
    cdef Py_ssize_t n = x.shape[0]
    cdef int threads = _winograd_threads()
    cdef bint single = _is_float32(x)
    cdef Py_ssize_t count = (fnn_winograd_backward_workspace_f(n, g, k, threads, need_grad_x) if single
                       else fnn_winograd_backward_workspace_d(n, g, k, threads, need_grad_x))
    cdef cnp.ndarray grad_x = _output_array((<object>x).shape, x.dtype) if need_grad_x else None
    cdef cnp.ndarray grad_w = _output_array((<object>W).shape, W.dtype)
    cdef cnp.ndarray grad_b = np.empty(k, dtype=x.dtype)
    cdef _Block workspace = _take_workspace(count, x.dtype)
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(x)
    cdef void *pw = _data(W)
    cdef void *pgx = _data(grad_x) if need_grad_x else NULL
    cdef void *pgw = _data(grad_w)
    cdef void *pgb = _data(grad_b)
    cdef void *pws = workspace.ptr
    with nogil:
        if single:
            fnn_winograd_backward_f(<float*>pg, <float*>px, n, g, <float*>pw, k, <float*>pgx,
                                    <float*>pgw, <float*>pgb, <float*>pws, threads, _gemm_f)
        else:
            fnn_winograd_backward_d(<double*>pg, <double*>px, n, g, <double*>pw, k,
                                    <double*>pgx, <double*>pgw, <double*>pgb, <double*>pws,
                                    threads, _gemm_d)
    _give_back(workspace)
    return grad_x, grad_w, grad_b


cdef fnn_geometry _conv_arguments(str who, cnp.ndarray x, cnp.ndarray W, tuple stride,
                                  tuple padding) except *:
    """The geometry of a conv of x (N, C, H, W) with W (K, C, kh, kw), both checked."""
    cdef int t = _float_input(who, "x", x, (None, None, None, None))
    _need(who, "W", W, t, (None, x.shape[1], None, None))
    return _geometry(x.shape[1], x.shape[2], x.shape[3], W.shape[2], W.shape[3], stride,
                     padding, who)


cdef tuple _first_outputs(str who, output_size, fnn_geometry *g):
    """The (oh, ow) of ``output_size`` (None: the whole (OH, OW) of g), checked by the
    public kernels' rule (fastnn.kernels._output_size); g keeps the whole output's size."""
    if output_size is None:
        return g.oh, g.ow
    from fastnn.kernels import _output_size
    return _output_size(who, output_size, g.oh, g.ow) or (g.oh, g.ow)


def conv2d_forward(cnp.ndarray x, cnp.ndarray W, b, tuple stride, tuple padding,
                   output_size=None):
    """x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> y: (N, K, OH, OW), or with
    ``output_size`` (oh, ow) its first oh rows and ow columns, (N, K, oh, ow) (Winograd
    computes only those; the other paths compute y and copy them).

    OpenMP over the samples; each thread builds one sample's patch rows in its
    own workspace, runs a single-threaded GEMM into y[n].T (channels last, in the
    workspace) and transposes it into y[n] (NCHW) adding the bias (1x1 convs, and
    im2col columns below 4 channels: one GEMM straight into y[n]).
    Workspace: threads * (max(C*H*W, K*OH*OW) + OH*OW*C*kh*kw) elements, whatever
    N is. Which path runs: ``_conv_forward_pick`` (or the variant forced, see the end
    of this file). 3x3 stride-1 convs where ``_use_winograd``: Winograd F(2x2, 3x3), 16*C*K
    elements of transformed weights + per thread one block of 128-256 tiles (its
    transformed tiles, 16*tiles*(C+K) elements, and its input and output regions).
    float32 stride-1 convs with at most 16 output channels and rows of at least 8
    pixels (V_DIRECT, on CPUs with AVX2 + FMA) run the direct conv of
    csrc/direct_conv.c per sample instead: no patch matrix, the padded input
    (C*(H+2ph)*(W+2pw) elements) in the workspace.
    """
    cdef Py_ssize_t n = x.shape[0], k = W.shape[0]
    cdef fnn_geometry g = _conv_arguments("conv2d_forward", x, W, stride, padding)
    oh, ow = _first_outputs("conv2d_forward", output_size, &g)
    if b is not None:
        _need("conv2d_forward", "b", b, cnp.PyArray_TYPE(x), (k,))
    _check_gemm_forced(_is_float32(x))
    cdef int variant = _conv_variant(False, &g, n, k, _is_float32(x))
    if variant == V_WINOGRAD:
        g.oh, g.ow = oh, ow
        return _winograd_forward(x, W, b, &g, k)
    if (oh, ow) != (g.oh, g.ow):
        return np.ascontiguousarray(conv2d_forward(x, W, b, stride, padding)[:, :, :oh, :ow])
    cdef int threads = _sample_threads(n)
    cdef Py_ssize_t per_thread = _forward_workspace(&g, k)
    cdef cnp.ndarray y = _output_array((n, k, g.oh, g.ow), x.dtype)
    cdef _Block workspace = _take_workspace(threads * per_thread, x.dtype)
    cdef cnp.ndarray weights = W
    cdef Py_ssize_t kp
    if variant == V_DIRECT:      # float32: (C*kh*kw, kp) and a bias (kp,), zero-padded
        kp = (k + fnn_direct_conv_block(k) - 1) // fnn_direct_conv_block(k) * fnn_direct_conv_block(k)
        weights = np.zeros((W.size // k, kp), dtype=np.float32)
        weights[:, :k] = W.reshape(k, -1).T
        padded = np.zeros(kp, dtype=np.float32)
        if b is not None:
            padded[:k] = b
        b = padded
    elif variant == V_ROWS:      # (K, kh, kw, C): the patch rows' order
        weights = np.ascontiguousarray(W.transpose(0, 2, 3, 1))
    elif variant == V_IMPLICIT:
        weights = _implicit_weights(W)
    cdef void *px = _data(x)
    cdef void *pw = _data(weights)
    cdef void *pb = NULL if b is None else _data(b)
    cdef void *py = _data(y)
    cdef void *pws = workspace.ptr
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            _conv_forward(<float*>px, <float*>pw, <float*>pb, <float*>py, <float*>pws,
                          n, &g, k, threads, variant)
        else:
            _conv_forward(<double*>px, <double*>pw, <double*>pb, <double*>py, <double*>pws,
                          n, &g, k, threads, variant)
    _give_back(workspace)
    return y


def conv2d_maxpool_forward(cnp.ndarray x, cnp.ndarray W, b, tuple stride, tuple padding):
    """x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> (y, argmax), both (N, K,
    OH // 2, OW // 2): maxpool2d_forward(conv2d_forward(x, W, b, stride, padding), 2, 2,
    (2, 2)), OH, OW >= 2. Where Winograd runs the conv, the pool is taken on each 2x2
    output tile in the same pass (the conv's output is never written whole); the
    same bits either way."""
    cdef Py_ssize_t n = x.shape[0], k = W.shape[0]
    cdef fnn_geometry g = _conv_arguments("conv2d_maxpool_forward", x, W, stride, padding)
    if g.oh < 2 or g.ow < 2:
        raise ValueError(f"conv2d_maxpool_forward: the conv's output ({g.oh}x{g.ow}) is "
                         f"smaller than the 2x2 pool window")
    if b is not None:
        _need("conv2d_maxpool_forward", "b", b, cnp.PyArray_TYPE(x), (k,))
    _check_gemm_forced(_is_float32(x))
    cdef Py_ssize_t oh = g.oh // 2 * 2, ow = g.ow // 2 * 2
    if _conv_variant(False, &g, n, k, _is_float32(x)) == V_WINOGRAD:
        g.oh, g.ow = oh, ow
        return _winograd_forward(x, W, b, &g, k, True)
    return maxpool2d_forward(conv2d_forward(x, W, b, stride, padding, (oh, ow)), 2, 2, (2, 2))


cdef cnp.ndarray _implicit_grad_x_weights(cnp.ndarray W):
    """W (K, C, kh, kw) float32 as the implicit input gradient's (kh*kw, K, Cp):
    W[k, c, i, j] at [i*kw + j, k, c], columns zero-padded to Cp = C rounded up to 16."""
    cdef Py_ssize_t k = W.shape[0], c = W.shape[1]
    cdef cnp.ndarray packed = np.zeros((W.shape[2] * W.shape[3], k, _lanes16(c)), np.float32)
    packed[:, :, :c] = W.transpose(2, 3, 0, 1).reshape(packed.shape[0], k, c)   # k may be 0
    return packed


cdef cnp.ndarray _implicit_weights(cnp.ndarray W):
    """W (K, C, kh, kw) float32 as the implicit conv's (kh*kw*C, kp): rows in patch
    order (i, j, c), columns zero-padded to kp = K rounded up to 16."""
    cdef Py_ssize_t k = W.shape[0]
    cdef cnp.ndarray packed = np.zeros((W.size // k if k else 0, _lanes16(k)), np.float32)
    packed[:, :k] = W.transpose(2, 3, 1, 0).reshape(packed.shape[0], k)     # k may be 0
    return packed


cdef inline Py_ssize_t _padded_len(const fnn_geometry *g) noexcept nogil:
    """Values per plane in fnn_pad_rows' layout (rows w + 2*pw apart)."""
    return (g.oh - 1) * (g.w + 2 * g.pw) + g.ow


cdef inline Py_ssize_t _padded_plane(const fnn_geometry *g) noexcept nogil:
    return (g.h + 2 * g.ph) * (g.w + 2 * g.pw)


cdef void _backward_buffers(const fnn_geometry *g, Py_ssize_t k, int variant, Py_ssize_t *first,
                            Py_ssize_t *second) noexcept nogil:
    """Elements of the two per-sample buffers of the backward pass (see below)."""
    cdef Py_ssize_t kk = g.kh * g.kw, ohw = g.oh * g.ow, hw = g.h * g.w
    if variant == V_POINTWISE:
        first[0] = second[0] = 0
    elif variant == V_ROWS:
        first[0] = max(g.c * hw, k * ohw)   # x, grad_y, then grad_x.T: channels last
        second[0] = max(ohw * kk * g.c, hw * kk * k)    # their patch rows
    elif variant == V_ROWS_COL2IM:
        # x, channels last, then grad_y in padded rows and the padded grad_x plane
        first[0] = max(g.c * hw, k * _padded_len(g), _padded_plane(g))
        second[0] = g.c * kk * _padded_len(g)   # x's patch rows, then grad_x's columns
    elif variant == V_IMPLICIT and _implicit_scatter(g):
        # x padded, channels last, then grad_x so with _lanes16(C) channels; grad_y.T
        first[0] = max(_hwc_padded(g), _hwc_padded(g) // max(g.c, 1) * _lanes16(g.c))
        second[0] = ohw * _lanes16(k)       # (OH*OW, kp)
    elif variant == V_IMPLICIT:
        # x padded, channels last, then as V_ROWS_COL2IM; grad_y.T (OH*OW, kp), then
        # grad_x's columns
        first[0] = max(_hwc_padded(g), k * _padded_len(g), _padded_plane(g))
        second[0] = max(ohw * _lanes16(k), g.c * kk * _padded_len(g))
    else:
        first[0] = second[0] = g.c * kk * ohw           # im2col columns, their gradient
    if variant == V_DIRECT:      # float32: the padded input, W.T @ grad_y for col2im
        first[0] = max(first[0], fnn_direct_conv_workspace(g))
        second[0] = max(second[0], g.c * kk * ohw)


cdef void _conv_backward_sample(const floating *grad_y, const floating *x,
                                const floating *weights, floating *grad_x,
                                floating *grad_w, floating *grad_b, floating *first,
                                floating *second, const fnn_geometry *g, Py_ssize_t k,
                                int parallel, int variant) noexcept nogil:
    """One sample; grad_y: (K, OH*OW). Adds this sample's grad_w and grad_b, writes
    its grad_x unless grad_x is NULL. ``parallel``: split the copies over OpenMP
    (when samples run one after the other).

    - V_DIRECT (float32): grad_w (K, C, kh, kw) by the direct conv, grad_x =
      col2im(W.T @ grad_y);
    - V_POINTWISE: grad_w += grad_y @ x.T, grad_x = W.T @ grad_y (weights (K, C));
    - stride 1 on patch rows: grad_w (K, kh, kw, C) += grad_y @ im2row(x), and
      grad_x = the conv of grad_y with ``weights`` = flipped W as (C, kh, kw, K)
      (V_ROWS), else grad_x = col2im(W.T @ grad_y) (V_ROWS_COL2IM, ``weights`` W);
    - V_COLUMNS: grad_w (K, C, kh, kw) += grad_y @ im2col(x).T and
      grad_x = col2im(W.T @ grad_y) (weights (K, C*kh*kw));
    - V_IMPLICIT (float32): grad_w (kh*kw*C, kp) += patches(x).T @ grad_y.T read in
      place (csrc/conv_implicit.c); grad_x where _implicit_scatter summed tap by tap
      into the padded sample, channels last (csrc/conv_implicit.c, ``weights``
      (kh*kw, K, Cp), _implicit_grad_x_weights), else as V_ROWS_COL2IM's (``weights`` W).
    """
    cdef Py_ssize_t kk = g.kh * g.kw, ohw = g.oh * g.ow, hw = g.h * g.w
    cdef Py_ssize_t ckk = g.c * kk, len_
    cdef fnn_geometry t
    _row_sums(grad_y, k, ohw, grad_b, 1)
    if floating is float:
        if variant == V_DIRECT:
            fnn_direct_conv_grad_w_f(grad_y, x, g, k, grad_w, first)
            if grad_x != NULL:
                _gemm(True, False, <int>ckk, <int>ohw, <int>k, 1, weights, <int>ckk, grad_y,
                      <int>ohw, 0, second, <int>ohw)
                _col2im(second, 1, g, grad_x, ohw, parallel)
            return
        if variant == V_IMPLICIT:
            fnn_pad_hwc_f(x, g.c, g.h, g.w, g.ph, g.pw, first)
            _transpose_padded(grad_y, k, ohw, _lanes16(k), second)
            fnn_conv_implicit_grad_w_f(first, g.w + 2 * g.pw, g.c, g.kh, g.kw, g.oh, g.ow,
                                       second, k, grad_w)
            if grad_x != NULL and _implicit_scatter(g):
                memset(first, 0, _hwc_padded(g) // g.c * _lanes16(g.c) * sizeof(float))
                fnn_conv_implicit_grad_x_f(second, _lanes16(k), k, weights, g.c, g.kh, g.kw,
                                           g.oh, g.ow, g.w + 2 * g.pw, first)
                _crop_hwc(first, g, grad_x)
            elif grad_x != NULL:
                _grad_x_col2im(grad_y, weights, grad_x, first, second, g, k, parallel)
            return
    if variant == V_POINTWISE:
        _gemm(False, True, <int>k, <int>g.c, <int>ohw, 1, grad_y, <int>ohw, x,
              <int>ohw, 1, grad_w, <int>g.c)
        if grad_x != NULL:
            _gemm(True, False, <int>g.c, <int>ohw, <int>k, 1, weights, <int>g.c, grad_y,
                  <int>ohw, 0, grad_x, <int>ohw)
    elif variant == V_ROWS or variant == V_ROWS_COL2IM:
        _transpose(x, g.c, hw, first, parallel)
        _im2row(first, g, second, parallel)
        _gemm(False, False, <int>k, <int>ckk, <int>ohw, 1, grad_y, <int>ohw, second,
              <int>ckk, 1, grad_w, <int>ckk)
        if grad_x == NULL:
            return
        if variant == V_ROWS_COL2IM:
            _grad_x_col2im(grad_y, weights, grad_x, first, second, g, k, parallel)
            return
        t = _transposed_geometry(g, k)
        _transpose(grad_y, k, ohw, first, parallel)
        _im2row(first, &t, second, parallel)
        # grad_x.T (H*W, C) into the first buffer (free again), then transposed: the
        # forward pass's faster operand order
        _gemm(False, True, <int>hw, <int>g.c, <int>(k * kk), 1, second, <int>(k * kk),
              weights, <int>(k * kk), 0, first, <int>g.c)
        _transpose(first, hw, g.c, grad_x, parallel)
    else:
        _im2col(x, 1, g, first, ohw, parallel)
        _gemm(False, True, <int>k, <int>ckk, <int>ohw, 1, grad_y, <int>ohw, first,
              <int>ohw, 1, grad_w, <int>ckk)
        if grad_x == NULL:
            return
        _gemm(True, False, <int>ckk, <int>ohw, <int>k, 1, weights, <int>ckk, grad_y,
              <int>ohw, 0, second, <int>ohw)
        _col2im(second, 1, g, grad_x, ohw, parallel)


cdef void _grad_x_col2im(const floating *grad_y, const floating *weights, floating *grad_x,
                         floating *first, floating *second, const fnn_geometry *g,
                         Py_ssize_t k, int parallel) noexcept nogil:
    """One sample's grad_x = col2im(W.T @ grad_y), weights W (K, C*kh*kw); the buffers
    as _backward_buffers' V_ROWS_COL2IM."""
    cdef Py_ssize_t ckk = g.c * g.kh * g.kw, ohw = g.oh * g.ow, len_
    if parallel:                 # col2im split over the planes
        _gemm(True, False, <int>ckk, <int>ohw, <int>k, 1, weights, <int>ckk, grad_y,
              <int>ohw, 0, second, <int>ohw)
        _col2im(second, 1, g, grad_x, ohw, parallel)
        return
    # grad_y's rows spaced as the padded input's: col2im is then one long add per
    # (c, i, j) (fnn_col2im_rows, one thread) instead of oh short ones. LeNet's conv2
    # (14x14 -> 10x10), one thread, batch 64, whole backward, best of 9 in three
    # alternated rounds: 1257 -> 1125 us (col2im 23% -> 8% of the profile; the W.T @
    # grad_y GEMM is 36% wider)
    len_ = _padded_len(g)
    _pad_rows(grad_y, k, g.oh, g.ow, g.w + 2 * g.pw, first)
    _gemm(True, False, <int>ckk, <int>len_, <int>k, 1, weights, <int>ckk, first,
          <int>len_, 0, second, <int>len_)
    _col2im_rows(second, g, grad_x, first)


cdef inline void _crop_hwc(const float *xp, const fnn_geometry *g, float *x) noexcept nogil:
    """x (C, H, W) = the interior of xp, padded and channels last with _lanes16(C)
    channels (fnn_conv_implicit_grad_x_f's layout)."""
    cdef Py_ssize_t ch, y, q, wp = g.w + 2 * g.pw, cp = _lanes16(g.c)
    for ch in range(g.c):
        for y in range(g.h):
            for q in range(g.w):
                x[(ch * g.h + y) * g.w + q] = xp[((y + g.ph) * wp + q + g.pw) * cp + ch]


cdef inline void _transpose_padded(const float *a, Py_ssize_t rows, Py_ssize_t cols,
                                   Py_ssize_t width, float *out) noexcept nogil:
    """out (cols, width) = a (rows, cols).T, zero in columns rows..width-1."""
    cdef Py_ssize_t r, q
    for q in range(cols):
        for r in range(rows):
            out[q * width + r] = a[r * cols + q]
        for r in range(rows, width):
            out[q * width + r] = 0


cdef inline Py_ssize_t _grad_w_size(int variant, Py_ssize_t k, Py_ssize_t ckk) noexcept nogil:
    """Elements of a backward pass's grad_w sums: (kh*kw*C, kp) for V_IMPLICIT, else
    K*C*kh*kw."""
    return ckk * (_lanes16(k) if variant == V_IMPLICIT else k)


cdef inline Py_ssize_t _conv_backward_chunks(Py_ssize_t n, int threads) noexcept nogil:
    """Sample chunks of the parallel conv backward: four per thread, at most n."""
    return n if n < 4 * threads else 4 * threads


cdef inline void _conv_backward_chunk(const _conv_job *job, Py_ssize_t c,
                                      floating kind) noexcept nogil:
    """Chunk c of a _conv_job: its samples in order, summed into the chunk's partial."""
    cdef const floating *grad_y = <const floating*>job.grad_y
    cdef const floating *x = <const floating*>job.x
    cdef const floating *weights = <const floating*>job.weights
    cdef floating *grad_x = <floating*>job.grad_x
    cdef floating *workspace = <floating*>job.workspace
    cdef const fnn_geometry *g = job.g
    cdef Py_ssize_t k = job.k, n = job.n, s
    cdef Py_ssize_t ckk = g.c * g.kh * g.kw, kohw = k * g.oh * g.ow, chw = g.c * g.h * g.w
    cdef floating *mine = workspace + fnn_pool_thread_index() * job.per_thread
    cdef floating *part = workspace + job.threads * job.per_thread + c * job.stride_c
    memset(part, 0, job.stride_c * sizeof(floating))
    for s in range(c * n // job.chunks, (c + 1) * n // job.chunks):
        _conv_backward_sample(grad_y + s * kohw, x + s * chw, weights,
                              NULL if grad_x == NULL else grad_x + s * chw,
                              part, part + _grad_w_size(job.variant, k, ckk), mine,
                              mine + job.first, g, k, 0, job.variant)


cdef void _conv_backward_task(void *ctx, Py_ssize_t c) noexcept nogil:
    cdef const _conv_job *job = <const _conv_job*>ctx
    if job.single:
        _conv_backward_chunk(job, c, _F32)
    else:
        _conv_backward_chunk(job, c, _F64)


cdef void _conv_backward(const floating *grad_y, const floating *x, const floating *weights,
                         floating *grad_x, floating *grad_w, floating *grad_b,
                         floating *workspace, Py_ssize_t n, const fnn_geometry *g, Py_ssize_t k,
                         int threads, int variant) noexcept nogil:
    cdef Py_ssize_t s, c, idx, first, second
    cdef Py_ssize_t ckk = g.c * g.kh * g.kw, ohw = g.oh * g.ow, chw = g.c * g.h * g.w
    _backward_buffers(g, k, variant, &first, &second)
    # per thread: the two buffers; then per chunk of samples: its grad_w and grad_b sums
    cdef Py_ssize_t wsize = _grad_w_size(variant, k, ckk)
    cdef Py_ssize_t stride_t = first + second, stride_c = wsize + k
    cdef Py_ssize_t chunks = _conv_backward_chunks(n, threads)
    cdef floating *part
    memset(grad_w, 0, wsize * sizeof(floating))
    memset(grad_b, 0, k * sizeof(floating))
    cdef bint small = _small_gemm(k, ohw, ckk)
    if threads <= 1:         # one sample after the other, BLAS threading each large GEMM
        if small:
            fnn_blas_single_begin()
        for s in range(n):
            _conv_backward_sample(grad_y + s * k * ohw, x + s * chw, weights,
                                  NULL if grad_x == NULL else grad_x + s * chw,
                                  grad_w, grad_b, workspace, workspace + first, g, k,
                                  fnn_max_threads() > 1, variant)
        if small:
            fnn_blas_single_end()
        return
    cdef _conv_job job
    job.single = floating is float
    job.x, job.weights, job.grad_y, job.grad_x, job.workspace = x, weights, grad_y, grad_x, workspace
    job.g, job.n, job.k, job.per_thread, job.chunks = g, n, k, stride_t, chunks
    job.first, job.stride_c, job.threads, job.variant = first, stride_c, threads, variant
    fnn_blas_single_begin()
    # The samples are cut into fixed chunks; whichever thread takes a chunk (dynamic,
    # for a shared machine) sums its samples in order into the chunk's own partial,
    # and the partials are added in chunk order: which thread ran what cannot change
    # the result, so the same inputs give the same bits every call (per-thread sums
    # under a dynamic schedule did not: same-seed trainings drifted apart).
    fnn_pool_run(_conv_backward_task, &job, chunks)
    fnn_blas_single_end()
    for c in range(chunks):
        part = workspace + threads * stride_t + c * stride_c
        for idx in range(wsize):
            grad_w[idx] += part[idx]
        for idx in range(k):
            grad_b[idx] += part[wsize + idx]


def conv2d_backward(cnp.ndarray grad_y, cnp.ndarray x, cnp.ndarray W, tuple stride,
                    tuple padding, bint need_grad_x=True, output_size=None):
    """-> (grad_x (N, C, H, W) or None, grad_W (K, C, kh, kw), grad_b (K,)).
    grad_y: (N, K, OH, OW), or with ``output_size`` (oh, ow) the gradient of the forward's
    first oh rows and ow columns, (N, K, oh, ow): the outputs past them get none (Winograd
    reads only those; the other paths take grad_y padded with zeros).

    OpenMP over the samples, single-threaded GEMMs per sample; each of a fixed
    set of sample chunks keeps its own grad_W/grad_b sums (added at the end in
    chunk order), so no two threads write one value and every call gives the
    same bits. With stride 1 (padding < kernel) and from 32 input channels, grad_x
    is the conv of grad_y with the flipped weights: a GEMM as deep as the forward
    one and no col2im.
    Workspace: threads * 2 buffers of at most max(C, K)*kh*kw*max(H*W, OH*OW)
    elements + min(N, 4*threads) * (K*C*kh*kw + K). Which path runs:
    ``_conv_backward_pick`` (or the variant forced). Where ``_use_winograd``:
    grad_W and grad_b summed over at most 8 fixed chunks of tile blocks (16*K*C + K
    elements each, added in chunk order: the same bits for any thread count), then
    grad_x as the Winograd conv of grad_y with the flipped weights (padding 2 - p).
    """
    cdef Py_ssize_t n = x.shape[0], k = W.shape[0]
    cdef fnn_geometry g = _conv_arguments("conv2d_backward", x, W, stride, padding)
    oh, ow = _first_outputs("conv2d_backward", output_size, &g)
    _need("conv2d_backward", "grad_y", grad_y, cnp.PyArray_TYPE(x), (n, k, oh, ow))
    _check_gemm_forced(_is_float32(x))
    cdef int variant = _conv_variant(True, &g, n, k, _is_float32(x))
    if variant == V_WINOGRAD:
        g.oh, g.ow = oh, ow
        return _winograd_backward(grad_y, x, W, &g, k, need_grad_x)
    if (oh, ow) != (g.oh, g.ow):
        whole = np.zeros((n, k, g.oh, g.ow), dtype=x.dtype)
        whole[:, :, :oh, :ow] = grad_y
        return conv2d_backward(whole, x, W, stride, padding, need_grad_x)
    cdef int threads = _sample_threads(n)
    cdef Py_ssize_t first, second
    _backward_buffers(&g, k, variant, &first, &second)
    cdef Py_ssize_t per_thread = first + second
    cdef Py_ssize_t per_chunk = _grad_w_size(variant, k, g.c * g.kh * g.kw) + k
    cdef bint by_rows = variant == V_ROWS or variant == V_ROWS_COL2IM
    cdef cnp.ndarray grad_x = _output_array((<object>x).shape, x.dtype) if need_grad_x else None
    # patch-row order (K, kh, kw, C) on the stride-1 path, (kh, kw, C, kp) on the implicit
    # one, reordered at the end
    shape = ((k, g.kh, g.kw, g.c) if by_rows else (g.kh, g.kw, g.c, _lanes16(k))
             if variant == V_IMPLICIT else (<object>W).shape)
    cdef cnp.ndarray grad_w = _output_array(shape, x.dtype)
    cdef cnp.ndarray grad_b = np.empty(k, dtype=x.dtype)
    cdef _Block workspace = _take_workspace(
        threads * per_thread + _conv_backward_chunks(n, threads) * per_chunk, x.dtype)
    cdef cnp.ndarray weights = W
    if variant == V_ROWS:        # flipped[c, i, j, k] = W[k, c, kh-1-i, kw-1-j]
        weights = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))
    elif variant == V_IMPLICIT and _implicit_scatter(&g):
        weights = _implicit_grad_x_weights(W)
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(x)
    cdef void *pw = _data(weights)
    cdef void *pgx = _data(grad_x) if need_grad_x else NULL
    cdef void *pgw = _data(grad_w)
    cdef void *pgb = _data(grad_b)
    cdef void *pws = workspace.ptr
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            _conv_backward(<float*>pg, <float*>px, <float*>pw, <float*>pgx,
                           <float*>pgw, <float*>pgb, <float*>pws, n, &g, k, threads, variant)
        else:
            _conv_backward(<double*>pg, <double*>px, <double*>pw, <double*>pgx,
                           <double*>pgw, <double*>pgb, <double*>pws, n, &g, k, threads,
                           variant)
    _give_back(workspace)
    if by_rows:
        grad_w = np.ascontiguousarray(grad_w.transpose(0, 3, 1, 2))
    elif variant == V_IMPLICIT:
        grad_w = np.ascontiguousarray(grad_w[..., :k].transpose(3, 2, 0, 1))
    return grad_x, grad_w, grad_b


# --- variants: the choosers and what each path needs (fastnn/kernels/variants.py) ---

CONV_FORWARD_VARIANTS = {"winograd": V_WINOGRAD, "direct": V_DIRECT, "pointwise": V_POINTWISE,
                         "rows": V_ROWS, "columns": V_COLUMNS, "implicit": V_IMPLICIT}
CONV_BACKWARD_VARIANTS = {"winograd": V_WINOGRAD, "direct": V_DIRECT, "pointwise": V_POINTWISE,
                          "rows_transposed": V_ROWS, "rows_col2im": V_ROWS_COL2IM,
                          "columns": V_COLUMNS, "implicit": V_IMPLICIT}


# The implicit conv (float32 on AVX-512, stride 1, csrc/conv_implicit.c) is the patch-row
# GEMM without the patch matrix: the sample padded channels-last, the micro-kernel reading
# each patch's kernel rows (kw*C contiguous values) in place. It sums in the patch rows'
# order: on fastnn's GEMM, the rows path's bits (forward, and rows_col2im's backward).
# Batch 128 (LeNet 64), 2 threads, medians of 11, ms, rows / implicit: MNIST's 12 -> 24
# 5x5 on 14x14 forward 1.84 / 1.15, backward (rows_col2im) 3.01 / 2.82; LeNet's 6 -> 16
# forward (direct) 0.30 / 0.23, backward 0.61 / 0.53; 16 -> 16 5x5 on 12x12 forward
# (direct) 0.60 / 0.34 (rows 0.49); 8 -> 32 5x5 pad 2 on 16x16 forward 1.33 / 1.04,
# backward 3.32 / 2.64; 32 -> 64 forward 2.30 / 2.16 but backward (rows_transposed)
# 5.46 / 5.43: from TRANSPOSED_MIN_CHANNELS the backward keeps the transposed conv. One
# input channel: im2col columns stay faster (MNIST's 1 -> 12: 0.60 / 0.93). Tuned on:
# Intel Xeon (AVX-512), 2 vCPUs, KVM.
# The implicit backward's grad_x: from IMPLICIT_SCATTER_MIN_CHANNELS input channels, grad_y
# times the weights summed tap by tap straight into the padded sample, channels last in
# 16-lane groups (csrc/conv_implicit.c), no columns and no col2im; with fewer channels most
# lanes are padding and col2im stays faster. Batch 128, 2 threads, medians, ms, col2im /
# scatter: MNIST's 12 -> 24 5x5 on 14x14 2.80 / 2.27; 16 -> 32 2.9 / 2.0; LeNet's 6 -> 16
# 0.57 / 0.72. Tuned on: Intel Xeon (AVX-512), 2 vCPUs, KVM (session 9).
DEF IMPLICIT_SCATTER_MIN_CHANNELS = 12


cdef inline bint _implicit_scatter(const fnn_geometry *g) noexcept nogil:
    return g.c >= IMPLICIT_SCATTER_MIN_CHANNELS


cdef inline bint _implicit_pick(const fnn_geometry *g, bint single) noexcept nogil:
    """Whether the chooser takes the implicit conv: float32 on AVX-512, stride 1, and
    the patch-row territory (from ROWS_MIN_CHANNELS input channels, not 1x1)."""
    return single and _sgemm_supported and g.sh == 1 and g.sw == 1 and _by_rows(g)


cdef int _conv_forward_pick(const fnn_geometry *g, Py_ssize_t n, Py_ssize_t k, bint single) noexcept nogil:
    """The chooser: conv2d_forward's variant for this conv (see the sections above)."""
    if _use_winograd(g, n, k, single):
        return V_WINOGRAD
    if _implicit_pick(g, single):
        return V_IMPLICIT
    if single and fnn_direct_conv_fits(g, k) and not _pointwise(g) and not (
            _avx512_cpu and g.c < ROWS_MIN_CHANNELS and k >= 8):
        return V_DIRECT
    if _pointwise(g):
        return V_POINTWISE
    return V_ROWS if _by_rows(g) else V_COLUMNS


cdef int _conv_backward_pick(const fnn_geometry *g, Py_ssize_t n, Py_ssize_t k, bint single) noexcept nogil:
    """The chooser: conv2d_backward's variant for this conv (see the sections above)."""
    if _use_winograd(g, n, k, single):
        return V_WINOGRAD
    if _pointwise(g):
        return V_POINTWISE
    if not _by_rows(g):          # few channels: columns, or grad_W by the direct conv
        return V_DIRECT if single and fnn_direct_conv_fits(g, k) else V_COLUMNS
    if g.c < TRANSPOSED_MIN_CHANNELS and _implicit_pick(g, single):
        return V_IMPLICIT
    if not _transposable(g):
        return V_COLUMNS
    return V_ROWS if g.c >= TRANSPOSED_MIN_CHANNELS else V_ROWS_COL2IM


cdef bint _direct_conv_supported():
    """Whether this CPU and build run the direct conv at all (AVX2 + FMA, GCC)."""
    cdef fnn_geometry g = _geometry(1, 1, 8, 1, 1, (1, 1), (0, 0))
    return fnn_direct_conv_fits(&g, 1)


cdef str _conv_why_not(int variant, bint backward, const fnn_geometry *g, Py_ssize_t n, Py_ssize_t k,
                       bint single):
    """None where ``variant`` can run this conv, else why not."""
    got = (f"got a {g.kh}x{g.kw} kernel, stride ({g.sh}, {g.sw}), padding ({g.ph}, {g.pw}), "
           f"{n} samples, {g.c} -> {k} channels, {g.oh}x{g.ow} outputs")
    if variant == V_WINOGRAD and not _winograd_fits(g, n, k):
        return "needs a 3x3 kernel, stride 1, padding <= 2 and no empty dimension; " + got
    if variant == V_DIRECT:
        if not single:
            return "runs float32 only"
        if not _direct_conv_supported():
            return "needs a CPU with AVX2 + FMA (and a GCC build)"
        if not fnn_direct_conv_fits(g, k):
            return ("needs stride 1, at least 8 output columns, 1 to 16 filters and a kernel "
                    "at most 7 wide; " + got)
    if variant == V_IMPLICIT:
        if not single:
            return "runs float32 only"
        if not _sgemm_supported:
            return "needs a CPU with AVX-512F and AVX-512VL (and this build)"
        if g.sh != 1 or g.sw != 1:
            return "needs stride 1; " + got
    if variant == V_POINTWISE and not _pointwise(g):
        return "needs a 1x1 kernel, stride 1 and no padding; " + got
    if backward and (variant == V_ROWS or variant == V_ROWS_COL2IM) and not _transposable(g):
        return "needs stride 1 and padding smaller than the kernel; " + got
    return None


cdef int _conv_variant(bint backward, const fnn_geometry *g, Py_ssize_t n, Py_ssize_t k,
                       bint single) except -1:
    """The variant this call runs: the forced one (ValueError where it cannot run this
    conv), else the chooser's."""
    cdef int forced = _conv_backward_forced if backward else _conv_forward_forced
    if forced == 0:
        return _conv_backward_pick(g, n, k, single) if backward else \
            _conv_forward_pick(g, n, k, single)
    why = _conv_why_not(forced, backward, g, n, k, single)
    if why is not None:
        _forced_error("conv2d_backward" if backward else "conv2d_forward",
                      CONV_BACKWARD_VARIANTS if backward else CONV_FORWARD_VARIANTS, forced, why)
    return forced


def _conv_variants(bint backward, tuple x_shape, tuple w_shape, tuple stride, tuple padding,
                   dtype):
    """(the chooser's variant, {variant: None where it can run, else why not}) of
    conv2d_backward (``backward``) or conv2d_forward for these arguments."""
    cdef fnn_geometry g = _geometry(x_shape[1], x_shape[2], x_shape[3], w_shape[2], w_shape[3],
                                    stride, padding)
    cdef Py_ssize_t n = x_shape[0], k = w_shape[0]
    cdef bint single = np.dtype(dtype) == np.float32
    variants = CONV_BACKWARD_VARIANTS if backward else CONV_FORWARD_VARIANTS
    pick = _conv_backward_pick(&g, n, k, single) if backward else _conv_forward_pick(&g, n, k, single)
    why = {}
    for name, variant in variants.items():
        why[name] = _conv_why_not(variant, backward, &g, n, k, single)
    return [key for key, value in variants.items() if value == pick][0], why


cdef void _force_conv(bint backward, int variant):
    global _conv_forward_forced, _conv_backward_forced
    if backward:
        _conv_backward_forced = variant
    else:
        _conv_forward_forced = variant
