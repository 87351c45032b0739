//! Datasets from traces: requests in insert-time order, their features (exactly what
//! the kernel computes at insert) and their labels.
//!
//! Splits are by time only: the first part of a trace trains, a later part tests,
//! never shuffled across time, so an evaluation measures how a model does on I/O
//! that came after what it learned from.

use std::{collections::BTreeMap, fs::File, io::BufReader, path::Path};

use kml_ebpf_common::{
    features::{features_with_position, Feature, FeatureVector, TIME_SHIFT},
    op::Direction,
    position::PositionFeatures,
    record::Known,
    trace, RequestRecord,
};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::error::{LearnError, Result};

/// Requests usable for learning, sorted by insert time.
#[derive(Clone, Debug)]
pub struct Dataset {
    records: Vec<RequestRecord>,
    features: Vec<FeatureVector>,
    /// Where the records came from (a trace path, or a description).
    source: String,
    /// Which part of the source this is, e.g. "records 0..7000 of 10000 by insert time".
    window: String,
    /// Records of the source left out (no deadline known, or never dispatched).
    skipped: usize,
    /// Time covered, ns: last insert minus first, summed over the parts of a union.
    span_ns: u64,
}

/// Last insert minus first of records in insert-time order.
fn span_of(records: &[RequestRecord]) -> u64 {
    match (records.first(), records.last()) {
        (Some(a), Some(b)) => b.insert_ns.saturating_sub(a.insert_ns),
        _ => 0,
    }
}

/// The regression target: time from insert until mq-deadline dispatched the request,
/// in "µs" (1024 ns). Dispatch is the issue event, or completion for a request never
/// seen issued: the same convention as [`RequestRecord::deadline_missed`].
pub fn dispatch_delay_us(r: &RequestRecord) -> f64 {
    let dispatched = if r.issue_ns != 0 {
        r.issue_ns
    } else {
        r.complete_ns
    };
    dispatched.saturating_sub(r.insert_ns) as f64 / (1u64 << TIME_SHIFT) as f64
}

/// A record can be learned from when its deadline is known and it was dispatched.
fn usable(r: &RequestRecord) -> bool {
    r.deadline_ns > r.insert_ns && (r.issue_ns != 0 || r.complete_ns != 0)
}

/// A feature the host can neither read from every trace nor replay: the
/// [`Known`] bit of a record that carries what it is computed from, and since
/// when observers record it. The tick phase needs the inserting CPU's clock;
/// positions and miss shares are replayed when a trace lacks them.
fn unreplayable(feature: Feature) -> Option<(u8, &'static str)> {
    match feature {
        Feature::TickPhaseUs => Some((
            Known::TICK_PHASE,
            "the insert's phase in its jiffy is recorded since 2026-12-05",
        )),
        _ => None,
    }
}

impl Dataset {
    /// Builds a dataset from records in any order (a trace is in completion order).
    /// The position features are those the kernel recorded, else replayed from the
    /// records themselves ([`crate::replay`]): every record, usable or not, takes
    /// its place in the queue.
    pub fn from_records(mut records: Vec<RequestRecord>, source: impl Into<String>) -> Self {
        let positions = crate::replay::replay_positions(&records, &Default::default());
        // The miss shares the kernel recorded, else replayed (like positions).
        if records.iter().any(|r| r.known & Known::MISS_SHARE == 0) {
            let shares = crate::replay::replay_miss_shares(&records);
            for (r, (read, write)) in records.iter_mut().zip(shares) {
                if r.known & Known::MISS_SHARE == 0 {
                    (r.miss_share_read, r.miss_share_write) = (read, write);
                }
            }
        }
        let before = records.len();
        // The position the kernel recorded wins over the replay (the replay cannot
        // see requests queued before the trace began, nor races).
        let features_of = |r: &RequestRecord, p: PositionFeatures| {
            features_with_position(r, &r.recorded_position().unwrap_or(p))
        };
        let (records, features) = if records.is_sorted_by_key(|r| r.insert_ns) {
            // Already in insert order (the online window, sorted before training):
            // filtered in place, without a sorted copy of every record.
            let mut features = Vec::with_capacity(records.len());
            let mut positions = positions.into_iter();
            records.retain(|r| {
                let p = positions.next().unwrap_or(PositionFeatures::UNKNOWN);
                let keep = usable(r);
                if keep {
                    features.push(features_of(r, p));
                }
                keep
            });
            (records, features)
        } else {
            let mut pairs: Vec<(RequestRecord, FeatureVector)> = records
                .into_iter()
                .zip(positions)
                .filter(|(r, _)| usable(r))
                .map(|(r, p)| (r, features_of(&r, p)))
                .collect();
            // Stable: records inserted in the same ns keep their trace order.
            pairs.sort_by_key(|(r, _)| r.insert_ns);
            pairs.into_iter().unzip()
        };
        let skipped = before - records.len();
        let window = format!("all {} records by insert time", records.len());
        let span_ns = span_of(&records);
        Dataset {
            records,
            features,
            source: source.into(),
            window,
            skipped,
            span_ns,
        }
    }

    /// Reads a CSV trace written by `kml-agent record`.
    pub fn from_trace_file(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|error| LearnError::Io {
            path: path.into(),
            error,
        })?;
        let records = trace::read_all(BufReader::with_capacity(1 << 20, file)).map_err(|e| {
            LearnError::Trace {
                path: path.into(),
                message: e.to_string(),
            }
        })?;
        Ok(Self::from_records(records, path.display().to_string()))
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn window(&self) -> &str {
        &self.window
    }

    /// Records whose observer did not record what `feature` is computed from (a
    /// feature the host can neither read nor replay: the insert's phase in its
    /// jiffy); 0 for every feature the host records or replays.
    pub fn records_without(&self, feature: Feature) -> usize {
        match unreplayable(feature) {
            Some((bit, _)) => self.records.iter().filter(|r| r.known & bit == 0).count(),
            None => 0,
        }
    }

    /// Fails when a record lacks what one of `features` is computed from (its lane
    /// would read 0 there: a model would learn or be judged on a value the kernel
    /// never gives).
    pub fn check_carries(&self, features: &[Feature]) -> Result<()> {
        for &f in features {
            let Some((_, why)) = unreplayable(f) else {
                continue;
            };
            let missing = self.records_without(f);
            if missing > 0 {
                return Err(LearnError::FeatureNotRecorded {
                    source_name: self.source.clone(),
                    feature: f.name(),
                    why,
                    missing,
                    records: self.len(),
                });
            }
        }
        Ok(())
    }

    pub fn records(&self) -> &[RequestRecord] {
        &self.records
    }

    /// Feature vectors, as the kernel computes them.
    pub fn features(&self) -> &[FeatureVector] {
        &self.features
    }

    /// The same records with their feature vectors changed by `f` (offline
    /// experiments: a candidate feature written into a lane the kernel fills
    /// otherwise).
    pub fn with_features(mut self, mut f: impl FnMut(&RequestRecord, &mut FeatureVector)) -> Self {
        for (r, x) in self.records.iter().zip(self.features.iter_mut()) {
            f(r, x);
        }
        self
    }

    /// Classification labels: the request missed its deadline.
    pub fn missed(&self) -> impl ExactSizeIterator<Item = bool> + '_ {
        self.records.iter().map(RequestRecord::deadline_missed)
    }

    /// Regression targets (see [`dispatch_delay_us`]).
    pub fn delays_us(&self) -> impl ExactSizeIterator<Item = f64> + '_ {
        self.records.iter().map(dispatch_delay_us)
    }

    pub fn misses(&self) -> usize {
        self.missed().filter(|&m| m).count()
    }

    /// Fraction of requests that missed their deadline (0 for an empty set).
    pub fn miss_rate(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.misses() as f64 / self.len() as f64
        }
    }

    /// The records from fraction `from` to fraction `to` of the dataset (by count, in
    /// insert-time order). `window(0.0, 0.7)` and `window(0.7, 1.0)` partition it.
    pub fn window_fraction(&self, from: f64, to: f64) -> Dataset {
        let n = self.len();
        let at = |f: f64| ((f.clamp(0.0, 1.0) * n as f64).round() as usize).min(n);
        let (a, b) = (at(from), at(to).max(at(from)));
        Dataset {
            span_ns: span_of(&self.records[a..b]),
            records: self.records[a..b].to_vec(),
            features: self.features[a..b].to_vec(),
            source: self.source.clone(),
            window: format!("records {a}..{b} of {n} by insert time"),
            skipped: self.skipped,
        }
    }

    /// Splits at `train_fraction`: (earlier part, later part).
    pub fn split_by_time(&self, train_fraction: f64) -> (Dataset, Dataset) {
        (
            self.window_fraction(0.0, train_fraction),
            self.window_fraction(train_fraction, 1.0),
        )
    }

    /// Several datasets end to end (each keeps its own insert-time order): a union
    /// of windows of different traces to train or test on.
    pub fn concat(parts: &[Dataset]) -> Dataset {
        let mut records = Vec::with_capacity(parts.iter().map(Dataset::len).sum());
        let mut features = Vec::with_capacity(records.capacity());
        for p in parts {
            records.extend_from_slice(&p.records);
            features.extend_from_slice(&p.features);
        }
        let join = |f: fn(&Dataset) -> String| parts.iter().map(f).collect::<Vec<_>>().join(" + ");
        Dataset {
            records,
            features,
            source: join(|p| p.source.clone()),
            window: join(|p| p.window.clone()),
            skipped: parts.iter().map(|p| p.skipped).sum(),
            span_ns: parts.iter().map(|p| p.span_ns).sum(),
        }
    }

    /// [`Dataset::concat`] of parts it may take: one part is itself, not a copy
    /// (one trace's windows, as online training has, are never duplicated).
    pub fn join(mut parts: Vec<Dataset>) -> Dataset {
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        Dataset::concat(&parts)
    }

    /// Thins each part to within 2x of the smallest one's size (every n-th record,
    /// n its size over the smallest's, rounded down), so that in their union every
    /// part (a workload) weighs about the same instead of in proportion to its
    /// request rate. Time order and each part's coverage of its window are kept.
    pub fn thin_to_smallest(parts: &mut [Dataset]) {
        // An empty part (a trace too short for a window) weighs nothing already.
        let Some(least) = parts.iter().map(Dataset::len).filter(|&n| n > 0).min() else {
            return;
        };
        for d in parts.iter_mut() {
            let stride = d.len() / least;
            if stride > 1 {
                *d = d.every_nth(stride);
            }
        }
    }

    /// Each record `copies(record)` times, in place (0 leaves it out), time order
    /// kept: a weight where the fitters take none. Online learning while verdicts
    /// act leaves out the requests they acted on and counts each request the hook
    /// held out for all those it stands for.
    pub fn replicate(self, copies: impl Fn(&RequestRecord) -> usize) -> Dataset {
        let n: usize = self.records.iter().map(&copies).sum();
        let mut records = Vec::with_capacity(n);
        let mut features = Vec::with_capacity(n);
        for (r, x) in self.records.iter().zip(&self.features) {
            for _ in 0..copies(r) {
                records.push(*r);
                features.push(*x);
            }
        }
        Dataset {
            span_ns: span_of(&records),
            records,
            features,
            window: format!("{} (weighted: {n} rows)", self.window),
            ..self
        }
    }

    /// Every `stride`-th record (keeps time order and coverage of the whole window).
    pub fn every_nth(&self, stride: usize) -> Dataset {
        let stride = stride.max(1);
        Dataset {
            records: self.records.iter().step_by(stride).copied().collect(),
            features: self.features.iter().step_by(stride).copied().collect(),
            source: self.source.clone(),
            window: format!("{} (one in {stride})", self.window),
            skipped: self.skipped,
            span_ns: self.span_ns,
        }
    }

    /// The raw values of `columns`, one row per request, as f64.
    pub fn raw_matrix(&self, columns: &[Feature]) -> Array2<f64> {
        Array2::from_shape_fn((self.len(), columns.len()), |(i, j)| {
            self.features[i][columns[j].index()] as f64
        })
    }

    /// One feature's values.
    pub fn column(&self, f: Feature) -> Vec<i32> {
        self.features.iter().map(|x| x[f.index()]).collect()
    }

    /// What the data is, for model files and reports.
    pub fn describe(&self) -> DataDescription {
        let mut expire_ns: [BTreeMap<u64, usize>; 2] = Default::default();
        let mut devices = BTreeMap::new();
        let mut reads = 0;
        for r in &self.records {
            let dir = r.op().direction();
            if dir == Direction::Read {
                reads += 1;
            }
            *expire_ns[dir as usize]
                .entry(r.deadline_ns - r.insert_ns)
                .or_insert(0) += 1;
            let (major, minor) = kml_ebpf_common::kernel_dev_split(r.dev);
            *devices.entry(format!("{major}:{minor}")).or_insert(0usize) += 1;
        }
        // The expiry is a sysfs setting: the most common budget per direction.
        let mode_ms = |m: &BTreeMap<u64, usize>| {
            m.iter()
                .max_by_key(|(_, &count)| count)
                .map(|(&ns, _)| ns as f64 / 1e6)
        };
        let span_s = self.span_ns as f64 / 1e9;
        DataDescription {
            source: self.source.clone(),
            window: self.window.clone(),
            records: self.len(),
            skipped_records: self.skipped,
            span_s,
            miss_rate: self.miss_rate(),
            reads,
            writes: self.len() - reads,
            read_expire_ms: mode_ms(&expire_ns[Direction::Read as usize]),
            write_expire_ms: mode_ms(&expire_ns[Direction::Write as usize]),
            devices: devices.into_keys().collect(),
        }
    }
}

/// The description of a dataset kept in model files and reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataDescription {
    pub source: String,
    pub window: String,
    pub records: usize,
    pub skipped_records: usize,
    /// Insert time of the last request minus the first's, seconds.
    pub span_s: f64,
    pub miss_rate: f64,
    pub reads: usize,
    pub writes: usize,
    /// The most common deadline budget of reads / writes (mq-deadline read_expire /
    /// write_expire at the time), ms.
    pub read_expire_ms: Option<f64>,
    pub write_expire_ms: Option<f64>,
    /// Devices (`major:minor`) in the data.
    pub devices: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kml_ebpf_common::op::ReqOp;

    fn rec(insert: u64, issue: u64, expire: u64) -> RequestRecord {
        RequestRecord {
            insert_ns: insert,
            issue_ns: issue,
            complete_ns: issue + 10,
            deadline_ns: insert + expire,
            op: ReqOp::Read as u8,
            queued_read: (insert / 100) as u32,
            ..Default::default()
        }
    }

    #[test]
    fn sorted_by_insert_time_and_filtered() {
        let records = vec![
            rec(300, 400, 1000),
            rec(100, 5000, 1000), // missed
            rec(200, 250, 1000),
            RequestRecord {
                insert_ns: 50,
                deadline_ns: 0,
                ..Default::default()
            }, // no deadline
        ];
        let d = Dataset::from_records(records, "test");
        assert_eq!(d.len(), 3);
        assert_eq!(d.describe().skipped_records, 1);
        let inserts: Vec<u64> = d.records().iter().map(|r| r.insert_ns).collect();
        assert_eq!(inserts, [100, 200, 300]);
        assert_eq!(d.missed().collect::<Vec<_>>(), [true, false, false]);
        assert!((d.miss_rate() - 1.0 / 3.0).abs() < 1e-12);
        // Features stay with their record.
        assert_eq!(d.features()[0][Feature::QueuedSameDir.index()], 1);
        assert!((d.delays_us().next().unwrap() - 4900.0 / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn replicate_weighs_records_and_keeps_their_features_and_order() {
        let records: Vec<_> = (0..6).map(|i| rec(i * 100, i * 100 + 5, 1000)).collect();
        let d = Dataset::from_records(records, "test");
        let before: Vec<(u64, FeatureVector)> = d
            .records()
            .iter()
            .map(|r| r.insert_ns)
            .zip(d.features().iter().copied())
            .collect();
        // Out: 100 and 300; 400 counts three times.
        let w = d.replicate(|r| match r.insert_ns {
            100 | 300 => 0,
            400 => 3,
            _ => 1,
        });
        let inserts: Vec<u64> = w.records().iter().map(|r| r.insert_ns).collect();
        assert_eq!(inserts, [0, 200, 400, 400, 400, 500]);
        for (r, x) in w.records().iter().zip(w.features()) {
            let (_, want) = before.iter().find(|(t, _)| *t == r.insert_ns).unwrap();
            assert_eq!(x, want, "features travel with their record");
        }
        assert_eq!(w.len(), 6);
        assert!(w.window().ends_with("(weighted: 6 rows)"));
    }

    #[test]
    fn time_split_partitions_in_order() {
        let records: Vec<_> = (0..10)
            .rev()
            .map(|i| rec(i * 100, i * 100 + 5, 1000))
            .collect();
        let d = Dataset::from_records(records, "test");
        let (train, test) = d.split_by_time(0.7);
        assert_eq!((train.len(), test.len()), (7, 3));
        assert!(train.records().last().unwrap().insert_ns < test.records()[0].insert_ns);
        assert_eq!(test.window(), "records 7..10 of 10 by insert time");
        let desc = d.describe();
        assert_eq!(desc.read_expire_ms, Some(0.001));
        assert_eq!(desc.write_expire_ms, None);
        assert_eq!(d.every_nth(3).len(), 4);
    }

    #[test]
    fn thin_to_smallest_weighs_parts_alike_and_keeps_order() {
        let part = |n: u64| {
            let records: Vec<_> = (0..n).map(|i| rec(i * 100, i * 100 + 5, 1000)).collect();
            Dataset::from_records(records, "test")
        };
        let mut parts = vec![part(10), part(35), part(19), part(10)];
        Dataset::thin_to_smallest(&mut parts);
        let lens: Vec<usize> = parts.iter().map(Dataset::len).collect();
        // Strides 1, 3, 1, 1: within 2x of the smallest, none below it.
        assert_eq!(lens, [10, 12, 19, 10]);
        assert!(lens.iter().all(|&n| (10..20).contains(&n)));
        let inserts: Vec<u64> = parts[1].records().iter().map(|r| r.insert_ns).collect();
        assert_eq!(inserts[..3], [0, 300, 600], "every 3rd, first to last");
        assert_eq!(*inserts.last().unwrap(), 3300);
        // One part: nothing to weigh against. An empty one is left out of the
        // smallest (else every other part would shrink to one record).
        let mut one = vec![part(7)];
        Dataset::thin_to_smallest(&mut one);
        assert_eq!(one[0].len(), 7);
        let mut with_empty = vec![part(0), part(5)];
        Dataset::thin_to_smallest(&mut with_empty);
        assert_eq!(with_empty[1].len(), 5);
    }

    #[test]
    fn records_in_insert_order_give_the_dataset_of_any_order() {
        // Ties in insert time and unusable records among them: the in-place path
        // (sorted input) and the sorting one agree record for record.
        let mut sorted: Vec<RequestRecord> = (0..300u64)
            .map(|i| {
                let mut r = rec(i / 2 * 100, i / 2 * 100 + 40 + i % 7 * 30, 150);
                r.sector = i * 8;
                if i % 13 == 0 {
                    r.deadline_ns = 0;
                }
                r
            })
            .collect();
        sorted.sort_by_key(|r| r.insert_ns);
        let a = Dataset::from_records(sorted.clone(), "t");
        // Not sorted: every other pair swapped (ties keep their relative order).
        let mut shuffled = sorted.clone();
        for pair in shuffled.chunks_mut(4) {
            if pair.len() == 4 {
                pair.swap(0, 2);
                pair.swap(1, 3);
            }
        }
        assert!(!shuffled.is_sorted_by_key(|r| r.insert_ns));
        let b = Dataset::from_records(shuffled, "t");
        assert_eq!(a.records(), b.records());
        assert_eq!(a.features(), b.features());
        assert_eq!(a.describe().skipped_records, b.describe().skipped_records);
        assert!(a.describe().skipped_records > 0);
    }
}
