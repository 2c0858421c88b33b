//! Decode (one-token matvec) bandwidth next to the machine's read
//! bandwidth, in one run, at 1 and 2 threads:
//!
//! `cargo bench -p airlock-kernels --bench decode`
//!
//! Prints, per thread count: a STREAM-style read (AVX-512 or scalar sum of
//! a 512 MiB u64 array), then for each type and shape the weight bytes per
//! second of `matmul(.., n_tokens = 1, ..)` (best and median of the
//! repetitions) and its ratio to that read bandwidth, and the per-call
//! time of a tiny matrix (fork/join overhead). Where the CPU has packed
//! kernels, each Q4_0/Q4_1/Q8_0 matrix is also run in the repacked layout. `DECODE_REPS` sets the
//! repetitions (default 30); `DECODE_THREADS` a list like `1,2`.

use std::time::Instant;

use airlock_kernels::packed::{can_pack, packed_kernels};
use airlock_kernels::{
    matmul, matmul_packed, quantize_row, simd_path, GgmlType, PackedScratch, PackedWeights,
    WeightView,
};

const GIB: f64 = (1u64 << 30) as f64;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut data = vec![0u8; rows * rb];
    let src = values(64 * cols, ty.id() as u64 + 1);
    for (r, dst) in data.chunks_exact_mut(rb).enumerate() {
        quantize_row(ty, &src[(r % 64) * cols..][..cols], dst).unwrap();
    }
    data
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(a: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let chunks = a.chunks_exact(32);
    let rest: u64 = chunks.remainder().iter().fold(0, |s, &v| s.wrapping_add(v));
    for c in chunks {
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: c has 32 u64s, i < 4: 8 u64s at c[8i] are in bounds.
            let v = unsafe { _mm512_loadu_si512(c.as_ptr().add(8 * i) as *const _) };
            *acc = _mm512_add_epi64(*acc, v);
        }
    }
    let s = _mm512_add_epi64(
        _mm512_add_epi64(acc[0], acc[1]),
        _mm512_add_epi64(acc[2], acc[3]),
    );
    _mm512_reduce_add_epi64(s) as u64 + rest
}

fn sum(a: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { sum_avx512(a) };
    }
    a.iter().fold(0u64, |s, &v| s.wrapping_add(v))
}

/// Runs `f` `reps` times; returns (best, median) seconds.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[0], t[t.len() / 2])
}

fn main() {
    // cargo bench passes --bench; ignore arguments.
    let reps: usize = std::env::var("DECODE_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let threads: Vec<usize> = std::env::var("DECODE_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let shapes = [(4096usize, 14336usize), (2048, 8192)];
    let types = [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_1];
    let mats: Vec<(GgmlType, usize, usize, Vec<u8>)> = shapes
        .iter()
        .flat_map(|&(r, c)| types.iter().map(move |&ty| (ty, r, c)))
        .map(|(ty, r, c)| (ty, r, c, weights(ty, r, c)))
        .collect();
    let big: Vec<u64> = (0..(64usize << 20)).map(|i| i as u64).collect();
    println!("simd path: {}", simd_path().unwrap());
    for &nt in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(nt)
            .build()
            .unwrap();
        pool.install(|| {
            let per = big.len().div_ceil(nt);
            let (bw, _) = time(reps.min(10), || {
                let s: u64 = rayon::broadcast(|ctx| {
                    let i = ctx.index();
                    let lo = (i * per).min(big.len());
                    sum(&big[lo..(lo + per).min(big.len())])
                })
                .into_iter()
                .fold(0, u64::wrapping_add);
                std::hint::black_box(s);
            });
            let read = (big.len() * 8) as f64 / bw / GIB;
            println!("threads {nt}: read bandwidth {read:.1} GiB/s (512 MiB u64 sum)");
            for (ty, rows, cols, data) in &mats {
                let w = WeightView {
                    ty: *ty,
                    data,
                    rows: *rows,
                    cols: *cols,
                };
                let x = values(*cols, 7);
                let mut y = vec![0f32; *rows];
                let mut scratch = Vec::new();
                let (best, med) = time(reps, || {
                    matmul(&w, std::hint::black_box(&x), 1, &mut y, &mut scratch).unwrap()
                });
                let gb = data.len() as f64 / GIB;
                println!(
                    "threads {nt}: {:5} {rows}x{cols}: best {:.2} GiB/s ({:.0}% of read), median {:.2} GiB/s, {:.0} us",
                    ty.name(),
                    gb / best,
                    100.0 * gb / best / read,
                    gb / med,
                    med * 1e6
                );
                // The same matrix in the layout the engine repacks it to, where this CPU has one.
                if let Some(ks) = packed_kernels().filter(|_| can_pack(*ty)) {
                    let p = PackedWeights::pack(&w, ks).unwrap();
                    let mut ps = PackedScratch::default();
                    let (best, med) = time(reps, || {
                        matmul_packed(&p, std::hint::black_box(&x), 1, &mut y, &mut ps).unwrap()
                    });
                    println!(
                        "threads {nt}: {:5} {rows}x{cols} packed: best {:.2} GiB/s ({:.0}% of read), median {:.2} GiB/s, {:.0} us",
                        ty.name(),
                        gb / best,
                        100.0 * gb / best / read,
                        gb / med,
                        med * 1e6
                    );
                }
            }
            // Per-call overhead: a tiny matrix, mostly fork/join.
            let (rows, cols) = (64, 256);
            let data = weights(GgmlType::Q4_0, rows, cols);
            let w = WeightView {
                ty: GgmlType::Q4_0,
                data: &data,
                rows,
                cols,
            };
            let x = values(cols, 7);
            let mut y = vec![0f32; rows];
            let mut scratch = Vec::new();
            let (best, med) = time(reps * 100, || {
                matmul(&w, std::hint::black_box(&x), 1, &mut y, &mut scratch).unwrap()
            });
            println!(
                "threads {nt}: Q4_0 {rows}x{cols} per call: best {:.2} us, median {:.2} us",
                best * 1e6,
                med * 1e6
            );
        });
    }
}
