//! Multiple-choice evaluation by log-likelihood, batched: each task's options are tokenized
//! together with its prompt, the tokens all options share are computed once, and every option
//! continues from a copy of that prefix's KV cache, all options of several tasks in one
//! forward pass.
//!
//! Two scorings:
//! - `letter`: the log-likelihood of each answer letter as the continuation of a prompt that
//!   lists the options (what CTI-MCQA-style benchmarks ask a model for): `" A"` after a
//!   non-space character, `"A"` after whitespace or a newline.
//! - `option`: the mean log-probability of each option's tokens after the shared prefix, with
//!   the option appended to the question after a space, as llama-perplexity's multiple-choice
//!   and HellaSwag scores (`acc_norm`) do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_engine::chat::{tokenize_chat, ChatMessage, ChatSegment, ChatTemplate};
use airlock_engine::llama::{
    forward_batch, BatchSeq, KvCache, KvType, LlamaModel, Logits, ModelError, Precision, Workspace,
};
use airlock_engine::perplexity::log_softmax;
use airlock_engine::tokenizer::Tokenizer;
use rayon::prelude::*;
use serde::Serialize;

use crate::tasks::{letter, Task};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    Letter,
    Option,
}

impl Score {
    pub fn name(self) -> &'static str {
        match self {
            Score::Letter => "letter",
            Score::Option => "option",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("task at line {line}: {msg}")]
    Task { line: usize, msg: String },
    #[error(
        "task at line {line} needs {needed} tokens, more than the context of {n_ctx} (raise -c)"
    )]
    TooLong {
        line: usize,
        needed: usize,
        n_ctx: usize,
    },
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// How tasks become token sequences.
pub struct Prompting<'a> {
    pub tokenizer: &'a Tokenizer,
    pub score: Score,
    /// Wrap the prompt in this chat template as the user's message; the answer follows as the
    /// assistant's.
    pub chat: Option<&'a ChatTemplate>,
}

/// A task as token sequences, one per option, and how to score them.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub line: usize,
    pub answer: usize,
    /// Prompt + option i, tokenized together.
    pub seqs: Vec<Vec<u32>>,
    /// Tokens every sequence starts with (at most the shortest's length - 1).
    pub common: usize,
    /// Mean log-probability (option scoring) or sum (letters).
    pub mean: bool,
}

impl Prepared {
    /// Tokens the forward passes run for this task: the prefix once, then each option's rest
    /// (its last token needs no logits and is not run).
    pub fn tokens_run(&self) -> usize {
        self.common
            + self
                .seqs
                .iter()
                .map(|s| s.len() - 1 - self.common)
                .sum::<usize>()
    }

    /// The longest sequence's length (the KV cache it needs).
    pub fn max_len(&self) -> usize {
        self.seqs.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// The prompt letter scoring continues: CTIBench's own, or the question with its options
/// lettered and `Answer:`.
pub fn letter_prompt(t: &Task) -> String {
    if let Some(p) = &t.prompt {
        return format!("{}{p}", t.prefix);
    }
    let mut s = format!("{}{}\n", t.prefix, t.question);
    for (i, o) in t.options.iter().enumerate() {
        s.push_str(&format!("{}. {o}\n", letter(i)));
    }
    s.push_str("Answer:");
    s
}

/// `" A"` after a non-space character, `"A"` after whitespace (or at the start).
fn letter_after(prompt_end: Option<char>, i: usize) -> String {
    match prompt_end {
        Some(c) if !c.is_whitespace() => format!(" {}", letter(i)),
        _ => letter(i).to_string(),
    }
}

impl Prompting<'_> {
    fn tokenize(&self, user: &str, answer: &str) -> Result<Vec<u32>, String> {
        let tok = self.tokenizer;
        match self.chat {
            None => tok
                .encode(&format!("{user}{answer}"), tok.add_bos_default(), false)
                .map_err(|e| e.to_string()),
            Some(t) => {
                let mut segs = t
                    .render_segments(&[ChatMessage::user(user)], true)
                    .map_err(|e| e.to_string())?;
                segs.push(ChatSegment::Content(answer.to_string()));
                tokenize_chat(tok, &segs, tok.add_bos_default()).map_err(|e| e.to_string())
            }
        }
    }

    /// The text the answer follows, to pick `" A"` or `"A"`.
    fn rendered_end(&self, user: &str) -> Result<Option<char>, String> {
        match self.chat {
            None => Ok(user.chars().last()),
            Some(t) => Ok(t
                .render(&[ChatMessage::user(user)], true)
                .map_err(|e| e.to_string())?
                .chars()
                .last()),
        }
    }

    /// The task's option sequences and their shared prefix.
    pub fn prepare(&self, t: &Task) -> Result<Prepared, EvalError> {
        let err = |msg: String| EvalError::Task { line: t.line, msg };
        let seqs = match self.score {
            Score::Letter => {
                let prompt = letter_prompt(t);
                let end = self.rendered_end(&prompt).map_err(err)?;
                (0..t.options.len())
                    .map(|i| self.tokenize(&prompt, &letter_after(end, i)))
                    .collect::<Result<Vec<_>, _>>()
            }
            Score::Option => {
                let q = format!("{}{}", t.prefix, t.question);
                t.options
                    .iter()
                    .map(|o| match self.chat {
                        None => self.tokenize(&q, &format!(" {o}")),
                        Some(_) => self.tokenize(&q, o),
                    })
                    .collect::<Result<Vec<_>, _>>()
            }
        }
        .map_err(err)?;
        let min_len = seqs.iter().map(Vec::len).min().unwrap_or(0);
        let first = &seqs[0];
        let shared = (0..min_len)
            .take_while(|&k| seqs.iter().all(|s| s[k] == first[k]))
            .count();
        // The last shared token's logits predict each option's first own token, so at least
        // one token must be shared and each option must have one of its own.
        let common = shared.min(min_len.saturating_sub(1));
        if common == 0 {
            return Err(err(
                "the options share no prompt token to score them from (is the question empty?)"
                    .into(),
            ));
        }
        Ok(Prepared {
            line: t.line,
            answer: t.answer,
            seqs,
            common,
            mean: self.score == Score::Option,
        })
    }
}

/// One task's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    pub line: usize,
    pub answer: usize,
    pub chosen: usize,
    /// Each option's score (log-likelihood, or mean log-probability per token).
    pub scores: Vec<f64>,
}

impl TaskResult {
    pub fn correct(&self) -> bool {
        self.answer == self.chosen
    }
}

#[derive(Clone, Debug)]
pub struct EvalParams {
    /// Most tokens per forward pass: tasks are grouped up to it, and a prompt or option longer
    /// than it goes in pieces. It also bounds the logits buffer (tokens x vocabulary).
    pub batch: usize,
    /// Longest sequence allowed (the context).
    pub n_ctx: usize,
    /// Most KV-cache positions held at once (prefixes plus the option caches copied from
    /// them); options go in waves within it. Default: twice `n_ctx`, so a hostile task file
    /// (26 long options) costs at most twice the KV memory of one full context.
    pub max_cache_positions: Option<usize>,
    /// Most tasks per group.
    pub max_tasks: usize,
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for EvalParams {
    fn default() -> Self {
        EvalParams {
            batch: 2048,
            n_ctx: 4096,
            max_cache_positions: None,
            max_tasks: 32,
            cancel: None,
        }
    }
}

impl EvalParams {
    fn cache_budget(&self) -> usize {
        self.max_cache_positions
            .unwrap_or(2 * self.n_ctx)
            .max(self.n_ctx)
    }
}

/// What an evaluation measured.
#[derive(Clone, Debug)]
pub struct EvalRun {
    pub results: Vec<TaskResult>,
    /// Tokens run through the model and the time the passes and scoring took.
    pub tokens: usize,
    pub time: Duration,
}

/// Scores every prepared task; `on_task` sees each result as it is known, in order.
pub fn evaluate(
    model: &LlamaModel,
    precision: Precision,
    kv_type: KvType,
    tasks: &[Prepared],
    p: &EvalParams,
    on_task: &mut dyn FnMut(&TaskResult),
) -> Result<EvalRun, EvalError> {
    for t in tasks {
        if t.max_len() > p.n_ctx {
            return Err(EvalError::TooLong {
                line: t.line,
                needed: t.max_len(),
                n_ctx: p.n_ctx,
            });
        }
    }
    let t0 = Instant::now();
    let mut ws = Workspace::default();
    let mut results = Vec::with_capacity(tasks.len());
    let mut tokens = 0;
    let mut i = 0;
    let budget = p.cache_budget();
    // A group's prefix caches stay while its options run: they share the budget.
    let prefixes = |t: &[Prepared]| t.iter().map(|t| t.common).sum::<usize>();
    while i < tasks.len() {
        if p.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(EvalError::Interrupted);
        }
        // As many tasks as the batch and the cache budget hold (at least one).
        let mut j = i + 1;
        let mut run = tasks[i].tokens_run();
        while j < tasks.len()
            && j - i < p.max_tasks.max(1)
            && run + tasks[j].tokens_run() <= p.batch
            && prefixes(&tasks[i..=j])
                + tasks[i..=j]
                    .iter()
                    .map(Prepared::max_len)
                    .max()
                    .unwrap_or(0)
                <= budget
        {
            run += tasks[j].tokens_run();
            j += 1;
        }
        for r in score_group(model, precision, kv_type, &mut ws, &tasks[i..j], p)? {
            on_task(&r);
            results.push(r);
        }
        tokens += run;
        i = j;
    }
    Ok(EvalRun {
        results,
        tokens,
        time: t0.elapsed(),
    })
}

/// Runs each sequence's tokens into its cache, in passes of at most `batch` tokens: several
/// sequences share a pass while they fit; one longer than `batch` goes alone, in pieces.
/// `on_rows(seq, first, rows)` receives the logits asked for (`all`: every token's, rows for
/// tokens `first..`; otherwise only the last token's, `first` = its index), each sequence's in
/// token order.
fn feed(
    model: &LlamaModel,
    precision: Precision,
    ws: &mut Workspace,
    seqs: &mut [(&mut KvCache, &[u32])],
    all: bool,
    batch: usize,
    on_rows: &mut dyn FnMut(usize, usize, &[f32]),
) -> Result<(), EvalError> {
    let vocab = model.config.vocab_size;
    let batch = batch.max(1);
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i + 1;
        let mut n = seqs[i].1.len();
        while j < seqs.len() && n + seqs[j].1.len() <= batch {
            n += seqs[j].1.len();
            j += 1;
        }
        if j == i + 1 && n > batch {
            // Alone, in pieces.
            let (cache, toks) = &mut seqs[i];
            for a in (0..toks.len()).step_by(batch) {
                let b = (a + batch).min(toks.len());
                let last = b == toks.len();
                let logits = match (all, last) {
                    (true, _) => Logits::All,
                    (false, true) => Logits::Last,
                    (false, false) => Logits::None,
                };
                let rows = forward_batch(
                    model,
                    precision,
                    ws,
                    &mut [BatchSeq {
                        cache,
                        tokens: &toks[a..b],
                        logits,
                    }],
                )?;
                if all {
                    on_rows(i, a, rows);
                } else if last {
                    on_rows(i, toks.len() - 1, rows);
                }
            }
        } else {
            let group = &mut seqs[i..j];
            let counts: Vec<usize> = group.iter().map(|(_, t)| t.len()).collect();
            let mut batch_seqs: Vec<BatchSeq> = group
                .iter_mut()
                .map(|(cache, tokens)| BatchSeq {
                    cache,
                    tokens,
                    logits: if all { Logits::All } else { Logits::Last },
                })
                .collect();
            let rows = forward_batch(model, precision, ws, &mut batch_seqs)?;
            let mut at = 0;
            for (k, &c) in counts.iter().enumerate() {
                let r = if all { c } else { 1 };
                on_rows(
                    i + k,
                    if all { 0 } else { c - 1 },
                    &rows[at * vocab..(at + r) * vocab],
                );
                at += r;
            }
        }
        i = j;
    }
    Ok(())
}

/// Every task's shared prefix (the logits of its last token score each option's first own
/// token), then the options' own tokens from copies of their task's prefix cache, in waves
/// that fit the cache budget. An option's score adds its tokens' log-probabilities in order.
fn score_group(
    model: &LlamaModel,
    precision: Precision,
    kv_type: KvType,
    ws: &mut Workspace,
    tasks: &[Prepared],
    p: &EvalParams,
) -> Result<Vec<TaskResult>, EvalError> {
    // (sum, count) per option.
    let mut scores: Vec<Vec<(f64, usize)>> =
        tasks.iter().map(|t| vec![(0.0, 0); t.seqs.len()]).collect();
    let mut prefix: Vec<KvCache> = tasks
        .iter()
        .map(|t| KvCache::new(model, t.common, kv_type))
        .collect();
    {
        let mut seqs: Vec<(&mut KvCache, &[u32])> = prefix
            .iter_mut()
            .zip(tasks)
            .map(|(c, t)| (c, &t.seqs[0][..t.common]))
            .collect();
        feed(
            model,
            precision,
            ws,
            &mut seqs,
            false,
            p.batch,
            &mut |ti, _, row| {
                let t = &tasks[ti];
                for (seq, s) in t.seqs.iter().zip(scores[ti].iter_mut()) {
                    *s = (log_softmax(row, seq[t.common] as usize), 1);
                }
            },
        )?;
    }

    // Options with tokens of their own after the first (the last token needs no logits).
    let pairs: Vec<(usize, usize)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| {
            (0..t.seqs.len())
                .filter(move |&o| t.seqs[o].len() - 1 > t.common)
                .map(move |o| (ti, o))
        })
        .collect();
    let budget = p
        .cache_budget()
        .saturating_sub(tasks.iter().map(|t| t.common).sum());
    let mut k = 0;
    while k < pairs.len() {
        let mut end = k + 1;
        let mut held = tasks[pairs[k].0].seqs[pairs[k].1].len();
        while end < pairs.len() {
            let len = tasks[pairs[end].0].seqs[pairs[end].1].len();
            if held + len > budget {
                break;
            }
            held += len;
            end += 1;
        }
        let wave = &pairs[k..end];
        let mut caches = Vec::with_capacity(wave.len());
        for &(ti, o) in wave {
            let mut c = KvCache::new(model, tasks[ti].seqs[o].len(), kv_type);
            c.copy_prefix_from(&prefix[ti], tasks[ti].common)?;
            caches.push(c);
        }
        let mut seqs: Vec<(&mut KvCache, &[u32])> = caches
            .iter_mut()
            .zip(wave)
            .map(|(c, &(ti, o))| {
                let t = &tasks[ti];
                (c, &t.seqs[o][t.common..t.seqs[o].len() - 1])
            })
            .collect();
        let vocab = model.config.vocab_size;
        feed(
            model,
            precision,
            ws,
            &mut seqs,
            true,
            p.batch,
            &mut |w, first, rows| {
                let (ti, o) = wave[w];
                let t = &tasks[ti];
                // Row r predicts own token first + r + 1.
                let next = &t.seqs[o][t.common + first + 1..];
                let lps: Vec<f64> = rows
                    .par_chunks_exact(vocab)
                    .zip(next.par_iter())
                    .map(|(row, &n)| log_softmax(row, n as usize))
                    .collect();
                let s = &mut scores[ti][o];
                for lp in lps {
                    s.0 += lp;
                    s.1 += 1;
                }
            },
        )?;
        k = end;
    }

    Ok(tasks
        .iter()
        .zip(scores)
        .map(|(t, s)| {
            let scores: Vec<f64> = s
                .iter()
                .map(|&(sum, n)| if t.mean { sum / n as f64 } else { sum })
                .collect();
            // The first of equal best wins, as llama-perplexity picks.
            let mut chosen = 0;
            for (i, &v) in scores.iter().enumerate() {
                if v > scores[chosen] {
                    chosen = i;
                }
            }
            TaskResult {
                line: t.line,
                answer: t.answer,
                chosen,
                scores,
            }
        })
        .collect())
}

/// Accuracy, its standard error and the per-answer confusion.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub tasks: usize,
    pub correct: usize,
    /// Fraction correct.
    pub accuracy: f64,
    /// sqrt(p (1 - p) / (n - 1)), as llama-perplexity reports it.
    pub std_error: f64,
    /// Expected accuracy of guessing: the mean of 1 / options.
    pub chance: f64,
    /// confusion[answer][chosen], over option letters.
    pub confusion: Vec<Vec<usize>>,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

impl Summary {
    pub fn new(run: &EvalRun) -> Self {
        let n = run.results.len();
        let correct = run.results.iter().filter(|r| r.correct()).count();
        let p = correct as f64 / n.max(1) as f64;
        let std_error = if n > 1 {
            (p * (1.0 - p) / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let width = run
            .results
            .iter()
            .map(|r| r.scores.len())
            .max()
            .unwrap_or(0);
        let mut confusion = vec![vec![0; width]; width];
        for r in &run.results {
            confusion[r.answer][r.chosen] += 1;
        }
        let chance = run
            .results
            .iter()
            .map(|r| 1.0 / r.scores.len() as f64)
            .sum::<f64>()
            / n.max(1) as f64;
        let seconds = run.time.as_secs_f64();
        Summary {
            tasks: n,
            correct,
            accuracy: p,
            std_error,
            chance,
            confusion,
            tokens: run.tokens,
            seconds,
            tokens_per_s: run.tokens as f64 / seconds.max(1e-9),
        }
    }

    /// The report a terminal shows.
    pub fn text(&self) -> String {
        let mut s = format!(
            "accuracy: {:.2}% +/- {:.2}% ({} of {} tasks; chance {:.2}%)\n",
            100.0 * self.accuracy,
            100.0 * self.std_error,
            self.correct,
            self.tasks,
            100.0 * self.chance
        );
        s.push_str("confusion (rows: right answer, columns: chosen):\n     ");
        let w = self.confusion.len();
        for j in 0..w {
            s.push_str(&format!("{:>6}", letter(j)));
        }
        s.push('\n');
        for (i, row) in self.confusion.iter().enumerate() {
            s.push_str(&format!("  {}  ", letter(i)));
            for v in row {
                s.push_str(&format!("{v:>6}"));
            }
            s.push('\n');
        }
        s.push_str(&format!(
            "{} tokens in {:.2} s ({:.1} tokens/s)\n",
            self.tokens, self.seconds, self.tokens_per_s
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(prompt: Option<&str>) -> Task {
        Task {
            line: 1,
            id: None,
            prefix: "Example.\n".into(),
            question: "Which port does SSH use?".into(),
            options: vec!["22".into(), "80".into()],
            answer: 0,
            prompt: prompt.map(str::to_string),
        }
    }

    #[test]
    fn letter_prompts_and_separators() {
        assert_eq!(
            letter_prompt(&task(None)),
            "Example.\nWhich port does SSH use?\nA. 22\nB. 80\nAnswer:"
        );
        assert_eq!(letter_prompt(&task(Some("P?"))), "Example.\nP?");
        assert_eq!(letter_after(Some(':'), 1), " B");
        assert_eq!(letter_after(Some('\n'), 0), "A");
        assert_eq!(letter_after(Some(' '), 2), "C");
        assert_eq!(letter_after(None, 3), "D");
    }

    #[test]
    fn the_summary_counts_and_confuses() {
        let r = |answer, chosen| TaskResult {
            line: 0,
            answer,
            chosen,
            scores: vec![0.0; 4],
        };
        let run = EvalRun {
            results: vec![r(0, 0), r(1, 1), r(2, 0), r(3, 3)],
            tokens: 100,
            time: Duration::from_secs(2),
        };
        let s = Summary::new(&run);
        assert_eq!((s.correct, s.tasks), (3, 4));
        assert_eq!(s.accuracy, 0.75);
        assert!((s.std_error - (0.75f64 * 0.25 / 3.0).sqrt()).abs() < 1e-15);
        assert_eq!(s.chance, 0.25);
        assert_eq!(s.confusion[2][0], 1);
        assert_eq!(s.confusion[0][0], 1);
        assert_eq!(s.tokens_per_s, 50.0);
    }
}
