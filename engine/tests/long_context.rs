//! Decoding deep into a context, and the Q8_0 KV cache, on the real model (SmolLM2-135M Q4_1)
//! and the tiny Llama 3.
//!
//! A decoding token is computed differently from a prompt token (keys in vector lanes, its keys
//! cut into spans of 256 run as separate tasks and folded), so these check it at depths over
//! several spans against the prompt path and against `generate` (what `airlock run` does).

use std::path::PathBuf;

use airlock_engine::generate::{eval_prompt, generate, GenerateParams};
use airlock_engine::llama::{KvType, Logits, Precision};
use airlock_engine::load::{load, LoadOptions, LoadedModel};
use airlock_engine::sampling::{Sampler, SamplerConfig};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn open(rel: &str, precision: Precision, kv_type: KvType) -> LoadedModel {
    let path = root().join(rel);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    let opts = LoadOptions {
        n_ctx: 1024,
        kv_type,
        precision,
        ..LoadOptions::default()
    };
    load(&path, &opts).unwrap()
}

const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const TINY: &str = "tests/fixtures/llama3/tiny-llama3-q8_0.gguf";

/// Token ids of a SmolLM2 fixture prompt (HF's tokenization).
fn fixture_ids(name: &str) -> Vec<u32> {
    let path = root().join("tests/fixtures/smollm2/hf-logits").join(name);
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fx["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Generation at depth three ways: bench's (fill the cache in -b chunks, then one token per
/// pass, greedy), `generate`'s (what `airlock run --temp 0` runs), and the prompt path over
/// the prompt plus the generated tokens (teacher forcing: every position in one pass). The
/// tokens must agree, and the decode logits must equal the prompt path's bit for bit.
fn check_depth(model: &LoadedModel, prompt: &[u32], n_gen: usize) {
    let m = &model.model;
    let label = format!("{:?} {:?}", model.precision, model.kv_type);
    // bench -d: the fill in chunks of 64, then decoding.
    let mut s = model.session();
    let mut tokens = vec![argmax(eval_prompt(m, &mut s, prompt, 64).unwrap())];
    let mut decode_logits = vec![];
    for _ in 1..n_gen {
        let l = s
            .forward(m, &[*tokens.last().unwrap()], Logits::Last)
            .unwrap();
        decode_logits.push(l.to_vec());
        tokens.push(argmax(l));
    }
    // run: generate with a greedy sampler, the prompt in one chunk of 512 and the rest.
    let mut s = model.session();
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    })
    .unwrap();
    let params = GenerateParams {
        max_tokens: Some(n_gen),
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let out = generate(
        m,
        &mut s,
        &model.tokenizer,
        &mut sampler,
        prompt,
        &params,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(out.generated, tokens, "{label}: run and bench -d differ");
    // The prompt path at the same positions.
    let mut s = model.session();
    let mut all = prompt.to_vec();
    all.extend_from_slice(&tokens[..n_gen - 1]);
    let vocab = m.config.vocab_size;
    // The rows of the positions that were decoded: the last n_gen - 1.
    let logits = s.forward(m, &all, Logits::Tail(n_gen - 1)).unwrap();
    for (i, want) in decode_logits.iter().enumerate() {
        let row = &logits[i * vocab..][..vocab];
        assert_eq!(argmax(row), tokens[i + 1], "{label}: token {i}");
        let same = row
            .iter()
            .zip(want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{label}: decode logits at depth {} differ from the prompt path's",
            prompt.len() + i
        );
    }
}

#[test]
fn decoding_at_depth_gives_the_tokens_of_run_and_of_the_prompt_path() {
    // 819 tokens: the decoding tokens read 3 spans of keys.
    let prompt = fixture_ids("extra-long-1.json");
    assert!(prompt.len() > 3 * 256);
    for kv in [KvType::F16, KvType::Q8_0] {
        check_depth(&open(SMOLLM2, Precision::Fast, kv), &prompt, 12);
    }
    // The exact path (f32 activations, dequantized weights) on the tiny model, whose pass is
    // cheap enough for 700 positions; random ids, and f32 and f16 caches.
    let mut x = 12345u64;
    let ids: Vec<u32> = (0..700)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 128_000) as u32
        })
        .collect();
    for kv in [KvType::F32, KvType::F16] {
        check_depth(&open(TINY, Precision::Exact, kv), &ids, 8);
    }
}

#[test]
fn q8_0_kv_logits_stay_close_to_f16_kv() {
    // Every position of a SmolLM2 fixture prompt (78 tokens) on the exact path, so that only
    // the cache differs (the fast path's 8-bit activations turn any change, even f32 against
    // f16, into logit noise of a few tenths). Measured on this prompt: Q8_0 against f16 moves
    // a logit by 0.72 at most and 0.06 on average (logits span about 30), and changes the
    // top token at 1 position of 78; f16 against f32 moves them by 0.013 at most. The bounds
    // leave room for other SIMD paths' rounding, not for a broken cache (a cache reading the
    // wrong position or scale moves logits by whole units).
    let f16 = open(SMOLLM2, Precision::Exact, KvType::F16);
    let q8 = open(SMOLLM2, Precision::Exact, KvType::Q8_0);
    let vocab = f16.model.config.vocab_size;
    let ids = fixture_ids("visible-3.json");
    let a = f16
        .session()
        .forward(&f16.model, &ids, Logits::All)
        .unwrap()
        .to_vec();
    let b = q8
        .session()
        .forward(&q8.model, &ids, Logits::All)
        .unwrap()
        .to_vec();
    let (mut worst, mut sum, mut same_top) = (0.0f32, 0.0f64, 0usize);
    for (ra, rb) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
        for (x, y) in ra.iter().zip(rb) {
            worst = worst.max((x - y).abs());
            sum += (x - y).abs() as f64;
        }
        same_top += usize::from(argmax(ra) == argmax(rb));
    }
    let mean = sum / a.len() as f64;
    eprintln!("Q8_0 vs f16 KV, exact path: worst {worst}, mean {mean}, same top token at {same_top} of {}", ids.len());
    // A cache that quantized nothing would show no difference at all.
    assert!(worst > 0.0, "the Q8_0 cache changed no logit");
    assert!(worst < 1.5 && mean < 0.12, "worst {worst}, mean {mean}");
    assert!(
        same_top + 3 >= ids.len(),
        "top token the same at {same_top} of {}",
        ids.len()
    );
}
