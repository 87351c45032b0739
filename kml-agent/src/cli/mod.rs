//! The command line: one module per subcommand.

mod doctor;
mod hook;
mod models;
mod record;
mod run;
mod session;
mod status;

use std::time::Duration;

use clap::{Parser, Subcommand};

pub use session::{losses_of, LossReport};

/// kml: lightweight machine learning for the Linux block layer, on eBPF.
#[derive(Parser, Debug)]
#[command(name = "kml-agent", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace); RUST_LOG (e.g.
    /// `RUST_LOG=kml_agent=debug`) overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report what the running kernel offers and which attach mode kml will use.
    Doctor(doctor::DoctorArgs),
    /// Record every request of chosen devices to a CSV trace.
    Record(record::RecordArgs),
    /// Observe mq-deadline devices and print live statistics until stopped.
    Run(run::RunArgs),
    /// Attach a verdict policy to the patched mq-deadline's hook (kml's VM kernel).
    Hook(hook::HookArgs),
    /// Train a model from a recorded trace and write it as a model file.
    Train(kml_learn::cli::TrainArgs),
    /// Evaluate a model file on a trace, in float and in the kernel's integer form.
    Eval(kml_learn::cli::EvalArgs),
    /// List the model files `run --model` can start from, with their metrics.
    Models(models::ModelsArgs),
    /// What a running agent (started with --pin) is doing: model, verdicts, costs.
    Status(status::StatusArgs),
}

impl Command {
    pub fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Doctor(a) => a.execute(),
            Command::Record(a) => a.execute(),
            Command::Run(a) => a.execute(),
            Command::Hook(a) => a.execute(),
            Command::Train(a) => a.execute(),
            Command::Eval(a) => a.execute(),
            Command::Models(a) => a.execute(),
            Command::Status(a) => a.execute(),
        }
    }
}

pub fn init_logging(verbose: u8) {
    crate::logging::init(verbose);
}

/// `10s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `8M`, `512K`, `1G` or bytes.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 8M)"))?;
    u32::try_from(n * mult).map_err(|_| format!("`{s}` is too large (max 2G)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("8X").is_err());
        assert!(parse_size("8G").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
