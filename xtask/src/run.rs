//! `cargo xtask run`: build, then run kml-agent (as root) and forward its exit status.

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::Args;

use crate::build::build_all;
use crate::util;

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
        util::run_forwarding(&mut cmd)
    }
}
