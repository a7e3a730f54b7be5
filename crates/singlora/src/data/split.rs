//! Train / evaluation splits of one file: a seeded random fraction, or every n-th row (the
//! demo's fixed split). Both keep file order within each side; rows skipped at load time stay
//! with the training side.

use rand::seq::SliceRandom;

use super::{Dataset, Record};
use crate::error::{Error, Result};
use crate::rng::rng_for;

/// Splits off `eval_fraction` of the rows (rounded, but at least one row on each side) as an
/// evaluation set, chosen by a shuffle seeded from `seed`. Returns (train, eval).
pub fn split_fraction(ds: Dataset, eval_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
    if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
        return Err(Error::msg(format!(
            "evaluation fraction {eval_fraction} must lie strictly between 0 and 1"
        )));
    }
    let n = ds.records.len();
    if n < 2 {
        return Err(Error::bad_file(
            &ds.path,
            format!(
                "{n} row{}: too few to split into training and evaluation sets (pass a separate \
                 evaluation file)",
                if n == 1 { "" } else { "s" }
            ),
        ));
    }
    let n_eval = ((n as f64 * eval_fraction).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(seed, "data.split"));
    let mut to_eval = vec![false; n];
    for &i in &order[..n_eval] {
        to_eval[i] = true;
    }
    Ok(partition(ds, |i| to_eval[i]))
}

/// Rows 0, n, 2n, … (in file order) go to evaluation, the rest to training. Returns
/// (train, eval); `n` = 0 is taken as 1.
pub fn split_every_nth(ds: Dataset, n: usize) -> (Dataset, Dataset) {
    let n = n.max(1);
    partition(ds, |i| i % n == 0)
}

fn partition(ds: Dataset, to_eval: impl Fn(usize) -> bool) -> (Dataset, Dataset) {
    let (mut train, mut eval): (Vec<Record>, Vec<Record>) = (Vec::new(), Vec::new());
    for (i, r) in ds.records.into_iter().enumerate() {
        if to_eval(i) {
            eval.push(r);
        } else {
            train.push(r);
        }
    }
    (
        Dataset {
            path: ds.path.clone(),
            records: train,
            skipped: ds.skipped,
        },
        Dataset {
            path: ds.path,
            records: eval,
            skipped: Vec::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Example;
    use std::path::PathBuf;

    fn ds(n: usize) -> Dataset {
        Dataset {
            path: PathBuf::from("d.jsonl"),
            records: (0..n)
                .map(|i| Record {
                    line: i + 1,
                    example: Example::Sft {
                        prompt: format!("p{i}"),
                        completion: "c".into(),
                    },
                })
                .collect(),
            skipped: vec![],
        }
    }

    fn lines(ds: &Dataset) -> Vec<usize> {
        ds.records.iter().map(|r| r.line).collect()
    }

    #[test]
    fn fraction_split_is_deterministic_and_complete() {
        let (t1, e1) = split_fraction(ds(100), 0.2, 7).unwrap();
        let (t2, e2) = split_fraction(ds(100), 0.2, 7).unwrap();
        assert_eq!((lines(&t1), lines(&e1)), (lines(&t2), lines(&e2)));
        assert_eq!(e1.len(), 20);
        assert_eq!(t1.len(), 80);
        let mut all: Vec<usize> = lines(&t1).into_iter().chain(lines(&e1)).collect();
        all.sort();
        assert_eq!(all, (1..=100).collect::<Vec<_>>());
        assert!(
            lines(&e1).windows(2).all(|w| w[0] < w[1]),
            "file order kept"
        );
        let (_, e3) = split_fraction(ds(100), 0.2, 8).unwrap();
        assert_ne!(lines(&e1), lines(&e3), "another seed, another split");
    }

    #[test]
    fn fraction_split_keeps_a_row_on_each_side() {
        let (t, e) = split_fraction(ds(3), 0.01, 0).unwrap();
        assert_eq!((t.len(), e.len()), (2, 1));
        let (t, e) = split_fraction(ds(3), 0.99, 0).unwrap();
        assert_eq!((t.len(), e.len()), (1, 2));
        assert!(split_fraction(ds(1), 0.5, 0).is_err());
        assert!(split_fraction(ds(10), 0.0, 0).is_err());
        assert!(split_fraction(ds(10), 1.0, 0).is_err());
        assert!(split_fraction(ds(10), f64::NAN, 0).is_err());
    }

    #[test]
    fn every_nth() {
        let (t, e) = split_every_nth(ds(10), 4);
        assert_eq!(lines(&e), vec![1, 5, 9]);
        assert_eq!(lines(&t), vec![2, 3, 4, 6, 7, 8, 10]);
    }
}
