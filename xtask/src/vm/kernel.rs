//! The guest kernel: Debian's linux-source-6.12, kml's mq-deadline patch and the
//! guest config fragment, built once into a cache and rebuilt only when the patch,
//! the fragment or the packaged source change.
//!
//! Cache layout (`$HOME/.cache/kml/vm`, or `$KML_VM_CACHE`):
//! - `linux-<debian version>/`: the unpacked source, patched in place; the applied
//!   patch is kept as `.kml-applied.patch` so a changed patch is reverted and the
//!   new one applied (kbuild then rebuilds only what changed);
//! - `bzImage-<key>`: a finished kernel, `<key>` hashing the Debian version, the
//!   patch and the fragment; `build-<key>.log`: its build log.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::{home_dir, output, run};

pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
const TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// Top directory inside the tarball.
const TARBALL_TOP: &str = "linux-source-6.12";
pub const PATCH: &str = "kernel/0001-mq-deadline-kml-hook.patch";
pub const FRAGMENT: &str = "kernel/guest.config";
const APPLIED_PATCH: &str = ".kml-applied.patch";
const CONFIG_KEY: &str = ".kml-config-key";

/// A built guest kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `6.12.117` (from the source's Makefile).
    pub version: String,
    /// `6.12.117-1~deb12u1` (the Debian package).
    pub package_version: String,
    pub bzimage: PathBuf,
    /// The source tree (its `usr/gen_init_cpio` builds the initramfs).
    pub source: PathBuf,
    pub key: String,
    /// Seconds spent building now (None: taken from the cache).
    pub build_secs: Option<f64>,
}

impl Kernel {
    pub fn gen_init_cpio(&self) -> PathBuf {
        self.source.join("usr/gen_init_cpio")
    }
}

pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KML_VM_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    Ok(home_dir()?.join(".cache/kml/vm"))
}

/// FNV-1a, 64 bit: a stable content hash for cache keys (std's hasher is not
/// guaranteed stable across Rust releases).
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn package_version() -> Result<String> {
    let v = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let v = v.trim().to_owned();
    ensure!(!v.is_empty(), "{SOURCE_PACKAGE} is not installed");
    Ok(v)
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` from a kernel Makefile.
pub fn makefile_version(makefile: &str) -> Option<String> {
    let get = |key: &str| {
        makefile.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    };
    let (v, p, s) = (get("VERSION")?, get("PATCHLEVEL")?, get("SUBLEVEL")?);
    let extra = get("EXTRAVERSION").unwrap_or_default();
    Some(format!("{v}.{p}.{s}{extra}"))
}

/// Checks every `CONFIG_X=value` of the fragment against the final `.config`
/// (olddefconfig silently drops options whose dependencies are unmet) and every
/// `# CONFIG_X is not set` is not enabled. Returns the mismatches.
pub fn config_mismatches(fragment: &str, config: &str) -> Vec<String> {
    let mut values = std::collections::HashMap::new();
    for line in config.lines() {
        if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") {
                values.insert(k.trim(), v.trim());
            }
        }
    }
    let mut bad = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(opt) = rest.strip_suffix(" is not set") {
                if let Some(v) = values.get(opt) {
                    if *v != "n" {
                        bad.push(format!("{opt} should be unset, is {v}"));
                    }
                }
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((opt, want)) = line.split_once('=') else {
            continue;
        };
        match values.get(opt.trim()) {
            Some(v) if *v == want.trim() => {}
            Some(v) => bad.push(format!(
                "{}={} wanted, .config has {v}",
                opt.trim(),
                want.trim()
            )),
            None => bad.push(format!(
                "{}={} wanted, .config does not set it",
                opt.trim(),
                want.trim()
            )),
        }
    }
    bad
}

/// Unpacks, patches, configures and builds the kernel as needed.
pub fn ensure(root: &Path, jobs: usize) -> Result<Kernel> {
    let cache = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let package_version = package_version()?;
    let patch_path = root.join(PATCH);
    let fragment_path = root.join(FRAGMENT);
    let patch =
        fs::read(&patch_path).with_context(|| format!("reading {}", patch_path.display()))?;
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("reading {}", fragment_path.display()))?;
    let key = format!(
        "{:016x}",
        fnv64(&[package_version.as_bytes(), &patch, fragment.as_bytes()])
    );

    let source = cache.join(format!(
        "linux-{}",
        package_version.replace(['~', ':', '/'], "_")
    ));
    if !source.join("Makefile").is_file() {
        unpack(&cache, &source)?;
    } else {
        eprintln!(
            "xtask: kernel source already unpacked in {}",
            source.display()
        );
    }
    let version = makefile_version(&fs::read_to_string(source.join("Makefile"))?)
        .context("cannot read the version from the kernel Makefile")?;

    apply_patch(&source, &patch_path, &patch)?;
    configure(&source, &fragment_path, &fragment, &key)?;

    let bzimage = cache.join(format!("bzImage-{key}"));
    let mut build_secs = None;
    if bzimage.is_file() && source.join("usr/gen_init_cpio").is_file() {
        eprintln!(
            "xtask: kernel {version} (key {key}) already built: {}",
            bzimage.display()
        );
    } else {
        let log = cache.join(format!("build-{key}.log"));
        eprintln!(
            "xtask: building Linux {version} with kml's mq-deadline hook (make -j{jobs} bzImage; ~10 min on 2 cores \
             the first time, seconds after a small change); log: {}",
            log.display()
        );
        let started = Instant::now();
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("make");
        cmd.current_dir(&source)
            .arg(format!("-j{jobs}"))
            .arg("bzImage")
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file));
        let status = crate::util::run_status(&mut cmd)?;
        if !status.success() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "the kernel build failed ({}); last lines of {}:\n{}",
                crate::util::describe_status(status),
                log.display(),
                tail.join("\n")
            );
        }
        let secs = started.elapsed().as_secs_f64();
        build_secs = Some(secs);
        eprintln!("xtask: kernel built in {secs:.0} s");
        if !source.join("usr/gen_init_cpio").is_file() {
            run(Command::new("make")
                .current_dir(&source)
                .arg("usr/gen_init_cpio"))?;
        }
        fs::copy(source.join("arch/x86/boot/bzImage"), &bzimage)
            .with_context(|| format!("copying bzImage to {}", bzimage.display()))?;
    }
    Ok(Kernel {
        version,
        package_version,
        bzimage,
        source,
        key,
        build_secs,
    })
}

fn unpack(cache: &Path, source: &Path) -> Result<()> {
    ensure!(
        Path::new(TARBALL).is_file(),
        "{TARBALL} missing although {SOURCE_PACKAGE} is installed"
    );
    let tmp = cache.join("unpack.tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp)?;
    eprintln!("xtask: unpacking {TARBALL} into {}", source.display());
    run(Command::new("tar")
        .arg("-xf")
        .arg(TARBALL)
        .arg("-C")
        .arg(&tmp))?;
    if source.exists() {
        fs::remove_dir_all(source)
            .with_context(|| format!("removing the incomplete {}", source.display()))?;
    }
    fs::rename(tmp.join(TARBALL_TOP), source)
        .with_context(|| format!("moving the unpacked source to {}", source.display()))?;
    fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// Makes the source carry exactly `patch`: reverts a different, previously applied
/// patch first. A source that refuses either step is reported, never guessed at.
fn apply_patch(source: &Path, patch_path: &Path, patch: &[u8]) -> Result<()> {
    let applied = source.join(APPLIED_PATCH);
    match fs::read(&applied) {
        Ok(old) if old == patch => {
            eprintln!("xtask: {} already applied", PATCH);
            return Ok(());
        }
        Ok(_) => {
            eprintln!("xtask: {PATCH} changed: reverting the previously applied version");
            run(Command::new("patch")
                .current_dir(source)
                .args(["-R", "-p1", "--batch", "-i"])
                .arg(&applied))
            .with_context(|| {
                format!(
                    "reverting the old patch failed: remove {} to start from a fresh source",
                    source.display()
                )
            })?;
            fs::remove_file(&applied)?;
        }
        Err(_) => {}
    }
    eprintln!("xtask: applying {PATCH}");
    run(Command::new("patch")
        .current_dir(source)
        .args(["-p1", "--forward", "--batch", "--dry-run", "-i"])
        .arg(patch_path))
    .with_context(|| format!("{PATCH} does not apply cleanly to {}", source.display()))?;
    run(Command::new("patch")
        .current_dir(source)
        .args(["-p1", "--forward", "--batch", "-i"])
        .arg(patch_path))?;
    fs::write(&applied, patch)?;
    Ok(())
}

/// tinyconfig + kvm_guest.config + the fragment, then a check that every option
/// asked for is in the final `.config`.
fn configure(source: &Path, fragment_path: &Path, fragment: &str, key: &str) -> Result<()> {
    let key_file = source.join(CONFIG_KEY);
    let config = source.join(".config");
    if fs::read_to_string(&key_file).ok().as_deref() != Some(key) || !config.is_file() {
        eprintln!("xtask: configuring: tinyconfig + kvm_guest.config + {FRAGMENT}");
        run(Command::new("make")
            .current_dir(source)
            .arg("tinyconfig")
            .stdout(Stdio::null()))?;
        run(Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(source)
            .args(["-m", ".config", "kernel/configs/kvm_guest.config"])
            .arg(fragment_path)
            .stdout(Stdio::null()))?;
        run(Command::new("make")
            .current_dir(source)
            .arg("olddefconfig")
            .stdout(Stdio::null()))?;
    }
    let final_config = fs::read_to_string(&config)?;
    let bad = config_mismatches(fragment, &final_config);
    if !bad.is_empty() {
        fs::remove_file(&key_file).ok();
        bail!(
            "the kernel .config ({}) lacks options {FRAGMENT} asks for (olddefconfig drops options whose \
             dependencies are unmet):\n  {}",
            config.display(),
            bad.join("\n  ")
        );
    }
    fs::write(&key_file, key)?;
    eprintln!("xtask: kernel .config has every option of {FRAGMENT}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_separates_parts() {
        assert_eq!(fnv64(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv64(&[b"ab", b"c"]), fnv64(&[b"a", b"bc"]));
        assert_eq!(fnv64(&[b"x"]), fnv64(&[b"x"]));
    }

    #[test]
    fn version_from_makefile() {
        let mk = "# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\nEXTRAVERSION =\nNAME = Baby Opossum\n";
        assert_eq!(makefile_version(mk).as_deref(), Some("6.12.117"));
    }

    #[test]
    fn config_check() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_N=8\n# CONFIG_C is not set\n\n";
        let good = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=8\n# CONFIG_C is not set\n";
        assert!(config_mismatches(fragment, good).is_empty());
        let bad = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=4\nCONFIG_C=y\n";
        let m = config_mismatches(fragment, bad);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[0].starts_with("CONFIG_B=y wanted"));
        assert!(m[1].contains(".config has 4"));
        assert!(m[2].contains("CONFIG_C should be unset"));
    }
}
