//! aarch64 kernels. The quantized tiles are written once, as
//! `#[inline(always)]` bodies generic over [`IsaNeon`] (how a path forms
//! its byte dot products), with short `#[target_feature]` entry points per
//! path, the pattern of `attention/lanes.rs`: plain NEON ([`Plain`]:
//! `smull`/`smull2` + `sadalp`, i.e. `vmull_s8` + `vpadalq_s16`) and NEON
//! with the dot-product extension ([`Dotprod`]: `sdot`, through `asm!`
//! because `vdotq_s32` is not stable). The float tiles and the block
//! quantizer use base NEON only, so both paths' tables hold the same ones.
//! A table is only handed out by `super::kernels_for` after
//! `SimdPath::is_available` saw the features, and the safe GEMMs check
//! every length before the unchecked pointer code runs.
//!
//! Quantized GEMMs: per block, each (row, token) gets an exact i32 sum in
//! four lanes (the two paths split the 32 products over the lanes
//! differently), reduced to one exact i32 (`addp`, or `addv` for a single
//! row). From there the f32 operations are [`scalar`](super::scalar)'s, in
//! its order and without FMA (four rows side by side in one vector, one
//! lane per row): so both NEON paths give scalar's bits exactly, for every
//! tile shape.
//!
//! Float GEMMs: the x86 order (8 FMA lanes as two vectors, the same fixed
//! horizontal sum as `avx2.rs`'s `hsum8`, then the `n % 8` tail in order),
//! so they stay within the bound of [`super`] and agree with the x86 paths.
//! f16 is widened with `fcvtl`/`fcvtl2` through `asm!` (the f16 NEON types
//! are not stable); bf16 is a shift left by 16.

// The tiles index accumulators, activations and outputs by the same (row,
// token) pair; range loops keep that visible, as in the formulas.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;

use crate::dot::kq::KqFormat;
use crate::dot::{tiled_gemm, Kernels, TileFn, Tiles};
use crate::quant::float::{bf16_to_f32, f16_to_f32, f32_to_f16};
use crate::quant::float::{Bf16Bytes, F16Bytes, F32Bytes};
use crate::quant::{
    BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K,
    BlockQ6_K, BlockQ8_0, BlockQ8_1,
};

/// Rows of the quantized tiles; the f32 side keeps one row per lane.
const MR: usize = 4;

/// What the NEON paths differ in: the byte dot product, and the
/// `#[target_feature]` entry point their tiles are compiled in.
pub(super) trait IsaNeon {
    /// Four i32 lanes holding the exact partial sums of sum_e x[e] * y[e]
    /// over the 32 elements (x0|x1) . (y0|y1).
    ///
    /// # Safety
    /// The path's features are present (inlined into its entry point).
    unsafe fn dot32(x: [int8x16_t; 2], y: [int8x16_t; 2]) -> int32x4_t;
    /// `T`'s `R x C` tile, compiled with this path's features (its entry
    /// point).
    ///
    /// # Safety
    /// The path's features are present; [`TileNeon::tile`]'s pointers.
    unsafe fn tile<T: TileNeon, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    );
    /// The path's K-quant (and Q5) GEMM of format F (`kq.rs`).
    fn kq<F: KqFormat>(w: &[F], a: &[F::Act], k: usize, out: &mut [f32]) -> Tiles;
}

/// A quantized tile body: R weight rows (stride k blocks) x C tokens
/// (stride k), written to `out[j * ld + i]`.
pub(super) trait TileNeon {
    type W;
    type A;
    /// # Safety
    /// `I`'s features are present; `w` holds R rows of k blocks, `a` C
    /// tokens of k blocks, and `out + j * ld + i` (i < R, j < C) is writable.
    unsafe fn tile<I: IsaNeon, const R: usize, const C: usize>(
        w: *const Self::W,
        a: *const Self::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    );
}

/// Plain NEON (baseline on aarch64): `vmull_s8` + `vpadalq_s16`.
pub(super) struct Plain;

impl IsaNeon for Plain {
    #[inline(always)]
    unsafe fn dot32(x: [int8x16_t; 2], y: [int8x16_t; 2]) -> int32x4_t {
        // SAFETY: NEON, as the caller guarantees.
        unsafe {
            // i8 x i8 products fit i16; sadalp adds adjacent pairs into the
            // i32 lanes, so nothing is ever added in i16.
            let p0 = vmull_s8(vget_low_s8(x[0]), vget_low_s8(y[0]));
            let p1 = vmull_high_s8(x[0], y[0]);
            let p2 = vmull_s8(vget_low_s8(x[1]), vget_low_s8(y[1]));
            let p3 = vmull_high_s8(x[1], y[1]);
            let acc = vpaddlq_s16(p0);
            let acc = vpadalq_s16(acc, p1);
            let acc = vpadalq_s16(acc, p2);
            vpadalq_s16(acc, p3)
        }
    }
    #[target_feature(enable = "neon")]
    unsafe fn tile<T: TileNeon, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's features are Plain's; the caller's pointers.
        unsafe { T::tile::<Self, R, C>(w, a, k, out, ld) }
    }
    fn kq<F: KqFormat>(w: &[F], a: &[F::Act], k: usize, out: &mut [f32]) -> Tiles {
        crate::dot::kq::gemm_neon(w, a, k, out)
    }
}

/// NEON with FEAT_DotProd: `sdot`.
pub(super) struct Dotprod;

impl IsaNeon for Dotprod {
    #[inline(always)]
    unsafe fn dot32(x: [int8x16_t; 2], y: [int8x16_t; 2]) -> int32x4_t {
        // SAFETY: NEON, as the caller guarantees.
        let mut acc = unsafe { vdupq_n_s32(0) };
        // SAFETY: sdot needs FEAT_DotProd, which the entry point's target
        // features include and kernels_for checked at run time; registers
        // only. Lane l gets the products of bytes 4l..4l+3 of each pair,
        // exact in i32.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {x0:v}.16b, {y0:v}.16b",
                "sdot {acc:v}.4s, {x1:v}.16b, {y1:v}.16b",
                acc = inout(vreg) acc,
                x0 = in(vreg) x[0],
                y0 = in(vreg) y[0],
                x1 = in(vreg) x[1],
                y1 = in(vreg) y[1],
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn tile<T: TileNeon, const R: usize, const C: usize>(
        w: *const T::W,
        a: *const T::A,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's features are Dotprod's; the caller's pointers.
        unsafe { T::tile::<Self, R, C>(w, a, k, out, ld) }
    }
    fn kq<F: KqFormat>(w: &[F], a: &[F::Act], k: usize, out: &mut [f32]) -> Tiles {
        crate::dot::kq::gemm_neon_dotprod(w, a, k, out)
    }
}

/// The GEMM of tile `T` on path `I`, in 4 x 2 tiles and their edges.
/// Safe only through a `Kernels` table (features detected first).
fn gemm<T: TileNeon, I: IsaNeon>(w: &[T::W], a: &[T::A], k: usize, out: &mut [f32]) -> Tiles {
    let tiles = [
        I::tile::<T, MR, 2> as TileFn<T::W, T::A>,
        I::tile::<T, MR, 1>,
        I::tile::<T, 1, 2>,
        I::tile::<T, 1, 1>,
    ];
    // SAFETY: the tables that hold this GEMM are handed out after I's
    // features were detected.
    unsafe { tiled_gemm(w, a, k, out, (MR, 2), tiles) }
}

/// Four f16 values (bit patterns) as f32 with `fcvtl`: exact, the same
/// values as `f16_to_f32` (NaNs stay NaNs).
#[inline(always)]
unsafe fn f16x4(h: [u16; 4]) -> float32x4_t {
    // SAFETY: NEON, as the caller guarantees; h is four readable u16s.
    let v = unsafe { vld1_u16(h.as_ptr()) };
    let r: float32x4_t;
    // SAFETY: fcvtl is base AdvSIMD (ARMv8.0); registers only.
    unsafe {
        asm!(
            "fcvtl {r:v}.4s, {v:v}.4h",
            r = lateout(vreg) r,
            v = in(vreg) v,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    r
}

/// Eight f16 values as two f32x4 (`fcvtl` + `fcvtl2`).
#[inline(always)]
unsafe fn f16x8(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: base AdvSIMD conversions on registers only; `lo` is an `out`
    // (not `lateout`), so it cannot overwrite `h` before fcvtl2 reads it.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            lo = out(vreg) lo,
            hi = lateout(vreg) hi,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    (lo, hi)
}

/// The f32 values of up to four f16 scales, in an array.
#[inline(always)]
unsafe fn scales(h: [u16; 4]) -> [f32; 4] {
    let mut s = [0f32; 4];
    // SAFETY: NEON, as the caller guarantees; s holds four f32s.
    unsafe { vst1q_f32(s.as_mut_ptr(), f16x4(h)) };
    s
}

/// The exact sums of four lane vectors, one per lane, as f32 (|sum| <=
/// 32 * 128 * 128 < 2^24, so the conversion is exact).
#[inline(always)]
unsafe fn sums4(s: [int32x4_t; 4]) -> float32x4_t {
    // SAFETY: NEON, as the caller guarantees.
    unsafe { vcvtq_f32_s32(vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]))) }
}

/// The exact sum of one lane vector, as f32.
#[inline(always)]
unsafe fn sum1(s: int32x4_t) -> f32 {
    // SAFETY: NEON, as the caller guarantees.
    unsafe { vaddvq_s32(s) as f32 }
}

/// The 32 quants of a Q8 block.
#[inline(always)]
unsafe fn load_q8(qs: *const i8) -> [int8x16_t; 2] {
    // SAFETY: NEON and 32 readable bytes at qs, as the caller guarantees.
    unsafe { [vld1q_s8(qs), vld1q_s8(qs.add(16))] }
}

/// The 32 nibbles of a Q4 block in element order (low nibbles are elements
/// 0..15, high ones 16..31), minus `off`.
#[inline(always)]
unsafe fn nibbles(qs: *const u8, off: i8) -> [int8x16_t; 2] {
    // SAFETY: NEON and 16 readable bytes at qs, as the caller guarantees.
    unsafe {
        let q = vld1q_u8(qs);
        let lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F)));
        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
        let o = vdupq_n_s8(off);
        [vsubq_s8(lo, o), vsubq_s8(hi, o)]
    }
}

/// Writes a quantized tile's sums: `accv` when R == MR, else `acc1`.
///
/// # Safety
/// NEON; `out + j * ld + i` (i < R, j < C) is writable.
#[inline(always)]
unsafe fn store<const R: usize, const C: usize>(
    accv: [float32x4_t; C],
    acc1: [[f32; C]; R],
    out: *mut f32,
    ld: usize,
) {
    for j in 0..C {
        // SAFETY: as the caller guarantees.
        unsafe {
            if R == MR {
                vst1q_f32(out.add(j * ld), accv[j]);
            } else {
                for i in 0..R {
                    *out.add(j * ld + i) = acc1[i][j];
                }
            }
        }
    }
}

pub(super) struct Q4_0;
pub(super) struct Q8_0;
pub(super) struct Q4_1;

impl TileNeon for Q4_0 {
    type W = BlockQ4_0;
    type A = BlockQ8_0;
    /// Scalar's `sumf += sumi * dx * dy` per block.
    #[inline(always)]
    unsafe fn tile<I: IsaNeon, const R: usize, const C: usize>(
        w: *const BlockQ4_0,
        a: *const BlockQ8_0,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        const { assert!(R <= MR && C <= 4) };
        // SAFETY (whole body): I's features; b < k, i < R and j < C keep
        // every pointer inside what the caller vouches for.
        unsafe {
            // R == MR: token j's rows in the lanes of accv[j]; else acc1.
            let mut accv = [vdupq_n_f32(0.0); C];
            let mut acc1 = [[0f32; C]; R];
            for b in 0..k {
                let mut y = [[vdupq_n_s8(0); 2]; C];
                let mut dyh = [0u16; 4];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = load_q8(blk.qs.as_ptr());
                    dyh[j] = u16::from_le_bytes(blk.d);
                }
                let mut dxh = [0u16; 4];
                let mut s = [[vdupq_n_s32(0); C]; R];
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    dxh[i] = u16::from_le_bytes(blk.d);
                    let x = nibbles(blk.qs.as_ptr(), 8);
                    for j in 0..C {
                        s[i][j] = I::dot32(x, y[j]);
                    }
                }
                let dy = scales(dyh);
                if R == MR {
                    let dx = f16x4(dxh);
                    for j in 0..C {
                        let si = sums4([s[0][j], s[1][j], s[2][j], s[3][j]]);
                        let t = vmulq_n_f32(vmulq_f32(si, dx), dy[j]);
                        accv[j] = vaddq_f32(accv[j], t);
                    }
                } else {
                    let dx = scales(dxh);
                    for i in 0..R {
                        for j in 0..C {
                            acc1[i][j] += sum1(s[i][j]) * dx[i] * dy[j];
                        }
                    }
                }
            }
            store::<R, C>(accv, acc1, out, ld);
        }
    }
}

impl TileNeon for Q8_0 {
    type W = BlockQ8_0;
    type A = BlockQ8_0;
    /// Scalar's `sumf += sumi * (dx * dy)` per block.
    #[inline(always)]
    unsafe fn tile<I: IsaNeon, const R: usize, const C: usize>(
        w: *const BlockQ8_0,
        a: *const BlockQ8_0,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        const { assert!(R <= MR && C <= 4) };
        // SAFETY (whole body): as for Q4_0.
        unsafe {
            let mut accv = [vdupq_n_f32(0.0); C];
            let mut acc1 = [[0f32; C]; R];
            for b in 0..k {
                let mut y = [[vdupq_n_s8(0); 2]; C];
                let mut dyh = [0u16; 4];
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = load_q8(blk.qs.as_ptr());
                    dyh[j] = u16::from_le_bytes(blk.d);
                }
                let mut dxh = [0u16; 4];
                let mut s = [[vdupq_n_s32(0); C]; R];
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    dxh[i] = u16::from_le_bytes(blk.d);
                    let x = load_q8(blk.qs.as_ptr());
                    for j in 0..C {
                        s[i][j] = I::dot32(x, y[j]);
                    }
                }
                let dy = scales(dyh);
                if R == MR {
                    let dx = f16x4(dxh);
                    for j in 0..C {
                        let si = sums4([s[0][j], s[1][j], s[2][j], s[3][j]]);
                        let t = vmulq_f32(si, vmulq_n_f32(dx, dy[j]));
                        accv[j] = vaddq_f32(accv[j], t);
                    }
                } else {
                    let dx = scales(dxh);
                    for i in 0..R {
                        for j in 0..C {
                            acc1[i][j] += sum1(s[i][j]) * (dx[i] * dy[j]);
                        }
                    }
                }
            }
            store::<R, C>(accv, acc1, out, ld);
        }
    }
}

impl TileNeon for Q4_1 {
    type W = BlockQ4_1;
    type A = BlockQ8_1;
    /// Scalar's `sumf += (dx * dy) * sumi + m * s` per block.
    #[inline(always)]
    unsafe fn tile<I: IsaNeon, const R: usize, const C: usize>(
        w: *const BlockQ4_1,
        a: *const BlockQ8_1,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        const { assert!(R <= MR && C <= 4) };
        // SAFETY (whole body): as for Q4_0.
        unsafe {
            let mut accv = [vdupq_n_f32(0.0); C];
            let mut acc1 = [[0f32; C]; R];
            for b in 0..k {
                let mut y = [[vdupq_n_s8(0); 2]; C];
                let (mut dyh, mut syh) = ([0u16; 4], [0u16; 4]);
                for j in 0..C {
                    let blk = &*a.add(j * k + b);
                    y[j] = load_q8(blk.qs.as_ptr());
                    dyh[j] = u16::from_le_bytes(blk.d);
                    syh[j] = u16::from_le_bytes(blk.s);
                }
                let (mut dxh, mut mxh) = ([0u16; 4], [0u16; 4]);
                let mut s = [[vdupq_n_s32(0); C]; R];
                for i in 0..R {
                    let blk = &*w.add(i * k + b);
                    dxh[i] = u16::from_le_bytes(blk.d);
                    mxh[i] = u16::from_le_bytes(blk.m);
                    let x = nibbles(blk.qs.as_ptr(), 0);
                    for j in 0..C {
                        s[i][j] = I::dot32(x, y[j]);
                    }
                }
                let (dy, sy) = (scales(dyh), scales(syh));
                if R == MR {
                    let (dx, mx) = (f16x4(dxh), f16x4(mxh));
                    for j in 0..C {
                        let si = sums4([s[0][j], s[1][j], s[2][j], s[3][j]]);
                        let t = vmulq_f32(vmulq_n_f32(dx, dy[j]), si);
                        let t = vaddq_f32(t, vmulq_n_f32(mx, sy[j]));
                        accv[j] = vaddq_f32(accv[j], t);
                    }
                } else {
                    let (dx, mx) = (scales(dxh), scales(mxh));
                    for i in 0..R {
                        for j in 0..C {
                            acc1[i][j] += (dx[i] * dy[j]) * sum1(s[i][j]) + mx[i] * sy[j];
                        }
                    }
                }
            }
            store::<R, C>(accv, acc1, out, ld);
        }
    }
}

// ------------------------------------------------------------------ floats

/// Float element kinds for the float tiles.
const F16: u8 = 0;
const BF16: u8 = 1;
const F32: u8 = 2;

const fn esize(kind: u8) -> usize {
    if kind == F32 {
        4
    } else {
        2
    }
}

/// Eight elements of kind K from any byte address, as two f32x4.
#[inline(always)]
unsafe fn load8<const K: u8>(p: *const u8) -> [float32x4_t; 2] {
    // SAFETY: NEON and 8 readable elements at p, as the caller guarantees.
    unsafe {
        match K {
            F16 => {
                let (lo, hi) = f16x8(vreinterpretq_u16_u8(vld1q_u8(p)));
                [lo, hi]
            }
            BF16 => {
                let h = vreinterpretq_u16_u8(vld1q_u8(p));
                [
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
                ]
            }
            _ => [
                vreinterpretq_f32_u8(vld1q_u8(p)),
                vreinterpretq_f32_u8(vld1q_u8(p.add(16))),
            ],
        }
    }
}

#[inline(always)]
unsafe fn load1<const K: u8>(p: *const u8) -> f32 {
    // SAFETY: one readable element at p, as the caller guarantees.
    unsafe {
        match K {
            F16 => f16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
            BF16 => bf16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
            _ => f32::from_le_bytes(*(p as *const [u8; 4])),
        }
    }
}

/// `avx2.rs`'s `hsum8` on lanes 0..3 | 4..7: (l0+l4 + l2+l6) + (l1+l5 +
/// l3+l7), the same association.
#[inline(always)]
unsafe fn hsum8(v: [float32x4_t; 2]) -> f32 {
    // SAFETY: NEON, as the caller guarantees.
    unsafe {
        let r = vaddq_f32(v[1], v[0]);
        let h = vadd_f32(vget_low_f32(r), vget_high_f32(r));
        vget_lane_f32::<0>(h) + vget_lane_f32::<1>(h)
    }
}

/// R weight rows x C token rows of `n` float elements each (kinds WK and
/// AK, byte strides `n * esize`): 8-lane fma accumulators, fixed hsum, then
/// the `n % 8` tail added in order (as the x86 paths do). Base NEON only,
/// so one entry point serves both paths.
///
/// # Safety
/// The CPU has NEON; `w` holds R rows and `a` C rows of `n` elements; the
/// outputs `out + j * ld + i` are writable.
#[target_feature(enable = "neon")]
unsafe fn tile_f<W, A, const WK: u8, const AK: u8, const R: usize, const C: usize>(
    w: *const W,
    a: *const A,
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    let (w, a) = (w as *const u8, a as *const u8);
    let (ws, as_) = (esize(WK), esize(AK));
    // SAFETY (whole body): offsets stay inside the rows the caller vouches for.
    unsafe {
        let mut acc = [[[vdupq_n_f32(0.0); 2]; C]; R];
        let n8 = n / 8 * 8;
        for e in (0..n8).step_by(8) {
            let mut y = [[vdupq_n_f32(0.0); 2]; C];
            for j in 0..C {
                y[j] = load8::<AK>(a.add((j * n + e) * as_));
            }
            for i in 0..R {
                let x = load8::<WK>(w.add((i * n + e) * ws));
                for j in 0..C {
                    for h in 0..2 {
                        acc[i][j][h] = vfmaq_f32(acc[i][j][h], x[h], y[j][h]);
                    }
                }
            }
        }
        for i in 0..R {
            for j in 0..C {
                let mut s = hsum8(acc[i][j]);
                for e in n8..n {
                    s += load1::<WK>(w.add((i * n + e) * ws))
                        * load1::<AK>(a.add((j * n + e) * as_));
                }
                *out.add(j * ld + i) = s;
            }
        }
    }
}

/// The float GEMM of weights W (elements of kind WK) and activations A
/// (kind AK), in 4 x 2 tiles. Safe only through a `Kernels` table.
fn gemm_float<W, A, const WK: u8, const AK: u8>(
    w: &[W],
    a: &[A],
    k: usize,
    out: &mut [f32],
) -> Tiles {
    const { assert!(std::mem::size_of::<W>() == esize(WK)) };
    const { assert!(std::mem::size_of::<A>() == esize(AK)) };
    let tiles = [
        tile_f::<W, A, WK, AK, MR, 2> as TileFn<W, A>,
        tile_f::<W, A, WK, AK, MR, 1>,
        tile_f::<W, A, WK, AK, 1, 2>,
        tile_f::<W, A, WK, AK, 1, 1>,
    ];
    // SAFETY: the tables that hold this GEMM are handed out after NEON was
    // detected.
    unsafe { tiled_gemm(w, a, k, out, (MR, 2), tiles) }
}

// ------------------------------------------------------------------ quantizer

/// One Q8 block: writes the quants and returns `Some((d, sum))` exactly as
/// the reference quantizer computes them, or `None` for blocks with a NaN
/// or an infinite or overflowing scale, which the caller sends to the
/// reference code instead.
///
/// # Safety
/// NEON; `x` has 32 readable floats, `qs` 32 writable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q8_block(x: *const f32, qs: *mut i8) -> Option<(f32, i32)> {
    // SAFETY (whole body): the features and pointers the caller vouches for.
    unsafe {
        let mut v = [vdupq_n_f32(0.0); 8];
        for (i, vi) in v.iter_mut().enumerate() {
            *vi = vld1q_f32(x.add(4 * i));
        }
        let mut m = vdupq_n_f32(0.0);
        let mut ordered = vdupq_n_u32(u32::MAX);
        for vi in v {
            m = vmaxq_f32(m, vabsq_f32(vi));
            ordered = vandq_u32(ordered, vceqq_f32(vi, vi));
        }
        if vminvq_u32(ordered) == 0 {
            return None;
        }
        // No NaN: the max of the |x| is the reference's amax fold.
        let amax = vmaxvq_f32(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !amax.is_finite() || !id.is_finite() {
            return None;
        }
        // x * id, then fcvtas (round half away from zero, as f32::round),
        // then saturating narrows (as `as i8`).
        let q32 = |i: usize| vcvtaq_s32_f32(vmulq_n_f32(v[i], id));
        let mut sum = 0i32;
        for h in 0..2 {
            let a = vcombine_s16(vqmovn_s32(q32(4 * h)), vqmovn_s32(q32(4 * h + 1)));
            let b = vcombine_s16(vqmovn_s32(q32(4 * h + 2)), vqmovn_s32(q32(4 * h + 3)));
            let q = vcombine_s8(vqmovn_s16(a), vqmovn_s16(b));
            vst1q_s8(qs.add(16 * h), q);
            sum += vaddlvq_s8(q) as i32;
        }
        Some((d, sum))
    }
}

/// Safe only through a `Kernels` table (features detected first).
fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * 32, "q8_0 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        // SAFETY: features detected before the table is handed out; xs has
        // 32 floats and b.qs 32 bytes.
        match unsafe { q8_block(xs.as_ptr(), b.qs.as_mut_ptr()) } {
            Some((d, _)) => b.d = f32_to_f16(d).to_le_bytes(),
            None => *b = crate::quant::q8_0::quantize_block_q8_0(xs.try_into().unwrap()),
        }
    }
}

/// Safe only through a `Kernels` table (features detected first).
fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * 32, "q8_1 row length");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        // SAFETY: as in quantize_q8_0.
        match unsafe { q8_block(xs.as_ptr(), b.qs.as_mut_ptr()) } {
            Some((d, sum)) => {
                b.d = f32_to_f16(d).to_le_bytes();
                b.s = f32_to_f16(sum as f32 * d).to_le_bytes();
            }
            None => *b = crate::quant::q8_1::quantize_block_q8_1(xs.try_into().unwrap()),
        }
    }
}

/// A NEON path's table: its quantized GEMMs, and the float GEMMs and
/// quantizers both paths share.
const fn table<I: IsaNeon>(path: crate::simd::SimdPath) -> Kernels {
    Kernels {
        path,
        tile: (MR, 2),
        q4_0: gemm::<Q4_0, I>,
        q4_1: gemm::<Q4_1, I>,
        q8_0: gemm::<Q8_0, I>,
        q5_0: I::kq::<BlockQ5_0>,
        q5_1: I::kq::<BlockQ5_1>,
        q2_k: I::kq::<BlockQ2_K>,
        q3_k: I::kq::<BlockQ3_K>,
        q4_k: I::kq::<BlockQ4_K>,
        q5_k: I::kq::<BlockQ5_K>,
        q6_k: I::kq::<BlockQ6_K>,
        f16: gemm_float::<F16Bytes, F16Bytes, F16, F16>,
        bf16: gemm_float::<Bf16Bytes, Bf16Bytes, BF16, BF16>,
        f32_le: gemm_float::<F32Bytes, f32, F32, F32>,
        f16_f32: gemm_float::<F16Bytes, f32, F16, F32>,
        bf16_f32: gemm_float::<Bf16Bytes, f32, BF16, F32>,
        f32: gemm_float::<f32, f32, F32, F32>,
        quantize_q8_0,
        quantize_q8_1,
        quantize_q8_k: crate::quant::quantize_row_q8_k,
    }
}

/// Plain NEON's table.
pub(super) mod plain {
    pub(in crate::dot) static KERNELS: super::Kernels =
        super::table::<super::Plain>(crate::simd::SimdPath::Neon);
}

/// The NEON + dot-product table.
pub(super) mod dotprod {
    pub(in crate::dot) static KERNELS: super::Kernels =
        super::table::<super::Dotprod>(crate::simd::SimdPath::NeonDotprod);
}
