//! airlock's quantizers write the bytes llama.cpp's `llama-quantize` writes (no importance
//! matrix, the `-ffp-contract=off` build): every tensor of a small Llama-architecture F32 model
//! whose rows are whole K-quant super-blocks (hidden 256, ffn 512), quantized by airlock to each
//! type, has the sha256 that `llama-quantize --pure` gave for that tensor
//! (tests/fixtures/kquants/llama-quantize-sha256.txt, made by scripts/kquant-llama-quantize.sh
//! from the F32 file this test writes; the test needs no llama.cpp).

use airlock_engine::gguf::{GgufWriter, TensorSpec, Value};
use airlock_kernels::GgmlType;
use sha2::{Digest, Sha256};

/// The model's hyperparameters: Llama 3 style (GQA), tiny, every row a whole super-block.
const EMBD: u64 = 256;
const FF: u64 = 512;
const LAYERS: u64 = 2;
const VOCAB: u64 = 512;

/// Deterministic weights: sums of uniforms (roughly normal), a scale per row between 0.01 and
/// 1, now and then an outlier (x20) and a zero run of 32, so the quantizers' branches all run.
fn values(n: usize, seed: u64, cols: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut v = Vec::with_capacity(n);
    let mut row_scale = 1.0f32;
    for i in 0..n {
        if i % cols == 0 {
            row_scale = 10f32.powf(next() - 1.0);
        }
        let g = next() + next() + next();
        let x = match (i / 32) % 41 {
            7 => 0.0,
            _ if next() > 0.995 => 20.0 * g,
            _ => g,
        };
        v.push(x * row_scale);
    }
    v
}

/// The tensors of the model: (name, dims as ggml ne).
fn tensors() -> Vec<(String, Vec<u64>)> {
    let (q, kv) = (EMBD, EMBD / 2);
    let mut t = vec![("token_embd.weight".to_string(), vec![EMBD, VOCAB])];
    for i in 0..LAYERS {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        t.push((n("attn_norm"), vec![EMBD]));
        t.push((n("attn_q"), vec![EMBD, q]));
        t.push((n("attn_k"), vec![EMBD, kv]));
        t.push((n("attn_v"), vec![EMBD, kv]));
        t.push((n("attn_output"), vec![q, EMBD]));
        t.push((n("ffn_norm"), vec![EMBD]));
        t.push((n("ffn_gate"), vec![EMBD, FF]));
        t.push((n("ffn_up"), vec![EMBD, FF]));
        t.push((n("ffn_down"), vec![FF, EMBD]));
    }
    t.push(("output_norm.weight".to_string(), vec![EMBD]));
    t.push(("output.weight".to_string(), vec![EMBD, VOCAB]));
    t
}

fn tensor_values(i: usize, dims: &[u64]) -> Vec<f32> {
    let n: u64 = dims.iter().product();
    if dims.len() == 1 {
        return vec![1.0; n as usize];
    }
    values(n as usize, 1000 + i as u64, dims[0] as usize)
}

/// The F32 model as GGUF bytes (what scripts/kquant-llama-quantize.sh hands llama-quantize).
fn f32_gguf() -> Vec<u8> {
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("kquant-reference".into()),
        ),
        ("general.file_type".into(), Value::U32(0)),
        ("llama.context_length".into(), Value::U32(256)),
        ("llama.embedding_length".into(), Value::U32(EMBD as u32)),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FF as u32)),
        ("llama.attention.head_count".into(), Value::U32(4)),
        ("llama.attention.head_count_kv".into(), Value::U32(2)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(500000.0)),
        ("llama.rope.dimension_count".into(), Value::U32(64)),
        ("llama.vocab_size".into(), Value::U32(VOCAB as u32)),
    ];
    let ts = tensors();
    let specs: Vec<TensorSpec> = ts
        .iter()
        .map(|(name, dims)| TensorSpec {
            name: name.clone(),
            dims: dims.clone(),
            ty: GgmlType::F32,
        })
        .collect();
    let mut w = GgufWriter::new(Vec::new(), &meta, &specs).unwrap();
    for (i, (_, dims)) in ts.iter().enumerate() {
        let bytes: Vec<u8> = tensor_values(i, dims)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.write_tensor_data(&bytes).unwrap();
    }
    w.finish().unwrap()
}

/// Writes the F32 model to $AIRLOCK_KQ_F32 (for scripts/kquant-llama-quantize.sh).
#[test]
#[ignore = "run by scripts/kquant-llama-quantize.sh"]
fn write_the_f32_model() {
    let path = std::env::var("AIRLOCK_KQ_F32").expect("AIRLOCK_KQ_F32=path");
    std::fs::write(path, f32_gguf()).unwrap();
}

#[test]
fn quantized_tensors_have_llama_quantize_hashes() {
    let fixture = include_str!("../../tests/fixtures/kquants/llama-quantize-sha256.txt");
    let ts = tensors();
    let mut checked = 0;
    let mut types_seen = std::collections::BTreeSet::new();
    for line in fixture
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        // "<file type asked> <tensor> <type llama-quantize wrote> <sha256>"
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 4, "{line}");
        let (i, (_, dims)) = ts
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n == f[1])
            .unwrap_or_else(|| panic!("no tensor {}", f[1]));
        let ty = airlock_kernels::types::all()
            .iter()
            .copied()
            .find(|t| t.name() == f[2])
            .unwrap_or_else(|| panic!("unknown type {}", f[2]));
        let x = tensor_values(i, dims);
        let mut q = vec![0u8; ty.row_bytes(x.len() as u64).unwrap() as usize];
        airlock_kernels::quantize_row(ty, &x, &mut q).unwrap();
        let got = format!("{:x}", Sha256::digest(&q));
        assert_eq!(got, f[3], "{} as {} (asked {})", f[1], f[2], f[0]);
        checked += 1;
        types_seen.insert(f[2].to_string());
    }
    // Every K-quant, Q5_0 and Q5_1 at least.
    for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"] {
        assert!(types_seen.contains(t), "fixture lacks {t}: {types_seen:?}");
    }
    assert!(checked >= 7 * 9, "{checked}");
}
