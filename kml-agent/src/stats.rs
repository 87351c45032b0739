//! Latency summaries of records.

use std::time::Duration;

use kml_ebpf_common::RequestRecord;

/// Nearest-rank percentile of an ascending slice (`q` in 0..=100).
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Percentiles of one latency.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub mean_ns: f64,
}

impl LatencySummary {
    pub fn of(mut values: Vec<u64>) -> LatencySummary {
        if values.is_empty() {
            return LatencySummary::default();
        }
        values.sort_unstable();
        let sum: u128 = values.iter().map(|&v| v as u128).sum();
        LatencySummary {
            count: values.len(),
            p50_ns: percentile(&values, 50.0).unwrap_or(0),
            p99_ns: percentile(&values, 99.0).unwrap_or(0),
            max_ns: *values.last().unwrap_or(&0),
            mean_ns: sum as f64 / values.len() as f64,
        }
    }
}

/// Formats nanoseconds for people: 850ns, 12.3µs, 4.56ms, 1.20s.
pub fn human_ns(ns: u64) -> String {
    let d = Duration::from_nanos(ns);
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", ns as f64 / 1e6)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// What a set of records says: counts and the two latencies, plus deadline misses.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RecordSummary {
    pub records: usize,
    pub reads: usize,
    pub writes: usize,
    pub errors: usize,
    pub deadline_misses: usize,
    pub insert_to_issue: LatencySummary,
    pub issue_to_complete: LatencySummary,
}

impl RecordSummary {
    pub fn of(records: &[RequestRecord]) -> RecordSummary {
        let issued: Vec<&RequestRecord> = records.iter().filter(|r| r.issue_ns != 0).collect();
        RecordSummary {
            records: records.len(),
            reads: records
                .iter()
                .filter(|r| r.op() == kml_ebpf_common::ReqOp::Read)
                .count(),
            writes: records
                .iter()
                .filter(|r| r.op() == kml_ebpf_common::ReqOp::Write)
                .count(),
            errors: records.iter().filter(|r| r.error != 0).count(),
            deadline_misses: records.iter().filter(|r| r.deadline_missed()).count(),
            insert_to_issue: LatencySummary::of(
                issued.iter().map(|r| r.insert_to_issue_ns()).collect(),
            ),
            // A record whose completion was never seen (complete_ns 0) has no
            // service time.
            issue_to_complete: LatencySummary::of(
                issued
                    .iter()
                    .filter(|r| r.complete_ns != 0)
                    .map(|r| r.issue_to_complete_ns())
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
    }

    #[test]
    fn summary_counts_misses() {
        let mk = |issue: u64, deadline: u64, op: u8| RequestRecord {
            insert_ns: 100,
            issue_ns: issue,
            complete_ns: issue + 50,
            deadline_ns: deadline,
            op,
            ..Default::default()
        };
        let s = RecordSummary::of(&[mk(200, 1000, 0), mk(2000, 1000, 1), mk(300, 1000, 1)]);
        assert_eq!(
            (s.records, s.reads, s.writes, s.deadline_misses),
            (3, 1, 2, 1)
        );
        assert_eq!(s.insert_to_issue.p50_ns, 200);
        assert_eq!(s.issue_to_complete.max_ns, 50);
        assert_eq!(human_ns(999), "999ns");
        assert_eq!(human_ns(4_560_000), "4.56ms");
    }
}
