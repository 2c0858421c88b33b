//! Vector dot products and the matmul micro-kernels, one implementation per
//! instruction set behind [`Kernels`], a table of safe function pointers.
//!
//! - [`scalar`]: the portable reference twins every SIMD path is tested
//!   against (ggml's generic order of operations).
//! - `avx2` / `avxvnni`: 256-bit x86 tiles, one generic body per format
//!   over the path's byte dot (`vpmaddubsw`+`vpmaddwd`, or `vpdpbusd`).
//! - `avx512` / `avx512vnni`: 512-bit x86 tiles, likewise; each zmm holds
//!   two (row, token) pairs, 256 bits each.
//! - `neon` (`neon::plain` / `neon::dotprod`): aarch64 tiles, one generic
//!   body per format over the path's byte dot (`smull`+`sadalp`, or
//!   `sdot`), 4 x 2 tiles.
//!
//! Every x86 path computes each output the same way: per block an exact
//! i32 sum in 8 lanes (lane l = sum of products of elements 4l..4l+3), one
//! `fma(dx*dy, lanes, acc)` per block, then a fixed horizontal sum. So the
//! x86 paths agree with each other bit for bit, and the integer sums agree
//! with [`scalar`] exactly; only the f32 accumulation order differs from
//! scalar (bound in the tests: (nb + 8) * 2^-24 * sum |dx dy sumi| per
//! output). A decode dot and any tile of a GEMM give the same bits for the
//! same (row, token), whatever the tile shape.
//!
//! The aarch64 paths reduce each block's integer lanes to one exact i32 sum
//! per (row, token) and then do [`scalar`]'s f32 operations in its order
//! (no FMA), so their quantized GEMMs give scalar's bits exactly, whatever
//! the tile shape. Their float GEMMs use the x86 order above (8 fma lanes,
//! the same horizontal sum, then the tail).
//!
//! Q8 activations must be in [-127, 127] (what every ggml quantizer
//! produces); the AVX2/AVX-512BW sign trick is exact only there (the NEON
//! integer sums are exact for every byte).

pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
// The AVX2 block quantizer, for the packed matmul's activations.
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::q8_block as q8_block_avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512vnni;
#[cfg(target_arch = "x86_64")]
mod avxvnni;
#[cfg(target_arch = "x86_64")]
pub(crate) mod float_wide;
#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
mod neon;

#[cfg(test)]
mod kq_tests;
#[cfg(test)]
mod tests;

mod kq;

use crate::quant::float::{Bf16Bytes, F16Bytes, F32Bytes};
use crate::quant::{
    BlockFormat, BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1,
    BlockQ5_K, BlockQ6_K, BlockQ8_0, BlockQ8_1, BlockQ8_K,
};
use crate::simd::{simd_path, SimdPath};
use crate::KernelError;

/// A weight block format's dot product: the activation format (ggml's
/// `vec_dot_type`), the scalar reference (ggml's generic order, the scalar
/// path's kernel and the oracle of every SIMD kernel), and which field of a
/// path's [`Kernels`] runs it. Implemented next to each block struct.
pub trait DotFormat: BlockFormat {
    type Act: ActFormat;
    /// `x . y` over whole blocks, in ggml's generic order.
    fn vec_dot(x: &[Self], y: &[Self::Act]) -> f32;
    /// This format's GEMM in the table `ks`.
    fn gemm(ks: &Kernels) -> GemmFn<Self, Self::Act>;
}

/// An activation format: what its quantizer is in a path's table (the same
/// bytes as the reference quantizer on every path).
pub trait ActFormat: BlockFormat {
    fn quantizer(ks: &Kernels) -> fn(&[f32], &mut [Self]);
}

impl ActFormat for BlockQ8_0 {
    fn quantizer(ks: &Kernels) -> fn(&[f32], &mut [Self]) {
        ks.quantize_q8_0
    }
}

impl ActFormat for BlockQ8_1 {
    fn quantizer(ks: &Kernels) -> fn(&[f32], &mut [Self]) {
        ks.quantize_q8_1
    }
}

impl ActFormat for BlockQ8_K {
    fn quantizer(ks: &Kernels) -> fn(&[f32], &mut [Self]) {
        ks.quantize_q8_k
    }
}

impl DotFormat for BlockQ4_0 {
    type Act = BlockQ8_0;
    fn vec_dot(x: &[Self], y: &[BlockQ8_0]) -> f32 {
        scalar::vec_dot_q4_0_q8_0(x, y)
    }
    fn gemm(ks: &Kernels) -> GemmFn<Self, BlockQ8_0> {
        ks.q4_0
    }
}

impl DotFormat for BlockQ4_1 {
    type Act = BlockQ8_1;
    fn vec_dot(x: &[Self], y: &[BlockQ8_1]) -> f32 {
        scalar::vec_dot_q4_1_q8_1(x, y)
    }
    fn gemm(ks: &Kernels) -> GemmFn<Self, BlockQ8_1> {
        ks.q4_1
    }
}

impl DotFormat for BlockQ8_0 {
    type Act = BlockQ8_0;
    fn vec_dot(x: &[Self], y: &[BlockQ8_0]) -> f32 {
        scalar::vec_dot_q8_0_q8_0(x, y)
    }
    fn gemm(ks: &Kernels) -> GemmFn<Self, BlockQ8_0> {
        ks.q8_0
    }
}

/// How many micro-kernel calls one GEMM call made: `full` ones had the
/// path's whole tile shape (several rows x several tokens), `edge` ones a
/// smaller shape at the borders (or a decode's rows x 1 token).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tiles {
    pub full: usize,
    pub edge: usize,
}

impl std::ops::Add for Tiles {
    type Output = Tiles;
    fn add(self, o: Tiles) -> Tiles {
        Tiles {
            full: self.full + o.full,
            edge: self.edge + o.edge,
        }
    }
}

/// [`Tiles`] summed from several threads.
#[derive(Default)]
pub(crate) struct TileCount {
    full: std::sync::atomic::AtomicUsize,
    edge: std::sync::atomic::AtomicUsize,
}

impl TileCount {
    pub(crate) fn add(&self, t: Tiles) {
        use std::sync::atomic::Ordering::Relaxed;
        self.full.fetch_add(t.full, Relaxed);
        self.edge.fetch_add(t.edge, Relaxed);
    }

    pub(crate) fn get(&self) -> Tiles {
        use std::sync::atomic::Ordering::Relaxed;
        Tiles {
            full: self.full.load(Relaxed),
            edge: self.edge.load(Relaxed),
        }
    }
}

impl std::iter::Sum for Tiles {
    fn sum<I: Iterator<Item = Tiles>>(it: I) -> Tiles {
        it.fold(Tiles::default(), |a, b| a + b)
    }
}

/// `gemm(w, a, k, out)`: w holds `rows` rows of `k` units, a holds
/// `n_tokens` rows of `k` units, and `out[t * rows + r] = dot(w_r, a_t)`.
/// Panics unless `k > 0`, both lengths are multiples of k and
/// `out.len() == rows * n_tokens`.
pub type GemmFn<W, A> = fn(&[W], &[A], usize, &mut [f32]) -> Tiles;

/// One path's kernels. Only [`kernels_for`] hands these out, after checking
/// the CPU has the path's features, which is what makes the function
/// pointers safe to call.
#[non_exhaustive]
pub struct Kernels {
    pub path: SimdPath,
    /// Rows x tokens of the quantized GEMM's full tile ((1, 1) for scalar).
    pub tile: (usize, usize),
    pub q4_0: GemmFn<BlockQ4_0, BlockQ8_0>,
    pub q4_1: GemmFn<BlockQ4_1, BlockQ8_1>,
    pub q8_0: GemmFn<BlockQ8_0, BlockQ8_0>,
    pub q5_0: GemmFn<BlockQ5_0, BlockQ8_0>,
    pub q5_1: GemmFn<BlockQ5_1, BlockQ8_1>,
    pub q2_k: GemmFn<BlockQ2_K, BlockQ8_K>,
    pub q3_k: GemmFn<BlockQ3_K, BlockQ8_K>,
    pub q4_k: GemmFn<BlockQ4_K, BlockQ8_K>,
    pub q5_k: GemmFn<BlockQ5_K, BlockQ8_K>,
    pub q6_k: GemmFn<BlockQ6_K, BlockQ8_K>,
    /// f16 weights . f16 activations (ggml's F16 vec_dot_type).
    pub f16: GemmFn<F16Bytes, F16Bytes>,
    pub bf16: GemmFn<Bf16Bytes, Bf16Bytes>,
    pub f32_le: GemmFn<F32Bytes, f32>,
    pub f16_f32: GemmFn<F16Bytes, f32>,
    pub bf16_f32: GemmFn<Bf16Bytes, f32>,
    pub f32: GemmFn<f32, f32>,
    /// Same bytes as [`crate::quant::quantize_row_q8_0`] for every input.
    pub quantize_q8_0: fn(&[f32], &mut [BlockQ8_0]),
    /// Same bytes as [`crate::quant::quantize_row_q8_1`] for every input.
    pub quantize_q8_1: fn(&[f32], &mut [BlockQ8_1]),
    /// Same bytes as [`crate::quant::quantize_row_q8_k`] for every input.
    pub quantize_q8_k: fn(&[f32], &mut [BlockQ8_K]),
}

/// The kernels of `path`, or an error when this CPU or build lacks it.
pub fn kernels_for(path: SimdPath) -> Result<&'static Kernels, KernelError> {
    if !path.is_available() {
        return SimdPath::resolve(Some(path.name())).map(|_| &SCALAR);
    }
    Ok(match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => &avx2::KERNELS,
        #[cfg(target_arch = "x86_64")]
        SimdPath::AvxVnni => &avxvnni::KERNELS,
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => &avx512::KERNELS,
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512Vnni => &avx512vnni::KERNELS,
        #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
        SimdPath::Neon => &neon::plain::KERNELS,
        #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
        SimdPath::NeonDotprod => &neon::dotprod::KERNELS,
        _ => &SCALAR,
    })
}

/// The kernels of the process-wide [`simd_path`].
pub fn kernels() -> Result<&'static Kernels, KernelError> {
    kernels_for(simd_path()?)
}

/// Checks a [`GemmFn`]'s arguments; returns `(rows, n_tokens)`.
#[inline]
pub(crate) fn gemm_shape(wl: usize, al: usize, k: usize, out: usize) -> (usize, usize) {
    assert!(k > 0, "gemm: k must be positive");
    assert!(
        wl.is_multiple_of(k) && al.is_multiple_of(k),
        "gemm: lengths not multiples of k"
    );
    let (rows, n) = (wl / k, al / k);
    assert_eq!(out, rows * n, "gemm: output length");
    (rows, n)
}

/// Bytes of weights a row block should span so it stays in L2 while every
/// token tile passes over it.
const ROW_BLOCK_BYTES: usize = 256 << 10;

/// Walks a `rows x n_tokens` output in tiles, calling `f(r0, t0, mr, nr)`
/// with `(mr, nr)` one of `(MR, NR)` (full), `(1, NR)`, `(MR, 1)`, `(1, 1)`.
/// Rows go in blocks of about [`ROW_BLOCK_BYTES`] of weights; inside a
/// block, tokens are the outer loop, so one token tile's activations stay
/// in L1 while the block's rows pass.
pub(crate) fn for_tiles(
    rows: usize,
    n_tokens: usize,
    row_bytes: usize,
    (mr, nr): (usize, usize),
    mut f: impl FnMut(usize, usize, usize, usize),
) -> Tiles {
    let mut tiles = Tiles::default();
    let rb = (ROW_BLOCK_BYTES / row_bytes.max(1)).max(mr).div_ceil(mr) * mr;
    let t_full = n_tokens / nr * nr;
    for b0 in (0..rows).step_by(rb) {
        let b1 = (b0 + rb).min(rows);
        let r_full = b0 + (b1 - b0) / mr * mr;
        for t0 in (0..t_full).step_by(nr) {
            for r0 in (b0..r_full).step_by(mr) {
                f(r0, t0, mr, nr);
                tiles.full += 1;
            }
            for r in r_full..b1 {
                f(r, t0, 1, nr);
                tiles.edge += 1;
            }
        }
        for t in t_full..n_tokens {
            for r0 in (b0..r_full).step_by(mr) {
                f(r0, t, mr, 1);
                tiles.edge += 1;
            }
            for r in r_full..b1 {
                f(r, t, 1, 1);
                tiles.edge += 1;
            }
        }
    }
    tiles
}

/// A micro-kernel: R weight rows (`w`, rows k units apart) x C tokens (`a`,
/// k units apart), output (row i, token j) at `out + j * ld + i`, for the R
/// and C it was instantiated with.
pub(crate) type TileFn<W, A> = unsafe fn(*const W, *const A, usize, *mut f32, usize);

/// A GEMM over one kernel's tiles: `tiles` are its `(mr, nr)`, `(mr, 1)`,
/// `(1, nr)` and `(1, 1)` instances, walked by [`for_tiles`].
///
/// # Safety
/// The CPU has the tiles' features (a [`Kernels`] table that holds the
/// caller was handed out after detection). The lengths are checked here.
#[inline(always)]
pub(crate) unsafe fn tiled_gemm<W, A>(
    w: &[W],
    a: &[A],
    k: usize,
    out: &mut [f32],
    (mr, nr): (usize, usize),
    [full, rows_only, tokens_only, one]: [TileFn<W, A>; 4],
) -> Tiles {
    let (rows, n) = gemm_shape(w.len(), a.len(), k, out.len());
    let (wp, ap, op) = (w.as_ptr(), a.as_ptr(), out.as_mut_ptr());
    for_tiles(
        rows,
        n,
        k * std::mem::size_of::<W>(),
        (mr, nr),
        |r0, t0, r, c| {
            let tile = match (r == mr, c == nr) {
                (true, true) => full,
                (true, false) => rows_only,
                (false, true) => tokens_only,
                (false, false) => one,
            };
            // SAFETY: the features, as the caller guarantees; for_tiles keeps
            // r0 + r <= rows and t0 + c <= n, so every block the tile reads and
            // every output it writes is inside w, a and out, whose lengths
            // gemm_shape checked.
            unsafe {
                let (w, a, o) = (wp.add(r0 * k), ap.add(t0 * k), op.add(t0 * rows + r0));
                tile(w, a, k, o, rows)
            }
        },
    )
}

/// One output per (row, token) with a plain dot: the scalar path's GEMM.
fn each_dot<W, A>(
    w: &[W],
    a: &[A],
    k: usize,
    out: &mut [f32],
    dot: impl Fn(&[W], &[A]) -> f32,
) -> Tiles {
    let (rows, n) = gemm_shape(w.len(), a.len(), k, out.len());
    // Eight tokens per pass so a weight row is reused while hot in L1.
    for t0 in (0..n).step_by(8) {
        for (r, wr) in w.chunks_exact(k).enumerate() {
            for t in t0..(t0 + 8).min(n) {
                out[t * rows + r] = dot(wr, &a[t * k..][..k]);
            }
        }
    }
    Tiles::default()
}

/// The scalar GEMM of a block format: its reference dot per output.
fn scalar_gemm<F: DotFormat>(w: &[F], a: &[F::Act], k: usize, out: &mut [f32]) -> Tiles {
    each_dot(w, a, k, out, F::vec_dot)
}

static SCALAR: Kernels = Kernels {
    path: SimdPath::Scalar,
    tile: (1, 1),
    q4_0: scalar_gemm::<BlockQ4_0>,
    q4_1: scalar_gemm::<BlockQ4_1>,
    q8_0: scalar_gemm::<BlockQ8_0>,
    q5_0: scalar_gemm::<BlockQ5_0>,
    q5_1: scalar_gemm::<BlockQ5_1>,
    q2_k: scalar_gemm::<BlockQ2_K>,
    q3_k: scalar_gemm::<BlockQ3_K>,
    q4_k: scalar_gemm::<BlockQ4_K>,
    q5_k: scalar_gemm::<BlockQ5_K>,
    q6_k: scalar_gemm::<BlockQ6_K>,
    f16: |w, a, k, out| each_dot(w, a, k, out, scalar::vec_dot_f16),
    bf16: |w, a, k, out| each_dot(w, a, k, out, scalar::vec_dot_bf16),
    f32_le: |w, a, k, out| each_dot(w, a, k, out, scalar::vec_dot_f32_le),
    f16_f32: |w, a, k, out| each_dot(w, a, k, out, scalar::vec_dot_f16_f32),
    bf16_f32: |w, a, k, out| each_dot(w, a, k, out, scalar::vec_dot_bf16_f32),
    f32: |w, a, k, out| each_dot(w, a, k, out, scalar::vec_dot_f32),
    quantize_q8_0: crate::quant::quantize_row_q8_0,
    quantize_q8_1: crate::quant::quantize_row_q8_1,
    quantize_q8_k: crate::quant::quantize_row_q8_k,
};

/// The process-wide kernels; panics with the message when `AIRLOCK_SIMD`
/// names a path this CPU lacks (these functions have no error channel;
/// [`crate::matmul`] returns the error instead).
fn active() -> &'static Kernels {
    kernels().unwrap_or_else(|e| panic!("{e}"))
}

#[inline]
fn one<W, A>(f: GemmFn<W, A>, x: &[W], y: &[A]) -> f32 {
    assert_eq!(x.len(), y.len(), "vector lengths");
    if x.is_empty() {
        return 0.0;
    }
    let mut o = [0f32];
    f(x, y, x.len(), &mut o);
    o[0]
}

/// Q4_0 weights . Q8_0 activations, `x.len() == y.len()` blocks.
#[inline]
pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    one(active().q4_0, x, y)
}

/// Q4_1 weights . Q8_1 activations.
#[inline]
pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    one(active().q4_1, x, y)
}

/// Q8_0 weights . Q8_0 activations.
#[inline]
pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    one(active().q8_0, x, y)
}

#[inline]
pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    one(active().f32, x, y)
}

/// Stored (little-endian, any alignment) f32 weights . f32 activations.
#[inline]
pub fn vec_dot_f32_le(x: &[F32Bytes], y: &[f32]) -> f32 {
    one(active().f32_le, x, y)
}

/// f16 . f16, ggml's F16 weight path (activations converted to f16).
#[inline]
pub fn vec_dot_f16(x: &[F16Bytes], y: &[F16Bytes]) -> f32 {
    one(active().f16, x, y)
}

#[inline]
pub fn vec_dot_f16_f32(x: &[F16Bytes], y: &[f32]) -> f32 {
    one(active().f16_f32, x, y)
}

/// bf16 . bf16, ggml's BF16 weight path (activations converted to bf16).
#[inline]
pub fn vec_dot_bf16(x: &[Bf16Bytes], y: &[Bf16Bytes]) -> f32 {
    one(active().bf16, x, y)
}

#[inline]
pub fn vec_dot_bf16_f32(x: &[Bf16Bytes], y: &[f32]) -> f32 {
    one(active().bf16_f32, x, y)
}

/// f32 . f32 accumulated in f64 (the exact path's dot): the scalar twin's body on every path,
/// compiled for AVX2 where the CPU has it, which runs the same additions in the same order
/// (the twin's docs) about four times as fast as the baseline's 2-wide SSE2.
#[inline]
pub fn vec_dot_f32_f64acc(x: &[f32], y: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { f32_f64acc_avx2(x, y) };
    }
    scalar::vec_dot_f32_f64acc(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn f32_f64acc_avx2(x: &[f32], y: &[f32]) -> f64 {
    scalar::vec_dot_f32_f64acc(x, y)
}
