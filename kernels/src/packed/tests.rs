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

/// Every packed path this CPU has, with the scalar twin first, then the
/// AVX-VNNI kernels in their EVEX encoding where this CPU runs that.
fn paths() -> Vec<&'static PackedKernels> {
    let mut v = vec![&SCALAR];
    v.extend(
        SimdPath::available()
            .into_iter()
            .filter_map(packed_kernels_for),
    );
    v.extend(super::avxvnni_evex_kernels());
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
    if SimdPath::Avx2.is_available() {
        // Every x86 SIMD path this CPU has brings its packed kernels to the checks here
        // (with the scalar twin in the place of SimdPath::Scalar), and so does the EVEX
        // build of the AVX-VNNI kernels where it runs.
        let evex = usize::from(super::avxvnni_evex_kernels().is_some());
        assert_eq!(paths().len(), SimdPath::available().len() + evex);
    }
    for ks in paths().into_iter().skip(1) {
        // 37 rows = groups of 16, 16 and 5; 7 tokens = a tile of 4 and one of 3
        // (AVX-512), or two of 3 and one of 1 (AVX2, 3 tokens a tile).
        let c = Case::new(GgmlType::Q8_0, 37, 64, 7, 11);
        let (_, tiles) = c.run(ks, 48);
        #[cfg(target_arch = "x86_64")]
        let want = if matches!(ks.path, SimdPath::Avx512 | SimdPath::Avx512Vnni) {
            Tiles { full: 2, edge: 4 }
        } else {
            assert_eq!(avx2::C_FULL, 3);
            Tiles { full: 4, edge: 5 }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let want = Tiles { full: 2, edge: 4 };
        assert_eq!(tiles, want, "{:?}", ks.path);
    }
}

#[test]
fn q8_0_weights_of_minus_128_are_exact() {
    // No ggml quantizer writes -128, but a file may hold it; stored as
    // x + 128 it is byte 0, and every form must still give the exact sum.
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
    // 40 rows are 3 groups. A group of 10 Q4_0 blocks is 5 units of two
    // blocks' quants (2 x 256 bytes) and their scales (64).
    let c = Case::new(GgmlType::Q4_0, 40, 320, 1, 1);
    let p = PackedWeights::pack(&c.view(), &SCALAR).unwrap();
    assert_eq!(p.n_bytes(), 3 * 5 * (512 + 64));
    assert!(p.n_bytes() >= c.data.len());
    // Three blocks: Q4_0 and Q8_0 end in a half-empty unit; Q4_1's unit is
    // one block (256 bytes of quants, 64 of scales and minimums).
    for (ty, group) in [
        (GgmlType::Q4_0, 2 * (512 + 64)),
        (GgmlType::Q4_1, 3 * (256 + 64)),
        (GgmlType::Q8_0, 2 * (1024 + 64)),
    ] {
        let c = Case::new(ty, 17, 96, 1, 2);
        let p = PackedWeights::pack(&c.view(), &SCALAR).unwrap();
        assert_eq!(p.n_bytes(), 2 * group, "{ty:?}");
    }
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
    assert_eq!(a8.c, -128 * sum);
    assert_eq!(a8.qs[5] as i8, b[0].qs[5]);
    assert_eq!(a8.d, quant::scale(b[0].d));
}

/// Matrices without rows and wider than 16K columns: nothing to compute, and no
/// chunk of zero rows (it divided by zero).
#[test]
fn multi_takes_matrices_without_rows() {
    for ks in paths() {
        let cols = 520 * 32;
        let packed: Vec<_> = (0..2)
            .map(|i| PackedWeights::pack(&Case::new(GgmlType::Q4_0, 0, cols, 1, i).view(), ks))
            .collect::<Result<_, _>>()
            .unwrap();
        let x = values(cols, 7);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut pairs = [(&packed[0], &mut a[..]), (&packed[1], &mut b[..])];
        matmul_packed_multi(&mut pairs, &x, 1, &mut PackedScratch::default()).unwrap();
    }
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
                // 400 rows: several row chunks in one matrix's share of the tasks.
                let cases: Vec<Case> = [(400, 96), (16, 96), (21, 96)]
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

#[test]
#[cfg(target_arch = "x86_64")]
fn every_x86_path_has_packed_kernels_under_its_own_name() {
    use SimdPath::*;
    for p in [Avx2, AvxVnni, Avx512, Avx512Vnni] {
        let ks = packed_kernels_for(p);
        assert_eq!(ks.is_some(), p.is_available(), "{p:?}");
        if let Some(ks) = ks {
            assert_eq!(ks.path, p);
            // Each path has functions of its own (AVX-VNNI no longer runs AVX2's).
            let fns = |k: &PackedKernels| [k.q4_0, k.q4_1, k.q8_0].map(|f| f as usize);
            let avx2 = fns(&avx2::KERNELS);
            assert_eq!(fns(ks) == avx2, p == Avx2, "{p:?}");
        }
    }
    if Avx2.is_available() {
        let ps: Vec<_> = paths().iter().map(|k| k.path).collect();
        assert!(ps.contains(&Avx2), "{ps:?}");
        // The AVX-VNNI kernels are checked on every CPU with either encoding of vpdpbusd
        // on 256 bits (this machine family: Zen 4, EVEX only).
        let evex = std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if AvxVnni.is_available() || evex {
            assert!(ps.contains(&AvxVnni), "{ps:?}");
        }
    }
}

/// Weights of `ty` (`rows x 32 k`, every scale 1.0, Q4_1 minimums 0.5) and
/// activation blocks for `n` tokens (every scale 1.0), their bytes drawn
/// mostly from the extremes: nibbles 15 and 0, Q8_0 weights -128, 127, -127,
/// activations -128 (when `minus_128`), -127 and 127, and some of everything
/// else. Row 0 of token 0 is extreme throughout (weights 15 or -128 against
/// -128 or -127), the largest sums `vpmaddubsw` sees.
fn extreme_case(
    ty: GgmlType,
    rows: usize,
    k: usize,
    n: usize,
    minus_128: bool,
) -> (Vec<u8>, Vec<ActBlock>) {
    let mut s = 0x1234_5678_9ABC_DEF1u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let one = quant::float::f32_to_f16(1.0).to_le_bytes();
    let half = quant::float::f32_to_f16(0.5).to_le_bytes();
    let mut data = Vec::new();
    for r in 0..rows {
        for _ in 0..k {
            data.extend_from_slice(&one);
            if ty == GgmlType::Q4_1 {
                data.extend_from_slice(&half);
            }
            if ty == GgmlType::Q8_0 {
                for _ in 0..32 {
                    let v: i8 = match (r, next() % 6) {
                        (0, _) | (_, 0 | 1) => -128,
                        (_, 2) => 127,
                        (_, 3) => -127,
                        (_, _) => next() as i8,
                    };
                    data.push(v as u8);
                }
            } else {
                for _ in 0..16 {
                    let v: u8 = match (r, next() % 4) {
                        (0, _) | (_, 0 | 1) => 0xFF,
                        (_, 2) => 0x0F,
                        (_, _) => next() as u8,
                    };
                    data.push(v);
                }
            }
        }
    }
    let mut act = Vec::new();
    for t in 0..n {
        for _ in 0..k {
            let mut y = [0i8; 32];
            for v in y.iter_mut() {
                *v = match (t, next() % 5) {
                    (0, _) | (_, 0) if minus_128 => -128,
                    (0, _) | (_, 0 | 1) => -127,
                    (_, 2) => 127,
                    (_, _) => (next() as i8).max(-127),
                };
            }
            let sum: i32 = y.iter().map(|&v| v as i32).sum();
            let a = match ty {
                GgmlType::Q4_0 => ActBlock {
                    qs: bytemuck::cast(y),
                    d: 1.0,
                    c: -8 * sum,
                    s: 0.0,
                },
                GgmlType::Q4_1 => ActBlock {
                    qs: bytemuck::cast(y),
                    d: 1.0,
                    c: 0,
                    s: sum as f32,
                },
                _ => ActBlock {
                    qs: bytemuck::cast(y),
                    d: 1.0,
                    c: -128 * sum,
                    s: 0.0,
                },
            };
            act.push(a);
        }
    }
    (data, act)
}

/// The exact outputs of [`extreme_case`]: every scale is 1 and every sum an
/// integer (or a half) below 2^24, so f32 holds them exactly.
fn extreme_exact(ty: GgmlType, data: &[u8], act: &[ActBlock], rows: usize, k: usize) -> Vec<f32> {
    let bb = data.len() / (rows * k);
    let mut out = Vec::new();
    for ab in act.chunks_exact(k) {
        for r in 0..rows {
            let mut total = 0f64;
            for (b, a) in ab.iter().enumerate() {
                let blk = &data[(r * k + b) * bb..][..bb];
                let mut sumi = 0i64;
                if ty == GgmlType::Q8_0 {
                    for e in 0..32 {
                        let y = a.qs[e] as i8 as i64;
                        sumi += blk[2 + e] as i8 as i64 * y;
                    }
                } else {
                    let qs = &blk[bb - 16..];
                    let off = if ty == GgmlType::Q4_0 { 8 } else { 0 };
                    for (e, &q) in qs.iter().enumerate() {
                        let (lo, hi) = ((q & 15) as i64, (q >> 4) as i64);
                        sumi += (lo - off) * a.qs[e] as i8 as i64;
                        sumi += (hi - off) * a.qs[16 + e] as i8 as i64;
                    }
                }
                total += sumi as f64;
                if ty == GgmlType::Q4_1 {
                    total += 0.5 * a.s as f64;
                }
            }
            out.push(total as f32);
        }
    }
    out
}

/// Runs `ks`'s kernel for `p`'s type on ready activation blocks, rows
/// `r0..r0 + nr` into a full `n x rows` output (other rows stay NaN).
fn run_blocks(
    p: &PackedWeights,
    ks: &PackedKernels,
    act: &[ActBlock],
    (r0, nr): (usize, usize),
) -> Vec<f32> {
    let n = act.len() / p.blocks();
    let mut y = vec![f32::NAN; n * p.rows()];
    // As matmul_packed routes it: a -128 in Q8_0 activations (a qs byte of 0x80) goes to
    // the twin on paths that cannot take it.
    let minus_128 = act.iter().any(|a| a.qs.contains(&0x80));
    let gemm = ks.gemm(p.fmt, minus_128).expect("a Q8_0-activation format");
    let out = Out {
        ptr: y.as_mut_ptr(),
        ld: p.rows(),
    };
    // SAFETY: y holds n x rows; this call alone writes it, rows r0..r0 + nr.
    unsafe { gemm(p, r0, nr, act, out.offset(r0)) };
    y
}

#[test]
fn extreme_bytes_give_exact_sums_on_every_path() {
    // Saturation in an emulated vpdpbusd (vpmaddubsw adds two products into an
    // i16) would show here: nibbles 15 against -128, Q8_0 weights -128 against
    // -127, whole blocks of them.
    for ty in TYPES {
        for minus_128 in [false, true] {
            for n in [1, 2, 5] {
                let (rows, k) = (21, 3);
                let (data, act) = extreme_case(ty, rows, k, n, minus_128);
                let want = extreme_exact(ty, &data, &act, rows, k);
                let w = WeightView {
                    ty,
                    data: &data,
                    rows,
                    cols: 32 * k,
                };
                for ks in paths() {
                    let p = PackedWeights::pack(&w, ks).unwrap();
                    for (r0, nr) in [(0, rows), (0, 16), (16, 5)] {
                        let got = run_blocks(&p, ks, &act, (r0, nr));
                        for t in 0..n {
                            for r in r0..r0 + nr {
                                let (g, e) = (got[t * rows + r], want[t * rows + r]);
                                assert_eq!(
                                    g.to_bits(),
                                    e.to_bits(),
                                    "{ty:?} -128:{minus_128} n={n} rows {r0}+{nr} {:?} \
                                     token {t} row {r}: {g} vs {e}",
                                    ks.path
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_quantizer_made_minus_128_is_exact_for_q8_0() {
    // ggml's rule lets an infinity whose NaN neighbour hid it from the block
    // maximum through as -128 (here with a nonzero scale); the AVX2 sign trick
    // cannot negate it, so that kernel must still give the twin's bits.
    let mut c = Case::new(GgmlType::Q8_0, 21, 64, 3, 8);
    c.x[32] = f32::NEG_INFINITY;
    c.x[33] = f32::NAN;
    c.x[64 + 32 + 4] = f32::NEG_INFINITY;
    c.x[64 + 32 + 5] = f32::NAN;
    let ks = crate::dot::kernels().unwrap();
    let mut q = vec![BlockQ8_0::zeroed(); 2];
    (ks.quantize_q8_0)(&c.x[..64], &mut q);
    assert_eq!(q[1].qs[0], -128);
    assert_ne!(quant::scale(q[1].d), 0.0);
    (ks.quantize_q8_0)(&c.x[64..128], &mut q);
    assert_eq!(q[1].qs[4], -128);
    // Negative weights where the -128s land, so a wrapped sign shows.
    for r in 0..21 {
        c.data[r * 68 + 34 + 2] = 0x90;
        c.data[r * 68 + 34 + 2 + 4] = 0x81;
    }
    let (want, _) = c.run(&SCALAR, 16);
    assert!(want.iter().all(|v| v.is_finite()));
    for ks in paths().into_iter().skip(1) {
        let (got, _) = c.run(ks, 16);
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{:?}", ks.path);
    }
}

#[test]
fn activations_are_the_q8_0_quantizers_blocks_rewritten() {
    // What prepare_acts builds (on x86, quantized straight into ActBlocks) against the
    // reference quantizer's blocks rewritten by act_block: the same bytes, including blocks
    // the SIMD quantizer hands to the reference (NaN, infinities, an overflowing scale), a
    // zero block, a tiny one, and a -inf that a NaN hides (a -128 quant).
    let cols = 32 * 9;
    let mut x = values(5 * cols, 31);
    x[33] = f32::NAN;
    x[64 + 3] = f32::INFINITY;
    x[96..128].fill(0.0);
    x[128..160].iter_mut().for_each(|v| *v *= 1e-38);
    x[160 + 4] = f32::NEG_INFINITY;
    x[160 + 5] = f32::NAN;
    x[192 + 7] = f32::MAX;
    // Scale exactly 1: ties, which round away from zero.
    x[224..228].copy_from_slice(&[127.0, 2.5, -2.5, 0.5]);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
        for n in [1, 5] {
            let xs = &x[..n * cols];
            let mut q = vec![BlockQ8_0::zeroed(); n * cols / 32];
            quant::quantize_row_q8_0(xs, &mut q);
            let want: Vec<ActBlock> = q.iter().map(|b| act_block(ty, b)).collect();
            let has = q.iter().any(|b| b.qs.contains(&-128));
            assert!(has, "the case should hold a -128");
            // prepare_acts on this process's path, then the x86 quantizer if the CPU can run it.
            let mut s = PackedScratch::default();
            prepare_acts(ty, xs, cols, &mut s).unwrap();
            // Only x86 adds a second run.
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut runs = vec![("prepare_acts", s.act[..want.len()].to_vec(), s.minus_128)];
            #[cfg(target_arch = "x86_64")]
            if SimdPath::Avx2.is_available() {
                let mut act = vec![ActBlock::default(); want.len()];
                let mut m = false;
                for (src, a) in xs.chunks_exact(cols).zip(act.chunks_exact_mut(cols / 32)) {
                    // SAFETY: AVX2 (with FMA and F16C) was just detected.
                    m |= unsafe { avx2::quantize_acts(ty, src, a) };
                }
                runs.push(("avx2", act, m));
            }
            for (name, got, minus_128) in runs {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        bytemuck::bytes_of(g),
                        bytemuck::bytes_of(w),
                        "{name} {ty:?} n={n} block {i}: {g:?} vs {w:?}"
                    );
                }
                assert_eq!(
                    minus_128,
                    ty == GgmlType::Q8_0 && has,
                    "{name} {ty:?} n={n}"
                );
            }
        }
    }
}
