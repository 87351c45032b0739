//! Measure 1, observer overhead, and measure 3's live part (the agent's ingest rate,
//! drops, CPU and memory). fio 4k random reads at iodepth 32 on a loop device backed
//! by a file on a private tmpfs (buffered loop: tmpfs has no O_DIRECT; mq-deadline),
//! with no probes, with kml observing (`run --model none`), with kml observing and
//! scoring every request (`run --model M`), and with bpftrace keeping a per-request
//! map on the same three tracepoints. The configurations alternate, round after
//! round (the order rotates), and each is reported as the median of its per-round
//! ratio to the no-probe IOPS of the same round.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::learning::{fio_result, spawn_fio, Models};
use super::parse::{self, FioSummary};
use super::sys::{self, LoopDevice, Proc, TmpfsMount};
use super::Ctx;

/// The four configurations, in the order of the first round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    None,
    Observe,
    Infer,
    Bpftrace,
}

impl Config {
    pub fn label(self) -> &'static str {
        match self {
            Config::None => "no probes",
            Config::Observe => "kml observe",
            Config::Infer => "kml observe + infer",
            Config::Bpftrace => "bpftrace",
        }
    }
}

/// What the agent did during one fio run.
#[derive(Clone, Debug, Default)]
pub struct AgentSample {
    /// Records the agent reported in total (it ran a little longer than fio).
    pub records: u64,
    pub drops: u64,
    /// CPU seconds (user + system) of the agent while fio ran, and fio's wall time.
    pub cpu_s: f64,
    pub wall_s: f64,
    pub hwm_kib: u64,
    /// Median records/s of the agent's live lines while fio ran.
    pub live_rate: Option<f64>,
}

pub struct Sample {
    pub round: usize,
    pub config: Config,
    pub fio: FioSummary,
    pub agent: Option<AgentSample>,
    /// Why this sample is left out of the ratios (the tracer did not work as it should).
    pub invalid: Option<String>,
}

pub struct Overhead {
    pub rounds: usize,
    pub secs: u64,
    pub pinned: bool,
    pub model: Option<(String, PathBuf)>,
    pub samples: Vec<Sample>,
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
}

impl Overhead {
    pub fn configs(&self) -> Vec<Config> {
        let mut v: Vec<Config> = Vec::new();
        for s in &self.samples {
            if !v.contains(&s.config) {
                v.push(s.config);
            }
        }
        v
    }

    /// Per-round ratios of `c`'s IOPS to the no-probe IOPS of the same round.
    pub fn ratios(&self, c: Config) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.config == c && s.invalid.is_none())
            .filter_map(|s| {
                let base = self
                    .samples
                    .iter()
                    .find(|b| b.round == s.round && b.config == Config::None)?;
                (base.fio.iops() > 0.0).then(|| s.fio.iops() / base.fio.iops())
            })
            .collect()
    }

    pub fn iops(&self, c: Config) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.config == c)
            .map(|s| s.fio.iops())
            .collect()
    }

    pub fn median_ratio(&self, c: Config) -> Option<f64> {
        parse::median(&self.ratios(c))
    }
}

pub fn job_file(ctx: &Ctx) -> PathBuf {
    ctx.root.join("bench").join("overhead-randread.fio")
}

pub fn bpftrace_script(ctx: &Ctx) -> PathBuf {
    ctx.root.join("bench").join("overhead.bt")
}

fn proc_read(pid: u32, what: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{what}")).unwrap_or_default()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    parse::parse_proc_stat_cpu_ticks(&proc_read(pid, "stat")).ok()
}

/// Starts the agent observing `dev` (`model`: a model file, or none) and waits until
/// it has attached.
pub fn start_agent(ctx: &Ctx, dev: &LoopDevice, model: Option<&Path>, name: &str) -> Result<Proc> {
    let mut cmd = ctx.agent_cmd(true);
    cmd.args([
        "run",
        "--json",
        "--device",
        &dev.name,
        "--retrain-every",
        "0",
        "--model",
    ]);
    match model {
        Some(m) => cmd.arg(m),
        None => cmd.arg("none"),
    };
    let mut p = Proc::spawn(&mut cmd, name, &ctx.logs)?;
    p.wait_for_event("ready", Duration::from_secs(60))?;
    Ok(p)
}

fn start_bpftrace(ctx: &Ctx, name: &str) -> Result<Proc> {
    let mut cmd = if ctx.pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", "bpftrace"]);
        c
    } else {
        Command::new("bpftrace")
    };
    cmd.arg(bpftrace_script(ctx));
    let mut p = Proc::spawn(&mut cmd, name, &ctx.logs)?;
    p.wait_for_output("Attaching", Duration::from_secs(60))?;
    // bpftrace prints that line before it loads and attaches: wait for its three
    // programs, then a moment for the attachment.
    let end = Instant::now() + Duration::from_secs(60);
    while sys::prog_ids(p.pid()).len() < 3 {
        if Instant::now() > end {
            bail!(
                "bpftrace did not load its 3 programs within 60 s: {}",
                sys::tail(&p.stderr, 5)
            );
        }
        if let Some(s) = p.poll()? {
            bail!(
                "bpftrace ended ({}): {}",
                crate::util::describe_status(s),
                sys::tail(&p.stderr, 5)
            );
        }
        sys::sleep(Duration::from_millis(100))?;
    }
    sys::sleep(Duration::from_millis(1000))?;
    Ok(p)
}

/// One fio run of `secs` on `dev`.
fn fio(ctx: &Ctx, dev: &LoopDevice, secs: u64, name: &str) -> Result<FioSummary> {
    let cpus = ctx.pin.then_some("0");
    let mut p = spawn_fio(ctx, &job_file(ctx), &dev.path, secs, name, cpus)?;
    let status = p.wait(Duration::from_secs(secs + 60))?;
    if !status.success() {
        anyhow::bail!(
            "fio failed ({}): {}",
            crate::util::describe_status(status),
            sys::tail(&p.stderr, 5)
        );
    }
    fio_result(ctx, name)
}

fn measure(
    ctx: &Ctx,
    dev: &LoopDevice,
    config: Config,
    model: Option<&Path>,
    secs: u64,
    name: &str,
) -> Result<Sample> {
    let mut tracer = match config {
        Config::None => None,
        Config::Observe => Some(start_agent(ctx, dev, None, &format!("{name}.agent"))?),
        Config::Infer => Some(start_agent(ctx, dev, model, &format!("{name}.agent"))?),
        Config::Bpftrace => Some(start_bpftrace(ctx, &format!("{name}.bpftrace"))?),
    };
    let is_agent = matches!(config, Config::Observe | Config::Infer);
    let pid = tracer.as_ref().map(Proc::pid);
    let t0 = Instant::now();
    let ticks0 = pid.filter(|_| is_agent).and_then(cpu_ticks);
    let result = fio(ctx, dev, secs, name)?;
    let wall_s = t0.elapsed().as_secs_f64();
    let ticks1 = pid.filter(|_| is_agent).and_then(cpu_ticks);
    let hwm = pid
        .and_then(|p| parse::parse_kib_field(&proc_read(p, "status"), "VmHWM"))
        .unwrap_or(0);
    let mut agent = None;
    let mut invalid = None;
    if let Some(mut p) = tracer.take() {
        let status = p.stop(Duration::from_secs(20));
        if config == Config::Bpftrace {
            let out = std::fs::read_to_string(&p.stdout).unwrap_or_default();
            let completed = out
                .lines()
                .find_map(|l| l.strip_prefix("@completed: ")?.trim().parse::<u64>().ok());
            if completed.is_none_or(|n| n < result.ios() / 2) {
                invalid = Some(format!(
                    "bpftrace counted {} completions of fio's {} I/Os (exit: {}): it was not (fully) attached",
                    completed.map_or("no".into(), |n| n.to_string()),
                    result.ios(),
                    status.map_or("killed".into(), crate::util::describe_status)
                ));
            }
        }
        if is_agent {
            let out = std::fs::read_to_string(&p.stdout).unwrap_or_default();
            let (records, _agent_secs, drops) =
                parse::parse_agent_summary(&out).with_context(|| {
                    format!(
                        "the agent ({}) printed no summary: {}",
                        status.map_or("?".into(), crate::util::describe_status),
                        sys::tail(&p.stderr, 5)
                    )
                })?;
            let lines: Vec<f64> = out
                .lines()
                .filter_map(parse::parse_agent_line)
                .map(|l| l.records_per_s)
                .filter(|r| *r > 0.0)
                .collect();
            let tck = sys::clock_ticks_per_second() as f64;
            agent = Some(AgentSample {
                records,
                drops,
                cpu_s: match (ticks0, ticks1) {
                    (Some(a), Some(b)) => b.saturating_sub(a) as f64 / tck,
                    _ => f64::NAN,
                },
                wall_s,
                hwm_kib: hwm,
                live_rate: parse::median(&lines),
            });
        }
    }
    Ok(Sample {
        round: 0,
        config,
        fio: result,
        agent,
        invalid,
    })
}

pub fn run(ctx: &Ctx, models: Option<&Models>) -> Result<Overhead> {
    // Many short rounds: the pairing within a round follows the load of other tenants.
    let (rounds, secs) = if ctx.quick { (1, 5) } else { (7, 4) };
    let model = models.and_then(|m| {
        ["logistic", "linear", "tree"]
            .iter()
            .find_map(|k| m.get(k).map(|p| (k.to_string(), p.to_path_buf())))
    });
    let load_before = super::loadavg();
    let mount = TmpfsMount::mount(&ctx.work.join("tmpfs"), "1200m")?;
    let file = mount.dir.join("disk");
    crate::util::run(Command::new("fallocate").args(["-l", "1G"]).arg(&file))?;
    let dev = LoopDevice::attach(&file, false)?;
    dev.use_mq_deadline()?;
    let mut configs = vec![Config::None, Config::Observe];
    if model.is_some() {
        configs.push(Config::Infer);
    }
    configs.push(Config::Bpftrace);
    // Warm-up (page cache, fio), not measured.
    fio(ctx, &dev, 2, "overhead.warmup")?;
    let mut samples = Vec::new();
    for round in 0..rounds {
        for i in 0..configs.len() {
            let config = configs[(i + round) % configs.len()];
            sys::check_interrupted()?;
            let name = format!(
                "overhead.r{round}.{}",
                config.label().replace([' ', '+'], "")
            );
            let mut s = measure(
                ctx,
                &dev,
                config,
                model.as_ref().map(|m| m.1.as_path()),
                secs,
                &name,
            )?;
            s.round = round;
            eprintln!(
                "xtask: bench: overhead round {} {:<20} {:>9.0} IOPS",
                round + 1,
                config.label(),
                s.fio.iops()
            );
            samples.push(s);
        }
    }
    drop(dev);
    drop(mount);
    Ok(Overhead {
        rounds,
        secs,
        pinned: ctx.pin,
        model,
        samples,
        load_before,
        load_after: super::loadavg(),
    })
}
