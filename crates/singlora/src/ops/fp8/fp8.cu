// FP8 with one scale per tensor (E4M3 for weights and activations, E5M2 for gradients): the
// tensor's largest magnitude (amax), each value times fmax / amax rounded to the nearest FP8
// value (saturating at ±fmax), and the scale amax / fmax that the GEMM multiplies back in.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include "../cuda/common.cuh"

// *out = max(*out, max |x|) over n values (*out starts at 0: non-negative floats order as ints).
template <typename T>
__device__ void amax(const T* __restrict__ x, long n, float* out) {
    float m = 0.f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        m = fmaxf(m, fabsf(ld(x, i)));
    m = block_max(m);
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));
}

__device__ __forceinline__ float fp8_max(int e5) { return e5 ? 57344.f : 448.f; }

// The multiplier fmax / amax that quantisation applies (1 for an all-zero x); block 0's thread 0
// writes the scale amax / fmax that undoes it.
__device__ __forceinline__ float quant_inv(const float* amax_p, int e5, float* scale) {
    const float a = *amax_p, fm = fp8_max(e5);
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale = a > 0.f ? a / fm : 1.f;
    return a > 0.f ? fm / a : 1.f;
}

// q = fp8(x · fmax / amax), with its scale (quant_inv).
template <typename T>
__device__ void quant(const T* __restrict__ x, long n, const float* amax_p, int e5, uint8_t* __restrict__ q,
                      float* scale) {
    const float inv = quant_inv(amax_p, e5, scale);
    const __nv_fp8_interpretation_t kind = e5 ? __NV_E5M2 : __NV_E4M3;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        q[i] = (uint8_t)__nv_cvt_float_to_fp8(ld(x, i) * inv, __NV_SATFINITE, kind);
}

// The same two, 8 values per access (n a multiple of 8, x 16-byte aligned, q 8-byte aligned).
template <typename T>
__device__ void amax_v8(const T* __restrict__ x, long n, float* out) {
    float m = 0.f, v[8];
    for (long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += (long)gridDim.x * blockDim.x * 8) {
        ld8(x, i, v);
#pragma unroll
        for (int k = 0; k < 8; k++) m = fmaxf(m, fabsf(v[k]));
    }
    m = block_max(m);
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));
}

template <typename T>
__device__ void quant_v8(const T* __restrict__ x, long n, const float* amax_p, int e5, uint8_t* __restrict__ q,
                         float* scale) {
    const float inv = quant_inv(amax_p, e5, scale);
    const __nv_fp8_interpretation_t kind = e5 ? __NV_E5M2 : __NV_E4M3;
    float v[8];
    for (long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += (long)gridDim.x * blockDim.x * 8) {
        ld8(x, i, v);
        uint2 packed;
        uint8_t* b = reinterpret_cast<uint8_t*>(&packed);
#pragma unroll
        for (int k = 0; k < 8; k++) b[k] = (uint8_t)__nv_cvt_float_to_fp8(v[k] * inv, __NV_SATFINITE, kind);
        *reinterpret_cast<uint2*>(q + i) = packed;
    }
}

// y = scale · value(q), as f32 or bf16.
template <typename T>
__device__ void dequant(const uint8_t* __restrict__ q, long n, const float* scale, int e5, T* __restrict__ y) {
    const float s = *scale;
    const __nv_fp8_interpretation_t kind = e5 ? __NV_E5M2 : __NV_E4M3;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const __half h = __half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)q[i], kind));
        st(y, i, __half2float(h) * s);
    }
}

// dst (cols × rows) = srcᵀ, src (rows × cols) row-major bytes: a weight's second orientation.
extern "C" __global__ void fp8_transpose(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, long rows,
                                         long cols) {
    const long n = rows * cols;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long r = i / cols, c = i - r * cols;
        dst[c * rows + r] = src[i];
    }
}

#define INSTANTIATE(T, SUF)                                                                                   \
    extern "C" __global__ void fp8_amax_##SUF(const T* x, long n, float* out) { amax<T>(x, n, out); }         \
    extern "C" __global__ void fp8_amax_v8_##SUF(const T* x, long n, float* out) { amax_v8<T>(x, n, out); }   \
    extern "C" __global__ void fp8_quant_v8_##SUF(const T* x, long n, const float* amax_p, int e5, uint8_t* q,\
                                                  float* scale) {                                             \
        quant_v8<T>(x, n, amax_p, e5, q, scale);                                                              \
    }                                                                                                         \
    extern "C" __global__ void fp8_quant_##SUF(const T* x, long n, const float* amax_p, int e5, uint8_t* q,   \
                                               float* scale) {                                                \
        quant<T>(x, n, amax_p, e5, q, scale);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void fp8_dequant_##SUF(const uint8_t* q, long n, const float* scale, int e5, T* y) { \
        dequant<T>(q, n, scale, e5, y);                                                                       \
    }

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
