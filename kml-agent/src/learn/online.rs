//! The online loop's decisions, as a state machine with no I/O: it is told what
//! happened (a second of records, a finished training, what the kernel's slots made
//! of an install) and answers what to do next. The run loop ([`crate::agent`]) does
//! it: trains off the loop, installs through [`crate::slots`], logs.
//!
//! - A sliding window of the newest records is retrained on every `every`, or at
//!   once when drift is seen ([`DriftWatch`]), once the window holds enough of both
//!   classes.
//! - A candidate replaces the active model only if it is better by `min_gain` on
//!   the same held-back newest records ([`super::candidate`]).
//! - A swap is on probation for [`PROBATION_SECONDS`]: if the new model does worse
//!   live than the one it replaced did just before, the previous one comes back.
//! - A candidate the kernel refuses (or a rollback it refuses) changes nothing: the
//!   model that served keeps serving.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use kml_ebpf_common::{model::ModelKind, RequestRecord};
use kml_learn::{ConfusionMatrix, QuantizedModel};

use super::candidate::{Candidate, Recipe};

/// Fewest records in the window worth training on, by default (`run
/// --min-train-records`).
pub const DEFAULT_MIN_RECORDS: usize = 20_000;

#[derive(Clone, Debug)]
pub struct LearnConfig {
    pub kind: ModelKind,
    /// How candidates are trained, and which outcomes count while verdicts act.
    pub recipe: Recipe,
    /// Retrain this often; zero turns online learning off (the starting model stays).
    pub every: Duration,
    pub window: usize,
    /// Fewest records (and misses) worth training on.
    pub min_records: usize,
    /// A candidate must beat the active model by this much balanced accuracy.
    pub min_gain: f64,
    /// Live balanced accuracy this far below what the serving model showed is
    /// drift ([`DriftWatch`]).
    pub drift_drop: f64,
}

impl LearnConfig {
    /// The run loop's settings: `kind` every `every` on `window` records.
    pub fn new(kind: ModelKind, every: Duration, window: usize) -> LearnConfig {
        LearnConfig {
            kind,
            recipe: Recipe::default(),
            every,
            window,
            min_records: DEFAULT_MIN_RECORDS,
            min_gain: 0.005,
            drift_drop: 0.10,
        }
    }
}

/// Seconds of live verdicts compared before and after a swap.
pub const PROBATION_SECONDS: usize = 5;

/// Seconds of live verdicts pooled for one judgement of drift.
pub const DRIFT_SECONDS: usize = 5;

/// Fewest requests of each class in pooled live seconds worth judging.
const DRIFT_MIN_PER_CLASS: u64 = 50;

/// Watches the serving model's live verdicts for drift.
///
/// Drift is judged on [`DRIFT_SECONDS`] pooled, never on one second: misses come
/// in bursts, and one second's balanced accuracy swings far more than the pool's
/// (measured live on oltp-wal: seconds alternating 0.90 and 0.70 around a pooled
/// 0.76). And it is judged against what the model showed *live*, never against
/// its held-back score alone: at 67k requests/s the held-back newest fifth of a
/// 200,000-record window is 0.6 s of one phase, and scored 0.87–0.91 where the
/// same models served 0.73–0.76 pooled, so that every second looked like drift
/// and retrained (9 versions in 30 s).
///
/// - A model *settles* over its first judgeable pooled seconds: that is its live
///   reference. If it settles `drift_drop` below its held-back score, it does not
///   fit this workload: one retrain, at once (the shipped model on a new workload).
/// - Settled, the newest pooled seconds falling `drift_drop` below the reference
///   (and beyond two standard errors of the difference) is drift.
/// - A training that ends without a swap re-settles: what the model does now is
///   what the newest data supports. A swap or rollback settles the new model.
#[derive(Default)]
pub struct DriftWatch {
    settling: ConfusionMatrix,
    settling_seconds: usize,
    settled: Option<ConfusionMatrix>,
    /// The serving model was checked against its held-back score once.
    fit_checked: bool,
    /// Seconds since it settled, the newest [`DRIFT_SECONDS`].
    recent: VecDeque<ConfusionMatrix>,
}

impl DriftWatch {
    fn judgeable(m: &ConfusionMatrix) -> bool {
        m.actual_misses() >= DRIFT_MIN_PER_CLASS && m.actual_met() >= DRIFT_MIN_PER_CLASS
    }

    /// A new model serves: it settles again, and is checked against its held-back
    /// score once more.
    pub fn new_model(&mut self) {
        *self = DriftWatch::default();
    }

    /// The serving model stays, but what it showed is no longer the reference.
    pub fn settle_again(&mut self) {
        let fit_checked = self.fit_checked;
        *self = DriftWatch {
            fit_checked,
            ..DriftWatch::default()
        };
    }

    /// The live reference, once settled.
    pub fn reference(&self) -> Option<f64> {
        self.settled
            .as_ref()
            .map(ConfusionMatrix::balanced_accuracy)
    }

    /// One second of live verdicts; `Some(reason)` when it calls for a retrain.
    /// `held_back`: the serving model's held-back score, if known.
    fn second(
        &mut self,
        live: &ConfusionMatrix,
        held_back: Option<f64>,
        drop: f64,
    ) -> Option<String> {
        let Some(settled) = self.settled else {
            self.settling.merge(live);
            self.settling_seconds += 1;
            if self.settling_seconds < DRIFT_SECONDS || !Self::judgeable(&self.settling) {
                return None;
            }
            self.settled = Some(self.settling);
            let ba = self.settling.balanced_accuracy();
            let se = self.settling.balanced_accuracy_standard_error();
            let seconds = self.settling_seconds;
            if std::mem::replace(&mut self.fit_checked, true) {
                return None;
            }
            let promised = held_back?;
            return (ba < promised - drop.max(2.0 * se)).then(|| {
                format!(
                    "the model serves balanced accuracy {ba:.3} live over its first {seconds} s, \
                     more than {drop:.2} below the {promised:.3} it scored held back"
                )
            });
        };
        self.recent.push_back(*live);
        if self.recent.len() > DRIFT_SECONDS {
            self.recent.pop_front();
        }
        if self.recent.len() < DRIFT_SECONDS {
            return None;
        }
        let pooled: ConfusionMatrix = self.recent.iter().sum();
        if !Self::judgeable(&pooled) {
            return None;
        }
        let (now, before) = (pooled.balanced_accuracy(), settled.balanced_accuracy());
        let se = pooled
            .balanced_accuracy_standard_error()
            .hypot(settled.balanced_accuracy_standard_error());
        (now < before - drop.max(2.0 * se)).then(|| {
            format!(
                "live balanced accuracy {now:.3} over the last {DRIFT_SECONDS} s, \
                 more than {drop:.2} below the {before:.3} the model showed when it settled"
            )
        })
    }
}

/// What online learning did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelEvents {
    pub swaps: u64,
    pub rollbacks: u64,
    pub drifts: u64,
    /// Trainings that failed, and candidates the kernel refused.
    pub retrain_failures: u64,
    /// Recalibrated models installed by live threshold calibration (filled in by
    /// the run loop, which calibrates), and the serving model's threshold shift.
    pub calibrations: u64,
    pub threshold_shift: i64,
}

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
    pub fn new(
        previous: QuantizedModel,
        previous_reference: f64,
        before: ConfusionMatrix,
        started: Instant,
    ) -> Self {
        Probation {
            previous,
            previous_reference,
            before,
            after: ConfusionMatrix::default(),
            started,
        }
    }

    /// `Some(reason)` when the new model should be rolled back.
    pub fn judge(&self) -> Option<String> {
        let judgeable = |m: &ConfusionMatrix| m.total() >= 200 && !m.one_class();
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

/// Train a candidate of `kind` on `records` (taken now; trained off the loop).
pub struct TrainJob {
    pub kind: ModelKind,
    pub recipe: Recipe,
    pub records: Vec<RequestRecord>,
}

/// Put the previous model back: the swap did worse live.
pub struct Rollback {
    pub model: QuantizedModel,
    /// The previous model's held-back score, the live reference again once it is back.
    pub reference: f64,
    pub reason: String,
}

/// What one second of records calls for.
#[derive(Default)]
pub struct TickDecisions {
    /// Live accuracy fell below the reference: why (a retrain follows at once).
    pub drift: Option<String>,
    pub train: Option<TrainJob>,
}

/// Install the candidate: it beat the active model on the held-back records.
pub struct Swap {
    pub candidate: Candidate,
}

/// What a finished training calls for.
pub enum TrainingOutcome {
    Swap(Swap),
    /// The candidate is not better: the active model stays.
    Keep(Candidate),
    /// The training failed: why.
    Failed(String),
}

pub struct OnlineLearner {
    pub config: LearnConfig,
    /// The newest records (none kept while online learning is off).
    window: VecDeque<RequestRecord>,
    /// Deadline misses in `window`.
    window_misses: usize,
    last_train: Instant,
    /// Held-back balanced accuracy of the active model when it was chosen.
    pub reference_ba: Option<f64>,
    drift: DriftWatch,
    drift_seen: bool,
    /// The live matrices of the last [`PROBATION_SECONDS`] seconds.
    recent: VecDeque<ConfusionMatrix>,
    probation: Option<Probation>,
    training: bool,
    events: ModelEvents,
}

impl OnlineLearner {
    pub fn new(config: LearnConfig, now: Instant) -> Self {
        // Exactly the window's size (grown by doubling, a ring of 200,000 records
        // would take 262,144 slots); nothing while online learning is off.
        let capacity = if config.every > Duration::ZERO {
            config.window
        } else {
            0
        };
        OnlineLearner {
            window: VecDeque::with_capacity(capacity),
            window_misses: 0,
            config,
            last_train: now,
            reference_ba: None,
            drift: DriftWatch::default(),
            drift_seen: false,
            recent: VecDeque::new(),
            probation: None,
            training: false,
            events: ModelEvents::default(),
        }
    }

    pub fn events(&self) -> ModelEvents {
        self.events
    }

    /// The serving model's live reference for drift, once it has settled.
    pub fn live_reference(&self) -> Option<f64> {
        self.drift.reference()
    }

    /// Whether a swap is on probation now.
    pub fn on_probation(&self) -> bool {
        self.probation.is_some()
    }

    /// The end of a second whose records were handed to [`OnlineLearner::observe`]
    /// as they came and whose live verdicts made `live`: a swap whose probation ends
    /// is judged (and rolled back through `roll_back`, which says whether the kernel
    /// took the previous model back), drift is watched, and a retrain starts when
    /// one is due.
    pub fn tick(
        &mut self,
        now: Instant,
        live: &ConfusionMatrix,
        roll_back: impl FnOnce(&Rollback) -> bool,
    ) -> TickDecisions {
        let live = *live;
        let mut out = TickDecisions::default();
        self.recent.push_back(live);
        if self.recent.len() > PROBATION_SECONDS {
            self.recent.pop_front();
        }
        // A second served by a model on probation belongs to its judgement, also
        // on the tick that ends it (and may roll it back).
        let probation_second = self.probation.is_some();
        if let Some(p) = self.probation.as_mut() {
            p.after.merge(&live);
            if now.duration_since(p.started) >= Duration::from_secs(PROBATION_SECONDS as u64) {
                let p = self.probation.take().expect("checked");
                if let Some(reason) = p.judge() {
                    let rollback = Rollback {
                        model: p.previous,
                        reference: p.previous_reference,
                        reason,
                    };
                    let installed = roll_back(&rollback);
                    self.rolled_back(&rollback, installed);
                }
            }
        }
        if !probation_second {
            out.drift = self.check_drift(&live);
        }
        if out.drift.is_some() {
            self.events.drifts += 1;
        }
        if self.config.every > Duration::ZERO && !self.training && self.due(now) {
            self.training = true;
            self.last_train = now;
            self.drift_seen = false;
            out.train = Some(TrainJob {
                kind: self.config.kind,
                recipe: self.config.recipe.clone(),
                records: self.window.iter().copied().collect(),
            });
        }
        out
    }

    /// A training run ended. Without a swap, the serving model's live reference
    /// settles again: a retrain on the newest data found nothing better, so what
    /// the model does now is not drift to retrain for again and again.
    pub fn trained(&mut self, result: anyhow::Result<Candidate>) -> TrainingOutcome {
        self.training = false;
        match result {
            Ok(c) => {
                let better = c
                    .active_ba
                    .is_none_or(|a| c.candidate_ba >= a + self.config.min_gain);
                if better {
                    TrainingOutcome::Swap(Swap { candidate: c })
                } else {
                    self.drift.settle_again();
                    TrainingOutcome::Keep(c)
                }
            }
            Err(e) => {
                self.events.retrain_failures += 1;
                self.drift.settle_again();
                TrainingOutcome::Failed(format!("{e:#}"))
            }
        }
    }

    /// What the kernel made of a swap: on success it is on probation against
    /// `previous` (the model it replaced, if any); refused, nothing changes.
    pub fn swapped(
        &mut self,
        now: Instant,
        swap: &Swap,
        previous: Option<QuantizedModel>,
        installed: bool,
    ) {
        if !installed {
            self.events.retrain_failures += 1;
            self.drift.settle_again();
            return;
        }
        if let Some(previous) = previous {
            let before: ConfusionMatrix = self.recent.iter().sum();
            self.probation = Some(Probation::new(
                previous,
                self.reference_ba.unwrap_or(0.0),
                before,
                now,
            ));
        }
        self.accepted(swap.candidate.candidate_ba);
        self.drift.new_model();
        self.events.swaps += 1;
    }

    /// What the kernel made of a rollback: on success the previous model's score is
    /// the reference again; refused, the swapped-in model keeps serving.
    fn rolled_back(&mut self, rollback: &Rollback, installed: bool) {
        if installed {
            self.accepted(rollback.reference);
            self.drift.new_model();
            self.events.rollbacks += 1;
        }
    }

    /// Another model serves, chosen outside online learning (`--model auto`'s
    /// race): its held-back score, if known, and it settles anew.
    pub fn replaced(&mut self, held_back: Option<f64>) {
        self.reference_ba = held_back;
        self.drift.new_model();
    }

    /// The model now serving was chosen with this held-back score: the live reference.
    pub fn accepted(&mut self, held_back_ba: f64) {
        self.reference_ba = Some(held_back_ba);
    }

    /// Records join the window (the newest `config.window` are kept), batch by
    /// batch as they arrive. Online learning off: nothing is kept.
    pub fn observe(&mut self, records: &[RequestRecord]) {
        if self.config.every == Duration::ZERO || self.config.window == 0 {
            return;
        }
        // Flushes never pass the scheduler: nothing to learn about its deadlines.
        for r in records.iter().filter(|r| r.went_through_scheduler()) {
            if self.window.len() == self.config.window {
                if let Some(old) = self.window.pop_front() {
                    self.window_misses -= usize::from(old.deadline_missed());
                }
            }
            self.window_misses += usize::from(r.deadline_missed());
            self.window.push_back(*r);
        }
    }

    /// Records in the window now.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// One second's live matrix to the drift watch; `Some` when drift, reported
    /// once until a retrain starts.
    fn check_drift(&mut self, live: &ConfusionMatrix) -> Option<String> {
        let reason = self
            .drift
            .second(live, self.reference_ba, self.config.drift_drop)?;
        (!std::mem::replace(&mut self.drift_seen, true)).then_some(reason)
    }

    /// Whether a retrain is due (period elapsed or drift), with enough data.
    fn due(&self, now: Instant) -> bool {
        let misses = self.window_misses;
        let enough = self.window.len() >= self.config.min_records
            && misses >= 50
            && misses < self.window.len() - 50;
        enough && (self.drift_seen || now.duration_since(self.last_train) >= self.config.every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::Verdict;

    fn config() -> LearnConfig {
        LearnConfig {
            kind: ModelKind::Logistic,
            recipe: Recipe::default(),
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

    /// Records whose kernel verdicts make the live matrix `m` (one second of them).
    fn second(m: ConfusionMatrix, at: u64) -> Vec<RequestRecord> {
        let mut out = Vec::new();
        let mut push = |n: u64, at_risk: bool, missed: bool| {
            for _ in 0..n {
                let mut r = rec(missed, at + out.len() as u64);
                r.verdict = if at_risk {
                    Verdict::AT_RISK
                } else {
                    Verdict::MEETS
                };
                out.push(r);
            }
        };
        push(m.true_miss, true, true);
        push(m.false_miss, true, false);
        push(m.true_met, false, false);
        push(m.false_met, false, true);
        out
    }

    fn model(marker: i32) -> QuantizedModel {
        let mut m = kml_ebpf_common::model::LinearModel::zeroed();
        m.bias = marker.into();
        QuantizedModel::Linear(Box::new(m))
    }

    fn bias(m: &QuantizedModel) -> i64 {
        match m {
            QuantizedModel::Linear(m) => m.bias,
            QuantizedModel::Tree(_) => unreachable!("linear models only here"),
        }
    }

    fn candidate(candidate_ba: f64, active_ba: Option<f64>) -> Candidate {
        Candidate {
            model: model(7),
            candidate_ba,
            active_ba,
            held_back: 200,
            took: Duration::from_millis(1),
            held_back_set: Vec::new(),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// One second of `records`, handed over as the run loop does.
    fn tick(
        l: &mut OnlineLearner,
        now: Instant,
        records: &[RequestRecord],
        roll_back: impl FnOnce(&Rollback) -> bool,
    ) -> TickDecisions {
        l.observe(records);
        l.tick(now, &Recipe::default().live_matrix(records), roll_back)
    }

    fn no_rollback(r: &Rollback) -> bool {
        panic!("unexpected rollback: {}", r.reason)
    }

    #[test]
    fn window_slides_and_training_waits_for_both_classes() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.every = SECOND;
        let mut l = OnlineLearner::new(cfg, t0);
        let met: Vec<RequestRecord> = (0..2000).map(|i| rec(false, i)).collect();
        assert!(
            tick(&mut l, t0 + 2 * SECOND, &met, no_rollback)
                .train
                .is_none(),
            "no misses: nothing to learn"
        );
        let mixed: Vec<RequestRecord> = (0..1000).map(|i| rec(i % 3 == 0, 5000 + i)).collect();
        let job = tick(&mut l, t0 + 3 * SECOND, &mixed, no_rollback)
            .train
            .expect("due, both classes");
        assert_eq!(
            job.records.len(),
            1000,
            "the window keeps the newest records"
        );
        assert_eq!(job.records.first().map(|r| r.insert_ns), Some(5000));
        assert!(
            tick(&mut l, t0 + 10 * SECOND, &mixed, no_rollback)
                .train
                .is_none(),
            "one training at a time"
        );
        assert!(matches!(
            l.trained(Err(anyhow::anyhow!("no"))),
            TrainingOutcome::Failed(_)
        ));
        assert_eq!(l.events().retrain_failures, 1);
        assert!(
            tick(&mut l, t0 + 10 * SECOND, &mixed, no_rollback)
                .train
                .is_some(),
            "the next period trains again"
        );
    }

    #[test]
    fn online_learning_off_never_trains_and_keeps_no_window() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.every = Duration::ZERO;
        let mut l = OnlineLearner::new(cfg, t0);
        let mixed: Vec<RequestRecord> = (0..1000).map(|i| rec(i % 3 == 0, i)).collect();
        assert!(tick(&mut l, t0 + 3600 * SECOND, &mixed, no_rollback)
            .train
            .is_none());
        // The records were observed (by `tick`), and none was kept.
        assert_eq!(l.window_len(), 0);
    }

    #[test]
    fn a_candidate_replaces_the_model_only_if_better() {
        let mut l = OnlineLearner::new(config(), Instant::now());
        assert!(
            matches!(
                l.trained(Ok(candidate(0.70, None))),
                TrainingOutcome::Swap(_)
            ),
            "no active model: any candidate"
        );
        assert!(matches!(
            l.trained(Ok(candidate(0.80, Some(0.79)))),
            TrainingOutcome::Swap(_)
        ));
        assert!(
            matches!(
                l.trained(Ok(candidate(0.80, Some(0.798)))),
                TrainingOutcome::Keep(_)
            ),
            "a gain below min_gain keeps the active model"
        );
        assert!(matches!(
            l.trained(Ok(candidate(0.70, Some(0.80)))),
            TrainingOutcome::Keep(_)
        ));
        assert_eq!(
            l.events(),
            ModelEvents::default(),
            "deciding is not swapping"
        );
    }

    #[test]
    fn a_refused_candidate_keeps_the_old_model_serving() {
        let t0 = Instant::now();
        let mut l = OnlineLearner::new(config(), t0);
        l.accepted(0.75);
        let TrainingOutcome::Swap(swap) = l.trained(Ok(candidate(0.90, Some(0.75)))) else {
            panic!("a better candidate is a swap");
        };
        l.swapped(t0, &swap, Some(model(1)), false);
        assert_eq!(
            l.reference_ba,
            Some(0.75),
            "the old model's reference stays"
        );
        assert!(!l.on_probation(), "nothing swapped, nothing on probation");
        assert_eq!(l.events().swaps, 0);
        assert_eq!(l.events().retrain_failures, 1);
    }

    /// A learner whose model (reference 0.80) did `before` live for the last
    /// seconds, after a swap to a better candidate (0.90) at the returned instant.
    fn swapped_learner(t0: Instant, before: ConfusionMatrix) -> (OnlineLearner, Instant) {
        let mut l = OnlineLearner::new(config(), t0);
        l.accepted(0.80);
        for s in 0..PROBATION_SECONDS as u64 {
            tick(
                &mut l,
                t0 + SECOND * s as u32,
                &second(before, s * 1000),
                no_rollback,
            );
        }
        let TrainingOutcome::Swap(swap) = l.trained(Ok(candidate(0.90, Some(0.80)))) else {
            panic!("a better candidate is a swap");
        };
        let swapped_at = t0 + 5 * SECOND;
        l.swapped(swapped_at, &swap, Some(model(1)), true);
        assert!(l.on_probation());
        assert_eq!(l.reference_ba, Some(0.90));
        assert_eq!(l.events().swaps, 1);
        (l, swapped_at)
    }

    #[test]
    fn a_swap_that_does_as_well_live_stays() {
        let t0 = Instant::now();
        let good = matrix(90, 10, 480, 10);
        let (mut l, at) = swapped_learner(t0, good);
        for s in 1..=PROBATION_SECONDS as u64 {
            tick(
                &mut l,
                at + SECOND * s as u32,
                &second(good, 10_000 + s * 1000),
                no_rollback,
            );
        }
        assert!(
            !l.on_probation(),
            "probation ends after {PROBATION_SECONDS} s"
        );
        assert_eq!(l.reference_ba, Some(0.90));
    }

    #[test]
    fn a_swap_that_does_clearly_worse_live_is_rolled_back_after_its_probation() {
        let t0 = Instant::now();
        let (good, bad) = (matrix(90, 10, 480, 10), matrix(40, 100, 390, 60));
        let (mut l, at) = swapped_learner(t0, good);
        for s in 1..PROBATION_SECONDS as u64 {
            tick(
                &mut l,
                at + SECOND * s as u32,
                &second(bad, 10_000 + s * 1000),
                no_rollback,
            );
        }
        let mut back = None;
        tick(&mut l, at + 5 * SECOND, &second(bad, 20_000), |r| {
            back = Some((bias(&r.model), r.reason.clone()));
            true
        });
        let (previous, reason) = back.expect("rolled back once the probation ends");
        assert_eq!(previous, 1, "the previous model comes back");
        assert!(reason.contains("after the swap"), "{reason}");
        assert!(!l.on_probation());
        assert_eq!(l.reference_ba, Some(0.80), "its reference is back");
        assert_eq!(l.events().rollbacks, 1);
    }

    #[test]
    fn a_refused_rollback_keeps_the_swapped_in_model() {
        let t0 = Instant::now();
        let (good, bad) = (matrix(90, 10, 480, 10), matrix(40, 100, 390, 60));
        let (mut l, at) = swapped_learner(t0, good);
        for s in 1..=PROBATION_SECONDS as u64 {
            tick(
                &mut l,
                at + SECOND * s as u32,
                &second(bad, 10_000 + s * 1000),
                |_| false,
            );
        }
        assert_eq!(l.reference_ba, Some(0.90), "the serving model's reference");
        assert_eq!(l.events().rollbacks, 0);
    }

    #[test]
    fn probation_needs_evidence() {
        let mut p = Probation::new(model(1), 0.9, matrix(90, 10, 480, 10), Instant::now());
        p.after = matrix(88, 12, 478, 12);
        assert_eq!(p.judge(), None, "about as good: keep");
        p.after = matrix(40, 100, 390, 60);
        assert!(p.judge().is_some(), "clearly worse: roll back");
        p.after = matrix(1, 1, 1, 1);
        assert_eq!(p.judge(), None, "too little evidence");
    }

    /// Seconds `from..to` of `m`, ticked one by one; the drift reasons reported.
    fn seconds(
        l: &mut OnlineLearner,
        t0: Instant,
        from: u32,
        to: u32,
        m: ConfusionMatrix,
    ) -> Vec<(u32, String, bool)> {
        (from..to)
            .filter_map(|s| {
                let d = tick(
                    l,
                    t0 + SECOND * s,
                    &second(m, u64::from(s) * 10_000),
                    no_rollback,
                );
                d.drift.map(|r| (s, r, d.train.is_some()))
            })
            .collect()
    }

    // Balanced accuracy 0.94, 0.45 and 0.65, with 100 misses a second.
    const FINE: ConfusionMatrix = ConfusionMatrix {
        true_miss: 90,
        false_miss: 10,
        true_met: 480,
        false_met: 10,
    };
    const POOR: ConfusionMatrix = ConfusionMatrix {
        true_miss: 30,
        false_miss: 200,
        true_met: 300,
        false_met: 70,
    };
    const MEDIOCRE: ConfusionMatrix = ConfusionMatrix {
        true_miss: 60,
        false_miss: 150,
        true_met: 350,
        false_met: 40,
    };

    #[test]
    fn drift_is_judged_on_pooled_seconds_against_what_the_model_showed_live() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.min_records = 100_000; // never enough to train: drift is only reported
        let mut l = OnlineLearner::new(cfg, t0);
        l.accepted(0.90);
        let s = DRIFT_SECONDS as u32;
        assert!(seconds(&mut l, t0, 0, s - 1, FINE).is_empty());
        assert_eq!(l.live_reference(), None, "settling");
        assert!(seconds(&mut l, t0, s - 1, s, FINE).is_empty(), "it fits");
        assert!(l.live_reference().is_some_and(|r| (r - 0.94).abs() < 0.01));
        // One poor second among fine ones: the pool holds (0.875), no drift. Judged
        // second by second against the held-back 0.90, it was drift.
        assert!(seconds(&mut l, t0, s, 2 * s - 1, FINE).is_empty());
        assert!(seconds(&mut l, t0, 2 * s - 1, 2 * s, POOR).is_empty());
        // Poor for a whole pool: drift, reported once.
        let drifts = seconds(&mut l, t0, 2 * s, 4 * s, POOR);
        assert_eq!(drifts.len(), 1, "{drifts:?}");
        let (at, reason, train) = &drifts[0];
        assert!(
            *at < 3 * s,
            "reported as soon as the pool is poor (at {at})"
        );
        assert!(
            reason.contains("the model showed when it settled"),
            "{reason}"
        );
        assert!(!train, "not enough records to train");
        assert_eq!(l.events().drifts, 1);
    }

    #[test]
    fn a_model_that_settles_far_below_its_held_back_score_retrains_once() {
        let t0 = Instant::now();
        let mut l = OnlineLearner::new(config(), t0);
        l.accepted(0.90);
        let s = DRIFT_SECONDS as u32;
        let drifts = seconds(&mut l, t0, 0, s, MEDIOCRE);
        assert_eq!(drifts.len(), 1, "{drifts:?}");
        let (_, reason, train) = &drifts[0];
        assert!(reason.contains("held back"), "{reason}");
        assert!(*train, "retrains now (the period is an hour)");
        // The retrain finds nothing better: the model settles again at what it
        // does, and is not checked against its held-back score again.
        assert!(matches!(
            l.trained(Ok(candidate(0.60, Some(0.65)))),
            TrainingOutcome::Keep(_)
        ));
        assert_eq!(l.live_reference(), None);
        assert!(seconds(&mut l, t0, s, 4 * s, MEDIOCRE).is_empty());
        assert!(l.live_reference().is_some_and(|r| (r - 0.65).abs() < 0.01));
    }

    #[test]
    fn a_swapped_in_model_settles_after_its_probation() {
        let t0 = Instant::now();
        let (mut l, at) = swapped_learner(t0, FINE);
        let p = PROBATION_SECONDS as u32;
        // On probation: its seconds are the probation's, not the drift watch's.
        for i in 1..=p {
            tick(
                &mut l,
                at + SECOND * i,
                &second(FINE, u64::from(i) * 10_000),
                no_rollback,
            );
        }
        assert!(!l.on_probation());
        assert_eq!(l.live_reference(), None);
        let d = seconds(&mut l, at, p + 1, p + 1 + DRIFT_SECONDS as u32, FINE);
        assert!(d.is_empty(), "{d:?}");
        assert!(l.live_reference().is_some());
    }

    #[test]
    fn the_window_counts_its_misses_as_it_slides() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.every = SECOND;
        let mut l = OnlineLearner::new(cfg, t0);
        for batch in 0..7u64 {
            let recs: Vec<RequestRecord> = (0..333)
                .map(|i| rec((i + batch) % 5 == 0, batch * 1000 + i))
                .collect();
            l.observe(&recs);
            assert_eq!(
                l.window_misses,
                l.window.iter().filter(|r| r.deadline_missed()).count()
            );
        }
        assert_eq!(l.window_len(), 1000);
    }
}
