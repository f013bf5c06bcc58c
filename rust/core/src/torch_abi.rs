//! Reading torch tensors' metadata through libtorch's stable C shim (the `aoti_torch_*` functions
//! it exports for AOTInductor), so that the step plan can re-check every tensor of a step with
//! native calls instead of several Python attribute reads per tensor.
//!
//! A tensor is named by the address of its `c10::TensorImpl` (Python's `Tensor._cdata`). The
//! shim takes an `AtenTensorHandle`, which is an `at::Tensor*`; an `at::Tensor` is a single
//! intrusive pointer to its `TensorImpl`, so the address of a word that holds the TensorImpl's
//! address is such a handle. The shim reads through it and never frees the tensor (asking for
//! the data address materialises a lazily cloned tensor, as `Tensor.data_ptr()` does in Python),
//! and each of its functions turns a C++ exception into an error code. The Python layer
//! checks at import that what this reads agrees with torch's own accessors before using it.

use std::ffi::c_void;
use std::sync::Arc;

type Handle = *const *const c_void; // at::Tensor*: a pointer to a word holding a TensorImpl*
type Status = i32; // AOTITorchError: 0 on success
type GetPtr = unsafe extern "C" fn(Handle, *mut *mut c_void) -> Status;
type GetI64 = unsafe extern "C" fn(Handle, *mut i64) -> Status;
type GetI32 = unsafe extern "C" fn(Handle, *mut i32) -> Status;
type GetI64s = unsafe extern "C" fn(Handle, *mut *const i64) -> Status;
type GetBool = unsafe extern "C" fn(Handle, *mut bool) -> Status;
/// `bool at::native::is_neg(const at::Tensor&)`. Under the Itanium C++ ABI (Linux and macOS on
/// x86-64 and AArch64) a free function taking a reference is called as a C function taking a
/// pointer, the same `Handle` the shim takes; it returns the tensor's negation bit (a read of
/// its dispatch key set) and has no path that throws.
type IsNeg = unsafe extern "C" fn(Handle) -> bool;

/// `c10::ScalarType` codes of the dtypes the step plan checks, with their element sizes.
pub const UINT8: i32 = 0;
pub const FLOAT16: i32 = 5;
pub const FLOAT32: i32 = 6;
pub const FLOAT64: i32 = 7;
pub const BFLOAT16: i32 = 15;
/// `c10::DeviceType::CPU` and `c10::Layout::Strided`.
const CPU: i32 = 0;
const STRIDED: i32 = 0;

fn element_size(dtype: i32) -> Option<i64> {
    match dtype {
        UINT8 => Some(1), // the codes of 8-bit optimizer states
        FLOAT16 | BFLOAT16 => Some(2),
        FLOAT32 => Some(4),
        FLOAT64 => Some(8),
        _ => None,
    }
}

/// What one tensor of a step must be for the step plan's addresses to stay valid.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub numel: usize,
    /// A `c10::ScalarType` code (`FLOAT32` or `FLOAT64`).
    pub dtype: i32,
    /// The index of the tensor whose sizes this one must have (its own index for none).
    pub shape_of: usize,
}

/// libtorch's shim functions, resolved in an already loaded libtorch.
#[derive(Clone)]
pub struct TorchAbi {
    data_ptr: GetPtr,
    dim: GetI64,
    sizes: GetI64s,
    numel: GetI64,
    storage_size: GetI64,
    storage_offset: GetI64,
    dtype: GetI32,
    device_type: GetI32,
    layout: GetI32,
    is_contiguous: GetBool,
    /// The negation bit's reader, where libtorch exports it and the caller asked for it; else
    /// the caller checks `Tensor.is_neg()` itself (see `reads_neg_bit`).
    is_neg: Option<IsNeg>,
    path: String,
    // Keeps libtorch loaded while the function pointers may be called.
    _library: Arc<libloading::os::unix::Library>,
}

impl std::fmt::Debug for TorchAbi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchAbi").field("path", &self.path).finish()
    }
}

impl TorchAbi {
    /// The shim of the libtorch at `path` if this process has already loaded it and it exports
    /// every function used here; nothing is loaded here. With `read_neg_bit`, the checks also
    /// refuse tensors with a negation bit, where libtorch exports `at::native::is_neg`.
    pub fn already_loaded(path: &str, read_neg_bit: bool) -> Option<Self> {
        // SAFETY: with RTLD_NOLOAD, dlopen only returns a handle to a library that is already
        // loaded and initialised; it never maps or initialises anything.
        let library =
            unsafe { libloading::os::unix::Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_NOLOAD) }.ok()?;
        macro_rules! symbol {
            ($name:literal, $ty:ty) => {
                // SAFETY: each `aoti_torch_*` function has the C signature of its type alias in
                // torch/csrc/inductor/aoti_torch/c/shim.h, and `_library` keeps it loaded while
                // the pointer is kept.
                unsafe { *library.get::<$ty>(concat!($name, "\0").as_bytes()).ok()? }
            };
        }
        Some(Self {
            data_ptr: symbol!("aoti_torch_get_data_ptr", GetPtr),
            dim: symbol!("aoti_torch_get_dim", GetI64),
            sizes: symbol!("aoti_torch_get_sizes", GetI64s),
            numel: symbol!("aoti_torch_get_numel", GetI64),
            storage_size: symbol!("aoti_torch_get_storage_size", GetI64),
            storage_offset: symbol!("aoti_torch_get_storage_offset", GetI64),
            dtype: symbol!("aoti_torch_get_dtype", GetI32),
            device_type: symbol!("aoti_torch_get_device_type", GetI32),
            layout: symbol!("aoti_torch_get_layout", GetI32),
            is_contiguous: symbol!("aoti_torch_is_contiguous", GetBool),
            is_neg: read_neg_bit
                .then(|| {
                    // SAFETY: the mangled name of `at::native::is_neg(at::Tensor const&)`, of the
                    // type `IsNeg` (see there); `_library` keeps it loaded while it is kept.
                    unsafe { library.get::<IsNeg>(b"_ZN2at6native6is_negERKNS_6TensorE\0") }.ok().map(|f| *f)
                })
                .flatten(),
            path: path.to_owned(),
            _library: Arc::new(library),
        })
    }

    /// Whether the checks refuse tensors with a negation bit (else the caller must).
    pub fn reads_neg_bit(&self) -> bool {
        self.is_neg.is_some()
    }

    /// The data address of every tensor, if each is a defined, contiguous, strided CPU tensor of
    /// its expected dtype and element count, with the sizes of the tensor it is tied to, whose
    /// elements all lie inside its storage, and (where `reads_neg_bit`) without a negation bit;
    /// None otherwise (also if the shim reports an error).
    ///
    /// # Safety
    /// Each of `impls` must be the address of a `c10::TensorImpl` that stays alive during the
    /// call (the caller holds its tensor), and `expected` must have one entry per tensor.
    pub unsafe fn checked_addresses(&self, impls: &[usize], expected: &[Expected]) -> Option<Vec<usize>> {
        if impls.len() != expected.len() || expected.iter().any(|e| e.shape_of >= impls.len()) {
            return None;
        }
        impls.iter().take(PREFETCH_AHEAD).for_each(|&t| prefetch_impl(t));
        impls
            .iter()
            .zip(expected)
            .enumerate()
            .map(|(i, (&tensor, want))| {
                if let Some(&ahead) = impls.get(i + PREFETCH_AHEAD) {
                    prefetch_impl(ahead);
                }
                // SAFETY: forwarded from this function's contract.
                unsafe { self.check_one(tensor, want, impls[want.shape_of]) }
            })
            .collect()
    }

    /// Whether the tensor whose TensorImpl is at `tensor` still has its data at `address`, with
    /// `numel` elements of its dtype from there inside its storage (false if the shim reports
    /// an error): a kernel's last check of what its caller checked. Resizing a storage in place
    /// moves its memory (torch allocates the new block before it frees the old one), but two
    /// resizes can bring it back to the old address, smaller: so the bounds are read too.
    ///
    /// # Safety
    /// `tensor` must be the address of a `c10::TensorImpl` that stays alive during the call.
    pub unsafe fn still_inside(&self, tensor: usize, address: usize, numel: usize) -> bool {
        let word = tensor as *const c_void;
        let handle: Handle = &word;
        let inside = || -> Option<bool> {
            // SAFETY: `handle` names a live TensorImpl (this function's contract).
            if unsafe { read(self.data_ptr, handle, std::ptr::null_mut()) }? as usize != address {
                return Some(false);
            }
            if numel == 0 {
                return Some(true);
            }
            // SAFETY: as above.
            let item = element_size(unsafe { read(self.dtype, handle, -1) }?)?;
            // SAFETY: as above.
            unsafe { self.holds(handle, i64::try_from(numel).ok()?, item) }
        };
        inside().unwrap_or(false)
    }

    /// Whether `numel` elements of `item` bytes from the tensor's storage offset lie inside its
    /// storage (a storage resized in place may be smaller than its tensors); None if the shim
    /// reports an error.
    ///
    /// # Safety
    /// `handle` names a `c10::TensorImpl` that stays alive during the call.
    unsafe fn holds(&self, handle: Handle, numel: i64, item: i64) -> Option<bool> {
        // SAFETY: forwarded from this function's contract.
        let (offset, bytes) = unsafe { (read(self.storage_offset, handle, -1)?, read(self.storage_size, handle, -1)?) };
        let end = offset.checked_add(numel)?.checked_mul(item)?;
        Some(offset >= 0 && end <= bytes)
    }

    /// # Safety
    /// As for `checked_addresses`, for `tensor` and `shape_of`.
    unsafe fn check_one(&self, tensor: usize, want: &Expected, shape_of: usize) -> Option<usize> {
        let word = tensor as *const c_void;
        let handle: Handle = &word;
        // Each shim call below reads one field of a live TensorImpl (see the module docs).
        macro_rules! get {
            ($f:ident, $h:expr, $init:expr) => {
                // SAFETY: `$h` names a live TensorImpl for the duration of the call (this
                // function's contract).
                unsafe { read(self.$f, $h, $init) }
            };
        }
        let numel = get!(numel, handle, 0i64)?;
        let dtype = get!(dtype, handle, -1i32)?;
        let item = element_size(dtype)?;
        if usize::try_from(numel).ok()? != want.numel || dtype != want.dtype {
            return None;
        }
        if get!(device_type, handle, -1i32)? != CPU || get!(layout, handle, -1i32)? != STRIDED {
            return None;
        }
        if !get!(is_contiguous, handle, false)? {
            return None;
        }
        // SAFETY: as the shim calls: `handle` names a live TensorImpl (this function's contract).
        if self.is_neg.is_some_and(|is_neg| unsafe { is_neg(handle) }) {
            return None; // a lazy negation: the memory holds the values' negatives
        }
        if shape_of != tensor {
            let other_word = shape_of as *const c_void;
            let other: Handle = &other_word;
            let (dim, other_dim) = (get!(dim, handle, -1i64)?, get!(dim, other, -1i64)?);
            let (sizes, other_sizes) = (get!(sizes, handle, std::ptr::null())?, get!(sizes, other, std::ptr::null())?);
            if dim != other_dim || dim < 0 {
                return None;
            }
            if dim > 0 {
                if sizes.is_null() || other_sizes.is_null() {
                    return None;
                }
                let dim = usize::try_from(dim).ok()?;
                // SAFETY: the shim returns a pointer to the tensor's `dim` sizes, owned by its
                // TensorImpl, which is alive and unchanged during this call.
                let (a, b) =
                    unsafe { (std::slice::from_raw_parts(sizes, dim), std::slice::from_raw_parts(other_sizes, dim)) };
                if a != b {
                    return None;
                }
            }
        }
        let address = get!(data_ptr, handle, std::ptr::null_mut())? as usize;
        // Every element inside the storage.
        // SAFETY: as the shim calls above.
        if numel > 0 && (address == 0 || !unsafe { self.holds(handle, numel, item) }?) {
            return None;
        }
        Some(address)
    }
}

/// One field of a live TensorImpl, read through the shim function `f` into a local started at
/// `init`; None on a non-zero status.
///
/// # Safety
/// `handle` names a `c10::TensorImpl` that stays alive during the call, and `f` is a shim
/// getter that writes one `T`.
unsafe fn read<T>(f: unsafe extern "C" fn(Handle, *mut T) -> Status, handle: Handle, init: T) -> Option<T> {
    let mut out = init;
    // SAFETY: forwarded from this function's contract; `out` is a live local of the type `f` writes.
    (unsafe { f(handle, &mut out) } == 0).then_some(out)
}

/// How many tensors ahead of its checks each TensorImpl is prefetched (on a 400-param step after
/// a forward/backward, 8 and 16 measured alike and best of 4 to 32).
const PREFETCH_AHEAD: usize = 16;

/// Starts loading the first four cache lines of a TensorImpl, so that the checks' reads of many
/// tensors whose metadata has left the caches (as after a forward/backward) overlap instead of
/// waiting one after another.
fn prefetch_impl(tensor: usize) {
    for line in 0..4 {
        crate::simd::prefetch((tensor as *const u8).wrapping_add(64 * line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_that_is_not_loaded_is_not_used() {
        // RTLD_NOLOAD: nothing is loaded, so no shim comes back for a library not in the process
        // (the Python tests exercise the shim of torch's own libtorch).
        assert!(TorchAbi::already_loaded("/nonexistent/libtorch_cpu.so", true).is_none());
        assert!(TorchAbi::already_loaded("libc.so.6", true).is_none(), "libc has no aoti_torch_* functions");
    }

    #[test]
    fn only_the_planned_dtypes_have_an_element_size() {
        assert_eq!((element_size(FLOAT32), element_size(FLOAT64)), (Some(4), Some(8)));
        assert_eq!((element_size(FLOAT16), element_size(BFLOAT16)), (Some(2), Some(2)));
        assert_eq!(element_size(UINT8), Some(1));
        assert_eq!(element_size(9), None); // complex64: plans never hold complex params
        assert_eq!(element_size(255), None); // what the Python layer passes for "no dtype"
    }
}
