//! The trainers, linfa style: a `…Params` value describes the training, `fit` turns a
//! training window into a fitted float model.
//!
//! Each `fit` takes two time-ordered windows: `train` (the parameters are learned on
//! it) and `tune` (a later window the verdict threshold is chosen on, to maximise
//! balanced accuracy: misses are rare, and a 0.5 probability or "delay > budget"
//! cut-off is rarely the best one). An empty `tune` window keeps the default
//! threshold (0 on the log-odds or the delay margin).

use kml_ebpf_common::{
    features::{Feature, KML_BASELINE_FEATURES},
    model::{ModelKind, TREE_MAX_DEPTH, TREE_MAX_NODES},
};
use linfa::{traits::Fit, DatasetBase};
use linfa_linear::LinearRegression;
use linfa_logistic::LogisticRegression;
use linfa_trees::{DecisionTree, SplitQuality, TreeNode};
use ndarray::{Array1, Array2};

use crate::{
    dataset::Dataset,
    error::{LearnError, Result},
    float_model::{FeatureScaling, FloatLinearModel, FloatTreeModel, FloatTreeNode},
    metrics::ThresholdGoal,
    progress::Progress,
};

/// Every feature the kernel computes, in vector order (the position features
/// once kml-ebpf keeps their state: [`Feature::in_kernel`]).
pub fn all_features() -> Vec<Feature> {
    Feature::ALL.into_iter().filter(|f| f.in_kernel()).collect()
}

/// The features of models meant for workloads they were not trained on (the
/// shipped defaults, `--features portable`): the ones that earned their place on
/// the leave-one-workload-out evaluation (docs/learning.md). Left out: the queue
/// lengths and the dispatch gap (their absolute values depend on the workload's
/// queue depth: models that split on them do better on later I/O of the same
/// workload and worse on other workloads) and KML's sector and op (no gain).
pub const PORTABLE_FEATURES: [Feature; 9] = [
    Feature::WriteDir,
    Feature::DirWaitLog,
    Feature::ExpectedWaitLog,
    Feature::DirWaitUs,
    Feature::ExpectedWaitUs,
    Feature::DeadlineBudgetUs,
    Feature::IssueDistanceLog2,
    Feature::MissShareSame,
    Feature::MissShareOther,
];

/// The features of the shipped position tree (`--features scale-free`): those whose
/// values do not grow with the workload's queue depth or its expiries. The
/// direction, the waits and ages as log ratios to the deadline budget (the FIFO
/// head's, the oldest within a batch's reach below, and the lead of that one over
/// this request's deadline), the miss shares, the issue distance's bit length, and
/// the position state's counts as shares of the queue. Left out of
/// `portable+position`: the waits and the budget in µs, and the counts of queued
/// requests themselves (`older_half`, `expired`, `due_below`, `recent`,
/// `due_count`), which grow with the depth: a tree that splits on them at the
/// training workloads' depths calls a deeper queue's requests wholesale
/// (docs/learning.md, "Counts that grow with the depth", session 27).
pub const SCALE_FREE_FEATURES: [Feature; 12] = [
    Feature::WriteDir,
    Feature::DirWaitLog,
    Feature::ExpectedWaitLog,
    Feature::IssueDistanceLog2,
    Feature::MissShareSame,
    Feature::MissShareOther,
    Feature::HeadAgeLog,
    Feature::BelowAgeLog,
    Feature::LeadLog,
    Feature::OlderHalfShare,
    Feature::ExpiredShare,
    Feature::DueCountShare,
];

/// The features of a model whose verdicts act (`--features queue`): the queue as
/// it stands at insert, nothing that averages past outcomes. The averages of
/// recent waits and misses (`dir_wait_*`, `miss_share_*`) measure the policy in
/// charge: a verdict's own boosts shrink them, and a model that reads them flags
/// fewer requests once it acts (measured in the VM: 491 reads flagged on a stock
/// trace, 94 on a trace of the fixed rule at work; docs/learning.md, part 4).
pub fn queue_features() -> Vec<Feature> {
    all_features()
        .into_iter()
        .filter(|f| {
            !matches!(
                f,
                // KML's two (no gain), and the averages of past waits and misses.
                Feature::SectorMib
                    | Feature::Op
                    | Feature::DirWaitUs
                    | Feature::DirWaitLog
                    | Feature::MissShareSame
                    | Feature::MissShareOther
                    // Not measured where verdicts act (the VM, its own HZ): the
                    // set stays the one `vm-act` was made with.
                    | Feature::TickPhaseUs
                    | Feature::OlderHalfShare
                    | Feature::ExpiredShare
                    | Feature::DueCountShare
            )
        })
        .collect()
}

/// The names [`named_features`] knows.
pub const FEATURE_SET_NAMES: [&str; 6] = [
    "all",
    "portable",
    "queue",
    "portable+position",
    "portable+position+tick",
    "scale-free",
];

/// A named feature set (`--features NAME`): `all`, `portable`, `queue`,
/// `portable+position` (the shipped `logistic-position`'s), `portable+position+tick`
/// (and the insert's phase in its jiffy), `scale-free` (the shipped
/// `tree-position`'s). None for any other name.
pub fn named_features(name: &str) -> Option<Vec<Feature>> {
    let portable_and = |more: &[Feature]| -> Vec<Feature> {
        PORTABLE_FEATURES
            .iter()
            .chain(&Feature::POSITION)
            .chain(more)
            .copied()
            .collect()
    };
    Some(match name.trim() {
        "all" => all_features(),
        "portable" => PORTABLE_FEATURES.to_vec(),
        "queue" => queue_features(),
        "portable+position" => portable_and(&[]),
        "portable+position+tick" => portable_and(&[Feature::TickPhaseUs]),
        "scale-free" => SCALE_FREE_FEATURES.to_vec(),
        _ => return None,
    })
}

fn need_data(what: &str, train: &Dataset, min: usize) -> Result<()> {
    if train.len() < min {
        return Err(LearnError::NotEnoughData {
            what: what.into(),
            message: format!(
                "{} requests in the training window, need at least {min}",
                train.len()
            ),
        });
    }
    Ok(())
}

/// Learns each feature's scaling on `train`.
fn fit_scaling(train: &Dataset, features: &[Feature]) -> Vec<FeatureScaling> {
    features
        .iter()
        .map(|&f| FeatureScaling::fit(&train.column(f)))
        .collect()
}

/// Clipped, standardised design matrix, column-major: the solvers' products run
/// down whole columns (`Xᵀv`), which is several times faster in this layout.
fn standardized(data: &Dataset, features: &[Feature], scaling: &[FeatureScaling]) -> Array2<f64> {
    use ndarray::ShapeBuilder;
    let x = data.features();
    Array2::from_shape_fn((data.len(), features.len()).f(), |(i, j)| {
        scaling[j].standardize(x[i][features[j].index()])
    })
}

/// Threshold on `margin` that meets `goal` on `tune` (0 if empty).
fn tuned_threshold(
    tune: &Dataset,
    goal: ThresholdGoal,
    margin: impl Fn(&kml_ebpf_common::features::FeatureVector) -> f64,
) -> f64 {
    if tune.is_empty() {
        return 0.0;
    }
    let scores: Vec<f64> = tune.features().iter().map(margin).collect();
    let labels: Vec<bool> = tune.missed().collect();
    goal.threshold(&scores, &labels)
}

/// Linear regression of the dispatch delay (linfa-linear, least squares); verdict:
/// predicted delay > time left to the deadline (+ a tuned threshold).
#[derive(Clone, Debug, PartialEq)]
pub struct DelayRegressionParams {
    kind: ModelKind,
    features: Vec<Feature>,
    tune_threshold: bool,
    goal: ThresholdGoal,
}

impl DelayRegressionParams {
    /// KML's baseline: its two features, and the plain "predicted delay > budget"
    /// verdict (no threshold tuning), as KML decided.
    pub fn kml_baseline() -> Self {
        DelayRegressionParams {
            kind: ModelKind::Baseline,
            features: KML_BASELINE_FEATURES.to_vec(),
            tune_threshold: false,
            goal: ThresholdGoal::Balanced,
        }
    }

    /// Linear regression on `features`, threshold tuned.
    pub fn new(features: Vec<Feature>) -> Self {
        DelayRegressionParams {
            kind: ModelKind::LinearRegression,
            features,
            tune_threshold: true,
            goal: ThresholdGoal::Balanced,
        }
    }

    pub fn tune_threshold(mut self, tune: bool) -> Self {
        self.tune_threshold = tune;
        self
    }

    /// What the tuned threshold aims at (balanced accuracy unless told).
    pub fn threshold_goal(mut self, goal: ThresholdGoal) -> Self {
        self.goal = goal;
        self
    }

    pub fn fit(
        &self,
        train: &Dataset,
        tune: &Dataset,
        progress: &Progress,
    ) -> Result<FloatLinearModel> {
        need_data("linear regression", train, self.features.len() + 2)?;
        let scaling = fit_scaling(train, &self.features);
        let x = standardized(train, &self.features, &scaling);
        let y: Array1<f64> = train.delays_us().collect();
        progress.step(format_args!(
            "least squares on {} requests x {} features",
            train.len(),
            self.features.len()
        ));
        let (weights, intercept) = ridge_least_squares(&x, &y, RIDGE * train.len() as f64)?;
        let mut model = FloatLinearModel {
            kind: self.kind,
            features: self.features.clone(),
            scaling,
            weights,
            intercept,
            threshold: 0.0,
        };
        if self.tune_threshold {
            model.threshold = tuned_threshold(tune, self.goal, |x| model.margin(x));
        }
        Ok(model)
    }
}

/// Ridge penalty per training request. Tiny (weights shrink by about 1e-6), but it
/// keeps least squares solvable when a feature is constant in the window (ioprio on
/// most workloads) or two are collinear (`op` and `write_dir` on reads and writes).
const RIDGE: f64 = 1e-6;

/// Ridge least squares `min |X w + b - y|² + λ|w|²` (intercept `b` unpenalised),
/// solved by linfa-linear on an equivalent small system.
///
/// Householder QR of a million-row matrix takes seconds; instead one pass forms the
/// Gram matrix `G = AᵀA + λI'` of `A = [X 1]` and `Aᵀy` (a matrix product), factors
/// `G = RᵀR` (Cholesky, 17x17), and hands `R w = R⁻ᵀ Aᵀ y` to linfa-linear:
/// `|A w - y|² + λ|w|² = |R w - z|² + const`, so both have the same minimiser.
/// Returns (weights, intercept).
fn ridge_least_squares(x: &Array2<f64>, y: &Array1<f64>, lambda: f64) -> Result<(Vec<f64>, f64)> {
    let (n, p) = x.dim();
    let fail = |message: String| LearnError::Fit {
        trainer: "linear regression",
        message,
    };
    // G = [XᵀX Xᵀ1; 1ᵀX n] + λ on the feature diagonal.
    let mut g = Array2::zeros((p + 1, p + 1));
    g.slice_mut(ndarray::s![..p, ..p]).assign(&x.t().dot(x));
    let col_sums = x.sum_axis(ndarray::Axis(0));
    g.slice_mut(ndarray::s![..p, p]).assign(&col_sums);
    g.slice_mut(ndarray::s![p, ..p]).assign(&col_sums);
    g[(p, p)] = n as f64;
    for j in 0..p {
        g[(j, j)] += lambda.max(RIDGE);
    }
    let mut aty = Array1::zeros(p + 1);
    aty.slice_mut(ndarray::s![..p]).assign(&x.t().dot(y));
    aty[p] = y.sum();
    // Cholesky G = RᵀR, R upper triangular.
    let m = p + 1;
    let mut r = Array2::<f64>::zeros((m, m));
    for i in 0..m {
        for j in i..m {
            let dot: f64 = (0..i).map(|k| r[(k, i)] * r[(k, j)]).sum();
            if i == j {
                let d = g[(i, i)] - dot;
                if d <= 0.0 || !d.is_finite() {
                    return Err(fail(format!(
                        "Gram matrix not positive definite at column {i}"
                    )));
                }
                r[(i, i)] = d.sqrt();
            } else {
                r[(i, j)] = (g[(i, j)] - dot) / r[(i, i)];
            }
        }
    }
    // z = R⁻ᵀ Aᵀy by forward substitution.
    let mut z = Array1::<f64>::zeros(m);
    for i in 0..m {
        let dot: f64 = (0..i).map(|k| r[(k, i)] * z[k]).sum();
        z[i] = (aty[i] - dot) / r[(i, i)];
    }
    let fitted = LinearRegression::new()
        .with_intercept(false)
        .fit(&DatasetBase::new(r, z))
        .map_err(|e| fail(e.to_string()))?;
    let w = fitted.params();
    Ok((w.slice(ndarray::s![..p]).to_vec(), w[p]))
}

/// L-BFGS stops when the mean per-request gradient is below this.
const GRADIENT_TOLERANCE: f64 = 1e-5;

/// Logistic regression of the miss class (linfa-logistic, L-BFGS), threshold tuned
/// on the log-odds for rare misses.
#[derive(Clone, Debug, PartialEq)]
pub struct LogisticParams {
    features: Vec<Feature>,
    alpha: f64,
    max_iterations: u64,
    tune_threshold: bool,
    goal: ThresholdGoal,
}

impl LogisticParams {
    pub fn new(features: Vec<Feature>) -> Self {
        LogisticParams {
            features,
            alpha: 1e-3,
            max_iterations: 5,
            tune_threshold: true,
            goal: ThresholdGoal::Balanced,
        }
    }

    /// L2 penalty weight.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    pub fn max_iterations(mut self, n: u64) -> Self {
        self.max_iterations = n;
        self
    }

    pub fn tune_threshold(mut self, tune: bool) -> Self {
        self.tune_threshold = tune;
        self
    }

    /// What the tuned threshold aims at (balanced accuracy unless told).
    pub fn threshold_goal(mut self, goal: ThresholdGoal) -> Self {
        self.goal = goal;
        self
    }

    pub fn fit(
        &self,
        train: &Dataset,
        tune: &Dataset,
        progress: &Progress,
    ) -> Result<FloatLinearModel> {
        need_data("logistic regression", train, self.features.len() + 2)?;
        let misses = train.misses();
        if misses == 0 || misses == train.len() {
            return Err(LearnError::NotEnoughData {
                what: "logistic regression".into(),
                message: format!(
                    "the training window has {misses} misses in {} requests: need both classes",
                    train.len()
                ),
            });
        }
        let scaling = fit_scaling(train, &self.features);
        let x = standardized(train, &self.features, &scaling);
        let y: Array1<bool> = train.missed().collect();
        // Warm start from the linear probability model (least squares on 0/1
        // labels): near the base rate π a logistic slope is the linear one divided by
        // π(1-π). L-BFGS then needs a few dozen iterations, not hundreds.
        let base_rate = misses as f64 / train.len() as f64;
        let labels01: Array1<f64> = y.mapv(|m| m as u8 as f64);
        let (w0, b0) = ridge_least_squares(&x, &labels01, RIDGE * train.len() as f64)?;
        let spread = base_rate * (1.0 - base_rate);
        let mut init: Array1<f64> = w0.iter().map(|w| w / spread).collect();
        let b0 = (base_rate / (1.0 - base_rate)).ln() + (b0 - base_rate) / spread;
        init = ndarray::concatenate![ndarray::Axis(0), init, ndarray::array![b0]];
        // linfa models its larger class as the positive one.
        if 2 * misses < train.len() {
            init.mapv_inplace(|v| -v);
        }
        progress.step(format_args!(
            "L-BFGS on {} requests x {} features (at most {} iterations)",
            train.len(),
            self.features.len(),
            self.max_iterations
        ));
        // The loss is a sum over requests: the gradient tolerance scales with them.
        let fitted = LogisticRegression::default()
            .alpha(self.alpha)
            .max_iterations(self.max_iterations)
            .gradient_tolerance(GRADIENT_TOLERANCE * train.len() as f64)
            .initial_params(init)
            .fit(&DatasetBase::new(x, y))
            .map_err(|e| LearnError::Fit {
                trainer: "logistic regression",
                message: e.to_string(),
            })?;
        // linfa models the probability of its "positive" class, whichever label that
        // is: turn it into the log-odds of a miss.
        let sign = if fitted.labels().pos.class { 1.0 } else { -1.0 };
        let mut model = FloatLinearModel {
            kind: ModelKind::Logistic,
            features: self.features.clone(),
            scaling,
            weights: fitted.params().iter().map(|w| sign * w).collect(),
            intercept: sign * fitted.intercept(),
            threshold: 0.0,
        };
        if self.tune_threshold {
            model.threshold = tuned_threshold(tune, self.goal, |x| model.margin(x));
        }
        Ok(model)
    }
}

/// A decision tree of the miss class (linfa-trees, Gini, classes weighted to
/// balance), exported as flat arrays; each node's miss probability is then measured
/// on the whole training window and the probability threshold tuned.
#[derive(Clone, Debug, PartialEq)]
pub struct TreeParams {
    features: Vec<Feature>,
    max_depth: usize,
    min_samples_leaf: usize,
    max_samples: usize,
    tune_threshold: bool,
    goal: ThresholdGoal,
}

impl TreeParams {
    pub fn new(features: Vec<Feature>) -> Self {
        TreeParams {
            features,
            max_depth: 6,
            min_samples_leaf: 50,
            max_samples: 50_000,
            tune_threshold: true,
            goal: ThresholdGoal::Balanced,
        }
    }

    /// At most [`TREE_MAX_DEPTH`]: the kernel walks a bounded number of steps.
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth;
        self
    }

    pub fn min_samples_leaf(mut self, n: usize) -> Self {
        self.min_samples_leaf = n;
        self
    }

    /// linfa-trees rescans every training row at every node: trees are grown on at
    /// most this many requests (evenly spaced over the window), then their leaf
    /// probabilities measured on all of it.
    pub fn max_samples(mut self, n: usize) -> Self {
        self.max_samples = n;
        self
    }

    pub fn tune_threshold(mut self, tune: bool) -> Self {
        self.tune_threshold = tune;
        self
    }

    /// What the tuned threshold aims at (balanced accuracy unless told).
    pub fn threshold_goal(mut self, goal: ThresholdGoal) -> Self {
        self.goal = goal;
        self
    }

    pub fn fit(
        &self,
        train: &Dataset,
        tune: &Dataset,
        progress: &Progress,
    ) -> Result<FloatTreeModel> {
        if self.max_depth == 0 || self.max_depth > TREE_MAX_DEPTH {
            return Err(LearnError::Fit {
                trainer: "decision tree",
                message: format!(
                    "max depth {} is not in 1..={TREE_MAX_DEPTH}",
                    self.max_depth
                ),
            });
        }
        need_data("decision tree", train, 2 * self.min_samples_leaf.max(1))?;
        let sample = train.every_nth(train.len().div_ceil(self.max_samples.max(1)));
        let misses = sample.misses();
        if misses == 0 || misses == sample.len() {
            return Err(LearnError::NotEnoughData {
                what: "decision tree".into(),
                message: format!(
                    "the training sample has {misses} misses in {} requests: need both classes",
                    sample.len()
                ),
            });
        }
        // Balanced class weights: each class carries half the total weight.
        let n = sample.len() as f32;
        let (w_miss, w_met) = (
            n / (2.0 * misses as f32),
            n / (2.0 * (sample.len() - misses) as f32),
        );
        let labels: Array1<bool> = sample.missed().collect();
        let weights: Array1<f32> = labels
            .iter()
            .map(|&m| if m { w_miss } else { w_met })
            .collect();
        let data =
            DatasetBase::new(sample.raw_matrix(&self.features), labels).with_weights(weights);
        progress.step(format_args!(
            "growing a tree of depth <= {} on {} requests x {} features",
            self.max_depth,
            sample.len(),
            self.features.len()
        ));
        let params = DecisionTree::params()
            .split_quality(SplitQuality::Gini)
            .max_depth(Some(self.max_depth))
            .min_weight_split(2.0 * self.min_samples_leaf as f32)
            .min_weight_leaf(self.min_samples_leaf as f32);
        // linfa-trees 0.8.1 can panic inside its Gini computation (an assertion on
        // a child's f32 weight sum, seen on a 200k-request sample of a real trace):
        // a failed fit, not a crash of the agent.
        let fitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| params.fit(&data)))
            .map_err(|_| LearnError::Fit {
                trainer: "decision tree",
                message:
                    "linfa-trees panicked while growing the tree (try another --tree-max-samples)"
                        .into(),
            })?
            .map_err(|e| LearnError::Fit {
                trainer: "decision tree",
                message: e.to_string(),
            })?;

        let mut nodes = Vec::new();
        export_node(fitted.root_node(), &self.features, &mut nodes)?;
        let mut model = FloatTreeModel {
            features: self.features.clone(),
            nodes,
            threshold: 0.5,
        };
        progress.step(format_args!(
            "tree has {} nodes, depth {}; measuring leaf miss rates on {} requests",
            model.nodes.len(),
            model.depth(),
            train.len()
        ));
        measure_node_probabilities(&mut model, train);
        if self.tune_threshold && !tune.is_empty() {
            model.threshold = tuned_threshold(tune, self.goal, |x| model.p_miss(x));
        }
        Ok(model)
    }
}

/// Appends `node` and its subtree in pre-order (children after their parent).
fn export_node(
    node: &TreeNode<f64, bool>,
    features: &[Feature],
    out: &mut Vec<FloatTreeNode>,
) -> Result<usize> {
    let index = out.len();
    if index >= TREE_MAX_NODES {
        return Err(LearnError::Fit {
            trainer: "decision tree",
            message: format!("more than {TREE_MAX_NODES} nodes"),
        });
    }
    out.push(FloatTreeNode {
        feature: None,
        split: 0.0,
        left: 0,
        right: 0,
        p_miss: 0.0,
        samples: 0,
    });
    let children = node.children();
    if let (false, [Some(left), Some(right)]) = (node.is_leaf(), children.as_slice()) {
        let (column, split, _) = node.split();
        let left = export_node(left, features, out)?;
        let right = export_node(right, features, out)?;
        out[index] = FloatTreeNode {
            feature: Some(features[column]),
            split,
            left,
            right,
            p_miss: 0.0,
            samples: 0,
        };
    }
    Ok(index)
}

/// Sets every node's miss probability to the share of `data`'s requests reaching it
/// that missed (Laplace-smoothed towards the parent for nodes few requests reach).
pub fn measure_node_probabilities(tree: &mut FloatTreeModel, data: &Dataset) {
    let n = tree.nodes.len();
    let (mut reached, mut missed) = (vec![0u64; n], vec![0u64; n]);
    for (x, m) in data.features().iter().zip(data.missed()) {
        let mut i = 0;
        loop {
            reached[i] += 1;
            missed[i] += m as u64;
            let node = &tree.nodes[i];
            match node.feature {
                None => break,
                Some(f) => {
                    i = if (x[f.index()] as f64) <= node.split {
                        node.left
                    } else {
                        node.right
                    }
                }
            }
        }
    }
    // Pre-order: a parent's probability is known before its children's.
    const PRIOR_WEIGHT: f64 = 10.0;
    let overall = if reached[0] > 0 {
        missed[0] as f64 / reached[0] as f64
    } else {
        0.0
    };
    let mut p = vec![overall; n];
    for i in 0..n {
        let prior = p[i];
        p[i] = (missed[i] as f64 + PRIOR_WEIGHT * prior) / (reached[i] as f64 + PRIOR_WEIGHT);
        tree.nodes[i].p_miss = p[i];
        tree.nodes[i].samples = reached[i];
        if let Some(_f) = tree.nodes[i].feature {
            let (l, r) = (tree.nodes[i].left, tree.nodes[i].right);
            p[l] = p[i];
            p[r] = p[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{metrics::ConfusionMatrix, synthetic::SyntheticTrace, RegressionMetrics};

    fn data() -> (Dataset, Dataset) {
        let d = Dataset::from_records(SyntheticTrace::new(7).records(6000), "synthetic");
        let (train, rest) = d.split_by_time(0.6);
        (train, rest)
    }

    #[test]
    fn regression_learns_queue_delay() {
        let (train, tune) = data();
        let m = DelayRegressionParams::new(all_features())
            .fit(&train, &tune, &Progress::silent())
            .unwrap();
        // The synthetic delay is mostly queueing: the load features explain much of it.
        let r2 = RegressionMetrics::from_pairs(
            tune.features()
                .iter()
                .map(|x| m.score(x))
                .zip(tune.delays_us()),
        )
        .r2;
        assert!(r2 > 0.3, "r2 {r2}");
        // The collinear pair op / write_dir shares one weight, without a singular
        // matrix.
        let w = |f: Feature| m.weights[m.features.iter().position(|&g| g == f).unwrap()];
        assert!((w(Feature::Op) - w(Feature::WriteDir)).abs() < 1e-6);
        // A constant feature (write_dir on reads only) gets no weight.
        let reads = |d: &Dataset| {
            let recs = d
                .records()
                .iter()
                .filter(|r| r.op == kml_ebpf_common::op::ReqOp::Read as u8)
                .copied()
                .collect();
            Dataset::from_records(recs, "reads")
        };
        let m = DelayRegressionParams::new(all_features())
            .fit(&reads(&train), &reads(&tune), &Progress::silent())
            .unwrap();
        let w = |f: Feature| m.weights[m.features.iter().position(|&g| g == f).unwrap()];
        assert!(w(Feature::WriteDir).abs() < 1e-6);

        let base = DelayRegressionParams::kml_baseline()
            .fit(&train, &tune, &Progress::silent())
            .unwrap();
        assert_eq!(base.features, KML_BASELINE_FEATURES);
        assert_eq!(base.threshold, 0.0);
    }

    #[test]
    fn every_set_name_resolves_and_no_other() {
        for name in FEATURE_SET_NAMES {
            let set = named_features(name).unwrap_or_else(|| panic!("{name}"));
            assert!(!set.is_empty(), "{name}");
        }
        assert!(named_features("scale free").is_none());
        assert!(named_features("lead_log").is_none());
    }

    /// What makes the set scale-free, along the time axis: the same queue, with
    /// every wait, gap and the expiry twice as long, gives the same values. The
    /// features it leaves out in µs do not.
    #[test]
    fn scale_free_features_do_not_move_with_the_time_scale() {
        use kml_ebpf_common::features::features_of_record;
        let mut compared = 0;
        let mut absolute_moved = 0;
        for r in SyntheticTrace::new(11).records(3000) {
            // A zero wait has no scale (it sits at the log scale's floor): neither
            // has an empty queue's expected wait.
            let queued = r.queued_read.min(r.queued_write);
            if r.dir_wait_ewma_ns == 0
                || r.issue_gap_ewma_ns == 0
                || queued == 0
                || r.deadline_ns <= r.insert_ns
            {
                continue;
            }
            let mut slow = r;
            slow.deadline_ns = r.insert_ns + 2 * (r.deadline_ns - r.insert_ns);
            slow.dir_wait_ewma_ns = 2 * r.dir_wait_ewma_ns;
            slow.issue_gap_ewma_ns = 2 * r.issue_gap_ewma_ns;
            let (a, b) = (features_of_record(&r), features_of_record(&slow));
            for f in SCALE_FREE_FEATURES {
                assert_eq!(a[f.index()], b[f.index()], "{}: {r:?}", f.name());
            }
            for f in [Feature::DirWaitUs, Feature::DeadlineBudgetUs] {
                absolute_moved += usize::from(a[f.index()] != b[f.index()]);
            }
            compared += 1;
        }
        assert!(compared > 1000, "{compared} records compared");
        assert!(absolute_moved >= compared, "{absolute_moved} of {compared}");
        // And it holds no count of queued requests.
        for f in [
            Feature::QueuedSameDir,
            Feature::OlderHalf,
            Feature::Expired,
            Feature::DueBelow,
            Feature::Recent,
            Feature::DueCount,
        ] {
            assert!(!SCALE_FREE_FEATURES.contains(&f), "{}", f.name());
        }
    }

    #[test]
    fn logistic_separates_misses() {
        let (train, tune) = data();
        let m = LogisticParams::new(all_features())
            .fit(&train, &tune, &Progress::silent())
            .unwrap();
        let cm = ConfusionMatrix::from_pairs(
            tune.features()
                .iter()
                .map(|x| m.at_risk(x))
                .zip(tune.missed()),
        );
        assert!(cm.balanced_accuracy() > 0.75, "{cm:?}");
    }

    #[test]
    fn tree_exports_in_preorder_within_bounds() {
        let (train, tune) = data();
        let t = TreeParams::new(all_features())
            .max_depth(4)
            .fit(&train, &tune, &Progress::silent())
            .unwrap();
        assert!(t.nodes.len() > 1 && t.depth() <= 4);
        for (i, n) in t.nodes.iter().enumerate() {
            if n.feature.is_some() {
                assert!(n.left > i && n.right > i);
            }
            assert!((0.0..=1.0).contains(&n.p_miss));
        }
        assert_eq!(t.nodes[0].samples, train.len() as u64);
        assert!(TreeParams::new(all_features())
            .max_depth(9)
            .fit(&train, &tune, &Progress::silent())
            .is_err());
    }
}
