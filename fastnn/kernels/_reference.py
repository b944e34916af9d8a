"""Pure-NumPy reference kernels: the readable specification of every op.

Every function here takes already-validated arrays (``fastnn.kernels`` checks
ranks, dtypes and sizes first) and is written for clarity, not speed. The
compiled CPU kernels and the CUDA kernels are tested against these.

Conventions: images are NCHW; ``stride`` and ``padding`` are ``(h, w)`` pairs.
"""
import numpy as np


def conv_output_size(size, k, stride, pad):
    """``floor((size + 2*pad - k) / stride) + 1``, PyTorch's output size."""
    return (size + 2 * pad - k) // stride + 1


def im2col(x, kh, kw, stride, padding):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*OH*OW).

    Row ``c*kh*kw + i*kw + j``, column ``n*OH*OW + oh*OW + ow`` holds
    ``x_padded[n, c, oh*sh + i, ow*sw + j]``.
    """
    n, c, h, w = x.shape
    (sh, sw), (ph, pw) = stride, padding
    oh = conv_output_size(h, kh, sh, ph)
    ow = conv_output_size(w, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]   # (N, C, OH, OW)
            cols[:, i, j] = patch.transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(cols, x_shape, kh, kw, stride, padding):
    """Adjoint of ``im2col``: cols (C*kh*kw, N*OH*OW) -> dx (N, C, H, W).

    Each column entry is added back to the input pixel it was copied from, so
    overlapping windows accumulate.
    """
    n, c, h, w = x_shape
    (sh, sw), (ph, pw) = stride, padding
    oh = conv_output_size(h, kh, sh, ph)
    ow = conv_output_size(w, kw, sw, pw)
    cols = cols.reshape(c, kh, kw, n, oh, ow)
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(dxp[:, :, ph:ph + h, pw:pw + w])


# Bound on the im2col workspace of one conv chunk (bytes): the batch is cut into
# chunks whose columns fit, so memory does not grow with N for big batches.
CONV_WORKSPACE_BYTES = 32 * 2**20


def _conv_chunk(x_shape, kh, kw, oh, ow, itemsize):
    """Samples per chunk so that a chunk's columns stay within CONV_WORKSPACE_BYTES."""
    per_sample = x_shape[1] * kh * kw * oh * ow * itemsize
    return max(1, CONV_WORKSPACE_BYTES // max(per_sample, 1))    # C = 0: one chunk


def conv2d_forward(x, W, b, stride, padding, output_size=None):
    """x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> y: (N, K, OH, OW), or with
    ``output_size`` (oh, ow) its first oh rows and ow columns, (N, K, oh, ow).

    Cross-correlation (PyTorch's conv2d) as im2col + one GEMM per chunk of the
    batch; the columns of a chunk take at most max(CONV_WORKSPACE_BYTES, one
    sample's C*kh*kw*OH*OW) elements' bytes.
    """
    n, c, h, w = x.shape
    k, _, kh, kw = W.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    weights = W.reshape(k, c * kh * kw)
    y = np.empty((n, k, oh, ow), dtype=x.dtype)
    chunk = _conv_chunk(x.shape, kh, kw, oh, ow, x.itemsize)
    for start in range(0, n, chunk):
        xs = x[start:start + chunk]
        cols = im2col(xs, kh, kw, stride, padding)                 # (C*kh*kw, n*OH*OW)
        out = (weights @ cols).reshape(k, xs.shape[0], oh, ow)     # (K, n, OH, OW)
        y[start:start + chunk] = out.transpose(1, 0, 2, 3)
    if b is not None:
        y += b.reshape(1, k, 1, 1)
    if output_size is not None:
        y = np.ascontiguousarray(y[:, :, :output_size[0], :output_size[1]])
    return y


def conv2d_backward(grad_y, x, W, stride, padding, need_grad_x=True, output_size=None):
    """grad_y: (N, K, OH, OW), or with ``output_size`` (oh, ow) the gradient of the
    forward's first oh rows and ow columns, (N, K, oh, ow) (the others get none)
    -> (grad_x: (N, C, H, W) or None, grad_W: (K, C, kh, kw), grad_b: (K,)).

    Same chunking (and workspace bound) as ``conv2d_forward``: the columns of
    each chunk are rebuilt, grad_W accumulates ``grad_y @ cols.T`` and grad_x
    is ``col2im(W.T @ grad_y)``.
    """
    n, c, h, w = x.shape
    k, _, kh, kw = W.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    if output_size is not None:             # zeros for the outputs past output_size
        whole = np.zeros((n, k, oh, ow), dtype=grad_y.dtype)
        whole[:, :, :output_size[0], :output_size[1]] = grad_y
        grad_y = whole
    weights = W.reshape(k, c * kh * kw)
    grad_x = np.empty_like(x) if need_grad_x else None
    grad_weights = np.zeros((k, c * kh * kw), dtype=x.dtype)
    chunk = _conv_chunk(x.shape, kh, kw, oh, ow, x.itemsize)
    for start in range(0, n, chunk):
        xs = x[start:start + chunk]
        ns = xs.shape[0]
        cols = im2col(xs, kh, kw, stride, padding)
        gy = grad_y[start:start + chunk].transpose(1, 0, 2, 3).reshape(k, ns * oh * ow)
        grad_weights += gy @ cols.T
        if need_grad_x:
            grad_x[start:start + chunk] = col2im(weights.T @ gy, xs.shape, kh, kw, stride, padding)
    grad_b = grad_y.sum(axis=(0, 2, 3))
    return grad_x, grad_weights.reshape(W.shape), grad_b


def maxpool2d_forward(x, kh, kw, stride):
    """x: (N, C, H, W) -> (y: (N, C, OH, OW), argmax: (N, C, OH, OW) int64).

    ``argmax`` holds, for each output, the flat index ``h*W + w`` of the winning
    input inside its (n, c) plane; ties go to the first element in row-major
    window order (as PyTorch does).
    """
    n, c, h, w = x.shape
    sh, sw = stride
    oh = conv_output_size(h, kh, sh, 0)
    ow = conv_output_size(w, kw, sw, 0)
    windows = np.empty((kh * kw, n, c, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            windows[i * kw + j] = x[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]
    k = windows.argmax(axis=0)                       # first maximum wins
    y = np.take_along_axis(windows, k[None], axis=0)[0]
    rows = np.arange(oh)[:, None] * sh + k // kw     # input row of the winner
    cols = np.arange(ow)[None, :] * sw + k % kw      # input column of the winner
    return y, (rows * w + cols).astype(np.int64)


def maxpool2d_backward(grad_y, argmax, x_shape):
    """Route each output gradient to its argmax input; overlapping windows add up."""
    n, c, h, w = x_shape
    if argmax.size and (argmax.min() < 0 or argmax.max() >= h * w):
        raise ValueError(f"maxpool2d_backward: argmax entries must lie in [0, {h * w}) "
                         f"(a {h}x{w} plane), got range [{argmax.min()}, {argmax.max()}]")
    grad_x = np.zeros((n * c, h * w), dtype=grad_y.dtype)
    planes = np.repeat(np.arange(n * c), grad_y.shape[2] * grad_y.shape[3])
    np.add.at(grad_x, (planes, argmax.reshape(-1)), grad_y.reshape(-1))
    return grad_x.reshape(x_shape)


def leaky_relu_forward(x, alpha):
    """y = x where x > 0, else alpha * x (alpha in x's dtype; NaN stays NaN)."""
    return np.where(x > 0, x, x * x.dtype.type(alpha))


def leaky_relu_backward(grad_y, x, alpha):
    """grad_x = grad_y where the input was positive, else alpha * grad_y."""
    return np.where(x > 0, grad_y, grad_y * grad_y.dtype.type(alpha))


def counter_bits(seed, count):
    """(count,) uint64: element i is the splitmix64 finaliser of seed + (i + 1) *
    0x9E3779B97F4A7C15 (uint64 arithmetic, wrapping): the counter-based random bits of
    dropout's masks and the augmentation layers' draws (a NumPy array, on the host)."""
    with np.errstate(over="ignore"):
        z = np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF) \
            + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_forward(x, p, seed):
    """Inverted dropout -> (y, mask): element i (in C order) is kept, mask = 1/(1-p) in
    x's dtype, when its counter-based uniform u(seed, i) >= p, else mask = 0; y = x *
    mask. u = (z >> 11) / 2^53 with z the splitmix64 finaliser of seed + (i + 1) *
    0x9E3779B97F4A7C15 (uint64 arithmetic, wrapping), as in the CUDA kernel."""
    z = counter_bits(seed, x.size)
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    mask = np.where(u >= p, x.dtype.type(1.0 / (1.0 - p)), x.dtype.type(0)).reshape(x.shape)
    return x * mask, mask


def dropout_backward(grad_y, mask):
    """grad_x = grad_y * mask (the scaled mask of dropout_forward)."""
    return grad_y * mask


def random_translate(x, shifts, fill):
    """x: (N, C, H, W), shifts: (N, 2) int64 (dy, dx) with |dy| <= H, |dx| <= W ->
    y: (N, C, H, W), y[n, :, i, j] = x[n, :, i - dy, j - dx] where that pixel exists,
    else ``fill`` (in x's dtype). Its backward is this op on grad_y with -shifts and
    fill 0: the gradient shifted back, zero where the fill was."""
    y = np.full_like(x, x.dtype.type(fill))
    h, w = x.shape[2:]
    for n, (dy, dx) in enumerate(shifts.tolist()):
        y[n, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[n, :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return y


def random_flip(x, flips):
    """x: (N, C, H, W), flips: (N, 2) int64 -> y: sample n reversed along H where
    flips[n, 0] != 0 (vertical) and along W where flips[n, 1] != 0 (horizontal). Its
    own backward: the same op on grad_y."""
    y = x.copy()
    for n, (fv, fh) in enumerate(flips.tolist()):
        if fv:
            y[n] = y[n, :, ::-1, :].copy()
        if fh:
            y[n] = y[n, :, :, ::-1].copy()
    return y


def batchnorm_forward(x, gamma, beta, eps, mean=None, var=None, relu=False):
    """x: (N, C) or (N, C, ...); gamma, beta: (C,) -> (y, x_hat, mean, var, inv_std).

    Statistics per channel (axis 1) over every other axis. With ``mean``/``var``
    None (training): the batch mean and biased variance; else the given (running)
    ones. x_hat = (x - mean) * inv_std, inv_std = 1 / sqrt(var + eps); y = gamma *
    x_hat + beta, then ``relu_forward(y)`` when ``relu`` (a ReLU layer fused)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if mean is None:
        mean = x.mean(axis=axes)
        centred = x - mean.reshape(shape)
        var = (centred * centred).mean(axis=axes)
    else:
        centred = x - mean.reshape(shape)
    inv_std = (1 / np.sqrt(var + x.dtype.type(eps))).astype(x.dtype, copy=False)
    x_hat = centred * inv_std.reshape(shape)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return relu_forward(y, out=y) if relu else y, x_hat, mean, var, inv_std


def batchnorm_backward(grad_y, x_hat, gamma, inv_std, relu_y=None):
    """Training-mode BatchNorm backward -> (grad_x, grad_gamma, grad_beta): the batch
    statistics' own gradients (the mean and the x_hat-projection) are removed.
    ``relu_y``: the output of a ReLU fused into the forward; grad_y first becomes
    ``relu_backward(grad_y, relu_y)``."""
    if relu_y is not None:
        grad_y = relu_backward(grad_y, relu_y)
    axes = (0,) + tuple(range(2, grad_y.ndim))
    shape = (1, grad_y.shape[1]) + (1,) * (grad_y.ndim - 2)
    grad_gamma = (grad_y * x_hat).sum(axis=axes)
    grad_beta = grad_y.sum(axis=axes)
    g_hat = grad_y * gamma.reshape(shape)
    proj = (g_hat * x_hat).mean(axis=axes).reshape(shape)
    grad_x = (g_hat - g_hat.mean(axis=axes).reshape(shape) - x_hat * proj) * inv_std.reshape(shape)
    return grad_x, grad_gamma, grad_beta


def _avgpool_windows(x_shape, kh, kw, stride):
    """One strided slice per window offset (i, j), row-major: offset (i, j) of every window."""
    (sh, sw), (h, w) = stride, x_shape[2:]
    oh = conv_output_size(h, kh, sh, 0)
    ow = conv_output_size(w, kw, sw, 0)
    return [(slice(None), slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
             slice(j, j + sw * (ow - 1) + 1, sw)) for i in range(kh) for j in range(kw)]


def avgpool2d_forward(x, kh, kw, stride):
    """x: (N, C, H, W) -> y: (N, C, OH, OW), the mean of each window: its (0, 0)
    element, plus each other offset in row-major order, times 1 / (kh * kw)."""
    windows = _avgpool_windows(x.shape, kh, kw, stride)
    y = x[windows[0]].copy()
    for window in windows[1:]:
        y += x[window]
    y *= x.dtype.type(1.0 / len(windows))
    return y


def avgpool2d_backward(grad_y, x_shape, kh, kw, stride):
    """grad_y: (N, C, OH, OW) -> grad_x: x_shape; each input receives grad_y / (kh * kw)
    of every window it lies in (offsets in row-major order; pixels in no window: 0)."""
    windows = _avgpool_windows(x_shape, kh, kw, stride)
    share = grad_y * grad_y.dtype.type(1.0 / len(windows))
    grad_x = np.zeros_like(grad_y, shape=x_shape)      # (a CuPy array for CuPy's grad_y)
    for window in windows:
        grad_x[window] += share
    return grad_x


def global_avgpool2d_forward(x):
    """x: (N, C, H, W) -> y: (N, C), the mean of each (n, c) plane: its sum in float64,
    divided by H*W, rounded once to x's dtype."""
    n, c, h, w = x.shape
    return (x.reshape(n, c, h * w).sum(axis=2, dtype=np.float64) / (h * w)).astype(x.dtype)


def global_avgpool2d_backward(grad_y, x_shape):
    """grad_y: (N, C) -> grad_x: x_shape (N, C, H, W), every pixel of plane (n, c) getting
    grad_y[n, c] / (H*W)."""
    h, w = x_shape[2:]
    share = grad_y / grad_y.dtype.type(h * w)
    return share[:, :, None, None].repeat(h * w, axis=2).reshape(x_shape)


def relu_forward(x, out=None):
    """y = max(x, 0) (into ``out`` when given)."""
    return np.maximum(x, 0, out=out)


def relu_backward(grad_y, y, out=None):
    """grad_x = grad_y where the output was positive, else 0 (into ``out`` when given)."""
    grad_x = np.where(y > 0, grad_y, 0).astype(grad_y.dtype, copy=False)
    if out is None:
        return grad_x
    out[...] = grad_x
    return out


def dense_forward(x, W, b, relu=False):
    """x: (N, I), W: (I, O), b: (O,) or None -> y: (N, O) = x @ W + b, then
    ``relu_forward(y)`` when ``relu`` (a Dense layer followed by a ReLU, fused)."""
    y = x @ W
    if b is not None:
        y += b
    return relu_forward(y, out=y) if relu else y


def dense_backward(grad_y, x, W, need_grad_x=True, relu_x=False):
    """grad_y: (N, O) -> (grad_x: (N, I) or None, grad_W: (I, O), grad_b: (O,)).

    ``relu_x``: x is the output of a ReLU, whose backward is fused here:
    grad_x becomes ``relu_backward(grad_y @ W.T, x)``."""
    grad_x = grad_y @ W.T if need_grad_x else None
    if grad_x is not None and relu_x:
        grad_x = relu_backward(grad_x, x)
    return grad_x, x.T @ grad_y, grad_y.sum(axis=0)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against labels, and its gradient.

    logits: (N, C); labels: (N,) integer classes or (N, C) target probabilities.
    Returns ``(loss, grad_logits)`` with ``grad_logits = (softmax(logits) - onehot) / N``.
    Log-sum-exp stable: no overflow at logits of +-1e4.
    """
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_sum
    p = np.exp(log_p)
    if labels.ndim == 1:
        loss = -log_p[np.arange(n), labels].sum() / n
        grad = p
        grad[np.arange(n), labels] -= 1
    else:
        loss = -(labels * log_p).sum() / n
        grad = p - labels
    grad /= n
    return logits.dtype.type(loss), grad.astype(logits.dtype, copy=False)


def flush_subnormal(state):
    """Set the entries of an optimizer state array below its dtype's smallest normal
    number in magnitude to 0, in place (NaN stays). Every update rule stores its state
    (momentum buffers, Adam's m and v, RMSprop's square_avg) flushed: a zero gradient
    decays a momentum buffer into subnormals, which CPUs process ~20x slower."""
    state[np.abs(state) < np.finfo(state.dtype).tiny] = 0


def sgd_step(p, g, buf, lr, momentum, weight_decay, l1, nesterov):
    """PyTorch's SGD rule (dampening 0) on one parameter ``p``, in place.

    d = g + weight_decay * p + l1 * sign(p), sign(NaN) = 0;  buf = d on the first step
    (``buf`` None), else momentum * buf + d, then flush_subnormal(buf);
    d = d + momentum * buf (nesterov) or buf;
    p -= lr * d.
    Returns the momentum buffer (None without momentum). Scalars are rounded to p's dtype
    and each operation rounds, in this order (the compiled and CUDA kernels' order).
    """
    d = g
    if p.dtype.type(weight_decay):      # a term that rounds to 0 in p's dtype is skipped,
        d = d + p * weight_decay        # as in the kernels (NaN * 0 would be NaN)
    if p.dtype.type(l1):                # sign(p) by comparisons, as the kernels: 0 for NaN
        d = d + l1 * ((p > 0).astype(p.dtype) - (p < 0).astype(p.dtype))
    if momentum:
        if buf is None:
            buf = np.array(d)           # a copy; 0-d stays an array (d may be a scalar)
        else:
            buf *= momentum
            buf += d
        flush_subnormal(buf)
        d = d + momentum * buf if nesterov else buf
    p -= lr * d
    return buf if momentum else None


def adam_step(p, g, m, v, step_size, beta1, beta2, inv_sqrt_bc2, eps, weight_decay,
              decay_factor=1.0):
    """PyTorch's Adam rule on one parameter ``p`` and its moments ``m``, ``v``, in place.

    p = decay_factor * p (AdamW's decoupled decay, 1 - lr * weight_decay; skipped at 1);
    g = g + weight_decay * p;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
    p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps), with ``step_size = lr / (1 - beta1^t)``
    and ``inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t)`` at step t.
    """
    if p.dtype.type(decay_factor) != 1:
        p *= p.dtype.type(decay_factor)
    if p.dtype.type(weight_decay):      # skipped when it rounds to 0 (see sgd_step)
        g = g + weight_decay * p
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * (g * g)
    flush_subnormal(m)
    flush_subnormal(v)
    p -= step_size * (m / (np.sqrt(v) * inv_sqrt_bc2 + eps))


def rmsprop_step(p, g, square_avg, buf, lr, alpha, eps, momentum, weight_decay):
    """PyTorch's RMSprop rule (centered=False) on one parameter ``p``, in place, with its
    running mean of squares ``square_avg`` and momentum buffer ``buf`` (None without
    momentum), both starting at zeros:

    g = g + weight_decay * p;  square_avg = alpha square_avg + (1 - alpha) g^2;
    d = g / (sqrt(square_avg) + eps);  buf = momentum buf + d, d = buf (momentum > 0);
    p -= lr * d.
    """
    if p.dtype.type(weight_decay):      # skipped when it rounds to 0 (see sgd_step)
        g = g + weight_decay * p
    square_avg *= alpha
    square_avg += (1 - alpha) * (g * g)
    flush_subnormal(square_avg)
    d = g / (np.sqrt(square_avg) + eps)
    if buf is not None:
        buf *= momentum
        buf += d
        flush_subnormal(buf)
        d = buf
    p -= lr * d
