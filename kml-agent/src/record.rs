//! `record`: every request of the chosen devices into a CSV trace (the format of
//! `kml_ebpf_common::trace`), until a duration passes or a signal comes.

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kml_ebpf_common::{trace, Counter, RequestRecord};

use crate::{
    kernel::{attach::AttachRequest, caps::KernelReport},
    observe::{losses::LossReport, Observer, ObserverConfig},
    stats::LatencySummary,
};

/// What to record, where, for how long.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    pub devices: Vec<String>,
    pub duration: Duration,
    pub out: PathBuf,
    pub attach: AttachRequest,
    pub ring_bytes: u32,
}

/// What a recording wrote and saw.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Recorded {
    pub records: u64,
    pub seconds: f64,
    pub deadline_misses: u64,
    /// insert → issue and issue → complete of the issued requests.
    pub wait: LatencySummary,
    pub service: LatencySummary,
    pub loss: LossReport,
    /// Ring items of the wrong size (agent and eBPF object disagree).
    pub undecodable: u64,
}

/// The trace file and the latencies of what went into it.
struct TraceWriter<W: std::io::Write> {
    out: BufWriter<W>,
    /// One row, formatted whole before it enters `out`: the buffer then holds
    /// whole lines only, so each of its writes ends at a line's end, and a
    /// recording killed (SIGKILL, OOM) leaves a trace that reads to its last
    /// flush. Row by row, `write_row`'s field writes would let a full buffer
    /// flush half a line, and the reader refuses a trace with a cut line.
    line: Vec<u8>,
    wait: Vec<u64>,
    service: Vec<u64>,
    misses: u64,
    /// Rows handed to `out` so far.
    rows: u64,
}

impl<W: std::io::Write> TraceWriter<W> {
    fn new(out: BufWriter<W>) -> Self {
        TraceWriter {
            out,
            line: Vec::with_capacity(512),
            wait: Vec::new(),
            service: Vec::new(),
            misses: 0,
            rows: 0,
        }
    }

    fn write(&mut self, batch: &mut Vec<RequestRecord>) -> anyhow::Result<()> {
        for r in batch.iter() {
            self.line.clear();
            trace::write_row(&mut self.line, r)?;
            self.out.write_all(&self.line)?;
            self.rows += 1;
            if r.issue_ns != 0 {
                self.wait.push(r.insert_to_issue_ns());
                // complete_ns 0: the completion was never seen (no service time).
                if r.complete_ns != 0 {
                    self.service.push(r.issue_to_complete_ns());
                }
            }
            self.misses += u64::from(r.deadline_missed());
        }
        batch.clear();
        Ok(())
    }
}

/// Records until `config.duration` passes or SIGINT/SIGTERM comes; `ready` is called
/// once the programs are attached and recording.
pub async fn record(config: &RecordConfig, ready: impl FnOnce()) -> anyhow::Result<Recorded> {
    let targets = crate::devices::resolve(&config.devices)?;
    let file =
        File::create(&config.out).with_context(|| format!("creating {}", config.out.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    writeln!(out, "{}", trace::header())?;
    let mut observer = match start(config, &targets) {
        Ok(o) => o,
        Err(e) => {
            // Leave nothing behind for a recording that never started.
            drop(out);
            let _ = std::fs::remove_file(&config.out);
            return Err(e);
        }
    };
    let mut stream = observer.records()?;
    // Before the ready line: a signal right after it must find the handlers.
    let signal = crate::runtime::shutdown_signal();
    tokio::pin!(signal);
    tracing::info!(
        "recording {} ({}) for {:?} into {}",
        config.devices.join(", "),
        observer.mode(),
        config.duration,
        config.out.display()
    );
    ready();
    let started = Instant::now();
    let deadline = tokio::time::sleep(config.duration);
    tokio::pin!(deadline);
    let mut batch = Vec::with_capacity(8192);
    let mut writer = TraceWriter::new(out);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            sig = &mut signal => { tracing::info!("{}, stopping", sig?); break }
            n = stream.next_batch(&mut batch) => {
                n?;
                if let Err(e) = writer.write(&mut batch) {
                    return Err(writer.abandon(config, e));
                }
            }
        }
    }
    // Detach first so the ring holds everything that will ever be emitted.
    observer.detach();
    stream.drain(&mut batch);
    if let Err(e) = writer
        .write(&mut batch)
        .and_then(|()| Ok(writer.out.flush()?))
    {
        return Err(writer.abandon(config, e));
    }
    Ok(Recorded {
        records: observer.counters()?.get(Counter::Records),
        seconds: started.elapsed().as_secs_f64(),
        deadline_misses: writer.misses,
        wait: LatencySummary::of(writer.wait),
        service: LatencySummary::of(writer.service),
        loss: observer.losses()?,
        undecodable: stream.undecodable,
    })
}

impl TraceWriter<File> {
    /// After a failed write (a full disk): drops what the buffer still holds
    /// (flushing it on drop could cut a row again), cuts the file back to its last
    /// whole row, so that the trace still reads, and names the file.
    fn abandon(self, config: &RecordConfig, e: anyhow::Error) -> anyhow::Error {
        let (file, _unwritten) = self.out.into_parts();
        drop(file);
        let kept = match cut_to_last_row(&config.out) {
            Ok(bytes) => {
                format!("the trace is cut back to its last whole row, {bytes} bytes")
            }
            Err(cut) => format!("cutting it back to its last whole row failed too: {cut}"),
        };
        e.context(format!(
            "writing {} (after {} records; {kept})",
            config.out.display(),
            self.rows
        ))
    }
}

/// Cuts the file at `path` after its last newline; returns the bytes kept. Reads
/// back from the end a block at a time (a row is a few hundred bytes).
fn cut_to_last_row(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut end = f.metadata()?.len();
    let mut block = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            f.set_len(keep)?;
            return Ok(keep);
        }
        end = start;
    }
    f.set_len(0)?;
    Ok(0)
}

fn start(
    config: &RecordConfig,
    targets: &[crate::devices::BlockDevice],
) -> anyhow::Result<Observer> {
    let report = KernelReport::probe();
    let mode = report.choose(config.attach)?;
    let mut oc = ObserverConfig::new(mode);
    oc.raw_layout = report.raw_layout.ok();
    oc.ring_bytes = config.ring_bytes;
    Observer::start(oc, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that keeps each write it is given, as the kernel would receive them.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_cut_keeps_every_whole_row() {
        let path = std::env::temp_dir().join(format!("kml-cut-test-{}.csv", std::process::id()));
        let long_tail = "x".repeat(200_000);
        let cases: [(&str, &str); 5] = [
            ("h\na\nb\nc,1", "h\na\nb\n"),
            ("h\na\n", "h\na\n"),
            ("no newline at all", ""),
            ("", ""),
            // The last newline more than one block before the end.
            (&format!("h\na\n{long_tail}"), "h\na\n"),
        ];
        let mut results = Vec::new();
        for (before, _) in &cases {
            std::fs::write(&path, before).unwrap();
            let kept = cut_to_last_row(&path);
            results.push((
                kept.map_err(|e| e.to_string()),
                std::fs::read(&path).unwrap(),
            ));
        }
        std::fs::remove_file(&path).unwrap();
        for ((_, after), (kept, text)) in cases.iter().zip(results) {
            assert_eq!(kept, Ok(after.len() as u64));
            assert_eq!(text, after.as_bytes());
        }
    }

    #[test]
    fn every_write_to_the_file_ends_at_a_line_end() {
        // A buffer of a few rows, so that it fills mid-batch many times.
        let mut w = TraceWriter::new(BufWriter::with_capacity(700, Writes::default()));
        let mut batch: Vec<RequestRecord> = (0..500u64)
            .map(|i| RequestRecord {
                sector: i * 8,
                insert_ns: 1_000 + i,
                issue_ns: 2_000 + i * 37,
                complete_ns: 9_000 + i * 101,
                deadline_ns: 501_000,
                nr_sectors: 8 + (i % 7) as u32,
                ..RequestRecord::default()
            })
            .collect();
        w.write(&mut batch).unwrap();
        w.out.flush().unwrap();
        let writes = &w.out.get_ref().0;
        assert!(
            writes.len() > 10,
            "the buffer never filled: {} writes",
            writes.len()
        );
        for (k, chunk) in writes.iter().enumerate() {
            assert_eq!(chunk.last(), Some(&b'\n'), "write {k} ends mid-line");
        }
        // And what was written reads back whole.
        let text: Vec<u8> = writes.concat();
        let mut file = trace::header().into_bytes();
        file.push(b'\n');
        file.extend_from_slice(&text);
        let read = trace::read_all(std::io::Cursor::new(file)).unwrap();
        assert_eq!(read.len(), 500);
        assert_eq!(w.misses, 0);
        assert_eq!(w.rows, 500);
    }
}
