//! A minimal, defensive reader of kernel BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The agent must never hard-code kernel layout facts (member offsets,
//! enumerator values, tracepoint arities): they change between kernel
//! versions and configs. BTF describes the running kernel exactly, so we read
//! the few facts we need from it at start-up.
//!
//! Why kml reads BTF itself rather than through aya-obj (checked against the
//! pinned aya-obj 0.3.0, which kml already depends on, and aya 0.14.0):
//! - `aya_obj::btf::Btf` parses BTF, but its public API stops at type ids: `parse`,
//!   `from_sys_fs`, `id_by_type_name_kind` (and building BTF). Reading a type is
//!   crate-private: `type_by_id`, `type_name`, `type_size`, `BtfType::members`, and
//!   the fields of `Struct`, `Enum` and `BtfMember` are all `pub(crate)`. Every
//!   fact kml needs is behind them: member offsets and sizes in `struct request`,
//!   `request_queue`, `gendisk`, `deadline_data` and `dd_per_prio` (with anonymous
//!   members and bitfields), the values of `enum req_op`, `req_flag_bits` and
//!   `dd_data_dir`, and the arity of the `btf_trace_block_rq_*` prototypes.
//! - aya-obj does use those facts itself, to relocate CO-RE field accesses when it
//!   loads a program; but kml's programs are Rust, and rustc emits no CO-RE
//!   relocations (there is no `preserve_access_index`), so the offsets have to be
//!   found by the agent and handed to the programs (`KML_LAYOUT`).
//! - The one query aya-obj answers, a `FUNC` id by name (what [`Btf::has_func`] and
//!   [`Btf::func_id`] do here), comes from the same parse as the rest; answering it
//!   with aya-obj would parse the 5.5 MB vmlinux BTF a second time (about 13 ms
//!   here, plus a 2.5 ms linear scan per lookup) to save a few lines.
//!
//! When aya-obj makes type reading public, this file should become calls to it.
//!
//! Format reference: the kernel's `Documentation/bpf/btf.rst` and
//! `include/uapi/linux/btf.h`. Only the parts needed for the queries below are
//! interpreted, but every kind up to `BTF_KIND_ENUM64` is walked so that type
//! ids stay correct. All offsets and lengths are validated; garbage input
//! yields [`BtfError::Malformed`], never a panic.

use std::path::{Path, PathBuf};

/// Errors from reading or querying BTF. Messages are one-liners meant to be
/// shown to an operator as-is.
/// The I/O error is part of the message, not also `source()`: a printed chain
/// (`{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF: cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("BTF: malformed data: {0}")]
    Malformed(String),
    #[error("BTF: no {kind} named `{name}`")]
    NoSuchType { kind: &'static str, name: String },
    #[error("BTF: struct {ty} has no member `{member}`")]
    NoSuchMember { ty: String, member: String },
    #[error("BTF: member `{member}` of struct {ty} is a bitfield and has no byte offset/size")]
    Bitfield { ty: String, member: String },
    #[error("BTF: no enumerator named `{name}`")]
    NoSuchEnumerator { name: String },
    #[error(
        "BTF: enumerator `{name}` has conflicting values ({first} and {second}) in different enums"
    )]
    AmbiguousEnumerator {
        name: String,
        first: i64,
        second: i64,
    },
    #[error(
        "BTF: typedef `{name}` is not a pointer to a function prototype (it leads to a {found})"
    )]
    NotFnPointer { name: String, found: &'static str },
    #[error("BTF: cannot compute the size of member `{member}` of struct {ty}: {reason}")]
    Unsized {
        ty: String,
        member: String,
        reason: String,
    },
}

/// Location of a struct member, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outermost struct (offsets of
    /// enclosing anonymous struct/union members are included).
    pub offset: u32,
    /// Size in bytes after resolving typedef/const/volatile/enum/pointer/array.
    pub size: u32,
}

// Kind numbers from include/uapi/linux/btf.h.
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

const BTF_MAGIC: u16 = 0xeb9f;
/// `struct btf_header` as of version 1; newer headers may be longer.
const MIN_HEADER_LEN: usize = 24;

/// Bound on typedef/modifier/array chains and anonymous-member nesting.
/// Real kernels need a handful; the bound only stops cycles in bad data.
const MAX_DEPTH: u32 = 64;

/// Pointer size used when the BTF has no `long` to derive it from.
const DEFAULT_PTR_SIZE: u32 = 8;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        0 => "void",
        KIND_INT => "int",
        KIND_PTR => "pointer",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "forward declaration",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "function",
        KIND_FUNC_PROTO => "function prototype",
        KIND_VAR => "variable",
        KIND_DATASEC => "data section",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl tag",
        KIND_TYPE_TAG => "type tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown kind",
    }
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// One decoded `struct btf_type` header; its kind-specific trailing words
/// live in `Btf::words[extra..extra + extra_len]` (checked at parse time).
#[derive(Debug, Clone, Copy)]
struct Ty {
    name_off: u32,
    info: u32,
    /// `size` for sized kinds, referenced type id otherwise.
    size_or_type: u32,
    extra: u32,
    extra_len: u32,
}

impl Ty {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> u32 {
        self.info & 0xffff
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// One enumerator, as indexed at parse time.
#[derive(Debug, Clone, Copy)]
struct Enumerator {
    hash: u32,
    name_off: u32,
    value: i64,
}

/// Hash of a name for the indexes, `mask`ed (tests make every name collide);
/// equal hashes are checked against the names.
fn name_hash(name: &str, mask: u32) -> u32 {
    use std::hash::Hasher as _;
    // Fixed keys: the same hash in every process (nothing here is adversarial).
    let mut h = std::hash::DefaultHasher::new();
    h.write(name.as_bytes());
    h.finish() as u32 & mask
}

/// Parsed kernel BTF: type table, string section and name indexes.
///
/// The indexes point into the string section instead of owning names: vmlinux
/// has 70k named types and 19k enumerators, and a map of owned names cost about
/// 15 MB of heap at start-up, part of the agent's peak memory.
pub struct Btf {
    /// Type section as native-endian words (every BTF record is u32-based).
    words: Vec<u32>,
    /// `types[i]` is type id `i + 1` (id 0 is `void`).
    types: Vec<Ty>,
    strings: Vec<u8>,
    /// (name hash, id) of every named type, sorted: ids of one name in id order.
    by_name: Vec<(u32, u32)>,
    /// Every enumerator in type-id order, then stably sorted by hash.
    enumerators: Vec<Enumerator>,
    /// All ones (tests clear it to make every name collide).
    hash_mask: u32,
    ptr_size: u32,
}

impl std::fmt::Debug for Btf {
    // The tables are huge; a summary is all anyone wants in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .field("strings_bytes", &self.strings.len())
            .field("ptr_size", &self.ptr_size)
            .finish_non_exhaustive()
    }
}

/// Endian-aware reader over the raw blob.
#[derive(Clone, Copy)]
struct Reader<'a> {
    data: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn u32_at(&self, pos: usize) -> Option<u32> {
        let bytes: [u8; 4] = self.data.get(pos..pos.checked_add(4)?)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }
}

/// Checked `[off, off + len)` range of a section that follows the header.
fn section(
    data: &[u8],
    hdr_len: usize,
    off: u32,
    len: u32,
    what: &str,
) -> Result<std::ops::Range<usize>, BtfError> {
    let start = hdr_len
        .checked_add(off as usize)
        .ok_or_else(|| malformed(format!("{what} section offset overflows")))?;
    let end = start
        .checked_add(len as usize)
        .ok_or_else(|| malformed(format!("{what} section length overflows")))?;
    if end > data.len() {
        return Err(malformed(format!(
            "{what} section [{start}, {end}) extends past the end of the data ({} bytes)",
            data.len()
        )));
    }
    Ok(start..end)
}

impl Btf {
    /// Where the running kernel exposes its own BTF.
    pub const VMLINUX: &'static str = "/sys/kernel/btf/vmlinux";

    /// Reads the running kernel's BTF from [`Btf::VMLINUX`].
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Self::from_file(Path::new(Self::VMLINUX))
    }

    /// Reads and parses a raw BTF blob from `path`.
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|error| BtfError::Io {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&data)
    }

    /// Parses a raw BTF blob (either byte order).
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let big_endian = match data.get(..2) {
            Some(m) if u16::from_le_bytes([m[0], m[1]]) == BTF_MAGIC => false,
            Some(m) if u16::from_be_bytes([m[0], m[1]]) == BTF_MAGIC => true,
            Some(_) => return Err(malformed("bad magic (not BTF)")),
            None => return Err(malformed("truncated header")),
        };
        let rd = Reader { data, big_endian };
        let hdr = |pos: usize| rd.u32_at(pos).ok_or_else(|| malformed("truncated header"));
        let version = data
            .get(2)
            .copied()
            .ok_or_else(|| malformed("truncated header"))?;
        if version != 1 {
            return Err(malformed(format!("unsupported BTF version {version}")));
        }
        let hdr_len = hdr(4)? as usize;
        if hdr_len < MIN_HEADER_LEN || hdr_len > data.len() {
            return Err(malformed(format!(
                "header length {hdr_len} is invalid for {} bytes of data",
                data.len()
            )));
        }
        let types_range = section(data, hdr_len, hdr(8)?, hdr(12)?, "type")?;
        let str_range = section(data, hdr_len, hdr(16)?, hdr(20)?, "string")?;

        // The kernel guarantees both of these; relying on them keeps name
        // lookups simple (offset 0 is "", every name is NUL-terminated).
        let strings = data[str_range].to_vec();
        if strings.first() != Some(&0) || strings.last() != Some(&0) {
            return Err(malformed("string section must start and end with NUL"));
        }

        if types_range.len() % 4 != 0 {
            return Err(malformed(format!(
                "type section length {} is not a multiple of 4",
                types_range.len()
            )));
        }
        let words: Vec<u32> = data[types_range]
            .chunks_exact(4)
            .map(|c| {
                let b = [c[0], c[1], c[2], c[3]];
                if big_endian {
                    u32::from_be_bytes(b)
                } else {
                    u32::from_le_bytes(b)
                }
            })
            .collect();

        let types = Self::walk_types(&words)?;
        let mut btf = Btf {
            words,
            types,
            strings,
            by_name: Vec::new(),
            enumerators: Vec::new(),
            hash_mask: u32::MAX,
            ptr_size: DEFAULT_PTR_SIZE,
        };
        btf.build_indexes()?;
        Ok(btf)
    }

    /// Splits the type section into records; sizes depend on kind and vlen.
    fn walk_types(words: &[u32]) -> Result<Vec<Ty>, BtfError> {
        let mut types = Vec::with_capacity(words.len() / 4);
        let mut pos = 0usize;
        while pos < words.len() {
            let id = types.len() + 1;
            let [name_off, info, size_or_type] = match words.get(pos..pos + 3) {
                Some(&[a, b, c]) => [a, b, c],
                _ => return Err(malformed(format!("type #{id} header is truncated"))),
            };
            let probe = Ty {
                name_off,
                info,
                size_or_type,
                extra: 0,
                extra_len: 0,
            };
            let vlen = probe.vlen() as usize;
            let remaining = words.len() - pos - 3;
            let extra_len = match probe.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 1,
                KIND_ARRAY => 3,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 3 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 2 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                // A kind newer than this reader: its record size is unknown.
                // Only a bare header ending the section is unambiguous (it
                // can have no payload); anywhere else we cannot find the
                // next record, and guessing would shift every later type id.
                kind if kind > KIND_ENUM64 && remaining == 0 => 0,
                kind => {
                    return Err(malformed(format!(
                        "type #{id} has unsupported kind {kind}; cannot determine its size"
                    )))
                }
            };
            if extra_len > remaining {
                return Err(malformed(format!(
                    "type #{id} ({}) is truncated: needs {extra_len} more words, {remaining} left",
                    kind_name(probe.kind())
                )));
            }
            // Both fit in u32: the section length came from a u32.
            types.push(Ty {
                extra: (pos + 3) as u32,
                extra_len: extra_len as u32,
                ..probe
            });
            pos += 3 + extra_len;
        }
        Ok(types)
    }

    fn build_indexes(&mut self) -> Result<(), BtfError> {
        let mut by_name = Vec::new();
        let mut enumerators = Vec::new();
        for (idx, ty) in self.types.iter().enumerate() {
            let id = idx as u32 + 1;
            let name = self.name(ty.name_off)?;
            if !name.is_empty() {
                by_name.push((name_hash(name, self.hash_mask), id));
            }
            let (stride, kind) = match ty.kind() {
                KIND_ENUM => (2, KIND_ENUM),
                KIND_ENUM64 => (3, KIND_ENUM64),
                _ => continue,
            };
            for e in self.extra(ty)?.chunks_exact(stride) {
                let value = match (kind, ty.kind_flag()) {
                    // kind_flag marks signed enums; unsigned otherwise.
                    (KIND_ENUM, true) => i64::from(e[1] as i32),
                    (KIND_ENUM, false) => i64::from(e[1]),
                    // 64-bit values keep their bit pattern.
                    _ => ((u64::from(e[2]) << 32) | u64::from(e[1])) as i64,
                };
                let ename = self.name(e[0])?;
                if !ename.is_empty() {
                    enumerators.push(Enumerator {
                        hash: name_hash(ename, self.hash_mask),
                        name_off: e[0],
                        value,
                    });
                }
            }
        }
        // (hash, id) pairs are unique: unstable sorting keeps ids in order.
        by_name.sort_unstable();
        // Stable: the enumerators of one name stay in type-id order.
        enumerators.sort_by_key(|e| e.hash);
        self.by_name = by_name;
        self.enumerators = enumerators;

        // Pointers are as wide as `long` on every Linux ABI; deriving it
        // keeps this correct for non-64-bit kernels too.
        let long_size = self
            .ids_of("long unsigned int", &[KIND_INT])
            .next()
            .and_then(|id| self.ty(id).ok())
            .map(|t| t.size_or_type)
            .filter(|&s| s == 4 || s == 8);
        if let Some(size) = long_size {
            self.ptr_size = size;
        }
        Ok(())
    }

    /// Name at `off` in the string section.
    fn name(&self, off: u32) -> Result<&str, BtfError> {
        let rest = self
            .strings
            .get(off as usize..)
            .ok_or_else(|| malformed(format!("name offset {off} is outside the string section")))?;
        // The section ends with NUL (checked at parse time), so this finds one.
        let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..len])
            .map_err(|_| malformed(format!("name at offset {off} is not UTF-8")))
    }

    fn ty(&self, id: u32) -> Result<&Ty, BtfError> {
        id.checked_sub(1)
            .and_then(|i| self.types.get(i as usize))
            .ok_or_else(|| malformed(format!("reference to nonexistent type #{id}")))
    }

    fn extra(&self, ty: &Ty) -> Result<&[u32], BtfError> {
        let start = ty.extra as usize;
        self.words
            .get(start..start + ty.extra_len as usize)
            .ok_or_else(|| malformed("type record out of bounds"))
    }

    /// Kind of type `id`; id 0 is `void`.
    fn kind_of(&self, id: u32) -> Result<u32, BtfError> {
        if id == 0 {
            Ok(0)
        } else {
            Ok(self.ty(id)?.kind())
        }
    }

    /// Ids of types called `name` whose kind is in `kinds`, in id order.
    fn ids_of<'s>(&'s self, name: &'s str, kinds: &'s [u32]) -> impl Iterator<Item = u32> + 's {
        let hash = name_hash(name, self.hash_mask);
        let start = self.by_name.partition_point(|&(h, _)| h < hash);
        self.by_name[start..]
            .iter()
            .take_while(move |&&(h, _)| h == hash)
            .map(|&(_, id)| id)
            .filter(move |&id| {
                self.ty(id).is_ok_and(|t| {
                    kinds.contains(&t.kind()) && self.name(t.name_off).is_ok_and(|n| n == name)
                })
            })
    }

    /// Follows typedef/const/volatile/restrict/type-tag links to a "real" type.
    fn skip_modifiers(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let ty = self.ty(id)?;
            match ty.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(malformed(format!(
            "type chain through #{id} is too long (cycle?)"
        )))
    }

    /// Size in bytes of type `id`.
    fn type_size(&self, id: u32, depth: u32) -> Result<u32, String> {
        if depth > MAX_DEPTH {
            return Err("type nesting too deep (cycle?)".into());
        }
        let id = self.skip_modifiers(id).map_err(|e| e.to_string())?;
        if id == 0 {
            return Err("it is void".into());
        }
        let ty = self.ty(id).map_err(|e| e.to_string())?;
        match ty.kind() {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Ok(ty.size_or_type)
            }
            KIND_PTR => Ok(self.ptr_size),
            KIND_ARRAY => {
                let &[elem, _index_type, nelems] = self.extra(ty).map_err(|e| e.to_string())?
                else {
                    return Err("array record has the wrong length".into());
                };
                let elem_size = self.type_size(elem, depth + 1)?;
                elem_size
                    .checked_mul(nelems)
                    .ok_or_else(|| format!("array of {nelems} x {elem_size} bytes overflows"))
            }
            kind => Err(format!("it is a {}", kind_name(kind))),
        }
    }

    /// First struct (or, failing that, union) called `name`. Deduplicated
    /// vmlinux BTF has one definition per name; taking the first is
    /// deterministic if a kernel ever ships duplicates.
    fn find_struct(&self, name: &str) -> Result<u32, BtfError> {
        self.ids_of(name, &[KIND_STRUCT])
            .chain(self.ids_of(name, &[KIND_UNION]))
            .next()
            .ok_or_else(|| BtfError::NoSuchType {
                kind: "struct",
                name: name.to_owned(),
            })
    }

    /// Depth-first search for `member` in struct/union `sid`, descending into
    /// anonymous struct/union members. Returns (bit offset, type id,
    /// bitfield width or 0).
    fn find_member(
        &self,
        sid: u32,
        member: &str,
        depth: u32,
    ) -> Result<Option<(u64, u32, u32)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("anonymous member nesting too deep (cycle?)"));
        }
        let ty = self.ty(sid)?;
        let kflag = ty.kind_flag();
        for m in self.extra(ty)?.chunks_exact(3) {
            let (name_off, mtype, raw_off) = (m[0], m[1], m[2]);
            // With kind_flag, the offset word packs bitfield width and bit offset.
            let (bit_off, bits) = if kflag {
                (raw_off & 0x00ff_ffff, raw_off >> 24)
            } else {
                (raw_off, 0)
            };
            let name = self.name(name_off)?;
            if name == member {
                return Ok(Some((u64::from(bit_off), mtype, bits)));
            }
            if name.is_empty() {
                let inner = self.skip_modifiers(mtype)?;
                if matches!(self.kind_of(inner)?, KIND_STRUCT | KIND_UNION) {
                    if let Some((off, t, b)) = self.find_member(inner, member, depth + 1)? {
                        return Ok(Some((off + u64::from(bit_off), t, b)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Byte offset and size of `member` in `struct struct_name`, looking
    /// through anonymous struct/union members. Bitfields are an error: they
    /// cannot be read with a plain byte-addressed load.
    pub fn member(&self, struct_name: &str, member: &str) -> Result<Member, BtfError> {
        let sid = self.find_struct(struct_name)?;
        let (bit_off, mtype, bits) =
            self.find_member(sid, member, 0)?
                .ok_or_else(|| BtfError::NoSuchMember {
                    ty: struct_name.to_owned(),
                    member: member.to_owned(),
                })?;
        let mut bitfield = bits != 0 || bit_off % 8 != 0;
        // Without kind_flag, a bitfield is an INT whose encoding is narrower
        // than its storage or starts at a bit offset.
        let base = self.skip_modifiers(mtype)?;
        if !bitfield && self.kind_of(base)? == KIND_INT {
            let int = self.ty(base)?;
            let &[enc] = self.extra(int)? else {
                return Err(malformed("int record has the wrong length"));
            };
            let (int_bits, int_off) = (enc & 0xff, (enc >> 16) & 0xff);
            bitfield = int_off != 0 || u64::from(int_bits) != u64::from(int.size_or_type) * 8;
        }
        if bitfield {
            return Err(BtfError::Bitfield {
                ty: struct_name.to_owned(),
                member: member.to_owned(),
            });
        }
        let offset = u32::try_from(bit_off / 8)
            .map_err(|_| malformed(format!("offset of {struct_name}.{member} overflows")))?;
        let size = self
            .type_size(mtype, 0)
            .map_err(|reason| BtfError::Unsized {
                ty: struct_name.to_owned(),
                member: member.to_owned(),
                reason,
            })?;
        Ok(Member { offset, size })
    }

    /// Size in bytes of `struct name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        Ok(self.ty(self.find_struct(name)?)?.size_or_type)
    }

    /// Value of enumerator `name`, searched in all ENUM and ENUM64 types.
    /// Unsigned 64-bit values above `i64::MAX` keep their bit pattern.
    /// Distinct enums may legitimately repeat a name with the same value;
    /// differing values make the name unusable.
    pub fn enumerator(&self, name: &str) -> Result<i64, BtfError> {
        let hash = name_hash(name, self.hash_mask);
        let start = self.enumerators.partition_point(|e| e.hash < hash);
        let mut values = self.enumerators[start..]
            .iter()
            .take_while(|e| e.hash == hash)
            .filter(|e| self.name(e.name_off).is_ok_and(|n| n == name))
            .map(|e| e.value);
        let first = values.next().ok_or_else(|| BtfError::NoSuchEnumerator {
            name: name.to_owned(),
        })?;
        match values.find(|&v| v != first) {
            None => Ok(first),
            Some(second) => Err(BtfError::AmbiguousEnumerator {
                name: name.to_owned(),
                first,
                second,
            }),
        }
    }

    /// Number of parameters of the function prototype that typedef
    /// `typedef_name` points to, e.g. `btf_trace_block_rq_complete` -> 4
    /// (`void *ctx` included). A trailing `...` is not counted.
    pub fn typedef_fn_params(&self, typedef_name: &str) -> Result<usize, BtfError> {
        let td = self
            .ids_of(typedef_name, &[KIND_TYPEDEF])
            .next()
            .ok_or_else(|| BtfError::NoSuchType {
                kind: "typedef",
                name: typedef_name.to_owned(),
            })?;
        let mut id = self.skip_modifiers(self.ty(td)?.size_or_type)?;
        if self.kind_of(id)? == KIND_PTR {
            id = self.skip_modifiers(self.ty(id)?.size_or_type)?;
        }
        let kind = self.kind_of(id)?;
        if kind != KIND_FUNC_PROTO {
            return Err(BtfError::NotFnPointer {
                name: typedef_name.to_owned(),
                found: kind_name(kind),
            });
        }
        let params = self.extra(self.ty(id)?)?;
        let mut n = params.len() / 2;
        // Varargs are encoded as a final parameter with no name and type 0.
        if params.ends_with(&[0, 0]) {
            n -= 1;
        }
        Ok(n)
    }

    /// Whether a function (BTF_KIND_FUNC) called `name` exists.
    pub fn has_func(&self, name: &str) -> bool {
        self.ids_of(name, &[KIND_FUNC]).next().is_some()
    }

    /// Type id of the function (BTF_KIND_FUNC) called `name`: the `attach_btf_id`
    /// of fentry/fexit/fmod_ret programs.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.ids_of(name, &[KIND_FUNC]).next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_file_is_named_with_its_error_once() {
        let e = Btf::from_file(Path::new("/nonexistent-kml/vmlinux")).expect_err("no such file");
        let shown = crate::kernel::caps::error_chain(&e);
        assert!(
            shown.starts_with("BTF: cannot read /nonexistent-kml/vmlinux: "),
            "{shown}"
        );
        assert_eq!(shown.matches("(os error 2)").count(), 1, "{shown}");
    }

    /// Tiny BTF writer for tests: types are appended in order (ids from 1).
    struct Builder {
        words: Vec<u32>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                words: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn ty(
            &mut self,
            name: &str,
            kind: u32,
            kflag: bool,
            vlen: u32,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let n = self.s(name);
            let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
            self.words.extend_from_slice(&[n, info, st]);
            self.words.extend_from_slice(extra);
            self.next_id += 1;
            self.next_id - 1
        }
        fn int(&mut self, name: &str, size: u32, bits: u32, bit_off: u32) -> u32 {
            self.ty(name, KIND_INT, false, 0, size, &[(bit_off << 16) | bits])
        }
        /// Members are (name, type, bit offset, bitfield width).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kflag: bool,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(mname, mtype, off, bits) in members {
                let n = self.s(mname);
                let off = if kflag { (bits << 24) | off } else { off };
                extra.extend_from_slice(&[n, mtype, off]);
            }
            self.ty(name, kind, kflag, members.len() as u32, size, &extra)
        }
        fn build(&self, big_endian: bool) -> Vec<u8> {
            let enc = |v: u32| {
                if big_endian {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            };
            let type_len = (self.words.len() * 4) as u32;
            let mut out = Vec::new();
            out.extend_from_slice(&if big_endian {
                BTF_MAGIC.to_be_bytes()
            } else {
                BTF_MAGIC.to_le_bytes()
            });
            out.extend_from_slice(&[1, 0]);
            for v in [24, 0, type_len, type_len, self.strings.len() as u32] {
                out.extend_from_slice(&enc(v));
            }
            for &w in &self.words {
                out.extend_from_slice(&enc(w));
            }
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature `struct request` exercising every interesting case.
    fn sample() -> Builder {
        let mut b = Builder::new();
        let u32_t = b.int("unsigned int", 4, 32, 0);
        let u64_t = b.int("long long unsigned int", 8, 64, 0);
        b.int("long unsigned int", 8, 64, 0);
        let u16_t = b.int("short unsigned int", 2, 16, 0);
        // volatile -> const -> typedef -> u64
        let sector_t = b.ty("sector_t", KIND_TYPEDEF, false, 0, u64_t, &[]);
        let c_sector = b.ty("", KIND_CONST, false, 0, sector_t, &[]);
        let v_sector = b.ty("", KIND_VOLATILE, false, 0, c_sector, &[]);

        let (r, w, neg, big) = (
            b.s("REQ_OP_READ"),
            b.s("REQ_OP_WRITE"),
            b.s("NEG_ONE"),
            b.s("__REQ_BIG"),
        );
        let req_op = b.ty("req_op", KIND_ENUM, false, 2, 4, &[r, 0, w, 1]);
        b.ty("signed_enum", KIND_ENUM, true, 1, 4, &[neg, u32::MAX]);
        b.ty("big_flags", KIND_ENUM64, false, 1, 8, &[big, 5, 1]);

        let fwd = b.ty("gendisk", KIND_FWD, false, 0, 0, &[]);
        let pdisk = b.ty("", KIND_PTR, false, 0, fwd, &[]);
        let arr = b.ty("", KIND_ARRAY, false, 0, 0, &[u16_t, u32_t, 5]);
        let anon_struct = b.composite(
            KIND_STRUCT,
            "",
            16,
            false,
            &[("fifo_time", u64_t, 0, 0), ("deadline", u64_t, 64, 0)],
        );
        let anon_union = b.composite(
            KIND_UNION,
            "",
            16,
            false,
            &[("", anon_struct, 0, 0), ("csd", u32_t, 0, 0)],
        );
        let req = b.composite(
            KIND_STRUCT,
            "request",
            64,
            true,
            &[
                ("q", pdisk, 0, 0),
                ("__sector", v_sector, 64, 0),
                ("cmd_flags", req_op, 128, 0),
                ("flags3", u32_t, 160, 3),
                ("ioprio", u16_t, 192, 0),
                ("", anon_union, 256, 0),
                ("prios", arr, 384, 0),
            ],
        );
        // Old-style (kind_flag 0) bitfield: the INT encoding is narrower than its storage.
        let bf_int = b.int("unsigned int", 4, 3, 0);
        b.composite(
            KIND_STRUCT,
            "old_style",
            8,
            false,
            &[("bits", bf_int, 0, 0), ("whole", u32_t, 32, 0)],
        );

        // typedef void (*btf_trace_x)(void *, struct request *, unsigned int);
        let void_ptr = b.ty("", KIND_PTR, false, 0, 0, &[]);
        let req_ptr = b.ty("", KIND_PTR, false, 0, req, &[]);
        let (p0, p1, p2) = (b.s("__data"), b.s("rq"), b.s("nr"));
        let proto = b.ty(
            "",
            KIND_FUNC_PROTO,
            false,
            3,
            0,
            &[p0, void_ptr, p1, req_ptr, p2, u32_t],
        );
        let pproto = b.ty("", KIND_PTR, false, 0, proto, &[]);
        b.ty("btf_trace_x", KIND_TYPEDEF, false, 0, pproto, &[]);
        let cpproto = b.ty("", KIND_CONST, false, 0, pproto, &[]);
        b.ty("btf_trace_const", KIND_TYPEDEF, false, 0, cpproto, &[]);
        // void f(void *, ...): the trailing vararg marker is not a parameter.
        let va = b.ty("", KIND_FUNC_PROTO, false, 2, 0, &[p0, void_ptr, 0, 0]);
        b.ty("varargs_fn", KIND_TYPEDEF, false, 0, va, &[]);
        b.ty("not_fn", KIND_TYPEDEF, false, 0, u32_t, &[]);
        let f = b.ty("dd_insert_request", KIND_FUNC, false, 1, proto, &[]);

        // Remaining kinds, so the walker's record sizes are all exercised.
        b.ty("double", KIND_FLOAT, false, 0, 8, &[]);
        b.ty("tag", KIND_DECL_TAG, false, 0, f, &[u32::MAX]);
        let var = b.ty("some_var", KIND_VAR, false, 0, u32_t, &[1]);
        b.ty(".data", KIND_DATASEC, false, 1, 4, &[var, 0, 4]);
        b.ty("user", KIND_TYPE_TAG, false, 0, u32_t, &[]);
        b.ty("", KIND_RESTRICT, false, 0, void_ptr, &[]);
        b
    }

    #[test]
    fn hand_built_blob_both_endians() {
        for big_endian in [false, true] {
            let blob = sample().build(big_endian);
            let btf = Btf::parse(&blob).expect("valid blob parses");
            assert_eq!(
                btf.member("request", "q").unwrap(),
                Member { offset: 0, size: 8 }
            );
            // volatile -> const -> typedef -> u64
            assert_eq!(
                btf.member("request", "__sector").unwrap(),
                Member { offset: 8, size: 8 }
            );
            assert_eq!(
                btf.member("request", "cmd_flags").unwrap(),
                Member {
                    offset: 16,
                    size: 4
                }
            );
            assert_eq!(
                btf.member("request", "ioprio").unwrap(),
                Member {
                    offset: 24,
                    size: 2
                }
            );
            // anonymous union at byte 32 -> anonymous struct -> deadline at +8
            assert_eq!(
                btf.member("request", "fifo_time").unwrap(),
                Member {
                    offset: 32,
                    size: 8
                }
            );
            assert_eq!(
                btf.member("request", "deadline").unwrap(),
                Member {
                    offset: 40,
                    size: 8
                }
            );
            assert_eq!(
                btf.member("request", "csd").unwrap(),
                Member {
                    offset: 32,
                    size: 4
                }
            );
            assert_eq!(
                btf.member("request", "prios").unwrap(),
                Member {
                    offset: 48,
                    size: 10
                }
            );
            assert!(matches!(
                btf.member("request", "flags3"),
                Err(BtfError::Bitfield { .. })
            ));
            assert!(matches!(
                btf.member("old_style", "bits"),
                Err(BtfError::Bitfield { .. })
            ));
            assert_eq!(
                btf.member("old_style", "whole").unwrap(),
                Member { offset: 4, size: 4 }
            );
            let err = btf.member("request", "nope").unwrap_err();
            assert_eq!(err.to_string(), "BTF: struct request has no member `nope`");
            let err = btf.member("bio", "bi_sector").unwrap_err();
            assert_eq!(err.to_string(), "BTF: no struct named `bio`");
            assert_eq!(btf.struct_size("request").unwrap(), 64);

            assert_eq!(btf.enumerator("REQ_OP_READ").unwrap(), 0);
            assert_eq!(btf.enumerator("REQ_OP_WRITE").unwrap(), 1);
            assert_eq!(btf.enumerator("NEG_ONE").unwrap(), -1);
            assert_eq!(btf.enumerator("__REQ_BIG").unwrap(), (1 << 32) | 5);
            assert!(matches!(
                btf.enumerator("NOPE"),
                Err(BtfError::NoSuchEnumerator { .. })
            ));

            assert_eq!(btf.typedef_fn_params("btf_trace_x").unwrap(), 3);
            assert_eq!(btf.typedef_fn_params("btf_trace_const").unwrap(), 3);
            assert_eq!(btf.typedef_fn_params("varargs_fn").unwrap(), 1);
            assert!(matches!(
                btf.typedef_fn_params("not_fn"),
                Err(BtfError::NotFnPointer { .. })
            ));
            assert!(matches!(
                btf.typedef_fn_params("missing"),
                Err(BtfError::NoSuchType {
                    kind: "typedef",
                    ..
                })
            ));

            assert!(btf.has_func("dd_insert_request"));
            assert!(!btf.has_func("btf_trace_x"));
            assert!(!btf.has_func("nope"));
            assert_eq!(btf.ptr_size, 8);
        }
    }

    #[test]
    fn conflicting_enumerators_are_reported() {
        let mut b = Builder::new();
        let (a1, a2) = (b.s("DUP"), b.s("DUP"));
        b.ty("e1", KIND_ENUM, false, 1, 4, &[a1, 1]);
        b.ty("e2", KIND_ENUM, false, 1, 4, &[a2, 2]);
        let same = b.s("SAME");
        b.ty("e3", KIND_ENUM, false, 1, 4, &[same, 7]);
        b.ty("e4", KIND_ENUM, false, 1, 4, &[same, 7]);
        let btf = Btf::parse(&b.build(false)).unwrap();
        assert!(matches!(
            btf.enumerator("DUP"),
            Err(BtfError::AmbiguousEnumerator {
                first: 1,
                second: 2,
                ..
            })
        ));
        assert_eq!(btf.enumerator("SAME").unwrap(), 7);
    }

    /// The indexes hold hashes, not names: lookups must still tell apart names
    /// that share a hash (here all of them do).
    #[test]
    fn lookups_survive_hash_collisions() {
        let answers = |btf: &Btf| {
            (
                btf.member("request", "__sector").unwrap(),
                btf.struct_size("request").unwrap(),
                btf.enumerator("REQ_OP_WRITE").unwrap(),
                btf.enumerator("NEG_ONE").unwrap(),
                btf.func_id("dd_insert_request"),
                btf.typedef_fn_params("btf_trace_x").unwrap(),
                btf.has_func("request"),
                btf.enumerator("REQ_OP_NONE").is_err(),
                btf.ptr_size,
            )
        };
        let mut btf = Btf::parse(&sample().build(false)).unwrap();
        let distinct = answers(&btf);
        btf.hash_mask = 0;
        btf.build_indexes().unwrap();
        assert!(btf.by_name.iter().all(|&(h, _)| h == 0));
        assert_eq!(answers(&btf), distinct);
    }

    #[test]
    fn cycles_are_errors_not_hangs() {
        let mut b = Builder::new();
        // typedef loop_t loop_t; struct s { loop_t x; struct { <self> }; }
        let td = b.ty("loop_t", KIND_TYPEDEF, false, 0, 1, &[]);
        assert_eq!(td, 1);
        b.composite(
            KIND_STRUCT,
            "s",
            8,
            false,
            &[("x", td, 0, 0), ("", 2, 0, 0)],
        );
        let btf = Btf::parse(&b.build(false)).unwrap();
        assert!(matches!(btf.member("s", "x"), Err(BtfError::Malformed(_))));
        assert!(matches!(btf.member("s", "y"), Err(BtfError::Malformed(_))));
    }

    #[test]
    fn unknown_trailing_kind_is_skipped_but_inner_one_is_not() {
        let mut b = Builder::new();
        b.int("int", 4, 32, 0);
        b.ty("future", 20, false, 0, 0, &[]);
        let btf = Btf::parse(&b.build(false)).expect("trailing unknown kind is skipped");
        assert_eq!(btf.types.len(), 2);
        assert_eq!(
            btf.member("x", "y").unwrap_err().to_string(),
            "BTF: no struct named `x`"
        );

        b.int("int2", 4, 32, 0);
        let err = Btf::parse(&b.build(false)).unwrap_err();
        assert!(err.to_string().contains("unsupported kind 20"), "{err}");
    }

    #[test]
    fn truncations_and_garbage_never_panic() {
        let blob = sample().build(false);
        for len in 0..blob.len() {
            // Any outcome but a panic is fine; most must be errors since the
            // header's section lengths no longer fit.
            if let Ok(btf) = Btf::parse(&blob[..len]) {
                exercise(&btf);
            }
        }
        assert!(Btf::parse(&blob[..blob.len() - 1]).is_err());
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0u8; 64]).is_err());

        // Deterministic byte-flip fuzzing (xorshift), including header bytes.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut data = blob.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() % data.len() as u64) as usize;
                data[i] = next() as u8;
            }
            if let Ok(btf) = Btf::parse(&data) {
                exercise(&btf);
            }
        }
    }

    fn exercise(btf: &Btf) {
        for m in [
            "q",
            "__sector",
            "fifo_time",
            "deadline",
            "flags3",
            "prios",
            "x",
        ] {
            let _ = btf.member("request", m);
        }
        let _ = btf.struct_size("request");
        let _ = btf.enumerator("REQ_OP_WRITE");
        let _ = btf.typedef_fn_params("btf_trace_x");
        let _ = btf.typedef_fn_params("varargs_fn");
        let _ = btf.has_func("dd_insert_request");
        let _ = format!("{btf:?}");
    }

    #[test]
    fn header_errors_are_clear() {
        let mut blob = sample().build(false);
        blob[2] = 2;
        assert_eq!(
            Btf::parse(&blob).unwrap_err().to_string(),
            "BTF: malformed data: unsupported BTF version 2"
        );
        let mut blob = sample().build(false);
        blob[0] = 0;
        assert_eq!(
            Btf::parse(&blob).unwrap_err().to_string(),
            "BTF: malformed data: bad magic (not BTF)"
        );
        let err = Btf::from_file(Path::new("/nonexistent/btf")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("BTF: cannot read /nonexistent/btf: "),
            "{err}"
        );
    }

    #[test]
    fn live_vmlinux() {
        let path = Path::new(Btf::VMLINUX);
        if !path.exists() {
            return kml_testkit::skip(format_args!(
                "{} does not exist (a kernel without BTF)",
                Btf::VMLINUX
            ));
        }
        let start = std::time::Instant::now();
        let btf = Btf::from_sys_fs().expect("vmlinux BTF parses");
        eprintln!("parsed {} in {:?}: {btf:?}", Btf::VMLINUX, start.elapsed());

        let m = |s: &str, f: &str| btf.member(s, f).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m("request", "q"), Member { offset: 0, size: 8 });
        assert_eq!(m("request", "__sector").size, 8);
        assert_eq!(m("request", "__data_len").size, 4);
        assert_eq!(m("request", "cmd_flags").size, 4);
        assert_eq!(m("request", "fifo_time").size, 8);
        // `request.ioprio` was removed in Linux 6.13 (the priority now lives
        // only in the bio), so it is optional; `bio.bi_ioprio` is not.
        match btf.member("request", "ioprio") {
            Ok(ioprio) => assert_eq!(ioprio.size, 2),
            Err(BtfError::NoSuchMember { .. }) => {
                eprintln!("note: struct request has no ioprio on this kernel")
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(m("bio", "bi_ioprio").size, 2);
        // Members of anonymous unions are found (request.queuelist is one).
        assert_eq!(m("request", "queuelist").size, 16);
        m("request_queue", "disk");
        m("gendisk", "major");
        m("gendisk", "first_minor");
        assert!(btf.struct_size("request").unwrap() > 0);

        assert_eq!(btf.enumerator("REQ_OP_READ").unwrap(), 0);
        assert_eq!(btf.enumerator("REQ_OP_WRITE").unwrap(), 1);
        for e in [
            "REQ_OP_FLUSH",
            "REQ_OP_DISCARD",
            "REQ_OP_WRITE_ZEROES",
            "REQ_OP_SECURE_ERASE",
        ] {
            btf.enumerator(e).unwrap_or_else(|err| panic!("{err}"));
        }
        assert_eq!(m("request", "bio").size, 8);
        for e in [
            "__REQ_SYNC",
            "__REQ_META",
            "__REQ_FUA",
            "__REQ_PREFLUSH",
            "__REQ_RAHEAD",
            "__REQ_FAILFAST_DEV",
        ] {
            let v = btf.enumerator(e).unwrap_or_else(|err| panic!("{err}"));
            assert!((0..64).contains(&v), "{e} = {v}");
        }
        assert_eq!(
            btf.typedef_fn_params("btf_trace_block_rq_complete")
                .unwrap(),
            4
        );
        assert_eq!(
            btf.typedef_fn_params("btf_trace_block_rq_insert").unwrap(),
            2
        );
        assert!(btf.has_func("blk_mq_start_request"));
        assert!(!btf.has_func("request"));
        assert_eq!(
            btf.member("request", "no_such_member")
                .unwrap_err()
                .to_string(),
            "BTF: struct request has no member `no_such_member`"
        );
    }
}
