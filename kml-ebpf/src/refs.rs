//! Reference observers for kml's overhead benchmark (`kml-refs`; not part of kml).
//!
//! The floors and references the bench attaches, one set at a time, on the same
//! three raw tracepoints kml uses (names and record types in
//! `kml_ebpf_common::bench_refs`):
//!
//! - **null**: three programs that return at once;
//! - **biolatency** (BCC's `biolatency -Q`): start time per request at insert,
//!   log2 µs histogram at completion, no records;
//! - **biosnoop** (BCC's `biosnoop -Q`): insert time, pid and comm at insert, issue
//!   time at issue, one 64-byte ring-buffer record per completion.
//!
//! They trace every disk (as the BCC tools do without a filter) and keep their
//! per-request state in hash maps keyed by the `struct request *`, as those tools do.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    btf_maps::{Array, HashMap, RingBuf},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_map, raw_tracepoint},
    programs::RawTracePointContext,
};
use kml_ebpf_common::bench_refs::{
    RefLayout, SnoopRecord, SnoopStart, COUNT_SLOTS, COUNT_SNOOP_DROPS, COUNT_START_MISSING,
    LAT_SLOTS, START_ENTRIES,
};

/// `struct request` / `gendisk` offsets, written by the bench from BTF at load.
#[no_mangle]
static REF_LAYOUT: RefLayout = RefLayout::zeroed();

#[btf_map]
static REF_LAT_START: HashMap<u64, u64, { START_ENTRIES as usize }> = HashMap::new();

#[btf_map]
static REF_LAT_HIST: Array<u64, { LAT_SLOTS as usize }> = Array::new();

#[btf_map]
static REF_SNOOP_START: HashMap<u64, SnoopStart, { START_ENTRIES as usize }> = HashMap::new();

#[btf_map]
static REF_SNOOP_EVENTS: RingBuf<SnoopRecord, { 1 << 22 }> = RingBuf::new();

#[btf_map]
static REF_COUNTS: Array<u64, { COUNT_SLOTS as usize }> = Array::new();

macro_rules! layout {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const REF_LAYOUT.$field) }
    };
}

#[inline(always)]
fn bump(p: *mut u64) {
    // SAFETY: `p` points into a map value that outlives the run, 8-aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) };
}

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = REF_COUNTS.get_ptr_mut(index) {
        bump(p);
    }
}

#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

/// BCC's `bpf_log2l`: the bucket of `v` (0 for 0 and 1).
#[inline(always)]
fn log2(mut v: u64) -> u32 {
    let mut r = 0;
    for shift in [32u32, 16, 8, 4, 2, 1] {
        if v >= 1u64 << shift {
            v >>= shift;
            r += shift;
        }
    }
    r
}

// --- null ----------------------------------------------------------------------

#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn ref_null_ins(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "block_rq_issue")]
pub fn ref_null_iss(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn ref_null_cpl(_ctx: RawTracePointContext) -> i32 {
    0
}

// --- biolatency -Q -------------------------------------------------------------

#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn ref_lat_ins(ctx: RawTracePointContext) -> i32 {
    let rq: u64 = ctx.arg(0);
    let ts = unsafe { bpf_ktime_get_ns() };
    let _ = REF_LAT_START.insert(rq, ts, 0);
    0
}

#[raw_tracepoint(tracepoint = "block_rq_issue")]
pub fn ref_lat_iss(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn ref_lat_cpl(ctx: RawTracePointContext) -> i32 {
    let rq: u64 = ctx.arg(0);
    let Some(start) = REF_LAT_START.get_ptr(rq) else {
        count(COUNT_START_MISSING);
        return 0;
    };
    let start = unsafe { *start };
    let now = unsafe { bpf_ktime_get_ns() };
    let slot = log2(now.saturating_sub(start) / 1000).min(LAT_SLOTS - 1);
    if let Some(p) = REF_LAT_HIST.get_ptr_mut(slot) {
        bump(p);
    }
    let _ = REF_LAT_START.remove(rq);
    0
}

// --- biosnoop -Q ---------------------------------------------------------------

#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn ref_snoop_ins(ctx: RawTracePointContext) -> i32 {
    let rq: u64 = ctx.arg(0);
    let start = SnoopStart {
        insert_ns: unsafe { bpf_ktime_get_ns() },
        issue_ns: 0,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    let _ = REF_SNOOP_START.insert(rq, start, 0);
    0
}

#[raw_tracepoint(tracepoint = "block_rq_issue")]
pub fn ref_snoop_iss(ctx: RawTracePointContext) -> i32 {
    let rq: u64 = ctx.arg(0);
    if let Some(s) = REF_SNOOP_START.get_ptr_mut(rq) {
        unsafe { (*s).issue_ns = bpf_ktime_get_ns() };
    }
    0
}

#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn ref_snoop_cpl(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes)
    let rq: u64 = ctx.arg(0);
    let nr_bytes: u64 = ctx.arg(2);
    let Some(s) = REF_SNOOP_START.get_ptr(rq) else {
        count(COUNT_START_MISSING);
        return 0;
    };
    let s = unsafe { *s };
    let now = unsafe { bpf_ktime_get_ns() };
    let dev = (|| {
        let q: u64 = read(rq, layout!(rq_q))?;
        let disk: u64 = read(q, layout!(q_disk))?;
        let major: i32 = read(disk, layout!(disk_major))?;
        let minor: i32 = read(disk, layout!(disk_first_minor))?;
        Some(kml_ebpf_common::kernel_dev(major as u32, minor as u32))
    })()
    .unwrap_or(0);
    let issue = if s.issue_ns == 0 { now } else { s.issue_ns };
    let rec = SnoopRecord {
        complete_ns: now,
        queued_ns: issue.saturating_sub(s.insert_ns),
        service_ns: if s.issue_ns == 0 {
            0
        } else {
            now.saturating_sub(s.issue_ns)
        },
        sector: read(rq, layout!(rq_sector)).unwrap_or(0),
        nr_bytes: nr_bytes as u32,
        dev,
        pid: s.pid,
        cmd_flags: read(rq, layout!(rq_cmd_flags)).unwrap_or(0),
        comm: s.comm,
    };
    if REF_SNOOP_EVENTS.output(rec, 0).is_err() {
        count(COUNT_SNOOP_DROPS);
    }
    let _ = REF_SNOOP_START.remove(rq);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// GPL: bpf_probe_read_kernel and bpf_get_current_comm are GPL-only helpers.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 4] = *b"GPL\0";
