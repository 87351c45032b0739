//! Measure 2, in-kernel cost: with `kernel.bpf_stats_enabled=1` (restored after),
//! the kernel accounts each program's run time; `bpftool prog show -j` before and
//! after a fio run gives ns per run of the insert, issue and complete programs of
//! the agent (identified by the program ids in its /proc/PID/fdinfo). Tail-called
//! stages (features, model) are accounted to the insert program that called them,
//! so insert-with-model minus insert-without-model is the inference cost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::learning::{spawn_fio, Models, INFERENCE_KINDS, POSITION_MODEL};
use super::overhead::{job_file, start_agent, start_agent_with_env};
use super::parse::{self, EventProg, ProgStat};
use super::sys::{self, LoopDevice, SysctlGuard, TmpfsMount};
use super::Ctx;

/// One program's runs over a measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProgCost {
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgCost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }
}

pub struct CostRow {
    /// `none` or the model kind (with [`DEEP`] after it on the deep queue).
    pub config: String,
    pub round: usize,
    /// The model kind of the run (the `none` agent ran beside that model's agent).
    pub pair: String,
    pub progs: BTreeMap<EventProg, ProgCost>,
    pub fio_ios: u64,
}

pub struct Cost {
    pub rows: Vec<CostRow>,
    pub secs: u64,
    pub rounds: usize,
    pub stats_was: String,
    /// mq-deadline's (read, write) expiry on the device, ms, as the kernel applied
    /// them (`--cost-expire-ms`, else its defaults).
    pub expiries_ms: (u64, u64),
    /// `--before REV`: that revision's agent and this tree's, each alone.
    pub before: Option<BeforeAfter>,
}

/// `--before REV`: the position model on the deep queue, run by that revision's
/// agent and by this tree's, **each alone** under its own fio run, the order
/// alternating by round: a change to the programs, before and after. Alone, not
/// paired as the rows above: two agents on one device run back to back on every
/// event, and the second finds the request's lines warm (two builds paired that
/// way swung the difference by 40 ns with the order, session 21); alone, each
/// meets the caches as in production.
pub struct BeforeAfter {
    pub rev: String,
    pub short: String,
    /// The model file both agents ran ([`super::before::BeforeAgent::shared_model`]).
    pub model: PathBuf,
    /// Per round: (that revision's programs, this tree's).
    pub rounds: Vec<(BTreeMap<EventProg, ProgCost>, BTreeMap<EventProg, ProgCost>)>,
    pub secs: u64,
}

impl BeforeAfter {
    /// ns per run of `prog`, round by round: (that revision's, this tree's).
    pub fn ns(&self, prog: EventProg) -> Vec<(f64, f64)> {
        let ns = |m: &BTreeMap<EventProg, ProgCost>| m.get(&prog).and_then(ProgCost::ns_per_run);
        self.rounds
            .iter()
            .filter_map(|(b, a)| Some((ns(b)?, ns(a)?)))
            .collect()
    }

    /// This tree minus that revision, round by round (same round, same load).
    pub fn differences(&self, prog: EventProg) -> Vec<f64> {
        self.ns(prog).into_iter().map(|(b, a)| a - b).collect()
    }
}

impl Cost {
    pub fn configs(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.rows {
            if !v.contains(&r.config) {
                v.push(r.config.clone());
            }
        }
        v
    }

    /// Median over rounds of ns per run of `prog` under `config`.
    pub fn ns(&self, config: &str, prog: EventProg) -> Option<f64> {
        let v: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.config == config)
            .filter_map(|r| r.progs.get(&prog).and_then(ProgCost::ns_per_run))
            .collect();
        parse::median(&v)
    }

    /// Inference cost per insert in each round: insert ns of the agent with the model
    /// minus that of the agent without (the other agent of its run), which observed
    /// the same requests beside it.
    pub fn inference_rounds(&self, kind: &str) -> Vec<f64> {
        let insert = |r: &CostRow| {
            r.progs
                .get(&EventProg::Insert)
                .and_then(ProgCost::ns_per_run)
        };
        self.rows
            .iter()
            .filter(|r| r.config == kind)
            .filter_map(|r| {
                let base = self
                    .rows
                    .iter()
                    .find(|b| is_model_free(&b.config) && b.round == r.round && b.pair == r.pair)?;
                Some(insert(r)? - insert(base)?)
            })
            .collect()
    }

    /// Inference cost per insert: the mean over rounds of [`Cost::inference_rounds`].
    /// Rounds come in pairs with the two agents in either order, so an advantage of
    /// running second (a warm cache) cancels in the mean.
    pub fn inference_ns(&self, kind: &str) -> Option<f64> {
        let v = self.inference_rounds(kind);
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Runs of the insert program and fio's I/Os, summed over rounds for `config`.
    pub fn runs_and_ios(&self, config: &str) -> (u64, u64) {
        self.rows
            .iter()
            .filter(|r| r.config == config)
            .fold((0, 0), |(a, b), r| {
                (
                    a + r.progs.get(&EventProg::Insert).map_or(0, |p| p.runs),
                    b + r.fio_ios,
                )
            })
    }
}

/// What the position model's second pair is called, after its kind: the same model
/// and the agent without one, on a deep queue ([`deep_job_file`]).
pub const DEEP: &str = " (deep queue)";

/// The agent without a model: `none`, or `none (deep queue)` beside the deep pair.
pub fn is_model_free(config: &str) -> bool {
    config == "none" || config.strip_suffix(DEEP) == Some("none")
}

/// The deep-queue job: mixed 16k random I/O, 384 in flight over the loop device's
/// 128 tags, so that mq-deadline holds about 128 requests (measure 1's job holds
/// almost none: 32 in flight). The position features cost what their walk
/// visits, and the walk visits more of a deeper queue.
pub fn deep_job_file(ctx: &Ctx) -> PathBuf {
    ctx.root.join("bench").join("cost-deep.fio")
}

pub fn bpftool_progs() -> Result<Vec<ProgStat>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show -j failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse::parse_bpftool_progs(&String::from_utf8_lossy(&out.stdout))
}

/// The insert/issue/complete programs among `ids`, with their counters.
pub fn event_progs(all: &[ProgStat], ids: &[u32]) -> BTreeMap<EventProg, ProgStat> {
    all.iter()
        .filter(|p| ids.contains(&p.id))
        .filter_map(|p| EventProg::of_name(&p.name).map(|e| (e, p.clone())))
        .collect()
}

/// [`event_progs`] of an agent at the start of a run: all three, or an error
/// naming the agent (`who`), since a missing one would measure nothing.
pub fn all_event_progs(
    all: &[ProgStat],
    ids: &[u32],
    who: &str,
) -> Result<BTreeMap<EventProg, ProgStat>> {
    let progs = event_progs(all, ids);
    if progs.len() != 3 {
        bail!(
            "found {} of the insert/issue/complete programs among the {who} agent's program ids {ids:?}",
            progs.len()
        );
    }
    Ok(progs)
}

/// Counter differences between two snapshots.
pub fn deltas(
    before: &BTreeMap<EventProg, ProgStat>,
    after: &BTreeMap<EventProg, ProgStat>,
) -> BTreeMap<EventProg, ProgCost> {
    after
        .iter()
        .map(|(e, a)| {
            let b = before.get(e);
            let d = |x: Option<u64>, y: Option<u64>| x.unwrap_or(0).saturating_sub(y.unwrap_or(0));
            (
                *e,
                ProgCost {
                    runs: d(a.run_cnt, b.and_then(|b| b.run_cnt)),
                    run_time_ns: d(a.run_time_ns, b.and_then(|b| b.run_time_ns)),
                },
            )
        })
        .collect()
}

/// A started agent with its insert/issue/complete programs' counters before the run.
struct Watched {
    agent: super::sys::Proc,
    ids: Vec<u32>,
    before: BTreeMap<EventProg, ProgStat>,
}

fn watch(ctx: &Ctx, dev: &LoopDevice, model: Option<&Path>, name: &str) -> Result<Watched> {
    let agent = start_agent(ctx, dev, model, name)?;
    let ids = sys::prog_ids(agent.pid());
    Ok(Watched {
        agent,
        ids,
        before: BTreeMap::new(),
    })
}

pub fn run(ctx: &Ctx, models: Option<&Models>) -> Result<Cost> {
    // An even number of rounds: each order of the two agents equally often.
    let (rounds, secs) = if ctx.quick { (2, 2) } else { (6, 3) };
    // Each kind's own code path, and a position model where one is shipped (its
    // insert also keeps the position state and takes the request's place), on
    // measure 1's job and again on a deep queue, where its walk visits more.
    let shallow = job_file(ctx);
    let deep = deep_job_file(ctx);
    let mut kinds: Vec<(String, PathBuf, &Path)> = INFERENCE_KINDS
        .iter()
        .chain(&[POSITION_MODEL])
        .filter_map(|k| {
            Some((
                k.to_string(),
                models?.get(k)?.to_path_buf(),
                shallow.as_path(),
            ))
        })
        .collect();
    if let Some(p) = models.and_then(|m| m.get(POSITION_MODEL)) {
        kinds.push((
            format!("{POSITION_MODEL}{DEEP}"),
            p.to_path_buf(),
            deep.as_path(),
        ));
    }
    if let (Some(b), None) = (&ctx.before, models.and_then(|m| m.get(POSITION_MODEL))) {
        eprintln!(
            "xtask: bench: cost --before {}: no position model to run; skipped",
            b.rev
        );
    }
    let bench = StatsBench::set_up(ctx)?;
    let dev = &bench.dev;
    if let Some(ms) = ctx.cost_expire_ms {
        dev.set_expiries_ms(ms, ms)?;
    }
    let expiries_ms = dev.expiries_ms()?;
    eprintln!(
        "xtask: bench: cost: read_expire {} ms, write_expire {} ms",
        expiries_ms.0, expiries_ms.1
    );
    let mut rows = Vec::new();
    // Each run: one agent without a model and, beside it, one with a model, both
    // observing the same device in the same fio run, so every request runs both
    // insert programs back to back: the difference is paired event by event. Which
    // of the two attaches first (and so runs first) alternates by round.
    let pairs: Vec<Option<(String, PathBuf, &Path)>> = if kinds.is_empty() {
        vec![None]
    } else {
        kinds.into_iter().map(Some).collect()
    };
    for round in 0..rounds {
        for i in 0..pairs.len() {
            let pair = &pairs[(i + round) % pairs.len()];
            sys::check_interrupted()?;
            let kind = pair.as_ref().map_or("none", |p| p.0.as_str());
            let job = pair.as_ref().map_or(shallow.as_path(), |p| p.2);
            let deep_pair = kind.ends_with(DEEP);
            // File names without the label's spaces and brackets.
            let name = format!("cost.r{round}.{}", kind.replace(DEEP, "-deep"));
            let none = if deep_pair {
                format!("none{DEEP}")
            } else {
                "none".into()
            };
            let mut order: Vec<(String, Option<&Path>)> = vec![(none, None)];
            if let Some((k, p, _)) = pair {
                order.push((k.clone(), Some(p.as_path())));
                if round % 2 == 1 {
                    order.reverse();
                }
            }
            let mut watched: Vec<(String, Watched)> = Vec::new();
            for (config, model) in order {
                let tag = if model.is_some() { "model" } else { "none" };
                let w = watch(ctx, dev, model, &format!("{name}.{tag}.agent"))?;
                watched.push((config, w));
            }
            let all = bpftool_progs()?;
            for (config, w) in &mut watched {
                w.before = all_event_progs(&all, &w.ids, config)?;
            }
            let (all, fio_ios) = bench.fio_then_progs(ctx, job, secs, &name)?;
            for (config, w) in watched {
                let progs = deltas(&w.before, &event_progs(&all, &w.ids));
                drop(w.agent);
                let ns = |e: EventProg| {
                    progs
                        .get(&e)
                        .and_then(ProgCost::ns_per_run)
                        .unwrap_or(f64::NAN)
                };
                eprintln!(
                    "xtask: bench: cost round {} {config:<8} (run with {kind:<8}) insert {:>6.0} ns, issue {:>6.0} ns, complete {:>6.0} ns per run",
                    round + 1,
                    ns(EventProg::Insert),
                    ns(EventProg::Issue),
                    ns(EventProg::Complete),
                );
                rows.push(CostRow {
                    config,
                    round,
                    pair: kind.to_owned(),
                    progs,
                    fio_ios,
                });
            }
        }
    }
    let before = match (&ctx.before, models.and_then(|m| m.get(POSITION_MODEL))) {
        (Some(b), Some(model)) => Some(before_after(ctx, &bench, b, model)?),
        _ => None,
    };
    let stats_was = bench.stats_was.clone();
    drop(bench);
    Ok(Cost {
        rows,
        secs,
        rounds,
        stats_was,
        expiries_ms,
        before,
    })
}

/// [`BeforeAfter`]: 10 rounds of 4 s on the deep queue (--quick: 2 of 2), each
/// agent alone. Unpaired within a round, so more rounds than the pairs above:
/// rounds of one build spread by 20-40 ns on this machine.
fn before_after(
    ctx: &Ctx,
    bench: &StatsBench,
    b: &super::before::BeforeAgent,
    model: &Path,
) -> Result<BeforeAfter> {
    let (rounds, secs) = if ctx.quick { (2, 2) } else { (10, 4) };
    let rev = b.rev.as_str();
    let deep = deep_job_file(ctx);
    let model = b.shared_model(model);
    let mut out = Vec::new();
    for round in 0..rounds {
        let mut order = [("before", Some(b.binary.as_path())), ("this", None)];
        if round % 2 == 1 {
            order.reverse();
        }
        let (mut then, mut now) = (BTreeMap::new(), BTreeMap::new());
        for (role, binary) in order {
            sys::check_interrupted()?;
            let name = format!("cost.before.r{round}.{role}");
            let agent = start_agent_with_env(
                ctx,
                binary,
                &bench.dev,
                Some(&model),
                &format!("{name}.agent"),
                &[],
            )?;
            let ids = sys::prog_ids(agent.pid());
            let start = all_event_progs(&bpftool_progs()?, &ids, role)?;
            let (all, _) = bench.fio_then_progs(ctx, &deep, secs, &name)?;
            let d = deltas(&start, &event_progs(&all, &ids));
            drop(agent);
            if role == "before" {
                then = d;
            } else {
                now = d;
            }
        }
        let ns = |m: &BTreeMap<EventProg, ProgCost>| {
            m.get(&EventProg::Insert)
                .and_then(ProgCost::ns_per_run)
                .unwrap_or(f64::NAN)
        };
        eprintln!(
            "xtask: bench: cost round {} --before {rev}, each alone on the deep queue: insert {:.0} ns before, {:.0} ns this tree",
            round + 1,
            ns(&then),
            ns(&now)
        );
        out.push((then, now));
    }
    Ok(BeforeAfter {
        rev: b.rev.clone(),
        short: b.short().to_owned(),
        model,
        rounds: out,
        secs,
    })
}

/// What the bpf_stats measures run on: a loop device on a private tmpfs under
/// mq-deadline, with `kernel.bpf_stats_enabled=1` until dropped (then restored,
/// the device detached, the tmpfs unmounted, in that order).
pub struct StatsBench {
    // Dropped in this order: the sysctl restored, the device detached, the
    // tmpfs unmounted.
    _stats: SysctlGuard,
    pub dev: LoopDevice,
    _mount: TmpfsMount,
    /// `bpf_stats_enabled` as it was.
    pub stats_was: String,
}

impl StatsBench {
    pub fn set_up(ctx: &Ctx) -> Result<StatsBench> {
        let mount = TmpfsMount::mount(&ctx.work.join("tmpfs"), "1200m")?;
        let file = mount.dir.join("disk");
        crate::util::run(Command::new("fallocate").args(["-l", "1G"]).arg(&file))?;
        let dev = LoopDevice::attach(&file, false)?;
        dev.use_mq_deadline()?;
        let stats_was = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        Ok(StatsBench {
            _stats: stats,
            dev,
            _mount: mount,
            stats_was,
        })
    }

    /// Runs the fio job `job` on the device for `secs`, then reads every
    /// program's stats: those and fio's I/O count.
    pub fn fio_then_progs(
        &self,
        ctx: &Ctx,
        job: &Path,
        secs: u64,
        name: &str,
    ) -> Result<(Vec<ProgStat>, u64)> {
        let mut fio = spawn_fio(ctx, job, &self.dev.path, secs, name, None)?;
        let status = fio.wait(Duration::from_secs(secs + 60))?;
        let all = bpftool_progs()?;
        if !status.success() {
            bail!("fio failed: {}", sys::tail(&fio.stderr, 5));
        }
        Ok((all, super::learning::fio_result(ctx, name)?.ios()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: u32, name: &str, t: u64, n: u64) -> ProgStat {
        ProgStat {
            id,
            name: name.into(),
            run_time_ns: Some(t),
            run_cnt: Some(n),
        }
    }

    #[test]
    fn deltas_of_our_programs_only() {
        let ids = [10, 11, 12];
        let before = vec![
            p(10, "kml_raw_rq_insert", 1000, 10),
            p(11, "kml_raw_rq_issue", 500, 10),
            p(12, "kml_raw_rq_complete", 0, 0),
            p(99, "kml_raw_rq_insert", 5, 5), // another agent's
        ];
        let after = vec![
            p(10, "kml_raw_rq_insert", 31_000, 110),
            p(11, "kml_raw_rq_issue", 10_500, 110),
            p(12, "kml_raw_rq_complete", 40_000, 100),
            p(99, "kml_raw_rq_insert", 9_999_999, 7),
        ];
        let d = deltas(&event_progs(&before, &ids), &event_progs(&after, &ids));
        assert_eq!(
            d[&EventProg::Insert],
            ProgCost {
                runs: 100,
                run_time_ns: 30_000
            }
        );
        assert_eq!(d[&EventProg::Insert].ns_per_run(), Some(300.0));
        assert_eq!(d[&EventProg::Issue].ns_per_run(), Some(100.0));
        assert_eq!(d[&EventProg::Complete].ns_per_run(), Some(400.0));
        assert_eq!(ProgCost::default().ns_per_run(), None);
    }

    /// A run's row: `config`'s agent, ten inserts of `ns` each.
    fn row(config: &str, round: usize, pair: &str, ns: u64) -> CostRow {
        CostRow {
            config: config.into(),
            round,
            pair: pair.into(),
            progs: [(
                EventProg::Insert,
                ProgCost {
                    runs: 10,
                    run_time_ns: ns * 10,
                },
            )]
            .into_iter()
            .collect(),
            fio_ios: 10,
        }
    }

    #[test]
    fn inference_cost_is_the_insert_difference() {
        let c = Cost {
            rows: vec![
                row("none", 0, "linear", 300),
                row("linear", 0, "linear", 360),
                row("none", 0, "tree", 300),
                row("tree", 0, "tree", 420),
                row("none", 1, "linear", 310),
                row("linear", 1, "linear", 360),
            ],
            secs: 1,
            rounds: 2,
            stats_was: "0".into(),
            expiries_ms: (500, 5000),
            before: None,
        };
        assert_eq!(c.ns("none", EventProg::Insert), Some(300.0));
        // Paired per round: linear 60 (round 0) and 50 (round 1); tree 120 (round 0).
        assert_eq!(c.inference_rounds("linear"), vec![60.0, 50.0]);
        assert_eq!(c.inference_ns("linear"), Some(55.0));
        assert_eq!(c.inference_ns("tree"), Some(120.0));
        assert_eq!(c.inference_ns("logistic"), None);
        assert_eq!(c.configs(), ["none", "linear", "tree"]);
        assert_eq!(c.runs_and_ios("none"), (30, 30));
        assert_eq!(c.runs_and_ios("linear"), (20, 20));
    }

    #[test]
    fn the_deep_pair_is_paired_with_its_own_agent_without_a_model() {
        let row = |config: &str, pair: &str, ns: u64| row(config, 0, pair, ns);
        let deep = format!("tree-position{DEEP}");
        let none_deep = format!("none{DEEP}");
        let c = Cost {
            rows: vec![
                row("none", "tree-position", 150),
                row("tree-position", "tree-position", 250),
                row(&none_deep, &deep, 200),
                row(&deep, &deep, 480),
            ],
            secs: 1,
            rounds: 1,
            stats_was: "0".into(),
            expiries_ms: (500, 5000),
            before: None,
        };
        assert!(is_model_free("none") && is_model_free(&none_deep));
        assert!(!is_model_free(&deep) && !is_model_free("tree"));
        assert_eq!(c.inference_ns("tree-position"), Some(100.0));
        assert_eq!(c.inference_ns(&deep), Some(280.0));
        // The shallow agent's ns per event are not mixed with the deep one's.
        assert_eq!(c.ns("none", EventProg::Insert), Some(150.0));
        assert_eq!(c.ns(&none_deep, EventProg::Insert), Some(200.0));
    }

    #[test]
    fn before_and_after_differ_round_by_round() {
        let progs = |insert: u64, issue: Option<u64>| -> BTreeMap<EventProg, ProgCost> {
            let mut m = BTreeMap::new();
            m.insert(
                EventProg::Insert,
                ProgCost {
                    runs: 10,
                    run_time_ns: insert * 10,
                },
            );
            if let Some(ns) = issue {
                m.insert(
                    EventProg::Issue,
                    ProgCost {
                        runs: 10,
                        run_time_ns: ns * 10,
                    },
                );
            }
            m
        };
        let b = BeforeAfter {
            rev: "main".into(),
            short: "0123456789".into(),
            model: "models/tree-position.json".into(),
            rounds: vec![
                (progs(500, Some(270)), progs(460, Some(260))),
                (progs(480, None), progs(470, Some(250))),
            ],
            secs: 4,
        };
        // This tree minus that revision, in the same round.
        assert_eq!(b.differences(EventProg::Insert), [-40.0, -10.0]);
        assert_eq!(b.ns(EventProg::Insert), [(500.0, 460.0), (480.0, 470.0)]);
        // A round where one side did not run the program is left out, not zero.
        assert_eq!(b.differences(EventProg::Issue), [-10.0]);
        assert!(b.differences(EventProg::Complete).is_empty());
    }
}
