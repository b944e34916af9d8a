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
static inline void transpose_block4_f(const float *a, long lda, float *out, long ldo,
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
#endif

#define T float
#define UINT uint32_t
#define S f
#define EXP fnn_expf
#include "kernels_template.h"
#include "winograd_template.h"
#undef T
#undef UINT
#undef S
#undef EXP

#undef TRANSPOSE_BLOCK4
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
