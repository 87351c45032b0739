//! Raw tracepoints: `struct request *` in hand. One probe read per event brings the
//! request's hot fields (`RQ_WINDOW` bytes); its queue pointer finds the device slot
//! through `QCACHE`, its scheduler tag the entry in `REQS`.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated as gen};
use kml_ebpf_common::{
    attach_mode,
    device::{qcache_index, req_index, DeviceSlot, QSlot, ReqState, NO_SLOT},
    layout::{ablate, IOPRIO_IN_BIO, IOPRIO_IN_REQUEST, RQ_WIDE_WINDOW, RQ_WINDOW},
    op::{ReqFlags, ReqOp},
    Counter,
};

use crate::{
    lifecycle::{self, Req},
    maps::{count, device_event, layout, CONTROL, DEVICES, DEV_SLOTS, ISSUE_WINDOW, QCACHE, REQS},
};

#[inline(always)]
pub fn enabled() -> bool {
    layout!(mode) == attach_mode::RAW_TRACEPOINT && layout!(ablate) & ablate::PROBE_NULL == 0
}

#[inline(always)]
pub fn read<T>(addr: u64) -> Option<T> {
    match unsafe { bpf_probe_read_kernel(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ReadFailures);
            None
        }
    }
}

/// `N` bytes of the request from `rq_window`, read in one probe read: every
/// field an event needs ([`RQ_WINDOW`]; at issue [`RQ_WIDE_WINDOW`] reaches
/// `fifo_time` too when the layout puts it in reach).
pub struct Window<'a, const N: usize>(&'a [u8; N]);

/// Reads `N` bytes of the request at `rq` into `buf`; the bytes, once read.
///
/// `buf` is not zeroed first: the probe read writes every byte or fails, so a
/// zeroing is wasted stores on every event. (Under bpf-linker's default flags it
/// was worse, a call to compiler_builtins' byte-loop `memset`: see the eBPF
/// rustflags in xtask's build.rs.)
#[inline(always)]
fn fill<const N: usize>(rq: u64, buf: &mut MaybeUninit<[u8; N]>) -> Option<&[u8; N]> {
    if layout!(ablate) & ablate::READ_PER_FIELD != 0 {
        return fill_per_field(rq, buf);
    }
    // SAFETY: the helper writes at most N bytes into buf.
    let src = (rq + layout!(raw.rq_window) as u64) as *const core::ffi::c_void;
    let rc = unsafe { gen::bpf_probe_read_kernel(buf.as_mut_ptr().cast(), N as u32, src) };
    if rc != 0 {
        count(Counter::ReadFailures);
        return None;
    }
    // SAFETY: a successful probe read wrote all N bytes.
    Some(unsafe { buf.assume_init_ref() })
}

/// Measurement only (`ablate::READ_PER_FIELD`): the same bytes, one probe read per
/// field.
#[inline(never)]
fn fill_per_field<const N: usize>(rq: u64, buf: &mut MaybeUninit<[u8; N]>) -> Option<&[u8; N]> {
    let base = layout!(raw.rq_window);
    // The bytes between the fields are not read: zeroed, as the window's would be.
    let buf = buf.write([0; N]);
    macro_rules! field {
        ($off:expr, $t:ty) => {{
            let at = ($off).wrapping_sub(base) as usize;
            let v: $t = read(rq + ($off) as u64)?;
            if at + core::mem::size_of::<$t>() <= N {
                unsafe { core::ptr::write_unaligned(buf.as_mut_ptr().add(at).cast::<$t>(), v) };
            }
        }};
    }
    field!(layout!(raw.rq_q), u64);
    field!(layout!(raw.rq_mq_hctx), u64);
    field!(layout!(raw.rq_cmd_flags), u32);
    field!(layout!(raw.rq_rq_flags), u32);
    field!(layout!(raw.rq_internal_tag), u32);
    field!(layout!(raw.rq_data_len), u32);
    field!(layout!(raw.rq_sector), u64);
    field!(layout!(raw.rq_bio), u64);
    if N > RQ_WINDOW {
        field!(layout!(raw.rq_fifo_time), u64);
    }
    Some(buf)
}

/// The small window, on the stack (`$buf`: its bytes, read; returns when the
/// read fails).
macro_rules! small_window {
    ($rq:expr, $buf:ident) => {
        let mut $buf = MaybeUninit::<[u8; RQ_WINDOW]>::uninit();
        let Some($buf) = fill($rq, &mut $buf) else {
            return;
        };
    };
}

impl<const N: usize> Window<'_, N> {
    /// A field at its offset in `struct request`. The offsets are frozen globals:
    /// the verifier knows them, and the agent checked they lie inside the window.
    #[inline(always)]
    fn at<T: Copy>(&self, offset: u32) -> T {
        let at = offset.wrapping_sub(layout!(raw.rq_window)) as usize;
        if at + core::mem::size_of::<T>() > N {
            // Never with a layout the agent accepted; keeps the access in bounds.
            return unsafe { core::mem::zeroed() };
        }
        unsafe { core::ptr::read_unaligned(self.0.as_ptr().add(at).cast::<T>()) }
    }

    #[inline(always)]
    pub fn q(&self) -> u64 {
        self.at(layout!(raw.rq_q))
    }
    #[inline(always)]
    pub fn sector(&self) -> u64 {
        self.at(layout!(raw.rq_sector))
    }
    #[inline(always)]
    pub fn data_len(&self) -> u32 {
        self.at(layout!(raw.rq_data_len))
    }
    #[inline(always)]
    pub fn cmd_flags(&self) -> u32 {
        self.at(layout!(raw.rq_cmd_flags))
    }
    #[inline(always)]
    pub fn flush_seq(&self) -> bool {
        self.at::<u32>(layout!(raw.rq_rq_flags)) & layout!(raw.rqf_flush_seq) != 0
    }
    #[inline(always)]
    fn tag(&self) -> u32 {
        self.at(layout!(raw.rq_internal_tag))
    }
    #[inline(always)]
    fn hctx(&self) -> u64 {
        self.at(layout!(raw.rq_mq_hctx))
    }
    #[inline(always)]
    fn bio(&self) -> u64 {
        self.at(layout!(raw.rq_bio))
    }
    /// Only for a window that reaches it (`raw.fifo_in_wide_window`).
    #[inline(always)]
    fn fifo_time(&self) -> u64 {
        self.at(layout!(raw.rq_fifo_time))
    }
}

/// The traced device of a request queue: its slot, `DEVICES` entry and dev_t.
pub struct Device {
    pub slot: u32,
    pub s: *mut DeviceSlot,
    pub dev: u32,
}

/// Looks a request queue up in `QCACHE`; on a miss, follows q → disk → major and
/// minor and asks `DEV_SLOTS`, then caches the answer (also "not traced").
#[inline(always)]
pub fn device_of_q(q: u64) -> Option<Device> {
    let ci = qcache_index(q);
    let c = QCACHE.get_ptr_mut(ci)?;
    let cached: QSlot = unsafe { *c };
    let use_cache = layout!(ablate) & ablate::NO_QCACHE == 0;
    if use_cache && cached.q == q && q != 0 {
        if cached.slot == NO_SLOT {
            // Not traced, as of the epoch it was cached in.
            if CONTROL.get(0).is_some_and(|k| k.epoch == cached.epoch) {
                return None;
            }
        } else if let Some(s) = DEVICES.get_ptr_mut(cached.slot) {
            if unsafe { (*s).active == 1 && (*s).dev == cached.dev } {
                return Some(Device {
                    slot: cached.slot,
                    s,
                    dev: cached.dev,
                });
            }
        }
    }
    slow_device_of_q(q, c)
}

#[inline(never)]
fn slow_device_of_q(q: u64, c: *mut QSlot) -> Option<Device> {
    count(Counter::QcacheMisses);
    let epoch = CONTROL.get(0).map_or(0, |k| k.epoch);
    let disk: u64 = read(q + layout!(raw.q_disk) as u64)?;
    if disk == 0 {
        return None;
    }
    let major: i32 = read(disk + layout!(raw.disk_major) as u64)?;
    let minor: i32 = read(disk + layout!(raw.disk_first_minor) as u64)?;
    let dev = kml_ebpf_common::kernel_dev(major as u32, minor as u32);
    // SAFETY: a u32 read out of the map value at once.
    let slot = unsafe { DEV_SLOTS.get(dev) }.copied().unwrap_or(NO_SLOT);
    unsafe {
        *c = QSlot {
            q,
            slot,
            dev,
            epoch,
            _pad: 0,
        }
    };
    let s = DEVICES.get_ptr_mut(slot)?;
    if unsafe { (*s).active == 1 && (*s).dev == dev } {
        Some(Device { slot, s, dev })
    } else {
        None
    }
}

/// The request's index and entry in `REQS` (whoever holds it now).
#[inline(always)]
fn entry<const N: usize>(d: &Device, w: &Window<'_, N>) -> Option<(u32, *mut ReqState)> {
    let stride = unsafe { (*d.s).hctx_stride };
    let hctx = if stride == 0 {
        0
    } else {
        read::<u32>(w.hctx() + layout!(raw.hctx_queue_num) as u64)?
    };
    let Some(index) = req_index(d.slot, layout!(tag_bits), hctx, stride, w.tag()) else {
        count(Counter::UntrackedRequests);
        return None;
    };
    Some((index, REQS.get_ptr_mut(index)?))
}

/// The entry of `rq`, if it has one: for the verdict hook.
#[inline(always)]
pub fn entry_of(rq: u64) -> Option<*mut ReqState> {
    let mut buf = MaybeUninit::<[u8; RQ_WINDOW]>::uninit();
    let w = Window(fill(rq, &mut buf)?);
    let d = device_of_q(w.q())?;
    let (_, e) = entry(&d, &w)?;
    (unsafe { (*e).rq } == rq).then_some(e)
}

#[inline(always)]
fn ioprio(rq: u64, w: &Window<'_, RQ_WINDOW>) -> u16 {
    if layout!(read_ioprio) == 0 || layout!(ablate) & ablate::PROBE_NO_IOPRIO != 0 {
        return 0;
    }
    match layout!(raw.ioprio_source) {
        IOPRIO_IN_REQUEST => read(rq + layout!(raw.rq_ioprio) as u64).unwrap_or(0),
        IOPRIO_IN_BIO => {
            let bio = w.bio();
            if bio == 0 {
                return 0;
            }
            read(bio + layout!(raw.bio_ioprio) as u64).unwrap_or(0)
        }
        _ => 0,
    }
}

#[inline(always)]
pub fn op_of(cmd_flags: u32) -> (ReqOp, u8) {
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

pub fn insert<C: aya_ebpf::EbpfContext>(ctx: &C, rq: u64) {
    small_window!(rq, buf);
    let w = Window(buf);
    if layout!(ablate) & ablate::PROBE_STOP_AT_READ != 0 {
        return;
    }
    // Untraced disks cost the read and a cache probe.
    let Some(d) = device_of_q(w.q()) else { return };
    let Some((index, e)) = entry(&d, &w) else {
        return;
    };
    if layout!(ablate) & ablate::PROBE_STOP_AT_ENTRY != 0 {
        return;
    }
    let (op, flags) = op_of(w.cmd_flags());
    let r = Req {
        sector: w.sector(),
        nr_sectors: w.data_len() >> 9,
        op,
        flags,
        ioprio: ioprio(rq, &w),
    };
    if lifecycle::on_insert(d.s, d.slot, e, rq, d.dev, &r) {
        lifecycle::infer(ctx, |h| h.index = index);
    }
}

pub fn issue(rq: u64) {
    if layout!(raw.fifo_in_wide_window) == 1 && layout!(ablate) & ablate::TWO_READS_AT_ISSUE == 0 {
        // One read reaches fifo_time too (into this program's own per-CPU buffer:
        // too big for the stack; a program never nests in itself).
        let Some(buf) = ISSUE_WINDOW.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: MaybeUninit<T> has T's layout; the map value is this CPU's alone.
        let buf = unsafe { &mut *buf.cast::<MaybeUninit<[u8; RQ_WIDE_WINDOW]>>() };
        let Some(buf) = fill(rq, buf) else {
            return;
        };
        let w = Window(buf);
        return issue_with(rq, &w, || Some(w.fifo_time()));
    }
    small_window!(rq, buf);
    let w = Window(buf);
    issue_with(rq, &w, || {
        read::<u64>(rq + layout!(raw.rq_fifo_time) as u64)
    });
}

#[inline(always)]
fn issue_with<const N: usize>(rq: u64, w: &Window<'_, N>, fifo: impl FnOnce() -> Option<u64>) {
    if layout!(ablate) & ablate::PROBE_STOP_AT_READ != 0 {
        return;
    }
    let Some(d) = device_of_q(w.q()) else { return };
    let Some((_, e)) = entry(&d, w) else {
        return;
    };
    if layout!(ablate) & ablate::PROBE_STOP_AT_ENTRY != 0 {
        return;
    }
    if unsafe { (*e).rq } == rq {
        lifecycle::on_issue(d.s, e, fifo, w.sector() + (w.data_len() >> 9) as u64);
        return;
    }
    if op_of(w.cmd_flags()).0 == ReqOp::Flush {
        // The flush machinery's own request: it borrowed the tag of the request
        // that asked for the flush (which has no entry: it never reached the
        // scheduler), so its index is free.
        lifecycle::on_flush_issue(d.s, d.slot, e, rq, d.dev);
    } else {
        count(Counter::Issues);
        count(Counter::IssuesWithoutInsert);
    }
}

pub fn complete(rq: u64, error: i32, nr_bytes: u32) {
    small_window!(rq, buf);
    let w = Window(buf);
    if layout!(ablate) & ablate::PROBE_STOP_AT_READ != 0 {
        return;
    }
    let Some(d) = device_of_q(w.q()) else { return };
    let Some((_, e)) = entry(&d, &w) else {
        return;
    };
    if layout!(ablate) & ablate::PROBE_STOP_AT_ENTRY != 0 {
        return;
    }
    if unsafe { (*e).rq } != rq {
        count(Counter::Completions);
        if w.flush_seq() || w.data_len() == 0 {
            // The request that asked for a flush (an fsync's empty preflush write),
            // at the end of its flush sequence: nothing left to complete (its data,
            // if any, completed as a record of its own), and the flush machinery has
            // cleared RQF_FLUSH_SEQ and REQ_PREFLUSH by now. Its flush was recorded
            // at issue.
            count(Counter::FlushParentCompletions);
            device_event(d.slot, |x| x.flush_parent_completions += 1);
        } else {
            count(Counter::OrphanCompletions);
        }
        return;
    }
    // blk_update_request() fires this before shrinking the request: a completion
    // of fewer bytes than remain is partial and the request stays in flight.
    if nr_bytes < w.data_len() {
        count(Counter::PartialCompletions);
        return;
    }
    lifecycle::on_complete(d.s, d.slot, e, error, nr_bytes);
}

pub fn requeue(rq: u64) {
    small_window!(rq, buf);
    let w = Window(buf);
    let Some(d) = device_of_q(w.q()) else { return };
    let Some((_, e)) = entry(&d, &w) else {
        return;
    };
    if unsafe { (*e).rq } == rq {
        lifecycle::on_requeue(d.s, e);
    }
}

pub fn merge(rq: u64) {
    small_window!(rq, buf);
    let w = Window(buf);
    let Some(d) = device_of_q(w.q()) else { return };
    let Some((_, e)) = entry(&d, &w) else {
        return;
    };
    if unsafe { (*e).rq } == rq {
        lifecycle::on_merge(d.s, d.slot, e);
    } else {
        // Merged into a queued request as it was being inserted (before its
        // insert event): its I/O is in that request's record.
        lifecycle::on_merge_before_insert(d.slot);
    }
}

/// `block_bio_backmerge` / `frontmerge`: a bio joins a request already formed.
pub fn bio_merge(bio: u64, back: bool) {
    let Some(bdev) = read::<u64>(bio + layout!(raw.bio_bdev) as u64) else {
        return;
    };
    let Some(q) = read::<u64>(bdev + layout!(raw.bdev_queue) as u64) else {
        return;
    };
    let Some(d) = device_of_q(q) else { return };
    if back {
        count(Counter::BioBackMerges);
        device_event(d.slot, |x| x.bio_back_merges += 1);
    } else {
        count(Counter::BioFrontMerges);
        device_event(d.slot, |x| x.bio_front_merges += 1);
    }
}
