//! Choosing a quantization: how much a model loses against its base, on your tasks, at what
//! cost in memory and speed.
//!
//! - [`tasks`]: multiple-choice task files (airlock's JSONL, CTIBench's `cti-mcq.tsv`,
//!   llama-perplexity's HellaSwag text), read as untrusted input.
//! - [`eval`]: scoring them by log-likelihood, options batched over a shared prefix.
//! - [`compare`]: a base and its variants measured side by side (perplexity, KL divergence,
//!   accuracy, size, memory, speed), variants made on the fly when asked, and the report
//!   (`report.md`, `report.json`, `report.svg`).

pub mod chart;
pub mod compare;
pub mod eval;
pub mod tasks;
