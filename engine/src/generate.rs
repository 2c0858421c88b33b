//! The generation loop: prompt in batches, then sample one token at a time until an
//! end-of-generation token, a stop string, the token limit, or a full context.

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
    #[error("prompt of {prompt} tokens does not fit the context: {free} of {n_ctx} positions free (raise -c/--ctx-size)")]
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
        session.forward(model, chunk, Logits::Last)?;
    }
    Ok(session.forward(model, &[], Logits::Last)?)
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
        return Err(GenerateError::PromptTooLong {
            prompt: 0,
            free: session.n_ctx - session.pos(),
            n_ctx: session.n_ctx,
        });
    }
    for &t in prompt {
        sampler.accept(t);
    }
    let t0 = Instant::now();
    let mut logits = eval_prompt(model, session, prompt, params.batch)?.to_vec();
    let prompt_time = t0.elapsed();

    let t1 = Instant::now();
    let mut decoder = TokenStreamDecoder::new(params.render_special);
    let mut generated = Vec::new();
    let mut text = String::new();
    // Text decoded but not yet emitted because it may begin a stop string.
    let mut held = String::new();
    let stop = loop {
        if params.max_tokens.is_some_and(|m| generated.len() >= m) {
            break StopReason::MaxTokens;
        }
        let id = sampler.sample(&logits)?;
        sampler.accept(id);
        if tok.is_eog(id) && !params.ignore_eos {
            break StopReason::EndOfGeneration;
        }
        generated.push(id);
        held.push_str(&decoder.push(tok, id)?);
        if let Some(at) = params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| held.find(s.as_str()))
            .min()
        {
            held.truncate(at);
            emit(&held)?;
            text.push_str(&held);
            held.clear();
            break StopReason::StopString;
        }
        let keep = longest_stop_prefix_suffix(&held, &params.stop);
        let ready = held.len() - keep;
        if ready > 0 {
            emit(&held[..ready])?;
            text.push_str(&held[..ready]);
            held.drain(..ready);
        }
        if session.pos() >= session.n_ctx {
            break StopReason::ContextFull;
        }
        logits.clear();
        logits.extend_from_slice(session.forward(model, &[id], Logits::Last)?);
    };
    if stop != StopReason::StopString {
        held.push_str(&decoder.finish());
        emit(&held)?;
        text.push_str(&held);
    }
    Ok(GenerateOutcome {
        prompt_tokens: prompt.len(),
        prompt_time,
        generated,
        gen_time: t1.elapsed(),
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
