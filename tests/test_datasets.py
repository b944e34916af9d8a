"""fastnn.datasets: xor, circles, load_mnist (IDX reader, search path, checked download)."""
import gzip
import hashlib
import pathlib

import numpy as np
import pytest

from fastnn import datasets
from _helpers import shared_data_root

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --- xor, circles ---------------------------------------------------------------

def test_xor_is_the_tutorial_data():
    x, y = datasets.xor()
    assert x.shape == (4, 1, 2) and y.shape == (4, 1, 1)
    assert x.dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_array_equal(x, [[[0, 0]], [[0, 1]], [[1, 0]], [[1, 1]]])
    # y is the XOR of the two inputs
    np.testing.assert_array_equal(y[:, 0, 0], np.logical_xor(x[:, 0, 0], x[:, 0, 1]))


def test_circles_geometry_without_noise():
    x, y = datasets.circles(n=101, noise=0.0, factor=0.3, seed=0)
    assert x.shape == (101, 2) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [50, 51]          # outer n // 2, inner the rest
    radius = np.hypot(x[:, 0], x[:, 1])
    np.testing.assert_allclose(radius[y == 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(radius[y == 1], 0.3, atol=1e-6)
    assert not np.all(np.diff(y) >= 0)                  # samples are shuffled


def test_circles_noise_seed_and_errors():
    clean, yc = datasets.circles(n=4000, noise=0.0, seed=1)
    noisy, yn = datasets.circles(n=4000, noise=0.1, seed=1)
    np.testing.assert_array_equal(yc, yn)               # same seed, same order
    assert np.std(noisy - clean) == pytest.approx(0.1, rel=0.05)
    again, _ = datasets.circles(n=4000, noise=0.1, seed=1)
    np.testing.assert_array_equal(noisy, again)
    other, _ = datasets.circles(n=4000, noise=0.1, seed=2)
    assert not np.array_equal(noisy, other)
    with pytest.raises(ValueError, match="factor"):
        datasets.circles(factor=1.5)
    with pytest.raises(ValueError, match="noise"):
        datasets.circles(noise=-1)
    with pytest.raises(ValueError, match="n must be"):
        datasets.circles(n=1)


# --- IDX files -----------------------------------------------------------------

def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_set(n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        STEMS[0]: idx_bytes(rng.integers(0, 256, (n_train, 28, 28)), 2051),
        STEMS[1]: idx_bytes(rng.integers(0, 10, n_train), 2049),
        STEMS[2]: idx_bytes(rng.integers(0, 256, (n_test, 28, 28)), 2051),
        STEMS[3]: idx_bytes(rng.integers(0, 10, n_test), 2049),
    }


def write_set(directory, files, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    for stem, raw in files.items():
        if compress:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


def decoded(raw, ndim):
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


@pytest.mark.parametrize("compress", [True, False])
def test_load_mnist_reads_idx(tmp_path, compress):
    files = fake_set()
    write_set(tmp_path, files, compress)
    (xtr, ytr), (xte, yte) = datasets.load_mnist(tmp_path)
    assert xtr.shape == (5, 1, 28, 28) and xte.shape == (3, 1, 28, 28)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int64
    np.testing.assert_allclose(xtr[:, 0] * 255, decoded(files[STEMS[0]], 3), atol=1e-3)
    np.testing.assert_array_equal(ytr, decoded(files[STEMS[1]], 1))
    np.testing.assert_array_equal(yte, decoded(files[STEMS[3]], 1))
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0


def test_load_mnist_search_path(tmp_path, monkeypatch):
    write_set(tmp_path / "mnist", fake_set(seed=1))
    write_set(tmp_path / "fashion-mnist", fake_set(n_train=4, seed=2))
    # path may be the parent folder; kind picks the sub-folder; both Fashion names work
    assert len(datasets.load_mnist(tmp_path)[0][0]) == 5
    assert len(datasets.load_mnist(tmp_path, kind="fashion")[0][0]) == 4
    assert len(datasets.load_mnist(tmp_path, kind="fashion-mnist")[0][0]) == 4
    monkeypatch.setenv("FASTNN_DATA", str(tmp_path))
    assert len(datasets.load_mnist()[0][0]) == 5
    assert len(datasets.load_mnist(kind="fashion")[0][0]) == 4
    with pytest.raises(ValueError, match="kind"):
        datasets.load_mnist(kind="cifar")


def test_load_mnist_missing_files_says_where(tmp_path, monkeypatch):
    files = fake_set()
    del files[STEMS[3]]
    write_set(tmp_path / "mnist", files)
    monkeypatch.setenv("FASTNN_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        datasets.load_mnist()
    message = str(err.value)
    assert str(tmp_path / "mnist") in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message.split(str(tmp_path / "mnist"))[1].split("\n")[0]
    assert "FASTNN_DATA" in message


@pytest.mark.parametrize("stem,raw,match", [
    (STEMS[0], idx_bytes(np.zeros((5, 28, 28)), 2049), "magic number 2049, expected 2051"),
    (STEMS[1], idx_bytes(np.zeros(5), 2051), "magic number 2051, expected 2049"),
    (STEMS[0], idx_bytes(np.zeros((5, 28, 28)), 2051)[:-10], "truncated"),
    (STEMS[1], idx_bytes(np.zeros(4), 2049), "5 train-images-idx3-ubyte images but 4"),
    (STEMS[2], idx_bytes(np.zeros((3, 27, 28)), 2051), r"\(27, 28\), expected \(28, 28\)"),
    (STEMS[3], idx_bytes(np.full(3, 12), 2049), "label 12"),
    (STEMS[1], b"\x00\x00", "too short"),
])
def test_load_mnist_rejects_bad_files(tmp_path, stem, raw, match):
    files = fake_set()
    files[stem] = raw
    write_set(tmp_path, files)
    with pytest.raises(ValueError, match=match):
        datasets.load_mnist(tmp_path)


def test_load_mnist_truncated_gzip_names_the_file(tmp_path):
    write_set(tmp_path, fake_set())
    path = tmp_path / (STEMS[0] + ".gz")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=STEMS[0]):
        datasets.load_mnist(tmp_path)


# --- download (never touches the network: _fetch is replaced) --------------------

@pytest.fixture
def fake_remote(monkeypatch):
    """Serve a fake MNIST from a dict and make its SHA-256 the expected ones."""
    served = {name + ".gz": gzip.compress(raw) for name, raw in fake_set(seed=3).items()}
    table = {name: hashlib.sha256(blob).hexdigest() for name, blob in served.items()}
    folders, mirrors, _ = datasets._KINDS["mnist"]
    monkeypatch.setitem(datasets._KINDS, "mnist", (folders, mirrors, table))
    calls = []

    def fetch(url, dest):
        calls.append(url)
        with open(dest, "wb") as f:
            f.write(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(datasets, "_fetch", fetch)
    return served, calls


def test_download_checks_sha256_then_loads(tmp_path, fake_remote):
    served, calls = fake_remote
    (xtr, ytr), _ = datasets.load_mnist(tmp_path, download=True)
    assert len(calls) == 4 and all(url.startswith("https://") for url in calls)
    # into the set's own folder: Fashion-MNIST's files have the same names
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(served)
    np.testing.assert_array_equal(ytr, decoded(gzip.decompress(served[STEMS[1] + ".gz"]), 1))
    datasets.load_mnist(tmp_path, download=True)       # present and verified: no new fetch
    assert len(calls) == 4


def test_download_rejects_a_wrong_checksum(tmp_path, fake_remote, monkeypatch):
    served, calls = fake_remote
    served[STEMS[0] + ".gz"] = gzip.compress(b"tampered")
    with pytest.raises(ValueError, match="SHA-256"):
        datasets.load_mnist(tmp_path, download=True)
    # nothing unverified is left behind for a later load to read
    assert not (tmp_path / "mnist" / (STEMS[0] + ".gz")).exists()
    assert not any(p.name.endswith(".part") for p in (tmp_path / "mnist").iterdir())


def test_download_refuses_a_corrupt_existing_file(tmp_path, fake_remote):
    write_set(tmp_path, fake_set(seed=9))               # right format, wrong bytes
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        datasets.load_mnist(tmp_path, download=True)


def test_download_network_error_is_reported(tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("network unreachable")
    monkeypatch.setattr(datasets, "_fetch", offline)
    with pytest.raises(ValueError, match="network unreachable"):
        datasets.load_mnist(tmp_path, download=True)


def test_real_files_match_the_canonical_checksums():
    """The SHA-256 table used for downloads agrees with the shared canonical files."""
    root = shared_data_root()
    if root is None:
        pytest.skip("MNIST files not found ($FASTNN_DATA or ../shared/data)")
    for kind, (folders, _, table) in datasets._KINDS.items():
        folder = pathlib.Path(root) / folders[0]
        for name, digest in table.items():
            if (folder / name).is_file():
                assert datasets._sha256(str(folder / name)) == digest, (kind, name)


# --- the real data ----------------------------------------------------------------

@pytest.mark.parametrize("kind,test_hist", [
    ("mnist", [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    ("fashion", [1000] * 10),
])
def test_real_mnist(kind, test_hist):
    root = shared_data_root()
    if root is None:
        pytest.skip("MNIST files not found ($FASTNN_DATA or ../shared/data)")
    (xtr, ytr), (xte, yte) = datasets.load_mnist(root, kind=kind)
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert xtr.dtype == np.float32 and yte.dtype == np.int64
    assert xtr.min() == 0.0 and xtr.max() == 1.0
    assert np.bincount(yte).tolist() == test_hist
