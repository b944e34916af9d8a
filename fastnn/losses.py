"""Losses.

Tutorial style: ``mse(y_true, y_pred)`` and ``mse_prime(y_true, y_pred)``.
Classes (also accepted by name in ``Network.compile``): ``loss(y_pred, y_true)``
-> float (mean over the batch), ``loss.grad(y_pred, y_true)`` -> array.
"""
import numpy as np

from . import backend, kernels

__all__ = ["mse", "mse_prime", "Loss", "MSE", "BinaryCrossEntropy", "CrossEntropy", "get"]


# --- the tutorial's functions -------------------------------------------------
def mse(y_true, y_pred):
    """The tutorial's loss: the mean squared error over all elements,
    ``mean((y_true - y_pred) ** 2)``. ``y_true`` and ``y_pred``: arrays of one shape."""
    return backend.get_array_module(y_pred).mean((y_true - y_pred) ** 2)


def mse_prime(y_true, y_pred):
    """The tutorial's loss derivative: d mse / d y_pred = ``2 (y_pred - y_true) / size``,
    the shape of ``y_pred`` (``y_true`` of the same shape)."""
    return 2 * (y_pred - y_true) / y_true.size


def same_sample_shape(a, b):
    """True when shapes ``a`` and ``b`` hold the same samples up to axes of size 1:
    (N,), (N, 1) and (N, 1, 1) agree; (N, 2, 3) and (N, 3, 2) do not."""
    return (len(a) >= 1 and len(b) >= 1 and a[0] == b[0]
            and [d for d in a[1:] if d != 1] == [d for d in b[1:] if d != 1])


# --- classes -------------------------------------------------------------------
class Loss:
    """Base class of the losses: ``loss(y_pred, y_true) -> float`` (mean over the batch),
    ``loss.grad(y_pred, y_true) -> array`` (the shape of ``y_pred``); subclasses implement
    ``_loss_and_grad`` on already-checked arrays.

    ``y_pred`` is the network's output ``(N, ...)``; ``y_true`` has the same samples
    (for ``CrossEntropy`` also integer labels ``(N,)``).
    """

    name = None

    def __call__(self, y_pred, y_true):
        """Mean loss over the batch, a Python float."""
        loss, _ = self.loss_and_grad(y_pred, y_true)
        return float(loss)

    def grad(self, y_pred, y_true):
        """d loss / d y_pred, the shape of ``y_pred``; ``y_true`` the targets."""
        return self.loss_and_grad(y_pred, y_true)[1]

    def loss_and_grad(self, y_pred, y_true):
        """``(loss, grad)`` of ``y_pred`` against ``y_true`` in one pass: loss a scalar
        (0-d array on CUDA), grad the shape of ``y_pred``."""
        y_pred, y_true = self.check(y_pred, y_true)
        return self._loss_and_grad(y_pred, y_true)

    def check(self, y_pred, y_true):
        """Validate and return ``(y_pred, y_true)`` ready for ``_loss_and_grad``."""
        who = type(self).__name__
        for name, a in (("y_pred", y_pred), ("y_true", y_true)):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise TypeError(f"{who}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
        if y_pred.dtype not in (np.float32, np.float64):
            raise TypeError(f"{who}: y_pred must be float32 or float64, got {y_pred.dtype}")
        if tuple(y_true.shape) != tuple(y_pred.shape):
            # (N,) targets against (N, 1) outputs, or the tutorial's (N, 1, k) rows
            if same_sample_shape(y_true.shape, y_pred.shape):
                y_true = y_true.reshape(y_pred.shape)
            else:
                raise ValueError(f"{who}: y_true must have the shape of y_pred "
                                 f"{tuple(y_pred.shape)}, got {tuple(y_true.shape)}")
        if y_pred.size == 0:
            raise ValueError(f"{who}: the mean loss of an empty y_pred (shape "
                             f"{tuple(y_pred.shape)}) is undefined")
        if y_true.dtype != y_pred.dtype:
            y_true = y_true.astype(y_pred.dtype)
        return y_pred, y_true

    def _loss_and_grad(self, y_pred, y_true):
        raise NotImplementedError

    def weighted_loss_and_grad(self, y_pred, y_true, sample_weight):
        """``(loss, grad)`` with a weight per sample, Keras' rule: loss =
        sum(w_i * loss_i) / N, loss_i the loss of sample i alone; grad row i is the
        unweighted gradient's row times w_i. ``y_pred``, ``y_true``: as for
        ``loss_and_grad``; ``sample_weight``: (N,) numbers >= 0."""
        y_pred, y_true = self.check(y_pred, y_true)
        w = sample_weight
        if not hasattr(w, "shape") or tuple(w.shape) != (len(y_pred),):
            raise ValueError(f"{type(self).__name__}: sample_weight must have shape "
                             f"({len(y_pred)},), got {getattr(w, 'shape', type(w).__name__)}")
        return self._weighted_loss_and_grad(y_pred, y_true, w)

    def _weighted_loss_and_grad(self, y_pred, y_true, w):
        xp = backend.get_array_module(y_pred)
        w = xp.asarray(w, dtype=y_pred.dtype)
        _, grad = self._loss_and_grad(y_pred, y_true)
        loss = (w * self._per_sample(y_pred, y_true)).sum() / len(w)
        return loss, grad * w.reshape((-1,) + (1,) * (grad.ndim - 1))

    def _per_sample(self, y_pred, y_true):
        """The loss of each sample alone, (N,) (its mean over the batch is the loss)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample loss, so no "
                                  "sample or class weights")

    def get_config(self):
        """The constructor's arguments as a JSON-able dict (what ``Network.save`` stores)."""
        return {}

    def __repr__(self):
        return f"{type(self).__name__}()"


class MSE(Loss):
    """Mean over all elements of (y_pred - y_true)^2."""

    name = "mse"

    def _loss_and_grad(self, y_pred, y_true):
        diff = y_pred - y_true
        loss = (diff * diff).mean()
        diff *= diff.dtype.type(2.0 / diff.size)
        return loss, diff

    def _per_sample(self, y_pred, y_true):
        diff = (y_pred - y_true).reshape(len(y_pred), -1)
        return (diff * diff).mean(axis=1)


class BinaryCrossEntropy(Loss):
    """Binary cross-entropy, ``-mean(y log p + (1 - y) log(1 - p))`` on probabilities p
    (after a ``Sigmoid``), clipped to [eps, 1 - eps]: no NaN at 0 or 1.

    Parameters
    ----------
    eps : float, default 1e-7
        The clipping margin.

    Shapes
    ------
    ``y_pred`` and ``y_true``: ``(N,)``, ``(N, 1)`` or ``(N, K)``, values in [0, 1].
    """

    name = "binary_cross_entropy"

    def __init__(self, eps=1e-7):
        self.eps = float(eps)

    def check(self, y_pred, y_true):
        y_pred, y_true = super().check(y_pred, y_true)
        self.check_targets(y_true, "BinaryCrossEntropy")
        return y_pred, y_true

    @staticmethod
    def check_targets(y_true, who):
        """Targets are probabilities: values outside [0, 1] would give a meaningless loss."""
        if y_true.size:
            lo, hi = float(y_true.min()), float(y_true.max())
            if lo < 0 or hi > 1:
                raise ValueError(f"{who}: binary cross-entropy targets must lie in [0, 1], "
                                 f"got values in [{lo:g}, {hi:g}]")

    def _loss_and_grad(self, y_pred, y_true):
        xp = backend.get_array_module(y_pred)
        p = xp.clip(y_pred, self.eps, 1 - self.eps)
        loss = -(y_true * xp.log(p) + (1 - y_true) * xp.log(1 - p)).mean()
        grad = (p - y_true) / (p * (1 - p) * p.size)
        return loss, grad.astype(y_pred.dtype, copy=False)

    def _per_sample(self, y_pred, y_true):
        xp = backend.get_array_module(y_pred)
        p = xp.clip(y_pred, self.eps, 1 - self.eps)
        each = -(y_true * xp.log(p) + (1 - y_true) * xp.log(1 - p))
        return each.reshape(len(y_pred), -1).mean(axis=1)

    def get_config(self):
        return {"eps": self.eps}


class CrossEntropy(Loss):
    """Softmax + negative log-likelihood on **logits** (N, C), log-sum-exp stable.

    ``y_true``: integer labels (N,) in [0, C) or one-hot / probabilities (N, C).
    The gradient is ``(softmax(logits) - onehot) / N``; a Network ending in
    ``Softmax`` feeds this loss its logits so the pair fuses to ``p - y``.
    """

    name = "cross_entropy"

    def check(self, y_pred, y_true):
        who = "CrossEntropy"
        if getattr(y_pred, "dtype", None) not in (np.float32, np.float64):
            raise TypeError(f"{who}: expected float32 or float64 logits, got "
                            f"{getattr(y_pred, 'dtype', type(y_pred).__name__)}")
        if y_pred.ndim != 2:
            raise ValueError(f"{who}: expected logits of shape (N, C), got {tuple(y_pred.shape)}")
        if not hasattr(y_true, "ndim"):
            raise TypeError(f"{who}: y_true must be a NumPy or CuPy array, got {type(y_true).__name__}")
        kernels.check_logits_not_empty(who, y_pred.shape)
        xp = backend.get_array_module(y_pred)
        n, c = y_pred.shape
        if y_true.ndim == 1:
            if y_true.dtype.kind not in "iu":
                raise TypeError(f"{who}: 1-D y_true must hold integer class labels, got {y_true.dtype}")
            if len(y_true) != n:
                raise ValueError(f"{who}: {n} rows of logits but {len(y_true)} labels")
            if n and (int(y_true.min()) < 0 or int(y_true.max()) >= c):
                raise ValueError(f"{who}: labels must lie in [0, {c}), got range "
                                 f"[{int(y_true.min())}, {int(y_true.max())}]")
            return y_pred, xp.ascontiguousarray(y_true, dtype=xp.int64)
        if y_true.ndim == 2:
            if tuple(y_true.shape) != (n, c):
                raise ValueError(f"{who}: one-hot y_true must have shape {(n, c)}, "
                                 f"got {tuple(y_true.shape)}")
            return y_pred, xp.ascontiguousarray(y_true, dtype=y_pred.dtype)
        raise ValueError(f"{who}: y_true must be labels (N,) or one-hot (N, C), "
                         f"got shape {tuple(y_true.shape)}")

    def _loss_and_grad(self, y_pred, y_true):
        if not y_pred.flags.c_contiguous:
            y_pred = backend.get_array_module(y_pred).ascontiguousarray(y_pred)
        return kernels._impl(y_pred).softmax_cross_entropy(y_pred, y_true)

    def _per_sample(self, y_pred, y_true):
        xp = backend.get_array_module(y_pred)
        shifted = y_pred - y_pred.max(axis=1, keepdims=True)
        log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        if y_true.ndim == 1:
            return -log_p[xp.arange(len(y_pred)), y_true]
        return -(y_true * log_p).sum(axis=1)


_BY_NAME = {cls.name: cls for cls in (MSE, BinaryCrossEntropy, CrossEntropy)}


def get(loss):
    """A Loss instance from ``loss``: a name (``"mse"``, ``"binary_cross_entropy"``,
    ``"cross_entropy"``), a Loss class or a Loss instance."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, type) and issubclass(loss, Loss):
        return loss()
    if isinstance(loss, str) and loss in _BY_NAME:
        return _BY_NAME[loss]()
    raise ValueError(f"unknown loss {loss!r}: expected one of {sorted(_BY_NAME)} or a "
                     "fastnn.losses.Loss instance (tutorial functions go to Network.use)")
