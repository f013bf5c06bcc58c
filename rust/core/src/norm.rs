//! Gradient norms and the in-place scale of `clip_grad_norm_`.
//!
//! A tensor's norm is reduced over fixed `CHUNK`-sized chunks, each summed in 32 fixed lanes and
//! accumulated in `f64`; chunks are combined in order. The result is therefore the same for any
//! thread count and any SIMD path (the lanes are the same on every path).
//!
//! torch computes a float32 tensor's norm in float32, so its range is float32's: squares that
//! overflow make the norm inf, squares that underflow count as 0, and a sum past `f32::MAX` is
//! inf. We keep that range (each term `|x|^p` is rounded to the tensor's type, and a sum that
//! rounds to inf in it makes the norm inf) but keep the `f64` sum, which is more accurate than
//! torch's and, unlike a float32 sum, independent of how torch happens to vectorise it.

use crate::element::{Element, Real};
use crate::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::exec::{Executor, Splittable, CHUNK};
use crate::simd::{dispatch, Isa, Kernel, SimdLevel};

/// Which vector norm: `sum(|x|^p)^(1/p)`, with `Inf` the largest `|x|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormType {
    One,
    Two,
    Inf,
    /// Any other finite `p > 0`.
    P(f64),
}

impl NormType {
    /// The norm for torch's `norm_type`; `p <= 0` and NaN are refused.
    pub fn from_p(p: f64) -> Result<Self, Error> {
        match p {
            1.0 => Ok(Self::One),
            2.0 => Ok(Self::Two),
            f64::INFINITY => Ok(Self::Inf),
            p if p.is_finite() && p > 0.0 => Ok(Self::P(p)),
            p => Err(Error::InvalidArgument(format!("norm_type must be > 0 (or inf), got {p}"))),
        }
    }
}

/// Accumulators per chunk: 4 streams of 8 lanes.
const STREAMS: usize = 4;
const WIDTH: usize = 8;
const LANES: usize = STREAMS * WIDTH;
/// How far ahead of its reads each stream asks for its memory. On a 2-core Xeon, GPT-2 small's
/// grads (124M float32, 2 threads, builds alternated): 19.1-20.6 ms for the norm without, 17.0-17.5
/// ms at 2 KiB, 16.8-17.7 at 1 KiB, 17.8-18.8 at 4 KiB; 22 ms at 32 KiB in an earlier sweep.
const PREFETCH_AHEAD_BYTES: usize = 2048;

/// `combine` over `f(x)` for every element, in `LANES` independent accumulators folded pairwise.
/// Each `f(x)` is rounded to `E::Math` first (torch computes a tensor's norm in its dtype, half
/// types in float32; a no-op for `f64`). The data is read as `STREAMS` far-apart streams at
/// once: a core reading one stream is limited by the misses it can keep in flight, not by the
/// memory system.
#[inline(always)]
fn lane_reduce<E: Element, I: Isa>(
    isa: I,
    data: &[E],
    f: impl Fn(f64) -> f64,
    combine: impl Fn(f64, f64) -> f64,
) -> f64 {
    let f = |x: f64| E::Math::round_from(f(x)).widen();
    let mut acc = [0.0f64; LANES];
    let per_stream = data.len() / LANES * WIDTH;
    let (body, tail) = data.split_at(per_stream * STREAMS);
    let streams: [&[E]; STREAMS] = std::array::from_fn(|s| &body[s * per_stream..(s + 1) * per_stream]);
    let mut add_block = |lanes: usize, block: &[E]| {
        // Widening the block first keeps this a plain packed f64 loop, which LLVM vectorises on
        // every path (fused with the conversion it did not, on AVX2).
        let (mut narrow, mut wide) = ([E::Math::default(); WIDTH], [0.0f64; WIDTH]);
        E::load_block(isa, block, &mut narrow);
        for j in 0..WIDTH {
            wide[j] = narrow[j].widen();
        }
        for j in 0..WIDTH {
            acc[lanes + j] = combine(acc[lanes + j], f(wide[j]));
        }
    };
    let size = std::mem::size_of::<E>();
    // Faster than the hardware prefetcher alone (see PREFETCH_AHEAD_BYTES).
    let ahead = streams.map(|stream| stream.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD_BYTES));
    for start in (0..per_stream).step_by(WIDTH) {
        for stream_ahead in ahead {
            crate::simd::prefetch_once_per_line(stream_ahead, start * size);
        }
        for (s, stream) in streams.iter().enumerate() {
            add_block(s * WIDTH, &stream[start..start + WIDTH]);
        }
    }
    for (j, x) in tail.iter().enumerate() {
        acc[j % LANES] = combine(acc[j % LANES], f(x.load().widen()));
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] = combine(acc[j], acc[j + width]);
        }
    }
    acc[0]
}

/// The partial reduction of one chunk: a sum of `|x|^p`, or the largest `|x|`.
struct PartialNorm<'a, T> {
    data: &'a [T],
    norm: NormType,
}

impl<E: Element> Kernel for PartialNorm<'_, E> {
    type Output = f64;

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) -> f64 {
        let add = |a: f64, b: f64| a + b;
        match self.norm {
            NormType::One => lane_reduce(isa, self.data, f64::abs, add),
            NormType::Two => lane_reduce(isa, self.data, |x| x * x, add),
            NormType::Inf => lane_reduce(isa, self.data, f64::abs, f64::max_propagate_nan),
            NormType::P(p) => lane_reduce(isa, self.data, |x| x.abs().powf(p), add),
        }
    }
}

fn combine_partials(norm: NormType, partials: impl Iterator<Item = f64>) -> f64 {
    match norm {
        NormType::Inf => partials.fold(0.0, f64::max_propagate_nan),
        _ => partials.fold(0.0, |a, b| a + b),
    }
}

/// The norm from the combined partials. A sum too large for `T` is inf, as torch's sum in `T`
/// would be (the terms are non-negative, so the total is the largest partial sum; NaN stays NaN).
fn finish<T: Real>(norm: NormType, reduced: f64) -> f64 {
    let reduced = match norm {
        NormType::Inf => return reduced,
        _ if T::round_from(reduced).is_infinite() => f64::INFINITY,
        _ => reduced,
    };
    match norm {
        NormType::One | NormType::Inf => reduced,
        NormType::Two => reduced.sqrt(),
        NormType::P(p) => reduced.powf(1.0 / p),
    }
}

/// The norm of one tensor, in `f64` (within the range of its maths type: see the module docs).
pub fn tensor_norm<E: Element>(data: &[E], norm: NormType, exec: &Executor) -> f64 {
    tensor_norms(&[data], norm, exec)[0]
}

/// The norm of each tensor (torch's `_foreach_norm`), in `f64` within `T`'s range (module
/// docs). Each tensor is reduced in fixed `CHUNK`-sized chunks (the tasks spread over the
/// threads), whose partial results are combined in order: the same bits for any number of
/// threads.
pub fn tensor_norms<E: Element>(tensors: &[&[E]], norm: NormType, exec: &Executor) -> Vec<f64> {
    // first_chunk[i]..first_chunk[i + 1]: the chunks of tensor i (an empty tensor has one).
    let mut first_chunk = Vec::with_capacity(tensors.len() + 1);
    let mut chunks = 0;
    for t in tensors {
        first_chunk.push(chunks);
        chunks += t.len().div_ceil(CHUNK).max(1);
    }
    first_chunk.push(chunks);
    let partials: Vec<AtomicU64> = (0..chunks).map(|_| AtomicU64::new(0)).collect();
    let elements = tensors.iter().map(|t| t.len()).sum();
    let simd: SimdLevel = exec.simd();
    exec.for_each_task(chunks, elements, &|chunk| {
        let tensor = first_chunk.partition_point(|&first| first <= chunk) - 1;
        let start = (chunk - first_chunk[tensor]) * CHUNK;
        let data = tensors[tensor];
        let part = &data[start.min(data.len())..(start + CHUNK).min(data.len())];
        let partial = dispatch(simd, PartialNorm { data: part, norm });
        partials[chunk].store(partial.to_bits(), Ordering::Relaxed);
    });
    (0..tensors.len())
        .map(|i| {
            if let [x] = tensors[i] {
                // torch's norm of one element is |x| for every p, never |x|^p rooted again
                // (which can overflow or underflow where |x| does not).
                return x.load().widen().abs();
            }
            let parts = partials[first_chunk[i]..first_chunk[i + 1]].iter();
            finish::<E::Math>(norm, combine_partials(norm, parts.map(|p| f64::from_bits(p.load(Ordering::Relaxed)))))
        })
        .collect()
}

struct ScaleJob<'a, E: Element> {
    data: &'a mut [E],
    factor: E::Math,
}

impl<E: Element> Splittable for ScaleJob<'_, E> {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.data.split_at_mut(mid);
        (Self { data: a, factor: self.factor }, Self { data: b, factor: self.factor })
    }
}

impl<E: Element> Kernel for ScaleJob<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        if E::IS_MATH {
            for x in self.data.iter_mut() {
                *x = E::store(x.load() * self.factor);
            }
            return;
        }
        // Half types: a block at a time, so that the conversions can use the ISA's instructions.
        let mut block = crate::block::scratch::<E::Math>();
        for chunk in self.data.chunks_mut(crate::block::BLOCK) {
            let block = &mut block[..chunk.len()];
            E::load_block(isa, chunk, block);
            for x in block.iter_mut() {
                *x = *x * self.factor;
            }
            E::store_block(isa, block, chunk);
        }
    }
}

/// `x *= factor` for every element of every tensor (torch's `_foreach_mul_` by a scalar; half
/// types multiply in float32 and round once).
pub fn scale_in_place<E: Element>(tensors: Vec<&mut [E]>, factor: E::Math, exec: &Executor) {
    if factor == <E::Math as num_traits::One>::one() {
        return; // x * 1 == x for every float, NaN included: nothing to write
    }
    let simd = exec.simd();
    let jobs = tensors.into_iter().map(|data| ScaleJob { data, factor }).collect();
    exec.for_each_piece(jobs, |job| dispatch(simd, job));
}
