//! `kml-agent models`: the model files `run --model` can start from (a model made
//! for one kind of disk says so on a second line).

#[derive(clap::Args, Debug)]
pub struct ModelsArgs {}

impl ModelsArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let found = crate::learn::models::list();
        if found.is_empty() {
            println!(
                "no model files in {:?}",
                crate::learn::models::search_dirs()
            );
            return Ok(());
        }
        println!(
            "{:<28} {:<9} {:>9} {:>9} {:>9}  trained on",
            "model", "kind", "bal.acc", "f1 miss", "baseline"
        );
        for (path, loaded) in found {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match loaded {
                Ok(m) => {
                    let test = m.file.metrics.test.as_ref();
                    let fmt = |v: Option<f64>| {
                        v.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v))
                    };
                    println!(
                        "{:<28} {:<9} {:>9} {:>9} {:>9}  {}",
                        name,
                        m.kind().name(),
                        fmt(test.map(|e| e.quantized.balanced_accuracy)),
                        fmt(test.map(|e| e.quantized.f1_miss)),
                        fmt(m
                            .file
                            .metrics
                            .baseline_test
                            .as_ref()
                            .map(|e| e.quantized.balanced_accuracy)),
                        m.file.training.workload.as_deref().unwrap_or("?"),
                    );
                    if let Some(d) = &m.file.device {
                        println!(
                            "{:<28} made for {d}: `--model auto` takes it only there",
                            ""
                        );
                    }
                    if let kml_learn::metrics::ThresholdGoal::MissRecall(r) =
                        m.file.training.threshold_goal
                    {
                        println!(
                            "{:<28} made to act: its threshold flags {:.1}% of misses; `run --act --model auto` takes it first",
                            "",
                            100.0 * r
                        );
                    }
                }
                Err(e) => println!("{name:<28} refused: {e}"),
            }
        }
        Ok(())
    }
}
