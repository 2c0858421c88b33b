//! Minisign public keys and signature files, read as hostile input: bounded, one error naming
//! the file for anything that is not a key or a signature. The cryptography is
//! `minisign-verify`'s.

use std::path::{Path, PathBuf};

use minisign_verify::{Error as MsError, PublicKey, Signature};

use super::SignatureError;
use crate::bounded::read_bounded;

/// A minisign public key file is two short lines (about 100 bytes).
pub const MAX_KEY_FILE_BYTES: u64 = 4 << 10;
/// A signature file is four lines; minisign caps the trusted comment at 8 KiB.
pub const MAX_SIGNATURE_FILE_BYTES: u64 = 16 << 10;

/// Read `path` as UTF-8 text of at most `max` bytes; `what` names it in errors.
pub(crate) fn read_text(
    path: &Path,
    max: u64,
    what: &'static str,
) -> Result<String, SignatureError> {
    let bytes = read_bounded(path, max).map_err(|error| SignatureError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })?;
    String::from_utf8(bytes).map_err(|_| SignatureError::Malformed {
        what,
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })
}

/// A public key whose signatures a load accepts, with the file it came from.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    path: PathBuf,
    key: PublicKey,
    /// The key file's first line (minisign writes the key id there), for messages.
    comment: String,
}

impl TrustedKey {
    /// Read a minisign public key file (`NAME.pub`: an untrusted comment line, then the key in
    /// base64).
    pub fn read(path: &Path) -> Result<Self, SignatureError> {
        let text = read_text(path, MAX_KEY_FILE_BYTES, "minisign public key")?;
        Self::from_text(path, &text)
    }

    pub(crate) fn from_text(path: &Path, text: &str) -> Result<Self, SignatureError> {
        let bad = |reason: &str| SignatureError::Malformed {
            what: "minisign public key",
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        let mut lines = text.lines();
        let comment = lines.next().unwrap_or_default();
        if !comment.starts_with("untrusted comment:") {
            return Err(bad(
                "the first line must start with `untrusted comment:` (is this a secret key, or \
                 a signature?)",
            ));
        }
        let encoded = lines
            .next()
            .ok_or_else(|| bad("the key line after the comment is missing"))?;
        let key = PublicKey::from_base64(encoded.trim()).map_err(|e| match e {
            MsError::UnsupportedAlgorithm => bad("not an Ed25519 minisign key"),
            _ => bad("the key line is not a base64 minisign public key"),
        })?;
        Ok(TrustedKey {
            path: path.to_path_buf(),
            key,
            comment: comment
                .trim_start_matches("untrusted comment:")
                .trim()
                .to_string(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key file's comment (minisign writes `minisign public key ID` there).
    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// Check that `signature` is this key's signature of `data` (the bytes of `file`, named in
    /// errors). Only prehashed signatures (minisign's default since 0.8) are accepted.
    pub fn verify(
        &self,
        signature: &SignatureFile,
        file: &Path,
        data: &[u8],
    ) -> Result<(), SignatureError> {
        self.key
            .verify(data, &signature.sig, false)
            .map_err(|e| match e {
                MsError::UnexpectedKeyId => SignatureError::WrongKey {
                    signature: signature.path.clone(),
                    key: self.path.clone(),
                    key_comment: self.comment.clone(),
                },
                MsError::UnexpectedAlgorithm | MsError::UnsupportedLegacyMode => {
                    SignatureError::Legacy {
                        signature: signature.path.clone(),
                    }
                }
                _ => SignatureError::Invalid {
                    signature: signature.path.clone(),
                    file: file.to_path_buf(),
                    key: self.path.clone(),
                },
            })
    }

    /// Same key material (a host policy key also given on the command line is checked once).
    /// Keys are built with `from_base64`, which keeps no comment, so equality is the key's.
    pub(crate) fn same_key(&self, other: &TrustedKey) -> bool {
        self.key == other.key
    }
}

/// A minisign signature file (`FILE.minisig`).
#[derive(Clone)]
pub struct SignatureFile {
    pub path: PathBuf,
    sig: Signature,
}

impl SignatureFile {
    /// Read `path`; a missing file is `SignatureError::Read` with `NotFound`.
    pub fn read(path: &Path) -> Result<Self, SignatureError> {
        let text = read_text(path, MAX_SIGNATURE_FILE_BYTES, "minisign signature")?;
        let bad = |reason: &str| SignatureError::Malformed {
            what: "minisign signature",
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        if !text.starts_with("untrusted comment:") {
            return Err(bad("the first line must start with `untrusted comment:`"));
        }
        let sig = Signature::decode(&text).map_err(|e| match e {
            MsError::UnsupportedAlgorithm => bad("not an Ed25519 minisign signature"),
            _ => bad(
                "expected four lines: untrusted comment, signature (base64), `trusted comment: ...`, \
                 global signature (base64)",
            ),
        })?;
        Ok(SignatureFile {
            path: path.to_path_buf(),
            sig,
        })
    }

    /// The signed comment (minisign: `timestamp:...\tfile:...`), trustworthy once verified.
    pub fn trusted_comment(&self) -> &str {
        self.sig.trusted_comment()
    }
}
