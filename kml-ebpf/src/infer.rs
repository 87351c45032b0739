//! Inference at insert (shadow mode: the verdict is kept in the entry and counted)
//! and the slot checker. The stage runs as its own program, tail-called by insert
//! once the entry is stored: the request's place in the queue (when the kernel
//! computes it), features and model are verified apart from insert.

use kml_ebpf_common::{
    device::ReqState,
    features::features_with_position,
    inference::{infer_linear, infer_tree, linear_limit},
    model::ModelKind,
    position::PositionFeatures,
    slot::{status_index, ModelControl, SlotStatus, MODEL_SLOTS},
    Counter, Sampling, Verdict,
};

use crate::maps::{
    count, Handoff, HANDOFF, INFLIGHT, LINEAR_MODELS, MODEL_CONTROL, REQS, SLOT_STATUS, TREE_MODELS,
};

/// Whether the in-kernel checker vouched for the slot as it reads now.
#[inline(always)]
fn slot_vouched(tree: bool, slot: u32, version: u32, checksum: u64) -> bool {
    match SLOT_STATUS.get(status_index(tree, slot)) {
        Some(st) => st.vouches(version, checksum),
        None => false,
    }
}

/// The entry the insert program handed over in `h`.
#[inline(always)]
fn handed_entry(raw: bool, h: *const Handoff) -> Option<*mut ReqState> {
    if raw {
        REQS.get_ptr_mut(unsafe { (*h).index })
    } else {
        INFLIGHT.get_ptr_mut(unsafe { &(*h).key })
    }
}

/// The stage: the features of the handed-over entry, the active model's verdict
/// on them, stored in the entry. No usable model: no verdict (fail open), counted.
#[inline(always)]
pub fn stage(raw: bool) {
    // One lookup of this CPU's hand-off: the entry's index or key in, the
    // feature vector out.
    let Some(h) = HANDOFF.get_ptr_mut(0) else {
        return count(Counter::ModelRejects);
    };
    let Some(e) = handed_entry(raw, h) else {
        return count(Counter::ModelRejects);
    };
    // The request's place in the queue, before the features read the entry (a
    // request must not see itself: taken before it joins); see
    // `lifecycle::position_on` for when.
    crate::lifecycle::shape_insert(e);
    let Some(ctl) = MODEL_CONTROL.get_ptr(0) else {
        return;
    };
    // One read of the control: the flip is a single map write.
    let ctl: ModelControl = unsafe { core::ptr::read_volatile(ctl) };
    if ctl.kind == 0 {
        return;
    }
    // The position the insert recorded (UNKNOWN when it did not): the host reads
    // the same lanes back from the record, so it computes the same vector.
    let rec = unsafe { &(*e).rec };
    let p = rec.recorded_position().unwrap_or(PositionFeatures::UNKNOWN);
    // In the per-CPU hand-off, not on the stack (see `Handoff::x`).
    unsafe { (*h).x = features_with_position(rec, &p) };
    let x = unsafe { &(*h).x };
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
    let margin = verdict.score.saturating_sub(limit);
    let margin = if margin < 0 {
        margin.saturating_neg()
    } else {
        margin
    };
    unsafe {
        (*e).rec.score = verdict.score;
        (*e).rec.model_version = version;
        (*e).rec.verdict = if verdict.at_risk {
            count(Counter::VerdictsAtRisk);
            Verdict::AT_RISK
        } else {
            Verdict::MEETS
        };
        (*e).rec.sampling = if ctl.near_margin > 0 && margin <= ctl.near_margin {
            Sampling::NEAR_BOUNDARY
        } else {
            0
        };
    }
}

/// The slot checker: recomputes every slot's checksum into `SLOT_STATUS`.
#[inline(always)]
pub fn verify_slots() {
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
}
