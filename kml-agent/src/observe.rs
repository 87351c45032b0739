//! Loads kml's eBPF object, configures it for this kernel and these devices,
//! attaches one set of programs. Dropping the [`Observer`] detaches everything
//! and frees the maps (removing the pins, with `--pin`), also when a caller fails
//! midway.
//!
//! The stage's parts: [`pins`] (`--pin`: what outlives the agent, and adopting it),
//! [`ring`] (the ring buffer → records), [`batches`] (records staged per CPU on
//! their way to the ring), [`losses`] (what the counters say was
//! lost), [`hotplug`] (disks that come and go while the observer runs).

pub mod batches;
pub mod hotplug;
pub mod losses;
pub mod pins;
pub mod ring;

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        RawTracePoint, TracePoint,
    },
    Ebpf,
};
use kml_ebpf_common::{
    abi::names::{global, map, program, Event, EVENTS, RAW_STAGES, TP_STAGES},
    device::{Control, DeviceSlot, ReqState, MAX_DEVICES},
    position::{bucket_shift_for, QueueShape},
    Counter, Counters, DeviceConfig, DeviceEvents, DeviceState, InflightKey,
};

use crate::sys::prog_info;
use crate::{
    devices::BlockDevice,
    kernel::{attach::AttachMode, layout},
    object::{self, ebpf_object, map_mut, program, HookGlobals},
};
use losses::LossReport;
use pins::PinMeta;
use ring::RecordStream;

/// Sizes and policies of the observer.
#[derive(Clone, Debug)]
pub struct ObserverConfig {
    pub mode: AttachMode,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Wake the agent once this many bytes wait; 0 wakes it for every record.
    pub wakeup_bytes: u32,
    /// How often the agent collects what has not triggered a wake-up.
    pub poll_interval: Duration,
    /// Drop mode: past this ring fill (bytes), keep only records near the model's
    /// decision boundary. `None`: lossless mode (never sample).
    pub sample_fill_bytes: Option<u32>,
    /// Also prepare the verdict program for the patched mq-deadline's hook (its
    /// globals are set at load; `act::hook::attach` attaches it). Raw
    /// tracepoint mode only: the program finds the model's verdict by `struct request *`.
    pub hook: Option<HookGlobals>,
    /// Record every request's position in the queue, model or not (by default
    /// the programs keep the position state only while a model is active; the
    /// host replays positions from the records for training).
    pub position_always: bool,
    /// Read each request's I/O priority at insert (`KernelLayout::read_ioprio`):
    /// on by default (a trace has the column); `run` turns it off.
    pub read_ioprio: bool,
    /// The raw tracepoint layout, when the caller has read it from BTF already
    /// (`KernelReport::raw_layout`): one parse of the kernel's BTF, not two.
    pub raw_layout: Option<kml_ebpf_common::RawTpLayout>,
}

impl ObserverConfig {
    pub fn new(mode: AttachMode) -> Self {
        ObserverConfig {
            mode,
            ring_bytes: 8 << 20,
            // A wake-up costs the agent about 30 µs: at 256 KiB (290 a second at
            // 150k IOPS) they were a third of its CPU. 1 MiB still leaves 3 MiB
            // before drop mode starts sampling at half the ring.
            wakeup_bytes: 1 << 20,
            poll_interval: Duration::from_millis(50),
            sample_fill_bytes: None,
            hook: None,
            position_always: false,
            read_ioprio: true,
            raw_layout: None,
        }
    }

    /// The wake-up threshold the programs get: `wakeup_bytes`, capped at a quarter
    /// of the ring. A threshold at or past the ring's size never fires, and only the
    /// poll timer would drain a small ring (`--ring-size 1M` dropped records so).
    pub fn wakeup_threshold(&self) -> u32 {
        self.wakeup_bytes.min(self.ring_bytes / 4)
    }
}

/// A traced device and the settings handed to the programs.
#[derive(Clone, Debug)]
pub struct TracedDevice {
    pub device: BlockDevice,
    pub config: DeviceConfig,
}

pub struct Observer {
    ebpf: Ebpf,
    config: ObserverConfig,
    devices: Vec<TracedDevice>,
    attached: bool,
    pinned: Option<Pinned>,
    /// The event programs' statistics as they were when [`Observer::detach`]
    /// unloaded them (their count of skipped runs must outlive them).
    final_stats: Option<Vec<ProgramStats>>,
    /// Flushes the per-CPU record batches; `None`: batching is off.
    flusher: Option<batches::BatchFlusher>,
}

/// The pins of a `--pin` observer: removed (programs detached) on a clean exit,
/// left in place when the agent is killed.
struct Pinned {
    dir: PathBuf,
    meta: PinMeta,
    /// The links keeping the event programs attached, with their pins.
    links: Vec<(PathBuf, FdLink)>,
}

/// What `--pin` found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinOutcome {
    /// Nothing was pinned: loaded and pinned a new set.
    Fresh,
    /// Reused the maps and attached programs a killed agent (`previous_pid`) left.
    Adopted { previous_pid: u32 },
    /// Pins that could not be adopted were removed (why), then a new set was loaded.
    Replaced(String),
}

impl std::fmt::Display for PinOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinOutcome::Fresh => write!(f, "pinned a new set of programs and maps"),
            PinOutcome::Adopted { previous_pid } => write!(
                f,
                "adopted the programs and maps pinned by agent {previous_pid} (still attached; nothing reloaded)"
            ),
            PinOutcome::Replaced(why) => write!(
                f,
                "replaced the pinned programs and maps ({why}) with a new set"
            ),
        }
    }
}

impl Observer {
    /// Loads the object with this kernel's layout and loads (verifies) the mode's
    /// programs; nothing is attached yet.
    pub fn load(config: ObserverConfig) -> anyhow::Result<Observer> {
        crate::kernel::caps::require_privileges()?;
        let object = ebpf_object()?;
        let mut ebpf = load_object(&config, &object, None)?;
        load_programs(&mut ebpf, config.mode)?;
        let flusher = batches::start(&mut ebpf, true);
        Ok(Observer {
            ebpf,
            config,
            devices: Vec::new(),
            attached: false,
            pinned: None,
            final_stats: None,
            flusher,
        })
    }

    /// [`Observer::load`] with every map and link pinned under `dir`; adopts what a
    /// killed agent left there when it is the same object with the same settings
    /// (nothing is loaded twice then: the attached programs keep running, only the
    /// slot checker is loaded), else replaces it. Refuses pins of a live agent.
    pub fn load_pinned(
        config: ObserverConfig,
        dir: &Path,
    ) -> anyhow::Result<(Observer, PinOutcome)> {
        crate::kernel::caps::require_privileges()?;
        let object = ebpf_object()?;
        let meta = PinMeta {
            object: pins::fingerprint(&object),
            mode: config.mode.name().to_owned(),
            ring_bytes: config.ring_bytes,
            wakeup_bytes: config.wakeup_threshold(),
            sample_fill_bytes: config.sample_fill_bytes.unwrap_or(0),
            owner_pid: std::process::id(),
        };
        pins::make_dir(dir)?;
        let mut outcome = match pins::inspect(dir, &meta) {
            pins::Found::Owned(pid) => anyhow::bail!(
                "the kml-agent with pid {pid} owns the pins at {}: stop it first, or pin elsewhere with --pin-dir",
                dir.display()
            ),
            pins::Found::Nothing => PinOutcome::Fresh,
            pins::Found::Stale(why) => PinOutcome::Replaced(why),
            pins::Found::Adoptable(old) => PinOutcome::Adopted {
                previous_pid: old.owner_pid,
            },
        };
        let mut links = Vec::new();
        if matches!(outcome, PinOutcome::Adopted { .. }) {
            for Event { tracepoint, .. } in EVENTS {
                let path = pins::link_pin(dir, tracepoint);
                match PinnedLink::from_pin(&path) {
                    Ok(l) => links.push((path, FdLink::from(l))),
                    Err(_) => {
                        outcome = PinOutcome::Replaced(format!(
                            "the link of {tracepoint} is not pinned ({} missing)",
                            path.display()
                        ));
                        links.clear();
                        break;
                    }
                }
            }
        }
        if let PinOutcome::Replaced(_) = outcome {
            pins::clear(dir).with_context(|| format!("removing the pins at {}", dir.display()))?;
            pins::make_dir(dir)?;
        }
        let mut ebpf = load_object(&config, &object, Some(dir))?;
        for name in pins::MAPS {
            pins::restrict(&dir.join(name))?;
        }
        let adopted = matches!(outcome, PinOutcome::Adopted { .. });
        if adopted {
            // The event programs and the inference stages (held by the pinned
            // INFER array) are the killed agent's; only the checker is needed anew.
            let checker: &mut RawTracePoint = program(&mut ebpf, program::VERIFY_SLOTS)?;
            checker.load().context("verifying kml_verify_slots")?;
            pins::write_meta(dir, &meta)?;
        } else {
            load_programs(&mut ebpf, config.mode)?;
        }
        let flusher = batches::start(&mut ebpf, !adopted);
        let observer = Observer {
            ebpf,
            config,
            devices: Vec::new(),
            attached: adopted,
            final_stats: None,
            flusher,
            pinned: Some(Pinned {
                dir: dir.to_owned(),
                meta,
                links,
            }),
        };
        Ok((observer, outcome))
    }

    /// Loads the observer, adds `targets`, attaches.
    pub fn start(config: ObserverConfig, targets: &[BlockDevice]) -> anyhow::Result<Observer> {
        let mut observer = Observer::load(config)?;
        for d in targets {
            observer.add_device(d)?;
        }
        observer.attach()?;
        Ok(observer)
    }

    /// [`Observer::start`] with `--pin`: every map and link pinned under `dir`,
    /// adopting what a killed agent left there when it can (see [`pins`]). The
    /// devices the adopted programs traced that are not in `targets` stop being traced.
    pub fn start_pinned(
        config: ObserverConfig,
        targets: &[BlockDevice],
        dir: &Path,
    ) -> anyhow::Result<(Observer, PinOutcome)> {
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

    /// Devices the programs trace now (the DEVICES map; with adopted pins, what
    /// the previous agent traced).
    pub fn kernel_devices(&self) -> anyhow::Result<Vec<u32>> {
        let map: HashMap<&MapData, u32, u32> = object::map(&self.ebpf, map::DEV_SLOTS)?;
        Ok(map.keys().filter_map(Result::ok).collect())
    }
}

/// Loads the object (maps created, or reused from `pin_dir`, where new ones are
/// pinned); programs are not loaded yet.
fn load_object(
    config: &ObserverConfig,
    object: &[u8],
    pin_dir: Option<&Path>,
) -> anyhow::Result<Ebpf> {
    let layout = layout::kernel_layout(
        config.mode,
        config.wakeup_threshold(),
        config.sample_fill_bytes.unwrap_or(0),
        config.position_always,
        config.read_ioprio,
        config
            .raw_layout
            .or(config.hook.as_ref().map(|h| h.layout.raw)),
    )?;
    if config.hook.is_some() && config.mode != AttachMode::RawTracepoint {
        anyhow::bail!(
            "the verdict hook needs the raw tracepoint observers (mode {})",
            config.mode
        );
    }
    let mut loader = object::loader();
    loader
        .override_global(global::LAYOUT, &layout, true)
        .map_max_entries(map::RECORDS, config.ring_bytes);
    // Each mode keeps its requests in its own map: the other one is left at one
    // entry (REQS is 12 MiB, INFLIGHT preallocates 65536 entries).
    match config.mode {
        AttachMode::RawTracepoint => loader.map_max_entries(map::INFLIGHT, 1),
        AttachMode::Tracepoint => loader.map_max_entries(map::REQS, 1),
    };
    if let Some(h) = &config.hook {
        h.apply(&mut loader, false);
    }
    if let Some(dir) = pin_dir {
        for name in pins::MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    loader.load(object).context("loading the kml eBPF object")
}

/// Loads (verifies) the mode's programs, installs the inference stages, loads the
/// slot checker.
fn load_programs(ebpf: &mut Ebpf, mode: AttachMode) -> anyhow::Result<()> {
    for Event {
        tracepoint,
        raw,
        tp,
        ..
    } in EVENTS
    {
        match mode {
            AttachMode::RawTracepoint => {
                let p: &mut RawTracePoint = program(ebpf, raw)?;
                p.load()
                    .with_context(|| format!("verifying {raw} (raw tracepoint {tracepoint})"))?;
            }
            AttachMode::Tracepoint => {
                let p: &mut TracePoint = program(ebpf, tp)?;
                p.load()
                    .with_context(|| format!("verifying {tp} (tracepoint block:{tracepoint})"))?;
            }
        }
    }
    // The tail-called stages (position, inference) and the slot checker (run on
    // demand).
    let stages = match mode {
        AttachMode::RawTracepoint => RAW_STAGES,
        AttachMode::Tracepoint => TP_STAGES,
    };
    for (index, name) in stages.into_iter().enumerate() {
        let fd = match mode {
            AttachMode::RawTracepoint => {
                let p: &mut RawTracePoint = program(ebpf, name)?;
                p.load().with_context(|| format!("verifying {name}"))?;
                p.fd()?.try_clone()?
            }
            AttachMode::Tracepoint => {
                let p: &mut TracePoint = program(ebpf, name)?;
                p.load().with_context(|| format!("verifying {name}"))?;
                p.fd()?.try_clone()?
            }
        };
        let mut array: ProgramArray<&mut MapData> =
            ProgramArray::try_from(ebpf.map_mut(map::INFER).context("map INFER missing")?)?;
        array
            .set(index as u32, &fd, 0)
            .with_context(|| format!("installing the stage {name}"))?;
    }
    let checker: &mut RawTracePoint = program(ebpf, program::VERIFY_SLOTS)?;
    checker.load().context("verifying kml_verify_slots")?;
    Ok(())
}

impl Observer {
    pub fn mode(&self) -> AttachMode {
        self.config.mode
    }

    pub fn devices(&self) -> &[TracedDevice] {
        &self.devices
    }

    /// Starts tracing `device` (its mq-deadline expiries become the deadlines).
    pub fn add_device(&mut self, device: &BlockDevice) -> anyhow::Result<()> {
        if !device.is_mq_deadline() {
            anyhow::bail!(
                "{} uses scheduler `{}`, kml observes mq-deadline: echo mq-deadline > {}/queue/scheduler",
                device.name,
                device.scheduler.as_deref().unwrap_or("none"),
                device.sys_path().display()
            );
        }
        let (read, write) = device.expiries()?;
        // Classic tracepoints rebuild the scheduler's deadline in jiffies from the
        // expiries (raw tracepoints read it from the request). Unknown HZ: 0, and
        // the label falls back to the ns estimate (said once, here).
        let hz = match self.config.mode {
            AttachMode::Tracepoint => match crate::kernel::clock::tick_rate() {
                Ok(rate) => rate.hz,
                Err(e) => {
                    tracing::warn!(
                        "HZ unknown ({e}): {} is labelled by the ns estimate of its deadline",
                        device.name
                    );
                    0
                }
            },
            AttachMode::RawTracepoint => 0,
        };
        let jiffies =
            |d: Duration| kml_ebpf_common::label::expire_jiffies(d.as_millis() as u64, hz);
        let config = DeviceConfig {
            read_expire_ns: read.as_nanos() as u64,
            write_expire_ns: write.as_nanos() as u64,
            read_expire_jiffies: jiffies(read),
            write_expire_jiffies: jiffies(write),
        };
        let dev = device.dev();
        let (queues, nr_requests) = device.hw_queues();
        let slots: Array<&MapData, DeviceSlot> = object::map(&self.ebpf, map::DEVICES)?;
        // The device's slot: its own (adopted pins keep their live counts), else a
        // free one.
        let mut chosen = None;
        for i in 0..MAX_DEVICES {
            let s = slots.get(&i, 0).context("reading DEVICES")?;
            if s.active == 1 && s.dev == dev {
                chosen = Some((i, s));
                break;
            }
            if s.active == 0 && chosen.is_none() {
                chosen = Some((i, DeviceSlot::default()));
            }
        }
        let Some((slot, mut s)) = chosen else {
            anyhow::bail!(
                "{}: kml traces at most {MAX_DEVICES} devices at once",
                device.name
            );
        };
        if s.active == 0 {
            // A new device in this slot: its position state starts empty. Built
            // on the heap: two states are 280 KB, a lot for a worker's stack.
            let empty: Box<[QueueShape; 2]> = vec![QueueShape::EMPTY; 2]
                .into_boxed_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("two position states"))?;
            let mut shapes: Array<&mut MapData, [QueueShape; 2]> =
                map_mut(&mut self.ebpf, map::SHAPES)?;
            // By reference: `*empty` would move it back onto the stack.
            shapes
                .set(slot, empty.as_ref(), 0)
                .context("SHAPES reset")?;
        }
        s.dev = dev;
        s.active = 1;
        s.bucket_shift = bucket_shift_for(device.size_sectors);
        s.read_expire_ns = config.read_expire_ns;
        s.write_expire_ns = config.write_expire_ns;
        s.read_expire_jiffies = config.read_expire_jiffies;
        s.write_expire_jiffies = config.write_expire_jiffies;
        s.hctx_stride = if queues > 1 { nr_requests } else { 0 };
        let tags = u64::from(queues) * u64::from(nr_requests);
        let room = 1u64 << kml_ebpf_common::device::DEFAULT_TAG_BITS;
        if tags > room {
            tracing::warn!(
                "{}: {queues} hardware queue(s) × nr_requests {nr_requests} = {tags} scheduler tags, kml follows {room} per device: requests with higher tags are counted as untracked_requests",
                device.name
            );
        }
        let mut slots: Array<&mut MapData, DeviceSlot> = map_mut(&mut self.ebpf, map::DEVICES)?;
        slots.set(slot, s, 0).context("DEVICES update")?;
        let mut by_dev: HashMap<&mut MapData, u32, u32> = map_mut(&mut self.ebpf, map::DEV_SLOTS)?;
        by_dev.insert(dev, slot, 0).context("DEV_SLOTS insert")?;
        // Cached "not traced" answers from before are void now.
        self.bump_epoch()?;
        self.devices.retain(|d| d.device.dev() != dev);
        self.devices.push(TracedDevice {
            device: device.clone(),
            config,
        });
        Ok(())
    }

    fn bump_epoch(&mut self) -> anyhow::Result<()> {
        let mut control: Array<&mut MapData, Control> = map_mut(&mut self.ebpf, map::CONTROL)?;
        let mut c = control.get(&0, 0).context("reading CONTROL")?;
        c.epoch = c.epoch.wrapping_add(1);
        control.set(0, c, 0).context("CONTROL update")
    }

    /// The slot of a traced device.
    fn slot_of(&self, dev: u32) -> anyhow::Result<Option<u32>> {
        let by_dev: HashMap<&MapData, u32, u32> = object::map(&self.ebpf, map::DEV_SLOTS)?;
        Ok(by_dev.get(&dev, 0).ok())
    }

    /// Stops tracing a device: its slot and its in-flight entries go (a detached
    /// disk never completes them). Returns how many in-flight entries were removed.
    pub fn remove_device(&mut self, dev: u32) -> anyhow::Result<usize> {
        let slot = self.slot_of(dev)?;
        // The lookup first: from here on the programs ignore the device.
        let mut by_dev: HashMap<&mut MapData, u32, u32> = map_mut(&mut self.ebpf, map::DEV_SLOTS)?;
        let _ = by_dev.remove(&dev);
        let mut removed = 0;
        if let Some(slot) = slot {
            let mut slots: Array<&mut MapData, DeviceSlot> = map_mut(&mut self.ebpf, map::DEVICES)?;
            slots
                .set(slot, DeviceSlot::default(), 0)
                .context("DEVICES update")?;
            let tag_bits = kml_ebpf_common::device::DEFAULT_TAG_BITS;
            let mut reqs: Array<&mut MapData, ReqState> = map_mut(&mut self.ebpf, map::REQS)?;
            for i in (slot << tag_bits)..((slot + 1) << tag_bits) {
                if reqs.get(&i, 0).is_ok_and(|e| e.rq != 0) {
                    reqs.set(i, ReqState::default(), 0)?;
                    removed += 1;
                }
            }
        }
        let mut inflight: HashMap<&mut MapData, InflightKey, ReqState> =
            map_mut(&mut self.ebpf, map::INFLIGHT)?;
        let stale: Vec<InflightKey> = inflight
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| e.rec.dev == dev)
            .map(|(k, _)| k)
            .collect();
        removed += stale.iter().filter(|k| inflight.remove(k).is_ok()).count();
        self.bump_epoch()?;
        self.devices.retain(|d| d.device.dev() != dev);
        Ok(removed)
    }

    /// Attaches the mode's programs to their tracepoints (pinned: each link is
    /// pinned, so the programs stay attached if the agent is killed). Adopted
    /// programs are attached already.
    pub fn attach(&mut self) -> anyhow::Result<()> {
        if self.attached {
            return Ok(());
        }
        self.final_stats = None;
        for Event {
            tracepoint: event,
            raw,
            tp,
            ..
        } in EVENTS
        {
            let link: Option<FdLink> = match self.config.mode {
                AttachMode::RawTracepoint => {
                    let p: &mut RawTracePoint = program(&mut self.ebpf, raw)?;
                    let id = p
                        .attach(event)
                        .with_context(|| format!("attaching {raw} to raw tracepoint {event}"))?;
                    match self.pinned {
                        Some(_) => Some(p.take_link(id)?.into()),
                        None => None,
                    }
                }
                AttachMode::Tracepoint => {
                    let p: &mut TracePoint = program(&mut self.ebpf, tp)?;
                    let id = p
                        .attach("block", event)
                        .with_context(|| format!("attaching {tp} to block:{event}"))?;
                    match self.pinned {
                        Some(_) => Some(FdLink::try_from(p.take_link(id)?).with_context(|| {
                            format!("{tp}: this kernel gives no bpf_link to pin for a tracepoint")
                        })?),
                        None => None,
                    }
                }
            };
            if let (Some(link), Some(pinned)) = (link, self.pinned.as_mut()) {
                let path = pins::link_pin(&pinned.dir, event);
                let link = FdLink::from(
                    link.pin(&path)
                        .with_context(|| format!("pinning the link of {event}"))?,
                );
                pins::restrict(&path)?;
                pinned.links.push((path, link));
            }
        }
        if let Some(pinned) = &self.pinned {
            // Last: only a complete set is ever described as adoptable.
            pins::write_meta(&pinned.dir, &pinned.meta)?;
        }
        self.attached = true;
        Ok(())
    }

    /// Whether the object was loaded with the verdict program's globals
    /// ([`ObserverConfig::hook`]), so that the act stage can attach it.
    pub fn hook_loaded(&self) -> bool {
        self.config.hook.is_some()
    }

    /// Detaches every program (records already in the ring stay readable).
    pub fn detach(&mut self) {
        // The hook first: no verdict acts once the observers stop.
        if let Some(aya::programs::Program::KProbe(p)) =
            self.ebpf.program_mut(program::HOOK_VERDICT)
        {
            let _ = p.unload();
        }
        if !self.attached {
            return;
        }
        // Unloading takes the programs' statistics (the runs the kernel skipped:
        // lost events) with them: keep the last ones.
        self.final_stats = self.program_stats().ok();
        if let Some(pinned) = self.pinned.as_mut() {
            // Unpinned and closed: the kernel detaches the programs.
            for (path, link) in pinned.links.drain(..) {
                let _ = std::fs::remove_file(&path);
                drop(link);
            }
        }
        for Event { raw, tp, .. } in EVENTS {
            let name = match self.config.mode {
                AttachMode::RawTracepoint => raw,
                AttachMode::Tracepoint => tp,
            };
            if let Some(p) = self.ebpf.program_mut(name) {
                // Unloading drops the program's links, which detaches it.
                let _ = match p {
                    aya::programs::Program::RawTracePoint(p) => p.unload(),
                    aya::programs::Program::TracePoint(p) => p.unload(),
                    _ => Ok(()),
                };
            }
        }
        self.attached = false;
        // What the CPUs staged last goes to the ring, to be drained with the rest.
        self.flush_batches();
    }

    /// Writes the records staged on every CPU to the ring (nothing when batching
    /// is off). A failure is said; the records stay staged and counted.
    pub fn flush_batches(&self) {
        if let Some(f) = &self.flusher {
            if let Err(e) = f.flush() {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Whether finished requests are staged per CPU ([`batches`]).
    pub fn batching(&self) -> bool {
        self.flusher.is_some()
    }

    /// Takes the ring buffer for consumption (once).
    pub fn records(&mut self) -> anyhow::Result<RecordStream> {
        let map = self
            .ebpf
            .take_map(map::RECORDS)
            .context("RECORDS ring buffer already taken")?;
        let ring = RingBuf::try_from(map).context("RECORDS is not a ring buffer")?;
        let flusher = self.flusher.as_ref().map(|f| f.try_clone()).transpose()?;
        RecordStream::new(ring, self.config.poll_interval, flusher)
    }

    /// The programs' counters summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let map: PerCpuArray<&MapData, Counters> = object::map(&self.ebpf, map::COUNTERS)?;
        let per_cpu = map.get(&0, 0).context("reading COUNTERS")?;
        let mut total = Counters::default();
        for c in per_cpu.iter() {
            total.accumulate(c);
        }
        Ok(total)
    }

    /// Losses so far (at the end of a session: all of them).
    pub fn losses(&self) -> anyhow::Result<LossReport> {
        self.losses_of(&self.counters()?, &self.program_stats()?)
    }

    /// Losses from counters and program statistics already read.
    pub fn losses_of(
        &self,
        counters: &Counters,
        programs: &[ProgramStats],
    ) -> anyhow::Result<LossReport> {
        let missed = programs.iter().map(|p| p.recursion_misses).sum();
        let mut report = LossReport::new(counters, self.live_inflight()?, missed);
        for d in &self.devices {
            report.add_device(&d.device.name, &self.device_events(d.device.dev())?);
        }
        Ok(report)
    }

    /// Requests with an entry now, read cheaply enough for every second while
    /// attached. Raw tracepoints: entries added less entries removed (`COUNTERS`),
    /// exact because the per-tag array never evicts (the tests hold it equal to
    /// [`Observer::live_inflight`]'s scan), where the scan copies thousands of
    /// entries, each with the kernel's BPF instrumentation off on that CPU, and a
    /// completion there meanwhile runs no program (measured: docs/design.md).
    /// Classic tracepoints: the scan of the hash map's keys.
    pub fn live_inflight_counted(&self, c: &Counters) -> anyhow::Result<u64> {
        match self.config.mode {
            AttachMode::RawTracepoint => Ok(c
                .get(Counter::InflightAdded)
                .saturating_sub(c.get(Counter::InflightRemoved))),
            AttachMode::Tracepoint => self.live_inflight(),
        }
    }

    /// Requests with an entry now (in flight or queued). Raw tracepoints: the
    /// entries in use in the traced devices' parts of `REQS` (2048 reads a device);
    /// classic tracepoints: the hash map's keys.
    pub fn live_inflight(&self) -> anyhow::Result<u64> {
        match self.config.mode {
            AttachMode::RawTracepoint => {
                let by_dev: HashMap<&MapData, u32, u32> = object::map(&self.ebpf, map::DEV_SLOTS)?;
                let bits = kml_ebpf_common::device::DEFAULT_TAG_BITS;
                let mut live = 0;
                for slot in by_dev.iter().filter_map(Result::ok).map(|(_, s)| s) {
                    let range = (slot << bits)..((slot + 1) << bits);
                    live += match self.live_in_batches(range.clone()) {
                        Ok(n) => n,
                        // A kernel without batch lookups: one call an entry.
                        Err(_) => {
                            let reqs: Array<&MapData, ReqState> =
                                object::map(&self.ebpf, map::REQS)?;
                            range
                                .filter(|i| reqs.get(i, 0).is_ok_and(|e| e.rq != 0))
                                .count() as u64
                        }
                    };
                }
                Ok(live)
            }
            AttachMode::Tracepoint => {
                let map: HashMap<&MapData, InflightKey, ReqState> =
                    object::map(&self.ebpf, map::INFLIGHT)?;
                Ok(map.keys().filter(Result::is_ok).count() as u64)
            }
        }
    }

    /// Entries in use in `range` of `REQS`, read a chunk a call: `--metrics` reads
    /// 4096 entries a device every second, which took 4096 bpf(2) calls (a quarter
    /// of the agent's CPU at 20k IOPS).
    fn live_in_batches(&self, range: std::ops::Range<u32>) -> anyhow::Result<u64> {
        const CHUNK: usize = 256;
        // Checks the entries' size against ReqState.
        let _: Array<&MapData, ReqState> = object::map(&self.ebpf, map::REQS)?;
        let Some(aya::maps::Map::Array(data)) = self.ebpf.map(map::REQS) else {
            anyhow::bail!("map {} is not an array", map::REQS);
        };
        let fd = data.fd().as_fd();
        let mut buf = vec![ReqState::default(); CHUNK];
        let mut live = 0;
        let mut at = range.start;
        while at < range.end {
            let want = CHUNK.min((range.end - at) as usize);
            let n = crate::sys::array_lookup_batch(fd, at, &mut buf[..want])
                .with_context(|| format!("batch lookup in {}", map::REQS))?;
            anyhow::ensure!(n > 0, "{} ends at {at}", map::REQS);
            live += buf[..n].iter().filter(|e| e.rq != 0).count() as u64;
            at += n as u32;
        }
        Ok(live)
    }

    /// Per-device counts kept by the programs.
    pub fn device_state(&self, dev: u32) -> anyhow::Result<DeviceState> {
        let slot = self
            .slot_of(dev)?
            .with_context(|| format!("device {dev:#x} is not traced"))?;
        let slots: Array<&MapData, DeviceSlot> = object::map(&self.ebpf, map::DEVICES)?;
        Ok(device_state(
            &slots.get(&slot, 0).context("reading DEVICES")?,
        ))
    }

    /// Per-device event counts (summed over CPUs).
    pub fn device_events(&self, dev: u32) -> anyhow::Result<DeviceEvents> {
        let slot = self
            .slot_of(dev)?
            .with_context(|| format!("device {dev:#x} is not traced"))?;
        let map: PerCpuArray<&MapData, DeviceEvents> = object::map(&self.ebpf, map::DEVICE_EVENTS)?;
        let mut total = DeviceEvents::default();
        for c in map.get(&slot, 0).context("reading DEVICE_EVENTS")?.iter() {
            total.accumulate(c);
        }
        Ok(total)
    }

    /// The kernel's statistics of each attached program: runs, time (when
    /// `kernel.bpf_stats_enabled` is 1) and runs skipped because the program would
    /// have nested in itself on a CPU (events lost to the kernel, not to kml).
    pub fn program_stats(&self) -> anyhow::Result<Vec<ProgramStats>> {
        if let Some(last) = &self.final_stats {
            // Detached: the programs are gone; their statistics at detach.
            return Ok(last.clone());
        }
        let mut out = Vec::new();
        for Event {
            tracepoint: event,
            raw,
            tp,
            ..
        } in EVENTS
        {
            let name = match self.config.mode {
                AttachMode::RawTracepoint => raw,
                AttachMode::Tracepoint => tp,
            };
            let info = match self.ebpf.program(name).and_then(|p| p.fd().ok()) {
                Some(fd) => prog_info(fd.as_fd()),
                // Adopted: the program is the one its pinned link holds.
                None => match self.adopted_program_fd(event) {
                    Some(fd) => prog_info(fd.as_fd()),
                    None => continue,
                },
            }
            .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD on {name}"))?;
            out.push(ProgramStats {
                name,
                event,
                run_count: info.run_cnt,
                run_time_ns: info.run_time_ns,
                recursion_misses: info.recursion_misses,
            });
        }
        Ok(out)
    }

    /// The program attached by the adopted link of `event`.
    fn adopted_program_fd(&self, event: &str) -> Option<aya::programs::ProgramFd> {
        let pinned = self.pinned.as_ref()?;
        let (_, link) = pinned
            .links
            .iter()
            .find(|(p, _)| *p == pins::link_pin(&pinned.dir, event))?;
        let id = link.info().ok()?.program_id();
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)?
            .fd()
            .ok()
    }

    /// The pin directory, with `--pin`.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pinned.as_ref().map(|p| p.dir.as_path())
    }

    /// Direct access for tools that need more (tests, status).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Kernel-side statistics of one program (`bpf_prog_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub event: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
    pub recursion_misses: u64,
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.detach();
        if let Some(pinned) = &self.pinned {
            if let Err(e) = pins::clear(&pinned.dir) {
                tracing::warn!("removing the pins at {}: {e}", pinned.dir.display());
            }
        }
    }
}

/// The counts of a device slot, as the host reads them.
pub fn device_state(s: &DeviceSlot) -> DeviceState {
    let [(inflight_read, queued_read), (inflight_write, queued_write)] = s.counts();
    DeviceState {
        inflight_read: inflight_read.into(),
        inflight_write: inflight_write.into(),
        queued_read: queued_read.into(),
        queued_write: queued_write.into(),
        last_insert_ns: s.last_insert_ns,
        last_issue_end_sector: s.last_issue_end_sector,
        last_issue_ns: s.last_issue_ns,
        issue_gap_ewma_ns: s.issue_gap_ewma_ns,
        wait_ewma_read_ns: s.wait_ewma_read_ns,
        wait_ewma_write_ns: s.wait_ewma_write_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeup_threshold_is_capped_at_a_quarter_of_the_ring() {
        let mut c = ObserverConfig::new(AttachMode::RawTracepoint);
        assert_eq!(
            c.wakeup_threshold(),
            1 << 20,
            "8 MiB ring: the default stands"
        );
        c.ring_bytes = 1 << 20;
        assert_eq!(c.wakeup_threshold(), 256 << 10);
        c.ring_bytes = 128 << 10;
        assert_eq!(c.wakeup_threshold(), 32 << 10);
        c.wakeup_bytes = 0;
        assert_eq!(c.wakeup_threshold(), 0, "0 still wakes per record");
    }
}
