//! F16 and BF16 weight GEMMs for the AVX-512 paths: the AVX2 module's float
//! tile body itself (`tile_f`: one 8-lane FMA accumulator per (row, token),
//! the same horizontal sum, the `n % 8` tail added in order), so every
//! output is the AVX2 path's bits, compiled with AVX-512VL for a 6 x 4 tile
//! that its 32 vector registers hold (24 accumulators, 4 tokens, 1 weight
//! vector) where AVX2's 16 hold 4 x 2. A weight vector converted from f16
//! serves 4 tokens instead of 2 and a token's 6 rows instead of 4: F16
//! prompt processing was the one case slower than llama.cpp (0.88x of
//! llama-perplexity on SmolLM2 F16).

use super::avx2::{tile_f, BF16, F16};
use crate::dot::{tiled_gemm, TileFn, Tiles};
use crate::quant::float::{Bf16Bytes, F16Bytes};

/// Weight rows and tokens of a full tile.
const MR: usize = 6;
const NR: usize = 4;
/// The full tile, for tests that count tiles.
#[cfg(test)]
pub(crate) const TILE: (usize, usize) = (MR, NR);

/// The AVX2 module's [`tile_f`] compiled with AVX-512VL, whose 32 ymm
/// registers hold the 6 x 4 tile.
///
/// # Safety
/// The CPU has AVX-512F/VL, AVX2, FMA and F16C; [`tile_f`]'s pointers.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn tile<W, const K: u8, const R: usize, const C: usize>(
    w: *const W,
    a: *const W,
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    // SAFETY: this function's features; the caller's pointers.
    unsafe { tile_f::<K, K, R, C>(w.cast(), a.cast(), n, out, ld) }
}

/// Safe only through the AVX-512 kernel tables (features detected first).
fn gemm<W, const K: u8>(w: &[W], a: &[W], k: usize, out: &mut [f32]) -> Tiles {
    let tiles = [
        tile::<W, K, MR, NR> as TileFn<W, W>,
        tile::<W, K, MR, 1>,
        tile::<W, K, 1, NR>,
        tile::<W, K, 1, 1>,
    ];
    // SAFETY: the tables that hand this out checked the features.
    unsafe { tiled_gemm(w, a, k, out, (MR, NR), tiles) }
}

/// F16 weights x f16 activations.
pub(super) fn gemm_f16(w: &[F16Bytes], a: &[F16Bytes], k: usize, out: &mut [f32]) -> Tiles {
    gemm::<_, F16>(w, a, k, out)
}

/// BF16 weights x bf16 activations.
pub(super) fn gemm_bf16(w: &[Bf16Bytes], a: &[Bf16Bytes], k: usize, out: &mut [f32]) -> Tiles {
    gemm::<_, BF16>(w, a, k, out)
}

#[cfg(test)]
mod tests {
    use crate::quant::float::{f32_to_bf16, f32_to_f16};
    use crate::test_util::values;

    /// The wide tile gives the AVX2 tile's bits for every shape: full and edge
    /// tiles in both directions, and element tails (`n % 8`).
    #[test]
    fn same_bits_as_the_avx2_tile() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") && has!("f16c")) {
            eprintln!("skipped: no AVX-512VL");
            return;
        }
        for (rows, n, cols) in [
            (1, 1, 8),
            (6, 4, 64),
            (7, 5, 33),
            (13, 9, 576),
            (12, 8, 100),
            (5, 3, 7),
        ] {
            let w = values(rows * cols, rows as u64);
            let x = values(n * cols, 1000 + n as u64);
            let wh: Vec<_> = w.iter().map(|&v| f32_to_f16(v).to_le_bytes()).collect();
            let xh: Vec<_> = x.iter().map(|&v| f32_to_f16(v).to_le_bytes()).collect();
            let wb: Vec<_> = w.iter().map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
            let xb: Vec<_> = x.iter().map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let (mut a, mut b) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            super::gemm_f16(&wh, &xh, cols, &mut a);
            crate::dot::avx2::gemm_f16(&wh, &xh, cols, &mut b);
            assert_eq!(bits(&a), bits(&b), "f16 {rows}x{cols}, {n} tokens");
            super::gemm_bf16(&wb, &xb, cols, &mut a);
            crate::dot::avx2::gemm_bf16(&wb, &xb, cols, &mut b);
            assert_eq!(bits(&a), bits(&b), "bf16 {rows}x{cols}, {n} tokens");
        }
    }
}
