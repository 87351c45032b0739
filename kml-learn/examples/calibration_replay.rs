//! What live threshold calibration ([`kml_learn::calibrate`]) does for a model on a
//! trace it never saw, replayed in time order as the agent would live it.
//!
//! ```text
//! cargo run --release -p kml-learn --example calibration_replay -- \
//!     --model models/tree-position.json,models/logistic-position.json \
//!     --trace /tmp/kml-traces/heldout/oltp-wal.csv,... [--skip-s 2]
//! ```
//!
//! The agent's loop, replayed: every second (its tick) the records that completed
//! in that second (the agent learns a request's outcome when its record arrives)
//! are given to [`LiveCalibration`] with the agent's default policy, one in
//! `records / 4096` of them as the agent samples, and it decides whether to install
//! a new threshold; requests inserted until the next tick are judged with the
//! threshold in force. Printed per model and trace, balanced accuracy (%) of: the
//! model as shipped; the calibrated verdicts over the whole trace (the first
//! seconds at the shipped threshold included); the same from `--skip-s` on; the
//! best single threshold in hindsight (the ceiling of any threshold rule); the AUC;
//! and the installs.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use kml_learn::{
    calibrate::{CalibrationPolicy, LiveCalibration},
    metrics::auc,
    ConfusionMatrix, Dataset, LoadedModel,
};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', required = true)]
    model: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',', required = true)]
    trace: Vec<PathBuf>,
    #[arg(long, default_value_t = 2)]
    skip_s: u64,
}

const SECOND: u64 = 1_000_000_000;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let models: Vec<(String, LoadedModel)> = args
        .model
        .iter()
        .map(|p| {
            let name = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            LoadedModel::load(p).map(|m| (name, m))
        })
        .collect::<Result<_, _>>()?;
    println!(
        "| trace | miss % | model | shipped | calibrated | calibrated after {} s | best threshold (hindsight) | AUC | installs |",
        args.skip_s
    );
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for path in &args.trace {
        let ds = Dataset::from_trace_file(path)?;
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let labels: Vec<bool> = ds.missed().collect();
        let records = ds.records();
        // The order in which outcomes reach the agent.
        let mut by_completion: Vec<usize> = (0..records.len()).collect();
        by_completion.sort_by_key(|&i| records[i].complete_ns);
        let t0 = records.first().map_or(0, |r| r.insert_ns);
        for (model_name, m) in &models {
            let q = &m.quantized;
            let margins: Vec<i64> = ds.features().iter().map(|x| q.margin(x)).collect();
            let mut live = LiveCalibration::new(CalibrationPolicy::default());
            live.serving(Some(q.clone()));
            let (mut shipped, mut calibrated, mut later) = (
                ConfusionMatrix::default(),
                ConfusionMatrix::default(),
                ConfusionMatrix::default(),
            );
            // Simulated clock: the trace's first insert is `origin`.
            let origin = Instant::now();
            let mut next_tick = t0 + SECOND;
            let (mut fed, mut seen, mut stride, mut this_second) = (0usize, 0u64, 1u64, 0u64);
            for (i, r) in records.iter().enumerate() {
                while r.insert_ns >= next_tick {
                    while fed < by_completion.len()
                        && records[by_completion[fed]].complete_ns < next_tick
                    {
                        let j = by_completion[fed];
                        seen += 1;
                        this_second += 1;
                        if seen.is_multiple_of(stride) {
                            live.observe(margins[j], labels[j]);
                        }
                        fed += 1;
                    }
                    let now = origin + Duration::from_nanos(next_tick - t0);
                    stride = (this_second / 4096).max(1);
                    this_second = 0;
                    if let Some(rc) = live.decide(now) {
                        live.installed(&rc, now);
                    }
                    next_tick += SECOND;
                }
                let shift = live.applied();
                shipped.add(margins[i] > 0, labels[i]);
                calibrated.add(margins[i] > shift, labels[i]);
                if r.insert_ns >= t0 + args.skip_s * SECOND {
                    later.add(margins[i] > shift, labels[i]);
                }
            }
            let best = kml_learn::calibrate::best_balanced_shift(&margins, &labels);
            let hindsight = ConfusionMatrix::from_pairs(
                margins.iter().zip(&labels).map(|(&m, &l)| (m > best, l)),
            );
            let scores: Vec<f64> = margins.iter().map(|&m| m as f64).collect();
            let one_class = ds.misses() == 0 || ds.misses() == ds.len();
            let pct = |c: &ConfusionMatrix| {
                if one_class {
                    "one class".to_string()
                } else {
                    format!("{:.1}", 100.0 * c.balanced_accuracy())
                }
            };
            println!(
                "| {name} | {:.1} | {model_name} | {} | {} | {} | {} | {} | {} |",
                100.0 * ds.miss_rate(),
                pct(&shipped),
                pct(&calibrated),
                pct(&later),
                pct(&hindsight),
                auc(&scores, &labels).map_or("-".to_string(), |a| format!("{a:.3}")),
                live.installs(),
            );
        }
    }
    Ok(())
}
