//! The 8-bit step's update loop in AVX-512, the moments decoded in registers: the generic loop
//! reads them from scratch arrays that the block decoders have just written, and on Zen 4 those
//! two 64-byte stores per 16 elements and their loads cost 12-16% of a float32 step in cache
//! (bfloat16 params' step, bound by its vector work, gained nothing measurable). The operations
//! are `AdamScalars::moments` and `folded_param_update`'s, in the same order and with the same
//! fused multiply-adds, so the results are the scalar path's bit for bit, NaN payloads included
//! (`tests/adam8bit.rs`): a block's last, partial vector is done here too, under a mask, since
//! LLVM compiles the generic loop for such a short slice with the final add's operands swapped.

use std::arch::x86_64::*;

use super::codes::avx512::{signed_values, unsigned_values};
use super::{Ahead, BlockMoments};
use crate::adam::AdamScalars;
use crate::element::lerp_from_start;
use crate::simd::Avx512;

/// A param or grad type that the loop loads into and stores from 16 float32 lanes itself: all
/// 16, or (for a block's last, partial vector) the lanes of a mask, the others neither read nor
/// written (masked-off lanes cannot fault). Masked loads and stores only where needed: on Zen 4
/// a loop of them took 0.68 ns per element against 0.59 (float32 params, in cache).
pub(super) trait Lanes: Copy {
    /// Lanes outside `mask` are zero.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL, and `p` points at readable values in every lane of
    /// `mask` (all 16 for None).
    unsafe fn load(p: *const Self, mask: Option<__mmask16>) -> __m512;
    /// Rounded as `Element::store` rounds.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL, and `p` points at writable values in every lane of
    /// `mask` (all 16 for None).
    unsafe fn store(p: *mut Self, mask: Option<__mmask16>, x: __m512);
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32, mask: Option<__mmask16>) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            match mask {
                None => _mm512_loadu_ps(p),
                Some(mask) => _mm512_maskz_loadu_ps(mask, p),
            }
        }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, mask: Option<__mmask16>, x: __m512) {
        // SAFETY: the caller's contract.
        unsafe {
            match mask {
                None => _mm512_storeu_ps(p, x),
                Some(mask) => _mm512_mask_storeu_ps(p, mask, x),
            }
        }
    }
}

impl Lanes for half::bf16 {
    #[inline(always)]
    unsafe fn load(p: *const half::bf16, mask: Option<__mmask16>) -> __m512 {
        // SAFETY: the caller's contract (a lane is 2 bytes).
        unsafe {
            let halves = match mask {
                None => _mm256_loadu_si256(p.cast()),
                Some(mask) => _mm256_maskz_loadu_epi16(mask, p.cast()),
            };
            let bits = _mm512_cvtepu16_epi32(halves);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
        }
    }
    /// `f32_to_bf16_bits`: round to nearest even by adding 0x7fff and the lowest kept bit, NaN
    /// as 0x7fc0.
    #[inline(always)]
    unsafe fn store(p: *mut half::bf16, mask: Option<__mmask16>, x: __m512) {
        // SAFETY: the caller's contract (a lane is 2 bytes).
        unsafe {
            let bits = _mm512_castps_si512(x);
            let lowest_kept = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                bits,
                _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7fff)),
            ));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
            let halves = _mm512_cvtepi32_epi16(rounded);
            match mask {
                None => _mm256_storeu_si256(p.cast(), halves),
                Some(mask) => _mm256_mask_storeu_epi16(p.cast(), mask, halves),
            }
        }
    }
}

/// Updates a block as `update_slices` does, with the moments decoded from their codes as
/// `decode_block` decodes them (for scales that `multiplies_like_scaled`); writes the new
/// moments to `m` and `v` for the encoders. Returns the bits of the largest new magnitudes.
#[inline(always)]
pub(super) fn update_decoding<Q: Lanes, const L2: bool>(
    avx512: Avx512,
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    moments: &mut BlockMoments<'_>,
    ahead: &Ahead,
) -> (u32, u32) {
    // `lerp`'s two sides, chosen once: the weight is the same for every element.
    match lerp_from_start(k.lerp_weight) {
        true => update_loop::<Q, L2, true>(avx512, k, params, grads, moments, ahead),
        false => update_loop::<Q, L2, false>(avx512, k, params, grads, moments, ahead),
    }
}

#[inline(always)]
fn update_loop<Q: Lanes, const L2: bool, const NEAR_START: bool>(
    _: Avx512,
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    moments: &mut BlockMoments<'_>,
    ahead: &Ahead,
) -> (u32, u32) {
    let lengths = &*moments;
    let n = params.len().min(grads.len()).min(lengths.m_codes.len()).min(lengths.v_codes.len());
    let n = n.min(lengths.m.len()).min(lengths.v.len());
    // SAFETY: an `Avx512` exists only where the CPU has AVX-512 F/BW/VL (`simd.rs`), and this
    // function is inlined into the code compiled for it; the whole vectors end at or below `n`
    // (`j + 16 <= n`), and the last one's mask keeps only the lanes below `n`.
    unsafe {
        let c = Broadcast::new(k, moments.m_scale, moments.v_scale);
        let mut largest = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut j = 0;
        while j + 16 <= n {
            // The memory of the turns ahead is asked for a turn at a time, spread through the
            // loop (a burst at each block's start gained half as much).
            ahead.element(j);
            update_vector::<Q, L2, NEAR_START>(&c, j, None, params, grads, moments, &mut largest);
            j += 16;
        }
        if j < n {
            let mask = (1 << (n - j)) - 1;
            update_vector::<Q, L2, NEAR_START>(&c, j, Some(mask), params, grads, moments, &mut largest);
        }
        (_mm512_reduce_max_epu32(largest.0), _mm512_reduce_max_epu32(largest.1))
    }
}

/// The update's scalars and the block's scales, each in all 16 lanes.
struct Broadcast {
    param_scale: __m512,
    grad_factor: __m512,
    weight_decay: __m512,
    weight: __m512,
    weight_minus_one: __m512,
    beta2: __m512,
    one_minus_beta2: __m512,
    eps: __m512,
    neg_step_size: __m512,
    m_scale: __m512,
    v_scale: __m512,
}

impl Broadcast {
    /// # Safety
    /// The CPU has AVX-512 F.
    #[inline(always)]
    unsafe fn new(k: &AdamScalars<f32>, m_scale: f32, v_scale: f32) -> Self {
        // SAFETY: the caller's contract.
        unsafe {
            let set = _mm512_set1_ps;
            Self {
                param_scale: set(k.param_scale),
                grad_factor: set(k.grad.in_place()),
                weight_decay: set(k.weight_decay),
                weight: set(k.lerp_weight),
                weight_minus_one: set(k.lerp_weight - 1.0),
                beta2: set(k.beta2),
                one_minus_beta2: set(k.one_minus_beta2),
                eps: set(k.eps),
                neg_step_size: set(k.neg_step_size),
                m_scale: set(m_scale),
                v_scale: set(v_scale),
            }
        }
    }
}

/// Updates the 16 elements from `at`, or with a mask only its lanes (a block's last, partial
/// vector), and takes their new moments' magnitudes into `largest`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; the 16 elements from `at` (those of `mask`) are inside
/// every slice.
#[inline(always)]
unsafe fn update_vector<Q: Lanes, const L2: bool, const NEAR_START: bool>(
    c: &Broadcast,
    at: usize,
    mask: Option<__mmask16>,
    params: &mut [Q],
    grads: &[Q],
    moments: &mut BlockMoments<'_>,
    largest: &mut (__m512i, __m512i),
) {
    // SAFETY: the caller's contract.
    unsafe {
        let (m_codes, v_codes) = (moments.m_codes.as_ptr().add(at).cast(), moments.v_codes.as_ptr().add(at).cast());
        let (m_codes, v_codes) = match mask {
            None => (_mm_loadu_si128(m_codes), _mm_loadu_si128(v_codes)),
            Some(mask) => (_mm_maskz_loadu_epi8(mask, m_codes.cast()), _mm_maskz_loadu_epi8(mask, v_codes.cast())),
        };
        let m_old = signed_values(m_codes, c.m_scale);
        let v_old = unsigned_values(v_codes, c.v_scale);
        // `moments`
        let p = _mm512_mul_ps(Q::load(params.as_ptr().add(at), mask), c.param_scale);
        let mut g = _mm512_mul_ps(Q::load(grads.as_ptr().add(at), mask), c.grad_factor);
        if L2 {
            g = _mm512_fmadd_ps(p, c.weight_decay, g);
        }
        let diff = _mm512_sub_ps(g, m_old);
        let m_new = match NEAR_START {
            true => _mm512_fmadd_ps(c.weight, diff, m_old),
            false => _mm512_fmadd_ps(c.weight_minus_one, diff, g),
        };
        let v_new = _mm512_fmadd_ps(_mm512_mul_ps(c.one_minus_beta2, g), g, _mm512_mul_ps(v_old, c.beta2));
        // `folded_param_update`: p + (neg_step_size * m) / (sqrt(v) + eps)
        let denominator = _mm512_add_ps(_mm512_sqrt_ps(v_new), c.eps);
        let p_new = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(c.neg_step_size, m_new), denominator));
        Q::store(params.as_mut_ptr().add(at), mask, p_new);
        f32::store(moments.m.as_mut_ptr().add(at), mask, m_new);
        f32::store(moments.v.as_mut_ptr().add(at), mask, v_new);
        // `magnitude_bits`; the lanes outside a mask hold zeros' updates, not the block's.
        let magnitude = _mm512_set1_epi32(i32::MAX);
        let lanes = mask.unwrap_or(!0);
        let (m_bits, v_bits) = (_mm512_castps_si512(m_new), _mm512_castps_si512(v_new));
        largest.0 = _mm512_mask_max_epu32(largest.0, lanes, largest.0, _mm512_and_si512(m_bits, magnitude));
        largest.1 = _mm512_mask_max_epu32(largest.1, lanes, largest.1, _mm512_and_si512(v_bits, magnitude));
    }
}
