//! Measure 3, training time: 1,000,000 recorded requests (the learning measure's
//! traces joined end to end, repeated with shifted times if they hold fewer), each
//! model kind trained by `kml-agent train --train-fraction 1.0` (fit on the first
//! 80%, threshold tuned on the last 20%: kml's `train_seconds`, fit + tune, not
//! reading the CSV), and the same fits in scikit-learn on the same feature matrix
//! (exported with kml's own `features_at_insert`) as a reference.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::learning::{self, Learning, KINDS};
use super::sys;
use super::trace;
use super::Ctx;

pub const TRAIN_RECORDS: usize = 1_000_000;

pub struct KmlTime {
    pub kind: &'static str,
    /// kml's fit + tune seconds, or why training failed.
    pub fit_s: Result<f64, String>,
    /// Wall time of the whole command (reading 1 M CSV rows included).
    pub wall_s: f64,
}

pub struct Training {
    pub records: usize,
    /// (trace, requests) joined, in order.
    pub sources: Vec<(String, usize)>,
    pub repeated: bool,
    pub kml: Vec<KmlTime>,
    pub feature_rows: usize,
    /// scikit-learn's JSON report, or why it did not run.
    pub sklearn: Result<Value, String>,
}

fn source_traces(ctx: &Ctx, learning: Option<&Learning>) -> Result<Vec<PathBuf>> {
    if let Some(l) = learning.filter(|l| !l.runs.is_empty()) {
        return Ok(l.runs.iter().map(|r| r.trace.clone()).collect());
    }
    eprintln!("xtask: bench: no traces from the learning measure: recording one");
    let disk = learning::open_disk(ctx)?;
    let job = ctx.workloads.first().context("no workload")?;
    let run = learning::record_workload(ctx, &disk, job, learning::Plan::new(true))?;
    Ok(vec![run.trace])
}

pub fn run(ctx: &Ctx, learning: Option<&Learning>) -> Result<Training> {
    let paths = source_traces(ctx, learning)?;
    let mut parts = Vec::new();
    let mut sources = Vec::new();
    for p in &paths {
        let recs: Vec<_> = trace::read_trace(p)?
            .into_iter()
            .filter(trace::usable)
            .collect();
        sources.push((ctx.rel(p), recs.len()));
        parts.push(recs);
        if parts.iter().map(Vec::len).sum::<usize>() >= TRAIN_RECORDS {
            break;
        }
    }
    let available: usize = parts.iter().map(Vec::len).sum();
    if available == 0 {
        bail!("the traces hold no usable request");
    }
    let joined = trace::join_to(&parts, TRAIN_RECORDS);
    drop(parts);
    let big = ctx.work.join("train-1m.csv");
    trace::write_trace(&big, &joined)?;
    let features = ctx.work.join("train-1m.features.csv");
    let feature_rows = trace::export_features(&joined, &features)?;
    drop(joined);

    let models = ctx.work.join("models");
    std::fs::create_dir_all(&models)?;
    let mut kml = Vec::new();
    for kind in KINDS {
        sys::check_interrupted()?;
        let out = models.join(format!("train-1m.{kind}.json"));
        eprintln!("xtask: bench: timing {kind} on {TRAIN_RECORDS} requests");
        let t = Instant::now();
        let fit_s = learning::train(
            ctx,
            &big,
            kind,
            &out,
            &["--train-fraction", "1.0"],
            "1 M requests joined from the learning traces",
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
        records: TRAIN_RECORDS,
        sources,
        repeated: available < TRAIN_RECORDS,
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
