"""PyTorch state dicts both ways: ``Network.state_dict`` / ``Network.load_state_dict``.

The keys are those of a ``torch.nn.Sequential`` built from the same layers in the same
order (``"{i}.weight"``, ``"{i}.bias"``, ``"{i}.running_mean"``, ``"{i}.running_var"``,
``"{i}.num_batches_tracked"``, ``i`` the layer's index in ``net.layers``), the values
PyTorch's layouts as NumPy arrays:

=============  ==================================  ==========================
fastnn layer   PyTorch key: fastnn array           shape
=============  ==================================  ==========================
Dense          ``weight``: ``W.T``                 (out_features, in_features)
               ``bias``: ``b``                     (out_features,)
Conv2D         ``weight``: ``W``                   (out, in, kh, kw)
               ``bias``: ``b``                     (out,)
BatchNorm1d/2d ``weight``/``bias``: gamma/beta     (num_features,)
               ``running_mean``/``running_var``    (num_features,)
               ``num_batches_tracked``             () int64
=============  ==================================  ==========================

fastnn does not count BatchNorm's batches: ``state_dict`` gives ``num_batches_tracked``
= 0 and ``load_state_dict`` accepts any value (or none) and ignores it. Layers without
arrays (Flatten, ReLU, pools, Dropout, ...) have no entries, but their index counts,
as in ``nn.Sequential``. PyTorch is never imported here.
"""
from collections import namedtuple

import numpy as np

from . import backend
from .layers.conv import Conv2D
from .layers.dense import Dense
from .layers.norm import _BatchNorm

__all__ = ["state_dict", "load_state_dict", "IncompatibleKeys"]

# what load_state_dict returns, like PyTorch's: the keys it skipped (strict=False)
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

# (PyTorch name, fastnn store, fastnn name, transposed): per built-in layer family
_LINEAR = (("weight", "params", "W", True), ("bias", "params", "b", False))
_CONV = (("weight", "params", "W", False), ("bias", "params", "b", False))
_NORM = (("weight", "params", "gamma", False), ("bias", "params", "beta", False),
         ("running_mean", "buffers", "running_mean", False),
         ("running_var", "buffers", "running_var", False))
_UNTRACKED = "num_batches_tracked"     # BatchNorm's batch counter, not kept by fastnn


class _Entry:
    """One array of the state dict: where it lives in fastnn and its PyTorch shape."""

    def __init__(self, key, layer, store, name, transposed):
        self.key, self.layer, self.store, self.name = key, layer, store, name
        self.transposed = transposed
        shape = tuple(getattr(layer, store)[name].shape)
        self.shape = shape[::-1] if transposed else shape

    def get(self):
        """The array in PyTorch's layout: a C-contiguous NumPy copy."""
        a = backend.to_device(getattr(self.layer, self.store)[self.name], "cpu")
        return np.array(a.T if self.transposed else a, order="C", copy=True)


def _layer_name(i, layer):
    return f"layer {i} ({type(layer).__name__})"


def _entries(network, who):
    """``([_Entry, ...], {BatchNorm counter keys})`` of every layer, in PyTorch's order.

    A layer with arrays but no PyTorch layout (a user layer, a tutorial-protocol layer
    with weights) is a ValueError naming it: its weights would silently be left out.
    """
    entries, counters = [], []
    for i, layer in enumerate(network.layers):
        table = (_LINEAR if isinstance(layer, Dense) else _CONV if isinstance(layer, Conv2D)
                 else _NORM if isinstance(layer, _BatchNorm) else None)
        if table is None:
            if (getattr(layer, "params", None) or getattr(layer, "buffers", None)
                    or hasattr(layer, "weights")):
                raise ValueError(f"{who}: {_layer_name(i, layer)} holds arrays but is not a "
                                 "built-in fastnn layer; its PyTorch layout is unknown")
            continue
        layer._check_params()          # a wrongly assigned array is named here, not copied over
        for torch_name, store, name, transposed in table:
            if name in getattr(layer, store):
                entries.append(_Entry(f"{i}.{torch_name}", layer, store, name, transposed))
        if table is _NORM:
            counters.append(f"{i}.{_UNTRACKED}")
    return entries, counters


def state_dict(network):
    """``{key: NumPy array}`` in PyTorch's keys and layouts (copies, on the host), ordered
    like ``torch.nn.Sequential(...).state_dict()``."""
    entries, _ = _entries(network, "Network.state_dict")
    out = {}
    for e in entries:
        out[e.key] = e.get()
        if e.name == "running_var":        # PyTorch's counter follows it
            out[e.key.rsplit(".", 1)[0] + "." + _UNTRACKED] = np.array(0, dtype=np.int64)
    return out


def _as_host_array(value, key, who):
    """``value`` (NumPy, CuPy, a CPU torch tensor, nested lists) as a numeric NumPy array."""
    if backend.is_cuda_array(value):
        value = backend.to_device(value, "cpu")
    try:
        a = np.asarray(value)
    except Exception as exc:          # e.g. a tensor that requires grad, or on a GPU
        raise TypeError(f"{who}: {key!r}: cannot read {type(value).__name__} as an array "
                        f"({exc}); pass NumPy arrays (tensor.detach().cpu().numpy())") from exc
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{who}: {key!r} must hold real numbers, got dtype {a.dtype}")
    return a


def _checked_values(entries, state, who):
    """``{key: NumPy array in fastnn's layout}`` for the entries ``state`` has; every value
    checked before any is copied."""
    values = {}
    for e in entries:
        if e.key not in state:
            continue
        a = _as_host_array(state[e.key], e.key, who)
        if a.shape != e.shape:
            raise ValueError(f"{who}: {e.key!r} must have shape {e.shape} "
                             f"({_layer_name(int(e.key.split('.')[0]), e.layer)}), "
                             f"got {a.shape}")
        values[e.key] = a.T if e.transposed else a
    return values


def load_state_dict(network, state, strict=True):
    """Copy ``state`` (PyTorch's keys and layouts) into ``network``'s existing arrays.

    Values: anything ``np.asarray`` reads (NumPy arrays, CPU tensors after ``.numpy()``,
    lists, CuPy arrays), converted to each layer's dtype and copied in place on the
    network's device; non-finite values are loaded as they are (as PyTorch does).
    ``num_batches_tracked`` may be present with any value, or absent: it is ignored.
    ``strict=True``: a missing or unexpected key raises ValueError naming it;
    ``strict=False``: they are skipped and returned. A wrong shape or a non-numeric value
    is always an error, and nothing is copied unless every value passed its checks.
    Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``.
    """
    who = "Network.load_state_dict"
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        raise TypeError(f"{who}: expected a dict of arrays (a state dict), got "
                        f"{type(state).__name__}")
    entries, counters = _entries(network, who)
    known = {e.key for e in entries} | set(counters)
    missing = [e.key for e in entries if e.key not in state]
    unexpected = [k for k in state.keys() if k not in known]
    if strict and (missing or unexpected):
        parts = ([f"missing key(s) {missing}"] if missing else []) + (
            [f"unexpected key(s) {unexpected}"] if unexpected else [])
        raise ValueError(f"{who}: {'; '.join(parts)} (strict=True; the keys are those of a "
                         "torch.nn.Sequential of the same layers: see net.state_dict().keys())")
    values = _checked_values(entries, state, who)
    for e in entries:
        if e.key in values:
            target = getattr(e.layer, e.store)[e.name]
            a = np.ascontiguousarray(values[e.key], dtype=target.dtype)
            target[...] = backend.to_device(a, backend.device_of(target))
    return IncompatibleKeys(missing, unexpected)
