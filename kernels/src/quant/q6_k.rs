//! Q6_K: 256 values in 16 sub-blocks of 16 -> f16 `d`, an i8 scale per
//! sub-block, 128 bytes of low nibbles `ql` and 64 bytes of high bit pairs
//! `qh`; value = d * sc_j * (q - 32). In each half h (128 values):
//! `ql[64h + l]` holds elements 128h + l (low nibble) and 128h + 64 + l
//! (high), `ql[64h + 32 + l]` elements 128h + 32 + l and 128h + 96 + l, and
//! `qh[32h + l]` the top two bits of 128h + l, +32, +64, +96 (bits 0-1 .. 6-7).
//! ggml-common.h `block_q6_K`; ggml-quants.c `quantize_row_q6_K_ref`.

use bytemuck::{Pod, Zeroable};

use super::kquant::{make_qx_quants_rmse1, nearest_int, QK_K};
use super::{f16_bytes, scale, BlockQ8_K};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ6_K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    /// f16 super-block scale, little-endian.
    pub d: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ6_K>() == 210);
const _: () = assert!(std::mem::align_of::<BlockQ6_K>() == 1);

impl BlockQ6_K {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    /// Element `e`'s 6-bit quant (0..=63; the value is q - 32).
    #[inline]
    pub fn q(&self, e: usize) -> u8 {
        let (h, r) = (e / 128, e % 128);
        let (quarter, l) = (r / 32, r % 32);
        let byte = self.ql[64 * h + 32 * (quarter % 2) + l];
        let lo = if quarter < 2 { byte & 0x0F } else { byte >> 4 };
        let hi = (self.qh[32 * h + l] >> (2 * quarter)) & 3;
        lo | (hi << 4)
    }
}

/// ggml's reference: `make_qx_quants` (nmax 32, w = x^2) per sub-block, the
/// scale of largest magnitude mapped to -128 (`iscale = -128 / max_scale`,
/// i8 scales clamped at 127), then every quant recomputed from the stored
/// f16 `d` and i8 scale, except in a sub-block whose stored scale is 0. A
/// super-block whose scales are all below 1e-15 is all zeros.
pub fn quantize_block_q6_k(x: &[f32; QK_K]) -> BlockQ6_K {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..QK_K / 16 {
        let s = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    let mut b = BlockQ6_K::zeroed();
    if max_abs_scale < 1e-15 {
        return b;
    }
    let iscale = -128.0 / max_scale;
    b.d = f16_bytes(1.0 / iscale);
    for (sc, &s) in b.scales.iter_mut().zip(&scales) {
        // C stores MIN(127, nearest_int(..)) in an int8_t (keeping the low byte).
        *sc = nearest_int(iscale * s).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let d = b.d() * b.scales[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    for h in 0..2 {
        let (l, ql, qh) = (&l[128 * h..], &mut b.ql[64 * h..], &mut b.qh[32 * h..]);
        for i in 0..32 {
            let q = |k: usize| l[i + 32 * k] as u8;
            ql[i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            ql[i + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    b
}

pub fn quantize_row_q6_k(x: &[f32], out: &mut [BlockQ6_K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q6_K row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *b = quantize_block_q6_k(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q6_k(blocks: &[BlockQ6_K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "q6_K row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for (e, y) in ys.iter_mut().enumerate() {
            // ggml: d * sc * q, left to right.
            *y = d * b.scales[e / 16] as f32 * (b.q(e) as i32 - 32) as f32;
        }
    }
}

/// `isum = sum_j sc_j * sum((q - 32) * y)` over each sub-block j of 16: the
/// exact integer part of a Q6_K x Q8_K super-block dot.
#[inline]
pub fn block_sums_q6_k(x: &BlockQ6_K, y: &BlockQ8_K) -> i32 {
    let mut isum = 0i32;
    for j in 0..QK_K / 16 {
        let s: i32 = (16 * j..16 * j + 16)
            .map(|e| (x.q(e) as i32 - 32) * y.qs[e] as i32)
            .sum();
        isum += x.scales[j] as i32 * s;
    }
    isum
}

/// ggml's `ggml_vec_dot_q6_K_q8_K_generic`, operation for operation (eight
/// i32 lanes by index mod 8, scaled per super-block into eight f32 sums,
/// added in order at the end). The scalar path's kernel.
pub fn vec_dot_q6_k_q8_k(x: &[BlockQ6_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sums = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let mut aux32 = [0i32; 8];
        for e in 0..QK_K {
            let a = bx.q(e) as i32 - 32;
            let aux16 = (by.qs[e] as i32 * a) as i16;
            aux32[e % 8] += bx.scales[e / 16] as i32 * aux16 as i32;
        }
        let d = bx.d() * by.d();
        for (s, &a) in sums.iter_mut().zip(&aux32) {
            *s += d * a as f32;
        }
    }
    let mut sumf = 0.0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

/// The order every SIMD kernel uses: per super-block one exact integer sum
/// ([`block_sums_q6_k`]), then `acc += (d_x * d_y) * isum`.
pub fn vec_dot_q6_k_q8_k_sb(x: &[BlockQ6_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut acc = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        acc += term(bx, by, block_sums_q6_k(bx, by));
    }
    acc
}

/// What a super-block adds to the accumulator in the super-block order.
#[inline(always)]
pub fn term(x: &BlockQ6_K, y: &BlockQ8_K, isum: i32) -> f32 {
    (x.d() * y.d()) * isum as f32
}

impl crate::dot::DotFormat for BlockQ6_K {
    type Act = BlockQ8_K;
    fn vec_dot(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        vec_dot_q6_k_q8_k(x, y)
    }
    fn gemm(ks: &crate::dot::Kernels) -> crate::dot::GemmFn<Self, BlockQ8_K> {
        ks.q6_k
    }
}
