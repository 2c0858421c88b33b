//! The formats added with the K-quants (Q5_0, Q5_1, Q2_K..Q6_K): every
//! path's GEMM against the format's super-block twin, bit for bit, on odd
//! shapes and on raw random blocks (every quant, scale and bit pattern);
//! the twins against ggml's generic order and against f64.

use super::kq::{gemm_portable, KqFormat};
use super::*;
use crate::quant::{quantize_row_q8_0, quantize_row_q8_1, quantize_row_q8_k, BlockFormat};
use crate::GgmlType;
use bytemuck::Zeroable;

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| self.f() * scale * (1.0 + (i / 32 % 5) as f32))
            .collect()
    }
}

fn simd_tables() -> Vec<(&'static str, &'static Kernels)> {
    SimdPath::available()
        .into_iter()
        .filter(|&p| p != SimdPath::Scalar)
        .map(|p| (p.name(), kernels_for(p).unwrap()))
        .collect()
}

/// Random bytes for `n` blocks of `B`, with every f16 field in `halves`
/// (byte offsets) set to a finite value in [-2, 2], so the sums stay finite.
fn raw_blocks<B: BlockFormat>(r: &mut Rng, n: usize, halves: &[usize]) -> Vec<B> {
    let mut v = vec![B::zeroed(); n];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
    for b in bytes.iter_mut() {
        *b = r.next() as u8;
    }
    for blk in bytes.chunks_exact_mut(std::mem::size_of::<B>()) {
        for &o in halves {
            let h = crate::quant::float::f32_to_f16(r.f() * 2.0).to_le_bytes();
            blk[o..o + 2].copy_from_slice(&h);
        }
    }
    v
}

/// A format's cases: quantized random weights and raw random blocks.
trait Case: KqFormat {
    /// Byte offsets of the f16 fields.
    const HALVES: &'static [usize];
    /// The super-block twin (the SIMD kernels' order).
    fn twin(x: &[Self], y: &[Self::Act]) -> f32;
    fn quantize_act(x: &[f32], out: &mut [Self::Act]);
    /// Per block: |d_x d_y| sum |q_x q_y| (+ the minimum's term): the scale
    /// of the f32 roundings of any order of the sum.
    fn mag(x: &Self, y: &Self::Act) -> f64;
}

fn mag_k(
    d: f64,
    dy: f64,
    q: impl Fn(usize) -> f64,
    y: &BlockQ8_K,
    sc: impl Fn(usize) -> f64,
) -> f64 {
    (0..256)
        .map(|e| (d * dy * sc(e) * q(e) * y.qs[e] as f64).abs())
        .sum()
}

impl Case for BlockQ4_K {
    const HALVES: &'static [usize] = &[0, 2];
    fn twin(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        scalar::vec_dot_q4_k_q8_k_sb(x, y)
    }
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_K]) {
        quantize_row_q8_k(x, out)
    }
    fn mag(x: &Self, y: &BlockQ8_K) -> f64 {
        let (sc, m) = crate::quant::kquant::scales_mins_k4(&x.scales);
        let a = mag_k(
            x.d() as f64,
            y.d() as f64,
            |e| x.q(e) as f64,
            y,
            |e| sc[e / 32] as f64,
        );
        a + (0..256)
            .map(|e| (x.dmin() as f64 * y.d() as f64 * m[e / 32] as f64 * y.qs[e] as f64).abs())
            .sum::<f64>()
    }
}

impl Case for BlockQ5_K {
    const HALVES: &'static [usize] = &[0, 2];
    fn twin(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        scalar::vec_dot_q5_k_q8_k_sb(x, y)
    }
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_K]) {
        quantize_row_q8_k(x, out)
    }
    fn mag(x: &Self, y: &BlockQ8_K) -> f64 {
        let (sc, m) = crate::quant::kquant::scales_mins_k4(&x.scales);
        let a = mag_k(
            x.d() as f64,
            y.d() as f64,
            |e| x.q(e) as f64,
            y,
            |e| sc[e / 32] as f64,
        );
        a + (0..256)
            .map(|e| (x.dmin() as f64 * y.d() as f64 * m[e / 32] as f64 * y.qs[e] as f64).abs())
            .sum::<f64>()
    }
}

impl Case for BlockQ6_K {
    const HALVES: &'static [usize] = &[208];
    fn twin(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        scalar::vec_dot_q6_k_q8_k_sb(x, y)
    }
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_K]) {
        quantize_row_q8_k(x, out)
    }
    fn mag(x: &Self, y: &BlockQ8_K) -> f64 {
        let q = |e| x.q(e) as f64 - 32.0;
        mag_k(x.d() as f64, y.d() as f64, q, y, |e| {
            x.scales[e / 16] as f64
        })
    }
}

impl Case for BlockQ3_K {
    const HALVES: &'static [usize] = &[108];
    fn twin(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        scalar::vec_dot_q3_k_q8_k_sb(x, y)
    }
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_K]) {
        quantize_row_q8_k(x, out)
    }
    fn mag(x: &Self, y: &BlockQ8_K) -> f64 {
        let q = |e| x.q(e) as f64 - 4.0;
        mag_k(x.d() as f64, y.d() as f64, q, y, |e| {
            x.scale(e / 16) as f64 - 32.0
        })
    }
}

impl Case for BlockQ2_K {
    const HALVES: &'static [usize] = &[80, 82];
    fn twin(x: &[Self], y: &[BlockQ8_K]) -> f32 {
        scalar::vec_dot_q2_k_q8_k(x, y)
    }
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_K]) {
        quantize_row_q8_k(x, out)
    }
    fn mag(x: &Self, y: &BlockQ8_K) -> f64 {
        let sc = |e: usize| (x.scales[e / 16] & 0xF) as f64;
        let a = mag_k(x.d() as f64, y.d() as f64, |e| x.q(e) as f64, y, sc);
        a + (0..256)
            .map(|e| {
                let m = (x.scales[e / 16] >> 4) as f64;
                (x.dmin() as f64 * y.d() as f64 * m * y.qs[e] as f64).abs()
            })
            .sum::<f64>()
    }
}

impl Case for BlockQ5_0 {
    const HALVES: &'static [usize] = &[0];
    fn twin(x: &[Self], y: &[BlockQ8_0]) -> f32 {
        scalar::vec_dot_q5_0_q8_0(x, y)
    }
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_0]) {
        quantize_row_q8_0(x, out)
    }
    fn mag(x: &Self, y: &BlockQ8_0) -> f64 {
        let d = x.d() as f64 * y.d() as f64;
        (0..32)
            .map(|e| (d * (x.q(e) as f64 - 16.0) * y.qs[e] as f64).abs())
            .sum()
    }
}

impl Case for BlockQ5_1 {
    const HALVES: &'static [usize] = &[0, 2];
    fn twin(x: &[Self], y: &[BlockQ8_1]) -> f32 {
        scalar::vec_dot_q5_1_q8_1(x, y)
    }
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_1]) {
        quantize_row_q8_1(x, out)
    }
    fn mag(x: &Self, y: &BlockQ8_1) -> f64 {
        let d = x.d() as f64 * y.d() as f64;
        let a: f64 = (0..32)
            .map(|e| (d * x.q(e) as f64 * y.qs[e] as f64).abs())
            .sum();
        a + (x.m() as f64 * y.s() as f64).abs()
    }
}

/// `out[t * rows + r]` by the twin, one dot per output.
fn twin_gemm<F: Case>(w: &[F], a: &[F::Act], k: usize) -> Vec<f32> {
    let (rows, n) = (w.len() / k, a.len() / k);
    let mut out = vec![0f32; rows * n];
    for t in 0..n {
        for r in 0..rows {
            out[t * rows + r] = F::twin(&w[r * k..][..k], &a[t * k..][..k]);
        }
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every path (and the generic body on portable vectors) gives the twin's
/// bits, on quantized and on raw random weights, for every tile shape.
fn check_format<F: Case>(name: &str, weight_shift: f32) {
    let tables = simd_tables();
    let mut seed = 100;
    for rows in [1, 3, 9] {
        for n in [1, 2, 4, 5, 9] {
            for k in [1, 2, 5] {
                seed += 1;
                let mut r = Rng::new(seed);
                let len = k * F::BLOCK;
                let wf: Vec<f32> = r
                    .vec(rows * len, 1.0)
                    .iter()
                    .map(|v| v + weight_shift)
                    .collect();
                let mut quantized = vec![F::zeroed(); rows * k];
                F::quantize_row(&wf, &mut quantized);
                let raw = raw_blocks::<F>(&mut r, rows * k, F::HALVES);
                let mut a = vec![<F::Act as Zeroable>::zeroed(); n * k];
                F::quantize_act(&r.vec(n * len, 3.0), &mut a);
                for w in [&quantized, &raw] {
                    let want = twin_gemm(w, &a, k);
                    assert!(want.iter().all(|v| v.is_finite()), "{name}");
                    let mut got = vec![f32::NAN; rows * n];
                    gemm_portable(w, &a, k, &mut got);
                    assert_eq!(bits(&got), bits(&want), "{name} portable {rows}x{n}x{k}");
                    for &(path, ks) in &tables {
                        let mut got = vec![f32::NAN; rows * n];
                        (F::gemm(ks))(w, &a, k, &mut got);
                        assert_eq!(bits(&got), bits(&want), "{name} {path} {rows}x{n}x{k}");
                    }
                    // And through the scalar path's table: ggml's generic
                    // order, within rounding of the twin.
                    let mut generic = vec![f32::NAN; rows * n];
                    (F::gemm(&SCALAR))(w, &a, k, &mut generic);
                    for t in 0..n {
                        for rr in 0..rows {
                            let i = t * rows + rr;
                            let mag: f64 =
                                (0..k).map(|b| F::mag(&w[rr * k + b], &a[t * k + b])).sum();
                            let tol = 2.0 * (k as f64 + 10.0) * 2f64.powi(-24) * mag + 1e-30;
                            let (g, t_) = (generic[i] as f64, want[i] as f64);
                            assert!((g - t_).abs() <= tol, "{name} scalar path {g} vs twin {t_}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn q4_k_gemms_give_the_twin_bits() {
    check_format::<BlockQ4_K>("q4_K", 0.2);
}

#[test]
fn q5_k_gemms_give_the_twin_bits() {
    check_format::<BlockQ5_K>("q5_K", 0.2);
}

#[test]
fn q6_k_gemms_give_the_twin_bits() {
    check_format::<BlockQ6_K>("q6_K", 0.0);
}

#[test]
fn q3_k_gemms_give_the_twin_bits() {
    check_format::<BlockQ3_K>("q3_K", 0.0);
}

#[test]
fn q2_k_gemms_give_the_twin_bits() {
    check_format::<BlockQ2_K>("q2_K", 0.2);
}

#[test]
fn q5_0_gemms_give_the_twin_bits() {
    check_format::<BlockQ5_0>("q5_0", 0.0);
}

#[test]
fn q5_1_gemms_give_the_twin_bits() {
    check_format::<BlockQ5_1>("q5_1", 0.3);
}

/// The twins against the exact dot of the dequantized values (f64): the
/// integer sums and the block terms are right, not merely consistent.
#[test]
fn twins_match_the_dequantized_dot_in_f64() {
    fn check<F: Case>(name: &str) {
        let mut r = Rng::new(7);
        for k in [1, 3, 8] {
            let len = k * F::BLOCK;
            let mut w = vec![F::zeroed(); k];
            F::quantize_row(&r.vec(len, 1.0), &mut w);
            let mut a = vec![<F::Act as Zeroable>::zeroed(); k];
            F::quantize_act(&r.vec(len, 2.0), &mut a);
            let (mut xw, mut xa) = (vec![0f32; len], vec![0f32; len]);
            F::dequantize_row(&w, &mut xw);
            <F::Act as BlockFormat>::dequantize_row(&a, &mut xa);
            let exact: f64 = xw.iter().zip(&xa).map(|(p, q)| *p as f64 * *q as f64).sum();
            let mag: f64 = (0..k).map(|b| F::mag(&w[b], &a[b])).sum();
            // Dequantized values carry one f32 rounding each (d * sc * q - m),
            // plus the sums' roundings. Q8_1's s is d * sum(q) before d is
            // rounded to f16, which Q5_1's term uses: half an f16 ulp more.
            let s_err = if F::TYPE == GgmlType::Q5_1 {
                2f64.powi(-10)
            } else {
                0.0
            };
            let tol = (k as f64 + 16.0) * 2f64.powi(-22) * mag + s_err * mag;
            for got in [F::twin(&w, &a) as f64, F::vec_dot(&w, &a) as f64] {
                assert!(
                    (got - exact).abs() <= tol + 1e-30,
                    "{name} k {k}: {got} vs {exact}"
                );
            }
        }
    }
    check::<BlockQ2_K>("q2_K");
    check::<BlockQ3_K>("q3_K");
    check::<BlockQ4_K>("q4_K");
    check::<BlockQ5_K>("q5_K");
    check::<BlockQ6_K>("q6_K");
    check::<BlockQ5_0>("q5_0");
    check::<BlockQ5_1>("q5_1");
}

/// Extreme quants: every weight at its largest magnitude against activations
/// of +-127 (Q6_K scale -128, Q3_K scale -32, Q4_K scale 63): the integer
/// sums stay exact on every path (`vpmaddubsw` pairs do not saturate).
#[test]
fn extreme_quants_stay_exact() {
    let mut y = [BlockQ8_K::zeroed(); 1];
    y[0].d = 1.0f32.to_le_bytes();
    for (e, q) in y[0].qs.iter_mut().enumerate() {
        *q = if e % 3 == 0 { -127 } else { 127 };
    }
    for j in 0..16 {
        let s: i32 = y[0].qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
        y[0].bsums[j] = (s as i16).to_le_bytes();
    }
    let mut q6 = [BlockQ6_K::zeroed()];
    q6[0].ql = [0xFF; 128];
    q6[0].qh = [0x00; 64]; // every quant 15 -> value -17; make half 63 below
    q6[0].qh[..32].fill(0xFF); // first half: 63 -> value 31
    q6[0].scales = [-128; 16];
    q6[0].d = [0x00, 0x3C];
    let mut q4 = [BlockQ4_K::zeroed()];
    q4[0].qs = [0xFF; 128];
    q4[0].scales = crate::quant::kquant::pack_scale_min_k4(&[63; 8], &[63; 8]);
    q4[0].d = [0x00, 0x3C];
    q4[0].dmin = [0x00, 0x3C];
    let mut q3 = [BlockQ3_K::zeroed()];
    q3[0].d = [0x00, 0x3C]; // scales 0 -> multiplier -32; quants 0 -> value -4
    for &(path, ks) in &simd_tables() {
        let mut o = [0f32];
        (ks.q6_k)(&q6, &y, 1, &mut o);
        assert_eq!(o[0], scalar::vec_dot_q6_k_q8_k_sb(&q6, &y), "{path} q6_K");
        (ks.q4_k)(&q4, &y, 1, &mut o);
        assert_eq!(o[0], scalar::vec_dot_q4_k_q8_k_sb(&q4, &y), "{path} q4_K");
        (ks.q3_k)(&q3, &y, 1, &mut o);
        assert_eq!(o[0], scalar::vec_dot_q3_k_q8_k_sb(&q3, &y), "{path} q3_K");
    }
    // The values themselves, worked by hand: Q3_K = -32 * -4 * sum(y).
    let sum_y: i32 = y[0].qs.iter().map(|&q| q as i32).sum();
    assert_eq!(scalar::vec_dot_q3_k_q8_k_sb(&q3, &y), (128 * sum_y) as f32);
}
