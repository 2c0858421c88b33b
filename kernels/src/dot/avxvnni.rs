//! AVX-VNNI: the 256-bit kernels of `avx2.rs` with `vpdpbusd` (VEX form)
//! for the byte dot products. Gives the same bits as the AVX2 path.

simd256_kernels!(
    features = "avx2,fma,f16c,avxvnni",
    path = crate::simd::SimdPath::AvxVnni,
    vnni = true,
    dpbusd = _mm256_dpbusd_avx_epi32
);

/// The same macro body with the EVEX `vpdpbusd` on 256 bits (AVX-512 VNNI +
/// VL), so the AVX-VNNI code is exercised on CPUs that have AVX-512 VNNI but
/// not AVX-VNNI (Zen 4, Ice Lake, ...). Tests only.
#[cfg(test)]
pub(super) mod evex {
    simd256_kernels!(
        features = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
        path = crate::simd::SimdPath::AvxVnni,
        vnni = true,
        dpbusd = _mm256_dpbusd_epi32
    );

    pub(in crate::dot) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("f16c") && has!("avx512vnni") && has!("avx512vl")
    }
}
