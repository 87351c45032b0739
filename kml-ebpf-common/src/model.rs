//! Model parameters as the kernel reads them: `#[repr(C)]`, integers only.
//!
//! A model slot in a BPF map holds one of these whole. The agent writes the idle
//! slot, [`LinearModel::seal`]s / [`TreeModel::seal`]s it (version + checksum), then
//! flips the active index; a reader that finds a checksum mismatch has a torn or
//! corrupt slot and must not use it. The structs are a few hundred bytes (linear) to
//! a few KiB (tree): the programs read them through the map value pointer, never
//! copy them to the 512-byte stack.
//!
//! Fixed point: a linear model's score is in units of `2^-out_shift` of its output
//! (predicted dispatch delay in "µs" for regressions, log-odds of a miss for the
//! logistic model). Every scale is a power of two, so the kernel only shifts.

use crate::features::{Feature, NUM_FEATURES};

/// Largest `LinearModel::out_shift`: keeps `budget << out_shift` below 2^62
/// (the budget feature is capped at 2^30).
pub const MAX_OUT_SHIFT: u32 = 32;
/// Largest per-feature product shift of a linear model.
pub const MAX_PRODUCT_SHIFT: u32 = 62;
/// A validated linear model's accumulator never exceeds this in magnitude, whatever
/// the (clipped) inputs: there is headroom left for the budget comparison.
pub const ACC_LIMIT: u64 = 1 << 62;

/// Deepest tree the kernel traverses (edges from root to leaf).
pub const TREE_MAX_DEPTH: usize = 8;
/// Node arrays' length: a full tree of depth [`TREE_MAX_DEPTH`] has 511 nodes.
pub const TREE_MAX_NODES: usize = 512;
/// `TreeModel::feature` value of a leaf.
pub const TREE_LEAF: u8 = 0xff;

/// What a model slot holds (the `kind` field).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// KML's baseline: linear regression of the dispatch delay on KML's two features.
    Baseline = 1,
    /// Linear regression of the dispatch delay on the full feature vector.
    LinearRegression = 2,
    /// Logistic regression of the miss class.
    Logistic = 3,
    /// Decision tree; leaves hold the miss probability.
    Tree = 4,
}

impl ModelKind {
    pub const ALL: [ModelKind; 4] = [
        ModelKind::Baseline,
        ModelKind::LinearRegression,
        ModelKind::Logistic,
        ModelKind::Tree,
    ];

    pub const fn from_u32(v: u32) -> Option<ModelKind> {
        match v {
            1 => Some(ModelKind::Baseline),
            2 => Some(ModelKind::LinearRegression),
            3 => Some(ModelKind::Logistic),
            4 => Some(ModelKind::Tree),
            _ => None,
        }
    }

    /// Name used on the command line and in model files.
    pub const fn name(self) -> &'static str {
        match self {
            ModelKind::Baseline => "baseline",
            ModelKind::LinearRegression => "linear",
            ModelKind::Logistic => "logistic",
            ModelKind::Tree => "tree",
        }
    }

    pub fn from_name(name: &str) -> Option<ModelKind> {
        ModelKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Kinds stored as a [`LinearModel`].
    pub const fn is_linear(self) -> bool {
        !matches!(self, ModelKind::Tree)
    }

    /// The verdict rule this kind uses.
    pub const fn verdict_rule(self) -> VerdictRule {
        match self {
            ModelKind::Baseline | ModelKind::LinearRegression => VerdictRule::DelayOverBudget,
            ModelKind::Logistic | ModelKind::Tree => VerdictRule::ScoreOverThreshold,
        }
    }
}

/// How a linear model's score becomes a verdict (the `rule` field).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerdictRule {
    /// At risk when `score > threshold` (classifiers: the score is a log-odds or a
    /// probability).
    ScoreOverThreshold = 1,
    /// At risk when the predicted delay exceeds the time left to the deadline:
    /// `score > (deadline_budget_us << out_shift) + threshold` (regressions).
    DelayOverBudget = 2,
}

impl VerdictRule {
    pub const fn from_u32(v: u32) -> Option<VerdictRule> {
        match v {
            1 => Some(VerdictRule::ScoreOverThreshold),
            2 => Some(VerdictRule::DelayOverBudget),
            _ => None,
        }
    }
}

/// A linear model in fixed point (baseline, linear regression, logistic).
///
/// ```text
/// x'_j  = clamp(x_j, input_min_j, input_max_j)
/// acc   = bias + Σ_j ((x'_j - offset_j) * weight_j) >> product_shift_j      (i64)
/// score = acc                       in units of 2^-out_shift
/// ```
/// `(x' - offset)` fits in 33 bits and `weight` in 32, so each product fits in i64;
/// [`LinearModel::validate`] proves the sum stays below [`ACC_LIMIT`] for all inputs.
/// A feature the model does not use has weight 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearModel {
    /// [`ModelKind`] as u32.
    pub kind: u32,
    /// [`VerdictRule`] as u32.
    pub rule: u32,
    /// Bumped by the agent on every slot write; covered by the checksum.
    pub version: u32,
    /// The score's unit is `2^-out_shift`; at most [`MAX_OUT_SHIFT`].
    pub out_shift: u32,
    /// Intercept, in score units (already includes every offset correction).
    pub bias: i64,
    /// Verdict threshold, in score units (see [`VerdictRule`]).
    pub threshold: i64,
    pub weight: [i32; NUM_FEATURES],
    /// Subtracted from the clipped input (the learned centre of the feature).
    pub offset: [i32; NUM_FEATURES],
    /// Inputs are clipped to `[input_min, input_max]` (learned on training data).
    pub input_min: [i32; NUM_FEATURES],
    pub input_max: [i32; NUM_FEATURES],
    /// Arithmetic right shift applied to each product (per-feature precision).
    pub product_shift: [u32; NUM_FEATURES],
    /// Explicit padding: an odd number of lanes leaves 4 bytes before the u64
    /// checksum, and a map value must not hold bytes no field names (always 0).
    pub _pad: [u32; NUM_FEATURES % 2],
    /// FNV-1a 64 of every field above (see [`LinearModel::compute_checksum`]).
    pub checksum: u64,
}

/// A decision tree as flat arrays; traversal is at most [`TREE_MAX_DEPTH`] steps.
///
/// Node 0 is the root. An inner node goes left when `x[feature] <= split`, else
/// right; children always have larger indices than their parent. A leaf has
/// `feature == TREE_LEAF`. Every node's `value` is the miss probability of the
/// training requests that reached it, in units of `2^-value_shift`: a traversal cut
/// short still has an answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeModel {
    /// [`ModelKind::Tree`] as u32.
    pub kind: u32,
    pub version: u32,
    /// Nodes in use (the rest of the arrays is zero).
    pub node_count: u32,
    /// Longest root-to-leaf path, at most [`TREE_MAX_DEPTH`].
    pub depth: u32,
    /// At risk when a leaf's value is above this.
    pub threshold: i32,
    /// Leaf values are in units of `2^-value_shift`.
    pub value_shift: u32,
    pub feature: [u8; TREE_MAX_NODES],
    pub left: [u16; TREE_MAX_NODES],
    pub right: [u16; TREE_MAX_NODES],
    pub split: [i32; TREE_MAX_NODES],
    pub value: [i32; TREE_MAX_NODES],
    /// FNV-1a 64 of every field above (see [`TreeModel::compute_checksum`]).
    pub checksum: u64,
}

// No implicit padding: the structs cross the user/kernel boundary as bytes.
const _: () = assert!(
    core::mem::size_of::<LinearModel>()
        == 4 * 4 + 2 * 8 + 5 * 4 * NUM_FEATURES + 4 * (NUM_FEATURES % 2) + 8
);
const _: () =
    assert!(core::mem::size_of::<TreeModel>() == 6 * 4 + TREE_MAX_NODES * (1 + 2 + 2 + 4 + 4) + 8);
const _: () = assert!(
    TREE_MAX_NODES >= (1 << (TREE_MAX_DEPTH + 1)) - 1 && TREE_MAX_NODES <= u16::MAX as usize
);
const _: () = assert!(NUM_FEATURES < TREE_LEAF as usize);

/// FNV-1a, 64 bit, fed integers as little-endian bytes (so host and BPF agree
/// whatever their byte order). Integer-only; loops are bounded by array lengths.
#[derive(Clone, Copy)]
pub struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub const fn new() -> Self {
        Fnv1a(Self::OFFSET_BASIS)
    }

    #[inline(always)]
    pub fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ b as u64).wrapping_mul(Self::PRIME);
    }

    #[inline(always)]
    pub fn u16(&mut self, v: u16) {
        self.byte(v as u8);
        self.byte((v >> 8) as u8);
    }

    #[inline(always)]
    pub fn u32(&mut self, v: u32) {
        self.u16(v as u16);
        self.u16((v >> 16) as u16);
    }

    #[inline(always)]
    pub fn u64(&mut self, v: u64) {
        self.u32(v as u32);
        self.u32((v >> 32) as u32);
    }

    pub const fn finish(self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a model is not fit to run (host-side validation; integer-only, so the
/// programs could use it too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFault {
    /// `kind` is not a [`ModelKind`] of this struct.
    Kind,
    /// `rule` is not the [`VerdictRule`] of the kind.
    Rule,
    /// `out_shift` above [`MAX_OUT_SHIFT`].
    OutShift,
    /// `product_shift[i]` above [`MAX_PRODUCT_SHIFT`].
    ProductShift(usize),
    /// `input_min[i] > input_max[i]`.
    InputRange(usize),
    /// Worst-case accumulator magnitude at or above [`ACC_LIMIT`].
    AccumulatorBound,
    /// `node_count` is 0 or above [`TREE_MAX_NODES`].
    NodeCount,
    /// `depth` above [`TREE_MAX_DEPTH`], or a path longer than `depth`.
    Depth,
    /// `value_shift` above 30.
    ValueShift,
    /// Node `i` names a feature that does not exist.
    NodeFeature(usize),
    /// Node `i` has a child index that is not after it or not below `node_count`.
    NodeChild(usize),
    /// Node `i` is reached twice or never.
    NodeReach(usize),
    /// `checksum` does not match the contents.
    Checksum,
}

impl ModelFault {
    /// The struct field at fault, for messages.
    pub const fn field(self) -> &'static str {
        match self {
            ModelFault::Kind => "kind",
            ModelFault::Rule => "rule",
            ModelFault::OutShift => "out_shift",
            ModelFault::ProductShift(_) => "product_shift",
            ModelFault::InputRange(_) => "input_min/input_max",
            ModelFault::AccumulatorBound => "weight/bias",
            ModelFault::NodeCount => "node_count",
            ModelFault::Depth => "depth",
            ModelFault::ValueShift => "value_shift",
            ModelFault::NodeFeature(_) => "feature",
            ModelFault::NodeChild(_) => "left/right",
            ModelFault::NodeReach(_) => "left/right",
            ModelFault::Checksum => "checksum",
        }
    }
}

impl LinearModel {
    pub const fn zeroed() -> Self {
        LinearModel {
            kind: 0,
            rule: 0,
            version: 0,
            out_shift: 0,
            bias: 0,
            threshold: 0,
            weight: [0; NUM_FEATURES],
            offset: [0; NUM_FEATURES],
            input_min: [0; NUM_FEATURES],
            input_max: [0; NUM_FEATURES],
            product_shift: [0; NUM_FEATURES],
            _pad: [0; NUM_FEATURES % 2],
            checksum: 0,
        }
    }

    pub const fn model_kind(&self) -> Option<ModelKind> {
        ModelKind::from_u32(self.kind)
    }

    /// FNV-1a 64 over every field but `checksum`, in declaration order.
    pub fn compute_checksum(&self) -> u64 {
        let mut h = Fnv1a::new();
        h.u32(self.kind);
        h.u32(self.rule);
        h.u32(self.version);
        h.u32(self.out_shift);
        h.u64(self.bias as u64);
        h.u64(self.threshold as u64);
        for v in self.weight.iter() {
            h.u32(*v as u32);
        }
        for v in self.offset.iter() {
            h.u32(*v as u32);
        }
        for v in self.input_min.iter() {
            h.u32(*v as u32);
        }
        for v in self.input_max.iter() {
            h.u32(*v as u32);
        }
        for v in self.product_shift.iter() {
            h.u32(*v);
        }
        h.finish()
    }

    /// Sets `version` and the checksum: call after the last change, before publishing.
    pub fn seal(&mut self, version: u32) {
        self.version = version;
        self.checksum = self.compute_checksum();
    }

    /// The checksum matches: the slot is whole.
    pub fn checksum_ok(&self) -> bool {
        self.checksum == self.compute_checksum()
    }

    /// Worst-case |accumulator| over every input, computed without overflow
    /// (saturating at `u64::MAX`). Only meaningful once shifts and ranges are valid.
    pub fn accumulator_bound(&self) -> u64 {
        let mut total = self.bias.unsigned_abs();
        for j in 0..NUM_FEATURES {
            let off = self.offset[j] as i64;
            let lo = (self.input_min[j] as i64 - off).unsigned_abs();
            let hi = (self.input_max[j] as i64 - off).unsigned_abs();
            let d = if lo > hi { lo } else { hi };
            // d < 2^32 and |w| <= 2^31: the product is below 2^63.
            let p = d * (self.weight[j] as i64).unsigned_abs();
            // Arithmetic shift of a negative product rounds towards -inf: one more unit.
            let term = (p >> self.product_shift[j].min(63)) + 1;
            total = total.saturating_add(term);
        }
        total
    }

    /// Checks everything the integer routine relies on (not the checksum: see
    /// [`LinearModel::checksum_ok`]).
    pub fn validate(&self) -> Result<(), ModelFault> {
        let kind = match self.model_kind() {
            Some(k) if k.is_linear() => k,
            _ => return Err(ModelFault::Kind),
        };
        if VerdictRule::from_u32(self.rule) != Some(kind.verdict_rule()) {
            return Err(ModelFault::Rule);
        }
        if self.out_shift > MAX_OUT_SHIFT {
            return Err(ModelFault::OutShift);
        }
        for j in 0..NUM_FEATURES {
            if self.product_shift[j] > MAX_PRODUCT_SHIFT {
                return Err(ModelFault::ProductShift(j));
            }
            if self.input_min[j] > self.input_max[j] {
                return Err(ModelFault::InputRange(j));
            }
        }
        if self.accumulator_bound() >= ACC_LIMIT || self.threshold.unsigned_abs() >= ACC_LIMIT {
            return Err(ModelFault::AccumulatorBound);
        }
        Ok(())
    }

    /// The features this model gives a non-zero weight.
    pub fn uses(&self, f: Feature) -> bool {
        self.weight[f.index()] != 0
    }
}

impl TreeModel {
    pub const fn zeroed() -> Self {
        TreeModel {
            kind: 0,
            version: 0,
            node_count: 0,
            depth: 0,
            threshold: 0,
            value_shift: 0,
            feature: [0; TREE_MAX_NODES],
            left: [0; TREE_MAX_NODES],
            right: [0; TREE_MAX_NODES],
            split: [0; TREE_MAX_NODES],
            value: [0; TREE_MAX_NODES],
            checksum: 0,
        }
    }

    /// FNV-1a 64 over every field but `checksum`, in declaration order.
    pub fn compute_checksum(&self) -> u64 {
        let mut h = Fnv1a::new();
        h.u32(self.kind);
        h.u32(self.version);
        h.u32(self.node_count);
        h.u32(self.depth);
        h.u32(self.threshold as u32);
        h.u32(self.value_shift);
        for v in self.feature.iter() {
            h.byte(*v);
        }
        for v in self.left.iter() {
            h.u16(*v);
        }
        for v in self.right.iter() {
            h.u16(*v);
        }
        for v in self.split.iter() {
            h.u32(*v as u32);
        }
        for v in self.value.iter() {
            h.u32(*v as u32);
        }
        h.finish()
    }

    /// Sets `version` and the checksum: call after the last change, before publishing.
    pub fn seal(&mut self, version: u32) {
        self.version = version;
        self.checksum = self.compute_checksum();
    }

    pub fn checksum_ok(&self) -> bool {
        self.checksum == self.compute_checksum()
    }

    /// Checks the structure: a tree (every node reached exactly once from the root),
    /// children after parents, no path longer than `depth` <= [`TREE_MAX_DEPTH`].
    pub fn validate(&self) -> Result<(), ModelFault> {
        if self.kind != ModelKind::Tree as u32 {
            return Err(ModelFault::Kind);
        }
        let n = self.node_count as usize;
        if n == 0 || n > TREE_MAX_NODES {
            return Err(ModelFault::NodeCount);
        }
        if self.depth as usize > TREE_MAX_DEPTH {
            return Err(ModelFault::Depth);
        }
        if self.value_shift > 30 {
            return Err(ModelFault::ValueShift);
        }
        // Children come after their parent, so one forward pass assigns depths.
        let mut node_depth = [0u8; TREE_MAX_NODES];
        let mut reached = [false; TREE_MAX_NODES];
        reached[0] = true;
        for i in 0..n {
            if !reached[i] {
                return Err(ModelFault::NodeReach(i));
            }
            if self.feature[i] == TREE_LEAF {
                continue;
            }
            if self.feature[i] as usize >= NUM_FEATURES {
                return Err(ModelFault::NodeFeature(i));
            }
            for child in [self.left[i] as usize, self.right[i] as usize] {
                if child <= i || child >= n {
                    return Err(ModelFault::NodeChild(i));
                }
                if reached[child] {
                    return Err(ModelFault::NodeReach(child));
                }
                reached[child] = true;
                node_depth[child] = node_depth[i] + 1;
                if node_depth[child] as u32 > self.depth {
                    return Err(ModelFault::Depth);
                }
            }
        }
        Ok(())
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), integers only, no padding (asserted above).
    unsafe impl aya::Pod for super::LinearModel {}
    unsafe impl aya::Pod for super::TreeModel {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_linear() -> LinearModel {
        let mut m = LinearModel::zeroed();
        m.kind = ModelKind::Logistic as u32;
        m.rule = VerdictRule::ScoreOverThreshold as u32;
        m.out_shift = 16;
        m.weight[0] = 3;
        m.input_max = [100; NUM_FEATURES];
        m
    }

    #[test]
    fn fnv1a_known_vectors() {
        // Published FNV-1a 64 test vectors: "" and "a".
        assert_eq!(Fnv1a::new().finish(), 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv1a::new();
        h.byte(b'a');
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn checksum_covers_every_field_and_version() {
        let mut m = small_linear();
        m.seal(1);
        assert!(m.checksum_ok());
        let base = m.checksum;
        let mut changed = m;
        changed.product_shift[NUM_FEATURES - 1] = 1;
        assert_ne!(changed.compute_checksum(), base);
        let mut changed = m;
        changed.version = 2;
        assert!(!changed.checksum_ok());
        changed.seal(2);
        assert!(changed.checksum_ok());

        let mut t = TreeModel::zeroed();
        t.kind = ModelKind::Tree as u32;
        t.node_count = 1;
        t.feature[0] = TREE_LEAF;
        t.seal(7);
        assert!(t.checksum_ok());
        t.value[TREE_MAX_NODES - 1] = 1;
        assert!(!t.checksum_ok());
    }

    #[test]
    fn linear_validation_names_the_fault() {
        assert_eq!(small_linear().validate(), Ok(()));
        let mut m = small_linear();
        m.rule = VerdictRule::DelayOverBudget as u32;
        assert_eq!(m.validate(), Err(ModelFault::Rule));
        let mut m = small_linear();
        m.product_shift[4] = 63;
        assert_eq!(m.validate(), Err(ModelFault::ProductShift(4)));
        let mut m = small_linear();
        m.input_min[2] = 101;
        assert_eq!(m.validate(), Err(ModelFault::InputRange(2)));
        let mut m = small_linear();
        m.weight = [i32::MIN; NUM_FEATURES];
        m.input_min = [i32::MIN; NUM_FEATURES];
        m.input_max = [i32::MAX; NUM_FEATURES];
        assert_eq!(m.validate(), Err(ModelFault::AccumulatorBound));
        m.product_shift = [5; NUM_FEATURES];
        assert_eq!(m.validate(), Ok(()));
    }

    #[test]
    fn tree_validation_rejects_bad_shapes() {
        let mut t = TreeModel::zeroed();
        t.kind = ModelKind::Tree as u32;
        t.node_count = 3;
        t.depth = 1;
        t.feature = [TREE_LEAF; TREE_MAX_NODES];
        t.feature[0] = 2;
        t.left[0] = 1;
        t.right[0] = 2;
        assert_eq!(t.validate(), Ok(()));

        let mut bad = t;
        bad.right[0] = 1;
        assert_eq!(bad.validate(), Err(ModelFault::NodeReach(1)));
        let mut bad = t;
        bad.left[0] = 0;
        assert_eq!(bad.validate(), Err(ModelFault::NodeChild(0)));
        let mut bad = t;
        bad.feature[0] = NUM_FEATURES as u8;
        assert_eq!(bad.validate(), Err(ModelFault::NodeFeature(0)));
        let mut bad = t;
        bad.depth = 0;
        assert_eq!(bad.validate(), Err(ModelFault::Depth));
        let mut bad = t;
        bad.node_count = 4;
        assert_eq!(bad.validate(), Err(ModelFault::NodeReach(3)));
    }
}
