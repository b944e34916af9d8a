"""Callbacks for ``Network.fit``: EarlyStopping, ModelCheckpoint, BackupAndRestore and the
LR schedules.

A callback implements any of ``on_train_begin(network)``,
``on_epoch_end(network, epoch, logs)`` (``logs``: this epoch's entries of the
history, e.g. ``{"loss": ..., "val_loss": ...}``) and ``on_train_end(network)``.
Setting ``network.stop_training = True`` ends training after the epoch. A callback
whose state matters to go on exactly has ``state_dict()`` / ``load_state_dict(sd)``
(plain numbers, and lists of NumPy arrays); ``BackupAndRestore`` stores them. One
with ``on_fit_resume(network, run)`` (``BackupAndRestore``) is called once every
``on_train_begin`` ran, may put a saved training state back into the network and
fit's ``_Epoch`` ``run``, and returns the epoch to start at; such callbacks run
after all others.
"""
import math
import os

import numpy as np

from . import backend, saving
from .optim import (CosineAnnealingLR, ExponentialLR, LinearWarmup, OneCycleLR,  # noqa: F401
                    StepLR)

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "BackupAndRestore",
           "ReduceLROnPlateau", "CSVLogger", "StepLR", "ExponentialLR", "CosineAnnealingLR",
           "OneCycleLR", "LinearWarmup"]


class Callback:
    """Base class of callbacks; every hook does nothing by default.

    A callback is any object with some of these methods: ``fit`` calls them in the
    order of its ``callbacks`` list, with the network first (not Keras' ``self.model``
    and ``(epoch, logs)``: a hook with Keras' signature gets an error saying which one
    fastnn calls). Setting ``network.stop_training = True`` ends training after the
    current epoch.

    Examples
    --------
    >>> import fastnn as fn
    >>> class PrintLoss(fn.callbacks.Callback):
    ...     def on_epoch_end(self, network, epoch, logs):
    ...         print(epoch, round(logs["loss"], 3))
    """

    def on_train_begin(self, network):
        """Called once when ``fit`` starts, with the ``network`` being trained."""

    def on_epoch_begin(self, network, epoch):
        """Called before each epoch of ``network``; ``epoch`` counts from 1."""

    def on_batch_end(self, network, batch, logs):
        """Called after each optimizer step on ``network``; ``batch`` counts from 0 within the epoch,
        ``logs`` is a dict with the batch's ``"loss"``."""

    def on_epoch_end(self, network, epoch, logs):
        """Called after each epoch of ``network`` (and its validation); ``epoch`` counts from 1, ``logs``
        is a dict of this epoch's values (``"loss"``, ``"val_loss"``, ``"accuracy"``,
        ... the keys of ``History.history``)."""

    def on_train_end(self, network):
        """Called once when training of ``network`` ends (after the last epoch or an early stop)."""


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

    _STATE = ("best",)

    def state_dict(self):
        """What ``BackupAndRestore`` stores to go on exactly: plain numbers (and arrays)."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state_dict):
        who = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != set(self._STATE):
            raise ValueError(f"{who}: expected the keys {sorted(self._STATE)}, got "
                             f"{state_dict!r:.200}")
        for k in self._STATE:
            value = state_dict[k]
            if k == "_best_state":
                ok = value is None or isinstance(value, list) and all(
                    isinstance(a, np.ndarray) for a in value)
            else:
                ok = value is None or (isinstance(value, (int, float))
                                       and not isinstance(value, bool))
            if not ok:
                kind = "a list of arrays" if k == "_best_state" else "a number"
                raise ValueError(f"{who}: {k} must be {kind} or None, got {value!r:.100}")
            setattr(self, k, value)


class EarlyStopping(_Monitor):
    """Stop after ``patience`` epochs in a row in which ``monitor`` did not improve by
    ``min_delta`` (Keras' rule: with patience 2, two epochs after the best one).

    Parameters
    ----------
    monitor : str, default "val_loss"
        The history key watched (accuracy-like keys are maximised, others minimised).
    patience : int, default 5
        Epochs without improvement before stopping.
    min_delta : float, default 0.0
        The smallest change that counts as an improvement.
    restore_best : bool, default True
        Put the best epoch's parameters back at the end.

    Notes
    -----
    With ``restore_best=True`` the parameters and buffers of the best epoch are
    put back when training ends (whether it stopped early or not).

    After ``fit``: ``stopped_epoch`` (None: it did not stop the run), ``best_epoch``
    and ``best`` (the best value of ``monitor``), ``last_epoch`` / ``last_value`` (the
    last epoch it saw and its value), ``restored_epoch`` (whose weights were put back,
    or None); ``summary()`` says it in one line.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, restore_best=True):
        super().__init__(monitor, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        self.patience = int(patience)
        self.restore_best = bool(restore_best)
        self.wait = 0
        self.on_train_begin(None)

    _STATE = ("best", "wait", "best_epoch", "stopped_epoch", "_best_state")

    def on_train_begin(self, network):
        self.best, self.wait, self.best_epoch, self.stopped_epoch = None, 0, None, None
        self._best_state = None
        # what the last fit did, for summary(); not part of the state a backup restores
        self.last_epoch = self.last_value = self.restored_epoch = None

    def state_dict(self):
        sd = super().state_dict()
        if sd["_best_state"] is not None:       # host copies of the best epoch's arrays
            sd["_best_state"] = [np.array(backend.to_device(a, "cpu")) for a in sd["_best_state"]]
        return sd

    def on_epoch_end(self, network, epoch, logs):
        value = self._value(logs)
        self.last_epoch, self.last_value = epoch, value
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
            self.restored_epoch = self.best_epoch

    def summary(self):
        """What the last ``fit`` did, in one line starting "early stopping: ", or None
        where it neither stopped the run nor put back weights other than the last's."""
        m = self.monitor
        if self.best_epoch is None:
            best = f"{m} never had a value to compare (NaN)"
        else:
            best = f"best {m} {self.best:.4g} at epoch {self.best_epoch}"
        if self.restored_epoch is not None:
            weights = f"restored the weights of epoch {self.restored_epoch}"
        else:
            weights = "kept the last epoch's weights"
        if self.stopped_epoch is not None:
            value = "" if self.last_value is None else f" ({m} {self.last_value:.4g})"
            by = f" by more than {self.min_delta:g}" if self.min_delta else ""
            n = self.wait          # epochs without progress: patience, or 1 for patience 0
            return (f"early stopping: stopped after epoch {self.stopped_epoch}{value}, "
                    f"{m} not improved{by} for {n} epoch{'s' * (n != 1)}; {best}; {weights}")
        if self.restored_epoch is not None and self.restored_epoch != self.last_epoch:
            return f"early stopping: did not stop the run; {best}; {weights}"
        return None


class ModelCheckpoint(_Monitor):
    """Save the network to ``path`` after each epoch, or only when ``monitor`` improves.

    Parameters
    ----------
    path : str or path
        The ``.npz`` file, written atomically (temporary file, fsync, rename) by
        ``Network.save``; read it back with ``fastnn.Network.load``.
    monitor : str, default "val_loss"
        The history key watched (accuracy-like keys are maximised, others minimised).
    save_best_only : bool, default True
        Save only when ``monitor`` improves; False saves after every epoch.
    """

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


def _arrays(network):
    """Every layer's params then buffers, layer by layer: the arrays themselves."""
    return [a for layer in network.layers for store in ("params", "buffers")
            for a in (getattr(layer, store, None) or {}).values()]


def _snapshot(network):
    """Copies of every layer's params and buffers (on their device), in ``_arrays`` order."""
    return [a.copy() for a in _arrays(network)]


def _restore(network, state, who="EarlyStopping"):
    """Write a ``_snapshot`` back in place (the optimizer keeps its references)."""
    targets = _arrays(network)
    if len(targets) != len(state) or any(
            a.shape != v.shape or a.dtype != v.dtype for a, v in zip(targets, state)):
        raise ValueError(f"{who}: the arrays to restore ({len(state)}) do not fit the "
                         f"network's ({len(targets)}): another architecture?")
    for a, v in zip(targets, state):
        a[...] = backend.to_device(v, backend.device_of(a))


class BackupAndRestore(Callback):
    """Back the whole training state up to ``backup_dir`` and go on from it after a crash
    (Keras' name and semantics).

    At the end of every epoch (``save_freq="epoch"``) or every ``save_freq`` batches
    (counted from the first batch of the first epoch), it writes ``backup_dir/backup.npz``
    atomically (``fastnn.saving``): the parameters and buffers, the optimizer's state
    and schedule, the random states (fit's shuffling Generator, every layer's ``rng``:
    Dropout), the position (epoch, batches done, their loss and outputs), the history,
    ``stop_training`` and every callback's ``state_dict()``. When ``fit`` starts with such
    a backup, it puts all of it back and goes on from there: mid-epoch, the same
    permutation of that epoch, without the batches done. The same script killed at any
    moment and run again ends with the same weights and history, bit for bit on the
    CPU. After a complete ``fit`` the backup is removed (``delete_checkpoint=True``).
    Runs after every other callback of the fit, so that the backup sees their epoch end.

    Parameters
    ----------
    backup_dir : str or path
        The folder of the backup (created if needed).
    save_freq : "epoch" or int, default "epoch"
        Back up at each epoch's end, or every that many batches.
    delete_checkpoint : bool, default True
        Remove the backup after a complete ``fit``.
    """

    FILE = "backup.npz"

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        if not isinstance(backup_dir, (str, os.PathLike)):
            raise TypeError(f"BackupAndRestore: backup_dir must be a path, got {backup_dir!r}")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(
                save_freq, (int, np.integer)) or save_freq < 1):
            raise ValueError("BackupAndRestore: save_freq must be 'epoch' or a positive int "
                             f"(batches), got {save_freq!r}")
        self.backup_dir = os.fspath(backup_dir)
        self.path = os.path.join(self.backup_dir, self.FILE)
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self.delete_checkpoint = bool(delete_checkpoint)
        self._run = None

    def on_train_begin(self, network):
        os.makedirs(self.backup_dir, exist_ok=True)

    def on_fit_resume(self, network, run):
        """Called by ``fit`` for ``network`` once all ``on_train_begin`` ran, with its
        ``_Epoch`` ``run``:
        restore the backup if there is one; -> the epoch to start at (or None: from 1)."""
        self._run = run
        if not os.path.exists(self.path):
            return None
        saved, training = saving.load(self.path, training=True)
        try:
            if training is None:
                raise ValueError("it holds no training state")
            return _Restore(network, run, self).apply(saved, *training)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(f"BackupAndRestore: the backup {self.path!r} does not fit this "
                             f"training run: {exc}") from None

    def on_batch_end(self, network, batch, logs):
        run = self._run
        if self.save_freq != "epoch" and (
                (run.epoch - 1) * run.n_batches + batch) % self.save_freq == 0:
            self._backup(network, run.epoch, batch, run.rng_state)

    def on_epoch_end(self, network, epoch, logs):
        if self.save_freq == "epoch":
            self._backup(network, epoch + 1, 0, self._run.rng.bit_generator.state)

    def on_train_end(self, network):
        if self.delete_checkpoint:
            for path in (self.path, saving.temp_path(self.path)):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            try:
                os.rmdir(self.backup_dir)         # only when nothing else is in it
            except OSError:
                pass

    def _backup(self, network, epoch, start, shuffle_state):
        """Write the state from which training goes on at ``epoch`` with ``start`` of its
        batches done; ``shuffle_state``: the shuffling Generator's state to draw that
        epoch's permutation from."""
        run, arrays = self._run, {}
        record = {"epoch": epoch, "start": start, "stop_training": bool(network.stop_training),
                  "total": run.total if start else 0.0, "shuffle_rng": shuffle_state,
                  "max_loss": None if run.max_loss == math.inf else run.max_loss,
                  "history": {"epoch": list(network.history.epoch),
                              "history": network.history.history},
                  "layer_rngs": [_rng_of(layer) and _rng_of(layer).bit_generator.state
                                 for layer in network.layers],
                  "callbacks": [self._callback_state(k, cb, arrays)
                                for k, cb in enumerate(run.callbacks)]}
        if start and run.outputs:
            for name, parts in (("outputs", run.outputs), ("targets", run.targets)):
                xp = backend.get_array_module(parts[0])
                arrays[name] = np.asarray(backend.to_device(xp.concatenate(parts), "cpu"))
        saving.save(network, self.path, include_optimizer=True, training=(record, arrays))

    def _callback_state(self, k, cb, arrays):
        """Callback ``k``'s ``state_dict()`` as JSON; its lists of arrays go into ``arrays``."""
        if cb is self or not hasattr(cb, "state_dict"):
            return None
        sd = dict(cb.state_dict())
        for key, value in sd.items():
            if isinstance(value, list) and all(isinstance(a, np.ndarray) for a in value):
                for j, a in enumerate(value):
                    arrays[f"cb{k}.{key}.{j}"] = a
                sd[key] = {"arrays": len(value)}
        return {"class": type(cb).__name__, "state": sd}


def _rng_of(layer):
    rng = getattr(layer, "rng", None)
    return rng if isinstance(rng, np.random.Generator) else None


class _Restore:
    """Puts a backup of ``BackupAndRestore`` back into a network and its fit ``run``."""

    def __init__(self, network, run, owner):
        self.network, self.run, self.owner = network, run, owner

    def apply(self, saved, record, arrays):
        """-> the epoch to start at; ValueError / TypeError / KeyError when it does not fit."""
        net, run = self.network, self.run
        names = [type(layer).__name__ for layer in net.layers]
        if names != [type(layer).__name__ for layer in saved.layers]:
            raise ValueError(f"its layers {[type(l).__name__ for l in saved.layers]} are not "
                             f"the network's {names}")
        _restore(net, _snapshot(saved), "BackupAndRestore")
        self._optimizer(saved)
        epoch, start = (_int(record[k], k, lo) for k, lo in (("epoch", 1), ("start", 0)))
        if start > run.n_batches:
            raise ValueError(f"start={start} is past the epoch's {run.n_batches} batches")
        run.rng.bit_generator.state = record["shuffle_rng"]
        if len(record["layer_rngs"]) != len(net.layers):
            raise ValueError("its layer_rngs do not match the layers")
        for layer, state in zip(net.layers, record["layer_rngs"]):
            if state is not None:
                _rng_of(layer).bit_generator.state = state
        self._history(record["history"])
        self._callbacks(record["callbacks"], arrays)
        run.start, run.total = start, float(record["total"])
        run.max_loss = math.inf if record["max_loss"] is None else float(record["max_loss"])
        if start and "outputs" in arrays:
            run.outputs = [backend.to_device(arrays["outputs"], net.device)]
            run.targets = [backend.to_device(arrays["targets"], net.device)]
        net.stop_training = record["stop_training"] is True
        return epoch

    def _optimizer(self, saved):
        net = self.network
        if saved.optimizer is None or net.optimizer is None:
            return
        # by name: a distributed.DistributedOptimizer is a subclass named as the one it wraps
        if type(saved.optimizer).__name__ != type(net.optimizer).__name__:
            raise ValueError(f"its optimizer is a {type(saved.optimizer).__name__}, the "
                             f"network's a {type(net.optimizer).__name__}")
        net.optimizer.load_state_dict(saved.optimizer.state_dict())
        net.optimizer.to(net.device)

    def _history(self, record):
        epochs, values = record["epoch"], record["history"]
        if not (isinstance(epochs, list) and all(isinstance(e, int) for e in epochs)
                and isinstance(values, dict) and all(
                    isinstance(v, list) and len(v) == len(epochs)
                    and all(isinstance(f, (int, float)) for f in v) for v in values.values())):
            raise ValueError("its history is not lists of numbers, one per epoch")
        self.network.history.epoch = list(epochs)
        self.network.history.history = {str(k): list(v) for k, v in values.items()}

    def _callbacks(self, states, arrays):
        callbacks = self.run.callbacks
        if not isinstance(states, list) or len(states) != len(callbacks):
            raise ValueError(f"it holds the state of {len(states)} callbacks, this fit has "
                             f"{len(callbacks)}")
        for k, (cb, entry) in enumerate(zip(callbacks, states)):
            if entry is None and (cb is self.owner or not hasattr(cb, "state_dict")):
                continue
            if entry is None or entry["class"] != type(cb).__name__:
                raise ValueError(f"callback {k} is a {type(cb).__name__}, the backup's "
                                 f"{entry and entry['class']}")
            sd = dict(entry["state"])
            for key, value in sd.items():
                if isinstance(value, dict) and set(value) == {"arrays"}:
                    sd[key] = [arrays[f"cb{k}.{key}.{j}"] for j in range(_int(value["arrays"],
                                                                               key, 0))]
            cb.load_state_dict(sd)


def _int(value, name, lo):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 2**53:
        raise ValueError(f"{name} must be an int in [{lo}, 2**53], got {value!r:.100}")
    return value


from .fit_callbacks import CSVLogger, ReduceLROnPlateau  # noqa: E402  (they use _Monitor)
