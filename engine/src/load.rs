//! Loading a model for running: open and validate the GGUF, check the memory the run will
//! need, lock and repack the weights, build the tokenizer. Every front end (the CLI, the server)
//! loads through [`load`], so they refuse the same files with the same errors; the front end
//! adds its own hints (flag names) and prints the [`LoadReport`] as it likes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gguf::{GgufError, GgufFile, OpenOptions};
use crate::llama::{KvType, LlamaModel, ModelError, Precision, Session};
use crate::memory::{available_memory, human_bytes, machine_memory, MemoryEstimate};
use crate::signature::{self, Requirement, SignatureError, Verified};
use crate::tokenizer::{Tokenizer, TokenizerError, VocabSpec};

/// Why a model could not be loaded. Each variant names the file; none names a front end's
/// option, so the CLI and the server can each add their own remedy.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The cause is part of the message (not a `source`), so a front end that prints the
    /// error chain does not print it twice.
    #[error("cannot open {}: {error}", path.display())]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot load {}: {error}", path.display())]
    Gguf { path: PathBuf, error: GgufError },
    #[error("cannot run {}: {error}", path.display())]
    Model { path: PathBuf, error: ModelError },
    #[error("context size must be at least 1")]
    ZeroContext,
    #[error(
        "context size {requested} is above the {trained} tokens {} was trained on",
        path.display()
    )]
    ContextAboveTraining {
        path: PathBuf,
        requested: usize,
        trained: usize,
    },
    #[error(
        "{}: a {} KV cache cannot hold heads of {head_dim} values (Q8_0 needs a multiple of 32)",
        path.display(),
        kv_type.name()
    )]
    KvTypeHeadDim {
        path: PathBuf,
        kv_type: KvType,
        head_dim: usize,
    },
    #[error("thread count must be at least 1")]
    ZeroThreads,
    #[error("thread count {threads} is above the cap of {max}")]
    TooManyThreads { threads: usize, max: usize },
    #[error("cannot start {threads} compute threads: {error}")]
    ThreadPool {
        threads: usize,
        error: std::io::Error,
    },
    #[error(
        "{} needs about {} (weights {}, KV cache {} at context {n_ctx}) but only {} is \
         available; lower the context size, or force the load",
        path.display(),
        human_bytes(estimate.total()),
        human_bytes(estimate.weights),
        human_bytes(estimate.kv_cache),
        human_bytes(*available)
    )]
    TooLarge {
        path: PathBuf,
        estimate: MemoryEstimate,
        n_ctx: usize,
        available: u64,
    },
    /// More memory than the machine has at all: refused even when forced.
    #[error(
        "{} needs at least {} that cannot be paged out (KV cache {} at context {n_ctx}, buffers \
         and copies) but this machine has {} of memory and swap in all; forcing cannot help, \
         lower the context size",
        path.display(),
        human_bytes(*need),
        human_bytes(estimate.kv_cache),
        human_bytes(*machine)
    )]
    BeyondMachine {
        path: PathBuf,
        estimate: MemoryEstimate,
        need: u64,
        machine: u64,
        n_ctx: usize,
    },
    #[error(
        "cannot lock {} in memory: {error} (raise the locked-memory limit, RLIMIT_MEMLOCK)",
        path.display()
    )]
    Mlock {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot repack {}: {error}", path.display())]
    Repack { path: PathBuf, error: ModelError },
    #[error("cannot read the vocabulary of {}: {error}", path.display())]
    Vocabulary {
        path: PathBuf,
        error: TokenizerError,
    },
    #[error("cannot build the tokenizer of {}: {error}", path.display())]
    Tokenizer {
        path: PathBuf,
        error: TokenizerError,
    },
    /// A tokenizer.json given instead of the GGUF's vocabulary, which keeps the GGUF's special
    /// tokens.
    #[error(
        "cannot use {} as the tokenizer of {}: {error}",
        json.display(),
        path.display()
    )]
    TokenizerJson {
        path: PathBuf,
        json: PathBuf,
        error: TokenizerError,
    },
    #[error(
        "{}: the vocabulary has {vocab} tokens but token_embd.weight has {rows} rows",
        path.display()
    )]
    VocabularyMismatch {
        path: PathBuf,
        vocab: usize,
        rows: usize,
    },
    /// A signature was required and is missing, wrong or does not match (or the host policy
    /// is broken).
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("{}: metadata {}", path.display(), problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Keys {
        path: PathBuf,
        problems: Vec<crate::keys::KeyProblem>,
    },
    #[error("{}: {key}: {error}", path.display())]
    ChatTemplate {
        path: PathBuf,
        key: String,
        error: crate::chat::ChatError,
    },
}

/// How to load a model. [`Default`] gives the CLI's defaults.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Context size requested, in tokens; capped at the model's training context unless
    /// `ctx_explicit`. At least 1.
    pub n_ctx: usize,
    /// `n_ctx` was asked for explicitly: above the model's training context it is refused
    /// (used as given with `force`) instead of capped.
    pub ctx_explicit: bool,
    pub kv_type: KvType,
    pub precision: Precision,
    /// Lock the mapped pages in memory (no swapping).
    pub mlock: bool,
    /// Read the file into memory instead of mapping it.
    pub no_mmap: bool,
    /// Copy Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K matrices into the packed layout where the SIMD path has packed
    /// kernels. Ignored on the exact path, which reads the map only.
    pub repack: bool,
    /// Load even when the memory estimate exceeds what is available, or an explicit context
    /// exceeds the model's training context.
    pub force: bool,
    /// A tokenizer.json to use instead of the GGUF's vocabulary.
    pub tokenizer_json: Option<PathBuf>,
    /// Prompt tokens per forward pass, for the estimate of the activation buffers.
    pub batch: usize,
    /// A minisign public key the model's signed manifest must be signed by. The host policy
    /// ([`signature::HostPolicy::system`]) is enforced whatever this says.
    pub require_signature: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            n_ctx: 4096,
            ctx_explicit: false,
            kv_type: KvType::F16,
            precision: Precision::Fast,
            mlock: false,
            no_mmap: false,
            repack: true,
            force: false,
            tokenizer_json: None,
            batch: 512,
            require_signature: None,
        }
    }
}

/// What loading found and did, for a front end to print.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// The memory the run was estimated to need.
    pub estimate: MemoryEstimate,
    /// Memory available when the estimate was checked; None where it cannot be read.
    pub available: Option<u64>,
    /// Bytes of packed copies made (0 without repacking, or on a path without packed kernels).
    pub repacked_bytes: u64,
    pub repack_time: Duration,
    /// From opening the file to the tokenizer being ready.
    pub load_time: Duration,
    /// Why the tokenizer may split text differently from the model's own (an unknown
    /// pre-tokenizer), if it may.
    pub pre_tokenizer_warning: Option<String>,
    /// The signed manifest the bytes were checked against, when a signature was required.
    pub signature: Option<Verified>,
}

/// A model ready to run: weights, tokenizer, and the settings its sessions use.
pub struct LoadedModel {
    pub path: PathBuf,
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    /// Context size of each session: the request, capped at the model's training context
    /// unless it was explicit and forced.
    pub n_ctx: usize,
    pub kv_type: KvType,
    pub precision: Precision,
    pub report: LoadReport,
}

impl LoadedModel {
    /// A new session (KV cache and buffers) with the loaded settings.
    pub fn session(&self) -> Session {
        Session::new(&self.model, self.n_ctx, self.kv_type, self.precision)
    }
}

/// Open and validate a GGUF file.
pub fn open_gguf(path: &Path, no_mmap: bool) -> Result<GgufFile, LoadError> {
    GgufFile::open_with(path, &OpenOptions { no_mmap }).map_err(|e| gguf_error(path, e))
}

/// A reader error as a load error: an I/O error names the file it could not open.
pub(crate) fn gguf_error(path: &Path, e: GgufError) -> LoadError {
    match e {
        GgufError::Io { path, error } => LoadError::Open { path, error },
        error => LoadError::Gguf {
            path: path.to_path_buf(),
            error,
        },
    }
}

/// Open a GGUF file under `req`: when a signature is required, the signed manifest beside it is
/// checked against the bytes (mapped, or read with `no_mmap`) before the reader parses them,
/// then against the parsed tensor table. Returns the manifest that held, if one was required.
pub fn open_gguf_checked(
    path: &Path,
    no_mmap: bool,
    req: &Requirement,
) -> Result<(GgufFile, Option<Verified>), LoadError> {
    if !req.is_required() {
        return Ok((open_gguf(path, no_mmap)?, None));
    }
    let source =
        GgufFile::read_source(path, &OpenOptions { no_mmap }).map_err(|e| gguf_error(path, e))?;
    let verified = signature::check_signed_bytes(path, &source, req.keys())?;
    let file = GgufFile::from_source(source).map_err(|e| gguf_error(path, e))?;
    verified.check_layout(path, &file)?;
    Ok((file, Some(verified)))
}

/// The tokenizer of an opened GGUF (`path` names it in errors), or of `json` built on the
/// GGUF's special tokens when given. Under a signature requirement `json` must be signed too
/// (`JSON.minisig` by every required key); it is read once and checked before it is parsed.
pub fn tokenizer_for(
    file: &GgufFile,
    path: &Path,
    json: Option<&Path>,
    req: &Requirement,
) -> Result<Tokenizer, LoadError> {
    let spec = VocabSpec::from_gguf(file).map_err(|error| LoadError::Vocabulary {
        path: path.to_path_buf(),
        error,
    })?;
    let json_err = |json: &Path, error| LoadError::TokenizerJson {
        path: path.to_path_buf(),
        json: json.to_path_buf(),
        error,
    };
    match json {
        Some(json) if req.is_required() => {
            let bytes = signature::read_signed(
                json,
                crate::tokenizer::MAX_TOKENIZER_JSON_BYTES,
                "tokenizer override",
                req.keys(),
            )?;
            Tokenizer::from_tokenizer_json_bytes(json, &bytes, &spec)
                .map_err(|error| json_err(json, error))
        }
        Some(json) => {
            Tokenizer::from_tokenizer_json(json, &spec).map_err(|error| json_err(json, error))
        }
        None => Tokenizer::from_spec(&spec).map_err(|error| LoadError::Tokenizer {
            path: path.to_path_buf(),
            error,
        }),
    }
}

/// Everything `run` checks of a model file, without running it: the well-known keys' types and
/// ranges ([`crate::keys`]), hyperparameters, math-changing
/// keys and tensors ([`LlamaModel::load`]), the tokenizer and its agreement with the embedding
/// table, and every chat template ([`crate::chat::check_template`]). `convert` and `quantize`
/// run it on what they wrote before it appears, `export` on its input, `inspect` for its
/// verdict: none of them passes on a file `run` would refuse.
pub fn validate(file: Arc<GgufFile>, path: &Path) -> Result<(), LoadError> {
    let problems = crate::keys::check_known_keys(&file);
    if !problems.is_empty() {
        return Err(LoadError::Keys {
            path: path.to_path_buf(),
            problems,
        });
    }
    let model = LlamaModel::load(file).map_err(|error| LoadError::Model {
        path: path.to_path_buf(),
        error,
    })?;
    let tokenizer = tokenizer_for(&model.file, path, None, &Requirement::none())?;
    if tokenizer.vocab_size() != model.config.vocab_size {
        return Err(LoadError::VocabularyMismatch {
            path: path.to_path_buf(),
            vocab: tokenizer.vocab_size(),
            rows: model.config.vocab_size,
        });
    }
    let text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_text(i))
            .unwrap_or_default()
            .to_string()
    };
    let (bos, eos) = (text(tokenizer.bos()), text(tokenizer.eos()));
    for e in model.file.metadata() {
        let name = match e.key.as_str() {
            "tokenizer.chat_template" => "gguf",
            k => match k.strip_prefix("tokenizer.chat_template.") {
                Some(n) => n,
                None => continue,
            },
        };
        let bad = |error| LoadError::ChatTemplate {
            path: path.to_path_buf(),
            key: e.key.clone(),
            error,
        };
        let source = e.value.as_str().ok_or_else(|| {
            bad(crate::chat::ChatError::Render(format!(
                "expected a string, found {:?}",
                e.value.value_type()
            )))
        })?;
        crate::chat::check_template(name, source, &bos, &eos).map_err(bad)?;
    }
    Ok(())
}

/// Load the model at `path` for running: open and validate it, cap the context at the model's,
/// check the memory estimate against what is available (unless forced), lock and repack the
/// weights as asked, and build the tokenizer, checking that it matches the embedding table.
///
/// A signature is required when `opts.require_signature` names a key or the host policy file
/// exists; the check runs before any tensor or metadata value is used.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let req = Requirement::for_host(opts.require_signature.as_deref())?;
    load_with(path, opts, &req)
}

/// [`load`] under an explicit requirement instead of this host's (tests, or a front end that
/// resolved it already).
pub fn load_with(
    path: &Path,
    opts: &LoadOptions,
    req: &Requirement,
) -> Result<LoadedModel, LoadError> {
    let t0 = Instant::now();
    if opts.n_ctx == 0 {
        return Err(LoadError::ZeroContext);
    }
    let (file, signature) = open_gguf_checked(path, opts.no_mmap, req)?;
    let mut model = LlamaModel::load(Arc::new(file)).map_err(|error| LoadError::Model {
        path: path.to_path_buf(),
        error,
    })?;
    // The config refuses a training context of 0, so n_ctx stays at least 1.
    let trained = model.config.n_ctx_train;
    let n_ctx = match opts.n_ctx > trained && opts.ctx_explicit {
        false => opts.n_ctx.min(trained),
        true if opts.force => opts.n_ctx,
        true => {
            return Err(LoadError::ContextAboveTraining {
                path: path.to_path_buf(),
                requested: opts.n_ctx,
                trained,
            })
        }
    };
    if !opts.kv_type.fits_head_dim(model.config.head_dim) {
        return Err(LoadError::KvTypeHeadDim {
            path: path.to_path_buf(),
            kv_type: opts.kv_type,
            head_dim: model.config.head_dim,
        });
    }
    // The exact path reads the map only, so packed copies would be dead weight.
    let repack = opts.repack && opts.precision == Precision::Fast;
    let estimate = MemoryEstimate::for_model(&model, n_ctx, opts.kv_type, opts.batch, repack);
    let available = available_memory();
    if let Some(avail) = available {
        if estimate.total() > avail && !opts.force {
            return Err(LoadError::TooLarge {
                path: path.to_path_buf(),
                estimate,
                n_ctx,
                available: avail,
            });
        }
    }
    // Whatever forcing says: what no machine of this size can give is refused before it is
    // allocated (an over-committed allocation is killed later, not refused).
    if let Some(machine) = machine_memory() {
        let need = estimate.anonymous(repack, opts.no_mmap);
        if need > machine {
            return Err(LoadError::BeyondMachine {
                path: path.to_path_buf(),
                estimate,
                need,
                machine,
                n_ctx,
            });
        }
    }
    if opts.mlock {
        model.file.mlock().map_err(|error| LoadError::Mlock {
            path: path.to_path_buf(),
            error,
        })?;
    }
    // The tokenizer is built on one thread while the others repack: both take about 0.1 s of
    // CPU on the demo model, and the tokenizer's part is sequential.
    let file = Arc::clone(&model.file);
    let ((repacked, repack_time), tokenizer) = rayon::join(
        || {
            let t = Instant::now();
            let bytes = if repack { model.repack() } else { Ok(0) };
            (bytes, t.elapsed())
        },
        || tokenizer_for(&file, path, opts.tokenizer_json.as_deref(), req),
    );
    let repacked_bytes = repacked.map_err(|error| LoadError::Repack {
        path: path.to_path_buf(),
        error,
    })?;
    let tokenizer = tokenizer?;
    if tokenizer.vocab_size() != model.config.vocab_size {
        return Err(LoadError::VocabularyMismatch {
            path: path.to_path_buf(),
            vocab: tokenizer.vocab_size(),
            rows: model.config.vocab_size,
        });
    }
    let pre_tokenizer_warning = tokenizer.pre_tokenizer_warning().map(str::to_string);
    Ok(LoadedModel {
        path: path.to_path_buf(),
        model,
        tokenizer,
        n_ctx,
        kv_type: opts.kv_type,
        precision: opts.precision,
        report: LoadReport {
            estimate,
            available,
            repacked_bytes,
            repack_time,
            load_time: t0.elapsed(),
            pre_tokenizer_warning,
            signature,
        },
    })
}

/// Physical cores, from /proc/cpuinfo's (physical id, core id) pairs; logical CPUs otherwise.
/// The default thread count: compute threads spin during a forward pass, so two on one core's
/// hyperthreads only contend.
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

/// Size the process-wide compute pool (rayon's global pool) at `threads`, or at the physical
/// cores when None; returns the pool's size. The thread count is the front end's decision for
/// the whole process, so only the first call takes effect: a later one keeps the first pool.
pub fn init_threads(threads: Option<usize>) -> Result<usize, LoadError> {
    let n = match threads {
        Some(0) => return Err(LoadError::ZeroThreads),
        Some(n) if n > MAX_THREADS => {
            return Err(LoadError::TooManyThreads {
                threads: n,
                max: MAX_THREADS,
            })
        }
        Some(n) => n,
        None => physical_cores(),
    };
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .spawn_handler(spawn_with_headroom)
        .build_global()
    {
        Ok(()) => {}
        // rayon gives the I/O error of a thread it could not start as the source; without
        // one, the pool already exists (an earlier call), which is fine.
        Err(e) => {
            use std::error::Error;
            if let Some(io) = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()) {
                return Err(LoadError::ThreadPool {
                    threads: n,
                    error: std::io::Error::new(io.kind(), io.to_string()),
                });
            }
        }
    }
    Ok(rayon::current_num_threads())
}

/// Address space a new compute thread must leave free, beyond its own stack.
///
/// Under an address-space limit (`ulimit -v`) a pool of many threads could otherwise map
/// stacks until almost nothing is left, and then any small allocation, in this thread or in a
/// worker that has just started, aborts the process instead of the pool reporting its error.
/// 128 MiB also covers the 128 MiB that glibc maps while it makes a worker its malloc arena.
const THREAD_HEADROOM: usize = 128 << 20;

/// rayon's default spawn (for `ThreadPoolBuilder::spawn_handler`), after checking that the
/// address space can still take the thread's stack and [`THREAD_HEADROOM`]: a reservation that
/// is never touched (so it costs no memory) and is returned at once.
pub fn spawn_with_headroom(thread: rayon::ThreadBuilder) -> std::io::Result<()> {
    // std's default stack, unless rayon was given one.
    let stack = thread.stack_size().unwrap_or(2 << 20);
    let mut probe = Vec::<u8>::new();
    if probe.try_reserve_exact(stack + THREAD_HEADROOM).is_err() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!(
                "less than {} MiB of address space is left for another thread (is `ulimit -v` set?)",
                (stack + THREAD_HEADROOM) >> 20
            ),
        ));
    }
    drop(probe);
    let mut b = std::thread::Builder::new();
    if let Some(name) = thread.name() {
        b = b.name(name.to_owned());
    }
    if let Some(size) = thread.stack_size() {
        b = b.stack_size(size);
    }
    b.spawn(|| thread.run())?;
    Ok(())
}

/// Most compute threads a pool may have, as llama.cpp's `GGML_MAX_N_THREADS`. The threads
/// spin through a forward pass, so many more than the cores only makes every pass slower.
pub const MAX_THREADS: usize = 512;
