//! `airlock quantize`: GGUF to GGUF under the same type policy as `convert`. Metadata is copied
//! in order, with `general.file_type` set to the new type and `general.quantization_version` to 2;
//! tensors keep their order and shapes.

use std::path::PathBuf;
use std::time::Instant;

use airlock_engine::gguf::{GgufFile, Value};
use airlock_kernels::quant::has_row_codec;
use airlock_kernels::GgmlType;

use airlock_engine::output::{check_output_file, Inputs};

use crate::convert::{write_report, Report, Target};
use crate::error::{ConvertError, Result};
use crate::policy::{ModelFacts, Policy};
use crate::stream::{RowMap, Source, TensorJob};

#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub policy: Policy,
    /// Accept already-quantized tensors (dequantized to f32 first, then quantized again).
    pub allow_requantize: bool,
    pub progress: bool,
    /// Write tensors holding NaN or infinities instead of refusing them.
    pub allow_nonfinite: bool,
    /// A minisign public key the input's signed manifest must be signed by (the host policy
    /// applies whatever this says).
    pub require_signature: Option<std::path::PathBuf>,
    /// Replace an existing regular file (or symlink) at `output`.
    pub overwrite: bool,
}

/// Open the input GGUF, checking its signed manifest first when the host policy or
/// `require_signature` asks for one.
pub(crate) fn open_gguf(
    path: &std::path::Path,
    require_signature: Option<&std::path::Path>,
) -> Result<GgufFile> {
    use airlock_engine::load::{open_gguf_checked, LoadError};
    use airlock_engine::signature::Requirement;
    if !path.exists() {
        return Err(ConvertError::MissingFile {
            path: path.into(),
            what: "GGUF file".into(),
        });
    }
    let req = Requirement::for_host(require_signature)?;
    match open_gguf_checked(path, false, &req) {
        Ok((f, _)) => Ok(f),
        Err(LoadError::Signature(e)) => Err(e.into()),
        Err(LoadError::Open { error, .. }) => Err(ConvertError::BadGguf {
            path: path.into(),
            msg: error.to_string(),
        }),
        Err(LoadError::Gguf { error, .. }) => Err(ConvertError::BadGguf {
            path: path.into(),
            msg: error.to_string(),
        }),
        Err(e) => Err(ConvertError::BadGguf {
            path: path.into(),
            msg: e.to_string(),
        }),
    }
}

pub fn quantize(opts: &QuantizeOptions) -> Result<Report> {
    let start = Instant::now();
    let inputs = Inputs::new([&opts.input]);
    check_output_file(&opts.output, &inputs, opts.overwrite)?;
    let f = std::sync::Arc::new(open_gguf(&opts.input, opts.require_signature.as_deref())?);
    // Types airlock cannot read first: one error that lists every such tensor.
    check_readable(&opts.input, &f)?;
    // What run would refuse is refused before the work, not after it.
    airlock_engine::load::validate(f.clone(), &opts.input)
        .map_err(|e| ConvertError::Refused(format!("{e}; airlock would not run it")))?;
    let _cooperate = airlock_engine::signals::cooperate().map_err(ConvertError::Usage)?;
    let facts = model_facts(&opts.input, &f, &opts.policy)?;
    let list: Vec<(&str, &[u64], GgmlType)> = f
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice(), t.ty))
        .collect();
    let types = opts.policy.plan(&facts, &list);
    let mut jobs = Vec::new();
    for (t, out) in f.tensors().iter().zip(types) {
        if t.ty.is_quantized() && t.ty != out && !opts.allow_requantize {
            return Err(ConvertError::tensor(
                &opts.input,
                t.name.clone(),
                format!(
                "is already quantized ({}); pass --allow-requantize to dequantize it and quantize it again as {out} (quality drops twice)",
                t.ty
            ),
            ));
        }
        jobs.push(TensorJob {
            name: t.name.clone(),
            dims: t.dims.clone(),
            out,
            src: Source::Bytes {
                ty: t.ty,
                data: f.tensor_data(t),
            },
            rows: RowMap::Identity,
            finite: !opts.allow_nonfinite,
        });
    }
    let mut meta: Vec<(String, Value)> = Vec::new();
    let (mut seen_ft, mut seen_qv) = (false, false);
    for e in f.metadata() {
        match e.key.as_str() {
            "general.file_type" => {
                meta.push((e.key.clone(), Value::U32(opts.policy.ty.file_type())));
                seen_ft = true;
            }
            "general.quantization_version" => {
                meta.push((e.key.clone(), Value::U32(2)));
                seen_qv = true;
            }
            _ => meta.push((e.key.clone(), e.value.clone())),
        }
    }
    if !seen_ft {
        meta.push((
            "general.file_type".into(),
            Value::U32(opts.policy.ty.file_type()),
        ));
    }
    if !seen_qv {
        meta.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let target = Target {
        path: &opts.output,
        inputs,
        overwrite: opts.overwrite,
    };
    write_report(target, &meta, &jobs, opts.progress, start, Vec::new())
}

/// One error for every tensor airlock cannot decode, listing them all (grouped by type) rather
/// than stopping at the first.
pub(crate) fn check_readable(path: &std::path::Path, f: &GgufFile) -> Result<()> {
    let mut bad: Vec<(GgmlType, Vec<&str>)> = Vec::new();
    for t in f.tensors().iter().filter(|t| !has_row_codec(t.ty)) {
        match bad.iter_mut().find(|b| b.0 == t.ty) {
            Some(b) => b.1.push(&t.name),
            None => bad.push((t.ty, vec![&t.name])),
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    let n: usize = bad.iter().map(|b| b.1.len()).sum();
    let groups: Vec<String> = bad
        .iter()
        .map(|(ty, names)| format!("{ty} ({} tensors): {}", names.len(), list_names(names)))
        .collect();
    Err(ConvertError::BadGguf {
        path: path.into(),
        msg: format!(
            "{n} tensors have a type airlock cannot read: {}",
            groups.join("; ")
        ),
    })
}

/// Names, the first 8 and a count of the rest (a 32-layer model has 32 of each).
fn list_names(names: &[&str]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// The hyperparameters llama.cpp's type rules read. They only matter for quantized types without
/// `--pure`; then the file must be a dense llama model, as those rules are llama.cpp's for it.
fn model_facts(path: &std::path::Path, f: &GgufFile, policy: &Policy) -> Result<ModelFacts> {
    let none = ModelFacts {
        n_layer: 0,
        n_head: 0,
        n_head_kv: 0,
    };
    if policy.pure || !policy.ty.ggml().is_quantized() {
        return Ok(none);
    }
    let bad = |msg: String| ConvertError::BadGguf {
        path: path.into(),
        msg,
    };
    let arch = f.get_str("general.architecture").unwrap_or("");
    if arch != "llama" {
        return Err(bad(format!(
            "general.architecture is {arch:?}; --type {} follows llama.cpp's per-tensor rules for \"llama\" models (pass --pure to put every 2-D tensor in {})",
            policy.ty,
            policy.ty.ggml()
        )));
    }
    if f.get_u32("llama.expert_count").unwrap_or(0) > 1 {
        return Err(bad(
            "llama.expert_count > 1: mixture-of-experts models are not supported".into(),
        ));
    }
    let key = |k: &str| {
        f.get_u32(k).map(u64::from).ok_or_else(|| {
            bad(format!(
                "{k} is missing or not a u32 (--type {} needs it)",
                policy.ty
            ))
        })
    };
    let n_head = key("llama.attention.head_count")?;
    Ok(ModelFacts {
        n_layer: key("llama.block_count")?,
        n_head,
        n_head_kv: f
            .get_u32("llama.attention.head_count_kv")
            .map_or(n_head, u64::from),
    })
}
