//! GGUF container, the Llama model, tokenizer, chat templates, sampling.

pub mod gguf;
pub mod llama;
pub mod tokenizer;
pub mod sampling;
pub mod chat;
