//! The quantiser: float models → the kernel's fixed-point structs, with power-of-two
//! scales only.
//!
//! Linear models. With clip `c_j = clip(x_j)`, standardisation `(c_j - mean_j) / std_j`
//! and weight `w_j`, the float score is `b + Σ W_j (c_j - mean_j)`, `W_j = w_j / std_j`.
//! The integer model centres each feature on an integer `offset_j = round(mean_j)` and
//! folds the rest into the bias: `b' = b + Σ W_j (offset_j - mean_j)`. The score unit
//! is `2^-S` (`out_shift`), chosen as large as the worst case allows; each weight gets
//! its own extra precision `r_j` (`product_shift`):
//! `weight_j = round(W_j 2^(S + r_j))` with `|weight_j| <= 2^30`.
//!
//! Error bound (in score units of `2^-S`), for an input whose clipped, centred value
//! is `d_j = c_j - offset_j`:
//! `|int - float·2^S| <= 1/2 (bias) + Σ_j (|d_j| 2^-(r_j+1) + 1)`,
//! the `|d_j|/2^(r_j+1)` from rounding the weight and the 1 from the arithmetic
//! shift's floor. [`linear_error_bound`] computes it; the property tests check it.
//!
//! Trees. Features are integers, so `x <= split` is exactly `x <= floor(split)`:
//! splits quantise without error. Leaf probabilities become `round(p 2^16)`.

use kml_ebpf_common::{
    features::{Feature, FeatureVector, NUM_FEATURES},
    inference::{infer_linear, infer_tree, linear_limit, linear_score, Prediction},
    model::{
        LinearModel, ModelKind, TreeModel, MAX_OUT_SHIFT, MAX_PRODUCT_SHIFT, TREE_LEAF,
        TREE_MAX_NODES,
    },
};

use crate::{
    error::{LearnError, Result},
    float_model::{FloatLinearModel, FloatModel, FloatTreeModel},
};

/// Largest |weight| the quantiser produces: with |d| < 2^32 a product stays < 2^62.
const WEIGHT_LIMIT: f64 = (1u64 << 30) as f64;
/// Worst-case |accumulator| the quantiser aims for (the kernel's limit is 2^62).
const TARGET_ACC: f64 = (1u64 << 60) as f64;
/// Leaf probabilities are in units of 2^-16.
pub const TREE_VALUE_SHIFT: u32 = 16;

/// The kernel-side form of a model, whatever its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuantizedModel {
    Linear(Box<LinearModel>),
    Tree(Box<TreeModel>),
}

impl QuantizedModel {
    /// Exactly what the eBPF program computes.
    pub fn infer(&self, x: &FeatureVector) -> Prediction {
        match self {
            QuantizedModel::Linear(m) => infer_linear(m, x),
            QuantizedModel::Tree(m) => infer_tree(m, x),
        }
    }

    /// How far above its verdict boundary the integer score is (the verdict is
    /// `margin > 0`): the ranking AUC is measured on.
    pub fn margin(&self, x: &FeatureVector) -> i64 {
        match self {
            QuantizedModel::Linear(m) => linear_score(m, x).saturating_sub(linear_limit(m, x)),
            QuantizedModel::Tree(m) => infer_tree(m, x).score - m.threshold as i64,
        }
    }

    /// The regressions' predicted dispatch delay ("µs"), from the integer score.
    pub fn predicted_delay_us(&self, x: &FeatureVector) -> Option<f64> {
        match self {
            QuantizedModel::Linear(m)
                if m.model_kind()
                    .is_some_and(|k| !matches!(k, ModelKind::Logistic)) =>
            {
                Some(infer_linear(m, x).score as f64 / (1u64 << m.out_shift) as f64)
            }
            _ => None,
        }
    }

    pub fn seal(&mut self, version: u32) {
        match self {
            QuantizedModel::Linear(m) => m.seal(version),
            QuantizedModel::Tree(m) => m.seal(version),
        }
    }
}

fn refuse(kind: ModelKind, message: impl Into<String>) -> LearnError {
    LearnError::Quantize {
        kind: kind.name(),
        message: message.into(),
    }
}

/// Quantises a float linear model (baseline, linear regression, logistic).
pub fn quantize_linear(m: &FloatLinearModel) -> Result<LinearModel> {
    let kind = m.kind;
    let all_finite = m
        .weights
        .iter()
        .chain([&m.intercept, &m.threshold])
        .all(|v| v.is_finite())
        && m.scaling
            .iter()
            .all(|s| s.mean.is_finite() && s.std.is_finite() && s.std > 0.0);
    if !all_finite {
        return Err(refuse(kind, "a parameter is not a finite number"));
    }
    let mut q = LinearModel::zeroed();
    q.kind = kind as u32;
    q.rule = kind.verdict_rule() as u32;
    // Unused features: weight 0 and a zero-width input range.
    let mut raw_weight = [0.0f64; NUM_FEATURES];
    let mut bias = m.intercept;
    for ((f, s), w) in m.features.iter().zip(&m.scaling).zip(&m.weights) {
        let j = f.index();
        let w_raw = w / s.std;
        let offset = (s.mean.round() as i64).clamp(s.clip_min as i64, s.clip_max as i64) as i32;
        q.offset[j] = offset;
        q.input_min[j] = s.clip_min;
        q.input_max[j] = s.clip_max;
        raw_weight[j] += w_raw;
        bias += w_raw * (offset as f64 - s.mean);
    }
    // out_shift: as fine as the worst case allows.
    let mut worst = bias.abs() + m.threshold.abs();
    let mut largest_weight = 0.0f64;
    for (j, w) in raw_weight.iter().enumerate() {
        let d = ((q.input_min[j] as i64 - q.offset[j] as i64).abs())
            .max((q.input_max[j] as i64 - q.offset[j] as i64).abs()) as f64;
        worst += w.abs() * d;
        largest_weight = largest_weight.max(w.abs());
    }
    let mut out_shift = MAX_OUT_SHIFT as i32;
    for limit in [
        TARGET_ACC / worst.max(1e-300),
        WEIGHT_LIMIT / largest_weight.max(1e-300),
    ] {
        out_shift = out_shift.min(limit.log2().floor() as i32);
    }
    if out_shift < 0 {
        return Err(refuse(
            kind,
            format!("scores up to {worst:.3e} do not fit the 64-bit accumulator"),
        ));
    }
    q.out_shift = out_shift as u32;
    let unit = (out_shift as f64).exp2();
    q.bias = (bias * unit).round() as i64;
    q.threshold = (m.threshold * unit).round() as i64;
    for (j, w) in raw_weight.iter().enumerate() {
        let target = w * unit;
        if target == 0.0 {
            continue;
        }
        // Extra precision: the largest r with |target 2^r| <= 2^30.
        let r = ((WEIGHT_LIMIT / target.abs()).log2().floor() as i64)
            .clamp(0, MAX_PRODUCT_SHIFT as i64);
        let w = (target * (r as f64).exp2()).round();
        q.product_shift[j] = r as u32;
        q.weight[j] = w.clamp(-WEIGHT_LIMIT, WEIGHT_LIMIT) as i32;
    }
    q.validate().map_err(|fault| {
        refuse(
            kind,
            format!("the result fails validation at `{}`", fault.field()),
        )
    })?;
    q.seal(0);
    Ok(q)
}

/// Worst-case |integer score - float score·2^S| for input `x`, in score units (see
/// the module doc). `q` must be `quantize_linear(m)`.
pub fn linear_error_bound(q: &LinearModel, x: &FeatureVector) -> f64 {
    let mut bound = 0.5;
    for (j, &xj) in x.iter().enumerate() {
        if q.weight[j] == 0 {
            continue;
        }
        let c = xj.clamp(q.input_min[j], q.input_max[j]) as i64;
        let d = (c - q.offset[j] as i64).abs() as f64;
        bound += d / (q.product_shift[j] as f64 + 1.0).exp2() + 1.0;
    }
    bound
}

/// Quantises a float tree.
pub fn quantize_tree(t: &FloatTreeModel) -> Result<TreeModel> {
    let kind = ModelKind::Tree;
    if t.nodes.is_empty() || t.nodes.len() > TREE_MAX_NODES {
        return Err(refuse(
            kind,
            format!("{} nodes (1..={TREE_MAX_NODES} allowed)", t.nodes.len()),
        ));
    }
    if !t.threshold.is_finite() {
        return Err(refuse(kind, "the threshold is not a finite number"));
    }
    let unit = (TREE_VALUE_SHIFT as f64).exp2();
    let mut q = TreeModel::zeroed();
    q.kind = kind as u32;
    q.node_count = t.nodes.len() as u32;
    q.depth = t.depth() as u32;
    q.value_shift = TREE_VALUE_SHIFT;
    // `p > threshold` ⟺ `round(p 2^16) > floor(threshold 2^16)` up to one unit.
    q.threshold = (t.threshold * unit).floor().clamp(-1.0, unit) as i32;
    for (i, n) in t.nodes.iter().enumerate() {
        if !(0.0..=1.0).contains(&n.p_miss) {
            return Err(refuse(
                kind,
                format!("node {i}: miss probability {} is not in 0..=1", n.p_miss),
            ));
        }
        q.value[i] = (n.p_miss * unit).round() as i32;
        match n.feature {
            None => q.feature[i] = TREE_LEAF,
            Some(f) => {
                if n.split.is_nan() {
                    return Err(refuse(kind, format!("node {i}: split is not a number")));
                }
                q.feature[i] = f.index() as u8;
                // Exact for integer inputs: x <= s ⟺ x <= floor(s).
                q.split[i] = n.split.floor().clamp(i32::MIN as f64, i32::MAX as f64) as i32;
                q.left[i] = n.left as u16;
                q.right[i] = n.right as u16;
            }
        }
    }
    q.validate().map_err(|fault| {
        refuse(
            kind,
            format!("the result fails validation at `{}`", fault.field()),
        )
    })?;
    q.seal(0);
    Ok(q)
}

/// Quantises either kind.
pub fn quantize(m: &FloatModel) -> Result<QuantizedModel> {
    Ok(match m {
        FloatModel::Linear(l) => QuantizedModel::Linear(Box::new(quantize_linear(l)?)),
        FloatModel::Tree(t) => QuantizedModel::Tree(Box::new(quantize_tree(t)?)),
    })
}

/// The features a kernel model reads (non-zero weight, or split on).
/// The features `q` uses that the kernel does not compute (see
/// [`Feature::in_kernel`]): such a model must not be installed in a model slot.
pub fn features_not_in_kernel(q: &QuantizedModel) -> Vec<Feature> {
    used_features(q)
        .into_iter()
        .filter(|f| !f.in_kernel())
        .collect()
}

pub fn used_features(q: &QuantizedModel) -> Vec<Feature> {
    match q {
        QuantizedModel::Linear(m) => Feature::ALL.into_iter().filter(|&f| m.uses(f)).collect(),
        QuantizedModel::Tree(t) => {
            let n = t.node_count as usize;
            Feature::ALL
                .into_iter()
                .filter(|f| t.feature[..n.min(TREE_MAX_NODES)].contains(&(f.index() as u8)))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float_model::{FeatureScaling, FloatTreeNode};
    use proptest::prelude::*;

    fn feature_strategy() -> impl Strategy<Value = Vec<(Feature, FeatureScaling, f64)>> {
        let one = (
            0..NUM_FEATURES,
            any::<i32>(),
            any::<i32>(),
            -1.0f64..1.0,
            1e-3f64..1e6,
            -8.0f64..8.0,
            -30i32..10,
        )
            .prop_map(|(j, a, b, mean_frac, std, weight_mant, weight_exp)| {
                let (lo, hi) = (a.min(b), a.max(b));
                let mean = lo as f64 + (hi as f64 - lo as f64) * (mean_frac.abs());
                let w = weight_mant * (weight_exp as f64).exp2();
                (
                    Feature::ALL[j],
                    FeatureScaling {
                        clip_min: lo,
                        clip_max: hi,
                        mean,
                        std,
                    },
                    w,
                )
            });
        proptest::collection::vec(one, 0..NUM_FEATURES).prop_map(|mut v| {
            v.sort_by_key(|t| t.0);
            v.dedup_by_key(|t| t.0);
            v
        })
    }

    fn linear_strategy() -> impl Strategy<Value = FloatLinearModel> {
        (feature_strategy(), -1e6f64..1e6, -1e3f64..1e3, 0usize..3).prop_map(
            |(fs, intercept, threshold, k)| FloatLinearModel {
                kind: [
                    ModelKind::Baseline,
                    ModelKind::LinearRegression,
                    ModelKind::Logistic,
                ][k],
                features: fs.iter().map(|t| t.0).collect(),
                scaling: fs.iter().map(|t| t.1).collect(),
                weights: fs.iter().map(|t| t.2).collect(),
                intercept,
                threshold,
            },
        )
    }

    /// Any bit pattern at all: valid or not.
    fn hostile_linear_strategy() -> impl Strategy<Value = LinearModel> {
        let arr = || proptest::array::uniform(any::<i32>());
        (
            arr(),
            arr(),
            arr(),
            arr(),
            proptest::array::uniform(any::<u32>()),
            any::<i64>(),
            any::<i64>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(
                |(
                    weight,
                    offset,
                    input_min,
                    input_max,
                    product_shift,
                    bias,
                    threshold,
                    out_shift,
                    rule,
                )| {
                    LinearModel {
                        kind: rule % 5,
                        rule: rule % 4,
                        version: 0,
                        out_shift,
                        bias,
                        threshold,
                        weight,
                        offset,
                        input_min,
                        input_max,
                        product_shift,
                        checksum: 0,
                    }
                },
            )
    }

    /// Models that pass validation: inputs within ±2^20 of the offset keep every
    /// product below 2^51, so the sum of 16 stays far from 2^62.
    fn valid_linear_strategy() -> impl Strategy<Value = LinearModel> {
        let small = || proptest::array::uniform(-(1i32 << 19)..(1 << 19));
        (
            proptest::array::uniform(any::<i32>()),
            small(),
            small(),
            small(),
            proptest::array::uniform(0..=MAX_PRODUCT_SHIFT),
            -(1i64 << 60)..(1 << 60),
            0..=MAX_OUT_SHIFT,
        )
            .prop_map(|(weight, offset, a, b, product_shift, bias, out_shift)| {
                let mut m = LinearModel::zeroed();
                m.kind = ModelKind::Logistic as u32;
                m.rule = ModelKind::Logistic.verdict_rule() as u32;
                m.weight = weight;
                m.offset = offset;
                for j in 0..NUM_FEATURES {
                    m.input_min[j] = a[j].min(b[j]);
                    m.input_max[j] = a[j].max(b[j]);
                }
                m.product_shift = product_shift;
                m.bias = bias;
                m.out_shift = out_shift;
                m
            })
    }

    /// The integer routine's float twin: the same model's parameters, computed exactly
    /// (in f64, which is exact here up to its 53-bit rounding).
    fn twin_score(m: &LinearModel, x: &FeatureVector) -> f64 {
        let mut acc = m.bias as f64;
        for (j, &xj) in x.iter().enumerate() {
            let c = xj.clamp(m.input_min[j], m.input_max[j]) as f64;
            acc +=
                (c - m.offset[j] as f64) * m.weight[j] as f64 / (m.product_shift[j] as f64).exp2();
        }
        acc
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any model at all, valid or not, any input: no panic (tests run with
        /// overflow checks on).
        #[test]
        fn integer_linear_never_traps(m in hostile_linear_strategy(), x in proptest::array::uniform(any::<i32>())) {
            let _ = infer_linear(&m, &x);
        }

        /// A valid model's integer score is its exact twin's value rounded down
        /// term by term: within [-16, 0] units (plus f64's own rounding).
        #[test]
        fn integer_linear_tracks_its_twin(m in valid_linear_strategy(), x in proptest::array::uniform(any::<i32>())) {
            prop_assert!(m.validate().is_ok());
            let score = infer_linear(&m, &x).score as f64;
            let twin = twin_score(&m, &x);
            let rounding = twin.abs().max(m.bias.unsigned_abs() as f64) * 1e-14;
            prop_assert!(score <= twin + rounding && score >= twin - NUM_FEATURES as f64 - rounding, "int {score} twin {twin}");
        }

        /// Quantising a float model keeps the score within the stated bound of the
        /// float model for every input, and the verdict agrees away from the edge.
        #[test]
        fn quantized_linear_matches_float_within_bound(m in linear_strategy(), xs in proptest::collection::vec(proptest::array::uniform(any::<i32>()), 1..8)) {
            let q = quantize_linear(&m).unwrap();
            prop_assert!(q.validate().is_ok() && q.checksum_ok());
            let unit = (q.out_shift as f64).exp2();
            for x in xs {
                let int = infer_linear(&q, &x);
                let float = m.score(&x) * unit;
                // Plus f64's own rounding in the float model (its terms can cancel).
                let magnitude: f64 = m.intercept.abs() + m.features.iter().zip(&m.scaling).zip(&m.weights)
                    .map(|((f, s), w)| (w / s.std).abs() * (s.mean.abs() + s.clip(x[f.index()]).unsigned_abs() as f64 + 1.0))
                    .sum::<f64>();
                let bound = linear_error_bound(&q, &x) + magnitude * unit * 1e-13;
                prop_assert!((int.score as f64 - float).abs() <= bound,
                    "int {} float {float} bound {bound} shift {}", int.score, q.out_shift);
                let edge = (m.margin(&x) - m.threshold).abs() * unit;
                if edge > bound + 2.0 {
                    prop_assert_eq!(int.at_risk, m.at_risk(&x));
                }
            }
        }

        /// Trees: for integer inputs the quantised tree reaches the same leaf.
        #[test]
        fn quantized_tree_walks_like_the_float_tree(splits in proptest::collection::vec((0..NUM_FEATURES, -1e5f64..1e5, 0.0f64..=1.0), 1..40), xs in proptest::collection::vec(proptest::array::uniform(-100_000i32..100_000), 1..16), threshold in 0.0f64..1.0) {
            // A chain: split node i has leaf i+1 on its left, the next split (or the
            // last leaf) i+2 on its right.
            let mut nodes = Vec::new();
            for (f, split, p) in &splits {
                let i = nodes.len();
                nodes.push(FloatTreeNode { feature: Some(Feature::ALL[*f]), split: *split, left: i + 1, right: i + 2, p_miss: *p, samples: 0 });
                nodes.push(FloatTreeNode { feature: None, split: 0.0, left: 0, right: 0, p_miss: 1.0 - p, samples: 0 });
                if nodes.len() >= 15 { break; }
            }
            nodes.push(FloatTreeNode { feature: None, split: 0.0, left: 0, right: 0, p_miss: 0.25, samples: 0 });
            let t = FloatTreeModel { features: Feature::ALL.to_vec(), nodes, threshold };
            let q = quantize_tree(&t).unwrap();
            for x in xs {
                let leaf = t.leaf(&x);
                let v = infer_tree(&q, &x);
                prop_assert_eq!(v.score, (t.nodes[leaf].p_miss * 65536.0).round() as i64);
                if (t.nodes[leaf].p_miss - threshold).abs() > 1.0 / 65536.0 {
                    prop_assert_eq!(v.at_risk, t.at_risk(&x));
                }
            }
        }
    }

    #[test]
    fn unused_features_get_no_weight() {
        let m = FloatLinearModel {
            kind: ModelKind::Baseline,
            features: vec![Feature::SectorMib, Feature::Op],
            scaling: vec![
                FeatureScaling {
                    clip_min: 0,
                    clip_max: 1000,
                    mean: 500.4,
                    std: 200.0,
                },
                FeatureScaling {
                    clip_min: 0,
                    clip_max: 1,
                    mean: 0.4,
                    std: 0.5,
                },
            ],
            weights: vec![10.0, -3.0],
            intercept: 250.0,
            threshold: 0.0,
        };
        let q = quantize_linear(&m).unwrap();
        assert_eq!(
            used_features(&QuantizedModel::Linear(Box::new(q))),
            [Feature::SectorMib, Feature::Op]
        );
        assert_eq!(q.offset[Feature::SectorMib.index()], 500);
        // The op weight, 3 / 0.5 per unit, limits the score unit: 6 * 2^27 <= 2^30.
        assert_eq!(q.out_shift, 27);
        assert_eq!(q.weight[Feature::Op.index()], -(6 << 27));
        assert_eq!(q.product_shift[Feature::Op.index()], 0);
    }
}
