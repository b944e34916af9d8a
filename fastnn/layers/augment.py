"""Augmentation layers (Keras' preprocessing layers): random in training, identity in
inference (``predict``, ``evaluate``, ``training=False``).

The draw. Each training forward takes a seed s from the layer's generator (``seed``
fixes it; ``Network.fit(seed=...)`` reseeds it, as Dropout's), so every batch and
epoch draws anew. Sample n of the batch then gets two 64-bit words,
``z_v = kernels.counter_bits(s, 2N)[2n]`` and ``z_h = ...[2n + 1]`` (splitmix64 of s
and a counter, the rule of Dropout's masks), computed on the host: the same shifts and
flips on every backend, and the kernels only copy.

- RandomTranslation: dy = z_v mod (2 m_h + 1) - m_h, dx = z_h mod (2 m_w + 1) - m_w,
  with m the largest shift of that axis.
- RandomFlip: flip along H where the top bit of z_v is set (vertical modes), along W
  where that of z_h is (horizontal modes).
"""
import math

import numpy as np

from .. import kernels
from .base import Layer, check_float_array, check_number, counter_seed, make_rng

__all__ = ["RandomTranslation", "RandomFlip"]


def _factor(value, name, who):
    """A factor as given: an int >= 0 (pixels) or a float in [0, 1) (a fraction)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, (float, np.floating)) and 0 <= value < 1:
        return float(value)
    raise ValueError(f"{who}: {name} must be a fraction in [0, 1) of the image size or an "
                     f"int >= 0 pixel count, got {value!r}")


def _max_shift(factor, size):
    """The largest shift along an axis of ``size`` pixels: a fraction of it rounded half
    up (Keras: 0.1 of 28 -> 3), or the pixel count; at most ``size``."""
    pixels = math.floor(factor * size + 0.5) if isinstance(factor, float) else factor
    return min(pixels, size)


class _Augmentation(Layer):
    """The shared protocol: (N, C, H, W) input, a per-sample (N, 2) draw in training
    (``_draw``), the copy ``_apply`` and its backward ``_unapply``; identity otherwise.
    ``sample_offset``: the batch's first sample's position in a larger batch whose draws
    it takes (as Dropout's; set by distributed training)."""

    sample_offset = 0

    def __init__(self, seed):
        super().__init__()
        self.rng = make_rng(seed)
        self._pairs = None         # the last training forward's (N, 2) draw
        self._identity = None      # True after an eval forward; None before any

    def forward(self, x, training=True):
        who = type(self).__name__
        check_float_array(x, who)
        if x.ndim != 4:
            raise ValueError(f"{who}: expected an (N, C, H, W) input, got shape {tuple(x.shape)}")
        self._identity = not training
        if self._identity:
            self._pairs = None
            return x
        seed = counter_seed(int(self.rng.integers(2**63)), 2 * self.sample_offset)
        bits = kernels.counter_bits(seed, 2 * x.shape[0])
        self._pairs = self._draw(bits.reshape(-1, 2), x.shape)
        self.output = self._apply(x, self._pairs)
        return self.output

    def backward(self, grad_y):
        who = type(self).__name__
        if self._identity is None:
            raise RuntimeError(f"{who}: backward called before forward")
        if self._identity:
            return grad_y
        check_float_array(grad_y, who, "grad_y", self.output.dtype)
        if tuple(grad_y.shape) != tuple(self.output.shape):
            raise ValueError(f"{who}: expected grad_y of shape {tuple(self.output.shape)}, "
                             f"got {tuple(grad_y.shape)}")
        return self._unapply(grad_y, self._pairs)


class RandomTranslation(_Augmentation):
    """Random shifts of each image (Keras' preprocessing layer), in training only.

    Training: shift each sample by a random integer ``(dy, dx)`` in ``[-m_h, m_h] x
    [-m_w, m_w]`` pixels, ``y[n, :, i, j] = x[n, :, i - dy, j - dx]``, pixels shifted
    in take ``fill``; inference (``predict``, ``evaluate``): identity; ``export``
    leaves it out.

    Parameters
    ----------
    height_factor : float in [0, 1) or int >= 0
        Largest vertical shift m_h: a fraction of the image's height (rounded half
        up: 0.1 of 28 pixels -> up to 3) or, as an int, a number of pixels.
    width_factor : float in [0, 1) or int >= 0
        Largest horizontal shift m_w, the same way.
    fill : float, default 0.0
        Value of the uncovered pixels.
    seed : int or None
        Seed of the draws (the same shifts on every backend, like Dropout).

    Shapes
    ------
    Input ``(N, C, H, W)``; output ``(N, C, H, W)``. Backward: the gradient shifted
    back, zero where the fill was. The draw: see this module's docstring.

    Examples
    --------
    >>> import fastnn as fn
    >>> augment = fn.RandomTranslation(0.1, 0.1, seed=0)    # up to 3 pixels on 28x28
    """

    def __init__(self, height_factor, width_factor, fill=0.0, seed=None):
        who = "RandomTranslation"
        self.height_factor = _factor(height_factor, "height_factor", who)
        self.width_factor = _factor(width_factor, "width_factor", who)
        self.fill = check_number(fill, "fill", who)
        super().__init__(seed)

    def _draw(self, bits, shape):
        m = np.array([_max_shift(self.height_factor, shape[2]),
                      _max_shift(self.width_factor, shape[3])], dtype=np.uint64)
        return (bits % (2 * m + 1)).astype(np.int64) - m.astype(np.int64)

    def _apply(self, x, shifts):
        return kernels.random_translate(x, shifts, self.fill)

    def _unapply(self, grad_y, shifts):
        return kernels.random_translate_backward(grad_y, shifts)

    def get_config(self):
        return {"height_factor": self.height_factor, "width_factor": self.width_factor,
                "fill": self.fill}


_FLIP_MODES = {"horizontal": (0, 1), "vertical": (1, 0), "horizontal_and_vertical": (1, 1)}


class RandomFlip(_Augmentation):
    """Random mirror images (Keras' preprocessing layer), in training only.

    Training: reverse each sample along W, H or each of both, with probability 1/2 per
    axis, independently; inference: identity; ``export`` leaves it out.

    Parameters
    ----------
    mode : {"horizontal", "vertical", "horizontal_and_vertical"}, default "horizontal"
        Which axes may be flipped: W, H, or each of both. The default is API.md's
        (mirror images left-right, the common case); Keras' is "horizontal_and_vertical".
    seed : int or None
        Seed of the draws (the same flips on every backend, like Dropout).

    Shapes
    ------
    Input ``(N, C, H, W)``; output ``(N, C, H, W)``. Backward: the same flips of the
    gradient. The draw: see this module's docstring.
    """

    def __init__(self, mode="horizontal", seed=None):
        if mode not in _FLIP_MODES:
            raise ValueError(f"RandomFlip: mode must be one of {sorted(_FLIP_MODES)}, "
                             f"got {mode!r}")
        self.mode = mode
        super().__init__(seed)

    def _draw(self, bits, shape):
        return (bits >> np.uint64(63)).astype(np.int64) * np.array(_FLIP_MODES[self.mode])

    def _apply(self, x, flips):
        return kernels.random_flip(x, flips)

    _unapply = _apply

    def get_config(self):
        return {"mode": self.mode}
