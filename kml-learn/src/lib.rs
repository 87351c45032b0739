//! kml's learning core: from recorded block I/O to models the kernel can run.
//!
//! ```text
//! trace CSV ─► Dataset (insert-time order, kernel features, labels)
//!     ─► time split: train │ tune │ test
//!     ─► trainer (linfa): DelayRegressionParams / LogisticParams / TreeParams ─► float model
//!     ─► quantize ─► kernel struct (LinearModel / TreeModel), checked against the float
//!        model on held-back data ─► model file (JSON) ─► eval on any trace
//! ```
//!
//! The features and the integer inference live in `kml_ebpf_common` and are shared
//! with the eBPF programs unchanged; this crate only adds host-side work.

pub mod calibrate;
pub mod cli;
pub mod dataset;
pub mod error;
pub mod evaluate;
pub mod float_model;
pub mod metrics;
pub mod model_file;
pub mod progress;
pub mod quantize;
pub mod references;
pub mod replay;
// The properties the fuzz targets check: test-only, compiled for the unit tests and
// for the fuzz crate (feature `fuzzing`), never into the agent.
#[cfg(any(test, feature = "fuzzing"))]
pub mod robustness;
pub mod synthetic;
pub mod train;
pub mod trainers;

pub use dataset::{DataDescription, Dataset};
pub use error::{LearnError, Result};
pub use evaluate::{evaluate, Evaluation, TickBand, TickBandCount};
pub use float_model::{
    FeatureScaling, FloatLinearModel, FloatModel, FloatTreeModel, FloatTreeNode,
};
pub use metrics::{ClassificationMetrics, ConfusionMatrix, RegressionMetrics};
pub use model_file::{LoadedModel, ModelFile};
pub use progress::Progress;
pub use quantize::{quantize, QuantizedModel};
pub use train::{train, TrainOptions, TrainedModel};
pub use trainers::{DelayRegressionParams, LogisticParams, TreeParams};
