//! `airlock bench`: llama-bench-compatible JSON, and synthetic models of real shapes.

use std::path::PathBuf;
use std::process::Command;

use airlock_engine::gguf::GgufFile;

mod support;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn synthetic_model_has_the_real_shape_and_bench_json_has_llama_bench_fields() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("smol.gguf");
    let vocab = root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "bench",
            "--synthetic",
            "smollm2-135m",
            "--type",
            "q4_0",
            "-p",
            "8",
            "-n",
            "4",
            "-r",
            "2",
            "-t",
            "1,2",
            "--json",
        ])
        .arg("--save")
        .arg(&saved)
        .arg("--vocab")
        .arg(&vocab)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    // (pp8, tg4) x (1, 2 threads)
    assert_eq!(rows.len(), 4);
    for r in rows {
        for key in [
            "model_filename",
            "model_type",
            "n_threads",
            "n_prompt",
            "n_gen",
            "avg_ts",
            "stddev_ts",
            "samples_ts",
            "simd",
        ] {
            assert!(r.get(key).is_some(), "missing {key} in {r}");
        }
        assert_eq!(r["samples_ts"].as_array().unwrap().len(), 2);
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
        assert!(r["model_type"].as_str().unwrap().ends_with("Q4_0"), "{r}");
    }
    assert_eq!(
        (rows[0]["n_prompt"].as_u64(), rows[0]["n_gen"].as_u64()),
        (Some(8), Some(0))
    );
    assert_eq!(
        (rows[1]["n_prompt"].as_u64(), rows[1]["n_gen"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(rows[2]["n_threads"].as_u64(), Some(2));

    // The saved file is SmolLM2's layout with the Llama 3 vocabulary: 30 blocks of 9 tensors,
    // the embedding (tied, so Q8_0 like the converter's policy) and the output norm.
    let f = GgufFile::open(&saved).unwrap();
    assert_eq!(f.tensors().len(), 30 * 9 + 2);
    assert_eq!(
        f.tensor("blk.0.ffn_gate.weight").unwrap().dims,
        vec![576, 1536]
    );
    assert_eq!(
        f.tensor("blk.0.attn_k.weight").unwrap().dims,
        vec![576, 192]
    );
    assert_eq!(f.tensor("token_embd.weight").unwrap().ty.name(), "Q8_0");
    assert_eq!(
        f.tensor("blk.29.ffn_down.weight").unwrap().ty.name(),
        "Q4_0"
    );
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("llama-bpe"));
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        128256
    );

    // Repacking is on by default where the path has packed kernels (x86 from AVX2 up; the
    // child process sees the same CPU and AIRLOCK_SIMD as this one), and --no-repack turns it
    // off; the JSON row says which ran.
    let has_packed = airlock_kernels::packed::packed_kernels().is_some();
    assert_eq!(
        has_packed,
        cfg!(target_arch = "x86_64") && rows[0]["simd"] != "scalar",
        "{}",
        rows[0]["simd"]
    );
    for (flag, want) in [(None, has_packed), (Some("--no-repack"), false)] {
        let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args([
                "bench", "-p", "4", "-n", "0", "-r", "1", "-t", "1", "--json", "-m",
            ])
            .arg(&saved)
            .args(flag)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(rows[0]["repack"].as_bool(), Some(want), "{flag:?}: {rows}");
    }
}

#[test]
fn unknown_synthetic_shape_is_refused_with_the_known_ones_listed() {
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["bench", "--synthetic", "llama-9b", "-p", "1", "-n", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("llama-3.1-8b") && err.contains("llama-3.2-1b"),
        "{err}"
    );
}

/// An I/O error is printed once: the error that carries it (the GGUF reader's) says it in its
/// message and does not also hand it on as its `source()`, which the CLI's `{:#}` would print
/// again ("...: No such file or directory (os error 2): No such file or directory (os error 2)").
#[test]
fn a_missing_vocabulary_file_is_named_with_its_io_error_once() {
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "bench",
            "--synthetic",
            "llama-3.2-1b",
            "--vocab",
            "/nonexistent/vocab.gguf",
        ])
        .args(["-p", "1", "-n", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/vocab.gguf"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// `--ceiling` adds the read bandwidth and weight bytes per token to every row, and to
/// generation rows the ceiling they imply; the bytes are the model's matrices, counted from
/// the file here independently of the engine.
#[test]
fn ceiling_is_read_bandwidth_over_the_weights_read_per_token() {
    let model = support::model();
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "bench",
            "-p",
            "4",
            "-n",
            "2",
            "-r",
            "1",
            "-t",
            "1",
            "--json",
            "--ceiling",
            "-m",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (pp, tg) = (&rows[0], &rows[1]);

    // Every matrix the forward pass multiplies by: the seven of each block, and the output
    // head, which SmolLM2 ties to the embedding.
    let f = GgufFile::open(&model).unwrap();
    assert!(f.tensor("output.weight").is_none());
    let want: u64 = f
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.dims.len() == 2)
        .map(|t| t.n_bytes)
        .sum::<u64>()
        + f.tensor("token_embd.weight").unwrap().n_bytes;
    assert_eq!(tg["weight_bytes_per_token"].as_f64(), Some(want as f64));

    let read = tg["read_bytes_per_s"].as_f64().unwrap();
    // Any machine this runs on reads faster than 100 MB/s and slower than 10 TB/s.
    assert!((1e8..1e13).contains(&read), "{read}");
    // Plus the f16 K and V of the positions before each generated token: (n_gen + 1) / 2 of
    // them on average from an empty cache.
    let u = |k: &str| f.get_u32(k).unwrap() as f64;
    let kv_dim = u("llama.embedding_length") / u("llama.attention.head_count")
        * u("llama.attention.head_count_kv");
    let n_gen = tg["n_gen"].as_f64().unwrap();
    let kv = 2.0 * u("llama.block_count") * kv_dim * 2.0 * (n_gen + 1.0) / 2.0;
    assert_eq!(tg["kv_bytes_per_token"].as_f64(), Some(kv), "{tg}");
    let ceiling = tg["ceiling_ts"].as_f64().unwrap();
    assert!(
        (ceiling * (want as f64 + kv) / read - 1.0).abs() < 1e-9,
        "{tg}"
    );
    assert!(pp.get("ceiling_ts").is_none(), "{pp}");
    // Each test's rate is the mean of reads right before and right after its runs.
    for row in [pp, tg] {
        let pair = row["read_bytes_per_s_before_after"].as_array().unwrap();
        let (b, a) = (pair[0].as_f64().unwrap(), pair[1].as_f64().unwrap());
        assert!(
            (1e8..1e13).contains(&b) && (1e8..1e13).contains(&a),
            "{row}"
        );
        // Not bit-equal: serde_json's default float parser may be one ulp off.
        let mean = row["read_bytes_per_s"].as_f64().unwrap();
        assert!((mean / ((b + a) / 2.0) - 1.0).abs() < 1e-12, "{row}");
    }

    // Without the flag the rows carry none of it.
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "bench", "-p", "0", "-n", "1", "-r", "1", "-t", "1", "--json", "-m",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rows[0].get("read_bytes_per_s").is_none(), "{rows}");
}

#[test]
fn batched_bench_prints_llama_batched_bench_rows() {
    let model = support::model();
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["batched-bench", "-m"])
        .arg(&model)
        .args(["--npp", "12,5", "--ntg", "3", "--npl", "1,3", "-b", "16"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with('|') && !l.contains("---") && !l.contains("PP"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    // (pp 12, pp 5) x (tg 3) x (1, 3 sequences), in that order, with N_KV = B * (PP + TG).
    let want = [(12, 1), (12, 3), (5, 1), (5, 3)];
    assert_eq!(rows.len(), want.len(), "{out}");
    for (r, (pp, b)) in rows.iter().zip(want) {
        assert_eq!(r.len(), 10, "{out}");
        assert_eq!(
            r[..4],
            [
                pp.to_string(),
                "3".into(),
                b.to_string(),
                (b * (pp + 3)).to_string()
            ]
        );
        for v in &r[4..] {
            let x: f64 = v.parse().unwrap();
            assert!(x.is_finite() && x > 0.0, "{out}");
        }
    }

    // A zero in a list is refused with the flag's name.
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["batched-bench", "-m"])
        .arg(&model)
        .args(["--npl", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--npl"));
}

#[test]
fn bench_depth_measures_on_top_of_a_filled_cache_with_llama_bench_fields() {
    let model = support::model();
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["bench", "-m"])
        .arg(&model)
        .args([
            "-p",
            "4",
            "-n",
            "2",
            "-d",
            "0,40",
            "-r",
            "1",
            "--json",
            "--ceiling",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<(u64, u64, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap();
            (n("n_prompt"), n("n_gen"), n("n_depth"))
        })
        .collect();
    assert_eq!(got, [(4, 0, 0), (0, 2, 0), (4, 0, 40), (0, 2, 40)]);
    // At depth the ceiling counts the KV cache read per token beside the weights.
    let kv = |i: usize| rows[i]["kv_bytes_per_token"].as_f64().unwrap();
    assert!(kv(3) > kv(1) && kv(1) > 0.0, "{rows}");

    // A Q8_0 cache (llama-bench's -ctk/-ctv q8_0): named in the row, and each position costs
    // 34 bytes per 32 values where f16 takes 64 (SmolLM2's heads of 64: 136 of 256 bytes).
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["bench", "-m"])
        .arg(&model)
        .args([
            "-p",
            "0",
            "-n",
            "2",
            "-d",
            "40",
            "-r",
            "1",
            "--json",
            "--ceiling",
        ])
        .args(["--kv-type", "q8_0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q8: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(q8[0]["type_k"], "q8_0");
    assert_eq!(q8[0]["type_v"], "q8_0");
    assert_eq!(rows[3]["type_k"], "f16");
    let ratio = q8[0]["kv_bytes_per_token"].as_f64().unwrap() / kv(3);
    assert!((ratio - 136.0 / 256.0).abs() < 1e-9, "{ratio}");

    // The table names a depth test as llama-bench does.
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["bench", "-m"])
        .arg(&model)
        .args(["-p", "0", "-n", "2", "-d", "16", "-r", "1"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("| tg2 @ d16 |"));
}
