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

/// Bytes ahead of the current block that decode prefetches.
const PF_BYTES: usize = 8192;

/// Decode only (one token: nothing else hides memory latency): prefetch the
/// block's worth of quants `PF_BYTES` ahead, and the scale stream (`db`, this
/// block's scales, `sb` bytes a block) once a line, on top of the hardware
/// streams. Prompt tiles reuse each block for several tokens and need no help.
/// Into L2 (T1), where more misses can be in flight than L1 allows: measured
/// here (2 threads, Zen 4), T1 at 8 KiB streamed 2048x8192 Q4_0 at 23-30 GB/s
/// and the 128256x2048 Q8_0 head at 25-32 GB/s, T0 at 4 KiB at 18-26 and
/// 19-26 GB/s.
#[inline(always)]
pub(super) fn prefetch<const C: usize>(qb: *const u8, bytes: usize, db: *const u8, sb: usize) {
    if C == 1 {
        for l in (0..bytes).step_by(64) {
            // wrapping_add: the address may lie past the matrix; a prefetch never faults.
            let p = qb.wrapping_add(PF_BYTES + l) as *const i8;
            // SAFETY: prefetch is a hint with no architectural effect on any address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p) };
        }
        if (db as usize) % 64 < sb {
            let p = db.wrapping_add(PF_BYTES / 4) as *const i8;
            // SAFETY: as above.
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
                let (quants, scales) = w.group((r0 + g0) / GROUP_ROWS);
                assert!(quants.len() >= k * $qb && scales.len() >= k * $sb);
                let mut t0 = 0;
                while t0 < n {
                    let c = (n - t0).min(C_FULL);
                    let (q, d) = (quants.as_ptr(), scales.as_ptr());
                    // SAFETY: KERNELS is handed out only where the CPU has the features;
                    // quants/scales hold k blocks (asserted); tokens t0..t0+c < n have k
                    // blocks each in act; lane l < real of token t0+j is out.at(t0+j, g0+l)
                    // with g0 + l < nr, which the caller lets us write.
                    unsafe {
                        let a = act.as_ptr().add(t0 * k);
                        let (o, ld) = (out.at(t0, g0), out.ld());
                        match c {
                            4 => $tile::<4 $(, $extra)*>(q, d, k, a, o, ld, mask),
                            3 => $tile::<3 $(, $extra)*>(q, d, k, a, o, ld, mask),
                            2 => $tile::<2 $(, $extra)*>(q, d, k, a, o, ld, mask),
                            _ => $tile::<1 $(, $extra)*>(q, d, k, a, o, ld, mask),
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
