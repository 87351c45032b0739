//! Measure 4, learning quality per workload: for each fio job, a trace recorded on a
//! direct-I/O loop device on the real disk (mq-deadline, expiries lowered so that a
//! share of requests misses), then every model kind trained on its first 70% and
//! evaluated, float and quantised, on its last 30% and on every other workload's
//! last 30% (`kml-agent train` + `kml-agent eval --json`).
//!
//! Expiries are calibrated per workload: a short trace at the device's default
//! expiries gives each direction's insert → dispatch waits; each expiry is set to a
//! high quantile of them (so roughly the slowest fifth would miss) and read back,
//! since mq-deadline keeps them in jiffies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::parse::{self, EvalMetrics, FioSummary};
use super::sys::{self, run_logged, LoopDevice, Proc};
use super::trace::{self, TraceStats};
use super::{workload_name, Ctx};

/// Model kinds, in report order.
pub const KINDS: [&str; 4] = ["baseline", "linear", "logistic", "tree"];

/// Quantile of the calibration waits an expiry is set to.
pub const CALIBRATION_QUANTILE: f64 = 0.75;

/// Kinds evaluated across workloads (each eval reads a whole trace, so not all of
/// them, to keep a full run near 15 minutes); the KML baseline comes along with the
/// first through `eval --baseline`.
pub fn cross_kinds(quick: bool) -> &'static [&'static str] {
    if quick {
        &["logistic"]
    } else {
        &["logistic", "tree"]
    }
}

/// Workloads a `--quick` run records when none is named: the first three.
pub const QUICK_WORKLOADS: usize = 3;

/// Size of the disk image on the real disk.
const IMAGE_BYTES: u64 = 1 << 30;

/// Seconds of each step of one workload's recording.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub warm_s: u64,
    pub calibrate_s: u64,
    pub settle_s: u64,
    pub record_s: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                warm_s: 1,
                calibrate_s: 2,
                settle_s: 1,
                record_s: 4,
            }
        } else {
            Plan {
                warm_s: 1,
                calibrate_s: 3,
                settle_s: 1,
                record_s: 10,
            }
        }
    }
}

pub struct KindRun {
    pub kind: &'static str,
    /// The model file and kml's own fit + tune time, or why training failed.
    pub model: Result<(PathBuf, f64), String>,
    /// On the trace's own later 30%.
    pub held_back: Option<Result<EvalMetrics, String>>,
    /// On other workloads' later 30%: (workload, metrics).
    pub cross: Vec<(String, Result<EvalMetrics, String>)>,
}

pub struct WorkloadRun {
    pub name: String,
    pub file: PathBuf,
    pub trace: PathBuf,
    pub device: String,
    /// Expiries at the device's defaults, asked for, and applied (read back), ms.
    pub default_expiry: (u64, u64),
    pub asked_expiry: (u64, u64),
    pub applied_expiry: (u64, u64),
    pub stats: TraceStats,
    pub fio: Option<FioSummary>,
    pub kinds: Vec<KindRun>,
}

pub struct Learning {
    pub plan: Plan,
    /// Online learning across a switch from the first workload to the second.
    pub switch: Option<Result<Switch, String>>,
    pub runs: Vec<WorkloadRun>,
    /// Workloads whose recording failed: (name, error).
    pub failed: Vec<(String, String)>,
    pub nr_requests: Option<String>,
}

/// The loop device on the real disk, with its image (kept in target/bench between runs).
pub struct Disk {
    pub dev: LoopDevice,
    pub defaults: (u64, u64),
    pub nr_requests: Option<String>,
}

pub fn open_disk(ctx: &Ctx) -> Result<Disk> {
    let image = ctx.work.join("disk.img");
    let fresh = std::fs::metadata(&image).map_or(true, |m| m.len() != IMAGE_BYTES);
    if fresh {
        eprintln!(
            "xtask: bench: writing a {} MiB image {} (once)",
            IMAGE_BYTES >> 20,
            ctx.rel(&image)
        );
        // Written for real (not sparse), so reads hit allocated blocks as on a used disk.
        util_run(
            Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", image.display()))
                .args([
                    "bs=4M",
                    &format!("count={}", IMAGE_BYTES >> 22),
                    "oflag=direct",
                    "status=none",
                ]),
        )?;
    }
    let dev = LoopDevice::attach(&image, true)?;
    dev.use_mq_deadline()?;
    // Requests wait in the scheduler rather than for a tag (as kml-learn's traces).
    let nr_requests = dev
        .write_attr("queue/nr_requests", "1024")
        .and_then(|()| dev.read_attr("queue/nr_requests"))
        .ok();
    let defaults = dev.expiries_ms()?;
    Ok(Disk {
        dev,
        defaults,
        nr_requests,
    })
}

fn util_run(cmd: &mut Command) -> Result<()> {
    crate::util::run(cmd)
}

/// Starts fio on `dev` with the job file; output JSON to `logs/<name>.fio.json`.
pub fn spawn_fio(
    ctx: &Ctx,
    job: &Path,
    dev: &Path,
    runtime_s: u64,
    name: &str,
    cpus: Option<&str>,
) -> Result<Proc> {
    spawn_fio_with(ctx, job, dev, runtime_s, name, cpus, &[])
}

/// [`spawn_fio`] with more fio options (given before the job file: they apply to
/// every job in it).
pub fn spawn_fio_with(
    ctx: &Ctx,
    job: &Path,
    dev: &Path,
    runtime_s: u64,
    name: &str,
    cpus: Option<&str>,
    extra: &[String],
) -> Result<Proc> {
    let json = ctx.logs.join(format!("{name}.fio.json"));
    let _ = std::fs::remove_file(&json);
    let mut cmd = Command::new("fio");
    cmd.arg("--output-format=json")
        .arg(format!("--output={}", json.display()));
    if let Some(c) = cpus {
        cmd.arg(format!("--cpus_allowed={c}"));
    }
    cmd.args(extra);
    cmd.arg(job)
        .env("FILENAME", dev)
        .env("RUNTIME", runtime_s.to_string());
    Proc::spawn(&mut cmd, &format!("{name}.fio"), &ctx.logs)
}

pub fn fio_result(ctx: &Ctx, name: &str) -> Result<FioSummary> {
    let json = ctx.logs.join(format!("{name}.fio.json"));
    let text =
        std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    parse::parse_fio_json(&text).with_context(|| format!("parsing {}", json.display()))
}

/// `kml-agent record` for `secs` into `out`.
pub fn record(ctx: &Ctx, dev: &LoopDevice, secs: u64, out: &Path, name: &str) -> Result<()> {
    run_logged(
        Command::new(&ctx.agent)
            .args([
                "record",
                "--device",
                &dev.name,
                "--duration",
                &format!("{secs}s"),
                "--out",
            ])
            .arg(out),
        name,
        &ctx.logs,
        Duration::from_secs(secs + 60),
    )?;
    Ok(())
}

/// [`spawn_fio`] for `runtime_s`, then `warm_s` of waiting; fails if fio ended by then.
fn spawn_fio_warm(
    ctx: &Ctx,
    job: &Path,
    dev: &LoopDevice,
    runtime_s: u64,
    name: &str,
    warm_s: u64,
) -> Result<Proc> {
    let mut fio = spawn_fio(ctx, job, &dev.path, runtime_s, name, None)?;
    sys::sleep(Duration::from_secs(warm_s))?;
    if let Some(s) = fio.poll()? {
        bail!(
            "fio ended early ({}): {}",
            crate::util::describe_status(s),
            sys::tail(&fio.stderr, 5)
        );
    }
    Ok(fio)
}

/// Sets the device's expiries to [`CALIBRATION_QUANTILE`] of each direction's
/// insert → dispatch waits, measured by its own fio run of `job` at the default
/// expiries (`warm_s` of warm-up, then `calibrate_s` recorded). Files are named
/// after `tag`. Returns the expiries asked for and those the kernel applied (ms).
pub fn calibrate_expiries(
    ctx: &Ctx,
    disk: &Disk,
    job: &Path,
    tag: &str,
    warm_s: u64,
    calibrate_s: u64,
) -> Result<((u64, u64), (u64, u64))> {
    let dev = &disk.dev;
    let traces = ctx.work.join("traces");
    std::fs::create_dir_all(&traces)?;
    dev.set_expiries_ms(disk.defaults.0, disk.defaults.1)?;
    // Calibration: its own fio run at the default expiries.
    let calib_name = format!("{tag}.calibration");
    let mut fio = spawn_fio_warm(
        ctx,
        job,
        dev,
        warm_s + calibrate_s + 15,
        &calib_name,
        warm_s,
    )?;
    let calib_path = traces.join(format!("{tag}.calibration.csv"));
    record(
        ctx,
        dev,
        calibrate_s,
        &calib_path,
        &format!("{tag}.calibration.record"),
    )?;
    fio.stop(Duration::from_secs(15));
    drop(fio);
    let calibration = TraceStats::of(&trace::read_trace(&calib_path)?);
    let asked = (
        trace::expiry_for_quantile(&calibration.read, CALIBRATION_QUANTILE, 200)
            .unwrap_or(disk.defaults.0),
        trace::expiry_for_quantile(&calibration.write, CALIBRATION_QUANTILE, 200)
            .unwrap_or(disk.defaults.1),
    );
    // Set between two fio runs: lowering the expiries under a deep queue stalled new
    // requests for seconds here (the queued ones keep their old, far deadlines).
    let applied = dev.set_expiries_ms(asked.0, asked.1)?;
    eprintln!(
        "xtask: bench: {tag}: calibration p{:.0} waits → read_expire {} ms (applied {}), write_expire {} ms (applied {})",
        CALIBRATION_QUANTILE * 100.0,
        asked.0,
        applied.0,
        asked.1,
        applied.1
    );
    Ok((asked, applied))
}

/// Records one workload: warm up, calibrate the expiries, record.
pub fn record_workload(ctx: &Ctx, disk: &Disk, job: &Path, plan: Plan) -> Result<WorkloadRun> {
    let name = workload_name(job);
    let traces = ctx.work.join("traces");
    std::fs::create_dir_all(&traces)?;
    let dev = &disk.dev;
    let (asked, applied) =
        calibrate_expiries(ctx, disk, job, &name, plan.warm_s, plan.calibrate_s)?;
    let mut fio = spawn_fio_warm(
        ctx,
        job,
        dev,
        plan.warm_s + plan.settle_s + plan.record_s + 15,
        &name,
        plan.warm_s + plan.settle_s,
    )?;
    let trace_path = traces.join(format!("{name}.csv"));
    record(
        ctx,
        dev,
        plan.record_s,
        &trace_path,
        &format!("{name}.record"),
    )?;
    fio.stop(Duration::from_secs(15));
    drop(fio);
    let fio_summary = fio_result(ctx, &name).ok();
    dev.set_expiries_ms(disk.defaults.0, disk.defaults.1)?;
    let stats = TraceStats::of(&trace::read_trace(&trace_path)?);
    eprintln!(
        "xtask: bench: {name}: {} requests, miss rate {:.1}% (reads {:.1}%, writes {:.1}%)",
        stats.usable,
        100.0 * stats.miss_rate(),
        100.0 * stats.read.miss_rate(),
        100.0 * stats.write.miss_rate()
    );
    Ok(WorkloadRun {
        name,
        file: job.to_path_buf(),
        trace: trace_path,
        device: dev.name.clone(),
        default_expiry: disk.defaults,
        asked_expiry: asked,
        applied_expiry: applied,
        stats,
        fio: fio_summary,
        kinds: Vec::new(),
    })
}

/// `kml-agent train`; returns kml's own fit + tune seconds.
pub fn train(
    ctx: &Ctx,
    trace: &Path,
    kind: &str,
    out: &Path,
    extra: &[&str],
    workload: &str,
    log: &str,
) -> Result<f64> {
    let _ = std::fs::remove_file(out);
    run_logged(
        Command::new(&ctx.agent)
            .arg("train")
            .arg("--trace")
            .arg(trace)
            .args(["--model", kind, "--out"])
            .arg(out)
            .args(["--quiet", "--workload", workload])
            .args(extra),
        log,
        &ctx.logs,
        Duration::from_secs(900),
    )?;
    let text =
        std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    Ok(parse::parse_model_training(&text)?.0)
}

/// `kml-agent eval --json` on the window from `from` to the end (with `baseline`
/// evaluated beside, in the same pass over the trace).
pub fn eval(
    ctx: &Ctx,
    trace: &Path,
    model: &Path,
    from: f64,
    baseline: Option<&Path>,
) -> Result<(EvalMetrics, Option<EvalMetrics>)> {
    sys::check_interrupted()?;
    let mut cmd = Command::new(&ctx.agent);
    cmd.arg("eval")
        .arg("--trace")
        .arg(trace)
        .arg("--model")
        .arg(model)
        .args(["--json", "--quiet", "--from", &from.to_string()]);
    if let Some(b) = baseline {
        cmd.arg("--baseline").arg(b);
    }
    let out = cmd.output().context("could not run kml-agent eval")?;
    if !out.status.success() {
        bail!(
            "kml-agent eval --trace {} --model {} failed: {}",
            trace.display(),
            model.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse::parse_eval_with_baseline(&String::from_utf8_lossy(&out.stdout))
}

/// The held-back window: what `train`'s default split (0.7) did not see.
pub const HELD_BACK_FROM: f64 = 0.7;

pub fn run(ctx: &Ctx) -> Result<Learning> {
    let plan = Plan::new(ctx.quick);
    let disk = open_disk(ctx)?;
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for job in &ctx.workloads {
        sys::check_interrupted()?;
        match record_workload(ctx, &disk, job, plan) {
            Ok(r) if r.stats.usable >= 1000 => runs.push(r),
            Ok(r) => failed.push((
                r.name,
                format!("only {} usable requests recorded", r.stats.usable),
            )),
            Err(e) if sys::interrupted() => return Err(e),
            Err(e) => {
                eprintln!(
                    "xtask: bench: {}: recording FAILED: {e:#}",
                    workload_name(job)
                );
                failed.push((workload_name(job), format!("{e:#}")));
            }
        }
    }
    let nr_requests = disk.nr_requests.clone();
    drop(disk);

    let models = ctx.work.join("models");
    std::fs::create_dir_all(&models)?;
    for run in runs.iter_mut() {
        let desc = format!(
            "{} ({}), {}, read_expire {} ms, write_expire {} ms, {} s",
            run.name,
            ctx.rel(&run.file),
            run.device,
            run.applied_expiry.0,
            run.applied_expiry.1,
            plan.record_s
        );
        eprintln!(
            "xtask: bench: training and evaluating {} on {}",
            KINDS.join(", "),
            run.name
        );
        for kind in KINDS {
            sys::check_interrupted()?;
            let path = models.join(format!("{}.{kind}.json", run.name));
            let model = train(
                ctx,
                &run.trace,
                kind,
                &path,
                &[],
                &desc,
                &format!("{}.{kind}.train", run.name),
            )
            .map(|s| (path.clone(), s))
            .map_err(|e| format!("{e:#}"));
            let held_back = model.as_ref().ok().map(|(p, _)| {
                eval(ctx, &run.trace, p, HELD_BACK_FROM, None)
                    .map(|e| e.0)
                    .map_err(|e| format!("{e:#}"))
            });
            run.kinds.push(KindRun {
                kind,
                model,
                held_back,
                cross: Vec::new(),
            });
        }
    }
    // Across workloads: each model of the cross kinds on every other trace's later
    // window; the first cross kind's evals carry the KML baseline along.
    let others: Vec<(String, PathBuf)> = runs
        .iter()
        .map(|r| (r.name.clone(), r.trace.clone()))
        .collect();
    for run in runs.iter_mut() {
        let baseline = run
            .kinds
            .iter()
            .find(|k| k.kind == "baseline")
            .and_then(|k| k.model.as_ref().ok())
            .map(|(p, _)| p.clone());
        for (ci, kind) in cross_kinds(ctx.quick).iter().enumerate() {
            let Some(model) = run
                .kinds
                .iter()
                .find(|k| k.kind == *kind)
                .and_then(|k| k.model.as_ref().ok())
                .map(|m| m.0.clone())
            else {
                continue;
            };
            eprintln!(
                "xtask: bench: evaluating {} ({kind}) on the other workloads",
                run.name
            );
            for (other, trace) in others.iter().filter(|(n, _)| *n != run.name) {
                let with_base = if ci == 0 { baseline.as_deref() } else { None };
                let r = eval(ctx, trace, &model, HELD_BACK_FROM, with_base);
                let (m, b) = match r {
                    Ok((m, b)) => (Ok(m), b.map(Ok)),
                    Err(e) => (
                        Err(format!("{e:#}")),
                        with_base.map(|_| Err("eval failed".to_owned())),
                    ),
                };
                if let Some(k) = run.kinds.iter_mut().find(|k| k.kind == *kind) {
                    k.cross.push((other.clone(), m));
                }
                if let (Some(b), Some(k)) = (b, run.kinds.iter_mut().find(|k| k.kind == "baseline"))
                {
                    k.cross.push((other.clone(), b));
                }
            }
        }
    }
    let switch = (runs.len() >= 2).then(|| {
        sys::check_interrupted()?;
        eprintln!("xtask: bench: online learning across a workload switch");
        switch(ctx, &runs)
    });
    let switch = match switch {
        Some(Err(e)) if sys::interrupted() => return Err(e),
        other => other.map(|r| r.map_err(|e| format!("{e:#}"))),
    };
    Ok(Learning {
        plan,
        switch,
        runs,
        failed,
        nr_requests,
    })
}

/// Model files for the inference measures, by kind: (kind, path, where it came from).
pub struct Models {
    pub by_kind: Vec<(String, PathBuf, String)>,
}

impl Models {
    pub fn get(&self, kind: &str) -> Option<&Path> {
        self.by_kind
            .iter()
            .find(|(k, _, _)| k == kind)
            .map(|(_, p, _)| p.as_path())
    }
}

/// The kinds the kernel runs with its own code paths (the baseline is a linear model).
pub const INFERENCE_KINDS: [&str; 3] = ["linear", "logistic", "tree"];

/// The shipped model whose insert cost includes the position state
/// (`models/tree-position.json`), measured beside the kinds when present.
pub const POSITION_MODEL: &str = "tree-position";

/// Shipped models (models/*.json, by their `kind`, `<kind>.json` first), else the
/// models trained by the learning measure, else a short trace of the first workload
/// is recorded and trained on here.
pub fn models_for_inference(ctx: &Ctx, learning: Option<&Learning>) -> Result<Models> {
    let mut by_kind = Vec::new();
    let shipped = shipped_models(&ctx.root.join("models"));
    let mut fresh: Option<Learning> = None;
    for kind in INFERENCE_KINDS {
        if let Some(p) = shipped
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, p)| p.clone())
        {
            by_kind.push((
                kind.to_owned(),
                p.clone(),
                format!("shipped ({})", ctx.rel(&p)),
            ));
            continue;
        }
        let from_learning = |l: &Learning| {
            l.runs.iter().find_map(|r| {
                r.kinds
                    .iter()
                    .find(|k| k.kind == kind)
                    .and_then(|k| k.model.as_ref().ok())
                    .map(|(p, _)| (p.clone(), format!("trained by this run on {}", r.name)))
            })
        };
        if let Some((p, origin)) = learning.and_then(from_learning) {
            by_kind.push((kind.to_owned(), p, origin));
            continue;
        }
        if fresh.is_none() {
            fresh = Some(quick_models(ctx)?);
        }
        if let Some((p, origin)) = fresh.as_ref().and_then(from_learning) {
            by_kind.push((kind.to_owned(), p, origin));
        }
    }
    if by_kind.is_empty() {
        bail!("no model could be found or trained for the inference measures");
    }
    let position = ctx
        .root
        .join("models")
        .join(format!("{POSITION_MODEL}.json"));
    if position.is_file() {
        let origin = format!("shipped ({})", ctx.rel(&position));
        by_kind.push((POSITION_MODEL.to_owned(), position, origin));
    }
    Ok(Models { by_kind })
}

/// Records the first workload briefly and trains the inference kinds on it.
fn quick_models(ctx: &Ctx) -> Result<Learning> {
    let job = ctx
        .workloads
        .first()
        .context("no workload to train a model on")?;
    eprintln!(
        "xtask: bench: no shipped models and no learning measure: recording {} to train some",
        job.display()
    );
    let plan = Plan {
        warm_s: 1,
        calibrate_s: 2,
        settle_s: 1,
        record_s: 4,
    };
    let disk = open_disk(ctx)?;
    let mut run = record_workload(ctx, &disk, job, plan)?;
    drop(disk);
    let models = ctx.work.join("models");
    std::fs::create_dir_all(&models)?;
    for kind in INFERENCE_KINDS {
        let path = models.join(format!("{}.{kind}.json", run.name));
        let model = train(
            ctx,
            &run.trace,
            kind,
            &path,
            &[],
            &run.name,
            &format!("{}.{kind}.train", run.name),
        )
        .map(|s| (path.clone(), s))
        .map_err(|e| format!("{e:#}"));
        run.kinds.push(KindRun {
            kind,
            model,
            held_back: None,
            cross: Vec::new(),
        });
    }
    Ok(Learning {
        plan,
        switch: None,
        runs: vec![run],
        failed: Vec::new(),
        nr_requests: None,
    })
}

/// `models/*.json` with their `kind`: `<kind>.json` sorts before other files.
pub fn shipped_models(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let kind = serde_json::from_str::<serde_json::Value>(&text).ok()?["kind"]
                .as_str()?
                .to_owned();
            Some((kind, p))
        })
        .collect();
    v.sort_by_key(|(kind, p)| {
        (
            p.file_stem().is_none_or(|s| s.to_string_lossy() != *kind),
            p.clone(),
        )
    });
    v
}

/// Online learning across a workload switch: `kml-agent run` starts from the model
/// trained on workload A and retrains every few seconds while fio runs A, then B.
pub struct Switch {
    pub from: String,
    pub to: String,
    pub model: PathBuf,
    pub expiry: (u64, u64),
    pub retrain_every_s: u64,
    pub switch_at_s: f64,
    /// (seconds since the agent started, live balanced accuracy, model version).
    pub points: Vec<(f64, Option<f64>, Option<u32>)>,
    /// Swap lines the agent printed.
    pub swaps: Vec<String>,
}

impl Switch {
    /// Median live balanced accuracy before the switch (skipping the first seconds).
    pub fn before(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .points
            .iter()
            .filter(|(t, _, _)| *t > 2.0 && *t <= self.switch_at_s)
            .filter_map(|p| p.1)
            .collect();
        parse::median(&v)
    }

    /// The level the live balanced accuracy settles at on the new workload: the
    /// median of the last third of the seconds after the switch.
    pub fn settled(&self) -> Option<f64> {
        let after: Vec<f64> = self
            .points
            .iter()
            .filter(|p| p.0 > self.switch_at_s)
            .filter_map(|p| p.1)
            .collect();
        if after.len() < 3 {
            return None;
        }
        parse::median(&after[after.len() - after.len() / 3..])
    }

    /// The lowest live balanced accuracy after the switch.
    pub fn lowest_after(&self) -> Option<f64> {
        self.points
            .iter()
            .filter(|p| p.0 > self.switch_at_s)
            .filter_map(|p| p.1)
            .min_by(f64::total_cmp)
    }

    /// Seconds after the switch until the live balanced accuracy is within
    /// `tolerance` of `level` (or above) for three seconds in a row.
    pub fn seconds_to(&self, level: f64, tolerance: f64) -> Option<f64> {
        let after: Vec<&(f64, Option<f64>, Option<u32>)> = self
            .points
            .iter()
            .filter(|p| p.0 > self.switch_at_s)
            .collect();
        after
            .windows(3)
            .find(|w| {
                w.iter()
                    .all(|p| p.1.is_some_and(|b| b >= level - tolerance))
            })
            .map(|w| w[0].0 - self.switch_at_s)
    }
}

pub fn switch(ctx: &Ctx, runs: &[WorkloadRun]) -> Result<Switch> {
    let (a, b) = match runs {
        [a, b, ..] => (a, b),
        _ => bail!("needs two recorded workloads"),
    };
    let model = a
        .kinds
        .iter()
        .find(|k| k.kind == "logistic")
        .and_then(|k| k.model.as_ref().ok())
        .map(|m| m.0.clone())
        .context("no logistic model of the first workload")?;
    let (before_s, after_s, every) = if ctx.quick { (8, 16, 4) } else { (15, 35, 5) };
    let disk = open_disk(ctx)?;
    let expiry = disk
        .dev
        .set_expiries_ms(a.applied_expiry.0, a.applied_expiry.1)?;
    let mut agent = {
        let mut cmd = Command::new(&ctx.agent);
        cmd.args([
            "run",
            "--json",
            "--device",
            &disk.dev.name,
            "--retrain-every",
            &format!("{every}s"),
            "--model",
        ])
        .arg(&model)
        .args(["--learn-kind", "logistic"]);
        let mut p = Proc::spawn(&mut cmd, "switch.agent", &ctx.logs)?;
        p.wait_for_event("ready", Duration::from_secs(60))?;
        p
    };
    let mut fio_a = spawn_fio(
        ctx,
        &a.file,
        &disk.dev.path,
        before_s + 30,
        "switch.a",
        None,
    )?;
    sys::sleep(Duration::from_secs(before_s))?;
    fio_a.stop(Duration::from_secs(15));
    let mut fio_b = spawn_fio(ctx, &b.file, &disk.dev.path, after_s + 30, "switch.b", None)?;
    // The switch, on the agent's clock: its ticks count seconds from its start.
    let switch_at_s = agent_clock(&agent);
    sys::sleep(Duration::from_secs(after_s))?;
    fio_b.stop(Duration::from_secs(15));
    agent.stop(Duration::from_secs(30));
    let out = std::fs::read_to_string(&agent.stdout).unwrap_or_default();
    drop(agent);
    drop(disk);
    let points = out
        .lines()
        .filter_map(parse::parse_agent_line)
        .map(|l| (l.t_s, l.balanced_accuracy, l.model.map(|m| m.0)))
        .collect();
    let swaps = parse::agent_learning(&out);
    Ok(Switch {
        from: a.name.clone(),
        to: b.name.clone(),
        model,
        expiry,
        retrain_every_s: every,
        switch_at_s,
        points,
        swaps,
    })
}

/// The agent's clock (seconds of its last tick).
fn agent_clock(agent: &Proc) -> f64 {
    std::fs::read_to_string(&agent.stdout)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(parse::parse_agent_line)
        .map_or(0.0, |l| l.t_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_after_a_switch() {
        let acc = [
            0.8, 0.8, 0.81, 0.79, 0.8, 0.5, 0.55, 0.79, 0.6, 0.79, 0.8, 0.81, 0.8,
        ];
        let sw = Switch {
            from: "a".into(),
            to: "b".into(),
            model: PathBuf::from("m.json"),
            expiry: (4, 8),
            retrain_every_s: 5,
            switch_at_s: 5.0,
            points: acc
                .iter()
                .enumerate()
                .map(|(i, b)| ((i + 1) as f64, Some(*b), Some(1)))
                .collect(),
            swaps: Vec::new(),
        };
        // Before (t in 3..=5): 0.81, 0.79, 0.8 → 0.8.
        assert_eq!(sw.before(), Some(0.8));
        // After t = 5: 0.5 (6), 0.55 (7), 0.79 (8), 0.6 (9), 0.79 (10), 0.8, 0.81, 0.8 (13):
        // the last third (2 of 8) settles at 0.805.
        assert!((sw.settled().unwrap() - 0.805).abs() < 1e-12);
        assert_eq!(sw.lowest_after(), Some(0.5));
        assert_eq!(sw.seconds_to(0.8, 0.02), Some(5.0));
        assert_eq!(sw.seconds_to(0.8, 0.0), Some(6.0));
        assert_eq!(sw.seconds_to(0.9, 0.0), None);
        let none = Switch {
            points: Vec::new(),
            ..sw
        };
        assert_eq!(none.before(), None);
        assert_eq!(none.settled(), None);
        assert_eq!(none.seconds_to(0.5, 0.02), None);
    }

    #[test]
    fn shipped_models_prefer_kind_named_files() {
        let dir = std::env::temp_dir().join(format!("kml-bench-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a-logistic.json"), r#"{"kind":"logistic"}"#).unwrap();
        std::fs::write(dir.join("logistic.json"), r#"{"kind":"logistic"}"#).unwrap();
        std::fs::write(dir.join("tree.json"), r#"{"kind":"tree"}"#).unwrap();
        std::fs::write(dir.join("broken.json"), "{").unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        let found = shipped_models(&dir);
        let names: Vec<(String, String)> = found
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                )
            })
            .collect();
        assert_eq!(names[0], ("logistic".into(), "logistic.json".into()));
        assert_eq!(names[1], ("tree".into(), "tree.json".into()));
        assert_eq!(names[2], ("logistic".into(), "a-logistic.json".into()));
        assert_eq!(names.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
