// GEGLU, the gate of Stable Diffusion's feed-forward (ops/geglu: the candle op; the CPU runs the
// composed ops), from the projection's packed output h = [a | b] of m rows of 2n:
//   y = a · gelu(b), gelu(b) = b Φ(b) = ½ b (1 + erf(b/√2));
//   backward: da = dy · gelu(b), db = dy · a · gelu'(b), gelu'(b) = Φ(b) + b φ(b).
// One thread per output element, f32 arithmetic on bf16 or f32 storage.
#include "../cuda/common.cuh"

#define GEGLU_LOOP for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < m * n; i += (long)gridDim.x * blockDim.x)

template <typename T>
__device__ void geglu_fwd(const T* h, T* y, long m, long n) {
    GEGLU_LOOP {
        const long row = i / n, j = i - row * n;
        const float a = ld(h, row * 2 * n + j), b = ld(h, row * 2 * n + n + j);
        st(y, i, a * 0.5f * b * (1.f + erff(b * 0.70710678118654752f)));
    }
}

template <typename T>
__device__ void geglu_bwd(const T* h, const T* dy, T* dh, long m, long n) {
    GEGLU_LOOP {
        const long row = i / n, j = i - row * n;
        const long ia = row * 2 * n + j, ib = ia + n;
        const float a = ld(h, ia), b = ld(h, ib), d = ld(dy, i);
        const float cdf = 0.5f * (1.f + erff(b * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * __expf(-0.5f * b * b);
        st(dh, ia, d * b * cdf);
        st(dh, ib, d * a * (cdf + b * pdf));
    }
}

#define INSTANTIATE(T, SUF)                                                                                     \
    extern "C" __global__ void geglu_fwd_##SUF(const T* h, T* y, long m, long n) { geglu_fwd<T>(h, y, m, n); } \
    extern "C" __global__ void geglu_bwd_##SUF(const T* h, const T* dy, T* dh, long m, long n) {              \
        geglu_bwd<T>(h, dy, dh, m, n);                                                                         \
    }
INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
