/* Implicit-GEMM float32 convolution for CPUs with AVX-512 (stride 1).
 *
 * Why: the patch-row path builds, per sample, a matrix of one kh*kw*C row per output
 * pixel (im2row) and multiplies it with the weights. With few channels and a 5x5
 * kernel (MNIST's 12 -> 24 on 14x14, LeNet's 6 -> 16) the copies are C floats long
 * and, with the transposes around them, took about 40% of the forward pass on an
 * Intel Xeon (AVX-512). Here the micro-kernel reads the patch values where they are:
 * the sample padded and channels last (Hp x Wp x C), where one kernel row of a patch,
 * kw*C values, is contiguous. No patch matrix is built.
 *
 * fnn_conv_implicit_f: y_t (OH*OW x K) = patches(xp) @ w, w (kh*kw*C x Kp) packed
 *   with Kp = K rounded up to 16 (zero columns).
 * fnn_conv_implicit_grad_w_f: gw (kh*kw*C x Kp) += patches(xp).T @ gy_t, gy_t
 *   (OH*OW x Kp) with zero columns from K on.
 * fnn_conv_implicit_grad_x_f: the input gradient, padded and channels last, summed
 *   tap by tap (gy_t times each tap's weights, added where the tap reads), no columns
 *   and no col2im; the caller takes it from 12 input channels (conv.pxi,
 *   IMPLICIT_SCATTER_MIN_CHANNELS): with fewer, most of its 16 lanes hold padding.
 *
 * Tiles: 12 output pixels (or 12 patch values) x 32 output channels (two zmm) in 24
 * accumulators, as in sgemm.c. Each output value is its products summed in (i, j, c)
 * order (the patch rows' order; grad_w: in pixel order): the same bits on any thread.
 * Compiled with target attributes (no -mavx512f for the file); callers check
 * fnn_sgemm_supported() once. */
#include <string.h>

#include "fastnn_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)

#include <immintrin.h>

#define MR 12               /* output pixels (forward, grad_x) or patch values (grad_w) a tile */
#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#define INLINE static inline __attribute__((always_inline))

static __mmask16 lanes(ptrdiff_t count)          /* mask of the first count (<= 16) lanes */
{
    return count >= 16 ? (__mmask16)0xffff : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}

/* rows (<= MR) output pixels from pixel p on, output channels [col, col + 16 * vecs):
 * acc = sum over kernel rows i of the kw*C patch values at px[r] + i * row_stride
 * times w's rows; stored to y_t (row stride k), channels < k only. */
TARGET INLINE void forward_tile(const int rows, const int vecs, const float *const *px,
                                ptrdiff_t row_stride, int kh, ptrdiff_t seg, const float *w,
                                ptrdiff_t kp, ptrdiff_t col, float *y_t, ptrdiff_t k, int mv)
{
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int i = 0; i < kh; i++) {
        const float *wi = w + (ptrdiff_t)i * seg * kp + col;
        const ptrdiff_t off = (ptrdiff_t)i * row_stride;
        for (ptrdiff_t t = 0; t < seg; t++, wi += kp) {
            __m512 b0 = _mm512_loadu_ps(wi);
            __m512 b1 = vecs > 1 ? _mm512_loadu_ps(wi + 16) : b0;
#pragma GCC unroll 12
            for (int r = 0; r < rows; r++) {
                __m512 a = _mm512_set1_ps(px[r][off + t]);
                acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
                if (vecs > 1)
                    acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
            }
        }
    }
    __mmask16 m0 = lanes(k - col), m1 = lanes(k - col - 16);
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) {
        if (r >= mv)
            break;
        _mm512_mask_storeu_ps(y_t + r * k + col, m0, acc[r][0]);
        if (vecs > 1)
            _mm512_mask_storeu_ps(y_t + r * k + col + 16, m1, acc[r][1]);
    }
}

#define FORWARD_TILE(R, V)                                                                   \
    TARGET static void forward_##R##_##V(const float *const *px, ptrdiff_t row_stride, int kh, \
                                         ptrdiff_t seg, const float *w, ptrdiff_t kp,         \
                                         ptrdiff_t col, float *y_t, ptrdiff_t k, int mv)     \
    {                                                                                        \
        forward_tile(R, V, px, row_stride, kh, seg, w, kp, col, y_t, k, mv);                 \
    }
FORWARD_TILE(12, 2) FORWARD_TILE(8, 2) FORWARD_TILE(4, 2)
FORWARD_TILE(12, 1) FORWARD_TILE(8, 1) FORWARD_TILE(4, 1)

typedef void (*forward_fn)(const float *const *, ptrdiff_t, int, ptrdiff_t, const float *,
                           ptrdiff_t, ptrdiff_t, float *, ptrdiff_t, int);
static const forward_fn forward_tiles[2][3] = {{forward_4_1, forward_8_1, forward_12_1},
                                               {forward_4_2, forward_8_2, forward_12_2}};

TARGET void fnn_conv_implicit_f(const float *xp, ptrdiff_t wp, ptrdiff_t c, int kh, int kw,
                                ptrdiff_t oh, ptrdiff_t ow, const float *w, ptrdiff_t k,
                                float *y_t)
{
    const ptrdiff_t kp = (k + 15) / 16 * 16, seg = (ptrdiff_t)kw * c, pixels = oh * ow;
    const float *px[MR];
    for (ptrdiff_t p0 = 0; p0 < pixels; p0 += MR) {
        const int mv = pixels - p0 < MR ? (int)(pixels - p0) : MR;
        for (int r = 0; r < MR; r++) {     /* rows past mv read pixel p0 again, unused */
            const ptrdiff_t p = p0 + (r < mv ? r : 0);
            px[r] = xp + ((p / ow) * wp + p % ow) * c;
        }
        const int size = mv <= 4 ? 0 : mv <= 8 ? 1 : 2;
        for (ptrdiff_t col = 0; col < kp; col += 32) {
            const int vecs = kp - col > 16 ? 2 : 1;
            forward_tiles[vecs - 1][size](px, wp * c, kh, seg, w, kp, col, y_t + p0 * k, k,
                                          mv);
        }
    }
}

/* gw rows [t0, t0 + rows) of kernel row i (t0 + r < seg), channels [col, col + 16 * vecs):
 * += the sum over pixels p of patch value (i, t0 + r) of p times gy_t[p]. */
TARGET INLINE void grad_w_tile(const int rows, const int vecs, const float *xp, ptrdiff_t wp,
                               ptrdiff_t c, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t start,
                               const float *gy_t, ptrdiff_t kp, ptrdiff_t col, float *gw)
{
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float *g = gy_t + col;
    for (ptrdiff_t y = 0; y < oh; y++) {
        const float *a = xp + y * wp * c + start;
        for (ptrdiff_t x = 0; x < ow; x++, a += c, g += kp) {
            __m512 b0 = _mm512_loadu_ps(g);
            __m512 b1 = vecs > 1 ? _mm512_loadu_ps(g + 16) : b0;
#pragma GCC unroll 12
            for (int r = 0; r < rows; r++) {
                __m512 v = _mm512_set1_ps(a[r]);
                acc[r][0] = _mm512_fmadd_ps(v, b0, acc[r][0]);
                if (vecs > 1)
                    acc[r][1] = _mm512_fmadd_ps(v, b1, acc[r][1]);
            }
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) {
        float *out = gw + r * kp + col;
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[r][0]));
        if (vecs > 1)
            _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16), acc[r][1]));
    }
}

#define GRAD_W_TILE(R, V)                                                                    \
    TARGET static void grad_w_##R##_##V(const float *xp, ptrdiff_t wp, ptrdiff_t c,          \
                                        ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t start,          \
                                        const float *gy_t, ptrdiff_t kp, ptrdiff_t col,       \
                                        float *gw)                                            \
    {                                                                                        \
        grad_w_tile(R, V, xp, wp, c, oh, ow, start, gy_t, kp, col, gw);                       \
    }
GRAD_W_TILE(12, 2) GRAD_W_TILE(8, 2) GRAD_W_TILE(4, 2)
GRAD_W_TILE(12, 1) GRAD_W_TILE(8, 1) GRAD_W_TILE(4, 1)
GRAD_W_TILE(1, 2) GRAD_W_TILE(1, 1)

typedef void (*grad_w_fn)(const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                          const float *, ptrdiff_t, ptrdiff_t, float *);
static const grad_w_fn grad_w_tiles[2][4] = {{grad_w_1_1, grad_w_4_1, grad_w_8_1, grad_w_12_1},
                                             {grad_w_1_2, grad_w_4_2, grad_w_8_2, grad_w_12_2}};

TARGET void fnn_conv_implicit_grad_w_f(const float *xp, ptrdiff_t wp, ptrdiff_t c, int kh,
                                       int kw, ptrdiff_t oh, ptrdiff_t ow, const float *gy_t,
                                       ptrdiff_t k, float *gw)
{
    const ptrdiff_t kp = (k + 15) / 16 * 16, seg = (ptrdiff_t)kw * c;
    for (int i = 0; i < kh; i++)
        for (ptrdiff_t t0 = 0; t0 < seg;) {
            /* the widest tile that fits the rest of the kernel row exactly */
            const ptrdiff_t left = seg - t0;
            const int rows = left >= 12 ? 12 : left >= 8 ? 8 : left >= 4 ? 4 : 1;
            const int size = rows == 12 ? 3 : rows == 8 ? 2 : rows == 4 ? 1 : 0;
            const ptrdiff_t start = (ptrdiff_t)i * wp * c + t0;
            for (ptrdiff_t col = 0; col < kp; col += 32) {
                const int vecs = kp - col > 16 ? 2 : 1;
                grad_w_tiles[vecs - 1][size](xp, wp, c, oh, ow, start, gy_t, kp, col,
                                             gw + (i * seg + t0) * kp);
            }
            t0 += rows;
        }
}

/* rows (<= MR) grad_y pixels from pixel p0 on, input channels [col, col + 16 * vecs),
 * kernel tap t: gxp[target(p) + col ...] += sum over k of gy_t[p][k] * wg[t][k][...]. */
TARGET INLINE void grad_x_tile(const int rows, const int vecs, const float *const *gp,
                               ptrdiff_t k, const float *wt, ptrdiff_t cp, ptrdiff_t col,
                               float *const *out, int mv)
{
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float *w = wt + col;
    for (ptrdiff_t q = 0; q < k; q++, w += cp) {
        __m512 b0 = _mm512_loadu_ps(w);
        __m512 b1 = vecs > 1 ? _mm512_loadu_ps(w + 16) : b0;
#pragma GCC unroll 12
        for (int r = 0; r < rows; r++) {
            __m512 a = _mm512_set1_ps(gp[r][q]);
            acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
            if (vecs > 1)
                acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) {     /* whole vectors: a load then finds the store */
        if (r >= mv)                     /* of the tap before (masked ones do not) */
            break;
        float *o = out[r] + col;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[r][0]));
        if (vecs > 1)
            _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), acc[r][1]));
    }
}

#define GRAD_X_TILE(R, V)                                                                    \
    TARGET static void grad_x_##R##_##V(const float *const *gp, ptrdiff_t k, const float *wt, \
                                        ptrdiff_t cp, ptrdiff_t col, float *const *out,       \
                                        int mv)                                               \
    {                                                                                        \
        grad_x_tile(R, V, gp, k, wt, cp, col, out, mv);                                       \
    }
GRAD_X_TILE(12, 2) GRAD_X_TILE(8, 2) GRAD_X_TILE(4, 2)
GRAD_X_TILE(12, 1) GRAD_X_TILE(8, 1) GRAD_X_TILE(4, 1)

typedef void (*grad_x_fn)(const float *const *, ptrdiff_t, const float *, ptrdiff_t, ptrdiff_t,
                          float *const *, int);
static const grad_x_fn grad_x_tiles[2][3] = {{grad_x_4_1, grad_x_8_1, grad_x_12_1},
                                             {grad_x_4_2, grad_x_8_2, grad_x_12_2}};

TARGET void fnn_conv_implicit_grad_x_f(const float *gy_t, ptrdiff_t ldg, ptrdiff_t k,
                                       const float *wg, ptrdiff_t c, int kh, int kw,
                                       ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t wp, float *gxp)
{
    const ptrdiff_t cp = (c + 15) / 16 * 16, pixels = oh * ow;
    const float *gp[MR];
    float *out[MR];
    for (int i = 0; i < kh; i++)             /* taps outermost: col2im's order of sums */
        for (int j = 0; j < kw; j++) {
            const float *wt = wg + ((ptrdiff_t)i * kw + j) * k * cp;
            for (ptrdiff_t p0 = 0; p0 < pixels; p0 += MR) {
                const int mv = pixels - p0 < MR ? (int)(pixels - p0) : MR;
                ptrdiff_t y = p0 / ow, x = p0 % ow;      /* pixel p0 + r, r < mv */
                for (int r = 0; r < MR; r++) {           /* rows past mv: pixel p0 again */
                    gp[r] = gy_t + (r < mv ? p0 + r : p0) * ldg;
                    out[r] = gxp + ((y + i) * wp + x + j) * cp;
                    if (r + 1 < mv && ++x == ow) {
                        x = 0;
                        y++;
                    }
                }
                const int size = mv <= 4 ? 0 : mv <= 8 ? 1 : 2;
                for (ptrdiff_t col = 0; col < cp; col += 32) {
                    const int vecs = cp - col > 16 ? 2 : 1;
                    grad_x_tiles[vecs - 1][size](gp, k, wt, cp, col, out, mv);
                }
            }
        }
}

#else       /* never called: fnn_sgemm_supported() is 0 on this build */

void fnn_conv_implicit_f(const float *xp, ptrdiff_t wp, ptrdiff_t c, int kh, int kw,
                         ptrdiff_t oh, ptrdiff_t ow, const float *w, ptrdiff_t k, float *y_t)
{
    (void)xp; (void)wp; (void)c; (void)kh; (void)kw; (void)oh; (void)ow; (void)w; (void)k;
    (void)y_t;
}

void fnn_conv_implicit_grad_w_f(const float *xp, ptrdiff_t wp, ptrdiff_t c, int kh, int kw,
                                ptrdiff_t oh, ptrdiff_t ow, const float *gy_t, ptrdiff_t k,
                                float *gw)
{
    (void)xp; (void)wp; (void)c; (void)kh; (void)kw; (void)oh; (void)ow; (void)gy_t; (void)k;
    (void)gw;
}

void fnn_conv_implicit_grad_x_f(const float *gy_t, ptrdiff_t ldg, ptrdiff_t k, const float *wg,
                                ptrdiff_t c, int kh, int kw, ptrdiff_t oh, ptrdiff_t ow,
                                ptrdiff_t wp, float *gxp)
{
    (void)gy_t; (void)ldg; (void)k; (void)wg; (void)c; (void)kh; (void)kw; (void)oh; (void)ow;
    (void)wp; (void)gxp;
}

#endif

/* xp (H + 2ph) x (W + 2pw) x C, channels last, zero border = x (C, H, W). */
void fnn_pad_hwc_f(const float *x, ptrdiff_t c, ptrdiff_t h, ptrdiff_t w, ptrdiff_t ph,
                   ptrdiff_t pw, float *xp)
{
    const ptrdiff_t wp = w + 2 * pw;
    memset(xp, 0, (size_t)((h + 2 * ph) * wp * c) * sizeof(float));
    for (ptrdiff_t ch = 0; ch < c; ch++)
        for (ptrdiff_t y = 0; y < h; y++) {
            const float *src = x + (ch * h + y) * w;
            float *dst = xp + ((y + ph) * wp + pw) * c + ch;
            for (ptrdiff_t q = 0; q < w; q++)
                dst[q * c] = src[q];
        }
}
