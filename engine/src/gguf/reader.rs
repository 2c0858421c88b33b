//! GGUF reader: validates the whole header against the file before anything trusts it.
//!
//! Order of checks follows the file: magic, version, counts (bounded by the bytes left before any
//! allocation), metadata (keys UTF-8, unique, known value types, bounded nesting), tensor infos
//! (names, dims, types, overflow-checked sizes), alignment, then tensor ranges (aligned, inside the
//! file, not overlapping). Tensor data is never copied: `tensor_data` returns a slice of the map.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use airlock_kernels::types::GgmlType;

use super::error::{GgufError, Result};
use super::value::{Array, StrArray, Value, ValueType};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// ggml's GGML_MAX_NAME is 64 including the NUL; longer names are refused by llama.cpp too.
pub const MAX_TENSOR_NAME: usize = 63;
/// Caps that careful loaders use (ollama: 16 MiB strings); a real file is far below them.
pub const MAX_STRING_LEN: u64 = 16 << 20;
pub const MAX_KEY_LEN: u64 = 64 << 10;
pub const MAX_ARRAY_DEPTH: usize = 3;
/// Largest alignment accepted; ggml uses 32, some writers 64 or a page.
pub const MAX_ALIGNMENT: u64 = 1 << 16;

/// The bytes of a GGUF file: memory-mapped, or read into memory (`--no-mmap`, tests, fuzzing).
pub enum Source {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Source {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Source::Mmap(m) => m,
            Source::Owned(v) => v,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
    /// Where this tensor's info record starts in the file (for error messages).
    pub info_offset: u64,
}

impl TensorInfo {
    /// Row length (innermost dimension).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows: product of all dimensions past the first.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetadataEntry {
    pub key: String,
    pub value: Value,
    pub offset: u64,
}

pub struct GgufFile {
    source: Source,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<MetadataEntry>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

pub struct OpenOptions {
    /// Read the file into memory instead of mapping it.
    pub no_mmap: bool,
}

impl GgufFile {
    /// Map `path` and validate it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &OpenOptions { no_mmap: false })
    }

    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let source = if opts.no_mmap {
            Source::Owned(std::fs::read(path).map_err(io)?)
        } else {
            let file = File::open(path).map_err(io)?;
            // SAFETY: the map is read-only. Another process truncating or rewriting the file while
            // it is mapped would change the bytes under us (or fault); every engine that maps model
            // files accepts this, and the header is validated from the mapped bytes once, up front.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            Source::Mmap(map)
        };
        Self::parse(source)
    }

    /// Validate bytes already in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Source::Owned(bytes))
    }

    /// Validate `bytes` without keeping them (for fuzzing and `inspect` on a slice).
    pub fn validate(bytes: &[u8]) -> Result<()> {
        Parsed::parse(bytes).map(|_| ())
    }

    fn parse(source: Source) -> Result<Self> {
        let p = Parsed::parse(&source)?;
        Ok(GgufFile {
            version: p.version,
            alignment: p.alignment,
            data_offset: p.data_offset,
            metadata: p.metadata,
            key_index: p.key_index,
            tensors: p.tensors,
            tensor_index: p.tensor_index,
            source,
        })
    }

    /// Lock the mapped pages in memory (`--mlock`).
    pub fn mlock(&self) -> std::io::Result<()> {
        match &self.source {
            Source::Mmap(m) => m.lock(),
            Source::Owned(_) => Ok(()),
        }
    }

    pub fn file_size(&self) -> u64 {
        self.source.len() as u64
    }

    pub fn bytes(&self) -> &[u8] {
        &self.source
    }

    pub fn metadata(&self) -> &[MetadataEntry] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].value)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u32()
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    pub fn get_array(&self, key: &str) -> Option<&Array> {
        self.get(key)?.as_array()
    }

    pub fn get_str_array(&self, key: &str) -> Option<&StrArray> {
        match self.get_array(key)? {
            Array::String(s) => Some(s),
            _ => None,
        }
    }

    /// An integer array as i32 (token_type); None if missing, not integers, or out of i32 range.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_array(key)?
            .to_i64_vec()?
            .into_iter()
            .map(|v| i32::try_from(v).ok())
            .collect()
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, straight from the map. Ranges were checked at open, so this cannot be
    /// out of bounds for a `TensorInfo` of this file; a foreign one yields an empty slice.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_offset.saturating_add(t.offset);
        let end = start.saturating_add(t.n_bytes);
        usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| self.source.get(s..e))
            .unwrap_or(&[])
    }
}

/// Result of parsing, independent of who owns the bytes.
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<MetadataEntry>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader that knows its position for error messages.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            });
        }
        // n <= remaining <= usize::MAX, so the cast and the slice are in range.
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that says how many items of at least `min_size` bytes follow: refused at once if
    /// the rest of the file could not hold them, so no allocation is ever sized by a lie.
    fn count(&mut self, min_size: u64, what: &dyn Fn() -> String) -> Result<u64> {
        let offset = self.offset();
        let n = self.u64(what)?;
        let max = self.remaining() / min_size.max(1);
        if n > max {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset,
                count: n,
                max,
            });
        }
        Ok(n)
    }

    fn string(&mut self, cap: u64, what: &dyn Fn() -> String) -> Result<&'a str> {
        let offset = self.offset();
        let len = self.u64(what)?;
        if len > cap {
            return Err(GgufError::CountTooLarge {
                what: format!("length of {}", what()),
                offset,
                count: len,
                max: cap,
            });
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what: what(),
            offset,
        })
    }
}

impl Parsed {
    fn parse(buf: &[u8]) -> Result<Parsed> {
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.array::<4>(&|| "magic".into()).map_err(|_| {
            let mut found = [0u8; 4];
            found[..buf.len().min(4)].copy_from_slice(&buf[..buf.len().min(4)]);
            GgufError::BadMagic { found }
        })?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32(&|| "version".into())?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        // Smallest tensor info: name length + 1-byte name + n_dims + one dim + type + offset.
        let n_tensors = c.count(8 + 1 + 4 + 8 + 4 + 8, &|| "tensor count".into())?;
        // Smallest metadata entry: key length + 1-byte key + value type + 1-byte value.
        let n_kv = c.count(8 + 1 + 4 + 1, &|| "metadata entry count".into())?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let offset = c.offset();
            let key = c.string(MAX_KEY_LEN, &|| format!("key of metadata entry {i}"))?;
            if key.is_empty() {
                return Err(GgufError::Invalid {
                    what: format!("key of metadata entry {i}"),
                    offset,
                    reason: "empty key".into(),
                });
            }
            let type_offset = c.offset();
            let type_id = c.u32(&|| format!("value type of {key:?}"))?;
            let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.to_string(),
                offset: type_offset,
                type_id,
            })?;
            let value = read_value(&mut c, ty, key, 0)?;
            if key_index.insert(key.to_string(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey {
                    key: key.to_string(),
                    offset,
                });
            }
            metadata.push(MetadataEntry {
                key: key.to_string(),
                value,
                offset,
            });
        }

        let alignment = match key_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let e: &MetadataEntry = &metadata[i];
                let Value::U32(a) = e.value else {
                    return Err(GgufError::WrongKeyType {
                        key: e.key.clone(),
                        offset: e.offset,
                        expected: "u32",
                        found: e.value.value_type().name(),
                    });
                };
                let a = a as u64;
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(GgufError::Invalid {
                        what: "general.alignment".into(),
                        offset: e.offset,
                        reason: format!(
                            "{a} is not a power of two between 1 and {MAX_ALIGNMENT}"
                        ),
                    });
                }
                a
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let t = read_tensor_info(&mut c, i)?;
            if tensor_index.insert(t.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor {
                    name: t.name,
                    offset: t.info_offset,
                });
            }
            tensors.push(t);
        }

        let header_end = c.offset();
        // header_end <= file length and alignment <= 2^16, so this cannot overflow.
        let data_offset = header_end.div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        // With no tensors the data section may be absent entirely.
        let data_len = file_len.saturating_sub(data_offset);
        if !tensors.is_empty() && data_offset > file_len {
            return Err(GgufError::Truncated {
                what: "padding before the tensor data section".into(),
                offset: header_end,
                needed: data_offset - header_end,
                available: file_len - header_end,
            });
        }
        for t in &tensors {
            if t.offset % alignment != 0 {
                return Err(GgufError::BadTensor {
                    name: t.name.clone(),
                    offset: t.info_offset,
                    reason: format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        t.offset
                    ),
                });
            }
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(GgufError::BadTensor {
                    name: t.name.clone(),
                    offset: t.info_offset,
                    reason: format!(
                        "data [{}, +{}) lies outside the data section ({data_len} bytes at file offset {data_offset})",
                        t.offset, t.n_bytes
                    ),
                });
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| (tensors[i].offset, tensors[i].n_bytes));
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            // Ranges are in bounds, so offset + n_bytes does not overflow.
            if b.offset < a.offset + a.n_bytes && a.n_bytes > 0 && b.n_bytes > 0 {
                return Err(GgufError::OverlappingTensors {
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }

        Ok(Parsed {
            version,
            alignment,
            data_offset,
            metadata,
            key_index,
            tensors,
            tensor_index,
        })
    }
}

fn read_tensor_info(c: &mut Cursor, i: u64) -> Result<TensorInfo> {
    let info_offset = c.offset();
    let name = c.string(MAX_KEY_LEN, &|| format!("name of tensor {i}"))?;
    let bad = |reason: String| GgufError::BadTensor {
        name: name.to_string(),
        offset: info_offset,
        reason,
    };
    if name.is_empty() {
        return Err(bad(format!("tensor {i} has an empty name")));
    }
    if name.len() > MAX_TENSOR_NAME {
        return Err(bad(format!(
            "name is {} bytes, more than ggml's limit of {MAX_TENSOR_NAME}",
            name.len()
        )));
    }
    let what = || format!("info of tensor {name:?}");
    let n_dims = c.u32(&what)? as usize;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(bad(format!("n_dims is {n_dims}, must be 1..={MAX_DIMS}")));
    }
    let mut dims = Vec::with_capacity(n_dims);
    for _ in 0..n_dims {
        dims.push(c.u64(&what)?);
    }
    let type_id = c.u32(&what)?;
    let offset = c.u64(&what)?;
    let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
        name: name.to_string(),
        offset: info_offset,
        type_id,
    })?;
    if let Some(d) = dims.iter().position(|&d| d == 0 || d > i64::MAX as u64) {
        return Err(bad(format!(
            "dimension {d} is {}, must be between 1 and 2^63-1",
            dims[d]
        )));
    }
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad(format!("element count of shape {dims:?} overflows")))?;
    let bs = ty.block_size() as u64;
    if dims[0] % bs != 0 {
        return Err(bad(format!(
            "row length {} is not a multiple of {}'s block size {bs}",
            dims[0],
            ty.name()
        )));
    }
    let n_bytes = (n_elements / bs)
        .checked_mul(ty.type_size() as u64)
        .ok_or_else(|| bad(format!("byte size of shape {dims:?} overflows")))?;
    Ok(TensorInfo {
        name: name.to_string(),
        dims,
        ty,
        offset,
        n_elements,
        n_bytes,
        info_offset,
    })
}

fn read_value(c: &mut Cursor, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
    let what = || format!("value of {key:?}");
    let offset = c.offset();
    Ok(match ty {
        ValueType::U8 => Value::U8(c.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(i8::from_le_bytes(c.array(&what)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(&what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(&what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        ValueType::Bool => Value::Bool(read_bool(c, key, offset)?),
        ValueType::String => Value::String(c.string(MAX_STRING_LEN, &what)?.to_string()),
        ValueType::Array => Value::Array(read_array(c, key, depth)?),
    })
}

fn read_bool(c: &mut Cursor, key: &str, offset: u64) -> Result<bool> {
    match c.array::<1>(&|| format!("value of {key:?}"))?[0] {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(GgufError::Invalid {
            what: format!("bool value of {key:?}"),
            offset,
            reason: format!("byte {b} is neither 0 nor 1"),
        }),
    }
}

fn read_array(c: &mut Cursor, key: &str, depth: usize) -> Result<Array> {
    let offset = c.offset();
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep {
            key: key.to_string(),
            offset,
            max_depth: MAX_ARRAY_DEPTH,
        });
    }
    let what = || format!("array of {key:?}");
    let type_id = c.u32(&what)?;
    let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_string(),
        offset,
        type_id,
    })?;
    let n = c.count(ty.min_encoded_size(), &|| format!("element count of {key:?}"))? as usize;

    fn fixed<const N: usize, T>(
        c: &mut Cursor,
        n: usize,
        what: &dyn Fn() -> String,
        f: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        // n * N bytes were shown to be present by `count`, so this reads without reallocating.
        let bytes = c.take(n as u64 * N as u64, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|ch| {
                let mut a = [0u8; N];
                a.copy_from_slice(ch);
                f(a)
            })
            .collect())
    }

    Ok(match ty {
        ValueType::U8 => Array::U8(fixed(c, n, &what, |[b]: [u8; 1]| b)?),
        ValueType::I8 => Array::I8(fixed(c, n, &what, i8::from_le_bytes)?),
        ValueType::U16 => Array::U16(fixed(c, n, &what, u16::from_le_bytes)?),
        ValueType::I16 => Array::I16(fixed(c, n, &what, i16::from_le_bytes)?),
        ValueType::U32 => Array::U32(fixed(c, n, &what, u32::from_le_bytes)?),
        ValueType::I32 => Array::I32(fixed(c, n, &what, i32::from_le_bytes)?),
        ValueType::F32 => Array::F32(fixed(c, n, &what, f32::from_le_bytes)?),
        ValueType::U64 => Array::U64(fixed(c, n, &what, u64::from_le_bytes)?),
        ValueType::I64 => Array::I64(fixed(c, n, &what, i64::from_le_bytes)?),
        ValueType::F64 => Array::F64(fixed(c, n, &what, f64::from_le_bytes)?),
        ValueType::Bool => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let at = c.offset();
                v.push(read_bool(c, key, at)?);
            }
            Array::Bool(v)
        }
        ValueType::String => {
            // First pass finds the total size so the buffer is allocated once, exactly.
            let start = c.pos;
            let mut total = 0usize;
            for i in 0..n {
                total += c.string(MAX_STRING_LEN, &|| format!("string {i} of {key:?}"))?.len();
            }
            c.pos = start;
            let mut a = StrArray::with_capacity(n, total);
            for i in 0..n {
                a.push(c.string(MAX_STRING_LEN, &|| format!("string {i} of {key:?}"))?);
            }
            Array::String(a)
        }
        ValueType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(c, key, depth + 1)?);
            }
            Array::Array(v)
        }
    })
}
