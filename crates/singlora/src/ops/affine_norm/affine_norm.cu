// Normalisation over rows with a per-channel affine, optionally followed by SiLU, forward and
// backward (ops/affine_norm: the candle op and its CPU code). GroupNorm of (b, c, h, w) is rows
// of (c / groups)·h·w elements, b·groups rows; LayerNorm over d is rows of d, one group. Element
// j of row r belongs to channel (r % groups)·cpr + j / hw. A block per row, f32 arithmetic on
// bf16 or f32 storage; the row statistics are recomputed in the backward, not stored.
#include "../cuda/common.cuh"

// mean and 1/σ of row x[0 .. n) (two passes: the variance about the mean)
template <typename T>
__device__ __forceinline__ void row_stats(const T* x, long base, int n, float eps, float& mean, float& inv) {
    float s = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) s += ld(x, base + j);
    mean = block_sum(s) / n;
    float v = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float d = ld(x, base + j) - mean;
        v += d * d;
    }
    inv = rsqrtf(block_sum(v) / n + eps);
}

// y = act(x̂·w[ch] + b[ch]), x̂ = (x − mean)/σ; act SiLU (z·sigmoid(z)) or none.
template <typename T>
__device__ void affine_norm_fwd(const T* x, const float* w, const float* b, T* y, int n, int groups, int cpr,
                                int hw, float eps, int silu) {
    const long base = (long)blockIdx.x * n;
    const int ch0 = (blockIdx.x % groups) * cpr;
    float mean, inv;
    row_stats(x, base, n, eps, mean, inv);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const int c = ch0 + j / hw;
        float z = (ld(x, base + j) - mean) * inv * w[c] + b[c];
        if (silu) z = z / (1.f + __expf(-z));
        st(y, base + j, z);
    }
}

// dx = (ĝ − mean ĝ − x̂·mean(ĝ⊙x̂))/σ with ĝ = w[ch]·dz, dz = g (or g·SiLU'(z), z recomputed).
template <typename T>
__device__ void affine_norm_bwd(const T* x, const float* w, const float* b, const T* g, T* dx, int n, int groups,
                                int cpr, int hw, float eps, int silu) {
    const long base = (long)blockIdx.x * n;
    const int ch0 = (blockIdx.x % groups) * cpr;
    float mean, inv;
    row_stats(x, base, n, eps, mean, inv);
    auto ghat = [&](int j, float xh) {
        const int c = ch0 + j / hw;
        float dz = ld(g, base + j);
        if (silu) {
            const float z = xh * w[c] + b[c];
            const float sg = 1.f / (1.f + __expf(-z));
            dz *= sg * (1.f + z * (1.f - sg));
        }
        return dz * w[c];
    };
    float sg = 0.f, sgx = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float xh = (ld(x, base + j) - mean) * inv;
        const float gh = ghat(j, xh);
        sg += gh;
        sgx += gh * xh;
    }
    const float mg = block_sum(sg) / n;
    const float mgx = block_sum(sgx) / n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float xh = (ld(x, base + j) - mean) * inv;
        st(dx, base + j, (ghat(j, xh) - mg - xh * mgx) * inv);
    }
}

#define INSTANTIATE(T, SUF)                                                                                     \
    extern "C" __global__ void affine_norm_fwd_##SUF(const T* x, const float* w, const float* b, T* y, int n,   \
                                                     int groups, int cpr, int hw, float eps, int silu) {        \
        affine_norm_fwd<T>(x, w, b, y, n, groups, cpr, hw, eps, silu);                                          \
    }                                                                                                           \
    extern "C" __global__ void affine_norm_bwd_##SUF(const T* x, const float* w, const float* b, const T* g,    \
                                                     T* dx, int n, int groups, int cpr, int hw, float eps,      \
                                                     int silu) {                                                \
        affine_norm_bwd<T>(x, w, b, g, dx, n, groups, cpr, hw, eps, silu);                                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
