//! Stepping subnormal state at full speed, with the same bits.
//!
//! A unit that stops getting gradient (a dead ReLU, an embedding row no batch uses) leaves its
//! optimizer state decaying towards zero, and it stops short of it: `m + 0.1 * (0 - m)` rounds
//! back to `m` for the smallest subnormal float32s (and `v * 0.999` for the smallest 500), so
//! such state stays subnormal for the rest of training. On x86 every vector multiplication,
//! fused multiply-add, division or square root that reads or yields a subnormal float32 then
//! takes a microcode assist of about 100 cycles (measured on a Xeon with AVX-512: a 100,000
//! element Adam step over subnormal moments took 8.7x as long), while additions, subtractions
//! and conversions between float32 and float64 do not. torch's kernels, and DeepSpeed's, pay
//! it on every step.
//!
//! So where a stretch of state holds subnormals the kernels compute its float32 products,
//! quotients, fused multiply-adds and square roots in float64, where those values are normal,
//! and round each result to float32 once: [`Widened`]. That gives the float32 operation's own
//! bits (see each method), so the stretches taken either way are indistinguishable.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::element::{Element, Real};

/// How the element maths multiplies, divides, fuses a multiply-add and takes a square root.
pub trait Arith<T: Real>: Copy {
    fn mul(self, a: T, b: T) -> T;
    fn div(self, a: T, b: T) -> T;
    /// `a * b + c` with one rounding.
    fn mul_add(self, a: T, b: T, c: T) -> T;
    fn sqrt(self, a: T) -> T;
}

/// The type's own instructions.
#[derive(Clone, Copy, Debug, Default)]
pub struct Native;

impl<T: Real> Arith<T> for Native {
    #[inline(always)]
    fn mul(self, a: T, b: T) -> T {
        a * b
    }
    #[inline(always)]
    fn div(self, a: T, b: T) -> T {
        a / b
    }
    #[inline(always)]
    fn mul_add(self, a: T, b: T, c: T) -> T {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn sqrt(self, a: T) -> T {
        a.sqrt()
    }
}

/// float32 operations computed in float64 and rounded once to float32: no float32 operation
/// ever sees or makes a subnormal, only the conversions do, which take no assist.
///
/// - A product of two float32s is exact in float64 (48 significant bits, exponents far inside
///   float64's normal range), so rounding it is the float32 product's one rounding.
/// - A quotient or square root rounded to float64, then to float32, is the float32 operation's
///   result: a float64 has more than 2 * 24 + 2 bits, and such a double rounding is innocuous
///   (Figueroa, "When is double rounding innocuous?", 1995). Subnormal quotients, whose grid is
///   coarser, are checked in `same_bits_as_float32` below; square roots of float32s are normal.
/// - A fused multiply-add's exact result `a * b + c` can need more bits than float64 has: it is
///   rounded to odd in float64 (the sum and its exact error, then the odd neighbour where the
///   sum is inexact), which rounds to the float32 result exactly (Boldo and Melquiond, "When
///   double rounding is odd", 2005: an odd rounding with 2 or more extra bits).
///
/// Written plainly, LLVM would turn the rounded float64 product, quotient and square root back
/// into the float32 instruction (the same value, with the assist): each result goes through an
/// addition of a zero it cannot see, `-0.0` read at run time (`x + -0.0` is `x`, signed zeros
/// and NaN payloads included). No fused multiply-add is used: on a CPU without one it would be a
/// libm call per element.
#[derive(Clone, Copy, Debug)]
pub struct Widened {
    negative_zero: f64,
}

impl Widened {
    pub fn new() -> Self {
        Self { negative_zero: std::hint::black_box(-0.0) }
    }
}

impl Default for Widened {
    fn default() -> Self {
        Self::new()
    }
}

impl Arith<f32> for Widened {
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        (f64::from(a) * f64::from(b) + self.negative_zero) as f32
    }
    #[inline(always)]
    fn div(self, a: f32, b: f32) -> f32 {
        (f64::from(a) / f64::from(b) + self.negative_zero) as f32
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        let (product, addend) = (f64::from(a) * f64::from(b), f64::from(c));
        // Knuth's TwoSum: `sum + error` is exactly `product + addend` (both float64s).
        let sum = product + addend;
        let addend_part = sum - product;
        let product_part = sum - addend_part;
        let error = (product - product_part) + (addend - addend_part);
        // Rounding to odd: an inexact sum whose last bit is even moves one float64 towards the
        // exact value (a zero sum is always exact; a finite sum has finite parts and error, and
        // infinities and NaN are left as they are).
        let bits = sum.to_bits();
        let inexact_even = error != 0.0 && bits & 1 == 0 && sum.is_finite();
        let towards = if (error > 0.0) == (sum > 0.0) { bits.wrapping_add(1) } else { bits.wrapping_sub(1) };
        f64::from_bits(if inexact_even { towards } else { bits }) as f32
    }
    #[inline(always)]
    fn sqrt(self, a: f32) -> f32 {
        (f64::from(a).sqrt() + self.negative_zero) as f32
    }
}

/// Whether a stretch of state starts with subnormals (in its first `SAMPLE` elements): a run of
/// subnormal state longer than a stretch (a dead unit's row of weights, an embedding's unused
/// row) starts some stretches, which are then stepped with `SubnormalSafe`; the stretch where
/// such a run begins is stepped natively: the same bits, at the assists' cost. Measured on the
/// Xeon: testing every element cost 20-25% of an in-cache Adam step (its loop is bound by vector
/// operations), and testing each stretch's last elements too cost 15-25% of a memory-bound
/// step (reading ahead of the stream); the first elements, which the step reads first anyway,
/// cost a few percent on 1,000-element tensors and nothing measurable on large ones.
/// State not held in the maths type is never tested (the kernels step such state in blocks
/// converted to it, and test those).
#[inline(always)]
pub fn starts_subnormal<S: Element>(xs: &[S]) -> bool {
    S::as_math(xs).is_some_and(|xs| S::Math::any_subnormal(&xs[..SAMPLE.min(xs.len())]))
}

/// `widen`, counted where true (see `widened_stretches`): whether to step a stretch with
/// `Real::SubnormalSafe`.
#[inline(always)]
pub(crate) fn counted(widen: bool) -> bool {
    if widen {
        WIDENED_STRETCHES.fetch_add(1, Ordering::Relaxed);
    }
    widen
}

/// The stretches of `0..n`, each `STRETCH` long but the last.
#[inline(always)]
pub(crate) fn stretches(n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n).step_by(STRETCH).map(move |start| start..(start + STRETCH).min(n))
}

/// The elements `starts_subnormal` tests: one AVX-512 vector of float32.
const SAMPLE: usize = 16;

/// How many stretches the kernels have stepped with `Widened` arithmetic in this process: for
/// tests that the kernels take that path where they should (results are the same bits either
/// way), and for profiling. One relaxed increment per such stretch.
pub fn widened_stretches() -> u64 {
    WIDENED_STRETCHES.load(Ordering::Relaxed)
}

static WIDENED_STRETCHES: AtomicU64 = AtomicU64::new(0);

/// How many elements the kernels step at a time with one arithmetic (see `starts_subnormal`).
pub const STRETCH: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// float32s with every kind of exponent: subnormals and values near the smallest normal
    /// (where the grids change), ordinary values, huge ones (for overflow), zeros, infinities
    /// and NaN.
    fn any_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            (0u32..0x0100_0000, any::<bool>()).prop_map(|(m, neg)| f32::from_bits(m | (u32::from(neg) << 31))),
            any::<u32>().prop_map(f32::from_bits),
            (-2.0f32..2.0),
            (-1e-3f32..1e-3),
            Just(0.9f32),
            Just(0.1f32),
            Just(0.999f32),
            Just(-0.001f32),
            Just(f32::MAX),
            Just(0.0f32),
        ]
    }

    fn same(widened: f32, native: f32) -> Result<(), TestCaseError> {
        if native.is_nan() {
            prop_assert!(widened.is_nan());
        } else {
            prop_assert_eq!(widened.to_bits(), native.to_bits(), "{:e} vs {:e}", widened, native);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200_000))]
        #[test]
        fn same_bits_as_float32(a in any_f32(), b in any_f32(), c in any_f32()) {
            same(Widened::new().mul(a, b), a * b)?;
            same(Widened::new().div(a, b), a / b)?;
            same(Widened::new().mul_add(a, b, c), a.mul_add(b, c))?;
            same(Widened::new().sqrt(a), a.sqrt())?;
        }
    }

    #[test]
    fn a_fused_multiply_add_just_off_a_tie() {
        // a * b = 2^-24 - 2^-70, so a * b + c is just below the float32 tie 1 + 3 * 2^-24 and
        // rounds down to c. Rounded to the nearest float64 first it would be the tie itself,
        // which rounds to the even 1 + 2^-22: rounding to odd keeps it off the tie.
        let (a, b, c) = (f32::from_bits(0x3380_0001), f32::from_bits(0x3f7f_fffe), f32::from_bits(0x3f80_0001));
        let rounded_twice = (f64::from(a) * f64::from(b) + f64::from(c)) as f32;
        assert_eq!(rounded_twice, 1.0 + 2.0 * f32::EPSILON, "the case rounds differently twice");
        assert_eq!(a.mul_add(b, c), c);
        assert_eq!(Widened::new().mul_add(a, b, c), c);
        // The same below zero, and with the tiny part's sign flipped (then exact either way).
        assert_eq!(Widened::new().mul_add(-a, b, -c), -c);
        assert_eq!(Widened::new().mul_add(a, -b, c).to_bits(), a.mul_add(-b, c).to_bits());
    }

    /// Fused multiply-adds whose exact result lies within a float64 ulp of a float32 tie (or on
    /// one): `a * b` an odd multiple of half `c`'s ulp, give or take a remainder far below it,
    /// for `c` of every exponent (subnormal results included) and every sign. Rounded to float64
    /// first, thousands of these would round wrongly; rounded to odd, none may.
    #[test]
    fn fused_multiply_adds_near_and_on_float32_ties() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let widened = Widened::new();
        let (mut cases, mut rounded_twice_wrong) = (0, 0);
        for i in 0..300_000u64 {
            let exponent = (next() % 254) as u32; // c's biased exponent: 0 is subnormal
            let c = f32::from_bits(exponent << 23 | (next() as u32 & 0x007f_ffff));
            let ulp_exponent = if exponent == 0 { -149 } else { exponent as i32 - 150 };
            // a = A * 2^ea and b = B * 2^eb (24-bit A, B) with A * B near (2j + 1) * 2^46, so
            // that a * b is near (2j + 1) * 2^(ulp_exponent - 1): an odd multiple of half an ulp.
            let big_a = (1u64 << 23) | (next() & 0x007f_ffff);
            let odd = 2 * (next() % 4) + 1;
            let mut big_b = ((odd << 46) as f64 / big_a as f64).round() as u64;
            let mut shift = 0;
            if big_b >= 1 << 24 {
                big_b = big_b.div_ceil(2);
                shift = 1;
            }
            if i % 7 == 0 {
                big_b = big_b.min((1 << 24) - 2) + 1; // (off the product's best fit)
            }
            let ea = -((next() % 40) as i32);
            let eb = ulp_exponent - 1 - 46 + shift - ea;
            let a = (big_a as f64 * 2f64.powi(ea)) as f32;
            let b = (big_b.min((1 << 24) - 1) as f64 * 2f64.powi(eb)) as f32;
            if a == 0.0 || b == 0.0 || !b.is_finite() {
                continue;
            }
            for (a, b, c) in [(a, b, c), (-a, b, c), (a, b, -c), (-a, b, -c), (b, a, c)] {
                cases += 1;
                let exact = a.mul_add(b, c);
                rounded_twice_wrong += u32::from((f64::from(a) * f64::from(b) + f64::from(c)) as f32 != exact);
                assert_eq!(widened.mul_add(a, b, c).to_bits(), exact.to_bits(), "{a:e} * {b:e} + {c:e}");
            }
        }
        assert!(cases > 1_000_000 && rounded_twice_wrong > 1_000, "{cases} cases, {rounded_twice_wrong} near ties");
        // Exact ties: 1 + 2^-23 + 2^-24 rounds to the even 1 + 2^-22, 1 + 2^-24 to 1.
        let one_up = 1.0 + f32::EPSILON;
        assert_eq!(widened.mul_add(2f32.powi(-24), 1.0, one_up), one_up.mul_add(1.0, 2f32.powi(-24)));
        assert_eq!(widened.mul_add(2f32.powi(-24), 1.0, one_up), 1.0 + 2.0 * f32::EPSILON);
        assert_eq!(widened.mul_add(2f32.powi(-24), 1.0, 1.0), 1.0);
    }

    #[test]
    fn subnormals_are_found_and_nothing_else() {
        let tiny = f32::from_bits(1);
        assert!(<f32 as Real>::any_subnormal(&[1.0, -tiny, 2.0]));
        assert!(<f32 as Real>::any_subnormal(&[f32::from_bits(0x807f_ffff)]));
        assert!(!<f32 as Real>::any_subnormal(&[
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::NAN,
            f32::INFINITY,
            1.0
        ]));
        assert!(!<f64 as Real>::any_subnormal(&[f64::from_bits(1)]));
    }
}
