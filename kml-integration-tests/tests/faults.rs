//! Faults an operator's box will see: the agent killed (SIGKILL) at any moment,
//! also in the middle of a model write, with and without `--pin`; disks that go
//! away and come (back) while the agent observes them.
//!
//! Loaded programs are attributed through /proc/PID/fdinfo (program and link fds
//! name their `prog_id`), so other agents and tests on the machine are neither
//! blamed nor counted (`kml_integration_tests::LeakCheck`); every test ends with
//! the leak check.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use aya::maps::{Array, PerCpuArray, RingBuf};
use kml_agent::observe::pins as pin;
use kml_ebpf_common::{
    abi::names::{map, program, EVENTS},
    features::features_of_record,
    model::{LinearModel, ModelKind, TreeModel},
    slot::{status_index, ModelControl, SlotStatus},
    Counter, Counters, DeviceState, Verdict,
};
use kml_integration_tests::{
    accounting::{explain, program_misses, Losses},
    prog_ids_of,
};
use kml_integration_tests::{
    agent_bin, issue_direct, read_trace, scattered_pattern, signal, spawn_agent_with_env,
    wait_for_line, wait_until, Agent, ChildGuard, LeakCheck, LoopDevice, Recording, TestMount,
};
use kml_learn::QuantizedModel;

/// Programs one agent holds: the observers, the tail-called stages (position,
/// inference), the slot checker and the record flush (both run on demand).
const PROGRAMS: usize = EVENTS.len() + kml_ebpf_common::abi::names::stage::COUNT + 2;
fn kill9(agent: &mut Agent) -> Result<()> {
    signal(&agent.child.0, libc::SIGKILL);
    let status = agent.child.0.wait()?;
    ensure!(
        status.code().is_none(),
        "the agent exited by itself ({status}) before SIGKILL"
    );
    Ok(())
}

/// A pin directory of this test, removed (with whatever is pinned) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/kml-test-{tag}-{}",
            std::process::id()
        )))
    }
    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8")
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = kml_agent::observe::pins::clear(&self.0);
    }
}

/// A background fio (random mixed 4 KiB, moderate depth) until dropped.
struct Fio {
    _child: ChildGuard,
}

impl Fio {
    fn start(dev: &LoopDevice, seconds: u32) -> Result<Fio> {
        let child = Command::new("fio")
            .args([
                "--name=faults",
                "--rw=randrw",
                "--bs=4k",
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=8",
                "--rate_iops=1500",
                // Jobs as threads: killing fio (the guard) ends all its I/O at once.
                "--thread",
                "--time_based",
            ])
            .arg(format!("--runtime={seconds}"))
            .arg(format!("--filename={}", dev.path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting fio")?;
        Ok(Fio {
            _child: ChildGuard(child),
        })
    }
}

fn counters(dir: &Path) -> Result<Counters> {
    let map: PerCpuArray<_, Counters> = PerCpuArray::try_from(pin::open(dir, map::COUNTERS)?)?;
    let mut c = Counters::default();
    for cpu in map.get(&0, 0)?.iter() {
        c.accumulate(cpu);
    }
    Ok(c)
}

/// The active model as the pinned maps hold it, checked the way the kernel does:
/// the checker vouches for exactly this (version, checksum), and the contents
/// match the checksum (nothing torn).
fn active_model(dir: &Path) -> Result<Option<(u32, QuantizedModel)>> {
    let control: Array<_, ModelControl> = Array::try_from(pin::open(dir, map::MODEL_CONTROL)?)?;
    let control = control.get(&0, 0)?;
    let status: Array<_, SlotStatus> = Array::try_from(pin::open(dir, map::SLOT_STATUS)?)?;
    let Some(kind) = ModelKind::from_u32(control.kind) else {
        return Ok(None);
    };
    let (version, checksum, intact, model) = if kind.is_linear() {
        let m: Array<_, LinearModel> = Array::try_from(pin::open(dir, map::LINEAR_MODELS)?)?;
        let m = m.get(&control.slot, 0)?;
        (
            m.version,
            m.checksum,
            m.checksum_ok(),
            QuantizedModel::Linear(Box::new(m)),
        )
    } else {
        let m: Array<_, TreeModel> = Array::try_from(pin::open(dir, map::TREE_MODELS)?)?;
        let m = m.get(&control.slot, 0)?;
        (
            m.version,
            m.checksum,
            m.checksum_ok(),
            QuantizedModel::Tree(Box::new(m)),
        )
    };
    let st = status.get(&status_index(!kind.is_linear(), control.slot), 0)?;
    ensure!(
        st.vouches(version, checksum),
        "active slot {} (v{version}) is not vouched for by the checker: {st:?}",
        control.slot
    );
    ensure!(
        intact,
        "active slot {} (v{version}) is torn: checksum mismatch",
        control.slot
    );
    Ok(Some((version, model)))
}

/// Reads records from the pinned ring (nobody else consumes it while the agent is
/// dead) for `during`; checks every record scored by `version` against the host's
/// inference. Returns (records, checked).
fn check_orphan_verdicts(
    dir: &Path,
    version: u32,
    model: &QuantizedModel,
    during: Duration,
) -> Result<(usize, usize)> {
    let mut ring = RingBuf::try_from(pin::open(dir, map::RECORDS)?)?;
    let (mut n, mut checked) = (0, 0);
    let end = Instant::now() + during;
    while Instant::now() < end {
        while let Some(item) = ring.next() {
            let records =
                kml_agent::observe::ring::decode(&item).context("an item of the wrong size")?;
            for r in records {
                n += 1;
                if r.verdict == Verdict::NONE || r.model_version != version {
                    continue;
                }
                let host = model.infer(&features_of_record(&r));
                ensure!(
                    host.score == r.score && host.at_risk == (r.verdict == Verdict::AT_RISK),
                    "v{version}: kernel score {} verdict {}, host score {} at_risk {}",
                    r.score,
                    r.verdict,
                    host.score,
                    host.at_risk
                );
                checked += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((n, checked))
}

/// What a kill between a slot write and its check leaves: the idle slot half
/// written (contents that do not match its checksum, a newer version). The kernel
/// keeps scoring with the active model; and even pointed at the torn slot (which
/// the agent never does: it flips only after the checker vouched), the model stage
/// refuses it (no verdict, counted) instead of using it.
fn torn_slots_are_never_used(dir: &Path, active_version: u32) -> Result<()> {
    let mut control: Array<_, ModelControl> = Array::try_from(pin::open(dir, map::MODEL_CONTROL)?)?;
    let ctl = control.get(&0, 0)?;
    ensure!(
        ModelKind::from_u32(ctl.kind).is_some_and(|k| k.is_linear()),
        "the test expects a linear model"
    );
    let mut models: Array<_, LinearModel> = Array::try_from(pin::open(dir, map::LINEAR_MODELS)?)?;
    let idle = 1 - ctl.slot;
    let mut torn = models.get(&ctl.slot, 0)?;
    torn.version = active_version + 1000;
    torn.weight[0] = torn.weight[0].wrapping_add(12345);
    ensure!(
        !torn.checksum_ok(),
        "the torn model should not match its checksum"
    );
    models.set(idle, torn, 0)?;

    let scored = |c: &Counters| (c.get(Counter::Verdicts), c.get(Counter::ModelRejects));
    let (v0, r0) = scored(&counters(dir)?);
    std::thread::sleep(Duration::from_millis(500));
    let (v1, r1) = scored(&counters(dir)?);
    ensure!(
        v1 > v0 && r1 == r0,
        "a torn idle slot disturbed scoring: verdicts {v0}->{v1}, rejects {r0}->{r1}"
    );

    control.set(0, ModelControl { slot: idle, ..ctl }, 0)?;
    // Program runs that read the control before the flip may still score with the
    // active model: count from a moment after they ended.
    std::thread::sleep(Duration::from_millis(50));
    let (v1, r1) = scored(&counters(dir)?);
    std::thread::sleep(Duration::from_millis(500));
    let (v2, r2) = scored(&counters(dir)?);
    control.set(0, ctl, 0)?;
    ensure!(
        r2 > r1 && v2 == v1,
        "pointed at a torn slot, the kernel still scored: verdicts {v1}->{v2}, rejects {r1}->{r2}"
    );
    eprintln!(
        "torn slot: ignored while idle; pointed at, refused {} times and never used",
        r2 - r1
    );
    Ok(())
}

fn status_json(pins: &PinDir) -> Result<serde_json::Value> {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--pin-dir", pins.arg()])
        .output()?;
    ensure!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn model_path() -> String {
    format!("{}/../models/logistic.json", env!("CARGO_MANIFEST_DIR"))
}

/// A pseudo-random pause in [lo, hi) ms (no RNG dependency: time-seeded LCG).
fn jitter(lo: u64, hi: u64, i: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let seed = now ^ (u64::from(std::process::id()) << 16) ^ i;
    let x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        >> 33;
    Duration::from_millis(lo + x % (hi - lo))
}

#[test]
fn sigkill_without_pin_takes_every_program_away() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let dev = LoopDevice::new(256, 50, 500)?;
    let _fio = Fio::start(&dev, 120)?;
    let model = model_path();
    for round in 0..5 {
        let mut agent = spawn_agent_with_env(
            &[
                "run",
                "--device",
                &dev.name,
                "--model",
                &model,
                "--retrain-every",
                "0",
            ],
            // Swap models continuously: the kill lands in or near a slot write.
            &[("KML_TEST_SWAP_EVERY", "2ms")],
        )?;
        wait_for_line(&agent.stderr, "observing", Duration::from_secs(60))?;
        let held = prog_ids_of(agent.child.0.id());
        let mine = leaks.programs()?;
        ensure!(
            mine.len() == PROGRAMS && mine.keys().all(|id| held.contains(id)),
            "round {round}: the agent holds {held:?}, this test's programs are {mine:?}"
        );
        std::thread::sleep(jitter(100, 900, round));
        kill9(&mut agent)?;
        leaks
            .assert_none_left()
            .with_context(|| format!("round {round}"))?;
    }
    Ok(())
}

/// `record` killed while it writes (SIGKILL, the OOM killer) leaves a trace that
/// reads back to its last write: the file ends at a line's end, never in the
/// middle of a row (which the trace reader refuses, losing the whole recording).
#[test]
fn a_recording_killed_mid_write_reads_back_to_its_last_write() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let dev = LoopDevice::new(256, 50, 500)?;
    let _fio = Fio::start(&dev, 120)?;
    for round in 0..3u64 {
        let mut recording = Recording::start(&dev, &format!("killed-record-{round}"))?;
        let csv = recording.csv.clone();
        // The writer's buffer (1 MiB) reaches the file in whole writes: wait for
        // the first, then kill at some moment before or after the next.
        ensure!(
            wait_until(Duration::from_secs(60), || std::fs::metadata(&csv)
                .is_ok_and(|m| m.len() > 0)),
            "round {round}: nothing reached {} in 60 s",
            csv.display()
        );
        std::thread::sleep(jitter(0, 3000, round));
        kill9(&mut recording.agent)?;
        let text = std::fs::read(&csv)?;
        ensure!(
            text.last() == Some(&b'\n'),
            "round {round}: the killed recording ends mid-line ({} bytes)",
            text.len()
        );
        let rows = recording
            .rows()
            .with_context(|| format!("round {round}: the killed recording does not read"))?;
        ensure!(
            !rows.is_empty(),
            "round {round}: no record in the killed recording"
        );
        eprintln!(
            "round {round}: {} records read back after SIGKILL",
            rows.len()
        );
        leaks
            .assert_none_left()
            .with_context(|| format!("round {round}"))?;
    }
    Ok(())
}

/// `record` onto a disk that fills: the error names the file and what reached
/// it, and the trace is cut back to its last whole row, so it still reads.
#[test]
fn a_recording_onto_a_full_disk_names_the_file_and_keeps_whole_rows() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let dev = LoopDevice::new(256, 50, 500)?;
    let _fio = Fio::start(&dev, 120)?;
    let fs = TestMount::new("full-disk", "tmpfs", "size=256k")?;
    let csv = fs.0.join("trace.csv");
    // The first write comes when the 1 MiB buffer fills (~5 s at fio's rate).
    let out = Command::new(agent_bin())
        .args([
            "record",
            "--device",
            &dev.name,
            "--duration",
            "60s",
            "--out",
        ])
        .arg(&csv)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "record onto a 256 KiB disk succeeded: {stderr}"
    );
    for needle in [
        format!("writing {}", csv.display()),
        "No space left on device".to_owned(),
        "cut back to its last whole row".to_owned(),
    ] {
        ensure!(
            stderr.contains(&needle),
            "record's error lacks {needle:?}: {stderr}"
        );
    }
    let rows = read_trace(&csv).context("the trace left on the full disk does not read")?;
    ensure!(!rows.is_empty(), "no record on the full disk: {stderr}");
    eprintln!("{} records read back from the full disk", rows.len());
    leaks.assert_none_left()
}

#[test]
fn sigkill_with_pin_keeps_the_last_good_model_serving_and_a_restart_adopts_it() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let dev = LoopDevice::new(256, 50, 500)?;
    let pins = PinDir::new("kill");
    let _fio = Fio::start(&dev, 180)?;
    let model = model_path();
    let args = [
        "run",
        "--device",
        &dev.name,
        "--model",
        &model,
        "--retrain-every",
        "0",
        "--pin",
        "--pin-dir",
        pins.arg(),
    ];
    let env = [("KML_TEST_SWAP_EVERY", "2ms")];
    let mut orphaned: Option<BTreeMap<u32, String>> = None;
    let mut agent = spawn_agent_with_env(&args, &env)?;
    wait_for_line(&agent.stderr, "pinned a new set", Duration::from_secs(60))?;
    // fio's I/O flowing and being scored before the first kill: under load fio may
    // not have issued anything yet, and the checks after the kill need verdicts.
    ensure!(
        wait_until(Duration::from_secs(60), || {
            counters(&pins.0).is_ok_and(|c| c.get(Counter::Verdicts) > 100)
        }),
        "no request scored within 60 s of the first agent's start"
    );
    for round in 0..5u64 {
        let pid = agent.child.0.id();
        wait_for_line(&agent.stderr, "observing", Duration::from_secs(60))?;
        let set = leaks.programs()?;
        let names: BTreeSet<&String> = set.values().collect();
        ensure!(
            set.len() == PROGRAMS && names.len() == PROGRAMS,
            "round {round}: not exactly one set of kml programs: {set:?}"
        );
        if let Some(old) = &orphaned {
            // Adopted: the attached programs are the very ones the killed agent left.
            ensure!(
                old.keys().all(|id| set.contains_key(id)),
                "round {round}: the restarted agent did not adopt {old:?} (holds {set:?})"
            );
            // And status reads the adopted pins, naming the new owner.
            let st = status_json(&pins)?;
            ensure!(
                st["owner_pid"] == pid
                    && st["owner_running"] == true
                    && st["model"]["checksum_ok"] == true,
                "round {round}: status on adopted pins: {st}"
            );
        }
        std::thread::sleep(jitter(200, 1200, round));
        kill9(&mut agent)?;

        // Dead agent: the programs stay attached (links pinned) and keep scoring
        // with a model the checker vouched for.
        std::thread::sleep(Duration::from_millis(200));
        let left = leaks.programs()?;
        ensure!(
            left.len() == PROGRAMS - 2
                && !left
                    .values()
                    .any(|n| n == program::VERIFY_SLOTS || n == program::FLUSH_RECORDS),
            "round {round}: after SIGKILL expected the {} event programs and the {} stages, found {left:?}",
            EVENTS.len(),
            kml_ebpf_common::abi::names::stage::COUNT
        );
        let (version, active) = active_model(&pins.0)?.context("no active model after the kill")?;
        if round == 0 {
            torn_slots_are_never_used(&pins.0, version)?;
        }
        let before = counters(&pins.0)?;
        let (records, checked) =
            check_orphan_verdicts(&pins.0, version, &active, Duration::from_secs(1))?;
        let after = counters(&pins.0)?;
        let verdicts = after.get(Counter::Verdicts) - before.get(Counter::Verdicts);
        eprintln!(
            "round {round}: v{version} active after the kill; {verdicts} verdicts in 1 s; {checked} of {records} records checked bit for bit; rejects {}",
            after.get(Counter::ModelRejects)
        );
        ensure!(
            verdicts > 100,
            "round {round}: verdicts stopped after the kill ({verdicts})"
        );
        ensure!(
            checked > 0,
            "round {round}: no record scored by v{version} to check"
        );
        ensure!(
            after.get(Counter::ModelRejects) == before.get(Counter::ModelRejects),
            "round {round}: the model stage refused the active slot after the kill"
        );
        orphaned = Some(left);

        // Status works against orphaned pins.
        let st = status_json(&pins)?;
        ensure!(
            st["owner_running"] == false && st["model"]["checksum_ok"] == true,
            "status: {st}"
        );

        agent = spawn_agent_with_env(&args, &env)?;
        let line = wait_for_line(&agent.stderr, "maps pinned at", Duration::from_secs(60))?;
        ensure!(
            line.contains("adopted"),
            "round {round}: restart did not adopt: {line}"
        );
        wait_for_line(
            &agent.stderr,
            &format!("model v{version} "),
            Duration::from_secs(10),
        )?;
    }
    // A clean exit removes links, programs and pins.
    wait_for_line(&agent.stderr, "observing", Duration::from_secs(60))?;
    signal(&agent.child.0, libc::SIGTERM);
    ensure!(agent.child.0.wait()?.success(), "run did not exit cleanly");
    ensure!(!pins.0.exists(), "pins left behind after a clean exit");
    leaks.assert_none_left()
}

#[test]
fn pins_of_another_build_are_replaced_and_a_live_owner_is_not_displaced() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let dev = LoopDevice::new(64, 500, 5000)?;
    let pins = PinDir::new("replace");
    let args = [
        "run",
        "--device",
        &dev.name,
        "--retrain-every",
        "0",
        "--pin",
        "--pin-dir",
        pins.arg(),
    ];
    let mut first = spawn_agent_with_env(&args, &[])?;
    wait_for_line(&first.stderr, "observing", Duration::from_secs(60))?;
    // A second agent on the same pins refuses while the first runs.
    let second = Command::new(agent_bin()).args(args).output()?;
    ensure!(
        !second.status.success(),
        "a second agent took over live pins"
    );
    let err = String::from_utf8_lossy(&second.stderr);
    ensure!(err.contains("owns the pins"), "unclear refusal: {err}");
    kill9(&mut first)?;
    // Pretend the pins come from another build of the eBPF object.
    let meta_path = pins.0.join(kml_agent::observe::pins::META);
    let mut meta = kml_agent::observe::pins::PinMeta::decode(
        &std::fs::read_link(&meta_path)?.to_string_lossy(),
    )?;
    meta.object = "0000000000000000".into();
    kml_agent::observe::pins::write_meta(&pins.0, &meta)?;
    let old: BTreeSet<u32> = leaks.programs()?.into_keys().collect();
    let mut third = spawn_agent_with_env(&args, &[])?;
    let line = wait_for_line(&third.stderr, "maps pinned at", Duration::from_secs(60))?;
    ensure!(
        line.contains("replaced") && line.contains("build"),
        "not replaced: {line}"
    );
    wait_for_line(&third.stderr, "observing", Duration::from_secs(60))?;
    let now = leaks.programs()?;
    ensure!(
        now.len() == PROGRAMS,
        "not one set after replacing: {now:?}"
    );
    ensure!(
        now.keys().all(|id| !old.contains(id)),
        "old programs survived the replacement"
    );
    signal(&third.child.0, libc::SIGINT);
    ensure!(third.child.0.wait()?.success(), "run did not exit cleanly");
    ensure!(!pins.0.exists(), "pins left behind");
    leaks.assert_none_left()
}

fn device_in_pins(dir: &Path, dev: u32) -> Result<Option<DeviceState>> {
    Ok(pin::traced_devices(dir)?
        .into_iter()
        .find(|(d, _)| *d == dev)
        .map(|(_, slot)| kml_agent::observe::device_state(&slot)))
}

#[test]
fn a_detached_disk_is_dropped_and_a_returning_one_is_traced_again() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let dev = LoopDevice::new(64, 500, 5000)?;
    let bd = dev.block_device()?;
    let pins = PinDir::new("hotplug");
    let mut agent = spawn_agent_with_env(
        &[
            "run",
            "--device",
            &dev.name,
            "--retrain-every",
            "0",
            "--pin",
            "--pin-dir",
            pins.arg(),
        ],
        &[],
    )?;
    wait_for_line(&agent.stderr, "observing", Duration::from_secs(60))?;
    issue_direct(&dev, &scattered_pattern(100, 64, 3))?;
    ensure!(
        device_in_pins(&pins.0, bd.dev())?.is_some(),
        "device not traced at start"
    );

    let backing = Command::new("losetup")
        .args(["-nO", "BACK-FILE"])
        .arg(&dev.path)
        .output()?;
    let backing = String::from_utf8_lossy(&backing.stdout).trim().to_owned();
    ensure!(
        Command::new("losetup")
            .arg("-d")
            .arg(&dev.path)
            .status()?
            .success(),
        "losetup -d"
    );
    wait_for_line(
        &agent.stderr,
        &format!("{} detached: no longer traced", dev.name),
        Duration::from_secs(10),
    )?;
    ensure!(
        device_in_pins(&pins.0, bd.dev())?.is_none(),
        "DEVICES still holds the detached disk"
    );
    ensure!(
        agent.child.0.try_wait()?.is_none(),
        "the agent died when the disk went"
    );

    // The same name comes back (the queue keeps mq-deadline): traced again.
    ensure!(
        Command::new("losetup")
            .args(["--direct-io=on"])
            .arg(&dev.path)
            .arg(&backing)
            .status()?
            .success(),
        "losetup re-attach"
    );
    dev.set_queue("scheduler", "mq-deadline")?;
    wait_for_line(
        &agent.stderr,
        &format!("{} ({}:{}) appeared", dev.name, bd.major, bd.minor),
        Duration::from_secs(10),
    )?;
    let before =
        device_in_pins(&pins.0, bd.dev())?.context("re-added device missing from DEVICES")?;
    issue_direct(&dev, &scattered_pattern(100, 64, 4))?;
    let after = device_in_pins(&pins.0, bd.dev())?.context("device gone")?;
    ensure!(
        after.last_insert_ns > before.last_insert_ns,
        "no insert traced on the returning disk"
    );
    signal(&agent.child.0, libc::SIGINT);
    ensure!(agent.child.0.wait()?.success(), "run did not exit cleanly");
    ensure!(!pins.0.exists(), "pins left behind after a clean exit");
    leaks.assert_none_left()
}

#[test]
fn a_new_mq_deadline_disk_joins_a_run_without_device() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let pins = PinDir::new("newdisk");
    let mut agent = spawn_agent_with_env(
        &[
            "run",
            "--retrain-every",
            "0",
            "--pin",
            "--pin-dir",
            pins.arg(),
        ],
        &[],
    )?;
    wait_for_line(&agent.stderr, "observing", Duration::from_secs(60))?;
    let dev = LoopDevice::new(64, 500, 5000)?;
    let bd = dev.block_device()?;
    wait_for_line(
        &agent.stderr,
        &format!("{} ({}:{}) appeared", dev.name, bd.major, bd.minor),
        Duration::from_secs(10),
    )?;
    let before = device_in_pins(&pins.0, bd.dev())?.context("new disk missing from DEVICES")?;
    let records_before = counters(&pins.0)?.get(Counter::Records);
    issue_direct(&dev, &scattered_pattern(200, 64, 5))?;
    let after = device_in_pins(&pins.0, bd.dev())?.context("device gone")?;
    ensure!(
        after.last_insert_ns > before.last_insert_ns,
        "no insert traced on the new disk"
    );
    let records = counters(&pins.0)?.get(Counter::Records) - records_before;
    ensure!(
        records >= 400,
        "only {records} records after 400 requests on the new disk"
    );
    // And it goes away again cleanly.
    let name = dev.name.clone();
    drop(dev);
    wait_for_line(
        &agent.stderr,
        &format!("{name} detached: no longer traced"),
        Duration::from_secs(10),
    )?;
    ensure!(
        device_in_pins(&pins.0, bd.dev())?.is_none(),
        "detached disk still traced"
    );
    signal(&agent.child.0, libc::SIGINT);
    ensure!(agent.child.0.wait()?.success(), "run did not exit cleanly");
    ensure!(!pins.0.exists(), "pins left behind after a clean exit");
    leaks.assert_none_left()
}

#[test]
fn a_restart_on_other_devices_adopts_and_retargets_the_pinned_programs() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let first_dev = LoopDevice::new(64, 500, 5000)?;
    let second_dev = LoopDevice::new(64, 500, 5000)?;
    let (a, b) = (first_dev.block_device()?, second_dev.block_device()?);
    let pins = PinDir::new("retarget");
    let run = |dev: &str| -> Result<Agent> {
        spawn_agent_with_env(
            &[
                "run",
                "--device",
                dev,
                "--retrain-every",
                "0",
                "--pin",
                "--pin-dir",
                pins.arg(),
            ],
            &[],
        )
    };
    let mut agent = run(&first_dev.name)?;
    wait_for_line(&agent.stderr, "observing", Duration::from_secs(60))?;
    kill9(&mut agent)?;
    let mut agent = run(&second_dev.name)?;
    // The devices are reconciled as the pins are taken over, then the outcome is said.
    wait_for_line(
        &agent.stderr,
        &format!("no longer tracing {}:{}", a.major, a.minor),
        Duration::from_secs(60),
    )?;
    let line = wait_for_line(&agent.stderr, "maps pinned at", Duration::from_secs(10))?;
    ensure!(line.contains("adopted"), "not adopted: {line}");
    wait_for_line(&agent.stderr, "observing", Duration::from_secs(60))?;
    ensure!(
        device_in_pins(&pins.0, a.dev())?.is_none(),
        "the old device is still traced"
    );
    let before = device_in_pins(&pins.0, b.dev())?.context("the new device is not traced")?;
    issue_direct(&second_dev, &scattered_pattern(50, 64, 6))?;
    let after = device_in_pins(&pins.0, b.dev())?.context("device gone")?;
    ensure!(
        after.last_insert_ns > before.last_insert_ns,
        "no insert traced on the new device"
    );
    let set = leaks.programs()?;
    ensure!(set.len() == PROGRAMS, "not exactly one set: {set:?}");
    signal(&agent.child.0, libc::SIGINT);
    ensure!(agent.child.0.wait()?.success(), "run did not exit cleanly");
    ensure!(!pins.0.exists(), "pins left behind");
    leaks.assert_none_left()
}

/// Entries left in the pinned in-flight state (raw tracepoints: the entries in
/// use in `REQS`, whatever device they belong to).
fn live_inflight(dir: &Path) -> Result<u64> {
    let reqs: Array<_, kml_ebpf_common::device::ReqState> =
        Array::try_from(pin::open(dir, map::REQS)?)?;
    Ok(reqs
        .iter()
        .filter(|e| e.as_ref().is_ok_and(|e| e.rq != 0))
        .count() as u64)
}

/// The runs the kernel skipped of this test's programs (after a SIGKILL: the
/// pinned programs nobody holds).
fn pinned_misses(leaks: &LeakCheck) -> Result<u64> {
    let ids = leaks.programs()?.into_keys().collect();
    Ok(program_misses(&ids)?.iter().map(|(_, m)| m).sum())
}

/// Records that reach the pinned ring while no agent runs wait there: the next
/// agent adopts the ring and consumes every one of them. The first agent sees no
/// I/O at all (so it leaves nothing behind); with no agent, a known pattern of
/// requests; the adopting agent, with no further I/O, must report exactly those.
#[test]
fn an_adopted_agent_consumes_the_records_that_waited() -> Result<()> {
    let leaks = LeakCheck::start()?;
    let dev = LoopDevice::new(64, 500, 5000)?;
    let pins = PinDir::new("waiting");
    let args = |duration: &'static str| -> Vec<String> {
        [
            "run",
            "--device",
            &dev.name,
            "--retrain-every",
            "0",
            "--pin",
            "--pin-dir",
            pins.arg(),
            "--duration",
            duration,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let first_args = args("120s");
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let mut first = spawn_agent_with_env(&first_args, &[])?;
    wait_for_line(&first.stderr, "observing", Duration::from_secs(60))?;
    kill9(&mut first)?;
    let before = counters(&pins.0)?;
    let missed_before = pinned_misses(&leaks)?;
    let pattern = scattered_pattern(500, 64, 8);
    issue_direct(&dev, &pattern)?;
    let after = counters(&pins.0)?;
    let missed = pinned_misses(&leaks)? - missed_before;
    let waiting = after.get(Counter::Records) - before.get(Counter::Records);
    // Every request is a record waiting in the ring, or a loss a kernel counter
    // names (the observer tests' accounting: a completion the kernel skipped the
    // orphaned program for, or one that never came and left a stale entry).
    let mut delta = Counters::default();
    for &c in Counters::ALL {
        *delta.slot(c) = after.get(c).wrapping_sub(before.get(c));
    }
    let losses = Losses::from_counters(&delta, missed, live_inflight(&pins.0)?);
    explain(
        &format!("orphaned ring (counters {before:?} -> {after:?})"),
        pattern.len() as u64,
        waiting,
        &losses,
    )?;
    let second_args = args("3s");
    let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
    let mut second = spawn_agent_with_env(&second_args, &[])?;
    let line = wait_for_line(&second.stderr, "maps pinned at", Duration::from_secs(60))?;
    ensure!(line.contains("adopted"), "not adopted: {line}");
    let summary = wait_for_line(&second.stderr, " records in ", Duration::from_secs(30))?;
    ensure!(
        second.child.0.wait()?.success(),
        "the adopting agent failed"
    );
    ensure!(
        summary.starts_with(&format!("kml-agent: {waiting} records in "))
            && summary.contains("drops 0 |"),
        "the adopting agent did not consume exactly the {waiting} waiting records: {summary}"
    );
    ensure!(!pins.0.exists(), "pins left behind after a clean exit");
    leaks.assert_none_left()
}
