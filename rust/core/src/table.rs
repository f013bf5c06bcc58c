//! The buffers of one call as the Python layer sends them, parsed without Python.
//!
//! For every role (param, grad, a state) the Python layer packs one column: each tensor's address
//! as a native-endian 64-bit word (`array('Q', ...).tobytes()`), next to one column of element
//! counts shared by all roles. A [`Table`] turns those columns into [`Buffer`]s, checks them all
//! together (`raw::check_buffers`), reserves them for the call (`inflight::reserve`) and then
//! hands out the slices. Malformed input of any kind is an [`Error`], never a panic: this is the
//! boundary to code we do not control.

use std::marker::PhantomData;

use crate::error::Error;
use crate::inflight::{reserve_each, Reservation};
use crate::raw::{address_order, check_buffers_in_order, slice, slice_mut, Buffer};
use crate::step::StepCount;

/// The dtype of a column's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    BF16,
    F16,
}

impl Dtype {
    /// torch's name of the dtype (`"float32"`, `"float64"`, `"bfloat16"`, `"float16"`).
    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "float32" => Ok(Self::F32),
            "float64" => Ok(Self::F64),
            "bfloat16" => Ok(Self::BF16),
            "float16" => Ok(Self::F16),
            _ => Err(Error::InvalidArgument(format!(
                "rsoptim kernels run on float32, float64, bfloat16 or float16, not {name}"
            ))),
        }
    }
}

/// A column of addresses or element counts: native-endian 64-bit words.
pub fn words(role: &str, bytes: &[u8]) -> Result<Vec<usize>, Error> {
    if !bytes.len().is_multiple_of(8) {
        return Err(Error::InvalidArgument(format!(
            "{role}: {} bytes is not a whole number of 64-bit words",
            bytes.len()
        )));
    }
    bytes
        .chunks_exact(8)
        .map(|w| {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            let word = u64::from_ne_bytes(word);
            usize::try_from(word).map_err(|_| Error::InvalidArgument(format!("{role}: {word} does not fit a pointer")))
        })
        .collect()
}

/// The buffers of one call, a column per role.
#[derive(Debug)]
pub struct Table {
    numels: Vec<usize>,
    buffers: Vec<Buffer>,
    /// The (address, index) of each non-empty buffer, by address, as `check` found them (its
    /// overlap sweep and the reservation both walk memory in this order).
    by_address: Vec<(usize, usize)>,
    /// `check` passed and no column was added since: slices may be made.
    checked: bool,
}

/// Where a column of `T` buffers starts in the table (the type ties slices to the column's type).
#[derive(Debug)]
pub struct Column<T> {
    start: usize,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Column<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Column<T> {}

/// A column of step counts, one element each, stored as `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct StepColumn {
    start: usize,
    dtype: Dtype,
}

impl Table {
    /// A table for as many tensors as `numels` holds words.
    pub fn new(numels: &[u8]) -> Result<Self, Error> {
        let numels = words("numels", numels)?;
        Ok(Self {
            buffers: Vec::with_capacity(numels.len().saturating_mul(6)),
            numels,
            by_address: Vec::new(),
            checked: false,
        })
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.numels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.numels.is_empty()
    }

    /// Checks that `role` has one entry (`found`) per tensor.
    pub fn check_count(&self, role: &str, found: usize) -> Result<(), Error> {
        if found == self.len() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!("{found} {role} entries for {} tensors", self.len())))
        }
    }

    /// A buffer of each tensor's element count at each address of `addrs`.
    pub fn column<T>(&mut self, role: &'static str, addrs: &[u8], written: bool) -> Result<Column<T>, Error> {
        self.column_of_lengths(role, addrs, written, |numel| numel)
    }

    /// A buffer of `length(numel)` elements for each tensor, at each address of `addrs` (one
    /// scale per block of a tensor, say).
    pub fn column_of_lengths<T>(
        &mut self,
        role: &'static str,
        addrs: &[u8],
        written: bool,
        length: impl Fn(usize) -> usize,
    ) -> Result<Column<T>, Error> {
        let addrs = words(role, addrs)?;
        self.check_count(role, addrs.len())?;
        self.checked = false;
        let start = self.buffers.len();
        for (i, (&addr, &numel)) in addrs.iter().zip(&self.numels).enumerate() {
            self.buffers.push(Buffer::of::<T>(role, i, addr, length(numel), written));
        }
        Ok(Column { start, _type: PhantomData })
    }

    /// One written step count per tensor, stored as `dtype`.
    pub fn steps(&mut self, dtype: Dtype, addrs: &[u8]) -> Result<StepColumn, Error> {
        if !matches!(dtype, Dtype::F32 | Dtype::F64) {
            return Err(Error::InvalidArgument("step counts are float32 or float64".into()));
        }
        let addrs = words("step", addrs)?;
        self.check_count("step", addrs.len())?;
        self.checked = false;
        let start = self.buffers.len();
        for (i, &addr) in addrs.iter().enumerate() {
            self.buffers.push(match dtype {
                Dtype::F32 => Buffer::of::<f32>("step", i, addr, 1, true),
                Dtype::F64 | Dtype::BF16 | Dtype::F16 => Buffer::of::<f64>("step", i, addr, 1, true),
            });
        }
        Ok(StepColumn { start, dtype })
    }

    /// Every buffer of the call.
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers
    }

    /// `raw::check_buffers` over every buffer of the call; slices may be made once it passed.
    pub fn check(&mut self) -> Result<(), Error> {
        self.by_address = address_order(&self.buffers);
        check_buffers_in_order(&self.buffers, &self.by_address)?;
        self.checked = true;
        Ok(())
    }

    /// Reserves every buffer of the call (`inflight::reserve`, in address order), once `check`
    /// passed.
    pub fn reserve(&self) -> Reservation {
        assert!(self.checked, "buffers reserved before Table::check passed");
        reserve_each(self.by_address.iter().map(|&(_, i)| &self.buffers[i]))
    }

    /// The buffer slices are made of; panics (never UB) unless `check` passed.
    fn checked_buffer(&self, start: usize, i: usize) -> &Buffer {
        assert!(self.checked, "buffers sliced before Table::check passed");
        &self.buffers[start + i]
    }

    /// Tensor `i`'s buffer of a written column. Panics (never UB) if `check` has not passed
    /// since the last column was added, or if `col` is read-only.
    ///
    /// # Safety
    /// This buffer is sliced only once while the slice lives, and its memory stays alive and used
    /// by no one else meanwhile (the Python layer holds the tensors for the call;
    /// `inflight::reserve` keeps out other calls of this process).
    pub unsafe fn written<'a, T>(&self, col: Column<T>, i: usize) -> &'a mut [T] {
        let b = self.checked_buffer(col.start, i);
        assert!(b.written, "{} of tensor {} is not a written column", b.role, b.tensor);
        // SAFETY: `check_buffers` accepted `b` among all buffers of the call (`checked`), and
        // `col` was made by `column::<T>`, so `b` was made with `Buffer::of::<T>`; the rest is
        // this function's contract.
        unsafe { slice_mut(b) }
    }

    /// Tensor `i`'s buffer of a column, read-only.
    ///
    /// # Safety
    /// As for [`Table::written`], except that a buffer may be read any number of times.
    pub unsafe fn read<'a, T>(&self, col: Column<T>, i: usize) -> &'a [T] {
        let b = self.checked_buffer(col.start, i);
        // SAFETY: as in `written`.
        unsafe { slice(b) }
    }

    /// Tensor `i`'s step count.
    ///
    /// # Safety
    /// As for [`Table::written`].
    pub unsafe fn step<'a>(&self, col: StepColumn, i: usize) -> StepCount<'a> {
        let b = self.checked_buffer(col.start, i);
        // SAFETY: as in `written`; `steps` made `b` with `Buffer::of` of the type matching `col.dtype`, written,
        // one element long (so `[0]` is in bounds); the rest is this function's contract.
        unsafe {
            match col.dtype {
                Dtype::F32 => StepCount::F32(&mut slice_mut::<f32>(b)[0]),
                // (`steps` refuses the half dtypes.)
                Dtype::F64 | Dtype::BF16 | Dtype::F16 => StepCount::F64(&mut slice_mut::<f64>(b)[0]),
            }
        }
    }
}
