//! Q5_1: 32 values -> f16 scale `d`, f16 minimum `m`, 32 high bits `qh`,
//! 16 bytes of low nibbles; value = d * q + m, q as in Q5_0.
//! ggml-common.h `block_q5_1`; ggml-quants.c `quantize_row_q5_1_ref`.

use bytemuck::{Pod, Zeroable};

use super::{f16_bytes, scale, BlockQ8_1};

pub const QK5_1: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_1 {
    /// f16 scale, little-endian.
    pub d: [u8; 2],
    /// f16 block minimum, little-endian.
    pub m: [u8; 2],
    /// Fifth bits, a little-endian u32.
    pub qh: [u8; 4],
    pub qs: [u8; QK5_1 / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::align_of::<BlockQ5_1>() == 1);

impl BlockQ5_1 {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    #[inline]
    pub fn m(&self) -> f32 {
        scale(self.m)
    }

    /// Element `e`'s 5-bit quant (0..=31).
    #[inline]
    pub fn q(&self, e: usize) -> u8 {
        let qh = u32::from_le_bytes(self.qh);
        let lo = if e < 16 {
            self.qs[e] & 0x0F
        } else {
            self.qs[e - 16] >> 4
        };
        lo | ((((qh >> e) & 1) as u8) << 4)
    }
}

/// ggml's reference: d = (max - min) / 31, q = trunc((x - min)/d + 0.5) with
/// no clamp, as in C: a q that rounds up to 32 keeps only its low five bits
/// (0), exactly as ggml stores it.
#[inline]
pub fn quantize_block_q5_1(x: &[f32; QK5_1]) -> BlockQ5_1 {
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
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // (uint8_t) truncation in C; in range for finite input.
    let q = |v: f32| ((v - min) * id + 0.5) as u8;
    let mut qs = [0u8; QK5_1 / 2];
    let mut qh = 0u32;
    for (j, b) in qs.iter_mut().enumerate() {
        let (x0, x1) = (q(x[j]), q(x[j + QK5_1 / 2]));
        *b = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= ((x0 as u32 & 0x10) >> 4) << j;
        qh |= ((x1 as u32 & 0x10) >> 4) << (j + QK5_1 / 2);
    }
    BlockQ5_1 {
        d: f16_bytes(d),
        m: f16_bytes(min),
        qh: qh.to_le_bytes(),
        qs,
    }
}

pub fn quantize_row_q5_1(x: &[f32], out: &mut [BlockQ5_1]) {
    assert_eq!(x.len(), out.len() * QK5_1, "q5_1 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK5_1)) {
        *b = quantize_block_q5_1(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q5_1(blocks: &[BlockQ5_1], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK5_1, "q5_1 row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK5_1)) {
        let (d, m) = (b.d(), b.m());
        for (e, y) in ys.iter_mut().enumerate() {
            *y = b.q(e) as f32 * d + m;
        }
    }
}

/// ggml's `ggml_vec_dot_q5_1_q8_1_generic`: per block an exact integer sum
/// of q * y, then `sumf += (dx * dy) * sumi + m * s` (s = the Q8_1 block's
/// d * sum(y)). Every SIMD kernel gives these bits.
pub fn vec_dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let sumi: i32 = (0..QK5_1).map(|e| bx.q(e) as i32 * by.qs[e] as i32).sum();
        sumf += term(bx, by, sumi);
    }
    sumf
}

/// What a block adds: `(d_x * d_y) * sumi + m * s`.
#[inline(always)]
pub fn term(x: &BlockQ5_1, y: &BlockQ8_1, sumi: i32) -> f32 {
    (x.d() * y.d()) * sumi as f32 + x.m() * y.s()
}

impl crate::dot::DotFormat for BlockQ5_1 {
    type Act = BlockQ8_1;
    fn vec_dot(x: &[Self], y: &[BlockQ8_1]) -> f32 {
        vec_dot_q5_1_q8_1(x, y)
    }
    fn gemm(ks: &crate::dot::Kernels) -> crate::dot::GemmFn<Self, BlockQ8_1> {
        ks.q5_1
    }
}
