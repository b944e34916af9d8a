// Softmax cross-entropy: loss and gradient in one launch.
// Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates common.cuh and the
// .cu files in the order of its _SOURCE_FILES; the helpers come from common.cuh.
// Every __global__ template here is instantiated for float and double.

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
