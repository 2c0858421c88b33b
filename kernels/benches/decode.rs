//! Decode (one-token matvec) bandwidth next to the machine's read
//! bandwidth, in one run, at 1 and 2 threads:
//!
//! `cargo bench -p airlock-kernels --bench decode`
//!
//! Prints, per thread count: a STREAM-style read ([`ReadBuffer`]: a sum of
//! a 512 MiB u64 array), then for each type and shape the weight bytes per
//! second of `matmul(.., n_tokens = 1, ..)` (best and median of the
//! repetitions) and its ratio to that read bandwidth, and the per-call
//! time of a tiny matrix (fork/join overhead). Where the CPU has packed
//! kernels, each Q4_0/Q4_1/Q8_0 matrix is also run in the repacked layout. `DECODE_REPS` sets the
//! repetitions (default 30); `DECODE_THREADS` a list like `1,2`.

mod common;

use std::time::Instant;

use airlock_kernels::bandwidth::ReadBuffer;
use airlock_kernels::packed::{can_pack, packed_kernels};
use airlock_kernels::{
    matmul, matmul_packed, simd_path, GgmlType, PackedScratch, PackedWeights, WeightView,
};
use common::{values, weights};

const GIB: f64 = (1u64 << 30) as f64;

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
    let big = ReadBuffer::new(ReadBuffer::DEFAULT_BYTES).unwrap();
    println!("simd path: {}", simd_path().unwrap());
    for &nt in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(nt)
            .build()
            .unwrap();
        pool.install(|| {
            let read = big.rate(reps.min(10)) / GIB;
            println!("threads {nt}: read bandwidth {read:.1} GiB/s (512 MiB, bandwidth::ReadBuffer)");
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
