"""Classification metrics: accuracy, confusion matrix, per-class report.

Every function takes ``y_true`` and ``y_pred`` in any of the forms a network
produces or consumes, on the CPU or the GPU (CuPy arrays are copied to the
host first):

- class labels, shape ``(N,)`` of integers (or of integer-valued floats);
- scores, shape ``(N, C)`` with ``C >= 2`` (logits, probabilities or one-hot):
  the class is the argmax of the last axis;
- a single score column, shape ``(N, 1)``: a binary probability, class 1 when
  it is ``>= 0.5`` (a Sigmoid output, or the tutorial's XOR targets);
- the tutorial's per-sample rows, shape ``(N, 1, C)``, are read as ``(N, C)``.
"""
import numpy as np

from . import backend

__all__ = ["accuracy", "confusion_matrix", "classification_report"]


def _to_labels(y, name, who):
    """Return int64 class labels ``(N,)`` from labels or scores (see module doc)."""
    if y is None:
        raise TypeError(f"{who}: {name} must be an array, got None")
    y = np.asarray(backend.to_device(y, "cpu"))
    if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise TypeError(f"{who}: {name} must be a numeric array, got dtype {y.dtype}")
    if y.ndim == 0:
        raise ValueError(f"{who}: {name} must have a batch dimension, got a scalar")
    if y.ndim > 2:
        # the tutorial's samples are (1, C) rows: (N, 1, C) -> (N, C)
        if any(d != 1 for d in y.shape[1:-1]):
            raise ValueError(f"{who}: {name} must be labels (N,) or scores (N, C) "
                             f"(or (N, 1, C)), got shape {y.shape}")
        y = y.reshape(y.shape[0], y.shape[-1])
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError(f"{who}: {name} contains NaN or infinite values")
    if y.ndim == 2:
        if y.shape[1] == 0:
            raise ValueError(f"{who}: {name} has no score column, shape {y.shape}")
        if y.shape[1] == 1:
            return (y[:, 0] >= 0.5).astype(np.int64)
        return np.argmax(y, axis=1).astype(np.int64)
    if y.dtype == bool:
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(y == np.round(y)):
            raise ValueError(f"{who}: {name} of shape {y.shape} must hold integer class "
                             f"labels; got non-integer values (pass scores as (N, C))")
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{who}: {name} holds a negative class label ({labels.min()})")
    return labels


def _pair(y_true, y_pred, who):
    """Both arguments as int64 labels of the same length."""
    t = _to_labels(y_true, "y_true", who)
    p = _to_labels(y_pred, "y_pred", who)
    if len(t) != len(p):
        raise ValueError(f"{who}: y_true and y_pred must have the same length, "
                         f"got {len(t)} and {len(p)}")
    if len(t) == 0:
        raise ValueError(f"{who}: got empty y_true and y_pred")
    return t, p


def accuracy(y_true, y_pred):
    """Fraction of samples whose predicted class equals the true class (a float).

    ``y_true``, ``y_pred``: labels ``(N,)`` or scores ``(N, C)`` (see the module's
    docstring for every accepted form).

    >>> import numpy as np
    >>> from fastnn import metrics
    >>> metrics.accuracy(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    0.6666666666666666
    """
    t, p = _pair(y_true, y_pred, "accuracy")
    return float(np.mean(t == p))


def confusion_matrix(y_true, y_pred, num_classes=None):
    """Counts ``(C, C)`` int64: row = true class, column = predicted class.

    ``y_true``, ``y_pred``: labels ``(N,)`` or scores ``(N, C)`` (see the module's
    docstring).

    ``num_classes`` defaults to one more than the largest label seen (or the
    number of score columns, whichever is larger); a label outside
    ``[0, num_classes)`` raises ValueError.
    """
    who = "confusion_matrix"
    t, p = _pair(y_true, y_pred, who)
    seen = int(max(t.max(), p.max())) + 1
    for y in (y_true, y_pred):  # scores say how many classes there are
        shape = np.shape(y)
        if len(shape) >= 2 and shape[-1] >= 2:
            seen = max(seen, int(shape[-1]))
    if num_classes is None:
        num_classes = seen
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"{who}: num_classes must be an int, got {num_classes!r}")
    elif num_classes < 1:
        raise ValueError(f"{who}: num_classes must be >= 1, got {num_classes}")
    elif seen > num_classes:
        raise ValueError(f"{who}: labels must lie in [0, {num_classes}) for num_classes="
                         f"{num_classes}, got a label or score column {seen - 1}")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _per_class(cm):
    """Precision, recall, f1 (0 where undefined) and support from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return precision, recall, f1, support


def classification_report(y_true, y_pred, num_classes=None, target_names=None, digits=4):
    """Text table of precision, recall, f1 and support per class, as scikit-learn prints it.

    Followed by the overall accuracy and the macro and support-weighted averages.
    A ratio whose denominator is 0 (a class never predicted or never present)
    is reported as 0.

    Parameters
    ----------
    y_true, y_pred : array
        Labels ``(N,)`` or scores ``(N, C)`` (see the module's docstring).
    num_classes : int or None
        Number of classes C, as for ``confusion_matrix``.
    target_names : list of str or None
        A name per class (default: the class numbers).
    digits : int, default 4
        Digits after the decimal point.
    """
    who = "classification_report"
    cm = confusion_matrix(y_true, y_pred, num_classes=num_classes)
    precision, recall, f1, support = _per_class(cm)
    n_classes = cm.shape[0]
    if target_names is None:
        names = [str(k) for k in range(n_classes)]
    else:
        names = [str(name) for name in target_names]
        if len(names) != n_classes:
            raise ValueError(f"{who}: expected {n_classes} target_names, got {len(names)}")
    total = int(support.sum())
    width = max([len(n) for n in names] + [len("weighted avg")])
    head = f"{'':>{width}} {'precision':>10} {'recall':>10} {'f1-score':>10} {'support':>10}"
    row = "{:>{w}} {:>10.{d}f} {:>10.{d}f} {:>10.{d}f} {:>10d}"
    lines = [head, ""]
    for k in range(n_classes):
        lines.append(row.format(names[k], precision[k], recall[k], f1[k], int(support[k]),
                                w=width, d=digits))
    lines.append("")
    acc = np.trace(cm) / total
    lines.append(f"{'accuracy':>{width}} {'':>10} {'':>10} {acc:>10.{digits}f} {total:>10d}")
    weights = support / total
    lines.append(row.format("macro avg", precision.mean(), recall.mean(), f1.mean(), total,
                            w=width, d=digits))
    lines.append(row.format("weighted avg", (precision * weights).sum(),
                            (recall * weights).sum(), (f1 * weights).sum(), total,
                            w=width, d=digits))
    return "\n".join(lines) + "\n"
