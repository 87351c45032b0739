//! `--pin`: where the pins live and how other commands (`status`) open them. What
//! is pinned, and how a restarted agent adopts it, is in [`crate::adopt`].

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Map, MapData};

pub const PIN_DIR: &str = "/sys/fs/bpf/kml";

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
