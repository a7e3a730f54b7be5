// Tensor-core and shared-memory helpers shared by the kernels of attention/flash.cu and
// low_rank/low_rank.cu: bf16 packing, mma.sync m16n8k16 (bf16 in, f32 accumulate), ldmatrix
// and cp.async.
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


}  // namespace tc
