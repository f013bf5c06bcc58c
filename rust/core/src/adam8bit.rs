//! Adam and AdamW with block-wise 8-bit states (`rsoptim.Adam8bit`/`AdamW8bit`): each moment is
//! kept as one byte per element and one float32 scale (the largest magnitude) per block of
//! [`QUANT_BLOCK`] elements, as in Dettmers et al.'s block-wise quantization. A step decodes a
//! block of both moments into float32, updates the moments as torch's Adam does (the loop of
//! `adam`) and the param with the second moment's bias correction folded into the step size and
//! eps, as bitsandbytes does (`AdamScalars::per_step`, folded: one division fewer per element),
//! takes the new scales and encodes the block back: one pass over the memory, 16 bytes per
//! float32 element instead of Adam's 28.
//!
//! The codes are small floats read straight off float32 bit patterns (see [`codes`]), so that
//! encoding and decoding are a few integer operations per 8 values (AVX2 or AVX-512 intrinsics on x86-64,
//! the per-element functions elsewhere), with exactly the same results on every SIMD path
//! (bitsandbytes' decimal "dynamic" map needs a search per value, which costs more than the
//! whole memory-bound step on a CPU).

use crate::adam::{AdamHyper, AdamScalars, NATIVE};
use crate::block::{load_grad_block, scratch, ParamOut, Rounding, BLOCK};
use crate::element::Element;
use crate::error::{check_len, Error};
use crate::exec::{Executor, Splittable};
use crate::simd::{dispatch, Isa, Kernel};
use crate::step::StepCount;
use crate::subnormal::Native;

/// Elements per quantization block: one float32 scale per moment each (0.03 bytes per element).
pub const QUANT_BLOCK: usize = BLOCK;

/// The number of quantization blocks (and scales per moment) of a tensor of `numel` elements.
pub fn quant_blocks(numel: usize) -> usize {
    numel.div_ceil(QUANT_BLOCK)
}

pub mod codes;
use codes::{Signed, Unsigned};
#[cfg(target_arch = "x86_64")]
mod fused;

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

/// The kernel, specialised on L2 decay.
struct Adam8bitKernel<'a, P: Element<Math = f32>, const L2: bool>(Adam8bitJob<'a, P>);

impl<P: Element<Math = f32>, const L2: bool> Kernel for Adam8bitKernel<'_, P, L2> {
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Adam8bitJob { mut param, grad, m_codes, v_codes, m_scales, v_scales, k } = self.0;
        let (mut p, mut g, mut m, mut v) = (scratch(), scratch(), scratch(), scratch());
        let read = [Buffer::of(grad), Buffer::of(&*param.param), Buffer::of(&*m_codes), Buffer::of(&*v_codes)];
        let read = Ahead::job(read, param.master.as_deref().map(Buffer::of));
        for (b, start) in (0..param.len()).step_by(QUANT_BLOCK).enumerate() {
            let end = (start + QUANT_BLOCK).min(param.len());
            let len = end - start;
            let ahead = read.at(start + PREFETCH_AHEAD, param.len());
            let (m, v) = (&mut m[..len], &mut v[..len]);
            let (m_codes, v_codes) = (&mut m_codes[start..end], &mut v_codes[start..end]);
            let unscaled = k.grad_scale() == 1.0;
            let moments = BlockMoments { m_codes, m_scale: m_scales[b], v_codes, v_scale: v_scales[b], m, v };
            let (m_largest, v_largest) = match param.converted_in_place(start, end) {
                // Half-precision params and grads, nothing to scale, rounded to nearest: loaded
                // and stored by the loop itself, no pass over a copy of each (about a third of
                // such a step in cache). The same bits as the copies': loads are exact and
                // stores round as `store_block` does on every SIMD path (`fused::Lanes::store`
                // on AVX-512).
                Some(params) if unscaled => {
                    decode_and_update::<P, L2, I>(isa, &k, params, &grad[start..end], moments, &ahead)
                }
                _ => {
                    // float32 grads are read where they are, the grad factor applied as they
                    // are read; half-precision ones are scaled and rounded a block at a time,
                    // as clipping leaves them.
                    let (grads, k) = match P::as_math(&grad[start..end]) {
                        Some(grads) => (grads, k),
                        None => {
                            load_grad_block(isa, &grad[start..end], &mut g[..len], k.grad_scale());
                            (&g[..len], k.for_block())
                        }
                    };
                    let params = param.block(isa, start, end, &mut p[..len]);
                    let largest = decode_and_update::<f32, L2, I>(isa, &k, params, grads, moments, &ahead);
                    param.unblock(isa, start, end, &p[..len]);
                    largest
                }
            };
            // The largest magnitudes are the new scales.
            let (m_scale, v_scale) = (f32::from_bits(m_largest), f32::from_bits(v_largest));
            codes::encode_block::<Signed, I>(isa, m, inverse(m_scale), m_codes);
            codes::encode_block::<Unsigned, I>(isa, v, inverse(v_scale), v_codes);
            (m_scales[b], v_scales[b]) = (m_scale, v_scale);
        }
    }
}

/// How many elements ahead of the block it is updating the step asks for the memory it will
/// read next. On a 2-core Xeon the hardware prefetchers alone left the step on GPT-2 small's
/// 124M elements (2 threads) at 73-75 ms, where its bytes' roofline is 45 ms and its work in
/// cache 43 ms: the core waited for memory, then computed. Asking 256 to 2048 elements ahead
/// gave 53-57 ms (1024: 53-55); in cache it costs nothing measurable.
const PREFETCH_AHEAD: usize = 1024;

/// One buffer a step reads: where it starts and its element size in bytes.
#[derive(Clone, Copy)]
struct Buffer {
    start: *const u8,
    element_size: usize,
}

impl Buffer {
    fn of<T>(buffer: &[T]) -> Self {
        Self { start: buffer.as_ptr().cast(), element_size: std::mem::size_of::<T>() }
    }
}

/// The buffers a block's step reads, each at the element `PREFETCH_AHEAD` further on, to be
/// prefetched while the block is updated. Only addresses are kept and only prefetched
/// (`simd::prefetch`, which is safe for any address), so they are computed with wrapping
/// arithmetic and never dereferenced.
pub(crate) struct Ahead {
    buffers: [Buffer; 5],
    count: usize,
}

impl Ahead {
    /// A job's buffers at its element 0: its grad, param, codes, and master copy if any.
    fn job([grad, param, m_codes, v_codes]: [Buffer; 4], master: Option<Buffer>) -> Self {
        let unused = Buffer { start: std::ptr::null(), element_size: 0 };
        Self {
            buffers: [grad, param, m_codes, v_codes, master.unwrap_or(unused)],
            count: 4 + usize::from(master.is_some()),
        }
    }

    /// The same buffers at element `at`; none where `at` is past the job's `len` elements.
    fn at(&self, at: usize, len: usize) -> Self {
        let mut ahead = Self { buffers: self.buffers, count: 0 };
        if at < len {
            for b in &mut ahead.buffers[..self.count] {
                b.start = b.start.wrapping_add(at * b.element_size);
            }
            ahead.count = self.count;
        }
        ahead
    }

    /// Prefetches each buffer's line that starts at element `i` from the ahead position, if
    /// one does (a loop that reads 16 elements a turn calls it once a turn: each line is asked
    /// for once).
    #[inline(always)]
    pub(crate) fn element(&self, i: usize) {
        for b in &self.buffers[..self.count] {
            debug_assert!(b.element_size * 16 <= 64, "a turn of 16 elements spans at most a line");
            crate::simd::prefetch_once_per_line(b.start, i * b.element_size);
        }
    }

    /// Prefetches every line of elements `0..len` from the ahead position.
    fn elements(&self, len: usize) {
        for b in &self.buffers[..self.count] {
            for offset in (0..len * b.element_size).step_by(64) {
                crate::simd::prefetch(b.start.wrapping_add(offset));
            }
        }
    }
}

/// A block's moments as stored (codes and scale each), and where the update writes the new
/// moments in float32 for the encoders.
pub(crate) struct BlockMoments<'a> {
    pub m_codes: &'a [u8],
    pub m_scale: f32,
    pub v_codes: &'a [u8],
    pub v_scale: f32,
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
}

/// Decodes a block's moments into `m` and `v` and updates them and the params
/// (`update_block`); where the CPU has AVX-512 and the params and grads are float32 or
/// bfloat16, the block is decoded in registers instead (`fused`), with the same bits.
/// Returns the bits of the largest new magnitudes.
#[inline(always)]
fn decode_and_update<Q: Element<Math = f32>, const L2: bool, I: Isa>(
    isa: I,
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    mut moments: BlockMoments<'_>,
    ahead: &Ahead,
) -> (u32, u32) {
    if let Some(largest) = update_decoding_in_registers::<Q, L2, I>(isa, k, params, grads, &mut moments, ahead) {
        return largest;
    }
    // The other loops are each a pass over the block: the block ahead is asked for at once.
    ahead.elements(params.len());
    let BlockMoments { m_codes, m_scale, v_codes, v_scale, m, v } = moments;
    codes::decode_block::<Signed, I>(isa, m_codes, m_scale, m);
    codes::decode_block::<Unsigned, I>(isa, v_codes, v_scale, v);
    update_block::<Q, L2>(k, params, grads, m, v)
}

/// `fused::update_decoding` where it applies (the whole block updated); else None, nothing done.
#[inline(always)]
fn update_decoding_in_registers<Q: Element<Math = f32>, const L2: bool, I: Isa>(
    isa: I,
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    moments: &mut BlockMoments<'_>,
    ahead: &Ahead,
) -> Option<(u32, u32)> {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx512) = isa.avx512() {
        if codes::multiplies_like_scaled(moments.m_scale) && codes::multiplies_like_scaled(moments.v_scale) {
            if let (Some(params), Some(grads)) = (Q::as_math_mut(params), Q::as_math(grads)) {
                return Some(fused::update_decoding::<f32, L2>(avx512, k, params, grads, moments, ahead));
            }
            if let (Some(params), Some(grads)) = (Q::as_bf16_mut(params), Q::as_bf16(grads)) {
                return Some(fused::update_decoding::<half::bf16, L2>(avx512, k, params, grads, moments, ahead));
            }
        }
    }
    let _ = (isa, k, params, grads, moments, ahead);
    None
}

/// Adam's float32 update of one block in place, the moments decoded into `m` and `v` (the
/// moments in torch's order of operations, the param's with the folded correction); params and grads are loaded into float32 and the params
/// stored back (copies for float32). Returns the bits of the largest new magnitudes (see
/// `magnitude_bits`).
#[inline(always)]
fn update_block<Q: Element<Math = f32>, const L2: bool>(
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    m: &mut [f32],
    v: &mut [f32],
) -> (u32, u32) {
    // A whole block (all but a tensor's last) is updated by a loop of known length, which LLVM
    // vectorises without a scalar tail.
    if params.len() == QUANT_BLOCK {
        return update_slices::<Q, L2>(k, &mut params[..QUANT_BLOCK], &grads[..QUANT_BLOCK], m, v);
    }
    update_slices::<Q, L2>(k, params, grads, m, v)
}

#[inline(always)]
fn update_slices<Q: Element<Math = f32>, const L2: bool>(
    k: &AdamScalars<f32>,
    params: &mut [Q],
    grads: &[Q],
    m: &mut [f32],
    v: &mut [f32],
) -> (u32, u32) {
    let n = params.len();
    let (grads, m, v) = (&grads[..n], &mut m[..n], &mut v[..n]);
    let (mut m_largest, mut v_largest) = (0, 0);
    for i in 0..n {
        let (p_new, m_new, v_new) =
            k.moments::<L2, Native, Native>(NATIVE, params[i].load(), grads[i].load(), m[i], v[i]);
        params[i] = Q::store(k.folded_param_update(p_new, m_new, v_new));
        (m[i], v[i]) = (m_new, v_new);
        m_largest = m_largest.max(magnitude_bits(m_new));
        v_largest = v_largest.max(magnitude_bits(v_new));
    }
    (m_largest, v_largest)
}

/// The bits of `|x|`. Magnitudes sort as these do, so the largest magnitude of a block is an
/// integer maximum, and a NaN, whose bits are above infinity's, wins as it does in `torch.max`.
#[inline(always)]
fn magnitude_bits(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// What a block's values are multiplied by to be encoded: `1 / scale`. A block of zeros has
/// scale 0 and decodes to zeros; a non-finite scale makes the whole block decode to non-finite
/// values (a NaN or infinity spreads to its block).
#[inline(always)]
fn inverse(scale: f32) -> f32 {
    if scale > 0.0 {
        1.0 / scale
    } else {
        0.0
    }
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
    let mut scalars = AdamScalars::per_step(hyper, true);
    let jobs: Vec<Adam8bitJob<'_, P>> = tensors
        .into_iter()
        .map(|mut t| {
            let step = t.step.increment();
            Adam8bitJob {
                k: scalars(step),
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
