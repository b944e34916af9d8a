"""Network.export(path, format="onnx"): ONNX Runtime's outputs equal net.predict for every
built-in layer, float32 and float64, batch 1 and larger (the dynamic batch axis)."""
import numpy as np
import pytest

import fastnn as fn
from fastnn.activations import relu, relu_prime, sigmoid, sigmoid_prime, tanh, tanh_prime

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DTYPES = ("float32", "float64")
# float32 round-off (the API's promise; float64 models run Conv and the average pools in
# float32 inside ONNX Runtime, see fastnn.onnx_export)
TOL = dict(rtol=1e-5, atol=1e-5)


def batchnorm(cls, n, dtype, seed):
    """A BatchNorm layer with non-trivial running statistics and affine parameters."""
    layer = cls(n, eps=1e-3, dtype=dtype)
    rng = np.random.default_rng(seed)
    layer.params["gamma"][...] = rng.normal(size=n)
    layer.params["beta"][...] = rng.normal(size=n)
    layer.buffers["running_mean"][...] = rng.normal(size=n)
    layer.buffers["running_var"][...] = rng.random(n) + 0.5
    return layer


# name -> (layers(dtype), input shape without the batch axis); together they cover every
# built-in layer
NETWORKS = {
    "dense": (lambda dt: [fn.Dense(7, 5, seed=0, dtype=dt), fn.ReLU(),
                          fn.Dense(5, 3, bias=False, seed=1, dtype=dt), fn.Softmax()], (7,)),
    "fclayer-tutorial-rows": (lambda dt: [fn.FCLayer(4, 3, seed=0, dtype=dt),
                                          fn.ActivationLayer(tanh, tanh_prime),
                                          fn.FCLayer(3, 2, seed=1, dtype=dt),
                                          fn.ActivationLayer(sigmoid, sigmoid_prime)], (1, 4)),
    "activation-layer-relu": (lambda dt: [fn.Dense(4, 6, seed=0, dtype=dt),
                                          fn.ActivationLayer(relu, relu_prime)], (4,)),
    "elementwise": (lambda dt: [fn.LeakyReLU(0.2), fn.Tanh(), fn.Sigmoid(), fn.Dropout(0.5),
                                fn.Softmax()], (3, 5)),
    "batchnorm1d-2d": (lambda dt: [batchnorm(fn.BatchNorm1d, 6, dt, 0),
                                   fn.Dense(6, 4, seed=0, dtype=dt)], (6,)),
    "batchnorm1d-3d": (lambda dt: [batchnorm(fn.BatchNorm1d, 3, dt, 1), fn.Flatten(),
                                   fn.Dense(15, 2, seed=0, dtype=dt)], (3, 5)),
    "conv": (lambda dt: [fn.Conv2D(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), seed=0, dtype=dt),
                         batchnorm(fn.BatchNorm2d, 4, dt, 2), fn.ReLU(), fn.MaxPool2D((2, 3)),
                         fn.Conv2D(4, 5, 1, bias=False, seed=1, dtype=dt),
                         fn.AvgPool2D(2, stride=1), fn.Flatten(),
                         fn.Dense(5 * 1 * 5, 3, seed=2, dtype=dt)], (3, 9, 16)),
    "global-pool": (lambda dt: [fn.Conv2D(2, 4, 3, padding=1, seed=0, dtype=dt),
                                fn.MaxPool2D(3, stride=2), fn.GlobalAvgPool2D(), fn.Dropout(0.1),
                                fn.Dense(4, 2, seed=1, dtype=dt)], (2, 11, 8)),
    "augmentation": (lambda dt: [fn.RandomTranslation(0.2, 3, fill=1.0, seed=0),
                                 fn.RandomFlip(seed=1), fn.Conv2D(2, 3, 3, seed=0, dtype=dt),
                                 fn.GlobalAvgPool2D()], (2, 7, 9)),
}


NEED_INPUT_SHAPE = ("elementwise", "fclayer-tutorial-rows", "batchnorm1d-3d")


def test_augmentation_layers_are_skipped(tmp_path):
    build, shape = NETWORKS["augmentation"]
    fn.Network(build("float32")).export(tmp_path / "model.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops == ["Conv", "GlobalAveragePool", "Flatten", "Identity"]     # output's Identity


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_onnx_runtime_equals_predict(tmp_path, name, dtype):
    build, shape = NETWORKS[name]
    net = fn.Network(build(dtype))
    path = tmp_path / "model.onnx"
    # the others' input shape follows from their first layer (images: H, W left free),
    # past augmentation layers
    net.export(path, input_shape=shape if name in NEED_INPUT_SHAPE else None)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    # a network without parameters (elementwise) is float32, as its predict
    assert net.dtype == (np.dtype(dtype) if name != "elementwise" else np.float32)
    x = np.random.default_rng(3).normal(size=(6,) + shape).astype(net.dtype)
    for n in (1, 6):                      # one model, two batch sizes: the batch axis is free
        got = run_onnx(path, x[:n])
        assert got.dtype == net.dtype
        np.testing.assert_allclose(got, net.predict(x[:n]), **TOL)


def test_input_shape_from_fit_and_symbolic_image_size(tmp_path):
    net = fn.Network([fn.Conv2D(1, 2, 3, seed=0), fn.ReLU(), fn.GlobalAvgPool2D(),
                      fn.Dense(2, 2, seed=1)])
    net.export(tmp_path / "free.onnx")              # no shape known: H and W stay free
    x = np.random.default_rng(0).random((2, 1, 7, 9), dtype=np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "free.onnx", x), net.predict(x), **TOL)
    y = np.array([0, 1])
    net.compile(loss="cross_entropy")
    net.fit(x, y, epochs=1, verbose=0)
    net.export(tmp_path / "fit.onnx")                # the shape fit saw
    dims = onnx.load(str(tmp_path / "fit.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, 7, 9]


class Twice(fn.Layer):
    def forward(self, x, training=True):
        return 2 * x

    def backward(self, grad_y):
        return 2 * grad_y


class TutorialLayer:
    def forward_propagation(self, x):
        return x

    def backward_propagation(self, err, learning_rate):
        return err


@pytest.mark.parametrize("layer, name", [(Twice(), "Twice"), (TutorialLayer(), "TutorialLayer")])
def test_user_and_tutorial_layers_are_refused_by_name_and_index(tmp_path, layer, name):
    net = fn.Network([fn.Dense(3, 3), layer])
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match=rf"layer 1 \({name}\) cannot be exported to ONNX"):
        net.export(path)
    assert path.read_bytes() == b"old"


def test_activation_layer_without_an_onnx_operator(tmp_path):
    net = fn.Network([fn.Dense(3, 3), fn.ActivationLayer(np.square, lambda x: 2 * x)])
    with pytest.raises(ValueError, match=r"layer 1 \(ActivationLayer\).*square has no ONNX"):
        net.export(tmp_path / "m.onnx")


def test_export_argument_errors(tmp_path):
    net = fn.Network([fn.ReLU(), fn.Dense(3, 2)])
    with pytest.raises(ValueError, match="format must be 'onnx', got 'keras'"):
        net.export(tmp_path / "m.keras", format="keras")
    with pytest.raises(ValueError, match="the input shape is unknown; pass input_shape"):
        net.export(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"Dense\(3 -> 2\): expected input shape \(\.\.\., 3\)"):
        net.export(tmp_path / "m.onnx", input_shape=(4,))
    with pytest.raises(ValueError, match="input_shape must hold positive ints"):
        net.export(tmp_path / "m.onnx", input_shape=(0,))
    with pytest.raises(ValueError, match="no layers"):
        fn.Network().export(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif("cuda" not in fn.backend.available(), reason="no CUDA device")
def test_cuda_network_exports_the_same_model(tmp_path):
    build, shape = NETWORKS["conv"]
    net = fn.Network(build("float32"))
    net.export(tmp_path / "cpu.onnx")
    net.to("cuda").export(tmp_path / "gpu.onnx")
    x = np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32)
    np.testing.assert_array_equal(run_onnx(tmp_path / "gpu.onnx", x),
                                  run_onnx(tmp_path / "cpu.onnx", x))
