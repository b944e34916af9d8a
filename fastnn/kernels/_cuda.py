"""CUDA kernels through CuPy: the same internal functions as ``_reference``.

``fastnn.kernels`` validates the arguments and calls these for CuPy arrays
(C-contiguous, float32 or float64; ``stride``/``padding`` as ``(h, w)``).
Hand-written kernels live in one CUDA C++ source (``_SOURCE`` below, compiled
once per process by NVRTC through ``cupy.RawModule``, templated on float and
double); GEMMs go to cuBLAS through ``cupy.matmul``. No Python loop runs over
the batch: a convolution is one im2col, one GEMM and one layout pass for the
whole batch (cut into a few chunks only when the columns would pass
``CONV_WORKSPACE_BYTES``).

Reductions are gathers (one thread owns one output and sums its inputs in a
fixed order): col2im, the loss and the BatchNorm sums are race-free and
reproducible, with no atomics. The max-pool backward alone scatters with
atomicAdd (it is not told the window geometry); it is exact whenever windows
do not overlap.

This module imports without CuPy; it needs CuPy only when a kernel runs, and a
kernel only runs for CuPy arrays.

Precision: float32 GEMMs are full float32 by default (results agree with the
CPU to float32 round-off). ``set_tf32(True)`` lets cuBLAS use TF32 tensor
cores for float32 GEMMs, as PyTorch's cuDNN convolutions do by default
(about 1e-3 relative error); ``FASTNN_TF32=1`` in the environment does the
same at import.
"""
import contextlib
import os

import numpy as np

from ._reference import conv_output_size

__all__ = ["im2col", "col2im", "maxpool2d_forward", "maxpool2d_backward",
           "relu_forward", "relu_backward", "dense_forward", "dense_backward",
           "softmax_cross_entropy", "conv2d_forward", "conv2d_backward",
           "dropout_forward", "dropout_backward", "batchnorm_forward",
           "batchnorm_backward", "set_tf32", "tf32_enabled"]

# Columns of one conv chunk stay under this many bytes; GPU memory is large, so
# a whole LeNet or CIFAR batch is one chunk (one GEMM), and only huge batches
# are cut.
CONV_WORKSPACE_BYTES = 1 << 30

_THREADS = 256

_SOURCE = r"""
typedef long long i64;

__device__ __forceinline__ float  fn_exp(float v)  { return expf(v); }
__device__ __forceinline__ double fn_exp(double v) { return exp(v); }
__device__ __forceinline__ float  fn_log(float v)  { return logf(v); }
__device__ __forceinline__ double fn_log(double v) { return log(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
    for (int off = 16; off > 0; off >>= 1) {
        T o = __shfl_xor_sync(0xffffffffu, v, off);
        v = o > v ? o : v;
    }
    return v;
}

// im2col: x (N,C,H,W) -> cols (C*KH*KW, N*OH*OW).
// One thread per (c, column); it computes n, oh, ow once and writes the KH*KW
// rows of its column. Writes are coalesced along the column index, reads
// along ow (stride SW). Memory: reads x ~KH*KW/(SH*SW) times (mostly L2),
// writes C*KH*KW*N*OH*OW elements once.
template <typename T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ cols,
        int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW,
        int OH, int OW) {
    const int P = OH * OW;
    const i64 NP = (i64)N * P;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        for (i64 col = blockIdx.x * (i64)blockDim.x + threadIdx.x; col < NP;
             col += (i64)blockDim.x * gridDim.x) {
            const int n = (int)(col / P);
            const int p = (int)(col - (i64)n * P);
            const int oh = p / OW, ow = p - (p / OW) * OW;
            const T* plane = x + ((i64)n * C + c) * H * W;
            T* out = cols + (i64)c * KH * KW * NP + col;
            for (int i = 0; i < KH; ++i) {
                const int h = oh * SH - PH + i;
                const bool row_in = h >= 0 && h < H;
                for (int j = 0; j < KW; ++j) {
                    const int w = ow * SW - PW + j;
                    *out = (row_in && w >= 0 && w < W) ? plane[(i64)h * W + w] : (T)0;
                    out += NP;
                }
            }
        }
    }
}

// col2im (adjoint of im2col): one thread per input pixel gathers every column
// entry copied from it, in a fixed order: no atomics, deterministic.
template <typename T>
__global__ void col2im_kernel(const T* __restrict__ cols, T* __restrict__ dx,
        int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW,
        int OH, int OW) {
    const i64 total = (i64)N * C * H * W;
    const int P = OH * OW;
    const i64 NP = (i64)N * P;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const int w = (int)(idx % W);
        i64 t = idx / W;
        const int h = (int)(t % H);
        t /= H;
        const int c = (int)(t % C);
        const int n = (int)(t / C);
        const int hp = h + PH, wp = w + PW;
        T sum = 0;
        for (int i = 0; i < KH; ++i) {
            const int dh = hp - i;
            if (dh < 0) break;
            if (dh % SH) continue;
            const int oh = dh / SH;
            if (oh >= OH) continue;
            for (int j = 0; j < KW; ++j) {
                const int dw = wp - j;
                if (dw < 0) break;
                if (dw % SW) continue;
                const int ow = dw / SW;
                if (ow >= OW) continue;
                sum += cols[((i64)(c * KH + i) * KW + j) * NP + (i64)n * P + oh * OW + ow];
            }
        }
        dx[idx] = sum;
    }
}

// (K, N*P) -> (N, K, P), adding bias[k] when has_bias: the GEMM's epilogue pass.
template <typename T>
__global__ void kmajor_to_nchw_kernel(const T* __restrict__ src, const T* __restrict__ bias,
        T* __restrict__ dst, int N, int K, int P, int has_bias) {
    const i64 total = (i64)N * K * P;
    const i64 NP = (i64)N * P;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const int p = (int)(idx % P);
        const i64 t = idx / P;
        const int k = (int)(t % K);
        const int n = (int)(t / K);
        T v = src[(i64)k * NP + (i64)n * P + p];
        if (has_bias) v += bias[k];
        dst[idx] = v;
    }
}

// (N, K, P) -> (K, N*P): the layout of grad_y that the backward GEMMs want.
template <typename T>
__global__ void nchw_to_kmajor_kernel(const T* __restrict__ src, T* __restrict__ dst,
        int N, int K, int P) {
    const i64 total = (i64)N * K * P;
    const i64 NP = (i64)N * P;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const int p = (int)(idx % P);
        const i64 t = idx / P;
        const int k = (int)(t % K);
        const int n = (int)(t / K);
        dst[(i64)k * NP + (i64)n * P + p] = src[idx];
    }
}

// Max pooling: one thread per output; first maximum in row-major window order
// wins (NaN counts as the maximum, as NumPy's argmax).
template <typename T>
__global__ void maxpool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
        i64* __restrict__ argmax, i64 total, int H, int W, int KH, int KW,
        int SH, int SW, int OH, int OW) {
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const int ow = (int)(idx % OW);
        const i64 t = idx / OW;
        const int oh = (int)(t % OH);
        const i64 plane = t / OH;
        const T* xp = x + plane * H * W;
        const int h0 = oh * SH, w0 = ow * SW;
        int best_pos = h0 * W + w0;
        T best = xp[best_pos];
        for (int i = 0; i < KH; ++i) {
            for (int j = 0; j < KW; ++j) {
                const int pos = (h0 + i) * W + w0 + j;
                const T v = xp[pos];
                if (v > best || (v != v && best == best)) { best = v; best_pos = pos; }
            }
        }
        y[idx] = best;
        argmax[idx] = best_pos;
    }
}

// Max-pool backward: one thread per output adds grad_y to its argmax pixel.
// Non-overlapping windows give each pixel at most one add (exact); overlapping
// ones sum a few values in hardware order. Out-of-plane argmax is skipped.
template <typename T>
__global__ void maxpool_backward_kernel(const T* __restrict__ grad_y,
        const i64* __restrict__ argmax, T* __restrict__ grad_x, i64 total,
        i64 out_plane, i64 in_plane) {
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const i64 a = argmax[idx];
        if (a >= 0 && a < in_plane) atomicAdd(grad_x + (idx / out_plane) * in_plane + a, grad_y[idx]);
    }
}

// Softmax cross-entropy, one block: each warp takes rows in turn, the per-warp
// losses are summed in a fixed order, so the loss is deterministic and the
// whole op is one launch (the batch losses of a training step are small).
// labels: class indices (int64, onehot == 0) or target rows (T, onehot == 1).
template <typename T>
__global__ void softmax_xent_kernel(const T* __restrict__ logits, const i64* __restrict__ classes,
        const T* __restrict__ targets, T* __restrict__ grad, T* __restrict__ loss,
        int N, int C, int onehot) {
    __shared__ T warp_loss[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const T inv_n = (T)1 / (T)N;
    T acc = 0;
    for (int row = warp; row < N; row += warps) {
        const T* z = logits + (i64)row * C;
        T* g = grad + (i64)row * C;
        T m = z[0];
        for (int c = lane; c < C; c += 32) m = z[c] > m ? z[c] : m;
        m = warp_max(m);
        T s = 0;
        for (int c = lane; c < C; c += 32) s += fn_exp(z[c] - m);
        const T log_norm = m + fn_log(warp_sum(s));
        T row_loss = 0;
        if (onehot) {
            const T* q = targets + (i64)row * C;
            for (int c = lane; c < C; c += 32) {
                const T log_p = z[c] - log_norm;
                row_loss -= q[c] * log_p;
                g[c] = (fn_exp(log_p) - q[c]) * inv_n;
            }
            row_loss = warp_sum(row_loss);
        } else {
            const i64 label = classes[row];
            for (int c = lane; c < C; c += 32)
                g[c] = (fn_exp(z[c] - log_norm) - (c == label ? (T)1 : (T)0)) * inv_n;
            row_loss = log_norm - z[label];
        }
        acc += row_loss;
    }
    if (lane == 0) warp_loss[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        T total = 0;
        for (int w = 0; w < warps; ++w) total += warp_loss[w];
        *loss = total * inv_n;
    }
}

// Counter-based uniform in [0, 1) from (seed, index): splitmix64 finaliser.
__device__ __forceinline__ double uniform01(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

// Inverted dropout, one pass: mask = (u >= p) / (1 - p); y = x * mask.
template <typename T>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ y, T* __restrict__ mask,
        i64 total, double p, T scale, unsigned long long seed) {
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const T m = uniform01(seed, (unsigned long long)idx) >= p ? scale : (T)0;
        mask[idx] = m;
        y[idx] = x[idx] * m;
    }
}

// BatchNorm statistics: one block per channel c of x viewed as (N, C, S);
// mean and biased variance by two passes over the channel (no cancellation),
// accumulated in double, reduced in a fixed order.
template <typename T>
__global__ void channel_mean_var_kernel(const T* __restrict__ x, T* __restrict__ mean,
        T* __restrict__ var, int N, int C, int S) {
    __shared__ double part[32];
    const int c = blockIdx.x;
    const i64 count = (i64)N * S;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    double acc = 0;
    for (i64 e = threadIdx.x; e < count; e += blockDim.x) {
        const i64 n = e / S, s = e - n * S;
        acc += (double)x[(n * C + c) * S + s];
    }
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    double mu = 0;
    for (int w = 0; w < warps; ++w) mu += part[w];
    mu /= (double)count;
    __syncthreads();
    acc = 0;
    for (i64 e = threadIdx.x; e < count; e += blockDim.x) {
        const i64 n = e / S, s = e - n * S;
        const double d = (double)x[(n * C + c) * S + s] - mu;
        acc += d * d;
    }
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double v = 0;
        for (int w = 0; w < warps; ++w) v += part[w];
        mean[c] = (T)mu;
        var[c] = (T)(v / (double)count);
    }
}

// BatchNorm backward reductions: per channel, sum(grad_y) and sum(grad_y * x_hat).
template <typename T>
__global__ void channel_grad_sums_kernel(const T* __restrict__ grad_y, const T* __restrict__ x_hat,
        T* __restrict__ sum_gy, T* __restrict__ sum_gy_xhat, int N, int C, int S) {
    __shared__ double part_a[32];
    __shared__ double part_b[32];
    const int c = blockIdx.x;
    const i64 count = (i64)N * S;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    double a = 0, b = 0;
    for (i64 e = threadIdx.x; e < count; e += blockDim.x) {
        const i64 n = e / S, s = e - n * S;
        const i64 at = (n * C + c) * S + s;
        const double g = (double)grad_y[at];
        a += g;
        b += g * (double)x_hat[at];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) { part_a[warp] = a; part_b[warp] = b; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ta = 0, tb = 0;
        for (int w = 0; w < warps; ++w) { ta += part_a[w]; tb += part_b[w]; }
        sum_gy[c] = (T)ta;
        sum_gy_xhat[c] = (T)tb;
    }
}

// BatchNorm elementwise passes over x viewed as (N, C, S).
template <typename T>
__global__ void batchnorm_apply_kernel(const T* __restrict__ x, const T* __restrict__ mean,
        const T* __restrict__ inv_std, const T* __restrict__ gamma, const T* __restrict__ beta,
        T* __restrict__ x_hat, T* __restrict__ y, i64 total, int C, int S) {
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const int c = (int)((idx / S) % C);
        const T xh = (x[idx] - mean[c]) * inv_std[c];
        x_hat[idx] = xh;
        y[idx] = gamma[c] * xh + beta[c];
    }
}

// grad_x = gamma * inv_std * (grad_y - mean(grad_y) - x_hat * mean(grad_y * x_hat))
template <typename T>
__global__ void batchnorm_grad_x_kernel(const T* __restrict__ grad_y, const T* __restrict__ x_hat,
        const T* __restrict__ gamma, const T* __restrict__ inv_std, const T* __restrict__ sum_gy,
        const T* __restrict__ sum_gy_xhat, T* __restrict__ grad_x, i64 total, int C, int S,
        T inv_count) {
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const int c = (int)((idx / S) % C);
        grad_x[idx] = gamma[c] * inv_std[c] *
            (grad_y[idx] - sum_gy[c] * inv_count - x_hat[idx] * sum_gy_xhat[c] * inv_count);
    }
}
"""

_KERNELS = ("im2col_kernel", "col2im_kernel", "kmajor_to_nchw_kernel",
            "nchw_to_kmajor_kernel", "maxpool_forward_kernel", "maxpool_backward_kernel",
            "softmax_xent_kernel", "dropout_kernel", "channel_mean_var_kernel",
            "channel_grad_sums_kernel", "batchnorm_apply_kernel", "batchnorm_grad_x_kernel")
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_module = None
_elementwise = {}
_tf32 = os.environ.get("FASTNN_TF32", "0") not in ("", "0")


def _cp():
    import cupy
    return cupy


def _kernel(name, dtype):
    """The compiled ``name<T>`` for ``dtype`` (the module is built on first use)."""
    global _module
    if _module is None:
        cp = _cp()
        names = [f"{k}<{t}>" for k in _KERNELS for t in ("float", "double")]
        _module = cp.RawModule(code=_SOURCE, name_expressions=names)
    return _module.get_function(f"{name}<{_CTYPE[np.dtype(dtype)]}>")


def _blocks(total, threads=_THREADS):
    """Blocks for a grid-stride loop over ``total`` items (capped; the loop covers the rest)."""
    return int(max(1, min((total + threads - 1) // threads, 1 << 20)))


def _i(v):
    return np.int32(v)


def _scalar(v, dtype):
    return np.dtype(dtype).type(v)


# --- GEMM precision -------------------------------------------------------------

def set_tf32(enabled):
    """Let float32 GEMMs use TF32 tensor cores (PyTorch's cuDNN default) or not (default)."""
    global _tf32
    _tf32 = bool(enabled)


def tf32_enabled():
    """Whether float32 GEMMs may use TF32 tensor cores."""
    return _tf32


@contextlib.contextmanager
def _gemm_precision(dtype):
    """Set CuPy's cuBLAS compute type for float32 while our GEMMs run, then restore it."""
    if not (_tf32 and np.dtype(dtype) == np.float32):
        yield
        return
    from cupy._core import _routines_linalg as linalg
    before = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, getattr(linalg, "COMPUTE_TYPE_TF32", 7))
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, before)


def _matmul(a, b, out=None):
    with _gemm_precision(a.dtype):
        return _cp().matmul(a, b, out=out)


# --- im2col / col2im ------------------------------------------------------------------

def _im2col_into(x, kh, kw, stride, padding, oh, ow, cols):
    n, c, h, w = x.shape
    np_cols = n * oh * ow
    grid = (_blocks(np_cols), min(c, 65535))
    _kernel("im2col_kernel", x.dtype)(
        grid, (_THREADS,),
        (x, cols, _i(n), _i(c), _i(h), _i(w), _i(kh), _i(kw), _i(stride[0]), _i(stride[1]),
         _i(padding[0]), _i(padding[1]), _i(oh), _i(ow)))
    return cols


def im2col(x, kh, kw, stride, padding):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*OH*OW), the reference's layout."""
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    cols = _cp().empty((c * kh * kw, n * oh * ow), dtype=x.dtype)
    return _im2col_into(x, kh, kw, stride, padding, oh, ow, cols)


def col2im(cols, x_shape, kh, kw, stride, padding):
    """cols: (C*kh*kw, N*OH*OW) -> dx: (N, C, H, W), overlaps summed (gather, no atomics)."""
    n, c, h, w = x_shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    dx = _cp().empty(x_shape, dtype=cols.dtype)
    total = n * c * h * w
    _kernel("col2im_kernel", cols.dtype)(
        (_blocks(total),), (_THREADS,),
        (cols, dx, _i(n), _i(c), _i(h), _i(w), _i(kh), _i(kw), _i(stride[0]), _i(stride[1]),
         _i(padding[0]), _i(padding[1]), _i(oh), _i(ow)))
    return dx


# --- convolution ------------------------------------------------------------------------

def _conv_chunk(c, kh, kw, oh, ow, itemsize):
    per_sample = c * kh * kw * oh * ow * itemsize
    return max(1, CONV_WORKSPACE_BYTES // per_sample)


def _leading(cols, width):
    """A C-contiguous (rows, width) view on the start of the workspace ``cols``
    (the last, smaller chunk): kernels index raw memory with row stride ``width``."""
    rows = cols.shape[0]
    return cols.ravel()[:rows * width].reshape(rows, width)


def _kmajor_to_nchw(src, bias, n, k, oh, ow, out):
    """src (K, n*OH*OW) -> out (n, K, OH, OW) (+ bias[k])."""
    p = oh * ow
    total = n * k * p
    _kernel("kmajor_to_nchw_kernel", src.dtype)(
        (_blocks(total),), (_THREADS,),
        (src, src if bias is None else bias, out, _i(n), _i(k), _i(p), _i(bias is not None)))
    return out


def _nchw_to_kmajor(src):
    """src (n, K, OH, OW) -> (K, n*OH*OW)."""
    n, k, oh, ow = src.shape
    p = oh * ow
    if n == 1:
        return src.reshape(k, p)     # same memory layout
    dst = _cp().empty((k, n * p), dtype=src.dtype)
    _kernel("nchw_to_kmajor_kernel", src.dtype)(
        (_blocks(n * k * p),), (_THREADS,), (src, dst, _i(n), _i(k), _i(p)))
    return dst


def conv2d_forward(x, W, b, stride, padding):
    """x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> y: (N, K, OH, OW).

    Per chunk of the batch (the whole batch unless its columns pass
    CONV_WORKSPACE_BYTES): im2col, one cuBLAS GEMM ``W (K, C*kh*kw) @ cols``,
    then one pass that transposes (K, n*P) to NCHW and adds the bias.
    """
    cp = _cp()
    n, c, h, w = x.shape
    k, _, kh, kw = W.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    weights = W.reshape(k, c * kh * kw)
    y = cp.empty((n, k, oh, ow), dtype=x.dtype)
    chunk = _conv_chunk(c, kh, kw, oh, ow, x.itemsize)
    cols = cp.empty((c * kh * kw, min(chunk, n) * oh * ow), dtype=x.dtype)
    for start in range(0, n, chunk):
        xs = x[start:start + chunk]
        ns = xs.shape[0]
        cs = _leading(cols, ns * oh * ow)
        _im2col_into(xs, kh, kw, stride, padding, oh, ow, cs)
        out = _matmul(weights, cs)                                # (K, ns*P)
        _kmajor_to_nchw(out, b, ns, k, oh, ow, y[start:start + ns])
    return y


def conv2d_backward(grad_y, x, W, stride, padding):
    """grad_y: (N, K, OH, OW) -> (grad_x (N, C, H, W), grad_W (K, C, kh, kw), grad_b (K,)).

    Per chunk: grad_y to (K, n*P), columns rebuilt by im2col,
    ``grad_W += gy @ cols.T`` and ``grad_x = col2im(W.T @ gy)``, both on cuBLAS.
    """
    cp = _cp()
    n, c, h, w = x.shape
    k, _, kh, kw = W.shape
    oh, ow = grad_y.shape[2:]
    weights = W.reshape(k, c * kh * kw)
    grad_x = cp.empty_like(x)
    grad_weights = None
    chunk = _conv_chunk(c, kh, kw, oh, ow, x.itemsize)
    cols = cp.empty((c * kh * kw, min(chunk, n) * oh * ow), dtype=x.dtype)
    for start in range(0, n, chunk):
        xs = x[start:start + chunk]
        ns = xs.shape[0]
        cs = _leading(cols, ns * oh * ow)
        _im2col_into(xs, kh, kw, stride, padding, oh, ow, cs)
        gy = _nchw_to_kmajor(grad_y[start:start + ns])              # (K, ns*P)
        part = _matmul(gy, cs.T)                                    # (K, C*kh*kw)
        if grad_weights is None:
            grad_weights = part
        else:
            grad_weights += part
        grad_cols = _matmul(weights.T, gy)                          # (C*kh*kw, ns*P)
        grad_x[start:start + ns] = col2im(grad_cols, xs.shape, kh, kw, stride, padding)
    grad_b = grad_y.sum(axis=(0, 2, 3))
    return grad_x, grad_weights.reshape(W.shape), grad_b


# --- pooling ------------------------------------------------------------------------

def maxpool2d_forward(x, kh, kw, stride):
    """x: (N, C, H, W) -> (y, argmax int64 flat ``h*W + w`` in its plane), both (N, C, OH, OW)."""
    cp = _cp()
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride[0], 0)
    ow = conv_output_size(w, kw, stride[1], 0)
    y = cp.empty((n, c, oh, ow), dtype=x.dtype)
    argmax = cp.empty((n, c, oh, ow), dtype=cp.int64)
    total = y.size
    _kernel("maxpool_forward_kernel", x.dtype)(
        (_blocks(total),), (_THREADS,),
        (x, y, argmax, np.int64(total), _i(h), _i(w), _i(kh), _i(kw),
         _i(stride[0]), _i(stride[1]), _i(oh), _i(ow)))
    return y, argmax


def maxpool2d_backward(grad_y, argmax, x_shape):
    """grad_y, argmax: (N, C, OH, OW) -> grad_x (N, C, H, W): each output adds its
    gradient to its argmax pixel.

    The window geometry is not passed, so this is a scatter with atomicAdd over
    a zeroed grad_x. With non-overlapping windows (stride >= kernel, the usual
    case) every pixel receives at most one value and the result is exact and
    deterministic; with overlapping windows the few values landing on one pixel
    are summed in an unspecified order (float round-off only). Argmax entries
    outside the plane are ignored rather than written out of bounds.
    """
    cp = _cp()
    grad_x = cp.zeros(x_shape, dtype=grad_y.dtype)
    total = grad_y.size
    _kernel("maxpool_backward_kernel", grad_y.dtype)(
        (_blocks(total),), (_THREADS,),
        (grad_y, argmax, grad_x, np.int64(total),
         np.int64(grad_y.shape[2] * grad_y.shape[3]), np.int64(x_shape[2] * x_shape[3])))
    return grad_x


# --- elementwise ----------------------------------------------------------------------

def _ew(name, in_params, out_params, body):
    """A cached ``cupy.ElementwiseKernel``."""
    kern = _elementwise.get(name)
    if kern is None:
        kern = _cp().ElementwiseKernel(in_params, out_params, body, f"fastnn_{name}")
        _elementwise[name] = kern
    return kern


def relu_forward(x):
    """y = max(x, 0) (NaN stays NaN, as np.maximum)."""
    return _ew("relu_fwd", "T x", "T y", "y = (x > (T)0 || x != x) ? x : (T)0")(x)


def relu_backward(grad_y, y):
    """grad_x = grad_y where y > 0, else 0."""
    return _ew("relu_bwd", "T gy, T y", "T gx", "gx = y > (T)0 ? gy : (T)0")(grad_y, y)


# --- dense ------------------------------------------------------------------------------

def dense_forward(x, W, b):
    """x: (N, I), W: (I, O), b: (O,) or None -> y = x @ W + b (cuBLAS, then one bias pass)."""
    y = _matmul(x, W)
    if b is not None:
        y += b
    return y


def dense_backward(grad_y, x, W):
    """-> (grad_y @ W.T, x.T @ grad_y, grad_y.sum(0)), three cuBLAS/reduction launches."""
    return _matmul(grad_y, W.T), _matmul(x.T, grad_y), grad_y.sum(axis=0)


# --- loss -------------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels):
    """logits (N, C), labels int64 (N,) or (N, C) of logits' dtype
    -> (loss: 0-d array of logits' dtype, grad: (softmax - onehot) / N). One launch."""
    cp = _cp()
    n, c = logits.shape
    grad = cp.empty_like(logits)
    loss = cp.empty((), dtype=logits.dtype)
    onehot = labels.ndim == 2
    threads = int(min(1024, max(32, 32 * n)))
    _kernel("softmax_xent_kernel", logits.dtype)(
        (1,), (threads,),
        (logits, logits if onehot else labels, labels if onehot else logits, grad, loss,
         _i(n), _i(c), _i(onehot)))
    return loss, grad


# --- fused elementwise pieces for layers (dropout, BatchNorm) ---------------------------

def dropout_forward(x, p, seed):
    """Inverted dropout in one pass: ``mask = (u >= p) / (1 - p)``, ``y = x * mask``.

    ``u`` is a counter-based uniform of (seed, element index), so the same seed
    gives the same mask. Returns ``(y, mask)``, both shaped and typed like x.
    """
    cp = _cp()
    y = cp.empty_like(x)
    mask = cp.empty_like(x)
    total = x.size
    _kernel("dropout_kernel", x.dtype)(
        (_blocks(total),), (_THREADS,),
        (x, y, mask, np.int64(total), np.float64(p), _scalar(1.0 / (1.0 - p), x.dtype),
         np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)))
    return y, mask


def dropout_backward(grad_y, mask):
    """grad_x = grad_y * mask (the scaled mask returned by ``dropout_forward``)."""
    return grad_y * mask


def _channel_view(x):
    """(N, C) or (N, C, ...) -> (N, C, S) sizes."""
    n, c = x.shape[:2]
    s = int(np.prod(x.shape[2:], dtype=np.int64)) if x.ndim > 2 else 1
    return n, c, s


def batchnorm_forward(x, gamma, beta, eps, mean=None, var=None):
    """x: (N, C) or (N, C, H, W); gamma, beta: (C,).

    With ``mean``/``var`` None (training) the per-channel batch mean and biased
    variance are computed in one kernel (two passes per channel, accumulated
    in double); otherwise the given (running) statistics are used.
    Returns ``(y, x_hat, mean, var, inv_std)``; backward needs x_hat and inv_std.
    """
    cp = _cp()
    n, c, s = _channel_view(x)
    if mean is None:
        mean = cp.empty(c, dtype=x.dtype)
        var = cp.empty(c, dtype=x.dtype)
        _kernel("channel_mean_var_kernel", x.dtype)(
            (c,), (_THREADS,), (x, mean, var, _i(n), _i(c), _i(s)))
    inv_std = 1 / cp.sqrt(var + _scalar(eps, x.dtype))
    x_hat = cp.empty_like(x)
    y = cp.empty_like(x)
    total = x.size
    _kernel("batchnorm_apply_kernel", x.dtype)(
        (_blocks(total),), (_THREADS,),
        (x, mean, inv_std, gamma, beta, x_hat, y, np.int64(total), _i(c), _i(s)))
    return y, x_hat, mean, var, inv_std


def batchnorm_backward(grad_y, x_hat, gamma, inv_std):
    """Training-mode BatchNorm backward -> (grad_x, grad_gamma, grad_beta).

    One reduction kernel gives per channel sum(grad_y) (= grad_beta) and
    sum(grad_y * x_hat) (= grad_gamma); one elementwise pass gives grad_x.
    """
    cp = _cp()
    n, c, s = _channel_view(grad_y)
    grad_beta = cp.empty(c, dtype=grad_y.dtype)
    grad_gamma = cp.empty(c, dtype=grad_y.dtype)
    _kernel("channel_grad_sums_kernel", grad_y.dtype)(
        (c,), (_THREADS,), (grad_y, x_hat, grad_beta, grad_gamma, _i(n), _i(c), _i(s)))
    grad_x = cp.empty_like(grad_y)
    total = grad_y.size
    _kernel("batchnorm_grad_x_kernel", grad_y.dtype)(
        (_blocks(total),), (_THREADS,),
        (grad_y, x_hat, gamma, inv_std, grad_beta, grad_gamma, grad_x, np.int64(total),
         _i(c), _i(s), _scalar(1.0 / (n * s), grad_y.dtype)))
    return grad_x, grad_gamma, grad_beta
