# fastnn/kernels/cpu/pooling.pxi -- included by _cpu.pyx.
#
# Max and average pooling, forward and backward (csrc/kernels_template.h); global
# average pooling (here, one thread: it reads each input once).
# Threading: max and average pooling split their (sample, channel) planes into
# ranges of about FNN_SPLIT_ELEMENTS elements over the worker pool (fnn_split, inside
# the C kernels), one thread for smaller arrays; a plane is never split, so the
# backward's scatter-add has no races.

cdef tuple _pool_output(str who, Py_ssize_t h, Py_ssize_t w, int kh, int kw, tuple stride):
    """(OH, OW, sh, sw) of kh x kw windows with ``stride`` on an H x W plane; ValueError
    for windows the plane cannot hold or a stride below 1 or above INT_MAX."""
    sh, sw = stride
    if not (1 <= kh <= h and 1 <= kw <= w and 1 <= sh <= INT_MAX and 1 <= sw <= INT_MAX):
        raise ValueError(f"{who}: {kh}x{kw} windows with stride {stride} do not fit a "
                         f"{h}x{w} input (windows of 1 to the input size, strides of 1 "
                         f"to {INT_MAX})")
    return (h - kh) // sh + 1, (w - kw) // sw + 1, sh, sw


cdef tuple _image_shape_for(str who, x_shape, cnp.ndarray grad_y):
    """``x_shape`` as 4 ints (N, C, H, W), N and C those of ``grad_y``, else ValueError."""
    x_shape = tuple(int(d) for d in x_shape)
    if len(x_shape) != 4 or min(x_shape) < 0 or x_shape[:2] != (<object>grad_y).shape[:2]:
        raise ValueError(f"{who}: x_shape must be (N, C, H, W) with the N and C of grad_y "
                         f"{(<object>grad_y).shape}, got {x_shape}")
    return x_shape


# --- max pooling -------------------------------------------------------------------

def maxpool2d_forward(cnp.ndarray x, int kh, int kw, tuple stride):
    """x: (N, C, H, W) -> (y, argmax int64), (N, C, OH, OW); parallel over (n, c) planes."""
    _float_input("maxpool2d_forward", "x", x, (None, None, None, None))
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef int sh, sw
    cdef Py_ssize_t oh, ow
    oh, ow, sh, sw = _pool_output("maxpool2d_forward", h, w, kh, kw, stride)
    cdef cnp.ndarray y = _output_array((n, c, oh, ow), x.dtype)
    cdef cnp.ndarray argmax = _output_array((n, c, oh, ow), np.int64)
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef int64_t *pa = <int64_t*>_data(argmax)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_maxpool2d_forward_f(<float*>px, n * c, h, w, kh, kw, sh, sw, <float*>py, pa)
        else:
            fnn_maxpool2d_forward_d(<double*>px, n * c, h, w, kh, kw, sh, sw, <double*>py, pa)
    return y, argmax


def maxpool2d_backward(cnp.ndarray grad_y, cnp.ndarray argmax, tuple x_shape):
    """grad_y, argmax: (N, C, OH, OW) -> grad_x: (N, C, H, W); parallel over planes,
    so the scatter-add of overlapping windows has no races."""
    cdef int t = _float_input("maxpool2d_backward", "grad_y", grad_y, (None, None, None, None))
    _need("maxpool2d_backward", "argmax", argmax, cnp.NPY_INT64, (<object>grad_y).shape)
    x_shape = _image_shape_for("maxpool2d_backward", x_shape, grad_y)
    cdef Py_ssize_t planes = x_shape[0] * x_shape[1], h = x_shape[2], w = x_shape[3]
    cdef Py_ssize_t oh = grad_y.shape[2], ow = grad_y.shape[3], bad
    # each plane zeroed by the kernel just before its scatter (the memory may be reused)
    cdef cnp.ndarray grad_x = _output_array(x_shape, grad_y.dtype)
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(grad_x)
    cdef int64_t *pa = <int64_t*>_data(argmax)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            bad = fnn_maxpool2d_backward_f(<float*>pg, pa, planes, oh, ow, h, w, <float*>px, 0)
        else:
            bad = fnn_maxpool2d_backward_d(<double*>pg, pa, planes, oh, ow, h, w, <double*>px, 0)
    if bad:
        raise ValueError(f"maxpool2d_backward: {bad} argmax entries lie outside [0, {h * w}) "
                         f"(a {x_shape[2]}x{x_shape[3]} plane); was argmax made for x_shape {x_shape}?")
    return grad_x


def avgpool2d_forward(cnp.ndarray x, int kh, int kw, tuple stride):
    """x: (N, C, H, W) -> y: (N, C, OH, OW), each window's mean; parallel over planes."""
    _float_input("avgpool2d_forward", "x", x, (None, None, None, None))
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef int sh, sw
    cdef Py_ssize_t oh, ow
    oh, ow, sh, sw = _pool_output("avgpool2d_forward", h, w, kh, kw, stride)
    cdef cnp.ndarray y = _output_array((n, c, oh, ow), x.dtype)
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            fnn_avgpool2d_forward_f(<float*>px, n * c, h, w, kh, kw, sh, sw, <float*>py)
        else:
            fnn_avgpool2d_forward_d(<double*>px, n * c, h, w, kh, kw, sh, sw, <double*>py)
    return y


def avgpool2d_backward(cnp.ndarray grad_y, tuple x_shape, int kh, int kw, tuple stride):
    """grad_y: (N, C, OH, OW) -> grad_x: x_shape (N, C, H, W); parallel over planes."""
    cdef int t = _float_input("avgpool2d_backward", "grad_y", grad_y, (None, None, None, None))
    x_shape = _image_shape_for("avgpool2d_backward", x_shape, grad_y)
    cdef Py_ssize_t planes = x_shape[0] * x_shape[1], h = x_shape[2], w = x_shape[3]
    cdef int sh, sw
    cdef Py_ssize_t oh, ow
    oh, ow, sh, sw = _pool_output("avgpool2d_backward", h, w, kh, kw, stride)
    _need("avgpool2d_backward", "grad_y", grad_y, t, (x_shape[0], x_shape[1], oh, ow))
    cdef cnp.ndarray grad_x = _output_array(x_shape, grad_y.dtype)    # zeroed by the kernel
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            fnn_avgpool2d_backward_f(<float*>pg, planes, h, w, kh, kw, sh, sw, <float*>px)
        else:
            fnn_avgpool2d_backward_d(<double*>pg, planes, h, w, kh, kw, sh, sw, <double*>px)
    return grad_x


# --- global average pooling --------------------------------------------------------

cdef void _global_avgpool_forward(const floating *x, Py_ssize_t planes, Py_ssize_t hw,
                                  floating *y) noexcept nogil:
    cdef Py_ssize_t p, k
    cdef double total
    for p in range(planes):
        total = 0
        for k in range(hw):
            total += x[p * hw + k]
        y[p] = <floating>(total / hw)


cdef void _global_avgpool_backward(const floating *grad_y, Py_ssize_t planes, Py_ssize_t hw,
                                   floating *grad_x) noexcept nogil:
    cdef Py_ssize_t p, k
    cdef floating share
    for p in range(planes):
        share = grad_y[p] / <floating>hw
        for k in range(hw):
            grad_x[p * hw + k] = share


def global_avgpool2d_forward(cnp.ndarray x):
    """x: (N, C, H, W) -> y: (N, C): each plane summed in double, divided by H*W."""
    _float_input("global_avgpool2d_forward", "x", x, (None, None, None, None))
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"global_avgpool2d_forward: x must have H, W >= 1, got {x.shape[2]}x"
                         f"{x.shape[3]}")
    cdef Py_ssize_t planes = x.shape[0] * x.shape[1], hw = x.shape[2] * x.shape[3]
    cdef cnp.ndarray y = _output_array((x.shape[0], x.shape[1]), x.dtype)
    cdef void *px = _data(x)
    cdef void *py = _data(y)
    cdef bint single = _is_float32(x)
    with nogil:
        if single:
            _global_avgpool_forward(<float*>px, planes, hw, <float*>py)
        else:
            _global_avgpool_forward(<double*>px, planes, hw, <double*>py)
    return y


def global_avgpool2d_backward(cnp.ndarray grad_y, tuple x_shape):
    """grad_y: (N, C) -> grad_x: x_shape, each plane filled with grad_y / (H*W)."""
    who = "global_avgpool2d_backward"
    if len(x_shape) != 4 or min(x_shape[2:]) < 1:
        raise ValueError(f"{who}: x_shape must be (N, C, H, W) with H, W >= 1, got {x_shape}")
    _float_input(who, "grad_y", grad_y, (x_shape[0], x_shape[1]))
    cdef Py_ssize_t planes = grad_y.shape[0] * grad_y.shape[1]
    cdef Py_ssize_t hw = <Py_ssize_t>x_shape[2] * <Py_ssize_t>x_shape[3]
    cdef cnp.ndarray grad_x = _output_array(x_shape, grad_y.dtype)
    cdef void *pg = _data(grad_y)
    cdef void *px = _data(grad_x)
    cdef bint single = _is_float32(grad_y)
    with nogil:
        if single:
            _global_avgpool_backward(<float*>pg, planes, hw, <float*>px)
        else:
            _global_avgpool_backward(<double*>pg, planes, hw, <double*>px)
    return grad_x
