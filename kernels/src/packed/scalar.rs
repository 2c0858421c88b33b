//! The packed kernels in plain Rust: the twin every SIMD version is tested
//! against, bit for bit. Each output is `sum_b fma(dx_b * dy_b, sumi_b, acc)`
//! in block order; `f32::mul_add` is a fused multiply-add on every target
//! (in software where the CPU lacks one), so the roundings match.

use super::{block_at, gemm_shape, ActBlock, Out, PackedWeights, GROUP_ROWS};
use crate::dot::Tiles;
use crate::quant::float::f16_to_f32;

/// The f16 at `bytes[at]` as f32.
fn h(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// Walks every (row, token) of the call with `sumi(quants_of_block, i, act)`
/// giving the block's integer dot for row i of its group; `qb`/`sb` are the
/// quant and scale bytes per block (sb = 64 when minimums follow the
/// scales, as for Q4_1).
///
/// Safety: [`super::PackedGemmFn`]'s.
unsafe fn each_output(
    w: &PackedWeights,
    (r0, nr): (usize, usize),
    act: &[ActBlock],
    out: Out,
    (qb, sb): (usize, usize),
    sumi: impl Fn(&[u8], usize, &ActBlock) -> i32,
) -> Tiles {
    let n = gemm_shape(w, r0, nr, act);
    let k = w.blocks();
    for r in 0..nr {
        let (g, i) = ((r0 + r) / GROUP_ROWS, (r0 + r) % GROUP_ROWS);
        let group = w.group(g);
        for t in 0..n {
            let mut acc = 0.0f32;
            for (b, a) in act[t * k..(t + 1) * k].iter().enumerate() {
                let (qo, so) = block_at(qb, sb, b);
                let s = sumi(&group[qo..qo + qb], i, a);
                acc = (h(group, so + 2 * i) * a.d).mul_add(s as f32, acc);
                if sb == 64 {
                    acc = h(group, so + 32 + 2 * i).mul_add(a.s, acc);
                }
            }
            // SAFETY: t < n and r < nr, which the caller lets us write.
            unsafe { *out.at(t, r) = acc };
        }
    }
    Tiles::default()
}

/// Q4_0 weights: chunk j's byte (lane i, e) holds element 4j+e (low nibble)
/// and 16+4j+e (high nibble); `a.qs` are the signed Q8_0 quants.
/// Safety: [`super::PackedGemmFn`]'s.
pub(super) unsafe fn gemm_q4_0(
    w: &PackedWeights,
    r0: usize,
    nr: usize,
    act: &[ActBlock],
    out: Out,
) -> Tiles {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { each_output(w, (r0, nr), act, out, (256, 32), nibble_sum) }
}

/// Q4_1 weights: nibbles as Q4_0 (no correction), then `m * s` per block.
/// Safety: [`super::PackedGemmFn`]'s.
pub(super) unsafe fn gemm_q4_1(
    w: &PackedWeights,
    r0: usize,
    nr: usize,
    act: &[ActBlock],
    out: Out,
) -> Tiles {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { each_output(w, (r0, nr), act, out, (256, 64), nibble_sum) }
}

/// `c + sum(nibble * y)` for lane i of a 4-bit block.
fn nibble_sum(q: &[u8], i: usize, a: &ActBlock) -> i32 {
    let mut s = a.c;
    for j in 0..4 {
        for e in 0..4 {
            let byte = q[j * 64 + 4 * i + e];
            s += (byte & 0x0F) as i32 * a.qs[4 * j + e] as i8 as i32;
            s += (byte >> 4) as i32 * a.qs[16 + 4 * j + e] as i8 as i32;
        }
    }
    s
}

/// Q8_0 weights: chunk j's byte (lane i, e) is element 4j+e plus 128, and
/// `a.c = -128 sum(y)` takes the 128 back off; `a.qs` are the signed Q8_0 quants.
/// Safety: [`super::PackedGemmFn`]'s.
pub(super) unsafe fn gemm_q8_0(
    w: &PackedWeights,
    r0: usize,
    nr: usize,
    act: &[ActBlock],
    out: Out,
) -> Tiles {
    // SAFETY: the caller's guarantee, passed on.
    unsafe {
        each_output(w, (r0, nr), act, out, (512, 32), |q, i, a| {
            let mut s = a.c;
            for j in 0..8 {
                for e in 0..4 {
                    let x = q[j * 64 + 4 * i + e] as i32;
                    let y = a.qs[4 * j + e] as i8 as i32;
                    s += x * y;
                }
            }
            s
        })
    }
}
