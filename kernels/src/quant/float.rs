//! F32 / F16 / BF16 rows, stored as little-endian bytes of any alignment.
//!
//! f32 -> f16 rounds to nearest even like ggml's `GGML_FP32_TO_FP16`
//! (ggml-impl.h `ggml_compute_fp32_to_fp16`), and maps every NaN to the quiet
//! NaN 0x7E00 with the input's sign, as that portable C path does.
//! f32 -> bf16 follows `ggml_compute_fp32_to_bf16`: round to nearest even on
//! the bits (overflow rounds to infinity), NaN truncated and forced quiet.

use half::f16;

/// One stored f16 value.
pub type F16Bytes = [u8; 2];
/// One stored bf16 value.
pub type Bf16Bytes = [u8; 2];
/// One stored f32 value (not necessarily 4-aligned in a mapped file).
pub type F32Bytes = [u8; 4];

/// Exact f16 -> f32 without branches or table lookups, so loops over rows
/// vectorise (half's own conversion does a runtime CPU check per call).
/// Same method as ggml's `ggml_compute_fp16_to_fp32`: rebias the exponent
/// with a multiply for normals, and get subnormals by a magic-number
/// subtraction.
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    let w = (bits as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w << 1; // drops the sign
                        // Normal, inf, NaN: put the exponent and mantissa into f32 position with
                        // exponent offset 0xE0, then scale by 2^-112 to undo the bias difference
                        // (for inf/NaN the offset already saturates the exponent to 0xFF).
    let normalized = f32::from_bits((two_w >> 4) + (0xE0 << 23)) * f32::from_bits(0x0780_0000);
    // Subnormal: mantissa m as the low bits of 0.5 = 0x3F000000, minus 0.5.
    let denormalized = f32::from_bits((two_w >> 17) | (126 << 23)) - 0.5;
    let mag = if two_w < (1 << 27) {
        denormalized.to_bits()
    } else {
        normalized.to_bits()
    };
    f32::from_bits(sign | mag)
}

#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        // ggml's software conversion discards the payload.
        ((x.to_bits() >> 16) as u16 & 0x8000) | 0x7E00
    } else {
        // half rounds to nearest even, with the same overflow and subnormal
        // results as ggml.
        f16::from_f32(x).to_bits()
    }
}

#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: keep the top payload bits, set the quiet bit.
        return ((u >> 16) | 64) as u16;
    }
    // Adding 0x7fff plus the lowest kept bit rounds ties to even; the u32
    // cannot overflow because the largest non-NaN input is 0xff800000.
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

pub fn dequantize_row_f16(src: &[F16Bytes], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "f16 row length");
    for (o, b) in out.iter_mut().zip(src) {
        *o = f16_to_f32(u16::from_le_bytes(*b));
    }
}

pub fn quantize_row_f16(x: &[f32], out: &mut [F16Bytes]) {
    assert_eq!(x.len(), out.len(), "f16 row length");
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_f16(v).to_le_bytes();
    }
}

pub fn dequantize_row_bf16(src: &[Bf16Bytes], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "bf16 row length");
    for (o, b) in out.iter_mut().zip(src) {
        *o = bf16_to_f32(u16::from_le_bytes(*b));
    }
}

pub fn quantize_row_bf16(x: &[f32], out: &mut [Bf16Bytes]) {
    assert_eq!(x.len(), out.len(), "bf16 row length");
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_bf16(v).to_le_bytes();
    }
}

pub fn dequantize_row_f32(src: &[F32Bytes], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "f32 row length");
    for (o, b) in out.iter_mut().zip(src) {
        *o = f32::from_le_bytes(*b);
    }
}

pub fn quantize_row_f32(x: &[f32], out: &mut [F32Bytes]) {
    assert_eq!(x.len(), out.len(), "f32 row length");
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v.to_le_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_hand_worked_values() {
        assert_eq!(f32_to_f16(0.0), 0x0000);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert_eq!(f32_to_f16(1.0), 0x3C00);
        assert_eq!(f32_to_f16(-2.0), 0xC000);
        assert_eq!(f32_to_f16(65504.0), 0x7BFF); // largest finite
        assert_eq!(f32_to_f16(65519.996), 0x7BFF); // just under the rounding midpoint
        assert_eq!(f32_to_f16(65520.0), 0x7C00); // midpoint to 65536 rounds to even: inf
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7C00);
        assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xFC00);
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (down).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
        // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9: up.
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        // Just above the tie rounds up.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3C01);
        // Subnormals: 2^-24 is the smallest; 2^-25 ties to even (zero);
        // 3*2^-25 ties up to 2*2^-24.
        assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25)), 0x0002);
        assert_eq!(f32_to_f16(2f32.powi(-14)), 0x0400); // smallest normal
        assert_eq!(f32_to_f16(f32::NAN), 0x7E00);
        assert_eq!(f32_to_f16(f32::from_bits(0xFF80_0001)), 0xFE00);
    }

    #[test]
    fn f16_to_f32_matches_half_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
                assert_eq!(got.to_bits() >> 31, want.to_bits() >> 31);
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn f16_round_trips_every_finite_value() {
        for bits in 0..=u16::MAX {
            let v = f16_to_f32(bits);
            if v.is_nan() {
                assert!(f16_to_f32(f32_to_f16(v)).is_nan());
            } else {
                assert_eq!(f32_to_f16(v), bits, "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_hand_worked_values() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(f32_to_bf16(-1.0), 0xBF80);
        // 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7: down.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        // 1 + 3*2^-8: halfway between 0x3F81 (odd) and 0x3F82: up.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_7FFF)), 0x3F80);
        // f32::MAX rounds up into infinity.
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
        // Subnormals are rounded, not flushed (current ggml).
        assert_eq!(f32_to_bf16(f32::from_bits(0x0000_8000)), 0x0000);
        assert_eq!(f32_to_bf16(f32::from_bits(0x0001_8000)), 0x0002);
        // Signalling NaN 0x7F800001: truncated to 0x7F80 (infinity) it would
        // lose NaN-ness; the quiet bit keeps it a NaN.
        assert_eq!(f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
        assert_eq!(f32_to_bf16(f32::from_bits(0xFFC1_2345)), 0xFFC1);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
    }

    #[test]
    fn rows_use_little_endian_bytes() {
        let x = [1.0f32, -2.0, 0.5];
        let mut h = [[0u8; 2]; 3];
        quantize_row_f16(&x, &mut h);
        assert_eq!(h, [[0x00, 0x3C], [0x00, 0xC0], [0x00, 0x38]]);
        let mut b = [[0u8; 2]; 3];
        quantize_row_bf16(&x, &mut b);
        assert_eq!(b, [[0x80, 0x3F], [0x00, 0xC0], [0x00, 0x3F]]);
        let mut f = [[0u8; 4]; 3];
        quantize_row_f32(&x, &mut f);
        assert_eq!(f[0], [0x00, 0x00, 0x80, 0x3F]);
        let mut back = [0f32; 3];
        dequantize_row_f16(&h, &mut back);
        assert_eq!(back, x);
        dequantize_row_bf16(&b, &mut back);
        assert_eq!(back, x);
        dequantize_row_f32(&f, &mut back);
        assert_eq!(back, x);
    }
}
