//! The kernel's tick rate (HZ), probed: mq-deadline keeps its expiries in jiffies,
//! and classic tracepoint mode rebuilds the scheduler's deadline (`fifo_time`) from
//! the jiffies at insert and the expiry in jiffies (see `kml_ebpf_common::label`).
//! Raw tracepoint mode does not need it: it reads `rq->fifo_time` itself.
//!
//! The probe asks the kernel for the resolution of `CLOCK_MONOTONIC_COARSE`, which
//! is one tick (`TICK_NSEC` = (10^9 + HZ/2) / HZ, whatever NO_HZ does to the tick).
//! Timing jiffies against a fine clock does not work: on a NO_HZ kernel jiffies
//! lags and catches up in jumps (measured here: 254–255 "HZ" over 200 ms on a HZ=250
//! kernel).

use std::sync::OnceLock;

/// HZ and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickRate {
    pub hz: u64,
    pub source: String,
}

/// `CONFIG_HZ=` in a kernel config text.
pub fn hz_from_config(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
        .filter(|hz| *hz > 0)
}

/// HZ from the length of a tick in ns (`TICK_NSEC`, rounded to the nearest ns).
pub fn hz_from_tick_ns(tick_ns: u64) -> Option<u64> {
    // HZ between 1 and 10000 (Linux offers 24 to 1200).
    if !(100_000..=1_000_000_000).contains(&tick_ns) {
        return None;
    }
    let hz = (1_000_000_000 + tick_ns / 2) / tick_ns;
    // TICK_NSEC of that HZ must be what the kernel said.
    ((1_000_000_000 + hz / 2) / hz == tick_ns).then_some(hz)
}

fn coarse_resolution_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// HZ of the running kernel, probed once per process.
pub fn tick_rate() -> Result<TickRate, String> {
    static RATE: OnceLock<Result<TickRate, String>> = OnceLock::new();
    RATE.get_or_init(|| {
        let res = coarse_resolution_ns().ok_or("clock_getres(CLOCK_MONOTONIC_COARSE) failed")?;
        let hz = hz_from_tick_ns(res)
            .ok_or_else(|| format!("CLOCK_MONOTONIC_COARSE ticks every {res} ns: not 1/HZ"))?;
        Ok(TickRate {
            hz,
            source: "the coarse clock's tick".into(),
        })
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_config() {
        assert_eq!(
            hz_from_config("# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(hz_from_config("CONFIG_HZ_250=y\n"), None);
    }

    #[test]
    fn hz_from_the_tick() {
        for hz in [24u64, 48, 100, 128, 250, 256, 300, 1000, 1024, 1200] {
            let tick = (1_000_000_000 + hz / 2) / hz;
            assert_eq!(hz_from_tick_ns(tick), Some(hz), "HZ {hz}");
        }
        assert_eq!(hz_from_tick_ns(4_000_001), None);
        assert_eq!(hz_from_tick_ns(1), None);
        assert_eq!(hz_from_tick_ns(0), None);
    }

    #[test]
    fn this_kernel_has_a_tick() {
        // Any Linux: the coarse clock's resolution is one tick.
        let rate = tick_rate().expect("HZ");
        assert!((24..=1200).contains(&rate.hz), "{rate:?}");
    }
}
