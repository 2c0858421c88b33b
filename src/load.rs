//! Options every model-running command shares, and loading a model with them: open and
//! validate the GGUF, check the memory it will need, build the tokenizer and thread pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_engine::gguf::{GgufError, GgufFile, OpenOptions};
use airlock_engine::llama::{KvType, LlamaModel, Precision, Session};
use airlock_engine::memory::{available_memory, human_bytes, MemoryEstimate};
use airlock_engine::sampling::SamplerConfig;
use airlock_engine::tokenizer::{Tokenizer, VocabSpec};
use anyhow::{bail, Context, Result};

#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Context size in tokens (capped at the model's context_length)
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// Threads for compute (default: physical cores). During a forward pass they spin
    /// between steps rather than sleep, so give no more than the cores you can spare
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Prompt tokens processed per batch
    #[arg(short = 'b', long = "batch-size", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,
    /// KV cache element type
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
    /// better, Q4_0/Q4_1/Q8_0 matrices are copied at load into the interleaved layout the fast
    /// kernels read (anonymous memory, about the size of those tensors)
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    /// Run even when the estimated memory exceeds what is available
    #[arg(long)]
    pub force: bool,
    /// Use this tokenizer.json instead of the GGUF's vocabulary
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Print load details and the memory estimate
    #[arg(short = 'v', long)]
    pub verbose: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum KvTypeArg {
    F16,
    F32,
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

pub struct Loaded {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub n_ctx: usize,
    pub load_time: Duration,
    pub args: ModelArgs,
}

impl Loaded {
    pub fn session(&self) -> Session {
        let kv = match self.args.kv_type {
            KvTypeArg::F16 => KvType::F16,
            KvTypeArg::F32 => KvType::F32,
        };
        let precision = if self.args.exact {
            Precision::Exact
        } else {
            Precision::Fast
        };
        Session::new(&self.model, self.n_ctx, kv, precision)
    }
}

/// Physical cores, from /proc/cpuinfo's (physical id, core id) pairs; logical CPUs otherwise.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let (mut phys, mut core) = (None, None);
    for line in info.lines() {
        let mut kv = line.splitn(2, ':').map(str::trim);
        match (kv.next(), kv.next()) {
            (Some("physical id"), Some(v)) => phys = Some(v.to_string()),
            (Some("core id"), Some(v)) => core = Some(v.to_string()),
            (Some(""), None) | (None, _) => {}
            _ => {}
        }
        if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                cores.insert((p, c));
            }
        }
    }
    if let (Some(p), Some(c)) = (phys, core) {
        cores.insert((p, c));
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => bail!("-t/--threads must be at least 1"),
        Some(n) => n,
        None => physical_cores(),
    };
    // The global pool can only be built once; a second call (tests) keeps the first.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(rayon::current_num_threads())
}

/// Open and validate a GGUF file; the error names the file once.
pub fn open_gguf(path: &std::path::Path, no_mmap: bool) -> Result<GgufFile> {
    match GgufFile::open_with(path, &OpenOptions { no_mmap }) {
        Ok(f) => Ok(f),
        // The I/O error already carries the path.
        Err(GgufError::Io { path, source }) => bail!("cannot open {}: {source}", path.display()),
        Err(e) => Err(e).with_context(|| format!("cannot load {}", path.display())),
    }
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    let threads = init_threads(args.threads)?;
    let t0 = Instant::now();
    let path = &args.model;
    let file = open_gguf(path, args.no_mmap)?;
    let mut model = LlamaModel::load(Arc::new(file))
        .with_context(|| format!("cannot run {}", path.display()))?;
    if args.ctx_size == 0 {
        bail!("-c/--ctx-size must be at least 1");
    }
    let n_ctx = args.ctx_size.min(model.config.n_ctx_train);
    let kv = match args.kv_type {
        KvTypeArg::F16 => KvType::F16,
        KvTypeArg::F32 => KvType::F32,
    };
    // The exact path reads the map only, so packed copies would be dead weight.
    let repack = !args.no_repack && !args.exact;
    let est = MemoryEstimate::for_model(&model, n_ctx, kv, args.batch_size as usize, repack);
    let avail = available_memory();
    if args.verbose {
        eprintln!(
            "model: {} ({} layers, embd {}, heads {}/{} kv, vocab {}), threads {threads}",
            path.display(),
            model.config.n_layers,
            model.config.n_embd,
            model.config.n_head,
            model.config.n_head_kv,
            model.config.vocab_size
        );
        eprintln!(
            "memory: weights {} + KV cache {} ({} x {:?}) + buffers {} + repacked copies {} = {}; \
             available {}",
            human_bytes(est.weights),
            human_bytes(est.kv_cache),
            n_ctx,
            kv,
            human_bytes(est.buffers),
            human_bytes(est.repacked_extra),
            human_bytes(est.total()),
            avail.map_or("unknown".into(), human_bytes)
        );
    }
    if let Some(avail) = avail {
        if est.total() > avail && !args.force {
            bail!(
                "{} needs about {} (weights {}, KV cache {} at -c {n_ctx}) but only {} is available; \
                 lower -c/--ctx-size, or pass --force to try anyway",
                path.display(),
                human_bytes(est.total()),
                human_bytes(est.weights),
                human_bytes(est.kv_cache),
                human_bytes(avail)
            );
        }
    }
    if args.mlock {
        model
            .file
            .mlock()
            .context("--mlock failed (raise `ulimit -l` or run without --mlock)")?;
    }
    if repack {
        let t = Instant::now();
        let bytes = model
            .repack()
            .with_context(|| format!("cannot repack {}", path.display()))?;
        if args.verbose && bytes > 0 {
            eprintln!(
                "repack: {} of Q4_0/Q4_1/Q8_0 weights into the packed layout in {:.2} s (--no-repack to keep pure mmap)",
                human_bytes(bytes),
                t.elapsed().as_secs_f64()
            );
        }
    }
    let spec = VocabSpec::from_gguf(&model.file)
        .with_context(|| format!("cannot read the vocabulary of {}", path.display()))?;
    let tokenizer = match &args.tokenizer {
        Some(json) => Tokenizer::from_tokenizer_json(json, &spec)?,
        None => Tokenizer::from_spec(&spec)?,
    };
    if let Some(w) = tokenizer.pre_tokenizer_warning() {
        eprintln!("warning: {w}");
    }
    if tokenizer.vocab_size() != model.config.vocab_size {
        bail!(
            "the vocabulary has {} tokens but token_embd.weight has {} rows",
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    Ok(Loaded {
        model,
        tokenizer,
        n_ctx,
        load_time: t0.elapsed(),
        args: args.clone(),
    })
}

impl Loaded {
    /// Run `generate` on `session`, streaming text to `out` (flushed per piece, so it appears as
    /// tokens come).
    pub fn generate_to(
        &self,
        session: &mut Session,
        sampler: &mut airlock_engine::sampling::Sampler,
        ids: &[u32],
        params: &airlock_engine::generate::GenerateParams,
        out: &mut impl std::io::Write,
    ) -> Result<airlock_engine::generate::GenerateOutcome, airlock_engine::generate::GenerateError>
    {
        airlock_engine::generate::generate(
            &self.model,
            session,
            &self.tokenizer,
            sampler,
            ids,
            params,
            &mut |s: &str| {
                out.write_all(s.as_bytes())?;
                out.flush()
            },
        )
    }
}
