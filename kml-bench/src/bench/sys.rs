//! What the benchmark sets up on the machine, each behind a guard that undoes it on
//! drop (also on an error or Ctrl-C): loop devices, a private tmpfs, a sysctl value,
//! child processes. Plus the interruptible waiting that lets the guards run.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::util::{display, output};

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
    fn sysconf(name: i32) -> i64;
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signum: i32) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag instead of killing xtask, so that the guards run.
/// The children keep the default disposition (a handler is reset at exec); on Ctrl-C
/// the terminal signals them too, and they stop by themselves.
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(i32) as usize;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal(SIGINT, handler);
        signal(SIGTERM, handler);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once SIGINT or SIGTERM arrived.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, waking every 50 ms to see whether the run was interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Sends `sig` to `pid`; false if it could not be sent (the process is gone).
pub fn send_signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory effects on this process.
    unsafe { kill(pid, sig) == 0 }
}

/// Clock ticks per second (`utime`/`stime` unit of /proc/PID/stat).
pub fn clock_ticks_per_second() -> u64 {
    const SC_CLK_TCK: i32 = 2;
    // SAFETY: sysconf only reads a configuration value.
    let v = unsafe { sysconf(SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

/// A loop device, detached (`losetup -d`) on drop.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    pub name: String,
}

impl LoopDevice {
    /// `losetup -f --show [--direct-io=on] FILE`.
    pub fn attach(file: &Path, direct_io: bool) -> Result<Self> {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        cmd.arg(file);
        let path = PathBuf::from(output(&mut cmd)?.trim());
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .with_context(|| format!("losetup printed `{}`", path.display()))?;
        let dev = LoopDevice { path, name };
        eprintln!(
            "xtask: bench: attached {} ({})",
            dev.path.display(),
            file.display()
        );
        Ok(dev)
    }

    pub fn sysfs(&self, rel: &str) -> PathBuf {
        Path::new("/sys/block").join(&self.name).join(rel)
    }

    pub fn write_attr(&self, rel: &str, value: &str) -> Result<()> {
        let path = self.sysfs(rel);
        fs::write(&path, value).with_context(|| format!("writing `{value}` to {}", path.display()))
    }

    pub fn read_attr(&self, rel: &str) -> Result<String> {
        let path = self.sysfs(rel);
        Ok(fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// Selects a fresh mq-deadline (the kernel's default tunables) and checks that the
    /// kernel took it. A loop device keeps its queue across detach and attach, so a
    /// previous user's mq-deadline (and its expiries) may still be there: switching
    /// to `none` first makes the kernel set up a new one.
    pub fn use_mq_deadline(&self) -> Result<()> {
        if self.read_attr("queue/scheduler")?.contains("[mq-deadline]") {
            self.write_attr("queue/scheduler", "none")?;
        }
        self.write_attr("queue/scheduler", "mq-deadline")?;
        let now = self.read_attr("queue/scheduler")?;
        if !now.contains("[mq-deadline]") {
            bail!(
                "{}: scheduler is `{now}` after selecting mq-deadline",
                self.name
            );
        }
        Ok(())
    }

    /// (read_expire, write_expire) in ms as the kernel reports them.
    pub fn expiries_ms(&self) -> Result<(u64, u64)> {
        let get = |a: &str| -> Result<u64> {
            let v = self.read_attr(&format!("queue/iosched/{a}"))?;
            v.parse().with_context(|| format!("{a} is `{v}`"))
        };
        Ok((get("read_expire")?, get("write_expire")?))
    }

    pub fn set_expiries_ms(&self, read: u64, write: u64) -> Result<(u64, u64)> {
        self.write_attr("queue/iosched/read_expire", &read.to_string())?;
        self.write_attr("queue/iosched/write_expire", &write.to_string())?;
        self.expiries_ms()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let mut cmd = Command::new("losetup");
        cmd.arg("-d").arg(&self.path);
        // Detaching can fail for a moment while the last opener closes: retry briefly.
        for attempt in 0..10 {
            match cmd.output() {
                Ok(out) if out.status.success() => {
                    eprintln!("xtask: bench: detached {}", self.path.display());
                    return;
                }
                Ok(out) if attempt == 9 => eprintln!(
                    "xtask: bench: WARNING `{}` failed: {}",
                    display(&cmd),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => {
                    eprintln!(
                        "xtask: bench: WARNING could not run `{}`: {e}",
                        display(&cmd)
                    );
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// A tmpfs mounted on a directory of our own (private propagation), unmounted and
/// the directory removed on drop. Drop the loop devices backed by it first.
#[derive(Debug)]
pub struct TmpfsMount {
    pub dir: PathBuf,
}

impl TmpfsMount {
    pub fn mount(dir: &Path, size: &str) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::util::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0700"))
                .arg("kml-bench")
                .arg(dir),
        )?;
        let guard = TmpfsMount {
            dir: dir.to_path_buf(),
        };
        // Keep it out of other mount namespaces' view; failing that is harmless.
        let _ = Command::new("mount")
            .arg("--make-private")
            .arg(dir)
            .status();
        Ok(guard)
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "xtask: bench: umount {} failed; detaching it lazily",
                self.dir.display()
            );
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = fs::remove_dir(&self.dir);
        eprintln!("xtask: bench: unmounted {}", self.dir.display());
    }
}

/// A /proc/sys value set for the benchmark and put back on drop.
#[derive(Debug)]
pub struct SysctlGuard {
    path: PathBuf,
    old: String,
}

impl SysctlGuard {
    pub fn set(path: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from(path);
        let old = fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        fs::write(&path, value)
            .with_context(|| format!("writing {value} to {}", path.display()))?;
        eprintln!("xtask: bench: {} = {value} (was {old})", path.display());
        Ok(SysctlGuard { path, old })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        match fs::write(&self.path, &self.old) {
            Ok(()) => eprintln!(
                "xtask: bench: restored {} = {}",
                self.path.display(),
                self.old
            ),
            Err(e) => eprintln!(
                "xtask: bench: WARNING could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            ),
        }
    }
}

/// A child process whose stdout and stderr go to files; stopped (SIGINT, then
/// SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub name: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd`, writing its output to `<logs>/<name>.out` and `.err`.
    pub fn spawn(cmd: &mut Command, name: &str, logs: &Path) -> Result<Self> {
        let stdout = logs.join(format!("{name}.out"));
        let stderr = logs.join(format!("{name}.err"));
        cmd.stdin(Stdio::null())
            .stdout(
                File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?,
            )
            .stderr(
                File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?,
            );
        let line = display(cmd);
        eprintln!(
            "xtask: running {line} (output in {})",
            stdout.with_extension("{out,err}").display()
        );
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        Ok(Proc {
            child,
            name: name.to_owned(),
            stdout,
            stderr,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has ended.
    pub fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for it to end by itself; on interruption, stops it.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.poll()? {
                return Ok(s);
            }
            if interrupted() {
                self.stop(Duration::from_secs(5));
                bail!("interrupted while waiting for {}", self.name);
            }
            if Instant::now() >= end {
                self.stop(Duration::from_secs(5));
                bail!(
                    "{} did not finish within {:?}; stopped it",
                    self.name,
                    timeout
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGINT (what the agent, bpftrace and fio stop cleanly on), then SIGKILL after
    /// `grace`. Returns the exit status, if it could be collected.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.poll() {
            return Some(s);
        }
        send_signal(self.pid(), SIGINT);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.poll() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "xtask: bench: {} ignored SIGINT for {grace:?}; killing it",
            self.name
        );
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        self.status
    }

    /// Waits until `needle` appears in its stdout or stderr (a readiness line of a
    /// tool that has no other way to say it is ready, such as bpftrace).
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let seen = |out: &str, err: &str| out.contains(needle) || err.contains(needle);
        self.wait_until(seen, &format!("`{needle}`"), timeout)
    }

    /// Waits for the agent's JSON event `name` on its stdout (`kml-agent ... --json`:
    /// `ready` once it is attached and observing).
    pub fn wait_for_event(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let seen = |out: &str, _: &str| super::parse::agent_events(out, name).next().is_some();
        self.wait_until(seen, &format!("the `{name}` event"), timeout)
    }

    /// Waits until `seen(stdout, stderr)` holds.
    fn wait_until(
        &mut self,
        seen: impl Fn(&str, &str) -> bool,
        needle: &str,
        timeout: Duration,
    ) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let read = |f: &PathBuf| fs::read_to_string(f).unwrap_or_default();
            if seen(&read(&self.stdout), &read(&self.stderr)) {
                return Ok(());
            }
            if let Some(s) = self.poll()? {
                bail!(
                    "{} ended ({}) before printing {needle}: {}",
                    self.name,
                    crate::util::describe_status(s),
                    tail(&self.stderr, 5)
                );
            }
            check_interrupted()?;
            if Instant::now() >= end {
                bail!(
                    "{} did not print {needle} within {timeout:?}: {}",
                    self.name,
                    tail(&self.stderr, 5)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.stop(Duration::from_secs(10));
        }
    }
}

/// The BPF program ids a process holds (`prog_id:` of its fds in /proc/PID/fdinfo).
pub fn prog_ids(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|t| super::parse::parse_fdinfo_prog_id(&t))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The last `n` lines of a file, joined with ` / ` (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// Runs `cmd` to completion with output to files, interruptibly, within `timeout`.
/// Fails unless it exits successfully.
pub fn run_logged(cmd: &mut Command, name: &str, logs: &Path, timeout: Duration) -> Result<Proc> {
    let mut p = Proc::spawn(cmd, name, logs)?;
    let status = p.wait(timeout)?;
    if !status.success() {
        bail!(
            "{name} failed ({}): {}",
            crate::util::describe_status(status),
            tail(&p.stderr, 5)
        );
    }
    Ok(p)
}
