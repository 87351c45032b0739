//! The operation of a block request, normalised across attach modes.
//!
//! Raw tracepoints see `rq->cmd_flags`; its op values and flag bits come from the
//! running kernel's BTF (`enum req_op`, `enum req_flag_bits`). Classic tracepoints
//! see the `rwbs` string built by `blk_fill_rwbs()`. Both are mapped to [`ReqOp`]
//! and [`ReqFlags`] here, in one place.

/// Operation of a request (`enum req_op` collapsed to what kml distinguishes).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReqOp {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
    SecureErase = 5,
    Other = 6,
}

impl ReqOp {
    pub const fn from_u8(v: u8) -> ReqOp {
        match v {
            0 => ReqOp::Read,
            1 => ReqOp::Write,
            2 => ReqOp::Flush,
            3 => ReqOp::Discard,
            4 => ReqOp::WriteZeroes,
            5 => ReqOp::SecureErase,
            _ => ReqOp::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ReqOp::Read => "read",
            ReqOp::Write => "write",
            ReqOp::Flush => "flush",
            ReqOp::Discard => "discard",
            ReqOp::WriteZeroes => "write_zeroes",
            ReqOp::SecureErase => "secure_erase",
            ReqOp::Other => "other",
        }
    }

    pub fn from_name(s: &str) -> Option<ReqOp> {
        [
            ReqOp::Read,
            ReqOp::Write,
            ReqOp::Flush,
            ReqOp::Discard,
            ReqOp::WriteZeroes,
            ReqOp::SecureErase,
            ReqOp::Other,
        ]
        .into_iter()
        .find(|op| op.name() == s)
    }

    /// mq-deadline keeps one FIFO per direction; kml counts reads against the read
    /// FIFO and everything else against the write side.
    pub const fn direction(self) -> Direction {
        match self {
            ReqOp::Read => Direction::Read,
            _ => Direction::Write,
        }
    }
}

/// Data direction, as mq-deadline's two FIFOs see it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

/// Request flags kml keeps (a bit set in one byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReqFlags(pub u8);

impl ReqFlags {
    pub const SYNC: u8 = 1 << 0;
    pub const META: u8 = 1 << 1;
    pub const FUA: u8 = 1 << 2;
    pub const PREFLUSH: u8 = 1 << 3;
    pub const RAHEAD: u8 = 1 << 4;

    pub const fn contains(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// Parses the `rwbs` field of the block tracepoints (`blk_fill_rwbs()`):
/// an optional `F` (preflush), one op letter (`W`, `R`, `D`, `DE`, `F`, `N`),
/// then flag letters `F` (fua), `A` (read-ahead), `S` (sync), `M` (meta).
/// NUL ends the string. Bounded: at most 8 bytes are looked at.
///
/// The bytes are taken out of one u64 by shifts, not by indexing: LLVM turns a
/// variable index into a stack array into pointer arithmetic (even `ptr | i`)
/// that the BPF verifier refuses.
#[inline(always)]
pub fn parse_rwbs(rwbs: &[u8; 8]) -> (ReqOp, ReqFlags) {
    let word = u64::from_le_bytes(*rwbs);
    let byte = |i: u32| (word >> ((i & 7) * 8)) as u8;
    let mut flags = 0u8;
    let mut i = 0u32;
    // A leading F is a preflush when an op letter follows it; "F" alone is a flush op.
    if byte(0) == b'F' && matches!(byte(1), b'W' | b'R' | b'D' | b'F' | b'N') {
        flags |= ReqFlags::PREFLUSH;
        i = 1;
    }
    let op = match byte(i) {
        b'R' => ReqOp::Read,
        b'W' => ReqOp::Write,
        b'D' => {
            if byte(i + 1) == b'E' {
                i += 1;
                ReqOp::SecureErase
            } else {
                ReqOp::Discard
            }
        }
        b'F' => ReqOp::Flush,
        _ => ReqOp::Other,
    };
    i += 1;
    while i < 8 {
        match byte(i) {
            0 => break,
            b'F' => flags |= ReqFlags::FUA,
            b'A' => flags |= ReqFlags::RAHEAD,
            b'S' => flags |= ReqFlags::SYNC,
            b'M' => flags |= ReqFlags::META,
            _ => {}
        }
        i += 1;
    }
    (op, ReqFlags(flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rwbs(s: &str) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..s.len()].copy_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn rwbs_strings_from_blk_fill_rwbs() {
        let cases: &[(&str, ReqOp, u8)] = &[
            ("R", ReqOp::Read, 0),
            ("RS", ReqOp::Read, ReqFlags::SYNC),
            ("RA", ReqOp::Read, ReqFlags::RAHEAD),
            ("RM", ReqOp::Read, ReqFlags::META),
            ("W", ReqOp::Write, 0),
            ("WS", ReqOp::Write, ReqFlags::SYNC),
            ("WFS", ReqOp::Write, ReqFlags::FUA | ReqFlags::SYNC),
            ("FWS", ReqOp::Write, ReqFlags::PREFLUSH | ReqFlags::SYNC),
            (
                "FWFSM",
                ReqOp::Write,
                ReqFlags::PREFLUSH | ReqFlags::FUA | ReqFlags::SYNC | ReqFlags::META,
            ),
            ("F", ReqOp::Flush, 0),
            ("FF", ReqOp::Flush, ReqFlags::PREFLUSH),
            ("FFS", ReqOp::Flush, ReqFlags::PREFLUSH | ReqFlags::SYNC),
            ("D", ReqOp::Discard, 0),
            ("DE", ReqOp::SecureErase, 0),
            ("N", ReqOp::Other, 0),
            ("", ReqOp::Other, 0),
        ];
        for (s, op, flags) in cases {
            assert_eq!(parse_rwbs(&rwbs(s)), (*op, ReqFlags(*flags)), "rwbs {s:?}");
        }
    }

    #[test]
    fn op_names_round_trip() {
        for v in 0..=6u8 {
            let op = ReqOp::from_u8(v);
            assert_eq!(op as u8, v);
            assert_eq!(ReqOp::from_name(op.name()), Some(op));
        }
        assert_eq!(ReqOp::from_u8(200), ReqOp::Other);
    }
}
