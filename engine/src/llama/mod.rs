//! The Llama architecture as GGUF describes it (`general.architecture = llama`).
//!
//! - [`config`]: hyperparameters from `llama.*` metadata, cross-checked.
//! - [`weights`]: every matrix as a view into the GGUF map.
//! - [`forward`]: the forward pass over a batch of sequences, each with its own [`KvCache`]
//!   (fast or exact); [`Session`] is the one-sequence case.
//! - [`reference`]: a slow, plain, one-token-at-a-time forward pass that the fast one is tested
//!   against.

mod config;
mod forward;
pub mod reference;
mod weights;

use std::sync::Arc;

pub use config::{LlamaConfig, MAX_HEAD_DIM};
pub use forward::{
    forward_batch, BatchSeq, KvCache, KvType, Logits, Precision, Session, Workspace,
};
pub use weights::{LayerWeights, LlamaWeights, Weight};

use crate::gguf::GgufFile;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture {0:?}: airlock runs llama-architecture models")]
    UnsupportedArchitecture(String),
    #[error("metadata key {0} is missing")]
    MissingKey(String),
    #[error("metadata key {key}: {reason}")]
    BadKey { key: String, reason: String },
    #[error("tensor {0} is missing")]
    MissingTensor(String),
    #[error("tensor {tensor}: {reason}")]
    BadTensor { tensor: String, reason: String },
    /// Every matrix whose type airlock cannot compute, each with its type, in file order.
    #[error("{}", unsupported_message(.0))]
    UnsupportedTensorTypes(Vec<(String, &'static str)>),
    #[error("context is full: {needed} tokens needed, the context holds {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error(
        "KV cache of {cache_layers} layers x {cache_kv_dim} does not fit this model \
         ({n_layers} layers x {kv_dim})"
    )]
    CacheMismatch {
        cache_layers: usize,
        cache_kv_dim: usize,
        n_layers: usize,
        kv_dim: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    InvalidToken { id: u32, vocab_size: usize },
    #[error(transparent)]
    Kernel(#[from] airlock_kernels::KernelError),
}

/// "N tensors have types airlock cannot compute yet (type not supported yet): a (T), b (T)".
fn unsupported_message(list: &[(String, &'static str)]) -> String {
    let names: Vec<String> = list.iter().map(|(t, ty)| format!("{t} ({ty})")).collect();
    let (n, s) = (list.len(), if list.len() == 1 { "" } else { "s" });
    format!(
        "{n} tensor{s} with a type airlock cannot compute yet (type not supported yet): {}",
        names.join(", ")
    )
}

/// A loaded model: the mapped file plus the validated layout of its weights.
pub struct LlamaModel {
    pub file: Arc<GgufFile>,
    pub config: LlamaConfig,
    pub weights: LlamaWeights,
    /// RoPE inverse frequencies, rope_freqs factors applied.
    pub rope_inv_freq: Vec<f32>,
}

impl LlamaModel {
    pub fn load(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(&file)?;
        let weights = LlamaWeights::from_gguf(&file, &config)?;
        let rope_inv_freq = airlock_kernels::ops::rope_inv_freqs(
            config.rope_base,
            config.rope_dim,
            weights.rope_freqs.as_deref(),
            config.rope_freq_scale,
        );
        Ok(LlamaModel {
            file,
            config,
            weights,
            rope_inv_freq,
        })
    }

    /// Copies the Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K matrices into the packed layout when the active SIMD path has
    /// packed kernels (the x86 paths from AVX2 up); returns the bytes allocated (0 when it has
    /// none: scalar, NEON).
    pub fn repack(&mut self) -> Result<u64, ModelError> {
        match airlock_kernels::packed::packed_kernels() {
            Some(ks) => self.weights.repack(&self.file, ks),
            None => Ok(0),
        }
    }

    /// Bytes of [`Self::repack`]'s copies that duplicate a tensor the map must still serve: a
    /// tied output head's (the embedding lookup keeps reading the file). The other packed copies
    /// replace their file pages, which the kernel may then drop.
    pub fn repack_extra_bytes(&self) -> u64 {
        let w = &self.weights;
        let packs = airlock_kernels::packed::packed_kernels().is_some();
        if packs && w.output_tied && airlock_kernels::packed::can_pack(w.output.ty) {
            w.output.n_bytes() as u64
        } else {
            0
        }
    }

    /// Bytes a KV cache of `n_ctx` positions takes (K and V, every layer; the positions
    /// rounded up to whole tiles of 32, as allocated).
    pub fn kv_cache_bytes(&self, n_ctx: usize, kv: KvType) -> u64 {
        let c = &self.config;
        airlock_kernels::attention::KvStore::bytes_for(
            kv,
            c.n_layers,
            c.n_head_kv,
            c.head_dim,
            n_ctx,
        )
    }

    /// Bytes of K and V one position takes in every layer: what a decoding token reads per
    /// position of context.
    pub fn kv_bytes_per_position(&self, kv: KvType) -> u64 {
        let c = &self.config;
        // Saturating: a count no machine holds must compare as huge, not wrap to small.
        (c.n_layers as u64)
            .saturating_mul(c.n_head_kv as u64)
            .saturating_mul(kv.head_position_bytes(c.head_dim))
    }
}
