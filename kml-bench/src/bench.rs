//! `cargo xtask bench`: every headline number from one command, into a report.
//!
//! ```text
//! cargo xtask bench [--quick] [--workload FILE.fio]... [--out DIR] [--pin] [--only PHASES]
//! ```
//! Builds the release agent, then measures on this machine (needs root): learning
//! quality per fio workload (on a direct-I/O loop device on the real disk), training
//! time on 1 M requests (with scikit-learn as a reference), observer overhead (fio
//! IOPS on a tmpfs-backed loop device with and without probes, and with bpftrace),
//! in-kernel cost per event (`kernel.bpf_stats_enabled`), and the agent's CPU, memory
//! and ingest rate. Writes `DIR/REPORT.md` (default `bench/`) with SVG plots beside it.
//! Work files (traces, models, logs) go to `target/bench/`.
//!
//! It only measures: it never judges a number, and exits non-zero only when the
//! harness itself fails. Loop devices, the tmpfs mount, `bpf_stats_enabled` and the
//! child processes are undone by guards, also on an error or Ctrl-C.

pub mod alternation;
mod before;
mod breakdown;
mod cost;
pub mod fiolog;
mod learning;
mod overhead;
mod overhead_report;
pub mod parse;
mod refs;
mod report;
pub mod stats;
mod svg;
pub mod sys;
mod trace;
mod training;
mod tune;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::build::build_all;
use crate::util::{self, workspace_root};

/// The phases, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Phase {
    /// Learning quality per workload (records traces, trains, evaluates).
    Learning,
    /// Training time on 1 M requests, kml and scikit-learn.
    Training,
    /// Observer overhead (fio IOPS ratios) and the agent's CPU / memory / ingest.
    Overhead,
    /// In-kernel ns per event (bpf_stats).
    Cost,
    /// Where the observer's ns per event go: cost probes paired with the whole
    /// observer (writes BREAKDOWN.md).
    Breakdown,
    /// Stock mq-deadline tunables vs `run --tune` on mixed workloads (writes TUNE.md).
    Tune,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Learning,
        Phase::Training,
        Phase::Overhead,
        Phase::Cost,
        Phase::Breakdown,
        Phase::Tune,
    ];
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Shorter runs: 3 overhead cycles, 2 tune cycles of 2 workloads, shorter traces.
    #[arg(long)]
    pub quick: bool,
    /// fio job files for the learning measure (repeat); the device is passed as
    /// FILENAME and the run time as RUNTIME in the environment. Default: workloads/*.fio.
    #[arg(long, value_name = "FILE.fio")]
    pub workload: Vec<PathBuf>,
    /// Where the report (REPORT.md) and its SVG plots go (relative: to the workspace root).
    #[arg(long, value_name = "DIR", default_value = "bench")]
    pub out: PathBuf,
    /// Pin fio to CPU 0 and the agent / bpftrace to CPU 1 in the overhead measure
    /// (default: no pinning, the scheduler places everything, as in production).
    #[arg(long)]
    pub pin: bool,
    /// Run only these phases (comma-separated); the report says which did not run.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Phase>,
    /// Overhead: cycles of the alternation (every arm once per cycle, inside one fio
    /// run). Default 20 (--quick: 3).
    #[arg(long, value_name = "N")]
    pub cycles: Option<usize>,
    /// Overhead: measured seconds per arm and cycle (plus 0.5 s so that whole seconds
    /// of fio's log fit, after 1 s of settling). Default 4.
    #[arg(long, value_name = "S")]
    pub arm_secs: Option<u64>,
    /// Overhead: the arms to run (comma-separated: none, aa, null, biolatency,
    /// biosnoop, bpftrace, observe, infer, infer-position); `none`, the baseline,
    /// always runs. Default: all.
    #[arg(long, value_delimiter = ',', value_name = "ARMS")]
    pub arms: Vec<String>,
    /// Overhead: also run the agent of this git revision (built once into
    /// ~/.cache/kml/bench-before/) as arms of the same run: the before/after of a change.
    /// Breakdown: one more pair, that agent beside this tree's (ns per event, paired).
    /// Cost: the position model on the deep queue, that agent's and this tree's,
    /// each alone, alternating (10 rounds; ns per event, this tree minus REV).
    #[arg(long, value_name = "REV")]
    pub before: Option<String>,
    /// Tune: cycles of stock / stock again / tune per workload. Default 6 (--quick: 2).
    #[arg(long, value_name = "N")]
    pub tune_cycles: Option<usize>,
    /// Cost: mq-deadline's read and write expiry on the measure's device, in ms
    /// (default: the kernel's, 500 / 5,000 ms). The position state's age ring has
    /// periods of an eighth to a quarter of the expiry: at the default, every
    /// request of the deep queue sits in its newest one or two; at the 4-12 ms the
    /// project's workloads use, the queue spans many.
    #[arg(long, value_name = "MS")]
    pub cost_expire_ms: Option<u64>,
}

/// What every phase needs.
pub struct Ctx {
    pub root: PathBuf,
    pub agent: PathBuf,
    /// `target/bench`: traces, models, logs (not kept in the repository).
    pub work: PathBuf,
    pub logs: PathBuf,
    pub out: PathBuf,
    pub quick: bool,
    pub pin: bool,
    pub workloads: Vec<PathBuf>,
    pub cycles: Option<usize>,
    pub arm_secs: Option<u64>,
    pub arms: Vec<String>,
    /// `--before REV`: that revision's agent, built (or found in the cache)
    /// before any phase measures; `None` also when no phase selected runs it.
    pub before: Option<before::BeforeAgent>,
    pub tune_cycles: Option<usize>,
    pub cost_expire_ms: Option<u64>,
    /// The command line, for the reports.
    pub command: String,
}

impl Ctx {
    /// A path shown relative to the workspace root when it is inside it.
    pub fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.root)
            .unwrap_or(p)
            .display()
            .to_string()
    }

    /// `kml-agent ARGS`, prefixed with `taskset -c 1` when pinning.
    pub fn agent_cmd(&self, pin_to_tracer_cpu: bool) -> Command {
        self.agent_cmd_of(&self.agent, pin_to_tracer_cpu)
    }

    /// [`Ctx::agent_cmd`] for another agent binary (one of `--before`).
    pub fn agent_cmd_of(&self, binary: &Path, pin_to_tracer_cpu: bool) -> Command {
        if pin_to_tracer_cpu && self.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(binary);
            c
        } else {
            Command::new(binary)
        }
    }
}

/// Results of one phase: its value, or why it failed or did not run.
pub enum Outcome<T> {
    Done(T),
    Failed(String),
    Skipped(String),
}

impl<T> Outcome<T> {
    pub fn done(&self) -> Option<&T> {
        match self {
            Outcome::Done(t) => Some(t),
            _ => None,
        }
    }
}

/// Machine and run facts for the report's header.
pub struct RunInfo {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_gib: f64,
    pub quick: bool,
    pub command: String,
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
    /// The `--before` agent, when this run built it (not found in the cache).
    pub before_build: Option<BeforeBuild>,
    pub duration: Duration,
    pub tools: Vec<String>,
}

/// A `--before` agent built by the run, before its measures.
pub struct BeforeBuild {
    /// Its commit, abbreviated.
    pub commit: String,
    pub secs: f64,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn loadavg() -> Option<[f64; 3]> {
    parse::parse_loadavg(&read("/proc/loadavg"))
}

fn tool_version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{program}: unknown version"))
}

impl BenchArgs {
    pub fn execute(self) -> Result<ExitCode> {
        if !util::is_root()? {
            eprintln!("xtask: bench needs root (loop devices, mounts, BPF, sysctl); run as root");
            return Ok(ExitCode::FAILURE);
        }
        let started = Instant::now();
        let root = workspace_root();
        let out = if self.out.is_absolute() {
            self.out.clone()
        } else {
            root.join(&self.out)
        };
        let workloads = if self.workload.is_empty() {
            let mut all = default_workloads(&root)?;
            if self.quick {
                all.truncate(learning::QUICK_WORKLOADS);
            }
            all
        } else {
            self.workload
                .iter()
                .map(|w| {
                    std::fs::canonicalize(w).with_context(|| format!("workload {}", w.display()))
                })
                .collect::<Result<_>>()?
        };
        let phases: Vec<Phase> = if self.only.is_empty() {
            Phase::ALL.to_vec()
        } else {
            self.only.clone()
        };

        let agent = build_all(true)?;
        sys::install_signal_handlers();
        let work = root.join("target").join("bench");
        let logs = work.join("logs");
        for d in [&work, &logs, &out] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut args_line = vec!["cargo xtask bench".to_owned()];
        if self.quick {
            args_line.push("--quick".into());
        }
        if self.pin {
            args_line.push("--pin".into());
        }
        if !self.only.is_empty() {
            let names: Vec<String> = self
                .only
                .iter()
                .map(|p| format!("{p:?}").to_lowercase())
                .collect();
            args_line.push(format!("--only {}", names.join(",")));
        }
        for w in &self.workload {
            args_line.push(format!("--workload {}", w.display()));
        }
        if let Some(n) = self.cycles {
            args_line.push(format!("--cycles {n}"));
        }
        if let Some(s) = self.arm_secs {
            args_line.push(format!("--arm-secs {s}"));
        }
        if !self.arms.is_empty() {
            args_line.push(format!("--arms {}", self.arms.join(",")));
        }
        if let Some(r) = &self.before {
            args_line.push(format!("--before {r}"));
        }
        if let Some(n) = self.tune_cycles {
            args_line.push(format!("--tune-cycles {n}"));
        }
        if let Some(ms) = self.cost_expire_ms {
            args_line.push(format!("--cost-expire-ms {ms}"));
        }
        // The `--before` agent, built once before any phase measures, so that its
        // compile shares the CPUs with no measure and the report can say that the
        // load average at the start counts it. A revision that does not build
        // stops the run here, before minutes of measures that would lack the
        // comparison asked for.
        let before_agent = match &self.before {
            Some(rev)
                if [Phase::Overhead, Phase::Cost, Phase::Breakdown]
                    .iter()
                    .any(|p| phases.contains(p)) =>
            {
                Some(before::build(&root, rev)?)
            }
            _ => None,
        };
        let before_build = before_agent.as_ref().and_then(|b| {
            b.built_secs.map(|secs| BeforeBuild {
                commit: b.short().to_owned(),
                secs,
            })
        });
        let ctx = Ctx {
            root: root.clone(),
            agent,
            work,
            logs,
            out,
            quick: self.quick,
            pin: self.pin,
            workloads,
            cycles: self.cycles,
            arm_secs: self.arm_secs,
            arms: self.arms.clone(),
            before: before_agent,
            tune_cycles: self.tune_cycles,
            cost_expire_ms: self.cost_expire_ms,
            command: args_line.join(" "),
        };
        let load_before = loadavg();
        eprintln!(
            "xtask: bench: phases {:?}, {} workload(s), work files in {}, report in {}",
            phases,
            ctx.workloads.len(),
            ctx.rel(&ctx.work),
            ctx.rel(&ctx.out)
        );

        let want = |p: Phase| phases.contains(&p);
        let learning = if want(Phase::Learning) {
            run_phase("learning", || learning::run(&ctx))
        } else {
            not_run()
        };
        check_interrupt()?;
        let training = if want(Phase::Training) {
            run_phase("training", || training::run(&ctx))
        } else {
            not_run()
        };
        check_interrupt()?;
        let models = if want(Phase::Overhead) || want(Phase::Cost) {
            run_phase("models", || {
                learning::models_for_inference(&ctx, learning.done())
            })
        } else {
            not_run()
        };
        check_interrupt()?;
        let overhead = if want(Phase::Overhead) {
            run_phase("overhead", || overhead::run(&ctx, models.done()))
        } else {
            not_run()
        };
        check_interrupt()?;
        let cost = if want(Phase::Cost) {
            run_phase("cost", || cost::run(&ctx, models.done()))
        } else {
            not_run()
        };
        check_interrupt()?;
        let breakdown = if want(Phase::Breakdown) {
            run_phase("breakdown", || {
                let b = breakdown::run(&ctx)?;
                let path = breakdown::write(
                    &ctx,
                    &b,
                    read("/proc/sys/kernel/osrelease").trim(),
                    &tool_version("date", "-u"),
                )?;
                eprintln!("xtask: bench: wrote {}", ctx.rel(&path));
                Ok(b)
            })
        } else {
            not_run()
        };
        check_interrupt()?;
        let tune = if want(Phase::Tune) {
            run_phase("tune", || tune::run(&ctx))
        } else {
            not_run()
        };
        check_interrupt()?;
        // Only the overhead, breakdown and/or tuning measures: their sections of the
        // existing report are replaced, the other measures' results stay as they were.
        if phases
            .iter()
            .all(|p| matches!(p, Phase::Overhead | Phase::Breakdown | Phase::Tune))
            && ctx.out.join("REPORT.md").is_file()
        {
            if want(Phase::Breakdown) && !matches!(breakdown, Outcome::Failed(_)) {
                let path = report::splice_breakdown(&ctx)?;
                eprintln!(
                    "xtask: bench: updated the breakdown in section 2 of {}",
                    ctx.rel(&path)
                );
            }
            if want(Phase::Overhead) && !matches!(overhead, Outcome::Failed(_)) {
                let path = report::splice_overhead(&ctx)?;
                eprintln!(
                    "xtask: bench: updated the overhead section of {}",
                    ctx.rel(&path)
                );
            }
            if want(Phase::Tune) {
                let path = report::splice_tune(&ctx)?;
                eprintln!(
                    "xtask: bench: updated the tuning section of {}",
                    ctx.rel(&path)
                );
            }
            return Ok(
                if matches!(tune, Outcome::Failed(_))
                    || matches!(overhead, Outcome::Failed(_))
                    || matches!(breakdown, Outcome::Failed(_))
                {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            );
        }
        let vm_report = root.join("target").join("vm").join("report.md");
        let vm = report::SubReport::read(&vm_report);

        let info = RunInfo {
            date: tool_version("date", "-u"),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
                })
                .unwrap_or_else(|| "unknown CPU".into()),
            mem_gib: parse::parse_kib_field(&read("/proc/meminfo"), "MemTotal").unwrap_or(0) as f64
                / (1 << 20) as f64,
            quick: ctx.quick,
            command: ctx.command.clone(),
            load_before,
            load_after: loadavg(),
            before_build,
            duration: started.elapsed(),
            tools: vec![
                tool_version("fio", "--version"),
                tool_version("bpftrace", "--version"),
                tool_version("bpftool", "--version"),
            ],
        };
        let failed = [
            matches!(learning, Outcome::Failed(_)),
            matches!(training, Outcome::Failed(_)),
            matches!(models, Outcome::Failed(_)),
            matches!(overhead, Outcome::Failed(_)),
            matches!(cost, Outcome::Failed(_)),
            matches!(breakdown, Outcome::Failed(_)),
            matches!(tune, Outcome::Failed(_)),
        ]
        .iter()
        .any(|f| *f);
        let results = report::Results {
            info,
            learning,
            training,
            models,
            overhead,
            cost,
            overhead_md: std::fs::read_to_string(ctx.out.join(overhead::OVERHEAD_MD)).ok(),
            breakdown_md: std::fs::read_to_string(ctx.out.join(breakdown::BREAKDOWN_MD)).ok(),
            vm,
            tune: report::SubReport::read(&ctx.out.join("TUNE.md")),
        };
        let path = report::write(&ctx, &results)?;
        eprintln!(
            "xtask: bench: wrote {} in {:.0}s{}",
            ctx.rel(&path),
            started.elapsed().as_secs_f64(),
            if failed {
                " (some measures FAILED: see the report)"
            } else {
                ""
            }
        );
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

fn not_run<T>() -> Outcome<T> {
    Outcome::Skipped("not selected (--only)".to_owned())
}

fn check_interrupt() -> Result<()> {
    if sys::interrupted() {
        bail!("interrupted: no report written (everything set up was undone)");
    }
    Ok(())
}

/// Runs one phase; an error becomes a `Failed` outcome (the other phases still run),
/// except an interruption, which stops the whole run after the guards have run.
fn run_phase<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Outcome<T> {
    eprintln!("xtask: bench: === {name} ===");
    let t = Instant::now();
    match f() {
        Ok(v) => {
            eprintln!(
                "xtask: bench: {name} done in {:.0}s",
                t.elapsed().as_secs_f64()
            );
            Outcome::Done(v)
        }
        Err(e) if sys::interrupted() => {
            eprintln!("xtask: bench: {name} interrupted");
            Outcome::Failed(format!("interrupted: {e:#}"))
        }
        Err(e) => {
            eprintln!("xtask: bench: {name} FAILED: {e:#}");
            Outcome::Failed(format!("{e:#}"))
        }
    }
}

/// `workloads/*.fio`, sorted.
fn default_workloads(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("workloads");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "fio") && p.is_file())
        .collect();
    v.sort();
    if v.is_empty() {
        bail!(
            "no workload: {} has no *.fio and no --workload was given",
            dir.display()
        );
    }
    Ok(v)
}

/// The name of a workload: its file stem.
pub fn workload_name(p: &Path) -> String {
    p.file_stem()
        .map_or_else(|| "workload".into(), |s| s.to_string_lossy().into_owned())
}
