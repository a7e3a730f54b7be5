// With the `cuda` feature the binary finds the GPU machine's CUDA libraries by RUNPATH.
fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        for dir in [
            "/usr/local/cuda/lib64",
            "/usr/local/nvidia/lib64",
            "/usr/lib/x86_64-linux-gnu",
        ] {
            println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
        }
    }
}
