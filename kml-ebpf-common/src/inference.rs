//! The integer inference: one routine per model kind, compiled unchanged into the
//! eBPF programs and the agent, so the host can check bit for bit what the kernel
//! decides.
//!
//! Kernel rules kept here: no floats, no division (signed scaling is an arithmetic
//! right shift, which rounds towards -inf), loops bounded by constants, no index that
//! can fail (iterators over fixed arrays, or `get`), and nothing that can panic: on a
//! malformed model the routines still return some verdict, never trap. Arithmetic is
//! i64; products cannot overflow by construction and sums saturate, so even a model
//! that failed [`LinearModel::validate`] cannot make them wrap.

use crate::{
    branchless::sign_mask,
    features::{Feature, FeatureVector, BUDGET_MAX},
    model::{LinearModel, TreeModel, VerdictRule, MAX_OUT_SHIFT, TREE_LEAF, TREE_MAX_DEPTH},
};

/// What a model says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Prediction {
    /// The model's raw output in its fixed-point unit: predicted delay
    /// (`2^-out_shift` "µs"), log-odds (`2^-out_shift`) or tree leaf probability
    /// (`2^-value_shift`).
    pub score: i64,
    /// The request is predicted to miss its deadline.
    pub at_risk: bool,
}

/// `v` clipped to `[lo, hi]`. Never panics (unlike `Ord::clamp`): with `lo > hi`
/// the result is one of the two.
#[inline(always)]
fn clip(v: i32, lo: i32, hi: i32) -> i32 {
    // Branch-free (max, then min, by sign masks in i64, where no difference
    // overflows): the BPF verifier walks every branch of every lane, and a
    // three-way branch per feature does not verify within its budget. The masks are
    // opaque (`branchless::sign_mask`) so LLVM cannot fold them back into
    // compare-and-branch.
    let (v, lo, hi) = (v as i64, lo as i64, hi as i64);
    let below = v - lo;
    let v = v - (below & sign_mask(below));
    let above = v - hi;
    let v = v - (above & !sign_mask(above));
    v as i32
}

/// The accumulator of a linear model (see [`LinearModel`] for the formula).
#[inline(always)]
pub fn linear_score(m: &LinearModel, x: &FeatureVector) -> i64 {
    let mut acc = m.bias;
    let lanes = x
        .iter()
        .zip(m.weight.iter())
        .zip(m.offset.iter())
        .zip(m.input_min.iter().zip(m.input_max.iter()))
        .zip(m.product_shift.iter());
    for ((((&xj, &w), &off), (&lo, &hi)), &shift) in lanes {
        // A feature the model does not use (weight 0) adds exactly 0: skipped,
        // which is most of them for most models (issue 14: the lanes were 40% of
        // the inference stage's time). One two-way branch per lane, whose paths
        // meet at the next lane, so the verifier prunes the second.
        if w == 0 {
            continue;
        }
        // |clip - off| < 2^32 and |w| <= 2^31, so the product is below 2^63: the
        // wrapping ops never wrap, they only rule out a panic path.
        let d = (clip(xj, lo, hi) as i64).wrapping_sub(off as i64);
        let product = d.wrapping_mul(w as i64);
        // Validated models have shifts <= 62; the mask (not a branch) keeps any
        // other value from being an invalid shift. The sum cannot wrap for a
        // validated model (`validate` bounds it below 2^62); wrapping, not
        // saturating, keeps the lane branch-free.
        acc = acc.wrapping_add(product >> (shift & 63));
    }
    acc
}

/// Integer inference of a linear model: baseline, linear regression or logistic.
#[inline(always)]
pub fn infer_linear(m: &LinearModel, x: &FeatureVector) -> Prediction {
    let score = linear_score(m, x);
    Prediction {
        score,
        at_risk: score > linear_limit(m, x),
    }
}

/// The value a linear model's score is compared with (the verdict is
/// `score > limit`); also how far a request is from the decision boundary.
#[inline(always)]
pub fn linear_limit(m: &LinearModel, x: &FeatureVector) -> i64 {
    match VerdictRule::from_u32(m.rule) {
        Some(VerdictRule::DelayOverBudget) => {
            // Time left to the deadline, in the score's unit. budget <= 2^30 and
            // out_shift <= 32, so the shift stays below 2^62.
            let budget = match x.get(Feature::DeadlineBudgetUs.index()) {
                Some(&b) => clip(b, 0, BUDGET_MAX) as i64,
                None => 0,
            };
            let out_shift = if m.out_shift > MAX_OUT_SHIFT {
                MAX_OUT_SHIFT
            } else {
                m.out_shift
            };
            (budget << out_shift).saturating_add(m.threshold)
        }
        Some(VerdictRule::ScoreOverThreshold) => m.threshold,
        // Unknown rule: never flag.
        None => i64::MAX,
    }
}

/// Integer inference of a decision tree: at most [`TREE_MAX_DEPTH`] steps down from
/// the root; a malformed index ends the walk at the current node, whose value is
/// still a probability.
#[inline(always)]
pub fn infer_tree(m: &TreeModel, x: &FeatureVector) -> Prediction {
    let mut node = 0usize;
    for _ in 0..TREE_MAX_DEPTH {
        let feature = match m.feature.get(node) {
            Some(&f) if f != TREE_LEAF => f as usize,
            _ => break,
        };
        let (Some(&v), Some(&split)) = (x.get(feature), m.split.get(node)) else {
            break;
        };
        let next = if v <= split {
            m.left.get(node)
        } else {
            m.right.get(node)
        };
        match next {
            Some(&child) => node = child as usize,
            None => break,
        }
    }
    let score = match m.value.get(node) {
        Some(&v) => v as i64,
        None => 0,
    };
    Prediction {
        score,
        at_risk: score > m.threshold as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        features::NUM_FEATURES,
        model::{ModelKind, TREE_MAX_NODES},
    };

    fn regression() -> LinearModel {
        // delay = 100 + 10 * queued ("µs"), score unit 2^-4.
        let mut m = LinearModel::zeroed();
        m.kind = ModelKind::LinearRegression as u32;
        m.rule = VerdictRule::DelayOverBudget as u32;
        m.out_shift = 4;
        m.bias = 100 << 4;
        m.weight[Feature::QueuedSameDir.index()] = 10 << 4;
        m.input_max = [1000; NUM_FEATURES];
        m
    }

    fn x_with(queued: i32, budget: i32) -> FeatureVector {
        let mut x = [0; NUM_FEATURES];
        x[Feature::QueuedSameDir.index()] = queued;
        x[Feature::DeadlineBudgetUs.index()] = budget;
        x
    }

    #[test]
    fn regression_compares_with_the_budget() {
        let m = regression();
        assert_eq!(m.validate(), Ok(()));
        let v = infer_linear(&m, &x_with(5, 200));
        assert_eq!(v.score, 150 << 4);
        assert!(!v.at_risk);
        assert!(infer_linear(&m, &x_with(5, 149)).at_risk);
        assert!(!infer_linear(&m, &x_with(5, 150)).at_risk);
        // Inputs are clipped to the model's range: 5000 counts as 1000.
        assert_eq!(
            infer_linear(&m, &x_with(5000, 0)).score,
            (100 + 10 * 1000) << 4
        );
    }

    #[test]
    fn product_shift_and_offset() {
        let mut m = regression();
        m.offset[Feature::QueuedSameDir.index()] = 10;
        m.product_shift[Feature::QueuedSameDir.index()] = 1;
        // (3 - 10) * 160 >> 1 = -560
        assert_eq!(linear_score(&m, &x_with(3, 0)), (100 << 4) - 560);
        // -7 * 3 = -21 >> 1 = -11 (towards -inf)
        m.weight[Feature::QueuedSameDir.index()] = 3;
        assert_eq!(linear_score(&m, &x_with(3, 0)), (100 << 4) - 11);
    }

    #[test]
    fn unused_features_add_nothing_whatever_their_other_parameters() {
        // Lanes of weight 0 are skipped: the score must be what every lane would
        // have given, offsets, clips and shifts of the unused lanes included.
        let m = regression();
        let mut noisy = m;
        for j in 0..NUM_FEATURES {
            if noisy.weight[j] == 0 {
                noisy.offset[j] = -7_000 + j as i32;
                noisy.input_min[j] = -5;
                noisy.input_max[j] = 3 + j as i32;
                noisy.product_shift[j] = j as u32 % 5;
            }
        }
        for x in [x_with(3, 0), x_with(5000, 7), [i32::MIN; NUM_FEATURES]] {
            let mut every_lane = m.bias;
            // Indexing by lane on purpose: the formula restated, lane by lane.
            #[allow(clippy::needless_range_loop)]
            for j in 0..NUM_FEATURES {
                let c = x[j].clamp(noisy.input_min[j], noisy.input_max[j]) as i64;
                let d = c - noisy.offset[j] as i64;
                every_lane += (d * noisy.weight[j] as i64) >> noisy.product_shift[j];
            }
            assert_eq!(linear_score(&noisy, &x), every_lane);
            assert_eq!(linear_score(&noisy, &x), linear_score(&m, &x));
        }
    }

    #[test]
    fn hostile_models_do_not_trap() {
        let mut m = LinearModel::zeroed();
        m.kind = 99;
        m.rule = VerdictRule::DelayOverBudget as u32;
        m.out_shift = u32::MAX;
        m.bias = i64::MAX;
        m.threshold = i64::MAX;
        m.weight = [i32::MIN; NUM_FEATURES];
        m.offset = [i32::MAX; NUM_FEATURES];
        m.input_min = [i32::MAX; NUM_FEATURES];
        m.input_max = [i32::MIN; NUM_FEATURES];
        m.product_shift = [u32::MAX; NUM_FEATURES];
        for x in [
            [i32::MIN; NUM_FEATURES],
            [i32::MAX; NUM_FEATURES],
            [0; NUM_FEATURES],
        ] {
            let _ = infer_linear(&m, &x);
            m.rule = 77;
            assert!(!infer_linear(&m, &x).at_risk);
            m.rule = VerdictRule::DelayOverBudget as u32;
        }

        let mut t = TreeModel::zeroed();
        t.feature = [200; TREE_MAX_NODES];
        t.left = [u16::MAX; TREE_MAX_NODES];
        t.right = [u16::MAX; TREE_MAX_NODES];
        let _ = infer_tree(&t, &[0; NUM_FEATURES]);
        // A cycle (node 0 -> 0) stops after TREE_MAX_DEPTH steps.
        t.feature = [0; TREE_MAX_NODES];
        t.left = [0; TREE_MAX_NODES];
        t.value[0] = 9;
        assert_eq!(infer_tree(&t, &[0; NUM_FEATURES]).score, 9);
    }

    #[test]
    fn tree_walks_left_on_less_or_equal() {
        let mut t = TreeModel::zeroed();
        t.kind = ModelKind::Tree as u32;
        t.node_count = 3;
        t.depth = 1;
        t.threshold = 50;
        t.feature = [TREE_LEAF; TREE_MAX_NODES];
        t.feature[0] = Feature::QueuedSameDir.index() as u8;
        t.split[0] = 7;
        t.left[0] = 1;
        t.right[0] = 2;
        t.value[1] = 10;
        t.value[2] = 90;
        assert_eq!(t.validate(), Ok(()));
        assert_eq!(
            infer_tree(&t, &x_with(7, 0)),
            Prediction {
                score: 10,
                at_risk: false
            }
        );
        assert_eq!(
            infer_tree(&t, &x_with(8, 0)),
            Prediction {
                score: 90,
                at_risk: true
            }
        );
    }
}
