//! `cargo xtask test`: formatting, build (debug), the host unit tests and doc
//! tests, then the integration tests (root only, one thread: they share loop
//! devices and the kernel's BPF state).
//!
//! Every test binary (a *suite*) runs to its end and every suite runs, whatever
//! failed before it (no fail-fast). The summary gives each suite's passed, skipped
//! and failed tests. A test skips through `kml_testkit::skip`, which names what is
//! missing on stderr and in the suite's skip log (`KML_SKIP_LOG`, read here): libtest
//! alone would count a skipped test as passed. In CI (`CI=true`, as `.ci/run` sets
//! it) a skip is a failure: the test fails naming the missing precondition, and
//! this runner fails the run on any skip or ignored test it still sees.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::build::{build_all_with, ebpf_object_path, host_target_dir};
use crate::util::{self, describe_status, display, run_status, workspace_root};

use kml_testkit::{in_ci, parse_skip_line, SKIP_LOG_ENV};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Extra arguments for the integration test binaries, after `--` (e.g. a name filter).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// How a step that is not a test binary ended (formatting, a build).
enum Step {
    Passed,
    Failed(String),
}

/// libtest's `test result:` line: counts of one binary (or summed over several).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    filtered_out: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.filtered_out += other.filtered_out;
    }
}

/// Parses `test result: ok. 3 passed; 1 failed; 0 ignored; 0 measured; 2 filtered out; ...`.
fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, rest) = rest.split_once(". ")?;
    let mut c = Counts::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            "filtered" => c.filtered_out = n,
            _ => {}
        }
    }
    Some(c)
}

/// What libtest printed, as far as the summary needs it.
#[derive(Debug, Default)]
struct Transcript {
    /// Sum of every `test result:` line (doc tests print one per crate).
    counts: Counts,
    results: usize,
    /// Names in the last `failures:` list.
    failures: Vec<String>,
}

impl Transcript {
    fn read(lines: impl Iterator<Item = String>, echo: bool) -> Transcript {
        let mut t = Transcript::default();
        let mut in_list = false;
        let mut list = Vec::new();
        for line in lines {
            if echo {
                println!("{line}");
            }
            if let Some(c) = parse_result_line(&line) {
                t.counts.add(c);
                t.results += 1;
                in_list = false;
                if !list.is_empty() {
                    t.failures.append(&mut list);
                }
                continue;
            }
            if line == "failures:" {
                // The first list holds each failure's output, the last one the names.
                in_list = true;
                list.clear();
            } else if in_list {
                if let Some(name) = line.strip_prefix("    ") {
                    if !name.is_empty() && !name.contains(' ') {
                        list.push(name.to_owned());
                    }
                }
            }
        }
        t.failures.sort();
        t.failures.dedup();
        t
    }
}

/// One test binary (or the doc tests of the workspace) and how it ended.
struct Suite {
    name: String,
    counts: Counts,
    /// (test, what was missing), from the suite's skip log.
    skipped: Vec<(String, String)>,
    failures: Vec<String>,
    /// The binary did not end the way libtest ends (crashed, killed, no result
    /// line, or a status that disagrees with the counts).
    broken: Option<String>,
    /// Wall-clock time of the suite.
    secs: f64,
}

impl Suite {
    fn not_run(name: String, why: String) -> Suite {
        Suite {
            name,
            counts: Counts::default(),
            skipped: Vec::new(),
            failures: Vec::new(),
            broken: Some(why),
            secs: 0.0,
        }
    }

    fn skipped_count(&self) -> u64 {
        self.skipped.len() as u64 + self.counts.ignored
    }

    /// Tests that ran their checks to the end and passed.
    fn passed_count(&self) -> u64 {
        self.counts.passed.saturating_sub(self.skipped.len() as u64)
    }

    fn failed_count(&self) -> u64 {
        self.counts.failed.max(u64::from(self.broken.is_some()))
    }

    fn ok(&self) -> bool {
        self.failed_count() == 0 && !(in_ci() && self.skipped_count() > 0)
    }
}

/// Judges a finished binary from its exit status, its transcript and its skips.
fn judge(name: String, status: ExitStatus, t: Transcript, skipped: Vec<(String, String)>) -> Suite {
    let broken = if t.results == 0 {
        Some(format!(
            "no `test result:` line ({}): the binary crashed or did not start",
            describe_status(status)
        ))
    } else if status.success() != (t.counts.failed == 0) {
        Some(format!(
            "{} with {} failed tests",
            describe_status(status),
            t.counts.failed
        ))
    } else {
        None
    };
    Suite {
        name,
        counts: t.counts,
        skipped,
        failures: t.failures,
        broken,
        secs: 0.0,
    }
}

/// A test binary cargo built: where it is and what it tests.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TestBinary {
    /// `package (lib)`, `package (bin NAME)` or `package/TEST`.
    name: String,
    executable: PathBuf,
    /// The package's directory: the working directory cargo test would use.
    package_dir: PathBuf,
}

/// The test binaries in cargo's `--message-format=json` output.
fn parse_test_binaries(json_lines: &str) -> Vec<TestBinary> {
    let mut out = Vec::new();
    for line in json_lines.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) = (v["executable"].as_str(), v["manifest_path"].as_str())
        else {
            continue;
        };
        let package_dir = Path::new(manifest)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let package = package_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = v["target"]["name"].as_str().unwrap_or("?");
        let kind = v["target"]["kind"][0].as_str().unwrap_or("?");
        let name = match kind {
            "lib" | "rlib" | "proc-macro" => format!("{package} (lib)"),
            "bin" => format!("{package} (bin {target})"),
            _ => format!("{package}/{target}"),
        };
        out.push(TestBinary {
            name,
            executable: PathBuf::from(exe),
            package_dir,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.executable == b.executable);
    out
}

/// Builds the test binaries of `selection` (cargo test arguments) without running
/// them; `Err(step)` when the build fails.
fn build_tests(
    root: &Path,
    selection: &[&str],
    env: &[(&str, &Path)],
) -> Result<std::result::Result<Vec<TestBinary>, String>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .arg("test")
        .args(selection)
        .arg("--target-dir")
        .arg(host_target_dir(root))
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let line = display(&cmd);
    eprintln!("xtask: running {line}");
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        return Ok(Err(format!(
            "building the tests failed ({})",
            describe_status(out.status)
        )));
    }
    Ok(Ok(parse_test_binaries(&String::from_utf8_lossy(
        &out.stdout,
    ))))
}

/// The skip log of one suite, emptied before it runs.
fn skip_log(dir: &Path, suite: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let slug: String = suite
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = dir.join(format!("{slug}.skips"));
    let _ = std::fs::remove_file(&path);
    Ok(path)
}

fn read_skips(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = BTreeSet::new();
    text.lines()
        .filter_map(|l| {
            let (test, why) = parse_skip_line(l)?;
            seen.insert(test.to_owned())
                .then(|| (test.to_owned(), why.to_owned()))
        })
        .collect()
}

/// Runs one command whose stdout is libtest's, echoing it and judging the result.
fn run_suite(name: String, mut cmd: Command, skips: &Path) -> Result<Suite> {
    cmd.env(SKIP_LOG_ENV, skips).stdout(Stdio::piped());
    eprintln!("\nxtask: suite {name}");
    let line = display(&cmd);
    eprintln!("xtask: running {line}");
    let started = std::time::Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let stdout = child.stdout.take().context("test stdout")?;
    let transcript = Transcript::read(BufReader::new(stdout).lines().map_while(Result::ok), true);
    let status = child.wait()?;
    let mut suite = judge(name, status, transcript, read_skips(skips));
    suite.secs = started.elapsed().as_secs_f64();
    for (test, why) in &suite.skipped {
        eprintln!("xtask: {}: SKIPPED {test}: {why}", suite.name);
    }
    Ok(suite)
}

/// The command that runs one test binary as `cargo test` would.
fn binary_command(bin: &TestBinary, env: &[(&str, &Path)]) -> Command {
    let mut cmd = Command::new(&bin.executable);
    cmd.current_dir(&bin.package_dir)
        .env("CARGO_MANIFEST_DIR", &bin.package_dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl TestArgs {
    pub fn execute(self) -> Result<ExitCode> {
        let started = std::time::Instant::now();
        let root = workspace_root();
        let ci = in_ci();
        if ci {
            eprintln!("xtask: CI=true: a test that cannot run here fails, naming what is missing");
        }
        eprintln!("xtask: checking formatting (cargo fmt)");
        let mut fmt = Command::new("cargo");
        fmt.current_dir(&root).args(["fmt", "--all", "--check"]);
        // kml-ebpf is outside the workspace; rustfmt follows its modules from each binary.
        let mut fmt_ebpf = Command::new("rustfmt");
        fmt_ebpf
            .current_dir(&root)
            .args(["--edition", "2021", "--check", "kml-ebpf/src/main.rs"])
            // The overhead benchmark's reference observers: a second binary of the crate.
            .arg("kml-ebpf/src/refs.rs");
        let mut steps = Vec::new();
        let format = match (run_status(&mut fmt)?, run_status(&mut fmt_ebpf)?) {
            (a, b) if a.success() && b.success() => Step::Passed,
            _ => Step::Failed("`cargo fmt --all --check` or rustfmt of kml-ebpf failed".into()),
        };
        steps.push(("formatting", format));
        // With the test hooks (kml-agent's `testing` feature: KML_TEST_SWAP_EVERY).
        let agent = build_all_with(false, &["testing"])?;
        let object = ebpf_object_path(&root);
        let built = started.elapsed().as_secs_f64();
        let logs = host_target_dir(&root).join("xtask-test");
        let mut suites = Vec::new();

        eprintln!("xtask: building the host unit tests");
        let unit_env = [("KML_EBPF_OBJECT", object.as_path())];
        let unit_selection = ["--workspace", "--exclude", "kml-integration-tests"];
        match build_tests(&root, &unit_selection, &unit_env)? {
            Err(why) => suites.push(Suite::not_run("host unit tests (build)".into(), why)),
            Ok(bins) => {
                for bin in bins {
                    let skips = skip_log(&logs, &bin.name)?;
                    let mut cmd = binary_command(&bin, &unit_env);
                    // Passing tests' output too: notes and skips reach the log.
                    cmd.arg("--show-output");
                    suites.push(run_suite(bin.name.clone(), cmd, &skips)?);
                }
            }
        }
        let skips = skip_log(&logs, "doc tests")?;
        let mut doc = Command::new("cargo");
        doc.current_dir(&root)
            .arg("test")
            .args(unit_selection)
            .args(["--doc", "--no-fail-fast", "--target-dir"])
            .arg(host_target_dir(&root))
            .env("KML_EBPF_OBJECT", &object);
        suites.push(run_suite("doc tests".into(), doc, &skips)?);

        if util::is_root()? {
            eprintln!("xtask: building the integration tests");
            let env = [
                ("KML_EBPF_OBJECT", object.as_path()),
                ("KML_AGENT_BIN", agent.as_path()),
            ];
            match build_tests(&root, &["-p", "kml-integration-tests"], &env)? {
                Err(why) => suites.push(Suite::not_run("integration tests (build)".into(), why)),
                Ok(bins) => {
                    // The VM suite's guest kernel builds (niced) while the other
                    // suites run: they mostly wait on I/O.
                    let mut prebuild = if self.args.is_empty() {
                        Some(VmPrebuild::start(&logs)?)
                    } else {
                        None
                    };
                    for bin in &bins {
                        if bin.name.ends_with("/vm") {
                            if let Some(p) = prebuild.take() {
                                p.finish();
                            }
                        }
                        let skips = skip_log(&logs, &bin.name)?;
                        let mut cmd = binary_command(bin, &env);
                        // One at a time (they share the block tracepoints), their
                        // output live, so that a long test shows what it does.
                        cmd.args(["--test-threads=1", "--nocapture"])
                            .args(&self.args);
                        suites.push(run_suite(bin.name.clone(), cmd, &skips)?);
                    }
                }
            }
        } else {
            suites.push(Suite::not_run(
                "integration tests".into(),
                "need root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, loop devices): run `cargo xtask test` as root".into(),
            ));
        }

        eprintln!(
            "\nxtask: timings: setup, formatting and build {built:.0} s; everything {:.0} s",
            started.elapsed().as_secs_f64()
        );
        Ok(summary(&steps, &suites, ci))
    }
}

/// `cargo xtask vm --build-only` in the background, at the lowest CPU and I/O
/// priority: the guest kernel (about 10 minutes on 2 cores the first time), the
/// release agent and the initramfs, built while the integration tests run.
struct VmPrebuild {
    child: std::process::Child,
    log: PathBuf,
    started: std::time::Instant,
}

impl VmPrebuild {
    fn start(logs: &Path) -> Result<VmPrebuild> {
        std::fs::create_dir_all(logs)?;
        let log = logs.join("vm-prebuild.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19", "ionice", "-c", "3"])
            .arg(std::env::current_exe().context("the xtask executable")?)
            .args(["vm", "--build-only", "--quiet"])
            .current_dir(workspace_root())
            // Its own process group: make's jobs go with it if the run stops early.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        eprintln!(
            "xtask: building the VM's kernel and initramfs in the background (log {})",
            log.display()
        );
        eprintln!("xtask: running {}", display(&cmd));
        let child = cmd.spawn().context("starting the VM prebuild")?;
        Ok(VmPrebuild {
            child,
            log,
            started: std::time::Instant::now(),
        })
    }

    /// Waits for the build; a failure is only reported here (the VM suite builds
    /// again and says what is wrong).
    fn finish(mut self) {
        eprintln!("xtask: waiting for the VM prebuild");
        match self.child.wait() {
            Ok(status) => eprintln!(
                "xtask: VM prebuild ended ({}) after {:.0} s; log {}",
                describe_status(status),
                self.started.elapsed().as_secs_f64(),
                self.log.display()
            ),
            Err(e) => eprintln!("xtask: VM prebuild: {e}"),
        }
    }
}

impl Drop for VmPrebuild {
    fn drop(&mut self) {
        // Not waited for (the run ended early): stop it with the run.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", self.child.id())])
                .status();
            let _ = self.child.wait();
        }
    }
}

/// Prints the per-suite table and everything that did not pass; the exit code.
fn summary(steps: &[(&str, Step)], suites: &[Suite], ci: bool) -> ExitCode {
    let width = suites
        .iter()
        .map(|s| s.name.len())
        .chain(steps.iter().map(|(n, _)| n.len()))
        .max()
        .unwrap_or(10)
        .max(5);
    let mut ok = true;
    eprintln!("\nxtask: test summary (per suite: passed, skipped, failed)");
    for (name, step) in steps {
        match step {
            Step::Passed => eprintln!("  {name:<width$}  passed"),
            Step::Failed(why) => {
                ok = false;
                eprintln!("  {name:<width$}  FAILED: {why}");
            }
        }
    }
    let (mut passed, mut skipped, mut failed) = (0, 0, 0);
    for s in suites {
        let filtered = if s.counts.filtered_out > 0 {
            format!(" ({} filtered out)", s.counts.filtered_out)
        } else {
            String::new()
        };
        eprintln!(
            "  {:<width$}  {:>4} passed  {:>3} skipped  {:>3} failed  {:>6.1} s{filtered}{}",
            s.name,
            s.passed_count(),
            s.skipped_count(),
            s.failed_count(),
            s.secs,
            if s.ok() { "" } else { "  <-" }
        );
        passed += s.passed_count();
        skipped += s.skipped_count();
        failed += s.failed_count();
        ok &= s.ok();
    }
    eprintln!(
        "  {:<width$}  {passed:>4} passed  {skipped:>3} skipped  {failed:>3} failed",
        "total"
    );
    for s in suites {
        if let Some(why) = &s.broken {
            eprintln!("xtask: {}: FAILED: {why}", s.name);
        }
        for f in &s.failures {
            eprintln!("xtask: {}: FAILED {f}", s.name);
        }
        for (test, why) in &s.skipped {
            eprintln!("xtask: {}: SKIPPED {test}: {why}", s.name);
        }
        if s.counts.ignored > 0 {
            eprintln!(
                "xtask: {}: {} tests marked #[ignore] did not run",
                s.name, s.counts.ignored
            );
        }
    }
    if skipped > 0 {
        if ci {
            eprintln!("xtask: CI=true: {skipped} tests did not run their checks: a failure");
        } else {
            eprintln!(
                "xtask: NOTE: {skipped} tests were skipped on this machine (listed above); \
                 in CI (CI=true) each of them fails"
            );
        }
    }
    eprintln!(
        "xtask: test {}",
        if ok { "result: PASS" } else { "result: FAIL" }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 5 filtered out; finished in 0.50s"
            ),
            Some(Counts {
                passed: 3,
                failed: 1,
                ignored: 2,
                filtered_out: 5
            })
        );
        assert_eq!(parse_result_line("test foo ... ok"), None);
    }

    #[test]
    fn transcript_with_failures_and_doc_tests() {
        let text = "\
running 3 tests
test a ... ok
test b ... FAILED
test c ... ok

failures:

---- b stdout ----
boom
    not a name because of spaces

failures:
    b

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

   Doc-tests x
test result: ok. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        let t = Transcript::read(text.lines().map(String::from), false);
        assert_eq!(t.results, 2);
        assert_eq!(t.failures, ["b"]);
        assert_eq!(
            t.counts,
            Counts {
                passed: 6,
                failed: 1,
                ignored: 1,
                filtered_out: 0
            }
        );
    }

    fn status(code: i32) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt as _;
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn skips_are_not_passes_and_a_crash_is_a_failure() {
        let t = Transcript::read(
            "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s"
                .lines()
                .map(String::from),
            false,
        );
        let s = judge(
            "x".into(),
            status(0),
            t,
            vec![("t1".into(), "no BTF".into())],
        );
        assert_eq!(
            (s.passed_count(), s.skipped_count(), s.failed_count()),
            (4, 1, 0)
        );
        // No result line: the binary died.
        let s = judge("x".into(), status(101), Transcript::default(), Vec::new());
        assert_eq!(s.failed_count(), 1);
        assert!(s.broken.is_some() && !s.ok());
        // A status that disagrees with the counts.
        let t = Transcript::read(
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s"
                .lines()
                .map(String::from),
            false,
        );
        assert!(!judge("x".into(), status(1), t, Vec::new()).ok());
    }

    #[test]
    fn test_binaries_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","manifest_path":"/w/kml-agent/Cargo.toml","target":{"kind":["lib"],"name":"kml_agent"},"profile":{"test":true},"executable":"/w/target/debug/deps/kml_agent-1"}
{"reason":"compiler-artifact","manifest_path":"/w/kml-agent/Cargo.toml","target":{"kind":["lib"],"name":"kml_agent"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","manifest_path":"/w/kml-integration-tests/Cargo.toml","target":{"kind":["test"],"name":"observer"},"profile":{"test":true},"executable":"/w/target/debug/deps/observer-2"}
{"reason":"compiler-artifact","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["bin"],"name":"xtask"},"profile":{"test":true},"executable":"/w/target/debug/deps/xtask-3"}
{"reason":"build-finished","success":true}"#;
        let bins = parse_test_binaries(json);
        let names: Vec<&str> = bins.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "kml-agent (lib)",
                "kml-integration-tests/observer",
                "xtask (bin xtask)"
            ]
        );
        assert_eq!(bins[0].package_dir, Path::new("/w/kml-agent"));
    }

    /// Test code of the workspace: `tests/*.rs` of every crate, and what follows
    /// `#[cfg(test)]` in its sources.
    fn test_code() -> Vec<(PathBuf, String)> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                let name = e.file_name();
                if p.is_dir() && name != "target" && name != ".git" {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let root = workspace_root();
        let mut files = Vec::new();
        for e in std::fs::read_dir(&root).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && (n.starts_with("kml") || n == "xtask") && n != "kml-testkit" {
                walk(&e.path(), &mut files);
            }
        }
        files
            .into_iter()
            .filter_map(|p| {
                let text = std::fs::read_to_string(&p).ok()?;
                let in_tests_dir = p.components().any(|c| c.as_os_str() == "tests");
                let code = if in_tests_dir {
                    text
                } else {
                    text.split_once("#[cfg(test)]")?.1.to_owned()
                };
                Some((p, code))
            })
            .collect()
    }

    /// A test that cannot run must say so through `kml_testkit::skip` (counted,
    /// and a failure in CI), never by printing "skip" and returning.
    #[test]
    fn no_test_skips_on_its_own() {
        let mut found = Vec::new();
        for (path, code) in test_code() {
            for (at, _) in code.match_indices("eprintln!(") {
                let tail = &code[at..];
                let end = tail.find(");").unwrap_or(tail.len());
                if tail[..end].to_lowercase().contains("skip") {
                    found.push(format!(
                        "{}: {}",
                        path.display(),
                        tail[..end].lines().next().unwrap_or("")
                    ));
                }
            }
        }
        // A let-else whose else-branch returns: a precondition that ends the test in silence.
        for (path, code) in test_code() {
            for (at, _) in code.match_indices("else {") {
                let rest = code[at + "else {".len()..].trim_start();
                if rest.starts_with("return }") || rest.starts_with("return;") {
                    found.push(format!("{}: else {{ return ... }}", path.display()));
                }
            }
        }
        assert!(
            found.is_empty(),
            "tests that skip on their own (printing, or returning in silence) instead of kml_testkit::skip:\n{}",
            found.join("\n")
        );
    }

    #[test]
    fn skip_logs_count_each_test_once() {
        let dir = std::env::temp_dir().join(format!("kml-skiplog-{}", std::process::id()));
        let path = skip_log(&dir, "kml-agent (lib)").unwrap();
        assert!(path.ends_with("kml_agent__lib_.skips"));
        std::fs::write(&path, "a\tno BTF\na\tno BTF\nb\tnot root\n").unwrap();
        assert_eq!(
            read_skips(&path),
            [
                ("a".to_owned(), "no BTF".to_owned()),
                ("b".to_owned(), "not root".to_owned())
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
