//! Privileges and kernel features, probed: what `doctor` prints and what the
//! observer's attach mode is chosen from.

use std::path::Path;

use aya::programs::ProgramType;

use kml_ebpf_common::abi::hook::FUNCTION as HOOK_FUNCTION;

use super::attach::{AttachMode, AttachPlan, AttachRequest};
use super::{btf::Btf, layout, mounts, tracefs::Tracefs};

/// Linux capability numbers kml needs.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Names of the capabilities missing from this process's effective set.
pub fn missing_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect()
}

/// Fails with one clear line when the process cannot load BPF programs.
pub fn require_privileges() -> anyhow::Result<()> {
    let missing = missing_capabilities();
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "not privileged enough: missing {} (run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)",
            missing.join(", ")
        )
    }
}

/// Present when the kernel has kprobes (CONFIG_KPROBES).
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// Why kml's mq-deadline hook cannot be used here, for `doctor` and error messages;
/// `None` when it can: the kernel's BTF has `FUNC dd_kml_verdict` (only the patched
/// mq-deadline defines it) and the kprobe PMU exists (CONFIG_KPROBES).
pub fn hook_unavailable_reason(btf: &Btf) -> Option<String> {
    if !btf.has_func(HOOK_FUNCTION) {
        return Some(format!(
            "no function {HOOK_FUNCTION} in the kernel's BTF: not a kernel with kml's mq-deadline patch \
             (kernel/0001-mq-deadline-kml-hook.patch; `cargo xtask vm` builds and boots one)"
        ));
    }
    if !Path::new(KPROBE_PMU).exists() {
        return Some(format!(
            "no kprobe PMU ({KPROBE_PMU}): kernel built without CONFIG_KPROBES"
        ));
    }
    None
}

/// Whether the kernel measures BPF program run times (`kernel.bpf_stats_enabled`).
pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Everything `doctor` reports about the kernel.
pub struct KernelReport {
    pub release: String,
    pub checks: Vec<Check>,
    pub raw_tracepoint_ready: Result<(), String>,
    pub tracepoint_ready: Result<(), String>,
    pub kprobe_ready: Result<(), String>,
    pub fentry_ready: Result<(), String>,
    /// kml's mq-deadline hook (kernel/0001-mq-deadline-kml-hook.patch) can be used.
    pub hook_ready: Result<(), String>,
    /// `struct request` and friends, read from BTF by the probe: the loaders take
    /// it from here instead of parsing the 5.5 MB BTF again.
    pub raw_layout: Result<kml_ebpf_common::RawTpLayout, String>,
    /// mq-deadline's layout for the verdict program, from the same parse.
    pub sched_layout: Result<layout::SchedLayout, String>,
}

/// An error and its causes on one line ("a: b: c").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn program_type(t: ProgramType) -> Result<(), String> {
    match aya::sys::is_program_supported(t) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the kernel refuses to load this program type".into()),
        Err(e) => Err(format!("the kernel refuses it ({})", error_chain(&e))),
    }
}

/// CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN in the effective set.
fn privileges_check(missing: &[&str]) -> Check {
    Check {
        name: "privileges",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            "CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN effective".into()
        } else {
            format!("missing {}: run as root", missing.join(", "))
        },
    }
}

/// The kernel's BTF and the `struct request` layout read from it.
fn btf_check(
    btf: &Result<(), super::btf::BtfError>,
    raw_layout: &Result<kml_ebpf_common::RawTpLayout, String>,
) -> Check {
    Check {
        name: "BTF",
        ok: btf.is_ok(),
        detail: match (&btf, &raw_layout) {
            (Ok(_), Ok(l)) => format!(
                "{} (struct request: __sector@{}, __data_len@{}, cmd_flags@{}; ioprio {})",
                Btf::VMLINUX,
                l.rq_sector,
                l.rq_data_len,
                l.rq_cmd_flags,
                match l.ioprio_source {
                    kml_ebpf_common::layout::IOPRIO_IN_REQUEST =>
                        format!("rq->ioprio@{}", l.rq_ioprio),
                    kml_ebpf_common::layout::IOPRIO_IN_BIO =>
                        format!("rq->bio@{}->bi_ioprio@{}", l.rq_bio, l.bio_ioprio),
                    _ => "not found".into(),
                }
            ),
            (Ok(_), Err(e)) => format!("{} parsed, but: {e}", Btf::VMLINUX),
            (Err(e), _) => {
                format!("{e}: raw tracepoints unavailable, tracepoint mode is the fallback")
            }
        },
    }
}

/// Where tracefs is (mounted by kml if it was not).
fn tracefs_check(tracefs: &Result<Tracefs, super::tracefs::TracefsError>) -> Check {
    Check {
        name: "tracefs",
        ok: tracefs.is_ok(),
        detail: match &tracefs {
            Ok(t) => format!(
                "{}{}",
                t.root().display(),
                if t.mounted_by_us {
                    " (mounted by kml)"
                } else {
                    ""
                }
            ),
            Err(e) => e.to_string(),
        },
    }
}

/// Classic tracepoint programs load and the block events' formats are read.
fn tracepoints_check(
    tp_type: &Result<(), String>,
    tp_layout: &Result<kml_ebpf_common::TracepointLayout, String>,
) -> Check {
    Check {
        name: "tracepoints",
        ok: tp_type.is_ok() && tp_layout.is_ok(),
        detail: match (&tp_type, &tp_layout) {
            (Ok(()), Ok(_)) => {
                "program type loads; block_rq_{insert,issue,complete,requeue,merge} formats read"
                    .into()
            }
            (Err(e), _) => e.clone(),
            (_, Err(e)) => e.clone(),
        },
    }
}

/// Raw tracepoint programs load.
fn raw_tracepoints_check(raw_type: &Result<(), String>) -> Check {
    Check {
        name: "raw tracepoints",
        ok: raw_type.is_ok(),
        detail: match &raw_type {
            Ok(()) => "program type loads".into(),
            Err(e) => e.clone(),
        },
    }
}

/// Where the label comes from: the scheduler's own deadline (see
/// `kml_ebpf_common::label`).
fn label_check(raw_layout: &Result<kml_ebpf_common::RawTpLayout, String>) -> Check {
    let tick = super::clock::tick_rate();
    Check {
        name: "deadline label",
        ok: raw_layout.is_ok() || tick.is_ok(),
        detail: format!(
            "raw tracepoints: {}; classic tracepoints: {}",
            match &raw_layout {
                Ok(l) => format!("rq->fifo_time@{} read at issue", l.rq_fifo_time),
                Err(_) => "unavailable".into(),
            },
            match &tick {
                Ok(t) => format!(
                    "insert jiffies + expiry in jiffies (HZ {}, {}): misses a merge's or head insert's earlier deadline",
                    t.hz, t.source
                ),
                Err(e) => format!("HZ unknown ({e}): the ns estimate insert + expiry"),
            }
        ),
    }
}

/// The kprobe PMU (CONFIG_KPROBES).
fn kprobes_check(kprobe_pmu: bool) -> Check {
    Check {
        name: "kprobes",
        ok: kprobe_pmu,
        detail: if kprobe_pmu {
            "kprobe PMU present".into()
        } else {
            "no kprobe PMU (/sys/bus/event_source/devices/kprobe): kernel built without CONFIG_KPROBES".into()
        },
    }
}

/// `tracing` programs (fentry/fexit) load.
fn fentry_check(fentry: &Result<(), String>) -> Check {
    Check {
        name: "fentry/fexit",
        ok: fentry.is_ok(),
        detail: match &fentry {
            Ok(()) => "`tracing` program type loads (BPF trampolines)".into(),
            Err(e) => {
                format!("`tracing` program type: {e}; the tracepoint modes do not need it")
            }
        },
    }
}

/// kml's mq-deadline hook can be used.
fn hook_check(hook_ready: &Result<(), String>) -> Check {
    Check {
        name: "mq-deadline hook",
        ok: hook_ready.is_ok(),
        detail: match &hook_ready {
            Ok(()) => format!(
                "{} in BTF, kprobe PMU present: verdicts can act (`run --act`)",
                HOOK_FUNCTION
            ),
            Err(why) => format!("{why}; verdicts are counted, not acted on"),
        },
    }
}

/// bpffs at its usual place.
fn bpffs_check() -> Check {
    let bpffs = mounts::bpffs_mounted();
    Check {
        name: "bpffs",
        ok: bpffs,
        detail: if bpffs {
            format!("mounted at {}", mounts::BPFFS)
        } else {
            format!(
                "not mounted at {} (kml mounts it when it pins)",
                mounts::BPFFS
            )
        },
    }
}

/// The lockdown mode lets BPF read kernel memory.
fn lockdown_check() -> Check {
    let lockdown = mounts::lockdown_mode();
    Check {
        name: "lockdown",
        ok: lockdown.as_deref() != Some("confidentiality"),
        detail: match lockdown.as_deref() {
            Some("confidentiality") => "confidentiality: kernel reads by BPF are refused".into(),
            Some(m) => format!("{m} (BPF tracing allowed)"),
            None => "no lockdown LSM".into(),
        },
    }
}

/// Ring buffer maps.
fn ring_buffer_check() -> Check {
    let ringbuf = aya::sys::is_map_supported(aya::maps::MapType::RingBuf);
    Check {
        name: "ring buffer",
        ok: matches!(ringbuf, Ok(true)),
        detail: match ringbuf {
            Ok(true) => "BPF_MAP_TYPE_RINGBUF supported".into(),
            Ok(false) => "BPF_MAP_TYPE_RINGBUF not supported (kernel < 5.8)".into(),
            Err(e) => format!("probe failed: {e}"),
        },
    }
}

impl KernelReport {
    /// Probes everything. Cheap (well under a second) and side-effect free apart
    /// from mounting tracefs/securityfs when they are missing.
    pub fn probe() -> KernelReport {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let missing = missing_capabilities();
        // Every fact from BTF first, then the parse goes: aya parses its own copy
        // for the `tracing` program type probe below, and the two must not add up
        // in the agent's peak memory.
        let btf = Btf::from_sys_fs();
        let raw_layout = match &btf {
            Ok(btf) => layout::raw_tp_layout(btf).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let hook_ready = match &btf {
            Ok(btf) => match hook_unavailable_reason(btf) {
                None => Ok(()),
                Some(why) => Err(why),
            },
            Err(e) => Err(format!("no kernel BTF ({e}): the hook cannot be found")),
        };
        let sched_layout = match &btf {
            Ok(btf) => layout::sched_layout(btf).map_err(|e| format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        };
        let btf = btf.map(drop);
        crate::runtime::release_free_memory();
        let tracefs = Tracefs::locate_or_mount();
        let tp_layout = match &tracefs {
            Ok(t) => layout::tracepoint_layout(t).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let tp_type = program_type(ProgramType::TracePoint);
        let raw_type = program_type(ProgramType::RawTracePoint);
        let kprobe_pmu = Path::new(KPROBE_PMU).exists();
        let fentry = program_type(ProgramType::Tracing);
        let checks = vec![
            privileges_check(&missing),
            btf_check(&btf, &raw_layout),
            tracefs_check(&tracefs),
            tracepoints_check(&tp_type, &tp_layout),
            raw_tracepoints_check(&raw_type),
            label_check(&raw_layout),
            kprobes_check(kprobe_pmu),
            fentry_check(&fentry),
            hook_check(&hook_ready),
            bpffs_check(),
            lockdown_check(),
            ring_buffer_check(),
        ];
        let ringbuf_ok = checks.last().is_some_and(|c| c.ok);
        let need = |r: Result<(), String>| -> Result<(), String> {
            r?;
            if !ringbuf_ok {
                return Err("no ring buffer maps".into());
            }
            if !missing.is_empty() {
                return Err(format!("missing {}", missing.join(", ")));
            }
            Ok(())
        };
        let raw_tracepoint_ready =
            need(raw_type.and(raw_layout.as_ref().map(|_| ()).map_err(String::clone)));
        let tracepoint_ready = need(tp_type.and(tp_layout.map(|_| ())));
        let detail = |name: &str| {
            checks
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.detail.clone())
                .unwrap_or_default()
        };
        let kprobe_ready = if kprobe_pmu {
            Ok(())
        } else {
            Err(detail("kprobes"))
        };
        let fentry_ready = fentry.clone().map_err(|_| detail("fentry/fexit"));
        KernelReport {
            release,
            checks,
            raw_tracepoint_ready,
            tracepoint_ready,
            kprobe_ready,
            fentry_ready,
            hook_ready,
            raw_layout,
            sched_layout,
        }
    }

    /// What `run` attaches for `request`: `auto` adds the hook whenever the kernel
    /// has it and the observers run on raw tracepoints (the model's verdict is found
    /// by the request's address); `hook` insists on it.
    pub fn plan(&self, request: AttachRequest) -> anyhow::Result<AttachPlan> {
        match request {
            AttachRequest::Hook => {
                if let Err(why) = &self.hook_ready {
                    anyhow::bail!("attach mode hook unavailable: {why}");
                }
                let observers = self
                    .choose(AttachRequest::RawTracepoint)
                    .map_err(|e| anyhow::anyhow!("attach mode hook needs raw tracepoints: {e}"))?;
                Ok(AttachPlan {
                    observers,
                    hook: true,
                })
            }
            AttachRequest::Auto => {
                let observers = self.choose(request)?;
                Ok(AttachPlan {
                    observers,
                    hook: observers == AttachMode::RawTracepoint && self.hook_ready.is_ok(),
                })
            }
            other => Ok(AttachPlan {
                observers: self.choose(other)?,
                hook: false,
            }),
        }
    }

    /// The mode `auto` picks, or why the requested one cannot work.
    pub fn choose(&self, request: AttachRequest) -> anyhow::Result<AttachMode> {
        match request {
            AttachRequest::Hook => self.plan(request).map(|p| p.observers),
            AttachRequest::RawTracepoint => self
                .raw_tracepoint_ready
                .clone()
                .map(|()| AttachMode::RawTracepoint)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "attach mode raw-tracepoint unavailable: {e}; try --attach tracepoint"
                    )
                }),
            AttachRequest::Tracepoint => self
                .tracepoint_ready
                .clone()
                .map(|()| AttachMode::Tracepoint)
                .map_err(|e| anyhow::anyhow!("attach mode tracepoint unavailable: {e}")),
            AttachRequest::Kprobe | AttachRequest::Fentry => {
                let (mode, ready) = match request {
                    AttachRequest::Kprobe => ("kprobe", &self.kprobe_ready),
                    _ => ("fentry", &self.fentry_ready),
                };
                let works = match (&self.raw_tracepoint_ready, &self.tracepoint_ready) {
                    (Ok(()), _) => "--attach raw-tracepoint works here",
                    (_, Ok(())) => "--attach tracepoint works here",
                    _ => "no attach mode works here",
                };
                match ready {
                    Err(why) => anyhow::bail!("attach mode {mode} unavailable: {why}; {works}"),
                    // The kernel has it, but kml's observers are tracepoint programs:
                    // say so rather than pretend.
                    Ok(()) => anyhow::bail!(
                        "attach mode {mode}: the kernel offers it, but kml observes through the block tracepoints \
                         ({mode} programs serve the mq-deadline hook only); {works}"
                    ),
                }
            }
            AttachRequest::Auto => match (&self.raw_tracepoint_ready, &self.tracepoint_ready) {
                (Ok(()), _) => Ok(AttachMode::RawTracepoint),
                (Err(_), Ok(())) => Ok(AttachMode::Tracepoint),
                (Err(raw), Err(tp)) => {
                    // Without the capabilities every probe fails with EPERM: lead with
                    // the cause an operator can fix.
                    let cause = self
                        .checks
                        .iter()
                        .find(|c| c.name == "privileges" && !c.ok)
                        .map(|c| format!(" ({})", c.detail))
                        .unwrap_or_default();
                    anyhow::bail!(
                        "block tracing is impossible here{cause}: raw tracepoints: {raw}; tracepoints: {tp}"
                    )
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(raw: bool, hook: bool) -> KernelReport {
        let ready = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err("missing".to_owned())
            }
        };
        KernelReport {
            release: "test".into(),
            checks: Vec::new(),
            raw_tracepoint_ready: ready(raw),
            tracepoint_ready: Ok(()),
            kprobe_ready: ready(hook),
            fentry_ready: Err("no".into()),
            hook_ready: ready(hook),
            raw_layout: Err("not probed".into()),
            sched_layout: Err("not probed".into()),
        }
    }

    #[test]
    fn auto_adds_the_hook_only_with_raw_tracepoints() {
        let p = report(true, true).plan(AttachRequest::Auto).unwrap();
        assert_eq!(
            p,
            AttachPlan {
                observers: AttachMode::RawTracepoint,
                hook: true
            }
        );
        assert!(p.to_string().starts_with("hook (raw-tracepoint observers"));
        assert!(!report(true, false).plan(AttachRequest::Auto).unwrap().hook);
        // Tracepoint fallback: keyed by sector, the hook could not find the verdict.
        let p = report(false, true).plan(AttachRequest::Auto).unwrap();
        assert_eq!(p.observers, AttachMode::Tracepoint);
        assert!(!p.hook);
        assert_eq!(p.to_string(), "tracepoint");
    }

    #[test]
    fn no_mode_at_all_leads_with_missing_privileges() {
        let mut r = report(false, false);
        r.tracepoint_ready = Err("EPERM".into());
        let e = r.choose(AttachRequest::Auto).unwrap_err().to_string();
        assert!(
            e.starts_with("block tracing is impossible here: raw"),
            "{e}"
        );
        r.checks.push(privileges_check(&["CAP_BPF"]));
        let e = r.choose(AttachRequest::Auto).unwrap_err().to_string();
        assert!(
            e.starts_with("block tracing is impossible here (missing CAP_BPF: run as root): raw"),
            "{e}"
        );
    }

    #[test]
    fn hook_request_says_what_is_missing() {
        let e = report(true, false)
            .plan(AttachRequest::Hook)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attach mode hook unavailable: missing"), "{e}");
        let e = report(false, true)
            .plan(AttachRequest::Hook)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs raw tracepoints"), "{e}");
        assert_eq!(
            report(true, true).choose(AttachRequest::Hook).unwrap(),
            AttachMode::RawTracepoint
        );
        // An explicit observer mode never adds the hook.
        assert!(
            !report(true, true)
                .plan(AttachRequest::RawTracepoint)
                .unwrap()
                .hook
        );
    }

    /// On a stock kernel (no patch) the hook is reported missing, never attached.
    #[test]
    fn stock_kernel_has_no_hook() {
        let btf = match Btf::from_sys_fs() {
            Ok(btf) => btf,
            Err(e) => return kml_testkit::skip(format_args!("no kernel BTF: {e}")),
        };
        if btf.has_func(HOOK_FUNCTION) {
            return kml_testkit::skip(format_args!(
                "this kernel has the patch ({HOOK_FUNCTION}): the stock-kernel check does not apply"
            ));
        }
        assert!(hook_unavailable_reason(&btf)
            .unwrap()
            .contains(HOOK_FUNCTION));
    }
}
