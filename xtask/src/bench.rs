//! `cargo xtask bench` and `cargo xtask soak`: the user's commands for the
//! measurements, which live in their own crate (kml-bench). Every argument after the
//! subcommand goes to `kml-bench bench` / `kml-bench soak` unchanged (`--help` too).

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::Args;

use crate::util::{self, workspace_root};

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct ForwardArgs {
    /// Arguments for kml-bench (`cargo xtask bench --help` shows them).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

impl ForwardArgs {
    /// Runs `kml-bench SUBCOMMAND ARGS` (built by cargo, as xtask itself is) and
    /// passes on its exit status; kml-bench undoes what it set up on Ctrl-C.
    pub fn execute(self, subcommand: &str) -> Result<ExitCode> {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(workspace_root())
            .args(["run", "--quiet", "--package", "kml-bench", "--", subcommand])
            .args(&self.args);
        util::run_forwarding(&mut cmd)
    }
}
