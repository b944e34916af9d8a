"""The contract of /work/shared/API.md: every documented name where it says, with its
argument names and defaults, and the documented rules not covered by the other test files."""
import importlib
import inspect
import json
import math
import re

import numpy as np
import pytest

import fastnn as fn
from fastnn import callbacks, losses, optim
from _helpers import BatchRecorder

# --- names and signatures --------------------------------------------------------------------
# (where, name, the signature API.md gives, without self); None: no argument list given
LAYERS = [
    ("Dense", "in_features, out_features, *, bias=True, init='he', seed=None, dtype='float32'"),
    ("FCLayer", "input_size, output_size"),
    ("Conv2D", "in_channels, out_channels, kernel_size, *, stride=1, padding=0, bias=True, "
               "init='he', seed=None, dtype='float32'"),
    ("MaxPool2D", "kernel_size, stride=None"),
    ("AvgPool2D", "kernel_size, stride=None"),
    ("Flatten", ""), ("ReLU", ""), ("LeakyReLU", "alpha=0.01"), ("Sigmoid", ""), ("Tanh", ""),
    ("Softmax", ""),
    ("Dropout", "p=0.5"),
    ("BatchNorm1d", "num_features, eps=1e-5, momentum=0.1"),
    ("BatchNorm2d", "num_features, eps=1e-5, momentum=0.1"),
    ("ActivationLayer", "activation, activation_prime"),
]
LAYER_PROTOCOL = [
    ("forward", "x, training=True"), ("backward", "grad_y"), ("output_shape", "input_shape"),
    ("forward_propagation", "input"), ("backward_propagation", "output_error, learning_rate"),
]
NETWORK_METHODS = [
    ("add", "layer"), ("use", "loss, loss_prime"), ("compile", None),
    ("fit", "x, y, epochs=10, learning_rate=None, batch_size=None, validation_data=None, "
            "shuffle=True, callbacks=(), verbose=1, seed=None"),
    ("predict", "x, batch_size=None"), ("evaluate", "x, y, batch_size=None"),
    ("forward", "x, training=False"), ("backward", "grad"), ("parameters", ""), ("summary", ""),
    ("save", "path"), ("load", "path"), ("to", "device"),
    ("state_dict", ""), ("load_state_dict", "state, strict=True"),
    ("export", "path, format='onnx'"),
]
MODULE_FUNCTIONS = [
    ("fastnn.losses", "mse", "y_true, y_pred"), ("fastnn.losses", "mse_prime", "y_true, y_pred"),
    ("fastnn.losses", "MSE", ""), ("fastnn.losses", "BinaryCrossEntropy", ""),
    ("fastnn.losses", "CrossEntropy", ""),
    ("fastnn.optim", "SGD", "lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, l1=0.0"),
    ("fastnn.optim", "Adam", "lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0"),
    ("fastnn.optim", "StepLR", "step_size, gamma=0.1"),
    ("fastnn.optim", "ExponentialLR", "gamma"),
    ("fastnn.optim", "CosineAnnealingLR", "T_max"),
    ("fastnn.callbacks", "EarlyStopping", "monitor='val_loss', patience=5, min_delta=0.0, "
                                          "restore_best=True"),
    ("fastnn.callbacks", "ModelCheckpoint", "path, monitor='val_loss', save_best_only=True"),
    ("fastnn.callbacks", "StepLR", "step_size, gamma=0.1"),
    ("fastnn.callbacks", "ExponentialLR", "gamma"),
    ("fastnn.callbacks", "CosineAnnealingLR", "T_max"),
    ("fastnn.metrics", "accuracy", "y_true, y_pred"),
    ("fastnn.metrics", "confusion_matrix", "y_true, y_pred, num_classes=None"),
    ("fastnn.metrics", "classification_report", "y_true, y_pred"),
    ("fastnn.data", "train_val_test_split", "x, y, val=0.1, test=0.1, seed=None, stratify=True"),
    ("fastnn.data", "batches", "x, y, batch_size, shuffle=True, seed=None"),
    ("fastnn.datasets", "xor", ""),
    ("fastnn.datasets", "circles", "n=1000, noise=0.1, factor=0.5, seed=None"),
    ("fastnn.datasets", "load_mnist", "path=None, kind='mnist', download=False"),
    ("fastnn.backend", "available", ""),
    ("fastnn.kernels", "im2col", "x, kh, kw, stride=1, padding=0"),
    ("fastnn.kernels", "col2im", "cols, x_shape, kh, kw, stride=1, padding=0"),
    ("fastnn.kernels", "maxpool2d_forward", "x, kh, kw, stride"),
    ("fastnn.kernels", "maxpool2d_backward", "grad_y, argmax, x_shape"),
    ("fastnn.kernels", "relu_forward", "x"), ("fastnn.kernels", "relu_backward", "grad_y, y"),
    ("fastnn.kernels", "dense_forward", "x, W, b"),
    ("fastnn.kernels", "dense_backward", "grad_y, x, W"),
    ("fastnn.kernels", "softmax_cross_entropy", "logits, labels"),
]
# API.md names these functions' arguments only by position
ONE_ARGUMENT = [("fastnn.backend", "use")] + [
    ("fastnn.activations", f) for f in ("tanh", "tanh_prime", "sigmoid", "sigmoid_prime", "relu",
                                        "relu_prime")]


def api_signature(spec):
    namespace = {}
    exec(f"def f({spec}): pass", namespace)
    return inspect.signature(namespace["f"])


def own_parameters(obj):
    """Parameters of a callable as a caller sees them (no self / cls)."""
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name in ("self", "cls") and inspect.isfunction(obj):
        params = params[1:]
    return params


def assert_accepts(obj, spec, what):
    """Every call API.md allows is valid with the same meaning: same positional names in the
    same places, keyword arguments by name, the same defaults; anything extra is optional."""
    actual = own_parameters(obj)
    by_name = {p.name: p for p in actual}
    positional = [p for p in actual if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    expected = list(api_signature(spec).parameters.values())
    for i, e in enumerate(expected):
        a = by_name.get(e.name)
        assert a is not None, f"{what}: no argument {e.name!r} (has {[p.name for p in actual]})"
        if e.kind is e.POSITIONAL_OR_KEYWORD:
            assert i < len(positional) and positional[i].name == e.name, \
                f"{what}: {e.name!r} must be positional argument {i}, got {inspect.signature(obj)}"
        assert a.kind in (a.POSITIONAL_OR_KEYWORD, a.KEYWORD_ONLY), f"{what}: {e.name!r} by keyword"
        assert (a.default is a.empty) == (e.default is e.empty), \
            f"{what}: {e.name!r} default {a.default!r}, API.md says {e.default!r}"
        if e.default is not e.empty:
            assert a.default == e.default and type(a.default) is type(e.default), \
                f"{what}: {e.name!r} default {a.default!r}, API.md says {e.default!r}"
    for a in actual:
        if a.name not in {e.name for e in expected}:
            assert a.default is not a.empty or a.kind in (a.VAR_POSITIONAL, a.VAR_KEYWORD), \
                f"{what}: extra argument {a.name!r} must be optional"


def test_version_and_aliases():
    assert isinstance(fn.__version__, str) and fn.__version__[0].isdigit()
    assert fn.Sequential is fn.Network
    assert fn.layers.Layer is fn.Layer
    assert issubclass(fn.FCLayer, fn.Dense)
    assert fn.History().history == {}
    for name in ("StepLR", "ExponentialLR", "CosineAnnealingLR"):
        assert getattr(callbacks, name) is getattr(optim, name)
    for module in ("losses", "activations", "optim", "callbacks", "metrics", "data", "datasets",
                   "backend", "kernels", "layers"):
        assert getattr(fn, module) is importlib.import_module("fastnn." + module)


@pytest.mark.parametrize("name,spec", LAYERS, ids=[n for n, _ in LAYERS])
def test_layer_signatures(name, spec):
    layer_cls = getattr(fn, name)
    assert getattr(fn.layers, name) is layer_cls
    assert issubclass(layer_cls, fn.Layer)
    assert_accepts(layer_cls, spec, f"fn.{name}")
    for method, method_spec in LAYER_PROTOCOL:
        assert_accepts(getattr(layer_cls, method), method_spec, f"fn.{name}.{method}")


def test_layer_base_protocol():
    for method, spec in LAYER_PROTOCOL:
        assert_accepts(getattr(fn.Layer, method), spec, f"fn.Layer.{method}")
    layer = fn.Dense(2, 3, seed=0)
    assert isinstance(layer.params, dict) and isinstance(layer.grads, dict)
    assert fn.ReLU().params == {} and fn.Flatten().params == {}


@pytest.mark.parametrize("name,spec", NETWORK_METHODS, ids=[n for n, _ in NETWORK_METHODS])
def test_network_signatures(name, spec):
    method = getattr(fn.Network, name)
    if spec is None:       # compile: API.md gives its argument names through an example call
        names = [p.name for p in own_parameters(method)]
        assert names[:3] == ["loss", "optimizer", "metrics"]
        return
    assert_accepts(method, spec, f"Network.{name}")


def test_network_class_members():
    assert isinstance(inspect.getattr_static(fn.Network, "load"), classmethod)
    assert isinstance(inspect.getattr_static(fn.Network, "device"), property)
    assert fn.Network().layers == [] and len(fn.Network([fn.ReLU(), fn.Tanh()]).layers) == 2


@pytest.mark.parametrize("module,name,spec", MODULE_FUNCTIONS,
                         ids=[f"{m.split('.')[1]}.{n}" for m, n, _ in MODULE_FUNCTIONS])
def test_module_signatures(module, name, spec):
    obj = getattr(importlib.import_module(module), name, None)
    assert obj is not None, f"{module}.{name} is missing"
    assert_accepts(obj, spec, f"{module}.{name}")


@pytest.mark.parametrize("module,name", ONE_ARGUMENT, ids=[f"{m}.{n}" for m, n in ONE_ARGUMENT])
def test_one_argument_functions(module, name):
    params = own_parameters(getattr(importlib.import_module(module), name))
    assert len([p for p in params if p.default is p.empty]) == 1


def test_loss_call_and_grad_signatures():
    for cls in (losses.MSE, losses.BinaryCrossEntropy, losses.CrossEntropy):
        assert_accepts(cls.__call__, "y_pred, y_true", f"{cls.__name__}.__call__")
        assert_accepts(cls.grad, "y_pred, y_true", f"{cls.__name__}.grad")
        assert issubclass(cls, losses.Loss)


def test_backend_names():
    names = fn.backend.available()
    assert isinstance(names, list) and "numpy" in names and set(names) <= {"cpu", "numpy", "cuda"}
    assert ("cpu" in names) == (fn.backend.compiled_error() is None)
    before = fn.backend.current()
    try:
        for name in names:
            if name != "cuda":
                fn.backend.use(name)
                assert fn.backend.current() == name
    finally:
        fn.backend.use(before)


# --- layers ----------------------------------------------------------------------------------
def rand(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_kernel_stride_padding_int_or_pair():
    x = rand(2, 2, 7, 6)
    a = fn.Conv2D(2, 3, 3, stride=2, padding=1, seed=0, dtype="float64")
    b = fn.Conv2D(2, 3, (3, 3), stride=(2, 2), padding=(1, 1), seed=0, dtype="float64")
    np.testing.assert_array_equal(a.params["W"], b.params["W"])
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    assert fn.Conv2D(2, 3, [3, 3], stride=[2, 2], padding=[1, 1]).output_shape((2, 7, 6)) == (3, 4, 3)
    for cls in (fn.MaxPool2D, fn.AvgPool2D):
        np.testing.assert_array_equal(cls(2).forward(x), cls((2, 2), (2, 2)).forward(x))
        np.testing.assert_array_equal(cls(3, 1).forward(x), cls((3, 3), stride=(1, 1)).forward(x))
    # a pair is (h, w): each side follows its own value
    asym = fn.Conv2D(1, 1, (1, 3), stride=(2, 1), padding=(0, 2), seed=0)
    assert asym.params["W"].shape == (1, 1, 1, 3)
    assert asym.forward(rand(1, 1, 5, 4, dtype=np.float32)).shape == (1, 1, 3, 6)
    assert fn.MaxPool2D((2, 1)).forward(rand(1, 1, 4, 3, dtype=np.float32)).shape == (1, 1, 2, 3)


def test_conv2d_output_size_formula():
    x = rand(1, 1, 7, 6, dtype=np.float32)
    for k in (1, 2, 3, 5):
        for s in (1, 2, 3):
            for p in (0, 1, 2):
                layer = fn.Conv2D(1, 2, k, stride=s, padding=p, seed=0)
                expected = (2, (7 + 2 * p - k) // s + 1, (6 + 2 * p - k) // s + 1)
                assert layer.output_shape((1, 7, 6)) == expected, (k, s, p)
                assert layer.forward(x).shape == (1,) + expected, (k, s, p)


def test_init_schemes_for_conv_and_callable():
    # fan_in = in_channels * kh * kw; fan_out = out_channels * kh * kw
    he = fn.Conv2D(16, 32, (3, 2), seed=0, dtype="float64").params["W"]
    assert abs(he.mean()) < 0.02 and abs(he.std() / math.sqrt(2 / 96) - 1) < 0.05
    xavier = fn.Conv2D(16, 32, (3, 2), init="xavier", seed=0, dtype="float64").params["W"]
    limit = math.sqrt(6 / (96 + 192))
    assert np.abs(xavier).max() <= limit and np.abs(xavier).max() > 0.98 * limit
    assert abs(xavier.std() / (limit / math.sqrt(3)) - 1) < 0.05      # uniform, not normal
    uniform = fn.Conv2D(4, 8, 3, init="uniform", seed=0).params
    for p in uniform.values():
        assert -0.5 <= p.min() and p.max() <= 0.5
    assert abs(uniform["W"].std() / math.sqrt(1 / 12) - 1) < 0.15
    seen = []

    def init(shape, rng):
        seen.append((shape, rng))
        return rng.standard_normal(shape) * 0.01
    conv = fn.Conv2D(3, 5, (2, 4), init=init, seed=1, dtype="float64")
    assert seen[0][0] == (5, 3, 2, 4) and isinstance(seen[0][1], np.random.Generator)
    assert conv.params["W"].dtype == np.float64
    np.testing.assert_array_equal(conv.params["b"], 0)
    with pytest.raises(ValueError, match=r"init.*\(5, 3, 2, 4\)"):
        fn.Conv2D(3, 5, (2, 4), init=lambda shape, rng: np.zeros(3))


def test_fclayer_is_the_tutorials_layer():
    layer = fn.FCLayer(2, 3)
    assert layer.params["W"].shape == (2, 3) and layer.params["b"].shape == (3,)
    big = fn.FCLayer(200, 300)
    for p in big.params.values():       # the tutorial draws weights and bias from U(-0.5, 0.5)
        assert -0.5 <= p.min() and p.max() <= 0.5 and p.std() > 0.2
    x = rand(4, 1, 2, dtype=np.float32)
    np.testing.assert_allclose(layer.forward_propagation(x), x @ layer.weights + layer.bias, rtol=1e-6)


def test_activation_layer_from_two_functions():
    layer = fn.ActivationLayer(lambda x: x ** 3, lambda x: 3 * x ** 2)
    x, g = rand(3, 4), rand(3, 4, seed=1)
    np.testing.assert_allclose(layer.forward(x), x ** 3)
    np.testing.assert_allclose(layer.backward(g), 3 * x ** 2 * g)
    assert layer.params == {}
    with pytest.raises(TypeError, match="ActivationLayer"):
        fn.ActivationLayer(np.tanh, "tanh_prime")


def test_conv2d_without_bias_has_no_b(tmp_path):
    layer = fn.Conv2D(2, 3, 3, bias=False, seed=0, dtype="float64")
    assert set(layer.params) == {"W"}
    x = rand(2, 2, 5, 5)
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    assert set(layer.grads) == {"W"}
    biased = fn.Conv2D(2, 3, 3, seed=0, dtype="float64")      # b starts at zero with "he"
    np.testing.assert_allclose(y, biased.forward(x), rtol=1e-12)
    net = fn.Network([layer, fn.Flatten(), fn.Dense(27, 2, bias=False, seed=0, dtype="float64")])
    assert [name for _, name in net.parameters()] == ["W", "W"]
    net.save(tmp_path / "nobias.npz")
    loaded = fn.Network.load(tmp_path / "nobias.npz")
    assert [set(l.params) for l in loaded.layers] == [{"W"}, set(), {"W"}]
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))


@pytest.mark.parametrize("make,shape", [
    (lambda: fn.Dense(4, 3, seed=0, dtype="float64"), (3, 4)),
    (lambda: fn.Conv2D(2, 3, 2, seed=0, dtype="float64"), (3, 2, 4, 4)),
    (lambda: fn.BatchNorm1d(4, dtype="float64"), (3, 4)),
    (lambda: fn.BatchNorm2d(2, dtype="float64"), (3, 2, 4, 4))],
    ids=["Dense", "Conv2D", "BatchNorm1d", "BatchNorm2d"])
def test_backward_overwrites_grads(make, shape):
    layer = make()
    x = rand(*shape)
    y = layer.forward(x)
    g = rand(*y.shape, seed=1)
    layer.backward(g)
    first = {k: v.copy() for k, v in layer.grads.items()}
    assert set(first) == set(layer.params)
    assert all(first[k].shape == layer.params[k].shape for k in first)
    layer.forward(x)
    layer.backward(g)
    for k in first:
        np.testing.assert_allclose(layer.grads[k], first[k], rtol=1e-12)


ALL_LAYERS = [
    (lambda: fn.Dense(4, 3, seed=0), (2, 4)),
    (lambda: fn.FCLayer(4, 3), (2, 4)),
    (lambda: fn.Conv2D(2, 3, 2, seed=0), (2, 2, 4, 4)),
    (lambda: fn.MaxPool2D(2), (2, 2, 4, 4)),
    (lambda: fn.AvgPool2D(2), (2, 2, 4, 4)),
    (fn.ReLU, (2, 4)), (fn.LeakyReLU, (2, 4)), (fn.Sigmoid, (2, 4)), (fn.Tanh, (2, 4)),
    (fn.Softmax, (2, 4)),
    (lambda: fn.Dropout(0.5, seed=0), (2, 4)),
    (lambda: fn.BatchNorm1d(4), (2, 4)),
    (lambda: fn.BatchNorm2d(2), (2, 2, 4, 4)),
    (lambda: fn.RandomTranslation(1, 1, seed=0), (2, 2, 4, 4)),
    (lambda: fn.RandomFlip(seed=0), (2, 2, 4, 4)),
]
IDS = ["Dense", "FCLayer", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "LeakyReLU", "Sigmoid",
       "Tanh", "Softmax", "Dropout", "BatchNorm1d", "BatchNorm2d", "RandomTranslation",
       "RandomFlip"]


@pytest.mark.parametrize("make,shape", ALL_LAYERS, ids=IDS)
def test_every_layer_names_itself_on_bad_input(make, shape):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(TypeError, match=f"{name}.*float32.*int64"):
        layer.forward(np.zeros(shape, dtype=np.int64))
    with pytest.raises(TypeError, match=f"{name}.*(array|list)"):
        layer.forward(np.zeros(shape).tolist())
    y = layer.forward(np.ones(shape, dtype=np.float32))
    bad = np.zeros(y.shape[:-1] + (y.shape[-1] + 1,), dtype=np.float32)
    with pytest.raises(ValueError, match=f"{name}.*grad_y.*got {re.escape(str(bad.shape))}"):
        layer.backward(bad)


@pytest.mark.parametrize("make,shape", ALL_LAYERS, ids=IDS)
def test_every_layer_backward_before_forward_says_so(make, shape):
    layer = make()
    with pytest.raises(RuntimeError, match=f"{type(layer).__name__}.*before forward"):
        layer.backward(np.zeros(shape, dtype=np.float32))


def test_flatten_names_itself_on_bad_input():
    with pytest.raises(TypeError, match="Flatten.*list"):
        fn.Flatten().forward([[1.0, 2.0]])
    layer = fn.Flatten()
    layer.forward(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"Flatten.*\(2, 12\).*\(2, 11\)"):
        layer.backward(np.zeros((2, 11), np.float32))


# --- network -------------------------------------------------------------------------------------
def blobs(n=40, seed=0, classes=3, dim=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return rng.standard_normal((classes, dim))[y] * 3 + rng.standard_normal((n, dim)), y


def test_dtype_is_converted_once_at_the_entry():
    x, y = blobs(10)
    net = fn.Network([fn.Dense(4, 5, seed=0, dtype="float64"), fn.Tanh(),
                      fn.Dense(5, 3, seed=1, dtype="float64")])
    assert net.dtype == np.float64
    reference = net.predict(x)
    for data in (x.astype(np.float32), x.astype(np.int32), x > 0, x.astype(np.float16)):
        out = net.predict(data)
        assert out.dtype == np.float64
        np.testing.assert_allclose(out, net.predict(data.astype(np.float64)), rtol=1e-15)
    assert net.forward(x.astype(np.float32)).dtype == np.float64
    net.compile("cross_entropy", optim.SGD(lr=0.1))
    h = net.fit(x.astype(np.int64), y, epochs=1, verbose=0)
    assert np.isfinite(h.history["loss"][0])
    assert all(layer.params[k].dtype == np.float64 for layer, k in net.parameters())
    assert net.predict(x).dtype == np.float64 and not np.allclose(net.predict(x), reference)
    # a layer never converts: a float32 layer after float64 ones is an error naming it
    mixed = fn.Network([fn.Dense(4, 5, seed=0, dtype="float64"), fn.Dense(5, 3, seed=1)])
    with pytest.raises(TypeError, match=r"Dense\(5 -> 3\).*float32.*float64"):
        mixed.predict(x)


def test_history_loss_is_the_mean_of_batch_losses_before_each_update():
    # 5 samples in batches of 3 and 2: the unweighted mean of the two batch losses
    x, y = blobs(5)
    net = fn.Network([fn.Dense(4, 3, seed=0, dtype="float64")])
    W, b = (net.layers[0].params[k].copy() for k in ("W", "b"))
    net.compile("cross_entropy", optim.SGD(lr=0.5))
    h = net.fit(x, y, epochs=1, batch_size=3, shuffle=False, verbose=0)
    batch_losses = []
    for xb, yb in ((x[:3], y[:3]), (x[3:], y[3:])):
        logits = xb @ W + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        batch_losses.append(-np.log(p[np.arange(len(yb)), yb]).mean())
        g = (p - np.eye(3)[yb]) / len(yb)
        W, b = W - 0.5 * xb.T @ g, b - 0.5 * g.sum(0)
    assert math.isclose(h.history["loss"][0], np.mean(batch_losses), rel_tol=1e-12)
    np.testing.assert_allclose(net.layers[0].params["W"], W, rtol=1e-12)


def test_default_batch_size_after_compile_is_32():
    x, y = blobs(70)
    recorder = BatchRecorder()
    net = fn.Network([fn.Dense(4, 3, seed=0), recorder])
    net.compile("cross_entropy", optim.SGD(lr=0.01))
    net.fit(x, y, epochs=1, verbose=0)
    assert recorder.sizes == [32, 32, 6]


def test_evaluate_and_predict_in_chunks_and_after_use():
    x, y = blobs(23)
    net = fn.Network([fn.Dense(4, 6, seed=0, dtype="float64"), fn.ReLU(),
                      fn.Dense(6, 3, seed=1, dtype="float64"), fn.Softmax()])
    net.compile("cross_entropy")
    np.testing.assert_allclose(net.predict(x, batch_size=4), net.predict(x), rtol=1e-13)
    whole = net.evaluate(x, y)
    assert set(whole) == {"loss", "accuracy"} and all(isinstance(v, float) for v in whole.values())
    chunked = net.evaluate(x, y, batch_size=4)
    assert math.isclose(chunked["loss"], whole["loss"], rel_tol=1e-12)
    assert chunked["accuracy"] == whole["accuracy"] == np.mean(net.predict(x).argmax(1) == y)
    # cross_entropy takes the logits: the final Softmax is not applied twice
    logits = fn.Network(net.layers[:3]).predict(x)
    assert math.isclose(whole["loss"], losses.CrossEntropy()(logits, y), rel_tol=1e-12)
    net.use(losses.mse, losses.mse_prime)
    result = net.evaluate(x, np.eye(3)[y])
    assert set(result) == {"loss"}
    assert math.isclose(result["loss"], losses.mse(np.eye(3)[y], net.predict(x)), rel_tol=1e-12)


def test_weight_decay_and_l1_apply_to_weights_only_inside_fit():
    x, y = blobs(12)

    def one_step(opt):
        net = fn.Network([fn.Dense(4, 5, seed=0, dtype="float64"), fn.BatchNorm1d(5, dtype="float64"),
                          fn.ReLU(), fn.Dense(5, 3, seed=1, dtype="float64")])
        start = {(i, k): v.copy() for i, l in enumerate(net.layers) for k, v in l.params.items()}
        net.compile("cross_entropy", opt)
        net.fit(x, y, epochs=1, batch_size="full", shuffle=False, verbose=0)
        return start, {(i, k): v for i, l in enumerate(net.layers) for k, v in l.params.items()}
    start, plain = one_step(optim.SGD(lr=0.1))
    _, regularised = one_step(optim.SGD(lr=0.1, weight_decay=0.5, l1=0.2))
    for key, p0 in start.items():
        if key[1] == "W":
            np.testing.assert_allclose(regularised[key], plain[key] - 0.1 * (0.5 * p0 + 0.2 * np.sign(p0)),
                                       rtol=1e-12, atol=1e-15)
        else:      # biases, gamma, beta
            np.testing.assert_array_equal(regularised[key], plain[key])


def test_schedule_given_to_the_optimizer_and_as_callback_steps_once():
    x, y = blobs(8)
    schedule = optim.StepLR(1, gamma=0.5)
    net = fn.Network([fn.Dense(4, 3, seed=0)])
    net.compile("cross_entropy", optim.SGD(lr=0.8, schedule=schedule))
    net.fit(x, y, epochs=3, callbacks=[schedule], verbose=0)
    assert math.isclose(net.optimizer.lr, 0.1)


def test_binary_cross_entropy_by_name_has_no_nan_at_0_or_1():
    net = fn.Network([fn.Dense(1, 1, seed=0), fn.Sigmoid()])
    net.layers[0].params["W"][:] = 200.0           # float32 sigmoid saturates to exactly 0 and 1
    net.compile("binary_cross_entropy", optim.SGD(lr=0.1))
    x = np.array([[-1.0], [1.0], [-1.0], [1.0]])
    y = np.array([0.0, 1.0, 1.0, 0.0])
    assert set(np.unique(net.predict(x))) == {0.0, 1.0}
    result = net.evaluate(x, y)
    assert np.isfinite(result["loss"]) and result["loss"] > 1 and result["accuracy"] == 0.5
    h = net.fit(x, y, epochs=1, batch_size="full", verbose=0)
    assert np.isfinite(h.history["loss"][0])
    assert all(np.isfinite(layer.params[k]).all() for layer, k in net.parameters())


def test_binary_cross_entropy_rejects_targets_outside_0_1():
    net = fn.Network([fn.Dense(2, 1, seed=0), fn.Sigmoid()])
    net.compile("binary_cross_entropy")
    with pytest.raises(ValueError, match=r"Network.fit.*binary.*\[0, 1\].*\[0, 2\]"):
        net.fit(np.zeros((3, 2)), np.array([0.0, 1.0, 2.0]), verbose=0)
    with pytest.raises(ValueError, match=r"BinaryCrossEntropy.*\[0, 1\]"):
        losses.BinaryCrossEntropy()(np.full((2, 1), 0.5), np.array([[0.0], [-1.0]]))


def test_summary_without_arguments_after_fit():
    net = fn.Network([fn.Conv2D(1, 2, 3, seed=0), fn.ReLU(), fn.Flatten(), fn.Dense(18, 2, seed=1)])
    net.compile("cross_entropy")
    text = net.summary()
    assert "Conv2D" in text and "Dense" in text and "total parameters: 58" in text
    x = rand(4, 1, 5, 5, dtype=np.float32)
    net.fit(x, np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    text = net.summary()
    assert isinstance(text, str)
    for shape in ("(None, 2, 3, 3)", "(None, 18)", "(None, 2)"):
        assert shape in text
    for count in ("20", "38"):
        assert count in text


def test_save_to_any_file_name_and_load_errors_name_the_file(tmp_path):
    x, _ = blobs(6)
    net = fn.Network([fn.Dense(4, 3, seed=0), fn.Softmax()])
    path = tmp_path / "model.weights"            # no .npz suffix added behind the user's back
    net.save(str(path))
    assert path.exists() and not (tmp_path / "model.weights.npz").exists()
    np.testing.assert_array_equal(fn.Network.load(str(path)).predict(x), net.predict(x))
    assert fn.Network.load(path).device == "cpu"
    # an architecture naming a class fastnn does not know
    arch = {"format": "fastnn.Network", "version": 1, "layers": [{"class": "Lambda", "config": {}}]}
    np.savez(tmp_path / "odd.npz", __fastnn_architecture__=np.array(json.dumps(arch)))
    with pytest.raises(ValueError, match=r"odd\.npz.*Lambda"):
        fn.Network.load(tmp_path / "odd.npz")
    (tmp_path / "somedir").mkdir()
    with pytest.raises((ValueError, OSError), match="somedir"):
        fn.Network.load(tmp_path / "somedir")
