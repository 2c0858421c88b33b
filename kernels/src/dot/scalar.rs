//! Portable reference dot products.
//!
//! Quantized dots follow ggml's `ggml_vec_dot_*_generic` (ggml-cpu/quants.c)
//! operation for operation: an exact i32 sum of quant products per block,
//! then one f32 multiply-add per block in the same association order, so
//! results match ggml's generic path bit for bit (barring the C compiler
//! contracting to FMA). Float dots accumulate f32 products in 16
//! independent f32 lanes so the compiler vectorises them; ggml's generic
//! float dots use a double accumulator instead, so those are close, not
//! bit-identical.

use crate::quant::float::{bf16_to_f32, f16_to_f32, Bf16Bytes, F16Bytes, F32Bytes};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

// The newer formats keep their scalar dot products next to their block
// structs; these are the same functions.
pub use crate::quant::q2_k::vec_dot_q2_k_q8_k;
pub use crate::quant::q3_k::{vec_dot_q3_k_q8_k, vec_dot_q3_k_q8_k_sb};
pub use crate::quant::q4_k::{vec_dot_q4_k_q8_k, vec_dot_q4_k_q8_k_sb};
pub use crate::quant::q5_0::vec_dot_q5_0_q8_0;
pub use crate::quant::q5_1::vec_dot_q5_1_q8_1;
pub use crate::quant::q5_k::{vec_dot_q5_k_q8_k, vec_dot_q5_k_q8_k_sb};
pub use crate::quant::q6_k::{vec_dot_q6_k_q8_k, vec_dot_q6_k_q8_k_sb};

pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (y_lo, y_hi) = by.qs.split_at(16);
        let mut sumi = 0i32;
        for ((&q, &a), &b) in bx.qs.iter().zip(y_lo).zip(y_hi) {
            let v0 = (q & 0x0F) as i32 - 8;
            let v1 = (q >> 4) as i32 - 8;
            sumi += v0 * a as i32 + v1 * b as i32;
        }
        // ggml: sumi*dx*dy, evaluated left to right.
        sumf += sumi as f32 * bx.d() * by.d();
    }
    sumf
}

pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (y_lo, y_hi) = by.qs.split_at(16);
        let mut sumi = 0i32;
        for ((&q, &a), &b) in bx.qs.iter().zip(y_lo).zip(y_hi) {
            sumi += (q & 0x0F) as i32 * a as i32 + (q >> 4) as i32 * b as i32;
        }
        // sum((d_x q_x + m_x) d_y q_y) = d_x d_y sumi + m_x (d_y sum q_y),
        // and the activation block carries s = d_y sum(q_y).
        sumf += (bx.d() * by.d()) * sumi as f32 + bx.m() * by.s();
    }
    sumf
}

pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len(), "block counts");
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for (&a, &b) in bx.qs.iter().zip(&by.qs) {
            sumi += a as i32 * b as i32;
        }
        sumf += sumi as f32 * (bx.d() * by.d());
    }
    sumf
}

const LANES: usize = 16;

/// sum(fa(x[i]) * fb(y[i])) in LANES f32 accumulators, lanes added in order
/// at the end, then the tail.
#[inline(always)]
fn lane_dot<A: Copy, B: Copy>(
    x: &[A],
    y: &[B],
    fa: impl Fn(A) -> f32,
    fb: impl Fn(B) -> f32,
) -> f32 {
    assert_eq!(x.len(), y.len(), "vector lengths");
    let mut acc = [0.0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let yc = y.chunks_exact(LANES);
    let (xt, yt) = (xc.remainder(), yc.remainder());
    for (xs, ys) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += fa(xs[l]) * fb(ys[l]);
        }
    }
    let mut tail = 0.0f32;
    for (&a, &b) in xt.iter().zip(yt) {
        tail += fa(a) * fb(b);
    }
    acc.iter().sum::<f32>() + tail
}

#[inline]
fn f16le(b: F16Bytes) -> f32 {
    f16_to_f32(u16::from_le_bytes(b))
}

#[inline]
fn bf16le(b: Bf16Bytes) -> f32 {
    bf16_to_f32(u16::from_le_bytes(b))
}

pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    lane_dot(x, y, |a| a, |b| b)
}

pub fn vec_dot_f32_le(x: &[F32Bytes], y: &[f32]) -> f32 {
    lane_dot(x, y, f32::from_le_bytes, |b| b)
}

pub fn vec_dot_f16(x: &[F16Bytes], y: &[F16Bytes]) -> f32 {
    lane_dot(x, y, f16le, f16le)
}

pub fn vec_dot_f16_f32(x: &[F16Bytes], y: &[f32]) -> f32 {
    lane_dot(x, y, f16le, |b| b)
}

pub fn vec_dot_bf16(x: &[Bf16Bytes], y: &[Bf16Bytes]) -> f32 {
    lane_dot(x, y, bf16le, bf16le)
}

pub fn vec_dot_bf16_f32(x: &[Bf16Bytes], y: &[f32]) -> f32 {
    lane_dot(x, y, bf16le, |b| b)
}

/// f32 . f32 with f64 products and f64 accumulation: the exact path's dot.
/// Products of two f32 are exact in f64, so the only error is the f64
/// summation, at most about n * 2^-53 * sum|x y|. Sixteen lane sums, added
/// in lane order at the end: compiled for AVX2 (`dot::vec_dot_f32_f64acc`)
/// the lanes become four 4-wide f64 registers and each sum still sees its
/// products in the same order, so every CPU gets these bits.
#[inline(always)]
pub fn vec_dot_f32_f64acc(x: &[f32], y: &[f32]) -> f64 {
    assert_eq!(x.len(), y.len(), "vector lengths");
    const LANES: usize = 16;
    let mut acc = [0.0f64; LANES];
    let xc = x.chunks_exact(LANES);
    let yc = y.chunks_exact(LANES);
    let (xt, yt) = (xc.remainder(), yc.remainder());
    for (xs, ys) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += xs[l] as f64 * ys[l] as f64;
        }
    }
    let mut tail = 0.0f64;
    for (&a, &b) in xt.iter().zip(yt) {
        tail += a as f64 * b as f64;
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{
        quantize_row_q4_0, quantize_row_q4_1, quantize_row_q8_0, quantize_row_q8_1,
    };
    use bytemuck::Zeroable;
    use proptest::prelude::*;

    const U: f64 = 1.0 / (1u64 << 24) as f64; // f32 unit roundoff, 2^-24

    #[test]
    fn q4_0_q8_0_hand_worked() {
        // Every weight nibble 9 -> value (9 - 8) * 1 = 1; activations q = j
        // with d = 1: sum over j of j = 496.
        let x = BlockQ4_0 {
            d: [0x00, 0x3C],
            qs: [0x99; 16],
        };
        let mut qs = [0i8; 32];
        for (j, q) in qs.iter_mut().enumerate() {
            *q = j as i8;
        }
        let y = BlockQ8_0 {
            d: [0x00, 0x3C],
            qs,
        };
        assert_eq!(vec_dot_q4_0_q8_0(&[x], &[y]), 496.0);
        // Scales multiply in: d_x = 2 (0x4000), d_y = -0.5 (0xB800).
        let x2 = BlockQ4_0 {
            d: [0x00, 0x40],
            ..x
        };
        let y2 = BlockQ8_0 {
            d: [0x00, 0xB8],
            ..y
        };
        assert_eq!(vec_dot_q4_0_q8_0(&[x, x2], &[y, y2]), 496.0 - 496.0);
        // Q8_0 . Q8_0 with the same activations: sum of j^2 = 10416.
        let yy = vec_dot_q8_0_q8_0(&[y], &[y]);
        assert_eq!(yy, 10416.0);
    }

    #[test]
    fn q4_1_q8_1_hand_worked() {
        // Weights: d = 1, m = 2, nibbles 1 -> every value 3. Activations:
        // d = 0.5 (0x3800), q = 2 -> every value 1, s = 0.5 * 64 = 32
        // (0x5000). Dot = 32 * 3 = 96 = (1 * 0.5) * 64 + 2 * 32.
        let x = BlockQ4_1 {
            d: [0x00, 0x3C],
            m: [0x00, 0x40],
            qs: [0x11; 16],
        };
        let y = BlockQ8_1 {
            d: [0x00, 0x38],
            s: [0x00, 0x50],
            qs: [2; 32],
        };
        assert_eq!(vec_dot_q4_1_q8_1(&[x], &[y]), 96.0);
        // The minimum term uses the stored s, not d * sum(q): a wrong s
        // changes the result.
        let y_bad_s = BlockQ8_1 {
            s: [0x00, 0x00],
            ..y
        };
        assert_eq!(vec_dot_q4_1_q8_1(&[x], &[y_bad_s]), 32.0);
    }

    #[test]
    fn float_dots_hand_worked() {
        // 37 elements: two full 16-lane chunks and a tail of 5.
        let x: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let y = vec![0.5f32; 37];
        let want = 0.5 * (36.0 * 37.0 / 2.0);
        assert_eq!(vec_dot_f32(&x, &y), want);
        let xb: Vec<F32Bytes> = x.iter().map(|v| v.to_le_bytes()).collect();
        assert_eq!(vec_dot_f32_le(&xb, &y), want);
        // Small integers are exact in f16 and bf16.
        let xh: Vec<F16Bytes> = x
            .iter()
            .map(|&v| crate::quant::float::f32_to_f16(v).to_le_bytes())
            .collect();
        let yh: Vec<F16Bytes> = y
            .iter()
            .map(|&v| crate::quant::float::f32_to_f16(v).to_le_bytes())
            .collect();
        assert_eq!(vec_dot_f16(&xh, &yh), want);
        assert_eq!(vec_dot_f16_f32(&xh, &y), want);
        let xbf: Vec<Bf16Bytes> = x
            .iter()
            .map(|&v| crate::quant::float::f32_to_bf16(v).to_le_bytes())
            .collect();
        let ybf: Vec<Bf16Bytes> = y
            .iter()
            .map(|&v| crate::quant::float::f32_to_bf16(v).to_le_bytes())
            .collect();
        assert_eq!(vec_dot_bf16(&xbf, &ybf), want);
        assert_eq!(vec_dot_bf16_f32(&xbf, &y), want);
        assert_eq!(vec_dot_f32_f64acc(&x, &y), want as f64);
        assert_eq!(vec_dot_f32(&[], &[]), 0.0);
    }

    fn vecs(max_blocks: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (1..=max_blocks, -2.0f64..3.0, -2.0f64..3.0).prop_flat_map(|(nb, ex, ey)| {
            let (sx, sy) = (10f64.powf(ex) as f32, 10f64.powf(ey) as f32);
            (
                prop::collection::vec(-1.0f32..=1.0, nb * 32)
                    .prop_map(move |v| v.into_iter().map(|u| u * sx).collect()),
                prop::collection::vec(-1.0f32..=1.0, nb * 32)
                    .prop_map(move |v| v.into_iter().map(|u| u * sy).collect()),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Per block, sumi is exact and sumi*dx*dy is rounded twice; the
        /// running f32 sum over nb blocks adds at most nb roundings. So
        /// |dot - exact| <= (nb + 2) u sum_b |sumi dx dy| with u = 2^-24
        /// (first-order bound). "exact" is the f64 dot of the dequantized
        /// values, which is exact here (f16 * f16 * i32 fits in f64).
        #[test]
        fn q4_0_and_q8_0_dots_match_f64((x, y) in vecs(8)) {
            let nb = x.len() / 32;
            let mut wx = vec![BlockQ4_0::zeroed(); nb];
            let mut w8 = vec![BlockQ8_0::zeroed(); nb];
            let mut a8 = vec![BlockQ8_0::zeroed(); nb];
            quantize_row_q4_0(&x, &mut wx);
            quantize_row_q8_0(&x, &mut w8);
            quantize_row_q8_0(&y, &mut a8);
            let mut exact = 0f64;
            let mut mag = 0f64;
            let mut exact8 = 0f64;
            let mut mag8 = 0f64;
            for b in 0..nb {
                let dy = a8[b].d() as f64;
                let mut s = 0f64;
                let mut s8 = 0f64;
                for j in 0..32 {
                    let nib = if j < 16 { wx[b].qs[j] & 15 } else { wx[b].qs[j - 16] >> 4 };
                    let qy = a8[b].qs[j] as f64;
                    s += (nib as f64 - 8.0) * wx[b].d() as f64 * qy * dy;
                    s8 += w8[b].qs[j] as f64 * w8[b].d() as f64 * qy * dy;
                }
                exact += s;
                mag += s.abs();
                exact8 += s8;
                mag8 += s8.abs();
            }
            let got = vec_dot_q4_0_q8_0(&wx, &a8) as f64;
            prop_assert!((got - exact).abs() <= (nb as f64 + 2.0) * U * mag + 1e-30,
                "q4_0: {got} vs {exact}");
            let got8 = vec_dot_q8_0_q8_0(&w8, &a8) as f64;
            prop_assert!((got8 - exact8).abs() <= (nb as f64 + 2.0) * U * mag8 + 1e-30,
                "q8_0: {got8} vs {exact8}");
        }

        /// Q4_1 uses the stored s = f16(d32 * sum q) for the minimum term
        /// instead of d16 * sum q, which adds per block at most
        /// |m| (half an f16 ulp of s + |sum q| |d32 - d16|), with
        /// |d32 - d16| <= 2^-11 d16 + 2^-25, on top of the f32 rounding
        /// bound (nb + 4) u sum_b (|dx dy sumi| + |m s|).
        #[test]
        fn q4_1_dot_matches_f64((x, y) in vecs(8), off in -5.0f32..5.0) {
            let x: Vec<f32> = x.iter().map(|v| v + off).collect();
            let nb = x.len() / 32;
            let mut wx = vec![BlockQ4_1::zeroed(); nb];
            let mut ay = vec![BlockQ8_1::zeroed(); nb];
            quantize_row_q4_1(&x, &mut wx);
            quantize_row_q8_1(&y, &mut ay);
            let (mut exact, mut bound) = (0f64, 0f64);
            for b in 0..nb {
                let (dx, m, dy, s) =
                    (wx[b].d() as f64, wx[b].m() as f64, ay[b].d() as f64, ay[b].s() as f64);
                let mut sumi = 0f64;
                let mut sumq = 0f64;
                for j in 0..32 {
                    let nib = if j < 16 { wx[b].qs[j] & 15 } else { wx[b].qs[j - 16] >> 4 };
                    let qy = ay[b].qs[j] as f64;
                    exact += (nib as f64 * dx + m) * (qy * dy);
                    sumi += nib as f64 * qy;
                    sumq += qy;
                }
                let f16_half_ulp = |v: f64| (v.abs() * 2f64.powi(-11)).max(2f64.powi(-25));
                bound += m.abs() * (f16_half_ulp(s) + sumq.abs() * f16_half_ulp(dy));
                bound += (nb as f64 + 4.0) * U * ((dx * dy * sumi).abs() + (m * s).abs());
            }
            let got = vec_dot_q4_1_q8_1(&wx, &ay) as f64;
            prop_assert!((got - exact).abs() <= bound + 1e-30, "{got} vs {exact}, bound {bound}");
        }

        /// Any summation order of n f32 products has error <= (n + 1) u sum|x y|
        /// (first order); f16/bf16 products of stored values are exact in f32.
        #[test]
        fn float_dots_match_f64((x, y) in vecs(4), len_cut in 0usize..32) {
            let n = x.len() - len_cut;
            let (x, y) = (&x[..n], &y[..n]);
            let check = |got: f32, a: &[f32], b: &[f32]| {
                let exact: f64 = a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum();
                let mag: f64 = a.iter().zip(b).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
                ((got as f64) - exact).abs() <= (n as f64 + 1.0) * U * mag + 1e-30
            };
            prop_assert!(check(vec_dot_f32(x, y), x, y));
            let xb: Vec<F32Bytes> = x.iter().map(|v| v.to_le_bytes()).collect();
            prop_assert!(check(vec_dot_f32_le(&xb, y), x, y));
            let h = |v: &[f32]| -> Vec<F16Bytes> {
                v.iter().map(|&a| crate::quant::float::f32_to_f16(a).to_le_bytes()).collect()
            };
            let bf = |v: &[f32]| -> Vec<Bf16Bytes> {
                v.iter().map(|&a| crate::quant::float::f32_to_bf16(a).to_le_bytes()).collect()
            };
            let back_h = |v: &[F16Bytes]| -> Vec<f32> { v.iter().map(|&b| f16le(b)).collect() };
            let back_bf = |v: &[Bf16Bytes]| -> Vec<f32> { v.iter().map(|&b| bf16le(b)).collect() };
            let (xh, yh, xbf, ybf) = (h(x), h(y), bf(x), bf(y));
            prop_assert!(check(vec_dot_f16(&xh, &yh), &back_h(&xh), &back_h(&yh)));
            prop_assert!(check(vec_dot_f16_f32(&xh, y), &back_h(&xh), y));
            prop_assert!(check(vec_dot_bf16(&xbf, &ybf), &back_bf(&xbf), &back_bf(&ybf)));
            prop_assert!(check(vec_dot_bf16_f32(&xbf, y), &back_bf(&xbf), y));
            let exact: f64 = x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum();
            let mag: f64 = x.iter().zip(y).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
            prop_assert!((vec_dot_f32_f64acc(x, y) - exact).abs() <= mag * 1e-14);
        }
    }
}
