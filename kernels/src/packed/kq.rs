//! Packed Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1: layouts and kernels, written once as
//! `#[inline(always)]` bodies generic over the row-lane vector type
//! [`RowLanes`] (one 32-bit lane per weight row), with short
//! `#[target_feature]` entry points per instruction set (the pattern of
//! `attention/lanes.rs`); the same bodies on [`Portable`] lanes are the
//! scalar twin.
//!
//! Layouts (16-row groups as for the other packed types; a "chunk" is 64
//! bytes holding 4 bytes of each of the group's 16 rows, lane i row i):
//! - Q4_K, per super-block (2304 bytes, the file's 16 x 144): 32 quant
//!   chunks, chunk 8p + c holding `qs[32p + 4c..+4]` (low nibbles: elements
//!   64p + 4c.., sub-block 2p; high: 64p + 32 + 4c.., sub-block 2p + 1);
//!   3 chunks of the 12 scale bytes; 16 f16 `d` then 16 f16 `dmin`.
//! - Q5_K, per super-block (2816 bytes, the file's 16 x 176): Q4_K's with 8
//!   chunks of fifth bits after the quants, chunk c holding `qh[4c..+4]`
//!   (bit 2p of a byte: the low nibble's of quarter p; 2p + 1: the high's).
//! - Q6_K, per super-block (3392 bytes: the file's 3360 and 32 of padding):
//!   32 `ql` chunks (16h + c: `ql[64h + 4c..]`), 16 `qh` chunks (8h + c:
//!   `qh[32h + 4c..]`), 4 chunks of the i8 scales, 16 f16 `d`, 32 zero bytes.
//! - Q3_K, per super-block (1856 bytes: the file's 16 x 110, its scales
//!   unpacked to i8, and 32 of padding): 16 `qs` chunks (8h + c:
//!   `qs[32h + 4c..]`), 8 `hmask` chunks (c: `hmask[4c..]`), 4 chunks of
//!   the i8 scales `s - 32`, 16 f16 `d`, 32 zero bytes.
//! - Q2_K, per super-block (1344 bytes, the file's 16 x 84): 16 `qs`
//!   chunks as Q3_K's, 4 chunks of the scale bytes (scale low nibble,
//!   minimum high), 16 f16 `d`, 16 f16 `dmin`.
//! - Q5_0, in units of two blocks (704 bytes, the file's 16 x 44 and 0): both
//!   blocks' 4 nibble chunks (as Q4_0), then both blocks' high-bit words,
//!   then both blocks' 16 f16 scales. A row's high-bit word is the block's
//!   `qh` with its bits moved so that bit 8b + s is element
//!   `16 (s % 2) + 4 (s / 2) + b`: chunk j's low (s = 2j) or high (s = 2j+1)
//!   nibbles get their fifth bits with one shift and one AND.
//! - Q5_1, in units of two blocks (768 bytes): Q5_0's, then both blocks' 16
//!   f16 minimums.
//!
//! Integer sums are exact on every path (u8 quants up to 63 times i8
//! activations, `vpdpbusd` or its `vpmaddubsw` + `vpmaddwd` emulation, then
//! i32 products with the sub-block scales), and the f32 side is the format
//! twin's (`vec_dot_*_sb` for the K-quants, ggml's generic for Q5_0) lane
//! for lane, without FMA: every output is the twin's bits, whatever the
//! path, tile or batch.

use super::{Out, PackedWeights, GROUP_ROWS};
use crate::dot::Tiles;
use crate::quant::{
    BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K, BlockQ6_K, BlockQ8_K, QK_K,
};

/// Bytes of one Q4_K super-block of a group.
pub(crate) const Q4K_SB: usize = 2304;
/// Bytes of one Q5_K super-block of a group.
pub(crate) const Q5K_SB: usize = 2816;
/// Bytes of one Q3_K super-block of a group.
pub(crate) const Q3K_SB: usize = 1856;
/// Bytes of one Q2_K super-block of a group.
pub(crate) const Q2K_SB: usize = 1344;
/// Bytes of one Q6_K super-block of a group.
pub(crate) const Q6K_SB: usize = 3392;
/// Bytes of one Q5_0 unit (two blocks) of a group.
pub(crate) const Q5_0_UNIT: usize = 704;
/// Bytes of one Q5_1 unit (two blocks) of a group.
pub(crate) const Q5_1_UNIT: usize = 768;

/// A K-quant activation block as the packed kernels read it: the Q8_K
/// quants and scale, and the block sums in the forms the kernels add.
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct ActBlockK {
    pub qs: [i8; QK_K],
    pub d: f32,
    /// Q6_K: `-32 * bsum_j`, the start of sub-block j's integer sum (its
    /// quants are stored as q + 32).
    pub c6: [i32; 16],
    /// Q4_K: the sums of 32 (`bs_j = bsum_2j + bsum_2j+1`) as i16 pairs
    /// `(bs_0, bs_2), (bs_1, bs_3), (bs_4, bs_6), (bs_5, bs_7)`, the other
    /// sides of `vpmaddwd` with the minimums.
    pub mp: [i32; 4],
    /// Q2_K: the sums of 16 as i16 pairs `(bsum_4v, bsum_4v+2)`,
    /// `(bsum_4v+1, bsum_4v+3)` for v = 0..4, against its minimum pairs.
    pub mp16: [i32; 8],
}

impl ActBlockK {
    pub(crate) fn new(b: &BlockQ8_K) -> ActBlockK {
        let bs = |j: usize| b.bsum(2 * j) as i32 + b.bsum(2 * j + 1) as i32;
        let pair = |a: usize, c: usize| (bs(a) & 0xFFFF) | (bs(c) << 16);
        ActBlockK {
            qs: b.qs,
            d: b.d(),
            c6: std::array::from_fn(|j| -32 * b.bsum(j) as i32),
            mp: [pair(0, 2), pair(1, 3), pair(4, 6), pair(5, 7)],
            mp16: std::array::from_fn(|i| {
                let j = 4 * (i / 2) + i % 2;
                (b.bsum(j) as i32 & 0xFFFF) | ((b.bsum(j + 2) as i32) << 16)
            }),
        }
    }

    /// Activation bytes `e..e + 4` as the broadcast operand of a dot.
    #[inline(always)]
    fn group(&self, e: usize) -> i32 {
        i32::from_le_bytes([
            self.qs[e] as u8,
            self.qs[e + 1] as u8,
            self.qs[e + 2] as u8,
            self.qs[e + 3] as u8,
        ])
    }
}

// ------------------------------------------------------------------ packing

/// Writes 4 bytes of row `i` into chunk `c` of `dst` (a run of chunks).
#[inline]
fn put(dst: &mut [u8], c: usize, i: usize, four: &[u8]) {
    dst[64 * c + 4 * i..64 * c + 4 * i + 4].copy_from_slice(four);
}

/// Writes `src` (4 bytes a chunk) as row `i` of a run of chunks starting at `dst`.
fn put_all(dst: &mut [u8], i: usize, src: &[u8]) {
    for (c, four) in src.chunks_exact(4).enumerate() {
        put(dst, c, i, four);
    }
}

/// Row `i`'s Q4_K blocks into its group.
pub(crate) fn pack_row_q4_k(blocks: &[BlockQ4_K], i: usize, group: &mut [u8]) {
    for (b, x) in blocks.iter().enumerate() {
        let sb = &mut group[b * Q4K_SB..(b + 1) * Q4K_SB];
        put_all(sb, i, &x.qs);
        put_all(&mut sb[2048..], i, &x.scales);
        sb[2240 + 2 * i..2240 + 2 * i + 2].copy_from_slice(&x.d);
        sb[2272 + 2 * i..2272 + 2 * i + 2].copy_from_slice(&x.dmin);
    }
}

/// Row `i`'s Q5_K blocks into its group: Q4_K's layout with the 8 chunks
/// of fifth bits (`qh`) after the quants.
pub(crate) fn pack_row_q5_k(blocks: &[BlockQ5_K], i: usize, group: &mut [u8]) {
    for (b, x) in blocks.iter().enumerate() {
        let sb = &mut group[b * Q5K_SB..(b + 1) * Q5K_SB];
        put_all(sb, i, &x.qs);
        put_all(&mut sb[2048..], i, &x.qh);
        put_all(&mut sb[2560..], i, &x.scales);
        sb[2752 + 2 * i..2752 + 2 * i + 2].copy_from_slice(&x.d);
        sb[2784 + 2 * i..2784 + 2 * i + 2].copy_from_slice(&x.dmin);
    }
}

/// Row `i`'s Q3_K blocks into its group: the quants (16 chunks, `qs`),
/// the third bits (8 chunks, `hmask`), the sixteen 6-bit scales unpacked to
/// i8 `s - 32` (4 chunks, as Q6_K's), the f16 `d`s.
pub(crate) fn pack_row_q3_k(blocks: &[BlockQ3_K], i: usize, group: &mut [u8]) {
    for (b, x) in blocks.iter().enumerate() {
        let sb = &mut group[b * Q3K_SB..(b + 1) * Q3K_SB];
        put_all(sb, i, &x.qs);
        put_all(&mut sb[1024..], i, &x.hmask);
        let sc: [u8; 16] = std::array::from_fn(|j| (x.scale(j) as i8 - 32) as u8);
        put_all(&mut sb[1536..], i, &sc);
        sb[1792 + 2 * i..1792 + 2 * i + 2].copy_from_slice(&x.d);
    }
}

/// Row `i`'s Q2_K blocks into its group: the quants (16 chunks, `qs`),
/// the scale bytes (4 chunks), the f16 `d`s and `dmin`s.
pub(crate) fn pack_row_q2_k(blocks: &[BlockQ2_K], i: usize, group: &mut [u8]) {
    for (b, x) in blocks.iter().enumerate() {
        let sb = &mut group[b * Q2K_SB..(b + 1) * Q2K_SB];
        put_all(sb, i, &x.qs);
        put_all(&mut sb[1024..], i, &x.scales);
        sb[1280 + 2 * i..1280 + 2 * i + 2].copy_from_slice(&x.d);
        sb[1312 + 2 * i..1312 + 2 * i + 2].copy_from_slice(&x.dmin);
    }
}

/// Row `i`'s Q6_K blocks into its group.
pub(crate) fn pack_row_q6_k(blocks: &[BlockQ6_K], i: usize, group: &mut [u8]) {
    for (b, x) in blocks.iter().enumerate() {
        let sb = &mut group[b * Q6K_SB..(b + 1) * Q6K_SB];
        put_all(sb, i, &x.ql);
        put_all(&mut sb[2048..], i, &x.qh);
        let sc: &[u8] = bytemuck::cast_slice(&x.scales);
        put_all(&mut sb[3072..], i, sc);
        sb[3328 + 2 * i..3328 + 2 * i + 2].copy_from_slice(&x.d);
    }
}

/// Q5_0's high bits rearranged: bit 8b + s of the result is bit
/// `16 (s % 2) + 4 (s / 2) + b` of `qh`. Each result bit is one bit of `qh`,
/// so the word is the OR of its four bytes' images, looked up in
/// [`Q5_0_HIGH`]: a one-token run of llama.cpp's SmolLM2 Q4_K_M (mostly Q5_0)
/// spent 27% of its instructions in the bit-by-bit loop
/// ([`q5_0_high_word_bits`], which builds the tables).
#[inline]
pub(crate) fn q5_0_high_word(qh: u32) -> u32 {
    let [b0, b1, b2, b3] = qh.to_le_bytes();
    Q5_0_HIGH[0][b0 as usize]
        | Q5_0_HIGH[1][b1 as usize]
        | Q5_0_HIGH[2][b2 as usize]
        | Q5_0_HIGH[3][b3 as usize]
}

/// [`q5_0_high_word`] a bit at a time: the definition.
pub(crate) const fn q5_0_high_word_bits(qh: u32) -> u32 {
    let mut w = 0u32;
    let mut s = 0;
    while s < 8 {
        let mut b = 0;
        while b < 4 {
            let e = 16 * (s % 2) + 4 * (s / 2) + b;
            w |= ((qh >> e) & 1) << (8 * b + s);
            b += 1;
        }
        s += 1;
    }
    w
}

/// `Q5_0_HIGH[i][v]`: [`q5_0_high_word_bits`] of byte `i` of `qh` being `v`, the others 0.
static Q5_0_HIGH: [[u32; 256]; 4] = {
    let mut t = [[0u32; 256]; 4];
    let mut i = 0;
    while i < 4 {
        let mut v = 0;
        while v < 256 {
            t[i][v] = q5_0_high_word_bits((v as u32) << (8 * i));
            v += 1;
        }
        i += 1;
    }
    t
};

/// Bytes of a Q5_0 (`MIN` false) or Q5_1 unit: two blocks.
#[inline(always)]
pub(crate) const fn q5_unit<const MIN: bool>() -> usize {
    if MIN {
        Q5_1_UNIT
    } else {
        Q5_0_UNIT
    }
}

/// Where block `b`'s nibbles, high-bit word and scale start in a Q5_0 (or,
/// `MIN`, Q5_1) group; Q5_1's minimums are 64 bytes after its scale.
#[inline(always)]
pub(crate) const fn q5_at<const MIN: bool>(b: usize) -> (usize, usize, usize) {
    let (u, i) = (b / 2, b % 2);
    let unit = u * q5_unit::<MIN>();
    (unit + 256 * i, unit + 512 + 64 * i, unit + 640 + 32 * i)
}

/// Row `i`'s Q5_0 blocks into its group.
pub(crate) fn pack_row_q5_0(blocks: &[BlockQ5_0], i: usize, group: &mut [u8]) {
    for (b, x) in blocks.iter().enumerate() {
        let (qo, ho, so) = q5_at::<false>(b);
        put_all(&mut group[qo..], i, &x.qs);
        let w = q5_0_high_word(u32::from_le_bytes(x.qh));
        put(&mut group[ho..], 0, i, &w.to_le_bytes());
        group[so + 2 * i..so + 2 * i + 2].copy_from_slice(&x.d);
    }
}

/// Row `i`'s Q5_1 blocks into its group: Q5_0's unit with both blocks' f16
/// minimums after their scales.
pub(crate) fn pack_row_q5_1(blocks: &[BlockQ5_1], i: usize, group: &mut [u8]) {
    for (b, x) in blocks.iter().enumerate() {
        let (qo, ho, so) = q5_at::<true>(b);
        put_all(&mut group[qo..], i, &x.qs);
        let w = q5_0_high_word(u32::from_le_bytes(x.qh));
        put(&mut group[ho..], 0, i, &w.to_le_bytes());
        group[so + 2 * i..so + 2 * i + 2].copy_from_slice(&x.d);
        group[so + 64 + 2 * i..so + 64 + 2 * i + 2].copy_from_slice(&x.m);
    }
}

// ------------------------------------------------------------------ lanes

/// i32 lanes, one per weight row, and their f32 twins. Every method is
/// `unsafe` and `#[inline(always)]`: the SIMD ones may only run on a CPU with
/// their features, inside the `#[target_feature]` entry points. Loads read
/// `4 * ROWS` bytes (`2 * ROWS` for f16).
pub(crate) trait RowLanes: Copy {
    /// Rows per vector: 16 (a whole group) or 8 (half a group).
    const ROWS: usize;
    type F: Copy;
    unsafe fn load(p: *const u8) -> Self;
    unsafe fn splat(v: i32) -> Self;
    unsafe fn and(self, o: Self) -> Self;
    unsafe fn or(self, o: Self) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn mullo(self, o: Self) -> Self;
    unsafe fn shr(self, n: u32) -> Self;
    unsafe fn shl(self, n: u32) -> Self;
    /// Arithmetic shift right.
    unsafe fn sra(self, n: u32) -> Self;
    /// `self` plus, per lane, the dot of its 4 bytes of `u` (unsigned, at
    /// most 63) with the 4 bytes of `y` (signed). Exact.
    unsafe fn dot4(self, u: Self, y: i32) -> Self;
    /// `self` plus, per lane, `lo16(u) * lo16(p) + hi16(u) * hi16(p)` (i16).
    unsafe fn madd(self, u: Self, p: i32) -> Self;
    /// Whether the bodies call the sub-block dots below rather than chains
    /// of `dot4`: true where there is no 4-byte dot instruction, so that
    /// byte products are best summed in i16 (AVX2, AVX-512 without VNNI).
    /// Elsewhere the bodies keep their `dot4` chains, whose machine code
    /// was measured (Zen 4).
    const I16_SUMS: bool = false;
    /// Per lane, as two i16: `u0 y0 + u1 y1` and `u2 y2 + u3 y3` of its 4
    /// bytes of `u` (unsigned) and the 4 bytes of `y` (signed), as
    /// `vpmaddubsw` (which saturates; the callers' bounds keep it exact).
    /// Only the [`RowLanes::I16_SUMS`] bodies use the i16 methods.
    unsafe fn dot4_16(u: Self, y: i32) -> Self;
    /// Per lane, both i16 halves added (wrapping).
    unsafe fn add16(self, o: Self) -> Self;
    /// Per lane, `lo16(self) * lo16(s) + hi16(self) * hi16(s)` as an i32.
    unsafe fn madd16(self, s: Self) -> Self;
    unsafe fn cvt(self) -> Self::F;
    unsafe fn load_f16(p: *const u8) -> Self::F;
    unsafe fn fsplat(v: f32) -> Self::F;
    unsafe fn fzero() -> Self::F;
    unsafe fn fmul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn fadd(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn fsub(a: Self::F, b: Self::F) -> Self::F;
    /// Stores the first `n` lanes (n <= ROWS) at `p`.
    unsafe fn store(v: Self::F, p: *mut f32, n: usize);
    /// Hint that the 64 bytes at `p` are read soon (any address).
    unsafe fn prefetch(p: *const u8);
    /// How far ahead a decode tile (one token) prefetches whole super-blocks
    /// into L2, line by line, in Q6_K super-blocks' worth of bytes; 0 leaves
    /// it to the hardware (and one line).
    const PF_DECODE: usize = 0;
    /// Hint that the 64 bytes at `p` are read soon, into L2 (any address).
    unsafe fn prefetch_l2(_p: *const u8) {}
}

/// i16 sums of `dot4_16` over `u[i]`, `y[i]`, in a tree (`N` a power of
/// two); the caller keeps each sum within i16.
#[inline(always)]
unsafe fn sum16<V: RowLanes, const N: usize>(u: &[V], y: &[i32]) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe {
        let mut p: [V; N] = std::array::from_fn(|i| V::dot4_16(u[i], y[i]));
        let mut n = N;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                p[i] = p[2 * i].add16(p[2 * i + 1]);
            }
        }
        p[0]
    }
}

/// Per lane, `scale` (at most 63) times the dot of the 32 bytes of
/// `u[0..8]` (unsigned, at most 15) with the 4 bytes of `y[i]` each: one
/// Q4_K sub-block on an [`RowLanes::I16_SUMS`] path. The byte products add
/// up in i16 (at most 8 x 2 x 15 x 128 = 30720), and one `vpmaddwd` with
/// the scale in both halves widens and scales them: 9 multiplies where
/// `dot4` chains take 16 and a `vpmulld`. Exact.
#[inline(always)]
unsafe fn q4_k_sub<V: RowLanes>(u: &[V; 8], y: &[i32; 8], scale: V) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe { sum16::<V, 8>(u, y).madd16(scale.or(scale.shl(16))) }
}

/// As [`q4_k_sub`] for a Q5_K sub-block (quants at most 31): the byte
/// products add up in i16 four at a time (at most 4 x 2 x 31 x 128 =
/// 31744), each half scaled and widened by its own `vpmaddwd`. Exact.
#[inline(always)]
unsafe fn q5_k_sub<V: RowLanes>(u: &[V; 8], y: &[i32; 8], scale: V) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe {
        let s2 = scale.or(scale.shl(16));
        let s0 = sum16::<V, 4>(&u[..4], &y[..4]).madd16(s2);
        s0.add(sum16::<V, 4>(&u[4..], &y[4..]).madd16(s2))
    }
}

/// Per lane, `bias` plus the dot of the 32 bytes of `u[0..8]` (unsigned, at
/// most 31) with the 4 bytes of `y[i]` each: one Q5_0 block on an
/// [`RowLanes::I16_SUMS`] path, in i16 four products at a time (at most
/// 4 x 2 x 31 x 128 = 31744), widened by two `vpmaddwd`. Exact.
#[inline(always)]
unsafe fn q5_0_block<V: RowLanes>(u: &[V; 8], y: &[i32; 8], bias: i32) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe {
        let ones = V::splat(0x0001_0001);
        let s0 = sum16::<V, 4>(&u[..4], &y[..4]).madd16(ones);
        let s1 = sum16::<V, 4>(&u[4..], &y[4..]).madd16(ones);
        s0.add(s1).add(V::splat(bias))
    }
}

/// Per lane, `scale` (an i8) times `bias` plus the dot of the 16 bytes of
/// `u[0..4]` (unsigned, at most `qmax`: 63) with the 4 bytes of `y[i]` each: one
/// Q6_K sub-block on an [`RowLanes::I16_SUMS`] path, in i16 two products
/// at a time (at most 2 x 2 x 63 x 128 = 32256), scaled and widened by
/// `vpmaddwd`; a Q3_K or Q2_K one (`qmax` 7 or 3) in one i16 sum. Exact.
#[inline(always)]
unsafe fn q6_k_sub<V: RowLanes>(u: &[V; 4], y: &[i32; 4], bias: i32, scale: V, qmax: i32) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe {
        // The i8 scale, sign-extended, in both i16 halves.
        let sc = scale.and(V::splat(0xFFFF)).or(scale.shl(16));
        let bias = V::splat(bias).mullo(scale);
        if 4 * 2 * qmax * 128 <= i16::MAX as i32 {
            // Q3_K and Q2_K (quants at most 7): all four products in one i16 sum
            // (at most 4 x 2 x 7 x 128 = 7168), one `vpmaddwd`.
            return sum16::<V, 4>(u, y).madd16(sc).add(bias);
        }
        let s0 = sum16::<V, 2>(&u[..2], &y[..2]).madd16(sc);
        let s1 = sum16::<V, 2>(&u[2..], &y[2..]).madd16(sc);
        s0.add(s1).add(bias)
    }
}

/// For a decode tile (`C == 1`) on lanes with [`RowLanes::PF_DECODE`]:
/// quarter `q` of a super-block prefetches its quarter of the lines of the
/// super-block about `PF_DECODE` Q6_K super-blocks' bytes on, into L2, so the
/// misses go out as the work goes on rather than in one burst. A Q6_K
/// super-block is read in jumps (scales, then quants of both halves, then high
/// bits) that the hardware streams did not follow. One thread, 32768 x 4096
/// (from memory), Zen 4: one line prefetched, 9.5 GiB/s; the whole next
/// super-block at once, 12.4; spread over the quarters 1 / 2 / 3 / 4
/// super-blocks ahead, 14.4 / 20.9-21.8 / 18.9 / 20.1 (Q4_K: 25-30 GiB/s).
/// The distance is in bytes, not super-blocks: two of Q2_K's smaller ones
/// (1344 bytes against 3392) left it 13-16 GiB/s, Q3_K 15-16; six and four
/// ahead, 21-28 and 22-25.
#[inline(always)]
unsafe fn prefetch_part<V: RowLanes, const C: usize>(sb: *const u8, sb_bytes: usize, q: usize) {
    if C == 1 && V::PF_DECODE > 0 {
        let ahead = (V::PF_DECODE * Q6K_SB).div_ceil(sb_bytes);
        let next = sb.wrapping_add(ahead * sb_bytes);
        let lines = sb_bytes.div_ceil(64);
        let (l0, l1) = (q * lines / 4, (q + 1) * lines / 4);
        for l in l0..l1 {
            // SAFETY: a prefetch is a hint; wrapping_add: the address may lie past the matrix.
            unsafe { V::prefetch_l2(next.wrapping_add(64 * l)) };
        }
    } else if q == 0 {
        // SAFETY: as above.
        unsafe { V::prefetch(sb.wrapping_add(2 * sb_bytes)) };
    }
}

/// The portable twin: 16 lanes in arrays, plain Rust (no FMA, as the SIMD
/// kernels here use none).
#[derive(Clone, Copy)]
pub(crate) struct Portable([i32; 16]);

#[derive(Clone, Copy)]
pub(crate) struct PortableF([f32; 16]);

impl Portable {
    #[inline(always)]
    fn map2(self, o: Self, f: impl Fn(i32, i32) -> i32) -> Self {
        Portable(std::array::from_fn(|i| f(self.0[i], o.0[i])))
    }
}

impl RowLanes for Portable {
    const ROWS: usize = 16;
    type F = PortableF;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 64 readable bytes at p.
        let b = unsafe { (p as *const [u8; 64]).read_unaligned() };
        Portable(std::array::from_fn(|i| {
            i32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
        }))
    }
    #[inline(always)]
    unsafe fn splat(v: i32) -> Self {
        Portable([v; 16])
    }
    #[inline(always)]
    unsafe fn and(self, o: Self) -> Self {
        self.map2(o, |a, b| a & b)
    }
    #[inline(always)]
    unsafe fn or(self, o: Self) -> Self {
        self.map2(o, |a, b| a | b)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        self.map2(o, i32::wrapping_add)
    }
    #[inline(always)]
    unsafe fn mullo(self, o: Self) -> Self {
        self.map2(o, i32::wrapping_mul)
    }
    #[inline(always)]
    unsafe fn shr(self, n: u32) -> Self {
        Portable(self.0.map(|a| ((a as u32) >> n) as i32))
    }
    #[inline(always)]
    unsafe fn shl(self, n: u32) -> Self {
        Portable(self.0.map(|a| ((a as u32) << n) as i32))
    }
    #[inline(always)]
    unsafe fn sra(self, n: u32) -> Self {
        Portable(self.0.map(|a| a >> n))
    }
    #[inline(always)]
    unsafe fn dot4(self, u: Self, y: i32) -> Self {
        let y = y.to_le_bytes();
        Portable(std::array::from_fn(|i| {
            let u = u.0[i].to_le_bytes();
            let s: i32 = (0..4).map(|k| u[k] as i32 * y[k] as i8 as i32).sum();
            self.0[i] + s
        }))
    }
    #[inline(always)]
    unsafe fn madd(self, u: Self, p: i32) -> Self {
        let (plo, phi) = (p as i16 as i32, (p >> 16) as i16 as i32);
        Portable(std::array::from_fn(|i| {
            let (lo, hi) = (u.0[i] as i16 as i32, (u.0[i] >> 16) as i16 as i32);
            self.0[i] + lo * plo + hi * phi
        }))
    }
    #[inline(always)]
    unsafe fn dot4_16(u: Self, y: i32) -> Self {
        let y = y.to_le_bytes();
        Portable(u.0.map(|u| {
            let u = u.to_le_bytes();
            let pair = |k: usize| {
                let s = u[k] as i32 * y[k] as i8 as i32 + u[k + 1] as i32 * y[k + 1] as i8 as i32;
                s.clamp(i16::MIN as i32, i16::MAX as i32) as u16 as u32
            };
            (pair(0) | pair(2) << 16) as i32
        }))
    }
    #[inline(always)]
    unsafe fn add16(self, o: Self) -> Self {
        self.map2(o, |a, b| {
            let lo = (a as u16).wrapping_add(b as u16) as u32;
            let hi = ((a >> 16) as u16).wrapping_add((b >> 16) as u16) as u32;
            (lo | hi << 16) as i32
        })
    }
    #[inline(always)]
    unsafe fn madd16(self, s: Self) -> Self {
        self.map2(s, |a, b| {
            let (alo, ahi) = (a as i16 as i32, (a >> 16) as i16 as i32);
            let (blo, bhi) = (b as i16 as i32, (b >> 16) as i16 as i32);
            alo * blo + ahi * bhi
        })
    }
    #[inline(always)]
    unsafe fn cvt(self) -> PortableF {
        PortableF(self.0.map(|a| a as f32))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> PortableF {
        // SAFETY: the caller guarantees 32 readable bytes at p.
        let b = unsafe { (p as *const [u8; 32]).read_unaligned() };
        PortableF(std::array::from_fn(|i| {
            crate::quant::float::f16_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]))
        }))
    }
    #[inline(always)]
    unsafe fn fsplat(v: f32) -> PortableF {
        PortableF([v; 16])
    }
    #[inline(always)]
    unsafe fn fzero() -> PortableF {
        PortableF([0.0; 16])
    }
    #[inline(always)]
    unsafe fn fmul(a: PortableF, b: PortableF) -> PortableF {
        PortableF(std::array::from_fn(|i| a.0[i] * b.0[i]))
    }
    #[inline(always)]
    unsafe fn fadd(a: PortableF, b: PortableF) -> PortableF {
        PortableF(std::array::from_fn(|i| a.0[i] + b.0[i]))
    }
    #[inline(always)]
    unsafe fn fsub(a: PortableF, b: PortableF) -> PortableF {
        PortableF(std::array::from_fn(|i| a.0[i] - b.0[i]))
    }
    #[inline(always)]
    unsafe fn store(v: PortableF, p: *mut f32, n: usize) {
        for (i, &x) in v.0[..n].iter().enumerate() {
            // SAFETY: the caller guarantees n writable f32s at p.
            unsafe { *p.add(i) = x };
        }
    }
    #[inline(always)]
    unsafe fn prefetch(_: *const u8) {}
}

// ------------------------------------------------------------------ bodies

/// A packed format: the body of one block of a tile.
pub(crate) trait PackedFmt {
    type Act: Copy;
    /// Whether a one-token tile on 8-row lanes walks both halves of a group
    /// block by block ([`tile_one`]) rather than one half after the other.
    const ONE_PASS: bool;
    /// Accumulates block `b` of the tile (`g` the group, `h` which vector
    /// of the group's lanes: 0 for 16-row vectors, 0 or 1 for 8-row ones)
    /// into `acc[t]` for `C` tokens (`act[t * k + b]`).
    ///
    /// # Safety
    /// `V`'s features; `g` holds the group's `k` blocks; `act` `C * k`.
    unsafe fn block<V: RowLanes, const C: usize>(
        g: *const u8,
        h: usize,
        b: usize,
        k: usize,
        act: *const Self::Act,
        acc: &mut [V::F; C],
    );
}

pub(crate) struct Q4K;
pub(crate) struct Q5K;
pub(crate) struct Q3K;
pub(crate) struct Q2K;
pub(crate) struct Q6K;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;

/// Sub-block `j`'s byte of the 4-byte lanes `v` (bytes j % 4), zero-extended.
#[inline(always)]
unsafe fn byte_lane<V: RowLanes>(v: V, j: usize) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe { v.shr(8 * (j as u32 % 4)).and(V::splat(0xFF)) }
}

impl PackedFmt for Q4K {
    type Act = ActBlockK;
    const ONE_PASS: bool = true;
    #[inline(always)]
    unsafe fn block<V: RowLanes, const C: usize>(
        g: *const u8,
        h: usize,
        b: usize,
        k: usize,
        act: *const ActBlockK,
        acc: &mut [V::F; C],
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { k4_block::<V, C, false>(g, h, b, k, act, acc) }
    }
}

impl PackedFmt for Q5K {
    type Act = ActBlockK;
    const ONE_PASS: bool = true;
    #[inline(always)]
    unsafe fn block<V: RowLanes, const C: usize>(
        g: *const u8,
        h: usize,
        b: usize,
        k: usize,
        act: *const ActBlockK,
        acc: &mut [V::F; C],
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { k4_block::<V, C, true>(g, h, b, k, act, acc) }
    }
}

/// `v` shifted left by `s` bits (right by `-s` when negative), per 32-bit lane.
#[inline(always)]
unsafe fn shift<V: RowLanes>(v: V, s: i32) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe {
        if s >= 0 {
            v.shl(s as u32)
        } else {
            v.shr(s.unsigned_abs())
        }
    }
}

/// Whether a `C`-token tile on lanes `V` runs one sub-block's quants at a time over every
/// token ([`k4_sub`], [`k6_sub`]) rather than a quarter's at once: prompt tiles on
/// [`RowLanes::I16_SUMS`] lanes of 8 rows (AVX2), whose 16 registers cannot hold a
/// quarter's 16 quant vectors beside the token sums. Decode tiles keep the quarter
/// order, which decoded a little faster from L2; the VNNI and 512-bit paths have 32
/// registers or no i16 sums.
#[inline(always)]
const fn sub_at_a_time<V: RowLanes, const C: usize>() -> bool {
    V::I16_SUMS && V::ROWS == 8 && C > 1
}

/// The low (`HI` 0: sub-block 2p) or high (`HI` 1: 2p + 1) nibbles of quarter `p` of a
/// Q4_K super-block for every token, on [`RowLanes::I16_SUMS`] lanes: each token's sum
/// times `sc`, added to `isum[t]`. `q`: `(sb, h, p, act, k, b)`.
#[inline(always)]
unsafe fn k4_sub<V: RowLanes, const C: usize, const HI: usize>(
    (sb, h, p, act, k, b): (*const u8, usize, usize, *const ActBlockK, usize, usize),
    sc: V,
    isum: &mut [V; C],
) {
    // SAFETY (whole body): as for k4_block, whose arguments these are.
    unsafe {
        let lane = |c: usize| sb.add(64 * c + 4 * V::ROWS * h);
        let m4 = V::splat(0x0F0F_0F0F);
        let mut u = [V::splat(0); 8];
        for (c, uc) in u.iter_mut().enumerate() {
            let q = V::load(lane(8 * p + c));
            *uc = if HI == 0 { q } else { q.shr(4) }.and(m4);
        }
        for (t, isum_t) in isum.iter_mut().enumerate() {
            let a = &*act.add(t * k + b);
            let e = 64 * p + 32 * HI;
            let y = [
                a.group(e),
                a.group(e + 4),
                a.group(e + 8),
                a.group(e + 12),
                a.group(e + 16),
                a.group(e + 20),
                a.group(e + 24),
                a.group(e + 28),
            ];
            *isum_t = isum_t.add(q4_k_sub(&u, &y, sc));
        }
    }
}

/// One super-block of Q4_K (`FIVE` false) or Q5_K (`FIVE`: Q4_K's body with
/// each quant's fifth bit or-ed in from the `qh` chunks): the same scales,
/// minimums and f32 side, so both are their twins' `vec_dot_*_sb` bit for bit.
#[inline(always)]
unsafe fn k4_block<V: RowLanes, const C: usize, const FIVE: bool>(
    g: *const u8,
    h: usize,
    b: usize,
    k: usize,
    act: *const ActBlockK,
    acc: &mut [V::F; C],
) {
    let sb_bytes = if FIVE { Q5K_SB } else { Q4K_SB };
    // Chunks: 32 of quants, (Q5_K) 8 of fifth bits, 3 of scales; then the f16 d and dmin.
    let sc_chunk = if FIVE { 40 } else { 32 };
    let d_at = 64 * (sc_chunk + 3);
    // SAFETY (whole body): offsets stay inside super-block b of the group
    // and tokens below C, as the caller guarantees.
    unsafe {
        let sb = g.add(b * sb_bytes);
        let lane = |c: usize| sb.add(64 * c + 4 * V::ROWS * h);
        // The 6-bit scales and minimums, four per vector of bytes.
        let (s0, s1, s2) = (
            V::load(lane(sc_chunk)),
            V::load(lane(sc_chunk + 1)),
            V::load(lane(sc_chunk + 2)),
        );
        let m6 = V::splat(0x3F3F_3F3F);
        let sc_lo = s0.and(m6);
        let m_lo = s1.and(m6);
        let top = V::splat(0x3030_3030);
        let sc_hi = s2.and(V::splat(0x0F0F_0F0F)).or(s0.shr(2).and(top));
        let m_hi = s2.shr(4).and(V::splat(0x0F0F_0F0F)).or(s1.shr(2).and(top));
        let mut isum = [V::splat(0); C];
        let m4 = V::splat(0x0F0F_0F0F);
        let bit4 = V::splat(0x1010_1010);
        // Q4_K is read front to back. On 16-row lanes (Zen 4) the hardware streams follow
        // it with one line prefetched ahead: the spread prefetch of Q6_K measured no better
        // there. Q5_K is not: each quarter reads its quants and then the fifth bits at
        // the end of the super-block. The one-token tile on 8-row lanes walks both halves
        // of each super-block in one pass ([`tile_one`]); there the spread prefetch took
        // one thread's decode from memory from 0.77x to 1.0x of packed Q4_0's bytes/s
        // (Zen 3).
        let spread = C == 1 && (V::ROWS < 16 || FIVE);
        if !spread {
            V::prefetch(sb.add(sb_bytes * 2));
        }
        for p in 0..4 {
            if spread && h == 0 {
                prefetch_part::<V, C>(sb, sb_bytes, p);
            }
            let sc = if p < 2 { sc_lo } else { sc_hi };
            let (sa, sb_) = (byte_lane(sc, 2 * p), byte_lane(sc, 2 * p + 1));
            if sub_at_a_time::<V, C>() && !FIVE {
                // The low nibbles' sub-block for every token, then the high nibbles', 8
                // quant vectors live instead of 16. Per token the same sums in the same
                // order. Q5_K, which would read and shift its fifth bits twice, ran
                // slower so (Llama-3.2-1B Q5_K_M pp128, 8 alternating rounds: medians
                // 75.0 -> 71.4 t/s).
                let q = (sb, h, p, act, k, b);
                k4_sub::<V, C, 0>(q, sa, &mut isum);
                k4_sub::<V, C, 1>(q, sb_, &mut isum);
                continue;
            }
            let mut lo = [V::splat(0); 8];
            let mut hi = [V::splat(0); 8];
            for c in 0..8 {
                let q = V::load(lane(8 * p + c));
                lo[c] = q.and(m4);
                hi[c] = q.shr(4).and(m4);
                if FIVE {
                    // Bit 2p of a qh byte is its low nibble's fifth bit, 2p + 1 the high's:
                    // each moved to bit 4 of its byte (the shifts never cross into the
                    // bit 4 of another byte). Right by 2p first, then left by a constant:
                    // the quarters' loop is not unrolled, and one shift by 4 - 2p
                    // branched on its sign at run time.
                    let qh = V::load(lane(32 + c)).shr(2 * p as u32);
                    lo[c] = lo[c].or(qh.shl(4).and(bit4));
                    hi[c] = hi[c].or(qh.shl(3).and(bit4));
                }
            }
            for (t, isum_t) in isum.iter_mut().enumerate() {
                let a = &*act.add(t * k + b);
                if V::I16_SUMS {
                    // Chunk c of the quarter holds elements 4c.. of both sub-blocks.
                    let y_lo: [i32; 8] = std::array::from_fn(|c| a.group(64 * p + 4 * c));
                    let y_hi: [i32; 8] = std::array::from_fn(|c| a.group(64 * p + 32 + 4 * c));
                    let (x0, x1) = if FIVE {
                        (q5_k_sub(&lo, &y_lo, sa), q5_k_sub(&hi, &y_hi, sb_))
                    } else {
                        (q4_k_sub(&lo, &y_lo, sa), q4_k_sub(&hi, &y_hi, sb_))
                    };
                    *isum_t = isum_t.add(x0).add(x1);
                    continue;
                }
                // Four chains of four: exact integer sums, so the split changes no bit,
                // and a decode tile waits on half as long a chain of vpdpbusd latencies.
                let mut x = [V::splat(0); 4];
                for c in 0..4 {
                    x[0] = x[0].dot4(lo[c], a.group(64 * p + 4 * c));
                    x[1] = x[1].dot4(hi[c], a.group(64 * p + 32 + 4 * c));
                    x[2] = x[2].dot4(lo[c + 4], a.group(64 * p + 16 + 4 * c));
                    x[3] = x[3].dot4(hi[c + 4], a.group(64 * p + 48 + 4 * c));
                }
                let (x0, x1) = (x[0].add(x[2]), x[1].add(x[3]));
                *isum_t = isum_t.add(x0.mullo(sa)).add(x1.mullo(sb_));
            }
        }
        // Minimums as i16 pairs: (m0, m2), (m1, m3), (m4, m6), (m5, m7).
        let ff = V::splat(0x00FF_00FF);
        let mpairs = [
            m_lo.and(ff),
            m_lo.shr(8).and(ff),
            m_hi.and(ff),
            m_hi.shr(8).and(ff),
        ];
        let dx = V::load_f16(sb.add(d_at + 2 * V::ROWS * h));
        let dmx = V::load_f16(sb.add(d_at + 32 + 2 * V::ROWS * h));
        for t in 0..C {
            let a = &*act.add(t * k + b);
            let mut msum = V::splat(0);
            for (mp, &ap) in mpairs.iter().zip(&a.mp) {
                msum = msum.madd(*mp, ap);
            }
            let dy = V::fsplat(a.d);
            let t1 = V::fmul(V::fmul(dx, dy), isum[t].cvt());
            let t2 = V::fmul(V::fmul(dmx, dy), msum.cvt());
            acc[t] = V::fadd(acc[t], V::fsub(t1, t2));
        }
    }
}

/// What differs between the formats of sixteen sub-blocks of 16 values in
/// one element order (`qs`-style bytes of 128p + 32j + l in bit pairs 2j),
/// which [`k6_block`] runs: Q6_K, Q3_K and Q2_K.
pub(crate) trait Sixteen {
    /// Bytes of a super-block of a group.
    const SB: usize;
    /// The first of the 4 chunks of scale bytes (one per sub-block);
    /// the 16 f16 `d` follow them, then (Q2_K) 16 f16 `dmin`.
    const SC_CHUNK: usize;
    /// Whether sub-blocks have minimums (Q2_K: the high nibbles of the
    /// scale bytes, times `bsum_j`, subtracted with `dmin`).
    const MIN: bool;
    /// The largest stored quant (with its offset): Q6_K 63, Q3_K 7, Q2_K 3.
    const QMAX: i32;
    /// The quants of elements 128 half + 32j + 4c.. (c < 8) for j = 0..4,
    /// each stored with its offset (so unsigned); `lane(i)` is chunk i.
    unsafe fn quants<V: RowLanes>(lane: impl Fn(usize) -> V, half: usize, c: usize) -> [V; 4];
    /// Byte `byte` of the scale lanes `v` as the sub-block's scale.
    unsafe fn scale<V: RowLanes>(v: V, byte: u32) -> V;
    /// The start of a sub-block's integer sum from `c6 = -32 bsum_j`: the
    /// quants' offset taken back off, exactly.
    fn bias(c6: i32) -> i32;
}

/// An i8 scale byte, sign-extended.
#[inline(always)]
unsafe fn sext<V: RowLanes>(v: V, byte: u32) -> V {
    // SAFETY: V's features, as the caller guarantees.
    unsafe { v.shl(24 - 8 * byte).sra(24) }
}

impl Sixteen for Q6K {
    const SB: usize = Q6K_SB;
    const SC_CHUNK: usize = 48;
    const MIN: bool = false;
    const QMAX: i32 = 63;
    #[inline(always)]
    unsafe fn quants<V: RowLanes>(lane: impl Fn(usize) -> V, half: usize, c: usize) -> [V; 4] {
        // SAFETY: V's features, as the caller guarantees.
        unsafe {
            let (m4, m30) = (V::splat(0x0F0F_0F0F), V::splat(0x3030_3030));
            let qa = lane(16 * half + c);
            let qb = lane(16 * half + 8 + c);
            let qh = lane(32 + 8 * half + c);
            [
                qa.and(m4).or(qh.shl(4).and(m30)),
                qb.and(m4).or(qh.shl(2).and(m30)),
                qa.shr(4).and(m4).or(qh.and(m30)),
                qb.shr(4).and(m4).or(qh.shr(2).and(m30)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn scale<V: RowLanes>(v: V, byte: u32) -> V {
        // SAFETY: as above.
        unsafe { sext(v, byte) }
    }
    #[inline(always)]
    fn bias(c6: i32) -> i32 {
        c6
    }
}

impl Sixteen for Q3K {
    const SB: usize = Q3K_SB;
    const SC_CHUNK: usize = 24;
    const MIN: bool = false;
    const QMAX: i32 = 7;
    #[inline(always)]
    unsafe fn quants<V: RowLanes>(lane: impl Fn(usize) -> V, half: usize, c: usize) -> [V; 4] {
        // SAFETY: V's features, as the caller guarantees.
        unsafe {
            // Two bits of a qs byte per quarter; the third from bit 4 half + j of the
            // hmask byte, moved to bit 2 (never across bytes). The half's shift comes
            // first, so each j's shift has a direction known at compile time: the
            // halves' loop is not unrolled, and `shift(hm, 2 - 4 half - j)` branched
            // on its sign at run time.
            let (q, hm) = (lane(8 * half + c), lane(16 + c).shr(4 * half as u32));
            std::array::from_fn(|j| {
                let lo = q.shr(2 * j as u32).and(V::splat(0x0303_0303));
                lo.or(shift(hm, 2 - j as i32).and(V::splat(0x0404_0404)))
            })
        }
    }
    #[inline(always)]
    unsafe fn scale<V: RowLanes>(v: V, byte: u32) -> V {
        // SAFETY: as above.
        unsafe { sext(v, byte) }
    }
    #[inline(always)]
    fn bias(c6: i32) -> i32 {
        // -4 bsum: the quants are q + 4.
        c6 >> 3
    }
}

impl Sixteen for Q2K {
    const SB: usize = Q2K_SB;
    const SC_CHUNK: usize = 16;
    const MIN: bool = true;
    const QMAX: i32 = 3;
    #[inline(always)]
    unsafe fn quants<V: RowLanes>(lane: impl Fn(usize) -> V, half: usize, c: usize) -> [V; 4] {
        // SAFETY: V's features, as the caller guarantees.
        unsafe {
            let q = lane(8 * half + c);
            std::array::from_fn(|j| q.shr(2 * j as u32).and(V::splat(0x0303_0303)))
        }
    }
    #[inline(always)]
    unsafe fn scale<V: RowLanes>(v: V, byte: u32) -> V {
        // SAFETY: as above.
        unsafe { v.shr(8 * byte).and(V::splat(0x0F)) }
    }
    #[inline(always)]
    fn bias(_: i32) -> i32 {
        0
    }
}

impl<F: Sixteen> PackedFmt for F {
    type Act = ActBlockK;
    const ONE_PASS: bool = true;
    #[inline(always)]
    unsafe fn block<V: RowLanes, const C: usize>(
        g: *const u8,
        h: usize,
        b: usize,
        k: usize,
        act: *const ActBlockK,
        acc: &mut [V::F; C],
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { k6_block::<V, C, F>(g, h, b, k, act, acc) }
    }
}

/// Sub-block `8 half + 2Q + cg` of a [`Sixteen`] super-block for every token, on
/// [`RowLanes::I16_SUMS`] lanes: its four quant vectors (the quarter's chunks
/// `4cg..4cg + 4`), then per token its sum, started at the quants' offset times
/// -bsum and times `sc`, added to `isum[t]`. `Q` is a constant so that only
/// quarter Q's quants are computed. `q`: `(load, half, cg, act, k, b)`.
#[inline(always)]
#[allow(clippy::type_complexity)]
unsafe fn k6_sub<V: RowLanes, F: Sixteen, const C: usize, const Q: usize>(
    (load, half, cg, act, k, b): (
        impl Fn(usize) -> V + Copy,
        usize,
        usize,
        *const ActBlockK,
        usize,
        usize,
    ),
    sc: V,
    isum: &mut [V; C],
) {
    // SAFETY (whole body): as for k6_block, whose arguments these are.
    unsafe {
        let u = [
            F::quants(load, half, 4 * cg)[Q],
            F::quants(load, half, 4 * cg + 1)[Q],
            F::quants(load, half, 4 * cg + 2)[Q],
            F::quants(load, half, 4 * cg + 3)[Q],
        ];
        let e = 128 * half + 16 * cg + 32 * Q;
        for (t, isum_t) in isum.iter_mut().enumerate() {
            let a = &*act.add(t * k + b);
            let bias = F::bias(a.c6[8 * half + 2 * Q + cg]);
            let y = [a.group(e), a.group(e + 4), a.group(e + 8), a.group(e + 12)];
            *isum_t = isum_t.add(q6_k_sub(&u, &y, bias, sc, F::QMAX));
        }
    }
}

/// One super-block of a [`Sixteen`] format. Integer sums as ggml's; the
/// f32 side `(d_x d_y) isum`, less `(dmin_x d_y) msum` where there are
/// minimums, as the twins' `vec_dot_*_sb` (Q2_K's generic order).
#[inline(always)]
unsafe fn k6_block<V: RowLanes, const C: usize, F: Sixteen>(
    g: *const u8,
    h: usize,
    b: usize,
    k: usize,
    act: *const ActBlockK,
    acc: &mut [V::F; C],
) {
    // SAFETY (whole body): as for Q4_K.
    unsafe {
        let sb = g.add(b * F::SB);
        let lane = |c: usize| sb.add(64 * c + 4 * V::ROWS * h);
        let load = |c: usize| V::load(lane(c));
        let mut isum = [V::splat(0); C];
        for half in 0..2 {
            for cg in 0..2 {
                // The one-token tile's second half reads lines the first prefetched.
                if C > 1 || h == 0 {
                    prefetch_part::<V, C>(sb, F::SB, 2 * half + cg);
                }
                // The scales of sub-blocks 8 half + cg + {0, 2, 4, 6}: bytes cg, cg + 2
                // of scale chunks 2 half and 2 half + 1.
                let (lo, hi) = (
                    load(F::SC_CHUNK + 2 * half),
                    load(F::SC_CHUNK + 1 + 2 * half),
                );
                if sub_at_a_time::<V, C>() {
                    // One sub-block's four quant vectors at a time, not all four's 16 (one
                    // thread, pp64 against Q4_0, Zen 3, six alternating runs: Q6_K
                    // 0.53-0.58x -> 0.59-0.66x, Q3_K 0.56-0.60x -> 0.61-0.67x).
                    let q = (load, half, cg, act, k, b);
                    k6_sub::<V, F, C, 0>(q, F::scale(lo, cg as u32), &mut isum);
                    k6_sub::<V, F, C, 1>(q, F::scale(lo, cg as u32 + 2), &mut isum);
                    k6_sub::<V, F, C, 2>(q, F::scale(hi, cg as u32), &mut isum);
                    k6_sub::<V, F, C, 3>(q, F::scale(hi, cg as u32 + 2), &mut isum);
                    continue;
                }
                // Quarter q of chunks c = 4cg..4cg + 4 is sub-block 8 half + 2q + cg:
                // its 16 quant vectors first (shared by the tokens), then per token four
                // sums, each starting at the quants' offset times -bsum.
                let mut w = [[V::splat(0); 4]; 4];
                for (i, wi) in w.iter_mut().enumerate() {
                    *wi = F::quants(load, half, 4 * cg + i);
                }
                let sc = [
                    F::scale(lo, cg as u32),
                    F::scale(lo, cg as u32 + 2),
                    F::scale(hi, cg as u32),
                    F::scale(hi, cg as u32 + 2),
                ];
                for (t, isum_t) in isum.iter_mut().enumerate() {
                    let a = &*act.add(t * k + b);
                    let e0 = 128 * half + 16 * cg;
                    for (q, scq) in sc.iter().enumerate() {
                        let bias = F::bias(a.c6[8 * half + 2 * q + cg]);
                        if V::I16_SUMS {
                            let u = [w[0][q], w[1][q], w[2][q], w[3][q]];
                            let y: [i32; 4] = std::array::from_fn(|i| a.group(e0 + 32 * q + 4 * i));
                            *isum_t = isum_t.add(q6_k_sub(&u, &y, bias, *scq, F::QMAX));
                            continue;
                        }
                        let mut s = V::splat(bias);
                        for (i, wi) in w.iter().enumerate() {
                            s = s.dot4(wi[q], a.group(e0 + 32 * q + 4 * i));
                        }
                        *isum_t = isum_t.add(s.mullo(*scq));
                    }
                }
            }
        }
        let d_at = 64 * (F::SC_CHUNK + 4) + 2 * V::ROWS * h;
        let dx = V::load_f16(sb.add(d_at));
        // Q2_K: the minimums (high nibbles) as i16 pairs (m_4v, m_4v+2), (m_4v+1, m_4v+3).
        let mut mpairs = [V::splat(0); 8];
        if F::MIN {
            let (m4, ff) = (V::splat(0x0F0F_0F0F), V::splat(0x00FF_00FF));
            for v in 0..4 {
                let m = load(F::SC_CHUNK + v).shr(4).and(m4);
                mpairs[2 * v] = m.and(ff);
                mpairs[2 * v + 1] = m.shr(8).and(ff);
            }
        }
        for (t, acc_t) in acc.iter_mut().enumerate() {
            let a = &*act.add(t * k + b);
            let dy = V::fsplat(a.d);
            let t1 = V::fmul(V::fmul(dx, dy), isum[t].cvt());
            if F::MIN {
                let mut msum = V::splat(0);
                for (mp, &ap) in mpairs.iter().zip(&a.mp16) {
                    msum = msum.madd(*mp, ap);
                }
                let dmx = V::load_f16(sb.add(d_at + 32));
                let t2 = V::fmul(V::fmul(dmx, dy), msum.cvt());
                *acc_t = V::fadd(*acc_t, V::fsub(t1, t2));
            } else {
                *acc_t = V::fadd(*acc_t, t1);
            }
        }
    }
}

impl PackedFmt for Q5_0 {
    type Act = super::ActBlock;
    const ONE_PASS: bool = false;
    #[inline(always)]
    unsafe fn block<V: RowLanes, const C: usize>(
        g: *const u8,
        h: usize,
        b: usize,
        k: usize,
        act: *const super::ActBlock,
        acc: &mut [V::F; C],
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { q5_block::<V, C, false>(g, h, b, k, act, acc) }
    }
}

impl PackedFmt for Q5_1 {
    type Act = super::ActBlock;
    const ONE_PASS: bool = false;
    #[inline(always)]
    unsafe fn block<V: RowLanes, const C: usize>(
        g: *const u8,
        h: usize,
        b: usize,
        k: usize,
        act: *const super::ActBlock,
        acc: &mut [V::F; C],
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { q5_block::<V, C, true>(g, h, b, k, act, acc) }
    }
}

/// One block of Q5_0 (`MIN` false: Q8_0 activations whose `c` is
/// `-16 sum(y)`, the quants' offset) or Q5_1 (`MIN`: Q8_1 activations, `c`
/// 0, and the block's minimum times the activations' `s` added after the
/// scaled sum, as ggml's generic `vec_dot_q5_1_q8_1`).
#[inline(always)]
unsafe fn q5_block<V: RowLanes, const C: usize, const MIN: bool>(
    g: *const u8,
    h: usize,
    b: usize,
    k: usize,
    act: *const super::ActBlock,
    acc: &mut [V::F; C],
) {
    // SAFETY (whole body): as for Q4_K.
    unsafe {
        let (qo, ho, so) = q5_at::<MIN>(b);
        let off = 4 * V::ROWS * h;
        if b.is_multiple_of(2) {
            V::prefetch(g.add(qo + 2 * q5_unit::<MIN>()));
        }
        let w = V::load(g.add(ho + off));
        let (m4, b4) = (V::splat(0x0F0F_0F0F), V::splat(0x1010_1010));
        let mut lo = [V::splat(0); 4];
        let mut hi = [V::splat(0); 4];
        for j in 0..4 {
            let q = V::load(g.add(qo + 64 * j + off));
            // Fifth bits of chunk j's low (bit 2j of a byte) and high (2j + 1) nibbles,
            // moved to bit 4: right by 2j, then left by a constant (one shift by 4 - 2j
            // would branch on its sign wherever this loop is not unrolled).
            let wj = w.shr(2 * j as u32);
            lo[j] = q.and(m4).or(wj.shl(4).and(b4));
            hi[j] = q.shr(4).and(m4).or(wj.shl(3).and(b4));
        }
        let dx = V::load_f16(g.add(so + 2 * V::ROWS * h));
        // Q5_1's minimums follow the two blocks' scales.
        let mx = if MIN {
            V::load_f16(g.add(so + 64 + 2 * V::ROWS * h))
        } else {
            V::fzero()
        };
        for (t, acc_t) in acc.iter_mut().enumerate() {
            let a = &*act.add(t * k + b);
            let ay =
                |e: usize| i32::from_le_bytes([a.qs[e], a.qs[e + 1], a.qs[e + 2], a.qs[e + 3]]);
            let s = if V::I16_SUMS {
                // Chunk j holds elements 4j.. (low nibbles) and 16 + 4j.. (high).
                let u = [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2], lo[3], hi[3]];
                let y: [i32; 8] = std::array::from_fn(|i| ay(16 * (i % 2) + 4 * (i / 2)));
                q5_0_block(&u, &y, a.c)
            } else {
                let mut s = V::splat(a.c);
                for j in 0..4 {
                    s = s.dot4(lo[j], ay(4 * j)).dot4(hi[j], ay(16 + 4 * j));
                }
                s
            };
            let t1 = V::fmul(V::fmul(dx, V::fsplat(a.d)), s.cvt());
            let t = if MIN {
                V::fadd(t1, V::fmul(mx, V::fsplat(a.s)))
            } else {
                t1
            };
            *acc_t = V::fadd(*acc_t, t);
        }
    }
}

/// One tile: the rows of vector `h` of a group x C tokens, every block.
///
/// # Safety
/// `V`'s features; `g` holds the group's `k` blocks, `act` `C * k`; the
/// first `n` lanes of `out + t * ld` (t < C) are writable.
#[inline(always)]
unsafe fn tile<V: RowLanes, P: PackedFmt, const C: usize>(
    g: *const u8,
    h: usize,
    k: usize,
    act: *const P::Act,
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    // SAFETY (whole body): as the caller guarantees.
    unsafe {
        let mut acc = [V::fzero(); C];
        for b in 0..k {
            P::block::<V, C>(g, h, b, k, act, &mut acc);
        }
        for (t, a) in acc.into_iter().enumerate() {
            V::store(a, out.add(t * ld), n);
        }
    }
}

/// The one-token tile over a whole group: on 8-row lanes both halves in
/// one pass over the blocks, so the two halves share the activation
/// broadcasts and each super-block's lines are read once. Each half's sums
/// are [`tile`]'s, bit for bit.
///
/// # Safety
/// As [`tile`], with `n` (at most 16) the group's rows to write (`h` and
/// `ld` unused: the arguments of a [`TileFn`]).
#[inline(always)]
unsafe fn tile_one<V: RowLanes, P: PackedFmt>(
    g: *const u8,
    _h: usize,
    k: usize,
    act: *const P::Act,
    out: *mut f32,
    _ld: usize,
    n: usize,
) {
    // SAFETY (whole body): as the caller guarantees.
    unsafe {
        if V::ROWS == 16 || n <= V::ROWS {
            return tile::<V, P, 1>(g, 0, k, act, out, 0, n);
        }
        let mut acc = [[V::fzero()]; 2];
        if P::ONE_PASS {
            for b in 0..k {
                P::block::<V, 1>(g, 0, b, k, act, &mut acc[0]);
                P::block::<V, 1>(g, 1, b, k, act, &mut acc[1]);
            }
        } else {
            for (h, acc_h) in acc.iter_mut().enumerate() {
                for b in 0..k {
                    P::block::<V, 1>(g, h, b, k, act, acc_h);
                }
            }
        }
        V::store(acc[0][0], out, V::ROWS);
        V::store(acc[1][0], out.add(V::ROWS), n - V::ROWS);
    }
}

/// What an entry point of `C` tokens runs: [`tile`] for a full tile,
/// [`tile_one`] for one token.
///
/// # Safety
/// As [`tile`] (C > 1) or [`tile_one`] (C = 1).
#[inline(always)]
unsafe fn entry<V: RowLanes, P: PackedFmt, const C: usize>(
    g: *const u8,
    h: usize,
    k: usize,
    act: *const P::Act,
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    // SAFETY: as the caller guarantees.
    unsafe {
        if C == 1 {
            tile_one::<V, P>(g, h, k, act, out, ld, n)
        } else {
            tile::<V, P, C>(g, h, k, act, out, ld, n)
        }
    }
}

/// Tokens per full tile on 8-row lanes and in the portable twin, and the
/// narrowest tile of 16-row lanes.
pub(crate) const C_FULL: usize = 4;

/// Tokens per full tile on 16-row lanes (AVX-512), then half that for the
/// rest of a prompt. Their 32 registers hold a quarter's 16 quant vectors
/// beside a token's sums, so each quant vector is made once per tile: the
/// wider the tile, the less that costs a token. One thread, 4096 x 4096,
/// pp64 against packed Q4_0 (Zen 4), 4 -> 8 tokens: Q5_K 0.64x -> 0.76x,
/// Q6_K 0.65-0.68x -> 0.75-0.78x, Q3_K 0.64-0.70x -> 0.77-0.79x, Q5_0 0.84x
/// -> 0.90x, Q4_K 0.87-0.90x -> 0.91x; 8 -> 16 tokens: Q5_K 0.70-0.75x ->
/// 0.78-0.91x, the others within the noise.
#[cfg(target_arch = "x86_64")]
pub(crate) const C_WIDE: usize = 16;

/// One tile entry point: `(g, h, k, act, out, ld, n)`.
pub(crate) type TileFn<A> = unsafe fn(*const u8, usize, usize, *const A, *mut f32, usize, usize);

/// A path's tile entry points for one format.
pub(crate) struct PathTiles<A> {
    /// Tiles of one vector's rows as (tokens, entry point), widest first
    /// (the first is the path's full tile), the last of [`C_FULL`] tokens.
    pub(crate) wide: [(usize, TileFn<A>); 3],
    /// One token over the whole group (`h` 0, `n` the group's rows).
    pub(crate) one: TileFn<A>,
    /// Rows a vector holds.
    pub(crate) rows: usize,
}

// Not derived: the derive would ask `A: Copy`; the fields are copies whatever `A` is.
impl<A> Clone for PathTiles<A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A> Copy for PathTiles<A> {}

/// A [`super::PackedGemmFn`]-shaped walk over groups and token tiles: the
/// widest of `tiles.wide` that the tokens left fill, then `tiles.one`.
///
/// # Safety
/// [`super::PackedGemmFn`]'s; `tiles`' entry points may run here (their
/// features are present).
pub(crate) unsafe fn gemm<A>(
    w: &PackedWeights,
    r0: usize,
    nr: usize,
    act: &[A],
    out: Out,
    tiles_of: PathTiles<A>,
) -> Tiles {
    let PathTiles {
        wide,
        one,
        rows: rows_per_vec,
    } = tiles_of;
    let k = w.blocks();
    let n = gemm_shape_k(w, r0, nr, act.len(), k);
    let mut tiles = Tiles::default();
    for g0 in (0..nr).step_by(GROUP_ROWS) {
        let real = (nr - g0).min(GROUP_ROWS);
        let group = w.group((r0 + g0) / GROUP_ROWS);
        let g = group.as_ptr();
        let mut t0 = 0;
        while t0 < n {
            let (c, tile) = wide
                .into_iter()
                .find(|&(c, _)| n - t0 >= c)
                .unwrap_or((1, one));
            let a = act.as_ptr().wrapping_add(t0 * k);
            if c == 1 {
                // SAFETY: the group holds k blocks (w.group checked its length against the
                // layout); token t0 < n has k blocks; lanes below `real` of out.at(t0, g0) are
                // the group's rows, which the caller lets us write.
                unsafe { one(g, 0, k, a, out.at(t0, g0), 0, real) };
            } else {
                for h in 0..GROUP_ROWS / rows_per_vec {
                    let lanes = real.saturating_sub(h * rows_per_vec).min(rows_per_vec);
                    if lanes == 0 {
                        continue;
                    }
                    // SAFETY: as above, for tokens t0..t0 + c < n and the lanes below `lanes`
                    // of out.at(t0 + t, g0 + h rows_per_vec), this call's rows.
                    unsafe {
                        tile(
                            g,
                            h,
                            k,
                            a,
                            out.at(t0, g0 + h * rows_per_vec),
                            out.ld(),
                            lanes,
                        )
                    };
                }
            }
            if c == wide[0].0 && real == GROUP_ROWS {
                tiles.full += 1;
            } else {
                tiles.edge += 1;
            }
            t0 += c;
        }
    }
    tiles
}

/// Checks a K-layout gemm's arguments; returns `n_tokens`.
fn gemm_shape_k(w: &PackedWeights, r0: usize, nr: usize, act_len: usize, k: usize) -> usize {
    assert!(k > 0 && r0.is_multiple_of(GROUP_ROWS), "packed gemm: shape");
    assert!(
        act_len.is_multiple_of(k) && act_len > 0,
        "packed gemm: activation length"
    );
    assert!(
        r0.checked_add(nr).is_some_and(|end| end <= w.rows()),
        "packed gemm: rows out of range"
    );
    act_len / k
}

/// The portable twin's tile entry points.
pub(crate) const fn portable<P: PackedFmt>() -> PathTiles<P::Act> {
    let four = (C_FULL, entry::<Portable, P, C_FULL> as TileFn<P::Act>);
    PathTiles {
        wide: [four; 3],
        one: entry::<Portable, P, 1>,
        rows: 16,
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The x86 lane types and entry points: [`Zmm`] (16 rows, AVX-512BW,
    //! `vpdpbusd` with VNNI or its `vpmaddubsw` emulation) and [`Ymm`] (8
    //! rows, AVX2, with AVX-VNNI's VEX `vpdpbusd`, AVX-512 VNNI's EVEX one,
    //! or the emulation).

    use std::arch::x86_64::*;

    use super::{entry, PackedFmt, PathTiles, RowLanes, TileFn, C_FULL, C_WIDE};

    /// Decode prefetch distance of the zmm and ymm kernels, in Q6_K
    /// super-blocks' worth of bytes ([`super::prefetch_part`]).
    const PF_DECODE_SB: usize = 2;

    /// `Zmm<VNNI>`: 16 rows in a zmm.
    #[derive(Clone, Copy)]
    pub(crate) struct Zmm<const VNNI: bool>(__m512i);

    // SAFETY (every method): the intrinsics need AVX-512F/BW (+ VNNI when
    // VNNI) and F16C, which the caller guarantees (the methods only run in
    // the entry points below, reached through tables handed out after
    // detection); pointers are valid by the trait's contract.
    impl<const VNNI: bool> RowLanes for Zmm<VNNI> {
        const ROWS: usize = 16;
        const I16_SUMS: bool = !VNNI;
        type F = __m512;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_loadu_si512(p as *const _) })
        }
        #[inline(always)]
        unsafe fn splat(v: i32) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_set1_epi32(v) })
        }
        #[inline(always)]
        unsafe fn and(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_and_si512(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn or(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_or_si512(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_add_epi32(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn mullo(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_mullo_epi32(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn shr(self, n: u32) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_srl_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
        }
        #[inline(always)]
        unsafe fn shl(self, n: u32) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_sll_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
        }
        #[inline(always)]
        unsafe fn sra(self, n: u32) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_sra_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
        }
        #[inline(always)]
        unsafe fn dot4(self, u: Self, y: i32) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let y = _mm512_set1_epi32(y);
                if VNNI {
                    Zmm(_mm512_dpbusd_epi32(self.0, u.0, y))
                } else {
                    // Pairs of u * y at most 2 * 63 * 128: no i16 saturation.
                    let p = _mm512_maddubs_epi16(u.0, y);
                    Zmm(_mm512_add_epi32(
                        self.0,
                        _mm512_madd_epi16(p, _mm512_set1_epi16(1)),
                    ))
                }
            }
        }
        #[inline(always)]
        unsafe fn madd(self, u: Self, p: i32) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_add_epi32(self.0, _mm512_madd_epi16(u.0, _mm512_set1_epi32(p))) })
        }
        #[inline(always)]
        unsafe fn dot4_16(u: Self, y: i32) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_maddubs_epi16(u.0, _mm512_set1_epi32(y)) })
        }
        #[inline(always)]
        unsafe fn add16(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_add_epi16(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn madd16(self, s: Self) -> Self {
            // SAFETY: see the impl comment.
            Zmm(unsafe { _mm512_madd_epi16(self.0, s.0) })
        }
        #[inline(always)]
        unsafe fn cvt(self) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_cvtepi32_ps(self.0) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u8) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        #[inline(always)]
        unsafe fn fsplat(v: f32) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn fzero() -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn fmul(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fadd(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fsub(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn store(v: __m512, p: *mut f32, n: usize) {
            // SAFETY: see the impl comment; masked-off lanes are not accessed.
            unsafe {
                let mask = ((1u32 << n) - 1) as __mmask16;
                _mm512_mask_storeu_ps(p, mask, v)
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            // SAFETY: a prefetch is a hint with no architectural effect.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        const PF_DECODE: usize = PF_DECODE_SB;
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            // SAFETY: a prefetch is a hint with no architectural effect.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
        }
    }

    /// `Ymm<DOT>`: 8 rows in a ymm; DOT 0: `vpmaddubsw` emulation, 1:
    /// AVX-VNNI (VEX), 2: AVX-512 VNNI + VL (EVEX, for tests on CPUs
    /// without AVX-VNNI).
    #[derive(Clone, Copy)]
    pub(crate) struct Ymm<const DOT: u8>(__m256i);

    // SAFETY (every method): the intrinsics need AVX2, FMA, F16C (+ AVX-VNNI
    // for DOT 1, AVX-512 VNNI + VL for DOT 2), which the caller guarantees
    // (the methods only run in the entry points below); pointers are valid
    // by the trait's contract.
    impl<const DOT: u8> RowLanes for Ymm<DOT> {
        const ROWS: usize = 8;
        const I16_SUMS: bool = DOT == 0;
        type F = __m256;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_loadu_si256(p as *const __m256i) })
        }
        #[inline(always)]
        unsafe fn splat(v: i32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_set1_epi32(v) })
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
        unsafe fn add(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_add_epi32(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn mullo(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_mullo_epi32(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn shr(self, n: u32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_srl_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
        }
        #[inline(always)]
        unsafe fn shl(self, n: u32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_sll_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
        }
        #[inline(always)]
        unsafe fn sra(self, n: u32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_sra_epi32(self.0, _mm_cvtsi32_si128(n as i32)) })
        }
        #[inline(always)]
        unsafe fn dot4(self, u: Self, y: i32) -> Self {
            // SAFETY: see the impl comment.
            unsafe {
                let y = _mm256_set1_epi32(y);
                match DOT {
                    1 => Ymm(_mm256_dpbusd_avx_epi32(self.0, u.0, y)),
                    2 => Ymm(_mm256_dpbusd_epi32(self.0, u.0, y)),
                    _ => {
                        let p = _mm256_maddubs_epi16(u.0, y);
                        Ymm(_mm256_add_epi32(
                            self.0,
                            _mm256_madd_epi16(p, _mm256_set1_epi16(1)),
                        ))
                    }
                }
            }
        }
        #[inline(always)]
        unsafe fn madd(self, u: Self, p: i32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_add_epi32(self.0, _mm256_madd_epi16(u.0, _mm256_set1_epi32(p))) })
        }
        #[inline(always)]
        unsafe fn dot4_16(u: Self, y: i32) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_maddubs_epi16(u.0, _mm256_set1_epi32(y)) })
        }
        #[inline(always)]
        unsafe fn add16(self, o: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_add_epi16(self.0, o.0) })
        }
        #[inline(always)]
        unsafe fn madd16(self, s: Self) -> Self {
            // SAFETY: see the impl comment.
            Ymm(unsafe { _mm256_madd_epi16(self.0, s.0) })
        }
        #[inline(always)]
        unsafe fn cvt(self) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_cvtepi32_ps(self.0) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u8) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        #[inline(always)]
        unsafe fn fsplat(v: f32) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn fzero() -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn fmul(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fadd(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fsub(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn store(v: __m256, p: *mut f32, n: usize) {
            // SAFETY: see the impl comment; masked-off lanes are not accessed.
            unsafe {
                if n == 8 {
                    _mm256_storeu_ps(p, v)
                } else {
                    let mask = _mm256_cmpgt_epi32(
                        _mm256_set1_epi32(n as i32),
                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                    );
                    _mm256_maskstore_ps(p, mask, v)
                }
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            // SAFETY: a prefetch is a hint with no architectural effect.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        const PF_DECODE: usize = PF_DECODE_SB;
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            // SAFETY: a prefetch is a hint with no architectural effect.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
        }
    }

    /// # Safety
    /// The CPU has the features named here; [`tile`]'s conditions.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn e512vnni<P: PackedFmt, const C: usize>(
        g: *const u8,
        h: usize,
        k: usize,
        act: *const P::Act,
        out: *mut f32,
        ld: usize,
        n: usize,
    ) {
        // SAFETY: this function's features are Zmm<true>'s; the caller's guarantees.
        unsafe { entry::<Zmm<true>, P, C>(g, h, k, act, out, ld, n) }
    }

    /// # Safety
    /// The CPU has the features named here; [`tile`]'s conditions.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn e512<P: PackedFmt, const C: usize>(
        g: *const u8,
        h: usize,
        k: usize,
        act: *const P::Act,
        out: *mut f32,
        ld: usize,
        n: usize,
    ) {
        // SAFETY: this function's features are Zmm<false>'s; the caller's guarantees.
        unsafe { entry::<Zmm<false>, P, C>(g, h, k, act, out, ld, n) }
    }

    /// # Safety
    /// The CPU has the features named here; [`tile`]'s conditions.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn e256vnni<P: PackedFmt, const C: usize>(
        g: *const u8,
        h: usize,
        k: usize,
        act: *const P::Act,
        out: *mut f32,
        ld: usize,
        n: usize,
    ) {
        // SAFETY: this function's features are Ymm<1>'s; the caller's guarantees.
        unsafe { entry::<Ymm<1>, P, C>(g, h, k, act, out, ld, n) }
    }

    /// # Safety
    /// The CPU has the features named here; [`tile`]'s conditions.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn e256evex<P: PackedFmt, const C: usize>(
        g: *const u8,
        h: usize,
        k: usize,
        act: *const P::Act,
        out: *mut f32,
        ld: usize,
        n: usize,
    ) {
        // SAFETY: this function's features are Ymm<2>'s; the caller's guarantees.
        unsafe { entry::<Ymm<2>, P, C>(g, h, k, act, out, ld, n) }
    }

    /// # Safety
    /// The CPU has the features named here; [`tile`]'s conditions.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn e256<P: PackedFmt, const C: usize>(
        g: *const u8,
        h: usize,
        k: usize,
        act: *const P::Act,
        out: *mut f32,
        ld: usize,
        n: usize,
    ) {
        // SAFETY: this function's features are Ymm<0>'s; the caller's guarantees.
        unsafe { entry::<Ymm<0>, P, C>(g, h, k, act, out, ld, n) }
    }

    /// Tile entry points per path: [`C_WIDE`], half that and [`C_FULL`]
    /// tokens on 16-row lanes, [`C_FULL`] on 8-row ones.
    const fn wide<A>(
        full: TileFn<A>,
        half: TileFn<A>,
        four: TileFn<A>,
        one: TileFn<A>,
    ) -> PathTiles<A> {
        PathTiles {
            wide: [(C_WIDE, full), (C_WIDE / 2, half), (C_FULL, four)],
            one,
            rows: 16,
        }
    }
    const fn narrow<A>(four: TileFn<A>, one: TileFn<A>) -> PathTiles<A> {
        PathTiles {
            wide: [(C_FULL, four); 3],
            one,
            rows: 8,
        }
    }
    pub(crate) const fn avx512vnni<P: PackedFmt>() -> PathTiles<P::Act> {
        wide(
            e512vnni::<P, C_WIDE>,
            e512vnni::<P, { C_WIDE / 2 }>,
            e512vnni::<P, C_FULL>,
            e512vnni::<P, 1>,
        )
    }
    pub(crate) const fn avx512<P: PackedFmt>() -> PathTiles<P::Act> {
        wide(
            e512::<P, C_WIDE>,
            e512::<P, { C_WIDE / 2 }>,
            e512::<P, C_FULL>,
            e512::<P, 1>,
        )
    }
    pub(crate) const fn avxvnni<P: PackedFmt>() -> PathTiles<P::Act> {
        narrow(e256vnni::<P, C_FULL>, e256vnni::<P, 1>)
    }
    pub(crate) const fn avxvnni_evex<P: PackedFmt>() -> PathTiles<P::Act> {
        narrow(e256evex::<P, C_FULL>, e256evex::<P, 1>)
    }
    pub(crate) const fn avx2<P: PackedFmt>() -> PathTiles<P::Act> {
        narrow(e256::<P, C_FULL>, e256::<P, 1>)
    }
}

#[cfg(test)]
mod i16_tests {
    use super::*;

    /// The i16 routes (`q4_k_sub`, `q5_k_sub`, `q6_k_sub` for Q6_K, Q3_K and Q2_K, `q5_0_block`) on the portable
    /// lanes, whose i16 methods are plain arithmetic, against `dot4` chains:
    /// random bytes and each format's largest quants against activations of
    /// 127 and -128, so the twin of what AVX2 computes is checked apart from
    /// the x86 paths' own tests.
    #[test]
    fn i16_sums_equal_dot4_chains_on_portable_lanes() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // SAFETY: the portable lanes need no CPU features.
        unsafe {
            for round in 0..200 {
                let lanes = |max: u8, next: &mut dyn FnMut() -> u64| {
                    Portable(std::array::from_fn(|_| {
                        let b: [u8; 4] = std::array::from_fn(|_| {
                            if round < 2 {
                                max
                            } else {
                                (next() as u8) % (max + 1)
                            }
                        });
                        i32::from_le_bytes(b)
                    }))
                };
                let act = |next: &mut dyn FnMut() -> u64| match round {
                    0 => 0x7F7F_7F7F,
                    1 => i32::from_le_bytes([0x80; 4]),
                    _ => next() as i32,
                };
                let chain = |u: &[Portable], y: &[i32], bias: i32| {
                    let mut s = Portable::splat(bias);
                    for (&u, &y) in u.iter().zip(y) {
                        s = s.dot4(u, y);
                    }
                    s
                };
                let u8s: [Portable; 8] = std::array::from_fn(|_| lanes(15, &mut next));
                let y8: [i32; 8] = std::array::from_fn(|_| act(&mut next));
                let sc = Portable(std::array::from_fn(|_| (next() % 64) as i32));
                let want = chain(&u8s, &y8, 0).mullo(sc);
                assert_eq!(q4_k_sub(&u8s, &y8, sc).0, want.0, "Q4_K round {round}");

                let u8s: [Portable; 8] = std::array::from_fn(|_| lanes(31, &mut next));
                let want = chain(&u8s, &y8, 0).mullo(sc);
                assert_eq!(q5_k_sub(&u8s, &y8, sc).0, want.0, "Q5_K round {round}");

                let bias = (next() % 4096) as i32 - 2048;
                let want = chain(&u8s, &y8, bias);
                assert_eq!(q5_0_block(&u8s, &y8, bias).0, want.0, "Q5_0 round {round}");

                let u4: [Portable; 4] = std::array::from_fn(|_| lanes(63, &mut next));
                let y4 = [y8[0], y8[1], y8[2], y8[3]];
                let sc = Portable(std::array::from_fn(|_| next() as i8 as i32));
                let bias = -32 * ((next() % 4096) as i32 - 2048);
                let want = chain(&u4, &y4, bias).mullo(sc);
                assert_eq!(
                    q6_k_sub(&u4, &y4, bias, sc, 63).0,
                    want.0,
                    "Q6_K round {round}"
                );

                // Q3_K (quants q + 4, bias -4 bsum) and Q2_K (no bias) in one i16 sum.
                for (qmax, bias) in [(7u8, bias >> 3), (3, 0)] {
                    let u4: [Portable; 4] = std::array::from_fn(|_| lanes(qmax, &mut next));
                    let want = chain(&u4, &y4, bias).mullo(sc);
                    let got = q6_k_sub(&u4, &y4, bias, sc, qmax as i32);
                    assert_eq!(got.0, want.0, "quants at most {qmax}, round {round}");
                }
            }
        }
    }
}
