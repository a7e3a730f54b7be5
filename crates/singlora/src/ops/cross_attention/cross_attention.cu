// Cross-attention with a short key sequence (a text context: Stable Diffusion's 77 tokens), bf16,
// forward and backward each one kernel, the scores never in global memory (ops/cross_attention:
// the launchers). q (b, t, H·D), k and v (b, s, H·D), output (b, t, H·D): the heads are read and
// written in place, no transposes. Per (image, head) a block keeps K and V in shared memory; a warp
// takes one query row at a time, its lanes over the keys (lane j holds keys j, j + 32, j + 64) for
// the scores and the softmax, and over the head's dimensions for the products with V and K.
//
//   z_j = scale·q·k_j, P = softmax(z), o = Σ_j P_j v_j;
//   backward: dP_j = dO·v_j, Δ = Σ_j P_j dP_j (= dO·o), dz_j = P_j (dP_j − Δ),
//   dq = scale Σ_j dz_j k_j, dk_j = scale Σ_i dz_ij q_i, dv_j = Σ_i P_ij dO_i.
//
// dk and dv sum over every query row: each block sums its rows' share in registers (a warp per
// key subset, over tiles of query rows whose P and dz it keeps in shared memory), then adds it to
// f32 accumulators with atomics; a last kernel casts those to bf16. Arithmetic in f32.
#include "../cuda/common.cuh"

#define XA_SMAX 80   // keys at most: three per lane
#define XA_WARPS 8   // warps a block
#define XA_TILE 16   // query rows a backward tile

__device__ __forceinline__ float bf(uint16_t x) { return __uint_as_float(((uint32_t)x) << 16); }

__device__ __forceinline__ float xa_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float xa_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// One (image, head)'s K or V rows into shared memory, rows of D + 2 (an odd number of 32-bit
// words: lanes reading different rows at one column hit different banks).
template <int D>
__device__ void xa_load(const uint16_t* src, uint16_t* dst, int s, long rs) {
    for (int i = threadIdx.x; i < s * D; i += blockDim.x) {
        const int j = i / D, e = i - j * D;
        dst[j * (D + 2) + e] = src[(long)j * rs + e];
    }
}

// Σ_e a[e]·row[e] for a shared f32 vector a and a shared bf16 row, two elements per access.
template <int D>
__device__ __forceinline__ float xa_dot(const float* a, const uint16_t* row) {
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < D; e += 2) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(row + e);
        acc += a[e] * __uint_as_float(w << 16) + a[e + 1] * __uint_as_float(w & 0xffff0000u);
    }
    return acc;
}

// The softmax over the keys of scale·a·k_j, lanes over keys: p[c] for key lane + 32c (0 past s).
template <int D>
__device__ __forceinline__ void xa_probs(const float* a, const uint16_t* ks, int s, float scale, float p[3]) {
    const int lane = threadIdx.x & 31;
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < 3; c++) {
        const int j = lane + 32 * c;
        p[c] = j < s ? scale * xa_dot<D>(a, ks + j * (D + 2)) : -INFINITY;
        mx = fmaxf(mx, p[c]);
    }
    mx = xa_warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < 3; c++) {
        p[c] = lane + 32 * c < s ? __expf(p[c] - mx) : 0.f;
        sum += p[c];
    }
    const float inv = 1.f / xa_warp_sum(sum);
#pragma unroll
    for (int c = 0; c < 3; c++) p[c] *= inv;
}

// acc[e2] += Σ_j w_j · rows[j][lane + 32·e2], w_j held by lane j % 32 in w[j / 32].
template <int D>
__device__ __forceinline__ void xa_mix(const float w[3], const uint16_t* rows, int s, float acc[(D + 31) / 32]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < 3; c++) {
        const int n = min(32, s - 32 * c);
        for (int jj = 0; jj < n; jj++) {
            const float wj = __shfl_sync(0xffffffff, w[c], jj);
            const uint16_t* r = rows + (32 * c + jj) * (D + 2);
#pragma unroll
            for (int e2 = 0; e2 < (D + 31) / 32; e2++) {
                const int e = lane + 32 * e2;
                if (e < D) acc[e2] += wj * bf(r[e]);
            }
        }
    }
}

// The query rows of this block: an even share of t among gridDim.x blocks.
__device__ __forceinline__ void xa_rows(int t, int* r0, int* r1) {
    const int per = (t + gridDim.x - 1) / gridDim.x;
    *r0 = blockIdx.x * per;
    *r1 = min(t, *r0 + per);
}

template <int D>
__device__ void xattn_fwd(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* o, int t, int s,
                          int heads, float scale) {
    constexpr int E = (D + 31) / 32;
    __shared__ __align__(16) uint16_t ks[XA_SMAX * (D + 2)];
    __shared__ __align__(16) uint16_t vs[XA_SMAX * (D + 2)];
    __shared__ float qs[XA_WARPS][D];
    const int h = blockIdx.y, img = blockIdx.z;
    const long rs = (long)heads * D;  // a row's stride
    xa_load<D>(k + (long)img * s * rs + h * D, ks, s, rs);
    xa_load<D>(v + (long)img * s * rs + h * D, vs, s, rs);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int r0, r1;
    xa_rows(t, &r0, &r1);
    for (int i = r0 + warp; i < r1; i += XA_WARPS) {
        const long row = ((long)img * t + i) * rs + h * D;
        for (int e = lane; e < D; e += 32) qs[warp][e] = ld(q, row + e);
        __syncwarp();
        float p[3];
        xa_probs<D>(qs[warp], ks, s, scale, p);
        float acc[E];
#pragma unroll
        for (int e2 = 0; e2 < E; e2++) acc[e2] = 0.f;
        xa_mix<D>(p, vs, s, acc);
#pragma unroll
        for (int e2 = 0; e2 < E; e2++) {
            const int e = lane + 32 * e2;
            if (e < D) st(o, row + e, acc[e2]);
        }
        __syncwarp();
    }
}

template <int D>
__device__ void xattn_bwd(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* g, uint16_t* dq,
                          float* dk, float* dv, int t, int s, int heads, float scale) {
    constexpr int E = (D + 31) / 32;
    constexpr int KW = (XA_SMAX + XA_WARPS - 1) / XA_WARPS;  // keys a warp sums dk, dv for
    __shared__ __align__(16) uint16_t ks[XA_SMAX * (D + 2)];
    __shared__ __align__(16) uint16_t vs[XA_SMAX * (D + 2)];
    __shared__ float qt[XA_TILE][D], gt[XA_TILE][D];
    __shared__ float pt[XA_TILE][XA_SMAX], zt[XA_TILE][XA_SMAX];
    const int h = blockIdx.y, img = blockIdx.z;
    const long rs = (long)heads * D;  // a row's stride
    xa_load<D>(k + (long)img * s * rs + h * D, ks, s, rs);
    xa_load<D>(v + (long)img * s * rs + h * D, vs, s, rs);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float dka[KW][E], dva[KW][E];
#pragma unroll
    for (int u = 0; u < KW; u++)
#pragma unroll
        for (int e2 = 0; e2 < E; e2++) dka[u][e2] = dva[u][e2] = 0.f;
    int r0, r1;
    xa_rows(t, &r0, &r1);
    for (int i0 = r0; i0 < r1; i0 += XA_TILE) {
        const int n = min(XA_TILE, r1 - i0);
        __syncthreads();  // K, V loaded; the previous tile's sums done
        for (int x = threadIdx.x; x < n * D; x += blockDim.x) {
            const int r = x / D, e = x - r * D;
            const long at = ((long)img * t + i0 + r) * rs + h * D + e;
            qt[r][e] = ld(q, at);
            gt[r][e] = ld(g, at);
        }
        __syncthreads();
        // each warp its rows: P, dz into the tile, dq out
        for (int r = warp; r < n; r += XA_WARPS) {
            float p[3], z[3];
            xa_probs<D>(qt[r], ks, s, scale, p);
            float delta = 0.f;
#pragma unroll
            for (int c = 0; c < 3; c++) {
                const int j = lane + 32 * c;
                const float dp = j < s ? xa_dot<D>(gt[r], vs + j * (D + 2)) : 0.f;
                z[c] = dp;
                delta += p[c] * dp;
            }
            delta = xa_warp_sum(delta);
#pragma unroll
            for (int c = 0; c < 3; c++) {
                const int j = lane + 32 * c;
                z[c] = p[c] * (z[c] - delta);
                if (j < s) {
                    pt[r][j] = p[c];
                    zt[r][j] = z[c];
                }
            }
            float acc[E];
#pragma unroll
            for (int e2 = 0; e2 < E; e2++) acc[e2] = 0.f;
            xa_mix<D>(z, ks, s, acc);
            const long row = ((long)img * t + i0 + r) * rs + h * D;
#pragma unroll
            for (int e2 = 0; e2 < E; e2++) {
                const int e = lane + 32 * e2;
                if (e < D) st(dq, row + e, scale * acc[e2]);
            }
        }
        __syncthreads();
        // each warp its keys: the tile's share of dk, dv
        for (int r = 0; r < n; r++) {
#pragma unroll
            for (int u = 0; u < KW; u++) {
                const int j = warp + XA_WARPS * u;
                if (j < s) {
                    const float pj = pt[r][j], zj = zt[r][j];
#pragma unroll
                    for (int e2 = 0; e2 < E; e2++) {
                        const int e = lane + 32 * e2;
                        if (e < D) {
                            dva[u][e2] += pj * gt[r][e];
                            dka[u][e2] += zj * qt[r][e];
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int u = 0; u < KW; u++) {
        const int j = warp + XA_WARPS * u;
        if (j < s) {
#pragma unroll
            for (int e2 = 0; e2 < E; e2++) {
                const int e = lane + 32 * e2;
                if (e < D) {
                    const long at = ((long)img * s + j) * rs + h * D + e;
                    atomicAdd(dk + at, scale * dka[u][e2]);
                    atomicAdd(dv + at, dva[u][e2]);
                }
            }
        }
    }
}

// The f32 sums to bf16.
extern "C" __global__ void xattn_cast(const float* src, uint16_t* dst, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(dst, i, src[i]);
}

#define INSTANTIATE(D)                                                                                          \
    extern "C" __global__ void __launch_bounds__(XA_WARPS * 32)                                                 \
        xattn_fwd_##D(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* o, int t, int s,      \
                      int heads, float scale) {                                                                 \
        xattn_fwd<D>(q, k, v, o, t, s, heads, scale);                                                           \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(XA_WARPS * 32)                                                 \
        xattn_bwd_##D(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* g, uint16_t* dq, \
                      float* dk, float* dv, int t, int s, int heads, float scale) {                             \
        xattn_bwd<D>(q, k, v, g, dq, dk, dv, t, s, heads, scale);                                               \
    }
INSTANTIATE(40)
INSTANTIATE(64)
INSTANTIATE(80)
