"""Callbacks: EarlyStopping (restores the best weights), ModelCheckpoint, LR schedules."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import callbacks, optim


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return x, y


def net(seed=0):
    return fn.Network([fn.Dense(5, 8, seed=seed, dtype="float64"), fn.ReLU(),
                       fn.Dense(8, 2, seed=seed + 1, dtype="float64")])


class Snapshots(callbacks.Callback):
    """Record every epoch's parameters (runs before the callbacks listed after it)."""

    def __init__(self):
        self.states = {}

    def on_epoch_end(self, network, epoch, logs):
        self.states[epoch] = [layer.params[name].copy() for layer, name in network.parameters()]


def test_early_stopping_stops_and_restores_best_weights():
    x, y = data()
    model = net()
    # a high learning rate makes the validation loss bounce, so the best epoch is not the last
    model.compile("cross_entropy", optim.SGD(lr=0.3, momentum=0.9))
    snaps = Snapshots()
    stop = callbacks.EarlyStopping(monitor="val_loss", patience=2)
    history = model.fit(x[:40], y[:40], epochs=40, batch_size=8, validation_data=(x[40:], y[40:]),
                        callbacks=[snaps, stop], verbose=0, seed=0)
    val = history.history["val_loss"]
    best = int(np.argmin(val)) + 1
    assert stop.best_epoch == best and np.isclose(stop.best, min(val))
    assert 1 < best and len(val) == best + 2 < 40       # patience 2: stops at the 2nd epoch without progress
    assert stop.stopped_epoch == len(val)
    for p, saved in zip([layer.params[n] for layer, n in model.parameters()], snaps.states[best]):
        np.testing.assert_array_equal(p, saved)
    assert np.isclose(model.evaluate(x[40:], y[40:])["loss"], min(val))
    # what happened, for a command line to print: from the callback, in one line
    assert (stop.restored_epoch, stop.last_epoch) == (best, len(val))
    assert stop.summary() == (
        f"early stopping: stopped after epoch {len(val)} (val_loss {val[-1]:.4g}), val_loss not "
        f"improved for 2 epochs; best val_loss {min(val):.4g} at epoch {best}; "
        f"restored the weights of epoch {best}")


def test_early_stopping_summary_without_a_stop():
    x, y = data()
    said = []
    for restore, epochs in ((True, 12), (False, 12), (True, 1)):
        model = net()
        model.compile("cross_entropy", optim.SGD(lr=0.3, momentum=0.9))
        stop = callbacks.EarlyStopping(monitor="val_loss", patience=100, restore_best=restore)
        history = model.fit(x[:40], y[:40], epochs=epochs, batch_size=8, verbose=0, seed=0,
                            validation_data=(x[40:], y[40:]), callbacks=[stop])
        val = history.history["val_loss"]
        best = int(np.argmin(val)) + 1
        assert stop.stopped_epoch is None
        if restore and best != len(val):        # weights other than the last ones came back
            assert stop.summary() == (f"early stopping: did not stop the run; best val_loss "
                                      f"{min(val):.4g} at epoch {best}; restored the weights "
                                      f"of epoch {best}")
        else:                                   # nothing to say
            assert stop.summary() is None
        said.append(stop.summary() is not None)
    assert said == [True, False, False]         # the best of 12 epochs is not the last
    assert stop.restored_epoch == 1             # one epoch: restored, and nothing to say


def test_early_stopping_without_restore_keeps_last_weights():
    x, y = data()
    model = net()
    model.compile("cross_entropy", optim.SGD(lr=3.0, momentum=0.9))
    snaps = Snapshots()
    stop = callbacks.EarlyStopping(monitor="loss", patience=0, restore_best=False)
    model.fit(x, y, epochs=6, batch_size=8, callbacks=[snaps, stop], verbose=0, seed=0)
    last = max(snaps.states)
    assert stop.summary().startswith(f"early stopping: stopped after epoch {last} (loss ")
    assert "loss not improved for 1 epoch; best loss" in stop.summary()
    assert stop.summary().endswith("; kept the last epoch's weights")
    for p, saved in zip([layer.params[n] for layer, n in model.parameters()], snaps.states[last]):
        np.testing.assert_array_equal(p, saved)


def test_monitor_direction_follows_the_key():
    for key, lower in (("val_loss", True), ("loss", True), ("val_mae", True), ("accuracy", False),
                       ("val_accuracy", False)):
        for cb in (callbacks.EarlyStopping(monitor=key), callbacks.ModelCheckpoint("m.npz", monitor=key)):
            assert cb._improved(1.0)          # the first value is always the best so far
            cb.best = 1.0
            assert cb._improved(0.5) == lower and cb._improved(2.0) == (not lower)
    with pytest.raises(TypeError, match="EarlyStopping: monitor"):
        callbacks.EarlyStopping(monitor=None)


def test_monitor_missing_raises():
    x, y = data()
    model = net()
    model.compile("cross_entropy")
    with pytest.raises(ValueError, match=r"val_loss.*\['accuracy', 'loss'\]"):
        model.fit(x, y, epochs=1, callbacks=[callbacks.EarlyStopping()], verbose=0)


def test_model_checkpoint_keeps_the_best_model(tmp_path):
    x, y = data()
    model = net()
    model.compile("cross_entropy", optim.SGD(lr=3.0, momentum=0.9), metrics=("accuracy",))
    path = tmp_path / "best.npz"
    snaps = Snapshots()
    history = model.fit(x[:40], y[:40], epochs=8, batch_size=8, validation_data=(x[40:], y[40:]),
                        callbacks=[snaps, callbacks.ModelCheckpoint(path)], verbose=0, seed=1)
    best = int(np.argmin(history.history["val_loss"])) + 1
    loaded = fn.Network.load(path)
    for (layer, name), saved in zip(loaded.parameters(), snaps.states[best]):
        np.testing.assert_array_equal(layer.params[name], saved)
    every = tmp_path / "every.npz"
    model.fit(x, y, epochs=1, callbacks=[callbacks.ModelCheckpoint(every, save_best_only=False)], verbose=0)
    np.testing.assert_array_equal(fn.Network.load(every).predict(x), model.predict(x))


@pytest.mark.parametrize("make,expected", [
    (lambda: callbacks.StepLR(2, gamma=0.5), [0.4, 0.4, 0.2, 0.2, 0.1]),
    (lambda: callbacks.ExponentialLR(0.5), [0.4, 0.2, 0.1, 0.05, 0.025]),
    (lambda: callbacks.CosineAnnealingLR(4), [0.4, 0.2 * (1 + np.cos(np.pi / 4)), 0.2,
                                              0.2 * (1 + np.cos(3 * np.pi / 4)), 0.0])])
@pytest.mark.parametrize("where", ["callback", "optimizer"])
def test_schedules_step_once_per_epoch(make, expected, where):
    x, y = data()
    model = net()
    schedule = make()
    opt = optim.SGD(lr=0.4, schedule=schedule if where == "optimizer" else None)
    model.compile("cross_entropy", opt)
    seen = []

    class LR(callbacks.Callback):
        def on_epoch_end(self, network, epoch, logs):
            seen.append(network.optimizer.lr)
    # LR runs first: it sees the rate the epoch was trained with
    cbs = [LR()] + ([schedule] if where == "callback" else [])
    model.fit(x, y, epochs=5, callbacks=cbs, verbose=0)
    np.testing.assert_allclose(seen, expected, atol=1e-12)


@pytest.mark.parametrize("where", ["callback", "optimizer"])
def test_learning_rate_given_to_fit_restarts_the_schedule(where):
    x, y = data()
    model = net()
    schedule = callbacks.StepLR(1, gamma=0.5)
    model.compile("cross_entropy", optim.SGD(lr=0.4, schedule=schedule if where == "optimizer" else None))
    cbs = [schedule] if where == "callback" else []
    model.fit(x, y, epochs=2, callbacks=cbs, verbose=0)
    assert np.isclose(model.optimizer.lr, 0.1)
    seen = []

    class LR(callbacks.Callback):
        def on_epoch_end(self, network, epoch, logs):
            seen.append(network.optimizer.lr)
    model.fit(x, y, epochs=3, learning_rate=1.0, callbacks=[LR()] + cbs, verbose=0)
    np.testing.assert_allclose(seen, [1.0, 0.5, 0.25])
