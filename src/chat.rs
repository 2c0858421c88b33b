//! `airlock chat`: an interactive conversation whose history stays in the KV cache, so each
//! turn processes only its own new tokens.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use airlock_engine::chat::{
    segments_to_string, tokenize_chat, ChatError, ChatMessage, ChatTemplate,
};
use airlock_engine::context_shift::{trim_history, TrimError};
use airlock_engine::generate::{GenerateParams, StopReason};
use airlock_engine::load::LoadedModel;
use airlock_engine::sampling::Sampler;
use anyhow::{Context, Result};

use crate::load::{context_hint, generate_to, load, ModelArgs, SamplingArgs};
use crate::run::MAX_PROMPT_BYTES;

#[derive(clap::Args)]
#[command(after_help = "In the chat: type a message and press Enter. \
    /reset forgets the conversation, /exit or Ctrl-D quits.\n\n\
    When the conversation outgrows the context (-c), the oldest turns after the system prompt \
    are dropped until it takes at most half the context, the rest is evaluated again (one line \
    on stderr says so) and the chat goes on, a reply under way included.")]
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

/// A conversation that outgrew the context keeps its system prompt and its newest turns, in
/// at most half the context (so it can grow again for a while before the next shift), or all
/// of it when the newest turn alone needs more. `reply` holds the tokens of a reply under way
/// (counted, and appended by the caller). Drops the rest from `messages`, says so once on
/// stderr, and returns the kept conversation's prompt tokens and text; None when there is
/// nothing left to drop.
fn shift(
    loaded: &LoadedModel,
    template: &ChatTemplate,
    messages: &mut Vec<ChatMessage>,
    reply: &[u32],
    args: &ModelArgs,
) -> Result<Option<(Vec<u32>, String)>> {
    let (tok, n_ctx) = (&loaded.tokenizer, loaded.n_ctx);
    let count = |m: &[ChatMessage]| -> Result<usize> {
        let segments = template.render_segments(m, true).map_err(template_error)?;
        Ok(tokenize_chat(tok, &segments, tok.add_bos_default())?.len() + reply.len())
    };
    let trimmed = trim_history(messages, n_ctx / 2, n_ctx - 1, count).map_err(|e| match e {
        TrimError::Count(e) => e,
        e => anyhow::anyhow!("{e}"),
    })?;
    if trimmed.dropped_messages() == 0 {
        return Ok(None);
    }
    *messages = trimmed.kept(messages);
    let segments = template
        .render_segments(messages, true)
        .map_err(template_error)?;
    let ids = tokenize_chat(tok, &segments, tok.add_bos_default())?;
    let kept_turns = messages.iter().filter(|m| m.role == "user").count();
    eprintln!(
        "\n(context full: dropped the oldest {} turn{} ({} messages){}; evaluating the {} tokens \
         left again{})",
        trimmed.dropped_turns,
        if trimmed.dropped_turns == 1 { "" } else { "s" },
        trimmed.dropped_messages(),
        if trimmed.system > 0 {
            ", kept the system prompt"
        } else {
            ""
        },
        trimmed.tokens,
        if args.verbose {
            format!(
                ", {kept_turns} turn{} kept",
                if kept_turns == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        }
    );
    Ok(Some((ids, segments_to_string(&segments))))
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
    let n_ctx = loaded.n_ctx;

    eprintln!(
        "airlock chat: {} (template {}, context {}). /reset forgets, /exit or Ctrl-D quits.",
        args.model.model.display(),
        template.name(),
        loaded.n_ctx
    );
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let mut stdout = std::io::stdout();
    // A script piping turns in learns from the exit status whether any of them failed.
    let (mut turns, mut failed) = (0usize, 0usize);
    loop {
        write!(stdout, "\n> ")?;
        stdout.flush()?;
        let Some(line) = read_turn(&mut stdin)? else {
            break;
        };
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
        let mut ids = tokenize_chat(tok, &segments, add_bos)?;
        in_cache.push_str(&segments_to_string(&segments));
        // The new prompt must leave room for at least one token of reply; otherwise the oldest
        // turns go (the prompt is then the whole kept conversation).
        if session.pos() + ids.len() >= n_ctx {
            let shifted = shift(&loaded, &template, &mut messages, &[], &args.model)
                .and_then(|s| s.ok_or_else(|| anyhow::anyhow!("nothing to drop")));
            match shifted {
                Ok((prompt, text)) => {
                    (ids, in_cache) = (prompt, text);
                    session.reset();
                    sampler.reset();
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("error: {e} (raise -c/--ctx-size)");
                    messages.pop();
                    // The cache holds the conversation before this message: re-render it next.
                    session.reset();
                    in_cache.clear();
                    continue;
                }
            }
        }
        // The reply, continued across context shifts.
        let (mut reply, mut reply_ids) = (String::new(), Vec::<u32>::new());
        let mut last;
        loop {
            let params = GenerateParams {
                max_tokens: max_tokens.map(|m| m - reply_ids.len()),
                ..params.clone()
            };
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
                    match context_hint(&e) {
                        Some(hint) => eprintln!("\nerror: {e} ({hint})\n(conversation reset)"),
                        None => eprintln!("\nerror: {e}\n(conversation reset)"),
                    }
                    messages = start.clone();
                    in_cache.clear();
                    session.reset();
                    sampler.reset();
                    last = None;
                    break;
                }
            };
            reply.push_str(&outcome.text);
            reply_ids.extend_from_slice(&outcome.generated);
            let full = outcome.stop == StopReason::ContextFull;
            last = Some(outcome);
            if !full {
                break;
            }
            // The context filled up mid-reply: drop the oldest turns and go on from the reply
            // so far, unless this turn is all there is.
            match shift(&loaded, &template, &mut messages, &reply_ids, &args.model) {
                Ok(Some((mut prompt, text))) => {
                    prompt.extend_from_slice(&reply_ids);
                    in_cache = text;
                    ids = prompt;
                    session.reset();
                    sampler.reset();
                }
                Ok(None) | Err(_) => {
                    eprintln!(
                        "\n(context full: this turn alone fills the {n_ctx} tokens of context, so \
                         the reply stops here; raise -c for longer replies)"
                    );
                    break;
                }
            }
        }
        let Some(outcome) = last else { continue };
        writeln!(stdout)?;
        in_cache.push_str(&reply);
        messages.push(ChatMessage::assistant(reply));
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
    }
    if failed > 0 {
        eprintln!("error: {failed} of {turns} turns failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of input (its line end kept: the caller trims); None at the end of input. A line
/// longer than `run`'s prompt-file limit is an error: a pipe that never sends a newline must not
/// grow the buffer without end.
fn read_turn(r: &mut impl BufRead) -> Result<Option<String>> {
    let mut buf = Vec::new();
    let n = std::io::Read::take(&mut *r, MAX_PROMPT_BYTES + 1)
        .read_until(b'\n', &mut buf)
        .context("cannot read stdin")?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() as u64 > MAX_PROMPT_BYTES {
        anyhow::bail!("a line of input is longer than {MAX_PROMPT_BYTES} bytes");
    }
    String::from_utf8(buf)
        .map(Some)
        .context("cannot read stdin (is it UTF-8?)")
}
