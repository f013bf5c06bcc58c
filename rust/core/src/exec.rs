//! Spreading the work of one whole step over a thread pool.
//!
//! A step hands over every tensor of a param group at once. Big tensors are cut into pieces of
//! at least `CHUNK` elements, small tensors are pieces of their own, and the calling thread and
//! the pool's threads claim pieces from one shared counter until none are left: one parallel
//! region per step, no fork/join per tensor, and a pool thread that is slow to wake up simply
//! claims fewer pieces.
//!
//! Waking a sleeping pool thread costs tens of microseconds on the machines we measured, so a
//! step too small to pay for that runs on the calling thread alone. (Keeping pool threads
//! spinning ahead of a step was tried and dropped: right after torch ops, torch's own OpenMP
//! threads are still spinning, and on a 2-core machine the two spinners made small steps 1.5-2x
//! slower.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::simd::SimdLevel;

/// Pieces are cut at multiples of this many elements (64K: 256 KiB of f32 per buffer).
pub const CHUNK: usize = 1 << 16;

/// Steps of fewer elements than this run on the calling thread: handing work to a sleeping
/// pool thread and waiting for it costs 20-40 us, more than half of such a step saves (measured for Adam on a 2-core AMD EPYC: 256K elements take 53 us on one thread, 39 us
/// on two; 400 tensors of 1,000 elements 172 us on one, 216 us on two).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 19;

/// How long the calling thread, out of pieces, spins for the pool threads to finish theirs
/// before it blocks (and has to be woken again).
const FINISH_SPIN_LIMIT: Duration = Duration::from_micros(500);

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
        Ok(Self {
            pool: Arc::new(pool),
            simd,
            parallel_min_elements: PARALLEL_MIN_ELEMENTS,
        })
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

    /// Runs `task(i)` for every `i` in `0..count`. The calling thread and up to `threads - 1`
    /// pool threads claim indices from one counter until none are left.
    fn run_tasks(&self, count: usize, task: &(dyn Fn(usize) + Sync)) {
        let next = AtomicUsize::new(0);
        let finished = AtomicUsize::new(0);
        let claim_and_run = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            task(i);
            finished.fetch_add(1, Ordering::Release);
        };
        let helpers = (self.threads() - 1).min(count.saturating_sub(1));
        self.pool.in_place_scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|_| claim_and_run());
            }
            claim_and_run();
            let until = Instant::now() + FINISH_SPIN_LIMIT;
            while finished.load(Ordering::Acquire) < count && Instant::now() < until {
                std::hint::spin_loop();
            }
        });
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
        // Pieces of at least CHUNK elements, and about 16 per thread for a big step, so that a
        // thread that starts late or runs slow still leaves the others little to wait for.
        let piece = (elements / (16 * self.threads())).max(CHUNK).div_ceil(CHUNK) * CHUNK;
        let mut pieces = Vec::new();
        for mut job in jobs {
            while job.len() > piece + piece / 2 {
                let (head, tail) = job.split_at(piece);
                pieces.push(Mutex::new(Some(head)));
                job = tail;
            }
            pieces.push(Mutex::new(Some(job)));
        }
        self.run_tasks(pieces.len(), &|i| {
            let piece = pieces[i].lock().unwrap_or_else(|e| e.into_inner()).take();
            work(piece.expect("each piece is claimed once"));
        });
    }

    /// Runs `task(i)` for every `i` in `0..count`, in parallel where `elements` (the work the
    /// tasks do together) makes it pay. Tasks must not depend on which thread runs them.
    pub fn for_each_task(&self, count: usize, elements: usize, task: &(dyn Fn(usize) + Sync)) {
        if self.runs_parallel(elements) && count > 1 {
            self.run_tasks(count, task);
        } else {
            (0..count).for_each(task);
        }
    }
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
