"""Flatten: (N, d1, d2, ...) -> (N, d1*d2*...)."""
import math

from .base import Layer

__all__ = ["Flatten"]


def _check_array(a, what):
    if not hasattr(a, "shape") or not hasattr(a, "reshape"):
        raise TypeError(f"Flatten: {what} must be a NumPy or CuPy array, got {type(a).__name__}")


class Flatten(Layer):
    """Every axis but the first flattened into one; backward restores the shape. No
    arguments; any dtype.

    Input ``(N, d1, d2, ...)``; output ``(N, d1 * d2 * ...)``, e.g. ``(N, 16, 5, 5)``
    -> ``(N, 400)``.
    """

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def forward(self, x, training=True):
        _check_array(x, "input")
        if x.ndim < 1:
            raise ValueError(f"Flatten: expected an array with a batch dimension, got shape "
                             f"{tuple(x.shape)}")
        self._x_shape = x.shape
        # the size, not -1: NumPy cannot infer it when N = 0
        self.output = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        return self.output

    def backward(self, grad_y):
        shape = self._x_shape
        if shape is None:
            raise RuntimeError("Flatten: backward called before forward")
        _check_array(grad_y, "grad_y")
        if grad_y.size != math.prod(shape) or grad_y.ndim < 1 or grad_y.shape[0] != shape[0]:
            raise ValueError(f"Flatten: expected grad_y of shape ({shape[0]}, "
                             f"{math.prod(shape[1:])}), got {tuple(grad_y.shape)}")
        return grad_y.reshape(shape)

    def output_shape(self, input_shape):
        return (int(math.prod(input_shape)),)

    def get_config(self):
        return {}
