//! The file-layout GEMMs of the formats added with the K-quants (Q5_0, Q5_1,
//! Q2_K..Q6_K), written once as `#[inline(always)]` bodies generic over the
//! byte-vector type [`I8x32`], with short `#[target_feature]` entry points
//! per instruction set (the pattern of `attention/lanes.rs`). No macros, and
//! no SIMD work inside closures handed to core (`array::from_fn`, iterator
//! adapters): those are compiled without the entry point's features, so the
//! intrinsics in them stay out-of-line calls (Q5_0 ran 15x slower so).
//!
//! Every output is computed in the order of the format's super-block twin
//! (`vec_dot_*_sb` in its `quant` file): per block, exact integer sums
//! (whatever lanes the vectors split them into), then the format's
//! [`KqFormat::term`] in f32, added to one accumulator in block order. The
//! f32 operations are plain Rust on every path, so every path, every tile
//! shape and every batch give the twin's bits exactly.
//!
//! Weights go into the integer dot as unsigned bytes in 0..=63 (the quant
//! before its offset); offsets come back through the activation sums
//! (`bsums` for Q8_K, a dot with ones for Q8_0), so one product form
//! (`vpmaddubsw`, `smull`, `sdot`) fits every format exactly.
//!
//! Tiles are one row by up to [`NR`] tokens: a K-quant row's unpacking (the
//! expensive part) is shared by the tokens, and a row's super-block stays in
//! L1 while they pass.

use crate::dot::{for_tiles, gemm_shape, DotFormat, Tiles};
use crate::quant::kquant::{scales_mins_k4, QK_K};
use crate::quant::{
    BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K, BlockQ6_K, BlockQ8_0,
    BlockQ8_1, BlockQ8_K,
};

/// Tokens per full tile.
pub(crate) const NR: usize = 4;

/// 32 bytes, and i32 lanes to sum exact products into. Every method is
/// `unsafe` and `#[inline(always)]`: the SIMD ones may only run on a CPU
/// with their features, inside the `#[target_feature]` entry points.
/// Pointers must be valid for 32 (or 16: [`I8x32::nibbles16`]) bytes.
pub(crate) trait I8x32: Copy {
    type Acc: Copy;
    unsafe fn load(p: *const u8) -> Self;
    unsafe fn splat(b: u8) -> Self;
    unsafe fn and(self, o: Self) -> Self;
    unsafe fn or(self, o: Self) -> Self;
    /// Each byte shifted right by N (N in 1..8), zeros shifted in.
    unsafe fn shr<const N: u32>(self) -> Self;
    /// Each byte shifted left by N (N in 1..8), zeros shifted in.
    unsafe fn shl<const N: u32>(self) -> Self;
    /// 0xFF in each byte that has a bit of `bit` set, else 0.
    unsafe fn test(self, bit: u8) -> Self;
    /// 16 bytes at `p` as 32: the low nibbles, then the high nibbles.
    unsafe fn nibbles16(p: *const u8) -> Self;
    /// 0xFF in byte e when bit e of `bits` is set, else 0.
    unsafe fn spread_bits(bits: u32) -> Self;
    unsafe fn zero() -> Self::Acc;
    /// `acc` plus, in some lanes, `k0 * u[e] * s[e]` over bytes 0..16 and
    /// `k1 * u[e] * s[e]` over bytes 16..32: `u` unsigned (at most 63), `s`
    /// signed, `k0`/`k1` in -128..=127. Exact in i32.
    unsafe fn dot(acc: Self::Acc, u: Self, s: Self, k0: i32, k1: i32) -> Self::Acc;
    /// The exact sum of the lanes.
    unsafe fn hsum(acc: Self::Acc) -> i32;
}

/// The portable twin of the vector types: 32 bytes in an array, one exact
/// i32 sum. The same bodies instantiated with it are what the SIMD entry
/// points are tested against (beside the format's own scalar twin).
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct Bytes([u8; 32]);

#[cfg(test)]
impl Bytes {
    #[inline(always)]
    fn map(self, f: impl Fn(u8) -> u8) -> Self {
        Bytes(self.0.map(f))
    }
    #[inline(always)]
    fn zip(self, o: Self, f: impl Fn(u8, u8) -> u8) -> Self {
        Bytes(std::array::from_fn(|i| f(self.0[i], o.0[i])))
    }
}

#[cfg(test)]
impl I8x32 for Bytes {
    type Acc = i32;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 32 readable bytes at p.
        Bytes(unsafe { (p as *const [u8; 32]).read_unaligned() })
    }
    #[inline(always)]
    unsafe fn splat(b: u8) -> Self {
        Bytes([b; 32])
    }
    #[inline(always)]
    unsafe fn and(self, o: Self) -> Self {
        self.zip(o, |a, b| a & b)
    }
    #[inline(always)]
    unsafe fn or(self, o: Self) -> Self {
        self.zip(o, |a, b| a | b)
    }
    #[inline(always)]
    unsafe fn shr<const N: u32>(self) -> Self {
        self.map(|a| a >> N)
    }
    #[inline(always)]
    unsafe fn shl<const N: u32>(self) -> Self {
        self.map(|a| a << N)
    }
    #[inline(always)]
    unsafe fn test(self, bit: u8) -> Self {
        self.map(|a| if a & bit != 0 { 0xFF } else { 0 })
    }
    #[inline(always)]
    unsafe fn nibbles16(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 16 readable bytes at p.
        let q = unsafe { (p as *const [u8; 16]).read_unaligned() };
        Bytes(std::array::from_fn(|i| {
            if i < 16 {
                q[i] & 0x0F
            } else {
                q[i - 16] >> 4
            }
        }))
    }
    #[inline(always)]
    unsafe fn spread_bits(bits: u32) -> Self {
        Bytes(std::array::from_fn(|e| {
            if (bits >> e) & 1 != 0 {
                0xFF
            } else {
                0
            }
        }))
    }
    #[inline(always)]
    unsafe fn zero() -> i32 {
        0
    }
    #[inline(always)]
    unsafe fn dot(acc: i32, u: Self, s: Self, k0: i32, k1: i32) -> i32 {
        let half = |r: std::ops::Range<usize>| -> i32 {
            r.map(|e| u.0[e] as i32 * s.0[e] as i8 as i32).sum()
        };
        acc + k0 * half(0..16) + k1 * half(16..32)
    }
    #[inline(always)]
    unsafe fn hsum(acc: i32) -> i32 {
        acc
    }
}

/// A format with a generic file-layout kernel: the exact integer parts of a
/// block's dot with C activation blocks, and the f32 term they become (the
/// same function the format's scalar twin uses, so the bits agree).
pub(crate) trait KqFormat: DotFormat {
    /// The integer parts of one block's dot: `(isum, msum)`; formats
    /// without a minimum leave `msum` at 0.
    ///
    /// # Safety
    /// `V`'s CPU features must be present; each `ys[t]` must point at a
    /// valid activation block.
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const Self::Act; C],
    ) -> [(i32, i32); C];
    /// What block `x` adds to the f32 accumulator, from its integer parts.
    fn term(x: &Self, y: &Self::Act, ints: (i32, i32)) -> f32;
}

/// `u8` view of an activation block's quants at element `e`.
#[inline(always)]
fn qs_at(qs: &[i8], e: usize) -> *const u8 {
    qs[e..].as_ptr() as *const u8
}

/// `sum_j k_j * bsum_j` over the 16 sums of 16 of a Q8_K block.
#[inline(always)]
fn bsum_dot(y: &BlockQ8_K, k: impl Fn(usize) -> i32) -> i32 {
    (0..QK_K / 16).map(|j| k(j) * y.bsum(j) as i32).sum()
}

impl KqFormat for BlockQ4_K {
    #[inline(always)]
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const BlockQ8_K; C],
    ) -> [(i32, i32); C] {
        let (sc, m) = scales_mins_k4(&x.scales);
        // SAFETY (whole body): V's features are present and every pointer
        // is inside its block, as the caller guarantees.
        unsafe {
            let mut acc = [V::zero(); C];
            for p in 0..4 {
                let v = V::load(x.qs[32 * p..].as_ptr());
                let lo = v.and(V::splat(0x0F));
                let hi = v.shr::<4>();
                let (s0, s1) = (sc[2 * p] as i32, sc[2 * p + 1] as i32);
                for t in 0..C {
                    let y = &*ys[t];
                    acc[t] = V::dot(acc[t], lo, V::load(qs_at(&y.qs, 64 * p)), s0, s0);
                    acc[t] = V::dot(acc[t], hi, V::load(qs_at(&y.qs, 64 * p + 32)), s1, s1);
                }
            }
            let mut out = [(0, 0); C];
            for t in 0..C {
                out[t] = (V::hsum(acc[t]), bsum_dot(&*ys[t], |j| m[j / 2] as i32));
            }
            out
        }
    }
    #[inline(always)]
    fn term(x: &Self, y: &BlockQ8_K, (isum, msum): (i32, i32)) -> f32 {
        crate::quant::q4_k::term(x, y, isum, msum)
    }
}

impl KqFormat for BlockQ5_K {
    #[inline(always)]
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const BlockQ8_K; C],
    ) -> [(i32, i32); C] {
        let (sc, m) = scales_mins_k4(&x.scales);
        // SAFETY (whole body): as for Q4_K.
        unsafe {
            let mut acc = [V::zero(); C];
            let qh = V::load(x.qh.as_ptr());
            let b16 = V::splat(0x10);
            for p in 0..4 {
                let v = V::load(x.qs[32 * p..].as_ptr());
                let lo = v.and(V::splat(0x0F)).or(qh.test(1 << (2 * p)).and(b16));
                let hi = v.shr::<4>().or(qh.test(2 << (2 * p)).and(b16));
                let (s0, s1) = (sc[2 * p] as i32, sc[2 * p + 1] as i32);
                for t in 0..C {
                    let y = &*ys[t];
                    acc[t] = V::dot(acc[t], lo, V::load(qs_at(&y.qs, 64 * p)), s0, s0);
                    acc[t] = V::dot(acc[t], hi, V::load(qs_at(&y.qs, 64 * p + 32)), s1, s1);
                }
            }
            let mut out = [(0, 0); C];
            for t in 0..C {
                out[t] = (V::hsum(acc[t]), bsum_dot(&*ys[t], |j| m[j / 2] as i32));
            }
            out
        }
    }
    #[inline(always)]
    fn term(x: &Self, y: &BlockQ8_K, (isum, msum): (i32, i32)) -> f32 {
        crate::quant::q5_k::term(x, y, isum, msum)
    }
}

impl KqFormat for BlockQ6_K {
    #[inline(always)]
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const BlockQ8_K; C],
    ) -> [(i32, i32); C] {
        let sc = |j: usize| x.scales[j] as i32;
        // SAFETY (whole body): as for Q4_K.
        unsafe {
            let mut acc = [V::zero(); C];
            let (m4, m30) = (V::splat(0x0F), V::splat(0x30));
            for h in 0..2 {
                let qa = V::load(x.ql[64 * h..].as_ptr());
                let qb = V::load(x.ql[64 * h + 32..].as_ptr());
                let qh = V::load(x.qh[32 * h..].as_ptr());
                // Quarter k holds elements 128h + 32k.., sub-blocks 8h + 2k and 8h + 2k + 1.
                let q = [
                    qa.and(m4).or(qh.shl::<4>().and(m30)),
                    qb.and(m4).or(qh.shl::<2>().and(m30)),
                    qa.shr::<4>().or(qh.and(m30)),
                    qb.shr::<4>().or(qh.shr::<2>().and(m30)),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let j = 8 * h + 2 * k;
                    for t in 0..C {
                        let yq = V::load(qs_at(&(*ys[t]).qs, 128 * h + 32 * k));
                        acc[t] = V::dot(acc[t], qk, yq, sc(j), sc(j + 1));
                    }
                }
            }
            // The quants are q - 32: take 32 * sum_j sc_j * bsum_j back off.
            let mut out = [(0, 0); C];
            for t in 0..C {
                out[t] = (V::hsum(acc[t]) - 32 * bsum_dot(&*ys[t], sc), 0);
            }
            out
        }
    }
    #[inline(always)]
    fn term(x: &Self, y: &BlockQ8_K, (isum, _): (i32, i32)) -> f32 {
        crate::quant::q6_k::term(x, y, isum)
    }
}

impl KqFormat for BlockQ3_K {
    #[inline(always)]
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const BlockQ8_K; C],
    ) -> [(i32, i32); C] {
        let sc: [i32; 16] = std::array::from_fn(|j| x.scale(j) as i32 - 32);
        // SAFETY (whole body): as for Q4_K.
        unsafe {
            let mut acc = [V::zero(); C];
            let hm = V::load(x.hmask.as_ptr());
            let (m3, b4) = (V::splat(3), V::splat(4));
            for p in 0..2 {
                let v = V::load(x.qs[32 * p..].as_ptr());
                let low = [v, v.shr::<2>(), v.shr::<4>(), v.shr::<6>()];
                for (k, &lk) in low.iter().enumerate() {
                    // Element 128p + 32k + i: high bit is bit 4p + k of hmask[i].
                    let q = lk.and(m3).or(hm.test(1 << (4 * p + k)).and(b4));
                    let j = 8 * p + 2 * k;
                    for t in 0..C {
                        let yq = V::load(qs_at(&(*ys[t]).qs, 128 * p + 32 * k));
                        acc[t] = V::dot(acc[t], q, yq, sc[j], sc[j + 1]);
                    }
                }
            }
            // The quants are q - 4.
            let mut out = [(0, 0); C];
            for t in 0..C {
                out[t] = (V::hsum(acc[t]) - 4 * bsum_dot(&*ys[t], |j| sc[j]), 0);
            }
            out
        }
    }
    #[inline(always)]
    fn term(x: &Self, y: &BlockQ8_K, (isum, _): (i32, i32)) -> f32 {
        crate::quant::q3_k::term(x, y, isum)
    }
}

impl KqFormat for BlockQ2_K {
    #[inline(always)]
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const BlockQ8_K; C],
    ) -> [(i32, i32); C] {
        let sc = |j: usize| (x.scales[j] & 0xF) as i32;
        // SAFETY (whole body): as for Q4_K.
        unsafe {
            let mut acc = [V::zero(); C];
            let m3 = V::splat(3);
            for p in 0..2 {
                let v = V::load(x.qs[32 * p..].as_ptr());
                let low = [v, v.shr::<2>(), v.shr::<4>(), v.shr::<6>()];
                for (k, &lk) in low.iter().enumerate() {
                    let q = lk.and(m3);
                    let j = 8 * p + 2 * k;
                    for t in 0..C {
                        let yq = V::load(qs_at(&(*ys[t]).qs, 128 * p + 32 * k));
                        acc[t] = V::dot(acc[t], q, yq, sc(j), sc(j + 1));
                    }
                }
            }
            let mut out = [(0, 0); C];
            for t in 0..C {
                out[t] = (
                    V::hsum(acc[t]),
                    bsum_dot(&*ys[t], |j| (x.scales[j] >> 4) as i32),
                );
            }
            out
        }
    }
    #[inline(always)]
    fn term(x: &Self, y: &BlockQ8_K, (isum, msum): (i32, i32)) -> f32 {
        crate::quant::q2_k::term(x, y, isum, msum)
    }
}

impl KqFormat for BlockQ5_0 {
    #[inline(always)]
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const BlockQ8_0; C],
    ) -> [(i32, i32); C] {
        // SAFETY (whole body): as for Q4_K.
        unsafe {
            let hb = V::spread_bits(u32::from_le_bytes(x.qh)).and(V::splat(0x10));
            let q = V::nibbles16(x.qs.as_ptr()).or(hb);
            let one = V::splat(1);
            let mut out = [(0, 0); C];
            for t in 0..C {
                let yq = V::load((*ys[t]).qs.as_ptr() as *const u8);
                // sum((q - 16) y) = sum(q y) - 16 sum(y).
                let acc = V::dot(V::zero(), q, yq, 1, 1);
                out[t] = (V::hsum(V::dot(acc, one, yq, -16, -16)), 0);
            }
            out
        }
    }
    #[inline(always)]
    fn term(x: &Self, y: &BlockQ8_0, (sumi, _): (i32, i32)) -> f32 {
        crate::quant::q5_0::term(x, y, sumi)
    }
}

impl KqFormat for BlockQ5_1 {
    #[inline(always)]
    unsafe fn ints<V: I8x32, const C: usize>(
        x: &Self,
        ys: [*const BlockQ8_1; C],
    ) -> [(i32, i32); C] {
        // SAFETY (whole body): as for Q4_K.
        unsafe {
            let hb = V::spread_bits(u32::from_le_bytes(x.qh)).and(V::splat(0x10));
            let q = V::nibbles16(x.qs.as_ptr()).or(hb);
            let mut out = [(0, 0); C];
            for t in 0..C {
                let yq = V::load((*ys[t]).qs.as_ptr() as *const u8);
                out[t] = (V::hsum(V::dot(V::zero(), q, yq, 1, 1)), 0);
            }
            out
        }
    }
    #[inline(always)]
    fn term(x: &Self, y: &BlockQ8_1, (sumi, _): (i32, i32)) -> f32 {
        crate::quant::q5_1::term(x, y, sumi)
    }
}

/// One row (`w`, k blocks) times C tokens (`a`, token t at `a + t k`),
/// written to `out + t * ld`.
///
/// # Safety
/// `V`'s features are present; `w` holds k blocks, `a` holds `C * k`, and
/// `out + t * ld` (t < C) is writable.
#[inline(always)]
unsafe fn tile<V: I8x32, F: KqFormat, const C: usize>(
    w: *const F,
    a: *const F::Act,
    k: usize,
    out: *mut f32,
    ld: usize,
) {
    let mut acc = [0.0f32; C];
    for b in 0..k {
        // SAFETY (whole loop): b < k and t < C keep every pointer inside w
        // and a, as the caller guarantees.
        unsafe {
            let x = &*w.add(b);
            let mut ys = [a; C];
            for (t, y) in ys.iter_mut().enumerate() {
                *y = a.add(t * k + b);
            }
            let ints = F::ints::<V, C>(x, ys);
            for t in 0..C {
                acc[t] += F::term(x, &*ys[t], ints[t]);
            }
        }
    }
    for (t, v) in acc.into_iter().enumerate() {
        // SAFETY: as the caller guarantees.
        unsafe { *out.add(t * ld) = v };
    }
}

/// The safe GEMM over [`tile`] for one entry point: `$entry::<F, C>`.
/// (`entry` is a plain function-pointer parameter, not a macro: one body.)
#[inline(always)]
fn gemm_with<F: KqFormat>(
    w: &[F],
    a: &[F::Act],
    k: usize,
    out: &mut [f32],
    full: unsafe fn(*const F, *const F::Act, usize, *mut f32, usize),
    one: unsafe fn(*const F, *const F::Act, usize, *mut f32, usize),
) -> Tiles {
    let (rows, n) = gemm_shape(w.len(), a.len(), k, out.len());
    let (wp, ap, op) = (w.as_ptr(), a.as_ptr(), out.as_mut_ptr());
    for_tiles(
        rows,
        n,
        k * std::mem::size_of::<F>(),
        (1, NR),
        |r0, t0, _, nr| {
            // SAFETY: the entry points' features were detected before their
            // table was handed out; for_tiles keeps r0 < rows and t0 + nr <= n,
            // so the tile's blocks and outputs are inside w, a and out, whose
            // lengths gemm_shape checked.
            unsafe {
                let (w, a, o) = (wp.add(r0 * k), ap.add(t0 * k), op.add(t0 * rows + r0));
                if nr == NR {
                    full(w, a, k, o, rows)
                } else {
                    one(w, a, k, o, rows)
                }
            }
        },
    )
}

/// The portable instantiation (tests: the generic body against the
/// format's scalar twin).
#[cfg(test)]
pub(crate) fn gemm_portable<F: KqFormat>(
    w: &[F],
    a: &[F::Act],
    k: usize,
    out: &mut [f32],
) -> Tiles {
    gemm_with(w, a, k, out, tile::<Bytes, F, NR>, tile::<Bytes, F, 1>)
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::gemm_avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{gemm_with, tile, I8x32, KqFormat, NR};
    use crate::dot::Tiles;

    /// 32 bytes in a ymm; needs AVX2.
    #[derive(Clone, Copy)]
    pub(crate) struct Ymm(__m256i);

    // SAFETY (every method): the intrinsics need AVX2, which the caller
    // guarantees (the methods only run inside `entry`, a
    // `#[target_feature(enable = "avx2")]` function reached after detection);
    // pointers are valid by the trait's contract.
    impl I8x32 for Ymm {
        type Acc = __m256i;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_loadu_si256(p as *const __m256i) })
        }
        #[inline(always)]
        unsafe fn splat(b: u8) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_set1_epi8(b as i8) })
        }
        #[inline(always)]
        unsafe fn and(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_and_si256(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn or(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_or_si256(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn shr<const N: u32>(self) -> Self {
            // 16-bit shifts, then a mask drops the bits that crossed bytes.
            // SAFETY: see the impl comment.
            unsafe {
                let s = match N {
                    2 => _mm256_srli_epi16::<2>(self.0),
                    4 => _mm256_srli_epi16::<4>(self.0),
                    6 => _mm256_srli_epi16::<6>(self.0),
                    _ => unreachable!("shift {N}"),
                };
                Ymm(_mm256_and_si256(s, _mm256_set1_epi8((0xFFu8 >> N) as i8)))
            }
        }
        #[inline(always)]
        unsafe fn shl<const N: u32>(self) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let s = match N {
                    2 => _mm256_slli_epi16::<2>(self.0),
                    4 => _mm256_slli_epi16::<4>(self.0),
                    _ => unreachable!("shift {N}"),
                };
                Ymm(_mm256_and_si256(s, _mm256_set1_epi8((0xFFu8 << N) as i8)))
            }
        }
        #[inline(always)]
        unsafe fn test(self, bit: u8) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let b = _mm256_set1_epi8(bit as i8);
                let z = _mm256_cmpeq_epi8(_mm256_and_si256(self.0, b), _mm256_setzero_si256());
                Ymm(_mm256_xor_si256(z, _mm256_set1_epi8(-1)))
            }
        }
        #[inline(always)]
        unsafe fn nibbles16(p: *const u8) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let t = _mm_loadu_si128(p as *const __m128i);
                let b = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
                Ymm(_mm256_and_si256(b, _mm256_set1_epi8(0x0F)))
            }
        }
        #[inline(always)]
        unsafe fn spread_bits(bits: u32) -> Self {
            // Byte e gets byte e / 8 of `bits` (a shuffle within each
            // 128-bit half of the broadcast word), then tests bit e % 8.
            // SAFETY: see the impl comment.
            unsafe {
                let v = _mm256_set1_epi32(bits as i32);
                let idx = _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                );
                let bytes = _mm256_shuffle_epi8(v, idx);
                let m = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                Ymm(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, m), m))
            }
        }
        #[inline(always)]
        unsafe fn zero() -> __m256i {
            // SAFETY: see the impl comment.
            unsafe { _mm256_setzero_si256() }
        }
        #[inline(always)]
        unsafe fn dot(acc: __m256i, u: Self, s: Self, k0: i32, k1: i32) -> __m256i {
            // vpmaddubsw: pairs of u * s in i16 (at most 2 * 63 * 128, no
            // saturation); vpmaddwd by k: pairs of those times k in i32.
            // SAFETY: see the impl comment.
            unsafe {
                let p = _mm256_maddubs_epi16(u.0, s.0);
                let k = _mm256_set_m128i(_mm_set1_epi16(k1 as i16), _mm_set1_epi16(k0 as i16));
                _mm256_add_epi32(acc, _mm256_madd_epi16(p, k))
            }
        }
        #[inline(always)]
        unsafe fn hsum(acc: __m256i) -> i32 {
            // SAFETY: see the impl comment.
            unsafe {
                let s = _mm_add_epi32(
                    _mm256_castsi256_si128(acc),
                    _mm256_extracti128_si256(acc, 1),
                );
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                _mm_cvtsi128_si32(s)
            }
        }
    }

    /// The AVX2 entry point of [`tile`].
    ///
    /// # Safety
    /// The CPU has AVX2; [`tile`]'s pointer conditions.
    #[target_feature(enable = "avx2")]
    unsafe fn entry<F: KqFormat, const C: usize>(
        w: *const F,
        a: *const F::Act,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's feature is Ymm's; the caller's pointer guarantees.
        unsafe { tile::<Ymm, F, C>(w, a, k, out, ld) }
    }

    /// The AVX2 GEMM of format F (every x86 path's table uses it).
    /// Safe only through a `Kernels` table (features detected first).
    pub(crate) fn gemm_avx2<F: KqFormat>(
        w: &[F],
        a: &[F::Act],
        k: usize,
        out: &mut [f32],
    ) -> Tiles {
        gemm_with(w, a, k, out, entry::<F, NR>, entry::<F, 1>)
    }
}

#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
pub(crate) use arm::{gemm_neon, gemm_neon_dotprod};

#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
mod arm {
    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::{gemm_with, tile, I8x32, KqFormat, NR};
    use crate::dot::Tiles;

    /// 32 bytes in two q registers; `DOT`: use `sdot` (FEAT_DotProd).
    #[derive(Clone, Copy)]
    pub(crate) struct Neon<const DOT: bool>(uint8x16_t, uint8x16_t);

    /// `sdot`: lanes of the exact sum of u * s over 16 bytes. Its own function so the
    /// instruction is assembled with FEAT_DotProd enabled.
    ///
    /// # Safety
    /// The CPU has NEON and FEAT_DotProd.
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn sdot16(u: int8x16_t, s: int8x16_t) -> int32x4_t {
        let mut acc = vdupq_n_s32(0);
        // SAFETY: FEAT_DotProd is present (this function's features, the caller's
        // guarantee); registers only.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {u:v}.16b, {s:v}.16b",
                acc = inout(vreg) acc,
                u = in(vreg) u,
                s = in(vreg) s,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    impl<const DOT: bool> Neon<DOT> {
        /// Lanes of the exact sum of u * s over 16 bytes (u at most 63, so
        /// both are valid i8).
        #[inline(always)]
        unsafe fn dot16(u: uint8x16_t, s: uint8x16_t) -> int32x4_t {
            // SAFETY: NEON (and FEAT_DotProd when DOT) are present, which
            // the caller guarantees; registers only.
            unsafe {
                let (u, s) = (vreinterpretq_s8_u8(u), vreinterpretq_s8_u8(s));
                if DOT {
                    sdot16(u, s)
                } else {
                    // i8 x i8 products fit i16; sadalp adds pairs into i32.
                    let p0 = vmull_s8(vget_low_s8(u), vget_low_s8(s));
                    let p1 = vmull_high_s8(u, s);
                    vpadalq_s16(vpaddlq_s16(p0), p1)
                }
            }
        }
    }

    // SAFETY (every method): NEON (and FEAT_DotProd for `sdot`) are present,
    // which the caller guarantees (the methods only run inside the entry
    // points below, reached after detection); pointers are valid by the
    // trait's contract.
    impl<const DOT: bool> I8x32 for Neon<DOT> {
        type Acc = int32x4_t;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self {
            // SAFETY: see the impl comment.
            unsafe { Neon(vld1q_u8(p), vld1q_u8(p.add(16))) }
        }
        #[inline(always)]
        unsafe fn splat(b: u8) -> Self {
            // SAFETY: see the impl comment.
            unsafe { Neon(vdupq_n_u8(b), vdupq_n_u8(b)) }
        }
        #[inline(always)]
        unsafe fn and(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            unsafe { Neon(vandq_u8(self.0, o.0), vandq_u8(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn or(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            unsafe { Neon(vorrq_u8(self.0, o.0), vorrq_u8(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn shr<const N: u32>(self) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                match N {
                    2 => Neon(vshrq_n_u8::<2>(self.0), vshrq_n_u8::<2>(self.1)),
                    4 => Neon(vshrq_n_u8::<4>(self.0), vshrq_n_u8::<4>(self.1)),
                    6 => Neon(vshrq_n_u8::<6>(self.0), vshrq_n_u8::<6>(self.1)),
                    _ => unreachable!("shift {N}"),
                }
            }
        }
        #[inline(always)]
        unsafe fn shl<const N: u32>(self) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                match N {
                    2 => Neon(vshlq_n_u8::<2>(self.0), vshlq_n_u8::<2>(self.1)),
                    4 => Neon(vshlq_n_u8::<4>(self.0), vshlq_n_u8::<4>(self.1)),
                    _ => unreachable!("shift {N}"),
                }
            }
        }
        #[inline(always)]
        unsafe fn test(self, bit: u8) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let b = vdupq_n_u8(bit);
                Neon(vtstq_u8(self.0, b), vtstq_u8(self.1, b))
            }
        }
        #[inline(always)]
        unsafe fn nibbles16(p: *const u8) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let q = vld1q_u8(p);
                Neon(vandq_u8(q, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(q))
            }
        }
        #[inline(always)]
        unsafe fn spread_bits(bits: u32) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let v = vreinterpretq_u8_u32(vdupq_n_u32(bits));
                let lo_idx: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
                let hi_idx: [u8; 16] = [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
                let m: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
                let m = vld1q_u8(m.as_ptr());
                let lo = vqtbl1q_u8(v, vld1q_u8(lo_idx.as_ptr()));
                let hi = vqtbl1q_u8(v, vld1q_u8(hi_idx.as_ptr()));
                Neon(vtstq_u8(lo, m), vtstq_u8(hi, m))
            }
        }
        #[inline(always)]
        unsafe fn zero() -> int32x4_t {
            // SAFETY: see the impl comment.
            unsafe { vdupq_n_s32(0) }
        }
        #[inline(always)]
        unsafe fn dot(acc: int32x4_t, u: Self, s: Self, k0: i32, k1: i32) -> int32x4_t {
            // SAFETY: see the impl comment.
            unsafe {
                let acc = vmlaq_n_s32(acc, Self::dot16(u.0, s.0), k0);
                vmlaq_n_s32(acc, Self::dot16(u.1, s.1), k1)
            }
        }
        #[inline(always)]
        unsafe fn hsum(acc: int32x4_t) -> i32 {
            // SAFETY: see the impl comment.
            unsafe { vaddvq_s32(acc) }
        }
    }

    /// # Safety
    /// The CPU has NEON; [`tile`]'s pointer conditions.
    #[target_feature(enable = "neon")]
    unsafe fn entry<F: KqFormat, const C: usize>(
        w: *const F,
        a: *const F::Act,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's feature is Neon<false>'s; the caller's guarantees.
        unsafe { tile::<Neon<false>, F, C>(w, a, k, out, ld) }
    }

    /// # Safety
    /// The CPU has NEON and FEAT_DotProd; [`tile`]'s pointer conditions.
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn entry_dot<F: KqFormat, const C: usize>(
        w: *const F,
        a: *const F::Act,
        k: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: this function's features are Neon<true>'s; the caller's guarantees.
        unsafe { tile::<Neon<true>, F, C>(w, a, k, out, ld) }
    }

    /// Safe only through the `neon` path's `Kernels` table.
    pub(crate) fn gemm_neon<F: KqFormat>(
        w: &[F],
        a: &[F::Act],
        k: usize,
        out: &mut [f32],
    ) -> Tiles {
        gemm_with(w, a, k, out, entry::<F, NR>, entry::<F, 1>)
    }

    /// Safe only through the `neon-dotprod` path's `Kernels` table.
    pub(crate) fn gemm_neon_dotprod<F: KqFormat>(
        w: &[F],
        a: &[F::Act],
        k: usize,
        out: &mut [f32],
    ) -> Tiles {
        gemm_with(w, a, k, out, entry_dot::<F, NR>, entry_dot::<F, 1>)
    }
}
