//! Block formats and compute kernels. Knows nothing of files or models.
//!
//! Layout:
//! - [`types`]: the one table of ggml type traits (ids, block sizes, names).
//! - [`quant`]: one file per block format, bit-compatible with ggml's
//!   `quantize_row_*_ref` / `dequantize_row_*`, plus byte-level entry points.

mod error;
pub mod quant;
pub mod types;

pub use error::KernelError;
pub use quant::{dequantize_row, quantize_row};
pub use types::GgmlType;
