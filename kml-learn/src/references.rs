//! What a model is judged against on the same requests: the 1 ms window oracle and
//! the best one-feature rule. A model at the oracle's level knows the load of each
//! millisecond and nothing about the request; a model at the rule's level is a rule
//! with extra steps (issue 13, "Evaluation that cannot flatter").

use kml_ebpf_common::features::{Feature, FeatureVector};

use crate::{
    dataset::Dataset,
    metrics::{auc, ConfusionMatrix},
};

/// The window of the oracle that judges models: 1 ms of insert time.
pub const ORACLE_WINDOW_NS: u64 = 1_000_000;

/// The window oracle: every request of a `window_ns` window of insert time, in one
/// direction, gets that window's actual miss rate as its score, and the windows are
/// flagged in order of it (hindsight). Its best balanced accuracy is the ceiling of
/// a verdict that sees only the load of the moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowOracle {
    pub window_ns: u64,
    pub balanced_accuracy: f64,
    /// Area under the ROC curve of the windows' miss rates as scores.
    pub auc: Option<f64>,
}

impl WindowOracle {
    /// `None` when `data` holds one class only.
    pub fn of(data: &Dataset, window_ns: u64) -> Option<WindowOracle> {
        let window_ns = window_ns.max(1);
        let key = |r: &kml_ebpf_common::RequestRecord| {
            (r.op().direction() as u8, r.insert_ns / window_ns)
        };
        // Per window: (requests, misses).
        let mut windows: std::collections::HashMap<(u8, u64), (u64, u64)> = Default::default();
        for (r, missed) in data.records().iter().zip(data.missed()) {
            let w = windows.entry(key(r)).or_default();
            w.0 += 1;
            w.1 += missed as u64;
        }
        let (misses, total) = windows
            .values()
            .fold((0, 0), |(m, t), w| (m + w.1, t + w.0));
        let met = total - misses;
        if misses == 0 || met == 0 {
            return None;
        }
        let rate = |w: &(u64, u64)| w.1 as f64 / w.0 as f64;
        let scores: Vec<f64> = data
            .records()
            .iter()
            .map(|r| rate(&windows[&key(r)]))
            .collect();
        let labels: Vec<bool> = data.missed().collect();
        let mut order: Vec<(u64, u64)> = windows.into_values().collect();
        order.sort_by(|a, b| rate(b).total_cmp(&rate(a)));
        let (mut tp, mut fp, mut best) = (0u64, 0u64, 0.5f64);
        for (n, m) in order {
            tp += m;
            fp += n - m;
            best = best.max(0.5 * (tp as f64 / misses as f64 + (met - fp) as f64 / met as f64));
        }
        Some(WindowOracle {
            window_ns,
            balanced_accuracy: best,
            auc: auc(&scores, &labels),
        })
    }
}

/// A fixed rule on one feature lane, as the kernel could run it without a model:
/// flag a request when its value is above `threshold` (or, `above` false, at or
/// below it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeatureRule {
    pub feature: Feature,
    pub above: bool,
    pub threshold: i32,
    /// Its balanced accuracy on the requests it was chosen on.
    pub balanced_accuracy: f64,
}

impl FeatureRule {
    /// The best rule on `feature` for `data`: the cut between two of its values, and
    /// the side, that maximise balanced accuracy (ties keep the first found: the
    /// lowest cut). `None` when `data` holds one class only.
    pub fn fit(data: &Dataset, feature: Feature) -> Option<FeatureRule> {
        let mut pairs: Vec<(i32, bool)> = data
            .features()
            .iter()
            .map(|x| x[feature.index()])
            .zip(data.missed())
            .collect();
        let misses = pairs.iter().filter(|p| p.1).count() as f64;
        let met = pairs.len() as f64 - misses;
        if misses == 0.0 || met == 0.0 {
            return None;
        }
        pairs.sort_unstable_by_key(|p| p.0);
        // Flag everything above the cut: start with every request flagged, then
        // unflag one value at a time, lowest first. Flagging at or below the cut
        // is the complement, whose balanced accuracy is one minus this one's.
        let (mut tp, mut fp) = (misses, met);
        let mut best = FeatureRule {
            feature,
            above: true,
            threshold: pairs[0].0.saturating_sub(1),
            balanced_accuracy: 0.5,
        };
        let mut i = 0;
        while i < pairs.len() {
            let v = pairs[i].0;
            while i < pairs.len() && pairs[i].0 == v {
                if pairs[i].1 {
                    tp -= 1.0;
                } else {
                    fp -= 1.0;
                }
                i += 1;
            }
            let ba = 0.5 * (tp / misses + (met - fp) / met);
            for (above, ba) in [(true, ba), (false, 1.0 - ba)] {
                if ba > best.balanced_accuracy + 1e-12 {
                    best = FeatureRule {
                        feature,
                        above,
                        threshold: v,
                        balanced_accuracy: ba,
                    };
                }
            }
        }
        Some(best)
    }

    /// The best rule on any of `features` for `data` (in hindsight, when `data` is
    /// what it is judged on); `None` for one class or no feature.
    pub fn best(data: &Dataset, features: &[Feature]) -> Option<FeatureRule> {
        features
            .iter()
            .filter_map(|&f| FeatureRule::fit(data, f))
            .fold(None, |best: Option<FeatureRule>, r| match best {
                Some(b) if b.balanced_accuracy >= r.balanced_accuracy => Some(b),
                _ => Some(r),
            })
    }

    pub fn flags(&self, x: &FeatureVector) -> bool {
        (x[self.feature.index()] > self.threshold) == self.above
    }

    /// Its balanced accuracy on other requests (e.g. a rule chosen on training
    /// windows, judged on a held-back one).
    pub fn balanced_accuracy_on(&self, data: &Dataset) -> f64 {
        ConfusionMatrix::from_pairs(
            data.features()
                .iter()
                .map(|x| self.flags(x))
                .zip(data.missed()),
        )
        .balanced_accuracy()
    }
}

impl std::fmt::Display for FeatureRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = if self.above { ">" } else { "<=" };
        write!(f, "{} {side} {}", self.feature.name(), self.threshold)
    }
}

/// Both references on one window of a trace, for `eval`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct References {
    pub oracle: WindowOracle,
    /// The best rule on any lane the data carries, chosen on the same requests.
    pub best_rule: FeatureRule,
}

impl References {
    /// `None` when `data` holds one class only.
    pub fn of(data: &Dataset) -> Option<References> {
        let carried: Vec<Feature> = Feature::ALL
            .iter()
            .copied()
            .filter(|&f| data.records_without(f) == 0)
            .collect();
        Some(References {
            oracle: WindowOracle::of(data, ORACLE_WINDOW_NS)?,
            best_rule: FeatureRule::best(data, &carried)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::{op::ReqOp, RequestRecord};

    /// Reads 100 µs apart, each dispatched `wait` ns after its insert, expiry 1 ms.
    fn reads(waits: &[u64]) -> Dataset {
        let records = waits
            .iter()
            .enumerate()
            .map(|(i, &wait)| {
                let insert = 1_000_000_000 + i as u64 * 100_000;
                RequestRecord {
                    insert_ns: insert,
                    issue_ns: insert + wait,
                    complete_ns: insert + wait + 10,
                    deadline_ns: insert + 1_000_000,
                    op: ReqOp::Read as u8,
                    queued_read: (wait / 100_000) as u32,
                    ..Default::default()
                }
            })
            .collect();
        Dataset::from_records(records, "test")
    }

    #[test]
    fn the_oracle_flags_the_windows_that_missed() {
        // Ten windows of ten requests: in window 3 all miss, in window 7 half do.
        let waits: Vec<u64> = (0..100)
            .map(|i| match (i / 10, i % 2) {
                (3, _) | (7, 0) => 2_000_000,
                _ => 1_000,
            })
            .collect();
        let d = reads(&waits);
        assert_eq!(d.misses(), 15);
        let o = WindowOracle::of(&d, ORACLE_WINDOW_NS).unwrap();
        // Flag window 3 and 7: every miss, 5 of 85 met.
        let both: f64 = 0.5 * (1.0 + 80.0 / 85.0);
        // Window 3 alone: 10 of 15 misses, no met.
        let one = 0.5 * (10.0 / 15.0 + 1.0);
        assert!((o.balanced_accuracy - both.max(one)).abs() < 1e-12, "{o:?}");
        assert!(o.auc.unwrap() > 0.9);
        // One class: no oracle.
        assert_eq!(
            WindowOracle::of(&reads(&[1_000; 20]), ORACLE_WINDOW_NS),
            None
        );
        // Each direction has its windows: reads that all miss and writes that all
        // meet, inserted in the same milliseconds, are told apart.
        let records: Vec<RequestRecord> = d
            .records()
            .iter()
            .map(|r| {
                let write = r.insert_ns / 100_000 % 2 == 1;
                RequestRecord {
                    op: if write { ReqOp::Write } else { ReqOp::Read } as u8,
                    issue_ns: r.insert_ns + if write { 1_000 } else { 2_000_000 },
                    ..*r
                }
            })
            .collect();
        let mixed = Dataset::from_records(records, "mixed");
        assert_eq!(mixed.misses() * 2, mixed.len());
        let o = WindowOracle::of(&mixed, ORACLE_WINDOW_NS).unwrap();
        assert_eq!(o.balanced_accuracy, 1.0);
    }

    #[test]
    fn the_best_rule_is_the_best_cut_on_either_side() {
        // queued_same_dir is wait / 100 µs: misses (wait > 1 ms) have it above 10.
        let waits: Vec<u64> = (0..200).map(|i| (i % 20) * 100_000 + 50_000).collect();
        let d = reads(&waits);
        let r = FeatureRule::fit(&d, Feature::QueuedSameDir).unwrap();
        assert!(r.above);
        assert_eq!(r.threshold, 9);
        assert_eq!(r.balanced_accuracy, 1.0);
        assert_eq!(r.balanced_accuracy_on(&d), 1.0);
        assert_eq!(r.to_string(), "queued_same_dir > 9");
        // The same queue length counted the other way round: flag at or below.
        let flipped = d.clone().with_features(|_, x| {
            let i = Feature::QueuedSameDir.index();
            x[i] = 100 - x[i];
        });
        let r = FeatureRule::fit(&flipped, Feature::QueuedSameDir).unwrap();
        assert!(!r.above);
        assert_eq!(r.threshold, 90);
        assert_eq!(r.balanced_accuracy, 1.0);
        // A lane that is the same for every request says nothing.
        let none = FeatureRule::fit(&d, Feature::WriteDir).unwrap();
        assert_eq!(none.balanced_accuracy, 0.5);
        let best = FeatureRule::best(&d, &[Feature::WriteDir, Feature::QueuedSameDir]).unwrap();
        assert_eq!(best.feature, Feature::QueuedSameDir);
        let refs = References::of(&d).unwrap();
        assert_eq!(refs.best_rule.balanced_accuracy, 1.0);
    }

    proptest::proptest! {
        /// The rule's recorded score is its score when run, and no cut on either
        /// side does better.
        #[test]
        fn the_rule_is_the_best_one_feature_cut(
            pairs in proptest::collection::vec((0u64..30, proptest::bool::ANY), 2..150),
        ) {
            // Each request's queue length is its value; its wait decides the label.
            let waits: Vec<u64> = pairs.iter().map(|p| p.0 * 100_000 + if p.1 { 1_000_000 } else { 0 }).collect();
            let d = reads(&waits).with_features(|r, x| {
                x[Feature::SectorMib.index()] = ((r.issue_ns - r.insert_ns) / 100_000 % 10) as i32;
            });
            let Some(rule) = FeatureRule::fit(&d, Feature::SectorMib) else {
                proptest::prop_assert!(d.misses() == 0 || d.misses() == d.len());
                return Ok(());
            };
            proptest::prop_assert!((rule.balanced_accuracy_on(&d) - rule.balanced_accuracy).abs() < 1e-9);
            for t in -1..11 {
                for above in [true, false] {
                    let other = FeatureRule { feature: Feature::SectorMib, above, threshold: t, balanced_accuracy: 0.0 };
                    proptest::prop_assert!(other.balanced_accuracy_on(&d) <= rule.balanced_accuracy + 1e-9);
                }
            }
        }
    }
}
