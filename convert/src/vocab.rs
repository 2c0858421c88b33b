//! The tokenizer half of a conversion: `tokenizer.json` (byte-level BPE) and
//! `tokenizer_config.json` to the `tokenizer.ggml.*` keys, the way llama.cpp's converter
//! (`get_vocab_base`, `get_vocab_base_pre`, gguf-py's `SpecialVocab`) fills them.

use std::path::Path;

use airlock_engine::gguf::{Array, StrArray, Value};
use airlock_engine::tokenizer::PreTokenizerKind;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::checkpoint::{read_json, HfConfig};
use crate::error::{ConvertError, Result};

/// llama.cpp's check text: the token ids of this string identify the pre-tokenizer
/// (conversion `get_vocab_base_pre`).
pub const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// sha256 of `str(token_ids)` of [`CHECK_TEXT`] -> `tokenizer.ggml.pre`, for the pre-tokenizers
/// airlock's tokenizer implements (hashes from llama.cpp's converter).
const KNOWN_PRE: &[(&str, &str)] = &[
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ),
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
    ),
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ),
    (
        "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34",
        "starcoder",
    ),
    (
        "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff",
        "refact",
    ),
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ),
    (
        "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3",
        "stablelm2",
    ),
    (
        // llama.cpp lists this hash for mpt and then olmo; the later entry wins there.
        "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166",
        "olmo",
    ),
];

/// gguf-py's `SpecialVocab` types and their GGUF keys (the "seperator" spelling is gguf-py's).
const SPECIAL_KEYS: &[(&str, &str)] = &[
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("cls", "tokenizer.ggml.cls_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
];

/// Everything the GGUF's `tokenizer.*` keys hold.
#[derive(Debug, Clone)]
pub struct HfVocab {
    pub pre: String,
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
    /// (GGUF key, id), in gguf-py's order.
    pub special_ids: Vec<(&'static str, u32)>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_sep: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
    /// Named templates (`tokenizer.chat_template.NAME`).
    pub named_templates: Vec<(String, String)>,
}

/// Names accepted by `--pre` (the ones airlock's tokenizer implements).
pub fn check_pre_name(name: &str) -> Result<()> {
    if name == "gpt-2" || PreTokenizerKind::from_name(name).is_some() {
        Ok(())
    } else {
        Err(ConvertError::Usage(format!(
            "unknown pre-tokenizer {name:?}; airlock implements llama-bpe, smollm, gpt-2, starcoder, refact, qwen2, stablelm2, mpt, olmo, command-r"
        )))
    }
}

/// What `pre` the tokenizer is, by llama.cpp's method: hash the ids of the check text.
pub fn detect_pre(tokenizer_json: &Path, bytes: &[u8]) -> Result<String> {
    let tok = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
        ConvertError::json(tokenizer_json, format!("cannot load as a tokenizer: {e}"))
    })?;
    let enc = tok
        .encode(CHECK_TEXT, true)
        .map_err(|e| ConvertError::json(tokenizer_json, format!("cannot tokenize: {e}")))?;
    let ids: Vec<String> = enc.get_ids().iter().map(u32::to_string).collect();
    let repr = format!("[{}]", ids.join(", "));
    let hash = Sha256::digest(repr.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    KNOWN_PRE
        .iter()
        .find(|(h, _)| *h == hex)
        .map(|(_, name)| name.to_string())
        .ok_or_else(|| {
            ConvertError::json(
                tokenizer_json,
                format!(
                    "pre-tokenizer not recognised (check hash {hex}); if you know which it is, pass --pre NAME (llama-bpe for Llama 3 / 3.1 / Foundation-sec-8b, smollm for SmolLM2)"
                ),
            )
        })
}

/// llama.cpp's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

impl HfVocab {
    /// Reads `tokenizer.json` (required) and `tokenizer_config.json` (optional) from `dir`.
    pub fn load(dir: &Path, config: &HfConfig, pre_override: Option<&str>) -> Result<Self> {
        let tj_path = dir.join("tokenizer.json");
        // A byte limit, not the reported size: a symlink to /dev/zero reports 0 bytes.
        let bytes =
            airlock_engine::bounded::read_bounded(&tj_path, crate::checkpoint::MAX_JSON_BYTES)
                .map_err(|source| match source.kind() {
                    std::io::ErrorKind::NotFound => ConvertError::MissingFile {
                        path: tj_path.clone(),
                        what: "tokenizer (airlock converts byte-level BPE tokenizer.json files)"
                            .into(),
                    },
                    std::io::ErrorKind::InvalidData => {
                        ConvertError::json(&tj_path, format!("too large: {source}"))
                    }
                    _ => ConvertError::Io {
                        path: tj_path.clone(),
                        error: source,
                    },
                })?;
        let tj: Json = serde_json::from_slice(&bytes)
            .map_err(|e| ConvertError::json(&tj_path, format!("not JSON: {e}")))?;
        let bad = |msg: String| ConvertError::json(&tj_path, msg);
        let model = tj
            .get("model")
            .and_then(Json::as_object)
            .ok_or_else(|| bad("no \"model\" object".into()))?;
        let mtype = model.get("type").and_then(Json::as_str).unwrap_or("BPE");
        if mtype != "BPE" {
            return Err(bad(format!(
                "tokenizer model {mtype:?}; airlock converts byte-level BPE only"
            )));
        }
        let vocab = model
            .get("vocab")
            .and_then(Json::as_object)
            .ok_or_else(|| bad("model.vocab is not an object".into()))?;
        let n_vocab = config.vocab_size;
        let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
        let mut types = vec![1i32; n_vocab];
        let put = |tokens: &mut Vec<Option<String>>, id: u64, text: &str| -> Result<usize> {
            let i = usize::try_from(id)
                .ok()
                .filter(|&i| i < n_vocab)
                .ok_or_else(|| {
                    ConvertError::json(
                        &tj_path,
                        format!(
                            "token {text:?} has id {id}, outside config.json's vocab_size {n_vocab}"
                        ),
                    )
                })?;
            // The same id for two different texts would silently drop one of them.
            if let Some(old) = &tokens[i] {
                if old != text {
                    return Err(ConvertError::json(
                        &tj_path,
                        format!("token id {id} is given to both {old:?} and {text:?}"),
                    ));
                }
            }
            tokens[i] = Some(text.to_string());
            Ok(i)
        };
        for (text, id) in vocab {
            let id = id
                .as_u64()
                .ok_or_else(|| bad(format!("vocab[{text:?}] is not an id")))?;
            put(&mut tokens, id, text)?;
        }
        let mut added_by_text: Vec<(String, u32)> = Vec::new();
        for a in tj
            .get("added_tokens")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let content = a
                .get("content")
                .and_then(Json::as_str)
                .ok_or_else(|| bad("an added token has no content".into()))?;
            let id = a
                .get("id")
                .and_then(Json::as_u64)
                .ok_or_else(|| bad(format!("added token {content:?} has no id")))?;
            let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            let i = put(&mut tokens, id, content)?;
            let text = if special || looks_special(content) {
                types[i] = 3;
                content.to_string()
            } else {
                types[i] = 4;
                // llama.cpp pre-normalises user-defined SentencePiece spaces.
                let t = content.replace('\u{2581}', " ");
                tokens[i] = Some(t.clone());
                t
            };
            added_by_text.push((text, i as u32));
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.unwrap_or_else(|| {
                    types[i] = 5;
                    format!("[PAD{i}]")
                })
            })
            .collect();

        let mut merges = Vec::new();
        for (k, m) in model
            .get("merges")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let merged = match m {
                Json::String(s) => s.clone(),
                Json::Array(pair) if pair.len() == 2 => {
                    let part = |v: &Json| {
                        v.as_str()
                            .map(|s| s.replace(' ', "\u{0120}"))
                            .ok_or_else(|| bad(format!("merge {k} is not a pair of strings")))
                    };
                    format!("{} {}", part(&pair[0])?, part(&pair[1])?)
                }
                _ => return Err(bad(format!("merge {k} is neither \"a b\" nor [a, b]"))),
            };
            merges.push(merged);
        }

        let pre = match pre_override {
            Some(p) => {
                check_pre_name(p)?;
                p.to_string()
            }
            None => detect_pre(&tj_path, &bytes)?,
        };
        drop(bytes);

        // tokenizer_config.json: chat template, special tokens by text, add_bos/add_eos.
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.is_file() {
            Some(read_json(&tc_path)?)
        } else {
            None
        };
        let id_of = |text: &str| {
            added_by_text
                .iter()
                .find(|(t, _)| t == text)
                .map(|&(_, id)| id)
        };
        let mut special_ids: Vec<(&'static str, u32)> = Vec::new();
        let set = |key: &'static str, id: u32, ids: &mut Vec<(&'static str, u32)>| {
            if (id as usize) < n_vocab && !ids.iter().any(|(k, _)| *k == key) {
                ids.push((key, id));
            }
        };
        if let Some(tc) = &tc {
            for (typ, key) in SPECIAL_KEYS {
                let entry = tc.get(format!("{typ}_token"));
                let text = match entry {
                    Some(Json::String(s)) => Some(s.as_str()),
                    Some(Json::Object(o)) => o.get("content").and_then(Json::as_str),
                    _ => None,
                };
                if let Some(id) = text.and_then(id_of) {
                    set(key, id, &mut special_ids);
                }
            }
        }
        for (typ, key) in SPECIAL_KEYS {
            if let Some(id) = config.get_u32(&format!("{typ}_token_id")) {
                set(key, id, &mut special_ids);
            }
        }
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let gen = read_json(&gen_path)?;
            for (typ, key) in SPECIAL_KEYS.iter().take(2) {
                if let Some(id) = gen
                    .get(format!("{typ}_token_id"))
                    .and_then(Json::as_u64)
                    .and_then(|v| u32::try_from(v).ok())
                {
                    set(key, id, &mut special_ids);
                }
            }
        }
        special_ids.sort_by_key(|(k, _)| SPECIAL_KEYS.iter().position(|(_, kk)| kk == k));

        let tc_text = |typ: &str| -> Option<String> {
            match tc.as_ref()?.get(format!("{typ}_token"))? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let (mut add_bos, mut add_eos, mut add_sep) = template_flags(
            &tj,
            tc.is_some(),
            tc_text("bos"),
            tc_text("eos"),
            tc_text("sep"),
            tc_text("cls"),
        );
        // tokenizer_config.json's own flags win, as in gguf-py.
        let flag = |key: &str| tc.as_ref().and_then(|t| t.get(key)).and_then(Json::as_bool);
        for (slot, key) in [
            (&mut add_bos, "add_bos_token"),
            (&mut add_eos, "add_eos_token"),
            (&mut add_sep, "add_sep_token"),
        ] {
            if let Some(b) = flag(key) {
                *slot = Some(b);
            }
        }
        let add_space_prefix = byte_level_prefix_space(&tj);

        let mut chat_template = None;
        let mut named_templates = Vec::new();
        match tc.as_ref().and_then(|t| t.get("chat_template")) {
            Some(Json::String(s)) => chat_template = Some(s.clone()),
            Some(Json::Array(list)) => {
                for item in list {
                    let (Some(name), Some(t)) = (
                        item.get("name").and_then(Json::as_str),
                        item.get("template").and_then(Json::as_str),
                    ) else {
                        continue;
                    };
                    if name == "default" {
                        chat_template = Some(t.to_string());
                    } else {
                        named_templates.push((name.to_string(), t.to_string()));
                    }
                }
            }
            _ => {}
        }
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                // Read to one byte past the template limit: more is refused by the check.
                let limit = airlock_engine::chat::ChatLimits::default().max_template_bytes as u64;
                let text = airlock_engine::bounded::read_bounded_string(&jinja, limit + 1)
                    .map_err(|error| ConvertError::Io {
                        path: jinja.clone(),
                        error,
                    })?;
                chat_template = Some(text);
            }
        }
        Ok(HfVocab {
            pre,
            tokens,
            types,
            merges,
            special_ids,
            add_bos,
            add_eos,
            add_sep,
            add_space_prefix,
            chat_template,
            named_templates,
        })
    }

    /// The `tokenizer.*` metadata entries, in llama.cpp's order.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let mut m: Vec<(String, Value)> = Vec::new();
        let mut put = |k: &str, v: Value| m.push((k.to_string(), v));
        if let Some(b) = self.add_space_prefix {
            put("tokenizer.ggml.add_space_prefix", Value::Bool(b));
        }
        put("tokenizer.ggml.model", Value::String("gpt2".into()));
        put("tokenizer.ggml.pre", Value::String(self.pre.clone()));
        put(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(
                self.tokens.iter().map(String::as_str).collect::<StrArray>(),
            )),
        );
        put(
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(self.types.clone())),
        );
        put(
            "tokenizer.ggml.merges",
            Value::Array(Array::String(
                self.merges.iter().map(String::as_str).collect::<StrArray>(),
            )),
        );
        for &(k, id) in &self.special_ids {
            put(k, Value::U32(id));
        }
        for (k, b) in [
            ("tokenizer.ggml.add_bos_token", self.add_bos),
            ("tokenizer.ggml.add_eos_token", self.add_eos),
            ("tokenizer.ggml.add_sep_token", self.add_sep),
        ] {
            if let Some(b) = b {
                put(k, Value::Bool(b));
            }
        }
        if let Some(t) = &self.chat_template {
            put("tokenizer.chat_template", Value::String(t.clone()));
        }
        for (name, t) in &self.named_templates {
            put(
                &format!("tokenizer.chat_template.{name}"),
                Value::String(t.clone()),
            );
        }
        m
    }
}

/// add_bos / add_eos / add_sep as gguf-py's `SpecialVocab` reads them off a `TemplateProcessing`
/// post-processor: a leading BOS (or CLS) in the single template means add_bos, a trailing EOS
/// means add_eos, and an EOS/SEP between A and B in the pair template means add_sep.
fn template_flags(
    tj: &Json,
    have_config: bool,
    bos: Option<String>,
    eos: Option<String>,
    sep: Option<String>,
    cls: Option<String>,
) -> (Option<bool>, Option<bool>, Option<bool>) {
    let (mut add_bos, mut add_eos, mut add_sep) = (None, None, None);
    let Some(pp) = tj.get("post_processor") else {
        return (None, None, None);
    };
    let procs: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![pp],
    };
    let special = |v: &Json| -> Option<String> {
        Some(v.get("SpecialToken")?.get("id")?.as_str()?.to_string())
    };
    let sequence =
        |v: &Json| -> Option<String> { Some(v.get("Sequence")?.get("id")?.as_str()?.to_string()) };
    for p in procs {
        if p.get("type").and_then(Json::as_str) != Some("TemplateProcessing") {
            continue;
        }
        let empty = Vec::new();
        let single = p.get("single").and_then(Json::as_array).unwrap_or(&empty);
        let pair = p.get("pair").and_then(Json::as_array).unwrap_or(&empty);
        let (mut first, mut last) = (None, None);
        let (mut bos, mut eos) = (bos.clone(), eos.clone());
        if single.len() > 1 {
            first = special(&single[0]);
            if let Some(f) = &first {
                if !have_config {
                    bos = Some(f.clone());
                }
                add_bos = Some(Some(f) == bos.as_ref() || Some(f) == cls.as_ref());
            }
            last = single.last().and_then(special);
            if let Some(l) = &last {
                if !have_config {
                    eos = Some(l.clone());
                }
                add_eos = Some(Some(l) == eos.as_ref());
            }
        }
        if !pair.is_empty() {
            let start = usize::from(first.is_some() && special(&pair[0]) == first);
            let stop = if last.is_some() && pair.last().and_then(special) == last {
                pair.len() - 1
            } else {
                pair.len()
            };
            if start < stop {
                let inner = &pair[start..stop];
                let (a, b) = (sequence(&inner[0]), sequence(&inner[inner.len() - 1]));
                if a.as_deref() == Some("A") && b.as_deref() == Some("B") && inner.len() > 2 {
                    let middle = &inner[1..inner.len() - 1];
                    let is_sep = |v: &Json| {
                        special(v)
                            .is_some_and(|t| Some(&t) == sep.as_ref() || Some(&t) == eos.as_ref())
                    };
                    let mut flag = is_sep(&middle[0]) && last.is_none();
                    if middle.len() == 2 && is_sep(&middle[1]) {
                        flag = true;
                    }
                    add_sep = Some(flag);
                }
            }
        }
    }
    (add_bos, add_eos, add_sep)
}

/// `add_prefix_space` of the byte-level pre-tokenizer (as `tokenizer.ggml.add_space_prefix`).
fn byte_level_prefix_space(tj: &Json) -> Option<bool> {
    let pt = tj.get("pre_tokenizer")?;
    let list: Vec<&Json> = match pt.get("type").and_then(Json::as_str) {
        Some("Sequence") => pt.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![pt],
    };
    list.into_iter()
        .find(|p| p.get("type").and_then(Json::as_str) == Some("ByteLevel"))?
        .get("add_prefix_space")?
        .as_bool()
}
