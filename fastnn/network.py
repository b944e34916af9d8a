"""Network (alias Sequential): a stack of layers and the training loop.

The Network owns the loop: input conversion (once, at its entry), batching and
shuffling, the loss, the optimizer step, metrics, callbacks, the progress bar,
the NaN stop, save/load and device moves. Layers own their state and checks.
"""
import itertools
import math
import signal
import sys
import threading

import numpy as np

from . import backend, fit_callbacks, fit_data, kernels, losses, metrics as metrics_module, optim
from .container import LayerSequence, summary_table
from .layers.base import Layer, make_rng, uses_tutorial_protocol
from .plan import Plan, layer_params

__all__ = ["Network", "Sequential", "History"]

_PREDICT_CHUNK = 256          # samples per forward pass for image-like inputs in predict/evaluate
# fit stops when a batch loss exceeds DIVERGED times the fit's first batch loss (at least 1):
# twelve orders of magnitude above where training started, it has diverged for good
DIVERGED = 1e12


class History:
    """What ``fit`` returns: ``history`` is a dict of per-epoch lists
    (``loss``, and ``accuracy`` / ``val_loss`` / ``val_accuracy`` where they apply)."""

    def __init__(self):
        self.history = {}
        self.epoch = []

    def _append(self, epoch, logs):
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    def __getitem__(self, key):
        return self.history[key]

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


class Network(LayerSequence):
    """A sequence of layers trained end to end.

    ``Network([Dense(2, 3), Tanh(), ...])`` or ``Network()`` then ``add``.
    Tutorial style: ``use(loss, loss_prime)`` then ``fit(x, y, epochs, learning_rate)``.
    Keras style: ``compile(loss, optimizer, metrics)`` then ``fit(x, y, ...)``.
    """

    def __init__(self, layers=None):
        self.layers = []
        self.loss = None            # tutorial functions set by use(): loss(y_true, y_pred)
        self.loss_prime = None
        self.loss_fn = None         # a fastnn.losses.Loss set by compile()
        self.optimizer = None
        self.metrics = ()
        self._style = None          # "use" | "compile"
        self._device = "cpu"
        self.stop_training = False
        self.history = None
        self._input_shape = None
        self._plan = None
        for layer in layers or ():
            self.add(layer)

    # -- building ------------------------------------------------------------------------------
    def add(self, layer):
        """Append a layer (a fastnn layer, a ``fn.Layer`` subclass, or a tutorial-style object)."""
        if not (hasattr(layer, "forward") or hasattr(layer, "forward_propagation")):
            raise TypeError(f"Network.add: expected a layer (with forward or forward_propagation), "
                            f"got {type(layer).__name__}")
        for i, other in enumerate(self.layers):
            if other is layer:      # its backward would use the state of its last forward only
                raise ValueError(f"Network.add: this {layer!r} is already layer {i} of the "
                                 "network; a layer keeps the state of one forward pass, so add a "
                                 "new instance (weights cannot be shared this way)")
        self.layers.append(layer)
        self._plan = None
        return self

    def use(self, loss, loss_prime):
        """Tutorial style: ``loss(y_true, y_pred) -> float``, ``loss_prime(y_true, y_pred) -> grad``."""
        if not callable(loss) or not callable(loss_prime):
            raise TypeError("Network.use: loss and loss_prime must be functions")
        self.loss, self.loss_prime = loss, loss_prime
        self.loss_fn = None
        self.metrics = ()
        self._style = "use"
        self._plan = None

    def compile(self, loss="cross_entropy", optimizer=None, metrics=None):
        """Choose the loss (name or Loss), the optimizer (default SGD(lr=0.01)) and metrics.

        ``metrics``: names of ``fastnn.metrics`` functions (e.g. "accuracy") or
        callables ``f(y_true, y_pred) -> float``; None means "accuracy" for the
        classification losses (cross-entropy, binary cross-entropy), none for MSE.
        """
        self.loss_fn = losses.get(loss)
        self.optimizer = optim.SGD() if optimizer is None else optim.get(optimizer)
        if metrics is None:
            classification = isinstance(self.loss_fn, (losses.CrossEntropy, losses.BinaryCrossEntropy))
            metrics = ("accuracy",) if classification else ()
        if isinstance(metrics, str):
            metrics = (metrics,)
        self.metrics = tuple(self._metric(m) for m in metrics)
        self.loss = self.loss_prime = None
        self._style = "compile"
        self._plan = None

    @staticmethod
    def _metric(m):
        if callable(m):
            return (getattr(m, "__name__", "metric"), m)
        f = getattr(metrics_module, m, None) if isinstance(m, str) and not m.startswith("_") else None
        if f is None or not callable(f) or m in ("confusion_matrix", "classification_report"):
            raise ValueError(f"Network.compile: unknown metric {m!r}; expected 'accuracy' or a "
                             "callable f(y_true, y_pred) -> float")
        return (m, f)

    # -- device and dtype ----------------------------------------------------------------------
    @property
    def device(self):
        """``"cpu"`` or ``"cuda"``: where the parameters live."""
        return self._device

    @property
    def dtype(self):
        """The dtype of the parameters (float32 when the network has none)."""
        return self._get_plan().dtype

    def to(self, device):
        """Move parameters, gradients, buffers and optimizer state to ``device`` (``"cpu"``
        or ``"cuda"``), or convert them to a dtype (``device`` ``"float32"`` or
        ``"float64"``, API.md's name for both: the layers then take inputs of that dtype);
        returns the network."""
        if device not in ("cpu", "cuda", "float32", "float64"):
            raise ValueError("Network.to: expected a device 'cpu' or 'cuda' or a dtype "
                             f"'float32' or 'float64', got {device!r}")
        if device == "cuda" and backend.cupy() is None:
            raise RuntimeError("Network.to: no usable CUDA device here (fastnn.backend.available() "
                               f"is {backend.available()}; the GPU path needs CuPy and a GPU)")
        for layer in self.layers:           # check everything before changing anything
            if uses_tutorial_protocol(layer) and device != "cpu":
                raise ValueError(f"Network.to({device!r}): {type(layer).__name__} is a "
                                 "tutorial-protocol layer whose state the Network cannot move "
                                 "or convert; it runs on the CPU, in its own dtype")
        for layer in self.layers:
            for store in ("params", "grads", "buffers"):
                d = getattr(layer, store, None)
                if d:
                    for k in d:
                        d[k] = backend.convert(d[k], device)
            if device.startswith("float") and getattr(layer, "dtype", None) is not None:
                layer.dtype = np.dtype(device)
        if self.optimizer is not None:
            self.optimizer.to(device)
        if not device.startswith("float"):
            self._device = device
        self._plan = None
        return self

    # -- forward / backward --------------------------------------------------------------------
    def _get_plan(self):
        plan = self._plan
        if plan is None or not plan.matches(self.layers):
            plan = self._plan = Plan(self)
        return plan

    def _run_forward(self, x, training, stop=None):
        forwards = self._get_plan().forwards
        for f in (forwards if stop is None else forwards[:stop]):
            x = f(x, training)
        return x

    def _run_backward(self, grad, stop, lr):
        for b in reversed(self._get_plan().backwards[:stop]):
            grad = b(grad, lr)
        return grad

    def _train_backward(self, grad, lr):
        """Training's backward: the layers ``fit`` trains, down to the first with
        parameters, whose input gradient nobody uses (skipped where the layer can)."""
        plan = self._get_plan()
        for b in reversed(plan.backwards[plan.first_trained + 1:plan.n_train]):
            grad = b(grad, lr)
        if plan.first_trained < plan.n_train:
            plan.first_backward(grad, lr)

    def forward(self, x, training=False):
        """Run every layer on ``x`` ``(N, ...)`` (on the network's device) and return the
        output ``(N, ...)``; ``training=True`` as in ``fit`` (Dropout drops, BatchNorm updates)."""
        plan = self._get_plan()
        # hot path (batch-1 inference): a ready NumPy array skips the entry conversion
        if not (type(x) is np.ndarray and x.dtype is plan.dtype and x.flags.c_contiguous
                and self._device == "cpu" and x.ndim and x.shape[0]):
            x = self._as_input(x, "Network.forward", check_finite=False)
        for f in plan.forwards:
            x = f(x, training)
        return x

    def backward(self, grad):
        """Back-propagate ``grad`` (d loss / d output) through every layer; returns grad_x.

        Fills each layer's ``grads``; tutorial-protocol layers get a learning rate of 0.
        """
        return self._run_backward(grad, len(self.layers), 0.0)

    def parameters(self):
        """``[(layer, name), ...]`` for every parameter, in a stable order."""
        return [(layer, name) for layer in self.layers for name in layer_params(layer)]

    # -- input checks (once, at the network's entry) ---------------------------------------------
    def _as_input(self, x, who, check_finite=True, move=True):
        """``x`` as a C-contiguous array of the network's dtype, on the network's device
        (``move=True``) or left on the host for the loops to move batch by batch."""
        if backend.is_cuda_array(x):
            xp = backend.get_array_module(x)
        else:
            xp = np
            if not isinstance(x, np.ndarray):
                try:
                    x = np.asarray(x)
                except (ValueError, TypeError) as exc:
                    raise TypeError(f"{who}: x must be an array, got {type(x).__name__} ({exc})") from None
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{who}: x must hold numbers, got dtype {x.dtype}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"{who}: x must have a non-empty batch dimension, got shape {x.shape}")
        dtype = self.dtype
        if x.dtype != dtype:
            x = x.astype(dtype)
        elif not x.flags.c_contiguous:
            x = xp.ascontiguousarray(x)
        if check_finite and not kernels.all_finite(x):
            raise ValueError(f"{who}: x contains NaN or infinite values")
        if (move and self._device == "cuda") or (xp is not np and self._device == "cpu"):
            x = backend.to_device(x, self._device)
        return x

    def _as_target(self, y, n, probe, who, move=True):
        """``y`` checked against ``n`` samples and the network's output ``probe`` (one sample)."""
        if not backend.is_cuda_array(y):
            y = np.asarray(y)
        xp = backend.get_array_module(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{who}: y must hold numbers, got dtype {y.dtype}")
        if y.ndim == 0 or len(y) != n:
            raise ValueError(f"{who}: x and y must have the same number of samples, got "
                             f"len(x)={n} and y of shape {tuple(y.shape)}")
        if y.dtype.kind == "f" and not kernels.all_finite(y):
            raise ValueError(f"{who}: y contains NaN or infinite values")
        if isinstance(self.loss_fn, losses.CrossEntropy):
            if probe.ndim != 2:
                raise ValueError(f"{who}: cross_entropy needs network outputs of shape (N, C), "
                                 f"got {(n,) + tuple(probe.shape[1:])}")
            c = probe.shape[1]
            if y.ndim == 1:
                if y.dtype.kind == "f":
                    if not bool((y == xp.round(y)).all()):
                        raise ValueError(f"{who}: 1-D y must hold integer class labels, got "
                                         "non-integer values")
                y = y.astype(np.int64)
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= c:
                    raise ValueError(f"{who}: class labels must lie in [0, {c}) for a network "
                                     f"with {c} outputs, got labels in [{lo}, {hi}]")
                y = xp.ascontiguousarray(y, dtype=np.int64)
            elif y.ndim == 2 and y.shape[1] == c:
                y = xp.ascontiguousarray(y, dtype=self.dtype)
            else:
                raise ValueError(f"{who}: y must be class labels (N,) or one-hot (N, {c}), "
                                 f"got shape {tuple(y.shape)}")
        else:
            out_tail = tuple(probe.shape[1:])
            if tuple(y.shape[1:]) != out_tail:
                if not losses.same_sample_shape(tuple(y.shape), (n,) + out_tail):
                    raise ValueError(f"{who}: y must have the network's output shape "
                                     f"{(n,) + out_tail}, got {tuple(y.shape)}")
                y = y.reshape((n,) + out_tail)
            y = xp.ascontiguousarray(y, dtype=self.dtype)
            if isinstance(self.loss_fn, losses.BinaryCrossEntropy):
                losses.BinaryCrossEntropy.check_targets(y, who)
        if (move and self._device == "cuda") or (xp is not np and self._device == "cpu"):
            y = backend.to_device(y, self._device)
        return y

    def _probe(self, x, who):
        """One sample through the network in eval mode: checks shapes early, gives the output shape."""
        self._input_shape = tuple(x.shape[1:])
        return self._run_forward(backend.to_device(x[:1], self._device), False,
                                 self._get_plan().n_train)

    # -- training ------------------------------------------------------------------------------
    def train_step(self, x, y):
        """One optimizer step on one batch, the step ``fit`` runs for each of its batches:
        the layers' forward (training mode), the loss, the layers' backward, then
        ``optimizer.step(params, grads)``. Works on every network and device.

        x: (B, ...) inputs, y: (B, ...) targets (as for ``fit``). Returns
        ``{"loss": float, <metric>: float, ...}`` for this batch, the loss taken
        before the update. Raises ``FloatingPointError`` and leaves the
        parameters untouched when the loss is NaN or infinite. Needs
        ``compile()`` (or a ``fit`` after ``use()``, which sets the optimizer).
        """
        who = "Network.train_step"
        self._check_trainable(who)
        if self.optimizer is None:
            raise ValueError(f"{who}: no optimizer: call compile(loss, optimizer) first")
        x = self._as_input(x, who)
        y = self._as_target(y, len(x), self._probe(x, who), who)
        with _StepBoundary() as boundary:
            loss, out = self._step(x, y)
        boundary.raise_if_interrupted(f"{who}: interrupted; the step was applied whole")
        logs = {"loss": loss}
        if self.metrics:
            logs.update(self._metric_values(y, out))
        return logs

    def _step(self, x, y, max_loss=math.inf, w=None):
        """``train_step`` on a checked batch already on the device; returns ``(loss, out)``
        with ``out`` the output of the trained layers. The only place parameters change
        (tutorial-protocol layers update their own inside their backward). A loss that is
        NaN, infinite or above ``max_loss`` in magnitude raises FloatingPointError first.
        ``w``: the samples' weights (B,) or None (``Loss.weighted_loss_and_grad``)."""
        plan = self._get_plan()
        out = self._run_forward(x, True, plan.n_train)
        if not len(out):      # a rank's empty share of a distributed batch adds nothing
            loss, grad = 0.0, out.copy()
        elif self._style == "use":
            loss, grad = self.loss(y, out), self.loss_prime(y, out)
        elif w is None:
            loss, grad = self.loss_fn._loss_and_grad(out, y)
        else:
            loss, grad = self.loss_fn.weighted_loss_and_grad(out, y, w)
        loss = float(loss)
        share = getattr(self.optimizer, "share", None)   # distributed: checks the global loss
        if share is not None:
            loss, grad = share(loss, grad, max_loss)
        elif not abs(loss) <= max_loss:
            raise FloatingPointError(loss_error(loss, max_loss))
        self._train_backward(grad, self.optimizer.lr)
        self.optimizer.step([layer.params[name] for layer, name in plan.slots],
                            [layer.grads[name] for layer, name in plan.slots], plan.decay)
        return (loss if share is None else self.optimizer.global_loss), out

    def _check_trainable(self, who):
        if self._style is None:
            raise ValueError(f"{who}: call use(loss, loss_prime) or compile(...) first")
        if not self.layers:
            raise ValueError(f"{who}: the network has no layers")

    def fit(self, x, y, epochs=10, learning_rate=None, batch_size=None,
            validation_data=None, shuffle=True, callbacks=(), verbose=1, seed=None,
            validation_split=0.0, class_weight=None, sample_weight=None, steps_per_epoch=None):
        """Train on ``(x, y)`` and return a ``History``: ``epochs`` passes of
        ``train_step`` over batches of ``(x, y)``, with callbacks and progress around it.

        ``x`` ``(N, ...)``, ``y`` labels ``(N,)``, one-hot ``(N, C)`` or targets ``(N, ...)``.
        ``validation_data``: ``(x_val, y_val)`` evaluated after each epoch. ``shuffle``:
        reshuffle every epoch (seeded by ``seed``, which also reseeds Dropout and augmentation).
        ``callbacks``: objects with ``on_epoch_end(network, epoch, logs)`` and the other
        hooks of ``fastnn.callbacks.Callback``. ``verbose``: 1 a progress bar per epoch, 0 none.

        ``batch_size``: None (1 after ``use()``, 32 after ``compile()``), an int,
        or ``"full"``. ``learning_rate`` without ``compile()`` trains with plain
        SGD; with it, it sets the optimizer's lr (its schedules start over from it).
        Raises ``FloatingPointError`` (parameters left as before that step) when
        a batch loss becomes NaN or inf, or explodes: exceeds ``DIVERGED`` (1e12) times
        ``max(1, |the fit's first batch loss|)`` in magnitude. With a
        ``callbacks.BackupAndRestore`` whose directory holds a backup, ``fit`` first
        puts that training state back and goes on from it (see ``_resume``).
        ``validation_split``, ``class_weight``, ``sample_weight`` and an iterable ``x``
        of ``(xb, yb)`` batches with ``steps_per_epoch``: see ``fastnn.fit_data``.
        """
        who = "Network.fit"
        self._check_trainable(who)
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"{who}: epochs must be an int >= 0, got {epochs!r}")
        if learning_rate is not None:
            learning_rate = optim.nonnegative(learning_rate, "learning_rate", who)
        elif self._style == "use":
            raise ValueError(f"{who}: after use(), pass learning_rate (or call compile())")
        source = fit_data.fit_source(self, x, y, batch_size, shuffle, validation_split,
                                     validation_data, class_weight, sample_weight, steps_per_epoch)
        val = self._validation_data(source.validation_data, who)
        probe = source.probe
        if self._style == "use":         # the tutorial: plain SGD at that rate
            self.optimizer = optim.SGD(lr=learning_rate)
        elif learning_rate is not None:
            self.optimizer.lr = learning_rate
        if hasattr(self.optimizer, "begin_fit"):     # fastnn.distributed: shards, broadcast
            source, seed, verbose = self.optimizer.begin_fit(self, source, seed, verbose, callbacks)
        rng = self._seed_layers(seed)
        callbacks = self._fit_callbacks(callbacks, learning_rate is not None)
        # accuracy needs only each sample's class, not the epoch's scores
        classes = (self.metrics and probe.ndim == 2 and probe.shape[1] >= 2
                   and all(f is metrics_module.accuracy for _, f in self.metrics))
        epoch_run = _Epoch(self, source, rng, classes, callbacks)
        self.history = History()
        self.stop_training = False
        first = self._resume(callbacks, epoch_run)       # a restored run may have stopped
        epoch_range = () if self.stop_training else range(first, epochs + 1)
        with _StepBoundary() as epoch_run.boundary:
            self._fit_epochs(epoch_run, epoch_range, epochs, val, callbacks, verbose)
        epoch_run.boundary.raise_if_interrupted("Network.fit: interrupted at the end of "
                                                "training, after its last whole step")
        # only after a complete run (as Keras): after a FloatingPointError the
        # parameters stay as they were before the failing step
        for cb in callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self)
        return self.history

    def _resume(self, callbacks, run):
        """The epoch ``fit`` starts at: 1, or the one a callback's ``on_fit_resume(network,
        run)`` returns (``BackupAndRestore``) after putting the training state back: the
        parameters, the optimizer, ``self.history``, the random states and the ``_Epoch``
        ``run``'s position (``run.start`` batches of that epoch done, their loss and outputs)."""
        first = 1
        for cb in callbacks:
            if hasattr(cb, "on_fit_resume"):
                first = cb.on_fit_resume(self, run) or first
        return first

    def _fit_epochs(self, epoch_run, epoch_range, epochs, val, callbacks, verbose):
        for epoch in epoch_range:
            for cb in callbacks:
                if hasattr(cb, "on_epoch_begin"):
                    cb.on_epoch_begin(self, epoch)
            logs = epoch_run.run(epoch, epochs, verbose)
            if val is not None:
                logs.update({"val_" + k: v for k, v in self._evaluate(*val).items()})
            self.history._append(epoch, logs)
            epoch_run.report(epoch, epochs, logs, verbose)
            for cb in callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(self, epoch, logs)
            if self.stop_training:
                break

    def _validation_data(self, validation_data, who):
        """``validation_data`` checked (and kept on the host), or None."""
        if validation_data is None:
            return None
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError(f"{who}: validation_data must be a pair (x_val, y_val)")
        who += " (validation_data)"
        xv = self._as_input(validation_data[0], who, move=False)
        # its own probe: a wrong sample shape fails now, not after the first epoch
        yv = self._as_target(validation_data[1], len(xv), self._probe(xv, who), who,
                             move=False)
        return xv, yv

    def _batch_size(self, batch_size, n, who):
        if batch_size is None:
            batch_size = 1 if self._style == "use" else 32
        elif batch_size == "full":
            batch_size = n
        elif isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"{who}: batch_size must be None, 'full' or a positive int, "
                             f"got {batch_size!r}")
        return int(min(batch_size, n))

    def _seed_layers(self, seed):
        """fit's shuffling generator; with a seed, Dropout masks follow it too."""
        rng = make_rng(seed)      # seed=None: from NumPy's global state (np.random.seed works)
        if seed is not None:
            for layer in self.layers:
                if isinstance(getattr(layer, "rng", None), np.random.Generator):
                    layer.rng = np.random.default_rng(rng.integers(2**63))
        return rng

    def _fit_callbacks(self, callbacks, new_lr):
        """The callbacks of a fit, the optimizer's schedule included, each told the run began."""
        callbacks = list(callbacks)
        schedule = getattr(self.optimizer, "schedule", None)
        if schedule is not None and not any(cb is schedule for cb in callbacks):
            callbacks.append(schedule)
        if new_lr:     # schedules already bound start over from the new rate
            for cb in callbacks:
                if isinstance(cb, optim.Schedule) and cb.optimizer is self.optimizer:
                    cb.bind(None)
        # those that back the training state up (on_fit_resume) see every other one's epoch end
        callbacks.sort(key=lambda cb: hasattr(cb, "on_fit_resume"))
        fit_callbacks.check_hooks(callbacks)
        for cb in callbacks:
            if hasattr(cb, "on_train_begin"):
                cb.on_train_begin(self)
        return callbacks

    def _metric_values(self, y_true, y_pred):
        return {name: float(f(y_true, y_pred)) for name, f in self.metrics}

    @staticmethod
    def _progress_bar(epoch, epochs, n_batches):
        from tqdm.auto import tqdm
        return tqdm(total=n_batches, desc=f"epoch {epoch}/{epochs}", unit="batch",
                    leave=True, file=sys.stderr, dynamic_ncols=True)

    # -- inference -----------------------------------------------------------------------------
    def _chunks(self, n, ndim, batch_size, who):
        if batch_size is None:
            return n if ndim <= 2 else _PREDICT_CHUNK
        if batch_size == "full":
            return n
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"{who}: batch_size must be None or a positive int, got {batch_size!r}")
        return int(batch_size)

    def predict(self, x, batch_size=None):
        """The network's output for ``x`` (probabilities if it ends in Softmax/Sigmoid).

        Runs in eval mode, on the network's device, ``batch_size`` samples at a
        time (default: all of a 2-D input, 256 image samples); returns an array
        on the device ``x`` came from.
        """
        plan = self._get_plan()
        if (type(x) is np.ndarray and x.dtype is plan.dtype and x.flags.c_contiguous
                and self._device == "cpu" and x.ndim and x.shape[0]):
            on_cuda = False           # nothing to convert
        else:
            on_cuda = backend.is_cuda_array(x)
            x = self._as_input(x, "Network.predict", check_finite=False, move=False)
        n = len(x)
        if batch_size is None and (x.ndim <= 2 or n <= _PREDICT_CHUNK):
            chunk = n
        else:
            chunk = self._chunks(n, x.ndim, batch_size, "Network.predict")
        if chunk >= n:
            out = x if self._device == "cpu" else backend.to_device(x, self._device)
            for f in plan.forwards:
                out = f(out, False)
        else:
            outs = [self._run_forward(backend.to_device(x[i:i + chunk], self._device), False)
                    for i in range(0, n, chunk)]
            out = backend.get_array_module(outs[0]).concatenate(outs)
        if on_cuda:
            return backend.to_device(out, "cuda")
        return out if self._device == "cpu" else backend.to_device(out, "cpu")

    def evaluate(self, x, y, batch_size=None):
        """``{"loss": float, <metric>: float, ...}`` on ``(x, y)``, eval mode, ``batch_size``."""
        who = "Network.evaluate"
        if self._style is None:
            raise ValueError(f"{who}: call use(loss, loss_prime) or compile(...) first")
        x = self._as_input(x, who, move=False)
        y = self._as_target(y, len(x), self._probe(x, who), who, move=False)
        return self._evaluate(x, y, batch_size)

    def _evaluate(self, x, y, batch_size=None):
        """Loss (mean over samples) and metrics of already-checked arrays, moved chunk by chunk."""
        n = len(x)
        chunk = self._chunks(n, x.ndim, batch_size, "Network.evaluate")
        n_out = self._get_plan().n_train
        total, outputs = 0.0, []
        for i in range(0, n, chunk):
            xb = backend.to_device(x[i:i + chunk], self._device)
            yb = backend.to_device(y[i:i + chunk], self._device)
            out = self._run_forward(xb, False, n_out)
            if self._style == "use":
                loss = self.loss(yb, out)
            else:
                loss, _ = self.loss_fn._loss_and_grad(out, yb)
            total += float(loss) * len(xb)
            outputs.append(out)
        result = {"loss": total / n}
        if self.metrics:
            xp = backend.get_array_module(outputs[0])
            result.update(self._metric_values(y, xp.concatenate(outputs)))
        return result

    # -- description ---------------------------------------------------------------------------
    def summary(self, input_shape=None):
        """A table of layers, output shapes (when ``input_shape``, without the batch axis, is
        given or known) and parameter counts."""
        shape = tuple(input_shape) if input_shape is not None else self._input_shape
        if shape is None and self.layers and hasattr(self.layers[0], "in_features"):
            shape = (self.layers[0].in_features,)
        rows = [("#", "layer", "output shape", "params")]
        total = 0
        for i, layer in enumerate(self.layers):
            count = sum(int(p.size) for p in layer_params(layer).values())
            total += count
            if shape is not None:
                try:
                    shape = tuple(layer.output_shape(shape))
                except Exception:     # user layers may not know their output shape
                    shape = None
            rows.append((str(i), repr(layer) if isinstance(layer, Layer) else type(layer).__name__,
                         "?" if shape is None else str((None,) + shape), f"{count:,}"))
        return summary_table(rows, f"total parameters: {total:,}  (dtype {self.dtype}, "
                                   f"device {self.device})")

    # -- save / load ---------------------------------------------------------------------------
    def save(self, path, include_optimizer=True):
        """Write ``path`` atomically: an .npz of every parameter and buffer plus a JSON
        architecture (no pickle); a process killed meanwhile leaves the old file or the new one.
        ``include_optimizer``: also the optimizer's state (momentum buffers, Adam's moments
        and step count, its schedule's position), so that ``load`` then ``fit`` goes on
        exactly where this network stopped. See ``fastnn.saving``."""
        from . import saving
        saving.save(self, path, include_optimizer=include_optimizer)

    # -- interoperability: fastnn/interop.py, fastnn/onnx_export.py ----------------------------
    def state_dict(self):
        """``{key: NumPy array}`` in the keys and layouts of a ``torch.nn.Sequential``."""
        from . import interop
        return interop.state_dict(self)

    def load_state_dict(self, state, strict=True):
        """Copy ``state`` (PyTorch's keys and layouts) in; ``strict``: a missing or unexpected
        key raises; returns ``(missing_keys, unexpected_keys)``."""
        from . import interop
        return interop.load_state_dict(self, state, strict=strict)

    def export(self, path, format="onnx", *, input_shape=None):
        """Write an ONNX model to ``path`` (``format`` "onnx") for inference (``input_shape``:
        without the batch axis)."""
        from . import onnx_export
        onnx_export.export(self, path, format, input_shape)

    @classmethod
    def load(cls, path):
        """Rebuild a Network written by ``save`` (on the CPU), checking every declared shape
        against the stored arrays before allocating anything. Raises OSError / ValueError
        naming ``path``. See ``fastnn.saving``."""
        from . import saving
        return saving.load(path, network_cls=cls)


def loss_error(loss, max_loss):
    """The message of the FloatingPointError of a NaN, infinite or diverged loss."""
    over = f", over {max_loss:.3g} (fit's bound: the loss diverged)" if math.isfinite(loss) else ""
    return (f"the loss became {loss}{over}; parameters are left as they were before this "
            "step (lower the learning rate, or check the data)")


class _StepBoundary:
    """Ctrl-C (SIGINT) inside it takes effect at the next step boundary, so a step is
    applied whole or not at all: the first SIGINT is noted and raised as
    KeyboardInterrupt by ``raise_if_interrupted`` (called between steps); a second one
    interrupts at once. Only in the main thread, and only while SIGINT has Python's
    default handler (a handler of the user's own is left alone)."""

    def __enter__(self):
        self.pending, self.previous = False, None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def raise_if_interrupted(self, message):
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt(message)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


class _Epoch:
    """One pass of ``fit`` over its batches: ``Network._step`` (``train_step``) per batch,
    then the epoch's loss (the mean of the batch losses) and metrics; progress shown as
    a bar, the tutorial's line or nothing.

    Its position, for ``BackupAndRestore``: ``epoch``, ``done`` batches of it done, their
    loss ``total`` and ``outputs`` / ``targets`` (for the metrics), ``rng_state``: the
    shuffling Generator's state before this epoch drew its permutation. A ``start`` > 0
    makes the next ``run`` skip that many batches, keeping ``total`` / ``outputs`` /
    ``targets`` as they are (set with the Generator's state, it resumes an epoch)."""

    def __init__(self, network, source, rng, classes, callbacks):
        self.network, self.source, self.rng, self.classes = network, source, rng, classes
        self.n_batches = source.n_batches
        self.callbacks = callbacks
        self.batch_end = [cb for cb in callbacks if hasattr(cb, "on_batch_end")]
        self.bar = None
        self.boundary = None       # fit's _StepBoundary
        self.epoch = self.done = self.start = 0
        self.total, self.outputs, self.targets, self.rng_state = 0.0, [], [], None
        self.max_loss = math.inf   # DIVERGED x the first batch loss, once there is one

    def run(self, epoch, epochs, verbose):
        """Train one epoch; returns its logs ``{"loss": ..., <metric>: ...}``."""
        net = self.network
        tutorial = net._style == "use"
        if verbose == 1 and not tutorial:
            self.bar = net._progress_bar(epoch, epochs, self.n_batches)
        to_device = net._device != "cpu"
        start, self.start, self.epoch = self.start, 0, epoch
        if not start:
            self.total, self.outputs, self.targets = 0.0, [], []
        self.rng_state = self.rng.bit_generator.state
        batches = self.source.batches(self.rng)
        try:
            for b, (xb, yb) in itertools.islice(enumerate(batches), start, None):
                if self.boundary.pending:      # the message is built only when raised
                    self.boundary.raise_if_interrupted(
                        f"Network.fit: interrupted before epoch {epoch}, batch {b + 1} of "
                        f"{self.n_batches}; the parameters are those after the last whole "
                        "step")
                yb, wb = fit_data.split(yb)
                if to_device:
                    xb, yb = backend.to_device(xb, net._device), backend.to_device(yb, net._device)
                    wb = None if wb is None else backend.to_device(wb, net._device)
                try:
                    loss, out = net._step(xb, yb, self.max_loss, wb)
                except FloatingPointError as exc:
                    raise FloatingPointError(f"Network.fit: at epoch {epoch}, batch {b + 1} of "
                                             f"{self.n_batches}, {exc}") from None
                if self.max_loss == math.inf:
                    self.max_loss = DIVERGED * max(1.0, abs(loss))
                self.total += loss
                if net.metrics:
                    self.outputs.append(out.argmax(axis=1) if self.classes else out)
                    self.targets.append(yb)
                self.done = b + 1
                for cb in self.batch_end:
                    cb.on_batch_end(net, b + 1, {"loss": loss})
                if self.bar is not None:
                    self.bar.update(1)
                    if b % 50 == 0:
                        self.bar.set_postfix(loss=f"{self.total / (b + 1):.4f}", refresh=False)
        except BaseException:
            self._close_bar()
            raise
        logs = {"loss": self.total / self.n_batches}
        if net.metrics:
            targets, outputs = getattr(self.source, "gathered", lambda *p: p)(self.targets,
                                                                              self.outputs)
            xp = backend.get_array_module(outputs[0])
            logs.update(net._metric_values(xp.concatenate(targets), xp.concatenate(outputs)))
        return logs

    def report(self, epoch, epochs, logs, verbose):
        """Show an epoch's logs: on its bar, as the tutorial's line (``use()``), or a line
        (``verbose >= 2``)."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=True)
            self._close_bar()
        elif self.network._style == "use" and verbose == 1:
            extra = "".join(f"   {k}={v:f}" for k, v in logs.items() if k != "loss")
            print("epoch %d/%d    error=%f%s" % (epoch, epochs, logs["loss"], extra))
        elif verbose >= 2:
            print(f"epoch {epoch}/{epochs} - "
                  + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


Sequential = Network
