# fastnn/kernels/cpu/augment.pxi -- included by _cpu.pyx.
#
# The augmentation layers' copies: random_translate (each sample shifted, the rest
# filled) and random_flip (each sample reversed along H and/or W). The random draws
# are the layers' (fastnn/layers/augment.py); these are plain copies, one thread,
# row by row (memcpy where the row is not reversed).

cdef void _translate_rows(const floating *x, floating *y, Py_ssize_t planes, Py_ssize_t h,
                          Py_ssize_t w, Py_ssize_t dy, Py_ssize_t dx,
                          floating fill) noexcept nogil:
    """planes (C, H, W) planes of one sample: y[i, j] = x[i - dy, j - dx] or fill;
    |dy| <= h, |dx| <= w."""
    cdef Py_ssize_t p, i, j, si
    cdef Py_ssize_t j0 = dx if dx > 0 else 0
    cdef Py_ssize_t j1 = w + dx if dx < 0 else w      # columns [j0, j1) come from x
    cdef floating *row
    for p in range(planes):
        for i in range(h):
            row = y + (p * h + i) * w
            si = i - dy
            if si < 0 or si >= h or j1 <= j0:
                for j in range(w):
                    row[j] = fill
                continue
            for j in range(j0):
                row[j] = fill
            memcpy(row + j0, x + (p * h + si) * w + j0 - dx, (j1 - j0) * sizeof(floating))
            for j in range(j1, w):
                row[j] = fill


cdef void _flip_rows(const floating *x, floating *y, Py_ssize_t planes, Py_ssize_t h,
                     Py_ssize_t w, bint vertical, bint horizontal) noexcept nogil:
    """planes (H, W) planes of one sample, reversed along H if vertical, W if horizontal."""
    cdef Py_ssize_t p, i, j
    cdef const floating *src
    cdef floating *row
    for p in range(planes):
        for i in range(h):
            src = x + (p * h + (h - 1 - i if vertical else i)) * w
            row = y + (p * h + i) * w
            if horizontal:
                for j in range(w):
                    row[j] = src[w - 1 - j]
            else:
                memcpy(row, src, w * sizeof(floating))


cdef tuple _per_sample(str who, str name, cnp.ndarray x, cnp.ndarray pairs):
    """Checks x (N, C, H, W) and pairs (N, 2) int64 -> (N, C, H, W, y)."""
    _float_input(who, "x", x, (None, None, None, None))
    _need(who, name, pairs, cnp.NPY_INT64, (x.shape[0], 2))
    return (x.shape[0], x.shape[1], x.shape[2], x.shape[3],
            _output_array((<object>x).shape, x.dtype))


def random_translate(cnp.ndarray x, cnp.ndarray shifts, double fill):
    """x: (N, C, H, W), shifts: (N, 2) int64 within [-H, H] x [-W, W] -> y, y[n, :, i, j]
    = x[n, :, i - dy, j - dx] where that pixel exists, else fill."""
    cdef Py_ssize_t n, c, h, w, s, dy, dx, size
    n, c, h, w, y = _per_sample("random_translate", "shifts", x, shifts)
    cdef const int64_t *ps = <const int64_t*>_data(shifts)
    for s in range(n):
        if not (-h <= ps[2 * s] <= h and -w <= ps[2 * s + 1] <= w):
            raise ValueError(f"random_translate: shifts[{s}] = ({ps[2 * s]}, {ps[2 * s + 1]}) "
                             f"is outside [-{h}, {h}] x [-{w}, {w}]")
    cdef char *px = <char*>_data(x)
    cdef char *py = <char*>_data(<cnp.ndarray>y)
    cdef Py_ssize_t sample = c * h * w * x.itemsize
    cdef bint single = _is_float32(x)
    with nogil:
        for s in range(n):
            dy, dx = ps[2 * s], ps[2 * s + 1]
            if single:
                _translate_rows(<float*>(px + s * sample), <float*>(py + s * sample),
                                c, h, w, dy, dx, <float>fill)
            else:
                _translate_rows(<double*>(px + s * sample), <double*>(py + s * sample),
                                c, h, w, dy, dx, fill)
    return y


def random_flip(cnp.ndarray x, cnp.ndarray flips):
    """x: (N, C, H, W), flips: (N, 2) int64 -> y: sample n reversed along H where
    flips[n, 0] != 0, along W where flips[n, 1] != 0."""
    cdef Py_ssize_t n, c, h, w, s
    n, c, h, w, y = _per_sample("random_flip", "flips", x, flips)
    cdef const int64_t *pf = <const int64_t*>_data(flips)
    cdef char *px = <char*>_data(x)
    cdef char *py = <char*>_data(<cnp.ndarray>y)
    cdef Py_ssize_t sample = c * h * w * x.itemsize
    cdef bint single = _is_float32(x)
    with nogil:
        for s in range(n):
            if single:
                _flip_rows(<float*>(px + s * sample), <float*>(py + s * sample), c, h, w,
                           pf[2 * s] != 0, pf[2 * s + 1] != 0)
            else:
                _flip_rows(<double*>(px + s * sample), <double*>(py + s * sample), c, h, w,
                           pf[2 * s] != 0, pf[2 * s + 1] != 0)
    return y
