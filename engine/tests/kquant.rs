//! Files of the K-quant era: a model mixing Q2_K..Q6_K, Q5_0 and Q5_1 loads and runs; the
//! repacked layout gives the file layout's bits (both compute in each format's twin order); the
//! fast path stays close to the exact one; an unsupported type is one error naming every
//! tensor that has it.

mod mixed_model;

use std::sync::Arc;

use airlock_engine::gguf::GgufFile;
use airlock_engine::llama::{KvType, LlamaModel, Logits, ModelError, Precision, Session};
use airlock_kernels::GgmlType;

/// Logits of every position of a fixed prompt.
fn logits(model: &LlamaModel, p: Precision) -> Vec<f32> {
    let vocab = model.config.vocab_size;
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
    let mut s = Session::new(model, 64, KvType::F16, p);
    s.forward(model, &prompt, Logits::All).unwrap().to_vec()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

#[test]
fn a_mixed_k_quant_model_runs_and_agrees_across_layouts_and_precisions() {
    let model = mixed_model::mixed_model();
    let types: std::collections::BTreeSet<&str> = model
        .weights
        .layers
        .iter()
        .flat_map(|l| [l.wq.ty, l.wk.ty, l.w_down.ty].map(|t| t.name()))
        .collect();
    assert_eq!(types.len(), 7, "{types:?}");
    let vocab = model.config.vocab_size;
    let fast = logits(&model, Precision::Fast);
    let exact = logits(&model, Precision::Exact);
    assert!(fast.iter().all(|v| v.is_finite()));

    // Packed Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K compute in their twins' order, as the file layout's kernels do.
    let mut packed = mixed_model::mixed_model();
    if packed.repack().unwrap() > 0 {
        let got = logits(&packed, Precision::Fast);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&got) == bits(&fast),
            "repacked logits differ from the file layout's"
        );
    }

    // Fast (8-bit activations) against exact (f32 activations, f64 sums): the same top token at
    // nearly every position, and differences small against the logits' spread.
    let (mut agree, mut d2, mut l2) = (0, 0f64, 0f64);
    for (f, e) in fast.chunks_exact(vocab).zip(exact.chunks_exact(vocab)) {
        agree += (argmax(f) == argmax(e)) as usize;
        for (a, b) in f.iter().zip(e) {
            d2 += ((a - b) as f64).powi(2);
            l2 += (*b as f64).powi(2);
        }
    }
    assert!(agree >= 11, "top-1 agrees at {agree} of 12 positions");
    assert!(
        (d2 / l2).sqrt() < 0.06,
        "relative RMS difference {}",
        (d2 / l2).sqrt()
    );
}

#[test]
fn unsupported_types_are_one_error_naming_every_tensor() {
    let bytes = mixed_model::mixed_bytes(
        |name, ty| match name {
            "blk.3.ffn_up.weight" | "blk.17.attn_q.weight" => GgmlType::IQ4_NL,
            _ => ty,
        },
        false,
    );
    let f = Arc::new(GgufFile::from_bytes(bytes).unwrap());
    let Err(e) = LlamaModel::load(f) else {
        panic!("an IQ4_NL file loaded");
    };
    assert!(
        matches!(e, ModelError::UnsupportedTensorTypes(ref v) if v.len() == 2),
        "{e}"
    );
    let msg = e.to_string();
    for needle in [
        "2 tensors",
        "blk.3.ffn_up.weight (IQ4_NL)",
        "blk.17.attn_q.weight (IQ4_NL)",
        "type not supported yet",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in: {msg}");
    }
}
