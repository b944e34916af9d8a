// The augmentation layers' copies: random_translate and random_flip (the draws are the
// layers'; these copy). Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates
// common.cuh and the .cu files in the order of its _SOURCE_FILES.
// Every __global__ template here is instantiated for float and double.

// One thread per output element of x: (N, C, H, W); shifts: (N, 2) int64 (dy, dx),
// |dy| <= H, |dx| <= W. y[n, c, i, j] = x[n, c, i - dy, j - dx] where it exists, else fill.
template <typename T>
__global__ void random_translate_kernel(const T* __restrict__ x, T* __restrict__ y,
        const long long* __restrict__ shifts, i64 total, i64 chw, i64 h, i64 w, T fill) {
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const i64 n = idx / chw, j = idx % w, i = (idx / w) % h;
        const i64 si = i - shifts[2 * n], sj = j - shifts[2 * n + 1];
        y[idx] = (si >= 0 && si < h && sj >= 0 && sj < w) ? x[idx + (si - i) * w + (sj - j)]
                                                          : fill;
    }
}

// One thread per output element: sample n reversed along H where flips[n, 0] != 0,
// along W where flips[n, 1] != 0.
template <typename T>
__global__ void random_flip_kernel(const T* __restrict__ x, T* __restrict__ y,
        const long long* __restrict__ flips, i64 total, i64 chw, i64 h, i64 w) {
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const i64 n = idx / chw, j = idx % w, i = (idx / w) % h;
        const i64 si = flips[2 * n] ? h - 1 - i : i, sj = flips[2 * n + 1] ? w - 1 - j : j;
        y[idx] = x[idx + (si - i) * w + (sj - j)];
    }
}
