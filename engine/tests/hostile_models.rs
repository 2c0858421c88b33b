//! Model files that lie (issue 14, items 3, 5, 6 and 10): counts checked against the tensors
//! before anything is sized by them, metadata that changes the computation read or refused
//! (never run as if absent), tensors the forward pass would not read refused, and the known
//! keys' types checked. Each file is the tiny Llama 3 fixture with one thing changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use airlock_engine::gguf::{Array, GgufFile, TensorSpec, Value};
use airlock_engine::llama::{LlamaModel, ModelError};
use airlock_engine::load::{load, validate, LoadError, LoadOptions};

mod gguf_support;
use gguf_support::{rewrite_tiny as rewrite, tiny_llama3};

/// Sets (or adds) one metadata key.
fn set(meta: &mut Vec<(String, Value)>, key: &str, v: Value) {
    match meta.iter_mut().find(|(k, _)| k == key) {
        Some((_, old)) => *old = v,
        None => meta.push((key.to_string(), v)),
    }
}

fn with_key(dir: &Path, key: &str, v: Value) -> PathBuf {
    rewrite(dir, "edited.gguf", |meta, _| set(meta, key, v))
}

fn model_of(path: &Path) -> Result<LlamaModel, ModelError> {
    LlamaModel::load(Arc::new(GgufFile::open(path).unwrap()))
}

/// The model's refusal, checked to name `key`.
fn refused_naming(path: &Path, key: &str) -> String {
    let e = model_of(path)
        .err()
        .unwrap_or_else(|| panic!("{key}: loaded"));
    let msg = e.to_string();
    assert!(msg.contains(key), "{key}: {msg}");
    msg
}

#[test]
fn block_count_must_match_the_layers_the_file_holds_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    // Far more layers than the file holds: refused before anything is sized by the count (the
    // old code allocated the layer table first, 2^31 entries, and aborted).
    for n in [(1u32 << 31) - 1, 3] {
        let p = with_key(dir.path(), "llama.block_count", Value::U32(n));
        let msg = refused_naming(&p, "llama.block_count");
        assert!(msg.contains("holds tensors for 2 layers"), "{msg}");
        let e = load(&p, &LoadOptions::default()).err().unwrap();
        assert!(matches!(e, LoadError::Model { .. }), "{e}");
    }
    // Fewer layers than the file holds (llama.cpp refuses this too).
    let p = with_key(dir.path(), "llama.block_count", Value::U32(1));
    let msg = refused_naming(&p, "llama.block_count");
    assert!(msg.contains("blk.1."), "{msg}");
    // A stray layer far beyond the declared ones.
    let p = rewrite(dir.path(), "stray.gguf", |_, tensors| {
        let norm = tensors
            .iter()
            .find(|(s, _)| s.name == "blk.0.attn_norm.weight")
            .unwrap()
            .clone();
        tensors.push((
            TensorSpec {
                name: "blk.4000000000.attn_norm.weight".into(),
                ..norm.0
            },
            norm.1,
        ));
    });
    let msg = refused_naming(&p, "llama.block_count");
    assert!(msg.contains("blk.4000000000.attn_norm.weight"), "{msg}");
}

#[test]
fn tensors_the_forward_pass_would_not_read_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A bias llama.cpp's llama architecture would add to the attention output.
    let p = rewrite(dir.path(), "bias.gguf", |_, tensors| {
        let norm = tensors
            .iter()
            .find(|(s, _)| s.name == "blk.0.attn_norm.weight")
            .unwrap()
            .clone();
        tensors.push((
            TensorSpec {
                name: "blk.0.attn_output.bias".into(),
                ..norm.0
            },
            norm.1,
        ));
    });
    refused_naming(&p, "blk.0.attn_output.bias");
}

#[test]
fn every_math_changing_key_is_read_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f32v = Value::F32;
    // (key, value that changes the math and is not implemented)
    let refused: Vec<(&str, Value)> = vec![
        ("llama.rope.scaling.type", Value::String("yarn".into())),
        ("llama.rope.scaling.type", Value::String("longrope".into())),
        ("llama.rope.scaling.factor", f32v(-2.0)),
        ("llama.rope.scale_linear", f32v(f32::NAN)),
        ("llama.rope.scaling.attn_factor", f32v(1.5)),
        ("llama.rope.scaling.yarn_log_multiplier", f32v(0.1)),
        ("llama.rope.scaling.yarn_beta_fast", f32v(32.0)),
        ("llama.rope.scaling.alpha", f32v(1000.0)),
        ("llama.attention.scale", f32v(0.5)),
        ("llama.attn_logit_softcapping", f32v(50.0)),
        ("llama.final_logit_softcapping", f32v(30.0)),
        ("llama.embedding_scale", f32v(12.0)),
        ("llama.residual_scale", f32v(0.22)),
        ("llama.logit_scale", f32v(8.0)),
        ("llama.expert_count", Value::U32(8)),
        ("llama.expert_used_count", Value::U32(2)),
        ("llama.attention.causal", Value::Bool(false)),
        ("llama.attention.value_length", Value::U32(48)),
        ("llama.rope.freq_base", Value::String("10000".into())),
    ];
    for (key, v) in refused {
        let p = with_key(dir.path(), key, v);
        refused_naming(&p, key);
    }
    // The same keys at values that change nothing load.
    let base = model_of(&tiny_llama3()).unwrap();
    let head_dim = base.config.head_dim as f32;
    let neutral: Vec<(&str, Value)> = vec![
        ("llama.rope.scaling.type", Value::String("none".into())),
        ("llama.rope.scaling.attn_factor", f32v(1.0)),
        (
            "llama.rope.scaling.original_context_length",
            Value::U32(8192),
        ),
        ("llama.rope.scaling.finetuned", Value::Bool(true)),
        ("llama.attention.scale", f32v(1.0 / head_dim.sqrt())),
        ("llama.attn_logit_softcapping", f32v(0.0)),
        ("llama.logit_scale", f32v(1.0)),
        ("llama.expert_count", Value::U32(0)),
        ("llama.attention.causal", Value::Bool(true)),
    ];
    for (key, v) in neutral {
        let p = with_key(dir.path(), key, v);
        let m = model_of(&p).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(m.rope_inv_freq, base.rope_inv_freq, "{key}");
    }
    // Type none ignores a factor, as llama.cpp does.
    let p = rewrite(dir.path(), "none.gguf", |meta, _| {
        set(
            meta,
            "llama.rope.scaling.type",
            Value::String("none".into()),
        );
        set(meta, "llama.rope.scaling.factor", f32v(4.0));
    });
    assert_eq!(model_of(&p).unwrap().config.rope_freq_scale, 1.0);
}

#[test]
fn linear_rope_scaling_divides_every_frequency_by_the_factor() {
    let dir = tempfile::tempdir().unwrap();
    let base = model_of(&tiny_llama3()).unwrap();
    // The type stated, or left to llama.cpp's default (linear), and the older key.
    let files = [
        rewrite(dir.path(), "typed.gguf", |meta, _| {
            set(
                meta,
                "llama.rope.scaling.type",
                Value::String("linear".into()),
            );
            set(meta, "llama.rope.scaling.factor", Value::F32(4.0));
        }),
        with_key(dir.path(), "llama.rope.scaling.factor", Value::F32(4.0)),
        with_key(dir.path(), "llama.rope.scale_linear", Value::F32(4.0)),
    ];
    for p in &files {
        let m = model_of(p).unwrap();
        assert_eq!(m.config.rope_freq_scale, 0.25);
        // Dividing by 4 is exact in binary floating point, so the frequencies are exactly the
        // unscaled ones over 4: position 4p turns as far as position p did.
        let want: Vec<f32> = base.rope_inv_freq.iter().map(|f| f / 4.0).collect();
        assert_eq!(m.rope_inv_freq, want);
    }
}

#[test]
fn linear_rope_scaling_changes_the_output_and_the_fast_path_matches_the_reference() {
    use airlock_engine::llama::reference::{forward_token, ReferenceState};
    use airlock_engine::llama::{KvType, Logits, Precision, Session};
    let dir = tempfile::tempdir().unwrap();
    let scaled = model_of(&with_key(
        dir.path(),
        "llama.rope.scaling.factor",
        Value::F32(4.0),
    ))
    .unwrap();
    let base = model_of(&tiny_llama3()).unwrap();
    let tokens = [1u32, 500, 1000, 2000, 3000, 4000];
    let last = |m: &LlamaModel, precision| {
        let mut s = Session::new(m, 64, KvType::F32, precision);
        s.forward(m, &tokens, Logits::Last).unwrap().to_vec()
    };
    let fast = last(&scaled, Precision::Exact);
    let unscaled = last(&base, Precision::Exact);
    let diff = fast
        .iter()
        .zip(&unscaled)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "scaling changed nothing ({diff})");
    let mut st = ReferenceState::new(&scaled);
    let mut reference = Vec::new();
    for &t in &tokens {
        reference = forward_token(&scaled, &mut st, t).unwrap();
    }
    let err = fast
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // The exact path and the f64 reference differ only by f32 rounding.
    assert!(err < 1e-3, "exact path vs reference: {err}");
}

#[test]
fn add_bos_without_a_bos_token_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let p = rewrite(dir.path(), "nobos.gguf", |meta, _| {
        meta.retain(|(k, _)| k != "tokenizer.ggml.bos_token_id");
        set(meta, "tokenizer.ggml.add_bos_token", Value::Bool(true));
    });
    let e = load(&p, &LoadOptions::default()).err().unwrap();
    assert!(e.to_string().contains("no BOS token"), "{e}");
}

#[test]
fn known_keys_are_checked_for_type_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "tokenizer.ggml.tokens",
            Value::Array(Array::I32(vec![1, 2, 3])),
            "expected an array of strings",
        ),
        ("llama.block_count", Value::U32(1 << 31), "outside 1..2^31"),
        ("llama.context_length", Value::I32(-1), "expected a u32"),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(999_999),
            "outside the vocabulary",
        ),
        (
            "general.file_type",
            Value::String("q8".into()),
            "expected a u32",
        ),
        (
            "tokenizer.ggml.add_bos_token",
            Value::U8(1),
            "expected a bool",
        ),
    ];
    for (key, v, needle) in cases {
        let p = with_key(dir.path(), key, v);
        let f = Arc::new(GgufFile::open(&p).unwrap());
        let problems = airlock_engine::keys::check_known_keys(&f);
        assert!(
            problems
                .iter()
                .any(|q| q.key == key && q.problem.contains(needle)),
            "{key}: {problems:?}"
        );
        let e = validate(f, &p).err().unwrap();
        assert!(e.to_string().contains(key), "{e}");
    }
    // The fixture itself has none.
    let f = Arc::new(GgufFile::open(tiny_llama3()).unwrap());
    assert_eq!(airlock_engine::keys::check_known_keys(&f), vec![]);
    validate(f, &tiny_llama3()).unwrap();
}
