//! What was lost, and why: the observers' counters and the in-flight map's live
//! size, read together at the end of a session (and once a second for `--metrics`).

use kml_ebpf_common::{Counter, Counters};

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
        }
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
