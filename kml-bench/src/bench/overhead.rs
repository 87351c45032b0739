//! Measure 1, observer overhead, with the live part of measure 3 (the agent's CPU,
//! memory and drops) and the per-event in-kernel cost of one observer at a time.
//!
//! **One long fio run** (4k random reads, iodepth 32, O_DIRECT, on a loop device
//! backed by a file on a private tmpfs; mq-deadline) carries every arm: no probes,
//! no probes again (the A/A arm, for the noise floor), the null observer, the
//! biolatency- and biosnoop-style references, bpftrace, kml observe, and kml
//! observing and inferring (and the same two with the agent of `--before REV`). Each arm is attached,
//! given `settle` to start, measured for `measure`, and detached, cycle after cycle
//! ([`super::alternation`]). fio logs IOPS per second; each second is credited to the
//! arm whose window holds it whole ([`super::fiolog`]), and an arm's ratio to no
//! probes is the ratio of the two arms' mean IOPS over the cycles, with a bootstrap
//! interval over cycles ([`super::stats`]). The machine's kernel CPU time per I/O
//! comes from /proc/stat at the window edges.
//!
//! How kml is switched on and off: **the agent is started for its arm and stopped
//! after it** (`kml-agent run --model none|M --retrain-every 0 --metrics ADDR`); its
//! window opens `settle` after its metrics page lists its three attached programs,
//! so loading, verification and attach, and the exit, fall in dropped seconds. A
//! restart (rather than a control that attaches and detaches a running agent) works
//! for any agent binary, so the agent of an earlier revision (`--before`) is
//! measured the same way as this one. The reference programs are loaded once and only
//! attached and detached per arm; bpftrace is started and stopped like the agent.
//!
//! A second, shorter fio run with `kernel.bpf_stats_enabled=1` measures ns per event
//! of the insert, issue and complete programs of one observer at a time (the
//! references and the agents), the same way arm by arm.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use kml_ebpf_common::bench_refs::RefKind;

use super::alternation::{self, Arms, Measured, Schedule, TaskTimes};
use super::before::BeforeAgent;
use super::fiolog::{self, Window};
use super::learning::{fio_result, spawn_fio_with, Models, POSITION_MODEL};
use super::parse::{self, EventProg, FioSummary};
use super::refs::RefPrograms;
use super::stats::{self, Estimate};
use super::sys::{self, LoopDevice, Proc, SysctlGuard, TmpfsMount};
use super::Ctx;

/// The arms `--arms` can choose, in report order. `none` (the baseline) always runs.
pub const ARM_KEYS: [&str; 9] = [
    "none",
    "aa",
    "null",
    "biolatency",
    "biosnoop",
    "bpftrace",
    "observe",
    "infer",
    "infer-position",
];

#[derive(Clone, Debug)]
pub enum ArmKind {
    NoProbe,
    Ref(RefKind),
    Bpftrace,
    Agent {
        binary: PathBuf,
        model: Option<PathBuf>,
    },
}

#[derive(Clone, Debug)]
pub struct ArmSpec {
    /// `none`, `aa`, ..., `observe@before`.
    pub key: String,
    pub label: String,
    pub kind: ArmKind,
}

impl ArmSpec {
    pub fn is_agent(&self) -> bool {
        matches!(self.kind, ArmKind::Agent { .. })
    }
}

impl Overhead {
    /// Index of the arm with `key` in [`Overhead::arms`].
    pub fn arm(&self, key: &str) -> Option<usize> {
        self.arms.iter().position(|a| a.key == key)
    }

    /// Index of the arm with `key` in the bpf_stats run.
    pub fn cost_arm(&self, key: &str) -> Option<usize> {
        let i = self.arm(key)?;
        self.cost_arms.iter().position(|&c| c == i)
    }
}

/// The agent process's numbers at one instant, from its metrics page (`--metrics`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentStats {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub records: u64,
    pub drops: u64,
    /// CPU and memory came from /proc/PID (an agent without process metrics,
    /// such as one of `--before`), not from its metrics page.
    pub from_proc: bool,
}

/// What an edge of a window samples.
#[derive(Clone, Debug, Default)]
pub struct ArmSample {
    pub agent: Option<AgentStats>,
    /// biosnoop: records its reader consumed, ring-full drops.
    pub snoop: Option<(u64, u64)>,
    /// With bpf_stats: (run time ns, runs) of the insert, issue, complete programs.
    pub progs: Option<[Option<(u64, u64)>; 3]>,
    /// The consumer's threads (the agent, bpftrace, biosnoop's reader), if any.
    pub consumer: Option<TaskTimes>,
}

/// One alternation run: its arms, schedule, windows and fio's per-second log.
pub struct Run {
    pub schedule: Schedule,
    pub measured: Vec<Measured<ArmSample>>,
    /// Per measured window: seconds of fio's IOPS log inside it and their sum.
    pub iops: Vec<(usize, f64)>,
    /// fio's own summary of the whole run.
    pub fio: Option<FioSummary>,
    /// Windows left out, with the reason (e.g. bpftrace was not attached).
    pub invalid: Vec<(usize, String)>,
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
    pub wall_s: f64,
}

pub struct Overhead {
    pub command: String,
    pub arms: Vec<ArmSpec>,
    pub pinned: bool,
    pub before: Option<(String, String)>,
    pub ticks_per_s: f64,
    pub main: Run,
    /// The bpf_stats run (per-event cost), or why it did not run.
    pub cost: std::result::Result<Run, String>,
    pub cost_arms: Vec<usize>,
}

impl Run {
    /// Mean IOPS of window `i`, if fio logged at least one whole second in it.
    pub fn window_iops(&self, i: usize) -> Option<f64> {
        let (n, sum) = self.iops.get(i)?;
        (*n > 0 && !self.invalid.iter().any(|(w, _)| *w == i)).then(|| sum / *n as f64)
    }

    /// Windows of `arm` by cycle.
    pub fn by_cycle(&self, arm: usize) -> BTreeMap<usize, usize> {
        self.measured
            .iter()
            .enumerate()
            .filter(|(_, m)| m.window.arm == arm)
            .map(|(i, m)| (m.window.cycle, i))
            .collect()
    }

    /// (arm's value, base's value) per cycle where both exist.
    pub fn paired(
        &self,
        arm: usize,
        base: usize,
        f: impl Fn(usize) -> Option<f64>,
    ) -> Vec<(f64, f64)> {
        let b = self.by_cycle(base);
        self.by_cycle(arm)
            .iter()
            .filter_map(|(c, i)| Some((f(*i)?, f(*b.get(c)?)?)))
            .collect()
    }

    /// IOPS of `arm` over IOPS of `base` (ratio of the means over the cycles where
    /// both were measured), with its bootstrap interval over cycles.
    pub fn ratio(&self, arm: usize, base: usize) -> Option<Estimate> {
        stats::ratio_ci(&self.paired(arm, base, |i| self.window_iops(i)))
    }

    /// `ratio(a, base) - ratio(b, base)`, with its interval: both ratios recomputed
    /// on the same resampled cycles (e.g. kml observe's margin over bpftrace).
    pub fn ratio_difference(&self, a: usize, b: usize, base: usize) -> Option<Estimate> {
        let (ma, mb, mbase) = (self.by_cycle(a), self.by_cycle(b), self.by_cycle(base));
        let rows: Vec<(f64, f64, f64)> = mbase
            .iter()
            .filter_map(|(c, ib)| {
                Some((
                    self.window_iops(*ma.get(c)?)?,
                    self.window_iops(*mb.get(c)?)?,
                    self.window_iops(*ib)?,
                ))
            })
            .collect();
        stats::bootstrap(
            rows.len(),
            |p| {
                let (mut x, mut y, mut z) = (0.0, 0.0, 0.0);
                for &i in p {
                    x += rows[i].0;
                    y += rows[i].1;
                    z += rows[i].2;
                }
                (z > 0.0).then(|| (x - y) / z)
            },
            stats::RESAMPLES,
            stats::SEED,
        )
    }

    /// Mean IOPS of `arm` over its windows.
    pub fn mean_iops(&self, arm: usize) -> Option<f64> {
        let v: Vec<f64> = self
            .by_cycle(arm)
            .values()
            .filter_map(|i| self.window_iops(*i))
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// CPU time of the whole machine per I/O in `arm`'s windows (µs), kernel time
    /// only (system + irq + softirq) or all busy time: Σ CPU s / Σ I/Os over cycles.
    pub fn cpu_per_io_us(&self, arm: usize, kernel_only: bool, ticks: f64) -> Option<Estimate> {
        let pairs: Vec<(f64, f64)> = self
            .by_cycle(arm)
            .values()
            .filter_map(|&i| {
                let m = &self.measured[i];
                let d = m.end.cpu.since(&m.start.cpu);
                let cpu_s = if kernel_only { d.kernel() } else { d.busy() } as f64 / ticks;
                let secs = (m.window.end_ms - m.window.start_ms) as f64 / 1000.0;
                let ios = self.window_iops(i)? * secs;
                Some((1e6 * cpu_s, ios))
            })
            .collect();
        stats::ratio_ci(&pairs)
    }

    /// CPU ns of the I/O path in window `i` (fio, the kernel's I/O workers and the
    /// arm's consumer, from schedstat) and the window's I/Os.
    pub fn path_cpu(&self, i: usize) -> Option<(f64, f64)> {
        let m = &self.measured[i];
        let mut ns = m.end.io_path.since(&m.start.io_path);
        if let (Some(a), Some(b)) = (&m.start.arm.consumer, &m.end.arm.consumer) {
            ns += b.since(a);
        }
        let secs = (m.window.end_ms - m.window.start_ms) as f64 / 1000.0;
        Some((ns as f64, self.window_iops(i)? * secs))
    }

    /// CPU ns per I/O of the I/O path in `arm`'s windows (Σ ns / Σ I/Os), with its
    /// interval over cycles.
    pub fn path_cpu_per_io(&self, arm: usize) -> Option<Estimate> {
        let pairs: Vec<(f64, f64)> = self
            .by_cycle(arm)
            .values()
            .filter_map(|&i| self.path_cpu(i))
            .collect();
        stats::ratio_ci(&pairs)
    }

    /// `arm`'s I/O-path CPU per I/O over `base`'s, paired by cycle, with its interval:
    /// on a device the CPU limits (as this one), the inverse predicts the IOPS ratio,
    /// and it depends far less on what other tenants of the machine do.
    pub fn path_cpu_ratio(&self, arm: usize, base: usize) -> Option<Estimate> {
        let b = self.by_cycle(base);
        let rows: Vec<((f64, f64), (f64, f64))> = self
            .by_cycle(arm)
            .iter()
            .filter_map(|(c, i)| Some((self.path_cpu(*i)?, self.path_cpu(*b.get(c)?)?)))
            .collect();
        stats::bootstrap(
            rows.len(),
            |p| {
                let (mut an, mut ai, mut bn, mut bi) = (0.0, 0.0, 0.0, 0.0);
                for &k in p {
                    an += rows[k].0 .0;
                    ai += rows[k].0 .1;
                    bn += rows[k].1 .0;
                    bi += rows[k].1 .1;
                }
                (ai > 0.0 && bi > 0.0 && bn > 0.0).then(|| (an / ai) / (bn / bi))
            },
            stats::RESAMPLES,
            stats::SEED,
        )
    }

    /// The agent's CPU (share of one core) over `arm`'s windows.
    pub fn agent_cpu_share(&self, arm: usize) -> Option<Estimate> {
        let pairs: Vec<(f64, f64)> = self
            .by_cycle(arm)
            .values()
            .filter_map(|&i| {
                let m = &self.measured[i];
                let (a, b) = (m.start.arm.agent.as_ref()?, m.end.arm.agent.as_ref()?);
                let secs = (m.window.end_ms - m.window.start_ms) as f64 / 1000.0;
                Some((b.cpu_s - a.cpu_s, secs))
            })
            .collect();
        stats::ratio_ci(&pairs)
    }

    /// The agent's largest peak RSS at the end of `arm`'s windows, and the median RSS.
    pub fn agent_rss(&self, arm: usize) -> Option<(u64, f64)> {
        let v: Vec<&AgentStats> = self
            .by_cycle(arm)
            .values()
            .filter_map(|&i| self.measured[i].end.arm.agent.as_ref())
            .collect();
        let peak = v.iter().map(|a| a.peak_rss_bytes).max()?;
        let rss: Vec<f64> = v.iter().map(|a| a.rss_bytes as f64).collect();
        Some((peak, parse::median(&rss)?))
    }

    /// Ring-full drops during `arm`'s windows (agent or biosnoop), summed.
    pub fn drops(&self, arm: usize) -> Option<u64> {
        let mut any = false;
        let mut sum = 0;
        for &i in self.by_cycle(arm).values() {
            let m = &self.measured[i];
            if let (Some(a), Some(b)) = (&m.start.arm.agent, &m.end.arm.agent) {
                any = true;
                sum += b.drops.saturating_sub(a.drops);
            }
            if let (Some(a), Some(b)) = (m.start.arm.snoop, m.end.arm.snoop) {
                any = true;
                sum += b.1.saturating_sub(a.1);
            }
        }
        any.then_some(sum)
    }

    /// Whether the agent's CPU and memory came from /proc (see [`AgentStats::from_proc`]).
    pub fn agent_from_proc(&self, arm: usize) -> bool {
        self.by_cycle(arm).values().any(|&i| {
            self.measured[i]
                .end
                .arm
                .agent
                .as_ref()
                .is_some_and(|a| a.from_proc)
        })
    }

    /// ns per run of `event`'s program of `arm` (Σ run time / Σ runs over cycles),
    /// with its interval; and the runs per second.
    pub fn ns_per_event(&self, arm: usize, event: EventProg) -> Option<(Estimate, f64)> {
        let e = EventProg::ALL.iter().position(|x| *x == event)?;
        let mut runs = 0u64;
        let mut secs = 0.0;
        let pairs: Vec<(f64, f64)> = self
            .by_cycle(arm)
            .values()
            .filter_map(|&i| {
                let m = &self.measured[i];
                let (a, b) = (m.start.arm.progs?[e]?, m.end.arm.progs?[e]?);
                let (t, n) = (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1));
                runs += n;
                secs += (m.window.end_ms - m.window.start_ms) as f64 / 1000.0;
                Some((t as f64, n as f64))
            })
            .collect();
        Some((stats::ratio_ci(&pairs)?, runs as f64 / secs))
    }
}

pub fn job_file(ctx: &Ctx) -> PathBuf {
    ctx.root.join("bench").join("overhead-randread.fio")
}

pub fn bpftrace_script(ctx: &Ctx) -> PathBuf {
    ctx.root.join("bench").join("overhead.bt")
}

/// The reference observers' object, built beside kml's.
pub fn refs_object(ctx: &Ctx) -> PathBuf {
    crate::build::ebpf_target_dir(&ctx.root)
        .join("bpfel-unknown-none")
        .join("release")
        .join("kml-refs")
}

/// Starts the agent observing `dev` (`model`: a model file, or none) and waits until
/// it prints that it observes (the in-kernel cost measure's agents).
pub fn start_agent(ctx: &Ctx, dev: &LoopDevice, model: Option<&Path>, name: &str) -> Result<Proc> {
    start_agent_with_env(ctx, None, dev, model, name, &[])
}

/// [`start_agent`] with environment variables (the breakdown's `KML_ABLATE`),
/// and another agent binary (one of `--before`, which runs its own embedded
/// object) where given.
pub fn start_agent_with_env(
    ctx: &Ctx,
    binary: Option<&Path>,
    dev: &LoopDevice,
    model: Option<&Path>,
    name: &str,
    env: &[(&str, &str)],
) -> Result<Proc> {
    let mut cmd = match binary {
        None => ctx.agent_cmd(true),
        Some(b) => {
            let mut c = ctx.agent_cmd_of(b, true);
            // An agent of --before must run its own embedded object.
            c.env_remove("KML_EBPF_OBJECT");
            c
        }
    };
    cmd.envs(env.iter().copied());
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

/// A free TCP port on 127.0.0.1 (bound and released: the agent binds it next).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// GET /metrics from the agent.
fn scrape(port: u16) -> Result<Vec<(String, f64)>> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))
        .with_context(|| format!("connecting to the agent's metrics at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(text.as_str(), |(_, b)| b);
    Ok(parse::parse_exposition(body))
}

fn agent_stats(port: u16, pid: u32) -> Result<AgentStats> {
    let m = scrape(port)?;
    let get = |n: &str| parse::exposition_value(&m, n);
    let mut a = AgentStats {
        records: get("kml_records_received_total").unwrap_or(0.0) as u64,
        drops: get("kml_ring_full_drops_total").unwrap_or(0.0) as u64,
        ..AgentStats::default()
    };
    match (
        get("kml_process_cpu_seconds_total"),
        get("kml_process_resident_memory_bytes"),
        get("kml_process_peak_resident_memory_bytes"),
    ) {
        (Some(cpu), Some(rss), Some(peak)) => {
            a.cpu_s = cpu;
            a.rss_bytes = rss as u64;
            a.peak_rss_bytes = peak as u64;
        }
        _ => {
            // An agent from before its process metrics: the kernel's view of it.
            let read = |w: &str| std::fs::read_to_string(format!("/proc/{pid}/{w}"));
            let stat = read("stat").context("reading the agent's /proc/PID/stat")?;
            let status = read("status").context("reading the agent's /proc/PID/status")?;
            a.cpu_s = parse::parse_proc_stat_cpu_ticks(&stat)? as f64
                / sys::clock_ticks_per_second() as f64;
            a.rss_bytes = parse::parse_kib_field(&status, "VmRSS").unwrap_or(0) * 1024;
            a.peak_rss_bytes = parse::parse_kib_field(&status, "VmHWM").unwrap_or(0) * 1024;
            a.from_proc = true;
        }
    }
    Ok(a)
}

/// (run time ns, runs) of each of `ids`' programs, by event.
fn prog_stats(ids: &[(u32, EventProg)]) -> Result<[Option<(u64, u64)>; 3]> {
    let mut out = [None; 3];
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if let Some((_, e)) = ids.iter().find(|(id, _)| *id == info.id()) {
            let i = EventProg::ALL.iter().position(|x| x == e).unwrap_or(0);
            out[i] = Some((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    Ok(out)
}

/// An agent's insert/issue/complete program ids (from its /proc/PID/fdinfo).
fn agent_event_progs(pid: u32) -> Result<Vec<(u32, EventProg)>> {
    let ids = sys::prog_ids(pid);
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if !ids.contains(&info.id()) {
            continue;
        }
        if let Some(e) = info.name_as_str().and_then(EventProg::of_name) {
            out.push((info.id(), e));
        }
    }
    Ok(out)
}

/// Starts `binary ARGS --metrics 127.0.0.1:PORT` (pinned to CPU 1 with `--pin`)
/// and returns once its metrics page lists its three attached programs (the page
/// is published once a second after attach): the agent observes.
pub fn spawn_agent(ctx: &Ctx, binary: &Path, args: &[&str], tag: &str) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let mut cmd = ctx.agent_cmd_of(binary, true);
    cmd.args(args)
        .args(["--metrics", &format!("127.0.0.1:{port}")]);
    // An agent of --before must run its own embedded object.
    cmd.env_remove("KML_EBPF_OBJECT");
    let mut proc = Proc::spawn(&mut cmd, &format!("{tag}.agent"), &ctx.logs)?;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = proc.poll()? {
            bail!(
                "the agent ended ({}) before observing: {}",
                crate::util::describe_status(s),
                sys::tail(&proc.stderr, 5)
            );
        }
        if let Ok(m) = scrape(port) {
            if parse::exposition_family(&m, "kml_program_runs_total").len() >= 3 {
                return Ok((proc, port));
            }
        }
        if Instant::now() > end {
            bail!(
                "the agent did not list its programs within 60 s: {}",
                sys::tail(&proc.stderr, 5)
            );
        }
        sys::sleep(Duration::from_millis(100))?;
    }
}

pub enum Live {
    Nothing,
    Refs(RefKind),
    Agent {
        proc: Proc,
        port: u16,
        progs: Vec<(u32, EventProg)>,
    },
    Bpftrace(Proc),
}

struct OverheadArms<'a> {
    ctx: &'a Ctx,
    dev: &'a LoopDevice,
    specs: Vec<ArmSpec>,
    refs: Option<&'a mut RefPrograms>,
    /// Sample program run times at the edges (the bpf_stats run).
    programs: bool,
    /// Per stop, in order: bpftrace's count of completions (None for other arms).
    completions: Vec<Option<u64>>,
}

impl OverheadArms<'_> {
    fn start_agent_arm(&mut self, binary: &Path, model: Option<&Path>, tag: &str) -> Result<Live> {
        let model = model.map_or_else(|| "none".into(), |m| m.display().to_string());
        let args = [
            "run",
            "--device",
            &self.dev.name,
            "--retrain-every",
            "0",
            "--model",
            &model,
        ];
        let (proc, port) = spawn_agent(self.ctx, binary, &args, tag)?;
        let progs = if self.programs {
            let p = agent_event_progs(proc.pid())?;
            if p.len() != 3 {
                bail!(
                    "found {} of the agent's insert/issue/complete programs: {p:?}",
                    p.len()
                );
            }
            p
        } else {
            Vec::new()
        };
        Ok(Live::Agent { proc, port, progs })
    }

    fn start_bpftrace(&mut self, tag: &str) -> Result<Live> {
        let mut cmd = if self.ctx.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "1", "bpftrace"]);
            c
        } else {
            Command::new("bpftrace")
        };
        cmd.arg(bpftrace_script(self.ctx));
        let mut p = Proc::spawn(&mut cmd, &format!("{tag}.bpftrace"), &self.ctx.logs)?;
        p.wait_for_output("Attaching", Duration::from_secs(60))?;
        // bpftrace prints that line before it loads and attaches: wait for its
        // three programs.
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
        Ok(Live::Bpftrace(p))
    }
}

impl Arms for OverheadArms<'_> {
    type Live = Live;
    type Sample = ArmSample;

    fn count(&self) -> usize {
        self.specs.len()
    }

    fn label(&self, arm: usize) -> String {
        self.specs[arm].label.clone()
    }

    fn start(&mut self, arm: usize, tag: &str) -> Result<Live> {
        match self.specs[arm].kind.clone() {
            ArmKind::NoProbe => Ok(Live::Nothing),
            ArmKind::Ref(k) => {
                self.refs
                    .as_deref_mut()
                    .context("the reference observers are not loaded")?
                    .attach(k)?;
                Ok(Live::Refs(k))
            }
            ArmKind::Bpftrace => self.start_bpftrace(tag),
            ArmKind::Agent { binary, model } => {
                self.start_agent_arm(&binary, model.as_deref(), tag)
            }
        }
    }

    fn sample(&mut self, _arm: usize, live: &mut Live) -> Result<ArmSample> {
        let mut s = ArmSample::default();
        match live {
            Live::Nothing => {}
            Live::Bpftrace(p) => {
                let mut t = TaskTimes::default();
                t.add_process(p.pid());
                s.consumer = Some(t);
            }
            Live::Refs(k) => {
                let refs = self.refs.as_deref().context("no reference observers")?;
                if *k == RefKind::Biosnoop {
                    s.snoop = Some((refs.records_read(), refs.kernel_counts()?.0));
                    s.consumer = Some(refs.reader_times());
                }
                if self.programs {
                    let ids = refs.prog_ids(*k)?;
                    let ids: Vec<(u32, EventProg)> =
                        ids.iter().copied().zip(EventProg::ALL).collect();
                    s.progs = Some(prog_stats(&ids)?);
                }
            }
            Live::Agent { proc, port, progs } => {
                s.agent = Some(agent_stats(*port, proc.pid())?);
                let mut t = TaskTimes::default();
                t.add_process(proc.pid());
                s.consumer = Some(t);
                if self.programs {
                    s.progs = Some(prog_stats(progs)?);
                }
            }
        }
        Ok(s)
    }

    fn stop(&mut self, _arm: usize, live: Live) -> Result<()> {
        let mut completed = None;
        match live {
            Live::Nothing => {}
            Live::Refs(_) => {
                self.refs
                    .as_deref_mut()
                    .context("no reference observers")?
                    .detach_all()?;
            }
            Live::Agent { mut proc, .. } => {
                let status = proc.stop(Duration::from_secs(20));
                if !status.is_some_and(|s| s.success()) {
                    bail!(
                        "the agent ended badly ({}): {}",
                        status.map_or("killed".into(), crate::util::describe_status),
                        sys::tail(&proc.stderr, 5)
                    );
                }
            }
            Live::Bpftrace(mut p) => {
                p.stop(Duration::from_secs(20));
                let out = std::fs::read_to_string(&p.stdout).unwrap_or_default();
                completed = Some(
                    out.lines()
                        .find_map(|l| l.strip_prefix("@completed: ")?.trim().parse().ok())
                        .unwrap_or(0),
                );
            }
        }
        self.completions.push(completed);
        Ok(())
    }
}

/// The fio options that make the per-second logs (see [`super::fiolog`]).
pub fn fio_log_args(prefix: &Path, hist: bool) -> Vec<String> {
    let p = prefix.display();
    let mut v = vec![
        format!("--write_iops_log={p}"),
        format!("--write_bw_log={p}"),
        format!("--log_avg_msec={}", fiolog::LOG_MS),
        format!("--iopsavgtime={}", fiolog::LOG_MS),
        format!("--bwavgtime={}", fiolog::LOG_MS),
        "--log_alternate_epoch=1".into(),
        "--log_alternate_epoch_clock_id=1".into(),
    ];
    if hist {
        v.push(format!("--write_hist_log={p}"));
        v.push(format!("--log_hist_msec={}", fiolog::LOG_MS));
    }
    v
}

/// fio's per-job log files `<prefix>_<kind>.<job>.log`, sorted.
pub fn fio_logs(prefix: &Path, kind: &str) -> Vec<PathBuf> {
    let (Some(dir), Some(stem)) = (prefix.parent(), prefix.file_name()) else {
        return Vec::new();
    };
    let head = format!("{}_{kind}.", stem.to_string_lossy());
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&head))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn remove_logs(prefix: &Path) {
    for kind in ["iops", "bw", "clat_hist", "lat", "clat", "slat"] {
        for p in fio_logs(prefix, kind) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts the one long fio run of an alternation: `job` on `dev` with the
/// per-second logs at `<logs>/<tag>_*` (histograms too with `hist`), running until
/// stopped (SIGINT: fio then writes its logs and JSON), after 2 s of warm-up.
pub fn start_logged_fio(
    ctx: &Ctx,
    job: &Path,
    dev: &Path,
    tag: &str,
    cpus: Option<&str>,
    hist: bool,
) -> Result<Proc> {
    let prefix = ctx.logs.join(tag);
    remove_logs(&prefix);
    let runtime = 24 * 3600;
    let fio = spawn_fio_with(
        ctx,
        job,
        dev,
        runtime,
        tag,
        cpus,
        &fio_log_args(&prefix, hist),
    )?;
    // Warm-up (page cache, fio's start), not measured.
    sys::sleep(Duration::from_secs(2))?;
    Ok(fio)
}

/// One alternation of `arms` in one fio run on `dev`.
fn alternate(
    ctx: &Ctx,
    dev: &LoopDevice,
    specs: Vec<ArmSpec>,
    refs: Option<&mut RefPrograms>,
    programs: bool,
    schedule: Schedule,
    tag: &str,
) -> Result<Run> {
    let load_before = super::loadavg();
    let t0 = Instant::now();
    let prefix = ctx.logs.join(tag);
    let cpus = ctx.pin.then_some("0");
    let mut fio = start_logged_fio(ctx, &job_file(ctx), &dev.path, tag, cpus, false)?;
    let mut arms = OverheadArms {
        ctx,
        dev,
        specs,
        refs,
        programs,
        completions: Vec::new(),
    };
    let measured = alternation::run(&mut arms, schedule, &mut fio, tag);
    fio.stop(Duration::from_secs(30));
    let measured = measured?;
    let fio_summary = fio_result(ctx, tag).ok();
    let logs = fio_logs(&prefix, "iops");
    if logs.is_empty() {
        bail!("fio wrote no IOPS log at {}_iops.*.log", prefix.display());
    }
    let windows: Vec<Window> = measured.iter().map(|m| m.window).collect();
    let mut iops = vec![(0usize, 0.0f64); windows.len()];
    for path in &logs {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let samples = fiolog::parse_log(&text).with_context(|| format!("{}", path.display()))?;
        for (i, (n, s)) in fiolog::per_window(&windows, &samples, None)
            .into_iter()
            .enumerate()
        {
            // One job here: the seconds are the same for every log; sum the rates.
            iops[i].0 = iops[i].0.max(n);
            iops[i].1 += s;
        }
    }
    let mut invalid = Vec::new();
    for (i, (m, completed)) in measured.iter().zip(&arms.completions).enumerate() {
        if let Some(c) = completed {
            let (n, sum) = iops[i];
            let ios = if n > 0 {
                sum / n as f64 * (m.window.end_ms - m.window.start_ms) as f64 / 1000.0
            } else {
                0.0
            };
            if (*c as f64) < ios {
                invalid.push((
                    i,
                    format!(
                        "bpftrace counted {c} completions over its whole run, fewer than the {ios:.0} I/Os of its window: it was not (fully) attached"
                    ),
                ));
            }
        }
    }
    let run = Run {
        schedule,
        measured,
        iops,
        fio: fio_summary,
        invalid,
        load_before,
        load_after: super::loadavg(),
        wall_s: t0.elapsed().as_secs_f64(),
    };
    let csv = ctx.logs.join(format!("{tag}.windows.csv"));
    std::fs::write(&csv, windows_csv(&run, &arms.specs))
        .with_context(|| format!("writing {}", csv.display()))?;
    Ok(run)
}

/// Every measured window of a run, one CSV row each (for analysis beyond the report).
fn windows_csv(run: &Run, specs: &[ArmSpec]) -> String {
    let mut out = String::from(
        "arm,cycle,start_ms,end_ms,log_seconds,iops,path_cpu_ns,ios,machine_busy_ticks,machine_kernel_ticks,valid\n",
    );
    for (i, m) in run.measured.iter().enumerate() {
        let d = m.end.cpu.since(&m.start.cpu);
        let (ns, ios) = run.path_cpu(i).unwrap_or((f64::NAN, f64::NAN));
        out.push_str(&format!(
            "{},{},{},{},{},{:.0},{:.0},{:.0},{},{},{}\n",
            specs[m.window.arm].key,
            m.window.cycle,
            m.window.start_ms,
            m.window.end_ms,
            run.iops[i].0,
            run.window_iops(i).unwrap_or(f64::NAN),
            ns,
            ios,
            d.busy(),
            d.kernel(),
            run.window_iops(i).is_some()
        ));
    }
    out
}

/// The arms of this run: `--arms` (default all), with the `--before` agent's
/// observe/infer arms after this tree's. `model` is the `infer` arm's model,
/// `position` the `infer-position` arm's: the one `run --model auto` starts from
/// on raw tracepoints, which keeps the position state at every insert and
/// dispatch.
pub fn arm_specs(
    ctx: &Ctx,
    model: Option<&(String, PathBuf)>,
    position: Option<&(String, PathBuf)>,
    before: Option<&BeforeAgent>,
) -> Result<Vec<ArmSpec>> {
    for k in &ctx.arms {
        if !ARM_KEYS.contains(&k.as_str()) {
            bail!("--arms: unknown arm `{k}` (known: {})", ARM_KEYS.join(", "));
        }
    }
    let want = |k: &str| k == "none" || ctx.arms.is_empty() || ctx.arms.iter().any(|a| a == k);
    let mut v = Vec::new();
    let model_label = |m: &(String, PathBuf)| {
        format!(
            "{} `{}`",
            m.0,
            m.1.file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
        )
    };
    for key in ARM_KEYS {
        if !want(key) {
            continue;
        }
        let (label, kind) = match key {
            "none" => ("no probes".to_owned(), ArmKind::NoProbe),
            "aa" => ("no probes (A/A)".to_owned(), ArmKind::NoProbe),
            "null" => ("null observer".to_owned(), ArmKind::Ref(RefKind::Null)),
            "biolatency" => (
                "biolatency-style".to_owned(),
                ArmKind::Ref(RefKind::Biolatency),
            ),
            "biosnoop" => ("biosnoop-style".to_owned(), ArmKind::Ref(RefKind::Biosnoop)),
            "bpftrace" => ("bpftrace".to_owned(), ArmKind::Bpftrace),
            "observe" => (
                "kml observe".to_owned(),
                ArmKind::Agent {
                    binary: ctx.agent.clone(),
                    model: None,
                },
            ),
            "infer" | "infer-position" => {
                let (m, what) = match key {
                    "infer" => (model, ""),
                    _ => (position, ", position"),
                };
                let Some(m) = m else {
                    eprintln!(
                        "xtask: bench: overhead: no model for it: the observe + infer{what} arm is left out"
                    );
                    continue;
                };
                (
                    format!("kml observe + infer{what} ({})", model_label(m)),
                    ArmKind::Agent {
                        binary: ctx.agent.clone(),
                        model: Some(m.1.clone()),
                    },
                )
            }
            _ => unreachable!("ARM_KEYS"),
        };
        v.push(ArmSpec {
            key: key.to_owned(),
            label,
            kind,
        });
    }
    if let Some(b) = before {
        let extra: Vec<ArmSpec> = v
            .iter()
            .filter_map(|a| match &a.kind {
                // The earlier agent runs its own copy of the model where it has
                // one: it cannot read a model of features added since.
                ArmKind::Agent { model, .. } => Some(ArmSpec {
                    key: format!("{}@before", a.key),
                    label: format!("{} — before ({} {})", a.label, b.rev, b.short()),
                    kind: ArmKind::Agent {
                        binary: b.binary.clone(),
                        model: model.as_deref().map(|m| b.shared_model(m)),
                    },
                }),
                _ => None,
            })
            .collect();
        v.extend(extra);
    }
    Ok(v)
}

pub fn run(ctx: &Ctx, models: Option<&Models>) -> Result<Overhead> {
    let model = models.and_then(|m| {
        ["logistic", "linear", "tree"]
            .iter()
            .find_map(|k| m.get(k).map(|p| (k.to_string(), p.to_path_buf())))
    });
    let position = models.and_then(|m| {
        m.get(POSITION_MODEL)
            .map(|p| (POSITION_MODEL.to_string(), p.to_path_buf()))
    });
    let arms = arm_specs(ctx, model.as_ref(), position.as_ref(), ctx.before.as_ref())?;
    let schedule = Schedule {
        cycles: ctx.cycles.unwrap_or(if ctx.quick { 3 } else { 20 }).max(2),
        settle: Duration::from_secs(1),
        measure: Duration::from_millis(1000 * ctx.arm_secs.unwrap_or(4) + 500),
    };
    let mount = TmpfsMount::mount(&ctx.work.join("tmpfs"), "1200m")?;
    let file = mount.dir.join("disk");
    crate::util::run(Command::new("fallocate").args(["-l", "1G"]).arg(&file))?;
    let dev = LoopDevice::attach(&file, false)?;
    dev.use_mq_deadline()?;
    let needs_refs = arms.iter().any(|a| matches!(a.kind, ArmKind::Ref(_)));
    let mut refs = if needs_refs {
        Some(RefPrograms::load(&refs_object(ctx))?)
    } else {
        None
    };
    eprintln!(
        "xtask: bench: overhead: {} arms × {} cycles ({} s measured each) in one fio run",
        arms.len(),
        schedule.cycles,
        schedule.measure.as_secs_f64()
    );
    let main = alternate(
        ctx,
        &dev,
        arms.clone(),
        refs.as_mut(),
        false,
        schedule,
        "overhead",
    )?;
    for (i, a) in arms.iter().enumerate().skip(1) {
        if let Some(r) = main.ratio(i, 0) {
            eprintln!(
                "xtask: bench: overhead {:<40} {:.3} [{:.3}, {:.3}] of no-probe IOPS",
                a.label, r.value, r.lo, r.hi
            );
        }
    }
    // The per-event cost: one observer at a time, with bpf_stats.
    let cost_arms: Vec<usize> = arms
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a.kind, ArmKind::Ref(_) | ArmKind::Agent { .. }))
        .map(|(i, _)| i)
        .collect();
    let cost = if cost_arms.is_empty() {
        Err("no observer arm selected".to_owned())
    } else {
        let cost_schedule = Schedule {
            cycles: if ctx.quick { 2 } else { 6 },
            settle: Duration::from_secs(1),
            measure: Duration::from_secs(3),
        };
        let specs: Vec<ArmSpec> = cost_arms.iter().map(|&i| arms[i].clone()).collect();
        let stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        let r = alternate(
            ctx,
            &dev,
            specs,
            refs.as_mut(),
            true,
            cost_schedule,
            "overhead-cost",
        );
        drop(stats);
        match r {
            Ok(r) => Ok(r),
            Err(e) if sys::interrupted() => return Err(e),
            Err(e) => {
                eprintln!("xtask: bench: per-event cost FAILED: {e:#}");
                Err(format!("{e:#}"))
            }
        }
    };
    drop(refs);
    drop(dev);
    drop(mount);
    let o = Overhead {
        command: ctx.command.clone(),
        arms,
        pinned: ctx.pin,
        before: ctx
            .before
            .as_ref()
            .map(|b| (b.rev.clone(), b.short().to_owned())),
        ticks_per_s: sys::clock_ticks_per_second() as f64,
        main,
        cost,
        cost_arms,
    };
    let mut plots = Vec::new();
    let text = super::overhead_report::document(ctx, &o, &mut plots);
    for (name, body) in plots {
        let p = ctx.out.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
    }
    let path = ctx.out.join(OVERHEAD_MD);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: bench: wrote {}", ctx.rel(&path));
    Ok(o)
}

/// The overhead measure's own report, beside REPORT.md (which includes it).
pub const OVERHEAD_MD: &str = "OVERHEAD.md";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::alternation::{CpuTimes, Edge};

    fn measured(arm: usize, cycle: usize, start_ms: u64, sys_ticks: u64) -> Measured<ArmSample> {
        let edge = |t_ms, system: u64| Edge {
            t_ms,
            cpu: CpuTimes {
                system,
                ..CpuTimes::default()
            },
            // The I/O path ran 10 ns per system tick.
            io_path: TaskTimes([(1, 10 * system)].into_iter().collect()),
            arm: ArmSample::default(),
        };
        Measured {
            window: Window {
                arm,
                cycle,
                start_ms,
                end_ms: start_ms + 4000,
            },
            start: edge(start_ms, 0),
            end: edge(start_ms + 4000, sys_ticks),
        }
    }

    #[test]
    fn ratios_pair_arms_by_cycle() {
        // Two arms, three cycles; arm 1 = 0.8 × arm 0 in every cycle although the
        // level moves between cycles; one window of arm 1 is invalid.
        let mut m = Vec::new();
        let mut iops = Vec::new();
        for (c, level) in [100_000.0, 150_000.0, 120_000.0].into_iter().enumerate() {
            m.push(measured(0, c, 10_000 * c as u64, 400));
            iops.push((4, 4.0 * level));
            m.push(measured(1, c, 10_000 * c as u64 + 5000, 800));
            iops.push((4, 4.0 * 0.8 * level));
        }
        let run = Run {
            schedule: Schedule {
                cycles: 3,
                settle: Duration::from_secs(1),
                measure: Duration::from_secs(4),
            },
            measured: m,
            iops,
            fio: None,
            invalid: vec![(5, "test".into())],
            load_before: None,
            load_after: None,
            wall_s: 0.0,
        };
        let r = run.ratio(1, 0).unwrap();
        assert!((r.value - 0.8).abs() < 1e-12, "{r:?}");
        assert_eq!(r.n, 2, "cycle 2's arm-1 window is invalid");
        assert_eq!(run.window_iops(5), None);
        assert_eq!(
            run.mean_iops(0),
            Some((100_000.0 + 150_000.0 + 120_000.0) / 3.0)
        );
        // Kernel CPU per I/O: 400 ticks at 100/s = 4 s over 4 s × level I/Os.
        let cpu = run.cpu_per_io_us(0, true, 100.0).unwrap();
        let ios = 4.0 * (100_000.0 + 150_000.0 + 120_000.0);
        assert!((cpu.value - 1e6 * 12.0 / ios).abs() < 1e-9, "{cpu:?}");
        // Arm 1 against itself: no margin; arm 0 over arm 1: 0.2 of the baseline.
        assert_eq!(run.ratio_difference(1, 1, 0).unwrap().value, 0.0);
        let d = run.ratio_difference(0, 1, 0).unwrap();
        assert!((d.value - 0.2).abs() < 1e-12, "{d:?}");
        // I/O path: arm 1 used twice the CPU in its windows for 0.8 × the I/Os.
        let p = run.path_cpu_ratio(1, 0).unwrap();
        assert!((p.value - 2.0 / 0.8).abs() < 1e-12, "{p:?}");
        let per_io = run.path_cpu_per_io(0).unwrap();
        assert!(
            (per_io.value - 3.0 * 4000.0 / ios).abs() < 1e-12,
            "{per_io:?}"
        );
        assert_eq!(run.agent_cpu_share(0), None);
        assert_eq!(run.drops(0), None);
    }

    #[test]
    fn log_arguments_and_files() {
        let args = fio_log_args(Path::new("/x/overhead"), true);
        assert!(args.contains(&"--write_iops_log=/x/overhead".to_owned()));
        assert!(args.contains(&"--log_alternate_epoch_clock_id=1".to_owned()));
        assert!(args.contains(&"--log_hist_msec=1000".to_owned()));
        assert!(!fio_log_args(Path::new("/x/o"), false)
            .iter()
            .any(|a| a.contains("hist")));
        let dir = std::env::temp_dir().join(format!("kml-bench-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "run_iops.2.log",
            "run_iops.1.log",
            "run_bw.1.log",
            "other_iops.1.log",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let names: Vec<String> = fio_logs(&dir.join("run"), "iops")
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["run_iops.1.log", "run_iops.2.log"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
