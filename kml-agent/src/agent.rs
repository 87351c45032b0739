//! The run loop of `kml-agent run`: observe mq-deadline devices, score every
//! request in the kernel (shadow mode, or acting through the patched mq-deadline's
//! hook), learn online, tune, publish metrics.
//!
//! [`Agent::start`] sets everything up (in the order that leaves nothing behind when
//! a step fails), [`Agent::step`] waits for the next thing to happen and handles it
//! (records, the one-second tick, a finished training, a signal),
//! [`Agent::shutdown`] undoes it and reports what was lost. The command line only
//! turns its arguments into an [`AgentConfig`] and prints the [`Tick`]s.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    time::{Duration, Instant},
};

use kml_ebpf_common::{
    features::features_of_record, model::ModelKind, Counter, RequestRecord, Verdict,
};
use kml_learn::{
    calibrate::{CalibrationPolicy, Contender, LiveCalibration, RaceResult},
    ConfusionMatrix, LoadedModel, TickBand, TickBandCount,
};
use tokio::task::JoinHandle;

use crate::{
    act::{
        hook::{self, BoostChange, BoostSnapshot, Policy},
        tune::{policy::TuneConfig, Tuners},
    },
    devices::BlockDevice,
    kernel::{
        attach::{AttachPlan, AttachRequest},
        caps::KernelReport,
    },
    learn::{
        candidate::{train_candidate, Acting, Candidate, Recipe},
        models::{self, StartModel},
        online::{
            LearnConfig, ModelEvents, OnlineLearner, Rollback, Swap, TrainJob, TrainingOutcome,
        },
    },
    metrics::Metrics,
    object::HookGlobals,
    observe::{
        hotplug::DeviceWatch, losses::LossReport, pins, ring::RecordStream, Observer,
        ObserverConfig,
    },
    slots::{ActiveModel, ModelSlots},
    stats::{RecordSummary, SummaryAccumulator},
};

/// Records' room kept between drains (a drain at the wake-up threshold, 1 MiB of
/// ring, is about 5,700 records: kept, not reallocated every drain).
const BATCH_KEEP: usize = 8192;

/// What happens when the ring buffer fills up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LossMode {
    /// A full ring drops (counted); under pressure the kernel keeps the records the
    /// model is least sure of (active learning).
    Drop,
    /// Every record must be processed: any drop is reported as an error state.
    Lossless,
}

/// Everything `run` was asked to do.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Devices to observe (names or /dev paths; empty: every mq-deadline disk).
    pub devices: Vec<String>,
    /// Stop after this long (`None`: until a signal).
    pub duration: Option<Duration>,
    /// The model to start from: a file, a shipped name, `auto` or `none`.
    pub model: String,
    /// Retrain this often; zero turns online learning off.
    pub retrain_every: Duration,
    /// The kind trained online (default: the starting model's, else logistic).
    pub learn_kind: Option<String>,
    /// Records in the sliding training window.
    pub window: usize,
    /// Fewest records in the window worth training on.
    pub min_train_records: usize,
    /// While a model policy acts and online learning runs: the hook leaves one in
    /// `2^hold_out_shift` of the requests it would serve early alone.
    pub hold_out_shift: u32,
    pub mode: LossMode,
    /// Pin maps and links (`run --pin`) in `pin_dir`.
    pub pin: bool,
    /// Where pins are (without `--pin`: where a killed agent's may still be).
    pub pin_dir: PathBuf,
    /// Tune mq-deadline, deciding this often (`run --tune`).
    pub tune_every: Option<Duration>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Let verdicts act with this policy (`run --act`).
    pub act: Option<Policy>,
    pub attach: AttachRequest,
    pub ring_bytes: u32,
    /// Move the serving model's threshold to what the newest outcomes say
    /// (`None`: keep the model's own; always `None` while verdicts act).
    pub calibrate: Option<CalibrationPolicy>,
}

/// Model versions the run loop keeps for host-side use (the newest).
const SLOT_HISTORY: usize = 64;

/// One second of the run, for the live line.
#[derive(Clone, Debug)]
pub struct Tick {
    /// Since the agent was ready.
    pub elapsed: Duration,
    /// The length of this tick (about a second).
    pub secs: f64,
    pub summary: RecordSummary,
    /// The kernel's counters of ring-full drops and orphan completions, so far.
    pub drops: u64,
    pub orphans: u64,
    pub model: Option<ActiveModel>,
    /// The active model's verdicts against the outcomes of this second.
    pub live: ConfusionMatrix,
    /// What online learning did this second.
    pub learning: Vec<LearningNote>,
    /// The tuning decisions applied this second (`run --tune`).
    pub tuning: Vec<String>,
}

/// One thing online learning did (also logged, in the same words).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LearningNote {
    /// `drift`, `swap`, `keep` (the candidate was not better), `refused` (the kernel
    /// refused the candidate), `rollback`, `rollback-refused`, `failed` (training),
    /// `calibrate` (the serving model's threshold moved), `calibrate-refused`,
    /// `race` (how `--model auto`'s models did live, and which serves), or
    /// `race-refused`.
    pub kind: &'static str,
    pub message: String,
}

/// Logs `message` (a warning for the failures) and keeps it for the tick.
fn note(notes: &mut Vec<LearningNote>, kind: &'static str, message: String) {
    if matches!(
        kind,
        "refused" | "rollback-refused" | "failed" | "calibrate-refused" | "race-refused"
    ) {
        tracing::warn!("{message}");
    } else {
        tracing::info!("{message}");
    }
    notes.push(LearningNote { kind, message });
}

/// What the agent observes, once it is ready.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ready {
    pub devices: Vec<String>,
    /// The observers' attach mode.
    pub attach: String,
    /// The verdict program's policy, when it is attached.
    pub hook_policy: Option<String>,
    pub model: Option<ModelId>,
}

/// Which model serves: its version (counted by the agent) and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelId {
    pub version: u32,
    pub kind: &'static str,
}

impl From<ActiveModel> for ModelId {
    fn from(a: ActiveModel) -> ModelId {
        ModelId {
            version: a.version,
            kind: a.kind.name(),
        }
    }
}

/// The verdict program's work, at the end of a session.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HookReport {
    pub policy: String,
    /// `HOOK_COUNTERS` by name.
    pub counters: serde_json::Value,
    /// What the kernel did, per disk.
    pub boosts: Vec<BoostChange>,
}

/// What a session did, at its end.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    /// Records the agent took from the ring buffer.
    pub records: u64,
    pub seconds: f64,
    pub losses: LossReport,
    pub hook: Option<HookReport>,
    /// Threshold calibration's installs, and the shift the serving model ended with.
    pub calibration: Option<CalibrationReport>,
    /// What online learning did (when it was on).
    pub learning: Option<LearningReport>,
    /// The kernel's verdicts over the whole run against the outcomes (when a model
    /// gave any).
    pub verdicts: Option<VerdictReport>,
}

/// The verdicts of a run, judged as the live line judges each second's
/// ([`crate::learn::candidate::Recipe::live_matrix`]), and split by the tick band
/// ([`TickBand`]): how much of what the model got wrong was decided within one
/// timer tick of the deadline.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct VerdictReport {
    pub confusion: ConfusionMatrix,
    /// `None` with one class only (no misses, or nothing but misses).
    pub balanced_accuracy: Option<f64>,
    pub tick_band: Option<TickBand>,
}

impl VerdictReport {
    fn new(confusion: ConfusionMatrix, band: &TickBandCount) -> Option<Self> {
        (confusion.total() > 0).then(|| VerdictReport {
            confusion,
            balanced_accuracy: (!confusion.one_class()).then(|| confusion.balanced_accuracy()),
            tick_band: band.band(),
        })
    }
}

/// What online learning did in a session.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LearningReport {
    pub swaps: u64,
    pub rollbacks: u64,
    pub drifts: u64,
    pub retrain_failures: u64,
}

/// What live threshold calibration did in a session.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CalibrationReport {
    pub installs: u64,
    pub shift: i64,
}

/// What one [`Agent::step`] did.
pub enum Step {
    /// Records arrived (kept for the next tick).
    Records,
    /// A second passed.
    Tick(Box<Tick>),
    /// The duration passed or a signal came: time for [`Agent::shutdown`].
    Stop,
}

/// The verdict program on the patched mq-deadline's hook, while attached.
struct HookSession {
    policy: Policy,
    boosts_before: BoostSnapshot,
}

type Signal = Pin<Box<dyn Future<Output = anyhow::Result<&'static str>>>>;

pub struct Agent {
    config: AgentConfig,
    observer: Observer,
    stream: RecordStream,
    slots: ModelSlots,
    learner: OnlineLearner,
    training: Option<JoinHandle<anyhow::Result<Candidate>>>,
    /// The model version the training in flight was judged against.
    training_against: Option<u32>,
    tuners: Tuners,
    metrics: Option<Metrics>,
    watch: DeviceWatch,
    hook: Option<HookSession>,
    signal: Signal,
    stop_after: Pin<Box<tokio::time::Sleep>>,
    tick: tokio::time::Interval,
    #[cfg(feature = "testing")]
    test_swaps: Option<tokio::time::Interval>,
    /// The records of the last drain, handed on (stats, live verdicts, learning,
    /// tuning) as they arrive, then cleared: a second of records is never held.
    batch: Vec<RequestRecord>,
    /// This second's latencies and counts, and its live verdicts.
    second: SummaryAccumulator,
    live: ConfusionMatrix,
    /// The live verdicts of the whole run, and split by the tick band.
    run_live: ConfusionMatrix,
    run_band: TickBandCount,
    total: u64,
    started: Instant,
    last_tick: Instant,
    last_drops: u64,
    /// What online learning did since the last tick.
    notes: Vec<LearningNote>,
    calibration: Option<LiveCalibration>,
    /// The model version calibration takes as serving; any other (a swap, a
    /// rollback) becomes its new base at the next tick.
    calibration_version: Option<u32>,
}

impl Agent {
    /// Checks, loads and attaches everything; returns once the agent observes.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        let targets = crate::devices::resolve(&config.devices)?;
        // Position features need the raw tracepoint observers, which `auto` takes
        // where the kernel has BTF: a guess here, before the probes (slow, and a
        // tuned device must be refused before them); the slots refuse a position
        // model at install if the observers turn out otherwise
        // (ModelSlots::kernel_positions).
        let positions = match config.attach {
            AttachRequest::Tracepoint => false,
            _ => std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        };
        let start_model = match config.model.as_str() {
            "none" => None,
            spec => {
                let disks: Vec<_> = targets.iter().map(models::DiskRegime::of).collect();
                let acting = config.act.is_some_and(|p| p.uses_model());
                Some(models::resolve(spec, &disks, positions, acting)?)
            }
        };
        let learn_kind = learn_kind(
            config.learn_kind.as_deref(),
            start_model.as_ref().map(|s| &s.model),
        )?;
        if config.pin {
            pins::check_pin_dir(&config.pin_dir)?;
        }
        // Bound before anything is loaded: a busy address fails with nothing attached.
        let metrics = match config.metrics {
            Some(addr) => Some(serve_metrics(addr).await?),
            None => None,
        };
        // Before anything is loaded: a device another agent tunes is refused with
        // nothing attached, and the originals are saved first.
        let tuners = start_tuners(&targets, config.tune_every)?;
        let (plan, report) = attach_plan(&config)?;
        let (mut observer, mut slots) = start_observer(&config, &plan, &report, &targets)?;
        drop(report);
        let mut learn_config = LearnConfig::new(learn_kind, config.retrain_every, config.window);
        learn_config.min_records = config.min_train_records;
        learn_config.recipe = online_recipe(
            config.act,
            config.retrain_every,
            config.hold_out_shift,
            start_model.as_ref().map(|s| &s.model),
        );
        let mut learner = OnlineLearner::new(learn_config, Instant::now());
        let started_from = match &start_model {
            Some(s) => install_start_model(&mut observer, &mut slots, &mut learner, s)?,
            None => false,
        };
        // The base is the model serving now (started from, or adopted).
        let calibration = match (config.calibrate, config.act) {
            (Some(_), Some(policy)) => {
                tracing::info!(
                    "threshold calibration off: verdicts act (--act {policy}), so the outcomes it would learn from are the ones the verdicts changed"
                );
                None
            }
            (Some(policy), None) => {
                let mut c = LiveCalibration::new(policy);
                c.serving(
                    slots
                        .active()
                        .and_then(|a| slots.version(a.version).cloned()),
                );
                if let Some(s) = start_model.filter(|_| started_from) {
                    start_race(&mut c, s);
                }
                Some(c)
            }
            (None, _) => None,
        };
        let hook = if plan.hook {
            Some(attach_hook(
                &mut observer,
                &config,
                &targets,
                learner.config.recipe.acting,
            )?)
        } else {
            None
        };
        // Before the ready line: a signal right after it must find the handlers.
        let signal: Signal = Box::pin(crate::runtime::shutdown_signal());
        // Loading parsed aya's copy of the kernel's BTF and the object: about 20 MB
        // of heap, freed by now but kept by the allocator. Given back before
        // the ring buffer is mapped (16 MB resident: its pages are mapped twice), so
        // the two never add up in the peak.
        crate::runtime::release_free_memory();
        let stream = observer.records()?;
        let names: Vec<String> = observer
            .devices()
            .iter()
            .map(|d| d.device.name.clone())
            .collect();
        tracing::info!(
            "observing {} ({}, {:?} mode); Ctrl-C stops",
            names.join(", "),
            observer.mode(),
            config.mode
        );
        if let Some(m) = &metrics {
            m.publish(&observer, slots.active(), 0, learner.events())?;
        }
        let calibration_version = slots.active().map(|a| a.version);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let now = Instant::now();
        Ok(Agent {
            stop_after: Box::pin(tokio::time::sleep(
                config.duration.unwrap_or(Duration::MAX / 4),
            )),
            watch: DeviceWatch::new(&config.devices),
            #[cfg(feature = "testing")]
            test_swaps: crate::testing::from_env()?,
            config,
            observer,
            stream,
            slots,
            learner,
            training: None,
            training_against: None,
            tuners,
            metrics,
            hook,
            signal,
            tick,
            batch: Vec::new(),
            second: SummaryAccumulator::default(),
            live: ConfusionMatrix::default(),
            run_live: ConfusionMatrix::default(),
            run_band: TickBandCount::default(),
            total: 0,
            started: now,
            last_tick: now,
            last_drops: 0,
            notes: Vec::new(),
            calibration,
            calibration_version,
        })
    }

    /// Waits for the next event and handles it.
    pub async fn step(&mut self) -> anyhow::Result<Step> {
        #[cfg(feature = "testing")]
        let test_swap = crate::testing::tick(&mut self.test_swaps);
        #[cfg(not(feature = "testing"))]
        let test_swap = std::future::pending::<()>();
        tokio::select! {
            () = &mut self.stop_after => Ok(Step::Stop),
            sig = &mut self.signal => {
                tracing::info!("{}, detaching", sig?);
                Ok(Step::Stop)
            }
            () = test_swap => {
                self.reinstall_active()?;
                Ok(Step::Records)
            }
            _ = self.tick.tick() => Ok(Step::Tick(Box::new(self.on_tick().await?))),
            n = self.stream.next_batch(&mut self.batch) => {
                n?;
                self.absorb_batch();
                Ok(Step::Records)
            }
        }
    }

    /// What the agent observes now.
    pub fn ready(&self) -> Ready {
        Ready {
            devices: self
                .observer
                .devices()
                .iter()
                .map(|d| d.device.name.clone())
                .collect(),
            attach: self.observer.mode().to_string(),
            hook_policy: self.hook.as_ref().map(|h| h.policy.to_string()),
            model: self.slots.active().map(ModelId::from),
        }
    }

    /// Detaches everything (the tunables go back first), then reports the hook's
    /// work and what was lost. In lossless mode a drop is an error.
    pub fn shutdown(mut self) -> anyhow::Result<Summary> {
        // The originals go back before the programs go away.
        self.tuners = Tuners::default();
        let hook_counters = match &self.hook {
            Some(_) => Some(hook::counters(self.observer.ebpf())?),
            None => None,
        };
        self.observer.detach();
        let mut hook_report = None;
        if let (Some(c), Some(h)) = (hook_counters, &self.hook) {
            tracing::info!("hook (policy {}): {}", h.policy, hook::counters_line(&c));
            let boosts = h.boosts_before.changes_since();
            for b in &boosts {
                tracing::info!("{}", b.line());
            }
            hook_report = Some(HookReport {
                policy: h.policy.to_string(),
                counters: hook::counters_json(&c),
                boosts,
            });
        }
        self.stream.drain(&mut self.batch);
        self.total += self.batch.len() as u64;
        self.batch = Vec::new();
        let loss = self.observer.losses()?;
        tracing::info!(
            "{} records in {:.1}s; {}",
            self.total,
            self.started.elapsed().as_secs_f64(),
            loss.line()
        );
        for line in loss.counter_lines() {
            tracing::info!("{line}");
        }
        let learning = (self.learner.config.every > Duration::ZERO).then(|| {
            let e = self.learner.events();
            LearningReport {
                swaps: e.swaps,
                rollbacks: e.rollbacks,
                drifts: e.drifts,
                retrain_failures: e.retrain_failures,
            }
        });
        if let Some(l) = &learning {
            tracing::info!(
                "online learning: {} swaps, {} rollbacks, {} drifts, {} failed trainings",
                l.swaps,
                l.rollbacks,
                l.drifts,
                l.retrain_failures
            );
        }
        if let Some(c) = &self.calibration {
            tracing::info!(
                "threshold calibration: {} recalibrated models installed; the serving model's threshold shift {}",
                c.installs(),
                c.applied()
            );
        }
        let verdicts = VerdictReport::new(self.run_live, &self.run_band);
        if let Some(v) = &verdicts {
            let c = v.confusion;
            let score = v.balanced_accuracy.map_or_else(
                || "one class only".to_string(),
                |b| format!("balanced accuracy {b:.3}"),
            );
            tracing::info!(
                "verdicts over the run: {score} (tp {} fp {} tn {} fn {}){}",
                c.true_miss,
                c.false_miss,
                c.true_met,
                c.false_met,
                v.tick_band.map(|b| format!("; {b}")).unwrap_or_default()
            );
        }
        if self.config.mode == LossMode::Lossless && loss.ring_full_drops > 0 {
            anyhow::bail!(
                "lossless mode: {} records were dropped",
                loss.ring_full_drops
            );
        }
        Ok(Summary {
            records: self.total,
            seconds: self.started.elapsed().as_secs_f64(),
            losses: loss,
            hook: hook_report,
            calibration: self.calibration.as_ref().map(|c| CalibrationReport {
                installs: c.installs(),
                shift: c.applied(),
            }),
            learning,
            verdicts,
        })
    }

    /// Hands the records just drained to everything that reads them, then lets
    /// them go.
    fn absorb_batch(&mut self) {
        let records = &self.batch;
        self.total += records.len() as u64;
        self.second.add(records);
        // The second's verdicts and the run's, in one pass.
        let mut live = ConfusionMatrix::default();
        for (at_risk, r) in self.learner.config.recipe.live_verdicts(records) {
            live.add(at_risk, r.deadline_missed());
            self.run_band.add(at_risk, r);
        }
        self.live.merge(&live);
        self.run_live.merge(&live);
        self.learner.observe(records);
        if let Some(c) = &mut self.calibration {
            // Under ring pressure (`--mode drop`) the kernel keeps mostly the
            // records near the boundary: a window of those would move the
            // threshold wrong and misjudge the race. Its audit sample is not
            // biased: judged on it and on what came with no pressure, neither
            // has to wait for the pressure to end (it may not).
            for r in records {
                if r.verdict != Verdict::NONE && r.went_through_scheduler() && r.unbiased_sample() {
                    c.offer(|| features_of_record(r), r.deadline_missed());
                }
            }
        }
        self.tuners.observe(records);
        self.batch.clear();
        // A burst (up to a full ring) leaves a large buffer: keep a modest one.
        self.batch.shrink_to(BATCH_KEEP);
    }

    /// The second's work: disks that came or went, the live line's numbers, online
    /// learning, metrics, tuning.
    async fn on_tick(&mut self) -> anyhow::Result<Tick> {
        self.watch.check(&mut self.observer);
        let now = Instant::now();
        let secs = now.duration_since(self.last_tick).as_secs_f64();
        self.last_tick = now;
        let live = std::mem::take(&mut self.live);
        let counters = self.observer.counters()?;
        let drops = counters.get(Counter::RingFullDrops);
        let mut tick = Tick {
            elapsed: self.started.elapsed(),
            secs,
            summary: self.second.finish(),
            drops,
            orphans: counters.get(Counter::OrphanCompletions),
            model: self.slots.active(),
            live,
            learning: Vec::new(),
            tuning: Vec::new(),
        };
        if self.config.mode == LossMode::Lossless && drops > self.last_drops {
            tracing::error!(
                "lossless mode: {} records dropped (ring full); raise --ring-size",
                drops - self.last_drops
            );
        }
        self.last_drops = drops;
        let (slots, observer, notes) = (&mut self.slots, &mut self.observer, &mut self.notes);
        let decisions = self.learner.tick(now, &live, |rollback| {
            roll_back(slots, observer, notes, rollback)
        });
        if let Some(reason) = decisions.drift {
            let message = format!("drift: {reason}; retraining now");
            note(&mut self.notes, "drift", message);
        }
        if let Some(m) = &self.metrics {
            m.publish(
                &self.observer,
                self.slots.active(),
                self.total,
                self.model_events(),
            )?;
        }
        tick.tuning = self.tuners.tick();
        if let Some(job) = decisions.train {
            self.start_training(job);
        }
        self.collect_training().await;
        self.calibrate(now);
        tick.learning = std::mem::take(&mut self.notes);
        Ok(tick)
    }

    /// Installs the serving model with a better threshold when the newest outcomes
    /// call for one (not while a swap is on probation: its judgement compares the
    /// swapped-in model as it came).
    fn calibrate(&mut self, now: Instant) {
        let Some(c) = &mut self.calibration else {
            return;
        };
        c.second_passed();
        let serving = self.slots.active().map(|a| a.version);
        if serving != self.calibration_version {
            c.serving(serving.and_then(|v| self.slots.version(v).cloned()));
            self.calibration_version = serving;
        }
        if self.learner.on_probation() {
            return;
        }
        if let Some(race) = c.race_result() {
            self.race_ended(race, now);
            return;
        }
        let Some(r) = c.decide(now) else {
            return;
        };
        let prev = serving_label(self.slots.active());
        match self.slots.install(self.observer.ebpf_mut(), &r.model) {
            Ok(active) => {
                let message = format!(
                    "calibrate {} -> v{} {}: threshold shift {} -> {}; balanced accuracy on the newest {} labelled requests {:.3} -> {:.3}",
                    prev,
                    active.version,
                    active.kind.name(),
                    c.applied(),
                    r.shift,
                    r.window,
                    r.before,
                    r.after
                );
                c.installed(&r, now);
                self.calibration_version = Some(active.version);
                note(&mut self.notes, "calibrate", message);
            }
            Err(e) => {
                c.refused(now);
                let message = format!(
                    "the recalibrated model (threshold shift {}) was not installed: {e:#}; the serving model keeps its threshold",
                    r.shift
                );
                note(&mut self.notes, "calibrate-refused", message);
            }
        }
    }

    /// `--model auto`'s race ended: the winner serves, if it was not the base.
    fn race_ended(&mut self, race: RaceResult, now: Instant) {
        let standings = race
            .standings
            .iter()
            .map(|(name, ba, _)| format!("{name} {ba:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        let Some(switch) = race.switch else {
            let standings = if standings.is_empty() {
                format!(
                    "one class only after {} s, no race",
                    kml_learn::calibrate::RACE_LIMIT_SECONDS
                )
            } else {
                standings
            };
            let message = format!(
                "race: the starting model stays; balanced accuracy at each model's best threshold on the newest {} labelled requests: {standings}",
                race.window
            );
            note(&mut self.notes, "race", message);
            return;
        };
        let prev = serving_label(self.slots.active());
        match self.slots.install(self.observer.ebpf_mut(), &switch.model) {
            Ok(active) => {
                let message = format!(
                    "race: {} -> v{} {} ({}, threshold shift {}); balanced accuracy at each model's best threshold on the newest {} labelled requests: {standings}",
                    prev,
                    active.version,
                    switch.name,
                    active.kind.name(),
                    switch.shift,
                    race.window
                );
                self.calibration_version = Some(active.version);
                self.learner.replaced(switch.held_back);
                if self.config.learn_kind.is_none() {
                    // Retrain the kind that serves (as when started from it).
                    self.learner.config.kind = active.kind;
                }
                if let Some(c) = &mut self.calibration {
                    c.switched(switch, now);
                }
                note(&mut self.notes, "race", message);
            }
            Err(e) => {
                let message = format!(
                    "race: {} did best ({standings}) but was not installed: {e:#}; the starting model keeps serving",
                    switch.name
                );
                note(&mut self.notes, "race-refused", message);
            }
        }
    }

    /// What online learning and calibration did so far.
    fn model_events(&self) -> ModelEvents {
        let mut events = self.learner.events();
        if let Some(c) = &self.calibration {
            events.calibrations = c.installs();
            events.threshold_shift = c.applied();
        }
        events
    }

    /// Trains off the loop, against the model serving now.
    fn start_training(&mut self, job: TrainJob) {
        let active = self.active_model();
        self.training_against = self.slots.active().map(|a| a.version);
        let positions = self.slots.kernel_positions;
        self.training = Some(tokio::task::spawn_blocking(move || {
            train_candidate(job.kind, job.records, active, positions, &job.recipe)
        }));
    }

    /// A finished training: swap the candidate in when it is better.
    async fn collect_training(&mut self) {
        if !self.training.as_ref().is_some_and(|t| t.is_finished()) {
            return;
        }
        let done = self.training.take().expect("checked").await;
        // The training's dataset and matrices are freed: give the memory back.
        crate::runtime::release_free_memory();
        let mut result = done.map_err(anyhow::Error::from).and_then(|r| r);
        // Calibration may have installed a new threshold while the candidate
        // trained: judge it against the model serving now, not the one it began with.
        if let Ok(c) = &mut result {
            let serving = self.slots.active().map(|a| a.version);
            if serving != self.training_against {
                if let Some(active) = self.active_model() {
                    c.judge_against(&active);
                }
            }
        }
        match self.learner.trained(result) {
            TrainingOutcome::Swap(swap) => self.swap(swap),
            TrainingOutcome::Keep(c) => {
                let message = format!(
                    "kept the active model: candidate {:.3} vs active {} on {} held-back records",
                    c.candidate_ba,
                    c.active_ba
                        .map_or("none".to_string(), |a| format!("{a:.3}")),
                    c.held_back
                );
                note(&mut self.notes, "keep", message);
            }
            TrainingOutcome::Failed(e) => {
                note(&mut self.notes, "failed", format!("retraining failed: {e}"));
            }
        }
    }

    /// Installs a better candidate; refused by the kernel, the active model stays.
    fn swap(&mut self, swap: Swap) {
        let prev = serving_label(self.slots.active());
        let previous = self.active_model();
        let c = &swap.candidate;
        match self.slots.install(self.observer.ebpf_mut(), &c.model) {
            Ok(active) => {
                let message = format!(
                    "swap {} -> v{} {}: held-back balanced accuracy {} -> {:.3} on {} records (trained in {:.1}s)",
                    prev,
                    active.version,
                    active.kind.name(),
                    c.active_ba.map_or("none".to_string(), |a| format!("{a:.3}")),
                    c.candidate_ba,
                    c.held_back,
                    c.took.as_secs_f64()
                );
                note(&mut self.notes, "swap", message);
                self.learner.swapped(Instant::now(), &swap, previous, true);
            }
            Err(e) => {
                let message = format!(
                    "the candidate (held-back balanced accuracy {:.3}) was not installed: {e:#}; the active model keeps serving",
                    c.candidate_ba
                );
                note(&mut self.notes, "refused", message);
                self.learner.swapped(Instant::now(), &swap, previous, false);
            }
        }
    }

    /// The model serving now, as the agent wrote it.
    fn active_model(&self) -> Option<kml_learn::QuantizedModel> {
        self.slots
            .active()
            .and_then(|a| self.slots.version(a.version).cloned())
    }

    /// Test hook (`KML_TEST_SWAP_EVERY`): writes the active model again.
    fn reinstall_active(&mut self) -> anyhow::Result<()> {
        if let Some(m) = self.active_model() {
            self.slots.install(self.observer.ebpf_mut(), &m)?;
        }
        Ok(())
    }
}

/// The serving model as the log names it: `v3`, or `none`.
fn serving_label(active: Option<crate::slots::ActiveModel>) -> String {
    active.map_or("none".into(), |a| format!("v{}", a.version))
}

/// Puts the previous model back; refused by the kernel, the new one stays.
fn roll_back(
    slots: &mut ModelSlots,
    observer: &mut Observer,
    notes: &mut Vec<LearningNote>,
    rollback: &Rollback,
) -> bool {
    match slots.install(observer.ebpf_mut(), &rollback.model) {
        Ok(back) => {
            let message = format!(
                "rollback to the previous model (now v{}): {}",
                back.version, rollback.reason
            );
            note(notes, "rollback", message);
            true
        }
        Err(e) => {
            let message = format!(
                "rollback ({}) failed: {e:#}; the swapped-in model keeps serving",
                rollback.reason
            );
            note(notes, "rollback-refused", message);
            false
        }
    }
}

/// How online learning trains. In shadow mode: every feature, the balanced
/// threshold (best for later I/O of the same workload). While a model policy
/// acts: as the starting model was made if it was made to act, else the queue
/// features and a threshold for the misses (`Recipe::for_acting`); outcomes
/// the verdicts changed left out, held-out ones weighed.
fn online_recipe(
    act: Option<Policy>,
    retrain_every: Duration,
    hold_out_shift: u32,
    start: Option<&LoadedModel>,
) -> Recipe {
    let Some(policy) = act.filter(|p| p.uses_model()) else {
        return Recipe::default();
    };
    if retrain_every == Duration::ZERO {
        return Recipe::default();
    }
    let mut recipe = match start {
        Some(m) if models::made_to_act(m) => Recipe::of(m),
        _ => Recipe::for_acting(),
    };
    recipe.acting = Some(Acting {
        policy,
        hold_out_shift,
    });
    recipe
}

/// The kind trained online: asked for, else the starting model's, else logistic.
fn learn_kind(asked: Option<&str>, start_model: Option<&LoadedModel>) -> anyhow::Result<ModelKind> {
    Ok(match (asked, start_model) {
        (Some(k), _) => {
            ModelKind::from_name(k).ok_or_else(|| anyhow::anyhow!("unknown --learn-kind `{k}`"))?
        }
        (None, Some(m)) => m.kind(),
        (None, None) => ModelKind::Logistic,
    })
}

async fn serve_metrics(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let m = Metrics::default();
    let bound = m.serve(addr).await?;
    tracing::info!("metrics at http://{bound}/metrics");
    Ok(m)
}

fn start_tuners(targets: &[BlockDevice], every: Option<Duration>) -> anyhow::Result<Tuners> {
    let Some(every) = every else {
        return Ok(Tuners::default());
    };
    let t = Tuners::start(targets, every, TuneConfig::default())?;
    tracing::info!(
        "tuning mq-deadline every {:?}; originals saved in {}",
        every,
        crate::act::tune::state::state_dir().display()
    );
    Ok(t)
}

/// What to attach here; `--act` on a kernel without the hook is refused. The
/// report carries the layouts read from BTF (its one parse) to the loaders.
fn attach_plan(config: &AgentConfig) -> anyhow::Result<(AttachPlan, KernelReport)> {
    let report = KernelReport::probe();
    let plan = report.plan(config.attach)?;
    if let (Some(policy), false) = (config.act, plan.hook) {
        let why = match &report.hook_ready {
            Err(why) => why.clone(),
            Ok(()) => format!(
                "the observers run in {} mode; the hook needs raw tracepoints (--attach hook)",
                plan.observers
            ),
        };
        anyhow::bail!("--act {policy}: the verdicts cannot act here: {why}");
    }
    Ok((plan, report))
}

/// Loads and attaches the observers (pinned and adopting, with `--pin`) and takes
/// over the model slots an adopted object serves from.
fn start_observer(
    config: &AgentConfig,
    plan: &AttachPlan,
    report: &KernelReport,
    targets: &[BlockDevice],
) -> anyhow::Result<(Observer, ModelSlots)> {
    let mut oc = ObserverConfig::new(plan.observers);
    oc.ring_bytes = config.ring_bytes;
    // Nothing `run` does reads a request's I/O priority (no feature, no trace):
    // the kernel does not read it (a probe read per insert saved).
    oc.read_ioprio = false;
    oc.raw_layout = report.raw_layout.clone().ok();
    if config.mode == LossMode::Drop {
        oc.sample_fill_bytes = Some(oc.ring_bytes / 2);
    }
    if plan.hook {
        let raw = report
            .raw_layout
            .clone()
            .map_err(|e| anyhow::anyhow!("struct request from BTF: {e}"))?;
        let sched = report
            .sched_layout
            .clone()
            .map_err(|e| anyhow::anyhow!("mq-deadline's layout from BTF: {e}"))?;
        // One disk: only its requests get verdicts; else every traced disk's do
        // (an untraced disk's requests have no model verdict).
        let only = match targets {
            [one] => Some(one),
            _ => None,
        };
        oc.hook = Some(HookGlobals::new(raw, sched, only));
    }
    let mut slots = ModelSlots::new();
    // Records name the version that scored them; a few seconds of versions cover
    // every record still in flight or in the ring.
    slots.history_limit = SLOT_HISTORY;
    let dir = &config.pin_dir;
    let observer = match config.pin {
        true => {
            let (mut observer, outcome) = Observer::start_pinned(oc, targets, dir)?;
            tracing::info!("maps pinned at {}: {outcome}", dir.display());
            if let Some(a) = slots.adopt(observer.ebpf_mut())? {
                tracing::info!(
                    "model v{} {} keeps serving (adopted)",
                    a.version,
                    a.kind.name()
                );
            }
            observer
        }
        false => {
            if let Some(note) = pins::orphan_note(dir) {
                tracing::info!("{note}");
            }
            Observer::start(oc, targets)?
        }
    };
    slots.kernel_positions = observer.mode() == crate::kernel::attach::AttachMode::RawTracepoint;
    Ok((observer, slots))
}

/// Installs the starting model, unless an adopted one serves already; whether it did.
fn install_start_model(
    observer: &mut Observer,
    slots: &mut ModelSlots,
    learner: &mut OnlineLearner,
    start: &StartModel,
) -> anyhow::Result<bool> {
    let (path, m) = (&start.path, &start.model);
    if let Some(a) = slots.active() {
        tracing::info!(
            "not installing {}: the adopted model v{} serves (stop the agent cleanly to start from another model)",
            path.display(),
            a.version
        );
        return Ok(false);
    }
    let active = slots.install(observer.ebpf_mut(), &m.quantized)?;
    if let Some(ba) = models::held_back_balanced_accuracy(m) {
        learner.accepted(ba);
    }
    tracing::info!(
        "model {} ({}) active as v{}",
        path.display(),
        m.kind().name(),
        active.version
    );
    Ok(true)
}

/// `--model auto`'s other models race the starting one on the first labelled
/// requests. Models that read the position features race only when the starting
/// one reads them too: the kernel records positions only for a model that does.
fn start_race(c: &mut LiveCalibration, start: StartModel) {
    use kml_learn::quantize::reads_positions;
    let positions = reads_positions(&start.model.quantized);
    let contenders: Vec<Contender> = start
        .others
        .into_iter()
        .filter(|(_, m)| positions || !reads_positions(&m.quantized))
        .map(|(path, m)| Contender {
            name: models::name_of(&path),
            held_back: models::held_back_balanced_accuracy(&m),
            model: m.quantized,
        })
        .collect();
    if contenders.is_empty() {
        return;
    }
    let names: Vec<&str> = contenders.iter().map(|c| c.name.as_str()).collect();
    tracing::info!(
        "race: {} against {} at each one's best threshold on the newest labelled requests after {} s",
        models::name_of(&start.path),
        names.join(", "),
        kml_learn::calibrate::RACE_SECONDS
    );
    c.race(models::name_of(&start.path), contenders);
}

/// Attaches the verdict program with `--act`'s policy (off: it only counts).
fn attach_hook(
    observer: &mut Observer,
    config: &AgentConfig,
    targets: &[BlockDevice],
    learning: Option<Acting>,
) -> anyhow::Result<HookSession> {
    if !observer.hook_loaded() {
        anyhow::bail!("the observer was loaded without the hook's globals");
    }
    let boosts_before = BoostSnapshot::take(targets);
    let policy = config.act.unwrap_or(Policy::Off);
    hook::attach(observer.ebpf_mut(), policy)?;
    tracing::info!(
        "hook attached to dd_kml_verdict (kprobe + bpf_override_return, policy {policy}{})",
        if config.act.is_some() {
            ""
        } else {
            ": counting only, add --act to let verdicts act"
        }
    );
    match learning {
        Some(a) => {
            hook::set_hold_out(observer.ebpf_mut(), a.hold_out_shift)?;
            tracing::info!(
                "online learning while verdicts act: the hook leaves 1 in {} of the requests it would serve early \
                 alone, and candidates learn from those and the unflagged ones (a boosted request's outcome is the \
                 boost's); --retrain-every 0 keeps the starting model and acts on every flagged request",
                1u32 << a.hold_out_shift
            );
        }
        None if policy.uses_model() => tracing::info!(
            "online learning off: verdicts act (--act {policy}) and change the outcomes it would learn from; \
             --retrain-every 10s turns it on, with 1 in {} flagged requests left alone to learn from (--hold-out)",
            1u32 << config.hold_out_shift
        ),
        None => {}
    }
    Ok(HookSession {
        policy,
        boosts_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::candidate::ACTING_MISS_RECALL;
    use kml_learn::metrics::ThresholdGoal;

    fn shipped(name: &str) -> LoadedModel {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(format!("{name}.json"));
        LoadedModel::load(&path).unwrap()
    }

    #[test]
    fn online_learning_trains_for_acting_only_while_a_model_policy_acts() {
        let every = Duration::from_secs(10);
        let counting = shipped("logistic");
        let made_to_act = shipped("vm-act");
        // Shadow mode and fixed policies: every feature, the balanced threshold.
        for act in [None, Some(Policy::Reads), Some(Policy::ReadsUnderWrites)] {
            assert_eq!(
                online_recipe(act, every, 4, Some(&made_to_act)),
                Recipe::default()
            );
        }
        // Acting, not learning: nothing to train.
        assert_eq!(
            online_recipe(Some(Policy::ModelReads), Duration::ZERO, 4, None),
            Recipe::default()
        );
        let acting = Some(Acting {
            policy: Policy::ModelReads,
            hold_out_shift: 4,
        });
        // A model made to act is retrained as it was made.
        let r = online_recipe(Some(Policy::ModelReads), every, 4, Some(&made_to_act));
        assert_eq!(r.features.as_deref(), Some(made_to_act.float.features()));
        assert_eq!(r.goal, made_to_act.file.training.threshold_goal);
        assert_eq!(r.acting, acting);
        // Any other start (or none): the queue features, a threshold for the misses.
        for start in [Some(&counting), None] {
            let r = online_recipe(Some(Policy::ModelReads), every, 4, start);
            assert_eq!(r.features, Some(kml_learn::trainers::queue_features()));
            assert_eq!(r.goal, ThresholdGoal::MissRecall(ACTING_MISS_RECALL));
            assert_eq!(r.acting, acting);
        }
        // vm-act was trained on exactly the queue features.
        assert_eq!(
            made_to_act.float.features(),
            &kml_learn::trainers::queue_features()[..]
        );
    }
}
