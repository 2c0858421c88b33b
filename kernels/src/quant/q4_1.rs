//! Q4_1: 32 values -> f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles,
//! value = d * q + m. Nibble order as Q4_0.
//! ggml-common.h `block_q4_1`; ggml-quants.c `quantize_row_q4_1_ref`.

use bytemuck::{Pod, Zeroable};

use super::{f16_bytes, scale};

pub const QK4_1: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// f16 scale, little-endian.
    pub d: [u8; 2],
    /// f16 block minimum, little-endian.
    pub m: [u8; 2],
    pub qs: [u8; QK4_1 / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::align_of::<BlockQ4_1>() == 1);

impl BlockQ4_1 {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    #[inline]
    pub fn m(&self) -> f32 {
        scale(self.m)
    }
}

/// ggml's reference: d = (max - min) / 15, q = min(15, trunc((x - min)/d + 0.5)),
/// all in f32 with the unrounded min and d (only the stored copies are f16).
#[inline]
pub fn quantize_block_q4_1(x: &[f32; QK4_1]) -> BlockQ4_1 {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    let mut qs = [0u8; QK4_1 / 2];
    for (j, b) in qs.iter_mut().enumerate() {
        *b = q(x[j]) | (q(x[j + QK4_1 / 2]) << 4);
    }
    BlockQ4_1 {
        d: f16_bytes(d),
        m: f16_bytes(min),
        qs,
    }
}

pub fn quantize_row_q4_1(x: &[f32], out: &mut [BlockQ4_1]) {
    assert_eq!(x.len(), out.len() * QK4_1, "q4_1 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK4_1)) {
        *b = quantize_block_q4_1(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q4_1(blocks: &[BlockQ4_1], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK4_1, "q4_1 row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK4_1)) {
        let d = b.d();
        let m = b.m();
        let (lo, hi) = ys.split_at_mut(QK4_1 / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b.qs) {
            *l = (q & 0x0F) as f32 * d + m;
            *h = (q >> 4) as f32 * d + m;
        }
    }
}
