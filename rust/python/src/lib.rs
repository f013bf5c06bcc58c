//! `rsoptim._rsoptim`: the Python binding of rsoptim-core.
//!
//! Each step function receives, for every tensor of one param group, the addresses and element
//! counts of its CPU buffers (sent by `rsoptim/_optimizer.py` and `rsoptim/functional.py`, which
//! hold the tensors or arrays for the whole call), checks them all (`rsoptim_core::raw`), then
//! releases the GIL, waits until no other call in flight shares memory with them
//! (`rsoptim_core::inflight`), and only then slices them and runs the core kernel. Nothing here
//! does arithmetic.
//!
//! These functions are private and, like any API that takes raw addresses, unsafe to call with
//! anything but live buffers: the checks catch null, misaligned and overlapping addresses, not
//! addresses of freed memory.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, RwLock};

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rsoptim_core::alloc_count::{counters, CountingAllocator};
use rsoptim_core::roofline::StreamTensor;
use rsoptim_core::table::{words, Column, Dtype, Table};
#[cfg(unix)]
use rsoptim_core::torch_abi::Expected;
use rsoptim_core::{
    quant_blocks, Adam8bitTensor, AdamHyper, AdamTensor, Element, Error, Executor, NormType, Real, RmspropHyper,
    RmspropTensor, RoundTensor, Rounding, SgdHyper, SgdTensor, SimdLevel,
};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// (bytes, allocations) this extension has allocated since it was loaded.
#[pyfunction]
fn allocation_counters() -> (u64, u64) {
    counters()
}

fn value_error(e: impl ToString) -> PyErr {
    PyValueError::new_err(e.to_string())
}

create_exception!(
    _rsoptim,
    BufferOverlapError,
    PyValueError,
    "A buffer the step writes shares memory with another buffer of the call (torch steps such params one after the other)."
);

create_exception!(
    _rsoptim,
    MemoryMovedError,
    PyRuntimeError,
    "A tensor's memory moved between the caller's checks and the kernel (a storage resized in place, or the tensor given other memory); nothing was written."
);

/// The core's errors as Python exceptions: overlapping buffers get their own ValueError subclass,
/// so the Python layer can fall back to torch for them alone.
fn core_error(e: Error) -> PyErr {
    match e {
        Error::Overlap(msg) => BufferOverlapError::new_err(msg),
        e => value_error(e),
    }
}

static EXECUTOR: RwLock<Option<Executor>> = RwLock::new(None);

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The executor every call uses; made on first use with the SIMD path `RSOPTIM_SIMD` picks.
fn executor() -> PyResult<Executor> {
    if let Some(exec) = EXECUTOR.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Ok(exec.clone());
    }
    let mut slot = EXECUTOR.write().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        let simd = SimdLevel::selected().map_err(value_error)?;
        *slot = Some(Executor::new(default_threads(), simd).map_err(|e| PyRuntimeError::new_err(e.to_string()))?);
    }
    Ok(slot.as_ref().expect("just set").clone())
}

fn replace_executor(make: impl FnOnce(&Executor) -> PyResult<Executor>) -> PyResult<()> {
    let current = executor()?;
    let new = make(&current)?;
    *EXECUTOR.write().unwrap_or_else(|e| e.into_inner()) = Some(new);
    Ok(())
}

/// Sets the number of threads the kernels use (at least 1).
#[pyfunction]
fn set_num_threads(threads: usize) -> PyResult<()> {
    if threads == 0 {
        return Err(PyValueError::new_err("set_num_threads expects a positive integer"));
    }
    replace_executor(|current| {
        let exec = Executor::new(threads, current.simd()).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        #[cfg(unix)]
        let exec = exec.with_openmp(current.openmp().cloned());
        Ok(exec)
    })
}

/// Python's cyclic garbage collector is paused from a call's first check to its kernel's return
/// (see `rsoptim/_collector.py`): the calls inside `pause_collector`/`resume_collector`, over
/// all threads, and whether the collector was enabled when the first came in. Here and not in
/// Python, so that no exception from a signal handler (a Ctrl-C) can fall between counting a
/// pause and switching the collector: each of these runs without a Python bytecode in it.
static COLLECTOR: Mutex<(usize, bool)> = Mutex::new((0, false));

/// What one pause's resume calls before it ends the pause (`at_resume`): callables and their
/// arguments, called last first.
type Undos = Vec<(Py<PyAny>, Py<pyo3::types::PyTuple>)>;

thread_local! {
    /// This thread's pauses not yet resumed, innermost last (a forked child keeps only its own
    /// thread's).
    static PAUSES: RefCell<Vec<Undos>> = const { RefCell::new(Vec::new()) };
}

/// Pauses the garbage collector until the matching `resume_collector` (nests; any thread).
#[pyfunction]
fn pause_collector(_py: Python<'_>) {
    let mut collector = COLLECTOR.lock().unwrap_or_else(|e| e.into_inner());
    if collector.0 == 0 {
        // SAFETY: plain C-API calls with the GIL held (the `Python` token); they run no code.
        collector.1 = unsafe { pyo3::ffi::PyGC_Disable() } == 1;
    }
    collector.0 += 1;
    PAUSES.with_borrow_mut(|pauses| pauses.push(Undos::new()));
}

/// Has this thread's innermost pause call `undo(*args)` when it is resumed, before any undo
/// registered earlier. A context manager whose `__exit__` is `resume_collector` thus undoes
/// what its `__enter__` did even where a signal handler's exception lands first thing in the
/// exit: the `with` statement calls it with no bytecode in between. With each undo registered
/// before its change is made (and harmless where the change was not made), a change made and
/// undone by C functions has no window; one made or undone by Python code can still be
/// interrupted halfway.
#[pyfunction]
#[pyo3(signature = (undo, *args))]
fn at_resume(undo: &Bound<'_, PyAny>, args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
    PAUSES.with_borrow_mut(|pauses| match pauses.last_mut() {
        Some(innermost) => {
            innermost.push((undo.clone().unbind(), args.clone().unbind()));
            Ok(())
        }
        None => Err(PyRuntimeError::new_err("at_resume outside a pause of the collector")),
    })
}

/// Ends this thread's innermost pause: calls its undos (all of them, even after one raised),
/// then the last pause over all threads enables the collector again if it was enabled before.
/// Raises the first undo's exception, if any. Without a pause of this thread's to end, does
/// nothing. Takes and ignores any arguments, so that it can be a context manager's `__exit__`.
#[pyfunction]
#[pyo3(signature = (*_exc))]
fn resume_collector(py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
    let Some(undos) = PAUSES.with_borrow_mut(Vec::pop) else {
        return Ok(());
    };
    // Still paused while the undos run (they are Python code).
    let mut first_error = None;
    for (undo, args) in undos.into_iter().rev() {
        if let Err(e) = undo.bind(py).call1(args.bind(py)) {
            first_error.get_or_insert(e);
        }
    }
    let mut collector = COLLECTOR.lock().unwrap_or_else(|e| e.into_inner());
    collector.0 = collector.0.saturating_sub(1);
    if collector.0 == 0 && collector.1 {
        // SAFETY: as in `pause_collector`.
        unsafe { pyo3::ffi::PyGC_Enable() };
    }
    first_error.map_or(Ok(()), Err)
}

/// How many pauses are in force over all threads (for the tests).
#[pyfunction]
fn collector_pauses() -> usize {
    COLLECTOR.lock().unwrap_or_else(|e| e.into_inner()).0
}

/// For a child process after `fork()`: the pool's threads did not survive the fork, so start a
/// new pool of as many threads (rsoptim's own: libgomp does not support use after fork).
#[pyfunction]
fn reset_after_fork(_py: Python<'_>) -> PyResult<()> {
    // Reservations held by the parent's other threads would never be released here.
    rsoptim_core::inflight::reset_after_fork();
    // So would their pauses of the garbage collector: only this thread's stay.
    {
        let mut collector = COLLECTOR.lock().unwrap_or_else(|e| e.into_inner());
        collector.0 = PAUSES.with_borrow(Vec::len);
        if collector.0 == 0 && collector.1 {
            // SAFETY: as in `pause_collector` (the `Python` token: the GIL is held).
            unsafe { pyo3::ffi::PyGC_Enable() };
        }
    }
    let mut slot = EXECUTOR.write().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = slot.take() {
        let (threads, simd) = (old.threads(), old.simd());
        // Dropping the old pool would signal threads that no longer exist: leave it be.
        std::mem::forget(old);
        *slot = Some(Executor::new(threads, simd).map_err(|e| PyRuntimeError::new_err(e.to_string()))?);
    }
    Ok(())
}

/// Runs parallel regions on the threads of the OpenMP runtime at `path` (torch's) if this
/// process has already loaded it; returns whether it did. `None` goes back to rsoptim's own pool.
#[pyfunction]
#[pyo3(signature = (path))]
fn use_openmp(path: Option<&str>) -> PyResult<bool> {
    #[cfg(unix)]
    {
        let openmp = path.and_then(rsoptim_core::openmp::OpenMp::already_loaded);
        let found = openmp.is_some();
        replace_executor(|current| Ok(current.with_openmp(openmp)))?;
        Ok(found)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(false)
    }
}

#[cfg(unix)]
// (Shared, so that a call takes its own reference and holds no lock while it calls Python, which
// may hand the GIL to a thread waiting to write here.)
static TORCH_ABI: RwLock<Option<Arc<rsoptim_core::torch_abi::TorchAbi>>> = RwLock::new(None);

#[cfg(unix)]
fn torch_abi() -> Option<Arc<rsoptim_core::torch_abi::TorchAbi>> {
    TORCH_ABI.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Reads tensors' metadata through the shim of the libtorch at `path` (torch's, already loaded)
/// for `tensor_addresses`; returns whether it could. `None` stops using it. `read_neg_bit`: the
/// checks read the negation bits natively where libtorch lets them (else `plan_addresses` asks
/// `Tensor.is_neg`; tests switch it off to run that path).
#[pyfunction]
#[pyo3(signature = (path, read_neg_bit=true))]
fn use_torch_abi(path: Option<&str>, read_neg_bit: bool) -> bool {
    #[cfg(unix)]
    {
        let abi = path.and_then(|path| rsoptim_core::torch_abi::TorchAbi::already_loaded(path, read_neg_bit));
        let found = abi.is_some();
        *TORCH_ABI.write().unwrap_or_else(|e| e.into_inner()) = abi.map(Arc::new);
        found
    }
    #[cfg(not(unix))]
    {
        let _ = (path, read_neg_bit);
        false
    }
}

/// Whether the checks of `tensor_addresses` and `plan_addresses` read tensors' negation bits
/// natively (see `use_torch_abi`).
#[pyfunction]
fn torch_abi_reads_neg_bit() -> bool {
    #[cfg(unix)]
    {
        torch_abi().is_some_and(|abi| abi.reads_neg_bit())
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// The data addresses of tensors named by their TensorImpl addresses (`Tensor._cdata`), packed
/// as the address columns are, if each is a contiguous strided CPU tensor of its expected
/// element count and dtype code (6 float32, 7 float64), with the sizes of the tensor
/// `shape_of` names, lying inside its storage; None if any is not, or without `use_torch_abi`.
/// Like every function here it takes raw addresses: the caller keeps each tensor alive.
#[pyfunction]
fn tensor_addresses<'py>(
    py: Python<'py>,
    impls: &[u8],
    numels: &[u8],
    dtypes: &[u8],
    shape_of: &[u8],
) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
    checked_addresses(py, &words("impls", impls).map_err(core_error)?, numels, dtypes, shape_of)
}

/// `tensor_addresses` for TensorImpl addresses already unpacked.
fn checked_addresses<'py>(
    py: Python<'py>,
    impls: &[usize],
    numels: &[u8],
    dtypes: &[u8],
    shape_of: &[u8],
) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
    #[cfg(unix)]
    {
        let Some(abi) = torch_abi() else { return Ok(None) };
        checked_by(py, &abi, impls, numels, dtypes, shape_of)
    }
    #[cfg(not(unix))]
    {
        let _ = (py, impls, numels, dtypes, shape_of);
        Ok(None)
    }
}

#[cfg(unix)]
fn checked_by<'py>(
    py: Python<'py>,
    abi: &rsoptim_core::torch_abi::TorchAbi,
    impls: &[usize],
    numels: &[u8],
    dtypes: &[u8],
    shape_of: &[u8],
) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
    let (numels, shape_of) = (words("numels", numels), words("shape_of", shape_of));
    let (numels, shape_of) = (numels.map_err(core_error)?, shape_of.map_err(core_error)?);
    if numels.len() != impls.len() || shape_of.len() != impls.len() || dtypes.len() != impls.len() {
        return Err(value_error("tensor_addresses needs one numel, dtype and shape_of per tensor"));
    }
    let expected: Vec<Expected> = (0..impls.len())
        .map(|i| Expected { numel: numels[i], dtype: i32::from(dtypes[i]), shape_of: shape_of[i] })
        .collect();
    // SAFETY: `impls` are the TensorImpls of tensors held for the call, with the GIL held
    // throughout: `Tensor._cdata` of tensors the Python layer holds (`tensor_addresses`), or
    // those of `plan_addresses`'s items, which it holds, read by the getter or from the objects.
    let addresses = unsafe { abi.checked_addresses(impls, &expected) };
    Ok(addresses.map(|a| pyo3::types::PyBytes::new(py, &pack_words(&a))))
}

/// A kernel's last check, made with the GIL held right before the kernel runs, so that no code of
/// the caller's thread (a signal handler, a finalizer) can run between it and the kernel: each
/// of `tensors` (plain tensors the caller holds) still has its data at the address in
/// `addresses` that the caller checked and packed into the kernel's columns, with the element
/// count in `numels` from there inside its storage. Between the caller's checks and the kernel
/// call, Python runs signal handlers and lets other threads take the GIL, and code there may
/// resize a storage in place (`untyped_storage().resize_()`), freeing the memory a column points
/// at. Raises `MemoryMovedError` (nothing written) if any moved or shrank, or cannot be read;
/// without libtorch's shim, nothing is checked.
fn check_unmoved(
    py: Python<'_>,
    tensors: Option<&Bound<'_, pyo3::types::PyList>>,
    addresses: Option<&[u8]>,
    numels: Option<&[u8]>,
) -> PyResult<()> {
    let (tensors, addresses, numels) = match (tensors, addresses, numels) {
        (None, None, None) => return Ok(()),
        (Some(tensors), Some(addresses), Some(numels)) => (
            tensors,
            words("guard addresses", addresses).map_err(core_error)?,
            words("guard numels", numels).map_err(core_error)?,
        ),
        _ => return Err(value_error("a kernel's last check needs its tensors, their addresses and their sizes")),
    };
    if addresses.len() != tensors.len() || numels.len() != tensors.len() {
        return Err(value_error("a kernel's last check needs one address and one size per tensor"));
    }
    #[cfg(unix)]
    {
        let (Some(abi), Some(readers)) =
            (torch_abi(), TENSOR_READERS.read().unwrap_or_else(|e| e.into_inner()).clone())
        else {
            return Ok(());
        };
        let moved = || MemoryMovedError::new_err("a tensor's memory moved between the checks and the kernel");
        // torch's `_cdata` getter runs a torch function mode's code where one is active: the
        // callers turn them off around their checks and kernels (`native_reads`).
        if !readers.tensor_in_object && !readers.torch_function_off.bind(py).call0()?.is_truthy()? {
            return Err(moved());
        }
        // The tensors' objects are read by pointer: 21 us for 2,000 tensors, against 33-44 us
        // through `Bound` items (a step on 400 params hands over 2,000).
        for (i, (&address, &numel)) in addresses.iter().zip(&numels).enumerate() {
            // SAFETY: `i` is below the list's length (checked equal to the addresses' above; no
            // code runs here that could change it): a borrowed reference to an item the list
            // holds, valid while the GIL is held and the list unchanged.
            let t = unsafe { pyo3::ffi::PyList_GetItem(tensors.as_ptr(), i as pyo3::ffi::Py_ssize_t) };
            // (A subclass may lay its object out otherwise: the caller hands plain tensors only.)
            // SAFETY: `t` is a live object (above).
            if t.is_null() || !unsafe { readers.is_plain(t) } {
                return Err(moved());
            }
            // SAFETY: `t` is of a plain type (checked above) and the list holds it; an error
            // (dropped) counts as moved.
            let tensor = unsafe { readers.tensor_impl(py, t) }.unwrap_or(0);
            // SAFETY: a TensorImpl of a tensor the list holds, with the GIL held.
            if tensor == 0 || !unsafe { abi.still_inside(tensor, address, numel) } {
                return Err(moved());
            }
        }
    }
    Ok(())
}

/// torch's own readers of a tensor, for `plan_addresses` (registered by `use_tensor_readers`).
struct TensorReaders {
    /// `torch.Tensor` and `torch.nn.Parameter`: the exact types a plan steps.
    plain_types: Vec<Py<pyo3::types::PyType>>,
    /// `torch._C.TensorBase._cdata` (a getset descriptor) and its getter.
    cdata: Py<PyAny>,
    cdata_get: pyo3::ffi::descrgetfunc,
    /// Whether TensorImpls are read from the tensor objects (see `THPVARIABLE_TENSOR_OFFSET`),
    /// shown to work by `use_tensor_readers`; else the getter is called.
    tensor_in_object: bool,
    /// `torch._C.TensorBase.is_neg`.
    is_neg: Py<PyAny>,
    /// `torch._C._is_torch_function_all_disabled`.
    torch_function_off: Py<PyAny>,
    /// `torch._C.TensorBase.untyped_storage`: a tensor's storage, whose memory it keeps alive.
    untyped_storage: Py<PyAny>,
}

static TENSOR_READERS: RwLock<Option<Arc<TensorReaders>>> = RwLock::new(None); // (see TORCH_ABI)

impl TensorReaders {
    /// Whether `t` is exactly of one of `plain_types` (a pointer comparison per type: no
    /// allocation, no reference counting).
    ///
    /// # Safety
    /// `t` is a live object, with the GIL held.
    unsafe fn is_plain(&self, t: *mut pyo3::ffi::PyObject) -> bool {
        // SAFETY: `t` is live (this function's contract): its type pointer is read.
        let kind = unsafe { pyo3::ffi::Py_TYPE(t) }.cast::<pyo3::ffi::PyObject>();
        self.plain_types.iter().any(|k| k.as_ptr() == kind)
    }

    /// The address of the TensorImpl of `t` (`Tensor._cdata`): from the object itself where
    /// `tensor_in_object`, else from torch's getter (with torch function off, as every caller
    /// has it, it runs no Python code). 0 for a null one; Err if the getter raised.
    ///
    /// # Safety
    /// `t` is a live object of one of `plain_types`, held by the caller, with the GIL held.
    unsafe fn tensor_impl(&self, py: Python<'_>, t: *mut pyo3::ffi::PyObject) -> PyResult<usize> {
        if self.tensor_in_object {
            // SAFETY: `use_tensor_readers` checked the plain types' objects to be large enough.
            return Ok(unsafe { object_word(t) });
        }
        // SAFETY: torch's getter for a live tensor of its own type; it returns a new reference
        // (an int: allocating one runs no collector) or null with an error set.
        let raw = unsafe { (self.cdata_get)(self.cdata.as_ptr(), t, std::ptr::null_mut()) };
        // SAFETY: `raw` is an owned reference or null (then the error is fetched).
        let value = unsafe { Bound::from_owned_ptr_or_err(py, raw) }?;
        // (PyLong_AsVoidPtr: the getter made the int with PyLong_FromVoidPtr; pyo3's generic
        // extraction of a usize takes a slower path in abi3 builds.)
        // SAFETY: `value` is a live object; on anything but an int the call sets an error.
        let address = unsafe { pyo3::ffi::PyLong_AsVoidPtr(value.as_ptr()) } as usize;
        match (address, PyErr::take(py)) {
            (0, Some(error)) => Err(error),
            _ => Ok(address),
        }
    }
}

/// torch's Python tensor object (`THPVariable`, torch/csrc/autograd/python_variable.h) is the
/// object header followed by its `at::Tensor` (in the torch this was written against, 2.13;
/// older versions had a `c10::MaybeOwned<at::Tensor>` there, which the check in
/// `use_tensor_readers` refuses). The word there is its TensorImpl's address, which `_cdata`
/// returns: reading it saves the getter call (its error handling and torch function check cost
/// more than the rest of a tensor's checks).
const THPVARIABLE_TENSOR_OFFSET: usize = std::mem::size_of::<pyo3::ffi::PyObject>();

/// The word at `THPVARIABLE_TENSOR_OFFSET` in `t`.
///
/// # Safety
/// `t` is a live object of a type whose instances are at least `THPVARIABLE_TENSOR_OFFSET + 8`
/// bytes (`__basicsize__`), so the word is inside it; the object header is word-aligned.
unsafe fn object_word(t: *mut pyo3::ffi::PyObject) -> usize {
    // SAFETY: forwarded from this function's contract.
    unsafe { t.cast::<u8>().add(THPVARIABLE_TENSOR_OFFSET).cast::<usize>().read() }
}

/// Registers torch's readers `plan_addresses` uses (see `rsoptim/_optimizer.py`). With
/// `samples` (tensors of the plain types), the TensorImpl addresses are read from the tensor
/// objects themselves if, for every sample, what is there is what `_cdata` returns; returns
/// whether they are.
#[pyfunction]
#[pyo3(signature = (plain_types, cdata, is_neg, torch_function_off, untyped_storage, samples=Vec::new()))]
fn use_tensor_readers(
    plain_types: Vec<Bound<'_, pyo3::types::PyType>>,
    cdata: &Bound<'_, PyAny>,
    is_neg: &Bound<'_, PyAny>,
    torch_function_off: &Bound<'_, PyAny>,
    untyped_storage: &Bound<'_, PyAny>,
    samples: Vec<Bound<'_, PyAny>>,
) -> PyResult<bool> {
    // SAFETY: `cdata` is a live object; PyType_GetSlot reads its type's slot table (static types
    // answer it from Python 3.10 on, this module's minimum), and returns null without one.
    let slot = unsafe { pyo3::ffi::PyType_GetSlot(pyo3::ffi::Py_TYPE(cdata.as_ptr()), pyo3::ffi::Py_tp_descr_get) };
    if slot.is_null() {
        return Err(value_error("cdata must be a descriptor (TensorBase._cdata)"));
    }
    // SAFETY: a non-null Py_tp_descr_get slot is a descrgetfunc (null was refused above).
    let cdata_get: pyo3::ffi::descrgetfunc = unsafe { std::mem::transmute(slot) };
    let mut direct = !samples.is_empty();
    for kind in &plain_types {
        let size: usize = kind.getattr("__basicsize__")?.extract()?;
        direct &= size >= THPVARIABLE_TENSOR_OFFSET + std::mem::size_of::<usize>();
    }
    for t in &samples {
        if !direct || !plain_types.iter().any(|k| t.get_type().is(k)) {
            direct = false;
            break;
        }
        // SAFETY: `t` is of a plain type, each of which was just checked to be large enough.
        let word = unsafe { object_word(t.as_ptr()) };
        direct = cdata.getattr("__get__")?.call1((t,))?.extract::<usize>()? == word;
    }
    *TENSOR_READERS.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(TensorReaders {
        plain_types: plain_types.into_iter().map(Bound::unbind).collect(),
        cdata: cdata.clone().unbind(),
        cdata_get,
        tensor_in_object: direct,
        is_neg: is_neg.clone().unbind(),
        torch_function_off: torch_function_off.clone().unbind(),
        untyped_storage: untyped_storage.clone().unbind(),
    }));
    Ok(direct)
}

/// `tensor_addresses` for a list of tensors themselves: None unless torch function is off (so
/// that torch's readers answer for the memory, not a subclass or mode), every item is a plain
/// `torch.Tensor` or `Parameter` (not a subclass) without a lazy negation bit, and
/// `tensor_addresses` of their TensorImpls is not None. The caller holds `tensors`.
///
/// With `holder`, the storage of each tensor (of those at `hold_from..hold_to`) is appended to it
/// once the addresses are read, with no Python code run in between (the caller has paused the
/// garbage collector, so no finalizer runs as they are made): holding them keeps the memory at
/// those addresses alive even if another thread gives a tensor other memory (`p.data = ...`)
/// while a kernel reads or writes it.
#[pyfunction]
#[pyo3(signature = (tensors, numels, dtypes, shape_of, holder=None, hold_from=0, hold_to=usize::MAX))]
#[allow(clippy::too_many_arguments)]
fn plan_addresses<'py>(
    py: Python<'py>,
    tensors: &Bound<'py, pyo3::types::PyList>,
    numels: &[u8],
    dtypes: &[u8],
    shape_of: &[u8],
    holder: Option<&Bound<'py, pyo3::types::PyList>>,
    hold_from: usize,
    hold_to: usize,
) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
    #[cfg(not(unix))]
    {
        let _ = (py, tensors, numels, dtypes, shape_of, holder, hold_from, hold_to);
        Ok(None)
    }
    #[cfg(unix)]
    {
        // One read of the ABI for the whole call: whether it reads the negation bits decides
        // whether they are read here.
        let Some(abi) = torch_abi() else { return Ok(None) };
        let abi = &*abi;
        let Some(readers) = TENSOR_READERS.read().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(None) };
        if !readers.torch_function_off.bind(py).call0()?.is_truthy()? {
            return Ok(None);
        }
        // (Held here as well.)
        let items: Vec<Bound<'py, PyAny>> = tensors.iter().collect();
        // SAFETY: each item is a live object, held by `items`.
        if !items.iter().all(|t| unsafe { readers.is_plain(t.as_ptr()) }) {
            return Ok(None);
        }
        // Where the checks cannot read the negation bits, torch's `is_neg` is called first: it
        // may allocate (and so run the garbage collector and any finalizer), which must not
        // happen between reading the TensorImpls and checking them.
        if !abi.reads_neg_bit() {
            for t in &items {
                if readers.is_neg.bind(py).call1((t,))?.is_truthy()? {
                    return Ok(None);
                }
            }
        }
        let mut impls = Vec::with_capacity(items.len());
        for t in &items {
            // SAFETY: each item is of a plain type (checked above) and held by `items`.
            match unsafe { readers.tensor_impl(py, t.as_ptr()) }? {
                0 => return Ok(None), // a null TensorImpl: not a tensor the kernels take
                tensor => impls.push(tensor),
            }
        }
        let addresses = checked_by(py, abi, &impls, numels, dtypes, shape_of)?;
        if let (Some(holder), Some(_)) = (holder, &addresses) {
            let untyped_storage = readers.untyped_storage.bind(py);
            for t in items.iter().take(hold_to).skip(hold_from) {
                holder.append(untyped_storage.call1((t,))?)?;
            }
        }
        Ok(addresses)
    }
}

/// What a step plan checks, gathered in one native loop instead of attribute reads and item
/// getters per param: `[*params, *grads, *states]`, where `grads` is each param's `grad` and
/// `states` each of `state_dicts`' values at `keys`, in order. None where a grad is None or a
/// state dict is not a plain dict or lacks a key (the step then takes the general path, which
/// checks everything). Reading a `grad` may run Python code (a `grad` property of a param's
/// class; torch function is off inside `native_reads`), as `p.grad` does; the params are read
/// from a snapshot of `params`.
#[pyfunction]
fn gather_plan_tensors<'py>(
    py: Python<'py>,
    params: &Bound<'py, pyo3::types::PyList>,
    state_dicts: &Bound<'py, pyo3::types::PyList>,
    keys: &Bound<'py, pyo3::types::PyTuple>,
) -> PyResult<Option<Bound<'py, pyo3::types::PyList>>> {
    let keys: Vec<Bound<'py, PyAny>> = keys.iter().collect();
    let count = params.len();
    let mut items = Vec::with_capacity(count * 2 + state_dicts.len() * keys.len());
    items.extend(params.iter()); // (the snapshot the grads are read from)
    let grad = pyo3::intern!(py, "grad");
    for i in 0..count {
        let g = items[i].getattr(grad)?;
        if g.is_none() {
            return Ok(None);
        }
        items.push(g);
    }
    for d in state_dicts.iter() {
        let Ok(d) = d.cast_exact::<pyo3::types::PyDict>() else { return Ok(None) };
        for k in &keys {
            match d.get_item(k)? {
                Some(value) => items.push(value),
                None => return Ok(None),
            }
        }
    }
    Ok(Some(pyo3::types::PyList::new(py, items)?))
}

#[cfg(unix)]
fn pack_words(words: &[usize]) -> Vec<u8> {
    words.iter().flat_map(|&w| (w as u64).to_ne_bytes()).collect()
}

/// Where parallel regions run: "openmp:<path of the runtime>" or "rayon".
#[pyfunction]
fn parallel_backend() -> PyResult<String> {
    let exec = executor()?;
    #[cfg(unix)]
    if let Some(openmp) = exec.openmp() {
        return Ok(format!("openmp:{}", openmp.path()));
    }
    let _ = exec;
    Ok("rayon".to_owned())
}

#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    Ok(executor()?.threads())
}

/// The SIMD path in use: "avx512", "avx2", "neon" or "scalar".
#[pyfunction]
fn simd_level() -> PyResult<&'static str> {
    Ok(executor()?.simd().name())
}

/// Every SIMD path this CPU can run.
#[pyfunction]
fn available_simd_levels() -> Vec<&'static str> {
    SimdLevel::available().into_iter().map(SimdLevel::name).collect()
}

/// Switches the SIMD path for this process (tests use it to run every path).
#[pyfunction]
fn set_simd_level(name: &str) -> PyResult<()> {
    let level = match name {
        "auto" => SimdLevel::best(),
        _ => SimdLevel::parse(name).ok_or_else(|| value_error(format!("unknown SIMD path {name:?}")))?,
    };
    if !level.is_available() {
        return Err(value_error(format!("this CPU cannot run the {level} path")));
    }
    replace_executor(|current| Ok(current.with_simd(level)))
}

fn parse_dtype(name: &str) -> PyResult<Dtype> {
    Dtype::parse(name).map_err(core_error)
}

/// Calls a `*_typed::<P, S>` function with the element types of a param dtype and a state
/// dtype (`None`: the param's, torch.optim's layout): the one place where dtype names become
/// types. Every value is computed in `P::Math` and rounded once when stored as `P` or `S`.
macro_rules! with_param_types {
    ($dtype:expr, $state_dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        let dtype = parse_dtype($dtype)?;
        let state = match $state_dtype {
            Some(name) => parse_dtype(name)?,
            None => dtype,
        };
        match (dtype, state) {
            (Dtype::F32, Dtype::F32) => $f::<f32, f32>($($arg),*),
            (Dtype::F64, Dtype::F64) => $f::<f64, f64>($($arg),*),
            (Dtype::BF16, Dtype::BF16) => $f::<half::bf16, half::bf16>($($arg),*),
            (Dtype::F16, Dtype::F16) => $f::<half::f16, half::f16>($($arg),*),
            (Dtype::BF16, Dtype::F32) => $f::<half::bf16, f32>($($arg),*),
            (Dtype::F16, Dtype::F32) => $f::<half::f16, f32>($($arg),*),
            (dtype, state) => Err(value_error(format!("{dtype:?} params cannot keep {state:?} state"))),
        }
    }};
}

/// Calls a `*_typed::<T>` function with the element type of a dtype name (norms and scales).
macro_rules! with_element_type {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match parse_dtype($dtype)? {
            Dtype::F32 => $f::<f32>($($arg),*),
            Dtype::F64 => $f::<f64>($($arg),*),
            Dtype::BF16 => $f::<half::bf16>($($arg),*),
            Dtype::F16 => $f::<half::f16>($($arg),*),
        }
    };
}

/// Runs `work` with the GIL released, once no other call in flight shares memory with `table`
/// (waiting without the GIL, so the call in flight can finish). `work` makes its slices itself,
/// so no two calls ever hold aliasing ones. A Rust panic becomes a `RuntimeError`, not an abort,
/// and releases the buffers as it unwinds.
fn detached<R: Send>(py: Python<'_>, table: &Table, work: impl FnOnce() -> Result<R, Error> + Send) -> PyResult<R> {
    let outcome = py.detach(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _claim = table.reserve();
            work()
        }))
    });
    match outcome {
        Ok(result) => result.map_err(core_error),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("rsoptim kernel panicked: {msg}")))
        }
    }
}

/// The extensions beyond torch for low-precision params: a master copy of each param (a column
/// of `P::Math` buffers) and stochastic rounding keyed by a seed and a stream number per param.
struct ParamExtensions<'a> {
    master_params: Option<&'a [u8]>,
    stochastic_rounding_seed: Option<u64>,
    streams: Option<&'a [u8]>,
}

/// The parsed extensions: the master column, and each tensor's rounding.
struct ParamExtensionColumns<M> {
    master: Option<Column<M>>,
    rounding: Vec<Rounding>,
}

impl ParamExtensions<'_> {
    fn columns<M>(&self, table: &mut Table) -> PyResult<ParamExtensionColumns<M>> {
        let master =
            self.master_params.map(|a| table.column::<M>("master_param", a, true)).transpose().map_err(core_error)?;
        let rounding = match (self.stochastic_rounding_seed, self.streams) {
            (None, None) => vec![Rounding::Nearest; table.len()],
            (Some(seed), Some(streams)) => {
                let streams = words("streams", streams).map_err(core_error)?;
                table.check_count("streams", streams.len()).map_err(core_error)?;
                streams.into_iter().map(|stream| Rounding::Stochastic { seed, stream: stream as u64 }).collect()
            }
            _ => return Err(value_error("stochastic rounding needs both a seed and a stream per tensor")),
        };
        Ok(ParamExtensionColumns { master, rounding })
    }
}

/// One Adam/AdamW step over a param group (see `rsoptim_core::adam_step`).
#[pyfunction]
#[pyo3(signature = (
    dtype, step_dtype, numels, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
    lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_in_f32=false,
    state_dtype=None, master_params=None, stochastic_rounding_seed=None, streams=None, grad_scale=1.0,
    guard_tensors=None, guard_addresses=None, guard_numels=None
))]
#[allow(clippy::too_many_arguments)]
fn adam_step(
    py: Python<'_>,
    dtype: &str,
    step_dtype: &str,
    numels: &[u8],
    params: &[u8],
    grads: &[u8],
    exp_avgs: &[u8],
    exp_avg_sqs: &[u8],
    max_exp_avg_sqs: Option<&[u8]>,
    steps: &[u8],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_in_f32: bool,
    state_dtype: Option<&str>,
    master_params: Option<&[u8]>,
    stochastic_rounding_seed: Option<u64>,
    streams: Option<&[u8]>,
    grad_scale: f64,
    guard_tensors: Option<Bound<'_, pyo3::types::PyList>>,
    guard_addresses: Option<&[u8]>,
    guard_numels: Option<&[u8]>,
) -> PyResult<()> {
    check_unmoved(py, guard_tensors.as_ref(), guard_addresses, guard_numels)?;
    let hyper = AdamHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        amsgrad,
        maximize,
        decoupled_weight_decay,
        lr_in_f32,
        grad_scale,
    };
    let bufs = AdamBuffers { params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps };
    let ext = ParamExtensions { master_params, stochastic_rounding_seed, streams };
    let step_dtype = parse_dtype(step_dtype)?;
    with_param_types!(dtype, state_dtype, adam_typed(py, numels, bufs, ext, step_dtype, hyper))
}

struct AdamBuffers<'a> {
    params: &'a [u8],
    grads: &'a [u8],
    exp_avgs: &'a [u8],
    exp_avg_sqs: &'a [u8],
    max_exp_avg_sqs: Option<&'a [u8]>,
    steps: &'a [u8],
}

fn adam_typed<P: Element, S: Element<Math = P::Math>>(
    py: Python<'_>,
    numels: &[u8],
    b: AdamBuffers<'_>,
    ext: ParamExtensions<'_>,
    step_dtype: Dtype,
    hyper: AdamHyper,
) -> PyResult<()> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let param = table.column::<P>("param", b.params, true).map_err(core_error)?;
    let grad = table.column::<P>("grad", b.grads, false).map_err(core_error)?;
    let exp_avg = table.column::<S>("exp_avg", b.exp_avgs, true).map_err(core_error)?;
    let exp_avg_sq = table.column::<S>("exp_avg_sq", b.exp_avg_sqs, true).map_err(core_error)?;
    let max_sq =
        b.max_exp_avg_sqs.map(|a| table.column::<S>("max_exp_avg_sq", a, true)).transpose().map_err(core_error)?;
    let step = table.steps(step_dtype, b.steps).map_err(core_error)?;
    let ext = ext.columns::<P::Math>(&mut table)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    detached(py, &table, || {
        // SAFETY: `check` passed and the call holds its reservation; each buffer is sliced once,
        // with the type its column was made with.
        let tensors: Vec<AdamTensor<'_, P, S>> = (0..table.len())
            .map(|i| unsafe {
                AdamTensor {
                    param: table.written(param, i),
                    grad: table.read(grad, i),
                    exp_avg: table.written(exp_avg, i),
                    exp_avg_sq: table.written(exp_avg_sq, i),
                    max_exp_avg_sq: max_sq.map(|c| table.written(c, i)),
                    step: table.step(step, i),
                    master_param: ext.master.map(|c| table.written(c, i)),
                    rounding: ext.rounding[i],
                }
            })
            .collect();
        rsoptim_core::adam_step(tensors, &hyper, &exec)
    })
}

/// One Adam/AdamW step with block-wise 8-bit states over a param group (see
/// `rsoptim_core::adam8bit_step`): for each tensor, two columns of byte codes (one per element)
/// and two of float32 scales (one per `QUANT_BLOCK` elements).
#[pyfunction]
#[pyo3(signature = (
    dtype, step_dtype, numels, params, grads, exp_avg_codes, exp_avg_sq_codes, exp_avg_scales,
    exp_avg_sq_scales, steps, *, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay,
    lr_in_f32=false, master_params=None, stochastic_rounding_seed=None, streams=None, grad_scale=1.0,
    guard_tensors=None, guard_addresses=None, guard_numels=None
))]
#[allow(clippy::too_many_arguments)]
fn adam8bit_step(
    py: Python<'_>,
    dtype: &str,
    step_dtype: &str,
    numels: &[u8],
    params: &[u8],
    grads: &[u8],
    exp_avg_codes: &[u8],
    exp_avg_sq_codes: &[u8],
    exp_avg_scales: &[u8],
    exp_avg_sq_scales: &[u8],
    steps: &[u8],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_in_f32: bool,
    master_params: Option<&[u8]>,
    stochastic_rounding_seed: Option<u64>,
    streams: Option<&[u8]>,
    grad_scale: f64,
    guard_tensors: Option<Bound<'_, pyo3::types::PyList>>,
    guard_addresses: Option<&[u8]>,
    guard_numels: Option<&[u8]>,
) -> PyResult<()> {
    check_unmoved(py, guard_tensors.as_ref(), guard_addresses, guard_numels)?;
    let hyper = AdamHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        amsgrad: false,
        maximize,
        decoupled_weight_decay,
        lr_in_f32,
        grad_scale,
    };
    let bufs =
        Adam8bitBuffers { params, grads, exp_avg_codes, exp_avg_sq_codes, exp_avg_scales, exp_avg_sq_scales, steps };
    let ext = ParamExtensions { master_params, stochastic_rounding_seed, streams };
    let step_dtype = parse_dtype(step_dtype)?;
    match parse_dtype(dtype)? {
        Dtype::F32 => adam8bit_typed::<f32>(py, numels, bufs, ext, step_dtype, hyper),
        Dtype::BF16 => adam8bit_typed::<half::bf16>(py, numels, bufs, ext, step_dtype, hyper),
        Dtype::F16 => adam8bit_typed::<half::f16>(py, numels, bufs, ext, step_dtype, hyper),
        Dtype::F64 => Err(value_error("8-bit states are for float32, bfloat16 and float16 params, not float64")),
    }
}

struct Adam8bitBuffers<'a> {
    params: &'a [u8],
    grads: &'a [u8],
    exp_avg_codes: &'a [u8],
    exp_avg_sq_codes: &'a [u8],
    exp_avg_scales: &'a [u8],
    exp_avg_sq_scales: &'a [u8],
    steps: &'a [u8],
}

fn adam8bit_typed<P: Element<Math = f32>>(
    py: Python<'_>,
    numels: &[u8],
    b: Adam8bitBuffers<'_>,
    ext: ParamExtensions<'_>,
    step_dtype: Dtype,
    hyper: AdamHyper,
) -> PyResult<()> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let param = table.column::<P>("param", b.params, true).map_err(core_error)?;
    let grad = table.column::<P>("grad", b.grads, false).map_err(core_error)?;
    let m_codes = table.column::<u8>("exp_avg codes", b.exp_avg_codes, true).map_err(core_error)?;
    let v_codes = table.column::<u8>("exp_avg_sq codes", b.exp_avg_sq_codes, true).map_err(core_error)?;
    let m_scales =
        table.column_of_lengths::<f32>("exp_avg scales", b.exp_avg_scales, true, quant_blocks).map_err(core_error)?;
    let v_scales = table
        .column_of_lengths::<f32>("exp_avg_sq scales", b.exp_avg_sq_scales, true, quant_blocks)
        .map_err(core_error)?;
    let step = table.steps(step_dtype, b.steps).map_err(core_error)?;
    let ext = ext.columns::<f32>(&mut table)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    detached(py, &table, || {
        // SAFETY: `check` passed and the call holds its reservation; each buffer is sliced once,
        // with the type its column was made with.
        let tensors: Vec<Adam8bitTensor<'_, P>> = (0..table.len())
            .map(|i| unsafe {
                Adam8bitTensor {
                    param: table.written(param, i),
                    grad: table.read(grad, i),
                    exp_avg_codes: table.written(m_codes, i),
                    exp_avg_sq_codes: table.written(v_codes, i),
                    exp_avg_scales: table.written(m_scales, i),
                    exp_avg_sq_scales: table.written(v_scales, i),
                    step: table.step(step, i),
                    master_param: ext.master.map(|c| table.written(c, i)),
                    rounding: ext.rounding[i],
                }
            })
            .collect();
        rsoptim_core::adam8bit_step(tensors, &hyper, &exec)
    })
}

/// One SGD step over a param group (see `rsoptim_core::sgd_step`).
#[pyfunction]
#[pyo3(signature = (
    dtype, numels, params, grads, momentum_buffers, momentum_buffers_are_new, *,
    lr, momentum, dampening, weight_decay, nesterov, maximize, state_dtype=None,
    master_params=None, stochastic_rounding_seed=None, streams=None, step_dtype=None, steps=None,
    grad_scale=1.0, guard_tensors=None, guard_addresses=None, guard_numels=None
))]
#[allow(clippy::too_many_arguments)]
fn sgd_step(
    py: Python<'_>,
    dtype: &str,
    numels: &[u8],
    params: &[u8],
    grads: &[u8],
    momentum_buffers: Option<&[u8]>,
    momentum_buffers_are_new: Vec<bool>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    state_dtype: Option<&str>,
    master_params: Option<&[u8]>,
    stochastic_rounding_seed: Option<u64>,
    streams: Option<&[u8]>,
    step_dtype: Option<&str>,
    steps: Option<&[u8]>,
    grad_scale: f64,
    guard_tensors: Option<Bound<'_, pyo3::types::PyList>>,
    guard_addresses: Option<&[u8]>,
    guard_numels: Option<&[u8]>,
) -> PyResult<()> {
    check_unmoved(py, guard_tensors.as_ref(), guard_addresses, guard_numels)?;
    let hyper = SgdHyper { lr, momentum, dampening, weight_decay, nesterov, maximize, grad_scale };
    let bufs = SgdBuffers { params, grads, momentum_buffers, are_new: momentum_buffers_are_new };
    let ext = ParamExtensions { master_params, stochastic_rounding_seed, streams };
    let steps = match (step_dtype, steps) {
        (Some(dtype), Some(steps)) => Some((parse_dtype(dtype)?, steps)),
        (None, None) => None,
        _ => return Err(value_error("step counts need both a step_dtype and a column of steps")),
    };
    with_param_types!(dtype, state_dtype, sgd_typed(py, numels, bufs, ext, steps, hyper))
}

struct SgdBuffers<'a> {
    params: &'a [u8],
    grads: &'a [u8],
    momentum_buffers: Option<&'a [u8]>,
    are_new: Vec<bool>,
}

fn sgd_typed<P: Element, S: Element<Math = P::Math>>(
    py: Python<'_>,
    numels: &[u8],
    b: SgdBuffers<'_>,
    ext: ParamExtensions<'_>,
    steps: Option<(Dtype, &[u8])>,
    hyper: SgdHyper,
) -> PyResult<()> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let param = table.column::<P>("param", b.params, true).map_err(core_error)?;
    let grad = table.column::<P>("grad", b.grads, false).map_err(core_error)?;
    let buf =
        b.momentum_buffers.map(|a| table.column::<S>("momentum_buffer", a, true)).transpose().map_err(core_error)?;
    let are_new = b.are_new;
    table.check_count("momentum_buffers_are_new", are_new.len()).map_err(core_error)?;
    let step = steps.map(|(dtype, addrs)| table.steps(dtype, addrs)).transpose().map_err(core_error)?;
    let ext = ext.columns::<P::Math>(&mut table)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    detached(py, &table, || {
        // SAFETY: `check` passed and the call holds its reservation; each buffer is sliced once,
        // with the type its column was made with.
        let tensors: Vec<SgdTensor<'_, P, S>> = (0..table.len())
            .map(|i| unsafe {
                SgdTensor {
                    param: table.written(param, i),
                    grad: table.read(grad, i),
                    momentum_buffer: buf.map(|c| table.written(c, i)),
                    momentum_buffer_is_new: are_new[i],
                    master_param: ext.master.map(|c| table.written(c, i)),
                    rounding: ext.rounding[i],
                    step: step.map(|c| table.step(c, i)),
                }
            })
            .collect();
        rsoptim_core::sgd_step(tensors, &hyper, &exec)
    })
}

/// One RMSprop step over a param group (see `rsoptim_core::rmsprop_step`).
#[pyfunction]
#[pyo3(signature = (
    dtype, step_dtype, numels, params, grads, square_avgs, momentum_buffers, grad_avgs, steps, *,
    lr, alpha, eps, weight_decay, momentum, centered, maximize, state_dtype=None,
    master_params=None, stochastic_rounding_seed=None, streams=None, grad_scale=1.0,
    guard_tensors=None, guard_addresses=None, guard_numels=None
))]
#[allow(clippy::too_many_arguments)]
fn rmsprop_step(
    py: Python<'_>,
    dtype: &str,
    step_dtype: &str,
    numels: &[u8],
    params: &[u8],
    grads: &[u8],
    square_avgs: &[u8],
    momentum_buffers: Option<&[u8]>,
    grad_avgs: Option<&[u8]>,
    steps: &[u8],
    lr: f64,
    alpha: f64,
    eps: f64,
    weight_decay: f64,
    momentum: f64,
    centered: bool,
    maximize: bool,
    state_dtype: Option<&str>,
    master_params: Option<&[u8]>,
    stochastic_rounding_seed: Option<u64>,
    streams: Option<&[u8]>,
    grad_scale: f64,
    guard_tensors: Option<Bound<'_, pyo3::types::PyList>>,
    guard_addresses: Option<&[u8]>,
    guard_numels: Option<&[u8]>,
) -> PyResult<()> {
    check_unmoved(py, guard_tensors.as_ref(), guard_addresses, guard_numels)?;
    let hyper = RmspropHyper { lr, alpha, eps, weight_decay, momentum, centered, maximize, grad_scale };
    let bufs = RmspropBuffers { params, grads, square_avgs, momentum_buffers, grad_avgs, steps };
    let ext = ParamExtensions { master_params, stochastic_rounding_seed, streams };
    let step_dtype = parse_dtype(step_dtype)?;
    with_param_types!(dtype, state_dtype, rmsprop_typed(py, numels, bufs, ext, step_dtype, hyper))
}

struct RmspropBuffers<'a> {
    params: &'a [u8],
    grads: &'a [u8],
    square_avgs: &'a [u8],
    momentum_buffers: Option<&'a [u8]>,
    grad_avgs: Option<&'a [u8]>,
    steps: &'a [u8],
}

fn rmsprop_typed<P: Element, S: Element<Math = P::Math>>(
    py: Python<'_>,
    numels: &[u8],
    b: RmspropBuffers<'_>,
    ext: ParamExtensions<'_>,
    step_dtype: Dtype,
    hyper: RmspropHyper,
) -> PyResult<()> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let param = table.column::<P>("param", b.params, true).map_err(core_error)?;
    let grad = table.column::<P>("grad", b.grads, false).map_err(core_error)?;
    let square_avg = table.column::<S>("square_avg", b.square_avgs, true).map_err(core_error)?;
    let buf =
        b.momentum_buffers.map(|a| table.column::<S>("momentum_buffer", a, true)).transpose().map_err(core_error)?;
    let grad_avg = b.grad_avgs.map(|a| table.column::<S>("grad_avg", a, true)).transpose().map_err(core_error)?;
    let step = table.steps(step_dtype, b.steps).map_err(core_error)?;
    let ext = ext.columns::<P::Math>(&mut table)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    detached(py, &table, || {
        // SAFETY: `check` passed and the call holds its reservation; each buffer is sliced once,
        // with the type its column was made with.
        let tensors: Vec<RmspropTensor<'_, P, S>> = (0..table.len())
            .map(|i| unsafe {
                RmspropTensor {
                    param: table.written(param, i),
                    grad: table.read(grad, i),
                    square_avg: table.written(square_avg, i),
                    momentum_buffer: buf.map(|c| table.written(c, i)),
                    grad_avg: grad_avg.map(|c| table.written(c, i)),
                    step: table.step(step, i),
                    master_param: ext.master.map(|c| table.written(c, i)),
                    rounding: ext.rounding[i],
                }
            })
            .collect();
        rsoptim_core::rmsprop_step(tensors, &hyper, &exec)
    })
}

/// Writes low-precision params from float32 values computed outside the kernels (torch's step
/// on float32 copies), rounded as a kernel step with the same rounding would write them.
#[pyfunction]
#[pyo3(signature = (
    dtype, numels, sources, params, steps, *, stochastic_rounding_seed=None, streams=None, guard_tensors=None,
    guard_addresses=None, guard_numels=None
))]
#[allow(clippy::too_many_arguments)]
fn round_params(
    py: Python<'_>,
    dtype: &str,
    numels: &[u8],
    sources: &[u8],
    params: &[u8],
    steps: Vec<f64>,
    stochastic_rounding_seed: Option<u64>,
    streams: Option<&[u8]>,
    guard_tensors: Option<Bound<'_, pyo3::types::PyList>>,
    guard_addresses: Option<&[u8]>,
    guard_numels: Option<&[u8]>,
) -> PyResult<()> {
    check_unmoved(py, guard_tensors.as_ref(), guard_addresses, guard_numels)?;
    let ext = ParamExtensions { master_params: None, stochastic_rounding_seed, streams };
    with_element_type!(dtype, round_typed(py, numels, sources, params, steps, ext))
}

fn round_typed<P: Element>(
    py: Python<'_>,
    numels: &[u8],
    sources: &[u8],
    params: &[u8],
    steps: Vec<f64>,
    ext: ParamExtensions<'_>,
) -> PyResult<()> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let source = table.column::<P::Math>("source", sources, false).map_err(core_error)?;
    let param = table.column::<P>("param", params, true).map_err(core_error)?;
    table.check_count("steps", steps.len()).map_err(core_error)?;
    let ext = ext.columns::<P::Math>(&mut table)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    detached(py, &table, || {
        // SAFETY: `check` passed and the call holds its reservation; each written buffer is
        // sliced once, with the type its column was made with.
        let tensors: Vec<RoundTensor<'_, P>> = (0..table.len())
            .map(|i| unsafe {
                RoundTensor {
                    param: table.written(param, i),
                    source: table.read(source, i),
                    rounding: ext.rounding[i],
                    step: steps[i],
                }
            })
            .collect();
        rsoptim_core::round_into(tensors, &exec)
    })
}

/// The `norm_type`-norm of each buffer, in float64.
#[pyfunction]
#[pyo3(signature = (dtype, numels, tensors, norm_type, *, guard_tensors=None, guard_addresses=None, guard_numels=None))]
#[allow(clippy::too_many_arguments)]
fn tensor_norms(
    py: Python<'_>,
    dtype: &str,
    numels: &[u8],
    tensors: &[u8],
    norm_type: f64,
    guard_tensors: Option<Bound<'_, pyo3::types::PyList>>,
    guard_addresses: Option<&[u8]>,
    guard_numels: Option<&[u8]>,
) -> PyResult<Vec<f64>> {
    check_unmoved(py, guard_tensors.as_ref(), guard_addresses, guard_numels)?;
    let norm = NormType::from_p(norm_type).map_err(core_error)?;
    with_element_type!(dtype, norms_typed(py, numels, tensors, norm))
}

fn norms_typed<T: Element>(py: Python<'_>, numels: &[u8], tensors: &[u8], norm: NormType) -> PyResult<Vec<f64>> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let col = table.column::<T>("tensor", tensors, false).map_err(core_error)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    detached(py, &table, || {
        // SAFETY: `check` passed and the call holds its reservation; read-only slices only.
        let slices: Vec<&[T]> = (0..table.len()).map(|i| unsafe { table.read(col, i) }).collect();
        Ok(rsoptim_core::tensor_norms(&slices, norm, &exec))
    })
}

/// `x *= factor` (rounded to the buffers' dtype) for every buffer.
#[pyfunction]
#[pyo3(signature = (dtype, numels, tensors, factor, *, guard_tensors=None, guard_addresses=None, guard_numels=None))]
#[allow(clippy::too_many_arguments)]
fn scale_(
    py: Python<'_>,
    dtype: &str,
    numels: &[u8],
    tensors: &[u8],
    factor: f64,
    guard_tensors: Option<Bound<'_, pyo3::types::PyList>>,
    guard_addresses: Option<&[u8]>,
    guard_numels: Option<&[u8]>,
) -> PyResult<()> {
    check_unmoved(py, guard_tensors.as_ref(), guard_addresses, guard_numels)?;
    with_element_type!(dtype, scale_typed(py, numels, tensors, factor))
}

fn scale_typed<T: Element>(py: Python<'_>, numels: &[u8], tensors: &[u8], factor: f64) -> PyResult<()> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let col = table.column::<T>("tensor", tensors, true).map_err(core_error)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    detached(py, &table, || {
        // SAFETY: `check` passed and the call holds its reservation; each buffer is sliced once.
        let slices: Vec<&mut [T]> = (0..table.len()).map(|i| unsafe { table.written(col, i) }).collect();
        rsoptim_core::scale_in_place(slices, T::Math::round_from(factor), &exec);
        Ok(())
    })
}

/// The roofline probe: `w += read` for each written buffer of each tensor (1 to 4 written).
#[pyfunction]
fn stream_probe(py: Python<'_>, dtype: &str, numels: &[u8], read: &[u8], written: Vec<Vec<u8>>) -> PyResult<()> {
    match parse_dtype(dtype)? {
        Dtype::F32 => stream_typed::<f32>(py, numels, read, written),
        Dtype::F64 => stream_typed::<f64>(py, numels, read, written),
        dtype => Err(value_error(format!("stream runs on float32 or float64, not {dtype:?}"))),
    }
}

fn stream_typed<T: Real>(py: Python<'_>, numels: &[u8], read: &[u8], written: Vec<Vec<u8>>) -> PyResult<()> {
    let mut table = Table::new(numels).map_err(core_error)?;
    let read_col = table.column::<T>("read", read, false).map_err(core_error)?;
    let cols = written
        .iter()
        .map(|w| table.column::<T>("written", w, true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(core_error)?;
    table.check().map_err(core_error)?;
    let exec = executor()?;
    macro_rules! run_with {
        ($w:literal) => {{
            detached(py, &table, || {
                let tensors: Vec<StreamTensor<'_, T, $w>> = (0..table.len())
                    // SAFETY: `check` passed and the call holds its reservation; each buffer is
                    // sliced once, with its column's type.
                    .map(|i| unsafe {
                        StreamTensor {
                            read: table.read(read_col, i),
                            written: std::array::from_fn(|k| table.written(cols[k], i)),
                        }
                    })
                    .collect();
                rsoptim_core::roofline::stream(tensors, &exec)
            })
        }};
    }
    match cols.len() {
        1 => run_with!(1),
        2 => run_with!(2),
        3 => run_with!(3),
        4 => run_with!(4),
        n => Err(value_error(format!("stream_probe takes 1 to 4 written buffers per tensor, not {n}"))),
    }
}

#[pymodule]
fn _rsoptim(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(adam8bit_step, m)?)?;
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    m.add_function(wrap_pyfunction!(rmsprop_step, m)?)?;
    m.add_function(wrap_pyfunction!(round_params, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_norms, m)?)?;
    m.add_function(wrap_pyfunction!(scale_, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(use_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(use_torch_abi, m)?)?;
    m.add_function(wrap_pyfunction!(torch_abi_reads_neg_bit, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_addresses, m)?)?;
    m.add_function(wrap_pyfunction!(use_tensor_readers, m)?)?;
    m.add_function(wrap_pyfunction!(plan_addresses, m)?)?;
    m.add_function(wrap_pyfunction!(gather_plan_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(reset_after_fork, m)?)?;
    m.add_function(wrap_pyfunction!(pause_collector, m)?)?;
    m.add_function(wrap_pyfunction!(resume_collector, m)?)?;
    m.add_function(wrap_pyfunction!(at_resume, m)?)?;
    m.add_function(wrap_pyfunction!(collector_pauses, m)?)?;
    m.add_function(wrap_pyfunction!(parallel_backend, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(stream_probe, m)?)?;
    m.add_function(wrap_pyfunction!(allocation_counters, m)?)?;
    m.add("CHUNK", rsoptim_core::CHUNK)?;
    m.add("QUANT_BLOCK", rsoptim_core::QUANT_BLOCK)?;
    m.add("BufferOverlapError", m.py().get_type::<BufferOverlapError>())?;
    m.add("MemoryMovedError", m.py().get_type::<MemoryMovedError>())?;
    Ok(())
}
