//! 256-bit x86 kernels. The quantized tiles are written once, as
//! `#[inline(always)]` bodies generic over [`Isa256`] (how a path forms its
//! byte dot products: `vpmaddubsw` + `vpmaddwd` here, `vpdpbusd` on AVX-VNNI
//! in `avxvnni.rs`), with short `#[target_feature]` entry points per path:
//! the pattern of `attention/lanes.rs`. The float tiles and the block
//! quantizer need nothing beyond AVX2, FMA and F16C, so every 256-bit path
//! uses this module's; `float_wide.rs` runs the same float tile body on a
//! larger tile for the AVX-512 paths. `KERNELS` is only handed out by
//! `super::kernels_for` after the features were detected, and the safe
//! GEMMs check every length before the unchecked pointer code runs.
//!
//! Integer lanes: lane l of a block holds the exact sum of the products of
//! elements 4l..4l+3 (`vpmaddwd(vpmaddubsw(..), 1)` and `vpdpbusd` both give
//! that), and the f32 side is `fma(set1(dx*dy), cvt(lanes), acc)` per block
//! then [`hsum8`]-style reduction, so every path gives the same bits.
//!
//! Unsigned x signed products: Q4_0 as `q*y - 8*sum(y)` (nibbles q in 0..15
//! are the unsigned side, the correction comes per token and block); Q4_1
//! nibbles directly; Q8_0 with the sign trick (`|x| * sign(y, x)`) on AVX2,
//! and as `(x+128)*y - 128*sum(y)` with VNNI (exact for every byte).

// The tiles index accumulators, activations and outputs by the same (row,
// token) pair; range loops keep that visible, as in the formulas.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use crate::dot::{tiled_gemm, Kernels, TileFn, Tiles};
use crate::quant::float::{bf16_to_f32, f16_to_f32, f32_to_f16, Bf16Bytes, F16Bytes, F32Bytes};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, BlockQ8_K, QK_K};

/// What the 256-bit paths differ in: the byte dot product, and the
/// `#[target_feature]` entry point their tiles are compiled in.
pub(super) trait Isa256 {
    /// `vpdpbusd` is there: Q8_0 weights go as `x + 128` with a
    /// `-128 * sum(y)` correction (exact for every byte), not the sign trick.
    const VNNI: bool;
    /// 8 lanes of sum(x*y) over 4-byte groups, x unsigned, y signed,
    /// |pair sums| < 2^15 (true for every use here).
    ///
    /// # Safety
    /// The path's features are present (inlined into its entry point).
    unsafe fn dot_us(x: __m256i, y: __m256i) -> __m256i;
    /// `T`'s `R x C` tile, compiled with this path's features (its entry
    /// point).
    ///
    /// # Safety
    /// The path's features are present; [`Tile256::tile`]'s pointers.
    unsafe fn tile<T: Tile256, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    );
}

/// A quantized tile body: R weight rows (stride k blocks) x C tokens
/// (stride k), written to `out[j * ld + i]`.
pub(super) trait Tile256 {
    type W;
    type A;
    /// # Safety
    /// `I`'s features are present; `w` holds R rows of k blocks, `a` C
    /// tokens of k blocks, and `out + j * ld + i` (i < R, j < C) is writable.
    unsafe fn tile<I: Isa256, const R: usize, const C: usize>(
        w: *const Self::W,
        a: *const Self::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    );
}

/// AVX2: `vpmaddubsw` + `vpmaddwd` by ones.
pub(super) struct Avx2;

impl Isa256 for Avx2 {
    const VNNI: bool = false;
    #[inline(always)]
    unsafe fn dot_us(x: __m256i, y: __m256i) -> __m256i {
        // SAFETY: AVX2, as the caller guarantees.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1)) }
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<T: Tile256, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's features are Avx2's; the caller's pointers.
        unsafe { T::tile::<Self, R, C>(w, a, k, out, ld) }
    }
}

/// The GEMM of tile `T` on path `I`, in 4 x 2 tiles and their edges.
/// Safe only through a `Kernels` table (features detected first).
pub(super) fn gemm<T: Tile256, I: Isa256>(
    w: &[T::W],
    a: &[T::A],
    k: usize,
    out: &mut [f32],
) -> Tiles {
    let tiles = [
        I::tile::<T, 4, 2> as TileFn<T::W, T::A>,
        I::tile::<T, 4, 1>,
        I::tile::<T, 1, 2>,
        I::tile::<T, 1, 1>,
    ];
    // SAFETY: the tables that hold this GEMM are handed out after I's
    // features were detected.
    unsafe { tiled_gemm(w, a, k, out, (4, 2), tiles) }
}

#[inline(always)]
pub(super) unsafe fn hsum8(v: __m256) -> f32 {
    // SAFETY: AVX, as the caller guarantees.
    unsafe {
        let r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}

/// An f16 scale as f32 (F16C; exact, like `f16_to_f32`).
#[inline(always)]
pub(super) unsafe fn f16s(d: [u8; 2]) -> f32 {
    // SAFETY: F16C, as the caller guarantees.
    unsafe {
        _mm_cvtss_f32(_mm_cvtph_ps(
            _mm_cvtsi32_si128(u16::from_le_bytes(d) as i32),
        ))
    }
}

/// The 32 nibbles of a Q4_0/Q4_1 block in element order, as bytes.
#[inline(always)]
unsafe fn nibbles(qs: *const u8) -> __m256i {
    // SAFETY: AVX2 and 16 readable bytes at qs, as the caller guarantees.
    unsafe {
        let t = _mm_loadu_si128(qs as *const __m128i);
        let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
    }
}

#[inline(always)]
unsafe fn load_q(qs: *const i8) -> __m256i {
    // SAFETY: AVX and 32 readable bytes at qs, as the caller guarantees.
    unsafe { _mm256_loadu_si256(qs as *const __m256i) }
}

pub(super) struct Q4_0;
pub(super) struct Q8_0;
pub(super) struct Q4_1;

impl Tile256 for Q4_0 {
    type W = BlockQ4_0;
    type A = BlockQ8_0;
    #[inline(always)]
    unsafe fn tile<I: Isa256, const R: usize, const C: usize>(
        w: *const BlockQ4_0,
        a: *const BlockQ8_0,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY (whole body): I's features; b < k, i < R and j < C keep
        // every pointer inside what the caller vouches for.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for b in 0..k {
                let mut y = [_mm256_setzero_si256(); C];
                let mut corr = [_mm256_setzero_si256(); C];
                let mut dy = [0f32; C];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = load_q(blk.qs.as_ptr());
                    dy[j] = f16s(blk.d);
                    // 8 * sum(y) per lane: subtracted from sum(q*y).
                    corr[j] = I::dot_us(_mm256_set1_epi8(8), y[j]);
                }
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    let q = nibbles(blk.qs.as_ptr());
                    let dx = f16s(blk.d);
                    for j in 0..C {
                        let s = _mm256_sub_epi32(I::dot_us(q, y[j]), corr[j]);
                        let d = _mm256_set1_ps(dx * dy[j]);
                        acc[i][j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[i][j]);
                    }
                }
            }
            for i in 0..R {
                for j in 0..C {
                    *out.add(j * ld + i) = hsum8(acc[i][j]);
                }
            }
        }
    }
}

impl Tile256 for Q8_0 {
    type W = BlockQ8_0;
    type A = BlockQ8_0;
    #[inline(always)]
    unsafe fn tile<I: Isa256, const R: usize, const C: usize>(
        w: *const BlockQ8_0,
        a: *const BlockQ8_0,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY (whole body): as for Q4_0.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for b in 0..k {
                let mut y = [_mm256_setzero_si256(); C];
                let mut corr = [_mm256_setzero_si256(); C];
                let mut dy = [0f32; C];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = load_q(blk.qs.as_ptr());
                    dy[j] = f16s(blk.d);
                    if I::VNNI {
                        corr[j] = I::dot_us(_mm256_set1_epi8(-128), y[j]);
                    }
                }
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    let x = load_q(blk.qs.as_ptr());
                    let dx = f16s(blk.d);
                    // VNNI: (x + 128) as u8; AVX2: |x| as u8.
                    let xu = if I::VNNI {
                        _mm256_xor_si256(x, _mm256_set1_epi8(-128))
                    } else {
                        _mm256_abs_epi8(x)
                    };
                    for j in 0..C {
                        let s = if I::VNNI {
                            _mm256_sub_epi32(I::dot_us(xu, y[j]), corr[j])
                        } else {
                            I::dot_us(xu, _mm256_sign_epi8(y[j], x))
                        };
                        let d = _mm256_set1_ps(dx * dy[j]);
                        acc[i][j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[i][j]);
                    }
                }
            }
            for i in 0..R {
                for j in 0..C {
                    *out.add(j * ld + i) = hsum8(acc[i][j]);
                }
            }
        }
    }
}

impl Tile256 for Q4_1 {
    type W = BlockQ4_1;
    type A = BlockQ8_1;
    #[inline(always)]
    unsafe fn tile<I: Isa256, const R: usize, const C: usize>(
        w: *const BlockQ4_1,
        a: *const BlockQ8_1,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY (whole body): as for Q4_0.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut summs = [[0f32; C]; R];
            for b in 0..k {
                let mut y = [_mm256_setzero_si256(); C];
                let mut dy = [0f32; C];
                let mut sy = [0f32; C];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = load_q(blk.qs.as_ptr());
                    dy[j] = f16s(blk.d);
                    sy[j] = f16s(blk.s);
                }
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    let q = nibbles(blk.qs.as_ptr());
                    let (dx, mx) = (f16s(blk.d), f16s(blk.m));
                    for j in 0..C {
                        let s = I::dot_us(q, y[j]);
                        let d = _mm256_set1_ps(dx * dy[j]);
                        acc[i][j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[i][j]);
                        summs[i][j] += mx * sy[j];
                    }
                }
            }
            for i in 0..R {
                for j in 0..C {
                    *out.add(j * ld + i) = hsum8(acc[i][j]) + summs[i][j];
                }
            }
        }
    }
}

// ------------------------------------------------------------------ floats

/// Float element kinds of the float tiles.
pub(super) const F16: u8 = 0;
pub(super) const BF16: u8 = 1;
pub(super) const F32: u8 = 2;

const fn esize(kind: u8) -> usize {
    if kind == F32 {
        4
    } else {
        2
    }
}

#[inline(always)]
unsafe fn load8<const K: u8>(p: *const u8) -> __m256 {
    // SAFETY: AVX2 and F16C, and 8 readable elements at p, as the caller guarantees.
    unsafe {
        match K {
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            )),
            _ => _mm256_loadu_ps(p as *const f32),
        }
    }
}

#[inline(always)]
unsafe fn load1<const K: u8>(p: *const u8) -> f32 {
    // SAFETY: one readable element at p, as the caller guarantees.
    unsafe {
        match K {
            F16 => f16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
            BF16 => bf16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
            _ => f32::from_le_bytes(*(p as *const [u8; 4])),
        }
    }
}

/// R weight rows x C token rows of `n` float elements each (element kinds
/// WK and AK, rows `n` elements apart): 8-lane fma accumulators, fixed
/// hsum, then the `n % 8` tail added in order. Output (row i, token j) at
/// `out + j * ld + i`.
///
/// # Safety
/// AVX2, FMA and F16C are present; `w` holds R rows and `a` C rows of `n`
/// elements; the outputs are writable.
#[inline(always)]
pub(super) unsafe fn tile_f<const WK: u8, const AK: u8, const R: usize, const C: usize>(
    w: *const u8,
    a: *const u8,
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    let (ws, as_) = (esize(WK), esize(AK));
    // SAFETY (whole body): offsets stay inside the rows the caller vouches for.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let n8 = n / 8 * 8;
        for e in (0..n8).step_by(8) {
            let mut y = [_mm256_setzero_ps(); C];
            for j in 0..C {
                y[j] = load8::<AK>(a.add((j * n + e) * as_));
            }
            for i in 0..R {
                let x = load8::<WK>(w.add((i * n + e) * ws));
                for j in 0..C {
                    acc[i][j] = _mm256_fmadd_ps(x, y[j], acc[i][j]);
                }
            }
        }
        for i in 0..R {
            for j in 0..C {
                let mut s = hsum8(acc[i][j]);
                for e in n8..n {
                    s += load1::<WK>(w.add((i * n + e) * ws))
                        * load1::<AK>(a.add((j * n + e) * as_));
                }
                *out.add(j * ld + i) = s;
            }
        }
    }
}

/// The AVX2 entry point of [`tile_f`] (its element kinds match W and A).
///
/// # Safety
/// As [`tile_f`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile_f<W, A, const WK: u8, const AK: u8, const R: usize, const C: usize>(
    w: *const W,
    a: *const A,
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    // SAFETY: this function's features; the caller's pointers.
    unsafe { tile_f::<WK, AK, R, C>(w.cast(), a.cast(), n, out, ld) }
}

/// The float GEMM of weights W (elements of kind WK) and activations A
/// (kind AK), in 4 x 2 tiles. Safe only through a `Kernels` table.
pub(super) fn gemm_float<W, A, const WK: u8, const AK: u8>(
    w: &[W],
    a: &[A],
    k: usize,
    out: &mut [f32],
) -> Tiles {
    const { assert!(std::mem::size_of::<W>() == esize(WK)) };
    const { assert!(std::mem::size_of::<A>() == esize(AK)) };
    let tiles = [
        avx2_tile_f::<W, A, WK, AK, 4, 2> as TileFn<W, A>,
        avx2_tile_f::<W, A, WK, AK, 4, 1>,
        avx2_tile_f::<W, A, WK, AK, 1, 2>,
        avx2_tile_f::<W, A, WK, AK, 1, 1>,
    ];
    // SAFETY: the tables that hold this GEMM are handed out after AVX2,
    // FMA and F16C were detected.
    unsafe { tiled_gemm(w, a, k, out, (4, 2), tiles) }
}

pub(super) fn gemm_f16(w: &[F16Bytes], a: &[F16Bytes], k: usize, out: &mut [f32]) -> Tiles {
    gemm_float::<_, _, F16, F16>(w, a, k, out)
}

pub(super) fn gemm_bf16(w: &[Bf16Bytes], a: &[Bf16Bytes], k: usize, out: &mut [f32]) -> Tiles {
    gemm_float::<_, _, BF16, BF16>(w, a, k, out)
}

pub(super) fn gemm_f32_le(w: &[F32Bytes], a: &[f32], k: usize, out: &mut [f32]) -> Tiles {
    gemm_float::<_, _, F32, F32>(w, a, k, out)
}

pub(super) fn gemm_f16_f32(w: &[F16Bytes], a: &[f32], k: usize, out: &mut [f32]) -> Tiles {
    gemm_float::<_, _, F16, F32>(w, a, k, out)
}

pub(super) fn gemm_bf16_f32(w: &[Bf16Bytes], a: &[f32], k: usize, out: &mut [f32]) -> Tiles {
    gemm_float::<_, _, BF16, F32>(w, a, k, out)
}

pub(super) fn gemm_f32(w: &[f32], a: &[f32], k: usize, out: &mut [f32]) -> Tiles {
    gemm_float::<_, _, F32, F32>(w, a, k, out)
}

// ------------------------------------------------------------------ quantizer

/// One Q8 block: `Some((d, quants, sum))` exactly as the reference
/// quantizer computes them, or `None` for blocks with a NaN or an
/// infinite or overflowing scale, which the caller sends to the
/// reference code instead. The packed matmul quantizes its
/// activations with it too (`crate::packed`).
///
/// Safety: AVX2, FMA and F16C; `x` has 32 readable floats, `qs` 32
/// writable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8_block(x: *const f32, qs: *mut i8) -> Option<(f32, i32)> {
    // SAFETY (whole body): the features and pointers the caller vouches for.
    unsafe {
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut m = _mm256_setzero_ps();
        let mut nan = _mm256_setzero_ps();
        for vi in v {
            m = _mm256_max_ps(m, _mm256_and_ps(vi, absm));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(vi, vi));
        }
        if _mm256_movemask_ps(nan) != 0 {
            return None;
        }
        let r = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let r = _mm_max_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_max_ss(r, _mm_movehdup_ps(r));
        let amax = _mm_cvtss_f32(r);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !amax.is_finite() || !id.is_finite() {
            return None;
        }
        let vid = _mm256_set1_ps(id);
        let half = _mm256_set1_ps(0.5);
        let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        let one = _mm256_set1_ps(1.0);
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, vi) in q.iter_mut().zip(v) {
            // round half away from zero, as f32::round: trunc, then
            // step one away from zero when |frac| >= 0.5 (exact).
            let p = _mm256_mul_ps(vi, vid);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
            let frac = _mm256_and_ps(_mm256_sub_ps(p, t), absm);
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let step = _mm256_or_ps(_mm256_and_ps(p, sign), one);
            *qi = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, step)));
        }
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(
            _mm256_extracti128_si256(sum, 1),
            _mm256_castsi256_si128(sum),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        let p16a = _mm256_packs_epi32(q[0], q[1]);
        let p16b = _mm256_packs_epi32(q[2], q[3]);
        let p8 = _mm256_packs_epi16(p16a, p16b);
        let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs as *mut __m256i, p8);
        Some((d, _mm_cvtsi128_si32(s)))
    }
}

/// Safe only through a `Kernels` table (features detected first).
pub(super) fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * 32, "q8_0 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        // SAFETY: features detected before the table is handed out;
        // xs has 32 floats and b.qs 32 bytes.
        match unsafe { q8_block(xs.as_ptr(), b.qs.as_mut_ptr()) } {
            Some((d, _)) => b.d = f32_to_f16(d).to_le_bytes(),
            None => *b = crate::quant::q8_0::quantize_block_q8_0(xs.try_into().unwrap()),
        }
    }
}

/// Safe only through a `Kernels` table (features detected first).
pub(super) fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * 32, "q8_1 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        // SAFETY: as in quantize_q8_0.
        match unsafe { q8_block(xs.as_ptr(), b.qs.as_mut_ptr()) } {
            Some((d, sum)) => {
                b.d = f32_to_f16(d).to_le_bytes();
                b.s = f32_to_f16(sum as f32 * d).to_le_bytes();
            }
            None => *b = crate::quant::q8_1::quantize_block_q8_1(xs.try_into().unwrap()),
        }
    }
}

/// One Q8_K block as [`crate::quant::q8_k::quantize_block_q8_k`] makes it,
/// bit for bit: `Some` of it, or `None` for a block with a NaN or an
/// infinity (whose quants the reference computes from NaN products), which
/// the caller sends to the reference. The products and ggml's
/// `nearest_int` (add 1.5 * 2^23, keep the low mantissa bits) are the same
/// f32 operations in every lane.
///
/// Safety: AVX2; `x` has 256 readable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_k_block(x: *const f32) -> Option<BlockQ8_K> {
    // SAFETY (whole body): the features and pointer the caller vouches for.
    unsafe {
        let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut m = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_ps();
        let inf = _mm256_set1_ps(f32::INFINITY);
        for i in 0..QK_K / 8 {
            let a = _mm256_and_ps(_mm256_loadu_ps(x.add(8 * i)), absm);
            m = _mm256_max_ps(m, a);
            // Not below infinity: an infinity or a NaN.
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
        }
        if _mm256_movemask_ps(bad) != 0 {
            return None;
        }
        let r = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let r = _mm_max_ps(r, _mm_movehl_ps(r, r));
        let amax = _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
        let mut b = <BlockQ8_K as bytemuck::Zeroable>::zeroed();
        if amax == 0.0 {
            return Some(b);
        }
        // The first value of that magnitude, its sign kept, as the reference picks it.
        let xs = std::slice::from_raw_parts(x, QK_K);
        let max = *xs.iter().find(|v| v.abs() == amax)?;
        let iscale = -127.0 / max;
        if !iscale.is_finite() {
            // A maximum below 127 / f32::MAX: the reference's products are infinite and its
            // `as i8` wraps where the packs below would saturate.
            return None;
        }
        let vs = _mm256_set1_ps(iscale);
        let magic = _mm256_set1_ps(12_582_912.0);
        let (mant, off, top) = (
            _mm256_set1_epi32(0x007F_FFFF),
            _mm256_set1_epi32(0x0040_0000),
            _mm256_set1_epi32(127),
        );
        for i in 0..QK_K / 32 {
            let mut q = [_mm256_setzero_si256(); 4];
            for (t, qt) in q.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(x.add(32 * i + 8 * t));
                let v = _mm256_add_ps(_mm256_mul_ps(v, vs), magic);
                let n = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(v), mant), off);
                *qt = _mm256_min_epi32(n, top);
            }
            let p16a = _mm256_packs_epi32(q[0], q[1]);
            let p16b = _mm256_packs_epi32(q[2], q[3]);
            let p8 = _mm256_packs_epi16(p16a, p16b);
            let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(b.qs.as_mut_ptr().add(32 * i) as *mut __m256i, p8);
        }
        b.bsums = crate::quant::q8_k::bsums(&b.qs);
        b.d = (1.0 / iscale).to_le_bytes();
        Some(b)
    }
}

/// Safe only through a `Kernels` table (features detected first).
pub(super) fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8_K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q8_K row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        // SAFETY: features detected before the table is handed out; xs has 256 floats.
        *b = match unsafe { q8_k_block(xs.as_ptr()) } {
            Some(q) => q,
            None => crate::quant::q8_k::quantize_block_q8_k(xs.try_into().unwrap()),
        };
    }
}

/// A 256-bit path's table: its quantized GEMMs, and this module's float
/// GEMMs and quantizers (the same code on every 256-bit path).
pub(super) const fn table<I: Isa256>(path: crate::simd::SimdPath) -> Kernels {
    use crate::dot::kq::gemm_avx2;
    use crate::quant::{
        BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K, BlockQ6_K,
    };
    Kernels {
        path,
        tile: (4, 2),
        q4_0: gemm::<Q4_0, I>,
        q4_1: gemm::<Q4_1, I>,
        q8_0: gemm::<Q8_0, I>,
        q5_0: gemm_avx2::<BlockQ5_0>,
        q5_1: gemm_avx2::<BlockQ5_1>,
        q2_k: gemm_avx2::<BlockQ2_K>,
        q3_k: gemm_avx2::<BlockQ3_K>,
        q4_k: gemm_avx2::<BlockQ4_K>,
        q5_k: gemm_avx2::<BlockQ5_K>,
        q6_k: gemm_avx2::<BlockQ6_K>,
        f16: gemm_f16,
        bf16: gemm_bf16,
        f32_le: gemm_f32_le,
        f16_f32: gemm_f16_f32,
        bf16_f32: gemm_bf16_f32,
        f32: gemm_f32,
        quantize_q8_0,
        quantize_q8_1,
        quantize_q8_k,
    }
}

pub(in crate::dot) static KERNELS: Kernels = table::<Avx2>(crate::simd::SimdPath::Avx2);
