//! Options every model-running command shares, and loading a model with them through the
//! engine (the server loads the same way): flags in, `-v` lines and errors with the flags that
//! fix them out.

use std::path::PathBuf;

use airlock_engine::generate::{generate, GenerateError, GenerateOutcome, GenerateParams};
use airlock_engine::llama::{KvType, ModelError, Precision, Session};
use airlock_engine::load::{LoadError, LoadOptions, LoadedModel};
use airlock_engine::memory::human_bytes;
use airlock_engine::sampling::{Sampler, SamplerConfig};
use airlock_engine::signature::{SignatureError, Verified};
use anyhow::{anyhow, Result};

/// `-c` when none is given (capped at the model's training context).
pub const DEFAULT_CTX: usize = 4096;

#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Context size in tokens [default: 4096, capped at the model's context_length]. A value
    /// above the model's context_length (the positions it was trained on) is refused unless
    /// --force
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Threads for compute (default: physical cores). During a forward pass they spin
    /// between steps rather than sleep, so give no more than the cores you can spare
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Prompt tokens processed per batch
    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
    /// KV cache element type, for K and V (llama.cpp's -ctk/-ctv): q8_0 takes about half of
    /// f16's memory and of the bytes each generated token reads from the cache at depth
    #[arg(long = "kv-type", value_enum, default_value_t = KvTypeArg::F16)]
    pub kv_type: KvTypeArg,
    /// Exact path: f32 activations and dequantized weights (slower; matches float references)
    #[arg(long)]
    pub exact: bool,
    /// Lock the model's pages in memory (no swapping)
    #[arg(long)]
    pub mlock: bool,
    /// Read the model into memory instead of memory-mapping it
    #[arg(long = "no-mmap")]
    pub no_mmap: bool,
    /// Keep every weight in the file's layout (pure mmap). By default, on x86 CPUs with AVX2 or
    /// better, Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K matrices are copied at load into the interleaved
    /// layout the fast kernels read (anonymous memory, about the size of those tensors)
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    /// Run even when the estimated memory exceeds what is available, or with a -c above the
    /// model's training context
    #[arg(long)]
    pub force: bool,
    /// Use this tokenizer.json instead of the GGUF's vocabulary
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub signature: SignatureArgs,
    /// Print load details and the memory estimate
    #[arg(short = 'v', long)]
    pub verbose: bool,
}

/// `--require-signature`, shared by every command that loads a model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SignatureArgs {
    /// Refuse the model unless MODEL.manifest.json beside it is signed by this minisign public
    /// key (`airlock sign`) and every byte of MODEL matches it; checked before anything in the
    /// file is used, and a --tokenizer file then needs its own FILE.minisig by the key. The
    /// environment variable is a convenience default for your shell (unset it to drop it); a host
    /// policy file, /etc/airlock/require-signature.pub, is enforced whatever the flags say
    #[arg(
        long = "require-signature",
        value_name = "KEY.pub",
        env = "AIRLOCK_REQUIRE_SIGNATURE"
    )]
    pub require_signature: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum KvTypeArg {
    F16,
    F32,
    #[value(name = "q8_0")]
    Q8_0,
}

impl KvTypeArg {
    pub fn kv_type(self) -> KvType {
        match self {
            KvTypeArg::F16 => KvType::F16,
            KvTypeArg::F32 => KvType::F32,
            KvTypeArg::Q8_0 => KvType::Q8_0,
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Keep the k most likely tokens; 0 = off
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1.0 = off
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one; 0 = off
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise repeats of the last n tokens; 1.0 = off
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at; 0 = off
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (default: random; printed with -v)
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

impl ModelArgs {
    /// The flags' defaults for `model`: for commands with flags of their own (bench,
    /// batched-bench, perplexity) that set a few fields and keep the rest.
    pub fn new(model: PathBuf) -> Self {
        ModelArgs {
            model,
            ctx_size: None,
            threads: None,
            batch_size: 512,
            kv_type: KvTypeArg::F16,
            exact: false,
            mlock: false,
            no_mmap: false,
            no_repack: false,
            force: false,
            tokenizer: None,
            signature: SignatureArgs::default(),
            verbose: false,
        }
    }

    /// The engine's load options for these flags.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            n_ctx: self.ctx_size.unwrap_or(DEFAULT_CTX),
            ctx_explicit: self.ctx_size.is_some(),
            kv_type: self.kv_type.kv_type(),
            precision: if self.exact {
                Precision::Exact
            } else {
                Precision::Fast
            },
            mlock: self.mlock,
            no_mmap: self.no_mmap,
            repack: !self.no_repack,
            force: self.force,
            tokenizer_json: self.tokenizer.clone(),
            batch: self.batch_size as usize,
            require_signature: self.signature.require_signature.clone(),
        }
    }
}

/// Size the compute pool (`-t`, default the physical cores) and load the model, printing the
/// `-v` details and any tokenizer warning to stderr.
pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let threads = airlock_engine::load::init_threads(args.threads).map_err(load_error)?;
    warn_oversubscribed(threads);
    let loaded =
        airlock_engine::load::load(&args.model, &args.load_options()).map_err(load_error)?;
    let report = &loaded.report;
    if args.verbose {
        let c = &loaded.model.config;
        eprintln!(
            "model: {} ({} layers, embd {}, heads {}/{} kv, vocab {}), threads {threads}",
            args.model.display(),
            c.n_layers,
            c.n_embd,
            c.n_head,
            c.n_head_kv,
            c.vocab_size
        );
        let est = &report.estimate;
        eprintln!(
            "memory: weights {} + KV cache {} ({} positions of {}) + buffers {} + repacked copies \
             {} = {}; available {}",
            human_bytes(est.weights),
            human_bytes(est.kv_cache),
            loaded.n_ctx,
            loaded.kv_type.name(),
            human_bytes(est.buffers),
            human_bytes(est.repacked_extra),
            human_bytes(est.total()),
            report.available.map_or("unknown".into(), human_bytes)
        );
        if report.repacked_bytes > 0 {
            eprintln!(
                "repack: {} of Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K weights into the packed layout in {:.2} s (--no-repack to keep pure mmap)",
                human_bytes(report.repacked_bytes),
                report.repack_time.as_secs_f64()
            );
        }
    }
    if let Some(v) = &report.signature {
        eprintln!("{}", signature_line(&args.model, v));
    }
    if let Some(w) = &report.pre_tokenizer_warning {
        eprintln!("warning: {w}");
    }
    Ok(loaded)
}

/// The line a load prints when the model's signed manifest held.
pub fn signature_line(model: &std::path::Path, v: &Verified) -> String {
    let secs = v.hash_time.as_secs_f64();
    format!(
        "signature: {} matches its signed manifest ({} ranges, {} hashed in {secs:.2} s, {:.2} \
         GB/s; {})",
        model.display(),
        v.manifest.ranges.len(),
        human_bytes(v.manifest.size),
        v.manifest.size as f64 / secs.max(1e-9) / 1e9,
        v.trusted_comment.replace('\t', " ")
    )
}

/// Threads beyond the CPUs this process may use each take a spinning core from the others.
pub fn warn_oversubscribed(threads: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads > cpus {
        eprintln!(
            "warning: -t {threads} is more than the {cpus} CPUs available; the compute threads \
             spin during a forward pass, so extra threads make it slower"
        );
    }
}

/// A load error as the CLI reports it: where a flag changes the outcome, the message names it.
pub fn load_error(e: LoadError) -> anyhow::Error {
    match e {
        LoadError::ZeroContext => anyhow!("-c/--ctx-size must be at least 1"),
        LoadError::ContextAboveTraining {
            path,
            requested,
            trained,
        } => anyhow!(
            "-c/--ctx-size {requested} is above the {trained} tokens of context {} was trained \
             on (positions past it are untested and usually give garbage); lower -c, or pass \
             --force to use {requested} anyway",
            path.display()
        ),
        LoadError::KvTypeHeadDim { .. } => anyhow!("{e} (--kv-type f16)"),
        LoadError::ZeroThreads => anyhow!("-t/--threads must be at least 1"),
        LoadError::TooManyThreads { threads, max } => anyhow!(
            "-t/--threads {threads} is above the cap of {max} (the compute threads spin during \
             a forward pass: give at most the cores you can spare)"
        ),
        LoadError::TooLarge {
            path,
            estimate,
            n_ctx,
            available,
        } => anyhow!(
            "{} needs about {} (weights {}, KV cache {} at -c {n_ctx}) but only {} is available; \
             lower -c/--ctx-size, or pass --force to try anyway",
            path.display(),
            human_bytes(estimate.total()),
            human_bytes(estimate.weights),
            human_bytes(estimate.kv_cache),
            human_bytes(available)
        ),
        LoadError::Signature(e @ SignatureError::NotSigned { .. }) => anyhow!(
            "{e}; sign it with `airlock sign MODEL --key KEY.key`, or load it without \
             --require-signature (and with AIRLOCK_REQUIRE_SIGNATURE unset)"
        ),
        LoadError::BeyondMachine {
            path,
            estimate,
            need,
            machine,
            n_ctx,
        } => anyhow!(
            "{} needs at least {} that cannot be paged out (KV cache {} at -c {n_ctx}, buffers \
             and copies) but this machine has {} of memory and swap in all; --force cannot help, \
             lower -c/--ctx-size",
            path.display(),
            human_bytes(need),
            human_bytes(estimate.kv_cache),
            human_bytes(machine)
        ),
        LoadError::Mlock { error, .. } => {
            anyhow!("--mlock failed (raise `ulimit -l` or run without --mlock): {error}")
        }
        e => e.into(),
    }
}

/// The hint a generation error gets on the command line: a prompt or a conversation that
/// outgrows the context needs a larger `-c`.
pub fn context_hint(e: &GenerateError) -> Option<&'static str> {
    match e {
        GenerateError::PromptTooLong { .. }
        | GenerateError::Model(ModelError::ContextFull { .. }) => Some("raise -c/--ctx-size"),
        _ => None,
    }
}

/// A generation error as the CLI reports it, with [`context_hint`]'s hint.
pub fn generate_error(e: GenerateError) -> anyhow::Error {
    match context_hint(&e) {
        Some(hint) => anyhow!("{e} ({hint})"),
        None => e.into(),
    }
}

/// Run `generate` on `session`, streaming text to `out` (flushed per piece, so it appears as
/// tokens come).
pub fn generate_to(
    loaded: &LoadedModel,
    session: &mut Session,
    sampler: &mut Sampler,
    ids: &[u32],
    params: &GenerateParams,
    out: &mut impl std::io::Write,
) -> Result<GenerateOutcome, GenerateError> {
    generate(
        &loaded.model,
        session,
        &loaded.tokenizer,
        sampler,
        ids,
        params,
        &mut |s: &str| {
            out.write_all(s.as_bytes())?;
            out.flush()
        },
    )
}
