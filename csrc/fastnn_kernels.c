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

#define T float
#define S f
#define EXP expf
#include "kernels_template.h"
#undef T
#undef S
#undef EXP

#define T double
#define S d
#define EXP exp
#include "kernels_template.h"
#undef T
#undef S
#undef EXP
