//! `cargo xtask test`: formatting, build (debug), the host unit tests, then the
//! integration tests (root only, one thread: they share loop devices and the
//! kernel's BPF state).

use std::process::{Command, ExitCode, ExitStatus};

use anyhow::Result;
use clap::Args;

use crate::build::{build_all_with, ebpf_object_path, host_target_dir};
use crate::util::{self, describe_status, run_status, workspace_root};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Extra arguments for the integration test binaries, after `--` (e.g. a name filter).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// How one test step ended.
enum Outcome {
    Passed,
    Failed(ExitStatus),
    NotRun(&'static str),
}

impl Outcome {
    fn from_status(status: ExitStatus) -> Self {
        if status.success() {
            Outcome::Passed
        } else {
            Outcome::Failed(status)
        }
    }

    fn passed(&self) -> bool {
        matches!(self, Outcome::Passed)
    }

    fn describe(&self) -> String {
        match self {
            Outcome::Passed => "passed".to_owned(),
            Outcome::Failed(status) => format!("FAILED ({})", describe_status(*status)),
            Outcome::NotRun(why) => format!("NOT RUN ({why})"),
        }
    }
}

impl TestArgs {
    pub fn execute(self) -> Result<ExitCode> {
        let root = workspace_root();
        eprintln!("xtask: checking formatting (cargo fmt)");
        let mut fmt = Command::new("cargo");
        fmt.current_dir(&root).args(["fmt", "--all", "--check"]);
        let mut format = Outcome::from_status(run_status(&mut fmt)?);
        // kml-ebpf is outside the workspace; rustfmt follows its modules from main.rs.
        let mut fmt_ebpf = Command::new("rustfmt");
        fmt_ebpf
            .current_dir(&root)
            .args(["--edition", "2021", "--check", "kml-ebpf/src/main.rs"]);
        if format.passed() {
            format = Outcome::from_status(run_status(&mut fmt_ebpf)?);
        }
        // With the test hooks (kml-agent's `testing` feature: KML_TEST_SWAP_EVERY).
        let agent = build_all_with(false, &["testing"])?;
        let object = ebpf_object_path(&root);

        eprintln!("xtask: running the host unit tests");
        let mut unit = Command::new("cargo");
        unit.current_dir(&root)
            .args([
                "test",
                "--workspace",
                "--exclude",
                "kml-integration-tests",
                "--target-dir",
            ])
            .arg(host_target_dir(&root))
            .env("KML_EBPF_OBJECT", &object);
        let unit = Outcome::from_status(run_status(&mut unit)?);

        let integration = if util::is_root()? {
            eprintln!("xtask: running the integration tests");
            let mut cmd = Command::new("cargo");
            cmd.current_dir(&root)
                .args(["test", "-p", "kml-integration-tests", "--target-dir"])
                .arg(host_target_dir(&root))
                .args(["--", "--test-threads=1"])
                .args(&self.args)
                .env("KML_EBPF_OBJECT", &object)
                .env("KML_AGENT_BIN", &agent);
            Outcome::from_status(run_status(&mut cmd)?)
        } else {
            eprintln!(
                "xtask: error: the integration tests need root (CAP_BPF, CAP_PERFMON, \
                 CAP_SYS_ADMIN, loop devices); run `cargo xtask test` as root"
            );
            Outcome::NotRun("needs root")
        };

        eprintln!(
            "xtask: test summary: formatting {}; host unit tests {}; integration tests {}",
            format.describe(),
            unit.describe(),
            integration.describe()
        );
        Ok(
            if format.passed() && unit.passed() && integration.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            },
        )
    }
}
