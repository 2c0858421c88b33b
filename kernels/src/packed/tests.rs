//! Packed matmul against the file-layout reference and its scalar twin, on
//! shapes that are not whole groups or tiles. What could be wrong: the
//! scatter into lanes and chunks, the nibble order, the Q4_0/Q4_1/Q8_0
//! corrections, masked stores of a partial group, token tiling, chunking.

use super::*;
use crate::quant::{dequantize_row, quantize_row};
use crate::test_util::values;

struct Case {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    x: Vec<f32>,
}

impl Case {
    fn new(ty: GgmlType, rows: usize, cols: usize, n: usize, seed: u64) -> Case {
        let w = values(rows * cols, seed);
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut data = vec![0u8; rows * rb];
        for (dst, src) in data.chunks_exact_mut(rb).zip(w.chunks_exact(cols)) {
            quantize_row(ty, src, dst).unwrap();
        }
        // Magnitudes that vary from block to block, so scales matter.
        let x = values(n * cols, seed ^ 0x5EED)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i / 32 % 7) as f32 * 2.5))
            .collect();
        Case {
            ty,
            rows,
            cols,
            data,
            x,
        }
    }

    fn view(&self) -> WeightView<'_> {
        WeightView {
            ty: self.ty,
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
        }
    }

    fn n(&self) -> usize {
        self.x.len() / self.cols
    }

    /// (f64 dot of the dequantized weights and the dequantized Q8_0
    /// activations, sum of |products|) per output, [token][row].
    fn reference(&self) -> Vec<(f64, f64)> {
        let mut w = vec![0f32; self.rows * self.cols];
        dequantize_row(self.ty, &self.data, &mut w).unwrap();
        let mut xq = vec![0f32; self.x.len()];
        let mut y1 = vec![BlockQ8_1::zeroed(); self.x.len() / 32];
        if self.ty == GgmlType::Q4_1 {
            quant::quantize_row_q8_1(&self.x, &mut y1);
            quant::dequantize_row_q8_1(&y1, &mut xq);
        } else {
            let mut blocks = vec![BlockQ8_0::zeroed(); self.x.len() / 32];
            quant::quantize_row_q8_0(&self.x, &mut blocks);
            quant::dequantize_row_q8_0(&blocks, &mut xq);
        }
        let k = self.cols / 32;
        let mut out = Vec::new();
        for (t, xt) in xq.chunks_exact(self.cols).enumerate() {
            for (r, wr) in w.chunks_exact(self.cols).enumerate() {
                let (mut s, mut a) = (0f64, 0f64);
                for (p, q) in wr.iter().zip(xt) {
                    s += *p as f64 * *q as f64;
                    a += (*p as f64 * *q as f64).abs();
                }
                if self.ty == GgmlType::Q4_1 {
                    // The kernels use the Q8_1 block's stored s (an f16 of d * sum(q) taken
                    // before d was rounded), as ggml does, not d * sum(q) itself.
                    let wb: &[BlockQ4_1] = bytemuck::cast_slice(&self.data);
                    for b in 0..k {
                        let (m, yb) = (quant::scale(wb[r * k + b].m) as f64, &y1[t * k + b]);
                        let sum_q: i32 = yb.qs.iter().map(|&v| v as i32).sum();
                        let exact = quant::scale(yb.d) as f64 * sum_q as f64;
                        s += m * (quant::scale(yb.s) as f64 - exact);
                        a += (m * quant::scale(yb.s) as f64).abs();
                    }
                }
                out.push((s, a));
            }
        }
        out
    }

    fn run(&self, ks: &'static PackedKernels, chunk: usize) -> (Vec<f32>, Tiles) {
        let p = PackedWeights::pack(&self.view(), ks).unwrap();
        let mut y = vec![f32::NAN; self.n() * self.rows];
        let mut s = PackedScratch::default();
        let tiles = matmul_packed_chunked(&p, &self.x, self.n(), &mut y, &mut s, chunk).unwrap();
        (y, tiles)
    }
}

/// Every packed path this CPU has, with the scalar twin first.
fn paths() -> Vec<&'static PackedKernels> {
    let mut v = vec![&SCALAR];
    v.extend(
        SimdPath::available()
            .into_iter()
            .filter_map(packed_kernels_for),
    );
    v
}

const TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

const SHAPES: [(usize, usize); 6] = [(1, 32), (5, 96), (16, 64), (17, 320), (40, 32), (67, 160)];

#[test]
fn packed_matches_f64_reference_within_rounding() {
    for ty in TYPES {
        for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
            for n in [1, 3, 4, 9] {
                let c = Case::new(ty, rows, cols, n, 7 + i as u64 * 31 + n as u64);
                let want = c.reference();
                for ks in paths() {
                    let (y, _) = c.run(ks, GROUP_ROWS);
                    for (o, (&got, &(s, a))) in y.iter().zip(&want).enumerate() {
                        // Each block's integer sum is exact; what remains is one f32 product
                        // and one fused add per block, each off by at most 2^-24 of the
                        // running magnitude, which the sum of |products| bounds.
                        let nb = (cols / 32) as f64;
                        let bound = (2.0 * nb + 2.0) * a * f64::powi(2.0, -24) + 1e-30;
                        assert!(
                            (got as f64 - s).abs() <= bound,
                            "{ty:?} {rows}x{cols} n={n} {:?} out {o}: {got} vs {s} (bound {bound})",
                            ks.path
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn simd_paths_agree_with_the_scalar_twin_bit_for_bit() {
    for ty in TYPES {
        for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
            for n in [1, 2, 5, 8, 11] {
                let c = Case::new(ty, rows, cols, n, 100 + i as u64 + n as u64 * 7);
                let (want, _) = c.run(&SCALAR, 16);
                for ks in paths().into_iter().skip(1) {
                    // Chunks of one group, and of several, must not change a bit.
                    for chunk in [16, 32, 64] {
                        let (got, _) = c.run(ks, chunk);
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{ty:?} {rows}x{cols} n={n} chunk={chunk} {:?}",
                            ks.path
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_token_gets_the_same_bits_alone_or_in_a_batch() {
    for ks in paths() {
        let c = Case::new(GgmlType::Q4_0, 35, 96, 7, 3);
        let (batch, _) = c.run(ks, 16);
        for t in 0..7 {
            let one = Case {
                x: c.x[t * 96..(t + 1) * 96].to_vec(),
                data: c.data.clone(),
                ..c
            };
            let (y, _) = one.run(ks, 16);
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                batch[t * 35..(t + 1) * 35]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{:?} token {t}",
                ks.path
            );
        }
    }
}

#[test]
fn a_batch_takes_full_tiles_on_ragged_shapes() {
    #[cfg(target_arch = "x86_64")]
    if SimdPath::Avx512Vnni.is_available() {
        assert_eq!(paths().len(), 2, "AVX-512 VNNI has packed kernels");
    }
    for ks in paths().into_iter().skip(1) {
        // 37 rows = groups of 16, 16 and 5; 7 tokens = a tile of 4 and one of 3.
        let c = Case::new(GgmlType::Q8_0, 37, 64, 7, 11);
        let (_, tiles) = c.run(ks, 48);
        assert_eq!(tiles, Tiles { full: 2, edge: 4 }, "{:?}", ks.path);
    }
}

#[test]
fn q8_0_weights_of_minus_128_are_exact() {
    // No ggml quantizer writes -128, but a file may hold it; the y + 128 form
    // and the correction must still give the exact integer sum.
    let mut c = Case::new(GgmlType::Q8_0, 18, 64, 2, 5);
    for blk in c.data.chunks_exact_mut(34) {
        blk[2] = 0x80;
        blk[33] = 0x80;
    }
    let want = c.reference();
    for ks in paths() {
        let (y, _) = c.run(ks, 16);
        for (&got, &(s, a)) in y.iter().zip(&want) {
            assert!((got as f64 - s).abs() <= 8.0 * a * f64::powi(2.0, -24) + 1e-30);
        }
    }
}

#[test]
fn packed_memory_is_the_tensor_plus_padding() {
    let c = Case::new(GgmlType::Q4_0, 40, 320, 1, 1);
    let p = PackedWeights::pack(&c.view(), &SCALAR).unwrap();
    // 3 groups of 10 blocks x 288 bytes, each padded to 2880 (a multiple of 64).
    assert_eq!(p.n_bytes(), 3 * 2880);
    assert!(p.n_bytes() >= c.data.len());
}

#[test]
fn bad_inputs_are_errors() {
    let c = Case::new(GgmlType::F16, 4, 64, 1, 1);
    assert!(matches!(
        PackedWeights::pack(&c.view(), &SCALAR),
        Err(KernelError::Unsupported { .. })
    ));
    let c = Case::new(GgmlType::Q4_0, 4, 64, 1, 1);
    let short = WeightView {
        data: &c.data[..c.data.len() - 1],
        ..c.view()
    };
    assert!(PackedWeights::pack(&short, &SCALAR).is_err());
    let odd = WeightView {
        cols: 60,
        ..c.view()
    };
    assert!(PackedWeights::pack(&odd, &SCALAR).is_err());
    let p = PackedWeights::pack(&c.view(), &SCALAR).unwrap();
    let mut s = PackedScratch::default();
    let mut y = vec![0f32; 4];
    assert!(matmul_packed(&p, &c.x[..63], 1, &mut y, &mut s).is_err());
    assert!(matmul_packed(&p, &c.x, 1, &mut y[..3], &mut s).is_err());
}

#[test]
fn activation_blocks_carry_the_corrections() {
    let x = values(32, 9);
    let mut b = [BlockQ8_0::zeroed()];
    quant::quantize_row_q8_0(&x, &mut b);
    let sum: i32 = b[0].qs.iter().map(|&v| v as i32).sum();
    let a4 = act_block(GgmlType::Q4_0, &b[0]);
    assert_eq!(a4.c, -8 * sum);
    assert_eq!(a4.qs[5] as i8, b[0].qs[5]);
    let a8 = act_block(GgmlType::Q8_0, &b[0]);
    assert_eq!(a8.c, 0);
    assert_eq!(a8.qs[5] as i32, b[0].qs[5] as i32 + 128);
    assert_eq!(a8.d, quant::scale(b[0].d));
}

#[test]
fn multi_equals_one_matrix_at_a_time() {
    for ks in paths() {
        for n in [1, 3] {
            // Q/K/V-like shapes sharing one input, and a mix of types (no sharing).
            for tys in [
                [GgmlType::Q4_0; 3],
                [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1],
            ] {
                let cases: Vec<Case> = [(48, 96), (16, 96), (21, 96)]
                    .iter()
                    .zip(tys)
                    .enumerate()
                    .map(|(i, (&(r, c), ty))| Case::new(ty, r, c, n, 40 + i as u64))
                    .collect();
                let x = cases[0].x.clone();
                let packed: Vec<_> = cases
                    .iter()
                    .map(|c| PackedWeights::pack(&c.view(), ks).unwrap())
                    .collect();
                let mut ys: Vec<Vec<f32>> =
                    cases.iter().map(|c| vec![f32::NAN; c.rows * n]).collect();
                let mut s = PackedScratch::default();
                {
                    let mut pairs: Vec<(&PackedWeights, &mut [f32])> = packed
                        .iter()
                        .zip(ys.iter_mut())
                        .map(|(p, y)| (p, y.as_mut_slice()))
                        .collect();
                    matmul_packed_multi(&mut pairs, &x, n, &mut s).unwrap();
                }
                for (p, y) in packed.iter().zip(&ys) {
                    let mut want = vec![0f32; y.len()];
                    matmul_packed(p, &x, n, &mut want, &mut s).unwrap();
                    let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{:?} {:?} n={n}", ks.path, p.ty());
                }
            }
        }
    }
}
