//! `exp` for f32 vectors (softmax in attention): Cephes-style range reduction and polynomial,
//! one scalar twin and one AVX2 / AVX-512 version doing the same steps with FMA.
//!
//! `exp(x) = 2^n * e^r` with `n = round(x * log2 e)` and `r = x - n ln 2` (ln 2 split in two
//! parts so `r` is nearly exact), `e^r` by Cephes' degree-7 polynomial on |r| <= ln2/2, and
//! `2^n` built in the exponent bits. The input is clamped to [-87.5, 89]: below about -86.98
//! (where the true result is under 2^-125.5, about 1.6e-38) the result is 0, which includes
//! -inf; above about 88.72 it is +inf. In between the error is within a few ulp of the true
//! value (tests bound it). Subnormal results are flushed to 0.

/// Inputs are clamped to [`LO`, `HI`] first. At `LO` `n` is -126 and `2^(n-1)` is 0.
pub(crate) const LO: f32 = -87.5;
/// At `HI` `n` is 128 and the result overflows to +inf, as the true value does.
pub(crate) const HI: f32 = 89.0;
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO; LN2_HI has few mantissa bits, so `n * LN2_HI` is exact.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes expf polynomial, highest degree first: e^r ~ 1 + r + r^2 * P(r).
pub(crate) const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// The scalar twin: the same steps as the SIMD versions, with separate multiply and add.
#[inline]
pub(crate) fn exp_scalar(x: f32) -> f32 {
    let x = x.clamp(LO, HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    // 2^(n-1): n is in [-126, 128], so the biased exponent n + 126 is in [0, 254].
    let scale = f32::from_bits(((n as i32 + 126) as u32) << 23);
    (y + y) * scale
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{HI, LN2_HI, LN2_LO, LO, LOG2E, P};

    /// Lane-wise [`super::exp_scalar`] on 8 lanes, with FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp_avx2(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e));
        _mm256_mul_ps(_mm256_add_ps(y, y), scale)
    }

    /// Lane-wise [`super::exp_scalar`] on 16 lanes, with FMA.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp_avx512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(126));
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e));
        _mm512_mul_ps(_mm512_add_ps(y, y), scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs: a dense sweep of the whole range plus the edges and specials.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..200_001).map(|i| -100.0 + i as f32 * 0.001).collect();
        v.extend([
            f32::NEG_INFINITY,
            f32::MIN,
            -1e30,
            -200.0,
            -87.5,
            -87.0,
            -86.9,
            -0.0,
            0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-30,
            0.346_573_6, // ln2 / 2, a rounding tie region
            -0.346_573_6,
            88.0,
            88.72,
            88.73,
            100.0,
            f32::MAX,
            f32::INFINITY,
        ]);
        v
    }

    /// Checks one implementation against f64 exp: relative error within `ulps` f32 ulps where
    /// the true result is a normal f32 above 2^-125.5, 0 (or the true value, below 1.7e-38)
    /// further down, +inf above the f32 range.
    fn check(name: &str, f: impl Fn(&[f32]) -> Vec<f32>) {
        let x = inputs();
        let got = f(&x);
        let mut worst = 0.0f64;
        for (&x, &g) in x.iter().zip(&got) {
            let want = (x as f64).exp();
            if want > f32::MAX as f64 {
                assert_eq!(g, f32::INFINITY, "{name}: exp({x})");
            } else if want < 1.7e-38 {
                assert!(
                    g == 0.0 || (g as f64 - want).abs() < 1e-38,
                    "{name}: exp({x}) = {g}"
                );
            } else {
                // One ulp of the true value, relative: 2^-23 at worst.
                let rel = (g as f64 - want).abs() / want / f32::EPSILON as f64;
                worst = worst.max(rel);
                assert!(rel < 2.0, "{name}: exp({x}) = {g}, want {want} ({rel} ulp)");
            }
        }
        assert!(worst > 0.0);
    }

    #[test]
    fn scalar_exp_matches_f64_exp() {
        check("scalar", |x| x.iter().map(|&v| exp_scalar(v)).collect());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_matches_f64_exp() {
        use std::arch::x86_64::*;
        if !crate::SimdPath::Avx2.is_available() {
            return;
        }
        check("avx2", |x| {
            let mut out = vec![0.0f32; x.len().next_multiple_of(8)];
            let mut xs = x.to_vec();
            xs.resize(out.len(), 0.0);
            for (o, c) in out.chunks_exact_mut(8).zip(xs.chunks_exact(8)) {
                // SAFETY: the path is available (AVX2 + FMA checked above); each chunk holds
                // 8 f32s, so the unaligned load and store stay in bounds.
                unsafe {
                    let v = x86::exp_avx2(_mm256_loadu_ps(c.as_ptr()));
                    _mm256_storeu_ps(o.as_mut_ptr(), v);
                }
            }
            out.truncate(x.len());
            out
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_matches_f64_exp() {
        use std::arch::x86_64::*;
        if !crate::SimdPath::Avx512.is_available() {
            return;
        }
        check("avx512", |x| {
            let mut out = vec![0.0f32; x.len().next_multiple_of(16)];
            let mut xs = x.to_vec();
            xs.resize(out.len(), 0.0);
            for (o, c) in out.chunks_exact_mut(16).zip(xs.chunks_exact(16)) {
                // SAFETY: the path is available (AVX-512F checked above); each chunk holds
                // 16 f32s, so the unaligned load and store stay in bounds.
                unsafe {
                    let v = x86::exp_avx512(_mm512_loadu_ps(c.as_ptr()));
                    _mm512_storeu_ps(o.as_mut_ptr(), v);
                }
            }
            out.truncate(x.len());
            out
        });
    }
}
