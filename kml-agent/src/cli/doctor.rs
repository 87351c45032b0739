//! `kml-agent doctor`: what the running kernel offers, and the attach mode.

use serde_json::json;

use crate::{
    devices,
    kernel::{attach::AttachRequest, caps::KernelReport},
};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// One JSON object on standard output (same checks, devices and mode).
    #[arg(long)]
    pub json: bool,
}

/// mq-deadline's tunables worth showing, in this order.
const IOSCHED_SHOWN: [&str; 5] = [
    "read_expire",
    "write_expire",
    "fifo_batch",
    "writes_starved",
    "front_merges",
];

impl DoctorArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let report = KernelReport::probe();
        // Unattached loop devices (size 0) are noise.
        let disks: Vec<_> = devices::list()
            .into_iter()
            .filter(|d| d.size_sectors > 0)
            .collect();
        // The observers' mode, and the hook when this kernel has it.
        let mode = report.plan(AttachRequest::Auto);
        if self.json {
            let value = json!({
                "kernel": report.release,
                "checks": report.checks.iter().map(|c| json!({
                    "name": c.name, "ok": c.ok, "detail": c.detail,
                })).collect::<Vec<_>>(),
                "devices": disks.iter().map(|d| json!({
                    "name": d.name,
                    "dev": format!("{}:{}", d.major, d.minor),
                    "size_sectors": d.size_sectors,
                    "scheduler": d.scheduler,
                    "iosched": d.iosched,
                })).collect::<Vec<_>>(),
                "attach_mode": mode.as_ref().ok().map(|m| m.to_string()),
                "attach_error": mode.as_ref().err().map(|e| format!("{e:#}")),
            });
            println!("{value}");
            return mode.map(|_| ());
        }
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
        for d in &disks {
            let iosched = IOSCHED_SHOWN
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
        match mode {
            Ok(mode) => {
                println!("attach mode: {mode}");
                Ok(())
            }
            Err(e) => {
                println!("attach mode: none");
                Err(e)
            }
        }
    }
}
