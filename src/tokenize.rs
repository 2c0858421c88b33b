//! `airlock tokenize`: ids (and pieces) for a text, comparable with llama-tokenize.

use std::process::ExitCode;

use airlock_engine::load::{open_gguf_checked, tokenizer_for};
use airlock_engine::signature::Requirement;
use anyhow::Result;

use crate::load::{load_error, SignatureArgs};

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// GGUF model file (only its vocabulary is read)
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: std::path::PathBuf,
    /// Text to tokenize
    pub text: String,
    /// Print only the ids, as [1, 2, 3]
    #[arg(long)]
    pub ids: bool,
    /// Do not add BOS even if the model's add_bos_token says to
    #[arg(long = "no-bos")]
    pub no_bos: bool,
    /// Treat special-token text (e.g. <|eot_id|>) as plain text
    #[arg(long = "no-parse-special")]
    pub no_parse_special: bool,
    /// Use this tokenizer.json instead of the GGUF's vocabulary
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub signature: SignatureArgs,
}

pub fn run(args: TokenizeArgs) -> Result<ExitCode> {
    let req = Requirement::for_host(args.signature.require_signature.as_deref())?;
    let (f, _) = open_gguf_checked(&args.model, false, &req).map_err(load_error)?;
    let tok = tokenizer_for(&f, &args.model, args.tokenizer.as_deref(), &req)?;
    let add_bos = tok.add_bos_default() && !args.no_bos;
    let ids = tok.encode(&args.text, add_bos, !args.no_parse_special)?;
    if args.ids {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("[{}]", list.join(", "));
    } else {
        for id in ids {
            let piece = tok.token_piece(id).unwrap_or_default();
            println!("{id:>6} -> '{}'", String::from_utf8_lossy(piece));
        }
    }
    Ok(ExitCode::SUCCESS)
}
