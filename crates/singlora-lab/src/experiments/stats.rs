//! Statistics for comparing methods on one test set: McNemar's exact test on paired
//! predictions and a bootstrap interval over seeds and test items.

/// SplitMix64: a small, fixed pseudo-random sequence, so that a report is reproducible.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n ≥ 1; the modulo bias is below 2^-40 for the sizes used here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// McNemar's exact (binomial) two-sided p-value from the discordant counts: `b` items only the
/// first classifier got right, `c` only the second.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X ≤ k) for X ~ Binomial(n, 1/2), in logs: ln C(n, i) − n ln 2
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

/// The discordant counts (b, c) of two prediction lists against the truth.
pub fn discordant(a: &[u8], b: &[u8], truth: &[u8]) -> (u64, u64) {
    let (mut only_a, mut only_b) = (0, 0);
    for ((&x, &y), &t) in a.iter().zip(b).zip(truth) {
        match (x == t, y == t) {
            (true, false) => only_a += 1,
            (false, true) => only_b += 1,
            _ => {}
        }
    }
    (only_a, only_b)
}

/// A point estimate with a 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The mean over seeds of a per-item score `scores[seed][item]` (correct = 1, or a paired
/// difference in −1..=1), with a 95% percentile interval from `reps` bootstrap replicates that
/// resample the seeds and, independently, the items (the same items for every seed of a
/// replicate, since the test set is one sample shared by all runs).
pub fn bootstrap_mean(scores: &[Vec<i8>], reps: usize, seed: u64) -> Interval {
    let n_seeds = scores.len();
    let n_items = scores.first().map_or(0, Vec::len);
    let mean_of = |seeds: &[usize], items: &[usize]| -> f64 {
        let mut sum = 0i64;
        for &s in seeds {
            let row = &scores[s];
            sum += items.iter().map(|&i| row[i] as i64).sum::<i64>();
        }
        sum as f64 / (seeds.len() * items.len()).max(1) as f64
    };
    let all_seeds: Vec<usize> = (0..n_seeds).collect();
    let all_items: Vec<usize> = (0..n_items).collect();
    let estimate = mean_of(&all_seeds, &all_items);
    if n_seeds == 0 || n_items == 0 {
        return Interval {
            estimate,
            lo: f64::NAN,
            hi: f64::NAN,
        };
    }
    let mut rng = SplitMix::new(seed);
    let mut reps_out: Vec<f64> = (0..reps)
        .map(|_| {
            let seeds: Vec<usize> = (0..n_seeds).map(|_| rng.below(n_seeds)).collect();
            let items: Vec<usize> = (0..n_items).map(|_| rng.below(n_items)).collect();
            mean_of(&seeds, &items)
        })
        .collect();
    reps_out.sort_by(f64::total_cmp);
    let at = |q: f64| reps_out[((q * (reps as f64 - 1.0)).round() as usize).min(reps - 1)];
    Interval {
        estimate,
        lo: at(0.025),
        hi: at(0.975),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_hand_computed_binomial_tails() {
        // n = 10, k = 1: P(X ≤ 1) = 11/1024, two-sided 22/1024
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        // n = 6, k = 0: 2/64
        assert!((mcnemar_exact(0, 6) - 2.0 / 64.0).abs() < 1e-12);
        // balanced: capped at 1
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // a large table stays finite: n = 2000, k = 900; the normal approximation,
        // z = (900.5 − 1000) / √500 = −4.45, gives a two-sided p of about 8.6e-6
        let p = mcnemar_exact(900, 1100);
        assert!(p > 5e-6 && p < 1.5e-5, "{p}");
    }

    #[test]
    fn discordant_counts_by_hand() {
        let truth = [0, 1, 2, 0, 1];
        let a = [0, 1, 0, 1, 1];
        let b = [0, 0, 2, 1, 0];
        // a right on 0,1,4; b right on 0,2: only a on 1,4; only b on 2
        assert_eq!(discordant(&a, &b, &truth), (2, 1));
    }

    #[test]
    fn the_interval_covers_the_estimate_and_shrinks_with_more_items() {
        let mut rng = SplitMix::new(1);
        let draw = |rng: &mut SplitMix, n: usize| -> Vec<i8> {
            (0..n).map(|_| (rng.below(10) < 8) as i8).collect()
        };
        let small: Vec<Vec<i8>> = (0..5).map(|_| draw(&mut rng, 200)).collect();
        let large: Vec<Vec<i8>> = (0..5).map(|_| draw(&mut rng, 5000)).collect();
        let a = bootstrap_mean(&small, 500, 3);
        let b = bootstrap_mean(&large, 500, 3);
        assert!(a.lo < a.estimate && a.estimate < a.hi);
        assert!(b.lo < b.estimate && b.estimate < b.hi);
        assert!((b.estimate - 0.8).abs() < 0.01);
        assert!(b.hi - b.lo < 0.5 * (a.hi - a.lo));
        // an item's mean over five independent seeds has variance 0.16 / 5; over 5,000 items
        // the standard error is √(0.032 / 5000) = 0.0025, plus a little from resampling the
        // seeds: an interval about 4 × 0.0025 = 0.01 wide
        assert!(b.hi - b.lo > 0.006 && b.hi - b.lo < 0.02, "{b:?}");
        // the same seed gives the same interval
        assert_eq!(bootstrap_mean(&small, 500, 3), a);
    }
}
