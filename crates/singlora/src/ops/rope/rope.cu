// The head split with RoPE, forward and backward (ops/rope: the candle op; the CPU runs the
// composed ops): a thread per pair of elements, or a block per token row 8 elements per access,
// or (bf16, the fast path) with a projection's low-rank term added on the way in.
#include "../low_rank/low_rank.cuh"

// Head split with RoPE: x (b, t, n, hd) -> y (b, n, t, hd), y1 = x1 c - x2 s, y2 = x2 c + x1 s on
// the two halves of each head (cos/sin: f32 (t, hd), the first hd/2 columns used). `inverse`
// runs the transpose of that map (the backward): from (b, n, t, hd) to (b, t, n, hd) with -s.
// rotate = 0: the split alone (V). One thread per pair of elements.
template <typename T>
__device__ void rope_split(const T* src, T* dst, const float* cs, const float* sn, int b, int t, int n, int hd,
                           int rotate, int inverse) {
    const int half = hd / 2;
    long total = (long)b * t * n * half;
    for (long g = (long)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += (long)gridDim.x * blockDim.x) {
        int j = g % half;
        long r = g / half;  // (bb, tt, nn) in (b, t, n) order
        int nn = r % n;
        int tt = (r / n) % t;
        long bb = r / ((long)n * t);
        long a = r * hd + j;                               // offset in (b, t, n, hd)
        long c = ((bb * n + nn) * t + tt) * (long)hd + j;  // offset in (b, n, t, hd)
        long from = inverse ? c : a, to = inverse ? a : c;
        float x1 = ld(src, from), x2 = ld(src, from + half);
        if (rotate) {
            float co = cs[(long)tt * hd + j], si = sn[(long)tt * hd + j];
            if (inverse) si = -si;
            st(dst, to, x1 * co - x2 * si);
            st(dst, to + half, x2 * co + x1 * si);
        } else {
            st(dst, to, x1);
            st(dst, to + half, x2);
        }
    }
}

// RoPE and the head split (see rope_split above), one block per token (b, t) row, 8 elements
// per access and 32-bit index arithmetic (the scalar kernel's 64-bit divisions per element
// made it compute-bound: 7x under the memory bound at 7B). Needs hd/2 a multiple of 8.
template <typename T>
__device__ void rope_split_v8(const T* src, T* dst, const float* cs, const float* sn, int b, int t, int n, int hd,
                              int rotate, int inverse) {
    const int half = hd / 2, chunks = half / 8;
    const int bb = blockIdx.x / t, tt = blockIdx.x % t;
    const long tok = (long)blockIdx.x * n * hd;  // the (bb, tt) row in (b, t, n, hd)
    for (int q = threadIdx.x; q < n * chunks; q += blockDim.x) {
        int nn = q / chunks, j = (q % chunks) * 8;
        long a = tok + (long)nn * hd + j;
        long c = (((long)bb * n + nn) * t + tt) * (long)hd + j;
        long from = inverse ? c : a, to = inverse ? a : c;
        float x1[8], x2[8];
        ld8(src, from, x1);
        ld8(src, from + half, x2);
        if (rotate) {
            float co[8], si[8], y1[8], y2[8];
            ld8(cs, (long)tt * hd + j, co);
            ld8(sn, (long)tt * hd + j, si);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float sk = inverse ? -si[k] : si[k];
                y1[k] = x1[k] * co[k] - x2[k] * sk;
                y2[k] = x2[k] * co[k] + x1[k] * sk;
            }
            st8(dst, to, y1);
            st8(dst, to + half, y2);
        } else {
            st8(dst, to, x1);
            st8(dst, to + half, x2);
        }
    }
}

// RoPE and the head split (see rope_split) of q, k or v with the projection's low-rank term
// added on the way in (forward only). A warp takes 32 pair indices of one head's first half
// and the 32 that pair with them in the second half (hd a multiple of 64), so each thread
// holds both halves of 8 pairs of 2 token rows.
template <int R>
__device__ void rope_split_lr(const uint16_t* __restrict__ src, uint16_t* __restrict__ dst, const float* cs,
                              const float* sn, int b, int t, int nh, int hd, int rotate, const uint16_t* h, long ldh,
                              const uint16_t* u, float c) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int half = hd / 2, per_head = half / 32;
    const int w = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= nh * per_head) return;  // whole warps only
    const int nn = w / per_head, j0 = (w % per_head) * 32;
    const int n = nh * hd, lo = nn * hd + j0, hi = lo + half, j = j0 + 8 * q;
    const long m = (long)b * t;
    const bool on = true;
    LrTile<R> tl, th;
    tl.load(h, ldh, u, c, lo, n);
    th.load(h, ldh, u, c, hi, n);
    const long rb = (long)blockIdx.y * LR_ROWS, re = min(m, rb + LR_ROWS);
    for (long r0 = rb; r0 < re; r0 += 16) {
        uint4 v1[2], v2[2];
        {
            const int col = lo + 8 * q;
            LR_LOAD(v1, src)
        }
        {
            const int col = hi + 8 * q;
            LR_LOAD(v2, src)
        }
        tl.apply(r0, m, v1);
        th.apply(r0, m, v2);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const long row = r0 + g + 8 * hf;
            if (row >= m) continue;
            const int bb = row / t, tt = row % t;
            const long to = (((long)bb * nh + nn) * t + tt) * (long)hd + j;
            if (rotate) {
                float x1[8], x2[8], co[8], si[8], y1[8];
                unpk(v1[hf], x1);
                unpk(v2[hf], x2);
                ld8(cs, (long)tt * hd + j, co);
                ld8(sn, (long)tt * hd + j, si);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    y1[k] = x1[k] * co[k] - x2[k] * si[k];
                    x2[k] = x2[k] * co[k] + x1[k] * si[k];
                }
                st8(dst, to, y1);
                st8(dst, to + half, x2);
            } else {
                *reinterpret_cast<uint4*>(dst + to) = v1[hf];
                *reinterpret_cast<uint4*>(dst + to + half) = v2[hf];
            }
        }
    }
}

#define INSTANTIATE(T, SUF)                                                                                          \
    extern "C" __global__ void rope_split_##SUF(const T* src, T* dst, const float* cs, const float* sn, int b, int t, \
                                                int n, int hd, int rotate, int inverse) {                            \
        rope_split<T>(src, dst, cs, sn, b, t, n, hd, rotate, inverse);                                               \
    }                                                                                                                \
    extern "C" __global__ void rope_split_v8_##SUF(const T* src, T* dst, const float* cs, const float* sn, int b,    \
                                                   int t, int n, int hd, int rotate, int inverse) {                  \
        rope_split_v8<T>(src, dst, cs, sn, b, t, n, hd, rotate, inverse);                                            \
    }                                                                                                               

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)

#define INSTANTIATE_LR(R)                                                                                            \
    extern "C" __global__ void rope_split_lr##R##_bf16(const uint16_t* src, uint16_t* dst, const float* cs,          \
                                                       const float* sn, int b, int t, int nh, int hd, int rotate,    \
                                                       const uint16_t* h, long ldh, const uint16_t* u, float c) {    \
        rope_split_lr<R>(src, dst, cs, sn, b, t, nh, hd, rotate, h, ldh, u, c);                                      \
    }                                                                                                               

INSTANTIATE_LR(8)
INSTANTIATE_LR(16)
