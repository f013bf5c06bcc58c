//! Element types: the arithmetic type of the maths (`Real`) and the storage type of params and
//! grads (`Element`). Today both are `f32` or `f64`; the split leaves room for bf16/f16 params
//! whose maths and state run in `f32`.

use num_traits::Float;

/// A floating type the kernels compute in (and store optimizer state in).
pub trait Real: Float + Send + Sync + Default + core::fmt::Debug + 'static {
    /// Rounds a hyperparameter computed in `f64` (as torch does with Python floats) to `Self`.
    fn round_from(x: f64) -> Self;
    fn widen(self) -> f64;

    /// `torch.maximum`: NaN in either operand gives NaN (`f32::max` would drop it).
    #[inline(always)]
    fn max_propagate_nan(self, other: Self) -> Self {
        if self.is_nan() || self > other {
            self
        } else {
            other
        }
    }

    /// `torch.minimum`: NaN in either operand gives NaN.
    #[inline(always)]
    fn min_propagate_nan(self, other: Self) -> Self {
        if self.is_nan() || self < other {
            self
        } else {
            other
        }
    }
}

impl Real for f32 {
    #[inline(always)]
    fn round_from(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    #[inline(always)]
    fn round_from(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
}

/// How a param or grad element is stored, and the type its maths runs in.
pub trait Element: Copy + Send + Sync + 'static {
    type Math: Real;
    fn load(self) -> Self::Math;
    fn store(x: Self::Math) -> Self;
}

impl<T: Real> Element for T {
    type Math = T;
    #[inline(always)]
    fn load(self) -> T {
        self
    }
    #[inline(always)]
    fn store(x: T) -> T {
        x
    }
}

/// `torch.lerp(start, end, weight)` with torch's two-sided formula, which is exact at both ends.
#[inline(always)]
pub(crate) fn lerp<T: Real>(start: T, end: T, weight: T) -> T {
    if weight.abs() < T::round_from(0.5) {
        start + weight * (end - start)
    } else {
        end - (end - start) * (T::one() - weight)
    }
}
