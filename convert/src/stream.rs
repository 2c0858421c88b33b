//! Streaming tensor conversion: every output tensor is produced in chunks of rows, each chunk
//! converted in parallel (rayon, one row per task, one scratch row per thread) and handed to a
//! writer thread, so memory stays at a few chunk buffers however large the model is.
//!
//! Rows come straight from the input's memory map (safetensors or GGUF), are decoded to f32 with
//! the kernels' `dequantize_row` and encoded with `quantize_row` (bit-identical to ggml's
//! reference quantizers). A row whose input and output types are the same is copied verbatim.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel};
use std::time::Duration;

use airlock_engine::gguf::{GgufWriter, TensorSpec, Value};
use airlock_kernels::{dequantize_row, quantize_row, GgmlType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::error::{ConvertError, Result};

/// Output bytes per chunk (a chunk is at least one row).
const CHUNK_BYTES: usize = 8 << 20;

/// How output rows map to input rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMap {
    Identity,
    /// HF rotate-half layout -> llama.cpp's interleaved layout (`convert`), for `n_head` heads.
    Permute {
        n_head: usize,
    },
    /// The inverse (`export`).
    Unpermute {
        n_head: usize,
    },
}

impl RowMap {
    /// The input row that output row `r` of `n_rows` comes from.
    ///
    /// llama.cpp's converter reshapes W to (n_head, 2, head_dim/2, cols), swaps axes 1 and 2 and
    /// reshapes back: output row h*hd + 2i + j is input row h*hd + j*hd/2 + i.
    pub fn source_row(self, r: usize, n_rows: usize) -> usize {
        match self {
            RowMap::Identity => r,
            RowMap::Permute { n_head } => {
                let hd = n_rows / n_head;
                let half = hd / 2;
                let (h, w) = (r / hd, r % hd);
                let (i, j) = (w / 2, w % 2);
                h * hd + j * half + i
            }
            RowMap::Unpermute { n_head } => {
                let hd = n_rows / n_head;
                let half = hd / 2;
                let (h, w) = (r / hd, r % hd);
                let (j, i) = (w / half, w % half);
                h * hd + 2 * i + j
            }
        }
    }

    /// Checks the permutation is defined for `n_rows` rows.
    pub fn check(self, n_rows: usize) -> std::result::Result<(), String> {
        match self {
            RowMap::Identity => Ok(()),
            RowMap::Permute { n_head } | RowMap::Unpermute { n_head } => {
                if n_head == 0
                    || !n_rows.is_multiple_of(n_head)
                    || !(n_rows / n_head).is_multiple_of(2)
                {
                    Err(format!(
                        "{n_rows} rows cannot be split into {n_head} heads of an even size"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Where a tensor's values come from.
pub enum Source<'a> {
    /// Rows of `ty` in `data` (a slice of a memory map).
    Bytes { ty: GgmlType, data: &'a [u8] },
    /// Values computed in memory (small: `rope_freqs`).
    Values(Vec<f32>),
}

/// One tensor to produce.
pub struct TensorJob<'a> {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub out: GgmlType,
    pub src: Source<'a>,
    pub rows: RowMap,
    /// Refuse the tensor if any value is NaN or infinite (a corrupt or hostile checkpoint
    /// would otherwise convert without a word).
    pub finite: bool,
}

impl TensorJob<'_> {
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    pub fn out_bytes(&self) -> u64 {
        self.out
            .row_bytes(self.dims.iter().product::<u64>())
            .unwrap_or(0)
    }

    /// Bytes read from the input (for the progress bar).
    pub fn in_bytes(&self) -> u64 {
        match &self.src {
            Source::Bytes { data, .. } => data.len() as u64,
            Source::Values(v) => 4 * v.len() as u64,
        }
    }

    /// Checks the source holds exactly the rows the job needs.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (row_len, n_rows) = (self.row_len(), self.n_rows());
        if self.out.row_bytes(row_len as u64).is_none() {
            return Err(format!(
                "row length {row_len} is not a multiple of {}'s block size",
                self.out
            ));
        }
        self.rows.check(n_rows)?;
        let n = (row_len as u64).checked_mul(n_rows as u64);
        match &self.src {
            Source::Bytes { ty, data } => {
                let want = ty
                    .row_bytes(row_len as u64)
                    .and_then(|b| b.checked_mul(n_rows as u64));
                if want != Some(data.len() as u64) {
                    return Err(format!(
                        "{} bytes of {ty} do not hold {n_rows} rows of {row_len}",
                        data.len()
                    ));
                }
            }
            Source::Values(v) => {
                if n != Some(v.len() as u64) {
                    return Err(format!("{} values for {n_rows} x {row_len}", v.len()));
                }
            }
        }
        Ok(())
    }
}

/// The progress bar: tensor name, bytes of input done, rate, ETA. Hidden when stderr is not a
/// terminal (or when asked).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total_bytes: u64, visible: bool) -> Self {
        let target = if visible {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total_bytes), target);
        let style = ProgressStyle::with_template(
            "{msg:32!} {bar:24} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { bar }
    }

    pub fn hidden() -> Self {
        Progress::new(0, false)
    }

    fn tensor(&self, name: &str) {
        self.bar.set_message(name.to_string());
    }

    fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Writes chunks handed over by the converting thread; returns the first write error.
struct ChunkWriter<'s> {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    handle: Option<std::thread::ScopedJoinHandle<'s, std::io::Result<()>>>,
}

impl<'s> ChunkWriter<'s> {
    fn spawn<'e, W: Write + Send>(scope: &'s std::thread::Scope<'s, 'e>, out: &'s mut W) -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(1);
        let (ret_tx, ret_rx) = channel::<Vec<u8>>();
        let handle = scope.spawn(move || {
            for buf in rx {
                out.write_all(&buf)?;
                let _ = ret_tx.send(buf);
            }
            out.flush()
        });
        ChunkWriter {
            tx: Some(tx),
            spare: ret_rx,
            handle: Some(handle),
        }
    }

    fn buffer(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_default()
    }

    /// Hands a chunk over; on failure returns the writer's error.
    fn send(&mut self, buf: Vec<u8>) -> std::io::Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(buf).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        self.finish()?;
        Err(std::io::Error::other("the writer stopped"))
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked"))),
            None => Ok(()),
        }
    }
}

/// Why a chunk of rows could not be converted.
enum RowError {
    Kernel(String),
    NonFinite { row: usize, col: usize, value: f32 },
}

/// Converts rows `[r0, r1)` of `job` into `dst` (exactly their output bytes).
fn convert_rows(job: &TensorJob, r0: usize, dst: &mut [u8]) -> std::result::Result<(), RowError> {
    let row_len = job.row_len();
    let n_rows = job.n_rows();
    let out_row = job.out.row_bytes(row_len as u64).unwrap_or(0) as usize;
    if out_row == 0 {
        return Err(RowError::Kernel("empty rows".into()));
    }
    let kernel = |e: airlock_kernels::KernelError| RowError::Kernel(e.to_string());
    dst.par_chunks_mut(out_row).enumerate().try_for_each_init(
        || vec![0f32; row_len],
        |scratch, (k, out)| {
            let src_row = job.rows.source_row(r0 + k, n_rows);
            let copy = match &job.src {
                Source::Bytes { ty, data } => {
                    let in_row = ty.row_bytes(row_len as u64).unwrap_or(0) as usize;
                    let bytes = &data[src_row * in_row..(src_row + 1) * in_row];
                    if *ty == job.out && !job.finite {
                        out.copy_from_slice(bytes);
                        return Ok(());
                    }
                    dequantize_row(*ty, bytes, scratch).map_err(kernel)?;
                    (*ty == job.out).then_some(bytes)
                }
                Source::Values(v) => {
                    scratch.copy_from_slice(&v[src_row * row_len..(src_row + 1) * row_len]);
                    None
                }
            };
            if job.finite {
                if let Some(col) = scratch.iter().position(|x| !x.is_finite()) {
                    let value = scratch[col];
                    return Err(RowError::NonFinite {
                        row: src_row,
                        col,
                        value,
                    });
                }
            }
            match copy {
                Some(bytes) => {
                    out.copy_from_slice(bytes);
                    Ok(())
                }
                None => quantize_row(job.out, scratch, out).map_err(kernel),
            }
        },
    )
}

/// Streams the data of every job, in order, to `out`, each followed by `pad(n_bytes)` zero bytes.
/// `out_path` only names the output in errors.
pub fn stream_tensors<W: Write + Send>(
    out: &mut W,
    out_path: &Path,
    jobs: &[TensorJob],
    pad: impl Fn(u64) -> u64,
    progress: &Progress,
) -> Result<()> {
    let write_err = |error| ConvertError::Write {
        path: out_path.to_path_buf(),
        error,
    };
    std::thread::scope(|scope| {
        let mut writer = ChunkWriter::spawn(scope, out);
        let result = (|| -> Result<()> {
            for job in jobs {
                progress.tensor(&job.name);
                job.validate()
                    .map_err(|m| ConvertError::Internal(format!("{}: {m}", job.name)))?;
                let row_len = job.row_len();
                let n_rows = job.n_rows();
                let out_row = job.out.row_bytes(row_len as u64).unwrap_or(0) as usize;
                let rows_per_chunk = (CHUNK_BYTES / out_row.max(1)).max(1);
                let in_per_row = job.in_bytes() / n_rows.max(1) as u64;
                let mut r0 = 0;
                while r0 < n_rows {
                    if airlock_engine::signals::interrupted() {
                        return Err(ConvertError::Interrupted(out_path.to_path_buf()));
                    }
                    let r1 = (r0 + rows_per_chunk).min(n_rows);
                    let mut buf = writer.buffer();
                    buf.clear();
                    buf.resize((r1 - r0) * out_row, 0);
                    convert_rows(job, r0, &mut buf).map_err(|e| match e {
                        RowError::Kernel(m) => {
                            ConvertError::Internal(format!("tensor {}: {m}", job.name))
                        }
                        RowError::NonFinite { row, col, value } => ConvertError::NonFinite {
                            tensor: job.name.clone(),
                            row,
                            col,
                            value,
                        },
                    })?;
                    writer.send(buf).map_err(write_err)?;
                    progress.inc(in_per_row * (r1 - r0) as u64);
                    r0 = r1;
                }
                let p = pad(job.out_bytes()) as usize;
                if p > 0 {
                    writer.send(vec![0u8; p]).map_err(write_err)?;
                }
            }
            Ok(())
        })();
        let finished = writer.finish();
        result?;
        finished.map_err(write_err)
    })
}

/// Writes a whole GGUF file: the header laid out and validated by the engine's [`GgufWriter`],
/// then every tensor's data streamed in chunks with the same padding rule (each tensor padded to
/// the alignment, the last one too). The engine writer's `write_tensor_data` takes a tensor in
/// one slice, which for an 8B model's f32 embedding would be 2 GB of memory, so only its header
/// half is used here.
pub fn write_gguf<W: Write + Send>(
    out: &mut W,
    out_path: &Path,
    metadata: &[(String, Value)],
    jobs: &[TensorJob],
    progress: &Progress,
) -> Result<()> {
    let specs: Vec<TensorSpec> = jobs
        .iter()
        .map(|j| TensorSpec {
            name: j.name.clone(),
            dims: j.dims.clone(),
            ty: j.out,
        })
        .collect();
    let alignment = {
        let header = GgufWriter::new(&mut *out, metadata, &specs).map_err(|e| match e {
            airlock_engine::gguf::WriteError::Io(error) => ConvertError::Write {
                path: out_path.to_path_buf(),
                error,
            },
            other => ConvertError::Internal(other.to_string()),
        })?;
        header.alignment()
    };
    stream_tensors(
        out,
        out_path,
        jobs,
        |n| (alignment - n % alignment) % alignment,
        progress,
    )?;
    out.flush().map_err(|error| ConvertError::Write {
        path: out_path.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_llama_cpp_reshape() {
        // numpy: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape)
        let (n_head, hd) = (3, 8);
        let n = n_head * hd;
        let p = RowMap::Permute { n_head };
        let u = RowMap::Unpermute { n_head };
        let mut expect = Vec::new();
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    expect.push(h * hd + j * (hd / 2) + i);
                }
            }
        }
        let got: Vec<usize> = (0..n).map(|r| p.source_row(r, n)).collect();
        assert_eq!(got, expect);
        for r in 0..n {
            assert_eq!(u.source_row(p.source_row(r, n), n), r);
        }
        assert!(p.check(10).is_err());
    }
}
