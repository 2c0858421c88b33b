//! Signed models. `airlock sign` writes, beside `MODEL`:
//! - `MODEL.manifest.json`: the size, the whole-file SHA-256 and one SHA-256 per byte range (the
//!   metadata, each tensor, the padding), ranges covering every byte ([`Manifest`]);
//! - `MODEL.manifest.json.minisig`: a minisign signature of the manifest;
//! - `MODEL.minisig`: a minisign signature of the whole file, for the `minisign` tool.
//!
//! A load that requires a signature ([`Requirement`]) checks the manifest's signature, then
//! hashes the ranges of the bytes as mapped (or as read, with `--no-mmap`), in parallel, before
//! the GGUF reader parses a byte of them ([`crate::load::open_gguf_checked`]). The model then
//! runs from those same bytes. Not covered: a process that can write the file while it is
//! mapped changes what the map sees after the check; read-only media or `--no-mmap` (which
//! checks the copy it runs from) close that gap.
//!
//! The cryptography is `minisign-verify`'s (Ed25519, BLAKE2b) and `sha2`'s (SHA-256, with the
//! CPU's SHA extensions where it has them).

mod error;
mod keys;
mod manifest;
mod policy;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use error::SignatureError;
pub use keys::{SignatureFile, TrustedKey, MAX_KEY_FILE_BYTES, MAX_SIGNATURE_FILE_BYTES};
pub use manifest::{
    hex, layout, sha256, Manifest, Range, RangeKind, Sha256Digest, MANIFEST_FORMAT,
    MAX_MANIFEST_BYTES,
};
pub use policy::{HostPolicy, Requirement, POLICY_PATH};

use crate::bounded::read_bounded;
use crate::gguf::{GgufFile, OpenOptions};
use crate::load::{gguf_error, LoadError};

/// `MODEL.manifest.json`.
pub fn manifest_path(model: &Path) -> PathBuf {
    with_suffix(model, ".manifest.json")
}

/// `FILE.minisig`, where minisign looks for a file's signature.
pub fn signature_path(file: &Path) -> PathBuf {
    with_suffix(file, ".minisig")
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A manifest whose signature and digests held.
#[derive(Clone, Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// The trusted comment of the manifest's signature (when and what was signed).
    pub trusted_comment: String,
    /// Time spent hashing the ranges.
    pub hash_time: Duration,
}

impl Verified {
    /// Check that the manifest describes `file`'s tensor table (after the bytes matched).
    pub fn check_layout(&self, model: &Path, file: &GgufFile) -> Result<(), SignatureError> {
        self.manifest.check_layout(&self.manifest_path, model, file)
    }
}

/// Check `bytes`, the content of `model`, against the manifest beside it: its signature by every
/// key in `keys` (at least one), then every range's digest. The manifest is parsed only once its
/// signature holds, so an attacker's JSON never reaches the parser.
pub fn check_signed_bytes(
    model: &Path,
    bytes: &[u8],
    keys: &[TrustedKey],
) -> Result<Verified, SignatureError> {
    let mpath = manifest_path(model);
    let text = match read_bounded(&mpath, MAX_MANIFEST_BYTES) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SignatureError::NotSigned {
                model: model.to_path_buf(),
                manifest: mpath,
                whole_file_only: signature_path(model).is_file(),
            })
        }
        Err(error) => {
            return Err(SignatureError::Read {
                what: "airlock manifest",
                path: mpath,
                error,
            })
        }
    };
    let sig = SignatureFile::read(&signature_path(&mpath))?;
    for key in keys {
        key.verify(&sig, &mpath, &text)?;
    }
    let manifest = Manifest::parse(&mpath, &text)?;
    let t = Instant::now();
    manifest.check_bytes(model, bytes)?;
    Ok(Verified {
        manifest,
        manifest_path: mpath,
        trusted_comment: sig.trusted_comment().to_string(),
        hash_time: t.elapsed(),
    })
}

/// The bytes of a small file (a tokenizer.json override), at most `max`, checked against
/// `FILE.minisig` by every key in `keys` before they are returned: read once, so what was
/// checked is what is used.
pub fn read_signed(
    path: &Path,
    max: u64,
    what: &'static str,
    keys: &[TrustedKey],
) -> Result<Vec<u8>, SignatureError> {
    let bytes = read_bounded(path, max).map_err(|error| SignatureError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })?;
    let sig = SignatureFile::read(&signature_path(path))?;
    for key in keys {
        key.verify(&sig, path, &bytes)?;
    }
    Ok(bytes)
}

/// What `airlock verify` checked.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub size: u64,
    /// The signed manifest, when the file has one.
    pub manifest: Option<Verified>,
    /// The whole-file SHA-256 was computed and matched the manifest's (`full`).
    pub whole_sha256: Option<Sha256Digest>,
    /// The trusted comment of `FILE.minisig`, when it was checked.
    pub whole_file_signature: Option<String>,
    pub elapsed: Duration,
}

/// Verify `path` with `key`: its signed manifest when it has one (signature, every range, the
/// tensor table), and with `full` also the whole-file SHA-256 and `FILE.minisig` (BLAKE2b of the
/// whole file, single-threaded, as minisign computes it). A file with only a `.minisig` (signed
/// by the `minisign` tool, or not a GGUF file) is checked against that.
pub fn verify_file(path: &Path, key: &TrustedKey, full: bool) -> Result<VerifyReport, LoadError> {
    let t0 = Instant::now();
    let source = GgufFile::read_source(path, &OpenOptions { no_mmap: false })
        .map_err(|e| gguf_error(path, e))?;
    let bytes: &[u8] = &source;
    let size = bytes.len() as u64;
    let keys = std::slice::from_ref(key);
    let sig_path = signature_path(path);
    let has_manifest = manifest_path(path).exists();
    if !has_manifest && !sig_path.exists() {
        return Err(SignatureError::NotSigned {
            model: path.to_path_buf(),
            manifest: manifest_path(path),
            whole_file_only: false,
        }
        .into());
    }
    let manifest = if has_manifest {
        Some(check_signed_bytes(path, bytes, keys)?)
    } else {
        None
    };
    let check_whole = full || manifest.is_none();
    let (whole_sha256, whole_file_signature) = rayon::join(
        || -> Result<Option<Sha256Digest>, SignatureError> {
            match &manifest {
                Some(v) if full => {
                    let d = sha256(bytes);
                    if d != v.manifest.sha256 {
                        return Err(SignatureError::WholeFileMismatch {
                            model: path.to_path_buf(),
                            actual: hex(&d),
                            signed: hex(&v.manifest.sha256),
                        });
                    }
                    Ok(Some(d))
                }
                _ => Ok(None),
            }
        },
        || -> Result<Option<String>, SignatureError> {
            if !check_whole {
                return Ok(None);
            }
            let sig = SignatureFile::read(&sig_path)?;
            key.verify(&sig, path, bytes)?;
            Ok(Some(sig.trusted_comment().to_string()))
        },
    );
    let (whole_sha256, whole_file_signature) = (whole_sha256?, whole_file_signature?);
    if let Some(v) = &manifest {
        // The bytes are the signed ones; the manifest must also describe them.
        let file = GgufFile::from_source(source).map_err(|e| gguf_error(path, e))?;
        v.check_layout(path, &file)?;
    }
    Ok(VerifyReport {
        size,
        manifest,
        whole_sha256,
        whole_file_signature,
        elapsed: t0.elapsed(),
    })
}
