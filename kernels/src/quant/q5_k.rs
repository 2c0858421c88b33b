//! Q5_K: Q4_K's layout plus 32 bytes of fifth bits: value =
//! d * sc_j * q - dmin * m_j with q = nibble | (bit << 4). Bit 2p of
//! `qh[i]` is element 64p + i's fifth bit, bit 2p + 1 element 64p + 32 + i's.
//! ggml-common.h `block_q5_K`; ggml-quants.c `quantize_row_q5_K_ref`.

use bytemuck::{Pod, Zeroable};

use super::kquant::{get_scale_min_k4, make_qkx2_quants, nearest_int, Qkx2, K_SCALE_SIZE, QK_K};
use super::q4_k::pack_k4;
use super::{scale, BlockQ8_K};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_K {
    /// f16 super-block scale of the scales, little-endian.
    pub d: [u8; 2],
    /// f16 super-block scale of the minimums, little-endian.
    pub dmin: [u8; 2],
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ5_K>() == 176);
const _: () = assert!(std::mem::align_of::<BlockQ5_K>() == 1);

impl BlockQ5_K {
    #[inline]
    pub fn d(&self) -> f32 {
        scale(self.d)
    }

    #[inline]
    pub fn dmin(&self) -> f32 {
        scale(self.dmin)
    }

    /// Element `e`'s 5-bit quant.
    #[inline]
    pub fn q(&self, e: usize) -> u8 {
        let (p, i) = (e / 64, e % 32);
        let hi = e % 64 >= 32;
        let byte = self.qs[32 * p + i];
        let lo = if hi { byte >> 4 } else { byte & 0x0F };
        let bit = (self.qh[i] >> (2 * p + hi as usize)) & 1;
        lo | (bit << 4)
    }
}

/// ggml's reference: Q4_K's with 5-bit quants (`nmax` 31, a shorter search:
/// rmin -0.5, 15 steps).
pub fn quantize_block_q5_k(x: &[f32; QK_K]) -> BlockQ5_K {
    let p = Qkx2 {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
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
    let k4 = pack_k4(&scales, &mins, max_scale, max_min);
    let mut b = BlockQ5_K {
        d: k4.d,
        dmin: k4.dmin,
        scales: k4.scales,
        qh: [0; QK_K / 8],
        qs: [0; QK_K / 2],
    };
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &b.scales);
        let d = b.d() * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = b.dmin() * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d);
            l[32 * j + ii] = q.clamp(0, 31) as u8;
        }
    }
    let (mut m1, mut m2) = (1u8, 2u8);
    for p in 0..4 {
        for j in 0..32 {
            let mut l1 = l[64 * p + j];
            if l1 > 15 {
                l1 -= 16;
                b.qh[j] |= m1;
            }
            let mut l2 = l[64 * p + 32 + j];
            if l2 > 15 {
                l2 -= 16;
                b.qh[j] |= m2;
            }
            b.qs[32 * p + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    b
}

pub fn quantize_row_q5_k(x: &[f32], out: &mut [BlockQ5_K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q5_K row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *b = quantize_block_q5_k(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q5_k(blocks: &[BlockQ5_K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "q5_K row length");
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

/// The exact integer parts of a Q5_K x Q8_K super-block dot, as
/// [`super::q4_k::block_sums_q4_k`] with 5-bit quants.
#[inline]
pub fn block_sums_q5_k(x: &BlockQ5_K, y: &BlockQ8_K) -> (i32, i32) {
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

/// ggml's `ggml_vec_dot_q5_K_q8_K_generic`, operation for operation (as
/// [`super::q4_k::vec_dot_q4_k_q8_k`]). The scalar path's kernel.
pub fn vec_dot_q5_k_q8_k(x: &[BlockQ5_K], y: &[BlockQ8_K]) -> f32 {
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

/// The order every SIMD kernel uses: per super-block exact integer sums
/// ([`block_sums_q5_k`]), then `acc += (d_x d_y) isum - (dmin_x d_y) msum`.
pub fn vec_dot_q5_k_q8_k_sb(x: &[BlockQ5_K], y: &[BlockQ8_K]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut acc = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (isum, msum) = block_sums_q5_k(bx, by);
        acc += term(bx, by, isum, msum);
    }
    acc
}

/// What a super-block adds to the accumulator in the super-block order.
#[inline(always)]
pub fn term(x: &BlockQ5_K, y: &BlockQ8_K, isum: i32, msum: i32) -> f32 {
    (x.d() * y.d()) * isum as f32 - (x.dmin() * y.d()) * msum as f32
}

impl crate::dot::DotFormat for BlockQ5_K {
    type Act = BlockQ8_K;
    fn vec_dot(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        vec_dot_q5_k_q8_k(x, y)
    }
    fn gemm(ks: &crate::dot::Kernels) -> crate::dot::GemmFn<Self, BlockQ8_K> {
        ks.q5_k
    }
}
