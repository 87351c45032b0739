//! The smoke run (`cargo xtask vm --smoke`): what the guest left in the share,
//! checked, and its report.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::report::{
    agent_summary, dispatch_order, hook_counts, parse_boosts, parse_cap, Boosts, Cap, Comparison,
    HookCounts, OrderStats, RunStats,
};
use super::RunContext;

/// What the smoke run left in the share.
struct Smoke {
    stock: RunStats,
    hook: RunStats,
    boosts: Boosts,
    stock_order: OrderStats,
    hook_order: OrderStats,
    agent: String,
    fmodret: RunStats,
    fmodret_boosts: Boosts,
    fmodret_order: OrderStats,
    never_boosts: Boosts,
    never_hook: Option<HookCounts>,
    model: RunStats,
    model_boosts: Boosts,
    model_hook: Option<HookCounts>,
    model_order: OrderStats,
    /// The fixed policies: off, reads-under-writes with reads alone, and with writes;
    /// reads-behind-writes the same.
    off: (Boosts, Option<HookCounts>),
    rw_alone: (Boosts, Option<HookCounts>),
    rw: (Boosts, Option<HookCounts>),
    rbw_alone: (Boosts, Option<HookCounts>),
    rbw: (Boosts, Option<HookCounts>),
    /// The boost cap of the fmod_ret run.
    cap: Cap,
}

impl Smoke {
    fn read(ctx: &RunContext) -> Result<Smoke> {
        Ok(Smoke {
            stock: ctx.fio("smoke.stock")?,
            hook: ctx.fio("smoke.hook")?,
            boosts: parse_boosts(&ctx.read("smoke.boosts")?)?,
            stock_order: dispatch_order(&ctx.read("smoke.stock.trace")?),
            hook_order: dispatch_order(&ctx.read("smoke.hook.trace")?),
            agent: agent_summary(&ctx.read("smoke.hook.agent.json").unwrap_or_default()),
            fmodret: ctx.fio("smoke.fmodret")?,
            fmodret_boosts: parse_boosts(&ctx.read("smoke.fmodret.boosts")?)?,
            fmodret_order: dispatch_order(&ctx.read("smoke.fmodret.trace")?),
            never_boosts: parse_boosts(&ctx.read("smoke.never.boosts")?)?,
            never_hook: hook_counts(&ctx.read("smoke.never.agent.json")?),
            model: ctx.fio("smoke.model")?,
            model_boosts: parse_boosts(&ctx.read("smoke.model.boosts")?)?,
            model_hook: hook_counts(&ctx.read("smoke.model.agent.json")?),
            model_order: dispatch_order(&ctx.read("smoke.model.trace")?),
            off: fixed_run(ctx, "smoke.off")?,
            rw_alone: fixed_run(ctx, "smoke.rwalone")?,
            rw: fixed_run(ctx, "smoke.rw")?,
            rbw_alone: fixed_run(ctx, "smoke.rbwalone")?,
            rbw: fixed_run(ctx, "smoke.rbw")?,
            cap: parse_cap(&ctx.read("smoke.fmodret.cap")?)?,
        })
    }

    /// The fixed policies and the cap: off never boosts though the program runs,
    /// reads-under-writes boosts nothing while no write is queued and boosts under
    /// writes, and the kernel keeps to kml_boost_max per read_expire window.
    fn policy_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.off {
            (b, Some(h)) if h.calls > 0 && h.verdicts == 0 && b.hook_boosts == 0 => {}
            (b, h) => problems.push(format!(
                "policy off: the program must run and never boost: {h:?}, {} served early",
                b.hook_boosts
            )),
        }
        for (policy, alone, under) in [
            ("reads-under-writes", self.rw_alone, self.rw),
            ("reads-behind-writes", self.rbw_alone, self.rbw),
        ] {
            match alone {
                (b, Some(h)) if h.reads > 0 && h.verdicts == 0 && b.hook_boosts == 0 => {}
                (b, h) => problems.push(format!(
                    "{policy} with no write queued: the program must see reads and boost none: {h:?}, {} served early",
                    b.hook_boosts
                )),
            }
            match under {
                (b, Some(h)) if h.verdicts > 0 && b.hook_boosts > 0 => {}
                (b, h) => problems.push(format!(
                    "{policy} under writes: no read served early ({} boosts, {h:?})",
                    b.hook_boosts
                )),
            }
        }
        let allowed = self.cap.allowed();
        let f = self.fmodret_boosts;
        if f.hook_boosts > allowed || f.hook_capped == 0 {
            problems.push(format!(
                "boost cap {} per {} ms window over {:.1} s allows at most {allowed} boosts and must refuse \
                 some: {} served early, {} refused",
                self.cap.boost_max, self.cap.window_ms, self.cap.elapsed_s, f.hook_boosts, f.hook_capped
            ));
        }
        problems
    }

    /// The fixed policies' and the cap's paragraph of the report.
    fn policy_paragraph(&self, hook_line: impl Fn(Option<HookCounts>) -> String) -> String {
        format!(
            "Fixed policies (3 s each): off: {}, kernel boosts {}; reads-under-writes, reads alone: {}, kernel \
             boosts {}; reads-under-writes, the smoke case: {}, kernel boosts {}; reads-behind-writes, reads alone: \
             {}, kernel boosts {}; reads-behind-writes, the smoke case: {}, kernel boosts {}. Boost cap (the fmod_ret run, \
             kml_boost_max {} per {} ms window, {:.1} s): {} served early (at most {}), {} refused.\n",
            hook_line(self.off.1),
            self.off.0.hook_boosts,
            hook_line(self.rw_alone.1),
            self.rw_alone.0.hook_boosts,
            hook_line(self.rw.1),
            self.rw.0.hook_boosts,
            hook_line(self.rbw_alone.1),
            self.rbw_alone.0.hook_boosts,
            hook_line(self.rbw.1),
            self.rbw.0.hook_boosts,
            self.cap.boost_max,
            self.cap.window_ms,
            self.cap.elapsed_s,
            self.fmodret_boosts.hook_boosts,
            self.cap.allowed(),
            self.fmodret_boosts.hook_capped
        )
    }

    /// What went wrong (empty: PASS).
    fn problems(&self) -> Vec<String> {
        let mut problems = self.policy_problems();
        match self.never_hook {
            None => {
                problems.push("the never-at-risk model run printed no hook counters".to_owned())
            }
            Some(h) => {
                // Not trivially 0: the model gave a verdict (meets) for most requests.
                if h.calls == 0 || h.no_verdict * 2 > h.calls {
                    problems.push(format!(
                        "never-at-risk model run: {} hook calls, {} without a model verdict",
                        h.calls, h.no_verdict
                    ));
                }
                if h.verdicts != 0 || h.model_at_risk != 0 {
                    problems.push(format!(
                        "a model that flags nothing gave {} at-risk verdicts, {} positive",
                        h.model_at_risk, h.verdicts
                    ));
                }
            }
        }
        if self.never_boosts.hook_boosts != 0 {
            problems.push(format!(
                "a model that flags nothing got {} requests served early",
                self.never_boosts.hook_boosts
            ));
        }
        match self.model_hook {
            None => {
                problems.push("the always-at-risk model run printed no hook counters".to_owned())
            }
            Some(h) if h.verdicts == 0 || h.model_at_risk < h.verdicts => problems.push(format!(
                "always-at-risk model run: {} positive verdicts, {} model at-risk verdicts",
                h.verdicts, h.model_at_risk
            )),
            // Learning online, the hook leaves 1 in 16 of the reads it would serve
            // early alone (P(none of 100) < 0.2%; hundreds of reads run).
            Some(h) if h.held_out == 0 || h.held_out * 4 > h.verdicts => problems.push(format!(
                "always-at-risk model run learning online: {} requests held out against {} positive verdicts \
                 (1 in 16 expected)",
                h.held_out, h.verdicts
            )),
            Some(_) => {}
        }
        if self.model_boosts.hook_boosts == 0 {
            problems.push(
                "the kernel served no request early in the always-at-risk model run".to_owned(),
            );
        }
        if self.model_order.reads > 0
            && self.model_order.writes_dispatched_while_waiting
                > 0.5 * self.stock_order.writes_dispatched_while_waiting
        {
            problems.push(format!(
                "the model's verdicts did not change the dispatch order: writes dispatched while a read waited {:.2} (model) vs {:.2} (stock)",
                self.model_order.writes_dispatched_while_waiting, self.stock_order.writes_dispatched_while_waiting
            ));
        }
        if self.boosts.hook_boosts == 0 {
            problems.push("the kernel served no request early in the hook run".to_owned());
        }
        if self.fmodret_boosts.hook_boosts == 0 {
            problems.push("the kernel served no request early in the fmod_ret run".to_owned());
        }
        if self.boosts.stock_boosts != 0 {
            problems.push(format!(
                "{} boosts without a program attached",
                self.boosts.stock_boosts
            ));
        }
        if self.stock_order.reads == 0 || self.hook_order.reads == 0 {
            problems.push("the trace holds no dispatched reads".to_owned());
        } else {
            if self.stock_order.writes_dispatched_while_waiting < 1.0 {
                problems.push(format!(
                    "the constructed case did not hold: stock reads waited for only {:.2} writes",
                    self.stock_order.writes_dispatched_while_waiting
                ));
            }
            if self.hook_order.writes_dispatched_while_waiting
                > 0.5 * self.stock_order.writes_dispatched_while_waiting
            {
                problems.push(format!(
                    "verdicts did not change the dispatch order: writes dispatched while a read waited {:.2} (hook) vs {:.2} (stock)",
                    self.hook_order.writes_dispatched_while_waiting, self.stock_order.writes_dispatched_while_waiting
                ));
            }
        }
        problems
    }

    fn markdown(&self, ctx: &RunContext, verdict: &str) -> String {
        let mut md = ctx.header("kml VM smoke test");
        let _ = writeln!(
            md,
            "Constructed case (workloads/vm/smoke.fio): one random reader (depth 1) against a random writer \
             keeping 48 writes queued. Stock run, then `kml-agent hook --policy reads` (kprobe + \
             bpf_override_return, the \"hook\" columns below), then the same policy as a minimal fmod_ret program \
             (`--via fmod-ret`), then the model path: `kml-agent run --model M --act model-reads` (observers, model and \
             verdict program in one object) with two hand-set models, one that flags no request (\"model, none\"; \
             not traced) and one that flags every request (\"model, all\").\n"
        );
        let _ = writeln!(
            md,
            "| dispatch order (block tracepoints) | stock | hook (kprobe) | fmod_ret | model, all |\n| --- | ---: | ---: | ---: | ---: |"
        );
        let _ = writeln!(
            md,
            "| reads dispatched | {} | {} | {} | {} |",
            self.stock_order.reads,
            self.hook_order.reads,
            self.fmodret_order.reads,
            self.model_order.reads
        );
        let _ = writeln!(
            md,
            "| writes dispatched while a read waited (mean) | {:.2} | {:.2} | {:.2} | {:.2} |",
            self.stock_order.writes_dispatched_while_waiting,
            self.hook_order.writes_dispatched_while_waiting,
            self.fmodret_order.writes_dispatched_while_waiting,
            self.model_order.writes_dispatched_while_waiting
        );
        let _ = writeln!(
            md,
            "| earlier-queued writes a read overtook (mean) | {:.2} | {:.2} | {:.2} | {:.2} |",
            self.stock_order.writes_overtaken,
            self.hook_order.writes_overtaken,
            self.fmodret_order.writes_overtaken,
            self.model_order.writes_overtaken
        );
        let _ = writeln!(
            md,
            "| reads dispatched with at most 1 write before them | {:.0}% | {:.0}% | {:.0}% | {:.0}% |",
            100.0 * self.stock_order.reads_served_next,
            100.0 * self.hook_order.reads_served_next,
            100.0 * self.fmodret_order.reads_served_next,
            100.0 * self.model_order.reads_served_next
        );
        let _ = writeln!(
            md,
            "| read latency mean (ms) | {:.1} | {:.1} | {:.1} | {:.1} |",
            self.stock.read.mean_ns / 1e6,
            self.hook.read.mean_ns / 1e6,
            self.fmodret.read.mean_ns / 1e6,
            self.model.read.mean_ns / 1e6
        );
        let _ = writeln!(
            md,
            "| requests served early (kml_boosts), refused by the cap | {} | {}, {} | {}, {} | {}, {} |\n",
            self.boosts.stock_boosts,
            self.boosts.hook_boosts,
            self.boosts.hook_capped,
            self.fmodret_boosts.hook_boosts,
            self.fmodret_boosts.hook_capped,
            self.model_boosts.hook_boosts,
            self.model_boosts.hook_capped
        );
        let hook_line = |h: Option<HookCounts>| {
            h.map_or("(no counters)".to_owned(), |h| {
                format!(
                    "{} calls, {} model at-risk verdicts, {} without a verdict, {} positive verdicts, \
                     {} held out to learn from",
                    h.calls, h.model_at_risk, h.no_verdict, h.verdicts, h.held_out
                )
            })
        };
        let _ = writeln!(md, "{}", self.policy_paragraph(hook_line));
        let _ = writeln!(
            md,
            "Model runs: none at risk: {}, kernel boosts {}; all at risk: {}, kernel boosts {}.\n",
            hook_line(self.never_hook),
            self.never_boosts.hook_boosts,
            hook_line(self.model_hook),
            self.model_boosts.hook_boosts
        );
        let _ = writeln!(md, "Stock vs hook (kprobe):\n");
        let cmp = Comparison {
            name: "smoke".into(),
            stock: self.stock,
            hook: self.hook,
            boosts: self.boosts,
            agent: self.agent.clone(),
            pairs: Vec::new(),
        };
        md.push_str(&cmp.table());
        let _ = writeln!(md, "\nResult: {verdict}");
        md
    }

    /// The one line `cargo xtask vm --smoke` prints.
    fn summary_line(&self, verdict: &str, guest_secs: f64) -> String {
        format!(
            "smoke: {verdict} | boosts: kprobe {} ({} over the cap), fmod_ret {}, model all {} / none {} | writes dispatched \
             while a read waited: {:.2} stock, {:.2} kprobe, {:.2} fmod_ret, {:.2} model | read latency mean \
             {:.1} / {:.1} / {:.1} / {:.1} ms | guest {:.0} s",
            self.boosts.hook_boosts,
            self.boosts.hook_capped,
            self.fmodret_boosts.hook_boosts,
            self.model_boosts.hook_boosts,
            self.never_boosts.hook_boosts,
            self.stock_order.writes_dispatched_while_waiting,
            self.hook_order.writes_dispatched_while_waiting,
            self.fmodret_order.writes_dispatched_while_waiting,
            self.model_order.writes_dispatched_while_waiting,
            self.stock.read.mean_ns / 1e6,
            self.hook.read.mean_ns / 1e6,
            self.fmodret.read.mean_ns / 1e6,
            self.model.read.mean_ns / 1e6,
            guest_secs
        )
    }
}

/// A fixed-policy run's boosts and the verdict program's counters.
fn fixed_run(ctx: &RunContext, name: &str) -> Result<(Boosts, Option<HookCounts>)> {
    Ok((
        parse_boosts(&ctx.read(&format!("{name}.boosts"))?)?,
        hook_counts(&ctx.read(&format!("{name}.agent.json"))?),
    ))
}

/// Checks the smoke run and writes its report; fails when a check failed.
pub fn smoke_report(ctx: &RunContext, path: &Path) -> Result<ExitCode> {
    let smoke = Smoke::read(ctx)?;
    let problems = smoke.problems();
    let verdict = if problems.is_empty() {
        "PASS".to_owned()
    } else {
        format!("FAIL: {}", problems.join("; "))
    };
    fs::write(path, smoke.markdown(ctx, &verdict))?;
    eprintln!("xtask: vm: smoke report {}", path.display());
    println!("{}", smoke.summary_line(&verdict, ctx.guest_secs));
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
