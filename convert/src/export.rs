//! `airlock export`: a Llama GGUF back to a Hugging Face checkpoint directory: dequantized
//! safetensors (bf16 or f32), `config.json`, `tokenizer.json` built from the GGUF vocabulary and
//! merges, `tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json`. Q/K rows
//! are put back in the HF rotate-half order. `convert` on the result gives the same metadata and,
//! for lossless types, the same tensors.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use airlock_engine::gguf::{GgufFile, Value};
use airlock_engine::llama::LlamaConfig;
use airlock_engine::output::{check_output_dir, OutputDir};
use airlock_engine::tokenizer::{PreTokenizerKind, VocabSpec};
use airlock_kernels::GgmlType;
use serde_json::{json, Map, Value as Json};

use crate::convert::{Report, ROPE_SCALING_PREFIX};
use crate::error::{ConvertError, Result};
use crate::quantize::open_gguf;
use crate::rope::Llama3Rope;
use crate::stream::{stream_tensors, Progress, RowMap, Source, TensorJob};

/// Llama 3's split regex as its tokenizer.json spells it.
const HF_RE_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: the same with single digits.
const HF_RE_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Default largest shard (HF's default `max_shard_size` is 5 GB).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    BF16,
    F32,
}

impl ExportDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" => Ok(ExportDtype::BF16),
            "f32" => Ok(ExportDtype::F32),
            _ => Err(ConvertError::Usage(format!(
                "unknown export dtype {s:?}; expected bf16 or f32"
            ))),
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            ExportDtype::BF16 => GgmlType::BF16,
            ExportDtype::F32 => GgmlType::F32,
        }
    }

    fn st_name(self) -> &'static str {
        match self {
            ExportDtype::BF16 => "BF16",
            ExportDtype::F32 => "F32",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::BF16 => "bfloat16",
            ExportDtype::F32 => "float32",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub dtype: ExportDtype,
    /// Largest safetensors shard; one `model.safetensors` when everything fits.
    pub max_shard_bytes: u64,
    pub progress: bool,
    /// A minisign public key the input's signed manifest must be signed by (the host policy
    /// applies whatever this says).
    pub require_signature: Option<PathBuf>,
}

/// A safetensors header for `(name, dtype, HF shape, n_bytes)` entries laid out back to back:
/// the 8-byte length and the JSON, padded with spaces to a multiple of 8.
pub fn safetensors_header(entries: &[(String, &str, Vec<u64>, u64)]) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut off = 0u64;
    for (name, dtype, shape, n) in entries {
        obj.insert(
            name.clone(),
            json!({ "dtype": dtype, "shape": shape, "data_offsets": [off, off + n] }),
        );
        off += n;
    }
    let mut text = Json::Object(obj).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// GGUF tensor name -> HF name and the row map that undoes llama.cpp's Q/K permutation.
fn hf_name(name: &str, c: &LlamaConfig) -> Option<(String, RowMap)> {
    let id = RowMap::Identity;
    match name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), id)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), id)),
        "output.weight" => return Some(("lm_head.weight".into(), id)),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < c.n_layers)?;
    let part = part.strip_suffix(".weight")?;
    let (hf, rows) = match part {
        "attn_norm" => ("input_layernorm", id),
        "ffn_norm" => ("post_attention_layernorm", id),
        "attn_q" => ("self_attn.q_proj", RowMap::Unpermute { n_head: c.n_head }),
        "attn_k" => (
            "self_attn.k_proj",
            RowMap::Unpermute {
                n_head: c.n_head_kv,
            },
        ),
        "attn_v" => ("self_attn.v_proj", id),
        "attn_output" => ("self_attn.o_proj", id),
        "ffn_gate" => ("mlp.gate_proj", id),
        "ffn_up" => ("mlp.up_proj", id),
        "ffn_down" => ("mlp.down_proj", id),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.weight"), rows))
}

fn pretty(v: &Json) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s.into_bytes()
}

pub fn export(opts: &ExportOptions) -> Result<Report> {
    let start = Instant::now();
    let f = std::sync::Arc::new(open_gguf(&opts.input, opts.require_signature.as_deref())?);
    crate::quantize::check_readable(&opts.input, &f)?;
    let gerr = |msg: String| ConvertError::BadGguf {
        path: opts.input.clone(),
        msg,
    };
    // What run would refuse is not passed on to another tool.
    airlock_engine::load::validate(f.clone(), &opts.input)
        .map_err(|e| ConvertError::Refused(format!("{e}; airlock would not run it")))?;
    let c = LlamaConfig::from_gguf(&f).map_err(|e| gerr(e.to_string()))?;
    let vocab = VocabSpec::from_gguf(&f).map_err(|e| gerr(e.to_string()))?;
    if vocab.model != "gpt2" {
        return Err(gerr(format!(
            "tokenizer.ggml.model {:?}: export writes byte-level BPE (gpt2) tokenizers only",
            vocab.model
        )));
    }
    // Output directory: must not exist, or be empty.
    check_output_dir(&opts.output)?;
    let _cooperate = airlock_engine::signals::cooperate().map_err(ConvertError::Usage)?;

    // Tensors.
    let mut notes = Vec::new();
    let mut jobs = Vec::new();
    let mut rope_freqs: Option<Vec<f32>> = None;
    for t in f.tensors() {
        if t.name == "rope_freqs.weight" {
            let mut v = vec![0f32; t.n_elements as usize];
            airlock_kernels::dequantize_row(t.ty, f.tensor_data(t), &mut v)
                .map_err(|e| gerr(format!("rope_freqs.weight: {e}")))?;
            rope_freqs = Some(v);
            continue;
        }
        let (name, rows) = hf_name(&t.name, &c).ok_or_else(|| {
            ConvertError::tensor(
                &opts.input,
                t.name.clone(),
                "not a Llama tensor export knows how to name",
            )
        })?;
        jobs.push(TensorJob {
            name,
            dims: t.dims.clone(),
            out: opts.dtype.ggml(),
            src: Source::Bytes {
                ty: t.ty,
                data: f.tensor_data(t),
            },
            rows,
            // Export passes the model through as it is; `run` reads such a file too.
            finite: false,
        });
    }
    let tied = f.tensor("output.weight").is_none();

    // rope_scaling: recorded by convert, else inferred from rope_freqs.weight.
    let mut rope_scaling = Map::new();
    for e in f.metadata() {
        if let Some(k) = e.key.strip_prefix(ROPE_SCALING_PREFIX) {
            let v = match &e.value {
                Value::String(s) => json!(s),
                Value::Bool(b) => json!(b),
                Value::U64(x) => json!(x),
                Value::I64(x) => json!(x),
                Value::U32(x) => json!(x),
                Value::I32(x) => json!(x),
                Value::F64(x) if x.is_finite() => json!(x),
                Value::F32(x) if x.is_finite() => json!(*x as f64),
                Value::F64(_) | Value::F32(_) => {
                    return Err(gerr(format!(
                        "{}: {:?} is not a finite number (config.json would get null)",
                        e.key, e.value
                    )))
                }
                _ => continue,
            };
            rope_scaling.insert(k.to_string(), v);
        }
    }
    if rope_scaling.is_empty() {
        if let Some(rf) = &rope_freqs {
            match Llama3Rope::infer(rf, c.rope_base as f64, c.head_dim) {
                Some((p, exact)) => {
                    rope_scaling.insert("rope_type".into(), json!("llama3"));
                    rope_scaling.insert("factor".into(), json!(p.factor));
                    rope_scaling.insert("low_freq_factor".into(), json!(p.low_freq_factor));
                    rope_scaling.insert("high_freq_factor".into(), json!(p.high_freq_factor));
                    rope_scaling.insert(
                        "original_max_position_embeddings".into(),
                        json!(p.original_max_position_embeddings as u64),
                    );
                    notes.push(format!(
                        "rope_scaling inferred from rope_freqs.weight (no {ROPE_SCALING_PREFIX}* keys): {}{}",
                        Json::Object(rope_scaling.clone()),
                        if exact {
                            " (reproduces the tensor)"
                        } else {
                            "; WARNING: it does not reproduce the tensor exactly"
                        }
                    ));
                }
                None => notes.push(
                    "rope_freqs.weight is present but no llama3 rope_scaling fits it; rope_scaling left out"
                        .into(),
                ),
            }
        } else if c.rope_freq_scale != 1.0 {
            // Linear scaling as the engine reads it (the type defaults to linear there).
            rope_scaling.insert("rope_type".into(), json!("linear"));
            rope_scaling.insert("factor".into(), json!(1.0 / c.rope_freq_scale as f64));
        }
    }

    // Shards.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, j) in jobs.iter().enumerate() {
        let n = j.out_bytes();
        if size > 0 && size + n > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        size += n;
    }
    let n_shards = shards.len();
    let shard_name = |k: usize| {
        if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", k + 1)
        }
    };

    let special = |key: &str| f.get_u32(key);
    let config = config_json(&f, &c, tied, &rope_scaling, opts.dtype, &special);
    let tokenizer = tokenizer_json(&vocab, &mut notes);
    let tok_config = tokenizer_config_json(&f, &c, &vocab, &special);
    let mut gen = Map::new();
    for (typ, key) in [
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = special(key) {
            gen.insert(format!("{typ}_token_id"), json!(id));
        }
    }
    for (key, hf) in [
        ("general.sampling.top_k", "top_k"),
        ("general.sampling.top_p", "top_p"),
        ("general.sampling.min_p", "min_p"),
        ("general.sampling.temp", "temperature"),
    ] {
        match f.get(key) {
            Some(Value::I32(v)) => {
                gen.insert(hf.into(), json!(v));
            }
            Some(Value::F32(v)) => {
                gen.insert(hf.into(), json!(*v as f64));
            }
            _ => continue,
        }
        gen.insert("do_sample".into(), json!(true));
    }
    let mut stm = Map::new();
    for (typ, key) in SPECIAL_TYPES {
        if let Some(text) = special(key).and_then(|id| vocab.tokens.get(id as usize)) {
            stm.insert(format!("{typ}_token"), json!(text));
        }
    }

    // The files must be what `convert` reads back: checked before anything is written.
    let tokenizer_bytes =
        serde_json::to_vec(&tokenizer).map_err(|e| ConvertError::Internal(e.to_string()))?;
    tokenizers::Tokenizer::from_bytes(&tokenizer_bytes).map_err(|e| {
        gerr(format!(
            "the tokenizer.json it gives does not load ({e}); nothing was written"
        ))
    })?;
    crate::checkpoint::HfConfig::from_json(&opts.output.join("config.json"), config.clone())?;

    // Everything goes into a temporary sibling directory, renamed into place when complete.
    let out = &opts.output;
    let dir = OutputDir::create(out)?;
    let in_bytes: u64 = jobs.iter().map(TensorJob::in_bytes).sum();
    let progress = Progress::new(in_bytes, opts.progress);
    let mut weight_map = Map::new();
    let mut total = 0u64;
    let mut all_jobs: Vec<Option<TensorJob>> = jobs.into_iter().map(Some).collect();
    for (k, idx) in shards.iter().enumerate() {
        let file_name = shard_name(k);
        let shard_jobs: Vec<TensorJob> = idx.iter().filter_map(|&i| all_jobs[i].take()).collect();
        let entries: Vec<(String, &str, Vec<u64>, u64)> = shard_jobs
            .iter()
            .map(|j| {
                let shape: Vec<u64> = j.dims.iter().rev().copied().collect();
                (j.name.clone(), opts.dtype.st_name(), shape, j.out_bytes())
            })
            .collect();
        for (n, _, _, b) in &entries {
            weight_map.insert(n.clone(), json!(file_name));
            total += b;
        }
        let path = dir.temp_path().join(&file_name);
        let final_path = out.join(&file_name);
        let werr = |error| ConvertError::Write {
            path: final_path.clone(),
            error,
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(werr)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&safetensors_header(&entries)).map_err(werr)?;
        stream_tensors(&mut w, &final_path, &shard_jobs, |_| 0, &progress)?;
        let file = w.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
    }
    progress.finish();
    if n_shards > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        dir.write("model.safetensors.index.json", &pretty(&index))?;
    }
    dir.write("config.json", &pretty(&config))?;
    dir.write("generation_config.json", &pretty(&Json::Object(gen)))?;
    dir.write("tokenizer.json", &tokenizer_bytes)?;
    dir.write("tokenizer_config.json", &pretty(&tok_config))?;
    dir.write("special_tokens_map.json", &pretty(&Json::Object(stm)))?;
    dir.commit()?;
    Ok(Report {
        tensors: weight_map.len(),
        in_bytes,
        out_bytes: total,
        seconds: start.elapsed().as_secs_f64(),
        types: Vec::new(),
        notes,
    })
}

const SPECIAL_TYPES: [(&str, &str); 7] = [
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("cls", "tokenizer.ggml.cls_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
];

fn config_json(
    f: &GgufFile,
    c: &LlamaConfig,
    tied: bool,
    rope_scaling: &Map<String, Json>,
    dtype: ExportDtype,
    special: &dyn Fn(&str) -> Option<u32>,
) -> Json {
    let mut m = Map::new();
    m.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    m.insert("model_type".into(), json!("llama"));
    if let Some(name) = f.get_str("general.name") {
        m.insert("_name_or_path".into(), json!(name));
    }
    m.insert("hidden_size".into(), json!(c.n_embd));
    m.insert("intermediate_size".into(), json!(c.n_ff));
    m.insert("num_hidden_layers".into(), json!(c.n_layers));
    m.insert("num_attention_heads".into(), json!(c.n_head));
    m.insert("num_key_value_heads".into(), json!(c.n_head_kv));
    if f.get("llama.attention.key_length").is_some() {
        m.insert("head_dim".into(), json!(c.head_dim));
    }
    m.insert("max_position_embeddings".into(), json!(c.n_ctx_train));
    m.insert("rms_norm_eps".into(), json!(c.rms_eps as f64));
    m.insert("rope_theta".into(), json!(c.rope_base as f64));
    m.insert(
        "rope_scaling".into(),
        if rope_scaling.is_empty() {
            Json::Null
        } else {
            Json::Object(rope_scaling.clone())
        },
    );
    m.insert("tie_word_embeddings".into(), json!(tied));
    m.insert("vocab_size".into(), json!(c.vocab_size));
    m.insert("hidden_act".into(), json!("silu"));
    m.insert("attention_bias".into(), json!(false));
    m.insert("mlp_bias".into(), json!(false));
    m.insert("attention_dropout".into(), json!(0.0));
    m.insert("initializer_range".into(), json!(0.02));
    m.insert("pretraining_tp".into(), json!(1));
    m.insert("use_cache".into(), json!(true));
    m.insert("torch_dtype".into(), json!(dtype.torch_name()));
    for (typ, key) in SPECIAL_TYPES {
        if let Some(id) = special(key) {
            m.insert(format!("{typ}_token_id"), json!(id));
        }
    }
    Json::Object(m)
}

/// A `tokenizer.json` for the GGUF vocabulary: byte-level BPE with the pre-tokenizer that
/// `tokenizer.ggml.pre` names, the GGUF's control and user-defined tokens as added tokens.
pub fn tokenizer_json(v: &VocabSpec, notes: &mut Vec<String>) -> Json {
    let pre_name = v.pre.as_deref().unwrap_or("gpt2");
    let kind = PreTokenizerKind::from_name(pre_name).unwrap_or_else(|| {
        notes.push(format!(
            "tokenizer.ggml.pre {pre_name:?} is not one airlock knows; tokenizer.json uses the GPT-2 pre-tokenizer"
        ));
        PreTokenizerKind::Gpt2
    });
    let byte_level = |use_regex: bool| json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex });
    let split = |re: &str| json!({ "type": "Split", "pattern": { "Regex": re }, "behavior": "Isolated", "invert": false });
    let pre_tokenizer = match kind {
        PreTokenizerKind::Llama3 => {
            json!({ "type": "Sequence", "pretokenizers": [split(HF_RE_LLAMA3), byte_level(false)] })
        }
        PreTokenizerKind::Qwen2 => {
            json!({ "type": "Sequence", "pretokenizers": [split(HF_RE_QWEN2), byte_level(false)] })
        }
        PreTokenizerKind::Smollm => json!({ "type": "Sequence", "pretokenizers": [
            { "type": "Digits", "individual_digits": true }, byte_level(true)] }),
        PreTokenizerKind::Gpt2 => byte_level(true),
    };
    let mut vocab_map = Map::new();
    let mut added = Vec::new();
    for (i, (t, &ty)) in v.tokens.iter().zip(&v.token_types).enumerate() {
        if ty == 5 {
            continue; // unused ([PADn]) slots: `convert` recreates them
        }
        vocab_map.insert(t.clone(), json!(i));
        if matches!(ty, 2..=4) {
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": ty == 4, "special": ty != 4,
            }));
        }
    }
    let merges: Vec<Json> = v
        .merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
            json!([a, b])
        })
        .collect();
    let tok_text = |id: Option<u32>| id.and_then(|i| v.tokens.get(i as usize)).cloned();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    let bos = tok_text(v.bos).filter(|_| v.add_bos);
    let eos = tok_text(v.eos).filter(|_| v.add_eos);
    for (text, id) in [(&bos, v.bos), (&eos, v.eos)] {
        if let (Some(t), Some(id)) = (text, id) {
            specials.insert(t.clone(), json!({ "id": t, "ids": [id], "tokens": [t] }));
        }
    }
    let sp = |t: &String, ty: u32| json!({ "SpecialToken": { "id": t, "type_id": ty } });
    let seq = |s: &str, ty: u32| json!({ "Sequence": { "id": s, "type_id": ty } });
    for (list, parts) in [
        (&mut single, &[("A", 0u32)][..]),
        (&mut pair, &[("A", 0), ("B", 1)][..]),
    ] {
        for &(s, ty) in parts {
            if let Some(b) = &bos {
                list.push(sp(b, ty));
            }
            list.push(seq(s, ty));
            if let Some(e) = &eos {
                list.push(sp(e, ty));
            }
        }
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": { "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials },
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": kind == PreTokenizerKind::Llama3,
            "vocab": vocab_map, "merges": merges,
        },
    })
}

fn tokenizer_config_json(
    f: &GgufFile,
    c: &LlamaConfig,
    v: &VocabSpec,
    special: &dyn Fn(&str) -> Option<u32>,
) -> Json {
    let mut m = Map::new();
    // Only what the GGUF states, so converting back gives the same keys.
    if let Some(b) = f.get_bool("tokenizer.ggml.add_bos_token") {
        m.insert("add_bos_token".into(), json!(b));
    }
    if let Some(b) = f.get_bool("tokenizer.ggml.add_eos_token") {
        m.insert("add_eos_token".into(), json!(b));
    }
    if let Some(b) = f.get_bool("tokenizer.ggml.add_sep_token") {
        m.insert("add_sep_token".into(), json!(b));
    }
    for (typ, key) in SPECIAL_TYPES {
        if let Some(text) = special(key).and_then(|id| v.tokens.get(id as usize)) {
            m.insert(format!("{typ}_token"), json!(text));
        }
    }
    if let Some(t) = &v.chat_template {
        m.insert("chat_template".into(), json!(t));
    }
    m.insert("clean_up_tokenization_spaces".into(), json!(false));
    m.insert("model_max_length".into(), json!(c.n_ctx_train));
    m.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    let mut decoder = BTreeMap::new();
    for (i, (t, &ty)) in v.tokens.iter().zip(&v.token_types).enumerate() {
        if matches!(ty, 2..=4) {
            decoder.insert(
                i,
                json!({ "content": t, "lstrip": false, "normalized": ty == 4, "rstrip": false,
                        "single_word": false, "special": ty != 4 }),
            );
        }
    }
    let decoder: Map<String, Json> = decoder
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    m.insert("added_tokens_decoder".into(), Json::Object(decoder));
    Json::Object(m)
}
