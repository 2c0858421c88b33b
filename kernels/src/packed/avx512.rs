//! AVX-512 (F + BW, no VNNI) kernels over the packed layout, for the
//! `avx512` path (Skylake-SP and the like): the VNNI kernels' tiles with
//! `vpdpbusd` emulated as `vpmaddwd(vpmaddubsw(u, s), 1)` on 512 bits. A
//! tile is one group of 16 rows (one per 32-bit lane, one 64-byte chunk a
//! register) x C tokens (4, or 1-3 at the edge).
//!
//! Exactness is the AVX2 kernels' (see `avx2.rs`): Q4_0/Q4_1 sum the block's
//! 16 nibble products per lane half in i16 (at most 16 * 15 * 128 = 30720)
//! and finish with one `vpmaddwd`; Q8_0 recovers x from its stored `x + 128`
//! and multiplies |x| (unsigned) by y negated where x < 0 (AVX-512 has no
//! `vpsignb`: a masked subtract from 0 does it), at most 2 * 128 * 127 per
//! pair, exact unless y = -128, and a matmul whose activations hold a -128
//! goes to the scalar twin. The float side is the twin's, bit for bit.

use std::arch::x86_64::*;

use super::x86::{gemm, group, nibbles, prefetch, store, Path512, Q4_0, Q4_1, Q8_0};
use super::{block_at, ActBlock, PackedKernels};
use crate::simd::SimdPath;

/// Decode prefetch distance ([`super::x86::prefetch`]).
const PF_BYTES: usize = 8192;

/// Tokens per full tile: 32 zmm registers hold the 8 weight vectors, the C
/// accumulators and sums of four tokens.
const C_FULL: usize = 4;

/// Safe to hand out: [`super::packed_kernels_for`] returns it only after
/// checking the CPU has the AVX-512 path (F, BW, and AVX2, FMA, F16C).
pub(super) static KERNELS: PackedKernels = PackedKernels {
    path: SimdPath::Avx512,
    q4_0: gemm::<Q4_0<Avx512>>,
    q4_1: gemm::<Q4_1<Avx512>>,
    q8_0: gemm::<Q8_0<Avx512>>,
    q5_0: super::kq::x86::avx512::<super::kq::Q5_0>(),
    q5_1: super::kq::x86::avx512::<super::kq::Q5_1>(),
    q2_k: super::kq::x86::avx512::<super::kq::Q2K>(),
    q3_k: super::kq::x86::avx512::<super::kq::Q3K>(),
    q4_k: super::kq::x86::avx512::<super::kq::Q4K>(),
    q5_k: super::kq::x86::avx512::<super::kq::Q5K>(),
    q6_k: super::kq::x86::avx512::<super::kq::Q6K>(),
    q8_0_takes_minus_128: false,
};

/// The AVX-512 (F + BW) path.
pub(super) struct Avx512;

impl Path512 for Avx512 {
    const C_FULL: usize = C_FULL;

    /// One 4-bit tile: `g` is the group ([`super::block_at`]), `act` the
    /// tile's first token's blocks (token t at `act + t * k`), `out` the tile's
    /// first output (token t at `out + t * ld`), `mask` the group's real rows.
    /// `MIN` (Q4_1): a block's scales are 16 scales then 16 minimums, and
    /// `acc += m * s` follows the scaled integer sum; Q4_0's `-8 sum(y)` rides in
    /// `a.c` (0 for Q4_1).
    ///
    /// Safety: the features below; `g` holds a group of `k` blocks, `act`
    /// `C * k` blocks; the masked lanes of
    /// `out + t * ld` (t < C) are writable.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn tile_4bit<const C: usize, const MIN: bool>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    ) {
        let sb = if MIN { 64 } else { 32 };
        let ones = _mm512_set1_epi16(1);
        let mut acc = [_mm512_setzero_ps(); C];
        for b in 0..k {
            // SAFETY (whole body): every offset is inside the ranges the caller guarantees.
            unsafe {
                let (qo, so) = block_at(256, sb, b);
                let (qb, db) = (g.add(qo), g.add(so));
                prefetch::<C, PF_BYTES>(g, 256, sb, b);
                let wv = nibbles(qb);
                let dx = _mm512_cvtph_ps(_mm256_loadu_si256(db as *const __m256i));
                let mx = if MIN {
                    _mm512_cvtph_ps(_mm256_loadu_si256(db.add(32) as *const __m256i))
                } else {
                    _mm512_setzero_ps()
                };
                for (t, acc_t) in acc.iter_mut().enumerate() {
                    let a = &*act.add(t * k + b);
                    // i16 sums per lane half (two chains): 16 products of at most 15 * 128.
                    let mut s0 = _mm512_setzero_si512();
                    let mut s1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        s0 = _mm512_add_epi16(s0, _mm512_maddubs_epi16(wv[2 * j], group(a, j)));
                        s1 = _mm512_add_epi16(
                            s1,
                            _mm512_maddubs_epi16(wv[2 * j + 1], group(a, 4 + j)),
                        );
                    }
                    let s = _mm512_madd_epi16(_mm512_add_epi16(s0, s1), ones);
                    let s = _mm512_add_epi32(s, _mm512_set1_epi32(a.c));
                    let dd = _mm512_mul_ps(dx, _mm512_set1_ps(a.d));
                    *acc_t = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), *acc_t);
                    if MIN {
                        *acc_t = _mm512_fmadd_ps(mx, _mm512_set1_ps(a.s), *acc_t);
                    }
                }
            }
        }
        // SAFETY: as the caller guarantees.
        unsafe { store(&acc, out, ld, mask) };
    }

    /// As [`Path512::tile_4bit`] for Q8_0 weights, whose
    /// activations must not hold -128 (an `a.qs` byte 0x80; see the module docs).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn tile_q8_0<const C: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    ) {
        let ones = _mm512_set1_epi16(1);
        let flip = _mm512_set1_epi8(-128);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); C];
        for b in 0..k {
            // SAFETY (whole body): every offset is inside the ranges the caller guarantees.
            unsafe {
                let (qo, so) = block_at(512, 32, b);
                let (qb, db) = (g.add(qo), g.add(so));
                prefetch::<C, PF_BYTES>(g, 512, 32, b);
                let mut ax = [zero; 8];
                let mut neg = [0 as __mmask64; 8];
                for j in 0..8 {
                    // Stored as x + 128: the sign trick wants x itself.
                    let x = _mm512_xor_si512(_mm512_loadu_si512(qb.add(64 * j) as *const _), flip);
                    ax[j] = _mm512_abs_epi8(x);
                    neg[j] = _mm512_movepi8_mask(x);
                }
                let dx = _mm512_cvtph_ps(_mm256_loadu_si256(db as *const __m256i));
                for (t, acc_t) in acc.iter_mut().enumerate() {
                    let a = &*act.add(t * k + b);
                    // Sum(x y) directly: a.c, the vpdpbusd form's correction, is not used.
                    let mut s0 = zero;
                    let mut s1 = zero;
                    for j in 0..4 {
                        // y in [-127, 127], negated where x < 0: |pair| <= 2 * 128 * 127.
                        let (y0, y1) = (group(a, 2 * j), group(a, 2 * j + 1));
                        let y0 = _mm512_mask_sub_epi8(y0, neg[2 * j], zero, y0);
                        let y1 = _mm512_mask_sub_epi8(y1, neg[2 * j + 1], zero, y1);
                        let p0 = _mm512_maddubs_epi16(ax[2 * j], y0);
                        let p1 = _mm512_maddubs_epi16(ax[2 * j + 1], y1);
                        s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(p0, ones));
                        s1 = _mm512_add_epi32(s1, _mm512_madd_epi16(p1, ones));
                    }
                    let s = _mm512_add_epi32(s0, s1);
                    let dd = _mm512_mul_ps(dx, _mm512_set1_ps(a.d));
                    *acc_t = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), *acc_t);
                }
            }
        }
        // SAFETY: as the caller guarantees.
        unsafe { store(&acc, out, ld, mask) };
    }
}
