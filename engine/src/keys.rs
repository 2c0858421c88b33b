//! The metadata keys airlock (and llama.cpp) read, with the type and range each must have.
//! The GGUF reader checks the container; this checks what the well-known keys hold, so a file
//! whose `tokenizer.ggml.tokens` is an array of integers, or whose `block_count` is 2^31, is
//! called invalid by `inspect` and refused by the converters ([`crate::load::validate`]).

use crate::gguf::{Array, GgufFile, Value};

/// One key that does not hold what it must.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyProblem {
    pub key: String,
    pub problem: String,
}

impl std::fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

#[derive(Clone, Copy)]
enum Want {
    Str,
    Bool,
    /// A u32 in 1..2^31 (counts and sizes).
    Count,
    /// Any u32 (ids, enums).
    U32,
    /// A finite f32.
    F32,
    /// A finite f32 above 0.
    PositiveF32,
    /// An array of strings.
    StrArray,
    /// An array of i32.
    I32Array,
    /// An array of f32.
    F32Array,
}

/// `{arch}.` keys of the architecture.
const ARCH_KEYS: &[(&str, Want)] = &[
    ("context_length", Want::Count),
    ("embedding_length", Want::Count),
    ("block_count", Want::Count),
    ("feed_forward_length", Want::Count),
    ("attention.head_count", Want::Count),
    ("attention.head_count_kv", Want::Count),
    ("attention.key_length", Want::Count),
    ("attention.value_length", Want::Count),
    ("rope.dimension_count", Want::Count),
    ("vocab_size", Want::Count),
    ("expert_count", Want::U32),
    ("expert_used_count", Want::U32),
    ("attention.layer_norm_rms_epsilon", Want::PositiveF32),
    ("rope.freq_base", Want::PositiveF32),
    ("rope.scaling.type", Want::Str),
    ("rope.scaling.factor", Want::F32),
    ("rope.scale_linear", Want::F32),
    ("rope.scaling.attn_factor", Want::F32),
    ("rope.scaling.original_context_length", Want::Count),
    ("rope.scaling.finetuned", Want::Bool),
    ("attention.scale", Want::F32),
    ("attention.causal", Want::Bool),
];

const OTHER_KEYS: &[(&str, Want)] = &[
    ("general.architecture", Want::Str),
    ("general.name", Want::Str),
    ("general.type", Want::Str),
    ("general.file_type", Want::U32),
    ("general.quantization_version", Want::U32),
    ("tokenizer.ggml.model", Want::Str),
    ("tokenizer.ggml.pre", Want::Str),
    ("tokenizer.ggml.tokens", Want::StrArray),
    ("tokenizer.ggml.token_type", Want::I32Array),
    ("tokenizer.ggml.scores", Want::F32Array),
    ("tokenizer.ggml.merges", Want::StrArray),
    ("tokenizer.ggml.bos_token_id", Want::U32),
    ("tokenizer.ggml.eos_token_id", Want::U32),
    ("tokenizer.ggml.eot_token_id", Want::U32),
    ("tokenizer.ggml.eom_token_id", Want::U32),
    ("tokenizer.ggml.unknown_token_id", Want::U32),
    ("tokenizer.ggml.seperator_token_id", Want::U32),
    ("tokenizer.ggml.padding_token_id", Want::U32),
    ("tokenizer.ggml.cls_token_id", Want::U32),
    ("tokenizer.ggml.mask_token_id", Want::U32),
    ("tokenizer.ggml.add_bos_token", Want::Bool),
    ("tokenizer.ggml.add_eos_token", Want::Bool),
    ("tokenizer.ggml.add_sep_token", Want::Bool),
    ("tokenizer.ggml.add_space_prefix", Want::Bool),
    ("tokenizer.chat_template", Want::Str),
];

fn check(v: &Value, want: Want) -> Option<String> {
    let found = || format!("found {}", describe(v));
    match want {
        Want::Str => {
            (!matches!(v, Value::String(_))).then(|| format!("expected a string, {}", found()))
        }
        Want::Bool => {
            (!matches!(v, Value::Bool(_))).then(|| format!("expected a bool, {}", found()))
        }
        Want::U32 => (!matches!(v, Value::U32(_))).then(|| format!("expected a u32, {}", found())),
        Want::Count => match v {
            Value::U32(n) if *n > 0 && *n < (1 << 31) => None,
            Value::U32(n) => Some(format!("{n} is outside 1..2^31")),
            _ => Some(format!("expected a u32, {}", found())),
        },
        Want::F32 => match v {
            Value::F32(x) if x.is_finite() => None,
            Value::F32(x) => Some(format!("{x} is not finite")),
            _ => Some(format!("expected an f32, {}", found())),
        },
        Want::PositiveF32 => match v {
            Value::F32(x) if x.is_finite() && *x > 0.0 => None,
            Value::F32(x) => Some(format!("{x} is not positive and finite")),
            _ => Some(format!("expected an f32, {}", found())),
        },
        Want::StrArray => (!matches!(v, Value::Array(Array::String(_))))
            .then(|| format!("expected an array of strings, {}", found())),
        Want::I32Array => (!matches!(v, Value::Array(Array::I32(_))))
            .then(|| format!("expected an array of i32, {}", found())),
        Want::F32Array => match v {
            Value::Array(Array::F32(a)) if a.iter().all(|x| x.is_finite()) => None,
            Value::Array(Array::F32(_)) => Some("holds a value that is not finite".into()),
            _ => Some(format!("expected an array of f32, {}", found())),
        },
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) => format!(
            "an array of {} ({} elements)",
            a.element_type().name(),
            a.len()
        ),
        Value::String(_) => "a string".into(),
        v => format!("{} {}", v.value_type().name(), scalar(v)),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(b) => b.to_string(),
        v => v.as_i128().map_or_else(|| "?".into(), |n| n.to_string()),
    }
}

/// Every problem with the well-known keys of `f`: types, ranges, and the tokenizer arrays'
/// agreement with each other (types and scores one per token, special ids inside the
/// vocabulary). Keys airlock does not know are not judged.
pub fn check_known_keys(f: &GgufFile) -> Vec<KeyProblem> {
    let mut out = Vec::new();
    let arch = f.get_str("general.architecture").map(|a| format!("{a}."));
    for e in f.metadata() {
        let want = OTHER_KEYS
            .iter()
            .find(|(k, _)| *k == e.key)
            .map(|&(_, w)| w)
            .or_else(|| {
                let rest = e.key.strip_prefix(arch.as_deref()?)?;
                ARCH_KEYS.iter().find(|(k, _)| *k == rest).map(|&(_, w)| w)
            });
        if let Some(problem) = want.and_then(|w| check(&e.value, w)) {
            out.push(KeyProblem {
                key: e.key.clone(),
                problem,
            });
        }
    }
    let n_tokens = f.get_str_array("tokenizer.ggml.tokens").map(|t| t.len());
    if let Some(n) = n_tokens {
        for key in ["tokenizer.ggml.token_type", "tokenizer.ggml.scores"] {
            if let Some(a) = f.get_array(key) {
                if a.len() != n && !out.iter().any(|p| p.key == key) {
                    out.push(KeyProblem {
                        key: key.into(),
                        problem: format!("{} entries for {n} tokens", a.len()),
                    });
                }
            }
        }
        for e in f.metadata() {
            if e.key.starts_with("tokenizer.ggml.") && e.key.ends_with("_token_id") {
                if let Value::U32(id) = e.value {
                    if id as usize >= n {
                        out.push(KeyProblem {
                            key: e.key.clone(),
                            problem: format!("{id} is outside the vocabulary of {n} tokens"),
                        });
                    }
                }
            }
        }
    }
    out
}
