//! `airlock quantize`: GGUF to GGUF under the same type policy as `convert`. Metadata is copied
//! in order, with `general.file_type` set to the new type and `general.quantization_version` to 2;
//! tensors keep their order and shapes.

use std::path::PathBuf;
use std::time::Instant;

use airlock_engine::gguf::{GgufFile, Value};
use airlock_kernels::quant::has_row_codec;

use airlock_engine::output::{check_output_file, Inputs};

use crate::convert::{write_report, Report, Target};
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
    /// Replace an existing regular file (or symlink) at `output`.
    pub overwrite: bool,
}

pub(crate) fn open_gguf(path: &std::path::Path) -> Result<GgufFile> {
    if !path.exists() {
        return Err(ConvertError::MissingFile {
            path: path.into(),
            what: "GGUF file".into(),
        });
    }
    GgufFile::open(path).map_err(|e| ConvertError::BadGguf {
        path: path.into(),
        msg: e.to_string(),
    })
}

pub fn quantize(opts: &QuantizeOptions) -> Result<Report> {
    let start = Instant::now();
    let inputs = Inputs::new([&opts.input]);
    check_output_file(&opts.output, &inputs, opts.overwrite)?;
    let f = std::sync::Arc::new(open_gguf(&opts.input)?);
    // What run would refuse is refused before the work, not after it.
    airlock_engine::load::validate(f.clone(), &opts.input)
        .map_err(|e| ConvertError::Refused(format!("{e}; airlock would not run it")))?;
    let _cooperate = airlock_engine::signals::cooperate().map_err(ConvertError::Usage)?;
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
    let target = Target {
        path: &opts.output,
        inputs,
        overwrite: opts.overwrite,
    };
    write_report(target, &meta, &jobs, opts.progress, start, Vec::new())
}
