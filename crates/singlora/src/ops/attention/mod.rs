//! Attention ops. [`attention_block`]: from the projections to the merged heads, RoPE and the
//! head split of q, k, v (b, t, n·hd), causal/padded softmax attention with grouped-query
//! heads, and the merge back to (b, t, h·hd); on CUDA one op does all of it, forward and
//! backward (launchers in `cuda.rs`, the fused kernels in `flash.cu`), elsewhere it is
//! composed from [`rope_split`](super::rope_split) and [`masked_attention`].
//! [`heads_attention`] (`heads.rs`): the same without RoPE on the CPU, one op per direction.
//! Their references: [`super::reference::attention`].

use std::sync::{Arc, Mutex};

use candle_core::{CustomOp2, CustomOp3, DType, Tensor};

use super::FastPath;
use crate::error::Result;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod heads;

pub use heads::heads_attention;
pub(crate) use heads::{attend_unit, attend_unit_backward, SharedMut};

#[cfg(feature = "cuda")]
type Saved = cuda::Saved;
#[cfg(not(feature = "cuda"))]
type Saved = ();

/// Scaled dot-product attention of queries (b, h, t_q, d) on keys and values (b, h_kv, t_k, d);
/// batch row i attends to its first `key_lens[i]` keys (right padding), and when `causal` query
/// j only to keys up to j + t_k − t_q (the queries are the last t_q positions). K and V may have
/// fewer heads (grouped-query attention): each is shared by h / h_kv query heads. The softmax
/// is [`super::masked_softmax`] (fused on the CPU and CUDA).
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_lens: &[usize],
    causal: bool,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (h_kv, tk) = (k.dim(1)?, k.dim(2)?);
    let (k, v) = if h_kv != h {
        let rep = h / h_kv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, h_kv, rep, tk, d))?
                .reshape((b, h, tk, d))?)
        };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    // Kᵀ as a strided view: the batched GEMM takes it transposed, no copy
    let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let p = super::masked_softmax(&scores, 1.0 / (d as f64).sqrt(), key_lens, causal)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Block {
    cos: Tensor,
    sin: Tensor,
    /// (b, t, heads, kv_heads, hd).
    dims: (usize, usize, usize, usize, usize),
    key_lens: Vec<usize>,
    causal: bool,
    /// The kernels to take (flash or GEMMs and softmax; 8-wide or scalar).
    fast: FastPath,
    /// Filled by the forward, taken by the backward.
    saved: Arc<Mutex<Option<Saved>>>,
}

impl CustomOp3 for Block {
    fn name(&self) -> &'static str {
        "attention-block"
    }

    super::cpu_composed!(3, "attention block");

    super::cuda_fwd!(|self, q, k, v| {
        let rope = (&self.cos, &self.sin);
        let (dims, lens, fast) = (self.dims, &self.key_lens, self.fast);
        let (out, shape, saved) = cuda::forward(q, k, v, rope, dims, lens, self.causal, fast)?;
        *self.saved.lock().unwrap() = Some(saved);
        Ok((out, shape))
    });

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.input_grads(y, g)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl Block {
    /// (dq, dk, dv) for the output `y` and its gradient `g`, through the backward kernels
    /// (once: they take the statistics the forward saved).
    fn input_grads(&self, y: &Tensor, g: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, h, kvh, d) = self.dims;
        let packed = g
            .contiguous()?
            .apply_op2_no_bwd(&y.contiguous()?, &BlockBackward(self.clone()))?;
        unpack_qkv(&packed, (b, t, h * d), (b, t, kvh * d))
    }
}

/// The gradients of an attention op's q, k and v, which its backward packs flat into one
/// tensor [dq | dk | dv]: dq of `q_dims`, dk and dv of `kv_dims`.
pub(crate) fn unpack_qkv(
    packed: &Tensor,
    q_dims: (usize, usize, usize),
    kv_dims: (usize, usize, usize),
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (nq, nk) = (
        q_dims.0 * q_dims.1 * q_dims.2,
        kv_dims.0 * kv_dims.1 * kv_dims.2,
    );
    let dq = packed.narrow(0, 0, nq)?.reshape(q_dims)?;
    let dk = packed.narrow(0, nq, nk)?.reshape(kv_dims)?;
    let dv = packed.narrow(0, nq + nk, nk)?.reshape(kv_dims)?;
    Ok((dq, dk, dv))
}

/// The backward as an op on the output's gradient and the output (which the fused kernels
/// read), giving [dq | dk | dv] flat.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct BlockBackward(Block);

impl CustomOp2 for BlockBackward {
    fn name(&self) -> &'static str {
        "attention-block-backward"
    }

    super::cpu_composed!(2, "attention block backward");

    super::cuda_fwd!(|self, g, y| {
        let saved = self.0.saved.lock().unwrap().take().ok_or_else(|| {
            candle_core::Error::Msg("attention block: backward without a forward (or twice)".into())
        })?;
        let rope = (&self.0.cos, &self.0.sin);
        cuda::backward(&saved, g, y, rope, self.0.dims, self.0.fast)
    });
}

/// Attention from the projections' outputs `q` (b, t, heads·hd), `k`, `v` (b, t, kv_heads·hd)
/// with RoPE tables `cos`, `sin` (t, hd): softmax(QKᵀ/√hd) V over the first `key_lens[i]` keys
/// of each row (and only earlier positions when `causal`), heads merged: (b, t, heads·hd).
/// On CUDA the kernels `fast` chooses (the fused attention, the 8-wide kernels).
#[allow(clippy::too_many_arguments)]
pub fn attention_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    key_lens: &[usize],
    causal: bool,
    fast: &FastPath,
) -> Result<Tensor> {
    let Some(op) = fused_block(
        q,
        k,
        v,
        (cos, sin),
        (heads, kv_heads),
        key_lens,
        causal,
        fast,
    )?
    else {
        let (b, t, width) = q.dims3()?;
        let qh = super::rope_split(q, cos, sin, heads, true)?;
        let kh = super::rope_split(k, cos, sin, kv_heads, true)?;
        let vh = super::rope_split(v, cos, sin, kv_heads, false)?;
        let a = masked_attention(&qh, &kh, &vh, key_lens, causal)?;
        return Ok(a.transpose(1, 2)?.reshape((b, t, width))?);
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The fused kernels' op for [`attention_block`]'s arguments, where they take them (CUDA, f32
/// or bf16, even head size); None elsewhere.
#[allow(clippy::too_many_arguments)]
fn fused_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    key_lens: &[usize],
    causal: bool,
    fast: &FastPath,
) -> Result<Option<Block>> {
    let (b, t, width) = q.dims3()?;
    let hd = width / heads;
    let fused = super::cuda_kernels_for(q)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && heads % kv_heads == 0
        && hd % 2 == 0;
    if !fused {
        return Ok(None);
    }
    Ok(Some(Block {
        cos: cos.to_dtype(DType::F32)?.contiguous()?,
        sin: sin.to_dtype(DType::F32)?.contiguous()?,
        dims: (b, t, heads, kv_heads, hd),
        key_lens: key_lens.to_vec(),
        causal,
        fast: *fast,
        saved: Arc::new(Mutex::new(None)),
    }))
}

/// [`attention_block`] run outside autograd on the fused kernels, kept for a backward its
/// caller writes out: the op with the statistics its forward saved, and the output.
pub struct FusedAttention {
    op: Block,
    y: Tensor,
}

impl FusedAttention {
    /// [`attention_block`]'s forward outside autograd where the fused kernels take the inputs
    /// (CUDA, f32 or bf16, even head size); None elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        (heads, kv_heads): (usize, usize),
        key_lens: &[usize],
        causal: bool,
        fast: &FastPath,
    ) -> Result<Option<Self>> {
        let Some(op) = fused_block(
            q,
            k,
            v,
            (cos, sin),
            (heads, kv_heads),
            key_lens,
            causal,
            fast,
        )?
        else {
            return Ok(None);
        };
        let y = q.detach().contiguous()?.apply_op3_no_bwd(
            &k.detach().contiguous()?,
            &v.detach().contiguous()?,
            &op,
        )?;
        Ok(Some(Self { op, y }))
    }

    /// The output (b, t, heads·hd).
    pub fn output(&self) -> &Tensor {
        &self.y
    }

    /// (dq, dk, dv) for the output gradient `g`; once (the saved statistics are taken).
    pub fn backward(&self, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(self.op.input_grads(&self.y, g)?)
    }
}

/// Packed rows seen as one example per row: the gathers between a packed batch (b, t, w),
/// whose row r lays the examples `segments[r]` end to end, and a padded batch (n, max_len, w)
/// of its n examples. Attention run on the padded side with [`Segments::lens`] as key lengths
/// stays within each example, and positions (RoPE tables of `max_len`) restart at each one.
/// Both gathers are index selects, so gradients flow back through them.
pub struct Segments {
    unpack: Tensor,
    pack: Tensor,
    lens: Vec<usize>,
    max_len: usize,
    packed: (usize, usize),
}

/// The row maps between packed rows (b, t), row r laying the examples `segments[r]` end to
/// end, and one example per row (n, max_len).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowMaps {
    /// Per example row position (n · max_len): the packed row it reads, −1 past the example's
    /// end.
    pub unpack: Vec<i32>,
    /// Per packed row (b · t): its example row, −1 in a row's padding.
    pub pack: Vec<i32>,
    /// The examples' lengths, in row order.
    pub lens: Vec<usize>,
    pub max_len: usize,
}

impl RowMaps {
    pub fn new(segments: &[Vec<usize>], t: usize) -> Result<Self> {
        let lens: Vec<usize> = segments.iter().flatten().copied().collect();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        if lens.is_empty() || max_len == 0 {
            return Err(crate::error::Error::msg("packed rows without examples"));
        }
        let mut unpack = vec![-1i32; lens.len() * max_len];
        let mut pack = vec![-1i32; segments.len() * t];
        let mut e = 0;
        for (r, row) in segments.iter().enumerate() {
            let mut start = 0;
            for &len in row {
                if start + len > t {
                    return Err(crate::error::Error::msg(format!(
                        "packed row {r}: its examples take more than its {t} positions"
                    )));
                }
                for j in 0..len {
                    let (p, g) = (r * t + start + j, e * max_len + j);
                    unpack[g] = p as i32;
                    pack[p] = g as i32;
                }
                start += len;
                e += 1;
            }
        }
        Ok(Self {
            unpack,
            pack,
            lens,
            max_len,
        })
    }
}

impl Segments {
    pub fn new(segments: &[Vec<usize>], t: usize, device: &candle_core::Device) -> Result<Self> {
        let maps = RowMaps::new(segments, t)?;
        let l = maps.max_len;
        // past an example's end: its last position (masked as keys, and its query's output is
        // not gathered back); a packed row's padding reads example 0's first position (its
        // outputs are not used)
        let unpack: Vec<u32> = (0..maps.unpack.len())
            .map(|g| {
                let e = g / l;
                let last = e * l + maps.lens[e] - 1;
                maps.unpack[g.min(last)] as u32
            })
            .collect();
        let pack: Vec<u32> = maps.pack.iter().map(|&g| g.max(0) as u32).collect();
        Ok(Self {
            unpack: Tensor::new(unpack, device)?,
            pack: Tensor::new(pack, device)?,
            lens: maps.lens,
            max_len: l,
            packed: (segments.len(), t),
        })
    }

    /// The examples' lengths, in row order.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The longest example.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// (b, t, w) packed → (n, max_len, w), one example per row.
    pub fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let w = x.dim(2)?;
        let (b, t) = self.packed;
        Ok(x.reshape((b * t, w))?
            .index_select(&self.unpack, 0)?
            .reshape((self.lens.len(), self.max_len, w))?)
    }

    /// (n, max_len, w) → (b, t, w), each example back at its place in its row.
    pub fn pack(&self, y: &Tensor) -> Result<Tensor> {
        let w = y.dim(2)?;
        let (b, t) = self.packed;
        Ok(y.reshape((self.lens.len() * self.max_len, w))?
            .index_select(&self.pack, 0)?
            .reshape((b, t, w))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows of 8: [3, 5] and [2, 4] (then 2 positions of padding).
    #[test]
    fn row_maps_are_inverse_on_examples_and_mark_the_rest() {
        let m = RowMaps::new(&[vec![3, 5], vec![2, 4]], 8).unwrap();
        assert_eq!((m.lens.clone(), m.max_len), (vec![3, 5, 2, 4], 5));
        #[rustfmt::skip]
        assert_eq!(m.unpack, vec![
            0, 1, 2, -1, -1,
            3, 4, 5, 6, 7,
            8, 9, -1, -1, -1,
            10, 11, 12, 13, -1,
        ]);
        assert_eq!(
            m.pack,
            vec![0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 18, -1, -1]
        );
        for (g, &p) in m.unpack.iter().enumerate() {
            if p >= 0 {
                assert_eq!(m.pack[p as usize], g as i32);
            }
        }
        assert!(RowMaps::new(&[vec![5, 4]], 8).is_err());
        assert!(RowMaps::new(&[vec![]], 8).is_err());
        // the autograd path's gathers: past an end, the example's last position; padding, 0
        let s = Segments::new(&[vec![3, 5], vec![2, 4]], 8, &Device::Cpu).unwrap();
        assert_eq!(
            s.unpack.to_vec1::<u32>().unwrap(),
            vec![0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9, 10, 11, 12, 13, 13]
        );
        assert_eq!(
            s.pack.to_vec1::<u32>().unwrap(),
            vec![0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 18, 0, 0]
        );
    }
    use crate::ops::reference::tests::{check_grad, max_diff, randn};
    use crate::ops::reference::{additive_mask, lens_mask};
    use candle_core::Device;

    /// The reference on split heads (b, h, t, d), its mask from the key lengths.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize], causal: bool) -> Tensor {
        let t = q.dim(2).unwrap();
        let mask = lens_mask(lens, t, &Device::Cpu).unwrap();
        let mask = additive_mask(&mask, causal, q.dtype()).unwrap();
        crate::ops::reference::attention(q, k, v, &mask).unwrap()
    }

    #[test]
    fn masked_attention_matches_reference_with_gqa() {
        let (b, h, hkv, t, d) = (2, 4, 2, 3, 2);
        let (q, k, v) = (
            randn(&[b, h, t, d]),
            randn(&[b, hkv, t, d]),
            randn(&[b, hkv, t, d]),
        );
        let lens = [3usize, 2];
        for causal in [false, true] {
            let got = masked_attention(&q, &k, &v, &lens, causal).unwrap();
            assert!(max_diff(&got, &reference(&q, &k, &v, &lens, causal)) < 1e-12);
            check_grad(&q, |q| masked_attention(q, &k, &v, &lens, causal));
            check_grad(&k, |k| masked_attention(&q, k, &v, &lens, causal));
            check_grad(&v, |v| masked_attention(&q, &k, v, &lens, causal));
        }
    }

    /// [`reference`] on the merged layout (b, t, heads·hd).
    fn merged_reference(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        heads: usize,
        lens: &[usize],
        causal: bool,
    ) -> Tensor {
        let (b, t, w) = q.dims3().unwrap();
        let split = |x: &Tensor| {
            x.reshape((b, t, heads, w / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        reference(&split(q), &split(k), &split(v), lens, causal)
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, w))
            .unwrap()
    }

    #[test]
    fn heads_attention_matches_reference_with_gradients() {
        let (b, t, heads, hd) = (3, 5, 2, 4);
        let lens = [5, 3, 1];
        let (q, k, v) = (
            randn(&[b, t, heads * hd]),
            randn(&[b, t, heads * hd]),
            randn(&[b, t, heads * hd]),
        );
        for causal in [false, true] {
            let y = heads_attention(&q, &k, &v, heads, &lens, causal).unwrap();
            let r = merged_reference((&q, &k, &v), heads, &lens, causal);
            assert!(max_diff(&y, &r) < 1e-12, "causal {causal}");
            check_grad(&q, |q| heads_attention(q, &k, &v, heads, &lens, causal));
            check_grad(&k, |k| heads_attention(&q, k, &v, heads, &lens, causal));
            check_grad(&v, |v| heads_attention(&q, &k, v, heads, &lens, causal));
        }
    }

    #[test]
    fn heads_attention_f32_matches_reference() {
        let x = || Tensor::randn(0f32, 1.0, (2, 64, 96), &Device::Cpu).unwrap();
        let (q, k, v) = (x(), x(), x());
        let y = heads_attention(&q, &k, &v, 3, &[64, 40], false).unwrap();
        let r = merged_reference((&q, &k, &v), 3, &[64, 40], false);
        assert!(max_diff(&y, &r) < 1e-5);
    }

    #[test]
    fn attention_block_composed_matches_reference() {
        // the CPU path: RoPE and the split, masked attention, the merge
        let (b, t, heads, kv, hd) = (2, 4, 4, 2, 4);
        let inv = [1.0, 0.1];
        let (cos, sin) = super::super::rope_tables(&inv, t, DType::F64, &Device::Cpu).unwrap();
        let (q, k, v) = (
            randn(&[b, t, heads * hd]),
            randn(&[b, t, kv * hd]),
            randn(&[b, t, kv * hd]),
        );
        let lens = [4usize, 3];
        let fast = FastPath::default();
        let got =
            attention_block(&q, &k, &v, (&cos, &sin), (heads, kv), &lens, true, &fast).unwrap();
        let rs = |x: &Tensor, n, rotate| {
            crate::ops::reference::rope_split(x, &cos, &sin, n, rotate).unwrap()
        };
        let want = reference(
            &rs(&q, heads, true),
            &rs(&k, kv, true),
            &rs(&v, kv, false),
            &lens,
            true,
        )
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, heads * hd))
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
    }

    #[test]
    fn segments_attend_within_each_example() {
        // rows of 7: [3, 4] and [2] + 5 padding; 2 heads of 4
        let (t, w, heads) = (7, 8, 2);
        let segs = vec![vec![3, 4], vec![2]];
        let s = Segments::new(&segs, t, &Device::Cpu).unwrap();
        assert_eq!((s.lens(), s.max_len()), (&[3usize, 4, 2][..], 4));
        let q = randn(&[2, t, w]);
        let k = randn(&[2, t, w]);
        let v = randn(&[2, t, w]);
        let packed = |q: &Tensor, k: &Tensor, v: &Tensor| {
            let (qu, ku, vu) = (s.unpack(q)?, s.unpack(k)?, s.unpack(v)?);
            s.pack(&heads_attention(&qu, &ku, &vu, heads, s.lens(), true)?)
        };
        let got = packed(&q, &k, &v).unwrap();
        // each example on its own, as a batch of one
        for (r, start, len) in [(0, 0, 3), (0, 3, 4), (1, 0, 2)] {
            let cut = |x: &Tensor| {
                x.get(r)
                    .unwrap()
                    .narrow(0, start, len)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            };
            let want = heads_attention(&cut(&q), &cut(&k), &cut(&v), heads, &[len], true).unwrap();
            assert!(
                max_diff(&cut(&got), &want) < 1e-12,
                "example at ({r}, {start})"
            );
        }
        check_grad(&q, |q| packed(q, &k, &v));
        check_grad(&k, |k| packed(&q, k, &v));
        check_grad(&v, |v| packed(&q, &k, v));
        assert!(Segments::new(&[vec![5, 4]], 8, &Device::Cpu).is_err());
    }
}
