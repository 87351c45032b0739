//! What happens to a request, whatever the attach mode: the entry is found by the
//! mode's own code (raw_tp.rs: by device slot and scheduler tag; tp.rs: by
//! (dev, sector)) and handed in here.
//!
//! An entry goes QUEUED (inserted) → ISSUED → freed at completion, with REQUEUED
//! (back in the scheduler after a requeue) on the side; a flush, which never passes
//! the scheduler, starts at its issue as BYPASS. Every event on a traced device that
//! finds no entry is counted for what it is.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_jiffies64, bpf_ringbuf_query},
    },
    EbpfContext,
};
use kml_ebpf_common::{
    abi::names::stage,
    device::{count_between, DeviceSlot, ReqState},
    label::{fifo_time_fallback, miss_share_step},
    layout::ablate,
    op::{Direction, ReqOp},
    position::{budget_of, direction_index},
    record::ewma_step,
    record::Known,
    Counter, Counters, RecordBatch, RequestRecord, Sampling, Verdict, BATCH_RECORDS,
};

use crate::maps::{
    add32, count, counters, device_event, layout, load32, tick_phase, Handoff, BATCHES, DEVICES,
    HANDOFF, INFER, MODEL_CONTROL, RECORDS, SHAPES,
};

/// Where an entry is in its life (`ReqState::phase`).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Phase {
    Free = 0,
    Queued = 1,
    Issued = 2,
    Requeued = 3,
    Bypass = 4,
}

/// The lifecycle's clock (`bpf_ktime_get_ns`; jiffies under the cost probe
/// `ablate::PROBE_NO_CLOCK`).
#[inline(always)]
fn clock_ns() -> u64 {
    if layout!(ablate) & ablate::PROBE_NO_CLOCK != 0 {
        return unsafe { bpf_jiffies64() } << 22;
    }
    unsafe { bpf_ktime_get_ns() }
}

/// What every event knows of a request, whatever the attach mode.
pub struct Req {
    pub sector: u64,
    pub nr_sectors: u32,
    pub op: ReqOp,
    pub flags: u8,
    pub ioprio: u16,
}

/// A direction's counts in its device slot: requests inserted (the inserts'
/// line), that left the queue (the issues' line), that left flight (the
/// completions' line). See `DeviceSlot`.
struct DirCounts {
    inserted: *mut u32,
    unqueued: *mut u32,
    done: *mut u32,
}

#[inline(always)]
fn counts_of(s: *mut DeviceSlot, dir: Direction) -> DirCounts {
    unsafe {
        match dir {
            Direction::Read => DirCounts {
                inserted: &raw mut (*s).inserted_read,
                unqueued: &raw mut (*s).unqueued_read,
                done: &raw mut (*s).done_read,
            },
            Direction::Write => DirCounts {
                inserted: &raw mut (*s).inserted_write,
                unqueued: &raw mut (*s).unqueued_write,
                done: &raw mut (*s).done_write,
            },
        }
    }
}

impl DirCounts {
    /// `(in flight, queued)` given the inserted count.
    #[inline(always)]
    fn with(&self, inserted: u32) -> (u32, u32) {
        (
            count_between(inserted, load32(self.done)),
            count_between(inserted, load32(self.unqueued)),
        )
    }
}

/// Gives back what an entry holds in its device's counts (by phase: a queued
/// entry leaves the queue and flight, an issued one flight).
#[inline(always)]
pub fn release(s: *mut DeviceSlot, e: *mut ReqState) {
    let (phase, op) = unsafe { ((*e).phase, (*e).rec.op) };
    let c = counts_of(s, ReqOp::from_u8(op).direction());
    if phase == Phase::Queued as u32 || phase == Phase::Requeued as u32 {
        add32(c.unqueued, 1);
        add32(c.done, 1);
    } else if phase == Phase::Issued as u32 {
        add32(c.done, 1);
    }
}

/// `block_rq_insert` of a traced device. `owner` identifies the request in the
/// entry (its `struct request *`; 1 in classic tracepoint mode, where the key does).
/// Returns true when the entry is new and scored by the inference stage (the
/// caller has then set up the hand-off).
#[inline(always)]
pub fn on_insert(
    s: *mut DeviceSlot,
    slot: u32,
    e: *mut ReqState,
    owner: u64,
    dev: u32,
    r: &Req,
) -> bool {
    let c = counters();
    bump(c, Counter::Inserts);
    device_event(slot, |d| d.inserts += 1);
    let now = clock_ns();
    // The miss shares right at `now`: the host replays them in ns order
    // (`kml_learn::replay::replay_miss_shares`), and an issue that steps them
    // between this clock read and a later read would be out of that order.
    let no_load = layout!(ablate) & ablate::PROBE_NO_LOAD_STATE != 0;
    let miss_shares = if no_load {
        (0, 0)
    } else {
        unsafe { ((*s).miss_share_read, (*s).miss_share_write) }
    };
    let jiffies = unsafe { bpf_jiffies64() };
    let (phase_known, phase) = match tick_phase(jiffies, now) {
        Some(p) => (Known::TICK_PHASE, p),
        None => (0, 0),
    };
    let dir = r.op.direction();
    let (expire, expire_jiffies) = unsafe {
        match dir {
            Direction::Read => ((*s).read_expire_ns, (*s).read_expire_jiffies),
            Direction::Write => ((*s).write_expire_ns, (*s).write_expire_jiffies),
        }
    };
    // The scheduler's deadline: raw tracepoints read `rq->fifo_time` at issue (it
    // is set after this tracepoint); classic tracepoints compute what the scheduler
    // computes (see kml_ebpf_common::label).
    let fifo_time = if crate::tp::enabled() {
        fifo_time_fallback(jiffies, expire_jiffies)
    } else {
        0
    };

    touch_shape(
        slot,
        r.op as u8,
        r.sector,
        unsafe { (*s).bucket_shift },
        now,
        expire,
    );
    let (old_owner, old_phase) = unsafe { ((*e).rq, (*e).phase) };
    if old_owner == owner && old_phase == Phase::Requeued as u32 {
        // Requeued and inserted again: mq-deadline gives it a fresh deadline (the
        // requeue put it back in the queued count).
        bump(c, Counter::Reinserts);
        unsafe {
            (*e).phase = Phase::Queued as u32;
            (*e).rec.insert_ns = now;
            (*e).rec.deadline_ns = now + expire;
            (*e).rec.insert_jiffies = jiffies;
            (*e).rec.fifo_time = fifo_time;
            (*e).rec.tick_phase = phase;
            (*e).rec.known = ((*e).rec.known & !Known::TICK_PHASE) | phase_known;
            // The verdict was for the first insert's features and deadline: no
            // verdict now (neither the hook nor the live confusion matrix may use
            // it against the new deadline).
            (*e).rec.verdict = Verdict::NONE;
        }
        return false;
    }
    if old_owner != 0 {
        stale(c, s, slot, e);
    }

    // The others (the counts before this request). Inserts of a device run one
    // at a time (see `DeviceSlot`): the inserted counts are exact here, read and
    // written with plain accesses.
    let counts = counts_of(s, dir);
    let other = counts_of(
        s,
        match dir {
            Direction::Read => Direction::Write,
            Direction::Write => Direction::Read,
        },
    );
    let ((inflight_same, queued_same), (inflight_other, queued_other)) =
        if layout!(ablate) & ablate::PROBE_NO_COUNTS != 0 {
            ((0, 0), (0, 0))
        } else {
            let n = load32(counts.inserted);
            unsafe { core::ptr::write_volatile(counts.inserted, n.wrapping_add(1)) };
            (counts.with(n), other.with(load32(other.inserted)))
        };
    let (inflight_read, inflight_write, queued_read, queued_write) = match dir {
        Direction::Read => (inflight_same, inflight_other, queued_same, queued_other),
        Direction::Write => (inflight_other, inflight_same, queued_other, queued_same),
    };
    // Racy across CPUs by design: these are features, not accounting.
    let (since_last, distance, issue_gap, dir_wait) = if no_load {
        (0, 0, 0, 0)
    } else {
        unsafe {
            let last = (*s).last_insert_ns;
            (*s).last_insert_ns = now;
            let end = (*s).last_issue_end_sector;
            (
                if last != 0 && now > last {
                    now - last
                } else {
                    0
                },
                r.sector.abs_diff(end),
                (*s).issue_gap_ewma_ns,
                match dir {
                    Direction::Read => (*s).wait_ewma_read_ns,
                    Direction::Write => (*s).wait_ewma_write_ns,
                },
            )
        }
    };
    unsafe {
        (*e).rq = owner;
        (*e).phase = Phase::Queued as u32;
        (*e).slot = slot as u16;
        (*e).flags = 0;
    }
    if layout!(ablate) & ablate::PROBE_NO_ENTRY_WRITE != 0 {
        // Cost probe: the record's first fields only, on the entry's first line.
        unsafe {
            (*e).rec.sector = r.sector;
            (*e).rec.insert_ns = now;
            (*e).rec.deadline_ns = now + expire;
        }
    } else {
        unsafe {
            (*e).rec = RequestRecord {
                sector: r.sector,
                insert_ns: now,
                issue_ns: 0,
                complete_ns: 0,
                deadline_ns: now + expire,
                since_last_insert_ns: since_last,
                issue_distance: distance,
                dir_wait_ewma_ns: dir_wait,
                issue_gap_ewma_ns: issue_gap,
                score: 0,
                dev,
                nr_sectors: r.nr_sectors,
                pid: (bpf_get_current_pid_tgid() >> 32) as u32,
                error: 0,
                inflight_read,
                inflight_write,
                queued_read,
                queued_write,
                model_version: 0,
                requeues: 0,
                ioprio: r.ioprio,
                op: r.op as u8,
                flags: r.flags,
                verdict: Verdict::NONE,
                sampling: 0,
                complete_bytes: 0,
                insert_jiffies: jiffies,
                issue_jiffies: 0,
                fifo_time,
                position: [0; kml_ebpf_common::position::LANES],
                known: Known::BUCKET_SHIFT | Known::MISS_SHARE | phase_known,
                bucket_shift: (*s).bucket_shift as u8,
                miss_share_read: miss_shares.0 as u16,
                miss_share_write: miss_shares.1 as u16,
                tick_phase: phase,
            }
        };
    }
    bump(c, Counter::InflightAdded);
    position_on() || model_active()
}

/// Whether the inference stage takes each new request's position
/// ([`shape_insert`]): while the active model reads a position feature, or
/// always when the agent asked
/// (`KernelLayout::position_always`; then insert hands every new entry to the
/// stage, model or not). A request inserted while it was off never joins the
/// state, and its dispatch does not leave it (`ReqState::SHAPED`).
#[inline(always)]
pub fn position_on() -> bool {
    // Raw tracepoints only: classic tracepoint programs are skipped when a BPF
    // program runs on the CPU already (the kernel's per-CPU recursion guard:
    // 24 to 585 recursion misses per 8,192 I/Os measured under the concurrency
    // test, more on a loaded machine), and a request follows its sector there,
    // which a front merge moves. Each lost dispatch stays in the position state:
    // with it kept in this mode, the state drifted until none of the second half's
    // positions matched the host's replay.
    crate::raw_tp::enabled()
        && kml_ebpf_common::position::KERNEL_COMPUTES_POSITION
        && layout!(ablate) & ablate::PROBE_NO_POSITION == 0
        && (layout!(position_always) != 0 || model_uses_position())
}

/// The active model reads a position feature (`ModelControl::USES_POSITION`).
#[inline(always)]
fn model_uses_position() -> bool {
    match MODEL_CONTROL.get_ptr(0) {
        Some(c) => unsafe {
            core::ptr::read_volatile(&raw const (*c).kind) != 0
                && core::ptr::read_volatile(&raw const (*c).flags)
                    & kml_ebpf_common::slot::ModelControl::USES_POSITION
                    != 0
        },
        None => false,
    }
}

/// Starts the load of the first line of the request's direction's queue shape
/// (`SHAPES`), which [`shape_insert`] reads first in the inference stage: every
/// dispatch, on any CPU, writes that line, so an insert nearly always misses it.
/// Started here, before the entry's own first touch (another miss: the entry was
/// last written on the other CPU), the two misses overlap instead of following
/// each other: about 20-25 ns per insert on a deep queue (docs/learning.md, "Cost
/// in the kernel"). With it, the lines of the walk down from the request's
/// bucket (`QueueShape::touch_walk`): another 18 ns. And the line of the slot
/// table the insert will write (`QueueShape::touch_slot_count`), cold when a
/// period of the ring starts at the workloads' expiries: -21 and -28 ns per
/// insert in two runs at 8 ms, -11 at mq-deadline's default expiries. Reads
/// only; their values are not used. (Not kept: the same at dispatch, before its
/// atomic adds to the line, saved nothing, since a read brings the line shared
/// and the add must still take it; and the young ring slots' lines, which the
/// stage reads first, saved nothing either: -5 ns, rounds -34 to +25.)
#[inline(always)]
fn touch_shape(slot: u32, op: u8, sector: u64, bucket_shift: u32, now: u64, budget: u64) {
    if !position_on() {
        return;
    }
    if let Some(shapes) = SHAPES.get_ptr(slot) {
        if let Some(q) = unsafe { (*shapes).get(direction_index(op)) } {
            // SAFETY: a reference into the map value, valid for a read.
            unsafe { core::ptr::read_volatile(&raw const q.ring_shift) };
            q.touch_walk(sector, bucket_shift);
            q.touch_slot_count(sector, bucket_shift, now, budget);
        }
    }
}

/// The request's place in its direction's queue (`SHAPES`), taken before it
/// joins, into the entry; then it joins. Run by the inference stage before it
/// reads the entry, when [`position_on`].
#[inline(always)]
pub fn shape_insert(e: *mut ReqState) {
    if !position_on() {
        return;
    }
    // Branch-free from the entry to the lanes (budget, direction, shift: see
    // kml_ebpf_common::position): one path through the verifier.
    let (slot, op, sector, now, budget) = unsafe {
        (
            (*e).slot as u32,
            (*e).rec.op,
            (*e).rec.sector,
            (*e).rec.insert_ns,
            budget_of((*e).rec.insert_ns, (*e).rec.deadline_ns),
        )
    };
    let Some(s) = DEVICES.get_ptr_mut(slot) else {
        return;
    };
    let Some(shapes) = SHAPES.get_ptr_mut(slot) else {
        return;
    };
    let Some(q) = (unsafe { (*shapes).get_mut(direction_index(op)) }) else {
        return;
    };
    let shift = unsafe { (*s).bucket_shift };
    unsafe {
        let p = q.position(sector, shift, now, budget);
        q.on_insert(sector, shift, now, budget);
        (*e).rec.position = p.to_lanes();
        (*e).rec.known |= Known::POSITION;
        (*e).flags |= ReqState::SHAPED;
    }
}

/// The request leaves its direction's queue (dispatched, merged away, or found
/// stale): out of `SHAPES`, with the values it joined with.
#[inline(always)]
fn shape_remove(s: *mut DeviceSlot, e: *mut ReqState) {
    if !position_on() || unsafe { (*e).flags } & ReqState::SHAPED == 0 {
        return;
    }
    unsafe { (*e).flags &= !ReqState::SHAPED };
    let (slot, sector, insert_ns, budget, op) = unsafe {
        (
            (*e).slot as u32,
            (*e).rec.sector,
            (*e).rec.insert_ns,
            budget_of((*e).rec.insert_ns, (*e).rec.deadline_ns),
            (*e).rec.op,
        )
    };
    let Some(shapes) = SHAPES.get_ptr_mut(slot) else {
        return;
    };
    if let Some(q) = unsafe { (*shapes).get_mut(direction_index(op)) } {
        q.on_remove(sector, unsafe { (*s).bucket_shift }, insert_ns, budget);
    }
}

/// The entry of an earlier request under this tag (or key) is still there when a
/// new request takes it: the earlier one's completion was never seen (the kernel
/// did not run the completion program for it: measured at 0.01–0.02% of the
/// completions under deep random reads, for bpftrace's programs as well, see the
/// issue 14 notes). On a 6.18 guest kernel (2026-12-03) ftrace saw every
/// `block_rq_complete` while the program's `run_cnt` fell short by 0.1–0.2%,
/// with no recursion miss counted. The runs missing were softirq completions
/// run in the context of one thread of the guest's init (every one there), and
/// some during a loop of BPF map lookups. No program can see them; kml counts
/// them here (or as entries left live). Its record goes out now, with
/// `complete_ns` 0 ("completion not seen"): insert, issue, the deadline and the
/// label are known. An entry never issued carries no label and is only counted.
#[inline(always)]
fn stale(c: Option<*mut Counters>, s: *mut DeviceSlot, slot: u32, e: *mut ReqState) {
    bump(c, Counter::StaleEntries);
    device_event(slot, |d| d.stale_entries += 1);
    let phase = unsafe { (*e).phase };
    if phase == Phase::Queued as u32 {
        bump(c, Counter::StaleNeverIssued);
    }
    shape_remove(s, e);
    release(s, e);
    bump(c, Counter::InflightRemoved);
    if phase == Phase::Issued as u32 || phase == Phase::Bypass as u32 {
        unsafe {
            (*e).rec.complete_ns = 0;
            emit(c, slot, &raw const (*e).rec);
        }
    }
}

/// Hands the new entry to the inference stage (a tail call: does not return when
/// it succeeds). `fill` names the entry in the hand-off.
#[inline(always)]
pub fn infer<C: EbpfContext>(ctx: &C, fill: impl FnOnce(&mut Handoff)) {
    let Some(h) = HANDOFF.get_ptr_mut(0) else {
        return count(Counter::ModelRejects);
    };
    fill(unsafe { &mut *h });
    unsafe { INFER.tail_call(ctx, stage::INFER) };
    count(Counter::ModelRejects);
}

#[inline(always)]
fn model_active() -> bool {
    match MODEL_CONTROL.get_ptr(0) {
        Some(c) => unsafe { core::ptr::read_volatile(&raw const (*c).kind) != 0 },
        None => false,
    }
}

#[inline(always)]
fn bump(c: Option<*mut Counters>, k: Counter) {
    if let Some(p) = c {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *(*p).slot(k) += 1 };
    }
}

/// `block_rq_issue` of a request with an entry (`e` checked by the caller).
/// `fifo_time` (the scheduler's deadline; raw tracepoints) and `end_sector` (the
/// extent as dispatched) are read only here.
#[inline(always)]
pub fn on_issue(
    s: *mut DeviceSlot,
    e: *mut ReqState,
    fifo_time: impl FnOnce() -> Option<u64>,
    end_sector: u64,
) {
    count(Counter::Issues);
    let jiffies = unsafe { bpf_jiffies64() };
    let no_load = layout!(ablate) & ablate::PROBE_NO_LOAD_STATE != 0;
    unsafe {
        let phase = (*e).phase;
        if phase == Phase::Issued as u32 || phase == Phase::Bypass as u32 {
            // Dispatched twice without a requeue seen: keep the first dispatch.
            return;
        }
        let dir = ReqOp::from_u8((*e).rec.op).direction();
        shape_remove(s, e);
        (*e).phase = Phase::Issued as u32;
        (*e).rec.issue_jiffies = jiffies;
        if let Some(t) = fifo_time() {
            (*e).rec.fifo_time = t;
        }
        // Its label is known now: into the direction's miss share, a feature of
        // the next inserts.
        let missed = (*e).rec.deadline_missed();
        if !no_load {
            step_miss_share(
                match dir {
                    Direction::Read => &raw mut (*s).miss_share_read,
                    Direction::Write => &raw mut (*s).miss_share_write,
                },
                missed,
            );
        }
        // The clock right after the step, as insert reads the shares right after
        // its clock: the host replays steps and reads in ns order.
        let now = clock_ns();
        (*e).rec.issue_ns = now;
        add32(counts_of(s, dir).unqueued, 1);
        if no_load {
            return;
        }
        // How long this direction's queue makes requests wait, and how fast the
        // device drains: features of the next inserts.
        let wait = now.saturating_sub((*e).rec.insert_ns);
        match dir {
            Direction::Read => (*s).wait_ewma_read_ns = ewma_step((*s).wait_ewma_read_ns, wait),
            Direction::Write => (*s).wait_ewma_write_ns = ewma_step((*s).wait_ewma_write_ns, wait),
        }
        let last = (*s).last_issue_ns;
        if last != 0 && now > last {
            (*s).issue_gap_ewma_ns = ewma_step((*s).issue_gap_ewma_ns, now - last);
        }
        (*s).last_issue_ns = now;
        (*s).last_issue_end_sector = end_sector;
    }
}

/// One step of a miss share, compare-and-swapped: two CPUs dispatching at once
/// would otherwise lose a step, and the share would then differ from the host's
/// replay for many inserts after. Bounded: a step that loses four races in a row
/// is dropped.
#[inline(always)]
fn step_miss_share(p: *mut u32, missed: bool) {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering};
    for _ in 0..4 {
        // SAFETY: `p` points into a map value that outlives the program run,
        // 4-aligned.
        let old = unsafe { core::ptr::read_volatile(p) };
        let new = miss_share_step(old, missed);
        if new == old {
            // A step that changes nothing (no misses lately, or all): no locked
            // write of the line both CPUs dispatch on. Exact: the step is ordered
            // at this read, before any step that raced with it.
            return;
        }
        let (_, swapped) = unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
        };
        if swapped {
            return;
        }
    }
}

/// `block_rq_issue` of a flush on a traced device: a record of its own starts
/// here (it never passed the scheduler: no insert, no deadline). `e` is free or
/// holds a stale entry.
#[inline(always)]
pub fn on_flush_issue(s: *mut DeviceSlot, slot: u32, e: *mut ReqState, owner: u64, dev: u32) {
    let c = counters();
    bump(c, Counter::Issues);
    bump(c, Counter::Flushes);
    device_event(slot, |d| d.flushes += 1);
    let now = clock_ns();
    let jiffies = unsafe { bpf_jiffies64() };
    if unsafe { (*e).rq } != 0 {
        stale(c, s, slot, e);
    }
    unsafe {
        (*e).rq = owner;
        (*e).phase = Phase::Bypass as u32;
        (*e).slot = slot as u16;
        (*e).flags = 0;
        (*e).rec = RequestRecord {
            insert_ns: now,
            issue_ns: now,
            deadline_ns: now,
            dev,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            op: ReqOp::Flush as u8,
            insert_jiffies: jiffies,
            issue_jiffies: jiffies,
            ..RequestRecord::default()
        };
    }
    bump(c, Counter::InflightAdded);
}

/// `block_rq_requeue` of a request with an entry.
#[inline(always)]
pub fn on_requeue(s: *mut DeviceSlot, e: *mut ReqState) {
    count(Counter::Requeues);
    unsafe {
        (*e).rec.requeues = (*e).rec.requeues.saturating_add(1);
        if (*e).phase == Phase::Issued as u32 {
            // Back in the scheduler: queued again until the next issue.
            (*e).phase = Phase::Requeued as u32;
            (*e).rec.issue_ns = 0;
            (*e).rec.issue_jiffies = 0;
            // One fewer has left the queue (-1, wrapping).
            add32(
                counts_of(s, ReqOp::from_u8((*e).rec.op).direction()).unqueued,
                u32::MAX,
            );
        }
    }
}

/// `block_rq_merge`: a queued request merged into another is freed without
/// completing.
#[inline(always)]
pub fn on_merge(s: *mut DeviceSlot, slot: u32, e: *mut ReqState) {
    let c = counters();
    bump(c, Counter::Merges);
    device_event(slot, |d| d.rq_merges += 1);
    shape_remove(s, e);
    release(s, e);
    unsafe { (*e).rq = 0 };
    unsafe { (*e).phase = Phase::Free as u32 };
    bump(c, Counter::InflightRemoved);
}

/// `block_rq_merge` of a request without an entry: merged as it was being
/// inserted (`blk_mq_sched_try_insert_merge`, before the insert event).
#[inline(always)]
pub fn on_merge_before_insert(slot: u32) {
    let c = counters();
    bump(c, Counter::Merges);
    bump(c, Counter::MergesAtInsert);
    device_event(slot, |d| d.rq_merges += 1);
}

/// `block_rq_complete` of a request with an entry, whole (the caller has told a
/// partial completion apart).
#[inline(always)]
pub fn on_complete(s: *mut DeviceSlot, slot: u32, e: *mut ReqState, error: i32, bytes: u32) {
    let c = counters();
    bump(c, Counter::Completions);
    let now = clock_ns();
    shape_remove(s, e);
    release(s, e);
    unsafe {
        (*e).rec.complete_ns = now;
        (*e).rec.error = error;
        (*e).rec.complete_bytes = bytes;
        if (*e).phase != Phase::Bypass as u32 {
            // Shadow mode: the verdict given at insert against what happened.
            let missed = (*e).rec.deadline_missed();
            match ((*e).rec.verdict, missed) {
                (Verdict::AT_RISK, true) => bump(c, Counter::TrueMiss),
                (Verdict::AT_RISK, false) => bump(c, Counter::FalseMiss),
                (Verdict::MEETS, false) => bump(c, Counter::TrueMet),
                (Verdict::MEETS, true) => bump(c, Counter::FalseMet),
                _ => {}
            }
        }
        emit(c, slot, &raw const (*e).rec);
        (*e).rq = 0;
        (*e).phase = Phase::Free as u32;
    }
    bump(c, Counter::InflightRemoved);
}

/// One finished request into the ring buffer.
#[inline(always)]
unsafe fn emit(c: Option<*mut Counters>, slot: u32, rec: *const RequestRecord) {
    let Some(c) = c else { return };
    // The per-CPU record count: this CPU's records in sequence.
    let seq = unsafe { (*c).records };
    let sample_fill = layout!(sample_fill_bytes) as u64;
    if layout!(ablate) & ablate::WAKE_BY_QUERY != 0 {
        return unsafe { emit_by_query(c, slot, rec) };
    }
    if layout!(ablate) & ablate::PROBE_NO_RING != 0 {
        unsafe { (*c).sampled_out += 1 };
        return;
    }
    if layout!(ablate) & ablate::PROBE_RECORD_64 != 0 {
        if let Some(mut entry) = RECORDS.reserve_untyped::<[u8; 64]>(0) {
            unsafe {
                core::ptr::copy_nonoverlapping(rec.cast::<[u8; 64]>(), entry.as_mut_ptr(), 1)
            };
            entry.submit(BPF_RB_NO_WAKEUP as u64);
            unsafe { (*c).records += 1 };
        }
        return;
    }
    if sample_fill != 0 && unsafe { (*rec).verdict } != Verdict::NONE {
        // Under pressure (drop mode) keep what the model is unsure of: the records
        // that teach it most; and one in `AUDIT_EVERY` of this CPU's, whatever they
        // are: an unbiased sample to judge models by (`Sampling`). A record without
        // a verdict is always kept.
        let waiting = unsafe {
            bpf_ringbuf_query(
                (&raw const RECORDS).cast_mut().cast(),
                BPF_RB_AVAIL_DATA as u64,
            )
        };
        if waiting >= sample_fill {
            let audit =
                unsafe { (*c).records + (*c).sampled_out } & (Sampling::AUDIT_EVERY - 1) == 0;
            let sampling = unsafe { (*rec).sampling };
            if !audit && sampling & Sampling::NEAR_BOUNDARY == 0 {
                unsafe { (*c).sampled_out += 1 };
                return;
            }
            let mark = Sampling::UNDER_PRESSURE | if audit { Sampling::AUDIT } else { 0 };
            // The entry is this program's until it is freed.
            unsafe { (*rec.cast_mut()).sampling = sampling | mark };
        }
    }
    // Waking the agent per record costs more than the record: one record in
    // `wake_mask + 1` of this CPU's forces it, the others wake nobody (its poll
    // timer collects them). No mask, no threshold: the ring's default.
    let mask = layout!(wake_mask) as u64;
    let wake = if mask == 0 && layout!(wakeup_bytes) == 0 {
        RecordBatch::WAKE_DEFAULT
    } else if seq & mask == 0 {
        RecordBatch::WAKE_FORCE
    } else {
        RecordBatch::WAKE_NONE
    };
    unsafe { stage(c, slot, rec, wake) };
}

/// Ring flags of a wake-up level (`RecordBatch::wake`).
#[inline(always)]
fn wake_flags(wake: u32) -> u64 {
    match wake {
        RecordBatch::WAKE_NONE => BPF_RB_NO_WAKEUP as u64,
        RecordBatch::WAKE_FORCE => BPF_RB_FORCE_WAKEUP as u64,
        _ => 0,
    }
}

/// The record into this CPU's batch, and the batch into the ring once full; the
/// record goes to the ring alone when batching is off, or when the batch is
/// being changed by the program (or flush) this one interrupted.
#[inline(always)]
unsafe fn stage(c: *mut Counters, slot: u32, rec: *const RequestRecord, wake: u32) {
    let Some(b) = BATCHES.get_ptr_mut(0) else {
        return unsafe { submit(c, slot, rec, wake_flags(wake)) };
    };
    // Volatile: an interrupting program on this CPU must see `busy` set before
    // the batch changes, and cleared only after.
    let busy = &raw mut (*b).busy;
    let off = unsafe { (*b).enabled } == 0 || layout!(ablate) & ablate::NO_BATCH != 0;
    if off || unsafe { core::ptr::read_volatile(busy) } != 0 {
        return unsafe { submit(c, slot, rec, wake_flags(wake)) };
    }
    unsafe { core::ptr::write_volatile(busy, 1) };
    let mut n = unsafe { (*b).count } as usize;
    if n >= BATCH_RECORDS {
        // Never left full; the bound is for the verifier.
        unsafe { flush(c, b) };
        n = 0;
    }
    let i = n & (BATCH_RECORDS - 1);
    unsafe {
        core::ptr::copy_nonoverlapping(rec, &raw mut (*b).records[i], 1);
        (*b).slots[i] = slot as u8;
        if wake > (*b).wake {
            (*b).wake = wake;
        }
        (*b).count = (n + 1) as u32;
        (*c).records += 1;
    }
    device_event(slot, |d| d.records += 1);
    if n + 1 == BATCH_RECORDS {
        unsafe { flush(c, b) };
    }
    unsafe { core::ptr::write_volatile(busy, 0) };
}

/// The staged records into the ring in one write (the caller holds `busy`); a
/// full ring drops them all, counted: their `records` counts move to
/// `ring_full_drops`.
#[inline(always)]
unsafe fn flush(c: *mut Counters, b: *mut RecordBatch) {
    let n = unsafe { (*b).count } as usize;
    let wake = unsafe { (*b).wake };
    unsafe {
        (*b).count = 0;
        (*b).wake = RecordBatch::WAKE_NONE;
    }
    if n == 0 || n > BATCH_RECORDS {
        return;
    }
    // SAFETY: `n` staged records, 1..=BATCH_RECORDS, within the map value.
    let staged = unsafe { core::slice::from_raw_parts((&raw const (*b).records).cast(), n) };
    if RECORDS
        .output_untyped::<[RequestRecord]>(staged, wake_flags(wake))
        .is_err()
    {
        unsafe {
            (*c).records = (*c).records.wrapping_sub(n as u64);
            (*c).ring_full_drops += n as u64;
        }
        for i in 0..BATCH_RECORDS {
            if i < n {
                device_event(unsafe { (*b).slots[i] } as u32, |d| {
                    d.records = d.records.wrapping_sub(1)
                });
            }
        }
    }
}

/// `kml_flush_records`: writes this CPU's staged records to the ring. 0 when
/// done (or nothing was staged); 1 when a program on this CPU was changing the
/// batch (the agent retries).
#[inline(always)]
pub fn flush_this_cpu() -> i32 {
    let (Some(c), Some(b)) = (counters(), BATCHES.get_ptr_mut(0)) else {
        return 0;
    };
    let busy = unsafe { &raw mut (*b).busy };
    if unsafe { core::ptr::read_volatile(busy) } != 0 {
        return 1;
    }
    unsafe {
        core::ptr::write_volatile(busy, 1);
        flush(c, b);
        core::ptr::write_volatile(busy, 0);
    }
    0
}

/// The record into the ring (one copy), counted; a full ring drops it, counted.
#[inline(always)]
unsafe fn submit(c: *mut Counters, slot: u32, rec: *const RequestRecord, flags: u64) {
    match RECORDS.reserve(0) {
        Some(mut entry) => {
            unsafe { core::ptr::copy_nonoverlapping(rec, entry.as_mut_ptr(), 1) };
            entry.submit(flags);
            unsafe { (*c).records += 1 };
            device_event(slot, |d| d.records += 1);
        }
        None => unsafe { (*c).ring_full_drops += 1 },
    }
}

/// Measurement only (`ablate::WAKE_BY_QUERY`): the emit of the observer before
/// issue 14, a ring query per record and a forced wake-up on every record while
/// `wakeup_bytes` or more wait.
#[inline(never)]
unsafe fn emit_by_query(c: *mut Counters, slot: u32, rec: *const RequestRecord) {
    let wakeup_bytes = layout!(wakeup_bytes) as u64;
    let waiting = unsafe {
        bpf_ringbuf_query(
            (&raw const RECORDS).cast_mut().cast(),
            BPF_RB_AVAIL_DATA as u64,
        )
    };
    let flags = if wakeup_bytes == 0 {
        0
    } else if waiting >= wakeup_bytes {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    unsafe { submit(c, slot, rec, flags) };
}
