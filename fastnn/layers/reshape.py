"""Flatten: (N, d1, d2, ...) -> (N, d1*d2*...)."""
import numpy as np

from .base import Layer

__all__ = ["Flatten"]


class Flatten(Layer):
    """Keeps every axis but the first flattened into one; backward restores the shape."""

    def forward(self, x, training=True):
        if not hasattr(x, "shape") or x.ndim < 1:
            raise ValueError(f"Flatten: expected an array with a batch dimension, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        self._x_shape = x.shape
        self.output = x.reshape(x.shape[0], -1)
        return self.output

    def backward(self, grad_y):
        shape = getattr(self, "_x_shape", None)
        if shape is None:
            raise RuntimeError("Flatten: backward called before forward")
        if grad_y.size != int(np.prod(shape)) or grad_y.shape[0] != shape[0]:
            raise ValueError(f"Flatten: expected grad_y of shape ({shape[0]}, "
                             f"{int(np.prod(shape[1:]))}), got {tuple(grad_y.shape)}")
        return grad_y.reshape(shape)

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def get_config(self):
        return {}
