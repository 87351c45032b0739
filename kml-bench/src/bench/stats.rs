//! Confidence intervals by the bootstrap over cycles.
//!
//! An alternation run measures every arm once per cycle, the arms' order rotating
//! from cycle to cycle, so a cycle is the unit the machine's slow drifts (other
//! tenants' builds, thermal state) act on: an arm and its baseline measured in the
//! same cycle saw nearly the same machine. The bootstrap therefore resamples whole
//! cycles (with replacement) and recomputes the statistic on each resample; the
//! interval is the percentile interval of the resampled statistics. Pure functions,
//! a deterministic generator: the same data give the same interval.

/// A point estimate with its percentile bootstrap interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
    /// Cycles the estimate rests on.
    pub n: usize,
}

impl Estimate {
    /// Whether `x` lies inside the interval.
    pub fn contains(&self, x: f64) -> bool {
        self.lo <= x && x <= self.hi
    }

    /// Half the interval's width.
    pub fn half_width(&self) -> f64 {
        (self.hi - self.lo) / 2.0
    }
}

/// Resamples the bootstrap draws.
pub const RESAMPLES: usize = 2000;
/// Two-sided coverage of the intervals.
pub const LEVEL: f64 = 0.95;
/// Fixed seed: reruns of the analysis give the same intervals.
pub const SEED: u64 = 0x6b6d_6c2d_6265_6e63;

// The bootstrap's index generator: kml-learn's deterministic splitmix64.
use kml_learn::synthetic::SplitMix;

/// `q`-quantile of sorted values by linear interpolation.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    let j = (i + 1).min(sorted.len() - 1);
    Some(sorted[i] + f * (sorted[j] - sorted[i]))
}

/// The statistic on all `n` units and its percentile bootstrap interval: each of
/// `resamples` draws picks `n` unit indices with replacement and calls `stat` on
/// them (an index may repeat). Draws on which `stat` is `None` are left out; `None`
/// when `stat` is `None` on all units or fewer than 2 units exist.
pub fn bootstrap(
    n: usize,
    stat: impl Fn(&[usize]) -> Option<f64>,
    resamples: usize,
    seed: u64,
) -> Option<Estimate> {
    if n < 2 {
        return None;
    }
    let all: Vec<usize> = (0..n).collect();
    let value = stat(&all).filter(|v| v.is_finite())?;
    let mut rng = SplitMix(seed);
    let mut idx = vec![0usize; n];
    let mut draws = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for slot in idx.iter_mut() {
            *slot = rng.below(n);
        }
        if let Some(v) = stat(&idx).filter(|v| v.is_finite()) {
            draws.push(v);
        }
    }
    draws.sort_by(f64::total_cmp);
    let tail = (1.0 - LEVEL) / 2.0;
    Some(Estimate {
        value,
        lo: quantile_sorted(&draws, tail)?,
        hi: quantile_sorted(&draws, 1.0 - tail)?,
        n,
    })
}

/// Σ num / Σ den over the units picked (`None` if the denominator is not positive).
pub fn ratio_of_sums(pairs: &[(f64, f64)], picked: &[usize]) -> Option<f64> {
    let (mut a, mut b) = (0.0, 0.0);
    for &i in picked {
        a += pairs[i].0;
        b += pairs[i].1;
    }
    (b > 0.0).then(|| a / b)
}

/// Ratio of sums of paired values (e.g. an arm's IOPS over the baseline's in the
/// same cycle) with its bootstrap interval over the pairs.
pub fn ratio_ci(pairs: &[(f64, f64)]) -> Option<Estimate> {
    bootstrap(pairs.len(), |p| ratio_of_sums(pairs, p), RESAMPLES, SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), Some(1.0));
        assert_eq!(quantile_sorted(&v, 1.0), Some(4.0));
        assert_eq!(quantile_sorted(&v, 0.5), Some(2.5));
        assert_eq!(quantile_sorted(&[], 0.5), None);
    }

    #[test]
    fn constant_ratio_has_a_zero_width_interval() {
        let pairs: Vec<(f64, f64)> = (1..=20).map(|i| (0.8 * i as f64, i as f64)).collect();
        let e = ratio_ci(&pairs).unwrap();
        assert!((e.value - 0.8).abs() < 1e-12);
        assert!((e.lo - 0.8).abs() < 1e-12 && (e.hi - 0.8).abs() < 1e-12);
        assert_eq!(e.n, 20);
    }

    #[test]
    fn interval_covers_the_truth_and_shrinks_with_more_cycles() {
        // Arm = 0.9 × base, each cycle with ±5% independent noise on both, and a base
        // level drifting from cycle to cycle (which the pairing must cancel).
        let mut rng = SplitMix(7);
        let mut noise = || 1.0 + 0.05 * (2.0 * (rng.next_u64() as f64 / u64::MAX as f64) - 1.0);
        let mut make = |n: usize| -> Vec<(f64, f64)> {
            (0..n)
                .map(|i| {
                    let level = 100_000.0 * (1.0 + 0.3 * ((i as f64) * 0.7).sin());
                    (0.9 * level * noise(), level * noise())
                })
                .collect()
        };
        let small = ratio_ci(&make(10)).unwrap();
        let large = ratio_ci(&make(200)).unwrap();
        assert!(small.contains(0.9), "{small:?}");
        assert!(large.contains(0.9), "{large:?}");
        assert!(large.half_width() < small.half_width());
        assert!(large.half_width() < 0.01, "{large:?}");
    }

    #[test]
    fn same_data_same_interval() {
        let v: Vec<f64> = (0..30).map(|i| (i * 37 % 11) as f64).collect();
        let pairs: Vec<(f64, f64)> = v.iter().map(|x| (*x, 1.0)).collect();
        assert_eq!(ratio_ci(&pairs), ratio_ci(&pairs));
        let e = ratio_ci(&pairs).unwrap();
        assert!(e.lo <= e.value && e.value <= e.hi);
    }

    #[test]
    fn too_little_data_gives_no_interval() {
        assert_eq!(ratio_ci(&[(1.0, 1.0)]), None);
        assert_eq!(ratio_ci(&[(1.0, 0.0), (1.0, 0.0)]), None);
        assert_eq!(bootstrap(5, |_| None, 10, 1), None);
    }
}
