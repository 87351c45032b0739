//! tracefs discovery and parsing of tracepoint `format` files.
//!
//! A tracepoint program reads its context at offsets that the kernel
//! publishes in `events/<category>/<event>/format`; they differ between
//! kernel versions (e.g. `ioprio` appeared in `block_rq_*` and `rwbs` grew
//! from 8 to 10 bytes), so the agent reads them at run time instead of
//! hard-coding a layout.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where tracefs lives on modern kernels (and where we mount it if needed).
const TRACEFS_PATH: &str = "/sys/kernel/tracing";
/// Legacy location, under debugfs.
const DEBUGFS_TRACING_PATH: &str = "/sys/kernel/debug/tracing";

/// Errors from locating tracefs or reading event formats. Messages are
/// one-liners meant to be shown to an operator as-is.
/// The I/O error is part of the message, not also `source()`: a printed chain
/// (`{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs: not found at {TRACEFS_PATH} or {DEBUGFS_TRACING_PATH}, and mounting it at {TRACEFS_PATH} failed: {error}"
    )]
    NotMounted { error: io::Error },
    #[error("tracefs: cannot read {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("tracefs: no event {category}/{event} under {root} (is the kernel built with it?)")]
    NoEvent {
        root: PathBuf,
        category: String,
        event: String,
    },
    #[error("tracefs: invalid event or category name `{0}`")]
    InvalidName(String),
    #[error("tracefs: {path_or_event}: line {line}: {reason}")]
    Malformed {
        path_or_event: String,
        line: usize,
        reason: String,
    },
    #[error("tracefs: event {event} has no field `{field}`")]
    NoField { event: String, field: String },
    #[error("tracefs: field `{field}` of event {event} is {actual} bytes, expected {expected}")]
    FieldSize {
        event: String,
        field: String,
        expected: u32,
        actual: u32,
    },
}

/// A located (and possibly freshly mounted) tracefs.
#[derive(Debug, Clone)]
pub struct Tracefs {
    root: PathBuf,
    /// Whether [`Tracefs::locate_or_mount`] had to mount tracefs itself.
    pub mounted_by_us: bool,
}

impl Tracefs {
    /// Finds tracefs: `/sys/kernel/tracing` if it has `events/`, else
    /// `/sys/kernel/debug/tracing`; if neither, mounts tracefs at
    /// `/sys/kernel/tracing` (needs CAP_SYS_ADMIN). We never unmount it: other
    /// tools may start using it, and a mounted tracefs costs nothing.
    pub fn locate_or_mount() -> Result<Tracefs, TracefsError> {
        for root in [TRACEFS_PATH, DEBUGFS_TRACING_PATH] {
            if Path::new(root).join("events").is_dir() {
                return Ok(Tracefs::at(root));
            }
        }
        let root = Path::new(TRACEFS_PATH);
        mount_tracefs(root).map_err(|error| TracefsError::NotMounted { error })?;
        if !root.join("events").is_dir() {
            return Err(TracefsError::NotMounted {
                error: io::Error::new(
                    io::ErrorKind::NotFound,
                    "mount succeeded but has no events/ directory",
                ),
            });
        }
        Ok(Tracefs {
            root: root.to_owned(),
            mounted_by_us: true,
        })
    }

    /// Uses `root` as the tracefs root without checking it (useful for
    /// tests and for unusual mount points).
    pub fn at(root: impl Into<PathBuf>) -> Tracefs {
        Tracefs {
            root: root.into(),
            mounted_by_us: false,
        }
    }

    /// The tracefs root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn event_dir(&self, category: &str, event: &str) -> Result<PathBuf, TracefsError> {
        // The names become path components: refuse anything that could
        // escape the events/ directory.
        for name in [category, event] {
            if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
                return Err(TracefsError::InvalidName(name.to_owned()));
            }
        }
        Ok(self.root.join("events").join(category).join(event))
    }

    /// Reads and parses `events/<category>/<event>/format`.
    pub fn event_format(&self, category: &str, event: &str) -> Result<EventFormat, TracefsError> {
        let path = self.event_dir(category, event)?.join("format");
        let text = std::fs::read_to_string(&path).map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound {
                TracefsError::NoEvent {
                    root: self.root.clone(),
                    category: category.to_owned(),
                    event: event.to_owned(),
                }
            } else {
                TracefsError::Io {
                    path: path.clone(),
                    error,
                }
            }
        })?;
        EventFormat::parse_from(&text, &path.display().to_string())
    }

    /// Whether the event exists (has a `format` file).
    pub fn event_exists(&self, category: &str, event: &str) -> bool {
        self.event_dir(category, event)
            .is_ok_and(|dir| dir.join("format").is_file())
    }
}

fn mount_tracefs(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call; tracefs accepts a null `data` argument.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A parsed tracepoint `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFormat {
    pub name: String,
    /// Event id; dynamic, so it differs between boots.
    pub id: u32,
    /// All fields in file order, the `common_*` ones included.
    pub fields: Vec<Field>,
}

/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// Declared type without the array suffix, e.g. `dev_t`, `char`,
    /// `sector_t`, `__data_loc char[]`. An array whose length is not a
    /// number (`char comm[TASK_COMM_LEN]` on some kernels) keeps its
    /// suffix here (`char[TASK_COMM_LEN]`) and has no `array_len`.
    pub c_type: String,
    /// Element count of a fixed array: `char rwbs[8]` -> `Some(8)`;
    /// multi-dimensional arrays give the product.
    pub array_len: Option<u32>,
    /// `__data_loc` field: the 4 bytes hold (len << 16 | offset) of
    /// variable-length data elsewhere in the record.
    pub data_loc: bool,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

impl EventFormat {
    /// Parses the text of a `format` file.
    pub fn parse(text: &str) -> Result<EventFormat, TracefsError> {
        Self::parse_from(text, "event format")
    }

    /// Like [`EventFormat::parse`]; `origin` names the source in errors.
    fn parse_from(text: &str, origin: &str) -> Result<EventFormat, TracefsError> {
        let err = |line: usize, reason: String| TracefsError::Malformed {
            path_or_event: origin.to_owned(),
            line,
            reason,
        };
        let mut name = None;
        let mut id = None;
        let mut fields: Vec<Field> = Vec::new();
        let mut in_format = false;
        let mut last_line = 0;
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            last_line = line_no;
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with("print fmt:") {
                // The print format is free-form C and may be long; we need
                // nothing from it or after it.
                break;
            }
            if in_format {
                let field = parse_field(line).map_err(|reason| err(line_no, reason))?;
                if fields.iter().any(|f| f.name == field.name) {
                    return Err(err(line_no, format!("duplicate field `{}`", field.name)));
                }
                fields.push(field);
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(err(line_no, format!("expected `key: value`, got `{line}`")));
            };
            let value = value.trim();
            match key {
                "name" if !value.is_empty() => name = Some(value.to_owned()),
                "ID" => {
                    let v = value
                        .parse()
                        .map_err(|_| err(line_no, format!("invalid ID `{value}`")))?;
                    id = Some(v);
                }
                "format" => in_format = true,
                // Unknown header lines are tolerated for forward compatibility.
                _ => {}
            }
        }
        let name = name.ok_or_else(|| err(last_line, "missing `name:` line".into()))?;
        let id = id.ok_or_else(|| err(last_line, "missing `ID:` line".into()))?;
        if !in_format {
            return Err(err(last_line, "missing `format:` section".into()));
        }
        Ok(EventFormat { name, id, fields })
    }

    /// The field called `name`, if any.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The field called `name`, which must be `size` bytes; the error says
    /// which of the two expectations failed.
    pub fn require(&self, name: &str, size: u32) -> Result<&Field, TracefsError> {
        let field = self.field(name).ok_or_else(|| TracefsError::NoField {
            event: self.name.clone(),
            field: name.to_owned(),
        })?;
        if field.size != size {
            return Err(TracefsError::FieldSize {
                event: self.name.clone(),
                field: name.to_owned(),
                expected: size,
                actual: field.size,
            });
        }
        Ok(field)
    }
}

/// Parses `field:TYPE NAME;<tab>offset:N;<tab>size:N;<tab>signed:N;`.
fn parse_field(line: &str) -> Result<Field, String> {
    let mut parts = line.split(';').map(str::trim);
    let decl = parts
        .next()
        .and_then(|p| p.strip_prefix("field:"))
        .ok_or_else(|| format!("expected a `field:` declaration, got `{line}`"))?;
    let (mut offset, mut size, mut signed) = (None, None, false);
    for part in parts.filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once(':')
            .ok_or_else(|| format!("expected `key:value`, got `{part}`"))?;
        let number = || {
            value
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("invalid {key} `{value}`"))
        };
        match key.trim() {
            "offset" => offset = Some(number()?),
            "size" => size = Some(number()?),
            "signed" => signed = number()? != 0,
            // Newer kernels may add attributes; none changes the layout.
            _ => {}
        }
    }
    let offset = offset.ok_or("missing offset")?;
    let size = size.ok_or("missing size")?;
    offset
        .checked_add(size)
        .ok_or_else(|| format!("offset {offset} + size {size} overflows"))?;
    let (name, c_type, array_len) = parse_decl(decl)?;
    Ok(Field {
        name,
        data_loc: c_type.starts_with("__data_loc "),
        c_type,
        array_len,
        offset,
        size,
        signed,
    })
}

/// Splits a C declaration like `unsigned int nr_sector`, `char rwbs[8]`,
/// `const char * name` or `__data_loc char[] cmd` into (name, type, array length).
fn parse_decl(decl: &str) -> Result<(String, String, Option<u32>), String> {
    let decl = decl.trim();
    // The name is the last token; a `*` glued to it belongs to the type.
    let split = decl
        .rfind(|c: char| c.is_whitespace() || c == '*')
        .ok_or_else(|| format!("field declaration `{decl}` has no type"))?;
    let (ty, declarator) = decl.split_at(split + 1);
    let ty = ty.trim();
    let (name, dims) = match declarator.find('[') {
        Some(i) => declarator.split_at(i),
        None => (declarator, ""),
    };
    let is_ident = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !is_ident || ty.is_empty() {
        return Err(format!("cannot parse field declaration `{decl}`"));
    }
    if dims.is_empty() {
        return Ok((name.to_owned(), ty.to_owned(), None));
    }
    // `[a][b]...`: the element count is the product when every dimension is
    // numeric; otherwise the suffix stays part of the type.
    let mut count: Option<u32> = Some(1);
    let mut rest = dims;
    while !rest.is_empty() {
        let inner = rest
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .ok_or_else(|| format!("bad array suffix in `{decl}`"))?;
        count = match inner.0.trim().parse::<u32>() {
            Ok(n) => count.and_then(|c| c.checked_mul(n)),
            Err(_) => None,
        };
        rest = inner.1;
    }
    match count {
        Some(n) => Ok((name.to_owned(), ty.to_owned(), Some(n))),
        None => Ok((name.to_owned(), format!("{ty}{dims}"), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_format_is_named_with_its_error_once() {
        // A `format` that is a directory: the read fails with EISDIR (21), not NotFound.
        let root = std::env::temp_dir().join(format!("kml-tracefs-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("events/block/odd/format")).expect("temp dir");
        let read = Tracefs::at(&root).event_format("block", "odd");
        std::fs::remove_dir_all(&root).expect("temp dir removed");
        let e = read.expect_err("a directory");
        assert!(matches!(e, TracefsError::Io { .. }), "{e:?}");
        let shown = crate::kernel::caps::error_chain(&e);
        assert_eq!(shown.matches("(os error 21)").count(), 1, "{shown}");
    }

    const V618_INSERT: &str = include_str!("testdata/6.18-block_rq_insert.format");
    const V618_ISSUE: &str = include_str!("testdata/6.18-block_rq_issue.format");
    const V618_COMPLETE: &str = include_str!("testdata/6.18-block_rq_complete.format");
    const V618_REQUEUE: &str = include_str!("testdata/6.18-block_rq_requeue.format");
    const V618_MERGE: &str = include_str!("testdata/6.18-block_rq_merge.format");
    const V510_INSERT: &str = include_str!("testdata/5.10-block_rq_insert.format");
    const V510_COMPLETE: &str = include_str!("testdata/5.10-block_rq_complete.format");

    fn at(f: &EventFormat, name: &str) -> (u32, u32) {
        let field = f
            .field(name)
            .unwrap_or_else(|| panic!("{} has no {name}", f.name));
        (field.offset, field.size)
    }

    #[test]
    fn common_fields_are_included() {
        let f = EventFormat::parse(V618_INSERT).unwrap();
        assert_eq!(f.name, "block_rq_insert");
        assert_eq!(f.id, 2105);
        let names: Vec<_> = f.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "common_type",
                "common_flags",
                "common_preempt_count",
                "common_pid",
                "dev",
                "sector",
                "nr_sector",
                "bytes",
                "ioprio",
                "rwbs",
                "comm",
                "cmd"
            ]
        );
        assert_eq!(
            f.fields[0],
            Field {
                name: "common_type".into(),
                c_type: "unsigned short".into(),
                array_len: None,
                data_loc: false,
                offset: 0,
                size: 2,
                signed: false,
            }
        );
        assert!(f.field("common_pid").unwrap().signed);
    }

    #[test]
    fn linux_6_18_block_rq_events() {
        for text in [V618_INSERT, V618_ISSUE, V618_MERGE] {
            let f = EventFormat::parse(text).unwrap();
            assert_eq!(at(&f, "dev"), (8, 4));
            assert_eq!(at(&f, "sector"), (16, 8));
            assert_eq!(at(&f, "nr_sector"), (24, 4));
            assert_eq!(at(&f, "bytes"), (28, 4));
            assert_eq!(at(&f, "ioprio"), (32, 2));
            assert_eq!(at(&f, "rwbs"), (34, 10));
            assert_eq!(at(&f, "comm"), (44, 16));
            assert_eq!(at(&f, "cmd"), (60, 4));
            assert!(f.field("error").is_none());
        }
        let c = EventFormat::parse(V618_COMPLETE).unwrap();
        assert_eq!(c.name, "block_rq_complete");
        assert_eq!(at(&c, "nr_sector"), (24, 4));
        assert_eq!(at(&c, "error"), (28, 4));
        assert!(c.field("error").unwrap().signed);
        assert_eq!(at(&c, "ioprio"), (32, 2));
        assert_eq!(at(&c, "rwbs"), (34, 10));
        assert_eq!(at(&c, "cmd"), (44, 4));
        let r = EventFormat::parse(V618_REQUEUE).unwrap();
        assert_eq!(at(&r, "ioprio"), (28, 2));
        assert_eq!(at(&r, "rwbs"), (30, 10));
        assert_eq!(at(&r, "cmd"), (40, 4));

        let rwbs = c.field("rwbs").unwrap();
        assert_eq!(
            (rwbs.c_type.as_str(), rwbs.array_len, rwbs.signed),
            ("char", Some(10), false)
        );
        let cmd = c.field("cmd").unwrap();
        assert!(cmd.data_loc);
        assert_eq!(
            (cmd.c_type.as_str(), cmd.array_len),
            ("__data_loc char[]", None)
        );
        assert_eq!(c.field("sector").unwrap().c_type, "sector_t");
        assert_eq!(c.field("dev").unwrap().c_type, "dev_t");
    }

    #[test]
    fn linux_5_10_block_rq_events() {
        let i = EventFormat::parse(V510_INSERT).unwrap();
        assert_eq!(at(&i, "dev"), (8, 4));
        assert_eq!(at(&i, "sector"), (16, 8));
        assert_eq!(at(&i, "nr_sector"), (24, 4));
        assert_eq!(at(&i, "rwbs"), (32, 8));
        assert_eq!(i.field("rwbs").unwrap().array_len, Some(8));
        assert_eq!(at(&i, "comm"), (40, 16));
        assert_eq!(at(&i, "cmd"), (56, 4));
        assert!(i.field("cmd").unwrap().data_loc);
        assert!(i.field("ioprio").is_none());

        let c = EventFormat::parse(V510_COMPLETE).unwrap();
        assert_eq!(at(&c, "nr_sector"), (24, 4));
        assert_eq!(at(&c, "error"), (28, 4));
        assert_eq!(at(&c, "rwbs"), (32, 8));
        assert_eq!(at(&c, "cmd"), (40, 4));
        assert!(c.field("ioprio").is_none());
        assert!(c.field("rwbs").unwrap().signed);
    }

    #[test]
    fn require_reports_missing_and_wrong_size() {
        let c = EventFormat::parse(V510_COMPLETE).unwrap();
        assert_eq!(c.require("sector", 8).unwrap().offset, 16);
        assert_eq!(
            c.require("ioprio", 2).unwrap_err().to_string(),
            "tracefs: event block_rq_complete has no field `ioprio`"
        );
        assert_eq!(
            c.require("dev", 8).unwrap_err().to_string(),
            "tracefs: field `dev` of event block_rq_complete is 4 bytes, expected 8"
        );
    }

    #[test]
    fn declarations() {
        let d = |s: &str| parse_decl(s).unwrap();
        assert_eq!(
            d("const char * name"),
            ("name".into(), "const char *".into(), None)
        );
        assert_eq!(d("char *name"), ("name".into(), "char *".into(), None));
        assert_eq!(
            d("unsigned long call_site"),
            ("call_site".into(), "unsigned long".into(), None)
        );
        assert_eq!(d("u8 m[2][3]"), ("m".into(), "u8".into(), Some(6)));
        assert_eq!(
            d("char comm[TASK_COMM_LEN]"),
            ("comm".into(), "char[TASK_COMM_LEN]".into(), None)
        );
        assert_eq!(
            d("__data_loc char[] cmd"),
            ("cmd".into(), "__data_loc char[]".into(), None)
        );
        for bad in ["dev", "int", "int 9x", "char x[3", "int a-b", " "] {
            assert!(parse_decl(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn malformed_inputs_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("name: e\nID: 1\nformat:\n\tfield:int x;\toffset:zz;\tsize:4;\tsigned:1;\n", 4, "invalid offset"),
            ("name: e\nID: 1\nformat:\n\tfield:int x;\tsize:4;\n", 4, "missing offset"),
            ("name: e\nID: 1\nformat:\n\tfield:int x;\toffset:0;\n", 4, "missing size"),
            ("name: e\nID: 1\nformat:\n\n\tgarbage line\n", 5, "expected a `field:`"),
            ("name: e\nID: 1\nformat:\n\tfield:x;\toffset:0;\tsize:4;\n", 4, "has no type"),
            ("name: e\nID: 1\nformat:\n\tfield:int x;\toffset:0;\tsize:4;\n\tfield:int x;\toffset:4;\tsize:4;\n", 5, "duplicate field"),
            ("name: e\nID: 1\nformat:\n\tfield:int x;\toffset:4294967295;\tsize:4;\n", 4, "overflows"),
            ("name: e\nID: -1\nformat:\n", 2, "invalid ID"),
            ("name: e\nformat:\n", 2, "missing `ID:`"),
            ("ID: 3\nformat:\n", 2, "missing `name:`"),
            ("name: e\nID: 3\n", 2, "missing `format:`"),
            ("name: e\nno colon here\n", 2, "expected `key: value`"),
            ("", 0, "missing `name:`"),
        ];
        for &(text, line, reason) in cases {
            match EventFormat::parse(text) {
                Err(TracefsError::Malformed {
                    line: l,
                    reason: r,
                    path_or_event,
                }) => {
                    assert_eq!(
                        (l, path_or_event.as_str()),
                        (line, "event format"),
                        "{text:?}: {r}"
                    );
                    assert!(r.contains(reason), "{text:?}: got `{r}`, want `{reason}`");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        let err =
            EventFormat::parse("name: e\nID: 1\nformat:\n\tfield:int x;\toffset:q;\tsize:4;\n")
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracefs: event format: line 4: invalid offset `q`"
        );
    }

    #[test]
    fn truncated_fixture_never_panics() {
        for end in 0..=V618_INSERT.len() {
            if let Some(prefix) = V618_INSERT.get(..end) {
                let _ = EventFormat::parse(prefix);
            }
        }
    }

    #[test]
    fn fake_tree_and_name_checks() {
        let dir = std::env::temp_dir().join(format!("kml-tracefs-test-{}", std::process::id()));
        let ev = dir.join("events/block/block_rq_complete");
        std::fs::create_dir_all(&ev).unwrap();
        std::fs::write(ev.join("format"), V510_COMPLETE).unwrap();
        let bad = dir.join("events/block/broken");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(
            bad.join("format"),
            "name: broken\nID: 1\nformat:\n\tfield:int;\n",
        )
        .unwrap();

        let t = Tracefs::at(&dir);
        assert!(!t.mounted_by_us);
        assert!(t.event_exists("block", "block_rq_complete"));
        assert!(!t.event_exists("block", "block_rq_insert"));
        assert!(!t.event_exists("..", "block"));
        assert_eq!(
            t.event_format("block", "block_rq_complete").unwrap(),
            EventFormat::parse(V510_COMPLETE).unwrap()
        );
        assert!(matches!(
            t.event_format("block", "nope"),
            Err(TracefsError::NoEvent { .. })
        ));
        assert!(matches!(
            t.event_format("block/../x", "y"),
            Err(TracefsError::InvalidName(_))
        ));
        let err = t.event_format("block", "broken").unwrap_err().to_string();
        assert!(
            err.contains("events/block/broken/format: line 4: "),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn live_tracefs_matches_fixture() {
        let tracefs = match Tracefs::locate_or_mount() {
            Ok(t) => t,
            // Only root can mount; anywhere else this is an environment gap.
            Err(e) if euid() != 0 => {
                return kml_testkit::skip(format_args!("not root, cannot mount tracefs: {e}"));
            }
            Err(e) => panic!("{e}"),
        };
        eprintln!(
            "tracefs at {} (mounted by us: {})",
            tracefs.root().display(),
            tracefs.mounted_by_us
        );
        assert!(tracefs.event_exists("block", "block_rq_insert"));
        assert!(!tracefs.event_exists("block", "no_such_event"));
        let live = tracefs.event_format("block", "block_rq_insert").unwrap();
        live.require("dev", 4).unwrap();
        live.require("sector", 8).unwrap();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if release.starts_with("6.18") {
            let fixture = EventFormat::parse(V618_INSERT).unwrap();
            // IDs are assigned at boot; everything else must match exactly.
            assert_eq!((&live.name, &live.fields), (&fixture.name, &fixture.fields));
        } else {
            kml_testkit::skip(format_args!(
                "kernel {} is not 6.18: the live format was parsed, but there is no fixture to compare it with",
                release.trim()
            ))
        }
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }
}
