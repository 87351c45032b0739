//! The trace file format (CSV) of [`RequestRecord`]s: written by `kml-agent record`,
//! read by the learning code. One definition of the columns, here.
//!
//! Reading goes by header names, so columns may be reordered or added; every column
//! in [`COLUMNS`] must be present but those in [`OPTIONAL_COLUMNS`] (added later:
//! a trace written before them reads them as 0, "unknown").

extern crate std;

use std::{fmt, io, string::String, vec::Vec};

use crate::{
    op::{ReqFlags, ReqOp},
    position::LANES,
    record::{Known, RequestRecord, Verdict},
};

/// Columns in the order `record` writes them.
pub const COLUMNS: &[&str] = &[
    "dev",
    "sector",
    "nr_sectors",
    "op",
    "flags",
    "ioprio",
    "pid",
    "insert_ns",
    "issue_ns",
    "complete_ns",
    "deadline_ns",
    "error",
    "inflight",
    "inflight_read",
    "inflight_write",
    "queued",
    "queued_read",
    "queued_write",
    "since_last_insert_ns",
    "issue_distance",
    "dir_wait_ewma_ns",
    "issue_gap_ewma_ns",
    "requeues",
    "verdict",
    "score",
    "model_version",
    "insert_jiffies",
    "issue_jiffies",
    "fifo_time",
    "complete_bytes",
    "head_age_log",
    "older_half",
    "expired",
    "due_below",
    "below_age_log",
    "recent",
    "lead_log",
    "due_count",
    "bucket_shift",
    "miss_share_read",
    "miss_share_write",
    "tick_phase",
];

/// Index in [`COLUMNS`] of the first position lane (`Feature::POSITION` order, named
/// as the features).
const POSITION_AT: usize = 30;
/// Index in [`COLUMNS`] of the device's position bucket width (empty: not known).
const BUCKET_SHIFT_AT: usize = POSITION_AT + LANES;
const _: () = assert!(matches!(
    COLUMNS[BUCKET_SHIFT_AT].as_bytes(),
    b"bucket_shift"
));
/// Index in [`COLUMNS`] of the read and write miss shares at insert (empty: not
/// known, and the host replays them).
const MISS_SHARE_AT: usize = BUCKET_SHIFT_AT + 1;
const _: () = assert!(matches!(
    COLUMNS[MISS_SHARE_AT].as_bytes(),
    b"miss_share_read"
));
/// Index in [`COLUMNS`] of the insert's phase in its jiffy (empty: not known).
const TICK_PHASE_AT: usize = MISS_SHARE_AT + 2;
const _: () = assert!(matches!(COLUMNS[TICK_PHASE_AT].as_bytes(), b"tick_phase"));

/// Columns a trace may lack (read as 0): the scheduler's deadline in jiffies and
/// the jiffies it is compared with, added with the label of [`crate::label`]; the
/// bytes at completion; the position at insert (empty in a row, or absent: not
/// known, and the host replays it); the device's position bucket width (empty or
/// absent: the replay derives one from the sectors in the trace); the miss shares
/// at insert (empty or absent: the host replays them); the insert's phase in its
/// jiffy (empty or absent: not known, the feature reads 0).
pub const OPTIONAL_COLUMNS: &[&str] = COLUMNS.split_at(OPTIONAL_AT).1;

/// Index in [`COLUMNS`] of the first optional column (they are the last ones).
const OPTIONAL_AT: usize = 26;
const _: () = assert!(matches!(COLUMNS[OPTIONAL_AT].as_bytes(), b"insert_jiffies"));

/// Position of an optional column absent from the header.
const ABSENT: usize = usize::MAX;

const FLAG_NAMES: &[(u8, &str)] = &[
    (ReqFlags::SYNC, "sync"),
    (ReqFlags::META, "meta"),
    (ReqFlags::FUA, "fua"),
    (ReqFlags::PREFLUSH, "preflush"),
    (ReqFlags::RAHEAD, "rahead"),
];

fn verdict_text(v: u8) -> &'static str {
    match v {
        Verdict::MEETS => "meets",
        Verdict::AT_RISK => "at_risk",
        _ => "none",
    }
}

fn parse_verdict(s: &str) -> Option<u8> {
    match s {
        "none" => Some(Verdict::NONE),
        "meets" => Some(Verdict::MEETS),
        "at_risk" => Some(Verdict::AT_RISK),
        _ => None,
    }
}

/// The header line (no newline).
pub fn header() -> String {
    COLUMNS.join(",")
}

fn flags_text(flags: u8) -> String {
    let mut out = String::new();
    for (bit, name) in FLAG_NAMES {
        if flags & bit != 0 {
            if !out.is_empty() {
                out.push('+');
            }
            out.push_str(name);
        }
    }
    out
}

fn parse_flags(s: &str) -> Option<u8> {
    let mut flags = 0u8;
    for part in s.split('+').filter(|p| !p.is_empty()) {
        let (bit, _) = FLAG_NAMES.iter().find(|(_, n)| *n == part)?;
        flags |= bit;
    }
    Some(flags)
}

/// Writes one record as a CSV line (with newline), columns as in [`COLUMNS`].
pub fn write_row(w: &mut impl io::Write, r: &RequestRecord) -> io::Result<()> {
    let (major, minor) = crate::kernel_dev_split(r.dev);
    write!(
        w,
        "{major}:{minor},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.sector,
        r.nr_sectors,
        r.op().name(),
        flags_text(r.flags),
        r.ioprio,
        r.pid,
        r.insert_ns,
        r.issue_ns,
        r.complete_ns,
        r.deadline_ns,
        r.error,
        r.inflight(),
        r.inflight_read,
        r.inflight_write,
        r.queued(),
        r.queued_read,
        r.queued_write,
        r.since_last_insert_ns,
        r.issue_distance,
        r.dir_wait_ewma_ns,
        r.issue_gap_ewma_ns,
        r.requeues,
        verdict_text(r.verdict),
        r.score,
        r.model_version,
        r.insert_jiffies,
        r.issue_jiffies,
        r.fifo_time,
        r.complete_bytes,
    )?;
    match r.recorded_position() {
        Some(_) => {
            for v in r.position {
                write!(w, ",{v}")?;
            }
        }
        None => write!(w, ",,,,,,,,")?,
    }
    if r.known & Known::BUCKET_SHIFT != 0 {
        write!(w, ",{}", r.bucket_shift)?;
    } else {
        write!(w, ",")?;
    }
    if r.known & Known::MISS_SHARE != 0 {
        write!(w, ",{},{}", r.miss_share_read, r.miss_share_write)?;
    } else {
        write!(w, ",,")?;
    }
    if r.known & Known::TICK_PHASE != 0 {
        write!(w, ",{}", r.tick_phase)?;
    } else {
        write!(w, ",")?;
    }
    writeln!(w)
}

/// Why a trace line could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceError {
    MissingColumn(&'static str),
    WrongFieldCount {
        line: usize,
        expected: usize,
        found: usize,
    },
    BadValue {
        line: usize,
        column: &'static str,
        value: String,
    },
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceError::MissingColumn(c) => write!(f, "trace header has no column `{c}`"),
            TraceError::WrongFieldCount {
                line,
                expected,
                found,
            } => {
                write!(
                    f,
                    "trace line {line}: {found} fields, header has {expected}"
                )
            }
            TraceError::BadValue {
                line,
                column,
                value,
            } => {
                write!(
                    f,
                    "trace line {line}: column `{column}`: cannot read {value:?}"
                )
            }
        }
    }
}

impl std::error::Error for TraceError {}

/// Reads rows given the header line: maps each of [`COLUMNS`] to its position.
pub struct RowReader {
    index: [usize; COLUMNS.len()],
    width: usize,
}

impl RowReader {
    pub fn new(header_line: &str) -> Result<Self, TraceError> {
        let names: Vec<&str> = header_line.trim_end().split(',').map(str::trim).collect();
        let mut index = [0usize; COLUMNS.len()];
        for (slot, col) in index.iter_mut().zip(COLUMNS) {
            *slot = match names.iter().position(|n| n == col) {
                Some(i) => i,
                None if OPTIONAL_COLUMNS.contains(col) => ABSENT,
                None => return Err(TraceError::MissingColumn(col)),
            };
        }
        Ok(RowReader {
            index,
            width: names.len(),
        })
    }

    /// Parses one data line; `line` (1-based, header is 1) is used in errors.
    pub fn parse(&self, text: &str, line: usize) -> Result<RequestRecord, TraceError> {
        let fields: Vec<&str> = text.trim_end().split(',').collect();
        if fields.len() != self.width {
            return Err(TraceError::WrongFieldCount {
                line,
                expected: self.width,
                found: fields.len(),
            });
        }
        let get = |i: usize| match self.index[i] {
            ABSENT => "0",
            at => fields[at].trim(),
        };
        let bad = |i: usize| TraceError::BadValue {
            line,
            column: COLUMNS[i],
            value: get(i).into(),
        };
        macro_rules! num {
            ($i:expr) => {
                get($i).parse().map_err(|_| bad($i))?
            };
        }
        let dev = {
            let (maj, min) = get(0).split_once(':').ok_or_else(|| bad(0))?;
            let major: u32 = maj.parse().map_err(|_| bad(0))?;
            let minor: u32 = min.parse().map_err(|_| bad(0))?;
            crate::kernel_dev(major, minor)
        };
        let op = ReqOp::from_name(get(3)).ok_or_else(|| bad(3))? as u8;
        let flags = parse_flags(get(4)).ok_or_else(|| bad(4))?;
        let r = RequestRecord {
            dev,
            sector: num!(1),
            nr_sectors: num!(2),
            op,
            flags,
            ioprio: num!(5),
            pid: num!(6),
            insert_ns: num!(7),
            issue_ns: num!(8),
            complete_ns: num!(9),
            deadline_ns: num!(10),
            error: num!(11),
            inflight_read: num!(13),
            inflight_write: num!(14),
            queued_read: num!(16),
            queued_write: num!(17),
            since_last_insert_ns: num!(18),
            issue_distance: num!(19),
            dir_wait_ewma_ns: num!(20),
            issue_gap_ewma_ns: num!(21),
            requeues: num!(22),
            verdict: parse_verdict(get(23)).ok_or_else(|| bad(23))?,
            score: num!(24),
            model_version: num!(25),
            sampling: 0,
            insert_jiffies: num!(26),
            issue_jiffies: num!(27),
            fifo_time: num!(28),
            complete_bytes: num!(29),
            ..RequestRecord::default()
        };
        let mut r = r;
        // The position lanes: all there (known) or none (empty or absent columns).
        // An optional column's text: empty when absent from the header.
        let optional = |i: usize| match self.index[i] {
            ABSENT => "",
            at => fields[at].trim(),
        };
        let lanes: Vec<&str> = (POSITION_AT..POSITION_AT + LANES).map(optional).collect();
        if lanes.iter().all(|v| !v.is_empty()) {
            for (k, lane) in r.position.iter_mut().enumerate() {
                *lane = num!(POSITION_AT + k);
            }
            r.known |= Known::POSITION;
        } else if lanes.iter().any(|v| !v.is_empty()) {
            let k = lanes.iter().position(|v| v.is_empty()).unwrap_or(0);
            return Err(bad(POSITION_AT + k));
        }
        if !optional(BUCKET_SHIFT_AT).is_empty() {
            r.bucket_shift = num!(BUCKET_SHIFT_AT);
            r.known |= Known::BUCKET_SHIFT;
        }
        // Both shares or neither.
        let shares = [MISS_SHARE_AT, MISS_SHARE_AT + 1].map(optional);
        match shares.map(str::is_empty) {
            [false, false] => {
                r.miss_share_read = num!(MISS_SHARE_AT);
                r.miss_share_write = num!(MISS_SHARE_AT + 1);
                r.known |= Known::MISS_SHARE;
            }
            [true, true] => {}
            [false, true] => return Err(bad(MISS_SHARE_AT + 1)),
            [true, false] => return Err(bad(MISS_SHARE_AT)),
        }
        if !optional(TICK_PHASE_AT).is_empty() {
            r.tick_phase = num!(TICK_PHASE_AT);
            r.known |= Known::TICK_PHASE;
        }
        let inflight: u32 = num!(12);
        if inflight != r.inflight() {
            return Err(bad(12));
        }
        let queued: u32 = num!(15);
        if queued != r.queued() {
            return Err(bad(15));
        }
        Ok(r)
    }
}

/// Reads a whole trace from a buffered reader.
pub fn read_all(
    r: impl io::BufRead,
) -> Result<Vec<RequestRecord>, std::boxed::Box<dyn std::error::Error + Send + Sync>> {
    let mut lines = r.lines();
    let header = lines.next().ok_or("empty trace: no header line")??;
    let reader = RowReader::new(&header)?;
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(reader.parse(&line, i + 2)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn sample() -> RequestRecord {
        RequestRecord {
            sector: 123_456,
            insert_ns: 1_000,
            issue_ns: 2_000,
            complete_ns: 9_000,
            deadline_ns: 501_000,
            since_last_insert_ns: 77,
            issue_distance: 8,
            dev: crate::kernel_dev(7, 3),
            nr_sectors: 8,
            pid: 4242,
            error: -5,
            inflight_read: 3,
            inflight_write: 4,
            queued_read: 2,
            queued_write: 5,
            dir_wait_ewma_ns: 12_345,
            issue_gap_ewma_ns: 678,
            verdict: Verdict::AT_RISK,
            score: -42,
            model_version: 3,
            requeues: 1,
            ioprio: 4 << 13,
            op: ReqOp::Write as u8,
            flags: ReqFlags::SYNC | ReqFlags::FUA,
            sampling: 0,
            complete_bytes: 4096,
            insert_jiffies: 4_295_000_000,
            issue_jiffies: 4_295_000_126,
            fifo_time: 4_295_000_125,
            position: [300, 2, 1, 255, 280, 4, 512, 0],
            known: Known::POSITION | Known::BUCKET_SHIFT | Known::MISS_SHARE | Known::TICK_PHASE,
            bucket_shift: 13,
            miss_share_read: 1234,
            miss_share_write: 32768,
            tick_phase: 2900,
        }
    }

    #[test]
    fn row_round_trips() {
        let mut buf = Vec::new();
        std::writeln!(buf, "{}", header()).unwrap();
        write_row(&mut buf, &sample()).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("7:3,123456,8,write,sync+fua,"), "{text}");
        let back = read_all(text.as_bytes()).unwrap();
        assert_eq!(back, std::vec![sample()]);
    }

    #[test]
    fn traces_without_the_jiffies_columns_still_read() {
        let old: Vec<&str> = COLUMNS
            .iter()
            .copied()
            .filter(|c| !OPTIONAL_COLUMNS.contains(c))
            .collect();
        let mut row = Vec::new();
        write_row(&mut row, &sample()).unwrap();
        let text = String::from_utf8(row).unwrap();
        let fields: Vec<&str> = text.trim_end().split(',').collect();
        let old_row = fields[..old.len()].join(",");
        let back = RowReader::new(&old.join(","))
            .unwrap()
            .parse(&old_row, 2)
            .unwrap();
        let mut want = sample();
        want.insert_jiffies = 0;
        want.issue_jiffies = 0;
        want.fifo_time = 0;
        want.complete_bytes = 0;
        want.position = [0; LANES];
        want.known = 0;
        want.bucket_shift = 0;
        want.miss_share_read = 0;
        want.miss_share_write = 0;
        want.tick_phase = 0;
        assert_eq!(back, want);
        // Without jiffies the label is the ns estimate.
        assert_eq!(back.deadline_missed(), back.deadline_missed_ns());
        // The sample was dispatched one jiffy after its fifo_time.
        assert!(sample().deadline_missed() && !sample().deadline_missed_ns());
    }

    #[test]
    fn position_lanes_are_named_as_the_features_and_optional_per_row() {
        for (i, f) in crate::features::Feature::POSITION.iter().enumerate() {
            assert_eq!(COLUMNS[POSITION_AT + i], f.name());
            assert!(OPTIONAL_COLUMNS.contains(&f.name()));
        }
        // A row without a known position writes empty lanes and reads back unknown.
        let mut r = sample();
        r.known = 0;
        r.position = [0; LANES];
        r.bucket_shift = 0;
        (r.miss_share_read, r.miss_share_write) = (0, 0);
        r.tick_phase = 0;
        let mut buf = Vec::new();
        std::writeln!(buf, "{}", header()).unwrap();
        write_row(&mut buf, &r).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.trim_end().ends_with(",,,,,,,,,,,,"), "{text}");
        assert_eq!(read_all(text.as_bytes()).unwrap(), std::vec![r]);
        // Half the lanes: an error naming the first empty one.
        let (reader, row) = sample_row();
        // (the last two lanes, the bucket width, the miss shares and the tick
        // phase emptied)
        let cut = String::from(row.rsplitn(7, ',').nth(6).unwrap()) + ",,,,,,";
        let err = reader.parse(&cut, 2).unwrap_err();
        assert!(std::format!("{err}").contains("lead_log"), "{err}");
    }

    /// A reader of the full header and the sample's row (no newline).
    fn sample_row() -> (RowReader, String) {
        let mut row = Vec::new();
        write_row(&mut row, &sample()).unwrap();
        let row = String::from_utf8(row).unwrap().trim_end().into();
        (RowReader::new(&header()).unwrap(), row)
    }

    #[test]
    fn miss_shares_are_both_known_or_both_replayed() {
        let (reader, row) = sample_row();
        let row = row.as_str();
        assert!(row.ends_with(",1234,32768,2900"), "{row}");
        // (the tick phase after them kept)
        let (row, phase) = row.rsplit_once(',').unwrap();
        // Neither: not known, read as 0.
        let none = std::format!("{},,,{phase}", row.rsplitn(3, ',').nth(2).unwrap());
        let r = reader.parse(&none, 2).unwrap();
        assert_eq!(r.known & Known::MISS_SHARE, 0);
        assert_eq!((r.miss_share_read, r.miss_share_write), (0, 0));
        assert_eq!(r.tick_phase, 2900);
        // One of the two: an error naming the empty one.
        let half = std::format!("{},,{phase}", row.rsplit_once(',').unwrap().0);
        let err = reader.parse(&half, 2).unwrap_err();
        assert!(std::format!("{err}").contains("miss_share_write"), "{err}");
    }

    #[test]
    fn the_tick_phase_is_known_or_empty() {
        let (reader, row) = sample_row();
        let r = reader.parse(&row, 2).unwrap();
        assert_eq!(
            (r.tick_phase, r.known & Known::TICK_PHASE),
            (2900, Known::TICK_PHASE)
        );
        let empty = String::from(row.rsplit_once(',').unwrap().0) + ",";
        let r = reader.parse(&empty, 2).unwrap();
        assert_eq!((r.tick_phase, r.known & Known::TICK_PHASE), (0, 0));
    }

    #[test]
    fn columns_by_name_and_clear_errors() {
        // Reordered and extra columns are fine.
        let mut cols: Vec<&str> = COLUMNS.to_vec();
        cols.reverse();
        cols.push("extra");
        let reader = RowReader::new(&cols.join(",")).unwrap();
        let mut row = Vec::new();
        write_row(&mut row, &sample()).unwrap();
        let text = String::from_utf8(row).unwrap();
        let mut fields: Vec<&str> = text.trim_end().split(',').collect();
        fields.reverse();
        fields.push("x");
        assert_eq!(reader.parse(&fields.join(","), 2).unwrap(), sample());

        assert_eq!(
            RowReader::new("dev,sector").err(),
            Some(TraceError::MissingColumn("nr_sectors"))
        );
        let reader = RowReader::new(&header()).unwrap();
        let err = reader.parse(&text.replace("write", "wrte"), 5).unwrap_err();
        assert_eq!(
            std::format!("{err}"),
            "trace line 5: column `op`: cannot read \"wrte\""
        );
        assert!(matches!(
            reader.parse("1,2", 3),
            Err(TraceError::WrongFieldCount { line: 3, .. })
        ));
    }
}
