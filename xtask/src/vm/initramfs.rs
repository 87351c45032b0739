//! The guest's initramfs: busybox (static), the `/init` script, kml-agent, fio and
//! the shared libraries both need (what `ldd` lists, the dynamic loader included),
//! and the VM job files. Written with the kernel tree's `usr/gen_init_cpio` from a
//! file list (device nodes need no root that way), then compressed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::{output, run};

pub const GUEST_INIT: &str = include_str!("guest-init.sh");
const BUSYBOX: &str = "/bin/busybox";
/// The VM workloads, relative to the workspace root.
pub const WORKLOADS_DIR: &str = "workloads/vm";
/// The shipped models, relative to the workspace root; in the guest: `/kml/models`.
pub const MODELS_DIR: &str = "models";
/// The smoke test's hand-set models (written into `/kml/models`): every request
/// at risk, and none.
pub const SMOKE_ALWAYS: &str = "smoke-always-at-risk";
pub const SMOKE_NEVER: &str = "smoke-never-at-risk";

pub struct Inputs<'a> {
    pub gen_init_cpio: &'a Path,
    pub agent: &'a Path,
    pub workloads: &'a Path,
    /// The shipped models (`models/`): every `*.json` goes to `/kml/models`, with the
    /// smoke test's two hand-set models derived from `logistic.json`.
    pub models: &'a Path,
    /// Scratch directory for the stripped agent, the init script and the list.
    pub work: &'a Path,
    pub out: &'a Path,
    pub compress: bool,
}

/// Absolute library paths in `ldd` output (`name => /path (addr)` and the loader's
/// `/path (addr)`); the vDSO and `not found` lines give none.
pub fn ldd_paths(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in ldd.lines().map(str::trim) {
        if line.contains("not found") {
            bail!("ldd: a library is missing: {line}");
        }
        let candidate = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = candidate.filter(|p| p.starts_with('/')) {
            out.push(PathBuf::from(p));
        }
    }
    Ok(out)
}

fn find_program(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found in /usr/bin, /bin, /usr/sbin or /sbin")
}

/// Adds `path` and all its parents as `dir` entries.
fn add_dirs(dirs: &mut BTreeSet<String>, path: &str) {
    let mut p = Path::new(path).parent();
    while let Some(d) = p {
        let s = d.to_string_lossy();
        if s == "/" || s.is_empty() {
            break;
        }
        dirs.insert(s.into_owned());
        p = d.parent();
    }
}

/// A logistic model file whose verdict does not depend on the request: its
/// threshold (float and quantised, consistently) is moved far below (`at_risk`) or
/// above any score the model can reach. The smoke test knows each request's verdict
/// in advance that way.
pub fn fixed_verdict_model(
    logistic: &serde_json::Value,
    at_risk: bool,
) -> Result<serde_json::Value> {
    let mut m = logistic.clone();
    ensure!(m["kind"] == "logistic", "not a logistic model file");
    let out_shift = m["quantized"]["linear"]["out_shift"]
        .as_u64()
        .context("quantized.linear.out_shift")?;
    ensure!(out_shift <= 40, "out_shift {out_shift} too large");
    // 1e6 in log-odds: scores stay within about ±2^35 of 0 for any input.
    let threshold: f64 = if at_risk { -1e6 } else { 1e6 };
    m["float"]["linear"]["threshold"] = threshold.into();
    m["quantized"]["linear"]["threshold"] = ((threshold as i64) << out_shift).into();
    // What a constant verdict scores, whatever the data: `--model auto` must not
    // prefer it.
    for part in ["float", "quantized"] {
        if m["metrics"]["test"][part].is_object() {
            m["metrics"]["test"][part]["balanced_accuracy"] = 0.5.into();
        }
    }
    m["training"]["workload"] = format!(
        "kml VM smoke test: logistic.json with its threshold set to {threshold:e}: {}",
        if at_risk {
            "every request at risk"
        } else {
            "no request at risk"
        }
    )
    .into();
    Ok(m)
}

/// A file of the initramfs: its path in the guest, its source, its mode.
type Entry = (String, PathBuf, &'static str);

/// Builds the initramfs; returns its path and its uncompressed size in bytes.
pub fn build(inp: &Inputs<'_>) -> Result<(PathBuf, u64)> {
    ensure!(
        inp.gen_init_cpio.is_file(),
        "{} missing (kernel build incomplete?)",
        inp.gen_init_cpio.display()
    );
    ensure!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} missing (package busybox-static)"
    );
    if inp.work.exists() {
        fs::remove_dir_all(inp.work)?;
    }
    fs::create_dir_all(inp.work)?;
    let (mut files, lib_dirs) = binaries(inp)?;
    let libs = files.len() - 4;
    let jobs = files_with_extension(inp.workloads, "fio")?;
    ensure!(
        !jobs.is_empty(),
        "no .fio job files in {}",
        inp.workloads.display()
    );
    for j in &jobs {
        files.push((guest_path("/kml/workloads", j), j.clone(), "0644"));
    }
    let models = models(inp)?;
    for m in &models {
        files.push((guest_path("/kml/models", m), m.clone(), "0644"));
    }
    // Library search path for the loader (there is no ld.so.cache in the guest);
    // where `run --model NAME` finds the models.
    let env = inp.work.join("env");
    fs::write(
        &env,
        format!(
            "export LD_LIBRARY_PATH={}\nexport KML_MODELS_DIR=/kml/models\n",
            lib_dirs.iter().cloned().collect::<Vec<_>>().join(":")
        ),
    )?;
    files.push(("/kml/env".into(), env, "0644"));
    let total = pack(inp, &files)?;
    eprintln!(
        "xtask: initramfs {} ({} files, {:.0} MiB before compression: busybox, kml-agent, fio and {} libraries, {} job files, {} models)",
        inp.out.display(),
        files.len(),
        total as f64 / (1 << 20) as f64,
        libs,
        jobs.len(),
        models.len()
    );
    Ok((inp.out.to_path_buf(), total))
}

/// `/init`, busybox, the stripped agent and fio (in that order), then the shared
/// libraries they load; and the directories of those libraries.
fn binaries(inp: &Inputs<'_>) -> Result<(Vec<Entry>, BTreeSet<String>)> {
    // The agent without its debug info (tens of MB less to load into the guest).
    let agent = inp.work.join("kml-agent");
    run(Command::new("strip").arg("-o").arg(&agent).arg(inp.agent))
        .context("stripping kml-agent")?;
    let init = inp.work.join("init");
    fs::write(&init, GUEST_INIT)?;
    let fio = find_program("fio")?;
    let mut files: Vec<Entry> = vec![
        ("/init".into(), init, "0755"),
        (BUSYBOX.into(), PathBuf::from(BUSYBOX), "0755"),
        ("/usr/bin/kml-agent".into(), agent.clone(), "0755"),
        ("/usr/bin/fio".into(), fio.clone(), "0755"),
    ];
    let mut libs = BTreeSet::new();
    for bin in [&fio, &agent] {
        let ldd = output(Command::new("ldd").arg(bin))?;
        libs.extend(ldd_paths(&ldd)?);
    }
    let mut lib_dirs = BTreeSet::new();
    for lib in &libs {
        let real = fs::canonicalize(lib).with_context(|| format!("resolving {}", lib.display()))?;
        if let Some(d) = lib.parent() {
            lib_dirs.insert(d.to_string_lossy().into_owned());
        }
        files.push((lib.to_string_lossy().into_owned(), real, "0755"));
    }
    Ok((files, lib_dirs))
}

/// The files of `dir` ending in `.ext`, sorted.
fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// `dir/NAME` in the guest for the host file `p`.
fn guest_path(dir: &str, p: &Path) -> String {
    let name = p
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    format!("{dir}/{name}")
}

/// The shipped models and the smoke test's two hand-set ones.
fn models(inp: &Inputs<'_>) -> Result<Vec<PathBuf>> {
    let mut models = files_with_extension(inp.models, "json")?;
    let logistic = inp.models.join("logistic.json");
    let base: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&logistic)
            .with_context(|| format!("reading {}", logistic.display()))?,
    )
    .with_context(|| format!("parsing {}", logistic.display()))?;
    for (name, at_risk) in [(SMOKE_ALWAYS, true), (SMOKE_NEVER, false)] {
        let path = inp.work.join(format!("{name}.json"));
        fs::write(
            &path,
            serde_json::to_string_pretty(&fixed_verdict_model(&base, at_risk)?)?,
        )?;
        models.push(path);
    }
    Ok(models)
}

/// Writes the cpio list of `files` (and the directories and device nodes the guest
/// needs), packs it with the kernel's gen_init_cpio (gzip'd when asked) into
/// `inp.out`; returns the files' total size.
fn pack(inp: &Inputs<'_>, files: &[Entry]) -> Result<u64> {
    let mut dirs: BTreeSet<String> = [
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/mnt",
        "/mnt/out",
        "/bin",
        "/sbin",
        "/usr/sbin",
        "/root",
        "/kml",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for (name, _, _) in files {
        add_dirs(&mut dirs, name);
    }
    let mut list = String::new();
    // Parents before children: BTreeSet order puts "/a" before "/a/b".
    for d in &dirs {
        list.push_str(&format!("dir {d} 0755 0 0\n"));
    }
    list.push_str("nod /dev/console 0600 0 0 c 5 1\nnod /dev/null 0666 0 0 c 1 3\n");
    let mut total = 0u64;
    for (name, src, mode) in files {
        total += fs::metadata(src)
            .with_context(|| format!("{}", src.display()))?
            .len();
        list.push_str(&format!("file {name} {} {mode} 0 0\n", src.display()));
    }
    let list_path = inp.work.join("initramfs.list");
    fs::write(&list_path, &list)?;

    let cpio = inp.work.join("initramfs.cpio");
    let cpio_file = fs::File::create(&cpio)?;
    let mut cmd = Command::new(inp.gen_init_cpio);
    cmd.arg(&list_path).stdout(Stdio::from(cpio_file));
    run(&mut cmd).context("gen_init_cpio")?;
    if inp.compress {
        run(Command::new("gzip").args(["-f", "-n", "-1"]).arg(&cpio))?;
        let gz = cpio.with_extension("cpio.gz");
        fs::rename(&gz, inp.out)
            .with_context(|| format!("moving {} to {}", gz.display(), inp.out.display()))?;
    } else {
        fs::rename(&cpio, inp.out)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_parsing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibaio.so.1 => /lib/x86_64-linux-gnu/libaio.so.1 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            ldd_paths(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libaio.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(ldd_paths("\tlibx.so => not found\n").is_err());
    }

    #[test]
    fn parent_dirs() {
        let mut d = BTreeSet::new();
        add_dirs(&mut d, "/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            ["/lib", "/lib/x86_64-linux-gnu"]
        );
    }

    /// The hand-set models load (kml-learn validates the threshold against the
    /// float one) and give the verdict they promise on a shipped sample.
    #[test]
    fn fixed_verdict_models_are_consistent() {
        let root = crate::util::workspace_root();
        let text = fs::read_to_string(root.join(MODELS_DIR).join("logistic.json")).unwrap();
        let base: serde_json::Value = serde_json::from_str(&text).unwrap();
        for at_risk in [true, false] {
            let m = fixed_verdict_model(&base, at_risk).unwrap();
            let q = m["quantized"]["linear"]["threshold"].as_i64().unwrap();
            let f = m["float"]["linear"]["threshold"].as_f64().unwrap();
            let unit = (1u64 << m["quantized"]["linear"]["out_shift"].as_u64().unwrap()) as f64;
            assert_eq!(q as f64, f * unit);
            assert_eq!(q < 0, at_risk);
            // Beyond any accumulator value the model can produce.
            let bias = m["quantized"]["linear"]["bias"].as_i64().unwrap();
            assert!(q.unsigned_abs() > 1000 * bias.unsigned_abs());
        }
        let mut bad = base.clone();
        bad["kind"] = "tree".into();
        assert!(fixed_verdict_model(&bad, true).is_err());
    }

    #[test]
    fn init_script_prints_the_sentinel() {
        assert!(GUEST_INIT.starts_with("#!/bin/busybox sh"));
        assert!(GUEST_INIT.contains("KML-VM-RESULT: $*"));
    }
}
