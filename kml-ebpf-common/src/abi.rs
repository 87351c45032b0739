//! The kernel–host contract: everything the eBPF programs and the agent must agree
//! on, defined once.
//!
//! - [`names`]: the maps, programs, globals and tracepoints by name;
//! - [`record`]: what the programs keep per request and hand to the agent;
//! - [`counters`]: the observers' loss and event counters, by name;
//! - [`slot`]: how a model reaches the inference program (two slots, a checker);
//! - [`layout`]: the kernel's layout, found by the agent and handed in at load;
//! - [`op`]: request operations and flags, as the programs decode them;
//! - [`hook`]: the act stage (the patched mq-deadline's verdict hook): its policy,
//!   its counters, the kernel's names.
//!
//! Everything here is `#[repr(C)]` and integer-only (the same definitions compile for
//! `bpfel-unknown-none` and the host); the `user` feature adds the host-side trait
//! impls (`aya::Pod`), the `clap` feature the command-line parsing of [`hook::Policy`].

pub mod counters;
pub mod device;
pub mod hook;
pub mod layout;
pub mod names;
pub mod op;
pub mod record;
pub mod slot;

/// Attach modes the observer programs support, handed to the programs in
/// [`layout::KernelLayout`].
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
