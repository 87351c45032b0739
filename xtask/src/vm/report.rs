//! Reading what the guest wrote to the share: fio's JSON output, the block
//! tracepoint logs of the smoke test, the boost counters; the comparison and the
//! report.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// Latency and throughput of one direction of one fio run (all jobs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    pub bw_bytes: f64,
    pub iops: f64,
    /// Total latency (submission + completion), nanoseconds. With more than one
    /// job doing this direction, the I/O-weighted average of the jobs' values.
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub p999_ns: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunStats {
    pub read: DirStats,
    pub write: DirStats,
}

impl RunStats {
    pub fn throughput_bytes(&self) -> f64 {
        self.read.bw_bytes + self.write.bw_bytes
    }
    pub fn mixed(&self) -> bool {
        self.read.ios > 0 && self.write.ios > 0
    }
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(n) => cur = n,
            None => return 0.0,
        }
    }
    cur.as_f64().unwrap_or(0.0)
}

fn percentile(dir: &Value, which: &str) -> f64 {
    for lat in ["lat_ns", "clat_ns"] {
        if let Some(p) = dir
            .get(lat)
            .and_then(|l| l.get("percentile"))
            .and_then(|p| p.get(which))
        {
            if let Some(x) = p.as_f64() {
                return x;
            }
        }
    }
    0.0
}

fn dir_stats(jobs: &[Value], dir: &str) -> DirStats {
    let mut s = DirStats::default();
    let mut weight = 0.0;
    for j in jobs {
        let d = &j[dir];
        let ios = num(d, &["total_ios"]) as u64;
        if ios == 0 {
            continue;
        }
        let w = ios as f64;
        s.ios += ios;
        s.bytes += num(d, &["io_bytes"]) as u64;
        s.bw_bytes += num(d, &["bw_bytes"]);
        s.iops += num(d, &["iops"]);
        s.mean_ns += w * num(d, &["lat_ns", "mean"]);
        s.p50_ns += w * percentile(d, "50.000000");
        s.p99_ns += w * percentile(d, "99.000000");
        s.p999_ns += w * percentile(d, "99.900000");
        weight += w;
    }
    if weight > 0.0 {
        s.mean_ns /= weight;
        s.p50_ns /= weight;
        s.p99_ns /= weight;
        s.p999_ns /= weight;
    }
    s
}

/// Parses fio's `--output-format=json` output (anything before the first `{`,
/// such as a warning, is skipped).
pub fn parse_fio(text: &str) -> Result<RunStats> {
    let start = text.find('{').context("no JSON object in the fio output")?;
    let v: Value = serde_json::from_str(&text[start..]).context("fio JSON")?;
    let jobs = v["jobs"].as_array().context("fio JSON without `jobs`")?;
    for j in jobs {
        let err = num(j, &["error"]);
        if err != 0.0 {
            bail!("fio job {} reported error {err}", j["jobname"]);
        }
    }
    Ok(RunStats {
        read: dir_stats(jobs, "read"),
        write: dir_stats(jobs, "write"),
    })
}

/// Several runs of the same phase as one: I/O counts and bytes summed, rates
/// averaged, latencies I/O-weighted.
pub fn combine(runs: &[RunStats]) -> RunStats {
    fn dir(ds: &[DirStats]) -> DirStats {
        let mut s = DirStats::default();
        let n = ds.len().max(1) as f64;
        let w: f64 = ds.iter().map(|d| d.ios as f64).sum();
        for d in ds {
            s.ios += d.ios;
            s.bytes += d.bytes;
            s.bw_bytes += d.bw_bytes / n;
            s.iops += d.iops / n;
            if w > 0.0 {
                let f = d.ios as f64 / w;
                s.mean_ns += f * d.mean_ns;
                s.p50_ns += f * d.p50_ns;
                s.p99_ns += f * d.p99_ns;
                s.p999_ns += f * d.p999_ns;
            }
        }
        s
    }
    RunStats {
        read: dir(&runs.iter().map(|r| r.read).collect::<Vec<_>>()),
        write: dir(&runs.iter().map(|r| r.write).collect::<Vec<_>>()),
    }
}

/// Relative change in percent; 0 when the base is 0.
pub fn pct(new: f64, base: f64) -> f64 {
    if base == 0.0 {
        0.0
    } else {
        (new - base) / base * 100.0
    }
}

fn ms(ns: f64) -> String {
    format!("{:.1}", ns / 1e6)
}

/// The boost counters the guest wrote (`stock b c b c` / `hook b c b c`: kml_boosts
/// and kml_capped before and after a run), summed over the runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boosts {
    pub stock_boosts: u64,
    pub hook_boosts: u64,
    pub hook_capped: u64,
}

pub fn parse_boosts(text: &str) -> Result<Boosts> {
    let mut b = Boosts::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 5 {
            continue;
        }
        let n: Vec<u64> = f[1..].iter().map(|x| x.parse().unwrap_or(0)).collect();
        match f[0] {
            "stock" => b.stock_boosts += n[2].saturating_sub(n[0]),
            "hook" => {
                b.hook_boosts += n[2].saturating_sub(n[0]);
                b.hook_capped += n[3].saturating_sub(n[1]);
            }
            _ => {}
        }
    }
    Ok(b)
}

/// The boost counters per arm of the comparison (lines `ARM b c b c`: kml_boosts
/// and kml_capped before and after a run), summed over the arm's runs: arm →
/// (requests served early, positive verdicts refused by the cap).
pub fn parse_arm_boosts(text: &str) -> HashMap<String, (u64, u64)> {
    let mut out: HashMap<String, (u64, u64)> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 5 {
            continue;
        }
        let n: Vec<u64> = f[1..].iter().map(|x| x.parse().unwrap_or(0)).collect();
        let e = out.entry(f[0].to_owned()).or_default();
        e.0 += n[2].saturating_sub(n[0]);
        e.1 += n[3].saturating_sub(n[1]);
    }
    out
}

/// Requests of one class (direction) in a witness trace, and how many were
/// dispatched after their own deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCount {
    pub requests: u64,
    pub missed: u64,
}

impl ClassCount {
    pub fn share(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.missed as f64 / self.requests as f64
        }
    }

    pub fn add(&mut self, o: ClassCount) {
        self.requests += o.requests;
        self.missed += o.missed;
    }
}

/// Own-deadline misses per class in one run's witness trace (`kml-agent record`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassMisses {
    pub read: ClassCount,
    pub write: ClassCount,
}

impl ClassMisses {
    pub fn add(&mut self, o: &ClassMisses) {
        self.read.add(o.read);
        self.write.add(o.write);
    }
}

/// Counts a witness trace: every request with a deadline that was dispatched, by
/// direction, missed when dispatched after its own deadline
/// ([`kml_ebpf_common::label::missed_own_deadline`]: boosts do not move it).
pub fn witness_misses(csv: &str, hz: u64) -> Result<ClassMisses> {
    let records = kml_ebpf_common::trace::read_all(csv.as_bytes())
        .map_err(|e| anyhow::anyhow!("witness trace: {e}"))?;
    let mut m = ClassMisses::default();
    for r in records
        .iter()
        .filter(|r| r.deadline_ns > r.insert_ns && (r.issue_ns != 0 || r.complete_ns != 0))
    {
        let c = match r.op().direction() {
            kml_ebpf_common::Direction::Read => &mut m.read,
            kml_ebpf_common::Direction::Write => &mut m.write,
        };
        c.requests += 1;
        c.missed += kml_ebpf_common::label::missed_own_deadline(r, hz) as u64;
    }
    Ok(m)
}

/// The guest kernel's HZ, from `kml-agent doctor`'s deadline-label line (`(HZ 250,`).
pub fn doctor_hz(doctor: &str) -> Option<u64> {
    let at = doctor.find("(HZ ")? + "(HZ ".len();
    let digits: String = doctor[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok().filter(|&hz| hz > 0)
}

/// The smallest and largest of `values` (`None` when empty).
pub fn spread(values: &[f64]) -> Option<(f64, f64)> {
    let lo = values.iter().copied().reduce(f64::min)?;
    let hi = values.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// The verdict program's counters, from the agent's `end` event (`kml-agent hook
/// --json` and `kml-agent run --json` with the hook attached).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookCounts {
    pub calls: u64,
    pub reads: u64,
    /// Positive verdicts handed to the kernel.
    pub verdicts: u64,
    pub model_at_risk: u64,
    pub no_verdict: u64,
    /// Requests a model policy would have served early, left alone to learn from.
    pub held_out: u64,
}

/// The boost cap of a run (`smoke.fmodret.cap`: `boost_max N read_expire_ms N
/// uptime T0 T1`, the guest's uptime in seconds around the run).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cap {
    pub boost_max: u64,
    pub window_ms: u64,
    pub elapsed_s: f64,
}

impl Cap {
    /// The most boosts one direction can get: `boost_max` in each window, a window
    /// opening at the first verdict after the last one closed.
    pub fn allowed(&self) -> u64 {
        let windows = (self.elapsed_s * 1000.0 / self.window_ms.max(1) as f64).floor() as u64 + 1;
        self.boost_max * windows
    }
}

pub fn parse_cap(text: &str) -> Result<Cap> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let num = |key: &str, k: usize| -> Result<f64> {
        let i = f
            .iter()
            .position(|w| *w == key)
            .with_context(|| format!("no `{key}` in {text:?}"))?;
        f.get(i + k)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("`{key}` without a number in {text:?}"))
    };
    Ok(Cap {
        boost_max: num("boost_max", 1)? as u64,
        window_ms: num("read_expire_ms", 1)? as u64,
        elapsed_s: num("uptime", 2)? - num("uptime", 1)?,
    })
}

/// The agent's event `name` (the last one) from its JSON events, one a line.
pub fn agent_event(events: &str, name: &str) -> Option<Value> {
    events
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v["event"] == name)
}

/// The verdict program's counters at the agent's end, if it reported them.
pub fn hook_counts(events: &str) -> Option<HookCounts> {
    let end = agent_event(events, "end")?;
    let c = end["hook"]["counters"].as_object()?;
    let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(HookCounts {
        calls: n("calls"),
        reads: n("reads"),
        verdicts: n("boosts"),
        model_at_risk: n("model_at_risk"),
        no_verdict: n("no_verdict"),
        held_out: n("held_out"),
    })
}

/// What the agent reported, for people: the model it started with, the verdict
/// program's counters and what the kernel did per disk.
pub fn agent_summary(events: &str) -> String {
    let mut lines = Vec::new();
    if let Some(m) = agent_event(events, "ready").and_then(|r| r["model"].as_object().cloned()) {
        lines.push(format!(
            "model v{} {} active",
            m["version"],
            m["kind"].as_str().unwrap_or("?")
        ));
    }
    if let Some(end) = agent_event(events, "end") {
        let hook = &end["hook"];
        if let Some(h) = hook_counts(events) {
            lines.push(format!(
                "hook (policy {}): {} calls, {} reads, {} positive verdicts, {} model at-risk verdicts, {} without a model verdict{}",
                hook["policy"].as_str().unwrap_or("?"),
                h.calls,
                h.reads,
                h.verdicts,
                h.model_at_risk,
                h.no_verdict,
                if h.held_out > 0 {
                    format!(", {} held out to learn from", h.held_out)
                } else {
                    String::new()
                }
            ));
        }
        if let Some(l) = end["learning"].as_object() {
            let n = |k: &str| l.get(k).and_then(Value::as_u64).unwrap_or(0);
            lines.push(format!(
                "online learning: {} swaps, {} rollbacks, {} drifts, {} failed trainings",
                n("swaps"),
                n("rollbacks"),
                n("drifts"),
                n("retrain_failures")
            ));
        }
        for b in hook["boosts"].as_array().into_iter().flatten() {
            lines.push(format!(
                "{}: kernel served {} requests early, refused {} over the cap (kml_boost_max {})",
                b["disk"].as_str().unwrap_or("?"),
                b["served_early"],
                b["refused"],
                b["boost_max"]
            ));
        }
    }
    lines.join("\n")
}

/// One workload's stock and hook runs.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub stock: RunStats,
    pub hook: RunStats,
    pub boosts: Boosts,
    /// The agent's summary lines.
    pub agent: String,
    /// Per repeat (stock, hook), when there was more than one pair.
    pub pairs: Vec<(RunStats, RunStats)>,
}

impl Comparison {
    pub fn read_mean_pct(&self) -> f64 {
        pct(self.hook.read.mean_ns, self.stock.read.mean_ns)
    }
    pub fn read_p99_pct(&self) -> f64 {
        pct(self.hook.read.p99_ns, self.stock.read.p99_ns)
    }
    pub fn write_p99_pct(&self) -> f64 {
        pct(self.hook.write.p99_ns, self.stock.write.p99_ns)
    }
    pub fn throughput_pct(&self) -> f64 {
        pct(self.hook.throughput_bytes(), self.stock.throughput_bytes())
    }
    /// The issue's goal for a mixed workload: mean read latency -15% or better,
    /// p99 -25% or better, throughput no more than 2% lower.
    pub fn meets_goal(&self) -> bool {
        self.read_mean_pct() <= -15.0
            && self.read_p99_pct() <= -25.0
            && self.throughput_pct() >= -2.0
    }
    /// Reads made worse by more than 2% at p99.
    pub fn read_worse_at_p99(&self) -> bool {
        self.stock.read.ios > 0 && self.read_p99_pct() > 2.0
    }
    /// Writes made worse by more than 2% at p99.
    pub fn write_worse_at_p99(&self) -> bool {
        self.stock.write.ios > 0 && self.write_p99_pct() > 2.0
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| metric | stock | hook | change |\n| --- | ---: | ---: | ---: |"
        );
        let mut row = |name: &str, s: f64, h: f64, fmt: &dyn Fn(f64) -> String| {
            let _ = writeln!(
                t,
                "| {name} | {} | {} | {:+.1}% |",
                fmt(s),
                fmt(h),
                pct(h, s)
            );
        };
        let msf = |x: f64| ms(x);
        let rate = |x: f64| format!("{x:.1}");
        let mib = |x: f64| format!("{:.3}", x / (1 << 20) as f64);
        for (label, s, h) in [
            ("read", &self.stock.read, &self.hook.read),
            ("write", &self.stock.write, &self.hook.write),
        ] {
            if s.ios == 0 && h.ios == 0 {
                continue;
            }
            row(
                &format!("{label} latency mean (ms)"),
                s.mean_ns,
                h.mean_ns,
                &msf,
            );
            row(
                &format!("{label} latency p50 (ms)"),
                s.p50_ns,
                h.p50_ns,
                &msf,
            );
            row(
                &format!("{label} latency p99 (ms)"),
                s.p99_ns,
                h.p99_ns,
                &msf,
            );
            row(
                &format!("{label} latency p99.9 (ms)"),
                s.p999_ns,
                h.p999_ns,
                &msf,
            );
            row(&format!("{label} IOPS"), s.iops, h.iops, &rate);
        }
        row(
            "throughput (MiB/s)",
            self.stock.throughput_bytes(),
            self.hook.throughput_bytes(),
            &mib,
        );
        row(
            "IOPS (read + write)",
            self.stock.read.iops + self.stock.write.iops,
            self.hook.read.iops + self.hook.write.iops,
            &rate,
        );
        let _ = writeln!(
            t,
            "\nVerdicts: the kernel served {} requests early in the hook run and refused {} over the cap \
             (stock run: {} boosts, must be 0).",
            self.boosts.hook_boosts, self.boosts.hook_capped, self.boosts.stock_boosts
        );
        if self.pairs.len() > 1 {
            let _ = writeln!(t, "\nPer pair (stock/hook order alternating): read mean, read p99, throughput change:\n");
            for (i, (st, hk)) in self.pairs.iter().enumerate() {
                let _ = writeln!(
                    t,
                    "- pair {}: {:+.1}%, {:+.1}%, {:+.1}%",
                    i + 1,
                    pct(hk.read.mean_ns, st.read.mean_ns),
                    pct(hk.read.p99_ns, st.read.p99_ns),
                    pct(hk.throughput_bytes(), st.throughput_bytes())
                );
            }
        }
        if !self.agent.is_empty() {
            let _ = writeln!(t, "\n```\n{}\n```", self.agent.trim());
        }
        t
    }
}

/// The summary over the mixed workloads: average of the per-workload changes.
pub fn summary(cmps: &[Comparison]) -> Option<(f64, f64, f64, usize)> {
    let mixed: Vec<&Comparison> = cmps.iter().filter(|c| c.stock.mixed()).collect();
    if mixed.is_empty() {
        return None;
    }
    let n = mixed.len() as f64;
    Some((
        mixed.iter().map(|c| c.read_mean_pct()).sum::<f64>() / n,
        mixed.iter().map(|c| c.read_p99_pct()).sum::<f64>() / n,
        mixed.iter().map(|c| c.throughput_pct()).sum::<f64>() / n,
        mixed.len(),
    ))
}

pub fn summary_line(mean: f64, p99: f64, tput: f64) -> String {
    format!("read latency: mean {mean:+.1}%, p99 {p99:+.1}%; throughput {tput:+.1}%")
}

// ---------------------------------------------------------------- the smoke test's traces

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Insert,
    Issue,
}

/// (event, is_read, sector) from a tracefs `trace` line of block_rq_insert/issue.
fn parse_trace_line(line: &str) -> Option<(Ev, bool, u64)> {
    let (ev, rest) = if let Some(i) = line.find(" block_rq_insert: ") {
        (Ev::Insert, &line[i + " block_rq_insert: ".len()..])
    } else if let Some(i) = line.find(" block_rq_issue: ") {
        (Ev::Issue, &line[i + " block_rq_issue: ".len()..])
    } else {
        return None;
    };
    let toks: Vec<&str> = rest.split_whitespace().collect();
    let rwbs = *toks.get(1)?;
    let is_read = rwbs.contains('R');
    let is_write = rwbs.contains('W');
    if !is_read && !is_write {
        return None;
    }
    let plus = toks.iter().position(|t| *t == "+")?;
    let sector = toks.get(plus.checked_sub(1)?)?.parse().ok()?;
    Some((ev, is_read, sector))
}

/// Dispatch order as the trace shows it, from the reads' point of view.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OrderStats {
    pub reads: usize,
    /// Mean number of writes dispatched while a read waited (insert → issue).
    pub writes_dispatched_while_waiting: f64,
    /// Mean number of writes queued before a read and dispatched after it.
    pub writes_overtaken: f64,
    /// Share of reads dispatched with at most one write dispatched while they waited.
    pub reads_served_next: f64,
}

pub fn dispatch_order(trace: &str) -> OrderStats {
    let mut seq = 0usize;
    let mut queued_reads: HashMap<u64, (usize, usize)> = HashMap::new(); // sector -> (insert seq, write issues at insert)
    let mut pending_writes: HashMap<u64, usize> = HashMap::new(); // sector -> insert seq
    let mut write_issues = 0usize;
    let (mut n, mut waited, mut overtaken, mut next) = (0usize, 0usize, 0usize, 0usize);
    for (ev, is_read, sector) in trace.lines().filter_map(parse_trace_line) {
        seq += 1;
        match (ev, is_read) {
            (Ev::Insert, true) => {
                queued_reads.insert(sector, (seq, write_issues));
            }
            (Ev::Insert, false) => {
                pending_writes.insert(sector, seq);
            }
            (Ev::Issue, false) => {
                pending_writes.remove(&sector);
                write_issues += 1;
            }
            (Ev::Issue, true) => {
                let Some((at, issues_then)) = queued_reads.remove(&sector) else {
                    continue;
                };
                n += 1;
                let w = write_issues - issues_then;
                waited += w;
                if w <= 1 {
                    next += 1;
                }
                overtaken += pending_writes.values().filter(|&&s| s < at).count();
            }
        }
    }
    if n == 0 {
        return OrderStats::default();
    }
    OrderStats {
        reads: n,
        writes_dispatched_while_waiting: waited as f64 / n as f64,
        writes_overtaken: overtaken as f64 / n as f64,
        reads_served_next: next as f64 / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boost_cap_bound() {
        let c = parse_cap("boost_max 1 read_expire_ms 500 uptime 10.25 14.30\n").unwrap();
        assert_eq!((c.boost_max, c.window_ms), (1, 500));
        assert!((c.elapsed_s - 4.05).abs() < 1e-9);
        // 4.05 s: windows opening at 0, 0.5, ..., 4.0 s.
        assert_eq!(c.allowed(), 9);
        assert!(parse_cap("boost_max 1").is_err());
    }

    const FIO: &str = r#"note: a warning line
{
  "fio version" : "fio-3.33",
  "jobs" : [
    { "jobname" : "writer", "error" : 0,
      "read" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "total_ios" : 0, "lat_ns" : { "mean" : 0.0 } },
      "write" : { "io_bytes" : 4096000, "bw_bytes" : 409600, "iops" : 100.0, "total_ios" : 1000,
                  "lat_ns" : { "mean" : 3.0e8, "percentile" : { "50.000000" : 2.0e8, "99.000000" : 9.0e8, "99.900000" : 1.0e9 } } } },
    { "jobname" : "reader", "error" : 0,
      "read" : { "io_bytes" : 409600, "bw_bytes" : 40960, "iops" : 10.0, "total_ios" : 100,
                 "lat_ns" : { "mean" : 8.0e7, "percentile" : { "50.000000" : 7.0e7, "99.000000" : 1.6e8, "99.900000" : 1.7e8 } } },
      "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "total_ios" : 0, "lat_ns" : { "mean" : 0.0 } } }
  ]
}"#;

    #[test]
    fn fio_json() {
        let s = parse_fio(FIO).unwrap();
        assert_eq!(s.read.ios, 100);
        assert_eq!(s.read.mean_ns, 8.0e7);
        assert_eq!(s.read.p99_ns, 1.6e8);
        assert_eq!(s.write.p50_ns, 2.0e8);
        assert_eq!(s.throughput_bytes(), 450560.0);
        assert!(s.mixed());
    }

    #[test]
    fn changes_and_summary() {
        assert_eq!(pct(80.0, 100.0), -20.0);
        assert_eq!(
            summary_line(-20.0, -31.25, 0.5),
            "read latency: mean -20.0%, p99 -31.2%; throughput +0.5%"
        );
        let stock = parse_fio(FIO).unwrap();
        let mut hook = stock;
        hook.read.mean_ns *= 0.5;
        hook.read.p99_ns *= 0.5;
        let c = Comparison {
            name: "x".into(),
            stock,
            hook,
            boosts: Boosts::default(),
            agent: String::new(),
            pairs: Vec::new(),
        };
        assert!(c.meets_goal());
        assert!(!c.read_worse_at_p99() && !c.write_worse_at_p99());
        let (m, p, t, n) = summary(std::slice::from_ref(&c)).unwrap();
        assert_eq!((m, p, t, n), (-50.0, -50.0, 0.0, 1));
        assert!(c
            .table()
            .contains("| read latency mean (ms) | 80.0 | 40.0 | -50.0% |"));
    }

    #[test]
    fn combining_runs() {
        let a = parse_fio(FIO).unwrap();
        let mut b = a;
        b.read.mean_ns = 4.0e7;
        b.read.ios = 300;
        b.read.iops = 30.0;
        let c = combine(&[a, b]);
        assert_eq!(c.read.ios, 400);
        assert_eq!(c.read.iops, 20.0);
        assert_eq!(c.read.mean_ns, 0.25 * 8.0e7 + 0.75 * 4.0e7);
        assert_eq!(
            (c.write.ios, c.write.mean_ns, c.write.iops),
            (2000, a.write.mean_ns, a.write.iops)
        );
    }

    #[test]
    fn agent_events() {
        let run = r#"{"attach":"raw-tracepoint","devices":["vda"],"event":"ready","hook_policy":"model-reads","model":{"kind":"logistic","version":1}}
{"event":"tick","drops":0}
{"event":"end","hook":{"boosts":[{"boost_max":16,"disk":"vda","refused":8,"served_early":30}],"counters":{"boosts":38,"calls":120,"held_out":3,"model_at_risk":90,"no_verdict":2,"read_failures":0,"reads":40,"skipped_device":0},"policy":"model-reads"},"records":5}
"#;
        assert_eq!(
            hook_counts(run),
            Some(HookCounts {
                calls: 120,
                reads: 40,
                verdicts: 38,
                model_at_risk: 90,
                no_verdict: 2,
                held_out: 3
            })
        );
        let summary = agent_summary(run);
        assert!(summary.contains("model v1 logistic active"), "{summary}");
        assert!(summary.contains("120 calls"), "{summary}");
        assert!(
            summary.contains("vda: kernel served 30 requests early, refused 8"),
            "{summary}"
        );
        let fmod_ret = r#"{"event":"end","hook":{"boosts":[],"counters":null,"policy":"reads"},"seconds":9.1}"#;
        assert_eq!(
            hook_counts(fmod_ret),
            None,
            "fmod_ret has no program counters"
        );
        assert_eq!(hook_counts("kml-agent: hook attached\n"), None);
    }

    #[test]
    fn arm_boosts_and_doctor_hz() {
        let b = parse_arm_boosts(
            "stock 0 0 0 0\nreads-under-writes 0 0 57 3\nmodel-reads 57 3 60 3\nstock 60 3 60 3\nmodel-reads 60 3 70 5\n",
        );
        assert_eq!(b["stock"], (0, 0));
        assert_eq!(b["reads-under-writes"], (57, 3));
        assert_eq!(b["model-reads"], (13, 2));
        let doctor = "  [yes] deadline label   raw tracepoints: rq->fifo_time@216 read at issue; classic tracepoints: insert jiffies + expiry in jiffies (HZ 250, the coarse clock's tick): ...";
        assert_eq!(doctor_hz(doctor), Some(250));
        assert_eq!(doctor_hz("no such line"), None);
        assert_eq!(spread(&[3.0, -1.0, 2.0]), Some((-1.0, 3.0)));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn witness_counts_own_deadlines_per_class() {
        use kml_ebpf_common::{trace, ReqOp, RequestRecord};
        // read_expire 100 ms, write_expire 5 s, HZ 250; inserted at jiffy 1000.
        let rec = |op: ReqOp, expire_ms: u64, issue_j: u64, fifo: u64| RequestRecord {
            sector: 8,
            insert_ns: 1_000_000_000,
            issue_ns: 1_000_000_000 + (issue_j - 1000) * 4_000_000,
            complete_ns: 1_000_000_000 + (issue_j - 999) * 4_000_000,
            deadline_ns: 1_000_000_000 + expire_ms * 1_000_000,
            nr_sectors: 8,
            op: op as u8,
            insert_jiffies: 1000,
            issue_jiffies: issue_j,
            fifo_time: fifo,
            ..Default::default()
        };
        let rows = [
            rec(ReqOp::Read, 100, 1010, 1000), // boosted, met its own deadline
            rec(ReqOp::Read, 100, 1030, 1000), // boosted, missed its own
            rec(ReqOp::Read, 100, 1020, 1025), // met
            rec(ReqOp::Write, 5000, 2300, 2250), // missed (1250 jiffies)
            rec(ReqOp::Write, 5000, 1100, 2250), // met
        ];
        let mut csv = Vec::new();
        csv.extend_from_slice(trace::header().as_bytes());
        csv.push(b'\n');
        for r in &rows {
            trace::write_row(&mut csv, r).unwrap();
        }
        let m = witness_misses(std::str::from_utf8(&csv).unwrap(), 250).unwrap();
        assert_eq!(
            m.read,
            ClassCount {
                requests: 3,
                missed: 1
            }
        );
        assert_eq!(
            m.write,
            ClassCount {
                requests: 2,
                missed: 1
            }
        );
        assert!((m.read.share() - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn boosts_file() {
        let b = parse_boosts("stock 0 0 0 0\nhook 0 0 57 3\nstock 57 3 57 3\nhook 57 3 60 3\n")
            .unwrap();
        assert_eq!(
            b,
            Boosts {
                stock_boosts: 0,
                hook_boosts: 60,
                hook_capped: 3
            }
        );
    }

    #[test]
    fn trace_order() {
        let line = |ev: &str, rwbs: &str, sector: u64| {
            format!("             fio-77      [001] d..1.    12.345678: {ev}: 254,0 {rwbs} 4096 () {sector} + 8 none,0,0 [fio]")
        };
        assert_eq!(
            parse_trace_line(&line("block_rq_insert", "WS", 80)),
            Some((Ev::Insert, false, 80))
        );
        assert_eq!(
            parse_trace_line(&line("block_rq_issue", "R", 8)),
            Some((Ev::Issue, true, 8))
        );
        assert_eq!(parse_trace_line("# tracer: nop"), None);
        // Writes 1..4 queued, a read arrives, two writes go, then the read.
        let mut t = Vec::new();
        for s in 1..=4 {
            t.push(line("block_rq_insert", "WS", s * 8));
        }
        t.push(line("block_rq_insert", "R", 1000));
        t.push(line("block_rq_issue", "WS", 8));
        t.push(line("block_rq_issue", "WS", 16));
        t.push(line("block_rq_issue", "R", 1000));
        let o = dispatch_order(&t.join("\n"));
        assert_eq!(o.reads, 1);
        assert_eq!(o.writes_dispatched_while_waiting, 2.0);
        assert_eq!(o.writes_overtaken, 2.0);
        assert_eq!(o.reads_served_next, 0.0);
    }
}
