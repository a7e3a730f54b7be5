// GEGLU, the gate of Stable Diffusion's feed-forward (ops/geglu: the candle op; the CPU runs the
// composed ops), from the projection's packed output h = [a | b] of m rows of 2n:
//   y = a · gelu(b), gelu(b) = b Φ(b) = ½ b (1 + erf(b/√2));
//   backward: da = dy · gelu(b), db = dy · a · gelu'(b), gelu'(b) = Φ(b) + b φ(b).
// One thread per output element, f32 arithmetic on bf16 or f32 storage; the _v8 kernels take 8
// neighbouring outputs of a row a thread (16-byte accesses, one 32-bit division per 8 outputs
// instead of a 64-bit one per output) where the halves are whole groups of 8 and aligned.
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

// The group of 8 outputs c of rows of n / 8 groups (n8): its row and first column.
#define GEGLU_V8_LOOP                                                                                   \
    for (unsigned c = blockIdx.x * blockDim.x + threadIdx.x; c < total; c += gridDim.x * blockDim.x)

template <typename T>
__device__ void geglu_fwd_v8(const T* h, T* y, unsigned total, unsigned n8) {
    const long n = 8l * n8;
    GEGLU_V8_LOOP {
        const unsigned row = c / n8;
        const long ia = (long)row * 2 * n + 8l * (c - row * n8);
        float a[8], b[8], o[8];
        ld8(h, ia, a);
        ld8(h, ia + n, b);
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = a[k] * 0.5f * b[k] * (1.f + erff(b[k] * 0.70710678118654752f));
        st8(y, 8l * c, o);
    }
}

template <typename T>
__device__ void geglu_bwd_v8(const T* h, const T* dy, T* dh, unsigned total, unsigned n8) {
    const long n = 8l * n8;
    GEGLU_V8_LOOP {
        const unsigned row = c / n8;
        const long ia = (long)row * 2 * n + 8l * (c - row * n8);
        float a[8], b[8], d[8], da[8], db[8];
        ld8(h, ia, a);
        ld8(h, ia + n, b);
        ld8(dy, 8l * c, d);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const float cdf = 0.5f * (1.f + erff(b[k] * 0.70710678118654752f));
            const float pdf = 0.39894228040143268f * __expf(-0.5f * b[k] * b[k]);
            da[k] = d[k] * b[k] * cdf;
            db[k] = d[k] * a[k] * (cdf + b[k] * pdf);
        }
        st8(dh, ia, da);
        st8(dh, ia + n, db);
    }
}

#define INSTANTIATE(T, SUF)                                                                                     \
    extern "C" __global__ void geglu_fwd_##SUF(const T* h, T* y, long m, long n) { geglu_fwd<T>(h, y, m, n); } \
    extern "C" __global__ void geglu_bwd_##SUF(const T* h, const T* dy, T* dh, long m, long n) {              \
        geglu_bwd<T>(h, dy, dh, m, n);                                                                         \
    }                                                                                                           \
    extern "C" __global__ void geglu_fwd_v8_##SUF(const T* h, T* y, unsigned total, unsigned n8) {            \
        geglu_fwd_v8<T>(h, y, total, n8);                                                                      \
    }                                                                                                           \
    extern "C" __global__ void geglu_bwd_v8_##SUF(const T* h, const T* dy, T* dh, unsigned total, unsigned n8) { \
        geglu_bwd_v8<T>(h, dy, dh, total, n8);                                                                 \
    }
INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
