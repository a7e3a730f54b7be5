// Tensor-core and shared-memory helpers shared by the kernels of attention/flash.cu,
// cross_attention/cross_attention.cu and low_rank/low_rank.cu: bf16 packing, mma.sync m16n8k16
// (bf16 in, f32 accumulate), ldmatrix, cp.async and a warp's products of shared tiles.
#pragma once
#include <stdint.h>

typedef uint16_t bf16;

namespace tc {

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c += a·b for one 16×8 tile (a: 16×16 row-major fragment, b: 16×8 column fragment).
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem(p)));
}

__device__ __forceinline__ void ldsm_t(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem(p)));
}

// 16 bytes global → shared, asynchronously; zeros when !ok (nothing is read then).
__device__ __forceinline__ void cp16(bf16* dst, const bf16* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem(dst)), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Until at most N of this thread's most recent groups are in flight.
template <int N>
__device__ __forceinline__ void cp_wait_n() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Tiles 0 .. n - 1 through S shared stages (1 or 2), `issue(i, stage)` requesting tile i (one
// cp.async group), tile 0 requested before the loop. At the top of iteration i, stage_in
// requests tile i + 1 into the other stage (S = 2), waits for tile i and returns its stage; at
// the bottom, after the block's last read of that stage, stage_out requests tile i + 1 into it
// (S = 1) behind a barrier.
template <int S, class F>
__device__ __forceinline__ int stage_in(int i, int n, F& issue) {
    const int st = S == 2 ? i & 1 : 0;
    if (S == 2 && i + 1 < n) {
        issue(i + 1, st ^ 1);
        cp_wait_n<1>();
    } else {
        cp_wait();
    }
    __syncthreads();
    return st;
}
template <int S, class F>
__device__ __forceinline__ void stage_out(int i, int n, F& issue) {
    __syncthreads();
    if (S == 1 && i + 1 < n) issue(i + 1, 0);
}


// Warp-level tile products on shared-memory tiles of row stride D + 8 (the padding keeps
// ldmatrix's 8 row reads on distinct banks); a warp computes 16 rows.

// Fragment addresses in a shared tile (row stride D + 8) for the calling lane:
// the 16×16 A operand at rows 16·w, columns 16·kk;
template <int D>
__device__ __forceinline__ const bf16* a_at(const bf16* s, int w, int kk, int lane) {
    return s + (16 * w + (lane & 15)) * (D + 8) + 16 * kk + 8 * (lane >> 4);
}
// the B operands of two n-tiles (rows 16·p .. 16·p + 15 of the tile are the n index) at
// columns 16·kk (the k index): B = tileᵀ;
template <int D>
__device__ __forceinline__ const bf16* bt_at(const bf16* s, int p, int kk, int lane) {
    return s + (16 * p + (lane & 7) + 8 * (lane >> 4)) * (D + 8) + 16 * kk + 8 * ((lane >> 3) & 1);
}
// the B operands of two n-tiles (columns 16·p .. 16·p + 15) at rows 16·c (the k index), read
// transposed: B = tile.
template <int D>
__device__ __forceinline__ const bf16* b_at(const bf16* s, int c, int p, int lane) {
    return s + (16 * c + (lane & 7) + 8 * ((lane >> 3) & 1)) * (D + 8) + 16 * p + 8 * (lane >> 4);
}

// acc (16 × N) += a (16 × 16·KS fragments) · tileᵀ, tile rows = the N index (N = 8·NT).
template <int D, int KS, int NT>
__device__ __forceinline__ void mul_bt(float (&acc)[NT][4], const uint32_t (&a)[KS][4], const bf16* s, int lane) {
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
#pragma unroll
        for (int p = 0; p < NT / 2; p++) {
            uint32_t b[4];
            ldsm(b, bt_at<D>(s, p, kk, lane));
            mma(acc[2 * p], a[kk], b[0], b[1]);
            mma(acc[2 * p + 1], a[kk], b[2], b[3]);
        }
}

// acc (16 × D) += x (16 × 16·KC, the C fragments of a 16 × 8·2KC product, packed to bf16 on the
// way) · tile (rows = the k index).
template <int D, int KC>
__device__ __forceinline__ void mul_b(float (&acc)[D / 8][4], const float (&x)[2 * KC][4], const bf16* s, int lane) {
#pragma unroll
    for (int c = 0; c < KC; c++) {
        const uint32_t a[4] = {pack2(x[2 * c][0], x[2 * c][1]), pack2(x[2 * c][2], x[2 * c][3]),
                               pack2(x[2 * c + 1][0], x[2 * c + 1][1]), pack2(x[2 * c + 1][2], x[2 * c + 1][3])};
#pragma unroll
        for (int p = 0; p < D / 16; p++) {
            uint32_t b[4];
            ldsm_t(b, b_at<D>(s, c, p, lane));
            mma(acc[2 * p], a, b[0], b[1]);
            mma(acc[2 * p + 1], a, b[2], b[3]);
        }
    }
}

// The calling warp's A fragments (16 rows) of a shared tile.
template <int D>
__device__ __forceinline__ void frags(uint32_t (&a)[D / 16][4], const bf16* s, int w, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) ldsm(a[kk], a_at<D>(s, w, kk, lane));
}

template <int N>
__device__ __forceinline__ void zero(float (&x)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.f;
}

}  // namespace tc
