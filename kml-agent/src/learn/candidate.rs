//! A candidate model: trained on the older part of the live window and scored,
//! with the active model, on its newest part (off the run loop: it takes seconds).

use std::time::{Duration, Instant};

use kml_ebpf_common::{features::features_of_record, model::ModelKind, RequestRecord};
use kml_learn::{ConfusionMatrix, Dataset, Progress, QuantizedModel, TrainOptions};

/// Balanced accuracy of an integer model on records (the kernel's computation).
pub fn integer_balanced_accuracy(model: &QuantizedModel, records: &[RequestRecord]) -> f64 {
    ConfusionMatrix::from_pairs(records.iter().map(|r| {
        (
            model.infer(&features_of_record(r)).at_risk,
            r.deadline_missed(),
        )
    }))
    .balanced_accuracy()
}

/// A trained candidate and how both models did on the held-back part.
pub struct Candidate {
    pub model: QuantizedModel,
    pub candidate_ba: f64,
    pub active_ba: Option<f64>,
    pub held_back: usize,
    pub took: Duration,
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
