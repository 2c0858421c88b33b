//! Packed Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K on every path (the portable twin included)
//! against the format's twin on the file layout, bit for bit: random
//! quantized and raw blocks, row counts that are not whole groups or halves,
//! token counts that are not whole tiles, chunked and whole, one matrix or
//! several. What could be wrong: the scatter into chunks, the nibble and
//! bit order, the 6-bit scale unpacking in lanes, the minimum pairs, the Q6_K
//! and Q5_0 offsets, the masked stores and the token tiling.

use super::*;
use crate::dot::scalar;
use crate::quant::{BlockFormat, QK_K};
use crate::test_util::values;

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

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Rows of random quantized weights, or (`raw`) random bytes with finite
/// f16 scales at `halves`.
fn weights<B: BlockFormat>(
    rows: usize,
    k: usize,
    seed: u64,
    raw: bool,
    halves: &[usize],
) -> Vec<B> {
    let mut v = vec![B::zeroed(); rows * k];
    if raw {
        let mut r = Rng((seed * 0x9E37_79B9) | 1);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
        bytes.iter_mut().for_each(|b| *b = r.next() as u8);
        for blk in bytes.chunks_exact_mut(std::mem::size_of::<B>()) {
            for &o in halves {
                let f = ((r.next() >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
                blk[o..o + 2].copy_from_slice(&crate::quant::float::f32_to_f16(f).to_le_bytes());
            }
        }
    } else {
        let x: Vec<f32> = values(rows * k * B::BLOCK, seed)
            .iter()
            .map(|v| v + 0.1)
            .collect();
        B::quantize_row(&x, &mut v);
    }
    v
}

/// `ty` weights (`blocks`, rows x k) times `n` tokens through the packed
/// kernels `ks` (chunks of `chunk` rows), and through the file-layout twin.
#[allow(clippy::too_many_arguments)]
fn run<B: BlockFormat>(
    ty: GgmlType,
    blocks: &[B],
    rows: usize,
    n: usize,
    ks: &'static PackedKernels,
    chunk: usize,
    twin: impl Fn(&[B], &[f32]) -> f32,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let cols = blocks.len() / rows * B::BLOCK;
    let x: Vec<f32> = values(n * cols, seed ^ 0xACE)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / 32 % 7) as f32))
        .collect();
    run_on(ty, blocks, rows, &x, ks, chunk, twin)
}

/// [`run`] on the activations `x` (`n * cols`).
fn run_on<B: BlockFormat>(
    ty: GgmlType,
    blocks: &[B],
    rows: usize,
    x: &[f32],
    ks: &'static PackedKernels,
    chunk: usize,
    twin: impl Fn(&[B], &[f32]) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    let cols = blocks.len() / rows * B::BLOCK;
    let n = x.len() / cols;
    let data: &[u8] = bytemuck::cast_slice(blocks);
    let w = WeightView {
        ty,
        data,
        rows,
        cols,
    };
    let p = PackedWeights::pack(&w, ks).unwrap();
    let mut y = vec![f32::NAN; n * rows];
    let mut s = PackedScratch::default();
    matmul_packed_chunked(&p, x, n, &mut y, &mut s, chunk).unwrap();
    let k = blocks.len() / rows;
    let mut want = vec![0f32; n * rows];
    for t in 0..n {
        for r in 0..rows {
            want[t * rows + r] = twin(&blocks[r * k..(r + 1) * k], &x[t * cols..(t + 1) * cols]);
        }
    }
    (y, want)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check<B: BlockFormat>(
    ty: GgmlType,
    halves: &[usize],
    twin: impl Fn(&[B], &[f32]) -> f32 + Copy,
) {
    let mut seed = 0;
    for &(rows, k) in &[(1, 1), (7, 2), (16, 1), (23, 3), (40, 2)] {
        for n in [1, 3, 4, 9, 13, 29] {
            for raw in [false, true] {
                seed += 1;
                let blocks = weights::<B>(rows, k, seed, raw, halves);
                for &ks in &paths() {
                    for chunk in [16, 64] {
                        let (got, want) = run(ty, &blocks, rows, n, ks, chunk, twin, seed);
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{ty} {:?} rows {rows} k {k} n {n} raw {raw} chunk {chunk}",
                            ks.path
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn packed_q4_k_gives_the_twin_bits_on_every_path() {
    check::<BlockQ4_K>(GgmlType::Q4_K, &[0, 2], |w, x| {
        let mut a = vec![BlockQ8_K::zeroed(); w.len()];
        quant::quantize_row_q8_k(x, &mut a);
        scalar::vec_dot_q4_k_q8_k_sb(w, &a)
    });
}

#[test]
fn packed_q2_k_gives_ggml_generic_bits_on_every_path() {
    check::<BlockQ2_K>(GgmlType::Q2_K, &[80, 82], |w, x| {
        let mut a = vec![BlockQ8_K::zeroed(); w.len()];
        quant::quantize_row_q8_k(x, &mut a);
        scalar::vec_dot_q2_k_q8_k(w, &a)
    });
}

#[test]
fn packed_q3_k_gives_the_twin_bits_on_every_path() {
    check::<BlockQ3_K>(GgmlType::Q3_K, &[108], |w, x| {
        let mut a = vec![BlockQ8_K::zeroed(); w.len()];
        quant::quantize_row_q8_k(x, &mut a);
        scalar::vec_dot_q3_k_q8_k_sb(w, &a)
    });
}

#[test]
fn packed_q5_k_gives_the_twin_bits_on_every_path() {
    check::<BlockQ5_K>(GgmlType::Q5_K, &[0, 2], |w, x| {
        let mut a = vec![BlockQ8_K::zeroed(); w.len()];
        quant::quantize_row_q8_k(x, &mut a);
        scalar::vec_dot_q5_k_q8_k_sb(w, &a)
    });
}

#[test]
fn packed_q6_k_gives_the_twin_bits_on_every_path() {
    check::<BlockQ6_K>(GgmlType::Q6_K, &[208], |w, x| {
        let mut a = vec![BlockQ8_K::zeroed(); w.len()];
        quant::quantize_row_q8_k(x, &mut a);
        scalar::vec_dot_q6_k_q8_k_sb(w, &a)
    });
}

/// The largest byte products that the i16 sums of the AVX2 and AVX-512
/// (without VNNI) paths meet: every Q4_K nibble 15 with scales and
/// minimums 63, every Q5_K quant 31 with the same scales, every Q6_K quant 63 (stored q + 32) with scales -128 and
/// 127, against activations that all quantize to 127, or all to -127 (a
/// constant row), and every Q5_0 and Q5_1 quant 31 against 127 or -127. One more
/// product in an i16 sum would overflow it.
#[test]
fn extreme_k_quant_bytes_give_the_twin_bits_on_every_path() {
    let one = crate::quant::float::f32_to_f16(1.0).to_le_bytes();
    let (rows, k) = (24, 2);
    let mut q4 = vec![BlockQ4_K::zeroed(); rows * k];
    for b in &mut q4 {
        b.scales = [0xFF; 12];
        b.qs = [0xFF; QK_K / 2];
        (b.d, b.dmin) = (one, one);
    }
    let mut q5k = vec![BlockQ5_K::zeroed(); rows * k];
    for b in &mut q5k {
        b.scales = [0xFF; 12];
        b.qh = [0xFF; QK_K / 8];
        b.qs = [0xFF; QK_K / 2];
        (b.d, b.dmin) = (one, one);
    }
    // Q2_K: every quant 3, scales and minimums 15.
    let q2 = vec![
        BlockQ2_K {
            scales: [0xFF; 16],
            qs: [0xFF; QK_K / 4],
            d: one,
            dmin: one
        };
        rows * k
    ];
    // Q3_K: every quant 7 (value 3), or every quant 0 (value -4), scales 63 and 0 (31, -32).
    let q3: Vec<BlockQ3_K> = (0..rows * k)
        .map(|i| BlockQ3_K {
            hmask: [if i % 2 == 0 { 0xFF } else { 0 }; QK_K / 8],
            qs: [if i % 2 == 0 { 0xFF } else { 0 }; QK_K / 4],
            scales: [if i % 3 == 0 { 0xFF } else { 0 }; 12],
            d: one,
        })
        .collect();
    let mut q6 = vec![BlockQ6_K::zeroed(); rows * k];
    for b in &mut q6 {
        b.ql = [0xFF; QK_K / 2];
        b.qh = [0xFF; QK_K / 4];
        b.scales = std::array::from_fn(|j| if j % 3 == 0 { -128 } else { 127 });
        b.d = one;
    }
    let q5 = vec![
        BlockQ5_0 {
            d: one,
            qh: [0xFF; 4],
            qs: [0xFF; 16]
        };
        rows * k * QK_K / 32
    ];
    let q51 = vec![
        BlockQ5_1 {
            d: one,
            m: one,
            qh: [0xFF; 4],
            qs: [0xFF; 16]
        };
        rows * k * QK_K / 32
    ];
    let twin = |x: &[f32], dot: &dyn Fn(&[BlockQ8_K]) -> f32| {
        let mut a = vec![BlockQ8_K::zeroed(); x.len() / QK_K];
        quant::quantize_row_q8_k(x, &mut a);
        dot(&a)
    };
    for sign in [1.0f32, -1.0] {
        for n in [1, 4, 5, 9, 29] {
            let x = vec![sign; n * k * QK_K];
            for &ks in &paths() {
                let (got, want) = run_on(GgmlType::Q4_K, &q4, rows, &x, ks, 64, |w, x| {
                    twin(x, &|a| scalar::vec_dot_q4_k_q8_k_sb(w, a))
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "Q4_K {:?} sign {sign} n {n}",
                    ks.path
                );
                let (got, want) = run_on(GgmlType::Q2_K, &q2, rows, &x, ks, 64, |w, x| {
                    twin(x, &|a| scalar::vec_dot_q2_k_q8_k(w, a))
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "Q2_K {:?} sign {sign} n {n}",
                    ks.path
                );
                let (got, want) = run_on(GgmlType::Q3_K, &q3, rows, &x, ks, 64, |w, x| {
                    twin(x, &|a| scalar::vec_dot_q3_k_q8_k_sb(w, a))
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "Q3_K {:?} sign {sign} n {n}",
                    ks.path
                );
                let (got, want) = run_on(GgmlType::Q5_K, &q5k, rows, &x, ks, 64, |w, x| {
                    twin(x, &|a| scalar::vec_dot_q5_k_q8_k_sb(w, a))
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "Q5_K {:?} sign {sign} n {n}",
                    ks.path
                );
                let (got, want) = run_on(GgmlType::Q6_K, &q6, rows, &x, ks, 64, |w, x| {
                    twin(x, &|a| scalar::vec_dot_q6_k_q8_k_sb(w, a))
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "Q6_K {:?} sign {sign} n {n}",
                    ks.path
                );
                let (got, want) = run_on(GgmlType::Q5_1, &q51, rows, &x, ks, 64, |w, x| {
                    let mut a = vec![BlockQ8_1::zeroed(); w.len()];
                    quant::quantize_row_q8_1(x, &mut a);
                    scalar::vec_dot_q5_1_q8_1(w, &a)
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "Q5_1 {:?} sign {sign} n {n}",
                    ks.path
                );
                let (got, want) = run_on(GgmlType::Q5_0, &q5, rows, &x, ks, 64, |w, x| {
                    let mut a = vec![BlockQ8_0::zeroed(); w.len()];
                    quant::quantize_row_q8_0(x, &mut a);
                    scalar::vec_dot_q5_0_q8_0(w, &a)
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "Q5_0 {:?} sign {sign} n {n}",
                    ks.path
                );
            }
        }
    }
}

#[test]
fn packed_q5_0_gives_ggml_generic_bits_on_every_path() {
    check::<BlockQ5_0>(GgmlType::Q5_0, &[0], |w, x| {
        let mut a = vec![BlockQ8_0::zeroed(); w.len()];
        quant::quantize_row_q8_0(x, &mut a);
        scalar::vec_dot_q5_0_q8_0(w, &a)
    });
}

#[test]
fn packed_q5_1_gives_ggml_generic_bits_on_every_path() {
    check::<BlockQ5_1>(GgmlType::Q5_1, &[0, 2], |w, x| {
        let mut a = vec![BlockQ8_1::zeroed(); w.len()];
        quant::quantize_row_q8_1(x, &mut a);
        scalar::vec_dot_q5_1_q8_1(w, &a)
    });
}

#[test]
fn q5_0_high_word_places_each_bit() {
    for e in 0..32 {
        let w = kq::q5_0_high_word(1 << e);
        assert_eq!(w.count_ones(), 1, "element {e}");
        let pos = w.trailing_zeros();
        let (b, s) = (pos / 8, pos % 8);
        assert_eq!(16 * (s % 2) + 4 * (s / 2) + b, e, "element {e}");
    }
    // The table lookup is the bit loop on words of many bits, too.
    let mut x = 0x9E37_79B9u32;
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        assert_eq!(
            kq::q5_0_high_word(x),
            kq::q5_0_high_word_bits(x),
            "{x:#010x}"
        );
    }
    assert_eq!(kq::q5_0_high_word(u32::MAX), u32::MAX);
}

#[test]
fn packed_k_memory_is_the_tensor_plus_padding() {
    use GgmlType::*;
    // 20 rows: two groups (the second 4 real rows). Q4_K and Q5_K pack
    // exactly the file's bytes per row; Q6_K adds 32 bytes per group and super-block;
    // Q5_0 an empty half unit when k is odd.
    for (ty, cols, want) in [
        (Q4_K, 512, 2 * 2 * 2304),
        (Q5_K, 512, 2 * 2 * 2816),
        (Q3_K, 256, 2 * 1856),
        (Q2_K, 256, 2 * 1344),
        (Q6_K, 256, 2 * 3392),
        (Q5_0, 96, 2 * 2 * 704),
        (Q5_1, 96, 2 * 2 * 768),
    ] {
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let data = vec![0u8; 20 * rb];
        let w = WeightView {
            ty,
            data: &data,
            rows: 20,
            cols,
        };
        let p = PackedWeights::pack(&w, &SCALAR).unwrap();
        assert_eq!(p.n_bytes(), want, "{ty}");
    }
    // A K-quant row must be whole super-blocks.
    let data = vec![0u8; 144];
    let w = WeightView {
        ty: Q4_K,
        data: &data,
        rows: 1,
        cols: 128,
    };
    assert!(matches!(
        PackedWeights::pack(&w, &SCALAR),
        Err(KernelError::NotBlockMultiple { .. })
    ));
}

#[test]
fn multi_matches_one_at_a_time_for_k_quants() {
    // Decode with matmul_packed_multi (one quantization, one parallel region).
    let (rows, k) = (24, 2);
    let a = weights::<BlockQ4_K>(rows, k, 3, false, &[0, 2]);
    let b = weights::<BlockQ4_K>(rows, k, 4, false, &[0, 2]);
    let cols = k * 256;
    let ks = paths().pop().unwrap();
    let pack = |bl: &[BlockQ4_K]| {
        let w = WeightView {
            ty: GgmlType::Q4_K,
            data: bytemuck::cast_slice(bl),
            rows,
            cols,
        };
        PackedWeights::pack(&w, ks).unwrap()
    };
    let (pa, pb) = (pack(&a), pack(&b));
    let x = values(cols, 9);
    let mut s = PackedScratch::default();
    let (mut ya, mut yb) = (vec![0f32; rows], vec![0f32; rows]);
    matmul_packed_multi(&mut [(&pa, &mut ya[..]), (&pb, &mut yb[..])], &x, 1, &mut s).unwrap();
    let (mut za, mut zb) = (vec![0f32; rows], vec![0f32; rows]);
    matmul_packed(&pa, &x, 1, &mut za, &mut s).unwrap();
    matmul_packed(&pb, &x, 1, &mut zb, &mut s).unwrap();
    assert_eq!(bits(&ya), bits(&za));
    assert_eq!(bits(&yb), bits(&zb));
}
