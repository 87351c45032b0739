//! `kml-agent run`: observe mq-deadline devices, score every request in the kernel
//! (shadow mode, or acting through the patched mq-deadline's hook with `--act`),
//! learn online, one live line per second. The loop itself is [`crate::agent`].

use std::time::Duration;

use kml_learn::calibrate::CalibrationPolicy;

use crate::{
    act::hook::Policy,
    agent::{Agent, AgentConfig, LossMode, ModelId, Step, Tick},
    observe::pins,
    stats::human_ns,
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Devices to observe (default: every disk whose scheduler is mq-deadline).
    #[arg(long, short)]
    pub device: Vec<String>,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    /// Model to start from: a model file, a shipped name (`logistic` for
    /// models/logistic.json), `auto` (the shipped model that fits these disks
    /// with the best held-back balanced accuracy: a model made for another disk
    /// never competes) or `none` (observe, and learn from the first records).
    #[arg(long, default_value = "none")]
    pub model: String,
    /// Retrain on the sliding window this often; 0 turns online learning off.
    /// Default: 10s; 0 with --act and a model policy (the verdicts change the
    /// outcomes it learns from: when asked for, the hook leaves 1 in 16 flagged
    /// requests alone, and candidates learn from those and the unflagged ones).
    #[arg(long, value_parser = super::parse_duration)]
    pub retrain_every: Option<Duration>,
    /// Model kind trained online (default: the starting model's kind, else logistic).
    #[arg(long)]
    pub learn_kind: Option<String>,
    /// Records in the sliding training window.
    #[arg(long, default_value_t = 200_000)]
    pub window: usize,
    /// While a model policy acts and online learning runs, the hook leaves one in
    /// N of the requests it would serve early alone, to learn what they risk (a
    /// power of two, 2 to 65536). Those requests are the ones at risk: they show
    /// in the read tail, the more the smaller N is.
    #[arg(long, default_value_t = 16, value_name = "N", value_parser = parse_hold_out)]
    pub hold_out: u32,
    /// Fewest records in the window worth training on. A slow disk (the VM's
    /// 100 IOPS) takes minutes to gather the default.
    #[arg(long, default_value_t = crate::learn::online::DEFAULT_MIN_RECORDS, value_name = "N")]
    pub min_train_records: usize,
    #[arg(long, value_enum, default_value_t = LossMode::Drop)]
    pub mode: LossMode,
    /// Pin the maps under /sys/fs/bpf/kml (0700/0600) for `kml-agent status` and
    /// bpftool; removed on a clean exit.
    #[arg(long)]
    pub pin: bool,
    /// Tune mq-deadline (fifo_batch, writes_starved, async_depth) from the live
    /// predictions: protect reads the model predicts at risk while writes compete,
    /// within safe ranges, undoing a change that costs more than its budget. The
    /// originals are restored on exit (docs/tuning.md).
    #[arg(long)]
    pub tune: bool,
    /// How often `--tune` decides (the length of its measuring window).
    #[arg(long, value_parser = super::parse_duration, default_value = "5s")]
    pub tune_every: Duration,
    /// Where --pin puts the maps (a directory on a bpffs).
    #[arg(long, default_value = pins::PIN_DIR, value_name = "DIR")]
    pub pin_dir: std::path::PathBuf,
    /// Serve Prometheus metrics (records, every loss counter, verdicts, live
    /// confusion matrix, ns per decision, model version, swaps) at
    /// http://ADDR/metrics, e.g. 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Let verdicts act: the verdict program on the patched mq-deadline's hook
    /// applies this policy (`--act` alone: model-reads, i.e. reads the model flags
    /// at risk are served early). Needs kml's mq-deadline patch (`doctor`: mq-deadline
    /// hook). Without it, on such a kernel, the hook is attached and only counts.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "model-reads")]
    pub act: Option<Policy>,
    /// Keep the serving model's own verdict threshold. By default the agent moves
    /// it (weights unchanged) to the one that does best on the newest outcomes,
    /// at most every 2 s and only for a clear gain: a model's threshold is tuned
    /// on its training workloads and does not carry over to a new one. Always
    /// off with --act (the verdicts would change the outcomes it learns from).
    #[arg(long)]
    pub no_calibrate: bool,
    /// Machine-readable output for tools: one JSON object per line on stdout, an
    /// `"event"` of `ready` (attached, observing), `tick` (each second: what the live
    /// line says) or `end` (records, losses, the hook's counters). Messages stay on
    /// stderr.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub observe: super::ObserveArgs,
}

/// `--hold-out N`: a power of two from 2 to 2^16.
fn parse_hold_out(v: &str) -> Result<u32, String> {
    let n: u32 = v.parse().map_err(|e| format!("{v}: {e}"))?;
    let max = 1u32 << kml_ebpf_common::abi::hook::HOLD_OUT_MAX_SHIFT;
    if n.is_power_of_two() && (2..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is not a power of two from 2 to {max} (the kernel masks, it does not divide)"
        ))
    }
}

/// How often `run` retrains by default (online learning in shadow mode).
pub const DEFAULT_RETRAIN_EVERY: Duration = Duration::from_secs(10);

impl RunArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let json = self.json;
        let config = self.config();
        crate::runtime::block_on(async {
            let mut agent = Agent::start(config).await?;
            // A reader that went away (`| head`) ends the run as Ctrl-C does:
            // through shutdown, which restores what the run changed.
            let mut reader = if json {
                print_event("ready", &agent.ready())
            } else {
                Ok(())
            };
            while reader.is_ok() {
                reader = match agent.step().await? {
                    Step::Records => Ok(()),
                    Step::Tick(t) if json => print_event("tick", &tick_json(&t)),
                    Step::Tick(t) => print_line(&tick_line(&t)),
                    Step::Stop => break,
                };
            }
            if let Err(e) = &reader {
                tracing::warn!("stdout closed ({e}): stopping");
            }
            let summary = agent.shutdown()?;
            if json && reader.is_ok() {
                // Its reader gone, nothing can read the summary; the log has it.
                let _ = print_event("end", &summary);
            }
            Ok(())
        })
    }

    fn config(self) -> AgentConfig {
        AgentConfig {
            devices: self.device,
            duration: self.duration,
            model: self.model,
            retrain_every: self.retrain_every.unwrap_or(
                if self.act.is_some_and(|p| p.uses_model()) {
                    Duration::ZERO
                } else {
                    DEFAULT_RETRAIN_EVERY
                },
            ),
            learn_kind: self.learn_kind,
            window: self.window,
            min_train_records: self.min_train_records,
            hold_out_shift: self.hold_out.trailing_zeros(),
            mode: self.mode,
            pin: self.pin,
            pin_dir: self.pin_dir,
            tune_every: self.tune.then_some(self.tune_every),
            metrics: self.metrics,
            act: self.act,
            attach: self.observe.attach,
            ring_bytes: self.observe.ring_size,
            calibrate: (!self.no_calibrate).then(CalibrationPolicy::default),
        }
    }
}

/// One JSON object on a line of stdout: `{"event": EVENT, ...what}`. An error
/// (the reader closed the pipe) is returned, not a panic: a long-running command
/// stops through its cleanup.
pub(super) fn print_event(event: &str, what: &impl serde::Serialize) -> std::io::Result<()> {
    let mut v = serde_json::to_value(what).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("event".into(), event.into());
    }
    print_line(&v)
}

/// One line of stdout, flushed (a reader sees each second as it ends).
pub(super) fn print_line(line: &impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// The second as JSON (`run --json`): what the live line says, by name.
fn tick_json(t: &Tick) -> serde_json::Value {
    let live = &t.live;
    let both_classes = !live.one_class();
    serde_json::json!({
        "t_s": t.elapsed.as_secs_f64(),
        "records_per_s": t.summary.records as f64 / t.secs,
        "summary": t.summary,
        "drops": t.drops,
        "orphans": t.orphans,
        "model": t.model.map(ModelId::from),
        "live": live,
        "balanced_accuracy": both_classes.then(|| live.balanced_accuracy()),
        "learning": t.learning,
        "tuning": t.tuning,
    })
}

/// The live line: records/s, wait and service percentiles, misses, drops, and the
/// active model's live quality.
fn tick_line(t: &Tick) -> String {
    let (s, live) = (&t.summary, &t.live);
    let verdict_part = match t.model {
        Some(a) if !live.one_class() => format!(
            " | v{} {} bal.acc {:.3} (tp {} fp {} tn {} fn {})",
            a.version,
            a.kind.name(),
            live.balanced_accuracy(),
            live.true_miss,
            live.false_miss,
            live.true_met,
            live.false_met
        ),
        // One class only (no misses, or nothing but misses): balanced accuracy is
        // undefined; say what the model got right.
        Some(a) if live.total() > 0 => format!(
            " | v{} {} accuracy {:.3}, one class only (tp {} fp {} tn {} fn {})",
            a.version,
            a.kind.name(),
            live.accuracy(),
            live.true_miss,
            live.false_miss,
            live.true_met,
            live.false_met
        ),
        Some(a) => format!(" | v{} {}", a.version, a.kind.name()),
        None => " | no model".into(),
    };
    format!(
        "[{:>5.0}s] {:>7.0} rec/s | wait p50 {:>8} p99 {:>8} | service p50 {:>8} p99 {:>8} | misses {} ({:.1}%) | drops {} orphans {}{}",
        t.elapsed.as_secs_f64(),
        s.records as f64 / t.secs,
        human_ns(s.insert_to_issue.p50_ns),
        human_ns(s.insert_to_issue.p99_ns),
        human_ns(s.issue_to_complete.p50_ns),
        human_ns(s.issue_to_complete.p99_ns),
        s.deadline_misses,
        100.0 * s.deadline_misses as f64 / (s.records.max(1)) as f64,
        t.drops,
        t.orphans,
        verdict_part,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    fn retrain_every(args: &[&str]) -> Duration {
        let cli = Cli::try_parse_from([&["kml-agent", "run"], args].concat()).unwrap();
        match cli.command {
            Command::Run(r) => r.config().retrain_every,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn online_learning_is_off_by_default_only_while_a_model_policy_acts() {
        assert_eq!(retrain_every(&[]), DEFAULT_RETRAIN_EVERY);
        assert_eq!(retrain_every(&["--act"]), Duration::ZERO);
        assert_eq!(retrain_every(&["--act", "model"]), Duration::ZERO);
        // A fixed policy acts on the op, not on verdicts: learning goes on.
        assert_eq!(retrain_every(&["--act", "reads"]), DEFAULT_RETRAIN_EVERY);
        // Asked for, it is on while acting too (with the hook's hold-out).
        assert_eq!(
            retrain_every(&["--act", "--retrain-every", "5s"]),
            Duration::from_secs(5)
        );
        assert_eq!(retrain_every(&["--retrain-every", "0"]), Duration::ZERO);
    }

    #[test]
    fn the_hold_out_is_a_power_of_two_the_kernel_can_mask() {
        let shift = |n: &str| {
            Cli::try_parse_from(["kml-agent", "run", "--hold-out", n]).map(|c| match c.command {
                Command::Run(r) => r.config().hold_out_shift,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(shift("16").unwrap(), 4);
        assert_eq!(shift("2").unwrap(), 1);
        assert_eq!(shift("65536").unwrap(), 16);
        for bad in ["0", "1", "3", "24", "131072", "x"] {
            assert!(shift(bad).is_err(), "{bad}");
        }
    }
}
