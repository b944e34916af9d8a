// Helpers shared by every kernel file of fastnn's CUDA module (concatenated first:
// see _SOURCE_FILES in fastnn/kernels/_cuda.py).

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
