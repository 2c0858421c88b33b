//! AVX-512 VNNI: the 512-bit kernels of `avx512.rs` with `vpdpbusd` for the
//! byte dot products. Gives the same bits as the AVX2 and AVX-512 paths.

simd512_kernels!(
    features = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c",
    path = crate::simd::SimdPath::Avx512Vnni,
    vnni = true
);
