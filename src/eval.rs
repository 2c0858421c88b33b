//! `airlock eval`: multiple-choice accuracy by log-likelihood (the quality crate's `tasks` and
//! `eval` modules do the work).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock_engine::chat::ChatTemplate;
use airlock_quality::eval::{evaluate, EvalParams, Prompting, Score, Summary};
use airlock_quality::tasks::{letter, load_tasks, select, TaskFormat};
use anyhow::{bail, Result};

use crate::chat::template_error;
use crate::load::{load, KvTypeArg, ModelArgs, SignatureArgs};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ScoreArg {
    Letter,
    Option,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Jsonl,
    CtiMcq,
    Hellaswag,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    airlock eval -m models/SmolLM2-135M-Instruct.Q4_1.gguf --task examples/tasks/security-mcq.jsonl\n  \
    airlock eval -m model.gguf --task cti-mcq.tsv --limit 200 --shuffle-seed 1\n  \
    airlock eval -m model.gguf --task hellaswag_val_full.txt --hellaswag\n\n\
    Task files (the format comes from the extension, or --format):\n  \
    .jsonl  one task per line: {\"question\": \"...\", \"options\": [\"...\", \"...\"], \"answer\": \"B\"}\n          \
    (answer: letter or 0-based index; optional \"prefix\": few-shot text put before the\n          \
    question; optional \"id\"). 2 to 26 options.\n  \
    .tsv    CTIBench's cti-mcq.tsv as published (URL, Question, Option A-D, Prompt, GT).\n          \
    CTIBench is CC-BY-NC-SA and not shipped: bring your copy.\n  \
    --hellaswag  llama-perplexity's HellaSwag text: 6 lines per task (context, right ending\n          \
    0-3, four endings); scored by option, as llama-perplexity's acc_norm.\n\n\
    Scoring: --score letter (default; HellaSwag: option) asks which letter follows a prompt\n\
    that lists the options (CTIBench's Prompt column, or the question, `A. ...` lines and\n\
    `Answer:`): \" A\" after a non-space character, \"A\" after whitespace. --score option\n\
    compares the mean log-probability per token of each option appended to the question.\n\
    Prompts are raw text (base models); --chat wraps them in the model's chat template.\n\
    The tokens a task's options share are computed once; the options then run together in\n\
    one forward pass with other tasks' (up to -b tokens per pass).\n\n\
    Prints accuracy +/- standard error, the confusion of right answer against chosen letter,\n\
    and tokens/s.")]
pub struct EvalArgs {
    /// GGUF model file
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Task file (.jsonl, CTIBench .tsv, or HellaSwag text with --hellaswag)
    #[arg(long = "task", value_name = "FILE")]
    pub task: PathBuf,
    /// Task file format (default: from the extension)
    #[arg(long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// The task file is llama-perplexity's HellaSwag text (same as --format hellaswag)
    #[arg(long, conflicts_with = "format")]
    pub hellaswag: bool,
    /// Score the first N tasks (with --shuffle-seed: a seeded random N)
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Shuffle the tasks with this seed before --limit takes N
    #[arg(long = "shuffle-seed", value_name = "S")]
    pub shuffle_seed: Option<u64>,
    /// How an answer is scored (default: letter; option for HellaSwag)
    #[arg(long, value_enum)]
    pub score: Option<ScoreArg>,
    /// Wrap each prompt in the model's chat template (the answer follows as the assistant's)
    #[arg(long)]
    pub chat: bool,
    /// Built-in chat template to use instead of the model's: llama3 or chatml (implies --chat)
    #[arg(long = "chat-template", value_name = "NAME")]
    pub chat_template: Option<String>,
    /// Print each task's answer, choice and scores
    #[arg(long = "show-tasks")]
    pub show_tasks: bool,
    /// Context size: the longest prompt + option allowed [default: 4096, capped at the model's
    /// context_length]. A value above the model's context_length is refused unless --force
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Most tokens per forward pass (tasks are grouped up to it)
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
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

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    let format = match (args.hellaswag, args.format) {
        (true, _) | (_, Some(FormatArg::Hellaswag)) => TaskFormat::Hellaswag,
        (_, Some(FormatArg::Jsonl)) => TaskFormat::Jsonl,
        (_, Some(FormatArg::CtiMcq)) => TaskFormat::CtiMcq,
        (false, None) => match TaskFormat::from_path(&args.task) {
            Some(f) => f,
            None => bail!(
                "cannot tell the format of {} from its name: use --format jsonl|cti-mcq|hellaswag \
                 (or --hellaswag)",
                args.task.display()
            ),
        },
    };
    let score = match (args.score, format) {
        (Some(ScoreArg::Letter), _) => Score::Letter,
        (Some(ScoreArg::Option), _) | (None, TaskFormat::Hellaswag) => Score::Option,
        (None, _) => Score::Letter,
    };
    // The task file before the model: a malformed line fails in milliseconds.
    let tasks = load_tasks(&args.task, format)?;
    let total = tasks.len();
    let tasks = select(tasks, args.limit, args.shuffle_seed);
    let loaded = load(&ModelArgs {
        ctx_size: args.ctx_size,
        threads: args.threads,
        batch_size: args.batch_size,
        kv_type: args.kv_type,
        exact: args.exact,
        no_repack: args.no_repack,
        force: args.force,
        signature: args.signature.clone(),
        ..ModelArgs::new(args.model.clone())
    })?;
    let chat = args.chat || args.chat_template.is_some();
    let template = if chat {
        Some(
            ChatTemplate::for_tokenizer(&loaded.tokenizer, args.chat_template.as_deref())
                .map_err(template_error)?,
        )
    } else {
        None
    };
    let prompting = Prompting {
        tokenizer: &loaded.tokenizer,
        score,
        chat: template.as_ref(),
    };
    let prepared = tasks
        .iter()
        .map(|t| prompting.prepare(t))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "eval: {} of {total} tasks from {} ({}), scored by {}{}",
        prepared.len(),
        args.task.display(),
        format.name(),
        score.name(),
        if chat { ", chat template" } else { "" }
    );
    let params = EvalParams {
        batch: args.batch_size as usize,
        n_ctx: loaded.n_ctx,
        ..EvalParams::default()
    };
    let n = prepared.len();
    let (mut done, mut correct) = (0, 0);
    let show = args.show_tasks;
    // The running accuracy on one terminal line; nothing when stderr is a log.
    let progress = std::io::stderr().is_terminal();
    let run = evaluate(
        &loaded.model,
        loaded.precision,
        loaded.kv_type,
        &prepared,
        &params,
        &mut |r| {
            done += 1;
            correct += r.correct() as usize;
            if show {
                let scores: Vec<String> = r.scores.iter().map(|s| format!("{s:.4}")).collect();
                println!(
                    "line {}: answer {}, chose {} {} [{}]",
                    r.line,
                    letter(r.answer),
                    letter(r.chosen),
                    if r.correct() { "ok" } else { "wrong" },
                    scores.join(", ")
                );
            }
            if progress {
                eprint!(
                    "\r[{done}/{n}] accuracy {:.2}%",
                    100.0 * correct as f64 / done as f64
                );
            }
        },
    )?;
    if progress {
        eprintln!();
    }
    print!("{}", Summary::new(&run).text());
    Ok(ExitCode::SUCCESS)
}
