//! `kml-agent status`: what a running agent (started with `--pin`) is doing (read by
//! [`crate::status`]), printed for people or as one JSON object.

use std::path::PathBuf;

use kml_ebpf_common::{model::ModelKind, Counter};
use serde_json::{json, Value};

use crate::{observe::pins, status};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Where the agent pinned its maps.
    #[arg(long, default_value = pins::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// One JSON object on standard output.
    #[arg(long)]
    pub json: bool,
}

fn print_tuning(tuning: &[serde_json::Value]) {
    for t in tuning {
        if let Some(e) = t.get("error") {
            println!("  tuning     {}: {e}", t["file"]);
            continue;
        }
        let names = crate::act::tune::policy::Tunables::NAMES;
        let show = |v: &serde_json::Value| {
            names
                .iter()
                .map(|n| format!("{n} {}", v.get(n).unwrap_or(&json!("?"))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let running = if t["agent_running"].as_bool() == Some(true) {
            "running"
        } else {
            "NOT running: `kml-agent restore` puts the originals back"
        };
        println!(
            "  tuning     {} by pid {} ({running}) at level {}",
            t["device"].as_str().unwrap_or("?"),
            t["pid"],
            t["level"]
        );
        println!("             now       {}", show(&t["current"]));
        println!("             originals {}", show(&t["originals"]));
        for d in t["decisions"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .take(5)
        {
            println!(
                "             {} {} {} -> {}: {} ({})",
                d["at_unix"],
                d["action"].as_str().unwrap_or("?"),
                d["from_level"],
                d["to_level"],
                d["change"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?")
            );
        }
    }
}

impl StatusArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        crate::kernel::caps::require_privileges()?;
        let tuning = status::tuning();
        match status::pinned(&self.pin_dir, &tuning) {
            Ok(report) if self.json => {
                println!("{report}");
                Ok(())
            }
            Ok(report) => {
                print_pinned(&self.pin_dir, &report);
                print_tuning(&tuning);
                Ok(())
            }
            // `run --tune` without --pin: the tuning state is all there is to show.
            Err(e) if !tuning.is_empty() => {
                if self.json {
                    println!("{}", json!({"pinned": format!("{e:#}"), "tuning": tuning}));
                } else {
                    println!("kml status: no pinned maps ({e:#})");
                    print_tuning(&tuning);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The pinned agent's state (from [`status::pinned`]), for people.
fn print_pinned(dir: &std::path::Path, r: &Value) {
    println!("kml status (maps pinned at {})", dir.display());
    let owner = r["owner_pid"].as_u64();
    match (owner, r["owner_running"].as_bool() == Some(true)) {
        (Some(pid), true) => println!("  agent      pid {pid} running"),
        (Some(pid), false) => println!("  agent      none running (pid {pid} is gone): programs stay attached with the last model; `kml-agent run --pin` adopts them, a clean exit removes them"),
        (None, _) => println!("  agent      unknown (no {} description)", pins::META),
    }
    let model = &r["model"];
    match model["kind"].as_str().and_then(ModelKind::from_name) {
        Some(k) => println!(
            "  model      v{} {} in slot {} (in-kernel checker {})",
            model["version"],
            k.name(),
            model["slot"],
            if model["checksum_ok"].as_bool() == Some(true) {
                "ok"
            } else {
                "REFUSED"
            }
        ),
        None => println!("  model      none (observing only)"),
    }
    let c = |k: Counter| r["counters"][k.name()].as_u64().unwrap_or(0);
    println!(
        "  verdicts   {} ({} at risk), rejected {}",
        c(Counter::Verdicts),
        c(Counter::VerdictsAtRisk),
        c(Counter::ModelRejects)
    );
    let (tp, fp, tn, fnn) = (
        c(Counter::TrueMiss),
        c(Counter::FalseMiss),
        c(Counter::TrueMet),
        c(Counter::FalseMet),
    );
    if tp + fp + tn + fnn > 0 {
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        println!(
            "  live       tp {tp} fp {fp} tn {tn} fn {fnn}: accuracy {:.3}, balanced accuracy {:.3}",
            f(&r["accuracy"]),
            f(&r["balanced_accuracy"])
        );
    } else {
        println!("  live       no scored request has completed yet");
    }
    println!(
        "  records    {} | drops {} | sampled out {} | orphans {}",
        c(Counter::Records),
        c(Counter::RingFullDrops),
        c(Counter::SampledOut),
        c(Counter::OrphanCompletions)
    );
    println!("  in flight  {} entries", r["inflight_entries"]);
    for d in r["devices"].as_array().into_iter().flatten() {
        println!("  device     {d}");
    }
    if r["bpf_stats_enabled"].as_bool() == Some(true) {
        for p in r["programs"].as_array().into_iter().flatten() {
            println!(
                "  cost       {} ns/run over {} runs: {}",
                p["ns_per_run"], p["runs"], p["program"]
            );
        }
    } else {
        println!(
            "  cost       unknown: `sysctl kernel.bpf_stats_enabled=1` to measure ns per decision"
        );
    }
}
