//! The kernel's statistics of each attached program (`bpf_prog_info`): runs, run
//! time (with `kernel.bpf_stats_enabled`) and recursion misses.

/// Kernel-side statistics of one program (`bpf_prog_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub event: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
    pub recursion_misses: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` for a program (aya keeps `recursion_misses` private).
pub(super) fn prog_info(
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is plain integers; all-zero is its documented initial state.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: (&raw mut info) as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc == 0 {
        Ok(info)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
