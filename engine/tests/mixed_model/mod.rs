//! The SmolLM2 demo model requantized in memory into a mix of the K-quant era's types, for the
//! tests that must run every weight format through the forward pass: each layer's `ffn_down`
//! (1536 wide) in one of Q4_K, Q6_K, Q5_K, Q3_K, Q2_K (layer % 5), the 576-wide matrices in Q5_0
//! and Q5_1 (llama.cpp's fallbacks for rows that are not whole super-blocks), the tied
//! embedding in Q5_0. The weights are the Q4_1 file's, dequantized and quantized again.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use airlock_engine::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use airlock_engine::llama::LlamaModel;
use airlock_kernels::GgmlType;

pub fn smollm2_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    path
}

/// The type the mix gives tensor `name` (2-D tensors only).
pub fn mixed_type(name: &str) -> GgmlType {
    use GgmlType::*;
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok());
    match (layer, name) {
        (Some(i), n) if n.ends_with("ffn_down.weight") => [Q4_K, Q6_K, Q5_K, Q3_K, Q2_K][i % 5],
        (Some(_), n) if n.ends_with("attn_k.weight") || n.ends_with("attn_output.weight") => Q5_1,
        (Some(_), n) if n.ends_with("ffn_up.weight") => Q5_1,
        _ => Q5_0,
    }
}

/// The GGUF bytes of the mix, with `retype` applied last (to make a file with other types).
/// Without `quantize` every tensor's bytes are zeros (for tests that never read them).
pub fn mixed_bytes(retype: impl Fn(&str, GgmlType) -> GgmlType, quantize: bool) -> Vec<u8> {
    use rayon::prelude::*;
    let f = GgufFile::open(smollm2_path()).unwrap();
    let meta: Vec<(String, Value)> = f
        .metadata()
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    let mut specs = Vec::new();
    let mut datas = Vec::new();
    for t in f.tensors() {
        let ty = if t.dims.len() == 2 {
            retype(&t.name, mixed_type(&t.name))
        } else {
            t.ty
        };
        let cols = t.dims[0] as usize;
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut data = vec![0u8; rb * t.n_elements as usize / cols];
        // Types without a codec (a test's unsupported ones) keep zero bytes.
        if quantize && airlock_kernels::quant::has_row_codec(ty) {
            let mut vals = vec![0f32; t.n_elements as usize];
            airlock_kernels::dequantize_row(t.ty, f.tensor_data(t), &mut vals).unwrap();
            data.par_chunks_exact_mut(rb)
                .zip(vals.par_chunks_exact(cols))
                .for_each(|(dst, src)| airlock_kernels::quantize_row(ty, src, dst).unwrap());
        }
        specs.push(TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty,
        });
        datas.push(data);
    }
    let mut w = GgufWriter::new(Vec::new(), &meta, &specs).unwrap();
    for d in &datas {
        w.write_tensor_data(d).unwrap();
    }
    w.finish().unwrap()
}

/// A fresh model of the mix (the bytes are made once per test binary).
pub fn mixed_model() -> LlamaModel {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let bytes = BYTES.get_or_init(|| mixed_bytes(|_, ty| ty, true)).clone();
    LlamaModel::load(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap()
}
