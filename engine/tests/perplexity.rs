//! Perplexity and KL divergence on a tiny model (the 2-layer Llama 3 fixture, 128256-token
//! vocabulary), checked against an independent computation: the slow one-token-at-a-time f32
//! reference pass and a plain f64 log-softmax written here. Also: a model against its own base
//! file has zero KL divergence and always the same top token, and a base file round-trips.

use std::path::PathBuf;
use std::sync::Arc;

use airlock_engine::gguf::GgufFile;
use airlock_engine::kld::{decode_record, kl_divergence, record_len, BaseFile, BaseWriter};
use airlock_engine::llama::reference::{forward_token, ReferenceState};
use airlock_engine::llama::{KvType, LlamaModel, Precision};
use airlock_engine::perplexity::{perplexity, run_chunks, PerplexityParams};

fn tiny() -> LlamaModel {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/llama3/tiny-llama3-q8_0.gguf");
    LlamaModel::load(Arc::new(GgufFile::open(&path).unwrap())).unwrap()
}

/// Deterministic token ids below `vocab`.
fn ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x9e37_79b9u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % vocab as u32
        })
        .collect()
}

/// ln softmax(logits)[i] in f64, written out plainly.
fn ln_p(logits: &[f32], i: usize) -> f64 {
    let m = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    logits[i] as f64 - m - z.ln()
}

const BOS: u32 = 128000;

#[test]
fn perplexity_equals_an_independent_reference_computation() {
    let model = tiny();
    let vocab = model.config.vocab_size;
    let n_ctx = 16;
    let tokens = ids(3 * n_ctx + 5, vocab);
    // llama-perplexity's method by hand: each chunk from an empty state, its first token
    // replaced by BOS, positions n_ctx/2 .. n_ctx-2 predicting the next token.
    let mut nll = Vec::new();
    for c in 0..3 {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        chunk[0] = BOS;
        let mut st = ReferenceState::new(&model);
        for pos in 0..n_ctx - 1 {
            let logits = forward_token(&model, &mut st, chunk[pos]).unwrap();
            if pos >= n_ctx / 2 {
                nll.push(-ln_p(&logits, chunk[pos + 1] as usize));
            }
        }
    }
    assert_eq!(nll.len(), 3 * (n_ctx - 1 - n_ctx / 2));
    let mean = nll.iter().sum::<f64>() / nll.len() as f64;
    let want = mean.exp();

    for batch in [16, 48, 5] {
        let p = PerplexityParams {
            n_ctx,
            batch,
            bos: Some(BOS),
            ..Default::default()
        };
        let mut running = Vec::new();
        let r = perplexity(
            &model,
            Precision::Exact,
            KvType::F32,
            &tokens,
            &p,
            &mut |e| running.push(e.ppl),
        )
        .unwrap();
        assert_eq!(r.estimate.scored, nll.len());
        assert_eq!(running.len(), 3);
        // Exact path against the reference: both f32 with different summation orders, so
        // agreement to float rounding, not to the bit.
        let got = r.estimate.ppl;
        assert!(
            (got / want - 1.0).abs() < 1e-5,
            "batch {batch}: airlock {got}, reference {want}"
        );
        // The running value after the first chunk is that chunk's alone.
        let k = n_ctx - 1 - n_ctx / 2;
        let first = (nll[..k].iter().sum::<f64>() / k as f64).exp();
        assert!((running[0] / first - 1.0).abs() < 1e-5);
    }
}

#[test]
fn a_model_against_its_own_base_file_has_zero_kld_and_the_file_round_trips() {
    let model = tiny();
    let vocab = model.config.vocab_size;
    let n_ctx = 32;
    let tokens = ids(2 * n_ctx + 3, vocab);
    let p = PerplexityParams {
        n_ctx,
        batch: 64,
        bos: Some(BOS),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let mut out = Vec::new();
    let mut chunks = 0;
    let mut on_chunk = |_: &airlock_engine::perplexity::Estimate| chunks += 1;
    let mut w = BaseWriter::new(
        &mut out,
        &path,
        n_ctx,
        vocab,
        &tokens[..2 * n_ctx],
        &mut on_chunk,
    )
    .unwrap();
    run_chunks(&model, Precision::Fast, KvType::F16, &tokens, 2, &p, &mut w).unwrap();
    let (_, nll) = w.finish().unwrap();
    assert_eq!(nll.count(), 2 * 15);
    // Header, tokens, records: llama-perplexity's layout.
    let scored = 2 * (n_ctx - 1 - n_ctx / 2);
    assert_eq!(
        out.len(),
        20 + 4 * 2 * n_ctx + 2 * record_len(vocab) * scored
    );
    assert_eq!(&out[..8], b"_logits_");
    assert_eq!(i32::from_le_bytes(out[8..12].try_into().unwrap()), 32);
    assert_eq!(
        i32::from_le_bytes(out[12..16].try_into().unwrap()),
        vocab as i32
    );
    assert_eq!(i32::from_le_bytes(out[16..20].try_into().unwrap()), 2);
    // Tokens before BOS replacement.
    let t0 = u32::from_le_bytes(out[20..24].try_into().unwrap());
    assert_eq!(t0, tokens[0]);
    std::fs::write(&path, &out).unwrap();

    // The records decode to the model's log-probabilities (within the code step), checked on
    // the first scored position against the reference pass.
    let mut st = ReferenceState::new(&model);
    let mut chunk = tokens[..n_ctx].to_vec();
    chunk[0] = BOS;
    let mut logits = Vec::new();
    for &t in &chunk[..=n_ctx / 2] {
        logits = forward_token(&model, &mut st, t).unwrap();
    }
    let rec_at = 20 + 4 * 2 * n_ctx;
    let rec: Vec<u16> = out[rec_at..rec_at + 2 * record_len(vocab)]
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let lp = decode_record(&rec, vocab);
    let m = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let want: Vec<f64> = logits.iter().map(|&x| x as f64 - m - z.ln()).collect();
    let top = want.iter().cloned().fold(f64::MIN, f64::max);
    // Entries above the clamp (the top log-probability - 16), with a margin.
    let max_err = (0..vocab)
        .filter(|&i| want[i] > top - 15.0)
        .map(|i| (lp[i] as f64 - want[i]).abs())
        .fold(0.0, f64::max);
    // Fast path (8-bit activations) against the f32 reference, plus the 16/65535 code step.
    assert!(max_err < 2e-2, "{max_err}");

    let mut base = BaseFile::open(&path).unwrap();
    assert_eq!((base.n_ctx, base.n_vocab, base.n_chunk), (32, vocab, 2));
    let r = kl_divergence(
        &model,
        Precision::Fast,
        KvType::F16,
        &mut base,
        &p,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(r.stats.count(), scored);
    // Same model, same path: the logits are bit-identical, so only the 16-bit codes differ.
    let (kld, _) = r.stats.mean_kld();
    assert!(kld.abs() < 1e-5, "{kld}");
    assert_eq!(r.stats.same_top(), 1.0);
    let (ppl, _) = r.stats.ppl();
    let (ppl_base, _) = r.stats.ppl_base();
    assert!((ppl / ppl_base - 1.0).abs() < 1e-3);
    // Another path is another model: a small but visible divergence.
    let mut base = BaseFile::open(&path).unwrap();
    let r = kl_divergence(
        &model,
        Precision::Exact,
        KvType::F32,
        &mut base,
        &p,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(r.stats.mean_kld().0 < 1e-2);
}

#[test]
fn bad_base_files_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let header = |n_ctx: i32, n_vocab: i32, n_chunk: i32| {
        let mut h = b"_logits_".to_vec();
        for v in [n_ctx, n_vocab, n_chunk] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    };
    let err = |p: &std::path::Path| BaseFile::open(p).err().unwrap().to_string();
    assert!(err(&write("short", b"_logi")).contains("too short"));
    assert!(err(&write("magic", &[0u8; 40])).contains("does not look like"));
    // A header claiming 2^31 x 2^31 tokens: refused by length, nothing allocated.
    let huge = write("huge", &header(i32::MAX, i32::MAX, i32::MAX));
    assert!(err(&huge).contains("header"), "{}", err(&huge));
    assert!(err(&write("neg", &header(-5, 10, 1))).contains("n_ctx is -5"));
    // Right length, a token outside the vocabulary.
    let mut f = header(4, 3, 1);
    f.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 2, 0, 0, 0]);
    f.extend_from_slice(&[0u8; 2 * (4 + 4)]);
    assert!(err(&write("tok", &f)).contains("token 2 of the base file is 7"));
    // A directory (or a device) is not a base file.
    assert!(err(dir.path()).contains("not a regular file"));
    // A good file for another vocabulary is refused by check_vocab.
    let mut f = header(4, 3, 1);
    f.extend_from_slice(&[0u8; 16]);
    f.extend_from_slice(&[0u8; 2 * (4 + 4)]);
    let b = BaseFile::open(&write("ok", &f)).unwrap();
    assert!(b
        .check_vocab(49152)
        .unwrap_err()
        .to_string()
        .contains("vocabulary of 3 tokens, but the model has 49152"));
    assert!(b.check_vocab(3).is_ok());
    let e = b
        .check_tokens(&[0, 0, 5, 0], &|i| format!("t{i}"))
        .unwrap_err();
    assert!(e.to_string().contains("token 2 is 0 \"t0\""), "{e}");
}
