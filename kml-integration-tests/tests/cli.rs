//! The agent binary as an operator runs it, checked against what was issued and
//! against independent tools (fio's own counts, bpftrace on the same tracepoints).

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use kml_ebpf_common::RequestRecord;
use kml_integration_tests::{
    accounting::{alone_on_the_block_tracepoints, explain, program_misses_of, DiskStats, Losses},
    agent_bin, assert_no_kml_programs, chain, interrupt_until_exit, issue_direct,
    scattered_pattern, signal, spawn_agent, spawn_agent_with_env, wait_for_line, Agent, ChildGuard,
    Issued, LoopDevice, Recording, ScratchDir, TestMount,
};

/// models/logistic.json as JSON, to derive test models from.
fn shipped_logistic() -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/logistic.json"),
    )?)?)
}

#[test]
fn doctor_reports_and_picks_a_mode() -> Result<()> {
    let out = Command::new(agent_bin()).arg("doctor").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    ensure!(
        out.status.success(),
        "doctor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "BTF",
        "tracefs",
        "raw tracepoints",
        "kprobes",
        "fentry/fexit",
        "bpffs",
        "lockdown",
        "ring buffer",
        "mq-deadline hook",
        "deadline label",
    ] {
        ensure!(text.contains(needle), "doctor does not report {needle}");
    }
    ensure!(
        text.lines().any(|l| l.starts_with("attach mode: ")),
        "no attach mode line"
    );
    // doctor loads probe programs: none may stay.
    assert_no_kml_programs()
}

/// The loss counters `kml-agent record` and `run` print in their summary line,
/// each of which can explain a missing row (see `accounting::Losses`).
const SUMMARY_LOSSES: &[&str] = &[
    "drops",
    "evictions",
    "insert failures",
    "read failures",
    "missed events",
    "stale entries",
    // Read once the disk is idle: a completion never seen (a stale entry whose
    // tag was not reused before the end).
    "in flight at stop",
];

/// The agent's summary line (the one naming the loss counters) among `lines`.
fn summary_losses(lines: &[String]) -> Result<Losses> {
    let line = lines
        .iter()
        .find(|l| l.contains("drops ") && l.contains("stale entries "))
        .with_context(|| format!("no loss summary in {lines:?}"))?;
    Losses::from_summary(line, SUMMARY_LOSSES)
}

#[test]
fn record_cli_writes_what_was_issued() -> Result<()> {
    const SIZE_MIB: u64 = 32;
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(SIZE_MIB, 500, 5000)?;
    let bdev = dev.block_device()?;
    let mut recording = Recording::start(&dev, "record")?;
    let (agent, rx) = (&mut recording.agent.child, &recording.agent.stderr);
    let pattern = scattered_pattern(500, SIZE_MIB, 3);
    let before = DiskStats::read(&dev.name)?;
    issue_direct(&dev, &pattern)?;
    let stats = before.delta(&DiskStats::read(&dev.name)?);
    // Ctrl-C ends the recording early and cleanly.
    signal(&agent.0, libc::SIGINT);
    let status = agent.0.wait()?;
    let mut summary = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        summary.push(l);
    }
    ensure!(status.success(), "record exited with {status}: {summary:?}");
    ensure!(
        summary.iter().any(|l| l.contains("insert→issue p50")),
        "no latency summary: {summary:?}"
    );
    // Every counter at the end, by name, and one line for the device: they add up
    // to the records written.
    let counters = summary
        .iter()
        .find_map(|l| l.split_once("counters: ").map(|(_, c)| c.to_owned()))
        .with_context(|| format!("no counters line: {summary:?}"))?;
    let value = |name: &str| -> Result<u64> {
        counters
            .split(", ")
            .find_map(|kv| kv.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("counter {name} missing from {counters}"))
    };
    for c in kml_ebpf_common::Counters::ALL {
        value(c.name())?;
    }
    ensure!(
        value("sampled_out")? == 0 && value("partial_completions")? == 0,
        "{counters}"
    );
    let device_line = summary
        .iter()
        .find(|l| l.contains(&format!("{}: inserts ", dev.name)))
        .with_context(|| format!("no line for {}: {summary:?}", dev.name))?;
    ensure!(
        device_line.contains(&format!("records {}", value("records")?)),
        "{device_line} vs {counters}"
    );
    assert_no_kml_programs()?;
    let losses = summary_losses(&summary)?;

    let rows = recording.rows()?;
    let on_dev: Vec<RequestRecord> = rows
        .iter()
        .filter(|r| r.dev == bdev.dev())
        .copied()
        .collect();
    ensure!(on_dev.len() == rows.len(), "rows of other devices");
    // The block layer's count of what completed on the disk while we issued.
    ensure!(
        stats.requests() == pattern.len() as u64 && stats.merges() == 0,
        "the device completed {stats:?} for {} synchronous requests",
        pattern.len()
    );
    let lost = explain(
        "requests completed on the device",
        stats.requests(),
        on_dev.len() as u64,
        &losses,
    )?;
    let me = std::process::id();
    // In insert order: a request whose completion the program never saw (a
    // counted stale entry) gets its row when its scheduler tag comes back, after
    // rows of requests issued later.
    let mut mine: Vec<_> = on_dev.iter().filter(|r| r.pid == me).collect();
    mine.sort_by_key(|r| r.insert_ns);
    let ours: Vec<Issued> = mine
        .into_iter()
        .map(|r| Issued {
            op: r.op(),
            sector: r.sector,
            nr_sectors: r.nr_sectors,
        })
        .collect();
    // Synchronous I/O: the rows are the issued sequence, but for counted losses.
    let mut expected = pattern.iter();
    let mut skipped = 0u64;
    for (i, row) in ours.iter().enumerate() {
        loop {
            let p = expected.next().with_context(|| {
                format!("row {i} {row:?} is not in the issued pattern, in order")
            })?;
            if p == row {
                break;
            }
            skipped += 1;
        }
    }
    skipped += expected.count() as u64;
    ensure!(
        skipped <= lost,
        "{skipped} issued requests have no row, {lost} losses counted ({losses})"
    );
    // The state features in the CSV are the kernel's, replayed from the rows.
    let replay = chain::replay(&on_dev, lost)?;
    ensure!(
        replay.checked + replay.restarts.len() + replay.races.len() == on_dev.len(),
        "{replay:?}"
    );
    Ok(())
}

/// Parses bpftrace's `@name: count N, average A, total T` line: (count, average).
fn bpftrace_stats(text: &str, name: &str) -> Option<(u64, u64)> {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("@{name}: count")))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>());
    Some((nums.next()?.ok()?, nums.next()?.ok()?))
}

/// Parses bpftrace's `@name: N` line (a count or a max); 0 when the map is empty.
fn bpftrace_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("@{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `kml-agent record` under fio against three witnesses that do not use kml: fio's
/// own count of I/Os, the block layer's statistics, and bpftrace on the same
/// tracepoints with its own clock.
#[test]
fn latencies_agree_with_bpftrace_and_counts_with_fio() -> Result<()> {
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(256, 500, 5000)?;
    let bdev = dev.block_device()?;
    let mut recording = Recording::start(&dev, "fio")?;
    let agent = &mut recording.agent.child;

    // bpftrace keys by sector on the one device (bpftrace 0.17 has no raw
    // tracepoints to key by request): it counts every completion, and the issues
    // that found the sector of another one in flight (whose pairing it then gets
    // wrong), so that the difference of the means has a known bound.
    let script = format!(
        "tracepoint:block:block_rq_issue /args->dev == {d}/ {{
             if (@start[args->sector]) {{ @collisions = count(); }}
             @start[args->sector] = nsecs; }}
         tracepoint:block:block_rq_complete /args->dev == {d}/ {{
             @completions = count();
             if (@start[args->sector]) {{
                 $l = nsecs - @start[args->sector];
                 @lat = stats($l); @max = max($l); delete(@start[args->sector]); }} }}
         END {{ clear(@start); }}",
        d = bdev.dev()
    );
    let mut bpftrace = ChildGuard(
        Command::new("bpftrace")
            .arg("-e")
            .arg(&script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting bpftrace")?,
    );
    let mut bt_out = BufReader::new(bpftrace.0.stdout.take().context("stdout")?);
    let mut first = String::new();
    bt_out.read_line(&mut first)?;
    ensure!(
        first.contains("Attaching"),
        "bpftrace did not attach: {first:?}"
    );

    let before = DiskStats::read(&dev.name)?;
    let fio = Command::new("fio")
        .args([
            "--name=mixed",
            "--rw=randrw",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
        ])
        .args([
            "--size=200M",
            "--runtime=4",
            "--time_based",
            "--randseed=11",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", dev.path.display()))
        .output()
        .context("running fio")?;
    ensure!(
        fio.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&fio.stderr)
    );
    let stats = before.delta(&DiskStats::read(&dev.name)?);
    // bpftrace's classic tracepoint programs are skipped when they would nest in
    // another tracing program on the CPU (a completion interrupting an issue):
    // the kernel counts those runs, and they are bpftrace's only losses.
    let bt_programs = program_misses_of(bpftrace.0.id())?;
    let bt_missed = |event: &str| -> u64 {
        bt_programs
            .iter()
            .filter(|(name, _)| name.contains(event))
            .map(|(_, m)| m)
            .sum()
    };
    let (missed_issues, missed_completions) = (bt_missed("issue"), bt_missed("comple"));
    eprintln!("bpftrace's programs: {bt_programs:?}");
    ensure!(
        bt_programs.len() >= 2,
        "bpftrace holds {bt_programs:?}: not its two tracepoint programs"
    );
    let bt_status = interrupt_until_exit(&mut bpftrace.0, Duration::from_secs(30))?;
    signal(&agent.0, libc::SIGINT);
    let mut bt_text = String::new();
    std::io::Read::read_to_string(&mut bt_out, &mut bt_text)?;
    ensure!(bt_status.success(), "bpftrace exited with {bt_status}");
    let status = agent.0.wait()?;
    let mut summary = Vec::new();
    while let Ok(l) = recording.agent.stderr.recv_timeout(Duration::from_secs(2)) {
        summary.push(l);
    }
    ensure!(status.success(), "record exited with {status}: {summary:?}");
    assert_no_kml_programs()?;
    let losses = summary_losses(&summary)?;

    let rows = recording.rows()?;
    let ours: Vec<&RequestRecord> = rows.iter().filter(|r| r.dev == bdev.dev()).collect();
    let json: serde_json::Value = serde_json::from_slice(&fio.stdout).context("fio JSON")?;
    let job = &json["jobs"][0];
    let fio_ios = job["read"]["total_ios"].as_u64().unwrap_or(0)
        + job["write"]["total_ios"].as_u64().unwrap_or(0);
    let n = ours.len() as u64;
    let bt_completions = bpftrace_value(&bt_text, "completions");
    eprintln!(
        "fio total_ios {fio_ios}; device {stats:?}; bpftrace completions {bt_completions}; kml rows {n}"
    );
    ensure!(fio_ios > 1000, "fio did too little I/O: {fio_ios}");
    // fio against the block layer: each 4 KiB I/O a request, or merged into one.
    ensure!(
        fio_ios == stats.requests() + stats.merges(),
        "fio completed {fio_ios} I/Os, the device {stats:?}"
    );
    // Completions the kernel ran no program for and counted nothing (softirqs in
    // some task's context: kml-ebpf's lifecycle.rs, `stale`): kml's rows without
    // a completion, and its entries still live at the end, are those it missed.
    let unseen = ours.iter().filter(|r| r.complete_ns == 0).count() as u64
        + losses.0.get("in flight at stop").copied().unwrap_or(0);
    // bpftrace against the block layer: every completed request, once, but for
    // the completions the kernel skipped bpftrace's program for (counted: its
    // count covers every disk's completions, the filter is in the program), or
    // ran no program for at all (as many as kml's unseen ones, the same events).
    ensure!(
        bt_completions <= stats.requests()
            && stats.requests() - bt_completions <= missed_completions + unseen,
        "bpftrace counted {bt_completions} completions and {missed_completions} skipped runs \
         ({unseen} completions kml never saw), the device {stats:?}"
    );
    // kml against both: a row per completed request, but for named losses.
    explain(
        "requests completed on the device",
        stats.requests(),
        n,
        &losses,
    )?;

    let (bt_count, bt_avg) = bpftrace_stats(&bt_text, "lat")
        .with_context(|| format!("no @lat in bpftrace output: {bt_text}"))?;
    let (collisions, bt_max) = (
        bpftrace_value(&bt_text, "collisions"),
        bpftrace_value(&bt_text, "max"),
    );
    // Rows whose completion was never seen have no service time.
    let served: Vec<u64> = ours
        .iter()
        .filter(|r| r.complete_ns != 0)
        .map(|r| r.issue_to_complete_ns())
        .collect();
    let our_avg = served.iter().sum::<u64>() / (served.len() as u64).max(1);
    // Each collision or skipped issue loses one of bpftrace's pairs and may
    // mispair another.
    let unpaired = collisions + missed_issues;
    ensure!(
        bt_count + unpaired >= bt_completions && bt_count <= bt_completions,
        "bpftrace paired {bt_count} of {bt_completions} completions with {collisions} collisions and {missed_issues} skipped issues"
    );
    // The means differ by the mispaired ones (at most `max` each, over n) and by
    // where on each tracepoint the two programs read the clock: kml's raw
    // tracepoint runs before bpftrace's perf event, at both ends of the interval,
    // so that offset cancels but for its jitter, JITTER_NS (measured: see below).
    const JITTER_NS: u64 = 2_000;
    let bound = unpaired * bt_max / bt_count.max(1) + JITTER_NS;
    eprintln!(
        "issue→complete mean: bpftrace {bt_avg} ns (n={bt_count}, {collisions} sector collisions, max {bt_max} ns), \
         kml {our_avg} ns (n={n}): |difference| {} ns, bound {bound} ns",
        bt_avg.abs_diff(our_avg)
    );
    ensure!(
        bt_avg.abs_diff(our_avg) <= bound,
        "average issue→complete: bpftrace {bt_avg} ns, kml {our_avg} ns (bound {bound} ns)"
    );
    Ok(())
}

#[test]
fn clear_errors_for_bad_input() -> Result<()> {
    let out = Command::new(agent_bin())
        .args(["record", "--device", "nosuchdisk9", "--out", "/tmp/x.csv"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "unknown device accepted");
    ensure!(
        err.contains("unknown block device `nosuchdisk9`"),
        "unclear: {err}"
    );
    ensure!(err.trim().lines().count() == 1, "more than one line: {err}");

    // An attach mode this kernel lacks: one line naming it and what works.
    let out = Command::new(agent_bin())
        .args([
            "record",
            "--device",
            "vda",
            "--attach",
            "kprobe",
            "--out",
            "/tmp/kml-kprobe.csv",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "--attach kprobe accepted");
    ensure!(
        err.contains("attach mode kprobe") && err.contains("--attach "),
        "unclear: {err}"
    );
    ensure!(err.trim().lines().count() == 1, "more than one line: {err}");
    ensure!(
        !std::path::Path::new("/tmp/kml-kprobe.csv").exists(),
        "a failed record left its output file"
    );

    // Not root: one line naming what is missing.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(agent_bin())
        .args([
            "record",
            "--device",
            "loop0",
            "--out",
            "/tmp/kml-nonroot.csv",
        ])
        .output()
        .context("running setpriv")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "unprivileged record succeeded");
    ensure!(
        err.contains("not privileged enough") && err.contains("CAP_BPF"),
        "unclear: {err}"
    );
    ensure!(err.trim().lines().count() == 1, "more than one line: {err}");
    assert_no_kml_programs()?;
    Ok(())
}

#[test]
fn run_prints_live_lines_and_detaches_on_sigterm() -> Result<()> {
    const SIZE_MIB: u64 = 32;
    let dev = LoopDevice::new(SIZE_MIB, 500, 5000)?;
    let Agent {
        child: mut agent,
        stdout: rx,
        stderr,
    } = spawn_agent(&["run", "--device", &dev.name])?;
    wait_for_line(&stderr, "observing", Duration::from_secs(30))?;
    // Keep the disk busy until a live line reports records.
    let pattern = scattered_pattern(400, SIZE_MIB, 5);
    let mut busy_line = None;
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < give_up {
        issue_direct(&dev, &pattern)?;
        while let Ok(line) = rx.try_recv() {
            let rate: f64 = line
                .split('|')
                .next()
                .and_then(|s| s.split_whitespace().rev().nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
            if rate > 0.0 {
                busy_line = Some(line);
            }
        }
        if busy_line.is_some() {
            break;
        }
    }
    let line = busy_line.context("no live line reported records/s > 0")?;
    ensure!(
        line.contains("rec/s") && line.contains("misses") && line.contains("drops 0"),
        "live line: {line}"
    );
    signal(&agent.0, libc::SIGTERM);
    let status = agent.0.wait()?;
    ensure!(status.success(), "run exited with {status} after SIGTERM");
    assert_no_kml_programs()?;
    Ok(())
}

/// `run --model auto` on a host loop device starts from a general model (a file that
/// declares no disk), never from one made for another kind of disk: vm-logistic
/// records the best held-back score of all (measured on its own VM traces) and used
/// to win everywhere. The loop device gets the VM model's own read_expire, so only the
/// disk's hardware queue depth (read from sysfs) tells the two apart.
#[test]
fn model_auto_on_a_host_loop_device_is_never_a_model_made_for_another_disk() -> Result<()> {
    use kml_agent::learn::models::{self, DiskRegime};
    let dev = LoopDevice::new(32, 100, 5000)?;
    let regime = DiskRegime::of(&dev.block_device()?);
    ensure!(
        regime.hw_queue_depth.is_some_and(|d| d > 1) && regime.read_expire_ms == Some(100),
        "the loop device as sysfs shows it: {regime}"
    );
    // Otherwise the test could not fail: a model made for some disk is shipped.
    let made_for_a_disk: Vec<String> = models::list()
        .into_iter()
        .filter_map(|(p, m)| m.ok()?.file.device.map(|_| p.display().to_string()))
        .collect();
    ensure!(
        !made_for_a_disk.is_empty(),
        "no shipped model declares a disk"
    );
    // As the agent resolves it on a machine with raw tracepoints (CI's: BTF).
    let start = models::resolve("auto", std::slice::from_ref(&regime), true, false)?;
    // Verdicts that act prefer a model made to act, but only among those that fit:
    // vm-act is made for the VM's disk, not this one.
    let acting = models::resolve("auto", std::slice::from_ref(&regime), true, true)?;
    ensure!(
        acting.model.file.device.is_none(),
        "auto for acting picked {} for {regime}",
        acting.path.display()
    );
    let (path, chosen) = (&start.path, &start.model);
    // The models it races live are of the same pool: general ones too.
    ensure!(
        !start.others.is_empty() && start.others.iter().all(|(_, m)| m.file.device.is_none()),
        "auto races {:?}",
        start.others.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    ensure!(
        chosen.file.device.is_none(),
        "auto picked {} (made for {}) for {regime}",
        path.display(),
        chosen
            .file
            .device
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default()
    );
    // The agent binary, as an operator runs it, says what it picked and why.
    let Agent {
        child: mut agent,
        stderr,
        ..
    } = spawn_agent(&["run", "--device", &dev.name, "--model", "auto"])?;
    let line = wait_for_line(&stderr, "--model auto:", Duration::from_secs(30))?;
    let picked = line
        .split("--model auto: ")
        .nth(1)
        .and_then(|s| s.split(": ").next())
        .map(PathBuf::from)
        .with_context(|| format!("no model path in {line:?}"))?;
    let file = kml_learn::LoadedModel::load(&picked)?.file;
    ensure!(
        file.device.is_none() && line.contains("general model"),
        "the agent started {} from {line:?}",
        dev.name
    );
    ensure!(
        picked.file_name() == path.file_name(),
        "agent picked {}, the library {}",
        picked.display(),
        path.display()
    );
    wait_for_line(&stderr, "observing", Duration::from_secs(30))?;
    signal(&agent.0, libc::SIGTERM);
    let status = agent.0.wait()?;
    ensure!(status.success(), "run exited with {status} after SIGTERM");
    assert_no_kml_programs()?;
    Ok(())
}

#[test]
fn run_learns_online_and_swaps_in_a_model() -> Result<()> {
    // Short deadlines and a deep queue, so that a share of requests misses.
    let dev = LoopDevice::new(512, 4, 8)?;
    dev.set_queue("nr_requests", "1024")?;
    let Agent {
        child: agent,
        stdout,
        stderr,
    } = spawn_agent(&[
        "run",
        "--device",
        &dev.name,
        "--model",
        "none",
        "--retrain-every",
        "2s",
        "--window",
        "60000",
        // The swapped-in model as trained (calibration would move it to v2).
        "--no-calibrate",
    ])?;
    wait_for_line(&stderr, "observing", Duration::from_secs(30))?;
    let fio = deep_randrw(&dev)?;
    let swap = wait_for_line(&stderr, "swap none -> v1", Duration::from_secs(50))?;
    ensure!(
        swap.contains("held-back balanced accuracy none ->"),
        "swap line: {swap}"
    );
    // The live line now reports the kernel's verdicts of that model against outcomes.
    let live = wait_for_line(&stdout, "v1 logistic bal.acc", Duration::from_secs(10))?;
    eprintln!("swap: {swap}\nlive: {live}");
    stop_fio_then_agent(fio, agent)
}

/// Stops fio, then the agent (SIGTERM, as an operator would), which must exit
/// cleanly and leave nothing attached.
fn stop_fio_then_agent(mut fio: ChildGuard, mut agent: ChildGuard) -> Result<()> {
    let _ = fio.0.kill();
    let _ = fio.0.wait();
    signal(&agent.0, libc::SIGTERM);
    let status = agent.0.wait()?;
    ensure!(status.success(), "run exited with {status}");
    assert_no_kml_programs()
}

/// fio's deep random mix on `dev` for up to three minutes (every test stops it
/// when done; a test may check that something happened while it ran), as threads
/// (killing fio ends all its I/O at once).
fn deep_randrw(dev: &LoopDevice) -> Result<ChildGuard> {
    Ok(ChildGuard(
        Command::new("fio")
            .args([
                "--name=mix",
                "--rw=randrw",
                "--rwmixread=70",
                "--bs=4k",
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=256",
                "--numjobs=2",
                "--thread",
                "--size=400M",
                "--runtime=180",
                "--time_based",
                "--randseed=5",
            ])
            .arg(format!("--filename={}", dev.path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting fio")?,
    ))
}

/// Live threshold calibration, end to end: a model whose threshold is set so
/// high that it flags nothing (the shipped logistic weights, threshold +10^6
/// log-odds) is recalibrated from the outcomes, and the kernel then flags
/// requests with it.
#[test]
fn run_calibrates_a_threshold_that_flags_nothing() -> Result<()> {
    let dev = LoopDevice::new(512, 4, 8)?;
    dev.set_queue("nr_requests", "1024")?;
    let scratch = ScratchDir::new("calibrate")?;
    let dir = scratch.0.clone();
    let mut m = shipped_logistic()?;
    let out_shift = m["quantized"]["linear"]["out_shift"]
        .as_i64()
        .context("out_shift")?;
    m["float"]["linear"]["threshold"] = 1e6.into();
    m["quantized"]["linear"]["threshold"] = (1_000_000i64 << out_shift).into();
    let path = dir.join("flags-nothing.json");
    std::fs::write(&path, m.to_string())?;
    let Agent {
        child: mut agent,
        stdout,
        stderr,
    } = spawn_agent(&[
        "run",
        "--device",
        &dev.name,
        "--model",
        path.to_str().context("utf-8 path")?,
        "--retrain-every",
        "0",
    ])?;
    wait_for_line(&stderr, "observing", Duration::from_secs(30))?;
    let mut fio = deep_randrw(&dev)?;
    // Before: v1 serves and flags nothing, while requests miss.
    let before = wait_for_line(&stdout, "v1 logistic bal.acc", Duration::from_secs(20))?;
    ensure!(
        before.contains("(tp 0 fp 0 "),
        "the uncalibrated model flagged requests: {before}"
    );
    let line = wait_for_line(&stderr, "calibrate v1 -> v2", Duration::from_secs(20))?;
    let (before_ba, after_ba) = line
        .rsplit_once(" -> ")
        .and_then(|(head, after)| {
            let before = head.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((before, after.trim().parse::<f64>().ok()?))
        })
        .with_context(|| format!("calibrate line: {line}"))?;
    ensure!(
        (before_ba - 0.5).abs() < 1e-9 && after_ba > before_ba,
        "calibrate line: {line}"
    );
    // After: the kernel runs the recalibrated model (v2, or a later calibration)
    // and flags requests with it.
    let after = loop {
        let l = wait_for_line(&stdout, "logistic bal.acc", Duration::from_secs(10))?;
        if !l.contains("| v1 ") {
            break l;
        }
    };
    let flagged = after
        .split("(tp ")
        .nth(1)
        .and_then(|t| t.split(' ').next()?.parse::<u64>().ok())
        .with_context(|| format!("live line: {after}"))?;
    eprintln!("before: {before}\ncalibrate: {line}\nafter: {after}");
    ensure!(flagged > 0, "after calibration: {after}");
    let _ = fio.0.kill();
    let _ = fio.0.wait();
    signal(&agent.0, libc::SIGTERM);
    let end = wait_for_line(&stderr, "threshold calibration:", Duration::from_secs(20))?;
    ensure!(!end.contains(": 0 recalibrated"), "end: {end}");
    let status = agent.0.wait()?;
    ensure!(status.success(), "run exited with {status}");
    assert_no_kml_programs()?;
    Ok(())
}

/// `run --model auto` races the model its held-back scores pick against the other
/// models of its pool on the first labelled requests, and serves the winner. The
/// pick is rigged: the shipped logistic model with every weight, the intercept and
/// the threshold negated (it ranks requests backwards, so no threshold makes it
/// better than a coin), its file claiming a held-back balanced accuracy of 0.99.
#[test]
fn model_auto_races_its_pick_and_serves_the_winner() -> Result<()> {
    race_the_backwards_pick(&[]).map(drop)
}

/// The race under ring pressure that lasts as long as the I/O does (a 128 KiB
/// ring: the kernel samples records out all along). Judged on the kernel's audit
/// sample, the race ends as it does without pressure; it used to wait for the
/// pressure to end, and never ended.
#[test]
fn model_auto_races_under_ring_pressure_that_never_ends() -> Result<()> {
    let end = race_the_backwards_pick(&["--ring-size", "128K"])?;
    let sampled_out = end
        .split("sampled_out ")
        .nth(1)
        .and_then(|t| t.split([',', ' ']).next()?.parse::<u64>().ok())
        .with_context(|| format!("counters: {end}"))?;
    ensure!(
        sampled_out > 0,
        "no record was sampled out: the ring was never under pressure ({end})"
    );
    Ok(())
}

/// Runs `run --model auto` with `extra` arguments, its pick rigged to rank
/// backwards, under fio's deep mix, until the race serves another model; then
/// stops both. The agent's closing counters line.
fn race_the_backwards_pick(extra: &[&str]) -> Result<String> {
    let dev = LoopDevice::new(512, 4, 8)?;
    dev.set_queue("nr_requests", "1024")?;
    let scratch = ScratchDir::new("race")?;
    let mut m = shipped_logistic()?;
    let negate = |v: &mut serde_json::Value| {
        *v = match (v.as_i64(), v.as_f64()) {
            (Some(i), _) => (-i).into(),
            (None, Some(f)) => (-f).into(),
            _ => v.clone(),
        }
    };
    for part in ["float", "quantized"] {
        for w in m[part]["linear"]["weights"]
            .as_array_mut()
            .context("weights")?
            .iter_mut()
        {
            negate(w);
        }
    }
    for field in ["intercept", "threshold"] {
        negate(&mut m["float"]["linear"][field]);
    }
    for field in ["bias", "threshold"] {
        negate(&mut m["quantized"]["linear"][field]);
    }
    m["metrics"]["test"]["quantized"]["balanced_accuracy"] = 0.99.into();
    std::fs::write(scratch.0.join("backwards.json"), m.to_string())?;
    let dir = scratch.0.to_str().context("utf-8 path")?;
    let Agent {
        child: agent,
        stdout,
        stderr,
    } = spawn_agent_with_env(
        &[
            "run",
            "--device",
            &dev.name,
            "--model",
            "auto",
            "--retrain-every",
            "0",
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
        &[("KML_MODELS_DIR", dir)],
    )?;
    let picked = wait_for_line(&stderr, "--model auto:", Duration::from_secs(30))?;
    ensure!(picked.contains("backwards.json"), "auto: {picked}");
    wait_for_line(&stderr, "race: backwards against", Duration::from_secs(30))?;
    wait_for_line(&stderr, "observing", Duration::from_secs(30))?;
    let mut fio = deep_randrw(&dev)?;
    // 20,000 labelled requests, sampled at most 4,096 a second: 5 s and more. On a
    // loaded host it can take far longer (seen: the agent's seconds 15-50 printed
    // in bursts within 60 s of wall time, after a drift retraining). The race's
    // own limit bounds the wait.
    let limit = u64::from(kml_learn::calibrate::RACE_LIMIT_SECONDS) + 30;
    let race = wait_for_line(&stderr, "race:", Duration::from_secs(limit))?;
    eprintln!("race: {race}");
    // Judged while the I/O (and any ring pressure with it) goes on, not after.
    ensure!(
        fio.0.try_wait()?.is_none(),
        "the race ended only after the I/O did: {race}"
    );
    let standing = |name: &str| -> Option<f64> {
        let after = race.split(&format!(" {name} ")).nth(1)?;
        after.split([',', ' ']).next()?.parse().ok()
    };
    let backwards = standing("backwards").with_context(|| format!("race line: {race}"))?;
    // `race: vN -> vM NAME (...)` (calibration may have moved v1's threshold first).
    let winner = race
        .split(" -> v")
        .nth(1)
        .and_then(|t| t.split_whitespace().nth(1))
        .with_context(|| format!("the backwards model stayed: {race}"))?;
    ensure!(winner != "backwards", "the backwards model won: {race}");
    ensure!(
        backwards < 0.56,
        "a model that ranks backwards did {backwards} at its best threshold: {race}"
    );
    // The kernel serves the winner from then on: the live line counts its verdicts.
    let version = race
        .split(" -> v")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .with_context(|| format!("race line: {race}"))?;
    let after = wait_for_line(&stdout, &format!("| v{version} "), Duration::from_secs(10));
    eprintln!("after: {after:?}");
    after?;
    stop_fio_then_agent(fio, agent)?;
    // The closing lines, in whatever order the agent prints them.
    let (mut counters, mut verdicts) = (None, None);
    while counters.is_none() || verdicts.is_none() {
        let line = wait_for_line(&stderr, "", Duration::from_secs(5))?;
        if line.contains("counters:") {
            counters = Some(line);
        } else if line.contains("verdicts over the run:") {
            verdicts = Some(line);
        }
    }
    let (counters, verdicts) = (counters.unwrap_or_default(), verdicts.unwrap_or_default());
    run_verdicts_match_the_kernel(&verdicts, &counters)?;
    Ok(counters)
}

/// The agent's closing `verdicts over the run:` line (its records' verdicts
/// against their outcomes, the ones it judged) against the kernel's own counts of
/// the same four outcomes, made at each completion: the records can only be
/// fewer (sampled out under pressure, dropped), but for stale entries, whose
/// record goes out with a verdict and no completion the kernel counted.
fn run_verdicts_match_the_kernel(verdicts: &str, counters: &str) -> Result<()> {
    let number = |line: &str, key: &str| -> Result<u64> {
        line.split(&format!("{key} "))
            .nth(1)
            .and_then(|t| t.split([',', ' ', ')']).next()?.parse().ok())
            .with_context(|| format!("no {key:?} in {line:?}"))
    };
    let stale = number(counters, "stale_entries")?;
    let mut judged = 0;
    for (host, kernel) in [
        ("tp", "true_miss"),
        ("fp", "false_miss"),
        ("tn", "true_met"),
        ("fn", "false_met"),
    ] {
        let (h, k) = (number(verdicts, host)?, number(counters, kernel)?);
        ensure!(
            h <= k + stale,
            "the run's {host} {h} exceeds the kernel's {kernel} {k} (+{stale} stale): {verdicts} / {counters}"
        );
        judged += h;
    }
    ensure!(judged > 0, "no verdict judged: {verdicts}");
    // The raw tracepoints read the jiffies of every issue: the band is reported.
    ensure!(
        verdicts.contains("tick band (") && verdicts.contains("balanced accuracy outside it"),
        "no tick band in {verdicts:?}"
    );
    eprintln!("{verdicts}");
    Ok(())
}

#[test]
fn pinned_state_is_readable_by_status_and_by_root_only() -> Result<()> {
    let dev = LoopDevice::new(64, 500, 5000)?;
    let Agent {
        child: mut agent,
        stderr,
        ..
    } = spawn_agent(&[
        "run",
        "--device",
        &dev.name,
        "--pin",
        "--retrain-every",
        "0",
    ])?;
    wait_for_line(
        &stderr,
        "maps pinned at /sys/fs/bpf/kml",
        Duration::from_secs(30),
    )?;
    issue_direct(&dev, &scattered_pattern(200, 64, 1))?;

    let out = Command::new(agent_bin())
        .args(["status", "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).context("status JSON")?;
    let records = status["counters"]["records"].as_u64().unwrap_or(0);
    ensure!(records >= 200, "status reports {records} records: {status}");
    ensure!(
        status["devices"].as_array().is_some_and(|d| d.len() == 1),
        "devices: {status}"
    );

    use std::os::unix::fs::PermissionsExt as _;
    let dir_mode = std::fs::metadata("/sys/fs/bpf/kml")?.permissions().mode() & 0o777;
    let map_mode = std::fs::metadata("/sys/fs/bpf/kml/LINEAR_MODELS")?
        .permissions()
        .mode()
        & 0o777;
    ensure!(
        dir_mode == 0o700 && map_mode == 0o600,
        "modes {dir_mode:o} {map_mode:o}"
    );
    // An unprivileged user can neither read nor write the weights or counters.
    let nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .args([
            "bpftool",
            "map",
            "dump",
            "pinned",
            "/sys/fs/bpf/kml/LINEAR_MODELS",
        ])
        .output()?;
    ensure!(
        !nobody.status.success(),
        "nobody read the pinned weights: {}",
        String::from_utf8_lossy(&nobody.stdout)
    );
    // Not even with the BPF capabilities: the modes, not only the missing
    // capabilities, keep a non-root user from the weights and the verdict counters.
    let as_nobody_with_bpf_caps = |args: &[&str]| -> Result<std::process::Output> {
        let caps = "-all,+bpf,+perfmon,+sys_admin";
        Ok(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg("bpftool")
            .args(args)
            .output()?)
    };
    let zero_key = ["key", "0", "0", "0", "0"];
    for args in [
        vec!["map", "dump", "pinned", "/sys/fs/bpf/kml/LINEAR_MODELS"],
        vec!["map", "dump", "pinned", "/sys/fs/bpf/kml/COUNTERS"],
        vec!["map", "dump", "pinned", "/sys/fs/bpf/kml/MODEL_CONTROL"],
        [
            &["map", "update", "pinned", "/sys/fs/bpf/kml/MODEL_CONTROL"][..],
            &zero_key,
            &["value", "0", "0", "0", "0", "0", "0", "0", "0"],
            &["0", "0", "0", "0", "0", "0", "0", "0"],
        ]
        .concat(),
    ] {
        let out = as_nobody_with_bpf_caps(&args)?;
        ensure!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "nobody with CAP_BPF: {args:?}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Control: the same user and capabilities read a pin whose modes allow it.
    let scratch = std::env::temp_dir().join(format!("kml-pinctl-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&scratch)
        .status()?
        .success();
    let control = (|| -> Result<()> {
        ensure!(mounted, "mounting a scratch bpffs failed");
        let pin = scratch.join("open");
        let made = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&pin)
            .args(["type", "array", "key", "4", "value", "8", "entries", "1"])
            .args(["name", "kml_pinctl"])
            .status()?;
        ensure!(made.success(), "bpftool map create failed");
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o666))?;
        let out =
            as_nobody_with_bpf_caps(&["map", "dump", "pinned", pin.to_str().context("utf-8")?])?;
        ensure!(
            out.status.success(),
            "control: nobody with CAP_BPF cannot read an open pin either: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })();
    if mounted {
        let _ = Command::new("umount").arg(&scratch).status();
    }
    let _ = std::fs::remove_dir(&scratch);
    control?;

    signal(&agent.0, libc::SIGINT);
    ensure!(agent.0.wait()?.success(), "run did not exit cleanly");
    ensure!(
        !std::path::Path::new("/sys/fs/bpf/kml").exists(),
        "pins left behind after a clean exit"
    );
    assert_no_kml_programs()?;
    Ok(())
}

/// Runs the agent with `args`, expecting a failure: its one stderr line.
fn one_line_failure(args: &[&str]) -> Result<String> {
    let out = Command::new(agent_bin()).args(args).output()?;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    ensure!(!out.status.success(), "accepted: {args:?}");
    ensure!(
        err.lines().count() == 1,
        "more than one line for {args:?}: {err}"
    );
    ensure!(
        err.starts_with("kml-agent: "),
        "not the agent's error line: {err}"
    );
    Ok(err)
}

#[test]
fn clear_errors_for_wrong_run_input() -> Result<()> {
    let err = one_line_failure(&["run", "--device", "nosuchdisk9", "--duration", "2s"])?;
    ensure!(
        err.contains("unknown block device `nosuchdisk9`") && err.contains("whole disks here"),
        "unknown device: {err}"
    );

    // A disk with another scheduler: what to echo where.
    let dev = LoopDevice::new(16, 500, 5000)?;
    dev.set_queue("scheduler", "none")?;
    let err = one_line_failure(&["run", "--device", &dev.name, "--duration", "2s"])?;
    ensure!(
        err.contains("scheduler `none`")
            && err.contains(&format!(
                "echo mq-deadline > /sys/block/{}/queue/scheduler",
                dev.name
            )),
        "no mq-deadline: {err}"
    );
    dev.set_queue("scheduler", "mq-deadline")?;

    // Models made for other features or another schema: refused, with what to do.
    let scratch = ScratchDir::new("badmodels")?;
    let dir = scratch.0.clone();
    let shipped = shipped_logistic()?;
    let mut fewer = shipped.clone();
    fewer["features"].as_array_mut().context("features")?.pop();
    let mut newer = shipped.clone();
    newer["schema_version"] = 99.into();
    let mut unknown = shipped.clone();
    unknown["features"][0] = "feature_of_a_future_kernel".into();
    for (name, model, needle) in [
        ("fewer", fewer, "entries, `features` has"),
        ("newer", newer, "99 is not supported"),
        (
            "unknown",
            unknown,
            "unknown feature `feature_of_a_future_kernel`",
        ),
    ] {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, model.to_string())?;
        let err = one_line_failure(&[
            "run",
            "--device",
            &dev.name,
            "--model",
            path.to_str().context("utf-8")?,
            "--duration",
            "2s",
        ])?;
        ensure!(
            err.contains("refusing model")
                && err.contains(needle)
                && err.contains("kml-agent train"),
            "{name}: {err}"
        );
    }

    // A model that reads position features where the programs keep none
    // (classic tracepoints): refused at install, with the reason and a way out.
    let err = one_line_failure(&[
        "run",
        "--device",
        &dev.name,
        "--attach",
        "tracepoint",
        "--model",
        "tree-position",
        "--duration",
        "2s",
    ])?;
    ensure!(
        err.contains("reads position features") && err.contains("raw tracepoint"),
        "position model in tracepoint mode: {err}"
    );

    // --pin where no writable bpffs is.
    let not_bpffs = dir.join("kml");
    let err = one_line_failure(&[
        "run",
        "--device",
        &dev.name,
        "--pin",
        "--pin-dir",
        not_bpffs.to_str().context("utf-8")?,
        "--duration",
        "2s",
    ])?;
    ensure!(
        err.contains("is not a bpf file system") && err.contains("mount -t bpf bpf"),
        "not bpffs: {err}"
    );
    let err = one_line_failure(&[
        "run",
        "--device",
        &dev.name,
        "--pin",
        "--pin-dir",
        "/nonexistent-kml-bpffs/kml",
        "--duration",
        "2s",
    ])?;
    ensure!(err.contains("does not exist"), "missing bpffs: {err}");
    let ro = TestMount::new("robpf", "bpf", "ro")?;
    let pin_dir = ro.0.join("kml");
    let err = one_line_failure(&[
        "run",
        "--device",
        &dev.name,
        "--pin",
        "--pin-dir",
        pin_dir.to_str().context("utf-8")?,
        "--duration",
        "2s",
    ])?;
    ensure!(
        err.contains("mounted read-only") && err.contains("remount"),
        "read-only bpffs: {err}"
    );
    ensure!(
        !pin_dir.exists(),
        "a pin directory was created on a read-only bpffs"
    );
    assert_no_kml_programs()?;
    Ok(())
}
