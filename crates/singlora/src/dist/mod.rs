//! Data parallelism, independent of the transport: how a global batch is split over ranks,
//! how much each rank's loss weighs, and how the ranks' adapter gradients are combined (one
//! flat f32 bucket summed over ranks). The transport is a [`Collective`]: NCCL on several GPUs,
//! or [`LocalGroup`], threads in one process, which the tests use to check that the combined
//! gradients equal the single-process gradients of the global batch. A GPU backward hands
//! finished buckets to a [`GradSync`] while it goes on.

pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

use std::collections::HashSet;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};

use crate::device::DeviceSpec;
use crate::error::{Error, Result};

/// The rows of a global batch that `rank` of `world` processes: contiguous, near-equal shards
/// (the first `len % world` ranks take one row more). Empty when there are fewer rows than
/// ranks for this one.
pub fn shard(global: &[usize], rank: usize, world: usize) -> &[usize] {
    assert!(world > 0 && rank < world, "rank {rank} of {world}");
    let (q, r) = (global.len() / world, global.len() % world);
    let start = rank * q + rank.min(r);
    let len = q + usize::from(rank < r);
    &global[start..start + len]
}

/// A rank's share of the global mean loss: its count (rows, or target tokens for SFT) over the
/// total. Scaling the rank's mean loss by it before backward makes the sum of the ranks'
/// gradients the gradient of the global mean.
pub fn shard_weight(count: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        count as f64 / total as f64
    }
}

/// A sum over all ranks of equally shaped tensors (every rank gets the sum).
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// The asynchronous, in-place form a GPU backward uses to overlap its reductions with the
    /// rest of the backward; None where the transport has none.
    fn as_grad_sync(&self) -> Option<&dyn GradSync> {
        None
    }
}

/// Where a backward hands buckets of finished f32 gradients (device pointers) to be summed over
/// the ranks while it goes on with the layers below.
pub trait GradSync {
    /// Starts summing `len` f32 values at device address `ptr` over the ranks, in place, after
    /// the work queued so far; returns at once. The memory must stay alive until [`join`].
    ///
    /// [`join`]: GradSync::join
    fn reduce_async(&self, ptr: u64, len: usize) -> Result<()>;
    /// Later work on the compute stream waits for every reduction started so far.
    fn join(&self) -> Result<()>;
    /// How many values a backward collects before it starts a reduction.
    fn bucket_len(&self) -> usize;
}

/// The all-reduce of the CPU groups: `t` as f32 values on the host, summed over the ranks by
/// `sum`, back in `t`'s shape, dtype and device.
pub(crate) fn through_host(
    t: &Tensor,
    sum: impl FnOnce(Vec<f32>) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let mine = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Tensor::from_vec(sum(mine)?, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

/// Adds rank `rank`'s values into `sum`. Every group sums in rank order (from zero, rank 0
/// first), so every rank of every group kind gets bit-identical sums.
pub(crate) fn add_rank(sum: &mut [f32], part: &[f32], rank: usize) -> Result<()> {
    if part.len() != sum.len() {
        return Err(Error::msg(format!(
            "all-reduce: rank {rank} gave {} values where {} were expected",
            part.len(),
            sum.len()
        )));
    }
    for (a, b) in sum.iter_mut().zip(part) {
        *a += b;
    }
    Ok(())
}

/// Sums over the ranks, in place in `grads`, the gradients of those `vars` that have one and
/// are not in `done` (those a backward reduced already), through one flat f32 bucket. Every
/// rank must hold gradients for the same variables (true for replicas of one model).
pub fn all_reduce_grads(
    vars: &[Var],
    grads: &mut GradStore,
    done: &HashSet<TensorId>,
    c: &dyn Collective,
) -> Result<()> {
    let todo: Vec<(&Var, Tensor)> = vars
        .iter()
        .filter(|v| !done.contains(&v.id()))
        .filter_map(|v| grads.get(v.as_tensor()).map(|g| (v, g.clone())))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let parts = todo
        .iter()
        .map(|(_, g)| Ok(g.to_dtype(DType::F32)?.flatten_all()?))
        .collect::<Result<Vec<_>>>()?;
    let summed = c.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
    let mut off = 0;
    for (v, g) in &todo {
        let n = g.elem_count();
        let s = summed
            .narrow(0, off, n)?
            .reshape(g.shape())?
            .to_dtype(g.dtype())?;
        grads.insert(v.as_tensor(), s);
        off += n;
    }
    Ok(())
}

struct Shared {
    slots: Mutex<Vec<Option<Vec<f32>>>>,
    barrier: Barrier,
}

/// An in-process group of `world` ranks (one thread each): all-reduce through shared memory.
#[derive(Clone)]
pub struct LocalGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The `world` members of a new group, rank 0 first.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![None; world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        through_host(t, |mine| {
            let n = mine.len();
            self.shared.slots.lock().unwrap()[self.rank] = Some(mine);
            self.shared.barrier.wait();
            let sum = {
                let slots = self.shared.slots.lock().unwrap();
                let mut sum = vec![0f32; n];
                for (r, s) in slots.iter().enumerate() {
                    let s = s
                        .as_ref()
                        .ok_or_else(|| Error::msg(format!("all-reduce: rank {r} gave nothing")))?;
                    add_rank(&mut sum, s, r)?;
                }
                sum
            };
            // nobody refills a slot before everyone has read them all
            self.shared.barrier.wait();
            Ok(sum)
        })
    }
}

/// 4 Mi f32 values (16 MiB) per bucket: at 7B shape with r = 8 a SingLoRA adapter's 50 MB of
/// gradients go in 3–4 reductions, the first started after the top 10 layers' backward.
pub fn default_bucket() -> usize {
    4 << 20
}

/// Makes a rank's transport once its device exists (NCCL joins on the device).
pub type MakeCollective =
    Box<dyn FnOnce(&candle_core::Device) -> Result<Box<dyn Collective>> + Send>;

/// The transports of a group over `devices` (one per rank, in order): threads on the CPU, NCCL
/// on GPUs (one rank per GPU). `bucket`: f32 values per gradient bucket on GPUs.
pub fn group_makers(devices: &[DeviceSpec], bucket: usize) -> Result<Vec<MakeCollective>> {
    let world = devices.len();
    let names = || {
        devices
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    if devices.iter().all(|d| d.is_cpu()) {
        return Ok(LocalGroup::new(world)
            .into_iter()
            .map(|g| {
                Box::new(move |_: &candle_core::Device| Ok(Box::new(g) as Box<dyn Collective>))
                    as MakeCollective
            })
            .collect());
    }
    if devices.iter().any(|d| d.is_cpu()) {
        return Err(Error::msg(format!(
            "--devices {}: give all CUDA devices (cuda:0,cuda:1,...) or all cpu",
            names()
        )));
    }
    let mut seen = HashSet::new();
    for d in devices {
        if !seen.insert(*d) {
            return Err(Error::msg(format!(
                "--devices names {d} twice: NCCL takes one rank per GPU"
            )));
        }
    }
    nccl_makers(world, bucket)
}

#[cfg(feature = "nccl")]
fn nccl_makers(world: usize, bucket: usize) -> Result<Vec<MakeCollective>> {
    let id = nccl::GroupId::new()?;
    Ok((0..world)
        .map(|rank| {
            Box::new(move |d: &candle_core::Device| {
                Ok(Box::new(nccl::NcclRank::new(id, rank, world, d, bucket)?)
                    as Box<dyn Collective>)
            }) as MakeCollective
        })
        .collect())
}

/// The NCCL transport of a launched process on its GPU: rank 0 makes the group id and hands
/// it to the others over the TCP rendezvous.
#[cfg(feature = "nccl")]
pub fn launched_nccl(
    l: launch::Launch,
    timeout: std::time::Duration,
    bucket: usize,
) -> MakeCollective {
    Box::new(move |d: &candle_core::Device| {
        let tcp = tcp::TcpGroup::join(&l, timeout)?;
        let mine = match l.rank {
            0 => Some(nccl::GroupId::new()?.to_bytes()),
            _ => None,
        };
        let id = nccl::GroupId::from_bytes(&tcp.broadcast(mine.as_deref())?)?;
        Ok(Box::new(nccl::NcclRank::new(id, l.rank, l.world, d, bucket)?) as Box<dyn Collective>)
    })
}

/// Without NCCL a launched process cannot join a GPU group.
#[cfg(not(feature = "nccl"))]
pub fn launched_nccl(
    l: launch::Launch,
    _timeout: std::time::Duration,
    _bucket: usize,
) -> MakeCollective {
    Box::new(move |_| {
        Err(Error::msg(format!(
            "rank {} of {} on a GPU needs NCCL: this binary is built without the `nccl` feature \
             (on the CPU, give --device cpu)",
            l.rank, l.world
        )))
    })
}

#[cfg(not(feature = "nccl"))]
fn nccl_makers(_world: usize, _bucket: usize) -> Result<Vec<MakeCollective>> {
    Err(Error::msg(
        "training on several GPUs needs NCCL: this binary is built without the `nccl` feature",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ramp::{RampClock, RampSchedule};
    use crate::adapter::target::TargetSpec;
    use crate::adapter::{AdapterKind, AdapterSpec};
    use crate::data::{collate, Encoded, Task};
    use crate::model::llama::Llama;
    use crate::model::weights::{ConfigReader, Weights};
    use crate::model::{Body, Pooling, TaskModel};
    use crate::synthetic::LlamaShape;
    use candle_core::Device;

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        let g: Vec<usize> = (10..17).collect(); // 7 rows
        let parts: Vec<&[usize]> = (0..3).map(|r| shard(&g, r, 3)).collect();
        assert_eq!(parts, vec![&[10, 11, 12][..], &[13, 14], &[15, 16]]);
        assert_eq!(shard(&g[..2], 2, 3), &[] as &[usize]);
        let w: f64 = parts.iter().map(|p| shard_weight(p.len(), 7)).sum();
        assert!((w - 1.0).abs() < 1e-15);
    }

    /// A LLaMA of `shape` (seeded random weights, f32 on the CPU) for SFT, with SingLoRA of
    /// rank 4 on all seven projections (u = 1 from the start).
    fn singlora_llama(shape: LlamaShape, dev: &Device) -> TaskModel {
        let config = shape.config();
        let path = std::path::Path::new("tiny-llama/config.json");
        let reader = ConfigReader {
            path,
            value: &config,
        };
        let weights = Weights::Memory(path.into(), shape.tensors(1, DType::F32).unwrap());
        let llama = Llama::load(&weights, Llama::config(&reader).unwrap(), DType::F32, dev);
        let body = Body::Llama(llama.unwrap());
        let mut model = TaskModel::new(body, Task::Sft, None, Pooling::Last, 0, dev).unwrap();
        let spec = AdapterSpec::new(AdapterKind::SingLora, 4, 4.0);
        let targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
        let targets = TargetSpec::parse(targets, None).unwrap();
        let clock = RampClock::new(RampSchedule::none(), 0);
        model.inject(&spec, &targets, clock).unwrap();
        model
    }

    /// Gradients from shards, weighted and summed over a group of ranks, equal the gradient of
    /// the global batch in one process (a tiny LLaMA with SingLoRA, f32 on the CPU).
    #[test]
    fn summed_shard_gradients_equal_the_global_gradient() {
        let dev = Device::Cpu;
        let shape = LlamaShape::TINY;
        let model = singlora_llama(shape, &dev);
        let vars: Vec<Var> = model.params().into_iter().map(|p| p.var).collect();
        let mut x: u64 = 7;
        let items: Vec<Encoded> = (0..5)
            .map(|_| {
                let ids: Vec<u32> = (0..9)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((x >> 33) % shape.vocab as u64) as u32
                    })
                    .collect();
                Encoded {
                    type_ids: vec![0; 9],
                    label: None,
                    target_mask: vec![1; 9],
                    ids,
                }
            })
            .collect();
        let global: Vec<usize> = (0..5).collect();
        let (_, g_all) = model
            .loss_and_grads(&collate(&items, &global, 0, &dev).unwrap(), 1.0)
            .unwrap();
        let world = 3;
        // each rank's gradients, weighted by its share of the target tokens
        let total: usize = global
            .iter()
            .map(|&i| items[i].target_mask[1..].len())
            .sum();
        let per_rank: Vec<GradStore> = (0..world)
            .map(|r| {
                let rows = shard(&global, r, world);
                let count: usize = rows.iter().map(|&i| items[i].target_mask[1..].len()).sum();
                let b = collate(&items, rows, 0, &dev).unwrap();
                model
                    .loss_and_grads(&b, shard_weight(count, total))
                    .unwrap()
                    .1
            })
            .collect();
        let group = LocalGroup::new(world);
        let done = HashSet::new();
        let summed: Vec<GradStore> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .zip(per_rank)
                .map(|(c, mut g)| {
                    let (vars, done) = (&vars, &done);
                    s.spawn(move || {
                        all_reduce_grads(vars, &mut g, done, c).unwrap();
                        g
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let max_abs = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for (vi, v) in vars.iter().enumerate() {
            let want = g_all.get(v.as_tensor()).unwrap();
            let scale = max_abs(want);
            for rank in &summed {
                let got = rank.get(v.as_tensor()).unwrap();
                let diff = max_abs(&(got - want).unwrap());
                assert!(
                    diff <= 1e-5 * scale.max(1e-6),
                    "var {vi}: {diff} vs {scale}"
                );
            }
            // every rank holds the same sum, bit for bit
            let a = flat(summed[0].get(v.as_tensor()).unwrap());
            for r in &summed[1..] {
                assert_eq!(a, flat(r.get(v.as_tensor()).unwrap()));
            }
        }
    }
}
