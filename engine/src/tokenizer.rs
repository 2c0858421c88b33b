//! Byte-level BPE tokenizer compatible with llama.cpp's `gpt2` vocabularies.
//!
//! A [`Tokenizer`] is built from a [`VocabSpec`] (the `tokenizer.*` metadata of a
//! GGUF file) without needing a `tokenizer.json`: the byte-level BPE model comes
//! from the GGUF tokens and merges (already in byte-level-unicode form), and the
//! pre-tokenizer regexes are chosen by `tokenizer.ggml.pre`, mirroring the lists
//! in llama.cpp's `src/llama-vocab.cpp`.
//!
//! Special tokens follow llama.cpp (`tokenizer_st_partition`): before BPE the text
//! is cut at every occurrence of a special token, longest token text first.
//! Control (type 3) and unknown (type 2) tokens are only recognised when
//! `parse_special` is on; user-defined (type 4) tokens are always recognised.
//! The text between special tokens goes through the `tokenizers` crate pipeline
//! (pre-tokenizer + BPE) with no added tokens of its own, so plain text can never
//! turn into a control id.

use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{DecoderWrapper, ModelWrapper, SplitDelimiterBehavior};

use crate::gguf::GgufFile;

/// Largest vocabulary accepted from metadata (real ones are below 300k).
pub const MAX_VOCAB: usize = 1 << 22;
/// Largest `tokenizer.json` accepted by [`Tokenizer::from_tokenizer_json`].
pub const MAX_TOKENIZER_JSON_BYTES: u64 = 256 << 20;

/// GPT-2's pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_GPT2`); the
/// trailing `|\s+` makes explicit what llama.cpp does with unmatched whitespace.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 (`LLAMA_VOCAB_PRE_TYPE_LLAMA3`, `tokenizer.ggml.pre` = `llama-bpe`).
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 / StableLM2: the Llama 3 regex with single digits.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Single-digit split used before the GPT-2 regex by `smollm`, `starcoder`, ...
const RE_DIGIT: &str = r"\p{N}";

/// Control tokens that end generation when present, found by name.
const EOG_NAMES: [&str; 5] = [
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eom_id|>",
];

/// Errors from building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "tokenizer model {0:?} is not supported yet (only \"gpt2\" byte-level BPE vocabularies are)"
    )]
    UnsupportedModel(String),
    #[error("missing tokenizer metadata key {0}")]
    MissingKey(&'static str),
    #[error("tokenizer metadata key {key} has the wrong type or an invalid value")]
    BadKey { key: &'static str },
    #[error("the vocabulary is empty")]
    EmptyVocab,
    #[error("the vocabulary has {0} tokens, more than the supported {MAX_VOCAB}")]
    VocabTooLarge(usize),
    #[error("token_type has {types} entries but tokens has {tokens}")]
    TokenTypeLength { types: usize, tokens: usize },
    #[error("token {id} has invalid token type {ty} (expected 1..=6)")]
    BadTokenType { id: usize, ty: i32 },
    #[error("{name} token id {id} is out of range for a vocabulary of {n_vocab} tokens")]
    SpecialIdOutOfRange {
        name: &'static str,
        id: u32,
        n_vocab: usize,
    },
    #[error("merge #{index} {merge:?} is malformed: {reason}")]
    BadMerge {
        index: usize,
        merge: String,
        reason: &'static str,
    },
    #[error("add_bos was requested but the vocabulary has no BOS token")]
    NoBos,
    #[error("token id {id} is out of range for a vocabulary of {n_vocab} tokens")]
    IdOutOfRange { id: u32, n_vocab: usize },
    #[error("tokenizer.json {path}: {msg}")]
    TokenizerJson { path: String, msg: String },
    #[error("tokenizer backend error: {0}")]
    Backend(String),
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// Token types as stored in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Maps the GGUF integer (1..=6) to a type.
    pub fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// The pre-tokenizer (regex split) applied before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// `llama-bpe` / `llama3` / `llama-v3`: Llama 3 regex, merges ignored for whole-vocab words.
    Llama3,
    /// `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`:
    /// single digits, then the GPT-2 regex.
    Smollm,
    /// `qwen2`, `stablelm2`.
    Qwen2,
    /// `gpt2`, `mpt`, `olmo`, `jais`, `trillion`, and the fallback for unknown names.
    Gpt2,
}

impl PreTokenizerKind {
    /// Resolves a `tokenizer.ggml.pre` name; `None` for names this crate does not know.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama-bpe" | "llama3" | "llama-v3" => Self::Llama3,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => Self::Smollm,
            "qwen2" | "stablelm2" => Self::Qwen2,
            "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "default" => Self::Gpt2,
            _ => return None,
        })
    }

    fn regexes(self) -> &'static [&'static str] {
        match self {
            Self::Llama3 => &[RE_LLAMA3],
            Self::Smollm => &[RE_DIGIT, RE_GPT2],
            Self::Qwen2 => &[RE_QWEN2],
            Self::Gpt2 => &[RE_GPT2],
        }
    }

    /// llama.cpp sets `ignore_merges` (a pre-token that is a whole vocabulary entry
    /// is emitted as is) for the Llama 3 family only.
    fn ignore_merges(self) -> bool {
        matches!(self, Self::Llama3)
    }
}

/// Tokenizer metadata independent of the file format it came from.
#[derive(Debug, Clone, Default)]
pub struct VocabSpec {
    /// `tokenizer.ggml.model`; only `"gpt2"` is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// One entry per token (GGUF `token_type`, 1..=6).
    pub token_types: Vec<i32>,
    /// `"left right"` pairs in rank order.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub pad: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`: byte-level BPE never emits it, but a file that names
    /// a token outside its vocabulary is inconsistent and refused like any other special id.
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

impl VocabSpec {
    /// Reads the `tokenizer.*` keys of a GGUF file.
    ///
    /// A missing `token_type` means all tokens are normal; a missing
    /// `add_bos_token` defaults as in llama.cpp (true for the Llama 3 family).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f
            .get_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?
            .to_string();
        let pre = f.get_str("tokenizer.ggml.pre").map(str::to_string);
        let tokens: Vec<String> = f
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?
            .iter()
            .map(str::to_string)
            .collect();
        let token_types = match f.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => {
                f.get_i32_array("tokenizer.ggml.token_type")
                    .ok_or(TokenizerError::BadKey {
                        key: "tokenizer.ggml.token_type",
                    })?
            }
        };
        let merges = match f.get("tokenizer.ggml.merges") {
            None => Vec::new(),
            Some(_) => f
                .get_str_array("tokenizer.ggml.merges")
                .ok_or(TokenizerError::BadKey {
                    key: "tokenizer.ggml.merges",
                })?
                .iter()
                .map(str::to_string)
                .collect(),
        };
        let id = |key: &'static str| -> Result<Option<u32>> {
            match f.get(key) {
                None => Ok(None),
                Some(_) => f
                    .get_u32(key)
                    .map(Some)
                    .ok_or(TokenizerError::BadKey { key }),
            }
        };
        let flag = |key: &'static str, default: bool| -> Result<bool> {
            match f.get(key) {
                None => Ok(default),
                Some(_) => f.get_bool(key).ok_or(TokenizerError::BadKey { key }),
            }
        };
        let llama3 =
            pre.as_deref().and_then(PreTokenizerKind::from_name) == Some(PreTokenizerKind::Llama3);
        let chat_template = match f.get("tokenizer.chat_template") {
            None => None,
            Some(_) => Some(
                f.get_str("tokenizer.chat_template")
                    .ok_or(TokenizerError::BadKey {
                        key: "tokenizer.chat_template",
                    })?
                    .to_string(),
            ),
        };
        Ok(Self {
            model,
            pre,
            tokens,
            token_types,
            merges,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token", llama3)?,
            add_eos: flag("tokenizer.ggml.add_eos_token", false)?,
            chat_template,
        })
    }
}

/// A tokenizer for one vocabulary. Cheap to share (`&self` everywhere).
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    /// Raw bytes of every token, concatenated; `piece_ends[i]` ends token `i`.
    piece_bytes: Vec<u8>,
    piece_ends: Vec<usize>,
    /// Ids matched before BPE, longest text first.
    specials: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
    pre: PreTokenizerKind,
    pre_warning: Option<String>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

/// A piece of input text after special-token partitioning.
enum Fragment<'a> {
    Text(&'a str),
    Special(u32),
}

impl Tokenizer {
    /// Builds a tokenizer from GGUF-style metadata, validating it.
    pub fn from_spec(spec: &VocabSpec) -> Result<Self> {
        if spec.model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(spec.model.clone()));
        }
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > MAX_VOCAB {
            return Err(TokenizerError::VocabTooLarge(n));
        }
        let types = parse_types(&spec.token_types, n)?;

        let (pre, pre_warning) = match spec.pre.as_deref() {
            Some(name) => match PreTokenizerKind::from_name(name) {
                Some(kind) => (kind, None),
                None => (
                    PreTokenizerKind::Gpt2,
                    Some(format!(
                        "unknown pre-tokenizer {name:?}; using the GPT-2 regex (tokenization may differ from the model's training)"
                    )),
                ),
            },
            None => (
                PreTokenizerKind::Gpt2,
                Some("no tokenizer.ggml.pre; using the GPT-2 regex".to_string()),
            ),
        };

        // n <= MAX_VOCAB, so every id fits in u32. On duplicate texts the last id
        // wins, as in llama.cpp's token_to_id map.
        let vocab: Vocab = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merges = Vec::with_capacity(spec.merges.len());
        // One buffer for every merged text looked up (a load checks ~50k merges).
        let mut joined = String::new();
        for (index, m) in spec.merges.iter().enumerate() {
            let bad = |reason| TokenizerError::BadMerge {
                index,
                merge: m.clone(),
                reason,
            };
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| bad("expected \"left right\""))?;
            if a.is_empty() || b.is_empty() || b.contains(' ') {
                return Err(bad("expected exactly two non-empty parts"));
            }
            if !vocab.contains_key(a) || !vocab.contains_key(b) {
                return Err(bad("a part is not in the vocabulary"));
            }
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            if !vocab.contains_key(joined.as_str()) {
                return Err(bad("the merged token is not in the vocabulary"));
            }
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(pre.ignore_merges())
            .build()
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        let mut hf = tokenizers::Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(build_pre_tokenizer(pre)?));

        let mut tok = Self::assemble(hf, spec.tokens.clone(), types, spec, true)?;
        tok.pre = pre;
        tok.pre_warning = pre_warning;
        Ok(tok)
    }

    /// Builds a tokenizer from a Hugging Face `tokenizer.json` (the `--tokenizer`
    /// override): vocabulary, normalizer and pre-tokenizer come from the file;
    /// special ids, `add_bos`/`add_eos` and the chat template come from `base`
    /// (the model file's metadata). Only byte-level BPE files are supported.
    pub fn from_tokenizer_json(path: &Path, base: &VocabSpec) -> Result<Self> {
        let bytes = crate::bounded::read_bounded(path, MAX_TOKENIZER_JSON_BYTES).map_err(|e| {
            TokenizerError::TokenizerJson {
                path: path.display().to_string(),
                msg: e.to_string(),
            }
        })?;
        Self::from_tokenizer_json_bytes(path, &bytes, base)
    }

    /// [`Self::from_tokenizer_json`] on bytes already read (and, under a signature requirement,
    /// verified), so the file is not read a second time; `path` names them in errors.
    pub fn from_tokenizer_json_bytes(path: &Path, bytes: &[u8], base: &VocabSpec) -> Result<Self> {
        let jerr = |msg: String| TokenizerError::TokenizerJson {
            path: path.display().to_string(),
            msg,
        };
        // The tokenizers crate slices each merge's second token after the model's
        // continuing_subword_prefix without checking it is there, and panics when that cuts a
        // character. Byte-level BPE, the only kind airlock runs, uses neither that nor
        // end_of_word_suffix, so a file that sets one is refused before the crate builds it.
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| jerr(e.to_string()))?;
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if json["model"][key].as_str().is_some_and(|s| !s.is_empty()) {
                return Err(jerr(format!(
                    "model.{key} is set: airlock runs byte-level BPE tokenizers, which have none"
                )));
            }
        }
        drop(json);
        // And for a panic of the crate that this does not foresee: an error naming the file.
        let mut hf = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| jerr("the tokenizers crate failed (panicked) reading it".into()))?
            .map_err(|e| jerr(e.to_string()))?;
        if !matches!(hf.get_model(), ModelWrapper::BPE(_)) {
            return Err(jerr("only BPE models are supported".into()));
        }
        let byte_level = match hf.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            Some(DecoderWrapper::Sequence(_)) | None => {
                // Accept only when the pre-tokenizer is byte-level somewhere.
                let pt = serde_json::to_string(&hf.get_pre_tokenizer()).unwrap_or_default();
                pt.contains("\"ByteLevel\"")
            }
            _ => false,
        };
        if !byte_level {
            return Err(jerr("only byte-level BPE tokenizers are supported".into()));
        }
        // Special (control) added tokens are split off by our own partitioning;
        // the backend must treat their text as plain text.
        hf.set_encode_special_tokens(true);

        let vocab = hf.get_vocab(true);
        let n = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > MAX_VOCAB {
            return Err(TokenizerError::VocabTooLarge(n));
        }
        if !base.tokens.is_empty() && n > base.tokens.len() {
            return Err(jerr(format!(
                "it has {n} tokens but the model's vocabulary has {}",
                base.tokens.len()
            )));
        }
        let mut tokens = vec![String::new(); n];
        for (t, id) in vocab {
            tokens[id as usize] = t;
        }
        let mut types = vec![TokenType::Normal; n];
        for (id, added) in hf.get_added_tokens_decoder() {
            if let Some(slot) = types.get_mut(id as usize) {
                *slot = if added.special {
                    TokenType::Control
                } else {
                    TokenType::UserDefined
                };
            }
        }
        Self::assemble(hf, tokens, types, base, false)
    }

    fn assemble(
        hf: tokenizers::Tokenizer,
        tokens: Vec<String>,
        types: Vec<TokenType>,
        spec: &VocabSpec,
        normal_is_byte_level: bool,
    ) -> Result<Self> {
        let n = tokens.len();
        let check = |name: &'static str, id: Option<u32>| -> Result<Option<u32>> {
            match id {
                Some(id) if id as usize >= n => Err(TokenizerError::SpecialIdOutOfRange {
                    name,
                    id,
                    n_vocab: n,
                }),
                other => Ok(other),
            }
        };
        let bos = check("BOS", spec.bos)?;
        let eos = check("EOS", spec.eos)?;
        let eot = check("EOT", spec.eot)?;
        let eom = check("EOM", spec.eom)?;
        let pad = check("padding", spec.pad)?;
        check("unknown", spec.unk)?;
        // Refused here, not at the first prompt: such a vocabulary cannot encode anything.
        if spec.add_bos && bos.is_none() {
            return Err(TokenizerError::NoBos);
        }

        let mut piece_bytes = Vec::new();
        let mut piece_ends = Vec::with_capacity(n);
        for (t, ty) in tokens.iter().zip(&types) {
            match ty {
                TokenType::Normal | TokenType::Byte | TokenType::Unused
                    if normal_is_byte_level || *ty == TokenType::Normal =>
                {
                    for c in t.chars() {
                        match byte_level_char_to_byte(c) {
                            Some(b) => piece_bytes.push(b),
                            None => {
                                let mut buf = [0u8; 4];
                                piece_bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                }
                _ => piece_bytes.extend_from_slice(t.as_bytes()),
            }
            piece_ends.push(piece_bytes.len());
        }

        let mut specials: Vec<u32> = types
            .iter()
            .enumerate()
            .filter(|(i, ty)| {
                matches!(
                    ty,
                    TokenType::Control | TokenType::Unknown | TokenType::UserDefined
                ) && !tokens[*i].is_empty()
            })
            .map(|(i, _)| i as u32)
            .collect();
        // Longest first, ties by id, as llama.cpp's cache_special_tokens.
        specials.sort_by(|&a, &b| {
            tokens[b as usize]
                .len()
                .cmp(&tokens[a as usize].len())
                .then(a.cmp(&b))
        });

        let mut eog: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        for &id in &specials {
            if types[id as usize] == TokenType::Control
                && EOG_NAMES.contains(&tokens[id as usize].as_str())
            {
                eog.push(id);
            }
        }
        eog.sort_unstable();
        eog.dedup();

        Ok(Self {
            hf,
            tokens,
            types,
            piece_bytes,
            piece_ends,
            specials,
            bos,
            eos,
            eot,
            eom,
            pad,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            eog,
            pre: PreTokenizerKind::Gpt2,
            pre_warning: None,
            chat_template: spec.chat_template.clone(),
        })
    }

    /// Tokenizes `text`. With `add_bos` the BOS id is prepended (an error if the
    /// vocabulary has none). With `parse_special`, control-token texts such as
    /// `<|eot_id|>` become their ids; without it they are tokenized as plain text.
    /// User-defined tokens are always recognised (as in llama.cpp).
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        if add_bos {
            out.push(self.bos.ok_or(TokenizerError::NoBos)?);
        }
        self.encode_into(text, parse_special, &mut out)?;
        Ok(out)
    }

    /// Like [`encode`](Self::encode) without BOS, appending to `out`.
    pub fn encode_into(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) -> Result<()> {
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Special(id) => out.push(id),
                Fragment::Text(s) => self.encode_plain(s, out)?,
            }
        }
        Ok(())
    }

    /// Tokenizes consecutive parts as if concatenated, parsing special tokens only
    /// in parts flagged `true` (chat framing) and not in the others (message
    /// content). Plain text running across part boundaries is tokenized as one
    /// piece, so the result equals tokenizing the concatenation whenever the
    /// unflagged parts contain no special-token text. No BOS is added.
    pub fn encode_parts_into(&self, parts: &[(&str, bool)], out: &mut Vec<u32>) -> Result<()> {
        let mut run = String::new();
        for &(text, parse_special) in parts {
            for frag in self.partition(text, parse_special) {
                match frag {
                    Fragment::Text(s) => run.push_str(s),
                    Fragment::Special(id) => {
                        self.encode_plain(&run, out)?;
                        run.clear();
                        out.push(id);
                    }
                }
            }
        }
        self.encode_plain(&run, out)
    }

    /// BPE over text that contains no special tokens to split off.
    fn encode_plain(&self, s: &str, out: &mut Vec<u32>) -> Result<()> {
        if s.is_empty() {
            return Ok(());
        }
        let enc = self
            .hf
            .encode_fast(s, false)
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Cuts `text` at special-token occurrences, longest token first (llama.cpp's
    /// `tokenizer_st_partition`).
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !parse_special && ty != TokenType::UserDefined {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(s) if s.contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(mut s) => {
                        while let Some(pos) = s.find(needle) {
                            if pos > 0 {
                                next.push(Fragment::Text(&s[..pos]));
                            }
                            next.push(Fragment::Special(id));
                            s = &s[pos + needle.len()..];
                        }
                        if !s.is_empty() {
                            next.push(Fragment::Text(s));
                        }
                    }
                    special => next.push(special),
                }
            }
            frags = next;
        }
        frags
    }

    /// A lower bound on the tokens `text` becomes: no token stands for more bytes than the
    /// longest piece of the vocabulary. Lets a front end refuse a prompt that cannot fit a
    /// context before tokenizing megabytes of it.
    pub fn min_tokens(&self, text: &str) -> usize {
        let longest = self
            .piece_ends
            .iter()
            .scan(0, |start, &end| {
                let len = end - *start;
                *start = end;
                Some(len)
            })
            .max()
            .unwrap_or(1)
            .max(1);
        text.len().div_ceil(longest)
    }

    /// The raw bytes token `id` stands for (control tokens: their text).
    pub fn token_piece(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let end = *self.piece_ends.get(i)?;
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        self.piece_bytes.get(start..end)
    }

    /// Detokenizes `ids` (invalid UTF-8 becomes U+FFFD). Control tokens are
    /// rendered as their text only with `render_special`.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.piece_for_output(id, render_special)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn piece_for_output(&self, id: u32, render_special: bool) -> Result<&[u8]> {
        let piece = self.token_piece(id).ok_or(TokenizerError::IdOutOfRange {
            id,
            n_vocab: self.tokens.len(),
        })?;
        let hidden = matches!(
            self.types[id as usize],
            TokenType::Control | TokenType::Unknown | TokenType::Unused
        );
        Ok(if hidden && !render_special {
            &[]
        } else {
            piece
        })
    }

    /// The token's string as stored in the vocabulary (byte-level form for normal tokens).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Id of the special (control, unknown or user-defined) token with this text.
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        self.specials
            .iter()
            .copied()
            .find(|&id| self.tokens[id as usize] == text)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }
    pub fn eom(&self) -> Option<u32> {
        self.eom
    }
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }
    /// Whether BOS is added by default (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }
    /// Whether EOS is added by default (`tokenizer.ggml.add_eos_token`).
    pub fn add_eos_default(&self) -> bool {
        self.add_eos
    }
    /// The end-of-generation ids: EOS, EOT, EOM and control tokens named
    /// `<|eot_id|>`, `<|end_of_text|>`, `<|im_end|>`, `<|endoftext|>`, `<|eom_id|>`.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }
    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizerKind {
        self.pre
    }
    /// Set when `tokenizer.ggml.pre` was missing or unknown and a fallback was used.
    pub fn pre_tokenizer_warning(&self) -> Option<&str> {
        self.pre_warning.as_deref()
    }
    /// `tokenizer.chat_template`, if the file had one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    /// Whether the vocabulary is the Llama 3 one (pre-tokenizer `llama-bpe`).
    pub fn is_llama3(&self) -> bool {
        self.pre == PreTokenizerKind::Llama3
    }
}

fn parse_types(raw: &[i32], n: usize) -> Result<Vec<TokenType>> {
    if raw.len() != n {
        return Err(TokenizerError::TokenTypeLength {
            types: raw.len(),
            tokens: n,
        });
    }
    raw.iter()
        .enumerate()
        .map(|(id, &ty)| TokenType::from_i32(ty).ok_or(TokenizerError::BadTokenType { id, ty }))
        .collect()
}

fn build_pre_tokenizer(kind: PreTokenizerKind) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in kind.regexes() {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(Sequence::new(steps).into())
}

/// The 68 bytes GPT-2's `bytes_to_unicode` maps to U+0100.. (in byte order).
fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Inverse of GPT-2's byte-to-unicode table.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 256 {
        let b = cp as u8;
        return is_printable_byte(b).then_some(b);
    }
    let n = cp.checked_sub(256)? as usize;
    (0u8..=255).filter(|&b| !is_printable_byte(b)).nth(n)
}

/// Streaming detokenizer: buffers bytes of incomplete UTF-8 sequences across
/// token boundaries and emits only complete characters. Invalid bytes become U+FFFD.
#[derive(Debug, Default, Clone)]
pub struct TokenStreamDecoder {
    pending: Vec<u8>,
    render_special: bool,
}

impl TokenStreamDecoder {
    /// `render_special`: whether control tokens print as their text.
    pub fn new(render_special: bool) -> Self {
        Self {
            pending: Vec::new(),
            render_special,
        }
    }

    /// Adds one token; returns the text that became complete (often empty for
    /// partial multi-byte characters).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        let piece = tok.piece_for_output(id, self.render_special)?;
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Flushes what is buffered (an incomplete sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Bytes waiting for the rest of a character.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_roundtrips() {
        // GPT-2: byte 0x20 (space) -> U+0120 'Ġ', 0x0A -> U+010A 'Ċ'.
        assert_eq!(byte_level_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_char_to_byte('a'), Some(b'a'));
        assert_eq!(byte_level_char_to_byte('\u{0100}'), Some(0));
        assert_eq!(byte_level_char_to_byte('\u{0143}'), Some(0xAD));
        assert_eq!(byte_level_char_to_byte('\u{0144}'), None);
        assert_eq!(byte_level_char_to_byte(' '), None);
        let mut seen = [false; 256];
        for cp in 0..0x200u32 {
            if let Some(b) = char::from_u32(cp).and_then(byte_level_char_to_byte) {
                assert!(!seen[b as usize]);
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    fn tiny_spec() -> VocabSpec {
        // bytes-level alphabet for "ab Ġ" plus merges and two specials.
        let tokens = ["a", "b", "Ġ", "ab", "Ġab", "<|x|>", "<u>", "Ã", "©"];
        VocabSpec {
            model: "gpt2".into(),
            pre: Some("gpt2".into()),
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            token_types: vec![1, 1, 1, 1, 1, 3, 4, 1, 1],
            merges: vec!["a b".into(), "Ġ ab".into()],
            eos: Some(5),
            ..Default::default()
        }
    }

    #[test]
    fn min_tokens_is_a_lower_bound() {
        let t = Tokenizer::from_spec(&tiny_spec()).unwrap();
        // The longest piece is "<|x|>" (5 bytes).
        for text in ["", "a", "ab ab", "<|x|><|x|>", "ab ab ab ab <|x|>ab"] {
            let n = t.encode(text, false, true).unwrap().len();
            assert!(t.min_tokens(text) <= n, "{text:?}");
        }
        assert_eq!(t.min_tokens("<|x|><|x|>"), 2);
        assert_eq!(t.min_tokens("abcdef"), 2);
    }

    #[test]
    fn tiny_vocab_encodes_and_parses_specials() {
        let t = Tokenizer::from_spec(&tiny_spec()).unwrap();
        assert_eq!(t.encode("ab ab", false, true).unwrap(), vec![3, 4]);
        assert_eq!(t.encode("ab<|x|>ab", false, true).unwrap(), vec![3, 5, 3]);
        // Special parsing off: the control text is not its id.
        let plain = t.encode("<|x|>", false, false).unwrap();
        assert!(!plain.contains(&5));
        // User-defined tokens are recognised either way.
        assert_eq!(t.encode("<u>", false, false).unwrap(), vec![6]);
        assert!(t.is_eog(5));
        assert!(matches!(
            t.encode("a", true, true),
            Err(TokenizerError::NoBos)
        ));
    }

    #[test]
    fn stream_decoder_waits_for_whole_chars() {
        // "é" is C3 A9 = byte-level "Ã" "©": two tokens, one character.
        let t = Tokenizer::from_spec(&tiny_spec()).unwrap();
        let mut d = TokenStreamDecoder::new(false);
        assert_eq!(d.push(&t, 7).unwrap(), "");
        assert_eq!(d.pending_len(), 1);
        assert_eq!(d.push(&t, 8).unwrap(), "é");
        assert_eq!(d.push(&t, 5).unwrap(), "");
        assert_eq!(d.push(&t, 7).unwrap(), "");
        assert_eq!(d.push(&t, 0).unwrap(), "\u{FFFD}a");
        assert_eq!(d.push(&t, 7).unwrap(), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert!(d.push(&t, 99).is_err());
        let mut d = TokenStreamDecoder::new(true);
        assert_eq!(d.push(&t, 5).unwrap(), "<|x|>");
        assert_eq!(t.decode(&[3, 5, 7, 8], false).unwrap(), "abé");
        assert_eq!(t.decode(&[3, 5], true).unwrap(), "ab<|x|>");
    }

    #[test]
    fn hostile_specs_are_rejected() {
        let mut s = tiny_spec();
        s.token_types.pop();
        assert!(matches!(
            Tokenizer::from_spec(&s),
            Err(TokenizerError::TokenTypeLength { .. })
        ));
        let mut s = tiny_spec();
        s.token_types[0] = 9;
        assert!(matches!(
            Tokenizer::from_spec(&s),
            Err(TokenizerError::BadTokenType { id: 0, ty: 9 })
        ));
        for bad in ["ab", "a  b", "a c", " a", "b a"] {
            let mut s = tiny_spec();
            s.merges.push(bad.into());
            assert!(
                matches!(
                    Tokenizer::from_spec(&s),
                    Err(TokenizerError::BadMerge { .. })
                ),
                "{bad:?}"
            );
        }
        let mut s = tiny_spec();
        s.bos = Some(9);
        assert!(matches!(
            Tokenizer::from_spec(&s),
            Err(TokenizerError::SpecialIdOutOfRange { name: "BOS", .. })
        ));
        let mut s = tiny_spec();
        s.add_bos = true;
        assert!(matches!(
            Tokenizer::from_spec(&s),
            Err(TokenizerError::NoBos)
        ));
        let mut s = tiny_spec();
        s.unk = Some(9);
        assert!(matches!(
            Tokenizer::from_spec(&s),
            Err(TokenizerError::SpecialIdOutOfRange {
                name: "unknown",
                id: 9,
                ..
            })
        ));
        s.unk = Some(8);
        assert!(Tokenizer::from_spec(&s).is_ok());
        let mut s = tiny_spec();
        s.model = "llama".into();
        let e = Tokenizer::from_spec(&s).unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
        let mut s = tiny_spec();
        s.tokens.clear();
        s.token_types.clear();
        assert!(matches!(
            Tokenizer::from_spec(&s),
            Err(TokenizerError::EmptyVocab)
        ));
        // An empty special token text must not hang the partitioner.
        let mut s = tiny_spec();
        s.tokens[5] = String::new();
        let t = Tokenizer::from_spec(&s).unwrap();
        assert_eq!(t.encode("ab", false, true).unwrap(), vec![3]);
    }

    #[test]
    fn unknown_pre_falls_back_with_warning() {
        let mut s = tiny_spec();
        s.pre = Some("mystery".into());
        let t = Tokenizer::from_spec(&s).unwrap();
        assert_eq!(t.pre_tokenizer(), PreTokenizerKind::Gpt2);
        assert!(t.pre_tokenizer_warning().unwrap().contains("mystery"));
        s.pre = Some("smollm".into());
        let t = Tokenizer::from_spec(&s).unwrap();
        assert!(t.pre_tokenizer_warning().is_none());
    }
}
