//! Reading and writing a device's mq-deadline tunables.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::policy::Tunables;

/// One disk's `queue/` directory (a real `/sys/block/DEV/queue`, or a copy of its
/// layout in unit tests).
#[derive(Clone, Debug)]
pub struct Queue {
    pub device: String,
    dir: PathBuf,
}

impl Queue {
    pub fn of(device: &str) -> Queue {
        Queue::at(device, Path::new("/sys/block").join(device).join("queue"))
    }

    pub fn at(device: &str, dir: PathBuf) -> Queue {
        Queue {
            device: device.to_owned(),
            dir,
        }
    }

    fn read_u32(&self, rel: &str) -> anyhow::Result<u32> {
        let path = self.dir.join(rel);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: reading {}", self.device, path.display()))?;
        text.trim().parse().with_context(|| {
            format!(
                "{}: {} is `{}`, not a count",
                self.device,
                path.display(),
                text.trim()
            )
        })
    }

    /// Whether the queue runs mq-deadline now (its iosched files exist).
    pub fn is_mq_deadline(&self) -> bool {
        std::fs::read_to_string(self.dir.join("scheduler"))
            .is_ok_and(|s| s.contains("[mq-deadline]"))
    }

    /// How many requests the device can hold at once: min(nr_requests, the
    /// smallest hardware queue's tags). Without `mq/*/nr_tags`, nr_requests.
    pub fn tags(&self) -> anyhow::Result<u32> {
        let nr = self.read_u32("nr_requests")?;
        let hw = std::fs::read_dir(self.dir.join("../mq"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("nr_tags")).ok())
            .filter_map(|t| t.trim().parse::<u32>().ok())
            .min();
        Ok(hw.map_or(nr, |hw| hw.min(nr)))
    }

    pub fn read(&self) -> anyhow::Result<Tunables> {
        if !self.is_mq_deadline() {
            anyhow::bail!(
                "{} does not use mq-deadline (queue/scheduler); --tune changes mq-deadline's tunables only",
                self.device
            );
        }
        let mut v = [0u32; 3];
        for (slot, name) in v.iter_mut().zip(Tunables::NAMES) {
            *slot = self.read_u32(&format!("iosched/{name}"))?;
        }
        Ok(Tunables::from_values(v))
    }

    /// Writes the values of `to` that differ from `from`, then reads all back: the
    /// kernel must report exactly `to`.
    pub fn write(&self, from: &Tunables, to: &Tunables) -> anyhow::Result<()> {
        for ((name, a), b) in Tunables::NAMES.iter().zip(from.values()).zip(to.values()) {
            if a != b {
                let path = self.dir.join("iosched").join(name);
                std::fs::write(&path, b.to_string()).with_context(|| {
                    format!("{}: writing {b} to {}", self.device, path.display())
                })?;
            }
        }
        let now = self.read()?;
        if now != *to {
            anyhow::bail!(
                "{}: wrote {:?} but the kernel reports {:?}",
                self.device,
                to,
                now
            );
        }
        Ok(())
    }
}
