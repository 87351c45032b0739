//! `cargo xtask setup`: idempotently installs what building and testing kml needs.
//!
//! - Debian packages bpftool, bpftrace, fio and systemd (for `systemd-analyze verify`
//!   of the shipped unit) (apt-get; needs root when one is missing);
//! - the nightly toolchain and its rust-src component (for `-Z build-std=core`);
//! - bpf-linker, built against the nightly toolchain's own libLLVM (the default
//!   `cargo install bpf-linker` wants a system LLVM this machine does not have).
//!
//! Mount points (bpffs, tracefs) are the agent's business, not setup's.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::util::{self, home_dir, output, probe, run};

/// Debian packages the tests and the tooling use.
pub const DEBIAN_PACKAGES: &[&str] = &["bpftool", "bpftrace", "fio", "systemd"];

#[derive(Debug, Default, Args)]
pub struct SetupArgs {
    /// Rebuild bpf-linker even when a working one is found (say, after the nightly
    /// toolchain, and so its LLVM, changed).
    #[arg(long)]
    pub reinstall_bpf_linker: bool,
}

impl SetupArgs {
    pub fn execute(self) -> Result<ExitCode> {
        let tools = ensure(&self)?;
        eprintln!(
            "xtask: setup complete (bpf-linker {})",
            describe_location(&tools.bpf_linker)
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// What setup found or installed, for the build.
#[derive(Debug)]
pub struct Tools {
    /// A bpf-linker that runs: either the bare name (found on PATH) or a full path.
    pub bpf_linker: PathBuf,
}

impl Tools {
    /// The directory to put in front of PATH so that rustc finds this bpf-linker,
    /// or `None` when it is already found on PATH.
    pub fn bpf_linker_dir(&self) -> Option<&Path> {
        match self.bpf_linker.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => Some(dir),
            _ => None,
        }
    }
}

/// Runs every step of setup; each one says whether it found or installed something.
pub fn ensure(opts: &SetupArgs) -> Result<Tools> {
    ensure_debian_packages()?;
    ensure_nightly()?;
    let llvm = ensure_llvm_prefix()?;
    let bpf_linker = ensure_bpf_linker(&llvm, opts.reinstall_bpf_linker)?;
    Ok(Tools { bpf_linker })
}

// ---------------------------------------------------------------- Debian packages

fn deb_installed(package: &str) -> bool {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Status}", package]);
    // dpkg-query exits 1 for a package it does not know: that is "not installed".
    probe(&mut cmd)
        .is_some_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn ensure_debian_packages() -> Result<()> {
    ensure_packages(DEBIAN_PACKAGES)
}

/// Installs those of `packages` that are missing (apt-get; needs root then), saying
/// what it found and what it installs. A second run installs nothing.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &package in packages {
        if deb_installed(package) {
            eprintln!("xtask: {package} already installed");
        } else {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(", ");
    if !util::is_root()? {
        bail!(
            "Debian packages missing: {list}; installing them needs root: run `cargo xtask setup` \
             as root, or `apt-get install {}` as root",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {list} via apt-get");
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(&missing))?;
    let still_missing: Vec<&str> = missing
        .into_iter()
        .filter(|package| !deb_installed(package))
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "apt-get reported success, but these packages are still not installed: {}",
            still_missing.join(", ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- nightly toolchain

/// A rustup-proxied command with the outer cargo's toolchain choice removed, so that
/// `+nightly` (or rustup's own default) decides.
fn rustup_cmd(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// Whether `rustup toolchain list` shows the floating `nightly` toolchain
/// (`nightly-<host>`; a dated `nightly-2026-05-19-<host>` does not count).
fn has_nightly(toolchain_list: &str) -> bool {
    toolchain_list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        match name.strip_prefix("nightly") {
            Some("") => true,
            Some(rest) => rest
                .strip_prefix('-')
                .and_then(|host| host.chars().next())
                .is_some_and(|c| !c.is_ascii_digit()),
            None => false,
        }
    })
}

fn has_component(installed: &str, component: &str) -> bool {
    installed.lines().map(str::trim).any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

pub fn ensure_nightly() -> Result<()> {
    let toolchains = output(rustup_cmd("rustup").args(["toolchain", "list"]))?;
    if has_nightly(&toolchains) {
        eprintln!("xtask: nightly toolchain already installed");
    } else {
        eprintln!("xtask: installing the nightly toolchain");
        run(rustup_cmd("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(rustup_cmd("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if has_component(&components, "rust-src") {
        eprintln!("xtask: rust-src for nightly already installed");
    } else {
        eprintln!("xtask: installing rust-src for nightly");
        run(rustup_cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- nightly's LLVM

/// An LLVM "prefix" made of symlinks into the nightly sysroot, for building
/// bpf-linker (`LLVM_PREFIX`) and for running it (its runpath is `<prefix>/lib`).
#[derive(Debug)]
struct LlvmPrefix {
    major: u32,
    prefix: PathBuf,
}

/// The LLVM major version from a file name like `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    let end = version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(version.len());
    version[..end].parse().ok()
}

/// `<sysroot>/lib/libLLVM.so.*`; when there are several, the last in name order.
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(lib_dir)
        .with_context(|| format!("could not list {}", lib_dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", lib_dir.display()))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with("libLLVM.so.")) {
            found.push(entry.path());
        }
    }
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain ships no shared LLVM to build bpf-linker against",
            lib_dir.display()
        )
    })
}

/// Makes `link` a symlink to `target`, replacing a stale symlink or file.
/// Returns whether anything changed.
fn ensure_symlink(link: &Path, target: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(link) {
        Ok(meta) => {
            if meta.file_type().is_symlink()
                && std::fs::read_link(link).is_ok_and(|current| current == target)
            {
                return Ok(false);
            }
            if meta.is_dir() {
                bail!("{} is a directory, expected a symlink", link.display());
            }
            std::fs::remove_file(link)
                .with_context(|| format!("could not remove stale {}", link.display()))?;
        }
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("could not inspect {}", link.display()))
        }
    }
    std::os::unix::fs::symlink(target, link).with_context(|| {
        format!(
            "could not create symlink {} -> {}",
            link.display(),
            target.display()
        )
    })?;
    eprintln!("xtask: linked {} -> {}", link.display(), target.display());
    Ok(true)
}

fn ensure_llvm_prefix() -> Result<LlvmPrefix> {
    let sysroot = output(rustup_cmd("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let libllvm = find_libllvm(&sysroot.join("lib"))?;
    let file_name = libllvm
        .file_name()
        .and_then(OsStr::to_str)
        .context("libLLVM file name is not UTF-8")?
        .to_owned();
    let major = llvm_major(&file_name)
        .with_context(|| format!("no LLVM major version in the file name {file_name}"))?;

    let prefix = home_dir()?
        .join(".local/share/kml")
        .join(format!("llvm-{major}"));
    let lib_dir = prefix.join("lib");
    std::fs::create_dir_all(&lib_dir)
        .with_context(|| format!("could not create {}", lib_dir.display()))?;
    // `libLLVM.so` is what bpf-linker's build looks for under LLVM_PREFIX; the
    // versioned name is the soname the built binary asks the loader for through
    // its runpath `<prefix>/lib`, so bpf-linker runs outside `cargo +nightly` too.
    let mut changed = ensure_symlink(&lib_dir.join("libLLVM.so"), &libllvm)?;
    changed |= ensure_symlink(&lib_dir.join(&file_name), &libllvm)?;
    if !changed {
        eprintln!(
            "xtask: LLVM {major} prefix {} already in place",
            prefix.display()
        );
    }
    Ok(LlvmPrefix { major, prefix })
}

// ---------------------------------------------------------------- bpf-linker

/// Where bpf-linker may be: on PATH, then the cargo install directories.
fn bpf_linker_candidates() -> Vec<PathBuf> {
    let mut candidates = vec![PathBuf::from("bpf-linker")];
    let mut push = |dir: Option<PathBuf>| {
        if let Some(dir) = dir {
            let path = dir.join("bin").join("bpf-linker");
            if !candidates.contains(&path) {
                candidates.push(path);
            }
        }
    };
    push(std::env::var_os("CARGO_INSTALL_ROOT").map(PathBuf::from));
    push(std::env::var_os("CARGO_HOME").map(PathBuf::from));
    push(home_dir().ok().map(|home| home.join(".cargo")));
    candidates
}

/// Where `cargo install` puts things: `$CARGO_INSTALL_ROOT`, else `$CARGO_HOME`,
/// else `~/.cargo` (an `install.root` in a cargo config is not looked at).
fn cargo_install_root() -> Result<PathBuf> {
    for var in ["CARGO_INSTALL_ROOT", "CARGO_HOME"] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
    }
    Ok(home_dir()?.join(".cargo"))
}

/// The first bpf-linker candidate for which `bpf-linker --version` succeeds.
fn find_working_bpf_linker() -> Option<(PathBuf, String)> {
    for candidate in bpf_linker_candidates() {
        if candidate.components().count() > 1 && !candidate.exists() {
            continue;
        }
        let Some(out) = probe(Command::new(&candidate).arg("--version")) else {
            continue;
        };
        if out.status.success() {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            return Some((candidate, version));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "xtask: {} does not run ({}): {}",
            candidate.display(),
            util::describe_status(out.status),
            stderr.trim()
        );
    }
    None
}

/// "on PATH" for the bare name, else the full path.
pub fn describe_location(bpf_linker: &Path) -> String {
    if bpf_linker.components().count() > 1 {
        bpf_linker.display().to_string()
    } else {
        "on PATH".to_owned()
    }
}

fn ensure_bpf_linker(llvm: &LlvmPrefix, reinstall: bool) -> Result<PathBuf> {
    if !reinstall {
        if let Some((path, version)) = find_working_bpf_linker() {
            eprintln!(
                "xtask: bpf-linker already installed ({version}, {})",
                describe_location(&path)
            );
            return Ok(path);
        }
    }
    let major = llvm.major;
    eprintln!("xtask: installing bpf-linker against nightly's LLVM {major} (takes about a minute)");
    let mut cmd = Command::new("cargo");
    // `--force`: rebuild even when cargo's records say the same version is installed
    // (a bpf-linker that no longer runs, e.g. built against a replaced LLVM).
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--force",
        "--no-default-features",
    ])
    .args(["--features", &format!("llvm-{major}")])
    .env("LLVM_PREFIX", &llvm.prefix);
    // Leave nothing of an outer cargo invocation that could redirect this build.
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd)?;
    // Check the copy just installed first (where `cargo install` puts binaries).
    let installed = cargo_install_root()?.join("bin").join("bpf-linker");
    let found = match probe(Command::new(&installed).arg("--version")) {
        Some(out) if out.status.success() => Some((
            installed,
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )),
        _ => find_working_bpf_linker(),
    };
    let (path, version) =
        found.context("bpf-linker was installed, but `bpf-linker --version` still fails")?;
    eprintln!("xtask: installed {version} ({})", describe_location(&path));
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_file_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.19"), Some(19));
        assert_eq!(llvm_major("libLLVM.so.18.1"), Some(18));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(llvm_major("libLLVM.so.x"), None);
    }

    #[test]
    fn nightly_in_toolchain_list() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(!has_nightly("stable-x86_64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu\n"
        ));
        assert!(has_nightly("nightly\n"));
        assert!(!has_nightly("no installed toolchains\n"));
    }

    #[test]
    fn rust_src_in_component_list() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        assert!(has_component(list, "rust-src"));
        assert!(!has_component(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
        assert!(!has_component("rust-srcx\n", "rust-src"));
    }

    #[test]
    fn symlink_is_created_then_kept_then_replaced() {
        let dir = std::env::temp_dir().join(format!("xtask-symlink-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("libLLVM.so");
        let a = dir.join("a");
        let b = dir.join("b");
        assert!(ensure_symlink(&link, &a).unwrap());
        assert!(!ensure_symlink(&link, &a).unwrap());
        assert!(ensure_symlink(&link, &b).unwrap());
        assert_eq!(std::fs::read_link(&link).unwrap(), b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bpf_linker_dir_only_for_full_paths() {
        let on_path = Tools {
            bpf_linker: PathBuf::from("bpf-linker"),
        };
        assert_eq!(on_path.bpf_linker_dir(), None);
        let full = Tools {
            bpf_linker: PathBuf::from("/root/.cargo/bin/bpf-linker"),
        };
        assert_eq!(full.bpf_linker_dir(), Some(Path::new("/root/.cargo/bin")));
    }
}
