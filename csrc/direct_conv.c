/* Direct float32 convolution for few output channels (LeNet's 1->6 and 6->16 5x5).
 *
 * There the patch-matrix GEMMs are thin (6 or 16 output rows): OpenBLAS ran LeNet's
 * conv1 GEMM W (6x25) @ cols (25x784) at about 38 GFLOP/s, and conv2 spent more time
 * on the NCHW -> HWC transpose, the patch-row copies and y.T's transpose than in its
 * GEMMs. Here each output row is computed in blocks of 8 pixels x KB output channels
 * held in registers: one load of 8 input pixels feeds KB multiply-adds, and no patch
 * matrix is built. GCC vector extensions; the loop is cloned for x86-64-v3 (AVX2 +
 * FMA) and the portable baseline (two SSE halves), chosen at load time.
 *
 * Each output value is its bias plus the products in (c, i, j) order: the same bits
 * whichever thread computes it. A row narrower than 8 pixels is not handled here
 * (the caller checks fnn_direct_conv_fits); a ragged row end is one more block
 * overlapping the one before it, which writes the same values again. */
#include <string.h>

#include "fastnn_kernels.h"

typedef float v8f __attribute__((vector_size(32)));

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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

int fnn_direct_conv_fits(const fnn_geometry *g, long k)
{
    return g->sh == 1 && g->sw == 1 && g->ow >= 8 && k >= 1 && k <= FNN_DIRECT_MAX_K;
}

long fnn_direct_conv_block(long k)
{
    return k <= 4 ? 4 : k <= 6 ? 6 : 8;
}

long fnn_direct_conv_workspace(const fnn_geometry *g)
{
    return g->c * (g->h + 2 * g->ph) * (g->w + 2 * g->pw);
}

/* One block of KB output channels over all output rows of one sample. xp: padded
 * input (C, hp, wp); wt: weights (C*kh*kw, kp) with this block's columns at wt[0..KB). */
static inline __attribute__((always_inline)) void
forward_block(const float *xp, long hp, long wp, const fnn_geometry *g, const float *wt,
              long kp, const float *bias, float *y, long kb, const int KB)
{
    const long ohw = g->oh * g->ow, ow = g->ow;
    for (long oh = 0; oh < g->oh; oh++)
        for (long ow0 = 0;; ow0 += 8) {
            if (ow0 + 8 > ow) ow0 = ow - 8;
            v8f acc[8];
            for (int kk = 0; kk < KB; kk++) acc[kk] = (v8f){0} + bias[kk];
            for (long c = 0; c < g->c; c++)
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

CLONES
void fnn_direct_conv_forward_f(const float *x, const fnn_geometry *g, const float *wt,
                               long k, const float *bias, float *y, float *work)
{
    const long hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw;
    const long kb = fnn_direct_conv_block(k), kp = (k + kb - 1) / kb * kb;
    const float *xp = x;
    if (g->ph || g->pw) {          /* a zero border, so the taps need no bounds checks */
        memset(work, 0, (size_t)(g->c * hp * wp) * sizeof(float));
        for (long c = 0; c < g->c; c++)
            for (long r = 0; r < g->h; r++)
                memcpy(work + (c * hp + r + g->ph) * wp + g->pw, x + (c * g->h + r) * g->w,
                       (size_t)g->w * sizeof(float));
        xp = work;
    }
    for (long k0 = 0; k0 < k; k0 += kb) {
        const long left = k - k0 < kb ? k - k0 : kb;
        float *yk = y + k0 * g->oh * g->ow;
        if (kb == 4)
            forward_block(xp, hp, wp, g, wt + k0, kp, bias + k0, yk, left, 4);
        else if (kb == 6)
            forward_block(xp, hp, wp, g, wt + k0, kp, bias + k0, yk, left, 6);
        else
            forward_block(xp, hp, wp, g, wt + k0, kp, bias + k0, yk, left, 8);
    }
}
