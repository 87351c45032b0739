//! What a running agent (started with `--pin`) is doing, read from its pinned maps,
//! the kernel's program statistics and the tuning state files: one JSON object
//! (`kml-agent status --json`), which is also what tools read (the soak, the bench).

use std::path::Path;

use aya::maps::{Array, PerCpuArray};
use kml_ebpf_common::{
    abi::names::map,
    model::{LinearModel, ModelKind, TreeModel},
    slot::{status_index, ModelControl, SlotStatus},
    Counter, Counters,
};
use serde_json::json;

use crate::observe::pins;

/// Average run time of the loaded kml programs (needs kernel.bpf_stats_enabled=1).
fn program_costs() -> Vec<(String, u64, u64)> {
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| {
            let name = p.name_as_str()?.to_owned();
            name.starts_with("kml_")
                .then(|| (name, p.run_count(), p.run_time().as_nanos() as u64))
        })
        .collect()
}

/// What `run --tune` is doing to each device: from the state files, with the values
/// the kernel reports now.
pub fn tuning() -> Vec<serde_json::Value> {
    use crate::act::tune::{state, sysfs::Queue};
    state::TuneState::all(&state::state_dir())
        .into_iter()
        .map(|(path, st)| match st {
            Ok(st) => {
                let current = Queue::of(&st.device).read().ok();
                json!({
                    "device": st.device, "dev": st.dev, "pid": st.pid,
                    "agent_running": crate::owner::agent_alive(st.pid),
                    "level": st.level, "originals": st.originals, "applied": st.applied,
                    "current": current, "decisions": st.decisions,
                })
            }
            Err(e) => json!({"file": path, "error": format!("{e:#}")}),
        })
        .collect()
}

/// The pinned agent's state at `dir`, with `tuning` (from [`tuning`]).
pub fn pinned(dir: &Path, tuning: &[serde_json::Value]) -> anyhow::Result<serde_json::Value> {
    let control: Array<_, ModelControl> = Array::try_from(pins::open(dir, map::MODEL_CONTROL)?)?;
    let control = control.get(&0, 0)?;
    let status: Array<_, SlotStatus> = Array::try_from(pins::open(dir, map::SLOT_STATUS)?)?;
    let kind = ModelKind::from_u32(control.kind);
    let (version, checksum_ok) = match kind {
        Some(ModelKind::Tree) => {
            let m: Array<_, TreeModel> = Array::try_from(pins::open(dir, map::TREE_MODELS)?)?;
            let m = m.get(&control.slot, 0)?;
            let st = status.get(&status_index(true, control.slot), 0)?;
            (m.version, st.vouches(m.version, m.checksum))
        }
        Some(_) => {
            let m: Array<_, LinearModel> = Array::try_from(pins::open(dir, map::LINEAR_MODELS)?)?;
            let m = m.get(&control.slot, 0)?;
            let st = status.get(&status_index(false, control.slot), 0)?;
            (m.version, st.vouches(m.version, m.checksum))
        }
        None => (0, false),
    };
    let counters: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(pins::open(dir, map::COUNTERS)?)?;
    let mut c = Counters::default();
    for cpu in counters.get(&0, 0)?.iter() {
        c.accumulate(cpu);
    }
    // Entries in use now (a soak watches this stay bounded).
    let inflight_entries = pins::live_entries(dir)?;
    let mut devs = Vec::new();
    for (dev, slot) in pins::traced_devices(dir)? {
        let st = crate::observe::device_state(&slot);
        let (major, minor) = kml_ebpf_common::kernel_dev_split(dev);
        devs.push(json!({
            "dev": format!("{major}:{minor}"),
            "read_expire_ms": slot.read_expire_ns / 1_000_000,
            "write_expire_ms": slot.write_expire_ns / 1_000_000,
            "inflight_read": st.inflight_read, "inflight_write": st.inflight_write,
            "queued_read": st.queued_read, "queued_write": st.queued_write,
        }));
    }
    let (tp, fp, tn, fnn) = (
        c.get(Counter::TrueMiss),
        c.get(Counter::FalseMiss),
        c.get(Counter::TrueMet),
        c.get(Counter::FalseMet),
    );
    let ratio = |a: u64, b: u64| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    let balanced = (ratio(tp, tp + fnn) + ratio(tn, tn + fp)) / 2.0;
    let accuracy = ratio(tp + tn, tp + fp + tn + fnn);
    let stats_on = crate::kernel::caps::bpf_stats_enabled();
    let costs: Vec<_> = program_costs()
        .into_iter()
        .map(|(name, runs, ns)| json!({"program": name, "runs": runs, "ns_per_run": if runs > 0 { ns as f64 / runs as f64 } else { 0.0 }}))
        .collect();
    let counters_json: serde_json::Map<String, serde_json::Value> = Counters::ALL
        .iter()
        .map(|k| (k.name().to_owned(), json!(c.get(*k))))
        .collect();
    // Who owns the pins: a running agent, or none (orphaned: the programs stay
    // attached and keep scoring, nobody reads the records until an agent adopts).
    let owner = std::fs::read_link(dir.join(crate::observe::pins::META))
        .ok()
        .and_then(|t| crate::observe::pins::PinMeta::decode(&t.to_string_lossy()).ok())
        .map(|m| m.owner_pid);
    let owner_running = owner.is_some_and(crate::owner::agent_alive);
    let report = json!({
        "pin_dir": dir,
        "owner_pid": owner,
        "owner_running": owner_running,
        "model": { "kind": kind.map(|k| k.name()), "slot": control.slot, "version": version, "checksum_ok": checksum_ok },
        "confusion": { "true_miss": tp, "false_miss": fp, "true_met": tn, "false_met": fnn },
        "accuracy": accuracy, "balanced_accuracy": balanced,
        "counters": counters_json,
        "devices": devs,
        "inflight_entries": inflight_entries,
        "bpf_stats_enabled": stats_on,
        "programs": costs,
        "tuning": tuning,
    });
    Ok(report)
}
