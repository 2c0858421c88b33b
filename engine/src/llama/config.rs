//! Llama hyperparameters from `llama.*` metadata, checked against each other and the tensors.

use crate::gguf::{GgufFile, Value};

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
    /// Linear RoPE scaling: the angle of position p is `p * rope_freq_scale * inv_freq`
    /// (llama.cpp's `freq_scale`, `1 / llama.rope.scaling.factor`); 1 without scaling.
    pub rope_freq_scale: f32,
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
        let rms_eps = float(f, "llama.attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            ModelError::MissingKey("llama.attention.layer_norm_rms_epsilon".into())
        })?;
        let rope_base = float(f, "llama.rope.freq_base")?.unwrap_or(10000.0);
        // Before anything is sized by it: the layers the file declares are the layers it holds.
        check_block_count(f, n_layers)?;

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
        if f.get("llama.attention.value_length").is_some() {
            let v = int("attention.value_length")?;
            if v != head_dim {
                return Err(bad(
                    "llama.attention.value_length",
                    format!("{v} differs from the key size {head_dim}; airlock's Llama needs them equal"),
                ));
            }
        }
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
        let rope_freq_scale = check_math_keys(f, head_dim)?;
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
            rope_freq_scale,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// A float key: absent, or an f32 (as llama.cpp requires) that is finite.
fn float(f: &GgufFile, key: &str) -> Result<Option<f32>, ModelError> {
    match f.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) if x.is_finite() => Ok(Some(*x)),
        Some(v) => Err(ModelError::BadKey {
            key: key.into(),
            reason: format!("expected a finite f32, found {v:?}"),
        }),
    }
}

/// The layer index of a `blk.N.*` tensor name.
fn layer_of(name: &str) -> Option<Result<usize, ()>> {
    let rest = name.strip_prefix("blk.")?;
    let digits = rest.split('.').next().unwrap_or("");
    Some(digits.parse::<usize>().map_err(|_| ()))
}

/// `block_count` against the `blk.N` tensors, in both directions (llama.cpp refuses a file with
/// more layers than it declares; fewer would leave layers without weights). Checked before
/// anything is sized by the count: a file cannot make airlock allocate for layers it lacks.
fn check_block_count(f: &GgufFile, n_layers: usize) -> Result<(), ModelError> {
    let mut seen = std::collections::BTreeSet::new();
    for t in f.tensors() {
        match layer_of(&t.name) {
            None => {}
            Some(Ok(i)) if i < n_layers => {
                seen.insert(i);
            }
            Some(_) => {
                return Err(ModelError::BadKey {
                    key: "llama.block_count".into(),
                    reason: format!(
                        "{n_layers}, but the file holds tensor {:?}, beyond the declared layers",
                        t.name
                    ),
                })
            }
        }
    }
    if seen.len() != n_layers {
        let missing = (0..n_layers).find(|i| !seen.contains(i)).unwrap_or(0);
        return Err(ModelError::BadKey {
            key: "llama.block_count".into(),
            reason: format!(
                "{n_layers}, but the file holds tensors for {} layers (none for layer {missing})",
                seen.len()
            ),
        });
    }
    Ok(())
}

/// Metadata that changes the computation in llama.cpp's llama architecture: each is read
/// (linear RoPE scaling) or refused, never run as if absent. Returns the RoPE `freq_scale`.
///
/// - `rope.scaling.type`: `none` or `linear` (the default when a factor is given, as in
///   llama.cpp); `yarn`, `longrope` and anything else are refused.
/// - `rope.scaling.factor` (or the older `rope.scale_linear`): a positive f32; with type
///   `linear` positions are scaled by `1 / factor`, with `none` it is ignored (as llama.cpp
///   does). 0 means unset, as in llama.cpp.
/// - `rope.scaling.original_context_length` (YaRN only) and `rope.scaling.finetuned` are read
///   and change nothing here; `rope.scaling.attn_factor` other than 1, `rope.scaling.alpha`
///   and any `rope.scaling.yarn_*` key are refused, as is any other `rope.scaling.*` key.
/// - `attention.scale` other than 0 (unset) or `1/sqrt(head size)`, the logit soft-capping
///   keys other than 0, `embedding_scale`/`residual_scale`/`logit_scale` other than 1,
///   `expert_count`/`expert_used_count` above 0 and `attention.causal` = false are refused.
fn check_math_keys(f: &GgufFile, head_dim: usize) -> Result<f32, ModelError> {
    let refuse = |key: &str, reason: String| ModelError::BadKey {
        key: key.into(),
        reason,
    };
    const SCALING: &str = "llama.rope.scaling.";
    let kind = match f.get("llama.rope.scaling.type") {
        None => "linear",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(refuse(
                "llama.rope.scaling.type",
                format!("expected a string, found {v:?}"),
            ))
        }
    };
    if !matches!(kind, "none" | "linear") {
        return Err(refuse(
            "llama.rope.scaling.type",
            format!(
                "{kind:?} is not implemented (airlock implements none and linear RoPE scaling, \
                 and Llama 3's rope_freqs); running the model without it would give wrong output"
            ),
        ));
    }
    let factor_key = if f.get("llama.rope.scaling.factor").is_some() {
        "llama.rope.scaling.factor"
    } else {
        "llama.rope.scale_linear"
    };
    let factor = match float(f, factor_key)? {
        None => 0.0,
        Some(x) if x >= 0.0 => x,
        Some(x) => return Err(refuse(factor_key, format!("{x} is negative"))),
    };
    let freq_scale = if kind == "linear" && factor != 0.0 {
        1.0 / factor
    } else {
        1.0
    };
    if !(freq_scale.is_finite() && freq_scale > 0.0) {
        return Err(refuse(
            factor_key,
            format!("{factor} gives no usable scale"),
        ));
    }
    for e in f.metadata() {
        let Some(field) = e.key.strip_prefix(SCALING) else {
            continue;
        };
        match field {
            "type" | "factor" => {}
            "original_context_length" => {
                if e.value.as_u64().is_none_or(|n| n == 0) {
                    return Err(refuse(
                        &e.key,
                        format!("expected a positive integer, found {:?}", e.value),
                    ));
                }
            }
            "finetuned" => {
                if e.value.as_bool().is_none() {
                    return Err(refuse(
                        &e.key,
                        format!("expected a bool, found {:?}", e.value),
                    ));
                }
            }
            "attn_factor" => {
                if float(f, &e.key)? != Some(1.0) {
                    return Err(refuse(
                        &e.key,
                        format!(
                            "{:?} scales the rotated values, which airlock does not implement",
                            e.value
                        ),
                    ));
                }
            }
            _ => {
                return Err(refuse(
                    &e.key,
                    "changes RoPE in a way airlock does not implement (YaRN and other \
                     scalings); running the model without it would give wrong output"
                        .into(),
                ))
            }
        }
    }
    let neutral_f32 = |key: &str, ok: &dyn Fn(f32) -> bool, what: &str| match float(f, key)? {
        Some(x) if !ok(x) => Err(refuse(
            key,
            format!("{x}: {what} is not implemented; running without it would give wrong output"),
        )),
        _ => Ok(()),
    };
    let default_scale = 1.0 / (head_dim as f32).sqrt();
    neutral_f32(
        "llama.attention.scale",
        &|x| x == 0.0 || (x - default_scale).abs() <= 1e-6 * default_scale,
        "an attention scale other than 1/sqrt(head size)",
    )?;
    for key in [
        "llama.attn_logit_softcapping",
        "llama.final_logit_softcapping",
    ] {
        neutral_f32(key, &|x| x == 0.0, "logit soft-capping")?;
    }
    for key in [
        "llama.embedding_scale",
        "llama.residual_scale",
        "llama.logit_scale",
    ] {
        neutral_f32(key, &|x| x == 1.0, "this scale")?;
    }
    for key in ["llama.expert_count", "llama.expert_used_count"] {
        if let Some(v) = f.get(key) {
            if v.as_u64() != Some(0) {
                return Err(refuse(
                    key,
                    format!("{v:?}: mixture-of-experts models are not implemented"),
                ));
            }
        }
    }
    if let Some(v) = f.get("llama.attention.causal") {
        if v.as_bool() != Some(true) {
            return Err(refuse(
                "llama.attention.causal",
                format!("{v:?}: only causal attention is implemented"),
            ));
        }
    }
    Ok(freq_scale)
}
