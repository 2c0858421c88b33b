//! KL divergence against a base model, file-compatible with llama.cpp's `llama-perplexity
//! --kl-divergence-base` / `--kl-divergence`: a base file written by either tool is read by
//! the other.
//!
//! The file, little-endian: the 8 bytes `_logits_`, int32 n_ctx, int32 n_vocab, int32 n_chunk,
//! int32 tokens[n_chunk x n_ctx] (the text's tokens before any BOS replacement), then for every
//! scored position (chunk by chunk, `n_ctx - 1 - n_ctx/2` per chunk) a record of
//! `2*ceil(n_vocab/2) + 4` uint16: an f32 scale and an f32 minimum log-probability, then one
//! code per vocabulary entry (zero-padded to even), log p = scale * code + minimum, the
//! log-probabilities clamped at (max logit - 16). The arithmetic below follows llama.cpp's
//! (`log_softmax` and `kl_divergence` in tools/perplexity/perplexity.cpp), in the same float
//! and double types, so the statistics agree with its digits.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rayon::prelude::*;

use crate::llama::{KvType, LlamaModel, Precision};
use crate::perplexity::{
    run_chunks, scored_per_chunk, ChunkScorer, Estimate, Nll, PerplexityError, PerplexityParams,
};

pub const MAGIC: &[u8; 8] = b"_logits_";
/// Bytes before the tokens: magic, n_ctx, n_vocab, n_chunk.
pub const HEADER_BYTES: u64 = 20;

#[derive(Debug, thiserror::Error)]
pub enum KldError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a regular file; a KL-divergence base file is read from disk")]
    NotAFile { path: PathBuf },
    #[error(
        "{path} does not look like a file of log-probabilities (it does not start with _logits_)"
    )]
    BadMagic { path: PathBuf },
    #[error("{path}: {what}")]
    BadHeader { path: PathBuf, what: String },
    #[error(
        "{path} is {actual} bytes, but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk \
         {n_chunk}) says {expected}: the file is truncated or is not a llama-perplexity base file"
    )]
    Length {
        path: PathBuf,
        actual: u64,
        expected: u64,
        n_ctx: u32,
        n_vocab: u32,
        n_chunk: u32,
    },
    #[error(
        "{path} was written for a vocabulary of {file} tokens, but the model has {model}: a base \
         file compares models that share a tokenizer"
    )]
    VocabMismatch {
        path: PathBuf,
        file: usize,
        model: usize,
    },
    #[error("{path}: token {index} of the base file is {id}, outside the vocabulary of {vocab}")]
    BadToken {
        path: PathBuf,
        index: usize,
        id: i64,
        vocab: usize,
    },
    #[error(
        "{path} holds {file} tokens ({n_chunk} chunks of {n_ctx}), but the text has only {text}: \
         it was not written from this text"
    )]
    TextTooShort {
        path: PathBuf,
        file: usize,
        text: usize,
        n_chunk: usize,
        n_ctx: usize,
    },
    #[error(
        "{path} was written from another text (or tokenizer): token {index} is {file_id} \
         {file_piece:?} in the base file but {text_id} {text_piece:?} in the text"
    )]
    TokenMismatch {
        path: PathBuf,
        index: usize,
        file_id: u32,
        file_piece: String,
        text_id: u32,
        text_piece: String,
    },
    #[error("the base file's context of {n_ctx} is longer than the model's ({model})")]
    ContextTooLong { n_ctx: usize, model: usize },
}

/// uint16 entries in one record: scale and minimum (2 x f32), then the codes, padded to even.
pub fn record_len(n_vocab: usize) -> usize {
    2 * n_vocab.div_ceil(2) + 4
}

/// llama.cpp's `nearest_int`: round half to even (exact below 2^22, which codes are).
fn nearest_int(x: f32) -> u16 {
    x.round_ties_even().clamp(0.0, 65535.0) as u16
}

/// Encodes one row of logits into `out` (`record_len(logits.len())` entries), as llama.cpp's
/// `log_softmax(n_vocab, logits, log_prob, tok)`.
pub fn encode_record(logits: &[f32], out: &mut [u16]) {
    let mut max = logits[0];
    let mut min = logits[0];
    for &l in &logits[1..] {
        max = max.max(l);
        min = min.min(l);
    }
    min = min.max(max - 16.0);
    let sum_exp: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    let log_sum_exp = sum_exp.ln() as f32;
    let min_log_prob = min - max - log_sum_exp;
    let scale = (max - min) / 65535.0;
    let (head, codes) = out.split_at_mut(4);
    for (pair, v) in head.chunks_exact_mut(2).zip([scale, min_log_prob]) {
        let b = v.to_bits();
        pair[0] = b as u16;
        pair[1] = (b >> 16) as u16;
    }
    codes.fill(0);
    if scale != 0.0 {
        let inv = 1.0 / scale;
        for (c, &l) in codes.iter_mut().zip(logits) {
            *c = if l > min {
                nearest_int(inv * (l - min))
            } else {
                0
            };
        }
    }
}

/// A record's scale and minimum log-probability.
fn record_head(rec: &[u16]) -> (f32, f32) {
    let f = |i: usize| f32::from_bits(rec[i] as u32 | (rec[i + 1] as u32) << 16);
    (f(0), f(2))
}

/// The log-probabilities a record holds (values at the clamp are the minimum).
pub fn decode_record(rec: &[u16], n_vocab: usize) -> Vec<f32> {
    let (scale, min) = record_head(rec);
    rec[4..4 + n_vocab]
        .iter()
        .map(|&c| scale * c as f32 + min)
        .collect()
}

/// One position compared against its base record (llama.cpp's `log_softmax(..., kld)`).
#[derive(Clone, Copy, Debug)]
struct RowKld {
    nll: f32,
    nll_base: f32,
    kld: f64,
    p_diff: f32,
    same_top: bool,
}

fn row_kld(logits: &[f32], rec: &[u16], tok: usize) -> RowKld {
    let mut max = logits[0];
    let mut imax = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > max {
            max = l;
            imax = i;
        }
    }
    let sum_exp: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    let log_sum_exp = sum_exp.ln() as f32;
    let (scale, min_log_prob) = record_head(rec);
    let codes = &rec[4..4 + logits.len()];
    let nll = max + log_sum_exp - logits[tok];
    let nll_base = -(scale * codes[tok] as f32 + min_log_prob);
    let max = max + log_sum_exp;
    let mut sum = 0f64;
    let mut imax_base = 0;
    let mut p_log_base_max = 0f32;
    for (i, (&c, &l)) in codes.iter().zip(logits).enumerate() {
        let p_log_base = scale * c as f32 + min_log_prob;
        if i == 0 || p_log_base > p_log_base_max {
            p_log_base_max = p_log_base;
            imax_base = i;
        }
        if p_log_base > -16.0 {
            let p_base = p_log_base.exp();
            sum += (p_base * (p_log_base - l + max)) as f64;
        }
    }
    let p_diff = (-nll).exp() - (-nll_base).exp();
    RowKld {
        nll,
        nll_base,
        kld: sum,
        p_diff,
        same_top: imax == imax_base,
    }
}

/// llama.cpp's `kl_divergence_result` plus every position's KLD and Δp for the percentiles.
#[derive(Clone, Debug, Default)]
pub struct KldStats {
    sum_nll: f64,
    sum_nll2: f64,
    sum_nll_base: f64,
    sum_nll_base2: f64,
    sum_nll_nll_base: f64,
    sum_kld: f64,
    sum_kld2: f64,
    sum_p_diff: f64,
    sum_p_diff2: f64,
    sum_p_diff4: f64,
    max_p_diff: f32,
    n_same_top: usize,
    count: usize,
    kld_values: Vec<f32>,
    p_diff_values: Vec<f32>,
}

/// llama.cpp's `mean_and_uncertainty`.
fn mean_unc(sum: f64, sum2: f64, count: usize) -> (f64, f64) {
    if count < 1 {
        return (0.0, 0.0);
    }
    let n = count as f64;
    let f = sum / n;
    let df = sum2 / n - f * f;
    let df = if df > 0.0 && count > 10 {
        (df / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (f, df)
}

/// llama.cpp's `covariance`.
fn covariance(suma: f64, sumb: f64, sumab: f64, count: usize) -> f64 {
    if count < 10 {
        return 0.0;
    }
    let n = count as f64;
    (sumab / n - (suma / n) * (sumb / n)) / (n - 1.0)
}

/// llama.cpp's percentile: linear interpolation between sorted values, in f32.
fn percentile(sorted: &[f32], fraction: f32) -> f32 {
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let p = fraction * (sorted.len() - 1) as f32;
    let ip = p as usize;
    let p = p - ip as f32;
    (1.0 - p) * sorted[ip] + p * sorted[(ip + 1).min(sorted.len() - 1)]
}

fn median(sorted: &[f32]) -> f32 {
    let n = sorted.len();
    if n.is_multiple_of(2) {
        0.5 * (sorted[n / 2] + sorted[n / 2 - 1])
    } else {
        sorted[n / 2]
    }
}

impl KldStats {
    fn add(&mut self, r: RowKld) {
        self.sum_nll += r.nll as f64;
        self.sum_nll2 += (r.nll * r.nll) as f64;
        self.sum_nll_base += r.nll_base as f64;
        self.sum_nll_base2 += (r.nll_base * r.nll_base) as f64;
        self.sum_nll_nll_base += (r.nll * r.nll_base) as f64;
        self.sum_kld += r.kld;
        self.sum_kld2 += r.kld * r.kld;
        self.sum_p_diff += r.p_diff as f64;
        let p_diff2 = (r.p_diff * r.p_diff) as f64;
        self.sum_p_diff2 += p_diff2;
        self.sum_p_diff4 += p_diff2 * p_diff2;
        self.max_p_diff = self.max_p_diff.max(r.p_diff.abs());
        self.n_same_top += r.same_top as usize;
        self.count += 1;
        self.kld_values.push(r.kld as f32);
        self.p_diff_values.push(r.p_diff);
    }

    /// Positions compared so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Mean KL divergence and its uncertainty.
    pub fn mean_kld(&self) -> (f64, f64) {
        mean_unc(self.sum_kld, self.sum_kld2, self.count)
    }

    /// Fraction of positions where both models' most likely token is the same.
    pub fn same_top(&self) -> f64 {
        self.n_same_top as f64 / self.count.max(1) as f64
    }

    /// PPL of the model and its uncertainty.
    pub fn ppl(&self) -> (f64, f64) {
        let (m, u) = mean_unc(self.sum_nll, self.sum_nll2, self.count);
        (m.exp(), m.exp() * u)
    }

    /// PPL of the base (from the file's records) and its uncertainty.
    pub fn ppl_base(&self) -> (f64, f64) {
        let (m, u) = mean_unc(self.sum_nll_base, self.sum_nll_base2, self.count);
        (m.exp(), m.exp() * u)
    }

    /// KLD value at `fraction` of the sorted positions (llama.cpp's interpolation).
    pub fn kld_percentile(&self, fraction: f32) -> Option<f32> {
        if self.kld_values.is_empty() {
            return None;
        }
        let mut v = self.kld_values.clone();
        v.sort_by(f32::total_cmp);
        Some(percentile(&v, fraction))
    }

    /// llama-perplexity's line after each chunk: chunk, PPL, ln(PPL(Q)/PPL(base)), KL
    /// divergence, Δp RMS and same top p, each with its uncertainty.
    pub fn chunk_line(&self, chunk: usize) -> String {
        let lp = mean_unc(self.sum_nll, self.sum_nll2, self.count);
        let lb = mean_unc(self.sum_nll_base, self.sum_nll_base2, self.count);
        let cov = covariance(
            self.sum_nll,
            self.sum_nll_base,
            self.sum_nll_nll_base,
            self.count,
        );
        let ratio_unc = (lp.1 * lp.1 + lb.1 * lb.1 - 2.0 * cov).sqrt();
        let kl = self.mean_kld();
        let mse = mean_unc(self.sum_p_diff2, self.sum_p_diff4, self.count);
        let rms = mse.0.sqrt();
        let rms_unc = 0.5 / rms * mse.1;
        let top = self.same_top();
        let top_unc = (top * (1.0 - top) / (self.count as f64 - 1.0)).sqrt();
        format!(
            "{:4}    {} ± {}    {} ± {}    {} ± {}    {} ± {} %    {} ± {} %",
            chunk,
            c_f(lp.0.exp(), 9, 4),
            c_f(lp.0.exp() * lp.1, 9, 4),
            c_f(lp.0 - lb.0, 10, 5),
            c_f(ratio_unc, 10, 5),
            c_f(kl.0, 10, 5),
            c_f(kl.1, 10, 5),
            c_f(100.0 * rms, 6, 3),
            c_f(100.0 * rms_unc, 6, 3),
            c_f(100.0 * top, 6, 3),
            c_f(100.0 * top_unc, 6, 3),
        )
    }

    /// The header llama-perplexity prints above the chunk lines.
    pub fn chunk_header() -> &'static str {
        "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p"
    }

    /// llama-perplexity's summary block, same labels and formats; None below 100 positions
    /// (llama-perplexity prints none either: too few for statistics).
    pub fn summary(&self) -> Option<String> {
        if self.count < 100 {
            return None;
        }
        let mut kv = self.kld_values.clone();
        kv.sort_by(f32::total_cmp);
        let mut pd = self.p_diff_values.clone();
        pd.sort_by(f32::total_cmp);
        let mut s = String::new();
        let w = &mut s;
        let lp = mean_unc(self.sum_nll, self.sum_nll2, self.count);
        let ppl = lp.0.exp();
        let ppl_unc = ppl * lp.1;
        let lb = mean_unc(self.sum_nll_base, self.sum_nll_base2, self.count);
        let ppl_base = lb.0.exp();
        let ppl_base_unc = ppl_base * lb.1;
        let cov = covariance(
            self.sum_nll,
            self.sum_nll_base,
            self.sum_nll_nll_base,
            self.count,
        );
        let cor = cov / (lp.1 * lb.1);
        let ratio = lp.0 - lb.0;
        let ratio_unc = (lp.1 * lp.1 + lb.1 * lb.1 - 2.0 * cov).sqrt();
        let ppl_ratio = ratio.exp();
        let ppl_cov = ppl * ppl_base * cov;
        let diff_unc = (ppl_unc * ppl_unc + ppl_base_unc * ppl_base_unc - 2.0 * ppl_cov).sqrt();
        let _ = writeln!(w, "====== Perplexity statistics ======");
        let pm = |v: f64, u: f64| format!("{} ± {}", c_f(v, 10, 6), c_f(u, 10, 6));
        let _ = writeln!(w, "Mean PPL(Q)                   : {}", pm(ppl, ppl_unc));
        let _ = writeln!(
            w,
            "Mean PPL(base)                : {}",
            pm(ppl_base, ppl_base_unc)
        );
        let _ = writeln!(
            w,
            "Cor(ln(PPL(Q)), ln(PPL(base))): {}%",
            c_f(100.0 * cor, 6, 2)
        );
        let _ = writeln!(
            w,
            "Mean ln(PPL(Q)/PPL(base))     : {}",
            pm(ratio, ratio_unc)
        );
        let _ = writeln!(
            w,
            "Mean PPL(Q)/PPL(base)         : {}",
            pm(ppl_ratio, ppl_ratio * ratio_unc)
        );
        let _ = writeln!(
            w,
            "Mean PPL(Q)-PPL(base)         : {}",
            pm(ppl - ppl_base, diff_unc)
        );
        let _ = writeln!(w);
        let _ = writeln!(w, "====== KL divergence statistics ======");
        let kl = self.mean_kld();
        let _ = writeln!(w, "Mean    KLD: {}", pm(kl.0, kl.1));
        let k = |v: f32| c_f(v as f64, 10, 6);
        let _ = writeln!(w, "Maximum KLD: {}", k(kv[kv.len() - 1]));
        for (label, f) in [
            ("99.9%", 0.999f32),
            ("99.0%", 0.990),
            ("95.0%", 0.950),
            ("90.0%", 0.900),
        ] {
            let _ = writeln!(w, "{label}   KLD: {}", k(percentile(&kv, f)));
        }
        let _ = writeln!(w, "Median  KLD: {}", k(median(&kv)));
        for (label, f) in [
            ("10.0%", 0.100f32),
            (" 5.0%", 0.050),
            (" 1.0%", 0.010),
            (" 0.1%", 0.001),
        ] {
            let _ = writeln!(w, "{label}   KLD: {}", k(percentile(&kv, f)));
        }
        let _ = writeln!(w, "Minimum KLD: {}", k(kv[0]));
        let _ = writeln!(w);
        let _ = writeln!(w, "====== Token probability statistics ======");
        let p = mean_unc(self.sum_p_diff, self.sum_p_diff2, self.count);
        let _ = writeln!(
            w,
            "Mean    Δp: {} ± {} %",
            c_f(100.0 * p.0, 6, 3),
            c_f(100.0 * p.1, 5, 3)
        );
        let d = |v: f32| c_f(100.0 * v as f64, 6, 3);
        let _ = writeln!(w, "Maximum Δp: {}%", d(pd[pd.len() - 1]));
        for (label, f) in [
            ("99.9%", 0.999f32),
            ("99.0%", 0.990),
            ("95.0%", 0.950),
            ("90.0%", 0.900),
            ("75.0%", 0.750),
        ] {
            let _ = writeln!(w, "{label}   Δp: {}%", d(percentile(&pd, f)));
        }
        let _ = writeln!(w, "Median  Δp: {}%", d(median(&pd)));
        for (label, f) in [
            ("25.0%", 0.250f32),
            ("10.0%", 0.100),
            (" 5.0%", 0.050),
            (" 1.0%", 0.010),
            (" 0.1%", 0.001),
        ] {
            let _ = writeln!(w, "{label}   Δp: {}%", d(percentile(&pd, f)));
        }
        let _ = writeln!(w, "Minimum Δp: {}%", d(pd[0]));
        let mse = mean_unc(self.sum_p_diff2, self.sum_p_diff4, self.count);
        let rms = mse.0.sqrt();
        let _ = writeln!(
            w,
            "RMS Δp    : {} ± {} %",
            c_f(100.0 * rms, 6, 3),
            c_f(100.0 * 0.5 / rms * mse.1, 5, 3)
        );
        let top = self.same_top();
        let _ = writeln!(
            w,
            "Same top p: {} ± {} %",
            c_f(100.0 * top, 6, 3),
            c_f(
                100.0 * (top * (1.0 - top) / (self.count as f64 - 1.0)).sqrt(),
                5,
                3
            )
        );
        Some(s)
    }
}

/// C's `%W.Plf`: Rust's fixed-point formatting, with C's spelling of NaN and infinities.
fn c_f(v: f64, width: usize, prec: usize) -> String {
    let s = if v.is_nan() {
        "nan".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{v:.prec$}")
    };
    format!("{s:>width$}")
}

/// Writes a base file: the header and tokens at creation, then each scored row's record, and
/// sums the model's own log-likelihoods on the way (its perplexity is reported as usual).
pub struct BaseWriter<'a, W: Write> {
    out: W,
    n_vocab: usize,
    nll: Nll,
    buf: Vec<u16>,
    bytes: Vec<u8>,
    on_chunk: &'a mut dyn FnMut(&Estimate),
    path: PathBuf,
}

impl<'a, W: Write> BaseWriter<'a, W> {
    /// Writes the header: `tokens` are the first n_chunk x n_ctx tokens of the text, before any
    /// BOS replacement. `path` names the output in errors.
    pub fn new(
        mut out: W,
        path: &Path,
        n_ctx: usize,
        n_vocab: usize,
        tokens: &[u32],
        on_chunk: &'a mut dyn FnMut(&Estimate),
    ) -> Result<Self, KldError> {
        let io = |error| KldError::Io {
            path: path.to_path_buf(),
            error,
        };
        let n_chunk = tokens.len() / n_ctx.max(1);
        let mut h = Vec::with_capacity(20 + 4 * tokens.len());
        h.extend_from_slice(MAGIC);
        for v in [n_ctx, n_vocab, n_chunk] {
            let v = i32::try_from(v).map_err(|_| KldError::BadHeader {
                path: path.to_path_buf(),
                what: format!("{v} does not fit the format's int32"),
            })?;
            h.extend_from_slice(&v.to_le_bytes());
        }
        for &t in &tokens[..n_chunk * n_ctx] {
            h.extend_from_slice(&t.to_le_bytes());
        }
        out.write_all(&h).map_err(io)?;
        Ok(BaseWriter {
            out,
            n_vocab,
            nll: Nll::default(),
            buf: Vec::new(),
            bytes: Vec::new(),
            on_chunk,
            path: path.to_path_buf(),
        })
    }

    /// Flushes and returns the writer (the caller syncs and renames it into place).
    pub fn finish(mut self) -> Result<(W, Nll), KldError> {
        self.out.flush().map_err(|error| KldError::Io {
            path: self.path.clone(),
            error,
        })?;
        Ok((self.out, self.nll))
    }
}

impl<W: Write> ChunkScorer for BaseWriter<'_, W> {
    fn rows(
        &mut self,
        _chunk: usize,
        rows: &[f32],
        vocab: usize,
        next: &[u32],
    ) -> Result<(), PerplexityError> {
        debug_assert_eq!(vocab, self.n_vocab);
        self.nll.add_rows(rows, vocab, next);
        let nv = record_len(vocab);
        // A few dozen rows at a time bounds the buffer whatever the vocabulary.
        for part in rows.chunks(64 * vocab) {
            let n = part.len() / vocab;
            self.buf.clear();
            self.buf.resize(n * nv, 0);
            self.buf
                .par_chunks_exact_mut(nv)
                .zip(part.par_chunks_exact(vocab))
                .for_each(|(rec, row)| encode_record(row, rec));
            self.bytes.clear();
            self.bytes
                .extend(self.buf.iter().flat_map(|c| c.to_le_bytes()));
            self.out
                .write_all(&self.bytes)
                .map_err(|error| KldError::Io {
                    path: self.path.clone(),
                    error,
                })?;
        }
        Ok(())
    }

    fn end_chunk(&mut self, chunk: usize) -> Result<(), PerplexityError> {
        (self.on_chunk)(&self.nll.estimate(chunk + 1));
        Ok(())
    }
}

/// An opened base file: header and tokens checked and read, records read as the comparison
/// goes (a big vocabulary's records are gigabytes).
pub struct BaseFile {
    pub path: PathBuf,
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub n_chunk: usize,
    /// n_chunk x n_ctx tokens, before BOS replacement.
    pub tokens: Vec<u32>,
    reader: BufReader<File>,
}

impl BaseFile {
    /// Opens `path`: the file's length must be what its header says (checked before anything
    /// is allocated) and its tokens inside its vocabulary. [`BaseFile::check_vocab`] then
    /// checks that vocabulary against the model's.
    pub fn open(path: &Path) -> Result<Self, KldError> {
        let p = || path.to_path_buf();
        let io = |error| KldError::Io { path: p(), error };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(KldError::NotAFile { path: p() });
        }
        let actual = meta.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut head = [0u8; HEADER_BYTES as usize];
        if actual < HEADER_BYTES {
            return Err(KldError::BadHeader {
                path: p(),
                what: format!("{actual} bytes is too short for the 20-byte header"),
            });
        }
        reader.read_exact(&mut head).map_err(io)?;
        if &head[..8] != MAGIC {
            return Err(KldError::BadMagic { path: p() });
        }
        let field = |i: usize| i32::from_le_bytes(head[8 + 4 * i..12 + 4 * i].try_into().unwrap());
        let (n_ctx, n_vocab, n_chunk) = (field(0), field(1), field(2));
        for (name, v, least) in [
            ("n_ctx", n_ctx, 4),
            ("n_vocab", n_vocab, 1),
            ("n_chunk", n_chunk, 1),
        ] {
            if v < least {
                return Err(KldError::BadHeader {
                    path: p(),
                    what: format!("{name} is {v}, it must be at least {least}"),
                });
            }
        }
        let (n_ctx, n_vocab, n_chunk) = (n_ctx as u64, n_vocab as u64, n_chunk as u64);
        // All three are below 2^31, so this fits in u128 and is compared before any allocation.
        let expected = HEADER_BYTES as u128
            + 4 * (n_ctx * n_chunk) as u128
            + 2 * record_len(n_vocab as usize) as u128
                * scored_per_chunk(n_ctx as usize) as u128
                * n_chunk as u128;
        if expected != actual as u128 {
            return Err(KldError::Length {
                path: p(),
                actual,
                expected: u64::try_from(expected).unwrap_or(u64::MAX),
                n_ctx: n_ctx as u32,
                n_vocab: n_vocab as u32,
                n_chunk: n_chunk as u32,
            });
        }
        let (n_ctx, n_vocab, n_chunk) = (n_ctx as usize, n_vocab as usize, n_chunk as usize);
        let mut raw = vec![0u8; 4 * n_ctx * n_chunk];
        reader.read_exact(&mut raw).map_err(io)?;
        let mut tokens = Vec::with_capacity(n_ctx * n_chunk);
        for (index, b) in raw.chunks_exact(4).enumerate() {
            let id = i32::from_le_bytes(b.try_into().unwrap());
            if id < 0 || id as usize >= n_vocab {
                return Err(KldError::BadToken {
                    path: p(),
                    index,
                    id: id as i64,
                    vocab: n_vocab,
                });
            }
            tokens.push(id as u32);
        }
        Ok(BaseFile {
            path: p(),
            n_ctx,
            n_vocab,
            n_chunk,
            tokens,
            reader,
        })
    }

    /// Refuses a base file written for another vocabulary size (llama.cpp only logs it).
    pub fn check_vocab(&self, model_vocab: usize) -> Result<(), KldError> {
        if self.n_vocab != model_vocab {
            return Err(KldError::VocabMismatch {
                path: self.path.clone(),
                file: self.n_vocab,
                model: model_vocab,
            });
        }
        Ok(())
    }

    /// Refuses a base file whose tokens are not the start of `text_tokens` (the text given with
    /// `-f`, tokenized as for perplexity), naming the first that differs.
    pub fn check_tokens(
        &self,
        text_tokens: &[u32],
        piece: &dyn Fn(u32) -> String,
    ) -> Result<(), KldError> {
        if text_tokens.len() < self.tokens.len() {
            return Err(KldError::TextTooShort {
                path: self.path.clone(),
                file: self.tokens.len(),
                text: text_tokens.len(),
                n_chunk: self.n_chunk,
                n_ctx: self.n_ctx,
            });
        }
        if let Some(index) = self
            .tokens
            .iter()
            .zip(text_tokens)
            .position(|(a, b)| a != b)
        {
            let (f, t) = (self.tokens[index], text_tokens[index]);
            return Err(KldError::TokenMismatch {
                path: self.path.clone(),
                index,
                file_id: f,
                file_piece: piece(f),
                text_id: t,
                text_piece: piece(t),
            });
        }
        Ok(())
    }

    /// The next `n` records, into `buf`.
    fn read_records(&mut self, n: usize, buf: &mut Vec<u16>) -> Result<(), KldError> {
        let nv = record_len(self.n_vocab);
        let mut bytes = vec![0u8; n * nv * 2];
        self.reader
            .read_exact(&mut bytes)
            .map_err(|error| KldError::Io {
                path: self.path.clone(),
                error,
            })?;
        buf.clear();
        buf.extend(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]])),
        );
        Ok(())
    }
}

/// Compares the model's distributions with a base file's, position by position.
struct KldScorer<'a> {
    base: &'a mut BaseFile,
    stats: KldStats,
    buf: Vec<u16>,
    on_chunk: &'a mut dyn FnMut(usize, &KldStats),
}

impl ChunkScorer for KldScorer<'_> {
    fn rows(
        &mut self,
        _chunk: usize,
        rows: &[f32],
        vocab: usize,
        next: &[u32],
    ) -> Result<(), PerplexityError> {
        let nv = record_len(vocab);
        for (part, next) in rows.chunks(64 * vocab).zip(next.chunks(64)) {
            self.base.read_records(next.len(), &mut self.buf)?;
            let r: Vec<RowKld> = part
                .par_chunks_exact(vocab)
                .zip(self.buf.par_chunks_exact(nv))
                .zip(next.par_iter())
                .map(|((row, rec), &t)| row_kld(row, rec, t as usize))
                .collect();
            for r in r {
                self.stats.add(r);
            }
        }
        Ok(())
    }

    fn end_chunk(&mut self, chunk: usize) -> Result<(), PerplexityError> {
        (self.on_chunk)(chunk + 1, &self.stats);
        Ok(())
    }
}

/// What a KL-divergence run measured.
#[derive(Clone, Debug)]
pub struct KldOutcome {
    pub stats: KldStats,
    /// Tokens run through the model and the time it took.
    pub tokens: usize,
    pub time: Duration,
}

impl KldOutcome {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

/// KL divergence of `model` against `base`, over every chunk of the file (or the first
/// `p.max_chunks`). `p.n_ctx` is ignored: the file's context is used. `on_chunk` sees the
/// statistics after each chunk.
pub fn kl_divergence(
    model: &LlamaModel,
    precision: Precision,
    kv_type: KvType,
    base: &mut BaseFile,
    p: &PerplexityParams,
    on_chunk: &mut dyn FnMut(usize, &KldStats),
) -> Result<KldOutcome, PerplexityError> {
    base.check_vocab(model.config.vocab_size)?;
    if base.n_ctx > model.config.n_ctx_train {
        return Err(KldError::ContextTooLong {
            n_ctx: base.n_ctx,
            model: model.config.n_ctx_train,
        }
        .into());
    }
    let p = PerplexityParams {
        n_ctx: base.n_ctx,
        ..p.clone()
    };
    let n_chunks = base.n_chunk.min(p.max_chunks.unwrap_or(usize::MAX));
    let tokens = std::mem::take(&mut base.tokens);
    let mut scorer = KldScorer {
        base,
        stats: KldStats::default(),
        buf: Vec::new(),
        on_chunk,
    };
    let r = run_chunks(
        model,
        precision,
        kv_type,
        &tokens,
        n_chunks,
        &p,
        &mut scorer,
    );
    let stats = std::mem::take(&mut scorer.stats);
    base.tokens = tokens;
    let (tokens, time) = r?;
    Ok(KldOutcome {
        stats,
        tokens,
        time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_within_the_code_step() {
        let logits: Vec<f32> = (0..1001)
            .map(|i| ((i * 37) % 101) as f32 * 0.3 - 12.0)
            .collect();
        let mut rec = vec![0u16; record_len(logits.len())];
        assert_eq!(rec.len(), 1002 + 4);
        encode_record(&logits, &mut rec);
        let lp = decode_record(&rec, logits.len());
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let (scale, _) = record_head(&rec);
        for (i, &l) in logits.iter().enumerate() {
            let want = (l - max) as f64 - z.ln();
            // Values above the clamp (max - 16) are kept within half a code step.
            if l > max - 16.0 {
                assert!((lp[i] as f64 - want).abs() <= scale as f64, "{i}");
            }
        }
        // The padding entry of an odd vocabulary is zero.
        assert_eq!(rec[4 + 1001], 0);
    }

    #[test]
    fn a_model_against_its_own_records_has_zero_kld() {
        let logits: Vec<f32> = (0..500).map(|i| (i as f32 * 0.731).sin() * 5.0).collect();
        let mut rec = vec![0u16; record_len(500)];
        encode_record(&logits, &mut rec);
        let r = row_kld(&logits, &rec, 7);
        assert!(r.kld.abs() < 1e-6, "{}", r.kld);
        assert!(r.same_top);
        assert!(r.p_diff.abs() < 1e-4);
        assert!((r.nll - r.nll_base).abs() < 1e-3);
        // A different distribution: KLD clearly positive.
        let other: Vec<f32> = logits.iter().rev().cloned().collect();
        let r = row_kld(&other, &rec, 7);
        assert!(r.kld > 0.1, "{}", r.kld);
    }

    #[test]
    fn percentiles_interpolate_like_llama_cpp() {
        let v = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.9), 3.6);
        assert_eq!(percentile(&v, 0.0), 0.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
    }

    #[test]
    fn c_formats() {
        assert_eq!(c_f(1.5, 10, 6), "  1.500000");
        assert_eq!(c_f(-0.25, 6, 3), "-0.250");
        assert_eq!(c_f(f64::NAN, 6, 2), "   nan");
    }
}
