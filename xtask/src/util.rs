//! Process helpers shared by the subcommands: every external command is printed
//! (`xtask: running ...`) before it runs, and its exit status is checked.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Output};

use anyhow::{bail, Context as _, Result};

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Quotes one word for display, shell style; control characters (such as the
/// `\x1f` separator of `CARGO_ENCODED_RUSTFLAGS`) are shown as `$'\x1f'` escapes.
pub fn shell_quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        return word.into_owned();
    }
    if word.chars().any(char::is_control) {
        let mut out = String::from("$'");
        for c in word.chars() {
            match c {
                '\'' => out.push_str("\\'"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('\'');
        return out;
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The command line as a shell would read it: `(cd DIR &&) VAR=value... program args...`.
/// Variables the command removes are not shown.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), shell_quote(value)));
        }
    }
    parts.push(shell_quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(shell_quote));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {line})", shell_quote(dir.as_os_str())),
        None => line,
    }
}

fn announce(cmd: &Command) -> String {
    let line = display(cmd);
    eprintln!("xtask: running {line}");
    line
}

/// Describes an exit status for an error message.
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Runs `cmd` with inherited stdio; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = announce(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({})", describe_status(status));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns its exit status, successful or not
/// (used where a failure is reported later rather than at once).
pub fn run_status(cmd: &mut Command) -> Result<ExitStatus> {
    let line = announce(cmd);
    cmd.status()
        .with_context(|| format!("could not start `{line}`"))
}

/// Runs `cmd` capturing its output; fails unless it exits successfully.
/// Returns stdout as text.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = announce(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{line}` failed ({}): {}",
            describe_status(out.status),
            stderr.trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Runs `cmd` as a probe, capturing its output. `None` when it cannot be started
/// at all (say, the program is not installed); the caller judges the status.
pub fn probe(cmd: &mut Command) -> Option<Output> {
    announce(cmd);
    cmd.output().ok()
}

/// The effective user id, from the `Uid:` line of `/proc/self/status`
/// (real, effective, saved, filesystem).
pub fn effective_uid() -> Result<u32> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("could not read /proc/self/status")?;
    parse_effective_uid(&status).context("no usable `Uid:` line in /proc/self/status")
}

fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line["Uid:".len()..].split_whitespace().nth(1)?.parse().ok()
}

pub fn is_root() -> Result<bool> {
    Ok(effective_uid()? == 0)
}

/// `$HOME`, which setup needs for `~/.local/share/kml` and `~/.cargo/bin`.
pub fn home_dir() -> Result<PathBuf> {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => Ok(PathBuf::from(home)),
        _ => bail!("HOME is not set"),
    }
}

/// Runs `cmd` as the foreground work of xtask (`cargo xtask run`, `bench`, `soak`)
/// and passes on how it ended: its exit code, or 128 + the signal that killed it.
/// SIGINT and SIGTERM sent to xtask go to the child (`kill -TERM` on `cargo xtask
/// run` stops the agent cleanly), and xtask waits for it.
pub fn run_forwarding(cmd: &mut Command) -> Result<ExitCode> {
    let line = display(cmd);
    let status = run_signals_forwarded(cmd)?;
    Ok(forward_status(status, &line))
}

/// Spawns `cmd`, forwards SIGINT and SIGTERM to it until it ends, returns its status.
fn run_signals_forwarded(cmd: &mut Command) -> Result<ExitStatus> {
    let line = announce(cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    // Installed *after* the spawn: the child keeps the default dispositions.
    signals::forward_to(child.id());
    let status = child.wait();
    signals::stop_forwarding();
    status.with_context(|| format!("waiting for `{line}` failed"))
}

/// SIGINT and SIGTERM handlers that pass the signal on to one child. (On Ctrl-C the
/// terminal signals the whole process group, so the child may get SIGINT twice;
/// the agent and kml-bench treat a second one like the first.)
mod signals {
    use std::sync::atomic::{AtomicI32, Ordering};

    // std links libc, but has no signal API; declare the functions needed.
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
        fn kill(pid: i32, sig: i32) -> i32;
    }
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    const SIG_DFL: usize = 0;

    /// The child signals go to (0: none).
    static CHILD: AtomicI32 = AtomicI32::new(0);

    extern "C" fn pass_on(sig: i32) {
        // An atomic load and kill(2): async-signal-safe.
        let pid = CHILD.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill has no memory effects; a gone child makes it fail harmlessly.
            unsafe { kill(pid, sig) };
        }
    }

    pub fn forward_to(pid: u32) {
        CHILD.store(pid as i32, Ordering::SeqCst);
        let handler = pass_on as extern "C" fn(i32) as usize;
        // SAFETY: the handler only loads an atomic and calls kill(2).
        unsafe {
            signal(SIGINT, handler);
            signal(SIGTERM, handler);
        }
    }

    /// Back to the default dispositions, once the child has ended.
    pub fn stop_forwarding() {
        CHILD.store(0, Ordering::SeqCst);
        // SAFETY: restores the default dispositions; no handler code is involved.
        unsafe {
            signal(SIGINT, SIG_DFL);
            signal(SIGTERM, SIG_DFL);
        }
    }

    /// The child signals go to now (tests).
    #[cfg(test)]
    pub fn forwarding_to() -> i32 {
        CHILD.load(Ordering::SeqCst)
    }

    /// Sends `sig` to this process (tests).
    #[cfg(test)]
    pub fn raise_here(sig: i32) {
        // SAFETY: signals this process; its handler forwards it.
        unsafe { kill(std::process::id() as i32, sig) };
    }

    #[cfg(test)]
    pub const TERM: i32 = SIGTERM;
}

/// What `main` returns for a subcommand's result: its exit code, or failure after
/// one `xtask: error: ...` line.
pub fn exit_code(result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The child's exit code, or 128 + signal number when a signal killed it.
fn forward_status(status: ExitStatus, line: &str) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    if status.success() {
        return ExitCode::SUCCESS;
    }
    eprintln!("xtask: `{line}` ended with {}", describe_status(status));
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_the_second_field() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Uid:\t0\t1000\t0\t0\n"), Some(1000));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(OsStr::new("--release")), "--release");
        assert_eq!(shell_quote(OsStr::new("-f=${Status}")), "'-f=${Status}'");
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
        assert_eq!(
            shell_quote(OsStr::new("--cfg=a=\"b\"\x1f-Cx")),
            "$'--cfg=a=\"b\"\\x1f-Cx'"
        );
    }

    /// `kill -TERM` on xtask reaches the child it runs (the agent under `cargo xtask
    /// run`): here a shell that exits 7 on SIGTERM and would otherwise run for a minute.
    #[test]
    fn sigterm_to_xtask_is_forwarded_to_the_child() {
        let started = std::time::Instant::now();
        let sender = std::thread::spawn(|| {
            while signals::forwarding_to() == 0 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // The shell's trap must be set before it is signalled.
            std::thread::sleep(std::time::Duration::from_millis(300));
            signals::raise_here(signals::TERM);
        });
        let status = run_signals_forwarded(Command::new("sh").args([
            "-c",
            "trap 'exit 7' TERM; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        ]))
        .unwrap();
        sender.join().unwrap();
        assert_eq!(
            status.code(),
            Some(7),
            "the child saw SIGTERM and handled it"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        assert_eq!(
            signals::forwarding_to(),
            0,
            "handlers removed after the child"
        );
    }

    #[test]
    fn display_shows_set_env_and_dir_but_not_removed_env() {
        let mut cmd = Command::new("cargo");
        cmd.args(["build", "-p", "kml agent"])
            .env("A", "1")
            .env_remove("B")
            .current_dir("/tmp");
        assert_eq!(display(&cmd), "(cd /tmp && A=1 cargo build -p 'kml agent')");
    }
}
