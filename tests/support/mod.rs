//! Shared by the CLI integration tests: the components a test needs (tools, packages, the model),
//! each either present or a failure that names it and the command that sets it up. Never a skip.
//! Components are declared, with their probes, in scripts/install-test-deps.sh (the one place).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

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
