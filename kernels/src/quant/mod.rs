//! Block formats, one file each, bit-compatible with ggml. Every block struct
//! has alignment 1 (scales are stored as `[u8; 2]`), so tensor bytes at any
//! address cast to blocks with `bytemuck::cast_slice`.

pub mod float;
pub mod q4_0;
pub mod q4_1;
pub mod q8_0;
pub mod q8_1;

pub use q4_0::{dequantize_row_q4_0, quantize_row_q4_0, BlockQ4_0, QK4_0};
pub use q4_1::{dequantize_row_q4_1, quantize_row_q4_1, BlockQ4_1, QK4_1};
pub use q8_0::{dequantize_row_q8_0, quantize_row_q8_0, BlockQ8_0, QK8_0};
pub use q8_1::{dequantize_row_q8_1, quantize_row_q8_1, BlockQ8_1, QK8_1};

use crate::{GgmlType, KernelError};

/// A stored little-endian f16 scale as f32.
#[inline]
pub(crate) fn scale(d: [u8; 2]) -> f32 {
    float::f16_to_f32(u16::from_le_bytes(d))
}

#[inline]
pub(crate) fn f16_bytes(x: f32) -> [u8; 2] {
    float::f32_to_f16(x).to_le_bytes()
}

/// C's `MAX(a, b)` = `a > b ? a : b`, which ggml uses for amax. Unlike
/// `f32::max` it lets a NaN through when the NaN is `b`, as ggml does.
#[inline]
pub(crate) fn c_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Types [`quantize_row`] and [`dequantize_row`] handle.
pub fn has_row_codec(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q8_1)
}

/// Checks `bytes` holds exactly `n` elements of `ty`.
fn check_len(ty: GgmlType, n: usize, bytes: usize) -> Result<(), KernelError> {
    let expected = ty
        .row_bytes(n as u64)
        .ok_or(KernelError::NotBlockMultiple { ty, n: n as u64 })?;
    if expected != bytes as u64 {
        return Err(KernelError::LengthMismatch {
            what: "row bytes",
            expected: usize::try_from(expected).unwrap_or(usize::MAX),
            actual: bytes,
        });
    }
    Ok(())
}

/// Decode `dst.len()` values of type `ty` from `src` (exactly
/// `ty.row_bytes(dst.len())` bytes, any alignment).
/// Supports F32, F16, BF16, Q8_0, Q4_0, Q4_1 and Q8_1.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    use bytemuck::cast_slice;
    if !has_row_codec(ty) {
        return Err(KernelError::Unsupported {
            ty,
            op: "dequantize",
        });
    }
    check_len(ty, dst.len(), src.len())?;
    match ty {
        GgmlType::F32 => float::dequantize_row_f32(cast_slice(src), dst),
        GgmlType::F16 => float::dequantize_row_f16(cast_slice(src), dst),
        GgmlType::BF16 => float::dequantize_row_bf16(cast_slice(src), dst),
        GgmlType::Q8_0 => dequantize_row_q8_0(cast_slice(src), dst),
        GgmlType::Q4_0 => dequantize_row_q4_0(cast_slice(src), dst),
        GgmlType::Q4_1 => dequantize_row_q4_1(cast_slice(src), dst),
        GgmlType::Q8_1 => dequantize_row_q8_1(cast_slice(src), dst),
        _ => unreachable!("checked above"),
    }
    Ok(())
}

/// Encode `src` as type `ty` into `dst` (exactly `ty.row_bytes(src.len())`
/// bytes), producing the bytes ggml's reference quantizers produce.
/// Supports F32, F16, BF16, Q8_0, Q4_0, Q4_1 and Q8_1.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    use bytemuck::cast_slice_mut;
    if !has_row_codec(ty) {
        return Err(KernelError::Unsupported { ty, op: "quantize" });
    }
    check_len(ty, src.len(), dst.len())?;
    match ty {
        GgmlType::F32 => float::quantize_row_f32(src, cast_slice_mut(dst)),
        GgmlType::F16 => float::quantize_row_f16(src, cast_slice_mut(dst)),
        GgmlType::BF16 => float::quantize_row_bf16(src, cast_slice_mut(dst)),
        GgmlType::Q8_0 => quantize_row_q8_0(src, cast_slice_mut(dst)),
        GgmlType::Q4_0 => quantize_row_q4_0(src, cast_slice_mut(dst)),
        GgmlType::Q4_1 => quantize_row_q4_1(src, cast_slice_mut(dst)),
        GgmlType::Q8_1 => quantize_row_q8_1(src, cast_slice_mut(dst)),
        _ => unreachable!("checked above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
