//! Llama 3.1-style RoPE scaling (`rope_scaling.rope_type = "llama3"`) as the per-frequency
//! divisors llama.cpp stores in `rope_freqs.weight`, and the way back.
//!
//! Computed in f32 in the order llama.cpp's converter computes it with torch:
//! freq_i = 1 / base^(2i/dim); wavelen = 2*pi / freq; factor 1 when wavelen < orig/high,
//! `factor` when wavelen > orig/low, else 1 / ((1 - s)/factor + s), s = (orig/wavelen - low) /
//! (high - low).

use serde_json::{Map, Value as Json};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Llama3Rope {
    /// The Llama 3.1 defaults llama.cpp uses for missing fields.
    pub fn from_json(m: &Map<String, Json>, top_level_orig: Option<u64>) -> Self {
        let f = |k: &str, d: f64| m.get(k).and_then(Json::as_f64).unwrap_or(d);
        Llama3Rope {
            factor: f("factor", 8.0),
            low_freq_factor: f("low_freq_factor", 1.0),
            high_freq_factor: f("high_freq_factor", 4.0),
            original_max_position_embeddings: m
                .get("original_max_position_embeddings")
                .and_then(Json::as_f64)
                .or(top_level_orig.map(|v| v as f64))
                .unwrap_or(8192.0),
        }
    }

    /// `rope_freqs.weight`: `dim / 2` divisors for head size `dim` and RoPE base `base`.
    pub fn factors(&self, base: f64, dim: usize) -> Vec<f32> {
        let base = base as f32;
        let factor = self.factor as f32;
        let lf = self.low_freq_factor as f32;
        let hf = self.high_freq_factor as f32;
        let orig = self.original_max_position_embeddings as f32;
        let low_wavelen = (self.original_max_position_embeddings / self.low_freq_factor) as f32;
        let high_wavelen = (self.original_max_position_embeddings / self.high_freq_factor) as f32;
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                let freq = 1.0f32 / base.powf(exponent);
                let wavelen = two_pi / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (orig / wavelen - lf) / (hf - lf);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect()
    }

    /// Finds Llama 3.1-style parameters that reproduce `factors` (the `rope_freqs.weight` of a
    /// GGUF from elsewhere): the factor is the largest divisor; low/high/original context are
    /// tried from the values Llama 3.x uses. Returns the parameters and whether they reproduce
    /// the tensor to within 1e-5 relative.
    pub fn infer(factors: &[f32], base: f64, dim: usize) -> Option<(Self, bool)> {
        let factor = factors.iter().copied().fold(f32::NAN, f32::max);
        if !factor.is_finite() || factor <= 0.0 {
            return None;
        }
        let mut best: Option<(Self, f32)> = None;
        for orig in [8192.0, 4096.0, 16384.0, 32768.0] {
            for (lf, hf) in [(1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)] {
                let p = Llama3Rope {
                    factor: factor as f64,
                    low_freq_factor: lf,
                    high_freq_factor: hf,
                    original_max_position_embeddings: orig,
                };
                let got = p.factors(base, dim);
                if got.len() != factors.len() {
                    return None;
                }
                let err = got
                    .iter()
                    .zip(factors)
                    .map(|(a, b)| ((a - b) / b).abs())
                    .fold(0.0f32, f32::max);
                if best.is_none_or(|(_, e)| err < e) {
                    best = Some((p, err));
                }
            }
        }
        best.map(|(p, e)| (p, e <= 1e-5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama31_shape() {
        let p = Llama3Rope::from_json(&Map::new(), None);
        let f = p.factors(500000.0, 128);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        let (q, exact) = Llama3Rope::infer(&f, 500000.0, 128).unwrap();
        assert!(exact);
        assert_eq!(q, p);
    }
}
