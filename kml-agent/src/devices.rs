//! Block devices as sysfs shows them: numbers, scheduler, mq-deadline settings.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

const SYS_BLOCK: &str = "/sys/block";

/// A whole disk under /sys/block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    pub name: String,
    pub major: u32,
    pub minor: u32,
    /// Capacity in 512-byte sectors (0 for an unattached loop device).
    pub size_sectors: u64,
    /// The active I/O scheduler (`none`, `mq-deadline`, ...), if the queue has one.
    pub scheduler: Option<String>,
    pub available_schedulers: Vec<String>,
    /// Files of `queue/iosched/` and their values (mq-deadline: read_expire,
    /// write_expire in ms, fifo_batch, writes_starved, front_merges, ...).
    pub iosched: BTreeMap<String, String>,
}

impl BlockDevice {
    /// Kernel `dev_t` as the block tracepoints report it.
    pub fn dev(&self) -> u32 {
        kml_ebpf_common::kernel_dev(self.major, self.minor)
    }

    pub fn sys_path(&self) -> PathBuf {
        Path::new(SYS_BLOCK).join(&self.name)
    }

    pub fn is_mq_deadline(&self) -> bool {
        self.scheduler.as_deref() == Some("mq-deadline")
    }

    fn iosched_ms(&self, key: &str) -> Option<Duration> {
        self.iosched
            .get(key)?
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_millis)
    }

    /// Hardware queues (`mq/` entries) and scheduler tags per queue
    /// (`queue/nr_requests`), as sysfs says now.
    pub fn hw_queues(&self) -> (u32, u32) {
        let queues = fs::read_dir(self.sys_path().join("mq"))
            .map(|d| d.filter(|e| e.is_ok()).count() as u32)
            .unwrap_or(1);
        let nr_requests = fs::read_to_string(self.sys_path().join("queue/nr_requests"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        (queues.max(1), nr_requests)
    }

    /// mq-deadline's (read_expire, write_expire).
    pub fn expiries(&self) -> anyhow::Result<(Duration, Duration)> {
        match (
            self.iosched_ms("read_expire"),
            self.iosched_ms("write_expire"),
        ) {
            (Some(r), Some(w)) => Ok((r, w)),
            _ => anyhow::bail!(
                "{}: no read_expire/write_expire in {}/queue/iosched (scheduler {})",
                self.name,
                self.sys_path().display(),
                self.scheduler.as_deref().unwrap_or("none")
            ),
        }
    }

    /// Hardware tags per queue (`mq/*/nr_tags`, the smallest of the hardware
    /// queues): how many requests the device itself holds; the rest wait in the
    /// scheduler. `None` without a blk-mq queue.
    pub fn hw_queue_depth(&self) -> Option<u32> {
        fs::read_dir(self.sys_path().join("mq"))
            .ok()?
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("nr_tags")).ok())
            .filter_map(|t| t.trim().parse().ok())
            .min()
    }

    /// Reads one device; `name` is a /sys/block entry.
    pub fn read(name: &str) -> anyhow::Result<BlockDevice> {
        let dir = Path::new(SYS_BLOCK).join(name);
        let numbers = fs::read_to_string(dir.join("dev")).with_context(|| {
            format!(
                "no block device `{name}` ({}/dev unreadable)",
                dir.display()
            )
        })?;
        let (major, minor) = parse_dev_numbers(&numbers)
            .with_context(|| format!("{}/dev: unexpected {numbers:?}", dir.display()))?;
        let size_sectors = fs::read_to_string(dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let (scheduler, available_schedulers) = fs::read_to_string(dir.join("queue/scheduler"))
            .map(|s| parse_scheduler(&s))
            .unwrap_or((None, Vec::new()));
        let mut iosched = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(dir.join("queue/iosched")) {
            for e in entries.flatten() {
                if let Ok(v) = fs::read_to_string(e.path()) {
                    iosched.insert(
                        e.file_name().to_string_lossy().into_owned(),
                        v.trim().to_owned(),
                    );
                }
            }
        }
        Ok(BlockDevice {
            name: name.to_owned(),
            major,
            minor,
            size_sectors,
            scheduler,
            available_schedulers,
            iosched,
        })
    }

    /// Resolves `loop0`, `/dev/loop0` or `/sys/block/loop0`.
    pub fn find(spec: &str) -> anyhow::Result<BlockDevice> {
        let name = spec
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(spec);
        if !Path::new(SYS_BLOCK).join(name).exists() {
            let known: Vec<String> = list().into_iter().map(|d| d.name).collect();
            anyhow::bail!(
                "unknown block device `{spec}` (whole disks here: {})",
                known.join(", ")
            );
        }
        BlockDevice::read(name)
    }
}

/// All whole disks, sorted by name.
pub fn list() -> Vec<BlockDevice> {
    let mut out: Vec<BlockDevice> = fs::read_dir(SYS_BLOCK)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| BlockDevice::read(&e.file_name().to_string_lossy()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `"7:0\n"` → (7, 0).
fn parse_dev_numbers(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// `"mq-deadline kyber [bfq] none"` → (Some("bfq"), all four).
fn parse_scheduler(s: &str) -> (Option<String>, Vec<String>) {
    let mut active = None;
    let all = s
        .split_whitespace()
        .map(|w| {
            if let Some(inner) = w.strip_prefix('[').and_then(|w| w.strip_suffix(']')) {
                active = Some(inner.to_owned());
                inner.to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect();
    (active, all)
}

/// Checks privileges and resolves `devices` (names or /dev paths; empty means every
/// mq-deadline disk) before anything is created or loaded.
pub fn resolve(devices: &[String]) -> anyhow::Result<Vec<BlockDevice>> {
    crate::kernel::caps::require_privileges()?;
    Ok(if devices.is_empty() {
        let all: Vec<BlockDevice> = list()
            .into_iter()
            // An unattached loop device (size 0) keeps its scheduler: not a disk now.
            .filter(|d| d.is_mq_deadline() && d.size_sectors > 0)
            .collect();
        if all.is_empty() {
            anyhow::bail!(
                "no disk uses mq-deadline: pick one with --device, after `echo mq-deadline > /sys/block/DEV/queue/scheduler`"
            );
        }
        all
    } else {
        devices
            .iter()
            .map(|d| BlockDevice::find(d))
            .collect::<anyhow::Result<_>>()?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_line() {
        let (active, all) = parse_scheduler("[mq-deadline] kyber bfq none\n");
        assert_eq!(active.as_deref(), Some("mq-deadline"));
        assert_eq!(all, ["mq-deadline", "kyber", "bfq", "none"]);
        assert_eq!(parse_scheduler("none\n").0, None);
        assert_eq!(
            parse_scheduler("mq-deadline [none]").0.as_deref(),
            Some("none")
        );
    }

    #[test]
    fn dev_numbers() {
        assert_eq!(parse_dev_numbers("7:12\n"), Some((7, 12)));
        assert_eq!(parse_dev_numbers("259:0"), Some((259, 0)));
        assert_eq!(parse_dev_numbers("x"), None);
    }

    #[test]
    fn expiries_from_iosched() {
        let mut d = BlockDevice {
            name: "loop9".into(),
            major: 7,
            minor: 9,
            size_sectors: 0,
            scheduler: Some("mq-deadline".into()),
            available_schedulers: vec![],
            iosched: BTreeMap::new(),
        };
        assert!(d.expiries().is_err());
        d.iosched.insert("read_expire".into(), "500".into());
        d.iosched.insert("write_expire".into(), "5000".into());
        assert_eq!(
            d.expiries().unwrap(),
            (Duration::from_millis(500), Duration::from_millis(5000))
        );
        assert_eq!(d.dev(), (7 << 20) | 9);
    }
}
