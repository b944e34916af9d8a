// Around the cuBLAS GEMMs: the dense bias fill, and the column / row sums of
// gradients (dense grad_b, conv grad_W partials and grad_b).
// Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates common.cuh and the
// .cu files in the order of its _SOURCE_FILES; the helpers come from common.cuh.
// Every __global__ template here is instantiated for float and double.

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
