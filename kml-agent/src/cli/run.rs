//! `kml-agent run`: observe mq-deadline devices, one live line per second.

use std::time::{Duration, Instant};

use kml_ebpf_common::Counter;

use super::session;
use crate::{
    stats::{human_ns, RecordSummary},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Devices to observe (default: every disk whose scheduler is mq-deadline).
    #[arg(long, short)]
    pub device: Vec<String>,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub observe: session::ObserveArgs,
}

impl RunArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        session::block_on(self.run())
    }

    async fn run(self) -> anyhow::Result<()> {
        let mut observer = session::start(&session::resolve(&self.device)?, &self.observe)?;
        let mut stream = observer.records()?;
        let names: Vec<String> = observer.devices().iter().map(|d| d.device.name.clone()).collect();
        eprintln!("kml-agent: observing {} ({}); Ctrl-C stops", names.join(", "), observer.mode());

        let started = Instant::now();
        let stop_after = tokio::time::sleep(self.duration.unwrap_or(Duration::MAX / 4));
        tokio::pin!(stop_after);
        let signal = session::shutdown_signal();
        tokio::pin!(signal);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut window = Vec::with_capacity(65536);
        let mut total = 0u64;
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                () = &mut stop_after => break,
                sig = &mut signal => { eprintln!("kml-agent: {}, detaching", sig?); break }
                _ = tick.tick() => {
                    let secs = last_tick.elapsed().as_secs_f64();
                    last_tick = Instant::now();
                    let s = RecordSummary::of(&window);
                    total += window.len() as u64;
                    let counters = observer.counters()?;
                    println!(
                        "[{:>5.0}s] {:>7.0} rec/s | wait p50 {:>8} p99 {:>8} | service p50 {:>8} p99 {:>8} | misses {} ({:.1}%) | drops {} orphans {}",
                        started.elapsed().as_secs_f64(),
                        s.records as f64 / secs,
                        human_ns(s.insert_to_issue.p50_ns),
                        human_ns(s.insert_to_issue.p99_ns),
                        human_ns(s.issue_to_complete.p50_ns),
                        human_ns(s.issue_to_complete.p99_ns),
                        s.deadline_misses,
                        100.0 * s.deadline_misses as f64 / (s.records.max(1)) as f64,
                        counters.get(Counter::RingFullDrops),
                        counters.get(Counter::OrphanCompletions),
                    );
                    window.clear();
                }
                n = stream.next_batch(&mut window) => { n?; }
            }
        }
        observer.detach();
        stream.drain(&mut window);
        total += window.len() as u64;
        let loss = session::losses(&observer)?;
        eprintln!("kml-agent: {total} records in {:.1}s; {}", started.elapsed().as_secs_f64(), loss.line());
        Ok(())
    }
}
