"""CUDA kernels through CuPy: the same internal functions as ``_reference``.

``fastnn.kernels`` validates the arguments and calls these for CuPy arrays
(C-contiguous, float32 or float64; ``stride``/``padding`` as ``(h, w)``).
Hand-written kernels live in CUDA C++ files shipped with the package
(``cuda/*.cu``: one module, compiled once per process by NVRTC through
``cupy.RawModule``, templated on float and double); GEMMs go to cuBLAS
(strided-batched GEMM called directly, which costs a few microseconds of
Python instead of ``cupy.matmul``'s tens).

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
import re

import numpy as np

from ._reference import conv_output_size
# average pooling (the reference's kh*kw strided sums: slices and in-place adds) and the
# leaky ReLU (np.where, dispatched to cupy.where): the reference runs on CuPy arrays as it is
from ._reference import (avgpool2d_backward, avgpool2d_forward, leaky_relu_backward,
                         leaky_relu_forward)

__all__ = ["im2col", "col2im", "maxpool2d_forward", "maxpool2d_backward",
           "avgpool2d_forward", "avgpool2d_backward", "global_avgpool2d_forward",
           "global_avgpool2d_backward", "leaky_relu_forward", "leaky_relu_backward",
           "relu_forward", "relu_backward", "dense_forward", "dense_backward",
           "softmax_cross_entropy", "conv2d_forward", "conv2d_backward",
           "dropout_forward", "dropout_backward", "batchnorm_forward",
           "batchnorm_backward", "sgd_step", "adam_step", "rmsprop_step", "set_tf32",
           "tf32_enabled", "random_translate", "random_flip"]

# Workspace of one conv chunk (columns + per-sample weight-gradient partials)
# stays under this many bytes. GPU memory is large: a LeNet or CIFAR batch is
# one chunk; only huge batches are cut.
CONV_WORKSPACE_BYTES = 1 << 30

_THREADS = 256
_GRID_YZ = 65535            # CUDA's limit on gridDim.y / gridDim.z: kernels loop past it

# The CUDA C++ lives in cuda/ next to this file (package data): common.cuh (helpers)
# and one .cu per op family. Together they are ONE NVRTC module, read and concatenated
# in the order below into ``RawModule(code=...)``: not ``RawModule(path=...)``, which
# loads compiled cubin/PTX rather than source, and not ``#include``, since CuPy's
# compile cache is keyed on the code text (an edited header would leave a stale cached
# module). One compile per process, one cache entry, the helpers defined once.
_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")
_SOURCE_FILES = ("common.cuh", "conv.cu", "gemm_sums.cu", "relu.cu", "pool.cu", "softmax.cu",
                 "norm_dropout.cu", "optim.cu", "augment.cu")
# NVRTC options of the module. CuPy adds -arch=..., -ftz=true and
# --device-as-default-execution-space itself (tests/test_cuda_compile.py adds the same).
_NVRTC_OPTIONS = ()
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def _kernel_source():
    """The module's CUDA C++: ``_SOURCE_FILES`` concatenated, each behind a ``#line``
    directive so that compiler messages name the file and line."""
    parts = []
    for name in _SOURCE_FILES:
        with open(os.path.join(_SOURCE_DIR, name), encoding="utf-8") as f:
            parts.append(f'#line 1 "{name}"\n' + f.read())
    return "\n".join(parts)


def _name_expressions(source):
    """``name<float>`` and ``name<double>`` for every ``__global__`` template in ``source``
    (all kernels are templates on the element type): the instantiations NVRTC compiles."""
    names = re.findall(r"__global__\s+void\s+(\w+)\s*\(", source)
    return [f"{k}<{t}>" for k in names for t in _CTYPE.values()]


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
            source = _kernel_source()
            _module = _cp().RawModule(code=source, options=_NVRTC_OPTIONS,
                                      name_expressions=_name_expressions(source))
        fn = _module.get_function(f"{name}<{_CTYPE[np.dtype(dtype)]}>")
        _functions[(name, dtype)] = fn
    return fn


def _blocks(total, threads=_THREADS):
    """Blocks for ``total`` items (grid-stride kernels cover the rest past the cap)."""
    return min((total + threads - 1) // threads, 1 << 20) or 1


def _plane_grid(positions, channels=1, samples=1):
    """(x, y, z) grid for the image kernels: x covers positions, y channels, z samples
    (at least one block each: the kernels loop over y and z, so an empty batch or no
    channels launch a kernel that does nothing, where a zero-sized grid is a CUDA error)."""
    return (_blocks(positions), max(1, min(channels, _GRID_YZ)), max(1, min(samples, _GRID_YZ)))


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
    if m == 0 or n == 0 or batch == 0:
        return out
    if k == 0:      # cuBLAS rejects a leading dimension of 0; a sum of no products is 0
        if not accumulate:
            out.fill(0)
        return out
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
        (max(1, (width + 31) // 32),), (32, 8),
        (src, out, _i(rows), np.int64(width), _i(accumulate)))
    return out


def _channel_sums(x, n, c, s, out):
    """out (c,) = x viewed as (n, c, s) summed over n and s: row sums, then column sums."""
    row_sums = _cp().empty(n * c, dtype=x.dtype)
    _kernel("row_sum_kernel", x.dtype)((max(1, min(n * c, 1 << 20)),), (128,),
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
    return max(1, CONV_WORKSPACE_BYTES // max(1, per_sample))        # C = 0: no columns


def conv2d_forward(x, W, b, stride, padding, output_size=None):
    """x: (N, C, H, W), W: (K, C, kh, kw), b: (K,) or None -> y: (N, K, OH, OW), or with
    ``output_size`` (oh, ow) its first oh rows and ow columns (computed whole, then copied).

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
    chunk = max(1, min(n, _conv_chunk(c, k, kh, kw, oh, ow, x.itemsize)))    # n = 0: 1
    cols = cp.empty((chunk, ckk, p), dtype=x.dtype)
    if b is not None:
        _kernel("bias_nkp_kernel", x.dtype)(_plane_grid(p, k, n), (_THREADS,),
                                            (y, b, _i(n), _i(k), _i(p)))
    for start in range(0, n, chunk):
        ns = min(chunk, n - start)
        _im2col_into(x[start:start + ns], kh, kw, stride, padding, oh, ow, cols, True)
        _gemm(W, cols, y[start:start + ns], k, p, ckk, batch=ns,
              stride_a=0, stride_b=ckk * p, stride_out=k * p, accumulate=b is not None)
    if output_size is not None:
        y = cp.ascontiguousarray(y[:, :, :output_size[0], :output_size[1]])
    return y


def conv2d_backward(grad_y, x, W, stride, padding, need_grad_x=True, output_size=None):
    """grad_y: (N, K, OH, OW) -> (grad_x (N, C, H, W) or None, grad_W (K, C, kh, kw), grad_b (K,)).
    With ``output_size`` (oh, ow), grad_y (N, K, oh, ow) is the gradient of the forward's
    first rows and columns: padded with zeros to (OH, OW) first.

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
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    if output_size is not None:
        whole = cp.zeros((n, k, oh, ow), dtype=grad_y.dtype)
        whole[:, :, :output_size[0], :output_size[1]] = grad_y
        grad_y = whole
    p, ckk, kk = oh * ow, c * kh * kw, kh * kw
    dtype = x.dtype
    transposed = (need_grad_x and tuple(stride) == (1, 1) and padding[0] < kh
                  and padding[1] < kw and k * h * w <= c * p)
    col_elems = max(ckk * p, k * kk * h * w) if transposed else ckk * p
    per_sample = (col_elems + k * ckk) * x.itemsize
    chunk = max(1, min(n, CONV_WORKSPACE_BYTES // max(1, per_sample)))     # n = 0: 1
    grad_x = cp.empty(x.shape, dtype=dtype) if need_grad_x else None
    grad_W = cp.empty(W.shape, dtype=dtype)
    grad_b = cp.empty(k, dtype=dtype)
    workspace = cp.empty(chunk * col_elems, dtype=dtype)
    partials = cp.empty((chunk, k, ckk), dtype=dtype) if n > 1 else grad_W
    if n == 0:
        grad_W.fill(0)                         # no samples: the loop below adds nothing
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


def global_avgpool2d_forward(x):
    """x: (N, C, H, W) -> y: (N, C); one thread per plane sums it in double."""
    n, c, h, w = x.shape
    y = _cp().empty((n, c), dtype=x.dtype)
    if y.size:
        _kernel("global_avgpool_forward_kernel", x.dtype)(
            (_blocks(n * c),), (_THREADS,), (x, y, np.int64(n * c), np.int64(h * w)))
    return y


def global_avgpool2d_backward(grad_y, x_shape):
    """grad_y: (N, C) -> grad_x: x_shape; one thread per pixel."""
    grad_x = _cp().empty(x_shape, dtype=grad_y.dtype)
    if grad_x.size:
        _kernel("global_avgpool_backward_kernel", grad_y.dtype)(
            (_blocks(grad_x.size),), (_THREADS,),
            (grad_y, grad_x, np.int64(grad_y.size), np.int64(x_shape[2] * x_shape[3])))
    return grad_x


# --- augmentation copies (the layers draw; these copy) -----------------------------------

def _per_sample_copy(name, x, pairs, *extra):
    """y like x from the kernel ``name``: one thread per element, ``pairs`` (N, 2) int64."""
    cp = _cp()
    x = _c(x)
    y = cp.empty(x.shape, dtype=x.dtype)
    if y.size:
        n, c, h, w = x.shape
        _kernel(name, x.dtype)(
            (_blocks(y.size),), (_THREADS,),
            (x, y, cp.ascontiguousarray(cp.asarray(pairs), dtype=cp.int64), np.int64(y.size),
             np.int64(c * h * w), np.int64(h), np.int64(w), *extra))
    return y


def random_translate(x, shifts, fill):
    """x: (N, C, H, W), shifts: (N, 2) int64 within [-H, H] x [-W, W] -> y shifted,
    the rest ``fill`` (the reference's copy, one thread per element)."""
    return _per_sample_copy("random_translate_kernel", x, shifts, x.dtype.type(fill))


def random_flip(x, flips):
    """x: (N, C, H, W), flips: (N, 2) int64 -> y, sample n reversed along H / W where
    flips[n, 0] / flips[n, 1] != 0."""
    return _per_sample_copy("random_flip_kernel", x, flips)


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

def _row_grid(rows, width):
    """Grid for the (rows, width) kernels: x covers a row, y the rows (at least one block:
    an empty batch launches a kernel that does nothing)."""
    return (_blocks(width), max(1, min(rows, _GRID_YZ)))


def dense_forward(x, W, b, relu=False):
    """x: (N, I), W: (I, O), b: (O,) or None -> y: (N, O) = x @ W + b, then max(y, 0)
    when ``relu`` (NaN stays NaN, as ``relu_forward``).

    Without ``relu`` the bias is written first and the GEMM adds onto it; with ``relu``
    the GEMM writes y and one pass adds the bias and applies the ReLU."""
    n, i = x.shape
    o = W.shape[1]
    y = _cp().empty((n, o), dtype=x.dtype)
    if relu:
        _gemm(x, W, y, n, o, i)
        if b is None:
            return relu_forward(y, out=y)
        _kernel("bias_relu_rows_kernel", x.dtype)(_row_grid(n, o), (_THREADS,),
                                                  (y, b, _i(n), _i(o)))
        return y
    if b is not None:
        _kernel("bias_rows_kernel", x.dtype)(_row_grid(n, o), (_THREADS,), (y, b, _i(n), _i(o)))
    return _gemm(x, W, y, n, o, i, accumulate=b is not None)


def dense_backward(grad_y, x, W, need_grad_x=True, relu_x=False):
    """grad_y: (N, O), x: (N, I), W: (I, O) -> (grad_x (N, I) or None, grad_W (I, O),
    grad_b (O,)) = (grad_y @ W.T, x.T @ grad_y, grad_y summed over rows): two GEMMs, one sum.

    ``need_grad_x=False`` (a network's first layer) skips grad_x's GEMM. ``relu_x=True``
    (x is the output of a ReLU) applies that ReLU's backward to grad_x in place: zero
    where x <= 0 or x is NaN, the rule and kernel of ``relu_backward``."""
    cp = _cp()
    n, i = x.shape
    o = W.shape[1]
    grad_x = None
    grad_W = cp.empty((i, o), dtype=x.dtype)
    grad_b = cp.empty(o, dtype=x.dtype)
    if need_grad_x:
        grad_x = _gemm(grad_y, W, cp.empty((n, i), dtype=x.dtype), n, i, o, trans_b=True)
        if relu_x:
            relu_backward(grad_x, x, out=grad_x)
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


def batchnorm_forward(x, gamma, beta, eps, mean=None, var=None, relu=False):
    """x: (N, C) or (N, C, H, W); gamma, beta: (C,).

    With ``mean``/``var`` None (training) the per-channel batch mean and biased
    variance are computed in one kernel (two passes per channel, accumulated
    in double); otherwise the given (running) statistics are used. ``relu``: y then
    takes ``relu_forward`` in place (a second launch; the CPU fuses it).
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
    if relu:
        relu_forward(y, out=y)
    return y, x_hat, mean, var, inv_std


def batchnorm_backward(grad_y, x_hat, gamma, inv_std, relu_y=None):
    """Training-mode BatchNorm backward -> (grad_x, grad_gamma, grad_beta).

    One reduction kernel gives per channel sum(grad_y) (= grad_beta) and
    sum(grad_y * x_hat) (= grad_gamma); one elementwise pass gives grad_x. ``relu_y``
    (a fused ReLU's output): grad_y first becomes ``relu_backward(grad_y, relu_y)``.
    """
    cp = _cp()
    grad_y, x_hat, gamma, inv_std = (_c(a) for a in (grad_y, x_hat, gamma, inv_std))
    if relu_y is not None:
        grad_y = relu_backward(grad_y, _c(relu_y))
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


def adam_step(param, grad, m, v, step_size, b1, b2, inv_sqrt_bc2, eps, weight_decay=0.0,
              decay_factor=1.0):
    """One Adam update of ``param``, ``m``, ``v`` in place (PyTorch's rule), one launch.

    ``step_size = lr / (1 - b1**t)``, ``inv_sqrt_bc2 = 1 / sqrt(1 - b2**t)``;
    ``decay_factor`` (AdamW: 1 - lr * weight_decay) scales param first.
    """
    dt = param.dtype.type
    grad = _c(grad)
    _kernel("adam_kernel", param.dtype)(
        (_blocks(param.size),), (_THREADS,),
        (param, grad, m, v, np.int64(param.size), dt(b1), dt(1 - b1), dt(b2), dt(1 - b2),
         dt(inv_sqrt_bc2), dt(eps), dt(step_size), dt(weight_decay), dt(decay_factor)))


def rmsprop_step(param, grad, square_avg, buf, lr, alpha, eps, momentum=0.0,
                 weight_decay=0.0):
    """One RMSprop update of ``param``, ``square_avg`` (and ``buf`` when not None) in
    place (torch.optim.RMSprop's rule, centered=False), one launch."""
    dt = param.dtype.type
    grad = _c(grad)
    _kernel("rmsprop_kernel", param.dtype)(
        (_blocks(param.size),), (_THREADS,),
        (param, grad, square_avg, param if buf is None else buf, np.int64(param.size),
         dt(lr), dt(alpha), dt(1 - alpha), dt(eps), dt(momentum), dt(weight_decay),
         _i(buf is not None)))
