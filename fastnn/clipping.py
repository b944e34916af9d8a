"""Gradient clipping, the one home of Keras' ``clipnorm`` / ``global_clipnorm`` /
``clipvalue`` options that every ``fastnn.optim.Optimizer`` takes; ``Optimizer.step``
applies it before weight decay and the update."""
import math

import numpy as np

from . import backend


def _limit(value, name, who):
    """``value`` as a float > 0 (None stays None); TypeError / ValueError naming ``who``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{who}: {name} must be a number or None, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{who}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


class GradientClip:
    """Clips a list of gradient arrays (new arrays; the given ones are left alone):

    - ``clipnorm=c``: each array g scaled by c / max(||g||, c) (Keras' per-variable
      ``clip_by_norm``);
    - ``global_clipnorm=c``: all together, as ``torch.nn.utils.clip_grad_norm_``:
      total = ||(all g)||, each g scaled by min(1, c / (total + 1e-6));
    - ``clipvalue=c``: each element to [-c, c].

    At most one of them (Keras refuses two as well). None of them: the list unchanged.
    """

    def __init__(self, who, clipnorm=None, global_clipnorm=None, clipvalue=None):
        self.clipnorm = _limit(clipnorm, "clipnorm", who)
        self.global_clipnorm = _limit(global_clipnorm, "global_clipnorm", who)
        self.clipvalue = _limit(clipvalue, "clipvalue", who)
        given = [k for k, v in self.get_config().items()]
        if len(given) > 1:
            raise ValueError(f"{who}: give at most one of clipnorm, global_clipnorm and "
                             f"clipvalue, got {', '.join(given)}")

    def get_config(self):
        """The options that are set, by name."""
        return {k: v for k, v in (("clipnorm", self.clipnorm),
                                  ("global_clipnorm", self.global_clipnorm),
                                  ("clipvalue", self.clipvalue)) if v is not None}

    def __call__(self, grads):
        if self.clipvalue is not None:
            c = self.clipvalue
            return [backend.get_array_module(g).clip(g, -c, c) for g in grads]
        if self.clipnorm is not None:
            return [g * (self.clipnorm / max(_norm(g), self.clipnorm)) for g in grads]
        if self.global_clipnorm is not None:
            total = math.sqrt(sum(_norm(g) ** 2 for g in grads))
            coef = min(1.0, self.global_clipnorm / (total + 1e-6))
            return [g * coef for g in grads]
        return grads


def _norm(g):
    """The L2 norm of one gradient array, as a Python float."""
    xp = backend.get_array_module(g)
    return float(xp.sqrt(xp.sum(g * g))) if g.size else 0.0
