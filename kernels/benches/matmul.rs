//! Matvec bandwidth, batch-512 GEMM throughput, and tiled GEMM vs a
//! per-token matvec loop. Run short on a shared machine:
//!
//! `cargo bench -p airlock-kernels --bench matmul -- --warm-up-time 1 --measurement-time 3`
//!
//! `AIRLOCK_SIMD` picks the path as in the engine; the `paths` group runs
//! every available path side by side, and `packed` the file layout beside
//! every path's packed kernels (plus the AVX-VNNI ones in their EVEX
//! encoding where the CPU lacks AVX-VNNI but has AVX-512 VNNI, e.g. Zen 4). Matvec throughput is weight bytes per
//! second (GB/s); GEMM throughput is elements = 2 * rows * cols * tokens
//! operations per second (read Gelem/s as GOP/s).

mod common;
use airlock_kernels::dot::kernels_for;
use airlock_kernels::matmul::matmul_with;
use airlock_kernels::packed::{avxvnni_evex_kernels, packed_kernels_for};
use airlock_kernels::{
    matmul, matmul_packed, simd_path, GgmlType, PackedScratch, PackedWeights, SimdPath, WeightView,
};
use common::{values, weights};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const TYPES: [GgmlType; 4] = [
    GgmlType::Q4_0,
    GgmlType::Q8_0,
    GgmlType::Q4_1,
    GgmlType::F16,
];
/// (name, rows, cols): SmolLM2 ffn_down and an 8B ffn_down.
const SHAPES: [(&str, usize, usize); 2] = [("576x1536", 576, 1536), ("4096x14336", 4096, 14336)];

fn matvec(c: &mut Criterion) {
    eprintln!(
        "simd path: {}, threads: {}",
        simd_path().unwrap(),
        rayon::current_num_threads()
    );
    let mut g = c.benchmark_group("matvec");
    for (name, rows, cols) in SHAPES {
        for ty in TYPES {
            let data = weights(ty, rows, cols);
            let w = WeightView {
                ty,
                data: &data,
                rows,
                cols,
            };
            let x = values(cols, 7);
            let mut y = vec![0f32; rows];
            let mut scratch = Vec::new();
            g.throughput(Throughput::Bytes(data.len() as u64));
            g.bench_function(BenchmarkId::new(ty.name(), name), |b| {
                b.iter(|| matmul(&w, black_box(&x), 1, &mut y, &mut scratch).unwrap())
            });
        }
    }
    g.finish();
}

fn paths(c: &mut Criterion) {
    let mut g = c.benchmark_group("paths");
    let (rows, cols) = (576, 1536);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        let data = weights(ty, rows, cols);
        let w = WeightView {
            ty,
            data: &data,
            rows,
            cols,
        };
        for p in SimdPath::available() {
            let ks = kernels_for(p).unwrap();
            for n in [1usize, 64] {
                let x = values(n * cols, 9);
                let mut y = vec![0f32; n * rows];
                let mut scratch = Vec::new();
                g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
                let id = BenchmarkId::new(format!("{}/{}", ty.name(), p.name()), format!("n{n}"));
                g.bench_function(id, |b| {
                    b.iter(|| matmul_with(ks, &w, black_box(&x), n, &mut y, &mut scratch).unwrap())
                });
            }
        }
    }
    g.finish();
}

fn gemm512(c: &mut Criterion) {
    let n = 512;
    let mut g = c.benchmark_group("gemm512");
    g.sample_size(10);
    for (name, rows, cols) in [("576x1536", 576, 1536), ("2048x2048", 2048, 2048)] {
        for ty in TYPES {
            let data = weights(ty, rows, cols);
            let w = WeightView {
                ty,
                data: &data,
                rows,
                cols,
            };
            let x = values(n * cols, 11);
            let mut y = vec![0f32; n * rows];
            let mut scratch = Vec::new();
            g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
            g.bench_function(BenchmarkId::new(ty.name(), name), |b| {
                b.iter(|| matmul(&w, black_box(&x), n, &mut y, &mut scratch).unwrap())
            });
        }
    }
    g.finish();
}

/// The same 512 tokens as one tiled GEMM and as 512 matvec calls.
fn tiled_vs_loop(c: &mut Criterion) {
    let (n, rows, cols) = (512, 576, 1536);
    let mut g = c.benchmark_group("tiled_vs_loop");
    g.sample_size(10);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_1] {
        let data = weights(ty, rows, cols);
        let w = WeightView {
            ty,
            data: &data,
            rows,
            cols,
        };
        let x = values(n * cols, 13);
        let mut y = vec![0f32; n * rows];
        let mut scratch = Vec::new();
        g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
        g.bench_function(BenchmarkId::new(ty.name(), "tiled"), |b| {
            b.iter(|| matmul(&w, black_box(&x), n, &mut y, &mut scratch).unwrap())
        });
        g.bench_function(BenchmarkId::new(ty.name(), "loop"), |b| {
            b.iter(|| {
                for (xt, yt) in x.chunks_exact(cols).zip(y.chunks_exact_mut(rows)) {
                    matmul(&w, black_box(xt), 1, yt, &mut scratch).unwrap();
                }
            })
        });
    }
    g.finish();
}

/// The same matrix read from the file layout and from every path's packed
/// layout (decode at two shapes, and a 512-token prompt), side by side. The
/// AVX-VNNI kernels run through their EVEX build where the CPU has AVX-512
/// VNNI but not AVX-VNNI (e.g. Zen 4).
fn packed(c: &mut Criterion) {
    let mut tables: Vec<(String, _)> = SimdPath::available()
        .into_iter()
        .filter_map(|p| packed_kernels_for(p).map(|ks| (p.name().to_string(), ks)))
        .collect();
    if !SimdPath::AvxVnni.is_available() {
        tables.extend(avxvnni_evex_kernels().map(|ks| ("avxvnni(evex)".to_string(), ks)));
    }
    if tables.is_empty() {
        eprintln!("packed: no packed kernels on this CPU");
        return;
    }
    let mut g = c.benchmark_group("packed");
    g.sample_size(10);
    let cases = [
        ("576x1536", 576, 1536, 1),
        ("4096x14336", 4096, 14336, 1),
        ("576x1536", 576, 1536, 512),
    ];
    for (name, rows, cols, n) in cases {
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            let data = weights(ty, rows, cols);
            let w = WeightView {
                ty,
                data: &data,
                rows,
                cols,
            };
            let x = values(n * cols, 17);
            let mut y = vec![0f32; n * rows];
            if n == 1 {
                g.throughput(Throughput::Bytes(data.len() as u64));
            } else {
                g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
            }
            let mut scratch = Vec::new();
            let id = BenchmarkId::new(format!("{}/file", ty.name()), format!("{name}/n{n}"));
            g.bench_function(id, |b| {
                b.iter(|| matmul(&w, black_box(&x), n, &mut y, &mut scratch).unwrap())
            });
            for (path, ks) in &tables {
                let p = PackedWeights::pack(&w, ks).unwrap();
                let mut ps = PackedScratch::default();
                let id = BenchmarkId::new(
                    format!("{}/packed/{path}", ty.name()),
                    format!("{name}/n{n}"),
                );
                g.bench_function(id, |b| {
                    b.iter(|| matmul_packed(&p, black_box(&x), n, &mut y, &mut ps).unwrap())
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, matvec, paths, gemm512, tiled_vs_loop, packed);
criterion_main!(benches);
