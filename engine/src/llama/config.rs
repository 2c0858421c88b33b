//! Llama hyperparameters from `llama.*` metadata, checked against each other and the tensors.

use crate::gguf::GgufFile;

use super::ModelError;

/// Largest head size the attention kernel keeps on the stack; Llama models use 64 or 128.
pub use airlock_kernels::attention::MAX_HEAD_DIM;

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// How many leading dimensions of each head RoPE rotates (usually all of them).
    pub rope_dim: usize,
    /// The context length the model was trained for.
    pub n_ctx_train: usize,
    pub vocab_size: usize,
}

impl LlamaConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f
            .get_str("general.architecture")
            .ok_or_else(|| ModelError::MissingKey("general.architecture".into()))?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let int = |key: &str| -> Result<usize, ModelError> {
            let full = format!("llama.{key}");
            let v = f
                .get(&full)
                .ok_or_else(|| ModelError::MissingKey(full.clone()))?;
            v.as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0 && v <= (1 << 31))
                .ok_or_else(|| ModelError::BadKey {
                    key: full,
                    reason: format!("expected a positive integer below 2^31, found {v:?}"),
                })
        };
        let n_layers = int("block_count")?;
        let n_embd = int("embedding_length")?;
        let n_ff = int("feed_forward_length")?;
        let n_head = int("attention.head_count")?;
        let n_head_kv = match f.get("llama.attention.head_count_kv") {
            None => n_head,
            Some(_) => int("attention.head_count_kv")?,
        };
        let n_ctx_train = int("context_length")?;
        let rms_eps = f
            .get_f32("llama.attention.layer_norm_rms_epsilon")
            .ok_or_else(|| {
                ModelError::MissingKey("llama.attention.layer_norm_rms_epsilon".into())
            })?;
        let rope_base = f.get_f32("llama.rope.freq_base").unwrap_or(10000.0);

        let bad = |key: &str, reason: String| ModelError::BadKey {
            key: key.into(),
            reason,
        };
        if n_embd % n_head != 0 {
            return Err(bad(
                "llama.attention.head_count",
                format!("{n_head} heads do not divide embedding_length {n_embd}"),
            ));
        }
        let head_dim = match f.get("llama.attention.key_length") {
            None => n_embd / n_head,
            Some(_) => int("attention.key_length")?,
        };
        if head_dim > MAX_HEAD_DIM || head_dim % 2 != 0 {
            return Err(bad(
                "llama.attention.key_length",
                format!("head size {head_dim} must be even and at most {MAX_HEAD_DIM}"),
            ));
        }
        if n_head % n_head_kv != 0 {
            return Err(bad(
                "llama.attention.head_count_kv",
                format!("{n_head_kv} KV heads do not divide {n_head} heads"),
            ));
        }
        let rope_dim = match f.get("llama.rope.dimension_count") {
            None => head_dim,
            Some(_) => int("rope.dimension_count")?,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad(
                "llama.rope.dimension_count",
                format!("{rope_dim} must be even and at most the head size {head_dim}"),
            ));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rope_base.is_finite() && rope_base > 0.0) {
            return Err(bad(
                "llama.attention.layer_norm_rms_epsilon / llama.rope.freq_base",
                format!("must be positive and finite, found {rms_eps} / {rope_base}"),
            ));
        }
        let token_embd = f
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = token_embd.n_rows() as usize;
        if let Some(v) = f.get("llama.vocab_size") {
            if v.as_u64() != Some(vocab_size as u64) {
                return Err(bad(
                    "llama.vocab_size",
                    format!("{v:?} disagrees with token_embd.weight's {vocab_size} rows"),
                ));
            }
        }
        Ok(LlamaConfig {
            n_layers,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rms_eps,
            rope_base,
            rope_dim,
            n_ctx_train,
            vocab_size,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
