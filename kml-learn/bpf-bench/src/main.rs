//! The kernel-side decision as BPF socket filters, to time with BPF_PROG_TEST_RUN
//! (see run.sh): each program looks up a record and a model in array maps (zeroed:
//! every linear lane runs, and a zeroed tree walks all TREE_MAX_DEPTH levels), then
//! computes nothing more (`bench_empty`), the features, features + linear
//! inference, or features + tree inference. `bench_position` adds what the position
//! state costs at insert (a `QueueShape` from a third map: `position` then
//! `on_insert`), `bench_position_linear` that plus the 18-lane vector and a linear
//! model.
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::Array,
    macros::{btf_map, socket_filter},
    programs::SkBuffContext,
};
use kml_ebpf_common::{
    features::{features_at_insert, features_with_position},
    position::QueueShape,
    inference::{infer_linear, infer_tree},
    model::{LinearModel, TreeModel},
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
    let (Some(r), Some(m)) = (RECS.get(0), LIN.get(0)) else { return 0 };
    (r.sector as i64) ^ m.bias
}

#[socket_filter]
pub fn bench_features(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m)) = (RECS.get(0), LIN.get(0)) else { return 0 };
    let x = features_at_insert(r);
    let mut acc = m.bias;
    for v in x.iter() {
        acc ^= *v as i64;
    }
    acc
}

#[socket_filter]
pub fn bench_linear(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m)) = (RECS.get(0), LIN.get(0)) else { return 0 };
    let x = features_at_insert(r);
    infer_linear(m, &x).at_risk as i64
}

#[socket_filter]
pub fn bench_tree(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m)) = (RECS.get(0), TREE.get(0)) else { return 0 };
    let x = features_at_insert(r);
    infer_tree(m, &x).at_risk as i64
}

#[socket_filter]
pub fn bench_position(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(q)) = (RECS.get(0), SHAPE.get_ptr_mut(0)) else { return 0 };
    let budget = r.deadline_ns.wrapping_sub(r.insert_ns);
    // SAFETY: a map value pointer, valid for the program's run.
    let q = unsafe { &mut *q };
    let p = q.position(r.sector, 15, r.insert_ns, budget);
    q.on_insert(r.sector, 15, r.insert_ns, budget);
    (p.due_below ^ p.head_age_log ^ p.expired) as i64
}

#[socket_filter]
pub fn bench_position_linear(_ctx: SkBuffContext) -> i64 {
    let (Some(r), Some(m), Some(q)) = (RECS.get(0), LIN.get(0), SHAPE.get_ptr_mut(0)) else {
        return 0;
    };
    let budget = r.deadline_ns.wrapping_sub(r.insert_ns);
    // SAFETY: a map value pointer, valid for the program's run.
    let q = unsafe { &mut *q };
    let p = q.position(r.sector, 15, r.insert_ns, budget);
    q.on_insert(r.sector, 15, r.insert_ns, budget);
    let x = features_with_position(r, &p);
    infer_linear(m, &x).at_risk as i64
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
