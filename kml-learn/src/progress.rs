//! Progress lines on stderr for long steps (stdout stays free for results).

use std::time::Instant;

/// Prints `[kml-learn  1.23s] message` lines to stderr, unless quiet.
#[derive(Debug)]
pub struct Progress {
    quiet: bool,
    start: Instant,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            quiet,
            start: Instant::now(),
        }
    }

    /// A progress reporter that prints nothing (tests, library callers).
    pub fn silent() -> Self {
        Progress::new(true)
    }

    pub fn step(&self, message: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!(
                "[kml-learn {:7.2}s] {message}",
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
