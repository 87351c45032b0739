//! Measure 6, tuning on a stock kernel: mixed fio workloads on the direct-I/O loop
//! device on the real disk (the learning measure's), stock mq-deadline tunables vs
//! `kml-agent run --tune`, **as arms inside one fio run per workload**.
//!
//! Three arms alternate cycle after cycle ([`super::alternation`], Williams order):
//! **stock** (the agent observes with the same starting model, `run --model auto`),
//! **stock again** (the same: the A/A arm, whose difference to stock is the noise a
//! difference must beat) and **tune** (the same agent with `--tune`). The agent is
//! started for its arm and stopped after it; a tuning agent restores the original
//! tunables on exit, and every arm checks it starts from them. fio logs completion
//! latency histograms and bandwidth per second (CLOCK_MONOTONIC); each arm's
//! seconds are pooled over the cycles: read and write p99 from the merged
//! histograms, throughput from the bandwidth logs. Changes (tune vs stock, and
//! stock again vs stock) come with 95% bootstrap intervals over cycles, percentiles
//! recomputed from the resampled cycles' histograms. The expiries are calibrated
//! per workload once (p75 of the stock waits) and set in all arms: they are the
//! latency targets the model predicts against. Writes `DIR/TUNE.md`; REPORT.md
//! includes it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::alternation::{self, Arms, Measured, Schedule};
use super::fiolog::{self, Window};
use super::learning::{calibrate_expiries, open_disk, Disk, CALIBRATION_QUANTILE};
use super::overhead::{fio_logs, spawn_agent, start_logged_fio};
use super::parse::{self, parse_fio_latency};
use super::stats::{self, Estimate};
use super::sys::{self, Proc};
use super::{workload_name, Ctx};

/// The mixed read/write workloads the measure uses when it can (file stems in
/// `workloads/`), and how many of them a --quick run keeps.
pub const TUNE_WORKLOADS: [&str; 4] = [
    "randread-seqwrite",
    "checkpoint",
    "batch-writer",
    "write-heavy",
];
const QUICK_TUNE_WORKLOADS: usize = 2;
/// How often the tuner decides in this measure (short windows: faster than the default 5 s).
pub const TUNE_EVERY: &str = "2s";
/// The model every arm starts from.
pub const MODEL: &str = "auto";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    Stock,
    StockAgain,
    Tune,
}

impl Arm {
    pub const ALL: [Arm; 3] = [Arm::Stock, Arm::StockAgain, Arm::Tune];

    pub fn name(self) -> &'static str {
        match self {
            Arm::Stock => "stock",
            Arm::StockAgain => "stock again (A/A)",
            Arm::Tune => "tune",
        }
    }

    fn index(self) -> usize {
        Arm::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }
}

/// One arm in one cycle, from fio's per-second logs.
#[derive(Clone, Debug, Default)]
pub struct WindowData {
    pub read_hist: Vec<u64>,
    pub write_hist: Vec<u64>,
    /// Σ of the bandwidth log's KiB/s samples (all jobs, both directions) and the
    /// seconds they cover.
    pub kib: f64,
    pub seconds: usize,
    /// The agent's `tune ...` decisions in this arm.
    pub decisions: Vec<String>,
}

pub struct WorkloadTune {
    pub name: String,
    pub expiries_ms: (u64, u64),
    pub stock_tunables: String,
    /// Check of the log reading: fio's own read p99 of the whole run (its JSON) and
    /// the p99 of every second of its histogram log merged (ns).
    pub check: Option<(f64, f64)>,
    pub windows: Vec<Window>,
    pub data: Vec<WindowData>,
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
}

pub struct TuneBench {
    pub schedule: Schedule,
    pub nr_requests: Option<String>,
    pub workloads: Vec<WorkloadTune>,
    pub failed: Vec<(String, String)>,
}

/// A statistic of one arm pooled over the picked cycles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    ReadP99,
    ReadMean,
    WritePooledP99,
    Throughput,
}

impl Metric {
    pub fn label(self) -> &'static str {
        match self {
            Metric::ReadP99 => "read p99",
            Metric::ReadMean => "read mean",
            Metric::WritePooledP99 => "write p99",
            Metric::Throughput => "throughput",
        }
    }

    /// The value pooled over `windows` (ns for latencies, bytes/s for throughput).
    pub fn pooled(self, windows: &[&WindowData]) -> Option<f64> {
        match self {
            Metric::Throughput => {
                let (kib, secs) = windows
                    .iter()
                    .fold((0.0, 0usize), |(k, s), w| (k + w.kib, s + w.seconds));
                (secs > 0).then(|| kib * 1024.0 / secs as f64)
            }
            _ => {
                let mut h = Vec::new();
                for w in windows {
                    let src = if self == Metric::WritePooledP99 {
                        &w.write_hist
                    } else {
                        &w.read_hist
                    };
                    fiolog::merge_into(&mut h, src);
                }
                match self {
                    Metric::ReadMean => fiolog::hist_mean_ns(&h),
                    _ => fiolog::hist_quantile_ns(&h, 0.99),
                }
            }
        }
    }
}

impl WorkloadTune {
    /// Window indices of `arm` by cycle.
    fn by_cycle(&self, arm: Arm) -> std::collections::BTreeMap<usize, usize> {
        self.windows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.arm == arm.index())
            .map(|(i, w)| (w.cycle, i))
            .collect()
    }

    /// `metric` of `arm` pooled over all its windows.
    pub fn value(&self, arm: Arm, metric: Metric) -> Option<f64> {
        let w: Vec<&WindowData> = self
            .by_cycle(arm)
            .values()
            .map(|&i| &self.data[i])
            .collect();
        metric.pooled(&w)
    }

    /// Relative change of `metric`, `arm` vs stock (negative: lower), pooled over the
    /// cycles where both ran, with its bootstrap interval over cycles.
    pub fn change(&self, arm: Arm, metric: Metric) -> Option<Estimate> {
        let (a, s) = (self.by_cycle(arm), self.by_cycle(Arm::Stock));
        let pairs: Vec<(usize, usize)> = a
            .iter()
            .filter_map(|(c, i)| Some((*i, *s.get(c)?)))
            .collect();
        stats::bootstrap(
            pairs.len(),
            |picked| {
                let x: Vec<&WindowData> = picked.iter().map(|&p| &self.data[pairs[p].0]).collect();
                let y: Vec<&WindowData> = picked.iter().map(|&p| &self.data[pairs[p].1]).collect();
                let (x, y) = (metric.pooled(&x)?, metric.pooled(&y)?);
                (y > 0.0).then(|| x / y - 1.0)
            },
            stats::RESAMPLES,
            stats::SEED,
        )
    }

    pub fn decisions(&self, arm: Arm) -> usize {
        self.by_cycle(arm)
            .values()
            .map(|&i| self.data[i].decisions.len())
            .sum()
    }

    pub fn cycles(&self) -> usize {
        self.by_cycle(Arm::Stock).len()
    }
}

/// The issue's goal on one workload, read from the intervals: ≥ 10% lower read p99
/// with ≤ 3% throughput loss.
pub fn goal(p99: &Estimate, tput: &Estimate) -> &'static str {
    if p99.hi <= -0.10 && tput.lo >= -0.03 {
        "met"
    } else if p99.lo > -0.10 || tput.hi < -0.03 {
        "missed"
    } else {
        "not resolved"
    }
}

/// More than 2% worse at p99 than stock: resolved (the interval wholly above),
/// possible (the point above, the interval across), or not.
pub fn worse(change: &Estimate) -> Option<&'static str> {
    if change.lo > 0.02 {
        Some("worse")
    } else if change.value > 0.02 {
        Some("possibly worse (not resolved)")
    } else {
        None
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
    let schedule = Schedule {
        cycles: ctx
            .tune_cycles
            .unwrap_or(if ctx.quick { 2 } else { 6 })
            .max(2),
        settle: Duration::from_secs(2),
        measure: Duration::from_secs(if ctx.quick { 10 } else { 16 }),
    };
    let disk = open_disk(ctx)?;
    let mut bench = TuneBench {
        schedule,
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
        match one_workload(ctx, &disk, job, schedule) {
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
    super::report::write_goal(&path, &goal_sentence(&bench))?;
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

struct TuneArms<'a> {
    ctx: &'a Ctx,
    disk: &'a Disk,
    stock: String,
    /// Per stop, in order: the agent's tune decisions.
    decisions: Vec<Vec<String>>,
}

impl Arms for TuneArms<'_> {
    type Live = Proc;
    type Sample = ();

    fn count(&self) -> usize {
        Arm::ALL.len()
    }

    fn label(&self, arm: usize) -> String {
        Arm::ALL[arm].name().to_owned()
    }

    fn start(&mut self, arm: usize, tag: &str) -> Result<Proc> {
        let now = tunables(self.disk)?;
        if now != self.stock {
            bail!("starts from {now}, not stock {}", self.stock);
        }
        let mut args = vec![
            "run",
            "--json",
            "--device",
            &self.disk.dev.name,
            "--model",
            MODEL,
        ];
        if Arm::ALL[arm] == Arm::Tune {
            args.extend(["--tune", "--tune-every", TUNE_EVERY]);
        }
        let (proc, _port) = spawn_agent(self.ctx, &self.ctx.agent, &args, tag)?;
        Ok(proc)
    }

    fn sample(&mut self, _arm: usize, _live: &mut Proc) -> Result<()> {
        Ok(())
    }

    fn stop(&mut self, _arm: usize, mut agent: Proc) -> Result<()> {
        let status = agent.stop(Duration::from_secs(20));
        if !status.is_some_and(|s| s.success()) {
            bail!(
                "the agent ended badly ({status:?}): {}",
                sys::tail(&agent.stderr, 5)
            );
        }
        let out = std::fs::read_to_string(&agent.stdout).unwrap_or_default();
        self.decisions.push(parse::agent_tuning(&out));
        Ok(())
    }
}

fn one_workload(ctx: &Ctx, disk: &Disk, job: &Path, schedule: Schedule) -> Result<WorkloadTune> {
    let name = workload_name(job);
    // The expiries calibrated at the stock settings, as in the learning measure.
    let (_, expiries_ms) = calibrate_expiries(ctx, disk, job, &format!("tune.{name}"), 1, 3)?;
    let stock = tunables(disk)?;
    eprintln!(
        "xtask: bench: tune {name}: read_expire {} ms, write_expire {} ms; stock {stock}",
        expiries_ms.0, expiries_ms.1
    );
    let load_before = super::loadavg();
    let tag = format!("tune.{name}");
    let prefix = ctx.logs.join(&tag);
    let mut fio = start_logged_fio(ctx, job, &disk.dev.path, &tag, None, true)?;
    let mut arms = TuneArms {
        ctx,
        disk,
        stock,
        decisions: Vec::new(),
    };
    let t0 = Instant::now();
    let measured: Result<Vec<Measured<()>>> = alternation::run(&mut arms, schedule, &mut fio, &tag);
    fio.stop(Duration::from_secs(30));
    let measured = measured?;
    eprintln!(
        "xtask: bench: tune {name}: {} windows in {:.0} s",
        measured.len(),
        t0.elapsed().as_secs_f64()
    );
    let windows: Vec<Window> = measured.iter().map(|m| m.window).collect();
    let mut data: Vec<WindowData> = arms
        .decisions
        .into_iter()
        .map(|d| WindowData {
            decisions: d,
            ..WindowData::default()
        })
        .collect();
    data.resize_with(windows.len(), WindowData::default);
    for path in fio_logs(&prefix, "bw") {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let samples = fiolog::parse_log(&text).with_context(|| format!("{}", path.display()))?;
        for ddir in [0u8, 1] {
            for (i, (n, kib)) in fiolog::per_window(&windows, &samples, Some(ddir))
                .into_iter()
                .enumerate()
            {
                data[i].kib += kib;
                // A job that idled in a second logs nothing for it: the seconds
                // of a window are those of its busiest log.
                data[i].seconds = data[i].seconds.max(n);
            }
        }
    }
    let hists = fio_logs(&prefix, "clat_hist");
    if hists.is_empty() {
        bail!(
            "fio wrote no histogram log at {}_clat_hist.*.log",
            prefix.display()
        );
    }
    let mut all_reads = Vec::new();
    for path in hists {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let samples =
            fiolog::parse_hist_log(&text).with_context(|| format!("{}", path.display()))?;
        for s in samples.iter().filter(|s| s.ddir == 0) {
            fiolog::merge_into(&mut all_reads, &s.bins);
        }
        for (i, h) in fiolog::hist_per_window(&windows, &samples, 0)
            .into_iter()
            .enumerate()
        {
            fiolog::merge_into(&mut data[i].read_hist, &h);
        }
        for (i, h) in fiolog::hist_per_window(&windows, &samples, 1)
            .into_iter()
            .enumerate()
        {
            fiolog::merge_into(&mut data[i].write_hist, &h);
        }
    }
    let json = ctx.logs.join(format!("{tag}.fio.json"));
    let check = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| parse_fio_latency(&t).ok())
        .zip(fiolog::hist_quantile_ns(&all_reads, 0.99))
        .map(|(f, h)| (f.read_p99_ns, h));
    let w = WorkloadTune {
        name: name.clone(),
        expiries_ms,
        stock_tunables: arms.stock,
        check,
        windows,
        data,
        load_before,
        load_after: super::loadavg(),
    };
    for arm in [Arm::StockAgain, Arm::Tune] {
        if let Some(c) = w.change(arm, Metric::ReadP99) {
            eprintln!(
                "xtask: bench: tune {name}: {} vs stock: read p99 {:+.1}% [{:+.1}, {:+.1}]",
                arm.name(),
                100.0 * c.value,
                100.0 * c.lo,
                100.0 * c.hi
            );
        }
    }
    Ok(w)
}

fn pct_ci(e: Option<Estimate>) -> String {
    e.map_or("–".into(), |e| {
        format!(
            "{:+.1}% [{:+.1}, {:+.1}]",
            100.0 * e.value,
            100.0 * e.lo,
            100.0 * e.hi
        )
    })
}

fn ms(x: Option<f64>) -> String {
    x.map_or("–".into(), |x| format!("{:.2}", x / 1e6))
}

/// Goal lines of issue 8, read from the intervals.
pub struct GoalCheck {
    pub met: Vec<String>,
    pub unresolved: Vec<String>,
    pub worse: Vec<String>,
}

pub fn verdict(b: &TuneBench) -> GoalCheck {
    let mut v = GoalCheck {
        met: Vec::new(),
        unresolved: Vec::new(),
        worse: Vec::new(),
    };
    for w in &b.workloads {
        if let (Some(p), Some(t)) = (
            w.change(Arm::Tune, Metric::ReadP99),
            w.change(Arm::Tune, Metric::Throughput),
        ) {
            match goal(&p, &t) {
                "met" => v.met.push(w.name.clone()),
                "not resolved" => v.unresolved.push(w.name.clone()),
                _ => {}
            }
        }
        for m in [Metric::ReadP99, Metric::WritePooledP99] {
            if let Some(what) = w.change(Arm::Tune, m).as_ref().and_then(worse) {
                v.worse.push(format!(
                    "{} ({} {}: {})",
                    w.name,
                    m.label(),
                    pct_ci(w.change(Arm::Tune, m)),
                    what
                ));
            }
        }
    }
    v
}

/// The issue goal and how far it was met, read from the intervals, in one sentence
/// (TUNE.md says it; REPORT.md's summary reads it from TUNE.json).
pub fn goal_sentence(b: &TuneBench) -> String {
    let v = verdict(b);
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    format!(
        "Issue goal (≥ 10% lower read p99 with ≤ 3% throughput loss on mixed workloads), read from the intervals: \
         met on {} of {} ({}); not resolved on {} ({}). Worse than stock by more than 2% at p99 (read or write): {}.",
        v.met.len(),
        b.workloads.len(),
        list(&v.met),
        v.unresolved.len(),
        list(&v.unresolved),
        if v.worse.is_empty() { "none".to_owned() } else { v.worse.join("; ") }
    )
}

pub fn render(ctx: &Ctx, b: &TuneBench) -> String {
    let mut md = String::new();
    let s = b.schedule;
    let _ = writeln!(
        md,
        "# Tuning mq-deadline on a stock kernel: stock vs `run --tune`\n"
    );
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench` (measure 6) on {} (kernel {}). **Per workload one fio run carries \
         three arms**: *stock* (the agent observes: `run --model {MODEL}`, online learning on), *stock \
         again* (the same, a second time: the A/A arm) and *tune* (the same agent with `--tune \
         --tune-every {TUNE_EVERY}`), {} cycles, the order following a Williams design. Each arm starts \
         its agent, waits until it observes, settles {:.0} s and is measured for {:.0} s (so the tune \
         arm includes the tuner's first decisions); stopping a tuning agent restores the original \
         tunables, and every arm checks it starts from them. Device: a direct-I/O loop device on the \
         real disk, mq-deadline, nr_requests {}; the expiries are calibrated per workload (p{:.0} of \
         the stock waits) and set in all arms. fio logs completion-latency histograms and bandwidth per \
         second (CLOCK_MONOTONIC); a second counts for an arm when it lies wholly in the arm's window. \
         Each arm's seconds are pooled over the cycles (percentiles from the merged histograms); a \
         change is tune (or stock again) vs stock with a 95% bootstrap interval over cycles.\n",
        super::tool_version("date", "-u"),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        s.cycles,
        s.settle.as_secs_f64(),
        s.measure.as_secs_f64(),
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
        "**The noise (A/A):** *stock again* vs *stock*, the same configuration measured twice in the same \
         run. A tune-vs-stock change is resolved when its interval excludes the goal's threshold; the A/A \
         intervals below show how wide the noise is per workload.\n"
    );
    let _ = writeln!(
        md,
        "| workload | expiries r/w ms | metric | stock | stock again vs stock (A/A) | tune vs stock | \n| --- | --- | --- | --- | --- | --- |"
    );
    for w in &b.workloads {
        for (k, m) in [
            Metric::ReadP99,
            Metric::ReadMean,
            Metric::WritePooledP99,
            Metric::Throughput,
        ]
        .into_iter()
        .enumerate()
        {
            let stock = match m {
                Metric::Throughput => w
                    .value(Arm::Stock, m)
                    .map_or("–".into(), |v| format!("{:.1} MB/s", v / 1e6)),
                _ => format!("{} ms", ms(w.value(Arm::Stock, m))),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {stock} | {} | **{}** |",
                if k == 0 { w.name.as_str() } else { "" },
                if k == 0 {
                    format!("{}/{}", w.expiries_ms.0, w.expiries_ms.1)
                } else {
                    String::new()
                },
                m.label(),
                pct_ci(w.change(Arm::StockAgain, m)),
                pct_ci(w.change(Arm::Tune, m))
            );
        }
    }
    for (n, e) in &b.failed {
        let _ = writeln!(md, "| {n} | FAILED: {} | | | | |", e.replace('|', "/"));
    }
    let _ = writeln!(
        md,
        "\n| workload | stock tunables | cycles | tune decisions | goal (≥ 10% lower read p99, ≤ 3% throughput loss) | load before → after | read p99 of the whole run: fio's JSON / its per-second histograms |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for w in &b.workloads {
        let g = match (
            w.change(Arm::Tune, Metric::ReadP99),
            w.change(Arm::Tune, Metric::Throughput),
        ) {
            (Some(p), Some(t)) => goal(&p, &t),
            _ => "–",
        };
        let l = |x: Option<[f64; 3]>| x.map_or("–".into(), |l| format!("{:.1}", l[0]));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {g} | {} → {} | {} |",
            w.name,
            w.stock_tunables,
            w.cycles(),
            w.decisions(Arm::Tune),
            l(w.load_before),
            l(w.load_after),
            w.check.map_or("–".into(), |(f, h)| format!(
                "{} / {} ms",
                ms(Some(f)),
                ms(Some(h))
            ))
        );
    }
    let _ = writeln!(md, "\n{}\n", goal_sentence(b));
    let examples: Vec<&String> = b
        .workloads
        .iter()
        .flat_map(|w| w.data.iter().flat_map(|d| d.decisions.iter()))
        .take(6)
        .collect();
    if !examples.is_empty() {
        let _ = writeln!(
            md,
            "Some decisions, as the agent reported them (its `tick` events):\n\n```"
        );
        for e in examples {
            let _ = writeln!(md, "{}", e.trim());
        }
        let _ = writeln!(md, "```\n");
    }
    let _ = writeln!(
        md,
        "Logs: `{}/tune.*` (fio's JSON and per-second logs, the agent's output per arm).",
        ctx.rel(&ctx.logs)
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(arm: Arm, cycle: usize) -> Window {
        Window {
            arm: arm.index(),
            cycle,
            start_ms: 0,
            end_ms: 1,
        }
    }

    fn data(read_bin: usize, kib: f64) -> WindowData {
        let mut read_hist = vec![0u64; 400];
        read_hist[read_bin] = 100;
        WindowData {
            read_hist,
            write_hist: vec![1],
            kib,
            seconds: 10,
            decisions: Vec::new(),
        }
    }

    #[test]
    fn changes_pool_the_cycles_and_pair_them() {
        let mut windows = Vec::new();
        let mut d = Vec::new();
        for c in 0..4 {
            windows.push(window(Arm::Stock, c));
            d.push(data(300, 1000.0));
            windows.push(window(Arm::StockAgain, c));
            d.push(data(300, 1000.0));
            windows.push(window(Arm::Tune, c));
            d.push(data(250, 990.0));
        }
        let w = WorkloadTune {
            name: "w".into(),
            expiries_ms: (4, 8),
            stock_tunables: String::new(),
            check: None,
            windows,
            data: d,
            load_before: None,
            load_after: None,
        };
        let aa = w.change(Arm::StockAgain, Metric::ReadP99).unwrap();
        assert_eq!((aa.value, aa.lo, aa.hi), (0.0, 0.0, 0.0));
        let p = w.change(Arm::Tune, Metric::ReadP99).unwrap();
        let expect = fiolog::bin_value_ns(250) / fiolog::bin_value_ns(300) - 1.0;
        assert!((p.value - expect).abs() < 1e-12);
        let t = w.change(Arm::Tune, Metric::Throughput).unwrap();
        assert!((t.value + 0.01).abs() < 1e-12);
        assert_eq!(
            w.value(Arm::Stock, Metric::Throughput),
            Some(1000.0 * 1024.0 / 10.0)
        );
        assert_eq!(w.cycles(), 4);
        assert_eq!(goal(&p, &t), if expect <= -0.10 { "met" } else { "missed" });
    }

    #[test]
    fn goals_and_worse_from_intervals() {
        let e = |value, lo, hi| Estimate {
            value,
            lo,
            hi,
            n: 6,
        };
        assert_eq!(goal(&e(-0.2, -0.25, -0.15), &e(0.0, -0.01, 0.01)), "met");
        assert_eq!(
            goal(&e(-0.2, -0.25, -0.05), &e(0.0, -0.01, 0.01)),
            "not resolved"
        );
        assert_eq!(
            goal(&e(-0.05, -0.08, -0.02), &e(0.0, -0.01, 0.01)),
            "missed"
        );
        assert_eq!(
            goal(&e(-0.2, -0.25, -0.15), &e(-0.1, -0.12, -0.05)),
            "missed"
        );
        assert_eq!(worse(&e(0.05, 0.03, 0.07)), Some("worse"));
        assert_eq!(
            worse(&e(0.05, -0.01, 0.1)),
            Some("possibly worse (not resolved)")
        );
        assert_eq!(worse(&e(0.01, -0.01, 0.03)), None);
    }
}
