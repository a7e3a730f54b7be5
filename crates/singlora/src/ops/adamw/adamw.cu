// AdamW's update of every f32 parameter in one launch (ops/adamw; the optimizer is crate::optim).

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
