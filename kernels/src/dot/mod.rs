//! Vector dot products. Callers use the functions here; each forwards to the
//! best implementation for the running CPU. Today that is always
//! [`scalar`], the reference twin every SIMD version must match: a later
//! per-ISA module slots in behind these functions with a run-time feature
//! check, without changing any caller.

pub mod scalar;

use crate::quant::float::{Bf16Bytes, F16Bytes, F32Bytes};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

/// Q4_0 weights . Q8_0 activations, `x.len() == y.len()` blocks.
#[inline]
pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    scalar::vec_dot_q4_0_q8_0(x, y)
}

/// Q4_1 weights . Q8_1 activations.
#[inline]
pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    scalar::vec_dot_q4_1_q8_1(x, y)
}

/// Q8_0 weights . Q8_0 activations.
#[inline]
pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    scalar::vec_dot_q8_0_q8_0(x, y)
}

#[inline]
pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    scalar::vec_dot_f32(x, y)
}

/// Stored (little-endian, any alignment) f32 weights . f32 activations.
#[inline]
pub fn vec_dot_f32_le(x: &[F32Bytes], y: &[f32]) -> f32 {
    scalar::vec_dot_f32_le(x, y)
}

/// f16 . f16, ggml's F16 weight path (activations converted to f16).
#[inline]
pub fn vec_dot_f16(x: &[F16Bytes], y: &[F16Bytes]) -> f32 {
    scalar::vec_dot_f16(x, y)
}

#[inline]
pub fn vec_dot_f16_f32(x: &[F16Bytes], y: &[f32]) -> f32 {
    scalar::vec_dot_f16_f32(x, y)
}

/// bf16 . bf16, ggml's BF16 weight path (activations converted to bf16).
#[inline]
pub fn vec_dot_bf16(x: &[Bf16Bytes], y: &[Bf16Bytes]) -> f32 {
    scalar::vec_dot_bf16(x, y)
}

#[inline]
pub fn vec_dot_bf16_f32(x: &[Bf16Bytes], y: &[f32]) -> f32 {
    scalar::vec_dot_bf16_f32(x, y)
}

/// f32 . f32 accumulated in f64 (the exact path's dot).
#[inline]
pub fn vec_dot_f32_f64acc(x: &[f32], y: &[f32]) -> f64 {
    scalar::vec_dot_f32_f64acc(x, y)
}
