//! Model slots: how a model gets from the agent to the inference program without
//! the program ever using a half-written one.
//!
//! Two slots per model type (`LINEAR_MODELS`, `TREE_MODELS`) and one
//! [`ModelControl`] naming the active (kind, slot). The agent writes the idle slot
//! whole, has the kernel check it (the `kml_verify_slots` program, run through
//! BPF_PROG_TEST_RUN, recomputes every slot's checksum into `SLOT_STATUS`), then
//! flips the control; it never rewrites a slot until a grace period after the slot
//! was deactivated, longer than any program run. The inference program uses a slot
//! only while the checker vouches for its (version, checksum); otherwise no verdict
//! (fail open), counted.

/// Slots per model type.
pub const MODEL_SLOTS: u32 = 2;

/// The active model: `kind` is a [`crate::model::ModelKind`] as u32, 0 for none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelControl {
    pub kind: u32,
    pub slot: u32,
    /// A verdict whose score is within this distance of its decision limit (score
    /// units) marks the request "near the boundary": under ring pressure those are
    /// the records kept (active learning). 0 keeps none preferentially.
    pub near_margin: i64,
    /// [`ModelControl::USES_POSITION`]: what the active model reads, so that the
    /// programs do only the work it needs.
    pub flags: u32,
    pub _pad: u32,
}

impl ModelControl {
    /// The active model reads a position feature: the inference stage keeps the
    /// position state and computes the request's place in the queue at insert
    /// (measured per insert in docs/learning.md, "Cost in the kernel"; a model
    /// without position features does not pay for them).
    pub const USES_POSITION: u32 = 1;
}

/// What the in-kernel checker found in one slot (`SLOT_STATUS`, index from
/// [`status_index`]). The inference program uses a slot only while its `version`
/// and `checksum` still read as they were when the checker vouched for them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStatus {
    pub version: u32,
    /// 1 when the checksum matched the slot's contents.
    pub ok: u32,
    pub checksum: u64,
}

impl SlotStatus {
    #[inline(always)]
    pub const fn vouches(&self, version: u32, checksum: u64) -> bool {
        self.ok == 1 && self.version == version && self.checksum == checksum
    }
}

/// Entries of `SLOT_STATUS`: linear slots first, then tree slots.
pub const STATUS_ENTRIES: u32 = 2 * MODEL_SLOTS;

#[inline(always)]
pub const fn status_index(tree: bool, slot: u32) -> u32 {
    if tree {
        MODEL_SLOTS + slot
    } else {
        slot
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), integers only, no padding (u32 pair, u64, u32 pair).
    unsafe impl aya::Pod for super::ModelControl {}
    unsafe impl aya::Pod for super::SlotStatus {}
}
