"""Exact resume (issue 14, defects 5 and 10): the optimizer's state in saves,
BackupAndRestore (SIGKILL at random moments, then run again), a loss that explodes."""
import json
import os
import zipfile

import numpy as np
import pytest

import fastnn as fn
from fastnn import layers, optim, saving


# --- helpers ----------------------------------------------------------------------------------
def data(n=45, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)


def make_net(optimizer, dropout=True, seed=1):
    net = fn.Network([layers.Dense(6, 16, seed=seed), layers.BatchNorm1d(16), layers.ReLU(),
                      *([layers.Dropout(0.3, seed=seed)] if dropout else []),
                      layers.Dense(16, 3, seed=seed + 1)])
    net.compile("cross_entropy", optimizer)
    return net


def weights(net):
    return [np.array(a) for layer in net.layers
            for store in ("params", "buffers") for a in (getattr(layer, store, None) or {}).values()]


def assert_same_bits(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert u.tobytes() == v.tobytes()


OPTIMIZERS = {
    "sgd-momentum-decay-steplr": lambda: optim.SGD(0.05, momentum=0.9, weight_decay=1e-3,
                                                   nesterov=True, schedule=optim.StepLR(1, 0.5)),
    "adam-cosine": lambda: optim.Adam(0.01, weight_decay=1e-4,
                                      schedule=optim.CosineAnnealingLR(4)),
    "sgd-plain": lambda: optim.SGD(0.1),
    # 45 samples in batches of 8: 6 batches an epoch, 4 epochs
    "adamw-onecycle-clipnorm": lambda: optim.AdamW(0.01, clipnorm=0.5,
                                                   schedule=optim.OneCycleLR(0.05, 4, 6)),
    "rmsprop-warmup-steplr-globalclip": lambda: optim.RMSprop(
        0.01, momentum=0.5, weight_decay=1e-3, global_clipnorm=1.0,
        schedule=optim.LinearWarmup(8, then=optim.StepLR(1, 0.5))),
}


# --- 1. the optimizer's state in saves ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_save_load_goes_on_exactly(tmp_path, name):
    """2 epochs, save, load, 2 more: the bits of 4 uninterrupted epochs (weights, buffers,
    the optimizer's state, the schedule's lr, the history)."""
    x, y = data()
    ref = make_net(OPTIMIZERS[name]())
    h1 = ref.fit(x, y, epochs=2, batch_size=8, seed=3, verbose=0)
    h2 = ref.fit(x, y, epochs=2, batch_size=8, seed=4, verbose=0)

    net = make_net(OPTIMIZERS[name]())
    assert net.fit(x, y, epochs=2, batch_size=8, seed=3, verbose=0).history == h1.history
    net.save(tmp_path / "m.npz")
    back = fn.Network.load(tmp_path / "m.npz")
    assert type(back.optimizer.schedule) is type(ref.optimizer.schedule)
    assert back.fit(x, y, epochs=2, batch_size=8, seed=4, verbose=0).history == h2.history
    assert_same_bits(weights(back), weights(ref))
    assert back.optimizer.lr == ref.optimizer.lr
    assert back.optimizer.state_dict()["schedule"] == ref.optimizer.state_dict()["schedule"]
    for s, t in zip(back.optimizer.state_dict()["state"], ref.optimizer.state_dict()["state"]):
        assert_same_bits(s, t)


def test_without_the_optimizer_state_training_starts_over(tmp_path):
    """include_optimizer=False stores the optimizer's config, not its state: the moments
    start at zero again, so the next steps differ from an uninterrupted run."""
    x, y = data()
    net = make_net(optim.Adam(0.01), dropout=False)
    net.fit(x, y, epochs=1, batch_size=8, seed=3, verbose=0)
    net.save(tmp_path / "with.npz")
    net.save(tmp_path / "without.npz", include_optimizer=False)
    with zipfile.ZipFile(tmp_path / "without.npz") as zf:
        assert not any(n.startswith("optimizer.") for n in zf.namelist())
    fresh = fn.Network.load(tmp_path / "without.npz")
    assert fresh.optimizer.state is None and fresh.optimizer.t == 0
    assert fn.Network.load(tmp_path / "with.npz").optimizer.t == net.optimizer.t > 0


def test_state_dict_round_trip_and_bad_values():
    p = [np.ones((2, 3), np.float32), np.zeros(3, np.float32)]
    g = [np.full((2, 3), 0.5, np.float32), np.ones(3, np.float32)]
    adam = optim.Adam(0.1)
    adam.step(p, g)
    sd = adam.state_dict()
    assert sd["t"] == 1 and [len(e) for e in sd["state"]] == [2, 2]
    json.dumps({k: v for k, v in sd.items() if k != "state"})      # plain numbers
    other = optim.Adam(0.1)
    other.load_state_dict(sd)
    q = [a.copy() for a in p]
    adam.step(p, g)
    other.step(q, g)
    assert_same_bits(p, q)
    bad = [({**sd, "t": -1}, "t must be an int"), ({**sd, "lr": float("nan")}, "lr"),
           ({**sd, "state": [sd["state"][0]]  + [[np.zeros(3)]]}, "list of 2 arrays"),
           ({**sd, "state": [[np.full((2, 3), np.inf, np.float32)] * 2, sd["state"][1]]},
            "NaN or infinity"),
           ({**sd, "schedule": {"epoch": 1, "base_lr": 0.1}}, "schedule"),
           ({"lr": 0.1}, "expected the keys")]
    for value, match in bad:
        with pytest.raises(ValueError, match=match):
            optim.Adam(0.1).load_state_dict(value)
    with pytest.raises(ValueError, match="epoch must be an int"):
        optim.StepLR(2).load_state_dict({"epoch": 2**60, "base_lr": 0.1})
    sgd = optim.SGD(0.1)            # no momentum: no arrays
    with pytest.raises(ValueError, match="list of 0 arrays"):
        sgd.load_state_dict({"lr": 0.1, "schedule": None, "state": [[np.zeros(3)]]})


def _rewrite(path, edit_arch=None, edit_arrays=None):
    """The model file ``path`` with its record and arrays edited (written without checks)."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arch = json.loads(str(arrays.pop(saving.ARCH_KEY)))
    if edit_arch:
        edit_arch(arch)
    if edit_arrays:
        edit_arrays(arrays)
    np.savez(path, **arrays, **{saving.ARCH_KEY: np.array(json.dumps(arch))})


@pytest.mark.parametrize("edit_arch, edit_arrays, match", [
    (lambda a: a["optimizer_state"].update(t=-3), None, "t must be an int"),
    (lambda a: a["optimizer_state"].update(lr=1e400), None, "lr must be finite|not a number"),
    (lambda a: a["optimizer_state"]["params"].pop(), None, "lists the parameters"),
    (lambda a: a["optimizer_state"]["params"].__setitem__(0, 7), None, "lists the parameters"),
    (lambda a: a["optimizer_state"].update(params="layer0.params.W"), None,
     "lists the parameters"),
    (lambda a: a.pop("optimizer"), None, "(schedule|optimizer_state) but no optimizer"),
    (lambda a: a["schedule"].update({"class": "Schedule"}), None, "unknown schedule class"),
    (lambda a: a["schedule"]["config"].update(T_max=0), None, "T_max must be a positive"),
    (lambda a: a["optimizer_state"]["schedule"].update(epoch="1"), None, "epoch must be an int"),
    (None, lambda arrs: arrs.update({"optimizer.state.0.0": np.zeros((10**4, 10**4 // 8),
                                                                     np.float32)[:1]}),
     r"optimizer.state.0.0.* declares float32 \(6, 16\)"),
    (None, lambda arrs: arrs.pop("optimizer.state.1.1"), "optimizer.state.1.1' is missing"),
    (None, lambda arrs: arrs["optimizer.state.0.0"].fill(np.nan), "holds NaN"),
])
def test_hostile_optimizer_state_is_refused(tmp_path, edit_arch, edit_arrays, match):
    x, y = data()
    net = make_net(optim.Adam(0.01, schedule=optim.CosineAnnealingLR(3)), dropout=False)
    net.fit(x, y, epochs=1, batch_size=8, seed=3, verbose=0)
    path = tmp_path / "m.npz"
    net.save(path)
    _rewrite(path, edit_arch, edit_arrays)
    with pytest.raises(ValueError, match=match) as info:
        fn.Network.load(path)
    assert str(path) in str(info.value)


# --- 2. BackupAndRestore ----------------------------------------------------------------------
class Crash(fn.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of the ``at``-th batch of the fit (0: never;
    -1: as the fit ends, after the last backup, before the other callbacks' train end)."""

    def __init__(self, at):
        self.at, self.seen = at, 0

    def on_batch_end(self, network, batch, logs):
        self.seen += 1
        if self.seen == self.at:
            raise KeyboardInterrupt

    def on_train_end(self, network):
        if self.at == -1:
            raise KeyboardInterrupt


def fit_run(backup_dir, save_freq, crash=0, patience=1, epochs=5):
    """A fresh network, fit with Dropout, BatchNorm, Adam + cosine schedule, shuffling,
    validation and EarlyStopping(restore_best); -> (network, history or None if crashed)."""
    x, y = data()
    net = make_net(optim.Adam(0.01, schedule=optim.CosineAnnealingLR(4)))
    callbacks = [Crash(crash), fn.callbacks.EarlyStopping("val_loss", patience=patience, min_delta=0.05),
                 fn.callbacks.BackupAndRestore(backup_dir, save_freq=save_freq)]
    try:
        history = net.fit(x, y, epochs=epochs, batch_size=8, seed=5, verbose=0,
                          validation_data=(x[:9], y[:9]), callbacks=callbacks)
    except KeyboardInterrupt:
        return net, None
    return net, history.history


@pytest.mark.parametrize("save_freq", ["epoch", 1, 4, 7])
@pytest.mark.parametrize("patience", [1, 9])
def test_interrupted_then_rerun_ends_as_uninterrupted(tmp_path, save_freq, patience):
    """Stopped after batch k (every k of the 5 x 6 batches, or where EarlyStopping stops
    first), then run again from scratch with the backup: the same weights, buffers and
    history as one uninterrupted fit, and the backup is gone."""
    ref, ref_history = fit_run(tmp_path / "ref", save_freq, patience=patience)
    stopped_early = len(ref_history["loss"]) < 5
    assert stopped_early == (patience == 1)        # both paths (stop_training restored) run
    for crash in [-1, *range(1, 31, 3)]:
        backup = tmp_path / f"b{crash}"
        _, history = fit_run(backup, save_freq, crash=crash, patience=patience)
        assert history is None or crash > 6 * len(ref_history["loss"])
        assert (crash == -1 and save_freq in ("epoch", 1)) <= (backup / "backup.npz").exists()
        net, history = fit_run(backup, save_freq, patience=patience)
        assert history == ref_history
        assert_same_bits(weights(net), weights(ref))
        assert not backup.exists()


def test_a_backup_of_another_network_or_run_is_refused(tmp_path):
    fit_run(tmp_path / "b", "epoch", crash=8)
    assert (tmp_path / "b" / "backup.npz").exists()
    x, y = data()
    other = fn.Network([layers.Dense(6, 3)])
    other.compile("cross_entropy", "adam")
    with pytest.raises(ValueError, match="BackupAndRestore: the backup .* does not fit .* layers"):
        other.fit(x, y, epochs=2, verbose=0, callbacks=[fn.callbacks.BackupAndRestore(
            tmp_path / "b")])
    net = make_net(optim.Adam(0.01, schedule=optim.CosineAnnealingLR(4)))
    with pytest.raises(ValueError, match="callbacks"):       # not the callbacks it was made with
        net.fit(x, y, epochs=2, verbose=0, callbacks=[fn.callbacks.BackupAndRestore(
            tmp_path / "b")])
    with pytest.raises(ValueError, match="save_freq must be 'epoch' or a positive int"):
        fn.callbacks.BackupAndRestore(tmp_path, save_freq=0)
    with pytest.raises(TypeError, match="backup_dir must be a path"):
        fn.callbacks.BackupAndRestore(None)


CHILD = """
import json, sys, time
import numpy as np
import fastnn as fn
from fastnn import layers, optim

backup, out, save_freq = sys.argv[1], sys.argv[2], sys.argv[3]
save_freq = save_freq if save_freq == "epoch" else int(save_freq)
rng = np.random.default_rng(0)
x = rng.standard_normal((300, 6)).astype(np.float32)
y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
net = fn.Network([layers.Dense(6, 16, seed=1), layers.BatchNorm1d(16), layers.ReLU(),
                  layers.Dropout(0.3, seed=1), layers.Dense(16, 3, seed=2)])
net.compile("cross_entropy", optim.Adam(0.01, schedule=optim.CosineAnnealingLR(6)))

class Slow(fn.callbacks.Callback):       # stretches the run so that kills land inside it
    def on_batch_end(self, network, batch, logs):
        time.sleep(0.003)

history = net.fit(x, y, epochs=6, batch_size=16, seed=5, verbose=0,
                  validation_data=(x[:50], y[:50]),
                  callbacks=[Slow(), fn.callbacks.EarlyStopping("val_loss", patience=2),
                             fn.callbacks.BackupAndRestore(backup, save_freq=save_freq)])
arrays = [a for l in net.layers for s in ("params", "buffers")
          for a in (getattr(l, s, None) or {}).values()]
np.savez(out + ".npz", *arrays)
with open(out + ".json", "w") as f:
    json.dump(history.history, f)
"""


def _spawn(script, *args):
    import subprocess
    import sys
    from _helpers import PACKAGE_PARENT
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _file_id(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _result(out):
    with np.load(f"{out}.npz") as f:
        arrays = [f[k] for k in f.files]
    with open(f"{out}.json") as f:
        return arrays, json.load(f)


@pytest.mark.parametrize("save_freq", ["epoch", 7])
def test_sigkill_at_random_moments_then_rerun_is_bit_exact(tmp_path, save_freq):
    """The same script, killed with SIGKILL at random moments (each time a little after it
    wrote a new backup, so that every run makes progress: inside a step, a save, an
    epoch's end) and run again until it completes, ends with the weights and history of
    an uninterrupted run, bit for bit."""
    import random
    import signal
    import time
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    ref = _spawn(script, tmp_path / "ref-backup", tmp_path / "ref", save_freq)
    assert ref.wait(timeout=120) == 0, ref.stderr.read().decode()
    backup, out = tmp_path / "backup", tmp_path / "out"
    chooser, kills, runs = random.Random(f"{save_freq}"), 0, 0
    while True:
        runs += 1
        assert runs < 20
        before = _file_id(backup / "backup.npz")
        child = _spawn(script, backup, out, save_freq)
        if kills < 4:
            deadline = time.monotonic() + 60
            while _file_id(backup / "backup.npz") in (before, None) and child.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            time.sleep(chooser.uniform(0, 0.05))
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                kills += 1
        if child.wait(timeout=120) == 0:
            break
        assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    assert kills >= 3
    (ref_arrays, ref_history), (arrays, history) = _result(tmp_path / "ref"), _result(out)
    assert history == ref_history
    assert_same_bits(arrays, ref_arrays)
    assert not backup.exists()


# --- 3. a loss that explodes without becoming NaN -----------------------------------------------
class Snapshots(fn.callbacks.Callback):
    """The batch losses and the weights after each step."""

    def __init__(self):
        self.losses, self.after = [], []

    def on_batch_end(self, network, batch, logs):
        self.losses.append(logs["loss"])
        self.after.append(weights(network))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_an_exploding_loss_stops_fit_before_its_step(dtype):
    """lr=1e4: the loss climbs by orders of magnitude while still finite; past DIVERGED
    (1e12) times the first batch loss, fit raises FloatingPointError naming the epoch and
    batch, the parameters as after the last good step."""
    x, y = data(n=64)
    net = fn.Network([layers.Dense(6, 16, seed=1, dtype=dtype), layers.ReLU(),
                      layers.Dense(16, 3, seed=2, dtype=dtype)])
    net.compile("cross_entropy", optim.SGD(1e4))
    record = Snapshots()
    with pytest.raises(FloatingPointError, match=r"Network.fit: at epoch 1, batch \d+ of 8, "
                                                 r"the loss became .*over .*diverged") as info:
        net.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[record])
    failing = float(str(info.value).split("the loss became ")[1].split(",")[0])
    assert np.isfinite(failing) and failing > fn.network.DIVERGED * record.losses[0]
    assert all(loss <= fn.network.DIVERGED * max(1, record.losses[0]) for loss in record.losses)
    assert_same_bits(weights(net), record.after[-1])


def test_a_loss_that_grows_less_than_the_bound_trains_on():
    """The bound is DIVERGED x max(1, first loss): from a first loss of 1e-6, a batch loss
    of 9e8 trains on (the floor of 1), one of 9e12 stops fit at that batch."""
    for target, stops in ((3e4, False), (3e6, True)):
        net = fn.Network([layers.Dense(1, 1, bias=False)])
        net.layers[0].params["W"][...] = 0                    # lr 0: the output stays 0
        net.compile("mse", optim.SGD(0.0))
        x = np.ones((8, 1), np.float32)
        y = np.repeat(np.array([[1e-3], [target]], np.float32), 4, axis=0)
        if stops:
            with pytest.raises(FloatingPointError, match="batch 2 of 2, .*diverged"):
                net.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
        else:
            history = net.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
            assert history.history["loss"][0] == pytest.approx((1e-6 + 9e8) / 2, rel=1e-5)


def test_train_step_alone_has_no_bound_but_nan():
    net = fn.Network([layers.Dense(1, 1, bias=False)])
    net.compile("mse", optim.SGD(0.0))
    assert net.train_step(np.ones((2, 1)), np.full((2, 1), 1e15))["loss"] > 1e29


def test_callbacks_state_dicts(tmp_path):
    """ModelCheckpoint's best and EarlyStopping's counters go through plain numbers;
    anything else is refused naming the callback."""
    saver = fn.callbacks.ModelCheckpoint(tmp_path / "best.npz")
    saver.best = 0.25
    other = fn.callbacks.ModelCheckpoint(tmp_path / "best.npz")
    other.load_state_dict(json.loads(json.dumps(saver.state_dict())))
    assert other.best == 0.25
    stopper = fn.callbacks.EarlyStopping(patience=3)
    stopper.best, stopper.wait, stopper.best_epoch = 0.5, 2, 4
    again = fn.callbacks.EarlyStopping(patience=3)
    again.load_state_dict(stopper.state_dict())
    assert (again.best, again.wait, again.best_epoch, again._best_state) == (0.5, 2, 4, None)
    for bad, match in (({"best": "0.5"}, "best must be a number"), ({}, "expected the keys")):
        with pytest.raises(ValueError, match=f"ModelCheckpoint.load_state_dict: {match}"):
            other.load_state_dict(bad)
    with pytest.raises(ValueError, match="_best_state must be a list of arrays"):
        again.load_state_dict({**stopper.state_dict(), "_best_state": [1.0]})


def habits_run(backup_dir, crash=0):
    """fit with the Keras conveniences: AdamW + OneCycleLR (per batch), global_clipnorm,
    class_weight, validation_split and ReduceLROnPlateau, under BackupAndRestore(1)."""
    x, y = data()
    net = make_net(optim.AdamW(0.01, global_clipnorm=1.0,
                               schedule=optim.OneCycleLR(0.05, 5, 5)))
    callbacks = [Crash(crash), fn.callbacks.ReduceLROnPlateau(patience=1, factor=0.5),
                 fn.callbacks.BackupAndRestore(backup_dir, save_freq=1)]
    try:
        history = net.fit(x, y, epochs=5, batch_size=8, seed=5, verbose=0,
                          validation_split=0.2, class_weight={0: 1.0, 1: 2.0, 2: 0.5},
                          callbacks=callbacks)
    except KeyboardInterrupt:
        return net, None
    return net, history.history


def test_keras_conveniences_resume_bit_exact(tmp_path):
    """36 training samples in batches of 8: 5 an epoch; crashed after batch k, rerun with
    the backup: the uninterrupted run's weights and history."""
    ref, ref_history = habits_run(tmp_path / "ref")
    for crash in (3, 5, 11, 24):
        backup = tmp_path / f"b{crash}"
        assert habits_run(backup, crash=crash)[1] is None
        net, history = habits_run(backup)
        assert history == ref_history
        assert_same_bits(weights(net), weights(ref))
        assert net.optimizer.lr == ref.optimizer.lr
