//! Ring buffer → [`RequestRecord`]s, asynchronously: the agent sleeps in epoll
//! (tokio `AsyncFd`) until the programs wake it for a batch, and a poll timer
//! collects the tail that has not reached the wake-up threshold, after having
//! the CPUs' staged records written (`super::batches`). No busy loop.

use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use kml_ebpf_common::RequestRecord;
use tokio::io::{unix::AsyncFd, Interest};

use super::batches::BatchFlusher;

/// Decodes one ring buffer item: one record, or a CPU's batch of them; `None`
/// if it is not a whole number of records. (`fuzz/fuzz_targets/record_decode.rs`
/// fuzzes it.)
pub fn decode(bytes: &[u8]) -> Option<impl Iterator<Item = RequestRecord> + '_> {
    RequestRecord::batch_from_bytes(bytes)
}

pub struct RecordStream {
    ring: AsyncFd<RingBuf<MapData>>,
    poll_interval: Duration,
    /// Writes the CPUs' staged records to the ring once a poll interval.
    flusher: Option<BatchFlusher>,
    last_flush: Instant,
    /// Ring items read (a record, or a CPU's batch of them).
    pub items: u64,
    /// Items whose size did not match a record (a kernel/agent version mismatch).
    pub undecodable: u64,
}

impl RecordStream {
    pub(crate) fn new(
        ring: RingBuf<MapData>,
        poll_interval: Duration,
        flusher: Option<BatchFlusher>,
    ) -> anyhow::Result<Self> {
        let fd = ring.as_raw_fd();
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as
        // long as the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .with_context(|| format!("registering ring buffer fd {fd} with the runtime"))?;
        Ok(RecordStream {
            ring,
            poll_interval,
            flusher,
            last_flush: Instant::now(),
            items: 0,
            undecodable: 0,
        })
    }

    /// Appends every record available now to `out`; returns how many.
    pub fn drain(&mut self, out: &mut Vec<RequestRecord>) -> usize {
        let before = out.len();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            self.items += 1;
            match decode(&item) {
                Some(records) => out.extend(records),
                None => self.undecodable += 1,
            }
        }
        out.len() - before
    }

    /// Waits until records arrive (a wake-up or the poll timer), then drains them.
    /// Returns 0 only after a poll interval with nothing new.
    pub async fn next_batch(&mut self, out: &mut Vec<RequestRecord>) -> anyhow::Result<usize> {
        self.flush_when_due();
        let n = self.drain(out);
        if n > 0 {
            return Ok(n);
        }
        tokio::select! {
            guard = self.ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                guard.clear_ready();
            }
            () = tokio::time::sleep(self.poll_interval) => self.flush_when_due(),
        }
        Ok(self.drain(out))
    }

    /// Once a poll interval, whatever wakes the agent: what the CPUs staged is
    /// written to the ring, so no record waits much longer than that (a quiet
    /// CPU's batch would otherwise wait while a busy one keeps waking the agent).
    fn flush_when_due(&mut self) {
        let Some(f) = &self.flusher else { return };
        if self.last_flush.elapsed() < self.poll_interval {
            return;
        }
        if let Err(e) = f.flush() {
            tracing::warn!("{e:#}");
        }
        self.last_flush = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use kml_ebpf_common::BATCH_RECORDS;

    use super::*;

    fn record_bytes(rec: &RequestRecord) -> &[u8] {
        // SAFETY: viewing a plain-integer struct as bytes.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(rec).cast::<u8>(),
                std::mem::size_of::<RequestRecord>(),
            )
        }
    }

    #[test]
    fn decode_checks_size() {
        let rec = RequestRecord {
            sector: 42,
            nr_sectors: 8,
            insert_ns: 1,
            ..Default::default()
        };
        let bytes = record_bytes(&rec);
        let all = |b: &[u8]| decode(b).map(Iterator::collect::<Vec<_>>);
        assert_eq!(all(bytes), Some(vec![rec]));
        assert_eq!(all(&bytes[1..]), None);
        assert_eq!(all(&[]), None);
        // Unaligned input decodes too.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        assert_eq!(all(&shifted[1..]), Some(vec![rec]));
        // A CPU's batch: up to BATCH_RECORDS whole records, in order.
        let mut other = rec;
        other.sector = 43;
        let pair = [bytes, record_bytes(&other)].concat();
        assert_eq!(all(&pair), Some(vec![rec, other]));
        assert_eq!(all(&pair[..pair.len() - 1]), None);
        let full = bytes.repeat(BATCH_RECORDS);
        assert_eq!(all(&full).map(|v| v.len()), Some(BATCH_RECORDS));
        assert_eq!(all(&bytes.repeat(BATCH_RECORDS + 1)), None);
    }
}
