//! Test preconditions that say so.
//!
//! A test that cannot run on this machine (no BTF, not root, a kernel with the
//! patch where a stock one is needed, a tool that cannot be installed) calls
//! [`skip`] instead of returning early in silence:
//!
//! - in CI (`CI=true`, as `.ci/run` sets it) the test **fails**, naming the missing
//!   precondition: a CI run proves every claim or fails;
//! - elsewhere it says `SKIPPED <test>: <why>` on stderr and appends the same to the
//!   file named by `KML_SKIP_LOG`, from which `cargo xtask test` counts the skips of
//!   each suite and lists them in its summary (libtest itself would count a skipped
//!   test as passed).

use std::fmt::Display;
use std::io::Write as _;

/// The environment variable naming the file `cargo xtask test` reads skips from.
pub const SKIP_LOG_ENV: &str = "KML_SKIP_LOG";

/// True in CI: `CI` is `true` or `1` (what CI services and `.ci/run` set).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// What a skipped test returns: `()` or `Ok(())`.
pub trait Skipped {
    fn skipped() -> Self;
}

impl Skipped for () {
    fn skipped() -> Self {}
}

impl<E> Skipped for Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// The running test's name: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_owned()
}

/// Skips the running test because `missing` (a precondition) does not hold; in CI,
/// fails it instead. Use as `return kml_testkit::skip("...")`.
#[track_caller]
pub fn skip<T: Skipped>(missing: impl Display) -> T {
    let test = current_test();
    if in_ci() {
        panic!(
            "precondition missing for {test}: {missing} (CI=true: a test that cannot run is a failure)"
        );
    }
    eprintln!("SKIPPED {test}: {missing}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        // One write of one line with O_APPEND: lines of parallel tests do not mix.
        let line = format!("{test}\t{}\n", one_line(&missing.to_string()));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!(
                "{test} skipped ({missing}), but the skip could not be logged to {}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
    T::skipped()
}

/// `text` on one line (tabs and newlines as spaces): the log is one skip per line.
fn one_line(text: &str) -> String {
    text.split(['\n', '\t', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line of a skip log: (test, why).
pub fn parse_skip_line(line: &str) -> Option<(&str, &str)> {
    let (test, why) = line.split_once('\t')?;
    (!test.is_empty()).then_some((test, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_lines_round_trip() {
        let line = format!("a::b\t{}", one_line("no BTF\n\tat /sys"));
        assert_eq!(parse_skip_line(&line), Some(("a::b", "no BTF at /sys")));
        assert_eq!(parse_skip_line("no tab"), None);
        assert_eq!(parse_skip_line("\twhy"), None);
    }

    #[test]
    fn the_test_name_is_the_thread_name() {
        assert!(current_test().ends_with("the_test_name_is_the_thread_name"));
    }
}
