// Cross-attention with a short key sequence (a text context: Stable Diffusion's 77 tokens), bf16,
// forward and backward each one kernel on the tensor cores, the scores never in global memory
// (ops/cross_attention: the launchers). q (b, t, H·D), k and v (b, s, H·D), output (b, t, H·D):
// the heads are read and written in place, no transposes.
//
//   z_j = scale·q·k_j, P = softmax(z), o = Σ_j P_j v_j;
//   backward: dP_j = dO·v_j, Δ = Σ_j P_j dP_j (= dO·o), dz_j = P_j (dP_j − Δ),
//   dq = scale Σ_j dz_j k_j, dk_j = scale Σ_i dz_ij q_i, dv_j = Σ_i P_ij dO_i.
//
// A block of XT_WARPS warps takes the query rows of one (image, head) in tiles of 16 a warp, K and
// V in shared memory padded to XT_KEYS rows and DP columns (DP: the head width D rounded up to
// 16; zeros past D and past s). Per tile a warp computes its rows' scores S = Q·Kᵀ
// (16 × XT_KEYS) and the softmax, and, backward, dP = dO·Vᵀ, Δ = rowsum(P ⊙ dP),
// dS = P ⊙ (dP − Δ) and dQ = scale·dS·K; it leaves Pᵀ and dSᵀ in shared memory, from which warp w
// then adds its 16 keys' share of dV += Pᵀ·dO and dK += dSᵀ·Q. A query row past t is zeros: its P
// is uniform but meets dO = 0, so it adds nothing. dk and dv sum over every query row: each block
// sums its tiles' share in registers, then adds it to f32 accumulators with atomics; a last
// kernel casts those to bf16. Shared memory is dynamic (the launcher asks for it: the backward's
// is more than the static 48 KB). Arithmetic in f32, products bf16 in, f32 out.
#include "../cuda/common.cuh"
#include "../cuda/tc.cuh"

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
__device__ void xattn_fwd(const bf16* q, const bf16* k, const bf16* v, bf16* o, int t, int s, int heads,
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
__device__ void xattn_bwd(const bf16* q, const bf16* k, const bf16* v, const bf16* g, bf16* dq, float* dk,
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

#define INSTANTIATE(DP, D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(XT_WARPS * 32)                                                 \
        xattn_fwd_##D(const bf16* q, const bf16* k, const bf16* v, bf16* o, int t, int s, int heads,         \
                         float scale) {                                                                         \
        xattn_fwd<DP, D>(q, k, v, o, t, s, heads, scale);                                                    \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(XT_WARPS * 32)                                                 \
        xattn_bwd_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* g, bf16* dq, float* dk,      \
                         float* dv, int t, int s, int heads, float scale) {                                     \
        xattn_bwd<DP, D>(q, k, v, g, dq, dk, dv, t, s, heads, scale);                                        \
    }
INSTANTIATE(48, 40)
INSTANTIATE(64, 64)
INSTANTIATE(80, 80)
