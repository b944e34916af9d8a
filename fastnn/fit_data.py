"""What ``Network.fit`` trains on: its ``x`` / ``y`` (arrays, or an iterable of batches),
``validation_split``, and the per-sample weights of ``class_weight`` / ``sample_weight``,
turned into a batch source for fit's ``_Epoch``."""
import math

import numpy as np

from . import backend, data

WHO = "Network.fit"


class Weighted:
    """Targets ``y`` with a weight per sample ``w`` that ``data.batches`` slices and
    shuffles together (it indexes ``y`` only through ``shape`` and ``[]``)."""

    def __init__(self, y, w):
        self.y, self.w = y, w
        self.shape = y.shape

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return Weighted(self.y[index], self.w[index])


def split(yb):
    """``(targets, weights or None)`` of a batch's ``yb``."""
    return (yb.y, yb.w) if isinstance(yb, Weighted) else (yb, None)


class ArraySource:
    """Batches of arrays ``x``, ``y`` (``y`` maybe ``Weighted``), reshuffled every epoch
    from fit's generator when ``shuffle`` (as ``data.batches`` does)."""

    def __init__(self, x, y, batch_size, shuffle, probe):
        self.x, self.y, self.batch_size, self.shuffle, self.probe = x, y, batch_size, shuffle, probe
        self.n_batches = -(-len(x) // batch_size)

    def batches(self, rng):
        return data.batches(self.x, self.y, self.batch_size, shuffle=self.shuffle, seed=rng)


class StreamSource:
    """Batches ``(xb, yb)`` drawn from an iterable, each checked as fit checks arrays;
    ``n_batches`` of them an epoch (``steps_per_epoch``, else ``len(iterable)``). A
    re-iterable (list, data loader) starts over every epoch; a one-shot iterator
    (a generator) goes on where the last epoch stopped. ``shuffle`` does not apply."""

    def __init__(self, network, iterable, steps_per_epoch):
        self.network, self.iterable = network, iterable
        self.once = iter(iterable) is iterable
        if steps_per_epoch is None:
            if self.once or not hasattr(iterable, "__len__"):
                raise ValueError(f"{WHO}: x is an iterator of batches without a length: pass "
                                 "steps_per_epoch (the batches of one epoch)")
            steps_per_epoch = len(iterable)
        self.n_batches = _count(steps_per_epoch, "steps_per_epoch")
        self.probe = None
        first = next(iter(iterable), None)
        if first is None:
            raise ValueError(f"{WHO}: x (an iterable of batches) yielded no batch")
        first = self._checked(first, 0)           # sets the probe
        self.pending = first if self.once else None   # a re-iterable yields it again

    def _checked(self, batch, b):
        who = f"{WHO} (batch {b + 1} of the iterable x)"
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"{who}: x must yield pairs (xb, yb), got {type(batch).__name__}")
        xb = self.network._as_input(batch[0], who, move=False)
        if self.probe is None:
            self.probe = self.network._probe(xb, who)
        return xb, self.network._as_target(batch[1], len(xb), self.probe, who, move=False)

    def batches(self, rng):
        """The epoch's ``n_batches`` batches (``rng`` unused: the iterable sets the order)."""
        stream = self.iterable if self.once else iter(self.iterable)
        for b in range(self.n_batches):
            if self.pending is not None:
                batch, self.pending = self.pending, None
            else:
                batch = next(stream, None)
                if batch is None:
                    raise ValueError(f"{WHO}: x ran out of batches after {b} of an epoch's "
                                     f"{self.n_batches} (steps_per_epoch)")
                batch = self._checked(batch, b)
            yield batch


def _count(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{WHO}: {name} must be a positive int, got {value!r}")
    return int(value)


def _fraction(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{WHO}: validation_split must be a number in [0, 1), got {value!r}")
    return float(value)


def held_out(x, y, validation_split, validation_data, sample_weight):
    """``(x, y, sample_weight, validation_data)`` with the last ``validation_split`` of the
    samples held out (before shuffling; Keras' split point floor(N * (1 - split)))."""
    fraction = _fraction(validation_split)
    if not backend.is_cuda_array(y):
        y = np.asarray(y)
    if not fraction:
        return x, y, sample_weight, validation_data
    if validation_data is not None:
        raise ValueError(f"{WHO}: give validation_data or validation_split, not both")
    n = len(x)
    at = int(math.floor(n * (1.0 - fraction)))
    if at == 0 or at == n:
        raise ValueError(f"{WHO}: validation_split={fraction} of {n} samples leaves "
                         f"{at} to train on and {n - at} to validate on; both must be > 0")
    if sample_weight is not None:
        sample_weight = sample_weight[:at]
    return x[:at], y[:at], sample_weight, (x[at:], y[at:])


def sample_weights(y, n, class_weight, sample_weight, network):
    """The per-sample weights (N,) of the network's dtype, or None: ``sample_weight`` times
    ``class_weight[class of sample]`` (the class: an int label, or a one-hot's argmax)."""
    if class_weight is None and sample_weight is None:
        return None
    if network._style != "compile":
        raise ValueError(f"{WHO}: class_weight / sample_weight need compile() (a fastnn loss)")
    w = np.ones(n)
    if sample_weight is not None:
        sw = np.asarray(backend.to_device(sample_weight, "cpu"), dtype=np.float64)
        if sw.shape != (n,):
            raise ValueError(f"{WHO}: sample_weight must have shape ({n},) (one weight per "
                             f"sample of x), got {sw.shape}")
        w = w * sw
    if class_weight is not None:
        w = w * _class_weights(class_weight, y, n)
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"{WHO}: sample and class weights must be finite and >= 0")
    return w.astype(network.dtype)


def _class_weights(class_weight, y, n):
    """Each sample's ``class_weight`` (labels, one-hot rows' argmax, or 0/1 targets)."""
    if not isinstance(class_weight, dict):
        raise TypeError(f"{WHO}: class_weight must be a dict class -> weight, got "
                        f"{type(class_weight).__name__}")
    try:
        labels = data._class_labels(y, WHO)
    except ValueError:
        raise ValueError(f"{WHO}: class_weight needs class labels (integers or one-hot) "
                         "in y, got non-integer values") from None
    table = {int(k): float(v) for k, v in class_weight.items()}
    missing = sorted(set(np.unique(labels).tolist()) - set(table))
    if missing:
        raise ValueError(f"{WHO}: class_weight has no weight for the classes {missing[:10]}")
    return np.array([table[c] for c in labels.tolist()])


def source(network, x, y, batch_size, shuffle, steps_per_epoch, w):
    """fit's batch source: a ``StreamSource`` for an iterable ``x`` (``y`` None), else an
    ``ArraySource`` over the checked arrays (``y`` ``Weighted`` by ``w`` when given)."""
    probe = network._probe(x, WHO)
    y = network._as_target(y, len(x), probe, WHO, move=False)
    if w is not None:
        y = Weighted(y, w)
    if steps_per_epoch is not None:
        raise ValueError(f"{WHO}: steps_per_epoch is for an iterable x of batches; arrays "
                         "are split into batches by batch_size")
    return ArraySource(x, y, network._batch_size(batch_size, len(x), WHO), shuffle, probe)


def fit_source(network, x, y, batch_size, shuffle, split, val, class_weight, weights, steps):
    """fit's batches, with ``.validation_data`` (given, or held out by ``split``): arrays
    checked once here (moved to the device batch by batch in the loop), or an
    iterable's batches checked as they come."""
    if y is None and not hasattr(x, "shape") and hasattr(x, "__iter__"):
        if split or class_weight is not None or weights is not None or batch_size is not None:
            raise ValueError(f"{WHO}: validation_split, class_weight, sample_weight and "
                             "batch_size need arrays x, y, not an iterable of batches (whose "
                             "batches are as it yields them)")
        batches = StreamSource(network, x, steps)
    else:
        if y is None:
            raise ValueError(f"{WHO}: y is None: pass targets, or x as an iterable of "
                             "(xb, yb) batches")
        x = network._as_input(x, WHO, move=False)
        x, y, weights, val = held_out(x, y, split, val, weights)
        weights = sample_weights(y, len(x), class_weight, weights, network)
        batches = source(network, x, y, batch_size, shuffle, steps, weights)
    batches.validation_data = val
    return batches
