//! `--before REV`: the agent as it was at a git revision, built once into
//! `$HOME/.cache/kml/bench-before/<commit>/` (or `$KML_BENCH_BEFORE_CACHE`) from
//! `git archive` (no worktree to clean up), so that a before/after comparison runs
//! both agents as arms of the same fio run. Outside this workspace: cargo would
//! otherwise take the tree's excluded eBPF crate for a member of this one.
//! The agent binary embeds its own eBPF object: it observes exactly as that
//! revision did.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

pub struct BeforeAgent {
    /// As given (`main`, `HEAD~3`, a hash).
    pub rev: String,
    pub commit: String,
    pub binary: PathBuf,
    /// The revision's tree (`git archive`), its `models/` among it.
    pub source: PathBuf,
    /// Seconds this call spent building it (`None`: found in the cache).
    pub built_secs: Option<f64>,
}

impl BeforeAgent {
    pub fn short(&self) -> &str {
        &self.commit[..self.commit.len().min(10)]
    }

    /// The model file both agents of a before/after pair run: the revision's own
    /// copy of `current` (same name, in its `models/`) when it has one, else
    /// `current`. An earlier agent cannot read a model of features added since,
    /// and with one file for both the difference measured is the programs', not
    /// the models'.
    pub fn shared_model(&self, current: &Path) -> PathBuf {
        current
            .file_name()
            .map(|name| self.source.join("models").join(name))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| current.to_owned())
    }
}

/// Where the agents of earlier revisions are built.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KML_BENCH_BEFORE_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    Ok(crate::util::home_dir()?.join(".cache/kml/bench-before"))
}

/// The agent of `rev`, from the cache or built now (`git archive` of the
/// repository at `root`).
pub fn build(root: &Path, rev: &str) -> Result<BeforeAgent> {
    let commit = crate::util::output(
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["rev-parse", "--verify"])
            .arg(format!("{rev}^{{commit}}")),
    )
    .with_context(|| format!("--before {rev}: not a commit of this repository"))?
    .trim()
    .to_owned();
    let dir = cache_dir()?.join(&commit);
    let binary = dir.join("target").join("release").join("kml-agent");
    if binary.is_file() {
        eprintln!(
            "xtask: bench: --before {rev}: using the agent built earlier at {}",
            binary.display()
        );
        return Ok(BeforeAgent {
            rev: rev.to_owned(),
            commit,
            binary,
            source: dir,
            built_secs: None,
        });
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let started = std::time::Instant::now();
    eprintln!(
        "xtask: bench: --before {rev}: building the agent of {commit} in {} (once; minutes)",
        dir.display()
    );
    let status = Command::new("sh")
        .arg("-c")
        .arg("git -C \"$1\" archive --format=tar \"$2\" | tar -x -C \"$3\"")
        .arg("sh")
        .arg(root)
        .arg(&commit)
        .arg(&dir)
        .status()
        .context("running git archive | tar")?;
    if !status.success() {
        bail!("git archive {commit} | tar -x failed");
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir).args(["xtask", "build", "--release"]);
    // The outer cargo's settings would point the inner build at this tree.
    for var in [
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "KML_EBPF_OBJECT",
    ] {
        cmd.env_remove(var);
    }
    crate::util::run(&mut cmd).with_context(|| format!("building the agent of {commit}"))?;
    if !binary.is_file() {
        bail!("the build of {commit} left no {}", binary.display());
    }
    Ok(BeforeAgent {
        rev: rev.to_owned(),
        commit,
        binary,
        source: dir,
        built_secs: Some(started.elapsed().as_secs_f64()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_runs_the_earlier_revisions_own_model_where_it_has_one() {
        let dir = std::env::temp_dir().join(format!("kml-before-model-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models")).unwrap();
        std::fs::write(dir.join("models/tree-position.json"), "{}").unwrap();
        let b = BeforeAgent {
            rev: "main".into(),
            commit: "0123456789abcdef".into(),
            binary: dir.join("target/release/kml-agent"),
            source: dir.clone(),
            built_secs: None,
        };
        let now = Path::new("/work/models/tree-position.json");
        assert_eq!(b.shared_model(now), dir.join("models/tree-position.json"));
        // A model the revision did not ship: the current file.
        let new = Path::new("/work/models/tree-new.json");
        assert_eq!(b.shared_model(new), new);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
