"""Batch normalisation with PyTorch's running statistics."""
import numpy as np

from .. import backend
from .base import (Layer, as_dtype, check_float_array, check_number, config_int, contiguous,
                   kernel_impl)

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _BatchNorm(Layer):
    """Normalise each channel (axis 1) over the batch and the other axes.

    Training: y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's
    mean and biased variance; the running statistics move by ``momentum``
    (running_var uses the unbiased variance, as PyTorch does). Eval: the
    running statistics. Kept for backward: x_hat and 1/sqrt(var + eps).

    ``synchronized=True``: under distributed training (``fastnn.distributed``) the batch
    statistics are those of the global batch, every rank's share together: one allreduce
    of [sum x, sum x^2, count] per channel in forward, one of [sum dy, sum dy * x_hat] in
    backward (``grads`` then hold this rank's part of the sums, which the
    DistributedOptimizer's allreduce adds up). In one process it is plain BatchNorm.
    """

    weight_names = ()            # no weight decay on gamma / beta
    _ranks = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, *, dtype="float32",
                 synchronized=False):
        super().__init__()
        who = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"{who}: num_features must be a positive int, got {num_features!r}")
        self.num_features = int(num_features)
        self.eps = check_number(eps, "eps", who, low=0)
        self.momentum = check_number(momentum, "momentum", who, 0, 1)
        self.synchronized = bool(synchronized)
        self._count = None           # the synchronized forward's global count per channel
        dt = self.dtype = as_dtype(dtype, who)
        self.params["gamma"] = np.ones(self.num_features, dtype=dt)
        self.params["beta"] = np.zeros(self.num_features, dtype=dt)
        self.buffers["running_mean"] = np.zeros(self.num_features, dtype=dt)
        self.buffers["running_var"] = np.ones(self.num_features, dtype=dt)
        self._cache = None

    @property
    def running_mean(self):
        return self.buffers["running_mean"]

    @running_mean.setter
    def running_mean(self, value):
        self.buffers["running_mean"][...] = value

    @property
    def running_var(self):
        return self.buffers["running_var"]

    @running_var.setter
    def running_var(self, value):
        self.buffers["running_var"][...] = value

    def _name(self):
        return f"{type(self).__name__}({self.num_features})"

    @classmethod
    def array_shapes(cls, config):
        """gamma, beta, running_mean, running_var: all (num_features,)."""
        n = (config_int(config, "num_features"),)
        return ({"params.gamma": n, "params.beta": n, "buffers.running_mean": n,
                 "buffers.running_var": n}, as_dtype(config.get("dtype", "float32"), cls.__name__))

    def _check(self, x):
        check_float_array(x, self._name(), "input", self.params["gamma"].dtype)
        if x.ndim not in self._ranks or x.shape[1] != self.num_features:
            raise ValueError(f"{self._name()}: expected input of shape {self._expected()}, "
                             f"got {tuple(x.shape)}")

    def forward(self, x, training=True, *, relu=False):
        """x: (N, C, ...) -> y, the same shape. ``relu=True`` (the Network passes it when
        a ReLU layer follows) returns max(y, 0), the ReLU fused into the pass writing y."""
        self._check_params()            # once per assigned array: the kernels read raw memory
        self._check(x)
        x = contiguous(x)
        impl = kernel_impl(x)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if training and self.synchronized:
            mean, var, m = self._global_stats(x)
            y, x_hat, _, _, inv_std = impl.batchnorm_forward(x, gamma, beta, self.eps, mean, var,
                                                             relu=relu)
            self._update_running(mean, var, m)
        elif training:
            m = x.size // self.num_features
            if m < 2:
                raise ValueError(f"{self._name()}: training needs more than 1 value per channel, "
                                 f"got input of shape {tuple(x.shape)}")
            y, x_hat, mean, var, inv_std = impl.batchnorm_forward(x, gamma, beta, self.eps,
                                                                  relu=relu)
            self._update_running(mean, var, m)
        else:
            y, x_hat, _, _, inv_std = impl.batchnorm_forward(
                x, gamma, beta, self.eps, self.buffers["running_mean"], self.buffers["running_var"],
                relu=relu)
        self._cache = (x_hat, inv_std, training, y if relu else None)
        self.output = y
        return y

    def _axes(self, x):
        return (0,) + tuple(range(2, x.ndim))

    def _global_stats(self, x):
        """(mean, biased var) per channel over the global batch (x's dtype), and its count."""
        from .. import distributed
        xp, c = backend.get_array_module(x), self.num_features
        sums = xp.empty(2 * c + 1, dtype=np.float64)
        x64 = x.astype(np.float64, copy=False)
        sums[:c] = x64.sum(axis=self._axes(x))
        sums[c:2 * c] = (x64 * x64).sum(axis=self._axes(x))
        sums[2 * c] = x.size // c
        distributed.allreduce(sums)
        m = int(sums[2 * c])
        if m < 2:
            raise ValueError(f"{self._name()}: training needs more than 1 value per channel "
                             f"in the global batch, got {m}")
        mean = sums[:c] / m
        var = xp.maximum(sums[c:2 * c] / m - mean * mean, 0.0)
        self._count = m
        return mean.astype(x.dtype), var.astype(x.dtype), m

    def _global_backward(self, grad_y, x_hat, inv_std):
        """grad_x from the global sums of dy and dy * x_hat; grads: this rank's sums."""
        from .. import distributed
        xp, c, axes = backend.get_array_module(grad_y), self.num_features, self._axes(grad_y)
        sums = xp.empty(2 * c, dtype=np.float64)
        sums[:c] = grad_y.sum(axis=axes, dtype=np.float64)
        sums[c:] = (grad_y * x_hat).sum(axis=axes, dtype=np.float64)
        self.grads["beta"], self.grads["gamma"] = (sums[:c].astype(grad_y.dtype),
                                                   sums[c:].astype(grad_y.dtype))
        distributed.allreduce(sums)
        shape = (1, c) + (1,) * (grad_y.ndim - 2)
        mean_dy = (sums[:c] / self._count).astype(grad_y.dtype).reshape(shape)
        mean_dyx = (sums[c:] / self._count).astype(grad_y.dtype).reshape(shape)
        scale = (self.params["gamma"] * inv_std).reshape(shape)
        return (grad_y - mean_dy - x_hat * mean_dyx) * scale

    def _update_running(self, mean, var, m):
        """PyTorch's momentum update; the running variance takes the unbiased batch variance."""
        mom = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - mom
        rm += mom * mean
        rv *= 1 - mom
        rv += (mom * m / (m - 1)) * var

    def backward(self, grad_y, *, relu_y=False):
        """grad_y: the shape of the input -> grad_x; fills ``grads``. ``relu_y=True`` (the
        Network passes it after a ``forward(relu=True)``) applies the fused ReLU's
        backward to grad_y first, in the same passes."""
        self._check_params()
        if self._cache is None:
            raise RuntimeError(f"{self._name()}: backward called before forward")
        x_hat, inv_std, training, relu_out = self._cache
        if getattr(grad_y, "shape", None) != x_hat.shape or grad_y.dtype != x_hat.dtype:
            check_float_array(grad_y, self._name(), "grad_y", x_hat.dtype)
            raise ValueError(f"{self._name()}: expected grad_y of shape {tuple(x_hat.shape)}, "
                             f"got {tuple(grad_y.shape)}")
        if relu_y and relu_out is None:
            raise RuntimeError(f"{self._name()}: backward(relu_y=True) needs a forward with "
                               "relu=True")
        grad_y, impl = contiguous(grad_y), kernel_impl(grad_y)
        relu_out = relu_out if relu_y else None
        if training and not self.synchronized:
            grad_x, self.grads["gamma"], self.grads["beta"] = impl.batchnorm_backward(
                grad_y, x_hat, self.params["gamma"], inv_std, relu_y=relu_out)
            return grad_x
        if relu_out is not None:
            grad_y = impl.relu_backward(grad_y, relu_out)
        if training:
            return self._global_backward(grad_y, x_hat, inv_std)
        # eval mode: fixed statistics, y is affine in x
        axes = (0,) + tuple(range(2, grad_y.ndim))
        shape = (1, self.num_features) + (1,) * (grad_y.ndim - 2)
        self.grads["gamma"] = (grad_y * x_hat).sum(axis=axes)
        self.grads["beta"] = grad_y.sum(axis=axes)
        return grad_y * self.params["gamma"].reshape(shape) * inv_std.reshape(shape)

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) + 1 not in self._ranks or input_shape[0] != self.num_features:
            raise ValueError(f"{self._name()}: expected input shape {self._expected()[1:]}, "
                             f"got {input_shape}")
        return input_shape

    def get_config(self):
        config = {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                  "dtype": str(self.dtype)}
        if self.synchronized:
            config["synchronized"] = True
        return config


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of ``(N, C)`` or ``(N, C, L)`` inputs, statistics per feature C
    (``torch.nn.BatchNorm1d``).

    Training: ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the batch's
    mean and biased variance over N (and L); the running statistics move by
    ``momentum`` (the running variance takes the unbiased one, as PyTorch's does).
    Inference (``training=False``): the running statistics instead.

    Parameters
    ----------
    num_features : int
        C, the size of axis 1.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1], default 0.1
        ``running = (1 - momentum) * running + momentum * batch_statistic``.
    dtype : {"float32", "float64"}, default "float32"
        Dtype of the parameters, buffers and inputs.
    synchronized : bool, default False
        In distributed training (``fastnn.distributed``), batch statistics over the
        global batch: one allreduce of [sum x, sum x^2, n] forward and one of
        [sum dy, sum dy * x_hat] backward. False: each process's own share, as in
        PyTorch and Keras. No effect in one process.

    Shapes
    ------
    Input ``(N, C)`` or ``(N, C, L)``; output the same shape. ``params``:
    ``"gamma"``, ``"beta"``, ``(C,)``; ``buffers``: ``"running_mean"``,
    ``"running_var"``, ``(C,)``. Training needs more than one value per channel.
    """

    _ranks = (2, 3)

    def _expected(self):
        return f"(N, {self.num_features}) or (N, {self.num_features}, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of images, statistics per channel C over N, H and W
    (``torch.nn.BatchNorm2d``).

    Training: ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the batch's
    mean and biased variance; the running statistics move by ``momentum`` (the running
    variance takes the unbiased one, as PyTorch's does). Inference
    (``training=False``, as in ``predict`` / ``evaluate``): the running statistics.

    Parameters
    ----------
    num_features : int
        C, the number of channels (axis 1).
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1], default 0.1
        ``running = (1 - momentum) * running + momentum * batch_statistic``.
    dtype : {"float32", "float64"}, default "float32"
        Dtype of the parameters, buffers and inputs.
    synchronized : bool, default False
        In distributed training (``fastnn.distributed``), batch statistics over the
        global batch: one allreduce of [sum x, sum x^2, n] forward and one of
        [sum dy, sum dy * x_hat] backward. False: each process's own share, as in
        PyTorch and Keras. No effect in one process.

    Shapes
    ------
    Input ``(N, C, H, W)``; output ``(N, C, H, W)``. ``params``: ``"gamma"``,
    ``"beta"``, ``(C,)`` (no weight decay on them); ``buffers``:
    ``"running_mean"``, ``"running_var"``, ``(C,)``.

    Examples
    --------
    >>> import numpy as np, fastnn as fn
    >>> bn = fn.BatchNorm2d(6)
    >>> bn.forward(np.random.rand(4, 6, 5, 5).astype(np.float32)).shape
    (4, 6, 5, 5)
    """

    _ranks = (4,)

    def _expected(self):
        return f"(N, {self.num_features}, H, W)"
