//! Model files the agent can start from: shipped ones in `models/`, or any path.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kml_learn::LoadedModel;

/// Where shipped models are looked for: `$KML_MODELS_DIR`, `./models`, and the
/// source tree's `models/` (for a binary run from the build tree).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KML_MODELS_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("models"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"));
    dirs
}

/// Every `*.json` model file in the search directories (first directory wins on
/// a name clash), with its loaded form or the reason it was refused.
pub fn list() -> Vec<(PathBuf, Result<LoadedModel, String>)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for dir in search_dirs() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let name = p.file_name().map(|n| n.to_owned());
            if seen.insert(name) {
                let loaded = LoadedModel::load(&p).map_err(|e| e.to_string());
                out.push((p, loaded));
            }
        }
    }
    out
}

/// Held-back balanced accuracy of the integer model, as recorded in the file.
pub fn held_back_balanced_accuracy(m: &LoadedModel) -> Option<f64> {
    m.file
        .metrics
        .test
        .as_ref()
        .map(|e| e.quantized.balanced_accuracy)
}

/// Resolves `--model`: a path, a shipped name (`logistic` → `models/logistic.json`),
/// or `auto` (the shipped model with the best held-back balanced accuracy among
/// those this build's kernel programs can run: a model that uses the position
/// features waits until kml-ebpf computes them).
pub fn resolve(spec: &str) -> anyhow::Result<(PathBuf, LoadedModel)> {
    if spec == "auto" {
        return list()
            .into_iter()
            .filter_map(|(p, m)| m.ok().map(|m| (p, m)))
            .filter(|(_, m)| kml_learn::quantize::features_not_in_kernel(&m.quantized).is_empty())
            .max_by(|a, b| {
                let ka = held_back_balanced_accuracy(&a.1).unwrap_or(0.0);
                let kb = held_back_balanced_accuracy(&b.1).unwrap_or(0.0);
                ka.total_cmp(&kb)
            })
            .with_context(|| format!("--model auto: no valid model file in {:?}", search_dirs()));
    }
    let direct = PathBuf::from(spec);
    let path = if direct.is_file() {
        direct
    } else {
        search_dirs()
            .into_iter()
            .map(|d| d.join(format!("{spec}.json")))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "no model `{spec}`: not a file, and no {spec}.json in {:?}",
                    search_dirs()
                )
            })?
    };
    let loaded = LoadedModel::load(&path).map_err(|e| {
        anyhow::anyhow!(
            "refusing model {}: {e}; train one for this build (`kml-agent train`) or pick a listed one (`kml-agent models`)",
            path.display()
        )
    })?;
    Ok((path, loaded))
}
