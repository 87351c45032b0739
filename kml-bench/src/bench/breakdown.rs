//! Where the observer's time goes (`--only breakdown`): the cost probes of
//! `kml_ebpf_common::layout::ablate`, each paired with the observer it cuts.
//!
//! Two agents observe one loop device at once, one with `KML_ABLATE` set to a
//! probe and one with less cut away (or nothing), so every request runs both
//! programs back to back under the same load; bpf_stats times each agent's
//! programs and the difference is paired event by event. The program attached
//! second runs on warmer lines (about 40–60 ns cheaper at insert on a 2-CPU guest),
//! so which agent attaches first alternates by round and the rounds are even.
//!
//! Steps, from nothing to the whole observer: attached but returning at once; the
//! request window read; the device and entry lookups; the request's life (entry,
//! counts, clocks, record). Then the parts of that life, each cut alone. With
//! `--before REV`, one more pair: that revision's agent beside this tree's, both
//! whole, the before/after of a change to the programs, event by event.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use kml_ebpf_common::layout::ablate;

use super::cost::{all_event_progs, bpftool_progs, deltas, event_progs, ProgCost, StatsBench};
use super::overhead::start_agent_with_env;
use super::parse::EventProg;
use super::sys;
use super::Ctx;

pub const BREAKDOWN_MD: &str = "BREAKDOWN.md";

/// One pair: the agent with `less` work against the one with `more` (ablate bits).
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub name: &'static str,
    pub less: u32,
    pub more: u32,
    /// A step of the cumulative chain (its differences add up to the observer);
    /// otherwise one part of the request's life, cut alone.
    pub cumulative: bool,
}

pub const STEPS: [Step; 9] = [
    Step {
        name: "the floor: three programs attached, returning at once (absolute)",
        less: ablate::PROBE_NULL,
        more: ablate::PROBE_NULL,
        cumulative: true,
    },
    Step {
        name: "+ one probe read of the request's window (`RQ_WINDOW` bytes; up to `RQ_WIDE_WINDOW` at issue, to reach `fifo_time`)",
        less: ablate::PROBE_NULL,
        more: ablate::PROBE_STOP_AT_READ,
        cumulative: true,
    },
    Step {
        name: "+ the device (queue cache) and the request's entry (scheduler tag)",
        less: ablate::PROBE_STOP_AT_READ,
        more: ablate::PROBE_STOP_AT_ENTRY,
        cumulative: true,
    },
    Step {
        name: "+ the request's life: entry, counts, clocks, features, record",
        less: ablate::PROBE_STOP_AT_ENTRY,
        more: 0,
        cumulative: true,
    },
    Step {
        name: "of which: the record into the CPU's batch and the ring",
        less: ablate::PROBE_NO_RING,
        more: 0,
        cumulative: false,
    },
    Step {
        name: "of which: the per-device load state (last insert, issue gap, wait averages, miss shares)",
        less: ablate::PROBE_NO_LOAD_STATE,
        more: 0,
        cumulative: false,
    },
    Step {
        name: "of which: the in-flight and queued counts (inserted, left the queue, left flight: one line per writer)",
        less: ablate::PROBE_NO_COUNTS,
        more: 0,
        cumulative: false,
    },
    Step {
        name: "of which: the whole record written into the entry at insert (three lines) rather than its first fields",
        less: ablate::PROBE_NO_ENTRY_WRITE,
        more: 0,
        cumulative: false,
    },
    Step {
        name: "of which: the clock (`bpf_ktime_get_ns`, once per event)",
        less: ablate::PROBE_NO_CLOCK,
        more: 0,
        cumulative: false,
    },
];

/// The two agents' costs in one round of one step.
pub struct StepRound {
    pub step: usize,
    pub less: BTreeMap<EventProg, ProgCost>,
    pub more: BTreeMap<EventProg, ProgCost>,
}

pub struct Breakdown {
    pub rounds: Vec<StepRound>,
    /// `--before REV`: the rounds of step [`STEPS`]`.len()` pair that revision's
    /// agent (less) with this tree's (more), neither with a probe: "this tree
    /// minus REV" per event. Its revision and commit, for the report.
    pub before: Option<(String, String)>,
    pub n_rounds: usize,
    pub secs: u64,
    pub stats_was: String,
}

/// Mean, lowest and highest of a step's per-round values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(v: &[f64]) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread {
            mean,
            min,
            max,
            n: v.len(),
        })
    }
}

impl Breakdown {
    /// What step `step` adds to `prog`, round by round: the `more` agent's ns per
    /// run minus the `less` agent's (for the floor, its ns per run itself).
    pub fn step_values(&self, step: usize, prog: EventProg) -> Vec<f64> {
        let ns = |m: &BTreeMap<EventProg, ProgCost>| m.get(&prog).and_then(ProgCost::ns_per_run);
        self.rounds
            .iter()
            .filter(|r| r.step == step)
            .filter_map(|r| {
                if STEPS.get(step).is_some_and(|s| s.less == s.more) {
                    // Both agents ran the floor: each is a sample of it.
                    Some((ns(&r.less)? + ns(&r.more)?) / 2.0)
                } else {
                    Some(ns(&r.more)? - ns(&r.less)?)
                }
            })
            .collect()
    }

    pub fn step(&self, step: usize, prog: EventProg) -> Option<Spread> {
        Spread::of(&self.step_values(step, prog))
    }

    /// The whole observer's ns per run (the `more` agent of the last cumulative
    /// step), for the check that the steps add up.
    pub fn whole(&self, prog: EventProg) -> Option<Spread> {
        let last = STEPS.iter().rposition(|s| s.cumulative)?;
        let v: Vec<f64> = self
            .rounds
            .iter()
            .filter(|r| r.step == last)
            .filter_map(|r| r.more.get(&prog).and_then(ProgCost::ns_per_run))
            .collect();
        Spread::of(&v)
    }
}

pub fn run(ctx: &Ctx) -> Result<Breakdown> {
    // Even: each order of the two agents equally often.
    let (n_rounds, secs) = if ctx.quick { (2, 2) } else { (6, 3) };
    let before = ctx.before.as_ref();
    let bench = StatsBench::set_up(ctx)?;
    let dev = &bench.dev;
    let mut rounds = Vec::new();
    // The steps, then (with --before) that revision's agent against this one's.
    let mut pairs: Vec<(u32, u32, Option<&std::path::Path>)> =
        STEPS.iter().map(|s| (s.less, s.more, None)).collect();
    if let Some(b) = &before {
        pairs.push((0, 0, Some(b.binary.as_path())));
    }
    for round in 0..n_rounds {
        for (si, &(less_bits, more_bits, less_binary)) in pairs.iter().enumerate() {
            sys::check_interrupted()?;
            let name = format!("breakdown.r{round}.s{si}");
            let mut order = [("less", less_bits, less_binary), ("more", more_bits, None)];
            if round % 2 == 1 {
                order.reverse();
            }
            let mut agents = Vec::new();
            for (role, bits, binary) in order {
                let bits = bits.to_string();
                let agent = start_agent_with_env(
                    ctx,
                    binary,
                    dev,
                    None,
                    &format!("{name}.{role}.agent"),
                    &[("KML_ABLATE", bits.as_str())],
                )?;
                let ids = sys::prog_ids(agent.pid());
                agents.push((role, agent, ids));
            }
            let all = bpftool_progs()?;
            let before: Vec<_> = agents
                .iter()
                .map(|(role, _, ids)| all_event_progs(&all, ids, role))
                .collect::<Result<_>>()?;
            let (all, _) =
                bench.fio_then_progs(ctx, &super::overhead::job_file(ctx), secs, &name)?;
            let mut less = BTreeMap::new();
            let mut more = BTreeMap::new();
            for ((role, agent, ids), b) in agents.into_iter().zip(before) {
                let d = deltas(&b, &event_progs(&all, &ids));
                drop(agent);
                if role == "less" {
                    less = d;
                } else {
                    more = d;
                }
            }
            let r = StepRound {
                step: si,
                less,
                more,
            };
            eprintln!(
                "xtask: bench: breakdown round {} step {si}: insert / issue / complete {}",
                round + 1,
                EventProg::ALL
                    .iter()
                    .map(|p| {
                        let ns = |m: &BTreeMap<EventProg, ProgCost>| {
                            m.get(p).and_then(ProgCost::ns_per_run).unwrap_or(f64::NAN)
                        };
                        format!("{:.0} → {:.0}", ns(&r.less), ns(&r.more))
                    })
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
            rounds.push(r);
        }
    }
    let stats_was = bench.stats_was.clone();
    drop(bench);
    Ok(Breakdown {
        rounds,
        before: before.map(|b| (b.rev.clone(), b.short().to_owned())),
        n_rounds,
        secs,
        stats_was,
    })
}

fn cell(s: Option<Spread>) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.0} ({:.0} to {:.0})", s.mean, s.min, s.max),
        Some(s) => format!("{:.0}", s.mean),
        None => "–".into(),
    }
}

/// BREAKDOWN.md: one row per step, ns per event of each program.
pub fn markdown(b: &Breakdown, ctx: &Ctx, kernel: &str, date: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Where the observer's time goes\n");
    let _ = writeln!(
        md,
        "Written by `{}` on {date} (kernel {kernel}). `kernel.bpf_stats_enabled=1` for the measure (it was \
         `{}` before and was restored), on the tmpfs loop device under the fio job of measure 1 ({} round(s) \
         × {} s per step). **Two agents observe the device at once**, each with a cost probe \
         (`KML_ABLATE`, `kml_ebpf_common::layout::ablate`): every request runs both programs back to back \
         under the same load, and a step's cost is the paired difference of their ns per run; which agent \
         attaches first alternates by round. Cells: mean over rounds (lowest to highest round). The cost \
         probes are measurement only: the programs they cut record nothing usable.\n",
        ctx.command,
        b.stats_was,
        b.n_rounds,
        b.secs
    );
    let _ = writeln!(
        md,
        "| step | insert ns | issue ns | complete ns |\n| --- | --- | --- | --- |"
    );
    let mut sums = [0.0f64; 3];
    for (si, step) in STEPS.iter().enumerate() {
        let cells: Vec<String> = EventProg::ALL
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                let s = b.step(si, *p);
                if step.cumulative {
                    sums[pi] += s.map_or(0.0, |s| s.mean);
                }
                cell(s)
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", step.name, cells.join(" | "));
    }
    let whole: Vec<String> = EventProg::ALL.iter().map(|p| cell(b.whole(*p))).collect();
    let _ = writeln!(
        md,
        "| **the whole observer** (measured) | {} |",
        whole.join(" | ")
    );
    let _ = writeln!(
        md,
        "| the floor and the steps, added | {:.0} | {:.0} | {:.0} |",
        sums[0], sums[1], sums[2]
    );
    if let Some((rev, short)) = &b.before {
        let cells: Vec<String> = EventProg::ALL
            .iter()
            .map(|p| cell(b.step(STEPS.len(), *p)))
            .collect();
        let _ = writeln!(
            md,
            "| **this tree minus `{rev}` ({short})**, both whole observers, paired | {} |",
            cells.join(" | ")
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Goals of issue 14 (one agent, bpf_stats): insert ≤ 150, issue ≤ 60, complete ≤ 150 ns per event. \
         The floor row is what a program that does nothing costs by this measure (the program's call and \
         bpf_stats' own two clock reads); a goal at or below it cannot be met by any program that reads \
         the request.\n"
    );
    md
}

pub fn write(ctx: &Ctx, b: &Breakdown, kernel: &str, date: &str) -> Result<PathBuf> {
    let path = ctx.out.join(BREAKDOWN_MD);
    std::fs::write(&path, markdown(b, ctx, kernel, date))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(insert: u64, issue: u64, complete: u64) -> BTreeMap<EventProg, ProgCost> {
        [
            (EventProg::Insert, insert),
            (EventProg::Issue, issue),
            (EventProg::Complete, complete),
        ]
        .into_iter()
        .map(|(p, ns)| {
            (
                p,
                ProgCost {
                    runs: 10,
                    run_time_ns: ns * 10,
                },
            )
        })
        .collect()
    }

    #[test]
    fn a_step_costs_the_paired_difference_and_the_floor_its_own_mean() {
        let round = |step, _round: usize, less, more| StepRound { step, less, more };
        let b = Breakdown {
            rounds: vec![
                // The floor: both agents sample it.
                round(0, 0, costs(70, 60, 64), costs(66, 62, 66)),
                round(0, 1, costs(68, 60, 66), costs(72, 62, 64)),
                // The read, second-attached agent cheaper in each round.
                round(1, 0, costs(70, 60, 64), costs(120, 110, 130)),
                round(1, 1, costs(80, 60, 64), costs(110, 100, 120)),
                round(3, 0, costs(150, 140, 150), costs(300, 230, 320)),
                round(3, 1, costs(150, 140, 150), costs(260, 210, 300)),
                // --before: that revision's agent (less) against this one's.
                round(STEPS.len(), 0, costs(300, 230, 320), costs(290, 231, 300)),
                round(STEPS.len(), 1, costs(250, 220, 290), costs(250, 215, 280)),
            ],
            before: Some(("main".into(), "0123456789".into())),
            n_rounds: 2,
            secs: 1,
            stats_was: "0".into(),
        };
        assert_eq!(b.step_values(0, EventProg::Insert), vec![68.0, 70.0]);
        assert_eq!(
            b.step(1, EventProg::Insert),
            Some(Spread {
                mean: 40.0,
                min: 30.0,
                max: 50.0,
                n: 2
            })
        );
        assert_eq!(b.step(2, EventProg::Issue), None, "a step never run");
        assert_eq!(b.whole(EventProg::Complete).map(|s| s.mean), Some(310.0));
        assert_eq!(b.step(3, EventProg::Issue).map(|s| s.mean), Some(80.0));
        // The before/after pair is a difference like any step, not the floor.
        assert_eq!(
            b.step_values(STEPS.len(), EventProg::Insert),
            vec![-10.0, 0.0]
        );
        assert_eq!(
            b.step(STEPS.len(), EventProg::Complete).map(|s| s.mean),
            Some(-15.0)
        );
    }

    #[test]
    fn the_chain_goes_from_the_floor_to_the_whole_observer() {
        assert!(STEPS[0].cumulative && STEPS[0].less == STEPS[0].more);
        let chain: Vec<&Step> = STEPS.iter().filter(|s| s.cumulative).collect();
        for w in chain.windows(2) {
            assert_eq!(w[0].more, w[1].less, "{} then {}", w[0].name, w[1].name);
        }
        assert_eq!(
            chain.last().map(|s| s.more),
            Some(0),
            "ends at the observer"
        );
        for s in STEPS.iter().filter(|s| !s.cumulative) {
            assert_eq!(
                s.more, 0,
                "{}: a part is cut from the whole observer",
                s.name
            );
            assert_ne!(s.less, 0);
        }
    }
}
