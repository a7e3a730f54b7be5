/* f32 GEMM throughput of the machine's OpenBLAS (n x n, 10 calls after one warm-up), beside
 * the `gemm` crate's ~150 GFLOP/s that docs/benchmarks.md quotes for the CPU step:
 *   gcc -O2 bench/openblas_sgemm.c -o /tmp/sg /usr/lib/x86_64-linux-gnu/libopenblas.so.0
 *   /tmp/sg; OPENBLAS_CORETYPE=SkylakeX /tmp/sg
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

extern void sgemm_(char*, char*, int*, int*, int*, float*, float*, int*, float*, int*, float*, float*, int*);

int main(void) {
    int n = 1024;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    for (int i = 0; i < n * n; i++) {
        a[i] = 1.0f / (i % 7 + 1);
        b[i] = 1.0f / (i % 5 + 1);
        c[i] = 0;
    }
    float alpha = 1, beta = 0;
    char t = 'N';
    struct timespec s, e;
    sgemm_(&t, &t, &n, &n, &n, &alpha, a, &n, b, &n, &beta, c, &n);
    clock_gettime(CLOCK_MONOTONIC, &s);
    for (int r = 0; r < 10; r++) sgemm_(&t, &t, &n, &n, &n, &alpha, a, &n, b, &n, &beta, c, &n);
    clock_gettime(CLOCK_MONOTONIC, &e);
    double sec = (e.tv_sec - s.tv_sec) + (e.tv_nsec - s.tv_nsec) / 1e9;
    printf("%.1f GFLOP/s\n", 10 * 2.0 * n * n * n / sec / 1e9);
    free(a);
    free(b);
    free(c);
    return 0;
}
