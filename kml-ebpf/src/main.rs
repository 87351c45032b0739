//! kml's block-layer observers: the entry points.
//!
//! Two sets of programs with one body (lifecycle.rs): raw tracepoints (raw_tp.rs:
//! `struct request *` in hand, member offsets from BTF, per-request state in an
//! array indexed by device slot and scheduler tag) and classic tracepoints (tp.rs:
//! fields at tracefs format offsets, state in a hash map by (dev, sector), for
//! kernels without usable BTF). The agent loads and attaches one set and hands the
//! layout in through the read-only global `KML_LAYOUT` (maps.rs).
//!
//! Per request: insert → entry (features known at insert; the inference stage,
//! infer.rs, scores it) → issue (dispatch time, the scheduler's deadline) →
//! complete (one record to the ring buffer, entry freed). Requeue sends a request
//! back to the scheduler; a merge frees a queued request without completing it; a
//! flush gets a record of its own from its issue; a bio merged into a request is
//! counted. Every loss is counted in `COUNTERS`. hook.rs: the verdict program of the
//! patched mq-deadline.
#![no_std]
#![no_main]
// The BPF target has no atomic RMW in `core::sync::atomic` (no CAS); the
// intrinsics lower to BPF_ATOMIC add/fetch-add, which the kernel supports.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys and values are passed by reference on purpose: aya's `insert` takes
// `impl Borrow<V>`, and a value passed by value is a copy on the 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod hook;
mod infer;
mod lifecycle;
mod maps;
mod raw_tp;
mod tp;

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

// --- raw tracepoints: `struct request *` (or `struct bio *`) as args[0] ---

#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn kml_raw_rq_insert(ctx: RawTracePointContext) -> i32 {
    if raw_tp::enabled() {
        raw_tp::insert(&ctx, ctx.arg(0));
    }
    0
}

#[raw_tracepoint(tracepoint = "block_rq_issue")]
pub fn kml_raw_rq_issue(ctx: RawTracePointContext) -> i32 {
    if raw_tp::enabled() {
        raw_tp::issue(ctx.arg(0));
    }
    0
}

/// TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes)
#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn kml_raw_rq_complete(ctx: RawTracePointContext) -> i32 {
    if raw_tp::enabled() {
        let status: u64 = ctx.arg(1);
        let nr_bytes: u64 = ctx.arg(2);
        raw_tp::complete(ctx.arg(0), (status & 0xff) as i32, nr_bytes as u32);
    }
    0
}

#[raw_tracepoint(tracepoint = "block_rq_requeue")]
pub fn kml_raw_rq_requeue(ctx: RawTracePointContext) -> i32 {
    if raw_tp::enabled() {
        raw_tp::requeue(ctx.arg(0));
    }
    0
}

#[raw_tracepoint(tracepoint = "block_rq_merge")]
pub fn kml_raw_rq_merge(ctx: RawTracePointContext) -> i32 {
    if raw_tp::enabled() {
        raw_tp::merge(ctx.arg(0));
    }
    0
}

#[raw_tracepoint(tracepoint = "block_bio_backmerge")]
pub fn kml_raw_bio_backmerge(ctx: RawTracePointContext) -> i32 {
    if raw_tp::enabled() {
        raw_tp::bio_merge(ctx.arg(0), true);
    }
    0
}

#[raw_tracepoint(tracepoint = "block_bio_frontmerge")]
pub fn kml_raw_bio_frontmerge(ctx: RawTracePointContext) -> i32 {
    if raw_tp::enabled() {
        raw_tp::bio_merge(ctx.arg(0), false);
    }
    0
}

/// The inference stage, raw tracepoint mode (tail-called by insert, never attached).
#[raw_tracepoint(tracepoint = "block_rq_insert")]
pub fn kml_raw_infer(_ctx: RawTracePointContext) -> i32 {
    infer::stage(true);
    0
}

// --- classic tracepoints: fields at tracefs format offsets ---

#[tracepoint(category = "block", name = "block_rq_insert")]
pub fn kml_tp_rq_insert(ctx: TracePointContext) -> i32 {
    if tp::enabled() {
        tp::insert(&ctx);
    }
    0
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn kml_tp_rq_issue(ctx: TracePointContext) -> i32 {
    if tp::enabled() {
        tp::issue(&ctx);
    }
    0
}

#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn kml_tp_rq_complete(ctx: TracePointContext) -> i32 {
    if tp::enabled() {
        tp::complete(&ctx);
    }
    0
}

#[tracepoint(category = "block", name = "block_rq_requeue")]
pub fn kml_tp_rq_requeue(ctx: TracePointContext) -> i32 {
    if tp::enabled() {
        tp::requeue(&ctx);
    }
    0
}

#[tracepoint(category = "block", name = "block_rq_merge")]
pub fn kml_tp_rq_merge(ctx: TracePointContext) -> i32 {
    if tp::enabled() {
        tp::merge(&ctx);
    }
    0
}

#[tracepoint(category = "block", name = "block_bio_backmerge")]
pub fn kml_tp_bio_backmerge(ctx: TracePointContext) -> i32 {
    if tp::enabled() {
        tp::bio_merge(&ctx, true);
    }
    0
}

#[tracepoint(category = "block", name = "block_bio_frontmerge")]
pub fn kml_tp_bio_frontmerge(ctx: TracePointContext) -> i32 {
    if tp::enabled() {
        tp::bio_merge(&ctx, false);
    }
    0
}

/// The inference stage, tracepoint mode (tail-called by insert, never attached).
#[tracepoint(category = "block", name = "block_rq_insert")]
pub fn kml_tp_infer(_ctx: TracePointContext) -> i32 {
    infer::stage(false);
    0
}

/// The slot checker: recomputes every slot's checksum into `SLOT_STATUS`. Never
/// attached; the agent runs it (BPF_PROG_TEST_RUN) after writing a slot and before
/// flipping to it, so the long checksum loops stay out of the per-request path.
/// Writes this CPU's staged records to the ring; never attached, the agent runs it
/// on each CPU (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`).
#[raw_tracepoint(tracepoint = "kml_flush_records")]
pub fn kml_flush_records(_ctx: RawTracePointContext) -> i32 {
    lifecycle::flush_this_cpu()
}

#[raw_tracepoint(tracepoint = "kml_verify_slots")]
pub fn kml_verify_slots(_ctx: RawTracePointContext) -> i32 {
    infer::verify_slots();
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
