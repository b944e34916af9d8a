"""fastnn.saving: atomic saves (SIGKILL while writing) and hostile model files (issue 14)."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastnn as fn
from fastnn import layers, optim, saving

from _helpers import PACKAGE_PARENT, run_python

ARCH = saving.ARCH_KEY


# --- helpers ----------------------------------------------------------------------------------
def arch_of(*layer_specs, **extra):
    return {"format": "fastnn.Network", "version": 1,
            "layers": [{"class": c, "config": cfg} for c, cfg in layer_specs], **extra}


def npy_bytes(a, fortran=False):
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(a) if fortran else a)
    return buf.getvalue()


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    """A zip of ``{name: bytes}`` (names taken as they are, duplicates allowed)."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def model_file(path, arch, arrays=(), arch_value=None):
    """A model file of the record ``arch`` (JSON-dumped unless ``arch_value`` is given)
    and ``arrays``: {key: array}."""
    value = np.array(json.dumps(arch)) if arch_value is None else arch_value
    members = [(ARCH + ".npy", npy_bytes(value))]
    members += [(k + ".npy", npy_bytes(a)) for k, a in dict(arrays).items()]
    return write_zip(path, members)


def dense_arrays(n_in, n_out, dtype=np.float32, prefix="layer0"):
    rng = np.random.default_rng(0)
    return {f"{prefix}.params.W": rng.standard_normal((n_in, n_out)).astype(dtype),
            f"{prefix}.params.b": np.zeros(n_out, dtype)}


def set_uncompressed_size(path, name, size):
    """Patch the uncompressed size that the zip's local header and central directory declare
    for member ``name`` (of a zip without zip64 records)."""
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    data[local + 22:local + 26] = size.to_bytes(4, "little")
    pos = data.index(b"PK\x01\x02")
    while data[pos + 46:pos + 46 + len(name)] != name.encode():
        pos = data.index(b"PK\x01\x02", pos + 4)
    data[pos + 24:pos + 28] = size.to_bytes(4, "little")
    open(path, "wb").write(bytes(data))


def assert_rejected(path, match, max_mb=16, **kwargs):
    """``load(path)`` raises a ValueError naming the file and matching ``match``, having
    allocated at most ``max_mb`` MiB on the way (traced: NumPy's and Python's memory)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match) as info:
            saving.load(path, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.path.basename(str(path)) in str(info.value)
    assert peak < max_mb * 2**20, f"load allocated {peak / 2**20:.1f} MiB before refusing {path}"
    return info.value


def small_net(dtype="float32"):
    return fn.Network([fn.Conv2D(1, 2, 3, padding=1, bias=False, dtype=dtype),
                       fn.BatchNorm2d(2, dtype=dtype), fn.ReLU(), fn.MaxPool2D(2), fn.Flatten(),
                       fn.Dense(8, 3, dtype=dtype), fn.Dropout(0.1), fn.LeakyReLU(0.2),
                       fn.BatchNorm1d(3, dtype=dtype), fn.FCLayer(3, 2, bias=False, dtype=dtype)])


# --- round trip and the per-layer shape rules -------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_every_kind_of_layer(tmp_path, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 1, 4, 4)).astype(dtype)
    net = small_net(dtype)
    net.compile("cross_entropy", optim.Adam(lr=0.01, betas=(0.8, 0.9)), metrics=["accuracy"])
    net.fit(x, rng.integers(0, 2, 5), epochs=2, batch_size=5, verbose=0, seed=0)
    net.save(tmp_path / "m.npz")
    loaded = fn.Network.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    assert isinstance(loaded.optimizer, optim.Adam) and loaded.optimizer.betas == (0.8, 0.9)
    assert [name for name, _ in loaded.metrics] == ["accuracy"]
    for a, b in zip(loaded.layers, net.layers):
        for store in ("params", "buffers"):
            for k, v in getattr(b, store).items():
                np.testing.assert_array_equal(getattr(a, store)[k], v)
                assert getattr(a, store)[k].flags.c_contiguous
    assert os.listdir(tmp_path) == ["m.npz"]


class Sub(fn.Network):
    pass


def test_load_builds_the_class_it_is_called_on(tmp_path):
    fn.Network([fn.Dense(2, 2)]).save(tmp_path / "m.npz")
    assert type(Sub.load(tmp_path / "m.npz")) is Sub


LAYER_CASES = [
    fn.Dense(3, 4), fn.Dense(3, 4, bias=False, dtype="float64"), fn.FCLayer(2, 5),
    fn.FCLayer(2, 5, bias=False), fn.Conv2D(2, 3, (3, 1)), fn.Conv2D(1, 2, 2, bias=False,
                                                                     dtype="float64"),
    fn.BatchNorm1d(4), fn.BatchNorm2d(3, dtype="float64"), fn.MaxPool2D(2), fn.AvgPool2D(2, 1),
    fn.GlobalAvgPool2D(),
    fn.Flatten(), fn.ReLU(), fn.LeakyReLU(0.3), fn.Sigmoid(), fn.Tanh(), fn.Softmax(),
    fn.Dropout(0.3), fn.ActivationLayer(fn.activations.tanh, fn.activations.tanh_prime),
    fn.RandomTranslation(0.1, 2, fill=-1.0), fn.RandomFlip("vertical")]


def test_every_built_in_layer_is_a_case():
    assert {type(layer) for layer in LAYER_CASES} == set(layers.LAYER_CLASSES.values())


@pytest.mark.parametrize("layer", LAYER_CASES, ids=lambda layer: repr(layer)[:40])
def test_shape_rule_matches_the_constructor(layer):
    shapes, dtype = type(layer).array_shapes(layer.get_config())
    built = {f"{store}.{k}": v for store in ("params", "buffers")
             for k, v in getattr(layer, store).items()}
    assert {k: (v.shape, v.dtype) for k, v in built.items()} == \
        {k: (shape, dtype) for k, shape in shapes.items()}


# --- atomic writes ----------------------------------------------------------------------------
def test_temporary_file_is_beside_the_target_and_gone_after_a_save(tmp_path):
    target = tmp_path / "model.npz"
    assert saving.temp_path(target) == str(tmp_path / ".model.npz.tmp-fastnn")
    fn.Network([fn.Dense(2, 2)]).save(target)
    assert os.listdir(tmp_path) == ["model.npz"]


def test_leftover_of_a_killed_save_is_replaced(tmp_path):
    target = tmp_path / "model.npz"
    leftover = saving.temp_path(target)
    with open(leftover, "wb") as f:
        f.write(b"PK\x03\x04 half a zip" * 100_000)
    net = fn.Network([fn.Dense(3, 2, seed=0)])
    net.save(target)
    assert os.listdir(tmp_path) == ["model.npz"]
    x = np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(fn.Network.load(target).predict(x), net.predict(x))


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new and incomplete")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        saving.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.bin"]
    saving.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["data.bin"]


def test_save_refuses_non_finite_weights_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.npz"
    net = fn.Network([fn.Dense(2, 2, seed=0)])
    net.save(target)
    before = target.read_bytes()
    net.layers[0].params["W"][0, 1] = np.nan
    with pytest.raises(ValueError, match=r"Network.save: layer0.params.W .*NaN"):
        net.save(target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]


def test_save_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.npz"
    link.symlink_to(tmp_path / "real" / "m.npz")
    fn.Network([fn.Dense(2, 3)]).save(link)
    assert link.is_symlink() and (tmp_path / "real" / "m.npz").is_file()
    assert fn.Network.load(link).layers[0].out_features == 3


@pytest.mark.skipif(saving.fcntl is None, reason="needs fcntl.flock")
def test_a_second_simultaneous_save_of_one_path_waits_then_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "LOCK_WAIT_S", 0.2)
    target = tmp_path / "m.npz"
    net = fn.Network([fn.Dense(2, 2)])
    with open(saving.temp_path(target), "wb") as other:       # another save holds the lock
        saving.fcntl.flock(other.fileno(), saving.fcntl.LOCK_EX)
        with pytest.raises(OSError, match=r"m\.npz.*another save of it is in progress"):
            net.save(target)
        assert not target.exists()
    net.save(target)                                            # the lock went with the file
    assert os.listdir(tmp_path) == ["m.npz"]


SAVER = """
    import sys
    import fastnn as fn
    path, value = sys.argv[1], int(sys.argv[2])
    last = int(sys.argv[3]) if len(sys.argv) > 3 else float("inf")
    net = fn.Network([fn.Dense(1024, 1024, seed=0)])         # 4 MiB of float32
    while value <= last:                                     # every state: all weights = value
        for p in net.layers[0].params.values():
            p.fill(value)
        net.save(path)
        print(value, flush=True)
        value += 1
"""

CHECKPOINTER = """
    import sys
    import numpy as np
    import fastnn as fn
    from fastnn import callbacks
    path, start = sys.argv[1], int(sys.argv[2])

    class Mark(callbacks.Callback):       # every epoch's state: all weights = its number
        value = start - 1

        def on_epoch_end(self, network, epoch, logs):
            Mark.value += 1
            for p in network.layers[0].params.values():
                p.fill(Mark.value)

    class Saved(callbacks.Callback):
        def on_epoch_end(self, network, epoch, logs):
            print(Mark.value, flush=True)

    net = fn.Network([fn.Dense(1024, 1024, seed=0)])
    net.compile("mse", fn.optim.SGD(lr=0.0))
    x = np.zeros((2, 1024), np.float32)
    # targets of 1e6: the weights set to 1e6 and more stay under fit's bound of a
    # diverging loss (1e12 times the first loss, here 1e12)
    net.fit(x, np.full_like(x, 1e6), epochs=10**9, batch_size=2, verbose=0,
            callbacks=[Mark(), callbacks.ModelCheckpoint(path, save_best_only=False), Saved()])
"""


def kill_while_writing(directory, code, rounds):
    """Run ``code`` (which saves states "all weights = n", n counting up from its second
    argument, printing n after each save) ``rounds`` times, each time SIGKILLing it while it
    writes; after every kill the target must load and hold a state of that round or later."""
    target, tmp = directory / "model.npz", saving.temp_path(directory / "model.npz")
    env = dict(os.environ,
               PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng, last, mid_write = random.Random(0), -1, 0
    for r in range(rounds):
        start = 100_000 * r
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(target),
                                 str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=os.path.dirname(PACKAGE_PARENT))
        try:
            first = proc.stdout.readline()      # one save done: the last round's leftover is gone
            assert first.strip() == str(start), proc.communicate()[1][-2000:]
            deadline = time.monotonic() + 60
            while not os.path.exists(tmp):      # the next save has begun
                assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(rng.uniform(0, 0.005))   # somewhere in its write, fsync or rename
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        mid_write += os.path.exists(tmp)
        assert set(os.listdir(directory)) <= {"model.npz", os.path.basename(tmp)}
        W, b = (fn.Network.load(target).layers[0].params[k] for k in ("W", "b"))
        value = W[0, 0]
        assert (W == value).all() and (b == value).all()
        assert value >= start and value > last
        last = value
    assert mid_write > 0, "no kill landed while a save was writing: the test proved nothing"
    return mid_write


def test_save_killed_while_writing_leaves_a_complete_file(tmp_path):
    kill_while_writing(tmp_path, SAVER, rounds=20)


def test_model_checkpoint_killed_while_writing_leaves_a_complete_file(tmp_path):
    kill_while_writing(tmp_path, CHECKPOINTER, rounds=12)


@pytest.mark.skipif(saving.fcntl is None, reason="needs fcntl.flock")
def test_two_processes_saving_one_path_never_mix_and_readers_see_whole_files(tmp_path):
    target = tmp_path / "model.npz"
    env = dict(os.environ,
               PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(SAVER), str(target),
                               str(start), str(start + 24)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env)
             for start in (1000, 2000)]
    loads = 0
    try:
        while any(p.poll() is None for p in procs):
            if target.exists():
                W = fn.Network.load(target).layers[0].params["W"]
                assert (W == W[0, 0]).all() and W[0, 0] in range(1000, 2025)
                loads += 1
    finally:
        errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    W = fn.Network.load(target).layers[0].params["W"]
    assert (W == W[0, 0]).all() and W[0, 0] in (1024, 2024)
    assert os.listdir(tmp_path) == ["model.npz"] and loads > 0


# --- hostile and broken files: a clear ValueError, without allocating --------------------------
def test_huge_declared_layer_with_tiny_arrays(tmp_path):
    path = model_file(tmp_path / "big.npz", arch_of(("Dense", {"in_features": 20000,
                                                               "out_features": 20000})),
                      dense_arrays(2, 2))
    assert os.path.getsize(path) < 2000
    assert_rejected(path, r"layer0\.params\.W.*float32 \(2, 2\).*float32 \(20000, 20000\)",
                    max_mb=1)


def huge_member_file(path, compression):
    """Dense(20000, 20000) whose W member's header is right but whose data is 16 bytes,
    with the zip declaring the 1.6 GB uncompressed size the header implies."""
    arch = arch_of(("Dense", {"in_features": 20000, "out_features": 20000, "bias": False}))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (20000, 20000)})
    header = buf.getvalue()
    assert len(header) == 128
    write_zip(path, [(ARCH + ".npy", npy_bytes(np.array(json.dumps(arch)))),
                     ("layer0.params.W.npy", header + bytes(16))], compression)
    set_uncompressed_size(path, "layer0.params.W.npy", 128 + 20000 * 20000 * 4)
    return path


def test_member_claiming_a_huge_uncompressed_size(tmp_path):
    deflated = huge_member_file(tmp_path / "claim.npz", zipfile.ZIP_DEFLATED)
    assert_rejected(deflated, r"claim\.npz.*1,600,000,\d+ bytes uncompressed, over the limit",
                    max_mb=1)
    stored = huge_member_file(tmp_path / "stored.npz", zipfile.ZIP_STORED)
    assert_rejected(stored, "declares more data than the file holds", max_mb=1,
                    max_bytes=10**12)


def zip_bomb(path, n):
    """Dense(n, n) in float64 whose W is n*n zeros, deflated: about 1000x smaller."""
    arch = arch_of(("Dense", {"in_features": n, "out_features": n, "bias": False,
                              "dtype": "float64"}))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(ARCH + ".npy", npy_bytes(np.array(json.dumps(arch))))
        with zf.open("layer0.params.W.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f8", "fortran_order": False, "shape": (n, n)})
            row = bytes(8 * n)
            for _ in range(n):
                f.write(row)
    return path


def test_zip_bomb_is_refused_unless_max_bytes_allows_it(tmp_path):
    path = zip_bomb(tmp_path / "bomb.npz", 2048)       # 32 MiB in a ~40 KB file
    assert os.path.getsize(path) < 100_000
    assert_rejected(path, r"33,55\d,\d+ bytes uncompressed, over the limit", max_mb=1)
    net = saving.load(path, max_bytes=40 * 2**20)
    assert net.layers[0].params["W"].shape == (2048, 2048) and not net.layers[0].params["W"].any()


def test_max_bytes_must_be_a_count(tmp_path):
    fn.Network([fn.ReLU()]).save(tmp_path / "m.npz")
    for bad in (-1, 1.5, "1000", True):
        with pytest.raises(ValueError, match="max_bytes must be None or an int >= 0"):
            saving.load(tmp_path / "m.npz", max_bytes=bad)
    assert len(saving.load(tmp_path / "m.npz", max_bytes=10**6).layers) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_hostile_files_under_an_address_space_limit(tmp_path):
    """The same refusals in a process that cannot map 256 MiB more than it has after import:
    nothing, traced or not, allocates the sizes the files declare."""
    big = arch_of(("Dense", {"in_features": 20000, "out_features": 20000}))
    model_file(tmp_path / "big.npz", big, dense_arrays(2, 2))
    huge_member_file(tmp_path / "claim.npz", zipfile.ZIP_DEFLATED)
    zip_bomb(tmp_path / "bomb.npz", 4096)                     # 128 MiB of zeros
    model_file(tmp_path / "deep.npz", None, arch_value=np.array("[" * 200_000 + "]" * 200_000))
    result = run_python(f"""
        import resource
        import fastnn as fn
        vm = next(int(line.split()[1]) for line in open("/proc/self/status")
                  if line.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.RLIM_INFINITY))
        for name in ("big", "claim", "bomb", "deep"):
            try:
                fn.Network.load({str(tmp_path)!r} + "/" + name + ".npz")
            except ValueError as exc:
                print(name, "ValueError", str(exc)[-80:])
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[n, "ValueError"] for n in
                                                   ("big", "claim", "bomb", "deep")], lines


def test_deep_json_is_refused(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = model_file(tmp_path / "deep.npz", None, arch_value=np.array(deep))
    assert_rejected(path, "nests deeper than 16 levels")
    nested = [1]
    for _ in range(20):
        nested = [nested]
    path = model_file(tmp_path / "nested.npz", arch_of(("ReLU", {"x": nested})))
    assert_rejected(path, "nests deeper than 16 levels")


def test_oversized_architecture_record_is_refused(tmp_path):
    arch = arch_of(("ReLU", {}), note="x" * saving.MAX_ARCH_CHARS)
    path = model_file(tmp_path / "long.npz", arch)
    assert_rejected(path, r"1,000,\d+ characters, over the limit of 1,000,000", max_mb=1)


@pytest.mark.parametrize("where,value", [("layer0.params.W", np.nan), ("layer0.params.b", np.inf),
                                         ("layer1.buffers.running_var", -np.inf)])
def test_non_finite_arrays_are_refused(tmp_path, where, value):
    arch = arch_of(("Dense", {"in_features": 3, "out_features": 2}),
                   ("BatchNorm1d", {"num_features": 2}))
    arrays = dict(dense_arrays(3, 2), **{f"layer1.{s}": np.ones(2, np.float32) for s in
                                        ("params.gamma", "params.beta", "buffers.running_mean",
                                         "buffers.running_var")})
    arrays[where].flat[-1] = value
    path = model_file(tmp_path / "nan.npz", arch, arrays)
    assert_rejected(path, rf"{where}' holds NaN or infinity")


@pytest.mark.parametrize("part,record,match", [
    ("layer", {"class": "Layer", "config": {}}, "unknown class 'Layer'"),
    ("layer", {"class": "__class__", "config": {}}, "unknown class"),
    ("layer", {"class": "Dense"}, "not a record"),
    ("loss", {"class": "Loss", "config": {}}, "unknown loss class 'Loss'"),
    ("loss", {"class": "Adam", "config": {}}, "unknown loss class 'Adam'"),
    ("loss", {"class": "np", "config": {}}, "unknown loss class 'np'"),
    ("loss", {"class": "__builtins__", "config": {}}, "unknown loss class"),
    ("loss", {"class": 3, "config": {}}, "not a record"),
    ("optimizer", {"class": "Optimizer", "config": {}}, "unknown optimizer class 'Optimizer'"),
    ("optimizer", {"class": "StepLR", "config": {"step_size": 1}}, "unknown optimizer class"),
    ("optimizer", {"class": "MSE", "config": {}}, "unknown optimizer class 'MSE'"),
    ("optimizer", {"class": "SGD", "config": {"lr": 0.1, "schedule": {"x": 1}}},
     "the optimizer SGD has a bad config.*bind"),
    ("loss", {"class": "MSE", "config": {"reduction": "sum"}}, "the loss MSE has a bad config"),
])
def test_foreign_classes_and_records_are_refused(tmp_path, part, record, match):
    arch = arch_of(("ReLU", {}))
    if part == "layer":
        arch["layers"] = [record]
    else:
        arch["loss"] = {"class": "MSE", "config": {}}
        arch[part] = record
    assert_rejected(model_file(tmp_path / "foreign.npz", arch), match)


@pytest.mark.parametrize("config,match", [
    ({"in_features": "20000", "out_features": 2}, "in_features must be a positive int"),
    ({"in_features": -3, "out_features": 2}, "in_features must be a positive int"),
    ({"in_features": 2.0, "out_features": 2}, "in_features must be a positive int"),
    ({"in_features": True, "out_features": 2}, "in_features must be a positive int"),
    ({"out_features": 2}, "in_features must be a positive int, got None"),
    ({"in_features": 10**400, "out_features": 2}, r"\(2, 2\), its layer's config declares"),
    ({"in_features": 2, "out_features": 2, "dtype": "int8"}, "dtype must be float32 or float64"),
    ({"in_features": 2, "out_features": 2, "activation": "relu"}, "activation"),
])
def test_bad_layer_configs_are_refused(tmp_path, config, match):
    path = model_file(tmp_path / "cfg.npz", arch_of(("Dense", config)), dense_arrays(2, 2))
    assert_rejected(path, match)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(version=2), "format version 2 is not 1"),
    (lambda a: a.update(format="keras"), "not a fastnn.Network"),
    (lambda a: a.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda a: a.update(layers={"0": {}}), "no list of layers"),
    (lambda a: a.update(optimizer={"class": "SGD", "config": {}}), "optimizer but no loss"),
    (lambda a: a.update(loss={"class": "MSE", "config": {}}, metrics="accuracy"),
     "metrics must be a list"),
    (lambda a: a.update(loss={"class": "MSE", "config": {}}, metrics=["confusion_matrix"]),
     "unknown metric"),
    (lambda a: a["layers"].append({"class": "BatchNorm1d", "config": {"num_features": 2,
                                                                       "eps": float("nan")}}),
     "not valid JSON.*NaN"),
])
def test_malformed_records_are_refused(tmp_path, change, match):
    arch = arch_of(("ReLU", {}))
    change(arch)
    assert_rejected(model_file(tmp_path / "rec.npz", arch), match)


def test_members_that_disagree_with_the_record_are_refused(tmp_path):
    dense = arch_of(("Dense", {"in_features": 3, "out_features": 2}))
    arrays = dense_arrays(3, 2)
    cases = {
        "missing": (dense, {"layer0.params.W": arrays["layer0.params.W"]},
                    "'layer0.params.b' is missing"),
        "extra": (dense, dict(arrays, **{"layer0.params.Z": np.ones(2)}), "no layer declares"),
        "dtype": (dense, dense_arrays(3, 2, np.float64), r"float64 \(3, 2\).*float32 \(3, 2\)"),
        "int": (dense, dict(arrays, **{"layer0.params.b": np.ones(2, np.int64)}), "int64"),
        "arch_type": (None, {}, r"architecture record is float64 \(\), not a unicode string"),
    }
    for name, (arch, members, match) in cases.items():
        value = np.array(1.5) if arch is None else None
        path = model_file(tmp_path / f"{name}.npz", arch, members, arch_value=value)
        assert_rejected(path, match)


def test_zip_level_oddities_are_refused(tmp_path):
    record = arch_of(("Dense", {"in_features": 3, "out_features": 2}))
    arch = npy_bytes(np.array(json.dumps(record)))
    arrays = {k + ".npy": npy_bytes(a) for k, a in dense_arrays(3, 2).items()}
    w, b = arrays.items()
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_zip(tmp_path / "dup.npz", [(ARCH + ".npy", arch), w, w, b])
    assert_rejected(tmp_path / "dup.npz", "repeated member 'layer0.params.W.npy'")
    write_zip(tmp_path / "txt.npz", [(ARCH + ".npy", arch), w, b, ("readme.txt", b"hi")])
    assert_rejected(tmp_path / "txt.npz", "unexpected or repeated member 'readme.txt'")
    write_zip(tmp_path / "long.npz", [(ARCH + ".npy", arch), (w[0], w[1] + bytes(8)), b])
    assert_rejected(tmp_path / "long.npz", r"declares 1\d\d bytes, its header .* implies 1\d\d")
    write_zip(tmp_path / "bz2.npz", [(ARCH + ".npy", arch), w, b], zipfile.ZIP_BZIP2)
    assert_rejected(tmp_path / "bz2.npz", "compressed with a method fastnn does not read")
    npy3 = w[1].replace(b"\x93NUMPY\x01\x00", b"\x93NUMPY\x03\x00")
    write_zip(tmp_path / "v3.npz", [(ARCH + ".npy", arch), (w[0], npy3), b])
    assert_rejected(tmp_path / "v3.npz", r"version \(3, 0\)")


def test_deflated_and_fortran_order_members_load(tmp_path):
    arch = arch_of(("Dense", {"in_features": 3, "out_features": 4}))
    arrays = dense_arrays(3, 4)
    members = [(ARCH + ".npy", npy_bytes(np.array(json.dumps(arch))))]
    members += [(k + ".npy", npy_bytes(a, fortran=True)) for k, a in arrays.items()]
    write_zip(tmp_path / "f.npz", members, zipfile.ZIP_DEFLATED)
    W = fn.Network.load(tmp_path / "f.npz").layers[0].params["W"]
    np.testing.assert_array_equal(W, arrays["layer0.params.W"])
    assert W.flags.c_contiguous


def test_truncated_files_are_refused_wherever_cut(tmp_path):
    small_net().save(tmp_path / "m.npz")
    data = (tmp_path / "m.npz").read_bytes()
    for cut in sorted({0, 1, 10, 100, len(data) - 1, len(data) - 22, *range(0, len(data), 97)}):
        path = tmp_path / f"cut{cut}.npz"
        path.write_bytes(data[:cut])
        assert_rejected(path, f"cut{cut}.npz")


def test_flipped_bytes_give_a_value_error_or_load(tmp_path):
    """Corruption anywhere: load either refuses with a ValueError or (a byte the CRC does not
    cover, such as a zip timestamp) loads the same network."""
    net = fn.Network([fn.Dense(3, 2, seed=0), fn.ReLU()])
    net.save(tmp_path / "m.npz")
    data = bytearray((tmp_path / "m.npz").read_bytes())
    x = np.ones((1, 3), np.float32)
    for i in range(0, len(data), 7):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        path = tmp_path / "flip.npz"
        path.write_bytes(bytes(bad))
        try:
            loaded = fn.Network.load(path)
        except ValueError as exc:
            assert "flip.npz" in str(exc)
            continue
        np.testing.assert_array_equal(loaded.predict(x), net.predict(x))


def test_files_that_are_not_model_zips(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    assert_rejected(tmp_path / "empty.npz", "truncated or foreign")
    (tmp_path / "text.npz").write_text("hello" * 1000)
    assert_rejected(tmp_path / "text.npz", "truncated or foreign")
    np.save(tmp_path / "array.npy", np.zeros(3))
    assert_rejected(tmp_path / "array.npy", "truncated or foreign")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    assert_rejected(tmp_path / "plain.npz", "no fastnn architecture")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        saving.load(tmp_path / "nope.npz")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(IsADirectoryError, match="somedir"):
        saving.load(tmp_path / "somedir")
