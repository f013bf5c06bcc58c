//! rsoptim-core: optimizer steps and gradient-norm clipping on contiguous float buffers.
//!
//! Each `*_step` function takes every tensor of one param group at once, checks all lengths
//! before writing anything, and spreads the element-wise work over an [`Executor`]'s thread
//! pool with the SIMD path it was given. The arithmetic follows torch.optim's for-loop
//! implementation operation by operation (see `docs/torch-contract.md` of the project).
//! This crate knows nothing of Python.

pub mod adam;
pub mod adam8bit;
pub mod alloc_count;
pub mod block;
pub mod element;
pub mod error;
pub mod exec;
pub mod inflight;
pub mod norm;
#[cfg(unix)]
pub mod openmp;
pub mod raw;
pub mod rmsprop;
pub mod roofline;
pub mod sgd;
pub mod simd;
pub mod step;
pub mod subnormal;
pub mod table;
#[cfg(unix)]
pub mod torch_abi;

pub use adam::{adam_step, AdamHyper, AdamTensor};
pub use adam8bit::{adam8bit_step, quant_blocks, Adam8bitTensor, QUANT_BLOCK};
pub use block::{round_into, RoundTensor, Rounding};
pub use element::{Element, Real};
pub use error::Error;
pub use exec::{Executor, CHUNK};
pub use norm::{scale_in_place, tensor_norm, tensor_norms, NormType};
pub use rmsprop::{rmsprop_step, RmspropHyper, RmspropTensor};
pub use sgd::{sgd_step, SgdHyper, SgdTensor};
pub use simd::{SimdError, SimdLevel};
pub use step::StepCount;
