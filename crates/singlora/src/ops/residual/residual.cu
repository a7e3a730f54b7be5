// The residual stream's add y = a + b (the fast path's; element-wise, f32 arithmetic on bf16 or
// f32 storage, scalar or 8 elements per access), and with an adapted projection's low-rank term
// added to b on the way in (bf16).
#include "../low_rank/low_rank.cuh"

// y = a + b (the residual stream), elementwise.
template <typename T>
__device__ void add2(const T* a, const T* b, T* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(y, i, ld(a, i) + ld(b, i));
}

template <typename T>
__device__ void add2_v8(const T* a, const T* b, T* y, long n) {
    FOR_CHUNKS(n / 8) {
        float x[8], z[8];
        ld8(a, 8 * c, x);
        ld8(b, 8 * c, z);
#pragma unroll
        for (int k = 0; k < 8; k++) x[k] += z[k];
        st8(y, 8 * c, x);
    }
}

// y = a + (b + c·h·Uᵀ): the residual add after the attention output and down projections.
template <int R>
__device__ void add_lr(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b, uint16_t* __restrict__ y,
                       long m, int n, const uint16_t* h, long ldh, const uint16_t* u, float c) {
    LR_WARP
    LrTile<R> t;
    t.load(h, ldh, u, c, col0, n);
    for (long r0 = rb; r0 < re; r0 += 16) {
        uint4 av[2], bv[2];
        LR_LOAD(av, a)
        LR_LOAD(bv, b)
        t.apply(r0, m, bv);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const long row = r0 + g + 8 * hf;
            if (!on || row >= m) continue;
            float x[8], z[8];
            unpk(av[hf], x);
            unpk(bv[hf], z);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] += z[k];
            st8(y, row * n + col, x);
        }
    }
}

#define INSTANTIATE(T, SUF)                                                                                          \
    extern "C" __global__ void add2_##SUF(const T* a, const T* b, T* y, long n) { add2<T>(a, b, y, n); }             \
    extern "C" __global__ void add2_v8_##SUF(const T* a, const T* b, T* y, long n) { add2_v8<T>(a, b, y, n); }      

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)

#define INSTANTIATE_LR(R)                                                                                            \
    extern "C" __global__ void add_lr##R##_bf16(const uint16_t* a, const uint16_t* b, uint16_t* y, long m, int n,    \
                                                const uint16_t* h, long ldh, const uint16_t* u, float c) {           \
        add_lr<R>(a, b, y, m, n, h, ldh, u, c);                                                                      \
    }                                                                                                               

INSTANTIATE_LR(8)
INSTANTIATE_LR(16)
