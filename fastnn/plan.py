"""The execution plan of a Network: each layer's forward and backward as plain callables
(the tutorial protocol and users' forward signatures adapted), the kernel fusions the
plan chooses, and the parameters the optimizer trains. Computed once per layer list
(``Network._get_plan``)."""
import inspect

import numpy as np

from . import losses
from .layers.activation import ReLU, Softmax
from .layers.base import uses_tutorial_protocol
from .layers.conv import Conv2D
from .layers.dense import Dense, FCLayer
from .layers.norm import BatchNorm1d, BatchNorm2d
from .layers.pool import AvgPool2D, MaxPool2D

__all__ = ["Plan", "layer_params"]


def layer_params(layer):
    """A layer's ``params`` dict ({} for a layer without parameters)."""
    return getattr(layer, "params", None) or {}


def _weight_flags(layer):
    names = getattr(layer, "weight_names", None)
    params = layer_params(layer)
    if names is None:        # user layers: every matrix / kernel is a weight
        return [params[k].ndim >= 2 for k in params]
    return [k in names for k in params]


class Plan:
    """What the loops need, computed once per layer list: each layer's forward and
    backward as plain callables, the trained parameters (``slots``, ``decay``), the
    parameters' dtype, and ``n_train``, the number of layers training runs (all but a
    final Softmax fused with CrossEntropy).

    Fusion happens here, as kernels the layers call, never as a second engine: a Dense
    or BatchNorm followed by a ReLU applies the ReLU on its output (``relu=True``), the
    ReLU then only keeps that output; a Dense whose input is a ReLU's output applies
    that ReLU's backward to its grad_x (``relu_x=True``), else a BatchNorm before the
    ReLU applies it to its grad_y (``relu_y=True``); the ReLU's backward then passes the
    gradient through. The bits are those of the layers run one by one. A Conv2D
    followed by a MaxPool2D(2) (2x2, stride 2) runs both in one kernel
    (``Conv2D.forward_max_pool``; with Winograd each 2x2 output tile is pooled as it is
    made, and the conv's output is neither written nor kept); before another pool, it
    computes only the rows and columns of its output that the pool reads
    (``Conv2D.forward(output_size=...)``). Either way a 7x7 output pooled 2x2 costs
    Winograd 9 tiles of 2x2 instead of 16, and the conv's backward takes the gradient
    of those rows and columns only.
    """

    def __init__(self, network):
        layers = network.layers
        self.layers = list(layers)
        self.steps = [(layer, uses_tutorial_protocol(layer)) for layer in layers]
        self.forwards, self.backwards = [], []
        for layer, tutorial in self.steps:
            if tutorial:
                step = _TutorialStep(layer)
                self.forwards.append(step.forward)
                self.backwards.append(step.backward)
            else:
                self.forwards.append(_forward_of(layer))
                self.backwards.append(lambda g, lr, b=layer.backward: b(g))
        self._fuse_relu(layers)
        self._fuse_conv_pools(layers)
        fused = (isinstance(network.loss_fn, losses.CrossEntropy) and bool(layers)
                 and isinstance(layers[-1], Softmax))
        self.n_train = len(layers) - fused
        self._first_trained(layers)
        # the parameters the optimizer updates (tutorial-protocol layers update their own)
        self.slots = [(layer, name) for layer, tutorial in self.steps if not tutorial
                      for name in layer_params(layer)]
        self.decay = [flag for layer, tutorial in self.steps if not tutorial
                      for flag in _weight_flags(layer)]
        self.dtype = np.dtype(np.float32)
        for layer in layers:
            params = layer_params(layer)
            if params:
                self.dtype = next(iter(params.values())).dtype
                break

    def _fuse_relu(self, layers):
        for i, relu in enumerate(layers):
            if type(relu) is not ReLU:
                continue
            before = layers[i - 1] if i > 0 else None
            after = layers[i + 1] if i + 1 < len(layers) else None
            if type(before) in _RELU_BEFORE:
                self.forwards[i - 1] = lambda x, training, f=before: f.forward(x, training,
                                                                              relu=True)
                self.forwards[i] = lambda x, training, r=relu: _keep_output(r, x)
            if type(after) in (Dense, FCLayer):
                self.backwards[i + 1] = lambda g, lr, d=after: d.backward(g, relu_x=True)
                self.backwards[i] = lambda g, lr: g
            elif type(before) in _BATCHNORMS:
                self.backwards[i - 1] = lambda g, lr, b=before: b.backward(g, relu_y=True)
                self.backwards[i] = lambda g, lr: g

    def _fuse_conv_pools(self, layers):
        for i, conv in enumerate(layers[:-1]):
            pool = layers[i + 1]
            if type(conv) is not Conv2D or type(pool) not in (MaxPool2D, AvgPool2D):
                continue
            if type(pool) is MaxPool2D and pool.kernel_size == pool.stride == (2, 2):
                self.forwards[i] = _conv_max_pooled(conv, pool)
                self.forwards[i + 1] = lambda x, training: x
            else:
                self.forwards[i] = _conv_read_by(conv, pool)

    def _first_trained(self, layers):
        """Training stops its backward at the first layer with parameters: the
        built-in parameter-free layers before it have no gradients to fill, and
        Dense / Conv2D skip their input gradient there (a first Dense layer's
        grad_x GEMM is as large as its grad_W one)."""
        self.first_trained, self.first_backward = len(layers), None
        for i, (layer, tutorial) in enumerate(self.steps):
            if tutorial or layer_params(layer) or not _builtin(layer):
                self.first_trained = i
                break
        if self.first_trained < len(layers):
            first = layers[self.first_trained]
            if isinstance(first, (Dense, Conv2D)) and _builtin(first):
                self.first_backward = lambda g, lr, b=first.backward: b(g, need_grad_x=False)
            else:
                self.first_backward = self.backwards[self.first_trained]

    def matches(self, layers):
        """Still the plan of ``layers`` (the same layer objects, in the same order)?"""
        return self.layers == layers       # element-wise `is` first, in C


# the layers a ReLU after them fuses into (forward(relu=True)), and the BatchNorms
_BATCHNORMS = (BatchNorm1d, BatchNorm2d)
_RELU_BEFORE = (Dense, FCLayer) + _BATCHNORMS


def _conv_read_by(conv, pool):
    """conv's forward computing only the rows and columns of its output that the pool
    after it reads (``MaxPool2D.read_size``): a 7x7 output pooled 2x2 is computed 6x6."""
    def forward(x, training):
        shape = getattr(x, "shape", ())
        if len(shape) != 4:           # conv.forward says what is wrong
            return conv.forward(x, training)
        _, height, width = conv.output_shape(shape[1:])
        return conv.forward(x, training, output_size=pool.read_size(height, width))
    return forward


def _conv_max_pooled(conv, pool):
    """conv's forward with the MaxPool2D(2) after it taken in the same kernel
    (``Conv2D.forward_max_pool``), the pool keeping what its backward needs; its own
    forward then passes the pooled output on. Outputs under 2x2: one by one (the
    pool's forward says why it cannot run)."""
    def forward(x, training):
        shape = getattr(x, "shape", ())
        if len(shape) == 4:
            _, height, width = conv.output_shape(shape[1:])
            if height >= 2 and width >= 2:
                y, argmax = conv.forward_max_pool(x, training)     # the pool read 2x its size
                return pool.keep(y.shape[:2] + (2 * y.shape[2], 2 * y.shape[3]), y.dtype,
                                 y, argmax)
        return pool.forward(conv.forward(x, training), training)
    return forward


def _keep_output(relu, y):
    """A ReLU fused into the layer before it: y is already its output; keep it for backward."""
    relu.output = y
    return y


class _TutorialStep:
    """Runs a tutorial-protocol layer. The tutorial's samples are (1, n) rows and its
    layers are written for them (``input.T @ output_error``), so a batch of such rows,
    (B, 1, n), reaches the layer as (B, n): one sample is then exactly the tutorial's
    (1, n); the axis is put back on what the layer returns."""

    def __init__(self, layer):
        self.layer = layer
        self.rows = False          # whether the last forward's input was (B, 1, n)

    def forward(self, x, training):
        self.rows = x.ndim == 3 and x.shape[1] == 1
        y = self.layer.forward_propagation(x[:, 0] if self.rows else x)
        return y[:, None] if self.rows and y.ndim == 2 else y

    def backward(self, grad, learning_rate):
        if self.rows and grad.ndim == 3 and grad.shape[1] == 1:
            grad = grad[:, 0]
        grad_x = self.layer.backward_propagation(grad, learning_rate)
        return grad_x[:, None] if self.rows and grad_x.ndim == 2 else grad_x


def _builtin(layer):
    """A fastnn layer class, whose backward has no effect beyond its gradients."""
    return type(layer).__module__.startswith("fastnn.layers.")


def _forward_of(layer):
    """``layer.forward`` as ``f(x, training)``, also for a user's ``forward(x)`` or
    ``forward(x, *, training)``."""
    forward = layer.forward
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):       # no signature to read (a builtin): as documented
        return forward
    kinds = [p.kind for p in params]
    positional = [k for k in kinds if k in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or inspect.Parameter.VAR_POSITIONAL in kinds:
        return forward
    if inspect.Parameter.VAR_KEYWORD in kinds or any(p.name == "training" for p in params):
        return lambda x, training: forward(x, training=training)
    return lambda x, training: forward(x)
