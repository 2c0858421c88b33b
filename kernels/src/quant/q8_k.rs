//! Q8_K: 256 values -> f32 scale `d`, 256 x i8, and the sums of each 16
//! quants; value = d * q. The activation format of the K-quants (ggml's
//! vec_dot_type for Q2_K..Q6_K); never stored in files.
//! ggml-common.h `block_q8_K`; ggml-quants.c `quantize_row_q8_K_ref`.

use bytemuck::{Pod, Zeroable};

use super::kquant::{nearest_int, QK_K};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_K {
    /// f32 scale, little-endian (bytes, so the block has no alignment).
    pub d: [u8; 4],
    pub qs: [i8; QK_K],
    /// Sum of each 16 quants, little-endian i16.
    pub bsums: [[u8; 2]; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_K>() == 292);
const _: () = assert!(std::mem::align_of::<BlockQ8_K>() == 1);

impl BlockQ8_K {
    #[inline]
    pub fn d(&self) -> f32 {
        f32::from_le_bytes(self.d)
    }

    /// The sum of quants `16 j .. 16 j + 16`.
    #[inline]
    pub fn bsum(&self, j: usize) -> i16 {
        i16::from_le_bytes(self.bsums[j])
    }
}

/// ggml's reference: the value of largest magnitude `max` (first on ties,
/// sign kept) maps to -127 via iscale = -127 / max; q = min(127,
/// nearest_int(iscale * x)), d = 1 / iscale. An all-zero block is all
/// zeros (C leaves its `bsums` as they were; here they are 0).
pub fn quantize_block_q8_k(x: &[f32; QK_K]) -> BlockQ8_K {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    let mut b = BlockQ8_K::zeroed();
    if amax == 0.0 {
        return b;
    }
    let iscale = -127.0 / max;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        // nearest_int(iscale * x) >= -127 up to rounding of iscale, and the
        // min keeps the top at 127; `as i8` then never wraps for finite x.
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    b.bsums = bsums(&b.qs);
    b.d = (1.0 / iscale).to_le_bytes();
    b
}

/// The sums of each 16 quants, as a block stores them.
pub(crate) fn bsums(qs: &[i8; QK_K]) -> [[u8; 2]; QK_K / 16] {
    std::array::from_fn(|j| {
        let sum: i32 = qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
        (sum as i16).to_le_bytes()
    })
}

pub fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8_K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q8_K row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *b = quantize_block_q8_k(xs.try_into().unwrap());
    }
}

pub fn dequantize_row_q8_k(blocks: &[BlockQ8_K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "q8_K row length");
    for (b, ys) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for (y, &q) in ys.iter_mut().zip(&b.qs) {
            *y = d * q as f32;
        }
    }
}
