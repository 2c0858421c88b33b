//! The GGUF container: a hardened zero-copy reader, a streaming writer, and the metadata model.
//!
//! Layout (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64,
//! metadata entries (key string, value type u32, value), tensor infos (name, n_dims u32,
//! dims u64 innermost first, ggml type u32, data offset u64), padding to `general.alignment`
//! (default 32), then the tensor data, each tensor at its offset from the data section's start.

mod error;
mod ftype;
mod reader;
mod value;
mod writer;

pub use error::{GgufError, Result};
pub use ftype::{FileType, FILE_TYPES};
pub use reader::{
    GgufFile, MetadataEntry, OpenOptions, Source, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC,
    MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KEY_LEN, MAX_PLAUSIBLE_BYTES, MAX_STRING_LEN,
    MAX_TENSOR_NAME,
};
pub use value::{Array, StrArray, Value, ValueType};
pub use writer::{GgufWriter, TensorSpec, WriteError, GGUF_VERSION};
