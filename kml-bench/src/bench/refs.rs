//! The reference observers (kml-ebpf's `kml-refs` object: null, biolatency-style,
//! biosnoop-style; see `kml_ebpf_common::bench_refs`), loaded once by the bench
//! and attached and detached arm by arm inside one fio run.
//!
//! Loading (verification) happens once, before the run; an arm only attaches its
//! three raw tracepoints (a few ms) and detaches them at its end, so no start-up
//! lands in a measured second. biosnoop's records are taken by a minimal reader: a
//! thread of this process that waits on the ring buffer (epoll through `poll`) and
//! counts what it consumes, the least a consumer can do.

use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Array, MapData, RingBuf};
use aya::programs::RawTracePoint;
use aya::{Ebpf, EbpfLoader};
use kml_agent::kernel::btf::Btf;
use kml_ebpf_common::bench_refs::{
    self as refs, RefKind, RefLayout, COUNT_SNOOP_DROPS, COUNT_START_MISSING, TRACEPOINTS,
};

/// `struct request` / `gendisk` offsets from the running kernel's BTF: the members
/// the references read, from kml's own layout reader (sizes checked there).
pub fn layout(btf: &Btf) -> Result<RefLayout> {
    let raw = kml_agent::kernel::layout::raw_tp_layout(btf)
        .context("the kernel's struct request layout (BTF)")?;
    Ok(RefLayout {
        rq_sector: raw.rq_sector,
        rq_cmd_flags: raw.rq_cmd_flags,
        rq_q: raw.rq_q,
        q_disk: raw.q_disk,
        disk_major: raw.disk_major,
        disk_first_minor: raw.disk_first_minor,
    })
}

/// What the minimal reader counted.
#[derive(Debug, Default)]
pub struct ReaderCounts {
    pub records: AtomicU64,
    pub stop: AtomicBool,
    /// The reader thread's id (its CPU time is the consumer's).
    pub tid: AtomicU32,
}

pub struct RefPrograms {
    ebpf: Ebpf,
    attached: Vec<(String, aya::programs::raw_trace_point::RawTracePointLinkId)>,
    reader: Option<JoinHandle<()>>,
    pub counts: Arc<ReaderCounts>,
}

impl RefPrograms {
    /// Loads (verifies) every reference program; attaches none.
    pub fn load(object: &Path) -> Result<RefPrograms> {
        let bytes = std::fs::read(object).with_context(|| {
            format!(
                "reading the reference observers {} (built by `cargo xtask build`)",
                object.display()
            )
        })?;
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let layout = layout(&btf)?;
        let mut ebpf = EbpfLoader::new()
            .override_global(refs::LAYOUT_GLOBAL, &layout, true)
            .load(&bytes)
            .context("loading the kml-refs object")?;
        for kind in RefKind::ALL {
            for (name, tp) in kind.programs().into_iter().zip(TRACEPOINTS) {
                let p: &mut RawTracePoint = ebpf
                    .program_mut(name)
                    .with_context(|| format!("kml-refs has no program {name}"))?
                    .try_into()
                    .with_context(|| format!("{name} is not a raw tracepoint program"))?;
                p.load()
                    .with_context(|| format!("verifying {name} ({tp})"))?;
            }
        }
        let ring = RingBuf::try_from(
            ebpf.take_map(refs::SNOOP_EVENTS)
                .with_context(|| format!("kml-refs has no map {}", refs::SNOOP_EVENTS))?,
        )
        .context("the biosnoop map is not a ring buffer")?;
        let counts = Arc::new(ReaderCounts::default());
        let reader = {
            let counts = counts.clone();
            std::thread::Builder::new()
                .name("biosnoop-reader".into())
                .spawn(move || read_records(ring, &counts))
                .context("starting the biosnoop reader")?
        };
        Ok(RefPrograms {
            ebpf,
            attached: Vec::new(),
            reader: Some(reader),
            counts,
        })
    }

    /// Attaches `kind`'s three programs.
    pub fn attach(&mut self, kind: RefKind) -> Result<()> {
        for (name, tp) in kind.programs().into_iter().zip(TRACEPOINTS) {
            let p: &mut RawTracePoint = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("no program {name}"))?
                .try_into()?;
            let link = p
                .attach(tp)
                .with_context(|| format!("attaching {name} to {tp}"))?;
            self.attached.push((name.to_owned(), link));
        }
        Ok(())
    }

    /// Detaches whatever is attached.
    pub fn detach_all(&mut self) -> Result<()> {
        let mut first_error = None;
        for (name, link) in self.attached.drain(..) {
            let r = self
                .ebpf
                .program_mut(&name)
                .ok_or_else(|| anyhow!("no program {name}"))
                .and_then(|p| {
                    let p: &mut RawTracePoint = p.try_into()?;
                    p.detach(link).with_context(|| format!("detaching {name}"))
                });
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Kernel program ids of `kind`'s insert, issue and complete programs.
    pub fn prog_ids(&self, kind: RefKind) -> Result<[u32; 3]> {
        let mut ids = [0u32; 3];
        for (i, name) in kind.programs().into_iter().enumerate() {
            let p = self
                .ebpf
                .program(name)
                .ok_or_else(|| anyhow!("no program {name}"))?;
            ids[i] = p
                .info()
                .with_context(|| format!("program info of {name}"))?
                .id();
        }
        Ok(ids)
    }

    /// Ring-full drops of biosnoop and completions without a start entry (either
    /// reference), as the programs counted them.
    pub fn kernel_counts(&self) -> Result<(u64, u64)> {
        let map = self
            .ebpf
            .map(refs::COUNTS)
            .with_context(|| format!("no map {}", refs::COUNTS))?;
        let a: Array<&MapData, u64> = Array::try_from(map)?;
        Ok((
            a.get(&COUNT_SNOOP_DROPS, 0)?,
            a.get(&COUNT_START_MISSING, 0)?,
        ))
    }

    /// The reader thread's CPU time.
    pub fn reader_times(&self) -> super::alternation::TaskTimes {
        let mut t = super::alternation::TaskTimes::default();
        let tid = self.counts.tid.load(Ordering::Relaxed);
        if tid != 0 {
            t.add_thread(std::process::id(), tid);
        }
        t
    }

    /// Records the reader consumed so far.
    pub fn records_read(&self) -> u64 {
        self.counts.records.load(Ordering::Relaxed)
    }
}

impl Drop for RefPrograms {
    fn drop(&mut self) {
        if let Err(e) = self.detach_all() {
            eprintln!("xtask: bench: WARNING detaching the reference observers: {e:#}");
        }
        self.counts.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        // Dropping `ebpf` closes the programs and maps.
    }
}

/// The minimal consumer: wait for data, take every record, count it.
fn read_records(mut ring: RingBuf<aya::maps::MapData>, counts: &ReaderCounts) {
    // SAFETY: gettid has no arguments and cannot fail.
    counts
        .tid
        .store(unsafe { libc::gettid() } as u32, Ordering::Relaxed);
    let fd = ring.as_raw_fd();
    while !counts.stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let mut n = 0u64;
        while let Some(item) = ring.next() {
            n += u64::from(!item.is_empty());
        }
        if n > 0 {
            counts.records.fetch_add(n, Ordering::Relaxed);
        }
    }
}
