//! `cargo xtask`: the project's build, setup, run and test driver.
//!
//! ```text
//! cargo xtask setup [--reinstall-bpf-linker]   # Debian tools, nightly + rust-src, bpf-linker
//! cargo xtask build [--release]                # eBPF object (nightly) + kml-agent
//! cargo xtask run   [--release] [-- ARGS...]   # build, then run kml-agent as root (default ARGS: `run`)
//! cargo xtask test  [-- ARGS...]               # host unit tests, then the root-only integration tests
//! cargo xtask vm    [--smoke] [OPTIONS]        # patched kernel under QEMU: hook smoke test / comparison
//! cargo xtask bench [--quick] [--workload F.fio]... [--out DIR]  # measure; write bench/REPORT.md
//! cargo xtask fuzz  [--seconds N] [TARGET]      # cargo-fuzz targets in fuzz/ (installs cargo-fuzz)
//! cargo xtask man   [--out DIR]                 # kml-agent man pages (default target/man)
//! cargo xtask soak  [--minutes 30]            # agent under rate-limited fio; write bench/SOAK.md
//! ```
//!
//! Each subcommand lives in its own module; `util` holds the process helpers.

mod bench;
mod build;
mod fuzz;
mod man;
mod run;
mod setup;
mod soak;
mod test;
mod util;
mod vm;

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
    /// Install what the build needs (idempotent): bpftool, bpftrace, fio, the nightly
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
    /// Measure everything (overhead, in-kernel cost, agent, training time, learning
    /// quality) on this machine and write bench/REPORT.md with SVG plots (needs root).
    Bench(bench::BenchArgs),
    /// Fuzz the model-file loader, the record decoder and the integer inference
    /// (cargo-fuzz, nightly; installs cargo-fuzz if missing), N seconds per target.
    Fuzz(fuzz::FuzzArgs),
    /// Write kml-agent's man pages (clap_mangen) to target/man (or --out DIR).
    Man(man::ManArgs),
    /// Leave the agent running under rate-limited mixed fio (default 30 minutes) and
    /// write bench/SOAK.md: in-flight map size, drops, RSS and CPU (needs root; not CI).
    Soak(soak::SoakArgs),
}

impl Command {
    fn execute(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Setup(args) => args.execute(),
            Command::Build(args) => args.execute(),
            Command::Run(args) => args.execute(),
            Command::Test(args) => args.execute(),
            Command::Vm(args) => args.execute(),
            Command::Bench(args) => args.execute(),
            Command::Fuzz(args) => args.execute(),
            Command::Man(args) => args.execute(),
            Command::Soak(args) => args.execute(),
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command.execute() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
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
        let cli = Cli::try_parse_from(["xtask", "test", "--", "some_filter"]).unwrap();
        match cli.command {
            Command::Test(args) => assert_eq!(args.args, ["some_filter"]),
            other => panic!("parsed as {other:?}"),
        }
    }
}
