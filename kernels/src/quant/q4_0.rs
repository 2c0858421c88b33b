//! Q4_0: 32 values -> f16 scale `d` + 16 bytes of nibbles, value = d * (q - 8).
//! Byte j holds element j in its low nibble and element j + 16 in its high one.
//! ggml-common.h `block_q4_0`; ggml-quants.c `quantize_row_q4_0_ref`.

use bytemuck::{Pod, Zeroable};

use super::{f16_bytes, scale};

pub const QK4_0: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// f16 scale, little-endian.
    pub d: [u8; 2],
    pub qs: [u8; QK4_0 / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::align_of::<BlockQ4_0>() == 1);

impl BlockQ4_0 {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }
}

/// ggml's reference: the value of largest magnitude `max` (first one on ties,
/// sign kept) maps to q = 0 via d = max / -8; q = min(15, trunc(x/d + 8.5)).
/// So the extreme value is exact and the opposite side reaches only +7 * |d|.
#[inline]
pub fn quantize_block_q4_0(x: &[f32; QK4_0]) -> BlockQ4_0 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // `as i8` truncates toward zero like C's (int8_t) cast; the argument is
    // in [0.5, 16.5] for finite input, so it never saturates.
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    let mut qs = [0u8; QK4_0 / 2];
    for (j, b) in qs.iter_mut().enumerate() {
        *b = q(x[j]) | (q(x[j + QK4_0 / 2]) << 4);
    }
    BlockQ4_0 {
        d: f16_bytes(d),
        qs,
    }
}

pub fn quantize_row_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    assert_eq!(x.len(), out.len() * QK4_0, "q4_0 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK4_0)) {
        *b = quantize_block_q4_0(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q4_0(blocks: &[BlockQ4_0], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK4_0, "q4_0 row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK4_0)) {
        let d = b.d();
        let (lo, hi) = ys.split_at_mut(QK4_0 / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b.qs) {
            *l = ((q & 0x0F) as i32 - 8) as f32 * d;
            *h = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}
