//! `airlock inspect`: a careful gguf-dump (filled by the GGUF work).

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// GGUF file to inspect
    pub file: PathBuf,
    /// Print a stable JSON document instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let f = airlock_engine::gguf::GgufFile::open(&args.file)?;
    println!("{f:?}");
    Ok(ExitCode::SUCCESS)
}
