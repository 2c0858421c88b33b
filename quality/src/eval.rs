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
    /// Most tokens per forward pass (tasks are grouped up to it; a longer task runs alone).
    pub batch: usize,
    /// Longest sequence allowed (the context).
    pub n_ctx: usize,
    /// Most tasks per group.
    pub max_tasks: usize,
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for EvalParams {
    fn default() -> Self {
        EvalParams {
            batch: 2048,
            n_ctx: 4096,
            max_tasks: 32,
            cancel: None,
        }
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
    while i < tasks.len() {
        if p.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(EvalError::Interrupted);
        }
        // As many tasks as the batch holds (at least one).
        let mut j = i + 1;
        let mut run = tasks[i].tokens_run();
        while j < tasks.len()
            && j - i < p.max_tasks.max(1)
            && run + tasks[j].tokens_run() <= p.batch
        {
            run += tasks[j].tokens_run();
            j += 1;
        }
        for r in score_group(model, precision, kv_type, &mut ws, &tasks[i..j])? {
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

/// Two passes for a group of tasks: every task's shared prefix (logits of its last token),
/// then every option's own tokens from a copy of its task's prefix cache.
fn score_group(
    model: &LlamaModel,
    precision: Precision,
    kv_type: KvType,
    ws: &mut Workspace,
    tasks: &[Prepared],
) -> Result<Vec<TaskResult>, EvalError> {
    let vocab = model.config.vocab_size;
    // caches[t][o]: option o of task t; option 0's cache first holds the prefix.
    let mut caches: Vec<Vec<KvCache>> = tasks
        .iter()
        .map(|t| {
            t.seqs
                .iter()
                .map(|s| KvCache::new(model, s.len(), kv_type))
                .collect()
        })
        .collect();
    let mut scores: Vec<Vec<(f64, usize)>> =
        tasks.iter().map(|t| vec![(0.0, 0); t.seqs.len()]).collect();

    let mut batch: Vec<BatchSeq> = caches
        .iter_mut()
        .zip(tasks)
        .map(|(c, t)| BatchSeq {
            cache: &mut c[0],
            tokens: &t.seqs[0][..t.common],
            logits: Logits::Last,
        })
        .collect();
    let rows = forward_batch(model, precision, ws, &mut batch)?;
    for ((row, t), s) in rows.chunks_exact(vocab).zip(tasks).zip(&mut scores) {
        for (seq, s) in t.seqs.iter().zip(s.iter_mut()) {
            *s = (log_softmax(row, seq[t.common] as usize), 1);
        }
    }

    for (c, t) in caches.iter_mut().zip(tasks) {
        let (first, rest) = c.split_at_mut(1);
        for r in rest {
            r.copy_prefix_from(&first[0], t.common)?;
        }
    }
    // Each option's tokens after the prefix but its last: row k predicts token common+1+k.
    let mut batch = Vec::new();
    let mut want: Vec<(usize, usize, usize)> = Vec::new();
    for ((c, t), ti) in caches.iter_mut().zip(tasks).zip(0..) {
        for ((cache, seq), o) in c.iter_mut().zip(&t.seqs).zip(0..) {
            let own = &seq[t.common..seq.len() - 1];
            if own.is_empty() {
                continue;
            }
            want.push((ti, o, own.len()));
            batch.push(BatchSeq {
                cache,
                tokens: own,
                logits: Logits::All,
            });
        }
    }
    if !batch.is_empty() {
        let rows = forward_batch(model, precision, ws, &mut batch)?;
        // (row, next token) pairs in batch order, log-softmax in parallel, summed in order.
        let mut pairs = Vec::new();
        for &(ti, o, n) in &want {
            let t = &tasks[ti];
            pairs.extend(t.seqs[o][t.common + 1..t.common + 1 + n].iter().copied());
        }
        let lps: Vec<f64> = rows
            .par_chunks_exact(vocab)
            .zip(pairs.par_iter())
            .map(|(row, &next)| log_softmax(row, next as usize))
            .collect();
        let mut k = 0;
        for &(ti, o, n) in &want {
            let s = &mut scores[ti][o];
            for lp in &lps[k..k + n] {
                s.0 += lp;
                s.1 += 1;
            }
            k += n;
        }
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
