//! How kml attaches: the observers' mode, what was asked for, and what `run`
//! attaches (the plan); chosen from what [`super::caps::KernelReport`] found.

use std::fmt;

/// How the observers reach the block layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Raw tracepoints with `struct request` offsets from BTF (exact request identity).
    RawTracepoint,
    /// Classic tracepoints with tracefs format offsets (no BTF needed; keyed by sector).
    Tracepoint,
}

impl AttachMode {
    pub const fn name(self) -> &'static str {
        match self {
            AttachMode::RawTracepoint => "raw-tracepoint",
            AttachMode::Tracepoint => "tracepoint",
        }
    }

    pub const fn abi(self) -> u32 {
        match self {
            AttachMode::RawTracepoint => kml_ebpf_common::attach_mode::RAW_TRACEPOINT,
            AttachMode::Tracepoint => kml_ebpf_common::attach_mode::TRACEPOINT,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What was asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachRequest {
    #[default]
    Auto,
    RawTracepoint,
    Tracepoint,
    /// kprobes on block-layer functions (kernels with CONFIG_KPROBES).
    Kprobe,
    /// fentry/fexit through BPF trampolines (kernels that allow `tracing` programs).
    Fentry,
    /// Raw tracepoints plus kml's verdict program on the patched mq-deadline's
    /// hook (`dd_kml_verdict`): verdicts can act (`run --act`).
    Hook,
}

/// What `run` attaches: the observers' mode and, on a kernel with kml's
/// mq-deadline patch, the verdict hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachPlan {
    pub observers: AttachMode,
    pub hook: bool,
}

impl fmt::Display for AttachPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hook {
            write!(
                f,
                "hook ({} observers + verdict program on dd_kml_verdict)",
                self.observers
            )
        } else {
            write!(f, "{}", self.observers)
        }
    }
}
