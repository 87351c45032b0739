//! The fmod_ret path to kml's mq-deadline hook, for kernels that allow `tracing`
//! programs: a program with `expected_attach_type` BPF_MODIFY_RETURN on
//! `dd_kml_verdict`, allowed because the patch registers the function in an
//! fmod_ret BTF id set (it is also on the error-injection list). Its non-zero
//! return value replaces the function's. It implements [`Policy::Reads`] (and
//! [`Policy::Off`]); kml's own verdict program ([`super::hook`], a kprobe) is the
//! one that carries every policy.
//!
//! Why seven instructions are assembled here instead of being compiled into kml's
//! eBPF object and loaded by aya (checked against the pinned versions):
//! - aya 0.14 cannot load a BPF_MODIFY_RETURN program: its `tracing` program types
//!   are `BtfTracePoint`, `FEntry`, `FExit` and `Iter` (aya/src/programs/mod.rs:
//!   "`BPF_MODIFY_RETURN` (not supported yet in Aya)"), each loaded with its own
//!   fixed `expected_attach_type`;
//! - aya-obj 0.3 does not recognise an `fmod_ret/` section (its `ProgramSection`
//!   knows `fentry`, `fexit` and their sleepable forms), and aya-ebpf 0.2.1 has no
//!   `#[fmod_ret]` macro to emit one.
//!
//! So the program is built from aya-obj's kernel definitions (`bpf_insn`, the
//! opcode constants, `union bpf_attr`) and loaded and attached through
//! [`crate::sys`]. Once aya loads fmod_ret programs, this file becomes a program in
//! kml-ebpf and a `load(fn_name, &btf)` call.

use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::Context as _;
use aya_obj::generated::{
    bpf_attach_type, bpf_insn, bpf_prog_type, BPF_ALU64, BPF_AND, BPF_DW, BPF_EXIT, BPF_JMP,
    BPF_JNE, BPF_K, BPF_LDX, BPF_MEM, BPF_MOV, BPF_W,
};
use kml_ebpf_common::abi::names::program;

use super::hook::{Policy, HOOK_FUNCTION};
use crate::kernel::{btf::Btf, caps::hook_unavailable_reason, layout};

/// The attached program; dropping it detaches it.
pub struct FmodRet {
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// One instruction: `code` from the opcode constants, registers, offset, immediate.
fn insn(code: u32, dst: u8, src: u8, off: i16, imm: i32) -> bpf_insn {
    bpf_insn {
        code: code as u8,
        _bitfield_align_1: [],
        _bitfield_1: bpf_insn::new_bitfield_1(dst, src),
        off,
        imm,
    }
}

/// `ctx[0]` is the `struct request *` (a BTF pointer: fields load directly).
/// Returns 1 for reads under [`Policy::Reads`], else 0 (0 keeps the stock function).
pub fn fmod_ret_program(
    policy: Policy,
    cmd_flags_offset: u32,
    op_mask: u32,
    op_read: u32,
) -> anyhow::Result<Vec<bpf_insn>> {
    let ldx_dw = BPF_LDX | BPF_MEM | BPF_DW;
    let ldx_w = BPF_LDX | BPF_MEM | BPF_W;
    let and64_k = BPF_ALU64 | BPF_AND | BPF_K;
    let mov64_k = BPF_ALU64 | BPF_MOV | BPF_K;
    let jne_k = BPF_JMP | BPF_JNE | BPF_K;
    let exit = BPF_JMP | BPF_EXIT;
    let off = i16::try_from(cmd_flags_offset)
        .map_err(|_| anyhow::anyhow!("cmd_flags offset {cmd_flags_offset} too large"))?;
    Ok(match policy {
        Policy::Off => vec![insn(mov64_k, 0, 0, 0, 0), insn(exit, 0, 0, 0, 0)],
        Policy::Reads => vec![
            insn(ldx_dw, 1, 1, 0, 0),               // r1 = ctx[0] (rq)
            insn(ldx_w, 2, 1, off, 0),              // r2 = rq->cmd_flags
            insn(and64_k, 2, 0, 0, op_mask as i32), // r2 &= REQ_OP_MASK
            insn(mov64_k, 0, 0, 0, 0),              // r0 = 0
            insn(jne_k, 2, 0, 1, op_read as i32),   // if r2 != REQ_OP_READ skip
            insn(mov64_k, 0, 0, 0, 1),              // r0 = 1
            insn(exit, 0, 0, 0, 0),
        ],
        other => {
            anyhow::bail!("the fmod_ret program implements the policies off and reads; use the kprobe path for {other}")
        }
    })
}

impl FmodRet {
    pub fn attach(btf: &Btf, policy: Policy) -> anyhow::Result<FmodRet> {
        crate::kernel::caps::require_privileges()?;
        if let Some(why) = hook_unavailable_reason(btf) {
            anyhow::bail!("the mq-deadline hook is not available: {why}");
        }
        let func = btf
            .func_id(HOOK_FUNCTION)
            .context("no BTF id for dd_kml_verdict")?;
        let raw = layout::raw_tp_layout(btf)?;
        let insns = fmod_ret_program(policy, raw.rq_cmd_flags, raw.op_mask, raw.op_read)?;
        let license = c"GPL";
        let mut name = [0 as std::ffi::c_char; 16];
        for (n, b) in name.iter_mut().zip(program::HOOK_FMOD_RET.bytes()) {
            *n = b as std::ffi::c_char;
        }
        // SAFETY: bpf_attr is a union of plain integer structs; all-zero is valid.
        let mut attr: aya_obj::generated::bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writes to the union's prog-load member only.
        unsafe {
            let load = &mut attr.__bindgen_anon_3;
            load.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
            load.expected_attach_type = bpf_attach_type::BPF_MODIFY_RETURN as u32;
            load.attach_btf_id = func;
            load.insn_cnt = insns.len() as u32;
            load.insns = insns.as_ptr() as u64;
            load.license = license.as_ptr() as u64;
            load.prog_name = name;
        }
        // `insns` and `license` live until the end of this function.
        let prog = crate::sys::prog_load(attr).map_err(|(err, verifier)| {
            anyhow::anyhow!(
                "loading the fmod_ret program on {HOOK_FUNCTION}: {err}; verifier: {verifier}"
            )
        })?;
        let link = crate::sys::attach_tracing(prog.as_fd())
            .with_context(|| format!("attaching the fmod_ret program to {HOOK_FUNCTION}"))?;
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
        // The encoding the kernel reads (struct bpf_insn, little endian).
        let bytes = |i: &bpf_insn| -> [u8; 8] {
            // SAFETY: bpf_insn is 8 bytes of plain integers.
            unsafe { std::mem::transmute_copy(i) }
        };
        let p = fmod_ret_program(Policy::Reads, 24, 0xff, 0).unwrap();
        assert_eq!(p.len(), 7);
        assert_eq!(bytes(&p[0]), [0x79, 0x11, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes(&p[1]), [0x61, 0x12, 24, 0, 0, 0, 0, 0]);
        assert_eq!(bytes(&p[2]), [0x57, 0x02, 0, 0, 0xff, 0, 0, 0]);
        assert_eq!(bytes(&p[4]), [0x55, 0x02, 1, 0, 0, 0, 0, 0]);
        assert_eq!(bytes(&p[6]), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(fmod_ret_program(Policy::Off, 24, 0xff, 0).unwrap().len(), 2);
        assert!(fmod_ret_program(Policy::ReadsUnderWrites, 24, 0xff, 0).is_err());
    }
}
