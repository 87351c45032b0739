//! Models into the kernel's slots: the two-slot protocol on the agent's side (the
//! inference itself runs in the kernel, `kml_ebpf_common::inference`).
//!
//! Write the idle slot whole → run the in-kernel checker (`kml_verify_slots`,
//! through BPF_PROG_TEST_RUN) and require it to vouch for the slot → flip
//! `MODEL_CONTROL` (one map write). A slot is never rewritten sooner than
//! [`GRACE`] after it stopped being active, so no program run can still be reading
//! it. Every version the agent wrote is kept, so verdicts in records can be
//! recomputed on the host bit for bit.

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, MapData},
    programs::RawTracePoint,
    Ebpf,
};
use kml_ebpf_common::{
    abi::names::{map, program},
    model::{LinearModel, ModelKind, TreeModel},
    slot::{status_index, ModelControl, SlotStatus, MODEL_SLOTS},
};
use kml_learn::quantize::QuantizedModel;

use crate::object::{map, map_mut};

/// Longer than any program run by orders of magnitude (they take microseconds).
pub const GRACE: Duration = Duration::from_millis(20);

/// The model active in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveModel {
    pub kind: ModelKind,
    pub slot: u32,
    pub version: u32,
}

/// The agent's side of the model slots of one loaded object.
#[derive(Default)]
pub struct ModelSlots {
    next_version: u32,
    active: Option<ActiveModel>,
    /// When each slot (by `status_index`) last stopped being active.
    released: BTreeMap<u32, Instant>,
    /// The versions written, for host-side recomputation of kernel verdicts: all
    /// of them, or the newest `history_limit`.
    history: BTreeMap<u32, QuantizedModel>,
    /// Versions kept in `history` (the run loop bounds it: calibration and
    /// retraining install a new version every few seconds for as long as it runs).
    pub history_limit: usize,
    /// Score distance to the limit that counts as "near the boundary" (sampling).
    pub near_margin: i64,
    /// The programs keep the position state (raw tracepoint mode); a model that
    /// reads a position feature is refused where they do not.
    pub kernel_positions: bool,
}

fn is_tree(kind: ModelKind) -> bool {
    !kind.is_linear()
}

impl ModelSlots {
    pub fn new() -> Self {
        ModelSlots {
            next_version: 1,
            kernel_positions: true,
            history_limit: usize::MAX,
            ..Default::default()
        }
    }

    pub fn active(&self) -> Option<ActiveModel> {
        self.active
    }

    /// The model the kernel ran as `version` (as the agent wrote it).
    pub fn version(&self, version: u32) -> Option<&QuantizedModel> {
        self.history.get(&version)
    }

    /// Installs `model` in the idle slot of its type and makes it active.
    /// Returns what became active. On any failure the previous model stays active.
    pub fn install(
        &mut self,
        ebpf: &mut Ebpf,
        model: &QuantizedModel,
    ) -> anyhow::Result<ActiveModel> {
        let kind = match model {
            QuantizedModel::Linear(m) => ModelKind::from_u32(m.kind),
            QuantizedModel::Tree(m) => ModelKind::from_u32(m.kind),
        }
        .context("model has an unknown kind")?;
        let missing = kml_learn::quantize::features_not_in_kernel(model);
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|f| f.name()).collect();
            bail!(
                "model refused: it uses {} which this build's kernel programs do not compute yet \
                 (the position state is not wired into the insert path)",
                names.join(", ")
            );
        }
        let uses_position = kml_learn::quantize::reads_positions(model);
        if uses_position && !self.kernel_positions {
            bail!(
                "model refused: it reads position features, which the programs keep only \
                 in raw tracepoint mode (classic tracepoint programs lose events when \
                 programs nest, and the position state would drift); use a model \
                 without them (`train --features portable`) or raw tracepoints"
            );
        }
        let tree = is_tree(kind);
        // The idle slot: not the active one when the active model has the same type.
        let slot = match self.active {
            Some(a) if is_tree(a.kind) == tree => (a.slot + 1) % MODEL_SLOTS,
            _ => 0,
        };
        let index = status_index(tree, slot);
        if let Some(at) = self.released.get(&index) {
            let since = at.elapsed();
            if since < GRACE {
                std::thread::sleep(GRACE - since);
            }
        }
        let version = self.next_version;
        let mut sealed = model.clone();
        match &mut sealed {
            QuantizedModel::Linear(m) => {
                m.seal(version);
                m.validate()
                    .map_err(|f| anyhow::anyhow!("model refused: {}", f.field()))?;
                let mut map: Array<&mut MapData, LinearModel> = map_mut(ebpf, map::LINEAR_MODELS)?;
                map.set(slot, **m, 0).context("writing LINEAR_MODELS")?;
                let back = map.get(&slot, 0).context("reading LINEAR_MODELS back")?;
                if back != **m {
                    bail!("LINEAR_MODELS slot {slot} reads back different from what was written");
                }
            }
            QuantizedModel::Tree(m) => {
                m.seal(version);
                m.validate()
                    .map_err(|f| anyhow::anyhow!("model refused: {}", f.field()))?;
                let mut map: Array<&mut MapData, TreeModel> = map_mut(ebpf, map::TREE_MODELS)?;
                map.set(slot, **m, 0).context("writing TREE_MODELS")?;
                let back = map.get(&slot, 0).context("reading TREE_MODELS back")?;
                if back != **m {
                    bail!("TREE_MODELS slot {slot} reads back different from what was written");
                }
            }
        }
        self.next_version += 1;
        run_slot_checker(ebpf)?;
        let status = slot_status(ebpf, index)?;
        let expected_checksum = match &sealed {
            QuantizedModel::Linear(m) => m.checksum,
            QuantizedModel::Tree(m) => m.checksum,
        };
        if !status.vouches(version, expected_checksum) {
            bail!("the in-kernel checker refused slot {slot} (version {version}): {status:?}");
        }
        let control = ModelControl {
            kind: kind as u32,
            slot,
            near_margin: self.near_margin,
            flags: if uses_position {
                ModelControl::USES_POSITION
            } else {
                0
            },
            _pad: 0,
        };
        let mut ctl: Array<&mut MapData, ModelControl> = map_mut(ebpf, map::MODEL_CONTROL)?;
        ctl.set(0, control, 0).context("flipping MODEL_CONTROL")?;
        if let Some(prev) = self.active {
            self.released
                .insert(status_index(is_tree(prev.kind), prev.slot), Instant::now());
        }
        let active = ActiveModel {
            kind,
            slot,
            version,
        };
        self.active = Some(active);
        self.history.insert(version, sealed);
        while self.history.len() > self.history_limit.max(1) {
            self.history.pop_first();
        }
        Ok(active)
    }

    /// Takes over the slots of adopted (pinned) maps: the model the kernel runs
    /// becomes the active one if the checker still vouches for it, and new versions
    /// continue after the highest one in any slot. A model the checker does not
    /// vouch for is switched off (the kernel would not use it anyway).
    pub fn adopt(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<Option<ActiveModel>> {
        run_slot_checker(ebpf)?;
        let linear: Array<&MapData, LinearModel> = map(ebpf, map::LINEAR_MODELS)?;
        let tree: Array<&MapData, TreeModel> = map(ebpf, map::TREE_MODELS)?;
        let mut slots = Vec::new();
        for slot in 0..MODEL_SLOTS {
            let l = linear.get(&slot, 0).context("reading LINEAR_MODELS")?;
            let t = tree.get(&slot, 0).context("reading TREE_MODELS")?;
            slots.push((false, slot, QuantizedModel::Linear(Box::new(l))));
            slots.push((true, slot, QuantizedModel::Tree(Box::new(t))));
        }
        let highest = slots
            .iter()
            .map(|(_, _, m)| match m {
                QuantizedModel::Linear(m) => m.version,
                QuantizedModel::Tree(m) => m.version,
            })
            .max()
            .unwrap_or(0);
        self.next_version = self.next_version.max(highest + 1);
        let ctl: Array<&MapData, ModelControl> = map(ebpf, map::MODEL_CONTROL)?;
        let control = ctl.get(&0, 0).context("reading MODEL_CONTROL")?;
        self.near_margin = control.near_margin;
        let Some(kind) = ModelKind::from_u32(control.kind) else {
            return Ok(None);
        };
        let tree_kind = is_tree(kind);
        let Some((_, _, model)) = slots
            .into_iter()
            .find(|(t, s, _)| *t == tree_kind && *s == control.slot)
        else {
            return Ok(None);
        };
        let (version, checksum) = match &model {
            QuantizedModel::Linear(m) => (m.version, m.checksum),
            QuantizedModel::Tree(m) => (m.version, m.checksum),
        };
        let status = slot_status(ebpf, status_index(tree_kind, control.slot))?;
        if !status.vouches(version, checksum) {
            tracing::warn!(
                "the adopted active slot is not vouched for ({status:?}); switching the model off"
            );
            self.deactivate(ebpf)?;
            return Ok(None);
        }
        let active = ActiveModel {
            kind,
            slot: control.slot,
            version,
        };
        self.active = Some(active);
        self.history.insert(version, model);
        Ok(Some(active))
    }

    /// No model: the programs stop scoring (observe only).
    pub fn deactivate(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        let mut ctl: Array<&mut MapData, ModelControl> = map_mut(ebpf, map::MODEL_CONTROL)?;
        ctl.set(0, ModelControl::default(), 0)
            .context("clearing MODEL_CONTROL")?;
        if let Some(prev) = self.active.take() {
            self.released
                .insert(status_index(is_tree(prev.kind), prev.slot), Instant::now());
        }
        Ok(())
    }
}

/// What the checker last recorded for one slot.
pub fn slot_status(ebpf: &Ebpf, index: u32) -> anyhow::Result<SlotStatus> {
    let map: Array<&MapData, SlotStatus> = map(ebpf, map::SLOT_STATUS)?;
    map.get(&index, 0).context("reading SLOT_STATUS")
}

/// Runs `kml_verify_slots` once in the kernel (BPF_PROG_TEST_RUN).
pub fn run_slot_checker(ebpf: &Ebpf) -> anyhow::Result<()> {
    let prog = ebpf
        .program(program::VERIFY_SLOTS)
        .context("program kml_verify_slots missing")?;
    let prog: &RawTracePoint = prog
        .try_into()
        .context("kml_verify_slots has an unexpected type")?;
    let fd = prog.fd().context("kml_verify_slots is not loaded")?;
    crate::sys::test_run(fd.as_fd()).context("BPF_PROG_TEST_RUN of kml_verify_slots")
}
