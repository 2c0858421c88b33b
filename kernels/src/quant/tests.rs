//! Tests for the block formats, organised by what could be wrong: layout,
//! rounding rules (hand-worked blocks), agreement with an independent
//! implementation (gguf-py fixtures), error bounds, idempotence, and the
//! byte-level API.

use super::float::*;
use super::*;
use crate::{GgmlType, KernelError};
use bytemuck::Zeroable;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn block32(vals: &[(usize, f32)], fill: f32) -> [f32; 32] {
    let mut x = [fill; 32];
    for &(i, v) in vals {
        x[i] = v;
    }
    x
}

// ---------------------------------------------------------------- layout

#[test]
fn blocks_cast_from_unaligned_bytes() {
    // Offsets 0..4 into one buffer: at least one of them is odd-addressed
    // and one is not 4-aligned, whatever the allocator returned.
    let mut buf = [0u8; 4 + 2 * 36];
    for off in 0..4 {
        buf.fill(0);
        buf[off] = 0x00;
        buf[off + 1] = 0x3C; // d = 1.0
        buf[off + 2] = 0x9F; // element 0 -> 15 - 8 = 7, element 16 -> 9 - 8 = 1
        let blocks: &[BlockQ4_0] = bytemuck::cast_slice(&buf[off..off + 36]);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].d(), 1.0);
        let mut out = [0f32; 64];
        dequantize_row_q4_0(blocks, &mut out);
        assert_eq!((out[0], out[16], out[1]), (7.0, 1.0, -8.0));
        let _: &[BlockQ8_0] = bytemuck::cast_slice(&buf[off..off + 68]);
        let _: &[BlockQ4_1] = bytemuck::cast_slice(&buf[off..off + 40]);
        let _: &[BlockQ8_1] = bytemuck::cast_slice(&buf[off..off + 72]);
        let _: &[float::F32Bytes] = bytemuck::cast_slice(&buf[off..off + 4]);
    }
}

// ------------------------------------------------- hand-worked: Q8_0/Q8_1

/// amax 127 gives d = 1 exactly (f16 0x3C00) and id = 1, so q = roundf(x):
/// halves round away from zero (RNE would give 2 for 2.5 and 0 for 0.5).
fn q8_ties_block() -> [f32; 32] {
    block32(
        &[
            (0, 127.0),
            (1, -2.5),
            (2, 2.5),
            (3, 0.5),
            (4, -0.5),
            (5, 1.4999),
            (6, 126.5),
            (7, -127.0),
            (8, 3.5),
        ],
        0.0,
    )
}
const Q8_TIES_QS: [i8; 9] = [127, -3, 3, 1, -1, 1, 127, -127, 4];

#[test]
fn q8_0_hand_worked_ties() {
    let b = q8_0::quantize_block_q8_0(&q8_ties_block());
    assert_eq!(b.d, [0x00, 0x3C]);
    assert_eq!(&b.qs[..9], &Q8_TIES_QS);
    assert!(b.qs[9..].iter().all(|&q| q == 0));
}

#[test]
fn q8_0_hand_worked_f16_scale() {
    // amax = 1: d = f32(1/127) = 0.0078740157; in f16 (exponent 2^-7, step
    // 2^-17) that is 2^-7 + 8.06 steps -> 8 steps: bits 0x2008.
    // q = round(x * 127): 0.25 -> 31.75 -> 32, 0.1 -> 12.7 -> 13,
    // -0.3 -> -38.1 -> -38.
    let b = q8_0::quantize_block_q8_0(&block32(&[(0, 1.0), (1, 0.25), (2, 0.1), (3, -0.3)], 0.0));
    assert_eq!(b.d, [0x08, 0x20]);
    assert_eq!(&b.qs[..4], &[127, 32, 13, -38]);
    // Dequantizing uses the stored f16 d, not 1/127.
    let mut out = [0f32; 32];
    dequantize_row_q8_0(&[b], &mut out);
    let d16 = 2f32.powi(-7) * (1.0 + 8.0 / 1024.0);
    assert_eq!(out[0], 127.0 * d16);
    assert_eq!(out[1], 32.0 * d16);
}

#[test]
fn q8_0_hand_worked_negative_scale_two() {
    // amax 254 at a negative value: d = 2 (0x4000), id = 0.5;
    // 5 -> 2.5 -> 3, -1 -> -0.5 -> -1, 3 -> 1.5 -> 2.
    let b = q8_0::quantize_block_q8_0(&block32(&[(0, -254.0), (1, 5.0), (2, -1.0), (3, 3.0)], 0.0));
    assert_eq!(b.d, [0x00, 0x40]);
    assert_eq!(&b.qs[..4], &[-127, 3, -1, 2]);
}

#[test]
fn q8_0_all_zero_block() {
    let b = q8_0::quantize_block_q8_0(&[0.0; 32]);
    assert_eq!(bytemuck::bytes_of(&b), &[0u8; 34][..]);
    let b = q8_0::quantize_block_q8_0(&[-0.0; 32]);
    assert_eq!(b.d, [0, 0]);
    assert!(b.qs.iter().all(|&q| q == 0));
}

#[test]
fn q8_1_hand_worked_sum() {
    // Same quants as Q8_0; sum = 127-3+3+1-1+1+127-127+4 = 132, d = 1,
    // s = f16(132) = 2^7 * 1.03125: exponent 22, mantissa 32 -> 0x5820.
    let b = q8_1::quantize_block_q8_1(&q8_ties_block());
    assert_eq!(b.d, [0x00, 0x3C]);
    assert_eq!(b.s, [0x20, 0x58]);
    assert_eq!(&b.qs[..9], &Q8_TIES_QS);
    // s uses the f32 d: sum 127 + 32 = 159, 159 * f32(1/127) = 1.2519685;
    // f16 step 2^-10: 0.2519685 * 1024 = 258.02 -> 258: 0x3C00 + 0x102.
    let b = q8_1::quantize_block_q8_1(&block32(&[(0, 1.0), (1, 0.25)], 0.0));
    assert_eq!(b.s, [0x02, 0x3D]);
    let b = q8_1::quantize_block_q8_1(&[0.0; 32]);
    assert_eq!(bytemuck::bytes_of(&b), &[0u8; 36][..]);
}

// ------------------------------------------------------- hand-worked: Q4_0

#[test]
fn q4_0_hand_worked_negative_largest() {
    // Largest magnitude is -8 (first of -8 and +8): d = -8 / -8 = 1, id = 1,
    // q = min(15, trunc(x + 8.5)).
    let x = block32(
        &[
            (0, -8.0),  // 0.5 -> 0
            (1, 7.0),   // 15.5 -> 15
            (2, 8.0),   // 16.5 -> 16 -> clamped to 15
            (3, 0.0),   // 8.5 -> 8
            (4, -0.5),  // 8.0 -> 8
            (5, 0.5),   // 9.0 -> 9 (halves round up, not away from zero)
            (6, -0.6),  // 7.9 -> 7
            (7, 0.4),   // 8.9 -> 8
            (8, -7.5),  // 1.0 -> 1
            (9, -7.6),  // 0.9 -> 0
            (16, 3.0),  // 11.5 -> 11
            (17, -3.0), // 5.5 -> 5
        ],
        0.0,
    );
    let b = q4_0::quantize_block_q4_0(&x);
    assert_eq!(b.d, [0x00, 0x3C]);
    // Byte j = q[j] | q[j + 16] << 4; elements 18..32 are 0 -> 8.
    let want = [
        0xB0, 0x5F, 0x8F, 0x88, 0x88, 0x89, 0x87, 0x88, 0x81, 0x80, 0x88, 0x88, 0x88, 0x88, 0x88,
        0x88,
    ];
    assert_eq!(b.qs, want);
    let mut out = [0f32; 32];
    dequantize_row_q4_0(&[b], &mut out);
    assert_eq!(out[0], -8.0);
    assert_eq!(out[2], 7.0); // the clamp costs a full step
    assert_eq!(out[16], 3.0);
}

#[test]
fn q4_0_hand_worked_positive_largest() {
    // Largest is +16: d = 16 / -8 = -2 (0xC000), id = -0.5.
    let x = block32(
        &[
            (0, 16.0),   // -8 + 8.5 = 0.5 -> 0
            (1, -16.0),  // 8 + 8.5 -> 16 -> 15
            (2, 1.0),    // -0.5 + 8.5 = 8
            (3, -1.0),   // 0.5 + 8.5 = 9
            (16, -14.0), // 7 + 8.5 -> 15
            (17, 3.0),   // -1.5 + 8.5 = 7
        ],
        0.0,
    );
    let b = q4_0::quantize_block_q4_0(&x);
    assert_eq!(b.d, [0x00, 0xC0]);
    let mut want = [0x88u8; 16];
    want[0] = 0xF0;
    want[1] = 0x7F;
    want[3] = 0x89;
    assert_eq!(b.qs, want);
    let mut out = [0f32; 32];
    dequantize_row_q4_0(&[b], &mut out);
    assert_eq!(out[0], 16.0);
    assert_eq!(out[1], -14.0);
    assert_eq!(out[3], -2.0);
}

#[test]
fn q4_0_all_zero_block() {
    // max = 0, so d = 0 / -8 = -0.0: ggml (and gguf-py) store f16 0x8000,
    // not 0. id = 0 -> every q = trunc(8.5) = 8.
    let b = q4_0::quantize_block_q4_0(&[0.0; 32]);
    assert_eq!(b.d, [0x00, 0x80]);
    assert_eq!(b.qs, [0x88; 16]);
}

// ------------------------------------------------------- hand-worked: Q4_1

#[test]
fn q4_1_hand_worked() {
    // min -1, max 14: d = 15/15 = 1, m = -1 (0xBC00), q = min(15, trunc(x + 1 + 0.5)).
    let mut x = [2.0f32; 32]; // 3.5 -> 3
    x[16..].fill(5.0); // 6.5 -> 6
    x[0] = -1.0; // 0.5 -> 0
    x[1] = 14.0; // 15.5 -> 15
    x[2] = 0.0; // 1.5 -> 1
    x[3] = 0.5; // 2.0 -> 2
    x[4] = 0.49; // 1.99 -> 1
    x[5] = 13.6; // 15.1 -> 15
    let b = q4_1::quantize_block_q4_1(&x);
    assert_eq!(b.d, [0x00, 0x3C]);
    assert_eq!(b.m, [0x00, 0xBC]);
    let mut want = [0x63u8; 16];
    want[..6].copy_from_slice(&[0x60, 0x6F, 0x61, 0x62, 0x61, 0x6F]);
    assert_eq!(b.qs, want);
    let mut out = [0f32; 32];
    dequantize_row_q4_1(&[b], &mut out);
    assert_eq!(out[0], -1.0);
    assert_eq!(out[1], 14.0);
    assert_eq!(out[16], 5.0);
}

#[test]
fn q4_1_constant_block() {
    // max == min: d = 0, id = 0, q = trunc(0.5) = 0, m = 3 (0x4200).
    let b = q4_1::quantize_block_q4_1(&[3.0; 32]);
    assert_eq!(b.d, [0, 0]);
    assert_eq!(b.m, [0x00, 0x42]);
    assert_eq!(b.qs, [0; 16]);
    let mut out = [0f32; 32];
    dequantize_row_q4_1(&[b], &mut out);
    assert_eq!(out, [3.0; 32]);
}

// ------------------------------------------- gguf-py fixtures (independent)

// Produced once with gguf-py 0.19.0 (`gguf.quants.quantize`, numpy 2.4.6) on
// seeded random data; inputs are f32 bit patterns. The third Q8_0 and Q4_0
// blocks hold values on rounding boundaries where multiplying by the
// reciprocal and dividing by d give different quants, so an implementation
// that divides fails them. BF16 covers ties, overflow to infinity, a
// subnormal, and -0; F16 (numpy's f16 cast) covers overflow and subnormals.
// Q8_0: 96 values
const FX_Q8_0_X: [u32; 96] = [
    0xbcd5f5ca, 0xbdc2a476, 0x3ddf4779, 0xbd40b301, 0x3df2c55c, 0xbd13af50, 0xbdb9816e, 0xbd029134,
    0xbdbffbae, 0xbdc05fc0, 0xbddc6add, 0xbcf7774c, 0x3be556ed, 0x3d210c66, 0xbd6ac2d4, 0x3d424522,
    0x3d5f59e1, 0xbd0d6470, 0x3da20a23, 0x3c4c010c, 0x3c39be96, 0x3c71e5a7, 0xbd01b237, 0xbcd12abc,
    0xbe01476c, 0x3c7f7e91, 0x3d6c3941, 0x3deaab73, 0xbd40c353, 0xbccd31aa, 0xbd8f927a, 0xbd81edbd,
    0x3c047ac1, 0x3cbbb1f5, 0xbcaa9d6c, 0x3b391cb8, 0xbdacfd48, 0xbd481f9a, 0xbd0c8bab, 0x3dc4d17f,
    0xbd2e1ad1, 0x3d8dc9b6, 0xbd6c8772, 0xbc403638, 0xbc03ba7e, 0xbc5d423a, 0x3cdd75bf, 0xbb92bcb2,
    0xbc2af8df, 0xbd3f4238, 0x3cce2e4f, 0x3dad2b26, 0x3b1f2446, 0x3c71a4ec, 0x3d27ca03, 0x3ce875d0,
    0x3d58b0ee, 0x3c832cbf, 0x3ce5c5b6, 0x3dcd6670, 0xbd2f7e73, 0x3ce77517, 0xbd24eece, 0x3dde5fbe,
    0x3e9f296b, 0xbd619568, 0xbc5c9216, 0x3e9985ae, 0x3df32107, 0x3d6b9c0c, 0xbe970405, 0x3d75a2b0,
    0xbd6b9c0c, 0x3e9985ae, 0xbe9985ae, 0x3ce698ba, 0x3e970405, 0x3e9985ae, 0xbe970405, 0x3ddf13bf,
    0x3ce698ba, 0x3df82459, 0x3b709f5e, 0xbdf32107, 0x3d75a2b0, 0xbd619568, 0xbdf82459, 0xbe9c0757,
    0x3df82459, 0xbc5c9216, 0x3de41711, 0xbddf13bf, 0x3e9c0757, 0xbb709f5e, 0xbe9c0757, 0xbe9c0757,
];
const FX_Q8_0_Q: &str = "1214e6a06ed177dca5e0a2a294e20728c63037dd500d0b0fe0e681103a73d1e7b9c00113091be8039dc7d870ce51bcf2f7f020fbf4c91d63031130213e132175ce21d17f03197feafb7a30178818e97a860b787a882c0b3101d018eacf8431fb2dd47cff8484";
// Q4_0: 96 values
const FX_Q4_0_X: [u32; 96] = [
    0xbd150d44, 0x3cf001b0, 0xbd113e1b, 0xbcf4f07a, 0xbdafcfa7, 0x3cb3d831, 0x3bfefd0b, 0x3d09cfca,
    0x3b1cfce8, 0x3d9c0f9c, 0xbd735cc7, 0xbcd14a61, 0xbc80fd97, 0xbd51a211, 0xbd90399e, 0xbcffea21,
    0xbd88d492, 0xbdc6bc61, 0xbca35484, 0xbca4539d, 0x3d1b8552, 0xbd28df3c, 0x3bd89d9f, 0x3d356934,
    0x3c3cfaaa, 0xbb226222, 0x3d3828d7, 0x3d4d3797, 0xbceda474, 0xbc92b078, 0x3c941a23, 0x3d7d521e,
    0xbcf28b70, 0x3e002c40, 0xbd414041, 0x3c98d5d9, 0x3d396f2d, 0xbccc9266, 0x3da28bc8, 0x3d922801,
    0xbc30e4a4, 0xbd5c7169, 0xbcfd14da, 0xbda81052, 0x3d353068, 0x3d208da1, 0x3d5bb6c8, 0x3d5e1d5c,
    0x3d439b72, 0xbd043ad6, 0x3dabe03e, 0xbcc6fba9, 0x3b674fb4, 0x3d96f962, 0x3d138cf3, 0x3d824058,
    0xbd6fa3cc, 0x3ba5a369, 0x3ba33099, 0xbd215c9d, 0xbc61d90e, 0x3d626036, 0x3d5ffba7, 0x3c410963,
    0xbda4ecb8, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22,
    0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22,
    0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22,
    0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22, 0xbd104f22,
];
const FX_Q4_0_Q: &str = "3622250a6566b15a99cb988ec3c6677492d501a45aa03ba7853a6343c98b8abd95455575272150555555555555555555555555555555";
// Q4_1: 64 values
const FX_Q4_1_X: [u32; 64] = [
    0x3e9a969e, 0x3e4817fa, 0x3e91a55c, 0x3e8aa401, 0x3e2bb09a, 0x3e3cf873, 0x3e36a94b, 0x3d96949a,
    0x3e2c23ed, 0x3e4b4102, 0x3e2e0288, 0x3e4399f9, 0x3e809a70, 0x3e3eb855, 0x3e7ce890, 0x3e847d53,
    0x3e22da6b, 0x3e256c31, 0x3e54c251, 0x3e32db3e, 0x3e9f9c52, 0x3e9cf15b, 0x3e4e3568, 0x3e475363,
    0x3e80e2c9, 0x3e4dac3f, 0x3e8974f0, 0x3e3320c1, 0x3e30a855, 0x3df2a114, 0x3e4c21c2, 0x3e454e39,
    0xc00e2c14, 0xbf14f470, 0xbef46806, 0xbf977ed1, 0xbea945e9, 0x3c9ba6e1, 0xbf4837bf, 0xbf46b652,
    0x3e8fe3c9, 0xbaeaf34d, 0xbfa60562, 0xc0170951, 0xbfdeb538, 0xbffa964d, 0xc013d014, 0x3f583357,
    0xbfedff45, 0xbfe316d8, 0x3f29e9de, 0xc024fcbe, 0x3f6b60f4, 0x3f21c809, 0x3f2e18d3, 0xbe68c491,
    0x3f23330b, 0xc0394152, 0xbfabd93c, 0xc014571d, 0xbf969c75, 0x3f2ff50b, 0xbee9725f, 0x3f25ea84,
];
const FX_Q4_1_Q: &str =
    "1124b52c5e688d6cf6f78780b688c6676b378b8c1134cac14349ea17faebe8a8ec0b662275e4a2ef";
// BF16: 32 values
const FX_BF16_X: [u32; 32] = [
    0x3f800000, 0xbf800000, 0x40490fdb, 0x3a83126f, 0xc77fe080, 0x7149f2ca, 0x7f7fc99e, 0x000116c2,
    0x80000000, 0x3f808000, 0x3f818000, 0x7f800000, 0xbf21622b, 0x3fdd045b, 0xbfa293c1, 0xbf1e21c2,
    0xbe09c072, 0xbd1878eb, 0xc016cb44, 0xbf9be2c4, 0x3fc0160b, 0xbedb3ac5, 0xbfe29ec2, 0x3fd298ff,
    0x3f8d734d, 0x3f996d96, 0xbf3b98b6, 0x3f55e763, 0x3fb10931, 0x3fad1e0f, 0x3cba1ba2, 0xbfb65c47,
];
const FX_BF16_Q: &str = "803f80bf4940833a80c74a71807f01000080803f823f807f21bfdd3fa3bf1ebf0abe18bd17c09cbfc03fdbbee3bfd33f8d3f993f3cbf563fb13fad3fba3cb6bf";
// F16: 16 values
const FX_F16_X: [u32; 16] = [
    0x477fef00, 0x477ff000, 0x322bcc77, 0x3380d959, 0x37fba882, 0xbf2aaaab, 0xc1840a7b, 0xc27309ac,
    0xc37ed1ca, 0xc0539a12, 0x42c6a39a, 0x3fba06d9, 0x42f3e2c9, 0x427d2241, 0x42238d76, 0xc30bbf79,
];
const FX_F16_Q: &str = "ff7b007c00000100f70155b920cc98d3f7db9dc23556d03d9f57e9531c515ed8";

fn fixture_check(ty: GgmlType, x: &[u32], want: &str) {
    let x: Vec<f32> = x.iter().map(|&b| f32::from_bits(b)).collect();
    let mut got = vec![0u8; ty.row_bytes(x.len() as u64).unwrap() as usize];
    quantize_row(ty, &x, &mut got).unwrap();
    assert_eq!(got, hex(want), "{ty}");
}

#[test]
fn matches_gguf_py_q8_0() {
    fixture_check(GgmlType::Q8_0, &FX_Q8_0_X, FX_Q8_0_Q);
}

#[test]
fn matches_gguf_py_q4_0() {
    fixture_check(GgmlType::Q4_0, &FX_Q4_0_X, FX_Q4_0_Q);
}

#[test]
fn matches_gguf_py_q4_1() {
    fixture_check(GgmlType::Q4_1, &FX_Q4_1_X, FX_Q4_1_Q);
}

#[test]
fn matches_gguf_py_bf16() {
    fixture_check(GgmlType::BF16, &FX_BF16_X, FX_BF16_Q);
}

#[test]
fn matches_numpy_f16() {
    fixture_check(GgmlType::F16, &FX_F16_X, FX_F16_Q);
}

#[test]
fn division_would_fail_the_fixtures() {
    // Guards the fixtures themselves: quantizing the boundary block by
    // dividing by d must give different bytes than the fixture, otherwise
    // the fixture would not catch that mistake.
    let x: Vec<f32> = FX_Q8_0_X[64..].iter().map(|&b| f32::from_bits(b)).collect();
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let by_div: Vec<i8> = x.iter().map(|v| (v / d).round() as i8).collect();
    let want = hex(FX_Q8_0_Q);
    let want_qs: Vec<i8> = want[2 * 34 + 2..3 * 34].iter().map(|&b| b as i8).collect();
    assert_ne!(by_div, want_qs);
}

// ------------------------------------------------------- byte-level API

#[test]
fn byte_api_round_trips_every_supported_type() {
    let x: Vec<f32> = (0..256).map(|i| ((i % 64) as f32 - 20.0) * 0.25).collect();
    let codecs: Vec<GgmlType> = crate::types::all()
        .iter()
        .copied()
        .filter(|&t| has_row_codec(t))
        .collect();
    assert_eq!(codecs.len(), 15, "{codecs:?}");
    for ty in codecs {
        let mut bytes = vec![0u8; ty.row_bytes(256).unwrap() as usize];
        quantize_row(ty, &x, &mut bytes).unwrap();
        let mut back = vec![0f32; 256];
        dequantize_row(ty, &bytes, &mut back).unwrap();
        // Multiples of 0.25 up to 10.75 are exact in the 8-bit and float
        // formats; the others are off by at most about a step of their grid
        // over the 32-value range (2-bit: 32 / 3).
        use GgmlType::*;
        let tol = match ty {
            Q2_K => 6.0,
            Q3_K => 3.0,
            Q4_0 | Q4_1 | Q4_K => 1.1,
            Q5_0 | Q5_1 | Q5_K => 0.6,
            Q6_K => 0.3,
            F32 | F16 | BF16 | Q8_0 | Q8_1 | Q8_K => 0.05,
            other => panic!("{other} has no codec"),
        };
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= tol, "{ty}: {a} vs {b}");
        }
    }
}

#[test]
fn byte_api_errors() {
    let x = [0f32; 32];
    let mut out = [0u8; 34];
    assert_eq!(
        quantize_row(GgmlType::IQ4_NL, &x, &mut out),
        Err(KernelError::Unsupported {
            ty: GgmlType::IQ4_NL,
            op: "quantize"
        })
    );
    assert!(matches!(
        dequantize_row(GgmlType::IQ2_XS, &out, &mut [0f32; 32]),
        Err(KernelError::Unsupported { .. })
    ));
    assert!(matches!(
        quantize_row(GgmlType::Q8_0, &x[..31], &mut out),
        Err(KernelError::NotBlockMultiple { n: 31, .. })
    ));
    assert!(matches!(
        quantize_row(GgmlType::Q8_0, &x, &mut out[..33]),
        Err(KernelError::LengthMismatch {
            expected: 34,
            actual: 33,
            ..
        })
    ));
    assert!(matches!(
        dequantize_row(GgmlType::Q4_0, &out[..19], &mut [0f32; 32]),
        Err(KernelError::LengthMismatch {
            expected: 18,
            actual: 19,
            ..
        })
    ));
    // Error messages name the type.
    let msg = quantize_row(GgmlType::IQ4_NL, &x, &mut out)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("IQ4_NL"), "{msg}");
    assert!(matches!(
        quantize_row(GgmlType::Q4_K, &x, &mut out),
        Err(KernelError::NotBlockMultiple { n: 32, .. })
    ));
}

// ------------------------------------------------- error bounds (proptest)

/// One block of values in [-scale, scale], scale log-uniform in [1e-2, 1e4]
/// so the f16 scale stays normal-ish and finite.
fn block_strategy() -> impl Strategy<Value = Vec<f32>> {
    (-2.0f64..4.0, prop::collection::vec(-1.0f32..=1.0, 32)).prop_map(|(e, v)| {
        let s = 10f64.powf(e) as f32;
        v.into_iter().map(|u| u * s).collect()
    })
}

/// Half an f16 ulp at |v| (relative 2^-11), or half the smallest subnormal.
fn f16_err(v: f32) -> f32 {
    (v.abs() * 2f32.powi(-11)).max(2f32.powi(-25))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Q8_0: with d = amax/127 (f32) and d16 = f16(d), q = round(x/d) up to
    /// the reciprocal's rounding, so |x - q d| <= d/2 (+1e-3 d of slack for
    /// id's error), and |q d - q d16| <= 127 |d - d16|.
    #[test]
    fn q8_0_error_bound(x in block_strategy()) {
        let mut b = [BlockQ8_0::zeroed(); 1];
        quantize_row_q8_0(&x, &mut b);
        let mut y = [0f32; 32];
        dequantize_row_q8_0(&b, &mut y);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let bound = d * (0.5 + 1e-3) + 127.0 * f16_err(d);
        for (a, c) in x.iter().zip(&y) {
            prop_assert!((a - c).abs() <= bound, "{a} -> {c}, bound {bound}");
        }
        // Q8_1 has the same quants and scale.
        let mut b1 = [BlockQ8_1::zeroed(); 1];
        quantize_row_q8_1(&x, &mut b1);
        prop_assert_eq!(b1[0].qs, b[0].qs);
        prop_assert_eq!(b1[0].d, b[0].d);
        let sum: i32 = b1[0].qs.iter().map(|&q| q as i32).sum();
        let s = sum as f32 * d;
        if s.abs() < 65520.0 {
            prop_assert!((b1[0].s() - s).abs() <= f16_err(s));
        } else {
            // d fits in f16 but d * sum(q) need not: ggml stores infinity.
            prop_assert!(b1[0].s().is_infinite());
        }
    }

    /// Q4_0: |d| = amax/8 and q - 8 = floor(x/d + 1/2) clamped to 7, so the
    /// error is <= |d|/2, except x/d in (7.5, 8] (the side opposite the
    /// largest value) where the clamp allows up to |d|; plus 8 |d - d16|.
    #[test]
    fn q4_0_error_bound(x in block_strategy()) {
        let mut b = [BlockQ4_0::zeroed(); 1];
        quantize_row_q4_0(&x, &mut b);
        let mut y = [0f32; 32];
        dequantize_row_q4_0(&b, &mut y);
        let mut max = 0f32;
        for &v in &x { if max.abs() < v.abs() { max = v; } }
        let d = max / -8.0;
        for (a, c) in x.iter().zip(&y) {
            let steps = if d != 0.0 { a / d } else { 0.0 };
            let k = if steps > 7.49 { 1.0 + 1e-3 } else { 0.5 + 1e-3 };
            let bound = d.abs() * k + 8.0 * f16_err(d);
            prop_assert!((a - c).abs() <= bound, "{a} -> {c}, bound {bound}");
        }
    }

    /// Q4_1: d = (max-min)/15, error <= d/2 from rounding, + 15 |d - d16|
    /// + |min - f16(min)| + f32 error of (x - min).
    #[test]
    fn q4_1_error_bound(x in block_strategy(), off in -50.0f32..50.0) {
        let x: Vec<f32> = x.iter().map(|v| v + off).collect();
        let mut b = [BlockQ4_1::zeroed(); 1];
        quantize_row_q4_1(&x, &mut b);
        let mut y = [0f32; 32];
        dequantize_row_q4_1(&b, &mut y);
        let min = x.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = x.iter().fold(-f32::MAX, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        for (a, c) in x.iter().zip(&y) {
            let bound = d * (0.5 + 1e-3) + 15.0 * f16_err(d) + f16_err(min)
                + (a.abs() + min.abs()) * 2f32.powi(-22);
            prop_assert!((a - c).abs() <= bound, "{a} -> {c}, bound {bound}");
        }
    }

    /// Round to nearest is within half an ulp: BF16 keeps 8 significant
    /// bits, so relative error <= 2^-8; F16 keeps 11: <= 2^-11 (normal range).
    #[test]
    fn float_rows_error_bound(x in block_strategy()) {
        let mut b = vec![[0u8; 2]; 32];
        let mut y = [0f32; 32];
        quantize_row_bf16(&x, &mut b);
        dequantize_row_bf16(&b, &mut y);
        for (a, c) in x.iter().zip(&y) {
            prop_assert!((a - c).abs() <= a.abs() * 2f32.powi(-8));
        }
        quantize_row_f16(&x, &mut b);
        dequantize_row_f16(&b, &mut y);
        for (a, c) in x.iter().zip(&y) {
            prop_assert!((a - c).abs() <= f16_err(*a));
        }
    }

    /// Re-quantizing a dequantized block gives the same bytes for Q8_0 and
    /// Q4_0: the largest value comes back as exactly 127 d16 (or -8 d16), so
    /// d is recomputed exactly and every x/d lands within rounding of an
    /// integer (+0.5 for Q4_0), far from a rounding boundary. Q8_1 keeps d
    /// and the quants, but not always s: s = f16(sum * d) uses the f32 d,
    /// which the second pass sees already rounded to f16.
    #[test]
    fn requantize_is_idempotent(x in block_strategy()) {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q8_1] {
            let n = ty.type_size();
            let mut q1 = vec![0u8; n];
            quantize_row(ty, &x, &mut q1).unwrap();
            let mut y = [0f32; 32];
            dequantize_row(ty, &q1, &mut y).unwrap();
            let mut q2 = vec![0u8; n];
            quantize_row(ty, &y, &mut q2).unwrap();
            if ty == GgmlType::Q8_1 {
                prop_assert_eq!(&q1[..2], &q2[..2]);
                prop_assert_eq!(&q1[4..], &q2[4..]);
            } else {
                prop_assert_eq!(&q1, &q2, "{}", ty);
            }
        }
    }

    /// Q4_1 is only nearly idempotent: max' - min' = (15 d16 + m16) - m16 is
    /// rounded in f32, so d' can land one f16 step from d16. The values then
    /// move by at most 15 steps of d16 * 2^-10 plus f32 noise.
    #[test]
    fn q4_1_requantize_is_stable(x in block_strategy(), off in -50.0f32..50.0) {
        let x: Vec<f32> = x.iter().map(|v| v + off).collect();
        let mut b = [BlockQ4_1::zeroed(); 1];
        let mut y = [0f32; 32];
        quantize_row_q4_1(&x, &mut b);
        dequantize_row_q4_1(&b, &mut y);
        let mut b2 = [BlockQ4_1::zeroed(); 1];
        let mut y2 = [0f32; 32];
        quantize_row_q4_1(&y, &mut b2);
        dequantize_row_q4_1(&b2, &mut y2);
        prop_assert_eq!(b2[0].m, b[0].m);
        let d = b[0].d();
        for (a, c) in y.iter().zip(&y2) {
            prop_assert!((a - c).abs() <= 16.0 * d * 2f32.powi(-10) + a.abs() * 2f32.powi(-20));
        }
    }
}

// ------------------------------------------------ K-quants and Q5_0/Q5_1

/// tests/fixtures/kquants/ (see its README section): 18 super-blocks of
/// inputs, each a case the quantizers branch on, and llama.cpp's reference
/// quantizers' bytes for them, built without FMA contraction.
fn fixture(name: &str) -> &'static [u8] {
    macro_rules! f {
        ($($n:literal),*) => {
            match name {
                $($n => include_bytes!(concat!("../../../tests/fixtures/kquants/", $n)),)*
                _ => panic!("no fixture {name}"),
            }
        };
    }
    f!(
        "input.f32",
        "q2_K.bin",
        "q3_K.bin",
        "q4_K.bin",
        "q5_K.bin",
        "q6_K.bin",
        "q8_K.bin",
        "q5_0.bin",
        "q5_1.bin",
        "dq-Q2_K.bin",
        "dq-Q2_K.f32",
        "dq-Q3_K.bin",
        "dq-Q3_K.f32",
        "dq-Q4_K.bin",
        "dq-Q4_K.f32",
        "dq-Q5_K.bin",
        "dq-Q5_K.f32",
        "dq-Q6_K.bin",
        "dq-Q6_K.f32",
        "dq-Q5_0.bin",
        "dq-Q5_0.f32",
        "dq-Q5_1.bin",
        "dq-Q5_1.f32"
    )
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn quantizers_match_llama_cpp_reference_bytes() {
    let x = f32s(fixture("input.f32"));
    assert_eq!(x.len(), 18 * 256);
    use GgmlType::*;
    for (ty, file) in [
        (Q2_K, "q2_K.bin"),
        (Q3_K, "q3_K.bin"),
        (Q4_K, "q4_K.bin"),
        (Q5_K, "q5_K.bin"),
        (Q6_K, "q6_K.bin"),
        (Q8_K, "q8_K.bin"),
        (Q5_0, "q5_0.bin"),
        (Q5_1, "q5_1.bin"),
    ] {
        let want = fixture(file);
        let mut got = vec![0u8; want.len()];
        quantize_row(ty, &x, &mut got).unwrap();
        let ts = ty.type_size();
        for (b, (g, w)) in got.chunks(ts).zip(want.chunks(ts)).enumerate() {
            assert_eq!(
                g,
                w,
                "{ty} block {b} (input super-block {})",
                b * ty.block_size() / 256
            );
        }
    }
}

#[test]
fn dequantizers_match_gguf_py() {
    use GgmlType::*;
    for ty in [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1] {
        let blocks = fixture(&format!("dq-{ty}.bin"));
        let want = f32s(fixture(&format!("dq-{ty}.f32")));
        let mut got = vec![0f32; want.len()];
        dequantize_row(ty, blocks, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Bit for bit (random scales can give NaN * 0; any NaN matches a NaN).
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{ty} element {i} (block {}): {g} vs gguf-py {w}",
                i / ty.block_size()
            );
        }
        // The fixture's own check: the first blocks are llama.cpp's quantized
        // input, so they dequantize close to it wherever its scales fit f16.
        assert!(want.iter().any(|v| *v != 0.0), "{ty}");
    }
}

#[test]
fn nearest_int_rounds_ties_to_even_like_ggml() {
    use super::kquant::nearest_int;
    let cases = [
        (0.5, 0),
        (1.5, 2),
        (2.5, 2),
        (-0.5, 0),
        (-1.5, -2),
        (-2.5, -2),
        (0.49999997, 0),
        (3.7, 4),
        (-3.7, -4),
        (4194303.0, 4194303),
        (-4194303.0, -4194303),
    ];
    for (x, want) in cases {
        assert_eq!(nearest_int(x), want, "{x}");
    }
}

#[test]
fn k4_scale_packing_round_trips() {
    use super::kquant::{get_scale_min_k4, pack_scale_min_k4};
    let ls = [0, 63, 17, 32, 63, 1, 48, 5];
    let lm = [63, 0, 40, 9, 33, 62, 16, 31];
    let packed = pack_scale_min_k4(&ls, &lm);
    for j in 0..8 {
        assert_eq!(
            get_scale_min_k4(j, &packed),
            (ls[j], lm[j]),
            "sub-block {j}"
        );
    }
    // Hand-worked: j = 4 keeps its low nibbles in byte 8 and its top bits in
    // bytes 0 (scale) and 4 (min): 63 = 0b11_1111, 33 = 0b10_0001.
    assert_eq!(packed[8], 0x1F);
    assert_eq!(packed[0] >> 6, 3);
    assert_eq!(packed[4] >> 6, 2);
}

#[test]
fn q8_k_hand_worked() {
    // max 127 at index 3 (negative): iscale = -127 / -127 = 1, d = 1,
    // q = nearest_int(x) with ties to even (2.5 -> 2, 3.5 -> 4).
    let mut x = [0f32; 256];
    x[3] = -127.0;
    x[4] = 2.5;
    x[5] = 3.5;
    x[20] = 100.0;
    let mut b = [BlockQ8_K::zeroed()];
    quantize_row_q8_k(&x, &mut b);
    assert_eq!(b[0].d(), 1.0);
    assert_eq!(&b[0].qs[3..6], &[-127, 2, 4]);
    assert_eq!(b[0].bsum(0), -127 + 2 + 4);
    assert_eq!(b[0].bsum(1), 100);
    assert_eq!(b[0].bsum(2), 0);
    // The largest value positive: iscale = -127 / 254 = -0.5, d = -2: the
    // quants carry the opposite sign of the values.
    x[3] = 254.0;
    quantize_row_q8_k(&x, &mut b);
    assert_eq!(b[0].d(), -2.0);
    assert_eq!(b[0].qs[3], -127);
    assert_eq!(b[0].qs[20], -50);
    let mut y = [0f32; 256];
    dequantize_row_q8_k(&b, &mut y);
    assert_eq!((y[3], y[20]), (254.0, 100.0));
}

#[test]
fn q5_0_and_q5_1_hand_worked() {
    // Q5_0: largest magnitude -16 -> d = 1, q = min(31, trunc(x + 16.5)).
    let x = block32(
        &[
            (0, -16.0),
            (1, 15.0),
            (2, 16.0),
            (16, 0.4),
            (17, -0.6),
            (31, 7.0),
        ],
        0.0,
    );
    let b = q5_0::quantize_block_q5_0(&x);
    assert_eq!(b.d, [0x00, 0x3C]);
    let q: Vec<u8> = (0..32).map(|e| b.q(e)).collect();
    assert_eq!(&q[..3], &[0, 31, 31]); // 16 clamps to 31 (value 15)
    assert_eq!((q[16], q[17], q[31], q[3]), (16, 15, 23, 16));
    // Fifth bits: elements with q >= 16.
    let qh = u32::from_le_bytes(b.qh);
    for (e, &qe) in q.iter().enumerate() {
        assert_eq!((qh >> e) & 1, (qe >> 4) as u32, "bit {e}");
    }
    let mut y = [0f32; 32];
    dequantize_row_q5_0(&[b], &mut y);
    assert_eq!(
        (y[0], y[1], y[2], y[16], y[17]),
        (-16.0, 15.0, 15.0, 0.0, -1.0)
    );

    // Q5_1: min -1, max 30: d = 1, q = trunc(x + 1 + 0.5), no clamp.
    let mut x = [0f32; 32];
    x[0] = -1.0;
    x[1] = 30.0;
    x[2] = 14.6; // 16.1 -> 16: fifth bit set, nibble 0
    let b = q5_1::quantize_block_q5_1(&x);
    assert_eq!((b.d, b.m), ([0x00, 0x3C], [0x00, 0xBC]));
    assert_eq!((b.q(0), b.q(1), b.q(2), b.q(3)), (0, 31, 16, 1));
    let mut y = [0f32; 32];
    dequantize_row_q5_1(&[b], &mut y);
    assert_eq!((y[0], y[1], y[2], y[3]), (-1.0, 30.0, 15.0, 0.0));
}

#[test]
fn k_quant_accessors_agree_with_dequantization() {
    // Dequantizing a block whose scales are 1 (and minimums 0) gives back the
    // quants (minus the format's offset) as the accessors read them: the
    // element order of each layout, checked against gguf-py above through
    // the dequantizers.
    let mut r = 0x1234_5678u32;
    let mut byte = || {
        r ^= r << 13;
        r ^= r >> 17;
        r ^= r << 5;
        r as u8
    };
    let mut q4 = BlockQ4_K::zeroed();
    q4.d = [0x00, 0x3C];
    q4.scales = super::kquant::pack_scale_min_k4(&[1; 8], &[0; 8]);
    q4.qs.iter_mut().for_each(|b| *b = byte());
    let mut y = [0f32; 256];
    dequantize_row_q4_k(&[q4], &mut y);
    assert!((0..256).all(|e| y[e] == q4.q(e) as f32));

    let mut q6 = BlockQ6_K::zeroed();
    q6.d = [0x00, 0x3C];
    q6.scales = [1; 16];
    q6.ql.iter_mut().for_each(|b| *b = byte());
    q6.qh.iter_mut().for_each(|b| *b = byte());
    dequantize_row_q6_k(&[q6], &mut y);
    assert!((0..256).all(|e| y[e] == q6.q(e) as f32 - 32.0));
    assert!((0..256).any(|e| q6.q(e) >= 48) && (0..256).any(|e| q6.q(e) < 16));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Quantize then dequantize keeps gaussian-like data within a relative
    /// RMS error each format's bit width allows (measured on such data:
    /// about 0.30, 0.17, 0.085, 0.042, 0.021 for 2..6 bits, 0.08 / 0.04 for
    /// Q5_0 / Q5_1 against the block range; the bounds leave headroom).
    /// Checks the layouts round-trip, not the optimizer's exact choices,
    /// which the llama.cpp fixtures pin.
    #[test]
    fn k_quants_round_trip_within_their_precision(
        v in prop::collection::vec(-1.0f32..=1.0, 512),
        e in -3.0f64..3.0,
    ) {
        let s = 10f64.powf(e) as f32;
        // Sum of three uniforms: roughly bell-shaped.
        let x: Vec<f32> = (0..512).map(|i| (v[i] + v[(i * 7 + 3) % 512] + v[(i * 13 + 5) % 512]) * s).collect();
        let rms = (x.iter().map(|a| (a * a) as f64).sum::<f64>() / 512.0).sqrt();
        use GgmlType::*;
        for (ty, bound) in [(Q2_K, 0.5), (Q3_K, 0.3), (Q4_K, 0.15), (Q5_K, 0.08), (Q6_K, 0.04),
                            (Q5_0, 0.08), (Q5_1, 0.06), (Q8_K, 0.01)] {
            let mut b = vec![0u8; ty.row_bytes(512).unwrap() as usize];
            quantize_row(ty, &x, &mut b).unwrap();
            let mut y = vec![0f32; 512];
            dequantize_row(ty, &b, &mut y).unwrap();
            let err = (x.iter().zip(&y).map(|(a, c)| ((a - c) * (a - c)) as f64).sum::<f64>() / 512.0).sqrt();
            prop_assert!(err <= bound * rms, "{}: rms error {} of {}", ty, err, rms);
        }
    }
}
