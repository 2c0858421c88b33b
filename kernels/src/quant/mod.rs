//! Block formats, one file each, bit-compatible with ggml. Every block struct
//! has alignment 1 (scales are stored as byte arrays), so tensor bytes at any
//! address cast to blocks with `bytemuck::cast_slice`.
//!
//! Everything about a block format is in its file: the block struct (the
//! layout), its [`BlockFormat`] impl (ggml type, block size, the scalar
//! reference quantizer and dequantizer) and, for weight formats, its
//! [`crate::dot::DotFormat`] impl (the activation format, the scalar dot
//! product that is the twin of every SIMD kernel, and which kernel of each
//! path's table runs it). [`row_codec`] is the one table, keyed by type, of
//! the byte-level entry points.

pub mod float;
pub mod kquant;
pub mod q2_k;
pub mod q3_k;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod q8_1;
pub mod q8_k;

pub use kquant::QK_K;
pub use q2_k::{dequantize_row_q2_k, quantize_row_q2_k, BlockQ2_K};
pub use q3_k::{dequantize_row_q3_k, quantize_row_q3_k, BlockQ3_K};
pub use q4_0::{dequantize_row_q4_0, quantize_row_q4_0, BlockQ4_0, QK4_0};
pub use q4_1::{dequantize_row_q4_1, quantize_row_q4_1, BlockQ4_1, QK4_1};
pub use q4_k::{dequantize_row_q4_k, quantize_row_q4_k, BlockQ4_K};
pub use q5_0::{dequantize_row_q5_0, quantize_row_q5_0, BlockQ5_0, QK5_0};
pub use q5_1::{dequantize_row_q5_1, quantize_row_q5_1, BlockQ5_1, QK5_1};
pub use q5_k::{dequantize_row_q5_k, quantize_row_q5_k, BlockQ5_K};
pub use q6_k::{dequantize_row_q6_k, quantize_row_q6_k, BlockQ6_K};
pub use q8_0::{dequantize_row_q8_0, quantize_row_q8_0, BlockQ8_0, QK8_0};
pub use q8_1::{dequantize_row_q8_1, quantize_row_q8_1, BlockQ8_1, QK8_1};
pub use q8_k::{dequantize_row_q8_k, quantize_row_q8_k, BlockQ8_K};

use bytemuck::{Pod, Zeroable};

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

/// One block format: the block struct is its layout; this says which ggml
/// type it is and holds its scalar reference quantizer and dequantizer.
pub trait BlockFormat: Pod + Zeroable + Send + Sync + 'static {
    const TYPE: GgmlType;
    /// Elements per block.
    const BLOCK: usize;
    /// ggml's `quantize_row_*_ref`: `x.len() == BLOCK * out.len()`.
    fn quantize_row(x: &[f32], out: &mut [Self]);
    /// ggml's `dequantize_row_*`: `out.len() == BLOCK * blocks.len()`.
    fn dequantize_row(blocks: &[Self], out: &mut [f32]);
}

macro_rules! block_format {
    ($B:ty, $ty:ident, $n:expr, $q:path, $dq:path) => {
        impl BlockFormat for $B {
            const TYPE: GgmlType = GgmlType::$ty;
            const BLOCK: usize = $n;
            fn quantize_row(x: &[f32], out: &mut [Self]) {
                $q(x, out)
            }
            fn dequantize_row(blocks: &[Self], out: &mut [f32]) {
                $dq(blocks, out)
            }
        }
        const _: () = assert!(std::mem::size_of::<$B>() == GgmlType::$ty.type_size());
        const _: () = assert!($n == GgmlType::$ty.block_size());
    };
}

block_format!(
    BlockQ4_0,
    Q4_0,
    QK4_0,
    quantize_row_q4_0,
    dequantize_row_q4_0
);
block_format!(
    BlockQ4_1,
    Q4_1,
    QK4_1,
    quantize_row_q4_1,
    dequantize_row_q4_1
);
block_format!(
    BlockQ5_0,
    Q5_0,
    QK5_0,
    quantize_row_q5_0,
    dequantize_row_q5_0
);
block_format!(
    BlockQ5_1,
    Q5_1,
    QK5_1,
    quantize_row_q5_1,
    dequantize_row_q5_1
);
block_format!(
    BlockQ8_0,
    Q8_0,
    QK8_0,
    quantize_row_q8_0,
    dequantize_row_q8_0
);
block_format!(
    BlockQ8_1,
    Q8_1,
    QK8_1,
    quantize_row_q8_1,
    dequantize_row_q8_1
);
block_format!(
    BlockQ2_K,
    Q2_K,
    QK_K,
    quantize_row_q2_k,
    dequantize_row_q2_k
);
block_format!(
    BlockQ3_K,
    Q3_K,
    QK_K,
    quantize_row_q3_k,
    dequantize_row_q3_k
);
block_format!(
    BlockQ4_K,
    Q4_K,
    QK_K,
    quantize_row_q4_k,
    dequantize_row_q4_k
);
block_format!(
    BlockQ5_K,
    Q5_K,
    QK_K,
    quantize_row_q5_k,
    dequantize_row_q5_k
);
block_format!(
    BlockQ6_K,
    Q6_K,
    QK_K,
    quantize_row_q6_k,
    dequantize_row_q6_k
);
block_format!(
    BlockQ8_K,
    Q8_K,
    QK_K,
    quantize_row_q8_k,
    dequantize_row_q8_k
);

/// A type's byte-level row codec: `quantize(src, dst)` and
/// `dequantize(src, dst)` on exactly `ty.row_bytes(n)` bytes of any alignment.
#[derive(Clone, Copy)]
pub struct RowCodec {
    pub quantize: fn(&[f32], &mut [u8]),
    pub dequantize: fn(&[u8], &mut [f32]),
}

fn quantize_bytes<T: BlockFormat>(x: &[f32], dst: &mut [u8]) {
    T::quantize_row(x, bytemuck::cast_slice_mut(dst))
}

fn dequantize_bytes<T: BlockFormat>(src: &[u8], out: &mut [f32]) {
    T::dequantize_row(bytemuck::cast_slice(src), out)
}

const fn codec<T: BlockFormat>() -> RowCodec {
    RowCodec {
        quantize: quantize_bytes::<T>,
        dequantize: dequantize_bytes::<T>,
    }
}

/// The table: the row codec of every type airlock can encode and decode,
/// `None` for the others. Each type is named, so a new type is a compile
/// error here until someone decides.
pub fn row_codec(ty: GgmlType) -> Option<RowCodec> {
    use bytemuck::{cast_slice, cast_slice_mut};
    use GgmlType::*;
    Some(match ty {
        F32 => RowCodec {
            quantize: |x, d| float::quantize_row_f32(x, cast_slice_mut(d)),
            dequantize: |s, y| float::dequantize_row_f32(cast_slice(s), y),
        },
        F16 => RowCodec {
            quantize: |x, d| float::quantize_row_f16(x, cast_slice_mut(d)),
            dequantize: |s, y| float::dequantize_row_f16(cast_slice(s), y),
        },
        BF16 => RowCodec {
            quantize: |x, d| float::quantize_row_bf16(x, cast_slice_mut(d)),
            dequantize: |s, y| float::dequantize_row_bf16(cast_slice(s), y),
        },
        Q4_0 => codec::<BlockQ4_0>(),
        Q4_1 => codec::<BlockQ4_1>(),
        Q5_0 => codec::<BlockQ5_0>(),
        Q5_1 => codec::<BlockQ5_1>(),
        Q8_0 => codec::<BlockQ8_0>(),
        Q8_1 => codec::<BlockQ8_1>(),
        Q2_K => codec::<BlockQ2_K>(),
        Q3_K => codec::<BlockQ3_K>(),
        Q4_K => codec::<BlockQ4_K>(),
        Q5_K => codec::<BlockQ5_K>(),
        Q6_K => codec::<BlockQ6_K>(),
        Q8_K => codec::<BlockQ8_K>(),
        IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ4_NL | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0
        | TQ2_0 | MXFP4 | NVFP4 | Q1_0 | I8 | I16 | I32 | I64 | F64 => return None,
    })
}

/// Types [`quantize_row`] and [`dequantize_row`] handle.
pub fn has_row_codec(ty: GgmlType) -> bool {
    row_codec(ty).is_some()
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
/// `ty.row_bytes(dst.len())` bytes, any alignment). Supports every type
/// with a [`row_codec`]: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1,
/// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    let codec = row_codec(ty).ok_or(KernelError::Unsupported {
        ty,
        op: "dequantize",
    })?;
    check_len(ty, dst.len(), src.len())?;
    (codec.dequantize)(src, dst);
    Ok(())
}

/// Encode `src` as type `ty` into `dst` (exactly `ty.row_bytes(src.len())`
/// bytes), producing the bytes ggml's reference quantizers produce (the
/// K-quants: llama.cpp's `quantize_row_*_ref` built without FMA
/// contraction, which is what `llama-quantize` runs without an importance
/// matrix). Supports every type with a [`row_codec`].
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    let codec = row_codec(ty).ok_or(KernelError::Unsupported { ty, op: "quantize" })?;
    check_len(ty, src.len(), dst.len())?;
    (codec.quantize)(src, dst);
    Ok(())
}

#[cfg(test)]
mod tests;
