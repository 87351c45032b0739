//! What the observer keeps per request and what it hands to the agent.
//!
//! One [`RequestRecord`] lives in the in-flight map from `block_rq_insert` to
//! `block_rq_complete`, is filled in as the request moves, and is copied whole into
//! the ring buffer on completion. Timestamps are `bpf_ktime_get_ns()` (CLOCK_MONOTONIC
//! nanoseconds), never jiffies: with HZ=250 a jiffy is 4 ms, longer than many
//! deadlines of interest.

use crate::op::{ReqFlags, ReqOp};

/// Entries of the in-flight map (`INFLIGHT`, LRU): requests between insert and
/// completion that kml follows at once.
pub const INFLIGHT_CAPACITY: usize = 65536;

/// Key of the in-flight map: the identity of a request as the attach mode sees it.
///
/// Raw tracepoint mode ([`InflightKey::raw`]): the `struct request *`, unique for
/// the request's lifetime. Tracepoint mode ([`InflightKey::tracepoint`], no BTF):
/// the start sector and the device, which is what the classic tracepoints expose;
/// two requests in flight at the same sector of the same device collide, and that
/// is counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InflightKey {
    /// The `struct request *` (raw tracepoints) or the start sector (tracepoints).
    pub id: u64,
    /// 0 (raw tracepoints: the pointer alone is unique) or the disk's kernel
    /// `dev_t` (tracepoints).
    pub dev: u64,
}

impl InflightKey {
    /// The key of the request at `rq` (raw tracepoint mode).
    #[inline(always)]
    pub const fn raw(rq: u64) -> InflightKey {
        InflightKey { id: rq, dev: 0 }
    }

    /// The key of the request starting at `sector` of `dev` (tracepoint mode).
    #[inline(always)]
    pub const fn tracepoint(dev: u32, sector: u64) -> InflightKey {
        InflightKey {
            id: sector,
            dev: dev as u64,
        }
    }
}

/// One block request from insert to completion (the in-flight map's value and the
/// ring buffer's record).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestRecord {
    /// Start sector (512-byte units) at insert.
    pub sector: u64,
    /// ns when mq-deadline queued the request (`block_rq_insert`).
    pub insert_ns: u64,
    /// ns when it was dispatched to the driver (`block_rq_issue`); 0 if never issued.
    pub issue_ns: u64,
    /// ns when it completed (`block_rq_complete`); 0 when the completion was never
    /// seen (counted as a stale entry: the record went out when its tag was reused).
    pub complete_ns: u64,
    /// mq-deadline's FIFO deadline: `insert_ns` + read_expire or write_expire of the
    /// device at insert time (the agent hands the expiries in from sysfs).
    pub deadline_ns: u64,
    /// ns since the previous insert on the same device (0 for the first one seen).
    pub since_last_insert_ns: u64,
    /// |sector - end sector of the last request issued on the device| at insert.
    pub issue_distance: u64,
    /// At insert: moving average (1/8 weight) of the insert→issue delay of the
    /// requests recently dispatched in this request's direction: how long the
    /// queue it joins is making requests wait right now.
    pub dir_wait_ewma_ns: u64,
    /// At insert: moving average (1/8 weight) of the time between dispatches on the
    /// device: how fast the queue drains.
    pub issue_gap_ewma_ns: u64,
    /// In-kernel inference at insert: the model's score (model units), see `verdict`.
    pub score: i64,
    /// Kernel `dev_t` (`major << 20 | minor`) of the whole disk.
    pub dev: u32,
    /// Size in 512-byte sectors at insert (what the in-kernel features saw; a bio
    /// merged into the queued request later is not counted).
    pub nr_sectors: u32,
    /// Thread group id of the task that inserted the request.
    pub pid: u32,
    /// 0 on success; raw tracepoint mode: the `blk_status_t`, tracepoint mode: the
    /// errno the tracepoint reports (negative).
    pub error: i32,
    /// Requests of the device already in flight (inserted, not completed) at
    /// insert, reads and writes (see [`ReqOp::direction`]); this one not counted.
    pub inflight_read: u32,
    pub inflight_write: u32,
    /// Requests of the device inserted and not yet issued at insert, reads and
    /// writes (mq-deadline's two FIFOs); this one not counted.
    pub queued_read: u32,
    pub queued_write: u32,
    /// Version of the model that gave the verdict (0: none).
    pub model_version: u32,
    /// Times the request went back to the scheduler (`block_rq_requeue`).
    pub requeues: u16,
    /// `rq->ioprio` (class << 13 | level); 0 when the kernel does not expose it, or
    /// in raw tracepoint mode when the observer was not asked to read it
    /// (`KernelLayout::read_ioprio`: `run`).
    pub ioprio: u16,
    /// [`ReqOp`] as u8.
    pub op: u8,
    /// [`ReqFlags`] bits.
    pub flags: u8,
    /// In-kernel verdict at insert: [`Verdict::NONE`], [`Verdict::MEETS`] or
    /// [`Verdict::AT_RISK`].
    pub verdict: u8,
    /// [`Sampling`] bits: near the model's boundary, and how the record survived
    /// the kernel's sampling under ring pressure.
    pub sampling: u8,
    /// Bytes the final completion reported (`block_rq_complete`'s `nr_bytes`): more
    /// than `nr_sectors` at insert when bios merged into the queued request later.
    /// Classic tracepoints report what remains to complete, in sectors: the same
    /// number for a request completed whole.
    pub complete_bytes: u32,
    /// `jiffies` (`bpf_jiffies64`) at `block_rq_insert`: the clock mq-deadline sets
    /// the request's deadline from, read a few instructions before it does.
    pub insert_jiffies: u64,
    /// `jiffies` at `block_rq_issue` (0 if never issued).
    pub issue_jiffies: u64,
    /// The scheduler's own deadline in jiffies, `rq->fifo_time`: raw tracepoint
    /// mode reads it at issue (mq-deadline sets it to `jiffies + fifo_expire[dir]`
    /// just after the insert tracepoint, `jiffies` for a request inserted at the
    /// head, and moves it earlier when it merges an older request into this one).
    /// Classic tracepoint mode has no `struct request`: `insert_jiffies` + the
    /// device's expiry in jiffies (HZ probed by the agent), see
    /// [`crate::label`]. 0 when unknown (then the label falls back to ns).
    pub fifo_time: u64,
    /// The request's place in the scheduler's queue at insert
    /// ([`crate::position::PositionFeatures`] as
    /// [`crate::position::PositionFeatures::to_lanes`]): what the in-kernel features
    /// were computed from. Meaningful when `known` has [`Known::POSITION`].
    pub position: [u16; crate::position::LANES],
    /// [`Known`] bits: which optional parts of the record were filled in.
    pub known: u8,
    /// The sector bucket width of the device's position state
    /// (`DeviceSlot::bucket_shift`, from its capacity) when `known` has
    /// [`Known::BUCKET_SHIFT`]: the host replays positions with the width the
    /// kernel used (a trace alone shows only the sectors it touched: a 512 MiB job
    /// on a 1 GiB disk would give buckets half as wide).
    pub bucket_shift: u8,
    /// The device's miss shares at insert, reads and writes
    /// ([`crate::label::miss_share_step`]), when `known` has
    /// [`Known::MISS_SHARE`]; else the host replays them from the trace.
    pub miss_share_read: u16,
    pub miss_share_write: u16,
    /// Where in its jiffy the insert fell ([`crate::label::TickClock::phase`] of
    /// the inserting CPU), when `known` has [`Known::TICK_PHASE`].
    pub tick_phase: u16,
}

/// Bits of [`RequestRecord::known`].
pub struct Known;

impl Known {
    /// `position` was computed by the programs (not a trace without those columns).
    pub const POSITION: u8 = 1;
    /// `bucket_shift` was set by the programs.
    pub const BUCKET_SHIFT: u8 = 2;
    /// `miss_share_read` / `miss_share_write` were set by the programs.
    pub const MISS_SHARE: u8 = 4;
    /// `tick_phase` was set by the programs.
    pub const TICK_PHASE: u8 = 8;
}

/// Bits of [`RequestRecord::sampling`]. Under ring pressure (`--mode drop`, the
/// ring past its sampling level) the kernel keeps the records near the model's
/// boundary, which teach training most, and one record in
/// [`Sampling::AUDIT_EVERY`] whatever it is: the audit sample. What judges
/// models live (threshold calibration, `--model auto`'s race) reads only records
/// that are an unbiased sample ([`RequestRecord::unbiased_sample`]): kept with
/// no pressure, or by the audit.
pub struct Sampling;

impl Sampling {
    /// The score was within the control's `near_margin` of the limit (set at
    /// insert by the inference stage).
    pub const NEAR_BOUNDARY: u8 = 1;
    /// The ring was past its sampling level when the record went out: it was kept
    /// for being near the boundary, or by the audit.
    pub const UNDER_PRESSURE: u8 = 2;
    /// Kept by the audit: the per-CPU record sequence (records and sampled-out
    /// ones) is a multiple of [`Sampling::AUDIT_EVERY`].
    pub const AUDIT: u8 = 4;
    /// One record in this many is kept under pressure whatever its score (a power
    /// of two: the kernel masks, it does not divide).
    pub const AUDIT_EVERY: u64 = 8;
    /// The verdict said at risk, and the verdict hook, acting on a model while it
    /// learns, left the request alone on purpose (one in `2^HOOK_HOLD_OUT` of the
    /// requests it would act on, at random): its outcome is what the verdict
    /// would have changed, so online learning can still see it
    /// ([`crate::abi::hook::Policy::acted_on`]).
    pub const HELD_OUT: u8 = 8;
}

/// Records a CPU stages before they go to the ring in one write
/// ([`RecordBatch`]): the ring's reserve and commit (a lock, the producer and
/// consumer positions, which both CPUs and the agent write) cost about 170 ns a
/// record, more than the record (issue 14). A power of two.
pub const BATCH_RECORDS: usize = 8;

/// One CPU's records on their way to the ring (`BATCHES`, per CPU). The
/// programs stage each finished request here and write the batch to the ring
/// when it is full; the agent has the rest written (`kml_flush_records`, run on
/// each CPU) on its poll timer and when it detaches. So a record waits at most
/// one poll interval, and none is left behind.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecordBatch {
    /// Set by the agent once it has checked that it can flush every CPU: until
    /// then records go to the ring one by one.
    pub enabled: u32,
    /// A program on this CPU is changing the batch; one that interrupts it (or the
    /// flush) leaves the batch alone and writes its record directly.
    pub busy: u32,
    /// Records staged (`0..=BATCH_RECORDS`).
    pub count: u32,
    /// The strongest wake-up a staged record asked for: 0 none
    /// (`BPF_RB_NO_WAKEUP`), 1 the ring's default, 2 forced.
    pub wake: u32,
    /// Each staged record's device slot (its per-device count is given back if
    /// the ring is full).
    pub slots: [u8; BATCH_RECORDS],
    pub records: [RequestRecord; BATCH_RECORDS],
}

impl RecordBatch {
    /// The wake-up levels of [`RecordBatch::wake`].
    pub const WAKE_NONE: u32 = 0;
    pub const WAKE_DEFAULT: u32 = 1;
    pub const WAKE_FORCE: u32 = 2;

    /// An empty batch, enabled or not.
    pub const fn empty(enabled: bool) -> Self {
        // SAFETY: plain integers; all-zero is a valid (empty) batch.
        let mut b: RecordBatch = unsafe { core::mem::zeroed() };
        b.enabled = enabled as u32;
        b
    }
}

/// Values of [`RequestRecord::verdict`].
pub struct Verdict;

impl Verdict {
    /// No model was active (or its slot failed its checksum).
    pub const NONE: u8 = 0;
    pub const MEETS: u8 = 1;
    pub const AT_RISK: u8 = 2;
}

impl RequestRecord {
    /// Decodes one ring buffer item as the agent receives it; `None` if its size
    /// is not a record's (a kernel/agent version mismatch).
    pub fn from_bytes(bytes: &[u8]) -> Option<RequestRecord> {
        if bytes.len() != core::mem::size_of::<RequestRecord>() {
            return None;
        }
        // SAFETY: exact size checked; RequestRecord is plain integers (any bit
        // pattern is valid) and read_unaligned makes no alignment assumption.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<RequestRecord>()) })
    }

    /// Decodes a ring buffer item of one to [`BATCH_RECORDS`] whole records (a
    /// CPU's batch, [`RecordBatch`], or one record); `None` if it is anything else.
    pub fn batch_from_bytes(bytes: &[u8]) -> Option<impl Iterator<Item = RequestRecord> + '_> {
        let size = core::mem::size_of::<RequestRecord>();
        let whole = !bytes.is_empty() && bytes.len().is_multiple_of(size);
        if !whole || bytes.len() / size > BATCH_RECORDS {
            return None;
        }
        Some(
            bytes
                .chunks_exact(size)
                .filter_map(RequestRecord::from_bytes),
        )
    }

    pub const fn op(&self) -> ReqOp {
        ReqOp::from_u8(self.op)
    }

    pub const fn flags(&self) -> ReqFlags {
        ReqFlags(self.flags)
    }

    /// Regression target: how long mq-deadline held the request (insert → issue).
    pub const fn insert_to_issue_ns(&self) -> u64 {
        self.issue_ns.saturating_sub(self.insert_ns)
    }

    /// Device service time (issue → complete).
    pub const fn issue_to_complete_ns(&self) -> u64 {
        self.complete_ns.saturating_sub(self.issue_ns)
    }

    /// Classification target: the request was dispatched after the scheduler's
    /// own deadline ([`crate::label::missed`]): `issue_jiffies` after `fifo_time`
    /// in the kernel's `time_after` sense. Without both (an old trace, a request
    /// never issued, an unknown HZ in classic tracepoint mode) the nanosecond
    /// estimate [`RequestRecord::deadline_missed_ns`] decides.
    pub const fn deadline_missed(&self) -> bool {
        crate::label::missed(self)
    }

    /// The nanosecond estimate of the label (kml's label before the scheduler's
    /// own deadline was read): dispatched after `insert_ns` + the device's expiry.
    /// A request never issued (issue_ns 0) that completed counts as missed only if
    /// it completed after the deadline. It can disagree with
    /// [`RequestRecord::deadline_missed`] by up to a jiffy.
    pub const fn deadline_missed_ns(&self) -> bool {
        let dispatched = if self.issue_ns != 0 {
            self.issue_ns
        } else {
            self.complete_ns
        };
        dispatched > self.deadline_ns
    }

    /// Whether the record belongs to an unbiased sample of the requests: it did
    /// not go out under ring pressure, or the audit kept it ([`Sampling`]).
    pub const fn unbiased_sample(&self) -> bool {
        self.sampling & Sampling::UNDER_PRESSURE == 0 || self.sampling & Sampling::AUDIT != 0
    }

    /// The position recorded at insert, if the programs computed one.
    pub const fn recorded_position(&self) -> Option<crate::position::PositionFeatures> {
        if self.known & Known::POSITION != 0 {
            Some(crate::position::PositionFeatures::from_lanes(
                &self.position,
            ))
        } else {
            None
        }
    }

    /// False for a flush (op flush): it is issued without passing the scheduler, so
    /// its record has no insert (`insert_ns` = `issue_ns`) and no deadline
    /// (`deadline_ns` = `insert_ns`); its latency is issue → complete.
    pub const fn went_through_scheduler(&self) -> bool {
        !matches!(self.op(), ReqOp::Flush)
    }

    /// Total in flight on the device at insert (both directions).
    pub const fn inflight(&self) -> u32 {
        self.inflight_read.saturating_add(self.inflight_write)
    }

    /// Total queued in the scheduler at insert (both directions).
    pub const fn queued(&self) -> u32 {
        self.queued_read.saturating_add(self.queued_write)
    }
}

/// Per-device settings the agent writes (device filter map value): only devices with
/// an entry are traced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// mq-deadline `read_expire`, ns.
    pub read_expire_ns: u64,
    /// mq-deadline `write_expire`, ns.
    pub write_expire_ns: u64,
    /// The same expiries in jiffies (`fifo_expire[dir]` as mq-deadline keeps it),
    /// for the classic tracepoint fallback of `fifo_time`; 0 when the agent could
    /// not probe HZ (the label then falls back to ns).
    pub read_expire_jiffies: u64,
    pub write_expire_jiffies: u64,
}

/// Per-device state the programs keep (updated with atomics; read by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub inflight_read: u64,
    pub inflight_write: u64,
    pub queued_read: u64,
    pub queued_write: u64,
    pub last_insert_ns: u64,
    pub last_issue_end_sector: u64,
    pub last_issue_ns: u64,
    pub issue_gap_ewma_ns: u64,
    pub wait_ewma_read_ns: u64,
    pub wait_ewma_write_ns: u64,
}

/// One step of the moving average the programs keep: `avg += (x - avg) / 8`, by
/// shifts on unsigned values (no signed division in the kernel); the first sample
/// (avg 0) is taken as is.
#[inline(always)]
pub const fn ewma_step(avg: u64, x: u64) -> u64 {
    if avg == 0 {
        x
    } else if x >= avg {
        avg + ((x - avg) >> 3)
    } else {
        avg - ((avg - x) >> 3)
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all five are repr(C), made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::InflightKey {}
    unsafe impl aya::Pod for super::RequestRecord {}
    unsafe impl aya::Pod for super::DeviceConfig {}
    unsafe impl aya::Pod for super::DeviceState {}
    unsafe impl aya::Pod for super::RecordBatch {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_kept_with_no_pressure_or_by_the_audit_are_an_unbiased_sample() {
        let with = |sampling| RequestRecord {
            sampling,
            ..Default::default()
        };
        let (near, pressure, audit) = (
            Sampling::NEAR_BOUNDARY,
            Sampling::UNDER_PRESSURE,
            Sampling::AUDIT,
        );
        assert!(with(0).unbiased_sample());
        assert!(with(near).unbiased_sample());
        // Kept under pressure for being near the boundary: biased.
        assert!(!with(pressure | near).unbiased_sample());
        assert!(with(pressure | audit).unbiased_sample());
        assert!(with(pressure | near | audit).unbiased_sample());
        assert!(Sampling::AUDIT_EVERY.is_power_of_two());
    }

    fn rec(insert: u64, issue: u64, complete: u64, deadline: u64) -> RequestRecord {
        RequestRecord {
            insert_ns: insert,
            issue_ns: issue,
            complete_ns: complete,
            deadline_ns: deadline,
            ..Default::default()
        }
    }

    #[test]
    fn record_layout_is_stable() {
        // The eBPF side and the host decode the same bytes: a size change must be
        // deliberate (and the ring buffer decoder checks it).
        assert_eq!(core::mem::size_of::<RequestRecord>(), 176);
        assert_eq!(core::mem::align_of::<RequestRecord>(), 8);
        assert_eq!(core::mem::size_of::<InflightKey>(), 16);
    }

    #[test]
    fn label_met_and_missed() {
        // No jiffies (an old trace): the ns estimate. Issued exactly at the
        // deadline meets it; one ns later misses it.
        assert!(!rec(100, 600, 700, 600).deadline_missed());
        assert!(rec(100, 601, 700, 600).deadline_missed());
        assert!(rec(100, 601, 700, 600).deadline_missed_ns());
        assert_eq!(rec(100, 601, 700, 600).insert_to_issue_ns(), 501);
        assert_eq!(rec(100, 601, 700, 600).issue_to_complete_ns(), 99);
    }

    #[test]
    fn ewma_moves_an_eighth_of_the_way() {
        assert_eq!(ewma_step(0, 800), 800);
        assert_eq!(ewma_step(800, 1600), 900);
        assert_eq!(ewma_step(800, 0), 700);
        assert_eq!(ewma_step(800, 805), 800);
        assert_eq!(ewma_step(u64::MAX, 0), u64::MAX - (u64::MAX >> 3));
    }

    #[test]
    fn label_without_issue_uses_completion() {
        assert!(!rec(100, 0, 500, 600).deadline_missed());
        assert!(rec(100, 0, 700, 600).deadline_missed());
        assert_eq!(rec(100, 0, 700, 600).insert_to_issue_ns(), 0);
    }
}
