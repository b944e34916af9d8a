"""Callbacks for ``Network.fit``: EarlyStopping, ModelCheckpoint and the LR schedules.

A callback implements any of ``on_train_begin(network)``,
``on_epoch_end(network, epoch, logs)`` (``logs``: this epoch's entries of the
history, e.g. ``{"loss": ..., "val_loss": ...}``) and ``on_train_end(network)``.
Setting ``network.stop_training = True`` ends training after the epoch.
"""
import math

import numpy as np

from . import backend
from .optim import CosineAnnealingLR, ExponentialLR, StepLR

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "StepLR", "ExponentialLR",
           "CosineAnnealingLR"]


class Callback:
    """Base class; every hook does nothing by default."""

    def on_train_begin(self, network):
        pass

    def on_epoch_end(self, network, epoch, logs):
        pass

    def on_train_end(self, network):
        pass


# history keys where higher is better (Keras' "auto" mode); every other key is a loss or error
_HIGHER_IS_BETTER = ("acc", "precision", "recall", "f1", "auc")


class _Monitor(Callback):
    """Tracks the best value of one history key (accuracy-like: higher is better; else lower)."""

    def __init__(self, monitor, min_delta=0.0):
        if not isinstance(monitor, str):
            raise TypeError(f"{type(self).__name__}: monitor must be a history key such as "
                            f"'val_loss', got {monitor!r}")
        self.monitor = monitor
        self.min_delta = abs(float(min_delta))
        self.lower_is_better = not any(k in monitor for k in _HIGHER_IS_BETTER)
        self.best = None

    def _value(self, logs):
        if self.monitor not in logs:
            raise ValueError(f"{type(self).__name__}: monitor={self.monitor!r} is not in the "
                             f"training logs {sorted(logs)} (val_* needs validation_data)")
        return float(logs[self.monitor])

    def _improved(self, value):
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.lower_is_better:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stop after ``patience`` epochs in a row in which ``monitor`` did not improve by
    ``min_delta`` (Keras' rule: with patience 2, two epochs after the best one).

    With ``restore_best=True`` the parameters and buffers of the best epoch are
    put back when training ends (whether it stopped early or not).
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, restore_best=True):
        super().__init__(monitor, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        self.patience = int(patience)
        self.restore_best = bool(restore_best)
        self.wait = 0
        self.best_epoch = None
        self.stopped_epoch = None
        self._best_state = None

    def on_train_begin(self, network):
        self.best, self.wait, self.best_epoch, self.stopped_epoch = None, 0, None, None
        self._best_state = None

    def on_epoch_end(self, network, epoch, logs):
        value = self._value(logs)
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self._best_state = _snapshot(network)
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                network.stop_training = True

    def on_train_end(self, network):
        if self.restore_best and self._best_state is not None:
            _restore(network, self._best_state)


class ModelCheckpoint(_Monitor):
    """Save the network to ``path`` after each epoch, or only when ``monitor`` improves."""

    def __init__(self, path, monitor="val_loss", save_best_only=True):
        super().__init__(monitor)
        self.path = path
        self.save_best_only = bool(save_best_only)

    def on_train_begin(self, network):
        self.best = None

    def on_epoch_end(self, network, epoch, logs):
        if not self.save_best_only:
            network.save(self.path)
            return
        value = self._value(logs)
        if self._improved(value):
            self.best = value
            network.save(self.path)


def _snapshot(network):
    """Copies of every layer's params and buffers (on their device)."""
    state = []
    for layer in network.layers:
        params = getattr(layer, "params", None) or {}
        buffers = getattr(layer, "buffers", None) or {}
        state.append(({k: v.copy() for k, v in params.items()},
                      {k: v.copy() for k, v in buffers.items()}))
    return state


def _restore(network, state):
    """Write a ``_snapshot`` back in place (the optimizer keeps its references)."""
    for layer, (params, buffers) in zip(network.layers, state):
        for store, saved in ((getattr(layer, "params", None) or {}, params),
                             (getattr(layer, "buffers", None) or {}, buffers)):
            for k, v in saved.items():
                store[k][...] = backend.to_device(v, backend.device_of(store[k]))
