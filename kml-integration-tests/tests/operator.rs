//! What an operator sees: the metrics endpoint, `doctor --json`, the capability
//! set of the systemd unit, and the unit itself.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use kml_integration_tests::{
    agent_bin, assert_no_kml_programs, issue_direct, scattered_pattern, signal, spawn_agent,
    wait_for_line, wait_until, LoopDevice,
};

/// GET /metrics from `addr`, the body.
fn scrape(addr: &str) -> Result<String> {
    let mut conn = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: kml\r\n\r\n")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no HTTP head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "scrape: {head}");
    Ok(body.to_owned())
}

/// The value of the sample `name{labels}` (exact match of everything before the value).
/// Counters are integers; gauges are printed as floats (`0.0`).
fn sample(text: &str, name_and_labels: &str) -> Option<u64> {
    let v: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())?;
    (v.fract() == 0.0 && v >= 0.0).then_some(v as u64)
}

#[test]
fn metrics_count_what_was_issued_and_the_confusion_matrix_adds_up() -> Result<()> {
    const SIZE_MIB: u64 = 64;
    let dev = LoopDevice::new(SIZE_MIB, 500, 5000)?;
    let mut agent = spawn_agent(&[
        "run",
        "--device",
        &dev.name,
        "--model",
        "logistic",
        "--retrain-every",
        "0",
        "--metrics",
        "127.0.0.1:0",
    ])?;
    let line = wait_for_line(&agent.stderr, "metrics at http://", Duration::from_secs(30))?;
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.strip_suffix("/metrics"))
        .context("no address in the metrics line")?
        .to_owned();
    wait_for_line(&agent.stderr, "observing", Duration::from_secs(30))?;
    let before = scrape(&addr)?;
    ensure!(
        sample(&before, "kml_model_version{kind=\"logistic\"}") == Some(1),
        "model version: {before}"
    );

    // 300 writes then 300 reads, one request each.
    let pattern = scattered_pattern(300, SIZE_MIB, 11);
    issue_direct(&dev, &pattern)?;
    let issued = pattern.len() as u64;
    // Every request is a record or an entry still live. The kernel does not always
    // run the completion program (softirq completions on a CPU where it runs no
    // BPF program, uncounted: see `stale` in kml-ebpf's lifecycle.rs). Such a
    // request's entry stays live until its tag is reused, when it goes out as a
    // stale record (completion unseen); one never reused stays live.
    let mut last = String::new();
    let settled = wait_until(Duration::from_secs(10), || {
        last = scrape(&addr).unwrap_or_default();
        let received = sample(&last, "kml_records_received_total").unwrap_or(0);
        let live = sample(&last, "kml_inflight").unwrap_or(0);
        received + live == issued && sample(&last, "kml_records_total") == Some(received)
    });
    ensure!(
        settled,
        "records received and entries live never added up to {issued}: {last}"
    );
    ensure!(
        sample(&last, "kml_ring_full_drops_total") == Some(0),
        "drops: {last}"
    );
    let verdicts = sample(&last, "kml_verdicts_total").context("no verdicts counter")?;
    ensure!(
        verdicts == issued,
        "verdicts {verdicts} != {issued}: {last}"
    );
    let confusion: u64 = [
        ("at_risk", "missed"),
        ("at_risk", "met"),
        ("meets", "met"),
        ("meets", "missed"),
    ]
    .iter()
    .map(|(p, a)| {
        sample(
            &last,
            &format!("kml_confusion_total{{predicted=\"{p}\",actual=\"{a}\"}}"),
        )
        .unwrap_or(u64::MAX / 8)
    })
    .sum();
    // A verdict is judged at its request's completion; the rest are the
    // completions never seen, counted: stale entries and entries still live.
    let stale = sample(&last, "kml_stale_entries_total").context("no stale entries counter")?;
    let live = sample(&last, "kml_inflight").context("no in-flight gauge")?;
    ensure!(
        confusion + stale + live == verdicts,
        "confusion matrix sums to {confusion}, with {stale} stale and {live} live entries; \
         verdicts {verdicts}: {last}"
    );
    ensure!(
        stale + live <= issued / 20,
        "{stale} stale and {live} live entries of {issued} requests: {last}"
    );
    ensure!(
        last.contains("kml_program_runs_total{program=\"kml_raw_rq_insert\"")
            || last.contains("kml_program_runs_total{program=\"kml_tp_rq_insert\""),
        "no per-program runs: {last}"
    );
    for name in [
        "kml_model_swaps_total",
        "kml_model_rollbacks_total",
        "kml_threshold_calibrations_total",
        "kml_threshold_shift",
        "kml_orphan_completions_total",
        "kml_lru_evictions_total",
        "kml_bpf_stats_enabled",
    ] {
        ensure!(sample(&last, name).is_some(), "{name} missing: {last}");
    }

    signal(&agent.child.0, libc::SIGTERM);
    ensure!(agent.child.0.wait()?.success(), "run did not exit cleanly");
    assert_no_kml_programs()?;
    Ok(())
}

#[test]
fn metrics_address_in_use_is_one_clear_line_and_nothing_attached() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let dev = LoopDevice::new(16, 500, 5000)?;
    let out = Command::new(agent_bin())
        .args(["run", "--device", &dev.name, "--metrics", &addr])
        .args(["--duration", "5s"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "run with a busy --metrics address succeeded"
    );
    ensure!(
        err.contains("cannot serve metrics on") && err.contains("--metrics"),
        "unclear: {err}"
    );
    ensure!(err.trim().lines().count() == 1, "more than one line: {err}");
    assert_no_kml_programs()?;
    Ok(())
}

/// `kml-agent run --json | head -1`: when the reader goes, the run stops as
/// Ctrl-C stops it (through shutdown: one warning, exit 0, nothing attached), not
/// at the end of its duration and not with a panic.
#[test]
fn run_stops_cleanly_when_its_reader_goes() -> Result<()> {
    use std::io::BufRead as _;
    let dev = LoopDevice::new(16, 500, 5000)?;
    let mut child = kml_integration_tests::ChildGuard(
        Command::new(agent_bin())
            .args(["run", "--device", &dev.name, "--json", "--duration", "60s"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    );
    let mut out = std::io::BufReader::new(child.0.stdout.take().context("stdout")?);
    let mut first = String::new();
    out.read_line(&mut first)?;
    ensure!(first.contains(r#""event":"ready""#), "first line: {first}");
    let started = std::time::Instant::now();
    drop(out);
    ensure!(
        wait_until(Duration::from_secs(20), || matches!(
            child.0.try_wait(),
            Ok(Some(_))
        )),
        "run went on after its reader closed stdout"
    );
    let status = child.0.wait()?;
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    ensure!(status.success(), "exit {status}: {err}");
    ensure!(
        err.contains("stdout closed"),
        "no word of why it stopped: {err}"
    );
    ensure!(!err.contains("panicked"), "{err}");
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "it stopped at its duration, not when its reader went"
    );
    assert_no_kml_programs()?;
    Ok(())
}

/// A command that only reads and prints ends quietly on a closed pipe (killed
/// by SIGPIPE, as `ls | head` is), with no panic and no backtrace.
#[test]
fn a_printing_command_ends_quietly_on_a_closed_pipe() -> Result<()> {
    use std::os::unix::process::ExitStatusExt as _;
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = Command::new(agent_bin())
        .arg("models")
        .stdout(writer)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!err.contains("panicked"), "{err}");
    ensure!(
        out.status.signal() == Some(libc::SIGPIPE),
        "exit {} (want: killed by SIGPIPE): {err}",
        out.status
    );
    Ok(())
}

/// The shipped systemd unit.
fn unit_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/kml-agent.service")
}

/// The capabilities the unit grants (`CapabilityBoundingSet=`), as setpriv names
/// them (`bpf`, `perfmon`, ...).
fn unit_capabilities() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(unit_file())?;
    let bounding = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("no CapabilityBoundingSet in the unit")?;
    let ambient = text
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .context("no AmbientCapabilities in the unit")?;
    ensure!(
        bounding == ambient,
        "the unit's bounding set and ambient set differ"
    );
    Ok(bounding
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect())
}

/// The agent as nobody:nogroup holding exactly `caps` (ambient, so they survive
/// the exec into a non-root uid; bounding set cut to them).
fn agent_as_nobody_with(caps: &[String]) -> Command {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg(agent_bin());
    cmd
}

#[test]
fn the_units_capabilities_suffice_and_each_is_needed() -> Result<()> {
    let caps = unit_capabilities()?;
    let mut sorted = caps.clone();
    sorted.sort();
    ensure!(
        sorted == ["bpf", "perfmon", "sys_admin"],
        "the unit grants {caps:?}"
    );
    const SIZE_MIB: u64 = 32;
    let dev = LoopDevice::new(SIZE_MIB, 500, 5000)?;

    // Exactly those: a non-root user observes and counts every request.
    let mut cmd = agent_as_nobody_with(&caps);
    cmd.args(["run", "--device", &dev.name, "--duration", "4s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = kml_integration_tests::ChildGuard(cmd.spawn().context("running setpriv")?);
    let stderr = kml_integration_tests::forward_lines(
        child.0.stderr.take().context("stderr")?,
        "agent (nobody)",
    );
    let _stdout = kml_integration_tests::forward_lines(
        child.0.stdout.take().context("stdout")?,
        "agent (nobody) out",
    );
    wait_for_line(&stderr, "observing", Duration::from_secs(30))?;
    let pattern = scattered_pattern(100, SIZE_MIB, 3);
    issue_direct(&dev, &pattern)?;
    let summary = wait_for_line(&stderr, " records in ", Duration::from_secs(30))?;
    ensure!(child.0.wait()?.success(), "run as nobody failed");
    ensure!(
        summary.starts_with(&format!("kml-agent: {} records in ", pattern.len()))
            && summary.contains("drops 0 |"),
        "summary: {summary}"
    );
    assert_no_kml_programs()?;

    // One fewer: one line naming the missing capability, nothing attached.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let out = agent_as_nobody_with(&fewer)
            .args(["run", "--device", &dev.name, "--duration", "2s"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "ran without {missing}");
        let name = format!("CAP_{}", missing.to_uppercase());
        ensure!(
            err.contains("not privileged enough") && err.contains(&format!("missing {name}")),
            "without {name}: {err}"
        );
        ensure!(err.trim().lines().count() == 1, "more than one line: {err}");
        assert_no_kml_programs()?;
    }
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    if let Err(e) = Command::new("systemd-analyze").arg("--version").output() {
        return kml_testkit::skip(format_args!(
            "systemd-analyze cannot run ({e}): `cargo xtask setup` installs it (Debian package systemd)"
        ));
    }
    // verify checks that ExecStart's binary exists: point it at the built agent.
    let text = std::fs::read_to_string(unit_file())?;
    ensure!(
        text.contains("ExecStart=/usr/local/bin/kml-agent run"),
        "unexpected ExecStart"
    );
    let dir = std::env::temp_dir().join(format!("kml-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let unit = dir.join("kml-agent.service");
    std::fs::write(
        &unit,
        text.replace(
            "/usr/local/bin/kml-agent",
            agent_bin().to_str().context("utf-8")?,
        ),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
    assert_no_kml_programs()
}

/// `doctor` exits non-zero only when tracing is impossible: with root, or with
/// exactly the unit's capabilities as nobody, it succeeds although optional
/// features are missing on this kernel (kprobes, fentry, the patched
/// mq-deadline); without CAP_BPF, or with no capability at all, nothing can be
/// traced and it fails, saying why.
#[test]
fn doctor_fails_only_when_tracing_is_impossible() -> Result<()> {
    let doctor_json = |cmd: &mut Command| -> Result<(bool, serde_json::Value, String)> {
        let out = cmd.args(["doctor", "--json"]).output()?;
        let doc = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "doctor --json printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((
            out.status.success(),
            doc,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let failing = |doc: &serde_json::Value| -> Vec<String> {
        doc["checks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["ok"] == false)
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (ok, doc, err) = doctor_json(&mut Command::new(agent_bin()))?;
    ensure!(ok, "doctor as root failed: {err}");
    let missing = failing(&doc);
    ensure!(
        !missing.is_empty(),
        "every check passes on this kernel, so `optional features missing` is not shown: {doc}"
    );
    ensure!(
        doc["attach_mode"].is_string(),
        "root: no attach mode although doctor succeeded: {doc}"
    );
    eprintln!("root: exit 0 with {missing:?} missing");

    let caps = unit_capabilities()?;
    let (ok, doc, err) = doctor_json(&mut agent_as_nobody_with(&caps))?;
    ensure!(
        ok && doc["attach_mode"].is_string(),
        "doctor as nobody with {caps:?} failed: {err} {doc}"
    );
    for without in [
        vec!["perfmon".to_owned(), "sys_admin".to_owned()],
        Vec::new(),
    ] {
        let (ok, doc, err) = doctor_json(&mut agent_as_nobody_with(&without))?;
        ensure!(
            !ok && doc["attach_mode"].is_null() && doc["attach_error"].is_string(),
            "doctor as nobody with only {without:?} succeeded: {doc}"
        );
        ensure!(
            failing(&doc).iter().any(|c| c == "privileges"),
            "doctor with only {without:?} does not name the privileges: {doc} {err}"
        );
        ensure!(
            doc["attach_error"]
                .as_str()
                .is_some_and(|e| e.contains("CAP_BPF") && e.contains("run as root")),
            "doctor with only {without:?}: its verdict does not lead with the privileges: {doc}"
        );
    }
    assert_no_kml_programs()
}

#[test]
fn doctor_json_agrees_with_the_system() -> Result<()> {
    let dev = LoopDevice::new(16, 320, 4000)?;
    let out = Command::new(agent_bin())
        .args(["doctor", "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "doctor --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("doctor --json is not one JSON value")?;
    let uname = Command::new("uname").arg("-r").output()?;
    ensure!(
        doc["kernel"].as_str() == Some(String::from_utf8_lossy(&uname.stdout).trim()),
        "kernel: {doc}"
    );
    let check = |name: &str| -> Result<bool> {
        doc["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name))
            .and_then(|c| c["ok"].as_bool())
            .with_context(|| format!("no check {name}: {doc}"))
    };
    ensure!(
        check("BTF")? == std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "BTF check disagrees with /sys/kernel/btf/vmlinux"
    );
    ensure!(
        check("kprobes")?
            == std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists(),
        "kprobes check disagrees with the kprobe PMU"
    );
    // The tick rate the classic tracepoint label uses, against the kernel's config.
    let label = doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "deadline label"))
        .and_then(|c| c["detail"].as_str())
        .with_context(|| format!("no deadline label check: {doc}"))?;
    let config = Command::new("sh")
        .args(["-c", "zcat /proc/config.gz 2>/dev/null"])
        .output()?;
    if let Some(hz) =
        kml_agent::kernel::clock::hz_from_config(&String::from_utf8_lossy(&config.stdout))
    {
        ensure!(
            label.contains(&format!("(HZ {hz}, ")),
            "CONFIG_HZ={hz}, doctor: {label}"
        );
    }
    ensure!(label.contains("rq->fifo_time@"), "deadline label: {label}");
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let bpffs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    ensure!(
        check("bpffs")? == bpffs,
        "bpffs check disagrees with /proc/self/mounts"
    );
    // Our loop device, with what sysfs says (mq-deadline stores jiffies: read back).
    let read_expire = std::fs::read_to_string(dev.sys().join("queue/iosched/read_expire"))?;
    let ours = doc["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == dev.name.as_str()))
        .with_context(|| format!("{} not listed: {doc}", dev.name))?;
    ensure!(ours["scheduler"] == "mq-deadline", "scheduler: {ours}");
    ensure!(
        ours["iosched"]["read_expire"].as_str() == Some(read_expire.trim()),
        "read_expire: {ours}"
    );
    ensure!(
        ours["size_sectors"].as_u64() == Some((16 << 20) / 512),
        "size: {ours}"
    );
    ensure!(
        matches!(
            doc["attach_mode"].as_str(),
            Some("raw-tracepoint" | "tracepoint")
        ) && doc["attach_error"].is_null(),
        "attach mode: {doc}"
    );
    assert_no_kml_programs()
}
