//! Types shared by the kml eBPF programs and the host agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of padding surprises and free of
//! floating point, because the same definitions are compiled for
//! `bpfel-unknown-none` (the kernel side) and for the host. The `user` feature
//! adds the host-only trait impls (`aya::Pod`).
#![no_std]

pub mod counters;
pub mod features;
pub mod inference;
pub mod layout;
pub mod model;
pub mod op;
pub mod record;
pub mod slot;
#[cfg(feature = "user")]
pub mod trace;

pub use counters::{Counter, Counters};
pub use layout::{KernelLayout, RawTpLayout, TracepointLayout};
pub use op::{Direction, ReqFlags, ReqOp};
pub use record::{DeviceConfig, DeviceState, InflightKey, RequestRecord, Verdict};

/// Attach modes the observer programs support, handed to the programs as a global.
pub mod attach_mode {
    /// Raw tracepoints: `struct request *` is the key, fields read through BTF offsets.
    pub const RAW_TRACEPOINT: u32 = 1;
    /// Classic tracepoints: fields at tracefs format offsets, keyed by (dev, sector).
    pub const TRACEPOINT: u32 = 2;
}

/// Linux `dev_t` as the block layer's tracepoints report it: `major << 20 | minor`
/// (`MINORBITS` is 20 in every kernel since 2.6).
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Inverse of [`kernel_dev`].
pub const fn kernel_dev_split(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xf_ffff)
}
