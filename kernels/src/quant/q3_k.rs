//! Q3_K: 256 values in 16 sub-blocks of 16 -> f16 `d`, a 6-bit scale per
//! sub-block (12 bytes), two low bits per value in `qs` and a high bit in
//! `hmask`; value = d * (sc_j - 32) * (q - 4) with q = low | (bit << 2).
//! `qs[32p + l]` holds elements 128p + l, +32, +64, +96 in bit pairs 0-1 ..
//! 6-7; bit k of `hmask[l]` is element 32k + l's high bit. Scale j's low
//! nibble is byte j (j < 8, low nibble) or j - 8 (high nibble); its top two
//! bits are bits 2(j/4)..+2 of byte 8 + j % 4.
//! ggml-common.h `block_q3_K`; ggml-quants.c `quantize_row_q3_K_ref`.

use bytemuck::{Pod, Zeroable};

use super::kquant::{make_q3_quants, nearest_int, QK_K};
use super::{f16_bytes, scale, BlockQ8_K};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ3_K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    /// f16 super-block scale, little-endian.
    pub d: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ3_K>() == 110);
const _: () = assert!(std::mem::align_of::<BlockQ3_K>() == 1);

impl BlockQ3_K {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    /// Sub-block `j`'s 6-bit scale (0..=63; the multiplier is sc - 32).
    #[inline]
    pub fn scale(&self, j: usize) -> u8 {
        let lo = if j < 8 {
            self.scales[j] & 0xF
        } else {
            self.scales[j - 8] >> 4
        };
        lo | (((self.scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)
    }

    /// Element `e`'s 3-bit quant (0..=7; the value is q - 4).
    #[inline]
    pub fn q(&self, e: usize) -> u8 {
        let (p, r) = (e / 128, e % 128);
        let lo = (self.qs[32 * p + r % 32] >> (2 * (r / 32))) & 3;
        let hi = (self.hmask[e % 32] >> (e / 32)) & 1;
        lo | (hi << 2)
    }
}

/// ggml's reference: `make_q3_quants` (nmax 4, rmse search) per sub-block,
/// the scale of largest magnitude mapped to -32 (`iscale = -32 / max_scale`,
/// 6-bit scales offset by 32), then every quant recomputed from the stored
/// f16 `d` and scale, except in a sub-block whose stored scale is 0.
pub fn quantize_block_q3_k(x: &[f32; QK_K]) -> BlockQ3_K {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for j in 0..QK_K / 16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        let s = scales[j].abs();
        if s > amax {
            amax = s;
            max_scale = scales[j];
        }
    }
    let mut b = BlockQ3_K::zeroed();
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            // C: int8_t l = nearest_int(..) (the low byte), clamped to -32..31, + 32.
            let li = ((nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                b.scales[j] = li & 0xF;
            } else {
                b.scales[j - 8] |= (li & 0xF) << 4;
            }
            b.scales[j % 4 + 8] |= (li >> 4) << (2 * (j / 4));
        }
        b.d = f16_bytes(1.0 / iscale);
    } else {
        b.d = f16_bytes(0.0);
    }
    for j in 0..QK_K / 16 {
        let sc = b.scale(j) as i32 - 32;
        let d = b.d() * sc as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    let (mut m, mut hm) = (0usize, 1u8);
    for lj in l.iter_mut() {
        if *lj > 3 {
            b.hmask[m] |= hm;
            *lj -= 4;
        }
        m += 1;
        if m == QK_K / 8 {
            m = 0;
            hm <<= 1;
        }
    }
    for p in 0..2 {
        for i in 0..32 {
            let q = |k: usize| l[128 * p + i + 32 * k] as u8;
            b.qs[32 * p + i] = q(0) | (q(1) << 2) | (q(2) << 4) | (q(3) << 6);
        }
    }
    b
}

pub fn quantize_row_q3_k(x: &[f32], out: &mut [BlockQ3_K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q3_K row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *b = quantize_block_q3_k(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q3_k(blocks: &[BlockQ3_K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "q3_K row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for j in 0..QK_K / 16 {
            let dl = d * (b.scale(j) as i32 - 32) as f32;
            for (e, y) in ys[16 * j..16 * j + 16].iter_mut().enumerate() {
                *y = dl * (b.q(16 * j + e) as i32 - 4) as f32;
            }
        }
    }
}

/// `isum = sum_j (sc_j - 32) * sum((q - 4) * y)` over each sub-block j of
/// 16: the exact integer part of a Q3_K x Q8_K super-block dot.
#[inline]
pub fn block_sums_q3_k(x: &BlockQ3_K, y: &BlockQ8_K) -> i32 {
    let mut isum = 0i32;
    for j in 0..QK_K / 16 {
        let s: i32 = (16 * j..16 * j + 16)
            .map(|e| (x.q(e) as i32 - 4) * y.qs[e] as i32)
            .sum();
        isum += (x.scale(j) as i32 - 32) * s;
    }
    isum
}

/// ggml's `ggml_vec_dot_q3_K_q8_K_generic`, operation for operation: integer
/// products summed into eight i32 lanes (lane l: elements with index l mod
/// 8), each super-block's lanes scaled by `d = d_x * d_y` into eight f32
/// sums, which are added in order at the end. The scalar path's kernel.
pub fn vec_dot_q3_k_q8_k(x: &[BlockQ3_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sums = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let mut aux32 = [0i32; 8];
        for e in 0..QK_K {
            let a = bx.q(e) as i32 - 4;
            let aux16 = (by.qs[e] as i32 * a) as i16;
            aux32[e % 8] += (bx.scale(e / 16) as i32 - 32) * aux16 as i32;
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

/// The order every SIMD kernel uses (the twin they are tested against bit
/// for bit): per super-block one exact integer sum ([`block_sums_q3_k`]),
/// then `acc += (d_x * d_y) * isum`.
pub fn vec_dot_q3_k_q8_k_sb(x: &[BlockQ3_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut acc = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        acc += term(bx, by, block_sums_q3_k(bx, by));
    }
    acc
}

/// What a super-block adds to the accumulator in the super-block order.
#[inline(always)]
pub fn term(x: &BlockQ3_K, y: &BlockQ8_K, isum: i32) -> f32 {
    (x.d() * y.d()) * isum as f32
}

impl crate::dot::DotFormat for BlockQ3_K {
    type Act = BlockQ8_K;
    fn vec_dot(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        vec_dot_q3_k_q8_k(x, y)
    }
    fn gemm(ks: &crate::dot::Kernels) -> crate::dot::GemmFn<Self, BlockQ8_K> {
        ks.q3_k
    }
}
