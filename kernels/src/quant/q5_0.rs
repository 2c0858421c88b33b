//! Q5_0: 32 values -> f16 scale `d`, 32 high bits `qh`, 16 bytes of low
//! nibbles; value = d * (q - 16) with q = nibble | (bit << 4). Nibble order
//! as Q4_0 (byte j: element j low, element j + 16 high); bit e of `qh`
//! (little-endian u32) is element e's fifth bit.
//! ggml-common.h `block_q5_0`; ggml-quants.c `quantize_row_q5_0_ref`.

use bytemuck::{Pod, Zeroable};

use super::{f16_bytes, scale, BlockQ8_0};

pub const QK5_0: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_0 {
    /// f16 scale, little-endian.
    pub d: [u8; 2],
    /// Fifth bits, a little-endian u32 (ggml stores it as bytes too, so the
    /// block has no alignment).
    pub qh: [u8; 4],
    pub qs: [u8; QK5_0 / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::align_of::<BlockQ5_0>() == 1);

impl BlockQ5_0 {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
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

/// ggml's reference: as Q4_0 with 5 bits. The value of largest magnitude
/// (first on ties, sign kept) maps to q = 0 via d = max / -16;
/// q = min(31, trunc(x/d + 16.5)), multiplying by the f32 reciprocal.
#[inline]
pub fn quantize_block_q5_0(x: &[f32; QK5_0]) -> BlockQ5_0 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // (int8_t) truncation in C; the argument is in [0.5, 32.5] for finite input.
    let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
    let mut qs = [0u8; QK5_0 / 2];
    let mut qh = 0u32;
    for (j, b) in qs.iter_mut().enumerate() {
        let (x0, x1) = (q(x[j]), q(x[j + QK5_0 / 2]));
        *b = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= ((x0 as u32 & 0x10) >> 4) << j;
        qh |= ((x1 as u32 & 0x10) >> 4) << (j + QK5_0 / 2);
    }
    BlockQ5_0 {
        d: f16_bytes(d),
        qh: qh.to_le_bytes(),
        qs,
    }
}

pub fn quantize_row_q5_0(x: &[f32], out: &mut [BlockQ5_0]) {
    assert_eq!(x.len(), out.len() * QK5_0, "q5_0 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK5_0)) {
        *b = quantize_block_q5_0(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q5_0(blocks: &[BlockQ5_0], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK5_0, "q5_0 row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK5_0)) {
        let d = b.d();
        for (e, y) in ys.iter_mut().enumerate() {
            *y = (b.q(e) as i32 - 16) as f32 * d;
        }
    }
}

/// ggml's `ggml_vec_dot_q5_0_q8_0_generic`: per block an exact integer sum
/// of (q - 16) * y, then `sumf += (dx * dy) * sumi`. Every SIMD kernel gives
/// these bits: the integer sum is exact whatever the lanes.
pub fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let sumi: i32 = (0..QK5_0)
            .map(|e| (bx.q(e) as i32 - 16) * by.qs[e] as i32)
            .sum();
        sumf += term(bx, by, sumi);
    }
    sumf
}

/// What a block adds: `(d_x * d_y) * sumi`.
#[inline(always)]
pub fn term(x: &BlockQ5_0, y: &BlockQ8_0, sumi: i32) -> f32 {
    (x.d() * y.d()) * sumi as f32
}

impl crate::dot::DotFormat for BlockQ5_0 {
    type Act = BlockQ8_0;
    fn vec_dot(x: &[Self], y: &[BlockQ8_0]) -> f32 {
        vec_dot_q5_0_q8_0(x, y)
    }
    fn gemm(ks: &crate::dot::Kernels) -> crate::dot::GemmFn<Self, BlockQ8_0> {
        ks.q5_0
    }
}
