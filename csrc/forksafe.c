/* OpenMP after fork (fastnn_kernels.h, FNN_OMP). GCC's libgomp keeps its idle
 * team's threads in a pool; a child made by fork() has only the forking thread
 * but the same pool bookkeeping, and its first parallel region waits forever for
 * the threads that were not copied. So a child handler of pthread_atfork sets
 * fnn_forked_child, and every OpenMP region of the kernels (their `if` clauses
 * go through FNN_OMP) runs on the calling thread in that child and in its own
 * children. A one-thread region never touches the pool, so it runs there. The
 * worker pool (pool.c) restarts its own threads after a fork, unaffected. */
#include "fastnn_kernels.h"

#if defined(_WIN32)
void fnn_fork_guard_install(void) {}     /* no fork() */
#else
#include <pthread.h>

static pthread_once_t installed = PTHREAD_ONCE_INIT;

static void after_fork_child(void)
{
    fnn_forked_child = 1;
}

static void install(void)
{
    pthread_atfork(NULL, NULL, after_fork_child);
}

void fnn_fork_guard_install(void)
{
    pthread_once(&installed, install);
}
#endif

int fnn_forked_child = 0;
