//! Every SIMD path the CPU has, forced through its kernel table, against the
//! scalar reference: random data on shapes that are not multiples of the
//! tiles, exact integer sums, bit-identity between the x86 paths, the
//! activation quantizers' bytes, and the tile walk.

use super::*;
use crate::quant::float::{f32_to_bf16, f32_to_f16};
use crate::quant::{quantize_row_q4_0, quantize_row_q4_1, quantize_row_q8_0, quantize_row_q8_1};
use bytemuck::Zeroable;

const U: f64 = 1.0 / (1u64 << 24) as f64;

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
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| self.f() * scale * (1.0 + (i / 32 % 5) as f32))
            .collect()
    }
}

/// The table of every SIMD path this CPU has (plus the test-only EVEX
/// instantiation of the AVX-VNNI code where it can run).
fn simd_tables() -> Vec<(&'static str, &'static Kernels)> {
    let v: Vec<(&'static str, &'static Kernels)> = SimdPath::available()
        .into_iter()
        .filter(|&p| p != SimdPath::Scalar)
        .map(|p| (p.name(), kernels_for(p).unwrap()))
        .collect();
    #[cfg(target_arch = "x86_64")]
    let v = {
        let mut v = v;
        if avxvnni::evex::available() {
            v.push(("avxvnni(evex)", &avxvnni::evex::KERNELS));
        }
        v
    };
    v
}

#[test]
fn simd_paths_exist_here() {
    // This machine family has AVX2 at least; on others the list may be empty.
    eprintln!(
        "paths: {:?}",
        simd_tables().iter().map(|t| t.0).collect::<Vec<_>>()
    );
    #[cfg(target_arch = "x86_64")]
    assert!(kernels_for(SimdPath::Neon).is_err());
    #[cfg(target_arch = "aarch64")]
    {
        // NEON is baseline on aarch64; the x86 paths never exist there.
        assert_eq!(kernels_for(SimdPath::Neon).unwrap().path, SimdPath::Neon);
        assert!(kernels_for(SimdPath::Avx2).is_err());
        // qemu-aarch64's default CPU ("max") has FEAT_DotProd, so under
        // scripts/test-aarch64.sh both NEON paths run every test here
        // (QEMU_CPU=cortex-a72 emulates one without it).
        let emulated = std::env::var("AIRLOCK_TEST_RUNNER").is_ok_and(|r| r.contains("qemu"));
        if emulated && std::env::var_os("QEMU_CPU").is_none() {
            let names: Vec<_> = simd_tables().iter().map(|t| t.0).collect();
            assert_eq!(names, ["neon", "neon-dotprod"]);
            assert_eq!(
                kernels_for(SimdPath::NeonDotprod).unwrap().path,
                SimdPath::NeonDotprod
            );
        }
    }
}

/// On aarch64 the quantized GEMMs do scalar's f32 operations in scalar's
/// order on exact integer sums, so they give scalar's bits exactly, for
/// every tile shape (4 x 2, 4 x 1, 1 x 2, 1 x 1 all occur here).
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_quantized_gemms_give_scalar_bits() {
    let mut seed = 500;
    let mut ran = 0;
    for rows in [1, 4, 7, 33] {
        for n in [1, 2, 3, 8] {
            for k in [1, 3, 16] {
                seed += 1;
                let c = QCase::new(rows, n, k, seed);
                let want = c.run(&SCALAR);
                for &(name, ks) in &simd_tables() {
                    let got = c.run(ks);
                    for ty in 0..3 {
                        let a: Vec<u32> = want[ty].iter().map(|v| v.to_bits()).collect();
                        let b: Vec<u32> = got[ty].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(a, b, "{name} type {ty} rows {rows} n {n} k {k}");
                    }
                    ran += 1;
                }
            }
        }
    }
    assert!(ran > 0);
}

struct QCase {
    rows: usize,
    n: usize,
    k: usize,
    q4_0: Vec<BlockQ4_0>,
    q4_1: Vec<BlockQ4_1>,
    q8_0: Vec<BlockQ8_0>,
    a8_0: Vec<BlockQ8_0>,
    a8_1: Vec<BlockQ8_1>,
}

impl QCase {
    fn new(rows: usize, n: usize, k: usize, seed: u64) -> QCase {
        let mut r = Rng::new(seed);
        let w = r.vec(rows * k * 32, 1.0);
        let w1: Vec<f32> = w.iter().map(|v| v + 0.3).collect();
        let x = r.vec(n * k * 32, 3.0);
        let mut c = QCase {
            rows,
            n,
            k,
            q4_0: vec![BlockQ4_0::zeroed(); rows * k],
            q4_1: vec![BlockQ4_1::zeroed(); rows * k],
            q8_0: vec![BlockQ8_0::zeroed(); rows * k],
            a8_0: vec![BlockQ8_0::zeroed(); n * k],
            a8_1: vec![BlockQ8_1::zeroed(); n * k],
        };
        quantize_row_q4_0(&w, &mut c.q4_0);
        quantize_row_q4_1(&w1, &mut c.q4_1);
        quantize_row_q8_0(&w, &mut c.q8_0);
        quantize_row_q8_0(&x, &mut c.a8_0);
        quantize_row_q8_1(&x, &mut c.a8_1);
        c
    }

    fn run(&self, ks: &Kernels) -> [Vec<f32>; 3] {
        let mut o = [
            vec![f32::NAN; self.rows * self.n],
            vec![f32::NAN; self.rows * self.n],
            vec![f32::NAN; self.rows * self.n],
        ];
        (ks.q4_0)(&self.q4_0, &self.a8_0, self.k, &mut o[0]);
        (ks.q8_0)(&self.q8_0, &self.a8_0, self.k, &mut o[1]);
        (ks.q4_1)(&self.q4_1, &self.a8_1, self.k, &mut o[2]);
        o
    }

    /// Per output, sum over blocks of |dx dy| sum_j |qx_j qy_j| (+ 2|m s|
    /// for Q4_1): the scale of the f32 rounding errors whatever the lane
    /// split of the integer sums.
    fn mags(&self) -> [Vec<f64>; 3] {
        let nib = |qs: &[u8; 16], j: usize| {
            if j < 16 {
                qs[j] & 15
            } else {
                qs[j - 16] >> 4
            }
        };
        let mut m = [vec![], vec![], vec![]];
        for t in 0..self.n {
            for r in 0..self.rows {
                let (mut a, mut b, mut c) = (0f64, 0f64, 0f64);
                for bi in 0..self.k {
                    let (x0, x8, x1) = (
                        &self.q4_0[r * self.k + bi],
                        &self.q8_0[r * self.k + bi],
                        &self.q4_1[r * self.k + bi],
                    );
                    let (y0, y1) = (&self.a8_0[t * self.k + bi], &self.a8_1[t * self.k + bi]);
                    let (mut s0, mut s8, mut s1) = (0f64, 0f64, 0f64);
                    for j in 0..32 {
                        s0 += ((nib(&x0.qs, j) as f64 - 8.0) * y0.qs[j] as f64).abs();
                        s8 += (x8.qs[j] as f64 * y0.qs[j] as f64).abs();
                        s1 += (nib(&x1.qs, j) as f64 * y1.qs[j] as f64).abs();
                    }
                    a += s0 * (x0.d() as f64 * y0.d() as f64).abs();
                    b += s8 * (x8.d() as f64 * y0.d() as f64).abs();
                    c += s1 * (x1.d() as f64 * y1.d() as f64).abs()
                        + 2.0 * (x1.m() as f64 * y1.s() as f64).abs();
                }
                m[0].push(a);
                m[1].push(b);
                m[2].push(c);
            }
        }
        m
    }
}

#[test]
fn quantized_gemms_match_scalar_on_odd_shapes() {
    let tables = simd_tables();
    let mut seed = 11;
    for rows in [1, 3, 17, 65] {
        for n in [1, 2, 5, 9, 33] {
            for k in [1, 2, 7, 33, 128] {
                seed += 1;
                let c = QCase::new(rows, n, k, seed);
                let want = c.run(&SCALAR);
                let mags = c.mags();
                let mut first: Option<[Vec<f32>; 3]> = None;
                for &(name, ks) in &tables {
                    let got = c.run(ks);
                    for ty in 0..3 {
                        for i in 0..rows * n {
                            // Both sides are within (k + 8) u mag of the
                            // exact value (integer sums exact, one rounding
                            // per block and per lane sum).
                            let tol = 2.0 * (k as f64 + 8.0) * U * mags[ty][i] + 1e-30;
                            let (g, w) = (got[ty][i] as f64, want[ty][i] as f64);
                            assert!(
                                (g - w).abs() <= tol,
                                "{name} type {ty} rows {rows} n {n} k {k} at {i}: {g} vs {w}"
                            );
                        }
                    }
                    // The paths of one architecture share lane semantics
                    // (x86: 8 fma lanes; aarch64: scalar's order), so
                    // they give identical bits.
                    match &first {
                        None => first = Some(got),
                        Some(f) => {
                            for ty in 0..3 {
                                let a: Vec<u32> = f[ty].iter().map(|v| v.to_bits()).collect();
                                let b: Vec<u32> = got[ty].iter().map(|v| v.to_bits()).collect();
                                assert_eq!(a, b, "{name} vs first path, type {ty}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// With f16 scales of +-1 and +-2 and at most 8 blocks every partial sum is
/// an integer below 2^24, so no float operation rounds: every path must give
/// scalar's bits exactly, which checks the integer sums (including weight
/// bytes of -128 for Q8_0 and every nibble value).
#[test]
fn integer_sums_are_exact() {
    let scales = [0x3C00u16, 0xBC00, 0x4000, 0xC000];
    let mut r = Rng::new(5);
    for trial in 0..200 {
        let (rows, n, k) = (1 + trial % 7, 1 + trial % 6, 1 + trial % 8);
        let sc = |r: &mut Rng| scales[(r.next() % 4) as usize].to_le_bytes();
        let mut c = QCase::new(rows, n, k, trial as u64);
        for b in &mut c.q4_0 {
            b.d = sc(&mut r);
            for q in &mut b.qs {
                *q = r.next() as u8;
            }
        }
        for b in &mut c.q8_0 {
            b.d = sc(&mut r);
            for q in &mut b.qs {
                *q = r.next() as i8; // -128 included
            }
        }
        for b in &mut c.q4_1 {
            b.d = sc(&mut r);
            b.m = sc(&mut r);
            for q in &mut b.qs {
                *q = r.next() as u8;
            }
        }
        for b in &mut c.a8_0 {
            b.d = [0x00, 0x3C];
            for q in &mut b.qs {
                *q = (r.next() % 255) as i8 as i16 as i8;
                if *q == -128 {
                    *q = 127;
                }
            }
        }
        for b in &mut c.a8_1 {
            b.d = [0x00, 0x3C];
            b.s = sc(&mut r);
            for q in &mut b.qs {
                *q = ((r.next() % 255) as i32 - 127) as i8;
            }
        }
        let want = c.run(&SCALAR);
        for &(name, ks) in &simd_tables() {
            let got = c.run(ks);
            for ty in 0..3 {
                let a: Vec<u32> = want[ty].iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = got[ty].iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "{name} type {ty} trial {trial}");
            }
        }
    }
}

#[test]
fn float_gemms_match_scalar() {
    let mut seed = 100;
    for cols in [1, 7, 8, 9, 33, 100, 576] {
        for (rows, n) in [(1, 1), (3, 2), (9, 5), (17, 3)] {
            seed += 1;
            let mut r = Rng::new(seed);
            let w = r.vec(rows * cols, 2.0);
            let x = r.vec(n * cols, 1.0);
            let h = |v: &[f32]| -> Vec<F16Bytes> {
                v.iter().map(|&a| f32_to_f16(a).to_le_bytes()).collect()
            };
            let bf = |v: &[f32]| -> Vec<Bf16Bytes> {
                v.iter().map(|&a| f32_to_bf16(a).to_le_bytes()).collect()
            };
            let fb: Vec<F32Bytes> = w.iter().map(|v| v.to_le_bytes()).collect();
            let (wh, xh, wb, xb) = (h(&w), h(&x), bf(&w), bf(&x));
            // sum |w x| per output bounds every rounding error.
            let mut mag = vec![0f64; rows * n];
            for t in 0..n {
                for i in 0..rows {
                    for e in 0..cols {
                        mag[t * rows + i] +=
                            (w[i * cols + e] as f64 * x[t * cols + e] as f64).abs() * 1.01;
                    }
                }
            }
            let run = |ks: &Kernels| {
                let mut o = vec![vec![f32::NAN; rows * n]; 6];
                (ks.f16)(&wh, &xh, cols, &mut o[0]);
                (ks.bf16)(&wb, &xb, cols, &mut o[1]);
                (ks.f32_le)(&fb, &x, cols, &mut o[2]);
                (ks.f16_f32)(&wh, &x, cols, &mut o[3]);
                (ks.bf16_f32)(&wb, &x, cols, &mut o[4]);
                (ks.f32)(&w, &x, cols, &mut o[5]);
                o
            };
            let want = run(&SCALAR);
            for &(name, ks) in &simd_tables() {
                let got = run(ks);
                for f in 0..6 {
                    for i in 0..rows * n {
                        let tol = 2.0 * (cols as f64 + 2.0) * U * mag[i] + 1e-30;
                        let (g, wv) = (got[f][i] as f64, want[f][i] as f64);
                        assert!(
                            (g - wv).abs() <= tol,
                            "{name} float kind {f} {rows}x{cols} n {n} at {i}: {g} vs {wv}"
                        );
                    }
                }
            }
        }
    }
}

/// Blocks that stress the quantizer: exact .5 ties (round half away from
/// zero), zeros and -0.0, NaN, infinities, huge and subnormal values.
fn hard_blocks() -> Vec<[f32; 32]> {
    let mut v = vec![];
    let mut ties = [0f32; 32];
    for (i, t) in ties.iter_mut().enumerate() {
        // amax 127 -> d = 1, id = 1: x * id = x exactly.
        *t = (i as f32 - 16.0) + 0.5;
    }
    ties[0] = 127.0;
    v.push(ties);
    let mut neg = ties;
    neg.iter_mut().for_each(|x| *x = -*x);
    v.push(neg);
    v.push([0.0; 32]);
    v.push([-0.0; 32]);
    let mut nan = ties;
    nan[5] = f32::NAN;
    v.push(nan);
    let mut nan_last = ties;
    nan_last[31] = f32::NAN;
    v.push(nan_last);
    let mut inf = ties;
    inf[3] = f32::INFINITY;
    v.push(inf);
    let mut ninf = ties;
    ninf[30] = f32::NEG_INFINITY;
    v.push(ninf);
    v.push([3.0e38; 32]);
    let mut huge = [1.0f32; 32];
    huge[7] = -f32::MAX;
    v.push(huge);
    v.push([1.0e-40; 32]);
    let mut tiny = [0f32; 32];
    tiny[2] = f32::from_bits(1);
    tiny[9] = -f32::from_bits(3);
    v.push(tiny);
    v
}

#[test]
fn simd_activation_quantizers_give_reference_bytes() {
    let mut r = Rng::new(77);
    let mut rows: Vec<Vec<f32>> = hard_blocks().iter().map(|b| b.to_vec()).collect();
    for e in -30..30 {
        let s = 2f32.powi(e);
        rows.push(r.vec(32 * 9, s));
    }
    for &(name, ks) in &simd_tables() {
        for x in &rows {
            let nb = x.len() / 32;
            let (mut a, mut b) = (vec![BlockQ8_0::zeroed(); nb], vec![BlockQ8_0::zeroed(); nb]);
            quantize_row_q8_0(x, &mut a);
            (ks.quantize_q8_0)(x, &mut b);
            assert_eq!(a, b, "{name} q8_0 on {:?}", &x[..4]);
            let (mut a, mut b) = (vec![BlockQ8_1::zeroed(); nb], vec![BlockQ8_1::zeroed(); nb]);
            quantize_row_q8_1(x, &mut a);
            (ks.quantize_q8_1)(x, &mut b);
            assert_eq!(a, b, "{name} q8_1 on {:?}", &x[..4]);
        }
    }
}

/// The Q8_K activation quantizer of every path against ggml's reference,
/// byte for byte: random rows at scales 2^-30..2^30, each hard block of
/// [`hard_blocks`] (NaN, infinities, ties, zeros, denormals, f32::MAX) set
/// into a random row at several offsets, and the value of largest magnitude
/// twice with opposite signs (the reference keeps the first one's sign).
#[test]
fn simd_q8_k_quantizer_gives_reference_bytes() {
    use crate::quant::{quantize_row_q8_k, BlockQ8_K};
    let mut r = Rng::new(78);
    let mut rows: Vec<Vec<f32>> = (-30..30).map(|e| r.vec(256 * 3, 2f32.powi(e))).collect();
    for hard in hard_blocks() {
        for at in [0, 32, 224] {
            let mut x = r.vec(256, 1e-3);
            x[at..at + 32].copy_from_slice(&hard);
            rows.push(x);
        }
        rows.push(hard.repeat(8));
    }
    for (i, j) in [(3, 200), (200, 3), (0, 255), (255, 0)] {
        let mut x = r.vec(256, 1.0);
        (x[i], x[j]) = (-50.0, 50.0);
        rows.push(x);
    }
    for &(name, ks) in &simd_tables() {
        for x in &rows {
            let nb = x.len() / 256;
            let (mut a, mut b) = (vec![BlockQ8_K::zeroed(); nb], vec![BlockQ8_K::zeroed(); nb]);
            quantize_row_q8_k(x, &mut a);
            (ks.quantize_q8_k)(x, &mut b);
            assert_eq!(a, b, "{name} q8_K on {:?}", &x[..4]);
        }
    }
}

#[test]
fn tile_walk_covers_every_output_once() {
    for (rows, n, mr, nr, rb) in [
        (17, 9, 4, 4, 1),
        (65, 33, 4, 4, 100),
        (3, 1, 4, 4, 8),
        (8, 8, 4, 2, 1 << 20),
    ] {
        let mut seen = vec![0u8; rows * n];
        let tiles = for_tiles(rows, n, rb, (mr, nr), |r0, t0, m, c| {
            assert!((m == mr || m == 1) && (c == nr || c == 1));
            for t in t0..t0 + c {
                for r in r0..r0 + m {
                    seen[t * rows + r] += 1;
                }
            }
        });
        assert!(seen.iter().all(|&s| s == 1), "{rows}x{n}");
        assert_eq!(tiles.full, (rows / mr) * (n / nr), "{rows}x{n}");
    }
}

/// A batch on sizes that are not tile multiples runs full tiles plus edge
/// tiles on every SIMD path: for 17 rows x 9 tokens and an mr x nr tile,
/// (17/mr)(9/nr) full ones, then single rows x nr tokens, single tokens x
/// (mr rows, then single rows).
#[test]
fn batches_take_the_tiled_path() {
    let c = QCase::new(17, 9, 5, 3);
    for &(name, ks) in &simd_tables() {
        let (mr, nr) = ks.tile;
        assert!(mr > 1 && nr > 1, "{name}");
        let want = Tiles {
            full: (17 / mr) * (9 / nr),
            edge: (17 % mr) * (9 / nr) + (9 % nr) * (17 / mr + 17 % mr),
        };
        let mut o = vec![0f32; 17 * 9];
        let t = (ks.q4_0)(&c.q4_0, &c.a8_0, 5, &mut o);
        assert_eq!(t, want, "{name}");
        let t = (ks.q4_1)(&c.q4_1, &c.a8_1, 5, &mut o);
        assert_eq!(t, want, "{name}");
        let t = (ks.q8_0)(&c.q8_0, &c.a8_0, 5, &mut o);
        assert_eq!(t, want, "{name}");
    }
    assert_eq!(
        (SCALAR.q4_0)(&c.q4_0, &c.a8_0, 5, &mut vec![0f32; 17 * 9]),
        Tiles::default()
    );
}

#[test]
fn public_dots_are_the_active_paths_one_by_one_gemm() {
    let c = QCase::new(1, 1, 9, 8);
    let ks = kernels().unwrap();
    let mut o = [0f32];
    (ks.q4_0)(&c.q4_0, &c.a8_0, 9, &mut o);
    assert_eq!(vec_dot_q4_0_q8_0(&c.q4_0, &c.a8_0), o[0]);
    assert_eq!(vec_dot_q4_0_q8_0(&[], &[]), 0.0);
    assert_eq!(vec_dot_f16_f32(&[], &[]), 0.0);
}

#[test]
fn exact_dot_gives_the_scalar_twins_bits_on_every_length() {
    // The dispatched exact-path dot (AVX2 where the CPU has it) against its scalar body as
    // this test compiles it (baseline ISA): lengths around the 16 lanes and the tail, values
    // spanning 2^±20 so a reordered sum would round differently.
    let mut r = Rng::new(91);
    for n in (0..70).chain([575, 576, 1536, 4097]) {
        let x: Vec<f32> = (0..n)
            .map(|i| r.f() * 2f32.powi((i % 41) as i32 - 20))
            .collect();
        let y = r.vec(n, 3.0);
        let got = vec_dot_f32_f64acc(&x, &y);
        let want = scalar::vec_dot_f32_f64acc(&x, &y);
        assert_eq!(got.to_bits(), want.to_bits(), "length {n}");
    }
}
