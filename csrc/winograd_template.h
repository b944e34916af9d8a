/* Winograd F(2x2, 3x3) convolution (3x3 kernel, stride 1, padding 0..2 per axis)
 * for one element type. Included by fastnn_kernels.c after kernels_template.h,
 * with T and S defined (and TRANSPOSE_BLOCK4 for float).
 *
 * With the points (0, 1, -1, inf) a 2x2 output tile y of a 4x4 input tile d
 * (stride 2, so tiles overlap by 2) is
 *     y = A^T [(G g G^T) . (B^T d B)] A
 *     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
 *     G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],  A^T = [1 1 1 0; 0 1 -1 -1]
 * Summed over the input channels, the 16 element-wise products become 16 GEMMs
 * (one per position xi of the 4x4 transformed tile): 16 * C*K multiply-adds per
 * tile of 4 outputs instead of 36 * C*K.
 * The weight gradient is the transpose of that bilinear form, F(3x3, 2x2):
 *     grad_g = G^T [sum over tiles (A dy A^T) . (B^T d B)] G
 * with dy the tile's 2x2 block of grad_y (zero past the output's edge): 16 GEMMs
 * summing over the tiles, then one output transform per (k, c).
 *
 * Layout: channels last. A unit of work is a block of at most `tiles` tiles:
 * several whole samples (small images) or one band of tile rows (or of tile
 * columns) of one sample. Its input region is copied to (pixels, C), the
 * transformed tiles are V (tiles, 16, C), so V[xi] = V + xi*C is a (tiles, C)
 * matrix with row stride 16*C; the GEMMs give M[xi] (tiles, K) = V[xi] @ U[xi]
 * (C, K) in M (tiles, 16, K), and the output region (pixels, K) is transposed
 * into NCHW, adding the bias. The blocks depend only on the shapes, so the result
 * does not depend on the thread count or on which thread ran which unit.
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(base) CAT(base, S)

#ifndef FNN_WINOGRAD_COMMON
#define FNN_WINOGRAD_COMMON

/* Tiles per unit: WINO_MIN_TILES, or up to WINO_MAX_TILES while the unit's
 * transformed tiles V and products M (16 * tiles * (C + K) elements) stay within
 * WINO_BLOCK_BYTES (few channels: longer GEMMs). Each unit reads all 16*C*K
 * transformed weights, so its GEMMs do tiles/2 flops per weight byte (float):
 * measured here (forward + backward, patch-row time / Winograd time),
 * N=8 C=512 K=256 8x8: 0.82x with 16 tiles (two threads); one thread, 1.17x
 * with 64, 1.57x with 128; N=4 C=K=512 14x14: 1.02x with 64, 1.21x with 128;
 * W4 (C=K=64) about the same with 64 and 128 (1.9-2.0x). */
#define WINO_BLOCK_BYTES (512L * 1024)
#define WINO_MIN_TILES 128L
#define WINO_MAX_TILES 256L
static ptrdiff_t wino_tiles_override = 0;       /* tiles per unit when > 0 (tests) */
/* Units of the weight gradient are summed in this many fixed chunks (each with
 * its own 16*K*C partial, added in chunk order): independent of the thread count,
 * so 1 and 2 threads give the same bits. */
#define WINO_CHUNKS 8L

ptrdiff_t fnn_winograd_set_tiles(ptrdiff_t tiles)
{
    const ptrdiff_t old = wino_tiles_override;
    wino_tiles_override = tiles > 0 ? tiles : 0;
    return old;
}

/* A conv (ch_in, h, w) -> (ch_out, oh, ow), cut into units of tiles. */
typedef struct {
    ptrdiff_t n, ch_in, h, w, ch_out, oh, ow;
    ptrdiff_t ph, pw;
    ptrdiff_t th, tw;            /* tiles per sample: ceil(oh/2) x ceil(ow/2) */
    ptrdiff_t ns, nty, ntx;      /* a unit's samples, tile rows, tile columns (at most) */
    ptrdiff_t bands_y, bands_x;  /* units per sample (1 x 1 when a unit holds whole samples) */
    ptrdiff_t units, tiles;      /* number of units; tiles of a unit (at most) */
    ptrdiff_t in_rows, in_cols, out_rows, out_cols;   /* a unit's regions (at most) */
} wino_plan;

/* One unit: samples [s0, s0+ns), tile rows [ty0, ty0+nty), tile columns [tx0, tx0+ntx). */
typedef struct {
    ptrdiff_t s0, ns, ty0, nty, tx0, ntx;
} wino_unit;

/* The transforms' functions, inlined into the WIDE_CLONES unit functions (their clones) */
#if defined(__GNUC__)
#define WINO_INLINE static inline __attribute__((always_inline))
#else
#define WINO_INLINE static inline
#endif

static ptrdiff_t wino_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }
static ptrdiff_t wino_max(ptrdiff_t a, ptrdiff_t b) { return a > b ? a : b; }

/* The conv's outputs are rows [0, oh) and columns [0, ow) of the correlation of the
 * input, padded by ph rows above and pw columns on the left, with a 3x3 kernel: with
 * oh = h + 2*ph - 2 (ow likewise) the usual conv; smaller, its first rows and columns
 * only; larger, as if the input had more zero rows (columns) below (on the right).
 * Input pixels past h x w read as zeros. */
static wino_plan wino_make_plan(ptrdiff_t n, ptrdiff_t ch_in, ptrdiff_t h, ptrdiff_t w, ptrdiff_t ph, ptrdiff_t pw,
                                ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t ch_out, ptrdiff_t elem)
{
    wino_plan p;
    p.n = n; p.ch_in = ch_in; p.h = h; p.w = w; p.ch_out = ch_out; p.ph = ph; p.pw = pw;
    p.oh = oh;
    p.ow = ow;
    p.th = (p.oh + 1) / 2;
    p.tw = (p.ow + 1) / 2;
    ptrdiff_t budget = WINO_BLOCK_BYTES / (16 * (ch_in + ch_out) * elem);
    budget = wino_max(WINO_MIN_TILES, wino_min(WINO_MAX_TILES, budget));
    if (wino_tiles_override) budget = wino_tiles_override;
    const ptrdiff_t per_sample = p.th * p.tw;
    if (per_sample <= budget) {             /* whole samples */
        p.ns = wino_max(1, wino_min(n, budget / per_sample));
        p.nty = p.th; p.ntx = p.tw;
        p.bands_y = p.bands_x = 1;
        p.units = (n + p.ns - 1) / p.ns;
    } else if (p.tw <= budget) {            /* bands of whole tile rows */
        p.ns = 1;
        p.bands_y = (p.th + budget / p.tw - 1) / (budget / p.tw);
        p.nty = (p.th + p.bands_y - 1) / p.bands_y;
        p.ntx = p.tw;
        p.bands_x = 1;
        p.units = n * p.bands_y;
    } else {                                /* pieces of single tile rows */
        p.ns = 1;
        p.nty = 1;
        p.bands_y = p.th;
        p.bands_x = (p.tw + budget - 1) / budget;
        p.ntx = (p.tw + p.bands_x - 1) / p.bands_x;
        p.units = n * p.bands_y * p.bands_x;
    }
    p.tiles = p.ns * p.nty * p.ntx;
    p.in_rows = wino_min(h, 2 * p.nty + 2);
    p.in_cols = wino_min(w, 2 * p.ntx + 2);
    p.out_rows = wino_min(p.oh, 2 * p.nty);
    p.out_cols = wino_min(p.ow, 2 * p.ntx);
    return p;
}

static wino_unit wino_unit_at(const wino_plan *p, ptrdiff_t u)
{
    wino_unit q;
    const ptrdiff_t per_sample = p->bands_y * p->bands_x, band = u % per_sample;
    q.s0 = u / per_sample * p->ns;
    q.ns = wino_min(p->ns, p->n - q.s0);
    q.ty0 = band / p->bands_x * p->nty;
    q.nty = wino_min(p->nty, p->th - q.ty0);
    q.tx0 = band % p->bands_x * p->ntx;
    q.ntx = wino_min(p->ntx, p->tw - q.tx0);
    return q;
}

/* Output rows [*o_lo, +*onr) and columns [*oc_lo, +*onc) of the unit. */
static void wino_unit_outputs(const wino_plan *p, const wino_unit *q, ptrdiff_t *o_lo, ptrdiff_t *onr,
                              ptrdiff_t *oc_lo, ptrdiff_t *onc)
{
    *o_lo = 2 * q->ty0;
    *onr = wino_min(p->oh, 2 * (q->ty0 + q->nty)) - *o_lo;
    *oc_lo = 2 * q->tx0;
    *onc = wino_min(p->ow, 2 * (q->tx0 + q->ntx)) - *oc_lo;
}

/* Elements of one thread's buffers: input region, V, M, output region, a
 * scratch row for outputs past the edge, a scratch tile. */
static ptrdiff_t wino_thread_elems(const wino_plan *p)
{
    return p->ns * p->in_rows * p->in_cols * p->ch_in + 16 * p->tiles * p->ch_in
         + 16 * p->tiles * p->ch_out + p->ns * p->out_rows * p->out_cols * p->ch_out
         + p->ch_out + 16 * wino_max(p->ch_in, p->ch_out);
}

#endif /* FNN_WINOGRAD_COMMON */

/* --- copies between NCHW and channels-last regions ------------------------- */

#ifdef TRANSPOSE_BLOCK4
#define WINO_BLOCK4 TRANSPOSE_BLOCK4
#else
/* out[i*ldo + j] = a[j*lda + i] (+ bias[i]) for a 4x4 block. */
static inline void NAME(wino_block4)(const T *a, ptrdiff_t lda, T *out, ptrdiff_t ldo, const T *bias)
{
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            out[i * ldo + j] = bias ? a[j * lda + i] + bias[i] : a[j * lda + i];
}
#define WINO_BLOCK4 NAME(wino_block4)
#endif

/* out (cols, rows; row stride ldo) = a (rows, cols; row stride lda) transposed,
 * plus bias[c] on output row c when bias is non-NULL. In 4x4 blocks, 4 lines
 * at a time on the side with the long stride (a channel plane: lines 4 KiB apart
 * share L1 sets) and 64 on the other. */
static void NAME(wino_transpose)(const T *a, ptrdiff_t rows, ptrdiff_t cols, ptrdiff_t lda, T *out, ptrdiff_t ldo,
                                 const T *bias)
{
    const ptrdiff_t r4 = rows / 4 * 4, c4 = cols / 4 * 4;
    if (lda >= ldo) {        /* a's rows are the long stride: 4 of them at a time */
        for (ptrdiff_t c0 = 0; c0 < c4; c0 += 64) {
            const ptrdiff_t c1 = c0 + 64 < c4 ? c0 + 64 : c4;
            for (ptrdiff_t r = 0; r < r4; r += 4)
                for (ptrdiff_t c = c0; c < c1; c += 4)
                    WINO_BLOCK4(a + r * lda + c, lda, out + c * ldo + r, ldo,
                                bias ? bias + c : NULL);
        }
    } else {                 /* out's rows are: 4 of them at a time */
        for (ptrdiff_t r0 = 0; r0 < r4; r0 += 64) {
            const ptrdiff_t r1 = r0 + 64 < r4 ? r0 + 64 : r4;
            for (ptrdiff_t c = 0; c < c4; c += 4)
                for (ptrdiff_t r = r0; r < r1; r += 4)
                    WINO_BLOCK4(a + r * lda + c, lda, out + c * ldo + r, ldo,
                                bias ? bias + c : NULL);
        }
    }
    /* ragged edges: rows [r4, rows) of every column, columns [c4, cols) above */
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c = (r < r4 ? c4 : 0); c < cols; c++)
            out[c * ldo + r] = bias ? a[r * lda + c] + bias[c] : a[r * lda + c];
}
#undef WINO_BLOCK4

/* Rows [r_lo, r_lo+nr) x columns [c_lo, c_lo+nc) of ns samples of x (ch, h, w)
 * -> region (ns, nr, nc, ch), channels last. */
static void NAME(wino_gather)(const T *x, ptrdiff_t ch, ptrdiff_t h, ptrdiff_t w, ptrdiff_t ns, ptrdiff_t r_lo, ptrdiff_t nr,
                              ptrdiff_t c_lo, ptrdiff_t nc, T *region)
{
    for (ptrdiff_t s = 0; s < ns; s++) {
        const T *xs = x + s * ch * h * w;
        T *dst = region + s * nr * nc * ch;
        if (nc == w)         /* whole rows: one block of nr*w pixels per channel */
            NAME(wino_transpose)(xs + r_lo * w, ch, nr * w, h * w, dst, ch, NULL);
        else
            for (ptrdiff_t r = 0; r < nr; r++)
                NAME(wino_transpose)(xs + (r_lo + r) * w + c_lo, ch, nc, h * w,
                                     dst + r * nc * ch, ch, NULL);
    }
}

/* Inverse of wino_gather into y (ch, h, w), adding bias[c] (when non-NULL). */
static void NAME(wino_scatter)(const T *region, ptrdiff_t ch, ptrdiff_t h, ptrdiff_t w, ptrdiff_t ns, ptrdiff_t r_lo,
                               ptrdiff_t nr, ptrdiff_t c_lo, ptrdiff_t nc, const T *bias, T *y)
{
    for (ptrdiff_t s = 0; s < ns; s++) {
        T *ys = y + s * ch * h * w;
        const T *src = region + s * nr * nc * ch;
        if (nc == w)
            NAME(wino_transpose)(src, nr * w, ch, ch, ys + r_lo * w, h * w, bias);
        else
            for (ptrdiff_t r = 0; r < nr; r++)
                NAME(wino_transpose)(src + r * nc * ch, nc, ch, ch,
                                     ys + (r_lo + r) * w + c_lo, h * w, bias);
    }
}

/* --- the transforms, vectorized over channels ------------------------------- */
/* They are inlined (always_inline) into the unit functions below, which are
 * WIDE_CLONES (fastnn_kernels.c): on AVX-512 CPUs their channel loops run 16 lanes
 * wide, elsewhere SSE2's 4; adds, subtracts, halvings and compares only, no contraction, so
 * the same bits. Fashion-MNIST's 24 -> 48 and 48 -> 96 convs (batch 128, 2 threads,
 * this 2-vCPU Intel Xeon KVM guest, alternated runs): forward 1.84-2.00 -> 1.64-1.81
 * ms and 1.95-1.97 -> 1.67-1.82 ms, backward 4.57-4.73 -> 4.46-4.61 ms and 4.32-4.76
 * -> 4.04-4.38 ms. */
/* Each in two separable passes through a scratch tile `tmp` (16*ch elements, in
 * L1), so that every loop reads and writes at most 4 streams. One pass over the
 * 16 input and 16 output streams of a tile (then tiles-major, the outputs 16 KiB
 * apart) spilled its pointers to the stack and met L1 set conflicts: 21% of
 * the W4 time against 7% now (perf, one thread). */

/* out[xi*ch + c] = (B^T d B)[xi] for c < ch, d[i][j] = p[4i+j][c]. */
WINO_INLINE void NAME(wino_input_tile)(const T *const *p, T *restrict out, T *restrict tmp, ptrdiff_t ch)
{
    for (int j = 0; j < 4; j++) {           /* columns: tmp = B^T d */
        const T *d0 = p[j], *d1 = p[4 + j], *d2 = p[8 + j], *d3 = p[12 + j];
        T *t0 = tmp + j * ch, *t1 = t0 + 4 * ch, *t2 = t0 + 8 * ch, *t3 = t0 + 12 * ch;
        #pragma omp simd
        for (ptrdiff_t c = 0; c < ch; c++) {
            t0[c] = d0[c] - d2[c];
            t1[c] = d1[c] + d2[c];
            t2[c] = d2[c] - d1[c];
            t3[c] = d1[c] - d3[c];
        }
    }
    for (int i = 0; i < 4; i++) {           /* rows: out = tmp B */
        const T *t0 = tmp + 4 * i * ch, *t1 = t0 + ch, *t2 = t0 + 2 * ch, *t3 = t0 + 3 * ch;
        T *o0 = out + 4 * i * ch, *o1 = o0 + ch, *o2 = o0 + 2 * ch, *o3 = o0 + 3 * ch;
        #pragma omp simd
        for (ptrdiff_t c = 0; c < ch; c++) {
            o0[c] = t0[c] - t2[c];
            o1[c] = t1[c] + t2[c];
            o2[c] = t2[c] - t1[c];
            o3[c] = t1[c] - t3[c];
        }
    }
}

/* q[2i+j][c] = (A^T m A)[i][j] for c < ch, m[xi] = in[xi*ch + c]. */
WINO_INLINE void NAME(wino_output_tile)(const T *restrict in, T *const *q, T *restrict tmp, ptrdiff_t ch)
{
    for (int j = 0; j < 4; j++) {           /* columns: tmp (2x4) = A^T m */
        const T *m0 = in + j * ch, *m1 = m0 + 4 * ch, *m2 = m0 + 8 * ch, *m3 = m0 + 12 * ch;
        T *t0 = tmp + j * ch, *t1 = t0 + 4 * ch;
        #pragma omp simd
        for (ptrdiff_t c = 0; c < ch; c++) {
            t0[c] = m0[c] + m1[c] + m2[c];
            t1[c] = m1[c] - m2[c] - m3[c];
        }
    }
    for (int i = 0; i < 2; i++) {           /* rows: q = tmp A */
        const T *t0 = tmp + 4 * i * ch, *t1 = t0 + ch, *t2 = t0 + 2 * ch, *t3 = t0 + 3 * ch;
        T *q0 = q[2 * i], *q1 = q[2 * i + 1];
        #pragma omp simd
        for (ptrdiff_t c = 0; c < ch; c++) {
            q0[c] = t0[c] + t1[c] + t2[c];
            q1[c] = t1[c] - t2[c] - t3[c];
        }
    }
}

/* out[xi*ch + c] = (A a A^T)[xi] for c < ch, a[i][j] = q[2i+j][c] (a 2x2 block of
 * grad_y), A = [1 0; 1 1; 1 -1; 0 -1]. */
WINO_INLINE void NAME(wino_grad_tile)(const T *const *q, T *restrict out, T *restrict tmp, ptrdiff_t ch)
{
    for (int j = 0; j < 2; j++) {           /* columns: tmp (4x2) = A a */
        const T *a0 = q[j], *a1 = q[2 + j];
        T *t0 = tmp + j * ch, *t1 = t0 + 2 * ch, *t2 = t0 + 4 * ch, *t3 = t0 + 6 * ch;
        #pragma omp simd
        for (ptrdiff_t c = 0; c < ch; c++) {
            t0[c] = a0[c];
            t1[c] = a0[c] + a1[c];
            t2[c] = a0[c] - a1[c];
            t3[c] = -a1[c];
        }
    }
    for (int i = 0; i < 4; i++) {           /* rows: out = tmp A^T */
        const T *t0 = tmp + 2 * i * ch, *t1 = t0 + ch;
        T *o0 = out + 4 * i * ch, *o1 = o0 + ch, *o2 = o0 + 2 * ch, *o3 = o0 + 3 * ch;
        #pragma omp simd
        for (ptrdiff_t c = 0; c < ch; c++) {
            o0[c] = t0[c];
            o1[c] = t0[c] + t1[c];
            o2[c] = t0[c] - t1[c];
            o3[c] = -t1[c];
        }
    }
}

/* U[xi][ci][co] = (G g G^T)[xi] for the 3x3 kernels g of w (K, C, 3, 3):
 * g = w[co][ci] (ch_in = C, ch_out = K), or, when `flip`, the transposed conv's
 * g = w[ci][co] turned by 180 degrees (ch_in = K, ch_out = C). */
static void NAME(wino_weights)(const T *w, ptrdiff_t k, ptrdiff_t c, int flip, T *U)
{
    const ptrdiff_t ch_in = flip ? k : c, ch_out = flip ? c : k;
    for (ptrdiff_t kk = 0; kk < k; kk++)
        for (ptrdiff_t cc = 0; cc < c; cc++) {
            const T *src = w + (kk * c + cc) * 9;
            T g[9], t[4][3];
            for (int e = 0; e < 9; e++) g[e] = flip ? src[8 - e] : src[e];
            for (int j = 0; j < 3; j++) {       /* t = G g */
                t[0][j] = g[j];
                t[1][j] = (T)0.5 * (g[j] + g[3 + j] + g[6 + j]);
                t[2][j] = (T)0.5 * (g[j] - g[3 + j] + g[6 + j]);
                t[3][j] = g[6 + j];
            }
            const ptrdiff_t ci = flip ? kk : cc, co = flip ? cc : kk;
            T *dst = U + ci * ch_out + co;
            const ptrdiff_t ld = ch_in * ch_out;
            for (int i = 0; i < 4; i++) {       /* (G g) G^T */
                dst[(4 * i + 0) * ld] = t[i][0];
                dst[(4 * i + 1) * ld] = (T)0.5 * (t[i][0] + t[i][1] + t[i][2]);
                dst[(4 * i + 2) * ld] = (T)0.5 * (t[i][0] - t[i][1] + t[i][2]);
                dst[(4 * i + 3) * ld] = t[i][2];
            }
        }
}

/* grad_w[kk][cc] = G^T X G, X[xi] = P[xi][kk][cc], G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0;
 * 0 1/2 1/2 1]. */
static void NAME(wino_weight_grads)(const T *P, ptrdiff_t k, ptrdiff_t c, T *grad_w)
{
    const ptrdiff_t ld = k * c;
    for (ptrdiff_t e = 0; e < k * c; e++) {
        T x[16], t[3][4];
        for (int xi = 0; xi < 16; xi++) x[xi] = P[xi * ld + e];
        for (int j = 0; j < 4; j++) {           /* t = G^T X */
            t[0][j] = x[j] + (T)0.5 * (x[4 + j] + x[8 + j]);
            t[1][j] = (T)0.5 * (x[4 + j] - x[8 + j]);
            t[2][j] = (T)0.5 * (x[4 + j] + x[8 + j]) + x[12 + j];
        }
        T *dst = grad_w + e * 9;
        for (int i = 0; i < 3; i++) {           /* (G^T X) G */
            dst[3 * i + 0] = t[i][0] + (T)0.5 * (t[i][1] + t[i][2]);
            dst[3 * i + 1] = (T)0.5 * (t[i][1] - t[i][2]);
            dst[3 * i + 2] = (T)0.5 * (t[i][1] + t[i][2]) + t[i][3];
        }
    }
}

/* --- one unit ------------------------------------------------------------------ */

/* The unit's input region (rows [*r_lo, +*nr) x columns [*c_lo, +*nc) of the
 * image) gathered channels last into `region`, and its tiles transformed into
 * V (p->tiles, 16, ch_in): V[xi] = V + xi * ch_in is a (tiles, ch_in) matrix with
 * row stride 16 * ch_in. tmp: 16 * ch_in elements of scratch. */
WIDE_CLONES
static void NAME(wino_unit_input)(const wino_plan *p, const wino_unit *q, const T *x,
                                  const T *zeros, T *region, T *V, T *tmp)
{
    const ptrdiff_t ch = p->ch_in;
    const ptrdiff_t r_lo = wino_max(0, 2 * q->ty0 - p->ph);
    const ptrdiff_t r_hi = wino_min(p->h, 2 * (q->ty0 + q->nty) + 2 - p->ph);
    const ptrdiff_t c_lo = wino_max(0, 2 * q->tx0 - p->pw);
    const ptrdiff_t c_hi = wino_min(p->w, 2 * (q->tx0 + q->ntx) + 2 - p->pw);
    const ptrdiff_t nr = wino_max(0, r_hi - r_lo), nc = wino_max(0, c_hi - c_lo);
    NAME(wino_gather)(x + q->s0 * ch * p->h * p->w, ch, p->h, p->w, q->ns, r_lo, nr, c_lo, nc,
                      region);
    const T *ptr[16];
    for (ptrdiff_t s = 0; s < q->ns; s++)
        for (ptrdiff_t ty = 0; ty < q->nty; ty++)
            for (ptrdiff_t tx = 0; tx < q->ntx; tx++) {
                const ptrdiff_t t = (s * q->nty + ty) * q->ntx + tx;
                for (int i = 0; i < 4; i++) {
                    const ptrdiff_t r = 2 * (q->ty0 + ty) - p->ph + i - r_lo;
                    for (int j = 0; j < 4; j++) {
                        const ptrdiff_t col = 2 * (q->tx0 + tx) - p->pw + j - c_lo;
                        ptr[4 * i + j] = (r >= 0 && r < nr && col >= 0 && col < nc)
                            ? region + ((s * nr + r) * nc + col) * ch : zeros;
                    }
                }
                NAME(wino_input_tile)(ptr, V + 16 * t * ch, tmp, ch);
            }
}

/* Pointers to the 2x2 output pixels of tile (s, ty, tx) of the unit in a region
 * (ns, onr, onc, ch); pixels past the output's edge get `outside`. */
WINO_INLINE void NAME(wino_tile_outputs)(const wino_plan *p, ptrdiff_t s, ptrdiff_t ty, ptrdiff_t tx, T *region,
                                    ptrdiff_t onr, ptrdiff_t onc, T *outside, T **ptr)
{
    const ptrdiff_t ch = p->ch_out;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            const ptrdiff_t r = 2 * ty + i, col = 2 * tx + j;
            ptr[2 * i + j] = (r < onr && col < onc) ? region + ((s * onr + r) * onc + col) * ch
                                                    : outside;
        }
}

/* One step of the first maximum, lane by lane: where v beats best (strictly greater,
 * or a first NaN: the max pool kernel's beats()), best = v and at = corner. One select
 * per loop: GCC 12 vectorises it, not a chain of three (NaNs kept, no -ffast-math). */
WINO_INLINE void NAME(wino_max_step)(const T *restrict v, T *restrict best, T *restrict at,
                                     T corner, ptrdiff_t lanes)
{
    for (ptrdiff_t e = 0; e < lanes; e++) {
        const T m = best[e], x = v[e];
        const int take = (x > m) | ((x != x) & (m == m));
        best[e] = take ? x : m;
        at[e] = take ? corner : at[e];
    }
}

/* The 2x2 stride-2 max pool of the unit's output region (ns, onr, onc, ch), onr and
 * onc even, plus bias[c] (or NULL) first, as the plain conv writes it: the pooled
 * values into `pooled` and the winners' corners (0 top left, 1 top right, 2, 3 below,
 * as T) into `corner`, both (ns, onr/2, onc/2, ch). */
WINO_INLINE void NAME(wino_pool_region)(T *out, ptrdiff_t ns, ptrdiff_t onr,
                                        ptrdiff_t onc, ptrdiff_t ch, const T *bias,
                                        T *pooled, T *corner)
{
    const ptrdiff_t pr = onr / 2, pc = onc / 2, row = onc * ch;
    if (bias)
        for (ptrdiff_t e = 0; e < ns * onr * onc; e++) {
            T *v = out + e * ch;
            #pragma omp simd
            for (ptrdiff_t c = 0; c < ch; c++) v[c] = v[c] + bias[c];
        }
    for (ptrdiff_t s = 0; s < ns; s++)
        for (ptrdiff_t r = 0; r < pr; r++)
            for (ptrdiff_t q = 0; q < pc; q++) {
                const T *a = out + ((s * onr + 2 * r) * onc + 2 * q) * ch;
                T *best = pooled + ((s * pr + r) * pc + q) * ch;
                T *at = corner + ((s * pr + r) * pc + q) * ch;
                memcpy(best, a, (size_t)ch * sizeof(T));
                memset(at, 0, (size_t)ch * sizeof(T));
                NAME(wino_max_step)(a + ch, best, at, 1, ch);
                NAME(wino_max_step)(a + row, best, at, 2, ch);
                NAME(wino_max_step)(a + row + ch, best, at, 3, ch);
            }
}

/* argmax (NCHW, planes of ph x pw, entries r * w + c of the conv output's plane, w = 2*pw)
 * of the unit's corners (ns, npr, npc, ch) at pooled rows [pr0, +npr), columns [pc0, +npc). */
static void NAME(wino_scatter_argmax)(const T *corner, ptrdiff_t ns, ptrdiff_t npr, ptrdiff_t npc,
                                      ptrdiff_t ch, ptrdiff_t pr0, ptrdiff_t pc0, ptrdiff_t ph,
                                      ptrdiff_t pw, int64_t *argmax)
{
    const ptrdiff_t w = 2 * pw;
    for (ptrdiff_t s = 0; s < ns; s++)
        for (ptrdiff_t c = 0; c < ch; c++)
            for (ptrdiff_t r = 0; r < npr; r++) {
                int64_t *dst = argmax + ((s * ch + c) * ph + pr0 + r) * pw + pc0;
                const T *src = corner + ((s * npr + r) * npc) * ch + c;
                for (ptrdiff_t q = 0; q < npc; q++) {
                    const int i = (int)src[q * ch];
                    dst[q] = (2 * (pr0 + r) + (i >> 1)) * w + 2 * (pc0 + q) + (i & 1);
                }
            }
}

/* One unit of the conv: y (NCHW) = its output; with `argmax` (not NULL; oh and ow even)
 * y is the output's 2x2 stride-2 max pool, (n, ch_out, oh/2, ow/2), and argmax its
 * winners as maxpool2d_forward gives them. */
WIDE_CLONES
static void NAME(wino_conv_unit)(const wino_plan *p, ptrdiff_t u, const T *x, const T *U,
                                 const T *bias, T *y, int64_t *argmax, const T *zeros, T *work,
                                 CAT(fnn_gemm_fn, S) gemm)
{
    const wino_unit q = wino_unit_at(p, u);
    const ptrdiff_t cin = p->ch_in, cout = p->ch_out;
    const ptrdiff_t tiles = q.ns * q.nty * q.ntx;
    T *region = work;
    T *V = region + p->ns * p->in_rows * p->in_cols * cin;
    T *M = V + 16 * p->tiles * cin;
    T *out = M + 16 * p->tiles * cout;
    T *outside = out + p->ns * p->out_rows * p->out_cols * cout;
    T *tmp = outside + cout;
    NAME(wino_unit_input)(p, &q, x, zeros, region, V, tmp);
    for (int xi = 0; xi < 16; xi++)   /* M[xi] (tiles, K) = V[xi] (tiles, C) @ U[xi] (C, K) */
        gemm(0, 0, (int)tiles, (int)cout, (int)cin, 1, V + xi * cin, (int)(16 * cin),
             U + xi * cin * cout, (int)cout, 0, M + xi * cout, (int)(16 * cout));
    ptrdiff_t o_lo, onr, oc_lo, onc;
    wino_unit_outputs(p, &q, &o_lo, &onr, &oc_lo, &onc);
    T *ptr[4];
    for (ptrdiff_t s = 0; s < q.ns; s++)
        for (ptrdiff_t ty = 0; ty < q.nty; ty++)
            for (ptrdiff_t tx = 0; tx < q.ntx; tx++) {
                const ptrdiff_t t = (s * q.nty + ty) * q.ntx + tx;
                NAME(wino_tile_outputs)(p, s, ty, tx, out, onr, onc, outside, ptr);
                NAME(wino_output_tile)(M + 16 * t * cout, ptr, tmp, cout);
            }
    if (argmax == NULL) {
        NAME(wino_scatter)(out, cout, p->oh, p->ow, q.ns, o_lo, onr, oc_lo, onc, bias,
                           y + q.s0 * cout * p->oh * p->ow);
        return;
    }
    /* the products M are done with: pooled values and corners go there */
    const ptrdiff_t ph = p->oh / 2, pw = p->ow / 2, pooled = q.ns * (onr / 2) * (onc / 2) * cout;
    NAME(wino_pool_region)(out, q.ns, onr, onc, cout, bias, M, M + pooled);
    NAME(wino_scatter)(M, cout, ph, pw, q.ns, o_lo / 2, onr / 2, oc_lo / 2, onc / 2, NULL,
                       y + q.s0 * cout * ph * pw);
    NAME(wino_scatter_argmax)(M + pooled, q.ns, onr / 2, onc / 2, cout, o_lo / 2, oc_lo / 2,
                              ph, pw, argmax + q.s0 * cout * ph * pw);
}

/* Adds the unit's products to P[xi] (K, C) and its grad_y sums to grad_b (K,). */
WIDE_CLONES
static void NAME(wino_grad_w_unit)(const wino_plan *p, ptrdiff_t u, const T *grad_y, const T *x,
                                   const T *zeros, T *work, T *P, T *grad_b,
                                   CAT(fnn_gemm_fn, S) gemm)
{
    const wino_unit q = wino_unit_at(p, u);
    const ptrdiff_t cin = p->ch_in, k = p->ch_out;
    const ptrdiff_t tiles = q.ns * q.nty * q.ntx;
    T *region = work;
    T *V = region + p->ns * p->in_rows * p->in_cols * cin;
    T *D = V + 16 * p->tiles * cin;
    T *gy = D + 16 * p->tiles * k;
    T *tmp = gy + p->ns * p->out_rows * p->out_cols * k + k;
    NAME(wino_unit_input)(p, &q, x, zeros, region, V, tmp);
    ptrdiff_t o_lo, onr, oc_lo, onc;
    wino_unit_outputs(p, &q, &o_lo, &onr, &oc_lo, &onc);
    NAME(wino_gather)(grad_y + q.s0 * k * p->oh * p->ow, k, p->oh, p->ow, q.ns, o_lo, onr,
                      oc_lo, onc, gy);
    for (ptrdiff_t e = 0; e < q.ns * onr * onc; e++) {       /* the unit's pixels, in order */
        const T *row = gy + e * k;
        #pragma omp simd
        for (ptrdiff_t kk = 0; kk < k; kk++) grad_b[kk] += row[kk];
    }
    const T *ptr[4];
    for (ptrdiff_t s = 0; s < q.ns; s++)
        for (ptrdiff_t ty = 0; ty < q.nty; ty++)
            for (ptrdiff_t tx = 0; tx < q.ntx; tx++) {
                const ptrdiff_t t = (s * q.nty + ty) * q.ntx + tx;
                /* the same pixel pointers, read here (zeros past the edge) */
                NAME(wino_tile_outputs)(p, s, ty, tx, gy, onr, onc, (T *)zeros, (T **)ptr);
                NAME(wino_grad_tile)(ptr, D + 16 * t * k, tmp, k);
            }
    for (int xi = 0; xi < 16; xi++)   /* P[xi] (K, C) += D[xi].T (K, tiles) @ V[xi] (tiles, C) */
        gemm(1, 0, (int)k, (int)cin, (int)tiles, 1, D + xi * k, (int)(16 * k),
             V + xi * cin, (int)(16 * cin), 1, P + xi * k * cin, (int)cin);
}

/* --- drivers -------------------------------------------------------------------- */

/* All units of a conv in parallel (dynamic: a thread that loses its core leaves
 * its units to the others), BLAS held to one thread. */
static void NAME(wino_conv)(const wino_plan *p, const T *x, const T *U, const T *bias, T *y,
                            int64_t *argmax, const T *zeros, T *work, int threads,
                            CAT(fnn_gemm_fn, S) gemm)
{
    const ptrdiff_t per_thread = wino_thread_elems(p);
    fnn_blas_single_begin();
    #pragma omp parallel for schedule(dynamic) num_threads(threads) if (FNN_OMP(threads > 1 && p->units > 1))
    for (ptrdiff_t u = 0; u < p->units; u++)
        NAME(wino_conv_unit)(p, u, x, U, bias, y, argmax, zeros,
                             work + fnn_thread_id() * per_thread, gemm);
    fnn_blas_single_end();
}

ptrdiff_t NAME(fnn_winograd_forward_workspace)(ptrdiff_t n, const fnn_geometry *g, ptrdiff_t k, int threads)
{
    const wino_plan p = wino_make_plan(n, g->c, g->h, g->w, g->ph, g->pw, g->oh, g->ow, k, sizeof(T));
    return 16 * g->c * k + wino_max(g->c, k) + threads * wino_thread_elems(&p);
}

void NAME(fnn_winograd_forward)(const T *x, ptrdiff_t n, const fnn_geometry *g, const T *w, ptrdiff_t k,
                                const T *bias, T *y, int64_t *argmax, T *work, int threads,
                                CAT(fnn_gemm_fn, S) gemm)
{
    const wino_plan p = wino_make_plan(n, g->c, g->h, g->w, g->ph, g->pw, g->oh, g->ow, k, sizeof(T));
    T *U = work, *zeros = U + 16 * g->c * k;
    NAME(wino_weights)(w, k, g->c, 0, U);
    memset(zeros, 0, (size_t)wino_max(g->c, k) * sizeof(T));
    NAME(wino_conv)(&p, x, U, bias, y, argmax, zeros, zeros + wino_max(g->c, k), threads, gemm);
}

/* The backward's plans: weight gradient over the forward's tiles, input gradient
 * as the conv of grad_y (K, oh, ow) with the flipped weights, padding 2 - p above and
 * on the left, giving (C, h, w) (when g's oh x ow are the first rows and columns of a
 * larger output, the outputs past them have no gradient: zeros). */
static void NAME(wino_backward_plans)(ptrdiff_t n, const fnn_geometry *g, ptrdiff_t k, wino_plan *pw,
                                      wino_plan *px)
{
    *pw = wino_make_plan(n, g->c, g->h, g->w, g->ph, g->pw, g->oh, g->ow, k, sizeof(T));
    *px = wino_make_plan(n, k, g->oh, g->ow, 2 - g->ph, 2 - g->pw, g->h, g->w, g->c, sizeof(T));
}

ptrdiff_t NAME(fnn_winograd_backward_workspace)(ptrdiff_t n, const fnn_geometry *g, ptrdiff_t k, int threads,
                                           int need_grad_x)
{
    wino_plan pw, px;
    NAME(wino_backward_plans)(n, g, k, &pw, &px);
    const ptrdiff_t chunks = wino_min(pw.units, WINO_CHUNKS), zeros = wino_max(g->c, k);
    const ptrdiff_t weights = chunks * (16 * k * g->c + k) + zeros + threads * wino_thread_elems(&pw);
    const ptrdiff_t inputs = 16 * k * g->c + zeros + threads * wino_thread_elems(&px);
    return need_grad_x ? wino_max(weights, inputs) : weights;
}

void NAME(fnn_winograd_backward)(const T *grad_y, const T *x, ptrdiff_t n, const fnn_geometry *g,
                                 const T *w, ptrdiff_t k, T *grad_x, T *grad_w, T *grad_b, T *work,
                                 int threads, CAT(fnn_gemm_fn, S) gemm)
{
    wino_plan pw, px;
    NAME(wino_backward_plans)(n, g, k, &pw, &px);
    const ptrdiff_t c = g->c, zero_count = wino_max(c, k), part = 16 * k * c + k;
    const ptrdiff_t chunks = wino_min(pw.units, WINO_CHUNKS);
    /* grad_w and grad_b: each chunk of units sums into its own partial (P, then
     * grad_b), whichever thread runs it; the partials are added in chunk order */
    T *parts = work, *zeros = parts + chunks * part, *mine = zeros + zero_count;
    const ptrdiff_t per_thread = wino_thread_elems(&pw);
    memset(zeros, 0, (size_t)zero_count * sizeof(T));
    fnn_blas_single_begin();
    #pragma omp parallel for schedule(dynamic) num_threads(threads) if (FNN_OMP(threads > 1 && chunks > 1))
    for (ptrdiff_t ch = 0; ch < chunks; ch++) {
        T *P = parts + ch * part;
        memset(P, 0, (size_t)part * sizeof(T));
        for (ptrdiff_t u = ch * pw.units / chunks; u < (ch + 1) * pw.units / chunks; u++)
            NAME(wino_grad_w_unit)(&pw, u, grad_y, x, zeros, mine + fnn_thread_id() * per_thread,
                                   P, P + 16 * k * c, gemm);
    }
    fnn_blas_single_end();
    for (ptrdiff_t ch = 1; ch < chunks; ch++)
        for (ptrdiff_t e = 0; e < part; e++) parts[e] += parts[ch * part + e];
    NAME(wino_weight_grads)(parts, k, c, grad_w);
    memcpy(grad_b, parts + 16 * k * c, (size_t)k * sizeof(T));
    if (grad_x == NULL)
        return;
    T *U = work;
    zeros = U + 16 * k * c;
    NAME(wino_weights)(w, k, c, 1, U);
    memset(zeros, 0, (size_t)zero_count * sizeof(T));
    NAME(wino_conv)(&px, grad_y, U, NULL, grad_x, NULL, zeros, zeros + zero_count, threads,
                    gemm);
}

#undef NAME
#undef CAT
#undef CAT_
