//! Feature and model exploration on recorded traces (a measurement, not a test;
//! the tables of docs/learning.md come from it).
//!
//! ```sh
//! cargo run --release -p kml-learn --example explore -- \
//!     --train a.csv,b.csv [--test c.csv] [--kinds baseline,linear,logistic,tree] \
//!     [--features all|load|portable|portable+position|f1,f2,...] [--univariate] [--ablate]
//!     [--place --features portable+position+place]
//!     [--loo [--sets "f1,f2;portable;all"]]
//! ```
//! Trains on the union of the `--train` traces (each split by time: first 70% trains,
//! its last 20% tunes the threshold, the last 30% is held back) and prints balanced
//! accuracy of the integer model (what the kernel runs) on the pooled held-back
//! windows, on each trace's held-back window, and on every `--test` trace in full.
//! `--univariate` prints, per feature, the balanced accuracy of the best single
//! threshold (chosen on the training windows), the best of those rules on the
//! training windows ("best fixed rule"), and the VM's `reads-under-writes` policy
//! read as a classifier. `--ablate` retrains without each
//! feature in turn (and with each missing one added). `--loo` leaves each trace out
//! in turn: trains on the others and tests on it in full (a workload never seen).
//! `--sweep` is an experiment on information the observer does not record.
//! `--place` (with `--features portable+position+place`) one on a feature the
//! kernel does not compute yet: the neighbours' place in the FIFO
//! (`QueueShape::walk_places`). `portable+position+tick` adds the insert's phase
//! in its jiffy (`tick_phase_us`) to the shipped models' set.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use kml_ebpf_common::{features::Feature, model::ModelKind};
use kml_learn::{
    evaluate,
    references::{FeatureRule, WindowOracle, ORACLE_WINDOW_NS},
    train::split_windows,
    train::train_on_windows,
    trainers::PORTABLE_FEATURES,
    ConfusionMatrix, Dataset, Progress, TrainOptions,
};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',')]
    train: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',')]
    test: Vec<PathBuf>,
    /// Thin each training trace's fit and tune windows to about the
    /// smallest trace's size (every n-th request, n its size over the smallest's,
    /// rounded down: within 2x of it), so that every workload weighs about the same
    /// in the union instead of in proportion to its request rate
    /// (`Dataset::thin_to_smallest`, what `train --balance-traces` does). With
    /// `--loo`, each fold's training traces are thinned among themselves.
    #[arg(long)]
    balance_traces: bool,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,linear,logistic,tree"
    )]
    kinds: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    features: Vec<String>,
    #[arg(long)]
    univariate: bool,
    #[arg(long)]
    ablate: bool,
    #[arg(long, default_value_t = 6)]
    max_depth: usize,
    #[arg(long, default_value_t = 50_000)]
    tree_max_samples: usize,
    #[arg(long, default_value_t = 50)]
    min_samples_leaf: usize,
    /// Also print the per-window oracle: flags whole 1 ms windows (per direction) of
    /// insert time by their actual miss rate, with hindsight; a bound on what a
    /// model that sees only the queue state at insert can reach.
    #[arg(long)]
    oracle: bool,
    /// Logistic: L-BFGS iteration cap.
    #[arg(long, default_value_t = 5)]
    max_iterations: u64,
    /// Leave-one-out over `--train`: for each trace, train on the others' training
    /// windows and test on it (in full) and on the others' later windows.
    #[arg(long)]
    loo: bool,
    /// Feature sets to compare in `--loo` mode, `;`-separated, each comma-separated
    /// (`all` for every feature).
    #[arg(long)]
    sets: Option<String>,
    /// Print, per trace, how many labels the scheduler's own deadline (`fifo_time`,
    /// jiffies) changes against the nanosecond estimate, then stop.
    #[arg(long)]
    labels: bool,
    /// Experiment: replace `sector` with the distance (sectors, wrapped) ahead of the
    /// end of the last request issued in the same direction (host reconstruction).
    #[arg(long)]
    sweep: bool,
    /// Experiment: write the FIFO place of the oldest among the buckets walked down
    /// until they hold 1, 4 and 16 requests (`QueueShape::walk_places`, replayed),
    /// as `log_ratio_8(place × issue_gap, budget)`, into the lanes of `sector_mib`,
    /// `queued_other_dir` and `issue_gap_ns` (LOG_RATIO_MAX when nothing is queued
    /// below); `--features portable+position+place` reads them.
    #[arg(long)]
    place: bool,
    /// Beside each balanced accuracy / AUC, in brackets: the balanced accuracy
    /// outside the tick band (requests dispatched in their deadline's jiffy or the
    /// next, where the label turns on one timer tick; `kml_learn::TickBand`), and
    /// the ceiling of a model right on every request outside it and as good as this
    /// one inside.
    #[arg(long)]
    tick_band: bool,
    /// Experiment: each model cell gives, instead of the balanced accuracy at the
    /// threshold tuned on the training windows, the best one threshold reaches on
    /// that dataset (hindsight: `Evaluation::quantized_best_balanced_accuracy`),
    /// what the model's ranking is worth there.
    #[arg(long)]
    ceiling: bool,
}

/// The lanes `--place` writes its three features into.
const PLACE_LANES: [Feature; 3] = [
    Feature::SectorMib,
    Feature::QueuedOtherDir,
    Feature::IssueGapNs,
];

fn load(p: &std::path::Path, args: &Args) -> anyhow::Result<Dataset> {
    let ds = load_records(p, args)?;
    if !args.place {
        return Ok(ds);
    }
    let places = kml_learn::replay::replay_places(ds.records(), &Default::default());
    let mut places = places.into_iter();
    Ok(ds.with_features(|r, x| {
        let budget = r.deadline_ns.saturating_sub(r.insert_ns);
        let gap = r.issue_gap_ewma_ns;
        for (lane, place) in PLACE_LANES.iter().zip(places.next().unwrap_or([None; 3])) {
            x[lane.index()] = match place {
                Some(n) => kml_ebpf_common::logscale::log_ratio_8(n.saturating_mul(gap), budget),
                None => kml_ebpf_common::features::LOG_RATIO_MAX,
            };
        }
    }))
}

fn load_records(p: &std::path::Path, args: &Args) -> anyhow::Result<Dataset> {
    if !args.sweep {
        return Ok(Dataset::from_trace_file(p)?);
    }
    let file = std::io::BufReader::new(std::fs::File::open(p)?);
    let mut recs = kml_ebpf_common::trace::read_all(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut issues: Vec<(u64, usize, u64)> = recs
        .iter()
        .filter(|r| r.issue_ns != 0)
        .map(|r| {
            (
                r.issue_ns,
                r.op().direction() as usize,
                r.sector + r.nr_sectors as u64,
            )
        })
        .collect();
    issues.sort_unstable();
    recs.sort_by_key(|r| r.insert_ns);
    let mut last = [0u64; 2];
    let mut k = 0;
    for r in recs.iter_mut() {
        while k < issues.len() && issues[k].0 <= r.insert_ns {
            last[issues[k].1] = issues[k].2;
            k += 1;
        }
        let pos = last[r.op().direction() as usize];
        r.sector = r.sector.wrapping_sub(pos) & ((1 << 21) - 1);
    }
    Ok(Dataset::from_records(recs, p.display().to_string()))
}

fn name(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct Windows {
    fit: Dataset,
    tune: Dataset,
    tests: Vec<(String, Dataset)>,
}

fn run(
    kind: ModelKind,
    features: &[Feature],
    w: &Windows,
    args: &Args,
) -> anyhow::Result<(Vec<Cell>, f64)> {
    let mut opts = TrainOptions::new(kind);
    opts.features = Some(features.to_vec());
    opts.compare_baseline = false;
    opts.tree_max_depth = args.max_depth;
    opts.tree_max_samples = args.tree_max_samples;
    opts.tree_min_samples_leaf = args.min_samples_leaf;
    opts.logistic_max_iterations = args.max_iterations;
    let started = Instant::now();
    let m = train_on_windows(&w.fit, &w.tune, &w.tests[0].1, &opts, &Progress::silent())?;
    let secs = started.elapsed().as_secs_f64();
    let bal = w
        .tests
        .iter()
        .map(|(_, d)| {
            let e = evaluate(&m.float, &m.quantized, d);
            Cell {
                ba: match e.quantized_best_balanced_accuracy {
                    Some(best) if args.ceiling => best,
                    _ => e.quantized.balanced_accuracy,
                },
                auc: e.quantized_auc,
                one_class: e.one_class(),
                outside: e
                    .tick_band
                    .filter(|b| args.tick_band && !b.outside_one_class())
                    .map(|b| (b.outside.balanced_accuracy, b.ceiling())),
            }
        })
        .collect();
    Ok((bal, secs))
}

/// One table cell: balanced accuracy and AUC of the integer model on one dataset.
#[derive(Clone, Copy)]
struct Cell {
    ba: f64,
    auc: Option<f64>,
    one_class: bool,
    /// Balanced accuracy outside the tick band, and the ceiling of a model right
    /// outside it (`--tick-band`, `kml_learn::TickBand::ceiling`).
    outside: Option<(f64, f64)>,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = if self.one_class {
            "one class".to_string()
        } else {
            match self.auc {
                Some(a) => format!("{:.1}/{:.3}", 100.0 * self.ba, a),
                None => format!("{:.1}/-", 100.0 * self.ba),
            }
        };
        match self.outside {
            Some((o, c)) => write!(
                f,
                "{:>24}",
                format!("{text} ({:.1}, {:.1})", 100.0 * o, 100.0 * c)
            ),
            None => write!(f, "{text:>12}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let features: Vec<Feature> = if args.features.is_empty() {
        Feature::ALL.to_vec()
    } else {
        parse_set(&args.features.join(","))?
    };
    if args.labels {
        println!(
            "{:<20} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>7}",
            "trace", "requests", "jiffies", "miss ns", "miss", "ns→miss", "ns→met", "changed"
        );
        for p in args.train.iter().chain(&args.test) {
            let d = Dataset::from_trace_file(p)?;
            let r = d.records();
            let with_jiffies = r
                .iter()
                .filter(|r| r.fifo_time != 0 && r.issue_jiffies != 0)
                .count();
            let old = r.iter().filter(|r| r.deadline_missed_ns()).count();
            let new = r.iter().filter(|r| r.deadline_missed()).count();
            let up = r
                .iter()
                .filter(|r| r.deadline_missed() && !r.deadline_missed_ns())
                .count();
            let down = r
                .iter()
                .filter(|r| !r.deadline_missed() && r.deadline_missed_ns())
                .count();
            let pct = |v: usize| 100.0 * v as f64 / r.len().max(1) as f64;
            println!(
                "{:<20} {:>9} {:>8.1}% {:>7.2}% {:>7.2}% {:>8.2}% {:>8.2}% {:>6.2}%",
                name(p),
                r.len(),
                pct(with_jiffies),
                pct(old),
                pct(new),
                pct(up),
                pct(down),
                pct(up + down)
            );
        }
        return Ok(());
    }
    let started = Instant::now();
    let opts = TrainOptions::new(ModelKind::Logistic);
    let (mut fits, mut tunes, mut tests) = (Vec::new(), Vec::new(), Vec::new());
    for p in &args.train {
        let d = load(p, &args)?;
        let (fit, tune, test) = split_windows(&d, &opts)?;
        eprintln!(
            "{}: {} requests, miss {:.1}%",
            name(p),
            d.len(),
            100.0 * d.miss_rate()
        );
        fits.push(fit);
        tunes.push(tune);
        tests.push((format!("{} later", name(p)), test));
    }
    if args.loo {
        return loo(&args, &fits, &tunes, &tests, &features);
    }
    for p in &args.test {
        let d = load(p, &args)?;
        eprintln!(
            "{}: {} requests, miss {:.1}%",
            name(p),
            d.len(),
            100.0 * d.miss_rate()
        );
        tests.push((name(p), d));
    }
    if args.balance_traces {
        Dataset::thin_to_smallest(&mut fits);
        Dataset::thin_to_smallest(&mut tunes);
    }
    let all_tests = Dataset::concat(&tests.iter().map(|t| t.1.clone()).collect::<Vec<_>>());
    let mut windows = Windows {
        fit: Dataset::concat(&fits),
        tune: Dataset::concat(&tunes),
        tests,
    };
    windows.tests.insert(0, ("all".into(), all_tests));
    eprintln!("loaded in {:.1}s", started.elapsed().as_secs_f64());

    print!("{:<28}", "model");
    for (n, _) in &windows.tests {
        print!(" {:>12}", &n[..n.len().min(12)]);
    }
    println!("  train s   (balanced accuracy %/AUC)");

    if args.univariate {
        let train = Dataset::concat(&[windows.fit.clone(), windows.tune.clone()]);
        // The best of these single-feature rules on the training windows: the
        // "best fixed rule" a model must beat.
        let mut best: Option<(f64, String, Vec<f64>)> = None;
        for &f in &features {
            let Some(rule) = FeatureRule::fit(&train, f) else {
                continue;
            };
            let scores: Vec<f64> = windows
                .tests
                .iter()
                .map(|(_, d)| 100.0 * rule.balanced_accuracy_on(d))
                .collect();
            print!("{:<28}", rule.to_string());
            for s in &scores {
                print!(" {s:>12.2}");
            }
            println!();
            if best.as_ref().is_none_or(|b| rule.balanced_accuracy > b.0) {
                best = Some((rule.balanced_accuracy, rule.to_string(), scores));
            }
        }
        if let Some((on_train, rule, scores)) = best {
            print!("{:<28}", "best fixed rule (training)");
            for s in &scores {
                print!(" {s:>12.2}");
            }
            println!("  {rule}, {:.2} on the training windows", 100.0 * on_train);
        }
        // The VM's fixed policy as a classifier: a read inserted while writes are
        // queued is at risk, a write never.
        print!("{:<28}", "reads-under-writes");
        for (_, d) in &windows.tests {
            let (writes, queued) = (
                d.column(Feature::WriteDir),
                d.column(Feature::QueuedOtherDir),
            );
            let flags = writes.iter().zip(&queued).map(|(&w, &q)| w == 0 && q > 0);
            let m = ConfusionMatrix::from_pairs(flags.zip(d.missed()));
            print!(" {:>12.2}", 100.0 * m.balanced_accuracy());
        }
        println!();
    }

    if args.oracle {
        print!("{:<28}", "1 ms window oracle");
        for (_, d) in &windows.tests {
            print!(" {}", oracle_cell(d));
        }
        println!();
    }

    for k in &args.kinds {
        let kind = ModelKind::from_name(k).ok_or_else(|| anyhow::anyhow!("unknown kind {k}"))?;
        let (bal, secs) = run(kind, &features, &windows, &args)?;
        print!("{:<28}", k);
        for b in &bal {
            print!(" {b}");
        }
        println!("  {secs:.2}");
        if args.ablate && kind != ModelKind::Baseline {
            for &f in &features {
                let rest: Vec<Feature> = features.iter().copied().filter(|&g| g != f).collect();
                let (bal, _) = run(kind, &rest, &windows, &args)?;
                print!("{:<28}", format!("  - {}", f.name()));
                for b in &bal {
                    print!(" {b}");
                }
                println!();
            }
            for f in Feature::ALL.into_iter().filter(|f| !features.contains(f)) {
                let mut more = features.clone();
                more.push(f);
                let (bal, _) = run(kind, &more, &windows, &args)?;
                print!("{:<28}", format!("  + {}", f.name()));
                for b in &bal {
                    print!(" {b}");
                }
                println!();
            }
        }
    }
    Ok(())
}

fn parse_set(text: &str) -> anyhow::Result<Vec<Feature>> {
    match text.trim() {
        "all" => return Ok(Feature::ALL.to_vec()),
        // The load level: not the request's place, nor its phase in the jiffy.
        "load" => {
            return Ok(Feature::ALL
                .into_iter()
                .filter(|f| !f.is_position() && *f != Feature::TickPhaseUs)
                .collect())
        }
        // With `--place`: and the three places.
        "portable+position+place" => {
            return Ok(PORTABLE_FEATURES
                .iter()
                .chain(&Feature::POSITION)
                .chain(&PLACE_LANES)
                .copied()
                .collect())
        }
        named => {
            if let Some(set) = kml_learn::trainers::named_features(named) {
                return Ok(set);
            }
        }
    }
    text.split(',')
        .map(|n| Feature::from_name(n.trim()).ok_or_else(|| anyhow::anyhow!("unknown feature {n}")))
        .collect()
}

/// Leave-one-workload-out: rows = (feature set, kind), columns = held-out trace
/// (balanced accuracy on it in full), then the mean over held-out traces, then the
/// mean of the training traces' later windows.
fn loo(
    args: &Args,
    fits: &[Dataset],
    tunes: &[Dataset],
    tests: &[(String, Dataset)],
    features: &[Feature],
) -> anyhow::Result<()> {
    let sets: Vec<Vec<Feature>> = match &args.sets {
        Some(s) => s.split(';').map(parse_set).collect::<Result<_, _>>()?,
        None => vec![features.to_vec()],
    };
    let full: Vec<Dataset> = (0..fits.len())
        .map(|i| Dataset::concat(&[fits[i].clone(), tunes[i].clone(), tests[i].1.clone()]))
        .collect();
    print!("{:<12}", "set/kind");
    for (n, _) in tests {
        let n = n.trim_end_matches(" later");
        print!(" {:>12}", &n[..n.len().min(12)]);
    }
    println!(" {:>10} {:>10} {:>10}", "mean-out", "min-out", "mean-later");
    for (si, set) in sets.iter().enumerate() {
        for k in &args.kinds {
            let kind =
                ModelKind::from_name(k).ok_or_else(|| anyhow::anyhow!("unknown kind {k}"))?;
            let (mut outs, mut laters) = (Vec::new(), Vec::new());
            for (held, held_data) in full.iter().enumerate() {
                let others: Vec<usize> = (0..fits.len()).filter(|&i| i != held).collect();
                let mut fit: Vec<Dataset> = others.iter().map(|&i| fits[i].clone()).collect();
                let mut tune: Vec<Dataset> = others.iter().map(|&i| tunes[i].clone()).collect();
                if args.balance_traces {
                    Dataset::thin_to_smallest(&mut fit);
                    Dataset::thin_to_smallest(&mut tune);
                }
                let w = Windows {
                    fit: Dataset::concat(&fit),
                    tune: Dataset::concat(&tune),
                    tests: std::iter::once(("held".to_string(), held_data.clone()))
                        .chain(others.iter().map(|&i| tests[i].clone()))
                        .collect(),
                };
                let (bal, _) = run(kind, set, &w, args)?;
                outs.push(bal[0]);
                laters.extend(bal[1..].iter().filter(|c| !c.one_class).map(|c| c.ba));
            }
            print!("{:<12}", format!("s{si} {k}"));
            for b in &outs {
                print!(" {b}");
            }
            let mean = |v: &[f64]| 100.0 * v.iter().sum::<f64>() / v.len() as f64;
            let scored: Vec<f64> = outs.iter().filter(|c| !c.one_class).map(|c| c.ba).collect();
            let min = scored.iter().cloned().fold(f64::INFINITY, f64::min);
            let outs = scored;
            println!(
                " {:>10.2} {:>10.2} {:>10.2}",
                mean(&outs),
                100.0 * min,
                mean(&laters)
            );
        }
    }
    for (si, set) in sets.iter().enumerate() {
        println!(
            "s{si}: {}",
            set.iter().map(|f| f.name()).collect::<Vec<_>>().join(",")
        );
    }
    Ok(())
}

/// The 1 ms window oracle's cell ([`WindowOracle`]).
fn oracle_cell(d: &Dataset) -> Cell {
    match WindowOracle::of(d, ORACLE_WINDOW_NS) {
        Some(o) => Cell {
            ba: o.balanced_accuracy,
            auc: o.auc,
            one_class: false,
            outside: None,
        },
        None => Cell {
            ba: 1.0,
            auc: None,
            one_class: true,
            outside: None,
        },
    }
}
