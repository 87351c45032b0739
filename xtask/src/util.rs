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

/// Ignores SIGINT in xtask itself, so that on Ctrl-C (which the terminal sends to
/// the whole foreground process group, children included) xtask outlives its child
/// and reports the child's exit status. Call it only *after* spawning the child:
/// an ignored disposition would be inherited across exec.
pub fn ignore_sigint() {
    // std links libc, but has no signal API; declare the one function needed.
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGINT: i32 = 2;
    const SIG_IGN: usize = 1;
    // SAFETY: `signal` with SIG_IGN installs no handler code; it only changes the
    // disposition of SIGINT for this process. The return value (the previous
    // disposition, or SIG_ERR) is not needed: failing to ignore is harmless.
    unsafe {
        signal(SIGINT, SIG_IGN);
    }
}

/// Runs `cmd` as the foreground work of xtask (`cargo xtask run`, `bench`, `soak`)
/// and passes on how it ended: its exit code, or 128 + the signal that killed it.
pub fn run_forwarding(cmd: &mut Command) -> Result<ExitCode> {
    let line = announce(cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    // The child shares our process group, so Ctrl-C reaches it directly; xtask
    // only has to outlive it to report its status (ignored *after* the spawn, so
    // the child keeps the default disposition).
    ignore_sigint();
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}` failed"))?;
    Ok(forward_status(status, &line))
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
