//! The one error type of the core; the binding maps it onto Python exceptions.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Buffers of one tensor that should have the same number of elements do not.
    LengthMismatch { tensor: usize, buffer: &'static str, expected: usize, found: usize },
    /// A buffer that the configuration needs was not given, or one it forbids was.
    MissingBuffer { tensor: usize, buffer: &'static str },
    /// A buffer address that cannot be made into a slice (null, misaligned, too big).
    InvalidBuffer(String),
    /// A buffer the call writes shares memory with another buffer of the call (a param passed as
    /// its own grad, duplicated params, views of one storage). torch steps such params one after
    /// the other, so the Python layer falls back to torch on this error.
    Overlap(String),
    /// A hyperparameter outside the domain the kernel supports.
    InvalidArgument(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LengthMismatch { tensor, buffer, expected, found } => {
                write!(f, "tensor {tensor}: {buffer} has {found} elements but its param has {expected}")
            }
            Self::MissingBuffer { tensor, buffer } => {
                write!(f, "tensor {tensor}: {buffer} is required by this configuration")
            }
            Self::InvalidBuffer(msg) | Self::Overlap(msg) | Self::InvalidArgument(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

pub(crate) fn check_len(tensor: usize, buffer: &'static str, expected: usize, found: usize) -> Result<(), Error> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::LengthMismatch { tensor, buffer, expected, found })
    }
}
