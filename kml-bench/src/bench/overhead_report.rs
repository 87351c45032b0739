//! The overhead measure in the report: summary rows with the issue's goals beside
//! (met / missed / not resolved, read from the confidence interval, never asserted),
//! section 1 (arms, ratios, CPU per I/O, the A/A noise floor, before/after),
//! the per-event cost of one observer at a time (section 2) and the agent's CPU and
//! memory (section 3).

use std::fmt::Write as _;

use super::overhead::{ArmKind, Overhead};
use super::parse::EventProg;
use super::stats::Estimate;
use super::svg::{self, BarChart};
use super::Ctx;

/// The arms that run kml's agent, which `--before` repeats with the earlier build.
const AGENT_ARMS: [&str; 3] = ["observe", "infer", "infer-position"];

/// Where an interval lies against a goal: wholly on the good side (met), wholly on
/// the bad side (missed), or across it (the run cannot tell).
pub fn against(e: &Estimate, goal: f64, at_least: bool) -> &'static str {
    let (good_lo, good_hi) = if at_least {
        (e.lo >= goal, e.hi >= goal)
    } else {
        (e.hi <= goal, e.lo <= goal)
    };
    match (good_lo, good_hi) {
        (true, _) => "met",
        (false, false) => "missed",
        (false, true) => "not resolved (the interval spans the goal)",
    }
}

fn ci(e: &Estimate, decimals: usize) -> String {
    format!("{:.d$} [{:.d$}, {:.d$}]", e.value, e.lo, e.hi, d = decimals)
}

fn load(l: Option<[f64; 3]>) -> String {
    l.map_or("–".into(), |l| {
        format!("{:.2} / {:.2} / {:.2}", l[0], l[1], l[2])
    })
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// Goals of issue 14 on the observer (IOPS ratio to no probes; ns per event; agent).
pub const GOAL_OBSERVE: f64 = 0.95;
pub const GOAL_INFER: f64 = 0.93;
pub const GOAL_MARGIN_OVER_BPFTRACE: f64 = 0.15;
pub const GOAL_NS: [(EventProg, f64); 3] = [
    (EventProg::Insert, 150.0),
    (EventProg::Issue, 60.0),
    (EventProg::Complete, 150.0),
];
pub const GOAL_RSS_BYTES: f64 = 50e6;
pub const GOAL_CPU_SHARE: f64 = 0.02;

/// Summary rows (the table's header is the report's).
pub fn summary_rows(md: &mut String, o: &Overhead) {
    let m = &o.main;
    let base = 0;
    if let Some(aa) = o.arm("aa").and_then(|i| m.ratio(i, base)) {
        let _ = writeln!(
            md,
            "| observer overhead, the method's noise floor: IOPS, no probes (A/A) over no probes | contains 1.000 | {} (±{:.3}; {} cycles) |",
            ci(&aa, 3),
            aa.half_width(),
            aa.n
        );
    }
    if let Some(aa) = o.arm("aa").and_then(|i| m.path_cpu_ratio(i, base)) {
        let _ = writeln!(
            md,
            "| observer overhead, the method's noise floor: I/O-path CPU per I/O, no probes (A/A) over no probes | contains 1.000 | {} (±{:.3}) |",
            ci(&aa, 3),
            aa.half_width()
        );
    }
    for key in ["observe", "infer"] {
        let Some(i) = o.arm(key) else { continue };
        if let Some(r) = m.path_cpu_ratio(i, base) {
            let _ = writeln!(
                md,
                "| observer overhead: I/O-path CPU per I/O over no probes, {} | – | {} |",
                o.arms[i].label,
                ci(&r, 3)
            );
        }
    }
    for (key, goal, what) in [
        ("observe", GOAL_OBSERVE, "kml observe"),
        ("infer", GOAL_INFER, "kml observe + infer"),
    ] {
        let Some(i) = o.arm(key) else { continue };
        let Some(r) = m.ratio(i, base) else { continue };
        let _ = writeln!(
            md,
            "| observer overhead: IOPS ratio to no probes, {what} | ≥ {goal:.2} | **{}** (95% CI, {} cycles): {} |",
            ci(&r, 3),
            r.n,
            against(&r, goal, true)
        );
        if let Some(d) = o
            .arm("bpftrace")
            .and_then(|b| m.ratio_difference(i, b, base))
        {
            let _ = writeln!(
                md,
                "| observer overhead: {what} minus bpftrace (IOPS ratio points, same run) | ≥ {GOAL_MARGIN_OVER_BPFTRACE:.2} | {}: {} |",
                ci(&d, 3),
                against(&d, GOAL_MARGIN_OVER_BPFTRACE, true)
            );
        }
    }
    for key in ["null", "biolatency", "biosnoop", "bpftrace"] {
        let Some(i) = o.arm(key) else { continue };
        if let Some(r) = m.ratio(i, base) {
            let _ = writeln!(
                md,
                "| observer overhead: IOPS ratio to no probes, reference {} | – | {} |",
                o.arms[i].label,
                ci(&r, 3)
            );
        }
    }
    if let (Ok(c), Some(i)) = (&o.cost, o.cost_arm("observe")) {
        let cells: Vec<String> = GOAL_NS
            .iter()
            .map(|(e, goal)| match c.ns_per_event(i, *e) {
                Some((est, _)) => format!(
                    "{} {} (≤ {goal:.0}: {})",
                    e.name(),
                    ci(&est, 0),
                    against(&est, *goal, false)
                ),
                None => format!("{} –", e.name()),
            })
            .collect();
        let _ = writeln!(
            md,
            "| observer: in-kernel ns per event, kml observe alone (bpf_stats) | insert ≤ 150, issue ≤ 60, complete ≤ 150 | {} |",
            cells.join("; ")
        );
    }
    if let Some(i) = o.arm("observe") {
        let iops = m.mean_iops(i).unwrap_or(0.0);
        let cpu = m.agent_cpu_share(i);
        let rss = m.agent_rss(i);
        let _ = writeln!(
            md,
            "| observer: the agent while observing {:.0}k IOPS: CPU (share of one core), peak RSS | ≤ 2% of a core, ≤ 50 MB | {}; peak RSS {}: {} |",
            iops / 1e3,
            cpu.map_or("–".into(), |c| format!(
                "{:.1}% [{:.1}, {:.1}]: {}",
                100.0 * c.value,
                100.0 * c.lo,
                100.0 * c.hi,
                against(&c, GOAL_CPU_SHARE, false)
            )),
            rss.map_or("–".into(), |r| mb(r.0 as f64)),
            rss.map_or("–", |r| if (r.0 as f64) <= GOAL_RSS_BYTES {
                "met"
            } else {
                "missed"
            })
        );
    }
}

/// OVERHEAD.md: summary with the goals, method, arms, the A/A noise floor, the
/// before/after of `--before`, the per-event cost and the agent's CPU and memory.
pub fn document(ctx: &Ctx, o: &Overhead, plots: &mut Vec<(String, String)>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Observer overhead: every arm inside one fio run\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench` (measure 1) on {} (kernel {}); `{}`. Nothing is asserted: the \
         goals are printed beside the figures, met or missed as their 95% intervals say (\"not resolved\" \
         when the interval spans the goal).\n",
        super::tool_version("date", "-u"),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        o.command
    );
    if let Some(l) = o.main.load_before.filter(|l| l[0] > 1.0) {
        let _ = writeln!(
            md,
            "> **Noise warning:** load average {:.1} at the start: other work shared the 2 CPUs. The A/A \
             rows say how wide that made the intervals.\n",
            l[0]
        );
    }
    let _ = writeln!(
        md,
        "## Summary\n\n| headline | goal | measured |\n| --- | --- | --- |"
    );
    summary_rows(&mut md, o);
    let _ = writeln!(md, "\n## Method and arms\n");
    section(&mut md, plots, ctx, o);
    reading(&mut md, o);
    let _ = writeln!(md, "## In-kernel cost per event\n");
    cost_section(&mut md, o);
    let _ = writeln!(md, "## The agent: CPU and memory\n");
    agent_section(&mut md, o);
    let _ = writeln!(
        md,
        "## Reproducing\n\n`cargo xtask bench --only overhead` (as root; about 20 minutes) writes this file and \
         section 1 of REPORT.md. `--before REV` adds the agent of a git revision (built once into \
         `~/.cache/kml/bench-before/`) as arms of the same run: the before/after of a change. `--cycles N`, \
         `--arm-secs S` and `--arms none,aa,null,biolatency,biosnoop,bpftrace,observe,infer` shape the \
         run; `--pin` pins fio and the consumers to different CPUs. Logs: `{}/overhead*` (fio's \
         per-second logs, every agent's output).",
        ctx.rel(&ctx.logs)
    );
    md
}

/// The method, the arms, the A/A floors, the table, before/after and the plot.
pub fn section(md: &mut String, plots: &mut Vec<(String, String)>, ctx: &Ctx, o: &Overhead) {
    let m = &o.main;
    let s = m.schedule;
    let _ = writeln!(
        md,
        "fio 4k random reads, iodepth 32, one job, O_DIRECT, on a loop device backed by a file on a \
         private tmpfs (buffered loop: tmpfs has no O_DIRECT), scheduler mq-deadline; job file \
         [`bench/overhead-randread.fio`]({}). **One fio run carries every arm**: {} arms × {} cycles; \
         in each cycle every arm is attached, left {:.0} s to settle, measured for {:.1} s and detached, \
         the order following a Williams design (each arm in every position and after every other arm \
         equally often). fio logs IOPS per second on CLOCK_MONOTONIC; a second counts for an arm only \
         when it lies wholly inside the arm's window, so the seconds of an attach, a start-up or a \
         detach are dropped. An arm's ratio is its mean IOPS over the no-probe arm's in the same \
         cycles, with a 95% bootstrap interval over cycles (2000 resamples of whole cycles). **I/O-path CPU \
         per I/O** is the CPU time of the threads that carry the I/O — fio's, the kernel's I/O workers \
         (`kworker/*`, which run the loop device and kblockd, and `ksoftirqd/*`) and the arm's consumer \
         (the agent, bpftrace, biosnoop's reader) — from their schedstat (ns; on this kernel without IRQ \
         time accounting it includes the interrupts and softirqs they took), over the window's I/Os; \
         its ratio to no probes is paired by cycle like the IOPS ratio. On this device the CPU is the \
         bottleneck, so the IOPS ratio is roughly the inverse of that CPU ratio, but the CPU cost \
         depends far less on how much CPU other tenants leave: it is the figure that resolves small \
         changes on a shared machine. The machine's kernel CPU per I/O (/proc/stat: system + irq + \
         softirq, every process's) is given too; it includes other tenants' work.\n",
        super::report::rel_link(ctx, &super::overhead::job_file(ctx)),
        o.arms.len(),
        s.cycles,
        s.settle.as_secs_f64(),
        s.measure.as_secs_f64()
    );
    let _ = writeln!(md, "Arms:\n");
    for a in &o.arms {
        let what = match &a.kind {
            ArmKind::NoProbe if a.key == "none" => "nothing attached: the baseline".to_owned(),
            ArmKind::NoProbe => "nothing attached, a second time: the A/A arm, whose ratio to the baseline is the method's noise".to_owned(),
            ArmKind::Ref(k) => match k {
                kml_ebpf_common::bench_refs::RefKind::Null => "three raw tracepoint programs (insert, issue, complete) that return at once: the cost of being attached at all (kml-ebpf's `kml-refs` object, loaded once, attached per arm)".to_owned(),
                kml_ebpf_common::bench_refs::RefKind::Biolatency => "like BCC's `biolatency -Q`, on raw tracepoints: a start time per request in a hash map at insert, a log2 µs histogram at completion, no records".to_owned(),
                kml_ebpf_common::bench_refs::RefKind::Biosnoop => "like BCC's `biosnoop -Q`, on raw tracepoints: insert time, pid and comm per request, issue time, and one 64-byte ring-buffer record per completion, consumed by a minimal reader thread that only counts them".to_owned(),
            },
            ArmKind::Bpftrace => format!(
                "`bpftrace {}` (classic tracepoints, per-request maps keyed by (dev, sector), two histograms), started for the arm and stopped after it",
                "bench/overhead.bt"
            ),
            ArmKind::Agent { model, .. } => format!(
                "`kml-agent run --model {} --retrain-every 0 --metrics ADDR`, started for the arm and stopped after it; the window opens {:.0} s after its metrics page lists its three attached programs",
                if model.is_some() { "M" } else { "none" },
                s.settle.as_secs_f64()
            ),
        };
        let _ = writeln!(md, "- **{}**: {what}", a.label);
    }
    let _ = writeln!(
        md,
        "\nCPU placement: {}.\n",
        if o.pinned {
            "`--pin`: fio on CPU 0, the agent / bpftrace on CPU 1 (the in-process biosnoop reader is not pinned)"
        } else {
            "no pinning: everything goes where the scheduler puts it on the 2 CPUs, as in production, so a consumer's CPU use counts in the ratio"
        }
    );
    if let Some(aa) = o.arm("aa").and_then(|i| m.path_cpu_ratio(i, 0)) {
        let _ = writeln!(
            md,
            "**Noise floor of the CPU cost (A/A):** I/O-path CPU per I/O, no probes over no probes = {} \
             (±{:.3}).\n",
            ci(&aa, 3),
            aa.half_width()
        );
    }
    if let Some(aa) = o.arm("aa").and_then(|i| m.ratio(i, 0)) {
        let _ = writeln!(
            md,
            "**Noise floor of this run (A/A):** no probes over no probes = {} — {}; the interval's half-width, \
             ±{:.3}, is the smallest difference between two arms this run can resolve.\n",
            ci(&aa, 3),
            if aa.contains(1.0) {
                "contains 1.0 as it must"
            } else {
                "does NOT contain 1.0: the method is biased or the machine drifted within cycles"
            },
            aa.half_width()
        );
    }
    let _ = writeln!(
        md,
        "| arm | mean IOPS | IOPS ratio to no probes (95% CI) | I/O-path CPU ns per I/O (95% CI) | I/O-path CPU per I/O over no probes (95% CI) | machine kernel CPU µs per I/O (95% CI) | drops | cycles |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (i, a) in o.arms.iter().enumerate() {
        let ratio = if i == 0 {
            "1 (baseline)".to_owned()
        } else {
            m.ratio(i, 0)
                .map_or("–".into(), |r| format!("**{}**", ci(&r, 3)))
        };
        let path_ratio = if i == 0 {
            "1 (baseline)".to_owned()
        } else {
            m.path_cpu_ratio(i, 0)
                .map_or("–".into(), |r| format!("**{}**", ci(&r, 3)))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {ratio} | {} | {path_ratio} | {} | {} | {} |",
            a.label,
            m.mean_iops(i).map_or("–".into(), |v| format!("{v:.0}")),
            m.path_cpu_per_io(i).map_or("–".into(), |e| ci(&e, 0)),
            m.cpu_per_io_us(i, true, o.ticks_per_s)
                .map_or("–".into(), |e| ci(&e, 2)),
            m.drops(i).map_or("–".into(), |d| d.to_string()),
            m.by_cycle(i)
                .values()
                .filter(|w| m.window_iops(**w).is_some())
                .count()
        );
    }
    for (w, why) in &m.invalid {
        let mw = &m.measured[*w];
        let _ = writeln!(
            md,
            "\nLeft out: {} in cycle {}: {why}.",
            o.arms[mw.window.arm].label,
            mw.window.cycle + 1
        );
    }
    let _ = writeln!(
        md,
        "\nLoad average: {} before, {} after ({:.0} s); fio over the whole run: {}.\n",
        load(m.load_before),
        load(m.load_after),
        m.wall_s,
        m.fio.as_ref().map_or("–".into(), |f| format!(
            "{:.0} IOPS, {} I/Os (every arm mixed)",
            f.iops(),
            f.ios()
        ))
    );
    before_after(md, o);
    let chart = BarChart {
        title: "Observer overhead: fio 4k randread QD32 IOPS relative to no probes".into(),
        y_label: "IOPS ratio (whiskers: 95% CI over cycles)".into(),
        series: vec!["ratio".into()],
        groups: o
            .arms
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, a)| (a.label.clone(), vec![m.ratio(i, 0).map(|r| r.value)]))
            .collect(),
        y_range: Some((0.0, 1.2)),
        references: vec![(GOAL_OBSERVE, format!("goal {GOAL_OBSERVE}"))],
        value_decimals: Some(3),
        ranges: (1..o.arms.len())
            .map(|i| vec![m.ratio(i, 0).map(|r| (r.lo, r.hi))])
            .collect(),
    };
    plots.push(("overhead.svg".into(), svg::bar_chart(&chart)));
    let _ = writeln!(
        md,
        "![IOPS ratio per arm (whiskers: 95% CI)](overhead.svg)\n"
    );
}

/// Before/after: each agent arm of `--before` beside this tree's, in the same run.
fn before_after(md: &mut String, o: &Overhead) {
    let Some((rev, short)) = &o.before else {
        return;
    };
    let m = &o.main;
    let _ = writeln!(
        md,
        "### Before / after (`--before {rev}`: {short})\n\n\
         The agent of {short} (built from that commit) and this tree's agent ran as arms of the same fio \
         run. \"after / before\" is this tree's IOPS over the earlier agent's in the same cycles, with its \
         interval; a change is resolved when the interval excludes 1.\n\n\
         | configuration | before: IOPS ratio to no probes | after: IOPS ratio to no probes | IOPS after / before | I/O-path CPU ns per I/O before → after | CPU per I/O after / before |\n| --- | --- | --- | --- | --- | --- |"
    );
    for key in AGENT_ARMS {
        let (Some(a), Some(b)) = (o.arm(key), o.arm(&format!("{key}@before"))) else {
            continue;
        };
        let r = |i| m.ratio(i, 0).map_or("–".into(), |e| ci(&e, 3));
        let cpu = |i| m.path_cpu_per_io(i).map_or("–".into(), |e| ci(&e, 0));
        let _ = writeln!(
            md,
            "| {} | {} | {} | **{}** | {} → {} | **{}** |",
            o.arms[a].label,
            r(b),
            r(a),
            m.ratio(a, b).map_or("–".into(), |e| ci(&e, 3)),
            cpu(b),
            cpu(a),
            m.path_cpu_ratio(a, b).map_or("–".into(), |e| ci(&e, 3))
        );
    }
    if let Ok(c) = &o.cost {
        let _ = writeln!(
            md,
            "\nns per event (bpf_stats, one observer at a time), before → after:\n\n| configuration | insert | issue | complete |\n| --- | --- | --- | --- |"
        );
        for key in AGENT_ARMS {
            let (Some(a), Some(b)) = (o.cost_arm(key), o.cost_arm(&format!("{key}@before"))) else {
                continue;
            };
            let cell = |e| {
                let f = |i| {
                    c.ns_per_event(i, e)
                        .map_or("–".into(), |(est, _): (Estimate, f64)| ci(&est, 0))
                };
                format!("{} → {}", f(b), f(a))
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                o.arms[o.cost_arms[a]].label,
                cell(EventProg::Insert),
                cell(EventProg::Issue),
                cell(EventProg::Complete)
            );
        }
    }
    let _ = writeln!(md);
}

/// Section 2's per-event table: one observer at a time, with bpf_stats.
pub fn cost_section(md: &mut String, o: &Overhead) {
    let c = match &o.cost {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(md, "Per event, one observer at a time: FAILED: {e}\n");
            return;
        }
    };
    let _ = writeln!(
        md,
        "One observer at a time: a second fio run (the same job) with `kernel.bpf_stats_enabled=1` (restored after), the \
         observers alternating as in measure 1 ({} cycles × {:.0} s): at the edges of each window the \
         kernel's `run_time_ns` and `run_cnt` of the attached observer's insert, issue and complete \
         programs (BPF_OBJ_GET_INFO_BY_FD; an agent's programs found through its /proc/PID/fdinfo). \
         ns per event = Σ run time / Σ runs over the cycles, 95% bootstrap interval over cycles. \
         bpf_stats adds its own two clock reads to every run: the null observer's numbers are that \
         floor. The references run on every disk's events; kml's insert program includes its \
         tail-called feature and model stages.\n",
        c.schedule.cycles,
        c.schedule.measure.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| observer | insert ns | issue ns | complete ns | sum per request | insert runs/s |\n| --- | --- | --- | --- | --- | --- |"
    );
    for (ci_, &arm) in o.cost_arms.iter().enumerate() {
        let get = |e| c.ns_per_event(ci_, e);
        let cells: Vec<Option<(Estimate, f64)>> = EventProg::ALL.iter().map(|e| get(*e)).collect();
        let sum: Option<f64> = cells.iter().map(|x| x.map(|(e, _)| e.value)).sum();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            o.arms[arm].label,
            cells[0].map_or("–".into(), |(e, _)| ci(&e, 0)),
            cells[1].map_or("–".into(), |(e, _)| ci(&e, 0)),
            cells[2].map_or("–".into(), |(e, _)| ci(&e, 0)),
            sum.map_or("–".into(), |s| format!("{s:.0}")),
            cells[0].map_or("–".into(), |(_, r)| format!("{r:.0}"))
        );
    }
    let _ = writeln!(
        md,
        "\nGoals (kml observe alone): insert ≤ 150 ns, issue ≤ 60 ns, complete ≤ 150 ns. Load: {} before, {} after.\n",
        load(c.load_before),
        load(c.load_after)
    );
}

/// Section 3's live part.
pub fn agent_section(md: &mut String, o: &Overhead) {
    let m = &o.main;
    let _ = writeln!(
        md,
        "From the agent's own metrics page (`--metrics`: `kml_process_cpu_seconds_total`, \
         `kml_process_resident_memory_bytes`, `kml_process_peak_resident_memory_bytes`, \
         `kml_ring_full_drops_total`), scraped at the edges of each measured window of measure 1 \
         (an agent without process metrics, such as an older one of `--before`, is read from \
         /proc/PID instead, and marked). CPU is the share of one core over the windows (Σ CPU s / \
         Σ window s, 95% CI over cycles); RSS is at the end of the windows: the median, and the largest \
         peak (VmHWM). Each agent ran a few seconds per cycle, long enough to fill its 200,000-record \
         window at these rates.\n"
    );
    let _ = writeln!(
        md,
        "| agent arm | mean IOPS | agent CPU, share of one core (95% CI) | RSS (median) | peak RSS | drops | source |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for (i, a) in o.arms.iter().enumerate().filter(|(_, a)| a.is_agent()) {
        let rss = m.agent_rss(i);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            a.label,
            m.mean_iops(i).map_or("–".into(), |v| format!("{v:.0}")),
            m.agent_cpu_share(i).map_or("–".into(), |c| format!(
                "{:.2}% [{:.2}, {:.2}]",
                100.0 * c.value,
                100.0 * c.lo,
                100.0 * c.hi
            )),
            rss.map_or("–".into(), |r| mb(r.1)),
            rss.map_or("–".into(), |r| mb(r.0 as f64)),
            m.drops(i).map_or("–".into(), |d| d.to_string()),
            if m.agent_from_proc(i) {
                "/proc/PID"
            } else {
                "metrics"
            }
        );
    }
    let _ = writeln!(md, "\nGoals: ≤ 2% of a core and ≤ 50 MB at ~200k IOPS.\n");
}

/// The no-probe IOPS and the observer's ns per request, for the reading under
/// section 1 (kept short: numbers, no judgement).
pub fn reading(md: &mut String, o: &Overhead) {
    let (Ok(c), Some(i), Some(base)) = (&o.cost, o.cost_arm("observe"), o.main.mean_iops(0)) else {
        return;
    };
    let per_req: Option<f64> = EventProg::ALL
        .iter()
        .map(|e| c.ns_per_event(i, *e).map(|x| x.0.value))
        .sum();
    if let Some(ns) = per_req {
        let _ = writeln!(
            md,
            "Reading: kml's three programs take {ns:.0} ns per request in the kernel (the per-event table below, with \
             bpf_stats' clock reads); at the no-probe rate of {:.0}k IOPS that is {:.0}% of one CPU in the \
             submission and completion paths that fio and the loop worker already saturate on this \
             2-CPU machine.\n",
            base / 1e3,
            100.0 * ns * 1e-9 * base
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(value: f64, lo: f64, hi: f64) -> Estimate {
        Estimate {
            value,
            lo,
            hi,
            n: 20,
        }
    }

    #[test]
    fn goals_are_read_from_the_interval() {
        assert_eq!(against(&e(0.97, 0.96, 0.98), 0.95, true), "met");
        assert_eq!(against(&e(0.90, 0.88, 0.92), 0.95, true), "missed");
        assert!(against(&e(0.95, 0.94, 0.96), 0.95, true).starts_with("not resolved"));
        assert_eq!(against(&e(120.0, 110.0, 130.0), 150.0, false), "met");
        assert_eq!(against(&e(180.0, 170.0, 190.0), 150.0, false), "missed");
        assert!(against(&e(150.0, 140.0, 160.0), 150.0, false).starts_with("not resolved"));
        assert_eq!(ci(&e(0.5, 0.25, 0.75), 2), "0.50 [0.25, 0.75]");
    }
}
