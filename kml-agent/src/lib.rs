//! kml-agent: loads kml's block-layer eBPF programs, consumes their records, learns
//! from them and acts on the verdicts.
//!
//! Modules follow the data flow, each importing only those before it:
//!
//! - [`kernel`]: what the running kernel offers and how it lays out its structures;
//! - [`devices`]: which disks, with which mq-deadline settings;
//! - [`object`]: kml's eBPF object, its load-time globals, its maps and programs;
//! - [`observe`]: load, configure, attach; the ring buffer; losses; pins;
//! - [`stats`] and [`record`]: what the records say; recording them to a trace;
//! - [`learn`]: online learning (a pure state machine) and model files;
//! - [`slots`]: models into the kernel's slots;
//! - [`act`]: the verdicts act (the patched mq-deadline's hook) or tune mq-deadline;
//! - [`metrics`] and [`status`]: the agent's state for Prometheus and as JSON;
//! - [`agent`]: the run loop (start / step / shutdown) that drives them all;
//! - [`cli`]: argument parsing and printing only.
//!
//! [`units`], [`runtime`], [`logging`], [`owner`] and [`sys`] (the bpf(2) calls aya
//! does not offer) are small helpers every stage may use; `testing` holds the test hooks (cargo feature `testing`).

pub mod act;
pub mod agent;
pub mod cli;
pub mod devices;
pub mod kernel;
pub mod learn;
pub mod logging;
pub mod metrics;
pub mod object;
pub mod observe;
pub mod owner;
pub mod record;
pub mod runtime;
pub mod slots;
pub mod stats;
pub mod status;
pub mod sys;
#[cfg(feature = "testing")]
pub mod testing;
pub mod units;
