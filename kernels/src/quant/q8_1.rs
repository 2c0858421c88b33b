//! Q8_1: Q8_0 plus `s = d * sum(q)`, the activation format for Q4_1 weights.
//! ggml-common.h `block_q8_1` (d and s are f16: 36 bytes);
//! ggml-quants.c `quantize_row_q8_1_ref`.

use bytemuck::{Pod, Zeroable};

use super::{c_max, f16_bytes, scale};

pub const QK8_1: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_1 {
    /// f16 scale, little-endian.
    pub d: [u8; 2],
    /// f16 of `sum(qs) as f32 * d` (f32 d, before d is rounded to f16).
    /// Infinite when |d * sum(q)| passes 65504 (a block of 32 same-sign
    /// values above ~2047), exactly as in ggml.
    pub s: [u8; 2],
    pub qs: [i8; QK8_1],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);
const _: () = assert!(std::mem::align_of::<BlockQ8_1>() == 1);

impl BlockQ8_1 {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    #[inline]
    pub fn s(&self) -> f32 {
        scale(self.s)
    }
}

/// Same quants as Q8_0; `s` lets a Q4_1 dot product add the weight minimum
/// times the activation sum without touching the quants again.
#[inline]
pub fn quantize_block_q8_1(x: &[f32; QK8_1]) -> BlockQ8_1 {
    let amax = x.iter().fold(0.0f32, |m, v| c_max(m, v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_1];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    BlockQ8_1 {
        d: f16_bytes(d),
        // |sum| <= 32 * 127, exact in f32.
        s: f16_bytes(sum as f32 * d),
        qs,
    }
}

pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * QK8_1, "q8_1 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK8_1)) {
        *b = quantize_block_q8_1(xs.try_into().unwrap());
    }
}

/// ggml has no `dequantize_row_q8_1`; this is the obvious d * q.
pub fn dequantize_row_q8_1(blocks: &[BlockQ8_1], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK8_1, "q8_1 row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK8_1)) {
        let d = b.d();
        for (y, &q) in ys.iter_mut().zip(&b.qs) {
            *y = q as f32 * d;
        }
    }
}
