"""The fastnn-train command (fastnn.train): options, quick trainings, save/plot, determinism."""
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastnn as fn
from _helpers import needs_mnist, shared_data_root
from fastnn import train

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


@pytest.mark.parametrize("option", ["--save", "--export"])
def test_unwritable_output_is_refused_before_training(tmp_path, option, capsys):
    """A typo in the folder is reported at once, not after the training."""
    for path, problem in ((tmp_path / "missing" / "m.out", "does not exist"),
                          (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as exc:
            train.parse_args(["circles", option, str(path)])
        assert exc.value.code == 2
        assert f"{option} {path}: " in (err := capsys.readouterr().err) and problem in err


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


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=r"pip install 'fastnn\[plot\]'"):
        train.run(train.parse_args(["circles", "--plot", str(tmp_path / "x.png")]))
    assert not (tmp_path / "x.png").exists()


def test_missing_mnist_says_where_it_looked(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)):
        train.run(train.parse_args(["mnist-mlp", "--data", str(tmp_path)]))


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
