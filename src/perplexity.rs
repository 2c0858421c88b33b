//! `airlock perplexity`: llama-perplexity's measurement and output lines (the engine's
//! `perplexity` module does the work).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock_engine::bounded::read_bounded_string;
use airlock_engine::perplexity::{perplexity, PerplexityParams};
use anyhow::{bail, Context, Result};

use crate::load::{load, KvTypeArg, ModelArgs, SignatureArgs};

/// The longest text read: far more than any evaluation needs.
const MAX_TEXT_BYTES: u64 = 256 << 20;

#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    airlock perplexity -m models/SmolLM2-135M-Instruct.Q4_1.gguf -f tests/fixtures/text/eval.txt\n\n\
    llama-perplexity's method, so the figures compare: the text is tokenized once and cut into \
    chunks of -c tokens; when the model adds a BOS token each chunk starts with it; the second \
    half of each chunk is scored. Prints the running value after each chunk ([1]12.3456,[2]...) \
    and ends with llama-perplexity's line, `Final estimate: PPL = ... +/- ...`. Chunks go \
    -b / -c at a time through one forward pass.")]
pub struct PerplexityArgs {
    /// GGUF model file
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Text file to measure on
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Tokens per chunk
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx_size: usize,
    /// Most tokens per forward pass; chunks go several per pass when it holds more than one
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
    /// Score only the first N chunks (default: every whole chunk of the text)
    #[arg(long = "chunks", value_name = "N")]
    pub chunks: Option<usize>,
    /// Threads (default: physical cores)
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// KV cache element type
    #[arg(long = "kv-type", value_enum, default_value_t = KvTypeArg::F16)]
    pub kv_type: KvTypeArg,
    /// Exact path: f32 activations and dequantized weights
    #[arg(long)]
    pub exact: bool,
    /// Keep every weight in the file's layout (see `airlock run --help`)
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    /// Run even when the estimated memory exceeds what is available
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub signature: SignatureArgs,
}

pub fn run(args: PerplexityArgs) -> Result<ExitCode> {
    if args.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    let text = read_bounded_string(&args.file, MAX_TEXT_BYTES)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let model_args = ModelArgs {
        ctx_size: args.ctx_size,
        threads: args.threads,
        batch_size: args.batch_size,
        kv_type: args.kv_type,
        exact: args.exact,
        no_repack: args.no_repack,
        force: args.force,
        signature: args.signature.clone(),
        ..ModelArgs::new(args.model.clone())
    };
    let loaded = load(&model_args)?;
    if loaded.n_ctx < args.ctx_size {
        bail!(
            "-c {} is longer than the model's context ({})",
            args.ctx_size,
            loaded.n_ctx
        );
    }
    let tok = &loaded.tokenizer;
    // As llama-perplexity: BOS per the model's add_bos, special-token text parsed as plain text.
    let add_bos = tok.add_bos_default();
    let tokens = tok.encode(&text, add_bos, false)?;
    let params = PerplexityParams {
        n_ctx: args.ctx_size,
        batch: args.batch_size as usize,
        max_chunks: args.chunks,
        bos: if add_bos { tok.bos() } else { None },
    };
    let n_chunks = (tokens.len() / args.ctx_size.max(1)).min(args.chunks.unwrap_or(usize::MAX));
    eprintln!(
        "perplexity: {} tokens, calculating perplexity over {n_chunks} chunks, n_ctx={}, \
         batch_size={}, n_seq={}",
        tokens.len(),
        args.ctx_size,
        args.batch_size,
        (args.batch_size as usize / args.ctx_size.max(1)).max(1)
    );
    let mut out = std::io::stdout();
    let result = perplexity(
        &loaded.model,
        loaded.precision,
        loaded.kv_type,
        &tokens,
        &params,
        &mut |e| {
            let _ = write!(out, "[{}]{:.4},", e.chunks, e.ppl);
            let _ = out.flush();
        },
    )?;
    let e = result.estimate;
    println!();
    match e.ppl_err {
        Some(err) => println!("Final estimate: PPL = {:.4} +/- {err:.5}", e.ppl),
        None => println!("Final estimate: PPL = {:.4}", e.ppl),
    }
    eprintln!(
        "{} tokens in {:.2} s ({:.1} tokens/s), {} scored",
        result.tokens,
        result.time.as_secs_f64(),
        result.tokens_per_s(),
        e.scored
    );
    Ok(ExitCode::SUCCESS)
}
