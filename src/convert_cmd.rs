//! `airlock convert`, `airlock quantize` and `airlock export`: thin CLI wrappers over the
//! airlock-convert crate.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::load::SignatureArgs;
use crate::sign::{sign_and_report, SignWithArgs, SigningKey};
use airlock_convert::{
    ConvertError, ConvertOptions, ExportDtype, ExportOptions, OutType, Policy, QuantizeOptions,
    Report,
};
use airlock_kernels::GgmlType;

const POLICY: &str =
    "Type policy (llama.cpp's llama-quantize rules, so the files hold the same mix):
  --type names a llama.cpp file type; general.file_type is written as its LLAMA_FTYPE id:
    f32 (0), f16 (1), bf16 (32), q8_0 (7), q4_0 (2), q4_1 (3), q5_0 (8), q5_1 (9), q2_k (10),
    q3_k_s (11), q3_k_m (12), q3_k_l (13), q4_k_s (14), q4_k_m (15), q5_k_s (16), q5_k_m (17),
    q6_k (18); q3_k, q4_k, q5_k mean the _m mixes, as in llama-quantize.
  - 1-D tensors (norms, rope_freqs) are F32. Every 2-D tensor gets the type's base type
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K), except:
  - The output head (output.weight, or token_embd.weight when the embeddings are tied) is
    Q6_K for every quantized type but q8_0 (Q8_0), or Q8_0 if its rows do not fit the base
    type's blocks. --output-type TYPE sets it (q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0,
    q3_k, q2_k, f16, bf16, f32).
  - The mixes raise some tensors. use_more_bits(i, n) is i < n/8 || i >= 7n/8 ||
    (i - n/8) % 3 == 2 for layer i of n:
      q4_k_m, q5_k_m  attn_v and ffn_down Q6_K where use_more_bits(i, n)
      q4_k_s          attn_v Q5_K in layers 0-3, ffn_down Q5_K in layers below n/8
      q3_k_m          attn_v Q5_K in layers 0-1 then Q4_K; attn_output Q4_K;
                      ffn_down Q5_K below n/16 then Q4_K
      q3_k_l          attn_v, attn_output, ffn_down Q5_K
      q2_k            attn_v Q4_K (Q3_K with under 4 query heads per KV head);
                      attn_output, ffn_down Q3_K
    (80-layer grouped-query models, llama.cpp's 70B, also get attn_v Q5_K instead of
    Q3_K/Q4_K.) q3_k_s, q5_k_s, q6_k and the single types add nothing.
  - --pure: no head or mix rule; every 2-D tensor in the base type.
  - quantize applies these rules to llama files only (they read llama.block_count and the
    head counts); give other architectures --pure.
  - Rows that do not fit a type's blocks (256 values for the K types, 32 for the others) fall
    back as llama.cpp's: Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and F16
    when even 32 does not divide the row.
  Quantized blocks are byte-identical to llama.cpp's reference quantizers (no importance
  matrix). `airlock inspect FILE` shows the mix a file holds.

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

fn tensor_type(s: &str) -> Result<GgmlType, String> {
    airlock_convert::parse_tensor_type(s).map_err(|e| e.to_string())
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
    /// File type: q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l,
    /// q3_k_m, q3_k_s, q2_k, f16, bf16 or f32 (llama-quantize's mixes; see the policy below)
    #[arg(long = "type", value_name = "TYPE", value_parser = out_type)]
    pub ty: OutType,
    /// Tensor type of the output head (and of a tied token embedding), e.g. q8_0 or q6_k
    #[arg(long = "output-type", value_name = "TYPE", value_parser = tensor_type)]
    pub output_type: Option<GgmlType>,
    /// Every 2-D tensor in --type's base type (no output-head or mix rule)
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
    #[command(flatten)]
    pub sign: SignWithArgs,
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
    /// File type: q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l,
    /// q3_k_m, q3_k_s, q2_k, f16, bf16 or f32 (llama-quantize's mixes; see the policy below)
    #[arg(long = "type", value_name = "TYPE", value_parser = out_type)]
    pub ty: OutType,
    /// Tensor type of the output head (and of a tied token embedding), e.g. q8_0 or q6_k
    #[arg(long = "output-type", value_name = "TYPE", value_parser = tensor_type)]
    pub output_type: Option<GgmlType>,
    /// Every 2-D tensor in --type's base type (no output-head or mix rule)
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
    #[command(flatten)]
    pub signature: SignatureArgs,
    #[command(flatten)]
    pub sign: SignWithArgs,
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
    #[command(flatten)]
    pub signature: SignatureArgs,
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

/// [`finish`], then sign the output when it was written and a key was given.
fn finish_signed(
    result: Result<Report, ConvertError>,
    out: &std::path::Path,
    key: Option<SigningKey>,
) -> anyhow::Result<ExitCode> {
    let written = result.is_ok();
    let code = finish(result, out)?;
    if let (true, Some(key)) = (written, key) {
        use anyhow::Context;
        sign_and_report(out, &key).with_context(|| {
            format!(
                "{} was written but not signed (sign it with `airlock sign`)",
                out.display()
            )
        })?;
    }
    Ok(code)
}

fn progress(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

pub fn run_convert(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let key = args.sign.open()?;
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
    finish_signed(airlock_convert::convert(&opts), &opts.output, key)
}

pub fn run_quantize(args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    let key = args.sign.open()?;
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
        require_signature: args.signature.require_signature,
        overwrite: args.overwrite,
    };
    finish_signed(airlock_convert::quantize(&opts), &opts.output, key)
}

pub fn run_export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let opts = ExportOptions {
        input: args.input,
        output: args.output,
        dtype: args.dtype,
        max_shard_bytes: args.max_shard_size,
        progress: progress(args.quiet),
        require_signature: args.signature.require_signature,
    };
    finish(airlock_convert::export(&opts), &opts.output)
}
