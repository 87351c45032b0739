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

    // The wrapped errors below are shown in the message and not also returned as
    // `source()`: a caller printing the chain (`{:#}`) would show them twice.
    #[error("model file {path}: {error}")]
    ModelJson {
        path: String,
        error: serde_json::Error,
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

    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

pub type Result<T, E = LearnError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::dataset::Dataset;
    use crate::model_file::ModelFile;

    /// The message and its causes, as the agent prints them (`{:#}`: "a: b: c").
    fn chain(e: super::LearnError) -> String {
        format!("{:#}", anyhow::Error::from(e))
    }

    #[test]
    fn a_wrapped_error_is_shown_once() {
        let missing = Path::new("/nonexistent-kml/trace.csv");
        let e = Dataset::from_trace_file(missing).expect_err("no such file");
        let shown = chain(e);
        assert_eq!(shown.matches("(os error 2)").count(), 1, "{shown}");
        assert!(shown.starts_with("/nonexistent-kml/trace.csv: "), "{shown}");

        let e = ModelFile::parse("{\"schema_version\": 1", "bad.json").expect_err("truncated");
        let shown = chain(e);
        assert!(shown.starts_with("model file bad.json: "), "{shown}");
        assert_eq!(shown.matches("EOF while parsing").count(), 1, "{shown}");
    }
}
