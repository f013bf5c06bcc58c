//! The 8-bit codes. A value is encoded relative to its block's scale (`y = x / scale`, so
//! `|y| <= 1`): the code keeps its float32 exponent and the top 3 bits of its mantissa, rounded
//! to nearest (ties away from zero) by adding half a unit before truncating, so that code order
//! is value order and 1.0 has a code of its own.
//!
//! - First moment, signed: 127 magnitudes from 2^-16 * 1.25 to 1.0 (4.7 decades, 8 per
//!   binade) and zero, each with a sign: code 0 is -1.0, 127 is -0.0, 128 is +0.0, 255 is +1.0.
//! - Second moment, unsigned: 255 values from 2^-32 * 1.25 to 1.0 (9.5 decades) and zero.
//!
//! Magnitudes below the smallest code's lower half-unit become zero, except positive second
//! moments, which take the smallest code. Decoding is exact.
//!
//! The second moment gets twice the first's range in binades because it is a square: an element
//! whose grads are too small for its block's second-moment codes has a first moment too small
//! for the first-moment codes too. With a narrower second-moment range, a grad that stops would
//! leave a first moment over a zero second moment: an update of `lr * m / eps`.

use crate::simd::Isa;

/// `1.0f32.to_bits() >> 20`: the rounded 12-bit (exponent, 3 mantissa bits) key of 1.0.
const ONE_KEY: u32 = 0x3F80_0000 >> 20;
/// Keys above `ONE_KEY - 127` are signed magnitudes 1..=127; those above `ONE_KEY - 255`
/// unsigned codes 1..=255.
const SIGNED_KEY_BIAS: u32 = ONE_KEY - 127;
const UNSIGNED_KEY_BIAS: u32 = ONE_KEY - 255;

/// The rounded key of `|y|`, `|y|` clamped to 1.0 (NaN too: its bits are above 1.0's).
#[inline(always)]
fn key(y: f32) -> u32 {
    let magnitude = (y.to_bits() & 0x7FFF_FFFF).min(0x3F80_0000);
    (magnitude + (1 << 19)) >> 20
}

/// The XOR that maps a signed magnitude to its code and back: the sign bit set for
/// positive values, all other bits flipped for negative ones (so codes sort by value).
#[inline(always)]
fn sign_flip(negative: u32) -> u32 {
    0x80 ^ (negative * 0xFF)
}

#[inline(always)]
pub fn encode_signed(y: f32) -> u8 {
    let negative = y.to_bits() >> 31;
    let magnitude = key(y).saturating_sub(SIGNED_KEY_BIAS);
    (magnitude ^ sign_flip(negative)) as u8
}

#[inline(always)]
pub fn decode_signed(code: u8) -> f32 {
    let code = code as u32;
    let negative = (code < 128) as u32;
    let magnitude = code ^ sign_flip(negative);
    let bits = if magnitude == 0 { 0 } else { (magnitude + SIGNED_KEY_BIAS) << 20 };
    f32::from_bits(bits | negative << 31)
}

/// As the other codes, except that a positive value never encodes as zero: it takes the
/// smallest code instead. A second moment decoded as zero under a non-zero first moment
/// would make an update of `lr * m / eps` (a grad spike in a block pushes its neighbours'
/// second moments below the smallest code, and their first moments decay faster).
#[inline(always)]
pub fn encode_unsigned(y: f32) -> u8 {
    key(y).saturating_sub(UNSIGNED_KEY_BIAS).max((y > 0.0) as u32) as u8
}

#[inline(always)]
pub fn decode_unsigned(code: u8) -> f32 {
    let code = code as u32;
    f32::from_bits(if code == 0 { 0 } else { (code + UNSIGNED_KEY_BIAS) << 20 })
}

/// A decoded value times its block's scale; zero stays zero whatever the scale (an infinite
/// scale, from one element whose square overflowed, leaves the block's zeros zero, not NaN).
#[inline(always)]
pub(crate) fn scaled(decoded: f32, scale: f32) -> f32 {
    if decoded == 0.0 {
        decoded
    } else {
        decoded * scale
    }
}

// Whole blocks at a time: the same codes, with AVX-512 where the ISA has it, then AVX2.
// LLVM vectorises the per-element functions above poorly (about 30 instructions per 8 values,
// and a scalar tail in every block); by hand it is about 10, which makes the 8-bit step
// compute-bound no longer on AVX2. The results are those of the per-element functions, bit for
// bit, for every input (tested below).

/// One kind of code, per element and (on x86-64) 8 values at a time in AVX2, 16 in AVX-512.
pub(crate) trait Codes {
    fn decode(code: u8) -> f32;
    fn encode(y: f32) -> u8;
    /// `decode(codes[i]) * scale` over the longest prefix of whole vectors; returns its length.
    #[cfg(target_arch = "x86_64")]
    fn decode_avx2(avx2: Avx2, codes: &[u8], scale: f32, out: &mut [f32]) -> usize;
    /// `encode(values[i] * inverse)` over the longest prefix of whole vectors; returns its length.
    #[cfg(target_arch = "x86_64")]
    fn encode_avx2(avx2: Avx2, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize;
    /// As `decode_avx2`, 16 values a vector.
    #[cfg(target_arch = "x86_64")]
    fn decode_avx512(avx512: Avx512, codes: &[u8], scale: f32, out: &mut [f32]) -> usize;
    /// As `encode_avx2`, 16 values a vector.
    #[cfg(target_arch = "x86_64")]
    fn encode_avx512(avx512: Avx512, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize;
}

/// The first moment's codes.
pub(crate) struct Signed;
/// The second moment's codes.
pub(crate) struct Unsigned;

impl Codes for Signed {
    #[inline(always)]
    fn decode(code: u8) -> f32 {
        decode_signed(code)
    }
    #[inline(always)]
    fn encode(y: f32) -> u8 {
        encode_signed(y)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn decode_avx2(avx2: Avx2, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        avx2::decode_signed(avx2, codes, scale, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn encode_avx2(avx2: Avx2, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        avx2::encode_signed(avx2, values, inverse, codes)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn decode_avx512(avx512: Avx512, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        avx512::decode_signed(avx512, codes, scale, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn encode_avx512(avx512: Avx512, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        avx512::encode_signed(avx512, values, inverse, codes)
    }
}

impl Codes for Unsigned {
    #[inline(always)]
    fn decode(code: u8) -> f32 {
        decode_unsigned(code)
    }
    #[inline(always)]
    fn encode(y: f32) -> u8 {
        encode_unsigned(y)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn decode_avx2(avx2: Avx2, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        avx2::decode_unsigned(avx2, codes, scale, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn encode_avx2(avx2: Avx2, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        avx2::encode_unsigned(avx2, values, inverse, codes)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn decode_avx512(avx512: Avx512, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        avx512::decode_unsigned(avx512, codes, scale, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn encode_avx512(avx512: Avx512, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        avx512::encode_unsigned(avx512, values, inverse, codes)
    }
}

#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};

/// `out[i] = scaled(C::decode(codes[i]), scale)`.
#[inline(always)]
pub(crate) fn decode_block<C: Codes, I: Isa>(isa: I, codes: &[u8], scale: f32, out: &mut [f32]) {
    let _ = isa; // (only x86-64 has a faster path)
    let n = codes.len().min(out.len());
    let (codes, out) = (&codes[..n], &mut out[..n]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if multiplies_like_scaled(scale) {
        if let Some(avx512) = isa.avx512() {
            done = C::decode_avx512(avx512, codes, scale, out);
        }
        if let Some(avx2) = isa.avx2() {
            done += C::decode_avx2(avx2, &codes[done..], scale, &mut out[done..]);
        }
    }
    for (x, &c) in out[done..].iter_mut().zip(&codes[done..]) {
        *x = scaled(C::decode(c), scale);
    }
}

/// `codes[i] = C::encode(values[i] * inverse)`.
#[inline(always)]
pub(crate) fn encode_block<C: Codes, I: Isa>(isa: I, values: &[f32], inverse: f32, codes: &mut [u8]) {
    let _ = isa;
    let n = codes.len().min(values.len());
    let (codes, values) = (&mut codes[..n], &values[..n]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(avx512) = isa.avx512() {
            done = C::encode_avx512(avx512, values, inverse, codes);
        }
        if let Some(avx2) = isa.avx2() {
            done += C::encode_avx2(avx2, &values[done..], inverse, &mut codes[done..]);
        }
    }
    for (c, &x) in codes[done..].iter_mut().zip(&values[done..]) {
        *c = C::encode(x * inverse);
    }
}

/// Whether `decoded * scale` is `scaled(decoded, scale)` for every decoded value: for a finite
/// scale of positive sign, zeros times it keep their own sign (a negative or infinite scale
/// would change a zero's sign or make it NaN).
#[inline(always)]
pub(crate) fn multiplies_like_scaled(scale: f32) -> bool {
    scale.to_bits() < f32::INFINITY.to_bits()
}

/// The codes in AVX2, 8 values a vector. Each function does the longest prefix it can in whole
/// vectors (32 values for the encoders, which pack four vectors into one store) and returns its
/// length; the caller does the rest with the per-element functions.
///
/// Every function takes an `Avx2`, which exists only where the CPU has AVX2 (`simd.rs`), and is
/// inlined into the trampolines compiled for it. Every load and store is inside its slice: the
/// loops run while the whole vector fits (`j + width <= n`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Avx2, SIGNED_KEY_BIAS, UNSIGNED_KEY_BIAS};
    use std::arch::x86_64::*;

    /// `(a + ROUND) >> 20` (arithmetic) is a key minus its bias: the key of `a`, rounded, less
    /// the bias that makes code 1 the smallest magnitude. Below the codes' range it is negative
    /// (clamped to 0 below); above 1.0 (NaN, infinity) it is at most 1290, which the packs
    /// saturate to the top code as `key`'s clamp does.
    pub(super) const SIGNED_ROUND: i32 = (1 << 19) - ((SIGNED_KEY_BIAS as i32) << 20);
    pub(super) const UNSIGNED_ROUND: i32 = (1 << 19) - ((UNSIGNED_KEY_BIAS as i32) << 20);

    /// The packs of vectors a, b, c, d (`_mm256_packs_epi32` then `_mm256_packs_epi16`, per
    /// 128-bit lane) leave their bytes as a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7 in 32-bit
    /// groups; this permutation of the groups restores a b c d.
    const UNPACK_ORDER: [i32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

    #[inline(always)]
    pub(super) fn decode_signed(_: Avx2, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        let n = codes.len().min(out.len());
        let mut j = 0;
        while j + 8 <= n {
            // SAFETY: AVX2 as the module says; `j + 8 <= n` keeps the 8-byte load and the
            // 8-float store inside `codes` and `out`.
            unsafe {
                // code ^ 0x80 as i8 is the magnitude for positive values and -magnitude - 1 for
                // negative ones; x ^ (x >> 31) is then the magnitude for both.
                let c = _mm_loadl_epi64(codes.as_ptr().add(j).cast());
                let s = _mm256_cvtepi8_epi32(_mm_xor_si128(c, _mm_set1_epi8(0x80u8 as i8)));
                let magnitude = _mm256_xor_si256(s, _mm256_srai_epi32::<31>(s));
                let bits =
                    _mm256_slli_epi32::<20>(_mm256_add_epi32(magnitude, _mm256_set1_epi32(SIGNED_KEY_BIAS as i32)));
                // sign_epi32 zeroes the lanes whose magnitude is 0 (the codes for +-0).
                let bits = _mm256_sign_epi32(bits, magnitude);
                let bits = _mm256_or_si256(bits, _mm256_and_si256(s, _mm256_set1_epi32(i32::MIN)));
                let x = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(scale));
                _mm256_storeu_ps(out.as_mut_ptr().add(j), x);
            }
            j += 8;
        }
        j
    }

    #[inline(always)]
    pub(super) fn decode_unsigned(_: Avx2, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        let n = codes.len().min(out.len());
        let mut j = 0;
        while j + 8 <= n {
            // SAFETY: as in `decode_signed`.
            unsafe {
                let c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(j).cast()));
                let bits = _mm256_slli_epi32::<20>(_mm256_add_epi32(c, _mm256_set1_epi32(UNSIGNED_KEY_BIAS as i32)));
                let bits = _mm256_sign_epi32(bits, c); // code 0 is 0
                let x = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(scale));
                _mm256_storeu_ps(out.as_mut_ptr().add(j), x);
            }
            j += 8;
        }
        j
    }

    /// The signed codes of 8 values `x[..8] * inverse` before packing: the magnitude, clamped at
    /// 0, as `-magnitude - 1` for negative values (the signed packs then saturate it to
    /// -128..=127, and ^ 0x80 makes it the code).
    ///
    /// # Safety
    /// The CPU has AVX2 and `x` points at 8 readable floats.
    #[inline(always)]
    unsafe fn signed_lanes(x: *const f32, inverse: __m256) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            let y = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x), inverse));
            let magnitude = _mm256_and_si256(y, _mm256_set1_epi32(i32::MAX));
            let t = _mm256_srai_epi32::<20>(_mm256_add_epi32(magnitude, _mm256_set1_epi32(SIGNED_ROUND)));
            _mm256_xor_si256(_mm256_max_epi32(t, _mm256_setzero_si256()), _mm256_srai_epi32::<31>(y))
        }
    }

    /// The unsigned codes of 8 values before packing: the key, clamped below at 1 for positive
    /// values (`min(bits, 1)` as i32 is 1 for y > 0 and NaN, 0 for +0, negative for negative
    /// values) and at 0 by the unsigned packs.
    ///
    /// # Safety
    /// As for `signed_lanes`.
    #[inline(always)]
    unsafe fn unsigned_lanes(x: *const f32, inverse: __m256) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            let y = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x), inverse));
            let magnitude = _mm256_and_si256(y, _mm256_set1_epi32(i32::MAX));
            let t = _mm256_srai_epi32::<20>(_mm256_add_epi32(magnitude, _mm256_set1_epi32(UNSIGNED_ROUND)));
            _mm256_max_epi32(t, _mm256_min_epi32(y, _mm256_set1_epi32(1)))
        }
    }

    #[inline(always)]
    pub(super) fn encode_signed(_: Avx2, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        let n = codes.len().min(values.len());
        let mut j = 0;
        while j + 32 <= n {
            // SAFETY: as in `decode_signed`; `j + 32 <= n` keeps the four 8-float loads and the
            // 32-byte store inside `values` and `codes`.
            unsafe {
                let inverse = _mm256_set1_ps(inverse);
                let x = values.as_ptr().add(j);
                let (a, b) = (signed_lanes(x, inverse), signed_lanes(x.add(8), inverse));
                let (c, d) = (signed_lanes(x.add(16), inverse), signed_lanes(x.add(24), inverse));
                let bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
                let bytes = _mm256_xor_si256(
                    _mm256_permutevar8x32_epi32(bytes, _mm256_loadu_si256(UNPACK_ORDER.as_ptr().cast())),
                    _mm256_set1_epi8(0x80u8 as i8),
                );
                _mm256_storeu_si256(codes.as_mut_ptr().add(j).cast(), bytes);
            }
            j += 32;
        }
        j
    }

    #[inline(always)]
    pub(super) fn encode_unsigned(_: Avx2, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        let n = codes.len().min(values.len());
        let mut j = 0;
        while j + 32 <= n {
            // SAFETY: as in `encode_signed`.
            unsafe {
                let inverse = _mm256_set1_ps(inverse);
                let x = values.as_ptr().add(j);
                let (a, b) = (unsigned_lanes(x, inverse), unsigned_lanes(x.add(8), inverse));
                let (c, d) = (unsigned_lanes(x.add(16), inverse), unsigned_lanes(x.add(24), inverse));
                let bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
                _mm256_storeu_si256(
                    codes.as_mut_ptr().add(j).cast(),
                    _mm256_permutevar8x32_epi32(bytes, _mm256_loadu_si256(UNPACK_ORDER.as_ptr().cast())),
                );
            }
            j += 32;
        }
        j
    }
}

/// The codes in AVX-512 (F, BW, VL), 16 values a vector, the same operations as the AVX2 ones (see
/// there) on twice the width; the encoders pack four vectors, 64 values, into one store. Same
/// contract: each function takes an `Avx512`, which exists only where the CPU has AVX-512
/// (`simd.rs`), is inlined into the trampoline compiled for it, and loads and stores only while
/// the whole vector fits in its slices (`j + width <= n`).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::avx2::{SIGNED_ROUND, UNSIGNED_ROUND};
    use super::{Avx512, SIGNED_KEY_BIAS, UNSIGNED_KEY_BIAS};
    use std::arch::x86_64::*;

    /// After `_mm512_packs_epi32` then `_mm512_packs_epi16` of vectors a, b, c, d (per 128-bit
    /// lane), 32-bit group `4 * lane + k` holds elements `4 * lane..4 * lane + 4` of vector k;
    /// this permutation of the groups restores a b c d.
    const UNPACK_ORDER: [i32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

    /// `scaled(decode_signed(c), scale)` of 16 codes, for a scale that `multiplies_like_scaled`.
    /// The magnitudes and signs are taken from the bytes (16 lanes of one 128-bit vector, half
    /// the cost of a 512-bit operation on Zen 4) before they are widened.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL.
    #[inline(always)]
    pub(crate) unsafe fn signed_values(codes: __m128i, scale: __m512) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            // code ^ 0x80 as i8 is the magnitude for positive values and -magnitude - 1 for
            // negative ones; xor with its sign mask is then the magnitude for both.
            let s = _mm_xor_si128(codes, _mm_set1_epi8(0x80u8 as i8));
            let negative = _mm_movepi8_mask(s);
            let magnitude = _mm_xor_si128(s, _mm_cmpgt_epi8(_mm_setzero_si128(), s));
            // (magnitude + bias) << 20 where the magnitude is not 0 (the codes for +-0), then the sign.
            let shifted = _mm512_slli_epi32::<20>(_mm512_cvtepu8_epi32(magnitude));
            let bits = _mm512_maskz_add_epi32(
                _mm_test_epi8_mask(magnitude, magnitude),
                shifted,
                _mm512_set1_epi32((SIGNED_KEY_BIAS << 20) as i32),
            );
            let bits = _mm512_mask_or_epi32(bits, negative, bits, _mm512_set1_epi32(i32::MIN));
            _mm512_mul_ps(_mm512_castsi512_ps(bits), scale)
        }
    }

    /// `scaled(decode_unsigned(c), scale)` of 16 codes, as `signed_values`.
    ///
    /// # Safety
    /// As for `signed_values`.
    #[inline(always)]
    pub(crate) unsafe fn unsigned_values(c: __m128i, scale: __m512) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            let shifted = _mm512_slli_epi32::<20>(_mm512_cvtepu8_epi32(c));
            // code 0 is 0
            let bits = _mm512_maskz_add_epi32(
                _mm_test_epi8_mask(c, c),
                shifted,
                _mm512_set1_epi32((UNSIGNED_KEY_BIAS << 20) as i32),
            );
            _mm512_mul_ps(_mm512_castsi512_ps(bits), scale)
        }
    }

    #[inline(always)]
    pub(super) fn decode_signed(_: Avx512, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        let n = codes.len().min(out.len());
        let mut j = 0;
        while j + 16 <= n {
            // SAFETY: AVX-512 as the module says; `j + 16 <= n` keeps the 16-byte load and the
            // 16-float store inside `codes` and `out`.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(j),
                    signed_values(_mm_loadu_si128(codes.as_ptr().add(j).cast()), _mm512_set1_ps(scale)),
                )
            }
            j += 16;
        }
        j
    }

    #[inline(always)]
    pub(super) fn decode_unsigned(_: Avx512, codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        let n = codes.len().min(out.len());
        let mut j = 0;
        while j + 16 <= n {
            // SAFETY: as in `decode_signed`.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(j),
                    unsigned_values(_mm_loadu_si128(codes.as_ptr().add(j).cast()), _mm512_set1_ps(scale)),
                )
            }
            j += 16;
        }
        j
    }

    /// As `avx2::signed_lanes`, 16 values.
    ///
    /// # Safety
    /// The CPU has AVX-512 and `x` points at 16 readable floats.
    #[inline(always)]
    unsafe fn signed_lanes(x: *const f32, inverse: __m512) -> __m512i {
        // SAFETY: the caller's contract.
        unsafe {
            let y = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(x), inverse));
            let magnitude = _mm512_and_si512(y, _mm512_set1_epi32(i32::MAX));
            let t = _mm512_srai_epi32::<20>(_mm512_add_epi32(magnitude, _mm512_set1_epi32(SIGNED_ROUND)));
            _mm512_xor_si512(_mm512_max_epi32(t, _mm512_setzero_si512()), _mm512_srai_epi32::<31>(y))
        }
    }

    /// As `avx2::unsigned_lanes`, 16 values.
    ///
    /// # Safety
    /// As for `signed_lanes`.
    #[inline(always)]
    unsafe fn unsigned_lanes(x: *const f32, inverse: __m512) -> __m512i {
        // SAFETY: the caller's contract.
        unsafe {
            let y = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(x), inverse));
            let magnitude = _mm512_and_si512(y, _mm512_set1_epi32(i32::MAX));
            let t = _mm512_srai_epi32::<20>(_mm512_add_epi32(magnitude, _mm512_set1_epi32(UNSIGNED_ROUND)));
            _mm512_max_epi32(t, _mm512_min_epi32(y, _mm512_set1_epi32(1)))
        }
    }

    #[inline(always)]
    pub(super) fn encode_signed(_: Avx512, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        let n = codes.len().min(values.len());
        let mut j = 0;
        while j + 64 <= n {
            // SAFETY: as in `decode_signed`; `j + 64 <= n` keeps the four 16-float loads and the
            // 64-byte store inside `values` and `codes`.
            unsafe {
                let inverse = _mm512_set1_ps(inverse);
                let x = values.as_ptr().add(j);
                let (a, b) = (signed_lanes(x, inverse), signed_lanes(x.add(16), inverse));
                let (c, d) = (signed_lanes(x.add(32), inverse), signed_lanes(x.add(48), inverse));
                let bytes = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
                let bytes = _mm512_xor_si512(
                    _mm512_permutexvar_epi32(_mm512_loadu_si512(UNPACK_ORDER.as_ptr().cast()), bytes),
                    _mm512_set1_epi8(0x80u8 as i8),
                );
                _mm512_storeu_si512(codes.as_mut_ptr().add(j).cast(), bytes);
            }
            j += 64;
        }
        j
    }

    #[inline(always)]
    pub(super) fn encode_unsigned(_: Avx512, values: &[f32], inverse: f32, codes: &mut [u8]) -> usize {
        let n = codes.len().min(values.len());
        let mut j = 0;
        while j + 64 <= n {
            // SAFETY: as in `encode_signed`.
            unsafe {
                let inverse = _mm512_set1_ps(inverse);
                let x = values.as_ptr().add(j);
                let (a, b) = (unsigned_lanes(x, inverse), unsigned_lanes(x.add(16), inverse));
                let (c, d) = (unsigned_lanes(x.add(32), inverse), unsigned_lanes(x.add(48), inverse));
                let bytes = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
                _mm512_storeu_si512(
                    codes.as_mut_ptr().add(j).cast(),
                    _mm512_permutexvar_epi32(_mm512_loadu_si512(UNPACK_ORDER.as_ptr().cast()), bytes),
                );
            }
            j += 64;
        }
        j
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{dispatch, Kernel, SimdLevel};

    #[test]
    fn every_code_decodes_to_a_value_that_encodes_back_to_it() {
        for c in 0..=255u8 {
            let y = decode_signed(c);
            assert_eq!(encode_signed(y), c, "signed {c}: {y}");
            let y = decode_unsigned(c);
            assert_eq!(encode_unsigned(y), c, "unsigned {c}: {y}");
        }
    }

    #[test]
    fn codes_sort_as_their_values() {
        for c in 0..255u8 {
            assert!(decode_signed(c) <= decode_signed(c + 1));
            assert!(decode_unsigned(c) < decode_unsigned(c + 1));
        }
        assert_eq!((decode_signed(0), decode_signed(255), decode_unsigned(255)), (-1.0, 1.0, 1.0));
    }

    /// The block functions on one SIMD path, through the same trampolines as the kernels.
    enum Blocks<'a> {
        DecodeSigned(&'a [u8], f32, &'a mut [f32]),
        DecodeUnsigned(&'a [u8], f32, &'a mut [f32]),
        EncodeSigned(&'a [f32], f32, &'a mut [u8]),
        EncodeUnsigned(&'a [f32], f32, &'a mut [u8]),
    }

    impl Kernel for Blocks<'_> {
        type Output = ();
        #[inline(always)]
        fn run<I: Isa>(self, isa: I) {
            match self {
                Self::DecodeSigned(c, s, out) => decode_block::<Signed, I>(isa, c, s, out),
                Self::DecodeUnsigned(c, s, out) => decode_block::<Unsigned, I>(isa, c, s, out),
                Self::EncodeSigned(x, inv, out) => encode_block::<Signed, I>(isa, x, inv, out),
                Self::EncodeUnsigned(x, inv, out) => encode_block::<Unsigned, I>(isa, x, inv, out),
            }
        }
    }

    /// Scales and inverses that a hostile state dict or a non-finite grad can bring, and
    /// ordinary ones.
    fn factors() -> Vec<f32> {
        let mut f = vec![
            0.0,
            -0.0,
            1.0,
            0.5,
            3.0,
            1e-3,
            1e30,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            -1.0,
            -2.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1.0 / 3.0,
        ];
        f.extend((0..24).map(|i| f32::from_bits(xorshift(i + 99))));
        f
    }

    fn xorshift(seed: u32) -> u32 {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
        }
        x
    }

    /// Values to encode: every bit pattern class (zeros, subnormals, normals around the codes'
    /// range and above 1, infinities, NaNs of both signs) and a spread of random bit patterns.
    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..=255u8).flat_map(|c| [decode_signed(c), decode_unsigned(c)]).collect();
        let halfway: Vec<f32> = v.windows(2).map(|w| ((w[0] as f64 + w[1] as f64) / 2.0) as f32).collect();
        v.extend(
            halfway
                .iter()
                .flat_map(|&h| [h, f32::from_bits(h.to_bits() + 1), f32::from_bits(h.to_bits().wrapping_sub(1))]),
        );
        v.extend([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.0, -1.0, 1.0625, -1.0625, 1.5, 2.0, 1e30, -1e30]);
        v.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001)]);
        let mut x = 12345u32;
        v.extend((0..6000).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits(x)
        }));
        v
    }

    #[test]
    fn block_decoding_is_the_per_element_decoding_on_every_path() {
        // Every code, at every offset within 8- and 16-wide vectors, with a tail.
        let codes: Vec<u8> = (0..3 * 256 + 13).map(|i| (i * 7 + i / 256) as u8).collect();
        for level in SimdLevel::available() {
            for scale in factors() {
                let (mut signed, mut unsigned) = (vec![0f32; codes.len()], vec![0f32; codes.len()]);
                dispatch(level, Blocks::DecodeSigned(&codes, scale, &mut signed));
                dispatch(level, Blocks::DecodeUnsigned(&codes, scale, &mut unsigned));
                for (i, &c) in codes.iter().enumerate() {
                    let (s, u) = (scaled(decode_signed(c), scale), scaled(decode_unsigned(c), scale));
                    assert_eq!(signed[i].to_bits(), s.to_bits(), "{level} signed code {c} scale {scale:e}");
                    assert_eq!(unsigned[i].to_bits(), u.to_bits(), "{level} unsigned code {c} scale {scale:e}");
                }
            }
        }
    }

    #[test]
    fn block_encoding_is_the_per_element_encoding_on_every_path() {
        let values = values();
        for level in SimdLevel::available() {
            for inverse in factors() {
                let (mut signed, mut unsigned) = (vec![0u8; values.len()], vec![0u8; values.len()]);
                dispatch(level, Blocks::EncodeSigned(&values, inverse, &mut signed));
                dispatch(level, Blocks::EncodeUnsigned(&values, inverse, &mut unsigned));
                for (i, &x) in values.iter().enumerate() {
                    if x.is_nan() && inverse.is_nan() {
                        continue; // which NaN a product of two is, is unspecified (LLVM commutes)
                    }
                    let y = x * inverse;
                    assert_eq!(signed[i], encode_signed(y), "{level} signed {x:e} * {inverse:e} ({:#x})", y.to_bits());
                    assert_eq!(
                        unsigned[i],
                        encode_unsigned(y),
                        "{level} unsigned {x:e} * {inverse:e} ({:#x})",
                        y.to_bits()
                    );
                }
            }
        }
    }

    #[test]
    fn block_functions_write_only_their_slices() {
        for level in SimdLevel::available() {
            for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 127, 128, 129, 255, 256, 257] {
                let codes = vec![200u8; n + 64];
                let values = vec![0.25f32; n + 64];
                let mut floats = vec![-7.0f32; n + 64];
                dispatch(level, Blocks::DecodeSigned(&codes[..n], 1.0, &mut floats[..n]));
                dispatch(level, Blocks::DecodeUnsigned(&codes[..n], 1.0, &mut floats[..n]));
                assert!(floats[n..].iter().all(|&x| x == -7.0), "{level} decode {n}");
                let mut bytes = vec![77u8; n + 64];
                dispatch(level, Blocks::EncodeSigned(&values[..n], 1.0, &mut bytes[..n]));
                dispatch(level, Blocks::EncodeUnsigned(&values[..n], 1.0, &mut bytes[..n]));
                assert!(bytes[n..].iter().all(|&b| b == 77), "{level} encode {n}");
            }
        }
    }
}
