//! Decode over a whole model's mix of matrices, as the engine runs it: the
//! Llama-3.2-1B layer sequence (Q/K/V together, O, gate/up together, down)
//! sixteen times, then the output head, all packed, one token. The working
//! set (0.7-1.3 GB) is far above the L3, so every byte comes from DRAM, and
//! the matrices are 1-34 MB, so the streams are as short as in a real
//! forward pass. Prints weight GiB/s next to the median read bandwidth
//! ([`ReadBuffer`], one read before each step) of the same run.
//!
//! `cargo bench -p airlock-kernels --bench decode_mix` (`MIX_TYPE=q4_0|q8_0`,
//! `MIX_REPS`, default 10).

use std::time::Instant;

use airlock_kernels::bandwidth::ReadBuffer;
use airlock_kernels::packed::packed_kernels;
use airlock_kernels::{
    matmul_packed, matmul_packed_multi, GgmlType, PackedScratch, PackedWeights, WeightView,
};

const GIB: f64 = (1u64 << 30) as f64;

/// Random blocks of `ty` with scale 1/64 (f16 0x2400): real-looking bytes
/// without running a quantizer over a gigabyte.
fn blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let (bb, qs) = match ty {
        GgmlType::Q4_0 => (18, 16),
        _ => (34, 32),
    };
    let n = rows * cols / 32;
    let mut data = vec![0u8; n * bb];
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in data.chunks_exact_mut(bb) {
        b[0] = 0x00;
        b[1] = 0x24;
        for q in b[2..2 + qs].chunks_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            q.copy_from_slice(&s.to_le_bytes()[..q.len()]);
        }
    }
    data
}

fn main() {
    let Some(ks) = packed_kernels() else {
        println!("no packed kernels on this CPU");
        return;
    };
    let ty = match std::env::var("MIX_TYPE").as_deref() {
        Ok("q8_0") => GgmlType::Q8_0,
        _ => GgmlType::Q4_0,
    };
    let reps: usize = std::env::var("MIX_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (d, kv, ff, layers, vocab) = (2048usize, 512usize, 8192usize, 16, 128256usize);
    let pack = |rows: usize, cols: usize, seed: u64| {
        let data = blocks(ty, rows, cols, seed);
        let w = WeightView {
            ty,
            data: &data,
            rows,
            cols,
        };
        PackedWeights::pack(&w, ks).unwrap()
    };
    let shapes = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)];
    let mats: Vec<Vec<PackedWeights>> = (0..layers)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| pack(r, c, (l * 8 + i) as u64))
                .collect()
        })
        .collect();
    let head = pack(vocab, d, 999);
    let bytes: usize = mats.iter().flatten().map(|m| m.n_bytes()).sum::<usize>() + head.n_bytes();
    let big = ReadBuffer::new(ReadBuffer::DEFAULT_BYTES).unwrap();
    let x = vec![0.5f32; ff];
    let (mut q, mut k, mut v, mut o) =
        (vec![0f32; d], vec![0f32; kv], vec![0f32; kv], vec![0f32; d]);
    let (mut g, mut u, mut dn, mut logits) = (
        vec![0f32; ff],
        vec![0f32; ff],
        vec![0f32; d],
        vec![0f32; vocab],
    );
    let mut s = PackedScratch::default();
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    pool.install(|| {
        let mut step = || {
            for m in &mats {
                matmul_packed_multi(
                    &mut [(&m[0], &mut q[..]), (&m[1], &mut k[..]), (&m[2], &mut v[..])],
                    &x[..d],
                    1,
                    &mut s,
                )
                .unwrap();
                matmul_packed(&m[3], &x[..d], 1, &mut o, &mut s).unwrap();
                matmul_packed_multi(&mut [(&m[4], &mut g[..]), (&m[5], &mut u[..])], &x[..d], 1, &mut s)
                    .unwrap();
                matmul_packed(&m[6], &x[..ff], 1, &mut dn, &mut s).unwrap();
            }
            matmul_packed(&head, &x[..d], 1, &mut logits, &mut s).unwrap();
        };
        step();
        let (mut reads, mut ts) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            reads.push(big.rate(1) / GIB);
            let t = Instant::now();
            step();
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(f64::total_cmp);
        reads.sort_by(f64::total_cmp);
        let read = reads[reads.len() / 2];
        let gb = bytes as f64 / GIB;
        println!(
            "{} 1B mix, {} threads, {:.2} GiB: best {:.2} GiB/s, median {:.2} GiB/s ({:.0}% of the median read {:.1} GiB/s), median {:.1} ms/token",
            ty.name(),
            rayon::current_num_threads(),
            gb,
            gb / ts[0],
            gb / ts[ts.len() / 2],
            100.0 * gb / ts[ts.len() / 2] / read,
            read,
            ts[ts.len() / 2] * 1e3
        );
    });
}
