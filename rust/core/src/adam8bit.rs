//! Adam and AdamW with block-wise 8-bit states (`rsoptim.Adam8bit`/`AdamW8bit`): each moment is
//! kept as one byte per element and one float32 scale (the largest magnitude) per block of
//! [`QUANT_BLOCK`] elements, as in Dettmers et al.'s block-wise quantization. A step decodes a
//! block of both moments into float32, runs Adam's float32 update on it in torch's order of
//! operations (the loop of `adam`), takes the new scales and encodes the block back: one pass
//! over the memory, 16 bytes per float32 element instead of Adam's 28.
//!
//! The codes are small floats read straight off float32 bit patterns (see [`codes`]), so that
//! encoding and decoding are a few integer operations that vectorise on every SIMD path with
//! exactly the same results (bitsandbytes' decimal "dynamic" map needs a search per value, which
//! costs more than the whole memory-bound step on a CPU).

use crate::adam::{AdamHyper, AdamScalars};
use crate::block::{load_grad_block, scratch, ParamOut, Rounding, BLOCK};
use crate::element::Element;
use crate::error::{check_len, Error};
use crate::exec::{Executor, Splittable};
use crate::simd::{dispatch, Isa, Kernel};
use crate::step::StepCount;

/// Elements per quantization block: one float32 scale per moment each (0.03 bytes per element).
pub const QUANT_BLOCK: usize = BLOCK;

/// The number of quantization blocks (and scales per moment) of a tensor of `numel` elements.
pub fn quant_blocks(numel: usize) -> usize {
    numel.div_ceil(QUANT_BLOCK)
}

/// The 8-bit codes. A value is encoded relative to its block's scale (`y = x / scale`, so
/// `|y| <= 1`): the code keeps its float32 exponent and the top 3 bits of its mantissa, rounded
/// to nearest (ties away from zero) by adding half a unit before truncating, so that code order
/// is value order and 1.0 has a code of its own.
///
/// - First moment, signed: 127 magnitudes from 2^-16 * 1.25 to 1.0 (4.7 decades, 8 per
///   binade) and zero, each with a sign: code 0 is -1.0, 127 is -0.0, 128 is +0.0, 255 is +1.0.
/// - Second moment, unsigned: 255 values from 2^-32 * 1.25 to 1.0 (9.5 decades) and zero.
///
/// Magnitudes below the smallest code's lower half-unit become zero, except positive second
/// moments, which take the smallest code. Decoding is exact.
///
/// The second moment gets twice the first's range in binades because it is a square: an element
/// whose grads are too small for its block's second-moment codes has a first moment too small
/// for the first-moment codes too. With a narrower second-moment range, a grad that stops would
/// leave a first moment over a zero second moment: an update of `lr * m / eps`.
pub mod codes {
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
}

/// One param's buffers: the param and grad, each moment's codes (one per element) and scales
/// (one per [`QUANT_BLOCK`] elements, [`quant_blocks`] of them), the step count, and as for
/// [`crate::AdamTensor`] an optional float32 master copy and the rounding of half-precision
/// params.
pub struct Adam8bitTensor<'a, P: Element<Math = f32>> {
    pub param: &'a mut [P],
    pub grad: &'a [P],
    pub exp_avg_codes: &'a mut [u8],
    pub exp_avg_sq_codes: &'a mut [u8],
    pub exp_avg_scales: &'a mut [f32],
    pub exp_avg_sq_scales: &'a mut [f32],
    pub step: StepCount<'a>,
    pub master_param: Option<&'a mut [f32]>,
    pub rounding: Rounding,
}

struct Adam8bitJob<'a, P: Element<Math = f32>> {
    param: ParamOut<'a, P>,
    grad: &'a [P],
    m_codes: &'a mut [u8],
    v_codes: &'a mut [u8],
    m_scales: &'a mut [f32],
    v_scales: &'a mut [f32],
    k: AdamScalars<f32>,
}

impl<P: Element<Math = f32>> Splittable for Adam8bitJob<'_, P> {
    fn len(&self) -> usize {
        self.param.len()
    }

    /// Splits at a block boundary: the executor cuts at multiples of 1024 elements.
    fn split_at(self, mid: usize) -> (Self, Self) {
        assert_eq!(mid % QUANT_BLOCK, 0, "8-bit states split only between blocks");
        let block = mid / QUANT_BLOCK;
        let (p0, p1) = self.param.split_at(mid);
        let (g0, g1) = self.grad.split_at(mid);
        let (m0, m1) = self.m_codes.split_at_mut(mid);
        let (v0, v1) = self.v_codes.split_at_mut(mid);
        let (ms0, ms1) = self.m_scales.split_at_mut(block);
        let (vs0, vs1) = self.v_scales.split_at_mut(block);
        let k = self.k;
        (
            Self { param: p0, grad: g0, m_codes: m0, v_codes: v0, m_scales: ms0, v_scales: vs0, k },
            Self { param: p1, grad: g1, m_codes: m1, v_codes: v1, m_scales: ms1, v_scales: vs1, k },
        )
    }
}

struct Adam8bitKernel<'a, P: Element<Math = f32>, const L2: bool>(Adam8bitJob<'a, P>);

impl<P: Element<Math = f32>, const L2: bool> Kernel for Adam8bitKernel<'_, P, L2> {
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Adam8bitJob { mut param, grad, m_codes, v_codes, m_scales, v_scales, k } = self.0;
        let (mut p, mut g, mut m, mut v) = (scratch(), scratch(), scratch(), scratch());
        for (b, start) in (0..param.len()).step_by(QUANT_BLOCK).enumerate() {
            let end = (start + QUANT_BLOCK).min(param.len());
            let len = end - start;
            let (m, v) = (&mut m[..len], &mut v[..len]);
            let (m_codes, v_codes) = (&mut m_codes[start..end], &mut v_codes[start..end]);
            // float32 grads are read where they are, the grad factor applied as they are read;
            // half-precision ones are scaled and rounded a block at a time, as clipping leaves them.
            let (grads, k) = match P::as_math(&grad[start..end]) {
                Some(grads) => (grads, k),
                None => {
                    load_grad_block(isa, &grad[start..end], &mut g[..len], k.grad_scale());
                    (&g[..len], k.for_block())
                }
            };
            let params = param.block(isa, start, end, &mut p[..len]);
            let (m_scale, v_scale) = (m_scales[b], v_scales[b]);
            // The moments are decoded as they are read, and kept unrounded for the encoding; the
            // largest magnitudes are taken on the way, on the bit patterns (see `largest`).
            let (mut m_largest, mut v_largest) = (0, 0);
            for i in 0..len {
                let m_old = scaled(codes::decode_signed(m_codes[i]), m_scale);
                let v_old = scaled(codes::decode_unsigned(v_codes[i]), v_scale);
                let (p_new, m_new, v_new) = k.moments::<L2>(params[i], grads[i], m_old, v_old);
                params[i] = k.param_update(p_new, m_new, v_new);
                (m[i], v[i]) = (m_new, v_new);
                m_largest = m_largest.max(magnitude_bits(m_new));
                v_largest = v_largest.max(magnitude_bits(v_new));
            }
            param.unblock(isa, start, end, &p[..len]);
            m_scales[b] = encode_block(m, f32::from_bits(m_largest), m_codes, codes::encode_signed);
            v_scales[b] = encode_block(v, f32::from_bits(v_largest), v_codes, codes::encode_unsigned);
        }
    }
}

/// A decoded value times its block's scale; zero stays zero whatever the scale (an infinite
/// scale, from one element whose square overflowed, leaves the block's zeros zero, not NaN).
#[inline(always)]
fn scaled(decoded: f32, scale: f32) -> f32 {
    if decoded == 0.0 {
        decoded
    } else {
        decoded * scale
    }
}

/// The bits of `|x|`. Magnitudes sort as these do, so the largest magnitude of a block is an
/// integer maximum, and a NaN, whose bits are above infinity's, wins as it does in `torch.max`.
#[inline(always)]
fn magnitude_bits(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// Encodes `values` relative to `scale`, their largest magnitude, and returns it (the block's
/// scale). A block of zeros has scale 0 and decodes to zeros; a non-finite scale makes the
/// whole block decode to non-finite values (a NaN or infinity spreads to its block).
#[inline(always)]
fn encode_block(values: &[f32], scale: f32, codes: &mut [u8], encode: impl Fn(f32) -> u8) -> f32 {
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (c, &x) in codes.iter_mut().zip(values) {
        *c = encode(x * inverse);
    }
    scale
}

fn check<P: Element<Math = f32>>(tensors: &[Adam8bitTensor<'_, P>], h: &AdamHyper) -> Result<(), Error> {
    if h.amsgrad {
        return Err(Error::InvalidArgument("amsgrad is not supported with 8-bit states".into()));
    }
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        check_len(i, "grad", n, t.grad.len())?;
        check_len(i, "exp_avg codes", n, t.exp_avg_codes.len())?;
        check_len(i, "exp_avg_sq codes", n, t.exp_avg_sq_codes.len())?;
        check_len(i, "exp_avg scales (one per block)", quant_blocks(n), t.exp_avg_scales.len())?;
        check_len(i, "exp_avg_sq scales (one per block)", quant_blocks(n), t.exp_avg_sq_scales.len())?;
        if let Some(master) = &t.master_param {
            check_len(i, "master_param", n, master.len())?;
        }
    }
    Ok(())
}

/// One Adam/AdamW step with 8-bit states over every tensor of a param group: increments each
/// tensor's step count and updates its param, codes and scales in place. Checks every length
/// before it writes anything. The result is the same for any thread count and SIMD path.
pub fn adam8bit_step<P: Element<Math = f32>>(
    tensors: Vec<Adam8bitTensor<'_, P>>,
    hyper: &AdamHyper,
    exec: &Executor,
) -> Result<(), Error> {
    check(&tensors, hyper)?;
    let jobs: Vec<Adam8bitJob<'_, P>> = tensors
        .into_iter()
        .map(|mut t| {
            let step = t.step.increment();
            Adam8bitJob {
                k: AdamScalars::new(hyper, step),
                param: ParamOut::new(t.param, t.master_param, t.rounding.key(step)),
                grad: t.grad,
                m_codes: t.exp_avg_codes,
                v_codes: t.exp_avg_sq_codes,
                m_scales: t.exp_avg_scales,
                v_scales: t.exp_avg_sq_scales,
            }
        })
        .collect();
    let l2 = hyper.weight_decay != 0.0 && !hyper.decoupled_weight_decay;
    let simd = exec.simd();
    exec.for_each_piece(jobs, |job| match l2 {
        false => dispatch(simd, Adam8bitKernel::<P, false>(job)),
        true => dispatch(simd, Adam8bitKernel::<P, true>(job)),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::codes::*;

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
}
