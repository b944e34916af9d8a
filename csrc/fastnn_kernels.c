/* fastnn compiled CPU kernels: instantiates kernels_template.h for float and double. */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastnn_kernels.h"

int fnn_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int fnn_thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#if defined(__GNUC__) || defined(__clang__)
#define FETCH_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#define SUB_FETCH(p, v) __atomic_sub_fetch((p), (v), __ATOMIC_SEQ_CST)
#else   /* no atomics: concurrent Python threads may restore the count early (speed only) */
static int fetch_add(int *p, int v) { int old = *p; *p += v; return old; }
#define FETCH_ADD(p, v) fetch_add((p), (v))
#define SUB_FETCH(p, v) (*(p) -= (v))
#endif

static fnn_set_threads_fn blas_set_threads = NULL;
static fnn_get_threads_fn blas_get_threads = NULL;
static int blas_users = 0;       /* callers inside a begin/end pair */
static int blas_saved = 1;       /* BLAS thread count to restore */

void fnn_blas_register(fnn_set_threads_fn set_threads, fnn_get_threads_fn get_threads)
{
    blas_set_threads = set_threads;
    blas_get_threads = get_threads;
}

int fnn_blas_single_begin(void)
{
    if (!blas_set_threads) return 0;
    if (FETCH_ADD(&blas_users, 1) == 0) {
        blas_saved = blas_get_threads();
        if (blas_saved != 1) blas_set_threads(1);
    }
    return 1;
}

void fnn_blas_single_end(void)
{
    if (!blas_set_threads) return;
    if (SUB_FETCH(&blas_users, 1) == 0 && blas_saved != 1)
        blas_set_threads(blas_saved);
}

/* exp(x) in float without branches or library calls, so softmax loops vectorize
 * (a libm expf call per element made the fused kernel slower than NumPy's SIMD exp).
 * Cephes' expf: x = n*ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial (about 1
 * ulp), 2^n built in the exponent bits; 0 below -87.3 (where expf is subnormal). */
static inline float fnn_expf(float x)
{
    const float shift = 12582912.0f;                   /* 1.5 * 2^23: round to nearest */
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    const float n = (xc * 1.44269504088896341f + shift) - shift;
    const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;   /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float e = p * scale;
    return x < -87.3f ? 0.0f : e;
}

#if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
/* out[i*ldo + j] = a[j*lda + i] (+ bias[i]) for a 4x4 block: 4 loads, 4 stores. */
static inline void transpose_block4_f(const float *a, ptrdiff_t lda, float *out, ptrdiff_t ldo,
                                      const float *bias)
{
    __m128 r0 = _mm_loadu_ps(a), r1 = _mm_loadu_ps(a + lda);
    __m128 r2 = _mm_loadu_ps(a + 2 * lda), r3 = _mm_loadu_ps(a + 3 * lda);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    if (bias) {
        r0 = _mm_add_ps(r0, _mm_set1_ps(bias[0]));
        r1 = _mm_add_ps(r1, _mm_set1_ps(bias[1]));
        r2 = _mm_add_ps(r2, _mm_set1_ps(bias[2]));
        r3 = _mm_add_ps(r3, _mm_set1_ps(bias[3]));
    }
    _mm_storeu_ps(out, r0);
    _mm_storeu_ps(out + ldo, r1);
    _mm_storeu_ps(out + 2 * ldo, r2);
    _mm_storeu_ps(out + 3 * ldo, r3);
}
#define TRANSPOSE_BLOCK4 transpose_block4_f

#include <emmintrin.h>
/* One output row of a 2x2 stride-2 max pool, 4 outputs at a time (SSE2): the top and
 * bottom input rows top[0..2*ow), top[w..w+2*ow), split into even and odd columns;
 * the same comparisons as the scalar loop (beats(): strictly greater, or a first
 * NaN), argmax as int32 lanes (the caller checks h*w fits) widened to int64.
 * `at` is the plane index of top[0]. A ragged end is one more block overlapping the
 * one before it (the same values again). Below 4 outputs (planes at most 7 wide) the
 * two rows are copied into a block of zeros first, the outputs past ow dropped.
 * Returns the outputs done: ow.
 * LeNet's first pool (64x6 planes of 28x28, one thread): 190 -> ~45 us. */
static inline __m128 maxpool_beats_f(__m128 v, __m128 best)
{
    return _mm_or_ps(_mm_cmpgt_ps(v, best),
                     _mm_and_ps(_mm_cmpunord_ps(v, v), _mm_cmpord_ps(best, best)));
}

static ptrdiff_t maxpool2x2_row_f(const float *top, ptrdiff_t w, ptrdiff_t ow, ptrdiff_t at, float *y,
                             int64_t *argmax)
{
    const float *bot = top + w;
    const __m128i zero = _mm_setzero_si128();
    const __m128i one = _mm_set1_epi32(1), down = _mm_set1_epi32((int)w);
    __m128i base = _mm_add_epi32(_mm_set1_epi32((int)at), _mm_setr_epi32(0, 2, 4, 6));
    const __m128i step = _mm_set1_epi32(8);
    if (ow < 4) {
        float rows[16] = {0}, y4[4];
        int64_t at4[4];
        memcpy(rows, top, (size_t)(2 * ow) * sizeof(float));
        memcpy(rows + 8, bot, (size_t)(2 * ow) * sizeof(float));
        maxpool2x2_row_f(rows, 8, 4, 0, y4, at4);
        for (ptrdiff_t q = 0; q < ow; q++) {
            y[q] = y4[q];
            argmax[q] = at + (at4[q] >= 8 ? w + at4[q] - 8 : at4[q]);
        }
        return ow;
    }
    for (ptrdiff_t q = 0;; q += 4, base = _mm_add_epi32(base, step)) {
        if (q + 4 > ow) {          /* a last block overlapping the previous one */
            base = _mm_add_epi32(base, _mm_set1_epi32((int)(2 * (ow - 4 - q))));
            q = ow - 4;
        }
        const __m128 t0 = _mm_loadu_ps(top + 2 * q), t1 = _mm_loadu_ps(top + 2 * q + 4);
        const __m128 b0 = _mm_loadu_ps(bot + 2 * q), b1 = _mm_loadu_ps(bot + 2 * q + 4);
        const __m128 a = _mm_shuffle_ps(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));
        const __m128 b = _mm_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));
        const __m128 c = _mm_shuffle_ps(b0, b1, _MM_SHUFFLE(2, 0, 2, 0));
        const __m128 d = _mm_shuffle_ps(b0, b1, _MM_SHUFFLE(3, 1, 3, 1));
        __m128 take = maxpool_beats_f(b, a);
        __m128 best = _mm_or_ps(_mm_and_ps(take, b), _mm_andnot_ps(take, a));
        __m128i where = _mm_add_epi32(base, _mm_and_si128(_mm_castps_si128(take), one));
        __m128i mask;
        take = maxpool_beats_f(c, best);
        best = _mm_or_ps(_mm_and_ps(take, c), _mm_andnot_ps(take, best));
        mask = _mm_castps_si128(take);
        where = _mm_or_si128(_mm_and_si128(mask, _mm_add_epi32(base, down)),
                             _mm_andnot_si128(mask, where));
        take = maxpool_beats_f(d, best);
        best = _mm_or_ps(_mm_and_ps(take, d), _mm_andnot_ps(take, best));
        mask = _mm_castps_si128(take);
        where = _mm_or_si128(_mm_and_si128(mask, _mm_add_epi32(base, _mm_add_epi32(down, one))),
                             _mm_andnot_si128(mask, where));
        _mm_storeu_ps(y + q, best);
        _mm_storeu_si128((__m128i *)(argmax + q), _mm_unpacklo_epi32(where, zero));
        _mm_storeu_si128((__m128i *)(argmax + q + 2), _mm_unpackhi_epi32(where, zero));
        if (q + 4 == ow) return ow;
    }
}
#define MAXPOOL2X2_ROW maxpool2x2_row_f

/* One output row of the max pool backward's 2x2 cells (kernels_template.h,
 * maxpool2d_backward_cells), 4 outputs at a time (SSE2): argmax's low 32 bits less
 * the cells' top-left indices (its high bits must be 0) against the four corners
 * 0, 1, w, w + 1; grad_y + 0 masked into each corner, interleaved into the two rows.
 * `at` is the plane index of top[0]. Returns the outputs done (a multiple of 4), or
 * -1 where an entry lies outside its cell. (128, 12, 28, 28) float32 on one thread,
 * this 2-vCPU Intel Xeon (AVX-512) KVM guest: the scalar loop 4x slower. */
static ptrdiff_t maxpool2x2_cells_row_f(const float *gy, const int64_t *ap, ptrdiff_t ow,
                                        ptrdiff_t w, ptrdiff_t at, float *top)
{
    float *bot = top + w;
    const __m128 zero = _mm_setzero_ps();
    const __m128i one = _mm_set1_epi32(1), down = _mm_set1_epi32((int)w);
    const __m128i down1 = _mm_set1_epi32((int)w + 1), step = _mm_set1_epi32(8);
    __m128i base = _mm_add_epi32(_mm_set1_epi32((int)at), _mm_setr_epi32(0, 2, 4, 6));
    ptrdiff_t q = 0;
    for (; q + 4 <= ow; q += 4, base = _mm_add_epi32(base, step)) {
        const __m128 a0 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)(ap + q)));
        const __m128 a1 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)(ap + q + 2)));
        const __m128i lo = _mm_castps_si128(_mm_shuffle_ps(a0, a1, _MM_SHUFFLE(2, 0, 2, 0)));
        const __m128i hi = _mm_castps_si128(_mm_shuffle_ps(a0, a1, _MM_SHUFFLE(3, 1, 3, 1)));
        const __m128i d = _mm_sub_epi32(lo, base);
        const __m128 m0 = _mm_castsi128_ps(_mm_cmpeq_epi32(d, _mm_setzero_si128()));
        const __m128 m1 = _mm_castsi128_ps(_mm_cmpeq_epi32(d, one));
        const __m128 m2 = _mm_castsi128_ps(_mm_cmpeq_epi32(d, down));
        const __m128 m3 = _mm_castsi128_ps(_mm_cmpeq_epi32(d, down1));
        const __m128 in = _mm_and_ps(_mm_or_ps(_mm_or_ps(m0, m1), _mm_or_ps(m2, m3)),
                                     _mm_castsi128_ps(_mm_cmpeq_epi32(hi, _mm_setzero_si128())));
        if (_mm_movemask_ps(in) != 15) return -1;
        const __m128 g = _mm_add_ps(_mm_loadu_ps(gy + q), zero);     /* -0.0 -> 0.0 */
        const __m128 v0 = _mm_and_ps(g, m0), v1 = _mm_and_ps(g, m1);
        const __m128 v2 = _mm_and_ps(g, m2), v3 = _mm_and_ps(g, m3);
        _mm_storeu_ps(top + 2 * q, _mm_unpacklo_ps(v0, v1));
        _mm_storeu_ps(top + 2 * q + 4, _mm_unpackhi_ps(v0, v1));
        _mm_storeu_ps(bot + 2 * q, _mm_unpacklo_ps(v2, v3));
        _mm_storeu_ps(bot + 2 * q + 4, _mm_unpackhi_ps(v2, v3));
    }
    return q;
}
#define MAXPOOL2X2_CELLS_ROW maxpool2x2_cells_row_f
#endif

int fnn_cpu_cap = FNN_CPU_AVX512;    /* no cap (see fastnn_kernels.h) */

/* WIDE_CLONES: an AVX-512 (x86-64-v4) clone of a loop beside the baseline one, picked
 * at load time by the CPU (GCC's target_clones: ifunc, so glibc); no fused
 * multiply-adds in either (fp-contract=off), so both give the same bits. For the
 * BatchNorm passes: their double sums in 8 lanes are one AVX-512 register, against four
 * SSE2 ones. The MNIST recipe's (128, 12, 14, 14) float32 BatchNorm, this 2-vCPU Intel
 * Xeon KVM guest (load 2.7, interleaved medians): forward 311 -> 300 us, backward 305
 * -> 282 us; what is left is bound by memory (6 MB moved forward). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define WIDE_CLONES __attribute__((target_clones("arch=x86-64-v4", "default"), \
                                   optimize("fp-contract=off")))
#else
#define WIDE_CLONES
#endif

/* float32 softmax rows, finiteness checks and dropout masks in AVX-512 lanes where the
 * CPU has them (avx512.c); fnn_avx512_rows = 0 runs the portable loops (tests) */
int fnn_avx512_rows = 1;
static int avx512_ok(void)
{
    static int supported = -1;     /* a benign race: every thread stores the same value */
    if (supported < 0)
        supported = fnn_avx512_supported();
    return supported && fnn_avx512_rows;
}
#define AVX512_OK avx512_ok
static int avx512dq_ok(void)
{
    static int supported = -1;     /* a benign race, as above */
    if (supported < 0)
        supported = fnn_avx512dq_supported();
    return supported && fnn_avx512_rows;
}
#define AVX512DQ_OK avx512dq_ok
#define SOFTMAX_ROW fnn_softmax_row_f
#define ALL_FINITE_AVX512 fnn_all_finite_avx512_f

#define T float
#define UINT uint32_t
#define S f
#define EXP fnn_expf
#define DROPOUT_AVX512 fnn_dropout_avx512_f
#include "kernels_template.h"
#include "winograd_template.h"
#undef T
#undef UINT
#undef S
#undef EXP
#undef SOFTMAX_ROW
#undef ALL_FINITE_AVX512
#undef DROPOUT_AVX512
#define DROPOUT_AVX512 fnn_dropout_avx512_d

#undef TRANSPOSE_BLOCK4
#undef MAXPOOL2X2_ROW
#undef MAXPOOL2X2_CELLS_ROW
#define T double
#define UINT uint64_t
#define S d
#define EXP exp
#include "kernels_template.h"
#include "winograd_template.h"
#undef T
#undef UINT
#undef S
#undef EXP
