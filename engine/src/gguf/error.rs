//! Every way a GGUF file can be refused. Each variant names what was wrong and where (byte offset
//! from the start of the file), so a user can tell a truncated download from a hostile file.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:?} at offset 0, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} at offset 4 (airlock reads versions 2 and 3)")]
    UnsupportedVersion { version: u32 },
    #[error("file truncated while reading {what} at offset {offset}: needs {needed} bytes, {available} left")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{what} at offset {offset} is {count}, more than any file airlock reads can hold (at most {max})")]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        max: u64,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("{what} at offset {offset}: {reason}")]
    Invalid {
        what: String,
        offset: u64,
        reason: String,
    },
    #[error("metadata key {key:?} at offset {offset} has unknown value type {type_id}")]
    UnknownValueType {
        key: String,
        offset: u64,
        type_id: u32,
    },
    #[error("metadata key {key:?} at offset {offset}: arrays nested deeper than {max_depth}")]
    NestingTooDeep {
        key: String,
        offset: u64,
        max_depth: usize,
    },
    #[error("metadata key {key:?} at offset {offset} appears twice")]
    DuplicateKey { key: String, offset: u64 },
    #[error("metadata key {key:?} at offset {offset} has type {found}, expected {expected}")]
    WrongKeyType {
        key: String,
        offset: u64,
        expected: &'static str,
        found: &'static str,
    },
    #[error("tensor {name:?} (info at offset {offset}) appears twice")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("tensor {name:?} (info at offset {offset}) has unknown ggml type {type_id}")]
    UnknownTensorType {
        name: String,
        offset: u64,
        type_id: u32,
    },
    #[error("tensor {name:?} (info at offset {offset}): {reason}")]
    BadTensor {
        name: String,
        offset: u64,
        reason: String,
    },
    #[error("tensors {first:?} and {second:?} (info at offset {offset}) overlap in the data section: {detail}")]
    OverlappingTensors {
        first: String,
        second: String,
        /// Where `second`'s info record starts.
        offset: u64,
        detail: String,
    },
}

pub type Result<T> = std::result::Result<T, GgufError>;
