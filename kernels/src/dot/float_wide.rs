//! F16 and BF16 weight GEMMs for the AVX-512 paths: the AVX2 float tile's
//! arithmetic (one 8-lane FMA accumulator per (row, token), the same
//! horizontal sum, the `n % 8` tail added in order), so every output is the
//! AVX2 path's bits, on a 6 x 4 tile that AVX-512's 32 vector registers hold
//! (24 accumulators, 4 tokens, 1 weight vector) where AVX2's 16 hold 4 x 2.
//! A weight vector converted from f16 now serves 4 tokens instead of 2 and a
//! token's 6 rows instead of 4: F16 prompt processing was the one case
//! slower than llama.cpp (0.88x of llama-perplexity on SmolLM2 F16).

use std::arch::x86_64::*;

use crate::dot::{for_tiles, gemm_shape, Tiles};
use crate::quant::float::{bf16_to_f32, f16_to_f32, Bf16Bytes, F16Bytes};

/// Weight rows and tokens of a full tile.
const MR: usize = 6;
const NR: usize = 4;
/// The full tile, for tests that count tiles.
#[cfg(test)]
pub(crate) const TILE: (usize, usize) = (MR, NR);

/// Eight f16 (`BF` false) or bf16 values at `p` as f32, exactly.
#[inline(always)]
unsafe fn load8<const BF: bool>(p: *const u8) -> __m256 {
    // SAFETY: the caller's features (F16C, AVX2) and 16 readable bytes at p.
    unsafe {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        } else {
            _mm256_cvtph_ps(h)
        }
    }
}

/// One f16 or bf16 value at `p` as f32.
#[inline(always)]
unsafe fn load1<const BF: bool>(p: *const u8) -> f32 {
    // SAFETY: two readable bytes at p, as the caller guarantees.
    let bits = u16::from_le_bytes(unsafe { *(p as *const [u8; 2]) });
    if BF {
        bf16_to_f32(bits)
    } else {
        f16_to_f32(bits)
    }
}

/// The AVX2 module's horizontal sum, operation for operation.
#[inline(always)]
unsafe fn hsum8(v: __m256) -> f32 {
    // SAFETY: the caller's features (AVX).
    unsafe {
        let r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}

/// R weight rows x C token rows of `n` elements (2 bytes each, rows `n`
/// elements apart); output (row i, token j) at `out + j * ld + i`.
///
/// # Safety
/// The CPU has AVX-512F/VL, AVX2, FMA and F16C; `w` holds R rows and `a` C
/// rows of `n` elements; the outputs are writable.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn tile<const BF: bool, const R: usize, const C: usize>(
    w: *const u8,
    a: *const u8,
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    // SAFETY (whole body): offsets stay inside the rows the caller vouches for.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let n8 = n / 8 * 8;
        for e in (0..n8).step_by(8) {
            let mut y = [_mm256_setzero_ps(); C];
            for (j, yj) in y.iter_mut().enumerate() {
                *yj = load8::<BF>(a.add((j * n + e) * 2));
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let x = load8::<BF>(w.add((i * n + e) * 2));
                for (acc_ij, yj) in acc_i.iter_mut().zip(&y) {
                    *acc_ij = _mm256_fmadd_ps(x, *yj, *acc_ij);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, acc_ij) in acc_i.iter().enumerate() {
                let mut s = hsum8(*acc_ij);
                for e in n8..n {
                    s += load1::<BF>(w.add((i * n + e) * 2)) * load1::<BF>(a.add((j * n + e) * 2));
                }
                *out.add(j * ld + i) = s;
            }
        }
    }
}

/// Safe only through the AVX-512 kernel tables (features detected first).
fn gemm<const BF: bool>(
    w: *const u8,
    wl: usize,
    a: *const u8,
    al: usize,
    k: usize,
    out: &mut [f32],
) -> Tiles {
    let (rows, n) = gemm_shape(wl, al, k, out.len());
    let op = out.as_mut_ptr();
    for_tiles(rows, n, k * 2, (MR, NR), |r0, t0, mr, nr| {
        // SAFETY: the tables that hand this out checked the features;
        // for_tiles keeps r0 + mr <= rows and t0 + nr <= n, which
        // gemm_shape matched to the lengths.
        unsafe {
            let (w, a) = (w.add(r0 * k * 2), a.add(t0 * k * 2));
            let o = op.add(t0 * rows + r0);
            match (mr, nr) {
                (MR, NR) => tile::<BF, MR, NR>(w, a, k, o, rows),
                (MR, _) => tile::<BF, MR, 1>(w, a, k, o, rows),
                (_, NR) => tile::<BF, 1, NR>(w, a, k, o, rows),
                _ => tile::<BF, 1, 1>(w, a, k, o, rows),
            }
        }
    })
}

/// F16 weights x f16 activations.
pub(super) fn gemm_f16(w: &[F16Bytes], a: &[F16Bytes], k: usize, out: &mut [f32]) -> Tiles {
    gemm::<false>(
        w.as_ptr().cast(),
        w.len(),
        a.as_ptr().cast(),
        a.len(),
        k,
        out,
    )
}

/// BF16 weights x bf16 activations.
pub(super) fn gemm_bf16(w: &[Bf16Bytes], a: &[Bf16Bytes], k: usize, out: &mut [f32]) -> Tiles {
    gemm::<true>(
        w.as_ptr().cast(),
        w.len(),
        a.as_ptr().cast(),
        a.len(),
        k,
        out,
    )
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
