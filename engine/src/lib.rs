//! GGUF container, the Llama model, tokenizer, chat templates, sampling.
//!
//! - [`gguf`]: the hardened zero-copy container reader and the streaming writer.
//! - [`llama`]: hyperparameters, weights as views into the map, the forward pass.
//! - [`tokenizer`]: byte-level BPE built from GGUF metadata, ids equal to llama.cpp's.
//! - [`chat`]: sandboxed chat templates that keep user text apart from control tokens.
//! - [`render`]: untrusted chat templates rendered in a child process with a bounded address
//!   space (a binary opts in with [`render::install`]).
//! - [`sampling`]: llama.cpp's sampler chain and flag semantics.
//! - [`generate`]: per-request generation state stepped by its owner (sample, stop checks,
//!   text to emit), and the prompt-then-sample loop over one session built on it.
//! - [`keys`]: the well-known metadata keys and the type and range each must have.
//! - [`load`]: loading a model to run, as every front end does it: open, memory check,
//!   repack, tokenizer.
//! - [`bounded`]: reading whole files without trusting their reported size.
//! - [`signature`]: signed per-tensor manifests, checked against the mapped bytes on load.
//! - [`perplexity`]: llama-perplexity's measurement, several chunks per forward pass.
//! - [`kld`]: KL divergence against a base model, in llama-perplexity's base-file format.
//! - [`memory`]: the memory a run will need, checked before loading.
//! - [`output`]: the one way outputs are written (checked path, temporary file, fsync, rename).
//! - [`signals`]: the process-wide SIGINT/SIGTERM/SIGHUP handler outputs and the server share.

pub mod bounded;
pub mod chat;
pub mod generate;
pub mod gguf;
pub mod keys;
pub mod kld;
pub mod llama;
pub mod load;
pub mod memory;
pub mod output;
pub mod perplexity;
pub mod render;
pub mod sampling;
pub mod signals;
pub mod signature;
pub mod tokenizer;
