//! The comparison run (`cargo xtask vm`): each workload's rounds of stock and
//! policy runs, as the guest left them in the share, and the report
//! (`target/vm/report.md`, with its goal sentence in `report.json` for `cargo xtask
//! bench`).
//!
//! Every arm (stock and each policy) of a workload ran once per round, same seeds,
//! the order rotating; a change is the arm against stock *in the same round*, and
//! the spread between rounds (lowest..highest) shows which differences beat the
//! noise. The witness traces (`kml-agent record` in every run) give each class's
//! requests dispatched after their own deadline.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use super::report::{
    agent_summary, combine, doctor_hz, parse_arm_boosts, pct, spread, summary, summary_line,
    witness_misses, Boosts, ClassMisses, Comparison, RunStats,
};
use super::RunContext;

/// The arm that runs no program.
const STOCK: &str = "stock";

/// One arm's complete rounds of one workload.
#[derive(Clone, Debug)]
struct Arm {
    name: String,
    runs: Vec<RunStats>,
    /// Own-deadline misses per class, summed over the rounds (`None`: no witness).
    misses: Option<ClassMisses>,
    boosts: (u64, u64),
    agent: String,
}

/// One workload: its arms over the rounds every arm finished.
#[derive(Clone, Debug)]
struct Workload {
    name: String,
    rounds: Vec<u32>,
    arms: Vec<Arm>,
}

impl Workload {
    fn arm(&self, name: &str) -> Option<&Arm> {
        self.arms.iter().find(|a| a.name == name)
    }

    /// `policy` against stock, round by round.
    fn comparison(&self, policy: &str) -> Option<Comparison> {
        let (stock, arm) = (self.arm(STOCK)?, self.arm(policy)?);
        Some(Comparison {
            name: self.name.clone(),
            stock: combine(&stock.runs),
            hook: combine(&arm.runs),
            boosts: Boosts {
                stock_boosts: stock.boosts.0,
                hook_boosts: arm.boosts.0,
                hook_capped: arm.boosts.1,
            },
            agent: arm.agent.clone(),
            pairs: stock
                .runs
                .iter()
                .copied()
                .zip(arm.runs.iter().copied())
                .collect(),
        })
    }
}

/// Each workload's arms, and the runs the guest did not finish (a guest stopped
/// midway, seen by `--report-only`).
fn workloads(ctx: &RunContext) -> Result<(Vec<Workload>, Vec<String>)> {
    let arms: Vec<String> = std::iter::once(STOCK.to_owned())
        .chain(ctx.policies.iter().cloned())
        .collect();
    let hz = ctx.read("doctor.txt").ok().and_then(|d| doctor_hz(&d));
    let mut out = Vec::new();
    let mut incomplete = Vec::new();
    for name in &ctx.workloads {
        // A round counts when every arm finished it.
        let mut rounds = Vec::new();
        let mut runs: HashMap<&str, Vec<RunStats>> = HashMap::new();
        for r in 1..=ctx.repeat {
            let got: Vec<Result<RunStats>> = arms
                .iter()
                .map(|a| ctx.fio(&format!("{name}.{a}.{r}")))
                .collect();
            if let Some(e) = got.iter().find_map(|g| g.as_ref().err()) {
                incomplete.push(format!("{name} round {r}: {e:#}"));
                continue;
            }
            rounds.push(r);
            for (a, g) in arms.iter().zip(got) {
                runs.entry(a).or_default().push(g.expect("checked"));
            }
        }
        if rounds.is_empty() {
            continue;
        }
        let boosts = parse_arm_boosts(&ctx.read(&format!("{name}.boosts")).unwrap_or_default());
        let mut w = Workload {
            name: name.clone(),
            rounds: rounds.clone(),
            arms: Vec::new(),
        };
        for a in &arms {
            let mut misses = Some(ClassMisses::default());
            let mut agent = String::new();
            for r in &rounds {
                let run = format!("{name}.{a}.{r}");
                let witness = ctx
                    .read(&format!("{run}.csv"))
                    .and_then(|csv| witness_misses(&csv, hz.unwrap_or(0)));
                match (&mut misses, witness) {
                    (Some(m), Ok(c)) => m.add(&c),
                    (_, Err(e)) => {
                        eprintln!("xtask: vm: {run}: no witness counts: {e:#}");
                        misses = None;
                    }
                    (None, Ok(_)) => {}
                }
                if a != STOCK {
                    agent.push_str(&agent_summary(
                        &ctx.read(&format!("{run}.agent.json")).unwrap_or_default(),
                    ));
                    agent.push('\n');
                }
            }
            w.arms.push(Arm {
                name: a.clone(),
                runs: runs.remove(a.as_str()).unwrap_or_default(),
                misses,
                boosts: boosts.get(a).copied().unwrap_or_default(),
                agent,
            });
        }
        out.push(w);
    }
    Ok((out, incomplete))
}

/// `x%` with the spread of the per-round values: `-62.6% (-63.3..-61.9)`.
fn with_spread(combined: f64, rounds: &[f64]) -> String {
    match spread(rounds) {
        Some((lo, hi)) if rounds.len() > 1 => format!("{combined:+.1}% ({lo:+.1}..{hi:+.1})"),
        _ => format!("{combined:+.1}%"),
    }
}

/// Per-round changes of `c`'s pairs under `f(new, base)`.
fn per_round(c: &Comparison, f: impl Fn(&RunStats, &RunStats) -> f64) -> Vec<f64> {
    c.pairs.iter().map(|(s, h)| f(h, s)).collect()
}

fn read_mean(h: &RunStats, s: &RunStats) -> f64 {
    pct(h.read.mean_ns, s.read.mean_ns)
}
fn read_p99(h: &RunStats, s: &RunStats) -> f64 {
    pct(h.read.p99_ns, s.read.p99_ns)
}
fn write_p99(h: &RunStats, s: &RunStats) -> f64 {
    pct(h.write.p99_ns, s.write.p99_ns)
}
fn throughput(h: &RunStats, s: &RunStats) -> f64 {
    pct(h.throughput_bytes(), s.throughput_bytes())
}

/// The arm the last line speaks for: the learned verdict (a model policy), else the
/// last policy; and the fixed rule it is measured against, if one ran.
fn learned_and_rule(policies: &[String]) -> (Option<&str>, Option<&str>) {
    let is_model = |p: &&String| p.as_str() == "model" || p.as_str() == "model-reads";
    let learned = policies.iter().find(is_model).or(policies.last());
    let rule = policies
        .iter()
        .find(|p| p.as_str() == "reads-under-writes")
        .or_else(|| policies.iter().find(|p| !is_model(p)));
    (
        learned.map(String::as_str),
        rule.map(String::as_str)
            .filter(|r| Some(*r) != learned.map(String::as_str)),
    )
}

fn misses_cell(
    c: Option<&ClassMisses>,
    class: fn(&ClassMisses) -> super::report::ClassCount,
) -> String {
    match c.map(class) {
        Some(k) if k.requests > 0 => {
            format!("{} / {} ({:.1}%)", k.missed, k.requests, 100.0 * k.share())
        }
        Some(_) => "-".into(),
        None => "?".into(),
    }
}

/// The changes of one policy against stock: one table row per workload.
fn policy_table(md: &mut String, policy: &str, ws: &[Workload]) {
    let _ = writeln!(
        md,
        "### {policy} against stock\n\n| workload | read mean | read p99 | write p99 | throughput | boosts (capped) | goal (read) |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for w in ws {
        let Some(c) = w.comparison(policy) else {
            continue;
        };
        let goal = if !c.stock.mixed() {
            if c.read_worse_at_p99() || c.write_worse_at_p99() {
                "control: worse at p99 (> 2%)"
            } else {
                "control: not worse"
            }
        } else if c.meets_goal() {
            "met"
        } else {
            "not met"
        };
        let write = if c.stock.write.ios > 0 {
            with_spread(c.write_p99_pct(), &per_round(&c, write_p99))
        } else {
            "-".into()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {write} | {} | {} ({}) | {goal} |",
            w.name,
            with_spread(c.read_mean_pct(), &per_round(&c, read_mean)),
            with_spread(c.read_p99_pct(), &per_round(&c, read_p99)),
            with_spread(c.throughput_pct(), &per_round(&c, throughput)),
            c.boosts.hook_boosts,
            c.boosts.hook_capped
        );
    }
    let _ = writeln!(md);
}

/// Own-deadline misses per class and arm, with write p99 beside.
fn misses_table(md: &mut String, ws: &[Workload]) {
    let _ = writeln!(
        md,
        "### Deadline misses per class (each request against its own deadline)\n\n\
         Counted in the witness traces (`kml-agent record`, observers only, in every run): a request missed \
         when it was dispatched after the jiffy its deadline fell in at insert (insert jiffies + the \
         direction's expiry), so a boost (which moves `fifo_time` to now) does not count against it. Summed \
         over the rounds; `worse` marks a class that missed a larger share of its own deadlines than under \
         stock.\n\n| workload | arm | reads missed | writes missed | write p99 (ms) |\n| --- | --- | ---: | ---: | ---: |"
    );
    for w in ws {
        let stock = w.arm(STOCK).and_then(|a| a.misses);
        for a in &w.arms {
            let worse =
                |class: fn(&ClassMisses) -> super::report::ClassCount| match (stock, a.misses) {
                    (Some(s), Some(m))
                        if a.name != STOCK && class(&m).share() > class(&s).share() =>
                    {
                        " worse"
                    }
                    _ => "",
                };
            let _ = writeln!(
                md,
                "| {} | {} | {}{} | {}{} | {:.1} |",
                w.name,
                a.name,
                misses_cell(a.misses.as_ref(), |m| m.read),
                worse(|m| m.read),
                misses_cell(a.misses.as_ref(), |m| m.write),
                worse(|m| m.write),
                combine(&a.runs).write.p99_ns / 1e6
            );
        }
    }
    let _ = writeln!(md);
}

/// The mixed workloads (reads and writes in the stock run) where `policy` ran.
fn mixed_for<'a>(ws: &'a [Workload], policy: &str) -> Vec<&'a Workload> {
    ws.iter()
        .filter(|w| w.comparison(policy).is_some_and(|c| c.stock.mixed()))
        .collect()
}

/// The same-round table of `arm` against the fixed `rule` on the mixed workloads;
/// returns the workloads where `arm`'s read p99 is at least 10% lower (combined).
fn against_rule(md: &mut String, mixed: &[&Workload], arm: &str, rule: &str) -> Vec<String> {
    let mut beats_rule = Vec::new();
    let _ = writeln!(
        md,
        "### {arm} against {rule} (same rounds)\n\n| workload | read mean | read p99 | write p99 | throughput | p99 >= 10% lower |\n| --- | ---: | ---: | ---: | ---: | --- |"
    );
    for w in mixed {
        let (Some(l), Some(r)) = (w.arm(arm), w.arm(rule)) else {
            continue;
        };
        let h2h = Comparison {
            name: w.name.clone(),
            stock: combine(&r.runs),
            hook: combine(&l.runs),
            boosts: Boosts::default(),
            agent: String::new(),
            pairs: r.runs.iter().copied().zip(l.runs.iter().copied()).collect(),
        };
        let rounds = per_round(&h2h, read_p99);
        let lower = h2h.read_p99_pct() <= -10.0;
        let every = rounds.iter().all(|&x| x <= -10.0);
        if lower {
            beats_rule.push(w.name.clone());
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            w.name,
            with_spread(h2h.read_mean_pct(), &per_round(&h2h, read_mean)),
            with_spread(h2h.read_p99_pct(), &rounds),
            with_spread(h2h.write_p99_pct(), &per_round(&h2h, write_p99)),
            with_spread(h2h.throughput_pct(), &per_round(&h2h, throughput)),
            match (lower, every) {
                (true, true) => "yes, in every round",
                (true, false) => "yes combined, not in every round",
                _ => "no",
            }
        );
    }
    let _ = writeln!(md);
    beats_rule
}

/// The learned verdict against the fixed rule, round by round, and the issue's
/// goals for it (issue 13, part 4). Returns the goal sentence.
fn learned_section(md: &mut String, ws: &[Workload], learned: &str, rule: Option<&str>) -> String {
    let mixed = mixed_for(ws, learned);
    let beats_rule = match rule {
        Some(rule) => against_rule(md, &mixed, learned, rule),
        None => Vec::new(),
    };
    let read_goal: Vec<String> = mixed
        .iter()
        .filter(|w| {
            w.comparison(learned)
                .is_some_and(|c| c.read_mean_pct() <= -15.0 && c.read_p99_pct() <= -25.0)
        })
        .map(|w| w.name.clone())
        .collect();
    let tput_lost: Vec<String> = mixed
        .iter()
        .filter(|w| {
            w.comparison(learned)
                .is_some_and(|c| c.throughput_pct() < -2.0)
        })
        .map(|w| w.name.clone())
        .collect();
    let mut more_misses = Vec::new();
    let mut unknown = Vec::new();
    for w in &mixed {
        match (
            w.arm(STOCK).and_then(|a| a.misses),
            w.arm(learned).and_then(|a| a.misses),
        ) {
            (Some(s), Some(l)) => {
                for (class, sc, lc) in [("reads", s.read, l.read), ("writes", s.write, l.write)] {
                    if lc.share() > sc.share() {
                        more_misses.push(format!(
                            "{} {class} {:.1}% vs {:.1}%",
                            w.name,
                            100.0 * lc.share(),
                            100.0 * sc.share()
                        ));
                    }
                }
            }
            _ => unknown.push(w.name.clone()),
        }
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    let goal = format!(
        "Issue 13 goals for {learned} on {} mixed workload(s): read p99 >= 10% lower than {} on {} ({}; goal: 2); \
         read mean >= 15% and p99 >= 25% lower than stock on {} ({}); throughput more than 2% lower in: {}; \
         a class missing more of its own deadlines than under stock: {}{}.",
        mixed.len(),
        rule.unwrap_or("the fixed rule (not run)"),
        beats_rule.len(),
        list(&beats_rule),
        read_goal.len(),
        list(&read_goal),
        list(&tput_lost),
        list(&more_misses),
        if unknown.is_empty() {
            String::new()
        } else {
            format!(" (no witness counts: {})", unknown.join(", "))
        }
    );
    goal
}

/// The report, its goal sentence and the summary line.
fn render(ctx: &RunContext, ws: &[Workload], incomplete: &[String]) -> (String, String, String) {
    let mut md = ctx.header("kml VM comparison: stock mq-deadline vs kml verdicts");
    let arms: Vec<&str> = std::iter::once(STOCK)
        .chain(ctx.policies.iter().map(String::as_str))
        .collect();
    let _ = writeln!(
        md,
        "Each workload (workloads/vm/NAME.fio, fio seed {}) ran {} s (after a 2 s ramp) in {} round(s) of: {}; \
         each round runs every arm once, the order rotating by one arm per round. A change is the arm against \
         stock in the same round; combined over the rounds (rates averaged, latencies I/O-weighted), with the \
         lowest..highest of the rounds' own changes in brackets: a difference smaller than that spread is noise. \
         Latency is fio's total latency (submission to completion); where several jobs do the same direction, \
         values are I/O-weighted averages of the jobs'. Fixed policies run as `kml-agent hook --policy P`; the \
         model policies as `kml-agent run --model M --act P` (model {}); every run has a `kml-agent record` \
         witness beside it.\n",
        ctx.seed,
        ctx.runtime,
        ctx.repeat,
        arms.join(", "),
        ctx.model.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        md,
        "The `randread-*` readers are closed-loop (the next read goes out when the previous one completes): when \
         verdicts make reads faster, the reader issues more of them and takes more of the disk's I/O slots, which \
         costs the writer throughput (a merged sequential write op carries several 4 KiB writes). The \
         `rateread-*` readers read at a fixed rate, so their throughput change is the cost of the reordering \
         itself.\n"
    );
    for p in &ctx.policies {
        policy_table(&mut md, p, ws);
    }
    misses_table(&mut md, ws);
    let (learned, rule) = learned_and_rule(&ctx.policies);
    // Every other policy against the rule too, in the same rounds (the learned
    // verdict's table comes with its goals below).
    if let Some(rule) = rule {
        for p in ctx.policies.iter().map(String::as_str) {
            if p == rule || Some(p) == learned {
                continue;
            }
            against_rule(&mut md, &mixed_for(ws, p), p, rule);
        }
    }
    let mut goal = String::new();
    if let Some(l) = learned {
        goal = learned_section(&mut md, ws, l, rule);
        let _ = writeln!(md, "{goal}\n");
    }
    if !incomplete.is_empty() {
        let _ = writeln!(
            md,
            "Left out, incomplete (the guest stopped before every arm finished the round):\n\n- {}\n",
            incomplete.join("\n- ")
        );
    }
    for w in ws {
        let rounds: Vec<String> = w.rounds.iter().map(u32::to_string).collect();
        let _ = writeln!(md, "## {} (rounds {})\n", w.name, rounds.join(", "));
        for p in &ctx.policies {
            if let Some(c) = w.comparison(p) {
                let _ = writeln!(md, "### {p}\n\n{}", c.table());
            }
        }
    }
    let cmps: Vec<Comparison> = learned
        .map(|l| ws.iter().filter_map(|w| w.comparison(l)).collect())
        .unwrap_or_default();
    let line = match summary(&cmps) {
        Some((mean, p99, tput, n)) => {
            let _ = writeln!(
                md,
                "Summary for {} (average over the {n} mixed workloads): {}",
                learned.unwrap_or("?"),
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
    let (ws, incomplete) = workloads(ctx)?;
    let (md, goal, line) = render(ctx, &ws, &incomplete);
    fs::write(path, &md)?;
    // The goal sentence for `cargo xtask bench`'s summary (it reads this, not the prose).
    let goal_path = path.with_extension("json");
    fs::write(&goal_path, serde_json::json!({ "goal": goal }).to_string())
        .with_context(|| format!("writing {}", goal_path.display()))?;
    eprintln!("xtask: vm: report {}", path.display());
    for w in &ws {
        for p in &ctx.policies {
            if let Some(c) = w.comparison(p) {
                eprintln!(
                    "xtask: vm: {:<22} {:<19} read mean {:+6.1}%  p99 {:+6.1}%  write p99 {:+6.1}%  throughput {:+5.1}%  boosts {} ({} capped)",
                    c.name,
                    p,
                    c.read_mean_pct(),
                    c.read_p99_pct(),
                    c.write_p99_pct(),
                    c.throughput_pct(),
                    c.boosts.hook_boosts,
                    c.boosts.hook_capped
                );
            }
        }
    }
    if !goal.is_empty() {
        eprintln!("xtask: vm: {goal}");
    }
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learned_verdict_and_the_rule() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            learned_and_rule(&v(&["reads-under-writes", "model-reads"])),
            (Some("model-reads"), Some("reads-under-writes"))
        );
        assert_eq!(
            learned_and_rule(&v(&["model-reads", "reads"])),
            (Some("model-reads"), Some("reads"))
        );
        assert_eq!(
            learned_and_rule(&v(&["reads-under-writes"])),
            (Some("reads-under-writes"), None)
        );
        assert_eq!(learned_and_rule(&[]), (None, None));
        assert_eq!(
            with_spread(-12.34, &[-10.0, -15.0]),
            "-12.3% (-15.0..-10.0)"
        );
        assert_eq!(with_spread(-12.34, &[-12.34]), "-12.3%");
    }
}
