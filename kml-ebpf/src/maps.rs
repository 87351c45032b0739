//! Every map and global the programs share, and the small helpers that touch them.
//! The names are the contract with the agent (see `kml_ebpf_common::abi`).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    macros::btf_map,
};
use kml_ebpf_common::{
    abi::names::stage,
    device::{Control, DeviceSlot, QSlot, ReqState, DEFAULT_TAG_BITS, MAX_DEVICES, QCACHE_ENTRIES},
    features::FeatureVector,
    label::TickClock,
    model::{LinearModel, TreeModel},
    record::INFLIGHT_CAPACITY,
    slot::{ModelControl, SlotStatus, MODEL_SLOTS, STATUS_ENTRIES},
    Counter, Counters, DeviceEvents, InflightKey, KernelLayout, RecordBatch, RequestRecord,
};

/// Kernel layout, written by the agent at load time (`.rodata`, frozen).
#[no_mangle]
pub static KML_LAYOUT: KernelLayout = KernelLayout::zeroed();

/// Reads one field of `KML_LAYOUT`. Volatile: the compiler must not fold the
/// zero initialiser; the verifier sees the frozen value and prunes dead branches.
macro_rules! layout {
    ($($field:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::maps::KML_LAYOUT.$($field)+) }
    };
}
pub(crate) use layout;

/// Array flags that put the first value at the start of a page
/// (`BPF_F_MMAPABLE`; nothing maps it): a plain array's values start wherever
/// `struct bpf_array`'s header ends (56 bytes into a cache line on 6.18), which
/// put `DeviceSlot`'s read-mostly settings on the line the inserts write, so
/// every event missed on it (perf, issue 14). Page-aligned, its lines are its own.
const ALIGNED: usize = aya_ebpf::bindings::BPF_F_MMAPABLE as usize;

/// The traced disks, by slot (written by the agent, counts kept by the programs).
/// Aligned: `DeviceSlot`'s cache lines are laid out by who writes them.
#[btf_map]
pub static DEVICES: Array<DeviceSlot, { MAX_DEVICES as usize }, ALIGNED> = Array::new();

/// dev_t → slot of the traced disks (written by the agent): the classic
/// tracepoints' way in, and the raw ones' when `QCACHE` misses.
#[btf_map]
pub static DEV_SLOTS: HashMap<u32, u32, { MAX_DEVICES as usize }> = HashMap::new();

/// `struct request_queue *` → slot (filled by the programs, see `device::QSlot`).
#[btf_map]
pub static QCACHE: Array<QSlot, { QCACHE_ENTRIES as usize }> = Array::new();

/// Run-time settings of the agent (`Control`).
#[btf_map]
pub static CONTROL: Array<Control, 1> = Array::new();

/// Raw tracepoints: one entry per (device slot, scheduler tag); the agent sizes it
/// to `MAX_DEVICES << tag_bits` at load.
#[btf_map]
pub static REQS: Array<ReqState, { (MAX_DEVICES << DEFAULT_TAG_BITS) as usize }, ALIGNED> =
    Array::new();

/// Classic tracepoints: requests from insert to completion by (dev, sector). LRU so
/// that a request whose completion was never seen cannot hold a slot for good;
/// evictions are derived by the agent (`inflight_added - inflight_removed - live`).
#[btf_map]
pub static INFLIGHT: LruHashMap<InflightKey, ReqState, INFLIGHT_CAPACITY> = LruHashMap::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// Per CPU: where the current jiffy began, as this CPU saw it
/// (`kml_ebpf_common::label::TickClock`): the insert's phase in its jiffy.
#[btf_map]
pub static TICK_CLOCKS: PerCpuArray<TickClock, 1> = PerCpuArray::new();

/// Per-device event counts (per CPU: no shared line is written).
#[btf_map]
pub static DEVICE_EVENTS: PerCpuArray<DeviceEvents, { MAX_DEVICES as usize }> = PerCpuArray::new();

/// Finished requests. Size is overridden by the agent at load.
#[btf_map]
pub static RECORDS: RingBuf<RequestRecord, { 4 << 20 }> = RingBuf::new();

/// Per CPU: the records on their way to the ring, written in one go
/// (`kml_ebpf_common::RecordBatch`).
#[btf_map]
pub static BATCHES: PerCpuArray<RecordBatch, 1> = PerCpuArray::new();

/// The model slots (written whole by the agent while idle) and the active one.
/// BTF-typed: `bpftool map dump name LINEAR_MODELS` prints every weight by name.
#[btf_map]
pub static LINEAR_MODELS: Array<LinearModel, { MODEL_SLOTS as usize }> = Array::new();

#[btf_map]
pub static TREE_MODELS: Array<TreeModel, { MODEL_SLOTS as usize }> = Array::new();

#[btf_map]
pub static MODEL_CONTROL: Array<ModelControl, 1> = Array::new();

/// What `kml_verify_slots` found in each slot.
#[btf_map]
pub static SLOT_STATUS: Array<SlotStatus, { STATUS_ENTRIES as usize }> = Array::new();

/// The inference stage of the attach mode (features and model), tail-called from
/// insert once the entry is stored: verified on its own, it keeps insert small.
#[btf_map]
pub static INFER: ProgramArray<{ stage::COUNT }> = ProgramArray::new();

/// What the insert program hands to the inference stage (per CPU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Handoff {
    /// Raw tracepoints: the entry's index in `REQS`.
    pub index: u32,
    pub _pad: u32,
    /// Classic tracepoints: the entry's key in `INFLIGHT`.
    pub key: InflightKey,
    /// The inference stage's feature vector. Kept here, not on the stack: the
    /// verifier tracks lanes spilled to aligned stack slots as precise scalars,
    /// which kept it from pruning the paths out of the position walk (with a
    /// 23rd lane, where the vector happened to start on a slot, `kml_raw_infer`
    /// went past its 1M-instruction limit); a map value reads back unknown.
    pub x: FeatureVector,
}

#[btf_map]
pub static HANDOFF: PerCpuArray<Handoff, 1> = PerCpuArray::new();

/// This CPU's counters (one lookup per program run).
#[inline(always)]
pub fn counters() -> Option<*mut Counters> {
    COUNTERS.get_ptr_mut(0)
}

/// The phase of an insert at `now` in jiffy `jiffies` on this CPU
/// ([`TickClock::phase`]); `None` if the map cannot be read.
#[inline(always)]
pub fn tick_phase(jiffies: u64, now: u64) -> Option<u16> {
    let p = TICK_CLOCKS.get_ptr_mut(0)?;
    // Per-CPU slot, as for `count`.
    Some(unsafe { (*p).phase(jiffies, now) })
}

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = counters() {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *(*p).slot(c) += 1 };
    }
}

/// Bumps a per-device event count of `slot`.
#[inline(always)]
pub fn device_event(slot: u32, f: impl FnOnce(&mut DeviceEvents)) {
    if let Some(p) = DEVICE_EVENTS.get_ptr_mut(slot) {
        // Per-CPU slot, as for `count`.
        f(unsafe { &mut *p });
    }
}

/// Atomic add to a u32 in a map value, old value not needed (`lock add`): the
/// removes' side of a device count (issue, completion, and the rare merge, stale
/// entry and requeue), which runs on any CPU.
#[inline(always)]
pub fn add32(p: *mut u32, v: u32) {
    if layout!(ablate) & kml_ebpf_common::layout::ablate::PROBE_NO_COUNTS != 0 {
        return;
    }
    // SAFETY: `p` points into a map value that outlives the program run, 4-aligned.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(p, v) };
}

/// A u32 of a map value another CPU may write (one plain load).
#[inline(always)]
pub fn load32(p: *const u32) -> u32 {
    // SAFETY: as for `add32`.
    unsafe { core::ptr::read_volatile(p) }
}

/// Classic tracepoints: where a new entry is built before it goes into `INFLIGHT`
/// (keeps it off the 512-byte stack): [`TP_SCRATCH_INSERT`] for insert,
/// [`TP_SCRATCH_FLUSH`] for a flush's issue (a program may be interrupted by
/// another one on its CPU: each has its own).
#[btf_map]
pub static TP_SCRATCH: PerCpuArray<ReqState, 2> = PerCpuArray::new();
pub const TP_SCRATCH_INSERT: u32 = 0;
pub const TP_SCRATCH_FLUSH: u32 = 1;

/// The issue program's window of `struct request` when it reaches `fifo_time`
/// (`RQ_WIDE_WINDOW` bytes: too many for the stack).
#[btf_map]
pub static ISSUE_WINDOW: PerCpuArray<[u8; kml_ebpf_common::layout::RQ_WIDE_WINDOW], 1> =
    PerCpuArray::new();

/// The position state of each traced device, reads then writes
/// (`kml_ebpf_common::position::QueueShape`, 2 × 140,416 bytes a device: 4.5 MB
/// for all 16).
#[btf_map]
pub static SHAPES: Array<
    [kml_ebpf_common::position::QueueShape; 2],
    { MAX_DEVICES as usize },
    ALIGNED,
> = Array::new();
