//! Where the raw tracepoint observers keep per-device and per-request state.
//!
//! - `DEVICES`: an array of [`DeviceSlot`]s, one per traced disk (the agent picks the
//!   slot), holding the agent's settings and the counts and averages the programs
//!   keep, each group on its own cache line. The lines are real ones only because
//!   the map starts its values on a page (`BPF_F_MMAPABLE`): a plain array's
//!   values start 56 bytes into a line on 6.18, and every event then missed on
//!   the settings line, which shared a line with what inserts write.
//! - `QCACHE`: a direct-mapped cache from `struct request_queue *` to the slot
//!   ([`QSlot`], index [`qcache_index`]), so that an event costs one probe read of the
//!   request instead of the chain request → queue → disk → major/minor.
//! - `REQS`: an array of [`ReqState`]s indexed by device slot and scheduler tag
//!   ([`req_index`]). A request keeps its `internal_tag` (the scheduler tag) from
//!   allocation to completion and the tag is reused only after the request is freed,
//!   so the index names one request at a time; the stored `rq` pointer checks it. No
//!   hash insert or delete per request.
//!
//! Classic tracepoints have no request pointer: there a request is found by
//! (dev, sector) in a hash map, as before.

use crate::{
    branchless::{keep, negative},
    record::RequestRecord,
};

/// Device slots (entries of `DEVICES`).
pub const MAX_DEVICES: u32 = 16;

/// Entries of `QCACHE` (a power of two).
pub const QCACHE_ENTRIES: u32 = 1024;

/// `DEVICES` slot value meaning "not traced" in a [`QSlot`].
pub const NO_SLOT: u32 = u32::MAX;

/// Log2 of the per-request entries per device (`REQS` holds
/// `MAX_DEVICES << tag_bits`, 65536 entries of 168 bytes, as many as the hash map
/// of before held): 4096 scheduler tags (hardware queues × `nr_requests`). A
/// request whose tag lies beyond is not followed, and counted
/// (`untracked_requests`); the agent warns when a device can have such tags.
pub const DEFAULT_TAG_BITS: u32 = 12;

/// One traced disk. Four cache lines, each with one kind of writer: the agent's
/// settings (read by every event), what inserts write, what issues write, what
/// completions write.
///
/// The in-flight and queued counts are kept as one count per writer (issue 14):
/// requests inserted (plain stores: inserts of a device run one at a time, under
/// mq-deadline's lock, as for `position::Tally`), requests that left the queue
/// (atomic, on the issue line) and requests that left flight (atomic, on the
/// completion line). An issue or a completion then writes only a line its own
/// kind writes, where the one packed count of before was a line that inserts,
/// issues and completions all wrote with locked instructions, and each of them
/// fetched it from the CPU that wrote it last (`cargo xtask bench --only
/// breakdown`: 13 / 14 / 37 ns per insert / issue / completion).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceSlot {
    // --- settings (written by the agent; read-mostly) ---
    /// Kernel `dev_t` of the disk (`major << 20 | minor`).
    pub dev: u32,
    /// 1 while the device is traced.
    pub active: u32,
    /// mq-deadline `read_expire` / `write_expire`, ns.
    pub read_expire_ns: u64,
    pub write_expire_ns: u64,
    /// The same in jiffies, for the classic tracepoint label fallback (0: unknown HZ).
    pub read_expire_jiffies: u64,
    pub write_expire_jiffies: u64,
    /// Scheduler tags per hardware queue (`nr_requests`) for devices with several
    /// hardware queues; 0 for one (then the hardware queue is not read).
    pub hctx_stride: u32,
    /// Sector bucket width of the position state, `position::bucket_shift_for(size)`.
    pub bucket_shift: u32,
    pub _pad0: [u32; 4],
    // --- written at insert (plain stores) ---
    /// ns of the last insert on the device.
    pub last_insert_ns: u64,
    /// Requests inserted, reads and the rest (wrapping).
    pub inserted_read: u32,
    pub inserted_write: u32,
    pub _pad1: [u64; 6],
    // --- written at issue ---
    pub last_issue_ns: u64,
    pub last_issue_end_sector: u64,
    pub issue_gap_ewma_ns: u64,
    pub wait_ewma_read_ns: u64,
    pub wait_ewma_write_ns: u64,
    /// Share of this direction's recent dispatches that missed their deadline
    /// (`label::miss_share_step`, 0..=`label::MISS_SHARE_ONE`): read at insert.
    pub miss_share_read: u32,
    pub miss_share_write: u32,
    /// Requests that left the queue (dispatched, merged away, found stale; a
    /// requeue takes one back), reads and the rest (atomic, wrapping).
    pub unqueued_read: u32,
    pub unqueued_write: u32,
    pub _pad2: [u64; 1],
    // --- written at completion ---
    /// Requests that left flight (completed, merged away, found stale), reads and
    /// the rest (atomic, wrapping).
    pub done_read: u32,
    pub done_write: u32,
    pub _pad3: [u64; 7],
}

/// `inserted - left` of two wrapping counts; 0 when `left` is ahead (never, with
/// every remove after its insert; a read that raced an update must not wrap to
/// four billion). Branch-free: the position state reads its queued count through
/// it too (`position::Tally`), inside code the verifier must see as one path.
#[inline(always)]
pub fn count_between(inserted: u32, left: u32) -> u32 {
    let d = inserted.wrapping_sub(left) as u64;
    // Bit 31 set: `left` is ahead (a wrapped difference).
    keep(1 ^ negative(d << 32), d) as u32
}

impl DeviceSlot {
    /// `(in flight, queued)` of reads, then of the rest.
    pub fn counts(&self) -> [(u32, u32); 2] {
        [
            (
                count_between(self.inserted_read, self.done_read),
                count_between(self.inserted_read, self.unqueued_read),
            ),
            (
                count_between(self.inserted_write, self.done_write),
                count_between(self.inserted_write, self.unqueued_write),
            ),
        ]
    }
}

/// The `QCACHE` entry of a request queue: `q` → `slot` (or [`NO_SLOT`]) of device
/// `dev`, valid while `epoch` is the control's (negative entries) or the slot still
/// holds `dev` (positive ones).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QSlot {
    pub q: u64,
    pub slot: u32,
    pub dev: u32,
    pub epoch: u32,
    pub _pad: u32,
}

/// Agent → programs settings that change at run time (`CONTROL[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// Bumped by the agent whenever the traced set changes: cached "not traced"
    /// answers from before are void.
    pub epoch: u32,
    pub _pad: u32,
}

/// `QCACHE` index of a request queue pointer (Fibonacci hashing).
#[inline(always)]
pub const fn qcache_index(q: u64) -> u32 {
    (q.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as u32 & (QCACHE_ENTRIES - 1)
}

/// Index in `REQS` of a request: device slot, hardware queue number and scheduler
/// tag; `None` for a tag beyond the device's share (not followed, counted).
#[inline(always)]
pub const fn req_index(
    slot: u32,
    tag_bits: u32,
    hctx: u32,
    hctx_stride: u32,
    tag: u32,
) -> Option<u32> {
    let within = hctx.wrapping_mul(hctx_stride).wrapping_add(tag);
    if within >= 1 << tag_bits {
        None
    } else {
        Some((slot << tag_bits) | within)
    }
}

/// One request in `REQS` (raw tracepoints) or the in-flight hash (classic ones).
/// Exactly three cache lines (192 bytes; `REQS` starts on a page): at 200 bytes,
/// neighbouring tags' entries shared lines, and two requests in flight on two
/// CPUs wrote each other's lines (issue 14).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqState {
    /// The `struct request *` the entry belongs to; 0: free. Classic tracepoints: 1
    /// while in use (the key names the request).
    pub rq: u64,
    /// Where the request is: free, queued, issued, requeued, or a bypass (a flush:
    /// never in the scheduler). The programs' own bookkeeping.
    pub phase: u32,
    /// The device slot (below [`MAX_DEVICES`]).
    pub slot: u16,
    /// [`ReqState::SHAPED`]: the request is counted in its direction's position
    /// state (`SHAPES`) and must leave it when it leaves the queue.
    pub flags: u16,
    /// What will be the record.
    pub rec: RequestRecord,
}

impl ReqState {
    pub const SHAPED: u16 = 1;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), integers only, explicit padding.
    unsafe impl aya::Pod for super::DeviceSlot {}
    unsafe impl aya::Pod for super::QSlot {}
    unsafe impl aya::Pod for super::Control {}
    unsafe impl aya::Pod for super::ReqState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn device_slot_lines() {
        assert_eq!(size_of::<DeviceSlot>(), 256);
        // One line per kind of writer.
        assert_eq!(offset_of!(DeviceSlot, last_insert_ns), 64);
        assert_eq!(offset_of!(DeviceSlot, inserted_write), 76);
        assert_eq!(offset_of!(DeviceSlot, last_issue_ns), 128);
        assert_eq!(offset_of!(DeviceSlot, unqueued_write), 180);
        assert_eq!(offset_of!(DeviceSlot, done_read), 192);
        assert_eq!(size_of::<QSlot>(), 24);
    }

    #[test]
    fn request_entries_are_whole_cache_lines() {
        assert_eq!(size_of::<ReqState>(), 3 * 64);
        assert_eq!(offset_of!(ReqState, rec), 16);
    }

    #[test]
    fn counts_per_writer() {
        let mut s = DeviceSlot {
            inserted_read: 3,
            unqueued_read: 1,
            done_read: 0,
            inserted_write: 1,
            ..DeviceSlot::default()
        };
        assert_eq!(s.counts(), [(3, 2), (1, 1)]);
        // Wrapping: the counts run past u32::MAX.
        s.inserted_read = 2;
        s.unqueued_read = u32::MAX;
        s.done_read = u32::MAX - 1;
        assert_eq!(s.counts()[0], (4, 3));
        // A read that raced an update: never four billion.
        assert_eq!(count_between(5, 6), 0);
        assert_eq!(count_between(0, 0), 0);
    }

    #[test]
    fn request_index() {
        assert_eq!(req_index(0, 12, 0, 0, 5), Some(5));
        assert_eq!(req_index(3, 12, 0, 0, 4095), Some(3 << 12 | 4095));
        assert_eq!(req_index(3, 12, 1, 256, 5), Some(3 << 12 | 261));
        // Beyond the device's share: not followed.
        assert_eq!(req_index(3, 12, 16, 256, 5), None);
        assert_eq!(req_index(3, 12, 0, 0, 4096), None);
        // A tag of -1 (no tag) reads as u32::MAX.
        assert_eq!(req_index(3, 12, 0, 0, u32::MAX), None);
        assert_eq!(
            req_index(MAX_DEVICES - 1, 12, 0, 0, 4095),
            Some((MAX_DEVICES << 12) - 1)
        );
    }

    #[test]
    fn qcache_spreads_and_stays_in_range() {
        let mut seen = [false; QCACHE_ENTRIES as usize];
        let mut distinct = 0;
        for i in 0..64u64 {
            // request_queue structs: kmalloc'd, 8-aligned, a few KiB apart.
            let q = 0xffff_8880_1234_0000 + i * 0x1800;
            let k = qcache_index(q) as usize;
            assert!(k < QCACHE_ENTRIES as usize);
            if !seen[k] {
                seen[k] = true;
                distinct += 1;
            }
        }
        assert!(distinct >= 60, "{distinct}");
    }
}
