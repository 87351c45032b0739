//! `run --metrics ADDR`: the agent's state as a Prometheus (OpenMetrics) text
//! exposition over plain HTTP.
//!
//! The run loop publishes a [`Snapshot`] once per second; a scrape encodes the
//! newest one. The HTTP side is a few lines on tokio's listener (GET /metrics,
//! nothing else): the agent needs no web framework for one read-only page.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use kml_ebpf_common::{abi::names::Event, Counter, Counters};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    learn::online::ModelEvents,
    observe::{Observer, ProgramStats},
    slots::ActiveModel,
};

/// The confusion matrix counters, exposed as one labelled family instead.
const CONFUSION: [(Counter, &str, &str); 4] = [
    (Counter::TrueMiss, "at_risk", "missed"),
    (Counter::FalseMiss, "at_risk", "met"),
    (Counter::TrueMet, "meets", "met"),
    (Counter::FalseMet, "meets", "missed"),
];

/// What one scrape reports: the kernel's counters and the agent's own state.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `COUNTERS`, summed over CPUs.
    pub counters: Counters,
    /// Records the agent took from the ring buffer.
    pub records_received: u64,
    /// Entries in the in-flight map now.
    pub inflight: u64,
    /// LRU evictions of the in-flight map (added - removed - live).
    pub lru_evictions: u64,
    /// Per attached program: runs, run time (with bpf_stats), recursion misses.
    pub programs: Vec<ProgramStats>,
    pub bpf_stats_enabled: bool,
    pub model: Option<ActiveModel>,
    pub events: ModelEvents,
}

/// The agent process's CPU time and memory, from /proc/self.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl ProcessStats {
    pub fn of_self() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self::parse(&stat, &status, u64::try_from(ticks).ok()?)
    }

    /// From `/proc/PID/stat` (utime and stime, fields 14 and 15, after the
    /// parenthesised command name) and `/proc/PID/status` (VmRSS, VmHWM in kB).
    pub fn parse(stat: &str, status: &str, ticks_per_second: u64) -> Option<ProcessStats> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): utime is field 14, stime field 15.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        let kib = |key: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        (ticks_per_second > 0).then_some(())?;
        Some(ProcessStats {
            cpu_seconds: (utime + stime) as f64 / ticks_per_second as f64,
            rss_bytes: kib("VmRSS")? * 1024,
            peak_rss_bytes: kib("VmHWM")? * 1024,
        })
    }
}

impl Snapshot {
    /// Nanoseconds per insert decision (features + inference are tail calls of the
    /// insert program, so its run time includes them); `None` without bpf_stats.
    pub fn ns_per_decision(&self) -> Option<f64> {
        let insert = self
            .programs
            .iter()
            .find(|p| p.event == Event::INSERT.tracepoint)?;
        (self.bpf_stats_enabled && insert.run_count > 0)
            .then(|| insert.run_time_ns as f64 / insert.run_count as f64)
    }
}

#[derive(Debug, Default)]
struct Shared(Mutex<Snapshot>);

impl Collector for Shared {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().map_err(|_| std::fmt::Error)?.clone();
        let counter = |enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64| {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
        };
        let gauge = |enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64| {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        for &c in Counters::ALL {
            if CONFUSION.iter().any(|(k, _, _)| *k == c) {
                continue;
            }
            counter(
                &mut enc,
                c.name(),
                &format!("kernel counter {} (COUNTERS map)", c.name()),
                s.counters.get(c),
            )?;
        }
        {
            let proto = ConstCounter::new(0u64);
            let mut family = enc.encode_descriptor(
                "confusion",
                "completed requests the active model scored, by verdict at insert and outcome",
                None,
                proto.metric_type(),
            )?;
            for (c, predicted, actual) in CONFUSION {
                let labels = [("predicted", predicted), ("actual", actual)];
                ConstCounter::new(s.counters.get(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "records_received",
            "records the agent took from the ring buffer",
            s.records_received,
        )?;
        counter(
            &mut enc,
            "lru_evictions",
            "in-flight entries evicted by the LRU map (inflight_added - inflight_removed - live)",
            s.lru_evictions,
        )?;
        gauge(
            &mut enc,
            "inflight",
            "entries in the in-flight map",
            s.inflight as f64,
        )?;
        {
            let proto = ConstGauge::new(0i64);
            let mut family = enc.encode_descriptor(
                "model_version",
                "version of the model active in the kernel (0: none)",
                None,
                proto.metric_type(),
            )?;
            let (kind, version) = s
                .model
                .map_or(("none", 0), |m| (m.kind.name(), i64::from(m.version)));
            ConstGauge::new(version).encode(family.encode_family(&[("kind", kind)])?)?;
        }
        counter(
            &mut enc,
            "model_swaps",
            "models swapped in by online learning",
            s.events.swaps,
        )?;
        counter(
            &mut enc,
            "model_rollbacks",
            "swaps rolled back after probation",
            s.events.rollbacks,
        )?;
        counter(
            &mut enc,
            "drift_detections",
            "live accuracy fell below the model's held-back score",
            s.events.drifts,
        )?;
        counter(
            &mut enc,
            "retrain_failures",
            "online trainings that failed",
            s.events.retrain_failures,
        )?;
        counter(
            &mut enc,
            "threshold_calibrations",
            "recalibrated models installed (the serving model with its threshold moved to the newest outcomes)",
            s.events.calibrations,
        )?;
        gauge(
            &mut enc,
            "threshold_shift",
            "the serving model's threshold shift from live calibration, in score units (0: its own)",
            s.events.threshold_shift as f64,
        )?;
        gauge(
            &mut enc,
            "bpf_stats_enabled",
            "1 when kernel.bpf_stats_enabled is on (program run times are measured)",
            if s.bpf_stats_enabled { 1.0 } else { 0.0 },
        )?;
        if let Some(ns) = s.ns_per_decision() {
            gauge(
                &mut enc,
                "ns_per_decision",
                "average run time of the insert program (features and inference included)",
                ns,
            )?;
        }
        // The agent process itself, read at scrape time (not from the snapshot).
        if let Some(p) = ProcessStats::of_self() {
            let c = ConstCounter::new(p.cpu_seconds);
            c.encode(enc.encode_descriptor(
                "process_cpu_seconds",
                "user + system CPU time of the agent process (all threads), seconds",
                None,
                c.metric_type(),
            )?)?;
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "resident set size of the agent process now (VmRSS)",
                p.rss_bytes as f64,
            )?;
            gauge(
                &mut enc,
                "process_peak_resident_memory_bytes",
                "largest resident set size of the agent process so far (VmHWM)",
                p.peak_rss_bytes as f64,
            )?;
        }
        type Field = fn(&ProgramStats) -> u64;
        let per_program: [(&str, &str, Field); 3] = [
            ("program_runs", "runs of each attached program", |p| {
                p.run_count
            }),
            (
                "program_run_time_ns",
                "run time of each attached program (0 unless bpf_stats is enabled)",
                |p| p.run_time_ns,
            ),
            (
                "program_recursion_misses",
                "events the kernel did not run the program for (it would have nested)",
                |p| p.recursion_misses,
            ),
        ];
        for (name, help, field) in per_program {
            let proto = ConstCounter::new(0u64);
            let mut family = enc.encode_descriptor(name, help, None, proto.metric_type())?;
            for p in &s.programs {
                let labels = [("program", p.name), ("event", p.event)];
                ConstCounter::new(field(p)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The exposition, ready to be updated by the run loop.
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let shared = Arc::new(Shared::default());
        let mut registry = Registry::with_prefix("kml");
        registry.register_collector(Box::new(shared.clone()));
        Metrics {
            shared,
            registry: Arc::new(registry),
        }
    }
}

impl Metrics {
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut s) = self.shared.0.lock() {
            f(&mut s);
        }
    }

    /// Publishes the observer's counters and program statistics and the agent's
    /// own state.
    pub fn publish(
        &self,
        observer: &Observer,
        model: Option<ActiveModel>,
        records_received: u64,
        events: ModelEvents,
    ) -> anyhow::Result<()> {
        let counters = observer.counters()?;
        let programs = observer.program_stats()?;
        let inflight = observer.live_inflight_counted(&counters)?;
        let lru_evictions = counters
            .get(Counter::InflightAdded)
            .saturating_sub(counters.get(Counter::InflightRemoved))
            .saturating_sub(inflight);
        let bpf_stats_enabled = crate::kernel::caps::bpf_stats_enabled();
        self.update(|s| {
            *s = Snapshot {
                counters,
                records_received,
                inflight,
                lru_evictions,
                programs,
                bpf_stats_enabled,
                model,
                events,
            }
        });
        Ok(())
    }

    /// The text exposition of the newest snapshot.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a poisoned lock yields an empty page.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Binds `addr` (so a bad address fails before anything is attached) and
    /// serves GET /metrics on the current tokio runtime until the agent exits.
    pub async fn serve(&self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot serve metrics on {addr}: pick a free address for --metrics")
        })?;
        let bound = listener.local_addr()?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (conn, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        tracing::warn!("metrics: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let me = me.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.answer(conn).await {
                        tracing::debug!("metrics request from {peer}: {e}");
                    }
                });
            }
        });
        Ok(bound)
    }

    async fn answer(&self, mut conn: tokio::net::TcpStream) -> std::io::Result<()> {
        let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut conn))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow client"))??;
        let (status, ctype, body) = match route(&head) {
            Route::Metrics => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render(),
            ),
            Route::NotFound => (
                "404 Not Found",
                "text/plain",
                "kml-agent serves GET /metrics\n".into(),
            ),
            Route::BadMethod => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(reply.as_bytes()).await?;
        conn.shutdown().await
    }
}

/// Reads up to the end of the request head (8 KiB at most: no request needs more).
async fn read_head(conn: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
}

fn route(head: &str) -> Route {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET" | "HEAD"), Some(path)) => {
            let path = path.split('?').next().unwrap_or(path);
            if path == "/metrics" || path == "/" {
                Route::Metrics
            } else {
                Route::NotFound
            }
        }
        _ => Route::BadMethod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::model::ModelKind;

    /// `name{labels} value` lines of an exposition.
    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn exposition_reports_counters_confusion_and_model() {
        let m = Metrics::default();
        m.update(|s| {
            *s.counters.slot(Counter::Records) = 17;
            *s.counters.slot(Counter::RingFullDrops) = 2;
            *s.counters.slot(Counter::TrueMiss) = 3;
            *s.counters.slot(Counter::FalseMet) = 4;
            s.records_received = 15;
            s.events.swaps = 1;
            s.events.calibrations = 3;
            s.events.threshold_shift = -9025;
            s.model = Some(ActiveModel {
                kind: ModelKind::Logistic,
                slot: 1,
                version: 2,
            });
            s.bpf_stats_enabled = true;
            s.programs = vec![ProgramStats {
                name: "kml_insert",
                event: "block_rq_insert",
                run_count: 4,
                run_time_ns: 1000,
                recursion_misses: 0,
            }];
        });
        let text = m.render();
        assert_eq!(sample(&text, "kml_records_total"), Some(17.0), "{text}");
        assert_eq!(sample(&text, "kml_ring_full_drops_total"), Some(2.0));
        assert_eq!(sample(&text, "kml_records_received_total"), Some(15.0));
        assert_eq!(
            sample(
                &text,
                "kml_confusion_total{predicted=\"at_risk\",actual=\"missed\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                "kml_confusion_total{predicted=\"meets\",actual=\"missed\"}"
            ),
            Some(4.0)
        );
        // The confusion counters appear only in the labelled family.
        assert!(!text.contains("kml_true_miss"), "{text}");
        assert_eq!(
            sample(&text, "kml_model_version{kind=\"logistic\"}"),
            Some(2.0)
        );
        assert_eq!(sample(&text, "kml_model_swaps_total"), Some(1.0));
        assert_eq!(sample(&text, "kml_threshold_calibrations_total"), Some(3.0));
        assert_eq!(sample(&text, "kml_threshold_shift"), Some(-9025.0));
        assert_eq!(sample(&text, "kml_ns_per_decision"), Some(250.0));
        assert!(text.trim_end().ends_with("# EOF"));
        // Every kernel counter but the confusion four is its own metric.
        for c in Counters::ALL {
            let listed = text.contains(&format!("kml_{}_total ", c.name()));
            let confusion = CONFUSION.iter().any(|(k, _, _)| k == c);
            assert_eq!(listed, !confusion, "{}", c.name());
        }
    }

    #[test]
    fn process_stats_from_proc() {
        let stat = "4242 (kml agent) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        let status = "Name:\tkml-agent\nVmHWM:\t  51200 kB\nVmRSS:\t  40960 kB\n";
        let p = ProcessStats::parse(stat, status, 100).unwrap();
        assert_eq!(p.cpu_seconds, 3.25);
        assert_eq!(p.rss_bytes, 40960 * 1024);
        assert_eq!(p.peak_rss_bytes, 51200 * 1024);
        assert_eq!(ProcessStats::parse(stat, "VmRSS: 1 kB", 100), None);
        assert_eq!(ProcessStats::parse("garbage", status, 100), None);
        // The exposition carries this process's numbers.
        let text = Metrics::default().render();
        assert!(
            sample(&text, "kml_process_cpu_seconds_total").is_some(),
            "{text}"
        );
        assert!(sample(&text, "kml_process_resident_memory_bytes").unwrap() > 0.0);
        assert!(sample(&text, "kml_process_peak_resident_memory_bytes").unwrap() > 0.0);
    }

    #[test]
    fn no_ns_per_decision_without_bpf_stats() {
        let m = Metrics::default();
        m.update(|s| {
            s.programs = vec![ProgramStats {
                name: "kml_insert",
                event: "block_rq_insert",
                run_count: 4,
                run_time_ns: 0,
                recursion_misses: 0,
            }];
        });
        let text = m.render();
        assert!(!text.contains("kml_ns_per_decision"), "{text}");
        assert_eq!(sample(&text, "kml_model_version{kind=\"none\"}"), Some(0.0));
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(""), Route::BadMethod);
    }

    #[test]
    fn serves_over_http() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let m = Metrics::default();
            m.update(|s| *s.counters.slot(Counter::Records) = 5);
            let addr = m.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).await.unwrap();
            assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
            let body = reply.split("\r\n\r\n").nth(1).unwrap();
            assert_eq!(sample(body, "kml_records_total"), Some(5.0));
            // A second server on the same address: a clear error.
            let err = m.serve(addr).await.unwrap_err();
            assert!(format!("{err:#}").contains("--metrics"), "{err:#}");
        });
    }
}
