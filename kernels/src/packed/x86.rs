//! What the x86 packed kernels share: the decode prefetch (every path) and
//! the 512-bit nibble split, activation broadcast, masked store and
//! row/token loop ([`gemm`], the two AVX-512 paths).

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::{gemm_shape, ActBlock, Out, PackedWeights, GROUP_ROWS};
use crate::dot::Tiles;

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

/// A 512-bit path's packed tiles: C tokens (at most `C_FULL`) of one
/// 16-row group, compiled with the path's features. `g` is the group
/// ([`super::block_at`]), `act` the tile's first token's blocks (token t at
/// `act + t * k`), `out` the tile's first output (token t at `out + t * ld`),
/// `mask` the group's real rows.
pub(super) trait Path512 {
    /// Tokens per full tile.
    const C_FULL: usize;
    /// A 4-bit (Q4_0, or `MIN`: Q4_1) tile.
    ///
    /// # Safety
    /// The path's features; `g` holds a group of `k` blocks, `act` `C * k`
    /// blocks; the masked lanes of `out + t * ld` (t < C) are writable.
    unsafe fn tile_4bit<const C: usize, const MIN: bool>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    );
    /// A Q8_0 tile. # Safety: as [`Path512::tile_4bit`].
    unsafe fn tile_q8_0<const C: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    );
}

/// One packed 512-bit tile family (a format on a path) as [`gemm`] walks it.
pub(super) trait Tile512 {
    /// Quant and scale bytes of a block in the group layout ([`super::block_at`]).
    const QB: usize;
    const SB: usize;
    /// Tokens per full tile.
    const C_FULL: usize;
    /// # Safety
    /// As [`Path512::tile_4bit`].
    unsafe fn tile<const C: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    );
}

/// The legacy formats' tiles on path P: Q4_0 (neither flag), Q4_1
/// (`MIN`: 16 scales then 16 minimums a block) and Q8_0 (`Q8`).
pub(super) struct Legacy<P, const Q8: bool, const MIN: bool>(PhantomData<P>);
pub(super) type Q4_0<P> = Legacy<P, false, false>;
pub(super) type Q4_1<P> = Legacy<P, false, true>;
pub(super) type Q8_0<P> = Legacy<P, true, false>;

impl<P: Path512, const Q8: bool, const MIN: bool> Tile512 for Legacy<P, Q8, MIN> {
    const QB: usize = if Q8 { 512 } else { 256 };
    const SB: usize = if MIN { 64 } else { 32 };
    const C_FULL: usize = P::C_FULL;
    #[inline(always)]
    unsafe fn tile<const C: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    ) {
        // SAFETY: as the caller guarantees.
        unsafe {
            if Q8 {
                P::tile_q8_0::<C>(g, k, act, out, ld, mask)
            } else {
                P::tile_4bit::<C, MIN>(g, k, act, out, ld, mask)
            }
        }
    }
}

/// The [`super::PackedGemmFn`] of a 512-bit tile family: groups of the
/// call's rows outer (the group's weights stay in L1 while every token
/// passes), tokens in tiles of `T::C_FULL` (at most 4) inner.
///
/// # Safety
/// [`super::PackedGemmFn`]'s: the CPU has T's features (the tables are
/// handed out only after detection).
pub(super) unsafe fn gemm<T: Tile512>(
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
        assert!(super::group_len(T::QB, T::SB, k).is_some_and(|n| group.len() >= n));
        let g = group.as_ptr();
        let mut t0 = 0;
        while t0 < n {
            let c = (n - t0).min(T::C_FULL);
            // SAFETY: the CPU has the features, as the caller guarantees; the
            // group holds k blocks (asserted); tokens t0..t0+c < n have k
            // blocks each in act; lane l < real of token t0+j is
            // out.at(t0+j, g0+l) with g0 + l < nr, which the caller lets us write.
            unsafe {
                let a = act.as_ptr().add(t0 * k);
                let (o, ld) = (out.at(t0, g0), out.ld());
                match c {
                    4 => T::tile::<4>(g, k, a, o, ld, mask),
                    3 => T::tile::<3>(g, k, a, o, ld, mask),
                    2 => T::tile::<2>(g, k, a, o, ld, mask),
                    _ => T::tile::<1>(g, k, a, o, ld, mask),
                }
            }
            if c == T::C_FULL && real == GROUP_ROWS {
                tiles.full += 1;
            } else {
                tiles.edge += 1;
            }
            t0 += c;
        }
    }
    tiles
}
