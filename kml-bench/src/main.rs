//! `kml-bench`: kml's measurements, run by `cargo xtask bench` and `cargo xtask soak`.
//!
//! ```text
//! kml-bench bench [--quick] [--workload F.fio]... [--out DIR] [--pin] [--only PHASES]
//! kml-bench soak  [--minutes 30]
//! ```
//!
//! `bench` measures every headline number and writes bench/REPORT.md with its SVG
//! plots; `soak` leaves the agent running under rate-limited fio and writes
//! bench/SOAK.md. Both need root and build the release agent first.

mod bench;
mod soak;

// The build and the process helpers of the developer tools, at the paths the
// measurement modules use.
use xtask::{build, util};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kml-bench",
    about = "Measure kml on this machine (run by `cargo xtask bench` / `cargo xtask soak`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure everything (overhead, in-kernel cost, agent, training time, learning
    /// quality) on this machine and write bench/REPORT.md with SVG plots (needs root).
    Bench(bench::BenchArgs),
    /// Leave the agent running under rate-limited mixed fio (default 30 minutes) and
    /// write bench/SOAK.md: in-flight map size, drops, RSS and CPU (needs root; not CI).
    Soak(soak::SoakArgs),
}

impl Command {
    fn execute(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Bench(args) => args.execute(),
            Command::Soak(args) => args.execute(),
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
}
