// With the `cuda` feature, compiles the fused kernels (src/ops/cuda/kernels.cu) to PTX with the
// toolkit's nvcc (scripts/build-cuda.sh puts it on PATH); the library embeds the PTX.
fn main() {
    println!("cargo:rerun-if-changed=src/ops/cuda/kernels.cu");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = std::process::Command::new(&nvcc)
        .args([
            "-ptx",
            "-O3",
            "--use_fast_math",
            &format!("-arch=compute_{cap}"),
            "-o",
        ])
        .arg(&out)
        .arg("src/ops/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
    assert!(status.success(), "nvcc failed on src/ops/cuda/kernels.cu");
}
