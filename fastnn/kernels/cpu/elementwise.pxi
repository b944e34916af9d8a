# fastnn/kernels/cpu/elementwise.pxi -- included by _cpu.pyx.
#
# Element-wise and row-wise kernels: ReLU, leaky ReLU, softmax cross-entropy and
# all_finite (csrc/fastnn_kernels.c, csrc/avx512.c). Threading: ReLU in ranges of
# FNN_SPLIT_ELEMENTS (2^16) over the worker pool inside the C kernels (fnn_split),
# leaky ReLU OpenMP from FNN_PARALLEL_MIN (2^21) elements, one thread below;
# all_finite in blocks over the worker pool from FINITE_SPLIT_MIN elements.

# Variants (op "row_kernels", fastnn/kernels/variants.py): float32 softmax
# cross-entropy rows, finiteness checks and dropout masks in AVX-512 lanes where the
# CPU has them ("avx512", fnn_avx512_rows = 1, the default) or on the portable loops.
ROW_KERNEL_VARIANTS = {"avx512": 1, "portable": 2}


# --- ReLU -------------------------------------------------------------------------

def relu_forward(cnp.ndarray x, cnp.ndarray out=None):
    """y = max(x, 0) in one pass (into ``out``, which may be x); over the worker pool
    above FNN_SPLIT_ELEMENTS elements."""
    cdef int t = _float_input("relu_forward", "x", x)
    if out is not None:
        _need("relu_forward", "out", out, t, (<object>x).shape, True)
    cdef cnp.ndarray y = _output_array((<object>x).shape, x.dtype) if out is None else out
    cdef Py_ssize_t n = x.size
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_relu_forward_f(<float*>px, <float*>py, n)
        else:
            fnn_relu_forward_d(<double*>px, <double*>py, n)
    return y


def relu_backward(cnp.ndarray grad_y, cnp.ndarray y, cnp.ndarray out=None):
    """grad_x = grad_y where y > 0, else 0, in one pass (into ``out``, which may be
    grad_y or y)."""
    cdef int t = _float_input("relu_backward", "grad_y", grad_y)
    _need("relu_backward", "y", y, t, (<object>grad_y).shape)
    if out is not None:
        _need("relu_backward", "out", out, t, (<object>grad_y).shape, True)
    cdef cnp.ndarray grad_x = (_output_array((<object>grad_y).shape, grad_y.dtype) if out is None
                               else out)
    cdef Py_ssize_t n = grad_y.size
    cdef void *pg = _data(grad_y)
    cdef void *py = _data(y)
    cdef void *px = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_relu_backward_f(<float*>pg, <float*>py, <float*>px, n)
        else:
            fnn_relu_backward_d(<double*>pg, <double*>py, <double*>px, n)
    return grad_x


def leaky_relu_forward(cnp.ndarray x, double alpha):
    """y = x where x > 0, else alpha * x (alpha rounded to x's dtype), in one pass."""
    _float_input("leaky_relu_forward", "x", x)
    cdef cnp.ndarray y = _output_array((<object>x).shape, x.dtype)
    cdef Py_ssize_t n = x.size
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_leaky_relu_forward_f(<float*>px, <float*>py, n, <float>alpha)
        else:
            fnn_leaky_relu_forward_d(<double*>px, <double*>py, n, alpha)
    return y


def leaky_relu_backward(cnp.ndarray grad_y, cnp.ndarray x, double alpha):
    """grad_x = grad_y where x > 0, else alpha * grad_y, in one pass."""
    cdef int t = _float_input("leaky_relu_backward", "grad_y", grad_y)
    _need("leaky_relu_backward", "x", x, t, (<object>grad_y).shape)
    cdef cnp.ndarray grad_x = _output_array((<object>grad_y).shape, grad_y.dtype)
    cdef Py_ssize_t n = grad_y.size
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(x)
    cdef void *pgx = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_leaky_relu_backward_f(<float*>pg, <float*>px, <float*>pgx, n, <float>alpha)
        else:
            fnn_leaky_relu_backward_d(<double*>pg, <double*>px, <double*>pgx, n, alpha)
    return grad_x


DEF FINITE_BLOCKS = 64               # most blocks of an all_finite over the pool
DEF FINITE_SPLIT_MIN = 2097152       # elements from which it is split


ctypedef struct _finite_job:
    const void *x
    Py_ssize_t n, block
    bint single
    int ok[FINITE_BLOCKS]            # per block: 1 when all its elements are finite


cdef void _finite_task(void *ctx, Py_ssize_t block) noexcept nogil:
    cdef _finite_job *job = <_finite_job*>ctx
    cdef Py_ssize_t lo = block * job.block
    cdef Py_ssize_t count = min(job.block, job.n - lo)
    if job.single:
        job.ok[block] = fnn_all_finite_f(<const float*>job.x + lo, count)
    else:
        job.ok[block] = fnn_all_finite_d(<const double*>job.x + lo, count)


def all_finite(cnp.ndarray x):
    """True when no element of x (float32 or float64, C-contiguous) is NaN or infinite:
    one pass, no temporary array; in blocks over the worker pool from FINITE_SPLIT_MIN
    elements (MNIST's 60000 x 784 floats, which fit checks on entry: 14 ms on one
    thread, bound by one core's memory bandwidth)."""
    cdef _finite_job job
    cdef Py_ssize_t blocks = 1, b
    _float_input("all_finite", "x", x)
    job.n = x.size
    job.x = _data(x)
    job.single = x.itemsize == 4
    if job.n >= FINITE_SPLIT_MIN:
        blocks = min(FINITE_BLOCKS, job.n // (FINITE_SPLIT_MIN // 2))
    job.block = (job.n + blocks - 1) // blocks if job.n else 1
    blocks = (job.n + job.block - 1) // job.block
    with nogil:
        fnn_pool_run(_finite_task, &job, blocks)
    for b in range(blocks):
        if not job.ok[b]:
            return False
    return True


# --- softmax cross-entropy -----------------------------------------------------------

cdef int _check_labels(const int64_t *labels, Py_ssize_t n, Py_ssize_t c) except -1:
    """Refuse class indices outside [0, c): the kernel would index out of its row."""
    cdef Py_ssize_t k, bad = 0
    with nogil:
        for k in range(n):
            bad += labels[k] < 0 or labels[k] >= c
    if bad:
        raise ValueError(f"softmax_cross_entropy: {bad} labels lie outside [0, {c})")
    return 0


def softmax_cross_entropy(cnp.ndarray logits, cnp.ndarray labels):
    """logits (N, C), labels int64 (N,) or probabilities (N, C) -> (mean loss, grad (N, C)).

    Fused: one pass per row (max, exp, sum, log), the loss summed in float64."""
    cdef int t = _float_input("softmax_cross_entropy", "logits", logits, (None, None))
    cdef Py_ssize_t n = logits.shape[0], c = logits.shape[1]
    if labels is not None and labels.ndim == 1:
        _need("softmax_cross_entropy", "labels", labels, cnp.NPY_INT64, (n,))
        _check_labels(<int64_t*>_data(labels), n, c)
    else:
        _need("softmax_cross_entropy", "labels", labels, t, (n, c))
    cdef cnp.ndarray grad = _output_array((n, c), logits.dtype)
    cdef cnp.ndarray row_loss = np.empty(n, dtype=np.float64)
    cdef bint by_index = labels.ndim == 1
    cdef void *pz = _data(logits)
    cdef void *pg = _data(grad)
    cdef double *pr = <double*>_data(row_loss)
    cdef int64_t *pi = <int64_t*>_data(labels) if by_index else NULL
    cdef void *pt = NULL if by_index else _data(labels)
    cdef double loss
    cdef bint single = _is_float32(logits)
    with nogil:
        if single:
            loss = fnn_softmax_xent_f(<float*>pz, n, c, pi, <float*>pt, <float*>pg, pr, NULL)
        else:
            loss = fnn_softmax_xent_d(<double*>pz, n, c, pi, <double*>pt, <double*>pg, pr, NULL)
    return logits.dtype.type(loss), grad
