//! Streaming GGUF writer: the header (metadata and tensor infos) is laid out up front, then each
//! tensor's bytes are written in info order and padded to the alignment, the last one too, exactly
//! as llama.cpp's `gguf_write_to_file` does. Only the header is ever held in memory.
//!
//! Output is a pure function of the inputs (no timestamps, no hash-map order), so the same
//! metadata and tensors always give the same bytes; a llama.cpp-written file re-written from its
//! parsed contents comes out byte-identical.
//!
//! Everything the reader refuses is refused here first, so whatever this writes reads back.

use std::io::Write;
use std::path::PathBuf;

use airlock_kernels::types::GgmlType;

use super::reader::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KEY_LEN,
    MAX_STRING_LEN, MAX_TENSOR_NAME,
};
use super::value::{Array, Value};

/// The GGUF version written by default (llama.cpp's current one).
pub const GGUF_VERSION: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing GGUF: {0}")]
    Io(std::io::Error),
    #[error("{path}: {error}")]
    Path {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The metadata or tensor list could not be written as a valid GGUF file.
    #[error("cannot write GGUF: {0}")]
    Invalid(String),
    /// `write_tensor_data` / `finish` called out of order or with the wrong byte count.
    #[error("GGUF writer misuse: {0}")]
    Misuse(String),
}

// By hand rather than `#[from]`, which would also make the error its `source()`: the message
// above already carries it, and a chain printer (`{:#}`) would print it twice.
impl From<std::io::Error> for WriteError {
    fn from(error: std::io::Error) -> Self {
        WriteError::Io(error)
    }
}

/// One tensor to be written: its name, ggml dims (innermost first) and type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

struct Planned {
    name: String,
    n_bytes: u64,
}

/// Writes one GGUF file to `W`. See the module docs.
///
/// ```ignore
/// let mut w = GgufWriter::new(out, &metadata, &specs)?;
/// for t in &specs { w.write_tensor_data(bytes_of(t))?; }
/// let out = w.finish()?;
/// ```
pub struct GgufWriter<W: Write> {
    out: W,
    alignment: u64,
    data_offset: u64,
    tensors: Vec<Planned>,
    /// Index of the next tensor whose data is expected.
    next: usize,
    /// Set after an I/O error: the output is incomplete and further writes are refused.
    poisoned: bool,
}

impl<W: Write> GgufWriter<W> {
    /// Validates everything, then writes the header (version 3). Tensor offsets are the running
    /// sum of the padded tensor sizes in `tensors` order, as llama.cpp requires.
    pub fn new(
        out: W,
        metadata: &[(String, Value)],
        tensors: &[TensorSpec],
    ) -> Result<Self, WriteError> {
        Self::with_version(out, GGUF_VERSION, metadata, tensors)
    }

    /// As [`GgufWriter::new`] with an explicit version: 3, or 2 (same layout; for old readers).
    pub fn with_version(
        mut out: W,
        version: u32,
        metadata: &[(String, Value)],
        tensors: &[TensorSpec],
    ) -> Result<Self, WriteError> {
        if version != 2 && version != 3 {
            return Err(WriteError::Invalid(format!(
                "GGUF version {version}: only 2 and 3 exist"
            )));
        }
        let alignment = check_metadata(metadata)?;
        let planned = plan_tensors(tensors)?;

        let mut h = Vec::new();
        h.extend_from_slice(&GGUF_MAGIC);
        put_u32(&mut h, version);
        put_u64(&mut h, tensors.len() as u64);
        put_u64(&mut h, metadata.len() as u64);
        for (key, value) in metadata {
            put_str(&mut h, key);
            put_u32(&mut h, value.value_type().id());
            put_value(&mut h, value);
        }
        let mut offset = 0u64;
        for (spec, p) in tensors.iter().zip(&planned) {
            put_str(&mut h, &spec.name);
            put_u32(&mut h, spec.dims.len() as u32);
            for &d in &spec.dims {
                put_u64(&mut h, d);
            }
            put_u32(&mut h, spec.ty.id());
            put_u64(&mut h, offset);
            offset = offset
                .checked_add(pad_len(p.n_bytes, alignment))
                .and_then(|o| o.checked_add(p.n_bytes))
                .ok_or_else(|| WriteError::Invalid("total tensor data size overflows".into()))?;
        }
        let pad = pad_len(h.len() as u64, alignment);
        h.resize(h.len() + pad as usize, 0);
        out.write_all(&h)?;
        Ok(GgufWriter {
            out,
            alignment,
            data_offset: h.len() as u64,
            tensors: planned,
            next: 0,
            poisoned: false,
        })
    }

    /// Absolute offset of the data section in the output.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Writes the next tensor's bytes (in the order the tensors were given) and its padding.
    pub fn write_tensor_data(&mut self, data: &[u8]) -> Result<(), WriteError> {
        if self.poisoned {
            return Err(WriteError::Misuse("an earlier write failed".into()));
        }
        let Some(t) = self.tensors.get(self.next) else {
            return Err(WriteError::Misuse(format!(
                "all {} tensors were already written",
                self.tensors.len()
            )));
        };
        if data.len() as u64 != t.n_bytes {
            return Err(WriteError::Misuse(format!(
                "tensor {:?} takes {} bytes, got {}",
                t.name,
                t.n_bytes,
                data.len()
            )));
        }
        let pad = pad_len(t.n_bytes, self.alignment) as usize;
        let zeros = [0u8; 64];
        let result = (|| {
            self.out.write_all(data)?;
            let mut left = pad;
            while left > 0 {
                let n = left.min(zeros.len());
                self.out.write_all(&zeros[..n])?;
                left -= n;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = result {
            self.poisoned = true;
            return Err(e.into());
        }
        self.next += 1;
        Ok(())
    }

    /// Checks every tensor was written, flushes, and hands back the output.
    pub fn finish(mut self) -> Result<W, WriteError> {
        if self.poisoned {
            return Err(WriteError::Misuse("an earlier write failed".into()));
        }
        if self.next != self.tensors.len() {
            return Err(WriteError::Misuse(format!(
                "finish after {} of {} tensors (next: {:?})",
                self.next,
                self.tensors.len(),
                self.tensors[self.next].name
            )));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn pad_len(n: u64, alignment: u64) -> u64 {
    (alignment - n % alignment) % alignment
}

/// Refuses what the reader would refuse; returns the alignment the file will use.
fn check_metadata(metadata: &[(String, Value)]) -> Result<u64, WriteError> {
    let invalid = |m: String| Err(WriteError::Invalid(m));
    let mut keys: Vec<&str> = metadata.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return invalid(format!("metadata key {:?} appears twice", w[0]));
    }
    let mut alignment = DEFAULT_ALIGNMENT;
    for (key, value) in metadata {
        if key.is_empty() || key.len() as u64 > MAX_KEY_LEN {
            return invalid(format!(
                "metadata key of {} bytes (must be 1..={MAX_KEY_LEN})",
                key.len()
            ));
        }
        check_value(key, value)?;
        if key == "general.alignment" {
            match *value {
                Value::U32(a) if a != 0 && a.is_power_of_two() && a as u64 <= MAX_ALIGNMENT => {
                    alignment = a as u64
                }
                _ => {
                    return invalid(format!(
                        "general.alignment must be a u32 power of two up to {MAX_ALIGNMENT}, got {value:?}"
                    ))
                }
            }
        }
    }
    Ok(alignment)
}

fn check_value(key: &str, value: &Value) -> Result<(), WriteError> {
    match value {
        Value::String(s) => check_str(key, s),
        Value::Array(a) => check_array(key, a, 0),
        _ => Ok(()),
    }
}

fn check_str(key: &str, s: &str) -> Result<(), WriteError> {
    if s.len() as u64 > MAX_STRING_LEN {
        return Err(WriteError::Invalid(format!(
            "a string of {key:?} is {} bytes, over the {MAX_STRING_LEN}-byte limit",
            s.len()
        )));
    }
    Ok(())
}

fn check_array(key: &str, a: &Array, depth: usize) -> Result<(), WriteError> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(WriteError::Invalid(format!(
            "{key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
        )));
    }
    match a {
        Array::String(v) => v.iter().try_for_each(|s| check_str(key, s)),
        Array::Array(v) => v.iter().try_for_each(|a| check_array(key, a, depth + 1)),
        _ => Ok(()),
    }
}

fn plan_tensors(tensors: &[TensorSpec]) -> Result<Vec<Planned>, WriteError> {
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(WriteError::Invalid(format!(
            "tensor {:?} appears twice",
            w[0]
        )));
    }
    tensors
        .iter()
        .map(|t| {
            let bad = |m: String| WriteError::Invalid(format!("tensor {:?}: {m}", t.name));
            if t.name.is_empty() || t.name.len() > MAX_TENSOR_NAME {
                return Err(bad(format!("name must be 1..={MAX_TENSOR_NAME} bytes")));
            }
            if t.dims.is_empty() || t.dims.len() > MAX_DIMS {
                return Err(bad(format!(
                    "{} dims, must be 1..={MAX_DIMS}",
                    t.dims.len()
                )));
            }
            if t.dims.iter().any(|&d| d == 0 || d > i64::MAX as u64) {
                return Err(bad(format!("dims {:?}: each must be 1..2^63", t.dims)));
            }
            let n_elements = t
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("element count of {:?} overflows", t.dims)))?;
            if t.dims[0] % t.ty.block_size() as u64 != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of {}'s block size {}",
                    t.dims[0],
                    t.ty.name(),
                    t.ty.block_size()
                )));
            }
            let n_bytes =
                t.ty.row_bytes(n_elements)
                    .filter(|&n| n <= i64::MAX as u64)
                    .ok_or_else(|| bad("byte size overflows".into()))?;
            Ok(Planned {
                name: t.name.clone(),
                n_bytes,
            })
        })
        .collect()
}

fn put_u32(h: &mut Vec<u8>, v: u32) {
    h.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(h: &mut Vec<u8>, v: u64) {
    h.extend_from_slice(&v.to_le_bytes());
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    put_u64(h, s.len() as u64);
    h.extend_from_slice(s.as_bytes());
}

/// A value's payload (its type id is written by the caller).
fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_str(h, s),
        Value::Array(a) => put_array(h, a),
    }
}

/// An array: element type, count, elements (a nested array element repeats this layout).
fn put_array(h: &mut Vec<u8>, a: &Array) {
    fn all<T: Copy, const N: usize>(h: &mut Vec<u8>, v: &[T], f: fn(T) -> [u8; N]) {
        for &x in v {
            h.extend_from_slice(&f(x));
        }
    }
    put_u32(h, a.element_type().id());
    put_u64(h, a.len() as u64);
    match a {
        Array::U8(v) => h.extend_from_slice(v),
        Array::I8(v) => all(h, v, i8::to_le_bytes),
        Array::U16(v) => all(h, v, u16::to_le_bytes),
        Array::I16(v) => all(h, v, i16::to_le_bytes),
        Array::U32(v) => all(h, v, u32::to_le_bytes),
        Array::I32(v) => all(h, v, i32::to_le_bytes),
        Array::F32(v) => all(h, v, f32::to_le_bytes),
        Array::U64(v) => all(h, v, u64::to_le_bytes),
        Array::I64(v) => all(h, v, i64::to_le_bytes),
        Array::F64(v) => all(h, v, f64::to_le_bytes),
        Array::Bool(v) => h.extend(v.iter().map(|&b| b as u8)),
        Array::String(v) => v.iter().for_each(|s| put_str(h, s)),
        Array::Array(v) => v.iter().for_each(|a| put_array(h, a)),
    }
}
