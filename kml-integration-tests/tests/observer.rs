//! The observer on the running kernel: real programs, real loop devices, real I/O.

use anyhow::{ensure, Context as _, Result};
use kml_agent::{
    kernel::attach::AttachMode,
    observe::{Observer, ObserverConfig},
};
use kml_ebpf_common::{
    abi::names::map,
    device::ReqState,
    label::{expire_jiffies, jiffies_late, on_the_tick, time_after_eq},
    position::KERNEL_COMPUTES_POSITION,
    Counter, ReqOp, RequestRecord, BATCH_RECORDS,
};
use kml_integration_tests::{
    accounting::{alone_on_the_block_tracepoints, explain, recursion_misses, DiskStats, Losses},
    assert_no_kml_programs, chain,
    ftrace::EventCount,
    issue_direct, scattered_pattern, Issued, LoopDevice,
};

const READ_EXPIRE_MS: u32 = 500;
const WRITE_EXPIRE_MS: u32 = 5000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Issues a known pattern of synchronous O_DIRECT requests and checks that the
/// records say exactly that, field by field: every request the block layer
/// completed on the device (its own statistics) is a record, or a loss a kernel
/// counter names; the test's own requests are the issued sequence; every state
/// feature equals a replay of the records before it.
fn known_pattern_is_recorded_exactly(mode: AttachMode) -> Result<()> {
    const SIZE_MIB: u64 = 64;
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(SIZE_MIB, READ_EXPIRE_MS, WRITE_EXPIRE_MS)?;
    let bdev = dev.block_device()?;
    let pattern = scattered_pattern(1000, SIZE_MIB, 7);
    let hz = kml_agent::kernel::clock::tick_rate()
        .map_err(anyhow::Error::msg)?
        .hz;

    let (records, counters, losses, stats) = runtime().block_on(async {
        let mut observer = Observer::load(ObserverConfig {
            position_always: true,
            ..ObserverConfig::new(mode)
        })?;
        observer.add_device(&bdev)?;
        let mut stream = observer.records()?;
        observer.attach()?;
        let before = DiskStats::read(&dev.name)?;
        // 2,000 records fit the default 8 MiB ring: drain once at the end.
        issue_direct(&dev, &pattern)?;
        let stats = before.delta(&DiskStats::read(&dev.name)?);
        let missed = recursion_misses(&observer)?;
        observer.detach();
        let mut records = Vec::new();
        stream.drain(&mut records);
        let counters = observer.counters()?;
        let losses = Losses::from_counters(&counters, missed, observer.live_inflight()?);
        anyhow::Ok((records, counters, losses, stats))
    })?;
    assert_no_kml_programs()?;

    let on_dev: Vec<RequestRecord> = records
        .iter()
        .filter(|r| r.dev == bdev.dev())
        .copied()
        .collect();
    ensure!(
        on_dev.len() == records.len(),
        "records of devices not traced: {}",
        records.len() - on_dev.len()
    );
    // The block layer's count of completed requests on the device is the oracle.
    ensure!(
        stats.requests() >= pattern.len() as u64 && stats.merges() == 0,
        "the device completed {stats:?} for {} synchronous requests",
        pattern.len()
    );
    let lost = explain(
        "requests completed on the device",
        stats.requests(),
        on_dev.len() as u64,
        &losses,
    )
    .with_context(|| {
        // Which of the issued requests are missing, and what the programs saw.
        let seen: std::collections::BTreeSet<(u64, ReqOp)> =
            on_dev.iter().map(|r| (r.sector, r.op())).collect();
        let missing: Vec<String> = pattern
            .iter()
            .enumerate()
            .filter(|(_, p)| !seen.contains(&(p.sector, p.op)))
            .map(|(i, p)| format!("#{i} {:?} at {}", p.op, p.sector))
            .collect();
        format!("{mode:?}: missing {missing:?}; {counters:?}")
    })?;

    // Only the test's own requests: the issued sequence, in insert order
    // (synchronous I/O), but for records the kernel counted as lost. The ring's
    // order is not that: each CPU writes its records in batches.
    let me = std::process::id();
    let mut ours: Vec<&RequestRecord> = on_dev.iter().filter(|r| r.pid == me).collect();
    ours.sort_by_key(|r| r.insert_ns);
    let seen: Vec<Issued> = ours
        .iter()
        .map(|r| Issued {
            op: r.op(),
            sector: r.sector,
            nr_sectors: r.nr_sectors,
        })
        .collect();
    let mut expected = pattern.iter();
    let mut skipped = 0u64;
    for (i, s) in seen.iter().enumerate() {
        loop {
            let p = expected.next().with_context(|| {
                // Seen once in a clean-clone CI run (2026-12-03, not again in 10
                // runs of the suite): say enough to tell a duplicate, a reorder
                // and a foreign request apart.
                let at: Vec<usize> = (0..pattern.len()).filter(|&j| pattern[j] == *s).collect();
                let before = seen[..i].iter().filter(|x| *x == s).count();
                format!(
                    "record {i} {s:?} is not in the issued pattern from where the records before it \
                     matched ({} issued, {} records of this process, {} on the device); it is issued \
                     at {at:?} and recorded {before} times before; the record: {:?}; {losses}",
                    pattern.len(),
                    ours.len(),
                    on_dev.len(),
                    ours[i]
                )
            })?;
            if p == s {
                break;
            }
            skipped += 1;
        }
    }
    skipped += expected.count() as u64;
    ensure!(
        skipped <= lost,
        "{skipped} issued requests have no record, but only {lost} losses were counted ({losses})"
    );
    let others = on_dev.len() - ours.len();
    if others > 0 {
        eprintln!("note: {others} requests of other tasks on the device (checked in the replay)");
    }

    // In flight, queued, time since the last insert, issue distance, the moving
    // averages: all recomputed from the records of every task on the device.
    let replay = chain::replay(&on_dev, lost)?;
    ensure!(
        replay.checked + replay.restarts.len() + replay.races.len() == on_dev.len(),
        "{replay:?}"
    );
    for r in &replay.restarts {
        eprintln!("NOTE: chain restarted after a counted loss: {r}");
    }
    for r in &replay.races {
        eprintln!("NOTE: chain restarted at a race between CPUs: {r}");
    }

    for (i, r) in ours.iter().enumerate() {
        let expire_ms = if r.op() == ReqOp::Read {
            READ_EXPIRE_MS
        } else {
            WRITE_EXPIRE_MS
        };
        ensure!(
            r.deadline_ns - r.insert_ns == u64::from(expire_ms) * 1_000_000,
            "request {i}: deadline is insert + {} ns, expected {expire_ms} ms",
            r.deadline_ns - r.insert_ns
        );
        // The scheduler's deadline in jiffies (kml_ebpf_common::label): raw
        // tracepoints read mq-deadline's own `fifo_time`, set from the jiffies just
        // after the insert tracepoint (a tick may fall in between); classic ones
        // compute insert jiffies + expiry.
        let expire_j = expire_jiffies(u64::from(expire_ms), hz);
        let fifo_after = r.fifo_time.wrapping_sub(r.insert_jiffies);
        // Raw tracepoints: the assignment comes before the dispatch, and a loaded
        // host can stop the CPU for several ticks in between.
        let tick_between = match mode {
            AttachMode::RawTracepoint => r.issue_jiffies.wrapping_sub(r.insert_jiffies).max(1),
            AttachMode::Tracepoint => 0,
        };
        ensure!(
            r.insert_jiffies != 0 && (expire_j..=expire_j + tick_between).contains(&fifo_after),
            "request {i}: fifo_time is insert jiffies + {fifo_after}, expected {expire_j} (HZ {hz}): {r:?}"
        );
        // The jiffies moved with the ns clock: each tick is 1/HZ s.
        let ticks = |from_ns: u64, to_ns: u64| (to_ns - from_ns) * hz / 1_000_000_000;
        let dj = r.issue_jiffies.wrapping_sub(r.insert_jiffies);
        let dt = ticks(r.insert_ns, r.issue_ns);
        ensure!(
            time_after_eq(r.issue_jiffies, r.insert_jiffies) && dj <= dt + 1 && dj + 1 >= dt,
            "request {i}: {dj} jiffies from insert to issue in {} ns (HZ {hz})",
            r.issue_ns - r.insert_ns
        );
        ensure!(r.error == 0 && r.requeues == 0, "request {i}: {r:?}");
        ensure!(
            !r.deadline_missed() && !r.deadline_missed_ns(),
            "request {i} missed a {expire_ms} ms deadline on an idle disk: {r:?}"
        );
        // One request at a time: the queue it joins is empty, and the position it
        // recorded is that of an empty queue (exact when no loss and no other task).
        // No position at all where the kernel does not compute it (classic
        // tracepoints keep no position state: lifecycle::position_on).
        if !KERNEL_COMPUTES_POSITION || mode == AttachMode::Tracepoint {
            ensure!(
                r.recorded_position().is_none(),
                "request {i}: a position recorded, but the kernel does not compute it: {r:?}"
            );
        } else if lost == 0 && others == 0 {
            let mut empty = kml_ebpf_common::position::QueueShape::EMPTY;
            let expect = empty.position(
                r.sector,
                kml_ebpf_common::position::bucket_shift_for(bdev.size_sectors),
                r.insert_ns,
                r.deadline_ns - r.insert_ns,
            );
            ensure!(
                r.recorded_position() == Some(expect),
                "request {i}: position {:?}, an empty queue gives {expect:?}",
                r.recorded_position()
            );
        }
        let sync = r.flags().contains(kml_ebpf_common::ReqFlags::SYNC);
        ensure!(
            r.op() == ReqOp::Read || sync,
            "request {i}: O_DIRECT write not flagged sync: {r:?}"
        );
    }

    ensure!(
        counters.get(Counter::Records) == records.len() as u64,
        "records counter {counters:?}"
    );
    let unseen = records.iter().filter(|r| r.complete_ns == 0).count() as u64;
    ensure!(
        unseen <= counters.get(Counter::StaleEntries),
        "{unseen} records without a completion, {} stale entries",
        counters.get(Counter::StaleEntries)
    );
    for c in [
        Counter::RingFullDrops,
        Counter::InflightInsertFailures,
        Counter::ReadFailures,
    ] {
        ensure!(counters.get(c) == 0, "{} = {}", c.name(), counters.get(c));
    }
    ensure!(
        lost > 0 || counters.get(Counter::Inserts) == stats.requests(),
        "inserts {} != requests completed {} ({counters:?})",
        counters.get(Counter::Inserts),
        stats.requests()
    );
    Ok(())
}

#[test]
fn raw_tracepoints_record_known_pattern_exactly() -> Result<()> {
    known_pattern_is_recorded_exactly(AttachMode::RawTracepoint)
}

#[test]
fn tracepoints_record_known_pattern_exactly() -> Result<()> {
    known_pattern_is_recorded_exactly(AttachMode::Tracepoint)
}

/// More requests than the device has tags: requests wait in mq-deadline, the
/// in-flight and queued counts move and return to zero, and with a one-jiffy
/// expiry requests are dispatched after their deadline and labelled missed.
/// Every I/O fio completed is a request the block layer completed or merged (its
/// own statistics), and every such request is a record or a counted loss.
#[test]
fn in_flight_counts_and_misses_under_concurrency() -> Result<()> {
    concurrency_is_accounted(AttachMode::RawTracepoint)
}

/// The same under fio in classic tracepoint mode, where requests are keyed by
/// sector: two queued requests at one sector share an entry (`reinserts`, a
/// counted loss), and everything else adds up as in raw tracepoint mode.
#[test]
fn tracepoints_account_for_every_request_under_fio() -> Result<()> {
    concurrency_is_accounted(AttachMode::Tracepoint)
}

fn concurrency_is_accounted(mode: AttachMode) -> Result<()> {
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(128, 1, 1)?;
    let bdev = dev.block_device()?;
    let mut fio = std::process::Command::new("fio");
    fio.args([
        "--name=burst",
        "--rw=randrw",
        "--bs=16k",
        "--direct=1",
        "--ioengine=libaio",
        // 3 × 128 in flight exceeds the loop device's 128 driver tags, so
        // requests must wait in mq-deadline: 256 of them (its nr_requests), so
        // that some wait past the 4 ms expiry even on a fast machine (with 2 ×
        // 128, none did in one run of three).
        "--iodepth=128",
        "--numjobs=3",
        "--size=64M",
        "--io_size=48M",
        "--randseed=42",
        "--group_reporting",
        "--output-format=json",
    ])
    .arg(format!("--filename={}", dev.path.display()));
    let run = observe_fio(mode, &dev, &bdev, &mut fio)?;
    let (records, counters, state, losses, stats) =
        (run.records, run.counters, run.state, run.losses, run.stats);
    let job = &run.fio["jobs"][0];
    let fio_ios = job["read"]["total_ios"].as_u64().unwrap_or(0)
        + job["write"]["total_ios"].as_u64().unwrap_or(0);
    eprintln!(
        "{mode:?}: fio {fio_ios} I/Os, device {stats:?}, {} records; reinserts {} requeues {}; losses: {losses}",
        records.len(),
        counters.get(Counter::Reinserts),
        counters.get(Counter::Requeues)
    );
    // fio against the block layer, no kml involved: each 16 KiB I/O is one bio,
    // which is a request or was merged into one.
    ensure!(
        fio_ios == stats.requests() + stats.merges(),
        "fio completed {fio_ios} I/Os, the device {stats:?}"
    );
    // The block layer against kml: every completed request is a record, or lost
    // and counted. Request merges (block_rq_merge) are among the device's merges.
    explain(
        "requests completed on the device",
        stats.requests(),
        records.iter().filter(|r| r.dev == bdev.dev()).count() as u64,
        &losses,
    )
    .with_context(|| format!("{mode:?}: {counters:?}"))?;
    ensure!(
        counters.get(Counter::Merges) <= stats.merges(),
        "{} request merges traced, the device counted {stats:?}",
        counters.get(Counter::Merges)
    );
    let max_inflight = records
        .iter()
        .map(RequestRecord::inflight)
        .max()
        .unwrap_or(0);
    // At most 3 × 128 - 1 others, but for requests whose completion the programs
    // never saw (counted losses): they stay in the count until their entry goes.
    ensure!(
        max_inflight > 128 && u64::from(max_inflight) < 384 + losses.total(),
        "max in flight {max_inflight}: 3 jobs × depth 128 must exceed the 128 tags, and at most \
         384 + {} counted losses",
        losses.total()
    );
    ensure!(
        records.iter().any(|r| r.queued() > 0),
        "no request ever found another queued"
    );
    ensure!(
        records.iter().any(|r| r.queued_read > 0) && records.iter().any(|r| r.queued_write > 0),
        "per-direction queue counts never moved"
    );
    ensure!(
        records
            .iter()
            .any(|r| r.dir_wait_ewma_ns > 0 && r.issue_gap_ewma_ns > 0),
        "load averages never moved"
    );
    // Everything completed: the device counts are back to zero, but for requests
    // whose completion the programs never saw (counted losses: their entries
    // stay until their key comes back).
    let left = state.inflight_read + state.inflight_write + state.queued_read + state.queued_write;
    ensure!(
        left <= losses.total(),
        "{left} requests still counted after fio ended, {} counted losses: {state:?}",
        losses.total()
    );
    // mq-deadline keeps expiries in jiffies: 1 ms reads back as one jiffy (4 ms at
    // HZ=250), and that is the deadline the kernel applies.
    let (read_expire, write_expire) = bdev.expiries()?;
    ensure!(
        read_expire.as_millis() >= 1 && read_expire == write_expire,
        "{read_expire:?} {write_expire:?}"
    );
    let expire = read_expire.as_nanos() as u64;
    if let Some(r) = records
        .iter()
        .find(|r| r.deadline_ns - r.insert_ns != expire)
    {
        anyhow::bail!("deadline is not insert + read/write_expire ({read_expire:?}): {r:?}");
    }
    // The scheduler's own deadline, read at issue: jiffies at insert + the expiry
    // in jiffies (+1 if a tick fell between the tracepoint and the assignment),
    // earlier only for a request that absorbed an older one by a merge.
    let hz = kml_agent::kernel::clock::tick_rate()
        .map_err(anyhow::Error::msg)?
        .hz;
    let expire_j = expire_jiffies(read_expire.as_millis() as u64, hz);
    let mut earlier = 0u64;
    // A record with no issue is a counted loss's artefact: in classic tracepoint
    // mode a completion at the sector of a request inserted after a lost one ends
    // that newer request's entry before its issue.
    let unissued = records.iter().filter(|r| r.issue_ns == 0).count() as u64;
    ensure!(
        unissued <= losses.total(),
        "{unissued} records never issued, {} counted losses",
        losses.total()
    );
    for r in records.iter().filter(|r| r.issue_ns != 0) {
        let after = r.fifo_time.wrapping_sub(r.insert_jiffies) as i64;
        // The assignment comes before the dispatch: on a loaded host the CPU can
        // stop between the tracepoint and it for several ticks (seen: 4, with the
        // request issued 4 ticks after its insert).
        let ticks_between = (r.issue_jiffies.wrapping_sub(r.insert_jiffies) as i64).max(1);
        ensure!(
            r.requeues == 0 && r.issue_jiffies != 0 && after <= expire_j as i64 + ticks_between,
            "fifo_time is insert jiffies + {after}, expiry {expire_j} jiffies, issued {ticks_between} ticks after: {r:?}"
        );
        earlier += u64::from(after < expire_j as i64);
    }
    ensure!(
        earlier <= counters.get(Counter::Merges),
        "{earlier} requests with a deadline earlier than their own, {} merges",
        counters.get(Counter::Merges)
    );
    // What evaluations split the label by (kml_learn::TickBand): every issued
    // request carries both jiffies, so the band covers the whole run.
    let issued = || records.iter().filter(|r| r.issue_ns != 0);
    ensure!(issued().next().is_some(), "no record was issued");
    ensure!(
        issued().all(|r| jiffies_late(r).is_some()),
        "an issued record without its jiffies: {:?}",
        issued().find(|r| jiffies_late(r).is_none())
    );
    eprintln!(
        "{mode:?} tick band: {} of {} issued requests dispatched in their deadline's jiffy or the next",
        issued().filter(|r| on_the_tick(r)).count(),
        issued().count()
    );
    // The position the programs recorded at insert, against the host's replay of
    // the same state over the records (kml_learn::replay). Inserts are serialised
    // by the scheduler's lock but dispatches update the state from other CPUs
    // without one, and the replay orders events by their ns times: close events
    // can land in another order. Most must agree exactly.
    let shifts = std::collections::HashMap::from([(
        bdev.dev(),
        kml_ebpf_common::position::bucket_shift_for(bdev.size_sectors),
    )]);
    let replayed = kml_learn::replay::replay_positions(&records, &shifts);
    let computes = KERNEL_COMPUTES_POSITION && mode == AttachMode::RawTracepoint;
    if !computes {
        ensure!(
            records.iter().all(|r| r.recorded_position().is_none()),
            "records with a position, but the kernel does not compute it ({mode:?})"
        );
    }
    let known = records
        .iter()
        .filter(|r| r.recorded_position().is_some())
        .count();
    let same = records
        .iter()
        .zip(&replayed)
        .filter(|(r, p)| r.recorded_position() == Some(**p))
        .count();
    eprintln!(
        "{mode:?} position: {known} of {} records carry one; {same} equal the host's replay",
        records.len()
    );
    // Which lanes differ, and whether the difference grows along the run (a
    // drifting count) or stays flat (event order).
    let mut lane_same = [0usize; kml_ebpf_common::position::LANES];
    let half = records.len() / 2;
    let (mut same_first, mut same_second) = (0usize, 0usize);
    for (i, (r, p)) in records.iter().zip(&replayed).enumerate() {
        let Some(k) = r.recorded_position() else {
            continue;
        };
        let (kl, pl) = (k.to_lanes(), p.to_lanes());
        for l in 0..lane_same.len() {
            lane_same[l] += usize::from(kl[l] == pl[l]);
        }
        if k == *p {
            if i < half {
                same_first += 1
            } else {
                same_second += 1
            }
        }
    }
    eprintln!(
        "{mode:?} position lanes equal to the replay: {lane_same:?}; whole vectors {same_first} in the first half, {same_second} in the second"
    );
    if computes {
        ensure!(known == records.len(), "records without a position");
        // Raw tracepoints follow each request by its tag: 99.5%, 90.3% and 93.8%
        // agreed in three runs (the second and third with a kernel build on the
        // other core); what differs is the order of events close together on two
        // CPUs, mostly the head's age at a ring slot's edge.
        ensure!(
            same * 100 >= known * 80,
            "{same} of {known} positions agree with the replay"
        );
    }
    let missed = records.iter().filter(|r| r.deadline_missed()).count();
    let missed_ns = records.iter().filter(|r| r.deadline_missed_ns()).count();
    eprintln!(
        "{} records: {missed} dispatched after the scheduler's deadline, {missed_ns} by the ns estimate",
        records.len()
    );
    check_miss_shares(mode, &records, missed)?;
    check_tick_phases(mode, &records)?;
    // Requests wait past their expiry under 384 in flight on any machine measured
    // (16 KiB requests, 256 queued; ns estimate: 103-502 in five runs on a fast
    // machine, where 4 KiB requests under 256 in flight gave 0 in one run of
    // three), but the scheduler's own label needs a wait across a jiffy boundary
    // past fifo_time (> 4 ms at HZ=250): 8-81 in the same five runs.
    // So the wait is asserted, and the label's count reported beside it.
    ensure!(
        missed_ns > 0,
        "no request waited past its {read_expire:?} expiry under 384 in flight \
         ({missed} past the scheduler's fifo_time)"
    );
    Ok(())
}

/// The miss shares the programs recorded at each insert (every earlier
/// dispatch's label fed back, `label::miss_share_step`) against the host's replay
/// over the same records (`kml_learn::replay::replay_miss_shares`). Dispatches on
/// two CPUs update the shares without a lock and the replay orders them by their
/// ns times, so a share may differ by a step or two; most must be close, and a
/// run with misses must show them.
fn check_miss_shares(mode: AttachMode, records: &[RequestRecord], missed: usize) -> Result<()> {
    use kml_ebpf_common::{
        label::{MISS_SHARE_ONE, MISS_SHARE_SHIFT},
        record::Known,
    };
    ensure!(
        records.iter().all(|r| r.known & Known::MISS_SHARE != 0),
        "{mode:?}: records without the miss shares"
    );
    let one = MISS_SHARE_ONE as u16;
    ensure!(
        records
            .iter()
            .all(|r| r.miss_share_read <= one && r.miss_share_write <= one),
        "{mode:?}: a miss share above {one}"
    );
    let replayed = kml_learn::replay::replay_miss_shares(records);
    // Four of the newest dispatch's steps.
    let tolerance = 4 * (MISS_SHARE_ONE >> MISS_SHARE_SHIFT) as u16;
    let (mut exact, mut close) = (0usize, 0usize);
    for (r, &(read, write)) in records.iter().zip(&replayed) {
        let d = r
            .miss_share_read
            .abs_diff(read)
            .max(r.miss_share_write.abs_diff(write));
        exact += usize::from(d == 0);
        close += usize::from(d <= tolerance);
    }
    let nonzero = records
        .iter()
        .filter(|r| r.miss_share_read > 0 || r.miss_share_write > 0)
        .count();
    eprintln!(
        "{mode:?} miss shares: {exact} of {} equal the host's replay, {close} within {tolerance}; {nonzero} nonzero",
        records.len()
    );
    // Raw tracepoints: 8,118 of 8,120 and 8,151 of 8,151 exact in the first runs.
    // Dispatches on two CPUs step a share concurrently: the step is a
    // compare-and-swap, and each event's clock is read next to its share access
    // (insert: clock then shares; issue: step then clock), so the replay's ns
    // order is the kernel's. Without them (2026-12-03): 71% to 100% exact (median
    // 94%) in 13 runs after the observer's timing changed; with them, 99.89% to
    // 99.98% in 8 runs, every record within four steps.
    // Classic tracepoints lose events to the kernel's recursion guard (236
    // recursion misses, 140 entries left in flight in one run): each lost issue
    // is a step the kernel never took and the replay cannot know of, and its
    // error decays over the next dispatches. There: 4,807 of 7,994 exact, 7,953
    // within four steps.
    // (Up to 585 recursion misses per 8,192 I/Os were seen on a loaded host: the
    // classic floor leaves room for them.)
    let (exact_floor, close_floor) = match mode {
        AttachMode::RawTracepoint => (80, 95),
        _ => (0, 80),
    };
    ensure!(
        exact * 100 >= records.len() * exact_floor && close * 100 >= records.len() * close_floor,
        "{mode:?}: {exact} of {} miss shares equal the replay, {close} within {tolerance}",
        records.len()
    );
    // A miss dispatched before the last insert shows in the shares.
    if missed > 0 {
        ensure!(nonzero > 0, "{mode:?}: {missed} misses, every share 0");
    }
    Ok(())
}

/// The insert's phase in its jiffy (`label::TickClock`, per CPU) against the
/// records themselves: a phase `p` says that the inserting CPU's first insert in
/// that jiffy came `p` units (1,024 ns) earlier, and that insert is a record of
/// its own, with phase 0 and the same jiffy. Every record must name one (the
/// clock is restarted by a clock read older than its start, and a requeue's new
/// insert takes a new phase: a few may not), and the phases must span the tick.
fn check_tick_phases(mode: AttachMode, records: &[RequestRecord]) -> Result<()> {
    use kml_ebpf_common::{op::ReqOp, record::Known};
    let inserted: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.op != ReqOp::Flush as u8)
        .collect();
    ensure!(
        inserted.iter().all(|r| r.known & Known::TICK_PHASE != 0),
        "{mode:?}: inserted records without the tick phase"
    );
    let mut starts: std::collections::HashMap<u64, Vec<u64>> = Default::default();
    for r in inserted.iter().filter(|r| r.tick_phase == 0) {
        starts
            .entry(r.insert_jiffies)
            .or_default()
            .push(r.insert_ns);
    }
    for v in starts.values_mut() {
        v.sort_unstable();
    }
    let names_its_start = |r: &RequestRecord| {
        let p = u64::from(r.tick_phase) << 10;
        let (lo, hi) = (
            r.insert_ns.saturating_sub(p + 1023),
            r.insert_ns - p.min(r.insert_ns),
        );
        starts.get(&r.insert_jiffies).is_some_and(|v| {
            let i = v.partition_point(|&t| t < lo);
            v.get(i).is_some_and(|&t| t <= hi)
        })
    };
    let unnamed: Vec<&&RequestRecord> = inserted.iter().filter(|r| !names_its_start(r)).collect();
    let named = inserted.len() - unnamed.len();
    // What an unnamed phase points at, for the next reader of a low count: the
    // start it names, and the phase-0 inserts of its jiffy and the next.
    for r in unnamed.iter().take(3) {
        let start = r.insert_ns - (u64::from(r.tick_phase) << 10).min(r.insert_ns);
        eprintln!(
            "{mode:?} unnamed phase: insert {} ns, jiffy {}, phase {} (start ~{start} ns, pid {}); phase-0 inserts of its jiffy {:?}, of the next {:?}",
            r.insert_ns,
            r.insert_jiffies,
            r.tick_phase,
            r.pid,
            starts.get(&r.insert_jiffies),
            starts.get(&(r.insert_jiffies + 1)),
        );
    }
    // One tick in ns from the records' own clocks.
    let (first, last) = (
        inserted.iter().min_by_key(|r| r.insert_ns),
        inserted.iter().max_by_key(|r| r.insert_ns),
    );
    let tick_ns = match (first, last) {
        (Some(a), Some(b)) if b.insert_jiffies > a.insert_jiffies => {
            (b.insert_ns - a.insert_ns) / (b.insert_jiffies - a.insert_jiffies)
        }
        _ => anyhow::bail!("{mode:?}: the records span no jiffy"),
    };
    let longest = inserted
        .iter()
        .map(|r| u64::from(r.tick_phase) << 10)
        .max()
        .unwrap_or(0);
    eprintln!(
        "{mode:?} tick phases: {named} of {} name their jiffy's first insert; longest {longest} ns, tick {tick_ns} ns",
        inserted.len()
    );
    // Raw tracepoints follow each request by its tag and lose none: all of
    // 8,898, 8,954 and 8,925 in three runs, and of every record in a dozen runs
    // since, but for one (2026-12-05, a clean-clone CI run): 8,455 of 8,896
    // (95.0%), with no loss counted and the same run's positions and miss shares
    // as usual. Its cause is not known (the lines above print what an unnamed
    // phase points at); a clock that is wrong names almost none, so the floor
    // for raw tracepoints is 90%. Classic tracepoints lose records
    // (two requests queued at one sector, entries left in flight), and a lost
    // record that started a CPU's clock leaves every later phase of that CPU's
    // jiffy without it: 8,692 of 8,692, 8,753 of 8,753 and 8,724 of 8,724 on a
    // quiet machine, 8,138 of 8,672 (93.8%) under a concurrent build, with 345
    // stale entries, 37 left in flight and 243 records missing.
    let floor = match mode {
        AttachMode::RawTracepoint => 90,
        _ => 80,
    };
    ensure!(
        named * 100 >= inserted.len() * floor,
        "{mode:?}: {named} of {} tick phases name a first insert of their jiffy",
        inserted.len()
    );
    // Within one tick (the clock read before jiffies: a tick between them restarts
    // the clock), and a load of hundreds in flight inserts across most of it.
    ensure!(
        longest <= tick_ns + tick_ns / 8 && longest >= tick_ns / 4,
        "{mode:?}: longest tick phase {longest} ns against a tick of {tick_ns} ns"
    );
    Ok(())
}

#[test]
fn observer_rejects_device_without_mq_deadline() -> Result<()> {
    let dev = LoopDevice::new(16, 500, 5000)?;
    dev.set_queue("scheduler", "none")?;
    let mut observer = Observer::load(ObserverConfig::new(AttachMode::RawTracepoint))?;
    let err = observer
        .add_device(&dev.block_device()?)
        .expect_err("none scheduler accepted");
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("mq-deadline") && msg.contains(&dev.name),
        "unclear error: {msg}"
    );
    drop(observer);
    assert_no_kml_programs()?;
    Ok(())
}

/// The I/O priority of a request is read at insert when the observer is asked to
/// (`record`: a trace column), and not read when it is not (`run`: nothing reads
/// it, and the read through `rq->bio` costs a probe read per insert). 200 direct
/// reads by `dd` under `ionice -c 2 -n 5` (best effort, level 5).
#[test]
fn ioprio_is_read_when_asked_and_only_then() -> Result<()> {
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(16, READ_EXPIRE_MS, WRITE_EXPIRE_MS)?;
    let bdev = dev.block_device()?;
    let want = (2 << 13) | 5;
    for read_ioprio in [true, false] {
        let records = runtime().block_on(async {
            let mut observer = Observer::load(ObserverConfig {
                read_ioprio,
                ..ObserverConfig::new(AttachMode::RawTracepoint)
            })?;
            observer.add_device(&bdev)?;
            let mut stream = observer.records()?;
            observer.attach()?;
            let out = std::process::Command::new("ionice")
                .args([
                    "-c",
                    "2",
                    "-n",
                    "5",
                    "dd",
                    "bs=4k",
                    "count=200",
                    "iflag=direct",
                ])
                .arg(format!("if={}", dev.path.display()))
                .arg("of=/dev/null")
                .output()
                .context("running ionice dd")?;
            ensure!(
                out.status.success(),
                "ionice dd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            observer.detach();
            let mut records = Vec::new();
            stream.drain(&mut records);
            anyhow::Ok(records)
        })?;
        assert_no_kml_programs()?;
        let reads: Vec<u16> = records
            .iter()
            .filter(|r| r.dev == bdev.dev() && r.op() == ReqOp::Read)
            .map(|r| r.ioprio)
            .collect();
        let with = reads.iter().filter(|&&p| p == want).count();
        eprintln!(
            "read_ioprio {read_ioprio}: {} reads, {with} with ioprio {want:#x}",
            reads.len()
        );
        ensure!(
            reads.len() >= 200,
            "{} reads recorded of dd's 200",
            reads.len()
        );
        if read_ioprio {
            ensure!(
                with == reads.len(),
                "asked to read it: {with} of {} reads carry ioprio {want:#x}",
                reads.len()
            );
        } else {
            ensure!(
                reads.iter().all(|&p| p == 0),
                "not asked: reads carry a priority ({with} with {want:#x})"
            );
        }
    }
    Ok(())
}

#[test]
fn live_drain_keeps_up_without_drops() -> Result<()> {
    // More records than the (small) ring holds: the async consumer must keep up.
    let dev = LoopDevice::new(256, 500, 5000)?;
    let bdev = dev.block_device()?;
    let (n, counters) = runtime().block_on(async {
        let mut config = ObserverConfig::new(AttachMode::RawTracepoint);
        config.ring_bytes = 1 << 20; // ~5,700 records
        // The default threshold (1 MiB) is the whole of this ring: the observer
        // must cap it (`wakeup_threshold`), or only the 50 ms poll timer drains
        // the ring, and a loaded host that delays one poll drops records (seen
        // before the cap: 1,920 of 206,818).
        assert_eq!(config.wakeup_threshold(), config.ring_bytes / 4);
        let mut observer = Observer::load(config)?;
        observer.add_device(&bdev)?;
        let mut stream = observer.records()?;
        observer.attach()?;
        let path = dev.path.clone();
        let fio = tokio::task::spawn_blocking(move || {
            std::process::Command::new("fio")
                .args(["--name=rr", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=libaio"])
                .args(["--iodepth=16", "--size=200M", "--runtime=3", "--time_based", "--randseed=1"])
                // At most 70k requests a second, the rate of the machines this
                // test was written on (206,818 records in 3 s): 36 times the
                // ring's size. Unbounded, a fast machine ran 185k a second, and the
                // debug-built consumer sharing 2 CPUs with fio dropped 144 of 555,617.
                .arg("--rate_iops=70000")
                .arg(format!("--filename={}", path.display()))
                .output()
        });
        tokio::pin!(fio);
        let mut batch = Vec::new();
        let mut n = 0usize;
        loop {
            tokio::select! {
                out = &mut fio => { let out = out??; ensure!(out.status.success(), "fio failed"); break }
                got = stream.next_batch(&mut batch) => { n += got?; batch.clear(); }
            }
        }
        observer.detach();
        n += stream.drain(&mut batch);
        anyhow::Ok((n, observer.counters()?))
    })?;
    assert_no_kml_programs()?;
    ensure!(n > 10_000, "only {n} records in 3 s of randread");
    ensure!(
        counters.get(Counter::RingFullDrops) == 0,
        "ring full drops: {counters:?}"
    );
    ensure!(
        counters.get(Counter::Records) == n as u64,
        "consumed {n}, emitted {}",
        counters.get(Counter::Records)
    );
    Ok(())
}

/// What one fio run under the observer left: the records, the counters and the
/// named losses, and the witnesses that do not use kml (the device's own
/// statistics over the run, fio's JSON report).
struct FioRun {
    records: Vec<RequestRecord>,
    counters: kml_ebpf_common::Counters,
    losses: Losses,
    stats: DiskStats,
    /// The runs the kernel skipped (read while the programs were loaded).
    missed: u64,
    /// Entries left after fio ended.
    live: u64,
    state: kml_ebpf_common::DeviceState,
    events: kml_ebpf_common::DeviceEvents,
    fio: serde_json::Value,
    /// `block_rq_complete` events of the device while fio ran, as ftrace (no
    /// BPF) recorded them.
    ftrace_completions: u64,
}

/// Runs `fio` (JSON output) on `dev` under an observer in `mode`; checks that no
/// kml program stays loaded afterwards.
fn observe_fio(
    mode: AttachMode,
    dev: &LoopDevice,
    bdev: &kml_agent::devices::BlockDevice,
    fio: &mut std::process::Command,
) -> Result<FioRun> {
    let run = runtime().block_on(async {
        let mut observer = Observer::load(ObserverConfig {
            position_always: true,
            ..ObserverConfig::new(mode)
        })?;
        observer.add_device(bdev)?;
        let mut stream = observer.records()?;
        observer.attach()?;
        let before = DiskStats::read(&dev.name)?;
        let witness = EventCount::start("block/block_rq_complete", bdev.dev())?;
        let out = fio.output().context("running fio")?;
        ensure!(
            out.status.success(),
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ftrace_completions = witness.count()?;
        let stats = before.delta(&DiskStats::read(&dev.name)?);
        // Read while the programs are loaded (detach unloads them).
        let missed = recursion_misses(&observer)?;
        observer.detach();
        let mut records = Vec::new();
        stream.drain(&mut records);
        let live = observer.live_inflight()?;
        if live > 0 && mode == AttachMode::Tracepoint {
            // What is left in flight after fio ended (printed to explain it).
            let left: aya::maps::HashMap<_, kml_ebpf_common::InflightKey, ReqState> =
                aya::maps::HashMap::try_from(
                    observer.ebpf().map(map::INFLIGHT).context("INFLIGHT")?,
                )?;
            for (k, e) in left.iter().filter_map(Result::ok).take(20) {
                eprintln!("left in flight: {k:?} phase {} {:?}", e.phase, e.rec);
            }
        }
        let counters = observer.counters()?;
        anyhow::Ok(FioRun {
            losses: Losses::from_counters(&counters, missed, live),
            state: observer.device_state(bdev.dev())?,
            events: observer.device_events(bdev.dev())?,
            fio: serde_json::from_slice(&out.stdout).context("fio JSON")?,
            records,
            counters,
            stats,
            missed,
            live,
            ftrace_completions,
        })
    })?;
    assert_no_kml_programs()?;
    Ok(run)
}

/// Every I/O accounted for (issue 14, part 2): a deep mixed workload with fsync,
/// where sequential bios merge into queued requests and every fsync sends a flush
/// past the scheduler. Witnesses that do not use kml: fio's own counts and the
/// block layer's (`/sys/block/DEV/stat`). fio's reads + writes + fsyncs = the
/// device's requests + merges (no kml involved; an fsync is one empty write); every
/// request the device completed is a data record, a flush parent or a named kernel
/// loss; the device's merges are kml's request
/// merges + bio merges; each flush the device completed is a flush record of its
/// own (issue → complete); fio's fsyncs are the completions of the requests that
/// asked for a flush.
fn every_io_is_accounted_for(mode: AttachMode) -> Result<()> {
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(256, 20, 100)?;
    let bdev = dev.block_device()?;
    let job = std::env::temp_dir().join(format!("kml-accounting-{}.fio", std::process::id()));
    std::fs::write(
        &job,
        format!(
            "[global]\nfilename={}\ndirect=1\nioengine=libaio\nthread\nrandseed=7\nsize=256M\n\
             [mixed]\nrw=randrw\nbs=4k\niodepth=96\nio_size=24M\n\
             [seqwrite]\nrw=write\nbs=4k\niodepth=48\nio_size=16M\noffset=128M\nfsync=16\n\
             [seqread]\nrw=read\nbs=4k\niodepth=48\nio_size=16M\noffset=64M\n",
            dev.path.display()
        ),
    )?;
    let mut fio = std::process::Command::new("fio");
    fio.arg("--output-format=json").arg(&job);
    let run = observe_fio(mode, &dev, &bdev, &mut fio);
    let _ = std::fs::remove_file(&job);
    let FioRun {
        records,
        counters,
        losses,
        stats,
        missed,
        live,
        events,
        fio,
        ftrace_completions,
        ..
    } = run?;
    let jobs = fio["jobs"].as_array().context("fio jobs")?;
    let total = |k: &str| -> u64 {
        jobs.iter()
            .map(|j| j[k]["total_ios"].as_u64().unwrap_or(0))
            .sum()
    };
    let (fio_ios, fio_syncs) = (total("read") + total("write"), total("sync"));
    let c = |k: Counter| counters.get(k);
    let flushes: Vec<&RequestRecord> = records.iter().filter(|r| r.op() == ReqOp::Flush).collect();
    let data = (records.len() - flushes.len()) as u64;
    let merges = c(Counter::Merges);
    let bio_merges = c(Counter::BioBackMerges) + c(Counter::BioFrontMerges);
    let summary = format!(
        "{mode:?}: fio {fio_ios} I/Os, {fio_syncs} fsyncs; device {stats:?}; kml: {data} data \
         records + {merges} request merges + {bio_merges} bio merges, {} flush records, {} flush \
         parents; {live} left in flight; losses: {losses}; per device {events:?}; counters {counters:?}",
        flushes.len(),
        c(Counter::FlushParentCompletions)
    );
    eprintln!("{summary}");
    ensure!(
        bio_merges > 0,
        "no bio merged: the workload does not test merges: {summary}"
    );
    ensure!(
        fio_syncs > 0 && !flushes.is_empty(),
        "no fsync seen: {summary}"
    );
    // fio against the block layer, no kml involved: each 4 KiB I/O is one bio,
    // which is a request or was merged into one, and each fsync one more write
    // request (empty, asking for the flush; the device counts it as a write).
    ensure!(
        fio_ios + fio_syncs == stats.requests() + stats.merges(),
        "fio against the device: {summary}"
    );
    // Nothing lost to kml itself, nothing half seen.
    for k in [
        Counter::RingFullDrops,
        Counter::ReadFailures,
        Counter::InflightInsertFailures,
        Counter::PartialCompletions,
        Counter::SampledOut,
    ] {
        ensure!(c(k) == 0, "{} = {}: {summary}", k.name(), c(k));
    }
    // An issue without its insert: an insert run the kernel skipped (classic
    // tracepoints skip a program while any tracing program runs on the CPU).
    ensure!(
        c(Counter::IssuesWithoutInsert) <= missed,
        "issues without insert beyond the skipped runs: {summary}"
    );
    // Raw tracepoints know each request by its tag: nothing can collide. Classic
    // tracepoints know it by (dev, sector): two requests in flight at one sector
    // collide, the second insert finds the first's entry (a stale entry) and the
    // first's completion then finds none (an orphan), one of each per collision;
    // a skipped insert run leaves an orphan too.
    let collisions = match mode {
        AttachMode::RawTracepoint => 0,
        AttachMode::Tracepoint => c(Counter::StaleEntries),
    };
    ensure!(
        c(Counter::OrphanCompletions) <= collisions + missed,
        "orphans not explained by sector collisions or skipped runs: {summary}"
    );
    // The only I/O on the device is fio's (its jobs are threads of one process).
    let pids: std::collections::BTreeSet<u32> = records
        .iter()
        .filter(|r| r.op() != ReqOp::Flush)
        .map(|r| r.pid)
        .collect();
    ensure!(
        pids.len() == 1,
        "records of several processes {pids:?}: {summary}"
    );
    // The block layer against kml: every completed request is a data record, an
    // fsync's empty write (counted as a flush parent) or a named loss; every merge
    // the device counted is a traced request or bio merge (exact, but for runs the
    // kernel skipped); every flush it completed is a flush record (or a named loss).
    explain(
        "requests completed on the device",
        stats.requests(),
        data + c(Counter::FlushParentCompletions),
        &losses,
    )
    .with_context(|| summary.clone())?;
    ensure!(
        (merges + bio_merges).abs_diff(stats.merges()) <= missed,
        "merges do not add up: {summary}"
    );
    // ftrace against kml, event by event: each completion the tracepoint fired
    // for is a completion run of kml's (whole, partial, of a flush, of an fsync's
    // parent), a run the kernel skipped and counted, or one it never made and
    // kml found (a stale entry, or an entry still live at the end). Raw
    // tracepoints only: classic ones key requests by sector, where a collision
    // also makes a stale entry.
    let seen = c(Counter::Completions) + c(Counter::PartialCompletions);
    let unseen = c(Counter::StaleEntries) + live;
    eprintln!(
        "{mode:?}: ftrace saw {ftrace_completions} completions; kml ran for {seen}, found {unseen} \
         it never ran for ({} stale, {live} live), {missed} recursion misses",
        c(Counter::StaleEntries)
    );
    if mode == AttachMode::RawTracepoint {
        // The per-tag array never evicts: entries added less removed is what is
        // live (the agent's cheap count, `Observer::live_inflight_counted`), the
        // scan of the array the witness.
        ensure!(
            c(Counter::InflightAdded).checked_sub(c(Counter::InflightRemoved)) == Some(live),
            "entries added less removed is not the {live} the scan found live: {summary}"
        );
        ensure!(
            ftrace_completions.abs_diff(seen + unseen) <= missed,
            "ftrace saw {ftrace_completions} completions, kml {seen} + {unseen} never seen \
             ({missed} recursion misses): {summary}"
        );
    }
    explain(
        "flushes completed on the device",
        stats.flushes,
        flushes.len() as u64,
        &losses,
    )
    .with_context(|| summary.clone())?;
    ensure!(
        c(Counter::FlushParentCompletions).abs_diff(fio_syncs) <= losses.total(),
        "fsyncs do not add up: {summary}"
    );
    ensure!(
        flushes.len() as u64 <= fio_syncs && flushes.len() as u64 == c(Counter::Flushes),
        "flush records: {summary}"
    );
    ensure!(
        events.records == records.len() as u64
            && events.bio_back_merges + events.bio_front_merges == bio_merges
            && events.rq_merges == merges,
        "per-device counts disagree with the totals: {summary}"
    );
    for f in &flushes {
        ensure!(
            f.dev == bdev.dev()
                && f.issue_ns != 0
                && (f.complete_ns >= f.issue_ns || f.complete_ns == 0)
                && f.insert_ns == f.issue_ns
                && f.error == 0,
            "flush record {f:?}"
        );
    }
    // Bios merged after insert make a request complete more than it had at insert.
    ensure!(
        records
            .iter()
            .filter(|r| r.op() != ReqOp::Flush && r.complete_ns != 0)
            .all(|r| u64::from(r.complete_bytes) >= u64::from(r.nr_sectors) << 9),
        "a request completed fewer bytes than it had at insert: {summary}"
    );
    Ok(())
}

#[test]
fn raw_tracepoints_account_for_every_io() -> Result<()> {
    every_io_is_accounted_for(AttachMode::RawTracepoint)
}

#[test]
fn tracepoints_account_for_every_io() -> Result<()> {
    every_io_is_accounted_for(AttachMode::Tracepoint)
}

/// Finished requests wait in their CPU's batch until it holds `BATCH_RECORDS`
/// or the agent flushes it; then they reach the ring, every one, in batches.
#[test]
fn records_wait_in_per_cpu_batches_until_flushed() -> Result<()> {
    if !alone_on_the_block_tracepoints()? {
        return Ok(());
    }
    let dev = LoopDevice::new(64, READ_EXPIRE_MS, WRITE_EXPIRE_MS)?;
    let bdev = dev.block_device()?;
    runtime().block_on(async {
        let mut observer = Observer::load(ObserverConfig::new(AttachMode::RawTracepoint))?;
        ensure!(
            observer.batching(),
            "record batches are off on this kernel (see the agent's warning)"
        );
        observer.add_device(&bdev)?;
        let mut stream = observer.records()?;
        observer.attach()?;
        let cpus = aya::util::online_cpus().map_err(|(p, e)| anyhow::anyhow!("{p}: {e}"))?;
        let mut got = Vec::new();

        // Fewer records than one batch holds: none reaches the ring unflushed.
        issue_direct(&dev, &scattered_pattern(3, 64, 11))?;
        let staged = observer.counters()?.get(Counter::Records);
        stream.drain(&mut got);
        ensure!(
            (3..BATCH_RECORDS as u64).contains(&staged) && got.is_empty(),
            "{staged} records counted, {} in the ring before a flush",
            got.len()
        );
        observer.flush_batches();
        stream.drain(&mut got);
        ensure!(
            got.len() as u64 == staged,
            "a flush wrote {} of {staged} staged records",
            got.len()
        );

        // A trickle, with no explicit flush: the live stream has the CPUs flushed
        // once a poll interval, so the records arrive all the same.
        issue_direct(&dev, &scattered_pattern(2, 64, 13))?;
        let want = observer.counters()?.get(Counter::Records);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while (got.len() as u64) < want && std::time::Instant::now() < deadline {
            stream.next_batch(&mut got).await?;
        }
        ensure!(
            got.len() as u64 == want,
            "{} of {want} records arrived from the live stream within 2 s",
            got.len()
        );
        let staged = want;

        // Many: the ring holds whole batches, and at most a batch less one per
        // CPU waits for the flush that detaching does.
        let items_before = stream.items;
        issue_direct(&dev, &scattered_pattern(400, 64, 12))?;
        let before_flush = got.len();
        stream.drain(&mut got);
        let unflushed = (got.len() - before_flush) as u64;
        let records = observer.counters()?.get(Counter::Records);
        let most_waiting = (cpus.len() * (BATCH_RECORDS - 1)) as u64;
        ensure!(
            unflushed + most_waiting >= records - staged,
            "{unflushed} of {} records reached the ring unflushed",
            records - staged
        );
        let items = stream.items - items_before;
        ensure!(
            unflushed >= 4 * items,
            "{unflushed} records came in {items} ring items: not in batches"
        );
        observer.detach();
        stream.drain(&mut got);
        let counters = observer.counters()?;
        ensure!(
            got.len() as u64 == counters.get(Counter::Records)
                && counters.get(Counter::RingFullDrops) == 0
                && stream.undecodable == 0,
            "{} records read, {counters:?}",
            got.len()
        );
        anyhow::Ok(())
    })?;
    assert_no_kml_programs()
}
