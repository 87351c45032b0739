//! `cargo xtask soak [--minutes 30]`: leave the agent running under mixed fio and
//! watch that nothing grows that should not (not part of CI).
//!
//! A file-backed loop device (direct I/O, on the real disk) with mq-deadline; the
//! release agent as an operator runs it (`run --pin --model auto`, online learning);
//! fio with one rate-limited random-read and one random-write job (so the soak
//! leaves the machine's cores to others). Every 10 s: the in-flight map's entries,
//! the drop/loss counters (`kml-agent status --json` on the agent's own pin
//! directory), the agent's RSS and CPU. Writes `bench/SOAK.md` with the samples and a
//! verdict. Everything it sets up is undone by guards, also on Ctrl-C.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::bench::{parse, sys};
use crate::build::build_all;
use crate::util::workspace_root;

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// How long fio and the agent run.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// Random reads per second (fio --rate_iops of the read job).
    #[arg(long, default_value_t = 400)]
    pub read_iops: u32,
    /// Random writes per second (fio --rate_iops of the write job).
    #[arg(long, default_value_t = 200)]
    pub write_iops: u32,
    /// Where the report goes (relative: to the workspace root).
    #[arg(long, default_value = "bench/SOAK.md")]
    pub out: PathBuf,
}

/// Seconds between samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// One 10-second sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub t_s: f64,
    pub inflight_entries: u64,
    pub records: u64,
    pub ring_full_drops: u64,
    pub sampled_out: u64,
    pub orphans: u64,
    /// inflight_added - inflight_removed - live entries (LRU evictions).
    pub evictions: u64,
    pub insert_failures: u64,
    pub rss_kib: u64,
    /// Agent CPU over the last interval, percent of one core.
    pub cpu_pct: f64,
    pub model_version: u64,
}

impl SoakArgs {
    pub fn execute(self) -> Result<ExitCode> {
        anyhow::ensure!(
            crate::util::is_root()?,
            "the soak needs root (it loads eBPF programs and makes a loop device)"
        );
        sys::install_signal_handlers();
        let root = workspace_root();
        let built = build_all(true)?;
        let work = root.join("target/soak");
        std::fs::create_dir_all(&work)?;
        // A copy, so that rebuilding the workspace during a long soak changes nothing.
        let agent = work.join("kml-agent");
        std::fs::copy(&built, &agent).context("copying the agent binary")?;
        let backing = work.join("disk.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(1 << 30))
            .with_context(|| format!("creating {}", backing.display()))?;
        let dev = sys::LoopDevice::attach(&backing, true)?;
        dev.use_mq_deadline()?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/kml-soak-{}", std::process::id()));

        let mut agent_proc = sys::Proc::spawn(
            Command::new(&agent)
                .args(["run", "--json", "--device", &dev.name, "--pin", "--pin-dir"])
                .arg(&pin_dir)
                .args(["--model", "auto"])
                .current_dir(&root),
            "agent",
            &work,
        )?;
        agent_proc.wait_for_event("ready", Duration::from_secs(60))?;
        let runtime = self.minutes * 60;
        let mut fio = sys::Proc::spawn(
            Command::new("fio").args([
                "--name=soak-read",
                &format!("--filename={}", dev.path.display()),
                "--direct=1",
                "--ioengine=libaio",
                "--rw=randread",
                "--bs=4k",
                "--iodepth=8",
                &format!("--rate_iops={}", self.read_iops),
                "--time_based",
                &format!("--runtime={runtime}"),
                "--name=soak-write",
                &format!("--filename={}", dev.path.display()),
                "--direct=1",
                "--ioengine=libaio",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                &format!("--rate_iops={}", self.write_iops),
                "--time_based",
                &format!("--runtime={runtime}"),
            ]),
            "fio",
            &work,
        )?;

        let started = Instant::now();
        let ticks = sys::clock_ticks_per_second() as f64;
        let mut last_cpu = cpu_ticks(agent_proc.pid());
        let mut last_at = Instant::now();
        let mut samples = Vec::new();
        let mut agent_died = None;
        while fio.poll()?.is_none() {
            sys::sleep(SAMPLE_EVERY)?;
            if let Some(s) = agent_proc.poll()? {
                agent_died = Some(format!("{s}: {}", sys::tail(&agent_proc.stderr, 5)));
                break;
            }
            let cpu = cpu_ticks(agent_proc.pid());
            let cpu_pct = 100.0 * (cpu.saturating_sub(last_cpu)) as f64
                / ticks
                / last_at.elapsed().as_secs_f64();
            last_cpu = cpu;
            last_at = Instant::now();
            let status = status_json(&agent, &pin_dir)?;
            let s = sample_from(
                &status,
                started.elapsed().as_secs_f64(),
                rss_kib(agent_proc.pid()),
                cpu_pct,
            );
            eprintln!(
                "xtask: soak: {:>5.0}s in flight {} | records {} | drops {} | sampled out {} | evictions {} | RSS {} KiB | CPU {:.1}%",
                s.t_s, s.inflight_entries, s.records, s.ring_full_drops, s.sampled_out, s.evictions, s.rss_kib, s.cpu_pct
            );
            samples.push(s);
        }
        let fio_status = fio.wait(Duration::from_secs(60))?;
        let agent_status = agent_proc.stop(Duration::from_secs(20));
        let pins_left = pin_dir.exists();
        drop(dev);
        let _ = std::fs::remove_file(&backing);

        let verdict = Judgement::of(&samples);
        let report = render(
            &self,
            &samples,
            &verdict,
            &Outcome {
                fio: fio_status.to_string(),
                agent: agent_status.map_or("not collected".into(), |s| s.to_string()),
                agent_died,
                pins_left,
                elapsed_s: started.elapsed().as_secs_f64(),
            },
        );
        let out = if self.out.is_absolute() {
            self.out.clone()
        } else {
            root.join(&self.out)
        };
        std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "xtask: soak: wrote {} ({})",
            out.display(),
            verdict.summary()
        );
        Ok(if verdict.pass() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse::parse_proc_stat_cpu_ticks(&s).ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse::parse_kib_field(&s, "VmRSS"))
        .unwrap_or(0)
}

fn status_json(agent: &Path, pin_dir: &Path) -> Result<serde_json::Value> {
    let out = Command::new(agent)
        .args(["status", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .context("running kml-agent status")?;
    anyhow::ensure!(
        out.status.success(),
        "kml-agent status failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("kml-agent status --json output")
}

fn sample_from(status: &serde_json::Value, t_s: f64, rss_kib: u64, cpu_pct: f64) -> Sample {
    let c = |k: &str| status["counters"][k].as_u64().unwrap_or(0);
    let live = status["inflight_entries"].as_u64().unwrap_or(0);
    Sample {
        t_s,
        inflight_entries: live,
        records: c("records"),
        ring_full_drops: c("ring_full_drops"),
        sampled_out: c("sampled_out"),
        orphans: c("orphan_completions"),
        evictions: c("inflight_added")
            .saturating_sub(c("inflight_removed"))
            .saturating_sub(live),
        insert_failures: c("inflight_insert_failures"),
        rss_kib,
        cpu_pct,
        model_version: status["model"]["version"].as_u64().unwrap_or(0),
    }
}

/// Least-squares slope of `y` over `x` (units of y per unit of x); 0 for < 2 points.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// The soak's three judgements.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub samples: usize,
    /// Largest in-flight map size in the first and the second half.
    pub inflight_max_first: u64,
    pub inflight_max_second: u64,
    pub inflight_bounded: bool,
    /// Ring-full drops, evictions and insert failures over the second half.
    pub drops_second_half: u64,
    pub evictions_second_half: u64,
    pub insert_failures_second_half: u64,
    pub drops_ok: bool,
    /// RSS slope over the second half (KiB per minute) and the mean RSS there.
    pub rss_slope_kib_per_min: f64,
    pub rss_mean_kib: f64,
    pub rss_flat: bool,
}

/// The in-flight map's capacity (LRU, `INFLIGHT`).
const INFLIGHT_CAPACITY: u64 = kml_ebpf_common::record::INFLIGHT_CAPACITY as u64;

impl Judgement {
    pub fn of(samples: &[Sample]) -> Judgement {
        let half = samples.len() / 2;
        let (first, second) = samples.split_at(half);
        let max = |s: &[Sample]| s.iter().map(|x| x.inflight_entries).max().unwrap_or(0);
        let growth = |f: fn(&Sample) -> u64| match (second.first(), second.last()) {
            (Some(a), Some(b)) => f(b).saturating_sub(f(a)),
            _ => 0,
        };
        let (inflight_max_first, inflight_max_second) = (max(first), max(second));
        // Bounded: never near the capacity, and the second half no higher than the
        // first allows for (twice its peak, plus a queue's worth of slack).
        let inflight_bounded = inflight_max_second < INFLIGHT_CAPACITY / 2
            && inflight_max_first < INFLIGHT_CAPACITY / 2
            && inflight_max_second <= 2 * inflight_max_first + 64;
        let drops_second_half = growth(|s| s.ring_full_drops);
        // Evictions are derived (added - removed - live) from reads that are not
        // atomic together: requests completing in between show as a few transient
        // ones. A real eviction stays: compare the floors of both ends.
        let floor = |s: &[Sample]| s.iter().map(|x| x.evictions).min().unwrap_or(0);
        let ends = second.len().min(3);
        let evictions_second_half =
            floor(&second[second.len() - ends..]).saturating_sub(floor(&second[..ends]));
        let insert_failures_second_half = growth(|s| s.insert_failures);
        let rss: Vec<(f64, f64)> = second
            .iter()
            .map(|s| (s.t_s / 60.0, s.rss_kib as f64))
            .collect();
        let rss_slope_kib_per_min = slope(&rss);
        let rss_mean_kib = if rss.is_empty() {
            0.0
        } else {
            rss.iter().map(|p| p.1).sum::<f64>() / rss.len() as f64
        };
        let span_min = match (second.first(), second.last()) {
            (Some(a), Some(b)) => (b.t_s - a.t_s) / 60.0,
            _ => 0.0,
        };
        // Flat: the trend over the second half adds less than 5% of the RSS (or
        // 1 MiB, whichever is larger) over that half.
        let rss_flat = rss_slope_kib_per_min * span_min <= (0.05 * rss_mean_kib).max(1024.0)
            && !rss.is_empty();
        Judgement {
            samples: samples.len(),
            inflight_max_first,
            inflight_max_second,
            inflight_bounded,
            drops_second_half,
            evictions_second_half,
            insert_failures_second_half,
            drops_ok: drops_second_half == 0
                && evictions_second_half == 0
                && insert_failures_second_half == 0,
            rss_slope_kib_per_min,
            rss_mean_kib,
            rss_flat,
        }
    }

    pub fn pass(&self) -> bool {
        self.samples >= 4 && self.inflight_bounded && self.drops_ok && self.rss_flat
    }

    pub fn summary(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        format!(
            "in-flight bounded: {}; no unexplained drops: {}; RSS flat: {}",
            yes(self.inflight_bounded),
            yes(self.drops_ok),
            yes(self.rss_flat)
        )
    }
}

struct Outcome {
    fio: String,
    agent: String,
    agent_died: Option<String>,
    pins_left: bool,
    elapsed_s: f64,
}

fn render(args: &SoakArgs, samples: &[Sample], v: &Judgement, o: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# kml soak\n");
    let _ = writeln!(
        s,
        "`cargo xtask soak --minutes {}`: {:.1} minutes of mixed fio (random 4 KiB reads at {} IOPS and \
         writes at {} IOPS, iodepth 8 each, O_DIRECT) on a file-backed loop device with mq-deadline, \
         with the release agent running `run --pin --model auto` (online learning, retraining every 10 s). \
         One sample every 10 s: the in-flight map's entries and the counters from `kml-agent status --json` \
         on the agent's pin directory, the agent's VmRSS and CPU (/proc/PID).\n",
        args.minutes,
        o.elapsed_s / 60.0,
        args.read_iops,
        args.write_iops
    );
    let _ = writeln!(
        s,
        "## Verdict: {}\n",
        if v.pass() { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(
        s,
        "- **in-flight bounded**: {}: peak {} entries in the first half, {} in the second (capacity {INFLIGHT_CAPACITY}).",
        if v.inflight_bounded { "yes" } else { "NO" },
        v.inflight_max_first,
        v.inflight_max_second
    );
    let _ = writeln!(
        s,
        "- **no unexplained drop growth**: {}: over the second half, {} ring-full drops, {} LRU evictions, \
         {} in-flight insert failures. (`sampled_out` is the designed ring-pressure sampling, counted, not a loss. \
         Evictions are derived as added - removed - live from reads that are not atomic together, so a few \
         transient ones appear in the table; only a lasting rise counts.)",
        if v.drops_ok { "yes" } else { "NO" },
        v.drops_second_half,
        v.evictions_second_half,
        v.insert_failures_second_half
    );
    let _ = writeln!(
        s,
        "- **RSS flat**: {}: slope {:+.1} KiB/min over the second half (mean {:.0} KiB).",
        if v.rss_flat { "yes" } else { "NO" },
        v.rss_slope_kib_per_min,
        v.rss_mean_kib
    );
    let _ = writeln!(
        s,
        "- fio: {}; agent stopped with SIGINT: {}; pins left after the clean exit: {}.",
        o.fio,
        o.agent,
        if o.pins_left { "YES" } else { "none" }
    );
    if let Some(d) = &o.agent_died {
        let _ = writeln!(s, "- **the agent ended during the soak**: {d}");
    }
    let _ = writeln!(
        s,
        "\n## Samples\n\n| t (s) | in flight | records | ring-full drops | sampled out | orphans | evictions | insert failures | RSS (KiB) | agent CPU (%) | model |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for x in samples {
        let _ = writeln!(
            s,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | v{} |",
            x.t_s,
            x.inflight_entries,
            x.records,
            x.ring_full_drops,
            x.sampled_out,
            x.orphans,
            x.evictions,
            x.insert_failures,
            x.rss_kib,
            x.cpu_pct,
            x.model_version
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, inflight: u64, drops: u64, rss: u64) -> Sample {
        Sample {
            t_s: t,
            inflight_entries: inflight,
            ring_full_drops: drops,
            rss_kib: rss,
            ..Default::default()
        }
    }

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 1.0)).collect();
        assert!((slope(&pts) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 2.0)]), 0.0);
    }

    #[test]
    fn a_steady_run_passes() {
        let s: Vec<Sample> = (0..20)
            .map(|i| sample(i as f64 * 10.0, 10 + i % 3, 5, 50_000 + (i % 2) * 100))
            .collect();
        let v = Judgement::of(&s);
        assert!(v.pass(), "{v:?}");
    }

    #[test]
    fn growth_fails() {
        // RSS climbing 1 MiB per sample in the second half.
        let s: Vec<Sample> = (0..20)
            .map(|i| sample(i as f64 * 10.0, 10, 0, 50_000 + i * 1024))
            .collect();
        assert!(!Judgement::of(&s).rss_flat);
        // Transient derived evictions (non-atomic reads) are not growth; lasting ones are.
        let mut s: Vec<Sample> = (0..20)
            .map(|i| sample(i as f64 * 10.0, 10, 0, 50_000))
            .collect();
        s[12].evictions = 3;
        s[19].evictions = 2;
        assert!(Judgement::of(&s).drops_ok);
        for (i, x) in s.iter_mut().enumerate() {
            x.evictions = if i >= 14 { 5 } else { 0 };
        }
        assert!(!Judgement::of(&s).drops_ok);
        // Drops growing in the second half.
        let s: Vec<Sample> = (0..20)
            .map(|i| sample(i as f64 * 10.0, 10, i, 50_000))
            .collect();
        assert!(!Judgement::of(&s).drops_ok);
        // In-flight entries leaking.
        let s: Vec<Sample> = (0..20)
            .map(|i| sample(i as f64 * 10.0, 10 + i * 100, 0, 50_000))
            .collect();
        assert!(!Judgement::of(&s).inflight_bounded);
    }
}
