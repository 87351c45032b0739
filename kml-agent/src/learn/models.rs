//! Model files the agent can start from: shipped ones in `models/`, or any path.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kml_learn::{metrics::ThresholdGoal, model_file::DeviceRegime, LoadedModel};

use crate::devices::BlockDevice;

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

/// A disk as `--model auto` sees it: what decides which models were made for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRegime {
    pub name: String,
    /// Hardware tags per queue (`None`: unknown, e.g. no blk-mq queue).
    pub hw_queue_depth: Option<u32>,
    /// mq-deadline's read_expire, ms (`None`: not mq-deadline).
    pub read_expire_ms: Option<u64>,
}

impl DiskRegime {
    pub fn of(d: &BlockDevice) -> DiskRegime {
        DiskRegime {
            name: d.name.clone(),
            hw_queue_depth: d.hw_queue_depth(),
            read_expire_ms: d.expiries().ok().map(|(r, _)| r.as_millis() as u64),
        }
    }

    fn fits(&self, r: &DeviceRegime) -> bool {
        match (self.hw_queue_depth, self.read_expire_ms) {
            (Some(depth), Some(expire)) => r.fits(depth, expire),
            _ => false,
        }
    }
}

impl std::fmt::Display for DiskRegime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        write!(
            f,
            "{} (hardware queue depth {}, read_expire {} ms)",
            self.name,
            opt(self.hw_queue_depth.map(u64::from)),
            opt(self.read_expire_ms)
        )
    }
}

/// What `--model auto` chose.
#[derive(Debug)]
pub struct AutoChoice {
    /// The model to start from (an index into the models given).
    pub index: usize,
    pub why: String,
    /// The models it was chosen among (it too): made for these disks, or general.
    pub pool: Vec<usize>,
}

/// `--model auto`: which of `models` to start from on `disks`, and why.
///
/// Held-back scores are comparable only between models judged on the same kind of
/// data: a model made for one kind of disk (its file's `device`, e.g. the VM's
/// virtio disk at depth 1) scores high on its own disk's traces and says nothing
/// about another. So a model made for a kind of disk competes only where every
/// disk served is of that kind (the best held-back score among those wins); on any
/// other disk the general models (no `device`: the shipped defaults, trained and
/// judged together on host traces) compete. Models the kernel programs cannot run
/// here are left out: features this build does not compute, and the position
/// features unless `positions` (the programs keep their state in raw tracepoint
/// mode only). With `acting` (`run --act` with a model policy), a model made to
/// act (its threshold tuned to flag a share of the misses, `train --miss-recall`)
/// goes before the others of its pool, whatever their scores: a threshold tuned
/// for balanced accuracy leaves at-risk reads alone that a verdict in charge must
/// serve (kernel/README.md, `vm-act`).
pub fn choose_auto(
    models: &[(PathBuf, LoadedModel)],
    disks: &[DiskRegime],
    positions: bool,
    acting: bool,
) -> anyhow::Result<AutoChoice> {
    let runnable: Vec<usize> = (0..models.len())
        .filter(|&i| {
            let q = &models[i].1.quantized;
            kml_learn::quantize::features_not_in_kernel(q).is_empty()
                && (positions || !kml_learn::quantize::reads_positions(q))
        })
        .collect();
    let acts_first = |i: usize| acting && made_to_act(&models[i].1);
    let best = |pool: &[usize]| {
        pool.iter().copied().max_by(|&a, &b| {
            let ka = held_back_balanced_accuracy(&models[a].1).unwrap_or(0.0);
            let kb = held_back_balanced_accuracy(&models[b].1).unwrap_or(0.0);
            // Equal scores: the first in file order (max_by keeps the last).
            acts_first(a)
                .cmp(&acts_first(b))
                .then(ka.total_cmp(&kb))
                .then(b.cmp(&a))
        })
    };
    let score = |i: usize| {
        let ba = held_back_balanced_accuracy(&models[i].1)
            .map_or("no held-back score".to_string(), |b| {
                format!("held-back balanced accuracy {:.1}%", 100.0 * b)
            });
        match models[i].1.file.training.threshold_goal {
            ThresholdGoal::MissRecall(r) if acts_first(i) => format!(
                "made to act (threshold flags {:.1}% of misses), {ba}",
                100.0 * r
            ),
            _ => ba,
        }
    };
    let made_for: Vec<usize> = runnable
        .iter()
        .copied()
        .filter(|&i| {
            models[i]
                .1
                .file
                .device
                .as_ref()
                .is_some_and(|r| !disks.is_empty() && disks.iter().all(|d| d.fits(r)))
        })
        .collect();
    let disk_list = || {
        disks
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(i) = best(&made_for) {
        let r = models[i].1.file.device.as_ref().expect("filtered");
        return Ok(AutoChoice {
            index: i,
            why: format!(
                "made for {r}, which fits {}; {} (best of {} made for such disks)",
                disk_list(),
                score(i),
                made_for.len()
            ),
            pool: made_for,
        });
    }
    let general: Vec<usize> = runnable
        .iter()
        .copied()
        .filter(|&i| models[i].1.file.device.is_none())
        .collect();
    let elsewhere: Vec<String> = runnable
        .iter()
        .filter_map(|&i| {
            let r = models[i].1.file.device.as_ref()?;
            Some(format!("{} (made for {r})", name_of(&models[i].0)))
        })
        .collect();
    let skipped = if elsewhere.is_empty() {
        String::new()
    } else {
        format!(
            "; not for {}: {}",
            if disks.is_empty() {
                "these disks".to_string()
            } else {
                disk_list()
            },
            elsewhere.join(", ")
        )
    };
    match best(&general) {
        Some(i) => Ok(AutoChoice {
            index: i,
            why: format!(
                "general model, {} (best of {} general models){skipped}",
                score(i),
                general.len()
            ),
            pool: general,
        }),
        None => {
            anyhow::bail!(
            "--model auto: no general model and none made for {}{skipped}; name one with --model",
            if disks.is_empty() { "these disks".to_string() } else { disk_list() }
        )
        }
    }
}

/// Whether a model's threshold was tuned for a verdict that acts.
pub fn made_to_act(m: &LoadedModel) -> bool {
    matches!(m.file.training.threshold_goal, ThresholdGoal::MissRecall(_))
}

/// The model `run` starts from.
pub struct StartModel {
    pub path: PathBuf,
    pub model: LoadedModel,
    /// With `--model auto`, the others it was chosen among: they race it live
    /// ([`kml_learn::calibrate::LiveCalibration::race`]).
    pub others: Vec<(PathBuf, LoadedModel)>,
}

/// A model's name: its file's stem.
pub fn name_of(p: &Path) -> String {
    p.file_stem().map_or_else(
        || p.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// Resolves `--model`: a path, a shipped name (`logistic` → `models/logistic.json`),
/// or `auto` ([`choose_auto`] among the shipped models, for the disks served; the
/// choice and its reason are logged; `acting` as in [`choose_auto`]).
pub fn resolve(
    spec: &str,
    disks: &[DiskRegime],
    positions: bool,
    acting: bool,
) -> anyhow::Result<StartModel> {
    if spec == "auto" {
        let models: Vec<(PathBuf, LoadedModel)> = list()
            .into_iter()
            .filter_map(|(p, m)| m.ok().map(|m| (p, m)))
            .collect();
        anyhow::ensure!(
            !models.is_empty(),
            "--model auto: no valid model file in {:?}",
            search_dirs()
        );
        let choice = choose_auto(&models, disks, positions, acting)?;
        let mut pool: Vec<Option<(PathBuf, LoadedModel)>> = models.into_iter().map(Some).collect();
        let (path, model) = pool[choice.index].take().expect("chosen once");
        let others = choice.pool.iter().filter_map(|&i| pool[i].take()).collect();
        tracing::info!("--model auto: {}: {}", path.display(), choice.why);
        return Ok(StartModel {
            path,
            model,
            others,
        });
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
    Ok(StartModel {
        path,
        model: loaded,
        others: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model files of the source tree's `models/`, as shipped.
    fn shipped() -> Vec<(PathBuf, LoadedModel)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| {
                let m = LoadedModel::load(&p).unwrap();
                (p, m)
            })
            .collect()
    }

    fn disk(name: &str, depth: Option<u32>, expire: Option<u64>) -> DiskRegime {
        DiskRegime {
            name: name.into(),
            hw_queue_depth: depth,
            read_expire_ms: expire,
        }
    }

    fn chosen(models: &[(PathBuf, LoadedModel)], disks: &[DiskRegime]) -> String {
        let c = choose_auto(models, disks, true, false).unwrap();
        assert!(!c.why.is_empty());
        assert!(c.pool.contains(&c.index));
        name_of(&models[c.index].0)
    }

    /// The best held-back score among the runnable general models, by hand.
    fn best_general(models: &[(PathBuf, LoadedModel)]) -> String {
        let mut general: Vec<&(PathBuf, LoadedModel)> = models
            .iter()
            .filter(|(_, m)| m.file.device.is_none())
            .filter(|(_, m)| kml_learn::quantize::features_not_in_kernel(&m.quantized).is_empty())
            .collect();
        general.sort_by(|a, b| {
            held_back_balanced_accuracy(&b.1)
                .unwrap_or(0.0)
                .total_cmp(&held_back_balanced_accuracy(&a.1).unwrap_or(0.0))
        });
        name_of(&general[0].0)
    }

    #[test]
    fn a_host_disk_starts_from_a_general_model_never_the_vm_one() {
        let models = shipped();
        // The VM's model records the best held-back score of all (on its own
        // traces): the reason auto used to pick it everywhere.
        let vm = models
            .iter()
            .find(|(p, _)| name_of(p) == "vm-logistic")
            .expect("models/vm-logistic.json is shipped");
        let best_any = models
            .iter()
            .filter(|(_, m)| kml_learn::quantize::features_not_in_kernel(&m.quantized).is_empty())
            .map(|(_, m)| held_back_balanced_accuracy(m).unwrap_or(0.0))
            .fold(0.0, f64::max);
        assert_eq!(held_back_balanced_accuracy(&vm.1), Some(best_any));
        assert!(vm.1.file.device.is_some(), "vm-logistic declares its disk");
        let general = best_general(&models);
        assert_ne!(general, "vm-logistic");
        for d in [
            disk("loop0", Some(128), Some(8)),
            disk("nvme0n1", Some(1023), Some(500)),
            disk("sda", Some(32), Some(500)),
            // The VM's disk at the default expiry: not what the VM model was made for.
            disk("vda", Some(1), Some(500)),
            // Unknown depth: nothing specific can be said to fit.
            disk("vdb", None, Some(100)),
        ] {
            assert_eq!(chosen(&models, std::slice::from_ref(&d)), general, "{d}");
        }
    }

    #[test]
    fn the_vm_disk_starts_from_the_model_made_for_it() {
        let models = shipped();
        let vda = disk("vda", Some(1), Some(100));
        assert_eq!(chosen(&models, std::slice::from_ref(&vda)), "vm-logistic");
        let why = choose_auto(&models, std::slice::from_ref(&vda), true, false)
            .unwrap()
            .why;
        assert!(why.contains("made for") && why.contains("vda"), "{why}");
        // Serving the VM disk and a host disk at once: only a general model fits both.
        let both = [vda, disk("loop0", Some(128), Some(8))];
        assert_eq!(chosen(&models, &both), best_general(&models));
        let why = choose_auto(&models, &both, true, false).unwrap().why;
        assert!(
            why.contains("not for") && why.contains("vm-logistic"),
            "{why}"
        );
    }

    #[test]
    fn a_verdict_that_acts_starts_from_a_model_made_to_act() {
        let models = shipped();
        let vda = disk("vda", Some(1), Some(100));
        let act = choose_auto(&models, std::slice::from_ref(&vda), true, true).unwrap();
        assert_eq!(name_of(&models[act.index].0), "vm-act");
        assert!(made_to_act(&models[act.index].1));
        assert!(act.why.contains("made to act"), "{}", act.why);
        // Counting only: the best held-back score, as before.
        let count = choose_auto(&models, std::slice::from_ref(&vda), true, false).unwrap();
        assert_ne!(count.index, act.index);
        assert!(!count.why.contains("made to act"), "{}", count.why);
        // A host disk: no general model is made to act, so the best general one.
        let host = [disk("loop0", Some(128), Some(8))];
        let c = choose_auto(&models, &host, true, true).unwrap();
        assert_eq!(name_of(&models[c.index].0), best_general(&models));
        // Without position state vm-act (which reads position features) cannot run.
        let c = choose_auto(&models, std::slice::from_ref(&vda), false, true).unwrap();
        assert_ne!(name_of(&models[c.index].0), "vm-act");
    }

    #[test]
    fn without_position_state_no_position_model_is_chosen() {
        let models = shipped();
        let uses_position = |name: &str| {
            let (_, m) = models.iter().find(|(p, _)| name_of(p) == name).unwrap();
            kml_learn::quantize::reads_positions(&m.quantized)
        };
        assert!(
            uses_position("tree-position"),
            "the shipped position model reads them"
        );
        for d in [
            disk("loop0", Some(128), Some(8)),
            disk("vda", Some(1), Some(100)),
        ] {
            let i = choose_auto(&models, std::slice::from_ref(&d), false, false)
                .unwrap()
                .index;
            let name = name_of(&models[i].0);
            assert!(!uses_position(&name), "{d}: {name}");
        }
    }

    #[test]
    fn a_specific_model_never_competes_outside_its_regime() {
        let mut models = shipped();
        // A model made for deep queues at 4-12 ms with a perfect score of its own.
        let (p, mut m) = models
            .iter()
            .find(|(p, _)| name_of(p) == "logistic")
            .cloned()
            .unwrap();
        m.file.device = Some(DeviceRegime {
            description: "a test disk".into(),
            hw_queue_depth: [64, 256],
            read_expire_ms: [4, 12],
        });
        m.file
            .metrics
            .test
            .as_mut()
            .unwrap()
            .quantized
            .balanced_accuracy = 1.0;
        models.push((p.with_file_name("perfect-here.json"), m));
        assert_eq!(
            chosen(&models, &[disk("loop0", Some(128), Some(8))]),
            "perfect-here"
        );
        assert_eq!(
            chosen(&models, &[disk("loop0", Some(128), Some(16))]),
            best_general(&models)
        );
        assert_eq!(
            chosen(&models, &[disk("nvme0n1", Some(1023), Some(8))]),
            best_general(&models)
        );
        // No general model and none that fits: refused, naming what was there.
        let only_specific: Vec<_> = models
            .into_iter()
            .filter(|(_, m)| m.file.device.is_some())
            .collect();
        let err = choose_auto(
            &only_specific,
            &[disk("sda", Some(32), Some(500))],
            true,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("no general model") && err.contains("vm-logistic") && err.contains("sda"),
            "{err}"
        );
    }
}
