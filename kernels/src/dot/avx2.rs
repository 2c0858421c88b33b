//! 256-bit x86 kernels, written once as a macro and instantiated for AVX2
//! (here: `vpmaddubsw` + `vpmaddwd`) and AVX-VNNI (`avxvnni.rs`:
//! `vpdpbusd`). Every function is `#[target_feature]`; the module's
//! `KERNELS` table is only handed out by `super::kernels_for` after the
//! features were detected, and the safe wrappers in it check every length
//! before the unchecked pointer code runs.
//!
//! Integer lanes: lane l of a block holds the exact sum of the products of
//! elements 4l..4l+3 (`vpmaddwd(vpmaddubsw(..), 1)` and `vpdpbusd` both give
//! that), and the f32 side is `fma(set1(dx*dy), cvt(lanes), acc)` per block
//! then [`hsum8`]-style reduction, so both instantiations give the same bits.
//!
//! Unsigned x signed products: Q4_0 as `q*y - 8*sum(y)` (nibbles q in 0..15
//! are the unsigned side, the correction comes per token and block); Q4_1
//! nibbles directly; Q8_0 with the sign trick (`|x| * sign(y, x)`) on AVX2,
//! and as `(x+128)*y - 128*sum(y)` with VNNI (exact for every byte).

/// `fn $name(w, a, k, out) -> Tiles`: a safe [`GemmFn`](super::GemmFn)
/// over `$tile::<R, C>` in `$mr x $nr` tiles and their edges.
macro_rules! quant_gemm {
    ($name:ident, $tile:ident, $W:ty, $A:ty, $mr:literal x $nr:literal) => {
        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn $name(w: &[$W], a: &[$A], k: usize, out: &mut [f32]) -> Tiles {
            let (rows, n) = gemm_shape(w.len(), a.len(), k, out.len());
            let (wp, ap, op) = (w.as_ptr(), a.as_ptr(), out.as_mut_ptr());
            let rb = k * std::mem::size_of::<$W>();
            for_tiles(rows, n, rb, ($mr, $nr), |r0, t0, mr, nr| {
                // SAFETY: the CPU has this module's features (the
                // only way to reach this function is the KERNELS
                // table, which kernels_for hands out after detection),
                // and for_tiles keeps r0 + mr <= rows and
                // t0 + nr <= n, so every block the tile reads and
                // every output it writes is inside w, a and out,
                // whose lengths gemm_shape checked.
                unsafe {
                    let (w, a) = (wp.add(r0 * k), ap.add(t0 * k));
                    let o = op.add(t0 * rows + r0);
                    match (mr, nr) {
                        ($mr, $nr) => $tile::<$mr, $nr>(w, a, k, o, rows),
                        ($mr, 1) => $tile::<$mr, 1>(w, a, k, o, rows),
                        (1, $nr) => $tile::<1, $nr>(w, a, k, o, rows),
                        _ => $tile::<1, 1>(w, a, k, o, rows),
                    }
                }
            })
        }
    };
}

/// The float twin of `quant_gemm!`, over `tile_f::<$wk, $ak, R, C>`.
macro_rules! float_gemm {
    ($name:ident, $W:ty, $A:ty, $wk:expr, $ak:expr, $mr:literal x $nr:literal) => {
        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn $name(w: &[$W], a: &[$A], k: usize, out: &mut [f32]) -> Tiles {
            let (rows, n) = gemm_shape(w.len(), a.len(), k, out.len());
            let (wp, ap) = (w.as_ptr() as *const u8, a.as_ptr() as *const u8);
            let op = out.as_mut_ptr();
            const WS: usize = std::mem::size_of::<$W>();
            const AS: usize = std::mem::size_of::<$A>();
            const _: () = assert!(WS == esize($wk) && AS == esize($ak));
            for_tiles(rows, n, k * WS, ($mr, $nr), |r0, t0, mr, nr| {
                // SAFETY: as for the quantized GEMMs: features
                // detected before KERNELS is handed out, tiles in
                // bounds of the lengths gemm_shape checked.
                unsafe {
                    let (w, a) = (wp.add(r0 * k * WS), ap.add(t0 * k * AS));
                    let o = op.add(t0 * rows + r0);
                    match (mr, nr) {
                        ($mr, $nr) => tile_f::<{ $wk }, { $ak }, $mr, $nr>(w, a, k, o, rows),
                        ($mr, 1) => tile_f::<{ $wk }, { $ak }, $mr, 1>(w, a, k, o, rows),
                        (1, $nr) => tile_f::<{ $wk }, { $ak }, 1, $nr>(w, a, k, o, rows),
                        _ => tile_f::<{ $wk }, { $ak }, 1, 1>(w, a, k, o, rows),
                    }
                }
            })
        }
    };
}

macro_rules! simd256_kernels {
    (features = $feat:literal, path = $path:expr, vnni = $vnni:literal, dpbusd = $dpbusd:path) => {
        use std::arch::x86_64::*;

        use crate::dot::{for_tiles, gemm_shape, Kernels, Tiles};
        use crate::quant::float::{bf16_to_f32, f16_to_f32, Bf16Bytes, F16Bytes, F32Bytes};
        use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

        #[inline]
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn hsum8(v: __m256) -> f32 {
            let r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
            let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            let r = _mm_add_ss(r, _mm_movehdup_ps(r));
            _mm_cvtss_f32(r)
        }

        /// An f16 scale as f32 (F16C; exact, like `f16_to_f32`).
        #[inline]
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn f16s(d: [u8; 2]) -> f32 {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes(d) as i32)))
        }

        /// 8 lanes of sum(x*y) over 4-byte groups, x unsigned, y signed,
        /// |pair sums| < 2^15 (true for every use here).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_us(x: __m256i, y: __m256i) -> __m256i {
            if $vnni {
                $dpbusd(_mm256_setzero_si256(), x, y)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
            }
        }

        /// The 32 nibbles of a Q4_0/Q4_1 block in element order, as bytes.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn nibbles(qs: *const u8) -> __m256i {
            let t = _mm_loadu_si128(qs as *const __m128i);
            let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
            _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load_q(qs: *const i8) -> __m256i {
            _mm256_loadu_si256(qs as *const __m256i)
        }

        /// R weight rows (stride k blocks) x C tokens (stride k), written to
        /// `out[j * ld + i]`.
        #[target_feature(enable = $feat)]
        unsafe fn tile_q4_0<const R: usize, const C: usize>(
            w: *const BlockQ4_0,
            a: *const BlockQ8_0,
            k: usize,
            out: *mut f32,
            ld: usize,
        ) {
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
                    corr[j] = dot_us(_mm256_set1_epi8(8), y[j]);
                }
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    let q = nibbles(blk.qs.as_ptr());
                    let dx = f16s(blk.d);
                    for j in 0..C {
                        let s = _mm256_sub_epi32(dot_us(q, y[j]), corr[j]);
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

        #[target_feature(enable = $feat)]
        unsafe fn tile_q8_0<const R: usize, const C: usize>(
            w: *const BlockQ8_0,
            a: *const BlockQ8_0,
            k: usize,
            out: *mut f32,
            ld: usize,
        ) {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for b in 0..k {
                let mut y = [_mm256_setzero_si256(); C];
                let mut corr = [_mm256_setzero_si256(); C];
                let mut dy = [0f32; C];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = load_q(blk.qs.as_ptr());
                    dy[j] = f16s(blk.d);
                    if $vnni {
                        corr[j] = dot_us(_mm256_set1_epi8(-128), y[j]);
                    }
                }
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    let x = load_q(blk.qs.as_ptr());
                    let dx = f16s(blk.d);
                    // VNNI: (x + 128) as u8; AVX2: |x| as u8.
                    let xu = if $vnni {
                        _mm256_xor_si256(x, _mm256_set1_epi8(-128))
                    } else {
                        _mm256_abs_epi8(x)
                    };
                    for j in 0..C {
                        let s = if $vnni {
                            _mm256_sub_epi32(dot_us(xu, y[j]), corr[j])
                        } else {
                            dot_us(xu, _mm256_sign_epi8(y[j], x))
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

        #[target_feature(enable = $feat)]
        unsafe fn tile_q4_1<const R: usize, const C: usize>(
            w: *const BlockQ4_1,
            a: *const BlockQ8_1,
            k: usize,
            out: *mut f32,
            ld: usize,
        ) {
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
                        let s = dot_us(q, y[j]);
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


        quant_gemm!(gemm_q4_0, tile_q4_0, BlockQ4_0, BlockQ8_0, 4 x 2);
        quant_gemm!(gemm_q8_0, tile_q8_0, BlockQ8_0, BlockQ8_0, 4 x 2);
        quant_gemm!(gemm_q4_1, tile_q4_1, BlockQ4_1, BlockQ8_1, 4 x 2);

        // Float element kinds for the float tiles.
        const F16: u8 = 0;
        const BF16: u8 = 1;
        const F32: u8 = 2;

        const fn esize(kind: u8) -> usize {
            if kind == F32 {
                4
            } else {
                2
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load8<const K: u8>(p: *const u8) -> __m256 {
            match K {
                F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                    16,
                )),
                _ => _mm256_loadu_ps(p as *const f32),
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load1<const K: u8>(p: *const u8) -> f32 {
            match K {
                F16 => f16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
                BF16 => bf16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
                _ => f32::from_le_bytes(*(p as *const [u8; 4])),
            }
        }

        /// R weight rows x C token rows of `n` float elements each (byte
        /// strides `n * esize`): 8-lane fma accumulators, fixed hsum, then
        /// the `n % 8` tail added in order.
        #[target_feature(enable = $feat)]
        unsafe fn tile_f<const WK: u8, const AK: u8, const R: usize, const C: usize>(
            w: *const u8,
            a: *const u8,
            n: usize,
            out: *mut f32,
            ld: usize,
        ) {
            let (ws, as_) = (esize(WK), esize(AK));
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


        float_gemm!(gemm_f16, F16Bytes, F16Bytes, F16, F16, 4 x 2);
        float_gemm!(gemm_bf16, Bf16Bytes, Bf16Bytes, BF16, BF16, 4 x 2);
        float_gemm!(gemm_f32_le, F32Bytes, f32, F32, F32, 4 x 2);
        float_gemm!(gemm_f16_f32, F16Bytes, f32, F16, F32, 4 x 2);
        float_gemm!(gemm_bf16_f32, Bf16Bytes, f32, BF16, F32, 4 x 2);
        float_gemm!(gemm_f32, f32, f32, F32, F32, 4 x 2);

        /// One Q8 block: `Some((d, quants, sum))` exactly as the reference
        /// quantizer computes them, or `None` for blocks with a NaN or an
        /// infinite or overflowing scale, which the caller sends to the
        /// reference code instead. The packed matmul quantizes its
        /// activations with it too (`crate::packed`).
        ///
        /// Safety: the features above; `x` has 32 readable floats, `qs` 32
        /// writable bytes.
        #[inline]
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn q8_block(x: *const f32, qs: *mut i8) -> Option<(f32, i32)> {
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
            let s = _mm_add_epi32(_mm256_extracti128_si256(sum, 1), _mm256_castsi256_si128(sum));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            let p16a = _mm256_packs_epi32(q[0], q[1]);
            let p16b = _mm256_packs_epi32(q[2], q[3]);
            let p8 = _mm256_packs_epi16(p16a, p16b);
            let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs as *mut __m256i, p8);
            Some((d, _mm_cvtsi128_si32(s)))
        }

        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
            assert_eq!(x.len(), out.len() * 32, "q8_0 row length");
            for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
                // SAFETY: features detected before KERNELS is handed out;
                // xs has 32 floats and b.qs 32 bytes.
                match unsafe { q8_block(xs.as_ptr(), b.qs.as_mut_ptr()) } {
                    Some((d, _)) => b.d = crate::quant::float::f32_to_f16(d).to_le_bytes(),
                    None => *b = crate::quant::q8_0::quantize_block_q8_0(xs.try_into().unwrap()),
                }
            }
        }

        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
            use crate::quant::float::f32_to_f16;
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

        pub(in crate::dot) static KERNELS: Kernels = Kernels {
            path: $path,
            tile: (4, 2),
            q4_0: gemm_q4_0,
            q4_1: gemm_q4_1,
            q8_0: gemm_q8_0,
            q5_0: crate::dot::kq::gemm_avx2::<crate::quant::BlockQ5_0>,
            q5_1: crate::dot::kq::gemm_avx2::<crate::quant::BlockQ5_1>,
            q2_k: crate::dot::kq::gemm_avx2::<crate::quant::BlockQ2_K>,
            q3_k: crate::dot::kq::gemm_avx2::<crate::quant::BlockQ3_K>,
            q4_k: crate::dot::kq::gemm_avx2::<crate::quant::BlockQ4_K>,
            q5_k: crate::dot::kq::gemm_avx2::<crate::quant::BlockQ5_K>,
            q6_k: crate::dot::kq::gemm_avx2::<crate::quant::BlockQ6_K>,
            f16: gemm_f16,
            bf16: gemm_bf16,
            f32_le: gemm_f32_le,
            f16_f32: gemm_f16_f32,
            bf16_f32: gemm_bf16_f32,
            f32: gemm_f32,
            quantize_q8_0,
            quantize_q8_1,
            quantize_q8_k: crate::quant::quantize_row_q8_k,
        };
    };
}

simd256_kernels!(
    features = "avx2,fma,f16c",
    path = crate::simd::SimdPath::Avx2,
    vnni = false,
    dpbusd = _mm256_dpbusd_avx_epi32
);
