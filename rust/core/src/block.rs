//! Params, grads and state stored in another type than the maths runs in (bfloat16, float16),
//! and the extensions beyond torch's rule (a float32 master copy of each param, stochastic
//! rounding): the kernels convert such buffers a block at a time into scratch arrays in the
//! maths type, run the same loop as on float32 buffers over those, and store the block back,
//! each value rounded once. The block conversions can then use the ISA's conversion
//! instructions (F16C, AVX-512), which a per-element loop cannot reach on stable Rust.

use crate::element::{stochastic_key, Element, Real};
use crate::simd::Isa;
use num_traits::{One, Zero};

/// Elements per block: 5 streams of 256 float32 (5 KiB) stay in L1 between the conversions and
/// the loop.
pub const BLOCK: usize = 256;

/// What a step multiplies each grad by: the factor `clip_grad_norm_` would have scaled it by
/// (`grad_scale`, 1 when nothing is clipped), and -1 with `maximize`. A step with a scale gives
/// the params `clip_grad_norm_` then a step would, without writing the grads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GradFactor<T> {
    sign: T,
    pub scale: T,
}

impl<T: Real> GradFactor<T> {
    pub fn new(maximize: bool, scale: f64) -> Self {
        Self { sign: T::round_from(if maximize { -1.0 } else { 1.0 }), scale: T::round_from(scale) }
    }

    /// The one factor for a grad read from its own buffer in the maths type: `(g * scale) *
    /// sign` is `g * (scale * sign)` exactly, as the sign is +-1.
    #[inline(always)]
    pub fn in_place(self) -> T {
        self.sign * self.scale
    }

    /// The factor for a block that `load_grad_block` has scaled already: the sign alone.
    pub fn for_block(self) -> Self {
        Self { sign: self.sign, scale: T::one() }
    }
}

/// `dst = src` in the maths type, each value multiplied by `scale` and rounded once to the
/// grad's own type, as `clip_grad_norm_` leaves it in the grad (no rounding for float32/64).
#[inline(always)]
pub(crate) fn load_grad_block<P: Element, I: Isa>(isa: I, src: &[P], dst: &mut [P::Math], scale: P::Math) {
    P::load_block(isa, src, dst);
    if scale == P::Math::one() {
        return;
    }
    for x in dst.iter_mut() {
        *x = *x * scale;
    }
    if !P::IS_MATH {
        let mut rounded = [P::store(P::Math::zero()); BLOCK];
        let rounded = &mut rounded[..dst.len()];
        P::store_block(isa, dst, rounded);
        P::load_block(isa, rounded, dst);
    }
}

/// How a step writes the new values of a low-precision param.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rounding {
    /// To nearest, ties to even: torch's rule.
    #[default]
    Nearest,
    /// Up or down at random, with probabilities that make the expected value exact. The bits are
    /// drawn by `element::random_bits(stochastic_key(seed, stream, step), element index)`, so a
    /// run is reproducible and the same for any thread count and SIMD path. `stream` tells the
    /// params of one seed apart.
    Stochastic { seed: u64, stream: u64 },
}

impl Rounding {
    /// The stochastic-rounding key of the step numbered `step` (None: round to nearest).
    pub(crate) fn key(self, step: f64) -> Option<u64> {
        match self {
            Self::Nearest => None,
            // Step counts are whole numbers below 2^53 (torch counts them in floats).
            Self::Stochastic { seed, stream } => Some(stochastic_key(seed, stream, step as u64)),
        }
    }
}

/// The param side of one job: the param, its master copy in the maths type if it has one, and
/// how it is written.
pub(crate) struct ParamOut<'a, P: Element> {
    pub param: &'a mut [P],
    /// The param's unrounded values: the step reads and updates these, and the param is their
    /// rounding.
    pub master: Option<&'a mut [P::Math]>,
    /// This step's stochastic-rounding key (None: nearest).
    pub key: Option<u64>,
    /// The index of `param[0]` in its tensor (the random bits are drawn by element index).
    pub offset: u64,
}

impl<'a, P: Element> ParamOut<'a, P> {
    pub fn new(param: &'a mut [P], master: Option<&'a mut [P::Math]>, key: Option<u64>) -> Self {
        Self { param, master, key, offset: 0 }
    }

    /// Whether the loop can run on the param buffer itself (nothing to convert or copy).
    pub fn is_plain(&self) -> bool {
        P::IS_MATH && self.master.is_none()
    }

    /// The param's elements `start..end` themselves, where a loop can load and store them one
    /// by one: a half-precision param rounded to nearest, without a master copy (the others go
    /// through `block`/`unblock`).
    #[inline(always)]
    pub fn converted_in_place(&mut self, start: usize, end: usize) -> Option<&mut [P]> {
        (!P::IS_MATH && self.master.is_none() && self.key.is_none()).then(|| &mut self.param[start..end])
    }

    pub fn len(&self) -> usize {
        self.param.len()
    }

    pub fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.param.split_at_mut(mid);
        let (m0, m1) = crate::exec::split_opt(self.master, mid);
        let (key, offset) = (self.key, self.offset);
        (Self { param: p0, master: m0, key, offset }, Self { param: p1, master: m1, key, offset: offset + mid as u64 })
    }

    /// Elements `start..end` in the maths type, for the loop to update in place: the master
    /// copy's own (or the param's, stored in the maths type), else the param's converted into
    /// `scratch`. `unblock` then writes the param.
    #[inline(always)]
    pub fn block<'b, I: Isa>(
        &'b mut self,
        isa: I,
        start: usize,
        end: usize,
        scratch: &'b mut [P::Math],
    ) -> &'b mut [P::Math] {
        match &mut self.master {
            Some(master) => &mut master[start..end],
            None if P::IS_MATH => P::as_math_mut(&mut self.param[start..end]).expect("IS_MATH"),
            None => {
                P::load_block(isa, &self.param[start..end], scratch);
                scratch
            }
        }
    }

    /// Writes the param's elements `start..end` from what `block` handed out (`scratch`, or the
    /// master copy), rounded to nearest or stochastically.
    #[inline(always)]
    pub fn unblock<I: Isa>(&mut self, isa: I, start: usize, end: usize, scratch: &[P::Math]) {
        let src: &[P::Math] = match &self.master {
            Some(master) => &master[start..end],
            None if P::IS_MATH => return, // updated in place
            None => scratch,
        };
        let param = &mut self.param[start..end];
        match self.key {
            None => P::store_block(isa, src, param),
            Some(key) => P::store_block_stochastic(isa, src, param, key, self.offset + start as u64),
        }
    }

    /// Writes `src` as elements `start..`: into the master copy as they are, if there is one,
    /// and into the param rounded (to nearest or stochastically).
    #[inline(always)]
    pub fn store<I: Isa>(&mut self, isa: I, start: usize, src: &[P::Math]) {
        let end = start + src.len();
        if let Some(master) = &mut self.master {
            master[start..end].copy_from_slice(src);
        }
        let param = &mut self.param[start..end];
        match self.key {
            None => P::store_block(isa, src, param),
            Some(key) => P::store_block_stochastic(isa, src, param, key, self.offset + start as u64),
        }
    }
}

/// A block of scratch space for one stream, in the maths type.
pub(crate) fn scratch<T: Default + Copy>() -> [T; BLOCK] {
    [T::default(); BLOCK]
}

/// A block of a state buffer in the maths type, for the loop to update in place: the buffer
/// itself where it is stored in the maths type, else its values converted into `scratch`.
#[inline(always)]
pub(crate) fn state_block<'b, S: Element, I: Isa>(
    isa: I,
    buffer: &'b mut [S],
    scratch: &'b mut [S::Math],
) -> &'b mut [S::Math] {
    if S::IS_MATH {
        S::as_math_mut(buffer).expect("IS_MATH")
    } else {
        S::load_block(isa, buffer, scratch);
        scratch
    }
}

/// Stores what `state_block` converted back into the buffer, each value rounded once.
#[inline(always)]
pub(crate) fn state_unblock<S: Element, I: Isa>(isa: I, scratch: &[S::Math], buffer: &mut [S]) {
    if !S::IS_MATH {
        S::store_block(isa, scratch, buffer)
    }
}

/// The block ranges of `n` elements.
pub(crate) fn blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(BLOCK).map(move |start| (start, (start + BLOCK).min(n)))
}

/// One param written from values computed elsewhere (a step torch took on a float32 copy).
pub struct RoundTensor<'a, P: Element> {
    pub param: &'a mut [P],
    pub source: &'a [P::Math],
    pub rounding: Rounding,
    /// The step the values belong to (it keys stochastic rounding).
    pub step: f64,
}

struct RoundJob<'a, P: Element> {
    param: ParamOut<'a, P>,
    source: &'a [P::Math],
}

impl<P: Element> crate::exec::Splittable for RoundJob<'_, P> {
    fn len(&self) -> usize {
        self.param.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.param.split_at(mid);
        let (s0, s1) = self.source.split_at(mid);
        (Self { param: p0, source: s0 }, Self { param: p1, source: s1 })
    }
}

impl<P: Element> crate::simd::Kernel for RoundJob<'_, P> {
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(mut self, isa: I) {
        let source = self.source;
        for (start, end) in blocks(self.param.len()) {
            self.param.store(isa, start, &source[start..end]);
        }
    }
}

/// Writes each param as its source rounded by its `rounding` (the same bits a kernel step with
/// that rounding writes). Checks every length before it writes.
pub fn round_into<P: Element>(tensors: Vec<RoundTensor<'_, P>>, exec: &crate::Executor) -> Result<(), crate::Error> {
    for (i, t) in tensors.iter().enumerate() {
        crate::error::check_len(i, "source", t.param.len(), t.source.len())?;
    }
    let jobs: Vec<RoundJob<'_, P>> = tensors
        .into_iter()
        .map(|t| RoundJob { param: ParamOut::new(t.param, None, t.rounding.key(t.step)), source: t.source })
        .collect();
    let simd = exec.simd();
    exec.for_each_piece(jobs, |job| crate::simd::dispatch(simd, job));
    Ok(())
}
