"""``Network.export(path, format="onnx")``: the network in inference mode as an ONNX model.

Opset 17, one input ``"input"`` whose first axis (the batch, ``"N"``) is dynamic, one
output ``"output"``. Each built-in layer becomes standard ONNX operators:

==================  ==================================================================
Dense / FCLayer     MatMul (+ Add): over the last axis, so (N, 1, n) rows work too
Conv2D              Conv (strides, symmetric pads, rectangular kernels)
MaxPool2D/AvgPool2D MaxPool / AveragePool (no padding)
GlobalAvgPool2D     GlobalAveragePool + Flatten
Flatten             Flatten (axis 1)
ReLU, LeakyReLU     Relu, LeakyRelu(alpha)
Sigmoid, Tanh       Sigmoid, Tanh
Softmax             Softmax (last axis)
Dropout             Identity (inference)
RandomTranslation,  nothing (augmentation layers: identity in inference, skipped)
RandomFlip
BatchNorm1d/2d      BatchNormalization with the running statistics
ActivationLayer     Tanh / Sigmoid / Relu when built from fastnn.activations' functions
==================  ==================================================================

A float64 network gives a float64 model. ONNX Runtime's CPU provider has no float64
kernel for some operators (``_ORT_FLOAT32_ONLY``); there the model casts to float32,
runs the operator and casts back, so its outputs equal ``net.predict`` to float32
round-off as the API promises. Needs the ``onnx`` package (``pip install "fastnn[onnx]"``).
"""
import numpy as np

from . import activations, backend
from .layers import (ActivationLayer, AvgPool2D, BatchNorm1d, BatchNorm2d, Conv2D, Dense,
                     Dropout, FCLayer, Flatten, GlobalAvgPool2D, LeakyReLU, MaxPool2D,
                     RandomFlip, RandomTranslation, ReLU, Sigmoid, Softmax, Tanh)

__all__ = ["export", "build_model", "OPSET"]

OPSET = 17
_IR_VERSION = 8                  # the IR of opset 17: readable by older runtimes too
_ORT_FLOAT32_ONLY = frozenset({"Conv", "AveragePool", "GlobalAveragePool"})   # ORT 1.32 CPU


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("Network.export: format='onnx' needs the onnx package "
                          "(pip install 'fastnn[onnx]')") from exc
    return onnx


class _Graph:
    """The nodes and initializers being built, in the network's element type."""

    def __init__(self, onnx, dtype):
        self.onnx, self.dtype = onnx, np.dtype(dtype)
        self.elem = onnx.helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes, self.initializers, self._count = [], [], 0

    def name(self, hint):
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint, array):
        """An initializer holding a host copy of ``array`` in the network's dtype."""
        a = np.ascontiguousarray(backend.to_device(array, "cpu"), dtype=self.dtype)
        tensor = self.onnx.numpy_helper.from_array(a, self.name(hint))
        self.initializers.append(tensor)
        return tensor.name

    def node(self, op, inputs, **attrs):
        """Append ``op(inputs)`` and return its output's name; an operator ONNX Runtime
        cannot run in float64 runs between casts to float32 and back."""
        if self.dtype == np.float64 and op in _ORT_FLOAT32_ONLY:
            f32 = self.onnx.TensorProto.FLOAT
            inputs = [self._add("Cast", [i], to=f32) for i in inputs]
            return self._add("Cast", [self._add(op, inputs, **attrs)], to=self.elem)
        return self._add(op, inputs, **attrs)

    def _add(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


# --- one function per layer: (graph, layer, input name) -> output name -----------------------
def _dense(g, layer, x):
    y = g.node("MatMul", [x, g.const("W", layer.params["W"])])
    if "b" in layer.params:
        y = g.node("Add", [y, g.const("b", layer.params["b"])])
    return y


def _conv(g, layer, x):
    inputs = [x, g.const("W", layer.params["W"])]
    if "b" in layer.params:
        inputs.append(g.const("b", layer.params["b"]))
    (ph, pw) = layer.padding
    return g.node("Conv", inputs, kernel_shape=list(layer.kernel_size),
                  strides=list(layer.stride), pads=[ph, pw, ph, pw])


def _pool(op):
    def export(g, layer, x):
        return g.node(op, [x], kernel_shape=list(layer.kernel_size), strides=list(layer.stride))
    return export


def _batchnorm(g, layer, x):
    p, b = layer.params, layer.buffers
    inputs = [x, g.const("gamma", p["gamma"]), g.const("beta", p["beta"]),
              g.const("running_mean", b["running_mean"]), g.const("running_var", b["running_var"])]
    return g.node("BatchNormalization", inputs, epsilon=float(layer.eps))


def _simple(op, **attrs):
    return lambda g, layer, x: g.node(op, [x], **attrs)


_ACTIVATION_OPS = {activations.tanh: "Tanh", activations.sigmoid: "Sigmoid",
                   activations.relu: "Relu"}


def _activation_layer(g, layer, x):
    op = _ACTIVATION_OPS.get(layer.activation)
    if op is None:
        name = getattr(layer.activation, "__name__", repr(layer.activation))
        raise _Unsupported(f"its function {name} has no ONNX operator (fastnn.activations' "
                           "tanh, sigmoid and relu have)")
    return g.node(op, [x])


_EXPORTERS = {
    Dense: _dense, FCLayer: _dense, Conv2D: _conv,
    MaxPool2D: _pool("MaxPool"), AvgPool2D: _pool("AveragePool"),
    GlobalAvgPool2D: lambda g, layer, x: g.node("Flatten", [g.node("GlobalAveragePool", [x])],
                                                axis=1),
    Flatten: _simple("Flatten", axis=1), ReLU: _simple("Relu"), Sigmoid: _simple("Sigmoid"),
    Tanh: _simple("Tanh"), Softmax: _simple("Softmax", axis=-1), Dropout: _simple("Identity"),
    LeakyReLU: lambda g, layer, x: g.node("LeakyRelu", [x], alpha=float(layer.alpha)),
    BatchNorm1d: _batchnorm, BatchNorm2d: _batchnorm, ActivationLayer: _activation_layer,
    # augmentation: identity in inference, so no node at all
    RandomTranslation: lambda g, layer, x: x, RandomFlip: lambda g, layer, x: x,
}


class _Unsupported(Exception):
    """A layer's settings that have no ONNX equivalent (reported with its index)."""


# --- the model ------------------------------------------------------------------------------
def _input_dims(network, input_shape):
    """The input's dimensions after the batch: ``input_shape``, else the shape ``fit`` last
    saw, else what the first layer implies (symbolic ``H``/``W`` for images)."""
    if input_shape is None:
        input_shape = network._input_shape
    if input_shape is None:
        # augmentation layers (identity in inference) first: the next layer tells
        first = next((layer for layer in network.layers
                      if not isinstance(layer, (RandomTranslation, RandomFlip))), None)
        if isinstance(first, Dense):
            input_shape = (first.in_features,)
        elif isinstance(first, BatchNorm1d):
            input_shape = (first.num_features,)
        elif isinstance(first, (Conv2D, BatchNorm2d)):
            channels = first.in_channels if isinstance(first, Conv2D) else first.num_features
            input_shape = (channels, "H", "W")
        else:
            raise ValueError("Network.export: the input shape is unknown; pass input_shape "
                             "(without the batch axis), e.g. input_shape=(1, 28, 28)")
    dims = tuple(input_shape)
    for d in dims:
        if not isinstance(d, str) and (isinstance(d, bool) or not isinstance(d, (int, np.integer))
                                       or d < 1):
            raise ValueError(f"Network.export: input_shape must hold positive ints (or names "
                             f"of free axes), got {tuple(input_shape)}")
    return dims


def _check_input_dims(network, dims):
    """A concrete input shape the layers reject is a ValueError here, before writing."""
    if any(isinstance(d, str) for d in dims):
        return
    shape = tuple(int(d) for d in dims)
    for layer in network.layers:
        shape = tuple(layer.output_shape(shape))


def build_model(network, input_shape=None):
    """The ``onnx.ModelProto`` of ``network`` (checked by ``onnx.checker``)."""
    onnx = _onnx()
    if not network.layers:
        raise ValueError("Network.export: the network has no layers")
    for i, layer in enumerate(network.layers):
        if type(layer) not in _EXPORTERS:
            raise ValueError(f"Network.export: layer {i} ({type(layer).__name__}) cannot be "
                             "exported to ONNX: only fastnn's built-in layers can (user and "
                             "tutorial-protocol layers have no ONNX equivalent)")
    dims = _input_dims(network, input_shape)
    _check_input_dims(network, dims)
    g = _Graph(onnx, network.dtype)
    x = "input"
    for i, layer in enumerate(network.layers):
        if layer.params:
            layer._check_params()
        try:
            x = _EXPORTERS[type(layer)](g, layer, x)
        except _Unsupported as exc:
            raise ValueError(f"Network.export: layer {i} ({type(layer).__name__}) cannot be "
                             f"exported to ONNX: {exc}") from None
    g.nodes.append(onnx.helper.make_node("Identity", [x], ["output"], name="output"))
    helper = onnx.helper
    graph = helper.make_graph(
        g.nodes, "fastnn", [helper.make_tensor_value_info("input", g.elem, ("N",) + dims)],
        [helper.make_tensor_value_info("output", g.elem, None)], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fastnn", ir_version=_IR_VERSION)
    # the output's shape ("N", ...) as ONNX infers it; strict: a type error raises here
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def export(network, path, format="onnx", input_shape=None):
    """``Network.export``: write ``network`` as an ONNX model to ``path`` atomically
    (``fastnn.saving.atomic_write``: a failed export leaves the old file).

    ``input_shape`` (without the batch axis, which is always dynamic): default the shape
    ``fit`` last saw, else what the first layer implies (Dense: ``(in_features,)``;
    Conv2D / BatchNorm2d: ``(C, "H", "W")``, free image sizes); a tutorial row network
    ``Dense`` on ``(N, 1, n)`` needs ``input_shape=(1, n)``.
    """
    if format != "onnx":
        raise ValueError(f"Network.export: format must be 'onnx', got {format!r}")
    from .saving import atomic_write
    data = build_model(network, input_shape).SerializeToString()
    atomic_write(path, lambda f: f.write(data))
