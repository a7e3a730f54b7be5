// AdamW's update of every f32 parameter in one launch, and the gradients' sum of squares for
// clipping (ops/adamw; the optimizer is crate::optim).

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
//
// With sumsq (the sum of every gradient's squares, sum_squares_multi_f32's output), gradients
// are clipped to the global norm max_norm first: g <- g max_norm / (norm + 1e-6) where norm =
// sqrt(sumsq) exceeds it; where the norm is not finite nothing is updated (the caller reports
// the divergence).
extern "C" __global__ void adamw_multi_f32(const AdamWJob* jobs, float b1, float b2, float eps, float bc1, float bc2,
                                           const float* sumsq, float max_norm) {
    const AdamWJob j = jobs[blockIdx.y];
    float scale = 1.f;
    if (sumsq != nullptr) {
        const float norm = sqrtf(*sumsq);
        if (!isfinite(norm)) return;
        if (norm > max_norm) scale = max_norm / (norm + 1e-6f);
    }
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < j.n; i += (long)gridDim.x * blockDim.x) {
        float gi = j.g[i] * scale;
        float mi = b1 * j.m[i] + (1.f - b1) * gi;
        float vi = b2 * j.v[i] + (1.f - b2) * gi * gi;
        j.m[i] = mi;
        j.v[i] = vi;
        j.p[i] = j.p[i] * j.decay - j.lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

// *out += the sum of every job's gradient's squares (out zeroed by the caller). Block row y
// takes job y, its blocks striding over the elements; each block adds its partial sum once.
extern "C" __global__ void sum_squares_multi_f32(const AdamWJob* jobs, float* out) {
    const AdamWJob j = jobs[blockIdx.y];
    float acc = 0.f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < j.n; i += (long)gridDim.x * blockDim.x) {
        const float gi = j.g[i];
        acc += gi * gi;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ float warps[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warps[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (int)(blockDim.x >> 5) ? warps[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0 && acc != 0.f) atomicAdd(out, acc);
    }
}
