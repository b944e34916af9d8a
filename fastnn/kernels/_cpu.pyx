# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled CPU kernels: Cython wrappers around ``csrc/`` (C99 + OpenMP) and BLAS.

Same functions and arguments as ``_reference`` (already validated and
C-contiguous, ``stride``/``padding`` as ``(h, w)`` pairs). Every kernel takes
float32 or float64 and releases the GIL while it runs.

GEMMs: float32 ones from 2 MFLOP run on fastnn's own AVX-512 kernel
(``csrc/sgemm.c``, one thread per call) where the CPU has AVX-512; the others
come from the BLAS behind ``scipy.linalg.cython_blas`` (OpenBLAS in the wheels).

Threading, and why. BLAS has a thread pool of its own; the rest runs on OpenMP
(element-wise kernels, Winograd blocks) or, for jobs of microseconds to a
millisecond (GEMM blocks, batch-1 GEMVs, conv samples, SGD blocks), on fastnn's
own worker pool
(``csrc/pool.c``: its idle workers spin for 100 us, yielding their core, so a
job starts on them within a microsecond, where waking libgomp's passive
workers costs tens). The pools never run at the same time (each one's idle
workers would starve the other's: DESIGN.md measured 38 against 377 GFLOP/s):

- dense: the own kernel's GEMMs from 2^23 flops in blocks of columns over the
  worker pool (one call per block, as below); BLAS GEMMs from 2^27 flops one per
  product, threaded by BLAS, outside any OpenMP region (its threads share the
  packed operands: 150 GFLOP/s here against 110-130 for the same GEMMs split
  into single-threaded blocks);
  from 2^23 to 2^27, blocks over the worker pool with BLAS held to one
  thread, taken dynamically, on the calling thread alone while the other
  cores are busy (``_gemm_split``: a threaded GEMM of a millisecond stalls
  whenever the scheduler keeps one of its threads waiting); below, one BLAS
  thread. One sample (a GEMV): BLAS held to one thread, and from 256 KB of
  weights blocks of inputs over the worker pool (``_split_gemv_run``);
- conv: the samples over the worker pool (forward; backward: fixed chunks of
  samples), one patch matrix + single-threaded GEMM per sample and thread (two
  threads reach about 2 x 75 GFLOP/s where BLAS's own threads reach about 115
  on one sample's GEMM; a LeNet layer takes 0.2-1 ms, where a passive OpenMP
  region costs 50-60 us to start on this KVM guest). BLAS is held to one
  thread for the duration of that job (``fnn_blas_single_begin/end``,
  through the thread-count functions of the library, found with
  threadpoolctl) and restored afterwards. If that control cannot be found,
  or the batch is smaller than the thread count, samples run one after the
  other with BLAS threading each GEMM. Float32 stride-1 convs with few output
  channels (at most 16, e.g. LeNet's) run a direct conv per sample (no GEMM,
  csrc/direct_conv.c) in the same loops. 3x3 stride-1 float32 convs run as
  Winograd F(2x2, 3x3) instead (csrc/winograd_template.h): OpenMP over blocks
  of tiles, 16 single-threaded GEMMs per block, the same BLAS hold.
- SGD: a parameter of 65536 elements or more in blocks over the worker pool;
- element-wise kernels (ReLU, pools, softmax): OpenMP from 2^21 elements
  (FNN_PARALLEL_MIN), one thread below.

``fastnn.backend`` makes libgomp's idle workers sleep instead of spin
(``OMP_WAIT_POLICY=passive`` while this module loads, unless the user chose a
policy), so they do not steal a core from NumPy's BLAS between fastnn calls.
"""
import math
import os

import numpy as np
cimport numpy as cnp
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject, _Py_REFCNT
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t
from libc.math cimport sqrt, sqrtf
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

cnp.import_array()

cdef extern from "fastnn_kernels.h" nogil:
    ctypedef struct fnn_geometry:
        long c, h, w
        int kh, kw, sh, sw, ph, pw
        long oh, ow
    int fnn_max_threads()
    ctypedef void (*fnn_set_threads_fn)(int)
    ctypedef int (*fnn_get_threads_fn)()
    void fnn_blas_register(fnn_set_threads_fn set_threads, fnn_get_threads_fn get_threads)
    int fnn_blas_single_begin()
    void fnn_blas_single_end()
    ctypedef void (*fnn_task_fn)(void *ctx, long i) noexcept nogil
    int fnn_pool_run(fnn_task_fn task, void *ctx, long n_tasks)
    void fnn_pool_set_spin_us(long us)
    long fnn_pool_spin_us()
    int fnn_pool_workers()
    int fnn_pool_thread_index()
    void fnn_pool_stats(long *posted, long *helped)
    void fnn_pool_set_busy(int busy)
    void fnn_im2col_f(const float *x, long n, const fnn_geometry *g, float *cols, long ld, int parallel)
    void fnn_im2col_d(const double *x, long n, const fnn_geometry *g, double *cols, long ld, int parallel)
    void fnn_col2im_f(const float *cols, long n, const fnn_geometry *g, float *x, long ld, int parallel)
    void fnn_col2im_d(const double *cols, long n, const fnn_geometry *g, double *x, long ld, int parallel)
    void fnn_pad_rows_f(const float *a, long planes, long oh, long ow, long wp, float *out)
    void fnn_pad_rows_d(const double *a, long planes, long oh, long ow, long wp, double *out)
    void fnn_col2im_rows_f(const float *cols, const fnn_geometry *g, float *x, float *work)
    void fnn_col2im_rows_d(const double *cols, const fnn_geometry *g, double *x, double *work)
    void fnn_im2row_f(const float *x_hwc, const fnn_geometry *g, float *rows, int parallel)
    void fnn_im2row_d(const double *x_hwc, const fnn_geometry *g, double *rows, int parallel)
    void fnn_transpose_f(const float *a, long rows, long cols, float *out, int parallel)
    void fnn_transpose_d(const double *a, long rows, long cols, double *out, int parallel)
    void fnn_transpose_bias_f(const float *a, long rows, long cols, const float *bias,
                              float *out, int parallel)
    void fnn_transpose_bias_d(const double *a, long rows, long cols, const double *bias,
                              double *out, int parallel)
    void fnn_maxpool2d_forward_f(const float *x, long planes, long h, long w, int kh, int kw,
                                 int sh, int sw, float *y, int64_t *argmax)
    void fnn_maxpool2d_forward_d(const double *x, long planes, long h, long w, int kh, int kw,
                                 int sh, int sw, double *y, int64_t *argmax)
    long fnn_maxpool2d_backward_f(const float *grad_y, const int64_t *argmax, long planes,
                                  long ohw, long hw, float *grad_x, int zeroed)
    long fnn_maxpool2d_backward_d(const double *grad_y, const int64_t *argmax, long planes,
                                  long ohw, long hw, double *grad_x, int zeroed)
    void fnn_avgpool2d_forward_f(const float *x, long planes, long h, long w, int kh, int kw,
                                 int sh, int sw, float *y)
    void fnn_avgpool2d_forward_d(const double *x, long planes, long h, long w, int kh, int kw,
                                 int sh, int sw, double *y)
    void fnn_avgpool2d_backward_f(const float *grad_y, long planes, long h, long w, int kh,
                                  int kw, int sh, int sw, float *grad_x)
    void fnn_avgpool2d_backward_d(const double *grad_y, long planes, long h, long w, int kh,
                                  int kw, int sh, int sw, double *grad_x)
    void fnn_leaky_relu_forward_f(const float *x, float *y, long n, float alpha)
    void fnn_leaky_relu_forward_d(const double *x, double *y, long n, double alpha)
    void fnn_leaky_relu_backward_f(const float *grad_y, const float *x, float *grad_x, long n,
                                   float alpha)
    void fnn_leaky_relu_backward_d(const double *grad_y, const double *x, double *grad_x,
                                   long n, double alpha)
    void fnn_dropout_forward_f(const float *x, float *y, float *mask, long n, uint64_t keep_from,
                               float scale, uint64_t seed)
    void fnn_dropout_forward_d(const double *x, double *y, double *mask, long n,
                               uint64_t keep_from, double scale, uint64_t seed)
    void fnn_multiply_f(const float *a, const float *b, float *out, long n)
    void fnn_multiply_d(const double *a, const double *b, double *out, long n)
    void fnn_batchnorm_stats_f(const float *x, long n, long c, long s, float *mean, float *var,
                               double *work)
    void fnn_batchnorm_stats_d(const double *x, long n, long c, long s, double *mean,
                               double *var, double *work)
    void fnn_batchnorm_apply_f(const float *x, long n, long c, long s, const float *mean,
                               const float *var, float eps, const float *gamma,
                               const float *beta, float *inv_std, float *x_hat, float *y)
    void fnn_batchnorm_apply_d(const double *x, long n, long c, long s, const double *mean,
                               const double *var, double eps, const double *gamma,
                               const double *beta, double *inv_std, double *x_hat, double *y)
    void fnn_batchnorm_backward_f(const float *grad_y, const float *x_hat, long n, long c,
                                  long s, const float *gamma, const float *inv_std,
                                  float *grad_x, float *grad_gamma, float *grad_beta,
                                  double *work)
    void fnn_batchnorm_backward_d(const double *grad_y, const double *x_hat, long n, long c,
                                  long s, const double *gamma, const double *inv_std,
                                  double *grad_x, double *grad_gamma, double *grad_beta,
                                  double *work)
    void fnn_relu_forward_f(const float *x, float *y, long n)
    void fnn_relu_forward_d(const double *x, double *y, long n)
    void fnn_relu_backward_f(const float *grad_y, const float *y, float *grad_x, long n)
    void fnn_relu_backward_d(const double *grad_y, const double *y, double *grad_x, long n)
    double fnn_softmax_xent_f(const float *logits, long n, long c, const int64_t *labels,
                              const float *target, float *grad, double *row_loss,
                              int64_t *predicted)
    double fnn_softmax_xent_d(const double *logits, long n, long c, const int64_t *labels,
                              const double *target, double *grad, double *row_loss,
                              int64_t *predicted)
    void fnn_column_sums_f(const float *a, long rows, long cols, float *out)
    void fnn_column_sums_d(const double *a, long rows, long cols, double *out)
    int fnn_all_finite_f(const float *a, long n)
    int fnn_all_finite_d(const double *a, long n)
    void fnn_row_sums_f(const float *a, long rows, long cols, float *out, int accumulate)
    void fnn_row_sums_d(const double *a, long rows, long cols, double *out, int accumulate)
    void fnn_broadcast_f(float *a, const float *value, long rows, long cols, int per_row)
    void fnn_broadcast_d(double *a, const double *value, long rows, long cols, int per_row)
    ctypedef void (*fnn_gemm_fn_f)(int, int, int, int, int, float, const float *, int,
                                   const float *, int, float, float *, int)
    ctypedef void (*fnn_gemm_fn_d)(int, int, int, int, int, double, const double *, int,
                                   const double *, int, double, double *, int)
    long fnn_winograd_forward_workspace_f(long n, const fnn_geometry *g, long k, int threads)
    long fnn_winograd_forward_workspace_d(long n, const fnn_geometry *g, long k, int threads)
    void fnn_winograd_forward_f(const float *x, long n, const fnn_geometry *g, const float *w,
                                long k, const float *bias, float *y, float *work, int threads,
                                fnn_gemm_fn_f gemm)
    void fnn_winograd_forward_d(const double *x, long n, const fnn_geometry *g, const double *w,
                                long k, const double *bias, double *y, double *work,
                                int threads, fnn_gemm_fn_d gemm)
    long fnn_winograd_backward_workspace_f(long n, const fnn_geometry *g, long k, int threads,
                                           int need_grad_x)
    long fnn_winograd_backward_workspace_d(long n, const fnn_geometry *g, long k, int threads,
                                           int need_grad_x)
    void fnn_winograd_backward_f(const float *grad_y, const float *x, long n,
                                 const fnn_geometry *g, const float *w, long k, float *grad_x,
                                 float *grad_w, float *grad_b, float *work, int threads,
                                 fnn_gemm_fn_f gemm)
    void fnn_winograd_backward_d(const double *grad_y, const double *x, long n,
                                 const fnn_geometry *g, const double *w, long k,
                                 double *grad_x, double *grad_w, double *grad_b, double *work,
                                 int threads, fnn_gemm_fn_d gemm)
    long fnn_winograd_set_tiles(long tiles)
    int fnn_direct_conv_fits(const fnn_geometry *g, long k)
    long fnn_direct_conv_block(long k)
    long fnn_direct_conv_workspace(const fnn_geometry *g)
    void fnn_direct_conv_forward_f(const float *x, const fnn_geometry *g, const float *wt,
                                   long k, const float *bias, float *y, float *work)
    void fnn_direct_conv_grad_w_f(const float *grad_y, const float *x, const fnn_geometry *g,
                                  long k, float *grad_w, float *work)
    int fnn_sgemm_supported()
    int fnn_sgemm_direct_a
    ctypedef struct fnn_epilogue:
        const float *bias
        const float *mask
        float *relu
    int fnn_sgemm_ex(int trans_a, int trans_b, int m, int n, int k, float alpha,
                     const float *a, int lda, const float *b, int ldb, float beta,
                     float *c, int ldc, const fnn_epilogue *ep)
    int fnn_avx512_supported()
    int fnn_avx512_rows
    void fnn_sgd_momentum_f(float *p, const float *g, float *buf, long n, float lr,
                            float momentum)
    int fnn_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                  int lda, const float *b, int ldb, float beta, float *c, int ldc)


# --- typed helpers (one body for float and double) ---------------------------------

cdef inline void* _data(cnp.ndarray a):
    return cnp.PyArray_DATA(a)


# Who runs float32 GEMMs: fastnn's own AVX-512 kernel (csrc/sgemm.c) where the CPU
# has AVX-512 and the GEMM is not tiny (GEMM_AUTO), or always BLAS. FASTNN_GEMM=blas
# in the environment, or _set_gemm_engine, chooses BLAS (for comparisons).
DEF GEMM_AUTO = 0
DEF GEMM_OWN = 1                     # every float32 GEMM (tests of the kernel)
DEF GEMM_BLAS = 2
_GEMM_ENGINES = {"auto": GEMM_AUTO, "own": GEMM_OWN, "blas": GEMM_BLAS}
cdef bint _sgemm_supported = fnn_sgemm_supported()
cdef int _gemm_engine = GEMM_BLAS if os.environ.get("FASTNN_GEMM") == "blas" else GEMM_AUTO
# From this many flops the own kernel runs a GEMM. One thread, interleaved medians
# (own / OpenBLAS): 1.09-1.29x on the dense, MLP, LeNet and Winograd shapes of W1-W4
# from 2 MFLOP up (98-102 GFLOP/s against 78-91); below, thin ones lose: 128x10x128
# 0.55-0.75x, LeNet's 64x84x120 (1.3 MFLOP) 0.80x.
DEF OWN_SGEMM_MIN_FLOPS = 2097152.0


def _set_gemm_engine(str name):
    """Choose who runs float32 GEMMs: "auto" (fastnn's AVX-512 kernel where the CPU
    has it and the GEMM is not tiny, else BLAS), "own" (that kernel for every size;
    only where supported) or "blas"; returns the previous name."""
    global _gemm_engine
    if name not in _GEMM_ENGINES:
        raise ValueError(f"_set_gemm_engine: name must be one of {sorted(_GEMM_ENGINES)}, "
                         f"got {name!r}")
    if name == "own" and not _sgemm_supported:
        raise ValueError("_set_gemm_engine: this CPU (or build) has no AVX-512 GEMM kernel")
    old = [key for key, value in _GEMM_ENGINES.items() if value == _gemm_engine][0]
    _gemm_engine = _GEMM_ENGINES[name]
    return old


def _set_direct_a(bint on):
    """Let the own kernel read an untransposed A in place (True, the default) or pack
    every A (False), for tests: both give the same bits."""
    global fnn_sgemm_direct_a
    fnn_sgemm_direct_a = on


def _set_avx512_rows(bint on):
    """Run float32 softmax cross-entropy rows and finiteness checks in AVX-512 lanes
    where the CPU has them (True, the default) or on the portable loops (False), for
    tests; returns whether the AVX-512 loops run now."""
    global fnn_avx512_rows
    fnn_avx512_rows = on
    return bool(on and fnn_avx512_supported())


def own_sgemm_supported():
    """Whether fastnn's own float32 GEMM kernel runs on this CPU (AVX-512F and VL)."""
    return bool(_sgemm_supported)


cdef inline bint _own_gemm(bint single, double m, double n, double k) noexcept nogil:
    """Does fastnn's own kernel run this GEMM (float32 when ``single``)?"""
    if not single or not _sgemm_supported or _gemm_engine == GEMM_BLAS:
        return False
    return _gemm_engine == GEMM_OWN or 2.0 * m * n * k >= OWN_SGEMM_MIN_FLOPS


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
    cdef long i
    if m == 0 or n == 0:
        return
    if k == 0:                       # BLAS rejects a leading dimension of 0
        for i in range(<long>m * n):
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
    cdef long r, rows = 1 if ldc == n else m, cols = <long>m * n if ldc == n else n
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


cdef inline void _gemm_block(const _gemm_job *job, int j0, floating alpha,
                             const floating *a, const floating *b, floating beta,
                             floating *c) noexcept nogil:
    """Rows (by_rows) or columns [j0, j0 + width) of the job's c."""
    cdef _epilogue ep = job.ep
    cdef long at = <long>j0 * job.ldc if job.by_rows else j0     # the block's corner in c
    if ep.bias != NULL and not job.by_rows:
        ep.bias = <const floating*>ep.bias + j0
    if ep.mask != NULL:
        ep.mask = <const floating*>ep.mask + at
    if ep.relu != NULL:
        ep.relu = <floating*>ep.relu + at
    if job.by_rows:
        _gemm_epi(job.trans_a, job.trans_b, min(job.width, job.m - j0), job.n, job.k, alpha,
                  a + (j0 if job.trans_a else <long>j0 * job.lda), job.lda, b, job.ldb, beta,
                  c + at, job.ldc, &ep)
    else:
        _gemm_epi(job.trans_a, job.trans_b, job.m, min(job.width, job.n - j0), job.k, alpha,
                  a, job.lda, b + (<long>j0 * job.ldb if job.trans_b else j0), job.ldb, beta,
                  c + at, job.ldc, &ep)


cdef void _gemm_task(void *ctx, long block) noexcept nogil:
    cdef const _gemm_job *job = <const _gemm_job*>ctx
    cdef int j0 = <int>block * job.width
    if job.single:
        _gemm_block(job, j0, <float>job.alpha, <const float*>job.a, <const float*>job.b,
                    <float>job.beta, <float*>job.c)
    else:
        _gemm_block(job, j0, job.alpha, <const double*>job.a, <const double*>job.b,
                    job.beta, <double*>job.c)


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


cdef void _gemm_pair_task(void *ctx, long block) noexcept nogil:
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


cdef inline void _im2col(const floating *x, long n, const fnn_geometry *g, floating *cols,
                         long ld, int parallel) noexcept nogil:
    if floating is float:
        fnn_im2col_f(x, n, g, cols, ld, parallel)
    else:
        fnn_im2col_d(x, n, g, cols, ld, parallel)


cdef inline void _col2im(const floating *cols, long n, const fnn_geometry *g, floating *x,
                         long ld, int parallel) noexcept nogil:
    if floating is float:
        fnn_col2im_f(cols, n, g, x, ld, parallel)
    else:
        fnn_col2im_d(cols, n, g, x, ld, parallel)


cdef inline void _pad_rows(const floating *a, long planes, long oh, long ow, long wp,
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


cdef inline void _transpose(const floating *a, long rows, long cols, floating *out,
                            int parallel) noexcept nogil:
    if floating is float:
        fnn_transpose_f(a, rows, cols, out, parallel)
    else:
        fnn_transpose_d(a, rows, cols, out, parallel)


cdef inline void _transpose_bias(const floating *a, long rows, long cols,
                                 const floating *bias, floating *out, int parallel) noexcept nogil:
    """out (cols, rows) = a.T, plus bias (cols,) on each output row unless bias is NULL."""
    if bias == NULL:
        _transpose(a, rows, cols, out, parallel)
    elif floating is float:
        fnn_transpose_bias_f(a, rows, cols, bias, out, parallel)
    else:
        fnn_transpose_bias_d(a, rows, cols, bias, out, parallel)


cdef inline void _row_sums(const floating *a, long rows, long cols, floating *out,
                           int accumulate) noexcept nogil:
    if floating is float:
        fnn_row_sums_f(a, rows, cols, out, accumulate)
    else:
        fnn_row_sums_d(a, rows, cols, out, accumulate)


cdef inline void _broadcast(floating *a, const floating *value, long rows, long cols,
                            int per_row) noexcept nogil:
    if floating is float:
        fnn_broadcast_f(a, value, rows, cols, per_row)
    else:
        fnn_broadcast_d(a, value, rows, cols, per_row)


cdef fnn_geometry _geometry(long c, long h, long w, int kh, int kw, tuple stride,
                            tuple padding):
    """Window geometry of an input (C, H, W) and a kh x kw window."""
    cdef fnn_geometry g
    g.c, g.h, g.w = c, h, w
    g.kh, g.kw = kh, kw
    g.sh, g.sw = stride
    g.ph, g.pw = padding
    g.oh = (g.h + 2 * g.ph - kh) // g.sh + 1
    g.ow = (g.w + 2 * g.pw - kw) // g.sw + 1
    return g


def _is_float32(a):
    return a.dtype == np.float32


# --- im2col / col2im -----------------------------------------------------------------

def im2col(cnp.ndarray x, int kh, int kw, tuple stride, tuple padding):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*OH*OW); parallel over (row, sample)."""
    cdef fnn_geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, stride,
                                    padding)
    cdef long n = x.shape[0]
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
    cdef fnn_geometry g = _geometry(x_shape[1], x_shape[2], x_shape[3], kh, kw, stride,
                                    padding)
    cdef long n = x_shape[0]
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


# --- outputs from reused memory ------------------------------------------------------
#
# A kernel's output from OUTPUT_POOL_MIN bytes is a view of a buffer kept here, reused
# for a later output of the same size once nothing refers to it any more. Fresh memory
# faults in page by page, and on this VM (whose host reclaims the pages a process gives
# back) malloc hands back fresh pages all the time: 32 MiB or more is mapped anew on
# every call, and smaller blocks are trimmed off the heap's top when freed. W5's max-pool
# backward (its 32 MiB input gradient) took 3-20 ms instead of ~2; LeNet-5's training
# step (batch 64, activations of 0.1-1.2 MB) paid ~600 page faults, about 0.6 of its
# 3.4 ms. At most OUTPUT_POOL_BYTES stay held; free buffers of other sizes make room for
# a new one. Buffers sit in lists by size: a lookup reads only its own size's few.
DEF OUTPUT_POOL_MIN = 65536
DEF OUTPUT_POOL_BYTES = 134217728
cdef dict _output_pool = {}         # nbytes -> [uint8 buffers of that size]
cdef Py_ssize_t _output_pool_bytes = 0


cdef inline object _free_buffer(list buffers):
    """A buffer of ``buffers`` that only the pool refers to, or None."""
    cdef Py_ssize_t k
    cdef PyObject *held
    for k in range(len(buffers)):
        held = PyList_GET_ITEM(buffers, k)              # borrowed: the count stays the pool's
        if _Py_REFCNT(held) == 1:
            return <object>held
    return None


cdef void _output_pool_make_room(Py_ssize_t nbytes):
    """Drop free buffers (sizes in first-use order) until ``nbytes`` more fit."""
    global _output_pool_bytes
    cdef Py_ssize_t k
    for size in list(_output_pool):
        buffers = <list>_output_pool[size]
        k = 0
        while _output_pool_bytes + nbytes > OUTPUT_POOL_BYTES and k < len(buffers):
            if _Py_REFCNT(PyList_GET_ITEM(buffers, k)) == 1:
                del buffers[k]
                _output_pool_bytes -= size
            else:
                k += 1
        if not buffers:
            del _output_pool[size]
        if _output_pool_bytes + nbytes <= OUTPUT_POOL_BYTES:
            return


cpdef cnp.ndarray _output_array(tuple shape, dtype):
    """An uninitialized C-contiguous array, from the pool when large (see above)."""
    global _output_pool_bytes
    dtype = np.dtype(dtype)
    cdef Py_ssize_t nbytes = dtype.itemsize
    for d in shape:
        nbytes *= <Py_ssize_t>d
    if nbytes < OUTPUT_POOL_MIN:
        return np.empty(shape, dtype)
    buffers = _output_pool.get(nbytes)
    if buffers is not None:
        buffer = _free_buffer(<list>buffers)
        if buffer is not None:
            return buffer.view(dtype).reshape(shape)
    if _output_pool_bytes + nbytes > OUTPUT_POOL_BYTES:
        _output_pool_make_room(nbytes)
        if _output_pool_bytes + nbytes > OUTPUT_POOL_BYTES:
            return np.empty(shape, dtype)
        buffers = _output_pool.get(nbytes)
    buffer = np.empty(nbytes, np.uint8)
    if buffers is None:
        _output_pool[nbytes] = [buffer]
    else:
        (<list>buffers).append(buffer)
    _output_pool_bytes += nbytes
    return buffer.view(dtype).reshape(shape)


# --- max pooling -------------------------------------------------------------------

def maxpool2d_forward(cnp.ndarray x, int kh, int kw, tuple stride):
    """x: (N, C, H, W) -> (y, argmax int64), (N, C, OH, OW); parallel over (n, c) planes."""
    cdef long n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef int sh = stride[0], sw = stride[1]
    cdef long oh = (h - kh) // sh + 1, ow = (w - kw) // sw + 1
    cdef cnp.ndarray y = _output_array((n, c, oh, ow), x.dtype)
    cdef cnp.ndarray argmax = _output_array((n, c, oh, ow), np.int64)
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef int64_t *pa = <int64_t*>_data(argmax)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_maxpool2d_forward_f(<float*>px, n * c, h, w, kh, kw, sh, sw, <float*>py, pa)
        else:
            fnn_maxpool2d_forward_d(<double*>px, n * c, h, w, kh, kw, sh, sw, <double*>py, pa)
    return y, argmax


def maxpool2d_backward(cnp.ndarray grad_y, cnp.ndarray argmax, tuple x_shape):
    """grad_y, argmax: (N, C, OH, OW) -> grad_x: (N, C, H, W); parallel over planes,
    so the scatter-add of overlapping windows has no races."""
    cdef long planes = x_shape[0] * x_shape[1], hw = x_shape[2] * x_shape[3]
    cdef long ohw = grad_y.shape[2] * grad_y.shape[3], bad
    # each plane zeroed by the kernel just before its scatter (the memory may be reused)
    cdef cnp.ndarray grad_x = _output_array(x_shape, grad_y.dtype)
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(grad_x)
    cdef int64_t *pa = <int64_t*>_data(argmax)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            bad = fnn_maxpool2d_backward_f(<float*>pg, pa, planes, ohw, hw, <float*>px, 0)
        else:
            bad = fnn_maxpool2d_backward_d(<double*>pg, pa, planes, ohw, hw, <double*>px, 0)
    if bad:
        raise ValueError(f"maxpool2d_backward: {bad} argmax entries lie outside [0, {hw}) "
                         f"(a {x_shape[2]}x{x_shape[3]} plane); was argmax made for x_shape {x_shape}?")
    return grad_x


def avgpool2d_forward(cnp.ndarray x, int kh, int kw, tuple stride):
    """x: (N, C, H, W) -> y: (N, C, OH, OW), each window's mean; parallel over planes."""
    cdef long n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef int sh = stride[0], sw = stride[1]
    cdef cnp.ndarray y = _output_array((n, c, (h - kh) // sh + 1, (w - kw) // sw + 1), x.dtype)
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_avgpool2d_forward_f(<float*>px, n * c, h, w, kh, kw, sh, sw, <float*>py)
        else:
            fnn_avgpool2d_forward_d(<double*>px, n * c, h, w, kh, kw, sh, sw, <double*>py)
    return y


def avgpool2d_backward(cnp.ndarray grad_y, tuple x_shape, int kh, int kw, tuple stride):
    """grad_y: (N, C, OH, OW) -> grad_x: x_shape (N, C, H, W); parallel over planes."""
    cdef long planes = x_shape[0] * x_shape[1], h = x_shape[2], w = x_shape[3]
    cdef int sh = stride[0], sw = stride[1]
    cdef cnp.ndarray grad_x = _output_array(x_shape, grad_y.dtype)    # zeroed by the kernel
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_avgpool2d_backward_f(<float*>pg, planes, h, w, kh, kw, sh, sw, <float*>px)
        else:
            fnn_avgpool2d_backward_d(<double*>pg, planes, h, w, kh, kw, sh, sw, <double*>px)
    return grad_x


# --- ReLU -------------------------------------------------------------------------

def relu_forward(cnp.ndarray x, cnp.ndarray out=None):
    """y = max(x, 0) in one pass (into ``out``, which may be x); parallel above
    FNN_PARALLEL_MIN elements."""
    cdef cnp.ndarray y = _output_array((<object>x).shape, x.dtype) if out is None else out
    cdef long n = x.size
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_relu_forward_f(<float*>px, <float*>py, n)
        else:
            fnn_relu_forward_d(<double*>px, <double*>py, n)
    return y


def relu_backward(cnp.ndarray grad_y, cnp.ndarray y, cnp.ndarray out=None):
    """grad_x = grad_y where y > 0, else 0, in one pass (into ``out``, which may be
    grad_y or y)."""
    cdef cnp.ndarray grad_x = (_output_array((<object>grad_y).shape, grad_y.dtype) if out is None
                               else out)
    cdef long n = grad_y.size
    cdef void *pg = _data(grad_y)
    cdef void *py = _data(y)
    cdef void *px = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_relu_backward_f(<float*>pg, <float*>py, <float*>px, n)
        else:
            fnn_relu_backward_d(<double*>pg, <double*>py, <double*>px, n)
    return grad_x


# --- BLAS held to one thread inside the per-sample conv regions --------------------

# (set, get) thread-count functions of the BLAS libraries scipy may be built with
_BLAS_THREAD_CONTROLS = [
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
]
cdef bint _blas_bound = False
cdef bint _blas_controlled = False


def _find_blas_thread_control():
    """Addresses of (set_num_threads, get_num_threads) of the BLAS behind
    scipy.linalg.cython_blas, or (None, None) when it cannot be told apart."""
    import ctypes
    import scipy
    try:
        from threadpoolctl import ThreadpoolController
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    except Exception:          # threadpoolctl missing or unable to inspect this process
        return None, None
    root = os.path.dirname(os.path.realpath(scipy.__file__))
    behind_scipy = [lib for lib in blas if os.path.realpath(lib.filepath).startswith(
        (root + os.sep, root + ".libs" + os.sep))]
    for lib in behind_scipy or (blas if len(blas) == 1 else []):
        library = ctypes.CDLL(lib.filepath)
        for set_name, get_name in _BLAS_THREAD_CONTROLS:
            setter = getattr(library, set_name, None)
            getter = getattr(library, get_name, None)
            if setter is not None and getter is not None:
                return (ctypes.cast(setter, ctypes.c_void_p).value,
                        ctypes.cast(getter, ctypes.c_void_p).value)
    return None, None


def blas_thread_control():
    """True when fastnn can hold BLAS to one thread (so the per-sample conv GEMMs can
    run inside its OpenMP team)."""
    global _blas_bound, _blas_controlled
    cdef size_t set_address, get_address
    if not _blas_bound:
        _blas_bound = True
        setter, getter = _find_blas_thread_control()
        if setter and getter:
            set_address, get_address = setter, getter
            fnn_blas_register(<fnn_set_threads_fn>set_address, <fnn_get_threads_fn>get_address)
            _blas_controlled = True
    return _blas_controlled


def threads():
    """OpenMP threads the kernels use (OMP_NUM_THREADS, else one per core)."""
    return fnn_max_threads()


cdef int _sample_threads(long n):
    """OpenMP threads for per-sample conv work: all of them when BLAS can be held
    to one thread and there is a sample for each, else 1."""
    if not blas_thread_control() or n < 2:
        return 1
    return max(1, min(fnn_max_threads(), n))


# --- dense ------------------------------------------------------------------------

# A GEMM of fewer flops than this runs on one BLAS thread: waking BLAS's sleeping
# workers costs more than they save (LeNet's 64x400x120 dense forward took 17 ms
# threaded on this shared machine and 0.05 ms on one thread), and a threaded GEMM
# of a millisecond or so stalls whenever another process holds the second core
# (the MLP's 128x784x256 GEMMs: 0.43 ms threaded when quiet, 2.5 ms under load,
# against 0.6 ms on one thread; one training pass interleaved 10 times at load
# ~1.9: median 10.7k samples/s with 2^25 here, 48.5k with 2^27). Below m*n*k =
# 65536*4 OpenBLAS stays on one thread by itself, and the thread count is left
# alone (it costs microseconds, which batch-1 inference cannot spare).
cdef double _threaded_gemm_min_flops = 134217728.0     # 2^27, about 1.5 ms on one core
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
# 106k / 107k. With the other core busy all run about 70k.
cdef double _split_gemm_min_flops = 8388608.0           # 2^23


# A one-sample dense forward whose W has at least this many bytes runs as a GEMV in
# blocks of inputs over the worker pool (each core streams its part of W from its
# own L2). float32 GEMV, quiet machine, 15 interleaved rounds, medians split /
# whole: 256x128 (128 KB) 2.71 / 2.79 us, 384x128 2.34 / 2.41, 512x128 2.72 / 3.47,
# 784x128 3.16 / 4.41, 784x256 5.87 / 10.55; float64 784x256 15.1 / 28.9. With the
# other core busy the pool runs the blocks on the caller: 784x256 10.2 / 9.8 us.
cdef long _split_gemv_min_bytes = 262144


def _set_split_gemv_min_bytes(long nbytes):
    """Change the one-sample split threshold (for measurements and tests); returns the
    old one."""
    global _split_gemv_min_bytes
    old, _split_gemv_min_bytes = _split_gemv_min_bytes, nbytes
    return old


def _pool_spin_us(long us=-1):
    """How long (us) an idle pool worker spins before it sleeps; set it when us >= 0
    (for measurements). Returns the old value."""
    old = fnn_pool_spin_us()
    if us >= 0:
        fnn_pool_set_spin_us(us)
    return old


def _pool_workers():
    """Worker threads the pool has started in this process (for tests)."""
    return fnn_pool_workers()


ctypedef struct _nest_job:            # _pool_nested: results of the nested jobs
    int64_t *out
    long inner


cdef void _sum_task(void *ctx, long i) noexcept nogil:
    (<int64_t*>ctx)[0] += i + 1       # unsynchronized: right only when run serially


cdef void _nest_task(void *ctx, long i) noexcept nogil:
    cdef _nest_job *job = <_nest_job*>ctx
    cdef int64_t total = 0
    cdef int threads = fnn_pool_run(_sum_task, &total, job.inner)
    job.out[2 * i] = total
    job.out[2 * i + 1] = threads


def _pool_nested(long outer, long inner, bint in_openmp=False):
    """Tests of nested calls: ``outer`` tasks (a pool job, or an OpenMP loop when
    ``in_openmp``), each running a pool job of ``inner`` tasks that add i + 1 to one
    unsynchronized total. -> int64 (outer, 2): each nested job's total (inner *
    (inner + 1) / 2 when it ran serially) and the threads it reported."""
    cdef cnp.ndarray out = np.zeros((outer, 2), dtype=np.int64)
    cdef _nest_job job
    cdef long t
    job.out, job.inner = <int64_t*>_data(out), inner
    with nogil:
        if in_openmp:
            for t in prange(outer, num_threads=max(2, fnn_max_threads()), schedule="static"):
                _nest_task(&job, t)
        else:
            fnn_pool_run(_nest_task, &job, outer)
    return out


def _pool_stats():
    """(jobs posted to the pool's workers, jobs in which a worker ran a task) so far in
    this process (for measurements)."""
    cdef long posted, helped
    fnn_pool_stats(&posted, &helped)
    return posted, helped


cdef inline bint _split(double m, double n, double k) noexcept nogil:
    """Split a GEMM kept off BLAS's threads over the worker pool (see _gemm_split)?"""
    return 2.0 * m * n * k >= _split_gemm_min_flops and fnn_max_threads() > 1


def _assume_busy_cores():
    """Act as if contention had just been seen (for tests): the next split GEMMs and
    GEMVs run their blocks on the calling thread."""
    fnn_pool_set_busy(1)


def _set_split_gemm_min_flops(double flops):
    """Change the split threshold (for measurements and tests; 1e300: never split) and
    forget any contention seen, so the next split GEMM goes to the pool's workers;
    returns the old threshold."""
    global _split_gemm_min_flops
    old, _split_gemm_min_flops = _split_gemm_min_flops, flops
    fnn_pool_set_busy(0)
    return old


def _set_threaded_gemm_min_flops(double flops):
    """Change the threaded-GEMM threshold (for measurements); returns the old one."""
    global _threaded_gemm_min_flops
    old, _threaded_gemm_min_flops = _threaded_gemm_min_flops, flops
    return old


cdef inline bint _small_gemm(double m, double n, double k) noexcept nogil:
    """A GEMM that BLAS would thread but should not."""
    return BLAS_OWN_SINGLE_THREAD_MNK <= m * n * k and 2.0 * m * n * k < _threaded_gemm_min_flops


DEF GEMV_SCRATCH = 4096             # outputs of the partial sums of a split GEMV


ctypedef struct _gemv_job:           # one sample's dense forward, cut into blocks of inputs
    bint single
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


cdef void _gemv_task(void *ctx, long block) noexcept nogil:
    cdef const _gemv_job *job = <const _gemv_job*>ctx
    cdef long r0 = block * job.rows, offset = r0 * job.o
    cdef int rows = min(job.rows, job.i - <int>r0)
    if job.single:
        _gemv(<const float*>job.x + r0, <const float*>job.weights + offset,
              <const float*>job.bias if block == 0 else NULL,
              <float*>job.y if block == 0 else <float*>job.partial + (block - 1) * job.o,
              rows, job.o)
    else:
        _gemv(<const double*>job.x + r0, <const double*>job.weights + offset,
              <const double*>job.bias if block == 0 else NULL,
              <double*>job.y if block == 0 else <double*>job.partial + (block - 1) * job.o,
              rows, job.o)


cdef inline int _gemv_blocks(long i, long o) noexcept nogil:
    """Blocks of inputs of a split one-sample dense forward: one per thread, of at least
    64 inputs, their partial sums within GEMV_SCRATCH."""
    return <int>max(1, min(fnn_max_threads(), i // 64, 1 + GEMV_SCRATCH // o))


cdef inline bint _split_gemv(long i, long o, long itemsize) noexcept nogil:
    """Split a one-sample dense forward of W (i, o) over the worker pool?"""
    return i * o * itemsize >= _split_gemv_min_bytes and _gemv_blocks(i, o) > 1


cdef void _split_gemv_run(const floating *x, const floating *weights, const floating *bias,
                          floating *y, int i, int o) noexcept nogil:
    """_gemv in blocks of rows of W (contiguous, so each core streams its own part of
    W from its own cache; blocks of output columns would read W in strided pieces, 20%
    slower on one core) over the worker pool, each on one BLAS thread (the caller holds
    BLAS to one thread); y = block 0 + block 1 + ..., in that order. The blocks depend
    only on the shape and the thread count: the same bits whoever runs them."""
    cdef floating partial[GEMV_SCRATCH]
    cdef _gemv_job job
    cdef int count = _gemv_blocks(i, o), block, k
    job.single = floating is float
    job.i, job.o = i, o
    job.rows = ((i + count - 1) // count + 15) // 16 * 16
    count = (i + job.rows - 1) // job.rows
    job.x, job.weights, job.bias, job.y, job.partial = x, weights, bias, y, partial
    fnn_pool_run(_gemv_task, &job, count)
    for block in range(count - 1):
        for k in range(o):
            y[k] += partial[block * o + k]


cdef void _dense_forward(const floating *x, const floating *weights, const floating *bias,
                         floating *y, int n, int i, int o, bint split=False,
                         floating *relu=NULL) noexcept nogil:
    """y (n, o) = x (n, i) @ W (i, o) + bias, and ``relu`` (n, o) = max(y, 0) unless
    NULL. With ``split``: GEMMs in blocks over the pool (_gemm_split), one sample's GEMV
    in blocks over the pool (_split_gemv_run)."""
    cdef _epilogue ep
    if n == 1 and i > 0 and o > 0:
        if split:
            _split_gemv_run(x, weights, bias, y, i, o)
        else:
            _gemv(x, weights, bias, y, i, o)
        if relu != NULL:
            if floating is float:
                fnn_relu_forward_f(y, relu, o)
            else:
                fnn_relu_forward_d(y, relu, o)
        return
    # the bias and the ReLU on the GEMM's tiles (see _gemm_epi)
    ep.bias, ep.mask, ep.relu = bias, NULL, relu
    _gemm_any(split, False, False, n, o, i, 1, x, i, weights, o, 0, y, o, &ep)


cdef bint _dense_forward_plan(int n, int i, int o, long itemsize, bint *split):
    """How _dense_forward runs x (n, i) @ W (i, o): returns whether BLAS must be held
    to one thread around it, and sets ``split``."""
    if n == 1:                       # BLAS would thread a GEMV of this size by itself
        small = <double>i * o >= BLAS_OWN_SINGLE_THREAD_MN and blas_thread_control()
        split[0] = small and _split_gemv(i, o, itemsize)
        return small
    small = _small_gemm(n, i, o) and blas_thread_control()
    split[0] = (small or _own_gemm(itemsize == 4, n, i, o)) and _split(n, i, o)
    return small


def leaky_relu_forward(cnp.ndarray x, double alpha):
    """y = x where x > 0, else alpha * x (alpha rounded to x's dtype), in one pass."""
    cdef cnp.ndarray y = _output_array((<object>x).shape, x.dtype)
    cdef long n = x.size
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_leaky_relu_forward_f(<float*>px, <float*>py, n, <float>alpha)
        else:
            fnn_leaky_relu_forward_d(<double*>px, <double*>py, n, alpha)
    return y


def leaky_relu_backward(cnp.ndarray grad_y, cnp.ndarray x, double alpha):
    """grad_x = grad_y where x > 0, else alpha * grad_y, in one pass."""
    cdef cnp.ndarray grad_x = _output_array((<object>grad_y).shape, grad_y.dtype)
    cdef long n = grad_y.size
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(x)
    cdef void *pgx = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_leaky_relu_backward_f(<float*>pg, <float*>px, <float*>pgx, n, <float>alpha)
        else:
            fnn_leaky_relu_backward_d(<double*>pg, <double*>px, <double*>pgx, n, alpha)
    return grad_x


# --- dropout (the layer's CPU path; the same calls and masks as the CUDA module's) -----

def dropout_forward(cnp.ndarray x, double p, seed):
    """Inverted dropout of x (C-contiguous), p in [0, 1) -> (y, mask), mask = 1/(1-p)
    where the counter-based uniform of (seed, element index) is >= p, else 0; the
    CUDA module's masks, bit for bit."""
    cdef cnp.ndarray y = _output_array((<object>x).shape, x.dtype)
    cdef cnp.ndarray mask = _output_array((<object>x).shape, x.dtype)
    cdef uint64_t keep_from = <uint64_t>math.ceil(p * 9007199254740992.0)
    cdef uint64_t s = <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF)
    cdef double scale = x.dtype.type(1.0 / (1.0 - p))
    cdef long n = x.size
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef void *pm = _data(mask)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_dropout_forward_f(<float*>px, <float*>py, <float*>pm, n, keep_from,
                                  <float>scale, s)
        else:
            fnn_dropout_forward_d(<double*>px, <double*>py, <double*>pm, n, keep_from, scale, s)
    return y, mask


def dropout_backward(cnp.ndarray grad_y, cnp.ndarray mask):
    """grad_x = grad_y * mask (both C-contiguous, one shape and dtype)."""
    cdef cnp.ndarray grad_x = _output_array((<object>grad_y).shape, grad_y.dtype)
    cdef long n = grad_y.size
    cdef void *pg = _data(grad_y)
    cdef void *pm = _data(mask)
    cdef void *px = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_multiply_f(<float*>pg, <float*>pm, <float*>px, n)
        else:
            fnn_multiply_d(<double*>pg, <double*>pm, <double*>px, n)
    return grad_x


# --- batch normalisation (the layers' CPU path; the same calls as the CUDA module's) ---

def batchnorm_forward(cnp.ndarray x, gamma, beta, double eps, mean=None, var=None):
    """x: (N, C) or (N, C, ...) C-contiguous; gamma, beta: (C,) -> (y, x_hat, mean, var,
    inv_std). With ``mean``/``var`` None (training) the batch's mean and biased variance
    per channel (double sums, two passes), else the given (running) statistics."""
    cdef long n = x.shape[0], c = x.shape[1]
    cdef long s = x.size // (n * c) if n * c else 0
    dtype = x.dtype
    gamma, beta = np.ascontiguousarray(gamma, dtype), np.ascontiguousarray(beta, dtype)
    training = mean is None
    if training:
        mean, var = np.empty(c, dtype), np.empty(c, dtype)
    else:
        mean, var = np.ascontiguousarray(mean, dtype), np.ascontiguousarray(var, dtype)
    cdef cnp.ndarray work = np.empty(2 * c, np.float64)
    cdef cnp.ndarray inv_std = np.empty(c, dtype)
    cdef cnp.ndarray x_hat = _output_array((<object>x).shape, dtype)
    cdef cnp.ndarray y = _output_array((<object>x).shape, dtype)
    cdef void *px = _data(x)
    cdef void *pm = _data(<cnp.ndarray>mean)
    cdef void *pv = _data(<cnp.ndarray>var)
    cdef void *pga = _data(<cnp.ndarray>gamma)
    cdef void *pbe = _data(<cnp.ndarray>beta)
    cdef void *pinv = _data(inv_std)
    cdef void *ph = _data(x_hat)
    cdef void *py = _data(y)
    cdef double *pw = <double*>_data(work)
    cdef bint single = _is_float32(x), stats = training
    with nogil:
        if single:
            if stats:
                fnn_batchnorm_stats_f(<float*>px, n, c, s, <float*>pm, <float*>pv, pw)
            fnn_batchnorm_apply_f(<float*>px, n, c, s, <float*>pm, <float*>pv, <float>eps,
                                  <float*>pga, <float*>pbe, <float*>pinv, <float*>ph,
                                  <float*>py)
        else:
            if stats:
                fnn_batchnorm_stats_d(<double*>px, n, c, s, <double*>pm, <double*>pv, pw)
            fnn_batchnorm_apply_d(<double*>px, n, c, s, <double*>pm, <double*>pv, eps,
                                  <double*>pga, <double*>pbe, <double*>pinv, <double*>ph,
                                  <double*>py)
    return y, x_hat, mean, var, inv_std


def batchnorm_backward(cnp.ndarray grad_y, cnp.ndarray x_hat, gamma, cnp.ndarray inv_std):
    """Training-mode backward -> (grad_x, grad_gamma, grad_beta); grad_y and x_hat of one
    shape, C-contiguous."""
    cdef long n = grad_y.shape[0], c = grad_y.shape[1]
    cdef long s = grad_y.size // (n * c) if n * c else 0
    dtype = grad_y.dtype
    gamma = np.ascontiguousarray(gamma, dtype)
    inv_std = np.ascontiguousarray(inv_std, dtype)
    cdef cnp.ndarray work = np.empty(2 * c, np.float64)
    cdef cnp.ndarray grad_x = _output_array((<object>grad_y).shape, dtype)
    cdef cnp.ndarray grad_gamma = np.empty(c, dtype)
    cdef cnp.ndarray grad_beta = np.empty(c, dtype)
    cdef void *pg = _data(grad_y)
    cdef void *ph = _data(x_hat)
    cdef void *pga = _data(<cnp.ndarray>gamma)
    cdef void *pinv = _data(inv_std)
    cdef void *pgx = _data(grad_x)
    cdef void *pgg = _data(grad_gamma)
    cdef void *pgb = _data(grad_beta)
    cdef double *pw = <double*>_data(work)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_batchnorm_backward_f(<float*>pg, <float*>ph, n, c, s, <float*>pga, <float*>pinv,
                                     <float*>pgx, <float*>pgg, <float*>pgb, pw)
        else:
            fnn_batchnorm_backward_d(<double*>pg, <double*>ph, n, c, s, <double*>pga,
                                     <double*>pinv, <double*>pgx, <double*>pgg, <double*>pgb,
                                     pw)
    return grad_x, grad_gamma, grad_beta


def dense_forward(cnp.ndarray x, cnp.ndarray W, b, bint relu=False):
    """x: (N, I), W: (I, O), b: (O,) or None -> y (N, O) = x @ W + b, then max(y, 0)
    when ``relu`` (the bits of relu_forward(dense_forward(x, W, b))): one GEMM (own
    kernel in blocks over the worker pool, or BLAS, see the module docstring), the bias
    and the ReLU on the own kernel's tiles (else the bias pre-broadcast, beta = 1, and
    the ReLU in a pass over y); one sample: a GEMV, in slices over the worker pool when
    W is large."""
    cdef int n = x.shape[0], i = x.shape[1], o = W.shape[1]
    cdef cnp.ndarray y = _output_array((n, o), x.dtype)
    cdef void *px = _data(x)
    cdef void *pw = _data(W)
    cdef void *pb = NULL if b is None else _data(b)
    cdef void *py = _data(y)
    cdef void *pr = py if relu else NULL         # the ReLU in place, over y
    cdef bint single = _is_float32(x)
    cdef bint split
    cdef bint small = _dense_forward_plan(n, i, o, x.itemsize, &split)
    with nogil:
        if small:
            fnn_blas_single_begin()
        if single:
            _dense_forward(<float*>px, <float*>pw, <float*>pb, <float*>py, n, i, o, split,
                           <float*>pr)
        else:
            _dense_forward(<double*>px, <double*>pw, <double*>pb, <double*>py, n, i, o, split,
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


DEF PAIR_MIN_FLOPS = 262144.0       # both GEMMs of a small dense backward, see below


cdef bint _dense_backward_plan(int n, int i, int o, bint single, bint need_grad_x,
                               bint blas_control, bint *split, bint *pair) noexcept:
    """How _dense_backward runs: returns whether BLAS must be held to one thread around
    it, and sets ``split`` and ``pair``."""
    cdef bint small = _small_gemm(n, i, o) and blas_control
    cdef bint pooled = small or _own_gemm(single, n, i, o)     # kept off BLAS's threads
    split[0] = pooled and _split(n, i, o)
    # the pair from the split size of both GEMMs together: LeNet's 64x400x120 backward
    # 141 us on one thread, about 70 on two
    pair[0] = pooled and need_grad_x and _split(2.0 * n, i, o)
    if (not pair[0] and need_grad_x and blas_control and fnn_max_threads() > 1
            and 4.0 * n * i * o >= PAIR_MIN_FLOPS
            and 2.0 * n * i * o < _threaded_gemm_min_flops):
        # two GEMMs too small to split, each worth a thread of its own: side by side,
        # BLAS held to one thread (interleaved medians, serial / pair: W2's 128x128x10
        # output layer 10.3 / 6.9 us, LeNet's 64x120x84 29.6 / 18.9, 32x64x32 4.6 /
        # 4.0; on two threads each GEMM whole on its own: the serial calls' bits)
        pair[0] = small = True
    return small


def dense_backward(cnp.ndarray grad_y, cnp.ndarray x, cnp.ndarray W, bint need_grad_x=True,
                   bint relu_x=False):
    """-> (grad_x (N, I) or None, grad_W (I, O), grad_b (O,)): two GEMMs (one without
    grad_x), side by side over the worker pool when both are worth a thread (else each
    threaded as in dense_forward), and a column sum. ``relu_x``: x is the output of a
    ReLU, whose backward is fused into grad_x's GEMM (0 where x is not > 0, on the own
    kernel's tiles, else in a pass): the bits of relu_backward(grad_x, x)."""
    cdef int n = x.shape[0], i = x.shape[1], o = W.shape[1]
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
    cdef bint split, pair
    cdef bint small = _dense_backward_plan(n, i, o, single, need_grad_x,
                                           blas_thread_control(), &split, &pair)
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


# --- SGD --------------------------------------------------------------------------

cdef void _sgd_step(floating *p, const floating *g, floating *buf, long n, floating lr,
                    floating momentum, floating weight_decay, floating l1, bint nesterov,
                    bint first) noexcept nogil:
    cdef long k
    cdef floating d, v
    if weight_decay == 0 and l1 == 0 and not nesterov:
        if buf == NULL:                  # plain SGD
            for k in range(n):
                p[k] = p[k] - lr * g[k]
            return
        if not first:                    # momentum, the common case: a branch-free loop
            if floating is float and _sgemm_supported and _avx_sgd:   # 16 lanes
                fnn_sgd_momentum_f(p, g, buf, n, lr, momentum)
                return
            for k in range(n):
                v = momentum * buf[k] + g[k]
                buf[k] = v
                p[k] = p[k] - lr * v
            return
    for k in range(n):
        d = g[k]
        if weight_decay != 0:
            d = d + weight_decay * p[k]
        if l1 != 0:
            d = d + l1 * ((p[k] > 0) - (p[k] < 0))
        if buf != NULL:
            v = d if first else momentum * buf[k] + d
            buf[k] = v
            d = d + momentum * v if nesterov else v
        p[k] = p[k] - lr * d


cdef bint _avx_sgd = True          # float32 momentum steps on fnn_sgd_momentum_f


def _set_avx_sgd(bint on):
    """Run float32 momentum steps on the AVX-512 loop where the CPU has it (True, the
    default) or on the portable one (False), for tests: both give the same bits."""
    global _avx_sgd
    _avx_sgd = on


# A parameter of this many elements or more is updated in blocks over the worker
# pool (element-wise, so the bits do not depend on the split): W2's 784x256
# weights, 3 streams of 0.8 MB, and its 256x128 ones, whose momentum buffer comes
# from memory (the step's other data pushed it out): 33 -> 22 us on two threads.
DEF SGD_SPLIT_MIN = 16384
DEF SGD_BLOCK = 16384


ctypedef struct _sgd_job:
    bint single, nesterov, first, has_buf
    void *p
    const void *g
    void *buf
    long n, block
    double lr, momentum, weight_decay, l1


cdef void _sgd_task(void *ctx, long block) noexcept nogil:
    """Elements [block * job.block, ...) of an _sgd_job."""
    cdef const _sgd_job *job = <const _sgd_job*>ctx
    cdef long lo = block * job.block
    cdef long count = min(job.block, job.n - lo)
    if job.single:
        _sgd_step(<float*>job.p + lo, <const float*>job.g + lo,
                  <float*>job.buf + lo if job.has_buf else NULL, count, <float>job.lr,
                  <float>job.momentum, <float>job.weight_decay, <float>job.l1,
                  job.nesterov, job.first)
    else:
        _sgd_step(<double*>job.p + lo, <const double*>job.g + lo,
                  <double*>job.buf + lo if job.has_buf else NULL, count, job.lr,
                  job.momentum, job.weight_decay, job.l1, job.nesterov, job.first)


cdef void _sgd_job_init(_sgd_job *job, cnp.ndarray p, cnp.ndarray g, buf, double lr,
                        double momentum, double weight_decay, double l1, bint nesterov,
                        bint first):
    """sgd_step's job (``buf``: an array or None), for _sgd_run."""
    job.n = p.size
    job.p, job.g = _data(p), _data(g)
    job.has_buf = buf is not None
    job.buf = _data(<cnp.ndarray>buf) if job.has_buf else NULL
    job.single = _is_float32(p)
    job.lr, job.momentum, job.weight_decay, job.l1 = lr, momentum, weight_decay, l1
    job.nesterov, job.first = nesterov, first
    job.block = SGD_BLOCK if job.n >= SGD_SPLIT_MIN else max(job.n, 1)   # else one task


cdef inline void _sgd_run(_sgd_job *job) noexcept nogil:
    fnn_pool_run(_sgd_task, job, (job.n + job.block - 1) // job.block)


def sgd_step(cnp.ndarray p, cnp.ndarray g, cnp.ndarray buf, double lr, double momentum,
             double weight_decay, double l1, bint nesterov, bint first):
    """PyTorch's SGD rule on one parameter, in place and in one pass (dampening 0):
    d = g + weight_decay * p + l1 * sign(p); buf = d (``first``) or momentum * buf + d
    (``buf`` None: no momentum); d = d + momentum * buf (nesterov) or buf; p -= lr * d.
    p, g, buf: C-contiguous, same shape and dtype (float32 or float64). From
    SGD_SPLIT_MIN elements, blocks of SGD_BLOCK over the worker pool."""
    cdef _sgd_job job
    _sgd_job_init(&job, p, g, buf, lr, momentum, weight_decay, l1, nesterov, first)
    with nogil:
        _sgd_run(&job)


# --- Adam ---------------------------------------------------------------------------

cdef void _adam_step(floating *p, const floating *g, floating *m, floating *v, long n,
                     floating step_size, floating beta1, floating one_minus_beta1,
                     floating beta2, floating one_minus_beta2, floating inv_sqrt_bc2,
                     floating eps, floating weight_decay) noexcept nogil:
    """Adam on n elements, one pass, in adam_step's order of operations."""
    cdef long k
    cdef floating d, mk, vk, root
    for k in range(n):
        d = g[k]
        if weight_decay != 0:
            d = d + weight_decay * p[k]
        mk = beta1 * m[k] + one_minus_beta1 * d
        vk = beta2 * v[k] + one_minus_beta2 * (d * d)
        m[k] = mk
        v[k] = vk
        root = sqrtf(vk) if floating is float else sqrt(vk)
        p[k] = p[k] - step_size * (mk / (root * inv_sqrt_bc2 + eps))


ctypedef struct _adam_job:
    bint single
    void *p
    const void *g
    void *m
    void *v
    long n, block
    double step_size, beta1, beta2, inv_sqrt_bc2, eps, weight_decay


cdef void _adam_task(void *ctx, long block) noexcept nogil:
    """Elements [block * job.block, ...) of an _adam_job; the scalars rounded to the
    dtype (1 - beta in double first, as NumPy does with a Python float)."""
    cdef const _adam_job *job = <const _adam_job*>ctx
    cdef long lo = block * job.block
    cdef long count = min(job.block, job.n - lo)
    if job.single:
        _adam_step(<float*>job.p + lo, <const float*>job.g + lo, <float*>job.m + lo,
                   <float*>job.v + lo, count, <float>job.step_size, <float>job.beta1,
                   <float>(1.0 - job.beta1), <float>job.beta2, <float>(1.0 - job.beta2),
                   <float>job.inv_sqrt_bc2, <float>job.eps, <float>job.weight_decay)
    else:
        _adam_step(<double*>job.p + lo, <const double*>job.g + lo, <double*>job.m + lo,
                   <double*>job.v + lo, count, job.step_size, job.beta1, 1.0 - job.beta1,
                   job.beta2, 1.0 - job.beta2, job.inv_sqrt_bc2, job.eps, job.weight_decay)


def adam_step(cnp.ndarray p, cnp.ndarray g, cnp.ndarray m, cnp.ndarray v, double step_size,
              double beta1, double beta2, double inv_sqrt_bc2, double eps,
              double weight_decay):
    """PyTorch's Adam rule on one parameter, in place (p, m, v) and in one pass:
    g = g + weight_decay * p (when weight_decay != 0); m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * (g * g); p -= step_size * (m / (sqrt(v) *
    inv_sqrt_bc2 + eps)), in the parameter's dtype with the scalars rounded to it
    (step_size = lr / (1 - beta1^t), inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t)). p, g, m, v:
    C-contiguous, one shape and dtype (float32 or float64). From SGD_SPLIT_MIN elements,
    blocks of SGD_BLOCK over the worker pool (element-wise: the same bits)."""
    cdef _adam_job job
    cdef cnp.ndarray a
    for a in (g, m, v):
        if a.dtype != p.dtype or a.size != p.size or not a.flags.c_contiguous:
            raise ValueError(f"adam_step: g, m and v must be C-contiguous arrays of p's size "
                             f"{p.size} and dtype {p.dtype}, got size {a.size}, {a.dtype}")
    if p.dtype != np.float32 and p.dtype != np.float64 or not p.flags.c_contiguous:
        raise ValueError(f"adam_step: p must be a C-contiguous float32 or float64 array, "
                         f"got {p.dtype}")
    job.n = p.size
    job.p, job.g, job.m, job.v = _data(p), _data(g), _data(m), _data(v)
    job.single = _is_float32(p)
    job.step_size, job.beta1, job.beta2 = step_size, beta1, beta2
    job.inv_sqrt_bc2, job.eps, job.weight_decay = inv_sqrt_bc2, eps, weight_decay
    job.block = SGD_BLOCK if job.n >= SGD_SPLIT_MIN else max(job.n, 1)   # else one task
    with nogil:
        fnn_pool_run(_adam_task, &job, (job.n + job.block - 1) // job.block)


DEF FINITE_BLOCKS = 64               # most blocks of an all_finite over the pool
DEF FINITE_SPLIT_MIN = 2097152       # elements from which it is split


ctypedef struct _finite_job:
    const void *x
    long n, block
    bint single
    int ok[FINITE_BLOCKS]            # per block: 1 when all its elements are finite


cdef void _finite_task(void *ctx, long block) noexcept nogil:
    cdef _finite_job *job = <_finite_job*>ctx
    cdef long lo = block * job.block
    cdef long count = min(job.block, job.n - lo)
    if job.single:
        job.ok[block] = fnn_all_finite_f(<const float*>job.x + lo, count)
    else:
        job.ok[block] = fnn_all_finite_d(<const double*>job.x + lo, count)


def all_finite(cnp.ndarray x):
    """True when no element of x (float32 or float64, C-contiguous) is NaN or infinite:
    one pass, no temporary array; in blocks over the worker pool from FINITE_SPLIT_MIN
    elements (MNIST's 60000 x 784 floats, which fit checks on entry: 14 ms on one
    thread, bound by one core's memory bandwidth)."""
    cdef _finite_job job
    cdef long blocks = 1, b
    job.n = x.size
    job.x = _data(x)
    job.single = x.itemsize == 4
    if job.n >= FINITE_SPLIT_MIN:
        blocks = min(FINITE_BLOCKS, job.n // (FINITE_SPLIT_MIN // 2))
    job.block = (job.n + blocks - 1) // blocks if job.n else 1
    blocks = (job.n + job.block - 1) // job.block
    with nogil:
        fnn_pool_run(_finite_task, &job, blocks)
    for b in range(blocks):
        if not job.ok[b]:
            return False
    return True


# --- softmax cross-entropy -----------------------------------------------------------

def softmax_cross_entropy(cnp.ndarray logits, cnp.ndarray labels):
    """logits (N, C), labels int64 (N,) or probabilities (N, C) -> (mean loss, grad (N, C)).

    Fused: one pass per row (max, exp, sum, log), the loss summed in float64."""
    cdef long n = logits.shape[0], c = logits.shape[1]
    cdef cnp.ndarray grad = _output_array((n, c), logits.dtype)
    cdef cnp.ndarray row_loss = np.empty(n, dtype=np.float64)
    cdef bint by_index = labels.ndim == 1
    cdef void *pz = _data(logits)
    cdef void *pg = _data(grad)
    cdef double *pr = <double*>_data(row_loss)
    cdef int64_t *pi = <int64_t*>_data(labels) if by_index else NULL
    cdef void *pt = NULL if by_index else _data(labels)
    cdef double loss
    cdef bint single = _is_float32(logits)
    with nogil:
        if single:
            loss = fnn_softmax_xent_f(<float*>pz, n, c, pi, <float*>pt, <float*>pg, pr, NULL)
        else:
            loss = fnn_softmax_xent_d(<double*>pz, n, c, pi, <double*>pt, <double*>pg, pr, NULL)
    return logits.dtype.type(loss), grad


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
# Workspaces are pooled: allocating and freeing megabytes per call pays the page
# faults every time (DESIGN.md). list.pop/append are atomic under the GIL, so
# concurrent callers never share a buffer.
_workspace_pool = []

# Which conv algorithm runs: chosen per shape (CONV_AUTO), or forced for tests and
# measurements (_set_conv_algorithm; see the Winograd section below).
DEF CONV_AUTO = 0
DEF CONV_WINOGRAD = 1
DEF CONV_IM2COL = 2
cdef int _conv_algorithm = CONV_AUTO


def _take_workspace(Py_ssize_t count, dtype):
    """A uint8 buffer holding at least ``count`` elements of ``dtype``."""
    nbytes = max(count * np.dtype(dtype).itemsize, 1)
    try:
        buffer = _workspace_pool.pop()
    except IndexError:
        buffer = None
    if buffer is None or buffer.nbytes < nbytes:
        buffer = np.empty(nbytes, dtype=np.uint8)
    return buffer


def _give_back(buffer):
    if len(_workspace_pool) < 4:
        _workspace_pool.append(buffer)


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
# against 16.1 + 37.0 ms).
DEF ROWS_MIN_CHANNELS = 4


cdef inline bint _by_rows(const fnn_geometry *g) noexcept nogil:
    """Whether the forward pass uses patch rows (else im2col columns)."""
    return g.c >= ROWS_MIN_CHANNELS and not _pointwise(g)


cdef inline bint _backward_by_rows(const fnn_geometry *g) noexcept nogil:
    """Whether the backward pass takes grad_W on patch rows."""
    return _by_rows(g) and _transposable(g)


# From this many input channels up, grad_x is the transposed conv (patch rows of
# grad_y, a GEMM with C columns); below, W.T @ grad_y and col2im: the transposed
# conv runs over every input pixel with all kh*kw taps (about twice the flops of a
# valid conv) and a GEMM only C wide. Backward, one thread, best of 7 x 20 calls
# (two alternated rounds, load 1-1.5), col2im against transposed: LeNet's conv
# (N64 C6 14x14 K16 5x5) 1.27-1.39 against 1.89-2.15 ms; N32 C16 16x16 K32 3x3
# 2.70-3.13 against 3.00-3.04; N16 C32 2.56-2.79 against 2.36-2.75; N8 C64
# 32x32 K64 3x3 16.6-17.0 against 16.4-17.0 ms.
DEF TRANSPOSED_MIN_CHANNELS = 32


cdef inline bint _grad_x_transposed(const fnn_geometry *g) noexcept nogil:
    """Whether grad_x is the transposed conv (else W.T @ grad_y + col2im)."""
    return _backward_by_rows(g) and g.c >= TRANSPOSED_MIN_CHANNELS


cdef inline bint _direct_grad_w(const fnn_geometry *g, long k) noexcept nogil:
    """Whether a float32 backward pass takes grad_W by the direct conv (grad_W in
    (K, C, kh, kw) order; grad_x, if wanted, by W.T @ grad_y and col2im): where the
    forward is direct and the patches would be im2col columns (few channels). One
    thread, batch 64: LeNet's conv1 backward (grad_W, grad_b) 424 -> 310 us; on
    LeNet's conv2 (10-pixel rows, 6 channels) it took 1650 us against 1220 on rows."""
    return _direct(g, k) and not _by_rows(g)


cdef fnn_geometry _transposed_geometry(const fnn_geometry *g, long k) noexcept nogil:
    """Geometry of that conv: input grad_y (K, OH, OW), output (C, H, W)."""
    cdef fnn_geometry t
    t.c, t.h, t.w = k, g.oh, g.ow
    t.kh, t.kw, t.sh, t.sw = g.kh, g.kw, 1, 1
    t.ph, t.pw = g.kh - 1 - g.ph, g.kw - 1 - g.pw
    t.oh, t.ow = g.h, g.w
    return t


cdef inline long _forward_first(const fnn_geometry *g, long k) noexcept nogil:
    """Elements of the first per-sample forward buffer: x, then y, channels last."""
    return max(g.c * g.h * g.w, k * g.oh * g.ow)


cdef inline long _forward_workspace(const fnn_geometry *g, long k) noexcept nogil:
    """Elements of one thread's forward workspace: that buffer + the patch matrix
    (or the direct conv's padded input)."""
    return max(_forward_first(g, k) + g.oh * g.ow * g.c * g.kh * g.kw,
               fnn_direct_conv_workspace(g))


cdef inline bint _direct(const fnn_geometry *g, long k) noexcept nogil:
    """Whether a float32 forward pass runs the direct conv (csrc/direct_conv.c)."""
    return _conv_algorithm == CONV_AUTO and fnn_direct_conv_fits(g, k) and not _pointwise(g)


cdef void _conv_forward_sample(const floating *x, const floating *weights,
                               const floating *bias, floating *y, floating *work,
                               const fnn_geometry *g, long k, int parallel) noexcept nogil:
    """One sample: y (K, OH*OW) = (im2row(x) @ weights (K, kh*kw*C).T).T + b on
    patch rows, or weights (K, C*kh*kw) @ im2col(x) + b on columns (``_by_rows``).
    work: ``_forward_workspace`` elements. ``parallel``: split the copies over
    OpenMP (when samples run one after the other)."""
    cdef long kkc = g.c * g.kh * g.kw, ohw = g.oh * g.ow
    cdef floating beta = 0
    cdef floating *rows = work + _forward_first(g, k)
    if floating is float:
        if _direct(g, k):        # weights (C*kh*kw, kp), bias (kp,): see conv2d_forward
            fnn_direct_conv_forward_f(x, g, weights, k, bias, y, work)
            return
    if bias != NULL and not _by_rows(g):
        _broadcast(y, bias, k, ohw, 1)
        beta = 1
    if _pointwise(g):      # y = W (K, C) @ x (C, H*W)
        _gemm(False, False, <int>k, <int>ohw, <int>g.c, 1, weights, <int>g.c,
              x, <int>ohw, beta, y, <int>ohw)
    elif _by_rows(g):
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
    long n, k, per_thread, chunks, first, stride_c
    int threads


cdef void _conv_forward_task(void *ctx, long s) noexcept nogil:
    """Sample s of a _conv_job, in the workspace of the thread that runs it."""
    cdef const _conv_job *job = <const _conv_job*>ctx
    cdef const fnn_geometry *g = job.g
    cdef long chw = g.c * g.h * g.w, kohw = job.k * g.oh * g.ow
    cdef long mine = fnn_pool_thread_index() * job.per_thread
    if job.single:
        _conv_forward_sample(<const float*>job.x + s * chw, <const float*>job.weights,
                             <const float*>job.bias, <float*>job.y + s * kohw,
                             <float*>job.workspace + mine, g, job.k, 0)
    else:
        _conv_forward_sample(<const double*>job.x + s * chw, <const double*>job.weights,
                             <const double*>job.bias, <double*>job.y + s * kohw,
                             <double*>job.workspace + mine, g, job.k, 0)


cdef void _conv_forward(const floating *x, const floating *weights, const floating *bias,
                        floating *y, floating *workspace, long n, const fnn_geometry *g,
                        long k, int threads) noexcept nogil:
    cdef long s
    cdef long ohw = g.oh * g.ow, chw = g.c * g.h * g.w
    cdef long per_thread = _forward_workspace(g, k)
    cdef bint small = _small_gemm(k, ohw, g.c * g.kh * g.kw)
    if threads <= 1:         # one sample after the other, BLAS threading each large GEMM
        if small:
            fnn_blas_single_begin()
        for s in range(n):
            _conv_forward_sample(x + s * chw, weights, bias, y + s * k * ohw, workspace,
                                 g, k, fnn_max_threads() > 1)
        if small:
            fnn_blas_single_end()
        return
    cdef _conv_job job
    job.single = floating is float
    job.x, job.weights, job.bias, job.y, job.workspace = x, weights, bias, y, workspace
    job.g, job.k, job.per_thread = g, k, per_thread
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
DEF WINOGRAD_MIN_CHANNELS = 4
DEF WINOGRAD_MIN_PIXELS = 16
DEF WINOGRAD_MIN_BATCH_PIXELS = 512
_CONV_ALGORITHMS = {"auto": CONV_AUTO, "winograd": CONV_WINOGRAD, "im2col": CONV_IM2COL}


def _set_conv_algorithm(str name):
    """Choose the conv algorithm (for tests and measurements): "auto", "winograd"
    (wherever it applies: 3x3, stride 1, padding <= 2, float32 and float64) or
    "im2col" (the patch-matrix GEMMs, no direct conv either); returns the previous name."""
    global _conv_algorithm
    if name not in _CONV_ALGORITHMS:
        raise ValueError(f"_set_conv_algorithm: name must be one of {sorted(_CONV_ALGORITHMS)}, "
                         f"got {name!r}")
    old = [key for key, value in _CONV_ALGORITHMS.items() if value == _conv_algorithm][0]
    _conv_algorithm = _CONV_ALGORITHMS[name]
    return old


def _set_winograd_tiles(long tiles):
    """Tiles per Winograd block (for tests and measurements; 0: chosen from the channel
    counts, see csrc/winograd_template.h); returns the old setting."""
    return fnn_winograd_set_tiles(tiles)


cdef bint _use_winograd(const fnn_geometry *g, long n, long k, bint single):
    """Whether this conv runs as Winograd F(2x2, 3x3) (see above)."""
    if not (g.kh == 3 and g.kw == 3 and g.sh == 1 and g.sw == 1 and g.ph <= 2 and g.pw <= 2
            and n > 0 and k > 0 and g.c > 0) or _conv_algorithm == CONV_IM2COL:
        return False
    if _conv_algorithm == CONV_WINOGRAD:
        return True
    return (single and g.c >= WINOGRAD_MIN_CHANNELS and k >= WINOGRAD_MIN_CHANNELS
            and g.oh * g.ow >= WINOGRAD_MIN_PIXELS
            and n * g.oh * g.ow >= WINOGRAD_MIN_BATCH_PIXELS)


def _conv_choice(tuple x_shape, tuple w_shape, tuple stride, tuple padding, dtype):
    """"winograd" or "im2col": what conv2d_forward/backward run for these arguments."""
    cdef fnn_geometry g = _geometry(x_shape[1], x_shape[2], x_shape[3], w_shape[2], w_shape[3],
                                    stride, padding)
    return ("winograd" if _use_winograd(&g, x_shape[0], w_shape[0], np.dtype(dtype) == np.float32)
            else "im2col")


cdef int _winograd_threads():
    """All OpenMP threads when BLAS can be held to one thread inside them, else 1."""
    return fnn_max_threads() if blas_thread_control() else 1


cdef void _gemm_f(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                  int lda, const float *b, int ldb, float beta, float *c, int ldc) noexcept nogil:
    _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef void _gemm_d(int trans_a, int trans_b, int m, int n, int k, double alpha, const double *a,
                  int lda, const double *b, int ldb, double beta, double *c, int ldc) noexcept nogil:
    _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef object _winograd_forward(cnp.ndarray x, cnp.ndarray W, b, const fnn_geometry *g, long k):
    cdef long n = x.shape[0]
    cdef int threads = _winograd_threads()
    cdef bint single = _is_float32(x)
    cdef long count = (fnn_winograd_forward_workspace_f(n, g, k, threads) if single
                       else fnn_winograd_forward_workspace_d(n, g, k, threads))
    cdef cnp.ndarray y = _output_array((n, k, g.oh, g.ow), x.dtype)
    cdef cnp.ndarray workspace = _take_workspace(count, x.dtype)
    cdef void *px = _data(x)
    cdef void *pw = _data(W)
    cdef void *pb = NULL if b is None else _data(b)
    cdef void *py = _data(y)
    cdef void *pws = _data(workspace)
    with nogil:
        if single:
            fnn_winograd_forward_f(<float*>px, n, g, <float*>pw, k, <float*>pb, <float*>py,
                                   <float*>pws, threads, _gemm_f)
        else:
            fnn_winograd_forward_d(<double*>px, n, g, <double*>pw, k, <double*>pb, <double*>py,
                                   <double*>pws, threads, _gemm_d)
    _give_back(workspace)
    return y


cdef tuple _winograd_backward(cnp.ndarray grad_y, cnp.ndarray x, cnp.ndarray W,
                              const fnn_geometry *g, long k, bint need_grad_x):
    cdef long n = x.shape[0]
    cdef int threads = _winograd_threads()
    cdef bint single = _is_float32(x)
    cdef long count = (fnn_winograd_backward_workspace_f(n, g, k, threads, need_grad_x) if single
                       else fnn_winograd_backward_workspace_d(n, g, k, threads, need_grad_x))
    cdef cnp.ndarray grad_x = _output_array((<object>x).shape, x.dtype) if need_grad_x else None
    cdef cnp.ndarray grad_w = _output_array((<object>W).shape, W.dtype)
    cdef cnp.ndarray grad_b = np.empty(k, dtype=x.dtype)
    cdef cnp.ndarray workspace = _take_workspace(count, x.dtype)
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(x)
    cdef void *pw = _data(W)
    cdef void *pgx = _data(grad_x) if need_grad_x else NULL
    cdef void *pgw = _data(grad_w)
    cdef void *pgb = _data(grad_b)
    cdef void *pws = _data(workspace)
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


def conv2d_forward(cnp.ndarray x, cnp.ndarray W, b, tuple stride, tuple padding):
    """x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> y: (N, K, OH, OW).

    OpenMP over the samples; each thread builds one sample's patch rows in its
    own workspace, runs a single-threaded GEMM into y[n].T (channels last, in the
    workspace) and transposes it into y[n] (NCHW) adding the bias (1x1 convs, and
    im2col columns below 4 channels: one GEMM straight into y[n]).
    Workspace: threads * (max(C*H*W, K*OH*OW) + OH*OW*C*kh*kw) elements, whatever
    N is. 3x3 stride-1 convs where ``_use_winograd``: Winograd F(2x2, 3x3), 16*C*K
    elements of transformed weights + per thread one block of 128-256 tiles (its
    transformed tiles, 16*tiles*(C+K) elements, and its input and output regions).
    float32 stride-1 convs with at most 16 output channels and rows of at least 8
    pixels (``_direct``, on CPUs with AVX2 + FMA) run the direct conv of
    csrc/direct_conv.c per sample instead: no patch matrix, the padded input
    (C*(H+2ph)*(W+2pw) elements) in the workspace.
    """
    cdef long n = x.shape[0], k = W.shape[0]
    cdef fnn_geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], W.shape[2], W.shape[3],
                                    stride, padding)
    if _use_winograd(&g, n, k, _is_float32(x)):
        return _winograd_forward(x, W, b, &g, k)
    cdef int threads = _sample_threads(n)
    cdef long per_thread = _forward_workspace(&g, k)
    cdef cnp.ndarray y = _output_array((n, k, g.oh, g.ow), x.dtype)
    cdef cnp.ndarray workspace = _take_workspace(threads * per_thread, x.dtype)
    cdef cnp.ndarray weights = W
    cdef long kp
    if _is_float32(x) and _direct(&g, k):     # (C*kh*kw, kp) and a bias (kp,), zero-padded
        kp = (k + fnn_direct_conv_block(k) - 1) // fnn_direct_conv_block(k) * fnn_direct_conv_block(k)
        weights = np.zeros((W.size // k, kp), dtype=np.float32)
        weights[:, :k] = W.reshape(k, -1).T
        padded = np.zeros(kp, dtype=np.float32)
        if b is not None:
            padded[:k] = b
        b = padded
    elif _by_rows(&g):           # (K, kh, kw, C): the patch rows' order
        weights = np.ascontiguousarray(W.transpose(0, 2, 3, 1))
    cdef void *px = _data(x)
    cdef void *pw = _data(weights)
    cdef void *pb = NULL if b is None else _data(b)
    cdef void *py = _data(y)
    cdef void *pws = _data(workspace)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            _conv_forward(<float*>px, <float*>pw, <float*>pb, <float*>py, <float*>pws,
                          n, &g, k, threads)
        else:
            _conv_forward(<double*>px, <double*>pw, <double*>pb, <double*>py, <double*>pws,
                          n, &g, k, threads)
    _give_back(workspace)
    return y


cdef inline long _padded_len(const fnn_geometry *g) noexcept nogil:
    """Values per plane in fnn_pad_rows' layout (rows w + 2*pw apart)."""
    return (g.oh - 1) * (g.w + 2 * g.pw) + g.ow


cdef inline long _padded_plane(const fnn_geometry *g) noexcept nogil:
    return (g.h + 2 * g.ph) * (g.w + 2 * g.pw)


cdef void _backward_buffers(const fnn_geometry *g, long k, long *first, long *second) noexcept nogil:
    """Elements of the two per-sample buffers of the backward pass (see below)."""
    cdef long kk = g.kh * g.kw, ohw = g.oh * g.ow, hw = g.h * g.w
    if _pointwise(g):
        first[0] = second[0] = 0
    elif _grad_x_transposed(g):
        first[0] = max(g.c * hw, k * ohw)   # x, grad_y, then grad_x.T: channels last
        second[0] = max(ohw * kk * g.c, hw * kk * k)    # their patch rows
    elif _backward_by_rows(g):
        # x, channels last, then grad_y in padded rows and the padded grad_x plane
        first[0] = max(g.c * hw, k * _padded_len(g), _padded_plane(g))
        second[0] = g.c * kk * _padded_len(g)   # x's patch rows, then grad_x's columns
    else:
        first[0] = second[0] = g.c * kk * ohw           # im2col columns, their gradient
    if _direct_grad_w(g, k):     # float32: the padded input, W.T @ grad_y for col2im
        first[0] = max(first[0], fnn_direct_conv_workspace(g))
        second[0] = max(second[0], g.c * kk * ohw)


cdef void _conv_backward_sample(const floating *grad_y, const floating *x,
                                const floating *weights, floating *grad_x,
                                floating *grad_w, floating *grad_b, floating *first,
                                floating *second, const fnn_geometry *g, long k,
                                int parallel) noexcept nogil:
    """One sample; grad_y: (K, OH*OW). Adds this sample's grad_w and grad_b, writes
    its grad_x unless grad_x is NULL. ``parallel``: split the copies over OpenMP
    (when samples run one after the other).

    - 1x1 stride 1: grad_w += grad_y @ x.T, grad_x = W.T @ grad_y (weights (K, C));
    - stride 1 on patch rows: grad_w (K, kh, kw, C) += grad_y @ im2row(x), and
      grad_x = the conv of grad_y with ``weights`` = flipped W as (C, kh, kw, K)
      (``_grad_x_transposed``), else grad_x = col2im(W.T @ grad_y) (``weights`` W);
    - otherwise: grad_w (K, C, kh, kw) += grad_y @ im2col(x).T and
      grad_x = col2im(W.T @ grad_y) (weights (K, C*kh*kw)).
    """
    cdef long kk = g.kh * g.kw, ohw = g.oh * g.ow, hw = g.h * g.w
    cdef long ckk = g.c * kk, len_
    cdef fnn_geometry t
    _row_sums(grad_y, k, ohw, grad_b, 1)
    if floating is float:
        if _direct_grad_w(g, k):
            fnn_direct_conv_grad_w_f(grad_y, x, g, k, grad_w, first)
            if grad_x != NULL:
                _gemm(True, False, <int>ckk, <int>ohw, <int>k, 1, weights, <int>ckk, grad_y,
                      <int>ohw, 0, second, <int>ohw)
                _col2im(second, 1, g, grad_x, ohw, parallel)
            return
    if _pointwise(g):
        _gemm(False, True, <int>k, <int>g.c, <int>ohw, 1, grad_y, <int>ohw, x,
              <int>ohw, 1, grad_w, <int>g.c)
        if grad_x != NULL:
            _gemm(True, False, <int>g.c, <int>ohw, <int>k, 1, weights, <int>g.c, grad_y,
                  <int>ohw, 0, grad_x, <int>ohw)
    elif _backward_by_rows(g):
        _transpose(x, g.c, hw, first, parallel)
        _im2row(first, g, second, parallel)
        _gemm(False, False, <int>k, <int>ckk, <int>ohw, 1, grad_y, <int>ohw, second,
              <int>ckk, 1, grad_w, <int>ckk)
        if grad_x == NULL:
            return
        if not _grad_x_transposed(g) and parallel:     # col2im split over the planes
            _gemm(True, False, <int>ckk, <int>ohw, <int>k, 1, weights, <int>ckk, grad_y,
                  <int>ohw, 0, second, <int>ohw)
            _col2im(second, 1, g, grad_x, ohw, parallel)
            return
        if not _grad_x_transposed(g):
            # grad_y's rows spaced as the padded input's: col2im is then one long add
            # per (c, i, j) (fnn_col2im_rows, one thread) instead of oh short ones.
            # LeNet's conv2 (14x14 -> 10x10), one thread, batch 64, whole backward,
            # best of 9 in three alternated rounds: 1257 -> 1125 us (col2im 23% -> 8%
            # of the profile; the W.T @ grad_y GEMM is 36% wider)
            len_ = _padded_len(g)
            _pad_rows(grad_y, k, g.oh, g.ow, g.w + 2 * g.pw, first)
            _gemm(True, False, <int>ckk, <int>len_, <int>k, 1, weights, <int>ckk, first,
                  <int>len_, 0, second, <int>len_)
            _col2im_rows(second, g, grad_x, first)
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


cdef inline long _conv_backward_chunks(long n, int threads) noexcept nogil:
    """Sample chunks of the parallel conv backward: four per thread, at most n."""
    return n if n < 4 * threads else 4 * threads


cdef inline void _conv_backward_chunk(const _conv_job *job, long c, const floating *grad_y,
                                      const floating *x, const floating *weights,
                                      floating *grad_x, floating *workspace) noexcept nogil:
    """Chunk c of a _conv_job: its samples in order, summed into the chunk's partial."""
    cdef const fnn_geometry *g = job.g
    cdef long k = job.k, n = job.n, s
    cdef long ckk = g.c * g.kh * g.kw, kohw = k * g.oh * g.ow, chw = g.c * g.h * g.w
    cdef floating *mine = workspace + fnn_pool_thread_index() * job.per_thread
    cdef floating *part = workspace + job.threads * job.per_thread + c * job.stride_c
    memset(part, 0, job.stride_c * sizeof(floating))
    for s in range(c * n // job.chunks, (c + 1) * n // job.chunks):
        _conv_backward_sample(grad_y + s * kohw, x + s * chw, weights,
                              NULL if grad_x == NULL else grad_x + s * chw,
                              part, part + k * ckk, mine, mine + job.first, g, k, 0)


cdef void _conv_backward_task(void *ctx, long c) noexcept nogil:
    cdef const _conv_job *job = <const _conv_job*>ctx
    if job.single:
        _conv_backward_chunk(job, c, <const float*>job.grad_y, <const float*>job.x,
                             <const float*>job.weights, <float*>job.grad_x,
                             <float*>job.workspace)
    else:
        _conv_backward_chunk(job, c, <const double*>job.grad_y, <const double*>job.x,
                             <const double*>job.weights, <double*>job.grad_x,
                             <double*>job.workspace)


cdef void _conv_backward(const floating *grad_y, const floating *x, const floating *weights,
                         floating *grad_x, floating *grad_w, floating *grad_b,
                         floating *workspace, long n, const fnn_geometry *g, long k,
                         int threads) noexcept nogil:
    cdef long s, c, idx, first, second
    cdef long ckk = g.c * g.kh * g.kw, ohw = g.oh * g.ow, chw = g.c * g.h * g.w
    _backward_buffers(g, k, &first, &second)
    # per thread: the two buffers; then per chunk of samples: its grad_w and grad_b sums
    cdef long stride_t = first + second, stride_c = k * ckk + k
    cdef long chunks = _conv_backward_chunks(n, threads)
    cdef floating *part
    memset(grad_w, 0, k * ckk * sizeof(floating))
    memset(grad_b, 0, k * sizeof(floating))
    cdef bint small = _small_gemm(k, ohw, ckk)
    if threads <= 1:         # one sample after the other, BLAS threading each large GEMM
        if small:
            fnn_blas_single_begin()
        for s in range(n):
            _conv_backward_sample(grad_y + s * k * ohw, x + s * chw, weights,
                                  NULL if grad_x == NULL else grad_x + s * chw,
                                  grad_w, grad_b, workspace, workspace + first, g, k,
                                  fnn_max_threads() > 1)
        if small:
            fnn_blas_single_end()
        return
    cdef _conv_job job
    job.single = floating is float
    job.x, job.weights, job.grad_y, job.grad_x, job.workspace = x, weights, grad_y, grad_x, workspace
    job.g, job.n, job.k, job.per_thread, job.chunks = g, n, k, stride_t, chunks
    job.first, job.stride_c, job.threads = first, stride_c, threads
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
        for idx in range(k * ckk):
            grad_w[idx] += part[idx]
        for idx in range(k):
            grad_b[idx] += part[k * ckk + idx]


def conv2d_backward(cnp.ndarray grad_y, cnp.ndarray x, cnp.ndarray W, tuple stride,
                    tuple padding, bint need_grad_x=True):
    """-> (grad_x (N, C, H, W) or None, grad_W (K, C, kh, kw), grad_b (K,)).

    OpenMP over the samples, single-threaded GEMMs per sample; each of a fixed
    set of sample chunks keeps its own grad_W/grad_b sums (added at the end in
    chunk order), so no two threads write one value and every call gives the
    same bits. With stride 1 (padding < kernel) and from 32 input channels, grad_x
    is the conv of grad_y with the flipped weights: a GEMM as deep as the forward
    one and no col2im.
    Workspace: threads * 2 buffers of at most max(C, K)*kh*kw*max(H*W, OH*OW)
    elements + min(N, 4*threads) * (K*C*kh*kw + K). Where ``_use_winograd``:
    grad_W and grad_b summed over at most 8 fixed chunks of tile blocks (16*K*C + K
    elements each, added in chunk order: the same bits for any thread count), then
    grad_x as the Winograd conv of grad_y with the flipped weights (padding 2 - p).
    """
    cdef long n = x.shape[0], k = W.shape[0]
    cdef fnn_geometry g = _geometry(x.shape[1], x.shape[2], x.shape[3], W.shape[2], W.shape[3],
                                    stride, padding)
    if _use_winograd(&g, n, k, _is_float32(x)):
        return _winograd_backward(grad_y, x, W, &g, k, need_grad_x)
    cdef int threads = _sample_threads(n)
    cdef long first, second
    _backward_buffers(&g, k, &first, &second)
    cdef long per_thread = first + second
    cdef long per_chunk = W.size + k
    cdef bint by_rows = _backward_by_rows(&g) and not (_is_float32(x) and _direct_grad_w(&g, k))
    cdef cnp.ndarray grad_x = _output_array((<object>x).shape, x.dtype) if need_grad_x else None
    # patch-row order (K, kh, kw, C) on the stride-1 path, reordered at the end
    cdef cnp.ndarray grad_w = _output_array((k, g.kh, g.kw, g.c) if by_rows else (<object>W).shape,
                                            x.dtype)
    cdef cnp.ndarray grad_b = np.empty(k, dtype=x.dtype)
    cdef cnp.ndarray workspace = _take_workspace(
        threads * per_thread + _conv_backward_chunks(n, threads) * per_chunk, x.dtype)
    cdef cnp.ndarray weights = W
    if _grad_x_transposed(&g):   # flipped[c, i, j, k] = W[k, c, kh-1-i, kw-1-j]
        weights = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(x)
    cdef void *pw = _data(weights)
    cdef void *pgx = _data(grad_x) if need_grad_x else NULL
    cdef void *pgw = _data(grad_w)
    cdef void *pgb = _data(grad_b)
    cdef void *pws = _data(workspace)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            _conv_backward(<float*>pg, <float*>px, <float*>pw, <float*>pgx,
                           <float*>pgw, <float*>pgb, <float*>pws, n, &g, k, threads)
        else:
            _conv_backward(<double*>pg, <double*>px, <double*>pw, <double*>pgx,
                           <double*>pgw, <double*>pgb, <double*>pws, n, &g, k, threads)
    _give_back(workspace)
    if by_rows:
        grad_w = np.ascontiguousarray(grad_w.transpose(0, 3, 1, 2))
    return grad_x, grad_w, grad_b
