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

/// Whether the model reads any of the position features (which the kernel
/// programs compute only in raw tracepoint mode, and record only for such a model).
pub fn reads_positions(q: &QuantizedModel) -> bool {
    used_features(q).iter().any(|f| f.is_position())
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
    use kml_ebpf_common::model::{VerdictRule, ACC_LIMIT};
    use proptest::prelude::*;

    /// A feature vector of the kernel's length ([`NUM_FEATURES`], whatever it grows to).
    fn vector<S: Strategy>(
        s: S,
    ) -> proptest::array::UniformArrayStrategy<S, [S::Value; NUM_FEATURES]> {
        proptest::array::uniform(s)
    }

    /// Any i32, with its edges (0, ±1, MIN, MAX) drawn often.
    fn i32_edgy() -> BoxedStrategy<i32> {
        // Boxed: arrays of unboxed unions overflow the test thread's stack.
        prop_oneof![
            4 => any::<i32>(),
            1 => Just(0),
            1 => Just(1),
            1 => Just(-1),
            1 => Just(i32::MIN),
            1 => Just(i32::MAX),
        ]
        .boxed()
    }

    /// Any i64, with its edges drawn often (and the accumulator limit's).
    fn i64_edgy() -> BoxedStrategy<i64> {
        let acc = ACC_LIMIT as i64;
        prop_oneof![
            4 => any::<i64>(),
            1 => Just(0i64),
            1 => Just(i64::MIN),
            1 => Just(i64::MAX),
            1 => Just(acc - 1),
            1 => Just(1 - acc),
        ]
        .boxed()
    }

    /// Which features a model uses: often all of them, often none, else any subset.
    fn feature_set() -> impl Strategy<Value = Vec<usize>> {
        prop_oneof![
            1 => Just((0..NUM_FEATURES).collect::<Vec<_>>()),
            1 => Just(Vec::new()),
            3 => proptest::sample::subsequence((0..NUM_FEATURES).collect::<Vec<_>>(), 0..=NUM_FEATURES),
        ]
    }

    fn feature_strategy() -> impl Strategy<Value = Vec<(Feature, FeatureScaling, f64)>> {
        let one = (
            i32_edgy(),
            i32_edgy(),
            -1.0f64..1.0,
            1e-3f64..1e6,
            -8.0f64..8.0,
            -30i32..10,
        )
            .prop_map(|(a, b, mean_frac, std, weight_mant, weight_exp)| {
                let (lo, hi) = (a.min(b), a.max(b));
                let mean = lo as f64 + (hi as f64 - lo as f64) * (mean_frac.abs());
                let w = weight_mant * (weight_exp as f64).exp2();
                (
                    FeatureScaling {
                        clip_min: lo,
                        clip_max: hi,
                        mean,
                        std,
                    },
                    w,
                )
            });
        (feature_set(), proptest::collection::vec(one, NUM_FEATURES)).prop_map(|(set, params)| {
            set.into_iter()
                .zip(params)
                .map(|(j, (s, w))| (Feature::ALL[j], s, w))
                .collect()
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

    /// Any bit pattern at all, valid or not, its edges drawn often.
    fn hostile_linear_strategy() -> impl Strategy<Value = LinearModel> {
        let shift = prop_oneof![
            3 => any::<u32>(),
            1 => Just(0u32),
            1 => Just(MAX_PRODUCT_SHIFT),
            1 => Just(63u32),
            1 => Just(64u32),
            1 => Just(u32::MAX),
        ]
        .boxed();
        (
            vector(i32_edgy()),
            vector(i32_edgy()),
            vector(i32_edgy()),
            vector(i32_edgy()),
            vector(shift),
            i64_edgy(),
            i64_edgy(),
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
                        _pad: Default::default(),
                        checksum: 0,
                    }
                },
            )
    }

    /// Models that pass validation, up to the accumulator's limit: any weights,
    /// ranges and shifts (edges often), kept when `validate` accepts them.
    fn valid_linear_strategy() -> impl Strategy<Value = LinearModel> {
        let width = prop_oneof![
            Just(0i32),
            Just(1),
            0i32..1 << 10,
            0i32..1 << 20,
            0i32..1 << 30,
        ]
        .boxed();
        let shift = prop_oneof![
            1 => Just(0u32),
            1 => Just(MAX_PRODUCT_SHIFT),
            4 => 0..=MAX_PRODUCT_SHIFT,
        ]
        .boxed();
        (
            vector(i32_edgy()),
            vector(i32_edgy()),
            vector(width),
            vector(shift),
            i64_edgy(),
            i64_edgy(),
            0..=MAX_OUT_SHIFT,
            0usize..3,
        )
            .prop_map(
                |(weight, lo, width, product_shift, bias, threshold, out_shift, k)| {
                    let kind = [
                        ModelKind::Baseline,
                        ModelKind::LinearRegression,
                        ModelKind::Logistic,
                    ][k];
                    let mut m = LinearModel::zeroed();
                    m.kind = kind as u32;
                    m.rule = kind.verdict_rule() as u32;
                    m.weight = weight;
                    for j in 0..NUM_FEATURES {
                        m.input_min[j] = lo[j];
                        m.input_max[j] = lo[j].saturating_add(width[j]);
                        m.offset[j] = lo[j].saturating_add(width[j] / 2);
                    }
                    m.product_shift = product_shift;
                    // Biases and thresholds within the accumulator's limit, edges included.
                    let acc = ACC_LIMIT as i64;
                    m.bias = bias.clamp(1 - acc, acc - 1) >> (bias.unsigned_abs() % 3);
                    m.threshold = threshold.clamp(1 - acc, acc - 1);
                    m.out_shift = out_shift;
                    m
                },
            )
            .prop_filter("fails validation", |m| m.validate().is_ok())
    }

    /// An input for `m`: any values, the edges of i32 and of the model's own input
    /// ranges (just inside, on, just outside) drawn often.
    fn input_for(m: &LinearModel) -> impl Strategy<Value = FeatureVector> {
        let per: Vec<BoxedStrategy<i32>> = (0..NUM_FEATURES)
            .map(|j| {
                let (lo, hi) = (m.input_min[j], m.input_max[j]);
                prop_oneof![
                    3 => i32_edgy(),
                    1 => Just(lo),
                    1 => Just(hi),
                    1 => Just(lo.saturating_sub(1)),
                    1 => Just(hi.saturating_add(1)),
                ]
                .boxed()
            })
            .collect();
        per.prop_map(|v| {
            let mut x = [0i32; NUM_FEATURES];
            x.copy_from_slice(&v);
            x
        })
    }

    /// The exact twin of the integer accumulator, in i128: the bias plus, per lane,
    /// the clipped and centred input times the weight, divided by 2^shift rounding
    /// towards -inf (`div_euclid` by a positive power of two), the shift taken
    /// modulo 64 as the masked kernel shift does. Returns the unwrapped sum.
    fn exact_sum(m: &LinearModel, x: &FeatureVector) -> i128 {
        let mut acc = i128::from(m.bias);
        for (j, &xj) in x.iter().enumerate() {
            // clip: at least lo, then at most hi (with lo > hi: hi).
            let c = xj.max(m.input_min[j]).min(m.input_max[j]);
            let d = i128::from(c) - i128::from(m.offset[j]);
            let p = d * i128::from(m.weight[j]);
            acc += p.div_euclid(1i128 << (m.product_shift[j] % 64));
        }
        acc
    }

    /// The twin of the verdict's limit: the budget (clipped to 0..=2^30) in the
    /// score's unit plus the threshold, saturating at i64's ends; or the threshold.
    fn exact_limit(m: &LinearModel, x: &FeatureVector) -> i64 {
        match VerdictRule::from_u32(m.rule) {
            Some(VerdictRule::DelayOverBudget) => {
                let budget = i128::from(x[Feature::DeadlineBudgetUs.index()].clamp(0, 1 << 30));
                let unit = 1i128 << m.out_shift.min(MAX_OUT_SHIFT);
                (budget * unit + i128::from(m.threshold))
                    .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
            }
            Some(VerdictRule::ScoreOverThreshold) => m.threshold,
            None => i64::MAX,
        }
    }

    /// The module doc's error bound, |integer score - float score·2^S|, computed here
    /// from the quantised parameters (not by the code under test).
    fn documented_bound(q: &LinearModel, x: &FeatureVector) -> f64 {
        // 1/2 for the bias' rounding, per used lane |d_j| 2^-(r_j+1) for the weight's
        // rounding and 1 for the floor of the shift (module doc).
        let mut bound = 0.5;
        for (j, &xj) in x.iter().enumerate() {
            if q.weight[j] == 0 {
                continue;
            }
            let c = xj.max(q.input_min[j]).min(q.input_max[j]);
            let d = (i64::from(c) - i64::from(q.offset[j])).unsigned_abs() as f64;
            bound += d / 2f64.powi(q.product_shift[j] as i32 + 1) + 1.0;
        }
        bound
    }

    #[test]
    fn generators_reach_all_features_and_the_edges() {
        use proptest::{strategy::ValueTree as _, test_runner::TestRunner};
        let mut runner = TestRunner::deterministic();
        let (mut all, mut none, mut max_shift, mut at_limit) = (0, 0, 0, 0);
        for _ in 0..400 {
            let m = linear_strategy().new_tree(&mut runner).unwrap().current();
            all += usize::from(m.features.len() == NUM_FEATURES);
            none += usize::from(m.features.is_empty());
            let v = valid_linear_strategy()
                .new_tree(&mut runner)
                .unwrap()
                .current();
            max_shift += usize::from(v.product_shift.contains(&MAX_PRODUCT_SHIFT));
            at_limit += usize::from(v.accumulator_bound() >= ACC_LIMIT / 4);
        }
        assert!(
            all > 20 && none > 20,
            "all features {all}, none {none} of 400"
        );
        assert!(
            max_shift > 20,
            "product shift {MAX_PRODUCT_SHIFT} in {max_shift} of 400"
        );
        assert!(
            at_limit > 5,
            "models near the accumulator limit: {at_limit} of 400"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any model at all, valid or not, any input: no panic (tests run with
        /// overflow checks on), and the score is the exact twin's sum wrapped to 64
        /// bits, the verdict its comparison with the twin's limit.
        #[test]
        fn integer_linear_is_its_exact_twin_for_any_model(m in hostile_linear_strategy(), x in vector(i32_edgy())) {
            let v = infer_linear(&m, &x);
            prop_assert_eq!(v.score, exact_sum(&m, &x) as i64);
            prop_assert_eq!(v.at_risk, v.score > exact_limit(&m, &x));
        }

        /// A valid model never wraps: its score is the exact twin's sum, unwrapped,
        /// for every input, the edges of its ranges and of i32 included.
        #[test]
        fn integer_linear_never_wraps_for_a_valid_model((m, x) in valid_linear_strategy().prop_flat_map(|m| { let x = input_for(&m); (Just(m), x) })) {
            let exact = exact_sum(&m, &x);
            prop_assert!(exact.unsigned_abs() < u128::from(ACC_LIMIT), "sum {exact} past the limit of a valid model");
            prop_assert_eq!(i128::from(infer_linear(&m, &x).score), exact);
        }

        /// Quantising a float model: each parameter is the float one rounded to its
        /// fixed-point unit, and the score stays within the documented bound of the
        /// float model's for every input (the verdict agrees away from the edge).
        #[test]
        fn quantized_linear_matches_float_within_bound(m in linear_strategy(), xs in proptest::collection::vec(vector(i32_edgy()), 1..8)) {
            let q = quantize_linear(&m).unwrap();
            prop_assert!(q.validate().is_ok() && q.checksum_ok());
            let unit = (q.out_shift as f64).exp2();
            // The bias: the intercept plus each weight times (offset - mean), rounded.
            let mut bias = m.intercept;
            let mut raw = [0.0f64; NUM_FEATURES];
            for ((f, s), w) in m.features.iter().zip(&m.scaling).zip(&m.weights) {
                raw[f.index()] += w / s.std;
                bias += w / s.std * (q.offset[f.index()] as f64 - s.mean);
            }
            let bias_rounding = (bias * unit).abs() * 1e-15 + 0.5;
            prop_assert!((q.bias as f64 - bias * unit).abs() <= bias_rounding, "bias {} vs {}", q.bias, bias * unit);
            for (j, w_raw) in raw.iter().enumerate() {
                let scaled = w_raw * unit * 2f64.powi(q.product_shift[j] as i32);
                let limited = q.weight[j].unsigned_abs() == 1 << 30;
                prop_assert!(limited || (q.weight[j] as f64 - scaled).abs() <= 0.5 + scaled.abs() * 1e-15,
                    "weight {j}: {} vs {scaled}", q.weight[j]);
            }
            for x in xs {
                let int = infer_linear(&q, &x);
                prop_assert_eq!(i128::from(int.score), exact_sum(&q, &x));
                let float = m.score(&x) * unit;
                // Plus f64's own rounding in the float model (its terms can cancel).
                let magnitude: f64 = m.intercept.abs() + m.features.iter().zip(&m.scaling).zip(&m.weights)
                    .map(|((f, s), w)| (w / s.std).abs() * (s.mean.abs() + s.clip(x[f.index()]).unsigned_abs() as f64 + 1.0))
                    .sum::<f64>();
                let bound = documented_bound(&q, &x) + magnitude * unit * 1e-13;
                prop_assert!((int.score as f64 - float).abs() <= bound,
                    "int {} float {float} bound {bound} shift {}", int.score, q.out_shift);
                // The code's own bound is the documented one.
                prop_assert!((linear_error_bound(&q, &x) - documented_bound(&q, &x)).abs() < 1e-9);
                let edge = (m.margin(&x) - m.threshold).abs() * unit;
                if edge > bound + 2.0 {
                    prop_assert_eq!(int.at_risk, m.at_risk(&x));
                }
            }
        }

        /// Trees: for integer inputs the quantised tree reaches the same leaf.
        #[test]
        fn quantized_tree_walks_like_the_float_tree(splits in proptest::collection::vec((0..NUM_FEATURES, -1e5f64..1e5, 0.0f64..=1.0), 1..40), xs in proptest::collection::vec(vector(-100_000i32..100_000), 1..16), threshold in 0.0f64..1.0) {
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
