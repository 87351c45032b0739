//! `kml-agent record`: every request of the chosen devices into a CSV trace.

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kml_ebpf_common::{trace, Counter};

use super::session;
use crate::stats::{human_ns, LatencySummary};

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Device to trace (`loop0` or `/dev/loop0`); repeat for several. Must use mq-deadline.
    #[arg(long, short, required = true)]
    pub device: Vec<String>,
    /// How long to record (10s, 500ms, 2m); Ctrl-C or SIGTERM stops earlier.
    #[arg(long, value_parser = super::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// CSV file to write (header row first).
    #[arg(long, short)]
    pub out: PathBuf,
    #[command(flatten)]
    pub observe: session::ObserveArgs,
}

impl RecordArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        session::block_on(self.run())
    }

    async fn run(self) -> anyhow::Result<()> {
        let targets = session::resolve(&self.device)?;
        let file =
            File::create(&self.out).with_context(|| format!("creating {}", self.out.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        writeln!(out, "{}", trace::header())?;

        let mut observer = match session::start(&targets, &self.observe) {
            Ok(o) => o,
            Err(e) => {
                // Leave nothing behind for a recording that never started.
                drop(out);
                let _ = std::fs::remove_file(&self.out);
                return Err(e);
            }
        };
        let mut stream = observer.records()?;
        // Before the ready line: a signal right after it must find the handlers.
        let signal = session::shutdown_signal();
        tokio::pin!(signal);
        tracing::info!(
            "recording {} ({}) for {:?} into {}",
            self.device.join(", "),
            observer.mode(),
            self.duration,
            self.out.display()
        );

        let started = Instant::now();
        let deadline = tokio::time::sleep(self.duration);
        tokio::pin!(deadline);
        let mut batch = Vec::with_capacity(8192);
        let mut wait = Vec::new();
        let mut service = Vec::new();
        let mut misses = 0u64;
        let mut write_batch =
            |batch: &mut Vec<kml_ebpf_common::RequestRecord>| -> anyhow::Result<()> {
                for r in batch.iter() {
                    trace::write_row(&mut out, r)?;
                    if r.issue_ns != 0 {
                        wait.push(r.insert_to_issue_ns());
                        service.push(r.issue_to_complete_ns());
                    }
                    misses += u64::from(r.deadline_missed());
                }
                batch.clear();
                Ok(())
            };
        loop {
            tokio::select! {
                () = &mut deadline => break,
                sig = &mut signal => { tracing::info!("{}, stopping", sig?); break }
                n = stream.next_batch(&mut batch) => { n?; write_batch(&mut batch)?; }
            }
        }
        // Detach first so the ring holds everything that will ever be emitted.
        observer.detach();
        stream.drain(&mut batch);
        write_batch(&mut batch)?;
        out.flush()
            .with_context(|| format!("writing {}", self.out.display()))?;

        let counters = observer.counters()?;
        let loss = session::losses(&observer)?;
        let elapsed = started.elapsed().as_secs_f64();
        let records = counters.get(Counter::Records);
        let wait = LatencySummary::of(wait);
        let service = LatencySummary::of(service);
        tracing::info!(
            "{records} records in {elapsed:.1}s ({:.0}/s) to {}; deadline misses {misses}",
            records as f64 / elapsed.max(1e-9),
            self.out.display()
        );
        tracing::info!(
            "insert→issue p50 {} p99 {} | issue→complete p50 {} p99 {}",
            human_ns(wait.p50_ns),
            human_ns(wait.p99_ns),
            human_ns(service.p50_ns),
            human_ns(service.p99_ns)
        );
        tracing::info!("{}", loss.line());
        if stream.undecodable > 0 {
            anyhow::bail!(
                "{} ring buffer items had the wrong size (agent and eBPF object disagree)",
                stream.undecodable
            );
        }
        Ok(())
    }
}
