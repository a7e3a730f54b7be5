// im2col for a 2-D convolution on the GPU (ops/conv: the launcher and the GEMM that follows).
// NCHW input, square kernel k, stride s, zero padding p, dilation 1:
//   col[img][(ci·k + ky)·k + kx][oy·wo + ox] = x[img][ci][oy·s − p + ky][ox·s − p + kx]
// (0 outside x). Each col row is one (image, channel, tap); a block row of threads walks its
// output pixels, so writes are coalesced and reads are too at stride 1. A pure copy: bf16 is
// moved as its 16 bits.
#include "../cuda/common.cuh"

template <typename T>
__device__ void im2col(const T* x, T* col, int c, int h, int w, int k, int s, int p, int ho, int wo, int rows) {
    const int m = ho * wo;
    const int taps = k * k;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        // r = (img·c + ci)·k·k + ky·k + kx
        const int kx = r % k, ky = (r / k) % k;
        const long plane = (long)(r / taps);  // img·c + ci
        const T* src = x + plane * h * w;
        T* dst = col + (long)r * m;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < m; i += gridDim.x * blockDim.x) {
            const int oy = i / wo, ox = i - oy * wo;
            const int iy = oy * s - p + ky, ix = ox * s - p + kx;
            T v = T(0);
            if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = src[(long)iy * w + ix];
            dst[i] = v;
        }
    }
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
    }
INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
