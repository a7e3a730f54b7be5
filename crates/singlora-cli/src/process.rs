//! Process set-up shared by the `singlora` and `singlora-lab` binaries (the lab includes this
//! file), so that benchmarks run training steps exactly as `singlora train` does, and the
//! cache both fetch into.

use std::path::PathBuf;
use std::process::ExitCode;

/// The directory where `singlora demo` keeps what it fetches (the model under
/// `all-MiniLM-L6-v2/`, the data set under `rotten_tomatoes/`): `arg`, else `$SINGLORA_CACHE`,
/// else `~/.cache/singlora`.
pub fn cache_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("SINGLORA_CACHE").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/singlora")))
        .unwrap_or_else(|| PathBuf::from(".singlora-cache"))
}

// Training allocates and frees large activation buffers every step; mimalloc keeps them mapped
// instead of returning them to the kernel and faulting them back in (a third of a CPU step).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option index of `purge_delay` (mimalloc 2.x, `mi_option_purge_delay`).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Sets the process up, runs `main` and turns its error into a message and an exit code.
pub fn run(main: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    // Keep freed pages mapped for 10 s instead of 1: a training step (about a second on the
    // CPU) reuses the previous step's buffers, and purging them between steps made the kernel
    // zero-fill them again every step; idle memory still goes back.
    // SAFETY: called before any other thread exists; the option is a plain integer setting.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    // candle sizes every CPU matmul by parsing /proc/cpuinfo unless RAYON_NUM_THREADS is set;
    // fix its own answer once, before any thread starts
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
    // NCCL's NVLink multicast (NVLS) needs fabric support many multi-GPU hosts lack, and a
    // group then fails to start; off unless the user turns it on
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    match main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
