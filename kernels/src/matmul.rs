//! Weight matrix x activations for the engine.
//!
//! Shapes: W is `rows x cols`, row-major, each row `ty.row_bytes(cols)` bytes
//! of ggml blocks; x is `n_tokens x cols` f32; y is `n_tokens x rows` f32.
//! y[t][r] = sum_k W[r][k] * x[t][k].
//!
//! Work is split over output rows in chunks of several rows (one task of a
//! [`crate::pool`] loop per chunk, not per row). With several tokens each
//! task writes a private `[token][row-in-chunk]` buffer, and the buffers are
//! copied into y at the end, so no task needs a strided view of y.

use bytemuck::{cast_slice, cast_slice_mut, Pod};

use crate::dot::{self, kernels, ActFormat, DotFormat, GemmFn, Kernels, Tiles};
use crate::pool::for_each_chunk_mut;
use crate::quant::float::{Bf16Bytes, F16Bytes, F32Bytes};
use crate::quant::{
    self, BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K,
    BlockQ6_K, BlockQ8_0,
};
use crate::{GgmlType, KernelError};

/// A row-major weight matrix stored in ggml blocks, borrowed in place.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub ty: GgmlType,
    /// `rows * ty.row_bytes(cols)` bytes, any alignment.
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl WeightView<'_> {
    /// Bytes per row, after checking `data` has exactly `rows` of them.
    pub(crate) fn checked_row_bytes(&self) -> Result<usize, KernelError> {
        let row_bytes =
            self.ty
                .row_bytes(self.cols as u64)
                .ok_or(KernelError::NotBlockMultiple {
                    ty: self.ty,
                    n: self.cols as u64,
                })?;
        let row_bytes =
            usize::try_from(row_bytes).map_err(|_| KernelError::Overflow { what: "weight row" })?;
        let total = row_bytes
            .checked_mul(self.rows)
            .ok_or(KernelError::Overflow { what: "weights" })?;
        check_len("weight data", total, self.data.len())?;
        Ok(row_bytes)
    }
}

pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), KernelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Validates every shape; returns bytes per weight row.
fn check_shapes(
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    y: &[f32],
) -> Result<usize, KernelError> {
    let row_bytes = w.checked_row_bytes()?;
    let nx = n_tokens.checked_mul(w.cols).ok_or(KernelError::Overflow {
        what: "activations",
    })?;
    check_len("activations", nx, x.len())?;
    let ny = n_tokens
        .checked_mul(w.rows)
        .ok_or(KernelError::Overflow { what: "output" })?;
    check_len("output", ny, y.len())?;
    Ok(row_bytes)
}

/// Rows per task: about four tasks per thread for load balance, but at least
/// ~16K multiply-adds per task so scheduling cost stays small; a multiple of
/// 4 (the kernels' row tile) when there are more rows than that.
fn chunk_rows(rows: usize, cols: usize) -> usize {
    let by_threads = rows.div_ceil(rayon::current_num_threads() * 4);
    let by_work = (1 << 14) / cols.max(1);
    (by_threads.max(by_work).div_ceil(4) * 4).clamp(1, rows.max(1))
}

/// Runs `chunk_fn(first_row, buf)` for each chunk of rows in parallel, where
/// `buf` is `n_tokens x chunk_len` ([token][row in chunk]), then places the
/// results in y. Returns the sum of what the chunks return.
fn for_row_chunks(
    rows: usize,
    n_tokens: usize,
    chunk: usize,
    y: &mut [f32],
    chunk_fn: impl Fn(usize, &mut [f32]) -> Tiles + Sync,
) -> Tiles {
    let tiles = dot::TileCount::default();
    if n_tokens == 1 {
        // [token][row] with one token is already y's layout.
        for_each_chunk_mut(y, chunk, |c, buf| tiles.add(chunk_fn(c * chunk, buf)));
        return tiles.get();
    }
    let mut tmp = vec![0.0f32; rows * n_tokens];
    for_each_chunk_mut(&mut tmp, chunk * n_tokens, |c, buf| {
        tiles.add(chunk_fn(c * chunk, buf))
    });
    let tmp = &tmp;
    for_each_chunk_mut(y, rows, |t, yt| {
        for (c, dst) in yt.chunks_mut(chunk).enumerate() {
            let nr = dst.len();
            let start = c * chunk * n_tokens + t * nr;
            dst.copy_from_slice(&tmp[start..start + nr]);
        }
    });
    tiles.get()
}

/// The fast path for one weight type: `w` holds `rows * k` weight units,
/// `act` holds `n_tokens * k` activation units; each chunk of rows runs the
/// path's tiled GEMM over all tokens (with one token, its matvec).
#[allow(clippy::too_many_arguments)]
fn gemm<W: Pod + Sync, A: Copy + Sync>(
    w: &[W],
    act: &[A],
    k: usize,
    rows: usize,
    n_tokens: usize,
    chunk: usize,
    y: &mut [f32],
    kernel: GemmFn<W, A>,
) -> Tiles {
    for_row_chunks(rows, n_tokens, chunk, y, |r0, buf| {
        let nr = buf.len() / n_tokens;
        kernel(&w[r0 * k..(r0 + nr) * k], act, k, buf)
    })
}

/// Fast path: activations are first converted to `w.ty.vec_dot_type()` (Q8_0
/// for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, f16/bf16
/// for F16/BF16 weights) exactly as ggml does, into `scratch`, then each
/// output is one [`crate::dot`] call on the weight bytes in place. Supports
/// the types with [`GgmlType::can_compute`].
pub fn matmul(
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) -> Result<(), KernelError> {
    matmul_with(kernels()?, w, x, n_tokens, y, scratch)
}

/// [`matmul`] on a given path's kernels (from [`crate::dot::kernels_for`])
/// instead of the process-wide one.
pub fn matmul_with(
    ks: &Kernels,
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) -> Result<(), KernelError> {
    let chunk = chunk_rows(w.rows, w.cols);
    matmul_chunked_with(ks, w, x, n_tokens, y, scratch, chunk).map(|_| ())
}

#[cfg(test)]
fn matmul_chunked(
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
    chunk: usize,
) -> Result<Tiles, KernelError> {
    matmul_chunked_with(kernels()?, w, x, n_tokens, y, scratch, chunk)
}

/// Returns how many micro-kernel tiles ran (the test hook that shows a
/// batch takes the tiled path).
fn matmul_chunked_with(
    ks: &Kernels,
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
    chunk: usize,
) -> Result<Tiles, KernelError> {
    if !w.ty.can_compute() {
        return Err(KernelError::Unsupported {
            ty: w.ty,
            op: "matmul",
        });
    }
    check_shapes(w, x, n_tokens, y)?;
    let (rows, cols) = (w.rows, w.cols);
    if rows == 0 || n_tokens == 0 {
        return Ok(Tiles::default());
    }
    if cols == 0 {
        y.fill(0.0);
        return Ok(Tiles::default());
    }

    use GgmlType::*;
    let (data, k) = (w.data, cols / w.ty.block_size());
    let quant: QuantGemm = match w.ty {
        Q4_0 => quant_gemm::<BlockQ4_0>,
        Q4_1 => quant_gemm::<BlockQ4_1>,
        Q5_0 => quant_gemm::<BlockQ5_0>,
        Q5_1 => quant_gemm::<BlockQ5_1>,
        Q8_0 => quant_gemm::<BlockQ8_0>,
        Q2_K => quant_gemm::<BlockQ2_K>,
        Q3_K => quant_gemm::<BlockQ3_K>,
        Q4_K => quant_gemm::<BlockQ4_K>,
        Q5_K => quant_gemm::<BlockQ5_K>,
        Q6_K => quant_gemm::<BlockQ6_K>,
        // ggml's F16 and BF16 weights take activations of their own type.
        F16 => {
            convert_rows(x, cols, 2 * cols, scratch, |src, dst| {
                crate::quant::float::quantize_row_f16(src, cast_slice_mut(dst))
            });
            let kernel = ks.f16;
            let (w, a) = (cast_slice(data), cast_slice(scratch));
            return Ok(gemm::<F16Bytes, F16Bytes>(
                w, a, k, rows, n_tokens, chunk, y, kernel,
            ));
        }
        BF16 => {
            convert_rows(x, cols, 2 * cols, scratch, |src, dst| {
                crate::quant::float::quantize_row_bf16(src, cast_slice_mut(dst))
            });
            let kernel = ks.bf16;
            let (w, a) = (cast_slice(data), cast_slice(scratch));
            return Ok(gemm::<Bf16Bytes, Bf16Bytes>(
                w, a, k, rows, n_tokens, chunk, y, kernel,
            ));
        }
        F32 => {
            let w = cast_slice(data);
            return Ok(gemm::<F32Bytes, f32>(
                w, x, k, rows, n_tokens, chunk, y, ks.f32_le,
            ));
        }
        Q8_1 | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ4_NL | IQ3_S | IQ2_S | IQ4_XS
        | IQ1_M | TQ1_0 | TQ2_0 | MXFP4 | NVFP4 | Q1_0 | I8 | I16 | I32 | I64 | F64 => {
            return Err(KernelError::Unsupported {
                ty: w.ty,
                op: "matmul",
            })
        }
    };
    Ok(quant(ks, data, x, cols, n_tokens, chunk, y, scratch))
}

/// [`quant_gemm`] for one weight type.
type QuantGemm =
    fn(&Kernels, &[u8], &[f32], usize, usize, usize, &mut [f32], &mut Vec<u8>) -> Tiles;

/// A quantized weight type's fast path: each token's activations quantized
/// to `W::Act` with the path's quantizer (the reference bytes) into
/// `scratch`, then the path's GEMM for `W` over the weight bytes in place.
#[allow(clippy::too_many_arguments)]
fn quant_gemm<W: DotFormat>(
    ks: &Kernels,
    data: &[u8],
    x: &[f32],
    cols: usize,
    n_tokens: usize,
    chunk: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) -> Tiles {
    let k = cols / <W as crate::quant::BlockFormat>::BLOCK;
    let quantize = <W::Act as ActFormat>::quantizer(ks);
    convert_rows(
        x,
        cols,
        k * std::mem::size_of::<W::Act>(),
        scratch,
        |src, dst| quantize(src, cast_slice_mut(dst)),
    );
    let rows = data.len() / (k * std::mem::size_of::<W>());
    gemm::<W, W::Act>(
        cast_slice(data),
        cast_slice(scratch),
        k,
        rows,
        n_tokens,
        chunk,
        y,
        W::gemm(ks),
    )
}

/// Converts each token's row of `x` (`cols` values) into `row` bytes of
/// `scratch` with `f`, in parallel from four tokens on.
fn convert_rows(
    x: &[f32],
    cols: usize,
    row: usize,
    scratch: &mut Vec<u8>,
    f: impl Fn(&[f32], &mut [u8]) + Sync,
) {
    let n_tokens = x.len() / cols;
    scratch.clear();
    scratch.resize(row * n_tokens, 0);
    if n_tokens < 4 {
        for (dst, src) in scratch.chunks_exact_mut(row).zip(x.chunks_exact(cols)) {
            f(src, dst);
        }
    } else {
        for_each_chunk_mut(scratch, row, |i, dst| f(&x[i * cols..][..cols], dst));
    }
}

/// Exact path: each weight row is dequantized to f32 (one row at a time, in
/// a buffer per task) and dotted with the f32 activations using f64 products
/// and an f64 accumulator, rounded to f32 once at the end. The reference for
/// accuracy checks against float32 frameworks. Supports every type
/// [`crate::dequantize_row`] does.
pub fn matmul_exact(
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    matmul_exact_chunked(w, x, n_tokens, y, chunk_rows(w.rows, w.cols))
}

fn matmul_exact_chunked(
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    chunk: usize,
) -> Result<(), KernelError> {
    if !quant::has_row_codec(w.ty) {
        return Err(KernelError::Unsupported {
            ty: w.ty,
            op: "matmul_exact",
        });
    }
    let row_bytes = check_shapes(w, x, n_tokens, y)?;
    let (rows, cols) = (w.rows, w.cols);
    if rows == 0 || n_tokens == 0 {
        return Ok(());
    }
    for_row_chunks(rows, n_tokens, chunk, y, |r0, buf| {
        let nr = buf.len() / n_tokens;
        let mut wrow = vec![0.0f32; cols];
        for i in 0..nr {
            let src = &w.data[(r0 + i) * row_bytes..][..row_bytes];
            quant::dequantize_row(w.ty, src, &mut wrow).expect("shape checked above");
            for t in 0..n_tokens {
                let xt = &x[t * cols..][..cols];
                buf[t * nr + i] = dot::vec_dot_f32_f64acc(&wrow, xt) as f32;
            }
        }
        Tiles::default()
    });
    Ok(())
}

#[cfg(test)]
mod tests;
