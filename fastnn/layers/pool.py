"""Pooling layers: MaxPool2D, AvgPool2D and GlobalAvgPool2D (compiled kernels on the CPU), NCHW,
no padding."""
import numpy as np

from .. import kernels
from .base import Layer, check_float_array, contiguous, kernel_impl

__all__ = ["MaxPool2D", "AvgPool2D", "GlobalAvgPool2D"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class _Pool2D(Layer):
    """Shared geometry: kernel_size, stride (defaults to kernel_size; overlaps allowed)."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        who = type(self).__name__
        self.kernel_size = kernels.pair(kernel_size, "kernel_size", who, 1)
        self.stride = self.kernel_size if stride is None else kernels.pair(stride, "stride", who, 1)
        self._checked_shape = None
        self._x_shape = self._x_dtype = None        # of the last forward's input

    def _name(self):
        return f"{type(self).__name__}({self.kernel_size[0]}x{self.kernel_size[1]})"

    def _check(self, x):
        check_float_array(x, self._name())
        if x.ndim != 4:
            raise ValueError(f"{self._name()}: expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        self.output_shape(x.shape[1:])
        self._checked_shape = x.shape

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"{self._name()}: expected input shape (C, H, W), got {input_shape}")
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        c, h, w = input_shape
        if kh > h or kw > w:
            raise ValueError(f"{self._name()}: window {kh}x{kw} is larger than the input {h}x{w}")
        return (c, (h - kh) // sh + 1, (w - kw) // sw + 1)

    def read_size(self, height, width):
        """The (rows, columns) of an (H, W) input that the windows read: the first
        ``(OH - 1) * sh + kh`` rows (and likewise columns); the rest is dropped. An
        input smaller than the window gives (H, W) (forward then says why it is wrong)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if kh > height or kw > width:
            return height, width
        return (height - kh) // sh * sh + kh, (width - kw) // sw * sw + kw

    def _check_grad(self, grad_y):
        if self._x_shape is None:
            raise RuntimeError(f"{self._name()}: backward called before forward")
        expected = (self._x_shape[0],) + self.output_shape(self._x_shape[1:])
        if getattr(grad_y, "shape", None) != expected or grad_y.dtype != self._x_dtype:
            check_float_array(grad_y, self._name(), "grad_y", self._x_dtype)
            raise ValueError(f"{self._name()}: expected grad_y of shape {expected}, "
                             f"got {tuple(grad_y.shape)}")

    def get_config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride)}


class MaxPool2D(_Pool2D):
    """Max pooling: the maximum of each window, per channel.

    Parameters
    ----------
    kernel_size : int or (int, int)
        Window ``(kh, kw)``.
    stride : int or (int, int) or None, default None
        Step between windows; None means ``kernel_size`` (windows may overlap when
        the stride is smaller).

    Shapes
    ------
    Input ``(N, C, H, W)``; output ``(N, C, OH, OW)``, ``OH = floor((H - kh) / sh) + 1``.
    The gradient goes to the maximum of each window.

    Examples
    --------
    >>> import numpy as np, fastnn as fn
    >>> fn.MaxPool2D(2).forward(np.zeros((8, 6, 28, 28), np.float32)).shape
    (8, 6, 14, 14)
    """

    def forward(self, x, training=True):
        if (self._checked_shape is None or getattr(x, "shape", None) != self._checked_shape
                or x.dtype not in _FLOATS):
            self._check(x)
        x = contiguous(x)
        kh, kw = self.kernel_size
        self.output, self._argmax = kernel_impl(x).maxpool2d_forward(x, kh, kw, self.stride)
        self._x_shape, self._x_dtype = x.shape, x.dtype
        return self.output

    def keep(self, x_shape, dtype, y, argmax):
        """What forward keeps for backward, from a kernel that pooled an (N, C, H, W)
        input of ``x_shape`` and ``dtype`` itself (``Plan``: a Conv2D before this layer,
        ``Conv2D.forward_max_pool``): ``y`` and ``argmax`` (N, C, OH, OW) as
        ``kernels.maxpool2d_forward`` returns them. Returns y."""
        self.output, self._argmax = y, argmax
        self._x_shape, self._x_dtype = tuple(x_shape), dtype
        return y

    def backward(self, grad_y):
        self._check_grad(grad_y)
        grad_y = contiguous(grad_y)
        return kernel_impl(grad_y).maxpool2d_backward(grad_y, self._argmax, self._x_shape)


class AvgPool2D(_Pool2D):
    """Average pooling: the mean of each window, per channel.

    Parameters
    ----------
    kernel_size : int or (int, int)
        Window ``(kh, kw)``.
    stride : int or (int, int) or None, default None
        Step between windows; None means ``kernel_size``.

    Shapes
    ------
    Input ``(N, C, H, W)``; output ``(N, C, OH, OW)``, ``OH = floor((H - kh) / sh) + 1``.
    """

    def forward(self, x, training=True):
        if (self._checked_shape is None or getattr(x, "shape", None) != self._checked_shape
                or x.dtype not in _FLOATS):
            self._check(x)
        x = contiguous(x)
        kh, kw = self.kernel_size
        self.output = kernel_impl(x).avgpool2d_forward(x, kh, kw, self.stride)
        self._x_shape, self._x_dtype = x.shape, x.dtype
        return self.output

    def backward(self, grad_y):
        self._check_grad(grad_y)
        grad_y = contiguous(grad_y)
        kh, kw = self.kernel_size
        return kernel_impl(grad_y).avgpool2d_backward(grad_y, self._x_shape, kh, kw, self.stride)


class GlobalAvgPool2D(Layer):
    """The mean of each channel's plane (Keras' GlobalAveragePooling2D; PyTorch's
    ``AdaptiveAvgPool2d(1)`` followed by a ``Flatten``). No arguments.

    Input ``(N, C, H, W)``; output ``(N, C)``.
    """

    def forward(self, x, training=True):
        if not (type(x) is np.ndarray and x.dtype in _FLOATS and x.ndim == 4):
            check_float_array(x, "GlobalAvgPool2D")
        self.output_shape(x.shape[1:])
        x = contiguous(x)
        self.output = kernel_impl(x).global_avgpool2d_forward(x)
        self._x_shape, self._x_dtype = x.shape, x.dtype
        return self.output

    def backward(self, grad_y):
        x_shape = getattr(self, "_x_shape", None)
        if x_shape is None:
            raise RuntimeError("GlobalAvgPool2D: backward called before forward")
        if getattr(grad_y, "shape", None) != x_shape[:2] or grad_y.dtype != self._x_dtype:
            check_float_array(grad_y, "GlobalAvgPool2D", "grad_y", self._x_dtype)
            raise ValueError(f"GlobalAvgPool2D: expected grad_y of shape {x_shape[:2]}, "
                             f"got {tuple(grad_y.shape)}")
        grad_y = contiguous(grad_y)
        return kernel_impl(grad_y).global_avgpool2d_backward(grad_y, x_shape)

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or min(input_shape[1:]) < 1:
            raise ValueError(f"GlobalAvgPool2D: expected input of shape (N, C, H, W) with "
                             f"H, W >= 1, got {(None,) + input_shape}")
        return input_shape[:1]

    def get_config(self):
        return {}
