//! Integer selects without branches, for code the BPF verifier must walk: the
//! position walk ([`crate::position`]) and the inference's clamps
//! ([`crate::inference`]).
//!
//! Why. The verifier explores every path. A branch whose result a later compare
//! reads is a diamond it cannot prune, so each one doubles the paths of all that
//! follows; and Linux 6.18's verifier splits its state in two on an AND with a
//! value in [-1, 0], the usual mask idiom. So a select here multiplies by a 0/1
//! that LLVM cannot see through: were it to know that the value is 0 or 1, or where
//! it came from, it would turn the multiply back into a compare and a branch.
//!
//! How. On the BPF target each opaque step is one instruction in inline assembly
//! (a shift, or nothing), which LLVM must treat as an unknown computation on a
//! register. `core::hint::black_box`, used before, does the same by a round trip
//! through the stack: four more instructions each, about 40% of the position
//! walk. On the host no verifier runs: the same arithmetic, plain (the results are
//! the same bit for bit, which the tests below check against the obvious
//! definitions).
//!
//! Every function here is defined for operands below 2^63 (times, counts,
//! indices): a difference of two such values is negative exactly when it has its
//! top bit set.

/// A function of one register that is one BPF instruction, `$asm`, on the BPF
/// target (opaque to LLVM: it cannot fold it into a compare and a branch), and
/// `$host` on the host.
macro_rules! one_instruction {
    ($(#[$doc:meta])* $name:ident($t:ty), $asm:literal, $host:expr) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name(v: $t) -> $t {
            #[cfg(target_arch = "bpf")]
            {
                let mut v = v;
                // SAFETY: one ALU instruction on a register; no memory, no stack.
                unsafe {
                    core::arch::asm!($asm, inout(reg) v, options(pure, nomem, nostack));
                }
                v
            }
            #[cfg(not(target_arch = "bpf"))]
            {
                let host: fn($t) -> $t = $host;
                host(v)
            }
        }
    };
}

one_instruction!(
    /// `v >> 63` (logical).
    sign_bit(u64), "{0} >>= 63", |v| v >> 63
);
one_instruction!(
    /// `v >> 63` (arithmetic: -1 for a negative `v`, else 0).
    sign_mask(i64), "{0} s>>= 63", |v| v >> 63
);
one_instruction!(
    /// `v` unchanged, but of unknown origin to LLVM on BPF: an index it would
    /// otherwise prove in range and turn into a pointer walk the verifier cannot
    /// bound. A move onto itself, not an empty template: an instruction-less asm
    /// leaves two line_info records at one offset, which the kernel refuses
    /// ("Invalid line_info").
    opaque(u64), "{0} = {0}", |v| v
);

/// `v` when `bit` is 1, 0 when it is 0 (`bit` from one of the functions below).
#[inline(always)]
pub fn keep(bit: u64, v: u64) -> u64 {
    v.wrapping_mul(bit)
}

/// 1 when `v`, read as signed, is negative (a wrapped difference), else 0.
#[inline(always)]
pub fn negative(v: u64) -> u64 {
    sign_bit(v)
}

/// 1 when `a < b`, else 0: the sign of the difference, no compare.
#[inline(always)]
pub fn lt(a: u64, b: u64) -> u64 {
    sign_bit(a.wrapping_sub(b))
}

/// 1 when `v != 0`, else 0.
#[inline(always)]
pub fn nonzero(v: u64) -> u64 {
    sign_bit(v | v.wrapping_neg())
}

/// 1 when `a == b`, else 0.
#[inline(always)]
pub fn eq(a: u64, b: u64) -> u64 {
    1 ^ nonzero(a ^ b)
}

/// `yes` when `bit` is 1, else `no`.
#[inline(always)]
pub fn select(bit: u64, yes: u64, no: u64) -> u64 {
    no ^ keep(bit, no ^ yes)
}

/// `min(a, b)`.
#[inline(always)]
pub fn min(a: u64, b: u64) -> u64 {
    select(lt(b, a), b, a)
}

/// `a - b`, saturating at 0.
#[inline(always)]
pub fn sat_sub(a: u64, b: u64) -> u64 {
    keep(1 ^ lt(a, b), a.wrapping_sub(b))
}

/// The index of the only set bit of `v` (a power of two below 2^16), by a 16-bit
/// population count of `v - 1`: a dozen instructions, no loop.
#[inline(always)]
pub fn bit_index_16(v: u64) -> u64 {
    let x = v.wrapping_sub(1) & 0xffff;
    let x = x - ((x >> 1) & 0x5555);
    let x = (x & 0x3333) + ((x >> 2) & 0x3333);
    let x = (x + (x >> 4)) & 0x0f0f;
    (x + (x >> 8)) & 0x1f
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGES: [u64; 9] = [
        0,
        1,
        2,
        3,
        255,
        1 << 20,
        (1 << 40) + 7,
        (1 << 62) - 1,
        1 << 62,
    ];

    #[test]
    fn selects_match_their_definitions() {
        for &a in &EDGES {
            assert_eq!(nonzero(a), (a != 0) as u64);
            assert_eq!(negative(a), 0);
            assert_eq!(negative(a.wrapping_neg()), (a != 0) as u64);
            for &b in &EDGES {
                assert_eq!(lt(a, b), (a < b) as u64, "{a} < {b}");
                assert_eq!(eq(a, b), (a == b) as u64);
                assert_eq!(min(a, b), a.min(b));
                assert_eq!(sat_sub(a, b), a.saturating_sub(b));
                assert_eq!(select(1, a, b), a);
                assert_eq!(select(0, a, b), b);
                assert_eq!(keep(1, a), a);
                assert_eq!(keep(0, a), 0);
            }
        }
    }

    #[test]
    fn sign_mask_is_all_or_nothing() {
        for v in [i64::MIN, -5, -1, 0, 1, 7, i64::MAX] {
            assert_eq!(sign_mask(v), if v < 0 { -1 } else { 0 });
        }
    }

    #[test]
    fn bit_index_of_each_power_of_two() {
        for i in 0..16u64 {
            assert_eq!(bit_index_16(1 << i), i);
        }
    }
}
