//! What a tuning agent keeps on disk, per device, under [`STATE_DIR`]: the original
//! values (saved before the first change), who is tuning, the current level and the
//! last decisions. A clean exit restores the originals and removes the file; a
//! killed agent leaves it, and the next agent (or `kml-agent restore`) puts the
//! originals back. The directory is on /run: the kernel forgets the tunables at
//! reboot, and so does tmpfs.

use std::{
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{
    policy::{Decision, Tunables},
    sysfs::Queue,
};

pub const STATE_DIR: &str = "/run/kml/tune";
/// Decisions kept in the file (the newest last).
pub const KEPT_DECISIONS: usize = 20;

/// The state directory: `$KML_TUNE_STATE_DIR` or [`STATE_DIR`].
pub fn state_dir() -> PathBuf {
    std::env::var_os("KML_TUNE_STATE_DIR").map_or_else(|| PathBuf::from(STATE_DIR), PathBuf::from)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoggedDecision {
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    #[serde(flatten)]
    pub decision: Decision,
    /// `fifo_batch 16 -> 8, ...`
    pub change: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneState {
    pub device: String,
    /// `major:minor`: a different disk under the same name is not restored.
    pub dev: String,
    /// The tuning agent.
    pub pid: u32,
    pub started_unix: u64,
    pub originals: Tunables,
    /// min(nr_requests, hardware tags) when tuning started (the levels use it).
    pub tags: u32,
    pub level: u8,
    pub applied: Tunables,
    #[serde(default)]
    pub decisions: Vec<LoggedDecision>,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TuneState {
    pub fn path(dir: &Path, device: &str) -> PathBuf {
        dir.join(format!("{device}.json"))
    }

    /// Atomically (write, fsync, rename), mode 0600 in a 0700 directory.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let path = Self::path(dir, &self.device);
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    }

    pub fn load(path: &Path) -> anyhow::Result<TuneState> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a tuning state", path.display()))
    }

    /// Every state file in `dir` (unreadable ones as errors).
    pub fn all(dir: &Path) -> Vec<(PathBuf, anyhow::Result<TuneState>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                let s = TuneState::load(&p);
                (p, s)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn log(&mut self, decision: Decision, change: String) {
        self.decisions.push(LoggedDecision {
            at_unix: unix_now(),
            decision,
            change,
        });
        let extra = self.decisions.len().saturating_sub(KEPT_DECISIONS);
        self.decisions.drain(..extra);
    }
}

/// What [`restore_leftover`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Leftover {
    /// No state file for the device.
    None,
    /// The originals were written back: `change` says what moved.
    Restored { pid: u32, change: String },
    /// The file named another disk, or the disk no longer runs mq-deadline (a new
    /// scheduler instance has its defaults): nothing to restore; file removed.
    Stale { why: String },
}

/// Puts back the originals a dead agent left in `dir` for `queue`'s device and
/// removes its file. Refuses when a live kml-agent tunes the device.
pub fn restore_leftover(dir: &Path, queue: &Queue, dev: &str) -> anyhow::Result<Leftover> {
    let path = TuneState::path(dir, &queue.device);
    if !path.exists() {
        return Ok(Leftover::None);
    }
    let state = TuneState::load(&path)?;
    if crate::owner::other_agent_alive(state.pid) {
        anyhow::bail!(
            "{} is tuned by kml-agent pid {} ({}); stop that agent first",
            queue.device,
            state.pid,
            path.display()
        );
    }
    let outcome = if state.dev != dev {
        Leftover::Stale {
            why: format!(
                "the file is for disk {}, {} is now {dev}",
                state.dev, queue.device
            ),
        }
    } else if !queue.is_mq_deadline() {
        Leftover::Stale {
            why: format!("{} no longer uses mq-deadline", queue.device),
        }
    } else {
        let now = queue.read()?;
        queue
            .write(&now, &state.originals)
            .context("restoring the original tunables")?;
        Leftover::Restored {
            pid: state.pid,
            change: now.describe_change(&state.originals),
        }
    };
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::tune::policy::Action;

    /// A queue directory laid out like sysfs's, in a temporary directory.
    fn fake_queue(root: &Path, name: &str, t: Tunables) -> Queue {
        let q = root.join(name);
        std::fs::create_dir_all(q.join("iosched")).unwrap();
        std::fs::write(q.join("scheduler"), "none [mq-deadline] kyber\n").unwrap();
        std::fs::write(q.join("nr_requests"), "256\n").unwrap();
        for (n, v) in Tunables::NAMES.iter().zip(t.values()) {
            std::fs::write(q.join("iosched").join(n), format!("{v}\n")).unwrap();
        }
        Queue::at(name, q)
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kml-tune-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const STOCK: Tunables = Tunables {
        fifo_batch: 16,
        writes_starved: 2,
        async_depth: 256,
    };

    #[test]
    fn leftover_of_a_dead_agent_is_restored_and_removed() {
        let root = tmp("restore");
        let changed = Tunables {
            fifo_batch: 4,
            writes_starved: 8,
            async_depth: 64,
        };
        let q = fake_queue(&root, "loopX", changed);
        let dir = root.join("state");
        let mut s = TuneState {
            device: "loopX".into(),
            dev: "7:9".into(),
            pid: u32::MAX, // no such process
            started_unix: 0,
            originals: STOCK,
            tags: 256,
            level: 2,
            applied: changed,
            decisions: vec![],
        };
        for i in 0..30 {
            s.log(
                Decision {
                    action: Action::Raise,
                    from_level: 0,
                    to_level: 1,
                    reason: format!("r{i}"),
                },
                "x".into(),
            );
        }
        assert_eq!(s.decisions.len(), KEPT_DECISIONS);
        assert_eq!(s.decisions.last().unwrap().decision.reason, "r29");
        s.save(&dir).unwrap();
        assert_eq!(TuneState::load(&TuneState::path(&dir, "loopX")).unwrap(), s);
        let got = restore_leftover(&dir, &q, "7:9").unwrap();
        assert_eq!(
            got,
            Leftover::Restored {
                pid: u32::MAX,
                change: "fifo_batch 4 -> 16, writes_starved 8 -> 2, async_depth 64 -> 256".into()
            }
        );
        assert_eq!(q.read().unwrap(), STOCK);
        assert!(!TuneState::path(&dir, "loopX").exists());
        assert_eq!(restore_leftover(&dir, &q, "7:9").unwrap(), Leftover::None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn another_disk_under_the_same_name_is_left_alone() {
        let root = tmp("stale");
        let changed = Tunables {
            fifo_batch: 4,
            ..STOCK
        };
        let q = fake_queue(&root, "loopY", changed);
        let dir = root.join("state");
        TuneState {
            device: "loopY".into(),
            dev: "7:1".into(),
            pid: u32::MAX,
            started_unix: 0,
            originals: STOCK,
            tags: 256,
            level: 1,
            applied: changed,
            decisions: vec![],
        }
        .save(&dir)
        .unwrap();
        assert!(matches!(
            restore_leftover(&dir, &q, "7:2").unwrap(),
            Leftover::Stale { .. }
        ));
        assert_eq!(q.read().unwrap(), changed);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_restarted_agent_restores_its_own_leftover() {
        let root = tmp("live");
        let q = fake_queue(&root, "loopZ", STOCK);
        let dir = root.join("state");
        // This test binary is not called kml-agent, so borrow nothing: use our own
        // pid, which restore treats as ours (the same agent restarting its loop).
        let s = TuneState {
            device: "loopZ".into(),
            dev: "7:3".into(),
            pid: std::process::id(),
            started_unix: 0,
            originals: STOCK,
            tags: 256,
            level: 0,
            applied: STOCK,
            decisions: vec![],
        };
        s.save(&dir).unwrap();
        assert!(matches!(
            restore_leftover(&dir, &q, "7:3").unwrap(),
            Leftover::Restored { .. }
        ));
        assert!(!crate::owner::agent_alive(std::process::id()));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
