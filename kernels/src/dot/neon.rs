//! aarch64 kernels, written once as a macro and instantiated for plain NEON
//! ([`plain`]: `smull`/`smull2` + `sadalp`, i.e. `vmull_s8` + `vpadalq_s16`)
//! and NEON with the dot-product extension ([`dotprod`]: `sdot`, through
//! `asm!` because `vdotq_s32` is not stable). Every function is
//! `#[target_feature]`; a module's `KERNELS` table is only handed out by
//! `super::kernels_for` after `SimdPath::is_available` saw the features,
//! and the safe wrappers in it check every length before the unchecked
//! pointer code runs.
//!
//! Quantized GEMMs: per block, each (row, token) gets an exact i32 sum in
//! four lanes (the two instantiations split the 32 products over the lanes
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

/// `fn $name(w, a, k, out) -> Tiles`: a safe [`GemmFn`](super::GemmFn)
/// over `$tile::<R, C>` in `$mr x $nr` tiles and their edges.
macro_rules! neon_quant_gemm {
    ($name:ident, $tile:ident, $W:ty, $A:ty, $mr:literal x $nr:literal) => {
        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn $name(w: &[$W], a: &[$A], k: usize, out: &mut [f32]) -> Tiles {
            let (rows, n) = gemm_shape(w.len(), a.len(), k, out.len());
            let (wp, ap, op) = (w.as_ptr(), a.as_ptr(), out.as_mut_ptr());
            let rb = k * std::mem::size_of::<$W>();
            for_tiles(rows, n, rb, ($mr, $nr), |r0, t0, mr, nr| {
                // SAFETY: the CPU has this module's features (the only
                // way to reach this function is the KERNELS table, which
                // kernels_for hands out after detection), and for_tiles
                // keeps r0 + mr <= rows and t0 + nr <= n, so every block
                // the tile reads and every output it writes is inside w,
                // a and out, whose lengths gemm_shape checked.
                unsafe {
                    let (w, a) = (wp.add(r0 * k), ap.add(t0 * k));
                    let o = op.add(t0 * rows + r0);
                    match (mr, nr) {
                        ($mr, $nr) => $tile::<$mr, $nr>(w, a, k, o, rows),
                        ($mr, 1) => $tile::<$mr, 1>(w, a, k, o, rows),
                        (1, $nr) => $tile::<1, $nr>(w, a, k, o, rows),
                        _ => $tile::<1, 1>(w, a, k, o, rows),
                    }
                }
            })
        }
    };
}

/// The float twin of `neon_quant_gemm!`, over `tile_f::<$wk, $ak, R, C>`.
macro_rules! neon_float_gemm {
    ($name:ident, $W:ty, $A:ty, $wk:expr, $ak:expr, $mr:literal x $nr:literal) => {
        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn $name(w: &[$W], a: &[$A], k: usize, out: &mut [f32]) -> Tiles {
            let (rows, n) = gemm_shape(w.len(), a.len(), k, out.len());
            let (wp, ap) = (w.as_ptr() as *const u8, a.as_ptr() as *const u8);
            let op = out.as_mut_ptr();
            const WS: usize = std::mem::size_of::<$W>();
            const AS: usize = std::mem::size_of::<$A>();
            const _: () = assert!(WS == esize($wk) && AS == esize($ak));
            for_tiles(rows, n, k * WS, ($mr, $nr), |r0, t0, mr, nr| {
                // SAFETY: as for the quantized GEMMs: features detected
                // before KERNELS is handed out, tiles in bounds of the
                // lengths gemm_shape checked.
                unsafe {
                    let (w, a) = (wp.add(r0 * k * WS), ap.add(t0 * k * AS));
                    let o = op.add(t0 * rows + r0);
                    match (mr, nr) {
                        ($mr, $nr) => tile_f::<{ $wk }, { $ak }, $mr, $nr>(w, a, k, o, rows),
                        ($mr, 1) => tile_f::<{ $wk }, { $ak }, $mr, 1>(w, a, k, o, rows),
                        (1, $nr) => tile_f::<{ $wk }, { $ak }, 1, $nr>(w, a, k, o, rows),
                        _ => tile_f::<{ $wk }, { $ak }, 1, 1>(w, a, k, o, rows),
                    }
                }
            })
        }
    };
}

macro_rules! neon_kernels {
    (features = $feat:literal, path = $path:expr, dotprod = $dotprod:literal, kq = $kq:ident) => {
        use std::arch::aarch64::*;
        use std::arch::asm;

        use crate::dot::{for_tiles, gemm_shape, Kernels, Tiles};
        use crate::quant::float::{bf16_to_f32, f16_to_f32, f32_to_f16};
        use crate::quant::float::{Bf16Bytes, F16Bytes, F32Bytes};
        use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

        /// Rows of the quantized tiles; the f32 side keeps one row per lane.
        const MR: usize = 4;

        /// Four f16 values (bit patterns) as f32 with `fcvtl`: exact, the
        /// same values as `f16_to_f32` (NaNs stay NaNs).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn f16x4(h: [u16; 4]) -> float32x4_t {
            let v = vld1_u16(h.as_ptr());
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
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn f16x8(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
            let (lo, hi): (float32x4_t, float32x4_t);
            // SAFETY: base AdvSIMD conversions on registers only; `lo` is
            // an `out` (not `lateout`), so it cannot overwrite `h` before
            // fcvtl2 reads it.
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
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn scales(h: [u16; 4]) -> [f32; 4] {
            let mut s = [0f32; 4];
            vst1q_f32(s.as_mut_ptr(), f16x4(h));
            s
        }

        /// Four i32 lanes holding the exact partial sums of
        /// sum_e x[e] * y[e] over the 32 elements (x0|x1) . (y0|y1).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot32(x: [int8x16_t; 2], y: [int8x16_t; 2]) -> int32x4_t {
            if $dotprod {
                let mut acc = vdupq_n_s32(0);
                // SAFETY: sdot needs FEAT_DotProd, which this module's
                // target features include and kernels_for checked at run
                // time; registers only. Lane l gets the products of bytes
                // 4l..4l+3 of each pair, exact in i32.
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
            } else {
                // i8 x i8 products fit i16; sadalp adds adjacent pairs
                // into the i32 lanes, so nothing is ever added in i16.
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

        /// The exact sums of four lane vectors, one per lane, as f32 (|sum|
        /// <= 32 * 128 * 128 < 2^24, so the conversion is exact).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn sums4(s: [int32x4_t; 4]) -> float32x4_t {
            vcvtq_f32_s32(vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3])))
        }

        /// The exact sum of one lane vector, as f32.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn sum1(s: int32x4_t) -> f32 {
            vaddvq_s32(s) as f32
        }

        /// The 32 quants of a Q8 block.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load_q8(qs: *const i8) -> [int8x16_t; 2] {
            [vld1q_s8(qs), vld1q_s8(qs.add(16))]
        }

        /// The 32 nibbles of a Q4 block in element order (low nibbles are
        /// elements 0..15, high ones 16..31), minus `off`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn nibbles(qs: *const u8, off: i8) -> [int8x16_t; 2] {
            let q = vld1q_u8(qs);
            let lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F)));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
            let o = vdupq_n_s8(off);
            [vsubq_s8(lo, o), vsubq_s8(hi, o)]
        }

        /// R weight rows (stride k blocks) x C tokens (stride k), written to
        /// `out[j * ld + i]`: scalar's `sumf += sumi * dx * dy` per block.
        #[target_feature(enable = $feat)]
        unsafe fn tile_q4_0<const R: usize, const C: usize>(
            w: *const BlockQ4_0,
            a: *const BlockQ8_0,
            k: usize,
            out: *mut f32,
            ld: usize,
        ) {
            const { assert!(R <= MR && C <= 4) };
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
                        s[i][j] = dot32(x, y[j]);
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

        /// Scalar's `sumf += sumi * (dx * dy)` per block.
        #[target_feature(enable = $feat)]
        unsafe fn tile_q8_0<const R: usize, const C: usize>(
            w: *const BlockQ8_0,
            a: *const BlockQ8_0,
            k: usize,
            out: *mut f32,
            ld: usize,
        ) {
            const { assert!(R <= MR && C <= 4) };
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
                        s[i][j] = dot32(x, y[j]);
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

        /// Scalar's `sumf += (dx * dy) * sumi + m * s` per block.
        #[target_feature(enable = $feat)]
        unsafe fn tile_q4_1<const R: usize, const C: usize>(
            w: *const BlockQ4_1,
            a: *const BlockQ8_1,
            k: usize,
            out: *mut f32,
            ld: usize,
        ) {
            const { assert!(R <= MR && C <= 4) };
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
                        s[i][j] = dot32(x, y[j]);
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

        /// Writes a quantized tile's sums: `accv` when R == MR, else `acc1`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn store<const R: usize, const C: usize>(
            accv: [float32x4_t; C],
            acc1: [[f32; C]; R],
            out: *mut f32,
            ld: usize,
        ) {
            for j in 0..C {
                if R == MR {
                    vst1q_f32(out.add(j * ld), accv[j]);
                } else {
                    for i in 0..R {
                        *out.add(j * ld + i) = acc1[i][j];
                    }
                }
            }
        }

        neon_quant_gemm!(gemm_q4_0, tile_q4_0, BlockQ4_0, BlockQ8_0, 4 x 2);
        neon_quant_gemm!(gemm_q8_0, tile_q8_0, BlockQ8_0, BlockQ8_0, 4 x 2);
        neon_quant_gemm!(gemm_q4_1, tile_q4_1, BlockQ4_1, BlockQ8_1, 4 x 2);

        // Float element kinds for the float tiles.
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
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load8<const K: u8>(p: *const u8) -> [float32x4_t; 2] {
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

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load1<const K: u8>(p: *const u8) -> f32 {
            match K {
                F16 => f16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
                BF16 => bf16_to_f32(u16::from_le_bytes(*(p as *const [u8; 2]))),
                _ => f32::from_le_bytes(*(p as *const [u8; 4])),
            }
        }

        /// `avx2.rs`'s `hsum8` on lanes 0..3 | 4..7: (l0+l4 + l2+l6) +
        /// (l1+l5 + l3+l7), the same association.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn hsum8(v: [float32x4_t; 2]) -> f32 {
            let r = vaddq_f32(v[1], v[0]);
            let h = vadd_f32(vget_low_f32(r), vget_high_f32(r));
            vget_lane_f32::<0>(h) + vget_lane_f32::<1>(h)
        }

        /// R weight rows x C token rows of `n` float elements each (byte
        /// strides `n * esize`): 8-lane fma accumulators, fixed hsum, then
        /// the `n % 8` tail added in order (as the x86 paths do).
        #[target_feature(enable = $feat)]
        unsafe fn tile_f<const WK: u8, const AK: u8, const R: usize, const C: usize>(
            w: *const u8,
            a: *const u8,
            n: usize,
            out: *mut f32,
            ld: usize,
        ) {
            let (ws, as_) = (esize(WK), esize(AK));
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

        neon_float_gemm!(gemm_f16, F16Bytes, F16Bytes, F16, F16, 4 x 2);
        neon_float_gemm!(gemm_bf16, Bf16Bytes, Bf16Bytes, BF16, BF16, 4 x 2);
        neon_float_gemm!(gemm_f32_le, F32Bytes, f32, F32, F32, 4 x 2);
        neon_float_gemm!(gemm_f16_f32, F16Bytes, f32, F16, F32, 4 x 2);
        neon_float_gemm!(gemm_bf16_f32, Bf16Bytes, f32, BF16, F32, 4 x 2);
        neon_float_gemm!(gemm_f32, f32, f32, F32, F32, 4 x 2);

        /// One Q8 block: writes the quants and returns `Some((d, sum))`
        /// exactly as the reference quantizer computes them, or `None` for
        /// blocks with a NaN or an infinite or overflowing scale, which the
        /// caller sends to the reference code instead.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn q8_block(x: *const f32, qs: *mut i8) -> Option<(f32, i32)> {
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
            // x * id, then fcvtas (round half away from zero, as
            // f32::round), then saturating narrows (as `as i8`).
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

        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
            assert_eq!(x.len(), out.len() * 32, "q8_0 row length");
            for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
                // SAFETY: features detected before KERNELS is handed out;
                // xs has 32 floats and b.qs 32 bytes.
                match unsafe { q8_block(xs.as_ptr(), b.qs.as_mut_ptr()) } {
                    Some((d, _)) => b.d = f32_to_f16(d).to_le_bytes(),
                    None => *b = crate::quant::q8_0::quantize_block_q8_0(xs.try_into().unwrap()),
                }
            }
        }

        /// Safe only through `KERNELS` (features detected first).
        pub(super) fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
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

        pub(in crate::dot) static KERNELS: Kernels = Kernels {
            path: $path,
            tile: (MR, 2),
            q4_0: gemm_q4_0,
            q4_1: gemm_q4_1,
            q8_0: gemm_q8_0,
            q5_0: crate::dot::kq::$kq::<crate::quant::BlockQ5_0>,
            q5_1: crate::dot::kq::$kq::<crate::quant::BlockQ5_1>,
            q2_k: crate::dot::kq::$kq::<crate::quant::BlockQ2_K>,
            q3_k: crate::dot::kq::$kq::<crate::quant::BlockQ3_K>,
            q4_k: crate::dot::kq::$kq::<crate::quant::BlockQ4_K>,
            q5_k: crate::dot::kq::$kq::<crate::quant::BlockQ5_K>,
            q6_k: crate::dot::kq::$kq::<crate::quant::BlockQ6_K>,
            f16: gemm_f16,
            bf16: gemm_bf16,
            f32_le: gemm_f32_le,
            f16_f32: gemm_f16_f32,
            bf16_f32: gemm_bf16_f32,
            f32: gemm_f32,
            quantize_q8_0,
            quantize_q8_1,
            quantize_q8_k: crate::quant::quantize_row_q8_k,
        };
    };
}

/// Plain NEON (baseline on aarch64): `vmull_s8` + `vpadalq_s16`.
pub(super) mod plain {
    neon_kernels!(
        features = "neon",
        path = crate::simd::SimdPath::Neon,
        dotprod = false,
        kq = gemm_neon
    );
}

/// NEON with FEAT_DotProd: `sdot`.
pub(super) mod dotprod {
    neon_kernels!(
        features = "neon,dotprod",
        path = crate::simd::SimdPath::NeonDotprod,
        dotprod = true,
        kq = gemm_neon_dotprod
    );
}
