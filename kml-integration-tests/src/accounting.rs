//! Exact accounting: every request the kernel completed is a record, or its loss
//! is explained by a kernel counter, by name.
//!
//! Two independent witnesses of what happened on a test's device:
//!
//! - the block layer's own I/O statistics (`/sys/block/DEV/stat`), which count every
//!   completed request and every merge, whether or not any BPF program ran;
//! - the I/O the test issued itself (a known pattern, or fio's `total_ios`).
//!
//! A record that is missing must be paid for by one of the named loss counters
//! ([`LOSS_TERMS`], [`Losses`]): kml's own counters, the kernel's count of program
//! runs it skipped (recursion misses), and whatever the observer adds later (a
//! new counter is one more term here, nothing else changes).

use std::{collections::BTreeMap, fmt, process::Command};

use anyhow::{bail, ensure, Context as _, Result};
use kml_ebpf_common::{Counter, Counters};

/// The completed-request and merge counts of one disk (`/sys/block/DEV/stat`,
/// Documentation/block/stat.rst): reads, read merges, writes, write merges, flushes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub reads: u64,
    pub read_merges: u64,
    pub writes: u64,
    pub write_merges: u64,
    pub flushes: u64,
}

impl DiskStats {
    pub fn read(dev_name: &str) -> Result<DiskStats> {
        let path = format!("/sys/block/{dev_name}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        DiskStats::parse(&text).with_context(|| format!("{path}: {text:?}"))
    }

    pub fn parse(text: &str) -> Result<DiskStats> {
        let f: Vec<u64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("not a list of numbers")?;
        ensure!(f.len() >= 11, "{} fields, expected at least 11", f.len());
        Ok(DiskStats {
            reads: f[0],
            read_merges: f[1],
            writes: f[4],
            write_merges: f[5],
            flushes: f.get(15).copied().unwrap_or(0),
        })
    }

    /// What happened between `self` (before) and `after`.
    pub fn delta(&self, after: &DiskStats) -> DiskStats {
        DiskStats {
            reads: after.reads - self.reads,
            read_merges: after.read_merges - self.read_merges,
            writes: after.writes - self.writes,
            write_merges: after.write_merges - self.write_merges,
            flushes: after.flushes - self.flushes,
        }
    }

    /// Read and write requests completed (each is one kml record).
    pub fn requests(&self) -> u64 {
        self.reads + self.writes
    }

    /// Bios and requests merged into another request (each is an I/O of fio's
    /// that is in another request's record).
    pub fn merges(&self) -> u64 {
        self.read_merges + self.write_merges
    }
}

/// The counters whose every count is one record that never reached the host.
/// Counters that are consequences of a loss (an orphan completion after a missed
/// insert) are not terms: they would count it twice.
pub const LOSS_TERMS: &[Counter] = &[
    Counter::RingFullDrops,
    Counter::SampledOut,
    Counter::InflightInsertFailures,
    Counter::ReadFailures,
    Counter::StaleEntries,
];

/// Named loss counts, each able to explain one missing record per count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Losses(pub BTreeMap<String, u64>);

impl Losses {
    /// The loss terms of the observer's counters, plus the kernel's count of program
    /// runs it skipped (`recursion_misses`, summed over kml's programs), the
    /// in-flight entries evicted (added - removed - live) and the entries still live.
    /// Read after the load has ended (the device idle): a live entry is then a
    /// request whose completion never reached the program, the same loss a stale
    /// entry is once the sweep finds it (measured: classic tracepoints, 2,000
    /// synchronous requests, 2 completions never seen, no skipped run counted: one
    /// entry swept as stale, the other still live).
    pub fn from_counters(c: &Counters, recursion_misses: u64, live_entries: u64) -> Losses {
        let mut terms: BTreeMap<String, u64> = LOSS_TERMS
            .iter()
            .map(|&t| (t.name().to_owned(), c.get(t)))
            .collect();
        terms.insert("recursion_misses".into(), recursion_misses);
        let evicted = c
            .get(Counter::InflightAdded)
            .saturating_sub(c.get(Counter::InflightRemoved))
            .saturating_sub(live_entries);
        terms.insert("lru_evictions".into(), evicted);
        terms.insert("left_in_flight".into(), live_entries);
        // An insert that finds a queued entry under its key is a requeued request
        // coming back (not a loss), or, in classic tracepoint mode (keyed by
        // sector), a second request at the sector of a queued one: one record for two.
        terms.insert(
            "reinserts_without_requeue".into(),
            c.get(Counter::Reinserts)
                .saturating_sub(c.get(Counter::Requeues)),
        );
        Losses(terms)
    }

    /// The loss terms of an agent's summary line (`drops N | ... | stale entries N`):
    /// each named one must be there, so that a renamed counter fails loudly.
    pub fn from_summary(line: &str, names: &[&str]) -> Result<Losses> {
        let mut terms = BTreeMap::new();
        for name in names {
            let n = line
                .split(" | ")
                .find_map(|part| {
                    // The first part carries the line's prefix (`kml-agent: drops 0`).
                    let part = part.rsplit(": ").next().unwrap_or(part);
                    let rest = part.trim().strip_prefix(name)?;
                    rest.trim().parse::<u64>().ok()
                })
                .with_context(|| format!("no `{name} N` in the agent's summary: {line}"))?;
            terms.insert((*name).to_owned(), n);
        }
        Ok(Losses(terms))
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl fmt::Display for Losses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nonzero: Vec<String> = self
            .0
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if nonzero.is_empty() {
            write!(f, "no loss counted (all of {} are 0)", self.0.len())
        } else {
            write!(f, "{}", nonzero.join(", "))
        }
    }
}

/// The runs the kernel skipped, summed over the observer's programs
/// (`recursion_misses`: a program that would nest in itself, or, for classic
/// tracepoints, in any tracing program on the CPU). Read while the programs are
/// loaded: detaching unloads them and their statistics with them, so a count read
/// after it would be a silent 0.
pub fn recursion_misses(observer: &kml_agent::observe::Observer) -> Result<u64> {
    let stats = observer.program_stats()?;
    ensure!(
        stats.len() == kml_ebpf_common::abi::names::EVENTS.len(),
        "statistics of {} programs, expected one per block event: {stats:?}",
        stats.len()
    );
    Ok(stats.iter().map(|p| p.recursion_misses).sum())
}

/// Name and `recursion_misses` (the runs the kernel skipped) of each loaded BPF
/// program among `ids`, from `bpftool prog show`.
pub fn program_misses(ids: &std::collections::BTreeSet<u32>) -> Result<Vec<(String, u64)>> {
    Ok(bpftool_json(&["prog", "show"])?
        .into_iter()
        .filter(|p| {
            p["id"]
                .as_u64()
                .is_some_and(|id| ids.contains(&(id as u32)))
        })
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_owned(),
                p["recursion_misses"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// [`program_misses`] of the programs process `pid` holds (another tool's, such
/// as bpftrace's).
pub fn program_misses_of(pid: u32) -> Result<Vec<(String, u64)>> {
    program_misses(&crate::prog_ids_of(pid))
}

/// `expected` requests, `seen` records: every missing record must be counted by a
/// loss term, and no record may appear that was not expected.
pub fn explain(what: &str, expected: u64, seen: u64, losses: &Losses) -> Result<u64> {
    ensure!(
        seen <= expected,
        "{what}: {seen} records, but only {expected} requests happened"
    );
    let missing = expected - seen;
    ensure!(
        missing <= losses.total(),
        "{what}: {missing} of {expected} requests have no record, and the kernel counted {} \
         losses ({losses}): {} unexplained",
        losses.total(),
        missing - losses.total()
    );
    if missing > 0 {
        eprintln!("NOTE: {what}: {missing} records missing, explained by {losses}");
    }
    Ok(missing)
}

/// A BPF program attached to a block tracepoint by someone other than this test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignTracer {
    pub prog_id: u32,
    pub tracepoint: String,
    pub holder: String,
}

/// Programs of others on the `block:*` tracepoints (raw or classic), from the
/// kernel's own answers: `bpftool perf show` (each process's tracepoint fds) and
/// `bpftool link show` (links, pinned ones too, held by nobody). Another
/// program there can make the kernel skip kml's (a program that would nest in
/// itself is not run), so exactness tests do not run beside one.
pub fn foreign_block_tracers() -> Result<Vec<ForeignTracer>> {
    let ours = crate::this_test_and_children();
    let mut ours_ids = std::collections::BTreeSet::new();
    for pid in &ours {
        ours_ids.extend(crate::prog_ids_of(*pid));
    }
    let mut found = BTreeMap::new();
    for entry in bpftool_json(&["perf", "show"])? {
        let (Some(tp), Some(id), Some(pid)) = (
            entry["tracepoint"].as_str(),
            entry["prog_id"].as_u64(),
            entry["pid"].as_u64(),
        ) else {
            continue;
        };
        let id = id as u32;
        if is_block(tp) && !ours.contains(&(pid as u32)) && !ours_ids.contains(&id) {
            found.entry(id).or_insert_with(|| ForeignTracer {
                prog_id: id,
                tracepoint: tp.to_owned(),
                holder: format!("pid {pid} ({})", comm(pid as u32)),
            });
        }
    }
    for link in bpftool_json(&["link", "show"])? {
        let (Some(tp), Some(id)) = (link["tp_name"].as_str(), link["prog_id"].as_u64()) else {
            continue;
        };
        let id = id as u32;
        if is_block(tp) && !ours_ids.contains(&id) {
            found.entry(id).or_insert_with(|| ForeignTracer {
                prog_id: id,
                tracepoint: tp.to_owned(),
                holder: format!("link {}", link["id"]),
            });
        }
    }
    Ok(found.into_values().collect())
}

fn is_block(tracepoint: &str) -> bool {
    tracepoint.starts_with("block_") || tracepoint.starts_with("block:")
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "gone".into())
}

fn bpftool_json(args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .with_context(|| format!("running bpftool {args:?}"))?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {args:?} JSON"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The precondition of an exactness test: no other BPF program on the block
/// tracepoints. Returns `false` (after a loud skip, or a failure in CI) when
/// there is one.
pub fn alone_on_the_block_tracepoints() -> Result<bool> {
    let others = foreign_block_tracers()?;
    if others.is_empty() {
        return Ok(true);
    }
    let list: Vec<String> = others
        .iter()
        .map(|o| format!("prog {} on {} ({})", o.prog_id, o.tracepoint, o.holder))
        .collect();
    kml_testkit::skip::<()>(format_args!(
        "other BPF programs are attached to the block tracepoints, so exact accounting \
         cannot be asked of kml: {}",
        list.join("; ")
    ));
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_stats_fields() {
        let s = DiskStats::parse(
            "  1000   3  8000  10  2000  7  16000  20  0  30  40  0  0  0  0  5  1\n",
        )
        .unwrap();
        assert_eq!(
            s,
            DiskStats {
                reads: 1000,
                read_merges: 3,
                writes: 2000,
                write_merges: 7,
                flushes: 5
            }
        );
        assert_eq!((s.requests(), s.merges()), (3000, 10));
        assert!(DiskStats::parse("1 2 3").is_err());
    }

    #[test]
    fn losses_must_pay_for_every_missing_record() {
        let mut c = Counters::default();
        *c.slot(Counter::RingFullDrops) = 2;
        let l = Losses::from_counters(&c, 1, 0);
        assert_eq!(l.total(), 3);
        // An entry still in flight after the load is one more loss, not an eviction.
        *c.slot(Counter::InflightAdded) = 5;
        *c.slot(Counter::InflightRemoved) = 4;
        assert_eq!(Losses::from_counters(&c, 1, 1).total(), 4);
        assert_eq!(Losses::from_counters(&c, 1, 0).total(), 4);
        assert!(explain("t", 10, 7, &l).is_ok());
        assert!(explain("t", 10, 6, &l).is_err());
        assert!(explain("t", 10, 11, &l).is_err());
        let l = Losses::from_summary(
            "kml-agent: drops 0 | missed events 2 | stale entries 1 | merged 4",
            &["drops", "missed events", "stale entries"],
        )
        .unwrap();
        assert_eq!(l.total(), 3);
        assert!(Losses::from_summary("drops 0", &["drops", "sampled out"]).is_err());
    }
}
