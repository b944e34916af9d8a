/* fastnn's own single-threaded float32 GEMM for CPUs with AVX-512 (row-major).
 *
 * Why: OpenBLAS 0.3.30 (SkylakeX kernel) runs the GEMMs of small dense layers well
 * below its 2048^3 rate on a Zen 4 core. benchmarks/bench_gemm.py, one thread, 15
 * alternating rounds, median GFLOP/s OpenBLAS / here, m x n x k: W1's 256x1024x1024
 * NN 77 / 90 and NT 77 / 96, 1024x1024x256 TN 88 / 97; W2's 128x256x784 NN 87 / 98,
 * 128x256x128 NT 78 / 95; Winograd's 64x64x256 TN 62 / 85; 2048^3 92 / 92. On an
 * Intel Xeon with AVX-512: 1.01-1.48x. (RESULTS.md has the whole table.)
 *
 * Classic Goto/BLIS structure, row-major C = alpha op(A) op(B) + beta C:
 *   for each block of K (KC deep, equal blocks): for each block of M (MC rows):
 *     pack A's block into panels of MR rows (k-major: MR values per k), unless A is
 *     read in place (untransposed, see fnn_sgemm)
 *     for each block of N (NC columns): pack B's block into panels of NR columns
 *       for each MR x NR tile: the micro-kernel, 24 zmm accumulators.
 * The micro-kernel keeps a 12 x 32 tile of C in registers: per k, two loads of B
 * (32 floats), 12 broadcasts of A and 24 FMAs. A's panel (12 x KC, 18 KB) stays in
 * L1 across the N block, B's block (KC x NC, 480 KB) in L2 across the M block.
 * Ragged edges: panels are zero-padded, kernels of 8 or 4 rows and of 16 columns
 * cut the wasted work, and C is written through masks.
 *
 * Each C value is alpha times its k products summed in order (in blocks of KC), plus
 * beta times C: the same bits whichever thread runs the call, and no dependence on
 * the buffers' alignment. Compiled with target attributes (no -mavx512f for the
 * file); callers check fnn_sgemm_supported() once. */
#include <float.h>
#include <stdlib.h>

#include "fastnn_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)

#include <immintrin.h>
#include <pthread.h>

#define MR 12               /* rows of a C tile (broadcast from A) */
#define NR 32               /* columns of a C tile (two zmm of B) */
#define KC 384              /* depth of a packed block */
#define MC 516              /* rows of A packed at once (43 panels) */
#define NC 320              /* columns of B packed at once (10 panels) */

#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#define INLINE static inline __attribute__((always_inline))

int fnn_sgemm_direct_a = 1;           /* 0: pack every A (tests) */

int fnn_sgemm_supported(void)
{
    __builtin_cpu_init();
    return fnn_cpu_cap >= FNN_CPU_AVX512 && __builtin_cpu_supports("avx512f")
           && __builtin_cpu_supports("avx512vl");
}

static __mmask16 lanes(int count)           /* mask of the first count (<= 16) lanes */
{
    return count >= 16 ? (__mmask16)0xffff : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}

/* C tile (mv <= rows, nv <= 16 * vecs) = alpha * A panel @ B panel + (first ? beta * C
 * : C), or + bias instead of beta * C where ep->bias (ep: the epilogue, moved to this
 * tile's corner, or NULL); after the last block of K, ep's mask and ReLU. bp: kc x NR
 * from the packing below; A: with lda 0, ap is a packed panel kc x MR (k-major); else
 * ap is A itself, row-major with rows lda apart (rows from mv on read row 0 again,
 * their results unused). */
TARGET INLINE void tile(const int rows, const int vecs, int kc, const float *restrict ap,
                        ptrdiff_t lda, const float *restrict bp, float *c, ptrdiff_t ldc, int mv, int nv,
                        float alpha, float beta, int first, int last, const fnn_epilogue *ep)
{
    __m512 acc[MR][2];
    const float *ar[MR];
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) {
        acc[i][0] = _mm512_setzero_ps();
        acc[i][1] = _mm512_setzero_ps();
        ar[i] = ap + (i < mv ? i : 0) * lda;
    }
    if (lda == 0) {
        for (int p = 0; p < kc; p++, ap += MR, bp += NR) {
            __m512 b0 = _mm512_load_ps(bp);
            __m512 b1 = vecs > 1 ? _mm512_load_ps(bp + 16) : b0;
#pragma GCC unroll 12
            for (int i = 0; i < rows; i++) {
                __m512 a = _mm512_set1_ps(ap[i]);
                acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
                if (vecs > 1)
                    acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
            }
        }
    } else {
        for (int p = 0; p < kc; p++, bp += NR) {
            __m512 b0 = _mm512_load_ps(bp);
            __m512 b1 = vecs > 1 ? _mm512_load_ps(bp + 16) : b0;
#pragma GCC unroll 12
            for (int i = 0; i < rows; i++) {
                __m512 a = _mm512_set1_ps(ar[i][p]);
                acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
                if (vecs > 1)
                    acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
            }
        }
    }
    __mmask16 m0 = lanes(nv), m1 = lanes(nv - 16);
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(first ? beta : 1.0f);
    const __m512 zero = _mm512_setzero_ps();
    /* bias + product rounds as bias (the pre-broadcast C) + product did with beta 1 */
    const int add_bias = first && ep && ep->bias;
    __m512 bias0 = add_bias ? _mm512_maskz_loadu_ps(m0, ep->bias) : zero;
    __m512 bias1 = add_bias && vecs > 1 ? _mm512_maskz_loadu_ps(m1, ep->bias + 16) : zero;
    int read_c = !add_bias && (!first || beta != 0);   /* beta = 0: C is not read (may hold NaN) */
    const float *mask = last && ep ? ep->mask : NULL;
    float *relu = last && ep ? ep->relu : NULL;
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) {
        if (i >= mv)
            break;
        float *ci = c + i * ldc;
        __m512 r0 = _mm512_mul_ps(acc[i][0], va), r1 = _mm512_mul_ps(acc[i][1], va);
        if (add_bias) {
            r0 = _mm512_add_ps(bias0, r0);
            r1 = _mm512_add_ps(bias1, r1);
        } else if (read_c) {
            r0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, ci), r0);
            if (vecs > 1)
                r1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, ci + 16), r1);
        }
        if (mask) {         /* ReLU's backward: 0 where its output is not > 0 (or NaN) */
            const float *mi = mask + i * ldc;
            r0 = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(m0, _mm512_maskz_loadu_ps(m0, mi),
                                                             zero, _CMP_GT_OQ), r0);
            if (vecs > 1)
                r1 = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(
                    m1, _mm512_maskz_loadu_ps(m1, mi + 16), zero, _CMP_GT_OQ), r1);
        }
        _mm512_mask_storeu_ps(ci, m0, r0);
        if (vecs > 1)
            _mm512_mask_storeu_ps(ci + 16, m1, r1);
        if (relu) {         /* max(0, r) keeps NaN and -0.0, as x < 0 ? 0 : x */
            _mm512_mask_storeu_ps(relu + i * ldc, m0, _mm512_max_ps(zero, r0));
            if (vecs > 1)
                _mm512_mask_storeu_ps(relu + i * ldc + 16, m1, _mm512_max_ps(zero, r1));
        }
    }
}

#define TILE(R, V)                                                                     \
    TARGET static void tile_##R##_##V(int kc, const float *ap, ptrdiff_t lda, const float *bp, \
                                      float *c, ptrdiff_t ldc, int mv, int nv, float alpha,    \
                                      float beta, int first, int last,                    \
                                      const fnn_epilogue *ep)                             \
    {                                                                                     \
        tile(R, V, kc, ap, lda, bp, c, ldc, mv, nv, alpha, beta, first, last, ep);        \
    }
TILE(12, 2) TILE(8, 2) TILE(4, 2) TILE(12, 1) TILE(8, 1) TILE(4, 1)

typedef void (*tile_fn)(int, const float *, ptrdiff_t, const float *, float *, ptrdiff_t, int, int,
                        float, float, int, int, const fnn_epilogue *);
/* the smallest kernel that covers an mv x nv tile: [nv > 16][rows 4, 8, 12] */
static const tile_fn tiles[2][3] = {{tile_4_1, tile_8_1, tile_12_1},
                                    {tile_4_2, tile_8_2, tile_12_2}};

/* dst[p * width + r] = src[r * lds + p] for r < rows (<= width), p < kc; zero for
 * rows..width-1. In 8 x 8 blocks transposed in registers. */
TARGET static void pack_transposed(const float *src, ptrdiff_t lds, int rows, int kc, int width,
                                   float *dst)
{
    for (int r = 0; r < width; r += 8) {
        int rv = rows - r < 0 ? 0 : rows - r > 8 ? 8 : rows - r;   /* rows to read */
        int wv = width - r < 8 ? width - r : 8;                    /* lanes to write */
        __mmask8 store = (__mmask8)((1u << wv) - 1);
        const float *s[8];
        for (int q = 0; q < 8; q++)
            s[q] = src + (ptrdiff_t)(r + (q < rv ? q : 0)) * lds;
        int p = 0;
        for (; p + 8 <= kc; p += 8) {
#define ROW(q) (q < rv ? _mm256_loadu_ps(s[q] + p) : _mm256_setzero_ps())
            __m256 r0 = ROW(0), r1 = ROW(1), r2 = ROW(2), r3 = ROW(3);
            __m256 r4 = ROW(4), r5 = ROW(5), r6 = ROW(6), r7 = ROW(7);
#undef ROW
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *d = dst + (ptrdiff_t)p * width + r;
            _mm256_mask_storeu_ps(d, store, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_mask_storeu_ps(d + width, store, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_mask_storeu_ps(d + 2 * width, store, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_mask_storeu_ps(d + 3 * width, store, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_mask_storeu_ps(d + 4 * width, store, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_mask_storeu_ps(d + 5 * width, store, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_mask_storeu_ps(d + 6 * width, store, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_mask_storeu_ps(d + 7 * width, store, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        for (; p < kc; p++)
            for (int q = 0; q < wv; q++)
                dst[(ptrdiff_t)p * width + r + q] = q < rv ? s[q][p] : 0.0f;
    }
}

/* dst[p * width + j] = src[p * lds + j] for j < cols (<= width), zero beyond;
 * width is MR or NR. */
TARGET static void pack_rows(const float *src, ptrdiff_t lds, int cols, int kc, int width,
                             float *dst)
{
    __mmask16 m0 = lanes(cols), m1 = lanes(cols - 16);
    if (width == NR) {
        for (int p = 0; p < kc; p++, src += lds, dst += NR) {
            _mm512_store_ps(dst, _mm512_maskz_loadu_ps(m0, src));
            _mm512_store_ps(dst + 16, _mm512_maskz_loadu_ps(m1, src + 16));
        }
    } else {
        __mmask16 row = lanes(MR);
        for (int p = 0; p < kc; p++, src += lds, dst += MR)
            _mm512_mask_storeu_ps(dst, row, _mm512_maskz_loadu_ps(m0 & row, src));
    }
}

/* panels of MR rows of op(A)[i0:i0+mc, p0:p0+kc], each kc x MR */
TARGET static void pack_a(int trans, const float *a, ptrdiff_t lda, int i0, int mc, int p0, int kc,
                          float *ap)
{
    for (int ir = 0; ir < mc; ir += MR, ap += (ptrdiff_t)kc * MR) {
        int mv = mc - ir < MR ? mc - ir : MR;
        if (trans)              /* op(A)[i, p] = a[p, i]: rows of a are k-major already */
            pack_rows(a + (ptrdiff_t)p0 * lda + i0 + ir, lda, mv, kc, MR, ap);
        else
            pack_transposed(a + (ptrdiff_t)(i0 + ir) * lda + p0, lda, mv, kc, MR, ap);
    }
}

/* panels of NR columns of op(B)[p0:p0+kc, j0:j0+nc], each kc x NR */
TARGET static void pack_b(int trans, const float *b, ptrdiff_t ldb, int j0, int nc, int p0, int kc,
                          float *bp)
{
    for (int jr = 0; jr < nc; jr += NR, bp += (ptrdiff_t)kc * NR) {
        int nv = nc - jr < NR ? nc - jr : NR;
        if (trans)              /* op(B)[p, j] = b[j, p] */
            pack_transposed(b + (ptrdiff_t)(j0 + jr) * ldb + p0, ldb, nv, kc, NR, bp);
        else
            pack_rows(b + (ptrdiff_t)p0 * ldb + j0 + jr, ldb, nv, kc, NR, bp);
    }
}

/* Packing buffers, one pair per thread (freed when the thread exits). */
#define A_FLOATS ((ptrdiff_t)(MC + MR - 1) / MR * MR * KC)
#define B_FLOATS ((ptrdiff_t)(NC + NR - 1) / NR * NR * KC)
static pthread_key_t buffer_key;
static pthread_once_t buffer_once = PTHREAD_ONCE_INIT;
static int buffer_key_made;

static void make_buffer_key(void)
{
    buffer_key_made = pthread_key_create(&buffer_key, free) == 0;
}

static float *thread_buffer(void)      /* NULL when it cannot be had: BLAS runs then */
{
    pthread_once(&buffer_once, make_buffer_key);
    if (!buffer_key_made)
        return NULL;
    float *buffer = pthread_getspecific(buffer_key);
    if (buffer == NULL) {
        buffer = aligned_alloc(64, sizeof(float) * (A_FLOATS + B_FLOATS));
        if (buffer != NULL && pthread_setspecific(buffer_key, buffer) != 0) {
            free(buffer);
            buffer = NULL;
        }
    }
    return buffer;
}

/* extent split into equal blocks of at most `most`, rounded up to `unit` */
static int block_size(int extent, int most, int unit)
{
    int blocks = (extent + most - 1) / most;
    int size = (extent + blocks - 1) / blocks;
    size = (size + unit - 1) / unit * unit;
    return size < most ? size : most;
}

TARGET int fnn_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha,
                     const float *a, int lda, const float *b, int ldb, float beta,
                     float *c, int ldc)
{
    return fnn_sgemm_ex(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, NULL);
}

/* the epilogue of the tile at row i, column j */
static fnn_epilogue moved(const fnn_epilogue *ep, ptrdiff_t i, ptrdiff_t j, ptrdiff_t ldc)
{
    fnn_epilogue at = {NULL, NULL, NULL};
    if (ep) {
        at.bias = ep->bias ? ep->bias + j : NULL;
        at.mask = ep->mask ? ep->mask + i * ldc + j : NULL;
        at.relu = ep->relu ? ep->relu + i * ldc + j : NULL;
    }
    return at;
}

TARGET int fnn_sgemm_ex(int trans_a, int trans_b, int m, int n, int k, float alpha,
                        const float *a, int lda, const float *b, int ldb, float beta,
                        float *c, int ldc, const fnn_epilogue *ep)
{
    if (m <= 0 || n <= 0)
        return 0;
    if (k <= 0 || alpha == 0) {            /* C = beta * C, as BLAS (0 * NaN products skipped) */
        if (ep)
            return -1;                     /* the caller's passes do the epilogue's work */
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                c[(ptrdiff_t)i * ldc + j] = beta == 0 ? 0.0f : beta * c[(ptrdiff_t)i * ldc + j];
        return 0;
    }
    float *ap = thread_buffer();
    if (ap == NULL)
        return -1;
    float *bp = ap + A_FLOATS;
    int kb = block_size(k, KC, 8), mb = block_size(m, MC, MR), nb = block_size(n, NC, NR);
    /* A read in place (no packing) unless transposed or its rows are a multiple of 4 KB
     * apart, where the 12 rows of a tile fall on the same L1 sets: one thread, m x n x k,
     * GFLOP/s in place / packed: 128x128x(256, 512, 768, 1000, 1536) 1.03-1.04x, W2's
     * 128x256x784 1.00x, Winograd's 256x64x64 1.07-1.09x; 128x128x1024 and x2048 0.70x. */
    int direct = !trans_a && lda % 1024 != 0 && fnn_sgemm_direct_a;
    for (int p0 = 0; p0 < k; p0 += kb) {
        int kc = k - p0 < kb ? k - p0 : kb;
        for (int i0 = 0; i0 < m; i0 += mb) {
            int mc = m - i0 < mb ? m - i0 : mb;
            if (!direct)
                pack_a(trans_a, a, lda, i0, mc, p0, kc, ap);
            for (int j0 = 0; j0 < n; j0 += nb) {
                int nc = n - j0 < nb ? n - j0 : nb;
                pack_b(trans_b, b, ldb, j0, nc, p0, kc, bp);
                for (int ir = 0; ir < mc; ir += MR)
                    for (int jr = 0; jr < nc; jr += NR) {
                        int mv = mc - ir < MR ? mc - ir : MR, nv = nc - jr < NR ? nc - jr : NR;
                        fnn_epilogue at = moved(ep, i0 + ir, j0 + jr, ldc);
                        tiles[nv > 16][(mv > 4) + (mv > 8)](
                            kc, direct ? a + (ptrdiff_t)(i0 + ir) * lda + p0 : ap + (ptrdiff_t)ir * kc,
                            direct ? lda : 0, bp + (ptrdiff_t)jr * kc,
                            c + (ptrdiff_t)(i0 + ir) * ldc + j0 + jr, ldc, mv, nv, alpha, beta,
                            p0 == 0, p0 + kc == k, ep ? &at : NULL);
                    }
            }
        }
    }
    return 0;
}

/* v with the lanes below FLT_MIN in magnitude set to 0 (NaN lanes kept). */
TARGET static inline __m512 flushed(__m512 v)
{
    __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(FLT_MIN), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(v, tiny, _mm512_setzero_ps());
}

/* SGD with momentum on float32 (the common case of _sgd_step in _cpu.pyx), 16 lanes at
 * a time: buf = momentum * buf + g, flushed to 0 below FLT_MIN in magnitude (as
 * _flushed in optim.pxi: no subnormal momentum); p = p - lr * buf, each operation
 * rounded as the scalar loop rounds it: the same bits, so no multiply-add may be fused
 * (GCC would fuse these intrinsics; clang does not fuse across them). */
#ifndef __clang__
__attribute__((optimize("fp-contract=off")))
#endif
TARGET void fnn_sgd_momentum_f(float *p, const float *g, float *buf, ptrdiff_t n, float lr,
                               float momentum)
{
    const __m512 vm = _mm512_set1_ps(momentum), vl = _mm512_set1_ps(lr);
    ptrdiff_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512 v = flushed(_mm512_add_ps(_mm512_mul_ps(vm, _mm512_loadu_ps(buf + k)),
                                         _mm512_loadu_ps(g + k)));
        _mm512_storeu_ps(buf + k, v);
        _mm512_storeu_ps(p + k, _mm512_sub_ps(_mm512_loadu_ps(p + k), _mm512_mul_ps(vl, v)));
    }
    if (k < n) {
        __mmask16 m = lanes((int)(n - k));
        __m512 v = flushed(_mm512_add_ps(_mm512_mul_ps(vm, _mm512_maskz_loadu_ps(m, buf + k)),
                                         _mm512_maskz_loadu_ps(m, g + k)));
        _mm512_mask_storeu_ps(buf + k, m, v);
        _mm512_mask_storeu_ps(p + k, m, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + k),
                                                      _mm512_mul_ps(vl, v)));
    }
}

#else   /* not GCC/clang on x86-64: BLAS runs every GEMM */

int fnn_sgemm_supported(void) { return 0; }

int fnn_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
              int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
    (void)trans_a; (void)trans_b; (void)m; (void)n; (void)k; (void)alpha; (void)a;
    (void)lda; (void)b; (void)ldb; (void)beta; (void)c; (void)ldc;
    return -1;
}

int fnn_sgemm_ex(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc,
                 const fnn_epilogue *ep)
{
    (void)ep;
    return fnn_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void fnn_sgd_momentum_f(float *p, const float *g, float *buf, ptrdiff_t n, float lr, float momentum)
{
    (void)p; (void)g; (void)buf; (void)n; (void)lr; (void)momentum;
}

#endif
