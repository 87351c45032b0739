//! Measure 6, tuning on a stock kernel: mixed fio workloads on the direct-I/O loop
//! device on the real disk (the learning measure's), stock mq-deadline tunables vs
//! `kml-agent run --tune`, same workload, same seed, rounds alternating which arm
//! goes first.
//!
//! Both arms run the agent with the same starting model, so the observer's own cost
//! is in both and the difference is the tuning. The expiries are calibrated per
//! workload once (as in the learning measure: a high quantile of the stock waits)
//! and set in both arms: they are the latency targets the model predicts against.
//! Writes `DIR/TUNE.md`; `REPORT.md` includes it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::learning::{calibrate_expiries, open_disk, spawn_fio, Disk, CALIBRATION_QUANTILE};
use super::parse::{self, median, parse_fio_latency, FioLatency};
use super::sys::{self, Proc};
use super::{workload_name, Ctx};

/// The mixed read/write workloads the measure uses when it can (file stems in
/// `workloads/`), and the one of them a --quick run keeps.
pub const TUNE_WORKLOADS: [&str; 4] = [
    "randread-seqwrite",
    "checkpoint",
    "batch-writer",
    "write-heavy",
];
const QUICK_TUNE_WORKLOADS: usize = 2;
/// How often the tuner decides in this measure (short runs: faster than the default 5 s).
pub const TUNE_EVERY: &str = "2s";
/// The model both arms start from.
pub const MODEL: &str = "auto";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    Stock,
    Tune,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Arm::Stock => "stock",
            Arm::Tune => "tune",
        }
    }
}

pub struct ArmRun {
    pub arm: Arm,
    pub round: usize,
    pub fio: FioLatency,
    /// The agent's `tune ...: raise|relax|undo` lines.
    pub decisions: Vec<String>,
}

pub struct WorkloadTune {
    pub name: String,
    pub expiries_ms: (u64, u64),
    pub runs: Vec<ArmRun>,
}

pub struct TuneBench {
    pub runtime_s: u64,
    pub rounds: usize,
    pub nr_requests: Option<String>,
    pub workloads: Vec<WorkloadTune>,
    pub failed: Vec<(String, String)>,
}

impl WorkloadTune {
    /// Median over rounds of one arm's value.
    pub fn median(&self, arm: Arm, f: impl Fn(&FioLatency) -> f64) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.arm == arm)
            .map(|r| f(&r.fio))
            .collect();
        median(&v)
    }

    /// How far apart the stock arm's rounds are on `f` (max / min - 1): the noise
    /// a difference between the arms has to beat.
    pub fn stock_spread(&self, f: impl Fn(&FioLatency) -> f64) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.arm == Arm::Stock)
            .map(|r| f(&r.fio))
            .collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        (v.len() >= 2 && lo > 0.0).then(|| hi / lo - 1.0)
    }

    /// Relative change of the medians, tune vs stock (negative: lower with --tune).
    pub fn change(&self, f: impl Fn(&FioLatency) -> f64 + Copy) -> Option<f64> {
        let (s, t) = (self.median(Arm::Stock, f)?, self.median(Arm::Tune, f)?);
        (s > 0.0).then(|| t / s - 1.0)
    }
}

fn workloads(ctx: &Ctx) -> Vec<PathBuf> {
    let dir = ctx.root.join("workloads");
    let mut v: Vec<PathBuf> = TUNE_WORKLOADS
        .iter()
        .map(|n| dir.join(format!("{n}.fio")))
        .filter(|p| p.is_file())
        .collect();
    if ctx.quick {
        v.truncate(QUICK_TUNE_WORKLOADS);
    }
    v
}

pub fn run(ctx: &Ctx) -> Result<TuneBench> {
    let (runtime_s, rounds) = if ctx.quick { (15, 1) } else { (30, 3) };
    let disk = open_disk(ctx)?;
    let mut bench = TuneBench {
        runtime_s,
        rounds,
        nr_requests: disk.nr_requests.clone(),
        workloads: Vec::new(),
        failed: Vec::new(),
    };
    let jobs = workloads(ctx);
    if jobs.is_empty() {
        bail!("none of {TUNE_WORKLOADS:?} is in workloads/");
    }
    for job in &jobs {
        let name = workload_name(job);
        match one_workload(ctx, &disk, job, runtime_s, rounds) {
            Ok(w) => bench.workloads.push(w),
            Err(e) => {
                sys::check_interrupted()?;
                eprintln!("xtask: bench: tune {name} FAILED: {e:#}");
                bench.failed.push((name, format!("{e:#}")));
            }
        }
        disk.dev.set_expiries_ms(disk.defaults.0, disk.defaults.1)?;
    }
    let path = ctx.out.join("TUNE.md");
    std::fs::write(&path, render(ctx, &bench))
        .with_context(|| format!("writing {}", path.display()))?;
    super::report::write_goal(&path, &goal(&bench))?;
    eprintln!("xtask: bench: wrote {}", ctx.rel(&path));
    Ok(bench)
}

/// The tunables as the kernel reports them, to check each arm starts from stock.
fn tunables(disk: &Disk) -> Result<String> {
    let mut parts = Vec::new();
    for n in ["fifo_batch", "writes_starved", "async_depth"] {
        parts.push(format!(
            "{n} {}",
            disk.dev.read_attr(&format!("queue/iosched/{n}"))?
        ));
    }
    Ok(parts.join(", "))
}

fn one_workload(
    ctx: &Ctx,
    disk: &Disk,
    job: &Path,
    runtime_s: u64,
    rounds: usize,
) -> Result<WorkloadTune> {
    let name = workload_name(job);
    // The expiries calibrated at the stock settings, as in the learning measure.
    let (_, expiries_ms) = calibrate_expiries(ctx, disk, job, &format!("tune.{name}"), 1, 3)?;
    let stock = tunables(disk)?;
    eprintln!(
        "xtask: bench: tune {name}: read_expire {} ms, write_expire {} ms; stock {stock}",
        expiries_ms.0, expiries_ms.1
    );
    let mut out = WorkloadTune {
        name: name.clone(),
        expiries_ms,
        runs: Vec::new(),
    };
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Arm::Stock, Arm::Tune]
        } else {
            [Arm::Tune, Arm::Stock]
        };
        for arm in order {
            let now = tunables(disk)?;
            if now != stock {
                bail!(
                    "{name}: round {round} {} starts from {now}, not stock {stock}",
                    arm.name()
                );
            }
            let run = one_arm(ctx, disk, job, &name, arm, round, runtime_s)?;
            eprintln!(
                "xtask: bench: tune {name} round {round} {}: read mean {:.2} ms p99 {:.2} ms, write p99 {:.2} ms, {:.1} MB/s, {} decisions",
                arm.name(),
                run.fio.read_mean_ns / 1e6,
                run.fio.read_p99_ns / 1e6,
                run.fio.write_p99_ns / 1e6,
                run.fio.bytes_per_s / 1e6,
                run.decisions.len()
            );
            out.runs.push(run);
        }
    }
    Ok(out)
}

fn one_arm(
    ctx: &Ctx,
    disk: &Disk,
    job: &Path,
    name: &str,
    arm: Arm,
    round: usize,
    runtime_s: u64,
) -> Result<ArmRun> {
    let tag = format!("tune.{name}.{round}.{}", arm.name());
    let mut cmd = ctx.agent_cmd(false);
    cmd.args([
        "run",
        "--json",
        "--device",
        &disk.dev.name,
        "--model",
        MODEL,
    ]);
    if arm == Arm::Tune {
        cmd.args(["--tune", "--tune-every", TUNE_EVERY]);
    }
    let mut agent = Proc::spawn(&mut cmd, &format!("{tag}.agent"), &ctx.logs)?;
    agent.wait_for_event("ready", Duration::from_secs(60))?;
    let mut fio = spawn_fio(ctx, job, &disk.dev.path, runtime_s, &tag, None)?;
    fio.wait(Duration::from_secs(runtime_s + 60))?;
    let status = agent.stop(Duration::from_secs(20));
    if !status.is_some_and(|s| s.success()) {
        bail!(
            "{tag}: the agent ended badly ({status:?}): {}",
            sys::tail(&agent.stderr, 5)
        );
    }
    let json = ctx.logs.join(format!("{tag}.fio.json"));
    let fio = parse_fio_latency(
        &std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("parsing {}", json.display()))?;
    let out = std::fs::read_to_string(&agent.stdout).unwrap_or_default();
    let decisions = parse::agent_events(&out, "tick")
        .flat_map(|t| t["tuning"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    Ok(ArmRun {
        arm,
        round,
        fio,
        decisions,
    })
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |x| format!("{:+.1}%", 100.0 * x))
}

fn ms(x: Option<f64>) -> String {
    x.map_or("–".into(), |x| format!("{:.2}", x / 1e6))
}

/// Goals of issue 8, judged on the medians.
pub struct GoalCheck {
    pub mixed_met: Vec<String>,
    pub worse: Vec<String>,
}

pub fn verdict(b: &TuneBench) -> GoalCheck {
    let mut v = GoalCheck {
        mixed_met: Vec::new(),
        worse: Vec::new(),
    };
    for w in &b.workloads {
        let p99 = w.change(|f| f.read_p99_ns);
        let tput = w.change(|f| f.bytes_per_s);
        if p99.is_some_and(|c| c <= -0.10) && tput.is_some_and(|c| c >= -0.03) {
            v.mixed_met.push(w.name.clone());
        }
        let r = p99.unwrap_or(0.0);
        let wr = w.change(|f| f.write_p99_ns).unwrap_or(0.0);
        if r > 0.02 || wr > 0.02 {
            v.worse.push(format!(
                "{} (read p99 {}, write p99 {})",
                w.name,
                pct(Some(r)),
                pct(Some(wr))
            ));
        }
    }
    v
}

/// The issue goal and how far it was met, in one sentence (REPORT.md's summary
/// reads it from TUNE.json).
pub fn goal(b: &TuneBench) -> String {
    let v = verdict(b);
    format!(
        "Issue goal (≥ 10% lower read p99 with ≤ 3% throughput loss on mixed workloads): met on {} of {} ({}). \
         Worse than stock by more than 2% at p99 (read or write): {}.",
        v.mixed_met.len(),
        b.workloads.len(),
        if v.mixed_met.is_empty() { "none".to_owned() } else { v.mixed_met.join(", ") },
        if v.worse.is_empty() { "none".to_owned() } else { v.worse.join("; ") }
    )
}

pub fn render(ctx: &Ctx, b: &TuneBench) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Tuning mq-deadline on a stock kernel: stock vs `run --tune`\n"
    );
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench` (measure 6) on {} (kernel {}). Each workload runs {} s per arm, \
         {} round(s), the arm order alternating per round; the agent runs in both arms (`run --model {MODEL}`, \
         online learning on), with `--tune --tune-every {TUNE_EVERY}` in the tune arm only, so the observer's \
         cost is in both. Device: a direct-I/O loop device on the real disk, mq-deadline, nr_requests {}; \
         the expiries are calibrated per workload (p{:.0} of the stock waits) and set in both arms. \
         Values are medians over rounds; latencies are fio's completion latencies.\n",
        super::tool_version("date", "-u"),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        b.runtime_s,
        b.rounds,
        b.nr_requests.as_deref().unwrap_or("default"),
        CALIBRATION_QUANTILE * 100.0
    );
    if let Some(l) = super::loadavg().filter(|l| l[0] > 1.0) {
        let _ = writeln!(
            md,
            "> **Noise warning:** load average {:.1} when this was written: other work shared the machine.\n",
            l[0]
        );
    }
    let _ = writeln!(
        md,
        "| workload | expiries r/w ms | read mean ms stock → tune | read p99 ms | read p99.9 ms | write p99 ms | MB/s | decisions (tune arm) | stock rounds' read p99 spread |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for w in &b.workloads {
        let cell = |f: fn(&FioLatency) -> f64, scale: fn(Option<f64>) -> String| {
            format!(
                "{} → {} ({})",
                scale(w.median(Arm::Stock, f)),
                scale(w.median(Arm::Tune, f)),
                pct(w.change(f))
            )
        };
        let decisions: usize = w
            .runs
            .iter()
            .filter(|r| r.arm == Arm::Tune)
            .map(|r| r.decisions.len())
            .sum();
        let spread = w
            .stock_spread(|f| f.read_p99_ns)
            .map_or("–".into(), |x| format!("{:.1}%", 100.0 * x));
        let _ = writeln!(
            md,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {spread} |",
            w.name,
            w.expiries_ms.0,
            w.expiries_ms.1,
            cell(|f| f.read_mean_ns, ms),
            cell(|f| f.read_p99_ns, ms),
            cell(|f| f.read_p999_ns, ms),
            cell(|f| f.write_p99_ns, ms),
            cell(
                |f| f.bytes_per_s,
                |x| x.map_or("–".into(), |x| format!("{:.1}", x / 1e6))
            ),
            decisions
        );
    }
    for (n, e) in &b.failed {
        let _ = writeln!(
            md,
            "| {n} | FAILED: {} | | | | | | | |",
            e.replace('|', "/")
        );
    }
    let _ = writeln!(
        md,
        "\n{} A change smaller than the stock rounds' own spread (last column) is noise, not an effect.\n",
        goal(b)
    );
    let _ = writeln!(md, "Every run:\n");
    let _ = writeln!(md, "| workload | round | arm | read mean ms | read p99 ms | read p99.9 ms | write p99 ms | MB/s | decisions |");
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for w in &b.workloads {
        for r in &w.runs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} |",
                w.name,
                r.round,
                r.arm.name(),
                r.fio.read_mean_ns / 1e6,
                r.fio.read_p99_ns / 1e6,
                r.fio.read_p999_ns / 1e6,
                r.fio.write_p99_ns / 1e6,
                r.fio.bytes_per_s / 1e6,
                r.decisions.len()
            );
        }
    }
    let examples: Vec<&String> = b
        .workloads
        .iter()
        .flat_map(|w| w.runs.iter().flat_map(|r| r.decisions.iter()))
        .take(6)
        .collect();
    if !examples.is_empty() {
        let _ = writeln!(md, "\nSome decisions, as the agent logged them:\n\n```");
        for e in examples {
            let _ = writeln!(md, "{}", e.trim());
        }
        let _ = writeln!(md, "```");
    }
    let _ = writeln!(
        md,
        "\nLogs: `{}/tune.*` (fio JSON and agent output per run).",
        ctx.rel(&ctx.logs)
    );
    md
}
