//! `--pin`: the maps under /sys/fs/bpf/kml (directory 0700, maps 0600), so `status`
//! and bpftool work from another shell. Removed again when the agent exits
//! cleanly; pins a killed agent left behind are replaced by the next `--pin`.

use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    maps::{Map, MapData},
    Ebpf,
};

pub const PIN_DIR: &str = "/sys/fs/bpf/kml";

/// The maps worth reading from outside: model, verdict counters, devices.
pub const PINNED_MAPS: &[&str] = &[
    "MODEL_CONTROL",
    "LINEAR_MODELS",
    "TREE_MODELS",
    "SLOT_STATUS",
    "COUNTERS",
    "DEVICES",
    "DEVICE_STATE",
    "INFLIGHT",
];

/// Pinned maps; unpinned on drop.
pub struct Pins {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl Pins {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Pins [`PINNED_MAPS`] of `ebpf` under `dir` (mounting bpffs if needed).
pub fn pin_maps(ebpf: &Ebpf, dir: &Path) -> anyhow::Result<Pins> {
    if dir.starts_with(crate::kernel::mounts::BPFFS)
        && crate::kernel::mounts::ensure_bpffs().context("mounting bpffs")?
    {
        log::info!("mounted bpffs at {}", crate::kernel::mounts::BPFFS);
    }
    if dir.exists() {
        // Left by an agent that did not exit cleanly: replace.
        for name in PINNED_MAPS {
            let _ = std::fs::remove_file(dir.join(name));
        }
    } else {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!("creating {} (is bpffs mounted read-write?)", dir.display())
            })?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let mut pins = Pins {
        dir: dir.to_owned(),
        files: Vec::new(),
    };
    for name in PINNED_MAPS {
        let path = dir.join(name);
        let map = ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        map.pin(&path)
            .with_context(|| format!("pinning {name} at {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        pins.files.push(path);
    }
    Ok(pins)
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
