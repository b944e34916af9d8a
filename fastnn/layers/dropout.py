"""Inverted dropout."""
import numpy as np

from .base import Layer, check_float_array, contiguous, counter_seed, kernel_impl, make_rng

__all__ = ["Dropout"]


class Dropout(Layer):
    """Inverted dropout. Training: zero each element with probability ``p`` and scale
    the rest by ``1 / (1 - p)``; inference (``training=False``): identity.

    Parameters
    ----------
    p : float in [0, 1), default 0.5
        Probability of dropping an element.
    seed : int or None
        Seed of the masks (the same masks on every backend);
        ``Network.fit(seed=...)`` reseeds it too.

    Attributes
    ----------
    sample_offset : int
        The position of the batch's first sample in a larger batch whose masks it
        takes (0; distributed training sets it to the rank's share's start in the
        global batch).

    Shapes
    ------
    Input: any float array ``(N, ...)``; output: the same shape.
    """

    sample_offset = 0

    def __init__(self, p=0.5, *, seed=None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = make_rng(seed)
        self._mask = None          # the scaled mask of the last training forward
        self._identity = None      # True after an eval (or p == 0) forward; None before any

    def forward(self, x, training=True):
        check_float_array(x, "Dropout")
        self._identity = not training or self.p == 0
        if self._identity:
            self._mask = None
            return x
        # one pass; the counter-based mask follows a seed drawn from this layer's rng, and
        # a seed gives the same mask on every backend (CPU, NumPy reference, CUDA)
        seed = int(self.rng.integers(2**63))
        if self.sample_offset:     # element i is element offset * row + i of the larger batch
            seed = counter_seed(seed, self.sample_offset * (x.size // max(len(x), 1)))
        self.output, self._mask = kernel_impl(x).dropout_forward(contiguous(x), self.p, seed)
        return self.output

    def backward(self, grad_y):
        if self._identity is None:
            raise RuntimeError("Dropout: backward called before forward")
        if self._identity:
            return grad_y
        mask = self._mask
        if getattr(grad_y, "shape", None) != mask.shape or grad_y.dtype != mask.dtype:
            check_float_array(grad_y, "Dropout", "grad_y", mask.dtype)
            raise ValueError(f"Dropout: expected grad_y of shape {tuple(mask.shape)}, "
                             f"got {tuple(grad_y.shape)}")
        return kernel_impl(grad_y).dropout_backward(contiguous(grad_y), mask)

    def get_config(self):
        return {"p": self.p}
