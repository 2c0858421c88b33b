//! Which keys a load requires: the host's policy key, enforced whatever the command line says,
//! and the key the user asks for (`--require-signature`, or its environment default).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::keys::{TrustedKey, MAX_KEY_FILE_BYTES};
use super::SignatureError;

/// Where the host policy key lives. A build for a distribution that keeps configuration
/// elsewhere sets `AIRLOCK_POLICY_PATH` at build time; nothing at run time can move it.
pub const POLICY_PATH: &str = match option_env!("AIRLOCK_POLICY_PATH") {
    Some(p) => p,
    None => "/etc/airlock/require-signature.pub",
};

/// The host policy: if the key file at `path` exists, every load must be signed by that key.
/// The file and its directory must belong to `owner` (root on a real host) and be writable by
/// no one else; otherwise anyone who could write them could swap the key, so every load is
/// refused rather than the policy silently dropped.
#[derive(Clone, Debug)]
pub struct HostPolicy {
    pub path: PathBuf,
    pub owner: u32,
}

impl HostPolicy {
    /// This host's policy: [`POLICY_PATH`], owned by root.
    pub fn system() -> Self {
        HostPolicy {
            path: PathBuf::from(POLICY_PATH),
            owner: 0,
        }
    }

    /// The policy's key; None when the file does not exist. A file that exists but cannot be
    /// read, or that its owner or mode makes untrustworthy, is an error (fail closed).
    pub fn key(&self) -> Result<Option<TrustedKey>, SignatureError> {
        let bad = |reason: String| SignatureError::Policy {
            path: self.path.clone(),
            reason,
        };
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(format!("cannot open it: {e}"))),
        };
        // The checks are on the opened file (fstat), so it cannot be swapped between the
        // check and the read.
        let meta = file
            .metadata()
            .map_err(|e| bad(format!("cannot stat it: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        self.check_owner_and_mode("the file", meta.uid(), meta.mode())
            .map_err(bad)?;
        // The directory too: whoever can write it can replace the file.
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dmeta = std::fs::metadata(&dir)
            .map_err(|e| bad(format!("cannot stat its directory {}: {e}", dir.display())))?;
        self.check_owner_and_mode(
            &format!("its directory {}", dir.display()),
            dmeta.uid(),
            dmeta.mode(),
        )
        .map_err(bad)?;
        let mut bytes = Vec::new();
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read it: {e}")))?;
        if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(bad(format!(
                "holds more than the limit of {MAX_KEY_FILE_BYTES} bytes"
            )));
        }
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        TrustedKey::from_text(&self.path, &text)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    fn check_owner_and_mode(&self, what: &str, uid: u32, mode: u32) -> Result<(), String> {
        if uid != self.owner {
            return Err(format!(
                "{what} belongs to uid {uid}, not {}",
                if self.owner == 0 {
                    "root".to_string()
                } else {
                    format!("uid {}", self.owner)
                }
            ));
        }
        if mode & 0o022 != 0 {
            return Err(format!(
                "{what} is writable by its group or by others (mode {:o}); make it 0644 (a \
                 directory 0755)",
                mode & 0o7777
            ));
        }
        Ok(())
    }
}

/// The keys a load must find signatures by: empty when nothing requires one.
#[derive(Clone, Debug, Default)]
pub struct Requirement {
    keys: Vec<TrustedKey>,
}

impl Requirement {
    /// No signature required.
    pub fn none() -> Self {
        Requirement::default()
    }

    /// The requirement on this host: the system policy's key, if there is one, and `user_key`.
    pub fn for_host(user_key: Option<&Path>) -> Result<Self, SignatureError> {
        Self::resolve(user_key, &HostPolicy::system())
    }

    /// The requirement under `policy` (tests use a policy in a temporary directory).
    pub fn resolve(user_key: Option<&Path>, policy: &HostPolicy) -> Result<Self, SignatureError> {
        let mut keys = Vec::new();
        if let Some(k) = policy.key()? {
            keys.push(k);
        }
        if let Some(path) = user_key {
            let k = TrustedKey::read(path)?;
            if !keys.iter().any(|p| p.same_key(&k)) {
                keys.push(k);
            }
        }
        Ok(Requirement { keys })
    }

    /// Exactly these keys.
    pub fn from_keys(keys: Vec<TrustedKey>) -> Self {
        Requirement { keys }
    }

    pub fn is_required(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }
}
