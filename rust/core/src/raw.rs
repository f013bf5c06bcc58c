//! Turning buffer addresses that come over an FFI boundary into Rust slices, soundly.
//!
//! The Python binding receives from the Python layer (`rsoptim/_optimizer.py`), for every
//! tensor of a step, the address and element count of each CPU buffer it holds a reference to
//! for the whole call. Before any slice is made we check what Rust needs for the slices to be
//! sound: no null or misaligned address, no buffer past `isize::MAX` bytes, and no buffer that
//! is written overlapping any other buffer of the call (a param passed as its own grad, two
//! params sharing memory, a view of a state).
//! Read-only buffers may overlap each other (grads that are views of one bucket).

use std::mem::{align_of, size_of};

use crate::error::Error;

/// One buffer of a call: where it is, how many elements, whether the kernel writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub role: &'static str,
    pub tensor: usize,
    pub addr: usize,
    pub len: usize,
    pub elem_size: usize,
    pub align: usize,
    pub written: bool,
}

impl Buffer {
    pub fn of<T>(role: &'static str, tensor: usize, addr: usize, len: usize, written: bool) -> Self {
        Self { role, tensor, addr, len, elem_size: size_of::<T>(), align: align_of::<T>(), written }
    }

    fn bytes(&self) -> usize {
        self.len * self.elem_size
    }

    fn describe(&self) -> String {
        format!("{} of tensor {}", self.role, self.tensor)
    }
}

fn error(msg: String) -> Error {
    Error::InvalidBuffer(msg)
}

/// Checks every buffer of a call (see the module docs); returns the first problem found:
/// `Error::InvalidBuffer` for a buffer that is bad on its own (checked first, for all buffers),
/// else `Error::Overlap` for a written buffer sharing memory with another.
pub fn check_buffers(buffers: &[Buffer]) -> Result<(), Error> {
    check_buffers_in_order(buffers, &address_order(buffers))
}

/// The (address, index) of each non-empty buffer, by address (then index: the radix sort is
/// stable).
pub(crate) fn address_order(buffers: &[Buffer]) -> Vec<(usize, usize)> {
    let mut by_address: Vec<(usize, usize)> =
        buffers.iter().enumerate().filter(|(_, b)| b.len > 0).map(|(i, b)| (b.addr, i)).collect();
    radsort::sort_by_key(&mut by_address, |&(address, _)| address);
    by_address
}

/// `check_buffers`, given `order = address_order(buffers)` (a `Table` computes it once for the
/// checks and its reservation).
pub(crate) fn check_buffers_in_order(buffers: &[Buffer], order: &[(usize, usize)]) -> Result<(), Error> {
    for b in buffers {
        if b.len == 0 {
            continue;
        }
        if b.addr == 0 {
            return Err(error(format!("{} has a null data pointer", b.describe())));
        }
        if !b.align.is_power_of_two() || b.addr % b.align != 0 {
            return Err(error(format!("{} is not aligned to {} bytes", b.describe(), b.align)));
        }
        let too_big = b.len.checked_mul(b.elem_size).and_then(|n| b.addr.checked_add(n)).is_none()
            || b.bytes() > isize::MAX as usize;
        if too_big {
            return Err(error(format!("{} is larger than the address space", b.describe())));
        }
    }
    // Sweeping by start address, a buffer overlaps an earlier one exactly when it starts before
    // that one ends; we keep the furthest end seen among written buffers and among all buffers.
    let mut furthest_any: Option<&Buffer> = None;
    let mut furthest_written: Option<&Buffer> = None;
    for b in order.iter().map(|&(_, i)| &buffers[i]) {
        let end_of = |x: &Buffer| x.addr + x.bytes();
        if let Some(w) = furthest_written.filter(|w| b.addr < end_of(w)) {
            return Err(overlap(w, b));
        }
        if let Some(a) = furthest_any.filter(|a| b.written && b.addr < end_of(a)) {
            return Err(overlap(a, b));
        }
        if furthest_any.is_none_or(|a| end_of(b) > end_of(a)) {
            furthest_any = Some(b);
        }
        if b.written && furthest_written.is_none_or(|w| end_of(b) > end_of(w)) {
            furthest_written = Some(b);
        }
    }
    Ok(())
}

fn overlap(a: &Buffer, b: &Buffer) -> Error {
    Error::Overlap(format!(
        "{} and {} share memory; every buffer the step writes must be separate \
         (is a param passed as its own grad or state?)",
        a.describe(),
        b.describe()
    ))
}

/// A mutable slice over a buffer that `check_buffers` accepted. Panics (never UB) if `b` is not
/// written or was made for another type than `T`.
///
/// # Safety
/// `b` must be one of the buffers of a `check_buffers` call that returned `Ok`, sliced once, and
/// its memory must be live and used by no one else while the slice lives (the Python layer holds
/// the tensors for the whole call; `inflight::reserve` keeps out other calls of this process).
pub unsafe fn slice_mut<'a, T>(b: &Buffer) -> &'a mut [T] {
    assert!(
        b.written && b.elem_size == size_of::<T>() && b.align == align_of::<T>(),
        "{b:?} sliced as written {}",
        std::any::type_name::<T>()
    );
    if b.len == 0 {
        // Never the address: an empty buffer may point anywhere, null included.
        return &mut [];
    }
    // SAFETY: `check_buffers` accepted `b` with `b.len > 0`, so `b.addr` is non-null, aligned
    // for `T` (asserted to be `b`'s type) and `len * size_of::<T>()` bytes from it stay within
    // the address space and `isize::MAX`; no other buffer of the call overlaps it since it is
    // written. Liveness and exclusive use are this function's contract.
    unsafe { std::slice::from_raw_parts_mut(b.addr as *mut T, b.len) }
}

/// A shared slice over a buffer that `check_buffers` accepted. Panics (never UB) if `b` was made
/// for another type than `T`.
///
/// # Safety
/// As for [`slice_mut`], except that it may be sliced any number of times; no written buffer
/// overlaps it (`check_buffers`), read-only ones may.
pub unsafe fn slice<'a, T>(b: &Buffer) -> &'a [T] {
    assert!(
        b.elem_size == size_of::<T>() && b.align == align_of::<T>(),
        "{b:?} sliced as {}",
        std::any::type_name::<T>()
    );
    if b.len == 0 {
        return &[];
    }
    // SAFETY: as in `slice_mut`, for a shared slice: only read-only slices may alias it.
    unsafe { std::slice::from_raw_parts(b.addr as *const T, b.len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: usize, len: usize, written: bool) -> Buffer {
        Buffer::of::<f32>("x", addr, addr, len, written)
    }

    #[test]
    fn separate_buffers_pass() {
        assert!(check_buffers(&[buf(64, 4, true), buf(80, 4, true), buf(96, 4, false)]).is_ok());
    }

    #[test]
    fn read_only_buffers_may_overlap() {
        assert!(check_buffers(&[buf(64, 8, false), buf(68, 8, false), buf(256, 4, true)]).is_ok());
    }

    #[test]
    fn any_overlap_with_a_written_buffer_fails() {
        assert!(matches!(check_buffers(&[buf(64, 4, true), buf(64, 4, false)]), Err(Error::Overlap(_))));
        assert!(check_buffers(&[buf(64, 4, false), buf(76, 4, true)]).is_err());
        // A written buffer inside a long read-only one that is not the latest to start.
        assert!(check_buffers(&[buf(0x100, 100, false), buf(0x108, 1, false), buf(0x110, 1, true)]).is_err());
        // A read-only buffer inside a long written one, past a separate buffer.
        assert!(check_buffers(&[buf(0x100, 100, true), buf(0x200, 1, false)]).is_err());
    }

    #[test]
    fn slices_refuse_the_wrong_type_or_role_and_never_touch_empty_buffers() {
        let mut data = [1.0f32, 2.0];
        let b = Buffer::of::<f32>("x", 0, data.as_mut_ptr() as usize, 2, true);
        assert!(check_buffers(&[b]).is_ok());
        // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
        assert!(std::panic::catch_unwind(|| unsafe { slice_mut::<f64>(&b).len() }).is_err());
        // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
        assert!(std::panic::catch_unwind(|| unsafe { slice::<u32>(&b).len() }).is_ok(), "same size and alignment");
        let read_only = Buffer { written: false, ..b };
        // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
        assert!(std::panic::catch_unwind(|| unsafe { slice_mut::<f32>(&read_only).len() }).is_err());
        // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
        assert_eq!(unsafe { slice::<f32>(&b) }, &[1.0, 2.0]);
        // Empty buffers at null and misaligned addresses pass the check and slice to nothing.
        for addr in [0, 1, 3, usize::MAX] {
            let empty = Buffer::of::<f64>("x", 0, addr, 0, true);
            assert!(check_buffers(&[empty]).is_ok());
            // SAFETY: an empty buffer that passed the check.
            assert!(unsafe { slice_mut::<f64>(&empty) }.is_empty());
        }
    }

    #[test]
    fn null_misaligned_and_huge_fail_but_empty_is_fine() {
        assert!(check_buffers(&[buf(0, 4, true)]).is_err());
        assert!(check_buffers(&[buf(66, 4, true)]).is_err());
        assert!(check_buffers(&[buf(64, usize::MAX / 2, false)]).is_err());
        assert!(check_buffers(&[buf(0, 0, true), buf(0, 0, true)]).is_ok());
    }
}
