// Fused (flash-style) attention for bf16 with head size 64 or 128 (and 48, 80): the scores and probabilities
// live only in registers, tile by tile, never in memory. Forward: a block of 4 warps takes 64
// query rows of one head and runs over the key tiles with an online softmax, writing O straight
// into the merged (b, t, h·d) layout and the row's log-sum-exp. Backward: one kernel per 64
// queries computes Δ = rowsum(dO ⊙ O) and accumulates dQ; then one kernel per 64 keys of one
// query head recomputes P and accumulates dK and dV (partial sums per query head when the
// heads share a KV head, summed by kv_sum). Gradients go through the inverse rotation straight
// into the attention block's packed input gradient. Products on the tensor cores (mma.sync
// m16n8k16, bf16 in, f32 accumulate) with ldmatrix loads from padded shared-memory tiles.
//
// Masks as masked_softmax_fwd in softmax/softmax.cu: query row i of batch row b sees keys
// j < L_i = min(key_lens[b], t, causal ? i + 1 : t), always a prefix.
//
// Layouts: q (b, h, t, d), k and v (b, kvh, t, d) (the RoPE/split kernel's outputs); o and dO
// (b, t, h, d); lse and Δ (b, h, t) f32; dq (b, h, t, d); dk and dv (b, kvh, t, d).

#include "../cuda/tc.cuh"

#define FA_BM 64  // query rows per block, 16 per warp
#define FA_BN 64  // keys per tile
#define FA_LOG2E 1.4426950408889634f

namespace {

using namespace tc;

// Rows r0 .. r0 + 63 (those < n; zeros past it) of a row-major matrix of row stride ld into a
// shared tile of row stride D + 8 (the padding keeps ldmatrix's 8 row reads on distinct banks).
template <int D>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, long ld, int r0, int n) {
    constexpr int CH = D / 8;
    for (int i = threadIdx.x; i < FA_BM * CH; i += 128) {
        const int r = i / CH, c = (i % CH) * 8;
        const bool ok = r0 + r < n;
        cp16(s + r * (D + 8) + c, g + (ok ? (long)(r0 + r) * ld : 0) + c, ok);
    }
}

// The visible keys of query row i: j < lim(i).
__device__ __forceinline__ int lim(int len, int i, int causal) { return causal ? min(len, i + 1) : len; }

template <int D>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                          bf16* __restrict__ o, float* __restrict__ lse, const uint32_t* __restrict__ key_lens, int h,
                          int kvh, int t, float scale, int causal) {
    __shared__ __align__(16) bf16 ks[FA_BN * (D + 8)];
    __shared__ __align__(16) bf16 vs[FA_BN * (D + 8)];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, tg = lane & 3;
    const int qb = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;  // the longest rows first
    const int bb = bh / h, hh = bh % h, kv = bb * kvh + hh / (h / kvh);
    const int q0 = qb * FA_BM, len = min((int)key_lens[bb], t);
    const bf16* kg = k + (long)kv * t * D;
    const bf16* vg = v + (long)kv * t * D;
    // Q through the K tile into registers
    load_tile<D>(ks, q + (long)bh * t * D, D, q0, t);
    cp_commit();
    cp_wait();
    __syncthreads();
    uint32_t qf[D / 16][4];
    frags<D>(qf, ks, w, lane);
    __syncthreads();
    const int row[2] = {q0 + 16 * w + (lane >> 2), q0 + 16 * w + (lane >> 2) + 8};
    const int lm[2] = {lim(len, row[0], causal), lim(len, row[1], causal)};
    const int kend = causal ? min(len, q0 + FA_BM) : len, nkb = (kend + FA_BN - 1) / FA_BN;
    const float sl2 = scale * FA_LOG2E;
    float acc[D / 8][4], mx[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
    zero(acc);
    if (nkb > 0) load_tile<D>(ks, kg, D, 0, t);
    cp_commit();
    for (int j = 0; j < nkb; j++) {
        const int k0 = j * FA_BN;
        cp_wait();
        __syncthreads();
        load_tile<D>(vs, vg, D, k0, t);  // V_j while S is computed
        cp_commit();
        float s[FA_BN / 8][4];
        zero(s);
        mul_bt<D>(s, qf, ks, lane);
        if (k0 + FA_BN > min(lm[0], lm[1])) {
#pragma unroll
            for (int nt = 0; nt < FA_BN / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (k0 + 8 * nt + 2 * tg + (e & 1) >= lm[e >> 1]) s[nt][e] = -INFINITY;
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float m = mx[r];
#pragma unroll
            for (int nt = 0; nt < FA_BN / 8; nt++) m = fmaxf(m, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
            const float base = m == -INFINITY ? 0.f : m * sl2;
            alpha[r] = exp2f(mx[r] * sl2 - base);
            mx[r] = m;
            float ps = 0.f;
#pragma unroll
            for (int nt = 0; nt < FA_BN / 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float p = exp2f(s[nt][2 * r + e] * sl2 - base);
                    s[nt][2 * r + e] = p;
                    ps += p;
                }
            sum[r] = sum[r] * alpha[r] + ps;
        }
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            acc[i][0] *= alpha[0];
            acc[i][1] *= alpha[0];
            acc[i][2] *= alpha[1];
            acc[i][3] *= alpha[1];
        }
        cp_wait();
        __syncthreads();
        if (j + 1 < nkb) load_tile<D>(ks, kg, D, k0 + FA_BN, t);  // K_{j+1} while P·V runs
        cp_commit();
        mul_b<D, FA_BN / 16>(acc, s, vs, lane);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = sum[r];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        if (row[r] >= t) continue;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        bf16* orow = o + (((long)bb * t + row[r]) * h + hh) * D + 2 * tg;
#pragma unroll
        for (int i = 0; i < D / 8; i++)
            *reinterpret_cast<uint32_t*>(orow + 8 * i) = pack2(acc[i][2 * r] * inv, acc[i][2 * r + 1] * inv);
        if (tg == 0) lse[(long)bh * t + row[r]] = l > 0.f ? mx[r] * scale + logf(l) : INFINITY;
    }
}

// Σ x ⊙ y over 8 bf16 pairs.
__device__ __forceinline__ float dot8(uint4 x, uint4 y) {
    const uint32_t xv[4] = {x.x, x.y, x.z, x.w}, yv[4] = {y.x, y.y, y.z, y.w};
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        acc += __uint_as_float(xv[i] << 16) * __uint_as_float(yv[i] << 16);
        acc += __uint_as_float(xv[i] & 0xffff0000u) * __uint_as_float(yv[i] & 0xffff0000u);
    }
    return acc;
}

// Shared tiles per operand in the backward kernels: two (the next tile loads while this one is
// used) where they fit in the 48 KB of static shared memory.
template <int D>
struct Stages {
    static constexpr int n = D <= 64 ? 2 : 1;
};

// The backward's outputs go straight into the merged layout of the attention block's input
// gradient, through the inverse of RoPE's rotation when `rotate` (q and k): one of the thread's
// two rows (r) of a (16 × D) C-fragment block x, times mul, at the element offset `at` of its
// (b, position, head) row; columns j and j + D/2 are held by the same thread.
template <int D>
__device__ __forceinline__ void store_row(bf16* out, long at, const float (&x)[D / 8][4], int r, float mul, bool rotate,
                                          const float* cs, const float* sn, int pos, int tg) {
#pragma unroll
    for (int i = 0; i < D / 16; i++) {
        const int j = 8 * i + 2 * tg;
        float y1[2], y2[2];
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const float x1 = x[i][2 * r + e] * mul, x2 = x[i + D / 16][2 * r + e] * mul;
            if (rotate) {
                const float co = cs[(long)pos * D + j + e], si = sn[(long)pos * D + j + e];
                y1[e] = x1 * co + x2 * si;
                y2[e] = x2 * co - x1 * si;
            } else {
                y1[e] = x1;
                y2[e] = x2;
            }
        }
        *reinterpret_cast<uint32_t*>(out + at + j) = pack2(y1[0], y1[1]);
        *reinterpret_cast<uint32_t*>(out + at + j + D / 2) = pack2(y2[0], y2[1]);
    }
}

// dK and dV of 64 keys from hpc query heads of one KV head (blockIdx.y = (b·h + first head) /
// hpc), into the packed input gradient out = [dq | dk | dv] (merged layouts, nq and nk
// elements): straight there when the block takes all of the KV head's query heads (hpc = rep);
// otherwise as f32 partial sums (b, h / hpc, t, d) in pk, pv for kv_sum. More heads a block:
// fewer partials to write and sum, but fewer blocks and a longer longest one (causal).
template <int D>
__device__ void flash_bwd_kv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                             const bf16* __restrict__ dout, const float* __restrict__ lse,
                             const float* __restrict__ dsum, float* __restrict__ pk, float* __restrict__ pv,
                             bf16* __restrict__ out, long nq, long nk, const float* __restrict__ cs,
                             const float* __restrict__ sn, const uint32_t* __restrict__ key_lens, int h, int kvh, int t,
                             float scale, int causal, int hpc) {
    constexpr int S = Stages<D>::n;
    __shared__ __align__(16) bf16 qs[S][FA_BM * (D + 8)];
    __shared__ __align__(16) bf16 os[S][FA_BM * (D + 8)];  // dO
    __shared__ float lse_s[S][FA_BM], dsum_s[S][FA_BM];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, tg = lane & 3;
    const int kb = blockIdx.x, grp = blockIdx.y;  // the keys with the most rows first
    const int bb = grp / (h / hpc), h0 = (grp % (h / hpc)) * hpc, rep = h / kvh, kh = h0 / rep, kv = bb * kvh + kh;
    const int k0 = kb * FA_BN, len = min((int)key_lens[bb], t);
    // this warp's 16 keys (K and V as A operands) through the shared tiles
    load_tile<D>(qs[0], k + (long)kv * t * D, D, k0, t);
    load_tile<D>(os[0], v + (long)kv * t * D, D, k0, t);
    cp_commit();
    cp_wait();
    __syncthreads();
    uint32_t kf[D / 16][4], vf[D / 16][4];
    frags<D>(kf, qs[0], w, lane);
    frags<D>(vf, os[0], w, lane);
    __syncthreads();
    const int key[2] = {k0 + 16 * w + (lane >> 2), k0 + 16 * w + (lane >> 2) + 8};
    const float sl2 = scale * FA_LOG2E;
    float gk[D / 8][4], gv[D / 8][4];
    zero(gk);
    zero(gv);
    const int nqb = (t + FA_BM - 1) / FA_BM;
    const int qstart = (k0 < len) ? (causal ? k0 / FA_BM : 0) : nqb;
    // iterations: the query tiles qstart .. nqb - 1 of each of the hpc heads in turn
    const int per = nqb - qstart, its = per * hpc;
    auto issue = [&](int it, int st) {
        const int q0 = (qstart + it % per) * FA_BM;
        const long bh = (long)bb * h + h0 + it / per;
        load_tile<D>(qs[st], q + bh * t * D, D, q0, t);
        load_tile<D>(os[st], dout + ((long)bb * t * h + h0 + it / per) * D, (long)h * D, q0, t);
        cp_commit();
        if (threadIdx.x < FA_BM) {
            const int r = q0 + threadIdx.x;
            lse_s[st][threadIdx.x] = r < t ? lse[bh * t + r] * FA_LOG2E : 0.f;
            dsum_s[st][threadIdx.x] = r < t ? dsum[bh * t + r] : 0.f;
        }
    };
    if (its > 0) issue(0, 0);
    for (int it = 0; it < its; it++) {
        const int q0 = (qstart + it % per) * FA_BM, st = stage_in<S>(it, its, issue);
        // Pᵀ (keys × queries) = exp(scale·K·Qᵀ − lse)
        float pt[FA_BM / 8][4];
        zero(pt);
        mul_bt<D>(pt, kf, qs[st], lane);
        // every query row of the tile sees every key of the block
        const bool whole = q0 + FA_BM <= t && k0 + FA_BN <= len && (!causal || k0 + FA_BN - 1 <= q0);
#pragma unroll
        for (int nt = 0; nt < FA_BM / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int c = 8 * nt + 2 * tg + (e & 1), i = q0 + c;
                const bool ok = whole || (i < t && key[e >> 1] < lim(len, i, causal));
                pt[nt][e] = ok ? exp2f(pt[nt][e] * sl2 - lse_s[st][c]) : 0.f;
            }
        mul_b<D, FA_BM / 16>(gv, pt, os[st], lane);  // dV += Pᵀ·dO
        float dpt[FA_BM / 8][4];                      // dPᵀ = V·dOᵀ
        zero(dpt);
        mul_bt<D>(dpt, vf, os[st], lane);
#pragma unroll
        for (int nt = 0; nt < FA_BM / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) pt[nt][e] *= dpt[nt][e] - dsum_s[st][8 * nt + 2 * tg + (e & 1)];
        mul_b<D, FA_BM / 16>(gk, pt, qs[st], lane);  // dK += dSᵀ·Q (scale applied at the end)
        stage_out<S>(it, its, issue);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (key[r] >= t) continue;
        if (hpc < rep) {
            const long at = ((long)grp * t + key[r]) * D + 2 * tg;
#pragma unroll
            for (int i = 0; i < D / 8; i++) {
                *reinterpret_cast<float2*>(pk + at + 8 * i) = make_float2(gk[i][2 * r] * scale, gk[i][2 * r + 1] * scale);
                *reinterpret_cast<float2*>(pv + at + 8 * i) = make_float2(gv[i][2 * r], gv[i][2 * r + 1]);
            }
        } else {
            const long at = (((long)bb * t + key[r]) * kvh + kh) * D;
            store_row<D>(out + nq, at, gk, r, scale, true, cs, sn, key[r], tg);
            store_row<D>(out + nq + nk, at, gv, r, 1.f, false, cs, sn, key[r], tg);
        }
    }
}

// dk and dv from each KV head's `parts` partials (b, kvh, parts, t, d) f32, summed, rotated back (k)
// and merged into out's (b, t, kvh, d) blocks at nq and nq + nk; blockIdx.y: 0 for k, 1 for v.
// A thread takes 4 columns of a row's first half and their partners in the second.
template <int D>
__device__ void kv_sum(const float* __restrict__ pk, const float* __restrict__ pv, bf16* __restrict__ out, long nq,
                       long nk, const float* __restrict__ cs, const float* __restrict__ sn, int kvh, int t,
                       int parts) {
    const bool is_k = blockIdx.y == 0;
    const float* p = is_k ? pk : pv;
    bf16* dst = out + nq + (is_k ? 0 : nk);
    constexpr int Q = D / 8;  // threads per row
    const long rows = nk / D;  // (b, kvh, t)
    for (long g = (long)blockIdx.x * blockDim.x + threadIdx.x; g < rows * Q; g += (long)gridDim.x * blockDim.x) {
        const long row = g / Q;
        const int j = (g % Q) * 4, pos = row % t;
        const long kv = row / t, bb = kv / kvh, kh = kv % kvh;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f), c = a;
        for (int r = 0; r < parts; r++) {
            const float* src = p + ((kv * parts + r) * t + pos) * D + j;
            const float4 x = *reinterpret_cast<const float4*>(src);
            const float4 y = *reinterpret_cast<const float4*>(src + D / 2);
            a.x += x.x, a.y += x.y, a.z += x.z, a.w += x.w;
            c.x += y.x, c.y += y.y, c.z += y.z, c.w += y.w;
        }
        float x1[4] = {a.x, a.y, a.z, a.w}, x2[4] = {c.x, c.y, c.z, c.w}, y1[4], y2[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (is_k) {
                const float co = cs[(long)pos * D + j + e], si = sn[(long)pos * D + j + e];
                y1[e] = x1[e] * co + x2[e] * si;
                y2[e] = x2[e] * co - x1[e] * si;
            } else {
                y1[e] = x1[e];
                y2[e] = x2[e];
            }
        }
        const long at = ((bb * t + pos) * kvh + kh) * D + j;
        *reinterpret_cast<uint2*>(dst + at) = make_uint2(pack2(y1[0], y1[1]), pack2(y1[2], y1[3]));
        *reinterpret_cast<uint2*>(dst + at + D / 2) = make_uint2(pack2(y2[0], y2[1]), pack2(y2[2], y2[3]));
    }
}

// dQ of 64 query rows of one head, into out's (b, t, h, d) block at 0 (rotated back); first
// the rows' Δ = rowsum(dO ⊙ O), which it writes for flash_bwd_kv (launched after it).
template <int D>
__device__ void flash_bwd_q(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                            const bf16* __restrict__ o, const bf16* __restrict__ dout, const float* __restrict__ lse,
                            float* __restrict__ dsum, bf16* __restrict__ out, const float* __restrict__ cs,
                            const float* __restrict__ sn, const uint32_t* __restrict__ key_lens, int h, int kvh, int t,
                            float scale, int causal) {
    constexpr int S = Stages<D>::n;
    __shared__ __align__(16) bf16 ks[S][FA_BN * (D + 8)];
    __shared__ __align__(16) bf16 vs[S][FA_BN * (D + 8)];
    __shared__ float dl_s[FA_BM];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, tg = lane & 3;
    const int qb = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
    const int bb = bh / h, hh = bh % h, kv = bb * kvh + hh / (h / kvh);
    const int q0 = qb * FA_BM, len = min((int)key_lens[bb], t);
    // Q and dO of this warp's rows as A operands, through the shared tiles
    const long merged = ((long)bb * t * h + hh) * D;
    load_tile<D>(ks[0], q + (long)bh * t * D, D, q0, t);
    load_tile<D>(vs[0], dout + merged, (long)h * D, q0, t);
    cp_commit();
    cp_wait();
    __syncthreads();
    uint32_t qf[D / 16][4], of[D / 16][4];
    frags<D>(qf, ks[0], w, lane);
    frags<D>(of, vs[0], w, lane);
    __syncthreads();
    // Δ of the 64 rows, two threads a row, from dO (still in vs[0]) and O (into ks[0])
    load_tile<D>(ks[0], o + merged, (long)h * D, q0, t);
    cp_commit();
    cp_wait();
    __syncthreads();
    {
        const int rr = threadIdx.x >> 1, c0 = (threadIdx.x & 1) * (D / 2);
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < D / 2; c += 8)
            acc += dot8(*reinterpret_cast<const uint4*>(vs[0] + rr * (D + 8) + c0 + c),
                        *reinterpret_cast<const uint4*>(ks[0] + rr * (D + 8) + c0 + c));
        acc += __shfl_xor_sync(0xffffffff, acc, 1);
        if (c0 == 0) {
            dl_s[rr] = acc;
            if (q0 + rr < t) dsum[(long)bh * t + q0 + rr] = acc;
        }
    }
    __syncthreads();
    const int row[2] = {q0 + 16 * w + (lane >> 2), q0 + 16 * w + (lane >> 2) + 8};
    const int lm[2] = {lim(len, row[0], causal), lim(len, row[1], causal)};
    float ls[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        ls[r] = row[r] < t ? lse[(long)bh * t + row[r]] * FA_LOG2E : 0.f;
        dl[r] = dl_s[row[r] - q0];
    }
    const float sl2 = scale * FA_LOG2E;
    const bf16* kg = k + (long)kv * t * D;
    const bf16* vg = v + (long)kv * t * D;
    float gq[D / 8][4];
    zero(gq);
    const int kend = causal ? min(len, q0 + FA_BM) : len, nkb = (kend + FA_BN - 1) / FA_BN;
    auto issue = [&](int j, int st) {
        load_tile<D>(ks[st], kg, D, j * FA_BN, t);
        load_tile<D>(vs[st], vg, D, j * FA_BN, t);
        cp_commit();
    };
    if (nkb > 0) issue(0, 0);
    for (int j = 0; j < nkb; j++) {
        const int k0 = j * FA_BN, st = stage_in<S>(j, nkb, issue);
        float s[FA_BN / 8][4], dp[FA_BN / 8][4];
        zero(s);
        zero(dp);
        mul_bt<D>(s, qf, ks[st], lane);   // S = Q·Kᵀ
        mul_bt<D>(dp, of, vs[st], lane);  // dP = dO·Vᵀ
        const bool whole = k0 + FA_BN <= min(lm[0], lm[1]);
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >> 1;
                const bool ok = whole || k0 + 8 * nt + 2 * tg + (e & 1) < lm[r];
                const float p = ok ? exp2f(s[nt][e] * sl2 - ls[r]) : 0.f;
                s[nt][e] = p * (dp[nt][e] - dl[r]);
            }
        mul_b<D, FA_BN / 16>(gq, s, ks[st], lane);  // dQ += dS·K
        stage_out<S>(j, nkb, issue);
    }
#pragma unroll
    for (int r = 0; r < 2; r++)
        if (row[r] < t) store_row<D>(out, (((long)bb * t + row[r]) * h + hh) * D, gq, r, scale, true, cs, sn, row[r], tg);
}

}  // namespace

#define INSTANTIATE_FLASH(D, FWD, KV)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128, FWD)                                                             \
        flash_fwd##D(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const uint32_t* key_lens,       \
                     int h, int kvh, int t, float scale, int causal) {                                                 \
        flash_fwd<D>(q, k, v, o, lse, key_lens, h, kvh, t, scale, causal);                                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128, KV) flash_bwd_kv##D(                                             \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dsum, float* pk,  \
        float* pv, bf16* out, long nq, long nk, const float* cs, const float* sn, const uint32_t* key_lens, int h,     \
        int kvh, int t, float scale, int causal, int hpc) {                                                            \
        flash_bwd_kv<D>(q, k, v, dout, lse, dsum, pk, pv, out, nq, nk, cs, sn, key_lens, h, kvh, t, scale, causal,     \
                        hpc);                                                                                          \
    }                                                                                                                  \
    extern "C" __global__ void kv_sum##D(const float* pk, const float* pv, bf16* out, long nq, long nk,               \
                                         const float* cs, const float* sn, int kvh, int t, int parts) {                \
        kv_sum<D>(pk, pv, out, nq, nk, cs, sn, kvh, t, parts);                                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                                  \
        flash_bwd_q##D(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout, const float* lse,  \
                       float* dsum, bf16* out, const float* cs, const float* sn, const uint32_t* key_lens, int h,      \
                       int kvh, int t, float scale, int causal) {                                                      \
        flash_bwd_q<D>(q, k, v, o, dout, lse, dsum, out, cs, sn, key_lens, h, kvh, t, scale, causal);                  \
    }

// Blocks per SM the register allocation must allow (forward, dK/dV). Head size 64: 4 and 3
// (128 and 168 registers, a few bytes spilled), one more block each than an unbounded
// allocation leaves room for (134 and 237 registers), which makes both kernels faster
// (TinyLlama profile, a step: dK/dV 2.65 against 3.06 ms, forward 1.34 against 1.42 ms). Head
// size 128: 1, since 3 blocks of the dK/dV kernel would spill ~1.7 KB.
INSTANTIATE_FLASH(64, 4, 3)
INSTANTIATE_FLASH(128, 1, 1)
// Head size 48 (the U-Net's heads of 40, padded): 64's bounds.
INSTANTIATE_FLASH(48, 4, 3)
// Head size 80 (Stable Diffusion 1.5's second level): 3 and 2, the most without spilling
// (161 and 255 registers).
INSTANTIATE_FLASH(80, 3, 2)
