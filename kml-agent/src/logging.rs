//! Logs through `tracing`: one plain line per event on stderr, `kml-agent: ...`,
//! as an operator (or journald) reads them. Verbosity: `-v`, `-vv`, or `RUST_LOG`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
    EnvFilter,
};

/// The filter for `-v` count `verbose` when `RUST_LOG` is not set: by default the
/// agent's own messages (info) and everyone's warnings.
pub fn default_filter(verbose: u8) -> &'static str {
    match verbose {
        0 => "warn,kml_agent=info,kml_learn=info",
        1 => "info,kml_agent=debug,kml_learn=debug",
        _ => "debug,kml_agent=trace,kml_learn=trace",
    }
}

/// `kml-agent: message` (info), `kml-agent: warning: ...`, `kml-agent: ERROR ...`,
/// `kml-agent: debug TARGET: ...`.
struct PlainLines;

impl<S, N> FormatEvent<S, N> for PlainLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(writer, "kml-agent: ")?;
        match *meta.level() {
            Level::ERROR => write!(writer, "ERROR ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::INFO => {}
            Level::DEBUG => write!(writer, "debug {}: ", meta.target())?,
            Level::TRACE => write!(writer, "trace {}: ", meta.target())?,
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the subscriber (and the `log` bridge, for aya's records). A second
/// call, or one after another subscriber was set, does nothing.
pub fn init(verbose: u8) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(verbose)));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(PlainLines)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_for(verbose: u8, emit: impl FnOnce()) -> String {
        let buf = Buffer::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(default_filter(verbose)))
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(PlainLines)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn lines_keep_the_agents_wording_and_levels_filter() {
        let text = lines_for(0, || {
            tracing::info!("maps pinned at {}", "/sys/fs/bpf/kml");
            tracing::warn!("retraining failed: {}", "no misses");
            tracing::error!("lossless mode: {} records dropped", 3);
            tracing::debug!("mounted bpffs");
        });
        assert_eq!(
            text,
            "kml-agent: maps pinned at /sys/fs/bpf/kml\n\
             kml-agent: warning: retraining failed: no misses\n\
             kml-agent: ERROR lossless mode: 3 records dropped\n"
        );
        let text = lines_for(1, || tracing::debug!("mounted bpffs"));
        assert_eq!(
            text,
            "kml-agent: debug kml_agent::logging::tests: mounted bpffs\n"
        );
    }
}
