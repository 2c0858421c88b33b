//! `airlock run`: one prompt in, streamed text out, timings on stderr.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use airlock_engine::bounded::{read_bounded_string, read_stdin_bounded};
use airlock_engine::chat::{tokenize_chat, ChatMessage, ChatTemplate};
use airlock_engine::generate::{GenerateError, GenerateParams, StopReason};
use airlock_engine::sampling::Sampler;
use anyhow::{bail, Context, Result};

use crate::chat::template_error;
use crate::load::{generate_error, generate_to, load, ModelArgs, SamplingArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    airlock run -m models/SmolLM2-135M-Instruct.Q4_1.gguf --chat -p \"What is CVE-2021-44228?\"\n  \
    airlock run -m model.gguf -f prompt.txt -n 128 --temp 0\n  \
    cat prompt.txt | airlock run -m model.gguf -n 64\n\n\
    Sampling runs in llama.cpp's order: repeat penalty -> top-k -> top-p -> min-p -> temperature -> sample.")]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from FILE ('-' for stdin); with neither -p nor -f, stdin is read
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Tokens to generate; -1 = until end of generation or a full context
    #[arg(
        short = 'n',
        long = "n-predict",
        default_value_t = 256,
        allow_negative_numbers = true
    )]
    pub n_predict: i64,
    /// Wrap the prompt in the model's chat template as a user message
    #[arg(long)]
    pub chat: bool,
    /// System message (implies --chat)
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Built-in chat template to use instead of the model's: llama3 or chatml (implies --chat)
    #[arg(long = "chat-template", value_name = "NAME")]
    pub chat_template: Option<String>,
    /// Stop when the output contains this text (repeatable)
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (for benchmarking)
    #[arg(long = "ignore-eos")]
    pub ignore_eos: bool,
    /// Treat special-token text in the prompt (e.g. <|eot_id|>) as plain text
    #[arg(long = "no-parse-special")]
    pub no_parse_special: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// The longest prompt file read: far beyond any context (128k tokens are about 0.5 MB of
/// text), so a longer one, or an endless one such as /dev/zero, is a mistake, not a prompt.
pub(crate) const MAX_PROMPT_BYTES: u64 = 64 << 20;

fn read_prompt(args: &RunArgs) -> Result<String> {
    if let Some(p) = &args.prompt {
        return Ok(p.clone());
    }
    match &args.file {
        Some(f) if f.as_os_str() != "-" => read_bounded_string(f, MAX_PROMPT_BYTES)
            .with_context(|| format!("cannot read prompt file {}", f.display())),
        _ => {
            if args.file.is_none() && std::io::stdin().is_terminal() {
                bail!("no prompt: give -p TEXT, -f FILE, or pipe text on stdin");
            }
            read_stdin_bounded(MAX_PROMPT_BYTES)
                .context("cannot read the prompt from stdin (is it UTF-8?)")
        }
    }
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let prompt = read_prompt(&args)?;
    let max_tokens = match args.n_predict {
        n if n < -1 => bail!("-n/--n-predict must be -1 or more"),
        -1 => None,
        n => Some(n as usize),
    };
    let sampler_cfg = args.sampling.config();
    let mut sampler = Sampler::new(sampler_cfg).context("bad sampling options")?;
    let loaded = load(&args.model)?;
    let tok = &loaded.tokenizer;
    // Refused before tokenizing: a prompt that cannot fit is not worth megabytes of BPE.
    let at_least = tok.min_tokens(&prompt);
    if at_least > loaded.n_ctx {
        bail!(
            "prompt of {} bytes is at least {at_least} tokens and does not fit the context of {} \
             (raise -c/--ctx-size)",
            prompt.len(),
            loaded.n_ctx
        );
    }

    // --system and --chat-template only mean something in a chat: each implies --chat rather
    // than being ignored.
    let ids = if args.chat || args.system.is_some() || args.chat_template.is_some() {
        let template = ChatTemplate::for_tokenizer(tok, args.chat_template.as_deref())
            .map_err(template_error)?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::system(s.clone()));
        }
        messages.push(ChatMessage::user(prompt));
        let segments = template
            .render_segments(&messages, true)
            .map_err(template_error)?;
        tokenize_chat(tok, &segments, tok.add_bos_default())?
    } else {
        tok.encode(&prompt, tok.add_bos_default(), !args.no_parse_special)?
    };
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if args.model.verbose {
        eprintln!("seed: {}, prompt: {} tokens", sampler.seed(), ids.len());
    }

    let mut session = loaded.session();
    let params = GenerateParams {
        max_tokens,
        batch: args.model.batch_size as usize,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        render_special: false,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let outcome = match generate_to(&loaded, &mut session, &mut sampler, &ids, &params, &mut out) {
        Ok(o) => o,
        // The reader went away (`airlock run ... | head`): stop quietly, as Unix tools do.
        Err(GenerateError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(ExitCode::SUCCESS)
        }
        Err(e) => return Err(generate_error(e)),
    };
    writeln!(out)?;
    drop(out);
    eprintln!(
        "\nload: {:.0} ms | prompt: {} tokens, {:.1} tokens/s | generated: {} tokens, {:.1} tokens/s{}",
        loaded.report.load_time.as_secs_f64() * 1e3,
        outcome.prompt_tokens,
        outcome.prompt_tps(),
        outcome.generated.len(),
        outcome.gen_tps(),
        match outcome.stop {
            StopReason::ContextFull => " | stopped: context full (raise -c)",
            _ => "",
        }
    );
    Ok(ExitCode::SUCCESS)
}
