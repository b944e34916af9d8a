"""Inverted dropout."""
import numpy as np

from .. import backend
from .base import Layer, kernel_impl, make_rng

__all__ = ["Dropout"]


class Dropout(Layer):
    """Training: zero each element with probability p and scale the rest by 1/(1-p);
    eval: identity. Kept for backward: the scaled mask.

    ``seed`` fixes the masks; ``Network.fit(seed=...)`` reseeds it too.
    """

    def __init__(self, p=0.5, *, seed=None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = make_rng(seed)
        self._mask = None

    def forward(self, x, training=True):
        if getattr(x, "dtype", None) not in (np.float32, np.float64):
            raise TypeError(f"Dropout: expected a float32 or float64 array, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if not training or self.p == 0:
            self._mask = None
            return x
        if backend.is_cuda_array(x):
            # one fused CUDA pass; its counter-based mask follows a seed from this layer's rng
            self.output, self._mask = kernel_impl(x).dropout_forward(
                x, self.p, int(self.rng.integers(2**63)))
            return self.output
        mask = (self.rng.random(x.shape, dtype=x.dtype) >= self.p).astype(x.dtype)
        mask *= x.dtype.type(1.0 / (1.0 - self.p))
        self._mask = mask
        self.output = x * mask
        return self.output

    def backward(self, grad_y):
        if self._mask is None:       # eval mode or p == 0: identity
            return grad_y
        if grad_y.shape != self._mask.shape:
            raise ValueError(f"Dropout: expected grad_y of shape {tuple(self._mask.shape)}, "
                             f"got {tuple(grad_y.shape)}")
        return grad_y * self._mask

    def get_config(self):
        return {"p": self.p}
