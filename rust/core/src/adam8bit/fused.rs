//! The 8-bit step's update loop in AVX-512, the moments decoded in registers: the generic loop
//! reads them from scratch arrays that the block decoders have just written, and on Zen 4 those
//! two 64-byte stores per 16 elements and their loads cost 12-16% of a float32 step in cache
//! (bfloat16 params' step, bound by its vector work, gained nothing measurable). The operations are `AdamScalars::moments` and
//! `folded_param_update`'s, in the same order and with the same fused multiply-adds, so the
//! results are the generic loop's bit for bit, NaN payloads aside (`tests/adam8bit.rs` compares every
//! SIMD path the host has, every NaN as equal).

use std::arch::x86_64::*;

use super::codes::avx512::{signed_values, unsigned_values};
use super::BlockMoments;
use crate::adam::AdamScalars;
use crate::element::lerp_from_start;
use crate::simd::Avx512;

/// A param or grad type that the loop loads into and stores from 16 float32 lanes itself.
pub(super) trait Lanes: Copy {
    /// # Safety
    /// The CPU has AVX-512 F and BW, and `p` points at 16 readable values.
    unsafe fn load(p: *const Self) -> __m512;
    /// Rounded as `Element::store` rounds.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW, and `p` points at 16 writable values.
    unsafe fn store(p: *mut Self, x: __m512);
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: __m512) {
        // SAFETY: the caller's contract.
        unsafe { _mm512_storeu_ps(p, x) }
    }
}

impl Lanes for half::bf16 {
    #[inline(always)]
    unsafe fn load(p: *const half::bf16) -> __m512 {
        // SAFETY: the caller's contract (16 bf16 are the 32 bytes loaded).
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))) }
    }
    /// `f32_to_bf16_bits`: round to nearest even by adding 0x7fff and the lowest kept bit, NaN
    /// as 0x7fc0.
    #[inline(always)]
    unsafe fn store(p: *mut half::bf16, x: __m512) {
        // SAFETY: the caller's contract (the 32 bytes stored are the 16 bf16).
        unsafe {
            let bits = _mm512_castps_si512(x);
            let lowest_kept = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                bits,
                _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7fff)),
            ));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
            _mm256_storeu_si256(p.cast(), _mm512_cvtepi32_epi16(rounded));
        }
    }
}

/// Updates the longest prefix of whole 16-element vectors of a block as `update_slices` does,
/// with the moments decoded from their codes as `decode_block` decodes them (for scales that
/// `multiplies_like_scaled`); writes the new moments to `m` and `v` for the encoders. Returns
/// the prefix's length and the bits of its largest new magnitudes.
#[inline(always)]
pub(super) fn update_decoding<Q: Lanes, const L2: bool>(
    avx512: Avx512,
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    moments: &mut BlockMoments<'_>,
) -> (usize, u32, u32) {
    // `lerp`'s two sides, chosen once: the weight is the same for every element.
    match lerp_from_start(k.lerp_weight) {
        true => update_loop::<Q, L2, true>(avx512, k, params, grads, moments),
        false => update_loop::<Q, L2, false>(avx512, k, params, grads, moments),
    }
}

#[inline(always)]
fn update_loop<Q: Lanes, const L2: bool, const NEAR_START: bool>(
    _: Avx512,
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    moments: &mut BlockMoments<'_>,
) -> (usize, u32, u32) {
    let BlockMoments { m_codes, m_scale, v_codes, v_scale, m, v } = moments;
    let (m_codes, v_codes, m_scale, v_scale) = (*m_codes, *v_codes, *m_scale, *v_scale);
    let n = params.len().min(grads.len()).min(m_codes.len()).min(v_codes.len()).min(m.len()).min(v.len());
    // SAFETY: an `Avx512` exists only where the CPU has AVX-512 F/BW/VL (`simd.rs`), and this
    // function is inlined into the code compiled for it; `j + 16 <= n` keeps every 16-element
    // load and store inside its slice.
    unsafe {
        let set = _mm512_set1_ps;
        let (param_scale, grad_factor, weight_decay) =
            (set(k.param_scale), set(k.grad.in_place()), set(k.weight_decay));
        let (weight, weight_minus_one) = (set(k.lerp_weight), set(k.lerp_weight - 1.0));
        let (beta2, one_minus_beta2) = (set(k.beta2), set(k.one_minus_beta2));
        let (eps, neg_step_size) = (set(k.eps), set(k.neg_step_size));
        let (m_scale, v_scale) = (set(m_scale), set(v_scale));
        let magnitude = _mm512_set1_epi32(i32::MAX);
        let (mut m_largest, mut v_largest) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut j = 0;
        while j + 16 <= n {
            let m_old = signed_values(m_codes.as_ptr().add(j), m_scale);
            let v_old = unsigned_values(v_codes.as_ptr().add(j), v_scale);
            // `moments`
            let p = _mm512_mul_ps(Q::load(params.as_ptr().add(j)), param_scale);
            let mut g = _mm512_mul_ps(Q::load(grads.as_ptr().add(j)), grad_factor);
            if L2 {
                g = _mm512_fmadd_ps(p, weight_decay, g);
            }
            let diff = _mm512_sub_ps(g, m_old);
            let m_new = match NEAR_START {
                true => _mm512_fmadd_ps(weight, diff, m_old),
                false => _mm512_fmadd_ps(weight_minus_one, diff, g),
            };
            let v_new = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, g), g, _mm512_mul_ps(v_old, beta2));
            // `folded_param_update`: p + (neg_step_size * m) / (sqrt(v) + eps)
            let denominator = _mm512_add_ps(_mm512_sqrt_ps(v_new), eps);
            let p_new = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step_size, m_new), denominator));
            Q::store(params.as_mut_ptr().add(j), p_new);
            _mm512_storeu_ps(m.as_mut_ptr().add(j), m_new);
            _mm512_storeu_ps(v.as_mut_ptr().add(j), v_new);
            m_largest = _mm512_max_epu32(m_largest, _mm512_and_si512(_mm512_castps_si512(m_new), magnitude));
            v_largest = _mm512_max_epu32(v_largest, _mm512_and_si512(_mm512_castps_si512(v_new), magnitude));
            j += 16;
        }
        (j, _mm512_reduce_max_epu32(m_largest), _mm512_reduce_max_epu32(v_largest))
    }
}
