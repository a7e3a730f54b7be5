// With the `cuda` feature, compiles every fused op's kernels (src/ops/<op>/<name>.cu) to PTX
// (OUT_DIR/<name>.ptx) with the toolkit's nvcc (scripts/build-cuda.sh puts it on PATH); the
// library embeds the PTX, each op's launchers their own file's. Shared kernel code is in
// headers (.cuh) that the .cu files include by relative path. Cargo reruns this when a kernel
// file under src/ops changes, a new one included (or this file does).
use std::path::{Path, PathBuf};

/// The files under `dir` whose names end with one of `exts`, sorted.
fn files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, exts, out);
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
        {
            out.push(p);
        }
    }
}

fn main() {
    let mut sources = vec![];
    files(Path::new("src/ops"), &["cu", "cuh"], &mut sources);
    println!("cargo:rerun-if-changed=build.rs");
    // a directory: cargo reruns this when anything under it changes, a new kernel file included
    println!("cargo:rerun-if-changed=src/ops");
    for p in &sources {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels = sources.iter().filter(|p| p.extension().unwrap() == "cu");
    for src in kernels {
        let name = src.file_stem().unwrap().to_str().unwrap();
        let status = std::process::Command::new(&nvcc)
            .args([
                "-ptx",
                "-O3",
                "--use_fast_math",
                &format!("-arch=compute_{cap}"),
                "-o",
            ])
            .arg(dir.join(format!("{name}.ptx")))
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
