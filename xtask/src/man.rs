//! `cargo xtask man`: kml-agent's man pages (clap_mangen, from the same definitions
//! as `--help`), written to target/man/ (or --out).

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::Result;
use clap::Args;

use crate::build::{ebpf_object_path, host_target_dir};
use crate::util::{run, workspace_root};

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory for kml-agent.1 and kml-agent-SUBCOMMAND.1 (default: target/man).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl ManArgs {
    pub fn execute(self) -> Result<ExitCode> {
        let root = workspace_root();
        let out = self.out.unwrap_or_else(|| root.join("target/man"));
        // The pages come from the CLI definitions alone: no eBPF object is needed.
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args(["run", "--quiet", "-p", "kml-agent", "--target-dir"])
            .arg(host_target_dir(&root))
            .args(["--", "manpages"])
            .arg(&out);
        // Same environment as `cargo xtask build`, so the agent is not rebuilt
        // differently (and an embedded object is kept) just for the pages.
        let object = ebpf_object_path(&root);
        if object.is_file() {
            cmd.env("KML_EBPF_OBJECT", object);
        }
        run(&mut cmd)?;
        eprintln!(
            "xtask: man pages in {} (read one with `man -l {}/kml-agent.1`)",
            out.display(),
            out.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
