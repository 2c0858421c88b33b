//! Hostile model files through the CLI (issue 14, items 3, 5, 8 and 10): each gets one clear
//! error and a non-zero exit (never an abort), `inspect` calls it invalid, and `quantize` and
//! `export` refuse to pass it on, leaving nothing at OUT. Each file is the tiny Llama 3 fixture
//! with one thing changed.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use airlock_engine::gguf::{Array, StrArray, Value};
use support::{airlock, rewrite_gguf, set_key, stderr, tiny_llama3};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit status 1 (an error, not a signal) with `needle` on stderr.
fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{:?}: {err}", o.status);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Value)>)) -> PathBuf {
    let p = dir.join(name);
    rewrite_gguf(&tiny_llama3(), &p, |meta, _| edit(meta));
    p
}

#[test]
fn absurd_counts_are_refused_before_allocation() {
    let d = tempfile::tempdir().unwrap();
    // 2^31 - 1 layers over a file of 2: the layer table alone was 1.2 TB and aborted `run`.
    let p = edited(d.path(), "layers.gguf", |m| {
        set_key(m, "llama.block_count", Value::U32((1 << 31) - 1))
    });
    let o = airlock(&["run", "-m", s(&p), "-p", "hi", "-n", "1", "-t", "1"]);
    fails_with(&o, "llama.block_count");
    assert!(
        stderr(&o).contains("holds tensors for 2 layers"),
        "{}",
        stderr(&o)
    );
    // A context of 2^30 with --force: 256 GiB of KV cache, more than the machine has in all.
    let p = edited(d.path(), "ctx.gguf", |m| {
        set_key(m, "llama.context_length", Value::U32(1 << 30))
    });
    let c = (1u32 << 30).to_string();
    let o = airlock(&[
        "run",
        "-m",
        s(&p),
        "-p",
        "hi",
        "-n",
        "1",
        "-t",
        "1",
        "-c",
        &c,
        "--force",
    ]);
    fails_with(&o, "--force cannot help");
}

#[test]
fn rope_scaling_airlock_does_not_implement_is_refused_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let p = edited(d.path(), "yarn.gguf", |m| {
        set_key(m, "llama.rope.scaling.type", Value::String("yarn".into()));
        set_key(m, "llama.rope.scaling.factor", Value::F32(4.0));
    });
    let o = airlock(&["run", "-m", s(&p), "-p", "hi", "-n", "1", "-t", "1"]);
    fails_with(&o, "llama.rope.scaling.type");
    // Linear scaling runs (and changes the output).
    let p = edited(d.path(), "linear.gguf", |m| {
        set_key(m, "llama.rope.scaling.type", Value::String("linear".into()));
        set_key(m, "llama.rope.scaling.factor", Value::F32(4.0));
    });
    let o = airlock(&["run", "-m", s(&p), "-p", "hi", "-n", "1", "-t", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn inspect_judges_keys_and_the_model_not_only_the_container() {
    let d = tempfile::tempdir().unwrap();
    let ints = edited(d.path(), "ints.gguf", |m| {
        set_key(
            m,
            "tokenizer.ggml.tokens",
            Value::Array(Array::I32(vec![1, 2, 3])),
        )
    });
    let layers = edited(d.path(), "layers.gguf", |m| {
        set_key(m, "llama.block_count", Value::U32((1 << 31) - 1))
    });
    for (p, kind, needle) in [
        (
            &ints,
            "Metadata",
            "tokenizer.ggml.tokens: expected an array of strings",
        ),
        (&layers, "Model", "llama.block_count"),
    ] {
        let o = airlock(&["inspect", s(p)]);
        fails_with(&o, needle);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("verdict: invalid"), "{out}");
        assert!(
            out.contains(&format!("problem: {needle}")) || out.contains(needle),
            "{out}"
        );
        let o = airlock(&["inspect", "--json", s(p)]);
        assert_eq!(o.status.code(), Some(1));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["schema_version"], 2);
        assert_eq!(j["valid"], false);
        assert_eq!(j["runnable"], false);
        assert_eq!(j["error"]["kind"], kind);
        assert!(
            j["error"]["message"].as_str().unwrap().contains(needle),
            "{j}"
        );
        // The container was readable: the listing is still there.
        assert!(j["tensors"].as_array().unwrap().len() > 10);
    }
    let o = airlock(&["inspect", "--json", s(&tiny_llama3())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (j["valid"].clone(), j["runnable"].clone()),
        (true.into(), true.into())
    );
    assert_eq!(j["problems"], serde_json::json!([]));
}

#[test]
fn quantize_and_export_refuse_what_run_refuses_leaving_nothing() {
    let d = tempfile::tempdir().unwrap();
    let heads = edited(d.path(), "heads.gguf", |m| {
        set_key(m, "llama.attention.head_count", Value::U32(0))
    });
    let layers = edited(d.path(), "layers.gguf", |m| {
        set_key(m, "llama.block_count", Value::U32(1 << 31))
    });
    let nan = edited(d.path(), "nan.gguf", |m| {
        set_key(
            m,
            "airlock.rope_scaling.rope_type",
            Value::String("llama3".into()),
        );
        set_key(m, "airlock.rope_scaling.factor", Value::F32(f32::NAN));
    });
    // The vocabulary cut to 10 tokens, its 280k merges kept: its tokenizer.json would not load.
    let cut = edited(d.path(), "cut.gguf", |m| {
        for (k, v) in m.iter_mut() {
            match (k.as_str(), v) {
                ("tokenizer.ggml.tokens", Value::Array(Array::String(t))) => {
                    *t = t.iter().take(10).collect::<StrArray>();
                }
                ("tokenizer.ggml.token_type", Value::Array(Array::I32(t))) => t.truncate(10),
                _ => {}
            }
        }
        m.retain(|(k, _)| !k.ends_with("_token_id"));
    });
    let out = d.path().join("out");
    for (input, needle) in [
        (&heads, "llama.attention.head_count"),
        (&layers, "llama.block_count"),
        (&cut, "merge"),
    ] {
        let o = airlock(&["quantize", s(input), "-o", s(&out), "--type", "q8_0"]);
        fails_with(&o, needle);
        assert!(!out.exists());
        let o = airlock(&["export", s(input), "-o", s(&out)]);
        fails_with(&o, needle);
        assert!(!out.exists());
    }
    let o = airlock(&["export", s(&nan), "-o", s(&out)]);
    fails_with(&o, "airlock.rope_scaling.factor");
    assert!(!out.exists());
    // Nothing but the inputs in the directory: no temporary file or directory left.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 4);
}

/// A copy of the tiny model whose chat template doubles a string until memory runs out.
fn hostile_model(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("hostile-template.gguf");
    support::rewrite_gguf(&support::tiny_llama3(), &p, |meta, _| {
        support::set_key(
            meta,
            "tokenizer.chat_template",
            Value::String(
                "{% set ns = namespace(v='x') %}{% for i in range(40) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}{{ ns.v|length }}"
                    .into(),
            ),
        )
    });
    p
}

#[test]
fn run_and_inspect_report_the_template_and_the_limit_instead_of_aborting() {
    let d = tempfile::tempdir().unwrap();
    let p = hostile_model(d.path());
    let bin = env!("CARGO_BIN_EXE_airlock");
    let o = Command::new(bin)
        .args([
            "run",
            "-m",
            p.to_str().unwrap(),
            "--chat",
            "-p",
            "hi",
            "-n",
            "1",
            "-t",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("chat template \"gguf\" exceeded 256 MiB"),
        "{err}"
    );
    // Without --chat the template is never rendered, and the model runs.
    let o = Command::new(bin)
        .args([
            "run",
            "-m",
            p.to_str().unwrap(),
            "-p",
            "hi",
            "-n",
            "1",
            "-t",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // inspect renders a sample conversation with the same renderer: invalid.
    let o = Command::new(bin)
        .args(["inspect", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("verdict: invalid") && out.contains("exceeded 256 MiB"),
        "{out}"
    );
}
