# fastnn/kernels/cpu/norm.pxi -- included by _cpu.pyx.
#
# Normalisation and dropout: batchnorm_forward/backward (statistics in double,
# fixed lanes, two passes) and dropout_forward/backward (the CUDA module's
# counter-based masks). Threading: BatchNorm's (N, C, ...) passes split their
# channels (sums) or samples (element-wise) over the worker pool inside the C kernels
# from FNN_SPLIT_ELEMENTS elements (fnn_split), (N, C) runs on one thread; dropout
# OpenMP from FNN_PARALLEL_MIN elements, one thread below.

# --- dropout (the layer's CPU path; the same calls and masks as the CUDA module's) -----

def dropout_forward(cnp.ndarray x, double p, seed):
    """Inverted dropout of x (C-contiguous), p in [0, 1) -> (y, mask), mask = 1/(1-p)
    where the counter-based uniform of (seed, element index) is >= p, else 0; the
    CUDA module's masks, bit for bit."""
    _float_input("dropout_forward", "x", x)
    cdef cnp.ndarray y = _output_array((<object>x).shape, x.dtype)
    cdef cnp.ndarray mask = _output_array((<object>x).shape, x.dtype)
    cdef uint64_t keep_from = <uint64_t>math.ceil(p * 9007199254740992.0)
    cdef uint64_t s = <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF)
    cdef double scale = x.dtype.type(1.0 / (1.0 - p))
    cdef Py_ssize_t n = x.size
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef void *pm = _data(mask)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_dropout_forward_f(<float*>px, <float*>py, <float*>pm, n, keep_from,
                                  <float>scale, s)
        else:
            fnn_dropout_forward_d(<double*>px, <double*>py, <double*>pm, n, keep_from, scale, s)
    return y, mask


def dropout_backward(cnp.ndarray grad_y, cnp.ndarray mask):
    """grad_x = grad_y * mask (both C-contiguous, one shape and dtype)."""
    cdef int t = _float_input("dropout_backward", "grad_y", grad_y)
    _need("dropout_backward", "mask", mask, t, (<object>grad_y).shape)
    cdef cnp.ndarray grad_x = _output_array((<object>grad_y).shape, grad_y.dtype)
    cdef Py_ssize_t n = grad_y.size
    cdef void *pg = _data(grad_y)
    cdef void *pm = _data(mask)
    cdef void *px = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_multiply_f(<float*>pg, <float*>pm, <float*>px, n)
        else:
            fnn_multiply_d(<double*>pg, <double*>pm, <double*>px, n)
    return grad_x


cdef cnp.ndarray _channels(str who, str name, a, Py_ssize_t c, dtype):
    """``a`` as a C-contiguous (C,) array of ``dtype``, else ValueError."""
    cdef cnp.ndarray out = np.ascontiguousarray(a, dtype)
    if out.ndim != 1 or out.shape[0] != c:
        raise ValueError(f"{who}: {name} must have shape ({c},), got {np.shape(a)}")
    return out


# --- batch normalisation (the layers' CPU path; the same calls as the CUDA module's) ---

def batchnorm_forward(cnp.ndarray x, gamma, beta, double eps, mean=None, var=None,
                      bint relu=False):
    """x: (N, C) or (N, C, ...) C-contiguous; gamma, beta: (C,) -> (y, x_hat, mean, var,
    inv_std). With ``mean``/``var`` None (training) the batch's mean and biased variance
    per channel (double sums, two passes), else the given (running) statistics.
    ``relu``: y = relu_forward(y), fused into the pass that writes y."""
    who = "batchnorm_forward"
    _float_input(who, "x", x)
    if x.ndim < 2:
        raise ValueError(f"{who}: x must be (N, C) or (N, C, ...), got shape {(<object>x).shape}")
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1]
    cdef Py_ssize_t s = x.size // (n * c) if n * c else 0
    dtype = x.dtype
    gamma, beta = _channels(who, "gamma", gamma, c, dtype), _channels(who, "beta", beta, c, dtype)
    training = mean is None
    if training:
        mean, var = np.empty(c, dtype), np.empty(c, dtype)
    else:
        mean, var = _channels(who, "mean", mean, c, dtype), _channels(who, "var", var, c, dtype)
    cdef cnp.ndarray work = np.empty(2 * c, np.float64)
    cdef cnp.ndarray inv_std = np.empty(c, dtype)
    cdef cnp.ndarray x_hat = _output_array((<object>x).shape, dtype)
    cdef cnp.ndarray y = _output_array((<object>x).shape, dtype)
    cdef void *px = _data(x)
    cdef void *pm = _data(<cnp.ndarray>mean)
    cdef void *pv = _data(<cnp.ndarray>var)
    cdef void *pga = _data(<cnp.ndarray>gamma)
    cdef void *pbe = _data(<cnp.ndarray>beta)
    cdef void *pinv = _data(inv_std)
    cdef void *ph = _data(x_hat)
    cdef void *py = _data(y)
    cdef double *pw = <double*>_data(work)
    cdef bint single = _is_float32(x), stats = training
    with nogil:
        if single:
            if stats:
                fnn_batchnorm_stats_f(<float*>px, n, c, s, <float*>pm, <float*>pv, pw)
            fnn_batchnorm_apply_f(<float*>px, n, c, s, <float*>pm, <float*>pv, <float>eps,
                                  <float*>pga, <float*>pbe, <float*>pinv, <float*>ph,
                                  <float*>py, relu)
        else:
            if stats:
                fnn_batchnorm_stats_d(<double*>px, n, c, s, <double*>pm, <double*>pv, pw)
            fnn_batchnorm_apply_d(<double*>px, n, c, s, <double*>pm, <double*>pv, eps,
                                  <double*>pga, <double*>pbe, <double*>pinv, <double*>ph,
                                  <double*>py, relu)
    return y, x_hat, mean, var, inv_std


def batchnorm_backward(cnp.ndarray grad_y, cnp.ndarray x_hat, gamma, cnp.ndarray inv_std,
                       cnp.ndarray relu_y=None):
    """Training-mode backward -> (grad_x, grad_gamma, grad_beta); grad_y and x_hat of one
    shape, C-contiguous. ``relu_y`` (the same shape, or None): the output of a ReLU fused
    into the forward, whose backward grad_y takes first (relu_backward, on the fly)."""
    who = "batchnorm_backward"
    cdef int t = _float_input(who, "grad_y", grad_y)
    if grad_y.ndim < 2:
        raise ValueError(f"{who}: grad_y must be (N, C) or (N, C, ...), got shape "
                         f"{(<object>grad_y).shape}")
    _need(who, "x_hat", x_hat, t, (<object>grad_y).shape)
    if relu_y is not None:
        _need(who, "relu_y", relu_y, t, (<object>grad_y).shape)
    cdef Py_ssize_t n = grad_y.shape[0], c = grad_y.shape[1]
    cdef Py_ssize_t s = grad_y.size // (n * c) if n * c else 0
    dtype = grad_y.dtype
    gamma = _channels(who, "gamma", gamma, c, dtype)
    inv_std = _channels(who, "inv_std", inv_std, c, dtype)
    cdef cnp.ndarray work = np.empty(2 * c, np.float64)
    cdef cnp.ndarray grad_x = _output_array((<object>grad_y).shape, dtype)
    cdef cnp.ndarray grad_gamma = np.empty(c, dtype)
    cdef cnp.ndarray grad_beta = np.empty(c, dtype)
    cdef void *pg = _data(grad_y)
    cdef void *ph = _data(x_hat)
    cdef void *pga = _data(<cnp.ndarray>gamma)
    cdef void *pinv = _data(inv_std)
    cdef void *pgx = _data(grad_x)
    cdef void *pgg = _data(grad_gamma)
    cdef void *pgb = _data(grad_beta)
    cdef double *pw = <double*>_data(work)
    cdef void *pry = NULL if relu_y is None else _data(relu_y)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_batchnorm_backward_f(<float*>pg, <float*>ph, n, c, s, <float*>pga, <float*>pinv,
                                     <float*>pgx, <float*>pgg, <float*>pgb, pw, <float*>pry)
        else:
            fnn_batchnorm_backward_d(<double*>pg, <double*>ph, n, c, s, <double*>pga,
                                     <double*>pinv, <double*>pgx, <double*>pgg, <double*>pgb,
                                     pw, <double*>pry)
    return grad_x, grad_gamma, grad_beta
