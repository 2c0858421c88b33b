//! Attention: prompt batches (SmolLM2 and 8B shapes) and single-token decode
//! (1B/8B shapes) at several context lengths, f16 and Q8_0 KV caches as the
//! engine stores them.
//! Run short on a shared machine:
//!
//! `cargo bench -p airlock-kernels --bench attention -- --warm-up-time 1 --measurement-time 3`
//!
//! `1b_ctx4096_16_layers` and `1b_ctx16384_16_layers` are a whole 1B-shape token's attention
//! at that context, its caches read from memory.
//!
//! `AIRLOCK_SIMD=scalar` measures the portable path. Throughput is in
//! query-key pairs per head per second (elements), so the numbers compare
//! across shapes.

mod common;
use airlock_kernels::attention::{attention, AttentionShape, KvStore, KvType};
use common::values;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

struct Case {
    name: &'static str,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    pos0: usize,
    n_tokens: usize,
    kv: KvType,
    /// Layers run one after the other per iteration, each with its own cache: with 16, the
    /// caches of a 1B-shape token at ctx 4096 (134 MB) come from memory as in a real decode
    /// step, not from the last iteration's cache lines.
    layers: usize,
}

fn run(c: &mut Criterion, group: &str, cases: &[Case]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for cs in cases {
        let kvd = cs.n_head_kv * cs.head_dim;
        let rows = cs.pos0 + cs.n_tokens;
        let q = values(cs.n_tokens * cs.n_head * cs.head_dim, 1);
        let k: Vec<f32> = values(rows * kvd, 2).iter().map(|&x| x * 4.0).collect();
        let v = values(rows * kvd, 3);
        let mut store = KvStore::new(cs.kv, cs.layers, cs.n_head_kv, cs.head_dim, rows);
        for l in 0..cs.layers {
            for p in 0..rows {
                store.write(l, p, &k[p * kvd..][..kvd], &v[p * kvd..][..kvd]);
            }
        }
        let mut out = vec![0.0f32; q.len()];
        let s = AttentionShape {
            n_head: cs.n_head,
            n_head_kv: cs.n_head_kv,
            head_dim: cs.head_dim,
            pos0: cs.pos0,
        };
        // Query-key pairs that the causal mask leaves visible, per head.
        let pairs: usize = (0..cs.n_tokens).map(|t| cs.pos0 + t + 1).sum();
        g.throughput(Throughput::Elements((pairs * cs.n_head * cs.layers) as u64));
        g.bench_function(BenchmarkId::from_parameter(cs.name), |b| {
            b.iter(|| {
                for l in 0..cs.layers {
                    attention(s, black_box(&q), store.layer(l), &mut out)
                }
            })
        });
    }
    g.finish();
}

fn prompt(c: &mut Criterion) {
    let sm = |name, pos0, n_tokens| Case {
        name,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 64,
        pos0,
        n_tokens,
        kv: KvType::F16,
        layers: 1,
    };
    let b8 = |name, pos0, n_tokens| Case {
        name,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        pos0,
        n_tokens,
        kv: KvType::F16,
        layers: 1,
    };
    run(
        c,
        "attention_prompt",
        &[
            sm("smollm2_p128", 0, 128),
            sm("smollm2_p512", 0, 512),
            sm("smollm2_p512_at1536", 1536, 512),
            b8("8b_p512", 0, 512),
        ],
    );
}

fn decode(c: &mut Criterion) {
    let b8 = |name, pos0, kv| Case {
        name,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        pos0,
        n_tokens: 1,
        kv,
        layers: 1,
    };
    let b1 = |name, pos0, kv| Case {
        name,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 64,
        pos0,
        n_tokens: 1,
        kv,
        layers: 1,
    };
    let sm = |name, pos0| Case {
        name,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 64,
        pos0,
        n_tokens: 1,
        kv: KvType::F16,
        layers: 1,
    };
    run(
        c,
        "attention_decode",
        &[
            b8("8b_ctx256", 255, KvType::F16),
            b8("8b_ctx1024", 1023, KvType::F16),
            b8("8b_ctx4096", 4095, KvType::F16),
            b8("8b_ctx4096_q8_0", 4095, KvType::Q8_0),
            b1("1b_ctx4096", 4095, KvType::F16),
            b1("1b_ctx4096_q8_0", 4095, KvType::Q8_0),
            b1("1b_ctx16384", 16383, KvType::F16),
            Case {
                layers: 16,
                ..b1("1b_ctx4096_16_layers", 4095, KvType::F16)
            },
            Case {
                layers: 16,
                ..b1("1b_ctx16384_16_layers", 16383, KvType::F16)
            },
            sm("smollm2_ctx512", 511),
        ],
    );
}

criterion_group!(benches, prompt, decode);
criterion_main!(benches);
