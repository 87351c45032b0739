//! A candidate model: trained on the older part of the live window and scored,
//! with the active model, on its newest part (off the run loop: it takes seconds).

use std::time::{Duration, Instant};

use kml_ebpf_common::{
    features::features_with_position, model::ModelKind, position::PositionFeatures, RequestRecord,
};
use kml_learn::{ConfusionMatrix, Dataset, Progress, QuantizedModel, TrainOptions};

/// Balanced accuracy of an integer model on records (the kernel's computation),
/// each with the position the kernel recorded, else the replayed one (`replayed`,
/// same order): the kernel records positions only while a model that reads them
/// is active, so a first position model is judged on replayed ones.
pub fn integer_balanced_accuracy(
    model: &QuantizedModel,
    records: &[RequestRecord],
    replayed: &[PositionFeatures],
) -> f64 {
    ConfusionMatrix::from_pairs(records.iter().zip(replayed).map(|(r, p)| {
        let p = r.recorded_position().unwrap_or(*p);
        (
            model.infer(&features_with_position(r, &p)).at_risk,
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
    let candidate_ba = integer_balanced_accuracy(&trained.quantized, &held_back, replayed);
    let active_ba = active
        .as_ref()
        .map(|m| integer_balanced_accuracy(m, &held_back, replayed));
    Ok(Candidate {
        model: trained.quantized,
        candidate_ba,
        active_ba,
        held_back: held_back.len(),
        took: started.elapsed(),
    })
}
