"""Plain-NumPy peers of the workloads, written as well as plain NumPy gets.

Every buffer is allocated once per batch size and reused (``out=`` and in-place
ops), so a training step allocates only small temporaries. The LeNet peer keeps
its images channels-last (NHWC) internally: that makes im2col a single
``sliding_window_view`` copy and the conv output of the GEMM already the next
layer's input, with no transposes. These are peers for timing, not fastnn
code; ``tests/test_bench.py`` checks that they compute what they claim (the
single ops against the reference kernels, the networks' gradients against
PyTorch on the same weights).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _he(rng, fan_in, shape, dtype):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class _Param:
    """A parameter with its gradient and momentum buffers (PyTorch's SGD rule:
    v = momentum * v + g; p -= lr * v)."""

    def __init__(self, value):
        self.value = value
        self.grad = np.zeros_like(value)
        self.velocity = np.zeros_like(value)

    def sgd_step(self, lr, momentum):
        self.velocity *= momentum
        self.velocity += self.grad
        np.multiply(self.velocity, lr, out=self.grad)   # grad is free again: use it as scratch
        self.value -= self.grad


class _Dense:
    """y = x @ W + b, optionally followed by an in-place ReLU."""

    def __init__(self, n_in, n_out, relu, rng, dtype):
        self.W = _Param(_he(rng, n_in, (n_in, n_out), dtype))
        self.b = _Param(np.zeros(n_out, dtype))
        self.relu = relu
        self._bufs = {}

    def params(self):
        return (self.W, self.b)

    def _buffers(self, n):
        bufs = self._bufs.get(n)
        if bufs is None:
            n_in, n_out = self.W.value.shape
            dt = self.W.value.dtype
            bufs = self._bufs[n] = dict(y=np.empty((n, n_out), dt), mask=np.empty((n, n_out), bool),
                                        grad_x=np.empty((n, n_in), dt))
        return bufs

    def forward(self, x, training=True):
        bufs = self._buffers(x.shape[0])
        y = bufs["y"]
        np.matmul(x, self.W.value, out=y)
        y += self.b.value
        if self.relu:
            np.maximum(y, 0, out=y)
            if training:
                np.greater(y, 0, out=bufs["mask"])
        self.x = x
        return y

    def backward(self, grad_y, need_grad_x=True):
        """grad_y is the gradient w.r.t. this layer's (post-ReLU) output; it is
        overwritten."""
        bufs = self._buffers(grad_y.shape[0])
        if self.relu:
            np.multiply(grad_y, bufs["mask"], out=grad_y)
        np.matmul(self.x.T, grad_y, out=self.W.grad)
        np.sum(grad_y, axis=0, out=self.b.grad)
        if not need_grad_x:
            return None
        np.matmul(grad_y, self.W.value.T, out=bufs["grad_x"])
        return bufs["grad_x"]


def _softmax_cross_entropy_(logits, labels, rows):
    """In place: logits (N, C) become the gradient (softmax - onehot) / N; returns the mean loss."""
    n = logits.shape[0]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    picked = logits[rows, labels]
    loss = -float(np.log(picked).mean())
    logits[rows, labels] = picked - 1
    logits *= 1.0 / n
    return loss


class _Sequential:
    def __init__(self, layers):
        self.layers = layers
        self._rows = {}
        # no input gradient below the first layer with parameters (nobody needs it)
        self._first_trained = min(i for i, layer in enumerate(layers) if layer.params())

    def params(self):
        return [p for layer in self.layers for p in layer.params()]

    def forward(self, x, training=False):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def train_step(self, x, labels, lr, momentum):
        logits = self.forward(x, training=True)
        n = x.shape[0]
        rows = self._rows.get(n)
        if rows is None:
            rows = self._rows[n] = np.arange(n)
        loss = _softmax_cross_entropy_(logits, labels, rows)
        grad = logits
        for i in range(len(self.layers) - 1, -1, -1):
            grad = self.layers[i].backward(grad, need_grad_x=i > self._first_trained)
            if i == self._first_trained:
                break
        for p in self.params():
            p.sgd_step(lr, momentum)
        return loss

    def fit_epoch(self, x, labels, batch_size, lr, momentum):
        """One pass in order (no shuffle), the last smaller batch kept; returns the mean loss."""
        losses = [self.train_step(x[i:i + batch_size], labels[i:i + batch_size], lr, momentum)
                  for i in range(0, x.shape[0], batch_size)]
        return sum(losses) / len(losses)


def mlp(sizes=(784, 256, 128, 10), seed=0, dtype=np.float32):
    """Dense+ReLU layers, the last one without ReLU (logits)."""
    rng = np.random.default_rng(seed)
    last = len(sizes) - 2
    return _Sequential([_Dense(sizes[i], sizes[i + 1], i < last, rng, dtype)
                        for i in range(len(sizes) - 1)])


class _ConvReLU:
    """3-D cross-correlation on NHWC images, im2col + one GEMM, then in-place ReLU.

    Weights use PyTorch's (K, C, kh, kw) order, flattened to (K, C*kh*kw) to
    match the (C, kh, kw) order of the windows.
    """

    def __init__(self, c_in, c_out, k, padding, rng, dtype):
        self.k, self.pad, self.c_in, self.c_out = k, padding, c_in, c_out
        self.W = _Param(_he(rng, c_in * k * k, (c_out, c_in * k * k), dtype))
        self.b = _Param(np.zeros(c_out, dtype))
        self._bufs = {}

    def params(self):
        return (self.W, self.b)

    def _buffers(self, shape):
        bufs = self._bufs.get(shape)
        if bufs is None:
            n, h, w, c = shape
            k, p, dt = self.k, self.pad, self.W.value.dtype
            oh, ow = h + 2 * p - k + 1, w + 2 * p - k + 1
            bufs = self._bufs[shape] = dict(
                xpad=np.zeros((n, h + 2 * p, w + 2 * p, c), dt),   # border stays zero
                dxpad=np.empty((n, h + 2 * p, w + 2 * p, c), dt),
                cols=np.empty((n, oh, ow, c, k, k), dt),
                y=np.empty((n * oh * ow, self.c_out), dt),
                mask=np.empty((n * oh * ow, self.c_out), bool),
                dcols=np.empty((n, oh, ow, c, k, k), dt),
                oshape=(n, oh, ow, self.c_out))
        return bufs

    def forward(self, x, training=True):
        bufs = self._buffers(x.shape)
        n, h, w, c = x.shape
        p = self.pad
        src = x
        if p:
            bufs["xpad"][:, p:p + h, p:p + w, :] = x
            src = bufs["xpad"]
        cols = bufs["cols"]
        np.copyto(cols, sliding_window_view(src, (self.k, self.k), axis=(1, 2)))
        self.cols2d = cols.reshape(-1, c * self.k * self.k)
        self.bufs = bufs
        y = bufs["y"]
        np.matmul(self.cols2d, self.W.value.T, out=y)
        y += self.b.value
        np.maximum(y, 0, out=y)
        if training:
            np.greater(y, 0, out=bufs["mask"])
        return y.reshape(bufs["oshape"])

    def backward(self, grad_y, need_grad_x=True):
        bufs = self.bufs
        g = grad_y.reshape(-1, self.c_out)
        np.multiply(g, bufs["mask"], out=g)
        np.matmul(g.T, self.cols2d, out=self.W.grad)
        np.sum(g, axis=0, out=self.b.grad)
        if not need_grad_x:
            return None
        dcols = bufs["dcols"]
        np.matmul(g, self.W.value, out=dcols.reshape(g.shape[0], -1))
        dxpad = bufs["dxpad"]
        dxpad.fill(0)
        _, oh, ow, _ = bufs["oshape"]
        for i in range(self.k):
            for j in range(self.k):
                dxpad[:, i:i + oh, j:j + ow, :] += dcols[:, :, :, :, i, j]
        p = self.pad
        return dxpad[:, p:dxpad.shape[1] - p, p:dxpad.shape[2] - p, :] if p else dxpad


class _MaxPool2NHWC:
    """2x2 stride-2 max pool on NHWC. Backward routes the gradient through an
    equality mask; ties (all-zero windows after the ReLU before it) route to
    several inputs, but those inputs are ReLU zeros whose gradient the ReLU
    backward cancels, so the result is exact in this network."""

    def __init__(self):
        self._bufs = {}

    def params(self):
        return ()

    def forward(self, x, training=True):
        n, h, w, c = x.shape
        bufs = self._bufs.get(x.shape)
        if bufs is None:
            bufs = self._bufs[x.shape] = dict(
                y=np.empty((n, h // 2, w // 2, c), x.dtype),
                mask=np.empty((n, h // 2, 2, w // 2, 2, c), bool),
                grad_x=np.empty((n, h // 2, 2, w // 2, 2, c), x.dtype))
        windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
        y = bufs["y"]
        # three element-wise maxima: 8x faster here than np.max over axes (2, 4)
        np.maximum(windows[:, :, 0, :, 0, :], windows[:, :, 0, :, 1, :], out=y)
        np.maximum(y, windows[:, :, 1, :, 0, :], out=y)
        np.maximum(y, windows[:, :, 1, :, 1, :], out=y)
        if training:
            np.equal(windows, y[:, :, None, :, None, :], out=bufs["mask"])
        self.bufs, self.x_shape = bufs, x.shape
        return y

    def backward(self, grad_y, need_grad_x=True):
        gx = self.bufs["grad_x"]
        np.multiply(self.bufs["mask"], grad_y[:, :, None, :, None, :], out=gx)
        return gx.reshape(self.x_shape)


class _Flatten:
    def params(self):
        return ()

    def forward(self, x, training=True):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_y, need_grad_x=True):
        return grad_y.reshape(self.shape)


class _NCHWtoNHWC:
    """Entry of the LeNet peer: NCHW batch (the workload's layout) to NHWC."""

    def params(self):
        return ()

    def forward(self, x, training=True):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.shape[1] > 1 else \
            x.reshape(x.shape[0], x.shape[2], x.shape[3], 1)

    def backward(self, grad_y, need_grad_x=True):
        return None


def lenet(seed=0, dtype=np.float32):
    """LeNet-5 for 1x28x28 inputs: conv 6@5x5 pad 2, ReLU, pool, conv 16@5x5, ReLU, pool,
    then dense 120, 84, 10."""
    rng = np.random.default_rng(seed)
    return _Sequential([
        _NCHWtoNHWC(),
        _ConvReLU(1, 6, 5, 2, rng, dtype), _MaxPool2NHWC(),
        _ConvReLU(6, 16, 5, 0, rng, dtype), _MaxPool2NHWC(),
        _Flatten(),
        _Dense(400, 120, True, rng, dtype), _Dense(120, 84, True, rng, dtype),
        _Dense(84, 10, False, rng, dtype)])


# --- single ops -----------------------------------------------------------------

class Dense:
    """W1 peer: forward y = x @ W + b, backward (dX, dW, db), into fixed buffers."""

    def __init__(self, x, W, b):
        self.x, self.W, self.b = x, W, b
        n, (i, o) = x.shape[0], W.shape
        self.y = np.empty((n, o), x.dtype)
        self.grad_x = np.empty((n, i), x.dtype)
        self.grad_W = np.empty((i, o), x.dtype)
        self.grad_b = np.empty(o, x.dtype)

    def forward_backward(self, grad_y):
        np.matmul(self.x, self.W, out=self.y)
        self.y += self.b
        np.matmul(grad_y, self.W.T, out=self.grad_x)
        np.matmul(self.x.T, grad_y, out=self.grad_W)
        np.sum(grad_y, axis=0, out=self.grad_b)


class MaxPool2x2:
    """W5 peer on NCHW: strided reshape + max; backward through the equality mask
    (exact for inputs without ties inside a window, which random data has)."""

    def __init__(self, x):
        n, c, h, w = x.shape
        self.x = x
        self.windows = x.reshape(n, c, h // 2, 2, w // 2, 2)
        self.y = np.empty((n, c, h // 2, w // 2), x.dtype)
        self.mask = np.empty(self.windows.shape, bool)
        self.grad_x = np.empty(self.windows.shape, x.dtype)

    def forward(self):
        np.max(self.windows, axis=(3, 5), out=self.y)
        return self.y

    def forward_backward(self, grad_y):
        self.forward()
        np.equal(self.windows, self.y[:, :, :, None, :, None], out=self.mask)
        np.multiply(self.mask, grad_y[:, :, :, None, :, None], out=self.grad_x)
        return self.grad_x.reshape(self.x.shape)


class ReLU:
    """W6 peer: np.maximum into a fixed buffer; backward grad * (y > 0)."""

    def __init__(self, x):
        self.x = x
        self.y = np.empty_like(x)
        self.mask = np.empty(x.shape, bool)
        self.grad_x = np.empty_like(x)

    def forward(self):
        np.maximum(self.x, 0, out=self.y)

    def backward(self, grad_y):
        np.greater(self.y, 0, out=self.mask)
        np.multiply(grad_y, self.mask, out=self.grad_x)
