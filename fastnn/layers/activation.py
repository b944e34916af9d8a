"""Activation layers: ReLU and LeakyReLU (compiled kernels), Sigmoid, Tanh, Softmax (array ops).

They have no parameters. Each keeps what its backward needs (its output, or
its input for LeakyReLU) and runs on NumPy or CuPy arrays alike.
"""
import numpy as np

from .. import backend
from .base import Layer, check_float_array, check_number, contiguous, kernel_impl

__all__ = ["ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax"]

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


class _Elementwise(Layer):
    """Shared checks of the parameter-free element-wise layers."""

    def _check(self, x):
        check_float_array(x, type(self).__name__)

    def _check_grad(self, grad_y, kept):
        """``grad_y`` must match what forward kept (its input or output)."""
        if kept is None:
            raise RuntimeError(f"{type(self).__name__}: backward called before forward")
        if getattr(grad_y, "shape", None) != kept.shape or grad_y.dtype != kept.dtype:
            check_float_array(grad_y, type(self).__name__, "grad_y", kept.dtype)
            raise ValueError(f"{type(self).__name__}: expected grad_y of shape {tuple(kept.shape)}, "
                             f"got {tuple(grad_y.shape)}")

    def get_config(self):
        return {}


class ReLU(_Elementwise):
    """Rectified linear unit, ``y = max(x, 0)``; ``grad_x = grad_y * (y > 0)``.

    Input: any float array ``(N, ...)``; output: the same shape. After a ``Dense``
    the network fuses it into the Dense kernel (same result).
    """

    def forward(self, x, training=True):
        if not (type(x) is np.ndarray and (x.dtype is _F32 or x.dtype is _F64) and x.flags.c_contiguous):
            self._check(x)
            x = contiguous(x)
        self.output = y = kernel_impl(x).relu_forward(x)
        return y

    def backward(self, grad_y):
        self._check_grad(grad_y, self.output)
        grad_y = contiguous(grad_y)
        return kernel_impl(grad_y).relu_backward(grad_y, self.output)


class LeakyReLU(_Elementwise):
    """Leaky ReLU, ``y = x if x > 0 else alpha * x``.

    Parameters
    ----------
    alpha : float, default 0.01
        Slope for negative inputs.

    Shapes
    ------
    Input: any float array ``(N, ...)``; output: the same shape.
    """

    def __init__(self, alpha=0.01):
        super().__init__()
        self.alpha = check_number(alpha, "alpha", "LeakyReLU")

    def forward(self, x, training=True):
        self._check(x)
        x = contiguous(x)
        self.input = x
        self.output = kernel_impl(x).leaky_relu_forward(x, self.alpha)
        return self.output

    def backward(self, grad_y):
        self._check_grad(grad_y, self.input)
        grad_y = contiguous(grad_y)
        return kernel_impl(grad_y).leaky_relu_backward(grad_y, self.input, self.alpha)

    def get_config(self):
        return {"alpha": self.alpha}


class Sigmoid(_Elementwise):
    """Logistic sigmoid, ``y = 1 / (1 + exp(-x))`` (computed as ``(1 + tanh(x/2)) / 2``,
    which never overflows).

    Input: any float array ``(N, ...)``; output: the same shape, values in (0, 1).
    """

    def forward(self, x, training=True):
        self._check(x)
        xp = backend.get_array_module(x)
        half = x.dtype.type(0.5)
        y = xp.tanh(x * half)
        y += 1
        y *= half
        self.output = y
        return y

    def backward(self, grad_y):
        y = self.output
        self._check_grad(grad_y, y)
        return grad_y * y * (1 - y)


class Tanh(_Elementwise):
    """Hyperbolic tangent, ``y = tanh(x)``; ``grad_x = grad_y * (1 - y**2)``.

    Input: any float array ``(N, ...)``; output: the same shape, values in (-1, 1).
    """

    def forward(self, x, training=True):
        self._check(x)
        self.output = backend.get_array_module(x).tanh(x)
        return self.output

    def backward(self, grad_y):
        y = self.output
        self._check_grad(grad_y, y)
        return grad_y * (1 - y * y)


class Softmax(_Elementwise):
    """Softmax over the last axis: ``p = exp(x) / sum(exp(x))``.

    Input ``(N, C)`` (or ``(N, ..., C)``); output the same shape, each row summing to 1.

    Before a ``CrossEntropy`` loss the Network skips this layer's forward and
    backward in training and feeds the logits to the fused loss, whose
    gradient is ``p - y``.
    """

    def forward(self, x, training=True):
        self._check(x)
        if x.size == 0:                  # N = 0 or no classes: an empty output
            self.output = x.copy()
            return self.output
        xp = backend.get_array_module(x)
        e = xp.exp(x - x.max(axis=-1, keepdims=True))
        e /= e.sum(axis=-1, keepdims=True)
        self.output = e
        return e

    def backward(self, grad_y):
        p = self.output
        self._check_grad(grad_y, p)
        # Jacobian-vector product: p * (g - <g, p>)
        return p * (grad_y - (grad_y * p).sum(axis=-1, keepdims=True))
