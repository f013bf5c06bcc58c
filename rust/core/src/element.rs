//! Element types: the arithmetic type of the maths (`Real`) and the storage type of params,
//! grads and state (`Element`): `f32` and `f64` compute in themselves; `bf16` and `f16` are
//! loaded into `f32` exactly and stored rounded to nearest even, once per value, as torch's fused
//! CPU kernels compute half-precision params ("opmath" float32).

use num_traits::Float;

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
}

/// How a param or grad element is stored, and the type its maths runs in.
pub trait Element: Copy + Send + Sync + 'static {
    type Math: Real;
    fn load(self) -> Self::Math;
    fn store(x: Self::Math) -> Self;
}

impl<T: Real> Element for T {
    type Math = T;
    #[inline(always)]
    fn load(self) -> T {
        self
    }
    #[inline(always)]
    fn store(x: T) -> T {
        x
    }
}

/// bfloat16: load is exact (the top 16 bits of an f32); store rounds to nearest even and keeps
/// NaN a NaN (the `half` crate's conversion, as torch's `c10::BFloat16(float)`).
impl Element for half::bf16 {
    type Math = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// IEEE float16: load is exact; store rounds to nearest even (overflow to inf, subnormals kept,
/// NaN to the canonical quiet NaN), as torch's `c10::Half(float)`. The conversions are written
/// here without branches (the `half` crate's pick F16C at run time per element, which keeps the
/// kernels' loops from vectorising); `tests/half.rs` checks them against the `half` crate.
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
}

/// The float32 value of float16 bits, exactly.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let (sign, exp, mant) = ((h & 0x8000) << 16, (h >> 10) & 0x1f, h & 0x3ff);
    let normal = ((exp + (127 - 15)) << 23) | (mant << 13);
    let inf_nan = (0xff << 23) | (mant << 13);
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
    // 65536.0 and up (and inf, NaN): past float16's range whatever the rounding.
    let huge = if abs > 0x7f80_0000 { 0x7e00 } else { 0x7c00 };
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

// The tensor ops of torch's for-loop optimizers, rounded as ATen's vectorised CPU kernels round
// them (checked against torch 2.13 on AVX-512 and AVX2 machines): `add` with `alpha`, `addcmul`
// and `lerp` are fused multiply-adds, `addcdiv` is not. Every SIMD path computes `mul_add` with a
// single rounding (the baseline path through libm's `fma`), so all paths give the same bits.

/// `torch.add(input, other, alpha=alpha)`: `input + alpha * other`, one rounding.
#[inline(always)]
pub(crate) fn torch_add<T: Real>(input: T, other: T, alpha: T) -> T {
    other.mul_add(alpha, input)
}

/// `torch.addcmul(input, t1, t2, value=value)`: `input + (value * t1) * t2`, the last two
/// operations fused.
#[inline(always)]
pub(crate) fn torch_addcmul<T: Real>(input: T, t1: T, t2: T, value: T) -> T {
    (value * t1).mul_add(t2, input)
}

/// `torch.addcdiv(input, t1, t2, value=value)`: `input + (value * t1) / t2`, unfused.
#[inline(always)]
pub(crate) fn torch_addcdiv<T: Real>(input: T, t1: T, t2: T, value: T) -> T {
    input + value * t1 / t2
}

/// `torch.lerp(start, end, weight)`, two-sided so that it is exact at both ends:
/// `start + weight * (end - start)` for `|weight| < 0.5`, else
/// `end + (weight - 1) * (end - start)`, each a fused multiply-add.
#[inline(always)]
pub(crate) fn lerp<T: Real>(start: T, end: T, weight: T) -> T {
    let diff = end - start;
    if weight.abs() < T::round_from(0.5) {
        weight.mul_add(diff, start)
    } else {
        (weight - T::one()).mul_add(diff, end)
    }
}
