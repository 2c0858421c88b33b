//! What a model file may do to `run`, shared by the fuzz target `model_load`
//! (`fuzz/fuzz_targets/model_load.rs`) and its corpus replay (`engine/tests/model_corpus.rs`):
//! any byte string is either refused with an error, or it loads and runs a forward pass, both
//! precisions, without a panic. Plus the tiny model files the fuzzer starts from.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use airlock_engine::gguf::{Array, GgufFile, GgufWriter, TensorSpec, Value};
use airlock_engine::llama::{KvType, LlamaModel, Logits, Precision, Session};
use airlock_engine::load::{tokenizer_for, validate};
use airlock_engine::memory::MemoryEstimate;
use airlock_engine::signature::Requirement;
use airlock_kernels::types::GgmlType;

/// Files whose run would need more than this are skipped, as `run` refuses what does not fit
/// the machine: the fuzzer must not measure the host's memory.
const MEMORY_CAP: u64 = 256 << 20;

/// What became of one input; a panic inside is the finding.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Refused by the reader, the checks `run` makes, or the memory cap.
    Refused(String),
    /// Loaded, tokenized, ran a prompt and a decode step in both precisions.
    Ran,
}

/// Loads `data` as `run` would (reader, known keys, hyperparameters and tensors, tokenizer,
/// chat templates, repacking) and, when it passes, tokenizes and decodes a text and runs a
/// two-token prompt and one decode step in both precisions and every KV type the head fits.
pub fn check(data: &[u8]) -> Outcome {
    let path = Path::new("fuzz.gguf");
    let file = match GgufFile::from_bytes(data.to_vec()) {
        Ok(f) => Arc::new(f),
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    if let Err(e) = validate(file.clone(), path) {
        return Outcome::Refused(e.to_string());
    }
    // What validate accepted, load must accept.
    let mut model = LlamaModel::load(file).expect("validate passed but load refused");
    let n_ctx = model.config.n_ctx_train.min(8);
    let estimate = MemoryEstimate::for_model(&model, n_ctx, KvType::F32, 2, true);
    if estimate.anonymous(true, false) > MEMORY_CAP {
        return Outcome::Refused("over the fuzzer's memory cap".into());
    }
    let tok = tokenizer_for(&model.file, path, None, &Requirement::none())
        .expect("validate passed but the tokenizer refused");
    if let Ok(ids) = tok.encode("hello world! <s>", true, true) {
        let _ = tok.decode(&ids, true);
    }
    let all: Vec<u32> = (0..model.config.vocab_size as u32).collect();
    let _ = tok.decode(&all, true);
    if let Err(e) = model.repack() {
        return Outcome::Refused(e.to_string());
    }
    let vocab = model.config.vocab_size;
    let prompt = [0u32, (vocab as u32).saturating_sub(1)];
    for precision in [Precision::Fast, Precision::Exact] {
        for kv in KvType::ALL {
            if !kv.fits_head_dim(model.config.head_dim) {
                continue;
            }
            let mut s = Session::new(&model, n_ctx, kv, precision);
            let logits = s.forward(&model, &prompt[..n_ctx.min(2)], Logits::All);
            let logits = logits.expect("a two-token prompt in a context of two or more");
            assert_eq!(logits.len(), vocab * n_ctx.min(2));
            if n_ctx > 2 {
                let l = s
                    .forward(&model, &[1 % vocab as u32], Logits::Last)
                    .unwrap();
                assert_eq!(l.len(), vocab);
            }
        }
    }
    Outcome::Ran
}

/// One tiny model's shape and tensor types.
struct Tiny {
    n_embd: u64,
    n_head: u64,
    n_head_kv: u64,
    n_ff: u64,
    n_layer: u64,
    tied: bool,
    rope_freqs: bool,
    /// Types of token_embd, attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down,
    /// output.
    types: [GgmlType; 9],
    template: bool,
}

/// The vocabulary: GPT-2 byte-level pieces (`Ġ` is the space) with a few merges, BOS and EOS.
const TOKENS: [&str; 16] = [
    "<s>", "</s>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "!", "he", "ll", "hell", "hello", "Ġw",
];
const MERGES: [&str; 5] = ["h e", "l l", "he ll", "hell o", "Ġ w"];

fn metadata(t: &Tiny) -> Vec<(String, Value)> {
    let u = |x: u64| Value::U32(x as u32);
    let strs = |v: &[&str]| Value::Array(Array::String(v.iter().copied().collect()));
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("tiny fuzz seed".into()),
        ),
        ("llama.block_count".into(), u(t.n_layer)),
        ("llama.context_length".into(), u(64)),
        ("llama.embedding_length".into(), u(t.n_embd)),
        ("llama.feed_forward_length".into(), u(t.n_ff)),
        ("llama.attention.head_count".into(), u(t.n_head)),
        ("llama.attention.head_count_kv".into(), u(t.n_head_kv)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.dimension_count".into(), u(t.n_embd / t.n_head)),
        ("llama.vocab_size".into(), u(TOKENS.len() as u64)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), strs(&TOKENS)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(
                (0..TOKENS.len())
                    .map(|i| if i < 2 { 3 } else { 1 })
                    .collect(),
            )),
        ),
        ("tokenizer.ggml.merges".into(), strs(&MERGES)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ];
    if t.template {
        m.push((
            "tokenizer.chat_template".into(),
            Value::String(
                "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\
                 {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
                    .into(),
            ),
        ));
    }
    m
}

/// Deterministic small values (a sine of the index: no RNG dependency), norms near 1.
fn values(seed: u64, n: u64, norm: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = ((i * 7919 + seed * 104729) % 10007) as f32;
            let s = (x * 0.6180339).sin();
            if norm {
                1.0 + 0.1 * s
            } else {
                0.05 * s
            }
        })
        .collect()
}

/// A model file's parts, to edit before [`Parts::assemble`].
#[derive(Clone)]
pub struct Parts {
    pub meta: Vec<(String, Value)>,
    pub specs: Vec<TensorSpec>,
    pub data: Vec<Vec<u8>>,
}

impl Parts {
    pub fn assemble(&self) -> Vec<u8> {
        self.try_assemble().unwrap()
    }

    /// None where the writer refuses the edit (a zero dimension, a row that is not whole
    /// blocks): the reader refuses those files too, and the reader's fuzz target covers them.
    pub fn try_assemble(&self) -> Option<Vec<u8>> {
        let mut w = GgufWriter::new(Vec::new(), &self.meta, &self.specs).ok()?;
        for d in &self.data {
            w.write_tensor_data(d).ok()?;
        }
        w.finish().ok()
    }
}

fn parts(t: &Tiny) -> Parts {
    let (e, hd) = (t.n_embd, t.n_embd / t.n_head);
    let (kv, f, v) = (hd * t.n_head_kv, t.n_ff, TOKENS.len() as u64);
    let [emb, q, k, vv, o, gate, up, down, out] = t.types;
    let mut specs = Vec::new();
    let mut add =
        |name: String, dims: Vec<u64>, ty: GgmlType| specs.push(TensorSpec { name, dims, ty });
    if t.rope_freqs {
        add("rope_freqs.weight".into(), vec![hd / 2], GgmlType::F32);
    }
    add("token_embd.weight".into(), vec![e, v], emb);
    for i in 0..t.n_layer {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        add(n("attn_norm"), vec![e], GgmlType::F32);
        add(n("attn_q"), vec![e, e], q);
        add(n("attn_k"), vec![e, kv], k);
        add(n("attn_v"), vec![e, kv], vv);
        add(n("attn_output"), vec![e, e], o);
        add(n("ffn_norm"), vec![e], GgmlType::F32);
        add(n("ffn_gate"), vec![e, f], gate);
        add(n("ffn_up"), vec![e, f], up);
        add(n("ffn_down"), vec![f, e], down);
    }
    add("output_norm.weight".into(), vec![e], GgmlType::F32);
    if !t.tied {
        add("output.weight".into(), vec![e, v], out);
    }
    let data = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: u64 = s.dims.iter().product();
            let x = values(i as u64, n, s.dims.len() == 1);
            let mut bytes = vec![0u8; s.ty.row_bytes(n).unwrap() as usize];
            airlock_kernels::quantize_row(s.ty, &x, &mut bytes).unwrap();
            bytes
        })
        .collect();
    Parts {
        meta: metadata(t),
        specs,
        data,
    }
}

/// The seed files, assembled.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    seed_parts()
        .into_iter()
        .map(|(name, p)| (name, p.assemble()))
        .collect()
}

/// The seed models: every type `run` computes appears in at least one, with GQA, a tied and an
/// untied head, rope_freqs and a chat template. All under 256 KiB.
pub fn seed_parts() -> Vec<(&'static str, Parts)> {
    use GgmlType::*;
    let small = Tiny {
        n_embd: 32,
        n_head: 2,
        n_head_kv: 1,
        n_ff: 64,
        n_layer: 1,
        tied: false,
        rope_freqs: false,
        types: [Q8_0, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, F32, Q8_0],
        template: true,
    };
    let two_layers = Tiny {
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 96,
        n_layer: 2,
        tied: true,
        rope_freqs: true,
        types: [Q4_0, Q4_0, Q8_0, Q8_0, Q4_1, Q4_0, Q4_0, BF16, Q4_0],
        template: false,
    };
    let kquants = Tiny {
        n_embd: 256,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 256,
        n_layer: 1,
        tied: false,
        rope_freqs: false,
        types: [Q6_K, Q4_K, Q5_K, Q6_K, Q3_K, Q2_K, Q4_K, Q4_K, Q6_K],
        template: false,
    };
    vec![
        ("tiny_q8_0_mix.gguf", parts(&small)),
        ("tiny_q4_0_tied_rope_freqs.gguf", parts(&two_layers)),
        ("tiny_kquants.gguf", parts(&kquants)),
    ]
}
