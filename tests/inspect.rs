//! `airlock inspect` end to end: the built binary on the real model, on files made with the
//! writer, and on corrupt files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use airlock_engine::gguf::{Array, GgufWriter, StrArray, TensorSpec, Value};
use airlock_kernels::types::GgmlType;

fn model() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

fn inspect(path: &Path, json: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
    c.arg("inspect").arg(path);
    if json {
        c.arg("--json");
    }
    c.output().expect("run airlock")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

#[test]
fn real_model_text_lists_every_tensor_and_the_tokenizer() {
    let o = inspect(&model(), false);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let f = airlock_engine::gguf::GgufFile::open(model()).unwrap();
    assert_eq!(f.tensors().len(), 272);
    for t in f.tensors() {
        let row = format!("  {}  ", t.name);
        assert!(out.contains(&row), "tensor {} missing", t.name);
    }
    for needle in [
        "GGUF version 3",
        "tensor count:  272",
        "kv count:      33",
        "alignment:     32",
        "data offset:   1785664",
        "tokenizer.ggml.model",
        "\"gpt2\"",
        "tokenizer.ggml.pre",
        "\"smollm\"",
        "[string; 49152]",
        "[\"<|endoftext|>\", \"<|im_start|>\", \"<|im_end|>\"",
        "tokenizer.ggml.merges",
        "[i32; 49152]",
        "tokenizer.chat_template",
        "tokenizer.ggml.eos_token_id",
        "MOSTLY_Q4_1 (3)",
        "bits per weight:",
        "verdict: valid",
        "airlock can compute every tensor type",
    ] {
        assert!(out.contains(needle), "output lacks {needle:?}:\n{out}");
    }
    // The chat template is summarised, not dumped.
    let line = out
        .lines()
        .find(|l| l.contains("tokenizer.chat_template"))
        .unwrap();
    assert!(line.contains(" bytes, ") && line.len() < 200, "{line}");
    // 576 x 49152 Q8_0 embedding, ggml order.
    let line = out
        .lines()
        .find(|l| l.contains("token_embd.weight"))
        .unwrap();
    assert!(
        line.contains("Q8_0") && line.contains("576 x 49152") && line.contains("30081024"),
        "{line}"
    );
}

#[test]
fn real_model_json_has_the_right_counts() {
    let o = inspect(&model(), true);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = json(&o);
    assert_eq!(j["schema_version"], 2);
    assert_eq!(j["runnable"], true);
    assert_eq!(j["valid"], true);
    assert_eq!(j["error"], serde_json::Value::Null);
    assert_eq!(j["file_size"], 98362432u64);
    assert_eq!(j["header"]["version"], 3);
    assert_eq!(j["header"]["tensor_count"], 272);
    assert_eq!(j["header"]["kv_count"], 33);
    assert_eq!(j["header"]["data_offset"], 1785664);
    assert_eq!(j["tensors"].as_array().unwrap().len(), 272);
    assert_eq!(j["metadata"].as_array().unwrap().len(), 33);
    let tokens = j["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "tokenizer.ggml.tokens")
        .unwrap();
    assert_eq!(tokens["type"], "array");
    assert_eq!(tokens["element_type"], "string");
    assert_eq!(tokens["length"], 49152);
    assert_eq!(tokens["head"][1], "<|im_start|>");
    let e = &j["tensors"][0];
    assert_eq!(e["name"], "token_embd.weight");
    assert_eq!(e["type"], "Q8_0");
    assert_eq!(e["shape"], serde_json::json!([576, 49152]));
    assert_eq!(e["file_offset"], 1785664);
    assert_eq!(j["totals"]["file_type"]["name"], "MOSTLY_Q4_1");
    let params: u64 = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["n_elements"].as_u64().unwrap())
        .sum();
    assert_eq!(j["totals"]["parameters"], params);
    let n: u64 = j["totals"]["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tensors"].as_u64().unwrap())
        .sum();
    assert_eq!(n, 272);
    assert_eq!(j["unsupported_types"], serde_json::json!([]));
}

/// A file with K-quant tensors and general.file_type 15, made with the writer. Its
/// architecture is not one airlock runs (a few tensors do not make a Llama), so the verdict is
/// about the container and the types.
fn k_quant_file(dir: &Path) -> PathBuf {
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("k-quant-test".into()),
        ),
        ("general.file_type".to_string(), Value::U32(15)),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(Array::String(["a", "b"].into_iter().collect::<StrArray>())),
        ),
    ];
    let specs = vec![
        TensorSpec {
            name: "blk.0.attn_q.weight".into(),
            dims: vec![256, 4],
            ty: GgmlType::Q4_K,
        },
        TensorSpec {
            name: "blk.0.ffn_down.weight".into(),
            dims: vec![512, 2],
            ty: GgmlType::Q6_K,
        },
        TensorSpec {
            name: "output_norm.weight".into(),
            dims: vec![256],
            ty: GgmlType::F32,
        },
    ];
    let mut w = GgufWriter::new(Vec::new(), &metadata, &specs).unwrap();
    for s in &specs {
        let n: u64 = s.dims.iter().product();
        w.write_tensor_data(&vec![0u8; s.ty.row_bytes(n).unwrap() as usize])
            .unwrap();
    }
    let p = dir.join("q4km.gguf");
    std::fs::write(&p, w.finish().unwrap()).unwrap();
    p
}

#[test]
fn a_k_quant_file_is_listed_and_valid() {
    let dir = tempfile::tempdir().unwrap();
    let p = k_quant_file(dir.path());
    let o = inspect(&p, false);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "blk.0.attn_q.weight",
        "Q4_K",
        "256 x 4",
        "MOSTLY_Q4_K_M (15)",
        "verdict: valid GGUF file; airlock cannot run it: unsupported architecture",
        "airlock can compute every tensor type in this file",
    ] {
        assert!(out.contains(needle), "output lacks {needle:?}:\n{out}");
    }
    let j = json(&inspect(&p, true));
    assert_eq!(j["valid"], true);
    assert_eq!(j["runnable"], false);
    assert_eq!(j["unsupported_types"], serde_json::json!([]));
    assert_eq!(j["tensors"][0]["computable"], true);
    assert_eq!(j["tensors"][1]["computable"], true);
}

#[test]
fn a_corrupt_file_exits_non_zero_naming_what_and_where() {
    let dir = tempfile::tempdir().unwrap();
    // The real model cut inside its tokenizer tokens.
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(model()).unwrap();
    std::fs::write(&cut, &bytes[..100_000]).unwrap();
    let o = inspect(&cut, false);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("invalid GGUF file"), "{err}");
    assert!(
        err.contains("truncated")
            && err.contains("tokenizer.ggml.tokens")
            && err.contains("offset"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    let o = inspect(&cut, true);
    assert!(!o.status.success());
    let j = json(&o);
    assert_eq!(j["valid"], false);
    assert_eq!(j["error"]["kind"], "Truncated");
    assert!(j["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tokenizer.ggml.tokens"));

    // Not a GGUF file at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"PK\x03\x04 not a model").unwrap();
    let o = inspect(&junk, false);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("magic"), "{}", stderr(&o));

    // A tensor with an unknown type id: the error names the tensor and the number.
    let mut k = std::fs::read(k_quant_file(dir.path())).unwrap();
    let at = k
        .windows(19)
        .position(|w| w == b"blk.0.attn_q.weight")
        .unwrap()
        + 19
        + 4
        + 16;
    k[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    let bad = dir.path().join("badtype.gguf");
    std::fs::write(&bad, &k).unwrap();
    let o = inspect(&bad, false);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("ggml type 77"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_an_error() {
    let o = inspect(Path::new("/nonexistent/x.gguf"), false);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/x.gguf"), "{}", stderr(&o));
}

/// The mix: each type's tensors, bytes and bits per weight; and which tensors have types airlock
/// cannot compute.
#[test]
fn the_mix_and_the_uncomputable_tensors_are_shown() {
    let dir = tempfile::tempdir().unwrap();
    // Not "llama": a few tensors without the hyperparameters are not a Llama, and inspect's
    // verdict (the engine's model checks) would call it invalid; the mix is what is tested here.
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("mix-test".into()),
        ),
        ("general.file_type".to_string(), Value::U32(30)),
    ];
    let t = |name: &str, dims: &[u64], ty| TensorSpec {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
    };
    let specs = vec![
        t("blk.0.attn_q.weight", &[256, 8], GgmlType::IQ4_XS),
        t("blk.0.attn_k.weight", &[256, 8], GgmlType::IQ4_XS),
        t("blk.0.attn_v.weight", &[256, 4], GgmlType::Q8_0),
        t("output_norm.weight", &[256], GgmlType::F32),
    ];
    let mut w = GgufWriter::new(Vec::new(), &metadata, &specs).unwrap();
    for s in &specs {
        let n: u64 = s.dims.iter().product();
        w.write_tensor_data(&vec![0u8; s.ty.row_bytes(n).unwrap() as usize])
            .unwrap();
    }
    let p = dir.path().join("iq4xs.gguf");
    std::fs::write(&p, w.finish().unwrap()).unwrap();

    let o = inspect(&p, false);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // IQ4_XS: 2 x 2048 values in 2 x 8 x 136 bytes = 4.25 bits per weight.
    let iq = out
        .lines()
        .find(|l| l.trim_start().starts_with("IQ4_XS"))
        .unwrap();
    for needle in [
        "2 tensors",
        "4096 elements",
        "2176 bytes",
        "4.25 bits/weight",
    ] {
        assert!(iq.contains(needle), "{needle:?} not in {iq:?}");
    }
    let q8 = out
        .lines()
        .find(|l| l.trim_start().starts_with("Q8_0"))
        .unwrap();
    assert!(q8.contains("8.50 bits/weight"), "{q8}");
    for needle in [
        "MOSTLY_IQ4_XS (30), llama.cpp's \"IQ4_XS - 4.25 bpw\"",
        "cannot compute yet: IQ4_XS",
        "tensors of those types (2): blk.0.attn_q.weight, blk.0.attn_k.weight",
    ] {
        assert!(out.contains(needle), "output lacks {needle:?}:\n{out}");
    }
    let j = json(&inspect(&p, true));
    let types = j["totals"]["types"].as_array().unwrap();
    let iq = types.iter().find(|t| t["type"] == "IQ4_XS").unwrap();
    assert_eq!(iq["bits_per_weight"], 4.25);
    assert_eq!(iq["n_bytes"], 2176);
    assert_eq!(j["totals"]["file_type"]["label"], "IQ4_XS - 4.25 bpw");
    assert_eq!(
        j["unsupported_tensors"],
        serde_json::json!(["blk.0.attn_q.weight", "blk.0.attn_k.weight"])
    );
}
