"""Saving and loading a Network: atomic writes, and a loader that checks a file before trusting it.

The file (format version 1) is an .npz: a zip of ``.npy`` members, one per array,
named ``layer{i}.params.{name}`` / ``layer{i}.buffers.{name}``, plus
``__fastnn_architecture__``, a 0-d unicode array holding the JSON record
``{"format": "fastnn.Network", "version": 1, "layers": [{"class", "config"}, ...],
"loss": {"class", "config"}, "optimizer": {"class", "config"}, "metrics": [name, ...]}``
(the last three only for a compiled network). No pickle anywhere. Optional keys:
``"schedule": {"class", "config"}``, the optimizer's learning-rate schedule;
``"optimizer_state": {"lr", "schedule", "params": [key, ...], <numbers>}``, the
optimizer's ``state_dict()`` (``include_optimizer=True``) whose arrays are members
``optimizer.state.{i}.{j}`` (array j of parameter ``params[i]``, of its shape and
dtype); ``"training": {"record": {...}, "arrays": {name: {"shape", "dtype"}}}``,
what ``fastnn.callbacks.BackupAndRestore`` adds, its arrays members ``training.{name}``.

Saving goes through ``atomic_write``: the bytes go to a temporary file
``.<name>.tmp-fastnn`` beside the target, which is flushed, fsynced and
``os.replace``d over the target; then the directory is fsynced. A process killed
at any moment leaves the previous file or the new one. The temporary name is
fixed, so the leftover of a killed save is truncated and reused by the next
save and never piles up; an exclusive lock on it (``fcntl.flock``, where the OS
has it) keeps two simultaneous saves of one path from mixing their bytes: the
second waits up to ``LOCK_WAIT_S`` seconds, then raises OSError.

``load`` trusts nothing it has not checked, in this order: the zip's directory
(member names, compression, declared sizes against the file and against
``max_bytes``), each member's ``.npy`` header (dtype, shape, order) against the
size the zip declares for it, the JSON record (size, nesting, structure, known
classes), each layer's parameter shapes derived from its config (without
building the layer) against the headers. Only then are the arrays read (and
checked finite) and the layers built. Every failure is a ValueError, or an
OSError for I/O, naming the file.
"""
import json
import math
import os
import struct
import time
import zipfile
import zlib

import numpy as np

from . import backend, losses, optim
from .layers import LAYER_CLASSES

try:
    import fcntl
except ImportError:      # Windows: no advisory locks; one save of a path at a time, please
    fcntl = None

__all__ = ["save", "load", "atomic_write", "temp_path"]

ARCH_KEY = "__fastnn_architecture__"
FORMAT = "fastnn.Network"
VERSION = 1
TMP_SUFFIX = ".tmp-fastnn"
LOCK_WAIT_S = 10.0               # how long a save waits for another save of the same path
MAX_ARCH_CHARS = 1_000_000       # the JSON record's length
MAX_JSON_DEPTH = 16              # levels of nesting, scalars included; a real record has 6
MAX_RATIO = 4                    # load's default max_bytes: MAX_RATIO * file size + SLACK_BYTES
SLACK_BYTES = 16 * 2**20
_CHUNK = 16 * 2**20              # bytes per read, elements per finiteness check


# --- atomic writes ----------------------------------------------------------------------------
def temp_path(path):
    """The temporary file ``atomic_write`` uses for ``path``: ``.<name>.tmp-fastnn`` beside it
    (beside the file a symlink points to)."""
    directory, name = os.path.split(os.path.realpath(os.fspath(path)))
    return os.path.join(directory, f".{name}{TMP_SUFFIX}")


def atomic_write(path, write_fn):
    """Replace the file ``path`` by what ``write_fn(f)`` writes to the binary file object ``f``.

    Killed at any moment, even by SIGKILL or a power cut, this leaves ``path`` either as it
    was or complete with the new bytes. When ``write_fn`` raises, ``path`` is untouched and
    the temporary file is removed. A symlink keeps pointing to the (replaced) file. The new
    file gets the usual permissions of a new file (umask), not the old file's.
    """
    path = os.path.realpath(os.fspath(path))
    tmp = temp_path(path)
    f = os.fdopen(_lock_temp(tmp, path), "r+b")
    try:
        f.truncate(0)            # what a killed save left
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())
        if fcntl is None:
            f.close()            # Windows cannot rename an open file
        os.replace(tmp, path)    # the lock is held until here, so no other save writes into it
    except BaseException:
        _discard(f, tmp)
        raise
    finally:
        f.close()
    _fsync_dir(os.path.dirname(path))


def _lock_temp(tmp, path):
    """A descriptor of ``tmp`` (created if missing) whose exclusive lock this process holds."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        try:
            if fcntl is None or (_try_lock(fd) and _is_current(fd, tmp)):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if time.monotonic() > deadline:
            raise OSError(f"cannot save {path!r}: another save of it is in progress (its "
                          f"temporary file {tmp!r} stayed locked for {LOCK_WAIT_S} s)")
        time.sleep(0.01)


def _try_lock(fd):
    """True when this process now holds ``fd``'s exclusive lock (or the file system has none)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:              # a file system without locks: go on without one
        pass
    return True


def _is_current(fd, tmp):
    """False when the file locked is no longer ``tmp`` (another save renamed it meanwhile)."""
    try:
        st = os.stat(tmp)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _discard(f, tmp):
    """Remove the temporary file of a failed write, still holding its lock where there is one."""
    if fcntl is None:
        f.close()
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _fsync_dir(directory):
    """Make the rename durable: fsync the directory, where the OS lets one open it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- save -------------------------------------------------------------------------------------
def save(network, path, include_optimizer=True, training=None):
    """Write ``network`` to ``path`` atomically (the format is in this module's docstring).

    ``include_optimizer``: also store the optimizer's state (momentum buffers, Adam's
    moments and step count, its schedule's position) so that training goes on exactly
    after ``load``. ``training``: ``(record, {name: array})``, a JSON-able record and
    arrays stored beside (``load(..., training=True)`` gives them back).
    ValueError for a layer that is not a fastnn built-in, or a parameter or buffer holding
    NaN or infinity (``load`` would refuse the file); then nothing is written.
    In a distributed job (``fastnn.distributed``) only rank 0 writes.
    """
    from . import distributed
    if distributed.rank() != 0:
        return
    arch, arrays = _architecture(network)
    if include_optimizer and network.loss_fn is not None and network.optimizer is not None:
        arch["optimizer_state"] = _optimizer_state(network, arrays)
    if training is not None:
        record, extra = training
        arch["training"] = {"record": record, "arrays": {}}
        for name, a in extra.items():
            a = np.asarray(a)
            arch["training"]["arrays"][name] = {"shape": list(a.shape), "dtype": a.dtype.name}
            arrays[f"training.{name}"] = a
    arrays[ARCH_KEY] = np.array(json.dumps(arch))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _architecture(network):
    """-> (the JSON record, {member key: NumPy array on the CPU})."""
    arch = {"format": FORMAT, "version": VERSION, "layers": []}
    arrays = {}
    for i, layer in enumerate(network.layers):
        name = type(layer).__name__
        if LAYER_CLASSES.get(name) is not type(layer):
            raise ValueError(f"Network.save: layer {i} ({name}) is not a fastnn built-in layer "
                             "and cannot be saved without pickle")
        arch["layers"].append({"class": name, "config": layer.get_config()})
        for store in ("params", "buffers"):
            for k, v in (getattr(layer, store, None) or {}).items():
                key = f"layer{i}.{store}.{k}"
                arrays[key] = np.asarray(backend.to_device(v, "cpu"))
                if not _all_finite(arrays[key]):
                    raise ValueError(f"Network.save: {key} of layer {i} ({name}) holds NaN or "
                                     "infinity; not saved")
    if network.loss_fn is not None:
        arch["loss"] = {"class": type(network.loss_fn).__name__,
                        "config": network.loss_fn.get_config()}
        if network.optimizer is not None:
            arch["optimizer"] = {"class": type(network.optimizer).__name__,
                                 "config": network.optimizer.get_config()}
            schedule = network.optimizer.schedule
            if schedule is not None:
                arch["schedule"] = {"class": type(schedule).__name__,
                                    "config": schedule.get_config()}
        arch["metrics"] = [name for name, f in network.metrics if isinstance(name, str)]
    return arch, arrays


def _optimizer_state(network, arrays):
    """The optimizer's ``state_dict()`` as a JSON record; its arrays go into ``arrays``. No
    state when the optimizer's was made for other parameters (its next step would reset it)."""
    sd = network.optimizer.state_dict()
    keys = _param_keys(network)
    state = sd.pop("state")
    if state is not None and (len(state) != len(keys) or any(
            a.shape != arrays[k].shape or a.dtype != arrays[k].dtype
            for entry, k in zip(state, keys) for a in entry)):
        state = None
    for i, entry in enumerate(state or ()):
        for j, a in enumerate(entry):
            arrays[f"optimizer.state.{i}.{j}"] = a
    return {**sd, "params": None if state is None else keys}


def _param_keys(network):
    """The member keys of ``network.parameters()``, in that order (the optimizer's)."""
    index = {id(layer): i for i, layer in enumerate(network.layers)}
    return [f"layer{index[id(layer)]}.params.{name}" for layer, name in network.parameters()]


def _all_finite(a):
    """True when no element of the float array ``a`` is NaN or infinite (checked in chunks)."""
    flat = a.reshape(-1)
    return all(np.isfinite(flat[i:i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK))


# --- load -------------------------------------------------------------------------------------
class _Reject(Exception):
    """A file that is a readable zip but not a valid fastnn model."""


_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, EOFError, OverflowError,
               RecursionError, NotImplementedError, zipfile.BadZipFile, zlib.error, struct.error)


def load(path, *, max_bytes=None, network_cls=None, training=False):
    """Rebuild the Network written by ``save`` to ``path`` (on the CPU), its optimizer's
    state included when the file has it.

    ``max_bytes``: the most bytes the arrays may take uncompressed; by default
    ``MAX_RATIO`` (4) times the file's size plus ``SLACK_BYTES`` (16 MiB), which every file
    ``save`` writes (uncompressed) meets and a zip bomb does not. ``network_cls``: the
    class to build (``Network`` by default). ``training=True`` returns ``(network,
    (record, {name: array}))`` with what ``save(..., training=)`` stored (None when
    nothing). Raises OSError (cannot open or read) or
    ValueError (truncated, hostile or foreign file), each naming ``path``.
    """
    path = os.fspath(path)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(
            max_bytes, (int, np.integer)) or max_bytes < 0):
        raise ValueError(f"Network.load: max_bytes must be None or an int >= 0, got {max_bytes!r}")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise type(exc)(exc.errno, f"Network.load: cannot open {path!r}: {exc.strerror}") from None
    with f:
        try:
            net, extra = _load(f, max_bytes, network_cls)
            return (net, extra) if training else net
        except _Reject as exc:
            raise ValueError(f"Network.load: {path!r} is not a valid fastnn model file: "
                             f"{exc}") from None
        except OSError as exc:
            if exc.errno is None:          # zipfile's complaints about the format
                raise _unreadable(path, exc) from None
            raise OSError(exc.errno,
                          f"Network.load: cannot read {path!r}: {exc.strerror}") from None
        except _UNREADABLE as exc:
            raise _unreadable(path, exc) from None


def _unreadable(path, exc):
    return ValueError(f"Network.load: cannot read {path!r} as a fastnn model file (truncated or "
                      f"foreign?): {type(exc).__name__}: {exc}")


def _load(f, max_bytes, network_cls):
    """The checks and reads of ``load``, in order, on the open file ``f``."""
    size = os.fstat(f.fileno()).st_size
    limit = MAX_RATIO * size + SLACK_BYTES if max_bytes is None else max_bytes
    with zipfile.ZipFile(f) as zf:
        infos = _members(zf, size, limit)
        if ARCH_KEY not in infos:
            raise _Reject("it holds no fastnn architecture (not saved by Network.save)")
        arch = _read_architecture(zf, infos[ARCH_KEY])
        expected = _expected_arrays(arch)
        _check_keys(infos, expected)
        headers = {key: _array_header(zf, infos[key], key, *expected[key]) for key in expected}
        arrays = {key: _read_array(zf, infos[key], key, headers[key]) for key in expected}
    if network_cls is None:
        from .network import Network as network_cls
    net = _build(arch, arrays, network_cls)
    if "training" not in arch:
        return net, None
    return net, (arch["training"]["record"],
                 {k[len("training."):]: a for k, a in arrays.items() if k.startswith("training.")})


def _members(zf, size, limit):
    """{key: ZipInfo} of the zip's ``.npy`` members, after the checks its directory allows:
    names, compression, declared sizes against the file's ``size``, their sum against ``limit``."""
    infos, total = {}, 0
    for info in zf.infolist():
        name = info.filename
        key = name[:-len(".npy")]
        if not name.endswith(".npy") or key in infos:
            raise _Reject(f"unexpected or repeated member {name!r}")
        if info.flag_bits & 0x1 or info.compress_type not in _COMPRESSIONS:
            raise _Reject(f"member {name!r} is encrypted or compressed with a method fastnn "
                          "does not read")
        if info.header_offset + info.compress_size > size or (
                info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size):
            raise _Reject(f"member {name!r} declares more data than the file holds")
        infos[key] = info
        total += info.file_size
    if total > limit:
        raise _Reject(f"its members declare {total:,} bytes uncompressed, over the limit of "
                      f"{limit:,} (load's max_bytes; by default {MAX_RATIO} x the file's size "
                      f"+ {SLACK_BYTES // 2**20} MiB)")
    return infos


def _read_header(zf, info):
    """-> (shape, fortran_order, dtype, offset of the data) of a ``.npy`` member, whose size
    the zip declares must be the header's plus the data its shape and dtype imply."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise _Reject(f"member {info.filename!r} is a .npy of version {version}, "
                          "not 1.0 or 2.0")
        offset = f.tell()
    if dtype.hasobject or any(d < 0 for d in shape):
        raise _Reject(f"member {info.filename!r} declares {dtype} {shape}")
    implied = offset + math.prod(shape) * dtype.itemsize
    if info.file_size != implied:
        raise _Reject(f"member {info.filename!r} declares {info.file_size:,} bytes, its header "
                      f"({dtype} {shape}) implies {implied:,}")
    return shape, fortran, dtype, offset


def _read_into(zf, info, offset, out):
    """Fill the C-contiguous array ``out`` with the bytes of member ``info`` after ``offset``;
    reading to the end makes zipfile check the member's CRC."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    with zf.open(info) as f:
        f.read(offset)
        pos = 0
        while pos < len(buf):
            n = f.readinto(buf[pos:pos + _CHUNK])
            if not n:
                raise _Reject(f"member {info.filename!r} ends early")
            pos += n


def _read_architecture(zf, info):
    """The checked JSON record of the ``__fastnn_architecture__`` member."""
    shape, _, dtype, offset = _read_header(zf, info)
    if shape != () or dtype.kind != "U":
        raise _Reject(f"its architecture record is {dtype} {shape}, not a unicode string")
    if dtype.itemsize // 4 > MAX_ARCH_CHARS:
        raise _Reject(f"its architecture record has {dtype.itemsize // 4:,} characters, over "
                      f"the limit of {MAX_ARCH_CHARS:,}")
    text = np.empty((), dtype)
    _read_into(zf, info, offset, text)
    arch = _parse_json(str(text[()]))
    _check_architecture(arch)
    return arch


def _parse_json(text):
    """JSON -> object; no NaN / Infinity, nesting at most MAX_JSON_DEPTH levels."""
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise _Reject(f"its architecture record nests deeper than {MAX_JSON_DEPTH} "
                      "levels") from None
    except ValueError as exc:
        raise _Reject(f"its architecture record is not valid JSON: {exc}") from None
    depth, level = 0, [obj]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise _Reject(f"its architecture record nests deeper than {MAX_JSON_DEPTH} levels")
        level = [v for o in level if isinstance(o, (dict, list))
                 for v in (o.values() if isinstance(o, dict) else o)]
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not a number fastnn accepts")


def _check_architecture(arch):
    """The record's structure: known keys, layer, loss and optimizer classes, metric names."""
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise _Reject("its architecture record is not a fastnn.Network")
    if arch.get("version") != VERSION:
        raise _Reject(f"its format version {arch.get('version')!r} is not {VERSION}")
    extra = set(arch) - {"format", "version", "layers", "loss", "optimizer", "metrics",
                         "schedule", "optimizer_state", "training"}
    if extra:
        raise _Reject(f"its architecture record has unknown keys {sorted(extra)}")
    if not isinstance(arch.get("layers"), list):
        raise _Reject("its architecture record has no list of layers")
    for i, spec in enumerate(arch["layers"]):
        _check_record(spec, f"layer {i}")
        if spec["class"] not in LAYER_CLASSES:
            raise _Reject(f"layer {i} has unknown class {spec['class']!r}")
    if "optimizer" in arch and "loss" not in arch:
        raise _Reject("its architecture record has an optimizer but no loss")
    for key, module, base in (("loss", losses, losses.Loss), ("optimizer", optim, optim.Optimizer)):
        if key in arch:
            _check_record(arch[key], f"the {key}")
            _class_from(module, base, arch[key]["class"], key)
    metrics = arch.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise _Reject(f"its metrics must be a list of names, got {metrics!r:.200}")
    for key in ("schedule", "optimizer_state"):
        if key in arch and "optimizer" not in arch:
            raise _Reject(f"its architecture record has a {key} but no optimizer")
    if "schedule" in arch:
        _check_record(arch["schedule"], "the schedule")
        _class_from(optim, optim.Schedule, arch["schedule"]["class"], "schedule")
    if "optimizer_state" in arch and not isinstance(arch["optimizer_state"], dict):
        raise _Reject("its optimizer_state is not a record")
    if "training" in arch:
        _check_training(arch["training"])


_TRAINING_DTYPES = ("float32", "float64", "int64")


def _check_training(training):
    """The ``training`` record: a JSON record and the arrays it declares (name: shape, dtype)."""
    if not (isinstance(training, dict) and set(training) == {"record", "arrays"}
            and isinstance(training["arrays"], dict)):
        raise _Reject("its training record is not {'record': ..., 'arrays': {...}}")
    for name, spec in training["arrays"].items():
        if not (name.replace("_", "").replace(".", "").isalnum() and name.isascii()
                and isinstance(spec, dict) and set(spec) == {"shape", "dtype"}
                and spec["dtype"] in _TRAINING_DTYPES and isinstance(spec["shape"], list)
                and len(spec["shape"]) <= 8 and all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                    for d in spec["shape"])):
            raise _Reject(f"its training array {name!r:.100} is declared as {spec!r:.200}")


def _check_record(record, what):
    if not (isinstance(record, dict) and set(record) == {"class", "config"}
            and isinstance(record["class"], str) and isinstance(record["config"], dict)):
        raise _Reject(f"{what} is not a record {{'class': name, 'config': {{...}}}}: "
                      f"{record!r:.200}")


def _class_from(module, base, name, what):
    """The subclass of ``base`` called ``name`` in ``module`` (not ``base`` itself)."""
    cls = None if name.startswith("_") else getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base) and cls is not base):
        raise _Reject(f"unknown {what} class {name!r} (expected a subclass of "
                      f"{base.__module__}.{base.__name__})")
    return cls


def _expected_arrays(arch):
    """{member key: (shape, dtype)} of every array the record's layers declare."""
    expected = {}
    for i, spec in enumerate(arch["layers"]):
        try:
            shapes, dtype = LAYER_CLASSES[spec["class"]].array_shapes(spec["config"])
        except (TypeError, ValueError) as exc:
            raise _Reject(f"layer {i} ({spec['class']}) has a bad config: {exc}") from None
        for name, shape in shapes.items():
            expected[f"layer{i}.{name}"] = (shape, dtype)
    if "optimizer_state" in arch:
        expected.update(_optimizer_arrays(arch, expected))
    for name, spec in arch.get("training", {}).get("arrays", {}).items():
        expected[f"training.{name}"] = (tuple(spec["shape"]), np.dtype(spec["dtype"]))
    return expected


def _optimizer_arrays(arch, expected):
    """{member key: (shape, dtype)} of the optimizer's state: for each parameter the record
    lists (each once), as many arrays as the optimizer's config implies, of its shape."""
    keys = arch["optimizer_state"].get("params")
    if keys is None:
        return {}
    params = [k for k in expected if ".params." in k]
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and len(keys) == len(params) and set(keys) == set(params)):
        raise _Reject(f"its optimizer_state lists the parameters {keys!r:.200}, the layers "
                      f"declare {params!r:.200}")
    count = _make(arch, "optimizer", optim, optim.Optimizer)._state_arrays()
    return {f"optimizer.state.{i}.{j}": expected[k] for i, k in enumerate(keys)
            for j in range(count)}


def _check_keys(infos, expected):
    missing = [key for key in expected if key not in infos]
    if missing:
        raise _Reject(f"array {missing[0]!r} is missing")
    extra = sorted(set(infos) - set(expected) - {ARCH_KEY})
    if extra:
        raise _Reject(f"it holds arrays that no layer declares: {extra[:5]}")


def _array_header(zf, info, key, shape, dtype):
    header = _read_header(zf, info)
    if header[0] != shape or header[2] != dtype:
        raise _Reject(f"array {key!r} has {header[2]} {header[0]}, its layer's config declares "
                      f"{dtype} {shape}")
    return header


def _read_array(zf, info, key, header):
    """The checked array of a member whose header ``_array_header`` accepted: C order, finite."""
    shape, fortran, dtype, offset = header
    a = np.empty(shape[::-1] if fortran else shape, dtype)
    _read_into(zf, info, offset, a)
    if fortran:
        a = np.ascontiguousarray(a.T)
    if not _all_finite(a):
        raise _Reject(f"array {key!r} holds NaN or infinity")
    return a


# --- build ------------------------------------------------------------------------------------
def _build(arch, arrays, network_cls):
    """The network of the checked record with the checked arrays put in its layers."""
    net = network_cls()
    for i, spec in enumerate(arch["layers"]):
        try:
            layer = LAYER_CLASSES[spec["class"]].from_config(spec["config"])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise _Reject(f"layer {i} ({spec['class']}) has a bad config: {exc}") from None
        prefix = f"layer{i}."
        stored = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
        built = {f"{store}.{k}": (v.shape, v.dtype) for store in ("params", "buffers")
                 for k, v in (getattr(layer, store, None) or {}).items()}
        if built != {k: (a.shape, a.dtype) for k, a in stored.items()}:
            raise _Reject(f"layer {i} ({spec['class']}) built from its config has arrays "
                          f"{built}, unlike those the file holds")
        for name, a in stored.items():
            store, k = name.split(".", 1)
            getattr(layer, store)[k] = a
        net.add(layer)
    if "loss" in arch:
        _compile(net, arch, arrays)
    return net


def _make(arch, key, module, base, **extra):
    """An instance of the record ``arch[key]``'s class made from its config."""
    record = arch[key]
    config = dict(record["config"])
    if isinstance(config.get("betas"), list):      # Adam's tuple, a list in JSON
        config["betas"] = tuple(config["betas"])
    try:
        return _class_from(module, base, record["class"], key)(**config, **extra)
    except (TypeError, ValueError, AttributeError) as exc:
        raise _Reject(f"the {key} {record['class']} has a bad config: {exc}") from None


def _compile(net, arch, arrays):
    """``net.compile`` with the record's loss, optimizer (its schedule, its state) and metrics."""
    optimizer = None
    if "optimizer" in arch:
        extra = {"schedule": _make(arch, "schedule", optim, optim.Schedule)} \
            if "schedule" in arch else {}
        optimizer = _make(arch, "optimizer", optim, optim.Optimizer, **extra)
    try:
        net.compile(loss=_make(arch, "loss", losses, losses.Loss), optimizer=optimizer,
                    metrics=tuple(arch.get("metrics", ())))
    except ValueError as exc:
        raise _Reject(f"its metrics {arch.get('metrics')!r:.200}: {exc}") from None
    if "optimizer_state" in arch:
        _load_optimizer_state(net, arch["optimizer_state"], arrays)


def _load_optimizer_state(net, record, arrays):
    """``optimizer.load_state_dict`` with the checked record and arrays, in the order of the
    built network's parameters."""
    sd = {k: v for k, v in record.items() if k != "params"}
    keys = record.get("params")
    if keys is not None:
        index = {k: i for i, k in enumerate(keys)}
        count = net.optimizer._state_arrays()
        sd["state"] = [[arrays[f"optimizer.state.{index[k]}.{j}"] for j in range(count)]
                       for k in _param_keys(net)]
    else:
        sd["state"] = None
    try:
        net.optimizer.load_state_dict(sd)
    except (TypeError, ValueError) as exc:
        raise _Reject(f"its optimizer_state: {exc}") from None
