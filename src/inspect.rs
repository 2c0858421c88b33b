//! `airlock inspect`: a careful gguf-dump. Validates the whole file (the same checks every
//! airlock command makes before trusting a file), then prints the header, the metadata (long
//! strings and arrays summarised), the tensor table, totals and a verdict. The verdict also
//! judges what the file holds with the engine's own checks ([`airlock_engine::load::validate`]):
//! the well-known keys' types and ranges, and everything `run` checks (hyperparameters against
//! the tensors, math-changing keys, the tokenizer, the chat templates).
//!
//! Verdicts: `valid` (airlock runs it); `valid GGUF file; airlock cannot run it: REASON` (another
//! architecture, or tensor types airlock cannot compute yet: the file itself is fine); `invalid`
//! (the container, a key or the model is broken, each problem listed).
//!
//! `--json` prints one JSON document instead, for scripts. Schema (`schema_version` 2; fields are
//! only ever added within a version; version 2 added `runnable` and `problems`, and `valid` is
//! false for a readable container whose keys or model are broken, with the rest still given):
//!
//! ```text
//! {
//!   "schema_version": 1,
//!   "file": "<path as given>",
//!   "file_size": <bytes>,
//!   "valid": true | false,
//!   "error": null | { "kind": "<GgufError variant> | Metadata | Model",
//!                     "message": "<one line: what and where>" },
//!   // the rest only when the container could be read:
//!   "runnable": bool,            // airlock runs this file as it is
//!   "problems": [ "<what is wrong, one per key or model check>" ],
//!   "header": { "version", "tensor_count", "kv_count", "alignment", "data_offset" },
//!   "metadata": [ { "key", "type": "<value type>", "offset",
//!                   // scalars and strings:
//!                   "value": <number | bool | string (full) | null for a non-finite float>,
//!                   // arrays:
//!                   "element_type", "length", "head": [<first up to 16 elements, each as
//!                   "value" above; nested arrays as { "element_type", "length", "head" }>] } ],
//!   "tensors": [ { "name", "type", "type_id", "shape": [<ne0 (row length) first>],
//!                  "n_elements", "n_bytes", "offset" (relative to the data section),
//!                  "file_offset" (absolute), "computable": bool } ],
//!   "totals": { "parameters", "tensor_bytes", "bits_per_weight",
//!               "file_type": null | { "id", "name": "<llama.cpp LLAMA_FTYPE_* suffix> | null",
//!                                     "label": "<llama.cpp's name, e.g. Q4_K - Medium> | null" },
//!               // the mix: one entry per tensor type, by type name
//!               "types": [ { "type", "tensors", "n_elements", "n_bytes", "bits_per_weight" } ] },
//!   "unsupported_types": [ "<ggml type airlock cannot compute yet>" ],
//!   "unsupported_tensors": [ "<name of each tensor of those types, in file order>" ],
//!   "warnings": [ "<llama.cpp compatibility notes>" ]
//! }
//! ```
//!
//! Exit status: 0 for a valid file, 1 for an invalid or unreadable one (the error on stderr, and
//! in `--json` mode also in the document on stdout when the file could be read).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock_engine::gguf::{Array, FileType, GgufError, GgufFile, TensorInfo, Value};
use airlock_engine::load::{open_gguf, LoadError};
use anyhow::Context;
use serde_json::{json, Value as Json};

pub const SCHEMA_VERSION: u32 = 2;
/// Array elements shown in text (and in `head` in JSON).
const TEXT_HEAD: usize = 5;
const JSON_HEAD: usize = 16;
/// Strings longer than this are cut in the text output (their length is shown).
const TEXT_STRING: usize = 60;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// GGUF file to inspect
    pub file: PathBuf,
    /// Print a stable JSON document instead of text (schema in `airlock inspect --help` docs:
    /// src/inspect.rs)
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let path = &args.file;
    let file_size = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read", path.display()))?
        .len();
    let f = match open_gguf(path, false) {
        Ok(f) => f,
        Err(LoadError::Open { path, error }) => {
            return Err(
                anyhow::Error::new(error).context(format!("{}: cannot read", path.display()))
            )
        }
        Err(LoadError::Gguf { error: e, .. }) => {
            eprintln!("error: {}: invalid GGUF file: {e}", path.display());
            if args.json {
                let doc = json!({
                    "schema_version": SCHEMA_VERSION,
                    "file": path.display().to_string(),
                    "file_size": file_size,
                    "valid": false,
                    "error": { "kind": error_kind(&e), "message": e.to_string() },
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            return Ok(ExitCode::FAILURE);
        }
        // open_gguf fails only with the two errors above.
        Err(e) => return Err(e.into()),
    };
    let f = std::sync::Arc::new(f);
    let judged = judge(&f, path);
    let report = Report::new(&f);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json(path, &f, &judged))?
        );
    } else {
        print!("{}", report.text(path, &f, &judged));
    }
    if let Judged::Invalid(_, problems) = &judged {
        eprintln!(
            "error: {}: invalid: {}",
            path.display(),
            problems.first().map_or("", String::as_str)
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the engine's checks say of a readable file.
enum Judged {
    Runs,
    /// The file is fine, but airlock cannot run it (the reason).
    CannotRun(String),
    /// Broken keys ("Metadata") or model ("Model"): every problem found.
    Invalid(&'static str, Vec<String>),
}

fn judge(f: &std::sync::Arc<GgufFile>, path: &std::path::Path) -> Judged {
    use airlock_engine::llama::ModelError;
    match airlock_engine::load::validate(f.clone(), path) {
        Ok(()) => Judged::Runs,
        Err(LoadError::Keys { problems, .. }) => {
            Judged::Invalid("Metadata", problems.iter().map(|p| p.to_string()).collect())
        }
        Err(LoadError::Model { error, .. }) => match error {
            ModelError::UnsupportedArchitecture(_) | ModelError::UnsupportedTensorTypes(_) => {
                Judged::CannotRun(error.to_string())
            }
            ModelError::MissingKey(k) if k == "general.architecture" => {
                Judged::CannotRun(format!("not a model file (metadata key {k} is missing)"))
            }
            e => Judged::Invalid("Model", vec![e.to_string()]),
        },
        // The path is in the document already; keep what follows it.
        Err(e) => {
            let text = e.to_string();
            let prefix = format!("{}: ", path.display());
            let text = text
                .strip_prefix(&prefix)
                .map(str::to_string)
                .unwrap_or(text);
            Judged::Invalid("Model", vec![text])
        }
    }
}

fn error_kind(e: &GgufError) -> &'static str {
    match e {
        GgufError::Io { .. } => "Io",
        GgufError::BadMagic { .. } => "BadMagic",
        GgufError::UnsupportedVersion { .. } => "UnsupportedVersion",
        GgufError::Truncated { .. } => "Truncated",
        GgufError::CountTooLarge { .. } => "CountTooLarge",
        GgufError::InvalidUtf8 { .. } => "InvalidUtf8",
        GgufError::Invalid { .. } => "Invalid",
        GgufError::UnknownValueType { .. } => "UnknownValueType",
        GgufError::NestingTooDeep { .. } => "NestingTooDeep",
        GgufError::DuplicateKey { .. } => "DuplicateKey",
        GgufError::WrongKeyType { .. } => "WrongKeyType",
        GgufError::DuplicateTensor { .. } => "DuplicateTensor",
        GgufError::UnknownTensorType { .. } => "UnknownTensorType",
        GgufError::BadTensor { .. } => "BadTensor",
        GgufError::OverlappingTensors { .. } => "OverlappingTensors",
    }
}

/// llama.cpp's `llama_ftype` (llama.h) suffix for `general.file_type` = `id`.
pub fn file_type_name(id: u32) -> Option<&'static str> {
    airlock_engine::gguf::FileType::from_id(id).map(|f| f.name)
}

/// Bits per weight of `bytes` holding `elements` values (0 for none).
fn bpw(bytes: u64, elements: u64) -> f64 {
    if elements == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / elements as f64
    }
}

/// Tensor names, the first `shown` and a count of the rest.
fn name_list(names: &[&str], shown: usize) -> String {
    let mut s = names
        .iter()
        .take(shown)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > shown {
        let _ = write!(s, " and {} more", names.len() - shown);
    }
    s
}

/// Per-type tallies, totals and compatibility notes computed once for both outputs.
struct Report {
    parameters: u64,
    tensor_bytes: u64,
    /// Type name -> (tensors, elements, bytes), sorted by name.
    types: BTreeMap<&'static str, (usize, u64, u64)>,
    unsupported: Vec<&'static str>,
    /// Tensors of the unsupported types, in file order.
    unsupported_tensors: Vec<String>,
    file_type: Option<u32>,
    warnings: Vec<String>,
}

impl Report {
    fn new(f: &GgufFile) -> Self {
        let mut types = BTreeMap::new();
        let (mut parameters, mut tensor_bytes) = (0u64, 0u64);
        for t in f.tensors() {
            let e = types.entry(t.ty.name()).or_insert((0usize, 0u64, 0u64));
            e.0 += 1;
            e.1 += t.n_elements;
            e.2 += t.n_bytes;
            parameters += t.n_elements;
            tensor_bytes += t.n_bytes;
        }
        let mut unsupported: Vec<&'static str> = f
            .tensors()
            .iter()
            .filter(|t| !t.ty.can_compute())
            .map(|t| t.ty.name())
            .collect();
        unsupported.sort_unstable();
        unsupported.dedup();
        let unsupported_tensors = f
            .tensors()
            .iter()
            .filter(|t| !t.ty.can_compute())
            .map(|t| t.name.clone())
            .collect();
        let mut warnings = Vec::new();
        let mut expect = 0u64;
        for t in f.tensors() {
            if t.offset != expect {
                warnings.push(format!(
                    "tensor {:?} is at data offset {}, not {expect}: llama.cpp requires tensors packed in info order and will refuse this file",
                    t.name, t.offset
                ));
                break;
            }
            expect += t.n_bytes.div_ceil(f.alignment) * f.alignment;
        }
        if let Some(e) = f
            .metadata()
            .iter()
            .find(|e| matches!(e.value, Value::Array(Array::Array(_))))
        {
            warnings.push(format!(
                "metadata key {:?} holds nested arrays, which llama.cpp cannot read",
                e.key
            ));
        }
        Report {
            parameters,
            tensor_bytes,
            types,
            unsupported,
            unsupported_tensors,
            file_type: f.get_u32("general.file_type"),
            warnings,
        }
    }

    fn bits_per_weight(&self) -> f64 {
        bpw(self.tensor_bytes, self.parameters)
    }

    fn text(&self, path: &std::path::Path, f: &GgufFile, judged: &Judged) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "{}", path.display());
        let _ = writeln!(o, "GGUF version {}", f.version);
        let _ = writeln!(
            o,
            "  file size:     {} bytes ({})",
            f.file_size(),
            human(f.file_size())
        );
        let _ = writeln!(o, "  tensor count:  {}", f.tensors().len());
        let _ = writeln!(o, "  kv count:      {}", f.metadata().len());
        let _ = writeln!(o, "  alignment:     {}", f.alignment);
        let _ = writeln!(o, "  data offset:   {}", f.data_offset);

        let _ = writeln!(o, "\nmetadata ({} entries):", f.metadata().len());
        let kw = f
            .metadata()
            .iter()
            .map(|e| e.key.len())
            .max()
            .unwrap_or(0)
            .min(48);
        for e in f.metadata() {
            let (ty, val) = text_value(&e.value);
            let _ = writeln!(o, "  {:kw$}  {:16}  {val}", e.key, ty);
        }

        let _ = writeln!(o, "\ntensors ({}):", f.tensors().len());
        let nw = f
            .tensors()
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let iw = f.tensors().len().to_string().len().max(1);
        let _ = writeln!(
            o,
            "  {:>iw$}  {:nw$}  {:8}  {:20}  {:>12}  {:>12}",
            "#", "name", "type", "shape", "bytes", "file offset"
        );
        for (i, t) in f.tensors().iter().enumerate() {
            let _ = writeln!(
                o,
                "  {i:>iw$}  {:nw$}  {:8}  {:20}  {:>12}  {:>12}",
                t.name,
                t.ty.name(),
                shape(t),
                t.n_bytes,
                f.data_offset + t.offset
            );
        }

        let _ = writeln!(o, "\ntotals:");
        let _ = writeln!(
            o,
            "  parameters:      {} ({})",
            self.parameters,
            human_count(self.parameters)
        );
        let _ = writeln!(
            o,
            "  tensor bytes:    {} ({})",
            self.tensor_bytes,
            human(self.tensor_bytes)
        );
        let _ = writeln!(o, "  bits per weight: {:.2}", self.bits_per_weight());
        let ft = match self.file_type.map(|id| (id, FileType::from_id(id))) {
            None => "not given".to_string(),
            Some((id, None)) => format!("unknown ({id})"),
            Some((id, Some(f))) => format!("{} ({id}), llama.cpp's \"{}\"", f.name, f.label),
        };
        let _ = writeln!(o, "  file type:       {ft}");
        let _ = writeln!(o, "  mix (bytes and bits per weight of each tensor type):");
        for (name, (n, elems, bytes)) in &self.types {
            let share = if self.tensor_bytes == 0 {
                0.0
            } else {
                *bytes as f64 * 100.0 / self.tensor_bytes as f64
            };
            let _ = writeln!(
                o,
                "    {name:8} {n:>5} tensors  {elems:>14} elements  {bytes:>14} bytes  {:>10}  {share:5.1}%  {:5.2} bits/weight",
                human(*bytes),
                bpw(*bytes, *elems)
            );
        }

        match judged {
            Judged::Runs => {
                let _ = writeln!(o, "\nverdict: valid");
            }
            Judged::CannotRun(why) => {
                let _ = writeln!(
                    o,
                    "\nverdict: valid GGUF file; airlock cannot run it: {why}"
                );
            }
            Judged::Invalid(_, problems) => {
                let _ = writeln!(o, "\nverdict: invalid");
                for p in problems {
                    let _ = writeln!(o, "  problem: {p}");
                }
            }
        }
        if self.unsupported.is_empty() {
            let _ = writeln!(o, "  airlock can compute every tensor type in this file");
        } else {
            let _ = writeln!(
                o,
                "  tensor types airlock cannot compute yet: {} (running this file will say \"type not supported yet\")",
                self.unsupported.join(", ")
            );
            let names: Vec<&str> = self
                .unsupported_tensors
                .iter()
                .map(String::as_str)
                .collect();
            let _ = writeln!(
                o,
                "  tensors of those types ({}): {}",
                names.len(),
                name_list(&names, 10)
            );
        }
        for w in &self.warnings {
            let _ = writeln!(o, "  warning: {w}");
        }
        o
    }

    fn json(&self, path: &std::path::Path, f: &GgufFile, judged: &Judged) -> Json {
        let metadata: Vec<Json> = f
            .metadata()
            .iter()
            .map(|e| {
                let mut m = json!({
                    "key": e.key,
                    "type": e.value.value_type().name(),
                    "offset": e.offset,
                });
                match &e.value {
                    Value::Array(a) => {
                        let s = json_array(a);
                        for k in ["element_type", "length", "head"] {
                            m[k] = s[k].clone();
                        }
                    }
                    v => m["value"] = json_scalar(v),
                }
                m
            })
            .collect();
        let tensors: Vec<Json> = f
            .tensors()
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "type": t.ty.name(),
                    "type_id": t.ty.id(),
                    "shape": t.dims,
                    "n_elements": t.n_elements,
                    "n_bytes": t.n_bytes,
                    "offset": t.offset,
                    "file_offset": f.data_offset + t.offset,
                    "computable": t.ty.can_compute(),
                })
            })
            .collect();
        let types: Vec<Json> = self
            .types
            .iter()
            .map(|(name, (n, elems, bytes))| {
                json!({ "type": name, "tensors": n, "n_elements": elems, "n_bytes": bytes,
                        "bits_per_weight": bpw(*bytes, *elems) })
            })
            .collect();
        json!({
            "schema_version": SCHEMA_VERSION,
            "file": path.display().to_string(),
            "file_size": f.file_size(),
            "valid": !matches!(judged, Judged::Invalid(..)),
            "error": match judged {
                Judged::Invalid(kind, p) => json!({ "kind": kind, "message": p.first() }),
                _ => Json::Null,
            },
            "runnable": matches!(judged, Judged::Runs),
            "problems": match judged {
                Judged::Invalid(_, p) => p.clone(),
                Judged::CannotRun(why) => vec![why.clone()],
                Judged::Runs => Vec::new(),
            },
            "header": {
                "version": f.version,
                "tensor_count": f.tensors().len(),
                "kv_count": f.metadata().len(),
                "alignment": f.alignment,
                "data_offset": f.data_offset,
            },
            "metadata": metadata,
            "tensors": tensors,
            "totals": {
                "parameters": self.parameters,
                "tensor_bytes": self.tensor_bytes,
                "bits_per_weight": self.bits_per_weight(),
                "file_type": self.file_type.map(|id| json!({
                    "id": id,
                    "name": file_type_name(id),
                    "label": FileType::from_id(id).map(|f| f.label),
                })),
                "types": types,
            },
            "unsupported_types": self.unsupported,
            "unsupported_tensors": self.unsupported_tensors,
            "warnings": self.warnings,
        })
    }
}

/// ggml order, innermost first, as gguf-dump prints it.
fn shape(t: &TensorInfo) -> String {
    t.dims
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" x ")
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

fn human_count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// A string quoted and escaped, cut to `TEXT_STRING` characters with its length when longer.
fn text_str(s: &str) -> String {
    let n = s.chars().count();
    if n <= TEXT_STRING {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(TEXT_STRING).collect();
        format!("{head:?}... ({} bytes, {n} chars)", s.len())
    }
}

/// (type column, value column) for the text listing.
fn text_value(v: &Value) -> (String, String) {
    match v {
        Value::String(s) => ("string".into(), text_str(s)),
        Value::Array(a) => (
            format!("[{}; {}]", a.element_type().name(), a.len()),
            text_array(a),
        ),
        v => (v.value_type().name().into(), text_scalar(v)),
    }
}

fn text_scalar(v: &Value) -> String {
    match v {
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => format!("{x:?}"),
        Value::F64(x) => format!("{x:?}"),
        Value::Bool(x) => x.to_string(),
        Value::String(s) => text_str(s),
        Value::Array(a) => text_array(a),
    }
}

fn text_array(a: &Array) -> String {
    let items: Vec<String> = match a {
        Array::String(s) => s.iter().take(TEXT_HEAD).map(text_str).collect(),
        Array::Array(v) => v
            .iter()
            .take(TEXT_HEAD)
            .map(|x| {
                format!(
                    "[{}; {}] {}",
                    x.element_type().name(),
                    x.len(),
                    text_array(x)
                )
            })
            .collect(),
        _ => (0..a.len().min(TEXT_HEAD))
            .filter_map(|i| a.get(i))
            .map(|v| text_scalar(&v))
            .collect(),
    };
    let more = if a.len() > TEXT_HEAD { ", ..." } else { "" };
    format!("[{}{more}]", items.join(", "))
}

fn json_scalar(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        // serde_json maps non-finite floats to null.
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(s) => json!(s),
        Value::Array(a) => json_array(a),
    }
}

fn json_array(a: &Array) -> Json {
    let head: Vec<Json> = match a {
        Array::String(s) => s.iter().take(JSON_HEAD).map(|x| json!(x)).collect(),
        Array::Array(v) => v.iter().take(JSON_HEAD).map(json_array).collect(),
        _ => (0..a.len().min(JSON_HEAD))
            .filter_map(|i| a.get(i))
            .map(|v| json_scalar(&v))
            .collect(),
    };
    json!({ "element_type": a.element_type().name(), "length": a.len(), "head": head })
}
