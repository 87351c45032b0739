//! The feature vector: what a model sees of a request, computed at `block_rq_insert`.
//!
//! One definition for both sides: the eBPF program calls [`features_at_insert`] on the
//! [`RequestRecord`] it has just filled in at insert, and the host calls the same
//! function on a record read back from a trace. Only fields that are final at insert
//! are read (see [`INSERT_TIME_FIELDS`]), so both compute the same vector bit for bit.
//!
//! Everything is an integer, computed with shifts, masks, compares, saturation and a
//! few multiplies (one product, one per logarithm's bit count): no floats, no division, no loop. Times are in "µs" of 1024 ns
//! (`ns >> 10`): a shift where a division by 1000 would be needed, 2.4% off a real
//! microsecond. Load relative to the deadline budget is a difference of fixed-point
//! logarithms ([`log_ratio_8`]), a ratio without a division. Scaling to a common
//! range is the model's job ([`crate::model::LinearModel`] carries learned offsets and
//! clip bounds), so the raw features keep natural units that `bpftool` dumps can be
//! read in.
//!
//! Cost (BPF, `kml-learn/bpf-bench`'s `bench_features` less `bench_empty`, session 28,
//! Linux 6.18): about 350 instructions, 12-15 ns. The position lanes cost more: their
//! queue state is kept at every insert and dispatch ([`crate::position`]). Which
//! features earned their place, and the evaluation behind it: `docs/learning.md`.

pub use crate::logscale::{
    bit_length, log2_8, log_ratio_8, LOG2_8_MAX, LOG_RATIO_MAX, LOG_RATIO_ONE,
};
use crate::{
    label::{MISS_SHARE_ONE, TICK_PHASE_MAX},
    logscale::log_ratio_of_logs,
    op::Direction,
    position::{PositionFeatures, COUNT_MAX, DUE_NONE},
    record::RequestRecord,
};

/// Number of features every model slot is laid out for.
pub const NUM_FEATURES: usize = 26;

/// One request's features, in [`Feature`] order.
pub type FeatureVector = [i32; NUM_FEATURES];

/// Time features are in units of `1 << TIME_SHIFT` ns ("µs").
pub const TIME_SHIFT: u32 = 10;

/// Cap of the deadline budget (in "µs", about 18 minutes): keeps
/// `budget << out_shift` of the regression verdict inside i64 (see
/// [`crate::model::MAX_OUT_SHIFT`]).
pub const BUDGET_MAX: i32 = 1 << 30;

/// The features, in vector order. The discriminant is the index.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// Start sector in MiB (`sector >> 11`): KML's block number; the model's learned
    /// offset and clip bounds normalise it.
    SectorMib = 0,
    /// KML's operation ordinal: [`crate::op::ReqOp`] as a number (read 0, write 1, …).
    Op = 1,
    /// 1 when mq-deadline queues the request on its write side (every non-read):
    /// reads are served first, writes only every `writes_starved` read batches.
    WriteDir = 2,
    /// Requests queued (inserted, not yet issued) in this request's direction at
    /// insert: the mq-deadline FIFO it joins.
    QueuedSameDir = 3,
    /// Requests queued in the other direction at insert.
    QueuedOtherDir = 4,
    /// Moving average of the insert→issue delay of the requests recently dispatched
    /// in this direction, "µs": how long the queue it joins makes requests wait now.
    DirWaitUs = 5,
    /// Moving average of the time between dispatches on the device, ns (saturated
    /// at `i32::MAX`): how fast the queue drains.
    IssueGapNs = 6,
    /// `queued_same_dir × issue_gap` in "µs" (saturated): the wait if the device
    /// served this direction's FIFO in order at its current pace.
    ExpectedWaitUs = 7,
    /// The direction's wait average relative to this request's deadline budget, on a
    /// log scale: [`log_ratio_8`]`(dir_wait, budget)`, [`LOG_RATIO_ONE`] when equal.
    DirWaitLog = 8,
    /// `queued_same_dir × issue_gap` relative to the budget, on the same log scale.
    ExpectedWaitLog = 9,
    /// Bit length of the distance in sectors from the end of the last issued request.
    IssueDistanceLog2 = 10,
    /// Time from insert to the FIFO deadline (read_expire or write_expire), "µs",
    /// capped at [`BUDGET_MAX`]. The regression verdict compares the predicted delay
    /// with it.
    DeadlineBudgetUs = 11,
    /// Age of the FIFO head against the budget, log scale
    /// ([`PositionFeatures::head_age_log`]): how far behind the queue runs.
    HeadAgeLog = 12,
    /// Queued requests of this direction older than half the budget.
    OlderHalf = 13,
    /// Queued requests of this direction already past the budget.
    Expired = 14,
    /// Queued requests between this one and the nearest due batch start below it
    /// in sector order ([`PositionFeatures::due_below`]; [`DUE_NONE`] if none near).
    DueBelow = 15,
    /// Age of the oldest queued request just below in sector order, log scale.
    BelowAgeLog = 16,
    /// Requests queued in the last eighth to half of a budget (burst onset).
    Recent = 17,
    /// Time until the oldest request within a batch's reach below becomes the
    /// FIFO head, against the budget, log scale ([`PositionFeatures::lead_log`]).
    LeadLog = 18,
    /// Queued requests within reach below that head a batch before this request's
    /// deadline.
    DueCount = 19,
    /// Share of this direction's recent dispatches that missed their deadline
    /// ([`crate::label::miss_share_step`], 0..=[`MISS_SHARE_ONE`]): the label fed
    /// back, known at each issue.
    MissShareSame = 20,
    /// The same for the other direction.
    MissShareOther = 21,
    /// How far into its jiffy the request was inserted, "µs" (1024 ns), capped at
    /// [`TICK_PHASE_MAX`] ([`crate::label::TickClock`]). mq-deadline's deadline is
    /// whole jiffies after the insert's jiffy (`fifo_time`), so a request inserted
    /// late in its jiffy has up to a tick less time (docs/learning.md, "The
    /// insert's phase in its jiffy"). 0 when the record has none.
    TickPhaseUs = 22,
    /// [`Feature::OlderHalf`] as a share of the requests queued in this direction
    /// ([`Feature::QueuedSameDir`]), on the log scale of [`log_ratio_8`]: 256 when
    /// every one is older than half the budget, −8 per halving; 0 when none is
    /// ([`count_share_log`]). The count grows with the queue's depth, the share
    /// does not: a tree trained on shallow queues reads it alike on deep ones
    /// (docs/learning.md, "Counts that grow with the depth").
    OlderHalfShare = 23,
    /// [`Feature::Expired`] as a share of the queued requests, the same way.
    ExpiredShare = 24,
    /// [`Feature::DueCount`] as a share of the queued requests, the same way.
    DueCountShare = 25,
}

impl Feature {
    /// All features in vector order.
    pub const ALL: [Feature; NUM_FEATURES] = [
        Feature::SectorMib,
        Feature::Op,
        Feature::WriteDir,
        Feature::QueuedSameDir,
        Feature::QueuedOtherDir,
        Feature::DirWaitUs,
        Feature::IssueGapNs,
        Feature::ExpectedWaitUs,
        Feature::DirWaitLog,
        Feature::ExpectedWaitLog,
        Feature::IssueDistanceLog2,
        Feature::DeadlineBudgetUs,
        Feature::HeadAgeLog,
        Feature::OlderHalf,
        Feature::Expired,
        Feature::DueBelow,
        Feature::BelowAgeLog,
        Feature::Recent,
        Feature::LeadLog,
        Feature::DueCount,
        Feature::MissShareSame,
        Feature::MissShareOther,
        Feature::TickPhaseUs,
        Feature::OlderHalfShare,
        Feature::ExpiredShare,
        Feature::DueCountShare,
    ];

    /// The position state's counts as shares of the queue: derived from three of
    /// [`Feature::POSITION`] and the queued count, so they too need the state.
    pub const POSITION_SHARES: [Feature; 3] = [
        Feature::OlderHalfShare,
        Feature::ExpiredShare,
        Feature::DueCountShare,
    ];

    /// The features that describe the request's position in the queue
    /// ([`crate::position`]).
    pub const POSITION: [Feature; 8] = {
        // The last eight of ALL (from HeadAgeLog on).
        let mut out = [Feature::HeadAgeLog; 8];
        let mut i = 0;
        while i < 8 {
            out[i] = Feature::ALL[Feature::HeadAgeLog as usize + i];
            i += 1;
        }
        out
    };

    /// A feature read from the position state: one of [`Feature::POSITION`] (the
    /// lanes a record keeps) or of [`Feature::POSITION_SHARES`] (derived from them).
    /// Without the state (classic tracepoints) a model must not read one.
    pub const fn is_position(self) -> bool {
        // Position features are contiguous from HeadAgeLog, the shares from
        // OlderHalfShare to the end (checked by a test).
        ((self as u8) >= (Feature::HeadAgeLog as u8) && (self as u8) <= (Feature::DueCount as u8))
            || (self as u8) >= (Feature::OlderHalfShare as u8)
    }

    /// The kernel computes this feature (a position feature only once the eBPF
    /// side keeps the state: [`crate::position::KERNEL_COMPUTES_POSITION`]).
    pub const fn in_kernel(self) -> bool {
        !self.is_position() || crate::position::KERNEL_COMPUTES_POSITION
    }

    /// Position in a [`FeatureVector`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name used in model files and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Feature::SectorMib => "sector_mib",
            Feature::Op => "op",
            Feature::WriteDir => "write_dir",
            Feature::QueuedSameDir => "queued_same_dir",
            Feature::QueuedOtherDir => "queued_other_dir",
            Feature::DirWaitUs => "dir_wait_us",
            Feature::IssueGapNs => "issue_gap_ns",
            Feature::ExpectedWaitUs => "expected_wait_us",
            Feature::DirWaitLog => "dir_wait_log",
            Feature::ExpectedWaitLog => "expected_wait_log",
            Feature::IssueDistanceLog2 => "issue_distance_log2",
            Feature::DeadlineBudgetUs => "deadline_budget_us",
            Feature::HeadAgeLog => "head_age_log",
            Feature::OlderHalf => "older_half",
            Feature::Expired => "expired",
            Feature::DueBelow => "due_below",
            Feature::BelowAgeLog => "below_age_log",
            Feature::Recent => "recent",
            Feature::LeadLog => "lead_log",
            Feature::DueCount => "due_count",
            Feature::MissShareSame => "miss_share_same",
            Feature::MissShareOther => "miss_share_other",
            Feature::TickPhaseUs => "tick_phase_us",
            Feature::OlderHalfShare => "older_half_share",
            Feature::ExpiredShare => "expired_share",
            Feature::DueCountShare => "due_count_share",
        }
    }

    /// Largest value [`features_at_insert`] produces for this feature (the smallest is 0).
    pub const fn max_value(self) -> i32 {
        match self {
            Feature::Op => 6,
            Feature::WriteDir => 1,
            Feature::IssueDistanceLog2 => 64,
            Feature::DirWaitLog
            | Feature::ExpectedWaitLog
            | Feature::HeadAgeLog
            | Feature::BelowAgeLog
            | Feature::LeadLog
            | Feature::OlderHalfShare
            | Feature::ExpiredShare
            | Feature::DueCountShare => LOG_RATIO_MAX,
            Feature::OlderHalf | Feature::Expired | Feature::Recent | Feature::DueCount => {
                COUNT_MAX
            }
            Feature::DueBelow => DUE_NONE,
            Feature::DeadlineBudgetUs => BUDGET_MAX,
            Feature::MissShareSame | Feature::MissShareOther => MISS_SHARE_ONE as i32,
            Feature::TickPhaseUs => TICK_PHASE_MAX as i32,
            Feature::SectorMib
            | Feature::QueuedSameDir
            | Feature::QueuedOtherDir
            | Feature::DirWaitUs
            | Feature::IssueGapNs
            | Feature::ExpectedWaitUs => i32::MAX,
        }
    }

    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// KML's two features: normalised block number and operation ordinal. The baseline
/// model is a linear regression on exactly these.
pub const KML_BASELINE_FEATURES: [Feature; 2] = [Feature::SectorMib, Feature::Op];

/// The [`RequestRecord`] fields [`features_at_insert`] reads: all final when
/// `block_rq_insert` has run (`nr_sectors` is not read).
pub const INSERT_TIME_FIELDS: &[&str] = &[
    "sector",
    "op",
    "insert_ns",
    "deadline_ns",
    "queued_read",
    "queued_write",
    "issue_distance",
    "dir_wait_ewma_ns",
    "issue_gap_ewma_ns",
    "miss_share_read",
    "miss_share_write",
    "tick_phase",
];

const _: () = assert!(BUDGET_MAX == 1 << 30);

/// Saturating u64 → i32 (values are never negative here): `v` when it is below
/// 2^31, else `i32::MAX`.
#[inline(always)]
pub const fn sat_i32(v: u64) -> i32 {
    if v > i32::MAX as u64 {
        i32::MAX
    } else {
        v as i32
    }
}

/// `count × gap_ns`, the gap saturated to 32 bits first so that the product of two
/// values below 2^32 cannot overflow u64. One multiply, no division.
#[inline(always)]
pub const fn drain_time_ns(count: u32, gap_ns: u64) -> u64 {
    let gap = if gap_ns > u32::MAX as u64 {
        u32::MAX as u64
    } else {
        gap_ns
    };
    (count as u64) * gap
}

/// `count` as a share of `queued` on the log scale of [`log_ratio_8`] (256 when
/// equal, −8 per halving, clamped to `0..=LOG_RATIO_MAX`), from `queued`'s
/// logarithm computed once; 0 when `count` is 0, so that no count reads as more
/// than some. One logarithm, no division.
#[inline(always)]
pub fn count_share_log(count: i32, log_queued: i32) -> i32 {
    if count <= 0 {
        0
    } else {
        log_ratio_of_logs(log2_8(count as u64), log_queued)
    }
}

/// The feature vector of a request as known at insert, without position state
/// (the position features are [`PositionFeatures::UNKNOWN`]): what a kernel that
/// keeps no [`crate::position::QueueShape`] computes.
#[inline(always)]
pub fn features_at_insert(r: &RequestRecord) -> FeatureVector {
    features_with_position(r, &PositionFeatures::UNKNOWN)
}

/// The feature vector the programs computed for a finished record: with the
/// position it recorded at insert, [`PositionFeatures::UNKNOWN`] when it has none
/// (a trace without those columns: replay it, `kml_learn::replay`).
#[inline(always)]
pub fn features_of_record(r: &RequestRecord) -> FeatureVector {
    features_with_position(
        r,
        &r.recorded_position().unwrap_or(PositionFeatures::UNKNOWN),
    )
}

/// The feature vector of a request as known at insert. Used unchanged by the eBPF
/// program (on the record it filled in at insert, and the position it took from its
/// direction's [`crate::position::QueueShape`] before adding the request) and by the
/// host (on a trace record, with the position replayed or recorded). Integer only:
/// shifts, masks, adds, compares, two multiplies (one 32×32→64-bit product, and one
/// per logarithm's bit count); no division, no loop.
#[inline(always)]
pub fn features_with_position(r: &RequestRecord, p: &PositionFeatures) -> FeatureVector {
    let op = r.op();
    let write = op.direction() == Direction::Write;
    let (queued_same, queued_other) = if write {
        (r.queued_write, r.queued_read)
    } else {
        (r.queued_read, r.queued_write)
    };
    let (miss_same, miss_other) = if write {
        (r.miss_share_write, r.miss_share_read)
    } else {
        (r.miss_share_read, r.miss_share_write)
    };
    let budget_ns = r.deadline_ns.saturating_sub(r.insert_ns);
    let budget_us = budget_ns >> TIME_SHIFT;
    let budget = if budget_us > BUDGET_MAX as u64 {
        BUDGET_MAX
    } else {
        budget_us as i32
    };
    let log_budget = log2_8(budget_ns);
    let expected_ns = drain_time_ns(queued_same, r.issue_gap_ewma_ns);
    let log_queued = log2_8(queued_same as u64);

    // Written as one literal in `Feature` order (checked by a test), so no index can
    // be out of bounds.
    [
        sat_i32(r.sector >> 11),
        op as i32,
        write as i32,
        sat_i32(queued_same as u64),
        sat_i32(queued_other as u64),
        sat_i32(r.dir_wait_ewma_ns >> TIME_SHIFT),
        sat_i32(r.issue_gap_ewma_ns),
        sat_i32(expected_ns >> TIME_SHIFT),
        log_ratio_of_logs(log2_8(r.dir_wait_ewma_ns), log_budget),
        log_ratio_of_logs(log2_8(expected_ns), log_budget),
        bit_length(r.issue_distance),
        budget,
        clamp_to(p.head_age_log, LOG_RATIO_MAX),
        clamp_to(p.older_half, COUNT_MAX),
        clamp_to(p.expired, COUNT_MAX),
        clamp_to(p.due_below, DUE_NONE),
        clamp_to(p.below_age_log, LOG_RATIO_MAX),
        clamp_to(p.recent, COUNT_MAX),
        clamp_to(p.lead_log, LOG_RATIO_MAX),
        clamp_to(p.due_count, COUNT_MAX),
        clamp_to(miss_same as i32, MISS_SHARE_ONE as i32),
        clamp_to(miss_other as i32, MISS_SHARE_ONE as i32),
        clamp_to(r.tick_phase as i32, TICK_PHASE_MAX as i32),
        count_share_log(p.older_half, log_queued),
        count_share_log(p.expired, log_queued),
        count_share_log(p.due_count, log_queued),
    ]
}

/// `v` clamped to `0..=max` (position values come from a record: keep every
/// feature inside its declared range whatever the record holds).
#[inline(always)]
const fn clamp_to(v: i32, max: i32) -> i32 {
    if v < 0 {
        0
    } else if v > max {
        max
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::ReqOp;

    /// A record as the eBPF program has it right after insert: nothing from issue or
    /// completion yet.
    fn at_insert() -> RequestRecord {
        RequestRecord {
            sector: 5 << 11 | 7,
            insert_ns: 1_000_000,
            deadline_ns: 1_000_000 + 8_000_000,
            since_last_insert_ns: 3 << 10,
            issue_distance: 9,
            dir_wait_ewma_ns: 16_000_000,
            issue_gap_ewma_ns: 10_000,
            dev: crate::kernel_dev(7, 1),
            nr_sectors: 16,
            pid: 42,
            inflight_read: 3,
            inflight_write: 11,
            queued_read: 4,
            queued_write: 200,
            ioprio: 2 << 13 | 4,
            op: ReqOp::Write as u8,
            flags: crate::op::ReqFlags::SYNC,
            tick_phase: 2900,
            known: crate::record::Known::TICK_PHASE,
            ..Default::default()
        }
    }

    #[test]
    fn names_and_indices_agree() {
        for (i, f) in Feature::ALL.iter().enumerate() {
            assert_eq!(f.index(), i, "{}", f.name());
            assert_eq!(Feature::from_name(f.name()), Some(*f));
        }
        assert_eq!(Feature::from_name("nope"), None);
        // The position features are contiguous from HeadAgeLog, in
        // PositionFeatures order.
        let from = Feature::HeadAgeLog.index();
        assert_eq!(
            &Feature::ALL[from..from + Feature::POSITION.len()],
            Feature::POSITION
        );
        for f in Feature::ALL {
            assert_eq!(
                f.is_position(),
                Feature::POSITION.contains(&f) || Feature::POSITION_SHARES.contains(&f),
                "{}",
                f.name()
            );
        }
    }

    #[test]
    fn values_of_a_known_record() {
        let x = features_at_insert(&at_insert());
        let get = |f: Feature| x[f.index()];
        assert_eq!(get(Feature::SectorMib), 5);
        assert_eq!(get(Feature::Op), 1);
        assert_eq!(get(Feature::WriteDir), 1);
        assert_eq!(get(Feature::QueuedSameDir), 200);
        assert_eq!(get(Feature::QueuedOtherDir), 4);
        assert_eq!(get(Feature::DirWaitUs), 16_000_000 >> 10);
        assert_eq!(get(Feature::IssueGapNs), 10_000);
        // 200 × 10 µs = 2 ms.
        assert_eq!(get(Feature::ExpectedWaitUs), 2_000_000 >> 10);
        // Twice the budget: one doubling above LOG_RATIO_ONE (16e6 and 8e6 have the
        // same mantissa bits, so exactly 8).
        assert_eq!(get(Feature::DirWaitLog), LOG_RATIO_ONE + 8);
        // A quarter of the budget: two doublings below.
        assert_eq!(get(Feature::ExpectedWaitLog), LOG_RATIO_ONE - 16);
        assert_eq!(get(Feature::IssueDistanceLog2), 4);
        assert_eq!(get(Feature::DeadlineBudgetUs), 8_000_000 >> 10);
        assert_eq!(get(Feature::TickPhaseUs), 2900);

        // A read sees the read side as its own.
        let mut r = at_insert();
        r.op = ReqOp::Read as u8;
        let x = features_at_insert(&r);
        assert_eq!(
            (x[Feature::Op.index()], x[Feature::WriteDir.index()]),
            (0, 0)
        );
        assert_eq!(x[Feature::QueuedSameDir.index()], 4);
        assert_eq!(x[Feature::QueuedOtherDir.index()], 200);
        assert_eq!(x[Feature::ExpectedWaitUs.index()], 40_000 >> 10);
    }

    #[test]
    fn counts_as_shares_of_the_queue() {
        // 200 queued on the write side: 100 older than half the budget (half: one
        // doubling below 256), 25 expired (three), none due within reach.
        let p = PositionFeatures {
            older_half: 100,
            expired: 25,
            due_count: 0,
            ..PositionFeatures::UNKNOWN
        };
        let x = features_with_position(&at_insert(), &p);
        let get = |f: Feature| x[f.index()];
        assert_eq!(get(Feature::OlderHalfShare), LOG_RATIO_ONE - 8);
        assert_eq!(get(Feature::ExpiredShare), LOG_RATIO_ONE - 24);
        assert_eq!(get(Feature::DueCountShare), 0);
        // The same shares of a queue ten times as deep read the same (within the
        // log scale's ±2); the counts themselves do not.
        let mut deep = at_insert();
        deep.queued_write = 2000;
        let q = PositionFeatures {
            older_half: 1000,
            expired: 250,
            ..p
        };
        let y = features_with_position(&deep, &q);
        for f in [Feature::OlderHalfShare, Feature::ExpiredShare] {
            assert!((y[f.index()] - x[f.index()]).abs() <= 2, "{}", f.name());
        }
        assert_ne!(y[Feature::OlderHalf.index()], x[Feature::OlderHalf.index()]);
        // Without position state the shares say nothing: 0, whatever the depth.
        let none = features_at_insert(&deep);
        for f in Feature::POSITION_SHARES {
            assert_eq!(none[f.index()], 0, "{}", f.name());
            assert!(f.is_position());
        }
        // A count above the queued one (the two are kept by different counters)
        // stays inside the declared range.
        let over = PositionFeatures {
            older_half: COUNT_MAX,
            ..p
        };
        let mut empty = at_insert();
        empty.queued_write = 0;
        let z = features_with_position(&empty, &over);
        let share = z[Feature::OlderHalfShare.index()];
        assert!(share > LOG_RATIO_ONE && share <= LOG_RATIO_MAX, "{share}");
    }

    #[test]
    fn only_insert_time_fields_matter() {
        // What the kernel computes at insert equals what the host computes from the
        // finished record (issue, completion, error, requeues, verdict filled in later).
        let kernel = features_at_insert(&at_insert());
        let mut done = at_insert();
        done.issue_ns = 9_000_000;
        done.complete_ns = 9_500_000;
        done.error = -5;
        done.requeues = 2;
        done.pid = 7;
        done.score = -3;
        done.verdict = crate::Verdict::AT_RISK;
        done.model_version = 4;
        done.dev = crate::kernel_dev(8, 0);
        assert_eq!(features_at_insert(&done), kernel);
    }

    #[test]
    fn extremes_saturate_within_declared_ranges() {
        let r = RequestRecord {
            sector: u64::MAX,
            insert_ns: 0,
            deadline_ns: u64::MAX,
            since_last_insert_ns: u64::MAX,
            issue_distance: u64::MAX,
            dir_wait_ewma_ns: u64::MAX,
            issue_gap_ewma_ns: u64::MAX,
            nr_sectors: u32::MAX,
            inflight_read: u32::MAX,
            inflight_write: u32::MAX,
            queued_read: u32::MAX,
            queued_write: u32::MAX,
            ioprio: u16::MAX,
            op: u8::MAX,
            flags: u8::MAX,
            tick_phase: u16::MAX,
            ..Default::default()
        };
        let zero = RequestRecord {
            insert_ns: 10,
            deadline_ns: 5,
            ..Default::default()
        };
        for x in [features_at_insert(&r), features_at_insert(&zero)] {
            for f in Feature::ALL {
                let v = x[f.index()];
                assert!((0..=f.max_value()).contains(&v), "{} = {v}", f.name());
            }
        }
        let x = features_at_insert(&r);
        assert_eq!(x[Feature::DeadlineBudgetUs.index()], BUDGET_MAX);
        assert_eq!(x[Feature::ExpectedWaitUs.index()], i32::MAX);
        assert_eq!(x[Feature::IssueGapNs.index()], i32::MAX);
        // A phase past the cap (not one `TickClock` writes) reads as the cap.
        assert_eq!(x[Feature::TickPhaseUs.index()], TICK_PHASE_MAX as i32);
        let x = features_at_insert(&zero);
        assert_eq!(x[Feature::DeadlineBudgetUs.index()], 0);
        // No wait against no budget: equal.
        assert_eq!(x[Feature::DirWaitLog.index()], LOG_RATIO_ONE);
    }

    #[test]
    fn drain_time_cannot_overflow() {
        assert_eq!(
            drain_time_ns(u32::MAX, u64::MAX),
            u32::MAX as u64 * u32::MAX as u64
        );
        assert_eq!(drain_time_ns(0, u64::MAX), 0);
        assert_eq!(drain_time_ns(3, 7), 21);
    }
}
