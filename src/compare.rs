//! `airlock compare`: a base and its variants side by side, in one report (the quality
//! crate's `compare` module does the work).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use airlock_convert::OutType;
use airlock_engine::bounded::read_bounded_string;
use airlock_quality::compare::{compare, CompareOptions, Progress, TaskSet};
use airlock_quality::eval::Score;
use airlock_quality::tasks::{load_tasks, select, TaskFormat};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::eval::{FormatArg, ScoreArg};
use crate::load::{load_error, warn_oversubscribed, KvTypeArg, SignatureArgs};

const MAX_TEXT_BYTES: u64 = 256 << 20;

fn out_type(s: &str) -> Result<OutType, String> {
    OutType::parse(s.trim()).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    airlock compare model-f16.gguf model-q8_0.gguf model-q4_0.gguf -f eval.txt -o report/\n  \
    airlock compare model-f16.gguf --types q8_0,q4_1,q4_0 -f eval.txt --task examples/tasks/security-mcq.jsonl\n  \
    airlock compare ./Foundation-Sec-8B --types q8_0,q4_0 -f eval.txt -o report/   (a Hugging Face directory)\n\n\
    For every file: size on disk, bits per weight, the tensor type mix, the memory a run needs at\n\
    --mem-ctx, perplexity on -f (llama-perplexity's method, -c tokens per chunk) and its change\n\
    against BASE, mean and 99th-percentile KL divergence and same-top-token rate against BASE,\n\
    accuracy on --task (as `airlock eval`), and prompt and generation tokens/s on this machine.\n\n\
    BASE runs first and saves its log-probabilities (llama-perplexity's KL-divergence base file)\n\
    in a work directory inside -o DIR; each variant is compared against them. --types makes the\n\
    variants from BASE (an f16/bf16/f32 GGUF, or a Hugging Face directory, converted to f16\n\
    first) one at a time, each deleted once measured unless --keep (then they stay in DIR).\n\n\
    Writes DIR/report.md (a table), DIR/report.json (every figure) and DIR/report.svg (perplexity\n\
    against size, labelled with generation speed), rewritten after each file: Ctrl-C stops at the\n\
    next forward pass and leaves the report of the files finished (exit status 130).\n\n\
    --require-signature KEY.pub checks BASE and every VARIANT before anything runs (and again as\n\
    each loads); a Hugging Face directory cannot be signed, so it is refused as BASE. Variants\n\
    made with --types come from BASE's checked bytes in this run and need no signature.")]
pub struct CompareArgs {
    /// The reference model: a GGUF file (f16, bf16 or q8_0 for meaningful KL divergence), or a
    /// Hugging Face checkpoint directory with --types
    #[arg(value_name = "BASE")]
    pub base: PathBuf,
    /// Variant GGUF files to compare against BASE
    #[arg(value_name = "VARIANT")]
    pub variants: Vec<PathBuf>,
    /// Text to measure perplexity and KL divergence on
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Output directory for report.md, report.json, report.svg (created if missing)
    #[arg(
        short = 'o',
        long = "output",
        value_name = "DIR",
        default_value = "compare-report"
    )]
    pub output: PathBuf,
    /// Make these variants from BASE with airlock's quantizer (comma-separated, any
    /// `airlock quantize --type`: q8_0,q6_k,q4_k_m,q4_1,q4_0, f16, bf16, ...)
    // One value split at commas: an `Option<Vec<_>>` from a parser that returns the whole
    // list made clap panic at the first use of --types.
    #[arg(long, value_name = "TYPES", value_delimiter = ',', value_parser = out_type)]
    pub types: Vec<OutType>,
    /// Keep the variants --types makes (in DIR) instead of deleting each once measured
    #[arg(long)]
    pub keep: bool,
    /// Multiple-choice task file to score every model on (as `airlock eval --task`)
    #[arg(long = "task", value_name = "FILE")]
    pub task: Option<PathBuf>,
    /// Task file format (default: from the extension)
    #[arg(long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// The task file is llama-perplexity's HellaSwag text
    #[arg(long, conflicts_with = "format")]
    pub hellaswag: bool,
    /// How an answer is scored (default: letter; option for HellaSwag)
    #[arg(long, value_enum)]
    pub score: Option<ScoreArg>,
    /// Score the first N tasks (with --shuffle-seed: a seeded random N)
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Shuffle the tasks with this seed before --limit takes N
    #[arg(long = "shuffle-seed", value_name = "S")]
    pub shuffle_seed: Option<u64>,
    /// Tokens per perplexity chunk
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx_size: usize,
    /// Most tokens per forward pass
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
    /// Score only the first N perplexity chunks
    #[arg(long = "chunks", value_name = "N")]
    pub chunks: Option<usize>,
    /// Context the memory column is computed for
    #[arg(long = "mem-ctx", value_name = "N", default_value_t = 4096)]
    pub mem_ctx: usize,
    /// Prompt tokens of the speed measurement
    #[arg(long = "bench-prompt", value_name = "N", default_value_t = 512)]
    pub bench_prompt: usize,
    /// Generated tokens of the speed measurement
    #[arg(long = "bench-gen", value_name = "N", default_value_t = 64)]
    pub bench_gen: usize,
    /// Threads (default: physical cores)
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// KV cache element type
    #[arg(long = "kv-type", value_enum, default_value_t = KvTypeArg::F16)]
    pub kv_type: KvTypeArg,
    /// No progress bar
    #[arg(short = 'q', long)]
    pub quiet: bool,
    // --require-signature: every file given (BASE and each VARIANT) is checked before anything
    // runs; variants made with --types come from BASE's checked bytes in this run.
    #[command(flatten)]
    pub signature: SignatureArgs,
}

pub fn run(args: CompareArgs) -> Result<ExitCode> {
    if args.chunks == Some(0) || args.limit == Some(0) {
        bail!("--chunks and --limit must be at least 1");
    }
    let text = read_bounded_string(&args.file, MAX_TEXT_BYTES)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let tasks = match &args.task {
        None => None,
        Some(path) => {
            let format = match (args.hellaswag, args.format) {
                (true, _) | (_, Some(FormatArg::Hellaswag)) => TaskFormat::Hellaswag,
                (_, Some(FormatArg::Jsonl)) => TaskFormat::Jsonl,
                (_, Some(FormatArg::CtiMcq)) => TaskFormat::CtiMcq,
                (false, None) => TaskFormat::from_path(path).with_context(|| {
                    format!(
                        "cannot tell the format of {} from its name: use --format",
                        path.display()
                    )
                })?,
            };
            let score = match (args.score, format) {
                (Some(ScoreArg::Letter), _) => Score::Letter,
                (Some(ScoreArg::Option), _) | (None, TaskFormat::Hellaswag) => Score::Option,
                (None, _) => Score::Letter,
            };
            let tasks = select(load_tasks(path, format)?, args.limit, args.shuffle_seed);
            Some(TaskSet {
                name: path.display().to_string(),
                tasks,
                score,
            })
        }
    };
    let threads = airlock_engine::load::init_threads(args.threads).map_err(load_error)?;
    warn_oversubscribed(threads);

    // Ctrl-C (or SIGTERM/SIGHUP): stop at the next forward pass (or quantizer chunk) and write
    // what is done; a second signal exits at once (the process-wide handler, engine::signals).
    let cancel = Arc::new(AtomicBool::new(false));
    let _cooperate = airlock_engine::signals::cooperate().map_err(anyhow::Error::msg)?;
    {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            airlock_engine::signals::wait();
            cancel.store(true, Ordering::SeqCst);
        });
    }

    let opts = CompareOptions {
        base: args.base.clone(),
        variants: args.variants.clone(),
        types: args.types.clone(),
        keep: args.keep,
        out_dir: args.output.clone(),
        text,
        text_name: args.file.file_name().map_or_else(
            || args.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        tasks,
        n_ctx: args.ctx_size,
        batch: args.batch_size as usize,
        max_chunks: args.chunks,
        mem_ctx: args.mem_ctx,
        kv_type: args.kv_type.kv_type(),
        bench_prompt: args.bench_prompt,
        bench_gen: args.bench_gen,
        cancel,
        require_signature: args.signature.require_signature.clone(),
    };
    let bars = !args.quiet && std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut file_label = String::new();
    let report = compare(&opts, &mut |p| match p {
        Progress::File { index, total, name } => {
            file_label = format!("[{}/{total}] {name}", index + 1);
            eprintln!("{file_label}");
        }
        Progress::Step(step) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            if bars {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template("  {msg} [{bar:30}] {pos}/{len} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                b.set_message(step.to_string());
                bar = Some(b);
            } else {
                eprintln!("  {step}");
            }
        }
        Progress::Count { done, total } => {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        }
        Progress::Done(row) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!(
                "  PPL {:.4}{}, {:.1} prompt / {:.1} generated tokens/s",
                row.ppl,
                row.kld_mean
                    .map_or(String::new(), |k| format!(", mean KLD {k:.6}")),
                row.prompt_tokens_per_s,
                row.gen_tokens_per_s
            );
        }
    })?;
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    print!("{}", airlock_quality::compare::markdown(&report));
    eprintln!(
        "wrote {}/report.md, report.json and report.svg",
        args.output.display()
    );
    if report.interrupted {
        eprintln!("interrupted: the report holds the files finished");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}
