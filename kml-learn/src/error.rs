//! The crate's errors: each names what was being read or checked.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("cannot read trace {path}: {message}")]
    Trace { path: PathBuf, message: String },

    #[error("{what}: {message}")]
    NotEnoughData { what: String, message: String },

    #[error("{trainer}: {message}")]
    Fit {
        trainer: &'static str,
        message: String,
    },

    #[error("cannot quantise the {kind} model: {message}")]
    Quantize { kind: &'static str, message: String },

    #[error(
        "quantised {kind} model refused: its balanced accuracy on held-back data is {quantized:.4}, \
         more than 0.5 point below the float model's {float:.4}"
    )]
    QuantizationLoss {
        kind: &'static str,
        float: f64,
        quantized: f64,
    },

    #[error("model file {path}: field `{field}`: {problem}")]
    BadModelFile {
        path: String,
        field: String,
        problem: String,
    },

    #[error("model file {path}: {source}")]
    ModelJson {
        path: String,
        source: serde_json::Error,
    },

    #[error(
        "{source_name}: {missing} of {records} records do not carry `{feature}` (recorded by an \
         older observer: {why}); use a feature set without it, or traces that carry it"
    )]
    FeatureNotRecorded {
        source_name: String,
        feature: &'static str,
        why: &'static str,
        missing: usize,
        records: usize,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = LearnError> = std::result::Result<T, E>;
