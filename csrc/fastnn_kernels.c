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
