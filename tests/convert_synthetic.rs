//! `airlock convert` / `quantize` / `export` on small random-weight checkpoints written here with
//! the `safetensors` crate (a few layers, sharded or not, tied or untied embeddings, Llama 3.1 rope
//! scaling, bf16/f16/f32 inputs), and on every kind of bad input: each error names the file (and
//! tensor) and leaves nothing at OUT.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use airlock_convert::rope::Llama3Rope;
use airlock_engine::gguf::{GgufFile, Value};
use airlock_engine::llama::{KvType, LlamaModel, Logits, Precision, Session};
use airlock_kernels::quant::float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use airlock_kernels::{quantize_row, GgmlType};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn airlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .output()
        .expect("run airlock")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[derive(Clone)]
struct Spec {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    tied: bool,
    dtype: Dtype,
    shards: usize,
    llama3_rope: bool,
    /// Directory with tokenizer.json (+ tokenizer_config.json).
    tokenizer: PathBuf,
    vocab: usize,
}

/// The tensors (HF name -> (shape, values as stored, widened to f32)).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn smollm_tokenizer() -> PathBuf {
    root().join("tests/fixtures/smollm2/hf")
}

fn spec() -> Spec {
    Spec {
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        ffn: 96,
        tied: true,
        dtype: Dtype::F32,
        shards: 1,
        llama3_rope: false,
        tokenizer: smollm_tokenizer(),
        vocab: 49152,
    }
}

/// A Llama 3 tokenizer directory inside `dir`: exported from the llama.cpp-made tiny Llama 3
/// fixture, keeping only the tokenizer files. Made per test in the test's own temporary directory
/// (a static would never be dropped, and each run would leave its files behind).
fn llama3_tokenizer(dir: &Path) -> PathBuf {
    let out = dir.join("hf");
    let o = airlock(&[
        "export",
        s(&root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf")),
        "-o",
        s(&out),
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    out
}

fn values(seed: u64, n: usize, norm: bool, dtype: Dtype) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            let v = if norm { 0.9 + 0.2 * u } else { (u - 0.5) * 0.2 };
            match dtype {
                Dtype::BF16 => bf16_to_f32(f32_to_bf16(v)),
                Dtype::F16 => f16_to_f32(f32_to_f16(v)),
                _ => v,
            }
        })
        .collect()
}

fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
            .collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| f32_to_f16(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

fn write_checkpoint(dir: &Path, sp: &Spec) -> Tensors {
    std::fs::create_dir_all(dir).unwrap();
    let hd = sp.hidden / sp.heads;
    let (h, f, v) = (sp.hidden, sp.ffn, sp.vocab);
    let (q, kv) = (sp.heads * hd, sp.kv_heads * hd);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..sp.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        shapes.extend([
            (p("input_layernorm"), vec![h]),
            (p("self_attn.q_proj"), vec![q, h]),
            (p("self_attn.k_proj"), vec![kv, h]),
            (p("self_attn.v_proj"), vec![kv, h]),
            (p("self_attn.o_proj"), vec![h, q]),
            (p("post_attention_layernorm"), vec![h]),
            (p("mlp.gate_proj"), vec![f, h]),
            (p("mlp.up_proj"), vec![f, h]),
            (p("mlp.down_proj"), vec![h, f]),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    if !sp.tied {
        shapes.push(("lm_head.weight".into(), vec![v, h]));
    }
    let mut tensors = Tensors::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product();
        tensors.insert(
            name.clone(),
            (
                shape.clone(),
                values(i as u64 + 1, n, shape.len() == 1, sp.dtype),
            ),
        );
    }
    let bytes: BTreeMap<&String, Vec<u8>> = tensors
        .iter()
        .map(|(k, (_, v))| (k, encode(v, sp.dtype)))
        .collect();
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(sp.shards);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in names.chunks(per).enumerate() {
        let file = if sp.shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, sp.shards)
        };
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|&n| {
                let view = TensorView::new(sp.dtype, tensors[n].0.clone(), &bytes[n]).unwrap();
                (n.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, &None::<HashMap<String, String>>, &dir.join(&file))
            .unwrap();
        for &n in chunk {
            weight_map.insert(n.clone(), serde_json::json!(file));
        }
    }
    if sp.shards > 1 {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "_name_or_path": "org/synthetic-llama",
        "hidden_size": h, "intermediate_size": f, "num_hidden_layers": sp.layers,
        "num_attention_heads": sp.heads, "num_key_value_heads": sp.kv_heads,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": sp.tied, "vocab_size": v, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2,
    });
    if sp.llama3_rope {
        config["rope_scaling"] = serde_json::json!({
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"
        });
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let src = sp.tokenizer.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name)).unwrap();
        }
    }
    tensors
}

/// GGUF name, HF name, Q/K heads to permute with.
fn gguf_names(sp: &Spec) -> Vec<(String, String, Option<usize>)> {
    let mut v = vec![(
        "token_embd.weight".to_string(),
        "model.embed_tokens.weight".to_string(),
        None,
    )];
    for l in 0..sp.layers {
        for (g, hf, heads) in [
            ("attn_norm", "input_layernorm", None),
            ("attn_q", "self_attn.q_proj", Some(sp.heads)),
            ("attn_k", "self_attn.k_proj", Some(sp.kv_heads)),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
            ("ffn_norm", "post_attention_layernorm", None),
            ("ffn_gate", "mlp.gate_proj", None),
            ("ffn_up", "mlp.up_proj", None),
            ("ffn_down", "mlp.down_proj", None),
        ] {
            v.push((
                format!("blk.{l}.{g}.weight"),
                format!("model.layers.{l}.{hf}.weight"),
                heads,
            ));
        }
    }
    v.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        None,
    ));
    if !sp.tied {
        v.push(("output.weight".into(), "lm_head.weight".into(), None));
    }
    v
}

/// llama.cpp's permute: reshape (n_head, 2, rows/n_head/2, cols), swap axes 1 and 2.
fn permute(v: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let mut out = Vec::with_capacity(v.len());
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + j * (hd / 2) + i;
                out.extend_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn expected_type(name: &str, dims: &[u64], ty: &str, tied: bool) -> GgmlType {
    if dims.len() == 1 {
        return GgmlType::F32;
    }
    let head = name == "output.weight" || (tied && name == "token_embd.weight");
    let t = match (ty, head) {
        // llama-quantize's head rule: Q6_K, or Q8_0 where rows do not fit 256.
        ("q4_0" | "q4_1", true) if dims[0].is_multiple_of(256) => GgmlType::Q6_K,
        ("q4_0" | "q4_1", true) => GgmlType::Q8_0,
        ("q4_0", false) => GgmlType::Q4_0,
        ("q4_1", false) => GgmlType::Q4_1,
        ("q8_0", _) => GgmlType::Q8_0,
        ("f16", _) => GgmlType::F16,
        ("bf16", _) => GgmlType::BF16,
        _ => GgmlType::F32,
    };
    if !dims[0].is_multiple_of(t.block_size() as u64) {
        return if ty == "f32" {
            GgmlType::F32
        } else {
            GgmlType::F16
        };
    }
    t
}

/// Converts `dir` to each type and checks every tensor's type, shape and exact bytes, the
/// metadata, and that the model runs.
fn check_conversions(dir: &Path, sp: &Spec, tensors: &Tensors, types: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    for &ty in types {
        let out = out_dir.path().join(format!("m.{ty}.gguf"));
        let o = airlock(&["convert", s(dir), "-o", s(&out), "--type", ty]);
        assert!(o.status.success(), "{ty}: {}", stderr(&o));
        let f = GgufFile::open(&out).unwrap();
        let names = gguf_names(sp);
        let extra = usize::from(sp.llama3_rope);
        assert_eq!(f.tensors().len(), names.len() + extra, "{ty}");
        for (g, hf, heads) in &names {
            let t = f.tensor(g).unwrap_or_else(|| panic!("{ty}: no {g}"));
            let (shape, vals) = &tensors[hf];
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            assert_eq!(t.dims, dims, "{ty} {g}");
            let want_ty = expected_type(g, &dims, ty, sp.tied);
            assert_eq!(t.ty, want_ty, "{ty} {g}");
            let rows_in_order = match heads {
                Some(n) => permute(vals, shape[0], shape[1], *n),
                None => vals.clone(),
            };
            let mut want = vec![0u8; t.n_bytes as usize];
            quantize_row(want_ty, &rows_in_order, &mut want).unwrap();
            assert!(f.tensor_data(t) == &want[..], "{ty} {g}: bytes differ");
        }
        assert_eq!(f.tensor("output.weight").is_none(), sp.tied);
        if sp.llama3_rope {
            let rf = f.tensor("rope_freqs.weight").expect("rope_freqs.weight");
            assert_eq!(rf.ty, GgmlType::F32);
            let hd = sp.hidden / sp.heads;
            let want = Llama3Rope::from_json(&serde_json::Map::new(), None).factors(500000.0, hd);
            let got: Vec<f32> = f
                .tensor_data(rf)
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(got, want);
            assert_eq!(f.get_str("airlock.rope_scaling.rope_type"), Some("llama3"));
            assert_eq!(f.get("airlock.rope_scaling.factor"), Some(&Value::F64(8.0)));
        } else {
            assert!(f.tensor("rope_freqs.weight").is_none());
        }
        let ft = match ty {
            "f32" => 0,
            "f16" => 1,
            "q4_0" => 2,
            "q4_1" => 3,
            "q8_0" => 7,
            _ => 32,
        };
        assert_eq!(f.get_u32("general.file_type"), Some(ft));
        assert_eq!(f.get_u32("general.quantization_version"), Some(2));
        assert_eq!(f.get_str("general.name"), Some("synthetic-llama"));
        assert_eq!(f.get_u32("llama.block_count"), Some(sp.layers as u32));
        assert_eq!(f.get_u32("llama.vocab_size"), Some(sp.vocab as u32));
        assert_eq!(f.get_str("tokenizer.ggml.model"), Some("gpt2"));
        // It runs.
        let model = LlamaModel::load(Arc::new(f)).unwrap();
        let mut sess = Session::new(&model, 8, KvType::F32, Precision::Exact);
        let l = sess.forward(&model, &[1, 2, 3, 4], Logits::Last).unwrap();
        assert!(l.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn single_file_f32_tied_every_type() {
    let d = tempfile::tempdir().unwrap();
    let sp = spec();
    let t = write_checkpoint(d.path(), &sp);
    check_conversions(
        d.path(),
        &sp,
        &t,
        &["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"],
    );
}

#[test]
fn sharded_bf16_untied_llama3_rope() {
    let d = tempfile::tempdir().unwrap();
    let tok = tempfile::tempdir().unwrap();
    let sp = Spec {
        tied: false,
        dtype: Dtype::BF16,
        shards: 3,
        llama3_rope: true,
        tokenizer: llama3_tokenizer(tok.path()),
        vocab: 128256,
        ..spec()
    };
    let t = write_checkpoint(d.path(), &sp);
    assert!(d.path().join("model-00003-of-00003.safetensors").is_file());
    check_conversions(d.path(), &sp, &t, &["bf16", "q4_0", "q8_0"]);
    let out = d.path().join("x.gguf");
    assert!(
        airlock(&["convert", s(d.path()), "-o", s(&out), "--type", "q8_0"])
            .status
            .success()
    );
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("llama-bpe"));
    assert_eq!(f.get_bool("tokenizer.ggml.add_bos_token"), Some(true));
    assert_eq!(f.get_u32("tokenizer.ggml.bos_token_id"), Some(128000));
}

#[test]
fn f16_input_with_row_lengths_off_the_block_size() {
    let d = tempfile::tempdir().unwrap();
    // ffn 80: ffn_down rows are 80 long, not a multiple of 32 -> F16 (F32 with --type f32).
    let sp = Spec {
        dtype: Dtype::F16,
        ffn: 80,
        tied: false,
        ..spec()
    };
    let t = write_checkpoint(d.path(), &sp);
    check_conversions(d.path(), &sp, &t, &["q4_1", "f32"]);
}

#[test]
fn output_type_and_pure_flags() {
    let d = tempfile::tempdir().unwrap();
    let sp = Spec {
        tied: false,
        ..spec()
    };
    write_checkpoint(d.path(), &sp);
    let out = d.path().join("o.gguf");
    let ty_of = |args: &[&str], name: &str| {
        let _ = std::fs::remove_file(&out);
        let mut a = vec!["convert", s(d.path()), "-o", s(&out)];
        a.extend_from_slice(args);
        let o = airlock(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        GgufFile::open(&out).unwrap().tensor(name).unwrap().ty
    };
    assert_eq!(ty_of(&["--type", "q4_0"], "output.weight"), GgmlType::Q8_0);
    assert_eq!(
        ty_of(&["--type", "q4_0"], "token_embd.weight"),
        GgmlType::Q4_0
    );
    assert_eq!(
        ty_of(&["--type", "q4_0", "--pure"], "output.weight"),
        GgmlType::Q4_0
    );
    assert_eq!(
        ty_of(&["--type", "q4_1", "--output-type", "f16"], "output.weight"),
        GgmlType::F16
    );
    assert_eq!(
        ty_of(&["--type", "q8_0", "--pre", "gpt2"], "output.weight"),
        GgmlType::Q8_0
    );
}

#[test]
fn quantize_and_export_round_trip_synthetic() {
    let d = tempfile::tempdir().unwrap();
    let tok = tempfile::tempdir().unwrap();
    let sp = Spec {
        tied: false,
        llama3_rope: true,
        tokenizer: llama3_tokenizer(tok.path()),
        vocab: 128256,
        ..spec()
    };
    write_checkpoint(&d.path().join("ckpt"), &sp);
    let f32 = d.path().join("m.f32.gguf");
    let q8 = d.path().join("m.q8_0.gguf");
    let q8b = d.path().join("m.q8_0-from-f32.gguf");
    assert!(airlock(&[
        "convert",
        s(&d.path().join("ckpt")),
        "-o",
        s(&f32),
        "--type",
        "f32"
    ])
    .status
    .success());
    assert!(airlock(&[
        "convert",
        s(&d.path().join("ckpt")),
        "-o",
        s(&q8),
        "--type",
        "q8_0"
    ])
    .status
    .success());
    // quantize f32 -> q8_0 gives the same file as converting straight to q8_0, except file order
    // of nothing: same metadata (file_type updated), same tensors.
    let o = airlock(&["quantize", s(&f32), "-o", s(&q8b), "--type", "q8_0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&q8).unwrap(), std::fs::read(&q8b).unwrap());
    // Requantizing needs the flag.
    let q4 = d.path().join("m.q4_0.gguf");
    let o = airlock(&["quantize", s(&q8), "-o", s(&q4), "--type", "q4_0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--allow-requantize"), "{}", stderr(&o));
    assert!(stderr(&o).contains("blk.0.attn_q.weight") || stderr(&o).contains("token_embd.weight"));
    assert!(!q4.exists());
    let o = airlock(&[
        "quantize",
        s(&q8),
        "-o",
        s(&q4),
        "--type",
        "q4_0",
        "--allow-requantize",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // export -> convert f32 gives back the same f32 file (metadata and tensors).
    let hf = d.path().join("hf");
    let o = airlock(&[
        "export",
        s(&f32),
        "-o",
        s(&hf),
        "--dtype",
        "f32",
        "--max-shard-size",
        "5MB",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hf.join("model.safetensors.index.json").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["rope_scaling"]["rope_type"], "llama3");
    let back = d.path().join("back.gguf");
    let o = airlock(&["convert", s(&hf), "-o", s(&back), "--type", "f32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&f32).unwrap(), std::fs::read(&back).unwrap());
}

#[test]
fn llama_cpp_file_exports_with_inferred_rope_scaling_and_converts_back() {
    let fixture = root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf");
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    let o = airlock(&["export", s(&fixture), "-o", s(&hf), "--dtype", "f32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("rope_scaling inferred from rope_freqs.weight"),
        "{}",
        stderr(&o)
    );
    let out = d.path().join("back.gguf");
    let o = airlock(&["convert", s(&hf), "-o", s(&out), "--type", "f32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = GgufFile::open(&fixture).unwrap();
    let b = GgufFile::open(&out).unwrap();
    // rope_freqs.weight exactly as llama.cpp's converter computed it.
    let rf = |f: &GgufFile| {
        f.tensor_data(f.tensor("rope_freqs.weight").unwrap())
            .to_vec()
    };
    assert_eq!(rf(&a), rf(&b));
    for t in a.tensors() {
        let tb = b.tensor(&t.name).unwrap();
        let mut x = vec![0f32; t.n_elements as usize];
        let mut y = x.clone();
        airlock_kernels::dequantize_row(t.ty, a.tensor_data(t), &mut x).unwrap();
        airlock_kernels::dequantize_row(tb.ty, b.tensor_data(tb), &mut y).unwrap();
        assert!(x == y, "{}", t.name);
    }
    for e in a.metadata() {
        if e.key.starts_with("llama.")
            || e.key.starts_with("tokenizer.")
            || e.key.starts_with("general.sampling.")
        {
            assert_eq!(b.get(&e.key), Some(&e.value), "{}", e.key);
        }
    }
}

// ---- bad inputs: one clear error naming the file (and tensor), nothing at OUT ----

/// A good small checkpoint to break.
fn good(dir: &Path) -> Tensors {
    write_checkpoint(
        dir,
        &Spec {
            tied: false,
            shards: 2,
            ..spec()
        },
    )
}

fn shard(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("model-{k:05}-of-00002.safetensors"))
}

/// Runs convert, expects failure with every `needles` in stderr and nothing left in `out`'s dir.
fn fails(dir: &Path, needles: &[&str]) {
    let outdir = tempfile::tempdir().unwrap();
    let out = outdir.path().join("out.gguf");
    let o = airlock(&["convert", s(dir), "-o", s(&out), "--type", "q8_0"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "should fail: {err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert!(!out.exists(), "OUT exists after: {err}");
    let left: Vec<_> = std::fs::read_dir(outdir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Rewrites a safetensors file's header with `edit` applied to its JSON.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut h);
    let mut text = h.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn first_tensor_in(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    h.as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone()
}

#[test]
fn missing_files() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    fails(d.path(), &["config.json", "missing"]);

    let d = tempfile::tempdir().unwrap();
    good(d.path());
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    fails(d.path(), &["tokenizer.json", "missing"]);

    let d = tempfile::tempdir().unwrap();
    good(d.path());
    std::fs::remove_file(d.path().join("model.safetensors.index.json")).unwrap();
    fails(d.path(), &["model.safetensors", "missing"]);

    let d = tempfile::tempdir().unwrap();
    good(d.path());
    std::fs::remove_file(shard(d.path(), 2)).unwrap();
    fails(d.path(), &["model-00002-of-00002.safetensors", "missing"]);

    fails(&d.path().join("nonexistent"), &["nonexistent", "missing"]);
}

#[test]
fn unsupported_architecture() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let p = d.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(&p, c.to_string()).unwrap();
    fails(
        d.path(),
        &[
            "config.json",
            "unsupported architecture",
            "Qwen2ForCausalLM",
        ],
    );
}

#[test]
fn missing_tensor_and_wrong_shape() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let p = d.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&p, c.to_string()).unwrap();
    fails(d.path(), &["model.layers.2.", "missing"]);

    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let p = d.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["intermediate_size"] = serde_json::json!(128);
    std::fs::write(&p, c.to_string()).unwrap();
    fails(
        d.path(),
        &[
            "mlp.",
            "shape",
            "disagrees with config.json",
            ".safetensors",
        ],
    );

    // A tensor config.json does not account for.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let p = d.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(&p, c.to_string()).unwrap();
    fails(d.path(), &["model.layers.1.", "unexpected tensor"]);
}

/// Rewrites `dir/name` (JSON) with `edit`, creating it from `{}` when absent.
fn edit_json(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(name);
    let mut v: serde_json::Value = match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).unwrap(),
        Err(_) => serde_json::json!({}),
    };
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn config_counts_are_checked_against_the_weights_before_anything_is_sized() {
    // A vocabulary of 2^31 - 1 (or 60 million) tokens over an embedding of 49152 rows: the
    // vocabulary table was allocated from config.json first (SIGABRT, or 3.6 GB).
    for n in [(1u64 << 31) - 1, 60_000_000] {
        let d = tempfile::tempdir().unwrap();
        good(d.path());
        edit_json(d.path(), "config.json", |c| {
            c["vocab_size"] = serde_json::json!(n)
        });
        fails(
            d.path(),
            &[
                "config.json",
                &format!("vocab_size {n}"),
                "model.embed_tokens.weight",
                "49152 rows",
            ],
        );
    }
}

#[test]
fn convert_refuses_what_run_would_refuse_leaving_nothing() {
    let with = |edit: &dyn Fn(&Path)| {
        let d = tempfile::tempdir().unwrap();
        good(d.path());
        edit(d.path());
        d
    };
    // Llama 3 rope scaling with a negative factor: rope_freqs would be negative, which the
    // engine refuses; with 0 they would be NaN.
    let d = with(&|p| {
        edit_json(p, "config.json", |c| {
            c["rope_scaling"] = serde_json::json!({
                "factor": -8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"
            })
        })
    });
    fails(d.path(), &["rope_freqs.weight", "not positive"]);
    let d = with(&|p| {
        edit_json(p, "config.json", |c| {
            c["rope_scaling"] = serde_json::json!({
                "factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"
            })
        })
    });
    fails(d.path(), &["rope_freqs.weight"]);
    // add_bos_token without a BOS token.
    let d = with(&|p| {
        edit_json(p, "config.json", |c| {
            c.as_object_mut().unwrap().remove("bos_token_id");
        });
        edit_json(p, "tokenizer_config.json", |t| {
            t["add_bos_token"] = serde_json::json!(true)
        });
    });
    fails(d.path(), &["no BOS token", "nothing was written"]);
    // Chat templates: one that does not compile, one over the size limit, one that grows
    // memory until its render worker dies.
    for (template, needle) in [
        ("{% for m in messages %}".to_string(), "does not compile"),
        ("x".repeat((1 << 20) + 1), "more than the allowed"),
        (
            "{% set ns = namespace(v='x') %}{% for i in range(40) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}{{ ns.v }}".to_string(),
            "exceeded 256 MiB",
        ),
    ] {
        let d = with(&|p| {
            edit_json(p, "tokenizer_config.json", |t| {
                t["chat_template"] = serde_json::json!(template)
            })
        });
        fails(d.path(), &["tokenizer_config.json", "chat template", needle]);
    }
    // Two texts for one token id: one of them would silently vanish.
    let d = with(&|p| {
        edit_json(p, "tokenizer.json", |t| {
            t["model"]["vocab"]["zzzz-duplicate"] = serde_json::json!(5)
        })
    });
    fails(d.path(), &["tokenizer.json", "token id 5 is given to both"]);
}

#[test]
fn unknown_and_unsupported_dtypes() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let path = shard(d.path(), 1);
    let name = first_tensor_in(&path);
    edit_header(&path, |h| h[&name]["dtype"] = serde_json::json!("Q9"));
    fails(
        d.path(),
        &[
            &name,
            "unknown dtype \"Q9\"",
            "model-00001-of-00002.safetensors",
        ],
    );

    // A dtype safetensors knows but airlock does not convert (F32 bytes relabelled as I32).
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let path = shard(d.path(), 1);
    let name = first_tensor_in(&path);
    edit_header(&path, |h| h[&name]["dtype"] = serde_json::json!("I32"));
    fails(d.path(), &[&name, "dtype I32 is not supported"]);
}

#[test]
fn hostile_safetensors_headers() {
    // Header length larger than the file.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let path = shard(d.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    fails(
        d.path(),
        &[
            "model-00001-of-00002.safetensors",
            "header length",
            "larger than the file",
        ],
    );

    // Non-UTF-8 header.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let path = shard(d.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] = 0xFF;
    std::fs::write(&path, &bytes).unwrap();
    fails(d.path(), &["model-00001-of-00002.safetensors", "not UTF-8"]);

    // Offsets past the end of the data.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let path = shard(d.path(), 1);
    let name = first_tensor_in(&path);
    edit_header(&path, |h| {
        h[&name]["data_offsets"] = serde_json::json!([0u64, 1u64 << 40])
    });
    fails(d.path(), &[&name, "out of range"]);

    // Overlapping offsets: two tensors claim the same bytes.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let path = shard(d.path(), 1);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // Two 1-D norm tensors of the same size: point the second at the first's bytes.
    let norms: Vec<(String, serde_json::Value)> = h
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.contains("layernorm"))
        .map(|(k, v)| (k.clone(), v["data_offsets"].clone()))
        .collect();
    assert!(norms.len() >= 2);
    let (victim, offs) = (norms[1].0.clone(), norms[0].1.clone());
    edit_header(&path, |h| h[&victim]["data_offsets"] = offs);
    fails(d.path(), &["model-00001-of-00002.safetensors", "overlap"]);

    // Garbage instead of JSON.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let path = shard(d.path(), 2);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'[';
    std::fs::write(&path, &bytes).unwrap();
    fails(
        d.path(),
        &["model-00002-of-00002.safetensors", "bad safetensors file"],
    );

    // An index pointing outside the checkpoint directory.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let p = d.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("model-00002-of-00002.safetensors", "../../etc/passwd");
    std::fs::write(&p, text).unwrap();
    fails(
        d.path(),
        &["model.safetensors.index.json", "not a file name"],
    );
}

#[test]
fn disk_full_leaves_nothing() {
    // RLIMIT_FSIZE in a child shell with SIGXFSZ ignored: writes past 200 KiB fail with EFBIG.
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let outdir = tempfile::tempdir().unwrap();
    let out = outdir.path().join("out.gguf");
    let script = format!(
        "trap '' XFSZ; ulimit -f 200; exec '{}' convert '{}' -o '{}' --type f32",
        env!("CARGO_BIN_EXE_airlock"),
        s(d.path()),
        s(&out)
    );
    let o = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("writing") && err.contains("out.gguf"), "{err}");
    assert!(
        err.contains("File too large") || err.contains("too large"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(outdir.path()).unwrap().count(), 0);
}

/// A checkpoint big enough that a conversion is still running when a signal arrives.
fn slow_checkpoint(dir: &Path) {
    write_checkpoint(
        dir,
        &Spec {
            layers: 4,
            hidden: 256,
            heads: 8,
            kv_heads: 4,
            ffn: 1024,
            tied: false,
            ..spec()
        },
    );
}

#[test]
fn sigint_sigterm_and_sighup_mid_convert_leave_nothing_beside_out() {
    let d = tempfile::tempdir().unwrap();
    slow_checkpoint(d.path());
    for sig in ["INT", "TERM", "HUP"] {
        let outdir = tempfile::tempdir().unwrap();
        let out = outdir.path().join("out.gguf");
        let child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["convert", s(d.path()), "-o", s(&out), "--type", "q4_0"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the temporary file to appear, then signal.
        let start = std::time::Instant::now();
        while std::fs::read_dir(outdir.path()).unwrap().count() == 0
            && start.elapsed().as_secs() < 20
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let kill = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        if o.status.success() {
            // Finished before the signal landed: the output must then be complete.
            GgufFile::open(&out).unwrap();
            continue;
        }
        assert_eq!(o.status.code(), Some(130), "SIG{sig}: {err}");
        assert!(err.contains("interrupted"), "SIG{sig}: {err}");
        assert!(!out.exists());
        let left: Vec<_> = std::fs::read_dir(outdir.path()).unwrap().collect();
        assert!(left.is_empty(), "SIG{sig} left behind: {left:?}");
    }
}

#[test]
fn a_second_signal_exits_at_once_and_still_removes_the_temporary_file() {
    let d = tempfile::tempdir().unwrap();
    slow_checkpoint(d.path());
    let outdir = tempfile::tempdir().unwrap();
    let out = outdir.path().join("out.gguf");
    let child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["convert", s(d.path()), "-o", s(&out), "--type", "q4_0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::read_dir(outdir.path()).unwrap().count() == 0 && start.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let pid = child.id().to_string();
    for sig in ["-TERM", "-TERM"] {
        let _ = Command::new("kill").args([sig, &pid]).status();
    }
    let o = child.wait_with_output().unwrap();
    if o.status.success() {
        GgufFile::open(&out).unwrap();
        return;
    }
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(outdir.path()).unwrap().count(), 0);
}

/// `convert --type q4_k_m` (and q3_k_m) writes the file `convert --type f32` then `quantize` does:
/// the mix follows the same model facts whichever way in. Needs the K-quant quantizers.
#[test]
fn k_mixes_convert_as_they_quantize() {
    let d = tempfile::tempdir().unwrap();
    let sp = Spec {
        layers: 8,
        hidden: 256,
        heads: 4,
        kv_heads: 1,
        ffn: 512,
        tied: false,
        ..spec()
    };
    write_checkpoint(&d.path().join("ckpt"), &sp);
    let ckpt = d.path().join("ckpt");
    let f32 = d.path().join("m.f32.gguf");
    let o = airlock(&["convert", s(&ckpt), "-o", s(&f32), "--type", "f32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for ty in ["q4_k_m", "q3_k_m"] {
        let direct = d.path().join(format!("m.{ty}.gguf"));
        let via = d.path().join(format!("m.{ty}-from-f32.gguf"));
        let o = airlock(&["convert", s(&ckpt), "-o", s(&direct), "--type", ty]);
        assert!(o.status.success(), "{ty}: {}", stderr(&o));
        let o = airlock(&["quantize", s(&f32), "-o", s(&via), "--type", ty]);
        assert!(o.status.success(), "{ty}: {}", stderr(&o));
        assert!(
            std::fs::read(&direct).unwrap() == std::fs::read(&via).unwrap(),
            "{ty}: convert and quantize differ"
        );
        let f = GgufFile::open(&direct).unwrap();
        let ty_of = |n: &str| f.tensor(n).unwrap().ty;
        assert_eq!(ty_of("output.weight"), GgmlType::Q6_K, "{ty}");
        let (v0, v7) = match ty {
            "q4_k_m" => (GgmlType::Q6_K, GgmlType::Q6_K),
            _ => (GgmlType::Q5_K, GgmlType::Q4_K),
        };
        assert_eq!(ty_of("blk.0.attn_v.weight"), v0, "{ty}");
        assert_eq!(ty_of("blk.7.attn_v.weight"), v7, "{ty}");
        assert_eq!(
            f.get_u32("general.file_type"),
            Some(if ty == "q4_k_m" { 15 } else { 12 })
        );
    }
}

/// Runs airlock expecting failure with `needle` on stderr; `victim` must keep its bytes.
fn refused_keeping(args: &[&str], needle: &str, victim: &Path) {
    let before = std::fs::read(victim).ok();
    let o = airlock(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} should fail: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in: {err}"
    );
    assert_eq!(
        std::fs::read(victim).ok(),
        before,
        "{args:?} changed {victim:?}"
    );
}

#[test]
fn outputs_that_are_inputs_devices_fifos_or_existing_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    write_checkpoint(&ck, &spec());
    let gguf = d.path().join("in.gguf");
    std::fs::copy(
        root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf"),
        &gguf,
    )
    .unwrap();
    let hard = d.path().join("hard.gguf");
    std::fs::hard_link(&gguf, &hard).unwrap();
    let soft = d.path().join("soft.gguf");
    std::os::unix::fs::symlink(&gguf, &soft).unwrap();
    let fifo = d.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let existing = d.path().join("existing.gguf");
    std::fs::write(&existing, b"keep me").unwrap();

    let weights = ck.join("model.safetensors");
    let convert = |out: &Path, extra: &[&str]| {
        let mut a = vec!["convert", s(&ck), "-o", s(out), "--type", "q8_0"];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let quantize = |out: &Path, extra: &[&str]| {
        let mut a = vec!["quantize", s(&gguf), "-o", s(out), "--type", "q8_0"];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>, needle: &str, victim: &Path| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused_keeping(&a, needle, victim);
    };
    // One of the inputs, even with --overwrite: by its name, a hard link or a symlink.
    run(
        convert(&weights, &["--overwrite"]),
        "is the input",
        &weights,
    );
    run(
        convert(&ck.join("config.json"), &["--overwrite"]),
        "is the input",
        &ck.join("config.json"),
    );
    for p in [&gguf, &hard, &soft] {
        run(quantize(p, &["--overwrite"]), "is the input", &gguf);
    }
    // Devices, FIFOs and directories, even with --overwrite.
    run(
        quantize(Path::new("/dev/null"), &["--overwrite"]),
        "character device",
        Path::new("/dev/null"),
    );
    run(quantize(&fifo, &["--overwrite"]), "FIFO", &existing);
    run(convert(&fifo, &["--overwrite"]), "FIFO", &existing);
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    run(quantize(d.path(), &["--overwrite"]), "directory", &existing);
    // An existing file needs --overwrite.
    run(quantize(&existing, &[]), "--overwrite", &existing);
    run(convert(&existing, &[]), "--overwrite", &existing);
    // bench --synthetic --save: onto its own --vocab, or an existing file.
    let vocab = s(&gguf);
    for (save, needle, extra) in [
        (&gguf, "is the input", "--overwrite"),
        (&existing, "--overwrite", "-q"),
    ] {
        let mut a = vec![
            "bench",
            "--synthetic",
            "smollm2-135m",
            "--vocab",
            vocab,
            "--save",
            s(save),
            "-p",
            "0",
            "-n",
            "1",
        ];
        if extra == "--overwrite" {
            a.push(extra);
        }
        refused_keeping(&a, needle, save);
    }
    // Nothing else appeared beside the outputs.
    let mut names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ck",
            "existing.gguf",
            "fifo",
            "hard.gguf",
            "in.gguf",
            "soft.gguf"
        ]
    );
    // With --overwrite an existing file is replaced, and a symlink is replaced, not followed.
    let o = airlock(
        &quantize(&existing, &["--overwrite"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    GgufFile::open(&existing).unwrap();
    let target = d.path().join("target.gguf");
    std::fs::write(&target, b"target").unwrap();
    let link = d.path().join("link.gguf");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = airlock(
        &quantize(&link, &["--overwrite"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&target).unwrap(), b"target");
    assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
}

#[test]
fn export_refuses_a_non_empty_directory_and_bad_gguf() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("keep.txt"), "x").unwrap();
    let o = airlock(&[
        "export",
        s(&root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf")),
        "-o",
        s(d.path()),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not an empty directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);

    let bad = d.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = d.path().join("out");
    let o = airlock(&["export", s(&bad), "-o", s(&out)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.gguf"), "{}", stderr(&o));
    assert!(!out.exists());
    let o = airlock(&["quantize", s(&bad), "-o", s(&out), "--type", "q8_0"]);
    assert!(!o.status.success());
    assert!(!out.exists());
}

#[test]
fn default_bf16_export_converts_and_runs() {
    let fixture = root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf");
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    let o = airlock(&["export", s(&fixture), "-o", s(&hf)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["rope_scaling"]["factor"], 8.0);
    let st = std::fs::read(hf.join("model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    let q = parsed
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.dtype(), Dtype::BF16);
    assert_eq!(q.shape(), &[64, 64]);
    assert!(parsed.tensor("lm_head.weight").is_err(), "tied: no lm_head");
    let out = d.path().join("back.q4_0.gguf");
    let o = airlock(&["convert", s(&hf), "-o", s(&out), "--type", "q4_0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = GgufFile::open(&out).unwrap();
    // Tied embedding = output head: Q8_0 under the q4 policy.
    assert_eq!(f.tensor("token_embd.weight").unwrap().ty, GgmlType::Q8_0);
    assert_eq!(f.tensor("blk.1.ffn_up.weight").unwrap().ty, GgmlType::Q4_0);
    let model = LlamaModel::load(Arc::new(f)).unwrap();
    let mut sess = Session::new(&model, 4, KvType::F32, Precision::Exact);
    let l = sess.forward(&model, &[128000, 9906], Logits::Last).unwrap();
    assert!(l.iter().all(|x| x.is_finite()));
}

/// Overwrites value `i` of tensor `name` (f32) in a safetensors file with `v`.
fn poke_f32(path: &Path, name: &str, i: usize, v: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(h[name]["dtype"], "F32", "{name}");
    let start = h[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n + 4 * i;
    bytes[start..start + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor_unless_allowed() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    write_checkpoint(&ck, &spec());
    let st = ck.join("model.safetensors");
    // Row 1, column 3 of layer 0's K projection (64 columns).
    poke_f32(
        &st,
        "model.layers.0.self_attn.k_proj.weight",
        64 + 3,
        f32::NAN,
    );
    fails(&ck, &["blk.0.attn_k.weight", "non-finite", "NaN"]);

    // Allowed: the file is written, NaN and all (f32 keeps it as it is).
    let nan_gguf = d.path().join("nan.f32.gguf");
    let o = airlock(&["convert", s(&ck), "-o", s(&nan_gguf), "--type", "f32"]);
    assert!(!o.status.success());
    let o = airlock(&[
        "convert",
        s(&ck),
        "-o",
        s(&nan_gguf),
        "--type",
        "f32",
        "--allow-nonfinite",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // quantize refuses the same tensor from a GGUF, and leaves nothing at OUT.
    let q = d.path().join("q.gguf");
    let o = airlock(&["quantize", s(&nan_gguf), "-o", s(&q), "--type", "q8_0"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("non-finite"),
        "{err}"
    );
    assert!(!q.exists());
    let o = airlock(&[
        "quantize",
        s(&nan_gguf),
        "-o",
        s(&q),
        "--type",
        "q8_0",
        "--allow-nonfinite",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // An infinity is refused the same way.
    write_checkpoint(&ck, &spec());
    poke_f32(&st, "model.embed_tokens.weight", 5, f32::INFINITY);
    fails(&ck, &["token_embd.weight", "non-finite", "inf"]);
}

#[test]
fn every_config_key_takes_every_hostile_value() {
    // config.json is hostile input: each of its keys (and rope_scaling's, and keys convert
    // reads when present) set to each hostile JSON value in turn converts, or fails with an
    // error and nothing at OUT; never a panic or a signal.
    use serde_json::{json, Value};
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let config = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    let mut base: Value = serde_json::from_str(&config).unwrap();
    base["rope_scaling"] = json!({
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"
    });
    // Eight values: with about 30 keys that is about 240 converts.
    let hostile = [
        json!(null),
        json!(-1),
        json!(0),
        json!(3),
        json!(u64::MAX),
        json!(1e308),
        json!(""),
        json!([0, 1]),
    ];
    let mut keys: Vec<Vec<String>> = base
        .as_object()
        .unwrap()
        .keys()
        .map(|k| vec![k.clone()])
        .collect();
    for k in base["rope_scaling"].as_object().unwrap().keys() {
        keys.push(vec!["rope_scaling".into(), k.clone()]);
    }
    for k in [
        "head_dim",
        "attention_bias",
        "mlp_bias",
        "pretraining_tp",
        "torch_dtype",
    ] {
        keys.push(vec![k.into()]);
    }
    // Two workers, each with its own copy of the checkpoint, take every other key: the sweep is
    // about 240 converts of about 0.3-0.5 s each, most of it parsing tokenizer.json on one thread,
    // and it was most of this file's time with a core idle.
    let sweep = |keys: Vec<&Vec<String>>| {
        let d = tempfile::tempdir().unwrap();
        good(d.path());
        let path = d.path().join("config.json");
        let outdir = tempfile::tempdir().unwrap();
        let out = outdir.path().join("out.gguf");
        let (mut ok, mut refused) = (0, 0);
        for key in keys {
            for v in &hostile {
                let mut c = base.clone();
                match key.as_slice() {
                    [k] => c[k] = v.clone(),
                    [a, b] => c[a][b] = v.clone(),
                    _ => unreachable!(),
                }
                std::fs::write(&path, c.to_string()).unwrap();
                let o = airlock(&["convert", s(d.path()), "-o", s(&out), "--type", "f16"]);
                let err = stderr(&o);
                let what = format!("{key:?} = {v}");
                assert!(
                    matches!(o.status.code(), Some(0 | 1)) && !err.contains("panicked"),
                    "{what}: {:?}\n{err}",
                    o.status
                );
                if o.status.success() {
                    ok += 1;
                    std::fs::remove_file(&out).unwrap();
                } else {
                    refused += 1;
                    let left: Vec<_> = std::fs::read_dir(outdir.path()).unwrap().collect();
                    assert!(left.is_empty(), "{what}: left behind {left:?}");
                }
            }
        }
        (ok, refused)
    };
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| sweep(keys.iter().step_by(2).collect()));
        let b = sweep(keys.iter().skip(1).step_by(2).collect());
        (a.join().unwrap_or_else(|e| std::panic::resume_unwind(e)), b)
    });
    let (ok, refused) = (a.0 + b.0, a.1 + b.1);
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
}
