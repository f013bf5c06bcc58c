//! A param's step count, kept (as torch keeps it) in a 0-dim float tensor of the caller's.

/// A mutable reference to a step count stored as `f32` (torch's default) or `f64` (torch's choice
/// when the default dtype is float64).
#[derive(Debug)]
pub enum StepCount<'a> {
    F32(&'a mut f32),
    F64(&'a mut f64),
}

impl StepCount<'_> {
    /// `step_t += 1` in the count's own precision, then the new value as torch's
    /// `step_t.item()` sees it.
    pub fn increment(&mut self) -> f64 {
        match self {
            Self::F32(step) => {
                **step += 1.0;
                **step as f64
            }
            Self::F64(step) => {
                **step += 1.0;
                **step
            }
        }
    }
}
