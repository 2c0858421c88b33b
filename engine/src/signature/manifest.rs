//! The manifest: a file's size, its whole-file SHA-256 (the digest Hugging Face lists), and one
//! SHA-256 per byte range of a GGUF file — the metadata, each tensor, the padding between them —
//! so that a changed byte is named by the range it is in, and the ranges hash in parallel.

use std::cmp::Reverse;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SignatureError;
use crate::gguf::{GgufFile, MAX_DIMS, MAX_PLAUSIBLE_BYTES, MAX_TENSOR_NAME};

/// The `format` field of the manifests this version writes and reads.
pub const MANIFEST_FORMAT: &str = "airlock-manifest/1";
/// About 200 bytes a range and two ranges a tensor: a model with 10,000 tensors is 4 MB.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The longest type name in a manifest (ggml's are at most 7 bytes).
const MAX_TYPE_NAME: usize = 32;
/// The longest file name recorded.
const MAX_FILE_NAME: usize = 4096;

pub type Sha256Digest = [u8; 32];

/// What a byte range of a GGUF file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeKind {
    /// The header, the metadata (chat template, tokenizer, hyperparameters) and the tensor
    /// table: everything before the alignment padding that precedes the tensor data.
    Metadata,
    /// Bytes between two ranges (alignment padding), or after the last tensor.
    Padding,
    /// One tensor's data. `shape` is in GGUF's order, innermost (row length) first.
    Tensor {
        name: String,
        ty: String,
        shape: Vec<u64>,
    },
}

/// One byte range of the file and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub kind: RangeKind,
    pub offset: u64,
    pub length: u64,
    pub sha256: Sha256Digest,
}

impl Range {
    fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A file's digests. Parsed manifests are validated: the ranges are in order, non-empty, and
/// cover every byte of `size` exactly once, the first being the metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The file's name when it was hashed (informational: a renamed file still verifies).
    pub file: String,
    pub size: u64,
    pub sha256: Sha256Digest,
    pub ranges: Vec<Range>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireManifest {
    format: String,
    file: String,
    size: u64,
    sha256: String,
    ranges: Vec<WireRange>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRange {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    ty: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shape: Option<Vec<u64>>,
    offset: u64,
    length: u64,
    sha256: String,
}

pub fn hex(d: &Sha256Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<Sha256Digest> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256::digest(bytes).into()
}

/// The ranges of a validated GGUF file, without digests: the metadata, then the tensors in file
/// order with padding wherever they leave a gap, then any bytes after the last tensor.
pub fn layout(file: &GgufFile) -> Vec<(RangeKind, u64, u64)> {
    let size = file.file_size();
    let mut out = vec![(RangeKind::Metadata, 0, file.header_len)];
    let mut tensors: Vec<_> = file.tensors().iter().collect();
    tensors.sort_by_key(|t| t.offset);
    let mut pos = file.header_len;
    // The reader checked every tensor range is inside the file and none overlap, and the data
    // section starts at or after the header's end, so these never go backwards.
    for t in tensors {
        let start = file.data_offset + t.offset;
        if start > pos {
            out.push((RangeKind::Padding, pos, start - pos));
        }
        out.push((
            RangeKind::Tensor {
                name: t.name.clone(),
                ty: t.ty.name().to_string(),
                shape: t.dims.clone(),
            },
            start,
            t.n_bytes,
        ));
        pos = start + t.n_bytes;
    }
    if size > pos {
        out.push((RangeKind::Padding, pos, size - pos));
    }
    out
}

/// SHA-256 of each `(offset, length)` span of `bytes`, in parallel on the current rayon pool;
/// None for a span outside `bytes`. Largest spans first, one task each, so a big tensor taken
/// last does not leave the other threads idle.
pub(crate) fn range_digests(bytes: &[u8], spans: &[(u64, u64)]) -> Vec<Option<Sha256Digest>> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| Reverse(spans[i].1));
    let done: Vec<(usize, Option<Sha256Digest>)> = order
        .par_iter()
        .with_max_len(1)
        .map(|&i| {
            let (off, len) = spans[i];
            let slice = usize::try_from(off)
                .ok()
                .zip(off.checked_add(len).and_then(|e| usize::try_from(e).ok()))
                .and_then(|(s, e)| bytes.get(s..e));
            (i, slice.map(sha256))
        })
        .collect();
    let mut out = vec![None; spans.len()];
    for (i, d) in done {
        out[i] = d;
    }
    out
}

impl Manifest {
    /// Hash `file` (a validated GGUF whose bytes these are) under the name `name`: the ranges in
    /// parallel, the whole-file digest beside them.
    pub fn compute(name: &str, file: &GgufFile) -> Manifest {
        let bytes = file.bytes();
        let layout = layout(file);
        let spans: Vec<(u64, u64)> = layout.iter().map(|&(_, o, l)| (o, l)).collect();
        let (whole, digests) = rayon::join(|| sha256(bytes), || range_digests(bytes, &spans));
        let ranges = layout
            .into_iter()
            .zip(digests)
            .map(|((kind, offset, length), d)| Range {
                kind,
                offset,
                length,
                // The layout lies inside the file by construction.
                sha256: d.unwrap_or_default(),
            })
            .collect();
        Manifest {
            file: name.to_string(),
            size: bytes.len() as u64,
            sha256: whole,
            ranges,
        }
    }

    /// The manifest as written beside the model: one range a line, so it reads and diffs well.
    pub fn to_json(&self) -> String {
        let wire = |r: &Range| {
            let (kind, name, ty, shape) = match &r.kind {
                RangeKind::Metadata => ("metadata", None, None, None),
                RangeKind::Padding => ("padding", None, None, None),
                RangeKind::Tensor { name, ty, shape } => (
                    "tensor",
                    Some(name.clone()),
                    Some(ty.clone()),
                    Some(shape.clone()),
                ),
            };
            WireRange {
                kind: kind.into(),
                name,
                ty,
                shape,
                offset: r.offset,
                length: r.length,
                sha256: hex(&r.sha256),
            }
        };
        let lines: Vec<String> = self
            .ranges
            .iter()
            .map(|r| format!("    {}", json_string(&wire(r))))
            .collect();
        format!(
            "{{\n  \"format\": {},\n  \"file\": {},\n  \"size\": {},\n  \"sha256\": \"{}\",\n  \
             \"ranges\": [\n{}\n  ]\n}}\n",
            json_string(&MANIFEST_FORMAT),
            json_string(&self.file),
            self.size,
            hex(&self.sha256),
            lines.join(",\n")
        )
    }

    /// Parse and validate the manifest `text` read from `path` (named in errors).
    pub fn parse(path: &Path, text: &[u8]) -> Result<Manifest, SignatureError> {
        let bad = |reason: String| SignatureError::Malformed {
            what: "airlock manifest",
            path: path.to_path_buf(),
            reason,
        };
        let w: WireManifest = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        if w.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {:?}, but this airlock reads {MANIFEST_FORMAT:?}",
                w.format
            )));
        }
        if w.file.len() > MAX_FILE_NAME {
            return Err(bad(format!("the file name is over {MAX_FILE_NAME} bytes")));
        }
        if w.size > MAX_PLAUSIBLE_BYTES {
            return Err(bad(format!("size {} is not a plausible file size", w.size)));
        }
        let sha256 = parse_hex(&w.sha256)
            .ok_or_else(|| bad("sha256 is not 64 lowercase hex digits".into()))?;
        let mut ranges = Vec::with_capacity(w.ranges.len());
        let mut pos = 0u64;
        for (i, r) in w.ranges.into_iter().enumerate() {
            let at = |msg: String| bad(format!("range {i}: {msg}"));
            if r.offset != pos {
                return Err(at(format!(
                    "starts at {} but the previous range ends at {pos} (ranges must cover the \
                     file in order, without gaps or overlaps)",
                    r.offset
                )));
            }
            if r.length == 0 {
                return Err(at("is empty".into()));
            }
            let end = r
                .offset
                .checked_add(r.length)
                .filter(|&e| e <= w.size)
                .ok_or_else(|| at(format!("runs past the file size {}", w.size)))?;
            let sha = parse_hex(&r.sha256)
                .ok_or_else(|| at("sha256 is not 64 lowercase hex digits".into()))?;
            let kind = match r.kind.as_str() {
                "metadata" | "padding" => {
                    if r.name.is_some() || r.ty.is_some() || r.shape.is_some() {
                        return Err(at(format!("a {} range has no name, type or shape", r.kind)));
                    }
                    if (r.kind == "metadata") != (i == 0) {
                        return Err(at(
                            "the metadata range must be the first, and only it".into()
                        ));
                    }
                    if r.kind == "metadata" {
                        RangeKind::Metadata
                    } else {
                        RangeKind::Padding
                    }
                }
                "tensor" => {
                    let (Some(name), Some(ty), Some(shape)) = (r.name, r.ty, r.shape) else {
                        return Err(at("a tensor range needs a name, a type and a shape".into()));
                    };
                    if name.is_empty() || name.len() > MAX_TENSOR_NAME {
                        return Err(at(format!(
                            "tensor name is empty or over {MAX_TENSOR_NAME} bytes"
                        )));
                    }
                    if ty.is_empty() || ty.len() > MAX_TYPE_NAME {
                        return Err(at("tensor type is empty or too long".into()));
                    }
                    if shape.is_empty() || shape.len() > MAX_DIMS {
                        return Err(at(format!("shape must have 1 to {MAX_DIMS} dimensions")));
                    }
                    if i == 0 {
                        return Err(at("the first range must be the metadata".into()));
                    }
                    RangeKind::Tensor { name, ty, shape }
                }
                other => {
                    return Err(at(format!(
                        "kind {other:?} is none of metadata, tensor, padding"
                    )))
                }
            };
            ranges.push(Range {
                kind,
                offset: r.offset,
                length: r.length,
                sha256: sha,
            });
            pos = end;
        }
        if pos != w.size {
            return Err(bad(format!(
                "the ranges cover {pos} bytes of the file's {}",
                w.size
            )));
        }
        if ranges.is_empty() {
            return Err(bad("no ranges (the metadata range is required)".into()));
        }
        Ok(Manifest {
            file: w.file,
            size: w.size,
            sha256,
            ranges,
        })
    }

    /// Range `i` in words, for messages: what it holds and where.
    pub fn describe(&self, i: usize) -> String {
        let r = &self.ranges[i];
        let prev = i.checked_sub(1).map(|p| &self.ranges[p].kind);
        describe_range(&r.kind, r.offset, r.length, prev)
    }

    /// Check `bytes` (the content of `model`) against every range digest, in parallel. The size
    /// must match first; then every range is hashed and all that differ are named.
    pub fn check_bytes(&self, model: &Path, bytes: &[u8]) -> Result<(), SignatureError> {
        let actual = bytes.len() as u64;
        if actual != self.size {
            let detail = if actual < self.size {
                let cut = self
                    .ranges
                    .iter()
                    .position(|r| r.end() > actual)
                    .map_or_else(String::new, |i| format!(" inside {}", self.describe(i)));
                format!("the file ends{cut} (a cut copy?)")
            } else {
                format!(
                    "{} bytes follow the signed end (appended data?)",
                    actual - self.size
                )
            };
            return Err(SignatureError::SizeMismatch {
                model: model.to_path_buf(),
                actual,
                signed: self.size,
                detail,
            });
        }
        let spans: Vec<(u64, u64)> = self.ranges.iter().map(|r| (r.offset, r.length)).collect();
        let digests = range_digests(bytes, &spans);
        let bad: Vec<String> = digests
            .iter()
            .zip(&self.ranges)
            .enumerate()
            .filter(|(_, (d, r))| **d != Some(r.sha256))
            .map(|(i, _)| self.describe(i))
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(SignatureError::Mismatch {
                model: model.to_path_buf(),
                ranges: bad,
                total: self.ranges.len(),
            })
        }
    }

    /// Check that the ranges describe `file`'s own layout (names, types, shapes, offsets), so a
    /// message about a range names the right tensor. Digests are checked by [`Self::check_bytes`].
    pub fn check_layout(
        &self,
        manifest: &Path,
        model: &Path,
        file: &GgufFile,
    ) -> Result<(), SignatureError> {
        let expected = layout(file);
        let err = |detail: String| SignatureError::TableMismatch {
            manifest: manifest.to_path_buf(),
            model: model.to_path_buf(),
            detail,
        };
        if expected.len() != self.ranges.len() {
            return Err(err(format!(
                "it lists {} ranges, the file has {}",
                self.ranges.len(),
                expected.len()
            )));
        }
        for (i, ((kind, offset, length), r)) in expected.iter().zip(&self.ranges).enumerate() {
            if *kind != r.kind || *offset != r.offset || *length != r.length {
                let prev = i.checked_sub(1).map(|p| &expected[p].0);
                return Err(err(format!(
                    "range {i} is {} in the manifest but {} in the file",
                    self.describe(i),
                    describe_range(kind, *offset, *length, prev)
                )));
            }
        }
        Ok(())
    }
}

fn json_string<T: Serialize + ?Sized>(v: &T) -> String {
    // Serializing strings, integers and these plain structs cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

/// A range in words: what it holds (`prev`: the range before it, for padding) and where.
fn describe_range(kind: &RangeKind, offset: u64, length: u64, prev: Option<&RangeKind>) -> String {
    let span = format!("bytes {}..{}", offset, offset.saturating_add(length));
    match kind {
        RangeKind::Metadata => format!(
            "the metadata (header, key-value pairs such as the chat template and the tokenizer, \
             tensor table; {span})"
        ),
        RangeKind::Tensor { name, ty, shape } => format!(
            "tensor {name} ({ty}, shape {}; {span})",
            shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" x ")
        ),
        RangeKind::Padding => match prev {
            Some(RangeKind::Tensor { name, .. }) => format!("padding after tensor {name} ({span})"),
            Some(_) => format!("padding after the metadata ({span})"),
            None => format!("padding ({span})"),
        },
    }
}
