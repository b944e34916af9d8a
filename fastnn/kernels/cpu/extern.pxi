# fastnn/kernels/cpu/extern.pxi -- included by _cpu.pyx.
#
# The C interface of csrc/ (fastnn_kernels.h): every fnn_* function and struct the
# compiled module calls, in one place. Threading: none here (see each family's file
# for how its calls are threaded).

cdef extern from "fastnn_kernels.h" nogil:
    ctypedef struct fnn_geometry:
        long c, h, w
        int kh, kw, sh, sw, ph, pw
        long oh, ow
    int fnn_max_threads()
    int fnn_forked_child
    void fnn_fork_guard_install()
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
