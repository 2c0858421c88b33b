//! airlock: run quantized Llama-family models on plain CPUs, offline.

use clap::{Parser, Subcommand};

mod inspect;

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
    /// Show a GGUF file's header, metadata and tensor table, and validate it
    Inspect(inspect::InspectArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
