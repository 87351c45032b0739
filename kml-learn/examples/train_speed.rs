//! Training time on one million requests (the goal: <= 2 s for linear and
//! logistic). A measurement, not a test:
//! `cargo run --release -p kml-learn --example train_speed [-- TRACE.csv...]`
//! With traces, trains on their union cut to its first 1,000,000 requests; with none,
//! on the synthetic queue (not real I/O). `KML_PROGRESS=1` shows progress;
//! `KML_LOGISTIC_ITERATIONS=N` overrides the L-BFGS iteration cap;
//! `KML_FEATURES=portable` trains on the portable set instead of every feature.

use std::{path::Path, time::Instant};

use kml_ebpf_common::model::ModelKind;
use kml_learn::{
    synthetic::SyntheticTrace, train, trainers::PORTABLE_FEATURES, Dataset, Progress, TrainOptions,
};

const RECORDS: usize = 1_000_000;

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let data = if paths.is_empty() {
        Dataset::from_records(SyntheticTrace::new(42).records(RECORDS), "synthetic")
    } else {
        let parts = paths
            .iter()
            .map(|p| Dataset::from_trace_file(Path::new(p)))
            .collect::<Result<Vec<_>, _>>()?;
        let all = Dataset::concat(&parts);
        let cut = RECORDS.min(all.len()) as f64 / all.len() as f64;
        all.window_fraction(0.0, cut)
    };
    println!(
        "{} requests ready in {:.2}s",
        data.len(),
        started.elapsed().as_secs_f64()
    );
    for kind in [
        ModelKind::Baseline,
        ModelKind::LinearRegression,
        ModelKind::Logistic,
        ModelKind::Tree,
    ] {
        let mut opts = TrainOptions::new(kind);
        // Train on the whole set (no held-back window, no baseline beside).
        opts.train_fraction = 1.0;
        opts.compare_baseline = false;
        if let Some(n) = std::env::var("KML_LOGISTIC_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            opts.logistic_max_iterations = n;
        }
        if std::env::var("KML_FEATURES").is_ok_and(|v| v == "portable") {
            opts.features = Some(PORTABLE_FEATURES.to_vec());
        }
        let m = train(
            &data,
            &opts,
            &Progress::new(std::env::var_os("KML_PROGRESS").is_none()),
        )?;
        println!(
            "{:<9} {} features, fit + tune on {} requests: {:.3}s",
            kind.name(),
            m.float.features().len(),
            m.training.fit_records + m.training.tune_records,
            m.training.train_seconds
        );
    }
    Ok(())
}
