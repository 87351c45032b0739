//! `cargo xtask`: the project's build, setup, run and test driver.
//!
//! ```text
//! cargo xtask setup [--reinstall-bpf-linker]   # Debian tools, nightly + rust-src, bpf-linker
//! cargo xtask build [--release]                # eBPF object (nightly) + kml-agent
//! cargo xtask run   [--release] [-- ARGS...]   # build, then run kml-agent as root (default ARGS: `run`)
//! cargo xtask test  [-- ARGS...]               # host unit tests, then the root-only integration tests
//! cargo xtask vm    [--smoke] [OPTIONS]        # patched kernel under QEMU: hook smoke test / comparison
//! cargo xtask bench [--quick] [--workload F.fio]... [--out DIR]  # measure (kml-bench); write bench/REPORT.md
//! cargo xtask fuzz  [--seconds N] [TARGET]      # cargo-fuzz targets in fuzz/ (installs cargo-fuzz)
//! cargo xtask man   [--out DIR]                 # kml-agent man pages (default target/man)
//! cargo xtask soak  [--minutes 30]            # agent under rate-limited fio (kml-bench); write bench/SOAK.md
//! ```
//!
//! Each subcommand lives in its own module; `bench` and `soak` forward to the
//! kml-bench crate. The library part of this crate (`util`: the process helpers,
//! `setup`, `build`) is shared with kml-bench.

mod bench;
mod fuzz;
mod man;
mod run;
mod test;
mod vm;

use xtask::{build, setup, util};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test kml (eBPF block-layer ML)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build needs (idempotent): bpftool, bpftrace, fio, systemd, the nightly
    /// toolchain with rust-src, and bpf-linker built against nightly's LLVM.
    Setup(setup::SetupArgs),
    /// Run setup, build the eBPF object with nightly, then build kml-agent.
    Build(build::BuildArgs),
    /// Build, then run kml-agent (needs root) with ARGS (default: `run`).
    Run(run::RunArgs),
    /// Build, run the host unit tests, then the integration tests (need root).
    Test(test::TestArgs),
    /// Build the patched kernel and boot it under QEMU: the hook's smoke test
    /// (--smoke) or the stock-vs-verdicts comparison (report in target/vm/).
    Vm(vm::VmArgs),
    /// Run `kml-bench bench`: every headline number measured on this machine, into
    /// bench/REPORT.md (needs root; `cargo xtask bench --help` for its options).
    Bench(bench::ForwardArgs),
    /// Fuzz the model-file loader, the record decoder and the integer inference
    /// (cargo-fuzz, nightly; installs cargo-fuzz if missing), N seconds per target.
    Fuzz(fuzz::FuzzArgs),
    /// Write kml-agent's man pages (clap_mangen) to target/man (or --out DIR).
    Man(man::ManArgs),
    /// Run `kml-bench soak`: the agent for a long while under rate-limited fio, into
    /// bench/SOAK.md (needs root; not CI; `cargo xtask soak --help` for its options).
    Soak(bench::ForwardArgs),
}

impl Command {
    fn execute(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Setup(args) => args.execute(),
            Command::Build(args) => args.execute(),
            Command::Run(args) => args.execute(),
            Command::Test(args) => args.execute(),
            Command::Vm(args) => args.execute(),
            Command::Bench(args) => args.execute("bench"),
            Command::Fuzz(args) => args.execute(),
            Command::Man(args) => args.execute(),
            Command::Soak(args) => args.execute("soak"),
        }
    }
}

fn main() -> ExitCode {
    util::exit_code(Cli::parse().command.execute())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn trailing_args_after_double_dash() {
        let cli = Cli::try_parse_from([
            "xtask",
            "run",
            "--release",
            "--",
            "record",
            "--dev",
            "loop0",
        ])
        .unwrap();
        match cli.command {
            Command::Run(args) => {
                assert!(args.release);
                assert_eq!(args.args, ["record", "--dev", "loop0"]);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "bench", "--quick", "--only", "tune"]).unwrap();
        match cli.command {
            Command::Bench(args) => assert_eq!(args.args, ["--quick", "--only", "tune"]),
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "soak", "--help"]).unwrap();
        match cli.command {
            Command::Soak(args) => assert_eq!(args.args, ["--help"]),
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "test", "--", "some_filter"]).unwrap();
        match cli.command {
            Command::Test(args) => assert_eq!(args.args, ["some_filter"]),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// README's layout section names every top-level directory of the repository,
    /// and every path it names exists.
    #[test]
    fn readme_layout_matches_the_tree() {
        let root = util::workspace_root();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let section = readme
            .split("## Layout")
            .nth(1)
            .and_then(|s| s.split("```").nth(1))
            .expect("README.md has a Layout section with a code block");
        let mut parent = String::new();
        let mut listed = Vec::new();
        for line in section.lines().filter(|l| !l.trim().is_empty()) {
            let first = line.split_whitespace().next().unwrap_or("");
            let top_level = !line.starts_with(' ');
            if top_level {
                parent = first.to_owned();
                listed.push(first.trim_end_matches('/').to_owned());
            }
            // An entry is a path (of the repository, or under the crate above it)
            // when it is a top-level entry or ends in `/` or `.rs` (`,` trimmed).
            let path = first.trim_end_matches(',');
            if !(top_level || path.ends_with('/') || path.ends_with(".rs")) {
                continue;
            }
            let full = if top_level {
                root.join(path)
            } else {
                root.join(&parent).join(path)
            };
            assert!(
                full.exists(),
                "README layout names {}, which does not exist",
                full.display()
            );
        }
        // The directories git tracks (not build output or other ignored files).
        let tracked = std::process::Command::new("git")
            .current_dir(&root)
            .args(["ls-files", "-z"])
            .output()
            .expect("git ls-files");
        let tracked = String::from_utf8_lossy(&tracked.stdout).into_owned();
        let dirs: std::collections::BTreeSet<&str> = tracked
            .split('\0')
            .filter_map(|f| f.split_once('/').map(|(d, _)| d))
            .filter(|d| !d.starts_with('.'))
            .collect();
        assert!(dirs.contains("kml-agent"), "git ls-files lists the tree");
        for d in dirs {
            assert!(
                listed.iter().any(|l| l == d),
                "README layout does not name {d}/"
            );
        }
    }
}
