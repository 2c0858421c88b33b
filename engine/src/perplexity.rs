//! Perplexity the way llama.cpp's `llama-perplexity` computes it, so the numbers compare:
//! the text's tokens are cut into non-overlapping chunks of `n_ctx`; when the model adds a BOS
//! token, each chunk's first token is replaced by it; each chunk runs from an empty cache, and
//! only its second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict the next
//! token (`n_ctx - 1 - n_ctx/2` predictions per chunk), as `-log softmax` in f64.
//!
//! Several chunks go through one forward pass when the batch allows (`batch / n_ctx` of them,
//! each its own sequence), only the scored rows go through the output matrix, and their
//! log-likelihoods are computed from the pass's logits in place (rows in parallel, summed in
//! order, so the digits do not depend on the thread count).
//!
//! [`run_chunks`] is the shared loop: it hands every chunk's scored rows, in order, to a
//! [`ChunkScorer`]. [`perplexity`] sums log-likelihoods; [`crate::kld`] writes a base file of
//! log-probabilities or compares a model against one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

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
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kld(#[from] crate::kld::KldError),
}

#[derive(Clone, Debug, Default)]
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
    /// Checked before every forward pass: when set, the run stops with
    /// [`PerplexityError::Interrupted`].
    pub cancel: Option<Arc<AtomicBool>>,
}

impl PerplexityParams {
    /// Chunks a text of `n_tokens` tokens gives.
    pub fn chunk_count(&self, n_tokens: usize) -> usize {
        (n_tokens / self.n_ctx.max(1)).min(self.max_chunks.unwrap_or(usize::MAX))
    }

    /// Scored positions per chunk (llama-perplexity's `n_ctx - 1 - n_ctx/2`).
    pub fn scored_per_chunk(&self) -> usize {
        scored_per_chunk(self.n_ctx)
    }
}

/// Scored positions in a chunk of `n_ctx` tokens.
pub fn scored_per_chunk(n_ctx: usize) -> usize {
    n_ctx.saturating_sub(1 + n_ctx / 2)
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
#[derive(Default, Clone, Debug)]
pub struct Nll {
    sum: f64,
    sum2: f64,
    count: usize,
}

impl Nll {
    /// Adds one prediction's log-probability.
    pub fn add_log_prob(&mut self, v: f64) {
        self.sum -= v;
        self.sum2 += v * v;
        self.count += 1;
    }

    /// Adds every row's log-probability of its next token: computed in parallel, summed in
    /// row order.
    pub fn add_rows(&mut self, rows: &[f32], vocab: usize, next: &[u32]) {
        let v: Vec<f64> = rows
            .par_chunks_exact(vocab)
            .zip(next.par_iter())
            .map(|(row, &t)| log_softmax(row, t as usize))
            .collect();
        for v in v {
            self.add_log_prob(v);
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn estimate(&self, chunks: usize) -> Estimate {
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
pub fn log_softmax(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[i] as f64 - max - sum.ln()
}

/// What [`run_chunks`] hands the scored rows to. Chunks arrive in order: each chunk's rows in
/// order (possibly over several calls when a chunk is longer than the batch), then its
/// [`ChunkScorer::end_chunk`], then the next chunk's.
pub trait ChunkScorer {
    /// `rows` is (next.len(), vocab) row-major; row i is the distribution that predicts
    /// `next[i]`.
    fn rows(
        &mut self,
        chunk: usize,
        rows: &[f32],
        vocab: usize,
        next: &[u32],
    ) -> Result<(), PerplexityError>;
    /// Every row of `chunk` has been seen.
    fn end_chunk(&mut self, chunk: usize) -> Result<(), PerplexityError>;
}

/// Runs the first `n_chunks` chunks of `n_ctx` tokens of `tokens` through the model, llama-
/// perplexity's way (fresh cache per chunk, BOS replacement, second half scored), handing the
/// scored rows to `scorer`. Returns the tokens run and the time taken.
pub fn run_chunks(
    model: &LlamaModel,
    precision: Precision,
    kv_type: KvType,
    tokens: &[u32],
    n_chunks: usize,
    p: &PerplexityParams,
    scorer: &mut dyn ChunkScorer,
) -> Result<(usize, Duration), PerplexityError> {
    let n_ctx = p.n_ctx;
    if n_ctx < 4 {
        return Err(PerplexityError::ContextTooSmall(n_ctx));
    }
    let n_chunks = n_chunks.min(tokens.len() / n_ctx);
    let first = n_ctx / 2;
    let vocab = model.config.vocab_size;
    // Chunks per pass; a chunk longer than the batch goes in pieces of `piece` tokens (then one
    // chunk per pass, so each chunk's rows reach the scorer in order).
    let per_pass = (p.batch / n_ctx).max(1);
    let piece = p.batch.clamp(1, n_ctx);
    let mut caches: Vec<KvCache> = (0..per_pass.min(n_chunks))
        .map(|_| KvCache::new(model, n_ctx, kv_type))
        .collect();
    let mut ws = Workspace::default();
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
        for a in (0..n_ctx).step_by(piece) {
            if p.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(PerplexityError::Interrupted);
            }
            let b = (a + piece).min(n_ctx);
            // Position pos predicts the token after it; the last position has none.
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
            for (rows, c) in logits.chunks_exact(want * vocab).zip(group.clone()) {
                // Rows from..b predict tokens from+1..b+1; the chunk's last token predicts
                // nothing, so the last piece has one row fewer.
                let end = (b + 1).min(n_ctx);
                let next = &tokens[c * n_ctx + from + 1..c * n_ctx + end];
                scorer.rows(c, &rows[..next.len() * vocab], vocab, next)?;
                if b == n_ctx {
                    scorer.end_chunk(c)?;
                }
            }
        }
    }
    Ok((n_chunks * n_ctx, t0.elapsed()))
}

/// Sums log-likelihoods and reports the running estimate after every chunk.
struct PplScorer<'a> {
    nll: Nll,
    on_chunk: &'a mut dyn FnMut(&Estimate),
}

impl ChunkScorer for PplScorer<'_> {
    fn rows(
        &mut self,
        _chunk: usize,
        rows: &[f32],
        vocab: usize,
        next: &[u32],
    ) -> Result<(), PerplexityError> {
        self.nll.add_rows(rows, vocab, next);
        Ok(())
    }

    fn end_chunk(&mut self, chunk: usize) -> Result<(), PerplexityError> {
        (self.on_chunk)(&self.nll.estimate(chunk + 1));
        Ok(())
    }
}

/// Refuses a context too small to score and a text shorter than two chunks (as llama-
/// perplexity does).
pub fn check_text(n_tokens: usize, n_ctx: usize) -> Result<(), PerplexityError> {
    if n_ctx < 4 {
        return Err(PerplexityError::ContextTooSmall(n_ctx));
    }
    if n_tokens < 2 * n_ctx {
        return Err(PerplexityError::TextTooShort {
            tokens: n_tokens,
            needed: 2 * n_ctx,
            n_ctx,
        });
    }
    Ok(())
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
    check_text(tokens.len(), p.n_ctx)?;
    let n_chunks = p.chunk_count(tokens.len());
    let mut scorer = PplScorer {
        nll: Nll::default(),
        on_chunk,
    };
    let (n, time) = run_chunks(model, precision, kv_type, tokens, n_chunks, p, &mut scorer)?;
    Ok(Outcome {
        estimate: scorer.nll.estimate(n_chunks),
        tokens: n,
        time,
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
        n.add_rows(&[0.0, 0.0], 2, &[0]);
        n.add_rows(&[0.0, 0.0, 0.0, 0.0], 4, &[3]);
        let e = n.estimate(1);
        assert!((e.ppl - 8f64.sqrt()).abs() < 1e-12, "{e:?}");
        // Standard error of the mean of (ln 2, ln 4): (ln 4 - ln 2) / 2.
        let se = (4f64.ln() - 2f64.ln()) / 2.0;
        assert!((e.ppl_err.unwrap() - se * e.ppl).abs() < 1e-12, "{e:?}");
    }

    #[test]
    fn scored_positions_are_llama_perplexitys() {
        assert_eq!(scored_per_chunk(512), 255);
        assert_eq!(scored_per_chunk(128), 63);
        assert_eq!(scored_per_chunk(5), 2);
    }
}
