//! Fixed-point logarithms for the features: ratios on a log scale without a
//! division, in integer arithmetic the BPF verifier accepts. Shared by the load
//! features ([`crate::features`]) and the position features ([`crate::position`]).

// The logarithms are branch-free (masks and shifts): the BPF verifier walks every
// path through the program, and a compare-and-branch per step of a binary search,
// times the logarithms below, made the feature stage fail to verify ("BPF program
// is too large"). The remaining branches are compare-and-store diamonds whose
// results no later branch reads, which the verifier prunes.

/// Value of a log-ratio feature when the time equals the deadline budget; each
/// doubling adds 8 (see [`log_ratio_8`]).
pub const LOG_RATIO_ONE: i32 = 256;
/// Largest value of a log-ratio feature.
pub const LOG_RATIO_MAX: i32 = 2 * LOG_RATIO_ONE;
/// Largest value of [`log2_8`].
pub const LOG2_8_MAX: i32 = 8 * 64 + 7;

/// Number of significant bits of `v` (0 for 0, 64 for `1 << 63`), without a branch
/// (BPF has no count-leading-zeros instruction): smear the leading one into every
/// lower bit, then count the ones (a 64-bit population count by masks and one
/// multiply).
#[inline(always)]
pub const fn bit_length(v: u64) -> i32 {
    let mut v = v;
    v |= v >> 1;
    v |= v >> 2;
    v |= v >> 4;
    v |= v >> 8;
    v |= v >> 16;
    v |= v >> 32;
    // v is now 2^n - 1: count its ones.
    v -= (v >> 1) & 0x5555_5555_5555_5555;
    v = (v & 0x3333_3333_3333_3333) + ((v >> 2) & 0x3333_3333_3333_3333);
    v = (v + (v >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (v.wrapping_mul(0x0101_0101_0101_0101) >> 56) as i32
}

/// `log2(v)` in eighths, offset so that only 0 maps to 0: `8 × bit_length(v)` plus
/// the three bits after the leading one (`log2_8(1) = 8`, `log2_8(2) = 16`,
/// `log2_8(3) = 20`, `log2_8(1024) = 88`). Monotone; for `v >= 1` it is at most
/// `8 (log2 v + 1)` and less than 1.7 below it. Shifts only; at most [`LOG2_8_MAX`].
#[inline(always)]
pub const fn log2_8(v: u64) -> i32 {
    let n = bit_length(v) as u64;
    // The leading one moved to bit 63 (n = 64 and n = 0 both shift by 0; v = 0
    // stays 0): the next three bits are the fraction.
    let top = v << ((64 - n) & 63);
    (8 * n + ((top >> 60) & 7)) as i32
}

/// `num / den` on a log scale without a division: `log2_8(num) - log2_8(den)`
/// (eighths of a doubling) plus [`LOG_RATIO_ONE`], clamped to `0..=LOG_RATIO_MAX`.
/// 256 when `num ≈ den`, 264 at twice, 248 at half; within ±2 of
/// `256 + 8 log2(num / den)` (before clamping) when both are at least 1.
#[inline(always)]
pub const fn log_ratio_8(num: u64, den: u64) -> i32 {
    log_ratio_of_logs(log2_8(num), log2_8(den))
}

/// [`log_ratio_8`] from the two logarithms (so a shared denominator's is computed once).
#[inline(always)]
pub(crate) const fn log_ratio_of_logs(log_num: i32, log_den: i32) -> i32 {
    // -263..=775 before the clamp.
    let v = log_num - log_den + LOG_RATIO_ONE;
    if v < 0 {
        0
    } else if v > LOG_RATIO_MAX {
        LOG_RATIO_MAX
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_length_matches_leading_zeros() {
        let mut v = 1u64;
        for _ in 0..200 {
            for w in [v, v - 1, v + 1, v.wrapping_mul(3)] {
                assert_eq!(bit_length(w), 64 - w.leading_zeros() as i32, "{w}");
            }
            v = v.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        }
        assert_eq!(bit_length(0), 0);
        assert_eq!(bit_length(u64::MAX), 64);
    }

    #[test]
    fn log2_8_by_hand() {
        assert_eq!(log2_8(0), 0);
        assert_eq!(log2_8(1), 8);
        assert_eq!(log2_8(2), 16);
        assert_eq!(log2_8(3), 20);
        assert_eq!(log2_8(7), 30);
        assert_eq!(log2_8(8), 32);
        assert_eq!(log2_8(15), 39);
        assert_eq!(log2_8(1024), 88);
        assert_eq!(log2_8(1536), 92);
        assert_eq!(log2_8(u64::MAX), LOG2_8_MAX);
        assert_eq!(log_ratio_8(0, u64::MAX), 0);
        assert_eq!(log_ratio_8(u64::MAX, 0), LOG_RATIO_MAX);
        assert_eq!(log_ratio_8(3000, 3000), LOG_RATIO_ONE);
        assert_eq!(log_ratio_8(6000, 3000), LOG_RATIO_ONE + 8);
    }
}
