//! The label: did mq-deadline dispatch the request after its own deadline?
//!
//! mq-deadline gives each request `rq->fifo_time = jiffies + fifo_expire[dir]` in
//! `dd_insert_request()`, just after the `block_rq_insert` tracepoint (`jiffies` for
//! a request inserted at the head of the dispatch list, e.g. a requeue; an earlier
//! value when it absorbs an older request by a merge). kml reads that value at
//! `block_rq_issue` (raw tracepoints; the offset of `fifo_time` comes from BTF) with
//! the jiffies of the issue (`bpf_jiffies64`), and calls the request missed when it
//! was dispatched after its `fifo_time`, compared as the kernel compares jiffies
//! ([`time_after`]: wrap-safe). mq-deadline itself starts serving an expired FIFO
//! once `time_after_eq(jiffies, fifo_time)`, one jiffy earlier: a request dispatched
//! in the very jiffy of its deadline is on time here.
//!
//! Classic tracepoints have no `struct request`: there `fifo_time` is
//! [`fifo_time_fallback`] (`insert_jiffies` + the device's expiry in jiffies, from
//! sysfs milliseconds and a probed HZ, see [`expire_jiffies`]). It misses the merge
//! and head-insert cases and a tick between the tracepoint and the assignment.
//!
//! The nanosecond times stay in the record for latency (and for the regression
//! target); [`crate::RequestRecord::deadline_missed_ns`] is the old estimate,
//! used when the jiffies are unknown (traces from before, an unprobed HZ).

use crate::record::RequestRecord;

/// Largest [`TickClock::phase`], in units of `1 << TIME_SHIFT` ns: 16,383 (16.8
/// ms), more than one tick at any HZ from 100 up.
pub const TICK_PHASE_MAX: u16 = u16::MAX >> 2;

/// Where in its jiffy an event falls, as one CPU learns it: the time of the first
/// event it saw in the current jiffy (no helper gives the tick's own time). The
/// label turns on a tick: a request inserted late in its jiffy has up to a jiffy
/// less time before its `fifo_time` passes than one inserted early
/// (docs/learning.md, "The tick band"). Per CPU in the kernel (`TICK_CLOCKS`): no
/// line is shared, and the estimate is as good as the CPU's insert rate, which is
/// high exactly where deadlines are missed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickClock {
    /// The jiffy the clock is in (0: none yet).
    pub jiffies: u64,
    /// ns of the first event seen in it.
    pub start_ns: u64,
}

impl TickClock {
    /// The phase of an event at `now_ns` in jiffy `jiffies`, in units of
    /// `1 << TIME_SHIFT` ns, capped at [`TICK_PHASE_MAX`]; 0 for the first event
    /// of a jiffy, which starts the clock there. A clock read before the jiffy
    /// (another CPU's ordering) also restarts it: the phase never goes negative.
    #[inline(always)]
    pub fn phase(&mut self, jiffies: u64, now_ns: u64) -> u16 {
        if jiffies != self.jiffies || now_ns < self.start_ns {
            self.jiffies = jiffies;
            self.start_ns = now_ns;
            return 0;
        }
        let units = (now_ns - self.start_ns) >> crate::features::TIME_SHIFT;
        if units > TICK_PHASE_MAX as u64 {
            TICK_PHASE_MAX
        } else {
            units as u16
        }
    }
}

/// The kernel's `time_after(a, b)`: `a` is later than `b`, modulo wrap-around.
#[inline(always)]
pub const fn time_after(a: u64, b: u64) -> bool {
    (b.wrapping_sub(a) as i64) < 0
}

/// The kernel's `time_after_eq(a, b)`: `a` is `b` or later, modulo wrap-around.
#[inline(always)]
pub const fn time_after_eq(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) >= 0
}

/// The label of a finished request: dispatched after the scheduler's own
/// deadline. Falls back to the nanosecond estimate when `fifo_time` or the issue
/// jiffies are unknown (0).
#[inline(always)]
pub const fn missed(r: &RequestRecord) -> bool {
    if r.fifo_time != 0 && r.issue_jiffies != 0 {
        time_after(r.issue_jiffies, r.fifo_time)
    } else {
        r.deadline_missed_ns()
    }
}

/// How many jiffies after its `fifo_time` the request was dispatched (negative:
/// that many before), wrap-safe; `None` without the jiffies (classic-tracepoint
/// traces from before the label, a request never issued). The label is
/// `jiffies_late > 0` ([`missed`]).
#[inline(always)]
pub const fn jiffies_late(r: &RequestRecord) -> Option<i64> {
    if r.fifo_time != 0 && r.issue_jiffies != 0 {
        Some(r.issue_jiffies.wrapping_sub(r.fifo_time) as i64)
    } else {
        None
    }
}

/// Dispatched in its deadline's own jiffy (met) or the next one (missed): the
/// "tick band", where the label turns on which side of one timer tick (4 ms at
/// HZ=250) the dispatch fell. A saturated mq-deadline serves requests as they
/// expire, so on the saturated mixes 15–42% of requests land here
/// (docs/learning.md, "The tick band"). What is known at insert barely places
/// a dispatch within a tick (the insert's own phase in its jiffy adds at most
/// 1.7 points), so evaluations report the band apart
/// (`kml_learn::evaluate::TickBand`).
#[inline(always)]
pub const fn on_the_tick(r: &RequestRecord) -> bool {
    matches!(jiffies_late(r), Some(0 | 1))
}

/// The request missed the deadline it was given at insert: dispatched after
/// `insert_jiffies` + its direction's expiry in jiffies (what `dd_insert_request()`
/// set `fifo_time` to), whatever happened to `fifo_time` since. A boost by the kml
/// hook sets `fifo_time` to the insert's jiffy and a merge with an older request
/// moves it earlier, and [`missed`] judges that moved deadline; this judges every
/// request against its own, so policies that boost can be compared with stock
/// ("no class misses more of its own deadlines"). The expiry is the one the
/// record carries (`deadline_ns - insert_ns`, sysfs milliseconds), `hz` the
/// kernel's tick rate; without jiffies or HZ, the nanosecond estimate. Host side
/// (divisions).
pub const fn missed_own_deadline(r: &RequestRecord, hz: u64) -> bool {
    let expire_ms = (r.deadline_ns.saturating_sub(r.insert_ns) + 500_000) / 1_000_000;
    let deadline = fifo_time_fallback(r.insert_jiffies, expire_jiffies(expire_ms, hz));
    if deadline != 0 && r.insert_jiffies != 0 && r.issue_jiffies != 0 {
        time_after(r.issue_jiffies, deadline)
    } else {
        r.deadline_missed_ns()
    }
}

/// Classic tracepoint mode's `fifo_time`: what `dd_insert_request()` computes,
/// `jiffies + fifo_expire[dir]`, from the jiffies at the insert tracepoint. 0
/// (unknown) when the expiry in jiffies is unknown.
#[inline(always)]
pub const fn fifo_time_fallback(insert_jiffies: u64, expire_jiffies: u64) -> u64 {
    if expire_jiffies == 0 {
        0
    } else {
        insert_jiffies.wrapping_add(expire_jiffies)
    }
}

/// mq-deadline's `fifo_expire` in jiffies from the milliseconds its sysfs file
/// shows (`jiffies_to_msecs`, which rounds up). For HZ ≤ 1000 the floor of
/// `ms × HZ / 1000` inverts that rounding exactly: `ms` lies in
/// `[j × 1000 / HZ, j × 1000 / HZ + 1)`, so `ms × HZ / 1000` lies in
/// `[j, j + HZ / 1000)`. Host side only (a division); 0 for an unknown HZ.
pub const fn expire_jiffies(ms: u64, hz: u64) -> u64 {
    ms.saturating_mul(hz) / 1000
}

/// The label fed back as a feature: per device and direction, the share of the
/// requests dispatched lately that missed their deadline. The label of a request
/// is known at its issue, so this is causal (it sees only requests dispatched
/// before the insert that reads it) and says what no queue length does: that the
/// scheduler is missing deadlines now. Fixed point, [`MISS_SHARE_ONE`] = all.
///
/// An exponentially weighted average over issues, weight 2^-[`MISS_SHARE_SHIFT`]:
/// `share - share >> k + (missed ? ONE >> k : 0)`. Shifts and adds only; it stays in
/// `0..=ONE` (at `ONE`, a miss keeps it there; below, `share >> k` rounds down, so
/// at most `ONE >> k` is added on top of `share - share >> k ≤ ONE - ONE >> k`).
pub const MISS_SHARE_SHIFT: u32 = 6;
/// The share of [`miss_share_step`] that means "every request missed".
pub const MISS_SHARE_ONE: u32 = 1 << 15;

/// One dispatch into the miss share (see [`MISS_SHARE_SHIFT`]). Used unchanged by
/// the eBPF program at `block_rq_issue` and by the host replay of a trace.
#[inline(always)]
pub const fn miss_share_step(share: u32, missed: bool) -> u32 {
    let share = if share > MISS_SHARE_ONE {
        MISS_SHARE_ONE
    } else {
        share
    };
    let add = if missed {
        MISS_SHARE_ONE >> MISS_SHARE_SHIFT
    } else {
        0
    };
    share - (share >> MISS_SHARE_SHIFT) + add
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(issue_j: u64, fifo: u64) -> RequestRecord {
        RequestRecord {
            insert_ns: 100,
            issue_ns: 200,
            complete_ns: 300,
            // The ns estimate says "met" everywhere below.
            deadline_ns: 1_000,
            insert_jiffies: 10,
            issue_jiffies: issue_j,
            fifo_time: fifo,
            ..Default::default()
        }
    }

    #[test]
    fn the_tick_band_is_the_deadline_jiffy_and_the_next() {
        // fifo_time 12: dispatched at 11 is early, 12 on time in the deadline's
        // own jiffy, 13 one jiffy late, 14 two.
        let late = [11, 12, 13, 14].map(|j| jiffies_late(&rec(j, 12)));
        assert_eq!(late, [Some(-1), Some(0), Some(1), Some(2)]);
        let band = [11, 12, 13, 14].map(|j| on_the_tick(&rec(j, 12)));
        assert_eq!(band, [false, true, true, false]);
        // The band straddles the label: met inside at 12, missed inside at 13.
        assert!(!missed(&rec(12, 12)) && missed(&rec(13, 12)));
        // Across the wrap of jiffies, as the kernel compares them.
        assert_eq!(jiffies_late(&rec(1, u64::MAX)), Some(2));
        assert_eq!(jiffies_late(&rec(u64::MAX, 1)), Some(-2));
        // Without the jiffies there is no band (the ns label judges those).
        assert_eq!(jiffies_late(&rec(0, 12)), None);
        assert_eq!(jiffies_late(&rec(13, 0)), None);
        assert!(!on_the_tick(&rec(13, 0)));
    }

    #[test]
    fn tick_clock_counts_from_the_first_event_of_each_jiffy() {
        let mut c = TickClock::default();
        assert_eq!(c.phase(100, 5_000_000), 0);
        assert_eq!(c.phase(100, 5_000_000 + 1023), 0);
        assert_eq!(c.phase(100, 5_000_000 + 3 * 1024), 3);
        // A new jiffy restarts it.
        assert_eq!(c.phase(101, 8_000_000), 0);
        assert_eq!(c.start_ns, 8_000_000);
        assert_eq!(
            c.phase(101, 8_000_000 + 2_000_000),
            (2_000_000 >> 10) as u16
        );
        // An older clock read restarts rather than underflowing.
        assert_eq!(c.phase(101, 7_000_000), 0);
        // Capped.
        assert_eq!(c.phase(101, 7_000_000 + 60_000_000), TICK_PHASE_MAX);
    }

    #[test]
    fn kernel_time_comparisons_wrap() {
        assert!(time_after(5, 4) && !time_after(4, 4) && !time_after(3, 4));
        assert!(time_after_eq(4, 4) && time_after_eq(5, 4) && !time_after_eq(3, 4));
        // Across the wrap: 2 is after u64::MAX - 1.
        assert!(time_after(2, u64::MAX - 1) && !time_after(u64::MAX - 1, 2));
        assert!(time_after_eq(0, u64::MAX));
    }

    #[test]
    fn missed_means_dispatched_after_fifo_time() {
        // In the deadline's jiffy: on time; one jiffy later: missed.
        assert!(!missed(&rec(14, 14)));
        assert!(missed(&rec(15, 14)));
        assert!(!missed(&rec(11, 14)));
        // The scheduler's label wins over the ns estimate both ways.
        let mut r = rec(15, 14);
        r.deadline_ns = 10_000;
        assert!(!r.deadline_missed_ns() && r.deadline_missed());
        let mut r = rec(12, 14);
        r.issue_ns = 20_000;
        assert!(r.deadline_missed_ns() && !r.deadline_missed());
        // A head insert (fifo_time = jiffies at insert) dispatched in a later jiffy.
        assert!(missed(&rec(11, 10)));
        // Jiffies that wrap.
        assert!(missed(&rec(1, u64::MAX)));
        assert!(!missed(&rec(u64::MAX, 1)));
    }

    #[test]
    fn unknown_jiffies_fall_back_to_ns() {
        let mut r = rec(0, 14);
        r.issue_ns = 2_000;
        assert!(missed(&r), "never issued: ns rule");
        let mut r = rec(20, 0);
        assert!(!missed(&r), "unknown fifo_time: ns rule");
        r.issue_ns = 1_001;
        assert!(missed(&r));
    }

    #[test]
    fn own_deadline_ignores_a_boost() {
        // read_expire 100 ms at HZ 250: 25 jiffies; inserted at jiffy 1000.
        let at = |issue_j: u64, fifo: u64| RequestRecord {
            insert_ns: 5_000_000_000,
            issue_ns: 5_000_000_000 + (issue_j - 1000) * 4_000_000,
            deadline_ns: 5_100_000_000,
            insert_jiffies: 1000,
            issue_jiffies: issue_j,
            fifo_time: fifo,
            ..Default::default()
        };
        // Boosted (fifo_time = the insert's jiffy), dispatched 10 jiffies later:
        // the scheduler's label says missed, its own deadline was met.
        let boosted = at(1010, 1000);
        assert!(missed(&boosted) && !missed_own_deadline(&boosted, 250));
        // Unboosted: both agree, on either side of the deadline.
        for (issue, late) in [(1025, false), (1026, true)] {
            let r = at(issue, 1025);
            assert_eq!(missed(&r), late);
            assert_eq!(missed_own_deadline(&r, 250), late, "issued at {issue}");
        }
        assert!(missed_own_deadline(&at(1026, 1000), 250));
        // Unknown HZ: the nanosecond estimate (26 jiffies = 104 ms > 100 ms).
        assert!(missed_own_deadline(&at(1026, 1025), 0));
        assert!(!missed_own_deadline(&at(1010, 1000), 0));
    }

    #[test]
    fn fallback_fifo_time_and_expiry_in_jiffies() {
        assert_eq!(fifo_time_fallback(1_000, 125), 1_125);
        assert_eq!(fifo_time_fallback(1_000, 0), 0);
        assert_eq!(fifo_time_fallback(u64::MAX, 2), 1);
        // sysfs shows jiffies_to_msecs(j) (rounded up); the floor inverts it.
        for hz in [100u64, 250, 300, 1000] {
            for j in 1..5000u64 {
                let ms = (j * 1000).div_ceil(hz);
                assert_eq!(expire_jiffies(ms, hz), j, "HZ {hz} j {j}");
            }
        }
        assert_eq!(expire_jiffies(500, 250), 125);
        assert_eq!(expire_jiffies(1, 250), 0);
        assert_eq!(expire_jiffies(500, 0), 0);
    }

    #[test]
    fn miss_share_stays_in_range_and_follows_the_misses() {
        let mut share = 0;
        for _ in 0..2_000 {
            share = miss_share_step(share, true);
            assert!(share <= MISS_SHARE_ONE);
        }
        // All missed: within one step of ONE (the floor of the shift).
        assert!(
            share > MISS_SHARE_ONE - (MISS_SHARE_ONE >> MISS_SHARE_SHIFT),
            "{share}"
        );
        // Half missed, alternating: near half.
        for i in 0..2_000 {
            share = miss_share_step(share, i % 2 == 0);
        }
        let half = MISS_SHARE_ONE / 2;
        assert!(share.abs_diff(half) < MISS_SHARE_ONE / 16, "{share}");
        // None missed: down to the floor the rounding leaves (below 2^k).
        for _ in 0..2_000 {
            share = miss_share_step(share, false);
        }
        assert!(share < 1 << MISS_SHARE_SHIFT, "{share}");
        // Out-of-range input (a corrupt record) is clamped first.
        assert!(miss_share_step(u32::MAX, true) <= MISS_SHARE_ONE);
        // The newest dispatch weighs 2^-k.
        assert_eq!(miss_share_step(0, true), MISS_SHARE_ONE >> MISS_SHARE_SHIFT);
    }

    /// The issue program writes the share only when a step changes it: where
    /// nothing has missed lately (the common case), or everything has, no step
    /// does, so the dispatch path takes no locked write there.
    #[test]
    fn a_quiet_or_saturated_share_is_left_as_it_is() {
        // Decayed to its floor with no misses: every further step is a no-op.
        let mut share = MISS_SHARE_ONE;
        for _ in 0..2_000 {
            share = miss_share_step(share, false);
        }
        for s in 0..share.max(1) {
            assert_eq!(miss_share_step(s, false), s, "{s}");
        }
        assert_eq!(miss_share_step(share, false), share);
        // Saturated: a miss keeps it at ONE.
        assert_eq!(miss_share_step(MISS_SHARE_ONE, true), MISS_SHARE_ONE);
        // Anywhere else a step moves it (so a skipped write never drops one).
        for s in (1 << MISS_SHARE_SHIFT)..=MISS_SHARE_ONE {
            assert_ne!(miss_share_step(s, false), s, "{s}");
        }
        for s in 0..MISS_SHARE_ONE {
            assert_ne!(miss_share_step(s, true), s, "{s}");
        }
    }
}
