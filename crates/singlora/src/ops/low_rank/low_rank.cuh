// The adapter's rank-R term c·h·Uᵀ for the kernels that consume a projection's output (or its
// input gradient) and add the term on the way: the residual add (ops/residual), the SwiGLU kernels
// (ops/swiglu) and the RoPE/split kernel (ops/rope), each saving the β = 1 GEMM that would read
// and write that output once more.
#pragma once
#include "../cuda/common.cuh"

// h (m × R, bf16) has row stride ldh (a block of a group's buffer), U (n × R, bf16) is
// contiguous; R is a multiple of 8 (8 and 16 built). The product runs on the tensor cores
// (mma.sync m16n8k8, f32 accumulation; with FMAs it would be compute-bound, at 2 TB/s): a warp
// takes a 16-row × 32-column tile in 4 MMAs, with the MMAs' columns assigned so that each
// thread ends up holding 8 adjacent columns of 2 rows (16-byte accesses for the elementwise
// part). A warp keeps its columns' U fragments in registers and walks LR_ROWS rows.
// Reference: the GEMM path these replace (`gpu-check`: the kernels against composed ops, and
// the fast path with and without them).
#define LR_ROWS 64


// The MMA tile's column l (0..7) of column group j (0..3) is column 8·(l / 2) + 2·j + l % 2 of
// the warp's 32: thread (g, q) = (lane / 4, lane % 4) then holds columns 8q..8q+7 of rows g
// and g + 8 after the 4 MMAs.
template <int R>
struct LrTile {
    uint32_t b[4][R / 8];  // U fragments: B[k][l] = U[col(l)][k]
    const uint16_t* h;
    long ldh;
    float c;
    __device__ __forceinline__ void load(const uint16_t* h_, long ldh_, const uint16_t* u, float c_, int col0, int n) {
        h = h_;
        ldh = ldh_;
        c = c_;
        const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int col = col0 + 8 * (g >> 1) + 2 * j + (g & 1);
#pragma unroll
            for (int s = 0; s < R / 8; s++)
                b[j][s] = (h && col < n) ? *reinterpret_cast<const uint32_t*>(u + (long)col * R + 8 * s + 2 * q) : 0u;
        }
    }
    // acc[0..8): row r0 + g, columns 8q..8q+7 of the warp's 32; acc[8..16): row r0 + g + 8.
    __device__ __forceinline__ void product(long r0, long m, float* acc) const {
        const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
        uint32_t a[R / 4];
#pragma unroll
        for (int s = 0; s < R / 8; s++) {
            a[2 * s] = r0 + g < m ? *reinterpret_cast<const uint32_t*>(h + (r0 + g) * ldh + 8 * s + 2 * q) : 0u;
            a[2 * s + 1] = r0 + g + 8 < m ? *reinterpret_cast<const uint32_t*>(h + (r0 + g + 8) * ldh + 8 * s + 2 * q) : 0u;
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
            // R / 8 MMAs of k = 8 accumulating: a[2s] (g, k 8s..), a[2s + 1] (g + 8, k 8s..)
#pragma unroll
            for (int s = 0; s < R / 8; s++)
                asm volatile(
                    "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
                    "{%0,%1,%2,%3};\n"
                    : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
                    : "r"(a[2 * s]), "r"(a[2 * s + 1]), "r"(b[j][s]));
            acc[2 * j] = c * d0;
            acc[2 * j + 1] = c * d1;
            acc[8 + 2 * j] = c * d2;
            acc[8 + 2 * j + 1] = c * d3;
        }
    }
    // v[hf] (8 bf16 of row r0 + g + 8·hf, this thread's columns) += the term, rounded to bf16
    // as a stored projection output would be. One term's 16 products live at a time, and the
    // rows stay packed: the kernels below stay near 64-100 registers (157 with unpacked rows
    // and every term's products at once, which left a third of the occupancy).
    __device__ __forceinline__ void apply(long r0, long m, uint4 (&v)[2]) const {
        if (!h) return;
        float acc[16];
        product(r0, m, acc);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float x[8];
            unpk(v[hf], x);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] += acc[8 * hf + k];
            v[hf] = pk(x);
        }
    }
};

// A warp's place: 32 columns from col0 (8q.. of them its thread's), rows from r0 in 16s.
#define LR_WARP                                                                          \
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;                     \
    const int col0 = 32 * (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));        \
    if (col0 >= n) return; /* whole warps only */                                        \
    const int col = col0 + 8 * q;                                                        \
    const bool on = col < n;                                                             \
    const long rb = (long)blockIdx.y * LR_ROWS, re = min(m, rb + LR_ROWS);

// The thread's 8 columns of rows r0 + g and r0 + g + 8 (zeros outside), packed.
#define LR_LOAD(v, p)                                                                    \
    _Pragma("unroll") for (int hf = 0; hf < 2; hf++) {                                   \
        const long row = r0 + g + 8 * hf;                                                \
        v[hf] = (on && row < m) ? ldpk(p, row * n + col) : make_uint4(0, 0, 0, 0);      \
    }
