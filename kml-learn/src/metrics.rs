//! Evaluation metrics. The miss class is the positive class: accuracy alone misleads
//! when misses are rare, so balanced accuracy and the miss class's precision, recall
//! and F1 are always reported beside it. All fractions are in 0..=1.

use serde::{Deserialize, Serialize};

/// Predicted vs actual, miss = positive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfusionMatrix {
    /// Predicted miss, missed.
    pub true_miss: u64,
    /// Predicted miss, met its deadline.
    pub false_miss: u64,
    /// Predicted met, met.
    pub true_met: u64,
    /// Predicted met, missed.
    pub false_met: u64,
}

impl ConfusionMatrix {
    pub fn add(&mut self, predicted_miss: bool, missed: bool) {
        match (predicted_miss, missed) {
            (true, true) => self.true_miss += 1,
            (true, false) => self.false_miss += 1,
            (false, false) => self.true_met += 1,
            (false, true) => self.false_met += 1,
        }
    }

    /// Adds another period's counts into these.
    pub fn merge(&mut self, other: &ConfusionMatrix) {
        self.true_miss += other.true_miss;
        self.false_miss += other.false_miss;
        self.true_met += other.true_met;
        self.false_met += other.false_met;
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let mut m = ConfusionMatrix::default();
        for (predicted, actual) in pairs {
            m.add(predicted, actual);
        }
        m
    }

    pub fn total(&self) -> u64 {
        self.true_miss + self.false_miss + self.true_met + self.false_met
    }

    pub fn actual_misses(&self) -> u64 {
        self.true_miss + self.false_met
    }

    pub fn actual_met(&self) -> u64 {
        self.true_met + self.false_miss
    }

    /// Only misses or only met deadlines (or nothing): balanced accuracy means
    /// nothing here ("one class").
    pub fn one_class(&self) -> bool {
        self.actual_misses() == 0 || self.actual_met() == 0
    }

    pub fn accuracy(&self) -> f64 {
        ratio(self.true_miss + self.true_met, self.total())
    }

    /// Recall of the miss class (sensitivity).
    pub fn recall_miss(&self) -> f64 {
        ratio(self.true_miss, self.actual_misses())
    }

    /// Recall of the met class (specificity).
    pub fn recall_met(&self) -> f64 {
        ratio(self.true_met, self.actual_met())
    }

    pub fn precision_miss(&self) -> f64 {
        ratio(self.true_miss, self.true_miss + self.false_miss)
    }

    pub fn f1_miss(&self) -> f64 {
        // 2TP / (2TP + FP + FN): defined (0) even when there is no positive at all.
        ratio(
            2 * self.true_miss,
            2 * self.true_miss + self.false_miss + self.false_met,
        )
    }

    /// Mean of the two classes' recalls. When the data holds only one class, that
    /// class's recall (a class that is absent has no recall to average in).
    pub fn balanced_accuracy(&self) -> f64 {
        match (self.actual_misses(), self.actual_met()) {
            (0, 0) => 0.0,
            (0, _) => self.recall_met(),
            (_, 0) => self.recall_miss(),
            _ => (self.recall_miss() + self.recall_met()) / 2.0,
        }
    }

    /// An upper bound on the standard error of [`Self::balanced_accuracy`]: see
    /// [`balanced_accuracy_standard_error`].
    pub fn balanced_accuracy_standard_error(&self) -> f64 {
        balanced_accuracy_standard_error(self.actual_misses(), self.actual_met())
    }

    pub fn summary(&self) -> ClassificationMetrics {
        ClassificationMetrics {
            accuracy: self.accuracy(),
            balanced_accuracy: self.balanced_accuracy(),
            precision_miss: self.precision_miss(),
            recall_miss: self.recall_miss(),
            f1_miss: self.f1_miss(),
            confusion: *self,
        }
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// A classifier's scores on one dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationMetrics {
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub precision_miss: f64,
    pub recall_miss: f64,
    pub f1_miss: f64,
    pub confusion: ConfusionMatrix,
}

/// A delay regression's scores on one dataset ("µs" of 1024 ns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegressionMetrics {
    /// Mean absolute error of the predicted dispatch delay.
    pub mae_us: f64,
    /// Coefficient of determination (1 is perfect, 0 is predicting the mean).
    pub r2: f64,
}

impl RegressionMetrics {
    /// From (predicted, actual) pairs. R² is 0 when the actual values are constant.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (f64, f64)>) -> Self {
        let pairs: Vec<(f64, f64)> = pairs.into_iter().collect();
        if pairs.is_empty() {
            return RegressionMetrics::default();
        }
        let n = pairs.len() as f64;
        let mean = pairs.iter().map(|p| p.1).sum::<f64>() / n;
        let (mut abs, mut ss_res, mut ss_tot) = (0.0, 0.0, 0.0);
        for &(predicted, actual) in &pairs {
            abs += (predicted - actual).abs();
            ss_res += (predicted - actual).powi(2);
            ss_tot += (actual - mean).powi(2);
        }
        let r2 = if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            0.0
        };
        RegressionMetrics {
            mae_us: abs / n,
            r2,
        }
    }
}

/// Area under the ROC curve of `scores` (higher = more likely a miss) against
/// `labels`: the probability that a random miss scores above a random met request,
/// ties counting one half (Mann-Whitney). `None` when the labels hold one class
/// only: there is no ranking to judge, and a trace like that is reported as "one
/// class", never with a score.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len());
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' ranks (1-based, ties at their mean rank).
    let (mut rank_sum, mut k) = (0.0, 0);
    while k < order.len() {
        let mut end = k;
        while end < order.len() && scores[order[end]] == scores[order[k]] {
            end += 1;
        }
        let mean_rank = (k + 1 + end) as f64 / 2.0;
        let pos_here = order[k..end].iter().filter(|&&i| labels[i]).count() as f64;
        rank_sum += mean_rank * pos_here;
        k = end;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// What a tuned verdict threshold aims at.
///
/// A verdict that is only counted (shadow mode) is judged by balanced accuracy. A
/// verdict that acts is not: serving a read early that did not need it costs little
/// (measured in the VM: boosting every read costs no throughput against boosting
/// some), while a read at risk that is left alone is the tail. Such a verdict wants
/// nearly every miss flagged, at the fewest flags that do it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ThresholdGoal {
    /// The best balanced accuracy ([`best_balanced_threshold`]).
    #[default]
    Balanced,
    /// The highest threshold that flags at least this share (0 < r <= 1) of the
    /// misses ([`miss_recall_threshold`]).
    MissRecall(f64),
}

impl ThresholdGoal {
    pub fn is_balanced(&self) -> bool {
        *self == ThresholdGoal::Balanced
    }

    /// `None` unless the goal is well-formed (a recall in (0, 1]).
    pub fn checked(self) -> Option<Self> {
        match self {
            ThresholdGoal::MissRecall(r) if !(r > 0.0 && r <= 1.0) => None,
            goal => Some(goal),
        }
    }

    /// The threshold on `scores` (verdict: `score > t`) that meets this goal on `labels`.
    pub fn threshold(self, scores: &[f64], labels: &[bool]) -> f64 {
        match self {
            ThresholdGoal::Balanced => best_balanced_threshold(scores, labels),
            ThresholdGoal::MissRecall(r) => miss_recall_threshold(scores, labels, r),
        }
    }
}

/// The highest threshold `t` on `scores` (verdict: `score > t`) that flags at least
/// `recall` of the misses in `labels`: just below the score of the miss that makes
/// the share, halfway to the next lower score (requests of one score are flagged
/// together). With no miss, flags nothing.
pub fn miss_recall_threshold(scores: &[f64], labels: &[bool], recall: f64) -> f64 {
    assert_eq!(scores.len(), labels.len());
    let mut finite: Vec<f64> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    let mut misses: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|&(s, &l)| l && s.is_finite())
        .map(|(&s, _)| s)
        .collect();
    let top = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if misses.is_empty() {
        return if top.is_finite() { top + 1.0 } else { 0.0 };
    }
    misses.sort_unstable_by(|a, b| b.total_cmp(a));
    let needed =
        ((recall.clamp(0.0, 1.0) * misses.len() as f64).ceil() as usize).clamp(1, misses.len());
    let cut = misses[needed - 1];
    finite.sort_unstable_by(|a, b| b.total_cmp(a));
    match finite.iter().find(|&&s| s < cut) {
        Some(&next) => (cut + next) / 2.0,
        None => cut - 1.0,
    }
}

/// The threshold `t` on `scores` (verdict: `score > t`) that maximises balanced
/// accuracy against `labels`. Ties keep the higher threshold (fewer flags). With one
/// class only, returns a threshold that predicts it.
pub fn best_balanced_threshold(scores: &[f64], labels: &[bool]) -> f64 {
    assert_eq!(scores.len(), labels.len());
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    let mut order: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i].is_finite())
        .collect();
    // Highest score first: moving the threshold down flags one more request at a time.
    order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (top, bottom) = match (order.first(), order.last()) {
        (Some(&hi), Some(&lo)) => (scores[hi], scores[lo]),
        _ => return 0.0,
    };
    // One class only: flag everything or nothing, with a threshold near the data.
    if positives == 0.0 {
        return top + 1.0;
    }
    if negatives == 0.0 {
        return bottom - 1.0;
    }
    match best_cut(scores, labels, &order) {
        None => top + 1.0,
        Some((s, Some(next))) => (s + next) / 2.0,
        Some((s, None)) => s - 1.0,
    }
}

/// The balanced accuracy of `scores` against `labels` at the best threshold for
/// these very labels ([`best_balanced_threshold`]): in hindsight, the most one
/// threshold can make of the ranking. For a model judged on a trace it never saw,
/// the gap to its tuned threshold's score is the threshold's, not the ranking's.
/// (`run`'s live calibration moves the threshold as the workload moves, so it can
/// do better than any one threshold.) `None` when the labels hold one class only.
pub fn best_balanced_accuracy(scores: &[f64], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len());
    let misses = labels.iter().filter(|&&l| l).count();
    if misses == 0 || misses == labels.len() {
        return None;
    }
    let t = best_balanced_threshold(scores, labels);
    let mut cm = ConfusionMatrix::default();
    for (&s, &missed) in scores.iter().zip(labels) {
        cm.add(s > t, missed);
    }
    Some(cm.summary().balanced_accuracy)
}

/// The sweep behind every best threshold (this one's, and the live calibration's
/// integer shift): `order` lists indices of `scores`, highest score first. Flags the
/// highest scores first, every request of one score at once (a threshold cannot split
/// them), and says where balanced accuracy against `labels` peaks: the lowest score
/// flagged and the next lower one (`None`: every score flagged); `None` when flagging
/// nothing is as good. Ties keep the higher threshold (fewer flags). Both classes must
/// be present in `labels`.
pub(crate) fn best_cut<T: Copy + PartialEq>(
    scores: &[T],
    labels: &[bool],
    order: &[usize],
) -> Option<(T, Option<T>)> {
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    let (mut tp, mut fp) = (0.0, 0.0);
    // Flag nothing: recall_met = 1, recall_miss = 0.
    let (mut best, mut cut) = (0.5, None);
    let mut k = 0;
    while k < order.len() {
        let s = scores[order[k]];
        while k < order.len() && scores[order[k]] == s {
            if labels[order[k]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            k += 1;
        }
        let ba = 0.5 * (tp / positives + (negatives - fp) / negatives);
        if ba > best {
            best = ba;
            cut = Some((s, order.get(k).map(|&next| scores[next])));
        }
    }
    cut
}

/// Matrices of several batches (seconds, windows) pooled into one.
impl<'a> std::iter::Sum<&'a ConfusionMatrix> for ConfusionMatrix {
    fn sum<I: Iterator<Item = &'a ConfusionMatrix>>(iter: I) -> Self {
        iter.fold(ConfusionMatrix::default(), |mut m, s| {
            m.merge(s);
            m
        })
    }
}

/// An upper bound on the standard error of a balanced accuracy measured on `misses`
/// and `met` requests: ½·√(¼/misses + ¼/met), each class's recall having a variance
/// of at most ¼ over its count. Requests come in correlated bursts, so the true
/// error is larger: a floor on what counts as a real difference, not a test.
pub fn balanced_accuracy_standard_error(misses: u64, met: u64) -> f64 {
    0.25 * (1.0 / misses.max(1) as f64 + 1.0 / met.max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_metrics_by_hand() {
        // 10 requests: 4 missed; predicted 3 of them plus 2 false alarms.
        let mut pairs = vec![(true, true); 3];
        pairs.push((false, true));
        pairs.extend([(true, false); 2]);
        pairs.extend([(false, false); 4]);
        let m = ConfusionMatrix::from_pairs(pairs);
        assert_eq!(
            m,
            ConfusionMatrix {
                true_miss: 3,
                false_miss: 2,
                true_met: 4,
                false_met: 1
            }
        );
        let s = m.summary();
        assert!((s.accuracy - 0.7).abs() < 1e-12);
        assert!((s.recall_miss - 0.75).abs() < 1e-12);
        assert!((s.precision_miss - 0.6).abs() < 1e-12);
        assert!((s.balanced_accuracy - (0.75 + 4.0 / 6.0) / 2.0).abs() < 1e-12);
        assert!((s.f1_miss - 2.0 * 0.6 * 0.75 / 1.35).abs() < 1e-12);
    }

    #[test]
    fn degenerate_confusions_are_defined() {
        let none = ConfusionMatrix::default();
        assert_eq!(none.summary().balanced_accuracy, 0.0);
        let all_met = ConfusionMatrix::from_pairs([(false, false); 5]);
        assert_eq!(all_met.balanced_accuracy(), 1.0);
        assert_eq!(all_met.f1_miss(), 0.0);
        // Which of them say nothing: no data, one class either way; both classes do,
        // whatever the verdicts.
        let all_missed = ConfusionMatrix::from_pairs([(false, true); 3]);
        let both = ConfusionMatrix::from_pairs([(false, true), (false, false)]);
        assert!(none.one_class() && all_met.one_class() && all_missed.one_class());
        assert!(!both.one_class());
    }

    #[test]
    fn regression_metrics() {
        let r = RegressionMetrics::from_pairs([(1.0, 1.0), (2.0, 3.0), (3.0, 2.0)]);
        assert!((r.mae_us - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.r2 - (1.0 - 2.0 / 2.0)).abs() < 1e-12);
        assert_eq!(
            RegressionMetrics::from_pairs([(1.0, 1.0), (1.0, 1.0)]).r2,
            0.0
        );
    }

    #[test]
    fn auc_by_hand() {
        assert_eq!(
            auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        // One of the four pairs misordered, one tied.
        let a = auc(
            &[0.1, 0.5, 0.5, 0.9, 0.3],
            &[false, false, true, true, true],
        )
        .unwrap();
        // pairs (pos, neg): (0.5,0.1)=1 (0.5,0.5)=.5 (0.9,*)=2 (0.3,0.1)=1 (0.3,0.5)=0
        assert!((a - 4.5 / 6.0).abs() < 1e-12, "{a}");
        assert_eq!(auc(&[1.0, 2.0], &[false, false]), None);
        assert_eq!(auc(&[1.0, 2.0], &[true, true]), None);
    }

    #[test]
    fn best_balanced_accuracy_is_the_best_threshold() {
        // Separable: 1.0 whatever the scale.
        let labels = [false, false, true, true];
        assert_eq!(
            best_balanced_accuracy(&[1.0, 2.0, 3.0, 4.0], &labels),
            Some(1.0)
        );
        // One miss ranked below one met request: the best threshold flags the top
        // one (recall 1/2, specificity 1) or the top three (recall 1, specificity
        // 1/2): balanced 0.75 either way (the top two: 0.5).
        let b = best_balanced_accuracy(&[1.0, 3.0, 2.0, 4.0], &labels).unwrap();
        assert!((b - 0.75).abs() < 1e-12, "{b}");
        // Never below flagging nothing, and at least any one threshold's score.
        let scores = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.8, 0.6];
        let labels = [false, true, true, false, false, true, true, false];
        let best = best_balanced_accuracy(&scores, &labels).unwrap();
        for t in [0.0, 0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85, 1.0] {
            let mut cm = ConfusionMatrix::default();
            for (&s, &l) in scores.iter().zip(&labels) {
                cm.add(s > t, l);
            }
            assert!(best >= cm.summary().balanced_accuracy - 1e-12, "t {t}");
        }
        assert!(best >= 0.5);
        assert_eq!(best_balanced_accuracy(&[1.0, 2.0], &[true, true]), None);
        assert_eq!(best_balanced_accuracy(&[1.0, 2.0], &[false, false]), None);
    }

    #[test]
    fn threshold_separates_when_possible() {
        let scores = [0.1, 0.2, 0.3, 0.8, 0.9, 0.35];
        let labels = [false, false, false, true, true, false];
        let t = best_balanced_threshold(&scores, &labels);
        assert!(t > 0.35 && t < 0.8, "{t}");
        // Rare positives: balanced accuracy prefers catching them over raw accuracy.
        let scores = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.45];
        let labels = [false, false, false, false, false, false, false, false, true];
        let t = best_balanced_threshold(&scores, &labels);
        assert!(t < 0.45, "{t}");
        // Single class.
        assert!(best_balanced_threshold(&[1.0, 2.0], &[false, false]) > 2.0);
        assert_eq!(best_balanced_threshold(&[1.0, 2.0], &[true, true]), 0.0);
        assert_eq!(best_balanced_threshold(&[], &[]), 0.0);
    }

    #[test]
    fn miss_recall_threshold_by_hand() {
        // Misses at 0.9, 0.8, 0.5, 0.2; met at 0.7, 0.4, 0.1.
        let scores = [0.9, 0.8, 0.7, 0.5, 0.4, 0.2, 0.1];
        let labels = [true, true, false, true, false, true, false];
        // Half the misses: the second (0.8) is the last one needed.
        assert_eq!(miss_recall_threshold(&scores, &labels, 0.5), 0.75);
        // Three quarters: down to 0.5, halfway to 0.4.
        assert!((miss_recall_threshold(&scores, &labels, 0.75) - 0.45).abs() < 1e-12);
        // All: the lowest miss (0.2) is flagged, 0.1 is not.
        assert!((miss_recall_threshold(&scores, &labels, 1.0) - 0.15).abs() < 1e-12);
        // Requests of one score go together; below the lowest score: everything.
        assert_eq!(
            miss_recall_threshold(&[0.3, 0.3], &[true, false], 1.0),
            -0.7
        );
        // No miss: flag nothing. Nothing at all: 0.
        assert!(miss_recall_threshold(&[1.0, 2.0], &[false, false], 0.9) > 2.0);
        assert_eq!(miss_recall_threshold(&[], &[], 0.9), 0.0);
        // Non-finite scores are skipped.
        let t = miss_recall_threshold(&[f64::NAN, 0.5, 0.1], &[true, true, false], 1.0);
        assert!((t - 0.3).abs() < 1e-12, "{t}");
    }

    #[test]
    fn threshold_goal_checks_and_dispatches() {
        assert_eq!(ThresholdGoal::MissRecall(0.0).checked(), None);
        assert_eq!(ThresholdGoal::MissRecall(1.5).checked(), None);
        assert_eq!(ThresholdGoal::MissRecall(f64::NAN).checked(), None);
        assert!(ThresholdGoal::MissRecall(1.0).checked().is_some());
        assert!(ThresholdGoal::Balanced.is_balanced());
        let scores = [0.1, 0.2, 0.3, 0.8, 0.9, 0.35];
        let labels = [false, false, false, true, true, false];
        assert_eq!(
            ThresholdGoal::Balanced.threshold(&scores, &labels),
            best_balanced_threshold(&scores, &labels)
        );
        assert_eq!(
            ThresholdGoal::MissRecall(1.0).threshold(&scores, &labels),
            miss_recall_threshold(&scores, &labels, 1.0)
        );
        let json = serde_json::to_string(&ThresholdGoal::MissRecall(0.99)).unwrap();
        assert_eq!(json, r#"{"miss_recall":0.99}"#);
        assert_eq!(
            serde_json::from_str::<ThresholdGoal>(r#""balanced""#).unwrap(),
            ThresholdGoal::Balanced
        );
    }

    proptest::proptest! {
        /// The threshold flags at least the share of misses asked for, and one
        /// notch higher (the next flagged score up) would not.
        #[test]
        fn miss_recall_threshold_meets_its_share(
            pairs in proptest::collection::vec((0i32..50, proptest::bool::ANY), 1..200),
            recall in 0.01f64..=1.0,
        ) {
            let scores: Vec<f64> = pairs.iter().map(|p| p.0 as f64).collect();
            let labels: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            let misses = labels.iter().filter(|&&l| l).count();
            let t = miss_recall_threshold(&scores, &labels, recall);
            let flagged = |t: f64| scores.iter().zip(&labels).filter(|&(&s, &l)| l && s > t).count();
            if misses == 0 {
                proptest::prop_assert_eq!(flagged(t), 0);
                proptest::prop_assert!(scores.iter().all(|&s| s <= t));
            } else {
                let needed = (recall * misses as f64).ceil() as usize;
                proptest::prop_assert!(flagged(t) >= needed);
                // The lowest flagged score, no longer flagged: too few.
                let lowest = scores.iter().copied().filter(|&s| s > t).fold(f64::INFINITY, f64::min);
                proptest::prop_assert!(flagged(lowest) < needed);
            }
        }
    }
}
