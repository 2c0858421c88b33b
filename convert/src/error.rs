//! One error type for the whole crate. Every message names the file (and the tensor or key when
//! there is one), so a user can tell what to fix without a backtrace.

use std::path::PathBuf;

pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A required input file is absent.
    #[error("{path}: missing ({what})")]
    MissingFile { path: PathBuf, what: String },
    /// Reading an input failed.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A JSON input (config.json, tokenizer.json, ...) is malformed or disagrees with itself.
    #[error("{path}: {msg}")]
    BadJson { path: PathBuf, msg: String },
    /// The checkpoint is not a model airlock can convert.
    #[error("{path}: unsupported architecture: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    /// A safetensors file is malformed or hostile.
    #[error("{path}: bad safetensors file: {msg}")]
    BadSafetensors { path: PathBuf, msg: String },
    /// A tensor is missing, has the wrong shape or an unsupported dtype.
    #[error("{path}: tensor {tensor:?}: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// A GGUF input could not be read or is not something this command handles.
    #[error("{path}: {msg}")]
    BadGguf { path: PathBuf, msg: String },
    /// A signature was required of the input and it is missing, wrong or does not match.
    #[error(transparent)]
    Signature(#[from] airlock_engine::signature::SignatureError),
    /// Bad command-line choices (types, names).
    #[error("{0}")]
    Usage(String),
    /// Writing the output failed (disk full, file size limit, permissions...).
    #[error("writing {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The output would overwrite something it must not.
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
    /// Ctrl-C (or another cancellation) stopped the work; nothing was left at the output path.
    #[error("interrupted; nothing was written to {0}")]
    Interrupted(PathBuf),
    /// A tensor holds NaN or an infinity (refused unless the caller allows it).
    #[error(
        "tensor {tensor} holds a non-finite value ({value}) at row {row}, column {col}; \
         a model with it would compute NaN"
    )]
    NonFinite {
        tensor: String,
        row: usize,
        col: usize,
        value: f32,
    },
    /// A model airlock would not run (the engine's checks, naming the file).
    #[error("{0}")]
    Refused(String),
    /// An internal invariant broke (a bug, reported instead of panicking).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<airlock_engine::output::OutputError> for ConvertError {
    fn from(e: airlock_engine::output::OutputError) -> Self {
        use airlock_engine::output::OutputError;
        match e {
            OutputError::Refused { path, msg } => ConvertError::Output { path, msg },
            OutputError::Io { path, error } => ConvertError::Write { path, error },
        }
    }
}

impl ConvertError {
    pub(crate) fn json(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ConvertError::BadJson {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        ConvertError::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    /// The I/O variants say their OS error in the message and do not hand it on as `source()`
    /// too: the CLI prints errors with their chain (`{:#}`), which would say it twice.
    #[test]
    fn io_variants_say_their_os_error_once() {
        let io = || std::io::Error::from_raw_os_error(28);
        let cause = io().to_string();
        for e in [
            ConvertError::Io {
                path: "in.safetensors".into(),
                error: io(),
            },
            ConvertError::Write {
                path: "out.gguf".into(),
                error: io(),
            },
        ] {
            let msg = e.to_string();
            assert_eq!(msg.matches(&cause).count(), 1, "{msg}");
            assert!(e.source().is_none(), "{msg}");
        }
    }
}
