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
//! patch puts it there). The patch also registers the function for fmod_ret, but
//! aya 0.14 has no fmod_ret program type, so kml uses the kprobe path.

use std::path::Path;

use anyhow::Context as _;
use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::KProbe,
    Ebpf, EbpfLoader,
};
use kml_ebpf_common::{
    abi::{
        hook::{self as abi_hook, HookCounters},
        names::{global, map, program},
    },
    KernelLayout,
};

pub use kml_ebpf_common::abi::hook::Policy;

use crate::{
    devices::BlockDevice,
    kernel::{btf::Btf, layout},
};

/// The kernel function the patch adds.
pub const HOOK_FUNCTION: &str = abi_hook::FUNCTION;
/// The kprobe program in kml's eBPF object.
pub const HOOK_PROGRAM: &str = program::HOOK_VERDICT;
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// Whether this kernel has the hook and kml can attach to it: the kernel's BTF
/// has `FUNC dd_kml_verdict` (only the patched mq-deadline defines it) and the
/// kprobe PMU exists (CONFIG_KPROBES).
pub fn hook_available(btf: &Btf) -> bool {
    btf.has_func(HOOK_FUNCTION) && Path::new(KPROBE_PMU).exists()
}

/// Why the hook is not available, for `doctor` and error messages; `None` when it is.
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

/// The scheduler layout `reads-under-writes` reads (from BTF), as the program's
/// `KML_HOOK_*` globals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookLayout {
    pub q_elevator: u32,
    pub eq_data: u32,
    pub dd_per_prio: u32,
    pub per_prio_size: u32,
    pub per_prio_count: u32,
    pub write_fifo: u32,
}

/// `struct request_queue.elevator` → `struct elevator_queue.elevator_data` →
/// `struct deadline_data.per_prio[]` → `struct dd_per_prio.fifo_list[DD_WRITE]`.
pub fn hook_layout(btf: &Btf) -> anyhow::Result<HookLayout> {
    let ptr = |ty: &str, member: &str| -> anyhow::Result<u32> {
        let m = btf
            .member(ty, member)
            .with_context(|| format!("struct {ty}.{member}"))?;
        anyhow::ensure!(
            m.size == 8,
            "struct {ty}.{member} is {} bytes; kml reads it as a pointer",
            m.size
        );
        Ok(m.offset)
    };
    let per_prio = btf
        .member("deadline_data", "per_prio")
        .context("struct deadline_data.per_prio")?;
    let per_prio_size = btf
        .struct_size("dd_per_prio")
        .context("struct dd_per_prio")?;
    anyhow::ensure!(
        per_prio_size > 0 && per_prio.size % per_prio_size == 0,
        "deadline_data.per_prio is not an array of dd_per_prio"
    );
    let fifo = btf
        .member("dd_per_prio", "fifo_list")
        .context("struct dd_per_prio.fifo_list")?;
    let list_head = btf.struct_size("list_head").context("struct list_head")?;
    anyhow::ensure!(list_head == 16, "struct list_head is {list_head} bytes");
    let dd_write = btf.enumerator("DD_WRITE").context("enum dd_data_dir")?;
    let dd_write = u32::try_from(dd_write)
        .ok()
        .filter(|d| (d + 1) * list_head <= fifo.size)
        .context("DD_WRITE out of range")?;
    Ok(HookLayout {
        q_elevator: ptr("request_queue", "elevator")?,
        eq_data: ptr("elevator_queue", "elevator_data")?,
        dd_per_prio: per_prio.offset,
        per_prio_size,
        per_prio_count: (per_prio.size / per_prio_size).min(4),
        write_fifo: fifo.offset + dd_write * list_head,
    })
}

/// What the hook program needs at load: the raw layout shared with the observers
/// (`KML_LAYOUT`, mode 0 so that no observer program acts if one were attached),
/// the scheduler layout and the device filter. Pass them to an [`EbpfLoader`] with
/// [`HookGlobals::apply`], so a loader that also sets up observers can host the hook.
#[derive(Clone, Debug)]
pub struct HookGlobals {
    pub layout: KernelLayout,
    pub sched: HookLayout,
    /// `kernel_dev()` of the only disk that gets verdicts; 0 for every disk.
    pub dev: u32,
}

impl HookGlobals {
    pub fn from_btf(btf: &Btf, device: Option<&BlockDevice>) -> anyhow::Result<HookGlobals> {
        let mut kl = KernelLayout::zeroed();
        kl.raw = layout::raw_tp_layout(btf)?;
        Ok(HookGlobals {
            layout: kl,
            sched: hook_layout(btf)?,
            dev: device.map_or(0, BlockDevice::dev),
        })
    }

    /// Sets the hook's globals on `loader`. `with_kml_layout` false leaves
    /// `KML_LAYOUT` to a caller that sets it itself (it must fill `raw`).
    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>, with_kml_layout: bool) {
        if with_kml_layout {
            loader.override_global(global::LAYOUT, &self.layout, true);
        }
        loader
            .override_global(global::HOOK_DEV, &self.dev, true)
            .override_global(global::HOOK_Q_ELEVATOR, &self.sched.q_elevator, true)
            .override_global(global::HOOK_EQ_DATA, &self.sched.eq_data, true)
            .override_global(global::HOOK_DD_PER_PRIO, &self.sched.dd_per_prio, true)
            .override_global(global::HOOK_PER_PRIO_SIZE, &self.sched.per_prio_size, true)
            .override_global(
                global::HOOK_PER_PRIO_COUNT,
                &self.sched.per_prio_count,
                true,
            )
            .override_global(global::HOOK_WRITE_FIFO, &self.sched.write_fifo, true);
    }
}

/// Loads and attaches the hook program in `ebpf` (loaded with [`HookGlobals`]),
/// after setting its policy. Detached when `ebpf` is dropped (or by [`set_policy`]
/// with [`Policy::Off`], which keeps it attached but neutral).
pub fn attach(ebpf: &mut Ebpf, policy: Policy) -> anyhow::Result<()> {
    set_policy(ebpf, policy)?;
    let p: &mut KProbe = ebpf
        .program_mut(HOOK_PROGRAM)
        .with_context(|| format!("program {HOOK_PROGRAM} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("{HOOK_PROGRAM} is not a kprobe program"))?;
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
    let name = map::HOOK_POLICY;
    let map = ebpf
        .map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    let mut arr: Array<&mut MapData, u32> =
        Array::try_from(map).with_context(|| format!("{name} is not an array"))?;
    arr.set(0, policy as u32, 0)
        .with_context(|| format!("writing {name}"))?;
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
        let object = crate::observe::ebpf_object()?;
        let mut loader = EbpfLoader::new();
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

// ---------------------------------------------------------------- fmod_ret

/// The fmod_ret path, for kernels and loaders that have it (aya 0.14 has no
/// fmod_ret program type, so this loads a tiny hand-assembled program through the
/// bpf syscall): a `tracing` program with `expected_attach_type` BPF_MODIFY_RETURN
/// on `dd_kml_verdict`, allowed because the patch registers the function in an
/// fmod_ret BTF id set (it is also on the error-injection list). Its non-zero
/// return value replaces the function's. It implements [`Policy::Reads`] (or
/// [`Policy::Off`]); the kprobe program is the one that carries the real policies.
/// Dropping it detaches it.
pub struct FmodRet {
    _link: std::os::fd::OwnedFd,
    _prog: std::os::fd::OwnedFd,
}

/// `struct bpf_insn`: opcode, dst | src << 4, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, dst | (src << 4), o[0], o[1], i[0], i[1], i[2], i[3]]
}

/// `ctx[0]` is the `struct request *` (a BTF pointer: fields load directly).
/// Returns 1 for reads under [`Policy::Reads`], else 0 (0 keeps the stock function).
pub fn fmod_ret_program(
    policy: Policy,
    cmd_flags_offset: u32,
    op_mask: u32,
    op_read: u32,
) -> anyhow::Result<Vec<[u8; 8]>> {
    const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const AND64_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
    const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    let off = i16::try_from(cmd_flags_offset)
        .map_err(|_| anyhow::anyhow!("cmd_flags offset {cmd_flags_offset} too large"))?;
    Ok(match policy {
        Policy::Off => vec![insn(MOV64_K, 0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)],
        Policy::Reads => vec![
            insn(LDX_DW, 1, 1, 0, 0),               // r1 = ctx[0] (rq)
            insn(LDX_W, 2, 1, off, 0),              // r2 = rq->cmd_flags
            insn(AND64_K, 2, 0, 0, op_mask as i32), // r2 &= REQ_OP_MASK
            insn(MOV64_K, 0, 0, 0, 0),              // r0 = 0
            insn(JNE_K, 2, 0, 1, op_read as i32),   // if r2 != REQ_OP_READ skip
            insn(MOV64_K, 0, 0, 0, 1),              // r0 = 1
            insn(EXIT, 0, 0, 0, 0),
        ],
        other => {
            anyhow::bail!("the fmod_ret program implements the policies off and reads; use the kprobe path for {other}")
        }
    })
}

impl FmodRet {
    pub fn attach(btf: &Btf, policy: Policy) -> anyhow::Result<FmodRet> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        crate::kernel::caps::require_privileges()?;
        if let Some(why) = hook_unavailable_reason(btf) {
            anyhow::bail!("the mq-deadline hook is not available: {why}");
        }
        let func = btf
            .func_id(HOOK_FUNCTION)
            .context("no BTF id for dd_kml_verdict")?;
        let raw = layout::raw_tp_layout(btf)?;
        let insns = fmod_ret_program(policy, raw.rq_cmd_flags, raw.op_mask, raw.op_read)?;

        #[repr(C)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
            prog_btf_fd: u32,
            func_info_rec_size: u32,
            func_info: u64,
            func_info_cnt: u32,
            line_info_rec_size: u32,
            line_info: u64,
            line_info_cnt: u32,
            attach_btf_id: u32,
            attach_btf_obj_fd: u32,
            rest: [u32; 11],
        }
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
        const BPF_PROG_TYPE_TRACING: u32 = 26;
        const BPF_MODIFY_RETURN: u32 = 26;
        let license = c"GPL";
        let mut log = vec![0u8; 1 << 16];
        let mut name = [0u8; 16];
        let prog_name = program::HOOK_FMOD_RET.as_bytes();
        name[..prog_name.len()].copy_from_slice(prog_name);
        let attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: BPF_MODIFY_RETURN,
            prog_btf_fd: 0,
            func_info_rec_size: 0,
            func_info: 0,
            func_info_cnt: 0,
            line_info_rec_size: 0,
            line_info: 0,
            line_info_cnt: 0,
            attach_btf_id: func,
            attach_btf_obj_fd: 0,
            rest: [0; 11],
        };
        // SAFETY: attr, insns, license and log outlive the call; the kernel reads
        // size_of::<ProgLoad>() bytes of attr (unknown trailing fields are zero).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &raw const attr,
                std::mem::size_of::<ProgLoad>(),
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)])
                    .trim()
                    .to_owned();
            anyhow::bail!(
                "loading the fmod_ret program on {HOOK_FUNCTION}: {err}; verifier: {text}"
            );
        }
        // SAFETY: a fresh fd returned by the kernel, owned from here on.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        #[repr(C)]
        struct RawTpOpen {
            name: u64,
            prog_fd: u32,
            pad: u32,
            cookie: u64,
        }
        use std::os::fd::AsRawFd as _;
        let open = RawTpOpen {
            name: 0,
            prog_fd: prog.as_raw_fd() as u32,
            pad: 0,
            cookie: 0,
        };
        // SAFETY: `open` outlives the call; for tracing programs the kernel attaches
        // at the program's attach_btf_id and returns a link fd.
        let link = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_RAW_TRACEPOINT_OPEN,
                &raw const open,
                std::mem::size_of::<RawTpOpen>(),
            )
        };
        if link < 0 {
            anyhow::bail!(
                "attaching the fmod_ret program to {HOOK_FUNCTION}: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: as above.
        let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
        Ok(FmodRet {
            _link: link,
            _prog: prog,
        })
    }
}

/// The verdict program's counters in one line, for the end of a session.
pub fn counters_line(c: &HookCounters) -> String {
    format!(
            "{} calls, {} reads, {} positive verdicts, {} model at-risk verdicts, {} without a model verdict, \
             {} read failures, {} other-disk calls",
            c.calls,
            c.reads,
            c.boosts,
            c.model_at_risk,
            c.no_verdict,
            c.read_failures,
            c.skipped_device
        )
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

    /// One line per disk: what the kernel did since the snapshot.
    pub fn lines_since(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(d, before)| {
                let now = kernel_boosts(d).unwrap_or_default();
                format!(
                    "{}: kernel served {} requests early, refused {} over the cap (kml_boost_max {})",
                    d.name,
                    now.boosts.saturating_sub(before.boosts),
                    now.capped.saturating_sub(before.capped),
                    now.boost_max
                )
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmod_ret_program_encoding() {
        let p = fmod_ret_program(Policy::Reads, 24, 0xff, 0).unwrap();
        assert_eq!(p.len(), 7);
        assert_eq!(p[0], [0x79, 0x11, 0, 0, 0, 0, 0, 0]);
        assert_eq!(p[1], [0x61, 0x12, 24, 0, 0, 0, 0, 0]);
        assert_eq!(p[2], [0x57, 0x02, 0, 0, 0xff, 0, 0, 0]);
        assert_eq!(p[4], [0x55, 0x02, 1, 0, 0, 0, 0, 0]);
        assert_eq!(p[6], [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(fmod_ret_program(Policy::Off, 24, 0xff, 0).unwrap().len(), 2);
        assert!(fmod_ret_program(Policy::ReadsUnderWrites, 24, 0xff, 0).is_err());
    }

    /// The scheduler layout from this machine's BTF (mq-deadline built in):
    /// per_prio[3] of dd_per_prio, fifo_list[DD_WRITE] after fifo_list[DD_READ].
    #[test]
    fn scheduler_layout_from_live_btf() {
        let Ok(btf) = Btf::from_sys_fs() else { return };
        if btf.struct_size("deadline_data").is_err() {
            return;
        }
        let l = hook_layout(&btf).unwrap();
        assert_eq!(l.per_prio_count, 3);
        assert_eq!(l.per_prio_size, btf.struct_size("dd_per_prio").unwrap());
        assert_eq!(
            l.write_fifo,
            btf.member("dd_per_prio", "fifo_list").unwrap().offset + 16
        );
        assert!(l.dd_per_prio > 0 && l.q_elevator > 0);
    }

    /// On a stock kernel (no patch) the hook is reported missing, never attached.
    #[test]
    fn stock_kernel_has_no_hook() {
        let Ok(btf) = Btf::from_sys_fs() else { return };
        if btf.has_func(HOOK_FUNCTION) {
            return;
        }
        assert!(!hook_available(&btf));
        assert!(hook_unavailable_reason(&btf)
            .unwrap()
            .contains(HOOK_FUNCTION));
    }
}
