//! The kernel-side decision as BPF socket filters, to time with BPF_PROG_TEST_RUN
//! (see run.sh): each program looks up a record and a model in array maps (zeroed:
//! every linear lane runs, and a zeroed tree walks all TREE_MAX_DEPTH levels), then
//! computes nothing more (`bench_empty`), the features, features + linear
//! inference, or features + tree inference. `bench_position` adds what the position
//! state costs at insert on an empty queue (a `QueueShape` from a third map:
//! `position` then `on_insert`); `bench_position_queue` and `bench_position_deep`
//! the same in a steady random-read queue of 32 and 512 requests, with the
//! dispatch of the oldest (`on_remove`), at a 4 ms expiry (the ring's periods
//! in use); `bench_position_cost_deep` in the queue of the cost bench's deep job
//! (`bench/cost-deep.fio`: about 128 queued, mq-deadline's default 500 ms read
//! expiry, so every queued request is in the ring's newest one or two periods).
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::Array,
    macros::{btf_map, socket_filter},
    programs::SkBuffContext,
};
use kml_ebpf_common::{
    features::features_at_insert,
    inference::{infer_linear, infer_tree},
    model::{LinearModel, TreeModel},
    position::QueueShape,
    RequestRecord,
};

#[btf_map]
static RECS: Array<RequestRecord, 1> = Array::new();
#[btf_map]
static LIN: Array<LinearModel, 1> = Array::new();
#[btf_map]
static TREE: Array<TreeModel, 1> = Array::new();
#[btf_map]
static SHAPE: Array<QueueShape, 1> = Array::new();

#[socket_filter]
pub fn bench_empty(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m)) = (RECS.get(0), LIN.get(0)) else {
        return 0;
    };
    (r.sector as i64) ^ m.bias
}

#[socket_filter]
pub fn bench_features(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m)) = (RECS.get(0), LIN.get(0)) else {
        return 0;
    };
    let x = features_at_insert(r);
    let mut acc = m.bias;
    for v in x.iter() {
        acc ^= *v as i64;
    }
    acc
}

#[socket_filter]
pub fn bench_linear(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m)) = (RECS.get(0), LIN.get(0)) else {
        return 0;
    };
    let x = features_at_insert(r);
    infer_linear(m, &x).at_risk as i64
}

#[socket_filter]
pub fn bench_tree(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m)) = (RECS.get(0), TREE.get(0)) else {
        return 0;
    };
    let x = features_at_insert(r);
    infer_tree(m, &x).at_risk as i64
}

#[socket_filter]
pub fn bench_position(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(q)) = (RECS.get(0), SHAPE.get_ptr_mut(0)) else {
        return 0;
    };
    let budget = r.deadline_ns.wrapping_sub(r.insert_ns);
    // SAFETY: a map value pointer, valid for the program's run.
    let q = unsafe { &mut *q };
    let p = q.position(r.sector, 15, r.insert_ns, budget);
    q.on_insert(r.sector, 15, r.insert_ns, budget);
    (p.due_below ^ p.head_age_log ^ p.expired) as i64
}

/// Requests queued in the steady state of [`bench_position_queue`] (a power of two).
const QUEUE_DEPTH: u32 = 32;
/// ... and of [`bench_position_deep`].
const DEEP_DEPTH: u32 = 512;
/// ... and of [`bench_position_cost_deep`].
const COST_DEEP_DEPTH: u32 = 128;

/// The queued requests of the steady-state programs: (sector, insert ns), a
/// [`DEEP_DEPTH`] of them each.
#[btf_map]
static QUEUED: Array<[u64; 2], { 3 * DEEP_DEPTH as usize }> = Array::new();
/// Runs so far of each steady-state program.
#[btf_map]
static RUNS: Array<u64, 3> = Array::new();
/// The position state of each steady-state program.
#[btf_map]
static QUEUES: Array<QueueShape, 3> = Array::new();

/// One request of a steady random-read queue of `depth` requests on a 1 GiB disk
/// (2^21 sectors in 256 buckets: shift 13), one insert every `every_ns`, expiry
/// `budget`: the oldest leaves (`on_remove`, as at its dispatch), then the new one
/// takes its position and joins. What an insert pays under the cost bench's fio
/// job, plus a dispatch.
#[inline(always)]
fn steady(which: u32, depth: u32, every_ns: u64, budget: u64) -> i64 {
    let (Some(n), Some(q)) = (RUNS.get_ptr_mut(which), QUEUES.get_ptr_mut(which)) else {
        return 0;
    };
    // SAFETY: map value pointers, valid for the program's run.
    let (n, q) = unsafe { (&mut *n, &mut *q) };
    let i = *n;
    *n += 1;
    let now = (i + 1) * every_ns;
    let sector = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 43) & ((1 << 21) - 1);
    let Some(slot) = QUEUED.get_ptr_mut(which * DEEP_DEPTH + ((i as u32) & (depth - 1))) else {
        return 0;
    };
    // SAFETY: as above.
    let slot = unsafe { &mut *slot };
    if i >= depth as u64 {
        q.on_remove(slot[0], 13, slot[1], budget);
    }
    let p = q.position(sector, 13, now, budget);
    q.on_insert(sector, 13, now, budget);
    *slot = [sector, now];
    (p.due_below ^ p.head_age_log ^ p.expired ^ p.below_age_log) as i64
}

#[socket_filter]
pub fn bench_position_queue(_ctx: SkBuffContext) -> i64 {
    steady(0, QUEUE_DEPTH, 20_000, 4_000_000)
}

#[socket_filter]
pub fn bench_position_deep(_ctx: SkBuffContext) -> i64 {
    steady(1, DEEP_DEPTH, 20_000, 4_000_000)
}

#[socket_filter]
pub fn bench_position_cost_deep(_ctx: SkBuffContext) -> i64 {
    steady(2, COST_DEEP_DEPTH, 10_000, 500_000_000)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
