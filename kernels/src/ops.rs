//! Elementwise and per-row operations of a Llama block: RMSNorm, RoPE, SwiGLU, softmax.

/// `out = x / sqrt(mean(x^2) + eps) * w`, one row. The sum of squares is accumulated in f64 so the
/// norm of a long row does not depend on summation order.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = (1.0 / (ss / x.len().max(1) as f64 + eps as f64).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// Inverse frequencies of RoPE for the rotated pairs: `freq_scale * base^(-2i/dim) / factor_i`,
/// where the factors are Llama 3.1's `rope_freqs` (1 when absent) and `freq_scale` is linear
/// RoPE scaling's `1 / factor` (1 without it; llama.cpp's `freq_scale`, which multiplies the
/// angle). Computed in f64 once per model.
pub fn rope_inv_freqs(
    base: f32,
    rope_dim: usize,
    factors: Option<&[f32]>,
    freq_scale: f32,
) -> Vec<f32> {
    (0..rope_dim / 2)
        .map(|i| {
            let f = (base as f64).powf(-2.0 * i as f64 / rope_dim as f64);
            let factor = factors.and_then(|v| v.get(i)).copied().unwrap_or(1.0) as f64;
            (freq_scale as f64 * f / factor) as f32
        })
        .collect()
}

/// cos and sin of `pos * inv_freq[i]` for every rotated pair, computed in f64 once per position
/// and shared by all heads.
pub fn rope_angles(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let (sn, cs) = (pos as f64 * f as f64).sin_cos();
        *c = cs as f32;
        *s = sn as f32;
    }
}

/// Rotate adjacent pairs (x[2i], x[2i+1]) of one head by the angles of [`rope_angles`]:
/// llama.cpp's layout for the llama architecture (its converter permuted the Q/K rows so this
/// is equivalent to HF's rotate-half). Dimensions past `2 * cos.len()` are left alone.
pub fn rope_rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// [`rope_angles`] then [`rope_rotate`] for one head at `pos`.
pub fn rope_pairs(head: &mut [f32], pos: usize, inv_freq: &[f32]) {
    let n = inv_freq.len();
    let (mut cos, mut sin) = (vec![0.0; n], vec![0.0; n]);
    rope_angles(pos, inv_freq, &mut cos, &mut sin);
    rope_rotate(head, &cos, &sin);
}

/// SwiGLU: `gate = silu(gate) * up`, in place.
///
/// Vectorised on the AVX2 and AVX-512 paths (the attention's polynomial exp, a few ulp from
/// `f32::exp`); in parallel chunks when long (a prompt's whole FFN at once).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: lengths");
    let f = swiglu_fn(crate::simd::simd_path().unwrap_or(crate::SimdPath::Scalar));
    const CHUNK: usize = 1 << 14;
    if gate.len() > 4 * CHUNK {
        crate::pool::for_each_chunk_mut(gate, CHUNK, |i, g| f(g, &up[i * CHUNK..][..g.len()]));
    } else {
        f(gate, up);
    }
}

/// The SwiGLU of `path` (the portable one where the path has none).
pub(crate) fn swiglu_fn(path: crate::SimdPath) -> fn(&mut [f32], &[f32]) {
    #[cfg(target_arch = "x86_64")]
    use crate::SimdPath::*;
    if !path.is_available() {
        return swiglu_scalar;
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        Avx512 | Avx512Vnni => x86::swiglu_avx512,
        #[cfg(target_arch = "x86_64")]
        Avx2 | AvxVnni => x86::swiglu_avx2,
        _ => swiglu_scalar,
    }
}

/// The portable SwiGLU, with `f32::exp`.
pub(crate) fn swiglu_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::attention::exp::x86::{exp_avx2, exp_avx512};

    /// Safe to call only through [`super::swiglu_fn`], which checks the CPU has AVX-512F.
    pub(super) fn swiglu_avx512(gate: &mut [f32], up: &[f32]) {
        // SAFETY: swiglu_fn hands this out only when the AVX-512 path is available.
        unsafe { avx512(gate, up) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let m: __mmask16 = if n - i >= 16 {
                0xFFFF
            } else {
                (1u16 << (n - i)) - 1
            };
            // SAFETY: lanes in m are indices i..min(i + 16, n), inside both slices; masked
            // loads and stores do not touch the other lanes.
            unsafe {
                let g = _mm512_maskz_loadu_ps(m, gate.as_ptr().add(i));
                let u = _mm512_maskz_loadu_ps(m, up.as_ptr().add(i));
                let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
                let r = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
                _mm512_mask_storeu_ps(gate.as_mut_ptr().add(i), m, r);
            }
        }
    }

    /// Safe to call only through [`super::swiglu_fn`], which checks the CPU has AVX2 and FMA.
    pub(super) fn swiglu_avx2(gate: &mut [f32], up: &[f32]) {
        // SAFETY: swiglu_fn hands this out only when an AVX2 path is available.
        unsafe { avx2(gate, up) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let full = n / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 <= full <= n, inside both slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let r = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), r);
            }
        }
        super::swiglu_scalar(&mut gate[full..n], &up[full..n]);
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        for v in x.iter_mut() {
            *v /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_paths_match_the_portable_one() {
        // Inputs across the range that matters, the extremes, and a ragged length.
        let n = 16 * 37 + 5;
        let gate: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2001) as f32 / 10.0 - 100.0)
            .chain([-1e30, 1e30, 0.0, -0.0, f32::MIN_POSITIVE])
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 1.0 + (i % 13) as f32 * 0.25)
            .collect();
        let mut want = gate.clone();
        swiglu_scalar(&mut want, &up);
        for p in crate::SimdPath::available() {
            let mut got = gate.clone();
            swiglu_fn(p)(&mut got, &up);
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                // The polynomial exp is within a few ulp of exp; 1 + e and the division add
                // one rounding each.
                let tol = 8.0 * f32::EPSILON * b.abs() + 1e-30;
                assert!((a - b).abs() <= tol, "{p} [{i}] x={}: {a} vs {b}", gate[i]);
            }
        }
    }

    #[test]
    fn rms_norm_unit_weights_gives_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut out);
        // mean of squares = 50/4 = 12.5
        let s = 1.0 / 12.5f32.sqrt();
        for (o, v) in out.iter().zip(x) {
            assert!((o - v * s).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_by_position_times_frequency() {
        let inv = rope_inv_freqs(10000.0, 4, None, 1.0);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.01).abs() < 1e-9);
        let mut h = [1.0f32, 0.0, 1.0, 0.0];
        rope_pairs(&mut h, 3, &inv);
        assert!((h[0] - 3f32.cos()).abs() < 1e-6 && (h[1] - 3f32.sin()).abs() < 1e-6);
        assert!((h[2] - 0.03f32.cos()).abs() < 1e-6 && (h[3] - 0.03f32.sin()).abs() < 1e-6);
        // Position 0 is the identity.
        let mut z = [0.5f32, -0.25, 2.0, 1.0];
        rope_pairs(&mut z, 0, &inv);
        assert_eq!(z, [0.5, -0.25, 2.0, 1.0]);
    }

    #[test]
    fn rope_factors_divide_frequencies() {
        let inv = rope_inv_freqs(10000.0, 4, Some(&[2.0, 8.0]), 1.0);
        assert_eq!(inv[0], 0.5);
        assert!((inv[1] - 0.01 / 8.0).abs() < 1e-9);
    }

    #[test]
    fn linear_scaling_multiplies_frequencies() {
        // Linear RoPE scaling by 4 (freq_scale 1/4): position 4 turns as far as position 1 did.
        let inv = rope_inv_freqs(10000.0, 4, Some(&[2.0, 8.0]), 0.25);
        assert_eq!(inv[0], 0.125);
        assert!((inv[1] - 0.01 / 32.0).abs() < 1e-9);
    }

    #[test]
    fn swiglu_matches_definition() {
        let mut g = [0.0f32, 1.0, -2.0];
        swiglu(&mut g, &[2.0, 3.0, 4.0]);
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert_eq!(g[0], 0.0);
        assert!((g[1] - silu(1.0) * 3.0).abs() < 1e-6);
        assert!((g[2] - silu(-2.0) * 4.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_is_stable_and_normalised() {
        let mut x = [1000.0f32, 1000.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.5, 0.0]);
    }
}
