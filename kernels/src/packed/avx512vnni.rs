//! AVX-512 VNNI kernels over the packed layout. A tile is one group of 16
//! rows (one per 32-bit lane) x C tokens (4, or 1-3 at the edge). Per block
//! the weight side is done once per tile: Q4_0's four 64-byte chunks become
//! eight nibble vectors (AND, shift), Q8_0's eight chunks (stored as
//! x + 128) are used as they are; the 16 scales are one `vcvtph2ps`. Per
//! token it is eight
//! `vpdpbusd` with the activation group broadcast (two chains, so the
//! latency overlaps), one multiply, one convert, one FMA.

use std::arch::x86_64::*;

use super::x86::{gemm, group, nibbles, prefetch, store, Path512, Q4_0, Q4_1, Q8_0};
use super::{block_at, ActBlock, PackedKernels};
use crate::simd::SimdPath;

/// Decode prefetch distance ([`super::x86::prefetch`]).
const PF_BYTES: usize = 2048;

/// Tokens per full tile.
const C_FULL: usize = 4;

/// Safe to hand out: [`super::packed_kernels_for`] returns it only after
/// checking the CPU has AVX-512 VNNI (and F, BW, AVX2, FMA, F16C).
pub(super) static KERNELS: PackedKernels = PackedKernels {
    path: SimdPath::Avx512Vnni,
    q4_0: gemm::<Q4_0<Avx512Vnni>>,
    q4_1: gemm::<Q4_1<Avx512Vnni>>,
    q8_0: gemm::<Q8_0<Avx512Vnni>>,
    q5_0: super::kq::x86::avx512vnni::<super::kq::Q5_0>(),
    q5_1: super::kq::x86::avx512vnni::<super::kq::Q5_1>(),
    q2_k: super::kq::x86::avx512vnni::<super::kq::Q2K>(),
    q3_k: super::kq::x86::avx512vnni::<super::kq::Q3K>(),
    q4_k: super::kq::x86::avx512vnni::<super::kq::Q4K>(),
    q5_k: super::kq::x86::avx512vnni::<super::kq::Q5K>(),
    q6_k: super::kq::x86::avx512vnni::<super::kq::Q6K>(),
    // y is the signed side of vpdpbusd, -128 included.
    q8_0_takes_minus_128: true,
};

/// The AVX-512 VNNI path.
pub(super) struct Avx512Vnni;

impl Path512 for Avx512Vnni {
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
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile_4bit<const C: usize, const MIN: bool>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    ) {
        let sb = if MIN { 64 } else { 32 };
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
                    let mut s0 = _mm512_set1_epi32(a.c);
                    let mut s1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        let ylo = group(a, j);
                        let yhi = group(a, 4 + j);
                        s0 = _mm512_dpbusd_epi32(s0, wv[2 * j], ylo);
                        s1 = _mm512_dpbusd_epi32(s1, wv[2 * j + 1], yhi);
                    }
                    let s = _mm512_add_epi32(s0, s1);
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

    /// As [`Path512::tile_4bit`] for Q8_0 weights.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile_q8_0<const C: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        mask: __mmask16,
    ) {
        let mut acc = [_mm512_setzero_ps(); C];
        for b in 0..k {
            // SAFETY (whole body): every offset is inside the ranges the caller guarantees.
            unsafe {
                let (qo, so) = block_at(512, 32, b);
                let (qb, db) = (g.add(qo), g.add(so));
                prefetch::<C, PF_BYTES>(g, 512, 32, b);
                // The weights are stored as x + 128 (unsigned); a.c = -128 sum(y).
                let mut wv = [_mm512_setzero_si512(); 8];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(qb.add(64 * j) as *const _);
                }
                let dx = _mm512_cvtph_ps(_mm256_loadu_si256(db as *const __m256i));
                for (t, acc_t) in acc.iter_mut().enumerate() {
                    let a = &*act.add(t * k + b);
                    let mut s0 = _mm512_set1_epi32(a.c);
                    let mut s1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        s0 = _mm512_dpbusd_epi32(s0, wv[2 * j], group(a, 2 * j));
                        s1 = _mm512_dpbusd_epi32(s1, wv[2 * j + 1], group(a, 2 * j + 1));
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
