//! The kernel's per-request state replayed over a recorded trace: the queue
//! positions, and the miss shares (the label fed back, [`replay_miss_shares`]).
//!
//! A trace holds every request's insert and dispatch times, sector and direction,
//! which is all [`QueueShape`] is updated from. Replaying those events in time order
//! through the same [`QueueShape`] code the eBPF program runs gives, for each
//! request, the [`PositionFeatures`] the kernel would have computed at its insert
//! (up to the order of events closer together than a nanosecond, and to requests the
//! trace does not hold: those queued before recording started, and those merged
//! away, which the kernel removes at `block_rq_merge`).

use std::collections::HashMap;

use kml_ebpf_common::{
    label::miss_share_step,
    op::{Direction, ReqOp},
    position::{bucket_shift_for, PositionFeatures, QueueShape},
    record::Known,
    RequestRecord,
};

/// When a request left the queue: its issue, else its completion (the label's
/// convention), never before its insert.
fn left_at(r: &RequestRecord) -> u64 {
    let t = if r.issue_ns != 0 {
        r.issue_ns
    } else {
        r.complete_ns
    };
    t.max(r.insert_ns)
}

/// The bucket shift the replay uses for a device: the one its records carry (the
/// kernel's, from the device's capacity: `RequestRecord::bucket_shift`), else its
/// highest end sector seen spread over the buckets (on a trace that covers the
/// device the two agree; on one that touches part of it, buckets come out
/// narrower than the kernel's).
pub fn bucket_shifts(records: &[RequestRecord]) -> HashMap<u32, u32> {
    let mut end: HashMap<u32, u64> = HashMap::new();
    let mut recorded: HashMap<u32, u32> = HashMap::new();
    for r in records {
        let e = end.entry(r.dev).or_default();
        *e = (*e).max(r.sector.saturating_add(r.nr_sectors as u64));
        if r.known & Known::BUCKET_SHIFT != 0 {
            recorded.entry(r.dev).or_insert(r.bucket_shift as u32);
        }
    }
    end.into_iter()
        .map(|(dev, e)| {
            let shift = recorded.get(&dev).copied().unwrap_or(bucket_shift_for(e));
            (dev, shift)
        })
        .collect()
}

/// The position features of every record (same order as `records`), replayed with
/// the given bucket shift per device (devices not in `shifts`: from
/// [`bucket_shifts`]). Records without a deadline get [`PositionFeatures::UNKNOWN`]
/// and do not enter the queue.
pub fn replay_positions(
    records: &[RequestRecord],
    shifts: &HashMap<u32, u32>,
) -> Vec<PositionFeatures> {
    replay_inserts(
        records,
        shifts,
        PositionFeatures::UNKNOWN,
        |q, r, t, sh, budget| q.position(r.sector, sh, t, budget),
    )
}

/// For each record, [`QueueShape::walk_places`] at its insert (an offline study:
/// `explore --place`), replayed as [`replay_positions`] does.
pub fn replay_places(
    records: &[RequestRecord],
    shifts: &HashMap<u32, u32>,
) -> Vec<[Option<u64>; 3]> {
    replay_inserts(records, shifts, [None; 3], |q, r, t, sh, budget| {
        q.position(r.sector, sh, t, budget);
        q.walk_places(r.sector, sh, t, budget)
    })
}

/// Replays the queue state over the records in time order and takes `at_insert`
/// of each request just before it joins its queue (`default` for records with no
/// deadline).
fn replay_inserts<T: Clone>(
    records: &[RequestRecord],
    shifts: &HashMap<u32, u32>,
    default: T,
    mut at_insert: impl FnMut(&mut QueueShape, &RequestRecord, u64, u32, u64) -> T,
) -> Vec<T> {
    let own = bucket_shifts(records);
    let shift = |dev: u32| {
        shifts
            .get(&dev)
            .or_else(|| own.get(&dev))
            .copied()
            .unwrap_or(0)
    };
    // (time, 0 = leaves / 1 = joins, index): at one instant a departure goes first.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * records.len());
    for (i, r) in records.iter().enumerate() {
        if r.deadline_ns <= r.insert_ns {
            continue;
        }
        events.push((r.insert_ns, 1, i));
        events.push((left_at(r), 0, i));
    }
    events.sort_unstable();
    let mut queues: HashMap<(u32, u8), QueueShape> = HashMap::new();
    let mut out = vec![default; records.len()];
    for (t, kind, i) in events {
        let r = &records[i];
        let q = queues
            .entry((r.dev, r.op().direction() as u8))
            .or_insert(QueueShape::EMPTY);
        let budget = r.deadline_ns - r.insert_ns;
        let sh = shift(r.dev);
        if kind == 0 {
            q.on_remove(r.sector, sh, r.insert_ns, budget);
        } else {
            out[i] = at_insert(q, r, t, sh, budget);
            q.on_insert(r.sector, sh, t, budget);
        }
    }
    out
}

/// The miss shares (read, write) of every record's device at its insert (same
/// order as `records`), as the programs keep them: each issue, in issue order,
/// steps its device's share of its direction with its label
/// ([`miss_share_step`]); each insert reads the device's two shares. Flushes
/// never pass the scheduler and do not count. (A requeued request counts its last
/// dispatch only: the trace keeps no other.)
pub fn replay_miss_shares(records: &[RequestRecord]) -> Vec<(u16, u16)> {
    // (time, 0 = issue / 1 = insert, index): at one instant the issue goes first.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * records.len());
    for (i, r) in records.iter().enumerate() {
        events.push((r.insert_ns, 1, i));
        if r.issue_ns != 0 && r.op() != ReqOp::Flush {
            events.push((r.issue_ns, 0, i));
        }
    }
    events.sort_unstable();
    let mut shares: HashMap<u32, [u32; 2]> = HashMap::new();
    let mut out = vec![(0, 0); records.len()];
    for (_, kind, i) in events {
        let r = &records[i];
        let s = shares.entry(r.dev).or_default();
        if kind == 0 {
            let d = r.op().direction() as usize;
            s[d] = miss_share_step(s[d], r.deadline_missed());
        } else {
            out[i] = (
                s[Direction::Read as usize] as u16,
                s[Direction::Write as usize] as u16,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::{op::ReqOp, position::DUE_NONE};

    const MS: u64 = 1_000_000;

    fn read(sector: u64, insert: u64, issue: u64) -> RequestRecord {
        RequestRecord {
            sector,
            nr_sectors: 8,
            insert_ns: insert,
            issue_ns: issue,
            complete_ns: issue + 1,
            deadline_ns: insert + 8 * MS,
            op: ReqOp::Read as u8,
            ..Default::default()
        }
    }

    #[test]
    fn replay_sees_only_what_is_queued_at_insert() {
        let shifts = HashMap::from([(0u32, 15u32)]);
        // An old read at bucket 10, dispatched at 25 ms; a read above it inserted at
        // 20 ms sees it; a read inserted at 30 ms does not (it left at 25 ms).
        let recs = vec![
            read(11 << 15, 20 * MS, 26 * MS),
            read(10 << 15, 0, 25 * MS),
            read(11 << 15, 30 * MS, 31 * MS),
        ];
        let p = replay_positions(&recs, &shifts);
        // Nothing queued before the first: the empty queue's values.
        assert_eq!(p[1], PositionFeatures::UNKNOWN);
        assert_eq!(p[0].due_below, 1);
        assert_eq!(p[0].expired, 1);
        assert_eq!(p[2].due_below, DUE_NONE);
        assert_eq!(p[2].expired, 0);
        // The same in any record order.
        let mut rev = recs.clone();
        rev.reverse();
        let q = replay_positions(&rev, &shifts);
        assert_eq!((q[2], q[1], q[0]), (p[0], p[1], p[2]));
    }

    #[test]
    fn shift_from_the_highest_sector() {
        // 1 GiB: 2^21 sectors over 256 buckets.
        let recs = vec![read((1 << 21) - 8, 0, 1)];
        assert_eq!(bucket_shifts(&recs)[&0], 13);
    }

    #[test]
    fn shift_the_kernel_recorded_wins() {
        // A 512 MiB job on a 1 GiB disk: the sectors alone say 12, the kernel
        // (from the capacity) used 13, and the records say so.
        let mut recs = vec![read((1 << 20) - 8, 0, 1), read(8, 2, 3)];
        assert_eq!(bucket_shifts(&recs)[&0], 12);
        recs[1].bucket_shift = 13;
        recs[1].known |= Known::BUCKET_SHIFT;
        assert_eq!(bucket_shifts(&recs)[&0], 13);
        // And the positions follow it: a read 17 buckets of 2^12 sectors above an
        // older one is beyond the walk (16 buckets), but 8.5 buckets of 2^13 are
        // within it.
        let above = |known| RequestRecord {
            bucket_shift: 13,
            known,
            ..read(17 << 12, MS, 11 * MS)
        };
        let with = replay_positions(
            &[read(0, 0, 10 * MS), above(Known::BUCKET_SHIFT)],
            &HashMap::new(),
        );
        let without = replay_positions(&[read(0, 0, 10 * MS), above(0)], &HashMap::new());
        assert_eq!((with[1].due_below, without[1].due_below), (1, DUE_NONE));
    }

    #[test]
    fn miss_shares_follow_the_labels_of_earlier_dispatches() {
        use kml_ebpf_common::label::{MISS_SHARE_ONE, MISS_SHARE_SHIFT};
        let step = (MISS_SHARE_ONE >> MISS_SHARE_SHIFT) as u16;
        // A read dispatched past its 8 ms deadline (issued at 9 ms), then a read
        // on time, a write inserted in between, and a flush that never counts.
        let late = read(0, 0, 9 * MS);
        let on_time = read(8, 10 * MS, 11 * MS);
        let write = RequestRecord {
            op: ReqOp::Write as u8,
            ..read(16, 9 * MS + 1, 20 * MS)
        };
        let flush = RequestRecord {
            op: ReqOp::Flush as u8,
            deadline_ns: MS,
            ..read(0, MS, 2 * MS)
        };
        let after = read(24, 12 * MS, 13 * MS);
        let s = replay_miss_shares(&[after, write, late, on_time, flush]);
        assert!(late.deadline_missed() && !on_time.deadline_missed());
        // Nothing dispatched before the first insert.
        assert_eq!(s[2], (0, 0));
        // The write sees the late read's miss in the read share.
        assert_eq!(s[1], (step, 0));
        // After the on-time read, the share decays by 2^-k.
        let decayed = kml_ebpf_common::label::miss_share_step(step.into(), false) as u16;
        assert_eq!(s[0], (decayed, 0));
        assert_eq!(s[3], (step, 0));
    }
}
