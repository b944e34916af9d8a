"""The fastnn-train command (fastnn.train): options, quick trainings, save/plot, determinism."""
import gzip
import hashlib
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastnn as fn
from _helpers import needs_mnist, shared_data_root
from fastnn import datasets, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def weights(path):
    """{name: array} of a saved network's .npz (every array in the file)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# --- options --------------------------------------------------------------------

def test_task_defaults_and_overrides():
    args = train.parse_args(["mnist-lenet"])
    assert (args.epochs, args.batch_size, args.lr, args.kind, args.device, args.seed) == (
        train.TASKS["mnist-lenet"]["epochs"], train.TASKS["mnist-lenet"]["batch_size"],
        train.TASKS["mnist-lenet"]["lr"], "mnist", "cpu", 0)
    assert args.weight_decay == train.TASKS["mnist-lenet"]["weight_decay"]
    args = train.parse_args(["mnist-mlp", "--epochs", "3", "--batch-size", "128", "--lr", "0.01",
                             "--dataset", "fashion", "--seed", "4", "--weight-decay", "0"])
    assert (args.epochs, args.batch_size, args.lr, args.kind, args.seed, args.weight_decay) == (
        3, 128, 0.01, "fashion", 4, 0.0)
    assert train.parse_args(["mnist-mlp", "--kind", "fashion"]).kind == "fashion"


@pytest.mark.parametrize("argv,match", [
    (["resnet"], "invalid choice"),
    (["circles", "--epochs", "0"], "--epochs must be >= 1"),
    (["circles", "--batch-size", "-2"], "--batch-size must be >= 1"),
    (["circles", "--lr", "0"], "--lr must be > 0"),
    (["circles", "--val", "1.5"], "--val must lie in"),
    (["circles", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["circles", "--device", "tpu"], "invalid choice"),
])
def test_bad_options_exit_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    if "cuda" in fn.backend.available():
        pytest.skip("a GPU is available here")
    with pytest.raises(SystemExit):
        train.parse_args(["circles", "--device", "cuda"])
    assert "no usable CUDA device" in capsys.readouterr().err


def test_model_architectures():
    lenet = train.build_model("mnist-lenet")
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert lenet.forward(x).shape == (2, 10)
    sizes = sorted(p.size for layer in lenet.layers for p in layer.params.values())
    # LeNet-5: conv 6@5x5 (150+6), conv 16@6x5x5 (2400+16), 400x120, 120x84, 84x10
    assert sizes == sorted([150, 6, 2400, 16, 48000, 120, 10080, 84, 840, 10])
    mlp = train.build_model("mnist-mlp")
    assert mlp.forward(x).shape == (2, 10)
    shapes = [layer.params["W"].shape for layer in mlp.layers if "W" in layer.params]
    assert shapes == [(784, 256), (256, 128), (128, 10)]


# --- quick trainings ----------------------------------------------------------------

def test_xor_learns(capsys):
    _, history, acc = train.run(train.parse_args(["xor", "--epochs", "1000"]))
    out = capsys.readouterr().out
    assert "epoch 1000/1000" in out and "predictions:" in out and "precision" in out
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
    assert acc == 1.0


def test_circles_reaches_the_target(capsys):
    """The course's Circle experiment with the command's defaults: >= 95% test accuracy."""
    net, history, acc = train.run(train.parse_args(["circles"]))
    out = capsys.readouterr().out
    assert acc >= 0.95
    assert "val_accuracy" in out and "test accuracy" in out
    assert "200 test samples" in out or "200 test" in out
    assert len(history.history["val_loss"]) == len(history.history["loss"])
    # it stopped early (at epoch 92 of 100 with seed 0), and says so
    stopped = len(history.history["loss"])
    assert stopped < 100
    assert f"early stopping: stopped after epoch {stopped} (val_loss " in out
    assert "; restored the weights of epoch " in out


def test_save_loads_back_to_the_same_predictions(tmp_path, capsys):
    path = tmp_path / "circles.npz"
    net, _, _ = train.run(train.parse_args(["circles", "--epochs", "3", "--save", str(path),
                                            "--weight-decay", "0.001", "--lr", "0.2"]))
    assert f"saved the network to {path}" in capsys.readouterr().out
    assert (net.optimizer.weight_decay, net.optimizer.momentum) == (0.001, 0.9)
    loaded = fn.Network.load(str(path))
    x = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))


def test_export_writes_an_onnx_model_that_predicts_the_same(tmp_path, capsys):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "circles.onnx"
    net, _, _ = train.run(train.parse_args(["circles", "--epochs", "2", "--export", str(path)]))
    assert f"exported the network to {path} (ONNX)" in capsys.readouterr().out
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], net.predict(x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option,name", [("--save", "m.npz"), ("--export", "m.onnx"),
                                         ("--plot", "m.png")])
def test_unwritable_output_is_refused_before_training(tmp_path, monkeypatch, option, name,
                                                      capsys):
    """A typo in the folder is reported at once, not after the training."""
    for path, problem in ((tmp_path / "missing" / name, "does not exist"),
                          (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as exc:
            train.main(["circles", option, str(path)])
        assert exc.value.code == 2
        out, err = capsys.readouterr()
        assert f"{option} {path}: " in err and problem in err
        assert "epoch" not in out                     # nothing trained
    locked, read_only = tmp_path / "locked", tmp_path / ("read-only-" + name)
    locked.mkdir(mode=0o500)
    read_only.write_bytes(b"")
    read_only.chmod(0o400)
    if os.geteuid() == 0:                             # root writes anywhere: say it cannot
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and not (
            mode & os.W_OK and (str(p) == str(locked) or str(p) == str(read_only))))
    try:
        for path, problem in ((locked / name, "the folder"), (read_only, "exists and")):
            with pytest.raises(SystemExit) as exc:
                train.parse_args(["circles", option, str(path)])
            err = capsys.readouterr().err
            assert exc.value.code == 2 and f"{problem} is not writable" in err.replace(
                str(locked) + " ", "")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("argv,message", [
    (["--export", "m.npz"], "--export m.npz: expected a file name ending in .onnx"),
    (["--plot", "curves"], "--plot curves: expected a file name ending in one of "),
    (["--plot", "curves.txt"], ".png, "),
    (["--save", "same.npz", "--plot", "same.npz"], "--save and --plot name the same file"),
    (["--download"], "--download applies to the mnist-* tasks"),
])
def test_wrong_output_names_are_refused_before_training(tmp_path, monkeypatch, argv, message,
                                                        capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        train.main(["circles", *argv])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and "epoch" not in out
    assert list(tmp_path.iterdir()) == []


def test_export_without_onnx_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)          # import onnx now fails
    with pytest.raises(SystemExit):
        train.parse_args(["circles", "--export", str(tmp_path / "m.onnx")])
    assert "--export needs the onnx package" in capsys.readouterr().err


def test_same_seed_same_trained_weights(tmp_path):
    """Train twice with the same seed on the CPU: bit-identical weights; another seed differs."""
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        path = tmp_path / f"{name}.npz"
        train.run(train.parse_args(["circles", "--epochs", "4", "--seed", str(seed),
                                    "--save", str(path)]))
        runs[name] = weights(path)
    assert runs["a"].keys() == runs["b"].keys()
    for key in runs["a"]:
        np.testing.assert_array_equal(runs["a"][key], runs["b"][key])
    assert any(not np.array_equal(runs["a"][k], runs["c"][k])
               for k in runs["a"] if runs["a"][k].dtype.kind == "f")


def train_small_convnet(seed):
    """A small conv net (conv, ReLU, max-pool, dense) trained 2 epochs on fixed random
    images; returns its parameters."""
    rng = np.random.default_rng(0)
    x = rng.random((192, 2, 12, 12), dtype=np.float32)
    y = (x[:, 0, :6].mean(axis=(1, 2)) > x[:, 1, 6:].mean(axis=(1, 2))).astype(np.int64)
    net = fn.Network([fn.Conv2D(2, 8, 3, padding=1, seed=seed), fn.ReLU(), fn.MaxPool2D(2),
                      fn.Conv2D(8, 8, 3, seed=seed + 1), fn.ReLU(), fn.Flatten(),
                      fn.Dense(8 * 4 * 4, 2, seed=seed + 2)])
    net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.05, momentum=0.9))
    net.fit(x, y, epochs=2, batch_size=32, seed=seed, verbose=0)
    return [layer.params[name].copy() for layer, name in net.parameters()]


def test_same_seed_same_trained_weights_conv():
    """The conv layers' parallel gradient sums too give the same bits run after run."""
    first, second, other = train_small_convnet(5), train_small_convnet(5), train_small_convnet(6)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(first, other))


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "circles.png"
    train.run(train.parse_args(["circles", "--epochs", "3", "--plot", str(path)]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    xor_path = tmp_path / "xor.png"
    train.run(train.parse_args(["xor", "--epochs", "5", "--plot", str(xor_path)]))
    assert xor_path.stat().st_size > 1000


def test_plot_labels_both_axes_with_integer_epochs(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.ticker import MaxNLocator
    history = fn.network.History()
    for epoch, logs in enumerate(({"loss": 0.9, "accuracy": 0.5, "val_loss": 1.0},
                                  {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.7},
                                  {"loss": 0.3, "accuracy": 0.9, "val_loss": 0.6}), 1):
        history._append(epoch, logs)
    fig = train.plot(str(tmp_path / "c.svg"), history, "a title")
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    assert fig._suptitle.get_text() == "a title"
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes] == [
        ("epoch", "loss"), ("epoch", "accuracy")]
    for ax in fig.axes:
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)   # 3 epochs: no 1.5
    assert [line.get_label() for line in fig.axes[0].lines] == ["train loss", "validation loss"]


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["circles", "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2 and "pip install 'fastnn[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_mnist_says_where_it_looked_and_names_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)) as exc:
        train.run(train.parse_args(["mnist-mlp", "--data", str(tmp_path)]))
    assert "fastnn-train --download" in str(exc.value)


# --- MNIST-like data made here: --download, the data set's name ---------------------

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fake_mnist_gz(n_train=120, n_test=30, seed=0):
    """{file name: gzip bytes} of a small MNIST-format set, every class in both parts."""
    rng = np.random.default_rng(seed)

    def idx(array, magic):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        return gzip.compress(header + array.astype(np.uint8).tobytes())
    return {STEMS[0] + ".gz": idx(rng.integers(0, 256, (n_train, 28, 28)), 2051),
            STEMS[1] + ".gz": idx(np.arange(n_train) % 10, 2049),
            STEMS[2] + ".gz": idx(rng.integers(0, 256, (n_test, 28, 28)), 2051),
            STEMS[3] + ".gz": idx(np.arange(n_test) % 10, 2049)}


@pytest.fixture
def fashion_server(tmp_path, monkeypatch):
    """A local HTTP server holding a small fake Fashion-MNIST, made the download mirror
    (with its SHA-256 table): --download is tested end to end without the internet.
    Yields the list of requested paths."""
    served = tmp_path / "served"
    served.mkdir()
    files = fake_mnist_gz()
    for name, blob in files.items():
        (served / name).write_bytes(blob)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            requests.append(self.path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    table = {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}
    folders = datasets._KINDS["fashion"][0]
    monkeypatch.setitem(datasets._KINDS, "fashion",
                        (folders, (f"http://127.0.0.1:{server.server_port}/",), table))
    yield requests
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_fetches_checks_and_names_fashion(tmp_path, fashion_server, capsys):
    data = tmp_path / "data"
    argv = ["mnist-mlp", "--data", str(data), "--kind", "fashion", "--epochs", "1"]
    train.run(train.parse_args(argv + ["--download"]))
    out = capsys.readouterr().out
    assert sorted(fashion_server) == sorted(f"/{s}.gz" for s in STEMS)
    assert sorted(p.name for p in (data / "fashion-mnist").iterdir()) == sorted(
        s + ".gz" for s in STEMS)                    # its own folder, beside a future mnist/
    assert "mnist-mlp on Fashion-MNIST: --download" in out
    assert "fastnn-train mnist-mlp on Fashion-MNIST: 110 training, 10 validation, 30 test" in out
    train.run(train.parse_args(argv))                # found now: no download asked, none made
    train.run(train.parse_args(argv + ["--download"]))   # checked, not fetched again
    assert len(fashion_server) == 4


def test_download_failure_is_a_clear_error(tmp_path, fashion_server):
    (tmp_path / "served" / (STEMS[0] + ".gz")).write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="fastnn-train: load_mnist: could not download a "
                                         "verified train-images-idx3-ubyte.gz"):
        train.run(train.parse_args(["mnist-mlp", "--data", str(tmp_path / "data"),
                                    "--kind", "fashion", "--download"]))


@pytest.mark.parametrize("kind,name", [("fashion", "Fashion-MNIST"), ("mnist", "MNIST")])
def test_runs_name_their_data_set(tmp_path, monkeypatch, kind, name, capsys):
    """A --kind fashion run says Fashion-MNIST in its lines and its plot, never plain MNIST."""
    pytest.importorskip("matplotlib")
    for folder in ("mnist", "fashion-mnist"):
        (tmp_path / folder).mkdir()
        for file, blob in fake_mnist_gz(seed=len(folder)).items():
            (tmp_path / folder / file).write_bytes(blob)
    figures = []
    real_plot = train.plot
    monkeypatch.setattr(train, "plot", lambda *a, **k: figures.append(real_plot(*a, **k)))
    train.run(train.parse_args(["mnist-lenet", "--data", str(tmp_path), "--kind", kind,
                                "--epochs", "2", "--plot", str(tmp_path / "c.png")]))
    out = capsys.readouterr().out
    title = figures[0]._suptitle.get_text()
    assert title.startswith(f"fastnn mnist-lenet on {name}: test accuracy ")
    assert out.startswith(f"fastnn-train mnist-lenet on {name}: 110 training")
    assert ("on MNIST" in out + title) == (kind == "mnist")
    assert ("Ankle boot" in out) == (kind == "fashion")    # Fashion-MNIST's class names


@needs_mnist
def test_mnist_mlp_quick(capsys):
    _, _, acc = train.run(train.parse_args(
        ["mnist-mlp", "--data", shared_data_root(), "--epochs", "1", "--limit", "3000"]))
    out = capsys.readouterr().out
    assert "3000 training, 3000 validation, 3000 test samples" in out
    assert acc > 0.8            # 10% is chance; one epoch on 3000 images gives ~90%


@needs_mnist
def test_fashion_lenet_quick(capsys):
    _, _, acc = train.run(train.parse_args(
        ["mnist-lenet", "--data", shared_data_root(), "--kind", "fashion", "--epochs", "1",
         "--limit", "1000"]))
    out = capsys.readouterr().out
    assert "Fashion-MNIST" in out and "Ankle boot" in out
    assert acc > 0.4            # 10% is chance


def test_recipe_cnn_architecture_and_fashion_defaults():
    """mnist-cnn: augmentation first (a flip too for Fashion-MNIST, where mirrored
    clothes are still the same class), biases only where no BatchNorm follows, and
    --kind fashion's own epoch default, which --epochs still overrides."""
    net = train.build_model("mnist-cnn", seed=3)
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert net.predict(x).shape == (2, 10)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds[0] == "RandomTranslation" and "RandomFlip" not in kinds
    assert kinds.count("BatchNorm2d") == 2 and kinds.count("BatchNorm1d") == 1
    biased = [type(layer).__name__ for layer in net.layers if "b" in layer.params]
    assert biased == ["Dense"]                     # the output layer only
    fashion = train.build_model("mnist-cnn", seed=3, kind="fashion")
    kinds = [type(layer).__name__ for layer in fashion.layers]
    assert kinds[:2] == ["RandomTranslation", "RandomFlip"] and kinds.count("Conv2D") == 3
    for model, kind in ((net, "mnist"), (fashion, "fashion")):     # shifts as CNN_RECIPES say
        shift = train.CNN_RECIPES[kind]["shift"]
        assert (model.layers[0].height_factor, model.layers[0].width_factor) == (shift, shift)
    assert fashion.predict(x).shape == (2, 10)
    assert train.parse_args(["mnist-cnn"]).epochs == train.TASKS["mnist-cnn"]["epochs"]
    assert train.parse_args(["mnist-cnn", "--kind", "fashion"]).epochs == \
        train.FASHION_DEFAULTS["mnist-cnn"]["epochs"]
    assert train.parse_args(["mnist-cnn", "--kind", "fashion", "--epochs", "3"]).epochs == 3
    assert train.parse_args(["mnist-lenet", "--kind", "fashion"]).epochs == \
        train.TASKS["mnist-lenet"]["epochs"]


@needs_mnist
def test_recipe_cnn_too_short_for_its_warm_up_is_a_clear_exit():
    with pytest.raises(SystemExit, match="warm-up phase has no step.*more --epochs"):
        train.run(train.parse_args(["mnist-cnn", "--data", shared_data_root(), "--epochs", "1",
                                    "--limit", "200"]))


@needs_mnist
def test_recipe_cnn_quick(capsys):
    """Two epochs of the recipe on 2000 images learn."""
    _, history, acc = train.run(train.parse_args(
        ["mnist-cnn", "--data", shared_data_root(), "--epochs", "2", "--limit", "2000"]))
    assert "mnist-cnn on MNIST: 2000 training" in capsys.readouterr().out
    assert acc > 0.85           # 10% is chance; two epochs on 2000 images give ~92%
    assert len(history.history["val_accuracy"]) == 2


def test_python_dash_m_and_console_script_help():
    result = subprocess.run([sys.executable, "-m", "fastnn.train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "mnist-lenet" in result.stdout and "--plot" in result.stdout
    script = shutil.which("fastnn-train")
    if script is None:     # not pip-installed here (working from the checkout)
        return
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "defaults per task" in result.stdout
