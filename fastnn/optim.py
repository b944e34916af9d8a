"""Optimizers (PyTorch's update rules) and per-epoch learning-rate schedules.

An optimizer updates a list of parameter arrays in place from a list of
gradient arrays of the same order; ``decay`` flags which of them are weights
(weight decay and L1 apply to those, not to biases or BatchNorm parameters).
State (momentum buffers, Adam moments) lives in the optimizer, aligned with
that order, on the parameters' device.
"""
import math

import numpy as np

from . import backend, clipping, kernels

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Schedule", "StepLR", "ExponentialLR",
           "CosineAnnealingLR", "OneCycleLR", "LinearWarmup", "get"]


def nonnegative(value, name, who):
    """``value`` as a float >= 0; a TypeError / ValueError naming ``who`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{who}: {name} must be a number, got {value!r}")
    if not value >= 0:
        raise ValueError(f"{who}: {name} must be >= 0, got {value!r}")
    return float(value)


def _checked_keys(state_dict, keys, who):
    """``state_dict`` if it is a dict with exactly ``keys``; a TypeError / ValueError else."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{who}: expected a dict, got {type(state_dict).__name__}")
    if set(state_dict) != set(keys):
        raise ValueError(f"{who}: expected the keys {sorted(keys)}, got "
                         f"{sorted(state_dict)!r:.200}")
    return state_dict


def _finite_float(value, name, who):
    value = nonnegative(value, name, who)
    if not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be finite, got {value!r}")
    return value


class Optimizer:
    """Base class. ``step(params, grads, decay=None)`` updates each array of ``params``
    in place from the gradient array of the same index in ``grads``.

    This is the one place where gradients pass between the layers' backward and
    the update (``Network.train_step`` calls it once per batch): a wrapper that
    averages gradients across processes or clips them wraps an optimizer's
    ``step``. ``decay[i]`` says whether parameter i is a weight (weight decay and
    L1 apply to weights only); None means every parameter is. The update rules
    themselves are kernels (``fastnn.kernels.sgd_step`` / ``adam_step``), so they
    run on every backend and device. State (momentum buffers, Adam moments) lives
    here, aligned with ``params``, on the parameters' device.

    Parameters
    ----------
    lr : float
        The learning rate (a schedule changes ``self.lr`` as training goes).
    schedule : Schedule or None
        A learning-rate schedule bound to this optimizer (or pass it to ``fit`` as a
        callback).
    clipnorm, global_clipnorm, clipvalue : float or None
        Keras' gradient clipping, before weight decay and the update: each parameter's
        gradient to that L2 norm, all of them together to that norm (as
        ``torch.nn.utils.clip_grad_norm_``), or each element to ``[-clipvalue, clipvalue]``.
    """

    def __init__(self, lr, schedule=None, clipnorm=None, global_clipnorm=None, clipvalue=None):
        who = type(self).__name__
        self.lr = nonnegative(lr, "lr", who)
        self.clip = clipping.GradientClip(who, clipnorm, global_clipnorm, clipvalue)
        self.state = None          # per-parameter state, aligned with the params list
        self._shapes = None        # [(shape, dtype)] of the params the state was made for
        self.schedule = schedule
        if schedule is not None:
            schedule.bind(self)

    def _init_state(self, params):
        pass

    def reset(self):
        """Forget all state (momentum buffers, moments, step count)."""
        self.state = None
        self._shapes = None

    def step(self, params, grads, decay=None):
        """Update each array of ``params`` in place from ``grads`` (same order and shapes):
        the gradients clipped first (``clipnorm`` / ``global_clipnorm`` / ``clipvalue``,
        before weight decay), then the subclass's update rule (``_update``)."""
        grads = self.clip(grads)
        self._prepare(params)
        self._update(params, grads, decay)

    def _update(self, params, grads, decay):
        raise NotImplementedError

    def _config(self, **config):
        """``config`` plus the clipping options that are set (what ``get_config`` returns)."""
        return {**config, **self.clip.get_config()}

    def to(self, target):
        """Move the state to device ``target`` ("cpu" or "cuda"), or convert it to dtype
        ``target`` ("float32" or "float64")."""
        if self.state is not None:
            self.state = [self._move(s, target) for s in self.state]
        return self

    @staticmethod
    def _move(s, target):
        if isinstance(s, tuple):
            return tuple(backend.convert(a, target) for a in s)
        return backend.convert(s, target)

    def get_config(self):
        """The constructor's arguments as a JSON-able dict (what ``Network.save`` stores)."""
        raise NotImplementedError

    def state_dict(self):
        """What ``load_state_dict`` needs to go on exactly, as host NumPy copies and plain
        numbers: ``{"lr": float, "state": None or [[array, ...] per parameter],
        "schedule": {"epoch", "base_lr"} or None}`` (Adam adds ``"t"``); ``state`` is None
        before the first step. Each array has its parameter's shape and dtype."""
        state = None
        if self.state is not None:
            state = [[np.array(backend.to_device(a, "cpu")) for a in self._arrays(s)]
                     for s in self.state]
        schedule = None if self.schedule is None else self.schedule.state_dict()
        return {"lr": self.lr, "state": state, "schedule": schedule}

    @staticmethod
    def _arrays(s):
        return [] if s is None else list(s) if isinstance(s, tuple) else [s]

    def load_state_dict(self, state_dict):
        """Put back what ``state_dict`` returned (its arrays are copied, on the CPU: move
        them with ``to``). The next ``step`` must get parameters of the arrays' shapes and
        dtypes, or the state starts over. ValueError / TypeError naming the optimizer for
        anything else."""
        who = f"{type(self).__name__}.load_state_dict"
        sd = _checked_keys(state_dict, {"lr", "state", "schedule"} | set(self._numbers()), who)
        state, shapes = None, None
        if sd["state"] is not None:
            if not isinstance(sd["state"], (list, tuple)):
                raise TypeError(f"{who}: state must be None or a list, got {sd['state']!r:.100}")
            state = [self._entry(arrays, i, who) for i, arrays in enumerate(sd["state"])]
            if state and self._state_arrays():      # else nothing to check at the next step
                shapes = [(s[0].shape, s[0].dtype) if isinstance(s, tuple) else (s.shape, s.dtype)
                          for s in state]
        numbers = {k: self._number(k, sd[k], who) for k in self._numbers()}
        lr = _finite_float(sd["lr"], "lr", who)
        if (sd["schedule"] is None) != (self.schedule is None):
            raise ValueError(f"{who}: the state has {'no' if sd['schedule'] is None else 'a'} "
                             f"schedule, this optimizer {'has' if self.schedule else 'has none'}")
        if self.schedule is not None:
            self.schedule.load_state_dict(sd["schedule"])
        self.lr, self.state, self._shapes = lr, state, shapes
        for k, v in numbers.items():
            setattr(self, k, v)

    def _state_arrays(self):
        """How many arrays one parameter's state holds once made (SGD: its momentum buffer,
        none without momentum; Adam: m and v)."""
        return 1 if getattr(self, "momentum", 0) else 0

    def _entry(self, arrays, i, who):
        """One parameter's state from its list of arrays (checked: count, dtype, finite)."""
        count = self._state_arrays()
        if not isinstance(arrays, (list, tuple)) or len(arrays) != count:
            raise ValueError(f"{who}: parameter {i}'s state must be a list of {count} "
                             f"arrays, got {arrays!r:.100}")
        out = []
        for a in arrays:
            if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64) \
                    or a.shape != arrays[0].shape or a.dtype != arrays[0].dtype:
                raise ValueError(f"{who}: parameter {i}'s state must hold float32 / float64 "
                                 "NumPy arrays of one shape and dtype")
            if not np.isfinite(a).all():
                raise ValueError(f"{who}: parameter {i}'s state holds NaN or infinity")
            out.append(np.array(a, order="C"))
        if not out:
            return None
        return tuple(out) if count > 1 else out[0]

    def _prepare(self, params):
        """(Re)create the state when the parameters' count, shapes or dtypes changed."""
        shapes = [(p.shape, p.dtype) for p in params]
        if shapes != self._shapes:
            self._shapes = shapes
            self.state = [None] * len(params)
            self._init_state(params)

    def _numbers(self):
        """Names of the plain numbers of the state besides lr (Adam: its step count t)."""
        return ()

    @staticmethod
    def _number(name, value, who):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value <= 2**53:
            raise ValueError(f"{who}: {name} must be an int in [0, 2**53], got {value!r:.100}")
        return int(value)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"


class SGD(Optimizer):
    """Stochastic gradient descent, PyTorch's rule (dampening 0), one
    ``fastnn.kernels.sgd_step`` per parameter:

    g = grad + weight_decay * W + l1 * sign(W)        (weights only)
    buf = g (first step), else momentum * buf + g
    g = g + momentum * buf if nesterov else buf       (when momentum > 0)
    W -= lr * g

    Parameters
    ----------
    lr : float, default 0.01
        Learning rate.
    momentum : float, default 0.0
        Momentum factor (0: plain SGD).
    nesterov : bool, default False
        Nesterov momentum.
    weight_decay : float, default 0.0
        L2 penalty added to the gradient of weights (not biases nor BatchNorm).
    l1 : float, default 0.0
        L1 penalty: adds ``l1 * sign(W)`` to the gradient of weights.
    schedule : Schedule or None
        A learning-rate schedule bound to this optimizer (or pass it to ``fit`` as a
        callback).
    clipnorm, global_clipnorm, clipvalue : float or None
        Keras' gradient clipping, before weight decay and the update: each parameter's
        gradient to that L2 norm, all of them together to that norm (as
        ``torch.nn.utils.clip_grad_norm_``), or each element to ``[-clipvalue, clipvalue]``.

    Examples
    --------
    >>> import fastnn as fn
    >>> opt = fn.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4, global_clipnorm=5.0)
    """

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, l1=0.0, *,
                 schedule=None, **clip):
        who = "SGD"
        self.momentum = nonnegative(momentum, "momentum", who)
        self.nesterov = bool(nesterov)
        self.weight_decay = nonnegative(weight_decay, "weight_decay", who)
        self.l1 = nonnegative(l1, "l1", who)
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        super().__init__(lr, schedule, **clip)

    def _update(self, params, grads, decay):
        state = self.state
        for i, (p, g) in enumerate(zip(params, grads)):
            weight = decay is None or decay[i]
            state[i] = kernels.sgd_step(
                p, g, state[i], lr=self.lr, momentum=self.momentum,
                weight_decay=self.weight_decay if weight else 0.0,
                l1=self.l1 if weight else 0.0, nesterov=self.nesterov)

    def get_config(self):
        return self._config(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                            weight_decay=self.weight_decay, l1=self.l1)


class Adam(Optimizer):
    """Adam, PyTorch's rule (L2 ``weight_decay`` added to the gradient, weights only),
    one ``fastnn.kernels.adam_step`` per parameter:

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    W -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate.
    betas : (float, float), default (0.9, 0.999)
        Decay rates (b1, b2) of the first and second moment estimates.
    eps : float, default 1e-8
        Added to the denominator.
    weight_decay : float, default 0.0
        L2 penalty added to the gradient of weights (for decoupled decay: ``AdamW``).
    schedule : Schedule or None
        A learning-rate schedule bound to this optimizer (or pass it to ``fit`` as a
        callback).
    clipnorm, global_clipnorm, clipvalue : float or None
        Keras' gradient clipping, before weight decay and the update: each parameter's
        gradient to that L2 norm, all of them together to that norm (as
        ``torch.nn.utils.clip_grad_norm_``), or each element to ``[-clipvalue, clipvalue]``.
    """

    decoupled = False       # AdamW: decay the weights, not the gradient

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 schedule=None, **clip):
        who = type(self).__name__
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{who}: betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = nonnegative(eps, "eps", who)
        self.weight_decay = nonnegative(weight_decay, "weight_decay", who)
        self.t = 0
        super().__init__(lr, schedule, **clip)

    def _state_arrays(self):
        return 2

    def _numbers(self):
        return ("t",)

    def state_dict(self):
        return {**super().state_dict(), "t": self.t}

    def _init_state(self, params):
        self.t = 0
        self.state = [(backend.get_array_module(p).zeros_like(p),
                       backend.get_array_module(p).zeros_like(p)) for p in params]

    def reset(self):
        super().reset()
        self.t = 0

    def _update(self, params, grads, decay):
        self.t += 1
        b1, b2 = self.betas
        for i, (p, g) in enumerate(zip(params, grads)):
            m, v = self.state[i]
            weight = decay is None or decay[i]
            kernels.adam_step(p, g, m, v, lr=self.lr, step=self.t, beta1=b1, beta2=b2,
                              eps=self.eps, weight_decay=self.weight_decay if weight else 0.0,
                              decoupled=self.decoupled)

    def get_config(self):
        return self._config(lr=self.lr, betas=list(self.betas), eps=self.eps,
                            weight_decay=self.weight_decay)


class AdamW(Adam):
    """AdamW, torch.optim.AdamW's rule: Adam whose ``weight_decay`` is decoupled from
    the gradient (weights only), one ``fastnn.kernels.adam_step(..., decoupled=True)``
    per parameter: ``W *= 1 - lr * weight_decay``, then Adam's update without L2.

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment estimates.
    eps : float, default 1e-8
        Added to the denominator.
    weight_decay : float, default 1e-2
        Decoupled weight decay of the weights (not biases nor BatchNorm).
    schedule : Schedule or None
        A learning-rate schedule bound to this optimizer (or pass it to ``fit`` as a
        callback).
    clipnorm, global_clipnorm, clipvalue : float or None
        Keras' gradient clipping, before weight decay and the update: each parameter's
        gradient to that L2 norm, all of them together to that norm (as
        ``torch.nn.utils.clip_grad_norm_``), or each element to ``[-clipvalue, clipvalue]``.
    """
    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 schedule=None, **clip):
        super().__init__(lr, betas, eps, weight_decay, schedule=schedule, **clip)


class RMSprop(Optimizer):
    """RMSprop, torch.optim.RMSprop's rule (centered=False), one
    ``fastnn.kernels.rmsprop_step`` per parameter:

    g = grad + weight_decay * W  (weights only);  s = alpha s + (1 - alpha) g^2;
    d = g / (sqrt(s) + eps);  buf = momentum buf + d, d = buf (momentum > 0);  W -= lr d

    Parameters
    ----------
    lr : float, default 1e-2
        Learning rate.
    alpha : float, default 0.99
        Smoothing constant of the squared-gradient average.
    eps : float, default 1e-8
        Added to the denominator.
    momentum : float, default 0.0
        Momentum factor.
    weight_decay : float, default 0.0
        L2 penalty added to the gradient of weights.
    schedule : Schedule or None
        A learning-rate schedule bound to this optimizer (or pass it to ``fit`` as a
        callback).
    clipnorm, global_clipnorm, clipvalue : float or None
        Keras' gradient clipping, before weight decay and the update: each parameter's
        gradient to that L2 norm, all of them together to that norm (as
        ``torch.nn.utils.clip_grad_norm_``), or each element to ``[-clipvalue, clipvalue]``.
    """

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0, *,
                 schedule=None, **clip):
        who = "RMSprop"
        self.alpha = nonnegative(alpha, "alpha", who)
        if self.alpha > 1:
            raise ValueError(f"{who}: alpha must be in [0, 1], got {alpha!r}")
        self.eps = nonnegative(eps, "eps", who)
        self.momentum = nonnegative(momentum, "momentum", who)
        self.weight_decay = nonnegative(weight_decay, "weight_decay", who)
        super().__init__(lr, schedule, **clip)

    def _state_arrays(self):
        return 2 if self.momentum else 1

    def _init_state(self, params):
        zeros = [backend.get_array_module(p).zeros_like for p in params]
        self.state = [(z(p), z(p)) if self.momentum else z(p) for z, p in zip(zeros, params)]

    def _update(self, params, grads, decay):
        for i, (p, g) in enumerate(zip(params, grads)):
            square_avg, buf = self.state[i] if self.momentum else (self.state[i], None)
            weight = decay is None or decay[i]
            kernels.rmsprop_step(p, g, square_avg, buf, lr=self.lr, alpha=self.alpha,
                                 eps=self.eps, momentum=self.momentum,
                                 weight_decay=self.weight_decay if weight else 0.0)

    def get_config(self):
        return self._config(lr=self.lr, alpha=self.alpha, eps=self.eps,
                            momentum=self.momentum, weight_decay=self.weight_decay)


_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def get(optimizer):
    """An Optimizer from ``optimizer``: an instance (returned as is), a class (built with
    its defaults) or a name ("sgd", "adam", "adamw", "rmsprop")."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        return optimizer()
    if isinstance(optimizer, str) and optimizer.lower() in _BY_NAME:
        return _BY_NAME[optimizer.lower()]()
    raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {sorted(_BY_NAME)} "
                     "or a fastnn.optim.Optimizer instance")


# --- learning-rate schedules ----------------------------------------------------
class Schedule:
    """Sets ``optimizer.lr`` from the epoch count; steps once per epoch.

    Passed to an optimizer (``SGD(..., schedule=StepLR(10))``) or as a
    callback to ``fit``; it binds to the optimizer it is given (or to the
    network's, as a callback) and takes that optimizer's lr as its base.
    """

    def __init__(self):
        self.optimizer = None
        self.base_lr = None
        self.epoch = 0

    def bind(self, optimizer):
        """Follow ``optimizer`` from its current lr (a no-op when already bound to it;
        ``None`` unbinds)."""
        if self.optimizer is not optimizer:
            self.optimizer, self.epoch = optimizer, 0
            self.base_lr = None if optimizer is None else optimizer.lr

    def lr_at(self, epoch):
        """The learning rate at ``epoch`` (0 for the first epoch; a batch count for the
        schedules that step per batch), from ``self.base_lr``."""
        raise NotImplementedError

    def get_config(self):
        """The constructor's arguments (what ``fastnn.saving`` stores)."""
        raise NotImplementedError

    def state_dict(self):
        """Its position: ``{"epoch": int, "base_lr": float or None}``."""
        return {"epoch": self.epoch, "base_lr": self.base_lr}

    def load_state_dict(self, state_dict):
        """Put back a ``state_dict()`` (the optimizer it is bound to stays)."""
        who = f"{type(self).__name__}.load_state_dict"
        sd = _checked_keys(state_dict, ("epoch", "base_lr"), who)
        epoch = Optimizer._number("epoch", sd["epoch"], who)
        base_lr = None if sd["base_lr"] is None else _finite_float(sd["base_lr"], "base_lr", who)
        self.epoch, self.base_lr = epoch, base_lr

    def step(self):
        """One epoch done: set the optimizer's lr for the next one."""
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__}: not bound to an optimizer")
        self.epoch += 1
        self.optimizer.lr = self.lr_at(self.epoch)

    # callback hooks (see fastnn.callbacks)
    def on_train_begin(self, network):
        self.bind(network.optimizer)

    def on_epoch_end(self, network, epoch, logs):
        self.step()


class StepLR(Schedule):
    """Step decay, ``lr = base_lr * gamma ** (epoch // step_size)`` (torch's StepLR); steps
    once per epoch.

    Parameters
    ----------
    step_size : int
        Epochs between two decays.
    gamma : float, default 0.1
        Factor of each decay.

    Examples
    --------
    >>> import fastnn as fn
    >>> opt = fn.optim.SGD(lr=0.1, schedule=fn.optim.StepLR(10, gamma=0.5))
    """

    def __init__(self, step_size, gamma=0.1):
        super().__init__()
        if isinstance(step_size, bool) or not isinstance(step_size, (int, np.integer)) or step_size < 1:
            raise ValueError(f"StepLR: step_size must be a positive int, got {step_size!r}")
        self.step_size, self.gamma = int(step_size), float(gamma)

    def get_config(self):
        return {"step_size": self.step_size, "gamma": self.gamma}

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(Schedule):
    """Exponential decay, ``lr = base_lr * gamma ** epoch`` (torch's ExponentialLR); steps
    once per epoch.

    Parameters
    ----------
    gamma : float
        Factor applied at each epoch.
    """

    def __init__(self, gamma):
        super().__init__()
        self.gamma = float(gamma)

    def get_config(self):
        return {"gamma": self.gamma}

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(Schedule):
    """Cosine annealing, ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``
    (torch's CosineAnnealingLR); steps once per epoch.

    Parameters
    ----------
    T_max : int
        Epochs of the half cosine (usually the number of epochs).
    eta_min : float, default 0.0
        The lowest learning rate.
    """

    def __init__(self, T_max, eta_min=0.0):
        super().__init__()
        if isinstance(T_max, bool) or not isinstance(T_max, (int, np.integer)) or T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be a positive int, got {T_max!r}")
        self.T_max, self.eta_min = int(T_max), float(eta_min)

    def get_config(self):
        return {"T_max": self.T_max, "eta_min": self.eta_min}

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (
            1 + math.cos(math.pi * epoch / self.T_max)) / 2


class BatchSchedule(Schedule):
    """A schedule that steps once per batch, as PyTorch's OneCycleLR and warm-ups do
    (``fit`` calls ``on_batch_end`` after each batch's update); ``epoch`` counts those
    batches. It sets the optimizer's lr for step 0 when it binds."""

    def bind(self, optimizer):
        fresh = self.optimizer is not optimizer
        super().bind(optimizer)
        if fresh and optimizer is not None:
            self._apply(0)

    def _apply(self, step):
        self.optimizer.lr = self.lr_at(step)

    def step(self):
        """One batch done: set the optimizer's lr (and momentum) for the next one."""
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__}: not bound to an optimizer")
        self.epoch += 1
        self._apply(self.epoch)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.optimizer is not None:     # the lr came with the optimizer; momentum too
            self._apply(self.epoch)

    def on_batch_end(self, network, batch, logs):
        self.step()

    def on_epoch_end(self, network, epoch, logs):
        pass


def _cos_anneal(start, end, pct):
    """torch.optim.lr_scheduler.OneCycleLR's cosine from ``start`` (pct 0) to ``end`` (1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class OneCycleLR(BatchSchedule):
    """torch.optim.lr_scheduler.OneCycleLR with its defaults (cosine annealing,
    div_factor 25, final_div_factor 1e4, two phases), stepping once per batch over
    ``epochs * steps_per_epoch`` batches: lr from max_lr / 25 up to ``max_lr`` over the
    first ``pct_start`` of them, then down to max_lr / 25 / 1e4. The momentum (SGD's
    ``momentum``, Adam's beta1, RMSprop's ``momentum`` when > 0) goes 0.95 -> 0.85 -> 0.95
    the other way round, as torch's cycle_momentum does.

    Parameters
    ----------
    max_lr : float
        The peak learning rate.
    epochs : int
        Epochs of the cycle (``fit``'s ``epochs``).
    steps_per_epoch : int
        Batches per epoch (``ceil(N / batch_size)``: fit keeps the last, smaller batch).
    pct_start : float, default 0.3
        Fraction of the steps spent increasing the lr.
    """

    def __init__(self, max_lr, epochs, steps_per_epoch, pct_start=0.3):
        super().__init__()
        who = "OneCycleLR"
        self.max_lr = _finite_float(max_lr, "max_lr", who)
        for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
        self.epochs, self.steps_per_epoch = int(epochs), int(steps_per_epoch)
        if not 0 < pct_start < 1:
            raise ValueError(f"{who}: pct_start must be in (0, 1), got {pct_start!r}")
        self.pct_start = float(pct_start)
        self.total_steps = self.epochs * self.steps_per_epoch
        if self.pct_start * self.total_steps <= 1:      # torch divides by zero there
            raise ValueError(f"{who}: the warm-up phase has no step: pct_start * epochs * "
                             f"steps_per_epoch = {self.pct_start * self.total_steps:g} must "
                             "be > 1")

    def get_config(self):
        return {"max_lr": self.max_lr, "epochs": self.epochs,
                "steps_per_epoch": self.steps_per_epoch, "pct_start": self.pct_start}

    def _phase(self, step):
        """(start, end, pct) of the phase ``step`` is in, as fractions of the cycle's
        ends: 0 = the initial lr / max momentum, 1 = max_lr / base momentum, 2 = min lr."""
        up_end = self.pct_start * self.total_steps - 1
        if step <= up_end:
            return 0, 1, step / up_end
        return 1, 2, (step - up_end) / (self.total_steps - 1 - up_end)

    def lr_at(self, step):
        initial = self.max_lr / 25.0
        lrs = (initial, self.max_lr, initial / 1e4)
        start, end, pct = self._phase(step)
        return _cos_anneal(lrs[start], lrs[end], pct)

    def momentum_at(self, step):
        """The momentum (or Adam's beta1) after ``step`` batches: 0.95 -> 0.85 -> 0.95."""
        moms = (0.95, 0.85, 0.95)
        start, end, pct = self._phase(step)
        return _cos_anneal(moms[start], moms[end], pct)

    def _apply(self, step):
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR: stepped {step} times, more than its "
                             f"epochs * steps_per_epoch = {self.total_steps}")
        opt = self.optimizer
        opt.lr = self.lr_at(step)
        momentum = self.momentum_at(step)
        if isinstance(opt, Adam):
            opt.betas = (momentum, opt.betas[1])
        elif isinstance(opt, SGD) or (isinstance(opt, RMSprop) and opt.momentum):
            opt.momentum = momentum


class LinearWarmup(BatchSchedule):
    """lr from base_lr / steps up to base_lr over ``steps`` batches (torch's
    ``LinearLR(start_factor=1 / steps, total_iters=steps)``), base_lr being the
    optimizer's lr when it binds; then ``then`` (another schedule, or None: lr stays)
    takes over from base_lr, stepping as it does (per epoch, or per batch).

    Parameters
    ----------
    steps : int
        Batches of warm-up.
    then : Schedule or None
        The schedule that follows, e.g. ``CosineAnnealingLR(T_max=epochs)``.
    """

    def __init__(self, steps, then=None):
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"LinearWarmup: steps must be a positive int, got {steps!r}")
        if isinstance(then, dict):         # as get_config stores it
            then = globals()[then["class"]](**then["config"])
        if then is not None and not isinstance(then, Schedule):
            raise TypeError(f"LinearWarmup: then must be a Schedule or None, got {then!r:.80}")
        self.steps, self.then = int(steps), then

    def get_config(self):
        then = None if self.then is None else {"class": type(self.then).__name__,
                                               "config": self.then.get_config()}
        return {"steps": self.steps, "then": then}

    def lr_at(self, step):
        start = 1.0 / self.steps
        return self.base_lr * (start + (1.0 - start) * min(step, self.steps) / self.steps)

    def _apply(self, step):
        if step < self.steps or self.then is None:
            self.optimizer.lr = self.lr_at(step)
        elif self.then.optimizer is not self.optimizer:     # hand over at base_lr
            self.optimizer.lr = self.base_lr
            self.then.bind(self.optimizer)
        elif isinstance(self.then, BatchSchedule):
            self.then.step()

    def on_epoch_end(self, network, epoch, logs):
        if self.then is not None and self.then.optimizer is self.optimizer \
                and not isinstance(self.then, BatchSchedule):
            self.then.step()

    def state_dict(self):
        return {**super().state_dict(),
                "then": None if self.then is None else self.then.state_dict()}

    def bind(self, optimizer):
        if self.then is not None and self.optimizer is not optimizer:
            self.then.bind(None)           # it takes over again after a new warm-up
        super().bind(optimizer)

    def load_state_dict(self, state_dict):
        """Put back a ``state_dict()`` (``then``'s position included; the lr comes with
        the optimizer's state)."""
        who = "LinearWarmup.load_state_dict"
        sd = _checked_keys(state_dict, ("epoch", "base_lr", "then"), who)
        Schedule.load_state_dict(self, {"epoch": sd["epoch"], "base_lr": sd["base_lr"]})
        if self.then is None or sd["then"] is None:
            return
        if self.optimizer is not None and self.epoch >= self.steps:
            self.then.bind(self.optimizer)
        self.then.load_state_dict(sd["then"])
