/* fastnn's caching allocator for kernel outputs and workspaces (what PyTorch's CPU
 * and CUDA allocators do). On these VMs a large block freed and allocated again pays
 * its page faults every time (glibc hands big blocks back to the OS, the host
 * reclaims them): LeNet's training step paid ~600 faults, W5's max-pool backward
 * 3-20 ms instead of ~2. So a block of FNN_CACHE_MIN bytes or more that is freed
 * goes to a free list of its size, and the next request of that size takes it back
 * with its pages still mapped.
 *
 * Blocks are 64-byte aligned (2 MiB and huge pages from 4 MiB); a 64-byte header before each keeps its size and its
 * links. Free blocks sit in FNN_CACHE_BUCKETS doubly linked lists by size (a lookup
 * reads only its own bucket) and in one list in order of freeing, oldest first:
 * at most FNN_CACHE_CAP bytes stay held, the oldest free blocks released first.
 * Requested sizes are rounded up to whole 4 KiB pages, so near sizes share blocks.
 * Blocks below FNN_CACHE_MIN bytes come from and go back to malloc directly.
 *
 * One mutex guards the lists and counters (callers may hold no GIL); a forked
 * child re-initializes it (pthread_atfork), since another thread may have held it
 * at the fork. Nothing here reads a Python reference count: the caller frees a
 * block explicitly (the Python side from the dealloc of the object that owns it).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "fastnn_kernels.h"

#define ALIGN 64
#define PAGE 4096
#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_MIN ((size_t)4 << 20)

typedef struct block {
    size_t size;                        /* usable bytes after the header */
    struct block *prev, *next;          /* free list of its bucket */
    struct block *older, *newer;        /* all free blocks, in order of freeing */
} block;

typedef char header_fits[sizeof(block) <= ALIGN ? 1 : -1];

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static block *buckets[FNN_CACHE_BUCKETS];
static block *oldest, *newest;
static int64_t held_bytes, held_blocks, hits, misses;

static void after_fork_child(void)
{
    pthread_mutex_init(&lock, NULL);
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, after_fork_child);
}

static size_t bucket_of(size_t size)
{
    return (size / PAGE) % FNN_CACHE_BUCKETS;
}

static void *payload(block *b)
{
    return (char *)b + ALIGN;
}

/* Unlink a free block from both lists (lock held). */
static void take_out(block *b)
{
    size_t k = bucket_of(b->size);
    if (b->prev) b->prev->next = b->next; else buckets[k] = b->next;
    if (b->next) b->next->prev = b->prev;
    if (b->older) b->older->newer = b->newer; else oldest = b->newer;
    if (b->newer) b->newer->older = b->older; else newest = b->older;
    held_bytes -= (int64_t)b->size;
    held_blocks -= 1;
}

/* A free block of exactly `size` bytes, unlinked, or NULL (lock held). */
static block *find(size_t size)
{
    block *b;
    for (b = buckets[bucket_of(size)]; b != NULL; b = b->next)
        if (b->size == size) {
            take_out(b);
            return b;
        }
    return NULL;
}

/* A new block. From HUGE_MIN bytes it is 2 MiB aligned and advised to use huge pages
 * (as NumPy advises its arrays from 4 MiB): W5's max-pool forward took 1.7 ms
 * instead of 1.5 in 4 KiB pages, with its TLB misses. */
static block *fresh(size_t size)
{
    void *memory = NULL;
    size_t align = size >= HUGE_MIN ? HUGE_PAGE : ALIGN;
    block *b;
    if (size > SIZE_MAX - HUGE_PAGE || posix_memalign(&memory, align, ALIGN + size) != 0)
        return NULL;
#ifdef MADV_HUGEPAGE
    if (align == HUGE_PAGE)
        madvise(memory, (ALIGN + size) / PAGE * PAGE, MADV_HUGEPAGE);   /* advice only */
#endif
    b = (block *)memory;
    b->size = size;
    return b;
}

void *fnn_cache_alloc(size_t nbytes)
{
    block *b = NULL;
    size_t size = nbytes < FNN_CACHE_MIN ? nbytes : (nbytes + PAGE - 1) / PAGE * PAGE;
    if (size < nbytes)                  /* rounding overflowed */
        return NULL;
    if (size >= FNN_CACHE_MIN) {
        pthread_once(&atfork_once, register_atfork);
        pthread_mutex_lock(&lock);
        b = find(size);
        if (b) hits += 1; else misses += 1;
        pthread_mutex_unlock(&lock);
    }
    if (b == NULL)
        b = fresh(size);
    return b ? payload(b) : NULL;
}

void fnn_cache_free(void *p)
{
    block *b, *drop = NULL;
    size_t k;
    if (p == NULL)
        return;
    b = (block *)((char *)p - ALIGN);
    if (b->size < FNN_CACHE_MIN || b->size > FNN_CACHE_CAP) {
        free(b);
        return;
    }
    pthread_mutex_lock(&lock);
    /* room first: the oldest free blocks go back to the system (freed unlocked) */
    while (held_bytes + (int64_t)b->size > FNN_CACHE_CAP) {
        block *victim = oldest;
        take_out(victim);
        victim->next = drop;
        drop = victim;
    }
    k = bucket_of(b->size);
    b->prev = NULL;
    b->next = buckets[k];
    if (b->next) b->next->prev = b;
    buckets[k] = b;
    b->older = newest;
    b->newer = NULL;
    if (newest) newest->newer = b; else oldest = b;
    newest = b;
    held_bytes += (int64_t)b->size;
    held_blocks += 1;
    pthread_mutex_unlock(&lock);
    while (drop) {
        block *next = drop->next;
        free(drop);
        drop = next;
    }
}

void fnn_cache_stats(int64_t *out)
{
    pthread_mutex_lock(&lock);
    out[0] = hits;
    out[1] = misses;
    out[2] = held_bytes;
    out[3] = held_blocks;
    pthread_mutex_unlock(&lock);
}

void fnn_cache_clear(void)
{
    block *drop = NULL;
    pthread_mutex_lock(&lock);
    while (oldest) {
        block *victim = oldest;
        take_out(victim);
        victim->next = drop;
        drop = victim;
    }
    pthread_mutex_unlock(&lock);
    while (drop) {
        block *next = drop->next;
        free(drop);
        drop = next;
    }
}
