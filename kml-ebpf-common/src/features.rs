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
pub const NUM_FEATURES: usize = 16;

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
    /// Request size at insert in KiB (`nr_sectors >> 1`).
    SizeKib = 2,
    /// Reads of the device in flight (inserted, not completed) at insert.
    InflightRead = 3,
    /// Writes (and other non-reads) of the device in flight at insert.
    InflightWrite = 4,
    /// In flight in this request's direction (mq-deadline keeps one FIFO per direction).
    InflightSameDir = 5,
    /// Requests of the device inserted and not yet issued at insert.
    Queued = 6,
    /// Time since the previous insert on the device, "µs", saturated.
    SinceLastInsertUs = 7,
    /// Bit length of the time since the previous insert in ns (0 for 0): a log scale.
    SinceLastInsertLog2 = 8,
    /// Bit length of the distance in sectors from the end of the last issued request.
    IssueDistanceLog2 = 9,
    /// REQ_SYNC set (0/1).
    Sync = 10,
    /// REQ_META set (0/1).
    Meta = 11,
    /// REQ_FUA set (0/1).
    Fua = 12,
    /// I/O priority class (`ioprio >> 13`: 0 none, 1 RT, 2 BE, 3 idle).
    IoprioClass = 13,
    /// Time from insert to the FIFO deadline (read_expire or write_expire), "µs",
    /// capped at [`BUDGET_MAX`]. The regression verdict compares the predicted delay
    /// with it.
    DeadlineBudgetUs = 14,
    /// 1 when mq-deadline counts the request on its write side (every non-read).
    WriteDir = 15,
}

impl Feature {
    /// All features in vector order.
    pub const ALL: [Feature; NUM_FEATURES] = [
        Feature::SectorMib,
        Feature::Op,
        Feature::SizeKib,
        Feature::InflightRead,
        Feature::InflightWrite,
        Feature::InflightSameDir,
        Feature::Queued,
        Feature::SinceLastInsertUs,
        Feature::SinceLastInsertLog2,
        Feature::IssueDistanceLog2,
        Feature::Sync,
        Feature::Meta,
        Feature::Fua,
        Feature::IoprioClass,
        Feature::DeadlineBudgetUs,
        Feature::WriteDir,
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
            Feature::InflightRead => "inflight_read",
            Feature::InflightWrite => "inflight_write",
            Feature::InflightSameDir => "inflight_same_dir",
            Feature::Queued => "queued",
            Feature::SinceLastInsertUs => "since_last_insert_us",
            Feature::SinceLastInsertLog2 => "since_last_insert_log2",
            Feature::IssueDistanceLog2 => "issue_distance_log2",
            Feature::Sync => "sync",
            Feature::Meta => "meta",
            Feature::Fua => "fua",
            Feature::IoprioClass => "ioprio_class",
            Feature::DeadlineBudgetUs => "deadline_budget_us",
            Feature::WriteDir => "write_dir",
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
/// `block_rq_insert` has run. (`nr_sectors` is rewritten at issue when bios merged
/// into the queued request; the kernel computes the features before that, so a trace
/// record can show a larger size than the kernel saw.)
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
    "queued",
    "since_last_insert_ns",
    "issue_distance",
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
    let same_dir = match op.direction() {
        Direction::Read => r.inflight_read,
        Direction::Write => r.inflight_write,
    };
    let budget = r.deadline_ns.saturating_sub(r.insert_ns) >> TIME_SHIFT;
    let budget = if budget > BUDGET_MAX as u64 { BUDGET_MAX } else { budget as i32 };

    // Written as one literal in `Feature` order (checked by a test), so no index can
    // be out of bounds.
    [
        sat_i32(r.sector >> 11),
        op as i32,
        sat_i32((r.nr_sectors >> 1) as u64),
        sat_i32(r.inflight_read as u64),
        sat_i32(r.inflight_write as u64),
        sat_i32(same_dir as u64),
        sat_i32(r.queued() as u64),
        sat_i32(r.since_last_insert_ns >> TIME_SHIFT),
        bit_length(r.since_last_insert_ns),
        bit_length(r.issue_distance),
        flags.contains(ReqFlags::SYNC) as i32,
        flags.contains(ReqFlags::META) as i32,
        flags.contains(ReqFlags::FUA) as i32,
        (r.ioprio >> 13) as i32,
        budget,
        matches!(op.direction(), Direction::Write) as i32,
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
