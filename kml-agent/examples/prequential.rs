//! Prequential (test-then-train) evaluation of a shipped model on recorded traces, as
//! the agent would serve it live (a measurement, not a test; docs/learning.md table D
//! and the goals come from it).
//!
//! ```sh
//! cargo run --release -p kml-agent --example prequential -- \
//!     --model models/tree.json,models/logistic.json --trace a.csv,b.csv [--json out.json]
//! ```
//!
//! Each trace is replayed in time, one-second ticks from its first insert (the agent's
//! tick). A request gets the verdict of the model serving at its insert, with the
//! threshold serving then; its outcome becomes known at its completion (the agent reads
//! records at completion) and only from the next tick on can it change anything. Arms:
//!
//! - `fixed`: the model as shipped;
//! - `calibrated`: the same model, its threshold moved by the agent's own live
//!   calibration ([`LiveCalibration`], `run`'s default policy: the newest labelled
//!   requests, sampled as the agent samples them; at most one install every 2 s,
//!   for a gain of 0.005; none while a swap is on probation);
//! - `retrain`: the agent's online learning, its own code: [`OnlineLearner`] (every
//!   10 s, or at once on drift; window 200,000; swap when better on the newest fifth;
//!   probation) with [`train_candidate`], trained synchronously here, the swap taking
//!   effect at the first tick after the training's measured wall time;
//! - `retrain+calibrated`: both (the calibration starts over after a swap);
//! - `raced`, `raced+retrain`: as `calibrated` and `retrain+calibrated`, the
//!   starting model racing the other `--model`s as `run --model auto` races the
//!   shipped ones ([`LiveCalibration::race`]: each at its own best threshold on
//!   the same newest 20,000 sampled labelled requests after 5 s; the winner
//!   serves if it beats the starting model's best).
//!
//! Scores per arm over every request of the trace (what a user meets from the first
//! second): balanced accuracy of the verdicts served, and AUC of the served margin
//! (the score against the threshold serving at the time; calibration moves the
//! threshold only, so its AUC differs from `fixed` only by that). Beside them, the
//! starting model's ceiling: its balanced accuracy at the best single threshold in
//! hindsight over the whole trace (what no threshold rule can beat).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use kml_agent::learn::{
    candidate::{train_candidate, Recipe},
    models::held_back_balanced_accuracy,
    online::{LearnConfig, OnlineLearner, TrainingOutcome},
};
use kml_ebpf_common::{RequestRecord, Verdict};
use kml_learn::{
    calibrate::{
        with_threshold_shift, CalibrationConfig, CalibrationPolicy, Contender, LiveCalibration,
    },
    metrics::{auc, best_balanced_accuracy},
    ConfusionMatrix, Dataset, LoadedModel, QuantizedModel,
};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// Model files to start from.
    #[arg(long, value_delimiter = ',', required = true)]
    model: Vec<PathBuf>,
    /// Traces (CSV of `kml-agent record`).
    #[arg(long, value_delimiter = ',', required = true)]
    trace: Vec<PathBuf>,
    /// Models that only race (the `raced` arms), never start.
    #[arg(long, value_delimiter = ',')]
    contender: Vec<PathBuf>,
    /// Arms to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fixed,calibrated,retrain,retrain+calibrated,raced,raced+retrain"
    )]
    arms: Vec<String>,
    /// Calibration: newest labelled requests the threshold is chosen on.
    #[arg(long, default_value_t = CalibrationConfig::default().window)]
    window: usize,
    /// Calibration: fewest of each class before the threshold moves.
    #[arg(long, default_value_t = CalibrationConfig::default().min_per_class)]
    min_per_class: usize,
    /// Online learning: retrain period, seconds (the agent's default 10).
    #[arg(long, default_value_t = 10)]
    retrain_every: u64,
    /// Online learning: records in the sliding window (the agent's default).
    #[arg(long, default_value_t = 200_000)]
    retrain_window: usize,
    /// Also score the requests inserted from this many seconds on (a later window).
    #[arg(long, default_value_t = 6.0)]
    late_from: f64,
    /// Write every result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy)]
struct Arm {
    calibrate: bool,
    retrain: bool,
    race: bool,
}

impl Arm {
    fn parse(name: &str) -> Option<Arm> {
        Some(match name {
            "fixed" => Arm {
                calibrate: false,
                retrain: false,
                race: false,
            },
            "calibrated" => Arm {
                calibrate: true,
                retrain: false,
                race: false,
            },
            "retrain" => Arm {
                calibrate: false,
                retrain: true,
                race: false,
            },
            "retrain+calibrated" => Arm {
                calibrate: true,
                retrain: true,
                race: false,
            },
            "raced" => Arm {
                calibrate: true,
                retrain: false,
                race: true,
            },
            "raced+retrain" => Arm {
                calibrate: true,
                retrain: true,
                race: true,
            },
            _ => return None,
        })
    }
}

#[derive(Serialize)]
struct Score {
    balanced_accuracy: Option<f64>,
    auc: Option<f64>,
    confusion: ConfusionMatrix,
}

impl Score {
    fn of(verdicts: &[bool], labels: &[bool], margins: &[f64]) -> Score {
        let confusion =
            ConfusionMatrix::from_pairs(verdicts.iter().copied().zip(labels.iter().copied()));
        let both = !confusion.one_class();
        Score {
            balanced_accuracy: both.then(|| confusion.balanced_accuracy()),
            auc: auc(margins, labels),
            confusion,
        }
    }

    fn cell(&self) -> String {
        match (self.balanced_accuracy, self.auc) {
            (Some(b), Some(a)) => format!("{:.1} / {a:.3}", 100.0 * b),
            _ => "one class".into(),
        }
    }
}

#[derive(Serialize)]
struct Outcome {
    model: String,
    trace: String,
    arm: String,
    requests: usize,
    miss_rate: f64,
    whole: Score,
    late: Score,
    swaps: u64,
    rollbacks: u64,
    drifts: u64,
    /// Seconds into the trace of each swap, and each training's wall time.
    swap_at_s: Vec<f64>,
    train_s: Vec<f64>,
    /// The threshold shift serving at the end (model units), if calibrated.
    final_shift: Option<i64>,
    /// Recalibrated models installed.
    threshold_changes: usize,
    /// The starting model at the best single threshold in hindsight, whole trace.
    ceiling: Option<f64>,
    /// The race's winner, when another model won.
    switched_to: Option<String>,
}

/// When the agent learns a request's outcome: at its completion (its issue if the
/// completion is unknown), never before its insert.
fn known_at(r: &RequestRecord) -> u64 {
    let t = if r.complete_ns != 0 {
        r.complete_ns
    } else {
        r.issue_ns
    };
    t.max(r.insert_ns)
}

fn simulate(
    args: &Args,
    data: &Dataset,
    start: (&str, &LoadedModel),
    others: &[(String, LoadedModel)],
    arm: Arm,
) -> (Outcome, Vec<bool>) {
    let (start_name, start) = start;
    let recs = data.records();
    let feats = data.features();
    let n = recs.len();
    let t0 = recs[0].insert_ns;
    let tick_ns = 1_000_000_000u64;
    let epoch = Instant::now();
    let sim = |ns: u64| epoch + Duration::from_nanos(ns - t0);

    let mut by_known: Vec<usize> = (0..n).collect();
    by_known.sort_by_key(|&i| known_at(&recs[i]));

    let every = if arm.retrain {
        Duration::from_secs(args.retrain_every)
    } else {
        Duration::ZERO
    };
    let mut learner = OnlineLearner::new(
        LearnConfig::new(start.kind(), every, args.retrain_window),
        epoch,
    );
    if let Some(ba) = held_back_balanced_accuracy(start) {
        learner.accepted(ba);
    }
    let mut calibration = LiveCalibration::new(CalibrationPolicy {
        window: CalibrationConfig {
            window: args.window,
            min_per_class: args.min_per_class,
        },
        ..CalibrationPolicy::default()
    });
    let mut serving: QuantizedModel = start.quantized.clone();
    calibration.serving(Some(serving.clone()));
    if arm.race {
        calibration.race(
            start_name.to_string(),
            others
                .iter()
                .map(|(name, m)| Contender {
                    name: name.clone(),
                    model: m.quantized.clone(),
                    held_back: held_back_balanced_accuracy(m),
                })
                .collect(),
        );
    }
    let mut switched_to = None;
    let mut shift: Option<i64> = None;
    // (ready at, the training's result, the threshold shift serving when it began)
    let mut pending: Option<(
        Instant,
        anyhow::Result<kml_agent::learn::candidate::Candidate>,
        Option<i64>,
    )> = None;

    let mut verdict = vec![false; n];
    let mut served_margin = vec![0f64; n];
    let (mut swaps, mut rollbacks) = (0u64, 0u64);
    let (mut swap_at_s, mut train_s) = (Vec::new(), Vec::new());
    let mut threshold_changes = 0usize;

    let (mut next_insert, mut next_known) = (0usize, 0usize);
    let mut k = 1u64;
    while next_insert < n || next_known < n {
        let tk = t0 + k * tick_ns;
        // Requests inserted during this second: the serving model and threshold judge them.
        while next_insert < n && recs[next_insert].insert_ns < tk {
            let i = next_insert;
            let m = serving.margin(&feats[i]);
            let s = shift.unwrap_or(0);
            verdict[i] = m > s;
            served_margin[i] = m.saturating_sub(s) as f64;
            next_insert += 1;
        }
        // Outcomes known by the tick: what the agent's ring delivered this second.
        let mut arrived = Vec::new();
        while next_known < n && known_at(&recs[by_known[next_known]]) < tk {
            let i = by_known[next_known];
            let mut r = recs[i];
            r.verdict = if verdict[i] {
                Verdict::AT_RISK
            } else {
                Verdict::MEETS
            };
            if arm.calibrate {
                calibration.offer(|| feats[i], r.deadline_missed());
            }
            arrived.push(r);
            next_known += 1;
        }
        let now = sim(tk);
        if arm.retrain {
            // The agent's on_tick (the second's records handed over as they arrived):
            // the learner's tick (rollback, drift, a retrain due), then a finished
            // training collected.
            let mut back: Option<QuantizedModel> = None;
            learner.observe(&arrived);
            // As the agent counts it in shadow mode (no verdict acted).
            let live = Recipe::default().live_matrix(&arrived);
            let decisions = learner.tick(now, &live, |rb| {
                back = Some(rb.model.clone());
                true
            });
            if let Some(m) = back {
                serving = m;
                rollbacks += 1;
                calibration.serving(Some(serving.clone()));
                shift = None;
            }
            if let Some(job) = decisions.train {
                let wall = Instant::now();
                // Judged against the model serving, threshold shift included.
                let active = with_threshold_shift(&serving, shift.unwrap_or(0));
                let result =
                    train_candidate(job.kind, job.records, Some(active), true, &job.recipe);
                let took = wall.elapsed();
                train_s.push(took.as_secs_f64());
                pending = Some((now + took, result, shift));
            }
            if pending.as_ref().is_some_and(|(ready, _, _)| *ready <= now) {
                let (_, mut result, began_with) = pending.take().expect("checked");
                // As the agent: calibration moved the threshold meanwhile, judge again.
                if let (Ok(c), true) = (&mut result, began_with != shift) {
                    c.judge_against(&with_threshold_shift(&serving, shift.unwrap_or(0)));
                }
                if let TrainingOutcome::Swap(s) = learner.trained(result) {
                    let previous = std::mem::replace(&mut serving, s.candidate.model.clone());
                    learner.swapped(now, &s, Some(previous), true);
                    swaps += 1;
                    swap_at_s.push((tk - t0) as f64 / 1e9);
                    calibration.serving(Some(serving.clone()));
                    shift = None;
                }
            }
        }
        if arm.calibrate {
            calibration.second_passed();
            if !learner.on_probation() {
                if let Some(race) = calibration.race_result() {
                    if let Some(sw) = race.switch {
                        serving = sw.base().clone();
                        shift = Some(sw.shift);
                        learner.replaced(sw.held_back);
                        if let Some((_, m)) = others.iter().find(|(n, _)| *n == sw.name) {
                            learner.config.kind = m.kind();
                        }
                        switched_to = Some(sw.name.clone());
                        calibration.switched(sw, now);
                    }
                } else if let Some(rc) = calibration.decide(now) {
                    calibration.installed(&rc, now);
                    threshold_changes += 1;
                    shift = Some(rc.shift);
                }
            }
        }
        k += 1;
    }

    let labels: Vec<bool> = data.missed().collect();
    let late_ns = t0 + (args.late_from * 1e9) as u64;
    let late: Vec<usize> = (0..n).filter(|&i| recs[i].insert_ns >= late_ns).collect();
    let pick = |v: &[bool]| late.iter().map(|&i| v[i]).collect::<Vec<_>>();
    let late_margins: Vec<f64> = late.iter().map(|&i| served_margin[i]).collect();
    let outcome = Outcome {
        model: String::new(),
        trace: String::new(),
        arm: String::new(),
        requests: n,
        miss_rate: labels.iter().filter(|&&l| l).count() as f64 / n.max(1) as f64,
        whole: Score::of(&verdict, &labels, &served_margin),
        late: Score::of(&pick(&verdict), &pick(&labels), &late_margins),
        swaps,
        rollbacks,
        drifts: learner.events().drifts,
        swap_at_s,
        train_s,
        final_shift: shift,
        threshold_changes,
        ceiling: None,
        switched_to,
    };
    (outcome, verdict)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let arms: Vec<(String, Arm)> = args
        .arms
        .iter()
        .map(|a| {
            Arm::parse(a)
                .map(|arm| (a.clone(), arm))
                .ok_or_else(|| anyhow::anyhow!("unknown arm `{a}`"))
        })
        .collect::<anyhow::Result<_>>()?;
    let load = |paths: &[PathBuf]| -> Result<Vec<(String, LoadedModel)>, _> {
        paths
            .iter()
            .map(|p| {
                let name = p
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                LoadedModel::load(p).map(|m| (name, m))
            })
            .collect()
    };
    let models = load(&args.model)?;
    let contenders = load(&args.contender)?;
    let mut all = Vec::new();
    println!(
        "| model | trace | requests | missed | {} | ceiling | swaps (at s) |",
        arms.iter()
            .map(|(a, _)| format!("{a}: BA / AUC (from {:.0} s)", args.late_from))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|{}", " --- |".repeat(6 + arms.len()));
    for path in &args.trace {
        let data = Dataset::from_trace_file(path)?;
        let trace = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let labels: Vec<bool> = data.missed().collect();
        for (name, model) in &models {
            // The same hindsight figure as `eval`'s `threshold:` line.
            let margins: Vec<f64> = data
                .features()
                .iter()
                .map(|x| model.quantized.margin(x) as f64)
                .collect();
            let ceiling = best_balanced_accuracy(&margins, &labels);
            let mut cells = Vec::new();
            let mut swaps = String::new();
            let (mut requests, mut miss_rate) = (0, 0.0);
            for (arm_name, arm) in &arms {
                let others: Vec<(String, LoadedModel)> = models
                    .iter()
                    .filter(|(n, _)| n != name)
                    .chain(&contenders)
                    .cloned()
                    .collect();
                let (mut o, _) = simulate(&args, &data, (name, model), &others, *arm);
                o.model = name.clone();
                o.trace = trace.clone();
                o.arm = arm_name.clone();
                o.ceiling = ceiling;
                (requests, miss_rate) = (o.requests, o.miss_rate);
                cells.push(format!(
                    "{} ({}){}",
                    o.whole.cell(),
                    o.late.cell(),
                    o.switched_to
                        .as_ref()
                        .map_or(String::new(), |w| format!(" → {w}"))
                ));
                if arm.retrain {
                    swaps.push_str(&format!(
                        "{arm_name}: {} ({}) drifts {} rollbacks {}; ",
                        o.swaps,
                        o.swap_at_s
                            .iter()
                            .map(|s| format!("{s:.0}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        o.drifts,
                        o.rollbacks
                    ));
                }
                eprintln!(
                    "{trace} {name} {arm_name}: {} (late {}), shift {:?} ({} changes), trainings {:?} s",
                    o.whole.cell(),
                    o.late.cell(),
                    o.final_shift,
                    o.threshold_changes,
                    o.train_s
                );
                all.push(o);
            }
            println!(
                "| {name} | {trace} | {requests} | {:.1}% | {} | {} | {swaps} |",
                100.0 * miss_rate,
                cells.join(" | "),
                ceiling.map_or("one class".to_string(), |c| format!("{:.1}", 100.0 * c))
            );
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&all)?)?;
    }
    Ok(())
}
