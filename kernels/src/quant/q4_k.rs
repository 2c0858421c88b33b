//! Q4_K: 256 values in 8 sub-blocks of 32 -> f16 `d` and `dmin`, 6-bit
//! scale and minimum per sub-block (12 bytes, [`get_scale_min_k4`]), 128
//! bytes of nibbles; value = d * sc_j * q - dmin * m_j. Bytes 32p..32p+32
//! hold sub-block 2p in their low nibbles and 2p + 1 in their high ones.
//! ggml-common.h `block_q4_K`; ggml-quants.c `quantize_row_q4_K_ref`.

use bytemuck::{Pod, Zeroable};

use super::kquant::{
    get_scale_min_k4, make_qkx2_quants, nearest_int, pack_scale_min_k4, Qkx2, K_SCALE_SIZE, QK_K,
};
use super::{f16_bytes, scale, BlockQ8_K};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_K {
    /// f16 super-block scale of the scales, little-endian.
    pub d: [u8; 2],
    /// f16 super-block scale of the minimums, little-endian.
    pub dmin: [u8; 2],
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_K>() == 144);
const _: () = assert!(std::mem::align_of::<BlockQ4_K>() == 1);

impl BlockQ4_K {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    #[inline]
    pub fn dmin(&self) -> f32 {
        scale(self.dmin)
    }

    /// Element `e`'s 4-bit quant.
    #[inline]
    pub fn q(&self, e: usize) -> u8 {
        let byte = self.qs[32 * (e / 64) + e % 32];
        if e % 64 < 32 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }
}

/// ggml's reference. Per sub-block, `make_qkx2_quants` fits scale and
/// minimum with weights `sqrt(mean x^2) + |x|`; the eight scales and
/// minimums are quantized to 6 bits against the largest of each; then every
/// quant is recomputed from the stored (f16, 6-bit) scale and minimum,
/// except in a sub-block whose stored scale is 0, which keeps its first quants.
pub fn quantize_block_q4_k(x: &[f32; QK_K]) -> BlockQ4_K {
    let p = Qkx2 {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let mut l = [0u8; QK_K];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = make_qkx2_quants(&p, xs, &weights, &mut l[32 * j..32 * j + 32]);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let b = pack_k4(&scales, &mins, max_scale, max_min);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &b.scales);
        let d = b.d() * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = b.dmin() * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d);
            l[32 * j + ii] = q.clamp(0, 15) as u8;
        }
    }
    let mut out = b;
    for p in 0..4 {
        for i in 0..32 {
            out.qs[32 * p + i] = l[64 * p + i] | (l[64 * p + 32 + i] << 4);
        }
    }
    out
}

/// The scale part of Q4_K/Q5_K's reference: 6-bit scales and minimums
/// against the largest of each, `d = max_scale / 63`, `dmin = max_min / 63`.
pub(super) fn pack_k4(
    scales: &[f32; 8],
    mins: &[f32; 8],
    max_scale: f32,
    max_min: f32,
) -> BlockQ4_K {
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // C stores nearest_int's int in a uint8_t (keeping the low byte), then clamps.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    BlockQ4_K {
        d: f16_bytes(max_scale / 63.0),
        dmin: f16_bytes(max_min / 63.0),
        scales: pack_scale_min_k4(&ls, &lm),
        qs: [0; QK_K / 2],
    }
}

pub fn quantize_row_q4_k(x: &[f32], out: &mut [BlockQ4_K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q4_K row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *b = quantize_block_q4_k(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q4_k(blocks: &[BlockQ4_K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "q4_K row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, min) = (b.d(), b.dmin());
        for j in 0..8 {
            let (sc, m) = get_scale_min_k4(j, &b.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            for (e, y) in ys[32 * j..32 * j + 32].iter_mut().enumerate() {
                *y = d1 * b.q(32 * j + e) as f32 - m1;
            }
        }
    }
}

/// The exact integer parts of a Q4_K x Q8_K super-block dot:
/// `isum = sum_j sc_j * sum(q * y)` over each sub-block j of 32, and
/// `msum = sum_j m_j * (bsum_2j + bsum_2j+1)`.
#[inline]
pub fn block_sums_q4_k(x: &BlockQ4_K, y: &BlockQ8_K) -> (i32, i32) {
    let (sc, m) = super::kquant::scales_mins_k4(&x.scales);
    let mut isum = 0i32;
    let mut msum = 0i32;
    for j in 0..8 {
        let s: i32 = (32 * j..32 * j + 32)
            .map(|e| x.q(e) as i32 * y.qs[e] as i32)
            .sum();
        isum += sc[j] as i32 * s;
        msum += m[j] as i32 * (y.bsum(2 * j) as i32 + y.bsum(2 * j + 1) as i32);
    }
    (isum, msum)
}

/// ggml's `ggml_vec_dot_q4_K_q8_K_generic`, operation for operation: eight
/// i32 lanes by index mod 8 scaled per super-block into eight f32 sums,
/// `sumf -= (dmin_x * d_y) * msum` per super-block, the eight sums added in
/// order at the end. The scalar path's kernel.
pub fn vec_dot_q4_k_q8_k(x: &[BlockQ4_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (sc, m) = super::kquant::scales_mins_k4(&bx.scales);
        let mut aux32 = [0i32; 8];
        for e in 0..QK_K {
            let aux16 = (by.qs[e] as i32 * bx.q(e) as i32) as i16;
            aux32[e % 8] += sc[e / 32] as i32 * aux16 as i32;
        }
        let sumi: i32 = (0..QK_K / 16)
            .map(|j| by.bsum(j) as i32 * m[j / 2] as i32)
            .sum();
        let d = bx.d() * by.d();
        for (s, &a) in sums.iter_mut().zip(&aux32) {
            *s += d * a as f32;
        }
        let dmin = bx.dmin() * by.d();
        sumf -= dmin * sumi as f32;
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// The order every SIMD kernel uses (the twin they are tested against bit
/// for bit): per super-block exact integer sums ([`block_sums_q4_k`]), then
/// `acc += (d_x * d_y) * isum - (dmin_x * d_y) * msum`.
pub fn vec_dot_q4_k_q8_k_sb(x: &[BlockQ4_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut acc = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (isum, msum) = block_sums_q4_k(bx, by);
        acc += term(bx, by, isum, msum);
    }
    acc
}

/// What a super-block adds to the accumulator in the super-block order,
/// from its exact integer sums.
#[inline(always)]
pub fn term(x: &BlockQ4_K, y: &BlockQ8_K, isum: i32, msum: i32) -> f32 {
    (x.d() * y.d()) * isum as f32 - (x.dmin() * y.d()) * msum as f32
}

impl crate::dot::DotFormat for BlockQ4_K {
    type Act = BlockQ8_K;
    fn vec_dot(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        vec_dot_q4_k_q8_k(x, y)
    }
    fn gemm(ks: &crate::dot::Kernels) -> crate::dot::GemmFn<Self, BlockQ8_K> {
        ks.q4_k
    }
}
