//! The device-state features of every record, recomputed on the host by replaying
//! the records of one device in kernel event order (insert, issue, complete).
//!
//! Each record carries what the programs saw at its insert: requests in flight and
//! queued per direction, time since the last insert, distance from the last issued
//! extent, and two moving averages (queue wait per direction, issue gap). The
//! replay derives each one from the other records' timestamps, with its own
//! statement of the moving-average rule, and compares, record by record, requests
//! of every task on the device (a probe of the new disk included).
//!
//! A request whose record was lost (each loss counted by the kernel, see
//! [`crate::accounting`]) still moved the kernel's state, invisibly to the host:
//! at the first record that disagrees after one, the chain *restarts* from what
//! that record says (and what it cannot say, the other direction's wait average
//! and the issue-gap average it is about to move, from the next records that show
//! them), and checking goes on. Each counted loss pays for at most two restarts
//! (one where its record is missing, one where the kernel releases its stale
//! entry). A record whose completion was never seen (`complete_ns` 0: the kernel
//! did not run the completion program, and the entry went out stale when its tag
//! was reused) is such a loss without a missing record: it pays for one restart,
//! where the kernel released it. With no loss there is no restart: every field of
//! every record must match.

use anyhow::{bail, Result};
use kml_ebpf_common::{ReqOp, RequestRecord};

/// `avg += (x - avg) / 8`, the division truncating towards zero; the first sample
/// (avg 0) is taken as it is. Stated here independently of the programs' shifts.
pub fn moving_average(avg: u64, x: u64) -> u64 {
    if avg == 0 {
        return x;
    }
    let d = i128::from(x) - i128::from(avg);
    (i128::from(avg) + d / 8) as u64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    // At one timestamp: a request's insert before its issue before its completion.
    Insert,
    Issue,
    Complete,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Snapshot {
    inflight_read: u64,
    inflight_write: u64,
    queued_read: u64,
    queued_write: u64,
    since_last_insert_ns: u64,
    issue_distance: u64,
    dir_wait_ewma_ns: u64,
    issue_gap_ewma_ns: u64,
}

impl Snapshot {
    fn of(r: &RequestRecord) -> Snapshot {
        Snapshot {
            inflight_read: r.inflight_read.into(),
            inflight_write: r.inflight_write.into(),
            queued_read: r.queued_read.into(),
            queued_write: r.queued_write.into(),
            since_last_insert_ns: r.since_last_insert_ns,
            issue_distance: r.issue_distance,
            dir_wait_ewma_ns: r.dir_wait_ewma_ns,
            issue_gap_ewma_ns: r.issue_gap_ewma_ns,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    inflight: [u64; 2],
    queued: [u64; 2],
    last_insert_ns: u64,
    last_issue_end: u64,
    last_issue_ns: u64,
    gap_ewma: u64,
    wait_ewma: [u64; 2],
    /// After a restart: values a lost request may have moved that the restarting
    /// record does not show (the gap average until the next issue is seen, the
    /// other direction's wait average): taken from the next record that shows them.
    gap_unknown: bool,
    wait_unknown: [bool; 2],
}

fn dir(r: &RequestRecord) -> usize {
    usize::from(r.op() != ReqOp::Read)
}

impl State {
    fn expect(&mut self, r: &RequestRecord) -> Snapshot {
        let d = dir(r);
        if self.wait_unknown[d] {
            self.wait_ewma[d] = r.dir_wait_ewma_ns;
            self.wait_unknown[d] = false;
        }
        if self.gap_unknown {
            self.gap_ewma = r.issue_gap_ewma_ns;
            self.gap_unknown = false;
        }
        Snapshot {
            inflight_read: self.inflight[0],
            inflight_write: self.inflight[1],
            queued_read: self.queued[0],
            queued_write: self.queued[1],
            since_last_insert_ns: if self.last_insert_ns != 0 && r.insert_ns > self.last_insert_ns {
                r.insert_ns - self.last_insert_ns
            } else {
                0
            },
            issue_distance: r.sector.abs_diff(self.last_issue_end),
            dir_wait_ewma_ns: self.wait_ewma[d],
            issue_gap_ewma_ns: self.gap_ewma,
        }
    }

    /// Takes what a record says as the truth (a restart).
    fn adopt(&mut self, r: &RequestRecord) {
        let s = Snapshot::of(r);
        let d = dir(r);
        self.inflight = [s.inflight_read, s.inflight_write];
        self.queued = [s.queued_read, s.queued_write];
        self.wait_ewma[d] = s.dir_wait_ewma_ns;
        self.gap_ewma = s.issue_gap_ewma_ns;
        // The other direction's average, and the gap average as this record's
        // issue will move it (from an unseen last issue), come from later records.
        self.wait_unknown[1 - d] = true;
        self.gap_unknown = true;
        self.last_issue_ns = 0;
        // The distance is from the last issued end: the record pins it only up to
        // the side; the next issue sets it again.
    }

    fn insert(&mut self, r: &RequestRecord) {
        let d = dir(r);
        self.inflight[d] += 1;
        self.queued[d] += 1;
        self.last_insert_ns = r.insert_ns;
    }

    fn issue(&mut self, r: &RequestRecord) {
        let d = dir(r);
        self.queued[d] = self.queued[d].saturating_sub(1);
        self.wait_ewma[d] = moving_average(self.wait_ewma[d], r.issue_ns - r.insert_ns);
        if !self.gap_unknown && self.last_issue_ns != 0 && r.issue_ns > self.last_issue_ns {
            self.gap_ewma = moving_average(self.gap_ewma, r.issue_ns - self.last_issue_ns);
        }
        self.last_issue_ns = r.issue_ns;
        self.last_issue_end = r.sector + u64::from(r.nr_sectors);
    }

    fn complete(&mut self, r: &RequestRecord) {
        let d = dir(r);
        self.inflight[d] = self.inflight[d].saturating_sub(1);
    }
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records whose every field was checked against the replay (and matched).
    pub checked: usize,
    /// Records where the chain restarted after a counted loss, with what differed.
    pub restarts: Vec<String>,
    /// Records where it restarted because another request's event on another CPU
    /// fell within [`RACE_NS`] of the insert (see [`replay`]).
    pub races: Vec<String>,
}

/// How close two events on different CPUs must be for the replay not to know
/// their order. A program reads the clock a few instructions before it moves the
/// shared counts (insert: clock, then the atomic add; completion: clock, then the
/// subtraction), so a completion timed after an insert can have moved the counts
/// before it (seen once in a clean-clone CI run, 2026-12-03: a probe's read
/// completing as the test's insert ran; a vCPU descheduled between the two reads
/// widens the window).
pub const RACE_NS: u64 = 5_000;

/// At most one race restart per this many records checked (and one more):
/// beyond that, a mismatch is a bug, not a race.
pub const RACE_EVERY: usize = 1000;

/// Replays `records` (one device; any order) and checks every record's state
/// features. `losses`: records of the device the kernel counted as lost.
pub fn replay(records: &[RequestRecord], losses: u64) -> Result<Replay> {
    replay_within(records, losses, RACE_NS)
}

/// Whether the kernel's counts at an insert differ from the replay's only as far
/// as the other requests' events within the race window, `near[d]` of them in
/// direction `d`, could have moved them either way; every other field equal.
fn race_explains(want: &Snapshot, got: &Snapshot, near: [u64; 2]) -> bool {
    let within = |w: u64, g: u64, k: u64| g.abs_diff(w) <= k;
    let counts_zeroed = |s: &Snapshot| Snapshot {
        inflight_read: 0,
        inflight_write: 0,
        queued_read: 0,
        queued_write: 0,
        ..*s
    };
    counts_zeroed(want) == counts_zeroed(got)
        && within(want.inflight_read, got.inflight_read, near[0])
        && within(want.queued_read, got.queued_read, near[0])
        && within(want.inflight_write, got.inflight_write, near[1])
        && within(want.queued_write, got.queued_write, near[1])
}

/// [`replay`] with a race window of `race_ns` (0: every order is trusted).
fn replay_within(records: &[RequestRecord], losses: u64, race_ns: u64) -> Result<Replay> {
    let mut events: Vec<(u64, Event, usize)> = Vec::with_capacity(records.len() * 3);
    for (i, r) in records.iter().enumerate() {
        // complete_ns 0: the completion was never seen (the kernel skipped the
        // program's run, a counted loss); the record went out when the request's
        // entry was found stale. The kernel released it then, unseen by the host:
        // the replay restarts there, paid for by that loss.
        let unseen = r.complete_ns == 0;
        if r.insert_ns == 0 || r.issue_ns < r.insert_ns || (r.complete_ns < r.issue_ns && !unseen) {
            bail!("record {i}: timestamps out of order: {r:?}");
        }
        events.push((r.insert_ns, Event::Insert, i));
        events.push((r.issue_ns, Event::Issue, i));
        if !unseen {
            events.push((r.complete_ns, Event::Complete, i));
        }
    }
    events.sort();
    // Other records' events within the race window of this time, per direction.
    let near = |at: u64, me: usize| {
        let from = events.partition_point(|(t, _, _)| *t < at.saturating_sub(race_ns));
        let mut n = [0u64; 2];
        for (_, _, j) in events[from..]
            .iter()
            .take_while(|(t, _, _)| *t <= at + race_ns)
            .filter(|(_, _, j)| *j != me)
        {
            n[dir(&records[*j])] += 1;
        }
        n
    };
    let unseen = records.iter().filter(|r| r.complete_ns == 0).count() as u64;
    let mut budget = losses.saturating_mul(2).saturating_add(unseen);
    let mut state = State::default();
    let mut out = Replay::default();
    for &(_, event, i) in &events {
        let r = &records[i];
        match event {
            Event::Insert => {
                let want = state.expect(r);
                let got = Snapshot::of(r);
                if want == got {
                    out.checked += 1;
                } else if budget > 0 {
                    budget -= 1;
                    out.restarts.push(format!(
                        "record {i} at {}: replay {want:?}, kernel {got:?}",
                        r.insert_ns
                    ));
                    state.adopt(r);
                } else if out.races.len() <= out.checked / RACE_EVERY
                    && race_explains(&want, &got, near(r.insert_ns, i))
                {
                    out.races.push(format!(
                        "record {i} at {}: replay {want:?}, kernel {got:?} (other requests' events \
                         within {race_ns} ns)",
                        r.insert_ns
                    ));
                    state.adopt(r);
                } else {
                    bail!(
                        "record {i} ({r:?}): the kernel's state features {got:?} differ from the \
                         replay of the records before it {want:?} (restarts left: 0 of {}: {losses} \
                         losses, {unseen} completions unseen; {} records checked before)",
                        losses * 2 + unseen,
                        out.checked
                    );
                }
                state.insert(r);
            }
            Event::Issue => state.issue(r),
            Event::Complete => state.complete(r),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(op: ReqOp, sector: u64, insert: u64, issue: u64, complete: u64) -> RequestRecord {
        let mut r = RequestRecord {
            sector,
            nr_sectors: 8,
            insert_ns: insert,
            issue_ns: issue,
            complete_ns: complete,
            ..Default::default()
        };
        r.op = op as u8;
        r
    }

    #[test]
    fn moving_average_rule() {
        assert_eq!(moving_average(0, 80), 80);
        assert_eq!(moving_average(80, 160), 90);
        assert_eq!(moving_average(80, 0), 70);
        // Truncation towards zero on both sides.
        assert_eq!(moving_average(100, 107), 100);
        assert_eq!(moving_average(100, 93), 100);
    }

    /// A write `a` (completed at `a_complete`, 0: never seen), then a read `b`
    /// inserted at 20,000 whose counts say a had completed.
    fn write_then_read(a_complete: u64) -> (RequestRecord, RequestRecord) {
        let mut a = rec(ReqOp::Write, 800, 1000, 1100, a_complete);
        a.issue_distance = 800;
        let mut b = rec(ReqOp::Read, 80, 20_000, 20_300, 20_600);
        b.since_last_insert_ns = 19_000;
        b.issue_distance = 808 - 80;
        (a, b)
    }

    #[test]
    fn a_completion_racing_an_insert_on_another_cpu_restarts_once_not_forever() {
        // b is inserted at 20,000 while a completes on another CPU, timed at
        // 20,010 but counted before b's insert read the counts: the kernel saw 0
        // in flight.
        let (a, b) = write_then_read(20_010);
        let r = replay(&[a, b], 0).unwrap();
        assert_eq!((r.checked, r.races.len(), r.restarts.len()), (1, 1, 0));
        // The same disagreement with nothing near is a bug.
        let mut far = a;
        far.complete_ns = 20_000 + RACE_NS + 1;
        assert!(replay(&[far, b], 0).is_err());
        // So is one the near events cannot explain: two fewer in flight, or
        // another field.
        let mut two = b;
        two.queued_write = 0;
        two.inflight_write = 0;
        two.queued_read = 1;
        assert!(replay(&[a, two], 0).is_err());
        let mut other = b;
        other.issue_distance += 8;
        assert!(replay(&[a, other], 0).is_err());
    }

    #[test]
    fn a_completion_never_seen_pays_for_the_restart_where_its_entry_was_released() {
        // a's completion never reached the program: its record went out stale
        // (complete_ns 0) when b took its tag, and the kernel counted b's insert
        // with a released. The replay, which cannot know when, still has a in
        // flight: one restart, paid for by a's record, though none is missing.
        let (a, b) = write_then_read(0);
        let r = replay_within(&[a, b], 0, 0).unwrap();
        assert_eq!((r.checked, r.restarts.len()), (1, 1));
        // The same disagreement after a completion that was seen is not paid for.
        let mut seen = a;
        seen.complete_ns = 30_000;
        assert!(replay_within(&[seen, b], 0, 0).is_err());
        // And one unseen completion pays for one restart, not two: after it the
        // chain goes on, and a later disagreement fails.
        let mut c = b;
        c.insert_ns = 40_000;
        c.issue_ns = 40_300;
        c.complete_ns = 40_600;
        c.since_last_insert_ns = 20_000;
        c.issue_distance = 88 - 80;
        c.dir_wait_ewma_ns = 300;
        c.issue_gap_ewma_ns = 1;
        let r = replay_within(&[a, b, c], 0, 0).unwrap();
        assert_eq!((r.checked, r.restarts.len()), (2, 1));
        c.inflight_write = 1;
        assert!(replay_within(&[a, b, c], 0, 0).is_err());
    }

    /// Two synchronous requests; the second one's features come from the first.
    fn pair() -> Vec<RequestRecord> {
        let mut a = rec(ReqOp::Write, 800, 1000, 1100, 1500);
        a.issue_distance = 800; // from sector 0: nothing issued before
        let mut b = rec(ReqOp::Read, 80, 2000, 2300, 2600);
        b.since_last_insert_ns = 1000;
        b.issue_distance = 808 - 80;
        b.dir_wait_ewma_ns = 0; // no read issued before
        b.issue_gap_ewma_ns = 0; // one issue before: no gap yet
        vec![a, b]
    }

    #[test]
    fn a_consistent_chain_passes_and_any_changed_field_fails() {
        let recs = pair();
        assert_eq!(replay_within(&recs, 0, 0).unwrap().checked, 2);
        for change in 0..5 {
            let mut bad = recs.clone();
            match change {
                0 => bad[1].since_last_insert_ns += 1,
                1 => bad[1].issue_distance += 8,
                2 => bad[1].inflight_write = 1,
                3 => bad[1].dir_wait_ewma_ns = 100,
                _ => bad[1].issue_gap_ewma_ns = 1,
            }
            assert!(
                replay_within(&bad, 0, 0).is_err(),
                "change {change} not caught"
            );
            // A counted loss pays for a restart there.
            let r = replay_within(&bad, 1, 0).unwrap();
            assert_eq!(r.restarts.len(), 1);
        }
    }

    #[test]
    fn concurrent_requests_are_counted_in_flight_and_queued() {
        let a = rec(ReqOp::Write, 0, 1000, 5000, 6000);
        let mut b = rec(ReqOp::Write, 8, 2000, 5100, 6100);
        b.inflight_write = 1;
        b.queued_write = 1;
        b.since_last_insert_ns = 1000;
        b.issue_distance = 8;
        assert!(replay_within(&[a, b], 0, 0).is_ok());
        b.queued_write = 0;
        assert!(replay_within(&[a, b], 0, 0).is_err());
    }
}
