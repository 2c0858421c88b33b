//! `compare`: a base model and its variants measured side by side on this machine, and the
//! report a deployment decision needs: size, bits per weight, type mix, memory at a context,
//! perplexity, its change, KL divergence and top-token agreement against the base, task
//! accuracy, and prompt and generation speed.
//!
//! The base runs first and writes its log-probabilities to a base file (llama-perplexity's
//! format, in a work directory inside the output directory); every variant is then compared
//! against that file. With `types`, variants are made from the base by airlock's quantizer one
//! at a time and deleted once measured unless `keep`. The reports are rewritten after every
//! file, so an interrupted run leaves what it finished.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use airlock_convert::{OutType, Policy};
use airlock_engine::gguf::WriteError;
use airlock_engine::kld::{kl_divergence, BaseFile, BaseWriter};
use airlock_engine::llama::{KvType, Logits, Session};
use airlock_engine::load::{load_with, open_gguf_checked, LoadOptions, LoadedModel};
use airlock_engine::memory::MemoryEstimate;
use airlock_engine::output::{write_file, Inputs, OutputError};
use airlock_engine::perplexity::{check_text, run_chunks, PerplexityError, PerplexityParams};
use airlock_engine::signature::Requirement;
use airlock_kernels::GgmlType;
use serde::Serialize;

use crate::eval::{evaluate, EvalError, EvalParams, Prompting, Score, Summary};
use crate::tasks::Task;

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Load {
        path: PathBuf,
        error: Box<airlock_engine::load::LoadError>,
    },
    #[error("{path}: {error}")]
    Perplexity {
        path: PathBuf,
        error: PerplexityError,
    },
    #[error("{path}: {error}")]
    Eval { path: PathBuf, error: EvalError },
    #[error("{path}: {error}")]
    Tokenizer { path: PathBuf, error: String },
    #[error(transparent)]
    Convert(#[from] airlock_convert::ConvertError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("writing the report: {0}")]
    Report(String),
    #[error(transparent)]
    Signature(#[from] airlock_engine::signature::SignatureError),
}

/// The tasks to score every file on.
#[derive(Clone, Debug)]
pub struct TaskSet {
    /// A name for the report (the file's).
    pub name: String,
    pub tasks: Vec<Task>,
    pub score: Score,
}

#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// A GGUF file, or a Hugging Face checkpoint directory (converted to f16 first).
    pub base: PathBuf,
    pub variants: Vec<PathBuf>,
    /// Variants to make from the base with airlock's quantizer.
    pub types: Vec<OutType>,
    /// Keep the variants made (in `out_dir`) instead of deleting each once measured.
    pub keep: bool,
    pub out_dir: PathBuf,
    /// The text perplexity and KL divergence are measured on, and its name for the report.
    pub text: String,
    pub text_name: String,
    pub tasks: Option<TaskSet>,
    /// Tokens per perplexity chunk (`-c`), tokens per pass, chunks scored.
    pub n_ctx: usize,
    pub batch: usize,
    pub max_chunks: Option<usize>,
    /// The context the memory column is computed for.
    pub mem_ctx: usize,
    pub kv_type: KvType,
    /// Prompt tokens and generated tokens of the speed measurement.
    pub bench_prompt: usize,
    pub bench_gen: usize,
    /// Set by Ctrl-C: the run stops at the next forward pass and the report keeps what is done.
    pub cancel: Arc<AtomicBool>,
    /// A minisign public key every given file's signed manifest must be signed by (the host
    /// policy applies whatever this says).
    pub require_signature: Option<PathBuf>,
}

/// How much of a file's bytes one tensor type holds.
#[derive(Clone, Debug, Serialize)]
pub struct TypeShare {
    #[serde(rename = "type")]
    pub ty: String,
    pub tensors: usize,
    pub bytes: u64,
}

/// One file's measurements.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub file: String,
    /// The type airlock quantized this variant to (None: given on the command line).
    pub made_as: Option<String>,
    pub is_base: bool,
    pub size_bytes: u64,
    pub params: u64,
    pub bits_per_weight: f64,
    pub types: Vec<TypeShare>,
    pub memory_bytes: u64,
    pub ppl: f64,
    pub ppl_err: f64,
    /// Change of PPL against the base's, in percent.
    pub delta_ppl_pct: Option<f64>,
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    pub same_top_pct: Option<f64>,
    pub accuracy_pct: Option<f64>,
    pub accuracy_err_pct: Option<f64>,
    /// Tokens per second of the perplexity passes (prompt processing, several chunks per pass).
    pub ppl_tokens_per_s: f64,
    /// One prompt of `bench_prompt` tokens, then `bench_gen` tokens one at a time.
    pub prompt_tokens_per_s: f64,
    pub gen_tokens_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub airlock_version: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub cpu: String,
    pub threads: usize,
    pub text: String,
    pub n_ctx: usize,
    pub chunks: usize,
    pub task: Option<String>,
    pub score: Option<Score>,
    pub memory_context: usize,
    pub bench_prompt: usize,
    pub bench_gen: usize,
    pub rows: Vec<Row>,
    /// Files that were to be measured but were not (interrupted).
    pub not_measured: Vec<String>,
    pub interrupted: bool,
}

/// What the caller may show while a comparison runs.
pub enum Progress<'a> {
    /// A file starts (index from 0).
    File {
        index: usize,
        total: usize,
        name: &'a str,
    },
    /// A step of the current file: quantizing, perplexity, eval, speed.
    Step(&'a str),
    /// Units of the current step done out of a total (chunks, tasks).
    Count { done: usize, total: usize },
    /// A file is measured; the reports now include it.
    Done(&'a Row),
}

/// The CPU's model name, from /proc/cpuinfo ("unknown" elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A file's stem for the report.
fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Removes the work directory (base file, variants not kept) however the run ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

enum Entry {
    Given(PathBuf),
    Made(OutType),
}

/// Runs the comparison and writes `report.md`, `report.json` and `report.svg` into
/// `opts.out_dir` (rewritten after every file). Returns the report; an interrupted run
/// returns the report so far with `interrupted` set.
pub fn compare(
    opts: &CompareOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, CompareError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CompareError::Io { path, error }
    };
    if opts.base.is_dir() && opts.types.is_empty() {
        return Err(CompareError::Usage(format!(
            "{} is a directory: with a Hugging Face checkpoint as BASE, give --types to say \
             which variants to make",
            opts.base.display()
        )));
    }
    for v in &opts.variants {
        if !v.is_file() {
            return Err(CompareError::Usage(format!(
                "{} is not a file",
                v.display()
            )));
        }
    }
    if opts.bench_prompt.checked_add(opts.bench_gen).is_none() {
        return Err(CompareError::Usage(format!(
            "--bench-prompt {} plus --bench-gen {} tokens is more than any context can hold",
            opts.bench_prompt, opts.bench_gen
        )));
    }
    // Under a signature requirement every given file is checked before anything runs, so an
    // unsigned variant does not wait for the base's measurement to be refused. Each is checked
    // again when it is loaded (what runs is what was checked). Variants made with `types` come
    // from the base's checked bytes in this run and are loaded without a signature of their own.
    let req = Requirement::for_host(opts.require_signature.as_deref())?;
    if req.is_required() {
        if opts.base.is_dir() {
            return Err(CompareError::Usage(format!(
                "{} is a Hugging Face checkpoint, which a signature cannot cover: convert it \
                 (`airlock convert ... --sign KEY.key`) and compare the signed GGUF",
                opts.base.display()
            )));
        }
        for path in std::iter::once(&opts.base).chain(&opts.variants) {
            open_gguf_checked(path, false, &req).map_err(|error| CompareError::Load {
                path: path.to_path_buf(),
                error: Box::new(error),
            })?;
        }
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(io(&opts.out_dir))?;
    let work = WorkDir(
        opts.out_dir
            .join(format!(".airlock-compare.{}", std::process::id())),
    );
    std::fs::create_dir_all(&work.0).map_err(io(&work.0))?;
    // Variants kept go to the output directory, the others to the work directory.
    let made_dir = if opts.keep { &opts.out_dir } else { &work.0 };

    let mut report = Report {
        airlock_version: env!("CARGO_PKG_VERSION").into(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpu: cpu_model(),
        threads: rayon::current_num_threads(),
        text: opts.text_name.clone(),
        n_ctx: opts.n_ctx,
        chunks: 0,
        task: opts.tasks.as_ref().map(|t| t.name.clone()),
        score: opts.tasks.as_ref().map(|t| t.score),
        memory_context: opts.mem_ctx,
        bench_prompt: opts.bench_prompt,
        bench_gen: opts.bench_gen,
        rows: Vec::new(),
        not_measured: Vec::new(),
        interrupted: false,
    };

    let mut entries: Vec<Entry> = Vec::new();
    let base_name = stem(&opts.base);
    let names: Vec<String> = std::iter::once(base_name.clone())
        .chain(opts.variants.iter().map(|v| stem(v)))
        .chain(
            opts.types
                .iter()
                .map(|t| format!("{base_name}-{}", t.name())),
        )
        .collect();
    let total = names.len();
    let cancelled = || opts.cancel.load(Ordering::Relaxed);

    // The base as a GGUF: a checkpoint directory is converted to f16 first.
    let base_gguf = if opts.base.is_dir() {
        progress(Progress::File {
            index: 0,
            total,
            name: &base_name,
        });
        progress(Progress::Step("converting the checkpoint to f16"));
        let out = made_dir.join(format!("{base_name}-f16.gguf"));
        airlock_convert::convert(&airlock_convert::ConvertOptions {
            input: opts.base.clone(),
            output: out.clone(),
            policy: Policy::new(OutType::F16),
            pre: None,
            progress: false,
            allow_nonfinite: false,
            // A fresh path in compare's own temporary directory.
            overwrite: false,
        })
        .map_err(|e| match e {
            airlock_convert::ConvertError::Interrupted(_) => CompareError::Interrupted,
            e => e.into(),
        })?;
        out
    } else {
        opts.base.clone()
    };
    if !opts.types.is_empty() {
        check_unquantized(&base_gguf)?;
    }
    entries.push(Entry::Given(base_gguf.clone()));
    entries.extend(opts.variants.iter().cloned().map(Entry::Given));
    entries.extend(opts.types.iter().map(|&t| Entry::Made(t)));

    let made = Requirement::none();
    let base_file = work.0.join("base.kld");
    let mut base_ppl = None;
    for (index, (entry, name)) in entries.iter().zip(&names).enumerate() {
        if cancelled() {
            report.interrupted = true;
        }
        if report.interrupted {
            report.not_measured.push(name.clone());
            continue;
        }
        progress(Progress::File { index, total, name });
        let (path, made_as) = match entry {
            Entry::Given(p) => (p.clone(), None),
            Entry::Made(t) => {
                progress(Progress::Step(&format!("quantizing to {}", t.name())));
                let out = made_dir.join(format!("{name}.gguf"));
                let r = airlock_convert::quantize(&airlock_convert::QuantizeOptions {
                    input: base_gguf.clone(),
                    output: out.clone(),
                    policy: Policy::new(*t),
                    allow_requantize: false,
                    progress: false,
                    allow_nonfinite: false,
                    // The bytes quantized are checked like any load's (the host policy too).
                    require_signature: opts.require_signature.clone(),
                    overwrite: false,
                });
                match r {
                    Ok(_) => (out, Some(t.name().to_string())),
                    Err(airlock_convert::ConvertError::Interrupted(_)) => {
                        report.interrupted = true;
                        report.not_measured.push(name.clone());
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let measured = measure(
            opts,
            if made_as.is_some() { &made } else { &req },
            &path,
            name,
            made_as,
            index == 0,
            &base_file,
            base_ppl,
            &mut report,
            progress,
        );
        if made_as_deletable(entry, opts.keep) {
            let _ = std::fs::remove_file(&path);
        }
        match measured {
            Ok(row) => {
                if row.is_base {
                    base_ppl = Some(row.ppl);
                }
                report.rows.push(row);
                write_reports(&opts.out_dir, &report)?;
                if let Some(row) = report.rows.last() {
                    progress(Progress::Done(row));
                }
            }
            Err(CompareError::Interrupted) => {
                report.interrupted = true;
                report.not_measured.push(name.clone());
            }
            Err(e) => return Err(e),
        }
    }
    write_reports(&opts.out_dir, &report)?;
    Ok(report)
}

fn made_as_deletable(entry: &Entry, keep: bool) -> bool {
    matches!(entry, Entry::Made(_)) && !keep
}

/// `--types` quantizes from the base: it must hold unquantized weights (no double
/// quantization behind the user's back).
fn check_unquantized(path: &Path) -> Result<(), CompareError> {
    let f = airlock_engine::load::open_gguf(path, false).map_err(|error| CompareError::Load {
        path: path.to_path_buf(),
        error: Box::new(error),
    })?;
    if let Some(t) = f.tensors().iter().find(|t| t.ty.is_quantized()) {
        return Err(CompareError::Usage(format!(
            "--types makes variants from an unquantized base (f32, f16, bf16 GGUF or a Hugging \
             Face directory), but {} holds {} weights ({}); compare the files you have without \
             --types, or start from the f16 file",
            path.display(),
            t.ty,
            t.name
        )));
    }
    Ok(())
}

/// Measures one file. The base (`is_base`) writes `base_file`; the others compare against it.
#[allow(clippy::too_many_arguments)]
fn measure(
    opts: &CompareOptions,
    req: &Requirement,
    path: &Path,
    name: &str,
    made_as: Option<String>,
    is_base: bool,
    base_file: &Path,
    base_ppl: Option<f64>,
    report: &mut Report,
    progress: &mut dyn FnMut(Progress),
) -> Result<Row, CompareError> {
    let perr = |error| match error {
        PerplexityError::Interrupted => CompareError::Interrupted,
        error => CompareError::Perplexity {
            path: path.to_path_buf(),
            error,
        },
    };
    // The speed test holds the prompt and the generated tokens in one session (`compare`
    // checked that the sum fits a usize).
    let bench = opts.bench_prompt + opts.bench_gen;
    let eval_ctx = opts
        .tasks
        .as_ref()
        .map_or(0, |_| 4096)
        .max(opts.n_ctx)
        .max(bench);
    let loaded = load_with(
        path,
        &LoadOptions {
            n_ctx: eval_ctx,
            kv_type: opts.kv_type,
            batch: opts.batch,
            ..LoadOptions::default()
        },
        req,
    )
    .map_err(|error| CompareError::Load {
        path: path.to_path_buf(),
        error: Box::new(error),
    })?;
    // The load capped the context at the model's: the speed test must fit in it.
    if bench > loaded.n_ctx {
        return Err(CompareError::Usage(format!(
            "--bench-prompt {} plus --bench-gen {} tokens is more than the {} tokens of \
             context {} holds",
            opts.bench_prompt,
            opts.bench_gen,
            loaded.n_ctx,
            path.display()
        )));
    }
    let size_bytes = std::fs::metadata(path)
        .map_err(|error| CompareError::Io {
            path: path.to_path_buf(),
            error,
        })?
        .len();
    let tensors = loaded.model.file.tensors();
    let params: u64 = tensors.iter().map(|t| t.n_elements).sum();
    let tensor_bytes: u64 = tensors.iter().map(|t| t.n_bytes).sum();
    let mut mix: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in tensors {
        let e = mix.entry(type_name(t.ty)).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    let mut types: Vec<TypeShare> = mix
        .into_iter()
        .map(|(ty, (tensors, bytes))| TypeShare { ty, tensors, bytes })
        .collect();
    types.sort_by_key(|t| std::cmp::Reverse(t.bytes));
    let memory_bytes = MemoryEstimate::for_model(
        &loaded.model,
        opts.mem_ctx,
        opts.kv_type,
        opts.batch.min(512),
        true,
    )
    .total();

    let tok = &loaded.tokenizer;
    let add_bos = tok.add_bos_default();
    let tokens = tok
        .encode(&opts.text, add_bos, false)
        .map_err(|e| CompareError::Tokenizer {
            path: path.to_path_buf(),
            error: e.to_string(),
        })?;
    let params_ppl = PerplexityParams {
        n_ctx: opts.n_ctx,
        batch: opts.batch,
        max_chunks: opts.max_chunks,
        bos: if add_bos { tok.bos() } else { None },
        cancel: Some(opts.cancel.clone()),
    };
    let mut row = Row {
        name: name.to_string(),
        file: path.display().to_string(),
        made_as,
        is_base,
        size_bytes,
        params,
        bits_per_weight: tensor_bytes as f64 * 8.0 / params.max(1) as f64,
        types,
        memory_bytes,
        ppl: 0.0,
        ppl_err: 0.0,
        delta_ppl_pct: None,
        kld_mean: None,
        kld_p99: None,
        same_top_pct: None,
        accuracy_pct: None,
        accuracy_err_pct: None,
        ppl_tokens_per_s: 0.0,
        prompt_tokens_per_s: 0.0,
        gen_tokens_per_s: 0.0,
    };
    if is_base {
        check_text(tokens.len(), opts.n_ctx).map_err(perr)?;
        let n_chunks = params_ppl.chunk_count(tokens.len());
        report.chunks = n_chunks;
        progress(Progress::Step(
            "perplexity (base: saving log-probabilities)",
        ));
        let vocab = loaded.model.config.vocab_size;
        let head = &tokens[..n_chunks * opts.n_ctx];
        let (estimate, n, time) = // A fresh path in compare's own temporary directory.
        write_file(base_file, Inputs::new([&path]), false, |w| {
            let mut on_chunk = |e: &airlock_engine::perplexity::Estimate| {
                progress(Progress::Count {
                    done: e.chunks,
                    total: n_chunks,
                })
            };
            let mut writer = BaseWriter::new(w, base_file, opts.n_ctx, vocab, head, &mut on_chunk)
                .map_err(|e| perr(e.into()))?;
            let (n, time) = run_chunks(
                &loaded.model,
                loaded.precision,
                loaded.kv_type,
                &tokens,
                n_chunks,
                &params_ppl,
                &mut writer,
            )
            .map_err(perr)?;
            let (_, nll) = writer.finish().map_err(|e| perr(e.into()))?;
            Ok::<_, CompareError>((nll.estimate(n_chunks), n, time))
        })?;
        row.ppl = estimate.ppl;
        row.ppl_err = estimate.ppl_err.unwrap_or(0.0);
        row.ppl_tokens_per_s = n as f64 / time.as_secs_f64().max(1e-9);
    } else {
        let mut base = BaseFile::open(base_file).map_err(|e| perr(e.into()))?;
        base.check_vocab(loaded.model.config.vocab_size)
            .map_err(|e| perr(e.into()))?;
        base.check_tokens(&tokens, &|id| {
            String::from_utf8_lossy(tok.token_piece(id).unwrap_or_default()).into_owned()
        })
        .map_err(|e| perr(e.into()))?;
        progress(Progress::Step(
            "perplexity and KL divergence against the base",
        ));
        let n_chunks = base.n_chunk;
        let r = kl_divergence(
            &loaded.model,
            loaded.precision,
            loaded.kv_type,
            &mut base,
            &params_ppl,
            &mut |done, _| {
                progress(Progress::Count {
                    done,
                    total: n_chunks,
                })
            },
        )
        .map_err(perr)?;
        let (ppl, ppl_err) = r.stats.ppl();
        row.ppl = ppl;
        row.ppl_err = ppl_err;
        row.delta_ppl_pct = base_ppl.map(|b| 100.0 * (ppl / b - 1.0));
        row.kld_mean = Some(r.stats.mean_kld().0);
        row.kld_p99 = r.stats.kld_percentile(0.99).map(f64::from);
        row.same_top_pct = Some(100.0 * r.stats.same_top());
        row.ppl_tokens_per_s = r.tokens_per_s();
    }

    if let Some(set) = &opts.tasks {
        progress(Progress::Step("eval"));
        let prompting = Prompting {
            tokenizer: tok,
            score: set.score,
            chat: None,
        };
        let eerr = |error| match error {
            EvalError::Interrupted => CompareError::Interrupted,
            error => CompareError::Eval {
                path: path.to_path_buf(),
                error,
            },
        };
        let prepared = set
            .tasks
            .iter()
            .map(|t| prompting.prepare(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(eerr)?;
        let n = prepared.len();
        let mut done = 0;
        let run = evaluate(
            &loaded.model,
            loaded.precision,
            loaded.kv_type,
            &prepared,
            &EvalParams {
                batch: opts.batch,
                n_ctx: loaded.n_ctx,
                cancel: Some(opts.cancel.clone()),
                ..EvalParams::default()
            },
            &mut |_| {
                done += 1;
                progress(Progress::Count { done, total: n });
            },
        )
        .map_err(eerr)?;
        let s = Summary::new(&run);
        row.accuracy_pct = Some(100.0 * s.accuracy);
        row.accuracy_err_pct = Some(100.0 * s.std_error);
    }

    if opts.cancel.load(Ordering::Relaxed) {
        return Err(CompareError::Interrupted);
    }
    progress(Progress::Step("speed"));
    let (pp, tg) = speed(&loaded, &tokens, opts.bench_prompt, opts.bench_gen).map_err(|e| {
        CompareError::Perplexity {
            path: path.to_path_buf(),
            error: e.into(),
        }
    })?;
    row.prompt_tokens_per_s = pp;
    row.gen_tokens_per_s = tg;
    Ok(row)
}

/// llama.cpp's name of a tensor type, lower case (q4_0, f16, ...).
fn type_name(t: GgmlType) -> String {
    t.to_string().to_ascii_lowercase()
}

/// Prompt processing of `n_prompt` tokens in one pass, then `n_gen` tokens one at a time, on
/// the text's tokens (repeated if short): tokens per second of each.
fn speed(
    loaded: &LoadedModel,
    text: &[u32],
    n_prompt: usize,
    n_gen: usize,
) -> Result<(f64, f64), airlock_engine::llama::ModelError> {
    let ids: Vec<u32> = text
        .iter()
        .cycle()
        .take(n_prompt + n_gen)
        .copied()
        .collect();
    if ids.len() < n_prompt + n_gen || n_prompt == 0 {
        return Ok((0.0, 0.0));
    }
    let mut s = Session::new(
        &loaded.model,
        n_prompt + n_gen,
        loaded.kv_type,
        loaded.precision,
    );
    let t = Instant::now();
    s.forward(&loaded.model, &ids[..n_prompt], Logits::Last)?;
    let pp = n_prompt as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let t = Instant::now();
    for &id in &ids[n_prompt..] {
        s.forward(&loaded.model, &[id], Logits::Last)?;
    }
    let tg = n_gen as f64 / t.elapsed().as_secs_f64().max(1e-9);
    Ok((pp, tg))
}

/// Writes report.md, report.json and report.svg into `dir`, each atomically.
pub fn write_reports(dir: &Path, r: &Report) -> Result<(), CompareError> {
    let json = serde_json::to_string_pretty(r).map_err(|e| CompareError::Report(e.to_string()))?;
    let svg = crate::chart::svg(r).map_err(CompareError::Report)?;
    for (name, body) in [
        ("report.md", markdown(r)),
        ("report.json", json + "\n"),
        ("report.svg", svg),
    ] {
        // -o DIR is compare's own report directory: its reports are replaced on each run.
        write_file(&dir.join(name), Inputs::new::<&Path>([]), true, |w| {
            use std::io::Write;
            w.write_all(body.as_bytes())
                .map_err(|e| CompareError::Write(WriteError::Io(e)))
        })?;
    }
    Ok(())
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("".into(), f)
}

/// The report as a Markdown table, with the settings and each file's type mix.
pub fn markdown(r: &Report) -> String {
    let mut s = String::from("# airlock compare\n\n");
    s.push_str(&format!(
        "Perplexity on {} (-c {}, {} chunks); KL divergence and same top token against {}; \
         memory at a context of {}; speed: a {}-token prompt, then {} tokens generated. \
         {} threads on {}, airlock {}.\n\n",
        r.text,
        r.n_ctx,
        r.chunks,
        r.rows
            .first()
            .map_or("the base".to_string(), |b| format!("`{}`", b.name)),
        r.memory_context,
        r.bench_prompt,
        r.bench_gen,
        r.threads,
        r.cpu,
        r.airlock_version
    ));
    if let Some(t) = &r.task {
        s.push_str(&format!(
            "Accuracy on {t}, scored by {}.\n\n",
            r.score.map_or("", Score::name)
        ));
    }
    s.push_str(
        "| file | size | bits/weight | memory | PPL | ΔPPL | mean KLD | 99% KLD | same top | \
         accuracy | prompt t/s | gen t/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &r.rows {
        s.push_str(&format!(
            "| {}{} | {} | {:.2} | {} | {:.4} ± {:.4} | {} | {} | {} | {} | {} | {:.1} | {:.1} |\n",
            row.name,
            if row.is_base { " (base)" } else { "" },
            mb(row.size_bytes),
            row.bits_per_weight,
            mb(row.memory_bytes),
            row.ppl,
            row.ppl_err,
            opt(row.delta_ppl_pct, |v| format!("{v:+.2}%")),
            opt(row.kld_mean, |v| format!("{v:.6}")),
            opt(row.kld_p99, |v| format!("{v:.6}")),
            opt(row.same_top_pct, |v| format!("{v:.2}%")),
            match (row.accuracy_pct, row.accuracy_err_pct) {
                (Some(a), Some(e)) => format!("{a:.2}% ± {e:.2}"),
                _ => String::new(),
            },
            row.prompt_tokens_per_s,
            row.gen_tokens_per_s
        ));
    }
    s.push_str("\nType mix (share of tensor bytes):\n\n");
    for row in &r.rows {
        let total: u64 = row.types.iter().map(|t| t.bytes).sum();
        let mix: Vec<String> = row
            .types
            .iter()
            .map(|t| {
                format!(
                    "{} {:.1}% ({} tensors)",
                    t.ty,
                    100.0 * t.bytes as f64 / total.max(1) as f64,
                    t.tensors
                )
            })
            .collect();
        s.push_str(&format!("- {}: {}\n", row.name, mix.join(", ")));
    }
    if r.interrupted {
        s.push_str(&format!(
            "\nInterrupted: not measured: {}.\n",
            if r.not_measured.is_empty() {
                "none".to_string()
            } else {
                r.not_measured.join(", ")
            }
        ));
    }
    s
}
