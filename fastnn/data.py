"""Data helpers: a stratified train/validation/test split and a mini-batch iterator.

Both work on NumPy and CuPy arrays (indices are made on the host with NumPy's
``Generator`` and moved to the arrays' device), so the same seed gives the same
split and the same batch order on either device.
"""
import numpy as np

from . import backend

__all__ = ["train_val_test_split", "batches"]


def _rng(seed, who):
    """A ``numpy.random.Generator`` from ``None``, an int or a Generator."""
    if seed is None or isinstance(seed, np.random.Generator):
        return np.random.default_rng(seed)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{who}: seed must be None, an int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _length(a, name, who):
    """Number of samples (first dimension) of ``a``, with a clear error for non-arrays."""
    if not hasattr(a, "shape") or not hasattr(a, "__getitem__"):
        raise TypeError(f"{who}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if len(a.shape) == 0:
        raise ValueError(f"{who}: {name} must have a sample dimension, got a scalar")
    return int(a.shape[0])


def _check_same_length(x, y, who):
    n = _length(x, "x", who)
    if y is not None and _length(y, "y", who) != n:
        raise ValueError(f"{who}: x and y must have the same number of samples, "
                         f"got len(x)={n} and len(y)={_length(y, 'y', who)}")
    return n


def _take(a, idx):
    """``a[idx]`` with host indices ``idx`` moved to ``a``'s device."""
    xp = backend.get_array_module(a)
    return a[xp.asarray(idx)]


def _class_labels(y, who):
    """int64 labels ``(N,)`` from labels, one-hot ``(N, C)`` or the tutorial's ``(N, 1, C)``."""
    y = np.asarray(backend.to_device(y, "cpu"))
    if y.ndim >= 2:
        flat = y.reshape(len(y), -1)
        if flat.shape[1] == 1:
            y = flat[:, 0]
        else:
            return np.argmax(flat, axis=1)
    if not np.all(y == np.round(y)):
        raise ValueError(f"{who}: stratify=True needs class labels (integers or one-hot) in y, "
                         f"got non-integer values; pass stratify=False for regression targets")
    return y.astype(np.int64)


def _allocate(counts, total, rng):
    """Split ``total`` items over classes in proportion to ``counts`` (largest remainder).

    Ties between equal remainders are broken at random so no class is favoured.
    """
    exact = counts * (total / counts.sum())
    taken = np.floor(exact).astype(np.int64)
    remainder = exact - taken
    order = np.lexsort((rng.random(len(counts)), -remainder))
    taken[order[: total - taken.sum()]] += 1
    return taken


def _fraction(value, name, who):
    if isinstance(value, bool) or not isinstance(value, (float, int, np.floating, np.integer)):
        raise TypeError(f"{who}: {name} must be a fraction in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{who}: {name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def train_val_test_split(x, y, val=0.1, test=0.1, seed=None, stratify=True):
    """Shuffle and split into ``((x_tr, y_tr), (x_val, y_val), (x_te, y_te))``.

    ``val`` and ``test`` are the fractions of samples in the validation and
    test sets (``round(fraction * N)`` samples each); the rest is training.
    With ``stratify=True`` every set keeps the class proportions of ``y``
    (labels ``(N,)``, one-hot ``(N, C)`` or ``(N, 1, C)``), as
    scikit-learn's stratified split does. Each set comes out shuffled.

    Parameters
    ----------
    x : array (N, ...)
        The samples.
    y : array (N,) or (N, C)
        Their targets.
    val, test : float in [0, 1)
        Fractions of the samples in the validation and test sets.
    seed : int, numpy.random.Generator or None
        The shuffling's seed.
    stratify : bool, default True
        Keep the class proportions in every set.
    """
    who = "train_val_test_split"
    if y is None:
        raise TypeError(f"{who}: y must be an array, got None")
    n = _check_same_length(x, y, who)
    val = _fraction(val, "val", who)
    test = _fraction(test, "test", who)
    n_test, n_val = int(round(test * n)), int(round(val * n))
    if n_test + n_val >= n:
        raise ValueError(f"{who}: val={val} and test={test} leave no training sample "
                         f"out of {n}")
    rng = _rng(seed, who)
    if stratify:
        labels = _class_labels(y, who)
        classes, members = np.unique(labels, return_inverse=True)
        pools = [rng.permutation(np.flatnonzero(members == k)) for k in range(len(classes))]
        counts = np.array([len(p) for p in pools], dtype=np.int64)
        test_per_class = _allocate(counts, n_test, rng)
        val_per_class = _allocate(counts - test_per_class, n_val, rng)
        parts = ([], [], [])
        for pool, nt, nv in zip(pools, test_per_class, val_per_class):
            parts[2].append(pool[:nt])
            parts[1].append(pool[nt:nt + nv])
            parts[0].append(pool[nt + nv:])
        idx_train, idx_val, idx_test = (rng.permutation(np.concatenate(p)) for p in parts)
    else:
        order = rng.permutation(n)
        idx_test, idx_val, idx_train = np.split(order, [n_test, n_test + n_val])
    return tuple((_take(x, idx), _take(y, idx)) for idx in (idx_train, idx_val, idx_test))


def batches(x, y, batch_size, shuffle=True, seed=None):
    """Iterate over mini-batches ``(xb, yb)`` that cover every sample once.

    ``batch_size`` is a positive int; the last batch is smaller when it does
    not divide ``N`` (it is kept, not dropped). ``y`` may be None, then every
    ``yb`` is None. ``seed`` (None, an int or a ``numpy.random.Generator``)
    fixes the order when ``shuffle=True``; without shuffling the batches are
    views of ``x`` and ``y`` in order.
    """
    who = "batches"
    n = _check_same_length(x, y, who)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"{who}: batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"{who}: batch_size must be a positive int, got {batch_size}")
    order = _rng(seed, who).permutation(n) if shuffle else None
    # validated above, iterated lazily below: errors come at the call, not at the first next()
    return _iterate(x, y, int(batch_size), n, order)


def _iterate(x, y, batch_size, n, order):
    for start in range(0, n, batch_size):
        if order is None:
            sl = slice(start, start + batch_size)
            yield x[sl], (None if y is None else y[sl])
        else:
            idx = order[start:start + batch_size]
            yield _take(x, idx), (None if y is None else _take(y, idx))
