//! AVX-VNNI: the 256-bit tiles of `avx2.rs` with `vpdpbusd` (VEX form) for
//! the byte dot products. Gives the same bits as the AVX2 path.

use std::arch::x86_64::*;

use super::avx2::{table, Isa256, Tile256};
use crate::dot::Kernels;

/// AVX-VNNI: `vpdpbusd`, VEX encoding.
pub(super) struct AvxVnni;

impl Isa256 for AvxVnni {
    const VNNI: bool = true;
    #[inline(always)]
    unsafe fn dot_us(x: __m256i, y: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI, as the caller guarantees.
        unsafe { _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, y) }
    }
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn tile<T: Tile256, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's features are AvxVnni's; the caller's pointers.
        unsafe { T::tile::<Self, R, C>(w, a, k, out, ld) }
    }
}

pub(in crate::dot) static KERNELS: Kernels = table::<AvxVnni>(crate::simd::SimdPath::AvxVnni);

/// The same tiles with the EVEX `vpdpbusd` on 256 bits (AVX-512 VNNI + VL),
/// so the AVX-VNNI code is exercised on CPUs that have AVX-512 VNNI but not
/// AVX-VNNI (Zen 4, Ice Lake, ...). Tests only.
#[cfg(test)]
pub(super) mod evex {
    use std::arch::x86_64::*;

    use super::super::avx2::{table, Isa256, Tile256};
    use crate::dot::Kernels;

    pub(in crate::dot) struct Evex;

    impl Isa256 for Evex {
        const VNNI: bool = true;
        #[inline(always)]
        unsafe fn dot_us(x: __m256i, y: __m256i) -> __m256i {
            // SAFETY: AVX-512 VNNI and VL, as the caller guarantees.
            unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y) }
        }
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
        unsafe fn tile<T: Tile256, const R: usize, const C: usize>(
            w: *const T::W,
            a: *const T::A,
            k: usize,
            out: *mut f32,
            ld: usize,
        ) {
            // SAFETY: this function's features are Evex's; the caller's pointers.
            unsafe { T::tile::<Self, R, C>(w, a, k, out, ld) }
        }
    }

    pub(in crate::dot) static KERNELS: Kernels = table::<Evex>(crate::simd::SimdPath::AvxVnni);

    pub(in crate::dot) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("f16c") && has!("avx512vnni") && has!("avx512vl")
    }
}
