//! Trace handling for the benchmark, through kml's own trace format and feature
//! code (`kml-ebpf-common`): per-direction wait statistics (to calibrate expiries
//! and draw latency CDFs), joining traces into a training set of a given size, and
//! exporting the feature matrix kml trains on (for the scikit-learn reference).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write as _};
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use kml_ebpf_common::{
    features::{features_at_insert, Feature, TIME_SHIFT},
    op::Direction,
    trace, RequestRecord,
};

pub fn read_trace(path: &Path) -> Result<Vec<RequestRecord>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    trace::read_all(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| anyhow!("reading {}: {e}", path.display()))
}

pub fn write_trace(path: &Path, records: &[RequestRecord]) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    writeln!(w, "{}", trace::header())?;
    for r in records {
        trace::write_row(&mut w, r)?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// What kml-learn learns from: the deadline is known and the request was dispatched
/// (the same rule as `kml_learn::Dataset`).
pub fn usable(r: &RequestRecord) -> bool {
    r.deadline_ns > r.insert_ns && (r.issue_ns != 0 || r.complete_ns != 0)
}

/// Insert → dispatch (issue, else completion) in ns: the regression target, in ns.
pub fn wait_ns(r: &RequestRecord) -> u64 {
    let dispatched = if r.issue_ns != 0 {
        r.issue_ns
    } else {
        r.complete_ns
    };
    dispatched.saturating_sub(r.insert_ns)
}

fn is_write(r: &RequestRecord) -> bool {
    matches!(r.op().direction(), Direction::Write)
}

/// The `q` quantile (0..=1) of sorted values (nearest rank).
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

/// Statistics of one direction's insert → dispatch wait.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirStats {
    pub requests: usize,
    pub misses: usize,
    /// Sorted waits, ns.
    pub waits: Vec<u64>,
}

impl DirStats {
    pub fn miss_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.misses as f64 / self.requests as f64
        }
    }

    pub fn quantile(&self, q: f64) -> Option<u64> {
        quantile(&self.waits, q)
    }
}

/// A trace summarised: usable requests per direction, misses, time span.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceStats {
    pub records: usize,
    pub usable: usize,
    pub read: DirStats,
    pub write: DirStats,
    pub span_s: f64,
}

impl TraceStats {
    pub fn of(records: &[RequestRecord]) -> TraceStats {
        let mut s = TraceStats {
            records: records.len(),
            ..Default::default()
        };
        let (mut first, mut last) = (u64::MAX, 0u64);
        for r in records.iter().filter(|r| usable(r)) {
            s.usable += 1;
            first = first.min(r.insert_ns);
            last = last.max(r.insert_ns);
            let d = if is_write(r) {
                &mut s.write
            } else {
                &mut s.read
            };
            d.requests += 1;
            d.misses += r.deadline_missed() as usize;
            d.waits.push(wait_ns(r));
        }
        s.read.waits.sort_unstable();
        s.write.waits.sort_unstable();
        s.span_s = if last > first {
            (last - first) as f64 / 1e9
        } else {
            0.0
        };
        s
    }

    pub fn misses(&self) -> usize {
        self.read.misses + self.write.misses
    }

    pub fn miss_rate(&self) -> f64 {
        if self.usable == 0 {
            0.0
        } else {
            self.misses() as f64 / self.usable as f64
        }
    }

    /// The wait CDF of both directions as (ns, fraction) points, about `points` of
    /// them, evenly spaced in rank.
    pub fn wait_cdf(&self, points: usize) -> Vec<(f64, f64)> {
        let mut all: Vec<u64> = self
            .read
            .waits
            .iter()
            .chain(&self.write.waits)
            .copied()
            .collect();
        all.sort_unstable();
        cdf_points(&all, points)
    }
}

/// About `points` (x, F(x)) pairs of the empirical CDF of sorted values.
pub fn cdf_points(sorted: &[u64], points: usize) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n == 0 || points == 0 {
        return Vec::new();
    }
    let step = (n / points).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (sorted[i] as f64, (i + 1) as f64 / n as f64))
        .collect();
    if out.last().map(|p| p.1) != Some(1.0) {
        out.push((sorted[n - 1] as f64, 1.0));
    }
    out
}

/// The expiry (ms) at which about `1 - q` of a direction's requests would have
/// missed, from the waits seen at the default expiry: the `q` quantile rounded up
/// to a whole ms, at least 1 ms. `None` with too few requests to say.
pub fn expiry_for_quantile(d: &DirStats, q: f64, min_requests: usize) -> Option<u64> {
    if d.requests < min_requests {
        return None;
    }
    let ns = d.quantile(q)?;
    Some(ns.div_ceil(1_000_000).max(1))
}

/// Writes the matrix kml-learn trains on, as CSV: usable requests in insert-time
/// order; one column per feature (`features_at_insert`, the kernel's integers, named
/// as in model files), then `missed` (0/1: the classification label) and `delay_us`
/// (insert → dispatch in "µs" of 1024 ns: the regression target). Returns the rows.
pub fn export_features(records: &[RequestRecord], path: &Path) -> Result<usize> {
    let mut rows: Vec<&RequestRecord> = records.iter().filter(|r| usable(r)).collect();
    rows.sort_by_key(|r| r.insert_ns);
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let names: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
    writeln!(w, "{},missed,delay_us", names.join(","))?;
    let mut line = String::new();
    for r in &rows {
        line.clear();
        for v in features_at_insert(r) {
            line.push_str(&v.to_string());
            line.push(',');
        }
        let delay = wait_ns(r) as f64 / (1u64 << TIME_SHIFT) as f64;
        line.push_str(if r.deadline_missed() { "1," } else { "0," });
        line.push_str(&format!("{delay}"));
        writeln!(w, "{line}")?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::op::ReqOp;

    fn rec(insert: u64, wait: u64, expire: u64, write: bool) -> RequestRecord {
        RequestRecord {
            sector: insert,
            nr_sectors: 8,
            insert_ns: insert,
            issue_ns: insert + wait,
            complete_ns: insert + wait + 100,
            deadline_ns: insert + expire,
            op: if write { ReqOp::Write } else { ReqOp::Read } as u8,
            ..Default::default()
        }
    }

    #[test]
    fn quantiles_nearest_rank() {
        let v = [10, 20, 30, 40];
        assert_eq!(quantile(&v, 0.0), Some(10));
        assert_eq!(quantile(&v, 0.5), Some(20));
        assert_eq!(quantile(&v, 0.75), Some(30));
        assert_eq!(quantile(&v, 1.0), Some(40));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn stats_per_direction() {
        let mut recs = vec![
            rec(1_000, 5_000_000, 4_000_000, false), // read, missed
            rec(2_000, 1_000_000, 4_000_000, false), // read, met
            rec(3_000, 9_000_000, 8_000_000, true),  // write, missed
        ];
        let mut unissued = rec(4_000, 0, 1, false);
        unissued.issue_ns = 0;
        unissued.complete_ns = 0; // never dispatched: not usable
        recs.push(unissued);
        let s = TraceStats::of(&recs);
        assert_eq!(s.records, 4);
        assert_eq!(s.usable, 3);
        assert_eq!((s.read.requests, s.read.misses), (2, 1));
        assert_eq!((s.write.requests, s.write.misses), (1, 1));
        assert!((s.miss_rate() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.read.waits, vec![1_000_000, 5_000_000]);
        let cdf = s.wait_cdf(10);
        assert_eq!(cdf.first(), Some(&(1_000_000.0, 1.0 / 3.0)));
        assert_eq!(cdf.last(), Some(&(9_000_000.0, 1.0)));
    }

    #[test]
    fn cdf_ends_at_one() {
        let v: Vec<u64> = (1..=1000).collect();
        let c = cdf_points(&v, 7);
        assert!(c.len() >= 7 && c.len() <= 9);
        assert_eq!(c.last(), Some(&(1000.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!(cdf_points(&[], 5).is_empty());
    }

    #[test]
    fn expiry_from_waits() {
        let d = DirStats {
            requests: 4,
            misses: 0,
            waits: vec![100_000, 2_500_000, 7_000_001, 9_000_000],
        };
        assert_eq!(expiry_for_quantile(&d, 0.75, 1), Some(8)); // 7.000001 ms → 8
        assert_eq!(expiry_for_quantile(&d, 0.25, 1), Some(1)); // 0.1 ms → at least 1
        assert_eq!(expiry_for_quantile(&d, 0.75, 5), None);
    }

    #[test]
    fn features_csv_matches_kml() {
        let dir = std::env::temp_dir().join(format!("kml-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.csv");
        let recs = vec![
            rec(2_000, 5 << 20, 4 << 20, false),
            rec(1_000, 1 << 10, 4 << 20, true),
        ];
        assert_eq!(export_features(&recs, &path).unwrap(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let header: Vec<&str> = lines[0].split(',').collect();
        assert_eq!(header.len(), Feature::ALL.len() + 2);
        assert_eq!(header[0], "sector_mib");
        assert_eq!(&header[header.len() - 2..], ["missed", "delay_us"]);
        // Insert-time order: the write (inserted at 1000) first; met, 1 "µs".
        let first: Vec<&str> = lines[1].split(',').collect();
        let want: Vec<String> = features_at_insert(&recs[1])
            .iter()
            .map(i32::to_string)
            .collect();
        assert_eq!(
            &first[..Feature::ALL.len()],
            &want.iter().map(String::as_str).collect::<Vec<_>>()[..]
        );
        assert_eq!(&first[Feature::ALL.len()..], ["0", "1"]);
        let second: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(&second[Feature::ALL.len()..], ["1", "5120"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn trace_round_trip() {
        let dir = std::env::temp_dir().join(format!("kml-bench-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.csv");
        let recs = vec![rec(1_000, 5, 10, false), rec(2_000, 50, 10, true)];
        write_trace(&path, &recs).unwrap();
        assert_eq!(read_trace(&path).unwrap(), recs);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
