//! What the other developer tools build on: the process helpers (`util`), the
//! installation of the build's tools (`setup`) and the build itself (`build`).
//! The `cargo xtask` binary (src/main.rs) and the benchmark crate (kml-bench) use them.

pub mod build;
pub mod setup;
pub mod util;
