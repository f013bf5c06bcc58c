//! Gradient norms and the in-place scale of `clip_grad_norm_`.
//!
//! A tensor's norm is reduced over fixed `CHUNK`-sized chunks, each summed in 32 fixed lanes and
//! accumulated in `f64`; chunks are combined in order. The result is therefore the same for any
//! thread count and any SIMD path (the lanes are the same on every path).

use crate::element::Real;
use crate::error::Error;
use crate::exec::{Executor, Splittable};
use crate::simd::{dispatch, Kernel, SimdLevel};

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

const LANES: usize = 32;

/// `combine` over `f(x)` for every element, in `LANES` independent accumulators folded pairwise.
#[inline(always)]
fn lane_reduce<T: Real>(data: &[T], f: impl Fn(f64) -> f64, combine: impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let blocks = data.chunks_exact(LANES);
    let tail = blocks.remainder();
    for block in blocks {
        // Widening the block first keeps the loop below a plain packed f64 loop, which LLVM
        // vectorises on every path (fused with the conversion it did not, on AVX2).
        let mut wide = [0.0f64; LANES];
        for j in 0..LANES {
            wide[j] = block[j].widen();
        }
        for j in 0..LANES {
            acc[j] = combine(acc[j], f(wide[j]));
        }
    }
    for (j, x) in tail.iter().enumerate() {
        acc[j] = combine(acc[j], f(x.widen()));
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

impl<T: Real> Kernel for PartialNorm<'_, T> {
    type Output = f64;

    #[inline(always)]
    fn run(self) -> f64 {
        let add = |a: f64, b: f64| a + b;
        match self.norm {
            NormType::One => lane_reduce(self.data, f64::abs, add),
            NormType::Two => lane_reduce(self.data, |x| x * x, add),
            NormType::Inf => lane_reduce(self.data, f64::abs, f64::max_propagate_nan),
            NormType::P(p) => lane_reduce(self.data, |x| x.abs().powf(p), add),
        }
    }
}

fn combine_partials(norm: NormType, partials: &[f64]) -> f64 {
    match norm {
        NormType::Inf => partials.iter().copied().fold(0.0, f64::max_propagate_nan),
        _ => partials.iter().sum(),
    }
}

fn finish(norm: NormType, reduced: f64) -> f64 {
    match norm {
        NormType::One | NormType::Inf => reduced,
        NormType::Two => reduced.sqrt(),
        NormType::P(p) => reduced.powf(1.0 / p),
    }
}

/// The norm of one tensor, in `f64`.
pub fn tensor_norm<T: Real>(data: &[T], norm: NormType, exec: &Executor) -> f64 {
    let simd: SimdLevel = exec.simd();
    let partials = exec.map_chunks(data, |chunk| dispatch(simd, PartialNorm { data: chunk, norm }));
    finish(norm, combine_partials(norm, &partials))
}

/// The norm of each tensor (torch's `_foreach_norm`), in `f64`.
pub fn tensor_norms<T: Real>(tensors: &[&[T]], norm: NormType, exec: &Executor) -> Vec<f64> {
    let elements = tensors.iter().map(|t| t.len()).sum();
    exec.map_tensors(tensors, elements, |t| tensor_norm(t, norm, exec))
}

struct ScaleJob<'a, T> {
    data: &'a mut [T],
    factor: T,
}

impl<T: Real> Splittable for ScaleJob<'_, T> {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.data.split_at_mut(mid);
        (Self { data: a, factor: self.factor }, Self { data: b, factor: self.factor })
    }
}

impl<T: Real> Kernel for ScaleJob<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for x in self.data.iter_mut() {
            *x = *x * self.factor;
        }
    }
}

/// `x *= factor` for every element of every tensor (torch's `_foreach_mul_` by a scalar).
pub fn scale_in_place<T: Real>(tensors: Vec<&mut [T]>, factor: T, exec: &Executor) {
    let simd = exec.simd();
    let jobs = tensors.into_iter().map(|data| ScaleJob { data, factor }).collect();
    exec.for_each_piece(jobs, |job| dispatch(simd, job));
}
