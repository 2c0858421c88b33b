//! The f32 vector type the attention kernel is written against, one implementation per path:
//! [`Scalar8`] (portable Rust, eight lanes in an array, separate multiply and add), [`Ymm`]
//! (AVX2 + FMA + F16C) and [`Zmm`] (AVX-512F).
//!
//! Every method is `unsafe` and `#[inline(always)]`: the SIMD ones may only run on a CPU with
//! their features, and they only become real instructions once inlined into a function compiled
//! with those features (the `#[target_feature]` entry points in `attention.rs`). Pointer
//! arguments must be valid for `LANES` f32s.

use half::f16;

/// A vector of `LANES` f32s.
pub(crate) trait Lanes: Copy {
    const LANES: usize;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a * b + c` (fused on the SIMD paths).
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    /// Lane-wise `if a > b { x } else { y }`.
    unsafe fn select_gt(a: Self, b: Self, x: Self, y: Self) -> Self;
    /// Lane-wise [`crate::attention::exp::exp_scalar`].
    unsafe fn exp(x: Self) -> Self;
    /// `LANES` f16s from `p`, as f32.
    unsafe fn load_f16(p: *const f16) -> Self;
    /// `LANES` i8s from `p`, as f32.
    unsafe fn load_i8(p: *const i8) -> Self;
    /// The f16 at `p` as f32, in every lane.
    unsafe fn splat_f16(p: *const f16) -> Self;
    /// `[base[idx[0]], .., base[idx[LANES - 1]]]`; every `base + idx[i]` must be valid.
    unsafe fn gather(base: *const f32, idx: &[i32; 16]) -> Self;
    /// Lane 0.
    unsafe fn first(self) -> f32;
    /// Sum of the lanes, the upper half added onto the lower until one lane is left (lane
    /// i + LANES/2, then i + LANES/4, ...): the order of `tree_sum`'s last steps.
    unsafe fn fold_sum(self) -> f32;
    /// Largest lane, as [`Lanes::max`] folds it (upper half onto lower).
    unsafe fn fold_max(self) -> f32;
}

/// The portable twin: eight lanes that the compiler may vectorize, with `a * b + c` rounded
/// twice (no FMA), so it runs at full speed on CPUs without FMA.
#[derive(Clone, Copy)]
pub(crate) struct Scalar8([f32; 8]);

impl Scalar8 {
    #[inline(always)]
    fn map2(a: Self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Scalar8(std::array::from_fn(|i| f(a.0[i], b.0[i])))
    }
}

impl Lanes for Scalar8 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Scalar8([x; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees p is valid for 8 f32s.
        Scalar8(unsafe { (p as *const [f32; 8]).read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees p is valid for 8 f32s.
        unsafe { (p as *mut [f32; 8]).write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Scalar8(std::array::from_fn(|i| a.0[i] * b.0[i] + c.0[i]))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Self::map2(a, b, f32::max)
    }
    #[inline(always)]
    unsafe fn select_gt(a: Self, b: Self, x: Self, y: Self) -> Self {
        Scalar8(std::array::from_fn(|i| {
            if a.0[i] > b.0[i] {
                x.0[i]
            } else {
                y.0[i]
            }
        }))
    }
    #[inline(always)]
    unsafe fn exp(x: Self) -> Self {
        Scalar8(x.0.map(crate::attention::exp::exp_scalar))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self {
        // SAFETY: the caller guarantees p is valid for 8 f16s.
        Scalar8(std::array::from_fn(|i| unsafe { *p.add(i) }.to_f32()))
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> Self {
        // SAFETY: the caller guarantees p is valid for 8 i8s.
        Scalar8(std::array::from_fn(|i| unsafe { *p.add(i) } as f32))
    }
    #[inline(always)]
    unsafe fn splat_f16(p: *const f16) -> Self {
        // SAFETY: the caller guarantees p is valid.
        Scalar8([unsafe { *p }.to_f32(); 8])
    }
    #[inline(always)]
    unsafe fn gather(base: *const f32, idx: &[i32; 16]) -> Self {
        // SAFETY: the caller guarantees every base + idx[i] is valid.
        Scalar8(std::array::from_fn(|i| unsafe {
            *base.offset(idx[i] as isize)
        }))
    }
    #[inline(always)]
    unsafe fn first(self) -> f32 {
        self.0[0]
    }
    #[inline(always)]
    unsafe fn fold_sum(self) -> f32 {
        let mut b = self.0;
        for n in [4, 2, 1] {
            for i in 0..n {
                b[i] += b[i + n];
            }
        }
        b[0]
    }
    #[inline(always)]
    unsafe fn fold_max(self) -> f32 {
        let mut b = self.0;
        for n in [4, 2, 1] {
            for i in 0..n {
                b[i] = b[i].max(b[i + n]);
            }
        }
        b[0]
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Ymm, Zmm};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::Lanes;
    use crate::attention::exp::x86::{exp_avx2, exp_avx512};

    /// 8 lanes of AVX2; needs AVX2, FMA and F16C.
    #[derive(Clone, Copy)]
    pub(crate) struct Ymm(__m256);

    // SAFETY (every method of both impls): the intrinsics need the CPU features named on the
    // type, which the caller guarantees (the methods only run inside the `#[target_feature]`
    // entry points, called after run-time detection); pointers are valid for LANES f32s by the
    // trait's contract.
    impl Lanes for Ymm {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: see the impl comment.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_mul_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_add_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_sub_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_max_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn select_gt(a: Self, b: Self, x: Self, y: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_blendv_ps(y.0, x.0, _mm256_cmp_ps::<_CMP_GT_OQ>(a.0, b.0)) })
        }
        #[inline(always)]
        unsafe fn exp(x: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { exp_avx2(x.0) })
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            // SAFETY: see the impl comment (p valid for 8 f16s).
            Ymm(unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) })
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self {
            // SAFETY: see the impl comment (p valid for 8 i8s: a 64-bit load).
            Ymm(unsafe {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
            })
        }
        #[inline(always)]
        unsafe fn splat_f16(p: *const f16) -> Self {
            // SAFETY: see the impl comment (p valid for one f16). F16C here, not half's
            // to_f32, which checks the CPU at run time on every call.
            Ymm(unsafe { _mm256_cvtph_ps(_mm_set1_epi16((*p).to_bits() as i16)) })
        }
        #[inline(always)]
        unsafe fn gather(base: *const f32, idx: &[i32; 16]) -> Self {
            // SAFETY: see the impl comment; the caller guarantees every base + idx[i] is valid.
            Ymm(unsafe {
                _mm256_i32gather_ps::<4>(base, _mm256_loadu_si256(idx.as_ptr() as *const __m256i))
            })
        }
        #[inline(always)]
        unsafe fn first(self) -> f32 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_cvtss_f32(self.0) }
        }
        #[inline(always)]
        unsafe fn fold_sum(self) -> f32 {
            // SAFETY: see the impl comment.
            unsafe {
                fold4(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                    |a, b| _mm_add_ps(a, b),
                )
            }
        }
        #[inline(always)]
        unsafe fn fold_max(self) -> f32 {
            // SAFETY: see the impl comment.
            unsafe {
                fold4(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                    |a, b| _mm_max_ps(a, b),
                )
            }
        }
    }

    /// `op` of lanes i and i + 4 of (lo, hi), then lanes i and i + 2, then 0 and 1.
    ///
    /// Safety: SSE3 (every x86-64 path here has it).
    #[inline(always)]
    unsafe fn fold4(lo: __m128, hi: __m128, op: impl Fn(__m128, __m128) -> __m128) -> f32 {
        // SAFETY: the caller's contract.
        unsafe {
            let s4 = op(lo, hi);
            let s2 = op(s4, _mm_movehl_ps(s4, s4));
            _mm_cvtss_f32(op(s2, _mm_movehdup_ps(s2)))
        }
    }

    /// 16 lanes of AVX-512F; needs AVX-512F, AVX2, FMA and F16C.
    #[derive(Clone, Copy)]
    pub(crate) struct Zmm(__m512);

    impl Lanes for Zmm {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: see the impl comment on `Ymm`.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { _mm512_mul_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { _mm512_add_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { _mm512_sub_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { _mm512_max_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn select_gt(a: Self, b: Self, x: Self, y: Self) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe {
                _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(a.0, b.0), y.0, x.0)
            })
        }
        #[inline(always)]
        unsafe fn exp(x: Self) -> Self {
            // SAFETY: see the impl comment on `Ymm`.
            Zmm(unsafe { exp_avx512(x.0) })
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            // SAFETY: see the impl comment on `Ymm` (p valid for 16 f16s).
            Zmm(unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) })
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self {
            // SAFETY: see the impl comment on `Ymm` (p valid for 16 i8s).
            Zmm(unsafe {
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
            })
        }
        #[inline(always)]
        unsafe fn splat_f16(p: *const f16) -> Self {
            // SAFETY: see the impl comment on `Ymm` (p valid for one f16).
            Zmm(unsafe { _mm512_cvtph_ps(_mm256_set1_epi16((*p).to_bits() as i16)) })
        }
        #[inline(always)]
        unsafe fn gather(base: *const f32, idx: &[i32; 16]) -> Self {
            // SAFETY: see the impl comment on `Ymm`; the caller guarantees every base + idx[i]
            // is valid.
            Zmm(unsafe {
                _mm512_i32gather_ps::<4>(_mm512_loadu_si512(idx.as_ptr() as *const _), base)
            })
        }
        #[inline(always)]
        unsafe fn first(self) -> f32 {
            // SAFETY: see the impl comment on `Ymm`.
            unsafe { _mm512_cvtss_f32(self.0) }
        }
        #[inline(always)]
        unsafe fn fold_sum(self) -> f32 {
            // SAFETY: see the impl comment on `Ymm`.
            unsafe { Ymm(_mm256_add_ps(lo256(self.0), hi256(self.0))).fold_sum() }
        }
        #[inline(always)]
        unsafe fn fold_max(self) -> f32 {
            // SAFETY: see the impl comment on `Ymm`.
            unsafe { Ymm(_mm256_max_ps(lo256(self.0), hi256(self.0))).fold_max() }
        }
    }

    /// Lanes 0..8 and 8..16 of a zmm.
    ///
    /// Safety: AVX-512F.
    #[inline(always)]
    unsafe fn lo256(x: __m512) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_castps512_ps256(x) }
    }
    #[inline(always)]
    unsafe fn hi256(x: __m512) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))) }
    }
}
