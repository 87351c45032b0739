//! In-kernel inference in shadow mode: the model in the map is the model written,
//! the kernel's verdicts are the host's verdicts bit for bit, and flipping models
//! under load never exposes a torn slot.

use std::{process::Command, time::Duration};

use anyhow::{ensure, Context as _, Result};
use kml_agent::{
    kernel::attach::AttachMode,
    observe::{Observer, ObserverConfig},
    slots::ModelSlots,
};
use kml_ebpf_common::{
    features::{features_of_record, Feature, NUM_FEATURES},
    model::{LinearModel, ModelKind, TreeModel, VerdictRule, TREE_LEAF},
    position::KERNEL_COMPUTES_POSITION,
    Counter, RequestRecord, Verdict,
};
use kml_integration_tests::{assert_no_kml_programs, LoopDevice};
use kml_learn::QuantizedModel;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A logistic-rule model that flags a request when `feature` exceeds `above`.
fn threshold_model(feature: Feature, above: i64) -> QuantizedModel {
    let mut m = LinearModel::zeroed();
    m.kind = ModelKind::Logistic as u32;
    m.rule = VerdictRule::ScoreOverThreshold as u32;
    m.threshold = above;
    for j in 0..NUM_FEATURES {
        m.input_max[j] = 1 << 20;
    }
    m.weight[feature.index()] = 1;
    QuantizedModel::Linear(Box::new(m))
}

/// A one-split tree: at risk when `feature > split`.
fn split_tree(feature: Feature, split: i32) -> QuantizedModel {
    let mut t = TreeModel::zeroed();
    t.kind = ModelKind::Tree as u32;
    t.node_count = 3;
    t.depth = 1;
    t.value_shift = 16;
    t.threshold = 1 << 15;
    t.feature[0] = feature.index() as u8;
    t.split[0] = split;
    t.left[0] = 1;
    t.right[0] = 2;
    t.feature[1] = TREE_LEAF;
    t.feature[2] = TREE_LEAF;
    t.value[0] = 1 << 15;
    t.value[1] = 0;
    t.value[2] = 1 << 16;
    QuantizedModel::Tree(Box::new(t))
}

/// Every scored record's verdict and score, recomputed on the host from the
/// record's own insert-time fields with the model version it names.
fn check_bit_for_bit(records: &[RequestRecord], slots: &ModelSlots) -> Result<(usize, usize)> {
    let (mut scored, mut at_risk) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        if r.verdict == Verdict::NONE {
            continue;
        }
        scored += 1;
        let model = slots
            .version(r.model_version)
            .with_context(|| format!("record {i}: unknown version {}", r.model_version))?;
        let host = model.infer(&features_of_record(r));
        let kernel_at_risk = r.verdict == Verdict::AT_RISK;
        ensure!(
            host.score == r.score && host.at_risk == kernel_at_risk,
            "record {i} (model v{}): kernel score {} at_risk {kernel_at_risk}, host score {} at_risk {}",
            r.model_version,
            r.score,
            host.score,
            host.at_risk
        );
        at_risk += kernel_at_risk as usize;
    }
    Ok((scored, at_risk))
}

fn fio(dev: &LoopDevice, seconds: u32, seed: u32) -> Result<()> {
    let out = Command::new("fio")
        .args([
            "--name=mix",
            "--rw=randrw",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
        ])
        .args([
            "--numjobs=2",
            "--size=100M",
            "--time_based",
            "--group_reporting",
        ])
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--randseed={seed}"))
        .arg(format!("--filename={}", dev.path.display()))
        .output()
        .context("running fio")?;
    ensure!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn kernel_verdicts_equal_host_verdicts_and_are_counted() -> Result<()> {
    let dev = LoopDevice::new(128, 4, 8)?;
    let bdev = dev.block_device()?;
    let (records, counters, slots) = runtime().block_on(async {
        let mut config = ObserverConfig::new(AttachMode::RawTracepoint);
        config.ring_bytes = 32 << 20;
        let mut observer = Observer::load(config)?;
        observer.add_device(&bdev)?;
        let mut stream = observer.records()?;
        let mut slots = ModelSlots::new();
        slots.install(observer.ebpf_mut(), &threshold_model(Feature::ALL[0], 63))?;
        observer.attach()?;
        let path = dev.path.clone();
        let io = tokio::task::spawn_blocking(move || fio(&LoopDevice::borrowed(path), 2, 3));
        tokio::pin!(io);
        let mut records = Vec::new();
        loop {
            tokio::select! {
                r = &mut io => { r??; break }
                n = stream.next_batch(&mut records) => { n?; }
            }
        }
        observer.detach();
        stream.drain(&mut records);
        anyhow::Ok((records, observer.counters()?, slots))
    })?;
    assert_no_kml_programs()?;
    let (scored, at_risk) = check_bit_for_bit(&records, &slots)?;
    eprintln!(
        "{scored} verdicts, {at_risk} at risk, of {} records",
        records.len()
    );
    ensure!(
        scored > 1000 && at_risk > 0 && at_risk < scored,
        "{scored} scored, {at_risk} at risk"
    );
    ensure!(counters.get(Counter::ModelRejects) == 0, "{counters:?}");
    let matrix = counters.get(Counter::TrueMiss)
        + counters.get(Counter::FalseMiss)
        + counters.get(Counter::TrueMet)
        + counters.get(Counter::FalseMet);
    // The matrix is counted at completion: a stale entry's record (completion not
    // seen, complete_ns 0) is scored but never reaches it.
    let unseen = records
        .iter()
        .filter(|r| r.verdict != Verdict::NONE && r.complete_ns == 0)
        .count();
    ensure!(
        unseen as u64 <= counters.get(Counter::StaleEntries)
            && matrix + unseen as u64 == scored as u64,
        "confusion matrix counts {matrix}, {scored} scored records, {unseen} of them without a \
         completion: {counters:?}"
    );
    let host_true_miss = records
        .iter()
        .filter(|r| r.verdict == Verdict::AT_RISK && r.deadline_missed())
        .count();
    ensure!(
        counters.get(Counter::TrueMiss) == host_true_miss as u64,
        "true misses differ: {counters:?}"
    );
    Ok(())
}

#[test]
fn flips_under_load_never_expose_a_torn_model() -> Result<()> {
    let dev = LoopDevice::new(128, 4, 8)?;
    let bdev = dev.block_device()?;
    // Position features among them when the kernel computes them (it records them
    // at insert, the host recomputes the verdict from the record); else a model
    // using one is refused at install.
    let (second, fourth) = if KERNEL_COMPUTES_POSITION {
        ((Feature::OlderHalf, 1), (Feature::HeadAgeLog, 200))
    } else {
        ((Feature::ALL[6], 5), (Feature::ALL[0], 50))
    };
    let mut models = vec![
        threshold_model(Feature::ALL[4], 2),
        threshold_model(second.0, second.1),
        split_tree(Feature::ALL[4], 4),
        split_tree(fourth.0, fourth.1),
        // The insert's phase in its jiffy, past 2 ms.
        threshold_model(Feature::TickPhaseUs, 2000),
    ];
    if KERNEL_COMPUTES_POSITION {
        // The last lane, a count of the position state as a share of the queue
        // (more than about 1 in 90 queued requests due within reach below).
        models.push(threshold_model(Feature::ALL[Feature::ALL.len() - 1], 200));
    }
    let (records, counters, slots, flips) = runtime().block_on(async {
        let mut config = ObserverConfig::new(AttachMode::RawTracepoint);
        config.ring_bytes = 64 << 20;
        let mut observer = Observer::load(config)?;
        observer.add_device(&bdev)?;
        let mut stream = observer.records()?;
        let mut slots = ModelSlots::new();
        observer.attach()?;
        let path = dev.path.clone();
        let io = tokio::task::spawn_blocking(move || fio(&LoopDevice::borrowed(path), 3, 9));
        tokio::pin!(io);
        let mut records = Vec::new();
        let mut flips = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        loop {
            tokio::select! {
                r = &mut io => { r??; break }
                _ = tick.tick() => {
                    slots.install(observer.ebpf_mut(), &models[flips % models.len()])?;
                    flips += 1;
                }
                n = stream.next_batch(&mut records) => { n?; }
            }
        }
        observer.detach();
        stream.drain(&mut records);
        anyhow::Ok((records, observer.counters()?, slots, flips))
    })?;
    assert_no_kml_programs()?;
    let (scored, _) = check_bit_for_bit(&records, &slots)?;
    let versions: std::collections::BTreeSet<u32> =
        records.iter().map(|r| r.model_version).collect();
    eprintln!(
        "{flips} flips, {scored} verdicts from {} model versions",
        versions.len()
    );
    ensure!(
        flips >= 50 && versions.len() >= 20,
        "{flips} flips, {} versions seen",
        versions.len()
    );
    ensure!(
        counters.get(Counter::ModelRejects) == 0,
        "a slot was rejected under flips: {counters:?}"
    );
    Ok(())
}

#[test]
fn bpftool_dumps_the_model_by_field_name() -> Result<()> {
    let mut observer = Observer::load(ObserverConfig::new(AttachMode::RawTracepoint))?;
    let mut slots = ModelSlots::new();
    let active = slots.install(observer.ebpf_mut(), &threshold_model(Feature::ALL[4], 7))?;
    let out = Command::new("bpftool")
        .args(["map", "dump", "name", "LINEAR_MODELS"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in [
        "kind",
        "rule",
        "version",
        "threshold",
        "weight",
        "offset",
        "input_min",
        "product_shift",
        "checksum",
    ] {
        ensure!(
            text.contains(&format!("\"{field}\"")),
            "bpftool output lacks field {field}: {text}"
        );
    }
    ensure!(
        text.contains("\"threshold\": 7"),
        "threshold 7 not in the dump: {text}"
    );
    ensure!(
        text.contains(&format!("\"version\": {}", active.version)),
        "version not in the dump"
    );
    drop(observer);
    assert_no_kml_programs()?;
    Ok(())
}
