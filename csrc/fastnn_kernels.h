/* fastnn compiled CPU kernels: plain C99 + OpenMP, no Python.
 *
 * Every kernel exists for float (_f) and double (_d). Arrays are C-contiguous;
 * images are NCHW; a "plane" is one (n, c) image of H*W values. Kernels with a
 * `parallel` flag split their outer loop over OpenMP threads when it is
 * nonzero; callers pass 0 when they already run inside a parallel region.
 * GEMMs: the Cython layer calls BLAS (scipy.linalg.cython_blas), or for float32 on
 * AVX-512 CPUs fastnn's own kernel (fnn_sgemm, below).
 */
#ifndef FASTNN_KERNELS_H
#define FASTNN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Arrays smaller than this (elements) are processed by one thread: below it
 * the cost of waking OpenMP workers exceeds the work of a memory-bound pass.
 * With idle workers asleep (OMP_WAIT_POLICY=passive) a parallel region costs
 * about 50-60 us more than its work on this 2-vCPU KVM guest (a sleeping vCPU
 * is woken by an interrupt through the host); float32, out= buffers, 1 against
 * 2 threads: ReLU 1M elements 162 against 228 us, 2M 332 against 377, 4M 858
 * against 786; max pool 2x2 of 1M elements 651 against 632, 4M 2662 against
 * 2268 us. (65536 before: LeNet's ReLUs and pools ran slower on two threads.) */
#define FNN_PARALLEL_MIN (1L << 21)

/* Window geometry of im2col / col2im. */
typedef struct {         /* 64-bit throughout: 2 * ph, kh * kw * c never overflow */
    int64_t c, h, w;     /* input channels and size */
    int64_t kh, kw, sh, sw, ph, pw;
    int64_t oh, ow;      /* output size */
} fnn_geometry;

int fnn_max_threads(void);   /* omp_get_max_threads(), 1 without OpenMP */

/* The CPU feature cap: the highest instruction-set level that the run-time CPU checks
 * may answer yes for (fnn_sgemm_supported, fnn_avx512_supported, fnn_avx512dq_supported:
 * FNN_CPU_AVX512; the direct conv's AVX2 + FMA: FNN_CPU_AVX2); above it they answer no,
 * as on a CPU without those instructions. FNN_CPU_AVX512 (no cap) unless
 * FASTNN_CPU_FEATURES says otherwise: set once, at import (cpu/runtime.pxi), before any
 * kernel runs (the checks' answers are cached). Defined in fastnn_kernels.c. */
enum { FNN_CPU_PORTABLE = 0, FNN_CPU_AVX2 = 1, FNN_CPU_AVX512 = 2 };
extern int fnn_cpu_cap;

/* Fork safety (forksafe.c): fnn_fork_guard_install() (once, at import) makes a child
 * made by fork() set fnn_forked_child; then FNN_OMP(cond), the `if` clause of every
 * OpenMP region, is 0 and the region runs on one thread (libgomp's thread pool
 * does not survive a fork: a parallel region there would wait forever). */
extern int fnn_forked_child;
void fnn_fork_guard_install(void);
#define FNN_OMP(cond) ((cond) && !fnn_forked_child)
int fnn_thread_id(void);     /* omp_get_thread_num(), 0 without OpenMP */

/* BLAS thread control. The per-sample conv GEMMs run single-threaded inside
 * fastnn's OpenMP team, where the BLAS thread pool must not start workers of its
 * own: fnn_blas_single_begin() sets the BLAS thread count to 1 (when a control
 * was registered) and fnn_blas_single_end() restores it when the last concurrent
 * caller leaves. begin returns 1 when BLAS is known to be single-threaded now. */
typedef void (*fnn_set_threads_fn)(int);
typedef int (*fnn_get_threads_fn)(void);
void fnn_blas_register(fnn_set_threads_fn set_threads, fnn_get_threads_fn get_threads);
int fnn_blas_single_begin(void);
void fnn_blas_single_end(void);

/* Fast-wake worker pool (csrc/pool.c) for jobs of microseconds, where waking
 * fastnn's passive OpenMP team costs more than the work. fnn_pool_run runs
 * task(ctx, i) for i in [0, n_tasks) on the calling thread plus up to
 * fnn_max_threads() - 1 workers (started on first use, and again after a fork),
 * each task exactly once, and returns once all are done (their writes visible),
 * giving the number of threads that ran tasks (1: the caller alone). Tasks are
 * claimed in order but by whichever thread comes first, so each must write its
 * own outputs. Runs serially on the caller when nested in a pool task or an
 * OpenMP region, or while another thread's job is running, and for a while
 * (2 ms, doubling up to 0.256 s while it recurs) after a job that a worker
 * stalled or 8 jobs in a row that no worker took part in (their cores are busy
 * elsewhere); fnn_pool_set_busy(1) starts such a while, fnn_pool_set_busy(0)
 * ends it (tests, measurements). Idle workers spin (yielding the core) for
 * fnn_pool_spin_us() microseconds, then sleep. */
typedef void (*fnn_task_fn)(void *ctx, ptrdiff_t i);
int fnn_pool_run(fnn_task_fn task, void *ctx, ptrdiff_t n_tasks);
void fnn_pool_set_spin_us(ptrdiff_t us);
/* fnn_split(body, args, n, block) runs body(args, lo, hi) over [0, n) in ranges of
 * `block` items, as tasks of the worker pool (one direct call when n <= block), so each
 * range must write its own outputs. For the memory-bound passes of the pooling, ReLU
 * and BatchNorm kernels (OpenMP before, from FNN_PARALLEL_MIN elements only):
 * fnn_split_block(item) items of `item` elements make about FNN_SPLIT_ELEMENTS
 * elements per task, so arrays up to that size run on the caller alone. 2^16 (about
 * 20-60 us of work per task, against a few us to post a job to spinning workers): the
 * MNIST recipe's (128, 12, 28, 28) max pool forward took 500 us on one thread and 250
 * us on the pool, this 2-vCPU Intel Xeon (AVX-512) KVM guest with the other vCPU idle;
 * while other processes hold it the pool runs serially (no loss, no gain). */
#define FNN_SPLIT_ELEMENTS ((ptrdiff_t)1 << 16)
typedef void (*fnn_range_fn)(void *args, ptrdiff_t lo, ptrdiff_t hi);
void fnn_split(fnn_range_fn body, void *args, ptrdiff_t n, ptrdiff_t block);
ptrdiff_t fnn_split_block(ptrdiff_t item);
ptrdiff_t fnn_pool_spin_us(void);
int fnn_pool_workers(void);   /* workers started in this process */
/* Which thread runs the current task: 0 the calling thread, 1.. a worker. In a
 * job of fnn_pool_run(..., n_tasks) it is below min(fnn_max_threads(), n_tasks)
 * (per-thread workspaces); nested jobs run on their caller and keep its index. */
int fnn_pool_thread_index(void);
void fnn_pool_set_busy(int busy);
void fnn_pool_stats(ptrdiff_t *posted, ptrdiff_t *helped);   /* jobs posted to workers, helped by one */

/* Caching allocator (csrc/alloc.c) for kernel outputs and workspaces: 64-byte
 * aligned blocks; from FNN_CACHE_MIN bytes a freed block is kept (at most
 * FNN_CACHE_CAP bytes, oldest released first) for the next request of its size
 * (rounded up to 4 KiB), whose pages are then mapped already. Thread-safe, also
 * without the GIL and in a forked child. fnn_cache_alloc returns NULL when out of
 * memory; fnn_cache_free(NULL) does nothing. Stats: out[0..3] = hits, misses,
 * bytes held free, blocks held free. fnn_cache_clear releases every free block. */
#define FNN_CACHE_MIN 65536
#define FNN_CACHE_CAP ((int64_t)128 << 20)
#define FNN_CACHE_BUCKETS 64
void *fnn_cache_alloc(size_t nbytes);
void fnn_cache_free(void *p);
void fnn_cache_stats(int64_t *out);
void fnn_cache_clear(void);

#define FNN_DECLARE(T, S)                                                           \
/* x (n, c, h, w) -> cols (c*kh*kw, ld); sample s fills columns [s*oh*ow, (s+1)*oh*ow).  \
 * O(c*kh*kw*n*oh*ow) copies. */                                                     \
void fnn_im2col_##S(const T *x, ptrdiff_t n, const fnn_geometry *g, T *cols, ptrdiff_t ld,     \
                    int parallel);                                                   \
/* Patches as rows, channels last: one sample x_hwc (h, w, c) -> rows (oh*ow, kh*kw*c), \
 * row oh*ow_ + ow = [x_padded[oh*sh + i, ow*sw + j, :] for i, j]. Conv GEMMs run       \
 * faster on this layout than on im2col's (see _cpu.pyx).  */                            \
void fnn_im2row_##S(const T *x_hwc, const fnn_geometry *g, T *rows, int parallel);      \
/* out (cols, rows) = a (rows, cols) transposed, in cache-sized tiles. */               \
void fnn_transpose_##S(const T *a, ptrdiff_t rows, ptrdiff_t cols, T *out, int parallel);         \
/* The same, plus bias[c] added to every value of output row c (bias: (cols,)). */      \
void fnn_transpose_bias_##S(const T *a, ptrdiff_t rows, ptrdiff_t cols, const T *bias, T *out,  \
                            int parallel);                                            \
/* Adjoint of im2col: cols (c*kh*kw, ld) -> x (n, c, h, w), overwritten; overlapping \
 * windows add up. Parallel over (n, c) planes, so no two threads write one value. */\
void fnn_col2im_##S(const T *cols, ptrdiff_t n, const fnn_geometry *g, T *x, ptrdiff_t ld,     \
                    int parallel);                                                   \
/* a: planes of (oh, ow) -> out: planes of len = (oh-1)*wp + ow values, rows wp apart \
 * and zero between (wp >= ow), the layout fnn_col2im_rows takes. */                 \
void fnn_pad_rows_##S(const T *a, ptrdiff_t planes, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t wp, T *out);   \
/* col2im of one sample for stride 1: cols (c*kh*kw, len) rows in fnn_pad_rows'       \
 * layout with wp = w + 2*pw -> x (c, h, w), overwritten. In that layout each (i, j)  \
 * is one add of len contiguous values at offset i*wp + j of the padded plane (the   \
 * zeros between rows add nothing), instead of oh adds of ow values. work: (h+2*ph) \
 * * wp elements when padded, else unused. */                                        \
void fnn_col2im_rows_##S(const T *cols, const fnn_geometry *g, T *x, T *work);      \
/* x: planes of (h, w) -> y, argmax: planes of (oh, ow); argmax is h_in*w + w_in,    \
 * the first maximum in row-major window order (NaN wins, as in NumPy). */           \
void fnn_maxpool2d_forward_##S(const T *x, ptrdiff_t planes, ptrdiff_t h, ptrdiff_t w, int kh,      \
                               int kw, int sh, int sw, T *y, int64_t *argmax);       \
/* grad_x planes (h, w) = scatter-add of grad_y planes (oh, ow) at argmax; grad_x is  \
 * zeroed first unless `zeroed` (fresh calloc'd pages are already zero). Where 2x2     \
 * cells tile the plane and each entry lies in its output's cell, each cell is       \
 * written in one pass instead (the same values). Returns the number of argmax       \
 * entries outside [0, h*w) (skipped). */                                            \
ptrdiff_t fnn_maxpool2d_backward_##S(const T *grad_y, const int64_t *argmax, ptrdiff_t planes, \
                                ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t h, ptrdiff_t w,          \
                                T *grad_x, int zeroed);                                        \
/* Average pooling, no padding: x planes (h, w) -> y planes (oh, ow), and the       \
 * backward into grad_x planes (h, w) (zeroed first). */                             \
void fnn_avgpool2d_forward_##S(const T *x, ptrdiff_t planes, ptrdiff_t h, ptrdiff_t w, int kh,      \
                               int kw, int sh, int sw, T *y);                        \
void fnn_avgpool2d_backward_##S(const T *grad_y, ptrdiff_t planes, ptrdiff_t h, ptrdiff_t w,        \
                                int kh, int kw, int sh, int sw, T *grad_x);          \
/* y = max(x, 0) and grad_x = grad_y * (y > 0): one pass, NaN propagates. */         \
void fnn_relu_forward_##S(const T *x, T *y, ptrdiff_t n);                                 \
void fnn_relu_backward_##S(const T *grad_y, const T *y, T *grad_x, ptrdiff_t n);          \
/* y = x where x > 0, else alpha * x; grad_x = grad_y where x > 0, else alpha *       \
 * grad_y (NaN: the alpha branch, NaN again). */                                     \
void fnn_leaky_relu_forward_##S(const T *x, T *y, ptrdiff_t n, T alpha);                  \
void fnn_leaky_relu_backward_##S(const T *grad_y, const T *x, T *grad_x, ptrdiff_t n,     \
                                 T alpha);                                            \
/* Inverted dropout with the CUDA kernel's counter-based mask (see the template);    \
 * out = a * b element-wise (dropout's backward). */                                \
void fnn_dropout_forward_##S(const T *x, T *y, T *mask, ptrdiff_t n, uint64_t keep_from,  \
                             T scale, uint64_t seed);                                \
void fnn_multiply_##S(const T *a, const T *b, T *out, ptrdiff_t n);                       \
/* BatchNorm on x viewed as (n, c, s), statistics per channel c: the batch mean and  \
 * biased variance (double sums; work: 2 * c doubles), x_hat and y (also inv_std =   \
 * 1 / sqrt(var + eps)), and the training backward (grad_x, grad_gamma, grad_beta); \
 * relu: a ReLU fused after y; relu_y: its output, whose backward grad_y takes first. */\
void fnn_batchnorm_stats_##S(const T *x, ptrdiff_t n, ptrdiff_t c, ptrdiff_t s, T *mean, T *var,    \
                             double *work);                                          \
void fnn_batchnorm_apply_##S(const T *x, ptrdiff_t n, ptrdiff_t c, ptrdiff_t s, const T *mean,      \
                             const T *var, T eps, const T *gamma, const T *beta,     \
                             T *inv_std, T *x_hat, T *y, int relu);                  \
void fnn_batchnorm_backward_##S(const T *grad_y, const T *x_hat, ptrdiff_t n, ptrdiff_t c,     \
                                ptrdiff_t s, const T *gamma, const T *inv_std, T *grad_x, \
                                T *grad_gamma, T *grad_beta, double *work,           \
                                const T *relu_y);                                    \
/* Mean softmax cross-entropy of logits (n, c), log-sum-exp stable; writes           \
 * grad = (softmax - target) / n. Targets: labels (n,) when non-NULL, else           \
 * probabilities (n, c). row_loss (n,) is scratch. predicted (n,), unless NULL:      \
 * each row's class, the first index of its largest logit (as numpy.argmax). */      \
double fnn_softmax_xent_##S(const T *logits, ptrdiff_t n, ptrdiff_t c, const int64_t *labels,  \
                            const T *target, T *grad, double *row_loss,              \
                            int64_t *predicted);                                     \
/* out (cols,) = sum over rows of a (rows, cols). */                                 \
void fnn_column_sums_##S(const T *a, ptrdiff_t rows, ptrdiff_t cols, T *out);                  \
/* 1 when none of a[0..n) is NaN or infinite; stops at the block with the first. */  \
int fnn_all_finite_##S(const T *a, ptrdiff_t n);                                          \
/* out (rows,) = sum over columns of a (rows, cols), added to out when accumulate. */ \
void fnn_row_sums_##S(const T *a, ptrdiff_t rows, ptrdiff_t cols, T *out, int accumulate);     \
/* a (rows, cols): each row r set to value[r] (per_row) or each row set to value     \
 * (cols,) (!per_row). Used to pre-broadcast a bias before a beta=1 GEMM. */         \
void fnn_broadcast_##S(T *a, const T *value, ptrdiff_t rows, ptrdiff_t cols, int per_row);

FNN_DECLARE(float, f)
FNN_DECLARE(double, d)
#undef FNN_DECLARE

/* Winograd F(2x2, 3x3) convolution (winograd_template.h): 3x3 kernels, stride 1,
 * padding 0..2 per axis, n >= 1, OpenMP over blocks of tiles (`threads`), BLAS
 * held to one thread inside. GEMMs go through `gemm`, row-major
 * c (m, n) = alpha * op(a) @ op(b) + beta * c (fastnn calls BLAS from Cython).
 * `work` holds the elements the *_workspace functions give for the same
 * arguments and thread count. */
#define FNN_DECLARE_WINOGRAD(T, S)                                                  \
typedef void (*fnn_gemm_fn_##S)(int trans_a, int trans_b, int m, int n, int k,       \
                                T alpha, const T *a, int lda, const T *b, int ldb,   \
                                T beta, T *c, int ldc);                              \
ptrdiff_t fnn_winograd_forward_workspace_##S(ptrdiff_t n, const fnn_geometry *g, ptrdiff_t k,       \
                                        int threads);                                \
/* y (n, k, oh, ow) = conv(x (n, c, h, w), w (k, c, 3, 3)) + bias (k,) or NULL;     \
 * with argmax (not NULL; oh, ow even), y (n, k, oh/2, ow/2) and argmax are the     \
 * 2x2 stride-2 max pool of that conv, as fnn_maxpool2d_forward gives them.          \
 * g's oh, ow may be the first rows and columns of the conv's output only. */       \
void fnn_winograd_forward_##S(const T *x, ptrdiff_t n, const fnn_geometry *g, const T *w, \
                              ptrdiff_t k, const T *bias, T *y, int64_t *argmax, T *work, \
                              int threads, fnn_gemm_fn_##S gemm);                    \
ptrdiff_t fnn_winograd_backward_workspace_##S(ptrdiff_t n, const fnn_geometry *g, ptrdiff_t k,      \
                                         int threads, int need_grad_x);              \
/* grad_y (n, k, oh, ow) -> grad_w (k, c, 3, 3), grad_b (k,), and grad_x (n, c, h, w) \
 * unless NULL. Sums in a fixed order: the same bits for any thread count. */        \
void fnn_winograd_backward_##S(const T *grad_y, const T *x, ptrdiff_t n,                  \
                               const fnn_geometry *g, const T *w, ptrdiff_t k, T *grad_x, \
                               T *grad_w, T *grad_b, T *work, int threads,           \
                               fnn_gemm_fn_##S gemm);

FNN_DECLARE_WINOGRAD(float, f)
FNN_DECLARE_WINOGRAD(double, d)
#undef FNN_DECLARE_WINOGRAD

/* Direct float32 convolution for few output channels (direct_conv.c): stride 1,
 * 1 <= k <= FNN_DIRECT_MAX_K, kw <= FNN_DIRECT_MAX_KW, output rows of at least 8 pixels,
 * a CPU with AVX2 + FMA and a GCC build (fnn_direct_conv_fits; elsewhere it is 0).
 * One sample: y (k, oh, ow) = conv(x (c, h, w)) + bias, with the weights as
 * wt (c*kh*kw, kp) (transposed, columns zero-padded to kp = k rounded up to
 * fnn_direct_conv_block(k)) and bias (kp,) zero-padded too. work: the padded input,
 * fnn_direct_conv_workspace elements. */
#define FNN_DIRECT_MAX_K 16
#define FNN_DIRECT_MAX_KW 7
int fnn_direct_conv_fits(const fnn_geometry *g, ptrdiff_t k);
ptrdiff_t fnn_direct_conv_block(ptrdiff_t k);
ptrdiff_t fnn_direct_conv_workspace(const fnn_geometry *g);
void fnn_direct_conv_forward_f(const float *x, const fnn_geometry *g, const float *wt,
                               ptrdiff_t k, const float *bias, float *y, float *work);
/* One sample: grad_w (k, c, kh, kw) += the weight gradient of grad_y (k, oh, ow). */
void fnn_direct_conv_grad_w_f(const float *grad_y, const float *x, const fnn_geometry *g,
                              ptrdiff_t k, float *grad_w, float *work);

/* Implicit-GEMM float32 convolution, stride 1 (conv_implicit.c; only where
 * fnn_sgemm_supported()). xp: one sample padded and channels last, (oh + kh - 1) x wp x c
 * with wp >= ow + kw - 1 (fnn_pad_hwc_f); w: (kh*kw*c, kp), rows in (i, j, c) order,
 * columns zero-padded to kp = k rounded up to 16.
 * fnn_conv_implicit_f: y_t (oh*ow, k) = the conv, channels last.
 * fnn_conv_implicit_grad_w_f: gw (kh*kw*c, kp) += patches.T @ gy_t, gy_t (oh*ow, kp)
 * with zero columns from k on. fnn_pad_hwc_f: xp = x (c, h, w) padded by (ph, pw),
 * channels last ((h + 2ph) x (w + 2pw) x c). */
void fnn_conv_implicit_f(const float *xp, ptrdiff_t wp, ptrdiff_t c, int kh, int kw,
                         ptrdiff_t oh, ptrdiff_t ow, const float *w, ptrdiff_t k, float *y_t);
void fnn_conv_implicit_grad_w_f(const float *xp, ptrdiff_t wp, ptrdiff_t c, int kh, int kw,
                                ptrdiff_t oh, ptrdiff_t ow, const float *gy_t, ptrdiff_t k,
                                float *gw);
void fnn_pad_hwc_f(const float *x, ptrdiff_t c, ptrdiff_t h, ptrdiff_t w, ptrdiff_t ph,
                   ptrdiff_t pw, float *xp);
/* fnn_conv_implicit_grad_x_f: gxp += the input gradient, padded and channels last
 * ((oh + kh - 1) x wp x cp, wp >= ow + kw - 1, cp = c rounded up to 16; lanes c..cp-1
 * get zeros), of gy_t (oh*ow, k; rows ldg apart), wg (kh*kw, k, cp): W[k, c, i, j] at
 * [i*kw + j][k][c], zero from c on; added tap by tap in (i, j) order. */
void fnn_conv_implicit_grad_x_f(const float *gy_t, ptrdiff_t ldg, ptrdiff_t k, const float *wg,
                                ptrdiff_t c, int kh, int kw, ptrdiff_t oh, ptrdiff_t ow,
                                ptrdiff_t wp, float *gxp);

/* Tiles per Winograd block (for tests and measurements; 0: chosen from the
 * channel counts); returns the old setting. */
ptrdiff_t fnn_winograd_set_tiles(ptrdiff_t tiles);

/* fastnn's own float32 GEMM (csrc/sgemm.c), one thread: row-major
 * c (m, n) = alpha * op(a) @ op(b) + beta * c, op(a) = a (m, k) or, with trans_a,
 * a.T for a (k, m) (likewise b); leading dimensions in elements. beta = 0: c is not
 * read. Returns 0, or -1 when it cannot run (no buffers; not built for this CPU).
 * Only call it when fnn_sgemm_supported() (x86-64 with AVX-512F and AVX-512VL). */
int fnn_sgemm_supported(void);
extern int fnn_sgemm_direct_a;
/* buf = momentum * buf + g; p -= lr * buf (float32, n elements), with AVX-512; only
 * where fnn_sgemm_supported(). */
void fnn_sgd_momentum_f(float *p, const float *g, float *buf, ptrdiff_t n, float lr,
                        float momentum);
int fnn_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
              int lda, const float *b, int ldb, float beta, float *c, int ldc);
/* What fnn_sgemm_ex does to C in the tiles' registers, each NULL when not wanted:
 * bias (n,) added to every row in place of beta * C (C is not read); then mask
 * (m, n), ldc apart: C = 0 where mask is not > 0 (ReLU's backward, y being its
 * output); relu (m, n), ldc apart: max(0, C) stored there too (ReLU's forward).
 * The same bits as a pre-broadcast bias with beta = 1 and the ReLU kernels after. */
typedef struct {
    const float *bias;
    const float *mask;
    float *relu;
} fnn_epilogue;
/* fnn_sgemm with an epilogue (ep may be NULL); with one, returns -1 also when k = 0 or
 * alpha = 0 (the caller does the epilogue's work on its own then). */
int fnn_sgemm_ex(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc,
                 const fnn_epilogue *ep);

/* fastnn's own float32 GEMV (csrc/gemv_avx512.c), one thread: y (o,) = (add ? y : 0)
 * + x (i,) @ w (i, o), w row-major with rows ldw apart (in elements). Only call it
 * where fnn_avx512_supported() (x86-64 with AVX-512F). */
void fnn_sgemv_f(const float *x, const float *w, ptrdiff_t ldw, ptrdiff_t i, ptrdiff_t o,
                 float *y, int add);

/* AVX-512 versions of portable kernels (csrc/avx512.c), only where
 * fnn_avx512_supported() (x86-64 with AVX-512F); fnn_softmax_xent_f and
 * fnn_all_finite_f call them by themselves unless fnn_avx512_rows is 0 (tests).
 * fnn_softmax_row_f: one row (c classes) of fnn_softmax_xent_f: writes g, sets
 * *predicted unless NULL, returns the row's loss; the target is class `label` when t
 * is NULL, else the probabilities t. */
int fnn_avx512_supported(void);
extern int fnn_avx512_rows;
double fnn_softmax_row_f(const float *z, ptrdiff_t c, int64_t label, const float *t, float *g,
                         float inv_n, int64_t *predicted);
int fnn_all_finite_avx512_f(const float *a, ptrdiff_t n);
/* fnn_dropout_forward's AVX-512DQ loops (avx512.c): elements first .. first + n - 1 of
 * the mask, x, y and mask pointing at element first; used where
 * fnn_avx512dq_supported() and fnn_avx512_rows. */
int fnn_avx512dq_supported(void);
void fnn_dropout_avx512_f(const float *x, float *y, float *mask, ptrdiff_t n, ptrdiff_t first,
                          uint64_t keep_from, float scale, uint64_t seed);
void fnn_dropout_avx512_d(const double *x, double *y, double *mask, ptrdiff_t n, ptrdiff_t first,
                          uint64_t keep_from, double scale, uint64_t seed);

#endif
