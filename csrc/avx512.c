/* AVX-512 versions of portable kernels, for CPUs that have it (chosen at run time:
 * fnn_avx512_supported(); compiled with target attributes, no -mavx512f for the
 * file). The portable build is SSE2, where these loops are bound by instructions, not
 * by memory:
 *
 * - fnn_softmax_row_f, one row of fnn_softmax_xent_f: the portable loop spends about
 *   70 ns on a row of 10 classes (four-lane vectors and their remainders); here one
 *   masked vector holds a row of up to 16 classes. W2's 128 x 10 logits with their
 *   classes, one thread: 8.4-9.5 -> 4.2-4.4 us. The same formulas as the portable row
 *   (kernels_template.h), exp by the same Cephes polynomial (fnn_expf in
 *   fastnn_kernels.c); the sums run in another order, so the bits may differ from the
 *   portable loop's, but every caller (the layers and the compiled training step) runs
 *   this one on a given CPU.
 * - fnn_all_finite_avx512_f: fnn_all_finite_f 16 lanes at a time (the same test).
 * - fnn_dropout_avx512_f/_d: fnn_dropout_forward's counter-based mask 8 lanes at a
 *   time (64-bit multiplies: AVX-512DQ), the same bits; the portable loop spends
 *   about 5 cycles an element on its three scalar multiplies.
 */
#include <math.h>
#include <stdint.h>

#include "fastnn_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)

#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,fma")))

int fnn_avx512_supported(void)
{
    __builtin_cpu_init();
    return fnn_cpu_cap >= FNN_CPU_AVX512 && __builtin_cpu_supports("avx512f");
}

#define TARGET_DQ __attribute__((target("avx512f,avx512dq,avx512vl")))

int fnn_avx512dq_supported(void)
{
    __builtin_cpu_init();
    return fnn_cpu_cap >= FNN_CPU_AVX512 && __builtin_cpu_supports("avx512f")
           && __builtin_cpu_supports("avx512dq")
           && __builtin_cpu_supports("avx512vl");
}

static __mmask16 lanes(ptrdiff_t count)          /* mask of the first count (<= 16) lanes */
{
    return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
}

/* e^x lane by lane: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' polynomial, times
 * 2^n (scalef); 0 below -87.3 as fnn_expf. NaN stays NaN (min/max return their
 * second operand when either is NaN). */
TARGET static inline __m512 exp_lanes(__m512 x)
{
    __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    __m512 e = _mm512_scalef_ps(p, n);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(e, tiny, _mm512_setzero_ps());
}

/* the 16 lanes of a as doubles, summed into s (two 8-lane halves) */
TARGET static inline __m512d add_wide(__m512d s, __m512 a)
{
    s = _mm512_add_pd(s, _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
    return _mm512_add_pd(s, _mm512_cvtps_pd(_mm256_castpd_ps(
                                _mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
}

/* t * ((d = z - top) - log_total) in double, summed into s lane by lane */
TARGET static inline __m512d add_terms(__m512d s, __m512 t, __m512 d, __m512d log_total)
{
    const __m256 t_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1));
    const __m256 d_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1));
    s = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(t)),
                        _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(d)), log_total), s);
    return _mm512_fmadd_pd(_mm512_cvtps_pd(t_hi),
                           _mm512_sub_pd(_mm512_cvtps_pd(d_hi), log_total), s);
}

/* The gradient of lanes [j, j + 16) from their exp e: (e / total - target) / n, the
 * target one-hot at `label` (t NULL) or t's; stored to g + j under mask m. */
TARGET static inline void store_grad(float *g, ptrdiff_t j, __mmask16 m, __m512 e, __m512 inv_total,
                                     __m512 inv_n, int64_t label, const float *t)
{
    __m512 r = _mm512_mul_ps(e, inv_total);
    if (t == NULL) {
        r = _mm512_mul_ps(r, inv_n);
        if (label >= j && label < j + 16)    /* in the lane, not g[label] -= (a stall) */
            r = _mm512_mask_sub_ps(r, (__mmask16)(1u << (label - j)), r, inv_n);
    } else {
        r = _mm512_mul_ps(_mm512_sub_ps(r, _mm512_maskz_loadu_ps(m, t + j)), inv_n);
    }
    _mm512_mask_storeu_ps(g + j, m, r);
}

TARGET double fnn_softmax_row_f(const float *z, ptrdiff_t c, int64_t label, const float *t,
                                float *g, float inv_n, int64_t *predicted)
{
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    const __mmask16 first = lanes(c);
    const __m512 z0 = _mm512_maskz_loadu_ps(first, z);   /* a row of <= 16 classes stays here */
    __m512 top_lanes = _mm512_mask_mov_ps(minus_inf, first, z0);
    ptrdiff_t j;
    for (j = 16; j < c; j += 16)
        top_lanes = _mm512_max_ps(_mm512_mask_loadu_ps(top_lanes, lanes(c - j), z + j), top_lanes);
    const float top = _mm512_reduce_max_ps(top_lanes);
    const __m512 vtop = _mm512_set1_ps(top);
    const __m512 e0 = _mm512_maskz_mov_ps(first, exp_lanes(_mm512_sub_ps(z0, vtop)));
    __m512d sum = add_wide(_mm512_setzero_pd(), e0);
    for (j = 16; j < c; j += 16) {      /* exps of the other lanes wait in g */
        const __mmask16 m = lanes(c - j);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_lanes(
            _mm512_sub_ps(_mm512_maskz_loadu_ps(m, z + j), vtop)));
        _mm512_mask_storeu_ps(g + j, m, e);
        sum = add_wide(sum, e);
    }
    const double total = _mm512_reduce_add_pd(sum);
    const double log_total = log(total);
    const __m512 inv_total = _mm512_set1_ps((float)(1.0 / total)), vinv_n = _mm512_set1_ps(inv_n);
    double loss;
    if (t == NULL) {
        loss = -((double)(z[label] - top) - log_total);
    } else {
        const __m512d vlog = _mm512_set1_pd(log_total);
        __m512d terms = add_terms(_mm512_setzero_pd(), _mm512_maskz_loadu_ps(first, t),
                                  _mm512_sub_ps(z0, vtop), vlog);
        for (j = 16; j < c; j += 16) {
            const __mmask16 m = lanes(c - j);
            terms = add_terms(terms, _mm512_maskz_loadu_ps(m, t + j),
                              _mm512_sub_ps(_mm512_maskz_loadu_ps(m, z + j), vtop), vlog);
        }
        loss = -_mm512_reduce_add_pd(terms);
    }
    store_grad(g, 0, first, e0, inv_total, vinv_n, label, t);
    for (j = 16; j < c; j += 16) {
        const __mmask16 m = lanes(c - j);
        store_grad(g, j, m, _mm512_maskz_loadu_ps(m, g + j), inv_total, vinv_n, label, t);
    }
    if (predicted) {            /* the first lane equal to the maximum, as numpy.argmax */
        __mmask16 hit = _mm512_mask_cmp_ps_mask(first, z0, vtop, _CMP_EQ_OQ);
        *predicted = 0;
        for (j = 16; !hit && j < c; j += 16) {
            const __mmask16 m = lanes(c - j);
            hit = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, z + j), vtop, _CMP_EQ_OQ);
        }
        if (hit)
            *predicted = (j > 16 ? j - 16 : 0) + __builtin_ctz(hit);
    }
    return loss;
}

/* 1 when none of a[0..n) is NaN or infinite: the largest magnitude (sign bit off)
 * below infinity's bits, in blocks (stops at the block with the first). */
TARGET int fnn_all_finite_avx512_f(const float *a, ptrdiff_t n)
{
    enum { BLOCK = 16384 };
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    const __m512i inf_bits = _mm512_set1_epi32(0x7f800000);
    for (ptrdiff_t start = 0; start < n; start += BLOCK) {
        const ptrdiff_t stop = n - start < BLOCK ? n : start + BLOCK;
        __m512i largest = _mm512_setzero_si512();
        ptrdiff_t i = start;
        for (; i + 16 <= stop; i += 16)
            largest = _mm512_max_epu32(largest, _mm512_and_si512(
                _mm512_loadu_si512((const void *)(a + i)), magnitude));
        if (i < stop)
            largest = _mm512_max_epu32(largest, _mm512_and_si512(
                _mm512_maskz_loadu_epi32(lanes(stop - i), a + i), magnitude));
        if (_mm512_cmpge_epu32_mask(largest, inf_bits))
            return 0;
    }
    return 1;
}

/* The dropout masks of elements first .. first + n - 1, 8 at a time: lane k keeps its
 * element (mask = scale, else +0) when the splitmix64 finaliser of seed + (index + 1) *
 * golden, shifted right by 11, is >= keep_from; y = x * mask. */
TARGET_DQ static inline __mmask8 dropout_keep(__m512i index, __m512i seed, __m512i keep_from)
{
    __m512i z = _mm512_add_epi64(seed, _mm512_mullo_epi64(
        _mm512_add_epi64(index, _mm512_set1_epi64(1)), _mm512_set1_epi64((long long)0x9E3779B97F4A7C15ull)));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                           _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ull));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                           _mm512_set1_epi64((long long)0x94D049BB133111EBull));
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
    return _mm512_cmpge_epu64_mask(_mm512_srli_epi64(z, 11), keep_from);
}

TARGET_DQ void fnn_dropout_avx512_f(const float *x, float *y, float *mask, ptrdiff_t n, ptrdiff_t first,
                                    uint64_t keep_from, float scale, uint64_t seed)
{
    const __m512i vseed = _mm512_set1_epi64((long long)seed);
    const __m512i vkeep = _mm512_set1_epi64((long long)keep_from);
    const __m256 vscale = _mm256_set1_ps(scale);
    __m512i index = _mm512_add_epi64(_mm512_set1_epi64(first),
                                     _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    for (ptrdiff_t i = 0; i < n; i += 8, index = _mm512_add_epi64(index, _mm512_set1_epi64(8))) {
        const __mmask8 in = n - i >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (n - i)) - 1);
        const __m256 m = _mm256_maskz_mov_ps(dropout_keep(index, vseed, vkeep), vscale);
        _mm256_mask_storeu_ps(mask + i, in, m);
        _mm256_mask_storeu_ps(y + i, in, _mm256_mul_ps(_mm256_maskz_loadu_ps(in, x + i), m));
    }
}

TARGET_DQ void fnn_dropout_avx512_d(const double *x, double *y, double *mask, ptrdiff_t n,
                                    ptrdiff_t first, uint64_t keep_from, double scale, uint64_t seed)
{
    const __m512i vseed = _mm512_set1_epi64((long long)seed);
    const __m512i vkeep = _mm512_set1_epi64((long long)keep_from);
    const __m512d vscale = _mm512_set1_pd(scale);
    __m512i index = _mm512_add_epi64(_mm512_set1_epi64(first),
                                     _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    for (ptrdiff_t i = 0; i < n; i += 8, index = _mm512_add_epi64(index, _mm512_set1_epi64(8))) {
        const __mmask8 in = n - i >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (n - i)) - 1);
        const __m512d m = _mm512_maskz_mov_pd(dropout_keep(index, vseed, vkeep), vscale);
        _mm512_mask_storeu_pd(mask + i, in, m);
        _mm512_mask_storeu_pd(y + i, in, _mm512_mul_pd(_mm512_maskz_loadu_pd(in, x + i), m));
    }
}

#else   /* not GCC/clang on x86-64: the portable loops run */

int fnn_avx512_supported(void) { return 0; }
int fnn_avx512dq_supported(void) { return 0; }

void fnn_dropout_avx512_f(const float *x, float *y, float *mask, ptrdiff_t n, ptrdiff_t first,
                          uint64_t keep_from, float scale, uint64_t seed)
{
    (void)x; (void)y; (void)mask; (void)n; (void)first; (void)keep_from; (void)scale;
    (void)seed;
}

void fnn_dropout_avx512_d(const double *x, double *y, double *mask, ptrdiff_t n, ptrdiff_t first,
                          uint64_t keep_from, double scale, uint64_t seed)
{
    (void)x; (void)y; (void)mask; (void)n; (void)first; (void)keep_from; (void)scale;
    (void)seed;
}

int fnn_all_finite_avx512_f(const float *a, ptrdiff_t n)
{
    (void)a; (void)n;
    return 0;
}

double fnn_softmax_row_f(const float *z, ptrdiff_t c, int64_t label, const float *t, float *g,
                         float inv_n, int64_t *predicted)
{
    (void)z; (void)c; (void)label; (void)t; (void)g; (void)inv_n; (void)predicted;
    return 0;
}

#endif
