// Max pooling and global average pooling, forward and backward (windowed average
// pooling runs the NumPy reference on CuPy).
// Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates common.cuh and the
// .cu files in the order of its _SOURCE_FILES; the helpers come from common.cuh.
// Every __global__ template here is instantiated for float and double.

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

// Global average pooling: one thread per (n, c) plane sums it in double, in order.
template <typename T>
__global__ void global_avgpool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
        i64 planes, i64 hw) {
    for (i64 p = blockIdx.x * (i64)blockDim.x + threadIdx.x; p < planes;
         p += (i64)blockDim.x * gridDim.x) {
        double total = 0;
        for (i64 k = 0; k < hw; ++k) total += (double)x[p * hw + k];
        y[p] = (T)(total / (double)hw);
    }
}

// Its backward: one thread per pixel, grad_y of its plane divided by H*W.
template <typename T>
__global__ void global_avgpool_backward_kernel(const T* __restrict__ grad_y,
        T* __restrict__ grad_x, i64 planes, i64 hw) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < planes * hw;
         i += (i64)blockDim.x * gridDim.x) {
        grad_x[i] = grad_y[i / hw] / (T)hw;
    }
}
