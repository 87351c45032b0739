//! Pure parsers of what the benchmark reads from tools and /proc: fio's JSON,
//! `bpftool prog show -j`, /proc/PID/{stat,status,fdinfo}, /proc/{loadavg,meminfo},
//! and the agent's live lines. All unit-tested on captured text.

use anyhow::{bail, Context as _, Result};
use kml_ebpf_common::abi::names::Event;
use serde_json::Value;

/// One fio run, summed over its jobs (or its one group-reported job).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FioSummary {
    pub read_iops: f64,
    pub write_iops: f64,
    /// I/Os completed (fio's `total_ios`).
    pub read_ios: u64,
    pub write_ios: u64,
    /// Longest job runtime, ms.
    pub runtime_ms: u64,
    /// fio's own CPU use (user / system %), averaged over jobs.
    pub usr_cpu: f64,
    pub sys_cpu: f64,
    /// Completion latency percentiles of reads, ns (p50, p99), from the first job with reads.
    pub read_clat_p50_ns: Option<u64>,
    pub read_clat_p99_ns: Option<u64>,
}

impl FioSummary {
    pub fn iops(&self) -> f64 {
        self.read_iops + self.write_iops
    }

    pub fn ios(&self) -> u64 {
        self.read_ios + self.write_ios
    }
}

/// Parses fio's `--output-format=json` output (anything before the first `{`, such as
/// a warning, is skipped).
pub fn parse_fio_json(text: &str) -> Result<FioSummary> {
    let jobs = fio_jobs(text)?;
    let jobs = &jobs;
    if jobs.is_empty() {
        bail!("fio's JSON has no job");
    }
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let mut s = FioSummary::default();
    for job in jobs {
        s.read_iops += f(&job["read"]["iops"]);
        s.write_iops += f(&job["write"]["iops"]);
        s.read_ios += u(&job["read"]["total_ios"]);
        s.write_ios += u(&job["write"]["total_ios"]);
        s.runtime_ms = s
            .runtime_ms
            .max(u(&job["job_runtime"]).max(u(&job["read"]["runtime"])));
        s.usr_cpu += f(&job["usr_cpu"]) / jobs.len() as f64;
        s.sys_cpu += f(&job["sys_cpu"]) / jobs.len() as f64;
        if s.read_clat_p50_ns.is_none() && u(&job["read"]["total_ios"]) > 0 {
            let pct = &job["read"]["clat_ns"]["percentile"];
            s.read_clat_p50_ns = pct["50.000000"].as_u64();
            s.read_clat_p99_ns = pct["99.000000"].as_u64();
        }
    }
    Ok(s)
}

/// Latency and throughput of a fio run, reads and writes apart (measure 6).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FioLatency {
    /// Completion latency, ns: the mean weighted by I/Os over the jobs; the
    /// percentiles the largest of any job (with `group_reporting` there is one).
    pub read_mean_ns: f64,
    pub read_p99_ns: f64,
    pub read_p999_ns: f64,
    pub write_mean_ns: f64,
    pub write_p99_ns: f64,
    pub write_p999_ns: f64,
    /// Bytes read and written per second, all jobs.
    pub bytes_per_s: f64,
}

/// The `jobs` of fio's `--output-format=json` output (anything before the first
/// `{`, such as a warning, is skipped).
fn fio_jobs(text: &str) -> Result<Vec<Value>> {
    let start = text.find('{').context("no JSON object in fio's output")?;
    let mut v: Value =
        serde_json::from_str(&text[start..]).context("fio's JSON output does not parse")?;
    match v["jobs"].take() {
        Value::Array(jobs) => Ok(jobs),
        _ => bail!("fio's JSON has no `jobs` array"),
    }
}

pub fn parse_fio_latency(text: &str) -> Result<FioLatency> {
    let jobs = fio_jobs(text)?;
    let mut out = FioLatency::default();
    let (mut read_ios, mut write_ios) = (0.0, 0.0);
    for job in &jobs {
        for (dir, mean, p99, p999, ios) in [
            (
                "read",
                &mut out.read_mean_ns,
                &mut out.read_p99_ns,
                &mut out.read_p999_ns,
                &mut read_ios,
            ),
            (
                "write",
                &mut out.write_mean_ns,
                &mut out.write_p99_ns,
                &mut out.write_p999_ns,
                &mut write_ios,
            ),
        ] {
            let d = &job[dir];
            let n = d["total_ios"].as_f64().unwrap_or(0.0);
            if n == 0.0 {
                continue;
            }
            let c = &d["clat_ns"];
            *mean += c["mean"].as_f64().unwrap_or(0.0) * n;
            *ios += n;
            *p99 = p99.max(c["percentile"]["99.000000"].as_f64().unwrap_or(0.0));
            *p999 = p999.max(c["percentile"]["99.900000"].as_f64().unwrap_or(0.0));
            // fio's `bw_bytes` is bytes per second of this job and direction.
            out.bytes_per_s += d["bw_bytes"].as_f64().unwrap_or(0.0);
        }
    }
    if read_ios + write_ios == 0.0 {
        bail!("fio completed no I/O");
    }
    if read_ios > 0.0 {
        out.read_mean_ns /= read_ios;
    }
    if write_ios > 0.0 {
        out.write_mean_ns /= write_ios;
    }
    Ok(out)
}

/// One program of `bpftool prog show -j`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgStat {
    pub id: u32,
    pub name: String,
    /// `None` while `kernel.bpf_stats_enabled` was never on, or for a program never run.
    pub run_time_ns: Option<u64>,
    pub run_cnt: Option<u64>,
}

pub fn parse_bpftool_progs(text: &str) -> Result<Vec<ProgStat>> {
    let v: Value = serde_json::from_str(text.trim()).context("bpftool's JSON does not parse")?;
    let progs = v.as_array().context("bpftool prog show -j: not an array")?;
    progs
        .iter()
        .map(|p| {
            Ok(ProgStat {
                id: p["id"]
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .context("a program without an id")?,
                name: p["name"].as_str().unwrap_or("").to_owned(),
                run_time_ns: p["run_time_ns"].as_u64(),
                run_cnt: p["run_cnt"].as_u64(),
            })
        })
        .collect()
}

/// Which of the observer's event programs a name is (names may be cut to 15
/// characters by the kernel, e.g. `kml_raw_rq_inse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventProg {
    Insert,
    Issue,
    Complete,
}

impl EventProg {
    pub const ALL: [EventProg; 3] = [EventProg::Insert, EventProg::Issue, EventProg::Complete];

    /// The event program called `name` (as the kernel reports it: at most 15
    /// characters, `BPF_OBJ_NAME_LEN` - 1), by the shared names of the programs.
    pub fn of_name(name: &str) -> Option<EventProg> {
        const KERNEL_NAME_LEN: usize = 15;
        let is =
            |full: &str| full == name || (name.len() == KERNEL_NAME_LEN && full.starts_with(name));
        EventProg::ALL.into_iter().find(|p| {
            let e = p.event();
            is(e.raw) || is(e.tp)
        })
    }

    /// The tracepoint and programs of this event.
    fn event(self) -> Event {
        match self {
            EventProg::Insert => Event::INSERT,
            EventProg::Issue => Event::ISSUE,
            EventProg::Complete => Event::COMPLETE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EventProg::Insert => "insert",
            EventProg::Issue => "issue",
            EventProg::Complete => "complete",
        }
    }
}

/// `utime + stime` (clock ticks) from /proc/PID/stat. The command name may contain
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_proc_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let rest = &stat[stat.rfind(')').context("no `)` in /proc/PID/stat")? + 1..];
    // After the comm: state is field 3; utime is field 14, stime 15 (1-based).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("/proc/PID/stat is too short")?
            .parse()
            .context("a non-numeric time in /proc/PID/stat")
    };
    Ok(get(14 - 3)? + get(15 - 3)?)
}

/// A `Key:   value kB` line of /proc/PID/status or /proc/meminfo, in KiB.
pub fn parse_kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The program ids an `/proc/PID/fdinfo/N` names (`prog_id:` of a BPF program fd).
pub fn parse_fdinfo_prog_id(fdinfo: &str) -> Option<u32> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
}

/// The three load averages of /proc/loadavg.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|w| w.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// One JSON event of `kml-agent run --json` / `hook --json` on a line of its
/// stdout: its `"event"` name and the whole object (`None`: not an event).
pub fn parse_agent_event(line: &str) -> Option<(String, Value)> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let event = v.get("event")?.as_str()?.to_owned();
    Some((event, v))
}

/// The events named `name` in an agent's stdout, in order.
pub fn agent_events<'a>(stdout: &'a str, name: &'a str) -> impl Iterator<Item = Value> + 'a {
    stdout
        .lines()
        .filter_map(parse_agent_event)
        .filter(move |(e, _)| e == name)
        .map(|(_, v)| v)
}

/// One second of `kml-agent run` (a `tick` event).
#[derive(Clone, Debug, PartialEq)]
pub struct AgentLine {
    pub t_s: f64,
    pub records_per_s: f64,
    pub drops: u64,
    /// `(version, kind)` of the active model.
    pub model: Option<(u32, String)>,
    /// Live balanced accuracy of the active model over that second (both classes seen).
    pub balanced_accuracy: Option<f64>,
}

/// A `tick` event of `kml-agent run --json`.
pub fn parse_agent_line(line: &str) -> Option<AgentLine> {
    let (event, v) = parse_agent_event(line)?;
    if event != "tick" {
        return None;
    }
    let model = v.get("model").filter(|m| !m.is_null()).and_then(|m| {
        Some((
            u32::try_from(m.get("version")?.as_u64()?).ok()?,
            m.get("kind")?.as_str()?.to_owned(),
        ))
    });
    Some(AgentLine {
        t_s: v.get("t_s")?.as_f64()?,
        records_per_s: v.get("records_per_s")?.as_f64()?,
        drops: v.get("drops")?.as_u64()?,
        model,
        balanced_accuracy: v.get("balanced_accuracy").and_then(Value::as_f64),
    })
}

/// What online learning did, in the agent's words (the `learning` notes of its ticks).
pub fn agent_learning(stdout: &str) -> Vec<String> {
    agent_events(stdout, "tick")
        .flat_map(|t| {
            t.get("learning")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|n| n.get("message")?.as_str().map(str::to_owned))
        .collect()
}

/// What the tuner decided, in the agent's words (the `tuning` notes of its ticks).
pub fn agent_tuning(stdout: &str) -> Vec<String> {
    agent_events(stdout, "tick")
        .flat_map(|t| t["tuning"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect()
}

/// The `training.train_seconds` and record counts of a model file.
pub fn parse_model_training(text: &str) -> Result<(f64, u64)> {
    let v: Value = serde_json::from_str(text).context("the model file does not parse")?;
    let t = &v["training"];
    let secs = t["train_seconds"]
        .as_f64()
        .context("no training.train_seconds")?;
    let n = t["fit_records"].as_u64().unwrap_or(0) + t["tune_records"].as_u64().unwrap_or(0);
    Ok((secs, n))
}

/// The metrics of one model in `kml-agent eval --json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalMetrics {
    pub records: u64,
    pub miss_rate: f64,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub f1_miss: f64,
    pub q_accuracy: f64,
    pub q_balanced_accuracy: f64,
    pub q_f1_miss: f64,
    pub agreement: Option<f64>,
    /// AUC of the integer model's ranking (`None` for one class, or an older agent).
    pub q_auc: Option<f64>,
    /// The data held one class only (`eval`'s `one_class`, kml-learn's
    /// `Evaluation::one_class`): no score means anything, the report says "one class".
    pub one_class: bool,
}

impl EvalMetrics {
    /// The integer model's balanced accuracy as a table cell: "one class" when the
    /// data has no ranking to judge, else the percentage (and the AUC when known).
    pub fn q_cell(&self) -> String {
        if self.one_class {
            return "one class".into();
        }
        match self.q_auc {
            Some(a) => format!("{:.1} (AUC {a:.3})", 100.0 * self.q_balanced_accuracy),
            None => format!("{:.1}", 100.0 * self.q_balanced_accuracy),
        }
    }

    /// The integer model's balanced accuracy, unless the data held one class.
    pub fn score(&self) -> Option<f64> {
        (!self.one_class).then_some(self.q_balanced_accuracy)
    }
}

/// `eval --json` with `--baseline`: the model's metrics and the baseline's, if present.
pub fn parse_eval_with_baseline(text: &str) -> Result<(EvalMetrics, Option<EvalMetrics>)> {
    let start = text.find('{').context("no JSON object in eval's output")?;
    let v: Value = serde_json::from_str(&text[start..]).context("eval's JSON does not parse")?;
    let base = match v.get("baseline") {
        Some(b) if b.is_object() => Some(eval_metrics(b)?),
        _ => None,
    };
    Ok((eval_metrics(&v)?, base))
}

fn eval_metrics(v: &Value) -> Result<EvalMetrics> {
    let f = |k: &str| -> Result<f64> {
        v[k].as_f64()
            .with_context(|| format!("eval JSON: no number `{k}`"))
    };
    Ok(EvalMetrics {
        records: v["records"].as_u64().unwrap_or(0),
        miss_rate: f("miss_rate")?,
        accuracy: f("accuracy")?,
        balanced_accuracy: f("balanced_accuracy")?,
        f1_miss: f("f1_miss")?,
        q_accuracy: f("quantized_accuracy")?,
        q_balanced_accuracy: f("quantized_balanced_accuracy")?,
        q_f1_miss: f("quantized_f1_miss")?,
        agreement: v["agreement"].as_f64(),
        q_auc: v["quantized_auc"].as_f64(),
        one_class: v["one_class"].as_bool().unwrap_or(false),
    })
}

/// Median of the values (mean of the middle two for an even count); `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The samples of a Prometheus / OpenMetrics text exposition (the agent's
/// `--metrics` page): `(name{labels}, value)` in page order; comments skipped.
pub fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.trim().rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the sample named exactly `name` (no labels).
pub fn exposition_value(samples: &[(String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// The samples of a labelled family `name{...}`: (the label set, value).
pub fn exposition_family<'a>(samples: &'a [(String, f64)], name: &str) -> Vec<(&'a str, f64)> {
    samples
        .iter()
        .filter_map(|(k, v)| {
            let labels = k.strip_prefix(name)?.strip_prefix('{')?.strip_suffix('}')?;
            Some((labels, *v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO: &str = r#"fio: some warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "randread",
      "job_runtime" : 5001,
      "usr_cpu" : 10.5,
      "sys_cpu" : 60.25,
      "read" : {
        "total_ios" : 665000,
        "runtime" : 5001,
        "iops" : 133000.5,
        "clat_ns" : { "percentile" : { "50.000000" : 201728, "99.000000" : 544768 } }
      },
      "write" : { "total_ios" : 0, "runtime" : 0, "iops" : 0.0 }
    },
    {
      "jobname" : "writer",
      "job_runtime" : 5002,
      "usr_cpu" : 1.5,
      "sys_cpu" : 3.75,
      "read" : { "total_ios" : 0, "iops" : 0.0 },
      "write" : { "total_ios" : 1000, "iops" : 200.0 }
    }
  ]
}"#;

    #[test]
    fn fio_json_sums_jobs() {
        let s = parse_fio_json(FIO).unwrap();
        assert_eq!(s.read_ios, 665000);
        assert_eq!(s.write_ios, 1000);
        assert_eq!(s.ios(), 666000);
        assert!((s.iops() - 133200.5).abs() < 1e-9);
        assert_eq!(s.runtime_ms, 5002);
        assert!((s.usr_cpu - 6.0).abs() < 1e-9);
        assert!((s.sys_cpu - 32.0).abs() < 1e-9);
        assert_eq!(s.read_clat_p50_ns, Some(201728));
        assert_eq!(s.read_clat_p99_ns, Some(544768));
    }

    #[test]
    fn fio_json_errors() {
        assert!(parse_fio_json("no json").is_err());
        assert!(parse_fio_json(r#"{"jobs": []}"#).is_err());
        assert!(parse_fio_json(r#"{"x": 1}"#).is_err());
    }

    #[test]
    fn bpftool_progs() {
        let text = r#"[{"id":1268,"type":"raw_tracepoint","name":"kml_raw_rq_insert","run_time_ns":249761334,"run_cnt":514897},
            {"id":1273,"type":"raw_tracepoint","name":"kml_raw_features"},
            {"id":7,"type":"cgroup_device","name":"sd_devices","run_time_ns":0,"run_cnt":0}]"#;
        let p = parse_bpftool_progs(text).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].id, 1268);
        assert_eq!(p[0].run_time_ns, Some(249761334));
        assert_eq!(p[0].run_cnt, Some(514897));
        assert_eq!(p[1].run_cnt, None);
        assert_eq!(p[2].name, "sd_devices");
        assert!(parse_bpftool_progs("{}").is_err());
        assert!(parse_bpftool_progs("[{\"name\":\"x\"}]").is_err());
    }

    #[test]
    fn event_program_names_even_cut_short() {
        assert_eq!(
            EventProg::of_name("kml_raw_rq_insert"),
            Some(EventProg::Insert)
        );
        assert_eq!(
            EventProg::of_name("kml_raw_rq_inse"),
            Some(EventProg::Insert)
        );
        assert_eq!(
            EventProg::of_name("kml_tp_rq_issue"),
            Some(EventProg::Issue)
        );
        assert_eq!(
            EventProg::of_name("kml_raw_rq_complete"),
            Some(EventProg::Complete)
        );
        assert_eq!(EventProg::of_name("kml_raw_rq_merge"), None);
        assert_eq!(EventProg::of_name("kml_raw_features"), None);
        assert_eq!(EventProg::of_name("other_rq_insert"), None);
    }

    #[test]
    fn proc_stat_with_awkward_comm() {
        let stat = "4242 (kml) agent) (x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 24 16 0 0 20 0 2 0 100 0 0";
        assert_eq!(parse_proc_stat_cpu_ticks(stat).unwrap(), 40);
        assert!(parse_proc_stat_cpu_ticks("4242 (x) S 1").is_err());
        assert!(parse_proc_stat_cpu_ticks("no paren").is_err());
    }

    #[test]
    fn kib_fields() {
        let status =
            "Name:\tkml-agent\nVmPeak:\t  200000 kB\nVmHWM:\t   51234 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(parse_kib_field(status, "VmHWM"), Some(51234));
        assert_eq!(parse_kib_field(status, "VmRSS"), Some(40000));
        assert_eq!(parse_kib_field(status, "VmSwap"), None);
        let meminfo = "MemTotal:       24684092 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_kib_field(meminfo, "MemTotal"), Some(24684092));
    }

    #[test]
    fn fdinfo_and_loadavg() {
        let fd = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t17\nprog_jited:\t1\nprog_tag:\tb23c6bca089059e6\nmemlock:\t8192\nprog_id:\t1296\nrun_time_ns:\t0\n";
        assert_eq!(parse_fdinfo_prog_id(fd), Some(1296));
        assert_eq!(parse_fdinfo_prog_id("pos:\t0\nlink_id:\t5\n"), None);
        assert_eq!(
            parse_loadavg("5.92 5.00 3.80 3/412 32388\n"),
            Some([5.92, 5.0, 3.8])
        );
        assert_eq!(parse_loadavg("x"), None);
    }

    #[test]
    fn agent_events() {
        let out = r#"{"attach":"raw-tracepoint","devices":["loop1"],"event":"ready","hook_policy":null,"model":null}
{"balanced_accuracy":null,"drops":3,"event":"tick","learning":[],"model":null,"orphans":0,"records_per_s":115136.0,"t_s":7.0}
{"balanced_accuracy":0.812,"drops":0,"event":"tick","learning":[{"kind":"swap","message":"swap v1 -> v2 logistic: ..."}],"model":{"kind":"logistic","version":2},"orphans":1,"records_per_s":30211.0,"t_s":12.0,"tuning":["fifo_batch 16 -> 8"]}
{"balanced_accuracy":null,"drops":0,"event":"tick","learning":[],"model":{"kind":"tree","version":1},"orphans":0,"records_per_s":0.0,"t_s":1.0}
{"event":"end","hook":null,"losses":{"ring_full_drops":7,"orphan_completions":0},"records":805638,"seconds":8.2}
"#;
        let lines: Vec<AgentLine> = out.lines().filter_map(parse_agent_line).collect();
        assert_eq!(lines.len(), 3, "ticks only");
        assert_eq!(lines[0].t_s, 7.0);
        assert_eq!(lines[0].records_per_s, 115136.0);
        assert_eq!(lines[0].drops, 3);
        assert_eq!(lines[0].model, None);
        assert_eq!(lines[1].model, Some((2, "logistic".to_owned())));
        assert_eq!(lines[1].balanced_accuracy, Some(0.812));
        assert_eq!(lines[2].model, Some((1, "tree".to_owned())));
        assert_eq!(lines[2].balanced_accuracy, None);
        assert_eq!(parse_agent_line("kml-agent: observing loop1"), None);
        assert_eq!(agent_learning(out), ["swap v1 -> v2 logistic: ..."]);
        assert_eq!(agent_tuning(out), ["fifo_batch 16 -> 8"]);
        assert!(agent_tuning("kml-agent: tune fifo_batch 16 -> 8\n").is_empty());
    }

    fn e_text() -> &'static str {
        r#"{"records":100,"miss_rate":0.2,"accuracy":0.9,"balanced_accuracy":0.8,"f1_miss":0.7,
            "quantized_accuracy":0.89,"quantized_balanced_accuracy":0.79,"quantized_f1_miss":0.69,"agreement":0.99}"#
    }

    #[test]
    fn model_and_eval_json() {
        let m = r#"{"kind":"tree","training":{"train_seconds":0.26,"fit_records":800000,"tune_records":200000}}"#;
        assert_eq!(parse_model_training(m).unwrap(), (0.26, 1_000_000));
        assert!(parse_model_training("{}").is_err());
        let e = parse_eval_with_baseline(e_text()).unwrap().0;
        assert_eq!(e.records, 100);
        assert_eq!(e.q_balanced_accuracy, 0.79);
        assert_eq!(e.agreement, Some(0.99));
        // An agent before AUC and one-class reporting: a plain percentage.
        assert!(!e.one_class);
        assert_eq!(e.q_cell(), "79.0");
        let one = r#"{"records":100,"miss_rate":0.0,"accuracy":1.0,"balanced_accuracy":1.0,"f1_miss":0.0,
            "quantized_accuracy":1.0,"quantized_balanced_accuracy":1.0,"quantized_f1_miss":0.0,
            "quantized_auc":null,"one_class":true}"#;
        assert_eq!(
            parse_eval_with_baseline(one).unwrap().0.q_cell(),
            "one class"
        );
        let auc = one.replace("null", "0.8766").replace("true", "false");
        assert_eq!(
            parse_eval_with_baseline(&auc).unwrap().0.q_cell(),
            "100.0 (AUC 0.877)"
        );
        assert!(parse_eval_with_baseline(r#"{"records":1}"#).is_err());
        let both = r#"{"records":100,"miss_rate":0.2,"accuracy":0.9,"balanced_accuracy":0.8,"f1_miss":0.7,
            "quantized_accuracy":0.89,"quantized_balanced_accuracy":0.79,"quantized_f1_miss":0.69,
            "baseline":{"records":100,"miss_rate":0.2,"accuracy":0.5,"balanced_accuracy":0.5,"f1_miss":0.1,
            "quantized_accuracy":0.5,"quantized_balanced_accuracy":0.51,"quantized_f1_miss":0.1}}"#;
        let (m, b) = parse_eval_with_baseline(both).unwrap();
        assert_eq!(m.q_balanced_accuracy, 0.79);
        assert_eq!(m.agreement, None);
        assert_eq!(b.unwrap().q_balanced_accuracy, 0.51);
        assert_eq!(parse_eval_with_baseline(e_text()).unwrap().1, None);
        assert!(!m.one_class);
        assert_eq!(m.score(), Some(0.79));
    }

    #[test]
    fn one_class_evaluations_have_no_score() {
        let said = r#"{"records":50,"miss_rate":0.0,"accuracy":1.0,"balanced_accuracy":1.0,"f1_miss":0.0,
            "quantized_accuracy":1.0,"quantized_balanced_accuracy":1.0,"quantized_f1_miss":0.0,
            "quantized_auc":null,"one_class":true}"#;
        let e = parse_eval_with_baseline(said).unwrap().0;
        assert!(e.one_class);
        assert_eq!((e.score(), e.q_auc), (None, None));
        let two = r#"{"records":50,"miss_rate":0.1,"accuracy":0.9,"balanced_accuracy":0.8,"f1_miss":0.5,
            "quantized_accuracy":0.9,"quantized_balanced_accuracy":0.8,"quantized_f1_miss":0.5,
            "quantized_auc":0.85,"one_class":false}"#;
        let e = parse_eval_with_baseline(two).unwrap().0;
        assert_eq!((e.score(), e.q_auc), (Some(0.8), Some(0.85)));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn fio_latency_per_direction() {
        let text = r#"note: a warning first
{"jobs": [
 {"read": {"total_ios": 100, "bw_bytes": 1000, "clat_ns": {"mean": 2000.0, "percentile": {"99.000000": 9000, "99.900000": 12000}}},
  "write": {"total_ios": 0, "bw_bytes": 0, "clat_ns": {"mean": 0.0}}},
 {"read": {"total_ios": 300, "bw_bytes": 3000, "clat_ns": {"mean": 4000.0, "percentile": {"99.000000": 7000, "99.900000": 15000}}},
  "write": {"total_ios": 50, "bw_bytes": 500, "clat_ns": {"mean": 50000.0, "percentile": {"99.000000": 90000, "99.900000": 99000}}}}
]}"#;
        let l = parse_fio_latency(text).unwrap();
        assert_eq!(l.read_mean_ns, 3500.0);
        assert_eq!((l.read_p99_ns, l.read_p999_ns), (9000.0, 15000.0));
        assert_eq!((l.write_mean_ns, l.write_p99_ns), (50000.0, 90000.0));
        assert_eq!(l.bytes_per_s, 4500.0);
        assert!(parse_fio_latency(r#"{"jobs": []}"#).is_err());
    }
    #[test]
    fn exposition_samples() {
        let text = "# HELP kml_records records\n# TYPE kml_records counter\nkml_records_total 17\n\
kml_program_runs_total{program=\"kml_raw_rq_insert\",event=\"block_rq_insert\"} 4\n\
kml_program_runs_total{program=\"kml_raw_rq_issue\",event=\"block_rq_issue\"} 5\n\
kml_process_cpu_seconds_total 1.25\nbroken line\n# EOF\n";
        let s = parse_exposition(text);
        assert_eq!(exposition_value(&s, "kml_records_total"), Some(17.0));
        assert_eq!(
            exposition_value(&s, "kml_process_cpu_seconds_total"),
            Some(1.25)
        );
        assert_eq!(exposition_value(&s, "kml_missing"), None);
        let fam = exposition_family(&s, "kml_program_runs_total");
        assert_eq!(fam.len(), 2);
        assert_eq!(fam[1].1, 5.0);
        assert!(fam[0].0.contains("kml_raw_rq_insert"));
    }
}
