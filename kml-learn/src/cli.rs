//! `kml-agent train` and `kml-agent eval`: the argument structs and what they do.
//! The agent's CLI flattens these into its subcommands.

use std::path::PathBuf;

use anyhow::{bail, Context};
use kml_ebpf_common::{features::Feature, model::ModelKind};
use serde_json::{json, Value};

use crate::{
    dataset::Dataset,
    evaluate::{evaluate, Evaluation},
    metrics::ThresholdGoal,
    model_file::{DeviceRegime, LoadedModel, ModelFile},
    progress::Progress,
    references::References,
    train::{train_many, TrainOptions},
};

/// Model kinds on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// KML's baseline: linear regression of the dispatch delay on the normalised
    /// block number and the operation; at risk when the delay exceeds the deadline.
    Baseline,
    /// Linear regression of the dispatch delay; at risk when the predicted delay
    /// exceeds the time left to the deadline (plus a tuned margin).
    Linear,
    /// Logistic regression of the miss class.
    Logistic,
    /// Decision tree of the miss class (depth <= 8).
    Tree,
}

impl From<KindArg> for ModelKind {
    fn from(k: KindArg) -> ModelKind {
        match k {
            KindArg::Baseline => ModelKind::Baseline,
            KindArg::Linear => ModelKind::LinearRegression,
            KindArg::Logistic => ModelKind::Logistic,
            KindArg::Tree => ModelKind::Tree,
        }
    }
}

/// Train a model on recorded traces and write its model file.
///
/// Each trace is split by insert time: the first `--train-fraction` trains (its last
/// `--tune-fraction` chooses the verdict threshold), the rest is held back for
/// testing. Several traces (e.g. several workloads) train one model on the union of
/// their training windows. The quantised model is refused if its balanced accuracy on the held-back
/// window is more than 0.5 point below the float model's.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Trace(s) to learn from (CSV written by `kml-agent record`); repeat the option
    /// or separate with commas to train on several.
    #[arg(long, value_name = "FILE.csv", required = true, value_delimiter = ',')]
    pub trace: Vec<PathBuf>,
    /// Kind of model.
    #[arg(long, value_enum, value_name = "KIND")]
    pub model: KindArg,
    /// Where to write the model file (JSON), e.g. models/logistic.json.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Share of the trace, by insert time, to train on; the rest tests.
    #[arg(long, value_name = "F", default_value_t = 0.7)]
    pub train_fraction: f64,
    /// Share of the training window, at its end, used to tune the verdict threshold.
    #[arg(long, value_name = "F", default_value_t = 0.2)]
    pub tune_fraction: f64,
    /// Keep the default verdict threshold (delay > budget; log-odds > 0; p > 0.5).
    #[arg(long)]
    pub no_tune: bool,
    /// Tune the threshold for a verdict that acts (`kml-agent run --act`): the highest
    /// threshold that flags at least this share of the tune window's misses, e.g.
    /// 0.99. Default: the best balanced accuracy (a verdict that is counted).
    #[arg(long, value_name = "R", conflicts_with = "no_tune")]
    pub miss_recall: Option<f64>,
    /// Features to use, comma-separated; or `all` (the default: every feature the
    /// kernel computes; best on later I/O of the same workload) or `portable`
    /// (write_dir, dir_wait_log, expected_wait_log, dir_wait_us, expected_wait_us,
    /// deadline_budget_us, issue_distance_log2, miss_share_same, miss_share_other:
    /// best on other workloads) or `portable+position` (those and the eight
    /// position features: head_age_log, older_half, expired, due_below,
    /// below_age_log, recent, lead_log, due_count) or `portable+position+tick`
    /// (and the insert's phase in its jiffy, tick_phase_us: traces recorded since
    /// 2026-12-05 carry it) or `scale-free` (a tree's best on deeper queues than
    /// trained on: write_dir, dir_wait_log, expected_wait_log, issue_distance_log2,
    /// the miss shares, head_age_log, below_age_log, lead_log, and three counts as
    /// shares of the queue: older_half_share, expired_share, due_count_share; no
    /// count of queued requests, no time in µs) or `queue` (the queue as it stands at insert, for a
    /// model whose verdicts act: no average of past waits or misses, which its own
    /// boosts would bend). The baseline always uses sector_mib,op. An unknown name
    /// lists the known ones.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub features: Vec<String>,
    /// Also evaluate the trained model on these traces (e.g. another workload).
    #[arg(long, value_name = "FILE.csv")]
    pub test_trace: Vec<PathBuf>,
    /// Description of the workload kept in the model file (fio job, device, expiries).
    #[arg(long, value_name = "TEXT")]
    pub workload: Option<String>,
    /// Tree: maximum depth (1..=8).
    #[arg(long, value_name = "N", default_value_t = 6)]
    pub max_depth: usize,
    /// Tree: fewest (class-weighted) training requests in a leaf.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub min_samples_leaf: usize,
    /// Tree: grow on at most this many requests, evenly spaced over the window.
    #[arg(long, value_name = "N", default_value_t = 50_000)]
    pub tree_max_samples: usize,
    /// Logistic: maximum L-BFGS iterations (it starts from a least-squares fit, so
    /// a few suffice: 3, 5, 10 and 30 give the same held-back accuracy).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub max_iterations: u64,
    /// The kind of disk the model is made for (free text), for a model that only
    /// fits one kind of device: with `--for-queue-depth` and `--for-read-expire`,
    /// `kml-agent run --model auto` takes it only on disks in that range (and
    /// prefers it there). Without it the model is general.
    #[arg(long, value_name = "TEXT", requires_all = ["for_queue_depth", "for_read_expire"])]
    pub for_device: Option<String>,
    /// Hardware queue depth (`/sys/block/DEV/mq/*/nr_tags`) of the disks it is
    /// made for: `N` or `LOW-HIGH`.
    #[arg(long, value_name = "N[-M]", requires = "for_device")]
    pub for_queue_depth: Option<String>,
    /// mq-deadline read_expire (ms) of the disks it is made for: `MS` or `LOW-HIGH`.
    #[arg(long, value_name = "MS[-MS]", requires = "for_device")]
    pub for_read_expire: Option<String>,
    /// Several traces: thin each one's fit and tune windows to within 2x of the
    /// smallest one's (every n-th request), so that every workload weighs about the
    /// same instead of in proportion to its request rate. The held-back windows stay
    /// whole.
    #[arg(long)]
    pub balance_traces: bool,
    /// Do not print progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// `--for-device`, `--for-queue-depth`, `--for-read-expire` as the file's regime.
    fn device_regime(&self) -> anyhow::Result<Option<DeviceRegime>> {
        let (Some(description), Some(depth), Some(expire)) = (
            &self.for_device,
            &self.for_queue_depth,
            &self.for_read_expire,
        ) else {
            return Ok(None);
        };
        let depth = DeviceRegime::parse_range(depth)
            .map_err(|e| anyhow::anyhow!("--for-queue-depth {e}"))?;
        let narrow = |v: u64| {
            u32::try_from(v).map_err(|_| anyhow::anyhow!("--for-queue-depth: {v} is too large"))
        };
        Ok(Some(DeviceRegime {
            description: description.clone(),
            hw_queue_depth: [narrow(depth[0])?, narrow(depth[1])?],
            read_expire_ms: DeviceRegime::parse_range(expire)
                .map_err(|e| anyhow::anyhow!("--for-read-expire {e}"))?,
        }))
    }
}

fn parse_features(names: &[String]) -> anyhow::Result<Option<Vec<Feature>>> {
    if names.is_empty() {
        return Ok(None);
    }
    if let [one] = names {
        if let Some(set) = crate::trainers::named_features(one) {
            return Ok(Some(set));
        }
    }
    let features = names
        .iter()
        .map(|n| {
            Feature::from_name(n.trim()).with_context(|| {
                let known: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "unknown feature `{n}` (known: {}; or one set: {})",
                    known.join(", "),
                    crate::trainers::FEATURE_SET_NAMES.join(", ")
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(features))
}

fn load_trace(path: &std::path::Path, progress: &Progress) -> anyhow::Result<Dataset> {
    progress.step(format_args!("reading {}", path.display()));
    let data = Dataset::from_trace_file(path)?;
    let d = data.describe();
    progress.step(format_args!(
        "{} requests ({} skipped), {:.1}s of I/O, miss rate {:.1}%",
        d.records,
        d.skipped_records,
        d.span_s,
        100.0 * d.miss_rate
    ));
    if data.is_empty() {
        bail!(
            "{}: no usable request (need a deadline and a dispatch)",
            path.display()
        );
    }
    Ok(data)
}

impl TrainArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let progress = Progress::interactive(self.quiet);
        let mut opts = TrainOptions::new(self.model.into());
        opts.features = parse_features(&self.features)?;
        opts.train_fraction = self.train_fraction;
        opts.tune_fraction = self.tune_fraction;
        opts.tune_threshold = !self.no_tune;
        if let Some(r) = self.miss_recall {
            // Without a tune window (or for the baseline, which keeps KML's verdict)
            // no threshold is tuned: the goal would be dropped without a word.
            if self.tune_fraction <= 0.0 || opts.kind == ModelKind::Baseline {
                bail!("--miss-recall tunes the threshold: it needs --tune-fraction > 0 and a model other than baseline");
            }
            opts.threshold_goal = ThresholdGoal::MissRecall(r)
                .checked()
                .ok_or_else(|| anyhow::anyhow!("--miss-recall {r}: must be in (0, 1]"))?;
        }
        opts.tree_max_depth = self.max_depth;
        opts.tree_min_samples_leaf = self.min_samples_leaf;
        opts.tree_max_samples = self.tree_max_samples;
        opts.logistic_max_iterations = self.max_iterations;
        opts.workload = self.workload.clone();
        opts.balance_traces = self.balance_traces;
        // Options checked before the traces (which can be large) are read.
        let device = self.device_regime()?;
        let data = self
            .trace
            .iter()
            .map(|p| load_trace(p, &progress))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let model = train_many(&data, &opts, &progress)?;

        let mut file = ModelFile::from_trained(&model);
        file.device = device;
        crate::model_file::write(&file, &self.out)?;
        progress.step(format_args!("wrote {}", self.out.display()));

        println!(
            "{} model trained on {} requests in {:.3}s ({})",
            model.float.kind().name(),
            model.training.fit_records + model.training.tune_records,
            model.training.train_seconds,
            self.out.display()
        );
        print_table_header();
        if let Some(e) = &model.test {
            print_row(model.float.kind().name(), "held back", e);
        }
        if let Some(e) = &model.baseline_test {
            print_row("baseline", "held back", e);
        }
        if data.len() > 1 {
            // Each trace's own held-back window.
            for (path, d) in self.trace.iter().zip(&data) {
                let (_, _, test) = crate::train::split_windows(d, &opts)?;
                let e = evaluate(&model.float, &model.quantized, &test);
                print_row(
                    model.float.kind().name(),
                    &format!("{} later", path.display()),
                    &e,
                );
                if let Some((f, q)) = &model.baseline {
                    print_row(
                        "baseline",
                        &format!("{} later", path.display()),
                        &evaluate(f, q, &test),
                    );
                }
            }
        }
        for path in &self.test_trace {
            let other = load_trace(path, &progress)?;
            other.check_carries(model.float.features())?;
            let e = evaluate(&model.float, &model.quantized, &other);
            print_row(model.float.kind().name(), &path.display().to_string(), &e);
            if let Some((f, q)) = &model.baseline {
                print_row(
                    "baseline",
                    &path.display().to_string(),
                    &evaluate(f, q, &other),
                );
            }
        }
        Ok(())
    }
}

/// Evaluate a model file on a trace, in float and in the kernel's integer form.
///
/// Reports accuracy, balanced accuracy, precision / recall / F1 of the miss class,
/// the confusion matrix, and for the regressions MAE and R² of the predicted
/// dispatch delay. `--from`/`--to` select a time window (fractions of the trace by
/// insert time), e.g. `--from 0.7` for the part a default `train` held back.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Trace to evaluate on (CSV written by `kml-agent record`).
    #[arg(long, value_name = "FILE.csv")]
    pub trace: PathBuf,
    /// Model file written by `kml-agent train`.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Print one JSON object on stdout (and nothing else there).
    #[arg(long)]
    pub json: bool,
    /// Start of the window, as a fraction of the trace by insert time.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub from: f64,
    /// End of the window, as a fraction of the trace by insert time.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub to: f64,
    /// Also evaluate this model file (e.g. the KML baseline) and report it beside.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// Do not print progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// One `eval`: the model, the window, its evaluation and the references beside it.
struct EvalRun {
    model: LoadedModel,
    baseline: Option<(LoadedModel, Evaluation)>,
    data: Dataset,
    e: Evaluation,
    references: Option<References>,
}

impl EvalArgs {
    fn run(&self) -> anyhow::Result<EvalRun> {
        if !(0.0..=1.0).contains(&self.from) || !(self.from..=1.0).contains(&self.to) {
            bail!(
                "--from {} and --to {} must satisfy 0 <= from <= to <= 1",
                self.from,
                self.to
            );
        }
        let progress = Progress::new(self.quiet);
        let model = LoadedModel::load(&self.model)?;
        let baseline = self
            .baseline
            .as_deref()
            .map(LoadedModel::load)
            .transpose()?;
        let data = load_trace(&self.trace, &progress)?.window_fraction(self.from, self.to);
        data.check_carries(model.float.features())?;
        progress.step(format_args!("evaluating on {}", data.window()));
        let e = evaluate(&model.float, &model.quantized, &data);
        let baseline = baseline.map(|b| {
            let e = evaluate(&b.float, &b.quantized, &data);
            (b, e)
        });
        progress.step("the references: the 1 ms window oracle, the best one-feature rule");
        let references = References::of(&data);
        Ok(EvalRun {
            model,
            baseline,
            data,
            e,
            references,
        })
    }

    /// The `--json` object.
    fn json(&self, run: &EvalRun) -> Value {
        let mut out = eval_json(&run.model, &self.model, &run.e);
        if let Value::Object(map) = &mut out {
            map.insert(
                "references".into(),
                references_json(run.references.as_ref()),
            );
            if let (Some((b, e)), Some(path)) = (&run.baseline, &self.baseline) {
                map.insert("baseline".into(), eval_json(b, path, e));
            }
        }
        out
    }

    pub fn execute(self) -> anyhow::Result<()> {
        let run = self.run()?;
        let EvalRun {
            model,
            baseline,
            data,
            e,
            references,
        } = &run;
        if self.json {
            println!("{}", self.json(&run));
        } else {
            println!(
                "{} on {}, {}",
                self.model.display(),
                self.trace.display(),
                data.window()
            );
            print_table_header();
            print_row(model.kind().name(), "", e);
            if let Some((b, be)) = baseline {
                print_row(b.kind().name(), "", be);
            }
            let cm = e.quantized.confusion;
            println!(
                "confusion (integer model): predicted miss: {} missed, {} met; predicted met: {} missed, {} met",
                cm.true_miss, cm.false_miss, cm.false_met, cm.true_met
            );
            if let Some(best) = e.quantized_best_balanced_accuracy {
                println!(
                    "threshold: {:.2}% balanced accuracy at the model's own; {:.2}% at the best single threshold for this trace, in hindsight",
                    100.0 * e.quantized.balanced_accuracy,
                    100.0 * best
                );
            }
            if let Some(band) = &e.tick_band {
                println!("{band}");
            }
            if let Some(r) = references {
                println!(
                    "references on these requests, in hindsight: the 1 ms window oracle {:.2}% (AUC {}); the best one-feature rule `{}` {:.2}%",
                    100.0 * r.oracle.balanced_accuracy,
                    r.oracle.auc.map_or("-".into(), |a| format!("{a:.3}")),
                    r.best_rule,
                    100.0 * r.best_rule.balanced_accuracy
                );
            }
        }
        Ok(())
    }
}

/// The references' `--json` object; `null` for one class.
fn references_json(r: Option<&References>) -> Value {
    r.map_or(Value::Null, |r| {
        json!({
            "oracle_window_ns": r.oracle.window_ns,
            "oracle_balanced_accuracy": r.oracle.balanced_accuracy,
            "oracle_auc": r.oracle.auc,
            "best_rule": r.best_rule.to_string(),
            "best_rule_feature": r.best_rule.feature.name(),
            "best_rule_above": r.best_rule.above,
            "best_rule_threshold": r.best_rule.threshold,
            "best_rule_balanced_accuracy": r.best_rule.balanced_accuracy,
        })
    })
}

/// The `--json` object: flat keys for the float model, `quantized_`-prefixed keys
/// for the integer model.
fn eval_json(model: &LoadedModel, path: &std::path::Path, e: &Evaluation) -> Value {
    let reg = |r: Option<crate::RegressionMetrics>| (r.map(|r| r.mae_us), r.map(|r| r.r2));
    let (mae, r2) = reg(e.float_regression);
    let (q_mae, q_r2) = reg(e.quantized_regression);
    json!({
        "model": path.display().to_string(),
        "kind": model.kind().name(),
        "trace": e.data.source,
        "window": e.data.window,
        "records": e.data.records,
        "miss_rate": e.data.miss_rate,
        "accuracy": e.float.accuracy,
        "balanced_accuracy": e.float.balanced_accuracy,
        "precision_miss": e.float.precision_miss,
        "recall_miss": e.float.recall_miss,
        "f1_miss": e.float.f1_miss,
        "confusion": e.float.confusion,
        "mae_us": mae,
        "r2": r2,
        "quantized_accuracy": e.quantized.accuracy,
        "quantized_balanced_accuracy": e.quantized.balanced_accuracy,
        "quantized_precision_miss": e.quantized.precision_miss,
        "quantized_recall_miss": e.quantized.recall_miss,
        "quantized_f1_miss": e.quantized.f1_miss,
        "quantized_confusion": e.quantized.confusion,
        "quantized_mae_us": q_mae,
        "quantized_r2": q_r2,
        "agreement": e.agreement,
        "quantized_auc": e.quantized_auc,
        "quantized_best_balanced_accuracy": e.quantized_best_balanced_accuracy,
        "one_class": e.one_class(),
        "tick_band": e.tick_band.map(|b| json!({
            "share": b.share,
            "error_share": b.error_share,
            "accuracy_inside": b.inside.accuracy(),
            "outside_balanced_accuracy": b.outside.balanced_accuracy,
            "outside_one_class": b.outside_one_class(),
            "ceiling_balanced_accuracy": b.ceiling(),
        })),
    })
}

fn print_table_header() {
    println!(
        "{:<9} {:<24} {:>8} {:>6} | {:>6} {:>6} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>9} {:>6}",
        "model",
        "data",
        "requests",
        "miss%",
        "acc",
        "bal",
        "prec",
        "recall",
        "f1",
        "q.acc",
        "q.bal",
        "q.auc",
        "mae(µs)",
        "r2"
    );
}

fn print_row(name: &str, data: &str, e: &Evaluation) {
    let pct = |v: f64| format!("{:.2}", 100.0 * v);
    let (mae, r2) = match e.float_regression {
        Some(r) => (format!("{:.1}", r.mae_us), format!("{:.3}", r.r2)),
        None => ("-".into(), "-".into()),
    };
    let data = if data.len() > 24 {
        &data[data.len() - 24..]
    } else {
        data
    };
    if e.one_class() {
        // Only misses or only met deadlines: no score means anything.
        println!(
            "{:<9} {:<24} {:>8} {:>6} | one class: {}",
            name,
            data,
            e.data.records,
            pct(e.data.miss_rate),
            if e.data.miss_rate > 0.0 {
                "every request missed"
            } else {
                "no request missed"
            }
        );
        return;
    }
    let auc = e
        .quantized_auc
        .map_or_else(|| "-".to_string(), |a| format!("{a:.3}"));
    println!(
        "{:<9} {:<24} {:>8} {:>6} | {:>6} {:>6} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>9} {:>6}",
        name,
        data,
        e.data.records,
        pct(e.data.miss_rate),
        pct(e.float.accuracy),
        pct(e.float.balanced_accuracy),
        pct(e.float.precision_miss),
        pct(e.float.recall_miss),
        pct(e.float.f1_miss),
        pct(e.quantized.accuracy),
        pct(e.quantized.balanced_accuracy),
        auc,
        mae,
        r2
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use kml_ebpf_common::trace;

    #[derive(Parser)]
    enum Cli {
        Train(TrainArgs),
        Eval(EvalArgs),
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn train_then_eval_end_to_end() {
        // Removed when the test ends, passed or failed (a panic unwinds through it).
        struct TempDir(std::path::PathBuf);
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let guard =
            TempDir(std::env::temp_dir().join(format!("kml-learn-cli-{}", std::process::id())));
        let dir = guard.0.clone();
        std::fs::create_dir_all(&dir).unwrap();
        let trace_path = dir.join("trace.csv");
        let mut csv = Vec::new();
        std::io::Write::write_all(&mut csv, format!("{}\n", trace::header()).as_bytes()).unwrap();
        for r in crate::synthetic::SyntheticTrace::new(3).records(4000) {
            trace::write_row(&mut csv, &r).unwrap();
        }
        std::fs::write(&trace_path, csv).unwrap();
        let model_path = dir.join("m.json");
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();

        let run = |line: String| match Cli::parse_from(args(&line)) {
            Cli::Train(t) => t.execute(),
            Cli::Eval(e) => e.execute(),
        };
        let train = |extra: &str, out: &std::path::Path| {
            run(format!(
                "x train --trace {} --model logistic --out {} --quiet {extra}",
                trace_path.display(),
                out.display()
            ))
        };
        train("--features queued_same_dir,dir_wait_log,op", &model_path).unwrap();
        let loaded = LoadedModel::load(&model_path).unwrap();
        assert_eq!(
            loaded.float.features(),
            [Feature::QueuedSameDir, Feature::DirWaitLog, Feature::Op]
        );

        let line = format!(
            "x eval --trace {} --model {} --json --from 0.5 --quiet",
            trace_path.display(),
            model_path.display()
        );
        run(line.clone()).unwrap();
        // The references beside the model: the oracle and the best one-lane rule
        // on the same window (the second half), as the library computes them.
        let Cli::Eval(eval) = Cli::parse_from(args(&line)) else {
            unreachable!()
        };
        let out = eval.json(&eval.run().unwrap());
        let half = crate::Dataset::from_trace_file(&trace_path)
            .unwrap()
            .window_fraction(0.5, 1.0);
        assert_eq!(out["records"].as_u64(), Some(half.len() as u64));
        let refs = &out["references"];
        let oracle = crate::references::WindowOracle::of(&half, 1_000_000).unwrap();
        assert_eq!(
            refs["oracle_balanced_accuracy"].as_f64(),
            Some(oracle.balanced_accuracy)
        );
        assert_eq!(refs["oracle_window_ns"].as_u64(), Some(1_000_000));
        let rule = crate::references::FeatureRule::best(&half, &Feature::ALL).unwrap();
        assert_eq!(refs["best_rule"].as_str(), Some(rule.to_string().as_str()));
        assert_eq!(
            refs["best_rule_balanced_accuracy"].as_f64(),
            Some(rule.balanced_accuracy)
        );
        // No rule on one lane beats the best one on this window.
        for f in Feature::ALL {
            let r = crate::references::FeatureRule::fit(&half, f).unwrap();
            assert!(r.balanced_accuracy <= rule.balanced_accuracy, "{r}");
        }

        // A model to act with: the goal is kept in its file; a recall outside
        // (0, 1] is refused before anything is written.
        let act_path = dir.join("act.json");
        train("--miss-recall 0.99", &act_path).unwrap();
        let act = LoadedModel::load(&act_path).unwrap();
        assert_eq!(
            act.file.training.threshold_goal,
            ThresholdGoal::MissRecall(0.99)
        );
        assert_eq!(loaded.file.training.threshold_goal, ThresholdGoal::Balanced);
        let bad = dir.join("bad.json");
        let err = train("--miss-recall 1.5", &bad).unwrap_err();
        assert!(err.to_string().contains("--miss-recall"), "{err:#}");
        let err = train("--miss-recall 0.99 --tune-fraction 0", &bad).unwrap_err();
        assert!(err.to_string().contains("--tune-fraction"), "{err:#}");
        assert!(!bad.exists());

        // A model that reads the insert's tick phase is judged only on a trace
        // that carries it.
        let phased_path = dir.join("phased.csv");
        let mut csv = Vec::new();
        std::io::Write::write_all(&mut csv, format!("{}\n", trace::header()).as_bytes()).unwrap();
        for mut r in crate::synthetic::SyntheticTrace::new(3).records(4000) {
            r.known |= kml_ebpf_common::record::Known::TICK_PHASE;
            r.tick_phase = ((r.insert_ns >> 10) & 4095) as u16;
            trace::write_row(&mut csv, &r).unwrap();
        }
        std::fs::write(&phased_path, csv).unwrap();
        let tick_path = dir.join("tick.json");
        run(format!(
            "x train --trace {} --model logistic --out {} --quiet --features portable+position+tick",
            phased_path.display(),
            tick_path.display()
        ))
        .unwrap();
        let eval_on = |trace: &std::path::Path| {
            run(format!(
                "x eval --trace {} --model {} --json --quiet",
                trace.display(),
                tick_path.display()
            ))
        };
        eval_on(&phased_path).unwrap();
        let err = eval_on(&trace_path).unwrap_err();
        assert!(err.to_string().contains("`tick_phase_us`"), "{err:#}");
        drop(guard);
        assert!(!dir.exists());
    }
}
