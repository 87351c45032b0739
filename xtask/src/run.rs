//! `cargo xtask run`: build, then run kml-agent (as root) and forward its exit status.

use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::build::build_all;
use crate::util::{self, display};

/// What kml-agent runs when no arguments are given.
const DEFAULT_AGENT_ARGS: &[&str] = &["run"];

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Build and run the release kml-agent.
    #[arg(long)]
    pub release: bool,
    /// Arguments for kml-agent, after `--` (default: `run`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

impl RunArgs {
    pub fn execute(self) -> Result<ExitCode> {
        // Fail before building: the agent cannot do anything useful without root.
        if !util::is_root()? {
            eprintln!(
                "xtask: kml-agent needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN); run as root"
            );
            return Ok(ExitCode::FAILURE);
        }
        let agent = build_all(self.release)?;
        let mut cmd = Command::new(&agent);
        if self.args.is_empty() {
            cmd.args(DEFAULT_AGENT_ARGS);
        } else {
            cmd.args(&self.args);
        }
        let line = display(&cmd);
        eprintln!("xtask: running {line}");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        // The child shares our process group, so Ctrl-C reaches it directly; xtask
        // only has to outlive it to report its status (ignored *after* the spawn, so
        // the child keeps the default disposition).
        util::ignore_sigint();
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{line}` failed"))?;
        Ok(forward_status(status, &line))
    }
}

/// The child's exit code, or 128 + signal number when a signal killed it.
fn forward_status(status: std::process::ExitStatus, line: &str) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    if status.success() {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "xtask: `{line}` ended with {}",
        util::describe_status(status)
    );
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
