//! What `record` and `run` share: pick the mode, load, add devices, attach;
//! stop on a signal; report losses.

use kml_ebpf_common::{Counter, Counters};

use crate::{
    devices::BlockDevice,
    kernel::caps::{AttachRequest, KernelReport},
    observe::{Observer, ObserverConfig},
};

/// Checks privileges and resolves `devices` (names or /dev paths; empty means every
/// mq-deadline disk) before anything is created or loaded.
pub fn resolve(devices: &[String]) -> anyhow::Result<Vec<BlockDevice>> {
    crate::kernel::caps::require_privileges()?;
    Ok(if devices.is_empty() {
        let all: Vec<BlockDevice> = crate::devices::list().into_iter().filter(BlockDevice::is_mq_deadline).collect();
        if all.is_empty() {
            anyhow::bail!(
                "no disk uses mq-deadline: pick one with --device, after `echo mq-deadline > /sys/block/DEV/queue/scheduler`"
            );
        }
        all
    } else {
        devices.iter().map(|d| BlockDevice::find(d)).collect::<anyhow::Result<_>>()?
    })
}

/// Loads the observer, adds `targets`, attaches.
pub fn start(targets: &[BlockDevice], attach: AttachRequest, ring_bytes: u32) -> anyhow::Result<Observer> {
    let mode = KernelReport::probe().choose(attach)?;
    let mut config = ObserverConfig::new(mode);
    config.ring_bytes = ring_bytes;
    let mut observer = Observer::load(config)?;
    for d in targets {
        observer.add_device(d)?;
    }
    observer.attach()?;
    Ok(observer)
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    })
}

/// Losses and oddities, derived from the counters and the map's live size.
#[derive(Clone, Debug, Default)]
pub struct LossReport {
    pub ring_full_drops: u64,
    pub orphan_completions: u64,
    pub issues_without_insert: u64,
    pub lru_evictions: u64,
    pub insert_failures: u64,
    pub read_failures: u64,
    pub still_in_flight: u64,
}

impl LossReport {
    pub fn new(c: &Counters, live: u64) -> LossReport {
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
        }
    }

    pub fn line(&self) -> String {
        format!(
            "drops {} | orphans {} | issues without insert {} | evictions {} | insert failures {} | read failures {} | in flight at stop {}",
            self.ring_full_drops,
            self.orphan_completions,
            self.issues_without_insert,
            self.lru_evictions,
            self.insert_failures,
            self.read_failures,
            self.still_in_flight
        )
    }
}
