//! Shared by the CLI integration tests: the components a test needs (tools, packages, the model),
//! each either present or a failure that names it and the command that sets it up. Never a skip.
//! Components are declared, with their probes, in scripts/install-test-deps.sh (the one place).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test unless `component` (a name in scripts/install-test-deps.sh's table, e.g.
/// "qemu-user" or "model") is present, by that table's probe. The failure carries the script's
/// report: the component, what it is for, what provides it and the command that installs it.
pub fn require(component: &str) {
    let o = Command::new("bash")
        .arg(root().join("scripts/install-test-deps.sh"))
        .args(["--check", component])
        .output()
        .expect("running bash scripts/install-test-deps.sh");
    assert!(
        o.status.success(),
        "this test needs the component `{component}`:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The real model (SmolLM2-135M-Instruct Q4_1), or a failure saying to run scripts/fetch-models.sh.
pub fn model() -> PathBuf {
    require("model");
    root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn require_passes_a_present_component_and_fails_naming_the_script_otherwise() {
    require("cargo");
    let e = std::panic::catch_unwind(|| require("no-such-component")).unwrap_err();
    let msg = e.downcast_ref::<String>().unwrap();
    assert!(msg.contains("`no-such-component`"), "{msg}");
    assert!(msg.contains("scripts/install-test-deps.sh"), "{msg}");
}

/// The built airlock run with `args` (stdin closed, output captured).
pub fn airlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run airlock")
}

/// The stdout of a run that must have succeeded; a failure shows its stderr.
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The text every perplexity test reads (the shared fixture's eval.txt).
pub fn eval_txt() -> String {
    root()
        .join("tests/fixtures/text/eval.txt")
        .to_string_lossy()
        .into_owned()
}

/// The tiny Llama 3 fixture (llama.cpp-made, 8.8 MB, runs in milliseconds).
pub fn tiny_llama3() -> PathBuf {
    root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf")
}

pub type Tensors = Vec<(airlock_engine::gguf::TensorSpec, Vec<u8>)>;

/// A copy of `src` at `dst` with its metadata and tensors edited by `edit`.
pub fn rewrite_gguf(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(&mut Vec<(String, airlock_engine::gguf::Value)>, &mut Tensors),
) {
    use airlock_engine::gguf::{GgufFile, GgufWriter, TensorSpec};
    use std::io::Write;
    let f = GgufFile::open(src).unwrap();
    let mut meta: Vec<_> = f
        .metadata()
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    let mut tensors: Tensors = f
        .tensors()
        .iter()
        .map(|t| {
            let spec = TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            };
            (spec, f.tensor_data(t).to_vec())
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let out = std::io::BufWriter::new(std::fs::File::create(dst).unwrap());
    let mut w = GgufWriter::new(out, &meta, &specs).unwrap();
    for (_, data) in &tensors {
        w.write_tensor_data(data).unwrap();
    }
    w.finish().unwrap().flush().unwrap();
}

/// Sets (or adds) one metadata key.
pub fn set_key(
    meta: &mut Vec<(String, airlock_engine::gguf::Value)>,
    key: &str,
    v: airlock_engine::gguf::Value,
) {
    match meta.iter_mut().find(|(k, _)| k == key) {
        Some((_, old)) => *old = v,
        None => meta.push((key.to_string(), v)),
    }
}
