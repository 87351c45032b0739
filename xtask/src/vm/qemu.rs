//! Booting the guest under QEMU: the command line, the serial console (echoed and
//! logged), the sentinel line, a hard timeout that kills a hung guest, and the
//! KVM probe (KVM only when a quick probe boot works, TCG otherwise).

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::util::display;

pub const QEMU: &str = "qemu-system-x86_64";
pub const SENTINEL: &str = "KML-VM-RESULT:";
const READY: &str = "KML-VM-READY";
/// After the sentinel, the guest has this long to power off before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if /dev/kvm exists and a probe boot works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        })
    }
}

/// One boot.
#[derive(Debug, Clone)]
pub struct Boot {
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line after the fixed part.
    pub append: String,
    /// A raw disk image for the virtio disk, with QEMU's I/O throttling.
    pub disk: Option<(PathBuf, u32)>,
    /// Host directory shared as virtio-9p tag `kmlout`.
    pub share: Option<PathBuf>,
    pub timeout: Duration,
    pub console_log: PathBuf,
    /// Echo the console to stderr (prefixed).
    pub echo: bool,
}

#[derive(Debug)]
pub struct Outcome {
    /// `Some(Ok(text))` for PASS, `Some(Err(reason))` for FAIL, None when no sentinel came.
    pub result: Option<std::result::Result<String, String>>,
    pub ready: bool,
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
    /// Seconds from start to the guest's first line of /init output.
    pub boot_secs: Option<f64>,
    /// Last lines of QEMU's own stderr (errors before the guest ran).
    pub qemu_errors: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        matches!(self.result, Some(Ok(_)))
    }

    /// A one-line account of what happened, for failures.
    pub fn describe(&self) -> String {
        let how = if self.timed_out {
            format!(
                "guest killed after the {:.0} s timeout (hung)",
                self.elapsed.as_secs_f64()
            )
        } else {
            match self.status {
                Some(s) => format!(
                    "QEMU exited ({}) after {:.1} s",
                    crate::util::describe_status(s),
                    self.elapsed.as_secs_f64()
                ),
                None => "QEMU status unknown".into(),
            }
        };
        let what = match &self.result {
            Some(Ok(t)) => format!("PASS {t}"),
            Some(Err(r)) => format!("FAIL {r}"),
            None => "no result line from the guest".into(),
        };
        let errs = if self.qemu_errors.is_empty() {
            String::new()
        } else {
            format!("; QEMU said: {}", self.qemu_errors.join(" | "))
        };
        format!("{what}; {how}{errs}")
    }
}

/// Kills and reaps QEMU when dropped, so no guest outlives xtask's error paths.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn command(b: &Boot) -> Command {
    let mut cmd = Command::new(QEMU);
    match b.accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        _ => cmd.args(["-accel", "tcg"]),
    };
    cmd.args(["-m", "2G", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&b.kernel)
        .arg("-initrd")
        .arg(&b.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 loglevel=4 {}", b.append))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    if let Some((disk, iops)) = &b.disk {
        cmd.arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=kmldisk,cache=none,aio=threads,throttling.iops-total={iops}",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=kmldisk"]);
    }
    if let Some(share) = &b.share {
        cmd.arg("-fsdev")
            .arg(format!(
                "local,id=kmlout,path={},security_model=none",
                share.display()
            ))
            .args(["-device", "virtio-9p-pci,fsdev=kmlout,mount_tag=kmlout"]);
    }
    cmd
}

enum Line {
    Console(String),
    Qemu(String),
}

/// Boots and waits for the guest to finish, the timeout, or QEMU to exit.
pub fn boot(b: &Boot) -> Result<Outcome> {
    let mut cmd = command(b);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("xtask: running {}", display(&cmd));
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {QEMU}"))?;
    let stdout = child.stdout.take().context("QEMU stdout")?;
    let stderr = child.stderr.take().context("QEMU stderr")?;
    let mut guard = Guard(Some(child));
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let s = strip_terminal_codes(&String::from_utf8_lossy(&line));
            if tx.send(Line::Console(s)).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(Line::Qemu(line)).is_err() {
                break;
            }
        }
    });
    let mut log = fs::File::create(&b.console_log)
        .with_context(|| format!("creating {}", b.console_log.display()))?;
    let mut out = Outcome {
        result: None,
        ready: false,
        status: None,
        timed_out: false,
        elapsed: Duration::ZERO,
        boot_secs: None,
        qemu_errors: Vec::new(),
    };
    let mut deadline = started + b.timeout;
    let mut handle = |line: Line, out: &mut Outcome, deadline: &mut Instant| match line {
        Line::Console(s) => {
            let _ = writeln!(log, "{s}");
            if b.echo {
                eprintln!("  guest| {s}");
            }
            if out.boot_secs.is_none() && s.starts_with("kml-guest:") {
                out.boot_secs = Some(started.elapsed().as_secs_f64());
            }
            if s.contains(READY) {
                out.ready = true;
            }
            if let Some(rest) = s
                .find(SENTINEL)
                .map(|i| s[i + SENTINEL.len()..].trim().to_owned())
            {
                out.result = Some(match rest.strip_prefix("PASS") {
                    Some(t) => Ok(t.trim().to_owned()),
                    None => Err(rest.strip_prefix("FAIL").unwrap_or(&rest).trim().to_owned()),
                });
                *deadline = (*deadline).min(Instant::now() + POWEROFF_GRACE);
            }
        }
        Line::Qemu(s) => {
            let _ = writeln!(log, "qemu: {s}");
            eprintln!("  qemu| {s}");
            out.qemu_errors.push(s);
            if out.qemu_errors.len() > 5 {
                out.qemu_errors.remove(0);
            }
        }
    };
    loop {
        let now = Instant::now();
        if now >= deadline {
            out.timed_out = out.result.is_none();
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(500))) {
            Ok(line) => handle(line, &mut out, &mut deadline),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // QEMU closed its output: it is exiting; the status comes below.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100))
            }
        }
        if let Some(c) = guard.0.as_mut() {
            if let Some(status) = c.try_wait()? {
                out.status = Some(status);
                // Collect what the readers still have.
                while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                    handle(line, &mut out, &mut deadline);
                }
                guard.0 = None;
                break;
            }
        }
    }
    if let Some(mut c) = guard.0.take() {
        // Timed out (or the guest did not power off after its result): kill it.
        let _ = c.kill();
        out.status = c.wait().ok();
        if out.result.is_some() {
            eprintln!("xtask: the guest gave its result but did not power off within {POWEROFF_GRACE:?}: killed");
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// The console line without terminal escape sequences (SeaBIOS clears the
/// screen) and control characters.
pub fn strip_terminal_codes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters... final byte (@ to ~); other escapes: one more char.
            if chars.peek() == Some(&'[') {
                chars.next();
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// Which accelerator to use; `probe` boots the guest in probe mode (no disk) with KVM.
pub fn choose_accel(requested: Accel, probe: &Boot) -> Result<(Accel, String)> {
    match requested {
        Accel::Tcg => return Ok((Accel::Tcg, "TCG (asked for)".into())),
        Accel::Kvm => return Ok((Accel::Kvm, "KVM (asked for)".into())),
        Accel::Auto => {}
    }
    if !Path::new("/dev/kvm").exists() {
        return Ok((Accel::Tcg, "TCG: no /dev/kvm".into()));
    }
    eprintln!(
        "xtask: /dev/kvm exists: probing KVM with a quick boot (timeout {:?})",
        probe.timeout
    );
    let mut p = probe.clone();
    p.accel = Accel::Kvm;
    p.echo = false;
    let o = boot(&p)?;
    if o.ready && o.passed() {
        Ok((
            Accel::Kvm,
            format!("KVM (probe boot took {:.1} s)", o.elapsed.as_secs_f64()),
        ))
    } else {
        Ok((
            Accel::Tcg,
            format!("TCG: the KVM probe boot failed: {}", o.describe()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_codes() {
        assert_eq!(
            strip_terminal_codes("\x1bc\x1b[?7l\x1b[2Jkml-guest: hi\r"),
            "kml-guest: hi"
        );
        assert_eq!(strip_terminal_codes("plain\ttext"), "plain\ttext");
    }

    #[test]
    fn qemu_command_line() {
        let b = Boot {
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "kml.mode=smoke".into(),
            disk: Some(("/d.img".into(), 100)),
            share: Some("/out".into()),
            timeout: Duration::from_secs(1),
            console_log: "/log".into(),
            echo: false,
        };
        let line = display(&command(&b));
        assert!(
            line.starts_with("qemu-system-x86_64 -accel tcg -m 2G -smp 2 -nographic"),
            "{line}"
        );
        assert!(line.contains("throttling.iops-total=100"));
        assert!(line.contains("isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(line.contains("mount_tag=kmlout"));
        assert!(line.contains("'console=ttyS0 panic=-1 loglevel=4 kml.mode=smoke'"));
    }
}
