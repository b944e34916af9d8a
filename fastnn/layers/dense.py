"""Dense (fully connected) layer, and the tutorial's FCLayer alias."""
import numpy as np

from .. import kernels
from .base import (Layer, as_dtype, check_float_array, config_int, contiguous, initialize,
                   kernel_impl, make_rng)

__all__ = ["Dense", "FCLayer"]


class Dense(Layer):
    """Fully connected layer: ``Y = X @ W + b`` over the last axis of X.

    Parameters
    ----------
    in_features : int
        Size of the last axis of the input.
    out_features : int
        Size of the last axis of the output.
    bias : bool, default True
        Whether to add the bias ``b``; without it ``params`` has no ``"b"`` key.
    init : {"he", "xavier", "uniform"} or callable, default "he"
        Initial weights: ``"he"`` normal with std ``sqrt(2 / in_features)``,
        ``"xavier"`` Glorot uniform, ``"uniform"`` the tutorial's U(-0.5, 0.5)
        (bias included), or ``init(shape, rng) -> array``.
    seed : int or None
        Seed of the initial weights; None draws it from NumPy's global state, so
        ``np.random.seed(k)`` makes unseeded layers reproducible.
    dtype : {"float32", "float64"}, default "float32"
        Dtype of the parameters and of the inputs the layer takes.

    Shapes
    ------
    Input ``(N, in_features)`` or ``(N, ..., in_features)``; output
    ``(N, out_features)`` or ``(N, ..., out_features)``: the leading axes are one
    batch axis for the kernel, so the tutorial's ``(1, n)`` samples work unchanged.
    ``params["W"]``: ``(in_features, out_features)`` (the transpose of
    ``torch.nn.Linear.weight``); ``params["b"]``: ``(out_features,)``.

    Examples
    --------
    >>> import numpy as np, fastnn as fn
    >>> fn.Dense(784, 10, seed=0).forward(np.zeros((32, 784), np.float32)).shape
    (32, 10)
    """

    weight_names = ("W",)

    def __init__(self, in_features, out_features, *, bias=True, init="he", seed=None,
                 dtype="float32"):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Dense: {name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.use_bias = bool(bias)
        self.init, self.seed = init, seed
        dt = self.dtype = as_dtype(dtype, self._name())
        rng = make_rng(seed)
        shape = (self.in_features, self.out_features)
        self.params["W"] = initialize(init, shape, self.in_features, self.out_features, rng, dt,
                                      self._name())
        if self.use_bias:
            if init == "uniform":    # the tutorial draws its bias like its weights
                b = rng.random(self.out_features) - 0.5
            else:
                b = np.zeros(self.out_features)
            self.params["b"] = np.ascontiguousarray(b, dtype=dt)
        self._x2 = None

    def _name(self):
        return f"{type(self).__name__}({self.in_features} -> {self.out_features})"

    # the tutorial's attribute names
    @property
    def weights(self):
        return self.params["W"]

    @property
    def bias(self):
        return self.params.get("b")

    param_hints = {"W": " (in_features, out_features); a torch.nn.Linear weight is (out, in): "
                        "assign its transpose, or use load_state_dict"}

    @classmethod
    def array_shapes(cls, config, in_key="in_features", out_key="out_features"):
        """W (in, out), b (out,) unless ``bias`` is false."""
        n_in, n_out = config_int(config, in_key), config_int(config, out_key)
        shapes = {"params.W": (n_in, n_out)}
        if config.get("bias", True):
            shapes["params.b"] = (n_out,)
        return shapes, as_dtype(config.get("dtype", "float32"), cls.__name__)

    def _bad_input(self, x):
        check_float_array(x, self._name(), "input", self.params["W"].dtype)
        raise ValueError(f"{self._name()}: expected input of shape (..., {self.in_features}), "
                         f"got {tuple(x.shape)}")

    def forward(self, x, training=True, *, relu=False):
        """x: (..., in_features) -> y: (..., out_features). ``relu=True`` (the Network
        passes it when a ReLU layer follows) returns max(y, 0), the ReLU fused into
        the kernel."""
        self._check_params()            # once per assigned array: the kernels read raw memory
        params = self.params
        W = params["W"]
        b = params.get("b")
        if (type(x) is np.ndarray and x.ndim == 2 and x.shape[1] == self.in_features
                and x.dtype is W.dtype and x.flags.c_contiguous):
            x2 = x                     # the hot path: a ready (N, in) batch
        else:
            try:
                ok = x.dtype == W.dtype and x.ndim >= 1 and x.shape[-1] == self.in_features
            except AttributeError:
                ok = False
            if not ok:
                self._bad_input(x)
            x2 = contiguous(x if x.ndim == 2 else x.reshape(-1, self.in_features))
        self.input = x
        self._x2 = x2
        impl = kernel_impl(x2)
        y = impl.dense_forward(x2, W, b, True) if relu else impl.dense_forward(x2, W, b)
        self.output = y if x.ndim == 2 else y.reshape(x.shape[:-1] + (self.out_features,))
        return self.output

    def backward(self, grad_y, need_grad_x=True, *, relu_x=False):
        """grad_y: (..., out_features) -> grad_x: (..., in_features); fills ``grads``.

        ``need_grad_x=False`` (a network's first layer in training) skips grad_x's GEMM
        and returns None. ``relu_x=True`` (the Network passes it when this layer's input
        is a ReLU's output) applies that ReLU's backward to grad_x, fused."""
        x2 = self._x2
        if x2 is None:
            raise RuntimeError(f"{self._name()}: backward called before forward")
        self._check_params()
        W = self.params["W"]
        try:
            ok = (grad_y.dtype == W.dtype and grad_y.ndim >= 1
                  and grad_y.shape[-1] == self.out_features
                  and grad_y.size == x2.shape[0] * self.out_features)
        except AttributeError:
            ok = False
        if not ok:
            check_float_array(grad_y, self._name(), "grad_y", W.dtype)
            raise ValueError(f"{self._name()}: expected grad_y of shape "
                             f"{tuple(self.input.shape[:-1]) + (self.out_features,)}, "
                             f"got {tuple(grad_y.shape)}")
        g2 = contiguous(grad_y if grad_y.ndim == 2 else grad_y.reshape(-1, self.out_features))
        if relu_x and need_grad_x:
            grad_x, grad_W, grad_b = kernel_impl(g2).dense_backward(g2, x2, W, True, True)
        else:
            grad_x, grad_W, grad_b = kernels._backward(kernel_impl(g2), "dense_backward",
                                                       need_grad_x, g2, x2, W)
        self.grads["W"] = grad_W
        if self.use_bias:
            self.grads["b"] = grad_b
        if grad_x is not None and self.input.ndim != 2:
            grad_x = grad_x.reshape(self.input.shape)
        return grad_x

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if not input_shape or input_shape[-1] != self.in_features:
            raise ValueError(f"{self._name()}: expected input shape (..., {self.in_features}), "
                             f"got {input_shape}")
        return input_shape[:-1] + (self.out_features,)

    def get_config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.use_bias, "dtype": str(self.dtype)}


class FCLayer(Dense):
    """The tutorial's fully connected layer: ``Dense`` with its U(-0.5, 0.5) initialisation.

    Parameters
    ----------
    input_size : int
        Size of the input's last axis (Dense's ``in_features``).
    output_size : int
        Size of the output's last axis (Dense's ``out_features``).
    bias, init, seed, dtype
        As for ``Dense``; ``init`` defaults to ``"uniform"`` (the tutorial's
        ``np.random.rand(...) - 0.5`` for weights and bias).

    Shapes
    ------
    Input ``(N, 1, input_size)`` (the tutorial's samples) or ``(N, input_size)``;
    output the same with ``output_size`` last. ``weights`` and ``bias`` are the
    tutorial's attribute names for ``params["W"]`` and ``params["b"]``.
    """

    def __init__(self, input_size, output_size, *, bias=True, init="uniform", seed=None,
                 dtype="float32"):
        super().__init__(input_size, output_size, bias=bias, init=init, seed=seed, dtype=dtype)

    @classmethod
    def array_shapes(cls, config):
        return super().array_shapes(config, "input_size", "output_size")

    def get_config(self):
        c = super().get_config()
        return {"input_size": c.pop("in_features"), "output_size": c.pop("out_features"), **c}
