//! The agent binary as a child process: its output line by line, killed on drop.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{agent_bin, ChildGuard};

/// Lines of `reader`, echoed with `tag` and sent to the returned channel.
pub fn forward_lines(
    reader: impl std::io::Read + Send + 'static,
    tag: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading even when nobody listens: a closed pipe would make the
        // agent's next print fail.
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            eprintln!("  {tag}: {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// A running agent and its output, line by line.
pub struct Agent {
    pub child: ChildGuard,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

/// Starts the agent with `args`.
pub fn spawn_agent(args: &[&str]) -> Result<Agent> {
    let mut child = Command::new(agent_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", agent_bin().display()))?;
    let stdout = forward_lines(child.stdout.take().context("stdout")?, "agent out");
    let stderr = forward_lines(child.stderr.take().context("stderr")?, "agent");
    Ok(Agent {
        child: ChildGuard(child),
        stdout,
        stderr,
    })
}

pub fn wait_for_line(
    rx: &mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(line),
            Ok(_) => continue,
            Err(_) => bail!("agent never printed {needle:?} within {timeout:?}"),
        }
    }
}
