//! kml's block-layer observers.
//!
//! Two sets of programs with one body: raw tracepoints (`struct request *` in hand,
//! member offsets from BTF) and classic tracepoints (fields at tracefs format
//! offsets, for kernels without usable BTF). The agent loads and attaches one set
//! and hands the layout in through the read-only global `KML_LAYOUT`.
//!
//! Per request: insert → in-flight map entry (features known at insert) → issue
//! (dispatch time) → complete (one record to the ring buffer, entry removed).
//! Requeue sends a request back to the scheduler; a merge frees a queued request
//! without completing it. Every loss is counted in `COUNTERS`.
#![no_std]
#![no_main]
// The BPF target has no atomic RMW in `core::sync::atomic` (no CAS); the
// intrinsics lower to BPF_ATOMIC add/fetch-add, which the kernel supports.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod hook;

use core::intrinsics::{atomic_xadd, atomic_xsub, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_jiffies64, bpf_ringbuf_query},
    },
    macros::{btf_map, raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use kml_ebpf_common::{
    abi::names::stage,
    attach_mode,
    features::{features_at_insert, FeatureVector},
    inference::{infer_linear, infer_tree, linear_limit},
    label::fifo_time_fallback,
    layout::{EventFields, IOPRIO_IN_BIO, IOPRIO_IN_REQUEST},
    model::{LinearModel, ModelKind, TreeModel},
    op::{parse_rwbs, Direction, ReqFlags, ReqOp},
    record::{ewma_step, INFLIGHT_CAPACITY},
    slot::{status_index, ModelControl, SlotStatus, MODEL_SLOTS, STATUS_ENTRIES},
    Counter, Counters, DeviceConfig, DeviceState, InflightKey, KernelLayout, RequestRecord,
    Verdict,
};

/// Kernel layout, written by the agent at load time (`.rodata`, frozen).
#[no_mangle]
static KML_LAYOUT: KernelLayout = KernelLayout::zeroed();

/// Requests from insert to completion. LRU so a flood of requests that never
/// complete (or a missed event) cannot fill it for good; evictions are derived by
/// the agent from `inflight_added - inflight_removed - live entries`.
#[btf_map]
static INFLIGHT: LruHashMap<InflightKey, RequestRecord, INFLIGHT_CAPACITY> = LruHashMap::new();

/// Device filter and per-device mq-deadline expiries (written by the agent).
#[btf_map]
static DEVICES: HashMap<u32, DeviceConfig, 256> = HashMap::new();

/// Per-device counts kept by the programs (entry created by the agent).
#[btf_map]
static DEVICE_STATE: HashMap<u32, DeviceState, 256> = HashMap::new();

#[btf_map]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// Finished requests. Size is overridden by the agent at load.
#[btf_map]
static RECORDS: RingBuf<RequestRecord, { 4 << 20 }> = RingBuf::new();

/// The model slots (written whole by the agent while idle) and the active one.
/// BTF-typed: `bpftool map dump name LINEAR_MODELS` prints every weight by name.
#[btf_map]
static LINEAR_MODELS: Array<LinearModel, { MODEL_SLOTS as usize }> = Array::new();

#[btf_map]
static TREE_MODELS: Array<TreeModel, { MODEL_SLOTS as usize }> = Array::new();

#[btf_map]
static MODEL_CONTROL: Array<ModelControl, 1> = Array::new();

/// What `kml_verify_slots` found in each slot.
#[btf_map]
static SLOT_STATUS: Array<SlotStatus, { STATUS_ENTRIES as usize }> = Array::new();

/// The inference stages for the attach mode, tail-called from insert: slot 0
/// computes the features, slot 1 runs the model and finishes the insert. Each is
/// verified on its own: together with insert they exceed the verifier's budget.
#[btf_map]
static INFER: ProgramArray<{ stage::COUNT }> = ProgramArray::new();

/// The feature vector of the entry being built (stage 0 → stage 1).
#[btf_map]
static SCRATCH_FEATURES: PerCpuArray<FeatureVector, 1> = PerCpuArray::new();

/// The key of the entry being built in SCRATCH (handed to the tail call).
#[btf_map]
static SCRATCH_KEY: PerCpuArray<InflightKey, 1> = PerCpuArray::new();

/// Where a new in-flight entry is built (keeps it off the 512-byte stack).
#[btf_map]
static SCRATCH: PerCpuArray<RequestRecord, 1> = PerCpuArray::new();

/// Reads one field of `KML_LAYOUT`. Volatile: the compiler must not fold the
/// zero initialiser; the verifier sees the frozen value and prunes dead branches.
macro_rules! layout {
    ($($field:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const KML_LAYOUT.$($field)+) }
    };
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(0) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *(*p).slot(c) += 1 };
    }
}

/// Atomic fetch-add on a u64 in a map value; returns the previous value.
#[inline(always)]
fn fetch_inc(p: *mut u64) -> u64 {
    // SeqCst, not Relaxed: LLVM's BPF backend lowers a monotonic fetch-add to the
    // non-fetching `lock add` even when the old value is used (it then reads as
    // the addend); SeqCst selects BPF_ADD | BPF_FETCH.
    // SAFETY: `p` points into a map value that outlives the program run, 8-aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) }
}

#[inline(always)]
fn load(p: *mut u64) -> u64 {
    // A plain volatile load: aligned 8-byte loads are atomic on every BPF JIT, and
    // LLVM's BPF backend cannot select an atomic load at the default CPU level.
    // SAFETY: as for `fetch_inc`.
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn dec_saturating(p: *mut u64) {
    // Never wrap below zero: an entry evicted while in flight must not poison the count.
    if load(p) > 0 {
        // SAFETY: as for `fetch_inc`.
        unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
    }
}

/// What every handler needs to know about a request, whatever the attach mode.
struct ReqView {
    key: InflightKey,
    dev: u32,
    sector: u64,
    nr_sectors: u32,
    op: ReqOp,
    flags: u8,
    ioprio: u16,
}

// ---------------------------------------------------------------------------
// Inference at insert (shadow mode: the verdict is kept and counted).

/// Whether the in-kernel checker vouched for the slot as it reads now.
#[inline(always)]
fn slot_vouched(tree: bool, slot: u32, version: u32, checksum: u64) -> bool {
    match SLOT_STATUS.get(status_index(tree, slot)) {
        Some(st) => st.vouches(version, checksum),
        None => false,
    }
}

/// The slot checker: recomputes every slot's checksum into `SLOT_STATUS`. Never
/// attached; the agent runs it (BPF_PROG_TEST_RUN) after writing a slot and before
/// flipping to it, so the long checksum loops stay out of the per-request path.
#[raw_tracepoint(tracepoint = "kml_verify_slots")]
pub fn kml_verify_slots(_ctx: RawTracePointContext) -> i32 {
    count(Counter::ModelVerifications);
    for slot in 0..MODEL_SLOTS {
        if let Some(m) = LINEAR_MODELS.get(slot) {
            let st = SlotStatus {
                version: m.version,
                ok: m.checksum_ok() as u32,
                checksum: m.checksum,
            };
            let _ = SLOT_STATUS.set(status_index(false, slot), st, 0);
        }
    }
    for slot in 0..MODEL_SLOTS {
        if let Some(m) = TREE_MODELS.get(slot) {
            let st = SlotStatus {
                version: m.version,
                ok: m.checksum_ok() as u32,
                checksum: m.checksum,
            };
            let _ = SLOT_STATUS.set(status_index(true, slot), st, 0);
        }
    }
    0
}

/// Inference stage 0, raw tracepoint mode (tail-called, never attached).
#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn kml_raw_features(ctx: RawTracePointContext) -> i32 {
    if compute_features() {
        unsafe { INFER.tail_call(&ctx, stage::MODEL) };
    }
    finish_unscored();
    0
}

/// Inference stage 1, raw tracepoint mode (tail-called, never attached).
#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn kml_raw_model(_ctx: RawTracePointContext) -> i32 {
    score_and_finish_insert();
    0
}

/// Inference stage 0, tracepoint mode (tail-called, never attached).
#[tracepoint(category = "block", name = "block_rq_insert")]
pub fn kml_tp_features(ctx: TracePointContext) -> i32 {
    if compute_features() {
        unsafe { INFER.tail_call(&ctx, stage::MODEL) };
    }
    finish_unscored();
    0
}

/// Inference stage 1, tracepoint mode (tail-called, never attached).
#[tracepoint(category = "block", name = "block_rq_insert")]
pub fn kml_tp_model(_ctx: TracePointContext) -> i32 {
    score_and_finish_insert();
    0
}

/// Runs the active model on the request's insert-time features and stores the
/// verdict in the record. No model: no verdict.
#[inline(always)]
fn score_request(rec: &mut RequestRecord, x: &FeatureVector) {
    let Some(ctl) = MODEL_CONTROL.get_ptr(0) else {
        return;
    };
    // One read of the control: the flip is a single map write.
    let ctl: ModelControl = unsafe { core::ptr::read_volatile(ctl) };
    if ctl.kind == 0 {
        return;
    }
    let (verdict, limit, version) = match ModelKind::from_u32(ctl.kind) {
        Some(ModelKind::Tree) => {
            let Some(m) = TREE_MODELS.get(ctl.slot) else {
                return count(Counter::ModelRejects);
            };
            if !slot_vouched(true, ctl.slot, m.version, m.checksum) {
                return count(Counter::ModelRejects);
            }
            (infer_tree(m, x), m.threshold as i64, m.version)
        }
        Some(_) => {
            let Some(m) = LINEAR_MODELS.get(ctl.slot) else {
                return count(Counter::ModelRejects);
            };
            if !slot_vouched(false, ctl.slot, m.version, m.checksum) {
                return count(Counter::ModelRejects);
            }
            (infer_linear(m, x), linear_limit(m, x), m.version)
        }
        None => return count(Counter::ModelRejects),
    };
    count(Counter::Verdicts);
    rec.score = verdict.score;
    rec.model_version = version;
    rec.verdict = if verdict.at_risk {
        count(Counter::VerdictsAtRisk);
        Verdict::AT_RISK
    } else {
        Verdict::MEETS
    };
    let margin = verdict.score.saturating_sub(limit);
    let margin = if margin < 0 {
        margin.saturating_neg()
    } else {
        margin
    };
    rec.near_boundary = (ctl.near_margin > 0 && margin <= ctl.near_margin) as u8;
}

// ---------------------------------------------------------------------------
// The shared body.

/// `cfg` is the device's `DEVICES` entry, which the caller looked up as its filter.
#[inline(always)]
fn on_insert<C: EbpfContext>(ctx: &C, v: &ReqView, cfg: *const DeviceConfig) {
    count(Counter::Inserts);
    let now = unsafe { bpf_ktime_get_ns() };
    let jiffies = unsafe { bpf_jiffies64() };
    let dir = v.op.direction();
    let (expire, expire_jiffies) = unsafe {
        match dir {
            Direction::Read => ((*cfg).read_expire_ns, (*cfg).read_expire_jiffies),
            Direction::Write => ((*cfg).write_expire_ns, (*cfg).write_expire_jiffies),
        }
    };
    // The scheduler's deadline: raw tracepoints read `rq->fifo_time` at issue (it
    // is set after this tracepoint); classic tracepoints compute what the scheduler
    // computes (see kml_ebpf_common::label).
    let fifo_time = if tp_enabled() {
        fifo_time_fallback(jiffies, expire_jiffies)
    } else {
        0
    };

    if let Some(e) = INFLIGHT.get_ptr_mut(v.key) {
        if unsafe { (*e).issue_ns } == 0 {
            // Requeued (the requeue cleared issue_ns) and inserted again:
            // mq-deadline gives it a fresh FIFO deadline.
            count(Counter::Reinserts);
            unsafe {
                (*e).insert_ns = now;
                (*e).deadline_ns = now + expire;
                (*e).insert_jiffies = jiffies;
                (*e).fifo_time = fifo_time;
                // The verdict was for the first insert's features and deadline: no
                // verdict now (neither the hook nor the live confusion matrix may
                // use it against the new deadline).
                (*e).verdict = Verdict::NONE;
            }
            return;
        }
        // An issued request's key inserted again: its completion was never seen (the
        // kernel skips a program that would nest in itself on a CPU, counting it in
        // the program's recursion_misses), and the request slot is being reused.
        // Drop the stale entry and record the new request.
        count(Counter::StaleEntries);
        unsafe {
            if let Some(s) = DEVICE_STATE.get_ptr_mut((*e).dev) {
                release_counts(s, ReqOp::from_u8((*e).op).direction(), false);
            }
        }
        if INFLIGHT.remove(v.key).is_ok() {
            count(Counter::InflightRemoved);
        }
    }

    let rec = match SCRATCH.get_ptr_mut(0) {
        Some(p) => unsafe { &mut *p },
        None => return,
    };
    let (mut inflight_read, mut inflight_write, mut queued_read, mut queued_write) =
        (0u64, 0u64, 0u64, 0u64);
    let (mut since_last, mut distance, mut dir_wait, mut issue_gap) = (0u64, 0u64, 0u64, 0u64);
    let state = DEVICE_STATE.get_ptr_mut(v.dev);
    if let Some(s) = state {
        unsafe {
            // Counts of the others (fetch-add returns the value before this request).
            match dir {
                Direction::Read => {
                    inflight_read = fetch_inc(&raw mut (*s).inflight_read);
                    inflight_write = load(&raw mut (*s).inflight_write);
                    queued_read = fetch_inc(&raw mut (*s).queued_read);
                    queued_write = load(&raw mut (*s).queued_write);
                    dir_wait = (*s).wait_ewma_read_ns;
                }
                Direction::Write => {
                    inflight_read = load(&raw mut (*s).inflight_read);
                    inflight_write = fetch_inc(&raw mut (*s).inflight_write);
                    queued_read = load(&raw mut (*s).queued_read);
                    queued_write = fetch_inc(&raw mut (*s).queued_write);
                    dir_wait = (*s).wait_ewma_write_ns;
                }
            }
            issue_gap = (*s).issue_gap_ewma_ns;
            // Racy across CPUs by design: these are features, not accounting.
            let last = (*s).last_insert_ns;
            if last != 0 && now > last {
                since_last = now - last;
            }
            (*s).last_insert_ns = now;
            let end = (*s).last_issue_end_sector;
            distance = if v.sector > end {
                v.sector - end
            } else {
                end - v.sector
            };
        }
    }

    *rec = RequestRecord {
        sector: v.sector,
        insert_ns: now,
        issue_ns: 0,
        complete_ns: 0,
        deadline_ns: now + expire,
        since_last_insert_ns: since_last,
        issue_distance: distance,
        dir_wait_ewma_ns: dir_wait,
        issue_gap_ewma_ns: issue_gap,
        score: 0,
        dev: v.dev,
        nr_sectors: v.nr_sectors,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        error: 0,
        inflight_read: inflight_read as u32,
        inflight_write: inflight_write as u32,
        queued_read: queued_read as u32,
        queued_write: queued_write as u32,
        model_version: 0,
        requeues: 0,
        ioprio: v.ioprio,
        op: v.op as u8,
        flags: v.flags,
        verdict: Verdict::NONE,
        near_boundary: 0,
        _pad: [0; 4],
        insert_jiffies: jiffies,
        issue_jiffies: 0,
        fifo_time,
    };
    if let Some(k) = SCRATCH_KEY.get_ptr_mut(0) {
        unsafe { *k = v.key };
    }
    if model_active() {
        // Inference runs in its own program (verified on its own: features and
        // models together exceed what the verifier accepts inline); it finishes
        // the insert. Returning here means the tail call failed.
        unsafe { INFER.tail_call(ctx, stage::FEATURES) };
        count(Counter::ModelRejects);
    }
    finish_insert(rec, v.key);
}

/// Stores the built entry in the in-flight map (undoing the device counts if it
/// cannot be stored).
#[inline(always)]
fn finish_insert(rec: &RequestRecord, key: InflightKey) {
    if INFLIGHT.insert(key, rec, 0).is_ok() {
        count(Counter::InflightAdded);
    } else {
        count(Counter::InflightInsertFailures);
        if let Some(s) = DEVICE_STATE.get_ptr_mut(rec.dev) {
            unsafe { release_counts(s, ReqOp::from_u8(rec.op).direction(), true) };
        }
    }
}

/// Stage 0 of inference: the features of the entry built in SCRATCH.
#[inline(always)]
fn compute_features() -> bool {
    let (Some(rec), Some(x)) = (SCRATCH.get_ptr(0), SCRATCH_FEATURES.get_ptr_mut(0)) else {
        return false;
    };
    unsafe { *x = features_at_insert(&*rec) };
    true
}

/// Stage 1: score the entry (features from stage 0), then store it.
#[inline(always)]
fn score_and_finish_insert() {
    let (Some(rec), Some(key), Some(x)) = (
        SCRATCH.get_ptr_mut(0),
        SCRATCH_KEY.get_ptr(0),
        SCRATCH_FEATURES.get_ptr(0),
    ) else {
        return;
    };
    let (rec, key) = unsafe { (&mut *rec, *key) };
    score_request(rec, unsafe { &*x });
    finish_insert(rec, key);
}

/// Stage 0 failed to hand over: store the entry unscored.
#[inline(always)]
fn finish_unscored() {
    count(Counter::ModelRejects);
    let (Some(rec), Some(key)) = (SCRATCH.get_ptr(0), SCRATCH_KEY.get_ptr(0)) else {
        return;
    };
    unsafe { finish_insert(&*rec, *key) };
}

#[inline(always)]
fn model_active() -> bool {
    match MODEL_CONTROL.get_ptr(0) {
        Some(c) => unsafe { core::ptr::read_volatile(&raw const (*c).kind) != 0 },
        None => false,
    }
}

/// Undoes what an insert added to the device counts.
#[inline(always)]
unsafe fn release_counts(s: *mut DeviceState, dir: Direction, still_queued: bool) {
    unsafe {
        match dir {
            Direction::Read => dec_saturating(&raw mut (*s).inflight_read),
            Direction::Write => dec_saturating(&raw mut (*s).inflight_write),
        }
        if still_queued {
            dec_saturating(queued_counter(s, dir));
        }
    }
}

#[inline(always)]
unsafe fn queued_counter(s: *mut DeviceState, dir: Direction) -> *mut u64 {
    unsafe {
        match dir {
            Direction::Read => &raw mut (*s).queued_read,
            Direction::Write => &raw mut (*s).queued_write,
        }
    }
}

/// One lookup of the in-flight map. `extent` (start sector, sectors as dispatched)
/// and `fifo_time` (the scheduler's deadline, raw tracepoints only) are read only
/// for a request in flight; `dev_of` only for one that is not, to tell a traced
/// device's bypassing request from another disk's.
#[inline(always)]
fn on_issue(
    key: InflightKey,
    extent: impl FnOnce() -> Option<(u64, u32)>,
    fifo_time: impl FnOnce() -> Option<u64>,
    dev_of: impl FnOnce() -> Option<u32>,
) {
    let Some(e) = INFLIGHT.get_ptr_mut(key) else {
        if let Some(dev) = dev_of() {
            if DEVICES.get_ptr(dev).is_some() {
                count(Counter::Issues);
                count(Counter::IssuesWithoutInsert);
            }
        }
        return;
    };
    count(Counter::Issues);
    let now = unsafe { bpf_ktime_get_ns() };
    let jiffies = unsafe { bpf_jiffies64() };
    unsafe {
        let dev = (*e).dev;
        let dir = ReqOp::from_u8((*e).op).direction();
        let was_queued = (*e).issue_ns == 0;
        (*e).issue_ns = now;
        (*e).issue_jiffies = jiffies;
        if let Some(t) = fifo_time() {
            (*e).fifo_time = t;
        }
        if let Some(s) = DEVICE_STATE.get_ptr_mut(dev) {
            if was_queued {
                dec_saturating(queued_counter(s, dir));
                // How long this direction's queue makes requests wait, and how fast
                // the device drains: features of the next inserts.
                let wait = now.saturating_sub((*e).insert_ns);
                match dir {
                    Direction::Read => {
                        (*s).wait_ewma_read_ns = ewma_step((*s).wait_ewma_read_ns, wait)
                    }
                    Direction::Write => {
                        (*s).wait_ewma_write_ns = ewma_step((*s).wait_ewma_write_ns, wait)
                    }
                }
            }
            let last = (*s).last_issue_ns;
            if last != 0 && now > last {
                (*s).issue_gap_ewma_ns = ewma_step((*s).issue_gap_ewma_ns, now - last);
            }
            (*s).last_issue_ns = now;
            // Only the next inserts' issue distance needs the extent: a failed read
            // (counted) leaves the last end sector as it was, nothing else.
            if let Some((sector, nr_sectors)) = extent() {
                (*s).last_issue_end_sector = sector + nr_sectors as u64;
            }
        }
    }
}

#[inline(always)]
fn on_requeue(key: InflightKey) {
    let Some(e) = INFLIGHT.get_ptr_mut(key) else {
        return;
    };
    count(Counter::Requeues);
    unsafe {
        (*e).requeues = (*e).requeues.saturating_add(1);
        if (*e).issue_ns != 0 {
            // Back in the scheduler: queued again until the next issue.
            (*e).issue_ns = 0;
            (*e).issue_jiffies = 0;
            if let Some(s) = DEVICE_STATE.get_ptr_mut((*e).dev) {
                fetch_inc(queued_counter(s, ReqOp::from_u8((*e).op).direction()));
            }
        }
    }
}

/// A queued request merged into another is freed without completing.
#[inline(always)]
fn on_merge(key: InflightKey) {
    let Some(e) = INFLIGHT.get_ptr_mut(key) else {
        return;
    };
    count(Counter::Merges);
    unsafe {
        if let Some(s) = DEVICE_STATE.get_ptr_mut((*e).dev) {
            release_counts(s, ReqOp::from_u8((*e).op).direction(), (*e).issue_ns == 0);
        }
    }
    if INFLIGHT.remove(key).is_ok() {
        count(Counter::InflightRemoved);
    }
}

/// One lookup of the in-flight map. `partial` says, for a request in flight,
/// whether this completion covers only part of it (the request stays in flight).
#[inline(always)]
fn on_complete(
    key: InflightKey,
    error: i32,
    partial: impl FnOnce() -> bool,
    dev_of: impl FnOnce() -> Option<u32>,
) {
    let Some(e) = INFLIGHT.get_ptr_mut(key) else {
        if let Some(dev) = dev_of() {
            if DEVICES.get_ptr(dev).is_some() {
                count(Counter::Completions);
                count(Counter::OrphanCompletions);
            }
        }
        return;
    };
    if partial() {
        count(Counter::PartialCompletions);
        return;
    }
    count(Counter::Completions);
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        (*e).complete_ns = now;
        (*e).error = error;
        if let Some(s) = DEVICE_STATE.get_ptr_mut((*e).dev) {
            release_counts(s, ReqOp::from_u8((*e).op).direction(), (*e).issue_ns == 0);
        }
        // Shadow mode: the verdict given at insert against what happened.
        let missed = (*e).deadline_missed();
        match ((*e).verdict, missed) {
            (Verdict::AT_RISK, true) => count(Counter::TrueMiss),
            (Verdict::AT_RISK, false) => count(Counter::FalseMiss),
            (Verdict::MEETS, false) => count(Counter::TrueMet),
            (Verdict::MEETS, true) => count(Counter::FalseMet),
            _ => {}
        }
        emit(e);
    }
    if INFLIGHT.remove(key).is_ok() {
        count(Counter::InflightRemoved);
    }
}

#[inline(always)]
unsafe fn emit(rec: *const RequestRecord) {
    let wakeup_bytes = layout!(wakeup_bytes) as u64;
    let sample_fill = layout!(sample_fill_bytes) as u64;
    let waiting = if wakeup_bytes != 0 || sample_fill != 0 {
        unsafe {
            bpf_ringbuf_query(
                (&raw const RECORDS).cast_mut().cast(),
                BPF_RB_AVAIL_DATA as u64,
            )
        }
    } else {
        0
    };
    // Under pressure (drop mode) keep what the model is unsure of: the records
    // that teach it most. A record without a verdict is always kept.
    if sample_fill != 0 && waiting >= sample_fill && unsafe { (*rec).verdict } != Verdict::NONE {
        if unsafe { (*rec).near_boundary } == 0 {
            count(Counter::SampledOut);
            return;
        }
    }
    // Waking the agent per record costs more than the record; wake it only once a
    // batch is waiting (its poll timer collects the tail).
    let flags = if wakeup_bytes == 0 {
        0
    } else if waiting >= wakeup_bytes {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    match RECORDS.reserve(0) {
        Some(mut slot) => {
            unsafe { core::ptr::copy_nonoverlapping(rec, slot.as_mut_ptr(), 1) };
            slot.submit(flags);
            count(Counter::Records);
        }
        None => count(Counter::RingFullDrops),
    }
}

// ---------------------------------------------------------------------------
// Raw tracepoints: `struct request *` as args[0], members through BTF offsets.

#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    match unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ReadFailures);
            None
        }
    }
}

#[inline(always)]
fn raw_dev(rq: u64) -> Option<u32> {
    let q: u64 = read(rq, layout!(raw.rq_q))?;
    let disk: u64 = read(q, layout!(raw.q_disk))?;
    if disk == 0 {
        return None;
    }
    let major: i32 = read(disk, layout!(raw.disk_major))?;
    let minor: i32 = read(disk, layout!(raw.disk_first_minor))?;
    Some(kml_ebpf_common::kernel_dev(major as u32, minor as u32))
}

#[inline(always)]
fn raw_ioprio(rq: u64) -> Option<u16> {
    match layout!(raw.ioprio_source) {
        IOPRIO_IN_REQUEST => read(rq, layout!(raw.rq_ioprio)),
        IOPRIO_IN_BIO => {
            let bio: u64 = read(rq, layout!(raw.rq_bio))?;
            if bio == 0 {
                return None;
            }
            read(bio, layout!(raw.bio_ioprio))
        }
        _ => None,
    }
}

#[inline(always)]
fn raw_op(cmd_flags: u32) -> (ReqOp, u8) {
    let op = cmd_flags & layout!(raw.op_mask);
    let op = if op == layout!(raw.op_read) {
        ReqOp::Read
    } else if op == layout!(raw.op_write) {
        ReqOp::Write
    } else if op == layout!(raw.op_flush) {
        ReqOp::Flush
    } else if op == layout!(raw.op_discard) {
        ReqOp::Discard
    } else if op == layout!(raw.op_write_zeroes) {
        ReqOp::WriteZeroes
    } else if op == layout!(raw.op_secure_erase) {
        ReqOp::SecureErase
    } else {
        ReqOp::Other
    };
    let mut flags = 0u8;
    let pairs = [
        (layout!(raw.flag_sync), ReqFlags::SYNC),
        (layout!(raw.flag_meta), ReqFlags::META),
        (layout!(raw.flag_fua), ReqFlags::FUA),
        (layout!(raw.flag_preflush), ReqFlags::PREFLUSH),
        (layout!(raw.flag_rahead), ReqFlags::RAHEAD),
    ];
    for (mask, bit) in pairs {
        if cmd_flags & mask != 0 {
            flags |= bit;
        }
    }
    (op, flags)
}

#[inline(always)]
fn raw_enabled() -> bool {
    layout!(mode) == attach_mode::RAW_TRACEPOINT
}

#[inline(always)]
pub(crate) fn raw_key(rq: u64) -> InflightKey {
    InflightKey::raw(rq)
}

#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn kml_raw_rq_insert(ctx: RawTracePointContext) -> i32 {
    if !raw_enabled() {
        return 0;
    }
    let rq: u64 = ctx.arg(0);
    let Some(dev) = raw_dev(rq) else { return 0 };
    // Untraced disks cost the dev lookup only.
    let Some(cfg) = DEVICES.get_ptr(dev) else {
        return 0;
    };
    let (Some(sector), Some(data_len), Some(cmd_flags)) = (
        read::<u64>(rq, layout!(raw.rq_sector)),
        read::<u32>(rq, layout!(raw.rq_data_len)),
        read::<u32>(rq, layout!(raw.rq_cmd_flags)),
    ) else {
        return 0;
    };
    let ioprio = raw_ioprio(rq).unwrap_or(0);
    let (op, flags) = raw_op(cmd_flags);
    on_insert(
        &ctx,
        &ReqView {
            key: raw_key(rq),
            dev,
            sector,
            nr_sectors: data_len >> 9,
            op,
            flags,
            ioprio,
        },
        cfg,
    );
    0
}

#[raw_tracepoint(tracepoint = "block_rq_issue")]
pub fn kml_raw_rq_issue(ctx: RawTracePointContext) -> i32 {
    if !raw_enabled() {
        return 0;
    }
    let rq: u64 = ctx.arg(0);
    let extent = || {
        let sector = read::<u64>(rq, layout!(raw.rq_sector))?;
        let data_len = read::<u32>(rq, layout!(raw.rq_data_len))?;
        Some((sector, data_len >> 9))
    };
    let fifo_time = || read::<u64>(rq, layout!(raw.rq_fifo_time));
    on_issue(raw_key(rq), extent, fifo_time, || raw_dev(rq));
    0
}

#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn kml_raw_rq_complete(ctx: RawTracePointContext) -> i32 {
    if !raw_enabled() {
        return 0;
    }
    // TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes)
    let rq: u64 = ctx.arg(0);
    let status: u64 = ctx.arg(1);
    let nr_bytes: u64 = ctx.arg(2);
    // blk_update_request() fires this before shrinking the request: a completion
    // of fewer bytes than remain is partial and the request stays in flight.
    let partial =
        || read::<u32>(rq, layout!(raw.rq_data_len)).is_some_and(|left| (nr_bytes as u32) < left);
    on_complete(raw_key(rq), (status & 0xff) as i32, partial, || raw_dev(rq));
    0
}

#[raw_tracepoint(tracepoint = "block_rq_requeue")]
pub fn kml_raw_rq_requeue(ctx: RawTracePointContext) -> i32 {
    if raw_enabled() {
        on_requeue(raw_key(ctx.arg(0)));
    }
    0
}

#[raw_tracepoint(tracepoint = "block_rq_merge")]
pub fn kml_raw_rq_merge(ctx: RawTracePointContext) -> i32 {
    if raw_enabled() {
        on_merge(raw_key(ctx.arg(0)));
    }
    0
}

// ---------------------------------------------------------------------------
// Classic tracepoints: fields at tracefs format offsets; keyed by (sector, dev).

#[inline(always)]
fn tp_enabled() -> bool {
    layout!(mode) == attach_mode::TRACEPOINT
}

#[inline(always)]
fn tp_read<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    if offset == EventFields::ABSENT {
        return None;
    }
    match unsafe { ctx.read_at::<T>(offset as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ReadFailures);
            None
        }
    }
}

/// dev, sector, nr_sector: present in every block_rq_* event we use.
#[inline(always)]
fn tp_common(ctx: &TracePointContext, f: &EventFields) -> Option<(u32, u64, u32)> {
    Some((
        tp_read(ctx, f.dev)?,
        tp_read(ctx, f.sector)?,
        tp_read(ctx, f.nr_sector)?,
    ))
}

#[inline(always)]
fn tp_key(dev: u32, sector: u64) -> InflightKey {
    InflightKey::tracepoint(dev, sector)
}

#[tracepoint(category = "block", name = "block_rq_insert")]
pub fn kml_tp_rq_insert(ctx: TracePointContext) -> i32 {
    if !tp_enabled() {
        return 0;
    }
    let f = layout!(tp.insert);
    let Some((dev, sector, nr_sectors)) = tp_common(&ctx, &f) else {
        return 0;
    };
    let Some(cfg) = DEVICES.get_ptr(dev) else {
        return 0;
    };
    let Some(rwbs) = tp_read::<[u8; 8]>(&ctx, f.rwbs) else {
        return 0;
    };
    let (op, flags) = parse_rwbs(&rwbs);
    let ioprio = tp_read::<u16>(&ctx, f.ioprio).unwrap_or(0);
    on_insert(
        &ctx,
        &ReqView {
            key: tp_key(dev, sector),
            dev,
            sector,
            nr_sectors,
            op,
            flags: flags.0,
            ioprio,
        },
        cfg,
    );
    0
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn kml_tp_rq_issue(ctx: TracePointContext) -> i32 {
    if !tp_enabled() {
        return 0;
    }
    let f = layout!(tp.issue);
    let Some((dev, sector, nr_sectors)) = tp_common(&ctx, &f) else {
        return 0;
    };
    // fifo_time was computed at insert (no `struct request` here).
    on_issue(
        tp_key(dev, sector),
        || Some((sector, nr_sectors)),
        || None,
        || Some(dev),
    );
    0
}

#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn kml_tp_rq_complete(ctx: TracePointContext) -> i32 {
    if !tp_enabled() {
        return 0;
    }
    let f = layout!(tp.complete);
    let Some((dev, sector, _)) = tp_common(&ctx, &f) else {
        return 0;
    };
    let error = tp_read::<i32>(&ctx, f.error).unwrap_or(0);
    // The tracepoint's nr_sector is what remains, not what completed: a partial
    // completion cannot be told here, so every completion ends the request.
    on_complete(tp_key(dev, sector), error, || false, || Some(dev));
    0
}

#[tracepoint(category = "block", name = "block_rq_requeue")]
pub fn kml_tp_rq_requeue(ctx: TracePointContext) -> i32 {
    if !tp_enabled() {
        return 0;
    }
    let f = layout!(tp.requeue);
    if let Some((dev, sector, _)) = tp_common(&ctx, &f) {
        on_requeue(tp_key(dev, sector));
    }
    0
}

#[tracepoint(category = "block", name = "block_rq_merge")]
pub fn kml_tp_rq_merge(ctx: TracePointContext) -> i32 {
    if !tp_enabled() {
        return 0;
    }
    let f = layout!(tp.merge);
    if let Some((dev, sector, _)) = tp_common(&ctx, &f) {
        on_merge(tp_key(dev, sector));
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Unreachable in a verified program; the verifier rejects any path that gets here.
    loop {}
}

#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 4] = *b"GPL\0";
