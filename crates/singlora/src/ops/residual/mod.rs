//! The CUDA fast path's residual add y = a + b over the residual stream, and with an adapted
//! projection's low-rank term added to b on the way in (see `ops/low_rank`). Kernels in
//! `residual.cu`.

use candle_core::Tensor;

use super::cuda::{args, bf16_ptr, elems_or_v8_cfg, ptx_module, Ctx, Module};
use super::low_rank::{entry_ctx, kernel_terms, launch_lr, lr_cfg, term, LowRank, Term};

const MODULE: Module = ptx_module!("residual");

/// y = a + b over n elements.
pub fn add(cx: &Ctx, (a, b, y): (u64, u64, u64), n: usize) -> candle_core::Result<()> {
    let vec = cx.v8(&[a, b, y], n);
    let name = cx.kernel("add2", vec);
    // SAFETY: a, b and y hold n elements.
    unsafe {
        MODULE.launch(
            cx.dev,
            &name,
            elems_or_v8_cfg(n, vec),
            args![a, b, y, n as i64],
        )
    }
}

/// y = a + (b + c·h·Uᵀ) over m × n (the residual add after an adapted projection b).
pub fn add_lr(
    cx: &Ctx,
    (a, b, y): (u64, u64, u64),
    (m, n): (usize, usize),
    lr: &LowRank,
) -> candle_core::Result<()> {
    let terms = kernel_terms(cx, "add_lr", [Some(lr)], &[a, b, y], n)?;
    let lead = args![a, b, y, m as i64, n as i32];
    // SAFETY: a, b and y hold m × n elements, the term h m rows of ldh and U n × r (checked).
    unsafe { launch_lr(cx, &MODULE, "add_lr", terms, (lead, &[]), lr_cfg(m, n)) }
}

/// a + (b + c·h·Uᵀ) (bf16, m × n) through the low-rank epilogue kernel: the device check's
/// entry to it.
pub fn add_low_rank(a: &Tensor, b: &Tensor, t: Term) -> candle_core::Result<Tensor> {
    let (m, n) = a.dims2()?;
    let y = a.zeros_like()?;
    let (ap, dev) = bf16_ptr(a, "a")?;
    let lr = term(&t, n)?;
    let ptrs = (ap, bf16_ptr(b, "b")?.0, bf16_ptr(&y, "y")?.0);
    add_lr(&entry_ctx(&dev), ptrs, (m, n), &lr)?;
    Ok(y)
}
