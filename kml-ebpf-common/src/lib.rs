//! Types shared by the kml eBPF programs and the host agent.
//!
//! [`abi`] is the kernel–host contract (names, records, counters, slots, layout,
//! operations, the hook's policy). Beside it, the computations both sides run:
//! [`features`] (the feature vector at insert), [`model`] (fixed-point models) and
//! [`inference`] (the integer inference); and, on the host only, [`trace`] (the
//! CSV trace format).
//!
//! Everything compiled for the kernel is `#[repr(C)]`, `Copy`, free of padding
//! surprises and free of floating point, because the same definitions are compiled
//! for `bpfel-unknown-none` (the kernel side) and for the host. The `user` feature
//! adds the host-only trait impls (`aya::Pod`) and the trace format.
#![no_std]
// The kernel side's 32-bit atomic add (position.rs): the BPF target has no AtomicU32.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
// The opaque one-instruction selects of `branchless` (inline BPF assembly).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(feature = "clap")]
extern crate std;

pub mod abi;
pub mod bench_refs;
pub mod branchless;
pub mod features;
pub mod inference;
pub mod label;
pub mod logscale;
pub mod model;
pub mod position;
#[cfg(feature = "user")]
pub mod trace;

// The contract's modules at their earlier paths.
pub use abi::{
    attach_mode, counters, device, kernel_dev, kernel_dev_split, layout, op, record, slot,
};

pub use counters::{Counter, Counters, DeviceEvents};
pub use layout::{KernelLayout, RawTpLayout, TracepointLayout};
pub use op::{Direction, ReqFlags, ReqOp};
pub use record::{
    DeviceConfig, DeviceState, InflightKey, RecordBatch, RequestRecord, Sampling, Verdict,
    BATCH_RECORDS,
};
