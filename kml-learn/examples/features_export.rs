//! Offline studies: a trace's records with the features kml computes for them
//! (positions and miss shares replayed on the host where the kernel did not record
//! them), one CSV row per usable request in insert order, for analysis outside
//! Rust (`kml-learn/scripts/tick_band_study.py`).
//!
//! ```sh
//! cargo run --release -p kml-learn --example features_export -- TRACE.csv OUT.csv
//! ```
//! Columns: the times and jiffies the label and the tick are judged by
//! (`insert_ns`, `issue_ns`, `deadline_ns`, `insert_jiffies`, `issue_jiffies`,
//! `fifo_time`), `is_write`, the label `missed`, then every feature by name
//! (`Feature::ALL`, integer lanes as the model sees them).

use std::io::Write;

use anyhow::Context;
use kml_ebpf_common::features::Feature;
use kml_learn::Dataset;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [trace, out] = args.as_slice() else {
        anyhow::bail!("usage: features_export TRACE.csv OUT.csv");
    };
    let data = Dataset::from_trace_file(std::path::Path::new(trace))?;
    let file = std::fs::File::create(out).with_context(|| format!("creating {out}"))?;
    let mut w = std::io::BufWriter::new(file);
    let names: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
    writeln!(
        w,
        "insert_ns,issue_ns,deadline_ns,insert_jiffies,issue_jiffies,fifo_time,is_write,missed,{}",
        names.join(",")
    )?;
    for ((r, x), missed) in data
        .records()
        .iter()
        .zip(data.features())
        .zip(data.missed())
    {
        write!(
            w,
            "{},{},{},{},{},{},{},{}",
            r.insert_ns,
            r.issue_ns,
            r.deadline_ns,
            r.insert_jiffies,
            r.issue_jiffies,
            r.fifo_time,
            r.op().direction() as u8,
            missed as u8
        )?;
        for v in x.iter() {
            write!(w, ",{v}")?;
        }
        writeln!(w)?;
    }
    w.flush()?;
    eprintln!("{}: {} requests -> {out}", data.source(), data.len());
    Ok(())
}
