/* fastnn's fast-wake worker pool (pthreads + C11 atomics), for work too short
 * for fastnn's OpenMP team: libgomp runs passive (backend.py), and waking a
 * sleeping OpenMP worker costs tens of microseconds, more than a batch-1 GEMV
 * takes (about 10 us). A pool worker that finishes a job spins for a bounded
 * time (fnn_pool_spin_us(), default 100 us) before it sleeps, so back-to-back jobs
 * (the layers of one predict, the GEMMs of one training step) start on it within
 * a microsecond. It calls sched_yield() while it spins: any other thread that
 * wants its core (an OpenMP or BLAS worker, another process) gets it at once,
 * which libgomp's busy spin does not allow.
 *
 * Protocol. One job at a time (callers serialize on a mutex; a caller that finds
 * it taken runs its tasks itself). A job is posted by storing its fields and then
 * `word` = generation << 32 | 0 (release). A thread claims task `idx` by a CAS of
 * `word` from (gen, idx) to (gen, idx + 1): a CAS that succeeds proves the job
 * `gen` is still running, so its fields (slot gen & 1) are the ones read. Each
 * finished task adds 1 to `done` (release); the caller returns once done == n_tasks
 * (acquire), when every task's writes are visible to it and no thread still reads
 * the job.
 * Which thread runs a task is not fixed, so tasks must write disjoint outputs
 * that depend only on their index.
 */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastnn_kernels.h"

#define POOL_MAX_WORKERS 63
#define POLLS_PER_YIELD 16
#define IDX_MASK 0xffffffffULL

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

static pthread_mutex_t callers = PTHREAD_MUTEX_INITIALIZER;     /* one job at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static _Atomic uint64_t word;               /* generation << 32 | next task index */
static _Atomic ptrdiff_t done;                   /* tasks finished in the current job */
static _Atomic int ran;                     /* workers that ran a task in the current job */
/* Job fields, in slot gen & 1: a worker that read the word of job g late may
 * read them while job g + 1 is being posted (its CAS then fails); slot g & 1 is
 * rewritten only for job g + 2, after the word has moved past g. */
static struct job {
    _Atomic(fnn_task_fn) task;
    _Atomic(void *) ctx;
    _Atomic ptrdiff_t tasks;
    _Atomic int helpers;                    /* workers with id < this may take tasks */
} jobs[2];
static _Atomic int sleepers;                /* workers waiting on `wake` */
/* Spin before sleeping. W2's MLP training (one pass of 12,800 samples, quiet
 * machine, medians of 5): 76k samples/s with 0 us, 90k with 50, 106k with 100,
 * 90-110k with 200 and 500: its split GEMMs come 100-300 us apart. W7's batch-1
 * predict posts a job every ~12 us. */
static _Atomic ptrdiff_t spin_ns = 100000;
static _Atomic int workers;                 /* started; changed only by a caller holding `callers` */
static uint32_t start_gen[POOL_MAX_WORKERS];
/* contention backoff (changed only by a caller holding `callers`): jobs posted
 * before serial_until run on the caller alone */
#define SERIAL_MIN_NS 2000000L            /* 2 ms */
#define SERIAL_MAX_NS 256000000L          /* 0.256 s */
#define STALL_NS 20000L                   /* workers later than the caller by this much */
#define MISSED_MAX 8                      /* jobs in a row that no worker took a task of */
static ptrdiff_t serial_until;
static ptrdiff_t serial_ns = SERIAL_MIN_NS;
static int missed;
static ptrdiff_t jobs_posted, jobs_helped;     /* statistics, under `callers` too */

static _Thread_local int inside;            /* a pool worker, or a caller running its job */
static _Thread_local int thread_index;      /* worker id + 1 in a worker, 0 elsewhere */

static inline uint32_t gen_of(uint64_t w) { return (uint32_t)(w >> 32); }

static ptrdiff_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (ptrdiff_t)t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Claim and run tasks of the job posted as w until none is left; returns how many
 * ran. A worker counts itself in `ran` before its first task's `done` (release). */
static ptrdiff_t run_tasks(uint64_t w, int worker)
{
    const uint32_t gen = gen_of(w);
    struct job *job = &jobs[gen & 1];
    ptrdiff_t count = 0;
    for (;;) {
        const uint64_t idx = w & IDX_MASK;
        if ((ptrdiff_t)idx >= atomic_load_explicit(&job->tasks, memory_order_relaxed))
            return count;      /* all claimed (or a newer job: its word differs, see below) */
        if (atomic_compare_exchange_weak_explicit(&word, &w, w + 1, memory_order_acquire,
                                                  memory_order_acquire)) {
            fnn_task_fn task = atomic_load_explicit(&job->task, memory_order_relaxed);
            void *ctx = atomic_load_explicit(&job->ctx, memory_order_relaxed);
            if (worker && count == 0)
                atomic_fetch_add_explicit(&ran, 1, memory_order_relaxed);
            task(ctx, (ptrdiff_t)idx);
            count++;
            atomic_fetch_add_explicit(&done, 1, memory_order_release);
            w = atomic_load_explicit(&word, memory_order_acquire);
        }
        if (gen_of(w) != gen)
            return count;      /* the job ended and another began: the caller sees it */
    }
}

/* Spin (yielding the core) until a job newer than `seen` is posted or spin_ns
 * passes, then sleep on `wake`. Returns the newer job's word. */
static uint64_t wait_for_job(uint32_t seen)
{
    uint64_t w;
    const ptrdiff_t deadline = now_ns() + atomic_load_explicit(&spin_ns, memory_order_relaxed);
    for (unsigned spins = 1;; spins++) {
        /* polls between yields: a sched_yield() takes ~0.5 us here, a job seen only
         * after one would start late on a worker */
        for (int poll = 0; poll < POLLS_PER_YIELD; poll++) {
            w = atomic_load_explicit(&word, memory_order_acquire);
            if (gen_of(w) != seen)
                return w;
            CPU_RELAX();
        }
        sched_yield();
        if (spins % 8 == 0 && now_ns() > deadline)
            break;
    }
    pthread_mutex_lock(&sleep_lock);
    /* seq_cst pairs with the poster's store of word and load of sleepers: either it
     * sees this sleeper and broadcasts, or this load sees its job */
    atomic_fetch_add(&sleepers, 1);
    while (gen_of(w = atomic_load(&word)) == seen)
        pthread_cond_wait(&wake, &sleep_lock);
    atomic_fetch_sub(&sleepers, 1);
    pthread_mutex_unlock(&sleep_lock);
    return w;
}

static void *worker_main(void *arg)
{
    const int id = (int)(intptr_t)arg;
    thread_index = id + 1;
    uint32_t seen = start_gen[id];
    inside = 1;
    for (;;) {
        const uint64_t w = wait_for_job(seen);
        seen = gen_of(w);
        if (id < atomic_load_explicit(&jobs[seen & 1].helpers, memory_order_relaxed))
            run_tasks(w, 1);
    }
    return NULL;
}

/* In a forked child only the forking thread exists: forget the workers (the next
 * job starts new ones) and reset the locks, which another thread may have held. */
static void pool_after_fork_child(void)
{
    pthread_mutex_init(&callers, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
    workers = 0;
    atomic_store(&sleepers, 0);
    serial_until = 0;
    serial_ns = SERIAL_MIN_NS;
    missed = 0;
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, pool_after_fork_child);
}

/* Start workers up to `wanted` (caller holds `callers`); returns the number running. */
static int start_workers(int wanted)
{
    sigset_t all, old;
    pthread_attr_t attr;
    pthread_once(&atfork_once, register_atfork);
    if (wanted <= workers)
        return workers;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* signals go to Python's threads, never to a worker */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (workers < wanted) {
        pthread_t thread;
        start_gen[workers] = gen_of(atomic_load(&word));
        if (pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)workers) != 0)
            break;             /* fewer helpers; the caller does their share */
        workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return workers;
}

static int run_serial(fnn_task_fn task, void *ctx, ptrdiff_t n_tasks)
{
    const int was_inside = inside;
    inside = 1;
    for (ptrdiff_t i = 0; i < n_tasks; i++)
        task(ctx, i);
    inside = was_inside;
    return n_tasks > 0;
}

int fnn_pool_run(fnn_task_fn task, void *ctx, ptrdiff_t n_tasks)
{
    int helpers = fnn_max_threads() - 1;
    if (helpers > n_tasks - 1) helpers = (int)(n_tasks - 1);
    if (helpers > POOL_MAX_WORKERS) helpers = POOL_MAX_WORKERS;
    if (helpers < 1 || inside || n_tasks > (ptrdiff_t)IDX_MASK)
        return run_serial(task, ctx, n_tasks);
#ifdef _OPENMP
    if (omp_in_parallel())
        return run_serial(task, ctx, n_tasks);
#endif
    if (pthread_mutex_trylock(&callers) != 0)     /* another thread's job is running */
        return run_serial(task, ctx, n_tasks);
    const ptrdiff_t start = now_ns();
    if (start < serial_until)                     /* contention seen lately */
        helpers = 0;
    else
        helpers = start_workers(helpers) < helpers ? workers : helpers;
    if (helpers < 1) {
        pthread_mutex_unlock(&callers);
        return run_serial(task, ctx, n_tasks);
    }

    const uint32_t gen = gen_of(atomic_load(&word)) + 1;
    struct job *job = &jobs[gen & 1];
    atomic_store_explicit(&job->task, task, memory_order_relaxed);
    atomic_store_explicit(&job->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&job->tasks, n_tasks, memory_order_relaxed);
    atomic_store_explicit(&job->helpers, helpers, memory_order_relaxed);
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    atomic_store_explicit(&ran, 0, memory_order_relaxed);
    const uint64_t w = (uint64_t)gen << 32;
    atomic_store(&word, w);                   /* seq_cst: publishes the fields (release) */
    const int woken = atomic_load(&sleepers) > 0;
    if (woken) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }

    inside = 1;
    const int caller_ran = run_tasks(w, 0) > 0;
    inside = 0;
    const ptrdiff_t own_end = now_ns();
    for (unsigned spins = 1; atomic_load_explicit(&done, memory_order_acquire) < n_tasks; spins++) {
        CPU_RELAX();
        if (spins % 64 == 0)
            sched_yield();     /* a worker preempted on this core needs it to finish */
    }
    const int helped = atomic_load_explicit(&ran, memory_order_relaxed);
    jobs_posted++;
    jobs_helped += helped > 0;
    if (!woken) {
        /* A worker preempted in its task stalls the job for a time slice (ms), and
         * spinning workers that never get to take a task only steal time from
         * whatever holds their cores: after either, run serially for a while,
         * longer each time in a row. Hiccups of microseconds (an interrupt, a
         * worker inside sched_yield) say nothing; nor does a job that woke a
         * sleeper, which starts late anyway. */
        const ptrdiff_t end = now_ns();
        const int stalled = caller_ran && end - own_end > own_end - start + STALL_NS;
        missed = helped ? 0 : missed + 1;
        if (stalled || missed >= MISSED_MAX) {
            serial_until = end + serial_ns;
            serial_ns = serial_ns * 2 > SERIAL_MAX_NS ? SERIAL_MAX_NS : serial_ns * 2;
            missed = 0;
        } else if (helped) {
            serial_ns = SERIAL_MIN_NS;
        }
    }
    pthread_mutex_unlock(&callers);
    return caller_ran + helped;
}

void fnn_pool_set_busy(int busy)
{
    pthread_mutex_lock(&callers);
    serial_until = busy ? now_ns() + SERIAL_MAX_NS : 0;
    serial_ns = SERIAL_MIN_NS;
    missed = 0;
    pthread_mutex_unlock(&callers);
}

void fnn_pool_set_spin_us(ptrdiff_t us)
{
    atomic_store(&spin_ns, us < 0 ? 0 : us * 1000L);
}

ptrdiff_t fnn_pool_spin_us(void)
{
    return atomic_load(&spin_ns) / 1000L;
}

void fnn_pool_stats(ptrdiff_t *posted, ptrdiff_t *helped)
{
    pthread_mutex_lock(&callers);
    *posted = jobs_posted;
    *helped = jobs_helped;
    pthread_mutex_unlock(&callers);
}

int fnn_pool_thread_index(void)
{
    return thread_index;
}

int fnn_pool_workers(void)
{
    return workers;
}

/* fnn_split: ranges of a memory-bound pass as pool tasks (see fastnn_kernels.h). */
struct split_job {
    fnn_range_fn body;
    void *args;
    ptrdiff_t n, block;
};

static void split_task(void *ctx, ptrdiff_t i)
{
    const struct split_job *job = (const struct split_job *)ctx;
    const ptrdiff_t lo = i * job->block;
    job->body(job->args, lo, job->n - lo < job->block ? job->n : lo + job->block);
}

void fnn_split(fnn_range_fn body, void *args, ptrdiff_t n, ptrdiff_t block)
{
    if (block < 1) block = 1;
    if (n <= block) {
        if (n > 0) body(args, 0, n);
        return;
    }
    /* as many tasks as blocks of `block`, their items shared out evenly (128 samples
     * in blocks of 109: two tasks of 64, not 109 and 19) */
    const ptrdiff_t tasks = (n + block - 1) / block;
    struct split_job job = {body, args, n, (n + tasks - 1) / tasks};
    fnn_pool_run(split_task, &job, (n + job.block - 1) / job.block);
}

ptrdiff_t fnn_split_block(ptrdiff_t item)
{
    return item >= FNN_SPLIT_ELEMENTS ? 1 : item < 1 ? FNN_SPLIT_ELEMENTS : FNN_SPLIT_ELEMENTS / item;
}
