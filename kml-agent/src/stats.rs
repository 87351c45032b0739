//! Latency summaries of records.

use std::time::Duration;

use kml_ebpf_common::RequestRecord;

/// Nearest-rank percentile of an ascending slice (`q` in 0..=100).
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[rank_index(sorted.len(), q)])
}

/// Index of the nearest-rank `q` percentile among `n > 0` ascending values.
fn rank_index(n: usize, q: f64) -> usize {
    let rank = ((q / 100.0) * n as f64).ceil() as usize;
    rank.clamp(1, n) - 1
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
        Self::of_mut(&mut values)
    }

    /// [`LatencySummary::of`] on values it may reorder. Selects the two ranks
    /// instead of sorting (linear, not n log n): the run loop summarises a second
    /// of records, 150k and more, every second.
    pub fn of_mut(values: &mut [u64]) -> LatencySummary {
        let n = values.len();
        let Some(&max_ns) = values.iter().max() else {
            return LatencySummary::default();
        };
        let sum: u128 = values.iter().map(|&v| v as u128).sum();
        let (i50, i99) = (rank_index(n, 50.0), rank_index(n, 99.0));
        let p99_ns = *values.select_nth_unstable(i99).1;
        // Everything left of i99 is the i99 smallest: the median is among them.
        let p50_ns = match i50 < i99 {
            true => *values[..i99].select_nth_unstable(i50).1,
            false => p99_ns,
        };
        LatencySummary {
            count: n,
            p50_ns,
            p99_ns,
            max_ns,
            mean_ns: sum as f64 / n as f64,
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
        let mut acc = SummaryAccumulator::default();
        acc.add(records);
        acc.finish()
    }
}

/// A [`RecordSummary`] built batch by batch: the run loop hands each batch of
/// records over as it arrives and keeps 16 bytes a record (the two latencies) for
/// the percentiles, not the records (176 bytes each) of a whole second.
#[derive(Clone, Debug, Default)]
pub struct SummaryAccumulator {
    records: usize,
    reads: usize,
    writes: usize,
    errors: usize,
    deadline_misses: usize,
    insert_to_issue: Vec<u64>,
    issue_to_complete: Vec<u64>,
}

impl SummaryAccumulator {
    pub fn add(&mut self, records: &[RequestRecord]) {
        self.records += records.len();
        for r in records {
            match r.op() {
                kml_ebpf_common::ReqOp::Read => self.reads += 1,
                kml_ebpf_common::ReqOp::Write => self.writes += 1,
                _ => {}
            }
            self.errors += usize::from(r.error != 0);
            self.deadline_misses += usize::from(r.deadline_missed());
            if r.issue_ns != 0 {
                self.insert_to_issue.push(r.insert_to_issue_ns());
                // A record whose completion was never seen (complete_ns 0) has no
                // service time.
                if r.complete_ns != 0 {
                    self.issue_to_complete.push(r.issue_to_complete_ns());
                }
            }
        }
    }

    /// The summary of everything added since the last `finish`; starts afresh
    /// (keeping the buffers' capacity for the next second).
    pub fn finish(&mut self) -> RecordSummary {
        let summary = RecordSummary {
            records: self.records,
            reads: self.reads,
            writes: self.writes,
            errors: self.errors,
            deadline_misses: self.deadline_misses,
            insert_to_issue: LatencySummary::of_mut(&mut self.insert_to_issue),
            issue_to_complete: LatencySummary::of_mut(&mut self.issue_to_complete),
        };
        let (a, b) = (
            std::mem::take(&mut self.insert_to_issue),
            std::mem::take(&mut self.issue_to_complete),
        );
        *self = SummaryAccumulator {
            insert_to_issue: a,
            issue_to_complete: b,
            ..SummaryAccumulator::default()
        };
        self.insert_to_issue.clear();
        self.issue_to_complete.clear();
        summary
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

    /// The selected ranks are the sorted slice's, for every length up to 300
    /// (the small ones have p50 and p99 at the same index) and with repeats.
    #[test]
    fn selection_matches_sorting() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..300usize {
            let values: Vec<u64> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % 1000
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let s = LatencySummary::of(values);
            let expect = |q| percentile(&sorted, q).unwrap_or(0);
            assert_eq!(s.count, n);
            assert_eq!((s.p50_ns, s.p99_ns), (expect(50.0), expect(99.0)), "n {n}");
            assert_eq!(s.max_ns, sorted.last().copied().unwrap_or(0), "n {n}");
        }
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

    #[test]
    fn summary_built_batch_by_batch_is_the_summary_of_all() {
        let records: Vec<RequestRecord> = (0..1000u64)
            .map(|i| RequestRecord {
                insert_ns: 100 * i,
                issue_ns: if i % 7 == 0 { 0 } else { 100 * i + i * 3 % 97 },
                complete_ns: if i % 11 == 0 {
                    0
                } else {
                    100 * i + 500 + i % 13
                },
                deadline_ns: 100 * i + 50,
                op: (i % 3) as u8,
                error: i32::from(i % 17 == 0),
                ..Default::default()
            })
            .collect();
        let whole = RecordSummary::of(&records);
        let mut acc = SummaryAccumulator::default();
        for chunk in records.chunks(37) {
            acc.add(chunk);
        }
        let parts = acc.finish();
        assert_eq!(
            format!("{whole:?}"),
            format!("{parts:?}"),
            "the same numbers, batch by batch"
        );
        assert!(whole.deadline_misses > 0 && whole.errors > 0);
        let next = acc.finish();
        assert_eq!(
            (next.records, next.insert_to_issue.count),
            (0, 0),
            "finish starts a new second"
        );
    }
}
