//! The roofline probe: plain streaming loops that move the same bytes per element as a kernel,
//! so that "fraction of the machine's bandwidth" is measured on the machine, not taken from a
//! datasheet. They do one add per element and run on the same executor as the kernels.

use crate::element::Real;
use crate::error::{check_len, Error};
use crate::exec::{Executor, Splittable};
use crate::simd::{dispatch, Isa, Kernel};

/// One tensor's buffers for the probe: `W` buffers read and written, one more only read.
pub struct StreamTensor<'a, T, const W: usize> {
    pub read: &'a [T],
    pub written: [&'a mut [T]; W],
}

impl<T: Real, const W: usize> Splittable for StreamTensor<'_, T, W> {
    fn len(&self) -> usize {
        self.read.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (r0, r1) = self.read.split_at(mid);
        let mut left: [&mut [T]; W] = std::array::from_fn(|_| <&mut [T]>::default());
        let mut right: [&mut [T]; W] = std::array::from_fn(|_| <&mut [T]>::default());
        for (k, w) in self.written.into_iter().enumerate() {
            let (a, b) = w.split_at_mut(mid);
            left[k] = a;
            right[k] = b;
        }
        (Self { read: r0, written: left }, Self { read: r1, written: right })
    }
}

impl<T: Real, const W: usize> Kernel for StreamTensor<'_, T, W> {
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(self, _isa: I) {
        let n = self.read.len();
        let read = self.read;
        let mut written = self.written;
        for w in written.iter_mut() {
            assert_eq!(w.len(), n);
        }
        for i in 0..n {
            let r = read[i];
            for w in written.iter_mut() {
                w[i] = w[i] + r;
            }
        }
    }
}

/// Streams over every tensor: `w += read` for each of the `W` written buffers. Moves
/// `(2 * W + 1) * size_of::<T>()` bytes per element, as a kernel with `W + 1` inputs and `W`
/// outputs does (Adam: `W = 3`).
pub fn stream<T: Real, const W: usize>(tensors: Vec<StreamTensor<'_, T, W>>, exec: &Executor) -> Result<(), Error> {
    for (i, t) in tensors.iter().enumerate() {
        for w in &t.written {
            check_len(i, "written", t.read.len(), w.len())?;
        }
    }
    let simd = exec.simd();
    exec.for_each_piece(tensors, |piece| dispatch(simd, piece));
    Ok(())
}
