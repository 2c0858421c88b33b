//! `airlock chat`: an interactive conversation whose history stays in the KV cache, so each
//! turn processes only its own new tokens.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use airlock_engine::chat::{
    segments_to_string, tokenize_chat, ChatError, ChatMessage, ChatTemplate,
};
use airlock_engine::generate::{GenerateParams, StopReason};
use airlock_engine::sampling::Sampler;
use anyhow::{Context, Result};

use crate::load::{context_hint, generate_to, load, ModelArgs, SamplingArgs};

#[derive(clap::Args)]
#[command(after_help = "In the chat: type a message and press Enter. \
    /reset forgets the conversation, /exit or Ctrl-D quits.")]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Built-in chat template to use instead of the model's: llama3 or chatml
    #[arg(long = "chat-template", value_name = "NAME")]
    pub chat_template: Option<String>,
    /// Most tokens per reply; -1 = until end of turn or a full context
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// Stop a reply when it contains this text (repeatable)
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// A chat-template error as the CLI reports it: a template airlock cannot use safely is
/// replaced with `--chat-template`.
pub fn template_error(e: ChatError) -> anyhow::Error {
    match e {
        ChatError::ContentTransformed => anyhow::anyhow!("{e} (--chat-template NAME)"),
        e => e.into(),
    }
}

pub fn run(args: ChatArgs) -> Result<ExitCode> {
    let max_tokens = match args.n_predict {
        n if n < -1 => anyhow::bail!("-n/--n-predict must be -1 or more"),
        -1 => None,
        n => Some(n as usize),
    };
    let mut sampler = Sampler::new(args.sampling.config()).context("bad sampling options")?;
    let loaded = load(&args.model)?;
    let tok = &loaded.tokenizer;
    let template =
        ChatTemplate::for_tokenizer(tok, args.chat_template.as_deref()).map_err(template_error)?;
    let mut session = loaded.session();
    let params = GenerateParams {
        max_tokens,
        batch: args.model.batch_size as usize,
        stop: args.stop.clone(),
        ignore_eos: false,
        render_special: false,
    };
    let start: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::system(s.clone()))
        .collect();
    let mut messages = start.clone();
    // The text whose tokens are in the KV cache: earlier prompts and replies as generated.
    let mut in_cache = String::new();

    eprintln!(
        "airlock chat: {} (template {}, context {}). /reset forgets, /exit or Ctrl-D quits.",
        args.model.model.display(),
        template.name(),
        loaded.n_ctx
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    // A script piping turns in learns from the exit status whether any of them failed.
    let (mut turns, mut failed) = (0usize, 0usize);
    loop {
        write!(stdout, "\n> ")?;
        stdout.flush()?;
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin (is it UTF-8?)")?;
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = start.clone();
                in_cache.clear();
                session.reset();
                sampler.reset();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        turns += 1;
        messages.push(ChatMessage::user(input));
        // Only the new part of the rendering is processed; a template that re-renders earlier
        // turns differently (not prefix-stable) makes us re-process the whole conversation.
        let segments = match template.render_after(&messages, &in_cache, true) {
            Ok(s) if session.pos() > 0 => s,
            _ => {
                session.reset();
                sampler.reset();
                in_cache.clear();
                template
                    .render_segments(&messages, true)
                    .map_err(template_error)?
            }
        };
        let add_bos = session.pos() == 0 && tok.add_bos_default();
        let ids = tokenize_chat(tok, &segments, add_bos)?;
        let outcome = match generate_to(
            &loaded,
            &mut session,
            &mut sampler,
            &ids,
            &params,
            &mut stdout,
        ) {
            Ok(o) => o,
            Err(e) => {
                failed += 1;
                // A full context ends this conversation, not the program.
                match context_hint(&e) {
                    Some(hint) => eprintln!("\nerror: {e} ({hint})\n(conversation reset)"),
                    None => eprintln!("\nerror: {e}\n(conversation reset)"),
                }
                messages = start.clone();
                in_cache.clear();
                session.reset();
                sampler.reset();
                continue;
            }
        };
        writeln!(stdout)?;
        in_cache.push_str(&segments_to_string(&segments));
        in_cache.push_str(&outcome.text);
        messages.push(ChatMessage::assistant(outcome.text.clone()));
        if args.model.verbose {
            eprintln!(
                "[{} new prompt tokens at {:.1} t/s, {} generated at {:.1} t/s, {} of {} context used]",
                outcome.prompt_tokens,
                outcome.prompt_tps(),
                outcome.generated.len(),
                outcome.gen_tps(),
                session.pos(),
                session.n_ctx
            );
        }
        if outcome.stop == StopReason::ContextFull {
            eprintln!("(context full: conversation reset; raise -c for longer chats)");
            messages = start.clone();
            in_cache.clear();
            session.reset();
            sampler.reset();
        }
    }
    if failed > 0 {
        eprintln!("error: {failed} of {turns} turns failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
