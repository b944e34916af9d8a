// ReLU forward and backward.
// Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates common.cuh and the
// .cu files in the order of its _SOURCE_FILES; the helpers come from common.cuh.
// Every __global__ template here is instantiated for float and double.

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

// Dense layer + ReLU epilogue, after the GEMM wrote y (R, M) = x @ W:
// y = relu(y + bias[j]) in place, one read-modify-write pass.
template <typename T>
__global__ void bias_relu_rows_kernel(T* __restrict__ y, const T* __restrict__ bias, int R, int M) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= M) return;
    const T b = bias[j];
    for (int r = blockIdx.y; r < R; r += gridDim.y) {
        const i64 at = (i64)r * M + j;
        y[at] = relu_of(y[at] + b);
    }
}
