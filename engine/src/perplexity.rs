//! Perplexity the way llama.cpp's `llama-perplexity` computes it, so the numbers compare:
//! the text's tokens are cut into non-overlapping chunks of `n_ctx`; when the model adds a BOS
//! token, each chunk's first token is replaced by it; each chunk runs from an empty cache, and
//! only its second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict the next
//! token (`n_ctx - 1 - n_ctx/2` predictions per chunk), as `-log softmax` in f64.
//!
//! Several chunks go through one forward pass when the batch allows (`batch / n_ctx` of them,
//! each its own sequence), only the scored rows go through the output matrix, and their
//! log-likelihoods are summed from the pass's logits in place.

use std::time::{Duration, Instant};

use crate::llama::{forward_batch, BatchSeq, KvCache, KvType, LlamaModel, Logits, ModelError};
use crate::llama::{Precision, Workspace};

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("the context must be at least 4 tokens to score anything, not {0}")]
    ContextTooSmall(usize),
    #[error(
        "the text has {tokens} tokens: at least {needed} (two chunks of {n_ctx}) are needed to \
         measure perplexity with a context of {n_ctx}"
    )]
    TextTooShort {
        tokens: usize,
        needed: usize,
        n_ctx: usize,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

#[derive(Clone, Debug)]
pub struct PerplexityParams {
    /// Tokens per chunk (llama-perplexity's `-c`).
    pub n_ctx: usize,
    /// Most tokens per forward pass over all chunks in it (`-b`); chunks go several per pass
    /// when it holds more than one.
    pub batch: usize,
    /// Score only the first this many chunks (`--chunks`); None: every whole chunk.
    pub max_chunks: Option<usize>,
    /// Replace each chunk's first token with this one (the model's BOS, when it adds one).
    pub bos: Option<u32>,
}

/// The result after some chunks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Chunks scored so far.
    pub chunks: usize,
    /// Tokens scored so far.
    pub scored: usize,
    pub ppl: f64,
    /// llama-perplexity's uncertainty: ppl x the standard error of the mean negative
    /// log-likelihood (None below two scored tokens or with no spread).
    pub ppl_err: Option<f64>,
}

/// What a finished run measured.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub estimate: Estimate,
    /// Tokens run through the model (chunks x n_ctx) and the time the passes took.
    pub tokens: usize,
    pub time: Duration,
}

impl Outcome {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

/// Running sums of the negative log-likelihood and its square, in f64 (as llama.cpp).
#[derive(Default)]
struct Nll {
    sum: f64,
    sum2: f64,
    count: usize,
}

impl Nll {
    fn add(&mut self, logits: &[f32], next: u32) {
        let v = log_softmax(logits, next as usize);
        self.sum -= v;
        self.sum2 += v * v;
        self.count += 1;
    }

    /// Adds a chunk's sums (chunks are merged in order, so -b changes nothing).
    fn merge(&mut self, part: &Nll) {
        self.sum += part.sum;
        self.sum2 += part.sum2;
        self.count += part.count;
    }

    fn estimate(&self, chunks: usize) -> Estimate {
        let n = self.count as f64;
        let mean = self.sum / n;
        let ppl = mean.exp();
        let var = self.sum2 / n - mean * mean;
        let ppl_err = (self.count > 1 && var > 0.0).then(|| (var / (n - 1.0)).sqrt() * ppl);
        Estimate {
            chunks,
            scored: self.count,
            ppl,
            ppl_err,
        }
    }
}

/// `log softmax(logits)[i]`, in f64 as llama.cpp's `log_softmax`.
fn log_softmax(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[i] as f64 - max - sum.ln()
}

/// Perplexity of `model` on `tokens` (the whole text, tokenized as llama-perplexity does).
/// `on_chunk` sees the running estimate after every chunk.
pub fn perplexity(
    model: &LlamaModel,
    precision: Precision,
    kv_type: KvType,
    tokens: &[u32],
    p: &PerplexityParams,
    on_chunk: &mut dyn FnMut(&Estimate),
) -> Result<Outcome, PerplexityError> {
    let n_ctx = p.n_ctx;
    if n_ctx < 4 {
        return Err(PerplexityError::ContextTooSmall(n_ctx));
    }
    if tokens.len() < 2 * n_ctx {
        return Err(PerplexityError::TextTooShort {
            tokens: tokens.len(),
            needed: 2 * n_ctx,
            n_ctx,
        });
    }
    let n_chunks = (tokens.len() / n_ctx).min(p.max_chunks.unwrap_or(usize::MAX));
    let first = n_ctx / 2;
    let vocab = model.config.vocab_size;
    // Chunks per pass; a chunk longer than the batch goes in pieces of `piece` tokens.
    let per_pass = (p.batch / n_ctx).max(1);
    let piece = p.batch.clamp(1, n_ctx);
    let mut caches: Vec<KvCache> = (0..per_pass.min(n_chunks))
        .map(|_| KvCache::new(model, n_ctx, kv_type))
        .collect();
    let mut ws = Workspace::default();
    let mut nll = Nll::default();
    let t0 = Instant::now();

    for c0 in (0..n_chunks).step_by(per_pass) {
        let group = c0..(c0 + per_pass).min(n_chunks);
        let chunks: Vec<Vec<u32>> = group
            .clone()
            .map(|c| {
                let mut t = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
                if let Some(bos) = p.bos {
                    t[0] = bos;
                }
                t
            })
            .collect();
        for cache in caches.iter_mut() {
            cache.reset();
        }
        // Each chunk's sums, taken straight from the pass's logits (no copy of the rows):
        // position pos predicts the token after it; the last position has none.
        let mut parts: Vec<Nll> = group.clone().map(|_| Nll::default()).collect();
        for a in (0..n_ctx).step_by(piece) {
            let b = (a + piece).min(n_ctx);
            let from = a.max(first).min(b);
            let want = b - from;
            let mut batch: Vec<BatchSeq> = caches
                .iter_mut()
                .zip(&chunks)
                .map(|(cache, t)| BatchSeq {
                    cache,
                    tokens: &t[a..b],
                    logits: if want == 0 {
                        Logits::None
                    } else {
                        Logits::Tail(want)
                    },
                })
                .collect();
            let logits = forward_batch(model, precision, &mut ws, &mut batch)?;
            if want == 0 {
                continue;
            }
            for ((rows, part), c) in logits
                .chunks_exact(want * vocab)
                .zip(&mut parts)
                .zip(group.clone())
            {
                let next = &tokens[c * n_ctx + from + 1..(c + 1) * n_ctx];
                for (row, &t) in rows.chunks_exact(vocab).zip(next) {
                    part.add(row, t);
                }
            }
        }
        for (part, c) in parts.iter().zip(group) {
            nll.merge(part);
            on_chunk(&nll.estimate(c + 1));
        }
    }
    Ok(Outcome {
        estimate: nll.estimate(n_chunks),
        tokens: n_chunks * n_ctx,
        time: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_estimate_follow_the_definitions() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((log_softmax(&l, 1) - (2.0 - z.ln())).abs() < 1e-12);

        // Two predictions with probabilities 1/2 and 1/4: PPL = exp(mean(ln 2, ln 4)) = sqrt 8.
        let mut n = Nll::default();
        n.add(&[0.0, 0.0], 0);
        n.add(&[0.0, 0.0, 0.0, 0.0], 3);
        let e = n.estimate(1);
        assert!((e.ppl - 8f64.sqrt()).abs() < 1e-12, "{e:?}");
        // Standard error of the mean of (ln 2, ln 4): (ln 4 - ln 2) / 2.
        let se = (4f64.ln() - 2f64.ln()) / 2.0;
        assert!((e.ppl_err.unwrap() - se * e.ppl).abs() < 1e-12, "{e:?}");
    }
}
