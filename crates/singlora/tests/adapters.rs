//! Every adapter method against an independent reference: the forward against ΔW formed
//! explicitly, the gradients against central finite differences of that reference in f64, for
//! square, tall and wide weights; the ramp; merge and unmerge.

use candle_core::{DType, Device, Tensor, Var};
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::{AdaptedLinear, Adapter, AdapterKind, AdapterSpec};
use singlora::linear::FrozenLinear;
use singlora::optim::{AdamW, AdamWConfig, GradAccumulator};

mod common;
use common::max_abs;

const SHAPES: [(usize, usize); 3] = [(6, 6), (9, 5), (4, 7)]; // square, tall (d_out > d_in), wide
const KINDS: [(AdapterKind, bool); 4] = [
    (AdapterKind::SingLora, false),
    (AdapterKind::SingLora, true),
    (AdapterKind::Lora, false),
    (AdapterKind::Dora, false),
];

fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    let mut rng = singlora::rng::rng_for(seed, "test");
    singlora::rng::normal(&mut rng, 1.0, shape, DType::F64, &Device::Cpu).unwrap()
}

/// A layer whose every trainable tensor is random (LoRA's B too, so no gradient is trivially 0).
fn layer(
    kind: AdapterKind,
    rslora: bool,
    (d_out, d_in): (usize, usize),
    clock: &RampClock,
) -> AdaptedLinear {
    let w0 = randn(1, (d_out, d_in));
    let bias = randn(2, (1, d_out)).squeeze(0).unwrap();
    let mut spec = AdapterSpec::new(kind, 3, 5.0);
    spec.rslora = rslora;
    spec.dtype = DType::F64;
    let adapter = Adapter::init(&spec, "m", &w0, clock).unwrap();
    for (i, p) in adapter.params().iter().enumerate() {
        let dims = p.var.dims().to_vec();
        let n: usize = dims.iter().product();
        let noise = (randn(10 + i as u64, (n, 1)) * 0.5)
            .unwrap()
            .reshape(dims)
            .unwrap();
        p.var.set(&(p.var.as_tensor() + noise).unwrap()).unwrap();
    }
    AdaptedLinear::new("m", FrozenLinear::new(w0, Some(bias))).with_adapter(adapter)
}

/// The reference forward: W = W0 + ΔW formed explicitly, DoRA's norm fixed at `dora_norm`.
#[allow(clippy::too_many_arguments)]
fn reference(
    kind: AdapterKind,
    x: &Tensor,
    w0: &Tensor,
    bias: &Tensor,
    params: &[Tensor],
    s: f64,
    u: f64,
    dora_norm: Option<&Tensor>,
) -> Tensor {
    let (d_out, d_in) = w0.dims2().unwrap();
    let w = match kind {
        AdapterKind::SingLora => {
            let a = &params[0];
            let delta = a
                .narrow(0, 0, d_out)
                .unwrap()
                .matmul(&a.narrow(0, 0, d_in).unwrap().t().unwrap())
                .unwrap();
            (w0 + (delta * (s * u)).unwrap()).unwrap()
        }
        AdapterKind::Lora => (w0 + (params[1].matmul(&params[0]).unwrap() * s).unwrap()).unwrap(),
        AdapterKind::Dora => {
            let v = (w0 + (params[1].matmul(&params[0]).unwrap() * s).unwrap()).unwrap();
            let norm = match dora_norm {
                Some(n) => n.clone(),
                None => v.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap(),
            };
            let m = params[2].unsqueeze(1).unwrap();
            v.broadcast_mul(&m.broadcast_div(&norm).unwrap()).unwrap()
        }
    };
    x.broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(bias)
        .unwrap()
}

#[test]
fn forward_and_gradients_match_finite_differences() {
    for (kind, rslora) in KINDS {
        for shape in SHAPES {
            let clock = RampClock::new(RampSchedule::new(4), 1);
            clock.set_training(true); // u = u(2) = 0.5
            let u = clock.u();
            assert_eq!(u, 0.5);
            let layer = layer(kind, rslora, shape, &clock);
            let adapter = layer.adapter().unwrap();
            let s = adapter.scale();
            let x = Tensor::randn(0f64, 1.0, (2, 3, shape.1), &Device::Cpu).unwrap();
            let g = Tensor::randn(0f64, 1.0, (2, 3, shape.0), &Device::Cpu).unwrap();
            let w0 = layer.base().weight().unwrap();
            let bias = layer.base().bias().unwrap().clone();
            let params: Vec<Var> = adapter.params().iter().map(|p| p.var.clone()).collect();
            let values: Vec<Tensor> = params
                .iter()
                .map(|v| v.as_tensor().copy().unwrap())
                .collect();
            // DoRA's norm is a constant in backprop: the reference holds it at today's value.
            let dora_norm = (kind == AdapterKind::Dora).then(|| {
                let v = (&w0 + (values[1].matmul(&values[0]).unwrap() * s).unwrap()).unwrap();
                v.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap()
            });

            let y = layer.forward(&x).unwrap();
            let y_ref = reference(kind, &x, &w0, &bias, &values, s, u, dora_norm.as_ref());
            let fwd_err = max_abs(&(&y - &y_ref).unwrap());
            assert!(
                fwd_err < 1e-10,
                "{kind:?} {shape:?}: forward differs by {fwd_err}"
            );

            let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let loss = |vals: &[Tensor]| -> f64 {
                let y = reference(kind, &x, &w0, &bias, vals, s, u, dora_norm.as_ref());
                (y * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let eps = 1e-6;
            for (pi, var) in params.iter().enumerate() {
                let analytic = grads
                    .get(var.as_tensor())
                    .expect("every trainable tensor gets a gradient");
                let analytic = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let flat = values[pi].flatten_all().unwrap().to_vec1::<f64>().unwrap();
                assert!(
                    analytic.iter().any(|g| *g != 0.0),
                    "{kind:?} {shape:?}: zero gradient"
                );
                for j in 0..flat.len() {
                    let at = |delta: f64| -> f64 {
                        let mut f = flat.clone();
                        f[j] += delta;
                        let mut vals = values.clone();
                        vals[pi] = Tensor::from_vec(f, values[pi].dims(), &Device::Cpu).unwrap();
                        loss(&vals)
                    };
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    let err = (numeric - analytic[j]).abs() / (1.0 + numeric.abs());
                    assert!(
                        err < 1e-6,
                        "{kind:?} rslora={rslora} {shape:?} param {pi} elem {j}: autograd {} vs finite differences {numeric}",
                        analytic[j]
                    );
                }
            }
            // The frozen weight gets no gradient at all.
            assert!(grads.get(&w0).is_none());
        }
    }
}

#[test]
fn u_zero_is_exactly_the_base() {
    for shape in SHAPES {
        let clock = RampClock::new(RampSchedule::new(10), 0);
        let layer = layer(AdapterKind::SingLora, false, shape, &clock);
        let x = Tensor::randn(0f64, 1.0, (5, shape.1), &Device::Cpu).unwrap();
        let y = layer.forward(&x).unwrap();
        let base = layer.base().forward(&x).unwrap();
        // bitwise equality, not a tolerance
        assert_eq!(y.to_vec2::<f64>().unwrap(), base.to_vec2::<f64>().unwrap());
        clock.set_training(true);
        let y = layer.forward(&x).unwrap();
        assert!(
            max_abs(&(y - base).unwrap()) > 0.0,
            "u(1) must already adapt"
        );
    }
}

#[test]
fn ramp_advances_once_per_update_under_accumulation() {
    let clock = RampClock::new(RampSchedule::new(3), 0);
    let layer = layer(AdapterKind::SingLora, false, (6, 4), &clock);
    let adapter = layer.adapter().unwrap().clone();
    let mut opt = AdamW::new(adapter.params(), AdamWConfig::default()).with_clock(clock.clone());
    let mut acc = GradAccumulator::new(opt.vars());
    let x = Tensor::randn(0f64, 1.0, (4, 4), &Device::Cpu).unwrap();
    let Adapter::SingLora(sl) = &adapter else {
        unreachable!()
    };
    for k in 1..=5u64 {
        clock.set_training(true);
        for _micro in 0..4 {
            let y = layer.forward(&x).unwrap();
            // the forward that produces update k uses u(k)
            let a = sl.a().as_tensor();
            let delta = a
                .narrow(0, 0, 6)
                .unwrap()
                .matmul(&a.narrow(0, 0, 4).unwrap().t().unwrap())
                .unwrap();
            let expect_u = (k as f64 / 3.0).min(1.0);
            let w = (layer.base().weight().unwrap() + (delta * (sl.scale() * expect_u)).unwrap())
                .unwrap();
            let y_ref = layer
                .base()
                .add_bias(&x.matmul(&w.t().unwrap()).unwrap())
                .unwrap();
            assert!(
                max_abs(&(&y - y_ref).unwrap()) < 1e-12,
                "update {k}: wrong u"
            );
            acc.add(&y.sqr().unwrap().sum_all().unwrap().backward().unwrap())
                .unwrap();
            assert_eq!(clock.step(), k - 1, "a micro-batch moved the clock");
        }
        // evaluation passes do not move it either
        clock.set_training(false);
        layer.forward(&x).unwrap();
        assert_eq!(clock.step(), k - 1);
        opt.step(&mut acc, 1e-3, Some(1.0)).unwrap();
        assert_eq!(clock.step(), k);
        assert_eq!(clock.u_saved(), (k as f64 / 3.0).min(1.0));
    }
}

#[test]
fn merge_matches_unmerged_and_unmerge_restores() {
    for (kind, rslora) in KINDS {
        for shape in SHAPES {
            for base_dtype in [DType::F32, DType::BF16] {
                let clock = RampClock::new(RampSchedule::new(4), 3);
                let mut l = layer(kind, rslora, shape, &clock);
                // rebuild the base in the dtype under test
                let w0 = l.base().weight().unwrap().to_dtype(base_dtype).unwrap();
                let bias = l.base().bias().unwrap().to_dtype(base_dtype).unwrap();
                let adapter = l.adapter().unwrap().clone();
                l = AdaptedLinear::new("m", FrozenLinear::new(w0.clone(), Some(bias)))
                    .with_adapter(adapter);
                let x = Tensor::randn(0f32, 1.0, (7, shape.1), &Device::Cpu)
                    .unwrap()
                    .to_dtype(base_dtype)
                    .unwrap();
                let y_unmerged = l.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
                l.merge().unwrap();
                assert!(l.is_merged());
                let y_merged = l.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
                let scale = max_abs(&y_unmerged).max(1.0);
                let tol = if base_dtype == DType::F32 { 1e-5 } else { 3e-2 };
                let err = max_abs(&(&y_merged - &y_unmerged).unwrap()) / scale;
                assert!(
                    err < tol,
                    "{kind:?} {shape:?} {base_dtype:?}: merged forward differs by {err}"
                );
                let merged_w = l.base().weight().unwrap().to_dtype(DType::F64).unwrap();
                l.unmerge().unwrap();
                let back = l.base().weight().unwrap().to_dtype(DType::F64).unwrap();
                let orig = w0.to_dtype(DType::F64).unwrap();
                let diff = (&back - &orig).unwrap().abs().unwrap();
                // to rounding: half an ulp when W was stored (DoRA rescales it to V = W0 + ΔW),
                // half an ulp when W0 was
                let eps = if base_dtype == DType::F32 {
                    f32::EPSILON as f64
                } else {
                    2f64.powi(-7)
                };
                let v = (&orig + l.adapter().unwrap().delta_weight().unwrap()).unwrap();
                let stored = merged_w.abs().unwrap().maximum(&v.abs().unwrap()).unwrap();
                let bound = ((stored + orig.abs().unwrap()).unwrap() * (eps / 2.0))
                    .unwrap()
                    .maximum(1e-30)
                    .unwrap();
                let worst = max_abs(&(diff / bound).unwrap());
                assert!(
                    worst <= 1.0 + 1e-9,
                    "{kind:?} {shape:?} {base_dtype:?}: unmerge off by {worst} ulp"
                );
            }
        }
    }
}

#[test]
fn merge_refuses_non_finite() {
    let clock = RampClock::new(RampSchedule::none(), 0);
    let mut l = layer(AdapterKind::SingLora, false, (4, 4), &clock);
    let Adapter::SingLora(sl) = l.adapter().unwrap() else {
        unreachable!()
    };
    let mut a = sl.a().as_tensor().to_vec2::<f64>().unwrap();
    a[1][2] = f64::INFINITY;
    sl.a().set(&Tensor::new(a, &Device::Cpu).unwrap()).unwrap();
    let err = l.merge().unwrap_err().to_string();
    assert!(
        err.contains("m.weight") && err.contains("non-finite"),
        "{err}"
    );
    assert!(!l.is_merged());
}

/// Gradients from candle's backward record the ops that made them; if the optimizer kept them
/// attached, every step's activations would stay alive through the moments (a leak of one
/// step's memory per update, seen as an out-of-memory kill after ~100 MiniLM updates).
#[test]
fn optimizer_state_holds_no_graph() {
    let clock = RampClock::new(RampSchedule::new(2), 0);
    let l = layer(AdapterKind::SingLora, false, (6, 4), &clock);
    let adapter = l.adapter().unwrap().clone();
    let mut opt = AdamW::new(adapter.params(), AdamWConfig::default()).with_clock(clock.clone());
    let mut acc = GradAccumulator::new(opt.vars());
    // an input that itself records a graph, as every layer's input does inside a model
    let x = Var::randn(0f64, 1.0, (4, 4), &Device::Cpu).unwrap();
    let x = (x.as_tensor() * 1.0).unwrap();
    for _ in 0..3 {
        clock.set_training(true);
        acc.add(
            &l.forward(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
        )
        .unwrap();
        assert!(
            acc.grads().iter().flatten().all(|g| !g.track_op()),
            "accumulated gradients keep a graph"
        );
        opt.step(&mut acc, 1e-2, Some(1.0)).unwrap();
    }
    for (m, v) in opt.state().unwrap().moments {
        assert!(
            !m.track_op() && !v.track_op(),
            "optimizer moments keep a graph"
        );
    }
    for p in adapter.params() {
        assert!(p.var.is_variable());
    }
}
