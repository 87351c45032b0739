//! `cargo xtask build`: setup, then the eBPF object (nightly, bpfel-unknown-none),
//! then the host crates (kml-agent embeds the object through `KML_EBPF_OBJECT`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{ensure, Context as _, Result};
use clap::Args;

use crate::setup::{self, SetupArgs, Tools};
use crate::util::{run, workspace_root};

/// The eBPF crate's directory, relative to the workspace root (not a workspace member).
const EBPF_CRATE_DIR: &str = "kml-ebpf";
/// The eBPF crate's binary target.
const EBPF_BIN: &str = "kml";
const EBPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Build kml-agent in release mode (the eBPF object is always built in release mode).
    #[arg(long)]
    pub release: bool,
}

impl BuildArgs {
    pub fn execute(self) -> Result<ExitCode> {
        let agent = build_all(self.release)?;
        eprintln!(
            "xtask: built {} and {}",
            ebpf_object_path(&workspace_root()).display(),
            agent.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// `<root>/target/ebpf`: the eBPF crate's own target directory.
pub fn ebpf_target_dir(root: &Path) -> PathBuf {
    root.join("target").join("ebpf")
}

/// Where the eBPF object lands: `<root>/target/ebpf/bpfel-unknown-none/release/kml`.
pub fn ebpf_object_path(root: &Path) -> PathBuf {
    ebpf_target_dir(root)
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_BIN)
}

/// The host target directory, `<root>/target`, passed explicitly to every host build
/// so an inherited `CARGO_TARGET_DIR` cannot move the binaries elsewhere.
pub fn host_target_dir(root: &Path) -> PathBuf {
    root.join("target")
}

/// `<root>/target/{debug|release}/kml-agent`.
pub fn agent_binary_path(root: &Path, release: bool) -> PathBuf {
    host_target_dir(root)
        .join(if release { "release" } else { "debug" })
        .join("kml-agent")
}

/// `CARGO_ENCODED_RUSTFLAGS` for the eBPF build (flags separated by `\x1f`).
fn ebpf_rustflags() -> String {
    [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        // bpf-linker passes LLVM `--bpf-expand-memcpy-in-order` by default, which
        // also stops LLVM from expanding a memset into stores: every zeroing of a
        // few adjacent fields became a call to compiler_builtins' memset, one
        // store per byte (issue 14: ~15% of the observer's in-kernel time).
        "-Clink-arg=--disable-expand-memcpy-in-order".to_owned(),
        // BPF ISA v3 (kernel 5.12+): atomic fetch-add, used for the in-flight counts.
        "-Ctarget-cpu=v3".to_owned(),
    ]
    .join("\x1f")
}

/// The `cargo +nightly build` of the eBPF crate, cleaned of everything the outer
/// (stable) cargo that runs xtask put into the environment.
fn ebpf_build_command(root: &Path, tools: &Tools) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join(EBPF_CRATE_DIR))
        .args(["+nightly", "build", "--release", "--target", EBPF_TARGET])
        .args(["-Z", "build-std=core", "--bins", "--target-dir"])
        .arg(ebpf_target_dir(root));
    for var in [
        // Set by `cargo run`/rustup for the outer stable cargo; they would pin the
        // inner cargo (and its rustc) to stable despite `+nightly`.
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", ebpf_rustflags());
    // rustc runs the linker `bpf-linker` from PATH: make sure it finds the one setup found.
    if let Some(dir) = tools.bpf_linker_dir() {
        let mut paths = vec![dir.to_path_buf()];
        if let Some(path) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&path));
        }
        let path: OsString =
            std::env::join_paths(paths).context("cannot put bpf-linker's directory on PATH")?;
        cmd.env("PATH", path);
    }
    Ok(cmd)
}

/// Builds the eBPF object; returns its path.
pub fn build_ebpf(root: &Path, tools: &Tools) -> Result<PathBuf> {
    eprintln!("xtask: building the eBPF object ({EBPF_CRATE_DIR}, nightly, {EBPF_TARGET})");
    run(&mut ebpf_build_command(root, tools)?).context("building the eBPF crate failed")?;
    let object = ebpf_object_path(root);
    ensure!(
        object.is_file(),
        "the eBPF build succeeded but {} does not exist",
        object.display()
    );
    Ok(object)
}

/// Builds kml-agent (with the cargo `features`) against the eBPF object; returns
/// the agent binary's path.
pub fn build_agent(
    root: &Path,
    object: &Path,
    release: bool,
    features: &[&str],
) -> Result<PathBuf> {
    eprintln!("xtask: building kml-agent");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).arg("build");
    if release {
        cmd.arg("--release");
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    cmd.args(["-p", "kml-agent", "--target-dir"])
        .arg(host_target_dir(root))
        .env("KML_EBPF_OBJECT", object);
    run(&mut cmd).context("building kml-agent failed")?;
    let agent = agent_binary_path(root, release);
    ensure!(
        agent.is_file(),
        "the kml-agent build succeeded but {} does not exist",
        agent.display()
    );
    Ok(agent)
}

/// Setup, the eBPF object, then kml-agent. Returns the agent binary's absolute path.
pub fn build_all(release: bool) -> Result<PathBuf> {
    build_all_with(release, &[])
}

/// [`build_all`], with kml-agent's cargo `features` (the tests' agent has `testing`).
pub fn build_all_with(release: bool, features: &[&str]) -> Result<PathBuf> {
    let root = workspace_root();
    let tools = setup::ensure(&SetupArgs::default())?;
    let object = build_ebpf(&root, &tools)?;
    build_agent(&root, &object, release, features)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let root = Path::new("/w");
        assert_eq!(
            ebpf_object_path(root),
            Path::new("/w/target/ebpf/bpfel-unknown-none/release/kml")
        );
        assert_eq!(
            agent_binary_path(root, false),
            Path::new("/w/target/debug/kml-agent")
        );
        assert_eq!(
            agent_binary_path(root, true),
            Path::new("/w/target/release/kml-agent")
        );
    }

    #[test]
    fn rustflags_are_unit_separated() {
        let flags = ebpf_rustflags();
        let parts: Vec<&str> = flags.split('\x1f').collect();
        assert_eq!(parts.len(), 5);
        assert_eq!(
            parts[0],
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH)
        );
        assert_eq!(
            &parts[1..],
            [
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
                "-Clink-arg=--disable-expand-memcpy-in-order",
                "-Ctarget-cpu=v3"
            ]
        );
    }

    #[test]
    fn ebpf_command_line() {
        let tools = Tools {
            bpf_linker: PathBuf::from("/opt/x/bin/bpf-linker"),
        };
        let cmd = ebpf_build_command(Path::new("/w"), &tools).unwrap();
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/w/kml-ebpf")));
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "+nightly",
                "build",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--bins",
                "--target-dir",
                "/w/target/ebpf"
            ]
        );
        let envs: Vec<_> = cmd.get_envs().collect();
        for removed in [
            "CARGO",
            "RUSTUP_TOOLCHAIN",
            "RUSTC",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
        ] {
            assert!(
                envs.contains(&(removed.as_ref(), None)),
                "{removed} not removed"
            );
        }
        let path = envs
            .iter()
            .find(|(k, _)| *k == "PATH")
            .and_then(|(_, v)| *v)
            .unwrap();
        assert!(path.to_str().unwrap().starts_with("/opt/x/bin"));
    }
}
