//! Generation: prompt in batches, then sample one token at a time until an end-of-generation
//! token, a stop string, the token limit, or a full context. [`Generation`] is one request's
//! state, stepped by its owner with each position's logits; [`generate`] drives one over a
//! [`Session`].

use std::borrow::BorrowMut;
use std::time::{Duration, Instant};

use crate::llama::{LlamaModel, Logits, ModelError, Session};
use crate::sampling::{Sampler, SamplingError};
use crate::tokenizer::{TokenStreamDecoder, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("the prompt is empty: generation needs at least one prompt token")]
    EmptyPrompt,
    #[error(
        "prompt of {prompt} tokens does not fit the context: {free} of {n_ctx} positions free"
    )]
    PromptTooLong {
        prompt: usize,
        free: usize,
        n_ctx: usize,
    },
    #[error("writing output")]
    Output(#[from] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Most tokens to generate; None = until end of generation or a full context.
    pub max_tokens: Option<usize>,
    /// Prompt tokens per forward call (`-b`).
    pub batch: usize,
    /// Generation stops when the output contains one of these; it is not printed.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (benchmarking).
    pub ignore_eos: bool,
    /// Print special tokens' text (e.g. `<|im_end|>`) instead of nothing.
    pub render_special: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: Some(256),
            batch: 512,
            stop: Vec::new(),
            ignore_eos: false,
            render_special: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    EndOfGeneration,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Clone, Debug)]
pub struct GenerateOutcome {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated: Vec<u32>,
    /// Time from the first sampled token to the last forward pass.
    pub gen_time: Duration,
    pub stop: StopReason,
    /// The text emitted (stop string excluded).
    pub text: String,
}

impl GenerateOutcome {
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_time)
    }

    pub fn gen_tps(&self) -> f64 {
        rate(self.generated.len(), self.gen_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// Evaluate `tokens` in chunks of `batch`, returning the last token's logits.
pub fn eval_prompt<'s>(
    model: &LlamaModel,
    session: &'s mut Session,
    tokens: &[u32],
    batch: usize,
) -> Result<&'s [f32], GenerateError> {
    let free = session.n_ctx - session.pos();
    if tokens.len() > free {
        return Err(GenerateError::PromptTooLong {
            prompt: tokens.len(),
            free,
            n_ctx: session.n_ctx,
        });
    }
    let batch = batch.max(1);
    let n_chunks = tokens.len().div_ceil(batch);
    for (i, chunk) in tokens.chunks(batch).enumerate() {
        if i + 1 == n_chunks {
            return Ok(session.forward(model, chunk, Logits::Last)?);
        }
        // Only the last chunk's last token needs logits: the others skip the output matrix.
        session.forward(model, chunk, Logits::None)?;
    }
    Ok(session.forward(model, &[], Logits::Last)?)
}

/// What one [`Generation::step`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Feed `token` to the model, then step again with the logits that follow it. `text` can
    /// be shown now: it is complete UTF-8 and cannot be the start of a stop string (often
    /// empty, while a character or a possible stop string is incomplete).
    Token { token: u32, text: String },
    /// Generation is over; `text` is the rest of the output (possibly empty).
    Done { reason: StopReason, text: String },
}

/// One request's generation, stepped by its owner: each [`step`](Self::step) samples from the
/// logits it is given, checks the stop conditions and says what text is ready. It runs no
/// forward pass, so a scheduler can feed many of them from one batched pass; [`generate`] is
/// the one-sequence driver.
///
/// `S` is the sampler, owned (a request's own) or borrowed (`&mut Sampler`, a conversation's
/// that outlives one reply).
#[derive(Debug)]
pub struct Generation<S: BorrowMut<Sampler> = Sampler> {
    sampler: S,
    decoder: TokenStreamDecoder,
    stop: Vec<String>,
    max_tokens: Option<usize>,
    ignore_eos: bool,
    /// Text decoded but not yet emitted because it may begin a stop string.
    held: String,
    generated: Vec<u32>,
    /// Text emitted so far.
    text: String,
    done: Option<StopReason>,
}

impl<S: BorrowMut<Sampler>> Generation<S> {
    /// Starts a generation after `prompt`, whose tokens the sampler accepts (the repeat
    /// penalty sees them). `params.batch` is the driver's and unused here.
    pub fn new(mut sampler: S, params: &GenerateParams, prompt: &[u32]) -> Self {
        for &t in prompt {
            sampler.borrow_mut().accept(t);
        }
        Generation {
            sampler,
            decoder: TokenStreamDecoder::new(params.render_special),
            stop: params.stop.clone(),
            max_tokens: params.max_tokens,
            ignore_eos: params.ignore_eos,
            held: String::new(),
            generated: Vec::new(),
            text: String::new(),
            done: None,
        }
    }

    /// Advances by one token. `logits` are the model's for the position after the last token
    /// fed (the prompt's last, then each [`Step::Token`]'s); they are not read when the token
    /// limit is already reached. `room` says whether the sequence's cache has a position left
    /// for the token this step samples: without one, the step ends with
    /// [`StopReason::ContextFull`] after that token's text.
    ///
    /// The checks run in this order: token limit, sample, end of generation, stop string
    /// (text before it is emitted, the rest dropped), hold back a possible stop-string
    /// prefix, room. Once done, every further step returns the same [`Step::Done`] with no
    /// text.
    pub fn step(
        &mut self,
        tok: &Tokenizer,
        logits: &[f32],
        room: bool,
    ) -> Result<Step, GenerateError> {
        if let Some(reason) = self.done {
            return Ok(Step::Done {
                reason,
                text: String::new(),
            });
        }
        if self.max_tokens.is_some_and(|m| self.generated.len() >= m) {
            return Ok(self.finish(StopReason::MaxTokens, String::new()));
        }
        let sampler = self.sampler.borrow_mut();
        let id = sampler.sample(logits)?;
        sampler.accept(id);
        if tok.is_eog(id) && !self.ignore_eos {
            return Ok(self.finish(StopReason::EndOfGeneration, String::new()));
        }
        self.generated.push(id);
        let piece = self.decoder.push(tok, id)?;
        self.held.push_str(&piece);
        if let Some(at) = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            // A stop string ends the output where it starts; what the decoder still holds
            // comes after it, so it is dropped rather than flushed.
            self.held.truncate(at);
            let text = std::mem::take(&mut self.held);
            self.text.push_str(&text);
            self.done = Some(StopReason::StopString);
            return Ok(Step::Done {
                reason: StopReason::StopString,
                text,
            });
        }
        let keep = longest_stop_prefix_suffix(&self.held, &self.stop);
        let ready = self.held.len() - keep;
        let text: String = self.held.drain(..ready).collect();
        self.text.push_str(&text);
        if !room {
            return Ok(self.finish(StopReason::ContextFull, text));
        }
        Ok(Step::Token { token: id, text })
    }

    /// Ends with `reason`: flushes the held text and the decoder's incomplete bytes after
    /// `text` (what this step already made ready).
    fn finish(&mut self, reason: StopReason, mut text: String) -> Step {
        self.held.push_str(&self.decoder.finish());
        text.push_str(&self.held);
        self.text.push_str(&self.held);
        self.held.clear();
        self.done = Some(reason);
        Step::Done { reason, text }
    }

    /// Why generation ended; None while it goes on.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.done
    }

    /// The tokens sampled so far (an end-of-generation token that ended it excluded).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// The text emitted so far (a stop string excluded).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn sampler(&self) -> &Sampler {
        self.sampler.borrow()
    }

    /// The sampled tokens and the emitted text, consuming the generation.
    pub fn into_output(self) -> (Vec<u32>, String) {
        (self.generated, self.text)
    }
}

/// Run the prompt, then generate, calling `emit` with each piece of text as soon as it is
/// complete UTF-8 and cannot be the start of a stop string.
pub fn generate(
    model: &LlamaModel,
    session: &mut Session,
    tok: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &[u32],
    params: &GenerateParams,
    emit: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> Result<GenerateOutcome, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let mut generation = Generation::new(sampler, params, prompt);
    let t0 = Instant::now();
    let mut logits = eval_prompt(model, session, prompt, params.batch)?.to_vec();
    let prompt_time = t0.elapsed();

    let t1 = Instant::now();
    let stop = loop {
        let room = session.pos() < session.n_ctx;
        match generation.step(tok, &logits, room)? {
            Step::Token { token, text } => {
                if !text.is_empty() {
                    emit(&text)?;
                }
                logits.clear();
                logits.extend_from_slice(session.forward(model, &[token], Logits::Last)?);
            }
            Step::Done { reason, text } => {
                emit(&text)?;
                break reason;
            }
        }
    };
    let gen_time = t1.elapsed();
    let (generated, text) = generation.into_output();
    Ok(GenerateOutcome {
        prompt_tokens: prompt.len(),
        prompt_time,
        generated,
        gen_time,
        stop,
        text,
    })
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string: that
/// much must be held back until the next token shows whether the stop string follows.
fn longest_stop_prefix_suffix(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::longest_stop_prefix_suffix;

    #[test]
    fn holds_back_a_possible_stop_prefix() {
        let stops = vec!["</end>".to_string(), "STOP".to_string()];
        assert_eq!(longest_stop_prefix_suffix("hello </e", &stops), 3);
        assert_eq!(longest_stop_prefix_suffix("hello ST", &stops), 2);
        assert_eq!(longest_stop_prefix_suffix("hello", &stops), 0);
        // A complete stop string is found by the caller's search, not held here.
        assert_eq!(longest_stop_prefix_suffix("x STOP", &stops), 0);
    }
}
