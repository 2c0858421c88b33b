//! AVX-VNNI kernels over the packed layout: the tiles of `avx2.rs` (each
//! 64-byte chunk as two 8-row halves, one row per 32-bit lane, 3 tokens a
//! tile) with 256-bit `vpdpbusd` for the byte dots, where AVX2 needs
//! `vpmaddubsw` + `vpmaddwd` (+ an add) and, for Q8_0, the sign trick.
//! `vpdpbusd` multiplies unsigned by signed bytes and adds in i32 without
//! saturation, so the weights are the unsigned side as they are stored
//! (nibbles 0..15; Q8_0 as x + 128), the activations the signed side with
//! -128 included, and the offsets ride in `a.c` (Q4_0 `-8 sum(y)`, Q8_0
//! `-128 sum(y)`, Q4_1 0) as the accumulator's start. The float side is the
//! scalar twin's, in its order, so every output is bit for bit the twin's.
//!
//! The tiles are written once, as `#[inline(always)]` bodies generic over
//! the encoding of `vpdpbusd` ([`Vnni256`]), with `#[target_feature]` entry
//! points (the encoding's [`Path256`] tiles) for each: `vex`, the AVX-VNNI
//! encoding (Alder Lake and later Intel cores, Zen 5) that the `avxvnni`
//! path runs, and `evex`, the same instruction in its AVX-512 VNNI + VL
//! encoding, which CPUs with AVX-512 VNNI but no AVX-VNNI (Zen 4, Ice Lake)
//! can run: the tests check the code there, and `avxvnni_evex_kernels` lets
//! the benches time it.

use std::arch::x86_64::*;

use crate::packed::avx2::{group, store, Path256};
use crate::packed::x86::prefetch;
use crate::packed::{block_at, ActBlock, PackedKernels};
use crate::simd::SimdPath;

/// Decode prefetch distance ([`crate::packed::x86::prefetch`]): none, as
/// for the AVX2 kernels, which read the same 256-bit halves.
const PF_BYTES: usize = 0;

/// An encoding of 256-bit `vpdpbusd`; its [`Path256`] tiles are
/// [`body_4bit`] and [`body_q8_0`] compiled with its features.
pub(super) trait Vnni256: Path256 {
    /// `acc + ` per lane the dot of its 4 unsigned bytes of `u` with the 4
    /// signed bytes of `s`, in i32 without saturation.
    ///
    /// # Safety
    /// The encoding's features are present (inlined into its tiles).
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

/// The AVX-VNNI encoding: what the `avxvnni` path runs.
pub(super) struct Vex;

impl Vnni256 for Vex {
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI, as the caller guarantees.
        unsafe { _mm256_dpbusd_avx_epi32(acc, u, s) }
    }
}

impl Path256 for Vex {
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn tile_4bit<const C: usize, const H: usize, const MIN: bool>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    ) {
        // SAFETY: this function's features are Vex's; the caller's pointers.
        unsafe { body_4bit::<Self, C, H, MIN>(g, k, act, out, ld, real) }
    }
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn tile_q8_0<const C: usize, const H: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    ) {
        // SAFETY: as in tile_4bit.
        unsafe { body_q8_0::<Self, C, H>(g, k, act, out, ld, real) }
    }
}

/// The same instruction in its EVEX encoding (AVX-512 VNNI + VL), for tests
/// and benches on CPUs without AVX-VNNI.
pub(super) struct Evex;

impl Vnni256 for Evex {
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-512 VNNI and VL, as the caller guarantees.
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }
}

impl Path256 for Evex {
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn tile_4bit<const C: usize, const H: usize, const MIN: bool>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    ) {
        // SAFETY: this function's features are Evex's; the caller's pointers.
        unsafe { body_4bit::<Self, C, H, MIN>(g, k, act, out, ld, real) }
    }
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn tile_q8_0<const C: usize, const H: usize>(
        g: *const u8,
        k: usize,
        act: *const ActBlock,
        out: *mut f32,
        ld: usize,
        real: usize,
    ) {
        // SAFETY: as in tile_4bit.
        unsafe { body_q8_0::<Self, C, H>(g, k, act, out, ld, real) }
    }
}

/// A block's integer accumulators for C tokens x H halves, each at its
/// token's `a.c` (the weights' offset times sum(y)).
///
/// Safety: AVX; `act` holds `C * k` blocks, `b < k`.
#[inline(always)]
unsafe fn start<const C: usize, const H: usize>(
    act: *const ActBlock,
    k: usize,
    b: usize,
) -> [[__m256i; C]; H] {
    // SAFETY (whole body): AVX and t * k + b < C * k, inside act, as the caller guarantees.
    unsafe {
        let mut s = [[_mm256_setzero_si256(); C]; H];
        for s_h in s.iter_mut() {
            for (t, s) in s_h.iter_mut().enumerate() {
                *s = _mm256_set1_epi32((*act.add(t * k + b)).c);
            }
        }
        s
    }
}

/// The float side of block `b`, in the scalar twin's order:
/// `acc = fma(dx * dy, s0 + s1, acc)`, then (`MIN`, Q4_1)
/// `acc = fma(m, s, acc)`; `db` is the block's scales (16 f16, then 16
/// minimums when `MIN`).
///
/// Safety: AVX2, FMA and F16C; `db` holds the block's scale bytes, `act`
/// `C * k` blocks, `b < k`.
#[inline(always)]
unsafe fn finish<const C: usize, const H: usize, const MIN: bool>(
    acc: &mut [[__m256; C]; H],
    s0: &[[__m256i; C]; H],
    s1: &[[__m256i; C]; H],
    db: *const u8,
    act: *const ActBlock,
    k: usize,
    b: usize,
) {
    // SAFETY (whole body): every offset is inside the ranges the caller guarantees.
    unsafe {
        for (h, acc_h) in acc.iter_mut().enumerate() {
            let dx = _mm256_cvtph_ps(_mm_loadu_si128(db.add(16 * h) as *const __m128i));
            let mx = if MIN {
                _mm256_cvtph_ps(_mm_loadu_si128(db.add(32 + 16 * h) as *const __m128i))
            } else {
                _mm256_setzero_ps()
            };
            for (t, acc_t) in acc_h.iter_mut().enumerate() {
                let a = &*act.add(t * k + b);
                let s = _mm256_add_epi32(s0[h][t], s1[h][t]);
                let dd = _mm256_mul_ps(dx, _mm256_set1_ps(a.d));
                *acc_t = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s), *acc_t);
                if MIN {
                    *acc_t = _mm256_fmadd_ps(mx, _mm256_set1_ps(a.s), *acc_t);
                }
            }
        }
    }
}

/// One 4-bit tile of H halves (H = 2: rows 0-15; H = 1: rows 0-7): `g` the
/// group ([`crate::packed::block_at`]), `act` the tile's first token's
/// blocks (token t at `act + t * k`), `out` its first output (token t at
/// `out + t * ld`), `real` the group's real rows. `MIN` (Q4_1): a block's
/// scales are 16 scales then 16 minimums, and `acc += m * s` follows the
/// scaled integer sum.
///
/// Safety: D's features; `g` holds a group of `k` blocks, `act` `C * k`
/// blocks; lanes below `real` of `out + t * ld` (t < C) are writable.
#[inline(always)]
unsafe fn body_4bit<D: Vnni256, const C: usize, const H: usize, const MIN: bool>(
    g: *const u8,
    k: usize,
    act: *const ActBlock,
    out: *mut f32,
    ld: usize,
    real: usize,
) {
    let sb = if MIN { 64 } else { 32 };
    // Kept rolled, as in avx2.rs (unrolled, the broadcasts spilled).
    let chunks = std::hint::black_box(4);
    // SAFETY (whole body): D's features; every offset is inside the ranges
    // the caller guarantees.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); C]; H];
        for b in 0..k {
            let (qo, so) = block_at(256, sb, b);
            let (qb, db) = (g.add(qo), g.add(so));
            prefetch::<C, PF_BYTES>(g, 256, sb, b);
            // s0 starts at a.c; for one token the high nibbles go to a
            // second chain (s1) so two `vpdpbusd` latencies overlap per half.
            let mut s0 = start::<C, H>(act, k, b);
            let mut s1 = [[_mm256_setzero_si256(); C]; H];
            for j in 0..chunks {
                for (h, (s0_h, s1_h)) in s0.iter_mut().zip(s1.iter_mut()).enumerate() {
                    let l = _mm256_loadu_si256(qb.add(64 * j + 32 * h) as *const __m256i);
                    let lo = _mm256_and_si256(l, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(l), m4);
                    for (t, (s0, s1)) in s0_h.iter_mut().zip(s1_h.iter_mut()).enumerate() {
                        let a = &*act.add(t * k + b);
                        *s0 = D::dpbusd(*s0, lo, group(a, j));
                        let s = if C == 1 { s1 } else { s0 };
                        *s = D::dpbusd(*s, hi, group(a, 4 + j));
                    }
                }
            }
            finish::<C, H, MIN>(&mut acc, &s0, &s1, db, act, k, b);
        }
        store(&acc, out, ld, real);
    }
}

/// As [`body_4bit`] for Q8_0 weights (stored as x + 128; any activation
/// byte, -128 included).
///
/// Safety: as [`body_4bit`].
#[inline(always)]
unsafe fn body_q8_0<D: Vnni256, const C: usize, const H: usize>(
    g: *const u8,
    k: usize,
    act: *const ActBlock,
    out: *mut f32,
    ld: usize,
    real: usize,
) {
    // Pairs of chunks, kept rolled as in body_4bit.
    let pairs = std::hint::black_box(4);
    // SAFETY (whole body): as in body_4bit.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; H];
        for b in 0..k {
            let (qo, so) = block_at(512, 32, b);
            let (qb, db) = (g.add(qo), g.add(so));
            prefetch::<C, PF_BYTES>(g, 512, 32, b);
            let mut s0 = start::<C, H>(act, k, b);
            let mut s1 = [[_mm256_setzero_si256(); C]; H];
            for j in 0..pairs {
                for (h, (s0_h, s1_h)) in s0.iter_mut().zip(s1.iter_mut()).enumerate() {
                    let p = qb.add(128 * j + 32 * h);
                    let q0 = _mm256_loadu_si256(p as *const __m256i);
                    let q1 = _mm256_loadu_si256(p.add(64) as *const __m256i);
                    for (t, (s0, s1)) in s0_h.iter_mut().zip(s1_h.iter_mut()).enumerate() {
                        let a = &*act.add(t * k + b);
                        *s0 = D::dpbusd(*s0, q0, group(a, 2 * j));
                        let s = if C == 1 { s1 } else { s0 };
                        *s = D::dpbusd(*s, q1, group(a, 2 * j + 1));
                    }
                }
            }
            finish::<C, H, false>(&mut acc, &s0, &s1, db, act, k, b);
        }
        store(&acc, out, ld, real);
    }
}

/// The AVX-VNNI encoding's table: what the `avxvnni` path runs. Safe to
/// hand out: [`super::packed_kernels_for`] returns it only after checking
/// the CPU has the path (AVX2, FMA, F16C and AVX-VNNI).
pub(super) mod vex {
    use super::super::avx2::{gemm, Q4_0, Q4_1, Q8_0};
    use super::super::kq;
    use super::{PackedKernels, SimdPath, Vex};

    pub(in crate::packed) static KERNELS: PackedKernels = PackedKernels {
        path: SimdPath::AvxVnni,
        q4_0: gemm::<Q4_0<Vex>>,
        q4_1: gemm::<Q4_1<Vex>>,
        q8_0: gemm::<Q8_0<Vex>>,
        q5_0: kq::x86::avxvnni::<kq::Q5_0>(),
        q5_1: kq::x86::avxvnni::<kq::Q5_1>(),
        q2_k: kq::x86::avxvnni::<kq::Q2K>(),
        q3_k: kq::x86::avxvnni::<kq::Q3K>(),
        q4_k: kq::x86::avxvnni::<kq::Q4K>(),
        q5_k: kq::x86::avxvnni::<kq::Q5K>(),
        q6_k: kq::x86::avxvnni::<kq::Q6K>(),
        q8_0_takes_minus_128: true,
    };
}

/// The EVEX encoding's table (its path is `avxvnni` too), for tests and
/// benches on CPUs without AVX-VNNI. Handed out only by
/// [`super::avxvnni_evex_kernels`], which checks the features.
pub(super) mod evex {
    use super::super::avx2::{gemm, Q4_0, Q4_1, Q8_0};
    use super::super::kq;
    use super::{Evex, PackedKernels, SimdPath};

    pub(in crate::packed) static KERNELS: PackedKernels = PackedKernels {
        path: SimdPath::AvxVnni,
        q4_0: gemm::<Q4_0<Evex>>,
        q4_1: gemm::<Q4_1<Evex>>,
        q8_0: gemm::<Q8_0<Evex>>,
        q5_0: kq::x86::avxvnni_evex::<kq::Q5_0>(),
        q5_1: kq::x86::avxvnni_evex::<kq::Q5_1>(),
        q2_k: kq::x86::avxvnni_evex::<kq::Q2K>(),
        q3_k: kq::x86::avxvnni_evex::<kq::Q3K>(),
        q4_k: kq::x86::avxvnni_evex::<kq::Q4K>(),
        q5_k: kq::x86::avxvnni_evex::<kq::Q5K>(),
        q6_k: kq::x86::avxvnni_evex::<kq::Q6K>(),
        q8_0_takes_minus_128: true,
    };

    /// Whether this CPU can run the EVEX encoding.
    pub(in crate::packed) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2")
            && has!("fma")
            && has!("f16c")
            && has!("avx512f")
            && has!("avx512vnni")
            && has!("avx512vl")
    }
}
