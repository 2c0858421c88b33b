//! airlock: run quantized Llama-family models on plain CPUs, offline.

use clap::{Parser, Subcommand};

mod chat;
mod convert_cmd;
mod inspect;
mod load;
mod run;
mod tokenize;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run quantized Llama-family GGUF models on plain CPUs, offline",
    long_about = "airlock runs quantized Llama-family language models (GGUF files, as llama.cpp \
                  makes them) on CPUs with no network.\n\nStart with `scripts/fetch-models.sh`, \
                  then `airlock inspect models/SmolLM2-135M-Instruct.Q4_1.gguf`."
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
    /// Show the token ids of a text, as llama-tokenize does
    Tokenize(tokenize::TokenizeArgs),
    /// Show a GGUF file's header, metadata and tensor table, and validate it
    Inspect(inspect::InspectArgs),
    /// Convert a Hugging Face Llama checkpoint (safetensors) to GGUF
    Convert(convert_cmd::ConvertArgs),
    /// Re-type a GGUF file (f32/f16/bf16 to q8_0, q4_0, ...) under the same policy as convert
    Quantize(convert_cmd::QuantizeArgs),
    /// Write a GGUF model back out as a Hugging Face checkpoint directory
    Export(convert_cmd::ExportArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert_cmd::run_convert(args),
        Command::Quantize(args) => convert_cmd::run_quantize(args),
        Command::Export(args) => convert_cmd::run_export(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
