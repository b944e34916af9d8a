"""CUDA kernels through CuPy: the same internal functions as ``_reference``.

``fastnn.kernels`` validates the arguments and calls these for CuPy arrays
(C-contiguous, float32 or float64; ``stride``/``padding`` as ``(h, w)``).
Hand-written kernels live in one CUDA C++ source (``_SOURCE`` below, compiled
once per process by NVRTC through ``cupy.RawModule``, templated on float and
double); GEMMs go to cuBLAS (strided-batched GEMM called directly, which
costs a few microseconds of Python instead of ``cupy.matmul``'s tens).

No Python loop runs over the batch. A convolution is, for the whole batch
(cut into a few chunks only when the columns would pass
``CONV_WORKSPACE_BYTES``): im2col into batch-major columns (N, C*kh*kw, OH*OW),
then one strided-batched GEMM per product, whose output is already NCHW:

    forward   y[n]      = W (K, C*kh*kw) @ cols[n]        (onto y pre-filled with the bias)
    backward  grad_W    = sum_n grad_y[n] @ cols[n].T     (batched GEMM, then a
                                                           fixed-order sum over n)
              grad_x[n] = col2im(W.T @ grad_y[n])         (batched GEMM, gather), or
                          for stride 1: W flipped (C, K*kh*kw) @ im2col(grad_y)[n]
              grad_b    = per-channel sum of grad_y

Reductions are gathers (one thread owns one output and sums its inputs in a
fixed order): col2im, grad_W, grad_b, the loss and the BatchNorm sums are
race-free and reproducible. The max-pool backward alone scatters with
atomicAdd (it is not told the window geometry); it is exact whenever windows
do not overlap (each pixel then receives at most one value).

This module imports without CuPy; it needs CuPy only when a kernel runs, and a
kernel only runs for CuPy arrays.

Precision: float32 GEMMs are full float32 by default (results agree with the
CPU to float32 round-off). ``fastnn.backend.allow_tf32(True)`` (``set_tf32``
here, or ``FASTNN_TF32=1`` in the environment) lets cuBLAS use TF32 tensor
cores for float32 GEMMs, as PyTorch's cuDNN convolutions do by default (about
1e-3 relative error).

Besides the kernels of ``fastnn.kernels``, fused one-launch pieces for the
layers and optimizers: ``sgd_step`` / ``adam_step`` (used by ``fastnn.optim``
on CuPy arrays), ``dropout_forward`` and ``batchnorm_forward`` / ``_backward``.
"""
import os

import numpy as np

from ._reference import conv_output_size
# average pooling (the reference's kh*kw strided sums: slices and in-place adds) and the
# leaky ReLU (np.where, dispatched to cupy.where): the reference runs on CuPy arrays as it is
from ._reference import (avgpool2d_backward, avgpool2d_forward, leaky_relu_backward,
                         leaky_relu_forward)

__all__ = ["im2col", "col2im", "maxpool2d_forward", "maxpool2d_backward",
           "avgpool2d_forward", "avgpool2d_backward", "leaky_relu_forward", "leaky_relu_backward",
           "relu_forward", "relu_backward", "dense_forward", "dense_backward",
           "softmax_cross_entropy", "conv2d_forward", "conv2d_backward",
           "dropout_forward", "dropout_backward", "batchnorm_forward",
           "batchnorm_backward", "sgd_step", "adam_step", "set_tf32", "tf32_enabled"]

# Workspace of one conv chunk (columns + per-sample weight-gradient partials)
# stays under this many bytes. GPU memory is large: a LeNet or CIFAR batch is
# one chunk; only huge batches are cut.
CONV_WORKSPACE_BYTES = 1 << 30

_THREADS = 256
_GRID_YZ = 65535            # CUDA's limit on gridDim.y / gridDim.z: kernels loop past it

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

// Grid convention of the image kernels: x covers a plane's positions (OH*OW or
// H*W, 32-bit), y the channels, z the samples (y and z loop past 65535). No
// 64-bit division anywhere: an index costs one 32-bit divide by the width.

// im2col. Row r = c*KH*KW + i*KW + j, position p = oh*OW + ow of sample n goes to
//   batch_major: cols[(n*CKK + r)*P + p]     (N, C*KH*KW, P): per-sample GEMMs
//   otherwise:   cols[r*N*P + n*P + p]       (C*KH*KW, N*P): the API layout
// One thread per (n, c, p) writes KH*KW entries, coalesced along p.
template <typename T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ cols,
        int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW,
        int OH, int OW, int batch_major) {
    const int P = OH * OW;
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    const int oh = p / OW, ow = p - oh * OW;
    const int KK = KH * KW;
    const i64 row_stride = batch_major ? (i64)P : (i64)N * P;
    for (int n = blockIdx.z; n < N; n += gridDim.z) {
        for (int c = blockIdx.y; c < C; c += gridDim.y) {
            const T* plane = x + ((i64)n * C + c) * H * W;
            T* out = cols + (batch_major ? ((i64)n * C * KK + (i64)c * KK) * P + p
                                         : (i64)c * KK * row_stride + (i64)n * P + p);
            for (int i = 0; i < KH; ++i) {
                const int h = oh * SH - PH + i;
                const bool row_in = h >= 0 && h < H;
                for (int j = 0; j < KW; ++j) {
                    const int w = ow * SW - PW + j;
                    *out = (row_in && w >= 0 && w < W) ? plane[h * W + w] : (T)0;
                    out += row_stride;
                }
            }
        }
    }
}

// col2im, the adjoint: one thread per input pixel (n, c, h, w) gathers every
// column entry copied from it, in a fixed order (no atomics). Window offsets i
// with (h + PH - i) % SH == 0 and 0 <= (h + PH - i) / SH < OH are stepped
// directly: two divisions per axis per pixel.
template <typename T>
__global__ void col2im_kernel(const T* __restrict__ cols, T* __restrict__ dx,
        int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW,
        int OH, int OW, int batch_major) {
    const int hw = blockIdx.x * blockDim.x + threadIdx.x;
    if (hw >= H * W) return;
    const int h = hw / W, w = hw - (hw / W) * W;
    const int P = OH * OW, KK = KH * KW;
    const i64 row_stride = batch_major ? (i64)P : (i64)N * P;
    const int hp = h + PH, wp = w + PW;
    int i0 = max(0, hp - (OH - 1) * SH);
    i0 += (hp - i0) % SH;
    const int i1 = min(KH - 1, hp);
    int j0 = max(0, wp - (OW - 1) * SW);
    j0 += (wp - j0) % SW;
    const int j1 = min(KW - 1, wp);
    for (int n = blockIdx.z; n < N; n += gridDim.z) {
        for (int c = blockIdx.y; c < C; c += gridDim.y) {
            const T* base = cols + (batch_major ? ((i64)n * C * KK + (i64)c * KK) * P
                                                : (i64)c * KK * row_stride + (i64)n * P);
            T sum = 0;
            // unrolled so that several taps' loads are in flight at once
            #pragma unroll 3
            for (int i = i0, oh = (hp - i0) / SH; i <= i1; i += SH, --oh) {
                #pragma unroll 3
                for (int j = j0, ow = (wp - j0) / SW; j <= j1; j += SW, --ow) {
                    sum += base[(i64)(i * KW + j) * row_stride + oh * OW + ow];
                }
            }
            dx[((i64)n * C + c) * H * W + hw] = sum;
        }
    }
}

// y (N, K, P) = bias[k]: the GEMM then accumulates into it (beta = 1), so the
// bias costs one write-only pass instead of a read-modify-write.
template <typename T>
__global__ void bias_nkp_kernel(T* __restrict__ y, const T* __restrict__ bias, int N, int K, int P) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    for (int n = blockIdx.z; n < N; n += gridDim.z)
        for (int k = blockIdx.y; k < K; k += gridDim.y)
            y[((i64)n * K + k) * P + p] = bias[k];
}

// y (R, M) = bias[j], for the same reason
template <typename T>
__global__ void bias_rows_kernel(T* __restrict__ y, const T* __restrict__ bias, int R, int M) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= M) return;
    const T b = bias[j];
    for (int r = blockIdx.y; r < R; r += gridDim.y) y[(i64)r * M + j] = b;
}

// dst[j] (+)= sum_r src[r*M + j]: column sums in row order (dense grad_b, the
// per-sample partials of a conv weight gradient, conv grad_b). Block (32, 8):
// 32 columns, 8 row lanes, combined in a fixed order.
template <typename T>
__global__ void sum_rows_kernel(const T* __restrict__ src, T* __restrict__ dst, int R, i64 M,
        int accumulate) {
    __shared__ T part[8][33];
    const i64 j = blockIdx.x * (i64)32 + threadIdx.x;
    T acc = 0;
    if (j < M)
        for (int r = threadIdx.y; r < R; r += 8) acc += src[(i64)r * M + j];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < M) {
        T total = 0;
        for (int y = 0; y < 8; ++y) total += part[y][threadIdx.x];
        dst[j] = accumulate ? dst[j] + total : total;
    }
}

// out[r] = sum of row r of src (R, L): one block per row, fixed-order reduction.
template <typename T>
__global__ void row_sum_kernel(const T* __restrict__ src, T* __restrict__ out, int R, int L) {
    __shared__ T part[32];
    for (int r = blockIdx.x; r < R; r += gridDim.x) {
        const T* row = src + (i64)r * L;
        T acc = 0;
        for (int s = threadIdx.x; s < L; s += blockDim.x) acc += row[s];
        acc = warp_sum(acc);
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            T total = 0;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += part[w];
            out[r] = total;
        }
        __syncthreads();
    }
}

// SGD (PyTorch's rule, dampening 0), fused: one pass per parameter.
//   g += wd * p + l1 * sign(p);  buf = first ? g : mom * buf + g;
//   g = nesterov ? g + mom * buf : buf;  p -= lr * g
template <typename T>
__global__ void sgd_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
        i64 total, T lr, T mom, T wd, T l1, int use_mom, int nesterov, int first) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const T pv = p[i];
        T gv = g[i];
        if (wd != (T)0) gv = pv * wd + gv;
        if (l1 != (T)0) gv += l1 * (pv > (T)0 ? (T)1 : (pv < (T)0 ? (T)-1 : (T)0));
        if (use_mom) {
            const T b = first ? gv : buf[i] * mom + gv;
            buf[i] = b;
            gv = nesterov ? gv + mom * b : b;
        }
        p[i] = pv - lr * gv;
    }
}

// Adam (PyTorch's rule, L2 weight decay added to the gradient), fused:
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//   p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
template <typename T>
__global__ void adam_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
        T* __restrict__ v, i64 total, T b1, T one_minus_b1, T b2, T one_minus_b2,
        T inv_sqrt_bc2, T eps, T step_size, T wd) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const T pv = p[i];
        T gv = g[i];
        if (wd != (T)0) gv = gv + wd * pv;
        const T mv = m[i] * b1 + gv * one_minus_b1;
        const T vv = v[i] * b2 + (gv * gv) * one_minus_b2;
        m[i] = mv;
        v[i] = vv;
        p[i] = pv - (mv / (sqrt(vv) * inv_sqrt_bc2 + eps)) * step_size;
    }
}

// ReLU: each thread takes 4 elements a grid-stride apart per step, so four
// independent coalesced loads are in flight before the first use; the loop
// after it takes the remainder.
template <typename T>
__device__ __forceinline__ T relu_of(T v) { return (v > (T)0 || v != v) ? v : (T)0; }  // NaN stays NaN

template <typename T>
__global__ void relu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, i64 total) {
    const i64 s = (i64)blockDim.x * gridDim.x;
    i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    for (; i + 3 * s < total; i += 4 * s) {
        const T a = x[i], b = x[i + s], c = x[i + 2 * s], d = x[i + 3 * s];
        y[i] = relu_of(a); y[i + s] = relu_of(b); y[i + 2 * s] = relu_of(c); y[i + 3 * s] = relu_of(d);
    }
    for (; i < total; i += s) y[i] = relu_of(x[i]);
}

template <typename T>
__global__ void relu_backward_kernel(const T* __restrict__ gy, const T* __restrict__ y,
        T* __restrict__ gx, i64 total) {
    const i64 s = (i64)blockDim.x * gridDim.x;
    i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    for (; i + 3 * s < total; i += 4 * s) {
        const T y0 = y[i], y1 = y[i + s], y2 = y[i + 2 * s], y3 = y[i + 3 * s];
        const T g0 = gy[i], g1 = gy[i + s], g2 = gy[i + 2 * s], g3 = gy[i + 3 * s];
        gx[i] = y0 > (T)0 ? g0 : (T)0;
        gx[i + s] = y1 > (T)0 ? g1 : (T)0;
        gx[i + 2 * s] = y2 > (T)0 ? g2 : (T)0;
        gx[i + 3 * s] = y3 > (T)0 ? g3 : (T)0;
    }
    for (; i < total; i += s) gx[i] = y[i] > (T)0 ? gy[i] : (T)0;
}

// Max pooling: one thread per output; the first maximum in row-major window
// order wins (NaN counts as the maximum, as NumPy's argmax).
template <typename T>
__global__ void maxpool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
        i64* __restrict__ argmax, int planes, int H, int W, int KH, int KW,
        int SH, int SW, int OH, int OW) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= OH * OW) return;
    const int oh = p / OW, ow = p - (p / OW) * OW;
    const int h0 = oh * SH, w0 = ow * SW;
    for (int plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const T* xp = x + (i64)plane * H * W;
        int best_pos = h0 * W + w0;
        T best = xp[best_pos];
        for (int i = 0; i < KH; ++i) {
            for (int j = 0; j < KW; ++j) {
                const int pos = (h0 + i) * W + w0 + j;
                const T v = xp[pos];
                if (v > best || (v != v && best == best)) { best = v; best_pos = pos; }
            }
        }
        const i64 o = (i64)plane * OH * OW + p;
        y[o] = best;
        argmax[o] = best_pos;
    }
}

// Max-pool backward: one thread per output adds grad_y to its argmax pixel.
// Out-of-plane argmax entries are skipped rather than written out of bounds.
template <typename T>
__global__ void maxpool_backward_kernel(const T* __restrict__ grad_y,
        const i64* __restrict__ argmax, T* __restrict__ grad_x, int planes, int out_plane,
        int in_plane) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= out_plane) return;
    for (int plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const i64 o = (i64)plane * out_plane + p;
        const i64 a = argmax[o];
        if (a >= 0 && a < in_plane) atomicAdd(grad_x + (i64)plane * in_plane + a, grad_y[o]);
    }
}

// Softmax cross-entropy in one launch, one block: each warp takes rows in
// turn, the per-warp losses are summed in a fixed order (deterministic).
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
    const double count = (double)N * S;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    double acc = 0;
    for (int n = 0; n < N; ++n)
        for (int s = threadIdx.x; s < S; s += blockDim.x) acc += (double)x[((i64)n * C + c) * S + s];
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    double mu = 0;
    for (int w = 0; w < warps; ++w) mu += part[w];
    mu /= count;
    __syncthreads();
    acc = 0;
    for (int n = 0; n < N; ++n)
        for (int s = threadIdx.x; s < S; s += blockDim.x) {
            const double d = (double)x[((i64)n * C + c) * S + s] - mu;
            acc += d * d;
        }
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double v = 0;
        for (int w = 0; w < warps; ++w) v += part[w];
        mean[c] = (T)mu;
        var[c] = (T)(v / count);
    }
}

// BatchNorm backward reductions: per channel, sum(grad_y) and sum(grad_y * x_hat).
template <typename T>
__global__ void channel_grad_sums_kernel(const T* __restrict__ grad_y, const T* __restrict__ x_hat,
        T* __restrict__ sum_gy, T* __restrict__ sum_gy_xhat, int N, int C, int S) {
    __shared__ double part_a[32];
    __shared__ double part_b[32];
    const int c = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    double a = 0, b = 0;
    for (int n = 0; n < N; ++n)
        for (int s = threadIdx.x; s < S; s += blockDim.x) {
            const i64 at = ((i64)n * C + c) * S + s;
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

// BatchNorm elementwise passes over x viewed as (N, C, S); grid as the image kernels.
template <typename T>
__global__ void batchnorm_apply_kernel(const T* __restrict__ x, const T* __restrict__ mean,
        const T* __restrict__ inv_std, const T* __restrict__ gamma, const T* __restrict__ beta,
        T* __restrict__ x_hat, T* __restrict__ y, int N, int C, int S) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    for (int n = blockIdx.z; n < N; n += gridDim.z)
        for (int c = blockIdx.y; c < C; c += gridDim.y) {
            const i64 idx = ((i64)n * C + c) * S + s;
            const T xh = (x[idx] - mean[c]) * inv_std[c];
            x_hat[idx] = xh;
            y[idx] = gamma[c] * xh + beta[c];
        }
}

// grad_x = gamma * inv_std * (grad_y - mean(grad_y) - x_hat * mean(grad_y * x_hat))
template <typename T>
__global__ void batchnorm_grad_x_kernel(const T* __restrict__ grad_y, const T* __restrict__ x_hat,
        const T* __restrict__ gamma, const T* __restrict__ inv_std, const T* __restrict__ sum_gy,
        const T* __restrict__ sum_gy_xhat, T* __restrict__ grad_x, int N, int C, int S,
        T inv_count) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    for (int n = blockIdx.z; n < N; n += gridDim.z)
        for (int c = blockIdx.y; c < C; c += gridDim.y) {
            const i64 idx = ((i64)n * C + c) * S + s;
            grad_x[idx] = gamma[c] * inv_std[c] *
                (grad_y[idx] - sum_gy[c] * inv_count - x_hat[idx] * sum_gy_xhat[c] * inv_count);
        }
}
"""

_KERNELS = ("im2col_kernel", "col2im_kernel", "bias_nkp_kernel", "bias_rows_kernel",
            "sum_rows_kernel", "row_sum_kernel", "sgd_kernel", "adam_kernel",
            "relu_forward_kernel",
            "relu_backward_kernel", "maxpool_forward_kernel", "maxpool_backward_kernel",
            "softmax_xent_kernel", "dropout_kernel", "channel_mean_var_kernel",
            "channel_grad_sums_kernel", "batchnorm_apply_kernel", "batchnorm_grad_x_kernel")
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_module = None
_functions = {}
_tf32 = os.environ.get("FASTNN_TF32", "0") not in ("", "0")


def _cp():
    import cupy
    return cupy


def _kernel(name, dtype):
    """The compiled ``name<T>`` for ``dtype`` (the module is built on first use)."""
    fn = _functions.get((name, dtype))
    if fn is None:
        global _module
        if _module is None:
            names = [f"{k}<{t}>" for k in _KERNELS for t in ("float", "double")]
            _module = _cp().RawModule(code=_SOURCE, name_expressions=names)
        fn = _module.get_function(f"{name}<{_CTYPE[np.dtype(dtype)]}>")
        _functions[(name, dtype)] = fn
    return fn


def _blocks(total, threads=_THREADS):
    """Blocks for ``total`` items (grid-stride kernels cover the rest past the cap)."""
    return min((total + threads - 1) // threads, 1 << 20) or 1


def _plane_grid(positions, channels=1, samples=1):
    """(x, y, z) grid for the image kernels: x covers positions, y channels, z samples."""
    return (_blocks(positions), min(channels, _GRID_YZ), min(samples, _GRID_YZ))


_i = np.int32


def _c(a):
    """``a`` C-contiguous (None passes): the fused pieces that layers call directly
    index raw memory, so a strided view must become its contiguous copy."""
    return a if a is None or a.flags.c_contiguous else _cp().ascontiguousarray(a)


# --- GEMM: cuBLAS strided-batched, called directly -----------------------------------

def set_tf32(enabled):
    """Let float32 GEMMs use TF32 tensor cores (PyTorch's cuDNN default) or not (default)."""
    global _tf32
    _tf32 = bool(enabled)


def tf32_enabled():
    """Whether float32 GEMMs may use TF32 tensor cores."""
    return _tf32


_blas = None


def _cublas():
    """cuBLAS binding, constants and host scalars, looked up once."""
    global _blas
    if _blas is None:
        from cupy_backends.cuda.libs import cublas
        from cupy_backends.cuda.api import runtime
        c = cublas
        _blas = {
            "lib": cublas,
            "N": getattr(c, "CUBLAS_OP_N", 0), "T": getattr(c, "CUBLAS_OP_T", 1),
            np.dtype(np.float32): (getattr(runtime, "CUDA_R_32F", 0),
                                   getattr(c, "CUBLAS_COMPUTE_32F", 68)),
            np.dtype(np.float64): (getattr(runtime, "CUDA_R_64F", 1),
                                   getattr(c, "CUBLAS_COMPUTE_64F", 70)),
            "tf32": getattr(c, "CUBLAS_COMPUTE_32F_FAST_TF32", 77),
            "algo": getattr(c, "CUBLAS_GEMM_DEFAULT", -1),
        }
        # alpha / beta live on the host (cuBLAS's default pointer mode); the arrays
        # are kept alive here and their addresses taken once
        arrays = {(dt, v): np.array(v, dtype=dt) for dt in (np.float32, np.float64)
                  for v in (0.0, 1.0)}
        _blas["scalar_arrays"] = arrays
        _blas["scalars"] = {key: a.ctypes.data for key, a in arrays.items()}
    return _blas


def _gemm(a, b, out, m, n, k, trans_a=False, trans_b=False, batch=1,
          stride_a=0, stride_b=0, stride_out=0, accumulate=False):
    """Row-major ``out[i] (m, n) (+)= op(a[i]) (m, k) @ op(b[i]) (k, n)`` for i < batch.

    ``a``, ``b``, ``out`` are C-contiguous CuPy arrays; matrix i of each starts
    ``stride_*`` elements after matrix i-1 (0 repeats one matrix for the whole
    batch). ``trans_a``: ``a`` is stored (k, m); ``trans_b``: ``b`` is stored
    (n, k). cuBLAS is column-major, so this computes ``out.T = op(b).T op(a).T``.
    """
    blas = _cublas()
    lib = blas["lib"]
    dtype = out.dtype
    data_type, compute = blas[dtype]
    if _tf32 and dtype == np.float32:
        compute = blas["tf32"]
    scalars = blas["scalars"]
    handle = _cp().cuda.device.get_cublas_handle()
    lib.setStream(handle, _cp().cuda.get_current_stream().ptr)
    lib.gemmStridedBatchedEx(
        handle, blas["T"] if trans_b else blas["N"], blas["T"] if trans_a else blas["N"],
        n, m, k, scalars[(dtype.type, 1.0)],
        b.data.ptr, data_type, k if trans_b else n, stride_b,
        a.data.ptr, data_type, m if trans_a else k, stride_a,
        scalars[(dtype.type, 1.0 if accumulate else 0.0)],
        out.data.ptr, data_type, n, stride_out,
        batch, compute, blas["algo"])
    return out


def _sum_rows(src, rows, width, out, accumulate=False):
    """out (width,) (+)= src viewed as (rows, width) summed over rows, in row order."""
    _kernel("sum_rows_kernel", src.dtype)(
        ((width + 31) // 32,), (32, 8), (src, out, _i(rows), np.int64(width), _i(accumulate)))
    return out


def _channel_sums(x, n, c, s, out):
    """out (c,) = x viewed as (n, c, s) summed over n and s: row sums, then column sums."""
    row_sums = _cp().empty(n * c, dtype=x.dtype)
    _kernel("row_sum_kernel", x.dtype)((min(n * c, 1 << 20),), (128,),
                                       (x, row_sums, _i(n * c), _i(s)))
    return _sum_rows(row_sums, n, c, out)


# --- im2col / col2im ------------------------------------------------------------------

def _im2col_into(x, kh, kw, stride, padding, oh, ow, cols, batch_major):
    n, c, h, w = x.shape
    _kernel("im2col_kernel", x.dtype)(
        _plane_grid(oh * ow, c, n), (_THREADS,),
        (x, cols, _i(n), _i(c), _i(h), _i(w), _i(kh), _i(kw), _i(stride[0]), _i(stride[1]),
         _i(padding[0]), _i(padding[1]), _i(oh), _i(ow), _i(batch_major)))
    return cols


def _col2im_into(cols, dx, kh, kw, stride, padding, oh, ow, batch_major):
    n, c, h, w = dx.shape
    _kernel("col2im_kernel", cols.dtype)(
        _plane_grid(h * w, c, n), (_THREADS,),
        (cols, dx, _i(n), _i(c), _i(h), _i(w), _i(kh), _i(kw), _i(stride[0]), _i(stride[1]),
         _i(padding[0]), _i(padding[1]), _i(oh), _i(ow), _i(batch_major)))
    return dx


def im2col(x, kh, kw, stride, padding):
    """x: (N, C, H, W) -> cols: (C*kh*kw, N*OH*OW), the reference's layout."""
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    cols = _cp().empty((c * kh * kw, n * oh * ow), dtype=x.dtype)
    return _im2col_into(x, kh, kw, stride, padding, oh, ow, cols, False)


def col2im(cols, x_shape, kh, kw, stride, padding):
    """cols: (C*kh*kw, N*OH*OW) -> dx: (N, C, H, W), overlaps summed (gather, no atomics)."""
    n, c, h, w = x_shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    dx = _cp().empty(x_shape, dtype=cols.dtype)
    return _col2im_into(cols, dx, kh, kw, stride, padding, oh, ow, False)


# --- convolution ------------------------------------------------------------------------

def _conv_chunk(c, k, kh, kw, oh, ow, itemsize):
    """Samples per chunk: columns and weight-gradient partials within the workspace."""
    per_sample = (c * kh * kw * oh * ow + k * c * kh * kw) * itemsize
    return max(1, CONV_WORKSPACE_BYTES // per_sample)


def conv2d_forward(x, W, b, stride, padding):
    """x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> y: (N, K, OH, OW).

    Per chunk of the batch (the whole batch unless its columns pass the
    workspace): im2col into (n, C*kh*kw, P) columns, one strided-batched GEMM
    ``y[i] = W (K, C*kh*kw) @ cols[i]`` writing NCHW directly onto y filled
    with the bias.
    """
    cp = _cp()
    n, c, h, w = x.shape
    k, _, kh, kw = W.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    p, ckk = oh * ow, c * kh * kw
    y = cp.empty((n, k, oh, ow), dtype=x.dtype)
    chunk = min(n, _conv_chunk(c, k, kh, kw, oh, ow, x.itemsize))
    cols = cp.empty((chunk, ckk, p), dtype=x.dtype)
    if b is not None:
        _kernel("bias_nkp_kernel", x.dtype)(_plane_grid(p, k, n), (_THREADS,),
                                            (y, b, _i(n), _i(k), _i(p)))
    for start in range(0, n, chunk):
        ns = min(chunk, n - start)
        _im2col_into(x[start:start + ns], kh, kw, stride, padding, oh, ow, cols, True)
        _gemm(W, cols, y[start:start + ns], k, p, ckk, batch=ns,
              stride_a=0, stride_b=ckk * p, stride_out=k * p, accumulate=b is not None)
    return y


def conv2d_backward(grad_y, x, W, stride, padding, need_grad_x=True):
    """grad_y: (N, K, OH, OW) -> (grad_x (N, C, H, W) or None, grad_W (K, C, kh, kw), grad_b (K,)).

    Per chunk: columns rebuilt by im2col; per-sample partials
    ``grad_y[i] @ cols[i].T`` (one batched GEMM) summed over the samples in
    order. grad_x, for stride 1 when it needs no more columns than the
    gather would read (K*H*W <= C*OH*OW, padding < kernel), is the stride-1
    correlation of grad_y with the flipped, transposed kernel: im2col of
    grad_y and one batched GEMM writing NCHW (an expansion pass is cheaper
    than a gather); otherwise ``col2im(W.T @ grad_y[i])`` (batched GEMM, gather).
    ``need_grad_x=False`` (a network's first layer) skips grad_x and returns None.
    """
    cp = _cp()
    n, c, h, w = x.shape
    k, _, kh, kw = W.shape
    oh, ow = grad_y.shape[2:]
    p, ckk, kk = oh * ow, c * kh * kw, kh * kw
    dtype = x.dtype
    transposed = (need_grad_x and tuple(stride) == (1, 1) and padding[0] < kh
                  and padding[1] < kw and k * h * w <= c * p)
    col_elems = max(ckk * p, k * kk * h * w) if transposed else ckk * p
    per_sample = (col_elems + k * ckk) * x.itemsize
    chunk = min(n, max(1, CONV_WORKSPACE_BYTES // per_sample))
    grad_x = cp.empty(x.shape, dtype=dtype) if need_grad_x else None
    grad_W = cp.empty(W.shape, dtype=dtype)
    grad_b = cp.empty(k, dtype=dtype)
    workspace = cp.empty(chunk * col_elems, dtype=dtype)
    partials = cp.empty((chunk, k, ckk), dtype=dtype) if n > 1 else grad_W
    if transposed:
        w_flipped = cp.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, K, kh, kw)
        pad_t = (kh - 1 - padding[0], kw - 1 - padding[1])
    for start in range(0, n, chunk):
        ns = min(chunk, n - start)
        xs, gys = x[start:start + ns], grad_y[start:start + ns]
        cols = workspace[:ns * ckk * p]
        _im2col_into(xs, kh, kw, stride, padding, oh, ow, cols, True)
        _gemm(gys, cols, partials, k, ckk, p, trans_b=True, batch=ns,
              stride_a=k * p, stride_b=ckk * p, stride_out=k * ckk)
        if partials is not grad_W:
            _sum_rows(partials, ns, k * ckk, grad_W, accumulate=start > 0)
        # the workspace is reused below: the columns of x are no longer needed
        if not need_grad_x:
            continue
        if transposed:
            grad_cols = workspace[:ns * k * kk * h * w]
            _im2col_into(gys, kh, kw, (1, 1), pad_t, h, w, grad_cols, True)
            _gemm(w_flipped, grad_cols, grad_x[start:start + ns], c, h * w, k * kk, batch=ns,
                  stride_a=0, stride_b=k * kk * h * w, stride_out=c * h * w)
        else:
            _gemm(W, gys, cols, ckk, p, k, trans_a=True, batch=ns,
                  stride_a=0, stride_b=k * p, stride_out=ckk * p)
            _col2im_into(cols, grad_x[start:start + ns], kh, kw, stride, padding, oh, ow, True)
    _channel_sums(grad_y, n, k, p, grad_b)
    return grad_x, grad_W, grad_b


# --- pooling ------------------------------------------------------------------------

def maxpool2d_forward(x, kh, kw, stride):
    """x: (N, C, H, W) -> (y, argmax int64 flat ``h*W + w`` in its plane), both (N, C, OH, OW)."""
    cp = _cp()
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride[0], 0)
    ow = conv_output_size(w, kw, stride[1], 0)
    y = cp.empty((n, c, oh, ow), dtype=x.dtype)
    argmax = cp.empty((n, c, oh, ow), dtype=cp.int64)
    _kernel("maxpool_forward_kernel", x.dtype)(
        _plane_grid(oh * ow, n * c), (_THREADS,),
        (x, y, argmax, _i(n * c), _i(h), _i(w), _i(kh), _i(kw),
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
    grad_x = _cp().zeros(x_shape, dtype=grad_y.dtype)
    n, c, oh, ow = grad_y.shape
    _kernel("maxpool_backward_kernel", grad_y.dtype)(
        _plane_grid(oh * ow, n * c), (_THREADS,),
        (grad_y, argmax, grad_x, _i(n * c), _i(oh * ow), _i(x_shape[2] * x_shape[3])))
    return grad_x


# --- elementwise ----------------------------------------------------------------------

def relu_forward(x, out=None):
    """y = max(x, 0) (NaN stays NaN, as np.maximum); into ``out`` when given (may be x)."""
    y = _cp().empty(x.shape, dtype=x.dtype) if out is None else out
    _kernel("relu_forward_kernel", x.dtype)((_blocks(x.size, 4 * _THREADS),), (_THREADS,),
                                            (x, y, np.int64(x.size)))
    return y


def relu_backward(grad_y, y, out=None):
    """grad_x = grad_y where y > 0, else 0; into ``out`` when given (may be grad_y)."""
    grad_x = _cp().empty(grad_y.shape, dtype=grad_y.dtype) if out is None else out
    _kernel("relu_backward_kernel", grad_y.dtype)((_blocks(y.size, 4 * _THREADS),), (_THREADS,),
                                                  (grad_y, y, grad_x, np.int64(y.size)))
    return grad_x


# --- dense ------------------------------------------------------------------------------

def dense_forward(x, W, b):
    """x: (N, I), W: (I, O), b: (O,) or None -> y = x @ W + b (bias written, GEMM adds onto it)."""
    n, i = x.shape
    o = W.shape[1]
    y = _cp().empty((n, o), dtype=x.dtype)
    if b is not None:
        _kernel("bias_rows_kernel", x.dtype)(
            (_blocks(o), min(n, _GRID_YZ)), (_THREADS,), (y, b, _i(n), _i(o)))
    return _gemm(x, W, y, n, o, i, accumulate=b is not None)


def dense_backward(grad_y, x, W, need_grad_x=True):
    """-> (grad_y @ W.T or None, x.T @ grad_y, grad_y summed over rows): two GEMMs, one sum.
    ``need_grad_x=False`` (a network's first layer) skips grad_x's GEMM."""
    cp = _cp()
    n, i = x.shape
    o = W.shape[1]
    grad_x = None
    grad_W = cp.empty((i, o), dtype=x.dtype)
    grad_b = cp.empty(o, dtype=x.dtype)
    if need_grad_x:
        grad_x = _gemm(grad_y, W, cp.empty((n, i), dtype=x.dtype), n, i, o, trans_b=True)
    _gemm(x, grad_y, grad_W, i, o, n, trans_a=True)
    _sum_rows(grad_y, n, o, grad_b)
    return grad_x, grad_W, grad_b


# --- loss -------------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels):
    """logits (N, C), labels int64 (N,) or (N, C) of logits' dtype
    -> (loss: 0-d array of logits' dtype, grad: (softmax - onehot) / N). One launch."""
    cp = _cp()
    n, c = logits.shape
    grad = cp.empty((n, c), dtype=logits.dtype)
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
    x = _c(x)
    y = cp.empty(x.shape, dtype=x.dtype)
    mask = cp.empty(x.shape, dtype=x.dtype)
    _kernel("dropout_kernel", x.dtype)(
        (_blocks(x.size),), (_THREADS,),
        (x, y, mask, np.int64(x.size), np.float64(p), x.dtype.type(1.0 / (1.0 - p)),
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
    x, gamma, beta, mean, var = (_c(a) for a in (x, gamma, beta, mean, var))
    n, c, s = _channel_view(x)
    if mean is None:
        mean = cp.empty(c, dtype=x.dtype)
        var = cp.empty(c, dtype=x.dtype)
        _kernel("channel_mean_var_kernel", x.dtype)(
            (c,), (_THREADS,), (x, mean, var, _i(n), _i(c), _i(s)))
    inv_std = 1 / cp.sqrt(var + x.dtype.type(eps))
    x_hat = cp.empty(x.shape, dtype=x.dtype)
    y = cp.empty(x.shape, dtype=x.dtype)
    _kernel("batchnorm_apply_kernel", x.dtype)(
        _plane_grid(s, c, n), (_THREADS,),
        (x, mean, inv_std, gamma, beta, x_hat, y, _i(n), _i(c), _i(s)))
    return y, x_hat, mean, var, inv_std


def batchnorm_backward(grad_y, x_hat, gamma, inv_std):
    """Training-mode BatchNorm backward -> (grad_x, grad_gamma, grad_beta).

    One reduction kernel gives per channel sum(grad_y) (= grad_beta) and
    sum(grad_y * x_hat) (= grad_gamma); one elementwise pass gives grad_x.
    """
    cp = _cp()
    grad_y, x_hat, gamma, inv_std = (_c(a) for a in (grad_y, x_hat, gamma, inv_std))
    n, c, s = _channel_view(grad_y)
    grad_beta = cp.empty(c, dtype=grad_y.dtype)
    grad_gamma = cp.empty(c, dtype=grad_y.dtype)
    _kernel("channel_grad_sums_kernel", grad_y.dtype)(
        (c,), (_THREADS,), (grad_y, x_hat, grad_beta, grad_gamma, _i(n), _i(c), _i(s)))
    grad_x = cp.empty(grad_y.shape, dtype=grad_y.dtype)
    _kernel("batchnorm_grad_x_kernel", grad_y.dtype)(
        _plane_grid(s, c, n), (_THREADS,),
        (grad_y, x_hat, gamma, inv_std, grad_beta, grad_gamma, grad_x, _i(n), _i(c), _i(s),
         grad_y.dtype.type(1.0 / (n * s))))
    return grad_x, grad_gamma, grad_beta


# --- fused optimizer updates ------------------------------------------------------------

def sgd_step(param, grad, buf, lr, momentum=0.0, weight_decay=0.0, l1=0.0, nesterov=False):
    """One SGD update of ``param`` in place (PyTorch's rule), one launch.

    ``buf`` is the momentum buffer (None before the first step; then it is
    created and filled with the gradient, as PyTorch does). Returns the buffer
    (None without momentum). ``weight_decay`` / ``l1`` apply when non-zero.
    """
    cp = _cp()
    dt = param.dtype.type
    grad = _c(grad)
    first = buf is None
    if momentum and first:
        buf = cp.empty(param.shape, dtype=param.dtype)
    _kernel("sgd_kernel", param.dtype)(
        (_blocks(param.size),), (_THREADS,),
        (param, grad, buf if momentum else param, np.int64(param.size), dt(lr), dt(momentum),
         dt(weight_decay), dt(l1), _i(bool(momentum)), _i(bool(nesterov)), _i(first)))
    return buf if momentum else None


def adam_step(param, grad, m, v, step_size, betas, inv_sqrt_bc2, eps, weight_decay=0.0):
    """One Adam update of ``param``, ``m``, ``v`` in place (PyTorch's rule), one launch.

    ``step_size = lr / (1 - b1**t)``, ``inv_sqrt_bc2 = 1 / sqrt(1 - b2**t)``.
    """
    dt = param.dtype.type
    grad = _c(grad)
    b1, b2 = betas
    _kernel("adam_kernel", param.dtype)(
        (_blocks(param.size),), (_THREADS,),
        (param, grad, m, v, np.int64(param.size), dt(b1), dt(1 - b1), dt(b2), dt(1 - b2),
         dt(inv_sqrt_bc2), dt(eps), dt(step_size), dt(weight_decay)))
