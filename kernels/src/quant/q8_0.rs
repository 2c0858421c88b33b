//! Q8_0: 32 values -> f16 scale `d` + 32 x i8, value = d * q.
//! ggml-common.h `block_q8_0`; ggml-quants.c `quantize_row_q8_0_ref`.

use bytemuck::{Pod, Zeroable};

use super::{c_max, f16_bytes, scale};

pub const QK8_0: usize = 32;

/// Alignment 1, so any byte slice of a multiple of 34 bytes casts to blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// f16 scale, little-endian.
    pub d: [u8; 2],
    pub qs: [i8; QK8_0],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 1);

impl BlockQ8_0 {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }
}

/// Quantize one block exactly as ggml's reference does: d = amax/127 in f32,
/// q = round-half-away(x * (1/d)), multiplying by the f32 reciprocal (x / d
/// gives different bytes).
#[inline]
pub fn quantize_block_q8_0(x: &[f32; QK8_0]) -> BlockQ8_0 {
    let amax = x.iter().fold(0.0f32, |m, v| c_max(m, v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_0];
    for (q, &v) in qs.iter_mut().zip(x) {
        // |v * id| <= 127 up to rounding, so the saturating cast never clips
        // a finite, normal input.
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 {
        d: f16_bytes(d),
        qs,
    }
}

/// `x.len()` must be `32 * out.len()`.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK8_0, "q8_0 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        *b = quantize_block_q8_0(xs.try_into().unwrap());
    }
}

/// `out.len()` must be `32 * blocks.len()`.
pub fn dequantize_row_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK8_0, "q8_0 row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = b.d();
        for (y, &q) in ys.iter_mut().zip(&b.qs) {
            *y = q as f32 * d;
        }
    }
}
