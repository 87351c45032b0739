//! `--pin`: where the pins live and how other commands (`status`) open them. What
//! is pinned, and how a restarted agent adopts it, is in [`crate::adopt`].

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Map, MapData};

pub const PIN_DIR: &str = "/sys/fs/bpf/kml";

/// Checks, before anything is loaded, that maps can be pinned under `dir`: its
/// parent is a writable bpffs (mounting /sys/fs/bpf if `dir` is under it).
pub fn check_pin_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.starts_with(crate::kernel::mounts::BPFFS)
        && crate::kernel::mounts::ensure_bpffs().with_context(|| {
            format!(
                "--pin: cannot mount bpffs at {}; mount it with `mount -t bpf bpf {0}`",
                crate::kernel::mounts::BPFFS
            )
        })?
    {
        tracing::debug!("mounted bpffs at {}", crate::kernel::mounts::BPFFS);
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        anyhow::bail!(
            "--pin: {} does not exist; mount a bpffs there (`mount -t bpf bpf {0}`) or pick another --pin-dir",
            parent.display()
        );
    }
    if !crate::kernel::mounts::is_bpffs(parent) {
        anyhow::bail!(
            "--pin: {} is not a bpf file system; mount one there (`mount -t bpf bpf {0}`) or use a --pin-dir under {}",
            parent.display(),
            crate::kernel::mounts::BPFFS
        );
    }
    if crate::kernel::mounts::is_read_only(parent) {
        anyhow::bail!(
            "--pin: the bpf file system at {} is mounted read-only; remount it read-write (`mount -o remount,rw {0}`)",
            parent.display()
        );
    }
    Ok(())
}

/// Opens a pinned map.
pub fn open(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no pinned map at {} (is an agent running with --pin?)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
}
