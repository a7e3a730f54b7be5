// Storage access and reductions shared by the fused kernels: f32 arithmetic whatever the storage
// type (bf16 as its raw 16 bits, converted by shifting; f32 as is), 8 elements per access where a
// kernel's pointers are 16-byte aligned (16-byte loads of bf16, two of f32), and block-wide sums
// and maxima.
#pragma once
#include <stdint.h>

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const uint16_t* p, long i) { return __uint_as_float(((uint32_t)p[i]) << 16); }
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(uint16_t* p, long i, float v) {
    uint32_t u = __float_as_uint(v);
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (uint16_t)(u >> 16);
}

// Reduces v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float buf[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = lane < nw ? buf[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ float block_max(float v) {
    __shared__ float buf[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = lane < nw ? buf[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// 8 elements per access, rounded as st() on the way out.
__device__ __forceinline__ uint32_t bf16_bits(float v) {
    uint32_t u = __float_as_uint(v);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even, as st()
}
// 8 bf16 packed in a uint4: loaded, unpacked to f32, packed back (rounded as st()); ld8 and st8
// below are these with the load or store.
__device__ __forceinline__ uint4 ldpk(const uint16_t* p, long i) { return *reinterpret_cast<const uint4*>(p + i); }
__device__ __forceinline__ void unpk(uint4 r, float* o) {
    uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        o[2 * k] = __uint_as_float(w[k] << 16);
        o[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
}
__device__ __forceinline__ uint4 pk(const float* v) {
    uint4 r;
    r.x = bf16_bits(v[0]) | (bf16_bits(v[1]) << 16);
    r.y = bf16_bits(v[2]) | (bf16_bits(v[3]) << 16);
    r.z = bf16_bits(v[4]) | (bf16_bits(v[5]) << 16);
    r.w = bf16_bits(v[6]) | (bf16_bits(v[7]) << 16);
    return r;
}
__device__ __forceinline__ void ld8(const uint16_t* p, long i, float* o) { unpk(ldpk(p, i), o); }
__device__ __forceinline__ void st8(uint16_t* p, long i, const float* v) { *reinterpret_cast<uint4*>(p + i) = pk(v); }
__device__ __forceinline__ void ld8(const float* p, long i, float* o) {
    float4 a = *reinterpret_cast<const float4*>(p + i), b = *reinterpret_cast<const float4*>(p + i + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void st8(float* p, long i, const float* v) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

#define FOR_CHUNKS(n8) for (long c = (long)blockIdx.x * blockDim.x + threadIdx.x; c < (n8); c += (long)gridDim.x * blockDim.x)
