//! Every model file shipped in `models/` loads and validates: schema version, known
//! features, sizes and ranges, the quantised part being the float part quantised,
//! the kernel struct's own validation and checksum; one default model per kind is
//! there; and on a small recorded sample (`testdata/sample.csv`) the integer model
//! (what the kernel runs) gives the float model's verdict.

use std::path::{Path, PathBuf};

use kml_ebpf_common::{
    features::{Feature, KML_BASELINE_FEATURES},
    model::ModelKind,
};
use kml_learn::{evaluate, Dataset, LoadedModel, QuantizedModel};

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn shipped() -> Vec<(PathBuf, LoadedModel)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .expect("models/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let m = LoadedModel::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, m)
        })
        .collect()
}

#[test]
fn every_shipped_model_loads_and_validates() {
    let models = shipped();
    assert!(!models.is_empty(), "no model in {}", models_dir().display());
    for (path, m) in &models {
        let name = path.display();
        let size = std::fs::metadata(path).unwrap().len();
        assert!(
            size < 1 << 20,
            "{name}: {size} bytes (keep model files below 1 MiB)"
        );
        // The kernel form: valid, sealed, and reading only known features.
        match &m.quantized {
            QuantizedModel::Linear(q) => {
                assert_eq!(q.validate(), Ok(()), "{name}");
                assert!(q.checksum_ok(), "{name}: checksum");
                assert_eq!(q.model_kind(), Some(m.kind()), "{name}");
            }
            QuantizedModel::Tree(t) => {
                assert_eq!(t.validate(), Ok(()), "{name}");
                assert!(t.checksum_ok(), "{name}: checksum");
            }
        }
        for f in m.float.features() {
            assert_eq!(Feature::from_name(f.name()), Some(*f));
        }
        if m.kind() == ModelKind::Baseline {
            assert_eq!(m.float.features(), KML_BASELINE_FEATURES, "{name}");
        }
        // Provenance: what it was trained on, and how it did on held-back data.
        let t = &m.file.training;
        assert!(
            t.workload.as_deref().is_some_and(|w| !w.is_empty()),
            "{name}: no workload description"
        );
        assert!(
            t.data.records > 0 && t.fit_records > 0,
            "{name}: no training records"
        );
        let test = m
            .file
            .metrics
            .test
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no held-back metrics"));
        assert!(test.data.records > 0);
        assert!(
            test.quantized.balanced_accuracy >= test.float.balanced_accuracy - 0.005,
            "{name}: quantised model lost more than half a point"
        );
        // Written by this build: reading and writing it again is the same file.
        let again = kml_learn::ModelFile::parse(&m.file.to_json(), "rewritten").unwrap();
        assert_eq!(again.quantized, m.quantized, "{name}");
    }
}

#[test]
fn one_default_model_per_kind() {
    let models = shipped();
    for kind in ModelKind::ALL {
        let default = models_dir().join(format!("{}.json", kind.name()));
        let found = models.iter().find(|(p, _)| *p == default);
        let (_, m) = found.unwrap_or_else(|| panic!("no default model {}", default.display()));
        assert_eq!(m.kind(), kind);
    }
}

/// On real recorded requests the kernel's integer verdicts are the float model's
/// (to within requests on the decision boundary).
#[test]
fn integer_verdicts_match_float_on_a_recorded_sample() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sample.csv");
    let data = Dataset::from_trace_file(&sample).unwrap();
    assert!(data.len() >= 500 && data.misses() > 0 && data.misses() < data.len());
    for (path, m) in shipped() {
        let e = evaluate(&m.float, &m.quantized, &data);
        assert!(
            e.agreement >= 0.995,
            "{}: float and integer verdicts agree on {:.4}",
            path.display(),
            e.agreement
        );
    }
}
