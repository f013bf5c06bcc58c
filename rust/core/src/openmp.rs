//! Running a step's pieces on the threads of an OpenMP runtime the process has already loaded
//! (torch's), instead of on a pool of our own.
//!
//! Right after torch ops, torch's OpenMP threads keep spinning for a while before they sleep. A
//! pool of our own then competes with them for the same cores: measured on a 2-core machine, an
//! Adam step of 1M-16M elements ran 1.1-2x slower right after a torch op than on its own. Run as
//! an OpenMP parallel region of that same runtime, the step is handed to those spinning threads
//! instead, at no wake-up cost.

use std::any::Any;
use std::ffi::{c_uint, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

/// `void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)`:
/// libgomp's entry point for `#pragma omp parallel` since GCC 4.9, also provided by LLVM's and
/// Intel's OpenMP runtimes for GNU compatibility.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// An OpenMP runtime loaded in this process.
#[derive(Clone)]
pub struct OpenMp {
    parallel: GompParallel,
    path: String,
    // Keeps the runtime loaded while `parallel` may be called.
    _library: Arc<libloading::os::unix::Library>,
}

impl std::fmt::Debug for OpenMp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenMp").field("path", &self.path).finish()
    }
}

/// The state one parallel region shares between its members.
struct Region<'a> {
    body: &'a (dyn Fn() + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// What each member of the team runs.
extern "C" fn member(data: *mut c_void) {
    // SAFETY: `data` points to the `Region` on `OpenMp::run`'s stack, which outlives the parallel
    // region: GOMP_parallel returns only after every member has returned from this function.
    let region = unsafe { &*(data as *const Region<'_>) };
    // A panic must not unwind into C: keep the first one and re-raise it after the region.
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (region.body)())) {
        region.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(panic);
    }
}

impl OpenMp {
    /// The OpenMP runtime at `path` if this process has already loaded it; nothing is loaded
    /// (and no library initialiser runs) here.
    pub fn already_loaded(path: &str) -> Option<Self> {
        // SAFETY: with RTLD_NOLOAD, dlopen only returns a handle to a library that is already
        // loaded and initialised; it never maps or initialises anything.
        let library =
            unsafe { libloading::os::unix::Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_NOLOAD) }.ok()?;
        // SAFETY: GOMP_parallel has the signature of `GompParallel` in every runtime that exports
        // it (see the type), and `_library` keeps it loaded as long as the pointer is kept.
        let parallel = unsafe { *library.get::<GompParallel>(b"GOMP_parallel\0").ok()? };
        Some(Self { parallel, path: path.to_owned(), _library: Arc::new(library) })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs `body` on every member of a team of `threads` threads (the calling thread is one of
    /// them) and returns once all have finished. A panic in `body` is raised again here.
    pub fn run(&self, threads: usize, body: &(dyn Fn() + Sync)) {
        let region = Region { body, panic: Mutex::new(None) };
        let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
        // SAFETY: `member` matches the callback type, never unwinds (it catches panics), and only
        // dereferences `data` while `region` is alive (see `member`).
        unsafe { (self.parallel)(member, &region as *const Region<'_> as *mut c_void, threads, 0) };
        if let Some(panic) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            resume_unwind(panic);
        }
    }
}
