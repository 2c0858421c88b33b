//! `convert` / `quantize` write llama-quantize's per-tensor mix, byte for byte.
//!
//! The references in tests/fixtures/llamacpp/kquant-*.json were made by llama.cpp's own
//! `llama-quantize` (no-FMA build, commit 0c1e57098) from the input files this test writes
//! (`scripts/make-kquant-fixtures.sh`; provenance in tests/fixtures/README.md):
//! - `kquant-llama-3.1-8b.json`: the type of every tensor of a Llama-3.1-8B-shaped model for each
//!   `--type`, from `llama-quantize --dry-run` (the data is never read, so the input is a sparse
//!   file of zeros). Checked against airlock's policy alone.
//! - `kquant-kq-256.json` (rows all multiples of 256, 16 layers, untied) and
//!   `kquant-kq-fallback.json` (576-like widths that need llama.cpp's fallback types, tied, no
//!   grouped-query attention): types and the sha256 of every tensor's bytes in llama-quantize's
//!   output. The inputs are deterministic pseudo-random BF16 weights (with all-zero, constant,
//!   all-negative and tiny rows in every matrix), regenerated here and checked by the sha256 of
//!   their data first, so a changed generator is reported as such.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use airlock_convert::{ModelFacts, OutType, Policy};
use airlock_engine::gguf::{Array, GgufFile, GgufWriter, TensorSpec, Value};
use airlock_kernels::GgmlType;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// A Llama model shape, as far as the tensor list goes.
struct Shape {
    name: &'static str,
    n_layer: u64,
    n_embd: u64,
    n_ff: u64,
    n_head: u64,
    n_head_kv: u64,
    n_vocab: u64,
    tied: bool,
    rope_freqs: bool,
}

const SHAPES: [Shape; 3] = [
    // meta-llama/Llama-3.1-8B.
    Shape {
        name: "llama-3.1-8b",
        n_layer: 32,
        n_embd: 4096,
        n_ff: 14336,
        n_head: 32,
        n_head_kv: 8,
        n_vocab: 128256,
        tied: false,
        rope_freqs: true,
    },
    // Every row a multiple of 256 (as Llama-3.2-1B's), at a size CI quantizes in a second; 16
    // layers so every use_more_bits and n/16 case occurs; 4 query heads per KV head as Llama 3.
    Shape {
        name: "kq-256",
        n_layer: 16,
        n_embd: 256,
        n_ff: 768,
        n_head: 4,
        n_head_kv: 1,
        n_vocab: 512,
        tied: false,
        rope_freqs: true,
    },
    // SmolLM2-like: 320-wide rows fit 32 but not 256 (fallback types), ffn_down 512 wide fits
    // 256; tied embeddings; one query head per KV head (q2_k's attn_v is then Q3_K).
    Shape {
        name: "kq-fallback",
        n_layer: 8,
        n_embd: 320,
        n_ff: 512,
        n_head: 5,
        n_head_kv: 5,
        n_vocab: 384,
        tied: true,
        rope_freqs: false,
    },
];

fn shape(name: &str) -> &'static Shape {
    SHAPES.iter().find(|s| s.name == name).unwrap()
}

/// The tensors in the order `airlock convert` (and llama.cpp's converter) writes them.
fn tensors(s: &Shape) -> Vec<TensorSpec> {
    let (e, f) = (s.n_embd, s.n_ff);
    let hd = e / s.n_head;
    let kv = hd * s.n_head_kv;
    let t = |name: String, dims: Vec<u64>| TensorSpec {
        ty: if dims.len() == 1 {
            GgmlType::F32
        } else {
            GgmlType::BF16
        },
        name,
        dims,
    };
    let mut v = Vec::new();
    if s.rope_freqs {
        v.push(t("rope_freqs.weight".into(), vec![hd / 2]));
    }
    v.push(t("token_embd.weight".into(), vec![e, s.n_vocab]));
    for i in 0..s.n_layer {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        v.push(t(n("attn_norm"), vec![e]));
        v.push(t(n("ffn_down"), vec![f, e]));
        v.push(t(n("ffn_gate"), vec![e, f]));
        v.push(t(n("ffn_up"), vec![e, f]));
        v.push(t(n("ffn_norm"), vec![e]));
        v.push(t(n("attn_k"), vec![e, kv]));
        v.push(t(n("attn_output"), vec![e, e]));
        v.push(t(n("attn_q"), vec![e, e]));
        v.push(t(n("attn_v"), vec![e, kv]));
    }
    v.push(t("output_norm.weight".into(), vec![e]));
    if !s.tied {
        v.push(t("output.weight".into(), vec![e, s.n_vocab]));
    }
    v
}

fn metadata(s: &Shape) -> Vec<(String, Value)> {
    let u = |x: u64| Value::U32(x as u32);
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String(format!("{} (test weights)", s.name)),
        ),
        ("general.file_type".into(), Value::U32(32)),
        ("llama.block_count".into(), u(s.n_layer)),
        ("llama.context_length".into(), u(4096)),
        ("llama.embedding_length".into(), u(s.n_embd)),
        ("llama.feed_forward_length".into(), u(s.n_ff)),
        ("llama.attention.head_count".into(), u(s.n_head)),
        ("llama.attention.head_count_kv".into(), u(s.n_head_kv)),
        ("llama.rope.freq_base".into(), Value::F32(500000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.dimension_count".into(), u(s.n_embd / s.n_head)),
        ("llama.vocab_size".into(), u(s.n_vocab)),
        ("general.quantization_version".into(), Value::U32(2)),
        // A vocabulary of the embedding's size: quantize refuses a model run would refuse, and
        // run needs one. Metadata only: the tensors (and their reference sha256s) are unchanged.
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(
                (0..s.n_vocab)
                    .map(|i| format!("t{i}"))
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str)
                    .collect(),
            )),
        ),
    ]
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform value in [0, 1), exactly representable, from `key`.
fn unit(key: u64) -> f64 {
    (splitmix(key) >> 11) as f64 / (1u64 << 53) as f64
}

/// The values of tensor `ti` (deterministic, IEEE-exact arithmetic only, so every machine makes
/// the same bytes). Matrix rows have roughly Gaussian values with a per-row scale from 2^-3 to
/// 2^3 times 0.02 and one outlier in 200; rows 0-3 are all zero, constant, all negative, and tiny
/// (1e-18 scale), the corners of the quantizers' searches.
fn values(ti: u64, spec: &TensorSpec) -> Vec<f32> {
    let row_len = spec.dims[0] as usize;
    let n: u64 = spec.dims.iter().product();
    let seed = (ti + 1) << 40;
    if spec.dims.len() == 1 {
        return (0..n)
            .map(|i| (1.0 + 0.25 * (unit(seed ^ i) - 0.5)) as f32)
            .collect();
    }
    let mut v = vec![0f32; n as usize];
    for (r, row) in v.chunks_mut(row_len).enumerate() {
        let rkey = seed ^ ((r as u64) << 20) ^ 0xABCD;
        let k = splitmix(rkey) % 7;
        let mut scale = 0.02 * (1u64 << k) as f64 / 8.0;
        if r == 3 {
            scale = 1e-18;
        }
        for (c, x) in row.iter_mut().enumerate() {
            let key = seed ^ (((r as u64) * row_len as u64 + c as u64) * 8);
            let g = (unit(key) + unit(key + 1) + unit(key + 2) + unit(key + 3) - 2.0) * 1.7320508;
            let mut y = scale * g;
            if unit(key + 4) < 0.005 {
                y *= 8.0;
            }
            *x = match r {
                0 => 0.0,
                1 => scale as f32,
                2 => -(y.abs() as f32),
                _ => y as f32,
            };
        }
    }
    v
}

fn tensor_bytes(ti: u64, spec: &TensorSpec) -> Vec<u8> {
    let v = values(ti, spec);
    let mut out = vec![0u8; spec.ty.row_bytes(v.len() as u64).unwrap() as usize];
    airlock_kernels::quantize_row(spec.ty, &v, &mut out).unwrap();
    out
}

/// Writes the input model of `s` to `path` and returns the sha256 of its tensor data (all
/// tensors' bytes in file order). `sparse`: header only, the data a hole of zeros (for
/// `llama-quantize --dry-run`, which reads no data).
fn write_input(s: &Shape, path: &Path, sparse: bool) -> String {
    let specs = tensors(s);
    let mut header = Vec::new();
    let w = GgufWriter::new(&mut header, &metadata(s), &specs).unwrap();
    let align = w.alignment();
    drop(w);
    let mut f = File::create(path).unwrap();
    f.write_all(&header).unwrap();
    let mut h = Sha256::new();
    let mut size = header.len() as u64;
    for (i, spec) in specs.iter().enumerate() {
        let n: u64 = spec.ty.row_bytes(spec.dims.iter().product()).unwrap();
        let padded = n.div_ceil(align) * align;
        if !sparse {
            let b = tensor_bytes(i as u64, spec);
            h.update(&b);
            f.write_all(&b).unwrap();
            f.write_all(&vec![0u8; (padded - n) as usize]).unwrap();
        }
        size += padded;
    }
    f.set_len(size).unwrap();
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fixture(name: &str) -> Json {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llamacpp")
        .join(format!("kquant-{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ggml_type(name: &str) -> GgmlType {
    *airlock_kernels::types::all()
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("type {name}"))
}

/// The fixture's tensors: (name, dims, input type), in llama-quantize's order.
fn fixture_tensors(j: &Json) -> Vec<(String, Vec<u64>, GgmlType)> {
    j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let dims = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (
                t["name"].as_str().unwrap().to_string(),
                dims,
                ggml_type(t["type"].as_str().unwrap()),
            )
        })
        .collect()
}

fn strings(j: &Json) -> Vec<String> {
    j.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// For each shape: the fixture's tensor list is the one this test writes (so the byte test
/// quantizes what llama-quantize quantized), and airlock's policy gives llama-quantize's type for
/// every tensor under every `--type`.
#[test]
fn type_of_every_tensor_is_llama_quantizes() {
    for s in &SHAPES {
        let j = fixture(s.name);
        let ts = fixture_tensors(&j);
        let mut ours: Vec<(String, Vec<u64>, GgmlType)> = tensors(s)
            .into_iter()
            .map(|t| (t.name, t.dims, t.ty))
            .collect();
        let mut theirs = ts.clone();
        ours.sort_by(|a, b| a.0.cmp(&b.0));
        theirs.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(ours, theirs, "{}: tensor list", s.name);
        let m = &j["model"];
        let facts = ModelFacts {
            n_layer: m["n_layer"].as_u64().unwrap(),
            n_head: m["n_head"].as_u64().unwrap(),
            n_head_kv: m["n_head_kv"].as_u64().unwrap(),
        };
        assert_eq!(
            (facts.n_layer, facts.n_head, facts.n_head_kv),
            (s.n_layer, s.n_head, s.n_head_kv)
        );
        let list: Vec<(&str, &[u64], GgmlType)> = ts
            .iter()
            .map(|t| (t.0.as_str(), t.1.as_slice(), t.2))
            .collect();
        let presets = j["presets"].as_object().unwrap();
        assert!(presets.len() >= 14, "{}", s.name);
        for (preset, p) in presets {
            let ty = OutType::parse(preset).unwrap();
            let got = Policy::new(ty).plan(&facts, &list);
            let want = strings(&p["types"]);
            assert_eq!(want.len(), ts.len());
            for ((t, g), w) in ts.iter().zip(&got).zip(&want) {
                assert_eq!(g.name(), w, "{} --type {preset}: {}", s.name, t.0);
            }
            if let Some(ft) = p["file_type"].as_u64() {
                assert_eq!(u64::from(ty.file_type()), ft, "{preset}");
            }
        }
    }
}

fn airlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .output()
        .expect("run airlock")
}

/// `airlock quantize` of the regenerated input gives, for every `--type`, llama-quantize's
/// general.file_type and every tensor's type and exact bytes.
///
/// Needs the K-quant and Q5 quantizers (kernels::quant::quantize_row for Q2_K..Q6_K, Q5_0, Q5_1).
#[test]
fn quantize_bytes_are_llama_quantizes() {
    let dir = tempfile::tempdir().unwrap();
    // Every (shape, type) is checked and all differences reported together, so one failure
    // shows which formats are off.
    let mut failures = Vec::new();
    for name in ["kq-256", "kq-fallback"] {
        let s = shape(name);
        let j = fixture(name);
        let input = dir.path().join(format!("{name}.bf16.gguf"));
        let sha = write_input(s, &input, false);
        assert_eq!(
            sha,
            j["input_data_sha256"].as_str().unwrap(),
            "{name}: the generated input differs from the one the fixture was made from \
             (regenerate with scripts/make-kquant-fixtures.sh)"
        );
        let names = fixture_tensors(&j);
        for (preset, p) in j["presets"].as_object().unwrap() {
            let out = dir.path().join(format!("{name}.{preset}.gguf"));
            let o = airlock(&[
                "quantize",
                input.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--type",
                preset,
                "-q",
            ]);
            if !o.status.success() {
                failures.push(format!(
                    "{name} --type {preset}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                continue;
            }
            let f = GgufFile::open(&out).unwrap();
            assert_eq!(
                f.get_u32("general.file_type").map(u64::from),
                p["file_type"].as_u64(),
                "{name} {preset}"
            );
            let (types, shas) = (strings(&p["types"]), strings(&p["sha256"]));
            assert_eq!(f.tensors().len(), names.len());
            let mut bad = Vec::new();
            for ((t, ty), sha) in names.iter().zip(&types).zip(&shas) {
                let got = f.tensor(&t.0).unwrap();
                assert_eq!(got.ty.name(), ty, "{name} {preset} {}", t.0);
                if hex(&Sha256::digest(f.tensor_data(got))) != *sha {
                    bad.push(format!("{} ({ty})", t.0));
                }
            }
            if !bad.is_empty() {
                failures.push(format!(
                    "{name} --type {preset}: bytes differ from llama-quantize's in {} tensors: {}",
                    bad.len(),
                    bad.join(", ")
                ));
            }
            std::fs::remove_file(&out).unwrap();
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes the inputs the fixtures are made from into $AIRLOCK_KQUANT_INPUTS (run by
/// scripts/make-kquant-fixtures.sh, which then runs llama-quantize on them), with the model facts
/// and the sha256 of each one's tensor data in inputs.json.
#[test]
#[ignore = "writes the fixtures' inputs; run by scripts/make-kquant-fixtures.sh"]
fn write_reference_inputs() {
    let dir = PathBuf::from(std::env::var("AIRLOCK_KQUANT_INPUTS").expect("AIRLOCK_KQUANT_INPUTS"));
    let mut info = serde_json::Map::new();
    for s in &SHAPES {
        let sparse = s.name == "llama-3.1-8b";
        let sha = write_input(s, &dir.join(format!("{}.gguf", s.name)), sparse);
        info.insert(
            s.name.into(),
            serde_json::json!({
                "model": { "n_layer": s.n_layer, "n_head": s.n_head, "n_head_kv": s.n_head_kv },
                "input_data_sha256": if sparse { Json::Null } else { Json::String(sha) },
                "sparse": sparse,
            }),
        );
    }
    std::fs::write(
        dir.join("inputs.json"),
        serde_json::to_string_pretty(&Json::Object(info)).unwrap(),
    )
    .unwrap();
}

/// A small GGUF with the given tensors (zero bytes) and metadata, for the error paths.
fn gguf_with(dir: &Path, name: &str, meta: Vec<(String, Value)>, specs: &[TensorSpec]) -> PathBuf {
    let mut w = GgufWriter::new(Vec::new(), &meta, specs).unwrap();
    for s in specs {
        let n: u64 = s.dims.iter().product();
        w.write_tensor_data(&vec![0u8; s.ty.row_bytes(n).unwrap() as usize])
            .unwrap();
    }
    let p = dir.join(name);
    std::fs::write(&p, w.finish().unwrap()).unwrap();
    p
}

fn spec(name: &str, dims: &[u64], ty: GgmlType) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
    }
}

/// Tensors of types airlock cannot read get one error that lists every one of them, from
/// quantize and from export; nothing is written.
#[test]
fn unreadable_types_are_listed_in_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        spec("blk.0.attn_q.weight", &[256, 2], GgmlType::IQ4_XS),
        spec("blk.0.attn_norm.weight", &[256], GgmlType::F32),
        spec("blk.1.attn_q.weight", &[256, 2], GgmlType::IQ4_XS),
        spec("blk.1.ffn_down.weight", &[256, 2], GgmlType::IQ2_XXS),
    ];
    let p = gguf_with(dir.path(), "iq.gguf", metadata(shape("kq-256")), &specs);
    let out = dir.path().join("out.gguf");
    let o = airlock(&[
        "quantize",
        p.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    for needle in [
        "iq.gguf",
        "3 tensors",
        "IQ4_XS (2 tensors): blk.0.attn_q.weight, blk.1.attn_q.weight",
        "IQ2_XXS (1 tensors): blk.1.ffn_down.weight",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    assert!(!out.exists());
    let hf = dir.path().join("hf");
    let o = airlock(&["export", p.to_str().unwrap(), "-o", hf.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("IQ4_XS (2 tensors): blk.0.attn_q.weight, blk.1.attn_q.weight"),
        "{err}"
    );
    assert!(!hf.exists());
}

/// The mixes are llama.cpp's rules for llama models: quantize needs the facts they read, and
/// says which key is missing; --pure (one type, no rules) does without them.
#[test]
fn quantize_mixes_need_a_llama_model() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        spec("blk.0.attn_v.weight", &[256, 4], GgmlType::F32),
        spec("output.weight", &[256, 4], GgmlType::F32),
    ];
    let run = |p: &Path, args: &[&str]| {
        let out = dir.path().join("o.gguf");
        let _ = std::fs::remove_file(&out);
        let mut a = vec!["quantize", p.to_str().unwrap(), "-o", out.to_str().unwrap()];
        a.extend_from_slice(args);
        let o = airlock(&a);
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let mut meta = metadata(shape("kq-256"));
    meta.retain(|(k, _)| k != "llama.block_count");
    let p = gguf_with(dir.path(), "nolayers.gguf", meta, &specs);
    let (ok, err) = run(&p, &["--type", "q4_k_m"]);
    assert!(!ok);
    assert!(err.contains("llama.block_count is missing"), "{err}");
    // Since the hostile-input work, quantize refuses any file run would refuse, so --pure and
    // f16 no longer do without the key either.
    for args in [&["--type", "q8_0", "--pure"][..], &["--type", "f16"]] {
        let (ok, err) = run(&p, args);
        assert!(!ok, "{args:?}");
        assert!(err.contains("llama.block_count is missing"), "{err}");
    }

    let mut meta = metadata(shape("kq-256"));
    meta[0].1 = Value::String("falcon".into());
    let p = gguf_with(dir.path(), "falcon.gguf", meta, &specs);
    let (ok, err) = run(&p, &["--type", "q4_0"]);
    assert!(!ok);
    // Refused as an architecture run does not run (before the mix rules would name --pure).
    assert!(err.contains("falcon"), "{err}");

    let (ok, err) = run(&p, &["--type", "q4_k_x"]);
    assert!(!ok);
    assert!(err.contains("q4_k_m"), "{err}");
    let (ok, err) = run(&p, &["--type", "q8_0", "--output-type", "q4_k_m"]);
    assert!(!ok);
    assert!(err.contains("q6_k"), "{err}");
}
