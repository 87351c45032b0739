//! Classic tracepoints: no `struct request`, fields at tracefs format offsets. A
//! request is found by (dev, sector) in the `INFLIGHT` hash map; two requests in
//! flight at one sector of one device collide, and that is counted (stale entries).

use aya_ebpf::programs::TracePointContext;
use kml_ebpf_common::{
    attach_mode,
    device::{DeviceSlot, ReqState},
    layout::EventFields,
    op::{parse_rwbs, ReqFlags, ReqOp},
    Counter, InflightKey,
};

use crate::{
    lifecycle::{self, Req},
    maps::{
        count, device_event, layout, DEVICES, DEV_SLOTS, INFLIGHT, TP_SCRATCH, TP_SCRATCH_FLUSH,
        TP_SCRATCH_INSERT,
    },
};

/// Owner mark of a classic tracepoint entry (the key names the request).
const OWNER: u64 = 1;

#[inline(always)]
pub fn enabled() -> bool {
    layout!(mode) == attach_mode::TRACEPOINT
}

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
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

/// dev, sector, nr_sector: in every block_rq_* event used.
#[inline(always)]
fn common(ctx: &TracePointContext, f: &EventFields) -> Option<(u32, u64, u32)> {
    Some((
        field(ctx, f.dev)?,
        field(ctx, f.sector)?,
        field(ctx, f.nr_sector)?,
    ))
}

#[inline(always)]
fn key(dev: u32, sector: u64) -> InflightKey {
    InflightKey::tracepoint(dev, sector)
}

/// A traced device's slot and `DEVICES` entry.
#[inline(always)]
fn device(dev: u32) -> Option<(u32, *mut DeviceSlot)> {
    // SAFETY: a u32 read out of the map value at once.
    let slot = *unsafe { DEV_SLOTS.get(dev) }?;
    let s = DEVICES.get_ptr_mut(slot)?;
    unsafe { ((*s).active == 1 && (*s).dev == dev).then_some((slot, s)) }
}

#[inline(always)]
fn rwbs(ctx: &TracePointContext, f: &EventFields) -> (ReqOp, ReqFlags) {
    match field::<[u8; 8]>(ctx, f.rwbs) {
        Some(b) => parse_rwbs(&b),
        None => (ReqOp::Other, ReqFlags(0)),
    }
}

/// Stores a new entry built in `TP_SCRATCH` (undoing its counts if it cannot).
#[inline(always)]
fn store(k: &InflightKey, s: *mut DeviceSlot, sc: *mut ReqState) -> bool {
    if INFLIGHT.insert(k, unsafe { &*sc }, 0).is_ok() {
        true
    } else {
        count(Counter::InflightInsertFailures);
        lifecycle::release(s, sc);
        false
    }
}

pub fn insert(ctx: &TracePointContext) {
    let f = layout!(tp.insert);
    let Some((dev, sector, nr_sectors)) = common(ctx, &f) else {
        return;
    };
    let Some((slot, s)) = device(dev) else { return };
    let (op, flags) = rwbs(ctx, &f);
    let r = Req {
        sector,
        nr_sectors,
        op,
        flags: flags.0,
        ioprio: field::<u16>(ctx, f.ioprio).unwrap_or(0),
    };
    let k = key(dev, sector);
    let scored = match INFLIGHT.get_ptr_mut(&k) {
        Some(e) => lifecycle::on_insert(s, slot, e, OWNER, dev, &r),
        None => {
            let Some(sc) = TP_SCRATCH.get_ptr_mut(TP_SCRATCH_INSERT) else {
                return;
            };
            unsafe {
                (*sc).rq = 0;
                (*sc).phase = 0;
            }
            let scored = lifecycle::on_insert(s, slot, sc, OWNER, dev, &r);
            store(&k, s, sc) && scored
        }
    };
    if scored {
        lifecycle::infer(ctx, |h| h.key = k);
    }
}

pub fn issue(ctx: &TracePointContext) {
    let f = layout!(tp.issue);
    let Some((dev, sector, nr_sectors)) = common(ctx, &f) else {
        return;
    };
    let Some((slot, s)) = device(dev) else { return };
    let k = key(dev, sector);
    if let Some(e) = INFLIGHT.get_ptr_mut(&k) {
        // fifo_time was computed at insert (no `struct request` here).
        lifecycle::on_issue(s, e, || None, sector + nr_sectors as u64);
        return;
    }
    if rwbs(ctx, &f).0 == ReqOp::Flush {
        let Some(sc) = TP_SCRATCH.get_ptr_mut(TP_SCRATCH_FLUSH) else {
            return;
        };
        unsafe {
            (*sc).rq = 0;
            (*sc).phase = 0;
        }
        lifecycle::on_flush_issue(s, slot, sc, OWNER, dev);
        store(&k, s, sc);
    } else {
        count(Counter::Issues);
        count(Counter::IssuesWithoutInsert);
    }
}

pub fn complete(ctx: &TracePointContext) {
    let f = layout!(tp.complete);
    let Some((dev, sector, nr_sectors)) = common(ctx, &f) else {
        return;
    };
    let Some((slot, s)) = device(dev) else { return };
    let k = key(dev, sector);
    let Some(e) = INFLIGHT.get_ptr_mut(&k) else {
        count(Counter::Completions);
        if nr_sectors == 0 {
            // The request that asked for a flush, at the end of its sequence
            // (nothing left to complete; see raw_tp::complete).
            count(Counter::FlushParentCompletions);
            device_event(slot, |x| x.flush_parent_completions += 1);
        } else {
            count(Counter::OrphanCompletions);
        }
        return;
    };
    let error = field::<i32>(ctx, f.error).unwrap_or(0);
    // The tracepoint's nr_sector is what remains, not what completed: a partial
    // completion cannot be told here, so every completion ends the request.
    lifecycle::on_complete(s, slot, e, error, nr_sectors << 9);
    let _ = INFLIGHT.remove(&k);
}

pub fn requeue(ctx: &TracePointContext) {
    let f = layout!(tp.requeue);
    let Some((dev, sector, _)) = common(ctx, &f) else {
        return;
    };
    let Some((_, s)) = device(dev) else { return };
    if let Some(e) = INFLIGHT.get_ptr_mut(&key(dev, sector)) {
        lifecycle::on_requeue(s, e);
    }
}

pub fn merge(ctx: &TracePointContext) {
    let f = layout!(tp.merge);
    let Some((dev, sector, _)) = common(ctx, &f) else {
        return;
    };
    let Some((slot, s)) = device(dev) else { return };
    let k = key(dev, sector);
    if let Some(e) = INFLIGHT.get_ptr_mut(&k) {
        lifecycle::on_merge(s, slot, e);
        let _ = INFLIGHT.remove(&k);
    } else {
        lifecycle::on_merge_before_insert(slot);
    }
}

pub fn bio_merge(ctx: &TracePointContext, back: bool) {
    let f = if back {
        layout!(tp.bio_backmerge)
    } else {
        layout!(tp.bio_frontmerge)
    };
    let Some(dev) = field::<u32>(ctx, f.dev) else {
        return;
    };
    let Some((slot, _)) = device(dev) else { return };
    if back {
        count(Counter::BioBackMerges);
        device_event(slot, |x| x.bio_back_merges += 1);
    } else {
        count(Counter::BioFrontMerges);
        device_event(slot, |x| x.bio_front_merges += 1);
    }
}
