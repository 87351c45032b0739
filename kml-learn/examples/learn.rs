//! Stand-alone front end of `kml-agent train` / `kml-agent eval`, for working on the
//! learning core without the agent:
//! `cargo run --release -p kml-learn --example learn -- train --trace t.csv --model tree --out m.json`.

use clap::Parser;
use kml_learn::cli::{EvalArgs, TrainArgs};

#[derive(Parser)]
#[command(about = "kml learning core: train and evaluate models on recorded traces")]
enum Cli {
    /// Train a model on a recorded trace and write its model file.
    Train(TrainArgs),
    /// Evaluate a model file on a trace, in float and integer form.
    Eval(EvalArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Train(args) => args.execute(),
        Cli::Eval(args) => args.execute(),
    }
}
