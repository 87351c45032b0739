//! The bpf(2) commands kml needs that aya 0.14 does not offer: running a program
//! once (BPF_PROG_TEST_RUN: the slot checker), a program's `recursion_misses`
//! (BPF_OBJ_GET_INFO_BY_FD: aya keeps that field private), loading and
//! attaching a program of a type aya cannot load (the fmod_ret program), and
//! reading many array entries in one call (BPF_MAP_LOOKUP_BATCH). The
//! attribute layouts are the kernel's own, from aya-obj's generated bindings.

#[cfg(test)]
use std::os::fd::AsFd as _;
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

/// Runs the program once on `cpu` (BPF_PROG_TEST_RUN with
/// `BPF_F_TEST_RUN_ON_CPU`, Linux 5.10; raw tracepoint programs only); returns
/// the program's return value.
pub fn test_run_on_cpu(prog: BorrowedFd<'_>, cpu: u32) -> std::io::Result<u32> {
    let mut attr = zeroed_attr();
    attr.test.prog_fd = prog.as_raw_fd() as u32;
    attr.test.flags = aya_obj::generated::BPF_F_TEST_RUN_ON_CPU;
    attr.test.cpu = cpu;
    // SAFETY: no buffers are passed.
    unsafe { bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr) }?;
    // SAFETY: the kernel wrote the test member of the union.
    Ok(unsafe { attr.test.retval })
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

/// Reads consecutive entries of an array map from index `start` into `values`
/// in one call (BPF_MAP_LOOKUP_BATCH, Linux 5.6+), instead of one bpf(2) call
/// each; returns how many were read (fewer than `values.len()` at the map's end).
pub fn array_lookup_batch<T: aya::Pod>(
    map: BorrowedFd<'_>,
    start: u32,
    values: &mut [T],
) -> std::io::Result<usize> {
    if values.is_empty() {
        return Ok(0);
    }
    let count = u32::try_from(values.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut keys = vec![0u32; values.len()];
    // The kernel resumes after the `in_batch` key; none: from index 0.
    let mut in_batch = start.wrapping_sub(1);
    let mut out_batch = 0u32;
    let mut attr = zeroed_attr();
    attr.batch.in_batch = match start {
        0 => 0,
        _ => (&raw mut in_batch) as u64,
    };
    attr.batch.out_batch = (&raw mut out_batch) as u64;
    attr.batch.keys = keys.as_mut_ptr() as u64;
    attr.batch.values = values.as_mut_ptr() as u64;
    attr.batch.count = count;
    attr.batch.map_fd = map.as_raw_fd() as u32;
    // SAFETY: `keys` holds `count` u32 keys and `values` `count` values of the
    // map's value type (a Pod: any bytes are valid); both outlive the call.
    match unsafe { bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) } {
        Ok(_) => {}
        // The end of the map: `count` says how many were read before it.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: plain integer field, written back by the kernel.
    let read = unsafe { attr.batch.count } as usize;
    Ok(read.min(values.len()))
}

#[cfg(test)]
mod tests {
    use aya_obj::generated::bpf_map_type;

    use super::*;

    /// An array map of `n` u64s where entry i holds i * 3 (needs CAP_BPF).
    fn array_of(n: u32) -> std::io::Result<OwnedFd> {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_1.map_type = bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
        attr.__bindgen_anon_1.key_size = 4;
        attr.__bindgen_anon_1.value_size = 8;
        attr.__bindgen_anon_1.max_entries = n;
        // SAFETY: no pointers are passed.
        let fd = unsafe { bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr) }?;
        // SAFETY: a fresh fd returned by the kernel, owned from here on.
        let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        for mut key in 0..n {
            let mut value = u64::from(key) * 3;
            let mut attr = zeroed_attr();
            // SAFETY: `key` and `value` outlive the call.
            unsafe {
                attr.__bindgen_anon_2.map_fd = map.as_raw_fd() as u32;
                attr.__bindgen_anon_2.key = (&raw mut key) as u64;
                attr.__bindgen_anon_2.__bindgen_anon_1.value = (&raw mut value) as u64;
                bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr)?;
            }
        }
        Ok(map)
    }

    /// A batch from any start reads exactly the entries from there on, and stops
    /// at the map's end.
    #[test]
    fn array_lookup_batch_reads_ranges() {
        let map = match array_of(10) {
            Ok(m) => m,
            Err(e) => return kml_testkit::skip(format_args!("cannot create a BPF map ({e})")),
        };
        let mut buf = [0u64; 4];
        for start in 0..10u32 {
            let n = array_lookup_batch(map.as_fd(), start, &mut buf).unwrap();
            assert_eq!(n, 4.min(10 - start as usize), "start {start}");
            let want: Vec<u64> = (start..start + n as u32)
                .map(|i| u64::from(i) * 3)
                .collect();
            assert_eq!(&buf[..n], &want[..], "start {start}");
        }
        assert_eq!(
            array_lookup_batch::<u64>(map.as_fd(), 0, &mut []).unwrap(),
            0
        );
    }
}
