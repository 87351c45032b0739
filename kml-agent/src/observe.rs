//! Loads kml's eBPF object, configures it for this kernel and these devices,
//! attaches one set of programs. Dropping the [`Observer`] detaches everything
//! and frees the maps (nothing is pinned here), also when a caller fails midway.

use std::{borrow::Cow, os::fd::AsFd as _, time::Duration};

use anyhow::Context as _;
use aya::{
    maps::{HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use kml_ebpf_common::{Counters, DeviceConfig, DeviceState, InflightKey, RequestRecord};

use crate::{
    devices::BlockDevice,
    kernel::{caps::AttachMode, layout},
    record::RecordStream,
};

/// The tracepoints kml observes, with the program that handles each in each mode.
const EVENTS: &[(&str, &str, &str)] = &[
    ("block_rq_insert", "kml_raw_rq_insert", "kml_tp_rq_insert"),
    ("block_rq_issue", "kml_raw_rq_issue", "kml_tp_rq_issue"),
    (
        "block_rq_complete",
        "kml_raw_rq_complete",
        "kml_tp_rq_complete",
    ),
    (
        "block_rq_requeue",
        "kml_raw_rq_requeue",
        "kml_tp_rq_requeue",
    ),
    ("block_rq_merge", "kml_raw_rq_merge", "kml_tp_rq_merge"),
];

/// The eBPF object: `KML_EBPF_OBJECT` at run time if set (development), else the
/// one embedded at build time.
pub fn ebpf_object() -> anyhow::Result<Cow<'static, [u8]>> {
    if let Some(path) = std::env::var_os("KML_EBPF_OBJECT") {
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading eBPF object {} (KML_EBPF_OBJECT)",
                path.to_string_lossy()
            )
        })?;
        return Ok(Cow::Owned(bytes));
    }
    embedded_object()
}

#[cfg(kml_ebpf_embedded)]
fn embedded_object() -> anyhow::Result<Cow<'static, [u8]>> {
    static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KML_EBPF_OBJECT_PATH"));
    Ok(Cow::Borrowed(OBJECT))
}

#[cfg(not(kml_ebpf_embedded))]
fn embedded_object() -> anyhow::Result<Cow<'static, [u8]>> {
    anyhow::bail!(
        "this kml-agent was built without its eBPF object: build it with `cargo xtask build`"
    )
}

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
    /// globals are set at load; [`Observer::attach_hook`] attaches it). Raw
    /// tracepoint mode only: the program finds the model's verdict by `struct request *`.
    pub hook: Option<crate::hook::HookGlobals>,
}

impl ObserverConfig {
    pub fn new(mode: AttachMode) -> Self {
        ObserverConfig {
            mode,
            ring_bytes: 8 << 20,
            wakeup_bytes: 256 << 10,
            poll_interval: Duration::from_millis(50),
            sample_fill_bytes: None,
            hook: None,
        }
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
}

impl Observer {
    /// Loads the object with this kernel's layout and loads (verifies) the mode's
    /// programs; nothing is attached yet.
    pub fn load(config: ObserverConfig) -> anyhow::Result<Observer> {
        crate::kernel::caps::require_privileges()?;
        let layout = layout::kernel_layout(
            config.mode,
            config.wakeup_bytes,
            config.sample_fill_bytes.unwrap_or(0),
        )?;
        if config.hook.is_some() && config.mode != AttachMode::RawTracepoint {
            anyhow::bail!(
                "the verdict hook needs the raw tracepoint observers (mode {})",
                config.mode
            );
        }
        let object = ebpf_object()?;
        let mut loader = EbpfLoader::new();
        loader
            .override_global("KML_LAYOUT", &layout, true)
            .map_max_entries("RECORDS", config.ring_bytes);
        if let Some(h) = &config.hook {
            h.apply(&mut loader, false);
        }
        let mut ebpf = loader
            .load(&object)
            .context("loading the kml eBPF object")?;
        for (event, raw, tp) in EVENTS {
            match config.mode {
                AttachMode::RawTracepoint => {
                    let p: &mut RawTracePoint = program(&mut ebpf, raw)?;
                    p.load()
                        .with_context(|| format!("verifying {raw} (raw tracepoint {event})"))?;
                }
                AttachMode::Tracepoint => {
                    let p: &mut TracePoint = program(&mut ebpf, tp)?;
                    p.load()
                        .with_context(|| format!("verifying {tp} (tracepoint block:{event})"))?;
                }
            }
        }
        // Inference stages (tail-called from insert) and the slot checker (run on demand).
        let stages: [&str; 2] = match config.mode {
            AttachMode::RawTracepoint => ["kml_raw_features", "kml_raw_model"],
            AttachMode::Tracepoint => ["kml_tp_features", "kml_tp_model"],
        };
        let mut fds = Vec::new();
        for name in stages {
            let fd = match config.mode {
                AttachMode::RawTracepoint => {
                    let p: &mut RawTracePoint = program(&mut ebpf, name)?;
                    p.load().with_context(|| format!("verifying {name}"))?;
                    p.fd()?.try_clone()?
                }
                AttachMode::Tracepoint => {
                    let p: &mut TracePoint = program(&mut ebpf, name)?;
                    p.load().with_context(|| format!("verifying {name}"))?;
                    p.fd()?.try_clone()?
                }
            };
            fds.push(fd);
        }
        let mut infer: ProgramArray<&mut MapData> =
            ProgramArray::try_from(ebpf.map_mut("INFER").context("map INFER missing")?)?;
        for (i, fd) in fds.iter().enumerate() {
            infer
                .set(i as u32, fd, 0)
                .context("installing the inference stages")?;
        }
        let checker: &mut RawTracePoint = program(&mut ebpf, "kml_verify_slots")?;
        checker.load().context("verifying kml_verify_slots")?;
        Ok(Observer {
            ebpf,
            config,
            devices: Vec::new(),
            attached: false,
        })
    }

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
        let config = DeviceConfig {
            read_expire_ns: read.as_nanos() as u64,
            write_expire_ns: write.as_nanos() as u64,
        };
        let dev = device.dev();
        // State first: the programs count only devices that have a config entry.
        let mut state: HashMap<&mut MapData, u32, DeviceState> =
            map_mut(&mut self.ebpf, "DEVICE_STATE")?;
        state
            .insert(dev, DeviceState::default(), 0)
            .context("DEVICE_STATE insert")?;
        let mut devices: HashMap<&mut MapData, u32, DeviceConfig> =
            map_mut(&mut self.ebpf, "DEVICES")?;
        devices.insert(dev, config, 0).context("DEVICES insert")?;
        self.devices.push(TracedDevice {
            device: device.clone(),
            config,
        });
        Ok(())
    }

    /// Stops tracing a device (its in-flight entries complete as orphans or age out).
    pub fn remove_device(&mut self, dev: u32) -> anyhow::Result<()> {
        let mut devices: HashMap<&mut MapData, u32, DeviceConfig> =
            map_mut(&mut self.ebpf, "DEVICES")?;
        let _ = devices.remove(&dev);
        let mut state: HashMap<&mut MapData, u32, DeviceState> =
            map_mut(&mut self.ebpf, "DEVICE_STATE")?;
        let _ = state.remove(&dev);
        self.devices.retain(|d| d.device.dev() != dev);
        Ok(())
    }

    /// Attaches the mode's programs to their tracepoints.
    pub fn attach(&mut self) -> anyhow::Result<()> {
        for (event, raw, tp) in EVENTS {
            match self.config.mode {
                AttachMode::RawTracepoint => {
                    let p: &mut RawTracePoint = program(&mut self.ebpf, raw)?;
                    p.attach(event)
                        .with_context(|| format!("attaching {raw} to raw tracepoint {event}"))?;
                }
                AttachMode::Tracepoint => {
                    let p: &mut TracePoint = program(&mut self.ebpf, tp)?;
                    p.attach("block", event)
                        .with_context(|| format!("attaching {tp} to block:{event}"))?;
                }
            }
        }
        self.attached = true;
        Ok(())
    }

    /// Attaches the verdict program to the patched mq-deadline's hook with `policy`
    /// (the observer must have been loaded with [`ObserverConfig::hook`]). Detached
    /// by [`Observer::detach`] or when the observer is dropped.
    pub fn attach_hook(&mut self, policy: crate::hook::Policy) -> anyhow::Result<()> {
        if self.config.hook.is_none() {
            anyhow::bail!("the observer was loaded without the hook's globals");
        }
        crate::hook::attach(&mut self.ebpf, policy)
    }

    /// Detaches every program (records already in the ring stay readable).
    pub fn detach(&mut self) {
        // The hook first: no verdict acts once the observers stop.
        if let Some(aya::programs::Program::KProbe(p)) =
            self.ebpf.program_mut(crate::hook::HOOK_PROGRAM)
        {
            let _ = p.unload();
        }
        if !self.attached {
            return;
        }
        for (_, raw, tp) in EVENTS {
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
    }

    /// Takes the ring buffer for consumption (once).
    pub fn records(&mut self) -> anyhow::Result<RecordStream> {
        let map = self
            .ebpf
            .take_map("RECORDS")
            .context("RECORDS ring buffer already taken")?;
        let ring = RingBuf::try_from(map).context("RECORDS is not a ring buffer")?;
        RecordStream::new(ring, self.config.poll_interval)
    }

    /// The programs' counters summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let map: PerCpuArray<&MapData, Counters> = map_ref(&self.ebpf, "COUNTERS")?;
        let per_cpu = map.get(&0, 0).context("reading COUNTERS")?;
        let mut total = Counters::default();
        for c in per_cpu.iter() {
            total.accumulate(c);
        }
        Ok(total)
    }

    /// Requests in the in-flight map now.
    pub fn live_inflight(&self) -> anyhow::Result<u64> {
        let map: HashMap<&MapData, InflightKey, RequestRecord> = map_ref(&self.ebpf, "INFLIGHT")?;
        Ok(map.keys().filter(Result::is_ok).count() as u64)
    }

    /// Per-device counts kept by the programs.
    pub fn device_state(&self, dev: u32) -> anyhow::Result<DeviceState> {
        let map: HashMap<&MapData, u32, DeviceState> = map_ref(&self.ebpf, "DEVICE_STATE")?;
        map.get(&dev, 0).context("reading DEVICE_STATE")
    }

    /// The kernel's statistics of each attached program: runs, time (when
    /// `kernel.bpf_stats_enabled` is 1) and runs skipped because the program would
    /// have nested in itself on a CPU (events lost to the kernel, not to kml).
    pub fn program_stats(&self) -> anyhow::Result<Vec<ProgramStats>> {
        let mut out = Vec::new();
        for (event, raw, tp) in EVENTS {
            let name = match self.config.mode {
                AttachMode::RawTracepoint => *raw,
                AttachMode::Tracepoint => *tp,
            };
            let Some(p) = self.ebpf.program(name) else {
                continue;
            };
            let Ok(fd) = p.fd() else { continue };
            let info = prog_info(fd.as_fd())
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

/// `BPF_OBJ_GET_INFO_BY_FD` for a program (aya keeps `recursion_misses` private).
fn prog_info(
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is plain integers; all-zero is its documented initial state.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: (&raw mut info) as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc == 0 {
        Ok(info)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.detach();
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    p.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

fn map_mut<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<HashMap<&'a mut MapData, K, V>> {
    let m = ebpf
        .map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    HashMap::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
}

fn map_ref<'a, M>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<M>
where
    M: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    M::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
}
