//! The packed K-quant and Q5_0 kernels against the packed Q4_0 and Q8_0 ones, one thread, in
//! alternating rounds (each round runs every type once, in an order that rotates), so a busy
//! machine moves all types alike and the ratios hold:
//!
//! `cargo bench -p airlock-kernels --bench kquant`
//!
//! Per type: decode (one token) as weight GiB/s, and a prompt tile (64 tokens) as
//! multiply-adds per second, both medians over the rounds, and each against Q4_0. Also the
//! file-layout kernels of the other formats (Q5_1, Q2_K, Q3_K, Q5_K) for decode.
//! `KQ_ROUNDS` sets the rounds (default 15); `KQ_TYPES=q6_k,q4_k` picks the types measured beside Q4_0;
//! `KQ_ROWS`, `KQ_COLS` (4096 each; columns a multiple of 256 for the K-quants) and `KQ_TOKENS` (64)
//! the shape.

mod common;

use std::time::Instant;

use airlock_kernels::packed::{can_pack, packed_kernels};
use airlock_kernels::{matmul, matmul_packed, GgmlType, PackedScratch, PackedWeights, WeightView};
use common::{values, weights};

fn secs(mut f: impl FnMut()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rounds = env("KQ_ROUNDS", 15);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let ks = packed_kernels().expect("a path with packed kernels");
    println!("packed kernels: {:?}", ks.path);
    use GgmlType::*;
    let all = [Q4_0, Q8_0, Q4_K, Q6_K, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K];
    // `KQ_TYPES=q6_k,q4_k` measures those beside Q4_0 only (Q4_0 stays first: it is the unit).
    let chosen = std::env::var("KQ_TYPES").unwrap_or_default().to_lowercase();
    let types: Vec<GgmlType> = all
        .into_iter()
        .filter(|t| {
            *t == Q4_0
                || chosen.is_empty()
                || chosen.split(',').any(|c| c == t.name().to_lowercase())
        })
        .collect();
    // `KQ_ROWS=32768` makes the matrices larger than the caches (decode then reads DRAM).
    let rows = env("KQ_ROWS", 4096);
    // `KQ_COLS=576 KQ_TOKENS=512`: a SmolLM2 prompt's shape, whose 16-row groups fit L1.
    let cols = env("KQ_COLS", 4096);
    let n = env("KQ_TOKENS", 64);
    struct M {
        ty: GgmlType,
        bytes: usize,
        data: Vec<u8>,
        packed: Option<PackedWeights>,
    }
    let mats: Vec<M> = types
        .iter()
        .map(|&ty| {
            let data = weights(ty, rows, cols);
            let w = WeightView {
                ty,
                data: &data,
                rows,
                cols,
            };
            let packed = can_pack(ty).then(|| PackedWeights::pack(&w, ks).unwrap());
            M {
                ty,
                bytes: data.len(),
                data,
                packed,
            }
        })
        .collect();
    let x1 = values(cols, 7);
    let xn = values(n * cols, 8);
    let mut dec = vec![Vec::new(); types.len()];
    let mut pp = vec![Vec::new(); types.len()];
    pool.install(|| {
        let mut y = vec![0f32; n * rows];
        let mut ps = PackedScratch::default();
        let mut scratch = Vec::new();
        for r in 0..rounds {
            for i in 0..types.len() {
                let m = &mats[(i + r) % types.len()];
                let j = (i + r) % types.len();
                let w = WeightView {
                    ty: m.ty,
                    data: &m.data,
                    rows,
                    cols,
                };
                let mut run = |x: &[f32], nt: usize, y: &mut [f32]| match &m.packed {
                    Some(p) => matmul_packed(p, x, nt, y, &mut ps).unwrap(),
                    None => matmul(&w, x, nt, y, &mut scratch).unwrap(),
                };
                run(&x1, 1, &mut y[..rows]);
                let t = (0..5).map(|_| secs(|| run(std::hint::black_box(&x1), 1, &mut y[..rows])));
                dec[j].push(t.fold(f64::MAX, f64::min));
                pp[j].push(secs(|| run(std::hint::black_box(&xn), n, &mut y)));
            }
        }
    });
    let gib = (1u64 << 30) as f64;
    let macs = (rows * cols * n) as f64;
    let d0 = mats[0].bytes as f64 / median(&mut dec[0].clone()) / gib;
    let p0 = macs / median(&mut pp[0].clone()) / 1e9;
    println!("one thread, {rows}x{cols}, median of {rounds} rounds (decode: best of 5 per round)");
    println!(
        "type  layout  decode GiB/s (x Q4_0)  decode tok-equiv (x Q4_0)  pp{n} GMAC/s (x Q4_0)"
    );
    for (i, m) in mats.iter().enumerate() {
        let td = median(&mut dec[i]);
        let d = m.bytes as f64 / td / gib;
        let p = macs / median(&mut pp[i]) / 1e9;
        let t0 = median(&mut dec[0].clone());
        println!(
            "{:5} {:7} {:6.2} ({:.2}x)  {:.2}x  {:7.1} ({:.2}x)",
            m.ty.name(),
            if m.packed.is_some() { "packed" } else { "file" },
            d,
            d / d0,
            t0 / td,
            p,
            p / p0
        );
    }
}
