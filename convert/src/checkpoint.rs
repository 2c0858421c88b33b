//! A Hugging Face Llama checkpoint on disk: `config.json` and the weights, one
//! `model.safetensors` or the shards listed in `model.safetensors.index.json`, memory-mapped.
//!
//! Every safetensors header is checked before anything trusts it: its length against the file,
//! UTF-8, JSON, each tensor's dtype, shape and offsets (in range, no overlap, no gap), and then the
//! `safetensors` crate validates it again.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use airlock_kernels::GgmlType;
use serde_json::{Map, Value as Json};

use crate::error::{ConvertError, Result};

/// Largest JSON file read (tokenizer.json of real models is ~10-20 MB).
pub const MAX_JSON_BYTES: u64 = 256 << 20;
/// Largest safetensors header accepted (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Reads and parses a JSON file, bounded in size.
pub fn read_json(path: &Path) -> Result<Json> {
    let bytes = airlock_engine::bounded::read_bounded(path, MAX_JSON_BYTES).map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidData {
            ConvertError::json(path, format!("too large for a JSON file: {source}"))
        } else {
            io_or_missing(path, source, "JSON")
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ConvertError::json(path, format!("not JSON: {e}")))
}

fn io_or_missing(path: &Path, source: std::io::Error, what: &str) -> ConvertError {
    if source.kind() == std::io::ErrorKind::NotFound {
        ConvertError::MissingFile {
            path: path.into(),
            what: what.into(),
        }
    } else {
        ConvertError::Io {
            path: path.into(),
            error: source,
        }
    }
}

/// The hyperparameters of a `LlamaForCausalLM` config.json.
#[derive(Clone, Debug)]
pub struct HfConfig {
    pub path: PathBuf,
    pub raw: Map<String, Json>,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// `head_dim` when config.json states it.
    pub head_dim_explicit: Option<usize>,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Map<String, Json>>,
    pub tied: bool,
}

impl HfConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let json = read_json(path)?;
        Self::from_json(path, json)
    }

    pub fn from_json(path: &Path, json: Json) -> Result<Self> {
        let Json::Object(raw) = json else {
            return Err(ConvertError::json(path, "expected a JSON object"));
        };
        let archs: Vec<&str> = raw
            .get("architectures")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        if !archs.contains(&"LlamaForCausalLM") {
            let model_type = raw.get("model_type").and_then(Json::as_str).unwrap_or("?");
            return Err(ConvertError::Unsupported {
                path: path.into(),
                msg: format!(
                    "architectures {archs:?} (model_type {model_type:?}); airlock converts LlamaForCausalLM only"
                ),
            });
        }
        let bad = |msg: String| ConvertError::json(path, msg);
        let int = |key: &str| -> Result<Option<usize>> {
            match raw.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0 && n < (1 << 31))
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("{key} must be a positive integer, got {v}"))),
            }
        };
        let need = |key: &str| -> Result<usize> {
            int(key)?.ok_or_else(|| bad(format!("missing required key {key:?}")))
        };
        let n_layers = need("num_hidden_layers")?;
        let hidden = need("hidden_size")?;
        let ffn = need("intermediate_size")?;
        let n_head = need("num_attention_heads")?;
        let n_head_kv = int("num_key_value_heads")?.unwrap_or(n_head);
        let vocab_size = need("vocab_size")?;
        let context_length = int("max_position_embeddings")?.unwrap_or(2048);
        let head_dim_explicit = int("head_dim")?;
        if head_dim_explicit.is_none() && hidden % n_head != 0 {
            return Err(bad(format!(
                "num_attention_heads {n_head} does not divide hidden_size {hidden}"
            )));
        }
        let head_dim = head_dim_explicit.unwrap_or(hidden / n_head);
        if head_dim % 2 != 0 {
            return Err(bad(format!("head size {head_dim} must be even")));
        }
        if n_head % n_head_kv != 0 {
            return Err(bad(format!(
                "num_key_value_heads {n_head_kv} does not divide num_attention_heads {n_head}"
            )));
        }
        let float = |v: &Json, key: &str| -> Result<f64> {
            v.as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| bad(format!("{key} must be a positive number, got {v}")))
        };
        let rms_eps = match raw.get("rms_norm_eps") {
            Some(v) => float(v, "rms_norm_eps")?,
            None => 1e-6,
        };
        // transformers 5 moved rope settings into rope_parameters; older configs have
        // rope_theta and rope_scaling at the top level.
        let rope_params = raw.get("rope_parameters").and_then(Json::as_object);
        let rope_theta = match rope_params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| raw.get("rope_theta"))
        {
            Some(v) => float(v, "rope_theta")?,
            None => 10000.0,
        };
        let mut rope_scaling = match raw.get("rope_scaling") {
            None | Some(Json::Null) => None,
            Some(Json::Object(m)) => Some(m.clone()),
            Some(v) => return Err(bad(format!("rope_scaling must be an object, got {v}"))),
        };
        if rope_scaling.is_none() {
            if let Some(p) = rope_params {
                let mut m = p.clone();
                m.remove("rope_theta");
                let kind = rope_type_of(&m);
                if kind.is_some_and(|k| k != "default") {
                    rope_scaling = Some(m);
                }
            }
        }
        if let Some(m) = &rope_scaling {
            match rope_type_of(m) {
                Some("llama3") | Some("linear") | Some("default") | None => {}
                Some(other) => {
                    return Err(ConvertError::Unsupported {
                        path: path.into(),
                        msg: format!(
                            "rope_scaling type {other:?}; airlock supports llama3, linear or none"
                        ),
                    })
                }
            }
            if rope_type_of(m) == Some("default") {
                rope_scaling = None;
            }
        }
        if let Some(act) = raw.get("hidden_act").and_then(Json::as_str) {
            if act != "silu" {
                return Err(ConvertError::Unsupported {
                    path: path.into(),
                    msg: format!("hidden_act {act:?}; Llama uses silu"),
                });
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if raw.get(key).and_then(Json::as_bool) == Some(true) {
                return Err(ConvertError::Unsupported {
                    path: path.into(),
                    msg: format!("{key} = true; airlock's Llama has no biases"),
                });
            }
        }
        let tied = raw
            .get("tie_word_embeddings")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        Ok(HfConfig {
            path: path.into(),
            raw,
            n_layers,
            hidden,
            ffn,
            n_head,
            n_head_kv,
            head_dim_explicit,
            head_dim,
            vocab_size,
            context_length,
            rms_eps,
            rope_theta,
            rope_scaling,
            tied,
        })
    }

    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.raw
            .get(key)
            .and_then(Json::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }
}

/// `rope_type` (or the older `type`) of a rope_scaling object, lower-case.
pub fn rope_type_of(m: &Map<String, Json>) -> Option<&str> {
    m.get("rope_type")
        .or_else(|| m.get("type"))
        .and_then(Json::as_str)
}

/// Dtypes a checkpoint tensor may have.
fn ggml_of_dtype(dtype: &str) -> Option<GgmlType> {
    match dtype {
        "BF16" => Some(GgmlType::BF16),
        "F16" => Some(GgmlType::F16),
        "F32" => Some(GgmlType::F32),
        _ => None,
    }
}

/// Element sizes of every dtype safetensors defines (to check offsets of tensors we reject too).
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// One tensor of a checkpoint, as the header declares it.
#[derive(Clone, Debug)]
pub struct StTensor {
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// One memory-mapped safetensors file with a validated header.
pub struct StFile {
    pub path: PathBuf,
    map: memmap2::Mmap,
    pub tensors: BTreeMap<String, StTensor>,
}

impl StFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| io_or_missing(path, source, "weights"))?;
        // SAFETY: the map is read-only; a checkpoint file changed by another process while it is
        // converted would change the bytes read (or fault), which every mmap-based loader accepts.
        // All offsets are validated against the map's length before any slice is taken.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|error| ConvertError::Io {
            path: path.into(),
            error,
        })?;
        let tensors = parse_header(path, &map)?;
        // Second opinion from the reference crate (same rules, stricter JSON typing).
        safetensors::SafeTensors::deserialize(&map).map_err(|e| ConvertError::BadSafetensors {
            path: path.into(),
            msg: format!("{e:?}"),
        })?;
        Ok(StFile {
            path: path.into(),
            map,
            tensors,
        })
    }

    pub fn bytes(&self, t: &StTensor) -> &[u8] {
        self.map.get(t.start..t.end).unwrap_or(&[])
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Parses and checks a safetensors header against the file's bytes (`path` only names the file
/// in errors). Every tensor it returns has a known dtype, a shape whose byte size matches its
/// `data_offsets`, and a range inside `bytes` that overlaps no other. Public for the fuzzer.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, StTensor>> {
    let bad = |msg: String| ConvertError::BadSafetensors {
        path: path.into(),
        msg,
    };
    if bytes.len() < 8 {
        return Err(bad(format!(
            "{} bytes is too short for a header",
            bytes.len()
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8);
    let file_len = bytes.len() as u64;
    if n > file_len - 8 {
        return Err(bad(format!(
            "header length {n} is larger than the file ({file_len} bytes)"
        )));
    }
    if n > MAX_HEADER {
        return Err(bad(format!("header length {n} is over the 100 MB limit")));
    }
    let header = &bytes[8..8 + n as usize];
    let text = std::str::from_utf8(header).map_err(|e| {
        bad(format!(
            "header is not UTF-8 (invalid byte at header offset {})",
            e.valid_up_to()
        ))
    })?;
    let json: Json =
        serde_json::from_str(text).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let Json::Object(obj) = json else {
        return Err(bad("header is not a JSON object".into()));
    };
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut out = BTreeMap::new();
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    for (name, info) in &obj {
        if name == "__metadata__" {
            continue;
        }
        let terr = |msg: String| ConvertError::tensor(path, name.clone(), msg);
        let dtype = info
            .get("dtype")
            .and_then(Json::as_str)
            .ok_or_else(|| terr("no dtype in the header".into()))?;
        let Some(size) = dtype_size(dtype) else {
            return Err(terr(format!(
                "unknown dtype {dtype:?} (airlock reads BF16, F16 and F32)"
            )));
        };
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(Json::as_array)
            .and_then(|a| a.iter().map(Json::as_u64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| terr("shape is not a list of integers".into()))?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(Json::as_array)
            .and_then(|a| a.iter().map(Json::as_u64).collect::<Option<Vec<_>>>())
            .filter(|v| v.len() == 2)
            .ok_or_else(|| terr("data_offsets is not a pair of integers".into()))?;
        let (s, e) = (offs[0], offs[1]);
        if s > e || e > data_len {
            return Err(terr(format!(
                "data_offsets [{s}, {e}] are out of range (the data section has {data_len} bytes)"
            )));
        }
        let n_bytes = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        if n_bytes != e - s {
            return Err(terr(format!(
                "shape {shape:?} of {dtype} takes {n_bytes} bytes but data_offsets [{s}, {e}] hold {}",
                e - s
            )));
        }
        ranges.push((s, e, name.clone()));
        out.insert(
            name.clone(),
            StTensor {
                dtype: dtype.to_string(),
                shape,
                start: (data_start + s) as usize,
                end: (data_start + e) as usize,
            },
        );
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(ConvertError::tensor(
                path,
                w[1].2.clone(),
                format!(
                    "data_offsets [{}, {}] overlap tensor {:?} at [{}, {}]",
                    w[1].0, w[1].1, w[0].2, w[0].0, w[0].1
                ),
            ));
        }
    }
    Ok(out)
}

/// The weights of a checkpoint: one or more safetensors files, tensor names resolved to files.
pub struct Weights {
    pub files: Vec<StFile>,
    /// Tensor name -> index into `files`.
    pub index: BTreeMap<String, usize>,
}

/// A resolved tensor: where its bytes are and what they are.
pub struct TensorRef<'a> {
    pub file: &'a Path,
    pub ty: GgmlType,
    /// HF shape (outermost first).
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            let json = read_json(&index_path)?;
            let map = json
                .get("weight_map")
                .and_then(Json::as_object)
                .ok_or_else(|| ConvertError::json(&index_path, "no weight_map object"))?;
            let mut names: Vec<String> = Vec::new();
            let mut wanted: BTreeMap<String, String> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ConvertError::json(
                        &index_path,
                        format!("weight_map[{tensor:?}] is not a string"),
                    )
                })?;
                let plain = Path::new(file)
                    .file_name()
                    .is_some_and(|f| f == std::ffi::OsStr::new(file));
                if !plain || file.starts_with('.') {
                    return Err(ConvertError::json(
                        &index_path,
                        format!("weight_map[{tensor:?}] = {file:?} is not a file name in the checkpoint directory"),
                    ));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
                wanted.insert(tensor.clone(), file.to_string());
            }
            names.sort();
            let mut files = Vec::new();
            for name in &names {
                files.push(StFile::open(&dir.join(name))?);
            }
            let mut index = BTreeMap::new();
            for (tensor, file) in wanted {
                let i = names.iter().position(|n| *n == file).unwrap_or(0);
                if !files[i].tensors.contains_key(&tensor) {
                    return Err(ConvertError::tensor(
                        &files[i].path,
                        tensor,
                        format!("missing: {} lists it in this shard", index_path.display()),
                    ));
                }
                index.insert(tensor, i);
            }
            Ok(Weights { files, index })
        } else if single.is_file() {
            let f = StFile::open(&single)?;
            let index = f.tensors.keys().map(|k| (k.clone(), 0)).collect();
            Ok(Weights {
                files: vec![f],
                index,
            })
        } else {
            Err(ConvertError::MissingFile {
                path: single,
                what: format!(
                    "weights: neither model.safetensors nor model.safetensors.index.json is in {}",
                    dir.display()
                ),
            })
        }
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(StFile::len).sum()
    }

    /// The tensor `name` with HF shape `shape`, as a row source.
    pub fn get(&self, name: &str, shape: &[u64]) -> Result<TensorRef<'_>> {
        let Some(&i) = self.index.get(name) else {
            let where_ = if self.files.len() == 1 {
                self.files[0].path.clone()
            } else {
                self.files[0]
                    .path
                    .parent()
                    .map(|d| d.join("model.safetensors.index.json"))
                    .unwrap_or_default()
            };
            return Err(ConvertError::tensor(where_, name, "missing"));
        };
        let f = &self.files[i];
        let t = &f.tensors[name];
        let ty = ggml_of_dtype(&t.dtype).ok_or_else(|| {
            ConvertError::tensor(
                &f.path,
                name,
                format!(
                    "dtype {} is not supported (airlock reads BF16, F16 and F32)",
                    t.dtype
                ),
            )
        })?;
        if t.shape != shape {
            return Err(ConvertError::tensor(
                &f.path,
                name,
                format!(
                    "shape {:?} disagrees with config.json, which implies {shape:?}",
                    t.shape
                ),
            ));
        }
        Ok(TensorRef {
            file: &f.path,
            ty,
            shape: &t.shape,
            data: f.bytes(t),
        })
    }

    /// Path of the file holding `name` (for messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].path.as_path())
    }
}
