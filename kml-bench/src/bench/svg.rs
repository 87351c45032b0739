//! Small hand-written SVG charts for the report: grouped bars (with an optional goal
//! line) and lines (optionally on a log x axis, for latency CDFs). No dependencies;
//! the output is plain SVG 1.1 that GitHub and browsers render.

use std::fmt::Write as _;

const W: f64 = 760.0;
const H: f64 = 380.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 95.0;

/// Series colours (colour-blind friendly, Okabe–Ito).
const COLOURS: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
];

pub fn colour(i: usize) -> &'static str {
    COLOURS[i % COLOURS.len()]
}

/// Escapes text for SVG/XML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// About `n` round tick values covering `[lo, hi]` (steps of 1, 2 or 5 × 10^k).
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo || n == 0 {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    // Snap float noise (0.6000000000000001) for the labels.
    (first..=last)
        .map(|k| (k as f64 * step * 1e12).round() / 1e12)
        .collect()
}

/// A compact label for a tick or a value: 1.5k, 2M, 0.25, 12.
pub fn short_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

fn header(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(title)
    );
}

fn legend(out: &mut String, names: &[String]) {
    let mut x = LEFT;
    let y = H - 18.0;
    for (i, name) in names.iter().enumerate() {
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            y - 10.0,
            colour(i),
            x + 16.0,
            y,
            esc(name)
        );
        x += 30.0 + 7.0 * name.chars().count() as f64;
    }
}

/// A y axis with grid lines from `lo` to `hi`; returns the value → y mapping's parameters.
fn y_axis(out: &mut String, lo: f64, hi: f64, label: &str) {
    let plot_h = H - TOP - BOTTOM;
    for t in nice_ticks(lo, hi, 5) {
        let y = TOP + plot_h * (1.0 - (t - lo) / (hi - lo));
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            short_num(t)
        );
    }
    let _ = write!(
        out,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        esc(label)
    );
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="#333"/><line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#333"/>"##,
        H - BOTTOM,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM
    );
}

/// Grouped bars: one group per category, one bar per series.
#[derive(Clone, Debug, Default)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub series: Vec<String>,
    /// (category, one value per series; `None` draws no bar).
    pub groups: Vec<(String, Vec<Option<f64>>)>,
    /// Fixed y range; default 0 ..= the largest value (+10%).
    pub y_range: Option<(f64, f64)>,
    /// Horizontal reference lines (value, label), e.g. a goal.
    pub references: Vec<(f64, String)>,
    /// Print each bar's value above it with this many decimals.
    pub value_decimals: Option<usize>,
    /// Optional whiskers (low, high) per group and series, e.g. the range over rounds.
    pub ranges: Vec<Vec<Option<(f64, f64)>>>,
}

pub fn bar_chart(c: &BarChart) -> String {
    let mut out = String::new();
    header(&mut out, &c.title);
    let max = c
        .groups
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .chain(c.references.iter().map(|r| r.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let (lo, hi) = c
        .y_range
        .unwrap_or((0.0, if max > 0.0 { max * 1.1 } else { 1.0 }));
    y_axis(&mut out, lo, hi, &c.y_label);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let y_of = |v: f64| TOP + plot_h * (1.0 - ((v.clamp(lo, hi) - lo) / (hi - lo)));
    let n_groups = c.groups.len().max(1) as f64;
    let group_w = plot_w / n_groups;
    let n_series = c.series.len().max(1) as f64;
    let bar_w = (group_w * 0.8 / n_series).min(60.0);
    for (gi, (cat, values)) in c.groups.iter().enumerate() {
        let gx = LEFT + group_w * gi as f64;
        let start = gx + (group_w - bar_w * n_series) / 2.0;
        for (si, v) in values.iter().enumerate() {
            let Some(v) = v.filter(|v| v.is_finite()) else {
                continue;
            };
            let x = start + bar_w * si as f64;
            let y = y_of(v);
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                (bar_w - 2.0).max(1.0),
                (y_of(lo) - y).max(0.0),
                colour(si),
                esc(c.series.get(si).map_or("", String::as_str)),
                v
            );
            if let Some(Some((a, b))) = c.ranges.get(gi).and_then(|r| r.get(si)) {
                let cx = x + bar_w / 2.0 - 1.0;
                let (ya, yb) = (y_of(*a), y_of(*b));
                let _ = write!(
                    out,
                    r##"<line x1="{cx:.1}" y1="{ya:.1}" x2="{cx:.1}" y2="{yb:.1}" stroke="#333"/><line x1="{:.1}" y1="{ya:.1}" x2="{:.1}" y2="{ya:.1}" stroke="#333"/><line x1="{:.1}" y1="{yb:.1}" x2="{:.1}" y2="{yb:.1}" stroke="#333"/>"##,
                    cx - 5.0,
                    cx + 5.0,
                    cx - 5.0,
                    cx + 5.0
                );
            }
            if let Some(d) = c.value_decimals {
                let _ = write!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.d$}</text>"#,
                    x + bar_w / 2.0 + if c.ranges.is_empty() { -1.0 } else { 14.0 },
                    y - 3.0,
                );
            }
        }
        let cx = gx + group_w / 2.0;
        let cy = H - BOTTOM + 14.0;
        let _ = write!(
            out,
            r#"<text x="{cx:.1}" y="{cy:.1}" text-anchor="end" transform="rotate(-20 {cx:.1} {cy:.1})">{}</text>"#,
            esc(cat)
        );
    }
    for (v, label) in &c.references {
        let y = y_of(*v);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#C00" stroke-dasharray="6,4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#C00">{}</text>"##,
            W - RIGHT,
            W - RIGHT - 4.0,
            y - 4.0,
            esc(label)
        );
    }
    if c.series.len() > 1 {
        legend(&mut out, &c.series);
    }
    out.push_str("</svg>\n");
    out
}

/// One line of a [`LineChart`].
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Log10 x axis (points with x <= 0 are left out).
    pub log_x: bool,
    /// Fixed y range; default from the data.
    pub y_range: Option<(f64, f64)>,
    /// Vertical reference lines (x, label), e.g. a workload switch.
    pub x_marks: Vec<(f64, String)>,
    /// Horizontal reference lines (y, label).
    pub y_marks: Vec<(f64, String)>,
}

/// Tick positions of a log axis: the powers of ten in `[lo, hi]` (at least two values).
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    (a..=b.max(a + 1)).map(|e| 10f64.powi(e)).collect()
}

pub fn line_chart(c: &LineChart) -> String {
    let mut out = String::new();
    header(&mut out, &c.title);
    let tx = |x: f64| if c.log_x { x.log10() } else { x };
    let pts: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!c.log_x || *x > 0.0))
        .collect();
    let (mut x_lo, mut x_hi) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    if !x_lo.is_finite() {
        (x_lo, x_hi) = if c.log_x { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    let x_ticks = if c.log_x {
        let t = log_ticks(x_lo, x_hi);
        (x_lo, x_hi) = (t[0], t[t.len() - 1]);
        t
    } else {
        if x_hi <= x_lo {
            x_hi = x_lo + 1.0;
        }
        nice_ticks(x_lo, x_hi, 6)
    };
    let (y_lo, y_hi) = c.y_range.unwrap_or_else(|| {
        let (a, b) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        if a.is_finite() && b > a {
            (a.min(0.0), b * 1.05)
        } else {
            (0.0, 1.0)
        }
    });
    y_axis(&mut out, y_lo, y_hi, &c.y_label);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let (ax, bx) = (tx(x_lo), tx(x_hi));
    let x_of = |x: f64| LEFT + plot_w * (tx(x) - ax) / (bx - ax);
    let y_of = |y: f64| TOP + plot_h * (1.0 - (y.clamp(y_lo, y_hi) - y_lo) / (y_hi - y_lo));
    for t in &x_ticks {
        let x = x_of(*t);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16.0,
            esc(&c.x_tick_label(*t))
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        H - BOTTOM + 36.0,
        esc(&c.x_label)
    );
    for (x, label) in &c.x_marks {
        let px = x_of(*x);
        let _ = write!(
            out,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{}" stroke="#C00" stroke-dasharray="6,4"/><text x="{:.1}" y="{}" fill="#C00">{}</text>"##,
            H - BOTTOM,
            px + 4.0,
            TOP + 12.0,
            esc(label)
        );
    }
    for (y, label) in &c.y_marks {
        let py = y_of(*y);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#C00" stroke-dasharray="6,4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#C00">{}</text>"##,
            W - RIGHT,
            W - RIGHT - 4.0,
            py - 4.0,
            esc(label)
        );
    }
    for (i, s) in c.series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!c.log_x || *x > 0.0))
            .map(|(x, y)| format!("{:.1},{:.1}", x_of(*x), y_of(*y)))
            .collect();
        if path.is_empty() {
            continue;
        }
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            colour(i),
            path.join(" "),
            esc(&s.name)
        );
    }
    let names: Vec<String> = c.series.iter().map(|s| s.name.clone()).collect();
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

impl LineChart {
    fn x_tick_label(&self, t: f64) -> String {
        if self.log_x {
            human_ns(t)
        } else {
            short_num(t)
        }
    }
}

/// Nanoseconds as a short duration: 500ns, 20µs, 3ms, 1s.
pub fn human_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{}s", trim(ns / 1e9))
    } else if ns >= 1e6 {
        format!("{}ms", trim(ns / 1e6))
    } else if ns >= 1e3 {
        format!("{}µs", trim(ns / 1e3))
    } else {
        format!("{}ns", trim(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every opened element is closed, in order (a small XML well-formedness check).
    fn well_formed(svg: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            rest = &rest[i + 1..];
            let end = rest.find('>').expect("unclosed tag");
            let tag = &rest[..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap().to_owned());
            }
        }
        stack.is_empty()
    }

    #[test]
    fn escaping() {
        assert_eq!(
            esc(r#"a<b & "c" 'd'>"#),
            "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt;"
        );
    }

    #[test]
    fn ticks_are_round_and_cover() {
        assert_eq!(nice_ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(nice_ticks(0.0, 100.0, 4), vec![0.0, 50.0, 100.0]);
        assert_eq!(nice_ticks(0.0, 137.0, 5), vec![0.0, 50.0, 100.0]);
        assert_eq!(nice_ticks(0.5, 1.0, 5), vec![0.5, 0.6, 0.7, 0.8, 0.9, 1.0]);
        assert_eq!(nice_ticks(1.0, 1.0, 5), vec![1.0]);
        assert_eq!(log_ticks(300.0, 2e6), vec![100.0, 1e3, 1e4, 1e5, 1e6, 1e7]);
        assert_eq!(log_ticks(1000.0, 1000.0), vec![1000.0, 1e4]);
    }

    #[test]
    fn number_labels() {
        assert_eq!(short_num(0.25), "0.25");
        assert_eq!(short_num(12.0), "12");
        assert_eq!(short_num(15000.0), "15k");
        assert_eq!(short_num(2_500_000.0), "2.5M");
        assert_eq!(human_ns(500.0), "500ns");
        assert_eq!(human_ns(20_000.0), "20µs");
        assert_eq!(human_ns(3e6), "3ms");
        assert_eq!(human_ns(1e9), "1s");
    }

    #[test]
    fn bar_chart_draws_each_bar_and_the_goal() {
        let c = BarChart {
            title: "IOPS <ratio>".into(),
            y_label: "ratio".into(),
            series: vec!["a".into(), "b".into()],
            groups: vec![
                ("one".into(), vec![Some(0.5), Some(1.0)]),
                ("two".into(), vec![None, Some(0.25)]),
            ],
            y_range: Some((0.0, 1.2)),
            references: vec![(0.95, "goal".into())],
            value_decimals: Some(2),
            ranges: vec![vec![Some((0.4, 0.6)), None]],
        };
        let svg = bar_chart(&c);
        assert!(svg.starts_with("<svg"));
        assert!(well_formed(&svg), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 3 + 2); // 3 bars + 2 legend swatches
        assert!(svg.contains("IOPS &lt;ratio&gt;"));
        assert!(svg.contains("goal"));
        assert!(svg.contains(">0.25<"));
        assert_eq!(
            svg.matches("<line").count()
                - bar_chart(&BarChart {
                    ranges: Vec::new(),
                    ..c.clone()
                })
                .matches("<line")
                .count(),
            3
        );
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn line_chart_log_axis() {
        let c = LineChart {
            title: "CDF".into(),
            x_label: "insert→issue".into(),
            y_label: "fraction".into(),
            series: vec![
                Series {
                    name: "w1".into(),
                    points: vec![(0.0, 0.0), (1e3, 0.1), (1e5, 0.5), (1e7, 1.0)],
                },
                Series {
                    name: "empty".into(),
                    points: vec![],
                },
            ],
            log_x: true,
            y_range: Some((0.0, 1.0)),
            x_marks: vec![(1e6, "deadline".into())],
            y_marks: vec![],
        };
        let svg = line_chart(&c);
        assert!(well_formed(&svg), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 1);
        // The x = 0 point is left out of a log axis.
        let pts = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(pts.split(' ').count(), 3);
        assert!(svg.contains(">1ms<") && svg.contains(">10ms<"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn empty_charts_are_still_valid() {
        assert!(well_formed(&bar_chart(&BarChart::default())));
        assert!(well_formed(&line_chart(&LineChart::default())));
        assert!(!line_chart(&LineChart::default()).contains("NaN"));
    }
}
