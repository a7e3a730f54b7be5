// Fused kernels for the GPU path (compiled to PTX by build.rs with the `cuda` feature).
// Row-wise: one block per row, f32 arithmetic whatever the storage type (bf16 as its raw
// 16 bits, converted by shifting; f32 as is). Each has a CPU reference in ../*.rs.
#include <stdint.h>

#include "tc.cuh"

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const uint16_t* p, long i) { return __uint_as_float(((uint32_t)p[i]) << 16); }
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(uint16_t* p, long i, float v) {
    uint32_t u = __float_as_uint(v);
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (uint16_t)(u >> 16);
}

// Reduces v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float buf[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = lane < nw ? buf[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ float block_max(float v) {
    __shared__ float buf[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = lane < nw ? buf[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// P = softmax(scale * S) over the valid keys of each row of a (b, h, tq, tk) tensor; row r is
// batch r / (h tq), query r % tq; keys j < key_lens[batch] (and j <= i + tk - tq if causal).
template <typename T>
__device__ void masked_softmax_fwd(const T* s, T* p, const uint32_t* key_lens, int h, int tq, int tk, float scale, int causal) {
    long row = blockIdx.x;
    const long base = row * tk;
    int b = row / ((long)h * tq), i = row % tq;
    int len = min((int)key_lens[b], tk);
    if (causal) len = min(len, i + 1 + tk - tq);
    float m = -INFINITY;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, ld(s, base + j));
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) sum += __expf((ld(s, base + j) - m) * scale);
    sum = block_sum(sum);
    float inv = len > 0 ? 1.f / sum : 0.f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        st(p, base + j, j < len ? __expf((ld(s, base + j) - m) * scale) * inv : 0.f);
}

// dS = scale * P (dP - sum_j P dP), row by row.
template <typename T>
__device__ void masked_softmax_bwd(const T* p, const T* dp, T* ds, int tk, float scale) {
    const long base = (long)blockIdx.x * tk;
    float dot = 0.f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) dot += ld(p, base + j) * ld(dp, base + j);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float pj = ld(p, base + j);
        st(ds, base + j, scale * pj * (ld(dp, base + j) - dot));
    }
}

// y = x / rms(x) * w with rms = sqrt(mean x^2 + eps); w in f32.
template <typename T>
__device__ void rms_norm_fwd(const T* x, const float* w, T* y, int d, float eps) {
    const long base = (long)blockIdx.x * d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(x, base + j); ss += v * v; }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) st(y, base + j, ld(x, base + j) * inv * w[j]);
}

// dx = (g w - xhat mean(g w xhat)) / rms, xhat = x / rms.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const float* w, const T* g, T* dx, int d, float eps) {
    const long base = (long)blockIdx.x * d;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        ss += v * v;
        dot += ld(g, base + j) * w[j] * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float inv = rsqrtf(ss / d + eps);
    float c = dot * inv * inv / d;  // mean(g w xhat) / rms, with xhat = x inv
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        st(dx, base + j, (ld(g, base + j) * w[j] - v * c) * inv);
    }
}

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

// y (m, n) <- each row the bias b (n): the output a bias-initialised GEMM accumulates into.
template <typename T>
__device__ void bias_rows(const T* b, T* y, long m, int n) {
    long total = m * n;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        y[i] = b[i % n];
}

// AdamW in place for every parameter in one launch (f32 parameters and moments): m <- b1 m +
// (1-b1) g, v <- b2 v + (1-b2) g^2, p <- p decay - lr (m / bc1) / (sqrt(v / bc2) + eps), decay =
// 1 - lr wd, lr and decay per parameter. Block row y updates job y, its blocks striding over
// the elements (a TinyLlama step with r = 8 on all seven projections has 154 adapters: one
// launch, not 154).
struct AdamWJob {
    float* p;
    float* m;
    float* v;
    const float* g;
    long n;
    float lr;
    float decay;
};
extern "C" __global__ void adamw_multi_f32(const AdamWJob* jobs, float b1, float b2, float eps, float bc1, float bc2) {
    const AdamWJob j = jobs[blockIdx.y];
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < j.n; i += (long)gridDim.x * blockDim.x) {
        float gi = j.g[i];
        float mi = b1 * j.m[i] + (1.f - b1) * gi;
        float vi = b2 * j.v[i] + (1.f - b2) * gi * gi;
        j.m[i] = mi;
        j.v[i] = vi;
        j.p[i] = j.p[i] * j.decay - j.lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

// The same two, one warp per row with the row in registers (tk <= 32 * WARP_ROW_MAX): one read
// of S (forward) or of P and dP (backward) instead of three. Blocks of 8 warps.
#define WARP_ROW_MAX 32
// A warp's row of the (b, h, tq, tk) scores in the warp-per-row forward kernels, its lane, and
// the row's valid keys (as masked_softmax_fwd); false for a warp past the last row.
__device__ __forceinline__ bool warp_row(long rows, const uint32_t* key_lens, int h, int tq, int tk, int causal,
                                         long& row, int& lane, int& len) {
    row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return false;
    lane = threadIdx.x & 31;
    int b = row / ((long)h * tq), i = row % tq;
    len = min((int)key_lens[b], tk);
    if (causal) len = min(len, i + 1 + tk - tq);
    return true;
}
template <typename T>
__device__ void masked_softmax_fwd_warp(const T* s, T* p, const uint32_t* key_lens, long rows, int h, int tq, int tk,
                                        float scale, int causal) {
    long row;
    int lane, len;
    if (!warp_row(rows, key_lens, h, tq, tk, causal, row, lane, len)) return;
    const long base = row * tk;
    float v[WARP_ROW_MAX];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        v[c] = j < len ? ld(s, base + j) : -INFINITY;
        m = fmaxf(m, v[c]);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        v[c] = j < len ? __expf((v[c] - m) * scale) : 0.f;
        sum += v[c];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float inv = len > 0 ? 1.f / sum : 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        if (j < tk) st(p, base + j, v[c] * inv);
    }
}

template <typename T>
__device__ void masked_softmax_bwd_warp(const T* p, const T* dp, T* ds, long rows, int tk, float scale) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    const long base = row * tk;
    float pv[WARP_ROW_MAX], dv[WARP_ROW_MAX];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        pv[c] = j < tk ? ld(p, base + j) : 0.f;
        dv[c] = j < tk ? ld(dp, base + j) : 0.f;
        dot += pv[c] * dv[c];
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX; c++) {
        int j = c * 32 + lane;
        if (j < tk) st(ds, base + j, scale * pv[c] * (dv[c] - dot));
    }
}

// RMSNorm backward accumulating into dx (dx += ...): the residual stream's gradient.
template <typename T>
__device__ void rms_norm_bwd_acc(const T* x, const float* w, const T* g, T* dx, int d, float eps) {
    const long base = (long)blockIdx.x * d;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        ss += v * v;
        dot += ld(g, base + j) * w[j] * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float inv = rsqrtf(ss / d + eps);
    float c = dot * inv * inv / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, base + j);
        st(dx, base + j, ld(dx, base + j) + (ld(g, base + j) * w[j] - v * c) * inv);
    }
}

// y = a + b (the residual stream), elementwise.
template <typename T>
__device__ void add2(const T* a, const T* b, T* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(y, i, ld(a, i) + ld(b, i));
}

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

// DoRA's output scaling: y[i, j] = x[i, j] s[j] (+ b[j] when b is not null), s f32.
template <typename T>
__device__ void col_scale(const T* x, const float* s, const T* b, T* y, long m, int n) {
    long total = m * n;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int j = i % n;
        float v = ld(x, i) * s[j];
        if (b) v += ld(b, j);
        st(y, i, v);
    }
}

// out[j] += w[j] sum_i a[i, j] b[i, j] over a chunk of rows per blockIdx.y (f32 atomics): the
// DoRA magnitude's gradient. Threads take consecutive columns (coalesced rows).
template <typename T>
__device__ void col_dot(const T* a, const T* b, const float* w, float* out, long m, int n, int rows_per) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    long r0 = (long)blockIdx.y * rows_per, r1 = min(m, r0 + rows_per);
    float acc = 0.f;
    for (long i = r0; i < r1; i++) acc += ld(a, i * n + j) * ld(b, i * n + j);
    atomicAdd(out + j, acc * w[j]);
}

#define INSTANTIATE(T, SUF)                                                                                        \
    extern "C" __global__ void masked_softmax_fwd_##SUF(const T* s, T* p, const uint32_t* kl, int h, int tq, int tk, \
                                                        float scale, int causal) {                                  \
        masked_softmax_fwd<T>(s, p, kl, h, tq, tk, scale, causal);                                                  \
    }                                                                                                               \
    extern "C" __global__ void masked_softmax_bwd_##SUF(const T* p, const T* dp, T* ds, int tk, float scale) {     \
        masked_softmax_bwd<T>(p, dp, ds, tk, scale);                                                                \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_fwd_##SUF(const T* x, const float* w, T* y, int d, float eps) {           \
        rms_norm_fwd<T>(x, w, y, d, eps);                                                                           \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_bwd_##SUF(const T* x, const float* w, const T* g, T* dx, int d, float eps) { \
        rms_norm_bwd<T>(x, w, g, dx, d, eps);                                                                       \
    }                                                                                                               \
    extern "C" __global__ void rope_split_##SUF(const T* src, T* dst, const float* cs, const float* sn, int b, int t, \
                                                int n, int hd, int rotate, int inverse) {                          \
        rope_split<T>(src, dst, cs, sn, b, t, n, hd, rotate, inverse);                                              \
    }                                                                                                               \
    extern "C" __global__ void masked_softmax_fwd_warp_##SUF(const T* s, T* p, const uint32_t* kl, long rows, int h,  \
                                                             int tq, int tk, float scale, int causal) {             \
        masked_softmax_fwd_warp<T>(s, p, kl, rows, h, tq, tk, scale, causal);                                       \
    }                                                                                                               \
    extern "C" __global__ void masked_softmax_bwd_warp_##SUF(const T* p, const T* dp, T* ds, long rows, int tk,     \
                                                             float scale) {                                         \
        masked_softmax_bwd_warp<T>(p, dp, ds, rows, tk, scale);                                                     \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_bwd_acc_##SUF(const T* x, const float* w, const T* g, T* dx, int d,        \
                                                      float eps) {                                                  \
        rms_norm_bwd_acc<T>(x, w, g, dx, d, eps);                                                                   \
    }                                                                                                               \
    extern "C" __global__ void add2_##SUF(const T* a, const T* b, T* y, long n) { add2<T>(a, b, y, n); }            \
    extern "C" __global__ void xent_fwd_##SUF(const T* z, const uint32_t* t, float* out, int c) {                  \
        xent_fwd<T>(z, t, out, c);                                                                                  \
    }                                                                                                               \
    extern "C" __global__ void xent_bwd_##SUF(const T* z, const uint32_t* t, const float* lg, T* dz, int c) {        \
        xent_bwd<T>(z, t, lg, dz, c);                                                                               \
    }                                                                                                               \
    extern "C" __global__ void col_scale_##SUF(const T* x, const float* s, const T* b, T* y, long m, int n) {        \
        col_scale<T>(x, s, b, y, m, n);                                                                             \
    }                                                                                                               \
    extern "C" __global__ void col_dot_##SUF(const T* a, const T* b, const float* w, float* out, long m, int n,      \
                                             int rows_per) {                                                        \
        col_dot<T>(a, b, w, out, m, n, rows_per);                                                                   \
    }                                                                                                               \
    extern "C" __global__ void bias_rows_##SUF(const T* b, T* y, long m, int n) { bias_rows<T>(b, y, m, n); }      \
    extern "C" __global__ void swiglu_fwd_##SUF(const T* g, const T* u, T* y, long n) { swiglu_fwd<T>(g, u, y, n); } \
    extern "C" __global__ void swiglu_bwd_##SUF(const T* g, const T* u, const T* dy, T* out, long n) {             \
        swiglu_bwd<T>(g, u, dy, out, n);                                                                            \
    }

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)

// ---- Vectorised variants: 8 elements per access (16-byte loads of bf16, two of f32). The
// launchers pick them when every pointer is 16-byte aligned and the length (or row width) is
// a multiple of 8; same arithmetic as the scalar kernels above, so the same results.
__device__ __forceinline__ uint32_t bf16_bits(float v) {
    uint32_t u = __float_as_uint(v);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even, as st()
}
// 8 bf16 packed in a uint4: loaded, unpacked to f32, packed back (rounded as st()); ld8 and st8
// below are these with the load or store.
__device__ __forceinline__ uint4 ldpk(const uint16_t* p, long i) { return *reinterpret_cast<const uint4*>(p + i); }
__device__ __forceinline__ void unpk(uint4 r, float* o) {
    uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        o[2 * k] = __uint_as_float(w[k] << 16);
        o[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
}
__device__ __forceinline__ uint4 pk(const float* v) {
    uint4 r;
    r.x = bf16_bits(v[0]) | (bf16_bits(v[1]) << 16);
    r.y = bf16_bits(v[2]) | (bf16_bits(v[3]) << 16);
    r.z = bf16_bits(v[4]) | (bf16_bits(v[5]) << 16);
    r.w = bf16_bits(v[6]) | (bf16_bits(v[7]) << 16);
    return r;
}
__device__ __forceinline__ void ld8(const uint16_t* p, long i, float* o) { unpk(ldpk(p, i), o); }
__device__ __forceinline__ void st8(uint16_t* p, long i, const float* v) { *reinterpret_cast<uint4*>(p + i) = pk(v); }
__device__ __forceinline__ void ld8(const float* p, long i, float* o) {
    float4 a = *reinterpret_cast<const float4*>(p + i), b = *reinterpret_cast<const float4*>(p + i + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void st8(float* p, long i, const float* v) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

#define FOR_CHUNKS(n8) for (long c = (long)blockIdx.x * blockDim.x + threadIdx.x; c < (n8); c += (long)gridDim.x * blockDim.x)

template <typename T>
__device__ void add2_v8(const T* a, const T* b, T* y, long n) {
    FOR_CHUNKS(n / 8) {
        float x[8], z[8];
        ld8(a, 8 * c, x);
        ld8(b, 8 * c, z);
#pragma unroll
        for (int k = 0; k < 8; k++) x[k] += z[k];
        st8(y, 8 * c, x);
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

template <typename T>
__device__ void rms_norm_fwd_v8(const T* x, const float* w, T* y, int d, float eps, const uint32_t* rows = nullptr) {
    // with `rows`, output row i normalises input row rows[i] (a gather)
    const long base = (long)blockIdx.x * d, xbase = rows ? (long)rows[blockIdx.x] * d : base;
    float ss = 0.f, v[8], wv[8];
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
#pragma unroll
        for (int k = 0; k < 8; k++) ss += v[k] * v[k];
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / d + eps);
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
        ld8(w, j, wv);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = v[k] * inv * wv[k];
        st8(y, base + j, v);
    }
}

template <typename T>
__device__ void rms_norm_bwd_acc_v8(const T* x, const float* w, const T* g, T* dx, int d, float eps,
                                    const uint32_t* rows = nullptr) {
    // with `rows`, gradient row i belongs to input (and dx) row rows[i] (a scatter-add)
    const long base = (long)blockIdx.x * d, xbase = rows ? (long)rows[blockIdx.x] * d : base;
    float ss = 0.f, dot = 0.f, v[8], gv[8], wv[8], acc[8];
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
        ld8(g, base + j, gv);
        ld8(w, j, wv);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            ss += v[k] * v[k];
            dot += gv[k] * wv[k] * v[k];
        }
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float inv = rsqrtf(ss / d + eps);
    float cc = dot * inv * inv / d;
    for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
        ld8(x, xbase + j, v);
        ld8(g, base + j, gv);
        ld8(w, j, wv);
        ld8(dx, xbase + j, acc);
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] += (gv[k] * wv[k] - v[k] * cc) * inv;
        st8(dx, xbase + j, acc);
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


// The warp-per-row masked softmax, forward and backward, 8 keys per lane access (rows up to
// 32 x WARP_ROW_MAX keys, a multiple of 8).
template <typename T>
__device__ void masked_softmax_fwd_warp_v8(const T* s, T* p, const uint32_t* key_lens, long rows, int h, int tq, int tk,
                                           float scale, int causal) {
    long row;
    int lane, len;
    if (!warp_row(rows, key_lens, h, tq, tk, causal, row, lane, len)) return;
    const long base = row * tk;
    float v[WARP_ROW_MAX];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < len) ld8(s, base + j0, v + 8 * c);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (j0 + k >= len) v[8 * c + k] = -INFINITY;
            m = fmaxf(m, v[8 * c + k]);
        }
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float e = j0 + k < len ? __expf((v[8 * c + k] - m) * scale) : 0.f;
            v[8 * c + k] = e;
            sum += e;
        }
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float inv = len > 0 ? 1.f / sum : 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < tk) {
            float o[8];
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = v[8 * c + k] * inv;
            st8(p, base + j0, o);
        }
    }
}

template <typename T>
__device__ void masked_softmax_bwd_warp_v8(const T* p, const T* dp, T* ds, long rows, int tk, float scale) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    const long base = row * tk;
    float pv[WARP_ROW_MAX], dv[WARP_ROW_MAX];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < tk) {
            ld8(p, base + j0, pv + 8 * c);
            ld8(dp, base + j0, dv + 8 * c);
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) pv[8 * c + k] = dv[8 * c + k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) dot += pv[8 * c + k] * dv[8 * c + k];
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
#pragma unroll
    for (int c = 0; c < WARP_ROW_MAX / 8; c++) {
        int j0 = (c * 32 + lane) * 8;
        if (j0 < tk) {
            float o[8];
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = scale * pv[8 * c + k] * (dv[8 * c + k] - dot);
            st8(ds, base + j0, o);
        }
    }
}

#define INSTANTIATE_V8(T, SUF)                                                                                     \
    extern "C" __global__ void add2_v8_##SUF(const T* a, const T* b, T* y, long n) { add2_v8<T>(a, b, y, n); }      \
    extern "C" __global__ void swiglu_fwd_v8_##SUF(const T* g, const T* u, T* y, long n) {                         \
        swiglu_fwd_v8<T>(g, u, y, n);                                                                               \
    }                                                                                                               \
    extern "C" __global__ void swiglu_bwd_v8_##SUF(const T* g, const T* u, const T* dy, T* out, long n) {          \
        swiglu_bwd_v8<T>(g, u, dy, out, n);                                                                         \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_fwd_v8_##SUF(const T* x, const float* w, T* y, int d, float eps) {        \
        rms_norm_fwd_v8<T>(x, w, y, d, eps);                                                                        \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_bwd_acc_v8_##SUF(const T* x, const float* w, const T* g, T* dx, int d,     \
                                                         float eps) {                                               \
        rms_norm_bwd_acc_v8<T>(x, w, g, dx, d, eps);                                                                \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_fwd_rows_v8_##SUF(const T* x, const uint32_t* rows, const float* w, T* y,   \
                                                          int d, float eps) {                                       \
        rms_norm_fwd_v8<T>(x, w, y, d, eps, rows);                                                                  \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_bwd_acc_rows_v8_##SUF(const T* x, const uint32_t* rows, const float* w,     \
                                                              const T* g, T* dx, int d, float eps) {                \
        rms_norm_bwd_acc_v8<T>(x, w, g, dx, d, eps, rows);                                                          \
    }                                                                                                               \
    extern "C" __global__ void rope_split_v8_##SUF(const T* src, T* dst, const float* cs, const float* sn, int b,   \
                                                   int t, int n, int hd, int rotate, int inverse) {                 \
        rope_split_v8<T>(src, dst, cs, sn, b, t, n, hd, rotate, inverse);                                           \
    }                                                                                                               \
    extern "C" __global__ void masked_softmax_fwd_warp_v8_##SUF(const T* s, T* p, const uint32_t* kl, long rows,    \
                                                                int h, int tq, int tk, float scale, int causal) {   \
        masked_softmax_fwd_warp_v8<T>(s, p, kl, rows, h, tq, tk, scale, causal);                                    \
    }                                                                                                               \
    extern "C" __global__ void masked_softmax_bwd_warp_v8_##SUF(const T* p, const T* dp, T* ds, long rows, int tk,  \
                                                                float scale) {                                      \
        masked_softmax_bwd_warp_v8<T>(p, dp, ds, rows, tk, scale);                                                  \
    }

INSTANTIATE_V8(float, f32)
INSTANTIATE_V8(uint16_t, bf16)

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

extern "C" __global__ void xent_grad_inplace_v8_f32(float* z, const uint32_t* t, float* out, int c, float g) {
    xent_grad_inplace_v8<float>(z, t, out, c, g);
}
extern "C" __global__ void xent_grad_inplace_v8_bf16(uint16_t* z, const uint32_t* t, float* out, int c, float g) {
    xent_grad_inplace_v8<uint16_t>(z, t, out, c, g);
}

// ---- The adapter's rank-R term c·h·Uᵀ added by the kernel that consumes a projection's
// output, instead of a β = 1 GEMM that reads and writes that output once more (9.4 ms of a
// 7B-shape step). h (m × R, bf16) has row stride ldh (a block of a group's buffer), U (n × R,
// bf16) is contiguous; R is a multiple of 8 (8 and 16 built). The product runs on the tensor
// cores (mma.sync m16n8k8, f32 accumulation): a warp takes a 16-row × 32-column tile in 4 MMAs, with the
// MMAs' columns assigned so that each thread ends up holding 8 adjacent columns of 2 rows
// (16-byte accesses for the elementwise part). A warp keeps its columns' U fragments in
// registers and walks LR_ROWS rows. The plain FMA version of this was compute-bound (2 TB/s).
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

// y = a + (b + c·h·Uᵀ): the residual add after the attention output and down projections.
template <int R>
__device__ void add_lr(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b, uint16_t* __restrict__ y,
                       long m, int n, const uint16_t* h, long ldh, const uint16_t* u, float c) {
    LR_WARP
    LrTile<R> t;
    t.load(h, ldh, u, c, col0, n);
    for (long r0 = rb; r0 < re; r0 += 16) {
        uint4 av[2], bv[2];
        LR_LOAD(av, a)
        LR_LOAD(bv, b)
        t.apply(r0, m, bv);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const long row = r0 + g + 8 * hf;
            if (!on || row >= m) continue;
            float x[8], z[8];
            unpk(av[hf], x);
            unpk(bv[hf], z);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] += z[k];
            st8(y, row * n + col, x);
        }
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

#define INSTANTIATE_LR(R)                                                                                          \
    extern "C" __global__ void add_lr##R##_bf16(const uint16_t* a, const uint16_t* b, uint16_t* y, long m, int n,  \
                                                const uint16_t* h, long ldh, const uint16_t* u, float c) {         \
        add_lr<R>(a, b, y, m, n, h, ldh, u, c);                                                                    \
    }                                                                                                               \
    extern "C" __global__ void swiglu_fwd_lr##R##_bf16(uint16_t* g, uint16_t* u, uint16_t* y, long m, int n,       \
                                                       const uint16_t* hg, long ldhg, const uint16_t* ug, float cg, \
                                                       const uint16_t* hu, long ldhu, const uint16_t* uu,          \
                                                       float cu, int writeback) {                                   \
        swiglu_fwd_lr<R>(g, u, y, m, n, hg, ldhg, ug, cg, hu, ldhu, uu, cu, writeback);                             \
    }                                                                                                               \
    extern "C" __global__ void swiglu_bwd_lr##R##_bf16(const uint16_t* g, const uint16_t* u, const uint16_t* dy,    \
                                                       uint16_t* out, long m, int n, const uint16_t* hg, long ldhg, \
                                                       const uint16_t* ug, float cg, const uint16_t* hu, long ldhu, \
                                                       const uint16_t* uu, float cu, const uint16_t* hd, long ldhd, \
                                                       const uint16_t* ud, float cd) {                              \
        swiglu_bwd_lr<R>(g, u, dy, out, m, n, hg, ldhg, ug, cg, hu, ldhu, uu, cu, hd, ldhd, ud, cd);                \
    }                                                                                                               \
    extern "C" __global__ void rope_split_lr##R##_bf16(const uint16_t* src, uint16_t* dst, const float* cs,          \
                                                       const float* sn, int b, int t, int nh, int hd, int rotate,   \
                                                       const uint16_t* h, long ldh, const uint16_t* u, float c) {   \
        rope_split_lr<R>(src, dst, cs, sn, b, t, nh, hd, rotate, h, ldh, u, c);                                     \
    }

INSTANTIATE_LR(8)
INSTANTIATE_LR(16)

// ---- An adapter's two products with its projection's output gradient g (m × n, row-major,
// bf16), in one pass over g instead of two GEMMs that each read it: g_U = g·U (m × r) and
// dU = gᵀ·h (n × r), with U (n × r) and h (m × r) bf16. A block of 4 warps takes a 128 × 128
// piece of g in 64 × 64 tiles (cp.async, two stages; all four at once measured slower, 3.48
// against 3.22 ms a TinyLlama step: fewer blocks fit an SM) and keeps both products' partial
// sums in tensor-core accumulators (mma.sync m16n8k16): g_U over the piece's columns, dU over
// its rows. They go to f32 buffers pg (n / 128, m, r) and pu (m / 128, n, r) for gpass_sum,
// small enough to stay in L2. n a multiple of 8 (whole 16-byte chunks); rows and columns past
// m, n are zeros.
#define GP_T 64  // tile side
#define GP_S 2   // tiles per piece side
template <int R>
__device__ void gpass(const bf16* __restrict__ g, long m, int n, const bf16* __restrict__ u,
                      const bf16* __restrict__ h, long ldh, float* __restrict__ pg, float* __restrict__ pu) {
    using namespace tc;
    constexpr int P = GP_S * GP_T, LD = GP_T + 8, NT = R / 8;
    __shared__ __align__(16) bf16 tile[2][GP_T * LD];
    __shared__ __align__(16) bf16 ut[R][P + 8];  // U's rows of the piece's columns, transposed
    __shared__ __align__(16) bf16 ht[R][P + 8];  // h's rows of the piece's rows, transposed
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, tg = lane & 3, gq = lane >> 2;
    const long r0 = (long)blockIdx.y * P;
    const int c0 = blockIdx.x * P;
    auto issue = [&](int i, int st) {
        const long rb = r0 + (i / GP_S) * GP_T;
        const int cb = c0 + (i % GP_S) * GP_T;
        for (int e = threadIdx.x; e < GP_T * GP_T / 8; e += blockDim.x) {
            const int rr = e / (GP_T / 8), cc = (e % (GP_T / 8)) * 8;
            const bool ok = rb + rr < m && cb + cc < n;
            cp16(&tile[st][rr * LD + cc], g + (ok ? (rb + rr) * n + cb + cc : 0), ok);
        }
        cp_commit();
    };
    issue(0, 0);
    for (int e = threadIdx.x; e < P * R; e += blockDim.x) {
        const int j = e / R, k = e % R;
        ut[k][j] = c0 + j < n ? u[(long)(c0 + j) * R + k] : 0;
        ht[k][j] = r0 + j < m ? h[(r0 + j) * ldh + k] : 0;
    }
    float ag[NT][4], au[GP_S][NT][4];
#pragma unroll
    for (int c = 0; c < GP_S; c++)
#pragma unroll
        for (int j = 0; j < NT; j++) au[c][j][0] = au[c][j][1] = au[c][j][2] = au[c][j][3] = 0.f;
#pragma unroll
    for (int rb = 0; rb < GP_S; rb++) {
#pragma unroll
        for (int j = 0; j < NT; j++) ag[j][0] = ag[j][1] = ag[j][2] = ag[j][3] = 0.f;
#pragma unroll
        for (int cb = 0; cb < GP_S; cb++) {
            const int i = rb * GP_S + cb, st = stage_in<2>(i, GP_S * GP_S, issue);
            const bf16* s = tile[st];
#pragma unroll
            for (int kk = 0; kk < GP_T / 16; kk++) {
                // g_U: the tile's rows 16·w.. times U's rows at the tile's columns
                uint32_t a[4];
                ldsm(a, s + (16 * w + (lane & 15)) * LD + 16 * kk + 8 * (lane >> 4));
                const int col = cb * GP_T + 16 * kk + 2 * tg;
#pragma unroll
                for (int j = 0; j < NT; j++)
                    mma(ag[j], a, *reinterpret_cast<const uint32_t*>(&ut[8 * j + gq][col]),
                        *reinterpret_cast<const uint32_t*>(&ut[8 * j + gq][col + 8]));
                // dU: the tile's columns 16·w.. (rows of its transpose) times h's rows
                ldsm_t(a, s + (16 * kk + (lane & 7) + 8 * (lane >> 4)) * LD + 16 * w + 8 * ((lane >> 3) & 1));
                const int row = rb * GP_T + 16 * kk + 2 * tg;
#pragma unroll
                for (int j = 0; j < NT; j++)
                    mma(au[cb][j], a, *reinterpret_cast<const uint32_t*>(&ht[8 * j + gq][row]),
                        *reinterpret_cast<const uint32_t*>(&ht[8 * j + gq][row + 8]));
            }
            stage_out<2>(i, GP_S * GP_S, issue);  // (a barrier: tile i + 2 goes into this stage)
        }
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const long row = r0 + rb * GP_T + 16 * w + gq + 8 * hf;
            if (row >= m) continue;
#pragma unroll
            for (int j = 0; j < NT; j++)
                *reinterpret_cast<float2*>(pg + ((long)blockIdx.x * m + row) * R + 8 * j + 2 * tg) =
                    make_float2(ag[j][2 * hf], ag[j][2 * hf + 1]);
        }
    }
#pragma unroll
    for (int cb = 0; cb < GP_S; cb++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int col = c0 + cb * GP_T + 16 * w + gq + 8 * hf;
            if (col >= n) continue;
#pragma unroll
            for (int j = 0; j < NT; j++)
                *reinterpret_cast<float2*>(pu + ((long)blockIdx.y * n + col) * R + 8 * j + 2 * tg) =
                    make_float2(au[cb][j][2 * hf], au[cb][j][2 * hf + 1]);
        }
}

// The sums of gpass's partials: g_U (m × r, bf16, row stride ldgu) over the ng column pieces
// (blockIdx.y = 0), and out (n × r, f32) = beta·out + c·dU over the nu row pieces (1).
template <int R>
__device__ void gpass_sum(const float* __restrict__ pg, int ng, long m, bf16* __restrict__ gu, long ldgu,
                          const float* __restrict__ pu, int nu, int n, float* __restrict__ out, float c, float beta) {
    const long step = (long)gridDim.x * blockDim.x;
    if (blockIdx.y == 0) {
        for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < m * R; i += step) {
            float acc = 0.f;
#pragma unroll 8
            for (int p = 0; p < ng; p++) acc += pg[(long)p * m * R + i];
            gu[(i / R) * ldgu + i % R] = bf16_bits(acc);
        }
    } else {
        for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)n * R; i += step) {
            float acc = 0.f;
#pragma unroll 8
            for (int p = 0; p < nu; p++) acc += pu[(long)p * n * R + i];
            out[i] = beta == 0.f ? c * acc : beta * out[i] + c * acc;
        }
    }
}

#define INSTANTIATE_GPASS(R)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) gpass##R(const bf16* g, long m, int n, const bf16* u,        \
                                                               const bf16* h, long ldh, float* pg, float* pu) {    \
        gpass<R>(g, m, n, u, h, ldh, pg, pu);                                                                       \
    }                                                                                                               \
    extern "C" __global__ void gpass_sum##R(const float* pg, int ng, long m, bf16* gu, long ldgu, const float* pu,  \
                                            int nu, int n, float* out, float c, float beta) {                        \
        gpass_sum<R>(pg, ng, m, gu, ldgu, pu, nu, n, out, c, beta);                                                 \
    }

INSTANTIATE_GPASS(8)
INSTANTIATE_GPASS(16)
