//! What a full ring does, on the real kernel with a ring far too small for the
//! load: in lossless mode a drop is an error; in drop mode, past the fill level,
//! the kernel keeps the records near the model's decision boundary and its audit
//! sample (one record in `Sampling::AUDIT_EVERY`), and counts every one it leaves
//! out (`sampled_out`); and every request is a record or a named loss, whatever
//! the mode.

use std::{process::Command, time::Duration};

use anyhow::{ensure, Context as _, Result};
use kml_agent::{
    kernel::attach::AttachMode,
    observe::{Observer, ObserverConfig},
    slots::ModelSlots,
};
use kml_ebpf_common::{
    features::{Feature, NUM_FEATURES},
    model::{LinearModel, ModelKind, VerdictRule},
    Counter, ReqOp, RequestRecord, Sampling, Verdict,
};
use kml_integration_tests::{
    accounting::{alone_on_the_block_tracepoints, explain, recursion_misses, DiskStats, Losses},
    agent_bin, assert_no_kml_programs, LoopDevice,
};
use kml_learn::QuantizedModel;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// fio's arguments for `secs` of random mixed 4 KiB I/O on `dev` at `rate` IOPS
/// (0: as fast as it goes).
fn fio_args(dev: &LoopDevice, secs: u32, rate: u32) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=loss",
        "--rw=randrw",
        "--bs=4k",
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=16",
        "--size=64M",
        "--time_based",
        "--randseed=17",
        "--output-format=json",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.push(format!("--runtime={secs}"));
    if rate > 0 {
        a.push(format!("--rate_iops={rate}"));
    }
    a.push(format!("--filename={}", dev.path.display()));
    a
}

/// A model whose verdict hangs on the request's direction only: reads score 0, on
/// the threshold (near the boundary), writes score far above it (at risk, far).
fn reads_near_writes_far() -> (QuantizedModel, i64) {
    let mut m = LinearModel::zeroed();
    m.kind = ModelKind::Logistic as u32;
    m.rule = VerdictRule::ScoreOverThreshold as u32;
    m.threshold = 0;
    for j in 0..NUM_FEATURES {
        m.input_max[j] = 1;
    }
    m.weight[Feature::WriteDir.index()] = 1 << 20;
    // Near: within 1 of the limit. Reads (write_dir 0) are at 0; writes at 2^20.
    (QuantizedModel::Linear(Box::new(m)), 1)
}

/// Drop mode on the real kernel: a 64 KiB ring that the kernel samples past a
/// quarter full, a consumer that drains every 50 ms, I/O at a rate that fills it
/// past that level between drains. Reads are near the model's boundary, writes far
/// from it: no read may be sampled out, writes are, and every request of the
/// device is a record, a sampled-out write, or a counted loss.
#[test]
fn drop_mode_samples_out_only_far_from_the_boundary() -> Result<()> {
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(128, 500, 5000)?;
    let bdev = dev.block_device()?;
    let (records, counters, losses, stats) = runtime().block_on(async {
        let mut config = ObserverConfig::new(AttachMode::RawTracepoint);
        config.ring_bytes = 64 << 10;
        config.sample_fill_bytes = Some(16 << 10);
        // The agent's batching, but a drain on a fixed 50 ms beat.
        config.poll_interval = Duration::from_millis(50);
        let mut observer = Observer::load(config)?;
        observer.add_device(&bdev)?;
        let mut stream = observer.records()?;
        let mut slots = ModelSlots::new();
        let (model, near) = reads_near_writes_far();
        slots.near_margin = near;
        slots.install(observer.ebpf_mut(), &model)?;
        observer.attach()?;
        let before = DiskStats::read(&dev.name)?;
        let args = fio_args(&dev, 3, 8000);
        let io = tokio::task::spawn_blocking(move || Command::new("fio").args(args).output());
        tokio::pin!(io);
        let mut records = Vec::new();
        let mut beat = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                out = &mut io => {
                    let out = out??;
                    ensure!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
                    break;
                }
                _ = beat.tick() => { stream.drain(&mut records); }
            }
        }
        let stats = before.delta(&DiskStats::read(&dev.name)?);
        let missed = recursion_misses(&observer)?;
        observer.detach();
        stream.drain(&mut records);
        let counters = observer.counters()?;
        let losses = Losses::from_counters(&counters, missed, observer.live_inflight()?);
        anyhow::Ok((records, counters, losses, stats))
    })?;
    assert_no_kml_programs()?;
    let on_dev: Vec<&RequestRecord> = records.iter().filter(|r| r.dev == bdev.dev()).collect();
    let read_records = on_dev.iter().filter(|r| r.op() == ReqOp::Read).count() as u64;
    let sampled = counters.get(Counter::SampledOut);
    let drops = counters.get(Counter::RingFullDrops);
    eprintln!(
        "device {stats:?}; {} records ({read_records} reads), sampled out {sampled}, ring-full drops {drops}",
        on_dev.len()
    );
    ensure!(
        sampled > 0,
        "the ring never passed its sampling level: nothing sampled out ({counters:?})"
    );
    // The verdicts are what the model says: reads near (kept), writes far.
    for r in &on_dev {
        let want = if r.op() == ReqOp::Read {
            (Verdict::MEETS, Sampling::NEAR_BOUNDARY)
        } else {
            (Verdict::AT_RISK, 0)
        };
        ensure!(
            (r.verdict, r.sampling & Sampling::NEAR_BOUNDARY) == want,
            "verdict {} sampling {:#x} for a {:?}",
            r.verdict,
            r.sampling,
            r.op()
        );
        // Kept under pressure: near the boundary or by the audit, nothing else.
        ensure!(
            r.sampling & Sampling::UNDER_PRESSURE == 0
                || r.sampling & (Sampling::NEAR_BOUNDARY | Sampling::AUDIT) != 0,
            "a {:?} kept under pressure, neither near the boundary nor audited (sampling {:#x})",
            r.op(),
            r.sampling
        );
    }
    // The audit sample: under pressure the far writes are kept one in
    // `AUDIT_EVERY` (of this CPU's records, reads included: about that share of
    // the writes), the rest sampled out.
    let audited_writes = on_dev
        .iter()
        .filter(|r| r.op() != ReqOp::Read && r.sampling & Sampling::AUDIT != 0)
        .count() as u64;
    let share = audited_writes as f64 / (audited_writes + sampled) as f64;
    eprintln!(
        "audit: {audited_writes} far writes kept under pressure against {sampled} sampled out ({share:.3})"
    );
    let every = Sampling::AUDIT_EVERY as f64;
    ensure!(
        (1.0 / (4.0 * every)..=3.0 / every).contains(&share),
        "the audit kept {audited_writes} far writes under pressure against {sampled} sampled out \
         ({share:.3}); about 1 in {every} expected"
    );
    // Every read completed on the device is a record, but for the losses other
    // than sampling (ring full, ...): sampling never leaves a near-boundary record out.
    let not_sampling = losses.total() - sampled;
    ensure!(
        read_records <= stats.reads && stats.reads - read_records <= not_sampling,
        "{} reads completed, {read_records} recorded, {not_sampling} losses other than sampling ({losses}): \
         near-boundary reads were sampled out",
        stats.reads
    );
    // And everything adds up: records + sampled out + every other counted loss.
    explain(
        "requests completed on the device",
        stats.requests(),
        on_dev.len() as u64,
        &losses,
    )?;
    ensure!(
        on_dev.len() as u64 + sampled + drops <= stats.requests(),
        "more records and counted losses than requests: {} + {sampled} + {drops} > {stats:?}",
        on_dev.len()
    );
    Ok(())
}

/// Runs `kml-agent run --mode lossless` with `ring` under fio for 2 s: its exit
/// status and stderr.
fn lossless_run(dev: &LoopDevice, ring: &str) -> Result<(bool, String)> {
    let mut agent = Command::new(agent_bin())
        .args(["run", "--device", &dev.name, "--mode", "lossless"])
        .args([
            "--ring-size",
            ring,
            "--retrain-every",
            "0",
            "--duration",
            "4s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting kml-agent")?;
    let stderr = kml_integration_tests::forward_lines(
        agent.stderr.take().context("stderr")?,
        "agent (lossless)",
    );
    kml_integration_tests::wait_for_line(&stderr, "observing", Duration::from_secs(30))?;
    let fio = Command::new("fio").args(fio_args(dev, 2, 0)).output()?;
    ensure!(fio.status.success(), "fio failed");
    let status = agent.wait()?;
    let mut lines = Vec::new();
    while let Ok(l) = stderr.recv_timeout(Duration::from_millis(500)) {
        lines.push(l);
    }
    Ok((status.success(), lines.join("\n")))
}

/// Lossless mode: with a ring of one page, full within microseconds under fio,
/// every drop is reported as an error while it happens and the run fails; with the
/// default ring and the same load it passes with no drop.
#[test]
fn lossless_mode_fails_on_a_drop() -> Result<()> {
    let dev = LoopDevice::new(128, 500, 5000)?;
    let (ok, err) = lossless_run(&dev, "4K")?;
    ensure!(!ok, "lossless run with a 4 KiB ring succeeded: {err}");
    ensure!(
        err.contains("ERROR lossless mode:") && err.contains("records dropped"),
        "no error while records were dropped: {err}"
    );
    ensure!(
        err.lines()
            .last()
            .is_some_and(|l| l.contains("lossless mode:") && l.contains("were dropped")),
        "the run did not end with the loss: {err}"
    );
    assert_no_kml_programs()?;
    let (ok, err) = lossless_run(&dev, "8M")?;
    ensure!(
        ok && err.contains("drops 0 |"),
        "lossless run with the default ring: {err}"
    );
    assert_no_kml_programs()
}
