//! airlock: run quantized Llama-family models on plain CPUs, offline.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod batched_bench;
mod bench;
mod chat;
mod compare;
mod convert_cmd;
mod eval;
mod inspect;
mod load;
mod perplexity;
mod run;
mod serve;
mod sign;
mod synthetic;
mod tokenize;
mod verify;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run quantized Llama-family GGUF models on plain CPUs, offline",
    long_about = "airlock runs quantized Llama-family language models (GGUF files, as llama.cpp \
                  makes them) on CPUs with no network.\n\nQuickstart:\n  \
                  scripts/fetch-models.sh\n  \
                  airlock run -m models/SmolLM2-135M-Instruct.Q4_1.gguf --chat -p \"What is phishing?\"\n  \
                  airlock chat -m models/SmolLM2-135M-Instruct.Q4_1.gguf\n  \
                  airlock inspect models/SmolLM2-135M-Instruct.Q4_1.gguf"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (streams to stdout, timings to stderr)
    Run(run::RunArgs),
    /// Chat interactively; history stays in the KV cache
    Chat(chat::ChatArgs),
    /// Serve the model over HTTP with OpenAI's API (chat and text completions, streaming),
    /// batching concurrent requests into one forward pass per step
    Serve(serve::ServeArgs),
    /// Show the token ids of a text, as llama-tokenize does
    Tokenize(tokenize::TokenizeArgs),
    /// Show a GGUF file's header, metadata and tensor table, and validate it
    Inspect(inspect::InspectArgs),
    /// Convert a Hugging Face Llama checkpoint (safetensors) to GGUF
    Convert(convert_cmd::ConvertArgs),
    /// Re-type a GGUF file (f32/f16/bf16 to q4_k_m, q8_0, ...) under the same policy as convert
    Quantize(convert_cmd::QuantizeArgs),
    /// Write a GGUF model back out as a Hugging Face checkpoint directory
    Export(convert_cmd::ExportArgs),
    /// Measure prompt and generation speed, like llama-bench
    Bench(bench::BenchArgs),
    /// Measure many sequences decoded together (one forward pass for all), like llama-batched-bench
    #[command(name = "batched-bench")]
    BatchedBench(batched_bench::BatchedBenchArgs),
    /// Measure a model's perplexity on a text, as llama-perplexity does
    Perplexity(perplexity::PerplexityArgs),
    /// Make a minisign key pair for signing models (NAME.pub, NAME.key)
    Keygen(sign::KeygenArgs),
    /// Sign a model: a minisign signature and a signed per-tensor manifest beside it
    Sign(sign::SignArgs),
    /// Check a model against its signed manifest, naming any tensor whose bytes differ
    Verify(verify::VerifyArgs),
    /// Print a model's SHA-256 digests (whole file, and each tensor and the metadata)
    Hash(verify::HashArgs),
    /// Score multiple-choice tasks (JSONL, CTIBench cti-mcq.tsv, HellaSwag) by log-likelihood
    Eval(eval::EvalArgs),
    /// Compare a model with its quantized variants: size, memory, perplexity, KL divergence,
    /// accuracy and speed in one report (report.md, report.json, report.svg)
    Compare(compare::CompareArgs),
}

fn main() -> std::process::ExitCode {
    use airlock_engine::render;
    // The hidden subcommand: a chat-template render worker (engine::render), started by this
    // very binary. Checked before anything else so the worker stays small and single-threaded.
    let mut argv = std::env::args_os();
    if argv.nth(1).as_deref() == Some(std::ffi::OsStr::new(render::WORKER_ARG)) {
        return render::worker_main(&argv.collect::<Vec<_>>());
    }
    // Every chat template from a file renders in such a worker, with a bounded address space.
    // /proc/self/exe still runs this binary if its file was replaced since it started.
    let exe = if cfg!(target_os = "linux") {
        std::path::PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().unwrap_or_else(|_| "airlock".into())
    };
    render::install(
        exe,
        vec![render::WORKER_ARG.into()],
        render::DEFAULT_MEMORY_LIMIT,
    );
    // The version line names the kernel path this CPU (or AIRLOCK_SIMD) selects.
    let simd = match airlock_kernels::simd::simd_path() {
        Ok(p) => format!("kernels: {}", p.name()),
        Err(e) => format!("kernels: {e}"),
    };
    let version = format!("{} ({simd})", env!("CARGO_PKG_VERSION"));
    // Leaked once: clap keeps &'static strings and this lives for the whole process.
    let version: &'static str = Box::leak(version.into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert_cmd::run_convert(args),
        Command::Quantize(args) => convert_cmd::run_quantize(args),
        Command::Export(args) => convert_cmd::run_export(args),
        Command::Bench(args) => bench::run(args),
        Command::BatchedBench(args) => batched_bench::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Keygen(args) => sign::run_keygen(args),
        Command::Sign(args) => sign::run_sign(args),
        Command::Verify(args) => verify::run_verify(args),
        Command::Hash(args) => verify::run_hash(args),
        Command::Eval(args) => eval::run(args),
        Command::Compare(args) => compare::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
