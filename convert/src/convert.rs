//! `airlock convert`: a Hugging Face Llama checkpoint directory to one GGUF file, laid out as
//! llama.cpp's `convert_hf_to_gguf.py` lays out a `LlamaForCausalLM`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use airlock_engine::gguf::{Value, WriteError};
use airlock_engine::output::{check_output_file, Inputs, OutputFile};
use airlock_kernels::GgmlType;
use serde_json::{Map, Value as Json};

use crate::checkpoint::{rope_type_of, HfConfig, Weights};
use crate::error::{ConvertError, Result};
use crate::policy::{ModelFacts, Policy};
use crate::rope::Llama3Rope;
use crate::stream::{write_gguf, Progress, RowMap, Source, TensorJob};
use crate::vocab::HfVocab;

/// Prefix of the keys that record the checkpoint's `rope_scaling` object for `export`.
pub const ROPE_SCALING_PREFIX: &str = "airlock.rope_scaling.";

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub policy: Policy,
    /// `--pre NAME`: skip pre-tokenizer detection.
    pub pre: Option<String>,
    /// Show the progress bar (the CLI passes "stderr is a terminal").
    pub progress: bool,
    /// Convert tensors holding NaN or infinities instead of refusing them.
    pub allow_nonfinite: bool,
    /// Replace an existing regular file (or symlink) at `output`.
    pub overwrite: bool,
}

/// What a finished conversion did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub tensors: usize,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub seconds: f64,
    /// Tensor name -> type, in file order.
    pub types: Vec<(String, GgmlType)>,
    pub notes: Vec<String>,
}

/// Where a command writes and what it must not overwrite.
pub(crate) struct Target<'a> {
    pub path: &'a Path,
    pub inputs: Inputs,
    pub overwrite: bool,
}

/// Writes `jobs` to the target through the engine's output helper (temporary file, fsync,
/// rename) with a progress bar, and reports what was done. Shared by `convert` and `quantize`.
pub(crate) fn write_report(
    target: Target,
    meta: &[(String, Value)],
    jobs: &[TensorJob],
    show_progress: bool,
    start: Instant,
    notes: Vec<String>,
) -> Result<Report> {
    let output = target.path;
    let in_bytes: u64 = jobs.iter().map(TensorJob::in_bytes).sum();
    let progress = Progress::new(in_bytes, show_progress);
    let mut file = OutputFile::create(output, target.inputs, target.overwrite)?;
    write_gguf(file.writer(), output, meta, jobs, &progress)?;
    progress.finish();
    check_runs(file.temp_path(), output)?;
    file.commit()?;
    Ok(Report {
        tensors: jobs.len(),
        in_bytes,
        out_bytes: std::fs::metadata(output).map(|m| m.len()).unwrap_or(0),
        seconds: start.elapsed().as_secs_f64(),
        types: jobs.iter().map(|j| (j.name.clone(), j.out)).collect(),
        notes,
    })
}

impl Report {
    pub fn summary(&self, out: &Path) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        format!(
            "wrote {} ({} tensors, {:.2} GB) from {:.2} GB of input in {:.1} s ({:.2} GB/s of input)",
            out.display(),
            self.tensors,
            gb(self.out_bytes),
            gb(self.in_bytes),
            self.seconds,
            gb(self.in_bytes) / self.seconds.max(1e-9)
        )
    }
}

impl From<WriteError> for ConvertError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Path { path, error } => ConvertError::Write { path, error },
            WriteError::Io(error) => ConvertError::Write {
                path: PathBuf::new(),
                error,
            },
            other => ConvertError::Internal(other.to_string()),
        }
    }
}

/// The engine's own checks ([`airlock_engine::load::validate`], what `run` checks) on the
/// finished temporary file: a result `run` would refuse is never moved to `out`.
pub(crate) fn check_runs(tmp: &Path, out: &Path) -> Result<()> {
    let written = airlock_engine::gguf::GgufFile::open(tmp)
        .map_err(|e| ConvertError::Internal(format!("cannot read back the output: {e}")))?;
    airlock_engine::load::validate(std::sync::Arc::new(written), out).map_err(|e| {
        ConvertError::Refused(format!(
            "{e}; airlock would not run the result, so nothing was written"
        ))
    })
}

/// The files of a checkpoint directory that `convert` may read (OUT must be none of them).
pub(crate) fn checkpoint_inputs(dir: &Path, weights: &Weights) -> Inputs {
    let named = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
    ]
    .map(|n| dir.join(n));
    Inputs::new(
        named
            .iter()
            .map(PathBuf::as_path)
            .chain(weights.files.iter().map(|f| f.path.as_path())),
    )
}

/// `vocab_size` and `num_hidden_layers` of config.json against the tensors the checkpoint
/// holds (in both directions for the layers), before the vocabulary is allocated or any layer
/// planned: a config.json cannot make convert allocate for a vocabulary the weights lack.
fn check_counts(c: &HfConfig, w: &Weights) -> Result<()> {
    let bad = |msg: String| ConvertError::json(&c.path, msg);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let Some(file) = w.file_of(name) else {
            continue;
        };
        let rows = w
            .files
            .iter()
            .find(|f| f.path == file)
            .and_then(|f| f.tensors.get(name))
            .and_then(|t| t.shape.first().copied());
        if rows != Some(c.vocab_size as u64) {
            return Err(bad(format!(
                "vocab_size {} disagrees with {name}, which has {} rows",
                c.vocab_size,
                rows.map_or("no".into(), |r| r.to_string())
            )));
        }
    }
    let mut layers = BTreeSet::new();
    for name in w.index.keys() {
        let Some(rest) = name.strip_prefix("model.layers.") else {
            continue;
        };
        let i = rest.split('.').next().and_then(|d| d.parse::<usize>().ok());
        match i {
            Some(i) if i < c.n_layers => {
                layers.insert(i);
            }
            _ => {
                return Err(ConvertError::tensor(
                    w.file_of(name).unwrap_or(Path::new("?")),
                    name,
                    format!(
                        "unexpected tensor: config.json's num_hidden_layers is {}",
                        c.n_layers
                    ),
                ))
            }
        }
    }
    if layers.len() != c.n_layers {
        let missing = (0..c.n_layers).find(|i| !layers.contains(i)).unwrap_or(0);
        return Err(bad(format!(
            "num_hidden_layers is {}, but the weights hold {} layers: tensors of \
             model.layers.{missing}. are missing",
            c.n_layers,
            layers.len()
        )));
    }
    if c.head_dim > airlock_engine::llama::MAX_HEAD_DIM {
        return Err(bad(format!(
            "head size {} is above the {} airlock runs",
            c.head_dim,
            airlock_engine::llama::MAX_HEAD_DIM
        )));
    }
    Ok(())
}

/// Every chat template of the checkpoint through the engine's checks (size, syntax, and a
/// sample render under the fuel, output and memory limits, in the render worker when the
/// binary installed one): a template `run` would refuse is not written.
fn check_templates(dir: &Path, vocab: &HfVocab) -> Result<()> {
    let text = |key: &str| {
        vocab
            .special_ids
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|&(_, id)| vocab.tokens.get(id as usize))
            .cloned()
            .unwrap_or_default()
    };
    let (bos, eos) = (
        text("tokenizer.ggml.bos_token_id"),
        text("tokenizer.ggml.eos_token_id"),
    );
    let named = vocab.chat_template.iter().map(|t| ("default", t.as_str()));
    let others = vocab
        .named_templates
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()));
    for (name, source) in named.chain(others) {
        airlock_engine::chat::check_template(name, source, &bos, &eos).map_err(|e| {
            let file = if dir.join("tokenizer_config.json").is_file() {
                dir.join("tokenizer_config.json")
            } else {
                dir.join("chat_template.jinja")
            };
            ConvertError::json(file, format!("chat template {name:?}: {e}"))
        })?;
    }
    Ok(())
}

/// HF tensor names of layer `i`, their GGUF names, HF shapes and Q/K permutation.
fn layer_tensors(c: &HfConfig, i: usize) -> Vec<(String, String, Vec<u64>, RowMap)> {
    let (h, f) = (c.hidden as u64, c.ffn as u64);
    let q = (c.n_head * c.head_dim) as u64;
    let kv = (c.n_head_kv * c.head_dim) as u64;
    let hf = |s: &str| format!("model.layers.{i}.{s}.weight");
    let gg = |s: &str| format!("blk.{i}.{s}.weight");
    let id = RowMap::Identity;
    // Same order as llama.cpp's files (the HF names sorted).
    vec![
        (hf("input_layernorm"), gg("attn_norm"), vec![h], id),
        (hf("mlp.down_proj"), gg("ffn_down"), vec![h, f], id),
        (hf("mlp.gate_proj"), gg("ffn_gate"), vec![f, h], id),
        (hf("mlp.up_proj"), gg("ffn_up"), vec![f, h], id),
        (hf("post_attention_layernorm"), gg("ffn_norm"), vec![h], id),
        (
            hf("self_attn.k_proj"),
            gg("attn_k"),
            vec![kv, h],
            RowMap::Permute {
                n_head: c.n_head_kv,
            },
        ),
        (hf("self_attn.o_proj"), gg("attn_output"), vec![h, q], id),
        (
            hf("self_attn.q_proj"),
            gg("attn_q"),
            vec![q, h],
            RowMap::Permute { n_head: c.n_head },
        ),
        (hf("self_attn.v_proj"), gg("attn_v"), vec![kv, h], id),
    ]
}

/// The tensors to write, checked against config.json; refuses tensors it does not know.
fn plan<'w>(
    c: &HfConfig,
    w: &'w Weights,
    policy: &Policy,
    rope_freqs: Option<Vec<f32>>,
    finite: bool,
) -> Result<Vec<TensorJob<'w>>> {
    let mut jobs = Vec::new();
    let mut used = BTreeSet::new();
    if let Some(f) = rope_freqs {
        jobs.push(TensorJob {
            name: "rope_freqs.weight".into(),
            dims: vec![f.len() as u64],
            out: GgmlType::F32,
            src: Source::Values(f),
            rows: RowMap::Identity,
            finite,
        });
    }
    let (h, v) = (c.hidden as u64, c.vocab_size as u64);
    // Types are chosen below, once every tensor is known (llama.cpp's rules count layers).
    let mut add = |hf: &str, gguf: &str, shape: Vec<u64>, rows: RowMap| -> Result<()> {
        let t = w.get(hf, &shape)?;
        let dims: Vec<u64> = shape.iter().rev().copied().collect();
        let job = TensorJob {
            name: gguf.to_string(),
            out: t.ty,
            dims,
            src: Source::Bytes {
                ty: t.ty,
                data: t.data,
            },
            rows,
            finite,
        };
        job.validate()
            .map_err(|m| ConvertError::tensor(t.file, hf, m))?;
        used.insert(hf.to_string());
        jobs.push(job);
        Ok(())
    };
    add(
        "model.embed_tokens.weight",
        "token_embd.weight",
        vec![v, h],
        RowMap::Identity,
    )?;
    for i in 0..c.n_layers {
        for (hf, gguf, shape, rows) in layer_tensors(c, i) {
            add(&hf, &gguf, shape, rows)?;
        }
    }
    add(
        "model.norm.weight",
        "output_norm.weight",
        vec![h],
        RowMap::Identity,
    )?;
    if !c.tied {
        add(
            "lm_head.weight",
            "output.weight",
            vec![v, h],
            RowMap::Identity,
        )?;
    }
    for name in w.index.keys() {
        if used.contains(name) || name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if c.tied && name == "lm_head.weight" {
            continue;
        }
        let file = w.file_of(name).unwrap_or(Path::new("?"));
        return Err(ConvertError::tensor(
            file,
            name,
            format!(
                "unexpected tensor: not part of a LlamaForCausalLM with {} layers as config.json describes",
                c.n_layers
            ),
        ));
    }
    let facts = ModelFacts {
        n_layer: c.n_layers as u64,
        n_head: c.n_head as u64,
        n_head_kv: c.n_head_kv as u64,
    };
    let list: Vec<(&str, &[u64], GgmlType)> = jobs
        .iter()
        .map(|j| (j.name.as_str(), j.dims.as_slice(), j.out))
        .collect();
    let types = policy.plan(&facts, &list);
    for (j, t) in jobs.iter_mut().zip(types) {
        j.out = t;
    }
    Ok(jobs)
}

/// GGUF metadata for the checkpoint, in llama.cpp's order.
fn metadata(
    c: &HfConfig,
    vocab: &HfVocab,
    policy: &Policy,
    name: &str,
    sampling: Vec<(String, Value)>,
) -> Vec<(String, Value)> {
    let mut m: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| m.push((k.to_string(), v));
    let u = |x: usize| Value::U32(x as u32);
    put("general.architecture", Value::String("llama".into()));
    put("general.type", Value::String("model".into()));
    for (k, v) in sampling {
        put(&k, v);
    }
    put("general.name", Value::String(name.into()));
    put("llama.block_count", u(c.n_layers));
    put("llama.context_length", u(c.context_length));
    put("llama.embedding_length", u(c.hidden));
    put("llama.feed_forward_length", u(c.ffn));
    put("llama.attention.head_count", u(c.n_head));
    put("llama.attention.head_count_kv", u(c.n_head_kv));
    put("llama.rope.freq_base", Value::F32(c.rope_theta as f32));
    put(
        "llama.attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_eps as f32),
    );
    if let Some(hd) = c.head_dim_explicit {
        put("llama.attention.key_length", u(hd));
        put("llama.attention.value_length", u(hd));
    }
    if let Some(rs) = &c.rope_scaling {
        if rope_type_of(rs) == Some("linear") {
            if let Some(f) = rs.get("factor").and_then(Json::as_f64) {
                put("llama.rope.scaling.type", Value::String("linear".into()));
                put("llama.rope.scaling.factor", Value::F32(f as f32));
            }
        }
    }
    put("general.file_type", Value::U32(policy.ty.file_type()));
    put("llama.vocab_size", u(c.vocab_size));
    put("llama.rope.dimension_count", u(c.head_dim));
    m.extend(vocab.metadata());
    if let Some(rs) = &c.rope_scaling {
        m.extend(rope_scaling_keys(rs));
    }
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m
}

/// `general.sampling.*` from generation_config.json, as gguf-py's `Metadata` reads them.
fn sampling_keys(dir: &Path) -> Result<Vec<(String, Value)>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let g = crate::checkpoint::read_json(&path)?;
    let mut out = Vec::new();
    let ints = [("top_k", "top_k")];
    let floats = [
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("temperature", "temp"),
    ];
    for (hf, key) in ints {
        if let Some(v) = g
            .get(hf)
            .and_then(Json::as_i64)
            .and_then(|v| i32::try_from(v).ok())
        {
            out.push((format!("general.sampling.{key}"), Value::I32(v)));
        }
    }
    for (hf, key) in floats {
        if let Some(v) = g.get(hf).and_then(Json::as_f64) {
            out.push((format!("general.sampling.{key}"), Value::F32(v as f32)));
        }
    }
    Ok(out)
}

/// `airlock.rope_scaling.<field>` for each scalar field of the checkpoint's rope_scaling.
fn rope_scaling_keys(rs: &Map<String, Json>) -> Vec<(String, Value)> {
    rs.iter()
        .filter_map(|(k, v)| {
            let v = match v {
                Json::String(s) => Value::String(s.clone()),
                Json::Bool(b) => Value::Bool(*b),
                Json::Number(n) if n.is_u64() => Value::U64(n.as_u64()?),
                Json::Number(n) if n.is_i64() => Value::I64(n.as_i64()?),
                Json::Number(n) => Value::F64(n.as_f64()?),
                _ => return None,
            };
            Some((format!("{ROPE_SCALING_PREFIX}{k}"), v))
        })
        .collect()
}

/// The model's name: config.json's `_name_or_path` (last path part), else the directory name.
fn model_name(c: &HfConfig, dir: &Path) -> String {
    c.raw
        .get("_name_or_path")
        .and_then(Json::as_str)
        .map(|s| s.trim_end_matches('/').rsplit('/').next().unwrap_or(s))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "model".into())
}

/// Runs a conversion. On any error nothing is left at `opts.output`.
pub fn convert(opts: &ConvertOptions) -> Result<Report> {
    let start = Instant::now();
    let dir = &opts.input;
    if !dir.is_dir() {
        return Err(ConvertError::MissingFile {
            path: dir.clone(),
            what: "checkpoint directory".into(),
        });
    }
    // The output path first (before any reading), then again with the inputs once they are known.
    check_output_file(&opts.output, &Inputs::default(), opts.overwrite)?;
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ConvertError::MissingFile {
            path: config_path,
            what: "model configuration".into(),
        });
    }
    let c = HfConfig::load(&config_path)?;
    let weights = Weights::open(dir)?;
    let inputs = checkpoint_inputs(dir, &weights);
    check_output_file(&opts.output, &inputs, opts.overwrite)?;
    // config.json's counts against the weights before anything is sized by them.
    check_counts(&c, &weights)?;
    let vocab = HfVocab::load(dir, &c, opts.pre.as_deref())?;
    check_templates(dir, &vocab)?;
    let _cooperate = airlock_engine::signals::cooperate().map_err(ConvertError::Usage)?;
    let mut notes = Vec::new();
    let rope_freqs = match &c.rope_scaling {
        Some(rs) if rope_type_of(rs).map(str::to_ascii_lowercase).as_deref() == Some("llama3") => {
            let p = Llama3Rope::from_json(rs, None);
            Some(p.factors(c.rope_theta, c.head_dim))
        }
        _ => None,
    };
    if let Some(rs) = &c.rope_scaling {
        notes.push(format!(
            "rope_scaling {} recorded under {ROPE_SCALING_PREFIX}*",
            Json::Object(rs.clone())
        ));
    }
    let jobs = plan(
        &c,
        &weights,
        &opts.policy,
        rope_freqs,
        !opts.allow_nonfinite,
    )?;
    let meta = metadata(
        &c,
        &vocab,
        &opts.policy,
        &model_name(&c, dir),
        sampling_keys(dir)?,
    );
    drop(vocab);
    let target = Target {
        path: &opts.output,
        inputs,
        overwrite: opts.overwrite,
    };
    write_report(target, &meta, &jobs, opts.progress, start, notes)
}
