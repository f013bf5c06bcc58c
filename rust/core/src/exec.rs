//! Spreading the work of one whole step over a thread pool.
//!
//! A step hands over every tensor of a param group at once. Big tensors are cut into pieces,
//! small tensors are pieces of their own, and the calling thread and the other threads claim
//! pieces from one shared counter until none are left: one parallel region per step, no
//! fork/join per tensor, and a thread that is slow to wake up simply claims fewer pieces. The
//! threads are rayon's pool, or those of an OpenMP runtime already in the process (see
//! `openmp`), whose threads are torch's own.
//!
//! Waking a sleeping pool thread costs tens of microseconds on the machines we measured, so a
//! step too small to pay for that runs on the calling thread alone. (Keeping pool threads
//! spinning ahead of a step was tried and dropped: right after torch ops, torch's own OpenMP
//! threads are still spinning, and on a 2-core machine the two spinners made small steps 1.5-2x
//! slower.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(unix)]
use crate::openmp::OpenMp;
use crate::simd::SimdLevel;

/// Norms reduce each tensor in chunks of this many elements (64K: 256 KiB of f32), always the
/// same chunks whatever the threads, so that their sums are the same bits for any thread count.
pub const CHUNK: usize = 1 << 16;

/// The smallest piece a big tensor is cut into, in elements.
const MIN_PIECE: usize = 1 << 13;

/// With rayon's pool, steps of fewer elements than this run on the calling thread: handing work
/// to a sleeping pool thread and waiting for it costs 20-40 us, more than half of such a step
/// saves (measured for Adam on a 2-core AMD EPYC when this was set: 256K elements took 53 us
/// on one thread, 39 us on two; 400 tensors of 1,000 elements 172 us on one, 216 us on two).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 19;

/// On an OpenMP runtime's threads, which keep spinning for a while after each region (theirs or
/// torch's), handing work over is cheap: steps go parallel from this many elements.
pub const OPENMP_PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// How long the calling thread, out of pieces, spins for the pool threads to finish theirs
/// before it blocks (and has to be woken again).
const FINISH_SPIN_LIMIT: Duration = Duration::from_micros(500);

/// One tensor's share of a step: the buffers of a param and what the kernel needs to update it.
/// Element-wise work may be split anywhere, so results never depend on how it was split.
#[allow(clippy::len_without_is_empty)] // (the executor never asks: it splits by length)
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
    /// Set: parallel regions run on this OpenMP runtime's threads (torch's), not on `pool`.
    #[cfg(unix)]
    openmp: Option<OpenMp>,
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
            #[cfg(unix)]
            openmp: None,
        })
    }

    /// The same executor, going parallel from `elements` elements on (tests use 0 to split even
    /// small steps over the pool).
    pub fn with_parallel_min_elements(&self, elements: usize) -> Self {
        Self { parallel_min_elements: elements, ..self.clone() }
    }

    /// The same executor, running its parallel regions on `openmp`'s threads (or on its own
    /// pool again, with `None`).
    #[cfg(unix)]
    pub fn with_openmp(&self, openmp: Option<OpenMp>) -> Self {
        Self { openmp, ..self.clone() }
    }

    /// The OpenMP runtime parallel regions run on, if any.
    #[cfg(unix)]
    pub fn openmp(&self) -> Option<&OpenMp> {
        self.openmp.as_ref()
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
        #[cfg(unix)]
        let min = if self.openmp.is_some() {
            self.parallel_min_elements.min(OPENMP_PARALLEL_MIN_ELEMENTS)
        } else {
            self.parallel_min_elements
        };
        #[cfg(not(unix))]
        let min = self.parallel_min_elements;
        self.threads() > 1 && elements >= min
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
        #[cfg(unix)]
        if let Some(openmp) = &self.openmp {
            openmp.run(helpers + 1, &claim_and_run);
            return;
        }
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
        // About 16 pieces per thread, so that a thread that starts late or runs slow leaves the
        // others little to wait for; cut at multiples of 1024 elements, so no two threads write
        // one cache line.
        let piece = (elements / (16 * self.threads())).max(MIN_PIECE).next_multiple_of(1024);
        let mut pieces = Vec::new();
        // Consecutive pieces are claimed together in batches of about `piece` elements, so that
        // many small tensors cost one claim per batch, not one per tensor (the shared counter's
        // cache line would bounce between the threads on every claim).
        let mut batches = Vec::new();
        let (mut batch_start, mut batch_elements) = (0, 0);
        let mut push = |pieces: &mut Vec<Mutex<Option<J>>>, job: J| {
            batch_elements += job.len();
            pieces.push(Mutex::new(Some(job)));
            if batch_elements >= piece {
                batches.push(batch_start..pieces.len());
                (batch_start, batch_elements) = (pieces.len(), 0);
            }
        };
        for mut job in jobs {
            while job.len() > piece + piece / 2 {
                let (head, tail) = job.split_at(piece);
                push(&mut pieces, head);
                job = tail;
            }
            push(&mut pieces, job);
        }
        if batch_start < pieces.len() {
            batches.push(batch_start..pieces.len());
        }
        self.run_tasks(batches.len(), &|b| {
            for slot in &pieces[batches[b].clone()] {
                let piece = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                work(piece.expect("each piece is claimed once"));
            }
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
