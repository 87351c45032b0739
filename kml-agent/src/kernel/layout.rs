//! Builds the [`KernelLayout`] the programs read, from BTF and tracefs.

use anyhow::Context as _;
use kml_ebpf_common::{
    abi::names::{Event, EVENTS},
    layout::{
        EventFields, RawTpLayout, TracepointLayout, IOPRIO_IN_BIO, IOPRIO_IN_REQUEST, IOPRIO_NONE,
        RQ_WIDE_WINDOW, RQ_WINDOW,
    },
    KernelLayout,
};

use super::{attach::AttachMode, btf::Btf, tracefs::Tracefs};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Btf(#[from] super::btf::BtfError),
    #[error(transparent)]
    Tracefs(#[from] super::tracefs::TracefsError),
    #[error("{what} is {found} bytes in this kernel; kml reads it as {expected}")]
    Size {
        what: String,
        found: u32,
        expected: u32,
    },
    #[error("{what} = {value} does not fit the layout kml uses")]
    Value { what: String, value: i64 },
    #[error("raw tracepoint {name} takes {found} arguments here; kml expects {expected}")]
    Prototype {
        name: String,
        found: usize,
        expected: usize,
    },
}

/// `struct request` and friends, from BTF; every size is checked against what the
/// programs read.
pub fn raw_tp_layout(btf: &Btf) -> Result<RawTpLayout, LayoutError> {
    let member = |ty: &str, name: &str, size: u32| -> Result<u32, LayoutError> {
        let m = btf.member(ty, name)?;
        if m.size != size {
            return Err(LayoutError::Size {
                what: format!("struct {ty}.{name}"),
                found: m.size,
                expected: size,
            });
        }
        Ok(m.offset)
    };
    let value = |name: &str| -> Result<u32, LayoutError> {
        let v = btf.enumerator(name)?;
        u32::try_from(v).map_err(|_| LayoutError::Value {
            what: name.into(),
            value: v,
        })
    };
    let bit = |name: &str| -> Result<u32, LayoutError> {
        let b = value(name)?;
        if b >= 32 {
            return Err(LayoutError::Value {
                what: name.into(),
                value: b.into(),
            });
        }
        Ok(1u32 << b)
    };
    // The tracepoints' prototypes (args + the hidden ctx): what args[n] the programs read.
    for Event {
        tracepoint: tp,
        raw_args: args,
        ..
    } in EVENTS
    {
        let found = btf.typedef_fn_params(&format!("btf_trace_{tp}"))?;
        if found != args + 1 {
            return Err(LayoutError::Prototype {
                name: tp.into(),
                found: found.saturating_sub(1),
                expected: args,
            });
        }
    }
    // Op values live in the low bits of cmd_flags; the first flag bit
    // (__REQ_FAILFAST_DEV == REQ_OP_BITS) tells how many.
    let op_bits = value("__REQ_FAILFAST_DEV")?;
    if op_bits == 0 || op_bits >= 32 {
        return Err(LayoutError::Value {
            what: "__REQ_FAILFAST_DEV".into(),
            value: op_bits.into(),
        });
    }
    // struct request lost its ioprio (6.18 keeps it in the bio only).
    let rq_bio = member("request", "bio", 8)?;
    let (ioprio_source, rq_ioprio, bio_ioprio) = match member("request", "ioprio", 2) {
        Ok(off) => (IOPRIO_IN_REQUEST, off, 0),
        Err(_) => match member("bio", "bi_ioprio", 2) {
            Ok(prio) => (IOPRIO_IN_BIO, 0, prio),
            _ => (IOPRIO_NONE, 0, 0),
        },
    };
    let rq_q = member("request", "q", 8)?;
    let rq_mq_hctx = member("request", "mq_hctx", 8)?;
    let rq_cmd_flags = member("request", "cmd_flags", 4)?;
    let rq_rq_flags = member("request", "rq_flags", 4)?;
    let rq_internal_tag = member("request", "internal_tag", 4)?;
    let rq_data_len = member("request", "__data_len", 4)?;
    let rq_sector = member("request", "__sector", 8)?;
    // One probe read per event brings these: they must share RQ_WINDOW bytes.
    let hot = [
        (rq_q, 8),
        (rq_mq_hctx, 8),
        (rq_cmd_flags, 4),
        (rq_rq_flags, 4),
        (rq_internal_tag, 4),
        (rq_data_len, 4),
        (rq_sector, 8),
        (rq_bio, 8),
    ];
    let rq_window = hot.iter().map(|(o, _)| *o).min().unwrap_or(0);
    let rq_fifo_time = member("request", "fifo_time", 8)?;
    let end = hot.iter().map(|(o, s)| o + s).max().unwrap_or(0);
    if (end - rq_window) as usize > RQ_WINDOW {
        return Err(LayoutError::Value {
            what: format!(
                "the span of struct request's hot fields ({}..{end}, more than {RQ_WINDOW} bytes)",
                rq_window
            ),
            value: (end - rq_window).into(),
        });
    }
    Ok(RawTpLayout {
        rq_window,
        rq_mq_hctx,
        hctx_queue_num: member("blk_mq_hw_ctx", "queue_num", 4)?,
        rq_rq_flags,
        rq_internal_tag,
        // A hint only (a flush's parent is also told by its empty completion).
        rqf_flush_seq: bit("__RQF_FLUSH_SEQ").unwrap_or(0),
        bio_bdev: member("bio", "bi_bdev", 8)?,
        bdev_queue: member("block_device", "bd_queue", 8)?,
        ioprio_source,
        rq_ioprio,
        rq_bio,
        bio_ioprio,
        rq_q,
        rq_sector,
        rq_data_len,
        rq_cmd_flags,
        rq_fifo_time,
        fifo_in_wide_window: (rq_fifo_time >= rq_window
            && (rq_fifo_time + 8 - rq_window) as usize <= RQ_WIDE_WINDOW)
            as u32,
        q_disk: member("request_queue", "disk", 8)?,
        disk_major: member("gendisk", "major", 4)?,
        disk_first_minor: member("gendisk", "first_minor", 4)?,
        op_mask: (1u32 << op_bits) - 1,
        op_read: value("REQ_OP_READ")?,
        op_write: value("REQ_OP_WRITE")?,
        op_flush: value("REQ_OP_FLUSH")?,
        op_discard: value("REQ_OP_DISCARD")?,
        op_write_zeroes: value("REQ_OP_WRITE_ZEROES")?,
        op_secure_erase: value("REQ_OP_SECURE_ERASE")?,
        flag_sync: bit("__REQ_SYNC")?,
        flag_meta: bit("__REQ_META")?,
        flag_fua: bit("__REQ_FUA")?,
        flag_preflush: bit("__REQ_PREFLUSH")?,
        flag_rahead: bit("__REQ_RAHEAD")?,
    })
}

fn offset(f: &super::tracefs::Field) -> Result<u16, LayoutError> {
    u16::try_from(f.offset)
        .ok()
        .filter(|o| *o != EventFields::ABSENT)
        .ok_or(LayoutError::Value {
            what: format!("field {} offset", f.name),
            value: f.offset.into(),
        })
}

/// Offsets of one classic event's fields; `rwbs`/`error` only where asked for.
fn event_fields(
    tracefs: &Tracefs,
    event: &str,
    want_rwbs: bool,
    want_error: bool,
) -> Result<EventFields, LayoutError> {
    let fmt = tracefs.event_format("block", event)?;
    let mut f = EventFields::NONE;
    f.dev = offset(fmt.require("dev", 4)?)?;
    f.sector = offset(fmt.require("sector", 8)?)?;
    f.nr_sector = offset(fmt.require("nr_sector", 4)?)?;
    if want_rwbs {
        // Programs read the first 8 bytes of rwbs (RWBS_LEN was 8; 6.18 has 10).
        let rwbs = fmt
            .field("rwbs")
            .ok_or_else(|| super::tracefs::TracefsError::NoField {
                event: event.into(),
                field: "rwbs".into(),
            })?;
        if rwbs.size < 8 {
            return Err(LayoutError::Size {
                what: format!("{event}.rwbs"),
                found: rwbs.size,
                expected: 8,
            });
        }
        f.rwbs = offset(rwbs)?;
        if let Some(io) = fmt.field("ioprio") {
            if io.size == 2 {
                f.ioprio = offset(io)?;
            }
        }
    }
    if want_error {
        f.error = offset(fmt.require("error", 4)?)?;
    }
    Ok(f)
}

/// The classic tracepoints' field offsets, from their tracefs format files.
pub fn tracepoint_layout(tracefs: &Tracefs) -> Result<TracepointLayout, LayoutError> {
    Ok(TracepointLayout {
        insert: event_fields(tracefs, Event::INSERT.tracepoint, true, false)?,
        // rwbs: a flush is told at its issue.
        issue: event_fields(tracefs, Event::ISSUE.tracepoint, true, false)?,
        complete: event_fields(tracefs, Event::COMPLETE.tracepoint, false, true)?,
        requeue: event_fields(tracefs, Event::REQUEUE.tracepoint, false, false)?,
        merge: event_fields(tracefs, Event::MERGE.tracepoint, false, false)?,
        bio_backmerge: event_fields(tracefs, Event::BIO_BACKMERGE.tracepoint, false, false)?,
        bio_frontmerge: event_fields(tracefs, Event::BIO_FRONTMERGE.tracepoint, false, false)?,
    })
}

/// Records (with the ring's 8-byte header) per CPU between forced wake-ups, as a
/// mask (a power of two less one): about `wakeup_bytes` waiting when the CPUs
/// produce alike. 0 when `wakeup_bytes` is 0 (every record may wake the agent).
pub fn wake_mask(wakeup_bytes: u32, cpus: u32) -> u32 {
    let per_record = std::mem::size_of::<kml_ebpf_common::RequestRecord>() as u32 + 8;
    let n = wakeup_bytes / per_record / cpus.max(1);
    if n <= 1 {
        0
    } else {
        (1u32 << (31 - n.leading_zeros())) - 1
    }
}

/// The global for the chosen mode (only that mode's part is filled in).
/// `raw`: the raw tracepoint layout when the caller has read it already
/// (`KernelReport::raw_layout`); else BTF is parsed here.
pub fn kernel_layout(
    mode: AttachMode,
    wakeup_bytes: u32,
    sample_fill_bytes: u32,
    position_always: bool,
    read_ioprio: bool,
    raw: Option<RawTpLayout>,
) -> anyhow::Result<KernelLayout> {
    let mut layout = KernelLayout::zeroed();
    layout.mode = mode.abi();
    layout.wakeup_bytes = wakeup_bytes;
    layout.sample_fill_bytes = sample_fill_bytes;
    layout.position_always = position_always as u32;
    layout.read_ioprio = read_ioprio as u32;
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1) as u32);
    layout.wake_mask = wake_mask(wakeup_bytes, cpus);
    layout.tag_bits = kml_ebpf_common::device::DEFAULT_TAG_BITS;
    // Measurement only: put back earlier ways of one hot-path step (layout::ablate).
    if let Some(bits) = std::env::var("KML_ABLATE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tracing::warn!(
            "KML_ABLATE={bits}: measurement mode, parts of the observer run as before issue 14"
        );
        layout.ablate = bits;
    }
    match mode {
        AttachMode::RawTracepoint => {
            layout.raw = match raw {
                Some(raw) => raw,
                None => raw_tp_layout(&Btf::from_sys_fs()?)?,
            }
        }
        AttachMode::Tracepoint => layout.tp = tracepoint_layout(&Tracefs::locate_or_mount()?)?,
    }
    Ok(layout)
}
/// mq-deadline's layout, which the verdict program's policies `reads-under-writes`
/// and `reads-behind-writes` read (from BTF), handed to it as its `KML_HOOK_*` globals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedLayout {
    pub q_elevator: u32,
    pub eq_data: u32,
    pub dd_per_prio: u32,
    pub per_prio_size: u32,
    pub per_prio_count: u32,
    pub write_fifo: u32,
    /// `struct deadline_data.last_dir` (the direction of the last dispatch).
    pub last_dir: u32,
    /// The value of `DD_WRITE` (`enum dd_data_dir`).
    pub dd_write: u32,
}

/// `struct request_queue.elevator` → `struct elevator_queue.elevator_data` →
/// `struct deadline_data.per_prio[]` → `struct dd_per_prio.fifo_list[DD_WRITE]`, and
/// `struct deadline_data.last_dir`.
pub fn sched_layout(btf: &Btf) -> anyhow::Result<SchedLayout> {
    let ptr = |ty: &str, member: &str| -> anyhow::Result<u32> {
        let m = btf
            .member(ty, member)
            .with_context(|| format!("struct {ty}.{member}"))?;
        anyhow::ensure!(
            m.size == 8,
            "struct {ty}.{member} is {} bytes; kml reads it as a pointer",
            m.size
        );
        Ok(m.offset)
    };
    let per_prio = btf
        .member("deadline_data", "per_prio")
        .context("struct deadline_data.per_prio")?;
    let per_prio_size = btf
        .struct_size("dd_per_prio")
        .context("struct dd_per_prio")?;
    anyhow::ensure!(
        per_prio_size > 0 && per_prio.size % per_prio_size == 0,
        "deadline_data.per_prio is not an array of dd_per_prio"
    );
    let fifo = btf
        .member("dd_per_prio", "fifo_list")
        .context("struct dd_per_prio.fifo_list")?;
    let list_head = btf.struct_size("list_head").context("struct list_head")?;
    anyhow::ensure!(list_head == 16, "struct list_head is {list_head} bytes");
    let dd_write = btf.enumerator("DD_WRITE").context("enum dd_data_dir")?;
    let dd_write = u32::try_from(dd_write)
        .ok()
        .filter(|d| (d + 1) * list_head <= fifo.size)
        .context("DD_WRITE out of range")?;
    let last_dir = btf
        .member("deadline_data", "last_dir")
        .context("struct deadline_data.last_dir")?;
    anyhow::ensure!(
        last_dir.size == 4,
        "struct deadline_data.last_dir is {} bytes; kml reads it as a 4-byte enum",
        last_dir.size
    );
    Ok(SchedLayout {
        q_elevator: ptr("request_queue", "elevator")?,
        eq_data: ptr("elevator_queue", "elevator_data")?,
        dd_per_prio: per_prio.offset,
        per_prio_size,
        per_prio_count: (per_prio.size / per_prio_size).min(4),
        write_fifo: fifo.offset + dd_write * list_head,
        last_dir: last_dir.offset,
        dd_write,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduler layout from this machine's BTF (mq-deadline built in):
    /// per_prio[3] of dd_per_prio, fifo_list[DD_WRITE] after fifo_list[DD_READ].
    #[test]
    fn scheduler_layout_from_live_btf() {
        let btf = match Btf::from_sys_fs() {
            Ok(btf) => btf,
            Err(e) => return kml_testkit::skip(format_args!("no kernel BTF: {e}")),
        };
        if btf.struct_size("deadline_data").is_err() {
            return kml_testkit::skip(
                "mq-deadline is not built into this kernel (no deadline_data in BTF)",
            );
        }
        let l = sched_layout(&btf).unwrap();
        assert_eq!(l.per_prio_count, 3);
        assert_eq!(l.per_prio_size, btf.struct_size("dd_per_prio").unwrap());
        assert_eq!(
            l.write_fifo,
            btf.member("dd_per_prio", "fifo_list").unwrap().offset + 16
        );
        assert!(l.dd_per_prio > 0 && l.q_elevator > 0);
        assert_eq!(l.dd_write, 1);
        assert_eq!(
            l.last_dir,
            btf.member("deadline_data", "last_dir").unwrap().offset
        );
    }
}
