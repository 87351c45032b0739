//! kml-agent: loads kml's block-layer eBPF observers, consumes their ring buffer,
//! and (later stages) learns from the records.
//!
//! Modules follow the data flow: `kernel` (what the running kernel offers and how it
//! lays out its structures) → `devices` (which disks, with which mq-deadline
//! settings) → `observe` (load, configure, attach) → `record` (ring buffer → records)
//! → `stats` (what the records say) → `infer` (models into the kernel's slots) →
//! `tune` (act on a stock kernel through mq-deadline's tunables).

pub mod adopt;
pub mod cli;
pub mod devices;
pub mod hook;
pub mod hotplug;
pub mod infer;
pub mod kernel;
pub mod learn;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod observe;
pub mod owner;
pub mod pin;
pub mod record;
pub mod stats;
pub mod test_swaps;
pub mod tune;
