//! `cargo xtask fuzz`: run the cargo-fuzz targets in `fuzz/` (nightly, address
//! sanitizer, debug assertions so integer overflow traps), each for a while.
//!
//! Installs cargo-fuzz when missing (idempotent, says what it did). The corpus
//! grows in `target/fuzz/corpus/TARGET` and starts from `fuzz/seeds/TARGET`;
//! crashes land in `fuzz/artifacts/TARGET`: once fixed, keep the input in
//! `fuzz/regressions/TARGET`, which the unit tests of `kml_learn::robustness`
//! replay.

use std::process::{Command, ExitCode};

use anyhow::{bail, Result};
use clap::Args;

use crate::util::{probe, run, run_status, workspace_root};

/// The targets, in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["model_file", "record_decode", "integer_inference"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// One target (default: all of them).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = probe(Command::new("cargo").args(["fuzz", "--version"]))
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match installed {
        Some(v) if v.ends_with(CARGO_FUZZ_VERSION) => {
            eprintln!("xtask: found {v}");
            Ok(())
        }
        other => {
            eprintln!(
                "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (found: {})",
                other.as_deref().unwrap_or("none")
            );
            run(Command::new("cargo").args([
                "install",
                "--locked",
                "--force",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
            ]))
        }
    }
}

impl FuzzArgs {
    pub fn execute(self) -> Result<ExitCode> {
        crate::setup::ensure_nightly()?;
        ensure_cargo_fuzz()?;
        let root = workspace_root();
        let targets: Vec<&str> = match &self.target {
            Some(t) => vec![t.as_str()],
            None => TARGETS.to_vec(),
        };
        let mut failed = Vec::new();
        for target in &targets {
            let corpus = root.join("target/fuzz/corpus").join(target);
            std::fs::create_dir_all(&corpus)?;
            let seeds = root.join("fuzz/seeds").join(target);
            let mut cmd = Command::new("cargo");
            cmd.current_dir(&root)
                .args(["+nightly", "fuzz", "run", "--fuzz-dir", "fuzz"])
                // Debug assertions: overflow checks on, as the properties need.
                .arg("--debug-assertions")
                .arg("--target-dir")
                .arg(root.join("target/fuzz/build"))
                .arg(target)
                .arg(&corpus)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={}", self.seconds))
                .arg("-print_final_stats=1");
            let status = run_status(&mut cmd)?;
            if !status.success() {
                eprintln!(
                    "xtask: fuzz target {target} FAILED: the input is in fuzz/artifacts/{target}/; \
                     fix it, then keep the input in fuzz/regressions/{target}/"
                );
                failed.push(*target);
            } else {
                eprintln!(
                    "xtask: fuzz target {target}: no failure in {} s",
                    self.seconds
                );
            }
        }
        if !failed.is_empty() {
            bail!("fuzz targets failed: {}", failed.join(", "));
        }
        eprintln!("xtask: fuzzing passed: {}", targets.join(", "));
        Ok(ExitCode::SUCCESS)
    }
}
