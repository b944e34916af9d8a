"""Public low-level kernels: validate arguments once, then dispatch on array type.

NumPy arrays run the compiled CPU kernels (``_cpu``), or the NumPy reference
(``_reference``) under ``fastnn.backend.use("numpy")``; CuPy arrays run the
CUDA kernels (``_cuda``). Every implementation module exposes the same
functions with the same (already validated) arguments, so this file is the
only place where bad input is caught.
"""
import math

import numpy as np

from .. import backend
from . import _cuda, _reference  # _cuda imports without CuPy

__all__ = ["im2col", "col2im", "maxpool2d_forward", "maxpool2d_backward",
           "avgpool2d_forward", "avgpool2d_backward", "global_avgpool2d_forward",
           "global_avgpool2d_backward", "leaky_relu_forward", "leaky_relu_backward",
           "relu_forward", "relu_backward", "dense_forward", "dense_backward",
           "softmax_cross_entropy", "conv2d_forward", "conv2d_backward", "conv2d_maxpool_forward",
           "sgd_step", "adam_step", "rmsprop_step", "conv_output_size", "pair", "counter_bits",
           "random_translate", "random_translate_backward", "random_flip"]

conv_output_size = _reference.conv_output_size
counter_bits = _reference.counter_bits
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _impl(x):
    """The implementation module for array ``x`` (a NumPy array is checked first: the
    layers and optimizers call this at every step)."""
    if type(x) is not np.ndarray and backend.is_cuda_array(x):
        return _cuda
    return backend._compiled if backend._current == "cpu" else _reference


def all_finite(x):
    """Whether no element of the array ``x`` is NaN or infinite. A C-contiguous
    float32/float64 NumPy array under the compiled backend is checked in one pass
    without the temporary of ``np.isfinite(x).all()``."""
    if (isinstance(x, np.ndarray) and x.dtype in _FLOATS and x.flags.c_contiguous
            and backend.current() == "cpu"):
        from . import _cpu
        return _cpu.all_finite(x)
    xp = backend.get_array_module(x)
    return bool(xp.isfinite(x).all())


def pair(value, name, who, minimum):
    """``value``: ``int | (int, int)`` -> ``(int, int)``, each at least ``minimum``; a
    TypeError / ValueError naming ``who`` and the argument ``name`` otherwise."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{who}: {name} must be an int or a pair (h, w), got {value!r}")
        h, w = value
    else:
        h = w = value
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
        if v < minimum:
            raise ValueError(f"{who}: {name} must be >= {minimum}, got {value!r}")
    return int(h), int(w)


def _float_array(x, who, name, ndim=None):
    """Check that ``x`` is a float32/float64 NumPy or CuPy array of rank ``ndim``."""
    if not (isinstance(x, np.ndarray) or backend.is_cuda_array(x)):
        raise TypeError(f"{who}: {name} must be a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{who}: {name} must be float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{who}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _same_kind(who, ref, **arrays):
    """Check dtype and device of ``arrays`` against ``ref``."""
    for name, a in arrays.items():
        _float_array(a, who, name)
        if a.dtype != ref.dtype:
            raise TypeError(f"{who}: {name} must have dtype {ref.dtype} like the input, got {a.dtype}")
        if backend.is_cuda_array(a) != backend.is_cuda_array(ref):
            raise TypeError(f"{who}: {name} is on {backend.device_of(a)} but the input is on "
                            f"{backend.device_of(ref)}")


def _contiguous(*arrays):
    """C-contiguous views or copies: implementations index raw memory, and a
    non-contiguous input must give the result of its contiguous copy."""
    return tuple(a if a is None or a.flags.c_contiguous
                 else backend.get_array_module(a).ascontiguousarray(a) for a in arrays)


_WINDOW_MAX = 2 ** 31 - 1        # kernel, stride, padding: C ints in the compiled kernels
_ELEMENTS_MAX = 2 ** 62          # patches (N*C*kh*kw*OH*OW) an int64 index can count


def _window_geometry(who, shape, kh, kw, stride, padding):
    """Kernel size, stride and padding of windows over an input ``shape`` (N, C, H, W)
    as pairs, each value at most 2^31 - 1, the window no larger than the padded input
    and its patches (N*C*kh*kw*OH*OW) fewer than 2^62; else ValueError naming ``who``."""
    kh, kw = pair((kh, kw), "kernel size", who, 1)
    stride = pair(stride, "stride", who, 1)
    padding = pair(padding, "padding", who, 0)
    for name, value in (("kernel size", (kh, kw)), ("stride", stride), ("padding", padding)):
        if max(value) > _WINDOW_MAX:
            raise ValueError(f"{who}: {name} {value} exceeds {_WINDOW_MAX}, more than any "
                             f"input could use")
    h, w = shape[-2:]
    if kh > h + 2 * padding[0] or kw > w + 2 * padding[1]:
        raise ValueError(f"{who}: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * padding[0]}x{w + 2 * padding[1]} (input {h}x{w}, padding {padding})")
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    patches = math.prod(shape[:-2]) * kh * kw * oh * ow
    if patches >= _ELEMENTS_MAX:
        raise ValueError(f"{who}: {kh}x{kw} windows with padding {padding} over an input "
                         f"{tuple(shape)} make {patches} patch values, more than 2^62")
    return kh, kw, stride, padding


def _image_shape(who, x_shape):
    """``x_shape`` as a tuple of 4 ints (N, C, H, W), N and C >= 0 (an empty batch or no
    channels give an empty result, as in the forward pass), H and W >= 1, else ValueError."""
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or min(x_shape[:2]) < 0 or min(x_shape[2:]) < 1:
        raise ValueError(f"{who}: x_shape must be (N, C, H, W) with N, C >= 0 and H, W >= 1, "
                         f"got {x_shape}")
    return x_shape


def im2col(x, kh, kw, stride=1, padding=0):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*OH*OW).

    Row ``c*kh*kw + i*kw + j``, column ``n*OH*OW + oh*OW + ow`` holds
    ``x_padded[n, c, oh*sh + i, ow*sw + j]``. ``kh``, ``kw``: the window; ``stride``
    ``(sh, sw)`` and ``padding`` ``(ph, pw)``: ints or pairs;
    ``OH = (H + 2*ph - kh) // sh + 1``.

    >>> import numpy as np
    >>> from fastnn import kernels
    >>> kernels.im2col(np.zeros((2, 3, 5, 5), np.float32), 3, 3, padding=1).shape
    (27, 50)
    """
    _float_array(x, "im2col", "x", 4)
    kh, kw, stride, padding = _window_geometry("im2col", x.shape, kh, kw, stride, padding)
    x, = _contiguous(x)
    return _impl(x).im2col(x, kh, kw, stride, padding)


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of ``im2col``: cols (C*kh*kw, N*OH*OW) -> dx of shape ``x_shape``
    (N, C, H, W), overlaps summed. ``kh``, ``kw``, ``stride``, ``padding``: as given to
    ``im2col``."""
    _float_array(cols, "col2im", "cols", 2)
    x_shape = _image_shape("col2im", x_shape)
    kh, kw, stride, padding = _window_geometry("col2im", x_shape, kh, kw, stride, padding)
    n, c, h, w = x_shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    expected = (c * kh * kw, n * oh * ow)
    if tuple(cols.shape) != expected:
        raise ValueError(f"col2im: cols must have shape {expected} for x_shape {x_shape}, "
                         f"got {tuple(cols.shape)}")
    cols, = _contiguous(cols)
    return _impl(cols).col2im(cols, x_shape, kh, kw, stride, padding)


def maxpool2d_forward(x, kh, kw, stride):
    """x: (N, C, H, W) -> (y, argmax), both (N, C, OH, OW), the max over windows
    ``kh`` x ``kw`` moved by ``stride`` (an int or a pair; no padding).

    ``argmax`` (int64) is the flat index ``h*W + w`` of each window's maximum in
    its (n, c) plane, kept for ``maxpool2d_backward``.
    """
    _float_array(x, "maxpool2d_forward", "x", 4)
    kh, kw, stride, _ = _window_geometry("maxpool2d_forward", x.shape, kh, kw, stride, 0)
    x, = _contiguous(x)
    return _impl(x).maxpool2d_forward(x, kh, kw, stride)


def maxpool2d_backward(grad_y, argmax, x_shape):
    """grad_y, argmax (from ``maxpool2d_forward``): (N, C, OH, OW) -> grad_x of shape
    ``x_shape`` (N, C, H, W), each gradient sent to its window's maximum (overlaps summed)."""
    _float_array(grad_y, "maxpool2d_backward", "grad_y", 4)
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or x_shape[:2] != tuple(grad_y.shape[:2]):
        raise ValueError(f"maxpool2d_backward: x_shape {x_shape} does not match grad_y "
                         f"{tuple(grad_y.shape)}")
    if tuple(argmax.shape) != tuple(grad_y.shape) or argmax.dtype.kind not in "iu":
        raise ValueError(f"maxpool2d_backward: argmax must be an integer array of shape "
                         f"{tuple(grad_y.shape)}, got {argmax.dtype} {tuple(argmax.shape)}")
    grad_y, = _contiguous(grad_y)
    argmax = backend.get_array_module(argmax).ascontiguousarray(argmax, dtype="int64")
    return _impl(grad_y).maxpool2d_backward(grad_y, argmax, x_shape)


def avgpool2d_forward(x, kh, kw, stride):
    """x: (N, C, H, W) -> y: (N, C, OH, OW), the mean of each ``kh`` x ``kw`` window moved
    by ``stride`` (an int or a pair; no padding)."""
    _float_array(x, "avgpool2d_forward", "x", 4)
    kh, kw, stride, _ = _window_geometry("avgpool2d_forward", x.shape, kh, kw, stride, 0)
    x, = _contiguous(x)
    return _impl(x).avgpool2d_forward(x, kh, kw, stride)


def avgpool2d_backward(grad_y, x_shape, kh, kw, stride):
    """grad_y: (N, C, OH, OW) -> grad_x: x_shape (N, C, H, W), each window's gradient
    spread evenly over it (overlaps summed). ``kh``, ``kw``, ``stride``: as given to
    ``avgpool2d_forward``."""
    who = "avgpool2d_backward"
    _float_array(grad_y, who, "grad_y", 4)
    x_shape = _image_shape(who, x_shape)
    kh, kw, stride, _ = _window_geometry(who, x_shape, kh, kw, stride, 0)
    expected = x_shape[:2] + (conv_output_size(x_shape[2], kh, stride[0], 0),
                              conv_output_size(x_shape[3], kw, stride[1], 0))
    if tuple(grad_y.shape) != expected:
        raise ValueError(f"{who}: grad_y must have shape {expected} for x_shape {x_shape}, "
                         f"{kh}x{kw} windows and stride {stride}, got {tuple(grad_y.shape)}")
    grad_y, = _contiguous(grad_y)
    return _impl(grad_y).avgpool2d_backward(grad_y, x_shape, kh, kw, stride)


def global_avgpool2d_forward(x):
    """x: (N, C, H, W) -> y: (N, C), the mean of each (n, c) plane (summed in float64)."""
    who = "global_avgpool2d_forward"
    _float_array(x, who, "x", 4)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{who}: x must have H, W >= 1, got shape {tuple(x.shape)}")
    x, = _contiguous(x)
    return _impl(x).global_avgpool2d_forward(x)


def global_avgpool2d_backward(grad_y, x_shape):
    """grad_y: (N, C) -> grad_x: x_shape (N, C, H, W), each plane filled with
    grad_y[n, c] / (H*W)."""
    who = "global_avgpool2d_backward"
    _float_array(grad_y, who, "grad_y", 2)
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or min(x_shape[2:], default=0) < 1 or min(x_shape) < 0 \
            or x_shape[:2] != tuple(grad_y.shape):
        raise ValueError(f"{who}: x_shape must be (N, C, H, W) with H, W >= 1 and (N, C) = "
                         f"grad_y's shape {tuple(grad_y.shape)}, got {x_shape}")
    grad_y, = _contiguous(grad_y)
    return _impl(grad_y).global_avgpool2d_backward(grad_y, x_shape)


def _per_sample_pairs(who, name, x, pairs):
    """``pairs`` as a C-contiguous (N, 2) int64 array on x's device (N = x.shape[0]),
    from any integer array or nested list; else TypeError / ValueError naming ``who``."""
    xp = backend.get_array_module(x)
    dtype = getattr(pairs, "dtype", None)
    if dtype is None:
        pairs = np.asarray(pairs)
        dtype = pairs.dtype
    if dtype.kind not in "iub":
        raise TypeError(f"{who}: {name} must be an integer array of shape (N, 2), got "
                        f"dtype {dtype}")
    if tuple(pairs.shape) != (x.shape[0], 2):
        raise ValueError(f"{who}: {name} must have shape ({x.shape[0]}, 2) (one pair per "
                         f"sample), got {tuple(pairs.shape)}")
    return xp.ascontiguousarray(xp.asarray(pairs), dtype=np.int64)


def _translation(who, x, shifts):
    """Checked image x and its shifts, each clipped to [-H, H] x [-W, W] (a larger shift
    moves the whole image out: the same result) so that -shifts cannot overflow."""
    _float_array(x, who, "x", 4)
    shifts = _per_sample_pairs(who, "shifts", x, shifts)
    xp = backend.get_array_module(shifts)
    bounds = xp.asarray(np.array([x.shape[2], x.shape[3]], dtype=np.int64))
    return _contiguous(x)[0], xp.clip(shifts, -bounds, bounds)


def random_translate(x, shifts, fill=0.0):
    """x: (N, C, H, W), shifts: (N, 2) ints (dy, dx) -> y: (N, C, H, W) with
    y[n, :, i, j] = x[n, :, i - dy, j - dx] where that pixel exists, else ``fill``.
    (The random draw of the shifts is RandomTranslation's; this op is a plain copy.)"""
    who = "random_translate"
    x, shifts = _translation(who, x, shifts)
    fill = _fill_value(who, fill)
    return _impl(x).random_translate(x, shifts, fill)


def random_translate_backward(grad_y, shifts):
    """grad_y: (N, C, H, W) -> grad_x: the gradient shifted back by ``shifts``, zero
    where the forward wrote its fill (random_translate with -shifts and fill 0)."""
    grad_y, shifts = _translation("random_translate_backward", grad_y, shifts)
    return _impl(grad_y).random_translate(grad_y, -shifts, 0.0)


def random_flip(x, flips):
    """x: (N, C, H, W), flips: (N, 2) ints -> y: sample n reversed along H where
    flips[n, 0] != 0 and along W where flips[n, 1] != 0. Its own backward: call it on
    grad_y with the same flips."""
    who = "random_flip"
    _float_array(x, who, "x", 4)
    flips = _per_sample_pairs(who, "flips", x, flips)
    x, = _contiguous(x)
    return _impl(x).random_flip(x, flips)


def _fill_value(who, value):
    """``value`` as a float (not NaN), else TypeError / ValueError naming ``who``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{who}: fill must be a number, got {value!r}")
    if value != value:
        raise ValueError(f"{who}: fill must not be NaN")
    return float(value)


def _out_buffer(who, out, like, inputs):
    """Check a caller's ``out`` buffer: the shape, dtype and device of ``like``,
    C-contiguous, writeable, and sharing no memory with ``inputs`` unless it is one of
    them (the element-wise kernels taking ``out`` run in place)."""
    _same_kind(who, like, out=out)
    if tuple(out.shape) != tuple(like.shape) or not out.flags.c_contiguous:
        raise ValueError(f"{who}: out must be a C-contiguous array of shape {tuple(like.shape)}, "
                         f"got shape {tuple(out.shape)}"
                         + ("" if out.flags.c_contiguous else " (not C-contiguous)"))
    if not getattr(out.flags, "writeable", True):          # CuPy arrays have no such flag
        raise ValueError(f"{who}: out must be writeable, got a read-only array "
                         f"(a read-only memmap or an immutable buffer?)")
    xp = backend.get_array_module(out)
    for name, a in inputs.items():
        if a is not out and xp.may_share_memory(a, out):
            raise ValueError(f"{who}: out shares memory with {name} without being {name} "
                             f"itself (only out={name} exactly, in place, is allowed)")


# Implementations that take fastnn's optional keywords (ReLU's ``out=``, the
# backward passes' ``need_grad_x=``); the others get the plain call, and their
# result is copied into ``out`` or their grad_x dropped.
_TAKE_OUT = ("fastnn.kernels._reference", "fastnn.kernels._cpu", "fastnn.kernels._cuda")


def _backward(impl, name, need_grad_x, *args, **options):
    """impl.name(*args, **options), without grad_x (None) where ``need_grad_x`` is false;
    ``options`` set to None are left out (a user's backend may not take them)."""
    options = {key: value for key, value in options.items() if value is not None}
    if need_grad_x:
        return getattr(impl, name)(*args, **options)
    if impl.__name__ in _TAKE_OUT:
        return getattr(impl, name)(*args, need_grad_x=False, **options)
    return (None,) + tuple(getattr(impl, name)(*args, **options)[1:])


def _with_out(who, impl, name, out, inputs):
    """impl.name(*inputs.values()), written into ``out`` when given (checked first)."""
    args = tuple(inputs.values())
    if out is None:
        return getattr(impl, name)(*args)
    _out_buffer(who, out, args[0], inputs)
    if impl.__name__ in _TAKE_OUT:
        return getattr(impl, name)(*args, out=out)
    out[...] = getattr(impl, name)(*args)
    return out


def relu_forward(x, out=None):
    """y = max(x, 0), same shape and dtype; written into ``out`` when given (which may
    be ``x`` itself: a reused buffer saves a fresh array's page faults every call).
    ``out``: writeable, C-contiguous, x's shape, dtype and device, and sharing no memory
    with x unless it is x."""
    _float_array(x, "relu_forward", "x")
    x, = _contiguous(x)
    return _with_out("relu_forward", _impl(x), "relu_forward", out, {"x": x})


def relu_backward(grad_y, y, out=None):
    """grad_x = grad_y where y > 0, else 0; written into ``out`` when given (checked as
    relu_forward's; it may be grad_y or y itself)."""
    _float_array(grad_y, "relu_backward", "grad_y")
    _same_kind("relu_backward", grad_y, y=y)
    if tuple(y.shape) != tuple(grad_y.shape):
        raise ValueError(f"relu_backward: y must have the shape of grad_y {tuple(grad_y.shape)}, "
                         f"got {tuple(y.shape)}")
    grad_y, y = _contiguous(grad_y, y)
    return _with_out("relu_backward", _impl(grad_y), "relu_backward", out,
                     {"grad_y": grad_y, "y": y})


def leaky_relu_forward(x, alpha=0.01):
    """y = x where x > 0, else alpha * x; same shape and dtype (alpha rounded to it)."""
    _float_array(x, "leaky_relu_forward", "x")
    alpha = _alpha("leaky_relu_forward", alpha)
    x, = _contiguous(x)
    return _impl(x).leaky_relu_forward(x, alpha)


def leaky_relu_backward(grad_y, x, alpha=0.01):
    """grad_x = grad_y where the forward's input x was positive, else alpha * grad_y."""
    _float_array(grad_y, "leaky_relu_backward", "grad_y")
    _same_kind("leaky_relu_backward", grad_y, x=x)
    if tuple(x.shape) != tuple(grad_y.shape):
        raise ValueError(f"leaky_relu_backward: x must have the shape of grad_y "
                         f"{tuple(grad_y.shape)}, got {tuple(x.shape)}")
    alpha = _alpha("leaky_relu_backward", alpha)
    grad_y, x = _contiguous(grad_y, x)
    return _impl(grad_y).leaky_relu_backward(grad_y, x, alpha)


def _alpha(who, alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"{who}: alpha must be a real number, got {type(alpha).__name__}")
    return float(alpha)


def _dense_shapes(who, x, W):
    _float_array(x, who, "x", 2)
    _float_array(W, who, "W", 2)
    _same_kind(who, x, W=W)
    if x.shape[1] != W.shape[0]:
        raise ValueError(f"{who}: x has {x.shape[1]} features but W expects {W.shape[0]} "
                         f"(x {tuple(x.shape)}, W {tuple(W.shape)})")


def dense_forward(x, W, b, relu=False):
    """x: (N, I), W: (I, O), b: (O,) or None -> y: (N, O) = x @ W + b.

    ``relu=True`` fuses a following ReLU: y = max(x @ W + b, 0), the bits of
    ``relu_forward(dense_forward(x, W, b))`` (the compiled kernel applies it on
    the GEMM's tiles)."""
    _dense_shapes("dense_forward", x, W)
    if b is not None:
        _same_kind("dense_forward", x, b=b)
        if tuple(b.shape) != (W.shape[1],):
            raise ValueError(f"dense_forward: b must have shape ({W.shape[1]},), got {tuple(b.shape)}")
    x, W, b = _contiguous(x, W, b)
    if relu:
        return _impl(x).dense_forward(x, W, b, True)
    return _impl(x).dense_forward(x, W, b)


def dense_backward(grad_y, x, W, *, need_grad_x=True, relu_x=False):
    """grad_y: (N, O), x: (N, I), W: (I, O) -> (grad_x (N, I), grad_W (I, O), grad_b (O,)).

    ``need_grad_x=False`` (a network's first layer) skips grad_x's GEMM and returns
    None in its place. ``relu_x=True`` (x is a ReLU's output) fuses that ReLU's
    backward: grad_x is ``relu_backward(grad_y @ W.T, x)``."""
    _dense_shapes("dense_backward", x, W)
    _float_array(grad_y, "dense_backward", "grad_y", 2)
    _same_kind("dense_backward", x, grad_y=grad_y)
    if tuple(grad_y.shape) != (x.shape[0], W.shape[1]):
        raise ValueError(f"dense_backward: grad_y must have shape {(x.shape[0], W.shape[1])}, "
                         f"got {tuple(grad_y.shape)}")
    grad_y, x, W = _contiguous(grad_y, x, W)
    if relu_x:
        return _impl(x).dense_backward(grad_y, x, W, need_grad_x, True)
    return _backward(_impl(x), "dense_backward", need_grad_x, grad_y, x, W)


def softmax_cross_entropy(logits, labels):
    """logits: (N, C); labels: (N,) ints in [0, C) or (N, C) probabilities.

    Returns ``(loss, grad_logits)``: the mean cross-entropy (a scalar of the
    logits' dtype; a 0-d array on CUDA) and ``(softmax(logits) - onehot) / N``.
    """
    who = "softmax_cross_entropy"
    _float_array(logits, who, "logits", 2)
    check_logits_not_empty(who, logits.shape)
    xp = backend.get_array_module(logits)
    if backend.is_cuda_array(labels) != backend.is_cuda_array(logits):
        raise TypeError(f"{who}: labels are on {backend.device_of(labels)} but logits on "
                        f"{backend.device_of(logits)}")
    n, c = logits.shape
    if labels.ndim == 1:
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{who}: 1-D labels must be integer class indices, got {labels.dtype}")
        if labels.shape[0] != n:
            raise ValueError(f"{who}: {n} logits rows but {labels.shape[0]} labels")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
            raise ValueError(f"{who}: labels must lie in [0, {c}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        labels = xp.ascontiguousarray(labels, dtype=xp.int64)
    elif labels.ndim == 2:
        if tuple(labels.shape) != (n, c):
            raise ValueError(f"{who}: one-hot labels must have shape {(n, c)}, got {tuple(labels.shape)}")
        labels = xp.ascontiguousarray(labels, dtype=logits.dtype)
    else:
        raise ValueError(f"{who}: labels must be (N,) or (N, C), got shape {tuple(labels.shape)}")
    logits, = _contiguous(logits)
    return _impl(logits).softmax_cross_entropy(logits, labels)


def check_logits_not_empty(who, shape):
    """The mean cross-entropy needs at least one sample and one class: for logits of
    shape (N, C) with N = 0 (the mean of nothing) or C = 0 (no class to be right about)
    a ValueError, never a silent NaN."""
    n, c = shape
    if n == 0:
        raise ValueError(f"{who}: the mean loss of an empty batch is undefined "
                         f"(logits of shape {tuple(shape)}, N = 0)")
    if c == 0:
        raise ValueError(f"{who}: logits need at least one class, got shape {tuple(shape)}")


def _conv_geometry(who, x, W, stride, padding):
    """Validate x (N, C, H, W) against W (K, C, kh, kw); return (stride, padding, OH, OW)."""
    _float_array(x, who, "x", 4)
    _float_array(W, who, "W", 4)
    _same_kind(who, x, W=W)
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"{who}: x has {x.shape[1]} channels but W {tuple(W.shape)} expects "
                         f"{W.shape[1]} (W is (out_channels, in_channels, kh, kw))")
    kh, kw, stride, padding = _window_geometry(who, x.shape, W.shape[2], W.shape[3],
                                               stride, padding)
    oh = conv_output_size(x.shape[2], kh, stride[0], padding[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], padding[1])
    return stride, padding, oh, ow


def _output_size(who, output_size, oh, ow):
    """``output_size`` checked: None, or (oh', ow') ints with 1 <= oh' <= oh and
    1 <= ow' <= ow; None where it is the whole (oh, ow)."""
    if output_size is None:
        return None
    size = tuple(output_size) if isinstance(output_size, (tuple, list)) else None
    if (size is None or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
            or not (1 <= size[0] <= oh and 1 <= size[1] <= ow)):
        raise ValueError(f"{who}: output_size must be None or (oh, ow), ints with 1 <= oh <= "
                         f"{oh} and 1 <= ow <= {ow} (the whole output), got {output_size!r}")
    size = (int(size[0]), int(size[1]))
    return None if size == (oh, ow) else size


def conv2d_forward(x, W, b=None, stride=1, padding=0, *, output_size=None):
    """Cross-correlation, as ``torch.nn.functional.conv2d``.

    x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> y: (N, K, OH, OW)
    with ``OH = (H + 2*ph - kh) // sh + 1`` (same for OW); with ``output_size``
    (oh, ow) only y's first oh rows and ow columns, (N, K, oh, ow) (a network
    whose max pool drops the last row and column of a conv's output asks for
    the rest only; Winograd then computes no more). im2col + GEMM with
    a workspace that does not grow with N: the compiled kernels build one
    sample's patches per thread (threads * (C*H*W + C*kh*kw*OH*OW) elements),
    the NumPy reference one chunk of samples whose columns fit in 32 MiB (or
    one sample, if larger). Compiled float32 3x3 stride-1 convs (padding <= 2,
    >= 4 channels in and out, enough output pixels) run as Winograd F(2x2, 3x3):
    per thread one block of 128-256 tiles (16*tiles*(C+K) elements
    transformed), plus 16*C*K transformed weights.
    """
    who = "conv2d_forward"
    stride, padding, oh, ow = _conv_geometry(who, x, W, stride, padding)
    output_size = _output_size(who, output_size, oh, ow)
    if b is not None:
        _same_kind(who, x, b=b)
        if tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"{who}: b must have shape ({W.shape[0]},), got {tuple(b.shape)}")
    x, W, b = _contiguous(x, W, b)
    if output_size is None:
        return _impl(x).conv2d_forward(x, W, b, stride, padding)
    return _impl(x).conv2d_forward(x, W, b, stride, padding, output_size=output_size)


def conv2d_maxpool_forward(x, W, b=None, stride=1, padding=0):
    """A conv and the 2x2 stride-2 max pool of its output: x (N, C, H, W), W (K, C, kh,
    kw), b (K,) or None -> (y, argmax), both (N, K, OH // 2, OW // 2) (OH, OW >= 2),
    exactly ``maxpool2d_forward(conv2d_forward(x, W, b, stride, padding), 2, 2, 2)``:
    argmax indexes the planes of the conv output's first 2*(OH // 2) rows and
    2*(OW // 2) columns, the ``output_size`` its backward then takes. Compiled, where
    Winograd runs the conv, each 2x2 output tile is pooled as it is made and the conv's
    output is never written whole (a network's Conv2D -> MaxPool2D(2), ``Plan``)."""
    who = "conv2d_maxpool_forward"
    stride, padding, oh, ow = _conv_geometry(who, x, W, stride, padding)
    if oh < 2 or ow < 2:
        raise ValueError(f"{who}: the conv's output ({oh}x{ow}) is smaller than the 2x2 "
                         f"pool window")
    if b is not None:
        _same_kind(who, x, b=b)
        if tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"{who}: b must have shape ({W.shape[0]},), got {tuple(b.shape)}")
    x, W, b = _contiguous(x, W, b)
    return _conv_maxpool(_impl(x), x, W, b, stride, padding)


def _conv_maxpool(impl, x, W, b, stride, padding):
    """conv2d_maxpool_forward on backend ``impl``, arguments checked: its fused kernel
    (the compiled one), else the conv of the first even rows and columns, then the pool."""
    if hasattr(impl, "conv2d_maxpool_forward"):
        return impl.conv2d_maxpool_forward(x, W, b, stride, padding)
    oh = conv_output_size(x.shape[2], W.shape[2], stride[0], padding[0]) // 2 * 2
    ow = conv_output_size(x.shape[3], W.shape[3], stride[1], padding[1]) // 2 * 2
    y = impl.conv2d_forward(x, W, b, stride, padding, output_size=(oh, ow))
    return impl.maxpool2d_forward(y, 2, 2, (2, 2))


def conv2d_backward(grad_y, x, W, stride=1, padding=0, *, need_grad_x=True, output_size=None):
    """grad_y: (N, K, OH, OW), x: (N, C, H, W), W: (K, C, kh, kw)
    -> (grad_x (N, C, H, W), grad_W (K, C, kh, kw), grad_b (K,)); ``stride``,
    ``padding`` and ``output_size`` as given to ``conv2d_forward``: with
    ``output_size`` (oh, ow), grad_y is (N, K, oh, ow) and the outputs past it get
    no gradient.

    The workspace does not grow with N either: compiled, per thread two buffers
    of at most max(C, K)*kh*kw*max(H*W, OH*OW) elements, plus one
    K*C*kh*kw + K partial sum per chunk of samples (at most 4 * threads
    chunks); reference, the forward pass's chunks. Winograd (see conv2d_forward):
    per thread one block of tiles, plus one 16*K*C + K partial per chunk of
    blocks (at most 8). ``need_grad_x=False`` (a network's first layer) skips
    grad_x and returns None in its place.
    """
    who = "conv2d_backward"
    stride, padding, oh, ow = _conv_geometry(who, x, W, stride, padding)
    output_size = _output_size(who, output_size, oh, ow)
    _float_array(grad_y, who, "grad_y", 4)
    _same_kind(who, x, grad_y=grad_y)
    expected = (x.shape[0], W.shape[0]) + (output_size or (oh, ow))
    if tuple(grad_y.shape) != expected:
        raise ValueError(f"{who}: grad_y must have shape {expected}, got {tuple(grad_y.shape)}")
    grad_y, x, W = _contiguous(grad_y, x, W)
    return _backward(_impl(x), "conv2d_backward", need_grad_x, grad_y, x, W, stride, padding,
                     output_size=output_size)


# --- update rules ------------------------------------------------------------------------
def _plain_update(param, grad, state):
    """The common case of an update, checked in a few hundred nanoseconds (an optimizer
    calls this for every parameter at every step): NumPy arrays of one float dtype and
    shape, grad C-contiguous, param and ``state`` (a tuple, None entries skipped) writeable
    and C-contiguous, no state sharing memory with param."""
    dtype, shape = param.dtype, param.shape
    if (type(param) is not np.ndarray or (dtype is not _FLOATS[0] and dtype is not _FLOATS[1])
            or type(grad) is not np.ndarray or grad.dtype is not dtype or grad.shape != shape
            or not grad.flags.c_contiguous):       # else copied: the kernels read raw memory
        return False
    flags = param.flags
    if not (flags.c_contiguous and flags.writeable):
        return False
    for a in state:
        if a is not None:
            if type(a) is not np.ndarray or a.dtype is not dtype or a.shape != shape:
                return False
            flags = a.flags
            if not (flags.c_contiguous and flags.writeable) or np.may_share_memory(a, param):
                return False
    return True


def _parameter_update(who, param, **arrays):
    """Check an update's arrays: ``param`` a writeable C-contiguous float array, and each
    of ``arrays`` (gradient, state; None skipped) of its shape, dtype and device, state
    C-contiguous and writeable; none of the state may overlap ``param``."""
    _float_array(param, who, "param")
    if not param.flags.c_contiguous or not param.flags.writeable:
        raise ValueError(f"{who}: param must be a writeable C-contiguous array "
                         f"(C-contiguous: {param.flags.c_contiguous}, writeable: "
                         f"{param.flags.writeable})")
    for name, a in arrays.items():
        if a is None:
            continue
        _same_kind(who, param, **{name: a})
        if tuple(a.shape) != tuple(param.shape):
            raise ValueError(f"{who}: {name} must have the shape of param {tuple(param.shape)}, "
                             f"got {tuple(a.shape)}")
        if name != "grad" and (not a.flags.c_contiguous or not a.flags.writeable):
            raise ValueError(f"{who}: {name} must be a writeable C-contiguous array")
        if name != "grad" and backend.get_array_module(a).may_share_memory(a, param):
            raise ValueError(f"{who}: {name} must not share memory with param")


def _update_arrays(who, param, grad, **state):
    """``grad`` ready for an update kernel (C-contiguous), once ``param``, ``grad`` and the
    ``state`` arrays (None skipped) pass ``_parameter_update``'s checks (the common case
    by ``_plain_update``'s short path) and no two state arrays share memory."""
    if not _plain_update(param, grad, tuple(state.values())):
        _parameter_update(who, param, grad=grad, **state)
        grad, = _contiguous(grad)
    given = [(name, a) for name, a in state.items() if a is not None]
    for k, (name, a) in enumerate(given):
        for other, b in given[k + 1:]:
            if backend.get_array_module(a).may_share_memory(a, b):
                raise ValueError(f"{who}: {name} and {other} must not share memory")
    return grad


def sgd_step(param, grad, buf=None, *, lr, momentum=0.0, weight_decay=0.0, l1=0.0,
             nesterov=False):
    """One SGD update of ``param`` in place, PyTorch's rule (dampening 0):

    d = grad + weight_decay * param + l1 * sign(param);
    buf = d (first step: ``buf`` None) or momentum * buf + d;
    d = d + momentum * buf (nesterov) or buf;  param -= lr * d.

    param, grad, buf: same shape and dtype. Returns the momentum buffer (a new
    array on the first step; None without momentum). One pass over memory.

    The state (momentum buffer; Adam's m, v; RMSprop's square_avg, buf) is stored
    flushed: an entry below the dtype's smallest normal number (``np.finfo(dtype).tiny``)
    in magnitude becomes 0 (NaN stays). PyTorch keeps such subnormals; they change no
    parameter visibly, but zero gradients decay a buffer into them within ~800 steps
    and a CPU then runs the update ~20x slower.
    """
    who = "sgd_step"
    grad = _update_arrays(who, param, grad, buf=buf)
    if buf is not None and not momentum:
        raise ValueError(f"{who}: a momentum buffer was given but momentum is 0")
    impl = _impl(param)
    if impl is backend._compiled:                    # its buffer is made here, filled there
        first = momentum and buf is None
        if first:
            buf = np.empty_like(param)
        impl.sgd_step(param, grad, buf if momentum else None, lr, momentum, weight_decay, l1,
                      nesterov, bool(first))
        return buf if momentum else None
    return impl.sgd_step(param, grad, buf, lr, momentum, weight_decay, l1, nesterov)


def adam_step(param, grad, m, v, *, lr, step, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled=False):
    """One Adam update (PyTorch's rule) of ``param`` and its moments ``m``, ``v`` in place,
    at ``step`` t >= 1 (the bias corrections' exponent):

    g = grad + weight_decay * param;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).

    ``decoupled=True`` is AdamW's rule (torch.optim.AdamW): instead of adding
    ``weight_decay * param`` to the gradient, ``param *= 1 - lr * weight_decay`` first.
    param, grad, m, v: same shape and dtype; m and v stored flushed (see sgd_step);
    ``beta1``, ``beta2``, ``eps``: Adam's constants.
    """
    who = "adam_step"
    grad = _update_arrays(who, param, grad, m=m, v=v)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"{who}: step must be an int >= 1, got {step!r}")
    step_size = lr / (1 - beta1 ** step)
    inv_sqrt_bc2 = 1 / math.sqrt(1 - beta2 ** step)
    decay_factor = 1.0 - lr * weight_decay if decoupled else 1.0
    _impl(param).adam_step(param, grad, m, v, step_size, beta1, beta2, inv_sqrt_bc2, eps,
                           0.0 if decoupled else weight_decay, decay_factor)


def rmsprop_step(param, grad, square_avg, buf=None, *, lr, alpha=0.99, eps=1e-8,
                 momentum=0.0, weight_decay=0.0):
    """One RMSprop update (torch.optim.RMSprop's rule, centered=False) of ``param`` and
    its state in place; ``square_avg`` and ``buf`` (the momentum buffer, None when
    momentum is 0) start as zeros:

    g = grad + weight_decay * param;  square_avg = alpha square_avg + (1 - alpha) g^2;
    d = g / (sqrt(square_avg) + eps);  buf = momentum buf + d, d = buf (momentum > 0);
    param -= lr * d.

    param, grad, square_avg, buf: same shape and dtype; the state stored flushed (see
    sgd_step).
    """
    who = "rmsprop_step"
    grad = _update_arrays(who, param, grad, square_avg=square_avg, buf=buf)
    if (buf is None) != (not momentum):
        raise ValueError(f"{who}: a momentum buffer is needed exactly when momentum > 0 "
                         f"(momentum {momentum!r}, buf {'None' if buf is None else 'given'})")
    _impl(param).rmsprop_step(param, grad, square_avg, buf, lr, alpha, eps, momentum,
                              weight_decay)


from . import variants  # noqa: E402  (reads FASTNN_VARIANT_* once the kernels are importable)
