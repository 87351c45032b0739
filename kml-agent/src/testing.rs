//! Hooks for the tests, compiled only with the `testing` feature (which `cargo
//! xtask test` builds the agent with; releases are built without it).
//!
//! `KML_TEST_SWAP_EVERY=<duration>` makes `run` re-install its active model at
//! that interval (a full slot write, kernel check and flip each time), so that a
//! test can kill the agent at random moments of a model write. Unset, nothing
//! happens.

use std::time::Duration;

pub const ENV: &str = "KML_TEST_SWAP_EVERY";

/// The interval from the environment, if set.
pub fn from_env() -> anyhow::Result<Option<tokio::time::Interval>> {
    let Some(v) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let every: Duration = crate::units::parse_duration(&v.to_string_lossy())
        .map_err(|e| anyhow::anyhow!("{ENV}: {e}"))?;
    let mut i = tokio::time::interval(every.max(Duration::from_millis(1)));
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Ok(Some(i))
}

/// Resolves at the next tick; never without an interval.
pub async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
