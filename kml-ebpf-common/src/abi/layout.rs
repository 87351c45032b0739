//! Kernel layout facts the programs need, discovered by the agent at load time
//! (BTF for `struct request`, tracefs format files for the classic tracepoints) and
//! handed in as one read-only global. Nothing here is hard-coded for a kernel.

pub const IOPRIO_NONE: u32 = 0;
pub const IOPRIO_IN_REQUEST: u32 = 1;
pub const IOPRIO_IN_BIO: u32 = 2;

/// Bytes of `struct request` the raw tracepoint programs read in one probe read per
/// event, from [`RawTpLayout::rq_window`]: every field they need at insert, issue and
/// completion but `fifo_time` lies inside (the agent checks it). One cache line:
/// the hot fields span bytes 0..64 from 5.10 to 6.18 (a request starts on a line),
/// and the next line holds `queuelist`, which the scheduler writes; reading it
/// cost a miss the programs did not need (issue 14, BREAKDOWN.md).
pub const RQ_WINDOW: usize = 64;

/// The window read at issue when `fifo_time` lies within this many bytes of
/// [`RawTpLayout::rq_window`] (one probe read instead of two).
pub const RQ_WIDE_WINDOW: usize = 256;

/// Bits of [`KernelLayout::ablate`] (the agent sets them from `KML_ABLATE`, a
/// measurement knob; see docs of issue 14 in the notes).
pub mod ablate {
    /// Per record: `bpf_ringbuf_query`, and a forced wake-up whenever the ring holds
    /// `wakeup_bytes` or more (the observer before issue 14).
    pub const WAKE_BY_QUERY: u32 = 1;
    /// No request-queue cache: queue → disk → major/minor and a hash lookup per event.
    pub const NO_QCACHE: u32 = 2;
    /// One probe read per field of `struct request` instead of one for the window.
    pub const READ_PER_FIELD: u32 = 4;
    /// At issue, the small window and `fifo_time` in two reads, not one wide read.
    pub const TWO_READS_AT_ISSUE: u32 = 8;
    /// Cost probes, not earlier ways (they change what is recorded): no ioprio read
    /// at insert (ioprio 0), and no ring buffer write at completion (the record is
    /// counted as sampled out).
    pub const PROBE_NO_IOPRIO: u32 = 16;
    pub const PROBE_NO_RING: u32 = 32;
    /// The floor: every raw tracepoint program returns at once (nothing recorded),
    /// so bpf_stats shows what an attached program costs before it does anything.
    pub const PROBE_NULL: u32 = 64;
    /// Cost probe: no position state (no `QueueShape` update, position unknown).
    pub const PROBE_NO_POSITION: u32 = 128;
    /// Cost probe: ring records of 64 bytes (the first 64 of the record; the agent
    /// cannot decode them): what the record's size costs at completion.
    pub const PROBE_RECORD_64: u32 = 256;
    /// Each record into the ring alone, not staged in its CPU's batch
    /// (`record::RecordBatch`): the observer before batching.
    pub const NO_BATCH: u32 = 512;
    /// Cost probe: no per-device load state (the insert and issue lines of
    /// `DeviceSlot`: last insert, issue gap, wait averages, miss shares): those
    /// features read 0.
    pub const PROBE_NO_LOAD_STATE: u32 = 1024;
    /// Cost probe: insert, issue and complete return once the request's entry is
    /// found (window read, device and entry lookups only).
    pub const PROBE_STOP_AT_ENTRY: u32 = 2048;
    /// Cost probe: insert, issue and complete return after the window read.
    pub const PROBE_STOP_AT_READ: u32 = 4096;
    /// Cost probe: the device's in-flight and queued counts neither read nor
    /// written (the features read 0).
    pub const PROBE_NO_COUNTS: u32 = 8192;
    /// Cost probe: insert writes only the entry's first line (owner, phase, the
    /// record's first fields): what writing the whole record costs.
    pub const PROBE_NO_ENTRY_WRITE: u32 = 16384;
    /// Cost probe: the lifecycle's clock is jiffies scaled to ns, not
    /// `bpf_ktime_get_ns`: what the clock reads cost.
    pub const PROBE_NO_CLOCK: u32 = 32768;
}

/// Offsets and values for raw tracepoints, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawTpLayout {
    /// Where the [`RQ_WINDOW`] bytes read per event start in `struct request`; the
    /// offsets below are from the start of the struct.
    pub rq_window: u32,
    /// Byte offsets in `struct request`.
    pub rq_q: u32,
    /// `rq->mq_hctx` and `hctx->queue_num`: read only for a device with several
    /// hardware queues.
    pub rq_mq_hctx: u32,
    pub hctx_queue_num: u32,
    pub rq_rq_flags: u32,
    /// `rq->internal_tag`: the scheduler tag, the request's index in `REQS`.
    pub rq_internal_tag: u32,
    /// `RQF_FLUSH_SEQ` (`rq_flags` bit of a request in the flush machinery).
    pub rqf_flush_seq: u32,
    /// `bio->bi_bdev` and `block_device->bd_queue`: a merged bio's disk.
    pub bio_bdev: u32,
    pub bdev_queue: u32,
    pub rq_sector: u32,
    pub rq_data_len: u32,
    pub rq_cmd_flags: u32,
    /// `rq->fifo_time`: mq-deadline's deadline in jiffies (read at issue).
    pub rq_fifo_time: u32,
    /// 1 when `fifo_time` lies inside the [`RQ_WIDE_WINDOW`] read at issue.
    pub fifo_in_wide_window: u32,
    /// Where the I/O priority is: [`IOPRIO_NONE`], [`IOPRIO_IN_REQUEST`]
    /// (`rq->ioprio`, kernels up to 6.x) or [`IOPRIO_IN_BIO`] (`rq->bio->bi_ioprio`).
    pub ioprio_source: u32,
    pub rq_ioprio: u32,
    pub rq_bio: u32,
    pub bio_ioprio: u32,
    /// Byte offset of `disk` in `struct request_queue`.
    pub q_disk: u32,
    /// Byte offsets of `major` and `first_minor` in `struct gendisk`.
    pub disk_major: u32,
    pub disk_first_minor: u32,
    /// `cmd_flags & op_mask` is the `enum req_op` value.
    pub op_mask: u32,
    /// `enum req_op` values.
    pub op_read: u32,
    pub op_write: u32,
    pub op_flush: u32,
    pub op_discard: u32,
    pub op_write_zeroes: u32,
    pub op_secure_erase: u32,
    /// `cmd_flags` bit masks from `enum req_flag_bits`.
    pub flag_sync: u32,
    pub flag_meta: u32,
    pub flag_fua: u32,
    pub flag_preflush: u32,
    pub flag_rahead: u32,
}

/// Field offsets of one classic block tracepoint's record (tracefs `format`).
/// [`EventFields::ABSENT`] marks a field the kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventFields {
    pub dev: u16,
    pub sector: u16,
    pub nr_sector: u16,
    pub rwbs: u16,
    pub ioprio: u16,
    pub error: u16,
}

impl EventFields {
    pub const ABSENT: u16 = u16::MAX;
    pub const NONE: EventFields = EventFields {
        dev: Self::ABSENT,
        sector: Self::ABSENT,
        nr_sector: Self::ABSENT,
        rwbs: Self::ABSENT,
        ioprio: Self::ABSENT,
        error: Self::ABSENT,
    };
}

impl Default for EventFields {
    fn default() -> Self {
        Self::NONE
    }
}

/// Offsets for the classic tracepoints `block:block_rq_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    pub insert: EventFields,
    pub issue: EventFields,
    pub complete: EventFields,
    pub requeue: EventFields,
    pub merge: EventFields,
    /// `block:block_bio_backmerge` / `frontmerge` (only `dev` is read).
    pub bio_backmerge: EventFields,
    pub bio_frontmerge: EventFields,
}

/// The one global the agent overrides at load (`KML_LAYOUT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// [`crate::abi::attach_mode`] value; 0 means "not configured": programs do nothing.
    pub mode: u32,
    /// Wake the agent when this many bytes wait in the ring buffer; below it records
    /// are written without a wake-up and the agent's poll timer collects them.
    pub wakeup_bytes: u32,
    /// Drop mode: once this many bytes wait in the ring, only records near the
    /// model's decision boundary are written (the rest counted as sampled out).
    /// 0: never sample (lossless mode).
    pub sample_fill_bytes: u32,
    /// A record whose per-CPU sequence number has these low bits all zero forces a
    /// wake-up of the agent (the others wake nobody; its poll timer collects them).
    /// 0 with `wakeup_bytes` 0: the ring's default (wake when the agent waits).
    pub wake_mask: u32,
    /// `REQS` holds `MAX_DEVICES << tag_bits` entries.
    pub tag_bits: u32,
    /// Measurement only ([`ablate`]): bits that put back an earlier way of doing one
    /// thing, to measure what each change of the hot path is worth in one build.
    /// 0 in production (the verifier removes the branches it never takes).
    pub ablate: u32,
    /// 1: keep the position state and record every request's position
    /// ([`crate::position`]) whether or not a model is active. 0 (the default):
    /// only while a model is active, the only time a verdict needs it; the
    /// observer alone then pays nothing for it (the host replays positions for
    /// training, `kml_learn::replay`).
    pub position_always: u32,
    /// 1: read each request's I/O priority at insert (raw tracepoints: a second
    /// probe read, through `rq->bio`, about 50 ns). `record` asks for it (a trace
    /// column); `run` does not, since nothing it does reads it (no feature does):
    /// its raw tracepoint records carry ioprio 0 (classic tracepoints read the
    /// event's own field, at no cost, either way).
    pub read_ioprio: u32,
    pub raw: RawTpLayout,
    pub tp: TracepointLayout,
}

impl KernelLayout {
    pub const fn zeroed() -> Self {
        KernelLayout {
            mode: 0,
            wakeup_bytes: 0,
            sample_fill_bytes: 0,
            wake_mask: 0,
            tag_bits: 0,
            ablate: 0,
            position_always: 0,
            read_ioprio: 0,
            raw: RawTpLayout {
                rq_window: 0,
                rq_q: 0,
                rq_mq_hctx: 0,
                hctx_queue_num: 0,
                rq_rq_flags: 0,
                rq_internal_tag: 0,
                rqf_flush_seq: 0,
                bio_bdev: 0,
                bdev_queue: 0,
                rq_sector: 0,
                rq_data_len: 0,
                rq_cmd_flags: 0,
                rq_fifo_time: 0,
                fifo_in_wide_window: 0,
                ioprio_source: IOPRIO_NONE,
                rq_ioprio: 0,
                rq_bio: 0,
                bio_ioprio: 0,
                q_disk: 0,
                disk_major: 0,
                disk_first_minor: 0,
                op_mask: 0,
                op_read: 0,
                op_write: 0,
                op_flush: 0,
                op_discard: 0,
                op_write_zeroes: 0,
                op_secure_erase: 0,
                flag_sync: 0,
                flag_meta: 0,
                flag_fua: 0,
                flag_preflush: 0,
                flag_rahead: 0,
            },
            tp: TracepointLayout {
                insert: EventFields::NONE,
                issue: EventFields::NONE,
                complete: EventFields::NONE,
                requeue: EventFields::NONE,
                merge: EventFields::NONE,
                bio_backmerge: EventFields::NONE,
                bio_frontmerge: EventFields::NONE,
            },
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only; EventFields is 6 × u16 so TracepointLayout packs
// without padding, and KernelLayout's u32 fields keep it 4-byte aligned.
unsafe impl aya::Pod for KernelLayout {}
