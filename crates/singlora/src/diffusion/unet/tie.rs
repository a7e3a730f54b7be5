//! Computations that run outside candle's autograd, tied back to their inputs by one op whose
//! backward is written out.
//!
//! candle's autograd records every op of a forward and, in the backward, gives each recorded
//! input a zero-filled gradient to add into; on (batch × positions × channels)-sized tensors
//! those fills and adds cost as much as the layers' own work. A block that runs on detached
//! tensors and is tied to its input by [`tie`] (input gradient only) or [`tie_params`] (input
//! gradient and the gradients of a few small trainable tensors) leaves one recorded op.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, TensorId};

use crate::error::{Error, Result};
use crate::ops::mark_on;

/// The input gradient of a computation that ran outside autograd, on a detached input: what
/// [`tie`] gives the input in the backward.
pub(crate) trait InputGradient: Send + Sync + 'static {
    /// The op's name.
    const NAME: &'static str;
    /// What the kernel profile files the backward's time under.
    const PROFILE_LABEL: &'static str;
    /// The gradient of the input `x` for the output gradient `g` (contiguous).
    fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor>;
}

/// `y`, computed from a detached `x`, tied back to `x` for autograd by one op: its forward
/// passes `y` through (a copy), its backward gives `x` the gradient `grad` computes.
pub(crate) fn tie<G: InputGradient>(
    x: &Tensor,
    y: &Tensor,
    grad: G,
) -> candle_core::Result<Tensor> {
    if recording() {
        record(&[x], false, y, || {
            Backward::Input(
                Box::new(move |x, g| grad.input_grad(x, g)),
                G::PROFILE_LABEL,
            )
        });
        return Ok(y.clone());
    }
    x.apply_op2(y, Tied(grad))
}

struct Tied<G>(G);

impl<G: InputGradient> CustomOp2 for Tied<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _lx: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        crate::ops::mark_backward_start(x.device())?;
        let dx = self.0.input_grad(x, &g.contiguous()?)?;
        crate::ops::mark_on(x.device(), G::PROFILE_LABEL).map_err(candle_core::Error::wrap)?;
        Ok((Some(dx), None))
    }
}

/// The gradients of a computation that ran outside autograd on a detached input and detached
/// copies of a few small tensors (adapter variables): what [`tie_params`] gives them.
pub(crate) trait ParamsGradient: Send + Sync + 'static {
    /// The op's name.
    const NAME: &'static str;
    /// What the kernel profile files the backward's time under.
    const PROFILE_LABEL: &'static str;
    /// The gradient of the input `x` for the output gradient `g` (contiguous), and the
    /// gradients of the tensors passed to [`tie_params`], in their order and shapes.
    fn grads(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<(Tensor, Vec<Tensor>)>;
}

/// `y`, computed from a detached `x` and detached copies of `params`, tied back to both for
/// autograd: `params` are flattened into one vector (one small recorded concatenation), and
/// one op passes `y` through; its backward gives `x` and each of `params` the gradients
/// `grad` computes. Without `params` this is [`tie`].
pub(crate) fn tie_params<G: ParamsGradient>(
    x: &Tensor,
    params: &[Tensor],
    y: &Tensor,
    grad: G,
) -> Result<Tensor> {
    if params.windows(2).any(|w| w[0].dtype() != w[1].dtype()) {
        return Err(Error::msg(format!(
            "{}: the tied tensors are not all of one type",
            G::NAME
        )));
    }
    if recording() {
        let params = params.to_vec();
        record(&[x], !params.is_empty(), y, || {
            Backward::Params(
                Box::new(move |x, g| grad.grads(x, g)),
                params,
                G::PROFILE_LABEL,
            )
        });
        return Ok(y.clone());
    }
    let flat = params
        .iter()
        .map(|p| p.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let shapes = params.iter().map(|p| p.shape().clone()).collect();
    let packed = match flat.len() {
        0 => Tensor::zeros(1, x.dtype(), x.device())?,
        _ => Tensor::cat(&flat, 0)?,
    };
    Ok(x.apply_op3(&packed, y, TiedParams { grad, shapes })?)
}

struct TiedParams<G> {
    grad: G,
    shapes: Vec<Shape>,
}

impl<G: ParamsGradient> CustomOp3 for TiedParams<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _p: &CpuStorage,
        _lp: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _lx: &Layout,
        _p: &CudaStorage,
        _lp: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _y: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::mark_backward_start(x.device())?;
        let (dx, dp) = self.grad.grads(x, &g.contiguous()?)?;
        if dp.len() != self.shapes.len() || dp.iter().zip(&self.shapes).any(|(d, s)| d.shape() != s)
        {
            candle_core::bail!(
                "{}: the backward gave gradients of shapes {:?} for tensors of shapes {:?}",
                G::NAME,
                dp.iter().map(|d| d.dims().to_vec()).collect::<Vec<_>>(),
                self.shapes
            );
        }
        let dp = match dp.len() {
            0 => None,
            _ => {
                let flat = dp
                    .iter()
                    .map(|d| d.to_dtype(packed.dtype())?.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(Tensor::cat(&flat, 0)?)
            }
        };
        crate::ops::mark_on(x.device(), G::PROFILE_LABEL).map_err(candle_core::Error::wrap)?;
        Ok((Some(dx), dp, None))
    }
}

/// The U-Net's own record of a forward for a backward without candle's autograd (see
/// [`Tape::start`]): where it is on, [`tie`], [`tie_params`], [`add`], [`cat`] and
/// [`upsample2`] run on detached tensors and append a node to it instead of recording a candle
/// op; [`Tape::backward`] then walks the nodes in reverse, handing each input its gradient
/// directly, or adding it to the one already there. candle's autograd gives every recorded
/// input a zero-filled gradient and adds into it, so each op between the blocks costs two full
/// passes over its input in the backward; here only gradients that meet (a skip connection, a
/// residual) are added.
pub struct Tape {
    nodes: Vec<Node>,
    tracked: HashSet<TensorId>,
}

/// One op of the record: the inputs it was applied to, its output's id, and its backward.
struct Node {
    inputs: Vec<Tensor>,
    output: TensorId,
    backward: Backward,
}

type InputFn = Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>>;
type ParamsFn = Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<(Tensor, Vec<Tensor>)>>;

enum Backward {
    /// [`tie`]'s: the input's gradient.
    Input(InputFn, &'static str),
    /// [`tie_params`]'s: the input's gradient and the parameters'.
    Params(ParamsFn, Vec<Tensor>, &'static str),
    /// y = a + b.
    Add,
    /// y = cat(inputs, dim) of inputs `sizes` wide along `dim`.
    Cat { dim: usize, sizes: Vec<usize> },
    /// y = nearest-neighbour ×2 upsampling of (b, c, h, w).
    Upsample2,
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Ends the recording when dropped (also on an error in the forward).
pub struct Recording(());

impl Drop for Recording {
    fn drop(&mut self) {
        TAPE.with(|t| t.borrow_mut().take());
    }
}

impl Tape {
    /// Starts recording on this thread; [`Tape::finish`] takes the record. A recording already
    /// on is an error (forwards do not nest).
    pub fn start() -> Result<Recording> {
        TAPE.with(|t| {
            let mut t = t.borrow_mut();
            if t.is_some() {
                return Err(Error::msg("U-Net tape: a recording is already on"));
            }
            *t = Some(Tape {
                nodes: vec![],
                tracked: HashSet::new(),
            });
            Ok(Recording(()))
        })
    }

    /// The record so far, ending the recording.
    pub fn finish(rec: Recording) -> Result<Tape> {
        let tape = TAPE.with(|t| t.borrow_mut().take());
        drop(rec);
        tape.ok_or_else(|| Error::msg("U-Net tape: no recording"))
    }

    /// The gradients of the parameters tied in by [`tie_params`] (each parameter tensor beside
    /// its gradient, in the order the backward reached them) for the gradient `g` of the
    /// recorded output `y`.
    pub fn backward(self, y: &Tensor, g: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        if !self.tracked.contains(&y.id()) {
            return Err(Error::msg(
                "U-Net tape: the output was not recorded (nothing in it trains)",
            ));
        }
        let mut grads: HashMap<TensorId, Tensor> = HashMap::from([(y.id(), g.clone())]);
        let mut out = vec![];
        for node in self.nodes.into_iter().rev() {
            let Some(g) = grads.remove(&node.output) else {
                continue;
            };
            let g = g.contiguous()?;
            let dev = g.device().clone();
            let input_grads: Vec<Tensor> = match node.backward {
                Backward::Input(f, label) => {
                    crate::ops::mark_backward_start(&dev)?;
                    let dx = f(&node.inputs[0], &g)?;
                    mark_on(&dev, label)?;
                    vec![dx]
                }
                Backward::Params(f, params, label) => {
                    crate::ops::mark_backward_start(&dev)?;
                    let (dx, dp) = f(&node.inputs[0], &g)?;
                    mark_on(&dev, label)?;
                    if dp.len() != params.len() {
                        return Err(Error::msg(format!(
                            "U-Net tape: a backward gave {} gradients for {} parameters",
                            dp.len(),
                            params.len()
                        )));
                    }
                    out.extend(params.into_iter().zip(dp));
                    vec![dx]
                }
                Backward::Add => vec![g.clone(), g],
                Backward::Cat { dim, sizes } => {
                    let mut at = 0;
                    let mut parts = vec![];
                    for n in sizes {
                        parts.push(g.narrow(dim, at, n)?.contiguous()?);
                        at += n;
                    }
                    mark_on(&dev, "backward: skip concatenation")?;
                    parts
                }
                Backward::Upsample2 => {
                    let (b, c, h2, w2) = g.dims4()?;
                    let (h, w) = (h2 / 2, w2 / 2);
                    let dx = g.reshape((b, c, h, 2, w, 2))?.sum(5)?.sum(3)?;
                    mark_on(&dev, "backward: upsampling")?;
                    vec![dx]
                }
            };
            for (x, dx) in node.inputs.iter().zip(input_grads) {
                if !self.tracked.contains(&x.id()) {
                    continue;
                }
                let sum = match grads.remove(&x.id()) {
                    Some(prev) => (prev + dx)?,
                    None => dx,
                };
                grads.insert(x.id(), sum);
            }
        }
        Ok(out)
    }
}

/// The error of a forward that meets, while recording, a part the record cannot hold.
pub(crate) fn not_on_tape(what: &str) -> Error {
    Error::msg(format!(
        "U-Net tape: {what} is not recorded; train this model with candle's autograd"
    ))
}

/// Whether a recording is on on this thread.
pub(crate) fn recording() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

/// Whether `x` takes a gradient: it is tracked by candle's autograd, or it is the output of a
/// node of the recording on.
pub(crate) fn tracked(x: &Tensor) -> bool {
    x.track_op()
        || TAPE.with(|t| {
            t.borrow()
                .as_ref()
                .is_some_and(|t| t.tracked.contains(&x.id()))
        })
}

/// Appends a node whose output is `y` (which then takes a gradient), where a recording is on
/// and some input or parameter takes one.
fn record(inputs: &[&Tensor], params: bool, y: &Tensor, backward: impl FnOnce() -> Backward) {
    TAPE.with(|t| {
        let mut t = t.borrow_mut();
        let Some(tape) = t.as_mut() else {
            return;
        };
        if params || inputs.iter().any(|x| tape.tracked.contains(&x.id())) {
            tape.tracked.insert(y.id());
            tape.nodes.push(Node {
                inputs: inputs.iter().map(|&x| x.clone()).collect(),
                output: y.id(),
                backward: backward(),
            });
        }
    })
}

/// a + b, recorded where a recording is on.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !recording() {
        return Ok((a + b)?);
    }
    let y = (a.detach() + b.detach())?;
    record(&[a, b], false, &y, || Backward::Add);
    Ok(y)
}

/// The tensors concatenated along `dim`, recorded where a recording is on.
pub(crate) fn cat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    if !recording() {
        return Ok(Tensor::cat(xs, dim)?);
    }
    let detached: Vec<Tensor> = xs.iter().map(|x| x.detach()).collect();
    let y = Tensor::cat(&detached, dim)?;
    let sizes = xs
        .iter()
        .map(|x| x.dim(dim))
        .collect::<candle_core::Result<_>>()?;
    record(xs, false, &y, || Backward::Cat { dim, sizes });
    Ok(y)
}

/// The U-Net's nearest-neighbour ×2 upsampling of (b, c, h, w) ([`super::blocks::upsample2`]),
/// recorded where a recording is on.
pub(crate) fn upsample2(x: &Tensor) -> Result<Tensor> {
    if !recording() {
        return super::blocks::upsample2(x);
    }
    let y = super::blocks::upsample2(&x.detach())?;
    record(&[x], false, &y, || Backward::Upsample2);
    Ok(y)
}
