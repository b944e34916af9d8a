// Convolution: im2col / col2im between images and GEMM columns, the bias fill of
// the conv output (the GEMMs themselves are cuBLAS calls).
// Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates common.cuh and the
// .cu files in the order of its _SOURCE_FILES; the helpers come from common.cuh.
// Every __global__ template here is instantiated for float and double.

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
