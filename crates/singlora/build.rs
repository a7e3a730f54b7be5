// With the `cuda` feature, compiles the fused kernels (src/ops/cuda/kernels.cu and flash.cu) to
// PTX with the toolkit's nvcc (scripts/build-cuda.sh puts it on PATH); the library embeds the PTX.
fn main() {
    println!("cargo:rerun-if-changed=src/ops/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/ops/cuda/flash.cu");
    println!("cargo:rerun-if-changed=src/ops/cuda/tc.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let dir = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for name in ["kernels", "flash"] {
        let src = format!("src/ops/cuda/{name}.cu");
        let status = std::process::Command::new(&nvcc)
            .args([
                "-ptx",
                "-O3",
                "--use_fast_math",
                &format!("-arch=compute_{cap}"),
                "-o",
            ])
            .arg(dir.join(format!("{name}.ptx")))
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
