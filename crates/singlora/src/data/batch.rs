//! Batches: which examples go together in each step of an epoch ([`epoch_batches`], a pure
//! function of (lengths, batch size, seed, epoch), so a resumed run replays the same batches)
//! and the padded tensors of one batch ([`collate`]). Batches group examples of similar length
//! so that little of each batch is padding. With packing ([`pack_rows`], [`collate_rows`]) a
//! row holds several examples end to end; the batch records where each one starts so that
//! attention stays within it.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;

use super::Encoded;
use crate::error::{Error, Result};
use crate::rng::rng_for;

/// How many batches' worth of examples are sorted by length together when shuffling.
const BUCKET_BATCHES: usize = 50;

/// The batches of one epoch, as indices into `lengths`; every index appears exactly once.
///
/// With `shuffle`: a permutation drawn from (seed, epoch) is cut into windows of
/// 50·`batch_size`, each window is sorted by length and cut into batches, and the order of the
/// batches is shuffled. Without (evaluation): all indices sorted by length (stable), then cut.
/// A `batch_size` of 0 is taken as 1.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    shuffle: bool,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if !shuffle {
        order.sort_by_key(|&i| lengths[i]);
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut rng = rng_for(seed, &format!("data.batches.epoch{epoch}"));
    order.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(order.len().div_ceil(batch_size));
    for window in order.chunks_mut(BUCKET_BATCHES * batch_size) {
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// One padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Indices of the examples, in row order of the tensors.
    pub indices: Vec<usize>,
    /// (b, t) u32 token ids, right-padded with the pad id.
    pub ids: Tensor,
    /// (b, t) u32 token type ids, padded with 0.
    pub type_ids: Tensor,
    /// (b, t) f32: 1 on real tokens, 0 on padding.
    pub mask: Tensor,
    /// (b) u32 class indices (classification).
    pub labels: Option<Tensor>,
    /// (b, t) f32: 1 on the tokens trained on (SFT), 0 elsewhere and on padding.
    pub target_mask: Option<Tensor>,
    /// The number of real (non-padding) tokens.
    pub n_tokens: usize,
    /// Packed rows: the lengths of the examples laid end to end in each row (a row's padding
    /// follows its last example). None where every row holds one example.
    pub segments: Option<Vec<Vec<usize>>>,
}

/// Packs examples of the given `lengths` into rows of at most `capacity` tokens, each example
/// whole in one row: the examples in an order drawn from `seed`, then first fit decreasing
/// (each, longest first, into the first row it fits). Every index appears exactly once; an
/// example longer than `capacity` gets a row of its own. Rows list their examples in the
/// order they were placed.
pub fn pack_rows(lengths: &[usize], capacity: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng_for(seed, "data.packing"));
    // stable: equal lengths keep the drawn order
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut rows: Vec<Vec<usize>> = vec![];
    let mut free: Vec<usize> = vec![];
    for i in order {
        let n = lengths[i];
        match free.iter().position(|&f| f >= n) {
            Some(r) => {
                rows[r].push(i);
                free[r] -= n;
            }
            None => {
                rows.push(vec![i]);
                free.push(capacity.saturating_sub(n));
            }
        }
    }
    rows
}

/// Pads `items[indices]` on the right to the longest of them. Classification items (all with a
/// label) give `labels`; SFT items (none with a label) give `target_mask`.
pub fn collate(
    items: &[Encoded],
    indices: &[usize],
    pad_id: u32,
    device: &Device,
) -> Result<Batch> {
    let rows: Vec<Vec<usize>> = indices.iter().map(|&i| vec![i]).collect();
    collate_rows(items, &rows, pad_id, device)
}

/// [`collate`] for packed rows: row r lays the examples `rows[r]` end to end, then the rows
/// are padded to the longest. Packing is for SFT only: the first token of every example is not
/// trained on (nothing of its own example comes before it, as without packing), and the
/// batch's `segments` give the attention each example's extent.
pub fn collate_rows(
    items: &[Encoded],
    rows: &[Vec<usize>],
    pad_id: u32,
    device: &Device,
) -> Result<Batch> {
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(Error::msg("cannot collate an empty batch or row"));
    }
    let packed = rows.iter().any(|r| r.len() > 1);
    let indices: Vec<usize> = rows.iter().flatten().copied().collect();
    let mut chosen = Vec::with_capacity(indices.len());
    for &i in &indices {
        let item = items.get(i).ok_or_else(|| {
            Error::msg(format!(
                "batch index {i} out of range: there are {} examples",
                items.len()
            ))
        })?;
        if item.ids.is_empty() {
            return Err(Error::msg(format!("example {i} has no tokens")));
        }
        if item.type_ids.len() != item.ids.len() || item.target_mask.len() != item.ids.len() {
            return Err(Error::msg(format!(
                "example {i}: {} ids, {} type ids and {} target-mask entries differ",
                item.ids.len(),
                item.type_ids.len(),
                item.target_mask.len()
            )));
        }
        chosen.push(item);
    }
    let n_labelled = chosen.iter().filter(|e| e.label.is_some()).count();
    if n_labelled != 0 && n_labelled != chosen.len() {
        return Err(Error::msg("a batch mixes examples with and without labels"));
    }
    let classify = n_labelled == chosen.len();
    if classify && packed {
        return Err(Error::msg(
            "packing is for SFT: a classification example needs a row of its own",
        ));
    }
    let b = rows.len();
    let row_len = |r: &Vec<usize>| -> usize { r.iter().map(|&i| items[i].ids.len()).sum() };
    let t = rows.iter().map(row_len).max().unwrap_or(0);

    let mut ids = Vec::with_capacity(b * t);
    let mut type_ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    let mut target = Vec::with_capacity(if classify { 0 } else { b * t });
    let mut n_tokens = 0;
    let mut segments = Vec::with_capacity(b);
    for row in rows {
        let mut lens = Vec::with_capacity(row.len());
        for &i in row {
            let e = &items[i];
            ids.extend_from_slice(&e.ids);
            type_ids.extend_from_slice(&e.type_ids);
            if !classify {
                let first = target.len();
                target.extend(e.target_mask.iter().map(|&m| f32::from(m)));
                if packed {
                    target[first] = 0.0;
                }
            }
            lens.push(e.ids.len());
        }
        let n: usize = lens.iter().sum();
        let pad = t - n;
        n_tokens += n;
        ids.extend(std::iter::repeat_n(pad_id, pad));
        type_ids.extend(std::iter::repeat_n(0u32, pad));
        mask.extend(std::iter::repeat_n(1f32, n));
        mask.extend(std::iter::repeat_n(0f32, pad));
        if !classify {
            target.extend(std::iter::repeat_n(0f32, pad));
        }
        segments.push(lens);
    }
    let labels = if classify {
        let l: Vec<u32> = chosen
            .iter()
            .map(|e| e.label.unwrap_or_default() as u32)
            .collect();
        Some(Tensor::from_vec(l, b, device)?)
    } else {
        None
    };
    let target_mask = if classify {
        None
    } else {
        Some(Tensor::from_vec(target, (b, t), device)?)
    };
    Ok(Batch {
        indices,
        ids: Tensor::from_vec(ids, (b, t), device)?,
        type_ids: Tensor::from_vec(type_ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        labels,
        target_mask,
        n_tokens,
        segments: packed.then_some(segments),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn lengths(n: usize, seed: u64) -> Vec<usize> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(1..512)).collect()
    }

    fn covers_once(batches: &[Vec<usize>], n: usize) -> bool {
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        seen == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn every_index_exactly_once() {
        for (n, bs) in [(0, 4), (1, 4), (7, 3), (1000, 8), (1001, 16), (5, 0)] {
            let lens = lengths(n, 1);
            for shuffle in [true, false] {
                let batches = epoch_batches(&lens, bs, 3, 0, shuffle);
                assert!(covers_once(&batches, n), "n={n} bs={bs} shuffle={shuffle}");
                let bs = bs.max(1);
                assert_eq!(batches.len(), n.div_ceil(bs));
                assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= bs));
            }
        }
    }

    #[test]
    fn deterministic_and_epoch_dependent() {
        let lens = lengths(1000, 2);
        let a = epoch_batches(&lens, 8, 42, 3, true);
        assert_eq!(a, epoch_batches(&lens, 8, 42, 3, true));
        assert_ne!(a, epoch_batches(&lens, 8, 42, 4, true));
        assert_ne!(a, epoch_batches(&lens, 8, 43, 3, true));
        // Evaluation order ignores seed and epoch and is sorted by length.
        let e = epoch_batches(&lens, 8, 1, 1, false);
        assert_eq!(e, epoch_batches(&lens, 8, 9, 9, false));
        let flat: Vec<usize> = e.iter().flatten().map(|&i| lens[i]).collect();
        assert!(flat.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn batches_are_length_homogeneous() {
        let lens = lengths(4000, 5);
        let bs = 16;
        // Padding = Σ over batches of (max length · size − Σ lengths).
        let padding = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| {
                    let max = b.iter().map(|&i| lens[i]).max().unwrap();
                    b.iter().map(|&i| max - lens[i]).sum::<usize>()
                })
                .sum()
        };
        let bucketed = padding(&epoch_batches(&lens, bs, 0, 0, true));
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        let random: Vec<Vec<usize>> = order.chunks(bs).map(<[usize]>::to_vec).collect();
        let random = padding(&random);
        assert!(
            bucketed * 10 < random,
            "bucketed padding {bucketed} vs random {random}"
        );
    }

    fn item(ids: &[u32], label: Option<usize>, target: &[u8]) -> Encoded {
        Encoded {
            ids: ids.to_vec(),
            type_ids: ids.iter().map(|&i| u32::from(i >= 100)).collect(),
            label,
            target_mask: target.to_vec(),
        }
    }

    #[test]
    fn collate_pads_classification() {
        let items = vec![
            item(&[2, 10, 3], Some(1), &[0, 0, 0]),
            item(&[2, 11, 12, 100, 3], Some(0), &[0; 5]),
            item(&[2, 3], Some(2), &[0, 0]),
        ];
        let b = collate(&items, &[2, 0, 1], 9, &Device::Cpu).unwrap();
        assert_eq!(b.indices, vec![2, 0, 1]);
        assert_eq!(b.n_tokens, 10);
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![
                vec![2, 3, 9, 9, 9],
                vec![2, 10, 3, 9, 9],
                vec![2, 11, 12, 100, 3]
            ]
        );
        assert_eq!(
            b.type_ids.to_vec2::<u32>().unwrap(),
            vec![vec![0; 5], vec![0; 5], vec![0, 0, 0, 1, 0]]
        );
        assert_eq!(
            b.mask.to_vec2::<f32>().unwrap(),
            vec![
                vec![1., 1., 0., 0., 0.],
                vec![1., 1., 1., 0., 0.],
                vec![1., 1., 1., 1., 1.]
            ]
        );
        assert_eq!(b.labels.unwrap().to_vec1::<u32>().unwrap(), vec![2, 1, 0]);
        assert!(b.target_mask.is_none());
    }

    #[test]
    fn collate_pads_sft() {
        let items = vec![
            item(&[2, 5, 6, 7, 3], None, &[0, 0, 1, 1, 1]),
            item(&[2, 8, 3], None, &[0, 1, 1]),
        ];
        let b = collate(&items, &[1, 0], 0, &Device::Cpu).unwrap();
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![vec![2, 8, 3, 0, 0], vec![2, 5, 6, 7, 3]]
        );
        assert_eq!(
            b.target_mask.unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 1., 0., 0.], vec![0., 0., 1., 1., 1.]]
        );
        assert_eq!(
            b.mask.to_vec2::<f32>().unwrap(),
            vec![vec![1., 1., 1., 0., 0.], vec![1.; 5]]
        );
        assert!(b.labels.is_none());
        assert_eq!(b.n_tokens, 8);
        assert!(collate(&items, &[], 0, &Device::Cpu).is_err());
        assert!(collate(&items, &[2], 0, &Device::Cpu).is_err());
        let mixed = vec![items[0].clone(), item(&[1], Some(0), &[0])];
        assert!(collate(&mixed, &[0, 1], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn packing_fills_rows_and_keeps_every_example_whole() {
        let lens = lengths(2000, 7);
        let cap = 1024;
        let rows = pack_rows(&lens, cap, 1);
        let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        let fill = |r: &Vec<usize>| r.iter().map(|&i| lens[i]).sum::<usize>();
        assert!(rows.iter().all(|r| fill(r) <= cap));
        // first fit decreasing: within 5% of the least possible number of rows
        let least = lens.iter().sum::<usize>().div_ceil(cap);
        assert!(
            rows.len() * 100 <= least * 105,
            "{} rows, {least} at least",
            rows.len()
        );
        assert_eq!(rows, pack_rows(&lens, cap, 1));
        assert_ne!(rows, pack_rows(&lens, cap, 2));
        // an example longer than a row gets one of its own
        assert_eq!(pack_rows(&[3, 9, 2], 4, 0), vec![vec![1], vec![0], vec![2]]);
        assert!(pack_rows(&[], 4, 0).is_empty());
    }

    #[test]
    fn collate_packs_rows_without_training_across_examples() {
        let items = vec![
            item(&[2, 5, 6, 7], None, &[0, 1, 1, 1]),
            item(&[2, 8, 3], None, &[1, 1, 1]),
            item(&[4, 4], None, &[0, 1]),
        ];
        let b = collate_rows(&items, &[vec![0, 1], vec![2]], 0, &Device::Cpu).unwrap();
        assert_eq!(b.indices, vec![0, 1, 2]);
        assert_eq!(b.segments, Some(vec![vec![4, 3], vec![2]]));
        assert_eq!(b.n_tokens, 9);
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![vec![2, 5, 6, 7, 2, 8, 3], vec![4, 4, 0, 0, 0, 0, 0]]
        );
        // the second example's first token is not predicted from the first example's end
        assert_eq!(
            b.target_mask.unwrap().to_vec2::<f32>().unwrap(),
            vec![
                vec![0., 1., 1., 1., 0., 1., 1.],
                vec![0., 1., 0., 0., 0., 0., 0.]
            ]
        );
        assert_eq!(
            b.mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.; 7], vec![1., 1., 0., 0., 0., 0., 0.]]
        );
        // one example per row: no segments, as collate
        let one = collate_rows(&items, &[vec![1], vec![0]], 0, &Device::Cpu).unwrap();
        assert!(one.segments.is_none());
        let plain = collate(&items, &[1, 0], 0, &Device::Cpu).unwrap();
        assert_eq!(
            one.ids.to_vec2::<u32>().unwrap(),
            plain.ids.to_vec2::<u32>().unwrap()
        );
        let classes = vec![item(&[1, 2], Some(0), &[0, 0]), item(&[3], Some(1), &[0])];
        let err = collate_rows(&classes, &[vec![0, 1]], 0, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("packing is for SFT"), "{err}");
        assert!(collate_rows(&items, &[vec![]], 0, &Device::Cpu).is_err());
    }
}
