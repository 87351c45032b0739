//! Live calibration of a serving model's verdict threshold.
//!
//! A model's threshold is tuned on its training workloads' miss rates, and it does not
//! transfer: on a trace where most requests miss, a model that ranks requests well
//! (AUC 0.6–0.7) can still flag almost none of them (balanced accuracy near 50%).
//! The agent sees every request's outcome milliseconds after its dispatch, so it can
//! move the threshold of the model that serves, long before a retrain.
//!
//! The rule: keep the newest `window` labelled requests scored by the serving model,
//! as (margin, missed) pairs (the margin is [`QuantizedModel::margin`]: how far the
//! integer score is above the model's own limit; the verdict is `margin > 0`), and
//! move the limit by the integer `shift` that maximises balanced accuracy on them
//! (verdict: `margin > shift`), once both classes hold `min_per_class` requests.
//! Only records already labelled decide it, so a shift applied from now on was chosen
//! without looking at the requests it judges. [`with_threshold_shift`] gives the model
//! to install (one integer differs: the threshold). [`LiveCalibration`] is the run
//! loop's decision around it: when a new shift is worth installing.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use kml_ebpf_common::{features::FeatureVector, model::ACC_LIMIT};

use crate::metrics::{balanced_accuracy_standard_error, best_cut, ConfusionMatrix};
use crate::quantize::QuantizedModel;

/// How much labelled evidence moves the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalibrationConfig {
    /// Newest labelled requests the shift is chosen on.
    pub window: usize,
    /// Fewest misses and fewest met deadlines in the window before any shift.
    pub min_per_class: usize,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        CalibrationConfig {
            window: 20_000,
            min_per_class: 100,
        }
    }
}

/// The newest labelled (margin, missed) pairs of the serving model.
#[derive(Clone, Debug)]
pub struct ThresholdCalibrator {
    config: CalibrationConfig,
    window: VecDeque<(i64, bool)>,
    misses: usize,
}

impl ThresholdCalibrator {
    pub fn new(config: CalibrationConfig) -> Self {
        ThresholdCalibrator {
            window: VecDeque::with_capacity(config.window.min(1 << 20)),
            config,
            misses: 0,
        }
    }

    pub fn config(&self) -> CalibrationConfig {
        self.config
    }

    /// One labelled request: its margin under the serving model (at the model's
    /// own threshold) and whether it missed.
    pub fn observe(&mut self, margin: i64, missed: bool) {
        if self.config.window == 0 {
            return;
        }
        if self.window.len() == self.config.window {
            if let Some((_, m)) = self.window.pop_front() {
                self.misses -= m as usize;
            }
        }
        self.window.push_back((margin, missed));
        self.misses += missed as usize;
    }

    /// Forget everything: the serving model changed, its margins are not comparable.
    pub fn reset(&mut self) {
        self.window.clear();
        self.misses = 0;
    }

    pub fn len(&self) -> usize {
        self.window.len()
    }

    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// The window's (margin, missed) pairs, oldest first.
    pub fn pairs(&self) -> impl Iterator<Item = (i64, bool)> + '_ {
        self.window.iter().copied()
    }

    /// Misses and met deadlines in the window.
    pub fn classes(&self) -> (usize, usize) {
        (self.misses, self.window.len() - self.misses)
    }

    /// The shift to apply (verdict: `margin > shift`), or `None` while either class
    /// has fewer than `min_per_class` requests in the window.
    pub fn shift(&self) -> Option<i64> {
        let (misses, met) = self.classes();
        let min = self.config.min_per_class.max(1);
        if misses < min || met < min {
            return None;
        }
        let (margins, labels): (Vec<i64>, Vec<bool>) = self.window.iter().copied().unzip();
        Some(best_balanced_shift(&margins, &labels))
    }
}

/// The integer `t` (verdict: `margin > t`) that maximises balanced accuracy of
/// `margins` against `labels`; among equals the highest (fewest flags): the top
/// margin (flags nothing) when nothing does better than flagging nothing, and 0 (the
/// model's own threshold) with one class only, where the answer means nothing.
pub fn best_balanced_shift(margins: &[i64], labels: &[bool]) -> i64 {
    assert_eq!(margins.len(), labels.len());
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0;
    }
    let mut order: Vec<usize> = (0..margins.len()).collect();
    // Highest margin first: lowering t flags one more group of equal margins at a time.
    order.sort_unstable_by(|&a, &b| margins[b].cmp(&margins[a]));
    match best_cut(margins, labels, &order) {
        // Flag nothing: t at the top margin.
        None => margins[order[0]],
        // Between the lowest margin flagged and the next lower one.
        Some((m, Some(next))) => midpoint_below(m, next),
        Some((m, None)) => m.saturating_sub(1),
    }
}

/// An integer in `[lo, hi)` (the verdict `margin > t` flags `hi` and not `lo`),
/// halfway, without overflow.
fn midpoint_below(hi: i64, lo: i64) -> i64 {
    debug_assert!(hi > lo);
    let mid = (hi as i128 + lo as i128).div_euclid(2) as i64;
    mid.clamp(lo, hi - 1)
}

/// `base` with its verdict limit moved up by `shift` (the verdict becomes
/// `old margin > shift`); scores are unchanged. The threshold stays within what the
/// kernel accepts (a linear threshold below the accumulator limit, a tree's in i32),
/// so the model validates as before.
pub fn with_threshold_shift(base: &QuantizedModel, shift: i64) -> QuantizedModel {
    match base {
        QuantizedModel::Linear(m) => {
            let mut m = m.clone();
            let bound = ACC_LIMIT as i64 - 1;
            m.threshold = m.threshold.saturating_add(shift).clamp(-bound, bound);
            QuantizedModel::Linear(m)
        }
        QuantizedModel::Tree(m) => {
            let mut m = m.clone();
            let t = (m.threshold as i64).saturating_add(shift);
            m.threshold = t.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
            QuantizedModel::Tree(m)
        }
    }
}

// The run loop's decision around the calibrator: `kml-agent run` lives it, the
// `prequential` example of kml-agent replays it on a trace with the same policy.

/// How the run loop calibrates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CalibrationPolicy {
    pub window: CalibrationConfig,
    /// A new shift is installed only if it beats the installed one by this much
    /// balanced accuracy on the window, and by `min_gain_se` standard errors of a
    /// balanced accuracy measured on the window (with few misses in it, a gain of
    /// a point is noise: 280 misses in 20,000 give a standard error of 1.5 points).
    pub min_gain: f64,
    pub min_gain_se: f64,
    /// At most one install this often.
    pub every: Duration,
    /// Labelled requests a second scored for the window (one in
    /// `offered / samples_per_second` above that): the window fills in seconds,
    /// and the host's cost per second is bounded at any I/O rate.
    pub samples_per_second: u64,
}

impl Default for CalibrationPolicy {
    fn default() -> Self {
        CalibrationPolicy {
            window: CalibrationConfig::default(),
            min_gain: 0.005,
            min_gain_se: 1.0,
            every: Duration::from_secs(2),
            samples_per_second: 4096,
        }
    }
}

/// A shift worth installing, and what it is expected to do.
#[derive(Clone, Debug)]
pub struct Recalibration {
    pub model: QuantizedModel,
    pub shift: i64,
    /// Balanced accuracy on the window: at the installed shift, and at the new one.
    pub before: f64,
    pub after: f64,
    pub window: usize,
}

/// Seconds a race runs at least: its window then spans several seconds of the
/// workload (the first second alone fills it, before sampling strides), not one
/// phase of it.
pub const RACE_SECONDS: u32 = 5;

/// A race whose window still lacks a class (few misses, or none yet) waits for
/// them this long, then ends with the starting model.
pub const RACE_LIMIT_SECONDS: u32 = 120;

/// A model that could serve instead of the base (`run --model auto`'s other
/// choices).
pub struct Contender {
    pub name: String,
    pub model: QuantizedModel,
    /// Its held-back balanced accuracy from its file, handed back with a switch.
    pub held_back: Option<f64>,
}

/// A contender in a race: its margins on the same labelled requests as the base.
struct Racer {
    contender: Contender,
    calibrator: ThresholdCalibrator,
}

impl Racer {
    /// Its best shift on its window and the balanced accuracy there.
    fn best(&self) -> Option<(i64, f64)> {
        let shift = self.calibrator.shift()?;
        Some((shift, balanced_accuracy_of(&self.calibrator, shift)))
    }
}

/// How the race of `run --model auto` ended: every model at its own best
/// threshold on the same newest labelled requests.
pub struct RaceResult {
    /// (name, balanced accuracy at its best threshold, that shift), the serving
    /// base first.
    pub standings: Vec<(String, f64, i64)>,
    pub window: usize,
    /// The winner, when it beat the base by the gain a threshold must show.
    pub switch: Option<Switch>,
}

/// Serve another model: `model` (the contender with its best threshold) to
/// install, then [`LiveCalibration::switched`].
pub struct Switch {
    pub name: String,
    pub model: QuantizedModel,
    pub shift: i64,
    pub held_back: Option<f64>,
    racer: Racer,
}

impl Switch {
    /// The winner as it came, its threshold unmoved (`model` is it shifted).
    pub fn base(&self) -> &QuantizedModel {
        &self.racer.contender.model
    }
}

/// The serving model's base, its labelled margins, and the shift in force.
pub struct LiveCalibration {
    policy: CalibrationPolicy,
    base: Option<QuantizedModel>,
    calibrator: ThresholdCalibrator,
    /// The race of `run --model auto`, while it runs: the base's name and the
    /// other models, scored on the same requests.
    race: Option<(String, Vec<Racer>)>,
    race_seconds: u32,
    /// The shift the serving model carries (0: the base as it came).
    applied: i64,
    last_install: Option<Instant>,
    installs: u64,
    /// Sampling: requests offered, this second and in all; one in `stride` is scored.
    offered_this_second: u64,
    offered: u64,
    stride: u64,
}

impl LiveCalibration {
    pub fn new(policy: CalibrationPolicy) -> Self {
        LiveCalibration {
            calibrator: ThresholdCalibrator::new(policy.window),
            policy,
            base: None,
            race: None,
            race_seconds: 0,
            applied: 0,
            last_install: None,
            installs: 0,
            offered_this_second: 0,
            offered: 0,
            stride: 1,
        }
    }

    /// A model started serving that this calibration did not make (the starting
    /// model, a retrained candidate, a rollback): it becomes the base, and the old
    /// margins, on another scale, are forgotten.
    pub fn serving(&mut self, base: Option<QuantizedModel>) {
        self.base = base;
        self.calibrator.reset();
        self.applied = 0;
        // A race is between the model it started with and the others.
        self.race = None;
    }

    /// Races the base (named `base_name`) against `contenders` on the same
    /// labelled requests, once: when the window is full, [`Self::race_result`]
    /// names the model that does best at its own best threshold. What a model's
    /// held-back score on its training workloads says about a new workload is
    /// little (docs/learning.md, table D′: the model chosen by it ranked the
    /// held-out workloads' requests worse than another shipped model on three of
    /// five); its outcomes on this one say more.
    pub fn race(&mut self, base_name: String, contenders: Vec<Contender>) {
        // All on the same requests, from now on.
        self.calibrator.reset();
        let racers: Vec<Racer> = contenders
            .into_iter()
            .map(|contender| Racer {
                contender,
                calibrator: ThresholdCalibrator::new(self.policy.window),
            })
            .collect();
        self.race = (!racers.is_empty() && self.base.is_some()).then_some((base_name, racers));
        self.race_seconds = 0;
    }

    /// Whether a race runs.
    pub fn racing(&self) -> bool {
        self.race.is_some()
    }

    /// The race's end, once the window is full, [`RACE_SECONDS`] have passed and
    /// both classes are in it (or [`RACE_LIMIT_SECONDS`] have, without them): the
    /// standings, and the winner if it beats the base's best threshold by the gain
    /// a new threshold must show. The race ends here either way.
    pub fn race_result(&mut self) -> Option<RaceResult> {
        let window = self.calibrator.len();
        if self.race.is_none()
            || window < self.policy.window.window
            || self.race_seconds < RACE_SECONDS
        {
            return None;
        }
        let Some(base_shift) = self.calibrator.shift() else {
            // A class short (misses come in bursts, and may not have come yet):
            // wait for them, up to a limit.
            if self.race_seconds < RACE_LIMIT_SECONDS {
                return None;
            }
            self.race = None;
            return Some(RaceResult {
                standings: Vec::new(),
                window,
                switch: None,
            });
        };
        let (base_name, racers) = self.race.take()?;
        let base_best = self.balanced_accuracy_at(base_shift);
        let mut standings = vec![(base_name, base_best, base_shift)];
        let mut best: Option<(usize, i64, f64)> = None;
        for (i, r) in racers.iter().enumerate() {
            if let Some((shift, ba)) = r.best() {
                standings.push((r.contender.name.clone(), ba, shift));
                if best.is_none_or(|(_, _, b)| ba > b) {
                    best = Some((i, shift, ba));
                }
            }
        }
        let switch = best
            .filter(|&(_, _, ba)| ba >= base_best + self.required_gain())
            .map(|(i, shift, _)| {
                let racer = racers.into_iter().nth(i).expect("an index of them");
                Switch {
                    name: racer.contender.name.clone(),
                    model: with_threshold_shift(&racer.contender.model, shift),
                    shift,
                    held_back: racer.contender.held_back,
                    racer,
                }
            });
        Some(RaceResult {
            standings,
            window,
            switch,
        })
    }

    /// The kernel took the race's winner: it is the base now, with its shift,
    /// and its margins on the window (its own scale) are the window.
    pub fn switched(&mut self, s: Switch, now: Instant) {
        self.base = Some(s.racer.contender.model);
        self.calibrator = s.racer.calibrator;
        self.applied = s.shift;
        self.last_install = Some(now);
    }

    /// The shift the serving model carries.
    pub fn applied(&self) -> i64 {
        self.applied
    }

    /// One labelled request, scored by the base: its margin and its outcome (the
    /// tests feed margins by hand; the run loop offers records).
    #[cfg(test)]
    fn observe(&mut self, margin: i64, missed: bool) {
        if self.base.is_some() {
            self.calibrator.observe(margin, missed);
        }
    }

    /// One labelled request by its features: the base scores it, and every
    /// contender while a race runs.
    fn observe_features(&mut self, x: &FeatureVector, missed: bool) {
        if let Some(base) = &self.base {
            self.calibrator.observe(base.margin(x), missed);
        }
        if let Some((_, racers)) = &mut self.race {
            for r in racers {
                r.calibrator.observe(r.contender.model.margin(x), missed);
            }
        }
    }

    /// One labelled request as it arrives: scored when the sampling picks it
    /// (`features` is called only then).
    pub fn offer(&mut self, features: impl FnOnce() -> FeatureVector, missed: bool) {
        self.offered_this_second += 1;
        self.offered += 1;
        if self.offered.is_multiple_of(self.stride) {
            self.observe_features(&features(), missed);
        }
    }

    /// A second passed (the run loop's tick): the sampling stride follows the
    /// rate of the second that ended.
    pub fn second_passed(&mut self) {
        if self.race.is_some() {
            self.race_seconds += 1;
        }
        self.stride = (self.offered_this_second / self.policy.samples_per_second.max(1)).max(1);
        self.offered_this_second = 0;
    }

    /// Misses and met deadlines in the window.
    pub fn classes(&self) -> (usize, usize) {
        self.calibrator.classes()
    }

    /// A shift worth installing now, if any. The caller installs
    /// [`Recalibration::model`] and then calls [`LiveCalibration::installed`].
    pub fn decide(&self, now: Instant) -> Option<Recalibration> {
        let base = self.base.as_ref()?;
        if self
            .last_install
            .is_some_and(|at| now.duration_since(at) < self.policy.every)
        {
            return None;
        }
        let shift = self.calibrator.shift()?;
        if shift == self.applied {
            return None;
        }
        let (before, after) = (
            self.balanced_accuracy_at(self.applied),
            self.balanced_accuracy_at(shift),
        );
        if after < before + self.required_gain() {
            return None;
        }
        Some(Recalibration {
            model: with_threshold_shift(base, shift),
            shift,
            before,
            after,
            window: self.calibrator.len(),
        })
    }

    /// The kernel took `r`: it is the serving model now (its base unchanged).
    pub fn installed(&mut self, r: &Recalibration, now: Instant) {
        self.applied = r.shift;
        self.last_install = Some(now);
        self.installs += 1;
    }

    /// The kernel refused the recalibrated model: the shift in force stays, and
    /// the next try waits as after an install.
    pub fn refused(&mut self, now: Instant) {
        self.last_install = Some(now);
    }

    /// Recalibrated models the kernel took.
    pub fn installs(&self) -> u64 {
        self.installs
    }

    /// The gain a new shift must show: `min_gain`, or more when the window's
    /// balanced accuracy is uncertain.
    fn required_gain(&self) -> f64 {
        let (misses, met) = self.calibrator.classes();
        let se = balanced_accuracy_standard_error(misses as u64, met as u64);
        self.policy.min_gain.max(self.policy.min_gain_se * se)
    }

    fn balanced_accuracy_at(&self, shift: i64) -> f64 {
        balanced_accuracy_of(&self.calibrator, shift)
    }
}

/// Balanced accuracy of the verdict `margin > shift` on a calibrator's window.
fn balanced_accuracy_of(c: &ThresholdCalibrator, shift: i64) -> f64 {
    ConfusionMatrix::from_pairs(c.pairs().map(|(m, l)| (m > shift, l))).balanced_accuracy()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::{
        features::{Feature, FeatureVector, NUM_FEATURES},
        model::{LinearModel, ModelKind, TreeModel, TREE_LEAF},
    };

    fn ba(margins: &[i64], labels: &[bool], t: i64) -> f64 {
        crate::ConfusionMatrix::from_pairs(margins.iter().zip(labels).map(|(&m, &l)| (m > t, l)))
            .balanced_accuracy()
    }

    /// Every threshold that can matter: the verdicts only change at a margin, so
    /// each margin and the integer below it cover every integer threshold.
    fn brute_best(margins: &[i64], labels: &[bool]) -> f64 {
        margins
            .iter()
            .flat_map(|&m| [m, m.saturating_sub(1)])
            .map(|t| ba(margins, labels, t))
            .fold(0.0, f64::max)
    }

    #[test]
    fn the_shift_is_the_best_integer_threshold() {
        // A shifted model: misses sit at margins -40..-20, met at -90..-30.
        let margins: Vec<i64> = (0..50)
            .map(|i| -40 + (i % 21))
            .chain((0..50).map(|i| -90 + (i % 61)))
            .collect();
        let labels: Vec<bool> = (0..100).map(|i| i < 50).collect();
        let t = best_balanced_shift(&margins, &labels);
        assert!(t < 0, "the model's own threshold (0) flags nothing: {t}");
        assert!((ba(&margins, &labels, t) - brute_best(&margins, &labels)).abs() < 1e-12);
        assert!(ba(&margins, &labels, t) > ba(&margins, &labels, 0) + 0.2);
        // Separable: the threshold separates exactly.
        let t = best_balanced_shift(&[5, 6, 10, 11], &[false, false, true, true]);
        assert!((6..10).contains(&t), "{t}");
        // Inverted ranking: flagging nothing is best, the shift leaves nothing flagged.
        let t = best_balanced_shift(&[10, 11, 1, 2], &[false, false, true, true]);
        assert!(t >= 11, "{t}");
        // One class: no change.
        assert_eq!(best_balanced_shift(&[1, 2], &[true, true]), 0);
    }

    #[test]
    fn shift_matches_brute_force_on_random_data() {
        // A small LCG: margins with ties and extremes, labels correlated with them.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        };
        for round in 0..200 {
            let n = 1 + (next() % 60) as usize;
            let spread = [3i64, 50, 1_000_000][round % 3];
            let margins: Vec<i64> = (0..n)
                .map(|_| (next() as i64 % (2 * spread + 1)) - spread)
                .collect();
            let labels: Vec<bool> = margins
                .iter()
                .map(|&m| (next() % 100) < if m > 0 { 70 } else { 30 })
                .collect();
            if labels.iter().all(|&l| l) || labels.iter().all(|&l| !l) {
                continue;
            }
            let t = best_balanced_shift(&margins, &labels);
            assert!(
                (ba(&margins, &labels, t) - brute_best(&margins, &labels)).abs() < 1e-12,
                "round {round}: t {t} margins {margins:?} labels {labels:?}"
            );
        }
    }

    #[test]
    fn extreme_margins_do_not_overflow() {
        let t = best_balanced_shift(&[i64::MAX, i64::MIN], &[true, false]);
        assert!(t < i64::MAX);
        assert_eq!(ba(&[i64::MAX, i64::MIN], &[true, false], t), 1.0);
    }

    #[test]
    fn calibrator_waits_for_both_classes_and_slides() {
        let mut c = ThresholdCalibrator::new(CalibrationConfig {
            window: 100,
            min_per_class: 10,
        });
        for i in 0..200 {
            c.observe(i, false);
        }
        assert_eq!(c.len(), 100, "the window keeps the newest only");
        assert_eq!(c.shift(), None, "no misses: nothing to calibrate on");
        for _ in 0..9 {
            c.observe(500, true);
        }
        assert_eq!(c.shift(), None, "9 misses < 10");
        c.observe(500, true);
        assert_eq!(c.classes(), (10, 90));
        // Misses at 500, met at 110..199: flag 500, not the met ones.
        let t = c.shift().unwrap();
        assert!((199..500).contains(&t), "{t}");
        // The misses slide out again.
        for i in 0..100 {
            c.observe(i, false);
        }
        assert_eq!(c.classes(), (0, 100));
        assert_eq!(c.shift(), None);
        c.reset();
        assert!(c.is_empty());
    }

    fn linear() -> QuantizedModel {
        let mut m = LinearModel::zeroed();
        m.kind = ModelKind::Logistic as u32;
        m.rule = ModelKind::Logistic.verdict_rule() as u32;
        m.out_shift = 8;
        let j = Feature::QueuedSameDir.index();
        m.weight[j] = 256;
        m.input_max[j] = 1000;
        m.threshold = 10 << 8;
        QuantizedModel::Linear(Box::new(m))
    }

    #[test]
    fn a_shifted_model_flags_exactly_margin_above_shift() {
        let tree = {
            let mut t = TreeModel::zeroed();
            let j = Feature::QueuedSameDir.index();
            t.node_count = 3;
            t.depth = 1;
            t.feature[0] = j as u8;
            t.split[0] = 20;
            t.left[0] = 1;
            t.right[0] = 2;
            t.feature[1] = TREE_LEAF;
            t.feature[2] = TREE_LEAF;
            t.value[1] = 1000;
            t.value[2] = 50_000;
            t.threshold = 60_000;
            QuantizedModel::Tree(Box::new(t))
        };
        for base in [linear(), tree] {
            for shift in [-20_000i64, -3000, -1, 0, 1, 700, 20_000] {
                let shifted = with_threshold_shift(&base, shift);
                for q in [0, 5, 9, 10, 11, 15, 20, 21, 40, 1000] {
                    let mut x: FeatureVector = [0; NUM_FEATURES];
                    x[Feature::QueuedSameDir.index()] = q;
                    assert_eq!(shifted.infer(&x).score, base.infer(&x).score);
                    assert_eq!(
                        shifted.infer(&x).at_risk,
                        base.margin(&x) > shift,
                        "shift {shift} queued {q}"
                    );
                }
            }
        }
        // Far beyond the kernel's limits: clamped, still a valid model.
        match with_threshold_shift(&linear(), i64::MAX) {
            QuantizedModel::Linear(m) => {
                assert!(m.validate().is_ok());
                assert_eq!(m.threshold, ACC_LIMIT as i64 - 1);
            }
            _ => unreachable!(),
        }
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;
    use kml_ebpf_common::model::LinearModel;

    /// A model whose threshold is `limit` (the margins are fed by hand).
    fn base(limit: i64) -> QuantizedModel {
        let mut m = LinearModel::zeroed();
        m.threshold = limit;
        QuantizedModel::Linear(Box::new(m))
    }

    fn threshold(m: &QuantizedModel) -> i64 {
        match m {
            QuantizedModel::Linear(m) => m.threshold,
            QuantizedModel::Tree(m) => m.threshold as i64,
        }
    }

    fn policy() -> CalibrationPolicy {
        CalibrationPolicy {
            window: CalibrationConfig {
                window: 1000,
                min_per_class: 10,
            },
            min_gain: 0.01,
            min_gain_se: 0.0,
            every: Duration::from_secs(2),
            samples_per_second: 100,
        }
    }

    /// Misses at margins -40..-21, met deadlines at -90..-51: the base (limit 0)
    /// flags nothing; a shift into (-51, -40) separates them.
    fn feed(c: &mut LiveCalibration, n: i64) {
        for i in 0..n {
            c.observe(-40 - (i % 20), true);
            c.observe(-90 + (i % 40), false);
        }
    }

    #[test]
    fn a_model_that_flags_nothing_is_moved_to_the_best_threshold() {
        let t0 = Instant::now();
        let mut c = LiveCalibration::new(policy());
        c.serving(Some(base(0)));
        feed(&mut c, 5);
        assert!(c.decide(t0).is_none(), "fewer than 10 of a class");
        feed(&mut c, 20);
        let r = c.decide(t0).expect("a better shift");
        assert!(
            r.shift < 0,
            "the base flags nothing; the shift lowers it: {}",
            r.shift
        );
        assert!(r.after > 0.99 && (r.before - 0.5).abs() < 1e-9, "{r:?}");
        // The installed model differs from the base in its threshold only.
        assert_eq!(threshold(&r.model), r.shift);
        c.installed(&r, t0);
        assert_eq!(c.applied(), r.shift);
        // Same evidence: nothing more to do, now or later.
        assert!(c.decide(t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn requests_are_scored_by_the_base_from_their_features() {
        use kml_ebpf_common::features::{Feature, FeatureVector, NUM_FEATURES};
        // margin = dir_wait_log - 1000: misses at 600..699, met at 100..199.
        let mut m = LinearModel::zeroed();
        m.rule = kml_ebpf_common::model::VerdictRule::ScoreOverThreshold as u32;
        let f = Feature::DirWaitLog as usize;
        m.weight[f] = 1;
        m.input_max[f] = 4096;
        m.threshold = 1000;
        let mut c = LiveCalibration::new(policy());
        c.serving(Some(QuantizedModel::Linear(Box::new(m))));
        let x = |v: i32| -> FeatureVector {
            let mut x = [0; NUM_FEATURES];
            x[f] = v;
            x
        };
        for i in 0..100 {
            c.observe_features(&x(600 + i), true);
            c.observe_features(&x(100 + i), false);
        }
        assert_eq!(c.classes(), (100, 100));
        let r = c.decide(Instant::now()).expect("the base flags nothing");
        assert!((-801..-400).contains(&r.shift), "{}", r.shift);
        assert!(r.after > 0.999, "{r:?}");
    }

    /// margin = `feature` - 1000: a model that reads one feature.
    fn reads(feature: kml_ebpf_common::features::Feature) -> QuantizedModel {
        let mut m = LinearModel::zeroed();
        m.rule = kml_ebpf_common::model::VerdictRule::ScoreOverThreshold as u32;
        m.weight[feature as usize] = 1;
        m.input_max[feature as usize] = 4096;
        m.threshold = 1000;
        QuantizedModel::Linear(Box::new(m))
    }

    /// `n` misses and `n` met deadlines: queued-same-direction tells them apart
    /// (misses at 600.., met at 100..), dir-wait-log does not (the same spread).
    fn race_feed(c: &mut LiveCalibration, n: i32) {
        use kml_ebpf_common::features::{Feature, NUM_FEATURES};
        let x = |queued: i32, wait: i32| {
            let mut x = [0; NUM_FEATURES];
            x[Feature::QueuedSameDir as usize] = queued;
            x[Feature::DirWaitLog as usize] = wait;
            x
        };
        for i in 0..n {
            c.offer(|| x(600 + i % 100, 100 + i % 200), true);
            c.offer(|| x(100 + i % 100, 100 + (i + 50) % 200), false);
        }
    }

    fn racing(base_feature: Feature, contender_feature: Feature) -> LiveCalibration {
        let mut c = LiveCalibration::new(policy());
        c.serving(Some(reads(base_feature)));
        c.race(
            "base".into(),
            vec![Contender {
                name: "contender".into(),
                model: reads(contender_feature),
                held_back: Some(0.8),
            }],
        );
        // Its seconds, before any offer (the sampling stays at every request).
        for _ in 0..RACE_SECONDS {
            c.second_passed();
        }
        c
    }

    use kml_ebpf_common::features::Feature;

    #[test]
    fn a_race_switches_to_the_model_that_separates_this_workload() {
        let t0 = Instant::now();
        let mut c = racing(Feature::DirWaitLog, Feature::QueuedSameDir);
        assert!(c.racing());
        race_feed(&mut c, 400);
        assert!(c.race_result().is_none(), "the window is not full");
        let mut early = racing(Feature::DirWaitLog, Feature::QueuedSameDir);
        early.race_seconds = RACE_SECONDS - 1;
        race_feed(&mut early, 500);
        assert!(early.race_result().is_none(), "too early");
        race_feed(&mut c, 100);
        let r = c.race_result().expect("a full window ends the race");
        assert!(!c.racing(), "once");
        assert_eq!(r.window, 1000);
        assert_eq!(r.standings[0].0, "base");
        assert!(r.standings[0].1 < 0.8, "{:?}", r.standings);
        assert!(r.standings[1].1 > 0.999, "{:?}", r.standings);
        let s = r
            .switch
            .expect("the contender separates, the base does not");
        assert_eq!((s.name.as_str(), s.held_back), ("contender", Some(0.8)));
        assert!((-801..-400).contains(&s.shift), "{}", s.shift);
        assert_eq!(threshold(&s.model), 1000 + s.shift);
        c.switched(s, t0);
        // The winner is the base now, its margins the window: calibration goes on
        // from its shift (nothing better to do on the same evidence).
        assert!((-801..-400).contains(&c.applied()));
        assert_eq!(c.classes(), (500, 500));
        assert!(c.decide(t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn a_race_the_base_wins_changes_nothing() {
        let mut c = racing(Feature::QueuedSameDir, Feature::DirWaitLog);
        race_feed(&mut c, 500);
        let r = c.race_result().expect("ended");
        assert!(r.switch.is_none(), "{:?}", r.standings);
        assert!(!c.racing());
        // The base still calibrates as before.
        assert!(c.decide(Instant::now()).is_some_and(|d| d.after > 0.999));
    }

    #[test]
    fn a_race_waits_for_both_classes_up_to_a_limit() {
        use kml_ebpf_common::features::NUM_FEATURES;
        let mut c = racing(Feature::DirWaitLog, Feature::QueuedSameDir);
        for _ in 0..1000 {
            c.offer(|| [0; NUM_FEATURES], false);
        }
        assert!(c.race_result().is_none(), "no miss yet: it waits");
        assert!(c.racing());
        // The misses come: the race is run on them.
        race_feed(&mut c, 500);
        assert!(c.race_result().is_some_and(|r| r.switch.is_some()));
        // None ever comes: it ends at the limit, the starting model staying.
        let mut c = racing(Feature::DirWaitLog, Feature::QueuedSameDir);
        for _ in 0..1000 {
            c.offer(|| [0; NUM_FEATURES], false);
        }
        c.race_seconds = RACE_LIMIT_SECONDS;
        let r = c.race_result().expect("ended at the limit");
        assert!(r.switch.is_none() && r.standings.is_empty());
        assert!(!c.racing());
    }

    #[test]
    fn a_new_serving_model_ends_the_race() {
        let mut c = racing(Feature::DirWaitLog, Feature::QueuedSameDir);
        race_feed(&mut c, 200);
        c.serving(Some(reads(Feature::DirWaitLog)));
        assert!(!c.racing());
        race_feed(&mut c, 500);
        assert!(c.race_result().is_none());
    }

    #[test]
    fn offers_above_the_sample_rate_are_strided() {
        let mut c = LiveCalibration::new(policy());
        c.serving(Some(base(0)));
        let x = [0; kml_ebpf_common::features::NUM_FEATURES];
        let mut scored = 0;
        // First second: every offer is scored (stride 1).
        for _ in 0..1000 {
            c.offer(
                || {
                    scored += 1;
                    x
                },
                false,
            );
        }
        assert_eq!((scored, c.classes()), (1000, (0, 1000)));
        // 1000 offers a second at 100 samples a second: one in ten from now on.
        c.second_passed();
        scored = 0;
        for _ in 0..1000 {
            c.offer(
                || {
                    scored += 1;
                    x
                },
                true,
            );
        }
        assert_eq!(scored, 100);
        assert_eq!(c.classes().0, 100);
    }

    /// A calibration whose first shift (from `feed`) is installed at `t0`.
    fn installed_once(t0: Instant) -> (LiveCalibration, Recalibration) {
        let mut c = LiveCalibration::new(policy());
        c.serving(Some(base(0)));
        feed(&mut c, 25);
        let r = c.decide(t0).expect("the base flags nothing");
        c.installed(&r, t0);
        (c, r)
    }

    #[test]
    fn installs_are_spaced_and_need_a_real_gain() {
        let t0 = Instant::now();
        let (mut c, r) = installed_once(t0);
        // The workload changes: the whole window now has misses at 100..199 and
        // met deadlines at 0..99, which the installed shift flags alike.
        for i in 0..500 {
            c.observe(100 + i % 100, true);
            c.observe(i % 100, false);
        }
        assert!(
            c.decide(t0 + Duration::from_secs(1)).is_none(),
            "within `every`"
        );
        let r2 = c
            .decide(t0 + Duration::from_secs(3))
            .expect("a new best, past `every`");
        assert_eq!(r2.shift, 99);
        assert!((r2.before - 0.5).abs() < 1e-9 && r2.after > 0.999, "{r2:?}");
        assert_ne!(r2.shift, r.shift);
        c.installed(&r2, t0 + Duration::from_secs(3));
        // Evidence that gains less than `min_gain` over the shift in force: no install.
        c.observe(99, true);
        assert!(c.decide(t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn a_gain_within_the_windows_noise_is_not_installed() {
        // 20 misses, 980 met. The base (limit 0) catches 10 of the misses and
        // flags nothing else (BA 0.75); a lower threshold catches 2 more at the
        // cost of 20 false alarms (BA 0.79): a gain of 4 points, below one
        // standard error of the window (0.25·√(1/20 + 1/980) = 5.6 points).
        let feed = |c: &mut LiveCalibration| {
            for i in 0..20 {
                c.observe(
                    if i < 10 {
                        50
                    } else if i < 12 {
                        -5
                    } else {
                        -50
                    },
                    true,
                );
            }
            for i in 0..980 {
                c.observe(if i < 20 { -5 } else { -50 }, false);
            }
        };
        let t0 = Instant::now();
        let mut strict = LiveCalibration::new(CalibrationPolicy {
            min_gain_se: 1.0,
            ..policy()
        });
        strict.serving(Some(base(0)));
        feed(&mut strict);
        assert!(strict.decide(t0).is_none());
        let mut lax = LiveCalibration::new(policy());
        lax.serving(Some(base(0)));
        feed(&mut lax);
        let r = lax.decide(t0).expect("without the noise rule it moves");
        assert!(
            r.after - r.before > 0.03 && r.after - r.before < 0.056,
            "{r:?}"
        );
    }

    #[test]
    fn a_new_base_forgets_the_old_margins_and_shift() {
        let t0 = Instant::now();
        let (mut c, _) = installed_once(t0);
        c.serving(Some(base(7)));
        assert_eq!(c.applied(), 0);
        assert_eq!(c.classes(), (0, 0));
        assert!(c.decide(t0 + Duration::from_secs(10)).is_none());
        // No model serving: nothing is kept.
        c.serving(None);
        feed(&mut c, 25);
        assert_eq!(c.classes(), (0, 0));
        assert!(c.decide(t0 + Duration::from_secs(20)).is_none());
    }
}
