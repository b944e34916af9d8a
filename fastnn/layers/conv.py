"""2-D convolution (cross-correlation, PyTorch's conv2d), NCHW."""
import numpy as np

from .. import kernels
from .base import (Layer, as_dtype, check_float_array, config_int, contiguous, initialize,
                   kernel_impl, make_rng)

__all__ = ["Conv2D"]


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as ``torch.nn.functional.conv2d``), NCHW.

    Parameters
    ----------
    in_channels : int
        Channels C of the input.
    out_channels : int
        Channels K of the output (number of filters).
    kernel_size : int or (int, int)
        Window ``(kh, kw)``; an int k means ``(k, k)``.
    stride : int or (int, int), default 1
        Step between windows, ``(sh, sw)``.
    padding : int or (int, int), default 0
        Zeros added on each side, ``(ph, pw)``.
    bias : bool, default True
        Whether to add the per-filter bias ``b``.
    init : {"he", "xavier", "uniform"} or callable, default "he"
        Initial weights (fan_in = ``in_channels * kh * kw``); see ``Dense``.
    seed : int or None
        Seed of the initial weights (None: from NumPy's global state).
    dtype : {"float32", "float64"}, default "float32"
        Dtype of the parameters and of the inputs the layer takes.

    Shapes
    ------
    Input ``(N, C, H, W)``; output ``(N, K, OH, OW)`` with
    ``OH = floor((H + 2*ph - kh) / sh) + 1`` (and the same for OW).
    ``params["W"]``: ``(K, C, kh, kw)`` (PyTorch's layout); ``params["b"]``: ``(K,)``.

    Examples
    --------
    >>> import numpy as np, fastnn as fn
    >>> conv = fn.Conv2D(1, 6, 5, padding=2, seed=0)
    >>> conv.forward(np.zeros((8, 1, 28, 28), np.float32)).shape
    (8, 6, 28, 28)
    """

    weight_names = ("W",)

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, bias=True,
                 init="he", seed=None, dtype="float32"):
        super().__init__()
        who = "Conv2D"
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = kernels.pair(kernel_size, "kernel_size", who, 1)
        self.stride = kernels.pair(stride, "stride", who, 1)
        self.padding = kernels.pair(padding, "padding", who, 0)
        self.use_bias = bool(bias)
        dt = self.dtype = as_dtype(dtype, who)
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        rng = make_rng(seed)
        self.params["W"] = initialize(init, shape, self.in_channels * kh * kw,
                                      self.out_channels * kh * kw, rng, dt, self._name())
        if self.use_bias:
            b = rng.random(self.out_channels) - 0.5 if init == "uniform" else np.zeros(self.out_channels)
            self.params["b"] = np.ascontiguousarray(b, dtype=dt)
        self._checked_shape = None
        self._x = None
        self._output_size = None      # of the last forward, None for the whole output

    def _name(self):
        kh, kw = self.kernel_size
        return f"Conv2D({self.in_channels} -> {self.out_channels}, {kh}x{kw})"

    param_hints = {"W": " (out_channels, in_channels, kh, kw)"}

    @classmethod
    def array_shapes(cls, config):
        """W (out, in, kh, kw), b (out,) unless ``bias`` is false."""
        n_in, n_out = config_int(config, "in_channels"), config_int(config, "out_channels")
        kh, kw = kernels.pair(config.get("kernel_size"), "kernel_size", "Conv2D", 1)
        shapes = {"params.W": (n_out, n_in, kh, kw)}
        if config.get("bias", True):
            shapes["params.b"] = (n_out,)
        return shapes, as_dtype(config.get("dtype", "float32"), "Conv2D")

    def _check(self, x):
        check_float_array(x, self._name(), "input", self.params["W"].dtype)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self._name()}: expected input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        self.output_shape(x.shape[1:])       # checks the kernel fits the padded image
        self._checked_shape = x.shape

    def _take_input(self, x):
        """x checked and kept for backward; returns it C-contiguous."""
        self._check_params()            # once per assigned array: the kernels read raw memory
        if (self._checked_shape is None or getattr(x, "shape", None) != self._checked_shape
                or x.dtype != self.params["W"].dtype):
            self._check(x)
        x = contiguous(x)
        self.input = self._x = x
        return x

    def forward(self, x, training=True, *, output_size=None):
        """x (N, C, H, W) -> (N, K, OH, OW); with ``output_size`` (oh, ow) only the first
        oh rows and ow columns of it, (N, K, oh, ow) (``Plan``: a pool after this layer
        that reads no more), and ``backward`` then takes grad_y of that shape."""
        x = self._take_input(x)
        if output_size is not None:
            output_size = kernels._output_size(self._name(), output_size,
                                               *self.output_shape(x.shape[1:])[1:])
        self._output_size = output_size
        crop = {} if self._output_size is None else {"output_size": self._output_size}
        # the kernels' conv2d keeps its patch workspace bounded, whatever the batch size
        self.output = kernel_impl(x).conv2d_forward(x, self.params["W"], self.params.get("b"),
                                                    self.stride, self.padding, **crop)
        return self.output

    def forward_max_pool(self, x, training=True):
        """The forward and the 2x2 stride-2 max pool of its output in one kernel
        (``kernels.conv2d_maxpool_forward``; ``Plan``: this layer, then MaxPool2D(2)):
        x (N, C, H, W) -> (y, argmax), both (N, K, OH // 2, OW // 2), what MaxPool2D(2)
        gives on the output's first 2*(OH // 2) rows and columns; ``backward`` then
        takes grad_y of those. The conv's own output is not kept (``output`` is None);
        ``training``, as for ``forward``, changes nothing in a conv."""
        x = self._take_input(x)
        _, height, width = self.output_shape(x.shape[1:])
        self._output_size = kernels._output_size(self._name(), (height // 2 * 2, width // 2 * 2),
                                                 height, width)
        self.output = None
        return kernels._conv_maxpool(kernel_impl(x), x, self.params["W"], self.params.get("b"),
                                     self.stride, self.padding)

    def backward(self, grad_y, need_grad_x=True):
        """grad_y -> grad_x; ``need_grad_x=False`` (a network's first layer in training)
        skips grad_x and returns None."""
        x = self._x
        if x is None:
            raise RuntimeError(f"{self._name()}: backward called before forward")
        expected = (x.shape[0], self.out_channels) + (
            self._output_size or self.output_shape(x.shape[1:])[1:])
        if getattr(grad_y, "shape", None) != expected or grad_y.dtype != x.dtype:
            check_float_array(grad_y, self._name(), "grad_y", x.dtype)
            raise ValueError(f"{self._name()}: expected grad_y of shape {expected}, "
                             f"got {tuple(grad_y.shape)}")
        grad_y = contiguous(grad_y)
        self._check_params()
        grad_x, grad_W, grad_b = kernels._backward(
            kernel_impl(grad_y), "conv2d_backward", need_grad_x, grad_y, x, self.params["W"],
            self.stride, self.padding, output_size=self._output_size)
        self.grads["W"] = grad_W
        if self.use_bias:
            self.grads["b"] = grad_b
        return grad_x

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            raise ValueError(f"{self._name()}: expected input shape ({self.in_channels}, H, W), "
                             f"got {input_shape}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h, w = input_shape[1:]
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ValueError(f"{self._name()}: kernel {kh}x{kw} is larger than the padded input "
                             f"{h + 2 * ph}x{w + 2 * pw} (input {h}x{w}, padding {self.padding})")
        return (self.out_channels, kernels.conv_output_size(h, kh, sh, ph),
                kernels.conv_output_size(w, kw, sw, pw))

    def get_config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "bias": self.use_bias,
                "dtype": str(self.dtype)}
