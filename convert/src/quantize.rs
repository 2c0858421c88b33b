//! `airlock quantize`: GGUF to GGUF under the same type policy as `convert`. Metadata is copied
//! in order, with `general.file_type` set to the new type and `general.quantization_version` to 2;
//! tensors keep their order and shapes.

use std::path::PathBuf;
use std::time::Instant;

use airlock_engine::gguf::{GgufFile, Value};
use airlock_kernels::quant::has_row_codec;

use crate::convert::{check_output_file, write_report, Report};
use crate::error::{ConvertError, Result};
use crate::policy::{Policy, Role};
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
    let f = open_gguf(&opts.input, opts.require_signature.as_deref())?;
    check_output_file(&opts.output)?;
    let tied = f.tensor("output.weight").is_none();
    let mut jobs = Vec::new();
    for t in f.tensors() {
        let bad = |msg: String| ConvertError::tensor(&opts.input, t.name.clone(), msg);
        if !has_row_codec(t.ty) {
            return Err(bad(format!(
                "type {} cannot be read by airlock (F32, F16, BF16, Q8_0, Q4_0, Q4_1 can)",
                t.ty
            )));
        }
        let role = if t.name == "output.weight" || (tied && t.name == "token_embd.weight") {
            Role::OutputHead
        } else {
            Role::Other
        };
        let out = opts.policy.choose(&t.dims, role);
        if t.ty.is_quantized() && t.ty != out && !opts.allow_requantize {
            return Err(bad(format!(
                "is already quantized ({}); pass --allow-requantize to dequantize it and quantize it again as {out} (quality drops twice)",
                t.ty
            )));
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
    write_report(&opts.output, &meta, &jobs, opts.progress, start, Vec::new())
}
