//! Spreading the work of one whole step over a thread pool.
//!
//! A step hands over every tensor of a param group at once. Big tensors are cut into pieces of
//! at least `CHUNK` elements and small tensors are pieces of their own, and rayon spreads all the
//! pieces of the step over the pool in one parallel region: no fork/join per tensor. A step too
//! small to pay for waking the pool runs on the calling thread.

use rayon::prelude::*;
use std::sync::Arc;

use crate::simd::SimdLevel;

/// Pieces are cut at multiples of this many elements (64K: 256 KiB of f32 per buffer).
pub const CHUNK: usize = 1 << 16;

/// Steps that touch fewer elements than this run on the calling thread: handing work to a
/// sleeping pool thread and waiting for it costs 20-40 us, more than half of such a step saves
/// (measured for Adam on a 2-core AMD EPYC: 256K elements take 53 us on one thread, 39 us on
/// two; 400 tensors of 1,000 elements 172 us on one, 216 us on two).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 19;

/// One tensor's share of a step: the buffers of a param and what the kernel needs to update it.
/// Element-wise work may be split anywhere, so results never depend on how it was split.
pub trait Splittable: Sized + Send {
    fn len(&self) -> usize;
    /// Splits into `[0, mid)` and `[mid, len)`.
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// The thread pool and the SIMD path every kernel call runs with.
#[derive(Clone)]
pub struct Executor {
    pool: Arc<rayon::ThreadPool>,
    simd: SimdLevel,
    parallel_min_elements: usize,
}

impl Executor {
    /// An executor with `threads` worker threads (at least one).
    pub fn new(threads: usize, simd: SimdLevel) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("rsoptim-{i}"))
            .build()?;
        Ok(Self { pool: Arc::new(pool), simd, parallel_min_elements: PARALLEL_MIN_ELEMENTS })
    }

    /// The same executor, going parallel from `elements` elements on (tests use 0 to split even
    /// small steps over the pool).
    pub fn with_parallel_min_elements(&self, elements: usize) -> Self {
        Self { parallel_min_elements: elements, ..self.clone() }
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn simd(&self) -> SimdLevel {
        self.simd
    }

    /// The same pool, with another SIMD path.
    pub fn with_simd(&self, simd: SimdLevel) -> Self {
        Self { simd, ..self.clone() }
    }

    fn runs_parallel(&self, elements: usize) -> bool {
        self.threads() > 1 && elements >= self.parallel_min_elements
    }

    /// Runs `work` on every piece of every job, in parallel where it pays.
    pub fn for_each_piece<J, F>(&self, jobs: Vec<J>, work: F)
    where
        J: Splittable,
        F: Fn(J) + Sync + Send,
    {
        let elements: usize = jobs.iter().map(Splittable::len).sum();
        if !self.runs_parallel(elements) {
            jobs.into_iter().for_each(work);
            return;
        }
        self.pool.install(|| {
            jobs.into_par_iter()
                .flat_map(|job| rayon::iter::split(job, split_in_chunks))
                .for_each(&work)
        });
    }

    /// `f(tensor)` for every tensor, returned in order.
    pub fn map_tensors<T, R, F>(&self, tensors: &[T], elements: usize, f: F) -> Vec<R>
    where
        T: Sync,
        R: Send,
        F: Fn(&T) -> R + Sync + Send,
    {
        if !self.runs_parallel(elements) {
            return tensors.iter().map(f).collect();
        }
        self.pool.install(|| tensors.par_iter().map(f).collect())
    }

    /// `f(chunk)` for the fixed `CHUNK`-sized chunks of `data`, returned in order. Reductions
    /// combine these in order, so their result is the same for any number of threads.
    pub fn map_chunks<T, R, F>(&self, data: &[T], f: F) -> Vec<R>
    where
        T: Sync,
        R: Send,
        F: Fn(&[T]) -> R + Sync + Send,
    {
        if data.len() <= CHUNK {
            return vec![f(data)];
        }
        if !self.runs_parallel(data.len()) {
            return data.chunks(CHUNK).map(f).collect();
        }
        if rayon::current_thread_index().is_none() {
            return self.pool.install(|| data.par_chunks(CHUNK).map(&f).collect());
        }
        data.par_chunks(CHUNK).map(f).collect()
    }
}

fn split_in_chunks<J: Splittable>(job: J) -> (J, Option<J>) {
    let len = job.len();
    if len < 2 * CHUNK {
        return (job, None);
    }
    let mid = (len / 2).div_ceil(CHUNK) * CHUNK;
    let (left, right) = job.split_at(mid);
    (left, Some(right))
}

/// Splits an optional mutable slice (a state buffer a configuration may not have).
pub(crate) fn split_opt<T>(slice: Option<&mut [T]>, mid: usize) -> (Option<&mut [T]>, Option<&mut [T]>) {
    match slice {
        Some(s) => {
            let (a, b) = s.split_at_mut(mid);
            (Some(a), Some(b))
        }
        None => (None, None),
    }
}
