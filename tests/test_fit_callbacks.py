"""ReduceLROnPlateau (Keras' rule), CSVLogger, and the check of callbacks' hook signatures."""
import csv

import numpy as np
import pytest

import fastnn as fn
from fastnn import callbacks


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def compiled(lr=0.1):
    net = fn.Network([fn.Dense(3, 2, seed=0)])
    net.compile("cross_entropy", optimizer=fn.optim.SGD(lr=lr))
    return net


class _Net:
    def __init__(self, lr):
        self.optimizer = fn.optim.SGD(lr=lr)


def keras_rule(values, lr, factor, patience, min_delta, cooldown, min_lr):
    """Keras 3's ReduceLROnPlateau.on_epoch_end, mode "min", written out."""
    best, wait, cool, out = np.inf, 0, 0, []
    for v in values:
        if cool > 0:
            cool -= 1
            wait = 0
        if v < best - min_delta:
            best, wait = v, 0
        elif not cool > 0:
            wait += 1
            if wait >= patience and lr > min_lr:
                lr = max(lr * factor, min_lr)
                cool, wait = cooldown, 0
        out.append(lr)
    return out


@pytest.mark.parametrize("kw", [dict(factor=0.5, patience=2, min_delta=1e-4, cooldown=0, min_lr=0),
                                dict(factor=0.1, patience=1, min_delta=0.05, cooldown=2,
                                     min_lr=1e-4)])
def test_reduce_lr_on_plateau_follows_keras_rule(kw):
    values = [1.0, 0.9, 0.9, 0.95, 0.89999, 0.9, 0.91, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    want = keras_rule(values, 0.2, **kw)
    cb = callbacks.ReduceLROnPlateau(monitor="val_loss", **kw)
    net = _Net(0.2)
    cb.on_train_begin(net)
    got = []
    for epoch, v in enumerate(values, 1):
        cb.on_epoch_end(net, epoch, {"val_loss": v})
        got.append(net.optimizer.lr)
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert min(got) < 0.2


def test_reduce_lr_in_fit_maximises_accuracy_and_is_checked():
    x, y = data()
    net = compiled(lr=1e-12)           # too small to change the predictions: accuracy stays
    cb = callbacks.ReduceLROnPlateau(monitor="accuracy", factor=0.5, patience=1)
    assert not cb._monitor.lower_is_better
    net.fit(x, y, epochs=3, batch_size=8, callbacks=[cb], verbose=0)
    assert net.optimizer.lr == pytest.approx(1e-12 * 0.25)
    with pytest.raises(ValueError, match="ReduceLROnPlateau: factor"):
        callbacks.ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="ReduceLROnPlateau: patience"):
        callbacks.ReduceLROnPlateau(patience=-1)
    with pytest.raises(ValueError, match="monitor='val_loss' is not in the training logs"):
        net.fit(x, y, epochs=1, callbacks=[callbacks.ReduceLROnPlateau()], verbose=0)


def test_reduce_lr_state_round_trips():
    cb = callbacks.ReduceLROnPlateau(patience=3)
    cb.best, cb.wait, cb.cooldown_counter = 0.5, 2, 1
    other = callbacks.ReduceLROnPlateau(patience=3)
    other.load_state_dict(cb.state_dict())
    assert other.state_dict() == {"best": 0.5, "wait": 2, "cooldown_counter": 1}
    with pytest.raises(ValueError, match="expected the keys"):
        other.load_state_dict({"best": 1.0})


def test_csv_logger_writes_header_and_a_row_per_epoch(tmp_path):
    x, y = data()
    path = tmp_path / "log.csv"
    net = compiled()
    history = net.fit(x, y, epochs=3, batch_size=8, validation_data=(x, y),
                      callbacks=[callbacks.CSVLogger(path)], verbose=0)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert [float(r[1]) for r in rows[1:]] == history["loss"]       # exact: repr round-trips
    net.fit(x, y, epochs=2, batch_size=8, callbacks=[callbacks.CSVLogger(path, append=True)],
            verbose=0)
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("epoch,loss") and lines[5].startswith("2,")
    assert lines[5].count(",") == 4 and lines[5].endswith("NA,NA")  # no validation this time
    net.fit(x, y, epochs=1, batch_size=8, callbacks=[callbacks.CSVLogger(path, ";")], verbose=0)
    assert path.read_text().splitlines()[0] == "epoch;loss;accuracy"
    assert len(path.read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="CSVLogger: separator"):
        callbacks.CSVLogger(path, separator=",,")


def test_keras_signature_gets_a_clear_type_error_at_fit_start():
    x, y = data()

    class KerasStyle:
        def on_epoch_end(self, epoch, logs=None):
            pass

    class KerasBegin:
        def on_epoch_begin(self, epoch, logs=None):
            pass

    class Fine(callbacks.Callback):
        def on_epoch_end(self, network, epoch, logs):
            self.seen = epoch

        def on_batch_end(self, *args):
            pass

    net = compiled()
    before = [p.copy() for p in net[0].params.values()]
    for cb in (KerasStyle(), KerasBegin()):
        with pytest.raises(TypeError, match=r"fastnn calls on_epoch_(end|begin)\(network, epoch"):
            net.fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    for a, b in zip(before, net[0].params.values()):
        np.testing.assert_array_equal(a, b)                # refused before any step
    fine = Fine()
    net.fit(x, y, epochs=2, callbacks=[fine], verbose=0)
    assert fine.seen == 2
