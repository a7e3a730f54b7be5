// Masked softmax over attention scores, forward and backward (ops/softmax: the candle op and its
// CPU code). Row-wise, f32 arithmetic on bf16 or f32 storage: a block per row, or (rows up to
// 32 × WARP_ROW_MAX keys) a warp per row with the row in registers, also 8 keys per access.
#include "../cuda/common.cuh"

// P = softmax(scale * S) over the valid keys of each row of a (b, h, tq, tk) tensor; row r is
// batch r / (h tq), query r % tq; keys j < key_lens[batch] (and j <= i + tk - tq if causal).
template <typename T>
__device__ void masked_softmax_fwd(const T* s, T* p, const uint32_t* key_lens, int h, int tq, int tk, float scale, int causal) {
    long row = blockIdx.x;
    const long base = row * tk;
    int b = row / ((long)h * tq), i = row % tq;
    int len = min((int)key_lens[b], tk);
    if (causal) len = min(len, i + 1 + tk - tq);
    float m = -INFINITY;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, ld(s, base + j));
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) sum += __expf((ld(s, base + j) - m) * scale);
    sum = block_sum(sum);
    float inv = len > 0 ? 1.f / sum : 0.f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        st(p, base + j, j < len ? __expf((ld(s, base + j) - m) * scale) * inv : 0.f);
}

// dS = scale * P (dP - sum_j P dP), row by row.
template <typename T>
__device__ void masked_softmax_bwd(const T* p, const T* dp, T* ds, int tk, float scale) {
    const long base = (long)blockIdx.x * tk;
    float dot = 0.f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) dot += ld(p, base + j) * ld(dp, base + j);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float pj = ld(p, base + j);
        st(ds, base + j, scale * pj * (ld(dp, base + j) - dot));
    }
}

// The same two, one warp per row with the row in registers (tk <= 32 * WARP_ROW_MAX): one read
// of S (forward) or of P and dP (backward) instead of three. Blocks of 8 warps.
#define WARP_ROW_MAX 32
// A warp's row of the (b, h, tq, tk) scores in the warp-per-row forward kernels, its lane, and
// the row's valid keys (as masked_softmax_fwd); false for a warp past the last row.
__device__ __forceinline__ bool warp_row(long rows, const uint32_t* key_lens, int h, int tq, int tk, int causal,
                                         long& row, int& lane, int& len) {
    row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return false;
    lane = threadIdx.x & 31;
    int b = row / ((long)h * tq), i = row % tq;
    len = min((int)key_lens[b], tk);
    if (causal) len = min(len, i + 1 + tk - tq);
    return true;
}
template <typename T>
__device__ void masked_softmax_fwd_warp(const T* s, T* p, const uint32_t* key_lens, long rows, int h, int tq, int tk,
                                        float scale, int causal) {
    long row;
    int lane, len;
    if (!warp_row(rows, key_lens, h, tq, tk, causal, row, lane, len)) return;
    const long base = row * tk;
    float v[WARP_ROW_MAX];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        v[c] = j < len ? ld(s, base + j) : -INFINITY;
        m = fmaxf(m, v[c]);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        v[c] = j < len ? __expf((v[c] - m) * scale) : 0.f;
        sum += v[c];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float inv = len > 0 ? 1.f / sum : 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        if (j < tk) st(p, base + j, v[c] * inv);
    }
}

template <typename T>
__device__ void masked_softmax_bwd_warp(const T* p, const T* dp, T* ds, long rows, int tk, float scale) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    const long base = row * tk;
    float pv[WARP_ROW_MAX], dv[WARP_ROW_MAX];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        pv[c] = j < tk ? ld(p, base + j) : 0.f;
        dv[c] = j < tk ? ld(dp, base + j) : 0.f;
        dot += pv[c] * dv[c];
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        if (j < tk) st(ds, base + j, scale * pv[c] * (dv[c] - dot));
    }
}

// The warp-per-row masked softmax, forward and backward, 8 keys per lane access (rows up to
// 32 x WARP_ROW_MAX keys, a multiple of 8).
template <typename T>
__device__ void masked_softmax_fwd_warp_v8(const T* s, T* p, const uint32_t* key_lens, long rows, int h, int tq, int tk,
                                           float scale, int causal) {
    long row;
    int lane, len;
    if (!warp_row(rows, key_lens, h, tq, tk, causal, row, lane, len)) return;
    const long base = row * tk;
    float v[WARP_ROW_MAX];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < len) ld8(s, base + j0, v + 8 * c);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (j0 + k >= len) v[8 * c + k] = -INFINITY;
            m = fmaxf(m, v[8 * c + k]);
        }
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float e = j0 + k < len ? __expf((v[8 * c + k] - m) * scale) : 0.f;
            v[8 * c + k] = e;
            sum += e;
        }
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float inv = len > 0 ? 1.f / sum : 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < tk) {
            float o[8];
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = v[8 * c + k] * inv;
            st8(p, base + j0, o);
        }
    }
}

template <typename T>
__device__ void masked_softmax_bwd_warp_v8(const T* p, const T* dp, T* ds, long rows, int tk, float scale) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    const long base = row * tk;
    float pv[WARP_ROW_MAX], dv[WARP_ROW_MAX];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < tk) {
            ld8(p, base + j0, pv + 8 * c);
            ld8(dp, base + j0, dv + 8 * c);
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) pv[8 * c + k] = dv[8 * c + k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) dot += pv[8 * c + k] * dv[8 * c + k];
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < tk) {
            float o[8];
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = scale * pv[8 * c + k] * (dv[8 * c + k] - dot);
            st8(ds, base + j0, o);
        }
    }
}

#define INSTANTIATE(T, SUF)                                                                                          \
    extern "C" __global__ void masked_softmax_fwd_##SUF(const T* s, T* p, const uint32_t* kl, int h, int tq, int tk, \
                                                        float scale, int causal) {                                   \
        masked_softmax_fwd<T>(s, p, kl, h, tq, tk, scale, causal);                                                   \
    }                                                                                                                \
    extern "C" __global__ void masked_softmax_bwd_##SUF(const T* p, const T* dp, T* ds, int tk, float scale) {       \
        masked_softmax_bwd<T>(p, dp, ds, tk, scale);                                                                 \
    }                                                                                                                \
    extern "C" __global__ void masked_softmax_fwd_warp_##SUF(const T* s, T* p, const uint32_t* kl, long rows, int h, \
                                                             int tq, int tk, float scale, int causal) {              \
        masked_softmax_fwd_warp<T>(s, p, kl, rows, h, tq, tk, scale, causal);                                        \
    }                                                                                                                \
    extern "C" __global__ void masked_softmax_bwd_warp_##SUF(const T* p, const T* dp, T* ds, long rows, int tk,      \
                                                             float scale) {                                          \
        masked_softmax_bwd_warp<T>(p, dp, ds, rows, tk, scale);                                                      \
    }                                                                                                                \
    extern "C" __global__ void masked_softmax_fwd_warp_v8_##SUF(const T* s, T* p, const uint32_t* kl, long rows,     \
                                                                int h, int tq, int tk, float scale, int causal) {    \
        masked_softmax_fwd_warp_v8<T>(s, p, kl, rows, h, tq, tk, scale, causal);                                     \
    }                                                                                                                \
    extern "C" __global__ void masked_softmax_bwd_warp_v8_##SUF(const T* p, const T* dp, T* ds, long rows, int tk,   \
                                                                float scale) {                                       \
        masked_softmax_bwd_warp_v8<T>(p, dp, ds, rows, tk, scale);                                                   \
    }                                                                                                               

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
