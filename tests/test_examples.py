"""The programs in examples/: each runs (small, quick settings) and learns something."""
import os
import pathlib
import runpy
import subprocess
import sys

import numpy as np
import pytest

import fastnn as fn
from _helpers import needs_mnist, shared_data_root

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def child_env():
    """Environment in which a child Python imports the same fastnn as this test process."""
    env = dict(os.environ)
    package_parent = str(pathlib.Path(fn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def run_example(name, *args, timeout=300):
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_xor_tutorial_differs_from_the_course_only_in_imports():
    """The example is the tutorial's script: same lines once the imports and the one
    seeding line (so that it converges every time) are dropped."""
    script = (EXAMPLES / "xor_tutorial.py").read_text().splitlines()
    body = [line for line in script
            if line.strip() and not line.startswith(("#", "import ", "from "))
            and line != "np.random.seed(1)"]
    seed = next((REPO.parent / "shared" / "seeds").glob("004_*.txt"), None) \
        if (REPO.parent / "shared" / "seeds").is_dir() else None
    if seed is None:
        pytest.skip("the course notes (../shared/seeds) are not here")
    text = seed.read_text()
    tutorial = text[text.rindex("Résoudre XOR"):]
    for line in body:
        assert line in tutorial, f"not in the tutorial: {line!r}"


def tutorial_reference(W1, b1, W2, b2, epochs=1000, learning_rate=0.1):
    """The course's own XOR training (FCLayer/ActivationLayer/Network code of seeds/004,
    inlined in float64) from given initial weights; returns its 4 predictions."""
    x_train = np.array([[[0, 0]], [[0, 1]], [[1, 0]], [[1, 1]]], dtype=np.float64)
    y_train = np.array([[[0]], [[1]], [[1]], [[0]]], dtype=np.float64)
    W1, W2 = W1.astype(np.float64), W2.astype(np.float64)
    b1, b2 = b1.astype(np.float64).reshape(1, -1), b2.astype(np.float64).reshape(1, -1)
    for _ in range(epochs):
        for x, y in zip(x_train, y_train):
            h = x @ W1 + b1
            a = np.tanh(h)
            o = a @ W2 + b2
            err = (1 - np.tanh(o) ** 2) * (2 * (np.tanh(o) - y) / y.size)
            grad_a = err @ W2.T
            W2 -= learning_rate * a.T @ err
            b2 -= learning_rate * err
            err = (1 - np.tanh(h) ** 2) * grad_a
            W1 -= learning_rate * x.T @ err
            b1 -= learning_rate * err
    return np.tanh(np.tanh(x_train @ W1 + b1) @ W2 + b2).reshape(4)


def test_xor_tutorial_runs_and_solves_xor(capsys):
    """Run the unchanged tutorial in this process with its randomness seeded: it learns XOR.

    (Like the course's own code, a 2-3-1 tanh network from some starts stays on
    the plateau at output ~0.5 after 1000 epochs; these seeds start well.)
    """
    # unseeded layers and fit's shuffling draw their seeds from NumPy's global state,
    # like the tutorial's np.random.rand
    np.random.seed(1)
    namespace = runpy.run_path(str(EXAMPLES / "xor_tutorial.py"), run_name="__main__")
    out = namespace["out"]
    assert len(out) == 4
    predictions = np.array([np.asarray(o).reshape(()) for o in out])
    np.testing.assert_array_equal(np.round(predictions), [0, 1, 1, 0])
    assert "epoch 1000/1000" in capsys.readouterr().out


def test_tutorial_layers_follow_the_course_code_step_for_step():
    """FCLayer + ActivationLayer + use/fit, samples in order as the tutorial feeds them,
    give the predictions of the course's own code from the same initial weights."""
    from fastnn.activations import tanh, tanh_prime
    from fastnn.losses import mse, mse_prime
    x_train = np.array([[[0, 0]], [[0, 1]], [[1, 0]], [[1, 1]]])
    y_train = np.array([[[0]], [[1]], [[1]], [[0]]])
    first, second = fn.FCLayer(2, 3, seed=2, dtype="float64"), fn.FCLayer(3, 1, seed=3, dtype="float64")
    expected = tutorial_reference(first.params["W"], first.params["b"],
                                  second.params["W"], second.params["b"])
    net = fn.Network()
    for layer in (first, fn.ActivationLayer(tanh, tanh_prime), second,
                  fn.ActivationLayer(tanh, tanh_prime)):
        net.add(layer)
    net.use(mse, mse_prime)
    net.fit(x_train.astype(np.float64), y_train.astype(np.float64), epochs=1000,
            learning_rate=0.1, shuffle=False, verbose=0)
    got = np.asarray(net.predict(x_train.astype(np.float64))).reshape(4)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_xor_tutorial_as_a_program():
    out = run_example("xor_tutorial.py")
    assert "array(" in out or "[[" in out      # the tutorial prints its list of outputs


def test_circles_example(tmp_path):
    args = ["--epochs", "60"]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(tmp_path / "c.png")]
    except ImportError:
        pass
    out = run_example("circles.py", *args)
    acc = float(out.split("test accuracy:")[1].split()[0])
    assert acc >= 0.95
    assert "outer" in out and "inner" in out
    if "--plot" in args:
        assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_to_and_from_pytorch_example(tmp_path):
    for module in ("torch", "onnx", "onnxruntime"):
        pytest.importorskip(module)
    out = run_example("to_and_from_pytorch.py", "--out", str(tmp_path))
    for step in ("MLP, fastnn -> PyTorch", "CNN, fastnn -> PyTorch", "PyTorch -> fastnn",
                 "CNN in ONNX Runtime"):
        assert step in out
    assert out.rstrip().endswith("done") and (tmp_path / "cnn.onnx").stat().st_size > 0


@needs_mnist
def test_mnist_mlp_example(tmp_path):
    out = run_example("mnist_mlp.py", "--data", shared_data_root(), "--epochs", "1",
                      "--limit", "2000", "--save", str(tmp_path / "mlp.npz"))
    acc = float(out.split("test accuracy")[1].split()[0])
    assert acc > 0.8
    assert fn.Network.load(str(tmp_path / "mlp.npz")).predict(
        np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)


@needs_mnist
def test_mnist_lenet_example():
    out = run_example("mnist_lenet.py", "--data", shared_data_root(), "--epochs", "1",
                      "--limit", "1000")
    acc = float(out.split("test accuracy")[1].split()[0])
    assert acc > 0.5            # 10% is chance


@needs_mnist
def test_mnist_cnn_example_is_fastnn_trains_recipe():
    """The example spells out the recipe of fastnn-train mnist-cnn: the same layers,
    shapes and parameter counts (its printed summary), and it learns."""
    from fastnn import train
    for kind in ("mnist", "fashion"):
        out = run_example("mnist_cnn.py", "--data", shared_data_root(), "--kind", kind,
                          "--epochs", "1", "--limit", "1000")
        assert train.build_model("mnist-cnn", kind=kind).summary() in out
        acc = float(out.split("test accuracy")[1].split()[0])
        assert acc > 0.3            # 10% is chance


def test_gpu_lenet_example():
    if "cuda" not in fn.backend.available():
        # no GPU: a clear message and a non-zero exit, not a traceback
        result = subprocess.run([sys.executable, str(EXAMPLES / "gpu_lenet.py")], cwd=REPO,
                                env=child_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert "no usable CUDA device" in result.stderr and "Traceback" not in result.stderr
        return
    if shared_data_root() is None:
        pytest.skip("MNIST files not found ($FASTNN_DATA or ../shared/data)")
    out = run_example("gpu_lenet.py", "--data", shared_data_root(), "--epochs", "1",
                      "--limit", "2000")
    assert "network on cuda" in out
    assert float(out.split("test accuracy")[1].split()[0]) > 0.5
