/* Body of the fastnn kernels for one element type. Included by fastnn_kernels.c
 * with T (the type), S (the name suffix) and EXP (its exp function) defined. */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(base) CAT(base, S)

/* Output columns [lo, hi) whose input column ow*sw + j - pw lies in [0, w). */
static void NAME(col_range)(const fnn_geometry *g, int j, ptrdiff_t *lo, ptrdiff_t *hi)
{
    ptrdiff_t first = g->pw - j;                 /* ow*sw >= first */
    ptrdiff_t last = g->w - 1 + g->pw - j;       /* ow*sw <= last  */
    *lo = first > 0 ? (first + g->sw - 1) / g->sw : 0;
    *hi = last >= 0 ? last / g->sw + 1 : 0;
    if (*hi > g->ow) *hi = g->ow;
    if (*hi < *lo) *hi = *lo;
}

/* Max-pooling comparisons without branches (random data mispredicts them):
 * beats() is 1 when v replaces best (strictly greater keeps the first maximum;
 * the first NaN wins, as in NumPy), pick() selects by bit masks. */
static inline int NAME(beats)(T v, T best)
{
    return (v > best) | ((v != v) & (best == best));
}

static inline T NAME(pick)(int take, T yes, T no)
{
    UINT a, b;
    const UINT mask = (UINT)0 - (UINT)take;
    memcpy(&a, &yes, sizeof a);
    memcpy(&b, &no, sizeof b);
    a = (a & mask) | (b & ~mask);
    T out;
    memcpy(&out, &a, sizeof out);
    return out;
}

static inline ptrdiff_t NAME(pick_index)(int take, ptrdiff_t yes, ptrdiff_t no)
{
    return no ^ ((no ^ yes) & -(ptrdiff_t)take);
}

/* One im2col row r = (c, i, j) of one sample: oh*ow values into dst. */
static void NAME(im2col_row)(const T *x, const fnn_geometry *g, ptrdiff_t r, T *dst)
{
    const ptrdiff_t ch = r / (g->kh * g->kw);
    const int i = (int)((r / g->kw) % g->kh), j = (int)(r % g->kw);
    ptrdiff_t lo, hi;
    NAME(col_range)(g, j, &lo, &hi);
    for (ptrdiff_t oh = 0; oh < g->oh; oh++, dst += g->ow) {
        const ptrdiff_t hin = oh * g->sh + i - g->ph;
        if (hin < 0 || hin >= g->h) {
            memset(dst, 0, (size_t)g->ow * sizeof(T));
            continue;
        }
        const T *src = x + (ch * g->h + hin) * g->w + j - g->pw;   /* src[ow*sw] */
        for (ptrdiff_t ow = 0; ow < lo; ow++) dst[ow] = 0;
        if (g->sw == 1)
            memcpy(dst + lo, src + lo, (size_t)(hi - lo) * sizeof(T));
        else
            for (ptrdiff_t ow = lo; ow < hi; ow++) dst[ow] = src[ow * g->sw];
        for (ptrdiff_t ow = hi; ow < g->ow; ow++) dst[ow] = 0;
    }
}

void NAME(fnn_im2col)(const T *x, ptrdiff_t n, const fnn_geometry *g, T *cols, ptrdiff_t ld,
                      int parallel)
{
    const ptrdiff_t rows = g->c * g->kh * g->kw, ohw = g->oh * g->ow, chw = g->c * g->h * g->w;
    #pragma omp parallel for collapse(2) schedule(static) if (FNN_OMP(parallel))
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t s = 0; s < n; s++)
            NAME(im2col_row)(x + s * chw, g, r, cols + r * ld + s * ohw);
}

void NAME(fnn_im2row)(const T *x_hwc, const fnn_geometry *g, T *rows, int parallel)
{
    const ptrdiff_t c = g->c, kkc = g->kh * g->kw * c;
    #pragma omp parallel for schedule(static) if (FNN_OMP(parallel))
    for (ptrdiff_t oh = 0; oh < g->oh; oh++)
        for (ptrdiff_t ow = 0; ow < g->ow; ow++) {
            T *dst = rows + (oh * g->ow + ow) * kkc;
            const ptrdiff_t w0 = ow * g->sw - g->pw;          /* input column of j = 0 */
            /* the in-bounds j of a kernel row are contiguous in x_hwc: one copy each */
            const ptrdiff_t j_lo = w0 < 0 ? -w0 : 0;
            ptrdiff_t j_hi = g->w - w0;
            if (j_hi > g->kw) j_hi = g->kw;
            if (j_hi < j_lo) j_hi = j_lo;
            for (int i = 0; i < g->kh; i++, dst += g->kw * c) {
                const ptrdiff_t hin = oh * g->sh + i - g->ph;
                if (hin < 0 || hin >= g->h) {
                    memset(dst, 0, (size_t)(g->kw * c) * sizeof(T));
                    continue;
                }
                if (j_lo) memset(dst, 0, (size_t)(j_lo * c) * sizeof(T));
                memcpy(dst + j_lo * c, x_hwc + (hin * g->w + w0 + j_lo) * c,
                       (size_t)((j_hi - j_lo) * c) * sizeof(T));
                if (j_hi < g->kw) memset(dst + j_hi * c, 0, (size_t)((g->kw - j_hi) * c) * sizeof(T));
            }
        }
}

#ifndef TRANSPOSE_BLOCK4
/* out[i*ldo + j] = a[j*lda + i] (+ bias[i]) for a 4x4 block (SSE for float). */
static inline void NAME(transpose_block4)(const T *a, ptrdiff_t lda, T *out, ptrdiff_t ldo,
                                          const T *bias)
{
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            out[i * ldo + j] = bias ? a[j * lda + i] + bias[i] : a[j * lda + i];
}
#define TRANSPOSE_BLOCK4_T NAME(transpose_block4)
#else
#define TRANSPOSE_BLOCK4_T TRANSPOSE_BLOCK4
#endif

/* Tiles of a (rows, cols) -> out (cols, rows), adding bias[c] to out row c when bias
 * is non-NULL, in 4x4 blocks (SSE shuffles for float). Wide a (rows <= cols): 16x16
 * tiles. Tall a (rows > cols, e.g. a conv's (OH*OW, K) output): the output lines lie
 * rows*sizeof(T) apart, 4 KiB for 1024 rows, and a tile's lines share L1 sets, so
 * tiles of 64 rows x 4 columns, written along out's rows. 1024x64 floats: 10 us
 * against 130 us (16x16 scalar tiles) and 20 us (32x4 scalar); 64x1024: 10 against
 * 28 us. Edges that do not fill a 4x4 block are copied one value at a time. */
static void NAME(transpose_tiles)(const T *a, ptrdiff_t rows, ptrdiff_t cols, const T *bias, T *out,
                                  int parallel)
{
    const int tall = rows > cols;
    const ptrdiff_t tile_r = tall ? 64 : 16, tile_c = tall ? 4 : 16;
    #pragma omp parallel for collapse(2) schedule(static) if (FNN_OMP(parallel))
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += tile_r)
        for (ptrdiff_t c0 = 0; c0 < cols; c0 += tile_c) {
            const ptrdiff_t r1 = r0 + tile_r < rows ? r0 + tile_r : rows;
            const ptrdiff_t c1 = c0 + tile_c < cols ? c0 + tile_c : cols;
            const ptrdiff_t r4 = r0 + (r1 - r0) / 4 * 4, c4 = c0 + (c1 - c0) / 4 * 4;
            if (tall) {
                for (ptrdiff_t c = c0; c < c4; c += 4)
                    for (ptrdiff_t r = r0; r < r4; r += 4)
                        TRANSPOSE_BLOCK4_T(a + r * cols + c, cols, out + c * rows + r, rows,
                                           bias ? bias + c : NULL);
            } else {
                for (ptrdiff_t r = r0; r < r4; r += 4)
                    for (ptrdiff_t c = c0; c < c4; c += 4)
                        TRANSPOSE_BLOCK4_T(a + r * cols + c, cols, out + c * rows + r, rows,
                                           bias ? bias + c : NULL);
            }
            /* the ragged edges: rows [r4, r1) of every column, columns [c4, c1) above */
            for (ptrdiff_t r = r0; r < r1; r++)
                for (ptrdiff_t c = (r < r4 ? c4 : c0); c < c1; c++)
                    out[c * rows + r] = bias ? a[r * cols + c] + bias[c] : a[r * cols + c];
        }
}
#undef TRANSPOSE_BLOCK4_T

void NAME(fnn_transpose)(const T *a, ptrdiff_t rows, ptrdiff_t cols, T *out, int parallel)
{
    NAME(transpose_tiles)(a, rows, cols, NULL, out, parallel);
}

void NAME(fnn_transpose_bias)(const T *a, ptrdiff_t rows, ptrdiff_t cols, const T *bias, T *out,
                              int parallel)
{
    NAME(transpose_tiles)(a, rows, cols, bias, out, parallel);
}

void NAME(fnn_col2im)(const T *cols, ptrdiff_t n, const fnn_geometry *g, T *x, ptrdiff_t ld,
                      int parallel)
{
    const ptrdiff_t ohw = g->oh * g->ow, hw = g->h * g->w;
    #pragma omp parallel for collapse(2) schedule(static) if (FNN_OMP(parallel))
    for (ptrdiff_t s = 0; s < n; s++)
        for (ptrdiff_t ch = 0; ch < g->c; ch++) {
            T *plane = x + (s * g->c + ch) * hw;
            memset(plane, 0, (size_t)hw * sizeof(T));
            for (int i = 0; i < g->kh; i++)
                for (int j = 0; j < g->kw; j++) {
                    const ptrdiff_t r = (ch * g->kh + i) * g->kw + j;
                    const T *src = cols + r * ld + s * ohw;
                    ptrdiff_t lo, hi;
                    NAME(col_range)(g, j, &lo, &hi);
                    for (ptrdiff_t oh = 0; oh < g->oh; oh++, src += g->ow) {
                        const ptrdiff_t hin = oh * g->sh + i - g->ph;
                        if (hin < 0 || hin >= g->h) continue;
                        T *dst = plane + hin * g->w + j - g->pw;   /* dst[ow*sw] */
                        if (g->sw == 1)
                            for (ptrdiff_t ow = lo; ow < hi; ow++) dst[ow] += src[ow];
                        else
                            for (ptrdiff_t ow = lo; ow < hi; ow++) dst[ow * g->sw] += src[ow];
                    }
                }
        }
}

void NAME(fnn_pad_rows)(const T *a, ptrdiff_t planes, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t wp, T *out)
{
    const ptrdiff_t len = (oh - 1) * wp + ow;
    for (ptrdiff_t p = 0; p < planes; p++)
        for (ptrdiff_t r = 0; r < oh; r++) {
            T *dst = out + p * len + r * wp;
            memcpy(dst, a + (p * oh + r) * ow, (size_t)ow * sizeof(T));
            if (r + 1 < oh)
                for (ptrdiff_t q = ow; q < wp; q++) dst[q] = 0;
        }
}

void NAME(fnn_col2im_rows)(const T *cols, const fnn_geometry *g, T *x, T *work)
{
    const ptrdiff_t hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw;
    const ptrdiff_t len = (g->oh - 1) * wp + g->ow, hw = g->h * g->w;
    const int padded = g->ph || g->pw;
    for (ptrdiff_t ch = 0; ch < g->c; ch++) {
        T *plane = padded ? work : x + ch * hw;       /* (hp, wp) */
        memset(plane, 0, (size_t)(hp * wp) * sizeof(T));
        for (int i = 0; i < g->kh; i++)
            for (int j = 0; j < g->kw; j++) {
                const T *src = cols + ((ch * g->kh + i) * g->kw + j) * len;
                T *dst = plane + i * wp + j;
                for (ptrdiff_t q = 0; q < len; q++) dst[q] += src[q];
            }
        if (padded)
            for (ptrdiff_t r = 0; r < g->h; r++)
                memcpy(x + ch * hw + r * g->w, plane + (r + g->ph) * wp + g->pw,
                       (size_t)g->w * sizeof(T));
    }
}

/* A pooling call's arguments, for the ranges of planes fnn_split hands out. */
typedef struct {
    const T *x, *grad_y;
    const int64_t *argmax_in;
    T *y;
    int64_t *argmax;
    ptrdiff_t h, w, oh, ow, bad;
    int kh, kw, sh, sw, zeroed;
} NAME(pool_args);

static void NAME(maxpool2d_forward_planes)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(pool_args) *a = (const NAME(pool_args) *)args;
    const ptrdiff_t h = a->h, w = a->w, oh = a->oh, ow = a->ow;
    const int kh = a->kh, kw = a->kw, sh = a->sh, sw = a->sw;
    for (ptrdiff_t p = lo; p < hi; p++) {
        const T *xp = a->x + p * h * w;
        T *yp = a->y + p * oh * ow;
        int64_t *ap = a->argmax + p * oh * ow;
        if (kh == 2 && kw == 2 && sh == 2 && sw == 2) {     /* the common case, unrolled */
            for (ptrdiff_t r = 0; r < oh; r++) {
                const T *top = xp + 2 * r * w, *bot = top + w;
                ptrdiff_t q = 0;
#ifdef MAXPOOL2X2_ROW
                if (h * w <= INT32_MAX)        /* indices in 32-bit lanes */
                    q = MAXPOOL2X2_ROW(top, w, ow, 2 * r * w, yp + r * ow, ap + r * ow);
#endif
                for (; q < ow; q++) {
                    const ptrdiff_t at = 2 * r * w + 2 * q;
                    const T a = top[2 * q], b = top[2 * q + 1];
                    const T c = bot[2 * q], d = bot[2 * q + 1];
                    int take = NAME(beats)(b, a);
                    T best = NAME(pick)(take, b, a);
                    ptrdiff_t where = at + take;
                    take = NAME(beats)(c, best);
                    best = NAME(pick)(take, c, best);
                    where = NAME(pick_index)(take, at + w, where);
                    take = NAME(beats)(d, best);
                    yp[r * ow + q] = NAME(pick)(take, d, best);
                    ap[r * ow + q] = NAME(pick_index)(take, at + w + 1, where);
                }
            }
            continue;
        }
        for (ptrdiff_t r = 0; r < oh; r++)
            for (ptrdiff_t q = 0; q < ow; q++) {
                ptrdiff_t where = r * sh * w + q * sw;
                T best = xp[where];
                for (int i = 0; i < kh; i++) {
                    const T *row = xp + (r * sh + i) * w + q * sw;
                    for (int j = 0; j < kw; j++) {
                        const int take = NAME(beats)(row[j], best);
                        best = NAME(pick)(take, row[j], best);
                        where = NAME(pick_index)(take, (r * sh + i) * w + q * sw + j, where);
                    }
                }
                yp[r * ow + q] = best;
                ap[r * ow + q] = where;
            }
    }
}

void NAME(fnn_maxpool2d_forward)(const T *x, ptrdiff_t planes, ptrdiff_t h, ptrdiff_t w, int kh, int kw,
                                 int sh, int sw, T *y, int64_t *argmax)
{
    NAME(pool_args) a = {.x = x, .y = y, .argmax = argmax, .h = h, .w = w,
                         .oh = (h - kh) / sh + 1, .ow = (w - kw) / sw + 1,
                         .kh = kh, .kw = kw, .sh = sh, .sw = sw};
    fnn_split(NAME(maxpool2d_forward_planes), &a, planes, fnn_split_block(h * w));
}

/* One plane whose 2x2 cells tile it (h = 2 * oh, w = 2 * ow) and whose argmax entries
 * each lie in their own output's cell: then no two outputs reach one input, and each
 * cell is written whole, grad_y where argmax points (0 + g, as the scatter-add into
 * zeros: -0.0 becomes 0.0) and 0 elsewhere: one pass, no memset. Returns 0, without
 * having finished, where an entry lies outside its cell (the caller scatters then). */
static int NAME(maxpool2d_backward_cells)(const T *restrict gy, const int64_t *restrict ap,
                                          ptrdiff_t oh, ptrdiff_t ow, T *restrict gx)
{
    const ptrdiff_t w = 2 * ow;
    for (ptrdiff_t r = 0; r < oh; r++) {
        T *restrict top = gx + 2 * r * w, *restrict bot = top + w;
        int outside = 0;
        ptrdiff_t q = 0;
#ifdef MAXPOOL2X2_CELLS_ROW
        if (oh * w <= INT32_MAX / 2)        /* indices in 32-bit lanes */
            q = MAXPOOL2X2_CELLS_ROW(gy + r * ow, ap + r * ow, ow, w, 2 * r * w, top);
        if (q < 0) return 0;
#endif
        for (; q < ow; q++) {
            /* branch-free (the maximum's corner is data: a branch on it missed a
             * quarter of the time, 4x slower): g's bits masked into each corner */
            const int64_t d = ap[r * ow + q] - (2 * r * w + 2 * q);
            const T g = gy[r * ow + q] + (T)0;
            UINT bits, v[4];
            memcpy(&bits, &g, sizeof bits);
            outside |= !(d == 0) & !(d == 1) & !(d == w) & !(d == w + 1);
            v[0] = bits & -(UINT)(d == 0);
            v[1] = bits & -(UINT)(d == 1);
            v[2] = bits & -(UINT)(d == w);
            v[3] = bits & -(UINT)(d == w + 1);
            memcpy(top + 2 * q, v, 2 * sizeof(T));
            memcpy(bot + 2 * q, v + 2, 2 * sizeof(T));
        }
        if (outside) return 0;
    }
    return 1;
}

static void NAME(maxpool2d_backward_planes)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    NAME(pool_args) *a = (NAME(pool_args) *)args;
    const ptrdiff_t ohw = a->oh * a->ow, hw = a->h * a->w;
    const int cells = a->h == 2 * a->oh && a->w == 2 * a->ow;
    ptrdiff_t bad = 0;
    for (ptrdiff_t p = lo; p < hi; p++) {
        T *gx = a->y + p * hw;
        const T *gy = a->grad_y + p * ohw;
        const int64_t *ap = a->argmax_in + p * ohw;
        if (cells && NAME(maxpool2d_backward_cells)(gy, ap, a->oh, a->ow, gx)) continue;
        if (!a->zeroed || cells) memset(gx, 0, (size_t)hw * sizeof(T));
        for (ptrdiff_t k = 0; k < ohw; k++) {
            const int64_t at = ap[k];
            if (at < 0 || at >= hw) { bad++; continue; }
            gx[at] += gy[k];
        }
    }
    if (bad) __atomic_fetch_add(&a->bad, bad, __ATOMIC_RELAXED);
}

ptrdiff_t NAME(fnn_maxpool2d_backward)(const T *grad_y, const int64_t *argmax, ptrdiff_t planes,
                                       ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t h, ptrdiff_t w,
                                       T *grad_x, int zeroed)
{
    NAME(pool_args) a = {.grad_y = grad_y, .argmax_in = argmax, .y = grad_x, .h = h, .w = w,
                         .oh = oh, .ow = ow, .bad = 0, .zeroed = zeroed};
    fnn_split(NAME(maxpool2d_backward_planes), &a, planes, fnn_split_block(h * w));
    return a.bad;
}

/* Average pooling, in the reference's order (fastnn/kernels/_reference.py): per plane,
 * y = the window's (0, 0) element, then += each other offset (i, j) in row-major
 * order, then *= scale; the backward zeroes grad_x and adds grad_y * scale at each
 * offset in the same order. The same bits as the reference; each offset's loop over
 * a row of outputs is a strided sweep the compiler vectorizes. */
static void NAME(avgpool2d_forward_planes)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(pool_args) *a = (const NAME(pool_args) *)args;
    const ptrdiff_t h = a->h, w = a->w, oh = a->oh, ow = a->ow;
    const int kh = a->kh, kw = a->kw, sh = a->sh, sw = a->sw;
    const T scale = (T)(1.0 / ((double)kh * kw));
    for (ptrdiff_t p = lo; p < hi; p++) {
        const T *restrict xp = a->x + p * h * w;
        T *restrict yp = a->y + p * oh * ow;
        if (kh == 2 && kw == 2 && sh == 2 && sw == 2) {    /* the common case, one pass */
            for (ptrdiff_t r = 0; r < oh; r++) {
                const T *restrict top = xp + 2 * r * w, *restrict bot = top + w;
                T *restrict out = yp + r * ow;
                for (ptrdiff_t q = 0; q < ow; q++)
                    out[q] = (((top[2 * q] + top[2 * q + 1]) + bot[2 * q]) + bot[2 * q + 1])
                             * scale;
            }
            continue;
        }
        for (int i = 0; i < kh; i++)
            for (int j = 0; j < kw; j++)
                for (ptrdiff_t r = 0; r < oh; r++) {
                    const T *restrict row = xp + (r * sh + i) * w + j;
                    T *restrict out = yp + r * ow;
                    if (i == 0 && j == 0)
                        for (ptrdiff_t q = 0; q < ow; q++) out[q] = row[q * sw];
                    else if (sw == 2)    /* the usual stride: a constant the compiler vectorizes */
                        for (ptrdiff_t q = 0; q < ow; q++) out[q] += row[2 * q];
                    else
                        for (ptrdiff_t q = 0; q < ow; q++) out[q] += row[q * sw];
                }
        for (ptrdiff_t k = 0; k < oh * ow; k++) yp[k] *= scale;
    }
}

void NAME(fnn_avgpool2d_forward)(const T *x, ptrdiff_t planes, ptrdiff_t h, ptrdiff_t w, int kh, int kw,
                                 int sh, int sw, T *y)
{
    NAME(pool_args) a = {.x = x, .y = y, .h = h, .w = w, .oh = (h - kh) / sh + 1,
                         .ow = (w - kw) / sw + 1, .kh = kh, .kw = kw, .sh = sh, .sw = sw};
    fnn_split(NAME(avgpool2d_forward_planes), &a, planes, fnn_split_block(h * w));
}

/* One plane of the backward. grad_y * scale is rounded before it is added, as in the
 * reference: no multiply-add may be fused (FASTNN_NATIVE builds have FMA). */
#ifndef __clang__
__attribute__((optimize("fp-contract=off")))
#endif
static void NAME(avgpool2d_backward_plane)(const T *restrict gy, ptrdiff_t h, ptrdiff_t w, int kh,
                                           int kw, int sh, int sw, ptrdiff_t oh, ptrdiff_t ow,
                                           T scale, T *restrict gx)
{
    if (kh == 2 && kw == 2 && sh == 2 && sw == 2) {     /* the common case, one pass */
        if (h % 2 || w % 2)             /* a last row or column in no window */
            memset(gx, 0, (size_t)(h * w) * sizeof(T));
        for (ptrdiff_t r = 0; r < oh; r++) {
            T *restrict top = gx + 2 * r * w, *restrict bot = top + w;
            for (ptrdiff_t q = 0; q < ow; q++) {
                const T share = gy[r * ow + q] * scale + (T)0;   /* + 0: -0.0 -> 0.0 */
                top[2 * q] = top[2 * q + 1] = bot[2 * q] = bot[2 * q + 1] = share;
            }
        }
        return;
    }
    memset(gx, 0, (size_t)(h * w) * sizeof(T));
    for (int i = 0; i < kh; i++)
        for (int j = 0; j < kw; j++)
            for (ptrdiff_t r = 0; r < oh; r++) {
                const T *restrict share = gy + r * ow;
                T *restrict row = gx + (r * sh + i) * w + j;
                if (sw == 2)
                    for (ptrdiff_t q = 0; q < ow; q++) row[2 * q] += share[q] * scale;
                else
                    for (ptrdiff_t q = 0; q < ow; q++) row[q * sw] += share[q] * scale;
            }
}

static void NAME(avgpool2d_backward_planes)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(pool_args) *a = (const NAME(pool_args) *)args;
    const T scale = (T)(1.0 / ((double)a->kh * a->kw));
    for (ptrdiff_t p = lo; p < hi; p++)
        NAME(avgpool2d_backward_plane)(a->grad_y + p * a->oh * a->ow, a->h, a->w, a->kh, a->kw,
                                       a->sh, a->sw, a->oh, a->ow, scale, a->y + p * a->h * a->w);
}

void NAME(fnn_avgpool2d_backward)(const T *grad_y, ptrdiff_t planes, ptrdiff_t h, ptrdiff_t w, int kh,
                                  int kw, int sh, int sw, T *grad_x)
{
    NAME(pool_args) a = {.grad_y = grad_y, .y = grad_x, .h = h, .w = w, .oh = (h - kh) / sh + 1,
                         .ow = (w - kw) / sw + 1, .kh = kh, .kw = kw, .sh = sh, .sw = sw};
    fnn_split(NAME(avgpool2d_backward_planes), &a, planes, fnn_split_block(h * w));
}

/* An element-wise pass's arrays, for the ranges fnn_split hands out. */
typedef struct { const T *a, *b; T *out; } NAME(elementwise_args);

static void NAME(relu_forward_range)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(elementwise_args) *e = (const NAME(elementwise_args) *)args;
    const T *x = e->a;
    T *y = e->out;
    for (ptrdiff_t i = lo; i < hi; i++)
        y[i] = x[i] < 0 ? (T)0 : x[i];
}

void NAME(fnn_relu_forward)(const T *x, T *y, ptrdiff_t n)
{
    NAME(elementwise_args) e = {x, NULL, y};
    fnn_split(NAME(relu_forward_range), &e, n, FNN_SPLIT_ELEMENTS);
}

static inline void NAME(relu_backward_run)(const T *restrict grad_y, const T *restrict y,
                                           T *restrict grad_x, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        const T g = grad_y[i];     /* loaded unconditionally, so the loop vectorizes */
        grad_x[i] = y[i] > 0 ? g : (T)0;
    }
}

static void NAME(relu_backward_range)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(elementwise_args) *e = (const NAME(elementwise_args) *)args;
    NAME(relu_backward_run)(e->a + lo, e->b + lo, e->out + lo, hi - lo);
}

void NAME(fnn_relu_backward)(const T *grad_y, const T *y, T *grad_x, ptrdiff_t n)
{
    NAME(elementwise_args) e = {grad_y, y, grad_x};
    fnn_split(NAME(relu_backward_range), &e, n, FNN_SPLIT_ELEMENTS);
}

void NAME(fnn_leaky_relu_forward)(const T *x, T *y, ptrdiff_t n, T alpha)
{
    #pragma omp parallel for schedule(static) if (FNN_OMP(n >= FNN_PARALLEL_MIN))
    for (ptrdiff_t i = 0; i < n; i++) {
        const T v = x[i];
        y[i] = v > 0 ? v : v * alpha;
    }
}

void NAME(fnn_leaky_relu_backward)(const T *grad_y, const T *x, T *grad_x, ptrdiff_t n, T alpha)
{
    #pragma omp parallel for schedule(static) if (FNN_OMP(n >= FNN_PARALLEL_MIN))
    for (ptrdiff_t i = 0; i < n; i++) {
        const T g = grad_y[i];
        grad_x[i] = x[i] > 0 ? g : g * alpha;
    }
}

/* Inverted dropout: element i is kept (mask = scale) when the counter-based uniform
 * u(seed, i) >= p, else dropped (mask = 0); y = x * mask. u is the CUDA kernel's
 * (fastnn/kernels/_cuda.py): splitmix64's finaliser of seed + (i + 1) * golden,
 * u = (z >> 11) / 2^53, so a seed gives the same mask on every backend and thread
 * count. keep_from = ceil(p * 2^53): u >= p exactly when z >> 11 >= keep_from. */
void NAME(fnn_dropout_forward)(const T *x, T *y, T *mask, ptrdiff_t n, uint64_t keep_from,
                               T scale, uint64_t seed)
{
#ifdef DROPOUT_AVX512
    if (AVX512DQ_OK()) {
        #pragma omp parallel for schedule(static) if (FNN_OMP(n >= FNN_PARALLEL_MIN))
        for (ptrdiff_t b = 0; b < n; b += 65536)
            DROPOUT_AVX512(x + b, y + b, mask + b, n - b < 65536 ? n - b : 65536, b,
                           keep_from, scale, seed);
        return;
    }
#endif
    #pragma omp parallel for schedule(static) if (FNN_OMP(n >= FNN_PARALLEL_MIN))
    for (ptrdiff_t i = 0; i < n; i++) {
        uint64_t z = seed + ((uint64_t)i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        /* kept: z >> 11 >= keep_from, both below 2^53, so the difference's sign bit is
         * clear; as arithmetic, not a comparison, which GCC turns into a branch that
         * misses half the time (64 x 256 floats: 34 -> 26 us) */
        const T m = scale * (T)(1 - (((z >> 11) - keep_from) >> 63));
        mask[i] = m;
        y[i] = x[i] * m;
    }
}

void NAME(fnn_multiply)(const T *a, const T *b, T *out, ptrdiff_t n)
{
    #pragma omp parallel for schedule(static) if (FNN_OMP(n >= FNN_PARALLEL_MIN))
    for (ptrdiff_t i = 0; i < n; i++) out[i] = a[i] * b[i];
}

/* BatchNorm on x viewed as (n, c, s): channel ch holds x[(i*c + ch)*s + k]. Sums run in
 * double, in 8 fixed lanes (then added in order): no dependence on threads, and no
 * float32 round-off growing with the batch. */
#define BN_LANES 8

static inline void NAME(bn_sum)(const T *a, ptrdiff_t len, double lanes[BN_LANES])
{
    ptrdiff_t k = 0;
    for (; k + BN_LANES <= len; k += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) lanes[j] += (double)a[k + j];
    for (; k < len; k++) lanes[k % BN_LANES] += (double)a[k];
}

static inline void NAME(bn_sum_sq)(const T *a, ptrdiff_t len, double mu, double lanes[BN_LANES])
{
    ptrdiff_t k = 0;
    for (; k + BN_LANES <= len; k += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) {
            const double d = (double)a[k + j] - mu;
            lanes[j] += d * d;
        }
    for (; k < len; k++) {
        const double d = (double)a[k] - mu;
        lanes[k % BN_LANES] += d * d;
    }
}

static inline void NAME(bn_sum_pair)(const T *g, const T *xh, ptrdiff_t len, double sg[BN_LANES],
                                     double sgx[BN_LANES])
{
    ptrdiff_t k = 0;
    for (; k + BN_LANES <= len; k += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) {
            sg[j] += (double)g[k + j];
            sgx[j] += (double)g[k + j] * (double)xh[k + j];
        }
    for (; k < len; k++) {
        sg[k % BN_LANES] += (double)g[k];
        sgx[k % BN_LANES] += (double)g[k] * (double)xh[k];
    }
}

static inline double NAME(bn_total)(const double lanes[BN_LANES])
{
    double t = 0;
    for (int j = 0; j < BN_LANES; j++) t += lanes[j];
    return t;
}

/* A BatchNorm call's arrays, for the ranges of channels (statistics, sums) or samples
 * (the element-wise passes) that fnn_split hands out. */
typedef struct {
    const T *x, *grad_y, *x_hat, *gamma, *beta, *inv_std, *mean_in, *var_in;
    const T *relu_y;            /* backward: a fused ReLU's output (mask), or NULL */
    T *mean, *var, *y, *out, *grad_gamma, *grad_beta;
    ptrdiff_t n, c, s;
    int relu;                   /* forward: y = max(y, 0), relu_forward's rule */
} NAME(bn_args);

WIDE_CLONES
static void NAME(bn_stats_channels)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(bn_args) *a = (const NAME(bn_args) *)args;
    const ptrdiff_t n = a->n, c = a->c, s = a->s;
    const double count = (double)n * s;
    for (ptrdiff_t ch = lo; ch < hi; ch++) {
        double lanes[BN_LANES] = {0};
        for (ptrdiff_t i = 0; i < n; i++) NAME(bn_sum)(a->x + (i * c + ch) * s, s, lanes);
        const double mu = NAME(bn_total)(lanes) / count;
        for (int j = 0; j < BN_LANES; j++) lanes[j] = 0;
        for (ptrdiff_t i = 0; i < n; i++) NAME(bn_sum_sq)(a->x + (i * c + ch) * s, s, mu, lanes);
        a->mean[ch] = (T)mu;
        a->var[ch] = (T)(NAME(bn_total)(lanes) / count);
    }
}

void NAME(fnn_batchnorm_stats)(const T *restrict x, ptrdiff_t n, ptrdiff_t c, ptrdiff_t s,
                               T *restrict mean, T *restrict var, double *restrict work)
{
    const double count = (double)n * s;
    if (s == 1) {          /* (N, C): whole rows at a time, one double sum per channel */
        double *mu = work, *sq = work + c;
        for (ptrdiff_t ch = 0; ch < c; ch++) mu[ch] = sq[ch] = 0;
        for (ptrdiff_t i = 0; i < n; i++)
            for (ptrdiff_t ch = 0; ch < c; ch++) mu[ch] += (double)x[i * c + ch];
        for (ptrdiff_t ch = 0; ch < c; ch++) mu[ch] /= count;
        for (ptrdiff_t i = 0; i < n; i++)
            for (ptrdiff_t ch = 0; ch < c; ch++) {
                const double d = (double)x[i * c + ch] - mu[ch];
                sq[ch] += d * d;
            }
        for (ptrdiff_t ch = 0; ch < c; ch++) {
            mean[ch] = (T)mu[ch];
            var[ch] = (T)(sq[ch] / count);
        }
        return;
    }
    NAME(bn_args) a = {.x = x, .mean = mean, .var = var, .n = n, .c = c, .s = s};
    fnn_split(NAME(bn_stats_channels), &a, c, fnn_split_block(n * s));
}

/* inv_std = 1 / sqrt(var + eps) per channel; x_hat = (x - mean) * inv_std and
 * y = gamma * x_hat + beta, each operation rounded to T (no fused multiply-add);
 * relu: then y = max(y, 0) as relu_forward (-0.0 and NaN kept), the ReLU fused. */
static inline void NAME(bn_apply_run)(const T *restrict xs, ptrdiff_t s, T mu, T inv, T ga, T be,
                                      int relu, T *restrict hs, T *restrict ys)
{
    if (relu)
        for (ptrdiff_t k = 0; k < s; k++) {
            const T h = (xs[k] - mu) * inv, v = ga * h + be;
            hs[k] = h;
            ys[k] = v < 0 ? (T)0 : v;
        }
    else
        for (ptrdiff_t k = 0; k < s; k++) {
            const T h = (xs[k] - mu) * inv;
            hs[k] = h;
            ys[k] = ga * h + be;
        }
}

WIDE_CLONES     /* fp-contract=off in both clones */
static void NAME(bn_apply_samples)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(bn_args) *a = (const NAME(bn_args) *)args;
    const ptrdiff_t c = a->c, s = a->s;
    for (ptrdiff_t i = lo; i < hi; i++)
        for (ptrdiff_t ch = 0; ch < c; ch++) {
            const ptrdiff_t at = (i * c + ch) * s;
            NAME(bn_apply_run)(a->x + at, s, a->mean_in[ch], a->inv_std[ch], a->gamma[ch],
                               a->beta[ch], a->relu, a->out + at, a->y + at);
        }
}

#ifndef __clang__
__attribute__((optimize("fp-contract=off")))
#endif
void NAME(fnn_batchnorm_apply)(const T *restrict x, ptrdiff_t n, ptrdiff_t c, ptrdiff_t s,
                               const T *restrict mean, const T *restrict var, T eps,
                               const T *restrict gamma, const T *restrict beta,
                               T *restrict inv_std, T *restrict x_hat, T *restrict y, int relu)
{
    for (ptrdiff_t ch = 0; ch < c; ch++)
        inv_std[ch] = (T)1 / (T)sqrt((double)(var[ch] + eps));
    if (s == 1) {          /* (N, C): a row of channels at a time */
        for (ptrdiff_t i = 0; i < n; i++) {
            const T *restrict xs = x + i * c;
            T *restrict hs = x_hat + i * c, *restrict ys = y + i * c;
            for (ptrdiff_t ch = 0; ch < c; ch++) {
                const T h = (xs[ch] - mean[ch]) * inv_std[ch], v = gamma[ch] * h + beta[ch];
                hs[ch] = h;
                ys[ch] = relu && v < 0 ? (T)0 : v;
            }
        }
        return;
    }
    NAME(bn_args) a = {.x = x, .mean_in = mean, .inv_std = inv_std, .gamma = gamma,
                       .beta = beta, .out = x_hat, .y = y, .n = n, .c = c, .s = s,
                       .relu = relu};
    fnn_split(NAME(bn_apply_samples), &a, n, fnn_split_block(c * s));
}

WIDE_CLONES
static void NAME(bn_backward_sums)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(bn_args) *a = (const NAME(bn_args) *)args;
    const ptrdiff_t n = a->n, c = a->c, s = a->s;
    for (ptrdiff_t ch = lo; ch < hi; ch++) {
        double sg[BN_LANES] = {0}, sgx[BN_LANES] = {0};
        for (ptrdiff_t i = 0; i < n; i++) {
            const ptrdiff_t at = (i * c + ch) * s;
            const T *g = a->grad_y + at;
            if (a->relu_y) {      /* the ReLU's backward into grad_x, summed from there */
                NAME(relu_backward_run)(g, a->relu_y + at, a->out + at, s);
                g = a->out + at;
            }
            NAME(bn_sum_pair)(g, a->x_hat + at, s, sg, sgx);
        }
        a->grad_beta[ch] = (T)NAME(bn_total)(sg);
        a->grad_gamma[ch] = (T)NAME(bn_total)(sgx);
    }
}

/* grad_x of samples [lo, hi), once grad_gamma and grad_beta are summed; grad_y may be
 * grad_x itself (a fused ReLU's backward wrote it there). */
WIDE_CLONES     /* fp-contract=off in both clones */
static void NAME(bn_backward_samples)(void *args, ptrdiff_t lo, ptrdiff_t hi)
{
    const NAME(bn_args) *a = (const NAME(bn_args) *)args;
    const ptrdiff_t c = a->c, s = a->s;
    const T inv_count = (T)(1.0 / ((double)a->n * s));
    for (ptrdiff_t i = lo; i < hi; i++)
        for (ptrdiff_t ch = 0; ch < c; ch++) {
            const T scale = a->gamma[ch] * a->inv_std[ch];
            const T mean_g = a->grad_beta[ch] * inv_count, mean_gx = a->grad_gamma[ch] * inv_count;
            const T *gs = a->grad_y + (i * c + ch) * s;
            const T *restrict hs = a->x_hat + (i * c + ch) * s;
            T *out = a->out + (i * c + ch) * s;
            for (ptrdiff_t k = 0; k < s; k++)
                out[k] = scale * ((gs[k] - mean_g) - hs[k] * mean_gx);
        }
}

/* Training backward: grad_beta = sum(grad_y), grad_gamma = sum(grad_y * x_hat) per
 * channel (double), then grad_x = gamma * inv_std * (grad_y - grad_beta / m -
 * x_hat * grad_gamma / m), m = n * s values per channel. work: 2 * c doubles.
 * relu_y (or NULL): the output of a ReLU fused into the forward; grad_y then first
 * takes that ReLU's backward (grad_y where relu_y > 0, else 0): into grad_x, in the
 * pass that sums it, then read from there. */
#ifndef __clang__
__attribute__((optimize("fp-contract=off")))
#endif
void NAME(fnn_batchnorm_backward)(const T *restrict grad_y, const T *restrict x_hat, ptrdiff_t n,
                                  ptrdiff_t c, ptrdiff_t s, const T *restrict gamma,
                                  const T *restrict inv_std, T *restrict grad_x,
                                  T *restrict grad_gamma, T *restrict grad_beta,
                                  double *restrict work, const T *restrict relu_y)
{
    const T inv_count = (T)(1.0 / ((double)n * s));
    NAME(bn_args) a = {.grad_y = grad_y, .x_hat = x_hat, .gamma = gamma, .inv_std = inv_std,
                       .out = grad_x, .grad_gamma = grad_gamma, .grad_beta = grad_beta,
                       .relu_y = relu_y, .n = n, .c = c, .s = s};
    if (s == 1) {
        double *sg = work, *sgx = work + c;
        const T *g = grad_y;
        if (relu_y) {      /* (N, C) rows: the ReLU's backward into grad_x first */
            NAME(relu_backward_run)(grad_y, relu_y, grad_x, n * c);
            g = grad_x;
        }
        for (ptrdiff_t ch = 0; ch < c; ch++) sg[ch] = sgx[ch] = 0;
        for (ptrdiff_t i = 0; i < n; i++)
            for (ptrdiff_t ch = 0; ch < c; ch++) {
                sg[ch] += (double)g[i * c + ch];
                sgx[ch] += (double)g[i * c + ch] * (double)x_hat[i * c + ch];
            }
        for (ptrdiff_t ch = 0; ch < c; ch++) {
            grad_beta[ch] = (T)sg[ch];
            grad_gamma[ch] = (T)sgx[ch];
        }
        /* a row of channels at a time, the same operations; gs may be grad_x itself */
        for (ptrdiff_t i = 0; i < n; i++) {
            const T *gs = g + i * c, *restrict hs = x_hat + i * c;
            T *out = grad_x + i * c;
            for (ptrdiff_t ch = 0; ch < c; ch++)
                out[ch] = (gamma[ch] * inv_std[ch])
                          * ((gs[ch] - grad_beta[ch] * inv_count)
                             - hs[ch] * (grad_gamma[ch] * inv_count));
        }
        return;
    }
    fnn_split(NAME(bn_backward_sums), &a, c, fnn_split_block(n * s));
    if (relu_y) a.grad_y = grad_x;         /* the masked grad_y, written by the sums */
    fnn_split(NAME(bn_backward_samples), &a, n, fnn_split_block(c * s));
}

double NAME(fnn_softmax_xent)(const T *logits, ptrdiff_t n, ptrdiff_t c, const int64_t *labels,
                              const T *target, T *grad, double *row_loss, int64_t *predicted)
{
    const T inv_n = (T)(1.0 / (double)n);
#ifdef SOFTMAX_ROW
    const int fast = AVX512_OK();
#endif
    #pragma omp parallel for schedule(static) if (FNN_OMP(n * c >= FNN_PARALLEL_MIN))
    for (ptrdiff_t i = 0; i < n; i++) {
        const T *z = logits + i * c;
        T *g = grad + i * c;
#ifdef SOFTMAX_ROW
        if (fast) {
            row_loss[i] = SOFTMAX_ROW(z, c, labels ? labels[i] : 0, labels ? NULL : target + i * c,
                                      g, inv_n, predicted ? predicted + i : NULL);
            continue;
        }
#endif
        /* "omp simd" allows the reordered (vectorized) max and sum */
        T top = z[0];
        #pragma omp simd reduction(max:top)
        for (ptrdiff_t j = 1; j < c; j++) top = z[j] > top ? z[j] : top;   /* a NaN still makes NaN below */
        #pragma omp simd
        for (ptrdiff_t j = 0; j < c; j++) g[j] = EXP(z[j] - top);
        double total = 0;
        #pragma omp simd reduction(+:total)
        for (ptrdiff_t j = 0; j < c; j++) total += g[j];
        const double log_total = log(total);
        const T inv_total = (T)(1.0 / total);
        double loss = 0;
        if (labels) {
            loss = -((double)(z[labels[i]] - top) - log_total);
            for (ptrdiff_t j = 0; j < c; j++) g[j] = g[j] * inv_total * inv_n;
            g[labels[i]] -= inv_n;
        } else {
            const T *t = target + i * c;
            for (ptrdiff_t j = 0; j < c; j++) {
                loss -= (double)t[j] * ((double)(z[j] - top) - log_total);
                g[j] = (g[j] * inv_total - t[j]) * inv_n;
            }
        }
        row_loss[i] = loss;
        if (predicted) {
            ptrdiff_t best = 0;
            for (ptrdiff_t j = 1; j < c; j++)
                best = z[j] > z[best] ? j : best;
            predicted[i] = best;
        }
    }
    double loss = 0;   /* summed in a fixed order: the same loss for any thread count */
    for (ptrdiff_t i = 0; i < n; i++) loss += row_loss[i];
    return loss / (double)n;
}

void NAME(fnn_column_sums)(const T *a, ptrdiff_t rows, ptrdiff_t cols, T *out)
{
    for (ptrdiff_t j = 0; j < cols; j++) out[j] = 0;
    for (ptrdiff_t i = 0; i < rows; i++) {
        const T *row = a + i * cols;
        for (ptrdiff_t j = 0; j < cols; j++) out[j] += row[j];
    }
}

/* A value is NaN or infinite when its exponent bits are all ones, i.e. when its bits
 * without the sign are at least those of infinity: one max over unsigned integers,
 * which vectorizes. No temporary array, unlike np.isfinite(x).all(), whose 47 MB
 * boolean array for MNIST's 60000 x 784 floats took 140 ms on first use (fresh
 * pages) and 15 ms after; here 14 ms, bound by memory bandwidth. */
int NAME(fnn_all_finite)(const T *a, ptrdiff_t n)
{
#ifdef ALL_FINITE_AVX512
    if (AVX512_OK())
        return ALL_FINITE_AVX512(a, n);
#endif
    enum { BLOCK = 16384 };
    const UINT magnitude = (UINT)-1 >> 1;
    T inf = (T)INFINITY;
    UINT inf_bits;
    memcpy(&inf_bits, &inf, sizeof inf_bits);
    for (ptrdiff_t start = 0; start < n; start += BLOCK) {
        ptrdiff_t stop = n - start < BLOCK ? n : start + BLOCK;
        UINT largest = 0;
        for (ptrdiff_t i = start; i < stop; i++) {
            UINT bits;
            memcpy(&bits, a + i, sizeof bits);
            bits &= magnitude;
            largest = bits > largest ? bits : largest;
        }
        if (largest >= inf_bits)
            return 0;
    }
    return 1;
}

/* Each row summed in 16 interleaved partial sums (lane l takes j = l mod 16), combined
 * in a fixed tree, then the tail: vectorizes, and the order depends only on cols. One
 * running sum was a chain of dependent adds (4 cycles each): LeNet's conv1 grad_b,
 * 64 x 6 rows of 784, took about 350 us of its 660 us backward on one thread. */
void NAME(fnn_row_sums)(const T *a, ptrdiff_t rows, ptrdiff_t cols, T *out, int accumulate)
{
    enum { LANES = 16 };
    for (ptrdiff_t i = 0; i < rows; i++) {
        const T *row = a + i * cols;
        T part[LANES] = {0};
        ptrdiff_t j = 0;
        for (; j + LANES <= cols; j += LANES)
            for (int l = 0; l < LANES; l++) part[l] += row[j + l];
        for (int width = LANES / 2; width > 0; width /= 2)
            for (int l = 0; l < width; l++) part[l] += part[l + width];
        T total = part[0];
        for (; j < cols; j++) total += row[j];
        out[i] = accumulate ? out[i] + total : total;
    }
}

void NAME(fnn_broadcast)(T *a, const T *value, ptrdiff_t rows, ptrdiff_t cols, int per_row)
{
    for (ptrdiff_t i = 0; i < rows; i++) {
        T *row = a + i * cols;
        if (per_row)
            for (ptrdiff_t j = 0; j < cols; j++) row[j] = value[i];
        else
            memcpy(row, value, (size_t)cols * sizeof(T));
    }
}

#undef NAME
#undef CAT
#undef CAT_
