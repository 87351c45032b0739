//! The feature vector: what a model sees of a request, computed at `block_rq_insert`.
//!
//! One definition for both sides: the eBPF program calls [`features_at_insert`] on the
//! [`RequestRecord`] it has just filled in at insert, and the host calls the same
//! function on a record read back from a trace. Only fields that are final at insert
//! are read (see [`INSERT_TIME_FIELDS`]), so both compute the same vector bit for bit.
//!
//! Everything is an integer, computed with shifts, compares and saturation only: no
//! floats, no division. Times are in "µs" of 1024 ns (`ns >> 10`): a shift where a
//! division by 1000 would be needed, 2.4% off a real microsecond. Scaling to a common
//! range is the model's job ([`crate::model::LinearModel`] carries learned offsets and
//! clip bounds), so the raw features keep natural units that `bpftool` dumps can be
//! read in.

use crate::{op::ReqFlags, op::Direction, record::RequestRecord};

/// Number of features every model slot is laid out for.
pub const NUM_FEATURES: usize = 22;

/// One request's features, in [`Feature`] order.
pub type FeatureVector = [i32; NUM_FEATURES];

/// Time features are in units of `1 << TIME_SHIFT` ns ("µs").
pub const TIME_SHIFT: u32 = 10;

/// Cap of the deadline budget (in "µs", about 18 minutes): keeps
/// `budget << out_shift` of the regression verdict inside i64 (see
/// [`crate::model::MAX_OUT_SHIFT`]).
pub const BUDGET_MAX: i32 = 1 << 30;

/// Ratio features are in units of 1/256 of the deadline budget.
pub const RATIO_SHIFT: u32 = 8;
/// Cap of the ratio features: 256 budgets.
pub const RATIO_MAX: i32 = 1 << 16;

/// The features, in vector order. The discriminant is the index.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// Start sector in MiB (`sector >> 11`): KML's block number; the model's learned
    /// offset and clip bounds normalise it.
    SectorMib = 0,
    /// KML's operation ordinal: [`crate::op::ReqOp`] as a number (read 0, write 1, …).
    Op = 1,
    /// Request size at insert in KiB (`nr_sectors >> 1`).
    SizeKib = 2,
    /// 1 when mq-deadline counts the request on its write side (every non-read).
    WriteDir = 3,
    /// Requests queued (inserted, not issued) in this request's direction at insert:
    /// the length of the mq-deadline FIFO it joins.
    QueuedSameDir = 4,
    /// Requests queued in the other direction at insert.
    QueuedOtherDir = 5,
    /// Requests in flight (inserted, not completed) in this request's direction.
    InflightSameDir = 6,
    /// Requests in flight in the other direction.
    InflightOtherDir = 7,
    /// Moving average of the insert→issue delay of requests recently dispatched in
    /// this direction, "µs": how long the queue it joins makes requests wait now.
    DirWaitUs = 8,
    /// Moving average of the time between dispatches on the device, ns: how fast
    /// the queue drains.
    IssueGapNs = 9,
    /// `queued_same_dir × issue_gap` in "µs": the wait if the device served this
    /// direction's FIFO in order at its current pace.
    ExpectedWaitUs = 10,
    /// `(queued_same_dir + queued_other_dir) × issue_gap` in "µs".
    ExpectedWaitAllUs = 11,
    /// The direction's wait average relative to this request's deadline budget, in
    /// 1/256 (256: the queue makes requests wait exactly the budget).
    DirWaitRatio = 12,
    /// `queued_same_dir × issue_gap` relative to the deadline budget, in 1/256.
    ExpectedWaitRatio = 13,
    /// Bit length of the time since the previous insert in ns (0 for 0): a log scale.
    SinceLastInsertLog2 = 14,
    /// Bit length of the distance in sectors from the end of the last issued request.
    IssueDistanceLog2 = 15,
    /// REQ_SYNC set (0/1).
    Sync = 16,
    /// REQ_META set (0/1).
    Meta = 17,
    /// REQ_FUA set (0/1).
    Fua = 18,
    /// I/O priority class (`ioprio >> 13`: 0 none, 1 RT, 2 BE, 3 idle).
    IoprioClass = 19,
    /// Time from insert to the FIFO deadline (read_expire or write_expire), "µs",
    /// capped at [`BUDGET_MAX`]. The regression verdict compares the predicted delay
    /// with it.
    DeadlineBudgetUs = 20,
    /// Requests issued to the device and not completed at insert (in flight minus
    /// queued, both directions): how busy the device itself is.
    InDevice = 21,
}

impl Feature {
    /// All features in vector order.
    pub const ALL: [Feature; NUM_FEATURES] = [
        Feature::SectorMib,
        Feature::Op,
        Feature::SizeKib,
        Feature::WriteDir,
        Feature::QueuedSameDir,
        Feature::QueuedOtherDir,
        Feature::InflightSameDir,
        Feature::InflightOtherDir,
        Feature::DirWaitUs,
        Feature::IssueGapNs,
        Feature::ExpectedWaitUs,
        Feature::ExpectedWaitAllUs,
        Feature::DirWaitRatio,
        Feature::ExpectedWaitRatio,
        Feature::SinceLastInsertLog2,
        Feature::IssueDistanceLog2,
        Feature::Sync,
        Feature::Meta,
        Feature::Fua,
        Feature::IoprioClass,
        Feature::DeadlineBudgetUs,
        Feature::InDevice,
    ];

    /// Position in a [`FeatureVector`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name used in model files and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Feature::SectorMib => "sector_mib",
            Feature::Op => "op",
            Feature::SizeKib => "size_kib",
            Feature::WriteDir => "write_dir",
            Feature::QueuedSameDir => "queued_same_dir",
            Feature::QueuedOtherDir => "queued_other_dir",
            Feature::InflightSameDir => "inflight_same_dir",
            Feature::InflightOtherDir => "inflight_other_dir",
            Feature::DirWaitUs => "dir_wait_us",
            Feature::IssueGapNs => "issue_gap_ns",
            Feature::ExpectedWaitUs => "expected_wait_us",
            Feature::ExpectedWaitAllUs => "expected_wait_all_us",
            Feature::DirWaitRatio => "dir_wait_ratio",
            Feature::ExpectedWaitRatio => "expected_wait_ratio",
            Feature::SinceLastInsertLog2 => "since_last_insert_log2",
            Feature::IssueDistanceLog2 => "issue_distance_log2",
            Feature::Sync => "sync",
            Feature::Meta => "meta",
            Feature::Fua => "fua",
            Feature::IoprioClass => "ioprio_class",
            Feature::DeadlineBudgetUs => "deadline_budget_us",
            Feature::InDevice => "in_device",
        }
    }

    /// Largest value [`features_at_insert`] produces for this feature (the smallest is 0).
    pub const fn max_value(self) -> i32 {
        match self {
            Feature::Op => 6,
            Feature::SinceLastInsertLog2 | Feature::IssueDistanceLog2 => 64,
            Feature::Sync | Feature::Meta | Feature::Fua | Feature::WriteDir => 1,
            Feature::IoprioClass => 7,
            Feature::DeadlineBudgetUs => BUDGET_MAX,
            Feature::DirWaitRatio | Feature::ExpectedWaitRatio => RATIO_MAX,
            _ => i32::MAX,
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
/// `block_rq_insert` has run (`nr_sectors` is the size at insert).
pub const INSERT_TIME_FIELDS: &[&str] = &[
    "sector",
    "nr_sectors",
    "op",
    "flags",
    "ioprio",
    "insert_ns",
    "deadline_ns",
    "inflight_read",
    "inflight_write",
    "queued_read",
    "queued_write",
    "since_last_insert_ns",
    "issue_distance",
    "dir_wait_ewma_ns",
    "issue_gap_ewma_ns",
];

/// Saturating u64 → i32 (values are never negative here).
#[inline(always)]
const fn sat_i32(v: u64) -> i32 {
    if v > i32::MAX as u64 {
        i32::MAX
    } else {
        v as i32
    }
}

/// Saturating u64 → u32.
#[inline(always)]
const fn sat_u32(v: u64) -> u64 {
    if v > u32::MAX as u64 {
        u32::MAX as u64
    } else {
        v
    }
}

/// `count × gap_ns` in ns, both saturated to 32 bits first, so the product cannot
/// overflow u64.
#[inline(always)]
pub const fn drain_time_ns(count: u32, gap_ns: u64) -> u64 {
    (count as u64) * sat_u32(gap_ns)
}

/// `num / den` in units of `2^-RATIO_SHIFT`, capped at [`RATIO_MAX`]; [`RATIO_MAX`]
/// when `den` is 0. Unsigned division only (BPF's `div` is unsigned).
#[inline(always)]
pub const fn ratio(num: u64, den: u64) -> i32 {
    // A numerator above 2^48 is beyond the cap for any den < 2^32 ns (4 s); keeping
    // it below 2^48 keeps the shift inside u64.
    let num = if num > 1 << 48 { 1 << 48 } else { num };
    match (num << RATIO_SHIFT).checked_div(den) {
        Some(q) if q < RATIO_MAX as u64 => q as i32,
        _ => RATIO_MAX,
    }
}

/// Number of significant bits of `v` (0 for 0, 64 for `1 << 63`): a binary search of
/// six compares, since BPF has no count-leading-zeros instruction.
#[inline(always)]
pub const fn bit_length(v: u64) -> i32 {
    let mut v = v;
    let mut n = 0;
    if v >= 1 << 32 {
        v >>= 32;
        n += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        n += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        n += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        n += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        n += 2;
    }
    if v >= 1 << 1 {
        v >>= 1;
        n += 1;
    }
    // v is now 0 or 1.
    n + v as i32
}

/// The feature vector of a request as known at insert. Used unchanged by the eBPF
/// program (on the record it filled in at insert) and by the host (on a trace record).
#[inline(always)]
pub fn features_at_insert(r: &RequestRecord) -> FeatureVector {
    let flags = ReqFlags(r.flags);
    let op = r.op();
    let write = matches!(op.direction(), Direction::Write);
    let (queued_same, queued_other, inflight_same, inflight_other) = if write {
        (r.queued_write, r.queued_read, r.inflight_write, r.inflight_read)
    } else {
        (r.queued_read, r.queued_write, r.inflight_read, r.inflight_write)
    };
    let budget_ns = r.deadline_ns.saturating_sub(r.insert_ns);
    let budget = budget_ns >> TIME_SHIFT;
    let budget = if budget > BUDGET_MAX as u64 { BUDGET_MAX } else { budget as i32 };
    let expected_ns = drain_time_ns(queued_same, r.issue_gap_ewma_ns);
    let expected_all_ns = drain_time_ns(queued_same.saturating_add(queued_other), r.issue_gap_ewma_ns);

    // Written as one literal in `Feature` order (checked by a test), so no index can
    // be out of bounds.
    [
        sat_i32(r.sector >> 11),
        op as i32,
        sat_i32((r.nr_sectors >> 1) as u64),
        write as i32,
        sat_i32(queued_same as u64),
        sat_i32(queued_other as u64),
        sat_i32(inflight_same as u64),
        sat_i32(inflight_other as u64),
        sat_i32(r.dir_wait_ewma_ns >> TIME_SHIFT),
        sat_i32(r.issue_gap_ewma_ns),
        sat_i32(expected_ns >> TIME_SHIFT),
        sat_i32(expected_all_ns >> TIME_SHIFT),
        ratio(r.dir_wait_ewma_ns, budget_ns),
        ratio(expected_ns, budget_ns),
        bit_length(r.since_last_insert_ns),
        bit_length(r.issue_distance),
        flags.contains(ReqFlags::SYNC) as i32,
        flags.contains(ReqFlags::META) as i32,
        flags.contains(ReqFlags::FUA) as i32,
        (r.ioprio >> 13) as i32,
        budget,
        sat_i32(r.inflight().saturating_sub(r.queued()) as u64),
    ]
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
            deadline_ns: 1_000_000 + 5_000_000,
            since_last_insert_ns: 3 << 10,
            issue_distance: 9,
            dev: crate::kernel_dev(7, 1),
            nr_sectors: 16,
            pid: 42,
            inflight_read: 3,
            inflight_write: 11,
            queued_read: 4,
            ioprio: 2 << 13 | 4,
            op: ReqOp::Write as u8,
            flags: ReqFlags::SYNC | ReqFlags::FUA,
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
    }

    #[test]
    fn values_of_a_known_record() {
        let x = features_at_insert(&at_insert());
        let get = |f: Feature| x[f.index()];
        assert_eq!(get(Feature::SectorMib), 5);
        assert_eq!(get(Feature::Op), 1);
        assert_eq!(get(Feature::SizeKib), 8);
        assert_eq!(get(Feature::InflightRead), 3);
        assert_eq!(get(Feature::InflightWrite), 11);
        assert_eq!(get(Feature::InflightSameDir), 11);
        assert_eq!(get(Feature::Queued), 4);
        assert_eq!(get(Feature::SinceLastInsertUs), 3);
        assert_eq!(get(Feature::SinceLastInsertLog2), 12); // 3072 has 12 bits
        assert_eq!(get(Feature::IssueDistanceLog2), 4);
        assert_eq!(get(Feature::Sync), 1);
        assert_eq!(get(Feature::Meta), 0);
        assert_eq!(get(Feature::Fua), 1);
        assert_eq!(get(Feature::IoprioClass), 2);
        assert_eq!(get(Feature::DeadlineBudgetUs), 5_000_000 >> 10);
        assert_eq!(get(Feature::WriteDir), 1);
    }

    #[test]
    fn only_insert_time_fields_matter() {
        // What the kernel computes at insert equals what the host computes from the
        // finished record (issue, completion, error, requeues filled in later).
        let kernel = features_at_insert(&at_insert());
        let mut done = at_insert();
        done.issue_ns = 9_000_000;
        done.complete_ns = 9_500_000;
        done.error = -5;
        done.requeues = 2;
        done.pid = 7;
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
            nr_sectors: u32::MAX,
            inflight_read: u32::MAX,
            inflight_write: u32::MAX,
            queued_read: u32::MAX,
            queued_write: u32::MAX,
            ioprio: u16::MAX,
            op: u8::MAX,
            flags: u8::MAX,
            ..Default::default()
        };
        let zero = RequestRecord { insert_ns: 10, deadline_ns: 5, ..Default::default() };
        for x in [features_at_insert(&r), features_at_insert(&zero)] {
            for f in Feature::ALL {
                let v = x[f.index()];
                assert!((0..=f.max_value()).contains(&v), "{} = {v}", f.name());
            }
        }
        assert_eq!(features_at_insert(&r)[Feature::DeadlineBudgetUs.index()], BUDGET_MAX);
        assert_eq!(features_at_insert(&zero)[Feature::DeadlineBudgetUs.index()], 0);
    }

    #[test]
    fn bit_length_matches_leading_zeros() {
        let mut v = 1u64;
        for _ in 0..200 {
            for w in [v, v - 1, v + 1, v.wrapping_mul(3)] {
                assert_eq!(bit_length(w), 64 - w.leading_zeros() as i32, "{w}");
            }
            v = v.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        }
        assert_eq!(bit_length(0), 0);
        assert_eq!(bit_length(u64::MAX), 64);
    }
}
