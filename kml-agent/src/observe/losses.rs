//! What was lost, and why: the observers' counters and the in-flight map's live
//! size, read together at the end of a session (and once a second for `--metrics`).

use std::collections::BTreeMap;

use kml_ebpf_common::{Counter, Counters, DeviceEvents};

/// Losses and oddities, derived from the counters and the map's live size.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LossReport {
    pub ring_full_drops: u64,
    pub orphan_completions: u64,
    pub issues_without_insert: u64,
    pub lru_evictions: u64,
    pub insert_failures: u64,
    pub read_failures: u64,
    pub still_in_flight: u64,
    /// Not a loss: queued requests merged into another (their I/O is in that record).
    pub merges: u64,
    /// Tracepoint hits the kernel did not run a program for (it would have nested
    /// in itself on one CPU): completions or inserts kml never saw.
    pub missed_events: u64,
    /// Entries dropped because their key came back without a completion.
    pub stale_entries: u64,
    /// Every counter of the programs by name, summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
    /// Per traced device: its name and its event counts by name.
    pub devices: Vec<(String, BTreeMap<&'static str, u64>)>,
}

impl LossReport {
    /// `missed_events`: the programs' recursion misses (see
    /// [`super::Observer::program_stats`]).
    pub fn new(c: &Counters, live: u64, missed_events: u64) -> LossReport {
        let added = c.get(Counter::InflightAdded);
        let removed = c.get(Counter::InflightRemoved);
        LossReport {
            ring_full_drops: c.get(Counter::RingFullDrops),
            orphan_completions: c.get(Counter::OrphanCompletions),
            issues_without_insert: c.get(Counter::IssuesWithoutInsert),
            lru_evictions: added.saturating_sub(removed).saturating_sub(live),
            insert_failures: c.get(Counter::InflightInsertFailures),
            read_failures: c.get(Counter::ReadFailures),
            still_in_flight: live,
            merges: c.get(Counter::Merges),
            missed_events,
            stale_entries: c.get(Counter::StaleEntries),
            counters: Counters::ALL
                .iter()
                .map(|k| (k.name(), c.get(*k)))
                .collect(),
            devices: Vec::new(),
        }
    }

    /// Adds a device's event counts.
    pub fn add_device(&mut self, name: &str, e: &DeviceEvents) {
        let events = DeviceEvents::ALL
            .iter()
            .map(|k| (k.name(), e.get(*k)))
            .collect();
        self.devices.push((name.to_owned(), events));
    }

    /// Every counter by name (`name value`, comma-separated), then one line per
    /// device: what a user needs to account for every I/O (records, request and bio
    /// merges, flushes and the fsyncs behind them, sampled-out and partial
    /// completions among the rest).
    pub fn counter_lines(&self) -> Vec<String> {
        let join = |m: &BTreeMap<&'static str, u64>,
                    order: &mut dyn Iterator<Item = &'static str>| {
            order
                .map(|k| format!("{k} {}", m.get(k).copied().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = vec![format!(
            "counters: {}",
            join(&self.counters, &mut Counters::ALL.iter().map(|k| k.name()))
        )];
        for (name, events) in &self.devices {
            out.push(format!(
                "{name}: {}",
                join(events, &mut DeviceEvents::ALL.iter().map(|k| k.name()))
            ));
        }
        if self.stale_entries > 0 {
            // What an operator cannot guess from the count alone.
            out.push(format!(
                "stale entries {}: requests whose completion no program saw (raw tracepoints: \
                 the kernel ran none for it and counted no miss; classic tracepoints also: two \
                 requests queued at one sector); their records carry complete_ns 0 \
                 (docs/design.md, \"Nothing is lost silently\")",
                self.stale_entries
            ));
        }
        out
    }

    pub fn line(&self) -> String {
        format!(
            "drops {} | orphans {} | issues without insert {} | evictions {} | insert failures {} | read failures {} | missed events {} | stale entries {} | in flight at stop {} | merged {}",
            self.ring_full_drops,
            self.orphan_completions,
            self.issues_without_insert,
            self.lru_evictions,
            self.insert_failures,
            self.read_failures,
            self.missed_events,
            self.stale_entries,
            self.still_in_flight,
            self.merges
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_entries_are_explained_only_when_there_are_some() {
        let mut c = Counters::default();
        let quiet = LossReport::new(&c, 0, 0).counter_lines();
        assert!(quiet.iter().all(|l| !l.starts_with("stale entries")));
        c.stale_entries = 3;
        let lines = LossReport::new(&c, 0, 0).counter_lines();
        let hint = lines.last().expect("a line");
        assert!(hint.starts_with("stale entries 3: ") && hint.contains("complete_ns 0"));
        // Not the summary line the tests and scripts parse (it holds `drops`).
        assert!(!hint.contains("drops "));
    }
}
