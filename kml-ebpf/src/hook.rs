//! The verdict program for kml's patched mq-deadline (kernel/0001-mq-deadline-kml-hook.patch).
//!
//! The patched scheduler calls `int dd_kml_verdict(struct request *rq)` once for each
//! request that enters one of its FIFO lists, with the scheduler lock held, right
//! after the request's deadline (`fifo_time`) is set. The function returns 0 (stock
//! behaviour); a positive return value asks mq-deadline to serve the request early,
//! within the cap of the `kml_boost_max` iosched attribute. The function is on the
//! kernel's error-injection list, so a kprobe program attached at its entry may
//! replace its return value with `bpf_override_return()`; that is what this program
//! does when its verdict is positive (and only then: a verdict of 0 lets the stock
//! function run and return 0).
//!
//! Policy, `HOOK_POLICY[0]` (the values of [`Policy`]; see [`model_verdict`] and
//! [`fixed_verdict`]):
//! - [`Policy::Off`]: never boost (counts calls only);
//! - [`Policy::Reads`]: boost every read;
//! - [`Policy::ReadsUnderWrites`]: boost a read only while writes wait in the
//!   scheduler (a write FIFO of any priority level is non-empty), i.e. exactly when
//!   a read may sit behind a batch of writes;
//! - [`Policy::ReadsBehindWrites`]: boost a read only while the scheduler serves
//!   writes (writes wait and `deadline_data.last_dir` is `DD_WRITE`). A boost ends
//!   the current batch; ending a read batch only brings the next forced write batch
//!   closer (mq-deadline counts a read batch against `writes_starved` at each start);
//! - [`Policy::Model`]: boost a request the active model flagged at risk of missing
//!   its deadline. The verdict is the one the observer's insert path stored in the
//!   request's entry (`REQS`): `block_rq_insert` fires in `dd_insert_request()`
//!   before the request is put on its FIFO and this hook runs, and its tail-called
//!   feature and model stages have finished by then (same CPU, same call chain);
//! - [`Policy::ModelReads`]: the same, for reads only (a write served early takes
//!   a read's slot; reads are what a waiting process blocks on).
//!
//! While a model policy acts and the agent learns online, `HOOK_POLICY[1]` holds a
//! shift k: one in 2^k of the requests the policy would serve early is left alone,
//! at random, and marked in its record (`Sampling::HELD_OUT`), so that online
//! learning still sees what happens to a flagged request nobody helped.
//!
//! Everything kernel-specific comes from the agent at load time: the `enum req_op`
//! decoding from `KML_LAYOUT.raw` (shared with the observers) and the scheduler's
//! layout in the `KML_HOOK_*` globals below (from BTF). Nothing is hard-coded.

use aya_ebpf::{
    btf_maps::{Array, PerCpuArray},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_prandom_u32, bpf_override_return},
    },
    macros::{btf_map, kprobe},
    programs::ProbeContext,
    EbpfContext as _,
};
use kml_ebpf_common::{
    abi::hook::{
        HookCounter, HookCounters, Policy, HOLD_OUT_MAX_SHIFT, HOOK_HOLD_OUT, HOOK_POLICY_ENTRIES,
    },
    ReqOp, Sampling, Verdict,
};

/// Only requests of this disk (`major << 20 | minor`, as `KML_LAYOUT` devices) get a
/// verdict; 0 means every disk that uses the patched mq-deadline.
#[no_mangle]
static KML_HOOK_DEV: u32 = 0;
/// Byte offset of `elevator` in `struct request_queue`.
#[no_mangle]
static KML_HOOK_Q_ELEVATOR: u32 = 0;
/// Byte offset of `elevator_data` in `struct elevator_queue`.
#[no_mangle]
static KML_HOOK_EQ_DATA: u32 = 0;
/// Byte offset of `per_prio` (array of `struct dd_per_prio`) in `struct deadline_data`.
#[no_mangle]
static KML_HOOK_DD_PER_PRIO: u32 = 0;
/// `sizeof(struct dd_per_prio)`.
#[no_mangle]
static KML_HOOK_PER_PRIO_SIZE: u32 = 0;
/// Number of priority levels in `per_prio` (3 in 6.12; at most [`MAX_PRIO_LEVELS`] read).
#[no_mangle]
static KML_HOOK_PER_PRIO_COUNT: u32 = 0;
/// Byte offset of `fifo_list[DD_WRITE]` (a `struct list_head`) in `struct dd_per_prio`.
#[no_mangle]
static KML_HOOK_WRITE_FIFO: u32 = 0;
/// Byte offset of `last_dir` (`enum dd_data_dir`, 4 bytes) in `struct deadline_data`.
#[no_mangle]
static KML_HOOK_DD_LAST_DIR: u32 = 0;
/// The value of `DD_WRITE`.
#[no_mangle]
static KML_HOOK_DD_WRITE: u32 = 0;

const MAX_PRIO_LEVELS: u32 = 4;

/// `[0]`: the policy (see the module documentation); `[1]`: the hold-out shift
/// (`HOOK_HOLD_OUT`). Written by the agent.
#[btf_map]
static HOOK_POLICY: Array<u32, { HOOK_POLICY_ENTRIES as usize }> = Array::new();

#[btf_map]
static HOOK_COUNTERS: PerCpuArray<HookCounters, 1> = PerCpuArray::new();

macro_rules! global {
    ($name:ident) => {
        // Volatile: the compiler must not fold the zero initialiser; the verifier
        // sees the frozen `.rodata` value.
        unsafe { core::ptr::read_volatile(&raw const $name) }
    };
}

use crate::maps::layout;

#[inline(always)]
fn bump(counter: HookCounter) {
    if let Some(p) = HOOK_COUNTERS.get_ptr_mut(0) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *(*p).slot(counter) += 1 };
    }
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    match unsafe { bpf_probe_read_kernel(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            bump(HookCounter::ReadFailures);
            None
        }
    }
}

#[inline(always)]
fn device_of(rq: u64) -> Option<u32> {
    let q: u64 = read(rq + layout!(raw.rq_q) as u64)?;
    let disk: u64 = read(q + layout!(raw.q_disk) as u64)?;
    if disk == 0 {
        return None;
    }
    let major: i32 = read(disk + layout!(raw.disk_major) as u64)?;
    let minor: i32 = read(disk + layout!(raw.disk_first_minor) as u64)?;
    Some(kml_ebpf_common::kernel_dev(major as u32, minor as u32))
}

/// The request's `struct deadline_data` (its queue's elevator data).
#[inline(always)]
fn deadline_data_of(rq: u64) -> Option<u64> {
    let q = read::<u64>(rq + layout!(raw.rq_q) as u64)?;
    let eq = read::<u64>(q + global!(KML_HOOK_Q_ELEVATOR) as u64).filter(|&eq| eq != 0)?;
    read::<u64>(eq + global!(KML_HOOK_EQ_DATA) as u64).filter(|&dd| dd != 0)
}

/// Whether the scheduler's last dispatch was a write and writes still wait: a
/// read inserted now sits behind the rest of a write batch. Read with the
/// scheduler lock held, like the FIFOs.
#[inline(always)]
fn serving_writes(rq: u64) -> bool {
    let Some(dd) = deadline_data_of(rq) else {
        return false;
    };
    read::<u32>(dd + global!(KML_HOOK_DD_LAST_DIR) as u64) == Some(global!(KML_HOOK_DD_WRITE))
        && writes_queued_in(dd)
}

/// Whether any write waits in a FIFO of the request's mq-deadline instance.
/// Called with the scheduler lock held (inside dd_insert_request), so the lists
/// are stable while they are read.
#[inline(always)]
fn writes_queued(rq: u64) -> bool {
    deadline_data_of(rq).is_some_and(writes_queued_in)
}

#[inline(always)]
fn writes_queued_in(dd: u64) -> bool {
    let levels = global!(KML_HOOK_PER_PRIO_COUNT);
    let size = global!(KML_HOOK_PER_PRIO_SIZE) as u64;
    let fifo = global!(KML_HOOK_WRITE_FIFO) as u64;
    let base = dd + global!(KML_HOOK_DD_PER_PRIO) as u64;
    for level in 0..MAX_PRIO_LEVELS {
        if level >= levels {
            break;
        }
        let head = base + level as u64 * size + fifo;
        // list_empty(): head->next == head.
        match read::<u64>(head) {
            Some(next) if next != head => return true,
            _ => {}
        }
    }
    false
}

/// The model policies. Everything comes from the request's entry (`REQS`), which
/// the insert program and its inference stage filled a moment earlier in this call
/// chain (device, op, verdict): the request itself is read only when there is no
/// entry. A verdict is fresh when the entry is queued (this hook runs while the
/// request is being queued).
#[inline(always)]
fn model_verdict(rq: u64, policy: Policy, want: u32) -> u64 {
    let Some(e) = crate::raw_tp::entry_of(rq) else {
        // An untraced disk's request, or a missed insert.
        if want != 0 && device_of(rq) != Some(want) {
            bump(HookCounter::SkippedDevice);
            return 0;
        }
        if read::<u32>(rq + layout!(raw.rq_cmd_flags) as u64)
            .is_some_and(|f| f & layout!(raw.op_mask) == layout!(raw.op_read))
        {
            bump(HookCounter::Reads);
        }
        bump(HookCounter::NoVerdict);
        return 0;
    };
    // SAFETY: a map value, read while the entry exists (the scheduler lock is held
    // and this request cannot complete before it is queued).
    let (dev, op, phase, verdict) =
        unsafe { ((*e).rec.dev, (*e).rec.op, (*e).phase, (*e).rec.verdict) };
    if want != 0 && dev != want {
        bump(HookCounter::SkippedDevice);
        return 0;
    }
    let op = ReqOp::from_u8(op);
    if op == ReqOp::Read {
        bump(HookCounter::Reads);
    }
    let fresh = phase == crate::lifecycle::Phase::Queued as u32;
    match verdict {
        Verdict::AT_RISK if fresh => {
            bump(HookCounter::ModelAtRisk);
            let serve = policy.serves_at_risk(op);
            if serve && held_out() {
                // SAFETY: as above; this request's entry, under the scheduler lock.
                unsafe { (*e).rec.sampling |= Sampling::HELD_OUT };
                bump(HookCounter::HeldOut);
                return 0;
            }
            serve as u64
        }
        Verdict::MEETS if fresh => 0,
        _ => {
            bump(HookCounter::NoVerdict);
            0
        }
    }
}

/// Whether this request is one the hook leaves alone to learn from: one in
/// `2^HOOK_POLICY[1]`, at random (a mask, no division).
#[inline(always)]
fn held_out() -> bool {
    let shift = HOOK_POLICY.get(HOOK_HOLD_OUT).copied().unwrap_or(0);
    if shift == 0 || shift > HOLD_OUT_MAX_SHIFT {
        return false;
    }
    let mask = (1u32 << shift) - 1;
    let r = unsafe { bpf_get_prandom_u32() };
    r & mask == 0
}

/// The fixed policies: the verdict from the request's own op (and, for
/// reads-under-writes, the scheduler's write FIFOs).
#[inline(always)]
fn fixed_verdict(rq: u64, policy: Policy, want: u32) -> u64 {
    if want != 0 && device_of(rq) != Some(want) {
        bump(HookCounter::SkippedDevice);
        return 0;
    }
    let Some(cmd_flags) = read::<u32>(rq + layout!(raw.rq_cmd_flags) as u64) else {
        return 0;
    };
    let is_read = cmd_flags & layout!(raw.op_mask) == layout!(raw.op_read);
    if is_read {
        bump(HookCounter::Reads);
    }
    match policy {
        Policy::Reads if is_read => 1,
        Policy::ReadsUnderWrites if is_read && writes_queued(rq) => 1,
        Policy::ReadsBehindWrites if is_read && serving_writes(rq) => 1,
        _ => 0,
    }
}

#[kprobe]
pub fn kml_hook_verdict(ctx: ProbeContext) -> u32 {
    bump(HookCounter::Calls);
    let Some(rq) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let policy = match HOOK_POLICY.get(0).and_then(|p| Policy::from_u32(*p)) {
        Some(p) => p,
        None => return 0,
    };
    if policy == Policy::Off || layout!(raw.op_mask) == 0 {
        return 0;
    }
    let want = global!(KML_HOOK_DEV);
    let v = match policy {
        Policy::Model | Policy::ModelReads => model_verdict(rq, policy, want),
        _ => fixed_verdict(rq, policy, want),
    };
    if v > 0 {
        bump(HookCounter::Boosts);
        // Replaces dd_kml_verdict()'s return value; the kernel function does not run.
        unsafe { bpf_override_return(ctx.as_ptr().cast(), v) };
    }
    0
}
