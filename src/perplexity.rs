//! `airlock perplexity`: llama-perplexity's measurement and output lines, and its KL-divergence
//! mode with the same base-file format (the engine's `perplexity` and `kld` modules do the
//! work).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock_engine::bounded::read_bounded_string;
use airlock_engine::kld::{kl_divergence, BaseFile, BaseWriter, KldStats};
use airlock_engine::output::{write_file, Inputs};
use airlock_engine::perplexity::{check_text, perplexity, run_chunks, Estimate, PerplexityParams};
use anyhow::{bail, Context, Result};

use crate::load::{load, KvTypeArg, ModelArgs, SignatureArgs};

/// The longest text read: far more than any evaluation needs.
const MAX_TEXT_BYTES: u64 = 256 << 20;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    airlock perplexity -m models/SmolLM2-135M-Instruct.Q4_1.gguf -f tests/fixtures/text/eval.txt\n  \
    airlock perplexity -m base-f16.gguf -f eval.txt --kl-divergence-base base.kld\n  \
    airlock perplexity -m variant-q4_0.gguf --kl-divergence-base base.kld --kl-divergence\n\n\
    llama-perplexity's method, so the figures compare: the text is tokenized once and cut into \
    chunks of -c tokens; when the model adds a BOS token each chunk starts with it; the second \
    half of each chunk is scored. Prints the running value after each chunk ([1]12.3456,[2]...) \
    and ends with llama-perplexity's line, `Final estimate: PPL = ... +/- ...`. Chunks go \
    -b / -c at a time through one forward pass.\n\n\
    KL divergence: --kl-divergence-base FILE alone runs the reference model (f16, bf16 or q8_0) \
    on -f and saves its log-probabilities to FILE; with --kl-divergence it compares another \
    model of the same vocabulary against FILE (no -f needed: the tokens are in FILE; the file's \
    -c is used) and prints llama-perplexity's per-chunk table and summary (Mean PPL(Q), ..., \
    Mean KLD, percentiles, Δp statistics, Same top p). The file format is llama-perplexity's, \
    so a base file written by either tool is read by the other. A file whose vocabulary differs \
    from the model's, or (with -f) whose tokens are not the text's, is refused.")]
pub struct PerplexityArgs {
    /// GGUF model file
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Text file to measure on (optional with --kl-divergence: then checked against the base
    /// file's tokens)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Tokens per chunk (with --kl-divergence the base file's context is used)
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx_size: usize,
    /// Most tokens per forward pass; chunks go several per pass when it holds more than one
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
    /// Score only the first N chunks (default: every whole chunk of the text)
    #[arg(long = "chunks", value_name = "N")]
    pub chunks: Option<usize>,
    /// Base file of log-probabilities: written from this model's run on -f, or, with
    /// --kl-divergence, read to compare this model against
    #[arg(long = "kl-divergence-base", value_name = "FILE")]
    pub kl_divergence_base: Option<PathBuf>,
    /// Compare this model against --kl-divergence-base (KL divergence, top-token agreement,
    /// PPL ratio)
    #[arg(long = "kl-divergence", requires = "kl_divergence_base")]
    pub kl_divergence: bool,
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

fn print_running(e: &Estimate) {
    let mut out = std::io::stdout();
    let _ = write!(out, "[{}]{:.4},", e.chunks, e.ppl);
    let _ = out.flush();
}

fn print_final(e: &Estimate) {
    println!();
    match e.ppl_err {
        Some(err) => println!("Final estimate: PPL = {:.4} +/- {err:.5}", e.ppl),
        None => println!("Final estimate: PPL = {:.4}", e.ppl),
    }
}

pub fn run(args: PerplexityArgs) -> Result<ExitCode> {
    if args.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    if args.kl_divergence {
        return run_kld(args);
    }
    let Some(file) = args.file.clone() else {
        bail!("-f FILE is needed: the text to measure on (only --kl-divergence reads its tokens from the base file)");
    };
    let text = read_bounded_string(&file, MAX_TEXT_BYTES)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let model_args = model_args(&args, args.ctx_size);
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
        cancel: None,
    };
    check_text(tokens.len(), args.ctx_size)?;
    let n_chunks = params.chunk_count(tokens.len());
    eprintln!(
        "perplexity: {} tokens, calculating perplexity over {n_chunks} chunks, n_ctx={}, \
         batch_size={}, n_seq={}",
        tokens.len(),
        args.ctx_size,
        args.batch_size,
        (args.batch_size as usize / args.ctx_size.max(1)).max(1)
    );
    let (estimate, n_tokens, time) = match &args.kl_divergence_base {
        None => {
            let r = perplexity(
                &loaded.model,
                loaded.precision,
                loaded.kv_type,
                &tokens,
                &params,
                &mut print_running,
            )?;
            (r.estimate, r.tokens, r.time)
        }
        Some(base) => {
            eprintln!(
                "perplexity: saving the log-probabilities to {}",
                base.display()
            );
            let vocab = loaded.model.config.vocab_size;
            let head = &tokens[..n_chunks * args.ctx_size];
            // As llama-perplexity, the base file is replaced when it exists (never the model
            // or the text, which the output helper refuses).
            write_file(
                base,
                Inputs::new([&args.model, &file]),
                true,
                |w| -> Result<_> {
                    let mut on_chunk = print_running;
                    let mut writer =
                        BaseWriter::new(w, base, args.ctx_size, vocab, head, &mut on_chunk)?;
                    let (n, time) = run_chunks(
                        &loaded.model,
                        loaded.precision,
                        loaded.kv_type,
                        &tokens,
                        n_chunks,
                        &params,
                        &mut writer,
                    )?;
                    let (_, nll) = writer.finish()?;
                    Ok((nll.estimate(n_chunks), n, time))
                },
            )?
        }
    };
    print_final(&estimate);
    eprintln!(
        "{} tokens in {:.2} s ({:.1} tokens/s), {} scored",
        n_tokens,
        time.as_secs_f64(),
        n_tokens as f64 / time.as_secs_f64().max(1e-9),
        estimate.scored
    );
    Ok(ExitCode::SUCCESS)
}

fn model_args(args: &PerplexityArgs, ctx_size: usize) -> ModelArgs {
    ModelArgs {
        ctx_size,
        threads: args.threads,
        batch_size: args.batch_size,
        kv_type: args.kv_type,
        exact: args.exact,
        no_repack: args.no_repack,
        force: args.force,
        signature: args.signature.clone(),
        ..ModelArgs::new(args.model.clone())
    }
}

/// `--kl-divergence`: this model against the base file's log-probabilities.
fn run_kld(args: PerplexityArgs) -> Result<ExitCode> {
    let base_path = args
        .kl_divergence_base
        .clone()
        .context("--kl-divergence needs --kl-divergence-base FILE")?;
    // The text, when given, is read before the model so a wrong path fails fast.
    let text = match &args.file {
        Some(f) => Some(
            read_bounded_string(f, MAX_TEXT_BYTES)
                .with_context(|| format!("cannot read {}", f.display()))?,
        ),
        None => None,
    };
    // The base file first (a bad one fails before the model loads), then the model with the
    // file's context.
    let mut base = BaseFile::open(&base_path)?;
    let loaded = load(&model_args(&args, base.n_ctx))?;
    base.check_vocab(loaded.model.config.vocab_size)?;
    if loaded.n_ctx < base.n_ctx {
        bail!(
            "{} was computed with a context of {}, longer than the model's ({})",
            base_path.display(),
            base.n_ctx,
            loaded.n_ctx
        );
    }
    let tok = &loaded.tokenizer;
    let add_bos = tok.add_bos_default();
    if let Some(text) = text {
        let tokens = tok.encode(&text, add_bos, false)?;
        base.check_tokens(&tokens, &|id| {
            String::from_utf8_lossy(tok.token_piece(id).unwrap_or_default()).into_owned()
        })?;
    }
    let params = PerplexityParams {
        n_ctx: base.n_ctx,
        batch: args.batch_size as usize,
        max_chunks: args.chunks,
        bos: if add_bos { tok.bos() } else { None },
        cancel: None,
    };
    eprintln!(
        "kl_divergence: computing over {} chunks, n_ctx={}, batch_size={}, n_seq={}",
        base.n_chunk.min(args.chunks.unwrap_or(usize::MAX)),
        base.n_ctx,
        args.batch_size,
        (args.batch_size as usize / base.n_ctx).max(1)
    );
    println!("{}", KldStats::chunk_header());
    let r = kl_divergence(
        &loaded.model,
        loaded.precision,
        loaded.kv_type,
        &mut base,
        &params,
        &mut |chunk, stats| println!("{}", stats.chunk_line(chunk)),
    )?;
    println!();
    match r.stats.summary() {
        Some(s) => print!("{s}"),
        None => eprintln!(
            "kl_divergence: {} scored positions are too few for the summary (llama-perplexity \
             prints it from 100)",
            r.stats.count()
        ),
    }
    eprintln!(
        "{} tokens in {:.2} s ({:.1} tokens/s), {} scored",
        r.tokens,
        r.time.as_secs_f64(),
        r.tokens_per_s(),
        r.stats.count()
    );
    Ok(ExitCode::SUCCESS)
}
