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
#include "../cuda/tc.cuh"

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

// The same on the tensor cores (xattn_tc_*): a block of XT_WARPS warps takes the query rows of
// one (image, head) in tiles of 16 a warp, K and V in shared memory padded to XT_KEYS rows and DP
// columns (DP: the head width D rounded up to 16; zeros past D and past s). Per tile a warp
// computes its rows' scores S = Q·Kᵀ (16 × XT_KEYS), the softmax, and, backward, dP = dO·Vᵀ,
// Δ = rowsum(P ⊙ dP), dS = P ⊙ (dP − Δ) and dQ = scale·dS·K; it leaves Pᵀ and dSᵀ in shared
// memory, from which warp w then adds its 16 keys' share of dV += Pᵀ·dO and dK += dSᵀ·Q. A query
// row past t is zeros: its P is uniform but meets dO = 0, so it adds nothing. Shared memory is
// dynamic (the launcher asks for it: more than the static 48 KB backward).
#define XT_WARPS 5
#define XT_ROWS (16 * XT_WARPS)  // query rows a tile
#define XT_KEYS 80                // keys at most (five tiles of 16)
#define XT_LOG2E 1.4426950408889634f

// Rows r0 .. r0 + rows − 1 of a (·, D) head slice of row stride ld into a shared tile of row
// stride DP + 8: rows past n and columns past D are zeros. Asynchronous (cp.async).
template <int DP, int D>
__device__ __forceinline__ void xt_load(bf16* s, const bf16* g, long ld, int r0, int n, int rows) {
    constexpr int CH = DP / 8;
    for (int i = threadIdx.x; i < rows * CH; i += blockDim.x) {
        const int r = i / CH, c = (i % CH) * 8;
        const bool ok = r0 + r < n && c < D;
        tc::cp16(s + r * (DP + 8) + c, g + (ok ? (long)(r0 + r) * ld + c : 0), ok);
    }
}

// The softmax of sl2·S (log2 units) over keys below s, in place: a warp's 16 rows as C
// fragments (thread: rows lane/4 and lane/4 + 8, keys 8·nt + 2·(lane % 4) + {0, 1}).
__device__ __forceinline__ void xt_softmax(float (&sc)[XT_KEYS / 8][4], int s, float sl2) {
    const int tg = threadIdx.x & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float m = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < XT_KEYS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (8 * nt + 2 * tg + e >= s) sc[nt][2 * r + e] = -INFINITY;
                m = fmaxf(m, sc[nt][2 * r + e]);
            }
        m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
        float l = 0.f;
#pragma unroll
        for (int nt = 0; nt < XT_KEYS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float p = exp2f((sc[nt][2 * r + e] - m) * sl2);
                sc[nt][2 * r + e] = p;
                l += p;
            }
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const float inv = 1.f / l;
#pragma unroll
        for (int nt = 0; nt < XT_KEYS / 8; nt++) {
            sc[nt][2 * r] *= inv;
            sc[nt][2 * r + 1] *= inv;
        }
    }
}

// A warp's 16 × DP C fragments times mul into rows q0 + 16·w + … (below t) of a (·, D) head
// slice of row stride ld, columns below D.
template <int DP, int D>
__device__ __forceinline__ void xt_store(bf16* g, long ld, const float (&x)[DP / 8][4], int q0, int t, float mul) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, tg = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = q0 + 16 * w + (lane >> 2) + 8 * r;
        if (row >= t) continue;
#pragma unroll
        for (int i = 0; i < DP / 8; i++)
            if (8 * i + 2 * tg < D)
                *reinterpret_cast<uint32_t*>(g + (long)row * ld + 8 * i + 2 * tg) =
                    tc::pack2(x[i][2 * r] * mul, x[i][2 * r + 1] * mul);
    }
}

// The query tiles of this block: an even share of the (image, head)'s tiles among gridDim.x.
__device__ __forceinline__ void xt_tiles(int t, int* i0, int* i1) {
    const int n = (t + XT_ROWS - 1) / XT_ROWS, per = (n + gridDim.x - 1) / gridDim.x;
    *i0 = blockIdx.x * per;
    *i1 = min(n, *i0 + per);
}

template <int DP, int D>
__device__ void xattn_tc_fwd(const bf16* q, const bf16* k, const bf16* v, bf16* o, int t, int s, int heads,
                             float scale) {
    extern __shared__ __align__(16) unsigned char xt_smem[];
    bf16* ks = reinterpret_cast<bf16*>(xt_smem);
    bf16* vs = ks + XT_KEYS * (DP + 8);
    bf16* qs = vs + XT_KEYS * (DP + 8);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, img = blockIdx.z;
    const long rs = (long)heads * D;
    const bf16* qg = q + (long)img * t * rs + h * D;
    bf16* og = o + (long)img * t * rs + h * D;
    xt_load<DP, D>(ks, k + (long)img * s * rs + h * D, rs, 0, s, XT_KEYS);
    xt_load<DP, D>(vs, v + (long)img * s * rs + h * D, rs, 0, s, XT_KEYS);
    int i0, i1;
    xt_tiles(t, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        const int q0 = i * XT_ROWS;
        xt_load<DP, D>(qs, qg, rs, q0, t, XT_ROWS);
        tc::cp_commit();
        tc::cp_wait();
        __syncthreads();
        float sc[XT_KEYS / 8][4];
        tc::zero(sc);
        {
            uint32_t a[DP / 16][4];
            tc::frags<DP>(a, qs, w, lane);
            tc::mul_bt<DP, DP / 16, XT_KEYS / 8>(sc, a, ks, lane);
        }
        xt_softmax(sc, s, scale * XT_LOG2E);
        float acc[DP / 8][4];
        tc::zero(acc);
        tc::mul_b<DP, XT_KEYS / 16>(acc, sc, vs, lane);
        xt_store<DP, D>(og, rs, acc, q0, t, 1.f);
        __syncthreads();  // before the next tile's Q
    }
}

template <int DP, int D>
__device__ void xattn_tc_bwd(const bf16* q, const bf16* k, const bf16* v, const bf16* g, bf16* dq, float* dk,
                             float* dv, int t, int s, int heads, float scale) {
    extern __shared__ __align__(16) unsigned char xt_smem[];
    bf16* ks = reinterpret_cast<bf16*>(xt_smem);
    bf16* vs = ks + XT_KEYS * (DP + 8);
    bf16* qs = vs + XT_KEYS * (DP + 8);
    bf16* gs = qs + XT_ROWS * (DP + 8);
    bf16* pt = gs + XT_ROWS * (DP + 8);  // Pᵀ (keys × query rows, row stride XT_ROWS + 8)
    bf16* st = pt + XT_KEYS * (XT_ROWS + 8);  // dSᵀ
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, tg = lane & 3;
    const int h = blockIdx.y, img = blockIdx.z;
    const long rs = (long)heads * D;
    const long at = (long)img * t * rs + h * D;
    xt_load<DP, D>(ks, k + (long)img * s * rs + h * D, rs, 0, s, XT_KEYS);
    xt_load<DP, D>(vs, v + (long)img * s * rs + h * D, rs, 0, s, XT_KEYS);
    float dka[DP / 8][4], dva[DP / 8][4];
    tc::zero(dka);
    tc::zero(dva);
    int i0, i1;
    xt_tiles(t, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        const int q0 = i * XT_ROWS;
        xt_load<DP, D>(qs, q + at, rs, q0, t, XT_ROWS);
        xt_load<DP, D>(gs, g + at, rs, q0, t, XT_ROWS);
        tc::cp_commit();
        tc::cp_wait();
        __syncthreads();
        float sc[XT_KEYS / 8][4], dp[XT_KEYS / 8][4];
        tc::zero(sc);
        tc::zero(dp);
        {
            uint32_t a[DP / 16][4];
            tc::frags<DP>(a, qs, w, lane);
            tc::mul_bt<DP, DP / 16, XT_KEYS / 8>(sc, a, ks, lane);
            tc::frags<DP>(a, gs, w, lane);
            tc::mul_bt<DP, DP / 16, XT_KEYS / 8>(dp, a, vs, lane);
        }
        xt_softmax(sc, s, scale * XT_LOG2E);
        // dS = P ⊙ (dP − Δ) into dp; Pᵀ and dSᵀ to shared memory
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float delta = 0.f;
#pragma unroll
            for (int nt = 0; nt < XT_KEYS / 8; nt++)
                delta += sc[nt][2 * r] * dp[nt][2 * r] + sc[nt][2 * r + 1] * dp[nt][2 * r + 1];
            delta += __shfl_xor_sync(0xffffffff, delta, 1);
            delta += __shfl_xor_sync(0xffffffff, delta, 2);
            const int row = 16 * w + (lane >> 2) + 8 * r;
#pragma unroll
            for (int nt = 0; nt < XT_KEYS / 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float p = sc[nt][2 * r + e];
                    const float ds = p * (dp[nt][2 * r + e] - delta);
                    dp[nt][2 * r + e] = ds;
                    const int key = 8 * nt + 2 * tg + e;
                    pt[key * (XT_ROWS + 8) + row] = (bf16)(tc::pack2(p, 0.f) & 0xffff);
                    st[key * (XT_ROWS + 8) + row] = (bf16)(tc::pack2(ds, 0.f) & 0xffff);
                }
        }
        {
            float acc[DP / 8][4];
            tc::zero(acc);
            tc::mul_b<DP, XT_KEYS / 16>(acc, dp, ks, lane);
            xt_store<DP, D>(dq + at, rs, acc, q0, t, scale);
        }
        __syncthreads();  // Pᵀ, dSᵀ complete
        // warp w's keys 16w .. 16w + 15: dV += Pᵀ·dO, dK += dSᵀ·Q over the tile's rows
#pragma unroll
        for (int kk = 0; kk < XT_ROWS / 16; kk++) {
            uint32_t ap[4], as[4];
            tc::ldsm(ap, tc::a_at<XT_ROWS>(pt, w, kk, lane));
            tc::ldsm(as, tc::a_at<XT_ROWS>(st, w, kk, lane));
#pragma unroll
            for (int p = 0; p < DP / 16; p++) {
                uint32_t b[4];
                tc::ldsm_t(b, tc::b_at<DP>(gs, kk, p, lane));
                tc::mma(dva[2 * p], ap, b[0], b[1]);
                tc::mma(dva[2 * p + 1], ap, b[2], b[3]);
                tc::ldsm_t(b, tc::b_at<DP>(qs, kk, p, lane));
                tc::mma(dka[2 * p], as, b[0], b[1]);
                tc::mma(dka[2 * p + 1], as, b[2], b[3]);
            }
        }
        __syncthreads();  // before the next tile's loads
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = 16 * w + (lane >> 2) + 8 * r;
        if (key >= s) continue;
        const long row = ((long)img * s + key) * rs + h * D;
#pragma unroll
        for (int i = 0; i < DP / 8; i++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int c = 8 * i + 2 * tg + e;
                if (c < D) {
                    atomicAdd(dk + row + c, scale * dka[i][2 * r + e]);
                    atomicAdd(dv + row + c, dva[i][2 * r + e]);
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

#define INSTANTIATE_TC(DP, D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(XT_WARPS * 32)                                                 \
        xattn_tc_fwd_##D(const bf16* q, const bf16* k, const bf16* v, bf16* o, int t, int s, int heads,         \
                         float scale) {                                                                         \
        xattn_tc_fwd<DP, D>(q, k, v, o, t, s, heads, scale);                                                    \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(XT_WARPS * 32)                                                 \
        xattn_tc_bwd_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* g, bf16* dq, float* dk,      \
                         float* dv, int t, int s, int heads, float scale) {                                     \
        xattn_tc_bwd<DP, D>(q, k, v, g, dq, dk, dv, t, s, heads, scale);                                        \
    }
INSTANTIATE_TC(48, 40)
INSTANTIATE_TC(64, 64)
INSTANTIATE_TC(80, 80)
