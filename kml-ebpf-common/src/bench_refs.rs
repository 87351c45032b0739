//! The reference observers of the overhead benchmark: kml-ebpf's second object
//! (`kml-refs`, built beside `kml` by the same toolchain) and the bench that loads it
//! (kml-bench) share these names and types. They are not part of kml: they are what
//! kml's observer is compared with, on the same three raw tracepoints.
//!
//! - **null**: insert, issue and complete programs that return at once (the floor:
//!   what attaching three raw tracepoints costs at all);
//! - **biolatency**: like BCC's `biolatency -Q`: a start time per request at insert
//!   (a hash map keyed by the `struct request *`), a log2 histogram of insert →
//!   complete at completion, no records (issue is attached and returns at once, as
//!   biolatency -Q does on a device with a scheduler);
//! - **biosnoop**: like BCC's `biosnoop -Q`: per request the insert time, the
//!   inserting task's pid and comm (insert), the issue time (issue), and at
//!   completion one 64-byte ring-buffer record (device, sector, bytes, flags, both
//!   delays, pid, comm) for a minimal reader that only counts them.

/// Where `struct request` and its disk keep what the references read, from BTF at
/// load time (never hard-coded): the global [`LAYOUT_GLOBAL`] of the object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefLayout {
    pub rq_sector: u32,
    pub rq_cmd_flags: u32,
    pub rq_q: u32,
    pub q_disk: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
}

impl RefLayout {
    pub const fn zeroed() -> Self {
        RefLayout {
            rq_sector: 0,
            rq_cmd_flags: 0,
            rq_q: 0,
            q_disk: 0,
            disk_major: 0,
            disk_first_minor: 0,
        }
    }
}

/// biosnoop's per-request state (insert → completion).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnoopStart {
    pub insert_ns: u64,
    pub issue_ns: u64,
    pub pid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}

/// biosnoop's record, one per completed request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnoopRecord {
    pub complete_ns: u64,
    /// Insert → issue.
    pub queued_ns: u64,
    /// Issue → complete (0 if the issue was not seen).
    pub service_ns: u64,
    pub sector: u64,
    pub nr_bytes: u32,
    pub dev: u32,
    pub pid: u32,
    pub cmd_flags: u32,
    pub comm: [u8; 16],
}

/// Buckets of biolatency's log2 histogram (µs).
pub const LAT_SLOTS: u32 = 64;
/// Per-request entries of the references' start maps (BCC's tools use 10240).
pub const START_ENTRIES: u32 = 10240;

/// The read-only global holding [`RefLayout`].
pub const LAYOUT_GLOBAL: &str = "REF_LAYOUT";
/// biolatency's histogram (`Array<u64, LAT_SLOTS>`).
pub const LAT_HIST: &str = "REF_LAT_HIST";
/// biosnoop's ring buffer of [`SnoopRecord`]s.
pub const SNOOP_EVENTS: &str = "REF_SNOOP_EVENTS";
/// Counters: index [`COUNT_SNOOP_DROPS`] (ring full), [`COUNT_START_MISSING`]
/// (a completion without a start entry, in either reference).
pub const COUNTS: &str = "REF_COUNTS";
pub const COUNT_SNOOP_DROPS: u32 = 0;
pub const COUNT_START_MISSING: u32 = 1;
pub const COUNT_SLOTS: u32 = 2;

/// The three reference observers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefKind {
    Null,
    Biolatency,
    Biosnoop,
}

/// The block tracepoints every reference attaches to, in event order.
pub const TRACEPOINTS: [&str; 3] = ["block_rq_insert", "block_rq_issue", "block_rq_complete"];

impl RefKind {
    pub const ALL: [RefKind; 3] = [RefKind::Null, RefKind::Biolatency, RefKind::Biosnoop];

    /// Program names for insert, issue and complete (function names in kml-refs;
    /// at most 15 characters, the kernel's limit for a program name).
    pub const fn programs(self) -> [&'static str; 3] {
        match self {
            RefKind::Null => ["ref_null_ins", "ref_null_iss", "ref_null_cpl"],
            RefKind::Biolatency => ["ref_lat_ins", "ref_lat_iss", "ref_lat_cpl"],
            RefKind::Biosnoop => ["ref_snoop_ins", "ref_snoop_iss", "ref_snoop_cpl"],
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            RefKind::Null => "null",
            RefKind::Biolatency => "biolatency",
            RefKind::Biosnoop => "biosnoop",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers without padding.
    unsafe impl aya::Pod for super::RefLayout {}
    unsafe impl aya::Pod for super::SnoopRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(core::mem::size_of::<SnoopRecord>(), 64);
        assert_eq!(core::mem::size_of::<SnoopStart>(), 40);
        assert_eq!(core::mem::size_of::<RefLayout>(), 24);
        for k in RefKind::ALL {
            for p in k.programs() {
                assert!(p.len() <= 15, "{p}: the kernel keeps 15 characters");
            }
        }
    }
}
