//! Measure 3, training time: 1,000,000 requests of a fixed data set, the same in
//! every run whatever `--workload` says: kml-learn's simulated mq-deadline queue
//! (`SyntheticTrace`, fixed seed; both classes, a miss rate of some 10-20%). Each
//! model kind is trained by `kml-agent train --train-fraction 1.0` (fit on the first
//! 80%, threshold tuned on the last 20%: kml's `train_seconds`, fit + tune, not
//! reading the CSV), and the same fits run in scikit-learn on the same feature matrix
//! (exported with kml's own `features_at_insert`) as a reference. What it times is
//! the learning code on a million rows, not what a particular workload teaches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::learning::{self, KINDS};
use super::sys;
use super::trace;
use super::Ctx;

pub const TRAIN_RECORDS: usize = 1_000_000;
/// The seed of the simulated queue: the data set is the same in every run.
pub const SYNTHETIC_SEED: u64 = 42;

pub struct KmlTime {
    pub kind: &'static str,
    /// kml's fit + tune seconds, or why training failed.
    pub fit_s: Result<f64, String>,
    /// Wall time of the whole command (reading 1 M CSV rows included).
    pub wall_s: f64,
}

pub struct Training {
    pub records: usize,
    /// What the data set is.
    pub source: String,
    /// Share of the requests that missed their deadline.
    pub miss_rate: f64,
    pub kml: Vec<KmlTime>,
    pub feature_rows: usize,
    /// scikit-learn's JSON report, or why it did not run.
    pub sklearn: Result<Value, String>,
}

pub fn run(ctx: &Ctx) -> Result<Training> {
    eprintln!(
        "xtask: bench: simulating {TRAIN_RECORDS} requests (kml-learn's SyntheticTrace, seed {SYNTHETIC_SEED})"
    );
    let records: Vec<_> = kml_learn::synthetic::SyntheticTrace::new(SYNTHETIC_SEED)
        .records(TRAIN_RECORDS)
        .into_iter()
        .filter(trace::usable)
        .collect();
    if records.len() < TRAIN_RECORDS / 2 {
        bail!(
            "the simulated queue gave only {} usable requests",
            records.len()
        );
    }
    let misses = records.iter().filter(|r| r.deadline_missed()).count();
    let miss_rate = misses as f64 / records.len() as f64;
    let big = ctx.work.join("train-1m.csv");
    trace::write_trace(&big, &records)?;
    let features = ctx.work.join("train-1m.features.csv");
    let feature_rows = trace::export_features(&records, &features)?;
    let n = records.len();
    drop(records);

    let models = ctx.work.join("models");
    std::fs::create_dir_all(&models)?;
    let mut kml = Vec::new();
    for kind in KINDS {
        sys::check_interrupted()?;
        let out = models.join(format!("train-1m.{kind}.json"));
        eprintln!("xtask: bench: timing {kind} on {n} requests");
        let t = Instant::now();
        let fit_s = learning::train(
            ctx,
            &big,
            kind,
            &out,
            &["--train-fraction", "1.0"],
            "1 M simulated requests (kml-learn SyntheticTrace)",
            &format!("train-1m.{kind}"),
        )
        .map_err(|e| format!("{e:#}"));
        kml.push(KmlTime {
            kind,
            fit_s,
            wall_s: t.elapsed().as_secs_f64(),
        });
    }
    sys::check_interrupted()?;
    let sklearn = sklearn(ctx, &features).map_err(|e| {
        eprintln!("xtask: bench: scikit-learn reference not run: {e:#}");
        format!("{e:#}")
    });
    Ok(Training {
        records: n,
        source: format!(
            "kml-learn's simulated mq-deadline queue (`SyntheticTrace::new({SYNTHETIC_SEED})`, the same in every run, whatever `--workload` is)"
        ),
        miss_rate,
        kml,
        feature_rows,
        sklearn,
    })
}

/// bench/.venv with scikit-learn (created and filled from bench/requirements-sklearn.txt
/// when missing); returns its python.
fn venv(ctx: &Ctx) -> Result<PathBuf> {
    let dir = ctx.root.join("bench").join(".venv");
    let python = dir.join("bin").join("python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", "import sklearn, pandas, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if python.is_file() && ready(&python) {
        return Ok(python);
    }
    if !python.is_file() {
        crate::util::run(Command::new("python3").args(["-m", "venv"]).arg(&dir))
            .context("python3 -m venv failed (Debian: apt-get install python3-venv)")?;
    }
    crate::util::run(
        Command::new(dir.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(ctx.root.join("bench").join("requirements-sklearn.txt")),
    )
    .context("installing scikit-learn into bench/.venv failed")?;
    if !ready(&python) {
        bail!("scikit-learn does not import in bench/.venv after installing it");
    }
    Ok(python)
}

fn sklearn(ctx: &Ctx, features: &Path) -> Result<Value> {
    let python = venv(ctx)?;
    let p = sys::run_logged(
        Command::new(&python)
            .arg(ctx.root.join("bench").join("sklearn_reference.py"))
            .arg(features)
            .args(["--fit-fraction", "0.8"]),
        "sklearn",
        &ctx.logs,
        Duration::from_secs(900),
    )?;
    let text = std::fs::read_to_string(&p.stdout)?;
    let start = text
        .find('{')
        .context("no JSON from sklearn_reference.py")?;
    serde_json::from_str(&text[start..]).context("sklearn_reference.py printed bad JSON")
}
