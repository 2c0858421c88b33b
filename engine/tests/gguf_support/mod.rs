//! Shared builders for the GGUF tests: metadata of every value type, one tensor of each type,
//! in-memory files made with the writer, and the byte positions of fields inside them.
#![allow(dead_code)]

use std::path::PathBuf;

use airlock_engine::gguf::{Array, GgufFile, GgufWriter, StrArray, TensorSpec, Value};
use airlock_kernels::types::{self, GgmlType};

/// The tiny Llama 3 fixture (llama.cpp-made, runs in milliseconds).
pub fn tiny_llama3() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama3/tiny-llama3-q8_0.gguf")
}

pub type Tensors = Vec<(TensorSpec, Vec<u8>)>;

/// A copy of the tiny model at `dir/name`, its metadata and tensors edited by `edit`.
pub fn rewrite_tiny(
    dir: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Tensors),
) -> PathBuf {
    use std::io::Write;
    let f = GgufFile::open(tiny_llama3()).unwrap();
    let mut meta: Vec<(String, Value)> = f
        .metadata()
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    let mut tensors: Tensors = f
        .tensors()
        .iter()
        .map(|t| {
            let spec = TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            };
            (spec, f.tensor_data(t).to_vec())
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let path = dir.join(name);
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut w = GgufWriter::new(out, &meta, &specs).unwrap();
    for (_, data) in &tensors {
        w.write_tensor_data(data).unwrap();
    }
    w.finish().unwrap().flush().unwrap();
    path
}

/// The real model, or a failure telling how to get it (never a silent skip).
pub fn model_path() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf_reader")
}

pub fn kv(key: &str, v: Value) -> (String, Value) {
    (key.to_string(), v)
}

/// One scalar of every value type, one array of every element type, empty arrays, and arrays
/// nested two and three deep.
pub fn every_value_metadata() -> Vec<(String, Value)> {
    let strs: StrArray = ["a", "", "héllo ▁world", "\u{0}nul"].into_iter().collect();
    vec![
        kv("general.architecture", Value::String("llama".into())),
        kv("t.u8", Value::U8(200)),
        kv("t.i8", Value::I8(-100)),
        kv("t.u16", Value::U16(60000)),
        kv("t.i16", Value::I16(-30000)),
        kv("t.u32", Value::U32(4_000_000_000)),
        kv("t.i32", Value::I32(-2_000_000_000)),
        kv("t.f32", Value::F32(-1.5e-5)),
        kv("t.bool.true", Value::Bool(true)),
        kv("t.bool.false", Value::Bool(false)),
        kv(
            "t.string",
            Value::String("{% for m in messages %}✓{% endfor %}".into()),
        ),
        kv("t.string.empty", Value::String(String::new())),
        kv("t.u64", Value::U64(u64::MAX - 1)),
        kv("t.i64", Value::I64(i64::MIN + 1)),
        kv("t.f64", Value::F64(std::f64::consts::PI)),
        kv("t.arr.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        kv("t.arr.i8", Value::Array(Array::I8(vec![-128, 0, 127]))),
        kv("t.arr.u16", Value::Array(Array::U16(vec![1, 65535]))),
        kv("t.arr.i16", Value::Array(Array::I16(vec![-32768, 5]))),
        kv("t.arr.u32", Value::Array(Array::U32(vec![7, u32::MAX]))),
        kv("t.arr.i32", Value::Array(Array::I32(vec![1, 2, 3, -4]))),
        kv(
            "t.arr.f32",
            Value::Array(Array::F32(vec![0.5, -0.0, f32::INFINITY])),
        ),
        kv(
            "t.arr.bool",
            Value::Array(Array::Bool(vec![true, false, true])),
        ),
        kv("t.arr.string", Value::Array(Array::String(strs))),
        kv("t.arr.u64", Value::Array(Array::U64(vec![u64::MAX]))),
        kv("t.arr.i64", Value::Array(Array::I64(vec![i64::MIN, 0]))),
        kv("t.arr.f64", Value::Array(Array::F64(vec![1e300, -2.25]))),
        kv("t.arr.empty", Value::Array(Array::U32(vec![]))),
        kv(
            "t.arr.empty_strings",
            Value::Array(Array::String(StrArray::new())),
        ),
        kv(
            "t.arr.nested2",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::String(["x", "yz"].into_iter().collect()),
                Array::Bool(vec![]),
            ])),
        ),
        kv(
            "t.arr.nested3",
            Value::Array(Array::Array(vec![
                Array::Array(vec![Array::U8(vec![9]), Array::F64(vec![0.25])]),
                Array::Array(vec![]),
            ])),
        ),
    ]
}

/// A shape of `rows` rows of two blocks of `ty`.
pub fn spec(name: &str, ty: GgmlType, rows: u64) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        dims: vec![ty.block_size() as u64 * 2, rows],
        ty,
    }
}

/// One tensor of every ggml type the table knows (computable or not), with shapes of 1 to 4 dims.
pub fn tensor_of_each_type() -> Vec<TensorSpec> {
    types::all()
        .iter()
        .enumerate()
        .map(|(i, &ty)| {
            let bs = ty.block_size() as u64;
            let dims = match i % 4 {
                0 => vec![bs],
                1 => vec![bs * 2, 3],
                2 => vec![bs, 2, 3],
                _ => vec![bs * 3, 1, 2, 1],
            };
            TensorSpec {
                name: format!("t{i}.{}", ty.name().to_lowercase()),
                dims,
                ty,
            }
        })
        .collect()
}

pub fn n_bytes(s: &TensorSpec) -> usize {
    let n: u64 = s.dims.iter().product();
    s.ty.row_bytes(n).unwrap() as usize
}

/// Deterministic filler bytes for tensor `i`.
pub fn filler(i: usize, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A complete file from the writer, tensors filled with `filler`.
pub fn build(metadata: &[(String, Value)], specs: &[TensorSpec]) -> Vec<u8> {
    build_version(3, metadata, specs)
}

pub fn build_version(version: u32, metadata: &[(String, Value)], specs: &[TensorSpec]) -> Vec<u8> {
    let mut w = GgufWriter::with_version(Vec::new(), version, metadata, specs).unwrap();
    for (i, s) in specs.iter().enumerate() {
        w.write_tensor_data(&filler(i, n_bytes(s))).unwrap();
    }
    w.finish().unwrap()
}

/// A small valid file: a few keys of different types and three tensors.
pub fn small_file() -> Vec<u8> {
    let metadata = vec![
        kv("general.architecture", Value::String("llama".into())),
        kv("general.alignment", Value::U32(32)),
        kv("llama.block_count", Value::U32(1)),
        kv("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        kv(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(["<s>", "a", "b"].into_iter().collect())),
        ),
        kv(
            "tokenizer.ggml.scores",
            Value::Array(Array::F32(vec![0.0, -1.0, -2.0])),
        ),
        kv(
            "t.nested",
            Value::Array(Array::Array(vec![Array::U8(vec![1])])),
        ),
    ];
    let specs = vec![
        spec("token_embd.weight", GgmlType::Q8_0, 3),
        spec("output_norm.weight", GgmlType::F32, 1),
        spec("blk.0.attn_q.weight", GgmlType::Q4_0, 2),
    ];
    build(&metadata, &specs)
}

/// Byte positions of the fields of one metadata entry.
pub struct KvAt {
    pub key: String,
    /// Start of the entry (its key length).
    pub start: usize,
    /// The value type id.
    pub type_at: usize,
    /// The value payload (for an array: its element type).
    pub value_at: usize,
}

/// Byte positions of the fields of one tensor info.
pub struct TensorAt {
    pub name: String,
    pub start: usize,
    pub n_dims_at: usize,
    pub dims_at: usize,
    pub type_at: usize,
    pub offset_at: usize,
}

pub fn kv_positions(bytes: &[u8]) -> Vec<KvAt> {
    let f = GgufFile::from_bytes(bytes.to_vec()).unwrap();
    f.metadata()
        .iter()
        .map(|e| {
            let start = e.offset as usize;
            let type_at = start + 8 + e.key.len();
            KvAt {
                key: e.key.clone(),
                start,
                type_at,
                value_at: type_at + 4,
            }
        })
        .collect()
}

pub fn tensor_positions(bytes: &[u8]) -> Vec<TensorAt> {
    let f = GgufFile::from_bytes(bytes.to_vec()).unwrap();
    f.tensors()
        .iter()
        .map(|t| {
            let start = t.info_offset as usize;
            let n_dims_at = start + 8 + t.name.len();
            let dims_at = n_dims_at + 4;
            let type_at = dims_at + 8 * t.dims.len();
            TensorAt {
                name: t.name.clone(),
                start,
                n_dims_at,
                dims_at,
                type_at,
                offset_at: type_at + 4,
            }
        })
        .collect()
}

pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The real file's metadata and tensor list, re-created with tiny tensors (one block row each):
/// the same header shapes and strings a llama.cpp file has, in a few hundred KB.
pub fn tiny_copy_of(f: &GgufFile) -> Vec<u8> {
    let metadata: Vec<(String, Value)> = f
        .metadata()
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    let specs: Vec<TensorSpec> = f
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dims: vec![t.ty.block_size() as u64],
            ty: t.ty,
        })
        .collect();
    build(&metadata, &specs)
}

/// Small deterministic PRNG (xorshift64*, seed not 0), so a failing mutation round reproduces.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
