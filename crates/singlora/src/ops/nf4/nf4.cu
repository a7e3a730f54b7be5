// NF4 dequantisation (quant/nf4.rs holds the format): value i of a weight is
// level[code_i] · (map[absmax_code[i / 64]] · group_scale[i / 16384] + offset), written as f32
// or bf16. The block scale is computed with separate round-to-nearest multiply and add (no
// fused multiply-add), as the CPU computes it, so both give the same f32 values.
#include "../cuda/common.cuh"

__device__ const float NF4_LEVELS[16] = {
    -1.0f,         -0.6961928f,  -0.52507305f, -0.3949175f, -0.28444138f, -0.18477343f,
    -0.091050036f, 0.0f,         0.0795803f,   0.1609302f,  0.2461123f,   0.33791524f,
    0.44070983f,   0.562617f,    0.72295684f,  1.0f};

__device__ __forceinline__ float block_scale(const uint8_t* acodes, const float* gscales, const float* map,
                                             float offset, long block) {
    return __fadd_rn(__fmul_rn(map[acodes[block]], gscales[block / 256]), offset);
}

// One value per thread (any length).
template <typename T>
__device__ void dequant(const uint8_t* codes, const uint8_t* acodes, const float* gscales, const float* map,
                        float offset, long n, T* y) {
    __shared__ float lv[16];
    if (threadIdx.x < 16) lv[threadIdx.x] = NF4_LEVELS[threadIdx.x];
    __syncthreads();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const uint8_t b = codes[i >> 1];
        const int c = (i & 1) ? (b & 15) : (b >> 4);
        st(y, i, __fmul_rn(lv[c], block_scale(acodes, gscales, map, offset, i / 64)));
    }
}

// Eight values per thread: four code bytes read at once (n a multiple of 8, codes 4-byte
// aligned, y 16-byte aligned); the eight share a block.
template <typename T>
__device__ void dequant_v8(const uint8_t* codes, const uint8_t* acodes, const float* gscales, const float* map,
                           float offset, long n, T* y) {
    __shared__ float lv[16];
    if (threadIdx.x < 16) lv[threadIdx.x] = NF4_LEVELS[threadIdx.x];
    __syncthreads();
    FOR_CHUNKS(n / 8) {
        const uint32_t w = reinterpret_cast<const uint32_t*>(codes)[c];
        const float s = block_scale(acodes, gscales, map, offset, (8 * c) / 64);
        float v[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const uint32_t b = (w >> (8 * k)) & 255u;
            v[2 * k] = __fmul_rn(lv[b >> 4], s);
            v[2 * k + 1] = __fmul_rn(lv[b & 15], s);
        }
        st8(y, 8 * c, v);
    }
}

#define INSTANTIATE(T, SUF)                                                                                         \
    extern "C" __global__ void nf4_dequant_##SUF(const uint8_t* codes, const uint8_t* acodes, const float* gscales, \
                                                 const float* map, float offset, long n, T* y) {                   \
        dequant<T>(codes, acodes, gscales, map, offset, n, y);                                                      \
    }                                                                                                               \
    extern "C" __global__ void nf4_dequant_v8_##SUF(const uint8_t* codes, const uint8_t* acodes,                    \
                                                    const float* gscales, const float* map, float offset, long n,   \
                                                    T* y) {                                                         \
        dequant_v8<T>(codes, acodes, gscales, map, offset, n, y);                                                   \
    }

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
