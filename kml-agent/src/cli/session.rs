//! What `record` and `run` share: pick the mode, load, add devices, attach;
//! stop on a signal; report losses.

use kml_ebpf_common::{Counter, Counters};

use crate::{
    devices::BlockDevice,
    kernel::caps::{AttachMode, AttachRequest, KernelReport},
    observe::{Observer, ObserverConfig},
};

/// Checks privileges and resolves `devices` (names or /dev paths; empty means every
/// mq-deadline disk) before anything is created or loaded.
pub fn resolve(devices: &[String]) -> anyhow::Result<Vec<BlockDevice>> {
    crate::kernel::caps::require_privileges()?;
    Ok(if devices.is_empty() {
        let all: Vec<BlockDevice> = crate::devices::list()
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

/// How to observe: the options `record` and `run` share.
#[derive(clap::Args, Debug, Clone)]
pub struct ObserveArgs {
    /// How to attach: auto picks raw tracepoints when BTF allows, else tracepoints,
    /// and (`run`) adds the verdict hook on a kernel with kml's mq-deadline patch.
    #[arg(long, value_enum, default_value_t = AttachRequest::Auto)]
    pub attach: AttachRequest,
    /// Ring buffer size (power of two: 1M, 8M, 64M).
    #[arg(long, value_parser = super::parse_size, default_value = "8M")]
    pub ring_size: u32,
}

/// Runs an async command on a current-thread runtime (one core for the agent).
pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// Loads the observer, adds `targets`, attaches.
pub fn start(targets: &[BlockDevice], how: &ObserveArgs) -> anyhow::Result<Observer> {
    start_with(targets, how, |_| {})
}

/// [`start`], with a last say on the configuration.
pub fn start_with(
    targets: &[BlockDevice],
    how: &ObserveArgs,
    adjust: impl FnOnce(&mut ObserverConfig),
) -> anyhow::Result<Observer> {
    let mode = KernelReport::probe().choose(how.attach)?;
    start_in(mode, targets, how, adjust)
}

/// [`start_with`] in a mode the caller chose.
pub fn start_in(
    mode: AttachMode,
    targets: &[BlockDevice],
    how: &ObserveArgs,
    adjust: impl FnOnce(&mut ObserverConfig),
) -> anyhow::Result<Observer> {
    let mut config = ObserverConfig::new(mode);
    config.ring_bytes = how.ring_size;
    adjust(&mut config);
    let mut observer = Observer::load(config)?;
    for d in targets {
        observer.add_device(d)?;
    }
    observer.attach()?;
    Ok(observer)
}

/// [`start_in`] with `--pin`: every map and link pinned under `dir`, adopting
/// what a killed agent left there when it can (see [`crate::adopt`]). The devices
/// the adopted programs traced that are not in `targets` stop being traced.
pub fn start_pinned(
    mode: AttachMode,
    targets: &[BlockDevice],
    how: &ObserveArgs,
    adjust: impl FnOnce(&mut ObserverConfig),
    dir: &std::path::Path,
) -> anyhow::Result<(Observer, crate::observe::PinOutcome)> {
    let mut config = ObserverConfig::new(mode);
    config.ring_bytes = how.ring_size;
    adjust(&mut config);
    let (mut observer, outcome) = Observer::load_pinned(config, dir)?;
    let wanted: Vec<u32> = targets.iter().map(BlockDevice::dev).collect();
    for dev in observer.kernel_devices()? {
        if !wanted.contains(&dev) {
            let stale = observer.remove_device(dev)?;
            let (major, minor) = kml_ebpf_common::kernel_dev_split(dev);
            tracing::info!("no longer tracing {major}:{minor} (traced by the adopted programs, not asked for now; {stale} in-flight entries dropped)");
        }
    }
    for d in targets {
        observer.add_device(d)?;
    }
    observer.attach()?;
    Ok((observer, outcome))
}

/// Losses at the end of a session.
pub fn losses(observer: &Observer) -> anyhow::Result<LossReport> {
    losses_of(observer, &observer.counters()?, &observer.program_stats()?)
}

/// Losses from counters and program statistics already read.
pub fn losses_of(
    observer: &Observer,
    counters: &Counters,
    programs: &[crate::observe::ProgramStats],
) -> anyhow::Result<LossReport> {
    let missed = programs.iter().map(|p| p.recursion_misses).sum();
    Ok(LossReport::new(counters, observer.live_inflight()?, missed))
}

/// Resolves on SIGINT or SIGTERM, with the signal's name. The handlers are
/// installed when this is called (not when first awaited), so a signal sent right
/// after the agent says it is ready still stops it cleanly.
pub fn shutdown_signal() -> impl std::future::Future<Output = anyhow::Result<&'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        let (mut int, mut term) = (int?, term?);
        Ok(tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        })
    }
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
    /// Not a loss: queued requests merged into another (their I/O is in that record).
    pub merges: u64,
    /// Tracepoint hits the kernel did not run a program for (it would have nested
    /// in itself on one CPU): completions or inserts kml never saw.
    pub missed_events: u64,
    /// Entries dropped because their key came back without a completion.
    pub stale_entries: u64,
}

impl LossReport {
    /// `missed_events`: the programs' recursion misses (see [`Observer::program_stats`]).
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
