//! Attention: prompt batches (SmolLM2 and 8B shapes) and single-token decode
//! (8B shape) at several context lengths, f16 KV cache as the engine uses.
//! Run short on a shared machine:
//!
//! `cargo bench -p airlock-kernels --bench attention -- --warm-up-time 1 --measurement-time 3`
//!
//! `AIRLOCK_SIMD=scalar` measures the portable path. Throughput is in
//! query-key pairs per head per second (elements), so the numbers compare
//! across shapes.

mod common;
use airlock_kernels::attention::{attention, AttentionShape, KvRows};
use common::values;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;

struct Case {
    name: &'static str,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    pos0: usize,
    n_tokens: usize,
}

fn run(c: &mut Criterion, group: &str, cases: &[Case]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for cs in cases {
        let kvd = cs.n_head_kv * cs.head_dim;
        let rows = cs.pos0 + cs.n_tokens;
        let q = values(cs.n_tokens * cs.n_head * cs.head_dim, 1);
        let k: Vec<f16> = values(rows * kvd, 2)
            .iter()
            .map(|&x| f16::from_f32(x * 4.0))
            .collect();
        let v: Vec<f16> = values(rows * kvd, 3)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let mut out = vec![0.0f32; q.len()];
        let s = AttentionShape {
            n_head: cs.n_head,
            n_head_kv: cs.n_head_kv,
            head_dim: cs.head_dim,
            pos0: cs.pos0,
        };
        // Query-key pairs that the causal mask leaves visible, per head.
        let pairs: usize = (0..cs.n_tokens).map(|t| cs.pos0 + t + 1).sum();
        g.throughput(Throughput::Elements((pairs * cs.n_head) as u64));
        g.bench_function(BenchmarkId::from_parameter(cs.name), |b| {
            b.iter(|| attention(s, black_box(&q), KvRows::F16(&k), KvRows::F16(&v), &mut out))
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
    };
    let b8 = |name, pos0, n_tokens| Case {
        name,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        pos0,
        n_tokens,
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
    let b8 = |name, pos0| Case {
        name,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        pos0,
        n_tokens: 1,
    };
    let sm = |name, pos0| Case {
        name,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 64,
        pos0,
        n_tokens: 1,
    };
    run(
        c,
        "attention_decode",
        &[
            b8("8b_ctx256", 255),
            b8("8b_ctx1024", 1023),
            b8("8b_ctx4096", 4095),
            sm("smollm2_ctx512", 511),
        ],
    );
}

criterion_group!(benches, prompt, decode);
criterion_main!(benches);
