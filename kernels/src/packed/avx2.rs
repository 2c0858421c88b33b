//! AVX2 (+ FMA, F16C) kernels over the packed layout, for the `avx2` path
//! (`avxvnni.rs` has the same tiles with `vpdpbusd`; the `avx512` path has
//! 512-bit ones in `avx512.rs`). The layout is the VNNI kernels': a 64-byte chunk holds 4
//! bytes of each of a group's 16 rows. Here it is two 32-byte halves, rows
//! 0-7 and rows 8-15, each 4-byte lane one row, and the byte dot of a lane
//! is `vpmaddwd(vpmaddubsw(unsigned, signed), 1)`, the AVX2 emulation of
//! `vpdpbusd`. `vpmaddubsw` adds two products into an i16 with saturation,
//! so every use below keeps those pair sums (and any i16 sums of them)
//! within i16, where it is exact:
//! - Q4_0/Q4_1: nibbles (0..15, unsigned) times the Q8 activations (signed):
//!   a pair is at most 2 * 15 * 128 = 3840, so the block's eight products per
//!   lane half add up in i16 (at most 8 * 3840 = 30720) and one `vpmaddwd`
//!   per block and token finishes the row's sum. Q4_0's `-8 sum(y)` is `a.c`,
//!   added in i32.
//! - Q8_0: the weights are stored as `x + 128`, which against a signed
//!   activation would saturate (2 * 255 * 128). The kernel recovers x
//!   (`^ 0x80`, once per tile) and uses the sign trick, `|x| * sign(y, x)`,
//!   ignoring `a.c` (the `vpdpbusd` form's correction): |x| <= 128 fits u8 and the
//!   pair is at most 2 * 128 * 127 = 32512, exact, as long as y != -128
//!   (negating -128 wraps). The Q8_0 quantizers give y in [-127, 127] for
//!   every finite block; -128 comes only from a -inf that ggml's maximum
//!   missed (a NaN after it in the block restarts the running maximum) or
//!   from a block whose maximum is so small that 1 / d overflows (its f16
//!   scale is then 0). A matmul whose activations hold a -128 goes to the
//!   scalar twin, which is exact for every byte (no single `vpmaddubsw`
//!   form is: two products of -128 and -128 already overflow i16).
//!
//! The float side is the scalar twin's, in its order: per block
//! `acc = fma(dx * dy, sumi, acc)` (Q4_1: then `acc = fma(m, s, acc)`), with
//! dx the eight scales of the half from one `vcvtph2ps`, so every output
//! is bit for bit the twin's.
//!
//! A tile is one group's 16 rows, both halves in one pass, x C tokens (3,
//! or 1-2 at the edge): each activation
//! broadcast serves both halves, and per block the weight side (loads,
//! nibble split or `|x|`) is done once per tile. Sixteen rows x four tokens
//! would need 16 accumulators of the 16 ymm registers. The matrix's last
//! group, when it has at most 8 real rows, runs its first half only.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::x86::prefetch;
use super::{block_at, gemm_shape, ActBlock, Out, PackedKernels, PackedWeights, GROUP_ROWS};
use crate::dot::Tiles;
use crate::quant::float::{f16_to_f32, f32_to_f16};
use crate::quant::q8_0::quantize_block_q8_0;
use crate::simd::SimdPath;
use crate::GgmlType;

/// Decode prefetch distance ([`super::x86::prefetch`]): none; over the
/// one-stream layout these kernels ran best on the hardware streams alone.
const PF_BYTES: usize = 0;

/// Tokens per full tile. Measured on one thread (Zen 4, 64 tokens, 576x1536
/// and 1536x576), both halves in a tile: three tokens ran 2-5% faster than
/// two for every type, four (which spills) was 0-15% slower than three for
/// Q4_0/Q4_1 and no faster for Q8_0, and one half at a time with four tokens
/// was 2-30% slower than three.
pub(super) const C_FULL: usize = 3;

/// Rows per half group: one per 32-bit lane of a 256-bit register.
pub(super) const HALF: usize = GROUP_ROWS / 2;

/// Safe to hand out: [`super::packed_kernels_for`] returns it only after
/// checking the CPU has AVX2, FMA and F16C (see `SimdPath::is_available`).
pub(super) static KERNELS: PackedKernels = PackedKernels {
    path: SimdPath::Avx2,
    q4_0: gemm::<Q4_0<Avx2>>,
    q4_1: gemm::<Q4_1<Avx2>>,
    q8_0: gemm::<Q8_0<Avx2>>,
    q5_0: super::kq::x86::avx2::<super::kq::Q5_0>(),
    q5_1: super::kq::x86::avx2::<super::kq::Q5_1>(),
    q2_k: super::kq::x86::avx2::<super::kq::Q2K>(),
    q3_k: super::kq::x86::avx2::<super::kq::Q3K>(),
    q4_k: super::kq::x86::avx2::<super::kq::Q4K>(),
    q5_k: super::kq::x86::avx2::<super::kq::Q5K>(),
    q6_k: super::kq::x86::avx2::<super::kq::Q6K>(),
    q8_0_takes_minus_128: false,
};

/// Writes the C accumulators of half h to `out + t * ld + 8h`: all 8 lanes
/// when the half is whole, else the first `real - 8h` (none when that is 0).
///
/// Safety: the features below; the lanes below `real` of `out + t * ld`
/// (t < C) are writable.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn store<const C: usize, const H: usize>(
    acc: &[[__m256; C]; H],
    out: *mut f32,
    ld: usize,
    real: usize,
) {
    for (h, acc_h) in acc.iter().enumerate() {
        let n = real.saturating_sub(h * HALF).min(HALF);
        let mask = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        for (t, a) in acc_h.iter().enumerate() {
            let p = out.wrapping_add(t * ld + h * HALF);
            if n == HALF {
                // SAFETY: lanes h*8..h*8+8 are below `real`, writable as the caller guarantees.
                unsafe { _mm256_storeu_ps(p, *a) };
            } else if n > 0 {
                // SAFETY: only the first n lanes (below `real`) are written; masked-off
                // lanes are not accessed and cannot fault.
                unsafe { _mm256_maskstore_ps(p, mask, *a) };
            }
        }
    }
}

/// The 4-byte activation group `j` of `a`, broadcast to every lane.
///
/// Safety: the features below; `j < 8`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn group(a: &ActBlock, j: usize) -> __m256i {
    debug_assert!(j < 8);
    // SAFETY: qs holds 32 bytes, group j is bytes 4j..4j+4 (j < 8).
    let g = unsafe { (a.qs.as_ptr().add(4 * j) as *const i32).read_unaligned() };
    _mm256_set1_epi32(g)
}

/// A 256-bit path's packed tiles: C tokens x H halves of one group (H = 2:
/// rows 0-15; H = 1: rows 0-7), compiled with the path's features. `g` is
/// the group ([`super::block_at`]), `act` the tile's first token's blocks
/// (token t at `act + t * k`), `out` the tile's first output (token t at
/// `out + t * ld`), `real` the group's real rows.
pub(super) trait Path256 {
    /// A 4-bit (Q4_0, or `MIN`: Q4_1) tile.
    ///
    /// # Safety
    /// The path's features; `g` holds a group of `k` blocks, `act` `C * k`
    /// blocks; lanes below `real` of `out + t * ld` (t < C) are writable.
    unsafe fn tile_4bit<const C: usize, const H: usize, const MIN: bool>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    );
    /// A Q8_0 tile. # Safety: as [`Path256::tile_4bit`].
    unsafe fn tile_q8_0<const C: usize, const H: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    );
}

/// The AVX2 path.
pub(super) struct Avx2;

impl Path256 for Avx2 {
    /// `MIN` (Q4_1): a block's scales are 16 scales then 16 minimums, and
    /// `acc += m * s` follows the scaled integer sum; Q4_0's `-8 sum(y)`
    /// rides in `a.c` (0 for Q4_1).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_4bit<const C: usize, const H: usize, const MIN: bool>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    ) {
        let sb = if MIN { 64 } else { 32 };
        // A loop LLVM does not unroll: unrolled, it loaded every chunk of the block
        // first and spilled the broadcasts to the stack (Q4_0 then ran at half
        // speed in some builds and not others); rolled, the chunk's vectors and
        // the 2C sums stay in registers. black_box returns its argument (4) and
        // only hides it from the optimizer.
        let chunks = std::hint::black_box(4);
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); C]; H];
        for b in 0..k {
            // SAFETY (whole body): every offset is inside the ranges the caller guarantees.
            unsafe {
                let (qo, so) = block_at(256, sb, b);
                let (qb, db) = (g.add(qo), g.add(so));
                prefetch::<C, PF_BYTES>(g, 256, sb, b);
                // i16 sums per lane half: 16 products of at most 15 * 128 each, |sum| <= 30720.
                let mut s16 = [[_mm256_setzero_si256(); C]; H];
                for j in 0..chunks {
                    for (h, s16_h) in s16.iter_mut().enumerate() {
                        let l = _mm256_loadu_si256(qb.add(64 * j + 32 * h) as *const __m256i);
                        let lo = _mm256_and_si256(l, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(l), m4);
                        for (t, s) in s16_h.iter_mut().enumerate() {
                            let a = &*act.add(t * k + b);
                            let plo = _mm256_maddubs_epi16(lo, group(a, j));
                            let phi = _mm256_maddubs_epi16(hi, group(a, 4 + j));
                            *s = _mm256_add_epi16(*s, _mm256_add_epi16(plo, phi));
                        }
                    }
                }
                for (h, (acc_h, s16_h)) in acc.iter_mut().zip(&s16).enumerate() {
                    let dx = _mm256_cvtph_ps(_mm_loadu_si128(db.add(16 * h) as *const __m128i));
                    let mx = if MIN {
                        _mm256_cvtph_ps(_mm_loadu_si128(db.add(32 + 16 * h) as *const __m128i))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for (t, (acc_t, s)) in acc_h.iter_mut().zip(s16_h).enumerate() {
                        let a = &*act.add(t * k + b);
                        let s =
                            _mm256_add_epi32(_mm256_madd_epi16(*s, ones), _mm256_set1_epi32(a.c));
                        let dd = _mm256_mul_ps(dx, _mm256_set1_ps(a.d));
                        *acc_t = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s), *acc_t);
                        if MIN {
                            *acc_t = _mm256_fmadd_ps(mx, _mm256_set1_ps(a.s), *acc_t);
                        }
                    }
                }
            }
        }
        // SAFETY: as the caller guarantees.
        unsafe { store(&acc, out, ld, real) };
    }

    /// Q8_0 weights, whose activations must not hold -128 (an `a.qs` byte
    /// 0x80; see the module docs).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_q8_0<const C: usize, const H: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        // Not unrolled, as in tile_4bit.
        let chunks = std::hint::black_box(8);
        let mut acc = [[_mm256_setzero_ps(); C]; H];
        for b in 0..k {
            // SAFETY (whole body): every offset is inside the ranges the caller guarantees.
            unsafe {
                let (qo, so) = block_at(512, 32, b);
                let (qb, db) = (g.add(qo), g.add(so));
                prefetch::<C, PF_BYTES>(g, 512, 32, b);
                let mut s = [[_mm256_setzero_si256(); C]; H];
                for j in 0..chunks {
                    for (h, s_h) in s.iter_mut().enumerate() {
                        let q = _mm256_loadu_si256(qb.add(64 * j + 32 * h) as *const __m256i);
                        let x = _mm256_xor_si256(q, flip);
                        let ax = _mm256_abs_epi8(x);
                        for (t, s) in s_h.iter_mut().enumerate() {
                            // y in [-127, 127]: sign(y, x) is exact, |pair| <= 2 * 128 * 127.
                            let y = group(&*act.add(t * k + b), j);
                            let p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(y, x));
                            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                for (h, (acc_h, s_h)) in acc.iter_mut().zip(&s).enumerate() {
                    let dx = _mm256_cvtph_ps(_mm_loadu_si128(db.add(16 * h) as *const __m128i));
                    for (t, (acc_t, s)) in acc_h.iter_mut().zip(s_h).enumerate() {
                        let a = &*act.add(t * k + b);
                        let dd = _mm256_mul_ps(dx, _mm256_set1_ps(a.d));
                        *acc_t = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(*s), *acc_t);
                    }
                }
            }
        }
        // SAFETY: as the caller guarantees.
        unsafe { store(&acc, out, ld, real) };
    }
}

/// One packed 256-bit tile family (a format on a path): C tokens x H
/// halves of one group, as [`Path256::tile_4bit`] takes them.
pub(super) trait Tile256 {
    /// Quant and scale bytes of a block in the group layout ([`block_at`]).
    const QB: usize;
    const SB: usize;
    /// # Safety
    /// The path's features are present; [`Path256::tile_4bit`]'s pointer conditions.
    unsafe fn tile<const C: usize, const H: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    );
}

/// The [`super::PackedGemmFn`] of a 256-bit tile family (here and in
/// `avxvnni.rs`): groups of the call's rows outer (the group's weights
/// stay in L1 while every token passes), tokens in tiles of [`C_FULL`]
/// inner. A group with more than 8 real rows runs both halves in each
/// tile; one with at most 8 (the matrix's last) only the first.
///
/// # Safety
/// [`super::PackedGemmFn`]'s: the CPU has T's features (the tables are
/// handed out only after detection).
pub(super) unsafe fn gemm<T: Tile256>(
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
        let group = w.group((r0 + g0) / GROUP_ROWS);
        assert!(super::group_len(T::QB, T::SB, k).is_some_and(|n| group.len() >= n));
        let g = group.as_ptr();
        let mut t0 = 0;
        while t0 < n {
            let c = (n - t0).min(C_FULL);
            // SAFETY: the CPU has the features, as the caller guarantees; the
            // group holds k blocks (asserted); tokens t0..t0+c < n have k
            // blocks each in act; lane l < real of token t0+j is
            // out.at(t0+j, g0+l) with g0 + l < nr, which the caller lets us write.
            unsafe {
                let a = act.as_ptr().add(t0 * k);
                let (o, ld) = (out.at(t0, g0), out.ld());
                match (c, real > HALF) {
                    (3, true) => T::tile::<3, 2>(g, k, a, o, ld, real),
                    (2, true) => T::tile::<2, 2>(g, k, a, o, ld, real),
                    (_, true) => T::tile::<1, 2>(g, k, a, o, ld, real),
                    (3, false) => T::tile::<3, 1>(g, k, a, o, ld, real),
                    (2, false) => T::tile::<2, 1>(g, k, a, o, ld, real),
                    (_, false) => T::tile::<1, 1>(g, k, a, o, ld, real),
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

/// The legacy formats' tiles on path P: Q4_0 (neither flag), Q4_1
/// (`MIN`: 16 scales then 16 minimums a block) and Q8_0 (`Q8`).
pub(super) struct Legacy<P, const Q8: bool, const MIN: bool>(PhantomData<P>);
pub(super) type Q4_0<P> = Legacy<P, false, false>;
pub(super) type Q4_1<P> = Legacy<P, false, true>;
pub(super) type Q8_0<P> = Legacy<P, true, false>;

impl<P: Path256, const Q8: bool, const MIN: bool> Tile256 for Legacy<P, Q8, MIN> {
    const QB: usize = if Q8 { 512 } else { 256 };
    const SB: usize = if MIN { 64 } else { 32 };
    #[inline(always)]
    unsafe fn tile<const C: usize, const H: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    ) {
        // SAFETY: as the caller guarantees.
        unsafe {
            if Q8 {
                P::tile_q8_0::<C, H>(g, k, act, out, ld, real)
            } else {
                P::tile_4bit::<C, H, MIN>(g, k, act, out, ld, real)
            }
        }
    }
}

/// Quantizes one token's row to Q8_0 straight into activation blocks for
/// `ty` (Q4_0 or Q8_0) weights: the quants and scales of
/// [`crate::quant::quantize_row_q8_0`] (through the AVX2 block quantizer the
/// x86 paths use for it), rewritten as [`super::act_block`] does, without a
/// `BlockQ8_0` pass in between. That pass and the rewrite were 15% of a
/// SmolLM2 prompt. Returns whether a quant is -128 (only ever for Q8_0
/// weights, which need to know; see [`PackedKernels`]).
///
/// Safety: the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_acts(ty: GgmlType, x: &[f32], act: &mut [ActBlock]) -> bool {
    assert_eq!(x.len(), act.len() * 32, "activation row length");
    let q8 = ty == GgmlType::Q8_0;
    let offset = super::act_offset(ty);
    let flip = _mm256_set1_epi8(-128);
    let mut minus_128 = false;
    for (a, xs) in act.iter_mut().zip(x.chunks_exact(32)) {
        // SAFETY: the caller guarantees the features; xs has 32 floats, a.qs 32 bytes.
        match unsafe { crate::dot::q8_block_avx2(xs.as_ptr(), a.qs.as_mut_ptr() as *mut i8) } {
            Some((d, sum)) => {
                // The scale as the f16 of the block, widened exactly.
                a.d = f16_to_f32(f32_to_f16(d));
                a.s = 0.0;
                // The weights' offset (Q4_0 x + 8, Q5_0 x + 16, Q8_0 x + 128) times sum(y), as act_block.
                if q8 {
                    let p = a.qs.as_ptr() as *const __m256i;
                    // SAFETY: a.qs holds 32 bytes; unaligned load.
                    let q = unsafe { _mm256_loadu_si256(p) };
                    minus_128 |= _mm256_movemask_epi8(_mm256_cmpeq_epi8(q, flip)) != 0;
                }
                a.c = -offset * sum;
            }
            None => {
                // NaN, infinity or an overflowing scale: the reference block, as the quantizer does.
                let b = quantize_block_q8_0(xs.try_into().expect("32 floats"));
                minus_128 |= q8 && b.qs.contains(&-128);
                *a = super::act_block(ty, &b);
            }
        }
    }
    minus_128
}
