//! The comparison run (`cargo xtask vm`): each workload's stock and hook runs, as
//! the guest left them in the share, and the report (`target/vm/report.md`, with
//! its goal sentence in `report.json` for `cargo xtask bench`).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use super::report::{agent_summary, combine, parse_boosts, summary, summary_line, Comparison};
use super::RunContext;

/// Each workload's comparison, and the pairs the guest did not finish (a guest
/// stopped midway, seen by `--report-only`).
fn comparisons(ctx: &RunContext) -> Result<(Vec<Comparison>, Vec<String>)> {
    let mut cmps = Vec::new();
    // Pairs the guest did not finish (a guest stopped midway, seen by --report-only).
    let mut incomplete = Vec::new();
    for name in &ctx.workloads {
        let mut pairs = Vec::new();
        let mut agent = String::new();
        for r in 1..=ctx.repeat {
            match (
                ctx.fio(&format!("{name}.stock.{r}")),
                ctx.fio(&format!("{name}.hook.{r}")),
            ) {
                (Ok(st), Ok(hk)) => pairs.push((st, hk)),
                (st, hk) => {
                    let why = st
                        .err()
                        .or(hk.err())
                        .map(|e| format!("{e:#}"))
                        .unwrap_or_default();
                    incomplete.push(format!("{name} pair {r}: {why}"));
                    continue;
                }
            }
            let events = ctx
                .read(&format!("{name}.hook.{r}.agent.json"))
                .unwrap_or_default();
            agent.push_str(&agent_summary(&events));
            agent.push('\n');
        }
        if pairs.is_empty() {
            continue;
        }
        let boosts = parse_boosts(&ctx.read(&format!("{name}.boosts"))?)?;
        let stock = combine(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
        let hook = combine(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
        cmps.push(Comparison {
            name: name.clone(),
            stock,
            hook,
            boosts,
            agent,
            pairs,
        });
    }
    Ok((cmps, incomplete))
}

/// The report, its goal sentence and the summary line.
fn render(
    ctx: &RunContext,
    cmps: &[Comparison],
    incomplete: &[String],
) -> (String, String, String) {
    let mut md = ctx.header("kml VM comparison: stock mq-deadline vs kml verdicts");
    let _ = writeln!(
        md,
        "Each workload (workloads/vm/NAME.fio, fixed seeds) ran {} s (after a 2 s ramp) with no program attached \
         (stock) and with verdicts acting, policy {}, {} pair(s), the order alternating (stock first in odd \
         pairs); pairs are combined (rates averaged, latencies I/O-weighted). Latency is fio's total latency \
         (submission to completion). Where several jobs do the same direction, values are I/O-weighted averages \
         of the jobs'. Fixed policies run as `kml-agent hook --policy P`; the model policies as `kml-agent run \
         --model M --act P --retrain-every 0` (observers, the model and the verdict program in one object; the \
         model is not retrained during the run).\n",
        ctx.runtime, ctx.policy, ctx.repeat
    );
    let _ = writeln!(
        md,
        "The `randread-*` readers are closed-loop (the next read goes out when the previous one completes): when \
         verdicts make reads faster, the reader issues more of them and takes more of the disk's I/O slots, which \
         costs the writer throughput (a merged sequential write op carries several 4 KiB writes). The \
         `rateread-*` readers read at a fixed rate, so their throughput change is the cost of the reordering \
         itself.\n"
    );
    let _ = writeln!(
        md,
        "| workload | read mean | read p99 | write p99 | throughput | boosts (capped) | issue goal |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for c in cmps {
        let goal = if !c.stock.mixed() {
            if c.read_worse_at_p99() || c.write_worse_at_p99() {
                "control: worse at p99 (> 2%)"
            } else {
                "control: not worse"
            }
        } else if c.meets_goal() && c.write_worse_at_p99() {
            "met for reads; write p99 worse"
        } else if c.meets_goal() {
            "met"
        } else {
            "not met"
        };
        let _ = writeln!(
            md,
            "| {} | {:+.1}% | {:+.1}% | {} | {:+.1}% | {} ({}) | {goal} |",
            c.name,
            c.read_mean_pct(),
            c.read_p99_pct(),
            if c.stock.write.ios > 0 {
                format!("{:+.1}%", c.write_p99_pct())
            } else {
                "-".into()
            },
            c.throughput_pct(),
            c.boosts.hook_boosts,
            c.boosts.hook_capped
        );
    }
    let met = cmps
        .iter()
        .filter(|c| c.stock.mixed() && c.meets_goal())
        .count();
    let list = |f: &dyn Fn(&Comparison) -> bool| -> String {
        let v: Vec<&str> = cmps
            .iter()
            .filter(|c| f(c))
            .map(|c| c.name.as_str())
            .collect();
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    let goal = format!(
        "Issue goal (>= 15% lower mean and >= 25% lower p99 read latency, <= 2% throughput loss, on at least two \
         mixed workloads; no workload > 2% worse at p99): latency and throughput met on {met} mixed workload(s); \
         read p99 more than 2% worse in: {}; write p99 more than 2% worse in: {} (serving reads first delays \
         writes on a saturated disk).",
        list(&|c| c.read_worse_at_p99()),
        list(&|c| c.write_worse_at_p99()),
    );
    let _ = writeln!(md, "\n{goal}\n");
    if !incomplete.is_empty() {
        let _ = writeln!(
            md,
            "Left out, incomplete (the guest stopped before the pair finished; boosts of a finished half \
             are still counted):\n\n- {}\n",
            incomplete.join("\n- ")
        );
    }
    for c in cmps {
        let _ = writeln!(md, "## {}\n\n{}", c.name, c.table());
    }
    let line = match summary(cmps) {
        Some((mean, p99, tput, n)) => {
            let _ = writeln!(
                md,
                "Summary (average over the {n} mixed workloads): {}",
                summary_line(mean, p99, tput)
            );
            summary_line(mean, p99, tput)
        }
        None => "read latency: no mixed workload ran".to_owned(),
    };
    (md, goal, line)
}

/// Reads the comparison run and writes its report.
pub fn full_report(ctx: &RunContext, path: &Path) -> Result<ExitCode> {
    let (cmps, incomplete) = comparisons(ctx)?;
    let (md, goal, line) = render(ctx, &cmps, &incomplete);
    fs::write(path, &md)?;
    // The goal sentence for `cargo xtask bench`'s summary (it reads this, not the prose).
    let goal_path = path.with_extension("json");
    fs::write(&goal_path, serde_json::json!({ "goal": goal }).to_string())
        .with_context(|| format!("writing {}", goal_path.display()))?;
    eprintln!("xtask: vm: report {}", path.display());
    for c in &cmps {
        eprintln!(
            "xtask: vm: {:<22} read mean {:+6.1}%  p99 {:+6.1}%  throughput {:+5.1}%  boosts {} ({} capped)",
            c.name,
            c.read_mean_pct(),
            c.read_p99_pct(),
            c.throughput_pct(),
            c.boosts.hook_boosts,
            c.boosts.hook_capped
        );
    }
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
