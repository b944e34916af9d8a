"""Small data sets of the course: XOR, concentric circles, MNIST and Fashion-MNIST.

``load_mnist`` reads the four standard IDX files (gzip-compressed or raw)::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

IDX is big-endian: a 4-byte magic number (2051 for images, 2049 for labels),
then one 4-byte size per dimension, then the uint8 data.
"""
import gzip
import hashlib
import os
import urllib.request

import numpy as np

__all__ = ["xor", "circles", "load_mnist"]


def xor():
    """The tutorial's XOR data: ``x (4, 1, 2)``, ``y (4, 1, 1)``, both float32.

    Each sample is a ``(1, 2)`` row, exactly the tutorial's
    ``np.array([[[0,0]], [[0,1]], [[1,0]], [[1,1]]])``, so its script (which
    feeds one sample at a time and trains with MSE on a tanh output) runs on
    it unchanged. ``x.reshape(4, 2)`` and ``y.reshape(4).astype(int)`` give
    plain features and class labels.
    """
    x = np.array([[[0, 0]], [[0, 1]], [[1, 0]], [[1, 1]]], dtype=np.float32)
    y = np.array([[[0]], [[1]], [[1]], [[0]]], dtype=np.float32)
    return x, y


def circles(n=1000, noise=0.1, factor=0.5, seed=None):
    """Two concentric circles (the course's Circle data), like ``sklearn.datasets.make_circles``.

    Returns ``x (n, 2)`` float32 and ``y (n,)`` int64: class 0 on the outer
    circle of radius 1 (``n // 2`` points), class 1 on the inner circle of
    radius ``factor`` (the rest), both with Gaussian noise of standard
    deviation ``noise`` added to each coordinate; samples come shuffled by ``seed``
    (an int, or None for a fresh draw).

    >>> from fastnn import datasets
    >>> x, y = datasets.circles(n=100, seed=0)
    >>> x.shape, y.shape
    ((100, 2), (100,))
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"circles: n must be an int >= 2, got {n!r}")
    if not 0.0 < factor < 1.0:
        raise ValueError(f"circles: factor must lie in (0, 1), got {factor!r}")
    if not noise >= 0.0:
        raise ValueError(f"circles: noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    n_out = n // 2
    n_in = n - n_out
    t_out = np.linspace(0.0, 2.0 * np.pi, n_out, endpoint=False)
    t_in = np.linspace(0.0, 2.0 * np.pi, n_in, endpoint=False)
    x = np.concatenate([np.stack([np.cos(t_out), np.sin(t_out)], axis=1),
                        factor * np.stack([np.cos(t_in), np.sin(t_in)], axis=1)])
    y = np.concatenate([np.zeros(n_out, np.int64), np.ones(n_in, np.int64)])
    order = rng.permutation(n)
    x, y = x[order], y[order]
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape)
    return x.astype(np.float32), y


# --- MNIST / Fashion-MNIST ----------------------------------------------------

_FILES = {  # role -> file name without .gz
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# kind -> (folder names searched, in order; download mirrors; SHA-256 of each .gz)
_KINDS = {
    "mnist": (
        ("mnist", "MNIST"),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",
         "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "fashion": (
        ("fashion-mnist", "fashion", "FashionMNIST"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ),
}
_KIND_ALIASES = {"mnist": "mnist", "fashion": "fashion", "fashion-mnist": "fashion",
                 "fashion_mnist": "fashion"}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def _kind(kind):
    key = _KIND_ALIASES.get(str(kind).lower()) if isinstance(kind, str) else None
    if key is None:
        raise ValueError(f"load_mnist: kind must be 'mnist' or 'fashion' "
                         f"(or 'fashion-mnist'), got {kind!r}")
    return key


def _candidate_dirs(path, kind):
    """Folders searched, in order: ``path`` (or its ``<kind>`` sub-folder), else
    ``$FASTNN_DATA/<kind>``, else ``~/.cache/fastnn/<kind>``."""
    folders = _KINDS[kind][0]
    if path is not None:
        root = os.fspath(path)
        return [root] + [os.path.join(root, f) for f in folders]
    env = os.environ.get("FASTNN_DATA")
    root = env if env else os.path.join(os.path.expanduser("~"), ".cache", "fastnn")
    return [os.path.join(root, f) for f in folders]


def _find(directory, stem):
    """Path of ``stem`` or ``stem.gz`` in ``directory`` (the .gz first), else None."""
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _read_idx(path, magic, ndim):
    """Read an IDX file (raw or .gz) into a uint8 array, checking magic number and size."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # unreadable, not gzip, truncated gzip stream
        raise ValueError(f"load_mnist: cannot read {path}: {exc}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"load_mnist: {path} is too short for an IDX header "
                         f"({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"load_mnist: {path} has magic number {found}, expected {magic} "
                         f"({'images' if magic == _IMAGES_MAGIC else 'labels'} IDX file)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(f"load_mnist: {path} holds {len(raw) - header} data bytes, "
                         f"its header {dims} says {expected} (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url, dest):
    """Download ``url`` to the file ``dest`` (tests replace this function)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        while True:
            block = response.read(1 << 20)
            if not block:
                break
            out.write(block)


def _download(kind, directory):
    """Fetch the missing .gz files of ``kind`` into ``directory``, verifying SHA-256.

    A file is only moved to its final name once its checksum matches, so a
    failed or tampered download never leaves a file that a later call would read.
    Files already present are checked against the same table.
    """
    _, mirrors, sha = _KINDS[kind]
    os.makedirs(directory, exist_ok=True)
    for name, expected in sha.items():
        dest = os.path.join(directory, name)
        if os.path.isfile(dest):
            if _sha256(dest) != expected:
                raise ValueError(f"load_mnist: {dest} exists but its SHA-256 does not match "
                                 f"the canonical file; delete it to download it again")
            continue
        if os.path.isfile(os.path.join(directory, name[:-3])):
            continue  # a decompressed copy is there; its magic numbers and sizes are checked
        tmp = dest + ".part"
        errors = []
        for base in mirrors:
            try:
                _fetch(base + name, tmp)
            except OSError as exc:  # URLError, HTTPError, timeouts are OSErrors
                errors.append(f"{base + name}: {exc}")
                continue
            got = _sha256(tmp)
            if got == expected:
                os.replace(tmp, dest)
                break
            os.remove(tmp)
            errors.append(f"{base + name}: SHA-256 {got} != expected {expected}")
        else:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise ValueError(f"load_mnist: could not download a verified {name}:\n  "
                             + "\n  ".join(errors))


def load_mnist(path=None, kind="mnist", download=False):
    """Load MNIST (``kind="mnist"``) or Fashion-MNIST (``kind="fashion"``).

    Returns ``(x_train, y_train), (x_test, y_test)``: ``x`` float32 in
    ``[0, 1]`` of shape ``(N, 1, 28, 28)`` (NCHW), ``y`` int64 ``(N,)``
    (60000 training and 10000 test samples for the real files).

    Files are searched in ``path`` (or its ``mnist`` / ``fashion-mnist``
    sub-folder), else in ``$FASTNN_DATA/mnist`` or ``$FASTNN_DATA/fashion-mnist``,
    else under ``~/.cache/fastnn``. ``download=True`` checks the SHA-256 of
    the files found, or fetches the missing canonical .gz files (checking
    their SHA-256 before use) into the data set's own folder: ``path/mnist``
    or ``path/fashion-mnist`` (``$FASTNN_DATA/...`` or ``~/.cache/fastnn/...``
    without ``path``), so the two sets, whose files have the same names, never
    land in one folder.
    """
    kind = _kind(kind)
    dirs = _candidate_dirs(path, kind)
    if download:
        own = dirs[1] if path is not None else dirs[0]      # <root>/<kind's folder>
        target = next((d for d in dirs if all(_find(d, s) for s in _FILES.values())), own)
        _download(kind, target)
    directory = next((d for d in dirs if all(_find(d, s) for s in _FILES.values())), None)
    if directory is None:
        lines = []
        for d in dirs:
            if not os.path.isdir(d):
                lines.append(f"  {d}: no such folder")
                continue
            missing = [s + "[.gz]" for s in _FILES.values() if _find(d, s) is None]
            lines.append(f"  {d}: missing {', '.join(missing)}")
        hint = ("pass path=... (fastnn-train --data DIR), set FASTNN_DATA to the folder "
                "holding mnist/ and fashion-mnist/, or use download=True "
                "(fastnn-train --download)")
        raise FileNotFoundError(f"load_mnist: the {kind} IDX files were not found. "
                                f"Looked in:\n" + "\n".join(lines) + f"\nTo fix: {hint}")

    def read(images_stem, labels_stem):
        images = _read_idx(_find(directory, images_stem), _IMAGES_MAGIC, 3)
        labels = _read_idx(_find(directory, labels_stem), _LABELS_MAGIC, 1)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"load_mnist: {images_stem} in {directory} holds images of "
                             f"{images.shape[1:]}, expected (28, 28)")
        if len(images) != len(labels):
            raise ValueError(f"load_mnist: {directory} has {len(images)} {images_stem} "
                             f"images but {len(labels)} {labels_stem} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"load_mnist: {labels_stem} in {directory} holds label "
                             f"{labels.max()}, expected 0..9")
        x = (images.astype(np.float32) / np.float32(255.0)).reshape(len(images), 1, 28, 28)
        return x, labels.astype(np.int64)

    return (read(_FILES["train_images"], _FILES["train_labels"]),
            read(_FILES["test_images"], _FILES["test_labels"]))
