//! Training end to end: time split, fit, quantise, check the quantised model on
//! held-back data, evaluate (with the KML baseline beside it).
//!
//! ```text
//! trace, insert-time order:  |<------- train_fraction ------->|<--- test --->|
//!                            |<--- fit --->|<- tune_fraction ->|
//! ```
//! The model is fitted on `fit`, its verdict threshold chosen on `tune` (both before
//! the test window), and it is judged on `test`, which it has never seen.

use std::time::Instant;

use kml_ebpf_common::{features::Feature, features::KML_BASELINE_FEATURES, model::ModelKind};
use serde::{Deserialize, Serialize};

use crate::{
    dataset::{DataDescription, Dataset},
    error::{LearnError, Result},
    evaluate::{evaluate, Evaluation},
    float_model::FloatModel,
    metrics::ThresholdGoal,
    progress::Progress,
    quantize::{quantize, QuantizedModel},
    trainers::{all_features, DelayRegressionParams, LogisticParams, TreeParams},
};

/// Largest drop of balanced accuracy from float to quantised model that is accepted.
pub const MAX_QUANTIZATION_LOSS: f64 = 0.005;

/// What to train, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    pub kind: ModelKind,
    /// `None`: every feature, the best choice for later I/O of the same workload
    /// (online learning); [`crate::trainers::PORTABLE_FEATURES`] generalise better
    /// to other workloads. The baseline always uses KML's two.
    pub features: Option<Vec<Feature>>,
    /// Share of the trace (by insert time) used for training; the rest is held back.
    pub train_fraction: f64,
    /// Share of the training window, at its end, used to tune the verdict threshold.
    pub tune_fraction: f64,
    pub tune_threshold: bool,
    /// What the tuned threshold aims at: balanced accuracy (a verdict that is
    /// counted) or the share of misses flagged (a verdict that acts).
    pub threshold_goal: ThresholdGoal,
    pub tree_max_depth: usize,
    pub tree_min_samples_leaf: usize,
    pub tree_max_samples: usize,
    pub logistic_max_iterations: u64,
    pub logistic_alpha: f64,
    /// Also train KML's baseline on the same windows and report it beside.
    pub compare_baseline: bool,
    /// Free text kept in the model file (fio job, device, expiries…).
    pub workload: Option<String>,
    /// Several traces: thin each one's fit and tune windows to within 2x of the
    /// smallest one's ([`Dataset::thin_to_smallest`]), so that every workload
    /// weighs about the same, not in proportion to its request rate.
    pub balance_traces: bool,
}

impl TrainOptions {
    pub fn new(kind: ModelKind) -> Self {
        TrainOptions {
            kind,
            features: None,
            train_fraction: 0.7,
            tune_fraction: 0.2,
            tune_threshold: true,
            threshold_goal: ThresholdGoal::Balanced,
            tree_max_depth: 6,
            tree_min_samples_leaf: 50,
            tree_max_samples: 50_000,
            logistic_max_iterations: 5,
            logistic_alpha: 1e-3,
            compare_baseline: true,
            workload: None,
            balance_traces: false,
        }
    }

    /// The features the model is trained on.
    pub fn feature_set(&self) -> Vec<Feature> {
        match (self.kind, &self.features) {
            (ModelKind::Baseline, _) => KML_BASELINE_FEATURES.to_vec(),
            (_, Some(f)) => f.clone(),
            (_, None) => all_features(),
        }
    }
}

/// How a model was trained: kept in its model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    pub workload: Option<String>,
    /// The whole training window (fit + tune).
    pub data: DataDescription,
    pub fit_records: usize,
    pub tune_records: usize,
    pub train_fraction: f64,
    pub tune_fraction: f64,
    pub threshold_tuned: bool,
    /// What the tuned threshold aimed at (absent: balanced accuracy, as in files
    /// written before the choice existed).
    #[serde(default, skip_serializing_if = "ThresholdGoal::is_balanced")]
    pub threshold_goal: ThresholdGoal,
    /// Wall time of fitting and tuning (not reading the trace), seconds.
    pub train_seconds: f64,
    pub trained_by: String,
}

/// A trained model in both forms, with what is known about it.
#[derive(Clone, Debug)]
pub struct TrainedModel {
    pub float: FloatModel,
    pub quantized: QuantizedModel,
    pub training: TrainingInfo,
    /// On the held-back (later) window of the training trace.
    pub test: Option<Evaluation>,
    /// KML's baseline trained on the same windows, on the same held-back window.
    pub baseline_test: Option<Evaluation>,
    /// That baseline, to evaluate beside the model on other data.
    pub baseline: Option<(FloatModel, QuantizedModel)>,
}

fn fit_float(
    kind: ModelKind,
    opts: &TrainOptions,
    fit: &Dataset,
    tune: &Dataset,
    progress: &Progress,
) -> Result<FloatModel> {
    let features = opts.feature_set();
    Ok(match kind {
        ModelKind::Baseline => {
            FloatModel::Linear(DelayRegressionParams::kml_baseline().fit(fit, tune, progress)?)
        }
        ModelKind::LinearRegression => FloatModel::Linear(
            DelayRegressionParams::new(features)
                .tune_threshold(opts.tune_threshold)
                .threshold_goal(opts.threshold_goal)
                .fit(fit, tune, progress)?,
        ),
        ModelKind::Logistic => FloatModel::Linear(
            LogisticParams::new(features)
                .alpha(opts.logistic_alpha)
                .max_iterations(opts.logistic_max_iterations)
                .tune_threshold(opts.tune_threshold)
                .threshold_goal(opts.threshold_goal)
                .fit(fit, tune, progress)?,
        ),
        ModelKind::Tree => FloatModel::Tree(
            TreeParams::new(features)
                .max_depth(opts.tree_max_depth)
                .min_samples_leaf(opts.tree_min_samples_leaf)
                .max_samples(opts.tree_max_samples)
                .tune_threshold(opts.tune_threshold)
                .threshold_goal(opts.threshold_goal)
                .fit(fit, tune, progress)?,
        ),
    })
}

/// Trains, quantises and checks one model on `data` (split by time as in the module
/// doc). Refuses the model when quantisation costs more than half a point of
/// balanced accuracy on held-back data.
pub fn train(data: &Dataset, opts: &TrainOptions, progress: &Progress) -> Result<TrainedModel> {
    train_many(std::slice::from_ref(data), opts, progress)
}

/// The time split of one trace: (fit, tune, test) windows, in that order in time.
pub fn split_windows(data: &Dataset, opts: &TrainOptions) -> Result<(Dataset, Dataset, Dataset)> {
    let fractions_ok = 0.0 < opts.train_fraction
        && opts.train_fraction <= 1.0
        && (0.0..1.0).contains(&opts.tune_fraction);
    if !fractions_ok {
        return Err(LearnError::NotEnoughData {
            what: "time split".into(),
            message: format!(
                "train fraction {} must be in (0, 1] and tune fraction {} in [0, 1)",
                opts.train_fraction, opts.tune_fraction
            ),
        });
    }
    let (train_window, test) = data.split_by_time(opts.train_fraction);
    let (fit, tune) = if tuning(opts) {
        train_window.split_by_time(1.0 - opts.tune_fraction)
    } else {
        // The whole train window fits (moved, not copied: it can be 100 MB).
        let tune = train_window.window_fraction(1.0, 1.0);
        (train_window, tune)
    };
    Ok((fit, tune, test))
}

/// The baseline keeps KML's plain verdict: nothing to tune, so it fits on it all.
fn tuning(opts: &TrainOptions) -> bool {
    opts.tune_threshold && opts.kind != ModelKind::Baseline && opts.tune_fraction > 0.0
}

/// Trains one model on several traces (e.g. several workloads): each trace is split
/// by time as [`train`] splits one, and the fit, tune and test windows of all of
/// them are joined. The held-back evaluation is on the joined test windows.
pub fn train_many(
    datasets: &[Dataset],
    opts: &TrainOptions,
    progress: &Progress,
) -> Result<TrainedModel> {
    let mut parts = (Vec::new(), Vec::new(), Vec::new());
    for d in datasets {
        let (fit, tune, test) = split_windows(d, opts)?;
        parts.0.push(fit);
        parts.1.push(tune);
        parts.2.push(test);
    }
    if opts.balance_traces {
        // The held-back windows stay whole: they judge, they do not weigh.
        Dataset::thin_to_smallest(&mut parts.0);
        Dataset::thin_to_smallest(&mut parts.1);
    }
    let (fit, tune, test) = (
        Dataset::join(parts.0),
        Dataset::join(parts.1),
        Dataset::join(parts.2),
    );
    train_on_windows(&fit, &tune, &test, opts, progress)
}

/// Trains on `fit`, tunes the threshold on `tune`, quantises, and checks and
/// evaluates on `test` (else `tune`).
pub fn train_on_windows(
    fit: &Dataset,
    tune: &Dataset,
    test: &Dataset,
    opts: &TrainOptions,
    progress: &Progress,
) -> Result<TrainedModel> {
    let tuning = tuning(opts) && !tune.is_empty();
    progress.step(format_args!(
        "{} model: fit on {} requests, tune on {}, test on {} (miss rate {:.1}% / {:.1}% / {:.1}%)",
        opts.kind.name(),
        fit.len(),
        tune.len(),
        test.len(),
        100.0 * fit.miss_rate(),
        100.0 * tune.miss_rate(),
        100.0 * test.miss_rate()
    ));

    // The default set (`all`) leaves out a feature these windows do not carry; a
    // set asked for by name must be carried by every record.
    let carried;
    let opts = if opts.features.is_none() && opts.kind != ModelKind::Baseline {
        let all = all_features();
        let (keep, left_out): (Vec<Feature>, Vec<Feature>) = all
            .into_iter()
            .partition(|&f| [fit, tune, test].iter().all(|d| d.records_without(f) == 0));
        for f in &left_out {
            progress.step(format_args!(
                "{} left out: not recorded in these traces",
                f.name()
            ));
        }
        carried = TrainOptions {
            features: Some(keep),
            ..opts.clone()
        };
        &carried
    } else {
        let features = opts.feature_set();
        for d in [fit, tune, test] {
            d.check_carries(&features)?;
        }
        opts
    };

    let started = Instant::now();
    let float = fit_float(opts.kind, opts, fit, tune, progress)?;
    let train_seconds = started.elapsed().as_secs_f64();
    progress.step(format_args!("trained in {train_seconds:.3}s; quantising"));
    let quantized = quantize(&float)?;

    // The check on held-back data: the test window, else the tune window.
    let held_back = if !test.is_empty() { test } else { tune };
    let test_eval = (!held_back.is_empty()).then(|| evaluate(&float, &quantized, held_back));
    if let Some(e) = &test_eval {
        if e.quantized.balanced_accuracy < e.float.balanced_accuracy - MAX_QUANTIZATION_LOSS {
            return Err(LearnError::QuantizationLoss {
                kind: opts.kind.name(),
                float: e.float.balanced_accuracy,
                quantized: e.quantized.balanced_accuracy,
            });
        }
    }

    let train_window = Dataset::concat(&[fit.clone(), tune.clone()]);
    let baseline =
        if opts.compare_baseline && opts.kind != ModelKind::Baseline && !held_back.is_empty() {
            progress.step("training KML's baseline on the same windows for comparison");
            let base = fit_float(
                ModelKind::Baseline,
                opts,
                &train_window,
                tune,
                &Progress::silent(),
            )?;
            let base_q = quantize(&base)?;
            Some((base, base_q))
        } else {
            None
        };
    let baseline_test = baseline.as_ref().map(|(f, q)| evaluate(f, q, held_back));

    Ok(TrainedModel {
        float,
        quantized,
        training: TrainingInfo {
            workload: opts.workload.clone(),
            data: train_window.describe(),
            fit_records: fit.len(),
            tune_records: tune.len(),
            train_fraction: opts.train_fraction,
            tune_fraction: if tuning { opts.tune_fraction } else { 0.0 },
            threshold_tuned: tuning,
            threshold_goal: if tuning {
                opts.threshold_goal
            } else {
                ThresholdGoal::Balanced
            },
            train_seconds,
            trained_by: concat!("kml-learn ", env!("CARGO_PKG_VERSION")).into(),
        },
        test: test_eval,
        baseline_test,
        baseline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticTrace;

    #[test]
    fn balanced_traces_weigh_alike_and_keep_every_held_back_request() {
        let big = Dataset::from_records(SyntheticTrace::new(3).records(40_000), "big");
        let small = Dataset::from_records(SyntheticTrace::new(4).records(10_000), "small");
        let traces = [big, small];
        let mut opts = TrainOptions::new(ModelKind::Logistic);
        let plain = train_many(&traces, &opts, &Progress::silent()).unwrap();
        opts.balance_traces = true;
        let balanced = train_many(&traces, &opts, &Progress::silent()).unwrap();
        // Fit 0.7 × 0.8 and tune 0.7 × 0.2 of each: 22,400 + 5,600 and 5,600 +
        // 1,400 requests; balanced, the big trace's every 4th.
        assert_eq!(plain.training.fit_records, 22_400 + 5_600);
        assert_eq!(balanced.training.fit_records, 5_600 + 5_600);
        assert_eq!(plain.training.tune_records, 5_600 + 1_400);
        assert_eq!(balanced.training.tune_records, 1_400 + 1_400);
        // The held-back windows judge; they are not thinned.
        let held = |m: &TrainedModel| m.test.as_ref().unwrap().data.records;
        assert_eq!(held(&plain), 12_000 + 3_000);
        assert_eq!(held(&balanced), held(&plain));
    }

    #[test]
    fn every_kind_trains_quantises_and_beats_chance() {
        let data = Dataset::from_records(SyntheticTrace::new(11).records(20_000), "synthetic");
        for kind in ModelKind::ALL {
            let mut opts = TrainOptions::new(kind);
            opts.tree_max_samples = 10_000;
            let m = train(&data, &opts, &Progress::silent()).unwrap();
            let test = m.test.as_ref().unwrap();
            assert_eq!(test.data.records, 6000);
            assert!(
                test.quantized.balanced_accuracy
                    >= test.float.balanced_accuracy - MAX_QUANTIZATION_LOSS,
                "{kind:?}: {test:?}"
            );
            assert!(
                test.agreement > 0.99,
                "{kind:?} agreement {}",
                test.agreement
            );
            if kind != ModelKind::Baseline {
                assert!(
                    test.float.balanced_accuracy > 0.6,
                    "{kind:?}: {:?}",
                    test.float
                );
                assert!(m.baseline_test.is_some());
            }
            assert_eq!(m.float.kind(), kind);
        }
    }

    #[test]
    fn miss_recall_goal_flags_the_misses_it_was_asked_for() {
        let data = Dataset::from_records(SyntheticTrace::new(5).records(20_000), "synthetic");
        for kind in [
            ModelKind::Logistic,
            ModelKind::Tree,
            ModelKind::LinearRegression,
        ] {
            let mut opts = TrainOptions::new(kind);
            opts.tree_max_samples = 10_000;
            let balanced = train(&data, &opts, &Progress::silent()).unwrap();
            opts.threshold_goal = ThresholdGoal::MissRecall(1.0);
            let m = train(&data, &opts, &Progress::silent()).unwrap();
            assert_eq!(m.training.threshold_goal, ThresholdGoal::MissRecall(1.0));
            assert_eq!(balanced.training.threshold_goal, ThresholdGoal::Balanced);
            // Every miss of the tune window it was chosen on is flagged…
            let (_, tune, _) = split_windows(&data, &opts).unwrap();
            assert!(tune.miss_rate() > 0.0);
            let on_tune = evaluate(&m.float, &m.quantized, &tune);
            assert_eq!(on_tune.float.confusion.false_met, 0, "{kind:?}");
            // …and on held-back data it flags at least as many as the balanced one.
            let (r, rb) = (
                m.test.as_ref().unwrap().quantized.recall_miss,
                balanced.test.as_ref().unwrap().quantized.recall_miss,
            );
            assert!(r >= rb, "{kind:?}: recall {r} < balanced {rb}");
        }
    }

    #[test]
    fn a_feature_the_traces_do_not_carry_is_left_out_of_all_and_refused_by_name() {
        use kml_ebpf_common::{record::Known, RequestRecord};
        let phaseless = SyntheticTrace::new(7).records(6_000);
        let tree = TrainOptions::new(ModelKind::Tree);
        let by_name = TrainOptions {
            features: crate::trainers::named_features("portable+position+tick"),
            ..tree.clone()
        };
        let features_of = |records: Vec<RequestRecord>, opts: &TrainOptions| {
            train(
                &Dataset::from_records(records, "synthetic"),
                opts,
                &Progress::silent(),
            )
            .map(|m| m.float.features().to_vec())
        };

        // No record carries the phase: `all` trains without it, by name is refused.
        let all = features_of(phaseless.clone(), &tree).unwrap();
        assert_eq!(all.len(), all_features().len() - 1);
        assert!(!all.contains(&Feature::TickPhaseUs));
        let err = features_of(phaseless.clone(), &by_name).unwrap_err();
        assert!(
            matches!(err, LearnError::FeatureNotRecorded { feature: "tick_phase_us", missing, .. } if missing > 0),
            "{err}"
        );

        // Every record carries it: both train with it.
        let with_phase = |keep: fn(usize) -> bool| -> Vec<RequestRecord> {
            let mut records = phaseless.clone();
            for (i, r) in records.iter_mut().enumerate() {
                if keep(i) {
                    r.known |= Known::TICK_PHASE;
                    r.tick_phase = ((r.insert_ns >> 10) & 4095) as u16;
                }
            }
            records
        };
        assert_eq!(
            features_of(with_phase(|_| true), &tree).unwrap(),
            all_features()
        );
        assert!(features_of(with_phase(|_| true), &by_name)
            .unwrap()
            .contains(&Feature::TickPhaseUs));

        // Some do, some not: by name is refused (the lane would read 0 on the
        // others), `all` leaves it out.
        assert!(features_of(with_phase(|i| i % 3 != 0), &by_name).is_err());
        assert!(!features_of(with_phase(|i| i % 3 != 0), &tree)
            .unwrap()
            .contains(&Feature::TickPhaseUs));
    }

    #[test]
    fn bad_fractions_are_refused() {
        let data = Dataset::from_records(SyntheticTrace::new(1).records(100), "synthetic");
        let mut opts = TrainOptions::new(ModelKind::Logistic);
        opts.train_fraction = 0.0;
        assert!(train(&data, &opts, &Progress::silent()).is_err());
    }
}
