//! Arms inside one long fio run: the schedule, the clock, the machine's CPU times,
//! and the loop that attaches an arm, lets it settle, stamps its measured window,
//! and detaches it, cycle after cycle.
//!
//! Within a cycle every arm runs once; the order follows a Williams design (each
//! arm takes every position once over as many cycles as there are arms, and with
//! an even number of arms follows every other arm once), so neither a slot in the
//! cycle nor the arm before it favours an arm. The measured window of an arm starts
//! `settle` after it is attached and ready and ends before it is detached: attach,
//! start-up and detach fall between windows, in seconds the analysis drops
//! ([`super::fiolog::window_of`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::fiolog::Window;
use super::sys::{self, Proc};

/// Cycles, and the seconds of each arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub cycles: usize,
    /// After an arm is ready, before its window opens.
    pub settle: Duration,
    /// The measured window.
    pub measure: Duration,
}

/// The order of `n` arms in cycle `cycle`: a Williams design (0, 1, n-1, 2, n-2, …
/// shifted by the cycle; odd-numbered rounds of `n` cycles run it backwards, which
/// balances the predecessors for an odd `n`).
pub fn order(n: usize, cycle: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let mut base = Vec::with_capacity(n);
    let (mut lo, mut hi) = (0usize, n);
    for j in 0..n {
        if j % 2 == 0 {
            base.push(lo);
            lo += 1;
        } else {
            hi -= 1;
            base.push(hi);
        }
    }
    let shift = cycle % n;
    let mut v: Vec<usize> = base.iter().map(|b| (b + shift) % n).collect();
    if (cycle / n) % 2 == 1 {
        v.reverse();
    }
    v
}

/// Milliseconds on `CLOCK_MONOTONIC`, the clock fio's logs are stamped with here
/// (`log_alternate_epoch_clock_id=1`).
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// The whole machine's CPU time (the `cpu` line of /proc/stat), in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn parse(proc_stat: &str) -> Result<CpuTimes> {
        let line = proc_stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no `cpu` line")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().context("a non-numeric field in /proc/stat"))
            .collect::<Result<_>>()?;
        if v.len() < 8 {
            bail!("/proc/stat's cpu line has {} fields", v.len());
        }
        Ok(CpuTimes {
            user: v[0],
            nice: v[1],
            system: v[2],
            idle: v[3],
            iowait: v[4],
            irq: v[5],
            softirq: v[6],
            steal: v[7],
        })
    }

    pub fn now() -> Result<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
    }

    /// Kernel time: system + irq + softirq.
    pub fn kernel(&self) -> u64 {
        self.system + self.irq + self.softirq
    }

    /// Everything but idle and iowait.
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.kernel() + self.steal
    }

    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// CPU time (ns, `/proc/PID/task/TID/schedstat`: exact, and with no IRQ time
/// accounting on this kernel it includes the interrupts and softirqs a task took)
/// of a set of threads, by thread id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskTimes(pub BTreeMap<u32, u64>);

impl TaskTimes {
    /// CPU ns spent since `earlier` by the threads alive now (a thread born since
    /// counts whole; one that ended in between is lost, which is rare: kernel workers
    /// idle for minutes before they exit).
    pub fn since(&self, earlier: &TaskTimes) -> u64 {
        self.0
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum()
    }

    /// Adds every thread of process `pid`.
    pub fn add_process(&mut self, pid: u32) {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for e in dir.filter_map(|e| e.ok()) {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            if let Some(ns) = schedstat_ns(&e.path().join("schedstat")) {
                self.0.insert(tid, ns);
            }
        }
    }

    /// Adds one thread.
    pub fn add_thread(&mut self, pid: u32, tid: u32) {
        if let Some(ns) = schedstat_ns(Path::new(&format!("/proc/{pid}/task/{tid}/schedstat"))) {
            self.0.insert(tid, ns);
        }
    }
}

fn schedstat_ns(path: &Path) -> Option<u64> {
    parse_schedstat(&std::fs::read_to_string(path).ok()?)
}

/// The first field of a schedstat line: time on the CPU, ns.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Whether a thread of this name does the kernel's share of block I/O: workqueue
/// workers (the loop device's worker, kblockd) and softirq threads.
pub fn is_kernel_io_worker(comm: &str) -> bool {
    comm.starts_with("kworker/") || comm.starts_with("ksoftirqd/")
}

/// The I/O path's threads: `root` and its descendants (fio and its job processes)
/// and every kernel I/O worker.
pub fn io_path_times(root: u32) -> TaskTimes {
    let mut t = TaskTimes::default();
    let mut parents: BTreeMap<u32, u32> = BTreeMap::new();
    let mut workers = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let Some((comm, ppid)) = parse_comm_ppid(&stat) else {
                continue;
            };
            if is_kernel_io_worker(&comm) {
                workers.push(pid);
            }
            parents.insert(pid, ppid);
        }
    }
    let in_tree = |mut p: u32| {
        for _ in 0..64 {
            if p == root {
                return true;
            }
            match parents.get(&p) {
                Some(&pp) if pp != 0 && pp != p => p = pp,
                _ => return false,
            }
        }
        false
    };
    for (&pid, _) in parents.iter().filter(|(p, _)| in_tree(**p)) {
        t.add_process(pid);
    }
    for pid in workers {
        t.add_process(pid);
    }
    t
}

/// (comm, ppid) from `/proc/PID/stat` (the comm may hold spaces and parentheses).
pub fn parse_comm_ppid(stat: &str) -> Option<(String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    Some((comm, rest.next()?.parse().ok()?))
}

/// What the harness notes at each edge of a measured window.
#[derive(Clone, Debug)]
pub struct Edge<S> {
    pub t_ms: u64,
    /// The whole machine (/proc/stat).
    pub cpu: CpuTimes,
    /// The I/O path's threads: fio's and the kernel's I/O workers.
    pub io_path: TaskTimes,
    /// The arm's own sample (agent metrics, program statistics, ...).
    pub arm: S,
}

/// One arm in one cycle: its window and the samples at its two edges.
#[derive(Clone, Debug)]
pub struct Measured<S> {
    pub window: Window,
    pub start: Edge<S>,
    pub end: Edge<S>,
}

/// How an alternation attaches, samples and detaches its arms.
pub trait Arms {
    /// What is alive while an arm is attached.
    type Live;
    /// What an edge samples of a live arm.
    type Sample;
    fn count(&self) -> usize;
    fn label(&self, arm: usize) -> String;
    /// Attaches `arm`; returns once it is observing.
    fn start(&mut self, arm: usize, tag: &str) -> Result<Self::Live>;
    fn sample(&mut self, arm: usize, live: &mut Self::Live) -> Result<Self::Sample>;
    /// Detaches `arm` (its end is outside every window).
    fn stop(&mut self, arm: usize, live: Self::Live) -> Result<()>;
}

/// Runs `schedule` on `arms` while `fio` runs; fails if fio ends first.
pub fn run<A: Arms>(
    arms: &mut A,
    schedule: Schedule,
    fio: &mut Proc,
    tag: &str,
) -> Result<Vec<Measured<A::Sample>>> {
    let mut out = Vec::new();
    let n = arms.count();
    for cycle in 0..schedule.cycles {
        for arm in order(n, cycle) {
            sys::check_interrupted()?;
            if let Some(s) = fio.poll()? {
                bail!(
                    "fio ended ({}) in cycle {cycle}: {}",
                    crate::util::describe_status(s),
                    sys::tail(&fio.stderr, 5)
                );
            }
            let label = arms.label(arm);
            let mut live = arms
                .start(arm, &format!("{tag}.c{cycle}.a{arm}"))
                .with_context(|| format!("attaching {label} (cycle {cycle})"))?;
            let measured = (|| -> Result<Measured<A::Sample>> {
                sys::sleep(schedule.settle)?;
                let fio_pid = fio.pid();
                let edge = |arms: &mut A, live: &mut A::Live| -> Result<Edge<A::Sample>> {
                    Ok(Edge {
                        t_ms: mono_ms(),
                        cpu: CpuTimes::now()?,
                        io_path: io_path_times(fio_pid),
                        arm: arms.sample(arm, live)?,
                    })
                };
                let start = edge(arms, &mut live)?;
                sys::sleep(schedule.measure)?;
                let end = edge(arms, &mut live)?;
                Ok(Measured {
                    window: Window {
                        arm,
                        cycle,
                        start_ms: start.t_ms,
                        end_ms: end.t_ms,
                    },
                    start,
                    end,
                })
            })();
            let stopped = arms.stop(arm, live);
            let m = measured.with_context(|| format!("measuring {label} (cycle {cycle})"))?;
            stopped.with_context(|| format!("detaching {label} (cycle {cycle})"))?;
            out.push(m);
        }
        eprintln!(
            "xtask: bench: {tag}: cycle {}/{} done",
            cycle + 1,
            schedule.cycles
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn williams_orders_balance_positions_and_predecessors() {
        for n in [1usize, 2, 4, 6, 8] {
            let mut pos = vec![vec![0; n]; n];
            let mut follows = vec![vec![0; n]; n];
            for c in 0..n {
                let o = order(n, c);
                let mut sorted = o.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n {n} cycle {c}: {o:?}");
                for (p, a) in o.iter().enumerate() {
                    pos[*a][p] += 1;
                }
                for w in o.windows(2) {
                    follows[w[1]][w[0]] += 1;
                }
            }
            // Every arm in every position once.
            assert!(pos.iter().flatten().all(|c| *c == 1), "n {n}: {pos:?}");
            // Even n: every arm right after every other arm exactly once.
            if n % 2 == 0 {
                for (a, row) in follows.iter().enumerate() {
                    for (b, c) in row.iter().enumerate() {
                        assert_eq!(*c, usize::from(a != b), "n {n}: {a} after {b}");
                    }
                }
            }
        }
        assert!(order(0, 3).is_empty());
        // Odd n: over 2n cycles each ordered pair occurs twice (forwards and back).
        let n = 5;
        let mut follows = vec![vec![0; n]; n];
        for c in 0..2 * n {
            for w in order(n, c).windows(2) {
                follows[w[1]][w[0]] += 1;
            }
        }
        for (a, row) in follows.iter().enumerate() {
            for (b, c) in row.iter().enumerate() {
                assert_eq!(*c, if a == b { 0 } else { 2 }, "{a} after {b}");
            }
        }
    }

    #[test]
    fn proc_stat_cpu_line() {
        let text = "cpu  100 5 200 5000 7 3 11 2 0 0\ncpu0 50 2 100 2500 3 1 5 1 0 0\nintr 1\n";
        let c = CpuTimes::parse(text).unwrap();
        assert_eq!(c.kernel(), 214);
        assert_eq!(c.busy(), 100 + 5 + 214 + 2);
        let later = CpuTimes { system: 260, ..c };
        assert_eq!(later.since(&c).kernel(), 60);
        assert!(CpuTimes::parse("cpu0 1 2 3").is_err());
        assert!(CpuTimes::parse("cpu  1 2 3").is_err());
    }

    #[test]
    fn task_times() {
        assert_eq!(parse_schedstat("563393 0 1\n"), Some(563393));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(
            parse_comm_ppid("42 (kworker/u8:4-loop0) I 2 0 0 0"),
            Some(("kworker/u8:4-loop0".to_owned(), 2))
        );
        assert_eq!(
            parse_comm_ppid("7 (a (b) c) S 1 7 7"),
            Some(("a (b) c".to_owned(), 1))
        );
        assert!(is_kernel_io_worker("kworker/0:1H-kblockd"));
        assert!(is_kernel_io_worker("ksoftirqd/1"));
        assert!(!is_kernel_io_worker("fio"));
        let a = TaskTimes([(1, 100), (2, 50)].into_iter().collect());
        let b = TaskTimes([(1, 130), (3, 20)].into_iter().collect());
        // Thread 1 ran 30 ns, thread 3 was born (20), thread 2 ended (lost).
        assert_eq!(b.since(&a), 50);
        // This process and its own threads are found, and their time only grows.
        let mut me = TaskTimes::default();
        me.add_process(std::process::id());
        assert!(!me.0.is_empty());
        let tree = io_path_times(std::process::id());
        assert!(tree.0.keys().any(|t| me.0.contains_key(t)));
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = mono_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(mono_ms() >= a + 4);
    }
}
