// RMSNorm over rows of d with an f32 weight, forward and backward (ops/norm: the candle op and its
// CPU code): a block per row, f32 arithmetic on bf16 or f32 storage. The fast path's variants
// accumulate the input gradient into the residual stream's, take 8 elements per access, and
// (the SFT head's) gather or scatter the rows they normalise.
#include "../cuda/common.cuh"

// y = x / rms(x) * w with rms = sqrt(mean x^2 + eps); w in f32.
template <typename T>
__device__ void rms_norm_fwd(const T* x, const float* w, T* y, int d, float eps) {
    const long base = (long)blockIdx.x * d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(x, base + j); ss += v * v; }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) st(y, base + j, ld(x, base + j) * inv * w[j]);
}

// dx = (g w - xhat mean(g w xhat)) / rms, xhat = x / rms.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const float* w, const T* g, T* dx, int d, float eps) {
    const long base = (long)blockIdx.x * d;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        ss += v * v;
        dot += ld(g, base + j) * w[j] * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float inv = rsqrtf(ss / d + eps);
    float c = dot * inv * inv / d;  // mean(g w xhat) / rms, with xhat = x inv
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        st(dx, base + j, (ld(g, base + j) * w[j] - v * c) * inv);
    }
}

// RMSNorm backward accumulating into dx (dx += ...): the residual stream's gradient.
template <typename T>
__device__ void rms_norm_bwd_acc(const T* x, const float* w, const T* g, T* dx, int d, float eps) {
    const long base = (long)blockIdx.x * d;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        ss += v * v;
        dot += ld(g, base + j) * w[j] * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float inv = rsqrtf(ss / d + eps);
    float c = dot * inv * inv / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        st(dx, base + j, ld(dx, base + j) + (ld(g, base + j) * w[j] - v * c) * inv);
    }
}

template <typename T>
__device__ void rms_norm_fwd_v8(const T* x, const float* w, T* y, int d, float eps, const uint32_t* rows = nullptr) {
    // with `rows`, output row i normalises input row rows[i] (a gather)
    const long base = (long)blockIdx.x * d, xbase = rows ? (long)rows[blockIdx.x] * d : base;
    float ss = 0.f, v[8], wv[8];
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
#pragma unroll
        for (int k = 0; k < 8; k++) ss += v[k] * v[k];
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / d + eps);
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
        ld8(w, j, wv);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = v[k] * inv * wv[k];
        st8(y, base + j, v);
    }
}

template <typename T>
__device__ void rms_norm_bwd_acc_v8(const T* x, const float* w, const T* g, T* dx, int d, float eps,
                                    const uint32_t* rows = nullptr) {
    // with `rows`, gradient row i belongs to input (and dx) row rows[i] (a scatter-add)
    const long base = (long)blockIdx.x * d, xbase = rows ? (long)rows[blockIdx.x] * d : base;
    float ss = 0.f, dot = 0.f, v[8], gv[8], wv[8], acc[8];
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
        ld8(g, base + j, gv);
        ld8(w, j, wv);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            ss += v[k] * v[k];
            dot += gv[k] * wv[k] * v[k];
        }
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float inv = rsqrtf(ss / d + eps);
    float cc = dot * inv * inv / d;
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
        ld8(g, base + j, gv);
        ld8(w, j, wv);
        ld8(dx, xbase + j, acc);
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] += (gv[k] * wv[k] - v[k] * cc) * inv;
        st8(dx, xbase + j, acc);
    }
}

#define INSTANTIATE(T, SUF)                                                                                          \
    extern "C" __global__ void rms_norm_fwd_##SUF(const T* x, const float* w, T* y, int d, float eps) {              \
        rms_norm_fwd<T>(x, w, y, d, eps);                                                                            \
    }                                                                                                                \
    extern "C" __global__ void rms_norm_bwd_##SUF(const T* x, const float* w, const T* g, T* dx, int d, float eps) { \
        rms_norm_bwd<T>(x, w, g, dx, d, eps);                                                                        \
    }                                                                                                                \
    extern "C" __global__ void rms_norm_bwd_acc_##SUF(const T* x, const float* w, const T* g, T* dx, int d,          \
                                                      float eps) {                                                   \
        rms_norm_bwd_acc<T>(x, w, g, dx, d, eps);                                                                    \
    }                                                                                                                \
    extern "C" __global__ void rms_norm_fwd_v8_##SUF(const T* x, const float* w, T* y, int d, float eps) {           \
        rms_norm_fwd_v8<T>(x, w, y, d, eps);                                                                         \
    }                                                                                                                \
    extern "C" __global__ void rms_norm_bwd_acc_v8_##SUF(const T* x, const float* w, const T* g, T* dx, int d,       \
                                                         float eps) {                                                \
        rms_norm_bwd_acc_v8<T>(x, w, g, dx, d, eps);                                                                 \
    }                                                                                                                \
    extern "C" __global__ void rms_norm_fwd_rows_v8_##SUF(const T* x, const uint32_t* rows, const float* w, T* y,    \
                                                          int d, float eps) {                                        \
        rms_norm_fwd_v8<T>(x, w, y, d, eps, rows);                                                                   \
    }                                                                                                                \
    extern "C" __global__ void rms_norm_bwd_acc_rows_v8_##SUF(const T* x, const uint32_t* rows, const float* w,      \
                                                              const T* g, T* dx, int d, float eps) {                 \
        rms_norm_bwd_acc_v8<T>(x, w, g, dx, d, eps, rows);                                                           \
    }                                                                                                               

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
