//! Measure 2, in-kernel cost: with `kernel.bpf_stats_enabled=1` (restored after),
//! the kernel accounts each program's run time; `bpftool prog show -j` before and
//! after a fio run gives ns per run of the insert, issue and complete programs of
//! the agent (identified by the program ids in its /proc/PID/fdinfo). Tail-called
//! stages (features, model) are accounted to the insert program that called them,
//! so insert-with-model minus insert-without-model is the inference cost.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::learning::{spawn_fio, Models, INFERENCE_KINDS};
use super::overhead::{job_file, start_agent};
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
    /// `none` or the model kind.
    pub config: String,
    pub round: usize,
    pub progs: BTreeMap<EventProg, ProgCost>,
    pub fio_ios: u64,
}

pub struct Cost {
    pub rows: Vec<CostRow>,
    pub secs: u64,
    pub rounds: usize,
    pub stats_was: String,
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

    /// Inference cost per insert in each round: insert ns with the model minus
    /// without, in the same round (pairing follows the machine's changing load).
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
                    .find(|b| b.config == "none" && b.round == r.round)?;
                Some(insert(r)? - insert(base)?)
            })
            .collect()
    }

    /// Inference cost per insert: the median over rounds of [`Cost::inference_rounds`].
    pub fn inference_ns(&self, kind: &str) -> Option<f64> {
        parse::median(&self.inference_rounds(kind))
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

fn bpftool_progs() -> Result<Vec<ProgStat>> {
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

pub fn run(ctx: &Ctx, models: Option<&Models>) -> Result<Cost> {
    let (rounds, secs) = if ctx.quick { (1, 3) } else { (5, 3) };
    let mut configs: Vec<(String, Option<PathBuf>)> = vec![("none".into(), None)];
    for kind in INFERENCE_KINDS {
        if let Some(p) = models.and_then(|m| m.get(kind)) {
            configs.push((kind.to_owned(), Some(p.to_path_buf())));
        }
    }
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
    let mut rows = Vec::new();
    for round in 0..rounds {
        for i in 0..configs.len() {
            // The order rotates each round, as in the overhead measure.
            let (config, model) = &configs[(i + round) % configs.len()];
            sys::check_interrupted()?;
            let name = format!("cost.r{round}.{config}");
            let agent = start_agent(ctx, &dev, model.as_deref(), &format!("{name}.agent"))?;
            let ids = sys::prog_ids(agent.pid());
            let before = event_progs(&bpftool_progs()?, &ids);
            if before.len() != 3 {
                bail!(
                    "found {} of the insert/issue/complete programs among the agent's program ids {ids:?}",
                    before.len()
                );
            }
            let mut fio = spawn_fio(ctx, &job_file(ctx), &dev.path, secs, &name, None)?;
            let status = fio.wait(Duration::from_secs(secs + 60))?;
            let after = event_progs(&bpftool_progs()?, &ids);
            drop(agent);
            if !status.success() {
                bail!("fio failed: {}", sys::tail(&fio.stderr, 5));
            }
            let fio_ios = super::learning::fio_result(ctx, &name)?.ios();
            let progs = deltas(&before, &after);
            eprintln!(
                "xtask: bench: cost {config:<8} insert {:>6.0} ns, issue {:>6.0} ns, complete {:>6.0} ns per run",
                progs.get(&EventProg::Insert).and_then(ProgCost::ns_per_run).unwrap_or(f64::NAN),
                progs.get(&EventProg::Issue).and_then(ProgCost::ns_per_run).unwrap_or(f64::NAN),
                progs.get(&EventProg::Complete).and_then(ProgCost::ns_per_run).unwrap_or(f64::NAN),
            );
            rows.push(CostRow {
                config: config.clone(),
                round,
                progs,
                fio_ios,
            });
        }
    }
    drop(stats);
    drop(dev);
    drop(mount);
    Ok(Cost {
        rows,
        secs,
        rounds,
        stats_was,
    })
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

    #[test]
    fn inference_cost_is_the_insert_difference() {
        let row = |config: &str, round: usize, ns: u64| CostRow {
            config: config.into(),
            round,
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
        };
        let c = Cost {
            rows: vec![
                row("none", 0, 300),
                row("linear", 0, 360),
                row("tree", 0, 420),
                row("none", 1, 310),
                row("linear", 1, 360),
            ],
            secs: 1,
            rounds: 2,
            stats_was: "0".into(),
        };
        assert_eq!(c.ns("none", EventProg::Insert), Some(305.0));
        // Paired per round: linear 60 (round 0) and 50 (round 1); tree 120 (round 0).
        assert_eq!(c.inference_rounds("linear"), vec![60.0, 50.0]);
        assert_eq!(c.inference_ns("linear"), Some(55.0));
        assert_eq!(c.inference_ns("tree"), Some(120.0));
        assert_eq!(c.inference_ns("logistic"), None);
        assert_eq!(c.configs(), ["none", "linear", "tree"]);
        assert_eq!(c.runs_and_ios("none"), (20, 20));
        assert_eq!(c.runs_and_ios("linear"), (20, 20));
    }
}
