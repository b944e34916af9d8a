"""PyTorch state dicts both ways (fastnn.interop) and ONNX export (fastnn.onnx_export).

PyTorch is the oracle of the state dicts: a torch.nn.Sequential of the same layers must
have the same keys and shapes and, loaded, predict the same. ONNX Runtime's outputs on an
exported model must equal ``net.predict``.
"""

import numpy as np
import pytest

import fastnn as fn
from fastnn.activations import tanh, tanh_prime

torch = pytest.importorskip("torch")
nn = torch.nn

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-10)}
DTYPES = ("float32", "float64")


# --- the oracle: the same layers in PyTorch ----------------------------------------------------
def torch_layer(layer):
    """The torch.nn module computing what the fastnn ``layer`` computes in eval mode."""
    t = type(layer)
    if isinstance(layer, fn.Dense):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.use_bias)
    if t is fn.Conv2D:
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                         stride=layer.stride, padding=layer.padding, bias=layer.use_bias)
    if t in (fn.BatchNorm1d, fn.BatchNorm2d):
        cls = nn.BatchNorm1d if t is fn.BatchNorm1d else nn.BatchNorm2d
        return cls(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    if t in (fn.MaxPool2D, fn.AvgPool2D):
        cls = nn.MaxPool2d if t is fn.MaxPool2D else nn.AvgPool2d
        return cls(layer.kernel_size, stride=layer.stride)
    if t is fn.GlobalAvgPool2D:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if t is fn.LeakyReLU:
        return nn.LeakyReLU(layer.alpha)
    if t is fn.Dropout:
        return nn.Dropout(layer.p)
    if t is fn.Softmax:
        return nn.Softmax(dim=-1)
    return {fn.ReLU: nn.ReLU, fn.Sigmoid: nn.Sigmoid, fn.Tanh: nn.Tanh, fn.Flatten: nn.Flatten}[t]()


def torch_model(net, dtype):
    model = nn.Sequential(*[torch_layer(layer) for layer in net.layers])
    return model.to(getattr(torch, dtype)).eval()


def torch_predict(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def to_torch_state(state):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def from_torch_state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def mlp(dtype, seed=0):
    return fn.Network([fn.Dense(6, 16, seed=seed, dtype=dtype), fn.ReLU(), fn.Dropout(0.2),
                       fn.Dense(16, 8, seed=seed + 1, dtype=dtype), fn.BatchNorm1d(8, dtype=dtype),
                       fn.Tanh(), fn.Dense(8, 3, seed=seed + 2, dtype=dtype), fn.Softmax()])


def cnn(dtype, seed=0):
    return fn.Network([
        fn.Conv2D(3, 6, (3, 2), stride=(1, 2), padding=(1, 0), seed=seed, dtype=dtype),
        fn.BatchNorm2d(6, dtype=dtype), fn.ReLU(), fn.MaxPool2D(2), fn.Dropout(0.3),
        fn.Conv2D(6, 8, 3, padding=1, seed=seed + 1, dtype=dtype), fn.LeakyReLU(0.1),
        fn.AvgPool2D(2, stride=1), fn.GlobalAvgPool2D(), fn.Dense(8, 5, seed=seed + 2, dtype=dtype),
        fn.BatchNorm1d(5, dtype=dtype), fn.Sigmoid(), fn.Dense(5, 3, bias=False, seed=seed + 3,
                                                               dtype=dtype)])


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (3, 12, 10))}


def data(shape, dtype, n=9, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + shape).astype(dtype), rng.integers(0, 3, n)


def trained(kind, dtype):
    """A network of ``kind`` after one epoch (its BatchNorm statistics moved)."""
    build, shape = MODELS[kind]
    net = build(dtype)
    x, y = data(shape, dtype, n=32)
    net.compile(loss="cross_entropy", optimizer=fn.optim.SGD(lr=0.05))
    net.fit(x, y, epochs=1, batch_size=8, seed=0, verbose=0)
    return net


# --- state dicts: keys, layouts, both directions -----------------------------------------------
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_keys_and_shapes_are_pytorchs(kind):
    net = MODELS[kind][0]("float32")
    expected = torch_model(net, "float32").state_dict()
    state = net.state_dict()
    assert list(state) == list(expected)
    for key, value in state.items():
        assert isinstance(value, np.ndarray) and value.flags.c_contiguous
        assert value.shape == tuple(expected[key].shape), key
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == np.int64 and state[k].shape == ()
                            and state[k] == 0 for k in counters)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fastnn_to_torch_predicts_the_same(kind, dtype):
    net = trained(kind, dtype)
    model = torch_model(net, dtype)
    model.load_state_dict(to_torch_state(net.state_dict()), strict=True)
    x, _ = data(MODELS[kind][1], dtype, seed=5)
    np.testing.assert_allclose(torch_predict(model, x), net.predict(x), **TOL[dtype])
    np.testing.assert_allclose(torch_predict(model, x[:1]), net.predict(x[:1]), **TOL[dtype])


def randomise_batchnorm(model, seed=0):
    """Non-trivial running statistics and affine parameters in every torch BatchNorm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(17)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_torch_to_fastnn_predicts_the_same(kind, dtype):
    build, shape = MODELS[kind]
    net = build(dtype, seed=40)
    torch.manual_seed(3)
    model = torch_model(net, dtype)
    randomise_batchnorm(model)
    result = net.load_state_dict(from_torch_state(model))
    assert result == ([], []) and result.missing_keys == [] and result.unexpected_keys == []
    x, _ = data(shape, dtype, seed=6)
    np.testing.assert_allclose(net.predict(x), torch_predict(model, x), **TOL[dtype])
    for layer in net.layers:
        for store in ("params", "buffers"):
            for a in getattr(layer, store).values():
                assert a.dtype == np.dtype(dtype) and a.flags.c_contiguous


def test_round_trip_is_exact_and_copies():
    net = trained("cnn", "float64")
    state = net.state_dict()
    other = cnn("float64", seed=9)
    w_before = other.layers[0].params["W"]
    other.load_state_dict(state)
    assert other.layers[0].params["W"] is w_before            # copied in place
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    state["0.weight"][...] = 7.0                              # no aliasing either way
    assert not np.any(other.layers[0].params["W"] == 7.0)
    net.state_dict()["0.weight"][...] = 7.0
    assert not np.any(net.layers[0].params["W"] == 7.0)


def test_dense_weight_is_the_transpose():
    layer = fn.Dense(3, 2, seed=0, dtype="float64")
    state = fn.Network([layer]).state_dict()
    np.testing.assert_array_equal(state["0.weight"], layer.params["W"].T)
    assert state["0.weight"].shape == (2, 3)


def test_indices_count_parameterless_layers_and_the_tutorial_classes():
    net = fn.Network([fn.FCLayer(2, 3, seed=0), fn.ActivationLayer(tanh, tanh_prime),
                      fn.FCLayer(3, 1, seed=1), fn.ActivationLayer(tanh, tanh_prime)])
    assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


# --- load_state_dict: checks -------------------------------------------------------------------
def snapshot(net):
    return {k: v.copy() for k, v in net.state_dict().items()}


def assert_unchanged(net, before):
    after = net.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_strict_missing_key_names_it_and_loads_nothing():
    net, state = mlp("float32", seed=1), mlp("float32", seed=2).state_dict()
    del state["3.bias"]
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"load_state_dict: missing key\(s\) \['3.bias'\]"):
        net.load_state_dict(state)
    assert_unchanged(net, before)


def test_strict_unexpected_key_names_it():
    net, state = mlp("float32", seed=1), mlp("float32", seed=2).state_dict()
    state["9.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['9.weight'\]"):
        net.load_state_dict(state)


def test_not_strict_skips_and_reports_keys():
    net, source = mlp("float32", seed=1), mlp("float32", seed=2)
    state = source.state_dict()
    del state["0.bias"], state["4.running_var"]
    state["extra"] = np.ones(2)
    before = snapshot(net)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["0.bias", "4.running_var"], ["extra"])
    after = net.state_dict()
    np.testing.assert_array_equal(after["0.weight"], state["0.weight"])
    np.testing.assert_array_equal(after["0.bias"], before["0.bias"])
    np.testing.assert_array_equal(after["4.running_var"], before["4.running_var"])


@pytest.mark.parametrize("strict", (True, False))
def test_wrong_shape_names_the_key_and_loads_nothing(strict):
    net = mlp("float32", seed=1)
    state = mlp("float32", seed=2).state_dict()
    state["3.weight"] = state["3.weight"].T                   # fastnn's layout, not PyTorch's
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"'3.weight' must have shape \(8, 16\).*got \(16, 8\)"):
        net.load_state_dict(state, strict=strict)
    assert_unchanged(net, before)                             # 0.weight was not loaded either


def test_bad_values_are_clear_errors():
    net = mlp("float32")
    state = net.state_dict()
    for bad, error in ((np.array([["a"] * 6] * 16), TypeError),
                       (np.zeros((16, 6), complex), TypeError),
                       (object(), TypeError)):
        with pytest.raises(error, match="'0.weight'"):
            net.load_state_dict({**state, "0.weight": bad})
    with pytest.raises(TypeError, match="expected a dict"):
        net.load_state_dict([("0.weight", state["0.weight"])])


def test_num_batches_tracked_is_ignored_or_may_be_absent():
    net = mlp("float64", seed=1)
    state = mlp("float64", seed=2).state_dict()
    state["4.num_batches_tracked"] = np.array(123)
    net.load_state_dict(state)
    del state["4.num_batches_tracked"]
    assert net.load_state_dict(state) == ([], [])
    assert net.state_dict()["4.num_batches_tracked"] == 0


def test_dtype_conversion_and_lists():
    net = mlp("float32")
    state = mlp("float64", seed=3).state_dict()
    state["0.bias"] = state["0.bias"].tolist()                # anything np.asarray takes
    state["3.bias"] = np.arange(8)                            # integers
    net.load_state_dict(state)
    p = net.layers[0].params
    assert p["W"].dtype == np.float32 and p["b"].dtype == np.float32
    np.testing.assert_array_equal(p["W"], state["0.weight"].T.astype(np.float32))
    np.testing.assert_array_equal(net.layers[3].params["b"], np.arange(8, dtype=np.float32))


def test_non_contiguous_values():
    net = cnn("float32", seed=1)
    source = cnn("float32", seed=2).state_dict()
    state = {}
    for k, v in source.items():                               # strided and Fortran-ordered views
        big = np.zeros((2,) + v.shape, v.dtype)
        big[1] = v
        state[k] = np.asfortranarray(v) if v.ndim > 1 and k.startswith("0.") else big[1]
    weight = torch.from_numpy(source["9.weight"].T.copy()).t()       # a transposed tensor view
    assert not weight.is_contiguous()
    state["9.weight"] = weight.numpy()
    net.load_state_dict(state)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, source[k])
    contiguous = cnn("float32", seed=5)
    contiguous.load_state_dict(source)
    x, _ = data((3, 12, 10), "float32")
    np.testing.assert_array_equal(net.predict(x), contiguous.predict(x))


def test_non_finite_values_are_loaded():
    net = mlp("float64")
    state = net.state_dict()
    state["0.bias"][:3] = [np.nan, np.inf, -np.inf]
    net.load_state_dict(state)
    np.testing.assert_array_equal(net.layers[0].params["b"][:3], [np.nan, np.inf, -np.inf])


class Scale(fn.Layer):
    """A user layer with a parameter: no PyTorch layout, no ONNX operator."""

    def __init__(self):
        super().__init__()
        self.params["s"] = np.ones(1, np.float32)

    def forward(self, x, training=True):
        return x * self.params["s"]

    def backward(self, grad_y):
        return grad_y * self.params["s"]


def test_user_layer_with_arrays_is_refused():
    net = fn.Network([fn.Dense(2, 2), Scale()])
    with pytest.raises(ValueError, match=r"state_dict: layer 1 \(Scale\) holds arrays"):
        net.state_dict()
    with pytest.raises(ValueError, match=r"load_state_dict: layer 1 \(Scale\)"):
        net.load_state_dict({})


def test_wrongly_assigned_parameter_is_named_before_loading():
    net = mlp("float32")
    state = net.state_dict()
    net.layers[3].params["W"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"parameter 'W' must have shape \(16, 8\)"):
        net.load_state_dict(state)


@pytest.mark.skipif("cuda" not in fn.backend.available(), reason="no CUDA device")
def test_cuda_network_loads_onto_its_device():
    net = trained("cnn", "float32")
    state = net.state_dict()
    gpu = cnn("float32", seed=8).to("cuda")
    w = gpu.layers[0].params["W"]
    gpu.load_state_dict(state)
    assert gpu.layers[0].params["W"] is w and fn.backend.is_cuda_array(w)
    for k, v in gpu.state_dict().items():
        assert isinstance(v, np.ndarray)
        np.testing.assert_array_equal(v, state[k])
    x, _ = data((3, 12, 10), "float32")
    np.testing.assert_allclose(gpu.predict(x), net.predict(x), rtol=1e-4, atol=1e-5)
