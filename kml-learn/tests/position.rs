//! Property tests of the position state (`kml_ebpf_common::position`): after any
//! sequence of inserts and removals in time order, the features the kernel's
//! fixed-size state gives equal the ones computed from their definition on the
//! list of queued requests, in wide arithmetic (u128, divisions), and the feature
//! vector carries them within their declared ranges.

use kml_ebpf_common::{
    features::{features_with_position, Feature, LOG_RATIO_MAX, LOG_RATIO_ONE},
    op::ReqOp,
    position::{
        PositionFeatures, QueueShape, AGE_SLOTS, COUNT_MAX, DUE_NONE, REACH, SECTOR_BUCKETS,
        WALK_BUCKETS,
    },
    RequestRecord,
};
use proptest::prelude::*;

fn ref_log2_8(v: u128) -> i64 {
    if v == 0 {
        return 0;
    }
    let n = 128 - v.leading_zeros() as i64;
    8 * n + ((v << 3) >> (n - 1) & 7) as i64
}

fn ref_log_ratio(num: u128, den: u128) -> i64 {
    (ref_log2_8(num) - ref_log2_8(den) + LOG_RATIO_ONE as i64).clamp(0, LOG_RATIO_MAX as i64)
}

struct Live {
    sector: u64,
    insert: u64,
}

/// The definition, from the list of queued requests.
struct Reference {
    live: Vec<Live>,
    shift: u32,
    budget: u128,
}

impl Reference {
    fn bucket(&self, sector: u64) -> usize {
        ((sector as u128 / (1u128 << self.shift)) % SECTOR_BUCKETS as u128) as usize
    }

    fn slot_width(&self) -> u128 {
        // A quarter of the largest power of two not above the budget (so more
        // than 1/8 of it and at most 1/4), at least 1.
        let mut p = 1u128;
        while p * 2 <= self.budget {
            p *= 2;
        }
        (p / 4).max(1)
    }

    fn insert(&mut self, sector: u64, now: u64) {
        self.live.push(Live {
            sector,
            insert: now,
        });
    }

    fn remove(&mut self, k: usize) -> Live {
        self.live.swap_remove(k)
    }

    fn position(&self, sector: u64, now: u64) -> PositionFeatures {
        let w = self.slot_width();
        let now_slot = now as u128 / w;
        let slots_old = |l: &Live| now_slot - l.insert as u128 / w;
        let queued = self.live.len() as u128;
        let in_ring: Vec<&Live> = self
            .live
            .iter()
            .filter(|l| slots_old(l) < AGE_SLOTS as u128)
            .collect();
        let head_age = if queued == 0 {
            0
        } else if (in_ring.len() as u128) < queued {
            AGE_SLOTS as u128 * w
        } else {
            in_ring.iter().map(|l| slots_old(l)).max().unwrap() * w
        };
        let younger = |slots: u128| in_ring.iter().filter(|l| slots_old(l) < slots).count() as u128;
        let sat = |v: u128| v.min(COUNT_MAX as u128) as i32;
        let due_age = head_age.saturating_sub(self.budget);
        let b0 = self.bucket(sector);
        let (mut walked, mut due, mut below_age, mut due_count) = (0u128, DUE_NONE, 0u128, 0u128);
        for step in 0..WALK_BUCKETS.min(b0 + 1) {
            // Buckets are looked at until REACH requests have been passed.
            if walked >= REACH as u128 {
                break;
            }
            let b = b0 - step;
            let here: Vec<&Live> = self
                .live
                .iter()
                .filter(|l| self.bucket(l.sector) == b)
                .collect();
            let c = here.len() as u128;
            if c == 0 {
                continue;
            }
            walked += c;
            // The bucket's oldest request, to the slot, as the head's: the ring's
            // span when it is older than the ring.
            let age = here
                .iter()
                .map(|l| slots_old(l).min(AGE_SLOTS as u128))
                .max()
                .unwrap()
                * w;
            below_age = below_age.max(age);
            if age >= due_age {
                due_count += c;
                if due == DUE_NONE {
                    due = walked.min(DUE_NONE as u128 - 1) as i32;
                }
            }
        }
        PositionFeatures {
            head_age_log: if queued == 0 {
                0
            } else {
                ref_log_ratio(head_age, self.budget) as i32
            },
            older_half: sat(queued - younger(self.budget / 2 / w)),
            expired: sat(queued - younger(self.budget / w)),
            due_below: due,
            below_age_log: if walked == 0 {
                0
            } else {
                ref_log_ratio(below_age, self.budget) as i32
            },
            lead_log: if walked == 0 {
                LOG_RATIO_MAX
            } else {
                ref_log_ratio(head_age.saturating_sub(below_age), self.budget) as i32
            },
            due_count: sat(due_count),
            recent: sat(younger(2)),
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Insert at a sector.
    Insert(u64),
    /// Remove the n-th queued request (mod the queue's length).
    Remove(usize),
    /// Query a position at a sector.
    Query(u64),
}

fn ops() -> impl Strategy<Value = (u32, u64, Vec<(u64, Op)>)> {
    (
        0u32..20,
        prop_oneof![
            Just(4_000_000u64),
            Just(8_000_000),
            Just(12_000_000),
            1u64 << 11..1 << 32
        ],
        prop::collection::vec(
            (
                prop_oneof![Just(0u64), 0u64..200_000, 0u64..20_000_000],
                prop_oneof![
                    3 => any::<u64>().prop_map(Op::Insert),
                    2 => any::<usize>().prop_map(Op::Remove),
                    2 => any::<u64>().prop_map(Op::Query),
                ],
            ),
            1..300,
        ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn state_equals_its_definition((shift, budget, steps) in ops()) {
        let mut q = QueueShape::EMPTY;
        let mut r = Reference { live: Vec::new(), shift, budget: budget as u128 };
        // Sectors within twice the buckets' span (so some wrap).
        let span = (2 * SECTOR_BUCKETS as u64) << shift;
        let mut now = 1u64 << 30;
        for (dt, op) in steps {
            now += dt;
            match op {
                Op::Insert(s) => {
                    let s = s % span;
                    q.on_insert(s, shift, now, budget);
                    r.insert(s, now);
                }
                Op::Remove(n) => {
                    if !r.live.is_empty() {
                        let l = r.remove(n % r.live.len());
                        q.on_remove(l.sector, shift, l.insert, budget);
                    }
                }
                Op::Query(s) => {
                    let s = s % span;
                    prop_assert_eq!(q.position(s, shift, now, budget), r.position(s, now));
                }
            }
            prop_assert_eq!(q.queued.net() as usize, r.live.len());
        }
        let s = now % span;
        prop_assert_eq!(q.position(s, shift, now, budget), r.position(s, now));
    }

    /// Whatever the position values, the vector keeps every feature in its range,
    /// and the position lanes carry them unchanged when they are in range.
    #[test]
    fn position_lanes_in_range(h in any::<i32>(), o in any::<i32>(), e in any::<i32>(), d in any::<i32>(), b in any::<i32>(), n in any::<i32>(), l in any::<i32>(), c in any::<i32>()) {
        let p = PositionFeatures { head_age_log: h, older_half: o, expired: e, due_below: d, below_age_log: b, recent: n, lead_log: l, due_count: c };
        let r = RequestRecord { op: ReqOp::Read as u8, insert_ns: 1, deadline_ns: 8_000_001, ..Default::default() };
        let x = features_with_position(&r, &p);
        for f in Feature::ALL {
            prop_assert!((0..=f.max_value()).contains(&x[f.index()]), "{}", f.name());
        }
        let lanes = [(Feature::HeadAgeLog, h), (Feature::OlderHalf, o), (Feature::Expired, e), (Feature::DueBelow, d), (Feature::BelowAgeLog, b), (Feature::Recent, n), (Feature::LeadLog, l), (Feature::DueCount, c)];
        for (f, v) in lanes {
            prop_assert_eq!(x[f.index()], v.clamp(0, f.max_value()), "{}", f.name());
        }
    }
}

#[test]
fn counts_saturate() {
    let mut q = QueueShape::EMPTY;
    for i in 0..70_000u64 {
        q.on_insert(0, 0, 1_000_000 + i, 8_000_000);
    }
    let p = q.position(1, 0, 1_070_000, 8_000_000);
    assert_eq!(q.buckets[0].count.net(), u32::from(u16::MAX));
    assert_eq!(p.recent, COUNT_MAX);
    assert_eq!(p.due_below, DUE_NONE - 1);
}
