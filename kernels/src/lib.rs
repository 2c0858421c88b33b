//! Block formats and compute kernels. Knows nothing of files or models.
//!
//! Layout:
//! - [`types`]: the one table of ggml type traits (ids, block sizes, names).
//! - [`quant`]: one file per block format, bit-compatible with ggml's
//!   `quantize_row_*_ref` / `dequantize_row_*`, plus byte-level entry points.
//! - [`simd`]: which instruction set the kernels use ([`simd_path`]), chosen
//!   once per process from CPU detection or `AIRLOCK_SIMD`.
//! - [`dot`]: dot products and tiled GEMM micro-kernels, one table
//!   ([`dot::Kernels`]) per path; [`dot::scalar`] holds the reference twins
//!   that every SIMD version is tested against.
//! - [`matmul`]: weight-matrix x activations, parallel over chunks of rows,
//!   each chunk one tiled GEMM over all tokens.
//! - [`packed`]: Q4_0/Q4_1/Q8_0 matrices repacked at load into 16-row
//!   groups, and their matmul (SIMD kernels with a scalar twin).
//! - [`bandwidth`]: the machine's read bandwidth, the ceiling of generation.
//! - [`pool`]: keeping the thread pool spinning through a forward pass.

pub mod attention;
pub mod bandwidth;
mod buffer;
pub mod dot;
mod error;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod simd;
#[cfg(test)]
mod test_util;
pub mod types;

pub use error::KernelError;
pub use matmul::{matmul, matmul_exact, WeightView};
pub use packed::{matmul_packed, matmul_packed_multi, PackedScratch, PackedWeights};
pub use quant::{dequantize_row, quantize_row};
pub use simd::{simd_path, SimdPath};
pub use types::GgmlType;
