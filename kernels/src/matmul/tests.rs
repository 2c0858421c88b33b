//! matmul and matmul_exact against a naive reference, on odd shapes and
//! chunkings. What could be wrong: row/token indexing in the chunk buffers
//! and the final scatter, the token tiling, the activation conversion, the
//! per-type dispatch, shape validation, unaligned weight data.

use super::*;
use crate::quant::float::{f32_to_f16, Bf16Bytes, F16Bytes, F32Bytes};
use crate::test_util::values;
use proptest::prelude::*;

const TYPES: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
];

struct Case {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    n_tokens: usize,
    data: Vec<u8>,
    x: Vec<f32>,
}

impl Case {
    fn new(ty: GgmlType, rows: usize, cols: usize, n_tokens: usize, seed: u64) -> Case {
        let w = values(rows * cols, seed);
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut data = vec![0u8; rows * rb];
        for (dst, src) in data
            .chunks_exact_mut(rb.max(1))
            .zip(w.chunks_exact(cols.max(1)))
        {
            quant::quantize_row(ty, src, dst).unwrap();
        }
        // Activations with a spread of magnitudes across blocks.
        let x = values(n_tokens * cols, seed ^ 0xABCD)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i / 32 % 5) as f32 * 3.0))
            .collect();
        Case {
            ty,
            rows,
            cols,
            n_tokens,
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

    fn weights_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        quant::dequantize_row(self.ty, &self.data, &mut w).unwrap();
        w
    }

    /// y[t][r] = sum_k W[r][k] x[t][k] in f64, plus sum_k |W x| for bounds.
    fn naive(&self) -> (Vec<f64>, Vec<f64>) {
        let w = self.weights_f32();
        let (mut y, mut mag) = (vec![], vec![]);
        for t in 0..self.n_tokens {
            for r in 0..self.rows {
                let (mut s, mut m) = (0f64, 0f64);
                for k in 0..self.cols {
                    let p = w[r * self.cols + k] as f64 * self.x[t * self.cols + k] as f64;
                    s += p;
                    m += p.abs();
                }
                y.push(s);
                mag.push(m);
            }
        }
        (y, mag)
    }

    /// The fast path computed one output at a time with the public dot
    /// functions on the same converted activations: what matmul must
    /// reproduce bit for bit whatever its chunking and tiling.
    fn direct(&self) -> Vec<f32> {
        let vt = self.ty.vec_dot_type();
        let rb = self.ty.row_bytes(self.cols as u64).unwrap() as usize;
        let ab = vt.row_bytes(self.cols as u64).unwrap() as usize;
        let mut y = vec![0f32; self.n_tokens * self.rows];
        for t in 0..self.n_tokens {
            let xt = &self.x[t * self.cols..][..self.cols];
            let mut a = vec![0u8; ab];
            quant::quantize_row(vt, xt, &mut a).unwrap();
            for r in 0..self.rows {
                let w = &self.data[r * rb..][..rb];
                y[t * self.rows + r] = match self.ty {
                    GgmlType::F32 => dot::vec_dot_f32_le(cast_slice::<u8, F32Bytes>(w), xt),
                    GgmlType::F16 => {
                        dot::vec_dot_f16(cast_slice::<u8, F16Bytes>(w), cast_slice(&a))
                    }
                    GgmlType::BF16 => {
                        dot::vec_dot_bf16(cast_slice::<u8, Bf16Bytes>(w), cast_slice(&a))
                    }
                    GgmlType::Q8_0 => dot::vec_dot_q8_0_q8_0(cast_slice(w), cast_slice(&a)),
                    GgmlType::Q4_0 => dot::vec_dot_q4_0_q8_0(cast_slice(w), cast_slice(&a)),
                    GgmlType::Q4_1 => dot::vec_dot_q4_1_q8_1(cast_slice(w), cast_slice(&a)),
                    _ => unreachable!(),
                };
            }
        }
        y
    }

    /// Bound on |fast - exact| from converting activations to vec_dot_type:
    /// sum_k |W_k| e_k with e_k the conversion error of x_k (Q8: d/2 + 127
    /// half-ulps of the f16 scale, d = block amax/127; f16: half an ulp;
    /// bf16: 2^-8 relative), plus for Q4_1 the stored-s term per block
    /// |m| (f16 half-ulp of s + 32*127 f16 half-ulps of d) + |m| sum_j e_j,
    /// plus f32 accumulation (cols/16 + cols/32 + 24) u sum |W| (|x| + e).
    fn fast_bound(&self, t: usize, r: usize) -> f64 {
        let w = self.weights_f32();
        let wr = &w[r * self.cols..][..self.cols];
        let xt = &self.x[t * self.cols..][..self.cols];
        let hu = |v: f64| (v.abs() * 2f64.powi(-11)).max(2f64.powi(-25));
        let (mut b, mut mag) = (0f64, 0f64);
        for (blk, (wb, xb)) in wr.chunks(32).zip(xt.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let d = amax / 127.0;
            let mut esum = 0f64;
            for (&wk, &xk) in wb.iter().zip(xb) {
                let e = match self.ty.vec_dot_type() {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => hu(xk as f64),
                    GgmlType::BF16 => (xk as f64).abs() * 2f64.powi(-8),
                    _ => d * (0.5 + 1e-3) + 127.0 * hu(d),
                };
                esum += e;
                b += (wk as f64).abs() * e;
                mag += (wk as f64).abs() * ((xk as f64).abs() + e);
            }
            if self.ty == GgmlType::Q4_1 {
                let rb = self.ty.row_bytes(self.cols as u64).unwrap() as usize;
                let blocks: &[quant::BlockQ4_1] = bytemuck::cast_slice(&self.data[r * rb..][..rb]);
                let m = blocks[blk].m().abs() as f64;
                b += m * (hu(amax * 32.0) + 32.0 * 127.0 * hu(d) + esum);
            }
        }
        let u = 2f64.powi(-24);
        b + (self.cols as f64 / 16.0 + self.cols as f64 / 32.0 + 24.0) * u * mag + 1e-30
    }
}

fn run_fast(c: &Case, chunk: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; c.n_tokens * c.rows];
    let mut scratch = Vec::new();
    matmul_chunked(&c.view(), &c.x, c.n_tokens, &mut y, &mut scratch, chunk).unwrap();
    y
}

fn run_exact(c: &Case, chunk: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; c.n_tokens * c.rows];
    matmul_exact_chunked(&c.view(), &c.x, c.n_tokens, &mut y, chunk).unwrap();
    y
}

#[test]
fn all_paths_agree_on_odd_shapes() {
    let mut seed = 1;
    for ty in TYPES {
        for &(rows, cols) in &[(1, 32), (7, 160), (37, 96), (67, 256)] {
            for n_tokens in [1, 3, 7, 9] {
                seed += 1;
                let c = Case::new(ty, rows, cols, n_tokens, seed);
                let (naive, mag) = c.naive();
                let direct = c.direct();
                for chunk in [1, 5, 16, rows + 3, chunk_rows(rows, cols)] {
                    let what = format!("{ty} {rows}x{cols} tokens {n_tokens} chunk {chunk}");
                    let fast = run_fast(&c, chunk);
                    let exact = run_exact(&c, chunk);
                    assert_eq!(
                        fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        direct.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "fast != direct dots: {what}"
                    );
                    for i in 0..naive.len() {
                        // Exact and naive both sum exact products in f64 and
                        // round once: at most an f32 rounding apart, plus
                        // f64 summation-order noise.
                        let tol = naive[i].abs() * 2f64.powi(-23) + mag[i] * 2f64.powi(-40);
                        assert!(
                            (exact[i] as f64 - naive[i]).abs() <= tol,
                            "exact {} vs naive {}: {what} at {i}",
                            exact[i],
                            naive[i]
                        );
                        let (t, r) = (i / rows, i % rows);
                        let bound = c.fast_bound(t, r) + exact[i].abs() as f64 * 2f64.powi(-23);
                        assert!(
                            (fast[i] as f64 - exact[i] as f64).abs() <= bound,
                            "fast {} vs exact {} (bound {bound}): {what} at {i}",
                            fast[i],
                            exact[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn public_entry_points_match_the_chunked_ones() {
    for ty in TYPES {
        let c = Case::new(ty, 45, 64, 3, 99);
        let mut y = vec![0f32; 3 * 45];
        let mut scratch = vec![7u8; 5]; // stale contents must not matter
        matmul(&c.view(), &c.x, 3, &mut y, &mut scratch).unwrap();
        assert_eq!(y, c.direct(), "{ty}");
        let mut ye = vec![0f32; 3 * 45];
        matmul_exact(&c.view(), &c.x, 3, &mut ye).unwrap();
        assert_eq!(ye, run_exact(&c, 4), "{ty}");
    }
}

#[test]
fn unaligned_weight_bytes_give_the_same_result() {
    for ty in TYPES {
        let c = Case::new(ty, 9, 64, 2, 7);
        let want = run_fast(&c, 4);
        let want_exact = run_exact(&c, 4);
        let mut buf = vec![0u8; c.data.len() + 4];
        for off in 1..4 {
            buf[off..off + c.data.len()].copy_from_slice(&c.data);
            let w = WeightView {
                data: &buf[off..off + c.data.len()],
                ..c.view()
            };
            let mut y = vec![0f32; 18];
            matmul(&w, &c.x, 2, &mut y, &mut Vec::new()).unwrap();
            assert_eq!(y, want, "{ty} offset {off}");
            matmul_exact(&w, &c.x, 2, &mut y).unwrap();
            assert_eq!(y, want_exact, "{ty} offset {off}");
        }
    }
}

#[test]
fn exact_path_handles_q8_1_weights() {
    // Not a compute type, but dequantizable: the exact path accepts it.
    let c = Case::new(GgmlType::Q8_1, 5, 64, 2, 3);
    let (naive, _) = c.naive();
    let y = run_exact(&c, 2);
    for (a, b) in y.iter().zip(&naive) {
        assert!((*a as f64 - b).abs() <= b.abs() * 2f64.powi(-23) + 1e-12);
    }
    let mut y = vec![0f32; 10];
    assert_eq!(
        matmul(&c.view(), &c.x, 2, &mut y, &mut Vec::new()),
        Err(KernelError::Unsupported {
            ty: GgmlType::Q8_1,
            op: "matmul"
        })
    );
}

#[test]
fn shape_errors() {
    let c = Case::new(GgmlType::Q4_0, 4, 64, 2, 5);
    let mut y = vec![0f32; 8];
    let mut s = Vec::new();
    let short = WeightView {
        data: &c.data[..c.data.len() - 1],
        ..c.view()
    };
    assert!(matches!(
        matmul(&short, &c.x, 2, &mut y, &mut s),
        Err(KernelError::LengthMismatch {
            what: "weight data",
            ..
        })
    ));
    assert!(matches!(
        matmul_exact(&short, &c.x, 2, &mut y),
        Err(KernelError::LengthMismatch {
            what: "weight data",
            ..
        })
    ));
    assert!(matches!(
        matmul(&c.view(), &c.x[1..], 2, &mut y, &mut s),
        Err(KernelError::LengthMismatch {
            what: "activations",
            ..
        })
    ));
    assert!(matches!(
        matmul(&c.view(), &c.x, 2, &mut y[1..], &mut s),
        Err(KernelError::LengthMismatch { what: "output", .. })
    ));
    let odd = WeightView {
        cols: 48,
        ..c.view()
    };
    assert!(matches!(
        matmul(&odd, &c.x[..96], 2, &mut y, &mut s),
        Err(KernelError::NotBlockMultiple { n: 48, .. })
    ));
    let k = WeightView {
        ty: GgmlType::IQ4_NL,
        ..c.view()
    };
    assert!(matches!(
        matmul(&k, &c.x, 2, &mut y, &mut s),
        Err(KernelError::Unsupported { .. })
    ));
    assert!(matches!(
        matmul_exact(&k, &c.x, 2, &mut y),
        Err(KernelError::Unsupported { .. })
    ));
    // A K-quant is computed, but its rows must be whole super-blocks.
    let k = WeightView {
        ty: GgmlType::Q4_K,
        ..c.view()
    };
    assert!(matches!(
        matmul(&k, &c.x, 2, &mut y, &mut s),
        Err(KernelError::NotBlockMultiple { n: 64, .. })
    ));
    let huge = WeightView {
        rows: usize::MAX,
        ..c.view()
    };
    assert!(matches!(
        matmul(&huge, &c.x, 2, &mut y, &mut s),
        Err(KernelError::Overflow { .. })
    ));
}

#[test]
fn empty_shapes() {
    let mut s = Vec::new();
    // cols = 0: every output is an empty sum.
    let w = WeightView {
        ty: GgmlType::Q8_0,
        data: &[],
        rows: 3,
        cols: 0,
    };
    let mut y = vec![f32::NAN; 6];
    matmul(&w, &[], 2, &mut y, &mut s).unwrap();
    assert_eq!(y, [0.0; 6]);
    let mut y = vec![f32::NAN; 6];
    matmul_exact(&w, &[], 2, &mut y).unwrap();
    assert_eq!(y, [0.0; 6]);
    // No rows or no tokens: nothing to do.
    let w = WeightView {
        ty: GgmlType::F16,
        data: &[],
        rows: 0,
        cols: 32,
    };
    matmul(&w, &[0.0; 64], 2, &mut [], &mut s).unwrap();
    let w = WeightView {
        ty: GgmlType::F16,
        data: &[0; 64],
        rows: 1,
        cols: 32,
    };
    matmul(&w, &[], 0, &mut [], &mut s).unwrap();
    matmul_exact(&w, &[], 0, &mut []).unwrap();
}

#[test]
fn chunk_rows_is_sane() {
    assert_eq!(chunk_rows(0, 4096), 1);
    assert_eq!(chunk_rows(1, 4096), 1);
    assert!(chunk_rows(4096, 4096) >= 4);
    assert!(chunk_rows(100_000, 64) <= 100_000);
    assert_eq!(chunk_rows(10, 32), 10); // tiny matrices are one task
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random shapes and chunkings: the fast path always equals per-output
    /// dot calls, and the F16 weights path converts activations to f16
    /// (ggml's vec_dot_type), which the direct twin also does.
    #[test]
    fn random_shapes(ti in 0usize..6, rows in 1usize..40, blocks in 1usize..6,
                     n_tokens in 1usize..12, chunk in 1usize..50, seed in any::<u64>()) {
        let c = Case::new(TYPES[ti], rows, blocks * 32, n_tokens, seed);
        prop_assert_eq!(run_fast(&c, chunk), c.direct());
        prop_assert_eq!(run_exact(&c, chunk), run_exact(&c, rows));
    }
}

#[test]
fn f16_weights_see_f16_activations() {
    // One weight 1.0 in F16; activation 1 + 2^-11 rounds to 1.0 in f16
    // (ties to even), so the fast path gives exactly 1, the exact path the
    // f32 value.
    let w = [f32_to_f16(1.0).to_le_bytes(); 1].concat();
    let x = [1.0 + 2f32.powi(-11)];
    let view = WeightView {
        ty: GgmlType::F16,
        data: &w,
        rows: 1,
        cols: 1,
    };
    let mut y = [0f32];
    matmul(&view, &x, 1, &mut y, &mut Vec::new()).unwrap();
    assert_eq!(y[0], 1.0);
    matmul_exact(&view, &x, 1, &mut y).unwrap();
    assert_eq!(y[0], x[0]);
}

/// A batch through matmul itself (chunking included) on sizes that are not
/// tile multiples runs full tiles on every SIMD path, and gives the same
/// bits as one-token matvecs.
#[test]
fn batches_take_the_tiled_path_through_matmul() {
    use crate::dot::kernels_for;
    use crate::simd::SimdPath;
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::F16,
    ] {
        let c = Case::new(ty, 65, 96, 9, 21);
        for p in SimdPath::available() {
            let ks = kernels_for(p).unwrap();
            let mut y = vec![f32::NAN; 9 * 65];
            let tiles =
                matmul_chunked_with(ks, &c.view(), &c.x, 9, &mut y, &mut Vec::new(), 17).unwrap();
            if p == SimdPath::Scalar {
                assert_eq!(tiles, Tiles::default());
            } else {
                // Chunks of 17 rows (the last 14): full row tiles x full
                // token tiles in each.
                // F16: the AVX-512 paths' wide float tile, 4 x 2 elsewhere.
                #[cfg(target_arch = "x86_64")]
                let f16_tile = if matches!(p, SimdPath::Avx512 | SimdPath::Avx512Vnni) {
                    crate::dot::float_wide::TILE
                } else {
                    (4, 2)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let f16_tile = (4, 2);
                let (mr, nr) = if ty == GgmlType::F16 {
                    f16_tile
                } else {
                    ks.tile
                };
                let want = (3 * (17 / mr) + 14 / mr) * (9 / nr);
                assert_eq!(tiles.full, want, "{p} {ty}: {tiles:?}");
            }
            for t in 0..9 {
                let mut yt = vec![0f32; 65];
                let xt = &c.x[t * 96..][..96];
                matmul_with(ks, &c.view(), xt, 1, &mut yt, &mut Vec::new()).unwrap();
                assert_eq!(yt, y[t * 65..][..65], "{p} {ty} token {t}");
            }
        }
    }
}
