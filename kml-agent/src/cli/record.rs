//! `kml-agent record`: every request of the chosen devices into a CSV trace.

use std::{path::PathBuf, time::Duration};

use crate::{
    record::{record, RecordConfig},
    stats::human_ns,
};

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
    /// Machine-readable output for tools: a JSON object on stdout once recording
    /// (`"event": "ready"`) and one at the end (`"end"`: records, latencies, losses).
    /// Messages stay on stderr.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub observe: super::ObserveArgs,
}

impl RecordArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let config = RecordConfig {
            devices: self.device,
            duration: self.duration,
            out: self.out,
            attach: self.observe.attach,
            ring_bytes: self.observe.ring_size,
        };
        let json = self.json;
        crate::runtime::block_on(async {
            let r = record(&config, || {
                if json {
                    let ready = serde_json::json!({"devices": config.devices, "out": config.out});
                    // The records go to a file: a closed stdout loses none of them.
                    let _ = super::run::print_event("ready", &ready);
                }
            })
            .await?;
            if json {
                let _ = super::run::print_event("end", &r);
            }
            let elapsed = r.seconds;
            tracing::info!(
                "{} records in {elapsed:.1}s ({:.0}/s) to {}; deadline misses {}",
                r.records,
                r.records as f64 / elapsed.max(1e-9),
                config.out.display(),
                r.deadline_misses
            );
            tracing::info!(
                "insert→issue p50 {} p99 {} | issue→complete p50 {} p99 {}",
                human_ns(r.wait.p50_ns),
                human_ns(r.wait.p99_ns),
                human_ns(r.service.p50_ns),
                human_ns(r.service.p99_ns)
            );
            tracing::info!("{}", r.loss.line());
            for line in r.loss.counter_lines() {
                tracing::info!("{line}");
            }
            if r.undecodable > 0 {
                anyhow::bail!(
                    "{} ring buffer items had the wrong size (agent and eBPF object disagree)",
                    r.undecodable
                );
            }
            Ok(())
        })
    }
}
