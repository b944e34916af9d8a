// Dropout (counter-based mask) and BatchNorm statistics and passes.
// Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates common.cuh and the
// .cu files in the order of its _SOURCE_FILES; the helpers come from common.cuh.
// Every __global__ template here is instantiated for float and double.

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
