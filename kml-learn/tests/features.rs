//! Property tests of the feature vector (`kml_ebpf_common::features`): each feature
//! equals an independent reference computed in wide (u128 / f64) arithmetic from the
//! definition, the kernel's insert-time record and the host's finished record give
//! the same vector, and nothing overflows or leaves its declared range (tests run
//! with overflow checks on, so an overflow would panic).

use kml_ebpf_common::{
    features::{
        features_at_insert, features_with_position, log2_8, log_ratio_8, Feature, BUDGET_MAX,
        LOG2_8_MAX, LOG_RATIO_MAX, LOG_RATIO_ONE, NUM_FEATURES,
    },
    label::{MISS_SHARE_ONE, TICK_PHASE_MAX},
    op::ReqOp,
    position::{PositionFeatures, COUNT_MAX, DUE_NONE},
    RequestRecord,
};
use proptest::prelude::*;

/// Values spread over every magnitude, with the edges often.
fn wide_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1u64),
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(u32::MAX as u64 + 1),
        (0u32..64, any::<u64>()).prop_map(|(bits, v)| if bits == 0 { 0 } else { v >> (64 - bits) }),
    ]
}

fn wide_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(u32::MAX),
        (0u32..32, any::<u32>()).prop_map(|(b, v)| if b == 0 { 0 } else { v >> (32 - b) })
    ]
}

/// A record as the observer fills it in at insert (anything the kernel could hold).
fn insert_record() -> impl Strategy<Value = RequestRecord> {
    (
        (wide_u64(), wide_u64(), wide_u64(), wide_u64()),
        (wide_u64(), wide_u64(), wide_u64()),
        (wide_u32(), wide_u32(), wide_u32(), wide_u32(), wide_u32()),
        (0u8..8, any::<u8>(), any::<u16>()),
        (any::<u16>(), any::<u16>(), any::<u16>()),
    )
        .prop_map(
            |(
                (sector, insert, budget, distance),
                (since, wait, gap),
                (qr, qw, ir, iw, nr),
                (op, flags, ioprio),
                (miss_read, miss_write, tick_phase),
            )| {
                RequestRecord {
                    sector,
                    insert_ns: insert,
                    deadline_ns: insert.wrapping_add(budget),
                    since_last_insert_ns: since,
                    issue_distance: distance,
                    dir_wait_ewma_ns: wait,
                    issue_gap_ewma_ns: gap,
                    queued_read: qr,
                    queued_write: qw,
                    inflight_read: ir,
                    inflight_write: iw,
                    nr_sectors: nr,
                    op,
                    flags,
                    ioprio,
                    miss_share_read: miss_read,
                    miss_share_write: miss_write,
                    tick_phase,
                    ..Default::default()
                }
            },
        )
}

/// The definition of `log2_8`, in u128.
fn ref_log2_8(v: u64) -> i64 {
    if v == 0 {
        return 0;
    }
    let n = 128 - (v as u128).leading_zeros() as i64; // 1..=64
    let frac = (((v as u128) << 3) >> (n - 1)) & 7;
    8 * n + frac as i64
}

fn ref_log_ratio(num: u64, den: u64) -> i64 {
    (ref_log2_8(num) - ref_log2_8(den) + LOG_RATIO_ONE as i64).clamp(0, LOG_RATIO_MAX as i64)
}

fn sat(v: u128) -> i64 {
    v.min(i32::MAX as u128) as i64
}

/// Every feature from its definition, in wide arithmetic.
fn reference(r: &RequestRecord) -> [i64; NUM_FEATURES] {
    let write = r.op != ReqOp::Read as u8;
    let (same, other) = if write {
        (r.queued_write, r.queued_read)
    } else {
        (r.queued_read, r.queued_write)
    };
    let (miss_same, miss_other) = if write {
        (r.miss_share_write, r.miss_share_read)
    } else {
        (r.miss_share_read, r.miss_share_write)
    };
    let budget_ns = (r.deadline_ns as u128).saturating_sub(r.insert_ns as u128);
    let expected = same as u128 * (r.issue_gap_ewma_ns as u128).min(u32::MAX as u128);
    let mut x = [0i64; NUM_FEATURES];
    for f in Feature::ALL {
        x[f.index()] = match f {
            Feature::SectorMib => sat(r.sector as u128 / 2048),
            Feature::Op => ReqOp::from_u8(r.op) as i64,
            Feature::WriteDir => write as i64,
            Feature::QueuedSameDir => sat(same as u128),
            Feature::QueuedOtherDir => sat(other as u128),
            Feature::DirWaitUs => sat(r.dir_wait_ewma_ns as u128 / 1024),
            Feature::IssueGapNs => sat(r.issue_gap_ewma_ns as u128),
            Feature::ExpectedWaitUs => sat(expected / 1024),
            Feature::DirWaitLog => ref_log_ratio(r.dir_wait_ewma_ns, budget_ns as u64),
            Feature::ExpectedWaitLog => ref_log_ratio(expected as u64, budget_ns as u64),
            Feature::IssueDistanceLog2 => 128 - (r.issue_distance as u128).leading_zeros() as i64,
            Feature::DeadlineBudgetUs => (budget_ns / 1024).min(BUDGET_MAX as u128) as i64,
            // Without position state: PositionFeatures::UNKNOWN (tests/position.rs
            // checks the lanes with position values).
            Feature::DueBelow => DUE_NONE as i64,
            Feature::LeadLog => LOG_RATIO_MAX as i64,
            Feature::HeadAgeLog
            | Feature::OlderHalf
            | Feature::Expired
            | Feature::BelowAgeLog
            | Feature::Recent
            | Feature::DueCount => 0,
            // A record's share is at most MISS_SHARE_ONE (miss_share_step); a
            // corrupt one is clamped.
            Feature::MissShareSame => (miss_same as i64).min(MISS_SHARE_ONE as i64),
            Feature::MissShareOther => (miss_other as i64).min(MISS_SHARE_ONE as i64),
            // TickClock writes at most TICK_PHASE_MAX; anything above is clamped.
            Feature::TickPhaseUs => (r.tick_phase as i64).min(TICK_PHASE_MAX as i64),
            // Shares of counts that are 0 without position state.
            Feature::OlderHalfShare | Feature::ExpiredShare | Feature::DueCountShare => 0,
        };
    }
    x
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Bit-exact: the shared integer routine equals the definition, and stays in range.
    #[test]
    fn features_equal_their_definition(r in insert_record()) {
        let x = features_at_insert(&r);
        let want = reference(&r);
        for f in Feature::ALL {
            prop_assert_eq!(x[f.index()] as i64, want[f.index()], "{}", f.name());
            prop_assert!((0..=f.max_value()).contains(&x[f.index()]), "{} = {}", f.name(), x[f.index()]);
        }
    }

    /// The position counts as shares of the queue: 0 for no count, else the log
    /// ratio of the count to the queued requests of the request's direction.
    #[test]
    fn shares_equal_their_definition(r in insert_record(), older in 0..=COUNT_MAX, expired in 0..=COUNT_MAX, due in 0..=COUNT_MAX) {
        let p = PositionFeatures { older_half: older, expired, due_count: due, ..PositionFeatures::UNKNOWN };
        let x = features_with_position(&r, &p);
        let same = if r.op != ReqOp::Read as u8 { r.queued_write } else { r.queued_read };
        for (f, count) in [(Feature::OlderHalfShare, older), (Feature::ExpiredShare, expired), (Feature::DueCountShare, due)] {
            let want = if count == 0 { 0 } else { ref_log_ratio(count as u64, same as u64) };
            prop_assert_eq!(x[f.index()] as i64, want, "{}", f.name());
            prop_assert!((0..=f.max_value()).contains(&x[f.index()]));
        }
    }

    /// What the kernel computes at insert equals what the host computes from the
    /// same request's finished record (issue, completion, error, verdict… filled in).
    #[test]
    fn host_and_kernel_agree(r in insert_record(), issue in any::<u64>(), complete in any::<u64>(), error in any::<i32>(), requeues in any::<u16>(), score in any::<i64>(), verdict in any::<u8>(), version in any::<u32>(), pid in any::<u32>(), dev in any::<u32>()) {
        let mut done = r;
        done.issue_ns = issue;
        done.complete_ns = complete;
        done.error = error;
        done.requeues = requeues;
        done.score = score;
        done.verdict = verdict;
        done.model_version = version;
        done.pid = pid;
        done.dev = dev;
        prop_assert_eq!(features_at_insert(&done), features_at_insert(&r));
    }

    /// `log2_8` tracks 8 (log2 v + 1) from below, within 1.7; `log_ratio_8` tracks
    /// 256 + 8 log2(num / den) within 2 (before its clamp).
    #[test]
    fn log_scales_track_the_logarithm(num in wide_u64(), den in wide_u64()) {
        prop_assert_eq!(log2_8(num) as i64, ref_log2_8(num));
        prop_assert!((0..=LOG2_8_MAX).contains(&log2_8(num)));
        if num >= 1 {
            let exact = 8.0 * ((num as f64).log2() + 1.0);
            let l = log2_8(num) as f64;
            prop_assert!(l <= exact + 1e-9 && l > exact - 1.7, "log2_8({}) = {} vs {}", num, l, exact);
        }
        let r = log_ratio_8(num, den);
        prop_assert!((0..=LOG_RATIO_MAX).contains(&r));
        if num >= 1 && den >= 1 {
            let exact = LOG_RATIO_ONE as f64 + 8.0 * ((num as f64).log2() - (den as f64).log2());
            let clamped = exact.clamp(0.0, LOG_RATIO_MAX as f64);
            prop_assert!((r as f64 - clamped).abs() <= 2.0, "log_ratio_8({}, {}) = {} vs {}", num, den, r, exact);
        }
    }

    /// Monotone: a longer wait or queue never lowers its feature.
    #[test]
    fn load_features_are_monotone(r in insert_record(), more_wait in wide_u64(), more_queued in wide_u32()) {
        let mut busier = r;
        busier.dir_wait_ewma_ns = r.dir_wait_ewma_ns.saturating_add(more_wait);
        busier.queued_read = r.queued_read.saturating_add(more_queued);
        busier.queued_write = r.queued_write.saturating_add(more_queued);
        let (a, b) = (features_at_insert(&r), features_at_insert(&busier));
        for f in [Feature::QueuedSameDir, Feature::QueuedOtherDir, Feature::DirWaitUs, Feature::ExpectedWaitUs, Feature::DirWaitLog, Feature::ExpectedWaitLog] {
            prop_assert!(b[f.index()] >= a[f.index()], "{}", f.name());
        }
    }
}
