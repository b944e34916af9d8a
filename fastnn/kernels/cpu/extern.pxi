# fastnn/kernels/cpu/extern.pxi -- included by _cpu.pyx.
#
# The C interface of csrc/ (fastnn_kernels.h): every fnn_* function and struct the
# compiled module calls, in one place. Threading: none here (see each family's file
# for how its calls are threaded).

cdef extern from "fastnn_kernels.h" nogil:
    ctypedef struct fnn_geometry:
        int64_t c, h, w
        int64_t kh, kw, sh, sw, ph, pw
        int64_t oh, ow
    int fnn_max_threads()
    int fnn_cpu_cap
    enum: FNN_CPU_PORTABLE, FNN_CPU_AVX2, FNN_CPU_AVX512
    void *fnn_cache_alloc(size_t nbytes)
    void fnn_cache_free(void *p)
    void fnn_cache_stats(int64_t *out)
    void fnn_cache_clear()
    int64_t FNN_CACHE_MIN
    int64_t FNN_CACHE_CAP
    int fnn_forked_child
    void fnn_fork_guard_install()
    ctypedef void (*fnn_set_threads_fn)(int)
    ctypedef int (*fnn_get_threads_fn)()
    void fnn_blas_register(fnn_set_threads_fn set_threads, fnn_get_threads_fn get_threads)
    int fnn_blas_single_begin()
    void fnn_blas_single_end()
    ctypedef void (*fnn_task_fn)(void *ctx, Py_ssize_t i) noexcept nogil
    int fnn_pool_run(fnn_task_fn task, void *ctx, Py_ssize_t n_tasks)
    void fnn_pool_set_spin_us(Py_ssize_t us)
    Py_ssize_t fnn_pool_spin_us()
    int fnn_pool_workers()
    int fnn_pool_thread_index()
    void fnn_pool_stats(Py_ssize_t *posted, Py_ssize_t *helped)
    void fnn_pool_set_busy(int busy)
    void fnn_im2col_f(const float *x, Py_ssize_t n, const fnn_geometry *g, float *cols, Py_ssize_t ld, int parallel)
    void fnn_im2col_d(const double *x, Py_ssize_t n, const fnn_geometry *g, double *cols, Py_ssize_t ld, int parallel)
    void fnn_col2im_f(const float *cols, Py_ssize_t n, const fnn_geometry *g, float *x, Py_ssize_t ld, int parallel)
    void fnn_col2im_d(const double *cols, Py_ssize_t n, const fnn_geometry *g, double *x, Py_ssize_t ld, int parallel)
    void fnn_pad_rows_f(const float *a, Py_ssize_t planes, Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t wp, float *out)
    void fnn_pad_rows_d(const double *a, Py_ssize_t planes, Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t wp, double *out)
    void fnn_col2im_rows_f(const float *cols, const fnn_geometry *g, float *x, float *work)
    void fnn_col2im_rows_d(const double *cols, const fnn_geometry *g, double *x, double *work)
    void fnn_im2row_f(const float *x_hwc, const fnn_geometry *g, float *rows, int parallel)
    void fnn_im2row_d(const double *x_hwc, const fnn_geometry *g, double *rows, int parallel)
    void fnn_transpose_f(const float *a, Py_ssize_t rows, Py_ssize_t cols, float *out, int parallel)
    void fnn_transpose_d(const double *a, Py_ssize_t rows, Py_ssize_t cols, double *out, int parallel)
    void fnn_transpose_bias_f(const float *a, Py_ssize_t rows, Py_ssize_t cols, const float *bias,
                              float *out, int parallel)
    void fnn_transpose_bias_d(const double *a, Py_ssize_t rows, Py_ssize_t cols, const double *bias,
                              double *out, int parallel)
    void fnn_maxpool2d_forward_f(const float *x, Py_ssize_t planes, Py_ssize_t h, Py_ssize_t w, int kh, int kw,
                                 int sh, int sw, float *y, int64_t *argmax)
    void fnn_maxpool2d_forward_d(const double *x, Py_ssize_t planes, Py_ssize_t h, Py_ssize_t w, int kh, int kw,
                                 int sh, int sw, double *y, int64_t *argmax)
    Py_ssize_t fnn_maxpool2d_backward_f(const float *grad_y, const int64_t *argmax, Py_ssize_t planes,
                                  Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t h, Py_ssize_t w,
                                  float *grad_x, int zeroed)
    Py_ssize_t fnn_maxpool2d_backward_d(const double *grad_y, const int64_t *argmax, Py_ssize_t planes,
                                  Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t h, Py_ssize_t w,
                                  double *grad_x, int zeroed)
    void fnn_avgpool2d_forward_f(const float *x, Py_ssize_t planes, Py_ssize_t h, Py_ssize_t w, int kh, int kw,
                                 int sh, int sw, float *y)
    void fnn_avgpool2d_forward_d(const double *x, Py_ssize_t planes, Py_ssize_t h, Py_ssize_t w, int kh, int kw,
                                 int sh, int sw, double *y)
    void fnn_avgpool2d_backward_f(const float *grad_y, Py_ssize_t planes, Py_ssize_t h, Py_ssize_t w, int kh,
                                  int kw, int sh, int sw, float *grad_x)
    void fnn_avgpool2d_backward_d(const double *grad_y, Py_ssize_t planes, Py_ssize_t h, Py_ssize_t w, int kh,
                                  int kw, int sh, int sw, double *grad_x)
    void fnn_leaky_relu_forward_f(const float *x, float *y, Py_ssize_t n, float alpha)
    void fnn_leaky_relu_forward_d(const double *x, double *y, Py_ssize_t n, double alpha)
    void fnn_leaky_relu_backward_f(const float *grad_y, const float *x, float *grad_x, Py_ssize_t n,
                                   float alpha)
    void fnn_leaky_relu_backward_d(const double *grad_y, const double *x, double *grad_x,
                                   Py_ssize_t n, double alpha)
    void fnn_dropout_forward_f(const float *x, float *y, float *mask, Py_ssize_t n, uint64_t keep_from,
                               float scale, uint64_t seed)
    void fnn_dropout_forward_d(const double *x, double *y, double *mask, Py_ssize_t n,
                               uint64_t keep_from, double scale, uint64_t seed)
    void fnn_multiply_f(const float *a, const float *b, float *out, Py_ssize_t n)
    void fnn_multiply_d(const double *a, const double *b, double *out, Py_ssize_t n)
    void fnn_batchnorm_stats_f(const float *x, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, float *mean, float *var,
                               double *work)
    void fnn_batchnorm_stats_d(const double *x, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, double *mean,
                               double *var, double *work)
    void fnn_batchnorm_apply_f(const float *x, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, const float *mean,
                               const float *var, float eps, const float *gamma,
                               const float *beta, float *inv_std, float *x_hat, float *y, int relu)
    void fnn_batchnorm_apply_d(const double *x, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, const double *mean,
                               const double *var, double eps, const double *gamma,
                               const double *beta, double *inv_std, double *x_hat, double *y,
                               int relu)
    void fnn_batchnorm_backward_f(const float *grad_y, const float *x_hat, Py_ssize_t n, Py_ssize_t c,
                                  Py_ssize_t s, const float *gamma, const float *inv_std,
                                  float *grad_x, float *grad_gamma, float *grad_beta,
                                  double *work, const float *relu_y)
    void fnn_batchnorm_backward_d(const double *grad_y, const double *x_hat, Py_ssize_t n, Py_ssize_t c,
                                  Py_ssize_t s, const double *gamma, const double *inv_std,
                                  double *grad_x, double *grad_gamma, double *grad_beta,
                                  double *work, const double *relu_y)
    void fnn_relu_forward_f(const float *x, float *y, Py_ssize_t n)
    void fnn_relu_forward_d(const double *x, double *y, Py_ssize_t n)
    void fnn_relu_backward_f(const float *grad_y, const float *y, float *grad_x, Py_ssize_t n)
    void fnn_relu_backward_d(const double *grad_y, const double *y, double *grad_x, Py_ssize_t n)
    double fnn_softmax_xent_f(const float *logits, Py_ssize_t n, Py_ssize_t c, const int64_t *labels,
                              const float *target, float *grad, double *row_loss,
                              int64_t *predicted)
    double fnn_softmax_xent_d(const double *logits, Py_ssize_t n, Py_ssize_t c, const int64_t *labels,
                              const double *target, double *grad, double *row_loss,
                              int64_t *predicted)
    void fnn_column_sums_f(const float *a, Py_ssize_t rows, Py_ssize_t cols, float *out)
    void fnn_column_sums_d(const double *a, Py_ssize_t rows, Py_ssize_t cols, double *out)
    int fnn_all_finite_f(const float *a, Py_ssize_t n)
    int fnn_all_finite_d(const double *a, Py_ssize_t n)
    void fnn_row_sums_f(const float *a, Py_ssize_t rows, Py_ssize_t cols, float *out, int accumulate)
    void fnn_row_sums_d(const double *a, Py_ssize_t rows, Py_ssize_t cols, double *out, int accumulate)
    void fnn_broadcast_f(float *a, const float *value, Py_ssize_t rows, Py_ssize_t cols, int per_row)
    void fnn_broadcast_d(double *a, const double *value, Py_ssize_t rows, Py_ssize_t cols, int per_row)
    ctypedef void (*fnn_gemm_fn_f)(int, int, int, int, int, float, const float *, int,
                                   const float *, int, float, float *, int)
    ctypedef void (*fnn_gemm_fn_d)(int, int, int, int, int, double, const double *, int,
                                   const double *, int, double, double *, int)
    Py_ssize_t fnn_winograd_forward_workspace_f(Py_ssize_t n, const fnn_geometry *g, Py_ssize_t k, int threads)
    Py_ssize_t fnn_winograd_forward_workspace_d(Py_ssize_t n, const fnn_geometry *g, Py_ssize_t k, int threads)
    void fnn_winograd_forward_f(const float *x, Py_ssize_t n, const fnn_geometry *g, const float *w,
                                Py_ssize_t k, const float *bias, float *y, int64_t *argmax,
                                float *work, int threads, fnn_gemm_fn_f gemm)
    void fnn_winograd_forward_d(const double *x, Py_ssize_t n, const fnn_geometry *g, const double *w,
                                Py_ssize_t k, const double *bias, double *y, int64_t *argmax,
                                double *work, int threads, fnn_gemm_fn_d gemm)
    Py_ssize_t fnn_winograd_backward_workspace_f(Py_ssize_t n, const fnn_geometry *g, Py_ssize_t k, int threads,
                                           int need_grad_x)
    Py_ssize_t fnn_winograd_backward_workspace_d(Py_ssize_t n, const fnn_geometry *g, Py_ssize_t k, int threads,
                                           int need_grad_x)
    void fnn_winograd_backward_f(const float *grad_y, const float *x, Py_ssize_t n,
                                 const fnn_geometry *g, const float *w, Py_ssize_t k, float *grad_x,
                                 float *grad_w, float *grad_b, float *work, int threads,
                                 fnn_gemm_fn_f gemm)
    void fnn_winograd_backward_d(const double *grad_y, const double *x, Py_ssize_t n,
                                 const fnn_geometry *g, const double *w, Py_ssize_t k,
                                 double *grad_x, double *grad_w, double *grad_b, double *work,
                                 int threads, fnn_gemm_fn_d gemm)
    Py_ssize_t fnn_winograd_set_tiles(Py_ssize_t tiles)
    int fnn_direct_conv_fits(const fnn_geometry *g, Py_ssize_t k)
    Py_ssize_t fnn_direct_conv_block(Py_ssize_t k)
    Py_ssize_t fnn_direct_conv_workspace(const fnn_geometry *g)
    void fnn_direct_conv_forward_f(const float *x, const fnn_geometry *g, const float *wt,
                                   Py_ssize_t k, const float *bias, float *y, float *work)
    void fnn_direct_conv_grad_w_f(const float *grad_y, const float *x, const fnn_geometry *g,
                                  Py_ssize_t k, float *grad_w, float *work)
    void fnn_conv_implicit_f(const float *xp, Py_ssize_t wp, Py_ssize_t c, int kh, int kw,
                             Py_ssize_t oh, Py_ssize_t ow, const float *w, Py_ssize_t k,
                             float *y_t)
    void fnn_conv_implicit_grad_w_f(const float *xp, Py_ssize_t wp, Py_ssize_t c, int kh,
                                    int kw, Py_ssize_t oh, Py_ssize_t ow, const float *gy_t,
                                    Py_ssize_t k, float *gw)
    void fnn_pad_hwc_f(const float *x, Py_ssize_t c, Py_ssize_t h, Py_ssize_t w, Py_ssize_t ph,
                       Py_ssize_t pw, float *xp)
    void fnn_conv_implicit_grad_x_f(const float *gy_t, Py_ssize_t ldg, Py_ssize_t k,
                                    const float *wg, Py_ssize_t c, int kh, int kw, Py_ssize_t oh,
                                    Py_ssize_t ow, Py_ssize_t wp, float *gxp)
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
    void fnn_sgemv_f(const float *x, const float *w, Py_ssize_t ldw, Py_ssize_t i,
                     Py_ssize_t o, float *y, int add)
    int fnn_avx512_rows
    void fnn_sgd_momentum_f(float *p, const float *g, float *buf, Py_ssize_t n, float lr,
                            float momentum)
    int fnn_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                  int lda, const float *b, int ldb, float beta, float *c, int ldc)
