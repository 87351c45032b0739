//! Offline study of a candidate feature (issue 13; a measurement, not a test): the
//! miss rate of the requests the scheduler dispatched just before this insert.
//!
//! A request's label is known at its issue (dispatched after its own `fifo_time`),
//! so the kernel could keep, per device and direction, an exponentially weighted
//! share of the issued requests that missed and read it at insert. This example
//! computes that on a trace, as the kernel would in issue order, beside every
//! feature of today (positions replayed where the trace has none), and writes one
//! CSV row per usable request for `kml-learn/scripts/feedback_study.py`.
//!
//! ```sh
//! cargo run --release -p kml-learn --example feedback_export -- TRACE.csv OUT.csv
//! ```
//!
//! Columns added: `mewma{2,4,6}`, the same direction's share with weight 2^-k per
//! issue (scale 2^16); `oewma4`, the other direction's; `mfrac1ms`, the share
//! among the same direction's issues of the last millisecond (per mille, -1 when
//! none). These are the candidates the study chose from; what was built from them
//! (`label::miss_share_step`, replayed by `kml_learn::replay`) is in the feature
//! columns `miss_share_same` and `miss_share_other`, beside them.

use std::{collections::VecDeque, io::Write, path::Path};

use kml_ebpf_common::features::Feature;
use kml_learn::Dataset;

/// Weights 2^-k per issue of the exponentially weighted shares.
const SHIFTS: [u32; 3] = [2, 4, 6];
const SCALE_BITS: u32 = 16;
const RECENT_NS: u64 = 1_000_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, trace, out] = args.as_slice() else {
        anyhow::bail!("usage: feedback_export TRACE.csv OUT.csv");
    };
    let d = Dataset::from_trace_file(Path::new(trace))?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(out)?);
    let recs = d.records();
    let missed: Vec<bool> = d.missed().collect();
    // Every issue, in issue order: (issue_ns, direction, missed).
    let mut issues: Vec<(u64, usize, bool)> = recs
        .iter()
        .zip(&missed)
        .filter(|(r, _)| r.issue_ns != 0)
        .map(|(r, &m)| (r.issue_ns, r.op().direction() as usize, m))
        .collect();
    issues.sort_unstable_by_key(|e| e.0);

    write!(out, "insert_ns,dir,missed")?;
    for f in Feature::ALL {
        write!(out, ",{}", f.name())?;
    }
    writeln!(out, ",mewma2,mewma4,mewma6,oewma4,mfrac1ms")?;

    let mut ewma = [[0i64; SHIFTS.len()]; 2];
    let mut recent: [VecDeque<(u64, bool)>; 2] = Default::default();
    let mut next = 0;
    // The dataset is in insert order.
    for ((r, x), &label) in recs.iter().zip(d.features()).zip(&missed) {
        while let Some(&(at, dir, m)) = issues.get(next).filter(|e| e.0 <= r.insert_ns) {
            for (e, &k) in ewma[dir].iter_mut().zip(&SHIFTS) {
                *e += ((i64::from(m) << SCALE_BITS) - *e) >> k;
            }
            recent[dir].push_back((at, m));
            next += 1;
        }
        for q in &mut recent {
            while q.front().is_some_and(|f| f.0 + RECENT_NS < r.insert_ns) {
                q.pop_front();
            }
        }
        let dir = r.op().direction() as usize;
        let q = &recent[dir];
        let frac = if q.is_empty() {
            -1
        } else {
            (q.iter().filter(|e| e.1).count() * 1000 / q.len()) as i64
        };
        write!(out, "{},{},{}", r.insert_ns, dir, u8::from(label))?;
        for f in Feature::ALL {
            write!(out, ",{}", x[f.index()])?;
        }
        let [m2, m4, m6] = ewma[dir];
        writeln!(out, ",{m2},{m4},{m6},{},{frac}", ewma[1 - dir][1])?;
    }
    Ok(())
}
