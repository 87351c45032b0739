//! Training time on one million requests (the goal: <= 2 s for linear and
//! logistic). A measurement, not a test:
//! `cargo run --release -p kml-learn --example train_speed [-- TRACE.csv]`
//! With no trace, uses the synthetic queue (not real I/O). `KML_PROGRESS=1` shows
//! progress; `KML_LOGISTIC_ITERATIONS=N` overrides the L-BFGS iteration cap.

use std::{path::Path, time::Instant};

use kml_ebpf_common::model::ModelKind;
use kml_learn::{synthetic::SyntheticTrace, train, Dataset, Progress, TrainOptions};

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let data = match std::env::args().nth(1) {
        Some(path) => Dataset::from_trace_file(Path::new(&path))?,
        None => Dataset::from_records(SyntheticTrace::new(42).records(1_000_000), "synthetic"),
    };
    println!("{} requests ready in {:.2}s", data.len(), started.elapsed().as_secs_f64());
    for kind in [ModelKind::Baseline, ModelKind::LinearRegression, ModelKind::Logistic, ModelKind::Tree] {
        let mut opts = TrainOptions::new(kind);
        // Train on the whole set (no held-back window, no baseline beside).
        opts.train_fraction = 1.0;
        opts.compare_baseline = false;
        if let Some(n) = std::env::var("KML_LOGISTIC_ITERATIONS").ok().and_then(|v| v.parse().ok()) {
            opts.logistic_max_iterations = n;
        }
        let m = train(&data, &opts, &Progress::new(std::env::var_os("KML_PROGRESS").is_none()))?;
        println!(
            "{:<9} fit + tune on {} requests: {:.3}s",
            kind.name(),
            m.training.fit_records + m.training.tune_records,
            m.training.train_seconds
        );
    }
    Ok(())
}
