//! The forward pass over many sequences: a sequence's logits are bit-identical whether it runs
//! alone or in a batch with others, whatever the others bring (prompt chunks or single decode
//! tokens), however its own prompt is chunked, on one thread or two, and after its cache is cut
//! back to a shared prefix (prompt reuse). Checked on the fast path (file layout and, where the
//! CPU has packed kernels, repacked) and on the exact path, with the real SmolLM2 model, and on
//! the fast paths with it requantized into every K-quant and Q5 format (`mixed_model`).

use std::path::PathBuf;
use std::sync::Arc;

use airlock_engine::gguf::GgufFile;
use airlock_engine::llama::{
    forward_batch, BatchSeq, KvCache, KvType, LlamaModel, Logits, ModelError, Precision, Session,
    Workspace,
};

mod mixed_model;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn smollm2() -> LlamaModel {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    LlamaModel::load(Arc::new(GgufFile::open(&path).unwrap())).unwrap()
}

/// The model on every layout and precision this CPU runs: fast file layout, fast repacked
/// (when the path has packed kernels), exact.
fn variants() -> Vec<(&'static str, LlamaModel, Precision)> {
    let mut v = vec![
        ("fast, file layout", smollm2(), Precision::Fast),
        ("exact", smollm2(), Precision::Exact),
    ];
    let mut packed = smollm2();
    if packed.repack().unwrap() > 0 {
        v.push(("fast, repacked", packed, Precision::Fast));
    }
    // Every K-quant and Q5 format, through both layouts (mixed_model's docs).
    v.push((
        "mixed types, file layout",
        mixed_model::mixed_model(),
        Precision::Fast,
    ));
    let mut packed = mixed_model::mixed_model();
    if packed.repack().unwrap() > 0 {
        v.push(("mixed types, repacked", packed, Precision::Fast));
    }
    v
}

/// Deterministic token ids below the vocabulary size.
fn ids(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2654435761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % vocab as u32
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every row of `rows` (vocab wide), as bits.
fn rows(v: &[f32], vocab: usize) -> Vec<Vec<u32>> {
    v.chunks_exact(vocab).map(bits).collect()
}

/// One sequence alone: the prompt in one pass (logits of every token), then each of `feed`
/// one token at a time. Returns the logits rows of every token, in order.
fn alone(model: &LlamaModel, p: Precision, prompt: &[u32], feed: &[u32]) -> Vec<Vec<u32>> {
    let vocab = model.config.vocab_size;
    let mut s = Session::new(model, 256, KvType::F16, p);
    let mut out = rows(s.forward(model, prompt, Logits::All).unwrap(), vocab);
    for &t in feed {
        out.extend(rows(s.forward(model, &[t], Logits::Last).unwrap(), vocab));
    }
    out
}

/// Three sequences stepped together the way a server's scheduler steps them: A's prompt
/// whole while B's comes in two chunks; C joins at step 2; then everyone decodes its `feed`
/// tokens, one each per step, the batch changing as they finish. Returns each sequence's
/// logits rows in token order, like [`alone`].
fn batched(
    model: &LlamaModel,
    p: Precision,
    prompts: [&[u32]; 3],
    feeds: [&[u32]; 3],
) -> [Vec<Vec<u32>>; 3] {
    let vocab = model.config.vocab_size;
    let mut ws = Workspace::default();
    let mut caches: Vec<KvCache> = (0..3)
        .map(|_| KvCache::new(model, 256, KvType::F16))
        .collect();
    let mut out: [Vec<Vec<u32>>; 3] = Default::default();
    let [a, b, c] = &mut caches[..] else {
        unreachable!()
    };
    let (b1, b2) = prompts[1].split_at(prompts[1].len() / 3);

    // Step 1: A's whole prompt, B's first chunk (logits of every token of both).
    let mut batch = [
        BatchSeq {
            cache: a,
            tokens: prompts[0],
            logits: Logits::All,
        },
        BatchSeq {
            cache: b,
            tokens: b1,
            logits: Logits::All,
        },
    ];
    let l = rows(forward_batch(model, p, &mut ws, &mut batch).unwrap(), vocab);
    let (la, lb) = l.split_at(prompts[0].len());
    out[0].extend_from_slice(la);
    out[1].extend_from_slice(lb);

    // Step 2: A's first decode token, B's second chunk, C's whole prompt.
    let mut batch = [
        BatchSeq {
            cache: c,
            tokens: prompts[2],
            logits: Logits::All,
        },
        BatchSeq {
            cache: a,
            tokens: &feeds[0][..1],
            logits: Logits::Last,
        },
        BatchSeq {
            cache: b,
            tokens: b2,
            logits: Logits::All,
        },
    ];
    let l = rows(forward_batch(model, p, &mut ws, &mut batch).unwrap(), vocab);
    let (lc, rest) = l.split_at(prompts[2].len());
    out[2].extend_from_slice(lc);
    out[0].push(rest[0].clone());
    out[1].extend_from_slice(&rest[1..]);

    // Decode: one token each per step, for as long as each has tokens to feed.
    let mut next = [1, 0, 0];
    loop {
        let mut batch = Vec::new();
        let mut who = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            if next[i] < feeds[i].len() {
                batch.push(BatchSeq {
                    cache,
                    tokens: &feeds[i][next[i]..next[i] + 1],
                    logits: Logits::Last,
                });
                who.push(i);
                next[i] += 1;
            }
        }
        if batch.is_empty() {
            break;
        }
        let l = rows(forward_batch(model, p, &mut ws, &mut batch).unwrap(), vocab);
        for (r, &i) in l.into_iter().zip(&who) {
            out[i].push(r);
        }
    }
    out
}

#[test]
fn a_sequence_gives_the_same_bits_alone_and_in_any_batch() {
    for (name, model, p) in variants() {
        let vocab = model.config.vocab_size;
        // Lengths cross the attention's 32-key blocks and the kernels' token tiles.
        let prompts = [ids(37, 1, vocab), ids(50, 2, vocab), ids(9, 3, vocab)];
        let feeds = [ids(5, 4, vocab), ids(2, 5, vocab), ids(6, 6, vocab)];
        let want: Vec<_> = (0..3)
            .map(|i| alone(&model, p, &prompts[i], &feeds[i]))
            .collect();
        let prompt_refs = [&prompts[0][..], &prompts[1][..], &prompts[2][..]];
        let feed_refs = [&feeds[0][..], &feeds[1][..], &feeds[2][..]];
        let got = batched(&model, p, prompt_refs, feed_refs);
        for i in 0..3 {
            assert_eq!(got[i].len(), want[i].len(), "{name}: sequence {i} rows");
            for (t, (g, w)) in got[i].iter().zip(&want[i]).enumerate() {
                assert!(g == w, "{name}: sequence {i} token {t} differs in a batch");
            }
        }
        // The same batches on a one-thread pool: the thread count changes no bit either.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let got1 = one.install(|| batched(&model, p, prompt_refs, feed_refs));
        assert!(
            got1 == got,
            "{name}: one thread and the default pool differ"
        );
    }
}

#[test]
fn prompt_reuse_after_truncating_to_a_shared_prefix_gives_the_same_bits() {
    for (name, model, p) in variants() {
        let vocab = model.config.vocab_size;
        let first = ids(45, 7, vocab);
        let mut second = first[..30].to_vec();
        second.extend(ids(12, 8, vocab));
        let want = alone(&model, p, &second, &[]);

        // A chat front end resends the history: keep the 30 shared tokens, compute the rest.
        let mut s = Session::new(&model, 256, KvType::F16, p);
        s.forward(&model, &first, Logits::None).unwrap();
        s.truncate(30);
        assert_eq!(s.pos(), 30);
        let got = rows(
            s.forward(&model, &second[30..], Logits::All).unwrap(),
            vocab,
        );
        assert!(
            got[..] == want[30..],
            "{name}: reused prefix changes the logits"
        );
    }
}

#[test]
fn logits_selection_returns_the_rows_asked_for() {
    let model = smollm2();
    let vocab = model.config.vocab_size;
    let prompt = ids(20, 9, vocab);
    let all = alone(&model, Precision::Fast, &prompt, &[]);
    for (which, first) in [
        (Logits::All, 0),
        (Logits::Last, 19),
        (Logits::Tail(6), 14),
        (Logits::Tail(50), 0),
        (Logits::None, 20),
    ] {
        let mut s = Session::new(&model, 64, KvType::F16, Precision::Fast);
        let got = rows(s.forward(&model, &prompt, which).unwrap(), vocab);
        assert_eq!(which.rows(prompt.len()), 20 - first, "{which:?}");
        assert!(got[..] == all[first..], "{which:?}");
        assert_eq!(s.pos(), 20, "{which:?}: every token goes to the cache");
    }
}

#[test]
fn a_refused_batch_writes_nothing() {
    let model = smollm2();
    let vocab = model.config.vocab_size;
    let mut ws = Workspace::default();
    let mut roomy = KvCache::new(&model, 64, KvType::F16);
    let mut small = KvCache::new(&model, 4, KvType::F16);
    let five = ids(5, 10, vocab);

    // One sequence's context is full: the error names the numbers, and no cache moves.
    let mut batch = [
        BatchSeq {
            cache: &mut roomy,
            tokens: &five,
            logits: Logits::Last,
        },
        BatchSeq {
            cache: &mut small,
            tokens: &five,
            logits: Logits::Last,
        },
    ];
    let err = forward_batch(&model, Precision::Fast, &mut ws, &mut batch).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextFull {
                needed: 5,
                n_ctx: 4
            }
        ),
        "{err}"
    );
    assert_eq!((roomy.pos(), small.pos()), (0, 0));

    // A token outside the vocabulary.
    let bad = [1, vocab as u32];
    let mut batch = [BatchSeq {
        cache: &mut roomy,
        tokens: &bad,
        logits: Logits::Last,
    }];
    let err = forward_batch(&model, Precision::Fast, &mut ws, &mut batch).unwrap_err();
    assert!(matches!(err, ModelError::InvalidToken { .. }), "{err}");
    assert_eq!(roomy.pos(), 0);

    // A cache made for another model's shape.
    let tiny = LlamaModel::load(Arc::new(
        GgufFile::open(root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf")).unwrap(),
    ))
    .unwrap();
    let mut foreign = KvCache::new(&tiny, 8, KvType::F16);
    let mut batch = [BatchSeq {
        cache: &mut foreign,
        tokens: &[1],
        logits: Logits::Last,
    }];
    let err = forward_batch(&model, Precision::Fast, &mut ws, &mut batch).unwrap_err();
    assert!(matches!(err, ModelError::CacheMismatch { .. }), "{err}");
    assert_eq!(foreign.pos(), 0);

    // The workspace still serves a good batch afterwards.
    let mut batch = [BatchSeq {
        cache: &mut roomy,
        tokens: &five,
        logits: Logits::Last,
    }];
    let l = forward_batch(&model, Precision::Fast, &mut ws, &mut batch).unwrap();
    assert_eq!(l.len(), vocab);
    assert_eq!(roomy.pos(), 5);
}

#[test]
fn a_copied_prefix_continues_with_the_same_bits() {
    // Multiple-choice scoring computes a question once and continues each option in a copy of
    // its cache: the options' logits must be those of running each whole sequence alone.
    for (name, model, p) in variants() {
        let vocab = model.config.vocab_size;
        let prefix = ids(21, 7, vocab);
        let options = [ids(5, 8, vocab), ids(3, 9, vocab), ids(1, 10, vocab)];
        let mut ws = Workspace::default();
        let mut shared = KvCache::new(&model, 64, KvType::F16);
        forward_batch(
            &model,
            p,
            &mut ws,
            &mut [BatchSeq {
                cache: &mut shared,
                tokens: &prefix,
                logits: Logits::None,
            }],
        )
        .unwrap();
        // Copies into caches of other sizes (the strides differ), all options in one pass.
        let mut caches: Vec<KvCache> = options
            .iter()
            .map(|o| {
                let mut c = KvCache::new(&model, prefix.len() + o.len() + 3, KvType::F16);
                c.copy_prefix_from(&shared, prefix.len()).unwrap();
                assert_eq!(c.pos(), prefix.len());
                c
            })
            .collect();
        let mut batch: Vec<BatchSeq> = caches
            .iter_mut()
            .zip(&options)
            .map(|(cache, o)| BatchSeq {
                cache,
                tokens: o,
                logits: Logits::All,
            })
            .collect();
        let got = rows(
            forward_batch(&model, p, &mut ws, &mut batch).unwrap(),
            vocab,
        );
        let mut at = 0;
        for o in &options {
            let whole: Vec<u32> = prefix.iter().chain(o).copied().collect();
            let want = alone(&model, p, &whole, &[]);
            assert_eq!(got[at..at + o.len()], want[prefix.len()..], "{name}");
            at += o.len();
        }
        // A prefix longer than the source holds is refused.
        let mut c = KvCache::new(&model, 64, KvType::F16);
        assert!(c.copy_prefix_from(&shared, prefix.len() + 1).is_err());
    }
}
