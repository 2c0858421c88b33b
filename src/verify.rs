//! `airlock verify` and `airlock hash`: thin over the engine's `signature` module.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use airlock_engine::memory::human_bytes;
use airlock_engine::signature::{hex, verify_file, Manifest, TrustedKey};
use anyhow::{anyhow, Result};

use crate::load::load_error;

#[derive(clap::Args)]
#[command(
    after_help = "Checks MODEL.manifest.json's signature (MODEL.manifest.json.minisig) and \
    every byte range it lists, naming each tensor (or the metadata) whose bytes differ; the \
    exit status is non-zero on any failure. --full also checks the whole-file SHA-256 and \
    MODEL.minisig (BLAKE2b of the whole file on one thread, as minisign computes it: slower). \
    A file with only MODEL.minisig (signed by the `minisign` tool) is checked against that.\n\n\
    Example:\n  airlock verify model.gguf --pubkey release.pub --full"
)]
pub struct VerifyArgs {
    /// File to verify
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// minisign public key the signatures must be made by
    #[arg(short = 'p', long = "pubkey", value_name = "KEY.pub")]
    pub pubkey: PathBuf,
    /// Also check the whole-file SHA-256 and MODEL.minisig
    #[arg(long)]
    pub full: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Prints the whole-file SHA-256 (the digest Hugging Face lists, in \
    sha256sum's format), then the SHA-256 of each byte range and what it holds. \
    --json prints the manifest exactly as `airlock sign` writes it, unsigned."
)]
pub struct HashArgs {
    /// GGUF file
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Print the manifest JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run_verify(args: VerifyArgs) -> Result<ExitCode> {
    let key = TrustedKey::read(&args.pubkey)?;
    let r = verify_file(&args.model, &key, args.full).map_err(load_error)?;
    let secs = r.elapsed.as_secs_f64();
    println!(
        "{}: verified with {} ({})",
        args.model.display(),
        args.pubkey.display(),
        key.comment()
    );
    if let Some(v) = &r.manifest {
        println!(
            "  manifest {}: signed {}",
            v.manifest_path.display(),
            v.trusted_comment.replace('\t', " ")
        );
        let tensors = v
            .manifest
            .ranges
            .iter()
            .filter(|r| matches!(r.kind, airlock_engine::signature::RangeKind::Tensor { .. }))
            .count();
        let hs = v.hash_time.as_secs_f64();
        println!(
            "  all {} ranges match (metadata, {tensors} tensors, padding): {} hashed in {hs:.2} s \
             ({:.2} GB/s)",
            v.manifest.ranges.len(),
            human_bytes(r.size),
            r.size as f64 / hs.max(1e-9) / 1e9
        );
    } else {
        println!("  no manifest: checked the whole-file signature only");
    }
    if let Some(d) = &r.whole_sha256 {
        println!("  whole-file SHA-256 matches: {}", hex(d));
    }
    if let Some(c) = &r.whole_file_signature {
        println!(
            "  whole-file signature matches: signed {}",
            c.replace('\t', " ")
        );
    }
    println!("ok ({secs:.2} s)");
    Ok(ExitCode::SUCCESS)
}

pub fn run_hash(args: HashArgs) -> Result<ExitCode> {
    let t0 = Instant::now();
    let file = airlock_engine::load::open_gguf(&args.model, false).map_err(load_error)?;
    let name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("{} names no file", args.model.display()))?;
    let m = Manifest::compute(&name, &file);
    drop(file);
    if args.json {
        print!("{}", m.to_json());
    } else {
        println!("{}  {}", hex(&m.sha256), args.model.display());
        for (i, r) in m.ranges.iter().enumerate() {
            println!("{}  {}", hex(&r.sha256), m.describe(i));
        }
    }
    eprintln!(
        "hashed {} in {:.2} s",
        human_bytes(m.size),
        t0.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
