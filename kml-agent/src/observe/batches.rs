//! The per-CPU record batches ([`RecordBatch`]): the programs stage finished
//! requests per CPU and write them to the ring eight at a time, which saves the
//! ring's reserve and commit on seven records of eight (issue 14). What a CPU
//! has staged reaches the ring when its batch fills, or when the agent runs
//! `kml_flush_records` on that CPU: on its poll timer and when it detaches.
//!
//! Batching is turned on only once every online CPU could be flushed
//! (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`, Linux 5.10); else each
//! record goes to the ring alone, as before.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    maps::{PerCpuArray, PerCpuValues},
    programs::RawTracePoint,
    Ebpf,
};
use kml_ebpf_common::{
    abi::names::{map, program},
    RecordBatch,
};

use crate::object::{map_mut, program as program_mut};

/// `kml_flush_records`' answer when a program on that CPU was changing the batch.
const BUSY: u32 = 1;
/// How often a busy CPU is tried again, and how long apart: a program holds its
/// batch for well under a microsecond.
const BUSY_TRIES: u32 = 1000;
const BUSY_WAIT: Duration = Duration::from_micros(50);

/// Flushes every online CPU's batch (a clone of the flush program's fd).
#[derive(Debug)]
pub struct BatchFlusher {
    prog: OwnedFd,
}

impl BatchFlusher {
    /// Loads (verifies) `kml_flush_records` and checks that it runs on every
    /// online CPU. An error names what is missing; the caller falls back to one
    /// record per ring write.
    pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<BatchFlusher> {
        let p: &mut RawTracePoint = program_mut(ebpf, program::FLUSH_RECORDS)?;
        p.load()
            .with_context(|| format!("verifying {}", program::FLUSH_RECORDS))?;
        let prog = p.fd()?.as_fd().try_clone_to_owned()?;
        let flusher = BatchFlusher { prog };
        // Nothing is staged yet on a fresh object, and a killed agent's batches
        // (adopted pins) are flushed rightly: the probe is a real flush.
        flusher.flush().context(
            "running the record flush on each CPU (BPF_PROG_TEST_RUN on a chosen CPU, Linux 5.10)",
        )?;
        Ok(flusher)
    }

    /// Writes every CPU's staged records to the ring. A CPU whose batch a
    /// program is changing is tried again until it is free.
    pub fn flush(&self) -> anyhow::Result<()> {
        // Read each time: a CPU brought online since has a batch too.
        let cpus =
            aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        for cpu in cpus {
            let mut tries = 0;
            loop {
                let rc = match crate::sys::test_run_on_cpu(self.prog.as_fd(), cpu) {
                    Ok(rc) => rc,
                    // Gone offline since: its batch waits for it to come back.
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("flushing the records staged on CPU {cpu}"))
                    }
                };
                if rc != BUSY {
                    break;
                }
                tries += 1;
                anyhow::ensure!(
                    tries < BUSY_TRIES,
                    "CPU {cpu}'s record batch stayed busy for {BUSY_TRIES} tries"
                );
                std::thread::sleep(BUSY_WAIT);
            }
        }
        Ok(())
    }

    pub fn try_clone(&self) -> anyhow::Result<BatchFlusher> {
        Ok(BatchFlusher {
            prog: self.prog.try_clone()?,
        })
    }
}

/// The flush program, checked, and batching turned on (`fresh`: before the
/// programs are attached; adopted pins keep the killed agent's setting). `None`
/// when a CPU cannot be flushed: said, and each record then goes to the ring alone.
pub fn start(ebpf: &mut Ebpf, fresh: bool) -> Option<BatchFlusher> {
    let started = BatchFlusher::load(ebpf).and_then(|f| {
        if fresh {
            enable(ebpf)?;
        }
        Ok(f)
    });
    match started {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("record batches off, each record goes to the ring alone: {e:#}");
            None
        }
    }
}

/// Turns batching on for every CPU. Only before the programs are attached: it
/// writes the whole of each CPU's (empty) batch.
pub fn enable(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
    let mut batches: PerCpuArray<&mut aya::maps::MapData, RecordBatch> =
        map_mut(ebpf, map::BATCHES)?;
    let values = PerCpuValues::try_from(vec![RecordBatch::empty(true); cpus])
        .context("one batch per possible CPU")?;
    batches
        .set(0, values, 0)
        .context("turning the record batches on")
}
