//! Where a request stands in mq-deadline's queue: the state an eBPF program keeps
//! per device and direction, its updates, and the position features computed from
//! it at insert. One definition, used by the kernel and by the host (which replays
//! it over recorded traces, `kml_learn::replay`).
//!
//! Why these. Once a FIFO head has expired, mq-deadline starts each batch at the
//! oldest queued request and continues up to `fifo_batch` (16) requests upward in
//! sector order. A request is then served early when a request just below it in
//! sector order becomes a batch start before its own deadline, else it waits until
//! it is the oldest itself. So what decides its fate is the ages of the queued
//! requests just below it, how old the FIFO head is (how far behind the queue runs),
//! and how many queued requests are already old. `docs/learning.md` has the
//! measurements that chose them.
//!
//! The state ([`QueueShape`], 140,416 bytes per direction, in whole cache lines):
//! - an age ring: queued requests counted by insert time in [`AGE_SLOTS`] slots of
//!   `2^slot_shift` ns, where `slot_shift` comes from the direction's expiry (a slot
//!   is above 1/8 and at most 1/4 of it), so the ring spans 8 to 16 expiries; a slot
//!   is reused when the ring comes round, and the requests still counted there then
//!   count as older than the ring. The ring's sum and a bitmap of its occupied slots
//!   are kept as the counts change, so that a query reads the occupied ones of the 8
//!   young slots instead of all 64. 64 slots, not 32: in a deep queue the FIFO head
//!   is ~9 budgets old, past a 32-slot ring on 86% of one workload's inserts
//!   (docs/learning.md, "The neighbours' place in the FIFO");
//! - a sector-bucket array ([`SECTOR_BUCKETS`] = 256: 64 lost 5 points of balanced
//!   accuracy, 1,024 gained nothing): per bucket of `2^bucket_shift` sectors, the number of
//!   queued requests, and the same requests counted by ring slot, with a bitmap of
//!   the slots that count one: the bucket's oldest request is the oldest slot of
//!   that bitmap, current as requests leave. (The first form kept the oldest insert
//!   "since the bucket was last empty"; in a deep queue a bucket never empties, and
//!   that oldest went stale.) A slot the ring reuses is cleared from a bucket's
//!   bitmap lazily: each bucket keeps the ring period its bitmap was last brought up
//!   to date at, and a reader masks out the slots reused since. A bitmap of the
//!   buckets that hold a request lets the walk down from a request's bucket visit
//!   the occupied ones only;
//! - every count in two halves ([`Tally`]): the inserts' (plain stores; inserts run
//!   one at a time, under mq-deadline's lock) and the removes' (atomic adds;
//!   dispatches run on any CPU). An insert reads a bitmap before it writes it, so
//!   in a deep queue, where the bits are set already, it takes no locked
//!   instruction.
//!
//! Cost. The first form summed all 32 ring slots and walked all 16 buckets with
//! selects that went through the stack (`black_box`): about 750 ns per insert
//! (bench, cost measure). Reading occupied slots and buckets only, through the
//! bitmaps, with one-instruction opaque selects ([`crate::branchless`]), brought
//! the same work to a fifth to a half of that (docs/learning.md, "Cost in the
//! kernel"). Counting each bucket's requests by slot added about 25-30 ns per
//! insert and 15-20 per dispatch on a shallow queue (the same measure: 96-105 →
//! 127-129 ns for position and model), about 60 ns at 512 queued (bpf-bench).
//! The inserts' plain halves then took 20-35 ns off again (bpf-bench: 57-59 ns on
//! an empty queue, 109-124 at 32 queued, 185-207 at 512, from 75-79, 138-145 and
//! 213-227; the state doubled its count bytes for it, 72,256 to 140,104). Not on
//! a deep queue (~128 queued, `bench/cost-deep.fio`): about 257-289 ns per insert
//! with a tree, over the budget of 150. Not the walk's length: a walk of 8 buckets
//! instead of 16 saved ~8 ns there (docs/learning.md, "Cost in the kernel").
//! Cache misses: a profile by source line (`bench/profile_lines.py`) found a
//! third of the stage waiting on the bucket's slot count, in a table the I/O's
//! data evicts between two inserts into a bucket; stored by slot first, an
//! insert writes the current slot's warm row, and the position's part on the
//! deep queue went from 262 to 212-225 ns (`cargo xtask bench --only cost`).
//! Then each bucket's fields together ([`SectorBucket`], two a line) and the
//! state in whole lines: an insert writes one line of its bucket, not four
//! (-17 ns per insert, each build alone); and the insert program starts the
//! walk's loads before the entry's first touch ([`QueueShape::touch_walk`],
//! -18 ns). The position's part on the deep queue: 188-203 ns at mq-deadline's
//! default expiries, 238 ns at 8 ms (`cargo xtask bench --only cost
//! --cost-expire-ms 8`), where the queue spans more of the ring and each
//! period's row of the slot table is cold when the period starts (the I/O's
//! data evicted it since the ring last came round); the insert program starts
//! that line's load early too ([`QueueShape::touch_slot_count`]): -21 and -28
//! ns per insert at 8 ms, -11 at the default; the position's part 215-225 and
//! 186 ns.
//!
//! Rules kept for the eBPF side: integers only, no division (shifts, masks), loops
//! bounded by constants, indices masked into range, nothing that can panic, and every
//! counter saturating (a remove without its insert, as after an attach in the middle
//! of the I/O, or an update lost to a race between CPUs, leaves the state a little
//! off, never invalid).

use crate::branchless::{
    bit_index_16, eq, keep, lt, min, negative, nonzero, opaque, sat_sub, select,
};
use crate::device::count_between;
#[cfg(test)]
use crate::logscale::log_ratio_8;
use crate::logscale::{bit_length, log2_8, LOG_RATIO_MAX, LOG_RATIO_ONE};

/// Whether kml-ebpf keeps [`QueueShape`] and fills the position lanes of the
/// feature vector at insert (`lifecycle::shape_insert` in the inference stage,
/// while a model is active or when the agent asks for every request's position).
/// While it is false the kernel computes [`PositionFeatures::UNKNOWN`] there, so a
/// model that uses a position feature is refused at install.
///
/// The verifier of Linux 6.18 accepts [`QueueShape::position`] because it is
/// branch-free inside its loops, with selects by multiplication: a branch whose
/// result a later compare reads, or an AND with a value in [-1, 0] (the verifier
/// splits its state on those), doubled the paths per step, and the stage gave up
/// after a million instructions processed. The loops' exits (no occupied slot or
/// bucket left, a batch's reach passed) add one path per step, not a doubling.
pub const KERNEL_COMPUTES_POSITION: bool = true;

/// Sector buckets per direction.
pub const SECTOR_BUCKETS: usize = 256;
/// Requests a batch covers (mq-deadline's default `fifo_batch`): a batch that
/// starts further below than this cannot reach the request; the walk stops
/// looking once it has passed this many.
pub const REACH: u32 = 16;
/// Buckets walked down from the request's own at insert (its own included).
pub const WALK_BUCKETS: usize = 16;
/// Largest value of a bucket's or a ring slot's count (more is not counted). The
/// counts are u32 for the BPF atomics (there are none of 16 bits): inserts and
/// dispatches change them from two CPUs, and plain read-modify-writes lost updates
/// (a slot that never emptied again held the FIFO head's age up: in 5 runs of the
/// concurrency test 54-99.7% of the positions equalled the replay, 98.7-99.9%
/// after).
pub const COUNT_CAP: u32 = u16::MAX as u32;
/// Slots of the age ring (one bit each in a u64 bitmap).
pub const AGE_SLOTS: usize = 64;
/// [`PositionFeatures::due_below`] when no bucket within the walk is due.
pub const DUE_NONE: i32 = 255;
/// Largest value of a count feature (a queue is at most `nr_requests` deep: 8192 on
/// Linux 6.x; more is saturated).
pub const COUNT_MAX: i32 = 0xffff;

const _: () = assert!(SECTOR_BUCKETS.is_power_of_two() && AGE_SLOTS == 64);
const _: () = assert!(WALK_BUCKETS <= SECTOR_BUCKETS);
// The walk's window of the bucket bitmap is one u16 (`bit_index_16`), taken from
// two of its four u64 words.
const _: () = assert!(WALK_BUCKETS <= 16 && SECTOR_BUCKETS == 256);
// No implicit padding: the state is a map value shared by the kernel and the host.
// And whole cache lines: the map starts its values on a page (`BPF_F_MMAPABLE`,
// kml-ebpf's maps), so a state whose size is a multiple of 64 bytes starts every
// slot's and direction's state on a line, and the offsets below keep the header,
// the bitmap, each bucket pair and each ring-slot quad on one line each.
const _: () = assert!(
    core::mem::size_of::<QueueShape>()
        == 64 + 64 + SECTOR_BUCKETS * 32 + AGE_SLOTS * 16 + SECTOR_BUCKETS * AGE_SLOTS * 8
);
const _: () = assert!(core::mem::size_of::<QueueShape>().is_multiple_of(64));
const _: () = assert!(core::mem::offset_of!(QueueShape, buckets_occupied) == 64);
const _: () = assert!(core::mem::offset_of!(QueueShape, buckets) == 128);
const _: () = assert!(core::mem::offset_of!(QueueShape, ring).is_multiple_of(64));
const _: () = assert!(core::mem::offset_of!(QueueShape, slot_bucket_count).is_multiple_of(64));
const _: () = assert!(core::mem::size_of::<SectorBucket>() == 32);
const _: () = assert!(core::mem::size_of::<RingSlot>() == 16);
const _: () = assert!(core::mem::size_of::<Tally>() == 8);

/// A count whose two kinds of writer are kept apart, so that an insert needs no
/// locked instruction. Inserts run one at a time per device: `block_rq_insert`
/// fires inside mq-deadline's `dd_insert_request`, under the scheduler's lock
/// (kml traces mq-deadline devices only). They add to `added` with plain stores.
/// Removes (dispatches, from any CPU, outside that lock) add to `removed` with
/// atomic adds. The count is the difference, wrapping, as the one u32 it replaces
/// was (a remove without its insert takes it below 0). Inserts without locked
/// instructions took 20-35 ns off the position stage (bpf-bench, docs/learning.md
/// "Cost in the kernel").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Inserts' side: plain stores, by one CPU at a time.
    pub added: u32,
    /// Removes' side: atomic adds only.
    pub removed: u32,
}

impl Tally {
    pub const ZERO: Tally = Tally {
        added: 0,
        removed: 0,
    };

    /// The count (wrapping).
    #[inline(always)]
    pub fn net(&self) -> u32 {
        self.added.wrapping_sub(self.removed)
    }

    /// Inserts' side: `n` more (wrapping).
    #[inline(always)]
    fn add(&mut self, n: u32) {
        self.added = self.added.wrapping_add(n);
    }

    /// Inserts' side: the count becomes `n`, with a store to `added` only.
    #[inline(always)]
    fn reset_to(&mut self, n: u32) {
        self.added = self.removed.wrapping_add(n);
    }

    /// Removes' side: one fewer (atomic).
    #[inline(always)]
    fn take(&mut self) {
        atomic_add(&mut self.removed, 1);
    }
}

/// One sector bucket's state. An insert writes all of its bucket's fields, a
/// remove most of them, and the walk reads them all: kept together, a bucket is
/// one cache line (half of one), where four arrays of one field each made it
/// four lines, each written by the other CPU's dispatches in between.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorBucket {
    /// Queued requests in the bucket.
    pub count: Tally,
    /// Bit `63 - s` set while `slot_bucket_count[s][b]` counts a request of the
    /// period ring slot `s` held when it was set; a bit of a slot the ring has
    /// reused since `epoch` is stale (readers mask it out, the next insert into
    /// the bucket clears it). Atomic or/and only.
    pub slots: u64,
    /// The ring period `slots` was last brought up to date at.
    pub epoch: u64,
    /// Queued requests older than the ring: the counts of its reused slots,
    /// moved here when the bucket is brought up to date.
    pub old: Tally,
}

impl SectorBucket {
    pub const EMPTY: SectorBucket = SectorBucket {
        count: Tally::ZERO,
        slots: 0,
        epoch: 0,
        old: Tally::ZERO,
    };
}

/// One slot of the age ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSlot {
    /// Which slot period (`insert_ns >> slot_shift`, low 32 bits) the slot counts.
    pub epoch: u32,
    /// Explicit padding; always 0.
    pub reserved: u32,
    /// Queued requests inserted in that period.
    pub count: Tally,
}

impl RingSlot {
    pub const EMPTY: RingSlot = RingSlot {
        epoch: 0,
        reserved: 0,
        count: Tally::ZERO,
    };
}

/// The queued requests of one direction of one device, as the position features
/// need them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueShape {
    /// Requests queued (inserted, not yet dispatched or merged away). Inserts run
    /// under the scheduler's lock, dispatches on other CPUs outside it: one count
    /// both wrote with plain read-modify-writes lost updates and drifted, so each
    /// side has its own ([`Tally`]). A remove without its insert takes it below 0
    /// (wrapping), which reads as 0.
    pub queued: Tally,
    /// Queued requests counted in the age ring (the sum of the ring slots' counts: kept as
    /// the counts change, so that no query sums the ring).
    pub in_ring: Tally,
    /// The slot period the ring has been advanced to: every slot of a period up to
    /// [`AGE_SLOTS`] before it that has left the ring was emptied (see `advance`).
    pub ring_epoch: u64,
    /// `slot_shift + 1` of the periods the ring is in (0: not used yet); another
    /// shift (the expiry changed) starts the ring over.
    pub ring_shift: u32,
    /// Explicit padding (no implicit padding in a map value); always 0.
    pub reserved: u32,
    /// Bit `63 - s` set while ring slot `s` counts a request: the oldest occupied
    /// slot by one rotation and a bit count, not a scan. Atomic or/and only, and
    /// only inserts set a bit: an insert reads it first and writes only a change.
    pub occupied: u64,
    /// Explicit padding: the header is one cache line of its own. Every dispatch,
    /// on any CPU, writes it (atomic adds to the tallies' removes' halves); the
    /// lines after it are written far less often.
    pub header_pad: [u64; 3],
    /// Bit `255 - b` (word `(255 - b) / 64`) set while bucket `b` counts a request:
    /// the walk down from a bucket reads the occupied ones below it as the low bits
    /// of one word and visits only those. Atomic or/and only; an insert sets its
    /// bucket's bit when it finds it clear, which also repairs one a race between
    /// CPUs cleared under a queued request. A line of its own: in a deep queue its
    /// bits are set and it is read, not written.
    pub buckets_occupied: [u64; SECTOR_BUCKETS / 64],
    /// Explicit padding to the end of the bitmap's line.
    pub buckets_pad: [u64; 4],
    /// The sector buckets, each one's fields together (two buckets a cache line).
    pub buckets: [SectorBucket; SECTOR_BUCKETS],
    /// The age ring's slots, each one's fields together (four a line).
    pub ring: [RingSlot; AGE_SLOTS],
    /// Per ring slot and bucket, the bucket's queued requests inserted in the
    /// period the slot holds (valid while the slot's bit is set in the bucket's
    /// `SectorBucket::slots`).
    /// By slot first: every insert of a period writes the current slot's row
    /// (2 KiB, warm in the inserting CPU's cache), not a line of a random bucket's
    /// row spread over the whole 128 KiB, which the I/O's own data had evicted
    /// since (a cache miss on nearly every insert in a deep queue: a third of the
    /// stage's profile samples, docs/learning.md "Cost in the kernel").
    pub slot_bucket_count: [[Tally; SECTOR_BUCKETS]; AGE_SLOTS],
}

impl Default for QueueShape {
    fn default() -> Self {
        QueueShape::EMPTY
    }
}

/// The position features of one request at insert (before it joins the queue).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PositionFeatures {
    /// Age of the FIFO head (the oldest queued request) against the deadline budget,
    /// on the log scale of [`crate::logscale::log_ratio_8`]: 256 when the head is exactly one budget
    /// old, +8 per doubling. 0 when the queue is empty.
    pub head_age_log: i32,
    /// Queued requests older than half the budget (to the ring's slot resolution).
    pub older_half: i32,
    /// Queued requests older than the budget (already expired).
    pub expired: i32,
    /// Queued requests counted walking down from this request's sector bucket to
    /// the first bucket whose oldest request is *due*: it becomes the FIFO head
    /// before this request's deadline (its age is at least the head's age minus
    /// the budget), so a batch will start there in time. Small: this request sits
    /// within a batch's reach above a coming batch start. [`DUE_NONE`] when none of
    /// the [`WALK_BUCKETS`] buckets is due.
    pub due_below: i32,
    /// Age of the oldest request within reach below (the walked buckets up to the
    /// one where [`REACH`] requests are passed) against the budget, log scale.
    pub below_age_log: i32,
    /// How long until that request becomes the FIFO head (head age minus its age)
    /// against the budget, log scale: below 256 it heads a batch before this
    /// request's deadline. [`LOG_RATIO_MAX`] when nothing is queued within reach.
    pub lead_log: i32,
    /// Queued requests within reach below that are due (see `due_below`).
    pub due_count: i32,
    /// Queued requests inserted in the current and the previous ring slot (the last
    /// eighth to half of a budget): the onset of a burst shows here before any wait
    /// average moves.
    pub recent: i32,
}

impl PositionFeatures {
    /// What a request is given when no position state is kept for its device.
    pub const UNKNOWN: PositionFeatures = PositionFeatures {
        head_age_log: 0,
        older_half: 0,
        expired: 0,
        due_below: DUE_NONE,
        below_age_log: 0,
        lead_log: LOG_RATIO_MAX,
        due_count: 0,
        recent: 0,
    };
}

/// Lanes of [`PositionFeatures`] in a record (`RequestRecord::position`), in
/// `Feature::POSITION` order: head_age_log, older_half, expired, due_below,
/// below_age_log, recent, lead_log, due_count.
pub const LANES: usize = 8;

impl PositionFeatures {
    /// The record's form: every value fits a u16 (log ratios ≤ [`LOG_RATIO_MAX`],
    /// counts ≤ [`COUNT_MAX`], `due_below` ≤ [`DUE_NONE`]); a value outside (never
    /// produced) saturates.
    #[inline(always)]
    pub const fn to_lanes(&self) -> [u16; LANES] {
        const fn lane(v: i32) -> u16 {
            if v < 0 {
                0
            } else if v > u16::MAX as i32 {
                u16::MAX
            } else {
                v as u16
            }
        }
        [
            lane(self.head_age_log),
            lane(self.older_half),
            lane(self.expired),
            lane(self.due_below),
            lane(self.below_age_log),
            lane(self.recent),
            lane(self.lead_log),
            lane(self.due_count),
        ]
    }

    /// Back from the record's form: the kernel computes the features from these,
    /// so a record read back gives the host the same vector bit for bit.
    #[inline(always)]
    pub const fn from_lanes(l: &[u16; LANES]) -> PositionFeatures {
        PositionFeatures {
            head_age_log: l[0] as i32,
            older_half: l[1] as i32,
            expired: l[2] as i32,
            due_below: l[3] as i32,
            below_age_log: l[4] as i32,
            recent: l[5] as i32,
            lead_log: l[6] as i32,
            due_count: l[7] as i32,
        }
    }
}

/// The ring's slot width for a direction whose deadline budget is `budget_ns`: a
/// quarter of the largest power of two not above the budget (more than 1/8 of the
/// budget and at most 1/4; 1 ns for budgets under 8 ns). Branch-free: the shift
/// feeds the ring's indices, so the verifier would carry both sides of a branch
/// here through all that follows.
#[inline(always)]
pub fn slot_shift(budget_ns: u64) -> u32 {
    sat_sub(bit_length(budget_ns) as u64, 3) as u32
}

/// A request's deadline budget (`deadline_ns - insert_ns`, 0 if the deadline is
/// not after the insert), without a branch, for the same reason.
#[inline(always)]
pub fn budget_of(insert_ns: u64, deadline_ns: u64) -> u64 {
    let d = deadline_ns.wrapping_sub(insert_ns);
    // A budget is far below 2^63 ns; a deadline before the insert wraps to the top half.
    keep(1 ^ negative(d), d)
}

/// The index of a request's direction in a pair of shapes (0 read, 1 the rest:
/// [`crate::ReqOp::direction`]), from its `ReqOp` byte, without a branch.
#[inline(always)]
pub fn direction_index(op: u8) -> usize {
    (nonzero(op as u64) & 1) as usize
}

/// The sector bucket of `sector` (wraps past `SECTOR_BUCKETS << bucket_shift`).
#[inline(always)]
pub const fn bucket_of(sector: u64, bucket_shift: u32) -> usize {
    ((sector >> (bucket_shift & 63)) as usize) & (SECTOR_BUCKETS - 1)
}

/// The bucket shift that spreads `capacity_sectors` over [`SECTOR_BUCKETS`]
/// buckets (the agent computes it once per device from its size).
pub const fn bucket_shift_for(capacity_sectors: u64) -> u32 {
    let n = bit_length(capacity_sectors.saturating_sub(1)) as u32;
    n.saturating_sub(SECTOR_BUCKETS.trailing_zeros())
}

/// Ring slots a query reads one by one (the young ones: under half the budget,
/// under the budget, the last two); the rest only through `in_ring` and
/// `occupied`.
pub const YOUNG_SLOTS: u64 = 8;
const _: () = assert!(YOUNG_SLOTS as usize <= AGE_SLOTS);

/// Slot `s`'s bit in `QueueShape::occupied` and `SectorBucket::slots` (bit `63 - s`: one
/// left rotation by the period then puts the slot `k` periods old at bit `k`).
#[inline(always)]
fn ring_bit(s: usize) -> u64 {
    1u64 << (63 - (s as u64 & 63))
}

/// `v` rotated left by `r` (0..=63), without a branch.
#[inline(always)]
fn rotate_left_64(v: u64, r: u64) -> u64 {
    let r = r & 63;
    // r = 0: both halves are v.
    (v << r) | (v >> ((64 - r) & 63))
}

/// A slot bitmap rotated to ages: bit `k` is the slot of the period `k` before
/// `epoch`.
#[inline(always)]
fn by_age(slots: u64, epoch: u64) -> u64 {
    rotate_left_64(slots, epoch.wrapping_add(1))
}

/// The ages (bits `0..d`, `d = min(epoch - bucket_epoch, 64)`) whose slots the
/// ring has reused since a bucket's bitmap was brought up to date at
/// `bucket_epoch`: a bit there was set for a period that has left the ring.
#[inline(always)]
fn reused_ages(bucket_epoch: u64, epoch: u64) -> u64 {
    let d = min(sat_sub(epoch, bucket_epoch), AGE_SLOTS as u64);
    keep(lt(d, 64), (1u64 << (d & 63)).wrapping_sub(1)) | keep(1 ^ lt(d, 64), u64::MAX)
}

/// Read-modify-writes of a u32 that other CPUs update too, as one atomic
/// instruction each: no update is lost. The BPF target has no `AtomicU32` (it
/// declares 64-bit atomics only), but its CPU v3 has the 32-bit instructions,
/// which the intrinsics select.
macro_rules! atomic_rmw {
    ($(#[$doc:meta])* $name:ident, $t:ty, $atomic:ty, $intrinsic:ident, $method:ident) => {
        $(#[$doc])*
        #[inline(always)]
        fn $name(p: &mut $t, v: $t) {
            #[cfg(target_arch = "bpf")]
            // SAFETY: `p` is a valid, aligned value in a map value for the call.
            unsafe {
                core::intrinsics::$intrinsic::<$t, $t, { core::intrinsics::AtomicOrdering::Relaxed }>(p, v);
            }
            #[cfg(not(target_arch = "bpf"))]
            // SAFETY: `p` is a valid, aligned value for the call, and the atomic
            // type has its layout.
            unsafe { <$atomic>::from_ptr(p) }.$method(v, core::sync::atomic::Ordering::Relaxed);
        }
    };
}

atomic_rmw!(
    /// Adds `v` (wrapping).
    atomic_add, u32, core::sync::atomic::AtomicU32, atomic_xadd, fetch_add
);
atomic_rmw!(
    atomic_or_64,
    u64,
    core::sync::atomic::AtomicU64,
    atomic_or,
    fetch_or
);
atomic_rmw!(
    atomic_and_64,
    u64,
    core::sync::atomic::AtomicU64,
    atomic_and,
    fetch_and
);

/// The bucket whose line [`QueueShape::touch_walk`]'s step `k` (1 to
/// [`WALK_BUCKETS`] / 2 - 1) loads below bucket `b0`: one of each pair. Opaque,
/// then masked, as the walk's own index (see [`QueueShape::position`]).
#[inline(always)]
fn walk_touch_bucket(b0: u64, k: u64) -> usize {
    (opaque(b0.wrapping_sub(2 * k)) as usize) & (SECTOR_BUCKETS - 1)
}

/// The cell of `QueueShape::slot_bucket_count` (ring slot, bucket) that an insert
/// at `now_ns` with budget `budget_ns` into `sector`'s bucket counts in (when its
/// ring slot holds its period, as after [`QueueShape::on_insert`]'s `advance`).
#[inline(always)]
fn slot_count_cell(sector: u64, bucket_shift: u32, now_ns: u64, budget_ns: u64) -> (usize, usize) {
    let s = ((now_ns >> slot_shift(budget_ns)) as usize) & (AGE_SLOTS - 1);
    (s, bucket_of(sector, bucket_shift))
}

/// Bucket `b`'s word and bit in `QueueShape::buckets_occupied` (bit `255 - b`:
/// the buckets below one sit at the bits above its own).
#[inline(always)]
fn bucket_bit(b: usize) -> (usize, u64) {
    let r = (SECTOR_BUCKETS - 1) - (b & (SECTOR_BUCKETS - 1));
    (r >> 6, 1u64 << (r & 63))
}

impl QueueShape {
    pub const EMPTY: QueueShape = QueueShape {
        queued: Tally::ZERO,
        in_ring: Tally::ZERO,
        ring_epoch: 0,
        ring_shift: 0,
        reserved: 0,
        occupied: 0,
        header_pad: [0; 3],
        buckets_occupied: [0; SECTOR_BUCKETS / 64],
        buckets_pad: [0; 4],
        buckets: [SectorBucket::EMPTY; SECTOR_BUCKETS],
        ring: [RingSlot::EMPTY; AGE_SLOTS],
        slot_bucket_count: [[Tally::ZERO; SECTOR_BUCKETS]; AGE_SLOTS],
    };

    /// A request joins the queue (`block_rq_insert`, after [`QueueShape::position`]
    /// was taken for it). `budget_ns` is its deadline budget (the direction's expiry).
    ///
    /// Inserts run one at a time (see [`Tally`]): every count here is the inserts'
    /// side of a tally, written with plain stores, and a bitmap is read first and
    /// written (atomically: removes clear bits in the same words) only to change
    /// it. In a deep queue the bits are set already, and an insert takes no locked
    /// instruction at all.
    #[inline(always)]
    pub fn on_insert(&mut self, sector: u64, bucket_shift: u32, now_ns: u64, budget_ns: u64) {
        self.queued.add(1);
        let b = bucket_of(sector, bucket_shift);
        if let Some(bk) = self.buckets.get_mut(b) {
            if bk.count.net() < COUNT_CAP {
                bk.count.add(1);
            }
        }
        let (word, bit) = bucket_bit(b);
        if let Some(w) = self.buckets_occupied.get_mut(word) {
            // Read after the count's store: a dispatch that emptied the bucket and
            // cleared the bit before this insert counted is repaired here, and the
            // next insert into the bucket repairs a clear that came later.
            if *w & bit == 0 {
                atomic_or_64(w, bit);
            }
        }
        let sh = slot_shift(budget_ns);
        let epoch = now_ns >> sh;
        self.advance(epoch, sh);
        let s = (epoch as usize) & (AGE_SLOTS - 1);
        let mut added = false;
        if let Some(slot) = self.ring.get_mut(s) {
            if slot.epoch != epoch as u32 {
                // Only when inserts on two CPUs come out of time order: the slot
                // still holds an older period; what it counted leaves the ring.
                self.in_ring.add(slot.count.net().wrapping_neg());
                slot.epoch = epoch as u32;
                slot.count.reset_to(0);
            }
            if slot.count.net() < COUNT_CAP {
                slot.count.add(1);
                added = true;
            }
        }
        if added {
            self.in_ring.add(1);
            let bit = ring_bit(s);
            if self.occupied & bit == 0 {
                atomic_or_64(&mut self.occupied, bit);
            }
        }
        // The bucket's count of this slot.
        if let Some(bk) = self.buckets.get_mut(b) {
            let (m, be, old) = (&mut bk.slots, &mut bk.epoch, &mut bk.old);
            let counts = &mut self.slot_bucket_count;
            // Bring the bitmap up to date: the counts of the slots reused since
            // move to the requests older than the ring. Usually none or one (a
            // bucket with queued requests sees inserts far more often than the
            // ring comes round).
            let reused = rotate_left_64(reused_ages(*be, epoch), 64 - (epoch.wrapping_add(1) & 63));
            let mut gone = *m & reused;
            // Only inserts set bits: none of them set, none to clear.
            if gone != 0 {
                atomic_and_64(m, !reused);
            }
            let mut step = 0u64;
            while step < AGE_SLOTS as u64 && gone != 0 {
                let low = gone & gone.wrapping_neg();
                gone ^= low;
                // Bit 63 - s.
                let s = (63 - sat_sub(bit_length(low) as u64, 1)) as usize & (AGE_SLOTS - 1);
                let n = counts.get(s).and_then(|r| r.get(b)).map_or(0, Tally::net);
                old.reset_to(min(old.net() as u64 + n as u64, COUNT_CAP as u64) as u32);
                step += 1;
            }
            // Not back in time (inserts on two CPUs out of time order).
            *be = select(lt(*be, epoch), epoch, *be);
            let bit = ring_bit(s);
            if let Some(c) = counts.get_mut(s).and_then(|r| r.get_mut(b)) {
                if *m & bit == 0 {
                    // What the count held belongs to a period gone from the ring
                    // (or nothing: the last of the slot's requests left).
                    c.reset_to(1);
                } else if c.net() < COUNT_CAP {
                    c.add(1);
                }
            }
            // Read again after the count's store (a dispatch may have cleared it).
            // A locked OR: on the line the count's store has just taken, it
            // costs nothing measurable (a racy plain store instead: +3.6 ns per
            // insert, rounds -14 to +28; docs/learning.md "Cost in the kernel").
            if *m & bit == 0 {
                atomic_or_64(m, bit);
            }
        }
    }

    /// A queued request leaves the queue: dispatched (`block_rq_issue`), or merged
    /// into another request (`block_rq_merge`). `sector`, `insert_ns` and
    /// `budget_ns` are the values it had at insert. Removes run on any CPU at
    /// once: the removes' side of each tally, atomic.
    #[inline(always)]
    pub fn on_remove(&mut self, sector: u64, bucket_shift: u32, insert_ns: u64, budget_ns: u64) {
        self.queued.take();
        let b = bucket_of(sector, bucket_shift);
        if let Some(c) = self.buckets.get_mut(b).map(|bk| &mut bk.count) {
            if c.net() > 0 {
                c.take();
            }
            if c.net() == 0 {
                let (word, bit) = bucket_bit(b);
                if let Some(w) = self.buckets_occupied.get_mut(word) {
                    atomic_and_64(w, !bit);
                }
            }
        }
        let epoch = insert_ns >> slot_shift(budget_ns);
        let s = (epoch as usize) & (AGE_SLOTS - 1);
        // Its period's slot, unless the ring has moved past it (emptied then).
        let mut in_ring = false;
        let mut emptied = None;
        if let Some(slot) = self.ring.get_mut(s) {
            in_ring = slot.epoch == epoch as u32;
            if in_ring && slot.count.net() > 0 {
                slot.count.take();
                emptied = Some(slot.count.net() == 0);
            }
        }
        if let Some(emptied) = emptied {
            self.in_ring.take();
            if emptied {
                atomic_and_64(&mut self.occupied, !ring_bit(s));
            }
        }
        // The bucket's count: its slot's while the slot holds the request's period
        // (the bucket's bit of it is current: the insert brought the bucket up to
        // date) or until the bucket is brought up to date again, else the count
        // of its requests older than the ring.
        if let Some(bk) = self.buckets.get_mut(b) {
            let moved = bk.epoch >= epoch.wrapping_add(AGE_SLOTS as u64);
            if !in_ring && moved {
                if bk.old.net() > 0 {
                    bk.old.take();
                }
            } else if let Some(c) = self.slot_bucket_count.get_mut(s).and_then(|r| r.get_mut(b)) {
                if c.net() > 0 {
                    c.take();
                }
                if c.net() == 0 {
                    atomic_and_64(&mut bk.slots, !ring_bit(s));
                }
            }
        }
    }

    /// Moves the ring to period `epoch` (of slot shift `sh`): the slots of the
    /// periods passed since the last move are reused for them, and what they
    /// counted ([`AGE_SLOTS`] or more periods old) leaves the ring. At most [`AGE_SLOTS`]
    /// steps, usually none or one (a period is an eighth to a quarter of the
    /// expiry; inserts come far more often). Inserts' side only (it runs at insert).
    #[inline(always)]
    fn advance(&mut self, epoch: u64, sh: u32) {
        if self.ring_shift != sh + 1 {
            // First use, or the expiry changed: periods of another width. The
            // counts start over through their inserts' halves, as everywhere at
            // insert. Rare (the expiry changed): opaque indices, so that LLVM
            // emits no memset.
            self.ring_shift = sh + 1;
            self.ring_epoch = epoch;
            let mut i = 0u64;
            while i < AGE_SLOTS as u64 {
                let s = opaque(i) as usize & (AGE_SLOTS - 1);
                if let Some(slot) = self.ring.get_mut(s) {
                    slot.epoch = 0;
                    slot.count.reset_to(0);
                }
                i += 1;
            }
            self.in_ring.reset_to(0);
            if self.occupied != 0 {
                atomic_and_64(&mut self.occupied, 0);
            }
            // The buckets' bitmaps and periods are of the old width.
            let mut i = 0u64;
            while i < SECTOR_BUCKETS as u64 {
                let b = opaque(i) as usize & (SECTOR_BUCKETS - 1);
                if let Some(bk) = self.buckets.get_mut(b) {
                    if bk.slots != 0 {
                        atomic_and_64(&mut bk.slots, 0);
                    }
                    bk.epoch = epoch;
                    bk.old.reset_to(0);
                }
                i += 1;
            }
            return;
        }
        let last = self.ring_epoch;
        if epoch <= last {
            return;
        }
        let n = epoch - last;
        let mut i = 1u64;
        while i <= AGE_SLOTS as u64 && i <= n {
            // Of the periods passed, only the last AGE_SLOTS matter (each slot once).
            let e = epoch - (n.min(AGE_SLOTS as u64) - i);
            let s = (e as usize) & (AGE_SLOTS - 1);
            if let Some(slot) = self.ring.get_mut(s) {
                let gone = slot.count.net();
                slot.epoch = e as u32;
                slot.count.reset_to(0);
                self.in_ring.add(gone.wrapping_neg());
            }
            let bit = ring_bit(s);
            if self.occupied & bit != 0 {
                atomic_and_64(&mut self.occupied, !bit);
            }
            i += 1;
        }
        self.ring_epoch = epoch;
    }

    /// Starts the loads of the lines the walk down from `sector`'s bucket will
    /// read (one bucket of each of the 7 pairs below its own; from an even bucket
    /// the walk's last bucket is in an eighth pair, left out), for the insert
    /// program to call before its
    /// own first misses, so that they overlap. Reads only, into a value no one
    /// uses; its own bucket's line is left out (the insert writes it: a read
    /// would bring it shared, and the write must then take it again).
    #[inline(always)]
    pub fn touch_walk(&self, sector: u64, bucket_shift: u32) {
        let b0 = bucket_of(sector, bucket_shift) as u64;
        let mut k = 1u64;
        while k < (WALK_BUCKETS / 2) as u64 {
            if let Some(bk) = self.buckets.get(walk_touch_bucket(b0, k)) {
                // SAFETY: a reference to a bucket, valid for a read.
                unsafe { core::ptr::read_volatile(&raw const bk.epoch) };
            }
            k += 1;
        }
    }

    /// Starts the load of the line of the slot table (`slot_bucket_count`) that an
    /// insert at `now_ns` with budget `budget_ns` into `sector`'s bucket writes,
    /// for the insert program to call with [`QueueShape::touch_walk`]. At the
    /// workloads' expiries a ring period lasts about a millisecond, and the
    /// period's row was last written when the ring last came round, 64 periods
    /// before: the I/O's data has evicted it since. Reads only.
    #[inline(always)]
    pub fn touch_slot_count(&self, sector: u64, bucket_shift: u32, now_ns: u64, budget_ns: u64) {
        let (s, b) = slot_count_cell(sector, bucket_shift, now_ns, budget_ns);
        if let Some(c) = self.slot_bucket_count.get(s).and_then(|r| r.get(b)) {
            // SAFETY: a reference to a count, valid for a read.
            unsafe { core::ptr::read_volatile(&raw const c.added) };
        }
    }

    /// Requests queued; below 0 (wrapped, see `queued`) reads as 0. Branch-free.
    #[inline(always)]
    fn queued_now(&self) -> u64 {
        count_between(self.queued.added, self.queued.removed) as u64
    }

    /// Bucket `b`'s queued count, its slots still in the ring by age (bit `k`: a
    /// request inserted `k` periods before `now_epoch`), and 1 when it also holds
    /// a request older than the ring (moved there, or in a slot reused since the
    /// bucket was brought up to date, or no slot left): its oldest is then the
    /// ring's span old, as the head is. Branch-free (the walk's step).
    #[inline(always)]
    fn bucket_oldest(&self, b: usize, now_epoch: u64) -> (u64, u64, u64) {
        let (c, slots, be, old) = match self.buckets.get(b) {
            Some(bk) => (
                bk.count.net() as u64,
                bk.slots,
                bk.epoch,
                bk.old.net() as u64,
            ),
            None => (0, 0, 0, 0),
        };
        let slots_by_age = by_age(slots, now_epoch);
        let reused = reused_ages(be, now_epoch);
        let valid = slots_by_age & !reused;
        let beyond = nonzero(old) | nonzero(slots_by_age & reused) | (1 ^ nonzero(valid));
        (c, valid, beyond)
    }

    /// Bit w set when bucket `b0 - w` is occupied, for w below [`WALK_BUCKETS`]
    /// (none for buckets below 0): bits `255 - b0` on of `buckets_occupied`.
    #[inline(always)]
    fn occupied_below(&self, b0: u64) -> u64 {
        let r0 = (SECTOR_BUCKETS as u64 - 1) - (b0 & (SECTOR_BUCKETS as u64 - 1));
        let word = (r0 >> 6) as usize;
        let off = r0 & 63;
        let words = self.buckets_occupied.len();
        let lo = self.buckets_occupied.get(word).copied().unwrap_or(0) >> off;
        // The bits past this word's end from the next one, if there is a next one.
        let next = self
            .buckets_occupied
            .get((word + 1) & (words - 1))
            .copied()
            .unwrap_or(0);
        let hi = keep(
            lt(word as u64 + 1, words as u64) & nonzero(off),
            next << ((64 - off) & 63),
        );
        (lo | hi) & ((1 << WALK_BUCKETS) - 1)
    }

    /// The position features of a request about to join this queue at `now_ns`
    /// with deadline budget `budget_ns` (first moving the ring to `now_ns`). Two
    /// bounded loops over occupied slots and buckets only (at most [`YOUNG_SLOTS`]
    /// and [`WALK_BUCKETS`] steps), no division.
    #[inline(always)]
    pub fn position(
        &mut self,
        sector: u64,
        bucket_shift: u32,
        now_ns: u64,
        budget_ns: u64,
    ) -> PositionFeatures {
        let sh = slot_shift(budget_ns);
        let now_epoch = now_ns >> sh;
        self.advance(now_epoch, sh);
        // Slots younger than half the budget / than the budget: fewer than 4 and 8
        // (a slot is more than 1/8 of the budget), so 8 steps cover them.
        let half_slots = (budget_ns >> 1) >> sh;
        let budget_slots = budget_ns >> sh;
        // Bit k of `by_age`: the slot of the period k before now is occupied.
        let ring_by_age = by_age(self.occupied, now_epoch);
        // Both loops visit occupied slots and buckets only, lowest bit first, and
        // leave when none is left; inside, no branch (see `crate::branchless`):
        // the verifier walks every path, and a compare-and-branch per step on a
        // value an earlier step computed made it give up ("BPF program is too
        // large", 1 M instructions). An exit adds one path per step, not a doubling.
        let (mut young_half, mut young_budget, mut recent) = (0u64, 0u64, 0u64);
        // Slots a budget old or older add to none of the three sums but `recent`
        // (the last two): only the others are read (`budget_slots` is 4 to 7, see
        // `slot_shift`; under 2 only for a budget under 2 ns).
        let mut young =
            ring_by_age & ((1 << YOUNG_SLOTS) - 1) & (((1 << (budget_slots & 7)) - 1) | 0b11);
        let mut step = 0u64;
        while step < YOUNG_SLOTS && young != 0 {
            let low = young & young.wrapping_neg();
            young ^= low;
            let k = bit_index_16(low);
            let epoch = now_epoch.wrapping_sub(k);
            let s = (epoch as usize) & (AGE_SLOTS - 1);
            let (e, c) = match self.ring.get(s) {
                Some(slot) => (slot.epoch, slot.count.net() as u64),
                None => (0, 0),
            };
            let c = keep(eq(e as u64, epoch & 0xffff_ffff), c);
            young_half += keep(lt(k, half_slots), c);
            young_budget += keep(lt(k, budget_slots), c);
            recent += keep(lt(k, 2), c);
            step += 1;
        }
        // The ring's sum and its oldest occupied slot, kept as the counts change.
        let in_ring = self.in_ring.net() as u64;
        let oldest_k = sat_sub(bit_length(ring_by_age) as u64, 1);
        let queued = self.queued_now();
        // 0 for an empty queue; the ring's span when some queued request is older
        // than the ring; else the oldest slot's age (its requests are at least
        // `oldest_k` slots old).
        let head_age_ns = select(
            nonzero(queued),
            select(
                lt(in_ring, queued),
                (AGE_SLOTS as u64) << sh,
                oldest_k << sh,
            ),
            0,
        );
        // A request in a walked bucket is due when it is at least this old.
        let due_age = sat_sub(head_age_ns, budget_ns);
        let b0 = bucket_of(sector, bucket_shift) as u64;
        // Bit w: bucket b0 - w (w < WALK_BUCKETS, not below bucket 0) is occupied.
        let mut below = self.occupied_below(b0);
        // In slots: a bucket is due when its oldest slot is at least this old
        // (`oldest << sh >= due_age`), or it holds a request older than the ring
        // (the ring's span is at least the head's age).
        let due_k = (due_age + (1u64 << sh) - 1) >> sh;
        let due_k_in_ring = lt(due_k, AGE_SLOTS as u64);
        let (mut walked, mut due_count) = (0u64, 0u64);
        // The walked buckets' slots (their oldest is the oldest of these), and
        // whether one of them holds a request older than the ring: the oldest
        // below by one bit count after the loop, not one per bucket.
        let (mut walked_slots, mut walked_beyond) = (0u64, 0u64);
        let (mut found, mut due_at) = (0u64, 0u64);
        let mut step = 0u64;
        // Down to the first bucket where REACH requests have been passed.
        while step < WALK_BUCKETS as u64 && below != 0 && walked < REACH as u64 {
            let low = below & below.wrapping_neg();
            below ^= low;
            // Opaque, then masked: the verifier must see the index bounded by the
            // mask (else LLVM proves `b0 - w` in range and walks a decrementing
            // pointer the verifier cannot bound).
            let b = (opaque(b0.wrapping_sub(bit_index_16(low))) as usize) & (SECTOR_BUCKETS - 1);
            let (c, valid, beyond) = self.bucket_oldest(b, now_epoch);
            // An occupied bit over an empty count only after a race between CPUs.
            let live = nonzero(c);
            walked += c;
            walked_slots |= keep(live, valid);
            walked_beyond |= live & beyond;
            let due_in_ring = nonzero(keep(due_k_in_ring, valid >> (due_k & 63)));
            let due = live & (beyond | due_in_ring);
            due_count += keep(due, c);
            due_at = select(due & (1 ^ found), walked, due_at);
            found |= due;
            step += 1;
        }
        // From here on no branch either: every value below feeds a later compare
        // (the clamps, the lanes), so a diamond here would not be pruned, and a
        // dozen of them in a row doubled the verifier's paths a dozen times (1 M
        // instructions processed for an 818-instruction stage).
        let walked_any = nonzero(walked);
        // The oldest within reach below, to the slot; the ring's span when older.
        let below_age = select(
            walked_beyond,
            (AGE_SLOTS as u64) << sh,
            sat_sub(bit_length(walked_slots) as u64, 1) << sh,
        );
        let due_below = select(found, min(due_at, (DUE_NONE - 1) as u64), DUE_NONE as u64);
        let head_age_log = select(nonzero(queued), log_ratio_bf(head_age_ns, budget_ns), 0);
        let below_age_log = select(walked_any, log_ratio_bf(below_age, budget_ns), 0);
        let lead_log = select(
            walked_any,
            log_ratio_bf(sat_sub(head_age_ns, below_age), budget_ns),
            LOG_RATIO_MAX as u64,
        );
        // Counts: the ring's sums never exceed `queued` by construction, but a
        // remove lost to a race can leave them so; the difference saturates at 0.
        let queued32 = queued & 0xffff_ffff;
        PositionFeatures {
            head_age_log: head_age_log as i32,
            older_half: count_bf(sat_sub(queued32, young_half & 0xffff_ffff)),
            expired: count_bf(sat_sub(queued32, young_budget & 0xffff_ffff)),
            due_below: due_below as i32,
            below_age_log: below_age_log as i32,
            lead_log: lead_log as i32,
            due_count: count_bf(due_count & 0xffff_ffff),
            recent: count_bf(recent & 0xffff_ffff),
        }
    }
}

impl QueueShape {
    /// Requests a place is taken at: the walk down from a request's bucket stops
    /// once the walked buckets hold at least this many (or at the walk's end).
    pub const PLACE_STOPS: [u64; 3] = [1, 4, 16];

    /// An offline study, not yet a feature: the FIFO place of the oldest queued
    /// request among the buckets walked down from `sector` until they hold
    /// [`QueueShape::PLACE_STOPS`] requests, the queued requests older than it
    /// (to the slot: those older than the ring and those of the ring's older
    /// slots); 0 when it is older than the ring itself (served first), `None`
    /// when nothing is queued below. Taken after [`QueueShape::position`] (which
    /// moves the ring to `now_ns`) and before the request joins. The kernel form
    /// session 15 designed (docs/learning.md, "The neighbours' place in the
    /// FIFO"), on the state the kernel keeps; one pass over the ring per stop,
    /// which the kernel could not afford as it is.
    pub fn walk_places(
        &self,
        sector: u64,
        bucket_shift: u32,
        now_ns: u64,
        budget_ns: u64,
    ) -> [Option<u64>; 3] {
        let sh = slot_shift(budget_ns);
        let now_epoch = now_ns >> sh;
        let queued = self.queued_now();
        let older_than_ring = sat_sub(queued, self.in_ring.net() as u64);
        let ring_by_age = by_age(self.occupied, now_epoch);
        // Queued requests older than slot age `k`: the ring's older slots.
        let place = |slots: u64, beyond: bool| -> u64 {
            if beyond {
                return 0;
            }
            let k = sat_sub(bit_length(slots) as u64, 1);
            let mut n = older_than_ring;
            // Ages above k (none for k = 63: `2 << 63` is 0).
            let mut older = ring_by_age & !(2u64 << (k & 63)).wrapping_sub(1);
            while older != 0 {
                let low = older & older.wrapping_neg();
                older ^= low;
                let age = sat_sub(bit_length(low) as u64, 1);
                let epoch = now_epoch.wrapping_sub(age);
                let s = (epoch as usize) & (AGE_SLOTS - 1);
                if let Some(slot) = self.ring.get(s).filter(|r| r.epoch == epoch as u32) {
                    n += slot.count.net() as u64;
                }
            }
            n
        };
        let b0 = bucket_of(sector, bucket_shift) as u64;
        let mut below = self.occupied_below(b0);
        let (mut walked, mut slots, mut beyond) = (0u64, 0u64, false);
        let mut out = [None; 3];
        let mut j = 0;
        while below != 0 && j < out.len() {
            let low = below & below.wrapping_neg();
            below ^= low;
            let b = (b0.wrapping_sub(bit_index_16(low)) as usize) & (SECTOR_BUCKETS - 1);
            let (c, valid, bucket_beyond) = self.bucket_oldest(b, now_epoch);
            if c == 0 {
                continue;
            }
            beyond |= bucket_beyond != 0;
            slots |= valid;
            walked += c;
            while j < out.len() && walked >= Self::PLACE_STOPS[j] {
                out[j] = Some(place(slots, beyond));
                j += 1;
            }
        }
        // The walk ended first: the place of what it covered.
        while j < out.len() {
            out[j] = (walked > 0).then(|| place(slots, beyond));
            j += 1;
        }
        out
    }
}

/// [`count_feature`] without a branch, for a count below 2^63.
#[inline(always)]
fn count_bf(v: u64) -> i32 {
    min(v, COUNT_MAX as u64) as i32
}

/// [`crate::logscale::log_ratio_8`] without a branch: the same value (the clamp by multiplies).
#[inline(always)]
fn log_ratio_bf(num: u64, den: u64) -> u64 {
    // -263..=775 before the clamp (see log_ratio_8).
    let v = (log2_8(num) as i64 - log2_8(den) as i64 + LOG_RATIO_ONE as i64) as u64;
    let v = keep(1 ^ negative(v), v);
    min(v, LOG_RATIO_MAX as u64)
}

const _: () = assert!(LOG_RATIO_MAX < DUE_NONE * 4);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding (asserted above).
unsafe impl aya::Pod for QueueShape {}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn lanes_round_trip_in_feature_order() {
        let p = PositionFeatures {
            head_age_log: LOG_RATIO_MAX,
            older_half: COUNT_MAX,
            expired: 3,
            due_below: DUE_NONE,
            below_age_log: 7,
            recent: 9,
            lead_log: 11,
            due_count: 13,
        };
        assert_eq!(PositionFeatures::from_lanes(&p.to_lanes()), p);
        assert_eq!(
            PositionFeatures::from_lanes(&PositionFeatures::UNKNOWN.to_lanes()),
            PositionFeatures::UNKNOWN
        );
        // Lane i is Feature::POSITION[i].
        let r = crate::RequestRecord {
            insert_ns: 1,
            deadline_ns: 1 + 4 * MS,
            ..Default::default()
        };
        let x = crate::features::features_with_position(&r, &p);
        for (i, f) in crate::features::Feature::POSITION.iter().enumerate() {
            assert_eq!(x[f.index()], p.to_lanes()[i] as i32, "{}", f.name());
        }
    }

    #[test]
    fn shifts() {
        // 8 ms = 2^22.9 ns: bit length 23, slots of 2^20 ns (about 1 ms, 1/8 of it).
        assert_eq!(slot_shift(8 * MS), 20);
        assert_eq!(slot_shift(4 * MS), 19);
        assert_eq!(slot_shift(0), 0);
        assert_eq!(slot_shift(7), 0);
        // 1 GiB = 2^21 sectors over 256 buckets: 2^13 sectors each.
        assert_eq!(bucket_shift_for(1 << 21), 13);
        assert_eq!(bucket_shift_for((1 << 21) + 1), 14);
        assert_eq!(bucket_shift_for(10), 0);
        assert_eq!(bucket_of(3 << 15, 15), 3);
        assert_eq!(bucket_of(256 << 15, 15), 0);
    }

    #[test]
    fn empty_queue() {
        let mut q = QueueShape::EMPTY;
        let p = q.position(123, 15, 50 * MS, 8 * MS);
        assert_eq!(
            p,
            PositionFeatures {
                due_below: DUE_NONE,
                lead_log: LOG_RATIO_MAX,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_request_above_an_old_one_is_within_reach() {
        let mut q = QueueShape::EMPTY;
        let budget = 8 * MS;
        // An old request (inserted at 0) in bucket 10, young ones in buckets 20..24.
        q.on_insert(10 << 15, 15, 0, budget);
        for b in 20..24u64 {
            q.on_insert(b << 15, 15, 19 * MS, budget);
        }
        let now = 20 * MS;
        // Just above the old one: due right away, one request below.
        let p = q.position((11 << 15) + 5, 15, now, budget);
        assert_eq!(p.due_below, 1);
        // The head is 20 ms old: 2.5 budgets, 256 + 8 log2(2.5) ≈ 266.6 (±2).
        assert!((264..=269).contains(&p.head_age_log), "{p:?}");
        assert_eq!(p.expired, 1);
        assert_eq!(p.older_half, 1);
        assert!(p.below_age_log >= p.head_age_log - 2);
        // It is the head: no lead at all (0 ns, the bottom of the log scale).
        assert_eq!(p.due_count, 1);
        assert!(p.lead_log < 100, "{p:?}");
        // Far above it (beyond the walk): nothing due below.
        let p = q.position(40 << 15, 15, now, budget);
        assert_eq!((p.due_below, p.below_age_log), (DUE_NONE, 0));
        assert_eq!(p.lead_log, LOG_RATIO_MAX);
        // Above the young ones only (the old one is beyond the walk): they are
        // not due (age 1 ms < 20 - 8 ms).
        let p = q.position(30 << 15, 15, now, budget);
        assert_eq!(p.due_below, DUE_NONE);
        assert!(p.below_age_log < 256 - 16, "{p:?}");
        // The young ones head a batch only after about 19 ms: 2.4 budgets away.
        assert!((262..=269).contains(&p.lead_log), "{p:?}");
        // The young ones are recent.
        assert_eq!(p.recent, 4);
    }

    #[test]
    fn touching_the_walk_reads_only() {
        let mut q = QueueShape::EMPTY;
        for b in [0u64, 1, 7, 100, 255] {
            q.on_insert(b << 15, 15, MS, 8 * MS);
        }
        let before = q;
        // Every bucket, the lowest ones too (their walk's lines wrap, masked).
        for b in 0..SECTOR_BUCKETS as u64 {
            q.touch_walk(b << 15, 15);
            q.touch_walk(b, 0);
        }
        assert_eq!(q, before);
    }

    #[test]
    fn touching_the_walk_loads_the_walks_lines() {
        // Every line the walk down from b0 can read (buckets b0 - 15 to b0, not
        // below 0; two buckets a line) is b0's own (which the insert writes) or
        // one touch_walk loads; but for an even b0 the walk ends in the lower half
        // of a ninth line, b0 - 15's, which 7 loads leave out.
        for b0 in 0..SECTOR_BUCKETS as u64 {
            let touched: [u64; WALK_BUCKETS / 2 - 1] =
                core::array::from_fn(|i| walk_touch_bucket(b0, i as u64 + 1) as u64 / 2);
            for w in 0..(WALK_BUCKETS as u64).min(b0 + 1) {
                let line = (b0 - w) / 2;
                let left_out = b0 % 2 == 0 && w == WALK_BUCKETS as u64 - 1;
                assert_eq!(
                    line == b0 / 2 || touched.contains(&line),
                    !left_out,
                    "b0 {b0}, bucket {}",
                    b0 - w
                );
            }
        }
    }

    #[test]
    fn touching_the_slot_count_reads_only_in_range() {
        let mut q = QueueShape::EMPTY;
        q.on_insert(3 << 15, 15, MS, 8 * MS);
        let before = q;
        // Every slot of the ring and every bucket, at any budget (0 and past any
        // expiry too): the indices stay in range, nothing is written.
        for budget in [0, 1, 8 * MS, 500 * MS, u64::MAX >> 1] {
            for k in 0..2 * AGE_SLOTS as u64 {
                let now = k << slot_shift(budget);
                for b in [0u64, 1, 255, 256, 1 << 40] {
                    q.touch_slot_count(b << 15, 15, now, budget);
                }
            }
        }
        assert_eq!(q, before);
    }

    #[test]
    fn touching_the_slot_count_loads_the_cell_the_insert_writes() {
        // The cell touch_slot_count loads is the one on_insert counts the request
        // in, and no other changes, at any expiry and period of the ring.
        for budget in [MS, 8 * MS, 500 * MS] {
            for k in [1u64, 2, 63, 64, 65, 1000] {
                for sector in [0u64, 5 << 15, 255 << 15, (256 << 15) + 7] {
                    let now = k << slot_shift(budget);
                    let mut q = QueueShape::EMPTY;
                    q.on_insert(sector, 15, now, budget);
                    let (s, b) = slot_count_cell(sector, 15, now, budget);
                    assert_eq!(q.slot_bucket_count[s][b].net(), 1, "budget {budget}, k {k}");
                    let total: u32 = q.slot_bucket_count.iter().flatten().map(Tally::net).sum();
                    assert_eq!(total, 1);
                }
            }
        }
    }

    #[test]
    fn removal_restores_the_state() {
        let mut q = QueueShape::EMPTY;
        let budget = 4 * MS;
        let reqs = [(5u64 << 15, MS), (5 << 15 | 9, 2 * MS), (60 << 15, 3 * MS)];
        for &(s, t) in &reqs {
            q.on_insert(s, 15, t, budget);
        }
        assert_eq!(q.queued.net(), 3);
        for &(s, t) in &reqs {
            q.on_remove(s, 15, t, budget);
        }
        assert_eq!(q.queued.net(), 0);
        assert!(q.buckets.iter().all(|bk| bk.count.net() == 0));
        assert!(q.ring.iter().all(|r| r.count.net() == 0));
        // A remove without its insert (attached mid-I/O) takes the count below
        // 0, which reads as an empty queue; the insert it lacked brings it back.
        q.on_remove(7, 15, 0, budget);
        assert_eq!(q.queued.net() as i32, -1);
        let mut empty = QueueShape::EMPTY;
        assert_eq!(
            q.position(9, 15, 5 * MS, budget),
            empty.position(9, 15, 5 * MS, budget)
        );
        q.on_insert(7, 15, 6 * MS, budget);
        assert_eq!(q.queued.net(), 0);
    }

    #[test]
    fn the_bucket_bitmap_follows_the_counts() {
        let mut q = QueueShape::EMPTY;
        let budget = 4 * MS;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        // The queued requests (sector, insert time): a fixed array (no_std).
        let mut queued = [(0u64, 0u64); 3000];
        let mut n = 0usize;
        for i in 0..3000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = i * 1000;
            if !x.is_multiple_of(3) || n == 0 {
                // Clustered sectors, so that buckets fill and empty again.
                let s = ((x >> 8) % 40 + 100) << 15 | (x >> 50);
                q.on_insert(s, 15, t, budget);
                queued[n] = (s, t);
                n += 1;
            } else {
                let i = (x as usize >> 4) % n;
                let (s, at) = queued[i];
                n -= 1;
                queued[i] = queued[n];
                q.on_remove(s, 15, at, budget);
            }
            for b in 0..SECTOR_BUCKETS {
                let (w, bit) = bucket_bit(b);
                assert_eq!(
                    q.buckets_occupied[w] & bit != 0,
                    q.buckets[b].count.net() != 0,
                    "bucket {b}"
                );
            }
        }
        // The walk's window: the occupied buckets from b0 down, none below 0.
        for b0 in 0..SECTOR_BUCKETS as u64 {
            let mut want = 0u64;
            for w in 0..WALK_BUCKETS as u64 {
                if w <= b0 && q.buckets[(b0 - w) as usize].count.net() != 0 {
                    want |= 1 << w;
                }
            }
            assert_eq!(q.occupied_below(b0), want, "bucket {b0}");
        }
        let mut full = QueueShape::EMPTY;
        full.buckets_occupied = [u64::MAX; 4];
        assert_eq!(full.occupied_below(255), 0xffff);
        assert_eq!(full.occupied_below(130), 0xffff);
        assert_eq!(full.occupied_below(5), 0x3f);
        assert_eq!(full.occupied_below(0), 1);
    }

    #[test]
    fn a_bucket_gets_younger_when_its_oldest_leaves() {
        // In a deep queue a bucket never empties; its oldest must still follow
        // the requests that leave (the first form kept it until the bucket emptied).
        let mut q = QueueShape::EMPTY;
        let budget = 8 * MS; // slots of 2^20 ns
        q.on_insert(10 << 15, 15, MS, budget);
        q.on_insert((10 << 15) + 8, 15, 30 * MS, budget);
        let old = q.position((11 << 15) + 1, 15, 40 * MS, budget);
        // The oldest is 39 ms old: 38 periods of 2^20 ns (periods 0 and 38).
        assert_eq!(old.below_age_log, log_ratio_8(38 << 20, budget));
        q.on_remove(10 << 15, 15, MS, budget);
        let p = q.position((11 << 15) + 1, 15, 40 * MS, budget);
        // Now the one inserted at 30 ms (period 28): 10 periods.
        assert_eq!(p.below_age_log, log_ratio_8(10 << 20, budget));
        assert!(p.below_age_log < old.below_age_log);
        // The ring comes round (80 slots later) without an insert into the
        // bucket: the remaining request is older than the ring, not 16 slots.
        let p = q.position((11 << 15) + 1, 15, 30 * MS + (80 << 20), budget);
        assert_eq!(p.below_age_log, log_ratio_8(64 << 20, budget));
        assert_eq!(p.head_age_log, log_ratio_8(64 << 20, budget));
        // An insert into the bucket then moves the reused slot's request to the
        // old ones: the bucket's oldest stays older than the ring.
        let now = 30 * MS + (81 << 20);
        q.on_insert((10 << 15) + 16, 15, now, budget);
        assert_eq!((q.buckets[10].count.net(), q.buckets[10].old.net()), (2, 1));
        let p = q.position((11 << 15) + 1, 15, now + (3 << 20), budget);
        assert_eq!(p.below_age_log, log_ratio_8(64 << 20, budget));
        // Until it leaves.
        q.on_remove((10 << 15) + 8, 15, 30 * MS, budget);
        assert_eq!(q.buckets[10].old.net(), 0);
        let p = q.position((11 << 15) + 1, 15, now + (3 << 20), budget);
        assert_eq!(p.below_age_log, log_ratio_8(3 << 20, budget));
    }

    #[test]
    fn places_count_the_older_requests() {
        let mut q = QueueShape::EMPTY;
        let budget = 8 * MS; // slots of 2^20 ns
        assert_eq!(q.walk_places(12 << 15, 15, MS, budget), [None; 3]);
        q.on_insert(10 << 15, 15, MS, budget); // A, the oldest
        q.on_insert(5 << 15, 15, 10 * MS, budget); // B
        q.on_insert(11 << 15, 15, 20 * MS, budget); // C, just below bucket 12
        let now = 30 * MS;
        q.position(12 << 15, 15, now, budget);
        // One request below: C, with A and B older. Four or sixteen: the walk
        // ends at bucket 0 with three, and their oldest, A, has none older.
        assert_eq!(
            q.walk_places(12 << 15, 15, now, budget),
            [Some(2), Some(0), Some(0)]
        );
        // From bucket 10 down: A first, then B.
        assert_eq!(q.walk_places(10 << 15, 15, now, budget), [Some(0); 3]);
    }

    #[test]
    fn another_expiry_starts_the_buckets_over() {
        // The expiry grows (8 → 64 ms): periods 8 times as wide, so their numbers
        // fall. The buckets must not keep the old numbers as "brought up to date
        // later than now", or the new slots would never read as reused.
        let mut q = QueueShape::EMPTY;
        q.on_insert(10 << 15, 15, 900 * MS, 8 * MS);
        let wide = 64 * MS; // slots of 2^23 ns
        let t0 = 1000 * MS;
        q.on_insert((10 << 15) + 8, 15, t0, wide);
        assert_eq!(q.buckets[10].epoch, t0 >> 23);
        // 80 wide periods later the request inserted at t0 has left the ring.
        let p = q.position((11 << 15) + 1, 15, t0 + (80 << 23), wide);
        assert_eq!(p.below_age_log, log_ratio_8(64 << 23, wide));
    }

    /// Every tally of the state, in a fixed order.
    fn tallies(q: &QueueShape) -> impl Iterator<Item = &Tally> {
        core::iter::once(&q.queued)
            .chain(core::iter::once(&q.in_ring))
            .chain(q.buckets.iter().flat_map(|bk| [&bk.count, &bk.old]))
            .chain(q.ring.iter().map(|r| &r.count))
            .chain(q.slot_bucket_count.iter().flatten())
    }

    #[test]
    fn inserts_write_only_their_halves_and_removes_only_theirs() {
        // The contract that lets an insert use plain stores: it never writes a
        // half that removes (on other CPUs, at the same time) write, and a remove
        // never writes the inserts' halves. Over a queue that fills, drains, and
        // outlives the ring (slots reused, counts moved to the old ones), with
        // the expiry changed halfway.
        let mut q = QueueShape::EMPTY;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut queued = [(0u64, 0u64, 0u64); 512];
        let mut n = 0usize;
        let (mut inserts, mut removes) = (0, 0);
        for i in 0..6000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let now = i * 150_000;
            let budget = if i < 3000 { 4 * MS } else { 12 * MS };
            let before = q;
            if (x % 5 < 3 || n == 0) && n < queued.len() {
                let s = ((x >> 8) % 30 + 100) << 15 | (x >> 50);
                q.on_insert(s, 15, now, budget);
                queued[n] = (s, now, budget);
                n += 1;
                inserts += 1;
                for (a, b) in tallies(&before).zip(tallies(&q)) {
                    assert_eq!(a.removed, b.removed, "an insert wrote a removes' half");
                }
            } else {
                let j = (x as usize >> 4) % n;
                let (s, at, budget) = queued[j];
                n -= 1;
                queued[j] = queued[n];
                q.on_remove(s, 15, at, budget);
                removes += 1;
                for (a, b) in tallies(&before).zip(tallies(&q)) {
                    assert_eq!(a.added, b.added, "a remove wrote an inserts' half");
                }
            }
        }
        assert!(inserts > 3000 && removes > 2000, "{inserts} {removes}");
        assert!(
            q.buckets.iter().any(|bk| bk.old.added != 0),
            "no count moved"
        );
    }

    #[test]
    fn requests_older_than_the_ring_count_as_old() {
        let mut q = QueueShape::EMPTY;
        let budget = 8 * MS; // slots of 2^20 ns, ring of 64 slots ≈ 67.1 ms
        q.on_insert(0, 15, 0, budget);
        let now = 100 * MS;
        q.on_insert(1 << 15, 15, now, budget); // 95 slots later: the first left the ring
        let p = q.position(2 << 15, 15, now + 1, budget);
        assert_eq!(p.expired, 1);
        // Head age saturates at the ring's span (64 << 20 ns ≈ 8.4 budgets).
        assert_eq!(p.head_age_log, log_ratio_8(64 << 20, budget));
    }
}
