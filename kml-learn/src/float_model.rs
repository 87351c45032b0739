//! The float (f64) forms of the models, as trained on the host. Each is the "float
//! twin" of an integer model in `kml_ebpf_common::model`: it reads the same integer
//! feature vector and applies the same clipping, so the two differ only by
//! quantisation.

use kml_ebpf_common::{
    features::{Feature, FeatureVector, BUDGET_MAX},
    model::{ModelKind, VerdictRule},
};
use serde::{Deserialize, Serialize};

/// Scaling of one feature, learned on training data: clip to `[clip_min, clip_max]`
/// (robust quantiles of the training values), then standardise.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureScaling {
    pub clip_min: i32,
    pub clip_max: i32,
    pub mean: f64,
    /// Never 0 (a constant feature gets 1).
    pub std: f64,
}

/// Share of training values clipped off at each end.
const CLIP_QUANTILE: f64 = 0.001;

impl FeatureScaling {
    /// Learns the scaling from training values.
    pub fn fit(values: &[i32]) -> FeatureScaling {
        if values.is_empty() {
            return FeatureScaling {
                clip_min: 0,
                clip_max: 0,
                mean: 0.0,
                std: 1.0,
            };
        }
        // Two order statistics: selection, not a full sort (1M values per feature).
        let mut scratch = values.to_vec();
        let last = scratch.len() - 1;
        let mut at = |q: f64| {
            *scratch
                .select_nth_unstable(((q * last as f64).round() as usize).min(last))
                .1
        };
        let (mut lo, mut hi) = (at(CLIP_QUANTILE), at(1.0 - CLIP_QUANTILE));
        if lo == hi {
            // A rare value (a flag set on 0.05% of requests) must not be clipped away.
            let (min, max) = values
                .iter()
                .fold((i32::MAX, i32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            (lo, hi) = (min, max);
        }
        let n = values.len() as f64;
        let clipped = || values.iter().map(|&v| v.clamp(lo, hi) as f64);
        let mean = clipped().sum::<f64>() / n;
        let var = clipped().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let std = if var > 0.0 { var.sqrt() } else { 1.0 };
        FeatureScaling {
            clip_min: lo,
            clip_max: hi,
            mean,
            std,
        }
    }

    pub fn clip(&self, x: i32) -> i32 {
        x.clamp(self.clip_min, self.clip_max)
    }

    pub fn standardize(&self, x: i32) -> f64 {
        (self.clip(x) as f64 - self.mean) / self.std
    }
}

/// A linear model in f64: baseline and linear regression (score: predicted dispatch
/// delay, "µs") or logistic regression (score: log-odds of a miss).
#[derive(Clone, Debug, PartialEq)]
pub struct FloatLinearModel {
    pub kind: ModelKind,
    pub features: Vec<Feature>,
    pub scaling: Vec<FeatureScaling>,
    /// Per standardised feature.
    pub weights: Vec<f64>,
    pub intercept: f64,
    /// Verdict threshold in score units; for the regressions, on the margin
    /// `predicted delay - deadline budget`.
    pub threshold: f64,
}

impl FloatLinearModel {
    pub fn score(&self, x: &FeatureVector) -> f64 {
        let mut acc = self.intercept;
        for ((f, s), w) in self.features.iter().zip(&self.scaling).zip(&self.weights) {
            acc += w * s.standardize(x[f.index()]);
        }
        acc
    }

    /// The verdict: `score > threshold`, or for a regression
    /// `predicted delay > deadline budget + threshold`.
    pub fn at_risk(&self, x: &FeatureVector) -> bool {
        self.margin(x) > self.threshold
    }

    /// What the threshold is compared with.
    pub fn margin(&self, x: &FeatureVector) -> f64 {
        match self.kind.verdict_rule() {
            VerdictRule::DelayOverBudget => {
                // Clipped as the kernel clips it.
                self.score(x) - x[Feature::DeadlineBudgetUs.index()].clamp(0, BUDGET_MAX) as f64
            }
            VerdictRule::ScoreOverThreshold => self.score(x),
        }
    }

    /// The predicted dispatch delay ("µs"), for the regressions.
    pub fn predicted_delay_us(&self, x: &FeatureVector) -> Option<f64> {
        (self.kind.verdict_rule() == VerdictRule::DelayOverBudget).then(|| self.score(x))
    }
}

/// One node of a float tree. Inner nodes go left when `x[feature] <= split`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloatTreeNode {
    /// `None` for a leaf.
    pub feature: Option<Feature>,
    pub split: f64,
    pub left: usize,
    pub right: usize,
    /// Share of the training requests reaching this node that missed.
    pub p_miss: f64,
    /// Training requests reaching this node.
    pub samples: u64,
}

/// A decision tree in f64: nodes in an order where children follow their parent,
/// node 0 the root.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatTreeModel {
    /// The features the tree may split on (for the model file).
    pub features: Vec<Feature>,
    pub nodes: Vec<FloatTreeNode>,
    /// At risk when the leaf's miss probability is above this.
    pub threshold: f64,
}

impl FloatTreeModel {
    /// Index of the leaf `x` falls in.
    pub fn leaf(&self, x: &FeatureVector) -> usize {
        let mut i = 0;
        // Children follow parents, so this ends; the bound guards a malformed tree.
        for _ in 0..self.nodes.len() {
            let n = &self.nodes[i];
            match n.feature {
                None => break,
                Some(f) => {
                    i = if (x[f.index()] as f64) <= n.split {
                        n.left
                    } else {
                        n.right
                    }
                }
            }
        }
        i
    }

    pub fn p_miss(&self, x: &FeatureVector) -> f64 {
        self.nodes[self.leaf(x)].p_miss
    }

    pub fn at_risk(&self, x: &FeatureVector) -> bool {
        self.p_miss(x) > self.threshold
    }

    /// Longest root-to-leaf path (edges).
    pub fn depth(&self) -> usize {
        let mut depth = vec![0usize; self.nodes.len()];
        let mut max = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.feature.is_some() {
                for c in [n.left, n.right] {
                    depth[c] = depth[i] + 1;
                    max = max.max(depth[c]);
                }
            }
        }
        max
    }
}

/// Either float model.
#[derive(Clone, Debug, PartialEq)]
pub enum FloatModel {
    Linear(FloatLinearModel),
    Tree(FloatTreeModel),
}

impl FloatModel {
    pub fn kind(&self) -> ModelKind {
        match self {
            FloatModel::Linear(m) => m.kind,
            FloatModel::Tree(_) => ModelKind::Tree,
        }
    }

    pub fn features(&self) -> &[Feature] {
        match self {
            FloatModel::Linear(m) => &m.features,
            FloatModel::Tree(m) => &m.features,
        }
    }

    pub fn at_risk(&self, x: &FeatureVector) -> bool {
        match self {
            FloatModel::Linear(m) => m.at_risk(x),
            FloatModel::Tree(m) => m.at_risk(x),
        }
    }

    pub fn predicted_delay_us(&self, x: &FeatureVector) -> Option<f64> {
        match self {
            FloatModel::Linear(m) => m.predicted_delay_us(x),
            FloatModel::Tree(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_clips_tails_but_keeps_rare_flags() {
        let mut v: Vec<i32> = (0..10_000).collect();
        v.push(1_000_000);
        let s = FeatureScaling::fit(&v);
        assert!(s.clip_max < 10_000 && s.clip_min > 0, "{s:?}");
        assert_eq!(s.clip(1_000_000), s.clip_max);

        let mut flags = vec![0; 10_000];
        flags[17] = 1;
        let s = FeatureScaling::fit(&flags);
        assert_eq!((s.clip_min, s.clip_max), (0, 1));
        assert!(s.standardize(1) > 50.0);

        let constant = FeatureScaling::fit(&[5, 5, 5]);
        assert_eq!(constant.std, 1.0);
        assert_eq!(constant.standardize(5), 0.0);
    }
}
