//! The act stage: what kml does with its verdicts.
//!
//! [`hook`]: the verdict program on kml's patched mq-deadline (`dd_kml_verdict`,
//! a kprobe with `bpf_override_return`); [`fmod_ret`]: the same hook through a
//! minimal fmod_ret program; [`tune`]: a stock kernel's mq-deadline tunables,
//! moved by the predictions.

pub mod fmod_ret;
pub mod hook;
pub mod tune;
