//! Hugging Face safetensors <-> GGUF conversion for airlock.
//!
//! - [`convert()`]: a `LlamaForCausalLM` checkpoint directory (config.json, safetensors, possibly
//!   sharded, tokenizer.json, tokenizer_config.json) to one GGUF file laid out as llama.cpp's
//!   converter lays it out.
//! - [`quantize()`]: GGUF to GGUF under the same type [`policy`].
//! - [`export()`]: the way back, GGUF to a checkpoint directory.
//!
//! All three stream: tensors are read from memory maps and converted in row chunks in parallel,
//! so peak memory stays small whatever the model size; outputs go through the engine's output
//! helper ([`airlock_engine::output`]: checked path, temporary file or directory, fsync, rename),
//! and nothing is left at the output path on error or on SIGINT, SIGTERM or SIGHUP
//! ([`airlock_engine::signals`]: the first signal stops the work at the next chunk, a second one
//! exits at once after removing the temporary output).

pub mod checkpoint;
pub mod convert;
mod error;
pub mod export;
pub mod policy;
pub mod quantize;
pub mod rope;
pub mod stream;
pub mod vocab;

pub use convert::{convert, ConvertOptions, Report, ROPE_SCALING_PREFIX};
pub use error::{ConvertError, Result};
pub use export::{export, ExportDtype, ExportOptions, DEFAULT_SHARD_BYTES};
pub use policy::{parse_tensor_type, ModelFacts, OutType, Policy};
pub use quantize::{quantize, QuantizeOptions};
