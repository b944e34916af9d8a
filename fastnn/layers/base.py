"""The Layer protocol, shared helpers (init, dtype, kernel dispatch) and ActivationLayer.

Every layer keeps ``params`` / ``grads`` (dicts of arrays with the same keys and
shapes), implements ``forward(x, training=True)``, ``backward(grad_y)`` (which
overwrites ``grads``) and ``output_shape(input_shape)``. The tutorial protocol
(``forward_propagation`` / ``backward_propagation(err, lr)``) is kept on top:
``backward_propagation`` is ``backward`` followed by one plain SGD step.
"""
import numpy as np

from .. import backend, kernels

__all__ = ["Layer", "ActivationLayer", "initialize", "as_dtype", "make_rng", "check_float_array",
           "check_number", "checked_param", "counter_seed", "config_int", "uses_tutorial_protocol"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_dtype(dtype, who):
    """``"float32"`` / ``"float64"`` / a NumPy float dtype -> ``np.dtype``; anything else is a TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: dtype must be float32 or float64, got {dtype!r}")
    return dt


def check_float_array(x, who, what="input", dtype=None):
    """Raise a TypeError naming ``who`` unless ``x`` is a NumPy or CuPy array of ``dtype``
    (or, with ``dtype=None``, of float32 or float64)."""
    if not (isinstance(x, np.ndarray) or backend.is_cuda_array(x)):
        raise TypeError(f"{who}: {what} must be a NumPy or CuPy array, got {type(x).__name__}")
    if dtype is not None:
        if x.dtype != dtype:
            raise TypeError(f"{who}: expected {what} of dtype {dtype}, got {x.dtype}")
    elif x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: expected a float32 or float64 {what}, got {x.dtype}")


def check_number(value, name, who, low=-np.inf, high=np.inf):
    """``value`` as a float in [low, high]; a TypeError / ValueError naming ``who`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{who}: {name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{who}: {name} must lie in [{low}, {high}], got {value!r}")
    return float(value)


def initialize(init, shape, fan_in, fan_out, rng, dtype, who):
    """Initial weights of ``shape``.

    ``"he"``: normal, std sqrt(2 / fan_in); ``"xavier"``: Glorot uniform,
    limit sqrt(6 / (fan_in + fan_out)); ``"uniform"``: the tutorial's
    U(-0.5, 0.5); a callable ``init(shape, rng) -> array``.
    """
    if callable(init):
        w = np.asarray(init(tuple(shape), rng))
        if w.shape != tuple(shape):
            raise ValueError(f"{who}: init returned shape {w.shape}, expected {tuple(shape)}")
    elif init == "he":
        w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif init == "xavier":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-limit, limit, shape)
    elif init == "uniform":
        w = rng.random(shape) - 0.5
    else:
        raise ValueError(f"{who}: init must be 'he', 'xavier', 'uniform' or a callable, got {init!r}")
    return np.ascontiguousarray(w, dtype=dtype)


_GOLDEN = 0x9E3779B97F4A7C15      # the counter step of kernels.counter_bits


def counter_seed(seed, skip):
    """The seed whose counter-based draws (``kernels.counter_bits``, dropout's masks) start
    ``skip`` counters later than ``seed``'s: draw i of it is draw ``skip + i`` of ``seed``.
    Distributed training gives each rank the draws of its samples' global positions."""
    return (int(seed) + int(skip) * _GOLDEN) & 0xFFFFFFFFFFFFFFFF


def make_rng(seed):
    """A Generator from ``seed``; with None, seeded from NumPy's global state, so that
    ``np.random.seed(k)`` makes unseeded layers reproducible (as the tutorial's
    ``np.random.rand`` initialisation is)."""
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1))
    return np.random.default_rng(seed)


# The kernel implementation module for an array (compiled, reference or CUDA). Layers
# validate their inputs themselves (once per new shape), so their hot paths call the
# implementation directly and skip the public kernels' per-call argument checks.
kernel_impl = kernels._impl


def config_int(config, name):
    """``config[name]`` as a positive int; ValueError otherwise (configs may come from a
    file)."""
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r:.100}")
    return int(value)


def checked_param(who, name, value, shape, dtype, hint=""):
    """``value`` as parameter ``name`` of layer ``who``: a NumPy or CuPy array of
    ``shape`` and ``dtype``, C-contiguous (a non-contiguous one is copied)."""
    if not (isinstance(value, np.ndarray) or backend.is_cuda_array(value)):
        raise TypeError(f"{who}: parameter {name!r} must be a NumPy or CuPy array, "
                        f"got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{who}: parameter {name!r} must have the layer's dtype {dtype}, got "
                        f"{value.dtype} (convert it, or the network with net.to(dtype))")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{who}: parameter {name!r} must have shape {tuple(shape)}{hint}, "
                         f"got {tuple(value.shape)}")
    return contiguous(value)


def contiguous(x):
    """``x`` as a C-contiguous array of its own module (no copy when it already is)."""
    if x.flags.c_contiguous:
        return x
    return backend.get_array_module(x).ascontiguousarray(x)


def uses_tutorial_protocol(layer):
    """True when ``layer`` only implements ``forward_propagation``/``backward_propagation``.

    Such layers (the tutorial's own classes, or user subclasses of ``Layer``
    written the tutorial's way) update their own parameters inside
    ``backward_propagation``; the Network calls them with the learning rate.
    """
    cls = type(layer)
    if not isinstance(layer, Layer):
        return not hasattr(layer, "backward") and hasattr(layer, "backward_propagation")
    return cls.forward is Layer.forward or cls.backward is Layer.backward


class Layer:
    """Base class of every layer.

    ``params`` / ``grads``: dicts name -> array; ``weight_names``: the
    params that weight decay and L1 apply to (not biases, not BatchNorm's);
    None (the default for user layers) means every param of 2 or more dims.
    ``buffers``: non-trained state saved with the model (BatchNorm's running
    statistics).
    """

    weight_names = None
    dtype = None                   # the parameters' dtype, for layers that have some

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.input = None
        self.output = None
        self._checked = None       # [(store, name, array)] last found right by _check_params
        self._specs = None         # param_specs(), computed once

    # -- parameters a user may assign -----------------------------------------
    param_hints = {}               # name -> text added to a wrong-shape error (the layout)

    @classmethod
    def array_shapes(cls, config):
        """``({"params.W": shape, "buffers.running_mean": shape, ...}, dtype)``: the arrays
        a layer built from ``config`` (its ``get_config()``) holds, computed from the config
        alone (``Network.load`` checks a file's arrays against it before allocating them).
        Built-in layers with arrays declare theirs; the default has none."""
        return {}, None

    def param_specs(self):
        """``{(store, name): (shape, hint)}`` for ``_check_params``, from ``array_shapes``."""
        shapes, _ = type(self).array_shapes(self.get_config())
        return {tuple(key.split(".")): (shape, self.param_hints.get(key.split(".")[1], ""))
                for key, shape in shapes.items()}

    def _check_params(self):
        """Before a kernel reads them: every declared parameter and buffer has its
        shape, the dtype of the layer and a C-contiguous layout (a non-contiguous one
        is replaced by a C-contiguous copy). Checked once per assigned array: later
        calls compare identities only. A TypeError / ValueError names the layer, the
        parameter, what was expected and what came."""
        checked = self._checked
        if checked is not None:
            for store, name, array in checked:
                if getattr(self, store).get(name) is not array:
                    break
            else:
                return
        who = self._name() if hasattr(self, "_name") else type(self).__name__
        checked = []
        if self._specs is None:
            self._specs = self.param_specs()
        for (store, name), (shape, hint) in self._specs.items():
            arrays = getattr(self, store)
            if name not in arrays:
                raise ValueError(f"{who}: {store[:-1]} {name!r} is missing")
            arrays[name] = checked_param(who, name, arrays[name], shape, self.dtype, hint)
            checked.append((store, name, arrays[name]))
        self._checked = checked

    # -- the protocol ---------------------------------------------------------
    def forward(self, x, training=True):
        """Compute the layer's output.

        Parameters
        ----------
        x : array
            The input batch, batch axis first (NumPy on the CPU, CuPy on the GPU).
        training : bool, default True
            Training mode (Dropout drops, BatchNorm uses and updates batch statistics,
            augmentation layers draw); ``False`` is inference. ``Network.fit`` passes
            True, ``predict`` / ``evaluate`` False: fastnn has no ``model.train()`` /
            ``model.eval()`` switch.

        Returns
        -------
        y : array
            The output, shape ``(N,) + self.output_shape(x.shape[1:])``.

        The default runs a tutorial-style ``forward_propagation``.
        """
        if type(self).forward_propagation is Layer.forward_propagation:
            raise NotImplementedError(f"{type(self).__name__} implements neither forward "
                                      "nor forward_propagation")
        return self.forward_propagation(x)

    def backward(self, grad_y):
        """Gradient of the loss with respect to the input, from ``grad_y`` (same shape as
        the last forward's output); overwrites ``self.grads`` (same keys and shapes as
        ``self.params``). Returns ``grad_x``, the shape of the last forward's input."""
        raise NotImplementedError(f"{type(self).__name__} implements neither backward "
                                  "nor backward_propagation")

    def output_shape(self, input_shape):
        """Output shape (without the batch dimension) for ``input_shape``; default: unchanged."""
        return tuple(input_shape)

    # -- the tutorial's protocol ---------------------------------------------
    def forward_propagation(self, input):
        """The tutorial's forward: ``forward(input, training=True)``."""
        return self.forward(input, training=True)

    def backward_propagation(self, output_error, learning_rate):
        """The tutorial's backward: ``grad_x = backward(output_error)``, then a plain
        SGD step ``p -= learning_rate * grad`` on each of this layer's params; returns
        ``grad_x``."""
        grad_x = self.backward(output_error)
        for name, p in self.params.items():
            p -= learning_rate * self.grads[name]
        return grad_x

    # -- serialisation ----------------------------------------------------------
    def get_config(self):
        """Constructor arguments as a JSON-able dict (used by Network.save)."""
        raise ValueError(f"{type(self).__name__}: this layer cannot be saved (it has no "
                         "get_config); only fastnn's built-in layers are serialisable")

    @classmethod
    def from_config(cls, config):
        """Rebuild a layer from ``get_config()`` (parameters are loaded separately)."""
        return cls(**config)

    def __repr__(self):
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except ValueError:
            args = ""
        return f"{type(self).__name__}({args})"


class ActivationLayer(Layer):
    """The tutorial's layer from two functions: ``y = activation(x)``,
    ``grad_x = activation_prime(x) * grad_y``.

    Parameters
    ----------
    activation : callable
        ``f(x) -> y``, element-wise (e.g. ``fastnn.activations.tanh``).
    activation_prime : callable
        Its derivative ``f'(x)`` (e.g. ``fastnn.activations.tanh_prime``).

    Shapes
    ------
    Input: any array ``(N, ...)``; output: the same shape. It saves and loads when both
    functions are from ``fastnn.activations``.

    Examples
    --------
    >>> import fastnn as fn
    >>> from fastnn.activations import tanh, tanh_prime
    >>> layer = fn.ActivationLayer(tanh, tanh_prime)
    """

    def __init__(self, activation, activation_prime):
        super().__init__()
        if not callable(activation) or not callable(activation_prime):
            raise TypeError("ActivationLayer: activation and activation_prime must be callables, "
                            f"got {type(activation).__name__} and {type(activation_prime).__name__}")
        self.activation = activation
        self.activation_prime = activation_prime

    def forward(self, x, training=True):
        self.input = x
        self.output = self.activation(x)
        return self.output

    def backward(self, grad_y):
        if self.input is None:
            raise RuntimeError("ActivationLayer: backward called before forward")
        return self.activation_prime(self.input) * grad_y

    def get_config(self):
        from .. import activations
        names = []
        for f in (self.activation, self.activation_prime):
            name = getattr(f, "__name__", None)
            if getattr(activations, name or "", None) is not f:
                raise ValueError(f"ActivationLayer: cannot save the function {f!r}; only the "
                                 "functions of fastnn.activations are serialisable")
            names.append(name)
        return {"activation": names[0], "activation_prime": names[1]}

    @classmethod
    def from_config(cls, config):
        from .. import activations
        funcs = []
        for key in ("activation", "activation_prime"):
            name = config[key]
            f = getattr(activations, name, None) if isinstance(name, str) else None
            if f is None or name.startswith("_"):
                raise ValueError(f"ActivationLayer: unknown activation function {name!r}")
            funcs.append(f)
        return cls(*funcs)
