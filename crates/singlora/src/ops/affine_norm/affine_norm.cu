// Normalisation over rows with a per-channel affine, optionally followed by SiLU, forward and
// backward (ops/affine_norm: the candle op and its CPU code). GroupNorm of (b, c, h, w) is rows
// of (c / groups)·h·w elements, b·groups rows; LayerNorm over d is rows of d, one group. Element
// j of row r belongs to channel (r % groups)·cpr + j / hw. A block per row, or per chunk of a
// long row (the *_split kernels below), f32 arithmetic on bf16 or f32 storage; the row statistics
// are recomputed in the backward, not stored.
#include "../cuda/common.cuh"

// The mean and M2 (the sum of squared deviations about the mean) of x[base + j0 .. base + j1),
// two passes, every thread of the block given both.
template <typename T>
__device__ __forceinline__ void mean_m2(const T* x, long base, int j0, int j1, float& mean, float& m2) {
    float s = 0.f;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) s += ld(x, base + j);
    mean = block_sum(s) / (j1 - j0);
    float v = 0.f;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const float d = ld(x, base + j) - mean;
        v += d * d;
    }
    m2 = block_sum(v);
}

// y = act(x̂·w[ch] + b[ch]), x̂ = (x − mean)/σ, over elements [j0, j1) of the row at base whose
// first channel is ch0; act SiLU (z·sigmoid(z)) or none.
template <typename T>
__device__ __forceinline__ void norm_apply(const T* x, const float* w, const float* b, T* y, long base, int j0,
                                           int j1, int ch0, int hw, float mean, float inv, int silu) {
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const int c = ch0 + j / hw;
        float z = (ld(x, base + j) - mean) * inv * w[c] + b[c];
        if (silu) z = z / (1.f + __expf(-z));
        st(y, base + j, z);
    }
}

// ĝ = w[ch]·dz at element j of row base, dz = g (or g·SiLU'(z), z = x̂·w[ch] + b[ch]).
template <typename T>
__device__ __forceinline__ float ghat(const T* g, const float* w, const float* b, long base, int j, int ch0, int hw,
                                      float xh, int silu) {
    const int c = ch0 + j / hw;
    float dz = ld(g, base + j);
    if (silu) {
        const float z = xh * w[c] + b[c];
        const float sg = 1.f / (1.f + __expf(-z));
        dz *= sg * (1.f + z * (1.f - sg));
    }
    return dz * w[c];
}

// Σĝ and Σĝ⊙x̂ over elements [j0, j1) of the row at base, every thread of the block given both.
template <typename T>
__device__ __forceinline__ void ghat_sums(const T* x, const float* w, const float* b, const T* g, long base, int j0,
                                          int j1, int ch0, int hw, float mean, float inv, int silu, float& sg,
                                          float& sgx) {
    float a = 0.f, c = 0.f;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const float xh = (ld(x, base + j) - mean) * inv;
        const float gh = ghat(g, w, b, base, j, ch0, hw, xh, silu);
        a += gh;
        c += gh * xh;
    }
    sg = block_sum(a);
    sgx = block_sum(c);
}

// dx = (ĝ − mean ĝ − x̂·mean(ĝ⊙x̂))/σ over elements [j0, j1), mg and mgx the row's means.
template <typename T>
__device__ __forceinline__ void norm_apply_bwd(const T* x, const float* w, const float* b, const T* g, T* dx,
                                               long base, int j0, int j1, int ch0, int hw, float mean, float inv,
                                               float mg, float mgx, int silu) {
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const float xh = (ld(x, base + j) - mean) * inv;
        st(dx, base + j, (ghat(g, w, b, base, j, ch0, hw, xh, silu) - mg - xh * mgx) * inv);
    }
}

// A block per row (grid: rows).
template <typename T>
__device__ void affine_norm_fwd(const T* x, const float* w, const float* b, T* y, int n, int groups, int cpr,
                                int hw, float eps, int silu) {
    const long base = (long)blockIdx.x * n;
    float mean, m2;
    mean_m2(x, base, 0, n, mean, m2);
    norm_apply(x, w, b, y, base, 0, n, (blockIdx.x % groups) * cpr, hw, mean, rsqrtf(m2 / n + eps), silu);
}

template <typename T>
__device__ void affine_norm_bwd(const T* x, const float* w, const float* b, const T* g, T* dx, int n, int groups,
                                int cpr, int hw, float eps, int silu) {
    const long base = (long)blockIdx.x * n;
    const int ch0 = (blockIdx.x % groups) * cpr;
    float mean, m2, sg, sgx;
    mean_m2(x, base, 0, n, mean, m2);
    const float inv = rsqrtf(m2 / n + eps);
    ghat_sums(x, w, b, g, base, 0, n, ch0, hw, mean, inv, silu, sg, sgx);
    norm_apply_bwd(x, w, b, g, dx, base, 0, n, ch0, hw, mean, inv, sg / n, sgx / n, silu);
}

// Long rows split (GroupNorm of few images: b·groups rows of many elements, too few for a block
// each to keep the GPU busy): a block per (chunk of `chunk` elements, row), grid (chunks, rows).
// A first kernel writes each chunk's mean and M2; the kernels after it combine a row's chunks
// (each thread, in chunk order: Chan, Golub and LeVeque's pairwise update) into the row's mean
// and 1/σ.

// This block's elements [j0, j1) of its row.
__device__ __forceinline__ void chunk_range(int n, int chunk, int& j0, int& j1) {
    j0 = blockIdx.x * chunk;
    j1 = min(n, j0 + chunk);
}

template <typename T>
__device__ void norm_chunk_stats(const T* x, float2* part, int n, int chunk) {
    int j0, j1;
    chunk_range(n, chunk, j0, j1);
    float m, m2;
    mean_m2(x, (long)blockIdx.y * n, j0, j1, m, m2);
    if (threadIdx.x == 0) part[(long)blockIdx.y * gridDim.x + blockIdx.x] = make_float2(m, m2);
}

__device__ __forceinline__ void combined_stats(const float2* part, int n, int chunk, float eps, float& mean,
                                               float& inv) {
    const float2* p = part + (long)blockIdx.y * gridDim.x;
    float cnt = 0.f, m = 0.f, m2 = 0.f;
    for (int c = 0; c < (int)gridDim.x; c++) {
        const float nb = (float)(min(n, (c + 1) * chunk) - c * chunk);
        const float2 q = p[c];
        const float tot = cnt + nb, d = q.x - m;
        m += d * (nb / tot);
        m2 += q.y + d * d * (cnt * nb / tot);
        cnt = tot;
    }
    mean = m;
    inv = rsqrtf(m2 / n + eps);
}

template <typename T>
__device__ void affine_norm_fwd_split(const T* x, const float* w, const float* b, const float2* part, T* y, int n,
                                      int chunk, int groups, int cpr, int hw, float eps, int silu) {
    float mean, inv;
    combined_stats(part, n, chunk, eps, mean, inv);
    int j0, j1;
    chunk_range(n, chunk, j0, j1);
    norm_apply(x, w, b, y, (long)blockIdx.y * n, j0, j1, (blockIdx.y % groups) * cpr, hw, mean, inv, silu);
}

// The chunk's Σĝ and Σĝ⊙x̂.
template <typename T>
__device__ void affine_norm_bwd_sums(const T* x, const float* w, const float* b, const T* g, const float2* part,
                                     float2* sums, int n, int chunk, int groups, int cpr, int hw, float eps,
                                     int silu) {
    float mean, inv, sg, sgx;
    combined_stats(part, n, chunk, eps, mean, inv);
    int j0, j1;
    chunk_range(n, chunk, j0, j1);
    ghat_sums(x, w, b, g, (long)blockIdx.y * n, j0, j1, (blockIdx.y % groups) * cpr, hw, mean, inv, silu, sg, sgx);
    if (threadIdx.x == 0) sums[(long)blockIdx.y * gridDim.x + blockIdx.x] = make_float2(sg, sgx);
}

template <typename T>
__device__ void affine_norm_bwd_split(const T* x, const float* w, const float* b, const T* g, const float2* part,
                                      const float2* sums, T* dx, int n, int chunk, int groups, int cpr, int hw,
                                      float eps, int silu) {
    float mean, inv;
    combined_stats(part, n, chunk, eps, mean, inv);
    float sg = 0.f, sgx = 0.f;
    for (int c = 0; c < (int)gridDim.x; c++) {
        const float2 q = sums[(long)blockIdx.y * gridDim.x + c];
        sg += q.x;
        sgx += q.y;
    }
    int j0, j1;
    chunk_range(n, chunk, j0, j1);
    norm_apply_bwd(x, w, b, g, dx, (long)blockIdx.y * n, j0, j1, (blockIdx.y % groups) * cpr, hw, mean, inv, sg / n,
                   sgx / n, silu);
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
    }                                                                                                           \
    extern "C" __global__ void norm_chunk_stats_##SUF(const T* x, float2* part, int n, int chunk) {             \
        norm_chunk_stats<T>(x, part, n, chunk);                                                                 \
    }                                                                                                           \
    extern "C" __global__ void affine_norm_fwd_split_##SUF(const T* x, const float* w, const float* b,          \
                                                           const float2* part, T* y, int n, int chunk,          \
                                                           int groups, int cpr, int hw, float eps, int silu) {  \
        affine_norm_fwd_split<T>(x, w, b, part, y, n, chunk, groups, cpr, hw, eps, silu);                       \
    }                                                                                                           \
    extern "C" __global__ void affine_norm_bwd_sums_##SUF(const T* x, const float* w, const float* b,           \
                                                          const T* g, const float2* part, float2* sums, int n,  \
                                                          int chunk, int groups, int cpr, int hw, float eps,    \
                                                          int silu) {                                           \
        affine_norm_bwd_sums<T>(x, w, b, g, part, sums, n, chunk, groups, cpr, hw, eps, silu);                  \
    }                                                                                                           \
    extern "C" __global__ void affine_norm_bwd_split_##SUF(const T* x, const float* w, const float* b,          \
                                                           const T* g, const float2* part, const float2* sums,  \
                                                           T* dx, int n, int chunk, int groups, int cpr,        \
                                                           int hw, float eps, int silu) {                       \
        affine_norm_bwd_split<T>(x, w, b, g, part, sums, dx, n, chunk, groups, cpr, hw, eps, silu);             \
    }

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
