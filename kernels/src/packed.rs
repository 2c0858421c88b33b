//! Weights repacked at load into a 16-row interleaved layout (Q4_0, Q4_1,
//! Q8_0 here; Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K in [`kq`], with their own layouts and
//! generic kernels).
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
pub mod kq;
#[cfg(test)]
mod kq_tests;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use bytemuck::{Pod, Zeroable};

use crate::buffer::Buffer;
use crate::dot::Tiles;
use crate::matmul::{check_len, WeightView};
use crate::quant::{
    self, BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K,
    BlockQ6_K, BlockQ8_0, BlockQ8_1, BlockQ8_K,
};
use crate::simd::{simd_path, SimdPath};
use crate::{GgmlType, KernelError};
pub use kq::ActBlockK;

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
    q8_k: Vec<BlockQ8_K>,
    act: Vec<ActBlock>,
    act_k: Vec<ActBlockK>,
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

use kq::PathTiles as KqTiles;

/// The packed kernels of one path.
pub struct PackedKernels {
    pub path: SimdPath,
    q4_0: PackedGemmFn,
    q4_1: PackedGemmFn,
    q8_0: PackedGemmFn,
    q5_0: KqTiles<ActBlock>,
    q5_1: KqTiles<ActBlock>,
    q2_k: KqTiles<ActBlockK>,
    q3_k: KqTiles<ActBlockK>,
    q4_k: KqTiles<ActBlockK>,
    q5_k: KqTiles<ActBlockK>,
    q6_k: KqTiles<ActBlockK>,
    /// Whether `q8_0` is exact for a -128 activation quant. The `vpmaddubsw`
    /// kernels' sign trick cannot negate it; quantizers give it only from a
    /// -inf that a NaN hid from the block maximum, or a block whose scale is
    /// 0, and a call with one goes to the scalar twin ([`Self::gemm`]).
    q8_0_takes_minus_128: bool,
}

impl PackedKernels {
    /// The kernel for the Q8_0-activation formats, given whether the
    /// activations hold a -128 quant (Q8_0 weights only; [`PackedScratch`]
    /// knows after quantizing). `None` for the [`kq`] formats.
    fn gemm(&self, f: Fmt, minus_128: bool) -> Option<PackedGemmFn> {
        match f {
            Fmt::Q4_0 => Some(self.q4_0),
            Fmt::Q4_1 => Some(self.q4_1),
            Fmt::Q8_0 if minus_128 && !self.q8_0_takes_minus_128 => Some(SCALAR.q8_0),
            Fmt::Q8_0 => Some(self.q8_0),
            Fmt::Q5_0 | Fmt::Q5_1 | Fmt::Q2K | Fmt::Q3K | Fmt::Q4K | Fmt::Q5K | Fmt::Q6K => None,
        }
    }
}

/// The formats [`PackedWeights`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    Q4_0,
    Q4_1,
    Q8_0,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl Fmt {
    /// The packed format of `ty`, if it has one (each type named).
    const fn of(ty: GgmlType) -> Option<Fmt> {
        use GgmlType::*;
        match ty {
            Q4_0 => Some(Fmt::Q4_0),
            Q4_1 => Some(Fmt::Q4_1),
            Q8_0 => Some(Fmt::Q8_0),
            GgmlType::Q5_0 => Some(Fmt::Q5_0),
            GgmlType::Q5_1 => Some(Fmt::Q5_1),
            Q2_K => Some(Fmt::Q2K),
            Q3_K => Some(Fmt::Q3K),
            Q4_K => Some(Fmt::Q4K),
            Q5_K => Some(Fmt::Q5K),
            Q6_K => Some(Fmt::Q6K),
            F32 | F16 | BF16 | Q8_1 | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ4_NL
            | IQ3_S | IQ2_S | IQ4_XS | I8 | I16 | I32 | I64 | F64 | IQ1_M | TQ1_0 | TQ2_0
            | MXFP4 | NVFP4 | Q1_0 => None,
        }
    }

    /// Bytes of a group of `k` blocks, if that fits a usize.
    fn group_len(self, k: usize) -> Option<usize> {
        match self {
            Fmt::Q4_0 => group_len(256, 32, k),
            Fmt::Q4_1 => group_len(256, 64, k),
            Fmt::Q8_0 => group_len(512, 32, k),
            Fmt::Q5_0 => k.div_ceil(2).checked_mul(kq::Q5_0_UNIT),
            Fmt::Q5_1 => k.div_ceil(2).checked_mul(kq::Q5_1_UNIT),
            Fmt::Q2K => k.checked_mul(kq::Q2K_SB),
            Fmt::Q3K => k.checked_mul(kq::Q3K_SB),
            Fmt::Q4K => k.checked_mul(kq::Q4K_SB),
            Fmt::Q5K => k.checked_mul(kq::Q5K_SB),
            Fmt::Q6K => k.checked_mul(kq::Q6K_SB),
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
    q5_0: kq::portable::<kq::Q5_0>(),
    q5_1: kq::portable::<kq::Q5_1>(),
    q2_k: kq::portable::<kq::Q2K>(),
    q3_k: kq::portable::<kq::Q3K>(),
    q4_k: kq::portable::<kq::Q4K>(),
    q5_k: kq::portable::<kq::Q5K>(),
    q6_k: kq::portable::<kq::Q6K>(),
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

/// Whether [`PackedWeights::pack`] takes this type: Q4_0, Q4_1, Q8_0, Q5_0, Q5_1,
/// Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.
pub fn can_pack(ty: GgmlType) -> bool {
    Fmt::of(ty).is_some()
}

/// A weight matrix in the packed layout, with the kernels that read it.
pub struct PackedWeights {
    ty: GgmlType,
    fmt: Fmt,
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
        let Some(fmt) = Fmt::of(w.ty) else {
            return Err(KernelError::Unsupported {
                ty: w.ty,
                op: "pack",
            });
        };
        let row_bytes = w.checked_row_bytes()?;
        let k = w.cols / w.ty.block_size();
        let group_bytes = fmt.group_len(k).ok_or(KernelError::Overflow {
            what: "packed group",
        })?;
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
                        pack_row(fmt, src, i, dst);
                    }
                });
        }
        Ok(PackedWeights {
            ty: w.ty,
            fmt,
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
        self.cols / self.ty.block_size()
    }

    /// Memory the packed matrix holds.
    pub fn n_bytes(&self) -> usize {
        self.data.len()
    }

    /// Rows `r0..r0 + nr` times the activations `s` prepared for this
    /// matrix's format ([`prepare_acts`]), written to `out`.
    ///
    /// Safety: [`PackedGemmFn`]'s, with `s`'s activations.
    unsafe fn run(&self, r0: usize, nr: usize, s: &PackedScratch, out: Out) -> Tiles {
        let ks = self.kernels;
        // SAFETY (every arm): the caller's guarantee, passed on; the tables'
        // kernels run only on CPUs with their features (packed_kernels_for).
        unsafe {
            match self.fmt {
                Fmt::Q4_0 | Fmt::Q4_1 | Fmt::Q8_0 => {
                    let gemm = ks
                        .gemm(self.fmt, s.minus_128)
                        .expect("Q8_0-activation format");
                    gemm(self, r0, nr, &s.act, out)
                }
                Fmt::Q5_0 => kq::gemm(self, r0, nr, &s.act, out, ks.q5_0),
                Fmt::Q5_1 => kq::gemm(self, r0, nr, &s.act, out, ks.q5_1),
                Fmt::Q2K => kq::gemm(self, r0, nr, &s.act_k, out, ks.q2_k),
                Fmt::Q3K => kq::gemm(self, r0, nr, &s.act_k, out, ks.q3_k),
                Fmt::Q4K => kq::gemm(self, r0, nr, &s.act_k, out, ks.q4_k),
                Fmt::Q5K => kq::gemm(self, r0, nr, &s.act_k, out, ks.q5_k),
                Fmt::Q6K => kq::gemm(self, r0, nr, &s.act_k, out, ks.q6_k),
            }
        }
    }

    /// Group g's bytes: its units of quants and scales ([`block_at`]).
    fn group(&self, g: usize) -> &[u8] {
        &self.data.bytes()[g * self.group_bytes..(g + 1) * self.group_bytes]
    }
}

/// Scatters one row (row `i` of its group) into the group's quants and
/// scales ([`block_at`], or the [`kq`] layouts), as 32-bit and 16-bit words
/// (the group is 64-byte aligned, quants at multiples of 64 bytes and
/// scales of 32 within it).
fn pack_row(f: Fmt, src: &[u8], i: usize, group: &mut [u8]) {
    let put = |(qb, sb): (usize, usize), b: usize, d: [u8; 2], qs: &[u8], group: &mut [u8]| {
        let (qo, so) = block_at(qb, sb, b);
        group[so + 2 * i..so + 2 * i + 2].copy_from_slice(&d);
        let q32: &mut [u32] = bytemuck::cast_slice_mut(&mut group[qo..qo + qb]);
        for (j, four) in qs.chunks_exact(4).enumerate() {
            q32[j * 16 + i] = u32::from_ne_bytes([four[0], four[1], four[2], four[3]]);
        }
    };
    match f {
        Fmt::Q4_0 => {
            let blocks: &[BlockQ4_0] = bytemuck::cast_slice(src);
            for (b, blk) in blocks.iter().enumerate() {
                put((256, 32), b, blk.d, &blk.qs, group);
            }
        }
        Fmt::Q4_1 => {
            let blocks: &[BlockQ4_1] = bytemuck::cast_slice(src);
            for (b, blk) in blocks.iter().enumerate() {
                put((256, 64), b, blk.d, &blk.qs, group);
                let so = block_at(256, 64, b).1 + 32 + 2 * i;
                group[so..so + 2].copy_from_slice(&blk.m);
            }
        }
        Fmt::Q8_0 => {
            let blocks: &[BlockQ8_0] = bytemuck::cast_slice(src);
            for (b, blk) in blocks.iter().enumerate() {
                // Stored as x + 128, the unsigned side of `vpdpbusd`.
                put((512, 32), b, blk.d, &blk.qs.map(|v| v as u8 ^ 0x80), group);
            }
        }
        Fmt::Q5_0 => kq::pack_row_q5_0(bytemuck::cast_slice::<u8, BlockQ5_0>(src), i, group),
        Fmt::Q5_1 => kq::pack_row_q5_1(bytemuck::cast_slice::<u8, BlockQ5_1>(src), i, group),
        Fmt::Q2K => kq::pack_row_q2_k(bytemuck::cast_slice::<u8, BlockQ2_K>(src), i, group),
        Fmt::Q3K => kq::pack_row_q3_k(bytemuck::cast_slice::<u8, BlockQ3_K>(src), i, group),
        Fmt::Q4K => kq::pack_row_q4_k(bytemuck::cast_slice::<u8, BlockQ4_K>(src), i, group),
        Fmt::Q5K => kq::pack_row_q5_k(bytemuck::cast_slice::<u8, BlockQ5_K>(src), i, group),
        Fmt::Q6K => kq::pack_row_q6_k(bytemuck::cast_slice::<u8, BlockQ6_K>(src), i, group),
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
    // At least one group: a matrix without rows and wider than 16K columns gave 0.
    by_threads.max(by_work).max(1).div_ceil(GROUP_ROWS) * GROUP_ROWS
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
/// row chunks in one parallel region instead of one region each (up to
/// [`MAX_SHARED`] matrices). Otherwise it is [`matmul_packed`] per matrix.
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
    if !shared || n_tokens != 1 || cols == 0 || ws.len() > MAX_SHARED {
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
    let s = &*scratch;
    // One task list over every matrix's row chunks: (matrix, its output, chunk rows, chunks),
    // in an array so a decode step allocates nothing.
    let mut parts = [None; MAX_SHARED];
    for (p, (w, y)) in parts.iter_mut().zip(ws.iter_mut()) {
        let chunk = chunk_rows(w.rows, w.cols);
        let out = Out {
            ptr: y.as_mut_ptr(),
            ld: w.rows,
        };
        *p = Some((&**w, out, chunk, w.rows.div_ceil(chunk)));
    }
    let n_tasks = parts.iter().flatten().map(|p| p.3).sum();
    crate::pool::for_each_index(n_tasks, |mut c| {
        for (w, out, chunk, n) in parts.iter().flatten() {
            if c < *n {
                let r0 = c * chunk;
                let nr = (*chunk).min(w.rows - r0);
                // SAFETY: one token; y (checked to hold w.rows) is written at rows
                // r0..r0 + nr only, which no other task of this matrix writes.
                unsafe { w.run(r0, nr, s, out.offset(r0)) };
                return;
            }
            c -= n;
        }
    });
    Ok(())
}

/// The most matrices [`matmul_packed_multi`] runs in one region (Q, K and V are three).
const MAX_SHARED: usize = 4;

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
    let s = &*scratch;
    let out = Out {
        ptr: y.as_mut_ptr(),
        ld: w.rows,
    };
    let rows = w.rows;
    let tiles = crate::dot::TileCount::default();
    crate::pool::for_each_index(rows.div_ceil(chunk), |c| {
        let r0 = c * chunk;
        let nr = chunk.min(rows - r0);
        // SAFETY: y holds n_tokens x rows (checked above); chunk c writes
        // y[t * rows + r0 + i] for i < nr only, columns no other chunk writes.
        tiles.add(unsafe { w.run(r0, nr, s, out.offset(r0)) });
    });
    Ok(tiles.get())
}

/// Quantizes each token's row to Q8_0 (Q8_1 for Q4_1 weights, Q8_K for the
/// K-quants) and rewrites the blocks as the packed kernels for `ty` weights
/// read them.
fn prepare_acts(
    ty: GgmlType,
    x: &[f32],
    cols: usize,
    s: &mut PackedScratch,
) -> Result<(), KernelError> {
    let ks = crate::dot::kernels()?;
    let fmt = Fmt::of(ty).ok_or(KernelError::Unsupported { ty, op: "pack" })?;
    let n = x.len() / cols;
    if matches!(fmt, Fmt::Q2K | Fmt::Q3K | Fmt::Q4K | Fmt::Q5K | Fmt::Q6K) {
        let k = cols / quant::QK_K;
        s.q8_k.resize(n * k, BlockQ8_K::zeroed());
        s.act_k.resize(n * k, ActBlockK::zeroed());
        let (q8, act) = (&mut s.q8_k[..n * k], &mut s.act_k[..n * k]);
        let f = |(src, (q, a)): (&[f32], (&mut [BlockQ8_K], &mut [ActBlockK]))| {
            (ks.quantize_q8_k)(src, q);
            for (a, b) in a.iter_mut().zip(q.iter()) {
                *a = ActBlockK::new(b);
            }
        };
        if n < 4 {
            x.chunks_exact(cols)
                .zip(q8.chunks_exact_mut(k).zip(act.chunks_exact_mut(k)))
                .for_each(f);
        } else {
            crate::pool::for_each_chunk_pair_mut(q8, k, act, k, |i, q, a| {
                f((&x[i * cols..][..cols], (q, a)))
            });
        }
        s.minus_128 = false;
        return Ok(());
    }
    let k = cols / 32;
    // Every element is overwritten below: resize only grows the buffers, no clearing pass.
    s.act.resize(n * k, ActBlock::default());
    // Q4_1 and Q5_1 take Q8_1 activations (their minimums need sum(y)).
    if matches!(fmt, Fmt::Q4_1 | Fmt::Q5_1) {
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
            let minus_128 = std::sync::atomic::AtomicBool::new(false);
            crate::pool::for_each_chunk_mut(act, k, |i, a| {
                if quantize(&x[i * cols..][..cols], a) {
                    minus_128.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
            minus_128.into_inner()
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
    let k = cols / 32;
    let n = x.len() / cols;
    let (q8, act) = (&mut q8[..n * k], &mut act[..n * k]);
    if n < 4 {
        x.chunks_exact(cols)
            .zip(q8.chunks_exact_mut(k).zip(act.chunks_exact_mut(k)))
            .for_each(|(src, (q, a))| f(src, q, a));
    } else {
        crate::pool::for_each_chunk_pair_mut(q8, k, act, k, |i, q, a| {
            f(&x[i * cols..][..cols], q, a)
        });
    }
}

/// The offset a packed format's stored quants carry, which `ActBlock::c`
/// takes back off: Q4_0 nibbles are x + 8, Q5_0's five bits x + 16, Q8_0
/// bytes x + 128.
pub(crate) fn act_offset(ty: GgmlType) -> i32 {
    match Fmt::of(ty) {
        Some(Fmt::Q4_0) => 8,
        Some(Fmt::Q5_0) => 16,
        Some(Fmt::Q8_0) => 128,
        Some(Fmt::Q4_1 | Fmt::Q5_1 | Fmt::Q2K | Fmt::Q3K | Fmt::Q4K | Fmt::Q5K | Fmt::Q6K)
        | None => {
            panic!("{ty} weights take no Q8_0 activation blocks")
        }
    }
}

/// One Q8_0 activation block as the packed kernels for `ty` (Q4_0, Q5_0 or
/// Q8_0) weights read it.
pub(crate) fn act_block(ty: GgmlType, b: &BlockQ8_0) -> ActBlock {
    let mut a = ActBlock {
        d: quant::scale(b.d),
        ..ActBlock::default()
    };
    a.qs = bytemuck::cast(b.qs);
    // The weights' offset times sum(y).
    a.c = -act_offset(ty) * b.qs.iter().map(|&v| v as i32).sum::<i32>();
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
