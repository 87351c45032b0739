//! Ring buffer → [`RequestRecord`]s, asynchronously: the agent sleeps in epoll
//! (tokio `AsyncFd`) until the programs wake it for a batch, and a poll timer
//! collects the tail that has not reached the wake-up threshold. No busy loop.

use std::{os::fd::AsRawFd, time::Duration};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use kml_ebpf_common::RequestRecord;
use tokio::io::{unix::AsyncFd, Interest};

/// Decodes one ring buffer item; `None` if its size is not a record's.
/// (`fuzz/fuzz_targets/record_decode.rs` fuzzes it.)
pub fn decode(bytes: &[u8]) -> Option<RequestRecord> {
    RequestRecord::from_bytes(bytes)
}

pub struct RecordStream {
    ring: AsyncFd<RingBuf<MapData>>,
    poll_interval: Duration,
    /// Items whose size did not match a record (a kernel/agent version mismatch).
    pub undecodable: u64,
}

impl RecordStream {
    pub(crate) fn new(ring: RingBuf<MapData>, poll_interval: Duration) -> anyhow::Result<Self> {
        let fd = ring.as_raw_fd();
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as
        // long as the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .with_context(|| format!("registering ring buffer fd {fd} with the runtime"))?;
        Ok(RecordStream {
            ring,
            poll_interval,
            undecodable: 0,
        })
    }

    /// Appends every record available now to `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<RequestRecord>) -> usize {
        let before = out.len();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(r) => out.push(r),
                None => self.undecodable += 1,
            }
        }
        out.len() - before
    }

    /// Waits until records arrive (a wake-up or the poll timer), then drains them.
    /// Returns 0 only after a poll interval with nothing new.
    pub async fn next_batch(&mut self, out: &mut Vec<RequestRecord>) -> anyhow::Result<usize> {
        let n = self.drain(out);
        if n > 0 {
            return Ok(n);
        }
        tokio::select! {
            guard = self.ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                guard.clear_ready();
            }
            () = tokio::time::sleep(self.poll_interval) => {}
        }
        Ok(self.drain(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_checks_size() {
        let rec = RequestRecord {
            sector: 42,
            nr_sectors: 8,
            insert_ns: 1,
            ..Default::default()
        };
        // SAFETY: viewing a plain-integer struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const rec).cast::<u8>(),
                std::mem::size_of::<RequestRecord>(),
            )
        };
        assert_eq!(decode(bytes), Some(rec));
        assert_eq!(decode(&bytes[1..]), None);
        // Unaligned input decodes too.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        assert_eq!(decode(&shifted[1..]), Some(rec));
    }
}
