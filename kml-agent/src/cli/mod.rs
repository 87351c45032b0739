//! The command line: one module per subcommand, each parsing its arguments and
//! printing what the stage it calls did (`Cli::parse().command.execute()`).

mod doctor;
mod hook;
mod models;
mod record;
mod restore;
mod run;
mod status;

use clap::{Parser, Subcommand};

use crate::kernel::attach::AttachRequest;
pub(crate) use crate::units::{parse_duration, parse_size};

/// kml: lightweight machine learning for the Linux block layer, on eBPF.
#[derive(Parser, Debug)]
#[command(
    name = "kml-agent",
    version,
    about,
    propagate_version = true,
    after_help = "Examples:
  kml-agent doctor
  kml-agent record --device loop0 --duration 30s --out trace.csv
  kml-agent train --trace trace.csv --model logistic --out models/mine.json
  kml-agent run --device loop0 --model models/mine.json --pin --metrics 127.0.0.1:9477
  kml-agent status

Needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (root). `kml-agent help SUBCOMMAND`
shows each subcommand's options and examples."
)]
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
    #[command(after_help = DOCTOR_EXAMPLES)]
    Doctor(doctor::DoctorArgs),
    /// Record every request of chosen devices to a CSV trace.
    #[command(after_help = RECORD_EXAMPLES)]
    Record(record::RecordArgs),
    /// Observe mq-deadline devices and print live statistics until stopped.
    #[command(after_help = RUN_EXAMPLES)]
    Run(run::RunArgs),
    /// Attach a verdict policy to the patched mq-deadline's hook (kml's VM kernel).
    #[command(after_help = HOOK_EXAMPLES)]
    Hook(hook::HookArgs),
    /// Train a model from a recorded trace and write it as a model file.
    #[command(after_help = TRAIN_EXAMPLES)]
    Train(kml_learn::cli::TrainArgs),
    /// Evaluate a model file on a trace, in float and in the kernel's integer form.
    #[command(after_help = EVAL_EXAMPLES)]
    Eval(kml_learn::cli::EvalArgs),
    /// List the model files `run --model` can start from, with their metrics.
    #[command(after_help = MODELS_EXAMPLES)]
    Models(models::ModelsArgs),
    /// What a running agent (started with --pin) is doing: model, verdicts, costs,
    /// and what `run --tune` changed.
    #[command(after_help = STATUS_EXAMPLES)]
    Status(status::StatusArgs),
    /// Put back the mq-deadline tunables a killed `run --tune` left changed.
    #[command(after_help = RESTORE_EXAMPLES)]
    Restore(restore::RestoreArgs),
    /// Write the man pages (kml-agent.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Manpages {
        /// Where to write them.
        dir: std::path::PathBuf,
    },
}

const DOCTOR_EXAMPLES: &str = "Examples:
  kml-agent doctor           what this kernel offers, the disks, the attach mode
  kml-agent doctor --json    the same as one JSON object (for scripts)

Exits non-zero only when block tracing is impossible here.";

const RECORD_EXAMPLES: &str = "Examples:
  kml-agent record --device loop0 --duration 30s --out trace.csv
  kml-agent record -d vda -d vdb --duration 5m --out mixed.csv --ring-size 64M
  kml-agent record -d /dev/nvme0n1 --attach tracepoint --out t.csv   # without BTF

The end of the run prints every loss counter (drops, orphans, evictions, ...).";

const RUN_EXAMPLES: &str = "Examples:
  kml-agent run                                  every mq-deadline disk, learn online
  kml-agent run --device vda --model auto        start from the best shipped model
  kml-agent run -d vda --model models/mine.json --retrain-every 0   a fixed model
  kml-agent run -d vda --pin --metrics 127.0.0.1:9477   for `status` and Prometheus
  kml-agent run -d vda --duration 60s --mode lossless   fail if any record is dropped
  kml-agent run -d vda --model auto --tune       also tune mq-deadline (docs/tuning.md)

One line per second on stdout; messages on stderr (-v, -vv, RUST_LOG for more).
SIGINT or SIGTERM detaches and prints the loss report.";

const HOOK_EXAMPLES: &str = "Examples (only on kml's patched kernel, `cargo xtask vm`):
  kml-agent hook --policy reads-under-writes --device vda --duration 60s
  kml-agent hook --policy off --device vda      attach and count, never boost";

const TRAIN_EXAMPLES: &str = "Examples:
  kml-agent train --trace trace.csv --model logistic --out models/mine.json
  kml-agent train --trace a.csv,b.csv --model tree --max-depth 6 --out models/tree.json
  kml-agent train --trace a.csv,b.csv,c.csv --model tree --balance-traces --out m.json
  kml-agent train --trace t.csv --model linear --features queued_same_dir,dir_wait_us --out m.json

Shows a progress bar when stderr is a terminal, else one line per step.";

const EVAL_EXAMPLES: &str = "Examples:
  kml-agent eval --trace other.csv --model models/mine.json
  kml-agent eval --trace other.csv --model models/mine.json --json
  kml-agent eval --trace t.csv --model m.json --from 0.8 --baseline models/baseline.json";

const MODELS_EXAMPLES: &str = "Examples:
  kml-agent models                          ./models, the source tree's models/
  KML_MODELS_DIR=/etc/kml/models kml-agent models";

const RESTORE_EXAMPLES: &str = "Examples (after a `kml-agent run --tune` was killed):
  kml-agent restore                 every device with a saved state (/run/kml/tune)
  kml-agent restore --device vda

A later `kml-agent run --tune` of the device does the same before it starts.";

const STATUS_EXAMPLES: &str = "Examples (another shell, while `kml-agent run --pin` runs):
  kml-agent status
  kml-agent status --json | jq .confusion
  sysctl kernel.bpf_stats_enabled=1; kml-agent status   # ns per decision";

impl Command {
    /// Whether it prints while programs are attached or tunables changed (and
    /// must stop through its cleanup), rather than after its work is done.
    /// (`restore` writes every tunable back before it prints a line.)
    pub fn long_running(&self) -> bool {
        matches!(
            self,
            Command::Record(_) | Command::Run(_) | Command::Hook(_)
        )
    }

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
            Command::Restore(a) => a.execute(),
            Command::Manpages { dir } => write_manpages(&dir),
        }
    }
}

/// kml-agent.1 and kml-agent-SUBCOMMAND.1 (roff) in `dir`.
pub fn write_manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![("kml-agent".to_owned(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("kml-agent-{}", sub.get_name());
        pages.push((
            name.clone(),
            sub.clone().display_name(name.clone()).bin_name(name),
        ));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut out)
            .with_context(|| format!("rendering {name}"))?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

pub fn init_logging(verbose: u8) {
    crate::logging::init(verbose);
}

/// How to observe: the options `record` and `run` share.
#[derive(clap::Args, Debug, Clone)]
pub struct ObserveArgs {
    /// How to attach: auto picks raw tracepoints when BTF allows, else tracepoints,
    /// and (`run`) adds the verdict hook on a kernel with kml's mq-deadline patch.
    #[arg(long, value_enum, default_value_t = AttachRequest::Auto)]
    pub attach: AttachRequest,
    /// Ring buffer size (power of two: 1M, 8M, 64M). The agent is woken once 1 MiB
    /// waits, or a quarter of a smaller ring.
    #[arg(long, value_parser = parse_size, default_value = "8M")]
    pub ring_size: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_examples() {
        use clap::CommandFactory as _;
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains("Examples")
                    && help.contains(&format!("kml-agent {}", sub.get_name())),
                "{} has no examples of itself",
                sub.get_name()
            );
        }
    }

    #[test]
    fn man_pages_name_every_subcommand() {
        let dir = std::env::temp_dir().join(format!("kml-man-{}", std::process::id()));
        write_manpages(&dir).unwrap();
        let main = std::fs::read_to_string(dir.join("kml-agent.1")).unwrap();
        for sub in [
            "doctor", "record", "run", "train", "eval", "models", "status",
        ] {
            assert!(main.contains(sub), "kml-agent.1 lacks {sub}");
            let page = std::fs::read_to_string(dir.join(format!("kml-agent-{sub}.1"))).unwrap();
            assert!(
                page.starts_with(".ie") || page.contains(".TH"),
                "{sub}: not roff"
            );
            assert!(page.contains("Examples"), "{sub}: no examples");
        }
        assert!(!dir.join("kml-agent-manpages.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
