//! The fmod_ret path to kml's mq-deadline hook, for kernels and loaders that have
//! it: a `tracing` program with `expected_attach_type` BPF_MODIFY_RETURN on
//! `dd_kml_verdict`, allowed because the patch registers the function in an
//! fmod_ret BTF id set (it is also on the error-injection list).

use anyhow::Context as _;
use kml_ebpf_common::abi::names::program;

use super::hook::{Policy, HOOK_FUNCTION};
use crate::kernel::{btf::Btf, caps::hook_unavailable_reason, layout};

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
}
