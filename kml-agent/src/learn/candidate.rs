//! A candidate model: trained on the older part of the live window and scored,
//! with the active model, on its newest part (off the run loop: it takes seconds).

use std::time::{Duration, Instant};

use kml_ebpf_common::{
    abi::hook::Policy,
    features::{features_with_position, Feature, FeatureVector},
    model::ModelKind,
    RequestRecord, Sampling, Verdict,
};
use kml_learn::{
    metrics::ThresholdGoal, ConfusionMatrix, Dataset, LoadedModel, Progress, QuantizedModel,
    TrainOptions,
};

/// How online learning trains its candidates and counts outcomes: the features
/// and threshold goal of the model it started from (a model made to act is
/// retrained as one), and, while a model policy acts, which outcomes still say
/// what the verdict predicted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recipe {
    /// Features to train on; `None`: every one the kernel computes.
    pub features: Option<Vec<Feature>>,
    pub goal: ThresholdGoal,
    pub acting: Option<Acting>,
}

/// A model policy acting on the verdicts while online learning runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acting {
    pub policy: Policy,
    /// The hook leaves one in `2^hold_out_shift` of the requests it would act on
    /// alone (`HOOK_POLICY[HOOK_HOLD_OUT]`).
    pub hold_out_shift: u32,
}

/// The threshold goal online learning uses when verdicts act and the starting
/// model does not bring its own: flag 99.5% of the misses (`models/vm-act.json`).
pub const ACTING_MISS_RECALL: f64 = 0.995;

impl Recipe {
    /// Retrain `model` as it was made: its features and its threshold goal.
    pub fn of(model: &LoadedModel) -> Recipe {
        Recipe {
            features: Some(model.float.features().to_vec()),
            goal: model.file.training.threshold_goal,
            acting: None,
        }
    }

    /// What online learning trains while verdicts act and no starting model says
    /// otherwise: the queue as it stands at insert, a threshold for the misses.
    pub fn for_acting() -> Recipe {
        Recipe {
            features: Some(kml_learn::trainers::queue_features()),
            goal: ThresholdGoal::MissRecall(ACTING_MISS_RECALL),
            acting: None,
        }
    }

    /// How many requests `r`'s outcome stands for: 0 when the verdict acted on
    /// it (the boost made its outcome, not the queue), `2^shift` when the hook
    /// held it out (it stands for all the flagged requests like it), else 1.
    pub fn copies(&self, r: &RequestRecord) -> usize {
        match self.acting {
            Some(a) if a.policy.acted_on(r) => 0,
            Some(a) if r.sampling & Sampling::HELD_OUT != 0 => 1 << a.hold_out_shift,
            _ => 1,
        }
    }

    /// Live quality of the kernel's verdicts in a batch of records, each outcome
    /// counted [`Recipe::copies`] times: while verdicts act, a boosted request's
    /// outcome would count as a false alarm of the verdict that saved it.
    pub fn live_matrix(&self, records: &[RequestRecord]) -> ConfusionMatrix {
        ConfusionMatrix::from_pairs(
            self.live_verdicts(records)
                .map(|(at_risk, r)| (at_risk, r.deadline_missed())),
        )
    }

    /// The kernel's verdicts (at risk or not) on the records that have one, each
    /// repeated [`Recipe::copies`] times: what [`Recipe::live_matrix`] counts.
    pub fn live_verdicts<'a>(
        &'a self,
        records: &'a [RequestRecord],
    ) -> impl Iterator<Item = (bool, &'a RequestRecord)> + 'a {
        records
            .iter()
            .filter(|r| r.verdict != Verdict::NONE)
            .flat_map(|r| std::iter::repeat_n((r.verdict == Verdict::AT_RISK, r), self.copies(r)))
    }
}

/// A trained candidate and how both models did on the held-back part.
pub struct Candidate {
    pub model: QuantizedModel,
    pub candidate_ba: f64,
    pub active_ba: Option<f64>,
    pub held_back: usize,
    pub took: Duration,
    /// The held-back requests as the kernel's models see them (features with the
    /// recorded or replayed position) and their outcomes: to judge again against
    /// a model that started serving while the candidate trained.
    pub(crate) held_back_set: Vec<(FeatureVector, bool)>,
}

impl Candidate {
    /// The model serving now is not the one the candidate was judged against
    /// (live calibration moved its threshold during the training): judge again.
    pub fn judge_against(&mut self, active: &QuantizedModel) {
        self.active_ba = Some(balanced_accuracy_on(active, &self.held_back_set));
    }
}

/// Balanced accuracy of an integer model (the kernel's computation) on requests
/// as the kernel's models see them.
fn balanced_accuracy_on(model: &QuantizedModel, set: &[(FeatureVector, bool)]) -> f64 {
    ConfusionMatrix::from_pairs(
        set.iter()
            .map(|(x, missed)| (model.infer(x).at_risk, *missed)),
    )
    .balanced_accuracy()
}

/// Trains `kind` on the older 80% of `records` and scores it and `active` on the
/// newest 20% (what "recent held-back records" means here).
pub fn train_candidate(
    kind: ModelKind,
    mut records: Vec<RequestRecord>,
    active: Option<QuantizedModel>,
    kernel_positions: bool,
    recipe: &Recipe,
) -> anyhow::Result<Candidate> {
    let started = Instant::now();
    records.sort_by_key(|r| r.insert_ns);
    let cut = records.len() * 4 / 5;
    let held_back = records[cut..].to_vec();
    // Over the whole window: the held-back requests' queue holds older ones.
    let replayed = kml_learn::replay::replay_positions(&records, &Default::default());
    let replayed = &replayed[cut..];
    // Every request takes its place in the replayed queue; only then are the
    // outcomes weighed (while verdicts act: see `Recipe::copies`).
    let mut data = Dataset::from_records(records, "live window");
    let mut opts = TrainOptions::new(kind);
    opts.train_fraction = 0.8;
    if recipe.acting.is_some() {
        data = data.replicate(|r| recipe.copies(r));
        // Fit and tune on what came before the held-back part, as without weights.
        if let Some(first) = held_back.first() {
            let before = data
                .records()
                .partition_point(|r| r.insert_ns < first.insert_ns);
            opts.train_fraction = before as f64 / data.len().max(1) as f64;
        }
    }
    opts.compare_baseline = false;
    opts.threshold_goal = recipe.goal;
    opts.features = recipe.features.clone();
    if !kernel_positions {
        // Classic tracepoint mode keeps no position state (`ModelSlots::kernel_positions`).
        opts.features = Some(
            opts.features
                .unwrap_or_else(kml_learn::trainers::all_features)
                .into_iter()
                .filter(|f| !f.is_position())
                .collect(),
        );
    }
    let trained = kml_learn::train(&data, &opts, &Progress::new(true))?;
    // Each with the position the kernel recorded, else the replayed one: the
    // kernel records positions only while a model that reads them is active, so
    // a first position model is judged on replayed ones. Judged on the unbiased
    // records only: under ring pressure the kernel kept mostly those near the
    // serving model's boundary (training still learns from them all).
    let held_back_set: Vec<(FeatureVector, bool)> = held_back
        .iter()
        .zip(replayed)
        .filter(|(r, _)| r.unbiased_sample())
        .flat_map(|(r, p)| {
            let p = r.recorded_position().unwrap_or(*p);
            std::iter::repeat_n(
                (features_with_position(r, &p), r.deadline_missed()),
                recipe.copies(r),
            )
        })
        .collect();
    let candidate_ba = balanced_accuracy_on(&trained.quantized, &held_back_set);
    let active_ba = active
        .as_ref()
        .map(|m| balanced_accuracy_on(m, &held_back_set));
    Ok(Candidate {
        model: trained.quantized,
        candidate_ba,
        active_ba,
        held_back: held_back_set.len(),
        took: started.elapsed(),
        held_back_set,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::{
        features::NUM_FEATURES,
        model::{LinearModel, VerdictRule},
        ReqOp,
    };

    /// At risk when `dir_wait_log > limit`.
    fn threshold_model(limit: i64) -> QuantizedModel {
        let mut m = LinearModel::zeroed();
        m.rule = VerdictRule::ScoreOverThreshold as u32;
        m.weight[Feature::DirWaitLog as usize] = 1;
        m.input_max[Feature::DirWaitLog as usize] = 4096;
        m.threshold = limit;
        QuantizedModel::Linear(Box::new(m))
    }

    /// A read the serving model flagged when `queued >= 32`, in a window where
    /// reads with 32 or more queued always miss unhelped, half of those with
    /// 24..32 miss and the rest meet. The policy boosted what it flagged (met)
    /// but held out one in 16 (`HELD_OUT`, its true outcome).
    fn acted_window(n: u64) -> Vec<RequestRecord> {
        (0..n)
            .map(|i| {
                let q = (i * 7919 % 64) as u32;
                let flagged = q >= 32;
                let held_out = flagged && i % 16 == 0;
                let unhelped_miss = q >= 32 || (q >= 24 && i % 2 == 0);
                let missed = if flagged && !held_out {
                    false
                } else {
                    unhelped_miss
                };
                let insert = 1_000_000 + i * 1000;
                RequestRecord {
                    insert_ns: insert,
                    issue_ns: insert + if missed { 200_000 } else { 10_000 },
                    complete_ns: insert + 210_000,
                    deadline_ns: insert + 100_000,
                    op: ReqOp::Read as u8,
                    queued_read: q,
                    verdict: if flagged {
                        Verdict::AT_RISK
                    } else {
                        Verdict::MEETS
                    },
                    sampling: if held_out { Sampling::HELD_OUT } else { 0 },
                    ..RequestRecord::default()
                }
            })
            .collect()
    }

    fn queued(q: i32) -> FeatureVector {
        let mut x = [0; NUM_FEATURES];
        x[Feature::QueuedSameDir as usize] = q;
        x
    }

    #[test]
    fn a_recipe_leaves_out_what_the_verdicts_acted_on_and_weighs_the_held_out() {
        let acting = Recipe {
            acting: Some(Acting {
                policy: Policy::ModelReads,
                hold_out_shift: 4,
            }),
            ..Recipe::default()
        };
        let window = acted_window(64 * 16);
        let boosted = window
            .iter()
            .filter(|r| r.verdict == Verdict::AT_RISK && r.sampling == 0)
            .count();
        let held_out = window.iter().filter(|r| r.sampling != 0).count();
        assert!(boosted > 0 && held_out > 0);
        let shadow = Recipe::default().live_matrix(&window);
        let live = acting.live_matrix(&window);
        assert_eq!(shadow.total() as usize, window.len());
        assert_eq!(
            live.total() as usize,
            window.len() - boosted - held_out + 16 * held_out
        );
        // Counted as is, the verdicts' own boosts are false alarms; weighed, the
        // flagged requests miss as they would have unhelped.
        assert_eq!(live.false_miss, 0);
        assert!(shadow.false_miss as usize == boosted);
        assert!(live.balanced_accuracy() > shadow.balanced_accuracy());
    }

    #[test]
    fn while_verdicts_act_a_candidate_still_flags_what_they_saved() {
        let window = acted_window(16_000);
        let features = Some(vec![Feature::QueuedSameDir, Feature::WriteDir]);
        let acting = Recipe {
            features: features.clone(),
            goal: ThresholdGoal::Balanced,
            acting: Some(Acting {
                policy: Policy::ModelReads,
                hold_out_shift: 4,
            }),
        };
        let naive = Recipe {
            features,
            ..Recipe::default()
        };
        let c = train_candidate(ModelKind::Tree, window.clone(), None, true, &acting).unwrap();
        let flags = |m: &QuantizedModel, q: i32| m.infer(&queued(q)).at_risk;
        assert!(flags(&c.model, 50), "the boosted region is still at risk");
        assert!(!flags(&c.model, 10));
        assert!(c.candidate_ba > 0.9, "{}", c.candidate_ba);
        // Taken as they came, the boosted reads' outcomes teach that what the
        // verdict flagged is safe: the candidate would stop flagging it.
        let n = train_candidate(ModelKind::Tree, window, None, true, &naive).unwrap();
        assert!(flags(&n.model, 28));
        assert!(
            !flags(&n.model, 50),
            "without the recipe the boosts look safe"
        );
    }

    #[test]
    fn a_candidate_is_judged_again_against_the_model_serving_now() {
        let x = |v: i32| {
            let mut x = [0; NUM_FEATURES];
            x[Feature::DirWaitLog as usize] = v;
            x
        };
        // Misses at 300, met deadlines at 100.
        let set: Vec<(FeatureVector, bool)> = (0..50)
            .map(|_| (x(300), true))
            .chain((0..50).map(|_| (x(100), false)))
            .collect();
        let mut c = Candidate {
            model: threshold_model(200),
            candidate_ba: balanced_accuracy_on(&threshold_model(200), &set),
            // Judged when training began against a model that flagged nothing.
            active_ba: Some(balanced_accuracy_on(&threshold_model(1000), &set)),
            held_back: set.len(),
            took: Duration::ZERO,
            held_back_set: set,
        };
        assert_eq!((c.candidate_ba, c.active_ba), (1.0, Some(0.5)));
        // Calibration moved the serving model's threshold meanwhile: it now
        // separates as well as the candidate.
        c.judge_against(&threshold_model(250));
        assert_eq!(c.active_ba, Some(1.0));
    }
}
