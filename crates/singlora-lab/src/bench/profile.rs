//! Where a LLaMA training step's time goes, by op class: each component of one decoder layer
//! (and the head, loss and optimizer) run alone at the model's shape, forward and backward,
//! timed after a device synchronise (median of several runs), then scaled by how often a step
//! runs it. The sum is compared with a whole measured step by the caller.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::median;
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::{AdaptedLinear, Adapter, AdapterSpec, Method};
use singlora::error::Result;
use singlora::linear::FrozenLinear;
use singlora::ops::{masked_attention, rms_norm, rope_split, rope_tables, swiglu};
use singlora::optim::{AdamW, AdamWConfig, GradAccumulator};
use singlora::synthetic::LlamaShape;

#[derive(Debug, Clone, Serialize)]
pub struct ProfileRow {
    pub class: String,
    pub component: String,
    /// Per occurrence.
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Occurrences in one training step.
    pub per_step: usize,
    /// forward + backward, times occurrences.
    pub step_ms: f64,
}

/// Times `f` (forward) and its backward (candle seeds a non-scalar output with ones, so the
/// harness adds only that fill).
fn time_fb(
    device: &Device,
    reps: usize,
    inputs: &[Var],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(f64, f64)> {
    let (mut fw, mut bw) = (vec![], vec![]);
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    for i in 0..reps + 2 {
        device.synchronize()?;
        let t0 = Instant::now();
        let y = f(&ts)?;
        device.synchronize()?;
        let t1 = Instant::now();
        let grads = y.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
        drop(grads);
        if i >= 2 {
            fw.push((t1 - t0).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    Ok((median(fw), median(bw)))
}

/// The per-component profile of a `method` step (None = frozen base) at `shape`.
pub fn profile(
    shape: LlamaShape,
    method: Option<Method>,
    rank: usize,
    batch: usize,
    seq: usize,
    device: &Device,
) -> Result<Vec<ProfileRow>> {
    let dt = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let (h, ff, nh, kvh) = (
        shape.hidden,
        shape.intermediate,
        shape.heads,
        shape.kv_heads,
    );
    let hd = h / nh;
    let m = batch * seq;
    let l = shape.layers;
    let reps = 5;
    let mut rows = vec![];
    let mut push = |class: &str, component: &str, (f, b): (f64, f64), per_step: usize| {
        rows.push(ProfileRow {
            class: class.into(),
            component: component.into(),
            forward_ms: f,
            backward_ms: b,
            per_step,
            step_ms: (f + b) * per_step as f64,
        });
    };
    let var = |shape: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(
            &Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dt)?,
        )?)
    };

    // frozen GEMMs (input gradient only), one per projection shape
    for (name, o, i, n) in [
        ("q/o proj", h, h, 2 * l),
        ("k/v proj", kvh * hd, h, 2 * l),
        ("gate/up proj", ff, h, 2 * l),
        ("down proj", h, ff, l),
    ] {
        let w = (Tensor::randn(0f32, 0.02, (o, i), device)?).to_dtype(dt)?;
        let x = var(&[m, i])?;
        let lin = FrozenLinear::new(w.clone(), None);
        let t = time_fb(device, reps, std::slice::from_ref(&x), &|v| {
            Ok(lin.forward(&v[0])?)
        })?;
        push("frozen GEMM", name, t, n);
        if let Some(mt) = method {
            let clock = RampClock::new(RampSchedule::none(), 0);
            let spec = AdapterSpec::new(mt.kind(), rank, rank as f64);
            let adapter = Adapter::init(&spec, name, &w, &clock)?;
            let al =
                AdaptedLinear::new(name, FrozenLinear::new(w.clone(), None)).with_adapter(adapter);
            let t_ad = time_fb(device, reps, std::slice::from_ref(&x), &|v| {
                al.forward(&v[0])
            })?;
            // the adapter's own share: the adapted layer minus the frozen one
            push(
                "adapter path",
                name,
                ((t_ad.0 - t.0).max(0.0), (t_ad.1 - t.1).max(0.0)),
                n,
            );
        }
    }
    // what a frozen GEMM's backward is made of, at the q projection's shape: the GEMM alone,
    // and the bookkeeping candle's autograd adds to every gradient edge (a zero tensor the
    // size of the input, then an add into it)
    {
        let w = Tensor::randn(0f32, 0.02, (h, h), device)?.to_dtype(dt)?;
        let g = Tensor::randn(0f32, 1.0, (m, h), device)?.to_dtype(dt)?;
        let one = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
            let mut v = vec![];
            for i in 0..reps + 2 {
                device.synchronize()?;
                let t0 = Instant::now();
                let y = f()?;
                device.synchronize()?;
                if i >= 2 {
                    v.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                drop(y);
            }
            Ok(median(v))
        };
        let gemm = one(&|| Ok(g.matmul(&w)?))?;
        push(
            "(parts)",
            "q proj backward: the dx GEMM alone",
            (0.0, gemm),
            0,
        );
        let edge = one(&|| Ok(g.zeros_like()?.add(&g)?))?;
        push(
            "(parts)",
            "one gradient edge's zeros + add, (m, hidden)",
            (0.0, edge),
            0,
        );
    }
    // attention at (b, heads, t, hd) with GQA and the causal mask
    let q = var(&[batch, nh, seq, hd])?;
    let k = var(&[batch, kvh, seq, hd])?;
    let v = var(&[batch, kvh, seq, hd])?;
    let lens = vec![seq; batch];
    let t = time_fb(device, reps, &[q.clone(), k.clone(), v.clone()], &|x| {
        masked_attention(&x[0], &x[1], &x[2], &lens, true)
    })?;
    push(
        "attention",
        "QK^T, masked softmax, PV (incl. GQA expand, copies)",
        t,
        l,
    );
    let s = var(&[batch, nh, seq, seq])?;
    let t = time_fb(device, reps, &[s], &|x| {
        singlora::ops::masked_softmax(&x[0], 0.088, &lens, true)
    })?;
    push("attention (part)", "masked softmax alone", t, l);
    // norms
    let x = var(&[batch, seq, h])?;
    let w = Tensor::ones(h, DType::F32, device)?;
    let t = time_fb(device, reps, std::slice::from_ref(&x), &|v| {
        rms_norm(&v[0], &w, 1e-5)
    })?;
    push("norms", "RMSNorm", t, 2 * l + 1);
    // head split with RoPE on q and k, split alone on v (from the projections' (b, t, n·hd))
    let inv: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64))
        .collect();
    let table_dt = if device.is_cpu() { dt } else { DType::F32 };
    let (cos, sin) = rope_tables(&inv, seq, table_dt, device)?;
    let qp = var(&[batch, seq, nh * hd])?;
    let kp = var(&[batch, seq, kvh * hd])?;
    let t = time_fb(device, reps, std::slice::from_ref(&qp), &|v| {
        rope_split(&v[0], &cos, &sin, nh, true)
    })?;
    push("elementwise", "RoPE + head split (q)", t, l);
    let t = time_fb(device, reps, std::slice::from_ref(&kp), &|v| {
        rope_split(&v[0], &cos, &sin, kvh, true)
    })?;
    push("elementwise", "RoPE + head split (k)", t, l);
    let t = time_fb(device, reps, std::slice::from_ref(&kp), &|v| {
        rope_split(&v[0], &cos, &sin, kvh, false)
    })?;
    push("copies", "head split (v)", t, l);
    // SwiGLU and residual adds
    let g = var(&[m, ff])?;
    let u = var(&[m, ff])?;
    let t = time_fb(device, reps, &[g, u], &|v| swiglu(&v[0], &v[1]))?;
    push("elementwise", "SwiGLU silu(gate)*up", t, l);
    let a = var(&[batch, seq, h])?;
    let t = time_fb(device, reps, &[x.clone(), a], &|v| Ok((&v[0] + &v[1])?))?;
    push("elementwise", "residual add", t, 2 * l);
    let t = time_fb(device, reps, std::slice::from_ref(&q), &|v| {
        Ok(v[0].transpose(1, 2)?.contiguous()?)
    })?;
    push("copies", "attention output, heads merged", t, l);
    // head and loss over every position
    let hidden = var(&[m, h])?;
    let emb = Tensor::randn(0f32, 0.02, (shape.vocab, h), device)?.to_dtype(dt)?;
    let targets = Tensor::zeros(m, DType::U32, device)?;
    let lm = FrozenLinear::new(emb, None);
    let t = time_fb(device, reps, &[hidden], &|v| {
        singlora::ops::cross_entropy(&lm.forward(&v[0])?, &targets, None)
    })?;
    push("head + loss", "vocabulary GEMM and cross-entropy", t, 1);
    // optimizer over the adapter's parameter count
    if let Some(mt) = method {
        let per_layer: usize = shape
            .linears()
            .iter()
            .filter(|(n, _)| n != "lm_head")
            .map(|(_, (o, i))| mt.kind().param_count(*o, *i, rank))
            .sum::<usize>()
            / l;
        let p = Var::from_tensor(&Tensor::randn(0f32, 0.01, per_layer * l, device)?)?;
        let params = vec![singlora::adapter::Param {
            suffix: "all",
            var: p.clone(),
            role: singlora::adapter::ParamRole::A,
        }];
        let mut opt = AdamW::new(params, AdamWConfig::default());
        let mut acc = GradAccumulator::new(opt.vars());
        let mut times = vec![];
        for i in 0..reps + 2 {
            acc.add(&p.as_tensor().sqr()?.sum_all()?.backward()?)?;
            device.synchronize()?;
            let t0 = Instant::now();
            opt.step(&mut acc, 1e-4, Some(1.0))?;
            device.synchronize()?;
            if i >= 2 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        // the real step has one tensor per layer and projection: 7·layers launches per op
        push(
            "optimizer",
            "AdamW + clipping (one flat tensor)",
            (median(times), 0.0),
            1,
        );
    }
    Ok(rows)
}
