//! `kml-agent doctor`: what the running kernel offers, and the attach mode.

use crate::{
    devices,
    kernel::caps::{AttachRequest, KernelReport},
};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

impl DoctorArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let report = KernelReport::probe();
        println!("kml doctor: kernel {}", report.release);
        for c in &report.checks {
            println!(
                "  [{}] {:<16} {}",
                if c.ok { "yes" } else { "no " },
                c.name,
                c.detail
            );
        }
        println!("block devices:");
        // Unattached loop devices (size 0) are noise.
        for d in devices::list().into_iter().filter(|d| d.size_sectors > 0) {
            let iosched = [
                "read_expire",
                "write_expire",
                "fifo_batch",
                "writes_starved",
                "front_merges",
            ]
            .iter()
            .filter_map(|k| d.iosched.get(*k).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(" ");
            println!(
                "  {:<10} {:>4}:{:<4} scheduler {:<12} {}",
                d.name,
                d.major,
                d.minor,
                d.scheduler.as_deref().unwrap_or("none"),
                iosched
            );
        }
        match report.plan(AttachRequest::Auto) {
            Ok(plan) => {
                println!("attach mode: {plan}");
                Ok(())
            }
            Err(e) => {
                println!("attach mode: none");
                Err(e)
            }
        }
    }
}
