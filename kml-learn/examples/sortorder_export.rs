//! Offline experiment (issue 13): rebuilds mq-deadline's queued set at every insert
//! of a recorded trace and writes candidate sort-order features, one row per request
//! in insert order, as little-endian f64 (`OUT.bin`, columns in `OUT.cols`).
//!
//! ```sh
//! cargo run --release -p kml-learn --example sortorder_export -- TRACE.csv OUT
//! ```
//! Exact (from the full queued set): FIFO head age, requests already expired / older
//! than half the expiry, the ages of the 16 nearest queued same-direction requests
//! below in sector order, the sweep distance from the last dispatched sector.
//! Bucketed (what a kernel array can keep): per 2^13-sector bucket count, mean age
//! and oldest age for the request's bucket and the 7 below; the place in the FIFO
//! (queued same-direction requests older) of each of those buckets' oldest, exactly
//! and at the age ring's slot resolution (`position::slot_shift`), for the exact
//! oldest and for the one kept since the bucket was last empty; and the kernel form
//! docs/learning.md proposes: buckets walked down until they hold 1, 4 or 16 queued
//! requests (at most 16), the slot-resolution place of the oldest among them.
//! `kml-learn/scripts/fifo_rank_study.py` reads the output.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
};

use kml_ebpf_common::features::{features_with_position, Feature};
use kml_learn::Dataset;

const NB: usize = 16;
const WALK: usize = 8;
const BUCKET_SHIFT: u32 = 13;

/// Per bucket: count, sum of insert times, the queued (insert, idx) for the exact
/// oldest, and the oldest insert since the bucket was last empty.
type Bucket = (u64, u128, BTreeSet<(u64, usize)>, u64);

#[derive(Default)]
struct Side {
    /// (sector, idx) -> insert_ns
    sorted: BTreeMap<(u64, usize), u64>,
    /// (insert_ns, idx)
    fifo: BTreeSet<(u64, usize)>,
    /// bucket -> (count, sum insert, set of inserts for exact min, oldest insert
    /// since the bucket was last empty: what a kernel can keep without a list)
    buckets: BTreeMap<u64, Bucket>,
    /// start sector of the last dispatched request in this direction
    latest_pos: u64,
}

/// Requests a walk covers (nearest below, then a batch's reach) and its bound.
const WALK_K: [u64; 3] = [1, 4, 16];
const REACH_BUCKETS: u64 = 16;
/// Ring lengths (slots) simulated: today's `AGE_SLOTS`, and twice it.
const RINGS: [u64; 2] = [32, 64];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (input, out) = (&args[1], &args[2]);
    let d = Dataset::from_trace_file(std::path::Path::new(input))?;
    let recs = d.records();
    let n = recs.len();
    let positions = kml_learn::replay::replay_positions(recs, &Default::default());
    // Events: (time, kind 0 = issue first, 1 = insert, idx)
    let mut ev: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, r) in recs.iter().enumerate() {
        ev.push((r.insert_ns, 1, i));
        let disp = if r.issue_ns != 0 {
            r.issue_ns
        } else {
            r.complete_ns
        };
        ev.push((disp.max(r.insert_ns), 0, i));
    }
    ev.sort_unstable();
    let mut sides: BTreeMap<(u32, u8), Side> = BTreeMap::new();
    let mut cols: Vec<String> = vec!["missed".into(), "insert_ns".into(), "delay_ns".into()];
    for f in Feature::ALL {
        cols.push(f.name().into());
    }
    for c in [
        "budget_ns",
        "qsame",
        "qother",
        "head_age",
        "n_exp",
        "n_half",
        "other_head_age",
        "other_n_exp",
        "rank_below",
        "sweep_ahead",
        "last_dir_same",
    ] {
        cols.push(c.into());
    }
    for j in 1..=NB {
        cols.push(format!("age_b{j}"));
    }
    for j in 1..=NB {
        cols.push(format!("fifo_rank_b{j}"));
    }
    for j in 1..=4 {
        cols.push(format!("age_a{j}"));
    }
    for w in 0..WALK {
        cols.push(format!("bk{w}_count"));
        cols.push(format!("bk{w}_mean_age"));
        cols.push(format!("bk{w}_old_age"));
        cols.push(format!("bk{w}_stale_age"));
    }
    // Each walked bucket's oldest as a place in the FIFO: exact, and at the age
    // ring's slot resolution (queued requests inserted in an earlier slot period)
    // for the exact oldest and for the stale one a kernel keeps today.
    for w in 0..WALK {
        cols.push(format!("bk{w}_old_rank"));
        cols.push(format!("bk{w}_old_rank_slot"));
        cols.push(format!("bk{w}_stale_rank_slot"));
    }
    // The kernel form to come: walk buckets down from the request's own until they
    // hold `k` queued requests (at most REACH_BUCKETS), and take the lowest place
    // in the FIFO of a walked bucket's oldest, at the ring's slot resolution.
    for k in WALK_K {
        cols.push(format!("walk{k}_rank_slot"));
        cols.push(format!("walk{k}_buckets"));
    }
    // The same with a ring of RING slots: an oldest that has left the ring is only
    // known to be older than it (place 0: the first to be served), and a place
    // counts what left the ring as older.
    for ring in RINGS {
        for k in WALK_K {
            cols.push(format!("walk{k}_rank_ring{ring}"));
        }
    }
    std::fs::write(format!("{out}.cols"), cols.join("\n") + "\n")?;
    let mut rows: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut last_dir: u8 = 0;
    for &(t, kind, i) in &ev {
        let r = &recs[i];
        let dir = r.op().direction() as u8;
        let key = (r.dev, dir);
        if kind == 0 {
            let s = sides.entry(key).or_default();
            if s.sorted.remove(&(r.sector, i)).is_some() {
                s.fifo.remove(&(r.insert_ns, i));
                let b = r.sector >> BUCKET_SHIFT;
                let e = s.buckets.get_mut(&b).unwrap();
                e.0 -= 1;
                e.1 -= r.insert_ns as u128;
                e.2.remove(&(r.insert_ns, i));
                if e.0 == 0 {
                    s.buckets.remove(&b);
                }
            }
            s.latest_pos = r.sector;
            last_dir = dir;
            continue;
        }
        let budget = r.deadline_ns - r.insert_ns;
        let x = features_with_position(r, &positions[i]);
        let mut row: Vec<f64> = Vec::with_capacity(cols.len());
        let delay = (if r.issue_ns != 0 {
            r.issue_ns
        } else {
            r.complete_ns
        })
        .saturating_sub(r.insert_ns);
        row.push(r.deadline_missed() as u8 as f64);
        row.push(r.insert_ns as f64);
        row.push(delay as f64);
        row.extend(x.iter().map(|&v| v as f64));
        let other = sides
            .get(&(r.dev, 1 - dir))
            .map(|o| {
                let head = o.fifo.first().map(|h| t - h.0).unwrap_or(0);
                let nexp = o
                    .fifo
                    .range(..(t.saturating_sub(budget), usize::MAX))
                    .count();
                (head, nexp, o.sorted.len())
            })
            .unwrap_or((0, 0, 0));
        let s = sides.entry(key).or_default();
        let head_age = s.fifo.first().map(|h| t - h.0).unwrap_or(0);
        let n_exp = s
            .fifo
            .range(..(t.saturating_sub(budget), usize::MAX))
            .count();
        let n_half = s
            .fifo
            .range(..(t.saturating_sub(budget / 2), usize::MAX))
            .count();
        let rank_below = s.sorted.range(..(r.sector, 0)).count();
        let sweep_ahead = if r.sector >= s.latest_pos {
            s.sorted.range((s.latest_pos, 0)..(r.sector, 0)).count()
        } else {
            s.sorted.range((s.latest_pos, 0)..).count() + s.sorted.range(..(r.sector, 0)).count()
        };
        row.extend([
            budget as f64,
            s.sorted.len() as f64,
            other.2 as f64,
            head_age as f64,
            n_exp as f64,
            n_half as f64,
            other.0 as f64,
            other.1 as f64,
            rank_below as f64,
            sweep_ahead as f64,
            (last_dir == dir) as u8 as f64,
        ]);
        let below: Vec<(u64, usize, u64)> = s
            .sorted
            .range(..(r.sector, i))
            .rev()
            .take(NB)
            .map(|(&(sec, j), &ins)| (sec, j, ins))
            .collect();
        for j in 0..NB {
            row.push(below.get(j).map(|b| (t - b.2) as f64).unwrap_or(-1.0));
        }
        for j in 0..NB {
            // How many queued are older than this neighbour (its place in the FIFO).
            row.push(
                below
                    .get(j)
                    .map(|b| s.fifo.range(..(b.2, b.1)).count() as f64)
                    .unwrap_or(-1.0),
            );
        }
        let above: Vec<u64> = s
            .sorted
            .range((r.sector, i)..)
            .take(4)
            .map(|(_, &ins)| ins)
            .collect();
        for j in 0..4 {
            row.push(above.get(j).map(|&a| (t - a) as f64).unwrap_or(-1.0));
        }
        let b0 = r.sector >> BUCKET_SHIFT;
        for w in 0..WALK as u64 {
            match b0.checked_sub(w).and_then(|b| s.buckets.get(&b)) {
                Some(e) => {
                    let mean = t as f64 - (e.1 as f64 / e.0 as f64);
                    let old = t - e.2.first().unwrap().0;
                    row.extend([e.0 as f64, mean, old as f64, (t - e.3) as f64]);
                }
                None => row.extend([0.0, -1.0, -1.0, -1.0]),
            }
        }
        let sh = kml_ebpf_common::position::slot_shift(budget);
        let slot_rank = |ins: u64| s.fifo.range(..((ins >> sh) << sh, 0)).count() as f64;
        for w in 0..WALK as u64 {
            match b0.checked_sub(w).and_then(|b| s.buckets.get(&b)) {
                Some(e) => {
                    let old = *e.2.first().unwrap();
                    row.extend([
                        s.fifo.range(..old).count() as f64,
                        slot_rank(old.0),
                        slot_rank(e.3),
                    ]);
                }
                None => row.extend([-1.0, -1.0, -1.0]),
            }
        }
        // Each walk's oldest insert (u64::MAX: no queued request in reach) and the
        // buckets it walked; a place is monotone in the insert time, so the lowest
        // place of the walked buckets' oldest is the place of the oldest of them.
        let walks = WALK_K.map(|k| {
            let (mut seen, mut oldest, mut walked) = (0u64, u64::MAX, 0u64);
            for w in 0..REACH_BUCKETS {
                let Some(b) = b0.checked_sub(w) else { break };
                walked = w + 1;
                if let Some(e) = s.buckets.get(&b) {
                    oldest = oldest.min(e.2.first().unwrap().0);
                    seen += e.0;
                    if seen >= k {
                        break;
                    }
                }
            }
            (oldest, walked)
        });
        for (oldest, walked) in walks {
            let place = if oldest == u64::MAX {
                -1.0
            } else {
                slot_rank(oldest)
            };
            row.extend([place, walked as f64]);
        }
        for ring in RINGS {
            // The oldest period still in the ring; older inserts fell off it.
            let first = ((t >> sh).saturating_sub(ring - 1)) << sh;
            for (oldest, _) in walks {
                row.push(if oldest == u64::MAX {
                    -1.0
                } else if oldest < first {
                    0.0
                } else {
                    slot_rank(oldest)
                });
            }
        }
        rows[i] = row;
        s.sorted.insert((r.sector, i), r.insert_ns);
        s.fifo.insert((r.insert_ns, i));
        let e = s.buckets.entry(b0).or_default();
        e.0 += 1;
        e.1 += r.insert_ns as u128;
        if e.0 == 1 {
            e.3 = r.insert_ns;
        }
        e.2.insert((r.insert_ns, i));
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(format!("{out}.bin"))?);
    for row in &rows {
        for v in row {
            f.write_all(&v.to_le_bytes())?;
        }
    }
    eprintln!("{n} rows x {} columns", cols.len());
    Ok(())
}
