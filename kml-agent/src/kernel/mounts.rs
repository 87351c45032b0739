//! Pseudo file systems kml uses: bpffs (pins), securityfs (lockdown mode).

use std::{ffi::CString, io, path::Path};

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SECURITYFS: &str = "/sys/kernel/security";
const SECURITYFS_MAGIC: i64 = 0x7365_6373;

/// The file system magic of `path`, if it can be stat'ed.
fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

fn mount(fstype: &str, target: &str) -> io::Result<()> {
    let src = CString::new(fstype).expect("no NUL");
    let tgt = CString::new(target).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn bpffs_mounted() -> bool {
    is_bpffs(Path::new(BPFFS))
}

/// Whether `path` is on a bpf file system.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

/// Whether the file system holding `path` is mounted read-only.
pub fn is_read_only(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_flag & libc::ST_RDONLY != 0
}

/// Mounts bpffs at /sys/fs/bpf unless it is there; returns whether it mounted it.
pub fn ensure_bpffs() -> io::Result<bool> {
    if bpffs_mounted() {
        return Ok(false);
    }
    mount("bpf", BPFFS).map(|()| true)
}

/// The kernel lockdown mode (`none`, `integrity`, `confidentiality`), mounting
/// securityfs if needed. `None` when the kernel has no lockdown LSM.
pub fn lockdown_mode() -> Option<String> {
    if fs_magic(Path::new(SECURITYFS)) != Some(SECURITYFS_MAGIC) {
        let _ = mount("securityfs", SECURITYFS);
    }
    let text = std::fs::read_to_string(Path::new(SECURITYFS).join("lockdown")).ok()?;
    // "none [integrity] confidentiality": the bracketed word is active.
    text.split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_owned())
}
