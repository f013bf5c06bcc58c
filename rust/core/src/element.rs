//! Element types: the arithmetic type of the maths (`Real`) and the storage type of params,
//! grads and state (`Element`): `f32` and `f64` compute in themselves; `bf16` and `f16` are
//! loaded into `f32` exactly and stored rounded to nearest even, once per value, as torch's fused
//! CPU kernels compute half-precision params ("opmath" float32).

use num_traits::Float;

use crate::simd::Isa;
use crate::subnormal::{Arith, Native, Widened};

/// A floating type the kernels compute in (and store optimizer state in).
pub trait Real: Float + Send + Sync + Default + core::fmt::Debug + 'static {
    /// Rounds a hyperparameter computed in `f64` (as torch does with Python floats) to `Self`.
    fn round_from(x: f64) -> Self;
    fn widen(self) -> f64;

    /// `torch.maximum`: NaN in either operand gives NaN (`f32::max` would drop it).
    #[inline(always)]
    fn max_propagate_nan(self, other: Self) -> Self {
        if self.is_nan() || self > other {
            self
        } else {
            other
        }
    }

    /// `torch.minimum`: NaN in either operand gives NaN.
    #[inline(always)]
    fn min_propagate_nan(self, other: Self) -> Self {
        if self.is_nan() || self < other {
            self
        } else {
            other
        }
    }

    /// `self / divisor` correctly rounded, the same bits as the division, for a divisor that
    /// many elements share: `reciprocal` is `1 / divisor` computed in `f64` (see `Reciprocal`).
    fn div_by(self, divisor: Self, reciprocal: f64) -> Self;

    /// Whether the kernels test stretches of state for subnormals (`any_subnormal`), and step
    /// those that have any with `SubnormalSafe` (see `subnormal`).
    const TESTS_SUBNORMALS: bool;
    type SubnormalSafe: Arith<Self> + Default;
    /// Whether any of `xs` is subnormal.
    fn any_subnormal(xs: &[Self]) -> bool;
}

/// A divisor shared by many elements, with its reciprocal rounded to `f64`.
///
/// For `f32`, `x / d` is computed as `(x as f64 * reciprocal) as f32`. For a divisor in (0, 1]
/// (Adam's: `sqrt(1 - beta2^step)`, for beta2 in [0, 1) a normal float32 in [2^-26.5, 1]) that
/// gives the division's bits for every `x`: zeros, infinities, subnormals, and a NaN's payload
/// (unless the divisor is NaN too). The product is within a relative 2^-52 (plus 2^-106) of the
/// exact quotient, and such a quotient is never nearer than 2^-49 (relative) to a float32
/// rounding boundary:
/// - a normal quotient: with `x = X * 2^a`, `d = D * 2^b` (24-bit integers) and a boundary
///   `M * 2^c` (M odd, 25 bits), `x - M * 2^c * d` is a non-zero multiple of `2^min(a, b + c)`
///   (M * D has more significant bits than X), and `M * D < 2^49`;
/// - a subnormal quotient needs a subnormal `x` (the quotient is at least `x`), and a boundary
///   `M * 2^-150` times `d` (D odd, b < 0) is never `x`: `M * D` is odd where `2 * X * 2^-b` is
///   even, so the quotient is at least 2^-174 from it.
///
/// Above 1 it is not exact: a subnormal quotient can then be a tie (`147 * 2^-149 / 98`,
/// tested), which the division rounds to even and the product does not. On CPUs whose divider
/// bounds Adam's in-cache loop (Intel's, where a 16-lane division takes about 10 cycles) this
/// saves one of its three divider operations.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reciprocal<T> {
    pub(crate) divisor: T,
    pub(crate) reciprocal: f64,
}

impl<T: Real> Reciprocal<T> {
    pub(crate) fn of(divisor: T) -> Self {
        debug_assert!(divisor <= T::one() || divisor.is_nan(), "exact for divisors in (0, 1] only");
        Self { divisor, reciprocal: 1.0 / divisor.widen() }
    }

    #[inline(always)]
    pub(crate) fn divide(&self, x: T) -> T {
        x.div_by(self.divisor, self.reciprocal)
    }
}

impl Real for f32 {
    #[inline(always)]
    fn round_from(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn div_by(self, _: f32, reciprocal: f64) -> f32 {
        (self as f64 * reciprocal) as f32
    }
    /// Where the assists were measured: x86 (Arm's cores handle most subnormals at full speed).
    const TESTS_SUBNORMALS: bool = cfg!(any(target_arch = "x86", target_arch = "x86_64"));
    type SubnormalSafe = Widened;
    #[inline(always)]
    fn any_subnormal(xs: &[f32]) -> bool {
        // |x| - 1 below the smallest normal's bits: a non-zero subnormal (zero wraps around).
        xs.iter().fold(false, |any, x| any | ((x.to_bits() & 0x7fff_ffff).wrapping_sub(1) < 0x007f_ffff))
    }
}

impl Real for f64 {
    #[inline(always)]
    fn round_from(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    /// No wider type to multiply in: the division itself.
    #[inline(always)]
    fn div_by(self, divisor: f64, _: f64) -> f64 {
        self / divisor
    }
    /// No wider type to compute subnormal float64s in (and they are rarer: the smallest normal
    /// float64 is 2^-1022).
    const TESTS_SUBNORMALS: bool = false;
    type SubnormalSafe = Native;
    #[inline(always)]
    fn any_subnormal(_: &[f64]) -> bool {
        false
    }
}

/// How a param or grad element is stored, and the type its maths runs in.
pub trait Element: Copy + Send + Sync + 'static {
    type Math: Real;
    /// `Self` is `Math` itself: loads and stores are copies, and the kernels run on the buffers
    /// directly instead of converting them a block at a time.
    const IS_MATH: bool = false;
    fn load(self) -> Self::Math;
    fn store(x: Self::Math) -> Self;

    /// The buffer itself in the maths type, where `Self` is that type (`IS_MATH`); else None.
    fn as_math_mut(buffer: &mut [Self]) -> Option<&mut [Self::Math]>;

    /// `as_math_mut` for a buffer that is only read.
    #[inline(always)]
    fn as_math(_buffer: &[Self]) -> Option<&[Self::Math]> {
        None
    }

    /// The buffer itself as bfloat16, where `Self` is that type; else None (for loops that
    /// convert bfloat16 in their own registers).
    #[inline(always)]
    fn as_bf16_mut(_buffer: &mut [Self]) -> Option<&mut [half::bf16]> {
        None
    }

    /// `as_bf16_mut` for a buffer that is only read.
    #[inline(always)]
    fn as_bf16(_buffer: &[Self]) -> Option<&[half::bf16]> {
        None
    }

    /// `dst[i] = src[i].load()` (block conversions may use the ISA's instructions).
    #[inline(always)]
    fn load_block<I: Isa>(_isa: I, src: &[Self], dst: &mut [Self::Math]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.load();
        }
    }

    /// `dst[i] = Self::store(src[i])`.
    #[inline(always)]
    fn store_block<I: Isa>(_isa: I, src: &[Self::Math], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::store(*s);
        }
    }

    /// `dst[i] = src[i]` rounded stochastically: up or down to a neighbour with probabilities
    /// that make the expected result `src[i]`, drawn with `random_bits(key, first_index + i)`.
    /// A type that holds every `Math` value exactly stores it as it is.
    #[inline(always)]
    fn store_block_stochastic<I: Isa>(isa: I, src: &[Self::Math], dst: &mut [Self], _key: u64, _first_index: u64) {
        Self::store_block(isa, src, dst)
    }
}

impl<T: Real> Element for T {
    type Math = T;
    const IS_MATH: bool = true;
    #[inline(always)]
    fn load(self) -> T {
        self
    }
    #[inline(always)]
    fn store(x: T) -> T {
        x
    }
    #[inline(always)]
    fn as_math_mut(buffer: &mut [T]) -> Option<&mut [T]> {
        Some(buffer)
    }
    #[inline(always)]
    fn as_math(buffer: &[T]) -> Option<&[T]> {
        Some(buffer)
    }
}

/// bfloat16: load is exact (the top 16 bits of an f32); store rounds to nearest even and makes
/// NaN the quiet NaN 0x7fc0, as torch's `c10::BFloat16(float)`.
impl Element for half::bf16 {
    type Math = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        half::bf16::from_bits(f32_to_bf16_bits(x))
    }
    fn as_math_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn as_bf16_mut(buffer: &mut [Self]) -> Option<&mut [half::bf16]> {
        Some(buffer)
    }
    #[inline(always)]
    fn as_bf16(buffer: &[Self]) -> Option<&[half::bf16]> {
        Some(buffer)
    }
    #[inline(always)]
    fn store_block<I: Isa>(isa: I, src: &[f32], dst: &mut [Self]) {
        isa.f32_to_bf16(src, dst)
    }
    #[inline(always)]
    fn store_block_stochastic<I: Isa>(_isa: I, src: &[f32], dst: &mut [Self], key: u64, first_index: u64) {
        for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
            *d = half::bf16::from_bits(f32_to_bf16_bits_stochastic(*s, random_bits(key, first_index + i as u64)));
        }
    }
}

/// float32 rounded to the nearest bfloat16 (ties to even), as bits; written without branches
/// (the `half` crate's conversion branches, which costs the kernels' vector loops a third).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    // Adding 0x7fff plus the lowest kept bit rounds the 16 dropped bits to nearest even; a carry
    // may reach the exponent, up to infinity, which is right.
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

/// IEEE float16: load is exact; store rounds to nearest even (overflow to inf, subnormals kept),
/// as torch's `c10::Half(float)` and its vectorised (F16C) conversions do; a NaN becomes a quiet
/// NaN with its sign and the top of its payload, as F16C makes it, so that every SIMD path gives
/// the same bits. The scalar conversions are written here without branches (the `half` crate's
/// pick F16C at run time per element, which keeps the kernels' loops from vectorising);
/// `tests/half.rs` and `tests/extensions.rs` check them against the `half` crate and F16C.
impl Element for half::f16 {
    type Math = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        half::f16::from_bits(f32_to_f16_bits(x))
    }
    fn as_math_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn load_block<I: Isa>(isa: I, src: &[Self], dst: &mut [f32]) {
        isa.f16_to_f32(src, dst)
    }
    #[inline(always)]
    fn store_block<I: Isa>(isa: I, src: &[f32], dst: &mut [Self]) {
        isa.f32_to_f16(src, dst)
    }
    #[inline(always)]
    fn store_block_stochastic<I: Isa>(_isa: I, src: &[f32], dst: &mut [Self], key: u64, first_index: u64) {
        for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
            *d = half::f16::from_bits(f32_to_f16_bits_stochastic(*s, random_bits(key, first_index + i as u64)));
        }
    }
}

/// The float32 value of float16 bits, exactly.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let (sign, exp, mant) = ((h & 0x8000) << 16, (h >> 10) & 0x1f, h & 0x3ff);
    let normal = ((exp + (127 - 15)) << 23) | (mant << 13);
    // A NaN comes out quiet, its payload kept (as F16C's conversion does).
    let inf_nan = (0xff << 23) | (mant << 13) | if mant != 0 { 0x0040_0000 } else { 0 };
    // Zero and subnormals: mant * 2^-24, exact in float32.
    let subnormal = (mant as f32 * (1.0 / 16_777_216.0)).to_bits();
    let bits = if exp == 0 {
        subnormal
    } else if exp == 0x1f {
        inf_nan
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// float32 rounded to the nearest float16 (ties to even), as bits.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let abs = bits & 0x7fff_ffff;
    // 65536.0 and up (and inf, NaN): past float16's range whatever the rounding. A NaN stays a
    // quiet NaN with the top of its payload, as F16C's conversion keeps it.
    let huge = if abs > 0x7f80_0000 { 0x7e00 | ((abs >> 13) & 0x3ff) } else { 0x7c00 };
    // Below 2^-14 the result is subnormal (or zero): adding 0.5 lets the FPU round the bits
    // that fall off to nearest even; the low bits of the sum are the float16 mantissa.
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let small = (f32::from_bits(abs) + f32::from_bits(DENORM_MAGIC)).to_bits().wrapping_sub(DENORM_MAGIC);
    // Normal: rebias the exponent and round the 13 dropped bits to nearest even (a carry may
    // reach the exponent, up to infinity, which is right).
    let odd = (abs >> 13) & 1;
    let normal = (abs.wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff)).wrapping_add(odd)) >> 13;
    let out = if abs >= (127 + 16) << 23 {
        huge
    } else if abs < (127 - 14) << 23 {
        small
    } else {
        normal
    };
    (out | sign) as u16
}

/// 32 random bits for element `index` of the stream `key`: a counter-based generator (two
/// rounds of MurmurHash3's 32-bit finaliser over the index and the key), a pure function of its
/// inputs, so that any split over threads or SIMD lanes draws the same bits. Within one key,
/// distinct indices below 2^32 give distinct first rounds (the finaliser is a bijection).
#[inline(always)]
pub fn random_bits(key: u64, index: u64) -> u32 {
    let first = fmix32((index as u32) ^ (key as u32));
    fmix32(first ^ (key >> 32) as u32 ^ ((index >> 32) as u32).wrapping_mul(0x9e37_79b9))
}

#[inline(always)]
fn fmix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

/// The key of one param's stochastic rounding at one step: SplitMix64's mixer over the seed, the
/// param's stream number and the step, so that no two (stream, step) pairs share a key in practice.
pub fn stochastic_key(seed: u64, stream: u64, step: u64) -> u64 {
    let mix = |z: u64| {
        let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    mix(mix(mix(seed.wrapping_add(GOLDEN)) ^ stream.wrapping_add(GOLDEN)) ^ step.wrapping_add(GOLDEN))
}

/// float32 rounded stochastically to bfloat16, as bits: the 16 dropped bits plus 16 random ones
/// carry into the kept bits with probability (dropped bits) / 2^16, which makes the expected
/// value exact. A finite value never becomes infinite (past the largest bfloat16 it stays the
/// largest, as rounding to nearest keeps it); NaN stays the quiet NaN.
#[inline(always)]
pub fn f32_to_bf16_bits_stochastic(x: f32, random: u32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(random & 0xffff) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else if x.is_finite() && rounded & 0x7fff == 0x7f80 {
        (rounded & 0x8000) | 0x7f7f
    } else {
        rounded
    }
}

/// float32 rounded stochastically to float16, as bits. Normal results: the 13 dropped bits plus
/// 13 random ones carry into the kept bits, exactly unbiased. Subnormal results (below 2^-14):
/// `|x| * 2^24` (exact) is rounded up when its fraction exceeds 23 random bits / 2^23, unbiased to
/// within 2^-23 of the smallest subnormal. A value that rounds to nearest as a finite float16
/// never becomes infinite (between 65504 and 65520 it stays 65504); past that, infinity, as to
/// nearest; NaN stays NaN.
#[inline(always)]
pub fn f32_to_f16_bits_stochastic(x: f32, random: u32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let abs = bits & 0x7fff_ffff;
    let huge = if abs > 0x7f80_0000 { 0x7e00 | ((abs >> 13) & 0x3ff) } else { 0x7c00 };
    let normal = (abs.wrapping_add((15u32.wrapping_sub(127)) << 23).wrapping_add(random & 0x1fff)) >> 13;
    let scaled = f32::from_bits(abs) * 16_777_216.0;
    let floor = scaled.floor();
    let up = ((random >> 9) as i32) as f32 * (1.0 / 8_388_608.0) < scaled - floor;
    // `floor` is below 2^10 where `small` is used: adding 2^23 puts it in the low mantissa bits
    // (cheaper in vector code than a saturating float-to-int conversion; `min` keeps the other
    // lanes harmless).
    let small = (floor.min(1024.0) + 8_388_608.0).to_bits() - 0x4b00_0000 + u32::from(up);
    // 65520.0: from here on, rounding to nearest gives infinity too.
    let out = if abs >= 0x477f_f000 {
        huge
    } else if abs < (127 - 14) << 23 {
        small
    } else {
        normal.min(0x7bff)
    };
    (out | sign) as u16
}

// The tensor ops of torch's for-loop optimizers, rounded as ATen's vectorised CPU kernels round
// them (checked against torch 2.13 on AVX-512 and AVX2 machines): `add` with `alpha`, `addcmul`
// and `lerp` are fused multiply-adds, `addcdiv` is not. Every SIMD path computes `mul_add` with a
// single rounding (the baseline path through libm's `fma`), so all paths give the same bits.
// `A` computes the multiplications, divisions and fused multiply-adds (see `subnormal`).

/// `torch.add(input, other, alpha=alpha)`: `input + alpha * other`, one rounding.
#[inline(always)]
pub(crate) fn torch_add<T: Real, A: Arith<T>>(arith: A, input: T, other: T, alpha: T) -> T {
    arith.mul_add(other, alpha, input)
}

/// `torch.addcmul(input, t1, t2, value=value)`: `input + (value * t1) * t2`, the last two
/// operations fused.
#[inline(always)]
pub(crate) fn torch_addcmul<T: Real, A: Arith<T>>(arith: A, input: T, t1: T, t2: T, value: T) -> T {
    arith.mul_add(arith.mul(value, t1), t2, input)
}

/// `torch.addcdiv(input, t1, t2, value=value)`: `input + (value * t1) / t2`, unfused.
#[inline(always)]
pub(crate) fn torch_addcdiv<T: Real, A: Arith<T>>(arith: A, input: T, t1: T, t2: T, value: T) -> T {
    input + arith.div(arith.mul(value, t1), t2)
}

/// Whether `lerp` with this weight computes from `start` (`|weight| < 0.5`) or from `end`; a
/// vector loop over one weight chooses its side once with it.
#[inline(always)]
pub(crate) fn lerp_from_start<T: Real>(weight: T) -> bool {
    weight.abs() < T::round_from(0.5)
}

/// `torch.lerp(start, end, weight)`, two-sided so that it is exact at both ends:
/// `start + weight * (end - start)` for `|weight| < 0.5`, else
/// `end + (weight - 1) * (end - start)`, each a fused multiply-add.
#[inline(always)]
pub(crate) fn lerp<T: Real, A: Arith<T>>(arith: A, start: T, end: T, weight: T) -> T {
    let diff = end - start;
    if lerp_from_start(weight) {
        arith.mul_add(weight, diff, start)
    } else {
        arith.mul_add(weight - T::one(), diff, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn same_bits_as_the_division(x: f32, d: f32) {
        let by_reciprocal = Reciprocal::of(d).divide(x);
        if x.is_nan() && d.is_nan() {
            // Which payload wins is the compiler's choice of operand order: NaN is all we claim.
            assert!(by_reciprocal.is_nan());
            return;
        }
        assert_eq!(by_reciprocal.to_bits(), (x / d).to_bits(), "{x:e} / {d:e}");
    }

    /// Adam's divisors (the second moment's bias correction's square root, for steps from 1 to
    /// 12,345 of four usual beta2s) against a million values of every kind: the bits of the
    /// division.
    #[test]
    fn dividing_by_a_reciprocal_gives_the_division_bits_for_adams_divisors() {
        let mut state = 0x9E37_79B9u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for beta2 in [0.999f64, 0.99, 0.95, 0.9] {
            for step in [1, 2, 3, 10, 100, 1000, 12345] {
                let d = (1.0 - beta2.powi(step)).sqrt() as f32;
                for _ in 0..40_000 {
                    same_bits_as_the_division(f32::from_bits(next()), d);
                }
                for x in [0.0, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX, f32::INFINITY, f32::NAN, 1.0, 3.0] {
                    same_bits_as_the_division(x, d);
                }
            }
        }
    }

    /// Where the exactness ends: above 1, a subnormal quotient can be a tie, which the division
    /// rounds to even and the product rounds by its last bits.
    #[test]
    fn above_one_a_subnormal_tie_is_where_the_reciprocal_differs() {
        let (x, d) = (f32::from_bits(147), 98.0f32);
        assert_eq!((x / d).to_bits(), 2);
        assert_eq!(((x as f64) * (1.0 / d as f64)) as f32, f32::from_bits(1));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// Any float32 over any normal divisor in (0, 1], and zero and NaN (NaN payloads,
        /// subnormals, overflow).
        #[test]
        fn dividing_by_a_reciprocal_gives_the_division_bits(
            x in any::<u32>(),
            d in prop_oneof![0x0080_0000u32..=0x3F80_0000, Just(0), Just(0x7FC0_0000)],
        ) {
            same_bits_as_the_division(f32::from_bits(x), f32::from_bits(d));
        }
    }
}
