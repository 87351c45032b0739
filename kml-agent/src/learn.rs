//! The online loop: learn from live records, swap in better models, watch them.
//!
//! A sliding window of the newest records is retrained on every `every` (or at
//! once when drift is seen). The candidate and the active model are scored on the
//! same held-back newest fifth of the window with the kernel's integer inference;
//! the candidate is installed only if it is better. After a swap the live quality
//! (verdicts against outcomes, from the records themselves) is watched, and the
//! previous model comes back if the new one does worse live.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use kml_ebpf_common::{features::features_at_insert, model::ModelKind, RequestRecord, Verdict};
use kml_learn::{ConfusionMatrix, Dataset, Progress, QuantizedModel, TrainOptions};

/// Balanced accuracy of an integer model on records (the kernel's computation).
pub fn integer_balanced_accuracy(model: &QuantizedModel, records: &[RequestRecord]) -> f64 {
    ConfusionMatrix::from_pairs(records.iter().map(|r| {
        (
            model.infer(&features_at_insert(r)).at_risk,
            r.deadline_missed(),
        )
    }))
    .balanced_accuracy()
}

/// Live quality of the kernel's verdicts in a batch of records.
pub fn live_matrix(records: &[RequestRecord]) -> ConfusionMatrix {
    ConfusionMatrix::from_pairs(
        records
            .iter()
            .filter(|r| r.verdict != Verdict::NONE)
            .map(|r| (r.verdict == Verdict::AT_RISK, r.deadline_missed())),
    )
}

#[derive(Clone, Debug)]
pub struct LearnConfig {
    pub kind: ModelKind,
    pub every: Duration,
    pub window: usize,
    /// Fewest records (and misses) worth training on.
    pub min_records: usize,
    /// A candidate must beat the active model by this much balanced accuracy.
    pub min_gain: f64,
    /// Live balanced accuracy this far below the model's held-back score is drift.
    pub drift_drop: f64,
}

/// Seconds of live verdicts compared before and after a swap.
pub const PROBATION_SECONDS: usize = 5;

/// A swap on probation: if the new model does worse live than the one it
/// replaced did just before, the old one comes back.
pub struct Probation {
    pub previous: QuantizedModel,
    pub previous_reference: f64,
    pub before: ConfusionMatrix,
    pub after: ConfusionMatrix,
    pub started: Instant,
}

impl Probation {
    pub fn new(previous: QuantizedModel, previous_reference: f64, before: ConfusionMatrix) -> Self {
        Probation {
            previous,
            previous_reference,
            before,
            after: ConfusionMatrix::default(),
            started: Instant::now(),
        }
    }

    /// `Some(reason)` when the new model should be rolled back.
    pub fn verdict(&self) -> Option<String> {
        let judgeable =
            |m: &ConfusionMatrix| m.total() >= 200 && m.actual_misses() > 0 && m.actual_met() > 0;
        if !judgeable(&self.before) || !judgeable(&self.after) {
            return None;
        }
        let (before, after) = (
            self.before.balanced_accuracy(),
            self.after.balanced_accuracy(),
        );
        (after < before - 0.05).then(|| {
            format!("live balanced accuracy {after:.3} after the swap, {before:.3} before")
        })
    }
}

/// A trained candidate and how both models did on the held-back part.
pub struct Candidate {
    pub model: QuantizedModel,
    pub candidate_ba: f64,
    pub active_ba: Option<f64>,
    pub held_back: usize,
    pub took: Duration,
}

pub struct OnlineLearner {
    pub config: LearnConfig,
    window: VecDeque<RequestRecord>,
    last_train: Instant,
    /// Held-back balanced accuracy of the active model when it was chosen.
    pub reference_ba: Option<f64>,
    drift_seen: bool,
}

impl OnlineLearner {
    pub fn new(config: LearnConfig) -> Self {
        OnlineLearner {
            window: VecDeque::with_capacity(config.window),
            config,
            last_train: Instant::now(),
            reference_ba: None,
            drift_seen: false,
        }
    }

    pub fn observe(&mut self, records: &[RequestRecord]) {
        for r in records {
            if self.window.len() == self.config.window {
                self.window.pop_front();
            }
            self.window.push_back(*r);
        }
    }

    /// Checks one second's live matrix against the reference; true when drift.
    pub fn check_drift(&mut self, live: &ConfusionMatrix) -> Option<String> {
        let reference = self.reference_ba?;
        if live.total() < 200 || live.actual_misses() == 0 || live.actual_met() == 0 {
            return None;
        }
        let ba = live.balanced_accuracy();
        if ba < reference - self.config.drift_drop && !self.drift_seen {
            self.drift_seen = true;
            return Some(format!(
                "live balanced accuracy {ba:.3} < {reference:.3} - {:.2}",
                self.config.drift_drop
            ));
        }
        None
    }

    /// Whether a retrain is due (period elapsed or drift), with enough data.
    pub fn due(&self) -> bool {
        let misses = self.window.iter().filter(|r| r.deadline_missed()).count();
        let enough = self.window.len() >= self.config.min_records
            && misses >= 50
            && misses < self.window.len() - 50;
        enough && (self.drift_seen || self.last_train.elapsed() >= self.config.every)
    }

    /// The data for a training run (taken now; training happens off the loop).
    pub fn snapshot(&mut self) -> Vec<RequestRecord> {
        self.last_train = Instant::now();
        self.drift_seen = false;
        self.window.iter().copied().collect()
    }

    /// Chosen model: remember its held-back score as the live reference.
    pub fn accepted(&mut self, held_back_ba: f64) {
        self.reference_ba = Some(held_back_ba);
    }
}

/// Trains `kind` on the older 80% of `records` and scores it and `active` on the
/// newest 20% (what "recent held-back records" means here).
pub fn train_candidate(
    kind: ModelKind,
    mut records: Vec<RequestRecord>,
    active: Option<QuantizedModel>,
) -> anyhow::Result<Candidate> {
    let started = Instant::now();
    records.sort_by_key(|r| r.insert_ns);
    let held_back = records[records.len() * 4 / 5..].to_vec();
    let data = Dataset::from_records(records, "live window");
    let mut opts = TrainOptions::new(kind);
    opts.train_fraction = 0.8;
    opts.compare_baseline = false;
    let trained = kml_learn::train(&data, &opts, &Progress::new(true))?;
    let candidate_ba = integer_balanced_accuracy(&trained.quantized, &held_back);
    let active_ba = active
        .as_ref()
        .map(|m| integer_balanced_accuracy(m, &held_back));
    Ok(Candidate {
        model: trained.quantized,
        candidate_ba,
        active_ba,
        held_back: held_back.len(),
        took: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LearnConfig {
        LearnConfig {
            kind: ModelKind::Logistic,
            every: Duration::from_secs(3600),
            window: 1000,
            min_records: 100,
            min_gain: 0.005,
            drift_drop: 0.10,
        }
    }

    fn matrix(tp: u64, fp: u64, tn: u64, fnn: u64) -> ConfusionMatrix {
        ConfusionMatrix {
            true_miss: tp,
            false_miss: fp,
            true_met: tn,
            false_met: fnn,
        }
    }

    fn rec(missed: bool, at: u64) -> RequestRecord {
        RequestRecord {
            insert_ns: at,
            issue_ns: at + if missed { 10 } else { 1 },
            deadline_ns: at + 5,
            ..Default::default()
        }
    }

    #[test]
    fn window_slides_and_training_waits_for_both_classes() {
        let mut l = OnlineLearner::new(config());
        let met: Vec<RequestRecord> = (0..2000).map(|i| rec(false, i)).collect();
        l.observe(&met);
        assert_eq!(
            l.snapshot().len(),
            1000,
            "window keeps the newest records only"
        );
        l.drift_seen = true;
        assert!(!l.due(), "no misses: nothing to learn");
        let mixed: Vec<RequestRecord> = (0..1000).map(|i| rec(i % 3 == 0, 5000 + i)).collect();
        l.observe(&mixed);
        assert!(
            l.due(),
            "drift with both classes present triggers a retrain"
        );
        let snap = l.snapshot();
        assert_eq!(snap.first().map(|r| r.insert_ns), Some(5000));
        assert!(!l.due(), "snapshot resets the trigger");
    }

    #[test]
    fn probation_rolls_back_only_a_clear_loss() {
        let model = QuantizedModel::Linear(Box::new(kml_ebpf_common::model::LinearModel::zeroed()));
        let mut p = Probation::new(model, 0.9, matrix(90, 10, 480, 10));
        p.after = matrix(88, 12, 478, 12);
        assert_eq!(p.verdict(), None, "about as good: keep");
        p.after = matrix(40, 100, 390, 60);
        assert!(p.verdict().is_some(), "clearly worse: roll back");
        p.after = matrix(1, 1, 1, 1);
        assert_eq!(p.verdict(), None, "too little evidence");
    }

    #[test]
    fn drift_is_a_drop_below_the_reference() {
        let mut l = OnlineLearner::new(config());
        assert_eq!(
            l.check_drift(&matrix(100, 10, 400, 10)),
            None,
            "no reference yet"
        );
        l.accepted(0.90);
        assert_eq!(
            l.check_drift(&matrix(90, 10, 480, 10)),
            None,
            "0.90 live is fine"
        );
        assert_eq!(
            l.check_drift(&matrix(1, 1, 50, 1)),
            None,
            "too few requests to judge"
        );
        let drift = l.check_drift(&matrix(30, 200, 300, 70));
        assert!(
            drift.is_some_and(|m| m.contains("live balanced accuracy")),
            "0.6 live is drift"
        );
        assert_eq!(
            l.check_drift(&matrix(30, 200, 300, 70)),
            None,
            "reported once per retrain"
        );
    }
}
