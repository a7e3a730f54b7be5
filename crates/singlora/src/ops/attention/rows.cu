// Row gathers between a packed batch (several examples end to end in each row) and one
// example per row: dst[r] = src[idx[r]], or zeros where idx[r] < 0. The same kernel runs both
// ways, with the map for that direction (bf16 or f32 rows of `width` elements).
#include "../cuda/common.cuh"

template <typename T>
__device__ void gather(const T* __restrict__ src, const int* __restrict__ idx, T* __restrict__ dst, long rows,
                       int width) {
    const long n = rows * width;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long r = i / width;
        const int s = idx[r];
        st(dst, i, s < 0 ? 0.0f : ld(src, (long)s * width + (i - r * width)));
    }
}

extern "C" __global__ void rows_gather_f32(const float* src, const int* idx, float* dst, long rows, int width) {
    gather<float>(src, idx, dst, rows, width);
}
extern "C" __global__ void rows_gather_bf16(const uint16_t* src, const int* idx, uint16_t* dst, long rows,
                                            int width) {
    gather<uint16_t>(src, idx, dst, rows, width);
}
