//! `run --tune`: act on a stock kernel through mq-deadline's tunables.
//!
//! observe (records of each window) → [`WindowStats`] → [`policy::Policy`] (one level
//! up or down, or undo) → [`sysfs::Queue::write`] (checked read-back) → the state file
//! ([`state::TuneState`]). The originals are saved before the first change and put
//! back when the tuner is dropped (clean exit, SIGTERM, error, panic); a killed
//! agent's successor puts them back from the state file.

pub mod policy;
pub mod state;
pub mod sysfs;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use kml_ebpf_common::{op::Direction, RequestRecord, Verdict};

use crate::devices::BlockDevice;
use policy::{Action, Decision, Policy, TuneConfig, WindowStats};
use state::{Leftover, TuneState};
use sysfs::Queue;

/// Log-linear latency histogram: 16 buckets per power of two (≤ 6.25% error),
/// constant memory whatever the record rate.
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64; Self::BUCKETS]>,
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: Box::new([0; Self::BUCKETS]),
            total: 0,
        }
    }
}

impl LatencyHistogram {
    const SUB_BITS: u32 = 4;
    const BUCKETS: usize = 16 + (64 - Self::SUB_BITS as usize) * 16;

    fn bucket(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let sub = (v >> (exp - Self::SUB_BITS)) & 15;
        16 + (exp - Self::SUB_BITS) as usize * 16 + sub as usize
    }

    /// The largest value of bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let exp = (i - 16) / 16 + Self::SUB_BITS as usize;
        let sub = ((i - 16) % 16) as u64;
        let base = (16 + sub) << (exp - Self::SUB_BITS as usize);
        base + (1u64 << (exp - Self::SUB_BITS as usize)) - 1
    }

    pub fn add(&mut self, v: u64) {
        self.counts[Self::bucket(v)] += 1;
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// Upper bound of the bucket holding the nearest-rank `q` percentile.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i);
            }
        }
        Self::upper(Self::BUCKETS - 1)
    }
}

/// One device's requests of the current window.
#[derive(Default)]
struct WindowAccumulator {
    stats: WindowStats,
    read_latency: LatencyHistogram,
    write_latency: LatencyHistogram,
}

impl WindowAccumulator {
    fn add(&mut self, r: &RequestRecord) {
        if r.complete_ns == 0 {
            // Completion never seen (a stale entry's record): no latency to judge.
            return;
        }
        let s = &mut self.stats;
        let latency = r.complete_ns.saturating_sub(r.insert_ns);
        s.bytes += r.nr_sectors as u64 * 512;
        match r.op().direction() {
            Direction::Read => {
                s.reads += 1;
                if r.verdict != Verdict::NONE {
                    s.reads_scored += 1;
                }
                if r.verdict == Verdict::AT_RISK {
                    s.reads_at_risk += 1;
                }
                if r.deadline_missed() {
                    s.reads_missed += 1;
                }
                self.read_latency.add(latency);
            }
            Direction::Write => {
                s.writes += 1;
                s.write_bytes += r.nr_sectors as u64 * 512;
                if r.deadline_missed() {
                    s.writes_missed += 1;
                }
                self.write_latency.add(latency);
            }
        }
    }

    fn finish(&mut self, secs: f64) -> WindowStats {
        let mut s = std::mem::take(&mut self.stats);
        s.secs = secs;
        s.read_p99_ns = self.read_latency.percentile(99.0);
        s.write_p99_ns = self.write_latency.percentile(99.0);
        self.read_latency = LatencyHistogram::default();
        self.write_latency = LatencyHistogram::default();
        s
    }
}

/// Tunes one device; restores its originals when dropped.
pub struct DeviceTuner {
    queue: Queue,
    dev: u32,
    state: TuneState,
    state_dir: PathBuf,
    policy: Policy,
    window: WindowAccumulator,
    window_started: Instant,
    started: Instant,
    every: Duration,
    /// False once the device is gone or left mq-deadline: nothing more to do.
    active: bool,
}

/// One applied decision, for the caller to print.
pub struct Applied {
    pub device: String,
    pub decision: Decision,
    pub change: String,
}

impl DeviceTuner {
    /// Restores what a killed agent left for the device, saves the originals, and
    /// starts at level 0 (nothing changed yet).
    pub fn start(
        device: &BlockDevice,
        every: Duration,
        config: TuneConfig,
    ) -> anyhow::Result<DeviceTuner> {
        let queue = Queue::of(&device.name);
        let dev_id = format!("{}:{}", device.major, device.minor);
        let state_dir = state::state_dir();
        match state::restore_leftover(&state_dir, &queue, &dev_id)? {
            Leftover::None => {}
            Leftover::Restored { pid, change } => tracing::warn!(
                "{}: restored the original tunables a killed agent (pid {pid}) left changed: {change}",
                device.name
            ),
            Leftover::Stale { why } => {
                tracing::warn!("{}: dropped a stale tuning state: {why}", device.name)
            }
        }
        let originals = queue.read()?;
        let tags = queue.tags()?;
        let state = TuneState {
            device: device.name.clone(),
            dev: dev_id,
            pid: std::process::id(),
            started_unix: state::unix_now(),
            originals,
            tags,
            level: 0,
            applied: originals,
            decisions: Vec::new(),
        };
        // Saved before anything changes, so a successor can always restore.
        state.save(&state_dir)?;
        Ok(DeviceTuner {
            queue,
            dev: device.dev(),
            state,
            state_dir,
            policy: Policy::new(config),
            window: WindowAccumulator::default(),
            window_started: Instant::now(),
            started: Instant::now(),
            every,
            active: true,
        })
    }

    pub fn device(&self) -> &str {
        &self.queue.device
    }

    pub fn observe(&mut self, records: &[RequestRecord]) {
        for r in records.iter().filter(|r| r.dev == self.dev) {
            self.window.add(r);
        }
    }

    /// At the end of a window: decide, apply, log. Errors leave the device at its
    /// originals (best effort) and stop tuning it.
    pub fn tick(&mut self) -> anyhow::Result<Option<Applied>> {
        if !self.active || self.window_started.elapsed() < self.every {
            return Ok(None);
        }
        let secs = self.window_started.elapsed().as_secs_f64();
        self.window_started = Instant::now();
        let stats = self.window.finish(secs);
        tracing::debug!("{}: window {stats:?}", self.queue.device);
        let Some(decision) = self.policy.decide(self.started.elapsed(), &stats) else {
            return Ok(None);
        };
        let to = policy::settings(decision.to_level, &self.state.originals, self.state.tags);
        let change = self.state.applied.describe_change(&to);
        if let Err(e) = self.queue.write(&self.state.applied, &to) {
            self.active = false;
            let _ = self.restore();
            return Err(e.context(format!("{}: tuning stopped", self.queue.device)));
        }
        self.state.applied = to;
        self.state.level = decision.to_level;
        self.state.log(decision.clone(), change.clone());
        self.state.save(&self.state_dir)?;
        Ok(Some(Applied {
            device: self.queue.device.clone(),
            decision,
            change,
        }))
    }

    /// Puts the originals back and removes the state file.
    fn restore(&mut self) -> anyhow::Result<String> {
        let path = TuneState::path(&self.state_dir, &self.queue.device);
        let mut change = "no change".to_owned();
        if self.queue.is_mq_deadline() {
            let now = self.queue.read()?;
            change = now.describe_change(&self.state.originals);
            self.queue.write(&now, &self.state.originals)?;
            self.state.applied = self.state.originals;
        }
        std::fs::remove_file(&path).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        Ok(change)
    }
}

impl Drop for DeviceTuner {
    fn drop(&mut self) {
        match self.restore() {
            Ok(change) => tracing::info!(
                "{}: original tunables restored ({change})",
                self.queue.device
            ),
            Err(e) => tracing::error!(
                "{}: could not restore the original tunables: {e:#}; \
                 `kml-agent restore --device {}` retries from {}",
                self.queue.device,
                self.queue.device,
                TuneState::path(&self.state_dir, &self.queue.device).display()
            ),
        }
    }
}

/// The tuners of every traced device.
#[derive(Default)]
pub struct Tuners(Vec<DeviceTuner>);

impl Tuners {
    pub fn start(
        devices: &[BlockDevice],
        every: Duration,
        config: TuneConfig,
    ) -> anyhow::Result<Tuners> {
        let mut t = Tuners::default();
        for d in devices {
            // On an error the tuners started so far restore their devices on drop.
            t.0.push(DeviceTuner::start(d, every, config)?);
        }
        Ok(t)
    }

    pub fn observe(&mut self, records: &[RequestRecord]) {
        for t in &mut self.0 {
            t.observe(records);
        }
    }

    /// Each device's decision of this tick, logged as it is applied; returns the
    /// decisions applied (their log lines).
    pub fn tick(&mut self) -> Vec<String> {
        let mut applied = Vec::new();
        for t in &mut self.0 {
            match t.tick() {
                Ok(Some(a)) => {
                    let line = a.line();
                    tracing::info!("{line}");
                    applied.push(line);
                }
                Ok(None) => {}
                Err(e) => tracing::error!("{e:#}"),
            }
        }
        applied
    }
}

impl Applied {
    pub fn line(&self) -> String {
        let verb = match self.decision.action {
            Action::Raise => "raise",
            Action::Relax => "relax",
            Action::Undo => "undo",
        };
        format!(
            "tune {}: {verb} level {} -> {}: {} ({})",
            self.device,
            self.decision.from_level,
            self.decision.to_level,
            self.change,
            self.decision.reason
        )
    }
}

/// `kml-agent restore`: originals left by killed agents, put back.
pub fn restore_all(device: Option<&str>) -> anyhow::Result<Vec<String>> {
    let dir = state::state_dir();
    let mut done = Vec::new();
    for (path, state) in TuneState::all(&dir) {
        let state = state?;
        if device.is_some_and(|d| d != state.device) {
            continue;
        }
        let queue = Queue::of(&state.device);
        let current = BlockDevice::read(&state.device)
            .map(|d| format!("{}:{}", d.major, d.minor))
            .unwrap_or_default();
        let line = match state::restore_leftover(&dir, &queue, &current) {
            Ok(Leftover::Restored { pid, change }) => {
                format!(
                    "{}: restored what pid {pid} changed: {change}",
                    state.device
                )
            }
            Ok(Leftover::Stale { why }) => format!("{}: nothing to restore: {why}", state.device),
            Ok(Leftover::None) => continue,
            Err(e) => {
                anyhow::bail!("{}: {e:#}", path.display())
            }
        };
        done.push(line);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn histogram_small_values_are_exact() {
        let mut h = LatencyHistogram::default();
        for v in 0..16 {
            h.add(v);
        }
        assert_eq!(h.percentile(50.0), 7);
        assert_eq!(h.percentile(100.0), 15);
        assert_eq!(LatencyHistogram::default().percentile(99.0), 0);
    }

    proptest! {
        #[test]
        fn histogram_percentile_is_within_a_sixteenth(mut v in proptest::collection::vec(0u64..1 << 40, 1..500), q in 1.0f64..100.0) {
            let mut h = LatencyHistogram::default();
            for &x in &v { h.add(x); }
            v.sort_unstable();
            let exact = crate::stats::percentile(&v, q).unwrap();
            let got = h.percentile(q);
            prop_assert!(got >= exact, "{got} < {exact}");
            prop_assert!(got as f64 <= exact as f64 * (1.0 + 1.0 / 16.0) + 1.0, "{got} vs {exact}");
        }
    }

    #[test]
    fn window_counts_by_direction_and_verdict() {
        let mut w = WindowAccumulator::default();
        let rec = |op: u8, verdict: u8, missed: bool| RequestRecord {
            insert_ns: 1000,
            issue_ns: if missed { 3000 } else { 1500 },
            complete_ns: 4000,
            deadline_ns: 2000,
            op,
            verdict,
            nr_sectors: 8,
            ..Default::default()
        };
        for r in [
            rec(0, Verdict::AT_RISK, true),
            rec(0, Verdict::MEETS, false),
            rec(0, Verdict::NONE, false),
            rec(1, Verdict::AT_RISK, true),
        ] {
            w.add(&r);
        }
        let s = w.finish(2.0);
        assert_eq!(
            (
                s.reads,
                s.reads_scored,
                s.reads_at_risk,
                s.reads_missed,
                s.writes,
                s.writes_missed
            ),
            (3, 2, 1, 1, 1, 1)
        );
        assert_eq!(s.throughput(), 4.0 * 4096.0 / 2.0);
        assert_eq!(
            s.read_p99_ns,
            LatencyHistogram::upper(LatencyHistogram::bucket(3000))
        );
        assert_eq!(w.finish(1.0).reads, 0);
    }
}
