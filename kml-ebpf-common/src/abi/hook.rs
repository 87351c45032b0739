//! The act stage's contract: kml's patched mq-deadline calls
//! `int dd_kml_verdict(struct request *rq)` ([`FUNCTION`]) for each request entering
//! one of its FIFOs; the verdict program (`kml_hook_verdict`) replaces its return
//! value when it decides to serve the request early. Its policy is `HOOK_POLICY[0]`
//! ([`Policy`]), its hold-out `HOOK_POLICY[1]` ([`HOOK_HOLD_OUT`]); what it did is counted in `HOOK_COUNTERS` ([`HookCounters`]); the
//! kernel's own side of each boost is in the iosched attributes ([`ATTR_BOOSTS`],
//! [`ATTR_CAPPED`], [`ATTR_BOOST_MAX`]).

use super::{
    counters::counter_set,
    op::ReqOp,
    record::{RequestRecord, Sampling, Verdict},
};

/// The kernel function kml's mq-deadline patch adds (kernel/0001-mq-deadline-kml-hook.patch).
pub const FUNCTION: &str = "dd_kml_verdict";

/// iosched attribute: requests the kernel served early on a positive verdict.
pub const ATTR_BOOSTS: &str = "kml_boosts";
/// iosched attribute: positive verdicts the kernel refused (over the cap).
pub const ATTR_CAPPED: &str = "kml_capped";
/// iosched attribute: the cap of boosts per direction per read_expire window.
pub const ATTR_BOOST_MAX: &str = "kml_boost_max";

/// The verdict program's policy (`HOOK_POLICY[0]`, the enum's `u32` value).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Policy {
    /// Attach, count calls, never boost.
    Off = 0,
    /// Boost every read.
    Reads = 1,
    /// Boost a read only while writes wait in the scheduler's FIFOs.
    ReadsUnderWrites = 2,
    /// Boost what the active model flagged at risk at insert (needs the observers
    /// and a model in the same object: `kml-agent run --act model`).
    Model = 3,
    /// The model's at-risk verdicts, for reads only (`kml-agent run --act`).
    ModelReads = 4,
    /// Boost a read only while the scheduler serves a write batch (its last
    /// dispatch was a write and writes wait): a boost during a read batch ends that
    /// batch and brings the next forced write batch closer (`writes_starved`).
    ReadsBehindWrites = 5,
}

impl Policy {
    pub const ALL: [Policy; 6] = [
        Policy::Off,
        Policy::Reads,
        Policy::ReadsUnderWrites,
        Policy::Model,
        Policy::ModelReads,
        Policy::ReadsBehindWrites,
    ];

    /// The policy a `HOOK_POLICY` value names; `None` for an unknown value.
    #[inline(always)]
    pub const fn from_u32(v: u32) -> Option<Policy> {
        match v {
            0 => Some(Policy::Off),
            1 => Some(Policy::Reads),
            2 => Some(Policy::ReadsUnderWrites),
            3 => Some(Policy::Model),
            4 => Some(Policy::ModelReads),
            5 => Some(Policy::ReadsBehindWrites),
            _ => None,
        }
    }

    /// The name on the command line (`kml-agent hook --policy NAME`, `run --act NAME`).
    pub const fn name(self) -> &'static str {
        match self {
            Policy::Off => "off",
            Policy::Reads => "reads",
            Policy::ReadsUnderWrites => "reads-under-writes",
            Policy::Model => "model",
            Policy::ModelReads => "model-reads",
            Policy::ReadsBehindWrites => "reads-behind-writes",
        }
    }

    /// Whether the policy acts on the model's verdicts (stored by the observers).
    pub const fn uses_model(self) -> bool {
        matches!(self, Policy::Model | Policy::ModelReads)
    }

    /// Whether this (model) policy acted on the request of `r`: its verdict was
    /// at risk, the policy serves its direction early, and the hook did not hold
    /// it out ([`Sampling::HELD_OUT`]). Its outcome is then the boost's, not the
    /// one the verdict predicted: a model must not learn from it, nor be judged
    /// by it. (The kernel may still have refused the boost over its cap: such a
    /// request counts as acted on, which leaves out a little more than needed.)
    pub fn acted_on(self, r: &RequestRecord) -> bool {
        self.serves_at_risk(ReqOp::from_u8(r.op))
            && r.verdict == Verdict::AT_RISK
            && r.sampling & Sampling::HELD_OUT == 0
    }

    /// Whether this (model) policy serves an at-risk request of `op` early: every
    /// one for [`Policy::Model`], reads for [`Policy::ModelReads`]; no fixed
    /// policy acts on a verdict. The verdict program and [`Policy::acted_on`] both
    /// ask here.
    #[inline(always)]
    pub fn serves_at_risk(self, op: ReqOp) -> bool {
        match self {
            Policy::Model => true,
            Policy::ModelReads => matches!(op, ReqOp::Read),
            _ => false,
        }
    }
}

/// `HOOK_POLICY[HOOK_HOLD_OUT]`: while a model policy acts and the agent learns
/// online, the hook leaves one in `2^value` of the requests it would serve early
/// alone, at random, and marks them ([`Sampling::HELD_OUT`]); 0: it acts on all.
/// Without them, online learning would see only outcomes the verdicts changed
/// (a boosted read meets its deadline), and learn that what it flags is safe.
pub const HOOK_HOLD_OUT: u32 = 1;

/// The largest hold-out shift the hook accepts (one in 65,536).
pub const HOLD_OUT_MAX_SHIFT: u32 = 16;

/// Entries of `HOOK_POLICY`: the policy, the hold-out shift.
pub const HOOK_POLICY_ENTRIES: u32 = 2;

impl core::fmt::Display for Policy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

counter_set! {
    /// The verdict program's counters: one slot of the per-CPU `HOOK_COUNTERS` map.
    pub struct HookCounters;
    /// Names a field of [`HookCounters`].
    pub enum HookCounter;
    /// Program runs (requests that entered a FIFO of a patched mq-deadline).
    calls => Calls,
    /// Positive verdicts handed to the kernel (it may still refuse some: cap).
    boosts => Boosts,
    /// Reads among the calls (for the device filter's disk).
    reads => Reads,
    /// Kernel reads (bpf_probe_read_kernel) that failed.
    read_failures => ReadFailures,
    /// Calls for requests of other disks than the filtered one.
    skipped_device => SkippedDevice,
    /// Model policies: requests with no fresh verdict in `INFLIGHT` (not traced, no
    /// model active, the insert program did not run for it).
    no_verdict => NoVerdict,
    /// Model policies: requests the model flagged at risk (before the direction filter).
    model_at_risk => ModelAtRisk,
    /// Model policies while learning online: requests the policy would have served
    /// early and left alone to learn from ([`HOOK_HOLD_OUT`]).
    held_out => HeldOut,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_through_their_values() {
        for p in Policy::ALL {
            assert_eq!(Policy::from_u32(p as u32), Some(p), "{p}");
        }
        assert_eq!(Policy::from_u32(Policy::ALL.len() as u32), None);
        assert_eq!(Policy::ReadsUnderWrites.name(), "reads-under-writes");
        assert!(Policy::ModelReads.uses_model() && !Policy::Reads.uses_model());
    }

    #[test]
    fn a_model_policy_acts_on_the_at_risk_requests_it_serves_and_not_the_held_out() {
        let rec = |op: ReqOp, verdict: u8, sampling: u8| RequestRecord {
            op: op as u8,
            verdict,
            sampling,
            ..RequestRecord::default()
        };
        let read_at_risk = rec(ReqOp::Read, Verdict::AT_RISK, 0);
        let write_at_risk = rec(ReqOp::Write, Verdict::AT_RISK, Sampling::NEAR_BOUNDARY);
        let held_out = rec(ReqOp::Read, Verdict::AT_RISK, Sampling::HELD_OUT);
        let meets = rec(ReqOp::Read, Verdict::MEETS, 0);
        let none = rec(ReqOp::Read, Verdict::NONE, 0);
        assert!(Policy::ModelReads.acted_on(&read_at_risk));
        assert!(!Policy::ModelReads.acted_on(&write_at_risk));
        assert!(Policy::Model.acted_on(&write_at_risk));
        for p in Policy::ALL {
            assert!(!p.acted_on(&held_out), "{p}");
            assert!(!p.acted_on(&meets), "{p}");
            assert!(!p.acted_on(&none), "{p}");
        }
        // The fixed policies act on the op, not on a verdict: nothing to leave out.
        assert!(!Policy::Reads.acted_on(&read_at_risk));
        assert!(!Policy::ReadsUnderWrites.acted_on(&read_at_risk));
    }

    #[test]
    fn hook_counters_are_named_slots() {
        let mut c = HookCounters::default();
        *c.slot(HookCounter::Boosts) += 3;
        assert_eq!(c.boosts, 3);
        assert_eq!(HookCounter::ModelAtRisk.name(), "model_at_risk");
        assert_eq!(
            core::mem::size_of::<HookCounters>(),
            8 * HookCounters::ALL.len()
        );
    }
}
