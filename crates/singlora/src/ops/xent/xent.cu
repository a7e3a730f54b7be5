// Per-row cross-entropy of logits against class indices (ops/xent: the candle op; the CPU runs
// the composed ops): a block per row, f32 arithmetic on bf16 or f32 storage; and the fast path's
// SFT head, the loss and its gradient in one kernel.
#include "../cuda/common.cuh"

// Cross-entropy rows: out[i] = (lse_i - z[i, t_i], lse_i), lse_i = log sum_j exp z_ij; one block
// per row of c logits.
template <typename T>
__device__ void xent_fwd(const T* z, const uint32_t* t, float* out, int c) {
    const long base = (long)blockIdx.x * c;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < c; j += blockDim.x) m = fmaxf(m, ld(z, base + j));
    m = block_max(m);
    float s = 0.f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += __expf(ld(z, base + j) - m);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        float lse = m + logf(s);
        out[2 * blockIdx.x] = lse - ld(z, base + t[blockIdx.x]);
        out[2 * blockIdx.x + 1] = lse;
    }
}

// dz_ij = g_i (exp(z_ij - lse_i) - [j = t_i]), g_i the gradient of row i's loss.
template <typename T>
__device__ void xent_bwd(const T* z, const uint32_t* t, const float* lse_g, T* dz, int c) {
    const long base = (long)blockIdx.x * c;
    float lse = lse_g[2 * blockIdx.x + 1], g = lse_g[2 * blockIdx.x];
    uint32_t ti = t[blockIdx.x];
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        st(dz, base + j, g * (__expf(ld(z, base + j) - lse) - (j == (int)ti ? 1.f : 0.f)));
}

// The SFT head's cross-entropy and its gradient in one kernel, a block per row of logits z
// (n × c, c a multiple of 8, 8-wide): out[i] = lse_i − z[i, t_i], and z overwritten by
// g·(softmax(z_i) − onehot(t_i)), g the same for every row (the mean's scale). One pass finds
// the row's max and sum together (rescaling the sum when the max grows), a second writes the
// gradient; the row (64 KiB at a 32k vocabulary) is still in L2 for it. Reference: the
// composed cross-entropy and its autograd gradient (`gpu-check`, the fast path's loss and
// gradients).
template <typename T>
__device__ void xent_grad_inplace_v8(T* z, const uint32_t* t, float* out, int c, float g) {
    const long base = (long)blockIdx.x * c;
    const uint32_t ti = t[blockIdx.x];
    float zt = 0.f;
    if (threadIdx.x == 0) zt = ld(z, base + ti);  // read before any thread writes the row
    float m = -INFINITY, s = 0.f;
    for (int j = 8 * threadIdx.x; j < c; j += 8 * blockDim.x) {
        float v[8];
        ld8(z, base + j, v);
        float mm = v[0];
#pragma unroll
        for (int k = 1; k < 8; k++) mm = fmaxf(mm, v[k]);
        if (mm > m) {
            s *= __expf(m - mm);
            m = mm;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) s += __expf(v[k] - m);
    }
    const float mx = block_max(m);
    s = m == -INFINITY ? 0.f : s * __expf(m - mx);
    const float lse = mx + logf(block_sum(s));
    if (threadIdx.x == 0) out[blockIdx.x] = lse - zt;
    for (int j = 8 * threadIdx.x; j < c; j += 8 * blockDim.x) {
        float v[8];
        ld8(z, base + j, v);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = g * (__expf(v[k] - lse) - (j + k == (int)ti ? 1.f : 0.f));
        st8(z, base + j, v);
    }
}


#define INSTANTIATE(T, SUF)                                                                                          \
    extern "C" __global__ void xent_fwd_##SUF(const T* z, const uint32_t* t, float* out, int c) {                    \
        xent_fwd<T>(z, t, out, c);                                                                                   \
    }                                                                                                                \
    extern "C" __global__ void xent_bwd_##SUF(const T* z, const uint32_t* t, const float* lg, T* dz, int c) {        \
        xent_bwd<T>(z, t, lg, dz, c);                                                                                \
    }                                                                                                                \
    extern "C" __global__ void xent_grad_inplace_v8_##SUF(T* z, const uint32_t* t, float* out, int c, float g) {     \
        xent_grad_inplace_v8<T>(z, t, out, c, g);                                                                    \
    }                                                                                                               

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
