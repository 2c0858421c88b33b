//! AVX-512 VNNI: the 512-bit tiles of `avx512.rs` with `vpdpbusd` for the
//! byte dot products. Gives the same bits as the AVX2 and AVX-512 paths.

use std::arch::x86_64::*;

use super::avx512::{table, Isa512, Tile512};
use crate::dot::Kernels;

/// AVX-512 VNNI: `vpdpbusd` on zmm.
pub(super) struct Avx512Vnni;

impl Isa512 for Avx512Vnni {
    const VNNI: bool = true;
    #[inline(always)]
    unsafe fn dot_us_acc(acc: __m512i, x: __m512i, y: __m512i) -> __m512i {
        // SAFETY: AVX-512 VNNI, as the caller guarantees.
        unsafe { _mm512_dpbusd_epi32(acc, x, y) }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<T: Tile512, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's features are Avx512Vnni's; the caller's pointers.
        unsafe { T::tile::<Self, R, C>(w, a, k, out, ld) }
    }
}

pub(in crate::dot) static KERNELS: Kernels = table::<Avx512Vnni>(crate::simd::SimdPath::Avx512Vnni);
