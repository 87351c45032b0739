//! Progress on stderr for long steps (stdout stays free for results): a spinner
//! with the current step and the elapsed time when stderr is a terminal, else one
//! `[kml-learn  1.23s] message` line per step (logs, pipes, tests).

use std::time::{Duration, Instant};

/// Reports the steps of a long job, unless quiet.
#[derive(Debug)]
pub struct Progress {
    quiet: bool,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// One line per step on stderr.
    pub fn new(quiet: bool) -> Self {
        Progress {
            quiet,
            start: Instant::now(),
            bar: None,
        }
    }

    /// A spinner when stderr is a terminal, else [`Progress::new`]'s lines.
    pub fn interactive(quiet: bool) -> Self {
        use std::io::IsTerminal as _;
        let mut p = Progress::new(quiet);
        if !quiet && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} [kml-learn {elapsed:>4}] {msg}")
            {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            p.bar = Some(bar);
        }
        p
    }

    /// A progress reporter that prints nothing (tests, library callers).
    pub fn silent() -> Self {
        Progress::new(true)
    }

    pub fn step(&self, message: impl std::fmt::Display) {
        if self.quiet {
            return;
        }
        let line = format!(
            "[kml-learn {:7.2}s] {message}",
            self.start.elapsed().as_secs_f64()
        );
        match &self.bar {
            // The finished steps stay above the spinner; the spinner shows the current one.
            Some(bar) => {
                bar.println(&line);
                bar.set_message(message.to_string());
            }
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_bar_without_a_terminal_or_when_quiet() {
        // Under `cargo test` stderr is captured or piped, never a terminal here.
        use std::io::IsTerminal as _;
        if !std::io::stderr().is_terminal() {
            assert!(Progress::interactive(false).bar.is_none());
        }
        assert!(Progress::interactive(true).bar.is_none());
    }
}
