//! A small simulated mq-deadline queue that produces [`RequestRecord`]s, for tests
//! and the training-speed example. Not real I/O: measurements of the project's goals
//! use traces recorded with `kml-agent record`.
//!
//! Requests arrive in bursts whose rate swings between light load and overload (at
//! most `max_outstanding` at once, like fio's iodepth), wait in a read FIFO and a
//! write FIFO (reads first unless the oldest write has expired,
//! as mq-deadline does), and are served by a device with a few queue slots and a
//! service time growing with the request size. Records come out in completion order,
//! like a trace.

use std::collections::{BinaryHeap, VecDeque};

use kml_ebpf_common::{
    op::{ReqFlags, ReqOp},
    record::ewma_step,
    RequestRecord,
};

/// Deterministic generator (splitmix64), so tests and samples are reproducible
/// from a seed without a crate.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is at most n / 2^64, below
    /// 2^-40 for any n under 2^24 (the bootstrap's cycle counts, a trace's rows).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// Settings of the simulated device and workload.
#[derive(Clone, Debug)]
pub struct SyntheticTrace {
    rng: SplitMix,
    pub read_expire_ns: u64,
    pub write_expire_ns: u64,
    /// Share of reads.
    pub read_share: f64,
    /// Device queue slots.
    pub slots: usize,
    /// Mean time between arrivals at load factor 1, ns.
    pub mean_gap_ns: f64,
    /// Most requests outstanding at once (fio's iodepth): an arrival waits for a
    /// completion beyond that, which bounds the queue as a real workload does.
    pub max_outstanding: usize,
}

impl SyntheticTrace {
    pub fn new(seed: u64) -> Self {
        SyntheticTrace {
            rng: SplitMix(seed),
            read_expire_ns: 1_000_000,
            write_expire_ns: 2_000_000,
            read_share: 0.6,
            slots: 4,
            mean_gap_ns: 30_000.0,
            max_outstanding: 48,
        }
    }

    /// Simulates `n` requests; returns them in completion order.
    pub fn records(&mut self, n: usize) -> Vec<RequestRecord> {
        let mut recs: Vec<RequestRecord> = Vec::with_capacity(n);
        let (mut read_q, mut write_q) = (VecDeque::new(), VecDeque::new());
        // Min-heap of (completion time, request) via Reverse.
        let mut busy: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = BinaryHeap::new();
        let (mut inflight_read, mut inflight_write) = (0u32, 0u32);
        let mut now = 1_000_000_000u64;
        let mut next_arrival = now;
        let (mut last_insert, mut last_issue_end, mut next_sector) = (0u64, 0u64, 0u64);
        // The observer's moving averages: per-direction wait, device dispatch gap.
        let (mut wait_ewma, mut gap_ewma, mut last_issue) = ([0u64; 2], 0u64, 0u64);
        let mut done = Vec::with_capacity(n);

        while done.len() < n {
            let next_completion = busy.peek().map(|r| r.0 .0);
            let outstanding = recs.len() - done.len();
            let arrive = recs.len() < n
                && (outstanding < self.max_outstanding || next_completion.is_none())
                && next_completion.is_none_or(|c| next_arrival <= c);
            if arrive {
                now = now.max(next_arrival);
                let i = recs.len();
                let read = self.rng.unit() < self.read_share;
                let sequential = self.rng.unit() < 0.3;
                let sector = if sequential {
                    next_sector
                } else {
                    (self.rng.next_u64() % (1 << 21)) & !7
                };
                let nr_sectors = 8 << (self.rng.next_u64() % 5); // 4..64 KiB
                next_sector = sector + nr_sectors as u64;
                let expire = if read {
                    self.read_expire_ns
                } else {
                    self.write_expire_ns
                };
                recs.push(RequestRecord {
                    sector,
                    insert_ns: now,
                    deadline_ns: now + expire,
                    since_last_insert_ns: if last_insert == 0 {
                        0
                    } else {
                        now - last_insert
                    },
                    issue_distance: sector.abs_diff(last_issue_end),
                    dev: kml_ebpf_common::kernel_dev(7, 0),
                    nr_sectors,
                    inflight_read,
                    inflight_write,
                    queued_read: read_q.len() as u32,
                    queued_write: write_q.len() as u32,
                    dir_wait_ewma_ns: wait_ewma[!read as usize],
                    issue_gap_ewma_ns: gap_ewma,
                    op: if read { ReqOp::Read } else { ReqOp::Write } as u8,
                    flags: if read || self.rng.unit() < 0.5 {
                        ReqFlags::SYNC
                    } else {
                        0
                    },
                    ..Default::default()
                });
                last_insert = now;
                if read {
                    inflight_read += 1;
                    read_q.push_back(i);
                } else {
                    inflight_write += 1;
                    write_q.push_back(i);
                }
                // Load swings between 0.5x and 1.6x the device's capacity, with a
                // period of about 30 ms (a thousand requests).
                let phase = (now as f64 / 5e6).sin();
                let load = 1.05 + 0.55 * phase;
                let burst = if self.rng.unit() < 0.1 { 0.1 } else { 1.0 };
                next_arrival = now + self.rng.exp(self.mean_gap_ns * burst / load) as u64 + 1;
            } else if let Some(std::cmp::Reverse((t, i))) = busy.pop() {
                now = t;
                recs[i].complete_ns = t;
                match recs[i].op() {
                    ReqOp::Read => inflight_read -= 1,
                    _ => inflight_write -= 1,
                }
                done.push(i);
            }
            // Dispatch while the device has room: reads first, unless the oldest
            // write has expired or there is no read.
            while busy.len() < self.slots {
                let write_expired = write_q.front().is_some_and(|&w| recs[w].deadline_ns < now);
                let pick = if write_expired || read_q.is_empty() {
                    write_q.pop_front()
                } else {
                    read_q.pop_front()
                };
                let Some(i) = pick else { break };
                let r = &mut recs[i];
                r.issue_ns = now;
                let dir = r.op().direction() as usize;
                wait_ewma[dir] = ewma_step(wait_ewma[dir], now - r.insert_ns);
                if last_issue != 0 && now > last_issue {
                    gap_ewma = ewma_step(gap_ewma, now - last_issue);
                }
                last_issue = now;
                last_issue_end = r.sector + r.nr_sectors as u64;
                let service = 60_000.0 + 1_500.0 * (r.nr_sectors / 2) as f64;
                let t = now + self.rng.exp(service) as u64 + 1;
                busy.push(std::cmp::Reverse((t, i)));
            }
        }
        done.into_iter().map(|i| recs[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plausible_miss_rate_and_consistent_records() {
        let recs = SyntheticTrace::new(1).records(20_000);
        assert_eq!(recs.len(), 20_000);
        let misses = recs.iter().filter(|r| r.deadline_missed()).count() as f64 / recs.len() as f64;
        assert!((0.05..=0.4).contains(&misses), "miss rate {misses}");
        for r in &recs {
            assert!(r.insert_ns <= r.issue_ns && r.issue_ns < r.complete_ns);
        }
        // Completion order, as a trace is written.
        assert!(recs
            .windows(2)
            .all(|w| w[0].complete_ns <= w[1].complete_ns));
        assert_eq!(
            SyntheticTrace::new(1).records(100),
            SyntheticTrace::new(1).records(100)
        );
    }
}
