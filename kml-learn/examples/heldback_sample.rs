//! Writes a simple random sample of the held-back windows of recorded traces: the
//! data `kml-agent train --trace A,B,... ` (train fraction 0.7) held back, so that
//! `tests/shipped_models.rs` can recompute each shipped model's held-back balanced
//! accuracy instead of trusting the figure stored in its file.
//!
//! ```sh
//! cargo run --release -p kml-learn --example heldback_sample -- \
//!     --rows 4000 --seed 16 --out kml-learn/testdata/heldback-sample.csv TRACE.csv...
//! ```
//! The traces in the order the models were trained on (their `training.data.source`).
//! Output: `# window: ...` (the held-back windows, as the model files describe
//! them), `# sample: ...`, then `missed` and every feature by name, one row per
//! sampled request: features as the kernel computes them (position features
//! replayed over the whole trace), the label the scheduler's own deadline gives.

use std::{io::Write, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use kml_ebpf_common::features::{Feature, FeatureVector};
use kml_learn::{synthetic::SplitMix, Dataset};

/// The train fraction the shipped models used (`training.train_fraction`).
const TRAIN_FRACTION: f64 = 0.7;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut rows, mut seed, mut out, mut traces) = (4000usize, 16u64, None, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rows" => rows = args.next().context("--rows N")?.parse()?,
            "--seed" => seed = args.next().context("--seed S")?.parse()?,
            "--out" => out = Some(PathBuf::from(args.next().context("--out FILE")?)),
            _ => traces.push(PathBuf::from(a)),
        }
    }
    let out = out.context("--out FILE")?;
    if traces.is_empty() {
        bail!("no trace given");
    }
    let mut windows = Vec::new();
    let mut held: Vec<(bool, FeatureVector)> = Vec::new();
    for t in &traces {
        let data = Dataset::from_trace_file(t)?;
        let (_, test) = data.split_by_time(TRAIN_FRACTION);
        eprintln!("{}: held back {}", t.display(), test.window());
        windows.push(test.window().to_owned());
        held.extend(test.missed().zip(test.features().iter().copied()));
    }
    // Selection sampling (Knuth, TAOCP 3.4.2, algorithm S): every subset of `rows`
    // of the held-back requests is equally likely; the rows keep their order.
    let total = held.len();
    if rows > total {
        bail!("{rows} rows asked of {total} held-back requests");
    }
    let mut rng = SplitMix(seed);
    let mut picked = Vec::with_capacity(rows);
    for (i, row) in held.iter().enumerate() {
        let need = rows - picked.len();
        if need == 0 {
            break;
        }
        if ((total - i) as f64) * rng.unit() < need as f64 {
            picked.push(row);
        }
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out)?);
    writeln!(f, "# window: {}", windows.join(" + "))?;
    writeln!(
        f,
        "# sample: {rows} of {total} held-back requests, uniform without replacement \
         (selection sampling, splitmix64 seed {seed}); train fraction {TRAIN_FRACTION}"
    )?;
    let names: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
    writeln!(f, "missed,{}", names.join(","))?;
    for (missed, x) in picked {
        let values: Vec<String> = Feature::ALL
            .iter()
            .map(|f| x[f.index()].to_string())
            .collect();
        writeln!(f, "{},{}", u8::from(*missed), values.join(","))?;
    }
    f.flush()?;
    eprintln!("{rows} of {total} held-back requests to {}", out.display());
    Ok(())
}
