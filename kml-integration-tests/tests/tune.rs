//! `run --tune` on a real loop device with mq-deadline: a model that flags every
//! read makes the agent change the tunables (always inside the safe range), one
//! that flags none leaves them alone, SIGTERM puts the originals back, and an agent
//! started after a SIGKILLed one restores what that one changed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use kml_agent::act::tune::{policy::Tunables, state::TuneState, sysfs::Queue};
use kml_integration_tests::{
    agent_bin, assert_no_kml_programs, signal, spawn_agent_with_env, wait_for_line, wait_until,
    Agent, ChildGuard, LoopDevice,
};

/// A scratch folder: the model files and the tuning state of one test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        let d = std::env::temp_dir().join(format!("kml-tune-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Scratch(d))
    }

    fn state_dir(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-leaf tree model file: every request at risk, or none.
fn constant_model(dir: &Path, at_risk: bool) -> Result<PathBuf> {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tree.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&shipped)?)?;
    let p = if at_risk { 1.0 } else { 0.0 };
    m["float"] = serde_json::json!({"tree": {"threshold": 0.5, "nodes": [
        {"feature": null, "split": 0.0, "left": 0, "right": 0, "p_miss": p, "samples": 1}]}});
    m["quantized"] = serde_json::json!({"tree": {"value_shift": 16, "threshold": 32768, "depth": 0,
        "nodes": [{"feature": null, "split": 0, "left": 0, "right": 0, "value": if at_risk { 65536 } else { 0 }}]}});
    m["metrics"] = serde_json::json!({});
    let path = dir.join(if at_risk {
        "all-at-risk.json"
    } else {
        "none-at-risk.json"
    });
    std::fs::write(&path, serde_json::to_string_pretty(&m)?)?;
    // The agent's own loader must take it (else the test would test nothing).
    kml_learn::model_file::LoadedModel::load(&path)
        .map_err(|e| anyhow::anyhow!("constant model refused: {e}"))?;
    Ok(path)
}

/// Random 4k reads at depth 4 beside 64k random writes at depth 64, for `secs`.
fn mixed_io(dev: &LoopDevice, secs: u32) -> Result<ChildGuard> {
    let child = Command::new("fio")
        // Options before the first --name are global (every job's).
        .args([
            "--direct=1",
            "--ioengine=libaio",
            "--time_based",
            &format!("--runtime={secs}"),
            &format!("--filename={}", dev.path.display()),
            "--name=reads",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=4",
            "--name=writes",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=64",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting fio")?;
    Ok(ChildGuard(child))
}

fn tune_agent(dev: &LoopDevice, model: &Path, state: &Path, extra: &[&str]) -> Result<Agent> {
    let mut args = vec![
        "run",
        "--device",
        &dev.name,
        "--model",
        model.to_str().context("utf-8 path")?,
        "--retrain-every",
        "0",
        "--tune",
        "--tune-every",
        "1s",
    ];
    args.extend_from_slice(extra);
    let agent = spawn_agent_with_env(
        &args,
        &[("KML_TUNE_STATE_DIR", state.to_str().context("utf-8 path")?)],
    )?;
    wait_for_line(&agent.stderr, "observing", Duration::from_secs(30))?;
    Ok(agent)
}

fn exit_code(agent: &mut Agent, timeout: Duration) -> Result<i32> {
    ensure!(
        wait_until(timeout, || matches!(agent.child.0.try_wait(), Ok(Some(_)))),
        "the agent did not exit within {timeout:?}"
    );
    Ok(agent.child.0.wait()?.code().unwrap_or(-1))
}

/// The test device as the kernel makes it: a fresh loop device with mq-deadline.
/// Its stock tunables and tags, written down here rather than taken from the
/// agent, so that the safe range below is the documented one (docs/tuning.md),
/// not whatever the code under test computes.
const STOCK: Tunables = Tunables {
    fifo_batch: 16,
    writes_starved: 2,
    async_depth: 256,
};
/// min(nr_requests 256, the loop driver's 128 hardware tags).
const STOCK_TAGS: u32 = 128;

/// docs/tuning.md's safe range for [`STOCK`]: fifo_batch 1 … original, writes_starved
/// original … max(original, 16), async_depth max(tags/2, 4) … original.
fn documented_range(t: &Tunables) -> bool {
    (1..=16).contains(&t.fifo_batch)
        && (2..=16).contains(&t.writes_starved)
        && (64..=256).contains(&t.async_depth)
}

/// Every iosched attribute but the three tunables kml may change (the expiries,
/// front_merges, prio_aging_expire, ...): name → value.
fn untouchable(dev: &LoopDevice) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dev.sys().join("queue/iosched"))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !Tunables::NAMES.contains(&name.as_str()) {
            out.insert(name, std::fs::read_to_string(e.path())?.trim().to_owned());
        }
    }
    Ok(out)
}

/// The test device is the one the constants describe, or the test cannot judge.
fn stock_device(dev: &LoopDevice, queue: &Queue) -> Result<Option<Tunables>> {
    let originals = queue.read()?;
    let tags = queue.tags()?;
    if originals != STOCK || tags != STOCK_TAGS {
        kml_testkit::skip::<()>(format_args!(
            "{} came up with {originals:?} and {tags} tags, not the stock {STOCK:?} and \
             {STOCK_TAGS} tags this test's safe range is written for (another kernel?)",
            dev.name
        ));
        return Ok(None);
    }
    Ok(Some(originals))
}

#[test]
fn tunes_when_reads_are_predicted_at_risk_and_restores_on_sigterm() -> Result<()> {
    let scratch = Scratch::new("raise")?;
    let dev = LoopDevice::new(256, 500, 5000)?;
    let queue = Queue::of(&dev.name);
    let Some(originals) = stock_device(&dev, &queue)? else {
        return Ok(());
    };
    let fixed = untouchable(&dev)?;
    ensure!(
        fixed.get("read_expire").map(String::as_str) == Some("500")
            && fixed.get("write_expire").map(String::as_str) == Some("5000"),
        "expiries not as set: {fixed:?}"
    );
    let model = constant_model(&scratch.0, true)?;
    let mut agent = tune_agent(&dev, &model, &scratch.state_dir(), &[])?;
    // Saved before the first change.
    let saved = TuneState::load(&TuneState::path(&scratch.state_dir(), &dev.name))?;
    ensure!(saved.originals == originals, "saved {:?}", saved.originals);
    let _io = mixed_io(&dev, 30)?;
    // Every value the kernel reports while the agent works stays in range.
    let mut seen = vec![originals];
    // And nothing else in iosched/ ever changes: the expiries are the deadlines.
    let mut touched = None;
    let raised = wait_until(Duration::from_secs(20), || {
        if let Ok(t) = queue.read() {
            if seen.last() != Some(&t) {
                seen.push(t);
            }
        }
        match untouchable(&dev) {
            Ok(now) if now != fixed => touched = Some(now),
            _ => {}
        }
        seen.len() >= 3
    });
    ensure!(
        touched.is_none(),
        "tuning changed attributes it must never touch: {fixed:?} -> {touched:?}"
    );
    for t in &seen {
        ensure!(
            documented_range(t),
            "{t:?} outside the documented safe range of the stock device"
        );
    }
    ensure!(raised, "the tunables did not move twice in 20 s: {seen:?}");
    let line = wait_for_line(&agent.stderr, "raise level", Duration::from_secs(5))?;
    ensure!(
        line.contains("of reads predicted at risk"),
        "the reason names no prediction: {line}"
    );
    // `status` shows the device, its originals and the decisions.
    let status = Command::new(agent_bin())
        .args(["status", "--json"])
        .env("KML_TUNE_STATE_DIR", scratch.state_dir())
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&status.stdout)
        .with_context(|| String::from_utf8_lossy(&status.stderr).into_owned())?;
    let t = &report["tuning"][0];
    ensure!(
        t["device"] == dev.name.as_str() && t["agent_running"] == true,
        "{t}"
    );
    ensure!(t["originals"]["fifo_batch"] == originals.fifo_batch, "{t}");
    ensure!(
        !t["decisions"].as_array().context("decisions")?.is_empty(),
        "{t}"
    );
    signal(&agent.child.0, libc::SIGTERM);
    ensure!(
        exit_code(&mut agent, Duration::from_secs(20))? == 0,
        "exit status"
    );
    ensure!(
        queue.read()? == originals,
        "not restored: {:?}",
        queue.read()?
    );
    ensure!(
        untouchable(&dev)? == fixed,
        "untouchable attributes changed"
    );
    ensure!(
        !TuneState::path(&scratch.state_dir(), &dev.name).exists(),
        "state file left behind"
    );
    assert_no_kml_programs()
}

#[test]
fn leaves_the_tunables_alone_when_no_read_is_predicted_at_risk() -> Result<()> {
    let scratch = Scratch::new("calm")?;
    let dev = LoopDevice::new(256, 500, 5000)?;
    let queue = Queue::of(&dev.name);
    let originals = queue.read()?;
    let model = constant_model(&scratch.0, false)?;
    let mut agent = tune_agent(&dev, &model, &scratch.state_dir(), &["--duration", "6s"])?;
    let _io = mixed_io(&dev, 8)?;
    let moved = wait_until(Duration::from_secs(6), || {
        queue.read().is_ok_and(|t| t != originals)
    });
    ensure!(!moved, "tunables changed: {:?}", queue.read()?);
    ensure!(
        exit_code(&mut agent, Duration::from_secs(20))? == 0,
        "exit status"
    );
    ensure!(queue.read()? == originals);
    assert_no_kml_programs()
}

#[test]
fn a_new_agent_restores_what_a_killed_one_changed() -> Result<()> {
    let scratch = Scratch::new("kill")?;
    let dev = LoopDevice::new(256, 500, 5000)?;
    let queue = Queue::of(&dev.name);
    let originals = queue.read()?;
    let risky = constant_model(&scratch.0, true)?;
    let calm = constant_model(&scratch.0, false)?;
    let mut first = tune_agent(&dev, &risky, &scratch.state_dir(), &[])?;
    let io = mixed_io(&dev, 30)?;
    ensure!(
        wait_until(Duration::from_secs(20), || queue
            .read()
            .is_ok_and(|t| t != originals)),
        "the first agent changed nothing"
    );
    // A second tuner of the same device is refused while the first one lives.
    let out = Command::new(agent_bin())
        .args(["run", "--device", &dev.name, "--tune", "--duration", "2s"])
        .env("KML_TUNE_STATE_DIR", scratch.state_dir())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains(&format!("is tuned by kml-agent pid {}", first.child.0.id())),
        "second tuner: {err}"
    );
    let pid = first.child.0.id();
    signal(&first.child.0, libc::SIGKILL);
    exit_code(&mut first, Duration::from_secs(10))?;
    drop(io);
    let left: Tunables = queue.read()?;
    ensure!(left != originals, "nothing left changed to restore");
    let state = TuneState::load(&TuneState::path(&scratch.state_dir(), &dev.name))?;
    ensure!(
        state.pid == pid && state.originals == originals,
        "{state:?}"
    );
    // A new agent puts the originals back before it starts.
    let mut second = tune_agent(&dev, &calm, &scratch.state_dir(), &["--duration", "2s"])?;
    ensure!(
        queue.read()? == originals,
        "not restored at start: {:?}",
        queue.read()?
    );
    ensure!(
        exit_code(&mut second, Duration::from_secs(20))? == 0,
        "exit status"
    );
    ensure!(queue.read()? == originals);
    ensure!(!TuneState::path(&scratch.state_dir(), &dev.name).exists());
    // `kml-agent restore` does the same without starting an agent.
    TuneState {
        pid: u32::MAX,
        applied: left,
        ..state
    }
    .save(&scratch.state_dir())?;
    queue.write(&originals, &left)?;
    let out = Command::new(agent_bin())
        .args(["restore", "--device", &dev.name])
        .env("KML_TUNE_STATE_DIR", scratch.state_dir())
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.contains("restored"),
        "restore: {said}"
    );
    ensure!(
        queue.read()? == originals,
        "restore left {:?}",
        queue.read()?
    );
    assert_no_kml_programs()
}
