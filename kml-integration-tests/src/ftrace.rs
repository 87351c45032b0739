//! A witness without BPF: the kernel's own trace buffer (tracefs) counting one
//! block event on one device.
//!
//! The kernel does not always run a BPF program attached to a tracepoint, and
//! does not always count the runs it skipped (kml-ebpf's `lifecycle::stale`), so
//! bpftrace is no witness for those. ftrace's probe on the same tracepoint is
//! called beside the BPF ones, with no such rule. A private trace instance
//! (`instances/NAME`) keeps its buffer apart from anyone else's; it is removed on
//! drop, also when a test fails.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};
use kml_agent::kernel::tracefs::Tracefs;

/// Buffer per CPU: ~60 bytes an event, room for a million.
const BUFFER_KIB: u64 = 64 * 1024;

/// One event (`block/block_rq_complete`) of one device, recorded into a trace
/// instance of its own from [`EventCount::start`] until [`EventCount::count`].
pub struct EventCount {
    dir: PathBuf,
    event: String,
}

impl EventCount {
    /// Starts recording `category/name` (e.g. `block/block_rq_complete`) where
    /// its `dev` field is `dev` (the kernel's dev_t, major << 20 | minor).
    pub fn start(category_and_name: &str, dev: u32) -> Result<EventCount> {
        // Found where it is mounted, or mounted (as the agent does).
        let tracefs = Tracefs::locate_or_mount().context("tracefs, for the ftrace witness")?;
        let root = tracefs.root();
        ensure!(
            root.join("instances").is_dir(),
            "{}/instances is missing: the kernel has no trace instances",
            root.display()
        );
        let name = format!("kml-test-{}-{}", std::process::id(), crate::unique());
        let dir = root.join("instances").join(&name);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let count = EventCount {
            dir,
            event: category_and_name.to_owned(),
        };
        count.write("tracing_on", "0")?;
        count.write("buffer_size_kb", &BUFFER_KIB.to_string())?;
        let event = Path::new("events").join(category_and_name);
        count.write(event.join("filter"), &format!("dev == {dev}"))?;
        count.write(event.join("enable"), "1")?;
        count.write("tracing_on", "1")?;
        Ok(count)
    }

    fn write(&self, file: impl AsRef<Path>, value: &str) -> Result<()> {
        let p = self.dir.join(file);
        std::fs::write(&p, value).with_context(|| format!("writing {value} to {}", p.display()))
    }

    /// Stops recording and counts the events recorded. Fails when the buffer
    /// overran (an event lost), so the count is exact or there is none.
    pub fn count(self) -> Result<u64> {
        self.write("tracing_on", "0")?;
        let mut overrun = 0u64;
        for cpu in std::fs::read_dir(self.dir.join("per_cpu"))? {
            let stats = std::fs::read_to_string(cpu?.path().join("stats"))?;
            overrun += stats
                .lines()
                .filter_map(|l| l.strip_prefix("overrun: "))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
        ensure!(
            overrun == 0,
            "the trace buffer of {} overran: {overrun} events lost",
            self.event
        );
        let name = self.event.rsplit('/').next().unwrap_or(&self.event);
        let tag = format!(" {name}: ");
        let text = std::fs::read_to_string(self.dir.join("trace"))?;
        Ok(text.lines().filter(|l| l.contains(&tag)).count() as u64)
    }
}

impl Drop for EventCount {
    fn drop(&mut self) {
        let _ = self.write("tracing_on", "0");
        let event = Path::new("events").join(&self.event);
        let _ = self.write(event.join("enable"), "0");
        // An instance with its buffer goes with its directory.
        let _ = std::fs::remove_dir(&self.dir);
    }
}
