//! `run --pin`: kml programs that outlive the agent, a restarted agent that
//! adopts them instead of loading a second copy, and other commands (`status`)
//! that open them.
//!
//! The pin directory (bpffs, 0700) holds every map of the object, one bpf_link per
//! observed tracepoint (the links keep the programs attached after the agent is
//! gone; the pinned `INFER` program array keeps the tail-called inference stages),
//! and `AGENT`, a symlink whose target describes what was pinned: which eBPF object
//! build and observer settings, and which agent owns it (bpffs holds no regular
//! files; a symlink is readable with `readlink` and goes with the directory).
//!
//! A restarted agent adopts only what it would itself have loaded: the same object
//! bytes, attach mode, ring size and sampling. Anything else is replaced (unpinned,
//! which detaches it) and said so. An owner that is still alive is never displaced.

use std::{
    collections::BTreeMap,
    fmt,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData};
use kml_ebpf_common::abi::names::map;

/// Where `--pin` puts the pins unless told otherwise.
pub const PIN_DIR: &str = "/sys/fs/bpf/kml";

/// The symlink describing the pinned state.
pub const META: &str = "AGENT";

/// Every map of the observers, pinned by name (so a restarted agent reuses them all).
pub const MAPS: &[&str] = map::OBSERVER;

/// The pin of the link attaching the program of `event`.
pub fn link_pin(dir: &Path, event: &str) -> PathBuf {
    dir.join(format!("link_{event}"))
}

/// What a pin directory holds, as its `AGENT` symlink says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinMeta {
    /// FNV-1a 64 of the eBPF object's bytes, hex.
    pub object: String,
    /// `raw-tracepoint` or `tracepoint`.
    pub mode: String,
    pub ring_bytes: u32,
    pub wakeup_bytes: u32,
    /// 0 in lossless mode.
    pub sample_fill_bytes: u32,
    /// The agent that owns the pins (the one running, or the last one).
    pub owner_pid: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unreadable pin description `{0}`")]
pub struct MetaError(String);

impl PinMeta {
    pub fn encode(&self) -> String {
        format!(
            "kml-pins-v1 object={} mode={} ring={} wakeup={} sample={} pid={}",
            self.object,
            self.mode,
            self.ring_bytes,
            self.wakeup_bytes,
            self.sample_fill_bytes,
            self.owner_pid
        )
    }

    pub fn decode(s: &str) -> Result<PinMeta, MetaError> {
        let bad = || MetaError(s.to_owned());
        let mut words = s.split_whitespace();
        if words.next() != Some("kml-pins-v1") {
            return Err(bad());
        }
        let fields: BTreeMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
        let num = |k: &str| -> Result<u32, MetaError> {
            fields.get(k).and_then(|v| v.parse().ok()).ok_or_else(bad)
        };
        Ok(PinMeta {
            object: fields.get("object").ok_or_else(bad)?.to_string(),
            mode: fields.get("mode").ok_or_else(bad)?.to_string(),
            ring_bytes: num("ring")?,
            wakeup_bytes: num("wakeup")?,
            sample_fill_bytes: num("sample")?,
            owner_pid: num("pid")?,
        })
    }

    /// Why pins described by `self` cannot serve an agent that wants `want`
    /// (`None`: they can). The owner is not compared.
    pub fn mismatch(&self, want: &PinMeta) -> Option<String> {
        if self.object != want.object {
            return Some(format!(
                "they come from another eBPF object build ({} here, {} pinned)",
                want.object, self.object
            ));
        }
        if self.mode != want.mode {
            return Some(format!(
                "they attach as {}, this agent as {}",
                self.mode, want.mode
            ));
        }
        if (self.ring_bytes, self.wakeup_bytes, self.sample_fill_bytes)
            != (want.ring_bytes, want.wakeup_bytes, want.sample_fill_bytes)
        {
            return Some(format!(
                "their ring/sampling settings differ (ring {} wakeup {} sample {} pinned; {} {} {} here)",
                self.ring_bytes,
                self.wakeup_bytes,
                self.sample_fill_bytes,
                want.ring_bytes,
                want.wakeup_bytes,
                want.sample_fill_bytes
            ));
        }
        None
    }
}

/// FNV-1a 64 of `bytes`, hex: tells two builds of the eBPF object apart.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What was found in a pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// No directory, or an empty one.
    Nothing,
    /// Pins this agent can adopt.
    Adoptable(PinMeta),
    /// Pins to replace, and why.
    Stale(String),
    /// A live agent owns them.
    Owned(u32),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Nothing => write!(f, "nothing pinned"),
            Found::Adoptable(m) => write!(f, "adoptable pins of pid {}", m.owner_pid),
            Found::Stale(why) => write!(f, "stale pins: {why}"),
            Found::Owned(pid) => write!(f, "pins owned by the running agent {pid}"),
        }
    }
}

/// Looks at `dir` on behalf of an agent that wants `want`.
pub fn inspect(dir: &Path, want: &PinMeta) -> Found {
    let entries: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return Found::Nothing,
    };
    if entries.is_empty() {
        return Found::Nothing;
    }
    let meta = match std::fs::read_link(dir.join(META)) {
        Ok(target) => PinMeta::decode(&target.to_string_lossy()),
        // Written last: its absence means an agent died while setting up.
        Err(_) => return Found::Stale("they are incomplete (no AGENT description)".into()),
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) => return Found::Stale(e.to_string()),
    };
    if crate::owner::other_agent_alive(meta.owner_pid) {
        return Found::Owned(meta.owner_pid);
    }
    if let Some(why) = meta.mismatch(want) {
        return Found::Stale(why);
    }
    let missing: Vec<&str> = MAPS
        .iter()
        .copied()
        .filter(|m| !entries.iter().any(|e| e == m))
        .collect();
    if !missing.is_empty() {
        return Found::Stale(format!("maps are missing: {}", missing.join(", ")));
    }
    Found::Adoptable(meta)
}

/// A warning for an agent started without `--pin` while a killed agent's pinned
/// programs are still attached at `dir` (both sets would observe the same disks).
pub fn orphan_note(dir: &Path) -> Option<String> {
    let target = std::fs::read_link(dir.join(META)).ok()?;
    let meta = PinMeta::decode(&target.to_string_lossy()).ok()?;
    (!crate::owner::agent_alive(meta.owner_pid)).then(|| {
        format!(
            "note: programs pinned at {} by a killed agent (pid {}) are still attached; `kml-agent run --pin` adopts them and removes them on a clean exit",
            dir.display(),
            meta.owner_pid
        )
    })
}

/// Creates `dir` (0700) on bpffs, mounting bpffs at its usual place if needed.
pub fn make_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.starts_with(crate::kernel::mounts::BPFFS)
        && crate::kernel::mounts::ensure_bpffs().context("mounting bpffs")?
    {
        tracing::debug!("mounted bpffs at {}", crate::kernel::mounts::BPFFS);
    }
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!("creating {} (is bpffs mounted read-write?)", dir.display())
            })?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
}

/// Removes every pin in `dir` (links first, so the programs detach before their
/// maps go) and the directory itself. Returns how many pins were removed.
pub fn clear(dir: &Path) -> std::io::Result<usize> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    names.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for p in &names {
        std::fs::remove_file(p)?;
    }
    std::fs::remove_dir(dir)?;
    Ok(names.len())
}

/// Writes (or replaces) the `AGENT` description; last, once everything is pinned.
pub fn write_meta(dir: &Path, meta: &PinMeta) -> anyhow::Result<()> {
    let path = dir.join(META);
    let _ = std::fs::remove_file(&path);
    std::os::unix::fs::symlink(meta.encode(), &path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Root only: 0600 on a pin.
pub fn restrict(path: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))
}

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

/// The traced devices in pinned maps: dev_t, slot contents (settings and counts).
pub fn traced_devices(
    dir: &Path,
) -> anyhow::Result<Vec<(u32, kml_ebpf_common::device::DeviceSlot)>> {
    use aya::maps::{Array, HashMap};
    let by_dev: HashMap<_, u32, u32> =
        HashMap::try_from(open(dir, kml_ebpf_common::abi::names::map::DEV_SLOTS)?)?;
    let slots: Array<_, kml_ebpf_common::device::DeviceSlot> =
        Array::try_from(open(dir, kml_ebpf_common::abi::names::map::DEVICES)?)?;
    let mut out = Vec::new();
    for (dev, slot) in by_dev.iter().flatten() {
        out.push((dev, slots.get(&slot, 0)?));
    }
    Ok(out)
}

/// Requests with an entry in pinned maps (a soak watches this stay bounded).
pub fn live_entries(dir: &Path) -> anyhow::Result<u64> {
    use aya::maps::{Array, HashMap};
    use kml_ebpf_common::{device::ReqState, InflightKey};
    let reqs: Array<_, ReqState> =
        Array::try_from(open(dir, kml_ebpf_common::abi::names::map::REQS)?)?;
    let raw = reqs
        .iter()
        .filter(|e| e.as_ref().is_ok_and(|e| e.rq != 0))
        .count();
    let inflight: HashMap<_, InflightKey, ReqState> =
        HashMap::try_from(open(dir, kml_ebpf_common::abi::names::map::INFLIGHT)?)?;
    Ok((raw + inflight.keys().filter(Result::is_ok).count()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> PinMeta {
        PinMeta {
            object: fingerprint(b"object"),
            mode: "raw-tracepoint".into(),
            ring_bytes: 8 << 20,
            wakeup_bytes: 256 << 10,
            sample_fill_bytes: 4 << 20,
            owner_pid: 42,
        }
    }

    #[test]
    fn meta_round_trips() {
        let m = meta();
        assert_eq!(PinMeta::decode(&m.encode()), Ok(m));
        assert!(PinMeta::decode("kml-pins-v1 object=1 mode=x").is_err());
        assert!(PinMeta::decode("something else").is_err());
        assert!(PinMeta::decode("").is_err());
    }

    #[test]
    fn mismatches_are_named() {
        let m = meta();
        let mut other_pid = m.clone();
        other_pid.owner_pid = 7;
        assert_eq!(m.mismatch(&other_pid), None);
        let mut build = m.clone();
        build.object = fingerprint(b"object2");
        assert!(m.mismatch(&build).unwrap().contains("eBPF object build"));
        let mut mode = m.clone();
        mode.mode = "tracepoint".into();
        assert!(m.mismatch(&mode).unwrap().contains("tracepoint"));
        let mut ring = m.clone();
        ring.sample_fill_bytes = 0;
        assert!(m.mismatch(&ring).unwrap().contains("sampling"));
    }

    #[test]
    fn fingerprints_differ() {
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
        assert_eq!(fingerprint(b""), "cbf29ce484222325");
    }

    #[test]
    fn inspect_an_ordinary_directory() {
        // Logic only (a tmpfs directory, not bpffs): description, owner, missing maps.
        let dir = std::env::temp_dir().join(format!("kml-adopt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let want = meta();
        assert_eq!(inspect(&dir, &want), Found::Nothing);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(inspect(&dir, &want), Found::Nothing);
        std::fs::write(dir.join(map::COUNTERS), b"").unwrap();
        assert!(matches!(inspect(&dir, &want), Found::Stale(w) if w.contains("incomplete")));
        let mut dead = want.clone();
        dead.owner_pid = u32::MAX; // no such process
        write_meta(&dir, &dead).unwrap();
        assert!(matches!(inspect(&dir, &want), Found::Stale(w) if w.contains("missing")));
        for m in MAPS {
            std::fs::write(dir.join(m), b"").unwrap();
        }
        assert_eq!(inspect(&dir, &want), Found::Adoptable(dead.clone()));
        let mut other = want.clone();
        other.object = fingerprint(b"newer build");
        assert!(matches!(inspect(&dir, &other), Found::Stale(w) if w.contains("build")));
        std::fs::write(dir.join("link_block_rq_insert"), b"").unwrap();
        assert_eq!(clear(&dir).unwrap(), MAPS.len() + 2);
        assert!(!dir.exists());
    }
}
