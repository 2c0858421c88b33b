//! Q2_K: 256 values in 16 sub-blocks of 16 -> f16 `d` and `dmin`, a 4-bit
//! scale (low nibble) and 4-bit minimum (high nibble) per sub-block, two
//! bits per value; value = d * sc_j * q - dmin * m_j. `qs[32p + l]` holds
//! elements 128p + l, +32, +64, +96 in bit pairs 0-1 .. 6-7.
//! ggml-common.h `block_q2_K`; ggml-quants.c `quantize_row_q2_K_ref`.

use bytemuck::{Pod, Zeroable};

use super::kquant::{make_qkx2_quants, nearest_int, Qkx2, QK_K};
use super::{f16_bytes, scale, BlockQ8_K};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ2_K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    /// f16 super-block scale of the scales, little-endian.
    pub d: [u8; 2],
    /// f16 super-block scale of the minimums, little-endian.
    pub dmin: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ2_K>() == 84);
const _: () = assert!(std::mem::align_of::<BlockQ2_K>() == 1);

impl BlockQ2_K {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    #[inline]
    pub fn dmin(&self) -> f32 {
        scale(self.dmin)
    }

    /// Element `e`'s 2-bit quant.
    #[inline]
    pub fn q(&self, e: usize) -> u8 {
        let (p, r) = (e / 128, e % 128);
        (self.qs[32 * p + r % 32] >> (2 * (r / 32))) & 3
    }
}

/// ggml's reference: `make_qkx2_quants` (nmax 3, weights |x|, absolute
/// error) per sub-block, scales and minimums quantized to 4 bits against
/// the largest of each, then every quant recomputed from the stored values,
/// except in a sub-block whose stored scale is 0.
pub fn quantize_block_q2_k(x: &[f32; QK_K]) -> BlockQ2_K {
    let p = Qkx2 {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut l = [0u8; QK_K];
    let mut weights = [0f32; 16];
    let mut mins = [0f32; QK_K / 16];
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        (scales[j], mins[j]) = make_qkx2_quants(&p, xs, &weights, &mut l[16 * j..16 * j + 16]);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let q4scale = 15.0f32;
    let mut b = BlockQ2_K::zeroed();
    if max_scale > 0.0 {
        let iscale = q4scale / max_scale;
        for (s, &v) in b.scales.iter_mut().zip(&scales) {
            // Stored in a uint8_t: the low byte.
            *s = nearest_int(iscale * v) as u8;
        }
        b.d = f16_bytes(max_scale / q4scale);
    } else {
        b.d = f16_bytes(0.0);
    }
    if max_min > 0.0 {
        let iscale = q4scale / max_min;
        for (s, &v) in b.scales.iter_mut().zip(&mins) {
            *s |= (nearest_int(iscale * v) << 4) as u8;
        }
        b.dmin = f16_bytes(max_min / q4scale);
    } else {
        b.dmin = f16_bytes(0.0);
    }
    for j in 0..QK_K / 16 {
        let d = b.d() * (b.scales[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = b.dmin() * (b.scales[j] >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / d);
            l[16 * j + ii] = q.clamp(0, 3) as u8;
        }
    }
    for p in 0..2 {
        for i in 0..32 {
            let q = |k: usize| l[128 * p + i + 32 * k];
            b.qs[32 * p + i] = q(0) | (q(1) << 2) | (q(2) << 4) | (q(3) << 6);
        }
    }
    b
}

pub fn quantize_row_q2_k(x: &[f32], out: &mut [BlockQ2_K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q2_K row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *b = quantize_block_q2_k(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q2_k(blocks: &[BlockQ2_K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "q2_K row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, min) = (b.d(), b.dmin());
        for j in 0..QK_K / 16 {
            let sc = b.scales[j];
            let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
            for (e, y) in ys[16 * j..16 * j + 16].iter_mut().enumerate() {
                *y = dl * b.q(16 * j + e) as f32 - ml;
            }
        }
    }
}

/// The exact integer parts of a Q2_K x Q8_K super-block dot:
/// `isum = sum_j sc_j * sum(q * y)` over sub-block j, and
/// `msum = sum_j m_j * bsum_j`.
#[inline]
pub fn block_sums_q2_k(x: &BlockQ2_K, y: &BlockQ8_K) -> (i32, i32) {
    let mut isum = 0i32;
    let mut msum = 0i32;
    for j in 0..QK_K / 16 {
        let sc = x.scales[j];
        let s: i32 = (16 * j..16 * j + 16)
            .map(|e| x.q(e) as i32 * y.qs[e] as i32)
            .sum();
        isum += (sc & 0xF) as i32 * s;
        msum += (sc >> 4) as i32 * y.bsum(j) as i32;
    }
    (isum, msum)
}

/// ggml's `ggml_vec_dot_q2_K_q8_K_generic`: exact integer sums per
/// super-block ([`block_sums_q2_k`]), then `sumf += dall * isum - dmin *
/// msum` with `dall = dy * d`, `dmin = dy * dmin`. This is also the order
/// of every SIMD kernel.
pub fn vec_dot_q2_k_q8_k(x: &[BlockQ2_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (isum, msum) = block_sums_q2_k(bx, by);
        sumf += term(bx, by, isum, msum);
    }
    sumf
}

/// What a super-block adds: `dall * isum - dmin * msum` with
/// `dall = d_y * d`, `dmin = d_y * dmin` (ggml's operand order).
#[inline(always)]
pub fn term(x: &BlockQ2_K, y: &BlockQ8_K, isum: i32, msum: i32) -> f32 {
    let dall = y.d() * x.d();
    let dmin = y.d() * x.dmin();
    dall * isum as f32 - dmin * msum as f32
}

impl crate::dot::DotFormat for BlockQ2_K {
    type Act = BlockQ8_K;
    fn vec_dot(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        vec_dot_q2_k_q8_k(x, y)
    }
    fn gemm(ks: &crate::dot::Kernels) -> crate::dot::GemmFn<Self, BlockQ8_K> {
        ks.q2_k
    }
}
