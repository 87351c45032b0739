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
//! Policy, `HOOK_POLICY[0]` (see [`model_verdict`] and [`fixed_verdict`]):
//! - [`POLICY_OFF`]: never boost (counts calls only);
//! - [`POLICY_READS`]: boost every read;
//! - [`POLICY_READS_UNDER_WRITES`]: boost a read only while writes wait in the
//!   scheduler (a write FIFO of any priority level is non-empty), i.e. exactly when
//!   a read may sit behind a batch of writes;
//! - [`POLICY_MODEL`]: boost a request the active model flagged at risk of missing
//!   its deadline. The verdict is the one the observer's insert path stored in the
//!   request's `INFLIGHT` entry: `block_rq_insert` fires in `dd_insert_request()`
//!   before the request is put on its FIFO and this hook runs, and its tail-called
//!   feature and model stages have finished by then (same CPU, same call chain);
//! - [`POLICY_MODEL_READS`]: the same, for reads only (a write served early takes
//!   a read's slot; reads are what a waiting process blocks on).
//!
//! Everything kernel-specific comes from the agent at load time: the `enum req_op`
//! decoding from `KML_LAYOUT.raw` (shared with the observers) and the scheduler's
//! layout in the `KML_HOOK_*` globals below (from BTF). Nothing is hard-coded.

use aya_ebpf::{
    btf_maps::{Array, PerCpuArray},
    helpers::{bpf_probe_read_kernel, generated::bpf_override_return},
    macros::{btf_map, kprobe},
    programs::ProbeContext,
    EbpfContext as _,
};
use kml_ebpf_common::{ReqOp, Verdict};

pub const POLICY_OFF: u32 = 0;
pub const POLICY_READS: u32 = 1;
pub const POLICY_READS_UNDER_WRITES: u32 = 2;
pub const POLICY_MODEL: u32 = 3;
pub const POLICY_MODEL_READS: u32 = 4;

/// `HOOK_COUNTERS[0]` slots (per CPU; the agent sums them).
pub const HOOK_CALLS: usize = 0;
pub const HOOK_BOOSTS: usize = 1;
pub const HOOK_READS: usize = 2;
pub const HOOK_READ_FAILURES: usize = 3;
pub const HOOK_SKIPPED_DEVICE: usize = 4;
/// Model policies: requests with no fresh verdict in `INFLIGHT` (not traced, no
/// model active, the insert program did not run for it).
pub const HOOK_NO_VERDICT: usize = 5;
/// Model policies: requests the model flagged at risk (before the direction filter).
pub const HOOK_MODEL_AT_RISK: usize = 6;
pub const HOOK_COUNTER_SLOTS: usize = 8;

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

const MAX_PRIO_LEVELS: u32 = 4;

/// `[0]`: the policy (see the module documentation). Written by the agent.
#[btf_map]
static HOOK_POLICY: Array<u32, 1> = Array::new();

#[btf_map]
static HOOK_COUNTERS: PerCpuArray<[u64; HOOK_COUNTER_SLOTS], 1> = PerCpuArray::new();

macro_rules! global {
    ($name:ident) => {
        // Volatile: the compiler must not fold the zero initialiser; the verifier
        // sees the frozen `.rodata` value.
        unsafe { core::ptr::read_volatile(&raw const $name) }
    };
}

macro_rules! layout {
    ($($field:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const crate::KML_LAYOUT.$($field)+) }
    };
}

#[inline(always)]
fn bump(slot: usize) {
    if slot >= HOOK_COUNTER_SLOTS {
        return;
    }
    if let Some(p) = HOOK_COUNTERS.get_ptr_mut(0) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { (*p)[slot] += 1 };
    }
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    match unsafe { bpf_probe_read_kernel(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            bump(HOOK_READ_FAILURES);
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

/// Whether any write waits in a FIFO of the request's mq-deadline instance.
/// Called with the scheduler lock held (inside dd_insert_request), so the lists
/// are stable while they are read.
#[inline(always)]
fn writes_queued(rq: u64) -> bool {
    let Some(q) = read::<u64>(rq + layout!(raw.rq_q) as u64) else {
        return false;
    };
    let Some(eq) = read::<u64>(q + global!(KML_HOOK_Q_ELEVATOR) as u64) else {
        return false;
    };
    if eq == 0 {
        return false;
    }
    let Some(dd) = read::<u64>(eq + global!(KML_HOOK_EQ_DATA) as u64) else {
        return false;
    };
    if dd == 0 {
        return false;
    }
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

/// The model policies. Everything comes from the request's in-flight entry, which
/// the insert program filled a moment earlier in this call chain (device, op,
/// verdict): the request itself is read only when there is no entry. A verdict is
/// fresh when the entry is not issued (this hook runs while the request is being
/// queued; an issued entry under the same pointer is a previous request's whose
/// insert event was missed).
#[inline(always)]
fn model_verdict(rq: u64, policy: u32, want: u32) -> u64 {
    let Some(e) = crate::INFLIGHT.get_ptr(crate::raw_key(rq)) else {
        // An untraced disk's request, or a missed insert.
        if want != 0 && device_of(rq) != Some(want) {
            bump(HOOK_SKIPPED_DEVICE);
            return 0;
        }
        if read::<u32>(rq + layout!(raw.rq_cmd_flags) as u64)
            .is_some_and(|f| f & layout!(raw.op_mask) == layout!(raw.op_read))
        {
            bump(HOOK_READS);
        }
        bump(HOOK_NO_VERDICT);
        return 0;
    };
    // SAFETY: a map value, read while the entry exists (the scheduler lock is held
    // and this request cannot complete before it is queued).
    let (dev, op, issue_ns, verdict) = unsafe { ((*e).dev, (*e).op, (*e).issue_ns, (*e).verdict) };
    if want != 0 && dev != want {
        bump(HOOK_SKIPPED_DEVICE);
        return 0;
    }
    let is_read = ReqOp::from_u8(op) == ReqOp::Read;
    if is_read {
        bump(HOOK_READS);
    }
    match verdict {
        Verdict::AT_RISK if issue_ns == 0 => {
            bump(HOOK_MODEL_AT_RISK);
            (is_read || policy == POLICY_MODEL) as u64
        }
        Verdict::MEETS if issue_ns == 0 => 0,
        _ => {
            bump(HOOK_NO_VERDICT);
            0
        }
    }
}

/// The fixed policies: the verdict from the request's own op (and, for
/// reads-under-writes, the scheduler's write FIFOs).
#[inline(always)]
fn fixed_verdict(rq: u64, policy: u32, want: u32) -> u64 {
    if want != 0 && device_of(rq) != Some(want) {
        bump(HOOK_SKIPPED_DEVICE);
        return 0;
    }
    let Some(cmd_flags) = read::<u32>(rq + layout!(raw.rq_cmd_flags) as u64) else {
        return 0;
    };
    let is_read = cmd_flags & layout!(raw.op_mask) == layout!(raw.op_read);
    if is_read {
        bump(HOOK_READS);
    }
    match policy {
        POLICY_READS if is_read => 1,
        POLICY_READS_UNDER_WRITES if is_read && writes_queued(rq) => 1,
        _ => 0,
    }
}

#[kprobe]
pub fn kml_hook_verdict(ctx: ProbeContext) -> u32 {
    bump(HOOK_CALLS);
    let Some(rq) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let policy = match HOOK_POLICY.get(0) {
        Some(p) => *p,
        None => return 0,
    };
    if policy == POLICY_OFF || layout!(raw.op_mask) == 0 {
        return 0;
    }
    let want = global!(KML_HOOK_DEV);
    let v = match policy {
        POLICY_MODEL | POLICY_MODEL_READS => model_verdict(rq, policy, want),
        _ => fixed_verdict(rq, policy, want),
    };
    if v > 0 {
        bump(HOOK_BOOSTS);
        // Replaces dd_kml_verdict()'s return value; the kernel function does not run.
        unsafe { bpf_override_return(ctx.as_ptr().cast(), v) };
    }
    0
}
