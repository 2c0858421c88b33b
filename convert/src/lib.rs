//! Hugging Face safetensors <-> GGUF conversion for airlock.
//!
//! - [`convert()`]: a `LlamaForCausalLM` checkpoint directory (config.json, safetensors, possibly
//!   sharded, tokenizer.json, tokenizer_config.json) to one GGUF file laid out as llama.cpp's
//!   converter lays it out.
//! - [`quantize()`]: GGUF to GGUF under the same type [`policy`].
//! - [`export()`]: the way back, GGUF to a checkpoint directory.
//!
//! All three stream: tensors are read from memory maps and converted in row chunks in parallel,
//! so peak memory stays small whatever the model size; outputs appear atomically (temporary file
//! or directory, fsync, rename) and nothing is left at the output path on error or Ctrl-C.

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

/// Makes Ctrl-C stop a running conversion cleanly: the work stops at the next chunk, the
/// temporary output is removed and the command fails with [`ConvertError::Interrupted`]. A second
/// Ctrl-C exits at once (status 130), which can leave a temporary file named `.NAME.tmp.PID.N`
/// (or directory `.NAME.tmp.PID`) next to the output, never a file at the output path.
pub fn install_interrupt_handler() {
    use std::sync::atomic::Ordering;
    let _ = ctrlc::set_handler(|| {
        if stream::CANCELLED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
}
