/* Direct float32 convolution for few output channels (LeNet's 1->6 and 6->16 5x5).
 *
 * There the patch-matrix GEMMs are thin (6 or 16 output rows): OpenBLAS ran LeNet's
 * conv1 GEMM W (6x25) @ cols (25x784) at about 38 GFLOP/s, and conv2 spent more time
 * on the NCHW -> HWC transpose, the patch-row copies and y.T's transpose than in its
 * GEMMs. Here each output row is computed in blocks of 8 pixels x KB output channels
 * held in registers: one load of 8 input pixels feeds KB multiply-adds, and no patch
 * matrix is built. GCC vector extensions (GCC and clang), cloned for x86-64-v3
 * (AVX2 + FMA) with GCC's target_clones; chosen only on CPUs with AVX2 + FMA (see
 * fast_vectors), elsewhere the patch-matrix GEMMs run.
 *
 * Each output value is its bias plus the products in (c, i, j) order: the same bits
 * whichever thread computes it. A row narrower than 8 pixels is not handled here
 * (the caller checks fnn_direct_conv_fits); a ragged row end is one more block
 * overlapping the one before it, which writes the same values again. */
#include <string.h>

#include "fastnn_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
/* the helpers below are always inlined into their callers' clones */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void store8(float *p, v8f v)
{
    memcpy(p, &v, sizeof v);
}

/* Only the AVX2 + FMA clone pays: the portable one (8-float vectors as SSE pairs, no
 * FMA) measured 1.4 ms for LeNet's conv1 forward and 19.9 ms for conv2's, against
 * 0.56 and 0.91 ms on the GEMM paths, so without AVX2 + FMA the direct conv is not
 * chosen (its baseline clone exists because target_clones needs one). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* target_clones needs ifunc: glibc (musl has none; there the GEMMs run) */
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
static int fast_vectors(void)          /* reads libgcc's CPU model: cheap */
{
    return fnn_cpu_cap >= FNN_CPU_AVX2 && __builtin_cpu_supports("avx2")
           && __builtin_cpu_supports("fma");
}
#else
#define CLONES
static int fast_vectors(void) { return 0; }
#endif

int fnn_direct_conv_fits(const fnn_geometry *g, ptrdiff_t k)
{
    return g->sh == 1 && g->sw == 1 && g->ow >= 8 && k >= 1 && k <= FNN_DIRECT_MAX_K
           && g->kw <= FNN_DIRECT_MAX_KW && fast_vectors();
}

ptrdiff_t fnn_direct_conv_block(ptrdiff_t k)
{
    return k <= 4 ? 4 : k <= 6 ? 6 : 8;
}

ptrdiff_t fnn_direct_conv_workspace(const fnn_geometry *g)
{
    return g->c * (g->h + 2 * g->ph) * (g->w + 2 * g->pw);
}

/* One block of KB output channels over all output rows of one sample. xp: padded
 * input (C, hp, wp); wt: weights (C*kh*kw, kp) with this block's columns at wt[0..KB). */
static inline __attribute__((always_inline)) void
forward_block(const float *xp, ptrdiff_t hp, ptrdiff_t wp, const fnn_geometry *g, const float *wt,
              ptrdiff_t kp, const float *bias, float *y, ptrdiff_t kb, const int KB)
{
    const ptrdiff_t ohw = g->oh * g->ow, ow = g->ow;
    for (ptrdiff_t oh = 0; oh < g->oh; oh++)
        for (ptrdiff_t ow0 = 0;; ow0 += 8) {
            if (ow0 + 8 > ow) ow0 = ow - 8;
            v8f acc[8];
            for (int kk = 0; kk < KB; kk++) acc[kk] = (v8f){0} + bias[kk];
            for (ptrdiff_t c = 0; c < g->c; c++)
                for (int i = 0; i < g->kh; i++) {
                    const float *src = xp + (c * hp + oh + i) * wp + ow0;
                    const float *w = wt + ((c * g->kh + i) * g->kw) * kp;
                    for (int j = 0; j < g->kw; j++, w += kp) {
                        const v8f xv = load8(src + j);
                        for (int kk = 0; kk < KB; kk++) acc[kk] += xv * w[kk];
                    }
                }
            for (int kk = 0; kk < kb; kk++) store8(y + kk * ohw + oh * ow + ow0, acc[kk]);
            if (ow0 + 8 == ow) break;
        }
}

/* x (C, h, w) -> work: the input with a zero border of the padding (returned), or x. */
static const float *padded_input(const float *x, const fnn_geometry *g, float *work)
{
    const ptrdiff_t hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw;
    if (!g->ph && !g->pw) return x;
    memset(work, 0, (size_t)(g->c * hp * wp) * sizeof(float));
    for (ptrdiff_t c = 0; c < g->c; c++)
        for (ptrdiff_t r = 0; r < g->h; r++)
            memcpy(work + (c * hp + r + g->ph) * wp + g->pw, x + (c * g->h + r) * g->w,
                   (size_t)g->w * sizeof(float));
    return work;
}

/* The same for k a multiple of 8 (KV = k/8 vectors of channels, 1 or 2) and narrow
 * rows: blocks of 6 pixels x k channels, the channels along the lanes, so no lane
 * is wasted on a 10-pixel row (LeNet's conv2, 16 channels: 37% fewer multiply-adds
 * than 8-pixel blocks, 595 -> ~350 us per batch of 64 on one thread). One x value
 * broadcast feeds KV multiply-adds, one weight vector 6. */
static inline __attribute__((always_inline)) void
forward_channels(const float *xp, ptrdiff_t hp, ptrdiff_t wp, const fnn_geometry *g, const float *wt,
                 ptrdiff_t k, const float *bias, float *y, const int KV)
{
    enum { P = 6 };
    const ptrdiff_t ohw = g->oh * g->ow, ow = g->ow;
    for (ptrdiff_t oh = 0; oh < g->oh; oh++)
        for (ptrdiff_t ow0 = 0;; ow0 += P) {
            if (ow0 + P > ow) ow0 = ow - P;
            v8f acc[P][2];
            for (int v = 0; v < KV; v++)
                for (int p = 0; p < P; p++) acc[p][v] = load8(bias + 8 * v);
            for (ptrdiff_t c = 0; c < g->c; c++)
                for (int i = 0; i < g->kh; i++) {
                    const float *src = xp + (c * hp + oh + i) * wp + ow0;
                    const float *w = wt + ((c * g->kh + i) * g->kw) * k;
                    for (int j = 0; j < g->kw; j++, w += k) {
                        v8f wv[2];
                        for (int v = 0; v < KV; v++) wv[v] = load8(w + 8 * v);
                        for (int p = 0; p < P; p++) {
                            const float xv = src[p + j];
                            for (int v = 0; v < KV; v++) acc[p][v] += wv[v] * xv;
                        }
                    }
                }
            float *out = y + oh * ow + ow0;
            for (int v = 0; v < KV; v++)
                for (int l = 0; l < 8; l++)
                    for (int p = 0; p < P; p++) out[(8 * v + l) * ohw + p] = acc[p][v][l];
            if (ow0 + P == ow) break;
        }
}

CLONES
void fnn_direct_conv_forward_f(const float *x, const fnn_geometry *g, const float *wt,
                               ptrdiff_t k, const float *bias, float *y, float *work)
{
    const ptrdiff_t hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw;
    const ptrdiff_t kb = fnn_direct_conv_block(k), kp = (k + kb - 1) / kb * kb;
    const float *xp = padded_input(x, g, work);      /* the taps need no bounds checks */
    if (k == 16) {
        forward_channels(xp, hp, wp, g, wt, k, bias, y, 2);
        return;
    }
    if (k == 8) {
        forward_channels(xp, hp, wp, g, wt, k, bias, y, 1);
        return;
    }
    for (ptrdiff_t k0 = 0; k0 < k; k0 += kb) {
        const ptrdiff_t left = k - k0 < kb ? k - k0 : kb;
        float *yk = y + k0 * g->oh * g->ow;
        if (kb == 4)
            forward_block(xp, hp, wp, g, wt + k0, kp, bias + k0, yk, left, 4);
        else if (kb == 6)
            forward_block(xp, hp, wp, g, wt + k0, kp, bias + k0, yk, left, 6);
        else
            forward_block(xp, hp, wp, g, wt + k0, kp, bias + k0, yk, left, 8);
    }
}

/* grad_w (k, c, kh, kw) += the correlation of grad_y (k, oh, ow) with the padded input:
 * per (k, c, i), kw vector sums over 8-pixel blocks of every output row (a ragged row
 * end: the last 8 pixels with the lanes already done masked off in both operands, so
 * an inf input meets no 0 * inf), then each summed across its lanes in a fixed order.
 * kw <= FNN_DIRECT_MAX_KW (fnn_direct_conv_fits). */
/* NK (1 or 2) filters' (k, c, i): out[n * ostride + j] += sum over oh, ow of
 * gy[n * ohw + oh * ow + ow0] * src[oh, ow + j], j < KW (compile-time counts, so the
 * NK * KW sums stay in registers). Two filters share each load of the input: with one,
 * the 28-pixel rows of a 1 -> 12 5x5 conv's grad_w (MNIST, pad 2) ran at about 45
 * GFLOP/s on two threads of this 2-vCPU Intel Xeon KVM guest (5 dependent chains of
 * multiply-adds, 6 loads per 5); each sum keeps its order, so the bits do not change. */
static inline __attribute__((always_inline)) void
grad_w_row(const float *gy, ptrdiff_t ohw, const float *src, ptrdiff_t oh_n, ptrdiff_t ow,
           ptrdiff_t wp, v8i mask, float *out, ptrdiff_t ostride, const int NK, const int KW)
{
    v8f acc[2][FNN_DIRECT_MAX_KW];
    for (int n = 0; n < NK; n++)
        for (int j = 0; j < KW; j++) acc[n][j] = (v8f){0};
    for (ptrdiff_t oh = 0; oh < oh_n; oh++, gy += ow, src += wp) {
        ptrdiff_t ow0 = 0;
        for (; ow0 + 8 <= ow; ow0 += 8) {
            v8f gv[2];
            for (int n = 0; n < NK; n++) gv[n] = load8(gy + n * ohw + ow0);
            for (int j = 0; j < KW; j++) {
                const v8f sv = load8(src + ow0 + j);
                for (int n = 0; n < NK; n++) acc[n][j] += gv[n] * sv;
            }
        }
        if (ow0 < ow) {
            ow0 = ow - 8;
            v8f gv[2];
            for (int n = 0; n < NK; n++) gv[n] = (v8f)((v8i)load8(gy + n * ohw + ow0) & mask);
            for (int j = 0; j < KW; j++) {
                const v8f sv = (v8f)((v8i)load8(src + ow0 + j) & mask);
                for (int n = 0; n < NK; n++) acc[n][j] += gv[n] * sv;
            }
        }
    }
    for (int n = 0; n < NK; n++)
        for (int j = 0; j < KW; j++) {
            const v8f a = acc[n][j];
            out[n * ostride + j] += ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        }
}

/* grad_w_row for NK filters with the kernel width as a compile-time count. */
static inline __attribute__((always_inline)) void
grad_w_rows(const float *gy, ptrdiff_t ohw, const float *src, const fnn_geometry *g, ptrdiff_t wp,
            v8i mask, float *out, ptrdiff_t ostride, const int NK)
{
    const ptrdiff_t oh = g->oh, ow = g->ow;
    switch (g->kw) {
    case 1: grad_w_row(gy, ohw, src, oh, ow, wp, mask, out, ostride, NK, 1); break;
    case 2: grad_w_row(gy, ohw, src, oh, ow, wp, mask, out, ostride, NK, 2); break;
    case 3: grad_w_row(gy, ohw, src, oh, ow, wp, mask, out, ostride, NK, 3); break;
    case 4: grad_w_row(gy, ohw, src, oh, ow, wp, mask, out, ostride, NK, 4); break;
    case 5: grad_w_row(gy, ohw, src, oh, ow, wp, mask, out, ostride, NK, 5); break;
    case 6: grad_w_row(gy, ohw, src, oh, ow, wp, mask, out, ostride, NK, 6); break;
    default: grad_w_row(gy, ohw, src, oh, ow, wp, mask, out, ostride, NK, 7); break;
    }
}

CLONES
void fnn_direct_conv_grad_w_f(const float *grad_y, const float *x, const fnn_geometry *g,
                              ptrdiff_t k, float *grad_w, float *work)
{
    const ptrdiff_t hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw, ow = g->ow, ohw = g->oh * g->ow;
    const ptrdiff_t tail = ow % 8;
    const float *xp = padded_input(x, g, work);
    v8i mask;                      /* lanes 8 - tail .. 7: the pixels the last block adds */
    for (int l = 0; l < 8; l++) mask[l] = l >= 8 - tail ? -1 : 0;
    const ptrdiff_t ostride = g->c * g->kh * g->kw;      /* one filter's grad_w */
    for (ptrdiff_t kk = 0; kk < k; kk += 2)
        for (ptrdiff_t c = 0; c < g->c; c++)
            for (int i = 0; i < g->kh; i++) {
                const float *gy = grad_y + kk * ohw, *src = xp + (c * hp + i) * wp;
                float *out = grad_w + ((kk * g->c + c) * g->kh + i) * g->kw;
                if (kk + 1 < k)
                    grad_w_rows(gy, ohw, src, g, wp, mask, out, ostride, 2);
                else
                    grad_w_rows(gy, ohw, src, g, wp, mask, out, ostride, 1);
            }
}
