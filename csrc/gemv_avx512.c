/* fastnn's own float32 GEMV for one sample of a dense layer, with AVX-512F:
 * y[0:o] (+)= x[0:i] @ W[0:i, 0:o], W row-major with rows ldw apart.
 *
 * Why: OpenBLAS's sgemv ('N' on W read as column-major (o, i)) takes 9.2 us for
 * 784x256 on one core of an Intel Xeon with AVX-512 (~85 GB/s), though W (800 KB)
 * of a network used over and over sits in L2 (2 MB a core).
 *
 * How: the outputs in blocks of up to 16 vectors (256 floats; a balanced cut, so a
 * block has at least 8 vectors when o >= 128), each block's sums in zmm registers
 * while the rows of W stream past: per row r, x[r] broadcast and one FMA per vector.
 * Blocks of fewer than 8 vectors run 2 or 4 rows at once on their own accumulators
 * (chains of independent FMAs: an FMA takes 4 cycles, two issue per cycle), added
 * in a fixed order at the end. The last vector of the last block is masked when o is
 * not a multiple of 16. Where o >= 128 and every row starts at the same offset in a
 * 64-byte line (ldw a multiple of 16) the columns start that many lanes before W,
 * under a mask, so that every load is aligned (a load across two lines costs two: 784x256 from L2 in
 * 7.1 us instead of 4.4 at numpy's usual 16-byte alignment; 5.3 us with the shift).
 *
 * Memory traffic: W read once, i * o * 4 bytes, in contiguous pieces of up to 1 KB per
 * row; x read once per block (ceil(o / 256) times, from L1); y read (add) and written
 * once. No buffers, no packing. One thread at 178 GB/s with W in L2 (784x256: 4.5 us;
 * OpenBLAS's sgemv about 9).
 *
 * Bits: each y[k] is (y[k] or 0) plus the products x[r] * W[r, k] summed in row order
 * (fused multiply-adds), or, in blocks of under 8 vectors, chains c < U (2 or 4) of
 * rows r = c mod U each summed in row order (the last i mod U rows onto chain 0), then
 * added chain 0 + 1 + 2 + 3, then onto y. Blocks of 8 or more vectors (all of them
 * from o >= 128, whatever the shift) have one chain, so neither the cut into blocks
 * nor the shift changes a bit: the order depends only on i and o, the same bits on
 * every call, every thread and every address of W.
 * Compiled with target attributes (no -mavx512f for the file); callers check
 * fnn_avx512_supported() once. */
#include <stdint.h>

#include "fastnn_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)

#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,fma")))
#define INLINE static inline __attribute__((always_inline))
#define MAX_VECS 16              /* vectors of outputs per block (accumulators) */

/* Outputs [0, 16 * vecs) of W's rows and y (moved to the block's start): y = (add ? y
 * : 0) + x @ W[:, block], the first vector under mask `head`, the last under `tail`
 * (lanes outside them neither read nor written); `chains` independent accumulator sets
 * (1, 2 or 4), rows r taken by set r mod chains. */
TARGET INLINE void gemv_block(const int vecs, const int chains, const float *restrict x,
                              const float *restrict w, ptrdiff_t ldw, ptrdiff_t i,
                              float *restrict y, __mmask16 head, __mmask16 tail, int add)
{
    __m512 acc[4][MAX_VECS];
    const __mmask16 first = vecs == 1 ? head & tail : head;
    const __mmask16 last = vecs == 1 ? head & tail : tail;
    ptrdiff_t r = 0;
#pragma GCC unroll 4
    for (int c = 0; c < chains; c++)
#pragma GCC unroll 16
        for (int v = 0; v < vecs; v++)
            acc[c][v] = _mm512_setzero_ps();
    for (; r + chains <= i; r += chains) {
#pragma GCC unroll 4
        for (int c = 0; c < chains; c++) {
            const float *row = w + (r + c) * ldw;
            const __m512 xr = _mm512_set1_ps(x[r + c]);
            acc[c][0] = _mm512_fmadd_ps(xr, _mm512_maskz_loadu_ps(first, row), acc[c][0]);
#pragma GCC unroll 16
            for (int v = 1; v < vecs - 1; v++)
                acc[c][v] = _mm512_fmadd_ps(xr, _mm512_loadu_ps(row + 16 * v), acc[c][v]);
            if (vecs > 1)
                acc[c][vecs - 1] = _mm512_fmadd_ps(
                xr, _mm512_maskz_loadu_ps(last, row + 16 * (vecs - 1)), acc[c][vecs - 1]);
        }
    }
    for (; r < i; r++) {                             /* the rows left over: chain 0 */
        const float *row = w + r * ldw;
        const __m512 xr = _mm512_set1_ps(x[r]);
#pragma GCC unroll 16
        for (int v = 0; v < vecs; v++) {
            const __mmask16 m = v == 0 ? first : v == vecs - 1 ? last : (__mmask16)0xffff;
            acc[0][v] = _mm512_fmadd_ps(xr, _mm512_maskz_loadu_ps(m, row + 16 * v), acc[0][v]);
        }
    }
#pragma GCC unroll 16
    for (int v = 0; v < vecs; v++) {
        const __mmask16 m = v == 0 ? first : v == vecs - 1 ? last : (__mmask16)0xffff;
        __m512 sum = acc[0][v];
#pragma GCC unroll 4
        for (int c = 1; c < chains; c++)
            sum = _mm512_add_ps(sum, acc[c][v]);
        if (add)
            sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + 16 * v), sum);
        _mm512_mask_storeu_ps(y + 16 * v, m, sum);
    }
}

/* One block of `vecs` (1..16) vectors: a copy of gemv_block for each count, unrolled
 * (all accumulators in registers), with 4 chains under 4 vectors, 2 under 8. */
TARGET static void gemv_dispatch(int vecs, const float *x, const float *w, ptrdiff_t ldw,
                                 ptrdiff_t i, float *y, __mmask16 head, __mmask16 tail,
                                 int add)
{
#define FNN_GEMV_CASE(V) \
    case V: gemv_block(V, V < 4 ? 4 : V < 8 ? 2 : 1, x, w, ldw, i, y, head, tail, add); break;
    switch (vecs) {
    FNN_GEMV_CASE(1) FNN_GEMV_CASE(2) FNN_GEMV_CASE(3) FNN_GEMV_CASE(4)
    FNN_GEMV_CASE(5) FNN_GEMV_CASE(6) FNN_GEMV_CASE(7) FNN_GEMV_CASE(8)
    FNN_GEMV_CASE(9) FNN_GEMV_CASE(10) FNN_GEMV_CASE(11) FNN_GEMV_CASE(12)
    FNN_GEMV_CASE(13) FNN_GEMV_CASE(14) FNN_GEMV_CASE(15) FNN_GEMV_CASE(16)
    default: break;
    }
#undef FNN_GEMV_CASE
}

TARGET void fnn_sgemv_f(const float *x, const float *w, ptrdiff_t ldw, ptrdiff_t i,
                        ptrdiff_t o, float *y, int add)
{
    /* vectors aligned to 64 bytes in every row where ldw allows it (a load across two
     * cache lines costs two: 784x256 from L2 takes 7.1 us instead of 4.4): the columns
     * from `shift` lanes before w, the first `shift` lanes masked off; only from 128
     * outputs, where every block runs one chain (see Bits above) */
    const ptrdiff_t shift = ldw % 16 == 0 && o >= 128 ? (ptrdiff_t)((uintptr_t)w % 64 / 4) : 0;
    const ptrdiff_t total = (o + shift + 15) / 16;            /* vectors of outputs */
    const ptrdiff_t blocks = (total + MAX_VECS - 1) / MAX_VECS;
    ptrdiff_t first = 0;                                      /* vector where a block starts */
    if (o <= 0)
        return;
    w -= shift;
    y -= shift;
    for (ptrdiff_t b = 0; b < blocks; b++) {
        const ptrdiff_t end = total * (b + 1) / blocks;       /* balanced: sizes differ by 1 */
        const ptrdiff_t left = o + shift - 16 * (end - 1);    /* lanes of its last vector */
        const __mmask16 tail = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __mmask16 head = b == 0 ? (__mmask16)(0xffffu << shift) : (__mmask16)0xffff;
        gemv_dispatch((int)(end - first), x, w + 16 * first, ldw, i, y + 16 * first, head,
                      tail, add);
        first = end;
    }
}

#else   /* not GCC/clang on x86-64: BLAS runs every GEMV */

void fnn_sgemv_f(const float *x, const float *w, ptrdiff_t ldw, ptrdiff_t i, ptrdiff_t o,
                 float *y, int add)
{
    (void)x; (void)w; (void)ldw; (void)i; (void)o; (void)y; (void)add;
}

#endif
