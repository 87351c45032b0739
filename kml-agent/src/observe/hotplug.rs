//! Disks that come and go while `run` observes: a detached loop device (its
//! /sys/block entry stays, with size 0), a disk removed, a new disk, a scheduler
//! switched away from mq-deadline. Polled from /sys/block once a second; each
//! change is applied to the programs' maps and logged.

use std::collections::BTreeMap;

use crate::{devices::BlockDevice, observe::Observer};

/// A change to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Stop tracing (`why`: detached, removed, scheduler changed, renumbered).
    Gone {
        name: String,
        dev: u32,
        why: &'static str,
    },
    /// Start tracing.
    Appeared(BlockDevice),
}

/// Can `d` be traced now: attached (non-zero size) and on mq-deadline.
fn traceable(d: &BlockDevice) -> bool {
    d.size_sectors > 0 && d.is_mq_deadline()
}

/// What to do, given the devices asked for (`None`: every mq-deadline disk), the
/// devices traced now (name, dev) and the disks present.
pub fn plan(
    wanted: Option<&[String]>,
    traced: &[(String, u32)],
    present: &[BlockDevice],
) -> Vec<Change> {
    let by_name: BTreeMap<&str, &BlockDevice> =
        present.iter().map(|d| (d.name.as_str(), d)).collect();
    let mut out = Vec::new();
    for (name, dev) in traced {
        let why = match by_name.get(name.as_str()) {
            None => Some("removed"),
            Some(d) if d.dev() != *dev => Some("renumbered"),
            Some(d) if d.size_sectors == 0 => Some("detached"),
            Some(d) if !d.is_mq_deadline() => Some("no longer on mq-deadline"),
            Some(_) => None,
        };
        if let Some(why) = why {
            out.push(Change::Gone {
                name: name.clone(),
                dev: *dev,
                why,
            });
        }
    }
    for d in present {
        let asked = wanted.is_none_or(|w| w.iter().any(|n| n == &d.name));
        let still_traced = traced
            .iter()
            .any(|(n, dev)| *n == d.name && *dev == d.dev());
        if asked && traceable(d) && !still_traced {
            out.push(Change::Appeared(d.clone()));
        }
    }
    out
}

/// Watches /sys/block on behalf of a running observer.
pub struct DeviceWatch {
    /// Names asked for with --device (`None`: every mq-deadline disk).
    wanted: Option<Vec<String>>,
}

impl DeviceWatch {
    /// `requested`: the --device arguments (names or paths) as given.
    pub fn new(requested: &[String]) -> DeviceWatch {
        let wanted = (!requested.is_empty()).then(|| {
            requested
                .iter()
                .map(|s| {
                    s.trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or(s)
                        .to_owned()
                })
                .collect()
        });
        DeviceWatch { wanted }
    }

    /// Compares /sys/block with what `observer` traces and applies the changes.
    /// A change that fails is logged and retried at the next check, never fatal.
    pub fn check(&mut self, observer: &mut Observer) {
        let traced: Vec<(String, u32)> = observer
            .devices()
            .iter()
            .map(|d| (d.device.name.clone(), d.device.dev()))
            .collect();
        let present = crate::devices::list();
        for change in plan(self.wanted.as_deref(), &traced, &present) {
            match change {
                Change::Gone { name, dev, why } => match observer.remove_device(dev) {
                    Ok(stale) => tracing::info!(
                        "{name} {why}: no longer traced ({stale} stale in-flight entries removed)"
                    ),
                    Err(e) => tracing::info!("{name} {why}, but removing it failed: {e:#}"),
                },
                Change::Appeared(d) => match observer.add_device(&d) {
                    Ok(()) => tracing::info!(
                        "{} ({}:{}) appeared on mq-deadline: now traced",
                        d.name,
                        d.major,
                        d.minor
                    ),
                    Err(e) => tracing::info!("{} appeared, but adding it failed: {e:#}", d.name),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, minor: u32, size: u64, sched: &str) -> BlockDevice {
        BlockDevice {
            name: name.into(),
            major: 7,
            minor,
            size_sectors: size,
            scheduler: Some(sched.into()),
            available_schedulers: vec![],
            iosched: Default::default(),
        }
    }

    #[test]
    fn detached_removed_and_switched_devices_go() {
        let a = disk("loop1", 1, 0, "mq-deadline");
        let b = disk("loop2", 2, 100, "none");
        let traced = vec![
            ("loop1".to_string(), a.dev()),
            ("loop2".to_string(), b.dev()),
            (
                "loop3".to_string(),
                disk("loop3", 3, 1, "mq-deadline").dev(),
            ),
        ];
        let whys: Vec<&str> = plan(None, &traced, &[a, b])
            .into_iter()
            .map(|c| match c {
                Change::Gone { why, .. } => why,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(whys, ["detached", "no longer on mq-deadline", "removed"]);
    }

    #[test]
    fn new_disks_join_only_when_asked_for() {
        let new = disk("loop4", 4, 100, "mq-deadline");
        let unattached = disk("loop5", 5, 0, "mq-deadline");
        let other_sched = disk("loop6", 6, 100, "none");
        let present = [new.clone(), unattached, other_sched];
        assert_eq!(plan(None, &[], &present), [Change::Appeared(new.clone())]);
        // Explicit devices: only those named (a device that comes back is re-added).
        assert_eq!(
            plan(Some(&["loop4".to_string()]), &[], &present),
            [Change::Appeared(new.clone())]
        );
        assert!(plan(Some(&["loop9".to_string()]), &[], &present).is_empty());
        // Already traced: nothing to do.
        assert!(plan(None, &[("loop4".into(), new.dev())], &present).is_empty());
    }

    #[test]
    fn a_name_reused_by_another_device_is_replaced() {
        let before = disk("loop4", 4, 100, "mq-deadline");
        let mut after = before.clone();
        after.minor = 40;
        let changes = plan(None, &[("loop4".into(), before.dev())], &[after.clone()]);
        assert_eq!(
            changes,
            [
                Change::Gone {
                    name: "loop4".into(),
                    dev: before.dev(),
                    why: "renumbered"
                },
                Change::Appeared(after)
            ]
        );
    }

    #[test]
    fn device_names_from_paths() {
        let w = DeviceWatch::new(&[
            "/dev/loop3".into(),
            "vda".into(),
            "/sys/block/loop7/".into(),
        ]);
        assert_eq!(w.wanted.unwrap(), ["loop3", "vda", "loop7"]);
        assert!(DeviceWatch::new(&[]).wanted.is_none());
    }
}
