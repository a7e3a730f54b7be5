// SwiGLU's gate silu(g)·u and its backward (ops/swiglu: the candle op; the CPU runs the composed
// ops), element-wise, f32 arithmetic on bf16 or f32 storage: scalar or 8 elements per access, or
// (bf16, the fast path) with the gate's, up's and the output gradient's low-rank terms added on
// the way in.
#include "../low_rank/low_rank.cuh"

// SwiGLU: y = silu(g) u.
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gv = ld(g, i);
        float s = 1.f / (1.f + __expf(-gv));
        st(y, i, gv * s * ld(u, i));
    }
}

// Its backward into one buffer: out[0..n) = dg = dy u silu'(g), out[n..2n) = du = dy silu(g),
// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* out, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gv = ld(g, i), d = ld(dy, i);
        float s = 1.f / (1.f + __expf(-gv));
        st(out, i, d * ld(u, i) * s * (1.f + gv * (1.f - s)));
        st(out, n + i, d * gv * s);
    }
}

template <typename T>
__device__ void swiglu_fwd_v8(const T* g, const T* u, T* y, long n) {
    FOR_CHUNKS(n / 8) {
        float gv[8], uv[8];
        ld8(g, 8 * c, gv);
        ld8(u, 8 * c, uv);
#pragma unroll
        for (int k = 0; k < 8; k++) gv[k] = gv[k] * (1.f / (1.f + __expf(-gv[k]))) * uv[k];
        st8(y, 8 * c, gv);
    }
}

template <typename T>
__device__ void swiglu_bwd_v8(const T* g, const T* u, const T* dy, T* out, long n) {
    FOR_CHUNKS(n / 8) {
        float gv[8], uv[8], d[8], dg[8], du[8];
        ld8(g, 8 * c, gv);
        ld8(u, 8 * c, uv);
        ld8(dy, 8 * c, d);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float s = 1.f / (1.f + __expf(-gv[k]));
            dg[k] = d[k] * uv[k] * s * (1.f + gv[k] * (1.f - s));
            du[k] = d[k] * gv[k] * s;
        }
        st8(out, 8 * c, dg);
        st8(out, n + 8 * c, du);
    }
}

// y = silu(g')·u' with g' = g + c_g·h_g·U_gᵀ and u' likewise (h null: no term), each rounded
// to bf16 as the projections' outputs would be stored. With `writeback`, g' and u' are written
// over g and u (for a backward that reads them); without, the backward and the recompute add
// the terms again (swiglu_bwd_lr, this kernel).
template <int R>
__device__ void swiglu_fwd_lr(uint16_t* __restrict__ gt, uint16_t* __restrict__ ut, uint16_t* __restrict__ y, long m,
                              int n, const uint16_t* hg, long ldhg, const uint16_t* ug, float cg, const uint16_t* hu,
                              long ldhu, const uint16_t* uu, float cu, int writeback) {
    LR_WARP
    LrTile<R> tg, tu;
    tg.load(hg, ldhg, ug, cg, col0, n);
    tu.load(hu, ldhu, uu, cu, col0, n);
    for (long r0 = rb; r0 < re; r0 += 16) {
        uint4 gv[2], uv[2];
        LR_LOAD(gv, gt)
        LR_LOAD(uv, ut)
        tg.apply(r0, m, gv);
        tu.apply(r0, m, uv);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const long row = r0 + g + 8 * hf, at = row * n + col;
            if (!on || row >= m) continue;
            if (writeback && hg) *reinterpret_cast<uint4*>(gt + at) = gv[hf];
            if (writeback && hu) *reinterpret_cast<uint4*>(ut + at) = uv[hf];
            float x[8], z[8];
            unpk(gv[hf], x);
            unpk(uv[hf], z);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = x[k] * (1.f / (1.f + __expf(-x[k]))) * z[k];
            st8(y, at, x);
        }
    }
}

// SwiGLU's backward (swiglu_bwd) with terms on g, u (as swiglu_fwd_lr without writeback) and
// on dy (the down projection's input gradient: its c·g_U·Dᵀ, rounded as the GEMM's β = 1
// output would be): out[0..mn) = dg, out[mn..2mn) = du.
template <int R>
__device__ void swiglu_bwd_lr(const uint16_t* __restrict__ gt, const uint16_t* __restrict__ ut,
                              const uint16_t* __restrict__ dyt, uint16_t* __restrict__ out, long m, int n,
                              const uint16_t* hg, long ldhg, const uint16_t* ug, float cg, const uint16_t* hu,
                              long ldhu, const uint16_t* uu, float cu, const uint16_t* hd, long ldhd,
                              const uint16_t* ud, float cd) {
    LR_WARP
    LrTile<R> tg, tu, td;
    tg.load(hg, ldhg, ug, cg, col0, n);
    tu.load(hu, ldhu, uu, cu, col0, n);
    td.load(hd, ldhd, ud, cd, col0, n);
    const long mn = m * n;
    for (long r0 = rb; r0 < re; r0 += 16) {
        uint4 gv[2], uv[2], dv[2];
        LR_LOAD(gv, gt)
        LR_LOAD(uv, ut)
        LR_LOAD(dv, dyt)
        tg.apply(r0, m, gv);
        tu.apply(r0, m, uv);
        td.apply(r0, m, dv);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const long row = r0 + g + 8 * hf, at = row * n + col;
            if (!on || row >= m) continue;
            float x[8], z[8], d[8], dg[8];
            unpk(gv[hf], x);
            unpk(uv[hf], z);
            unpk(dv[hf], d);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float sg = 1.f / (1.f + __expf(-x[k]));
                dg[k] = d[k] * z[k] * sg * (1.f + x[k] * (1.f - sg));
                z[k] = d[k] * x[k] * sg;  // du
            }
            st8(out, at, dg);
            st8(out, mn + at, z);
        }
    }
}

#define INSTANTIATE(T, SUF)                                                                                          \
    extern "C" __global__ void swiglu_fwd_##SUF(const T* g, const T* u, T* y, long n) { swiglu_fwd<T>(g, u, y, n); } \
    extern "C" __global__ void swiglu_bwd_##SUF(const T* g, const T* u, const T* dy, T* out, long n) {               \
        swiglu_bwd<T>(g, u, dy, out, n);                                                                             \
    }                                                                                                                \
    extern "C" __global__ void swiglu_fwd_v8_##SUF(const T* g, const T* u, T* y, long n) {                           \
        swiglu_fwd_v8<T>(g, u, y, n);                                                                                \
    }                                                                                                                \
    extern "C" __global__ void swiglu_bwd_v8_##SUF(const T* g, const T* u, const T* dy, T* out, long n) {            \
        swiglu_bwd_v8<T>(g, u, dy, out, n);                                                                          \
    }                                                                                                               

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)

#define INSTANTIATE_LR(R)                                                                                            \
    extern "C" __global__ void swiglu_fwd_lr##R##_bf16(uint16_t* g, uint16_t* u, uint16_t* y, long m, int n,         \
                                                       const uint16_t* hg, long ldhg, const uint16_t* ug, float cg,  \
                                                       const uint16_t* hu, long ldhu, const uint16_t* uu,            \
                                                       float cu, int writeback) {                                    \
        swiglu_fwd_lr<R>(g, u, y, m, n, hg, ldhg, ug, cg, hu, ldhu, uu, cu, writeback);                              \
    }                                                                                                                \
    extern "C" __global__ void swiglu_bwd_lr##R##_bf16(const uint16_t* g, const uint16_t* u, const uint16_t* dy,     \
                                                       uint16_t* out, long m, int n, const uint16_t* hg, long ldhg,  \
                                                       const uint16_t* ug, float cg, const uint16_t* hu, long ldhu,  \
                                                       const uint16_t* uu, float cu, const uint16_t* hd, long ldhd,  \
                                                       const uint16_t* ud, float cd) {                               \
        swiglu_bwd_lr<R>(g, u, dy, out, m, n, hg, ldhg, ug, cg, hu, ldhu, uu, cu, hd, ldhd, ud, cd);                 \
    }                                                                                                               

INSTANTIATE_LR(8)
INSTANTIATE_LR(16)
