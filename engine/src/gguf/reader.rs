//! GGUF reader: validates the whole header against the file before anything trusts it.
//!
//! Order of checks follows the file: magic, version, counts (bounded by the bytes left before any
//! allocation), metadata (keys UTF-8, unique, known value types, bounded nesting), tensor infos
//! (names, dims, types, overflow-checked sizes), alignment, then tensor ranges (aligned, inside the
//! file, not overlapping). Tensor data is never copied: `tensor_data` returns a slice of the map.
//!
//! Memory: every allocation made while parsing is sized by bytes already shown to be in the file,
//! and stays within a small multiple of them (see `engine/tests/gguf_corpus.rs` for the bound and
//! why). Lookups use sorted `u32` index vectors rather than hash maps keyed by cloned strings.
//!
//! Truncation versus lies: a count or length that the rest of the file cannot hold is reported as
//! `Truncated` when it is plausible (a cut download), and as `CountTooLarge` when no file airlock
//! reads could hold it (over [`MAX_PLAUSIBLE_BYTES`], or over a per-string cap).

use std::cmp::Ordering;
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
/// The GGUF spec limits keys to 65535 bytes.
pub const MAX_KEY_LEN: u64 = 64 << 10;
/// Arrays of arrays of arrays are accepted; a fourth level is refused. (llama.cpp itself refuses
/// any nested array; gguf-py writes them.)
pub const MAX_ARRAY_DEPTH: usize = 3;
/// Largest alignment accepted; ggml uses 32, some writers 64 or a page.
pub const MAX_ALIGNMENT: u64 = 1 << 16;
/// A count whose items would need more bytes than this (1 PiB) is a lie, not a truncated file.
pub const MAX_PLAUSIBLE_BYTES: u64 = 1 << 50;

/// Smallest tensor info: name length + 1-byte name + n_dims + one dim + type + offset.
const MIN_TENSOR_INFO: u64 = 8 + 1 + 4 + 8 + 4 + 8;
/// Smallest metadata entry: key length + 1-byte key + value type + 1-byte value.
const MIN_KV: u64 = 8 + 1 + 4 + 1;
/// Keys and names longer than this are shortened in error messages.
const SHOWN_NAME_LEN: usize = 80;

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

    /// Number of rows: product of all dimensions past the first (saturating; a validated file's
    /// shapes never overflow).
    pub fn n_rows(&self) -> u64 {
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
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
    /// Bytes of the header, metadata and tensor infos; the alignment padding follows.
    pub header_len: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<MetadataEntry>,
    /// Indices into `metadata`, sorted by key.
    key_index: Vec<u32>,
    tensors: Vec<TensorInfo>,
    /// Indices into `tensors`, sorted by name.
    tensor_index: Vec<u32>,
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
        Self::from_source(Self::read_source(path, opts)?)
    }

    /// The bytes of `path`, mapped or read as `opts` says, not yet validated: a caller that
    /// must check them first (a signed manifest) does so, then hands them to [`Self::from_source`].
    pub fn read_source(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Source> {
        let path = path.as_ref();
        let io = |error| GgufError::Io {
            path: path.to_path_buf(),
            error,
        };
        let source = if opts.no_mmap {
            // Exactly the length the file reports: a device such as /dev/zero reports 0 and
            // would otherwise be read until memory runs out.
            let meta = std::fs::metadata(path).map_err(io)?;
            if !meta.is_file() {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file, so its size is unknown and it cannot be read whole",
                )));
            }
            Source::Owned(crate::bounded::read_bounded(path, meta.len()).map_err(io)?)
        } else {
            let file = File::open(path).map_err(io)?;
            // SAFETY: the map is read-only. Another process truncating or rewriting the file while
            // it is mapped would change the bytes under us (or fault); every engine that maps model
            // files accepts this, and the header is validated from the mapped bytes once, up front.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            Source::Mmap(map)
        };
        Ok(source)
    }

    /// Validate bytes from [`Self::read_source`] and keep them.
    pub fn from_source(source: Source) -> Result<Self> {
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
            header_len: p.header_len,
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

    /// Tells the kernel this process no longer needs the `len` bytes at `offset` of the map
    /// (the engine reads packed copies of them instead): their pages leave this process's
    /// resident set but stay in the page cache, and a later read faults the same bytes back in.
    /// Advice only: a no-op for an owned buffer, and errors are ignored.
    pub fn release(&self, offset: usize, len: usize) {
        if let Source::Mmap(m) = &self.source {
            if offset.checked_add(len).is_some_and(|end| end <= m.len()) {
                // SAFETY: MADV_DONTNEED on a read-only file mapping drops only this process's
                // page-table entries; nothing was written through the map, so a later access
                // faults in the file's unchanged bytes from the page cache. The range is inside
                // the map (checked above); memmap2 rounds its start down to a page.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
                };
            }
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
        let i = lookup(&self.key_index, key, |i| &self.metadata[i].key)?;
        Some(&self.metadata[i].value)
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
        let i = lookup(&self.tensor_index, name, |i| &self.tensors[i].name)?;
        Some(&self.tensors[i])
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

/// Binary search of a sorted index vector.
fn lookup<'a>(index: &[u32], name: &str, key_of: impl Fn(usize) -> &'a String) -> Option<usize> {
    index
        .binary_search_by(|&i| key_of(i as usize).as_str().cmp(name))
        .ok()
        .map(|pos| index[pos] as usize)
}

/// Sorts `0..n` by `key_of` (ties by position) and returns it with the first adjacent duplicate:
/// the later of the two entries, as (earlier, later).
fn sorted_index<'a>(
    n: usize,
    key_of: impl Fn(usize) -> &'a str,
) -> (Vec<u32>, Option<(usize, usize)>) {
    // `parse` refuses counts over u32::MAX before any entry is read, so the casts are exact.
    let mut index: Vec<u32> = (0..n as u32).collect();
    index.sort_unstable_by(|&a, &b| match key_of(a as usize).cmp(key_of(b as usize)) {
        Ordering::Equal => a.cmp(&b),
        o => o,
    });
    let dup = index
        .windows(2)
        .find(|w| key_of(w[0] as usize) == key_of(w[1] as usize))
        .map(|w| (w[0] as usize, w[1] as usize));
    (index, dup)
}

/// A name or key as it appears in an error message: quoted, escaped, and shortened if long.
pub(crate) fn shown(s: &str) -> String {
    if s.len() <= SHOWN_NAME_LEN {
        return format!("{s:?}");
    }
    let mut cut = SHOWN_NAME_LEN;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}... ({} bytes)", &s[..cut], s.len())
}

/// Result of parsing, independent of who owns the bytes.
struct Parsed {
    version: u32,
    alignment: u64,
    header_len: u64,
    data_offset: u64,
    metadata: Vec<MetadataEntry>,
    key_index: Vec<u32>,
    tensors: Vec<TensorInfo>,
    tensor_index: Vec<u32>,
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

    /// A count of items of at least `min_size` bytes each that must fit in the next `room` bytes
    /// (at most what is left): refused before anything is sized by it. A count no real file could
    /// hold is `CountTooLarge`; one this file merely ends too early for is `Truncated`.
    fn count(&mut self, min_size: u64, reserved: u64, what: &dyn Fn() -> String) -> Result<u64> {
        let offset = self.offset();
        let n = self.u64(what)?;
        let min_size = min_size.max(1);
        let needed = n
            .checked_mul(min_size)
            .filter(|&b| b <= MAX_PLAUSIBLE_BYTES);
        let Some(needed) = needed else {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset,
                count: n,
                max: MAX_PLAUSIBLE_BYTES / min_size,
            });
        };
        let room = self.remaining().saturating_sub(reserved);
        if needed > room {
            return Err(GgufError::Truncated {
                what: format!("{} ({n}, of at least {min_size} bytes each)", what()),
                offset,
                needed: needed.saturating_add(reserved),
                available: self.remaining(),
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
        std::str::from_utf8(bytes).map_err(|e| GgufError::InvalidUtf8 {
            what: what(),
            offset: offset + 8 + e.valid_up_to() as u64,
        })
    }
}

impl Parsed {
    fn parse(buf: &[u8]) -> Result<Parsed> {
        let mut c = Cursor { buf, pos: 0 };
        if buf.len() < 4 && GGUF_MAGIC.starts_with(buf) {
            return Err(GgufError::Truncated {
                what: "magic".into(),
                offset: 0,
                needed: 4,
                available: buf.len() as u64,
            });
        }
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
        let n_tensors = c.count(MIN_TENSOR_INFO, 8, &|| "tensor count".into())?;
        let n_kv = c.count(MIN_KV, n_tensors * MIN_TENSOR_INFO, &|| {
            "metadata entry count".into()
        })?;
        // Both counts are below MAX_PLAUSIBLE_BYTES / 14 < 2^47 and fit in the buffer, so they fit
        // in usize; u32 indices need them below 2^32, which a file under 56 GiB of headers is.
        if n_kv > u32::MAX as u64 || n_tensors > u32::MAX as u64 {
            return Err(GgufError::CountTooLarge {
                what: "tensor or metadata entry count".into(),
                offset: 8,
                count: n_kv.max(n_tensors),
                max: u32::MAX as u64,
            });
        }

        // Sized by n_kv entries of at least MIN_KV bytes each, shown present by `count`.
        let mut metadata = Vec::with_capacity(n_kv as usize);
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
            let type_id = c.u32(&|| format!("value type of {}", shown(key)))?;
            let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.to_string(),
                offset: type_offset,
                type_id,
            })?;
            let value = read_value(&mut c, ty, key, 0)?;
            metadata.push(MetadataEntry {
                key: key.to_string(),
                value,
                offset,
            });
        }
        let (key_index, dup) = sorted_index(metadata.len(), |i| &metadata[i].key);
        if let Some((_, later)) = dup {
            let e = &metadata[later];
            return Err(GgufError::DuplicateKey {
                key: e.key.clone(),
                offset: e.offset,
            });
        }

        let alignment = match lookup(&key_index, "general.alignment", |i| &metadata[i].key) {
            None => DEFAULT_ALIGNMENT,
            Some(i) => {
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
                        reason: format!("{a} is not a power of two between 1 and {MAX_ALIGNMENT}"),
                    });
                }
                a
            }
        };

        // Sized by n_tensors infos of at least MIN_TENSOR_INFO bytes each, shown present.
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            tensors.push(read_tensor_info(&mut c, i)?);
        }
        let (tensor_index, dup) = sorted_index(tensors.len(), |i| &tensors[i].name);
        if let Some((_, later)) = dup {
            let t = &tensors[later];
            return Err(GgufError::DuplicateTensor {
                name: t.name.clone(),
                offset: t.info_offset,
            });
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
            let bad = |reason: String| GgufError::BadTensor {
                name: t.name.clone(),
                offset: t.info_offset,
                reason,
            };
            if t.offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                )));
            }
            // A range no real file could have is a bad offset; one that merely runs past the end
            // of this file is what a cut download looks like.
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > MAX_PLAUSIBLE_BYTES) {
                return Err(bad(format!(
                    "data [{}, +{}) is outside any possible data section",
                    t.offset, t.n_bytes
                )));
            }
            if t.offset + t.n_bytes > data_len {
                return Err(GgufError::Truncated {
                    what: format!("data of tensor {}", shown(&t.name)),
                    offset: data_offset + t.offset,
                    needed: t.n_bytes,
                    available: data_len.saturating_sub(t.offset),
                });
            }
        }
        // Ranges sorted by start: if any two overlap, two neighbours do.
        let mut order: Vec<u32> = (0..tensors.len() as u32).collect();
        order.sort_unstable_by_key(|&i| (tensors[i as usize].offset, i));
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0] as usize], &tensors[w[1] as usize]);
            // Ranges are in bounds, so offset + n_bytes does not overflow.
            if b.offset < a.offset + a.n_bytes {
                // Name the one that comes later in the file's info table.
                let (first, second) = if a.info_offset < b.info_offset {
                    (a, b)
                } else {
                    (b, a)
                };
                return Err(GgufError::OverlappingTensors {
                    first: first.name.clone(),
                    second: second.name.clone(),
                    offset: second.info_offset,
                    detail: format!(
                        "[{}, +{}) and [{}, +{}) relative to file offset {data_offset}",
                        first.offset, first.n_bytes, second.offset, second.n_bytes
                    ),
                });
            }
        }

        Ok(Parsed {
            version,
            alignment,
            header_len: header_end,
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
        return Err(GgufError::BadTensor {
            name: shown(name),
            offset: info_offset,
            reason: format!(
                "name is {} bytes, more than ggml's limit of {MAX_TENSOR_NAME}",
                name.len()
            ),
        });
    }
    let what = || format!("info of tensor {name:?}");
    let n_dims = c.u32(&what)?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(bad(format!("n_dims is {n_dims}, must be 1..={MAX_DIMS}")));
    }
    let mut dims_buf = [0u64; MAX_DIMS];
    for d in dims_buf.iter_mut().take(n_dims as usize) {
        *d = c.u64(&what)?;
    }
    let dims = &dims_buf[..n_dims as usize];
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
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad(format!("byte size of shape {dims:?} overflows")))?;
    Ok(TensorInfo {
        name: name.to_string(),
        dims: dims.to_vec(),
        ty,
        offset,
        n_elements,
        n_bytes,
        info_offset,
    })
}

fn read_value(c: &mut Cursor, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
    let what = || format!("value of {}", shown(key));
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
    match c.array::<1>(&|| format!("value of {}", shown(key)))?[0] {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(GgufError::Invalid {
            what: format!("bool value of {}", shown(key)),
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
    let what = || format!("array of {}", shown(key));
    let type_id = c.u32(&what)?;
    let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_string(),
        offset,
        type_id,
    })?;
    let n = c.count(ty.min_encoded_size(), 0, &|| {
        format!("element count of {}", shown(key))
    })? as usize;

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
                total += c
                    .string(MAX_STRING_LEN, &|| format!("string {i} of {}", shown(key)))?
                    .len();
            }
            c.pos = start;
            let mut a = StrArray::with_capacity(n, total);
            for i in 0..n {
                a.push(c.string(MAX_STRING_LEN, &|| format!("string {i} of {}", shown(key)))?);
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
