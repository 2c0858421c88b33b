//! 512-bit x86 kernels, written once as `#[inline(always)]` bodies generic
//! over [`Isa512`]: AVX-512F/BW (here: `vpmaddubsw` + `vpmaddwd` on zmm, the
//! sign trick by masked negation) and AVX-512 VNNI (`avx512vnni.rs`:
//! `vpdpbusd`), each with a short `#[target_feature]` entry point. Each zmm
//! holds two weight rows (one per 256-bit half) against one token broadcast
//! to both halves, so a half computes exactly what a 256-bit lane set of
//! `avx2.rs` does and the results are bit-identical to the AVX2 path. An odd
//! last row runs with itself as the partner and only its half is stored.
//!
//! The F16/BF16 GEMMs are `float_wide.rs` (the AVX2 tile's arithmetic on a
//! tile that 32 registers hold); the other float kernels and the activation
//! quantizers come from the AVX2 module (this path's CPUs have AVX2, FMA,
//! F16C and AVX-512VL; detection checks).

// The tiles index accumulators, activations and outputs by the same (row,
// token) pair; range loops keep that visible, as in the formulas.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::avx2::{f16s, hsum8};
use crate::dot::{tiled_gemm, Kernels, TileFn, Tiles};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

/// What the 512-bit paths differ in: the byte dot product, and the
/// `#[target_feature]` entry point their tiles are compiled in.
pub(super) trait Isa512 {
    /// `vpdpbusd` is there: Q8_0 weights go as `x + 128` with a
    /// `-128 * sum(y)` correction, not the sign trick.
    const VNNI: bool;
    /// `acc + ` 16 lanes of sum(x*y) over 4-byte groups, x unsigned, y
    /// signed, |pair sums| < 2^15 (true for every use here). Exact in i32,
    /// so folding a correction into `acc` gives the same integers as
    /// subtracting it afterwards.
    ///
    /// # Safety
    /// The path's features are present (inlined into its entry point).
    unsafe fn dot_us_acc(acc: __m512i, x: __m512i, y: __m512i) -> __m512i;
    /// `T`'s `R x C` tile, compiled with this path's features (its entry
    /// point).
    ///
    /// # Safety
    /// The path's features are present; [`Tile512::tile`]'s pointers.
    unsafe fn tile<T: Tile512, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    );
}

/// A quantized tile body: R rows (1 or even; stride k blocks) x C tokens
/// (stride k), written to `out[j * ld + i]`.
pub(super) trait Tile512 {
    type W;
    type A;
    /// # Safety
    /// `I`'s features are present; `w` holds R rows of k blocks, `a` C
    /// tokens of k blocks, and `out + j * ld + i` (i < R, j < C) is writable.
    unsafe fn tile<I: Isa512, const R: usize, const C: usize>(
        w: *const Self::W,
        a: *const Self::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    );
}

/// AVX-512F/BW: `vpmaddubsw` + `vpmaddwd` by ones.
pub(super) struct Avx512;

impl Isa512 for Avx512 {
    const VNNI: bool = false;
    #[inline(always)]
    unsafe fn dot_us_acc(acc: __m512i, x: __m512i, y: __m512i) -> __m512i {
        // SAFETY: AVX-512BW, as the caller guarantees.
        unsafe {
            let p = _mm512_madd_epi16(_mm512_maddubs_epi16(x, y), _mm512_set1_epi16(1));
            _mm512_add_epi32(acc, p)
        }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn tile<T: Tile512, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's features are Avx512's; the caller's pointers.
        unsafe { T::tile::<Self, R, C>(w, a, k, out, ld) }
    }
}

/// The GEMM of tile `T` on path `I`, in 8 x 4 tiles and their edges.
/// Safe only through a `Kernels` table (features detected first).
pub(super) fn gemm<T: Tile512, I: Isa512>(
    w: &[T::W],
    a: &[T::A],
    k: usize,
    out: &mut [f32],
) -> Tiles {
    let tiles = [
        I::tile::<T, 8, 4> as TileFn<T::W, T::A>,
        I::tile::<T, 8, 1>,
        I::tile::<T, 1, 4>,
        I::tile::<T, 1, 1>,
    ];
    // SAFETY: the tables that hold this GEMM are handed out after I's
    // features were detected.
    unsafe { tiled_gemm(w, a, k, out, (8, 4), tiles) }
}

#[inline(always)]
unsafe fn dot_us<I: Isa512>(x: __m512i, y: __m512i) -> __m512i {
    // SAFETY: I's features, as the caller guarantees.
    unsafe { I::dot_us_acc(_mm512_setzero_si512(), x, y) }
}

/// Two blocks' nibbles in element order: row a in the low half, row b in
/// the high half. Both 16-byte groups are broadcast to [a, a, b, b] (two
/// loads, one masked), then one variable shift moves the high nibbles down
/// in 128-bit lanes 1 and 3 and one AND keeps the low nibble of every byte.
#[inline(always)]
unsafe fn nibbles2(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: AVX-512F and 16 readable bytes at a and b, as the caller guarantees.
    unsafe {
        let ta = _mm512_broadcast_i32x4(_mm_loadu_si128(a as *const __m128i));
        let t = _mm512_mask_broadcast_i32x4(ta, 0xFF00, _mm_loadu_si128(b as *const __m128i));
        let sh = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
        _mm512_and_si512(_mm512_srlv_epi64(t, sh), _mm512_set1_epi8(0x0F))
    }
}

/// [h(a) x 8 | h(b) x 8] for the little-endian f16s at a and b: both words
/// joined in a general register, one 2-wide F16C conversion (exact, as
/// `f16s`) and one permute.
#[inline(always)]
unsafe fn pair_h(a: *const u8, b: *const u8) -> __m512 {
    // SAFETY: AVX-512F and F16C, two readable bytes at a and b, as the caller guarantees.
    unsafe {
        let ha = (a as *const u16).read_unaligned() as u32;
        let hb = (b as *const u16).read_unaligned() as u32;
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((ha | hb << 16) as i32));
        let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
    }
}

#[inline(always)]
unsafe fn bytes2(a: *const i8, b: *const i8) -> __m512i {
    // SAFETY: AVX-512F and 32 readable bytes at a and b, as the caller guarantees.
    unsafe {
        let lo = _mm256_loadu_si256(a as *const __m256i);
        let hi = _mm256_loadu_si256(b as *const __m256i);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }
}

#[inline(always)]
unsafe fn bcast(a: *const i8) -> __m512i {
    // SAFETY: AVX-512F and 32 readable bytes at a, as the caller guarantees.
    unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(a as *const __m256i)) }
}

#[inline(always)]
unsafe fn halves(v: __m512) -> (f32, f32) {
    // SAFETY: AVX-512F, as the caller guarantees.
    unsafe {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        (hsum8(_mm512_castps512_ps256(v)), hsum8(hi))
    }
}

/// Writes pair p's halves (plus `extra(p, j)`) to rows 2p and 2p+1 of an
/// R x C tile (the second only when the tile has it).
///
/// # Safety
/// AVX-512F; `out + j * ld + i` (i < R, j < C) is writable.
#[inline(always)]
unsafe fn store_pairs<const R: usize, const C: usize>(
    acc: &[[__m512; C]; R],
    out: *mut f32,
    ld: usize,
    extra: impl Fn(usize, usize) -> (f32, f32),
) {
    for p in 0..R.div_ceil(2) {
        for j in 0..C {
            // SAFETY: as the caller guarantees; 2p + 1 is written only below R.
            unsafe {
                let (lo, hi) = halves(acc[p][j]);
                let (e0, e1) = extra(p, j);
                *out.add(j * ld + 2 * p) = lo + e0;
                if 2 * p + 1 < R {
                    *out.add(j * ld + 2 * p + 1) = hi + e1;
                }
            }
        }
    }
}

/// Index of the partner row of pair p among R rows.
#[inline(always)]
fn partner(p: usize, r: usize) -> usize {
    if 2 * p + 1 < r {
        2 * p + 1
    } else {
        2 * p
    }
}

/// Decode only (one token: nothing else hides memory latency): every
/// `every` blocks, a software prefetch of each of the R rows `PF` blocks
/// ahead (about 0.6-1 KiB), on top of the hardware streams. `every` keeps
/// the step under one cache line.
const PF: usize = 32;

/// # Safety
/// `w` holds R rows of k blocks; only addresses inside it (`b + PF < k`)
/// are formed.
#[inline(always)]
unsafe fn prefetch_rows<const R: usize, const C: usize, T>(
    w: *const T,
    k: usize,
    b: usize,
    every: usize,
) {
    if C == 1 && b.is_multiple_of(every) && b + PF < k {
        for i in 0..R {
            // SAFETY: the address is inside w, as above; a prefetch reads nothing.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(w.add(i * k + b + PF) as *const i8) };
        }
    }
}

pub(super) struct Q4_0;
pub(super) struct Q8_0;
pub(super) struct Q4_1;

impl Tile512 for Q4_0 {
    type W = BlockQ4_0;
    type A = BlockQ8_0;
    /// Per block and token the activation side is done once (load,
    /// `-8 * sum(y)` per lane, scale); per row pair and block it is two
    /// 16-byte loads, a shift and an AND for the nibbles, one 2-wide
    /// `vcvtph2ps` and a permute for both rows' scales, and the correction
    /// rides in the dot's accumulator input.
    #[inline(always)]
    unsafe fn tile<I: Isa512, const R: usize, const C: usize>(
        w: *const BlockQ4_0,
        a: *const BlockQ8_0,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY (whole body): I's features; b < k, rows below R and
        // j < C keep every pointer inside what the caller vouches for.
        unsafe {
            let np = R.div_ceil(2);
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for b in 0..k {
                let mut y = [_mm512_setzero_si512(); C];
                let mut ncorr = [_mm512_setzero_si512(); C];
                let mut dy = [_mm512_setzero_ps(); C];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = bcast(blk.qs.as_ptr());
                    dy[j] = _mm512_set1_ps(f16s(blk.d));
                    // -8 * sum(y) per lane, added to sum(q*y).
                    let corr = dot_us::<I>(_mm512_set1_epi8(8), y[j]);
                    ncorr[j] = _mm512_sub_epi32(_mm512_setzero_si512(), corr);
                }
                prefetch_rows::<R, C, _>(w, k, b, 2);
                for p in 0..np {
                    let b0 = &*w.add(2 * p * k + b);
                    let b1 = &*w.add(partner(p, R) * k + b);
                    let q = nibbles2(b0.qs.as_ptr(), b1.qs.as_ptr());
                    let dx = pair_h(b0.d.as_ptr(), b1.d.as_ptr());
                    for j in 0..C {
                        let s = I::dot_us_acc(ncorr[j], q, y[j]);
                        let d = _mm512_mul_ps(dx, dy[j]);
                        acc[p][j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[p][j]);
                    }
                }
            }
            store_pairs(&acc, out, ld, |_, _| (0.0, 0.0));
        }
    }
}

impl Tile512 for Q8_0 {
    type W = BlockQ8_0;
    type A = BlockQ8_0;
    #[inline(always)]
    unsafe fn tile<I: Isa512, const R: usize, const C: usize>(
        w: *const BlockQ8_0,
        a: *const BlockQ8_0,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY (whole body): as for Q4_0.
        unsafe {
            let np = R.div_ceil(2);
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for b in 0..k {
                let mut y = [_mm512_setzero_si512(); C];
                let mut ncorr = [_mm512_setzero_si512(); C];
                let mut dy = [_mm512_setzero_ps(); C];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = bcast(blk.qs.as_ptr());
                    dy[j] = _mm512_set1_ps(f16s(blk.d));
                    if I::VNNI {
                        let corr = dot_us::<I>(_mm512_set1_epi8(-128), y[j]);
                        ncorr[j] = _mm512_sub_epi32(_mm512_setzero_si512(), corr);
                    }
                }
                prefetch_rows::<R, C, _>(w, k, b, 1);
                for p in 0..np {
                    let b0 = &*w.add(2 * p * k + b);
                    let b1 = &*w.add(partner(p, R) * k + b);
                    let x = bytes2(b0.qs.as_ptr(), b1.qs.as_ptr());
                    let dx = pair_h(b0.d.as_ptr(), b1.d.as_ptr());
                    // VNNI: (x + 128) as u8; else |x| and negate y where x < 0.
                    let xu = if I::VNNI {
                        _mm512_xor_si512(x, _mm512_set1_epi8(-128))
                    } else {
                        _mm512_abs_epi8(x)
                    };
                    let neg = _mm512_movepi8_mask(x);
                    for j in 0..C {
                        let s = if I::VNNI {
                            I::dot_us_acc(ncorr[j], xu, y[j])
                        } else {
                            let sy = _mm512_mask_sub_epi8(y[j], neg, _mm512_setzero_si512(), y[j]);
                            dot_us::<I>(xu, sy)
                        };
                        let d = _mm512_mul_ps(dx, dy[j]);
                        acc[p][j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[p][j]);
                    }
                }
            }
            store_pairs(&acc, out, ld, |_, _| (0.0, 0.0));
        }
    }
}

impl Tile512 for Q4_1 {
    type W = BlockQ4_1;
    type A = BlockQ8_1;
    /// As Q4_0, without the correction; `d` and `m` of both rows come from
    /// one 4-wide conversion (`[d_a, m_a, d_b, m_b]`), and `m * s` is summed
    /// per row in lanes 1 and 3 of one xmm (the same f32 products and sums,
    /// in the same order, as a scalar running sum).
    #[inline(always)]
    unsafe fn tile<I: Isa512, const R: usize, const C: usize>(
        w: *const BlockQ4_1,
        a: *const BlockQ8_1,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY (whole body): as for Q4_0.
        unsafe {
            let np = R.div_ceil(2);
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            let mut msum = [[_mm_setzero_ps(); C]; R];
            let didx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
            for b in 0..k {
                let mut y = [_mm512_setzero_si512(); C];
                let mut dy = [_mm512_setzero_ps(); C];
                let mut sy = [_mm_setzero_ps(); C];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = bcast(blk.qs.as_ptr());
                    dy[j] = _mm512_set1_ps(f16s(blk.d));
                    sy[j] = _mm_set1_ps(f16s(blk.s));
                }
                prefetch_rows::<R, C, _>(w, k, b, 2);
                for p in 0..np {
                    let b0 = &*w.add(2 * p * k + b);
                    let b1 = &*w.add(partner(p, R) * k + b);
                    let q = nibbles2(b0.qs.as_ptr(), b1.qs.as_ptr());
                    // [d_a, m_a, d_b, m_b] as f32.
                    let va = (b0.d.as_ptr() as *const u32).read_unaligned() as u64;
                    let vb = (b1.d.as_ptr() as *const u32).read_unaligned() as u64;
                    let dm = _mm_cvtph_ps(_mm_cvtsi64_si128((va | vb << 32) as i64));
                    let dx = _mm512_permutexvar_ps(didx, _mm512_castps128_ps512(dm));
                    for j in 0..C {
                        let s = dot_us::<I>(q, y[j]);
                        let d = _mm512_mul_ps(dx, dy[j]);
                        acc[p][j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[p][j]);
                        msum[p][j] = _mm_add_ps(msum[p][j], _mm_mul_ps(dm, sy[j]));
                    }
                }
            }
            store_pairs(&acc, out, ld, |p, j| {
                let mut m = [0f32; 4];
                _mm_storeu_ps(m.as_mut_ptr(), msum[p][j]);
                (m[1], m[3])
            });
        }
    }
}

/// A 512-bit path's table: its quantized GEMMs, the F16/BF16 GEMMs of
/// `float_wide.rs`, and the AVX2 module's other float GEMMs and quantizers.
pub(super) const fn table<I: Isa512>(path: crate::simd::SimdPath) -> Kernels {
    use super::avx2;
    use crate::dot::kq::gemm_avx2;
    use crate::quant::{
        BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K, BlockQ6_K,
    };
    Kernels {
        path,
        tile: (8, 4),
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
        f16: super::float_wide::gemm_f16,
        bf16: super::float_wide::gemm_bf16,
        f32_le: avx2::gemm_f32_le,
        f16_f32: avx2::gemm_f16_f32,
        bf16_f32: avx2::gemm_bf16_f32,
        f32: avx2::gemm_f32,
        quantize_q8_0: avx2::quantize_q8_0,
        quantize_q8_1: avx2::quantize_q8_1,
        quantize_q8_k: avx2::quantize_q8_k,
    }
}

pub(in crate::dot) static KERNELS: Kernels = table::<Avx512>(crate::simd::SimdPath::Avx512);
