"""Network: training modes, fusion, NaN stop, save/load, determinism, user layers, bad input."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import losses, optim
from _helpers import BatchRecorder


def blobs(n=120, seed=0, classes=3, dim=4):
    """Well separated Gaussian blobs: (x float64 (n, dim), y int64 (n,))."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, dim)) * 4
    return centres[y] + rng.standard_normal((n, dim)), y


def mlp(seed=0, dtype="float32", softmax=False, dropout=0.0, batchnorm=False):
    layers = [fn.Dense(4, 16, seed=seed, dtype=dtype)]
    if batchnorm:
        layers.append(fn.BatchNorm1d(16, dtype=dtype))
    layers += [fn.ReLU()]
    if dropout:
        layers.append(fn.Dropout(dropout, seed=seed))
    layers.append(fn.Dense(16, 3, seed=seed + 1, dtype=dtype))
    if softmax:
        layers.append(fn.Softmax())
    return fn.Network(layers)


# --- training ------------------------------------------------------------------------------
def test_compile_fit_learns_and_reports_history():
    x, y = blobs()
    net = mlp()
    net.compile(loss="cross_entropy", optimizer=optim.SGD(lr=0.1, momentum=0.9), metrics=("accuracy",))
    history = net.fit(x[:90], y[:90], epochs=15, validation_data=(x[90:], y[90:]), verbose=0, seed=0)
    assert isinstance(history, fn.History)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 15 for v in history.history.values())
    assert history.history["loss"][-1] < history.history["loss"][0] / 5
    assert history.history["val_accuracy"][-1] >= 0.95
    result = net.evaluate(x[90:], y[90:])
    assert set(result) == {"loss", "accuracy"}
    assert np.isclose(result["loss"], history.history["val_loss"][-1])
    probs = net.predict(x[90:])
    assert probs.shape == (30, 3) and probs.dtype == np.float32


def test_accuracy_is_reported_by_default_for_classification_losses():
    x, y = blobs(20)
    net = mlp()
    net.compile("cross_entropy")
    assert set(net.evaluate(x, y)) == {"loss", "accuracy"}
    net.compile("cross_entropy", metrics=())
    assert set(net.evaluate(x, y)) == {"loss"}
    net.compile("mse")
    assert set(net.evaluate(x, np.eye(3)[y])) == {"loss"}
    binary = fn.Network([fn.Dense(4, 1, seed=0), fn.Sigmoid()])
    binary.compile("binary_cross_entropy", optim.SGD(lr=0.5))
    h = binary.fit(x, (y == 1).astype(float), epochs=30, batch_size=5, verbose=0, seed=0)
    assert h.history["accuracy"][-1] > 0.8


@pytest.mark.parametrize("make,shape", [
    (lambda: mlp(), (100, 4)),                                         # the compiled step
    (lambda: mlp(dropout=0.2, softmax=True), (100, 4)),                # the layers
    (lambda: fn.Network([fn.Conv2D(1, 4, 2, seed=0), fn.ReLU(), fn.Flatten(),
                         fn.Dense(4, 3, seed=1)]), (100, 1, 2, 2)),
])
def test_fit_accuracy_from_classes_equals_accuracy_of_the_scores(make, shape):
    """fit keeps each sample's class for the built-in accuracy (not its scores): the
    same history as a metric that takes the scores."""
    x, y = blobs(100)
    x = x.reshape(shape)
    histories = []
    for metric in ("accuracy", lambda t, p: fn.metrics.accuracy(t, p)):
        net = make()
        net.compile("cross_entropy", optim.SGD(lr=0.05, momentum=0.9), metrics=[metric])
        histories.append(net.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=0).history)
    assert list(histories[1]) == ["loss", "<lambda>"]
    assert histories[0]["accuracy"] == histories[1]["<lambda>"]
    assert histories[0]["loss"] == histories[1]["loss"]


@pytest.mark.parametrize("style,batch_size,expected", [
    ("use", None, [1] * 10), ("compile", None, [10]), ("compile", "full", [10]),
    ("compile", 4, [4, 4, 2]), ("use", 3, [3, 3, 3, 1])])
def test_batch_modes_keep_every_sample(style, batch_size, expected):
    x, y = blobs(10)
    recorder = BatchRecorder()
    net = fn.Network([fn.Dense(4, 3, seed=0), recorder])
    if style == "use":
        net.use(losses.mse, losses.mse_prime)
        y = np.eye(3)[y]
        net.fit(x, y, epochs=2, learning_rate=0.01, batch_size=batch_size, verbose=0)
    else:
        net.compile("cross_entropy", optim.SGD(lr=0.01))
        net.fit(x, y, epochs=2, batch_size=batch_size, verbose=0)
    assert recorder.sizes == expected * 2


def test_full_batch_step_equals_manual_gradient_descent():
    x, y = blobs(20, dim=4)
    net = fn.Network([fn.Dense(4, 3, seed=0, dtype="float64")])
    W0, b0 = (net.layers[0].params[k].copy() for k in ("W", "b"))
    net.compile("cross_entropy", optim.SGD(lr=0.5))
    history = net.fit(x, y, epochs=1, batch_size="full", verbose=0)
    logits = x @ W0 + b0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.isclose(history.history["loss"][0], -np.log(p[np.arange(20), y]).mean())
    g = (p - np.eye(3)[y]) / 20
    np.testing.assert_allclose(net.layers[0].params["W"], W0 - 0.5 * x.T @ g, rtol=1e-12)
    np.testing.assert_allclose(net.layers[0].params["b"], b0 - 0.5 * g.sum(0), rtol=1e-12)


def test_softmax_cross_entropy_fuse_to_p_minus_y():
    x, y = blobs(12)
    with_softmax, logits_only = mlp(softmax=True, dtype="float64"), mlp(dtype="float64")
    for net in (with_softmax, logits_only):
        net.compile("cross_entropy", optim.SGD(lr=0.1))
        net.fit(x, y, epochs=3, batch_size=4, shuffle=False, verbose=0)
    for (la, na), (lb, nb) in zip(with_softmax.parameters(), logits_only.parameters()):
        np.testing.assert_allclose(la.params[na], lb.params[nb], rtol=1e-12)
    probs = with_softmax.predict(x)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-12)
    np.testing.assert_allclose(probs, fn.Softmax().forward(logits_only.predict(x)), rtol=1e-12)
    # what the fusion skips: Softmax's own backward of the CE gradient d(-log p_y)/dp is p - y
    softmax = fn.Softmax()
    p = softmax.forward(logits_only.predict(x))
    onehot = np.eye(3)[y]
    np.testing.assert_allclose(softmax.backward(-onehot / p / len(y)), (p - onehot) / len(y), atol=1e-12)


def test_labels_and_one_hot_train_the_same():
    x, y = blobs(30)
    a, b = mlp(dtype="float64"), mlp(dtype="float64")
    for net, target in ((a, y), (b, np.eye(3)[y])):
        net.compile("cross_entropy", optim.SGD(lr=0.1, momentum=0.9), metrics=["accuracy"])
        h = net.fit(x, target, epochs=3, batch_size=8, verbose=0, seed=3)
    for (la, na), (lb, nb) in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(la.params[na], lb.params[nb], rtol=1e-12)
    assert h.history["accuracy"][-1] > 0.5


def test_same_seed_gives_same_weights_twice():
    x, y = blobs(60)

    def train():
        net = mlp(seed=5, dropout=0.3, batchnorm=True)
        net.compile("cross_entropy", optim.Adam(lr=0.01))
        net.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=11)
        return [layer.params[name].copy() for layer, name in net.parameters()]
    first, second = train(), train()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_learning_rate_without_compile_is_plain_sgd_and_tutorial_prints(capsys):
    x, y = blobs(8)
    net = fn.Network([fn.Dense(4, 3, seed=0, dtype="float64")])
    W0 = net.layers[0].params["W"].copy()
    net.use(losses.mse, losses.mse_prime)
    target = np.eye(3)[y]
    net.fit(x, target, epochs=1, learning_rate=0.05, batch_size="full")
    out = capsys.readouterr().out
    assert out.startswith("epoch 1/1    error=")      # the tutorial's line, to the space
    g = 2 * (x @ W0 - target) / target.size      # he init starts with b = 0
    np.testing.assert_allclose(net.layers[0].params["W"], W0 - 0.05 * x.T @ g, rtol=1e-12)


def test_verbose_zero_is_silent_and_verbose_one_shows_a_bar(capsys):
    x, y = blobs(20)
    net = mlp()
    net.compile("cross_entropy", optim.SGD(lr=0.1), metrics=("accuracy",))
    net.fit(x, y, epochs=2, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    net.fit(x, y, epochs=2, verbose=1)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "accuracy" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the overflow on the way to inf
def test_nan_loss_stops_with_parameters_from_before_the_step():
    x, y = blobs(40)

    class Recording(optim.SGD):
        def step(self, params, grads, decay=None):
            super().step(params, grads, decay)
            self.last = [p.copy() for p in params]
    net = mlp(dtype="float64")
    opt = Recording(lr=1e6)
    net.compile("mse", opt)
    with pytest.raises(FloatingPointError, match=r"epoch \d+, batch \d+"):
        net.fit(x, np.eye(3)[y], epochs=50, batch_size=4, verbose=0)
    for p, last in zip([layer.params[name] for layer, name in net.parameters()], opt.last):
        np.testing.assert_array_equal(p, last)


def test_user_layers_of_both_protocols_work_inside_a_network():
    class Scale(fn.Layer):            # the new protocol
        def __init__(self):
            super().__init__()
            self.params["s"] = np.array([1.0])

        def forward(self, x, training=True):
            self.x = x
            return x * self.params["s"]

        def backward(self, grad_y):
            self.grads["s"] = np.array([(grad_y * self.x).sum()])
            return grad_y * self.params["s"]

    class TutorialTanh(fn.Layer):     # the tutorial's protocol, no super().__init__
        def __init__(self):
            self.calls = 0

        def forward_propagation(self, input):
            self.input = input
            return np.tanh(input)

        def backward_propagation(self, output_error, learning_rate):
            self.calls += 1
            return (1 - np.tanh(self.input) ** 2) * output_error

    x, y = blobs(16)
    tut = TutorialTanh()
    net = fn.Network([fn.Dense(4, 8, seed=0, dtype="float64"), Scale(), tut,
                      fn.Dense(8, 3, seed=1, dtype="float64")])
    net.compile("cross_entropy", optim.SGD(lr=0.1))
    h = net.fit(x, y, epochs=5, batch_size=4, verbose=0)
    assert tut.calls == 20
    assert net.layers[1].params["s"][0] != 1.0
    assert h.history["loss"][-1] < h.history["loss"][0]
    assert "TutorialTanh" in net.summary()


# --- inputs ----------------------------------------------------------------------------
def test_forward_and_backward_run_every_layer():
    x, _ = blobs(6)
    net = mlp(dtype="float64", softmax=True, dropout=0.5)
    out = net.forward(x)
    np.testing.assert_allclose(out, net.predict(x))
    assert not np.allclose(net.forward(x, training=True), out)      # Dropout active in training
    g = np.random.default_rng(0).standard_normal(out.shape)
    net.forward(x)
    grad_x = net.backward(g)
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):          # eval mode: Dropout is the identity
        step = np.zeros_like(x)
        step[i] = 1e-6
        numeric[i] = ((net.forward(x + step) - net.forward(x - step)) * g).sum() / 2e-6
    np.testing.assert_allclose(grad_x, numeric, rtol=1e-5, atol=1e-8)


def test_inputs_are_converted_once_at_the_entry():
    x, y = blobs(10)
    net = mlp()
    net.compile("cross_entropy")
    for data in (x, x.astype(np.float32), x.astype(np.int64), x.tolist(), np.asfortranarray(x)):
        out = net.predict(data)
        assert out.dtype == np.float32 and out.shape == (10, 3)
    np.testing.assert_allclose(net.predict(x[::2]), net.predict(np.ascontiguousarray(x[::2])))
    np.testing.assert_allclose(net.predict(x[:1]), net.predict(x)[:1], rtol=1e-6)
    assert net.forward(x).shape == (10, 3)


def test_bad_input_raises_clear_errors():
    x, y = blobs(10)
    net = mlp()
    with pytest.raises(ValueError, match="compile"):
        net.fit(x, y, verbose=0)
    net.compile("cross_entropy", metrics=("accuracy",))
    with pytest.raises(ValueError, match=r"len\(x\)=10.*\(9,\)"):
        net.fit(x, y[:9], verbose=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[1, 5\]"):
        net.fit(x, np.where(y == 0, 5, y), verbose=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        net.fit(x, y - 1, verbose=0)
    with pytest.raises(ValueError, match=r"Dense\(4 -> 16\).*\(\.\.\., 4\).*\(1, 5\)"):
        net.fit(np.zeros((10, 5)), y, verbose=0)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        net.fit(bad, y, verbose=0)
    with pytest.raises(ValueError, match="y contains NaN"):
        net.fit(x, np.where(np.eye(3)[y] == 1, np.nan, 0.0), verbose=0)
    with pytest.raises(ValueError, match=r"one-hot \(N, 3\).*\(10, 4\)"):
        net.fit(x, np.zeros((10, 4)), verbose=0)
    with pytest.raises(ValueError, match="batch_size"):
        net.fit(x, y, batch_size=0, verbose=0)
    lr = net.optimizer.lr
    with pytest.raises(ValueError, match=r"Network.fit: learning_rate must be >= 0, got -0.1"):
        net.fit(x, y, learning_rate=-0.1, verbose=0)
    with pytest.raises(TypeError, match=r"Network.fit: learning_rate must be a number"):
        net.fit(x, y, learning_rate="0.1", verbose=0)
    with pytest.raises(ValueError, match="x contains NaN"):     # checked before lr is touched
        net.fit(bad, y, learning_rate=0.5, verbose=0)
    assert net.optimizer.lr == lr
    grid = fn.Network([fn.Dense(4, 6, seed=0), fn.Flatten()])
    grid.compile("mse")
    with pytest.raises(ValueError, match=r"output shape \(10, 6\).*\(10, 3, 2\)"):
        grid.fit(x, np.zeros((10, 3, 2)), verbose=0)
    grid.fit(x, np.zeros((10, 1, 6)), epochs=1, verbose=0)       # same samples, axis of size 1
    with pytest.raises(ValueError, match="validation_data"):
        net.fit(x, y, validation_data=x, verbose=0)
    before = [layer.params[k].copy() for layer, k in net.parameters()]
    with pytest.raises(ValueError, match=r"Dense\(4 -> 16\).*\(1, 5\)"):      # before any training
        net.fit(x, y, validation_data=(np.zeros((3, 5)), y[:3]), verbose=0)
    for (layer, k), p in zip(net.parameters(), before):
        np.testing.assert_array_equal(layer.params[k], p)
    with pytest.raises(TypeError, match="dtype"):
        net.predict(np.array([["a"] * 4]))
    with pytest.raises(ValueError, match="unknown metric"):
        net.compile("cross_entropy", metrics=("f1",))
    dense = fn.Dense(4, 4, seed=0)
    with pytest.raises(ValueError, match=r"Dense\(in_features=4.*already layer 0"):
        fn.Network([dense, fn.ReLU(), dense])
    with pytest.raises(TypeError, match="Network.add: expected a layer"):
        fn.Network().add(np.tanh)


# --- structure, save / load ----------------------------------------------------------------
def lenet_like(seed=0):
    return fn.Network([
        fn.Conv2D(1, 4, 3, padding=1, seed=seed), fn.BatchNorm2d(4), fn.ReLU(), fn.MaxPool2D(2),
        fn.Conv2D(4, 6, 3, seed=seed + 1), fn.LeakyReLU(0.1), fn.AvgPool2D(2), fn.Flatten(),
        fn.Dense(6, 8, seed=seed + 2), fn.Tanh(), fn.Dropout(0.2, seed=seed), fn.Dense(8, 3, seed=seed + 3),
        fn.Softmax()])


def test_summary_and_parameters():
    net = lenet_like()
    text = net.summary(input_shape=(1, 8, 8))
    for name in ("Conv2D", "BatchNorm2d", "MaxPool2D", "Flatten", "Dense", "Softmax"):
        assert name in text
    assert "(None, 4, 8, 8)" in text and "(None, 6)" in text
    total = sum(layer.params[name].size for layer, name in net.parameters())
    assert f"total parameters: {total:,}" in text
    assert [n for _, n in net.parameters()][:4] == ["W", "b", "gamma", "beta"]


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 1, 8, 8)), rng.integers(0, 3, 12)
    net = lenet_like()
    net.compile("cross_entropy", optim.SGD(lr=0.05, momentum=0.9), metrics=("accuracy",))
    net.fit(x, y, epochs=2, batch_size=4, verbose=0, seed=0)
    path = tmp_path / "model.npz"
    net.save(path)
    loaded = fn.Network.load(path)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    assert [type(l).__name__ + n for l, n in loaded.parameters()] == \
        [type(l).__name__ + n for l, n in net.parameters()]
    np.testing.assert_array_equal(loaded.layers[1].running_var, net.layers[1].running_var)
    assert loaded.evaluate(x, y) == net.evaluate(x, y)
    assert isinstance(loaded.optimizer, optim.SGD) and loaded.optimizer.momentum == 0.9
    # no pickle inside: the file loads with allow_pickle=False
    with np.load(path, allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)

    tutorial = fn.Network([fn.FCLayer(2, 3), fn.ActivationLayer(fn.activations.tanh, fn.activations.tanh_prime)])
    tutorial.save(tmp_path / "tutorial.npz")
    x2 = rng.standard_normal((4, 1, 2))
    np.testing.assert_array_equal(fn.Network.load(tmp_path / "tutorial.npz").predict(x2), tutorial.predict(x2))


def test_load_rejects_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(OSError, match="nope.npz"):
        fn.Network.load(tmp_path / "nope.npz")
    net = mlp()
    path = tmp_path / "m.npz"
    net.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        fn.Network.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="foreign.npz.*no fastnn architecture"):
        fn.Network.load(tmp_path / "foreign.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="text.npz"):
        fn.Network.load(tmp_path / "text.npz")

    class Custom(fn.Layer):
        def forward(self, x, training=True):
            return x

        def backward(self, g):
            return g
    with pytest.raises(ValueError, match="Custom.*cannot be saved"):
        fn.Network([Custom()]).save(tmp_path / "custom.npz")


def test_device_moves_on_cpu():
    net = mlp()
    assert net.device == "cpu"
    assert net.to("cpu") is net and net.device == "cpu"
    with pytest.raises(ValueError, match="'tpu'"):
        net.to("tpu")
    if "cuda" not in fn.backend.available():
        for model in (net, fn.Network([fn.ReLU()])):       # also one without parameters
            with pytest.raises(RuntimeError, match="Network.to: no usable CUDA device"):
                model.to("cuda")
            assert model.device == "cpu"


@pytest.mark.skipif("cuda" not in fn.backend.available(), reason="needs a CUDA device")
def test_to_cuda_trains_and_predicts_like_cpu():
    x, y = blobs(64)
    nets = [mlp(seed=2, batchnorm=True, dtype="float64") for _ in range(2)]
    for net in nets:
        net.compile("cross_entropy", optim.SGD(lr=0.1, momentum=0.9))
    nets[1].to("cuda")
    for net in nets:
        net.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0)
    out = nets[1].predict(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, nets[0].predict(x), rtol=1e-8, atol=1e-10)
    nets[1].to("cpu")
    np.testing.assert_allclose(nets[1].predict(x), nets[0].predict(x), rtol=1e-8, atol=1e-10)


def test_user_forward_without_training_and_replaced_layers():
    class Double(fn.Layer):          # forward(x): no training argument
        def forward(self, x):
            return 2 * x

        def backward(self, grad_y):
            return 2 * grad_y

    class Gate(fn.Layer):            # training only by keyword
        def forward(self, x, *, training=True):
            self.seen = training
            return x

        def backward(self, grad_y):
            return grad_y

    x, y = blobs(12)
    gate = Gate()
    net = fn.Network([fn.Dense(4, 3, seed=0, dtype="float64"), Double(), gate])
    np.testing.assert_allclose(net.predict(x), 2 * (x @ net.layers[0].params["W"]))
    assert gate.seen is False
    net.compile("cross_entropy", optim.SGD(lr=0.1))
    h = net.fit(x, y, epochs=3, batch_size=4, verbose=0)
    assert gate.seen is True and h.history["loss"][-1] < h.history["loss"][0]
    net.predict(x)
    assert gate.seen is False
    # a layer replaced in place is the one that runs next
    net.layers[1] = fn.Tanh()
    np.testing.assert_allclose(net.predict(x), np.tanh(x @ net.layers[0].params["W"]
                                                       + net.layers[0].params["b"]))


class CourseFCLayer(fn.Layer):
    """The course's own FCLayer (seeds/004), verbatim but for its base class."""

    def __init__(self, input_size, output_size):
        self.weights = np.random.rand(input_size, output_size) - 0.5
        self.bias = np.random.rand(1, output_size) - 0.5

    def forward_propagation(self, input_data):
        self.input = input_data
        self.output = np.dot(self.input, self.weights) + self.bias
        return self.output

    def backward_propagation(self, output_error, learning_rate):
        input_error = np.dot(output_error, self.weights.T)
        weights_error = np.dot(self.input.T, output_error)
        self.weights -= learning_rate * weights_error
        self.bias -= learning_rate * output_error
        return input_error


class CourseActivationLayer(fn.Layer):
    """The course's own ActivationLayer (seeds/004)."""

    def __init__(self, activation, activation_prime):
        self.activation = activation
        self.activation_prime = activation_prime

    def forward_propagation(self, input_data):
        self.input = input_data
        self.output = self.activation(self.input)
        return self.output

    def backward_propagation(self, output_error, learning_rate):
        return self.activation_prime(self.input) * output_error


def test_the_course_layer_classes_train_inside_a_network():
    """The tutorial's (1, n) rows reach tutorial-protocol layers as the course feeds them."""
    from fastnn.activations import tanh, tanh_prime
    x = np.array([[[0, 0]], [[0, 1]], [[1, 0]], [[1, 1]]])
    y = np.array([[[0]], [[1]], [[1]], [[0]]])

    def course_layers():
        np.random.seed(1)
        return [CourseFCLayer(2, 3), CourseActivationLayer(tanh, tanh_prime),
                CourseFCLayer(3, 1), CourseActivationLayer(tanh, tanh_prime)]
    ours, theirs = course_layers(), course_layers()
    net = fn.Network(ours)
    net.use(losses.mse, losses.mse_prime)
    net.fit(x, y, epochs=200, learning_rate=0.1, shuffle=False, verbose=0)
    for _ in range(200):                # the course's Network.fit loop
        for xi, yi in zip(x, y):
            out = xi
            for layer in theirs:
                out = layer.forward_propagation(out)
            err = losses.mse_prime(yi, out)
            for layer in reversed(theirs):
                err = layer.backward_propagation(err, 0.1)
    for a, b in zip(ours[::2], theirs[::2]):
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-12)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-12)
    out = net.predict(x)
    assert out.shape == (4, 1, 1)
    expected = [np.tanh(np.tanh(xi @ theirs[0].weights + theirs[0].bias) @ theirs[2].weights
                        + theirs[2].bias) for xi in x]
    np.testing.assert_allclose(out, np.array(expected), rtol=1e-6)


def test_training_backward_stops_at_the_first_layer_with_parameters():
    """fit skips the unused input gradient of its first trained layer: the step
    must still equal plain gradient descent through every layer."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 1, 2, 3))
    y = rng.integers(0, 3, 10)
    net = fn.Network([fn.Flatten(), fn.Dense(6, 5, seed=0, dtype="float64"), fn.ReLU(),
                      fn.Dense(5, 3, seed=1, dtype="float64")])
    calls = []
    first = net.layers[1]
    original = first.backward

    def spy(grad_y, need_grad_x=True):
        calls.append(need_grad_x)
        return original(grad_y, need_grad_x)
    first.backward = spy
    ref = fn.Network([fn.Flatten(), fn.Dense(6, 5, seed=0, dtype="float64"), fn.ReLU(),
                      fn.Dense(5, 3, seed=1, dtype="float64")])
    net.compile("cross_entropy", optim.SGD(lr=0.1, momentum=0.9))
    net.fit(x, y, epochs=2, batch_size="full", shuffle=False, verbose=0)
    assert calls == [False, False]
    loss = losses.CrossEntropy()
    opt = optim.SGD(lr=0.1, momentum=0.9)
    params = [layer.params[k] for layer in ref.layers for k in layer.params]
    for _ in range(2):
        out = ref.forward(x, training=True)
        _, grad = loss._loss_and_grad(out, y)
        assert ref.backward(grad).shape == x.shape
        opt.step(params, [layer.grads[k] for layer in ref.layers for k in layer.grads])
    for a, b in zip(net.layers, ref.layers):
        for k in a.params:
            np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 7])
def test_predict_of_a_dense_relu_network_equals_the_layer_by_layer_forward(dtype, batch):
    """predict fuses each ReLU into the Dense before it; it must give what the layers
    give one by one (and the layers' own checks still see assigned parameters)."""
    net = fn.Network([fn.Dense(9, 6, seed=0, dtype=dtype), fn.ReLU(),
                      fn.Dense(6, 5, bias=False, seed=1, dtype=dtype), fn.ReLU(),
                      fn.FCLayer(5, 3, seed=2, dtype=dtype)])
    x = np.random.default_rng(1).standard_normal((batch, 9)).astype(dtype)
    expected = x
    for layer in net.layers:
        expected = layer.forward(expected, training=False)
    out = net.predict(x)
    assert out.dtype == np.dtype(dtype) and out.shape == (batch, 3)
    np.testing.assert_array_equal(out, expected)
    # a Fortran-ordered weight (not C-contiguous): the same result
    net.layers[2].params["W"] = np.asfortranarray(net.layers[2].params["W"])
    np.testing.assert_array_equal(net.predict(x), expected)
    # a weight of another dtype: the layer's own error, not a misread buffer
    net.layers[2].params["W"] = net.layers[2].params["W"].astype(
        "float64" if dtype == "float32" else "float32")
    with pytest.raises((TypeError, ValueError)):
        net.predict(x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 7])
def test_forward_of_a_dense_relu_network_keeps_what_the_layers_keep(dtype, batch):
    """forward and backward fuse each ReLU into the Dense layers beside it; the output,
    the gradients and what a ReLU keeps are those of the layers run one by one (a Dense
    followed by a ReLU keeps the ReLU's output as its own)."""
    def make():
        return fn.Network([fn.Dense(9, 6, seed=0, dtype=dtype), fn.ReLU(),
                           fn.Dense(6, 5, bias=False, seed=1, dtype=dtype), fn.ReLU(),
                           fn.FCLayer(5, 3, seed=2, dtype=dtype), fn.ReLU()])
    net, ref = make(), make()
    x = np.random.default_rng(1).standard_normal((batch, 9)).astype(dtype)
    expected = x
    for layer in ref.layers:
        expected = layer.forward(expected)
    out = net.forward(x)
    np.testing.assert_array_equal(out, expected)
    for a, b in zip(net.layers, ref.layers):
        np.testing.assert_array_equal(a.input if a.input is not None else x,
                                      b.input if b.input is not None else x)
        if isinstance(a, fn.ReLU):
            np.testing.assert_array_equal(a.output, b.output)
    assert net.layers[0].input is x
    grad = np.random.default_rng(2).standard_normal((batch, 3)).astype(dtype)
    expected_grad = grad
    for layer in reversed(ref.layers):
        expected_grad = layer.backward(expected_grad)
    np.testing.assert_array_equal(net.backward(grad), expected_grad)
    for a, b in zip(net.layers, ref.layers):
        for k in getattr(b, "grads", {}):
            np.testing.assert_array_equal(a.grads[k], b.grads[k])
    # a Fortran-ordered input: the same result
    np.testing.assert_array_equal(net.forward(np.asfortranarray(x)), expected)


@pytest.mark.parametrize("first,second", [("float32", "float64"), ("float64", "float32")])
def test_to_dtype_converts_parameters_buffers_and_optimizer_state(first, second):
    """net.to("float64") / net.to("float32") (API.md): every parameter, gradient, buffer
    and optimizer state array changes dtype (values kept, up to rounding), the layers
    then take inputs of that dtype, and training goes on, as a network built in that
    dtype from the same values would train."""
    def build(dtype):
        return fn.Network([fn.Conv2D(1, 3, 3, seed=1, dtype=dtype), fn.BatchNorm2d(3, dtype=dtype),
                           fn.ReLU(), fn.Flatten(), fn.Dense(3 * 4 * 4, 5, seed=2, dtype=dtype)])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 6, 6)), rng.integers(0, 5, 8)
    net = build(first)
    net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.1, momentum=0.9))
    net.train_step(x.astype(first), y)
    before = [a.copy() for layer in net.layers for a in layer.params.values()]
    assert net.to(second) is net
    arrays = [a for layer in net.layers for store in ("params", "grads", "buffers")
              for a in getattr(layer, store, {}).values()]
    assert arrays and all(a.dtype == second for a in arrays)
    assert all(s.dtype == second for s in net.optimizer.state)
    after = [a for layer in net.layers for a in layer.params.values()]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b.astype(second))
    twin = build(second)
    twin.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.1, momentum=0.9))
    for layer, copy in zip(net.layers, twin.layers):
        for store in ("params", "buffers"):
            for k, v in getattr(layer, store, {}).items():
                getattr(copy, store)[k][...] = v
    twin.optimizer.state = [s.copy() for s in net.optimizer.state]
    for network in (net, twin):
        network.train_step(x.astype(second), y)
    for a, b in zip(net.layers, twin.layers):
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
    with pytest.raises(TypeError, match=f"dtype {second}"):
        net.layers[0].forward(x.astype(first))
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        net.to("float16")
