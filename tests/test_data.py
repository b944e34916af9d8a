"""fastnn.data: train_val_test_split and batches."""
import numpy as np
import pytest

from fastnn import data


def labelled(n=1000, weights=(0.6, 0.3, 0.1), seed=0):
    """x (n, 3) whose first column is the sample's index, y labels with given class weights."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(weights), size=n, p=weights).astype(np.int64)
    x = np.stack([np.arange(n), rng.random(n), rng.random(n)], axis=1).astype(np.float32)
    return x, y


def test_split_sizes_partition_and_pairing():
    x, y = labelled()
    (xtr, ytr), (xv, yv), (xte, yte) = data.train_val_test_split(x, y, val=0.15, test=0.2, seed=3)
    assert (len(xtr), len(xv), len(xte)) == (650, 150, 200)
    ids = np.concatenate([xtr[:, 0], xv[:, 0], xte[:, 0]]).astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(1000))   # a partition
    for xs, ys in ((xtr, ytr), (xv, yv), (xte, yte)):              # rows stay paired
        np.testing.assert_array_equal(ys, y[xs[:, 0].astype(int)])


def test_split_is_stratified():
    x, y = labelled(weights=(0.7, 0.2, 0.1))
    full = np.bincount(y) / len(y)
    parts = data.train_val_test_split(x, y, val=0.1, test=0.1, seed=0)
    for _, ys in parts:
        counts = np.bincount(ys, minlength=3)
        # largest-remainder allocation: each class within one sample of its exact share
        assert np.all(np.abs(counts - full * len(ys)) <= 1.0 + 1e-9)


def test_split_stratified_onehot_and_tutorial_shape():
    x, _ = labelled(n=200)
    y = np.repeat([0, 1], 100)
    onehot = np.eye(2, dtype=np.float32)[y]
    (_, ytr), (_, yv), (_, yte) = data.train_val_test_split(x, onehot, seed=1)
    assert ytr.shape[1:] == (2,)
    assert np.bincount(yte.argmax(1)).tolist() == [10, 10]
    (_, ytr), _, _ = data.train_val_test_split(x, onehot[:, None, :], seed=1)
    assert ytr.shape[1:] == (1, 2)


def test_split_unstratified_and_regression_targets():
    x = np.arange(100, dtype=np.float64)[:, None]
    y = np.sin(x[:, 0])
    with pytest.raises(ValueError, match="stratify=False"):
        data.train_val_test_split(x, y, seed=0)
    (xtr, ytr), (xv, _), (xte, _) = data.train_val_test_split(x, y, stratify=False, seed=0)
    assert (len(xtr), len(xv), len(xte)) == (80, 10, 10)
    np.testing.assert_array_equal(ytr, np.sin(xtr[:, 0]))


def test_split_seed_reproducible_and_varies():
    x, y = labelled()
    a = data.train_val_test_split(x, y, seed=7)
    b = data.train_val_test_split(x, y, seed=7)
    c = data.train_val_test_split(x, y, seed=8)
    for (xa, _), (xb, _) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
    assert not np.array_equal(a[2][0], c[2][0])


def test_split_zero_fractions():
    x, y = labelled(n=50)
    (xtr, _), (xv, _), (xte, yte) = data.train_val_test_split(x, y, val=0.0, test=0.2, seed=0)
    assert (len(xtr), len(xv), len(xte)) == (40, 0, 10)
    assert yte.dtype == y.dtype


def test_split_errors():
    x, y = labelled(n=20)
    with pytest.raises(ValueError, match=r"len\(x\)=20 and len\(y\)=19"):
        data.train_val_test_split(x, y[:19])
    with pytest.raises(ValueError, match="no training sample"):
        data.train_val_test_split(x, y, val=0.5, test=0.5)
    with pytest.raises(ValueError, match="fraction"):
        data.train_val_test_split(x, y, val=1.5)
    with pytest.raises(TypeError, match="fraction"):
        data.train_val_test_split(x, y, test="0.1")
    with pytest.raises(TypeError, match="seed"):
        data.train_val_test_split(x, y, seed=1.5)


@pytest.mark.parametrize("n,batch_size", [(10, 3), (9, 3), (1, 4), (7, 1), (5, 5)])
def test_batches_cover_every_sample_once(n, batch_size):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n)
    got = list(data.batches(x, y, batch_size, seed=0))
    sizes = [len(xb) for xb, _ in got]
    expected_sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert sizes == expected_sizes                      # last smaller batch kept
    ys = np.concatenate([yb for _, yb in got])
    np.testing.assert_array_equal(np.sort(ys), np.arange(n))
    for xb, yb in got:                                  # x and y stay paired
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)


def test_batches_order_shuffle_and_seed():
    x = np.arange(100)
    in_order = np.concatenate([xb for xb, _ in data.batches(x, None, 16, shuffle=False)])
    np.testing.assert_array_equal(in_order, x)
    first = np.concatenate([xb for xb, _ in data.batches(x, None, 16, seed=5)])
    again = np.concatenate([xb for xb, _ in data.batches(x, None, 16, seed=5)])
    other = np.concatenate([xb for xb, _ in data.batches(x, None, 16, seed=6)])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, x) and not np.array_equal(first, other)
    # a shared Generator gives a new order at each call (one per epoch)
    rng = np.random.default_rng(0)
    e1 = np.concatenate([xb for xb, _ in data.batches(x, None, 16, seed=rng)])
    e2 = np.concatenate([xb for xb, _ in data.batches(x, None, 16, seed=rng)])
    assert not np.array_equal(e1, e2)


def test_batches_y_none_and_views_without_shuffle():
    x = np.zeros((6, 2))
    got = list(data.batches(x, None, 4, shuffle=False))
    assert [yb for _, yb in got] == [None, None]
    assert np.shares_memory(got[0][0], x)               # no copy when not shuffling


def test_batches_non_contiguous_input():
    base = np.arange(40, dtype=np.float64).reshape(20, 2)
    x = base[::2]                                       # non-contiguous view
    y = np.arange(10)
    for xb, yb in data.batches(x, y, 3, seed=1):
        np.testing.assert_array_equal(xb, base[2 * yb])


def test_batches_errors_at_call_time():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"len\(x\)=5 and len\(y\)=4"):
        data.batches(x, np.zeros(4), 2)                # raised before iterating
    with pytest.raises(ValueError, match="positive int"):
        data.batches(x, None, 0)
    with pytest.raises(TypeError, match="positive int"):
        data.batches(x, None, 2.0)
    with pytest.raises(TypeError, match="array"):
        data.batches([1, 2, 3], None, 2)
