//! What the x86 packed kernels share: the decode prefetch (every path) and
//! the 512-bit nibble split, activation broadcast, masked store and
//! row/token loop (the two AVX-512 paths).

use std::arch::x86_64::*;

use super::ActBlock;

/// Writes the C accumulators to `out + t * ld`, lanes in `mask`.
///
/// Safety: the features below; the lanes in `mask` of `out + t * ld`
/// (t < C) are writable.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store<const C: usize>(
    acc: &[__m512; C],
    out: *mut f32,
    ld: usize,
    mask: __mmask16,
) {
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees lanes in `mask` of each row are inside `out`;
        // masked-off lanes are not accessed.
        unsafe { _mm512_mask_storeu_ps(out.add(t * ld), mask, *a) };
    }
}

/// Decode only (one token: nothing else hides memory latency): at the first
/// block of each unit ([`super::block_at`]; `qb`/`sb` quant and scale bytes
/// a block), prefetch the unit `PF` bytes further on into L2 (T1), on top of
/// the hardware streams; `PF = 0` leaves it to them. Prompt tiles reuse each
/// block for several tokens and need no help.
///
/// Each path has its own distance, chosen by timing alternate tokens of one
/// run with each (2026-11-30, Zen 4, 2 threads, Llama-3.2-1B Q4_0/Q8_0; see
/// BENCHMARKS.md): the VNNI kernels ran best 1-2 KiB ahead, the AVX-512
/// ones 8 KiB ahead, the AVX2 ones with no prefetch at all (2 KiB cost
/// them 20-25%). NTA looked better than T1 in such alternation, but whole
/// runs with it were 16% slower.
#[inline(always)]
pub(super) fn prefetch<const C: usize, const PF: usize>(
    group: *const u8,
    qb: usize,
    sb: usize,
    b: usize,
) {
    if C == 1 && PF > 0 && b.is_multiple_of(64 / sb) {
        let unit = group.wrapping_add(super::block_at(qb, sb, b).0 + PF);
        for l in (0..(64 / sb) * qb + 64).step_by(64) {
            // wrapping_add: the address may lie past the matrix; a prefetch never faults.
            let p = unit.wrapping_add(l) as *const i8;
            // SAFETY: prefetch is a hint with no architectural effect on any address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p) };
        }
    }
}

/// A 4-bit block's four 64-byte chunks as eight vectors of nibbles: chunk
/// j's low nibbles (elements `4j..`) at 2j, its high nibbles (`16+4j..`) at
/// 2j + 1.
///
/// Safety: the features below; `qb` points at 256 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn nibbles(qb: *const u8) -> [__m512i; 8] {
    let m4 = _mm512_set1_epi8(0x0F);
    let mut wv = [_mm512_setzero_si512(); 8];
    for j in 0..4 {
        // SAFETY: j * 64 + 64 <= 256 bytes, as the caller guarantees.
        let l = unsafe { _mm512_loadu_si512(qb.add(64 * j) as *const _) };
        wv[2 * j] = _mm512_and_si512(l, m4);
        wv[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(l), m4);
    }
    wv
}

/// The 4-byte activation group `j` of `a`, broadcast to every lane.
///
/// Safety: the features below; `j < 8`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn group(a: &ActBlock, j: usize) -> __m512i {
    debug_assert!(j < 8);
    // SAFETY: qs holds 32 bytes, group j is bytes 4j..4j+4 (j < 8).
    let g = unsafe { (a.qs.as_ptr().add(4 * j) as *const i32).read_unaligned() };
    _mm512_set1_epi32(g)
}

/// A [`super::PackedGemmFn`] from a 512-bit tile kernel `$tile::<C,
/// $extra..>` (C tokens of one 16-row group, at most the caller's `C_FULL`;
/// `$extra`: the tile's other const arguments, e.g. Q4_1's `MIN`):
/// groups of the call's rows outer (the group's weights stay in L1 while
/// every token passes), tokens in tiles of `C_FULL` inner.
macro_rules! packed_gemm_512 {
    ($name:ident, $tile:ident[$($extra:tt),*], $qb:expr, $sb:expr) => {
        /// Safety: [`super::PackedGemmFn`]'s.
        unsafe fn $name(
            w: &PackedWeights,
            r0: usize,
            nr: usize,
            act: &[ActBlock],
            out: Out,
        ) -> Tiles {
            let n = gemm_shape(w, r0, nr, act);
            let k = w.blocks();
            let mut tiles = Tiles::default();
            for g0 in (0..nr).step_by(GROUP_ROWS) {
                let real = (nr - g0).min(GROUP_ROWS);
                let mask = (((1u32 << real) - 1) & 0xFFFF) as __mmask16;
                let group = w.group((r0 + g0) / GROUP_ROWS);
                assert!(super::group_len($qb, $sb, k).is_some_and(|n| group.len() >= n));
                let g = group.as_ptr();
                let mut t0 = 0;
                while t0 < n {
                    let c = (n - t0).min(C_FULL);
                    // SAFETY: KERNELS is handed out only where the CPU has the features;
                    // the group holds k blocks (asserted); tokens t0..t0+c < n have k
                    // blocks each in act; lane l < real of token t0+j is out.at(t0+j, g0+l)
                    // with g0 + l < nr, which the caller lets us write.
                    unsafe {
                        let a = act.as_ptr().add(t0 * k);
                        let (o, ld) = (out.at(t0, g0), out.ld());
                        match c {
                            4 => $tile::<4 $(, $extra)*>(g, k, a, o, ld, mask),
                            3 => $tile::<3 $(, $extra)*>(g, k, a, o, ld, mask),
                            2 => $tile::<2 $(, $extra)*>(g, k, a, o, ld, mask),
                            _ => $tile::<1 $(, $extra)*>(g, k, a, o, ld, mask),
                        }
                    }
                    if c == C_FULL && real == GROUP_ROWS {
                        tiles.full += 1;
                    } else {
                        tiles.edge += 1;
                    }
                    t0 += c;
                }
            }
            tiles
        }
    };
}
pub(super) use packed_gemm_512;
