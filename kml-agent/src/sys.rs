//! The bpf(2) commands kml needs that aya 0.14 does not offer: running a program
//! once (BPF_PROG_TEST_RUN: the slot checker), a program's `recursion_misses`
//! (BPF_OBJ_GET_INFO_BY_FD: aya keeps that field private), and loading and
//! attaching a program of a type aya cannot load (the fmod_ret program). The
//! attribute layouts are the kernel's own, from aya-obj's generated bindings.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

/// `bpf(cmd, attr)`: the kernel's return value (0, or a new file descriptor).
///
/// # Safety
/// Every pointer in `attr` must be valid for the kernel's reads and writes of the
/// command, for the duration of the call.
unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a whole `union bpf_attr`; the caller vouches for its pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An all-zero `union bpf_attr`: every command's "unused" value.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of plain integer structs; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Runs the program once with no input (BPF_PROG_TEST_RUN).
pub fn test_run(prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = zeroed_attr();
    attr.test.prog_fd = prog.as_raw_fd() as u32;
    // SAFETY: no buffers are passed.
    unsafe { bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr) }.map(|_| ())
}

/// The kernel's `bpf_prog_info` of a program (BPF_OBJ_GET_INFO_BY_FD).
pub fn prog_info(prog: BorrowedFd<'_>) -> std::io::Result<bpf_prog_info> {
    // SAFETY: bpf_prog_info is plain integers; all-zero is its documented initial state.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = prog.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of_val(&info) as u32;
    attr.info.info = (&raw mut info) as u64;
    // SAFETY: `info` outlives the call; the kernel writes at most info_len bytes.
    unsafe { bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// Loads a program (BPF_PROG_LOAD) from the prepared `attr.__bindgen_anon_3`
/// (`prog_type`, `insns`, `license`, ...), with a verifier log; returns the
/// program's fd, or the error with the verifier's words.
pub fn prog_load(mut attr: bpf_attr) -> Result<OwnedFd, (std::io::Error, String)> {
    let mut log = vec![0u8; 1 << 16];
    attr.__bindgen_anon_3.log_level = 1;
    attr.__bindgen_anon_3.log_size = log.len() as u32;
    attr.__bindgen_anon_3.log_buf = log.as_mut_ptr() as u64;
    // SAFETY: the caller's instructions and license, and `log`, outlive the call.
    match unsafe { bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) } {
        // SAFETY: a fresh fd returned by the kernel, owned from here on.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            Err((e, String::from_utf8_lossy(&log[..end]).trim().to_owned()))
        }
    }
}

/// Attaches a `tracing` program at its `attach_btf_id` (BPF_RAW_TRACEPOINT_OPEN
/// with no name); returns the link's fd.
pub fn attach_tracing(prog: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    // SAFETY: no name pointer (0): the kernel attaches at the program's BTF id.
    let fd = unsafe { bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr) }?;
    // SAFETY: a fresh fd returned by the kernel, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
