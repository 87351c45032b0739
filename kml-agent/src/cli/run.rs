//! `kml-agent run`: observe mq-deadline devices, score every request in the kernel
//! (shadow mode, or acting through the patched mq-deadline's hook with `--act`),
//! learn online, one live line per second.

use std::time::{Duration, Instant};

use kml_ebpf_common::{model::ModelKind, Counter};

use super::session;
use crate::{
    hook::{BoostSnapshot, HookGlobals, Policy},
    infer::ModelSlots,
    kernel::{btf::Btf, caps::KernelReport},
    learn::{self, LearnConfig, OnlineLearner},
    stats::{human_ns, RecordSummary},
    tune::{policy::TuneConfig, Tuners},
};

/// What happens when the ring buffer fills up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LossMode {
    /// A full ring drops (counted); under pressure the kernel keeps the records the
    /// model is least sure of (active learning).
    Drop,
    /// Every record must be processed: any drop is reported as an error state.
    Lossless,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Devices to observe (default: every disk whose scheduler is mq-deadline).
    #[arg(long, short)]
    pub device: Vec<String>,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    /// Model to start from: a model file, a shipped name (`logistic` for
    /// models/logistic.json), `auto` (the shipped model with the best held-back
    /// balanced accuracy) or `none` (observe, and learn from the first records).
    #[arg(long, default_value = "none")]
    pub model: String,
    /// Retrain on the sliding window this often; 0 turns online learning off.
    #[arg(long, value_parser = super::parse_duration, default_value = "10s")]
    pub retrain_every: Duration,
    /// Model kind trained online (default: the starting model's kind, else logistic).
    #[arg(long)]
    pub learn_kind: Option<String>,
    /// Records in the sliding training window.
    #[arg(long, default_value_t = 200_000)]
    pub window: usize,
    #[arg(long, value_enum, default_value_t = LossMode::Drop)]
    pub mode: LossMode,
    /// Pin the maps under /sys/fs/bpf/kml (0700/0600) for `kml-agent status` and
    /// bpftool; removed on a clean exit.
    #[arg(long)]
    pub pin: bool,
    /// Tune mq-deadline (fifo_batch, writes_starved, async_depth) from the live
    /// predictions: protect reads the model predicts at risk while writes compete,
    /// within safe ranges, undoing a change that costs more than its budget. The
    /// originals are restored on exit (docs/tuning.md).
    #[arg(long)]
    pub tune: bool,
    /// How often `--tune` decides (the length of its measuring window).
    #[arg(long, value_parser = super::parse_duration, default_value = "5s")]
    pub tune_every: Duration,
    /// Where --pin puts the maps (a directory on a bpffs).
    #[arg(long, default_value = crate::pin::PIN_DIR, value_name = "DIR")]
    pub pin_dir: std::path::PathBuf,
    /// Serve Prometheus metrics (records, every loss counter, verdicts, live
    /// confusion matrix, ns per decision, model version, swaps) at
    /// http://ADDR/metrics, e.g. 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Let verdicts act: the verdict program on the patched mq-deadline's hook
    /// applies this policy (`--act` alone: model-reads, i.e. reads the model flags
    /// at risk are served early). Needs kml's mq-deadline patch (`doctor`: mq-deadline
    /// hook). Without it, on such a kernel, the hook is attached and only counts.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "model-reads")]
    pub act: Option<Policy>,
    #[command(flatten)]
    pub observe: session::ObserveArgs,
}

impl RunArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        session::block_on(self.run())
    }

    async fn run(self) -> anyhow::Result<()> {
        let targets = session::resolve(&self.device)?;
        let start_model = match self.model.as_str() {
            "none" => None,
            spec => Some(crate::models::resolve(spec)?),
        };
        let learn_kind = match (&self.learn_kind, &start_model) {
            (Some(k), _) => ModelKind::from_name(k)
                .ok_or_else(|| anyhow::anyhow!("unknown --learn-kind `{k}`"))?,
            (None, Some((_, m))) => m.kind(),
            (None, None) => ModelKind::Logistic,
        };
        if self.pin {
            crate::pin::check_pin_dir(&self.pin_dir)?;
        }
        // Bound before anything is loaded: a busy address fails with nothing attached.
        let metrics = match self.metrics {
            Some(addr) => {
                let m = crate::metrics::Metrics::default();
                let bound = m.serve(addr).await?;
                tracing::info!("metrics at http://{bound}/metrics");
                Some(m)
            }
            None => None,
        };
        let mut events = crate::metrics::ModelEvents::default();
        let mut tuners = if self.tune {
            // Before anything is loaded: a device another agent tunes is refused
            // with nothing attached, and the originals are saved first.
            let t = Tuners::start(&targets, self.tune_every, TuneConfig::default())?;
            tracing::info!(
                "tuning mq-deadline every {:?}; originals saved in {}",
                self.tune_every,
                crate::tune::state::state_dir().display()
            );
            t
        } else {
            Tuners::default()
        };
        let report = KernelReport::probe();
        let plan = report.plan(self.observe.attach)?;
        if let (Some(policy), false) = (self.act, plan.hook) {
            let why = match &report.hook_ready {
                Err(why) => why.clone(),
                Ok(()) => format!(
                    "the observers run in {} mode; the hook needs raw tracepoints (--attach hook)",
                    plan.observers
                ),
            };
            anyhow::bail!("--act {policy}: the verdicts cannot act here: {why}");
        }
        let hook = if plan.hook {
            let btf = Btf::from_sys_fs()?;
            // One disk: only its requests get verdicts; else every traced disk's do
            // (an untraced disk's requests have no model verdict).
            let only = match targets.as_slice() {
                [one] => Some(one),
                _ => None,
            };
            Some(HookGlobals::from_btf(&btf, only)?)
        } else {
            None
        };
        let mode = self.mode;
        let adjust = move |c: &mut crate::observe::ObserverConfig| {
            if mode == LossMode::Drop {
                c.sample_fill_bytes = Some(c.ring_bytes / 2);
            }
            c.hook = hook;
        };
        let mut slots = ModelSlots::new();
        let mut observer = if self.pin {
            let (mut observer, outcome) = session::start_pinned(
                plan.observers,
                &targets,
                &self.observe,
                adjust,
                &self.pin_dir,
            )?;
            tracing::info!("maps pinned at {}: {outcome}", self.pin_dir.display());
            if let Some(a) = slots.adopt(observer.ebpf_mut())? {
                tracing::info!(
                    "model v{} {} keeps serving (adopted)",
                    a.version,
                    a.kind.name()
                );
            }
            observer
        } else {
            if let Some(note) = crate::adopt::orphan_note(&self.pin_dir) {
                tracing::info!("{note}");
            }
            session::start_in(plan.observers, &targets, &self.observe, adjust)?
        };
        let mut learner = OnlineLearner::new(LearnConfig {
            kind: learn_kind,
            every: self.retrain_every,
            window: self.window,
            min_records: 20_000,
            min_gain: 0.005,
            drift_drop: 0.10,
        });
        if let (Some((path, _)), Some(a)) = (&start_model, slots.active()) {
            tracing::info!(
                "not installing {}: the adopted model v{} serves (stop the agent cleanly to start from another model)",
                path.display(),
                a.version
            );
        } else if let Some((path, m)) = &start_model {
            let active = slots.install(observer.ebpf_mut(), &m.quantized)?;
            if let Some(ba) = crate::models::held_back_balanced_accuracy(m) {
                learner.accepted(ba);
            }
            tracing::info!(
                "model {} ({}) active as v{}",
                path.display(),
                m.kind().name(),
                active.version
            );
        }
        let boosts_before = BoostSnapshot::take(&targets);
        let policy = self.act.unwrap_or(Policy::Off);
        if plan.hook {
            observer.attach_hook(policy)?;
            // Scripts wait for "hook attached" before they start I/O.
            tracing::info!(
                "hook attached to dd_kml_verdict (kprobe + bpf_override_return, policy {policy}{})",
                if self.act.is_some() {
                    ""
                } else {
                    ": counting only, add --act to let verdicts act"
                }
            );
            if policy.uses_model() && self.retrain_every > Duration::ZERO {
                tracing::info!(
                    "note: with --act {policy} the online learner sees outcomes the verdicts changed \
                     (boosted requests meet their deadlines); --retrain-every 0 keeps the starting model"
                );
            }
        }
        // Before the ready line: a signal right after it must find the handlers.
        let signal = session::shutdown_signal();
        tokio::pin!(signal);
        let mut stream = observer.records()?;
        let names: Vec<String> = observer
            .devices()
            .iter()
            .map(|d| d.device.name.clone())
            .collect();
        tracing::info!(
            "observing {} ({}, {:?} mode); Ctrl-C stops",
            names.join(", "),
            observer.mode(),
            self.mode
        );

        if let Some(m) = &metrics {
            m.publish(&observer, slots.active(), 0, events)?;
        }
        let started = Instant::now();
        let stop_after = tokio::time::sleep(self.duration.unwrap_or(Duration::MAX / 4));
        tokio::pin!(stop_after);
        let mut watch = crate::hotplug::DeviceWatch::new(&self.device);
        let mut test_swaps = crate::test_swaps::from_env()?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut window = Vec::with_capacity(65536);
        let mut total = 0u64;
        let mut last_tick = Instant::now();
        let mut training: Option<tokio::task::JoinHandle<anyhow::Result<learn::Candidate>>> = None;
        // Live quality of the recent seconds, and a swap on probation.
        let mut recent = std::collections::VecDeque::<kml_learn::ConfusionMatrix>::new();
        let mut probation: Option<learn::Probation> = None;
        let mut last_drops = 0u64;
        loop {
            tokio::select! {
                () = &mut stop_after => break,
                sig = &mut signal => { tracing::info!("{}, detaching", sig?); break }
                () = crate::test_swaps::tick(&mut test_swaps) => {
                    if let Some(m) = slots.active().and_then(|a| slots.version(a.version).cloned()) {
                        slots.install(observer.ebpf_mut(), &m)?;
                    }
                }
                _ = tick.tick() => {
                    watch.check(&mut observer);
                    let secs = last_tick.elapsed().as_secs_f64();
                    last_tick = Instant::now();
                    let s = RecordSummary::of(&window);
                    let live = learn::live_matrix(&window);
                    total += window.len() as u64;
                    let counters = observer.counters()?;
                    let drops = counters.get(Counter::RingFullDrops);
                    let verdict_part = match slots.active() {
                        Some(a) if live.actual_misses() > 0 && live.actual_met() > 0 => format!(
                            " | v{} {} bal.acc {:.3} (tp {} fp {} tn {} fn {})",
                            a.version, a.kind.name(), live.balanced_accuracy(),
                            live.true_miss, live.false_miss, live.true_met, live.false_met
                        ),
                        // One class only (no misses, or nothing but misses): balanced
                        // accuracy is undefined; say what the model got right.
                        Some(a) if live.total() > 0 => format!(
                            " | v{} {} accuracy {:.3}, one class only (tp {} fp {} tn {} fn {})",
                            a.version, a.kind.name(), live.accuracy(),
                            live.true_miss, live.false_miss, live.true_met, live.false_met
                        ),
                        Some(a) => format!(" | v{} {}", a.version, a.kind.name()),
                        None => " | no model".into(),
                    };
                    println!(
                        "[{:>5.0}s] {:>7.0} rec/s | wait p50 {:>8} p99 {:>8} | service p50 {:>8} p99 {:>8} | misses {} ({:.1}%) | drops {} orphans {}{}",
                        started.elapsed().as_secs_f64(),
                        s.records as f64 / secs,
                        human_ns(s.insert_to_issue.p50_ns),
                        human_ns(s.insert_to_issue.p99_ns),
                        human_ns(s.issue_to_complete.p50_ns),
                        human_ns(s.issue_to_complete.p99_ns),
                        s.deadline_misses,
                        100.0 * s.deadline_misses as f64 / (s.records.max(1)) as f64,
                        drops,
                        counters.get(Counter::OrphanCompletions),
                        verdict_part,
                    );
                    if self.mode == LossMode::Lossless && drops > last_drops {
                        tracing::error!("lossless mode: {} records dropped (ring full); raise --ring-size", drops - last_drops);
                    }
                    last_drops = drops;
                    recent.push_back(live);
                    if recent.len() > learn::PROBATION_SECONDS {
                        recent.pop_front();
                    }
                    if let Some(p) = probation.as_mut() {
                        p.after.merge(&live);
                        if p.started.elapsed() >= std::time::Duration::from_secs(learn::PROBATION_SECONDS as u64) {
                            let p = probation.take().expect("checked");
                            if let Some(reason) = p.verdict() {
                                let back = slots.install(observer.ebpf_mut(), &p.previous)?;
                                learner.accepted(p.previous_reference);
                                events.rollbacks += 1;
                                tracing::info!("rollback to the previous model (now v{}): {reason}", back.version);
                            }
                        }
                    }
                    if let Some(reason) = learner.check_drift(&live) {
                        events.drifts += 1;
                        tracing::info!("drift: {reason}; retraining now");
                    }
                    if let Some(m) = &metrics {
                        m.publish(&observer, slots.active(), total, events)?;
                    }
                    learner.observe(&window);
                    tuners.observe(&window);
                    tuners.tick();
                    window.clear();
                    if self.retrain_every > Duration::ZERO && training.is_none() && learner.due() {
                        let data = learner.snapshot();
                        let active = slots.active().and_then(|a| slots.version(a.version).cloned());
                        let kind = learner.config.kind;
                        training = Some(tokio::task::spawn_blocking(move || learn::train_candidate(kind, data, active)));
                    }
                    if training.as_ref().is_some_and(|t| t.is_finished()) {
                        let done = training.take().expect("checked").await;
                        match done.map_err(anyhow::Error::from).and_then(|r| r) {
                            Ok(c) => {
                                let better = c.active_ba.is_none_or(|a| c.candidate_ba >= a + learner.config.min_gain);
                                let before = c.active_ba.map_or("none".to_string(), |a| format!("{a:.3}"));
                                if better {
                                    let prev = slots.active();
                                    let previous = prev.and_then(|p| slots.version(p.version).cloned());
                                    let active = slots.install(observer.ebpf_mut(), &c.model)?;
                                    if let Some(previous) = previous {
                                        probation = Some(learn::Probation::new(
                                            previous,
                                            learner.reference_ba.unwrap_or(0.0),
                                            recent.iter().fold(kml_learn::ConfusionMatrix::default(), |mut m, s| { m.merge(s); m }),
                                        ));
                                    }
                                    learner.accepted(c.candidate_ba);
                                    events.swaps += 1;
                                    tracing::info!(
                                        "swap {} -> v{} {}: held-back balanced accuracy {before} -> {:.3} on {} records (trained in {:.1}s)",
                                        prev.map_or("none".into(), |p| format!("v{}", p.version)),
                                        active.version, active.kind.name(), c.candidate_ba, c.held_back, c.took.as_secs_f64()
                                    );
                                } else {
                                    tracing::info!(
                                        "kept the active model: candidate {:.3} vs active {before} on {} held-back records",
                                        c.candidate_ba, c.held_back
                                    );
                                }
                            }
                            Err(e) => {
                                events.retrain_failures += 1;
                                tracing::warn!("retraining failed: {e:#}");
                            }
                        }
                    }
                }
                n = stream.next_batch(&mut window) => { n?; }
            }
        }
        // The originals go back before the programs go away.
        drop(tuners);
        let hook_counters = if plan.hook {
            Some(crate::hook::counters(observer.ebpf())?)
        } else {
            None
        };
        observer.detach();
        if let Some(c) = hook_counters {
            tracing::info!("hook (policy {policy}): {}", crate::hook::counters_line(&c));
            for line in boosts_before.lines_since() {
                tracing::info!("{line}");
            }
        }
        stream.drain(&mut window);
        total += window.len() as u64;
        let loss = session::losses(&observer)?;
        tracing::info!(
            "{total} records in {:.1}s; {}",
            started.elapsed().as_secs_f64(),
            loss.line()
        );
        if self.mode == LossMode::Lossless && loss.ring_full_drops > 0 {
            anyhow::bail!(
                "lossless mode: {} records were dropped",
                loss.ring_full_drops
            );
        }
        Ok(())
    }
}
