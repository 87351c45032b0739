//! The tuning policy: pure logic, no sysfs. From one window's statistics of a device
//! (what the model predicted for its reads, what happened, how fast it went) decide
//! whether to protect reads more, relax toward the original settings, or undo the
//! last change because it cost more than its budget.
//!
//! kml moves one *level* at a time. Each level is a fixed, explainable set of
//! mq-deadline tunables, clamped to a safe range derived from the device's original
//! values, so the worst a wrong model can do is the strongest level: short write
//! batches, reads may pass writes a bounded number of times, writes limited to a
//! share of the scheduler's tags. The expiries are never changed: they are the
//! deadlines the model predicts against (the operator's latency targets).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The mq-deadline tunables kml changes (`/sys/block/DEV/queue/iosched/*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunables {
    /// Requests dispatched in one direction before the direction is chosen again.
    pub fifo_batch: u32,
    /// Read batches that may pass waiting writes before a write batch must run.
    pub writes_starved: u32,
    /// Scheduler tags that writes and async requests may hold (the rest stay free
    /// for synchronous reads).
    pub async_depth: u32,
}

impl Tunables {
    /// The sysfs attribute names, in the order [`Tunables::values`] gives them.
    pub const NAMES: [&'static str; 3] = ["fifo_batch", "writes_starved", "async_depth"];

    pub fn values(&self) -> [u32; 3] {
        [self.fifo_batch, self.writes_starved, self.async_depth]
    }

    pub fn from_values(v: [u32; 3]) -> Tunables {
        Tunables {
            fifo_batch: v[0],
            writes_starved: v[1],
            async_depth: v[2],
        }
    }

    /// `fifo_batch 16 -> 8, writes_starved 2 -> 4` (only what differs).
    pub fn describe_change(&self, to: &Tunables) -> String {
        let parts: Vec<String> = Self::NAMES
            .iter()
            .zip(self.values().iter().zip(to.values()))
            .filter(|(_, (a, b))| *a != b)
            .map(|(n, (a, b))| format!("{n} {a} -> {b}"))
            .collect();
        if parts.is_empty() {
            "no change".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Inclusive bounds per tunable, from the device's originals: kml only ever makes
/// write batches shorter, lets reads pass writes more often (at most
/// [`MAX_WRITES_STARVED`] times), and gives writes fewer tags (never fewer than half
/// of `tags`, nor fewer than [`MIN_ASYNC_DEPTH`]).
///
/// `tags`: how many requests the device can hold at once, min(nr_requests, the
/// hardware queue's tags) ([`crate::act::tune::sysfs::Queue::tags`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafeRange {
    pub min: Tunables,
    pub max: Tunables,
}

pub const MAX_WRITES_STARVED: u32 = 16;
pub const MIN_ASYNC_DEPTH: u32 = 4;
/// The strongest level.
pub const MAX_LEVEL: u8 = 3;

impl SafeRange {
    pub fn of(originals: &Tunables, tags: u32) -> SafeRange {
        let o = originals;
        SafeRange {
            min: Tunables {
                fifo_batch: o.fifo_batch.min(1),
                writes_starved: o.writes_starved,
                async_depth: (tags / 2).max(MIN_ASYNC_DEPTH).min(o.async_depth),
            },
            max: Tunables {
                fifo_batch: o.fifo_batch,
                writes_starved: o.writes_starved.max(MAX_WRITES_STARVED),
                async_depth: o.async_depth,
            },
        }
    }

    pub fn clamp(&self, t: Tunables) -> Tunables {
        let (lo, hi, v) = (self.min.values(), self.max.values(), t.values());
        Tunables::from_values(std::array::from_fn(|i| v[i].clamp(lo[i], hi[i])))
    }

    pub fn contains(&self, t: &Tunables) -> bool {
        self.clamp(*t) == *t
    }
}

/// The settings of `level` (0: the originals) for a device, always inside
/// [`SafeRange::of`] the same originals.
pub fn settings(level: u8, originals: &Tunables, tags: u32) -> Tunables {
    let range = SafeRange::of(originals, tags);
    let o = originals;
    let t = match level {
        0 => return *o,
        // Shorter write batches, reads may pass writes more often.
        1 => Tunables {
            fifo_batch: o.fifo_batch.min(8),
            writes_starved: o.writes_starved.max(4),
            async_depth: o.async_depth,
        },
        // And writes may not hold more tags than the device has (a request keeps
        // its scheduler tag until it completes, so this bounds the writes queued
        // in the scheduler and the device ahead of a read)...
        2 => Tunables {
            fifo_batch: o.fifo_batch.min(4),
            writes_starved: o.writes_starved.max(8),
            async_depth: o.async_depth.min(tags),
        },
        // ... and at most half of them: the other half stays free for reads.
        _ => Tunables {
            fifo_batch: 1,
            writes_starved: o.writes_starved.max(MAX_WRITES_STARVED),
            async_depth: o.async_depth.min(tags / 2),
        },
    };
    range.clamp(t)
}

/// What one window of a device's completed requests says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub secs: f64,
    pub reads: u64,
    pub writes: u64,
    /// Reads the in-kernel model scored at insert, and those it flagged at risk.
    pub reads_scored: u64,
    pub reads_at_risk: u64,
    /// Reads and writes dispatched after their mq-deadline deadline.
    pub reads_missed: u64,
    pub writes_missed: u64,
    /// Insert → complete, ns.
    pub read_p99_ns: u64,
    pub write_p99_ns: u64,
    /// Bytes completed, both directions, and of them written.
    pub bytes: u64,
    pub write_bytes: u64,
}

/// Where the read risk of a window comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RiskSource {
    /// The in-kernel model's verdicts at insert.
    Model,
    /// No model scored the reads: the observed deadline misses stand in.
    Observed,
}

impl WindowStats {
    pub fn throughput(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Share of the bytes moved that were written: how much of the device's time
    /// writes take (a 128 KiB write costs more than a 4 KiB read).
    pub fn write_share(&self) -> f64 {
        self.write_bytes as f64 / self.bytes.max(1) as f64
    }

    /// Share of reads at risk: the model's verdicts when it scored at least half
    /// of the reads, else the observed misses.
    pub fn read_risk(&self) -> (f64, RiskSource) {
        let reads = self.reads.max(1) as f64;
        if self.reads_scored * 2 >= self.reads && self.reads_scored > 0 {
            (
                self.reads_at_risk as f64 / self.reads_scored as f64,
                RiskSource::Model,
            )
        } else {
            (self.reads_missed as f64 / reads, RiskSource::Observed)
        }
    }
}

/// Thresholds and budgets (documented in docs/tuning.md).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TuneConfig {
    /// Protect reads more when at least this share of them is predicted at risk.
    pub raise_at: f64,
    /// Relax one level after `calm_windows` windows below this share.
    pub relax_below: f64,
    pub calm_windows: u32,
    /// Fewer reads than this in a window: no read risk to act on.
    pub min_reads: u64,
    /// The tunables trade writes for reads: act only when writes are at least this
    /// share of the bytes.
    pub min_write_share: f64,
    /// Budgets of a change, checked on the next window against the window before:
    /// undo it when throughput fell by more than `throughput_budget` (a share) or
    /// the write p99 rose by more than `write_p99_budget` (a share).
    pub throughput_budget: f64,
    pub write_p99_budget: f64,
    /// Writes needed in both windows to judge the write p99.
    pub min_writes: u64,
    /// After an undo, no new step up for this long (doubling up to `max_holdoff`
    /// while undos repeat).
    pub holdoff: Duration,
    pub max_holdoff: Duration,
}

impl Default for TuneConfig {
    fn default() -> Self {
        TuneConfig {
            raise_at: 0.02,
            relax_below: 0.005,
            calm_windows: 3,
            min_reads: 50,
            min_write_share: 0.10,
            throughput_budget: 0.05,
            write_p99_budget: 0.30,
            min_writes: 20,
            holdoff: Duration::from_secs(30),
            max_holdoff: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// One level up: reads protected more.
    Raise,
    /// One level down, toward the originals.
    Relax,
    /// The last raise cost more than its budget: back to the level before.
    Undo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    pub from_level: u8,
    pub to_level: u8,
    pub reason: String,
}

/// A raise waiting for its verdict: the window before it is the baseline.
#[derive(Clone, Copy, Debug)]
struct Pending {
    from_level: u8,
    baseline: WindowStats,
}

/// The policy's state for one device.
#[derive(Clone, Debug)]
pub struct Policy {
    pub config: TuneConfig,
    level: u8,
    calm: u32,
    pending: Option<Pending>,
    holdoff_until: Option<Duration>,
    holdoff: Duration,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn ms(ns: u64) -> String {
    format!("{:.2}ms", ns as f64 / 1e6)
}

impl Policy {
    pub fn new(config: TuneConfig) -> Policy {
        Policy {
            config,
            level: 0,
            calm: 0,
            pending: None,
            holdoff_until: None,
            holdoff: config.holdoff,
        }
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    /// One window's decision; `now` is the time since tuning started. At most one
    /// level changes per window.
    pub fn decide(&mut self, now: Duration, w: &WindowStats) -> Option<Decision> {
        let c = self.config;
        if let Some(p) = self.pending.take() {
            if let Some(cost) = self.over_budget(&p.baseline, w) {
                let from = self.level;
                self.level = p.from_level;
                self.calm = 0;
                self.holdoff_until = Some(now + self.holdoff);
                let reason = format!("{cost}; no new raise for {}s", self.holdoff.as_secs());
                self.holdoff = (self.holdoff * 2).min(c.max_holdoff);
                return Some(Decision {
                    action: Action::Undo,
                    from_level: from,
                    to_level: self.level,
                    reason,
                });
            }
            // The raise paid for itself: undos start again from the short hold-off.
            self.holdoff = c.holdoff;
        }
        let (risk, source) = w.read_risk();
        let described = match source {
            RiskSource::Model => format!(
                "model: {} of reads predicted at risk (observed {} missed, read p99 {})",
                pct(risk),
                pct(w.reads_missed as f64 / w.reads.max(1) as f64),
                ms(w.read_p99_ns)
            ),
            RiskSource::Observed => format!(
                "no model verdicts: {} of reads missed their deadline (read p99 {})",
                pct(risk),
                ms(w.read_p99_ns)
            ),
        };
        let reads_matter = w.reads >= c.min_reads;
        if reads_matter && risk >= c.raise_at {
            self.calm = 0;
            let held = self.holdoff_until.is_some_and(|t| now < t);
            if self.level < MAX_LEVEL && w.write_share() >= c.min_write_share && !held {
                let from = self.level;
                self.level += 1;
                self.pending = Some(Pending {
                    from_level: from,
                    baseline: *w,
                });
                return Some(Decision {
                    action: Action::Raise,
                    from_level: from,
                    to_level: self.level,
                    reason: format!(
                        "{described} while writes are {} of the bytes",
                        pct(w.write_share())
                    ),
                });
            }
            return None;
        }
        if !reads_matter || risk < c.relax_below {
            self.calm += 1;
            if self.level > 0 && self.calm >= c.calm_windows {
                self.calm = 0;
                let from = self.level;
                self.level -= 1;
                let why = if reads_matter {
                    format!("{described} for {} windows", c.calm_windows)
                } else {
                    format!(
                        "fewer than {} reads per window for {} windows",
                        c.min_reads, c.calm_windows
                    )
                };
                return Some(Decision {
                    action: Action::Relax,
                    from_level: from,
                    to_level: self.level,
                    reason: why,
                });
            }
            return None;
        }
        self.calm = 0;
        None
    }

    /// Why the window `after` a raise breaks its budget against `before`, if it does.
    fn over_budget(&self, before: &WindowStats, after: &WindowStats) -> Option<String> {
        let c = &self.config;
        let (t0, t1) = (before.throughput(), after.throughput());
        if t0 > 0.0 && t1 < t0 * (1.0 - c.throughput_budget) {
            return Some(format!(
                "throughput fell {} ({:.1} -> {:.1} MB/s; budget {})",
                pct(1.0 - t1 / t0),
                t0 / 1e6,
                t1 / 1e6,
                pct(c.throughput_budget)
            ));
        }
        let judged = before.writes >= c.min_writes && after.writes >= c.min_writes;
        let (p0, p1) = (before.write_p99_ns, after.write_p99_ns);
        if judged && p0 > 0 && p1 as f64 > p0 as f64 * (1.0 + c.write_p99_budget) {
            return Some(format!(
                "write p99 rose {} ({} -> {}; budget {})",
                pct(p1 as f64 / p0 as f64 - 1.0),
                ms(p0),
                ms(p1),
                pct(c.write_p99_budget)
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STOCK: Tunables = Tunables {
        fifo_batch: 16,
        writes_starved: 2,
        async_depth: 256,
    };

    fn window(reads: u64, at_risk: u64, writes: u64, mbps: f64, write_p99_ms: u64) -> WindowStats {
        WindowStats {
            secs: 1.0,
            reads,
            writes,
            reads_scored: reads,
            reads_at_risk: at_risk,
            reads_missed: at_risk / 2,
            writes_missed: 0,
            read_p99_ns: 5_000_000,
            write_p99_ns: write_p99_ms * 1_000_000,
            bytes: (mbps * 1e6) as u64,
            write_bytes: (mbps * 1e6) as u64 * writes / (reads + writes).max(1),
        }
    }

    #[test]
    fn levels_are_monotone_and_level_zero_is_the_original() {
        assert_eq!(settings(0, &STOCK, 128), STOCK);
        let l: Vec<Tunables> = (0..=MAX_LEVEL).map(|l| settings(l, &STOCK, 128)).collect();
        for w in l.windows(2) {
            assert!(w[1].fifo_batch <= w[0].fifo_batch);
            assert!(w[1].writes_starved >= w[0].writes_starved);
            assert!(w[1].async_depth <= w[0].async_depth);
        }
        assert_eq!(
            l[3],
            Tunables {
                fifo_batch: 1,
                writes_starved: 16,
                async_depth: 64
            }
        );
        assert_eq!(
            STOCK.describe_change(&l[1]),
            "fifo_batch 16 -> 8, writes_starved 2 -> 4"
        );
    }

    #[test]
    fn raises_when_reads_at_risk_and_writes_compete() {
        let mut p = Policy::new(TuneConfig::default());
        let d = p
            .decide(Duration::from_secs(5), &window(1000, 100, 1000, 100.0, 10))
            .expect("raise");
        assert_eq!((d.action, d.from_level, d.to_level), (Action::Raise, 0, 1));
        assert!(
            d.reason.contains("10.0% of reads predicted at risk"),
            "{}",
            d.reason
        );
        // No writes: the tunables cannot help reads; nothing changes.
        let mut p = Policy::new(TuneConfig::default());
        assert_eq!(
            p.decide(Duration::from_secs(5), &window(1000, 100, 0, 100.0, 10)),
            None
        );
    }

    #[test]
    fn undoes_a_raise_that_costs_throughput_and_holds_off() {
        let mut p = Policy::new(TuneConfig::default());
        let risky = window(1000, 100, 1000, 100.0, 10);
        p.decide(Duration::from_secs(5), &risky).expect("raise");
        let slower = window(1000, 100, 1000, 90.0, 10);
        let d = p.decide(Duration::from_secs(10), &slower).expect("undo");
        assert_eq!((d.action, d.to_level), (Action::Undo, 0));
        assert!(d.reason.contains("throughput fell 10.0%"), "{}", d.reason);
        // Held off: still risky, no raise until 30 s later.
        assert_eq!(p.decide(Duration::from_secs(15), &risky), None);
        assert_eq!(
            p.decide(Duration::from_secs(41), &risky).map(|d| d.action),
            Some(Action::Raise)
        );
    }

    #[test]
    fn undoes_a_raise_that_slows_writes() {
        let mut p = Policy::new(TuneConfig::default());
        p.decide(Duration::ZERO, &window(1000, 100, 1000, 100.0, 10));
        let d = p
            .decide(Duration::from_secs(5), &window(1000, 100, 1000, 100.0, 14))
            .expect("undo");
        assert!(d.reason.contains("write p99 rose 40.0%"), "{}", d.reason);
    }

    #[test]
    fn relaxes_after_calm_windows() {
        let mut p = Policy::new(TuneConfig::default());
        p.decide(Duration::ZERO, &window(1000, 100, 1000, 100.0, 10));
        // The raise kept its budget; then calm.
        let calm = window(1000, 1, 1000, 100.0, 10);
        assert_eq!(p.decide(Duration::from_secs(5), &calm), None);
        assert_eq!(p.decide(Duration::from_secs(10), &calm), None);
        let d = p.decide(Duration::from_secs(15), &calm).expect("relax");
        assert_eq!((d.action, d.to_level), (Action::Relax, 0));
    }

    #[test]
    fn observed_misses_stand_in_without_a_model() {
        let mut w = window(1000, 0, 1000, 100.0, 10);
        w.reads_scored = 0;
        w.reads_missed = 300;
        assert_eq!(w.read_risk(), (0.3, RiskSource::Observed));
    }

    /// Any window, every field drawn on its own: the write p99 independently of
    /// the read p99, the bytes independently of the counts, and both often equal
    /// to a fixed value, so that consecutive windows differ in one budget at a time
    /// (each undo path runs, not only the throughput one).
    fn any_window() -> impl Strategy<Value = WindowStats> {
        let p99 = prop_oneof![1 => Just(4_000_000u64), 3 => 1u64..1 << 30];
        let bytes = prop_oneof![1 => Just(1u64 << 26), 3 => 1u64..1 << 30];
        (
            (0u64..5000, 0u64..5000, 0u64..5000, 0u64..5000, 0u64..5000),
            (p99.clone(), p99, bytes, 0u64..=100),
        )
            .prop_map(
                |(
                    (reads, scored, risk, missed, writes),
                    (read_p99, write_p99, bytes, write_pct),
                )| {
                    WindowStats {
                        secs: 1.0,
                        reads,
                        writes,
                        reads_scored: scored.min(reads),
                        reads_at_risk: risk.min(scored.min(reads)),
                        reads_missed: missed.min(reads),
                        writes_missed: missed.min(writes),
                        read_p99_ns: read_p99,
                        write_p99_ns: write_p99,
                        bytes,
                        write_bytes: bytes / 100 * write_pct,
                    }
                },
            )
    }

    /// docs/tuning.md's budget rule, stated on its own: a raise is undone on the
    /// next window when throughput fell by more than 5%, or, with at least 20
    /// writes in both windows, the write p99 rose by more than 30%.
    fn documented_over_budget(before: &WindowStats, after: &WindowStats) -> bool {
        let (t0, t1) = (before.throughput(), after.throughput());
        let fell = t0 > 0.0 && t1 < t0 * 0.95;
        let judged = before.writes >= 20 && after.writes >= 20;
        let rose = judged
            && before.write_p99_ns > 0
            && after.write_p99_ns as f64 > before.write_p99_ns as f64 * 1.30;
        fell || rose
    }

    #[test]
    fn the_window_generator_runs_both_undo_paths() {
        use proptest::{strategy::ValueTree as _, test_runner::TestRunner};
        let mut runner = TestRunner::deterministic();
        let (mut by_throughput, mut by_write_p99) = (0, 0);
        for _ in 0..2000 {
            let a = any_window().new_tree(&mut runner).unwrap().current();
            let b = any_window().new_tree(&mut runner).unwrap().current();
            if !documented_over_budget(&a, &b) {
                continue;
            }
            if b.throughput() < a.throughput() * 0.95 {
                by_throughput += 1;
            } else {
                by_write_p99 += 1;
            }
        }
        assert!(
            by_throughput > 100 && by_write_p99 > 100,
            "undo by throughput {by_throughput}, by write p99 {by_write_p99} of 2000 pairs"
        );
    }

    proptest! {
        #[test]
        fn every_level_stays_in_the_safe_range(
            fifo in 0u32..256, starved in 0u32..32, depth in 1u32..4096, nr in 1u32..4096,
            level in 0u8..=MAX_LEVEL,
        ) {
            let o = Tunables { fifo_batch: fifo, writes_starved: starved, async_depth: depth };
            let range = SafeRange::of(&o, nr);
            prop_assert!(range.contains(&o));
            prop_assert!(range.contains(&settings(level, &o, nr)));
        }

        /// One level at a time; and the window after a raise undoes it exactly
        /// when the documented budget rule says it broke its budget, naming which.
        #[test]
        fn any_sequence_moves_one_level_at_a_time(ws in proptest::collection::vec(any_window(), 1..60)) {
            let mut p = Policy::new(TuneConfig::default());
            let mut raised_on: Option<WindowStats> = None;
            for (i, w) in ws.iter().enumerate() {
                let before = p.level();
                let decision = p.decide(Duration::from_secs(5 * i as u64), w);
                if let Some(baseline) = raised_on.take() {
                    let undo = decision.as_ref().is_some_and(|d| d.action == Action::Undo);
                    prop_assert_eq!(undo, documented_over_budget(&baseline, w),
                        "after a raise on {:?}, window {:?} gave {:?}", baseline, w, decision);
                    if let Some(d) = decision.as_ref().filter(|_| undo) {
                        prop_assert!(d.reason.contains("throughput fell") || d.reason.contains("write p99 rose"), "{}", d.reason);
                    }
                }
                if let Some(d) = &decision {
                    prop_assert_eq!(d.from_level, before);
                    prop_assert_eq!(d.to_level, p.level());
                    prop_assert!(d.from_level.abs_diff(d.to_level) == 1);
                    if d.action == Action::Raise {
                        raised_on = Some(*w);
                    }
                } else {
                    prop_assert_eq!(p.level(), before);
                }
                prop_assert!(p.level() <= MAX_LEVEL);
            }
        }
    }
}
