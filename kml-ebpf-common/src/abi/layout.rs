//! Kernel layout facts the programs need, discovered by the agent at load time
//! (BTF for `struct request`, tracefs format files for the classic tracepoints) and
//! handed in as one read-only global. Nothing here is hard-coded for a kernel.

pub const IOPRIO_NONE: u32 = 0;
pub const IOPRIO_IN_REQUEST: u32 = 1;
pub const IOPRIO_IN_BIO: u32 = 2;

/// Offsets and values for raw tracepoints, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawTpLayout {
    /// Byte offsets in `struct request`.
    pub rq_q: u32,
    pub rq_sector: u32,
    pub rq_data_len: u32,
    pub rq_cmd_flags: u32,
    /// `rq->fifo_time`: mq-deadline's deadline in jiffies (read at issue).
    pub rq_fifo_time: u32,
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
    pub raw: RawTpLayout,
    pub tp: TracepointLayout,
}

impl KernelLayout {
    pub const fn zeroed() -> Self {
        KernelLayout {
            mode: 0,
            wakeup_bytes: 0,
            sample_fill_bytes: 0,
            raw: RawTpLayout {
                rq_q: 0,
                rq_sector: 0,
                rq_data_len: 0,
                rq_cmd_flags: 0,
                rq_fifo_time: 0,
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
            },
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only; EventFields is 6 × u16 so TracepointLayout packs
// without padding, and KernelLayout's u32 fields keep it 4-byte aligned.
unsafe impl aya::Pod for KernelLayout {}
