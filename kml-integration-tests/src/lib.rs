//! Support for kml's integration tests: real loop devices with mq-deadline, real
//! O_DIRECT I/O, and guards that clean up also when a test fails.
//!
//! These tests need root, the kernel's block tracepoints and the eBPF object;
//! `cargo xtask test` runs them (`--test-threads=1`: they share the tracepoints).

use std::{
    alloc::{alloc_zeroed, dealloc, Layout},
    collections::{BTreeMap, BTreeSet},
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};

pub mod accounting;
pub mod chain;
pub mod ftrace;
use kml_agent::devices::BlockDevice;
use kml_ebpf_common::ReqOp;

/// `nr_requests` of a test device: the kernel's default for the loop driver's 128
/// hardware tags with a scheduler (2 x 128).
pub const DEFAULT_NR_REQUESTS: u32 = 256;

/// A file-backed loop device (direct I/O on the backing file) using mq-deadline.
/// Detached and its backing file removed on drop.
pub struct LoopDevice {
    pub name: String,
    pub path: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    /// `size_mib` MiB device with mq-deadline and the given expiries (ms).
    pub fn new(size_mib: u64, read_expire_ms: u32, write_expire_ms: u32) -> Result<LoopDevice> {
        let dir = std::env::var_os("KML_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let backing = dir.join(format!("kml-test-{}-{}.img", std::process::id(), unique()));
        File::create(&backing)
            .and_then(|f| f.set_len(size_mib << 20))
            .with_context(|| format!("creating {}", backing.display()))?;
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&backing)
            .output()
            .context("running losetup")?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&backing);
            bail!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let name = path
            .file_name()
            .context("losetup printed no device")?
            .to_string_lossy()
            .into_owned();
        let dev = LoopDevice {
            name,
            path,
            backing,
        };
        // Loop devices are reused, and a queue keeps its settings across detach and
        // attach (the disk statistics too: tests use differences). A fresh
        // mq-deadline instance has the kernel's defaults; nr_requests belongs to the
        // queue: set to the default for the loop driver's 128 tags (2 x 128).
        dev.set_queue("scheduler", "none")?;
        dev.set_queue("scheduler", "mq-deadline")?;
        let nr = std::fs::read_to_string(dev.sys().join("queue/nr_requests"))?;
        if nr.trim() != DEFAULT_NR_REQUESTS.to_string() {
            dev.set_queue("nr_requests", &DEFAULT_NR_REQUESTS.to_string())?;
        }
        dev.set_iosched("read_expire", &read_expire_ms.to_string())?;
        dev.set_iosched("write_expire", &write_expire_ms.to_string())?;
        Ok(dev)
    }

    /// A handle to a device owned elsewhere (not detached on drop), for threads.
    pub fn borrowed(path: PathBuf) -> LoopDevice {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        LoopDevice {
            name,
            path,
            backing: PathBuf::new(),
        }
    }

    pub fn sys(&self) -> PathBuf {
        Path::new("/sys/block").join(&self.name)
    }

    pub fn set_queue(&self, file: &str, value: &str) -> Result<()> {
        let p = self.sys().join("queue").join(file);
        std::fs::write(&p, value).with_context(|| format!("writing {value} to {}", p.display()))
    }

    pub fn set_iosched(&self, file: &str, value: &str) -> Result<()> {
        self.set_queue(&format!("iosched/{file}"), value)
    }

    pub fn block_device(&self) -> Result<BlockDevice> {
        BlockDevice::find(&self.name)
    }

    pub fn open_direct(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .with_context(|| format!("opening {} with O_DIRECT", self.path.display()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.backing.as_os_str().is_empty() {
            return; // borrowed
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A page-aligned buffer for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: owned allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// One synchronous O_DIRECT request the test issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Issued {
    pub op: ReqOp,
    pub sector: u64,
    pub nr_sectors: u32,
}

/// Issues `ops` one at a time (synchronous pread/pwrite with O_DIRECT): each
/// becomes exactly one block request, no merging.
pub fn issue_direct(dev: &LoopDevice, ops: &[Issued]) -> Result<()> {
    let file = dev.open_direct()?;
    let max = ops
        .iter()
        .map(|o| o.nr_sectors as usize * 512)
        .max()
        .unwrap_or(4096);
    let mut buf = AlignedBuf::new(max);
    for (i, o) in ops.iter().enumerate() {
        let len = o.nr_sectors as usize * 512;
        let b = &mut buf.as_mut_slice()[..len];
        let off = o.sector * 512;
        match o.op {
            ReqOp::Write => {
                b.fill((i % 251) as u8);
                file.write_all_at(b, off)
                    .with_context(|| format!("pwrite at sector {}", o.sector))?;
            }
            ReqOp::Read => file
                .read_exact_at(b, off)
                .with_context(|| format!("pread at sector {}", o.sector))?,
            other => bail!("cannot issue {other:?}"),
        }
    }
    Ok(())
}

/// A deterministic pattern: `n` writes then `n` reads of 4 KiB at distinct
/// scattered 4 KiB-aligned sectors within `size_mib`.
pub fn scattered_pattern(n: usize, size_mib: u64, seed: u64) -> Vec<Issued> {
    let blocks = (size_mib << 20) / 4096;
    assert!(n as u64 <= blocks, "pattern larger than the device");
    // A full-period LCG over the blocks: distinct positions, no RNG dependency.
    let mut x = seed % blocks;
    let step = {
        let mut s = blocks / 2 + 1;
        while gcd(s, blocks) != 1 {
            s += 1;
        }
        s
    };
    let mut sectors = Vec::with_capacity(n);
    for _ in 0..n {
        x = (x + step) % blocks;
        sectors.push(x * 8);
    }
    let mut out: Vec<Issued> = sectors
        .iter()
        .map(|&s| Issued {
            op: ReqOp::Write,
            sector: s,
            nr_sectors: 8,
        })
        .collect();
    out.extend(sectors.iter().rev().map(|&s| Issued {
        op: ReqOp::Read,
        sector: s,
        nr_sectors: 8,
    }));
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Loaded kml programs (`kml_*`): id → name (from bpftool).
pub fn kml_programs() -> Result<BTreeMap<u32, String>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool prog show")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    Ok(progs
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            let id = u32::try_from(p["id"].as_u64()?).ok()?;
            name.starts_with("kml_").then(|| (id, name.to_owned()))
        })
        .collect())
}

/// Every process id on the machine.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `prog_id:` of every fd of `pid` (program fds and bpf_link fds both name it in
/// their fdinfo): the kernel's own answer to "who holds this program", which
/// needs no bpftool built with pid support (Debian's 7.1 is not).
pub fn prog_ids_of(pid: u32) -> BTreeSet<u32> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return BTreeSet::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// The parent of `pid`, from /proc/PID/stat.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// This process and its descendants (the agents, fio and bpftrace it started).
pub fn this_test_and_children() -> BTreeSet<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut ours = BTreeSet::from([std::process::id()]);
    loop {
        let before = ours.len();
        for (pid, ppid) in &parents {
            if ours.contains(ppid) {
                ours.insert(*pid);
            }
        }
        if ours.len() == before {
            return ours;
        }
    }
}

/// Who holds each loaded kml program: program id → (name, holding pids).
pub fn kml_program_holders() -> Result<BTreeMap<u32, (String, BTreeSet<u32>)>> {
    let mut progs: BTreeMap<u32, (String, BTreeSet<u32>)> = kml_programs()?
        .into_iter()
        .map(|(id, name)| (id, (name, BTreeSet::new())))
        .collect();
    for pid in all_pids() {
        for id in prog_ids_of(pid) {
            if let Some((_, holders)) = progs.get_mut(&id) {
                holders.insert(pid);
            }
        }
    }
    Ok(progs)
}

/// kml programs that are this test's to clean up: held by this process or one it
/// started, or held by no process at all (pinned, or a killed agent's links) and
/// not in `baseline`. Programs of agents this test did not start are not its own.
pub fn programs_of_this_test(baseline: &BTreeSet<u32>) -> Result<BTreeMap<u32, String>> {
    let ours = this_test_and_children();
    Ok(kml_program_holders()?
        .into_iter()
        .filter(|(id, (_, holders))| {
            if holders.is_empty() {
                !baseline.contains(id)
            } else {
                holders.iter().any(|p| ours.contains(p))
            }
        })
        .map(|(id, (name, _))| (id, name))
        .collect())
}

/// The leak check of one test: every kml program the test loaded must be gone at
/// its end. Programs that nobody held before the test started (left by someone
/// else: a killed agent's pins) are named at the start and not blamed on it;
/// programs held by agents the test did not start are never its own.
pub struct LeakCheck {
    baseline: BTreeSet<u32>,
}

impl LeakCheck {
    pub fn start() -> Result<LeakCheck> {
        let holders = kml_program_holders()?;
        let baseline: BTreeSet<u32> = holders
            .iter()
            .filter(|(_, (_, h))| h.is_empty())
            .map(|(id, _)| *id)
            .collect();
        if !baseline.is_empty() {
            eprintln!(
                "NOTE: {} kml programs held by no process were loaded before this test \
                 (pinned by someone else): {:?}",
                baseline.len(),
                holders
                    .iter()
                    .filter(|(id, _)| baseline.contains(id))
                    .map(|(id, (n, _))| format!("{id} {n}"))
                    .collect::<Vec<_>>()
            );
        }
        Ok(LeakCheck { baseline })
    }

    /// Fails if a kml program of this test is still loaded 3 s from now. The kernel
    /// frees a program after an RCU grace period once its last fd and link are
    /// gone, so one of a process that just exited may linger for a moment.
    pub fn assert_none_left(&self) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let left = programs_of_this_test(&self.baseline)?;
            if left.is_empty() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(3) {
                bail!("kml programs still loaded (held by this test, or by no process): {left:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The programs of this test now (no waiting).
    pub fn programs(&self) -> Result<BTreeMap<u32, String>> {
        programs_of_this_test(&self.baseline)
    }
}

/// [`LeakCheck::assert_none_left`] against no baseline: any kml program held by
/// this test (or a process it started) or by no process at all is a leak.
pub fn assert_no_kml_programs() -> Result<()> {
    LeakCheck {
        baseline: BTreeSet::new(),
    }
    .assert_none_left()
}

/// The agent binary built by xtask.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("KML_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kml-agent"))
}

/// A folder of this test's own under the temp dir (`kml-TAG-PID`), created.
fn test_dir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kml-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A trace file as the agent's readers read it.
pub fn read_trace(path: &Path) -> Result<Vec<kml_ebpf_common::RequestRecord>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    kml_ebpf_common::trace::read_all(BufReader::new(file))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A folder of this test under the temp dir, removed with what it holds on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Result<ScratchDir> {
        Ok(ScratchDir(test_dir(tag)?))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `kml-agent record` of one device, attached and recording; its CSV lives in a
/// scratch folder removed on drop (the agent is killed on drop if still running).
pub struct Recording {
    pub agent: Agent,
    pub csv: PathBuf,
    /// Declared after `agent`: the agent is killed before its folder goes.
    _dir: ScratchDir,
}

impl Recording {
    pub fn start(dev: &LoopDevice, tag: &str) -> Result<Recording> {
        let dir = ScratchDir::new(tag)?;
        let csv = dir.0.join("trace.csv");
        let agent = spawn_agent(&[
            "record",
            "--device",
            &dev.name,
            "--duration",
            "120s",
            "--out",
            csv.to_str().context("utf-8 path")?,
        ])?;
        wait_for_line(&agent.stderr, "recording", Duration::from_secs(30))?;
        Ok(Recording {
            agent,
            csv,
            _dir: dir,
        })
    }

    /// The trace the agent wrote (after it exited).
    pub fn rows(&self) -> Result<Vec<kml_ebpf_common::RequestRecord>> {
        read_trace(&self.csv)
    }
}

/// A file system of type `fstype` mounted with `options` on a folder of this test;
/// unmounted, and the folder removed, on drop.
pub struct TestMount(pub PathBuf);

impl TestMount {
    pub fn new(tag: &str, fstype: &str, options: &str) -> Result<TestMount> {
        // Its own guard, not a `ScratchDir`: removing the folder's contents before
        // the unmount took would reach into the mounted file system.
        let mount = TestMount(test_dir(tag)?);
        let status = Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(&mount.0)
            .status()?;
        ensure!(
            status.success(),
            "mount -t {fstype} -o {options} on {}: {status}",
            mount.0.display()
        );
        Ok(mount)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A child process killed on drop (so a failing test leaves nothing running).
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends SIGINT/SIGTERM to a child.
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Interrupts a child with SIGINT until it exits, at most `timeout`; its status.
/// A single SIGINT is not enough for bpftrace 0.17: a signal that lands between
/// its exit-flag check and its blocking `epoll_wait` is consumed by the handler and
/// the loop sleeps on (seen here: bpftrace with only map-updating probes, on a disk
/// that had gone idle, waited 12 minutes after one SIGINT and exited at the second).
/// Repeating the signal only repeats the request to stop; its maps are unchanged.
pub fn interrupt_until_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        signal(child, libc::SIGINT);
        let again = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < again {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ensure!(
            start.elapsed() < timeout,
            "pid {} still running {timeout:?} after the first SIGINT",
            child.id()
        );
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Lines of `reader`, echoed with `tag` and sent to the returned channel.
pub fn forward_lines(
    reader: impl std::io::Read + Send + 'static,
    tag: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading even when nobody listens: a closed pipe would make the
        // agent's next print fail.
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            eprintln!("  {tag}: {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// A running agent and its output, line by line.
pub struct Agent {
    pub child: ChildGuard,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

/// Starts the agent with `args`.
pub fn spawn_agent(args: &[&str]) -> Result<Agent> {
    spawn_agent_with_env(args, &[])
}

/// [`spawn_agent`] with extra environment variables.
pub fn spawn_agent_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", agent_bin().display()))?;
    let stdout = forward_lines(child.stdout.take().context("stdout")?, "agent out");
    let stderr = forward_lines(child.stderr.take().context("stderr")?, "agent");
    Ok(Agent {
        child: ChildGuard(child),
        stdout,
        stderr,
    })
}

pub fn wait_for_line(
    rx: &mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(line),
            Ok(_) => continue,
            Err(_) => bail!("agent never printed {needle:?} within {timeout:?}"),
        }
    }
}
