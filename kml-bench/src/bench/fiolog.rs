//! fio's per-second logs, and which arm of an alternation each second belongs to.
//!
//! fio runs once, for the whole alternation, with windowed logs: IOPS and bandwidth
//! averaged over 1 s (`log_avg_msec=1000`, `iopsavgtime`/`bwavgtime` 1000: one
//! sample per window) and completion-latency histograms per second
//! (`log_hist_msec=1000`, every one of fio's bins). Timestamps are on
//! `CLOCK_MONOTONIC` (`log_alternate_epoch_clock_id=1`), the clock the harness
//! stamps each arm's measured window with, so a log entry is assigned to an arm by
//! time alone: an entry covers the second that ends at its timestamp, and it counts
//! for an arm only when that whole second lies inside the arm's window. Seconds that
//! straddle an attach or a detach are dropped.

use anyhow::{bail, Context as _, Result};

/// One entry of a windowed IOPS or bandwidth log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogSample {
    /// End of the averaging window, ms on the log's clock.
    pub t_ms: u64,
    /// IOPS, or KiB/s for a bandwidth log.
    pub value: f64,
    /// 0 read, 1 write, 2 trim.
    pub ddir: u8,
}

/// `time, value, ddir, bs, offset[, prio]` lines.
pub fn parse_log(text: &str) -> Result<Vec<LogSample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut f = line.split(',').map(str::trim);
        let mut next = |what: &str| {
            f.next()
                .with_context(|| format!("fio log line {}: no {what}: `{line}`", n + 1))
        };
        let t_ms = next("time")?
            .parse()
            .with_context(|| format!("fio log line {}: bad time", n + 1))?;
        let value = next("value")?
            .parse()
            .with_context(|| format!("fio log line {}: bad value", n + 1))?;
        let ddir = next("direction")?
            .parse()
            .with_context(|| format!("fio log line {}: bad direction", n + 1))?;
        out.push(LogSample { t_ms, value, ddir });
    }
    Ok(out)
}

/// One entry of a histogram log: the completions since the previous entry of the
/// same direction, per fio bin.
#[derive(Clone, Debug, PartialEq)]
pub struct HistSample {
    /// Where the entry's interval starts: the previous entry of the same direction
    /// (fio closes a histogram window at the first completion after `log_hist_msec`,
    /// so a window of a direction with sparse completions is longer than a second),
    /// or a second before the first entry.
    pub start_ms: u64,
    pub t_ms: u64,
    pub ddir: u8,
    pub bins: Vec<u64>,
}

/// `time, ddir, bs, bin0, bin1, ...` lines (`log_hist_coarseness=0`) of one job's log.
pub fn parse_hist_log(text: &str) -> Result<Vec<HistSample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 4 {
            bail!("fio histogram log line {}: {} fields", n + 1, fields.len());
        }
        let num = |s: &str| -> Result<u64> {
            s.parse()
                .with_context(|| format!("fio histogram log line {}: `{s}`", n + 1))
        };
        let (t_ms, ddir) = (num(fields[0])?, num(fields[1])? as u8);
        let start_ms = out
            .iter()
            .rev()
            .find(|h: &&HistSample| h.ddir == ddir)
            .map_or(t_ms.saturating_sub(LOG_MS), |h| h.t_ms);
        out.push(HistSample {
            start_ms,
            t_ms,
            ddir,
            bins: fields[3..].iter().map(|s| num(s)).collect::<Result<_>>()?,
        });
    }
    Ok(out)
}

/// fio's FIO_IO_U_PLAT_BITS: 2^6 bins per power of two.
const PLAT_BITS: u32 = 6;
const PLAT_VAL: u64 = 1 << PLAT_BITS;

/// The latency (ns) a bin of fio's histogram stands for: fio's `plat_idx_to_val`
/// (the middle of the bin's range; exact below 128 ns).
pub fn bin_value_ns(idx: usize) -> f64 {
    let idx = idx as u64;
    if idx < PLAT_VAL << 1 {
        return idx as f64;
    }
    let error_bits = (idx >> PLAT_BITS) - 1;
    let base = 1u64 << (error_bits + u64::from(PLAT_BITS));
    let k = idx % PLAT_VAL;
    base as f64 + (k as f64 + 0.5) * (1u64 << error_bits) as f64
}

/// Adds `b` into `a` bin by bin (growing `a` if needed).
pub fn merge_into(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// The `q`-quantile of a histogram as fio reports percentiles: the value of the
/// first bin at which the cumulative count reaches `q` of the total.
pub fn hist_quantile_ns(bins: &[u64], q: f64) -> Option<f64> {
    let total: u64 = bins.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in bins.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Some(bin_value_ns(i));
        }
    }
    None
}

/// Mean latency of a histogram (from the bins' values).
pub fn hist_mean_ns(bins: &[u64]) -> Option<f64> {
    let total: u64 = bins.iter().sum();
    (total > 0).then(|| {
        bins.iter()
            .enumerate()
            .map(|(i, c)| *c as f64 * bin_value_ns(i))
            .sum::<f64>()
            / total as f64
    })
}

/// An arm's measured window in one cycle (ms on `CLOCK_MONOTONIC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub arm: usize,
    pub cycle: usize,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// How far a log entry's second may stick out of a window and still count: fio's
/// helper thread ticks a few ms late.
pub const SLACK_MS: u64 = 30;
/// The averaging window of the logs.
pub const LOG_MS: u64 = 1000;

/// The window that holds the whole interval from `begin_ms` to `end_ms`, if any.
pub fn window_holding(windows: &[Window], begin_ms: u64, end_ms: u64) -> Option<usize> {
    windows
        .iter()
        .position(|w| begin_ms + SLACK_MS >= w.start_ms && end_ms <= w.end_ms + SLACK_MS)
}

/// The window that holds the whole second ending at `t_ms` (an IOPS or bandwidth
/// log's entry: fio's helper thread samples every second, and a direction without
/// I/O in a second has no entry for it), if any.
pub fn window_of(windows: &[Window], t_ms: u64) -> Option<usize> {
    window_holding(windows, t_ms.saturating_sub(LOG_MS), t_ms)
}

/// Per window: the number of log seconds inside it and the sum of their values,
/// for the entries of direction `ddir` (or every direction with `None`).
pub fn per_window(
    windows: &[Window],
    samples: &[LogSample],
    ddir: Option<u8>,
) -> Vec<(usize, f64)> {
    let mut out = vec![(0usize, 0.0f64); windows.len()];
    for s in samples.iter().filter(|s| ddir.is_none_or(|d| s.ddir == d)) {
        if let Some(w) = window_of(windows, s.t_ms) {
            out[w].0 += 1;
            out[w].1 += s.value;
        }
    }
    out
}

/// Per window: the histogram of the seconds inside it (direction `ddir`).
pub fn hist_per_window(windows: &[Window], samples: &[HistSample], ddir: u8) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); windows.len()];
    for s in samples.iter().filter(|s| s.ddir == ddir) {
        if let Some(w) = window_holding(windows, s.start_ms, s.t_ms) {
            merge_into(&mut out[w], &s.bins);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_windowed_logs() {
        let text = "1000, 251234, 0, 0, 0, 0\n2001, 250000, 0, 0, 0, 0\n\n2001, 17, 1, 0, 0, 0\n";
        let v = parse_log(text).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(
            v[0],
            LogSample {
                t_ms: 1000,
                value: 251234.0,
                ddir: 0
            }
        );
        assert_eq!(v[2].ddir, 1);
        assert!(parse_log("12, x, 0").is_err());
        assert!(parse_log("12").is_err());
    }

    #[test]
    fn parses_histogram_logs() {
        let v = parse_hist_log(
            "5000, 0, 4096, 0, 3, 1\n6000, 1, 0, 2, 0, 0\n6001, 0, 4096, 1\n8500, 0, 4096, 1\n",
        )
        .unwrap();
        assert_eq!(v[0].bins, [0, 3, 1]);
        assert_eq!(v[1].ddir, 1);
        // Intervals run from the previous entry of the same direction.
        let spans: Vec<(u64, u64)> = v.iter().map(|h| (h.start_ms, h.t_ms)).collect();
        assert_eq!(
            spans,
            [(4000, 5000), (5000, 6000), (5000, 6001), (6001, 8500)]
        );
        assert!(parse_hist_log("5000, 0, 4096").is_err());
    }

    #[test]
    fn bin_values_follow_fio() {
        // Exact below 128; then groups of 64 bins per power of two, bin middles.
        assert_eq!(bin_value_ns(0), 0.0);
        assert_eq!(bin_value_ns(127), 127.0);
        // idx 128: error_bits 1, base 128, k 0 → 128 + 0.5 × 2.
        assert_eq!(bin_value_ns(128), 129.0);
        // idx 192: error_bits 2, base 256, k 0 → 256 + 0.5 × 4.
        assert_eq!(bin_value_ns(192), 258.0);
        // idx 191: error_bits 1, base 128, k 63 → 128 + 63.5 × 2.
        assert_eq!(bin_value_ns(191), 255.0);
        // Monotonic over the whole range.
        assert!((1..1856).all(|i| bin_value_ns(i) > bin_value_ns(i - 1)));
    }

    #[test]
    fn quantiles_and_means_of_histograms() {
        let mut bins = vec![0u64; 200];
        bins[10] = 98;
        bins[100] = 1;
        bins[150] = 1;
        assert_eq!(hist_quantile_ns(&bins, 0.5), Some(10.0));
        assert_eq!(hist_quantile_ns(&bins, 0.98), Some(10.0));
        assert_eq!(hist_quantile_ns(&bins, 0.99), Some(100.0));
        assert_eq!(hist_quantile_ns(&bins, 1.0), Some(bin_value_ns(150)));
        assert_eq!(hist_quantile_ns(&[0, 0], 0.5), None);
        let m = hist_mean_ns(&bins).unwrap();
        assert!((m - (98.0 * 10.0 + 100.0 + bin_value_ns(150)) / 100.0).abs() < 1e-9);
        let mut a = vec![1, 2];
        merge_into(&mut a, &[1, 1, 5]);
        assert_eq!(a, [2, 3, 5]);
    }

    #[test]
    fn seconds_go_to_the_window_that_holds_them_whole() {
        let w = [
            Window {
                arm: 0,
                cycle: 0,
                start_ms: 10_000,
                end_ms: 14_500,
            },
            Window {
                arm: 1,
                cycle: 0,
                start_ms: 16_200,
                end_ms: 20_700,
            },
        ];
        // Seconds ending at 11.0 .. 14.5 s lie in the first window.
        assert_eq!(window_of(&w, 11_000), Some(0));
        assert_eq!(window_of(&w, 10_990), Some(0)); // 20 ms early: within the slack
        assert_eq!(window_of(&w, 10_900), None); // began before the window
        assert_eq!(window_of(&w, 14_520), Some(0));
        assert_eq!(window_of(&w, 14_600), None); // ends after it (a detach inside)
        assert_eq!(window_of(&w, 15_800), None); // the transition
        assert_eq!(window_of(&w, 17_250), Some(1));
        assert_eq!(window_of(&w, 20_700), Some(1));
        assert_eq!(window_of(&w, 21_000), None);
        let samples: Vec<LogSample> = [11_000u64, 12_000, 13_000, 14_000, 15_000, 17_300, 18_300]
            .iter()
            .map(|t| LogSample {
                t_ms: *t,
                value: *t as f64 / 1000.0,
                ddir: 0,
            })
            .collect();
        let pw = per_window(&w, &samples, Some(0));
        assert_eq!(pw[0], (4, 11.0 + 12.0 + 13.0 + 14.0));
        assert_eq!(pw[1], (2, 17.3 + 18.3));
        assert_eq!(per_window(&w, &samples, Some(1)), [(0, 0.0), (0, 0.0)]);
        let h = |start_ms, t_ms, ddir, bins: Vec<u64>| HistSample {
            start_ms,
            t_ms,
            ddir,
            bins,
        };
        let hs = [
            h(11_000, 12_000, 0, vec![1, 2]),
            h(12_000, 13_000, 0, vec![0, 1, 1]),
            h(13_000, 15_500, 0, vec![9]),
            h(18_000, 19_000, 1, vec![4]),
            // Ends inside the second window but began before it (sparse completions).
            h(15_500, 17_900, 0, vec![7]),
        ];
        let h = hist_per_window(&w, &hs, 0);
        assert_eq!(h[0], [1, 3, 1]);
        assert!(h[1].is_empty());
        assert_eq!(hist_per_window(&w, &hs, 1)[1], [4]);
    }
}
