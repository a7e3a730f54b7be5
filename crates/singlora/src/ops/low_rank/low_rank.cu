// An adapter's two products with its projection's output gradient g in one pass over g (the
// backward of ops/low_rank's `g_pass`); the epilogue tile the consumer kernels share is in
// low_rank.cuh.
#include "../cuda/common.cuh"
#include "../cuda/tc.cuh"

// An adapter's two products with its projection's output gradient g (m × n, row-major,
// bf16), in one pass over g instead of two GEMMs that each read it: g_U = g·U (m × r) and
// dU = gᵀ·h (n × r), with U (n × r) and h (m × r) bf16. A block of 4 warps takes a 128 × 128
// piece of g in 64 × 64 tiles (cp.async, two stages: all four tiles at once would let fewer
// blocks fit an SM, 3.48 against 3.22 ms a TinyLlama step) and keeps both products' partial
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
