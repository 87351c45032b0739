//! The names by which the agent finds what the eBPF object defines: maps,
//! programs, load-time globals, and the tracepoints the programs attach to.
//!
//! The kernel side names these items with Rust identifiers (a map is a `static`, a
//! program a `fn`), so it cannot use these constants directly; the agent's unit
//! test `abi_names_match_the_object` reads the built object and checks that its maps
//! and programs are exactly the ones listed here.

/// Map names.
pub mod map {
    /// The traced disks by slot (`device::DeviceSlot`: settings, counts, averages).
    pub const DEVICES: &str = "DEVICES";
    /// dev_t → slot of the traced disks (`u32` → `u32`).
    pub const DEV_SLOTS: &str = "DEV_SLOTS";
    /// `struct request_queue *` → slot, filled by the programs (`device::QSlot`).
    pub const QCACHE: &str = "QCACHE";
    /// Run-time settings of the agent (`device::Control`).
    pub const CONTROL: &str = "CONTROL";
    /// Raw tracepoints: one entry per (device slot, scheduler tag) (`device::ReqState`).
    pub const REQS: &str = "REQS";
    /// Classic tracepoints: requests by (dev, sector) (`InflightKey` → `device::ReqState`).
    pub const INFLIGHT: &str = "INFLIGHT";
    /// The observers' per-CPU counters (`Counters`).
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-device per-CPU event counts (`DeviceEvents`).
    pub const DEVICE_EVENTS: &str = "DEVICE_EVENTS";
    /// The ring buffer of completed requests.
    pub const RECORDS: &str = "RECORDS";
    /// Per-CPU: records staged on their way to the ring (`record::RecordBatch`).
    pub const BATCHES: &str = "BATCHES";
    /// Model slots (see `slot`).
    pub const LINEAR_MODELS: &str = "LINEAR_MODELS";
    pub const TREE_MODELS: &str = "TREE_MODELS";
    pub const MODEL_CONTROL: &str = "MODEL_CONTROL";
    pub const SLOT_STATUS: &str = "SLOT_STATUS";
    /// The inference stage, tail-called from insert (index [`super::stage::INFER`]).
    pub const INFER: &str = "INFER";
    /// Per-CPU: which entry insert hands to the inference stage.
    pub const HANDOFF: &str = "HANDOFF";
    /// Per-CPU scratch of the classic tracepoints' insert (and of a flush's issue).
    pub const TP_SCRATCH: &str = "TP_SCRATCH";
    /// Per-CPU: the issue program's wide window of `struct request`.
    pub const ISSUE_WINDOW: &str = "ISSUE_WINDOW";
    /// Per-CPU: where this CPU saw the current jiffy begin (`label::TickClock`).
    pub const TICK_CLOCKS: &str = "TICK_CLOCKS";
    /// The position state per device slot (`[position::QueueShape; 2]`).
    pub const SHAPES: &str = "SHAPES";
    /// The verdict program's policy (`hook::Policy`) and counters (`hook::HookCounters`).
    pub const HOOK_POLICY: &str = "HOOK_POLICY";
    pub const HOOK_COUNTERS: &str = "HOOK_COUNTERS";

    /// The observers' maps: what `run --pin` pins, and a restarted agent adopts.
    pub const OBSERVER: &[&str] = &[
        MODEL_CONTROL,
        LINEAR_MODELS,
        TREE_MODELS,
        SLOT_STATUS,
        COUNTERS,
        DEVICE_EVENTS,
        DEVICES,
        DEV_SLOTS,
        QCACHE,
        CONTROL,
        REQS,
        INFLIGHT,
        RECORDS,
        BATCHES,
        INFER,
        HANDOFF,
        TP_SCRATCH,
        ISSUE_WINDOW,
        SHAPES,
        TICK_CLOCKS,
    ];
    /// The verdict program's maps (never pinned).
    pub const HOOK: &[&str] = &[HOOK_POLICY, HOOK_COUNTERS];
}

/// Program names.
pub mod program {
    /// The slot checker, run on demand through BPF_PROG_TEST_RUN.
    pub const VERIFY_SLOTS: &str = "kml_verify_slots";
    /// Writes this CPU's staged records to the ring, run on each CPU on demand
    /// (BPF_PROG_TEST_RUN with `BPF_F_TEST_RUN_ON_CPU`).
    pub const FLUSH_RECORDS: &str = "kml_flush_records";
    /// The verdict program: a kprobe on `hook::FUNCTION` with `bpf_override_return`.
    pub const HOOK_VERDICT: &str = "kml_hook_verdict";
    /// The fmod_ret verdict program the agent loads itself (not in the object).
    pub const HOOK_FMOD_RET: &str = "kml_hook_fmret";
}

/// Load-time globals (`.rodata`, set by the agent before loading).
pub mod global {
    /// The kernel's layout (`KernelLayout`).
    pub const LAYOUT: &str = "KML_LAYOUT";
    /// The verdict program's device filter and scheduler layout (`u32` each).
    pub const HOOK_DEV: &str = "KML_HOOK_DEV";
    pub const HOOK_Q_ELEVATOR: &str = "KML_HOOK_Q_ELEVATOR";
    pub const HOOK_EQ_DATA: &str = "KML_HOOK_EQ_DATA";
    pub const HOOK_DD_PER_PRIO: &str = "KML_HOOK_DD_PER_PRIO";
    pub const HOOK_PER_PRIO_SIZE: &str = "KML_HOOK_PER_PRIO_SIZE";
    pub const HOOK_PER_PRIO_COUNT: &str = "KML_HOOK_PER_PRIO_COUNT";
    pub const HOOK_WRITE_FIFO: &str = "KML_HOOK_WRITE_FIFO";
    pub const HOOK_DD_LAST_DIR: &str = "KML_HOOK_DD_LAST_DIR";
    pub const HOOK_DD_WRITE: &str = "KML_HOOK_DD_WRITE";
}

/// Indices of the inference stage in the `INFER` program array.
pub mod stage {
    /// Features and model at insert (`kml_*_infer`), tail-called by the insert
    /// program once the request's entry is stored.
    pub const INFER: u32 = 0;
    /// Entries of `INFER`.
    pub const COUNT: usize = 1;
}

/// One block tracepoint and the program that handles it in each attach mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The tracepoint (category `block`).
    pub tracepoint: &'static str,
    /// The raw tracepoint program.
    pub raw: &'static str,
    /// The classic tracepoint program.
    pub tp: &'static str,
    /// Arguments of the tracepoint's prototype the raw program reads (`args[n]`),
    /// which the agent checks against the kernel's BTF (`btf_trace_<tracepoint>`).
    pub raw_args: usize,
}

impl Event {
    /// The program that makes the decisions (features and model are its tail calls).
    pub const INSERT: Event = Event {
        tracepoint: "block_rq_insert",
        raw: "kml_raw_rq_insert",
        tp: "kml_tp_rq_insert",
        raw_args: 1,
    };
    pub const ISSUE: Event = Event {
        tracepoint: "block_rq_issue",
        raw: "kml_raw_rq_issue",
        tp: "kml_tp_rq_issue",
        raw_args: 1,
    };
    /// `(struct request *, blk_status_t error, unsigned int nr_bytes)`.
    pub const COMPLETE: Event = Event {
        tracepoint: "block_rq_complete",
        raw: "kml_raw_rq_complete",
        tp: "kml_tp_rq_complete",
        raw_args: 3,
    };
    pub const REQUEUE: Event = Event {
        tracepoint: "block_rq_requeue",
        raw: "kml_raw_rq_requeue",
        tp: "kml_tp_rq_requeue",
        raw_args: 1,
    };
    pub const MERGE: Event = Event {
        tracepoint: "block_rq_merge",
        raw: "kml_raw_rq_merge",
        tp: "kml_tp_rq_merge",
        raw_args: 1,
    };
    /// `(struct bio *)`: a bio joins the back of a request already formed.
    pub const BIO_BACKMERGE: Event = Event {
        tracepoint: "block_bio_backmerge",
        raw: "kml_raw_bio_backmerge",
        tp: "kml_tp_bio_backmerge",
        raw_args: 1,
    };
    /// `(struct bio *)`: a bio joins the front of a request already formed.
    pub const BIO_FRONTMERGE: Event = Event {
        tracepoint: "block_bio_frontmerge",
        raw: "kml_raw_bio_frontmerge",
        tp: "kml_tp_bio_frontmerge",
        raw_args: 1,
    };
}

/// The tracepoints kml observes, in the order the programs are loaded.
pub const EVENTS: [Event; 7] = [
    Event::INSERT,
    Event::ISSUE,
    Event::COMPLETE,
    Event::REQUEUE,
    Event::MERGE,
    Event::BIO_BACKMERGE,
    Event::BIO_FRONTMERGE,
];

/// The tail-called stages per attach mode, in [`stage`] order.
pub const RAW_STAGES: [&str; stage::COUNT] = ["kml_raw_infer"];
pub const TP_STAGES: [&str; stage::COUNT] = ["kml_tp_infer"];

/// Every program in the object.
pub fn all_programs() -> impl Iterator<Item = &'static str> {
    EVENTS
        .iter()
        .flat_map(|e| [e.raw, e.tp])
        .chain(RAW_STAGES)
        .chain(TP_STAGES)
        .chain([
            program::VERIFY_SLOTS,
            program::FLUSH_RECORDS,
            program::HOOK_VERDICT,
        ])
}

/// Every map in the object.
pub fn all_maps() -> impl Iterator<Item = &'static str> {
    map::OBSERVER.iter().chain(map::HOOK).copied()
}
