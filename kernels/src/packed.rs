//! Weights repacked at load into a 16-row interleaved layout (Q4_0, Q4_1, Q8_0).
//!
//! In the file a row's blocks follow one another (18 or 34 bytes each), so a
//! SIMD kernel spends more instructions gathering bytes and scales than
//! multiplying. A packed matrix keeps 16 rows together: one 512-bit load
//! holds 4 bytes of each of the 16 rows, and `vpdpbusd` against one 4-byte
//! group of the activations broadcast to every lane adds to lane i a partial
//! dot of row i. After the block's 8 groups lane i holds row i's exact
//! integer dot, and one convert and one FMA scale all 16 rows at once.
//!
//! Layout of one group of 16 rows over `k` blocks (rows past the matrix's
//! end are zeros, so they add nothing and are never stored): units of
//! `64 / SB` blocks, one after the other, each the quants of its blocks and
//! then their scales in one 64-byte line, so a kernel reads the group as one
//! sequential stream:
//! - quants, `QB` bytes a block: block b's chunk j holds, in its 4-byte lane
//!   i, bytes `4j..4j+4` of row i's block b (Q4_0: QB = 256, 4 chunks of 64
//!   bytes, whose low nibbles are elements `4j..4j+4` and high nibbles
//!   elements `16+4j..`, as for Q4_1; Q8_0: QB = 512, 8 chunks);
//! - scales, `SB` bytes a block: its 16 f16 scales in row order (SB = 32;
//!   Q4_1: SB = 64, the 16 scales then the 16 minimums).
//!
//! So Q4_0 and Q8_0 go in units of two blocks (576 and 1088 bytes), Q4_1 in
//! units of one (320 bytes); a group with an odd k ends in a half-empty
//! unit. An earlier layout put all of a group's scales first and its quants
//! after: two streams a thread, which Zen 4's hardware prefetchers followed
//! worse than one (see BENCHMARKS.md, "Packed layout").
//!
//! The quant and scale bytes are the file's, moved (Q8_0 quants with their
//! top bit flipped, x + 128): a packed matrix takes as
//! much memory as the file's tensor (plus the padding rows), in anonymous
//! memory. The file stays the source of truth: the exact path and the
//! embedding lookup read the map.
//!
//! Activations go in [`ActBlock`]s: Q8_0 quants plus the block scale as f32
//! and an integer correction, so the kernels' integer sums are exact:
//! - Q4_0: `vpdpbusd` wants unsigned x signed; the nibbles q (0..15) are the
//!   unsigned side, and `sum((q - 8) y) = sum(q y) - 8 sum(y)` with
//!   `c = -8 sum(y)` the sum's starting value.
//! - Q8_0: the weights are stored as `x + 128` (one unsigned byte for
//!   every x), the unsigned side, and `sum((x + 128) y) - 128 sum(y)` with
//!   `c = -128 sum(y)` the sum's starting value, as for Q4_0. The kernels
//!   without `vpdpbusd` recover x and ignore `c` (see `avx2.rs`).
//! - Q4_1 (Q8_1 activations): nibbles as Q4_0, no correction; the block's
//!   `s = d sum(y)` is carried as f32 for the `m_x s` term.
//!
//! Each output is `sum_b fma(dx_b * dy_b, sumi_b, acc)` over blocks in
//! order, starting from 0 (Q4_1: then `acc = fma(m_b, s_b, acc)` per
//! block), on every path ([`scalar`] twin included, through
//! `f32::mul_add`), so the paths agree bit for bit and a token's result
//! does not depend on the batch it came in. Against the file-layout
//! reference (`sumi * dx * dy` summed) it differs by rounding only.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512vnni;
#[cfg(target_arch = "x86_64")]
mod avxvnni;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use bytemuck::{Pod, Zeroable};

use crate::buffer::Buffer;
use crate::dot::Tiles;
use crate::matmul::{check_len, WeightView};
use crate::quant::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
use crate::simd::{simd_path, SimdPath};
use crate::{GgmlType, KernelError};

/// Rows per packed group: one per 32-bit lane of a 512-bit register.
pub const GROUP_ROWS: usize = 16;

/// A Q8_0 activation block as the packed kernels read it.
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq)]
#[repr(C)]
pub struct ActBlock {
    /// The Q8_0 quants as bytes (Q4_1 weights: the Q8_1 quants).
    pub qs: [u8; 32],
    /// The block's scale (the f16 of the Q8_0 block, widened exactly).
    pub d: f32,
    /// Starting value of the block's integer sum: Q4_0 -8 * sum(y), Q8_0
    /// -128 * sum(y) (the weights' offsets), Q4_1 0.
    pub c: i32,
    /// Q4_1 weights: the Q8_1 block's `s` (d * sum(y)) widened; else 0.
    pub s: f32,
}

const _: () = assert!(std::mem::size_of::<ActBlock>() == 44);

/// Per-session buffers of [`matmul_packed`], reused across calls.
#[derive(Default)]
pub struct PackedScratch {
    q8: Vec<BlockQ8_0>,
    q8_1: Vec<BlockQ8_1>,
    act: Vec<ActBlock>,
    /// Whether the Q8_0 activations of the last [`prepare_acts`] hold a -128.
    minus_128: bool,
}

/// `gemm(w, r0, nr, act, out)`: rows `r0..r0 + nr` of `w` (r0 a multiple of
/// [`GROUP_ROWS`]) times `n_tokens` activation rows of `w.blocks()` blocks
/// each; row `r0 + i`, token t goes to `out.at(t, i)`.
///
/// Safety: for every token t < n and i < nr, `out.at(t, i)` is valid for
/// writes and no other thread touches it during the call. (Correctness, not
/// safety: a Q8_0 kernel of a table without `q8_0_takes_minus_128` gives
/// wrong sums for a -128 activation; [`PackedKernels::gemm`] routes around it.)
pub type PackedGemmFn = unsafe fn(&PackedWeights, usize, usize, &[ActBlock], Out) -> Tiles;

/// Where a [`PackedGemmFn`] writes row `r0 + i` for token t: `ptr + t * ld + i`.
/// Row chunks of one output matrix write disjoint columns of it, in place,
/// so no chunk needs a buffer of its own and nothing is copied afterwards.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    ptr: *mut f32,
    ld: usize,
}

// SAFETY: an Out is only a place to write; PackedGemmFn's contract gives each
// call exclusive use of the elements it writes, whichever thread runs it.
unsafe impl Send for Out {}
// SAFETY: as above; Out has no interior state.
unsafe impl Sync for Out {}

impl Out {
    /// The element of row-in-chunk `i`, token `t`.
    #[inline]
    pub(crate) fn at(self, t: usize, i: usize) -> *mut f32 {
        self.ptr.wrapping_add(t * self.ld + i)
    }

    /// The same output, `rows` rows further on.
    fn offset(self, rows: usize) -> Out {
        Out {
            ptr: self.ptr.wrapping_add(rows),
            ld: self.ld,
        }
    }

    // Read by the x86 kernels only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn ld(self) -> usize {
        self.ld
    }
}

/// The packed kernels of one path.
pub struct PackedKernels {
    pub path: SimdPath,
    q4_0: PackedGemmFn,
    q4_1: PackedGemmFn,
    q8_0: PackedGemmFn,
    /// Whether `q8_0` is exact for a -128 activation quant. The `vpmaddubsw`
    /// kernels' sign trick cannot negate it; quantizers give it only from a
    /// -inf that a NaN hid from the block maximum, or a block whose scale is
    /// 0, and a call with one goes to the scalar twin ([`Self::gemm`]).
    q8_0_takes_minus_128: bool,
}

impl PackedKernels {
    /// The kernel for `ty` weights, given whether the activations hold a
    /// -128 quant (Q8_0 weights only; [`PackedScratch`] knows after quantizing).
    fn gemm(&self, ty: GgmlType, minus_128: bool) -> PackedGemmFn {
        match ty {
            GgmlType::Q4_0 => self.q4_0,
            GgmlType::Q4_1 => self.q4_1,
            _ if minus_128 && !self.q8_0_takes_minus_128 => SCALAR.q8_0,
            _ => self.q8_0,
        }
    }
}

/// The portable twin: the same sums in the same order as the SIMD kernels,
/// for tests. Slow (software FMA); never chosen for real work.
pub static SCALAR: PackedKernels = PackedKernels {
    path: SimdPath::Scalar,
    q4_0: scalar::gemm_q4_0,
    q4_1: scalar::gemm_q4_1,
    q8_0: scalar::gemm_q8_0,
    q8_0_takes_minus_128: true,
};

/// The packed kernels of `path`, if it has them and this CPU has the path.
/// AVX-512 VNNI has `vpdpbusd` on 512 bits; AVX-512 without VNNI emulates
/// it with `vpmaddubsw` + `vpmaddwd` on 512 bits; AVX-VNNI has it on 256
/// bits, per 8-row half of a group, and AVX2 emulates that. On the other
/// paths (scalar, NEON) the engine reads the weights from the map with
/// [`crate::matmul`].
pub fn packed_kernels_for(path: SimdPath) -> Option<&'static PackedKernels> {
    if !path.is_available() {
        return None;
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512Vnni => Some(&avx512vnni::KERNELS),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => Some(&avx512::KERNELS),
        #[cfg(target_arch = "x86_64")]
        SimdPath::AvxVnni => Some(&avxvnni::vex::KERNELS),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => Some(&avx2::KERNELS),
        _ => None,
    }
}

/// The AVX-VNNI kernels in the EVEX encoding of the same instruction
/// (AVX-512 VNNI + VL), where this CPU has those: for benchmarks and tests
/// of the `avxvnni` kernels on CPUs without AVX-VNNI, such as Zen 4. Their
/// table reports the `avxvnni` path. Not a path of its own: the engine
/// never chooses them.
#[doc(hidden)]
pub fn avxvnni_evex_kernels() -> Option<&'static PackedKernels> {
    #[cfg(target_arch = "x86_64")]
    if avxvnni::evex::available() {
        return Some(&avxvnni::evex::KERNELS);
    }
    None
}

/// The packed kernels of the process-wide [`simd_path`], if any.
pub fn packed_kernels() -> Option<&'static PackedKernels> {
    simd_path().ok().and_then(packed_kernels_for)
}

/// Whether [`PackedWeights::pack`] takes this type.
pub fn can_pack(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// A weight matrix in the packed layout, with the kernels that read it.
pub struct PackedWeights {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Bytes of one group (a multiple of 64).
    group_bytes: usize,
    data: Buffer,
    kernels: &'static PackedKernels,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.n_bytes())
            .field("path", &self.kernels.path)
            .finish()
    }
}

/// Quant bytes per block in a group.
fn group_quant_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => 256,
        _ => 512,
    }
}

/// Scale bytes per block in a group: 16 f16 scales (and 16 minimums for Q4_1).
fn group_scale_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_1 => 64,
        _ => 32,
    }
}

/// Blocks per unit of the layout: as many as have their scales fill one
/// 64-byte line (`sb`: scale bytes per block, 32 or 64).
const fn unit_blocks(sb: usize) -> usize {
    64 / sb
}

/// Bytes of one unit: its blocks' quants (`qb` bytes each), then the line of scales.
const fn unit_bytes(qb: usize, sb: usize) -> usize {
    unit_blocks(sb) * qb + 64
}

/// Where block `b`'s quants and scales start in its group, for `qb` quant
/// and `sb` scale bytes a block. Both are multiples of 32 from the group's
/// (64-byte aligned) start; quants are 64-byte aligned.
#[inline(always)]
pub(crate) const fn block_at(qb: usize, sb: usize, b: usize) -> (usize, usize) {
    let (u, i) = (b / unit_blocks(sb), b % unit_blocks(sb));
    let unit = u * unit_bytes(qb, sb);
    (unit + i * qb, unit + unit_blocks(sb) * qb + i * sb)
}

/// Bytes of a group of `k` blocks, if that fits a usize.
pub(crate) fn group_len(qb: usize, sb: usize, k: usize) -> Option<usize> {
    k.div_ceil(unit_blocks(sb)).checked_mul(unit_bytes(qb, sb))
}

impl PackedWeights {
    /// Packs `w` for `kernels`. Errors on a type [`can_pack`] refuses, a
    /// column count that is not a whole number of blocks, or data whose
    /// length disagrees with the shape.
    pub fn pack(w: &WeightView, kernels: &'static PackedKernels) -> Result<Self, KernelError> {
        if !can_pack(w.ty) {
            return Err(KernelError::Unsupported {
                ty: w.ty,
                op: "pack",
            });
        }
        let row_bytes = w.checked_row_bytes()?;
        let k = w.cols / 32;
        let group_bytes = group_len(group_quant_bytes(w.ty), group_scale_bytes(w.ty), k).ok_or(
            KernelError::Overflow {
                what: "packed group",
            },
        )?;
        let groups = w.rows.div_ceil(GROUP_ROWS);
        let total = groups
            .checked_mul(group_bytes)
            .ok_or(KernelError::Overflow {
                what: "packed weights",
            })?;
        let mut data = Buffer::zeroed(total)?;
        if group_bytes > 0 {
            use rayon::prelude::*;
            data.bytes_mut()
                .par_chunks_mut(group_bytes)
                .enumerate()
                .for_each(|(g, dst)| {
                    let r0 = g * GROUP_ROWS;
                    let r1 = (r0 + GROUP_ROWS).min(w.rows);
                    for (i, src) in w.data[r0 * row_bytes..r1 * row_bytes]
                        .chunks_exact(row_bytes)
                        .enumerate()
                    {
                        pack_row(w.ty, src, i, dst);
                    }
                });
        }
        Ok(PackedWeights {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            group_bytes,
            data,
            kernels,
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols / 32
    }

    /// Memory the packed matrix holds.
    pub fn n_bytes(&self) -> usize {
        self.data.len()
    }

    fn gemm_fn(&self, minus_128: bool) -> PackedGemmFn {
        self.kernels.gemm(self.ty, minus_128)
    }

    /// Group g's bytes: its units of quants and scales ([`block_at`]).
    fn group(&self, g: usize) -> &[u8] {
        &self.data.bytes()[g * self.group_bytes..(g + 1) * self.group_bytes]
    }
}

/// Scatters one row (row `i` of its group) into the group's quants and
/// scales ([`block_at`]), as 32-bit and 16-bit words (the group is 64-byte
/// aligned, quants at multiples of 64 bytes and scales of 32 within it).
fn pack_row(ty: GgmlType, src: &[u8], i: usize, group: &mut [u8]) {
    let (qb, sb) = (group_quant_bytes(ty), group_scale_bytes(ty));
    let put = |b: usize, d: [u8; 2], qs: &[u8], group: &mut [u8]| {
        let (qo, so) = block_at(qb, sb, b);
        group[so + 2 * i..so + 2 * i + 2].copy_from_slice(&d);
        let q32: &mut [u32] = bytemuck::cast_slice_mut(&mut group[qo..qo + qb]);
        for (j, four) in qs.chunks_exact(4).enumerate() {
            q32[j * 16 + i] = u32::from_ne_bytes([four[0], four[1], four[2], four[3]]);
        }
    };
    match ty {
        GgmlType::Q4_0 => {
            let blocks: &[BlockQ4_0] = bytemuck::cast_slice(src);
            for (b, blk) in blocks.iter().enumerate() {
                put(b, blk.d, &blk.qs, group);
            }
        }
        GgmlType::Q4_1 => {
            let blocks: &[BlockQ4_1] = bytemuck::cast_slice(src);
            for (b, blk) in blocks.iter().enumerate() {
                put(b, blk.d, &blk.qs, group);
                let so = block_at(qb, sb, b).1 + 32 + 2 * i;
                group[so..so + 2].copy_from_slice(&blk.m);
            }
        }
        _ => {
            let blocks: &[BlockQ8_0] = bytemuck::cast_slice(src);
            for (b, blk) in blocks.iter().enumerate() {
                // Stored as x + 128, the unsigned side of `vpdpbusd`.
                put(b, blk.d, &blk.qs.map(|v| v as u8 ^ 0x80), group);
            }
        }
    }
}

/// Rows per task: about sixteen tasks per thread, at least ~16K
/// multiply-adds each, a whole number of groups. Decode is memory-bound and
/// one thread alone cannot use the machine's bandwidth, so the wait for the
/// last task matters: with 16 tasks a thread instead of 4, Llama-3.1-8B Q4_0
/// generation went from 5.1-6.0 to 6.0-6.2 t/s (2 threads, alternating
/// builds), with prompt speed unchanged.
fn chunk_rows(rows: usize, cols: usize) -> usize {
    let by_threads = rows.div_ceil(rayon::current_num_threads() * 16);
    let by_work = (1 << 14) / cols.max(1);
    by_threads.max(by_work).div_ceil(GROUP_ROWS) * GROUP_ROWS
}

/// y = W x for a packed W: `x` is `n_tokens x cols`, `y` is `n_tokens x
/// rows`. Activations are quantized to Q8_0 with the active path's quantizer
/// (the same bytes as [`crate::quant::quantize_row_q8_0`]), as [`crate::matmul`]
/// does for Q4_0 and Q8_0 weights.
pub fn matmul_packed(
    w: &PackedWeights,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut PackedScratch,
) -> Result<(), KernelError> {
    let chunk = chunk_rows(w.rows, w.cols);
    matmul_packed_chunked(w, x, n_tokens, y, scratch, chunk).map(|_| ())
}

/// Several packed matrices times the same activations (Q, K and V; gate and
/// up): `ys[i] = ws[i] x`. When all have one type and column count the
/// activations are quantized once, and a decode step runs every matrix's
/// row chunks in one parallel region instead of one region each. Otherwise
/// it is [`matmul_packed`] per matrix.
pub fn matmul_packed_multi(
    ws: &mut [(&PackedWeights, &mut [f32])],
    x: &[f32],
    n_tokens: usize,
    scratch: &mut PackedScratch,
) -> Result<(), KernelError> {
    let Some((first, _)) = ws.first() else {
        return Ok(());
    };
    let (ty, cols) = (first.ty, first.cols);
    let shared = ws.iter().all(|(w, _)| w.ty == ty && w.cols == cols);
    if !shared || n_tokens != 1 || cols == 0 {
        for (w, y) in ws.iter_mut() {
            matmul_packed(w, x, n_tokens, y, scratch)?;
        }
        return Ok(());
    }
    check_len("activations", cols, x.len())?;
    for (w, y) in ws.iter() {
        check_len("output", w.rows, y.len())?;
    }
    prepare_acts(ty, x, cols, scratch)?;
    let (act, minus_128) = (&scratch.act, scratch.minus_128);
    use rayon::prelude::*;
    ws.par_iter_mut().for_each(|(w, y)| {
        let gemm = w.gemm_fn(minus_128);
        let chunk = chunk_rows(w.rows, w.cols);
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
            let (r0, nr) = (c * chunk, out.len());
            let o = Out {
                ptr: out.as_mut_ptr(),
                ld: nr,
            };
            // SAFETY: one token; `out` is this chunk's own nr outputs.
            unsafe { gemm(w, r0, nr, act, o) };
        });
    });
    Ok(())
}

/// [`matmul_packed`] in chunks of `chunk` rows (a multiple of
/// [`GROUP_ROWS`]), returning the tiles the kernels ran (a test hook).
fn matmul_packed_chunked(
    w: &PackedWeights,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut PackedScratch,
    chunk: usize,
) -> Result<Tiles, KernelError> {
    let nx = n_tokens.checked_mul(w.cols).ok_or(KernelError::Overflow {
        what: "activations",
    })?;
    check_len("activations", nx, x.len())?;
    let ny = n_tokens
        .checked_mul(w.rows)
        .ok_or(KernelError::Overflow { what: "output" })?;
    check_len("output", ny, y.len())?;
    if w.rows == 0 || n_tokens == 0 {
        return Ok(Tiles::default());
    }
    if w.cols == 0 {
        y.fill(0.0);
        return Ok(Tiles::default());
    }
    prepare_acts(w.ty, x, w.cols, scratch)?;
    let act = &scratch.act;
    let gemm = w.gemm_fn(scratch.minus_128);
    let out = Out {
        ptr: y.as_mut_ptr(),
        ld: w.rows,
    };
    use rayon::prelude::*;
    let rows = w.rows;
    Ok((0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let r0 = c * chunk;
            let nr = chunk.min(rows - r0);
            // SAFETY: y holds n_tokens x rows (checked above); chunk c writes
            // y[t * rows + r0 + i] for i < nr only, columns no other chunk writes.
            unsafe { gemm(w, r0, nr, act, out.offset(r0)) }
        })
        .sum())
}

/// Quantizes each token's row to Q8_0 (Q8_1 for Q4_1 weights) and rewrites
/// the blocks as the packed kernels for `ty` weights read them.
fn prepare_acts(
    ty: GgmlType,
    x: &[f32],
    cols: usize,
    s: &mut PackedScratch,
) -> Result<(), KernelError> {
    let ks = crate::dot::kernels()?;
    let k = cols / 32;
    let n = x.len() / cols;
    // Every element is overwritten below: resize only grows the buffers, no clearing pass.
    s.act.resize(n * k, ActBlock::default());
    if ty == GgmlType::Q4_1 {
        s.q8_1.resize(n * k, BlockQ8_1::zeroed());
        each_token(x, cols, &mut s.q8_1, &mut s.act, |src, q8, act| {
            (ks.quantize_q8_1)(src, q8);
            for (a, b) in act.iter_mut().zip(q8.iter()) {
                *a = act_block_q8_1(b);
            }
        });
        s.minus_128 = false;
        return Ok(());
    }
    // On x86 the activations are quantized straight into ActBlocks (not under a forced scalar
    // path, which runs no SIMD). A 512-bit version measured no faster here (9.2% of a SmolLM2
    // prompt against 10.2%). The -128 check runs here, once per matmul, not per row chunk:
    // every chunk reads all the activations.
    #[cfg(target_arch = "x86_64")]
    if matches!(
        ks.path,
        SimdPath::Avx2 | SimdPath::AvxVnni | SimdPath::Avx512 | SimdPath::Avx512Vnni
    ) {
        let quantize = |src: &[f32], act: &mut [ActBlock]| {
            // SAFETY: every one of these paths implies AVX2, FMA and F16C.
            unsafe { avx2::quantize_acts(ty, src, act) }
        };
        let act = &mut s.act[..n * k];
        s.minus_128 = if n < 4 {
            x.chunks_exact(cols)
                .zip(act.chunks_exact_mut(k))
                .fold(false, |m, (src, a)| quantize(src, a) | m)
        } else {
            use rayon::prelude::*;
            x.par_chunks_exact(cols)
                .zip(act.par_chunks_exact_mut(k))
                .map(|(src, a)| quantize(src, a))
                .reduce(|| false, |a, b| a | b)
        };
        return Ok(());
    }
    s.q8.resize(n * k, BlockQ8_0::zeroed());
    each_token(x, cols, &mut s.q8, &mut s.act, |src, q8, act| {
        (ks.quantize_q8_0)(src, q8);
        for (a, b) in act.iter_mut().zip(q8.iter()) {
            *a = act_block(ty, b);
        }
    });
    s.minus_128 = ty == GgmlType::Q8_0 && s.q8[..n * k].iter().any(|b| b.qs.contains(&-128));
    Ok(())
}

/// Runs `f(row, its Q8 blocks, its activation blocks)` for each token's row
/// of `x`, in parallel from four tokens on.
fn each_token<Q: Send>(
    x: &[f32],
    cols: usize,
    q8: &mut [Q],
    act: &mut [ActBlock],
    f: impl Fn(&[f32], &mut [Q], &mut [ActBlock]) + Sync,
) {
    use rayon::prelude::*;
    let k = cols / 32;
    let n = x.len() / cols;
    let (q8, act) = (&mut q8[..n * k], &mut act[..n * k]);
    if n < 4 {
        x.chunks_exact(cols)
            .zip(q8.chunks_exact_mut(k).zip(act.chunks_exact_mut(k)))
            .for_each(|(src, (q, a))| f(src, q, a));
    } else {
        x.par_chunks_exact(cols)
            .zip(q8.par_chunks_exact_mut(k).zip(act.par_chunks_exact_mut(k)))
            .for_each(|(src, (q, a))| f(src, q, a));
    }
}

/// One Q8_0 activation block as the packed kernels for `ty` (Q4_0 or Q8_0)
/// weights read it.
pub(crate) fn act_block(ty: GgmlType, b: &BlockQ8_0) -> ActBlock {
    let mut a = ActBlock {
        d: quant::scale(b.d),
        ..ActBlock::default()
    };
    a.qs = bytemuck::cast(b.qs);
    // The weights' offset times sum(y): Q4_0 nibbles are x + 8, Q8_0 bytes x + 128.
    let offset = if ty == GgmlType::Q4_0 { 8 } else { 128 };
    a.c = -offset * b.qs.iter().map(|&v| v as i32).sum::<i32>();
    a
}

/// One Q8_1 activation block as the packed Q4_1 kernels read it.
pub(crate) fn act_block_q8_1(b: &BlockQ8_1) -> ActBlock {
    ActBlock {
        qs: bytemuck::cast(b.qs),
        d: quant::scale(b.d),
        c: 0,
        s: quant::scale(b.s),
    }
}

/// Checks a [`PackedGemmFn`]'s arguments; returns `n_tokens`.
pub(crate) fn gemm_shape(w: &PackedWeights, r0: usize, nr: usize, act: &[ActBlock]) -> usize {
    let k = w.blocks();
    assert!(k > 0 && r0.is_multiple_of(GROUP_ROWS), "packed gemm: shape");
    assert!(
        act.len().is_multiple_of(k) && !act.is_empty(),
        "packed gemm: activation length"
    );
    assert!(
        r0.checked_add(nr).is_some_and(|end| end <= w.rows),
        "packed gemm: rows out of range"
    );
    act.len() / k
}
