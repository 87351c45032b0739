//! The patched mq-deadline's verdict hook (kernel/0001-mq-deadline-kml-hook.patch):
//! `int dd_kml_verdict(struct request *rq)`, called once per request entering a
//! FIFO of mq-deadline; a positive return value makes the scheduler serve the
//! request early (capped per direction by the iosched attribute `kml_boost_max`;
//! applied boosts are counted in `kml_boosts`, refused ones in `kml_capped`).
//!
//! kml attaches `kml_hook_verdict` (a kprobe program in the same eBPF object as the
//! observers) at the function's entry; the program calls `bpf_override_return()`
//! with its verdict when the verdict is positive. This needs CONFIG_KPROBES and
//! CONFIG_BPF_KPROBE_OVERRIDE, and the function on the error-injection list (the
//! patch puts it there). The patch also registers the function for fmod_ret
//! ([`super::fmod_ret`]), but aya 0.14 has no fmod_ret program type, so kml's own
//! program uses the kprobe path.

use anyhow::Context as _;
use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::KProbe,
    Ebpf,
};
use kml_ebpf_common::abi::{
    hook::{self as abi_hook, HookCounters},
    names::{map, program},
};

pub use kml_ebpf_common::abi::hook::Policy;

use crate::{
    devices::BlockDevice,
    kernel::{btf::Btf, caps::hook_unavailable_reason},
    object::{self, HookGlobals},
};

/// The kernel function the patch adds.
pub const HOOK_FUNCTION: &str = abi_hook::FUNCTION;
/// The kprobe program in kml's eBPF object.
pub const HOOK_PROGRAM: &str = program::HOOK_VERDICT;
/// Loads and attaches the hook program in `ebpf` (loaded with [`HookGlobals`]),
/// after setting its policy. Detached when `ebpf` is dropped (or by [`set_policy`]
/// with [`Policy::Off`], which keeps it attached but neutral).
pub fn attach(ebpf: &mut Ebpf, policy: Policy) -> anyhow::Result<()> {
    set_policy(ebpf, policy)?;
    let p: &mut KProbe = object::program(ebpf, HOOK_PROGRAM)?;
    p.load()
        .with_context(|| format!("verifying {HOOK_PROGRAM} (kprobe with bpf_override_return)"))?;
    p.attach(HOOK_FUNCTION, 0).with_context(|| {
        format!(
            "attaching {HOOK_PROGRAM} to {HOOK_FUNCTION} (needs CONFIG_BPF_KPROBE_OVERRIDE and {HOOK_FUNCTION} on \
             the error-injection list)"
        )
    })?;
    Ok(())
}

/// Writes `HOOK_POLICY[0]`; takes effect for the next request.
pub fn set_policy(ebpf: &mut Ebpf, policy: Policy) -> anyhow::Result<()> {
    let mut arr: Array<&mut MapData, u32> = object::map_mut(ebpf, map::HOOK_POLICY)?;
    arr.set(0, policy as u32, 0)
        .context("writing HOOK_POLICY")?;
    Ok(())
}

/// Writes `HOOK_POLICY[HOOK_HOLD_OUT]`: the hook leaves one in `2^shift` of the
/// requests a model policy would serve early alone (0: none).
pub fn set_hold_out(ebpf: &mut Ebpf, shift: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        shift <= abi_hook::HOLD_OUT_MAX_SHIFT,
        "hold-out shift {shift} above {}",
        abi_hook::HOLD_OUT_MAX_SHIFT
    );
    let mut arr: Array<&mut MapData, u32> = object::map_mut(ebpf, map::HOOK_POLICY)?;
    arr.set(abi_hook::HOOK_HOLD_OUT, shift, 0)
        .context("writing HOOK_POLICY's hold-out")?;
    Ok(())
}

/// The program's counters, summed over CPUs.
pub fn counters(ebpf: &Ebpf) -> anyhow::Result<HookCounters> {
    let name = map::HOOK_COUNTERS;
    let map = ebpf
        .map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    let arr: PerCpuArray<&MapData, HookCounters> =
        PerCpuArray::try_from(map).with_context(|| format!("{name} is not a per-CPU array"))?;
    let mut sum = HookCounters::default();
    for cpu in arr
        .get(&0, 0)
        .with_context(|| format!("reading {name}"))?
        .iter()
    {
        sum.accumulate(cpu);
    }
    Ok(sum)
}

/// The hook on its own: kml's object loaded for the hook program only (the
/// observer programs stay unloaded). Dropping it detaches the program.
pub struct Hook {
    ebpf: Ebpf,
    policy: Policy,
}

impl Hook {
    pub fn attach(policy: Policy, device: Option<&BlockDevice>) -> anyhow::Result<Hook> {
        crate::kernel::caps::require_privileges()?;
        let btf =
            Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        if let Some(why) = hook_unavailable_reason(&btf) {
            anyhow::bail!("the mq-deadline hook is not available: {why}");
        }
        if policy.uses_model() {
            anyhow::bail!(
                "policy {policy} acts on the model's verdicts, which the observers compute: \
                 use `kml-agent run --model MODEL --act {policy}`"
            );
        }
        let globals = HookGlobals::from_btf(&btf, device)?;
        // Everything needed is read: the parse is not held through the load.
        drop(btf);
        let object = object::ebpf_object()?;
        let mut loader = object::loader();
        globals.apply(&mut loader, true);
        // The observers' ring buffer is not used here: keep it small.
        loader.map_max_entries(map::RECORDS, 64 << 10);
        let mut ebpf = loader
            .load(&object)
            .context("loading the kml eBPF object")?;
        attach(&mut ebpf, policy)?;
        Ok(Hook { ebpf, policy })
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn set_policy(&mut self, policy: Policy) -> anyhow::Result<()> {
        set_policy(&mut self.ebpf, policy)?;
        self.policy = policy;
        Ok(())
    }

    pub fn counters(&self) -> anyhow::Result<HookCounters> {
        counters(&self.ebpf)
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

/// The verdict program's counters in one line, for the end of a session.
pub fn counters_line(c: &HookCounters) -> String {
    format!(
            "{} calls, {} reads, {} positive verdicts, {} model at-risk verdicts ({} held out to learn from), \
             {} without a model verdict, {} read failures, {} other-disk calls",
            c.calls,
            c.reads,
            c.boosts,
            c.model_at_risk,
            c.held_out,
            c.no_verdict,
            c.read_failures,
            c.skipped_device
        )
}

/// The verdict program's counters as one JSON object, by name.
pub fn counters_json(c: &HookCounters) -> serde_json::Value {
    HookCounters::ALL
        .iter()
        .map(|k| (k.name().to_owned(), serde_json::json!(c.get(*k))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// What the kernel did for one disk while the hook was attached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BoostChange {
    pub disk: String,
    /// Requests served early.
    pub served_early: u64,
    /// Positive verdicts refused over the cap.
    pub refused: u64,
    pub boost_max: u64,
}

/// The kernel's boost counters of `disks` at one moment, to report what changed.
pub struct BoostSnapshot(Vec<(BlockDevice, KernelBoosts)>);

impl BoostSnapshot {
    pub fn take(disks: &[BlockDevice]) -> BoostSnapshot {
        BoostSnapshot(
            disks
                .iter()
                .map(|d| (d.clone(), kernel_boosts(d).unwrap_or_default()))
                .collect(),
        )
    }

    /// Per disk: what the kernel did since the snapshot.
    pub fn changes_since(&self) -> Vec<BoostChange> {
        self.0
            .iter()
            .map(|(d, before)| {
                let now = kernel_boosts(d).unwrap_or_default();
                BoostChange {
                    disk: d.name.clone(),
                    served_early: now.boosts.saturating_sub(before.boosts),
                    refused: now.capped.saturating_sub(before.capped),
                    boost_max: now.boost_max,
                }
            })
            .collect()
    }
}

impl BoostChange {
    /// One line for people.
    pub fn line(&self) -> String {
        format!(
            "{}: kernel served {} requests early, refused {} over the cap (kml_boost_max {})",
            self.disk, self.served_early, self.refused, self.boost_max
        )
    }
}

/// The kernel's side of a disk's hook: the iosched attributes the patch adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelBoosts {
    /// Requests served early.
    pub boosts: u64,
    /// Positive verdicts refused by the cap.
    pub capped: u64,
    pub boost_max: u64,
}

/// Reads `queue/iosched/kml_{boosts,capped,boost_max}` of `device`; `None` when the
/// disk does not run the patched mq-deadline.
pub fn kernel_boosts(device: &BlockDevice) -> Option<KernelBoosts> {
    let dir = device.sys_path().join("queue/iosched");
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(KernelBoosts {
        boosts: read(abi_hook::ATTR_BOOSTS)?,
        capped: read(abi_hook::ATTR_CAPPED)?,
        boost_max: read(abi_hook::ATTR_BOOST_MAX)?,
    })
}
