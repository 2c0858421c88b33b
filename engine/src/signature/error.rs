use std::path::PathBuf;

/// Why a file's signature could not be checked, or did not hold. Each variant names the file it
/// is about; none names a front end's option, so the CLI and the server can add their own hints.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A key, signature or manifest file that cannot be read (missing, unreadable, too large).
    #[error("cannot read {what} {}: {error}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// A key, signature or manifest file that is not what it should be.
    #[error("{} is not a valid {what}: {reason}", path.display())]
    Malformed {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The model has no signed manifest beside it.
    #[error(
        "{} is not signed: there is no manifest {} beside it{}",
        model.display(),
        manifest.display(),
        if *whole_file_only { " (only a whole-file signature, which loading does not use)" } else { "" }
    )]
    NotSigned {
        model: PathBuf,
        manifest: PathBuf,
        /// A `.minisig` of the whole file exists.
        whole_file_only: bool,
    },
    /// The signature was made with another key.
    #[error(
        "{} was made by another key than {} ({})",
        signature.display(),
        key.display(),
        key_comment
    )]
    WrongKey {
        signature: PathBuf,
        key: PathBuf,
        key_comment: String,
    },
    /// The signature does not verify: the signed file changed, or the signature is of another file.
    #[error(
        "{} does not verify {} with {}: the file changed after it was signed, or the signature \
         is of another file",
        signature.display(),
        file.display(),
        key.display()
    )]
    Invalid {
        signature: PathBuf,
        file: PathBuf,
        key: PathBuf,
    },
    /// An old-style signature of the raw file rather than of its BLAKE2b hash.
    #[error(
        "{} is a legacy (not prehashed) minisign signature, which airlock refuses; sign again \
         with minisign 0.8 or later or with airlock",
        signature.display()
    )]
    Legacy { signature: PathBuf },
    /// The model's size differs from the size the manifest signed.
    #[error(
        "{} is {actual} bytes but its signed manifest says {signed}: {detail}",
        model.display()
    )]
    SizeMismatch {
        model: PathBuf,
        actual: u64,
        signed: u64,
        detail: String,
    },
    /// Bytes differ from the signed digests. `ranges` names each range that differs.
    #[error(
        "{} does not match its signed manifest: {} of {total} ranges differ:\n  {}",
        model.display(),
        ranges.len(),
        shown_list(ranges)
    )]
    Mismatch {
        model: PathBuf,
        ranges: Vec<String>,
        total: usize,
    },
    /// The whole-file SHA-256 in the manifest differs from the file's (`--full`).
    #[error(
        "{}: the whole-file SHA-256 is {actual} but the signed manifest says {signed}",
        model.display()
    )]
    WholeFileMismatch {
        model: PathBuf,
        actual: String,
        signed: String,
    },
    /// The bytes match, but the manifest does not describe this file's tensor table.
    #[error(
        "{} does not describe the tensor table of {}: {detail}",
        manifest.display(),
        model.display()
    )]
    TableMismatch {
        manifest: PathBuf,
        model: PathBuf,
        detail: String,
    },
    /// The host policy file exists but cannot be trusted or read: every load is refused until
    /// it is fixed or removed.
    #[error(
        "host signature policy {}: {reason}; every model load is refused until it is fixed",
        path.display()
    )]
    Policy { path: PathBuf, reason: String },
}

/// Mismatching ranges, one a line, at most 20 of them.
fn shown_list(ranges: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = ranges
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n  ");
    if ranges.len() > SHOWN {
        s.push_str(&format!("\n  ... and {} more", ranges.len() - SHOWN));
    }
    s
}
