// The linear layers' element-wise kernels (ops/linear: the candle ops and their CPU code; the
// products are cuBLAS GEMMs): the bias rows a bias-initialised GEMM accumulates into, and DoRA's
// output scaling and its magnitude's gradient.
#include "../cuda/common.cuh"

// y (m, n) <- each row the bias b (n): the output a bias-initialised GEMM accumulates into.
template <typename T>
__device__ void bias_rows(const T* b, T* y, long m, int n) {
    long total = m * n;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        y[i] = b[i % n];
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

#define INSTANTIATE(T, SUF)                                                                                          \
    extern "C" __global__ void bias_rows_##SUF(const T* b, T* y, long m, int n) { bias_rows<T>(b, y, m, n); }        \
    extern "C" __global__ void col_scale_##SUF(const T* x, const float* s, const T* b, T* y, long m, int n) {        \
        col_scale<T>(x, s, b, y, m, n);                                                                              \
    }                                                                                                                \
    extern "C" __global__ void col_dot_##SUF(const T* a, const T* b, const float* w, float* out, long m, int n,      \
                                             int rows_per) {                                                         \
        col_dot<T>(a, b, w, out, m, n, rows_per);                                                                    \
    }                                                                                                               

INSTANTIATE(float, f32)
INSTANTIATE(uint16_t, bf16)
