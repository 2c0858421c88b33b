//! `airlock export` and `airlock convert` on the real model: SmolLM2 Q4_1 GGUF -> HF directory
//! (f32) -> GGUF again. The f32 round trip must give the dequantized tensors bit for bit, the same
//! metadata and the same logits on the exact path; q8_0 and f16 conversions must agree with the
//! original on the top token almost everywhere and still write readable text; the exported
//! tokenizer.json must tokenize like the GGUF vocabulary (and like llama-tokenize).
//!
//! One test runs every step in turn, in one temporary directory that it owns: the f32 export and
//! its f32 GGUF are about 540 MB each, so each GGUF is deleted once checked and the directory is
//! removed at the end (a `static` would never be dropped and would leave 1.4 GB per run behind).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use airlock_engine::gguf::GgufFile;
use airlock_engine::llama::{KvType, LlamaModel, Logits, Precision, Session};
use airlock_engine::tokenizer::{Tokenizer, VocabSpec};
use airlock_kernels::dequantize_row;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

fn airlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .output()
        .expect("run airlock")
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "airlock failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    o
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn export_then_convert_back_at_f32_q8_0_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let o = ok(airlock(&[
        "export",
        s(&model()),
        "-o",
        s(&hf),
        "--dtype",
        "f32",
    ]));
    let export_stderr = String::from_utf8_lossy(&o.stderr);
    assert!(hf.join("model.safetensors").is_file());
    assert!(
        export_stderr.contains("wrote"),
        "export said: {export_stderr}"
    );
    exported_config_agrees_with_the_reference_checkpoint(&hf);
    exported_tokenizer_json_tokenizes_like_the_gguf_vocabulary(&hf);

    let ids = fixture_ids("visible-3.json");
    let (reference, vocab) = logits(&model(), &ids, Precision::Exact);
    for ty in ["f32", "q8_0", "f16"] {
        let gguf = dir.path().join(format!("smol.{ty}.gguf"));
        ok(airlock(&["convert", s(&hf), "-o", s(&gguf), "--type", ty]));
        if ty == "f32" {
            f32_round_trip_is_bit_exact_with_the_same_metadata(&gguf);
            f32_round_trip_logits_match_on_the_exact_path(&gguf, &ids, &reference, vocab);
        } else {
            conversion_agrees_on_the_top_token(&gguf, &ids, &reference, vocab);
        }
        converted_model_writes_readable_text(&gguf);
        std::fs::remove_file(&gguf).unwrap();
    }
}

fn dequantized(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    let mut v = vec![0f32; t.n_elements as usize];
    dequantize_row(t.ty, f.tensor_data(t), &mut v).unwrap();
    v
}

fn f32_round_trip_is_bit_exact_with_the_same_metadata(f32: &Path) {
    let a = GgufFile::open(model()).unwrap();
    let b = GgufFile::open(f32).unwrap();
    let names_a: Vec<&str> = a.tensors().iter().map(|t| t.name.as_str()).collect();
    let names_b: Vec<&str> = b.tensors().iter().map(|t| t.name.as_str()).collect();
    let (mut sa, mut sb) = (names_a.clone(), names_b.clone());
    sa.sort();
    sb.sort();
    assert_eq!(sa, sb, "same tensor set (tied: no output.weight)");
    assert!(b.tensor("output.weight").is_none());
    for t in a.tensors() {
        let tb = b.tensor(&t.name).unwrap();
        assert_eq!(t.dims, tb.dims, "{}", t.name);
        assert_eq!(tb.ty, airlock_kernels::GgmlType::F32, "{}", t.name);
        let (x, y) = (dequantized(&a, &t.name), dequantized(&b, &t.name));
        let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{} differs from the dequantized original", t.name);
    }
    // Metadata: every llama.* and tokenizer.* key identical, general.architecture/name too.
    for e in a.metadata() {
        let k = e.key.as_str();
        if k.starts_with("llama.")
            || k.starts_with("tokenizer.")
            || k == "general.architecture"
            || k == "general.name"
            || k == "general.quantization_version"
        {
            assert_eq!(b.get(k), Some(&e.value), "metadata key {k}");
        }
    }
    assert_eq!(b.get_u32("general.file_type"), Some(0));
}

fn logits(path: &Path, ids: &[u32], precision: Precision) -> (Vec<f32>, usize) {
    let model = LlamaModel::load(Arc::new(GgufFile::open(path).unwrap())).unwrap();
    let mut s = Session::new(&model, ids.len(), KvType::F32, precision);
    let l = s.forward(&model, ids, Logits::All).unwrap().to_vec();
    (l, model.config.vocab_size)
}

fn fixture_ids(name: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/smollm2/hf-logits").join(name))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn f32_round_trip_logits_match_on_the_exact_path(f32: &Path, ids: &[u32], a: &[f32], vocab: usize) {
    let (b, _) = logits(f32, ids, Precision::Exact);
    assert_eq!(a.len(), ids.len() * vocab);
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max <= 1e-4, "max |logit diff| = {max}");
}

fn conversion_agrees_on_the_top_token(path: &Path, ids: &[u32], a: &[f32], vocab: usize) {
    let f = GgufFile::open(path).unwrap();
    // The policy: q8_0 everywhere 2-D; f16 everywhere 2-D; norms f32.
    let embd = f.tensor("token_embd.weight").unwrap().ty;
    assert!(matches!(embd.name(), "Q8_0" | "F16"), "{embd}");
    assert_eq!(f.tensor("output_norm.weight").unwrap().ty.name(), "F32");
    let (b, _) = logits(path, ids, Precision::Exact);
    let same = (0..ids.len())
        .filter(|&p| {
            argmax(&a[p * vocab..(p + 1) * vocab]) == argmax(&b[p * vocab..(p + 1) * vocab])
        })
        .count();
    let rate = same as f64 / ids.len() as f64;
    assert!(
        rate >= 0.95,
        "{}: top-1 agreement {same}/{} = {rate:.3}",
        path.display(),
        ids.len()
    );
}

fn converted_model_writes_readable_text(path: &Path) {
    let o = ok(airlock(&[
        "run",
        "-m",
        s(path),
        "-p",
        "The capital of France is",
        "-n",
        "32",
        "--temp",
        "0",
    ]));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let letters = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
    assert!(
        letters >= 10 && !text.contains('\u{FFFD}'),
        "{}: not readable: {text:?}",
        path.display()
    );
    assert!(text.contains("Paris"), "{}: {text:?}", path.display());
}

fn exported_tokenizer_json_tokenizes_like_the_gguf_vocabulary(hf: &Path) {
    let tj = hf.join("tokenizer.json");
    let hf = tokenizers::Tokenizer::from_file(&tj).unwrap();
    let f = GgufFile::open(model()).unwrap();
    let spec = VocabSpec::from_gguf(&f).unwrap();
    let gguf_tok = Tokenizer::from_spec(&spec).unwrap();
    let reference =
        tokenizers::Tokenizer::from_file(root().join("tests/fixtures/smollm2/hf/tokenizer.json"))
            .unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/llamacpp/tokenize-smollm2.json"))
            .unwrap(),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() > 100);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ours = hf.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ours, want, "exported tokenizer.json on {text:?}");
        assert_eq!(
            gguf_tok.encode(text, false, true).unwrap(),
            want,
            "GGUF vocabulary on {text:?}"
        );
        assert_eq!(
            reference.encode(text, true).unwrap().get_ids(),
            &want[..],
            "fixture tokenizer.json on {text:?}"
        );
    }
    // And airlock's own tokenizer.json loader accepts it.
    Tokenizer::from_tokenizer_json(&tj, &spec).unwrap();
}

fn exported_config_agrees_with_the_reference_checkpoint(hf: &Path) {
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let ours = read(hf.join("config.json"));
    let reference: serde_json::Value = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
        "rope_scaling": null, "tie_word_embeddings": true, "vocab_size": 49152,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
        "rms_norm_eps": 9.999999747378752e-06,
    });
    for (k, v) in reference.as_object().unwrap() {
        assert_eq!(&ours[k], v, "config.json {k}");
    }
    let tc = read(hf.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("You are a helpful AI assistant named SmolLM"));
    let gen = read(hf.join("generation_config.json"));
    assert_eq!(gen["eos_token_id"], 2);
}
