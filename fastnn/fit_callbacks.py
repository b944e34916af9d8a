"""ReduceLROnPlateau and CSVLogger (Keras' callbacks; exported by ``fastnn.callbacks``),
and the check that a callback's hooks take the arguments ``fit`` passes."""
import csv
import inspect
import math
import os

import numpy as np

from . import distributed

# hook -> the arguments fit passes (after self)
HOOKS = {"on_train_begin": ("network",), "on_epoch_begin": ("network", "epoch"),
         "on_batch_end": ("network", "batch", "logs"),
         "on_epoch_end": ("network", "epoch", "logs"), "on_train_end": ("network",)}


def check_hooks(callbacks):
    """A TypeError at fit's start for a callback whose hook cannot take fastnn's
    arguments, e.g. Keras' ``on_epoch_end(self, epoch, logs)`` (no ``network``)."""
    for cb in callbacks:
        for hook, args in HOOKS.items():
            method = getattr(cb, hook, None)
            if method is None or not callable(method):
                continue
            try:
                params = list(inspect.signature(method).parameters)
            except (TypeError, ValueError):      # a builtin without a signature: trust it
                continue
            try:
                inspect.signature(method).bind(*args)
                keras = params[:1] in (["epoch"], ["batch"], ["logs"])
            except TypeError:
                keras = True
            if keras:
                raise TypeError(
                    f"Network.fit: callback {type(cb).__name__}.{hook}{inspect.signature(method)}"
                    f" cannot take fastnn's arguments: fastnn calls {hook}(" + ", ".join(args)
                    + ") (the network first, unlike Keras' hooks)")


def _positive_int(value, name, who, lo=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{who}: {name} must be an int >= {lo}, got {value!r}")
    return int(value)


class ReduceLROnPlateau:
    """Multiply the optimizer's lr by ``factor`` (down to ``min_lr``) once ``monitor`` has
    not improved by more than ``min_delta`` for ``patience`` epochs, then wait ``cooldown``
    epochs before counting again (Keras' rule; accuracy-like keys are maximised). An lr
    schedule on the same optimizer sets the lr again at its next step.

    Parameters
    ----------
    monitor : str, default "val_loss"
        The history key watched.
    factor : float in [0, 1), default 0.1
        The lr is multiplied by it on a plateau.
    patience : int, default 10
        Epochs without improvement before reducing.
    min_delta : float, default 1e-4
        The smallest change that counts as an improvement.
    cooldown : int, default 0
        Epochs to wait after a reduction before counting again.
    min_lr : float, default 0.0
        The lr is never reduced below it.
    """

    _STATE = ("best", "wait", "cooldown_counter")

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, min_delta=1e-4,
                 cooldown=0, min_lr=0.0):
        from .callbacks import _Monitor
        who = "ReduceLROnPlateau"
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) \
                or not 0 <= factor < 1:
            raise ValueError(f"{who}: factor must be a number in [0, 1), got {factor!r}")
        self.factor = float(factor)
        self.patience = _positive_int(patience, "patience", who)
        self.cooldown = _positive_int(cooldown, "cooldown", who)
        if not isinstance(min_lr, (int, float)) or isinstance(min_lr, bool) or min_lr < 0:
            raise ValueError(f"{who}: min_lr must be a number >= 0, got {min_lr!r}")
        self.min_lr = float(min_lr)
        self._monitor = _Monitor(monitor, min_delta)     # Keras' "auto" mode and min_delta
        self.monitor, self.min_delta = monitor, self._monitor.min_delta
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def on_train_begin(self, network):
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def on_epoch_end(self, network, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(f"ReduceLROnPlateau: monitor={self.monitor!r} is not in the "
                             f"training logs {sorted(logs)} (val_* needs validation_data)")
        value = float(logs[self.monitor])
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        self._monitor.best = self.best
        if self._monitor._improved(value):
            self.best, self.wait = value, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            optimizer = network.optimizer
            if self.wait >= self.patience and optimizer.lr > self.min_lr:
                optimizer.lr = max(optimizer.lr * self.factor, self.min_lr)
                self.cooldown_counter, self.wait = self.cooldown, 0

    def state_dict(self):
        """What ``BackupAndRestore`` stores to go on exactly."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state_dict):
        """Restore the dict ``state_dict`` made by ``state_dict()``."""
        who = "ReduceLROnPlateau.load_state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != set(self._STATE):
            raise ValueError(f"{who}: expected the keys {sorted(self._STATE)}, got "
                             f"{state_dict!r:.200}")
        best = state_dict["best"]
        if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
            raise ValueError(f"{who}: best must be a number or None, got {best!r:.100}")
        self.best = best
        self.wait = _positive_int(state_dict["wait"], "wait", who)
        self.cooldown_counter = _positive_int(state_dict["cooldown_counter"],
                                              "cooldown_counter", who)


class CSVLogger:
    """Write each epoch's logs to the CSV file ``filename``: a header ``epoch,<keys>`` (the
    first epoch's history keys, in order), then a row per epoch (numbers as Python's
    ``repr``, so they read back exactly; a key missing at some epoch is written ``NA``).

    Rows are appended and flushed as each epoch ends, one line at a time (the file is
    opened, appended to and closed at every epoch): a killed run leaves every finished
    epoch's row, at worst a last partial line. ``append=False`` starts the file over at
    ``fit``'s start; ``append=True`` goes on after what is there (its header kept).

    Parameters
    ----------
    filename : str or path
        The CSV file (written by rank 0 only in distributed training).
    separator : str, default ","
        The column separator.
    append : bool, default False
        Go on after an existing file instead of starting it over.
    """

    def __init__(self, filename, separator=",", append=False):
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: separator must be one character, got {separator!r}")
        self.filename = os.fspath(filename)
        self.separator, self.append = separator, bool(append)
        self.keys = None

    def on_train_begin(self, network):
        self.keys = None
        if distributed.rank() != 0:      # one writer in a distributed job
            return
        if self.append and os.path.exists(self.filename) and os.path.getsize(self.filename):
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f, delimiter=self.separator), None)
            self.keys = header[1:] if header and header[0] == "epoch" else None
        else:
            open(self.filename, "w").close()

    def on_epoch_end(self, network, epoch, logs):
        if distributed.rank() != 0:
            return
        rows = []
        if self.keys is None:
            self.keys = list(logs)
            rows.append(["epoch"] + self.keys)
        rows.append([epoch] + [_text(logs[k]) if k in logs else "NA" for k in self.keys])
        with open(self.filename, "a", newline="") as f:
            csv.writer(f, delimiter=self.separator, lineterminator="\n").writerows(rows)
            f.flush()


def _text(value):
    value = float(value)
    return repr(value) if math.isfinite(value) else str(value)
