// im2col for a 2-D convolution on the GPU (ops/conv: the launcher and the GEMM that follows).
// NCHW input, square kernel k, stride s, zero padding p, dilation 1:
//   col[img][(ci·k + ky)·k + kx][oy·wo + ox] = x[img][ci][oy·s − p + ky][ox·s − p + kx]
// (0 outside x). Each col row is one (image, channel, tap); threads walk the col matrix in its
// order (a grid-stride loop over all of it, so that small images keep every thread busy and
// large ones do not need more blocks than the GPU holds), so writes are coalesced and reads are
// too at stride 1. A pure copy: bf16 is moved as its 16 bits.
#include "../cuda/common.cuh"

template <typename T>
__device__ void im2col(const T* x, T* col, int c, int h, int w, int k, int s, int p, int ho, int wo, int rows) {
    const int m = ho * wo;
    const int taps = k * k;
    const long n = (long)rows * m;
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        // r = (img·c + ci)·k·k + ky·k + kx, i the output pixel
        const long r = idx / m;
        const int i = (int)(idx - r * m);
        const int kx = (int)(r % k), ky = (int)((r / k) % k);
        const T* src = x + (r / taps) * h * w;
        const int oy = i / wo, ox = i - oy * wo;
        const int iy = oy * s - p + ky, ix = ox * s - p + kx;
        T v = T(0);
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = src[(long)iy * w + ix];
        col[idx] = v;
    }
}

// im2col as above at stride 1 for images whose output rows are whole groups of 8 pixels
// (wo % 8 == 0): a thread writes 8 neighbours of one output row with one 16-byte store (the
// column matrix's rows are 16-byte aligned: m = ho·wo is a multiple of 8) and reads the 8 inputs
// they take. Indices in 32 bits (the launcher takes this kernel only where rows · ho·wo / 8 fits
// in an int): a 64-bit division is a long subroutine, and the kernel has four per store.
__device__ void im2col_s1_v8(const uint16_t* x, uint16_t* col, int c, int h, int w, int k, int p, int ho, int wo,
                             int rows) {
    const unsigned groups = (unsigned)(ho * wo / 8);
    const unsigned taps = (unsigned)(k * k);
    const unsigned n = (unsigned)rows * groups;
    uint4* dst = reinterpret_cast<uint4*>(col);
    for (unsigned idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += gridDim.x * blockDim.x) {
        // r = (img·c + ci)·k·k + ky·k + kx: the col row; g the group of 8 output pixels in it
        const unsigned r = idx / groups, g = idx - r * groups;
        const unsigned plane = r / taps, tap = r - plane * taps;
        const int ky = (int)(tap / (unsigned)k), kx = (int)tap - ky * k;
        const uint16_t* src = x + (long)plane * h * w;
        const int i = (int)g * 8;
        const int oy = i / wo, ox = i - oy * wo;
        const int iy = oy - p + ky, ix = ox - p + kx;
        uint16_t v[8];
        const bool row_in = iy >= 0 && iy < h;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int xx = ix + j;
            v[j] = row_in && xx >= 0 && xx < w ? src[iy * w + xx] : (uint16_t)0;
        }
        uint4 out;
        out.x = v[0] | ((uint32_t)v[1] << 16);
        out.y = v[2] | ((uint32_t)v[3] << 16);
        out.z = v[4] | ((uint32_t)v[5] << 16);
        out.w = v[6] | ((uint32_t)v[7] << 16);
        dst[idx] = out;
    }
}

// (im2col's parameters; the stride is 1)
extern "C" __global__ void im2col_s1_v8_bf16(const uint16_t* x, uint16_t* col, int c, int h, int w, int k, int s,
                                             int p, int ho, int wo, int rows) {
    im2col_s1_v8(x, col, c, h, w, k, p, ho, wo, rows);
}

// im2col through shared memory: a block takes one input plane (image, channel) at a time, reads
// it once, coalesced, into shared memory with its zero border, then writes the plane's k·k col
// rows from there. The kernels above read each input k·k times through the cache, 2 bytes at a
// time; here global memory sees one read of the input and the col matrix's writes (16 bytes a
// thread where a col row is whole groups of 8 pixels at bf16: `V8`). Any stride. The launcher
// takes it where a padded plane fits in the shared memory it asks for.
template <typename T, bool V8>
__device__ void im2col_plane(const T* x, T* col, int planes, int h, int w, int k, int s, int p, int ho, int wo) {
    extern __shared__ unsigned char smem_raw[];
    T* sm = reinterpret_cast<T*>(smem_raw);
    const int hp = h + 2 * p, wp = w + 2 * p;
    const unsigned m = (unsigned)(ho * wo);
    const unsigned taps = (unsigned)(k * k);
    const unsigned per_row = V8 ? m / 8 : m;
    for (int plane = blockIdx.x; plane < planes; plane += gridDim.x) {
        const T* src = x + (long)plane * h * w;
        for (unsigned i = threadIdx.x; i < (unsigned)(hp * wp); i += blockDim.x) {
            const int py = (int)(i / (unsigned)wp), px = (int)i - py * wp;
            const int iy = py - p, ix = px - p;
            sm[i] = iy >= 0 && iy < h && ix >= 0 && ix < w ? src[iy * w + ix] : T(0);
        }
        __syncthreads();
        T* dst = col + (long)plane * taps * m;
        for (unsigned idx = threadIdx.x; idx < taps * per_row; idx += blockDim.x) {
            const unsigned tap = idx / per_row, g = idx - tap * per_row;
            const int ky = (int)(tap / (unsigned)k), kx = (int)tap - ky * k;
            if (V8) {
                const int i = (int)g * 8;
                const int oy = i / wo, ox = i - oy * wo;
                const T* row = sm + (oy * s + ky) * wp + ox * s + kx;
                uint16_t v[8];
#pragma unroll
                for (int j = 0; j < 8; j++) v[j] = reinterpret_cast<const uint16_t*>(row)[j * s];
                uint4 out;
                out.x = v[0] | ((uint32_t)v[1] << 16);
                out.y = v[2] | ((uint32_t)v[3] << 16);
                out.z = v[4] | ((uint32_t)v[5] << 16);
                out.w = v[6] | ((uint32_t)v[7] << 16);
                reinterpret_cast<uint4*>(dst + (long)tap * m)[g] = out;
            } else {
                const int oy = (int)g / wo, ox = (int)g - oy * wo;
                dst[(long)tap * m + g] = sm[(oy * s + ky) * wp + ox * s + kx];
            }
        }
        __syncthreads();
    }
}

// (im2col's parameters: rows / (k·k) planes; the col matrix's rows are 16-byte aligned for the
// 8-wide stores)
extern "C" __global__ void im2col_plane_v8_bf16(const uint16_t* x, uint16_t* col, int c, int h, int w, int k, int s,
                                                int p, int ho, int wo, int rows) {
    im2col_plane<uint16_t, true>(x, col, rows / (k * k), h, w, k, s, p, ho, wo);
}

// The kernel of a convolution's input gradient: w (co, ci, k, k) → (ci, co, k, k) with the taps
// reversed along both axes, one thread per element.
template <typename T>
__device__ void flip_kernel(const T* w, T* out, int co, int ci, int k) {
    const long n = (long)co * ci * k * k;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        // i indexes out: ((c_in · co + c_out) · k + ky) · k + kx
        const int kx = i % k, ky = (i / k) % k;
        const long pair = i / ((long)k * k);
        const int o = pair % co, c = pair / co;
        out[i] = w[(((long)o * ci + c) * k + (k - 1 - ky)) * k + (k - 1 - kx)];
    }
}

#define INSTANTIATE(T, SUF)                                                                                     \
    extern "C" __global__ void im2col_##SUF(const T* x, T* col, int c, int h, int w, int k, int s, int p,      \
                                             int ho, int wo, int rows) {                                       \
        im2col<T>(x, col, c, h, w, k, s, p, ho, wo, rows);                                                     \
    }                                                                                                           \
    extern "C" __global__ void flip_kernel_##SUF(const T* w, T* out, int co, int ci, int k) {                  \
        flip_kernel<T>(w, out, co, ci, k);                                                                      \
    }                                                                                                           \
    extern "C" __global__ void im2col_plane_##SUF(const T* x, T* col, int c, int h, int w, int k, int s, int p, \
                                                   int ho, int wo, int rows) {                                 \
        im2col_plane<T, false>(x, col, rows / (k * k), h, w, k, s, p, ho, wo);                                  \
    }
INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
