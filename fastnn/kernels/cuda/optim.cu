// Fused optimizer updates: one pass over a parameter and its state.
// Part of one NVRTC module: fastnn/kernels/_cuda.py concatenates common.cuh and the
// .cu files in the order of its _SOURCE_FILES; the helpers come from common.cuh.
// Every __global__ template here is instantiated for float and double.

// Optimizer state is stored flushed, as on the CPU (_flushed in cpu/optim.pxi): an
// entry below the type's smallest normal number becomes 0 (NaN stays).
__device__ __forceinline__ float  flushed(float v)  { return fabsf(v) < 1.17549435e-38f ? 0.0f : v; }
__device__ __forceinline__ double flushed(double v) { return fabs(v) < 2.2250738585072014e-308 ? 0.0 : v; }

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
            const T b = flushed(first ? gv : buf[i] * mom + gv);
            buf[i] = b;
            gv = nesterov ? gv + mom * b : b;
        }
        p[i] = pv - lr * gv;
    }
}

// Adam (PyTorch's rule, L2 weight decay added to the gradient), fused; AdamW's
// decoupled decay first when decay != 1 (p *= decay):
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//   p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
template <typename T>
__global__ void adam_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
        T* __restrict__ v, i64 total, T b1, T one_minus_b1, T b2, T one_minus_b2,
        T inv_sqrt_bc2, T eps, T step_size, T wd, T decay) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const T pv = decay != (T)1 ? p[i] * decay : p[i];
        T gv = g[i];
        if (wd != (T)0) gv = gv + wd * pv;
        const T mv = flushed(m[i] * b1 + gv * one_minus_b1);
        const T vv = flushed(v[i] * b2 + (gv * gv) * one_minus_b2);
        m[i] = mv;
        v[i] = vv;
        p[i] = pv - (mv / (sqrt(vv) * inv_sqrt_bc2 + eps)) * step_size;
    }
}

// RMSprop (torch.optim.RMSprop, centered=False), fused:
//   g += wd * p;  sq = alpha sq + (1-alpha) g^2;  d = g / (sqrt(sq) + eps);
//   buf = mom * buf + d, d = buf (use_mom);  p -= lr * d
template <typename T>
__global__ void rmsprop_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ sq,
        T* __restrict__ buf, i64 total, T lr, T alpha, T one_minus_alpha, T eps, T mom, T wd,
        int use_mom) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const T pv = p[i];
        T gv = g[i];
        if (wd != (T)0) gv = gv + wd * pv;
        const T s = flushed(sq[i] * alpha + (gv * gv) * one_minus_alpha);
        sq[i] = s;
        T d = gv / (sqrt(s) + eps);
        if (use_mom) {
            d = flushed(buf[i] * mom + d);
            buf[i] = d;
        }
        p[i] = pv - lr * d;
    }
}
