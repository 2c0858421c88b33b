//! Random-weight GGUF files of real model shapes, for sizing hardware before the real weights
//! arrive: the tensors, metadata and vocabulary are those of the real model, only the weight
//! values are random (valid blocks with small scales), so every engine runs them at the real
//! model's speed. llama.cpp's llama-bench can run the very same file.

use std::io::Write;
use std::path::Path;

use airlock_convert::rope::Llama3Rope;
use airlock_convert::{ModelFacts, OutType, Policy};
use airlock_engine::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use airlock_engine::output::{check_output_file, write_file, Inputs};
use airlock_engine::sampling::Rng;
use airlock_kernels::GgmlType;
use anyhow::{Context, Result};
use rayon::prelude::*;

/// A model shape: the hyperparameters that decide tensor sizes, as the real model's config.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub n_layers: u32,
    pub n_embd: u32,
    pub n_ff: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ctx: u32,
    pub rope_base: f32,
    /// Llama 3 rope scaling factor (rope_freqs.weight), if the model has one.
    pub rope_factor: Option<f32>,
    pub tied: bool,
}

pub const SHAPES: [Shape; 3] = [
    // meta-llama/Llama-3.1-8B (Foundation-sec-8b's base): config.json values.
    Shape {
        name: "llama-3.1-8b",
        n_layers: 32,
        n_embd: 4096,
        n_ff: 14336,
        n_head: 32,
        n_head_kv: 8,
        n_ctx: 131072,
        rope_base: 500000.0,
        rope_factor: Some(8.0),
        tied: false,
    },
    // meta-llama/Llama-3.2-1B.
    Shape {
        name: "llama-3.2-1b",
        n_layers: 16,
        n_embd: 2048,
        n_ff: 8192,
        n_head: 32,
        n_head_kv: 8,
        n_ctx: 131072,
        rope_base: 500000.0,
        rope_factor: Some(32.0),
        tied: true,
    },
    // HuggingFaceTB/SmolLM2-135M-Instruct, but with the Llama 3 vocabulary (128256 rows instead
    // of 49152), since that is the vocabulary these files carry.
    Shape {
        name: "smollm2-135m",
        n_layers: 30,
        n_embd: 576,
        n_ff: 1536,
        n_head: 9,
        n_head_kv: 3,
        n_ctx: 8192,
        rope_base: 100000.0,
        rope_factor: None,
        tied: true,
    },
];

pub fn shape(name: &str) -> Result<Shape> {
    SHAPES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .with_context(|| {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            format!(
                "unknown synthetic shape {name:?}; choose one of {}",
                names.join(", ")
            )
        })
}

/// Llama 3 rope scaling as the converter writes it (llama.cpp's defaults: low_freq_factor 1,
/// high_freq_factor 4, original context 8192).
fn llama3_rope_factors(base: f32, dim: usize, factor: f32) -> Vec<f32> {
    Llama3Rope {
        factor: factor as f64,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    }
    .factors(base as f64, dim)
}

/// Random bytes forming valid blocks of `ty` with weights of roughly unit-scale/100 magnitude.
fn random_tensor(ty: GgmlType, n_elements: u64, seed: u64) -> Result<Vec<u8>> {
    let bytes = ty
        .row_bytes(n_elements)
        .with_context(|| format!("{n_elements} elements do not fit {}", ty.name()))?;
    let mut out = vec![0u8; bytes as usize];
    let bs = ty.type_size();
    const CHUNK_BLOCKS: usize = 4096;
    out.par_chunks_mut(bs * CHUNK_BLOCKS)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut fill = |b: &mut [u8]| {
                for w in b.chunks_mut(8) {
                    let r = rng.next_u64().to_le_bytes();
                    w.copy_from_slice(&r[..w.len()]);
                }
            };
            fill(chunk);
            let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
            // Overwrite the scale fields so values stay small and finite: (byte offset of each
            // f16 scale in the block, its value), from ggml's block layouts.
            let scales: &[(usize, f32)] = match ty {
                GgmlType::Q8_0 => &[(0, 0.0003)],
                GgmlType::Q4_0 | GgmlType::Q5_0 => &[(0, 0.005)],
                GgmlType::Q4_1 => &[(0, 0.005), (2, -0.04)],
                GgmlType::Q5_1 => &[(0, 0.0025), (2, -0.04)],
                // d * 4-bit scale * q - dmin * 4-bit min
                GgmlType::Q2_K => &[(80, 0.001), (82, 0.001)],
                // d * (6-bit scale - 32) * (q - 4)
                GgmlType::Q3_K => &[(108, 0.0002)],
                // d * 6-bit scale * q - dmin * 6-bit min
                GgmlType::Q4_K => &[(0, 0.0001), (2, 0.0001)],
                GgmlType::Q5_K => &[(0, 0.00005), (2, 0.0001)],
                // d * i8 scale * (q - 32)
                GgmlType::Q6_K => &[(208, 0.000005)],
                _ => &[],
            };
            if !scales.is_empty() {
                for b in chunk.chunks_mut(bs) {
                    for &(at, d) in scales {
                        b[at..at + 2].copy_from_slice(&f16(d));
                    }
                }
            }
            match ty {
                GgmlType::F16 | GgmlType::BF16 => {
                    for v in chunk.chunks_mut(2) {
                        let x = (u16::from_le_bytes([v[0], v[1]]) as f32 / 65535.0 - 0.5) * 0.05;
                        let b = if ty == GgmlType::F16 {
                            f16(x)
                        } else {
                            half::bf16::from_f32(x).to_le_bytes()
                        };
                        v.copy_from_slice(&b);
                    }
                }
                GgmlType::F32 => {
                    for v in chunk.chunks_mut(4) {
                        let u = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                        let x = (u as f64 / u32::MAX as f64 - 0.5) as f32 * 0.05;
                        v.copy_from_slice(&x.to_le_bytes());
                    }
                }
                _ => {}
            }
        });
    Ok(out)
}

/// Write a GGUF of `shape` whose tensors have the types `airlock convert --type ty` gives them
/// (llama.cpp's per-tensor mix: a Q4_K_M file holds Q4_K, Q6_K and F32), the vocabulary copied
/// from `vocab` (any GGUF with a Llama 3 vocabulary).
/// Written through the engine's output helper (`out` is never `vocab`; an existing file is
/// replaced only with `overwrite`).
pub fn write_synthetic(
    shape: &Shape,
    ty: OutType,
    vocab: &Path,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let inputs = || Inputs::new([vocab]);
    check_output_file(out, &inputs(), overwrite)?;

    let v = GgufFile::open(vocab).with_context(|| {
        format!(
            "cannot read the vocabulary from {} (pass --vocab FILE.gguf with a Llama 3 vocabulary)",
            vocab.display()
        )
    })?;
    let n_vocab = v
        .get_str_array("tokenizer.ggml.tokens")
        .with_context(|| format!("{} has no tokenizer.ggml.tokens", vocab.display()))?
        .len() as u64;
    let s = shape;
    let head_dim = s.n_embd / s.n_head;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String(format!("synthetic {} (random weights)", s.name)),
        ),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.context_length".into(), Value::U32(s.n_ctx)),
        ("llama.embedding_length".into(), Value::U32(s.n_embd)),
        ("llama.block_count".into(), Value::U32(s.n_layers)),
        ("llama.feed_forward_length".into(), Value::U32(s.n_ff)),
        ("llama.attention.head_count".into(), Value::U32(s.n_head)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(s.n_head_kv),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(s.rope_base)),
        ("llama.rope.dimension_count".into(), Value::U32(head_dim)),
        ("llama.vocab_size".into(), Value::U32(n_vocab as u32)),
    ];
    for e in v.metadata() {
        if e.key.starts_with("tokenizer.") {
            meta.push((e.key.clone(), e.value.clone()));
        }
    }

    let (e, ff, q, kv) = (
        s.n_embd as u64,
        s.n_ff as u64,
        (s.n_head * head_dim) as u64,
        (s.n_head_kv * head_dim) as u64,
    );
    // The tensor list (types chosen below by the converter's policy, once it is complete).
    let mut specs = vec![];
    let t = |name: &str, dims: &[u64]| TensorSpec {
        name: name.into(),
        dims: dims.to_vec(),
        ty: GgmlType::F32,
    };
    specs.push(t("token_embd.weight", &[e, n_vocab]));
    if s.rope_factor.is_some() {
        specs.push(t("rope_freqs.weight", &[head_dim as u64 / 2]));
    }
    for i in 0..s.n_layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        specs.push(t(&n("attn_norm"), &[e]));
        specs.push(t(&n("attn_q"), &[e, q]));
        specs.push(t(&n("attn_k"), &[e, kv]));
        specs.push(t(&n("attn_v"), &[e, kv]));
        specs.push(t(&n("attn_output"), &[q, e]));
        specs.push(t(&n("ffn_norm"), &[e]));
        specs.push(t(&n("ffn_gate"), &[e, ff]));
        specs.push(t(&n("ffn_up"), &[e, ff]));
        specs.push(t(&n("ffn_down"), &[ff, e]));
    }
    specs.push(t("output_norm.weight", &[e]));
    if !s.tied {
        specs.push(t("output.weight", &[e, n_vocab]));
    }
    let facts = ModelFacts {
        n_layer: s.n_layers.into(),
        n_head: s.n_head.into(),
        n_head_kv: s.n_head_kv.into(),
    };
    let list: Vec<(&str, &[u64], GgmlType)> = specs
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice(), GgmlType::BF16))
        .collect();
    let types = Policy::new(ty).plan(&facts, &list);
    for (spec, ty) in specs.iter_mut().zip(types) {
        spec.ty = ty;
    }

    write_file(out, inputs(), overwrite, |w| -> Result<()> {
        let mut g = GgufWriter::new(w, &meta, &specs)?;
        for (i, spec) in specs.iter().enumerate() {
            let n: u64 = spec.dims.iter().product();
            let data = if spec.name.ends_with("_norm.weight") {
                1.0f32.to_le_bytes().repeat(n as usize)
            } else if spec.name == "rope_freqs.weight" {
                let f = s.rope_factor.unwrap_or(1.0);
                llama3_rope_factors(s.rope_base, head_dim as usize, f)
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect()
            } else {
                random_tensor(spec.ty, n, 0xA1B2_C3D4 ^ i as u64)?
            };
            g.write_tensor_data(&data)?;
        }
        g.finish()?.flush()?;
        Ok(())
    })
    .with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_factors_follow_the_formula() {
        // Llama 3.1 8B: the highest frequencies are untouched, the lowest divided by 8, and the
        // band between is a smooth ramp.
        let f = llama3_rope_factors(500000.0, 128, 8.0);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        assert!(f.iter().any(|&x| x > 1.0 && x < 8.0));
    }
}
