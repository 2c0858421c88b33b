//! Block formats and compute kernels. Knows nothing of files or models.
//!
//! Layout:
//! - [`types`]: the one table of ggml type traits (ids, block sizes, names).
//! - [`quant`]: one file per block format, bit-compatible with ggml's
//!   `quantize_row_*_ref` / `dequantize_row_*`, plus byte-level entry points.
//! - [`dot`]: vector dot products behind dispatch functions; [`dot::scalar`]
//!   holds the reference twins that any SIMD version is tested against.
//! - [`matmul`]: weight-matrix x activations, parallel over output rows.

pub mod attention;
pub mod dot;
mod error;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod simd;
pub mod types;

pub use error::KernelError;
pub use matmul::{matmul, matmul_exact, WeightView};
pub use quant::{dequantize_row, quantize_row};
pub use simd::{simd_path, SimdPath};
pub use types::GgmlType;
