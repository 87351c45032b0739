//! A candidate model: trained on the older part of the live window and scored,
//! with the active model, on its newest part (off the run loop: it takes seconds).

use std::time::{Duration, Instant};

use kml_ebpf_common::{
    features::{features_with_position, FeatureVector},
    model::ModelKind,
    RequestRecord,
};
use kml_learn::{ConfusionMatrix, Dataset, Progress, QuantizedModel, TrainOptions};

/// A trained candidate and how both models did on the held-back part.
pub struct Candidate {
    pub model: QuantizedModel,
    pub candidate_ba: f64,
    pub active_ba: Option<f64>,
    pub held_back: usize,
    pub took: Duration,
    /// The held-back requests as the kernel's models see them (features with the
    /// recorded or replayed position) and their outcomes: to judge again against
    /// a model that started serving while the candidate trained.
    pub(crate) held_back_set: Vec<(FeatureVector, bool)>,
}

impl Candidate {
    /// The model serving now is not the one the candidate was judged against
    /// (live calibration moved its threshold during the training): judge again.
    pub fn judge_against(&mut self, active: &QuantizedModel) {
        self.active_ba = Some(balanced_accuracy_on(active, &self.held_back_set));
    }
}

/// Balanced accuracy of an integer model (the kernel's computation) on requests
/// as the kernel's models see them.
fn balanced_accuracy_on(model: &QuantizedModel, set: &[(FeatureVector, bool)]) -> f64 {
    ConfusionMatrix::from_pairs(
        set.iter()
            .map(|(x, missed)| (model.infer(x).at_risk, *missed)),
    )
    .balanced_accuracy()
}

/// Trains `kind` on the older 80% of `records` and scores it and `active` on the
/// newest 20% (what "recent held-back records" means here).
pub fn train_candidate(
    kind: ModelKind,
    mut records: Vec<RequestRecord>,
    active: Option<QuantizedModel>,
    kernel_positions: bool,
) -> anyhow::Result<Candidate> {
    let started = Instant::now();
    records.sort_by_key(|r| r.insert_ns);
    let cut = records.len() * 4 / 5;
    let held_back = records[cut..].to_vec();
    // Over the whole window: the held-back requests' queue holds older ones.
    let replayed = kml_learn::replay::replay_positions(&records, &Default::default());
    let replayed = &replayed[cut..];
    let data = Dataset::from_records(records, "live window");
    let mut opts = TrainOptions::new(kind);
    opts.train_fraction = 0.8;
    opts.compare_baseline = false;
    if !kernel_positions {
        // Classic tracepoint mode keeps no position state (`ModelSlots::kernel_positions`).
        opts.features = Some(
            kml_learn::trainers::all_features()
                .into_iter()
                .filter(|f| !f.is_position())
                .collect(),
        );
    }
    let trained = kml_learn::train(&data, &opts, &Progress::new(true))?;
    // Each with the position the kernel recorded, else the replayed one: the
    // kernel records positions only while a model that reads them is active, so
    // a first position model is judged on replayed ones. Judged on the unbiased
    // records only: under ring pressure the kernel kept mostly those near the
    // serving model's boundary (training still learns from them all).
    let held_back_set: Vec<(FeatureVector, bool)> = held_back
        .iter()
        .zip(replayed)
        .filter(|(r, _)| r.unbiased_sample())
        .map(|(r, p)| {
            let p = r.recorded_position().unwrap_or(*p);
            (features_with_position(r, &p), r.deadline_missed())
        })
        .collect();
    let candidate_ba = balanced_accuracy_on(&trained.quantized, &held_back_set);
    let active_ba = active
        .as_ref()
        .map(|m| balanced_accuracy_on(m, &held_back_set));
    Ok(Candidate {
        model: trained.quantized,
        candidate_ba,
        active_ba,
        held_back: held_back_set.len(),
        took: started.elapsed(),
        held_back_set,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::{
        features::{Feature, NUM_FEATURES},
        model::{LinearModel, VerdictRule},
    };

    /// At risk when `dir_wait_log > limit`.
    fn threshold_model(limit: i64) -> QuantizedModel {
        let mut m = LinearModel::zeroed();
        m.rule = VerdictRule::ScoreOverThreshold as u32;
        m.weight[Feature::DirWaitLog as usize] = 1;
        m.input_max[Feature::DirWaitLog as usize] = 4096;
        m.threshold = limit;
        QuantizedModel::Linear(Box::new(m))
    }

    #[test]
    fn a_candidate_is_judged_again_against_the_model_serving_now() {
        let x = |v: i32| {
            let mut x = [0; NUM_FEATURES];
            x[Feature::DirWaitLog as usize] = v;
            x
        };
        // Misses at 300, met deadlines at 100.
        let set: Vec<(FeatureVector, bool)> = (0..50)
            .map(|_| (x(300), true))
            .chain((0..50).map(|_| (x(100), false)))
            .collect();
        let mut c = Candidate {
            model: threshold_model(200),
            candidate_ba: balanced_accuracy_on(&threshold_model(200), &set),
            // Judged when training began against a model that flagged nothing.
            active_ba: Some(balanced_accuracy_on(&threshold_model(1000), &set)),
            held_back: set.len(),
            took: Duration::ZERO,
            held_back_set: set,
        };
        assert_eq!((c.candidate_ba, c.active_ba), (1.0, Some(0.5)));
        // Calibration moved the serving model's threshold meanwhile: it now
        // separates as well as the candidate.
        c.judge_against(&threshold_model(250));
        assert_eq!(c.active_ba, Some(1.0));
    }
}
