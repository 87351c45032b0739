//! Per-CPU counters of the programs: nothing is lost without being counted.
//!
//! Each counter set is one `#[repr(C)]` struct of `u64`s (the value of a per-CPU
//! array map, BTF-typed, so `bpftool map dump name MAP` prints every field by name)
//! and an enum naming its fields: the programs bump a field by name and the agent
//! reads it by name, never by position.

/// Defines a counter struct and the enum that names its fields.
macro_rules! counter_set {
    (
        $(#[$struct_doc:meta])* pub struct $Struct:ident;
        $(#[$enum_doc:meta])* pub enum $Enum:ident;
        $( $(#[doc = $doc:literal])* $field:ident => $variant:ident ),+ $(,)?
    ) => {
        $(#[$struct_doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $Struct {
            $( $(#[doc = $doc])* pub $field: u64, )+
        }

        $(#[$enum_doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $Enum {
            $( $variant, )+
        }

        impl $Struct {
            pub const ALL: &'static [$Enum] = &[$($Enum::$variant),+];

            #[inline(always)]
            pub fn slot(&mut self, c: $Enum) -> &mut u64 {
                match c {
                    $( $Enum::$variant => &mut self.$field, )+
                }
            }

            pub const fn get(&self, c: $Enum) -> u64 {
                match c {
                    $( $Enum::$variant => self.$field, )+
                }
            }

            /// Adds another CPU's counters into these.
            pub fn accumulate(&mut self, other: &$Struct) {
                $( self.$field = self.$field.wrapping_add(other.$field); )+
            }
        }

        impl $Enum {
            pub const fn name(self) -> &'static str {
                match self {
                    $( $Enum::$variant => stringify!($field), )+
                }
            }
        }

        #[cfg(feature = "user")]
        // SAFETY: repr(C), only u64 fields.
        unsafe impl aya::Pod for $Struct {}
    };
}

pub(crate) use counter_set;

counter_set! {
    /// The observers' counters: one slot of the per-CPU `COUNTERS` map.
    pub struct Counters;
    /// Names a field of [`Counters`].
    pub enum Counter;
    /// block_rq_insert events on traced devices.
    inserts => Inserts,
    /// block_rq_issue events on traced devices.
    issues => Issues,
    /// block_rq_complete events on traced devices.
    completions => Completions,
    /// block_rq_requeue events on traced devices.
    requeues => Requeues,
    /// block_rq_merge events on traced devices (a request merged into another and
    /// freed: its I/O is in the other's record).
    merges => Merges,
    /// Records written to the ring buffer.
    records => Records,
    /// Records lost because the ring buffer was full.
    ring_full_drops => RingFullDrops,
    /// Completions with no in-flight entry (inserted before attach, evicted, or
    /// never inserted through the scheduler).
    orphan_completions => OrphanCompletions,
    /// Issues with no in-flight entry (the request bypassed the scheduler or was
    /// inserted before attach).
    issues_without_insert => IssuesWithoutInsert,
    /// Inserts that could not be stored in the in-flight map.
    inflight_insert_failures => InflightInsertFailures,
    /// Entries added to / removed from the in-flight map: the agent derives LRU
    /// evictions as added - removed - live entries.
    inflight_added => InflightAdded,
    inflight_removed => InflightRemoved,
    /// Completions of part of a request (the request stays in flight).
    partial_completions => PartialCompletions,
    /// Inserts of a requeued request (it is still in flight: same entry, new deadline).
    reinserts => Reinserts,
    /// Inserts (and flushes) that found the entry of an earlier request under their
    /// tag (raw tracepoints) or key: its completion was never seen (the kernel did
    /// not run the completion program for it), or, in tracepoint mode, two requests
    /// at one sector. An issued stale entry goes out as a record with
    /// `complete_ns` 0; one never issued is only counted.
    stale_entries => StaleEntries,
    /// Events dropped because a kernel read (bpf_probe_read_kernel) failed.
    read_failures => ReadFailures,
    /// Inserts the active model scored (shadow mode: the verdict is only counted).
    verdicts => Verdicts,
    verdicts_at_risk => VerdictsAtRisk,
    /// Inserts with a model configured but not usable: its slot failed the
    /// checksum (torn or corrupt) or its kind is unknown. No verdict: fail open.
    model_rejects => ModelRejects,
    /// Runs of the slot checker (`kml_verify_slots`).
    model_verifications => ModelVerifications,
    /// Live confusion matrix at completion (predicted at risk / observed missed).
    true_miss => TrueMiss,
    false_miss => FalseMiss,
    true_met => TrueMet,
    false_met => FalseMet,
    /// Records not written because the ring was filling up and the model was sure
    /// of the request (sampling mode: uncertain requests are kept first).
    sampled_out => SampledOut,
    /// Of the stale entries: the request had been inserted and never issued (its
    /// issue and completion both unseen, or an insert seen twice).
    stale_never_issued => StaleNeverIssued,
    /// Bios merged into a request already formed (`block_bio_backmerge` /
    /// `block_bio_frontmerge`): I/Os of the application that make no request of
    /// their own, on traced devices.
    bio_back_merges => BioBackMerges,
    bio_front_merges => BioFrontMerges,
    /// Flush requests (`REQ_OP_FLUSH`, issued without passing the scheduler) seen
    /// issued on traced devices: each becomes a record of its own (op flush).
    flushes => Flushes,
    /// Completions of requests that went through the flush machinery without an
    /// entry of their own: the empty `REQ_PREFLUSH` write an fsync sends (its flush
    /// is the `flushes` record). One per fsync of the application; not orphans.
    flush_parent_completions => FlushParentCompletions,
    /// Of the merges: requests merged as they were being inserted, before their
    /// insert event (they never had an entry).
    merges_at_insert => MergesAtInsert,
    /// Raw tracepoints: events of requests whose scheduler tag lies beyond the
    /// device's share of `REQS` (hardware queues × nr_requests above 4096): not
    /// followed.
    untracked_requests => UntrackedRequests,
    /// Raw tracepoints: request queue → device lookups that missed the cache (the
    /// first event of a disk, or after the traced set changed).
    qcache_misses => QcacheMisses,
}

counter_set! {
    /// Per-device event counts: one slot of the per-CPU `DEVICE_EVENTS` map, per
    /// device slot (the agent sums the CPUs).
    pub struct DeviceEvents;
    /// Names a field of [`DeviceEvents`].
    pub enum DeviceEvent;
    inserts => Inserts,
    records => Records,
    /// Requests merged into another (`block_rq_merge`).
    rq_merges => RqMerges,
    bio_back_merges => BioBackMerges,
    bio_front_merges => BioFrontMerges,
    flushes => Flushes,
    flush_parent_completions => FlushParentCompletions,
    stale_entries => StaleEntries,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_named() {
        let mut c = Counters::default();
        for (i, k) in Counters::ALL.iter().enumerate() {
            *c.slot(*k) += i as u64 + 1;
        }
        for (i, k) in Counters::ALL.iter().enumerate() {
            assert_eq!(c.get(*k), i as u64 + 1, "{}", k.name());
        }
        let mut sum = Counters::default();
        sum.accumulate(&c);
        sum.accumulate(&c);
        assert_eq!(sum.get(Counter::Records), 2 * c.get(Counter::Records));
        assert_eq!(core::mem::size_of::<Counters>(), 8 * Counters::ALL.len());
    }
}
