//! `airlock convert`, `airlock quantize` and `airlock export`: thin CLI wrappers over the
//! airlock-convert crate.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock_convert::{
    ConvertError, ConvertOptions, ExportDtype, ExportOptions, OutType, Policy, QuantizeOptions,
    Report,
};

const POLICY: &str = "Type policy:
  - 1-D tensors (norms, rope_freqs) stay F32.
  - With --type q4_0 or q4_1 the output head (output.weight, or token_embd.weight when the
    embeddings are tied) is Q8_0, as llama-quantize keeps a higher-precision type there;
    with the other types it is --type. --output-type TYPE sets it; --pure puts it in --type.
  - Every other 2-D tensor gets --type.
  - A tensor whose row length is not a multiple of the type's block size (32 for q8_0, q4_0,
    q4_1) is written as F16 (F32 with --type f32).
  Quantized blocks are byte-identical to llama.cpp's reference quantizers.

Output: OUT must not be one of the inputs (by device and inode, so another name, a hard link
or a symlink to an input is refused too), nor an existing device, FIFO, socket or directory. An
existing file (or symlink, which is replaced, not followed) is only replaced with --overwrite.
The output appears only when complete: it is written to a temporary file next to OUT
(.NAME.tmp.PID.N), fsynced and renamed. On any error, or on SIGINT, SIGTERM or SIGHUP, nothing
is left at OUT and the temporary file is removed (exit status 130 after a signal; a second
signal exits at once, still removing it).";

fn out_type(s: &str) -> Result<OutType, String> {
    OutType::parse(s).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
#[command(after_long_help = POLICY)]
pub struct ConvertArgs {
    /// Hugging Face checkpoint directory (config.json, model.safetensors or
    /// model.safetensors.index.json + shards, tokenizer.json, tokenizer_config.json)
    pub input: PathBuf,
    /// Output GGUF file
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Tensor type: q8_0, q4_0, q4_1, f16, bf16 or f32 (see the policy below)
    #[arg(long = "type", value_name = "TYPE", value_parser = out_type)]
    pub ty: OutType,
    /// Type of the output head (and of a tied token embedding)
    #[arg(long = "output-type", value_name = "TYPE", value_parser = out_type)]
    pub output_type: Option<OutType>,
    /// Every 2-D tensor in --type (no higher-precision output head)
    #[arg(long)]
    pub pure: bool,
    /// tokenizer.ggml.pre to write instead of detecting it (llama-bpe for Llama 3 / 3.1 /
    /// Foundation-sec-8b, smollm for SmolLM2)
    #[arg(long, value_name = "NAME")]
    pub pre: Option<String>,
    /// Write tensors that hold NaN or infinities instead of refusing them (by default such a
    /// tensor stops the run, naming it: a model with one computes NaN)
    #[arg(long = "allow-nonfinite")]
    pub allow_nonfinite: bool,
    /// Replace OUT if it exists (a regular file or a symlink; never an input)
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(clap::Args)]
#[command(after_long_help = POLICY)]
pub struct QuantizeArgs {
    /// Input GGUF file
    pub input: PathBuf,
    /// Output GGUF file
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Tensor type: q8_0, q4_0, q4_1, f16, bf16 or f32 (see the policy below)
    #[arg(long = "type", value_name = "TYPE", value_parser = out_type)]
    pub ty: OutType,
    /// Type of the output head (and of a tied token embedding)
    #[arg(long = "output-type", value_name = "TYPE", value_parser = out_type)]
    pub output_type: Option<OutType>,
    /// Every 2-D tensor in --type (no higher-precision output head)
    #[arg(long)]
    pub pure: bool,
    /// Accept already-quantized tensors: dequantize them and quantize again (loses precision
    /// twice); tensors already in their target type are copied unchanged either way
    #[arg(long = "allow-requantize")]
    pub allow_requantize: bool,
    /// Write tensors that hold NaN or infinities instead of refusing them (by default such a
    /// tensor stops the run, naming it: a model with one computes NaN)
    #[arg(long = "allow-nonfinite")]
    pub allow_nonfinite: bool,
    /// Replace OUT if it exists (a regular file or a symlink; never the input)
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

fn export_dtype(s: &str) -> Result<ExportDtype, String> {
    ExportDtype::parse(s).map_err(|e| e.to_string())
}

fn byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mul) = if let Some(n) = t.strip_suffix("GB") {
        (n, 1_000_000_000)
    } else if let Some(n) = t.strip_suffix("MB") {
        (n, 1_000_000)
    } else if let Some(n) = t.strip_suffix("KB") {
        (n, 1_000)
    } else {
        (t.as_str(), 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size like 5GB, 500MB or 1000000"))
}

#[derive(clap::Args)]
#[command(
    after_long_help = "Writes OUT_DIR with model.safetensors (or model-0000N-of-0000M.safetensors \
shards and model.safetensors.index.json), config.json, generation_config.json, tokenizer.json, \
tokenizer_config.json and special_tokens_map.json. Q/K rows are put back in Hugging Face order. \
rope_scaling comes from the airlock.rope_scaling.* keys `airlock convert` records, or is inferred \
from rope_freqs.weight (said on stderr). OUT_DIR must not exist or be an empty directory (a directory with anything in it is never \
replaced); it appears only when complete, and on any error or on SIGINT, SIGTERM or SIGHUP \
nothing is left there."
)]
pub struct ExportArgs {
    /// Input GGUF file (any type airlock reads: F32, F16, BF16, Q8_0, Q4_0, Q4_1)
    pub input: PathBuf,
    /// Output directory (must not exist, or be empty)
    #[arg(short = 'o', long = "output", value_name = "OUT_DIR")]
    pub output: PathBuf,
    /// Element type of the safetensors: bf16 or f32 (f32 keeps dequantized values exactly)
    #[arg(long, value_name = "DTYPE", default_value = "bf16", value_parser = export_dtype)]
    pub dtype: ExportDtype,
    /// Largest safetensors shard (e.g. 5GB, 500MB)
    #[arg(long = "max-shard-size", value_name = "SIZE", default_value = "5GB", value_parser = byte_size)]
    pub max_shard_size: u64,
    /// No progress bar
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

fn finish(result: Result<Report, ConvertError>, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    match result {
        Ok(report) => {
            for n in &report.notes {
                eprintln!("note: {n}");
            }
            eprintln!("{}", report.summary(out));
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ ConvertError::Interrupted(_)) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e.into()),
    }
}

fn progress(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

pub fn run_convert(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let opts = ConvertOptions {
        input: args.input,
        output: args.output,
        policy: Policy {
            ty: args.ty,
            output_ty: args.output_type,
            pure: args.pure,
        },
        pre: args.pre,
        progress: progress(args.quiet),
        allow_nonfinite: args.allow_nonfinite,
        overwrite: args.overwrite,
    };
    finish(airlock_convert::convert(&opts), &opts.output)
}

pub fn run_quantize(args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    let opts = QuantizeOptions {
        input: args.input,
        output: args.output,
        policy: Policy {
            ty: args.ty,
            output_ty: args.output_type,
            pure: args.pure,
        },
        allow_requantize: args.allow_requantize,
        progress: progress(args.quiet),
        allow_nonfinite: args.allow_nonfinite,
        overwrite: args.overwrite,
    };
    finish(airlock_convert::quantize(&opts), &opts.output)
}

pub fn run_export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let opts = ExportOptions {
        input: args.input,
        output: args.output,
        dtype: args.dtype,
        max_shard_bytes: args.max_shard_size,
        progress: progress(args.quiet),
    };
    finish(airlock_convert::export(&opts), &opts.output)
}
