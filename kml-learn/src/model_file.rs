//! Model files: readable, versioned JSON holding both forms of a model and what is
//! known about it.
//!
//! ```json
//! { "schema_version": 1, "kind": "logistic",
//!   "features": ["queued", "inflight_read", ...],          // names, in this file's order
//!   "time_unit_ns": 1024,
//!   "scaling": [{"clip_min": 0, "clip_max": 80, "mean": 3.1, "std": 4.2}, ...],
//!   "float":     {"linear": {"intercept": ..., "weights": [...], "threshold": ...}},
//!   "quantized": {"linear": {"out_shift": 24, "bias": ..., "weights": [...], ...}},
//!   "training": {...}, "metrics": {...} }
//! ```
//! Per-feature arrays follow the order of `features`, so a file stays readable when
//! the kernel's feature vector grows. Loading checks everything (schema version,
//! names, lengths, ranges, that the quantised part is the quantised float part, and
//! the kernel struct's own validation) and names the offending field.

use std::{collections::HashSet, path::Path};

use kml_ebpf_common::{
    features::{Feature, FeatureVector, KML_BASELINE_FEATURES, NUM_FEATURES, TIME_SHIFT},
    inference::infer_linear,
    model::{
        LinearModel, ModelFault, ModelKind, TreeModel, MAX_OUT_SHIFT, TREE_LEAF, TREE_MAX_NODES,
    },
};
use serde::{Deserialize, Serialize};

use crate::{
    error::{LearnError, Result},
    evaluate::Evaluation,
    float_model::{FeatureScaling, FloatLinearModel, FloatModel, FloatTreeModel, FloatTreeNode},
    quantize::{linear_error_bound, QuantizedModel},
    train::{TrainedModel, TrainingInfo},
};

/// The schema this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub schema_version: u32,
    /// `baseline`, `linear`, `logistic` or `tree`.
    pub kind: String,
    /// Feature names; every per-feature array below is in this order.
    pub features: Vec<String>,
    /// Unit of the time features and delays, ns (1024: a shift in the kernel).
    pub time_unit_ns: u64,
    /// Linear kinds: each feature's clip range and standardisation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scaling: Vec<FeatureScaling>,
    pub float: FloatParams,
    pub quantized: QuantizedParams,
    pub training: TrainingInfo,
    #[serde(default)]
    pub metrics: Metrics,
    /// The kind of device and scheduler setting the model was made for. Absent: a
    /// general model (the shipped defaults, trained on host disks), what
    /// `kml-agent run --model auto` starts from on a disk no specific model fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceRegime>,
}

/// The devices a model was made for: where its held-back score means something.
/// `kml-agent run --model auto` prefers a model whose regime fits every disk it
/// serves, and never takes one that fits none of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRegime {
    /// What the training disk was (free text: driver, throttling, host).
    pub description: String,
    /// Hardware tags per queue (`/sys/block/DEV/mq/*/nr_tags`) it applies to,
    /// inclusive range: how many requests the device holds, so how many wait in
    /// the scheduler.
    pub hw_queue_depth: [u32; 2],
    /// mq-deadline `read_expire` (ms) it applies to, inclusive range.
    pub read_expire_ms: [u64; 2],
}

impl DeviceRegime {
    /// Whether a disk with this hardware queue depth and read expiry is one the
    /// model was made for.
    pub fn fits(&self, hw_queue_depth: u32, read_expire_ms: u64) -> bool {
        let [dlo, dhi] = self.hw_queue_depth;
        let [rlo, rhi] = self.read_expire_ms;
        (dlo..=dhi).contains(&hw_queue_depth) && (rlo..=rhi).contains(&read_expire_ms)
    }

    /// `lo-hi` or a single value, e.g. `1`, `64-256`.
    pub fn parse_range(text: &str) -> std::result::Result<[u64; 2], String> {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|e| format!("`{t}` is not a number ({e})"))
        };
        let [lo, hi] = match text.split_once('-') {
            Some((a, b)) => [num(a)?, num(b)?],
            None => {
                let v = num(text)?;
                [v, v]
            }
        };
        if lo > hi {
            return Err(format!("`{text}`: {lo} is above {hi}"));
        }
        Ok([lo, hi])
    }
}

impl std::fmt::Display for DeviceRegime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = |[lo, hi]: [u64; 2]| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        };
        let [dlo, dhi] = self.hw_queue_depth;
        write!(
            f,
            "{} (hardware queue depth {}, read_expire {} ms)",
            self.description,
            range([dlo as u64, dhi as u64]),
            range(self.read_expire_ms)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FloatParams {
    Linear(FloatLinearParams),
    Tree(FloatTreeParams),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatLinearParams {
    pub intercept: f64,
    /// Per standardised feature.
    pub weights: Vec<f64>,
    /// Regressions: on `predicted delay - budget` ("µs"); logistic: on the log-odds.
    pub threshold: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatTreeParams {
    /// On the leaf's miss probability.
    pub threshold: f64,
    pub nodes: Vec<FloatNodeParams>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatNodeParams {
    /// `null` for a leaf.
    pub feature: Option<String>,
    #[serde(default)]
    pub split: f64,
    #[serde(default)]
    pub left: usize,
    #[serde(default)]
    pub right: usize,
    pub p_miss: f64,
    pub samples: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum QuantizedParams {
    Linear(QuantizedLinearParams),
    Tree(QuantizedTreeParams),
}

/// The fields of the kernel's `LinearModel`, per-feature arrays in file order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizedLinearParams {
    pub out_shift: u32,
    pub bias: i64,
    pub threshold: i64,
    pub weights: Vec<i32>,
    pub offsets: Vec<i32>,
    pub input_min: Vec<i32>,
    pub input_max: Vec<i32>,
    pub product_shifts: Vec<u32>,
}

/// The fields of the kernel's `TreeModel`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizedTreeParams {
    pub value_shift: u32,
    pub threshold: i32,
    pub depth: u32,
    pub nodes: Vec<QuantizedNodeParams>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizedNodeParams {
    pub feature: Option<String>,
    #[serde(default)]
    pub split: i32,
    #[serde(default)]
    pub left: u16,
    #[serde(default)]
    pub right: u16,
    pub value: i32,
}

/// Evaluations made when the model was trained.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// On the held-back later window of the training trace.
    pub test: Option<Evaluation>,
    /// KML's baseline trained on the same windows, same held-back window.
    pub baseline_test: Option<Evaluation>,
}

/// A model file read, validated and turned into both runnable forms.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub file: ModelFile,
    pub float: FloatModel,
    pub quantized: QuantizedModel,
}

impl ModelFile {
    pub fn from_trained(m: &TrainedModel) -> ModelFile {
        let features: Vec<Feature> = m.float.features().to_vec();
        let names = features.iter().map(|f| f.name().to_string()).collect();
        let (scaling, float) = match &m.float {
            FloatModel::Linear(l) => (
                l.scaling.clone(),
                FloatParams::Linear(FloatLinearParams {
                    intercept: l.intercept,
                    weights: l.weights.clone(),
                    threshold: l.threshold,
                }),
            ),
            FloatModel::Tree(t) => (
                Vec::new(),
                FloatParams::Tree(FloatTreeParams {
                    threshold: t.threshold,
                    nodes: t
                        .nodes
                        .iter()
                        .map(|n| FloatNodeParams {
                            feature: n.feature.map(|f| f.name().to_string()),
                            split: n.split,
                            left: n.left,
                            right: n.right,
                            p_miss: n.p_miss,
                            samples: n.samples,
                        })
                        .collect(),
                }),
            ),
        };
        let quantized = match &m.quantized {
            QuantizedModel::Linear(q) => {
                let pick =
                    |a: &[i32; NUM_FEATURES]| features.iter().map(|f| a[f.index()]).collect();
                QuantizedParams::Linear(QuantizedLinearParams {
                    out_shift: q.out_shift,
                    bias: q.bias,
                    threshold: q.threshold,
                    weights: pick(&q.weight),
                    offsets: pick(&q.offset),
                    input_min: pick(&q.input_min),
                    input_max: pick(&q.input_max),
                    product_shifts: features
                        .iter()
                        .map(|f| q.product_shift[f.index()])
                        .collect(),
                })
            }
            QuantizedModel::Tree(q) => QuantizedParams::Tree(QuantizedTreeParams {
                value_shift: q.value_shift,
                threshold: q.threshold,
                depth: q.depth,
                nodes: (0..q.node_count as usize)
                    .map(|i| {
                        let leaf = q.feature[i] == TREE_LEAF;
                        QuantizedNodeParams {
                            feature: (!leaf)
                                .then(|| Feature::ALL[q.feature[i] as usize].name().to_string()),
                            split: q.split[i],
                            left: q.left[i],
                            right: q.right[i],
                            value: q.value[i],
                        }
                    })
                    .collect(),
            }),
        };
        ModelFile {
            schema_version: SCHEMA_VERSION,
            kind: m.float.kind().name().into(),
            features: names,
            time_unit_ns: 1 << TIME_SHIFT,
            scaling,
            float,
            quantized,
            training: m.training.clone(),
            metrics: Metrics {
                test: m.test.clone(),
                baseline_test: m.baseline_test.clone(),
            },
            device: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a model file always serialises")
    }

    /// Parses and validates `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<LoadedModel> {
        // Read the schema version first: a newer file gets a clear message instead of
        // a complaint about a field this build does not know.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|error| LearnError::ModelJson {
                path: origin.into(),
                error,
            })?;
        let bad = |field: &str, problem: String| LearnError::BadModelFile {
            path: origin.into(),
            field: field.into(),
            problem,
        };
        match value.get("schema_version").map(|v| v.as_u64()) {
            None => return Err(bad("schema_version", "missing".into())),
            Some(Some(v)) if v == SCHEMA_VERSION as u64 => {}
            Some(v) => {
                return Err(bad(
                    "schema_version",
                    format!(
                        "{} is not supported (this build reads {SCHEMA_VERSION})",
                        v.map_or("non-integer".into(), |v| v.to_string())
                    ),
                ))
            }
        }
        let file: ModelFile =
            serde_json::from_value(value).map_err(|error| LearnError::ModelJson {
                path: origin.into(),
                error,
            })?;
        let (float, quantized) = Validator { origin }.check(&file)?;
        Ok(LoadedModel {
            file,
            float,
            quantized,
        })
    }
}

impl LoadedModel {
    pub fn load(path: &Path) -> Result<LoadedModel> {
        let text = std::fs::read_to_string(path).map_err(|error| LearnError::Io {
            path: path.into(),
            error,
        })?;
        ModelFile::parse(&text, &path.display().to_string())
    }

    pub fn kind(&self) -> ModelKind {
        self.float.kind()
    }
}

/// Writes a trained model's file (pretty JSON, trailing newline).
pub fn save(m: &TrainedModel, path: &Path) -> Result<()> {
    write(&ModelFile::from_trained(m), path)
}

/// Writes a model file (pretty JSON, trailing newline), whole or not at all: into
/// a temporary file beside `path`, synced, then renamed over it. A failed write (a
/// full disk) leaves the file that was there as it was, and no temporary: a model
/// an agent starts from is never cut. (A symlink at `path` is replaced, not
/// written through.)
pub fn write(file: &ModelFile, path: &Path) -> Result<()> {
    use std::io::Write as _;
    let mut text = file.to_json();
    text.push('\n');
    let io = |error| LearnError::Io {
        path: path.into(),
        error,
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // `create_new`: a path that exists already (a symlink planted there, or another
    // writer's temporary) is refused, never followed or removed.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io)?;
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|error| {
        let _ = std::fs::remove_file(&tmp);
        io(error)
    })
}

/// Field-by-field checks of a parsed file.
struct Validator<'a> {
    origin: &'a str,
}

impl Validator<'_> {
    fn bad(&self, field: impl Into<String>, problem: impl Into<String>) -> LearnError {
        LearnError::BadModelFile {
            path: self.origin.into(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn check(&self, f: &ModelFile) -> Result<(FloatModel, QuantizedModel)> {
        let kind = ModelKind::from_name(&f.kind).ok_or_else(|| {
            self.bad(
                "kind",
                format!(
                    "unknown kind `{}` (known: baseline, linear, logistic, tree)",
                    f.kind
                ),
            )
        })?;
        if f.time_unit_ns != 1 << TIME_SHIFT {
            return Err(self.bad(
                "time_unit_ns",
                format!(
                    "{} (this build uses {})",
                    f.time_unit_ns,
                    1u64 << TIME_SHIFT
                ),
            ));
        }
        let features = self.features(f, kind)?;
        if let Some(d) = &f.device {
            if d.hw_queue_depth[0] > d.hw_queue_depth[1] {
                return Err(self.bad(
                    "device.hw_queue_depth",
                    "the range is empty (low above high)",
                ));
            }
            if d.read_expire_ms[0] > d.read_expire_ms[1] {
                return Err(self.bad(
                    "device.read_expire_ms",
                    "the range is empty (low above high)",
                ));
            }
        }
        match (&f.float, &f.quantized) {
            (FloatParams::Linear(fl), QuantizedParams::Linear(ql)) if kind.is_linear() => {
                let float = self.float_linear(f, kind, &features, fl)?;
                let quantized = self.quantized_linear(kind, &features, ql, &float)?;
                Ok((
                    FloatModel::Linear(float),
                    QuantizedModel::Linear(Box::new(quantized)),
                ))
            }
            (FloatParams::Tree(ft), QuantizedParams::Tree(qt)) if !kind.is_linear() => {
                let float = self.float_tree(&features, ft)?;
                let quantized = self.quantized_tree(&float, qt)?;
                Ok((
                    FloatModel::Tree(float),
                    QuantizedModel::Tree(Box::new(quantized)),
                ))
            }
            (FloatParams::Linear(_), _) if !kind.is_linear() => {
                Err(self.bad("float", "a tree needs `tree` parameters"))
            }
            (FloatParams::Tree(_), _) if kind.is_linear() => Err(self.bad(
                "float",
                format!("a {} model needs `linear` parameters", kind.name()),
            )),
            _ => Err(self.bad("quantized", "its form (linear/tree) does not match `float`")),
        }
    }

    fn features(&self, f: &ModelFile, kind: ModelKind) -> Result<Vec<Feature>> {
        if f.features.is_empty() {
            return Err(self.bad("features", "empty"));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, name) in f.features.iter().enumerate() {
            let feature = Feature::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
                self.bad(
                    format!("features[{i}]"),
                    format!("unknown feature `{name}` (known: {})", known.join(", ")),
                )
            })?;
            if !seen.insert(feature) {
                return Err(self.bad(
                    format!("features[{i}]"),
                    format!("`{name}` is listed twice"),
                ));
            }
            out.push(feature);
        }
        if kind == ModelKind::Baseline && out != KML_BASELINE_FEATURES {
            return Err(self.bad(
                "features",
                "the baseline uses exactly KML's two features: sector_mib, op",
            ));
        }
        Ok(out)
    }

    fn finite(&self, field: impl Into<String>, v: f64) -> Result<f64> {
        if v.is_finite() {
            Ok(v)
        } else {
            Err(self.bad(field, format!("{v} is not a finite number")))
        }
    }

    fn length<T>(&self, field: &str, v: &[T], n: usize) -> Result<()> {
        if v.len() != n {
            return Err(self.bad(field, format!("{} entries, `features` has {n}", v.len())));
        }
        Ok(())
    }

    fn float_linear(
        &self,
        f: &ModelFile,
        kind: ModelKind,
        features: &[Feature],
        p: &FloatLinearParams,
    ) -> Result<FloatLinearModel> {
        let n = features.len();
        self.length("scaling", &f.scaling, n)?;
        self.length("float.linear.weights", &p.weights, n)?;
        for (i, (s, feature)) in f.scaling.iter().zip(features).enumerate() {
            if s.clip_min > s.clip_max || s.clip_min < 0 || s.clip_max > feature.max_value() {
                return Err(self.bad(
                    format!("scaling[{i}].clip_min"),
                    format!(
                        "clip range {}..={} is not within {}'s range 0..={}",
                        s.clip_min,
                        s.clip_max,
                        feature.name(),
                        feature.max_value()
                    ),
                ));
            }
            self.finite(format!("scaling[{i}].mean"), s.mean)?;
            if !(s.std.is_finite() && s.std > 0.0) {
                return Err(self.bad(
                    format!("scaling[{i}].std"),
                    format!("{} is not a positive number", s.std),
                ));
            }
        }
        for (i, w) in p.weights.iter().enumerate() {
            self.finite(format!("float.linear.weights[{i}]"), *w)?;
        }
        Ok(FloatLinearModel {
            kind,
            features: features.to_vec(),
            scaling: f.scaling.clone(),
            weights: p.weights.clone(),
            intercept: self.finite("float.linear.intercept", p.intercept)?,
            threshold: self.finite("float.linear.threshold", p.threshold)?,
        })
    }

    fn quantized_linear(
        &self,
        kind: ModelKind,
        features: &[Feature],
        p: &QuantizedLinearParams,
        float: &FloatLinearModel,
    ) -> Result<LinearModel> {
        let n = features.len();
        for (field, len) in [
            ("quantized.linear.weights", p.weights.len()),
            ("quantized.linear.offsets", p.offsets.len()),
            ("quantized.linear.input_min", p.input_min.len()),
            ("quantized.linear.input_max", p.input_max.len()),
            ("quantized.linear.product_shifts", p.product_shifts.len()),
        ] {
            if len != n {
                return Err(self.bad(field, format!("{len} entries, `features` has {n}")));
            }
        }
        if p.out_shift > MAX_OUT_SHIFT {
            return Err(self.bad(
                "quantized.linear.out_shift",
                format!("{} is above {MAX_OUT_SHIFT}", p.out_shift),
            ));
        }
        let mut m = LinearModel::zeroed();
        m.kind = kind as u32;
        m.rule = kind.verdict_rule() as u32;
        m.out_shift = p.out_shift;
        m.bias = p.bias;
        m.threshold = p.threshold;
        for (i, f) in features.iter().enumerate() {
            let j = f.index();
            m.weight[j] = p.weights[i];
            m.offset[j] = p.offsets[i];
            m.input_min[j] = p.input_min[i];
            m.input_max[j] = p.input_max[i];
            m.product_shift[j] = p.product_shifts[i];
            let s = &float.scaling[i];
            if (m.input_min[j], m.input_max[j]) != (s.clip_min, s.clip_max) {
                return Err(self.bad(
                    format!("quantized.linear.input_min[{i}]"),
                    format!("input range differs from scaling[{i}]'s clip range"),
                ));
            }
        }
        let position = |j: usize| features.iter().position(|f| f.index() == j).unwrap_or(0);
        m.validate().map_err(|fault| {
            let (field, problem) = match fault {
                ModelFault::ProductShift(j) => (
                    format!("quantized.linear.product_shifts[{}]", position(j)),
                    "above 62",
                ),
                ModelFault::InputRange(j) => (
                    format!("quantized.linear.input_min[{}]", position(j)),
                    "above input_max",
                ),
                ModelFault::AccumulatorBound => (
                    "quantized.linear.weights".into(),
                    "the worst-case score overflows the 62-bit accumulator bound",
                ),
                other => (format!("quantized.linear.{}", other.field()), "invalid"),
            };
            self.bad(field, problem)
        })?;
        // The integer part must be the float part quantised: compare them where the
        // error bound is known, at the centre and at both corners of the input box.
        let unit = (p.out_shift as f64).exp2();
        let threshold_error = (p.threshold as f64 - float.threshold * unit).abs();
        if threshold_error > 0.5 + float.threshold.abs() * unit * 1e-9 {
            return Err(self.bad(
                "quantized.linear.threshold",
                "is not float.linear.threshold quantised",
            ));
        }
        let probes: [FeatureVector; 3] = [m.offset, m.input_min, m.input_max];
        for x in probes {
            let int = infer_linear(&m, &x).score as f64;
            let exact = float.score(&x) * unit;
            let magnitude: f64 = float.intercept.abs()
                + float
                    .features
                    .iter()
                    .zip(&float.scaling)
                    .zip(&float.weights)
                    .map(|((f, s), w)| {
                        (w / s.std).abs()
                            * (s.mean.abs() + x[f.index()].unsigned_abs() as f64 + 1.0)
                    })
                    .sum::<f64>();
            if (int - exact).abs() > linear_error_bound(&m, &x) + magnitude * unit * 1e-9 {
                return Err(self.bad(
                    "quantized.linear",
                    format!("is not the float parameters quantised (score {int} vs {exact:.1} at {x:?})"),
                ));
            }
        }
        m.seal(0);
        Ok(m)
    }

    fn float_tree(&self, features: &[Feature], p: &FloatTreeParams) -> Result<FloatTreeModel> {
        let n = p.nodes.len();
        if n == 0 || n > TREE_MAX_NODES {
            return Err(self.bad(
                "float.tree.nodes",
                format!("{n} nodes (1..={TREE_MAX_NODES} allowed)"),
            ));
        }
        let threshold = self.finite("float.tree.threshold", p.threshold)?;
        let mut nodes = Vec::with_capacity(n);
        for (i, node) in p.nodes.iter().enumerate() {
            let field = |name: &str| format!("float.tree.nodes[{i}].{name}");
            if !(0.0..=1.0).contains(&node.p_miss) {
                return Err(self.bad(
                    field("p_miss"),
                    format!("{} is not a probability", node.p_miss),
                ));
            }
            let feature = match &node.feature {
                None => None,
                Some(name) => {
                    let f = Feature::from_name(name)
                        .filter(|f| features.contains(f))
                        .ok_or_else(|| {
                            self.bad(
                                field("feature"),
                                format!("`{name}` is not one of `features`"),
                            )
                        })?;
                    self.finite(field("split"), node.split)?;
                    if node.left <= i || node.left >= n || node.right <= i || node.right >= n {
                        return Err(self.bad(
                            field("left"),
                            format!(
                                "children {}/{} must come after node {i} and before {n}",
                                node.left, node.right
                            ),
                        ));
                    }
                    Some(f)
                }
            };
            nodes.push(FloatTreeNode {
                feature,
                split: node.split,
                left: node.left,
                right: node.right,
                p_miss: node.p_miss,
                samples: node.samples,
            });
        }
        Ok(FloatTreeModel {
            features: features.to_vec(),
            nodes,
            threshold,
        })
    }

    fn quantized_tree(&self, float: &FloatTreeModel, p: &QuantizedTreeParams) -> Result<TreeModel> {
        if p.nodes.len() != float.nodes.len() {
            return Err(self.bad(
                "quantized.tree.nodes",
                format!(
                    "{} nodes, the float tree has {}",
                    p.nodes.len(),
                    float.nodes.len()
                ),
            ));
        }
        if p.value_shift > 30 {
            return Err(self.bad(
                "quantized.tree.value_shift",
                format!("{} is above 30", p.value_shift),
            ));
        }
        let unit = (p.value_shift as f64).exp2();
        let mut t = TreeModel::zeroed();
        t.kind = ModelKind::Tree as u32;
        t.node_count = p.nodes.len() as u32;
        t.depth = p.depth;
        t.threshold = p.threshold;
        t.value_shift = p.value_shift;
        if (p.threshold as f64 - (float.threshold * unit).floor()).abs() > 1.0 {
            return Err(self.bad(
                "quantized.tree.threshold",
                "is not float.tree.threshold quantised",
            ));
        }
        for (i, (q, fl)) in p.nodes.iter().zip(&float.nodes).enumerate() {
            let field = |name: &str| format!("quantized.tree.nodes[{i}].{name}");
            if q.feature.as_deref() != fl.feature.map(|f| f.name()) {
                return Err(self.bad(field("feature"), "differs from the float tree's"));
            }
            if (q.value as f64 - fl.p_miss * unit).abs() > 1.0 {
                return Err(self.bad(field("value"), "is not the float tree's p_miss quantised"));
            }
            t.value[i] = q.value;
            match fl.feature {
                None => t.feature[i] = TREE_LEAF,
                Some(f) => {
                    if (q.left as usize, q.right as usize) != (fl.left, fl.right) {
                        return Err(
                            self.bad(field("left"), "children differ from the float tree's")
                        );
                    }
                    if q.split as f64 != fl.split.floor().clamp(i32::MIN as f64, i32::MAX as f64) {
                        return Err(
                            self.bad(field("split"), "is not the floor of the float tree's split")
                        );
                    }
                    t.feature[i] = f.index() as u8;
                    t.split[i] = q.split;
                    t.left[i] = q.left;
                    t.right[i] = q.right;
                }
            }
        }
        t.validate().map_err(|fault| {
            let field = match fault {
                ModelFault::NodeChild(i)
                | ModelFault::NodeReach(i)
                | ModelFault::NodeFeature(i) => {
                    format!("quantized.tree.nodes[{i}].{}", fault.field())
                }
                other => format!("quantized.tree.{}", other.field()),
            };
            self.bad(field, format!("{fault:?}: not a valid tree of depth <= 8"))
        })?;
        t.seal(0);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataset::Dataset,
        synthetic::SyntheticTrace,
        train::{train, TrainOptions},
        Progress,
    };
    use std::sync::OnceLock;

    /// One trained model per kind, shared by the tests.
    fn trained(kind: ModelKind) -> TrainedModel {
        static MODELS: OnceLock<Vec<TrainedModel>> = OnceLock::new();
        let models = MODELS.get_or_init(|| {
            let data = Dataset::from_records(SyntheticTrace::new(5).records(5000), "synthetic");
            ModelKind::ALL
                .into_iter()
                .map(|kind| {
                    let mut opts = TrainOptions::new(kind);
                    opts.workload = Some("synthetic queue".into());
                    train(&data, &opts, &Progress::silent()).unwrap()
                })
                .collect()
        });
        models
            .iter()
            .find(|m| m.float.kind() == kind)
            .unwrap()
            .clone()
    }

    #[test]
    fn a_model_file_is_replaced_whole_or_kept() {
        let dir = std::env::temp_dir().join(format!("kml-model-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mine.json");
        let (a, b) = (
            trained(ModelKind::LinearRegression),
            trained(ModelKind::Logistic),
        );
        save(&a, &path).unwrap();
        save(&b, &path).unwrap();
        let replaced = LoadedModel::load(&path).map(|m| m.kind());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        // A write that cannot finish (its temporary cannot be created: a directory
        // holds its name) fails naming the file, and the model there stays whole.
        let tmp = dir.join(format!(".mine.json.tmp-{}", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        let failed = save(&a, &path).map_err(|e| e.to_string());
        let kept = LoadedModel::load(&path).map(|m| m.kind());
        // A file or a symlink at the temporary's name is neither written through
        // nor removed.
        std::fs::remove_dir(&tmp).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let refused = save(&a, &path).is_err();
        let victim_text = std::fs::read_to_string(&victim).unwrap();
        let link_kept = std::fs::symlink_metadata(&tmp).is_ok();
        let kept_again = LoadedModel::load(&path).map(|m| m.kind());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(replaced.unwrap(), ModelKind::Logistic);
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("mine.json")],
            "no temporary left"
        );
        let failed = failed.unwrap_err();
        assert!(
            failed.starts_with(&format!("{}: ", path.display())),
            "{failed}"
        );
        assert_eq!(kept.unwrap(), ModelKind::Logistic);
        assert!(refused, "a symlink at the temporary's name was followed");
        assert_eq!(victim_text, "keep me");
        assert!(
            link_kept,
            "another's file at the temporary's name was removed"
        );
        assert_eq!(kept_again.unwrap(), ModelKind::Logistic);
    }

    #[test]
    fn round_trip_every_kind() {
        for kind in ModelKind::ALL {
            let m = trained(kind);
            let text = ModelFile::from_trained(&m).to_json();
            let loaded = ModelFile::parse(&text, "mem").unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_eq!(loaded.kind(), kind);
            assert_eq!(loaded.quantized, m.quantized, "{kind:?}");
            assert_eq!(loaded.float, m.float, "{kind:?}");
            assert_eq!(
                loaded.file.training.workload.as_deref(),
                Some("synthetic queue")
            );
        }
    }

    /// Edits one value of a valid file and expects the error to name `field`.
    fn refused(kind: ModelKind, edit: impl Fn(&mut serde_json::Value), field: &str) {
        let m = trained(kind);
        let mut v: serde_json::Value =
            serde_json::from_str(&ModelFile::from_trained(&m).to_json()).unwrap();
        edit(&mut v);
        let err = ModelFile::parse(&v.to_string(), "m.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "expected `{field}` in: {err}");
    }

    #[test]
    fn bad_files_are_refused_naming_the_field() {
        use ModelKind::*;
        refused(
            Logistic,
            |v| v["schema_version"] = 2.into(),
            "field `schema_version`: 2 is not supported",
        );
        refused(Logistic, |v| v["kind"] = "forest".into(), "field `kind`");
        refused(
            Logistic,
            |v| v["features"][1] = "colour".into(),
            "field `features[1]`: unknown feature `colour`",
        );
        refused(
            Logistic,
            |v| v["features"][1] = v["features"][0].clone(),
            "listed twice",
        );
        refused(
            Baseline,
            |v| v["features"][0] = "queued_same_dir".into(),
            "field `features`",
        );
        refused(
            Logistic,
            |v| {
                v["float"]["linear"]["weights"]
                    .as_array_mut()
                    .unwrap()
                    .truncate(3)
            },
            "float.linear.weights",
        );
        refused(
            Logistic,
            |v| v["scaling"][2]["std"] = 0.0.into(),
            "scaling[2].std",
        );
        refused(
            Logistic,
            |v| v["quantized"]["linear"]["product_shifts"][4] = 63.into(),
            "product_shifts[4]",
        );
        refused(
            Logistic,
            |v| v["quantized"]["linear"]["out_shift"] = 40.into(),
            "out_shift",
        );
        refused(
            Logistic,
            |v| v["quantized"]["linear"]["bias"] = (1i64 << 61).into(),
            "quantized.linear",
        );
        refused(
            Logistic,
            |v| v["quantized"]["linear"]["threshold"] = 12345678.into(),
            "quantized.linear.threshold",
        );
        refused(
            Logistic,
            |v| v["quantized"]["linear"]["input_min"][0] = (-5).into(),
            "input_min[0]",
        );
        refused(
            Logistic,
            |v| v["float"] = serde_json::json!({"tree": {"threshold": 0.5, "nodes": []}}),
            "field `float`",
        );
        refused(
            Tree,
            |v| v["float"]["tree"]["nodes"][0]["left"] = 0.into(),
            "float.tree.nodes[0].left",
        );
        refused(
            Tree,
            |v| v["float"]["tree"]["nodes"][0]["p_miss"] = 1.5.into(),
            "nodes[0].p_miss",
        );
        refused(
            Tree,
            |v| v["quantized"]["tree"]["nodes"][0]["value"] = 1.into(),
            "quantized.tree.nodes[0].value",
        );
        refused(
            Tree,
            |v| v["quantized"]["tree"]["depth"] = 9.into(),
            "quantized.tree.depth",
        );
        refused(
            Logistic,
            |v| v["time_unit_ns"] = 1000.into(),
            "time_unit_ns",
        );
        // Unknown or missing fields: serde's message names them.
        refused(
            Logistic,
            |v| v["colour"] = "blue".into(),
            "unknown field `colour`",
        );
        refused(
            Logistic,
            |v| {
                v.as_object_mut().unwrap().remove("training");
            },
            "missing field `training`",
        );
    }
}
