//! `airlock keygen`, `sign`, `verify`, `hash`, `--require-signature` and `--sign`, as a user runs
//! them, and interoperation with the reference `minisign` tool (Debian's package).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn tiny_llama3() -> PathBuf {
    support::root().join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf")
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
    // A user's shell default must not change what these tests check.
    c.args(args)
        .env_remove("AIRLOCK_REQUIRE_SIGNATURE")
        .stdin(Stdio::null());
    c
}

fn airlock(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "failed: {}\nstdout: {}",
        stderr(&o),
        stdout(&o)
    );
    o
}

/// A failure with one `error:` line naming `needle`, and nothing on stdout.
fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded; stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An unencrypted airlock key pair `dir/NAME.{pub,key}`.
fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(name);
    ok(airlock(&["keygen", "-o", s(&base), "--no-password"]));
    (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    )
}

fn copy_tiny(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(tiny_llama3(), &p).unwrap();
    p
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn keygen_sign_verify_round_trip_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "correct horse\n").unwrap();
    let base = dir.path().join("release");
    let o = ok(airlock(&[
        "keygen",
        "-o",
        s(&base),
        "--password-file",
        s(&pw),
    ]));
    assert!(stdout(&o).contains("password-protected"), "{}", stdout(&o));
    let (pubkey, seckey) = (
        dir.path().join("release.pub"),
        dir.path().join("release.key"),
    );
    let mode = std::fs::metadata(&seckey).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret key is readable by others");
    assert!(std::fs::read_to_string(&pubkey)
        .unwrap()
        .starts_with("untrusted comment: minisign public key: "));

    // keygen never overwrites either file.
    let before = std::fs::read(&seckey).unwrap();
    fails_with(
        &airlock(&["keygen", "-o", s(&base), "--no-password"]),
        "never overwrites",
    );
    std::fs::remove_file(&pubkey).unwrap();
    fails_with(
        &airlock(&["keygen", "-o", s(&base), "--no-password"]),
        "release.key exists",
    );
    assert_eq!(std::fs::read(&seckey).unwrap(), before);
    assert!(!pubkey.exists(), "keygen wrote half a pair");
    std::fs::remove_file(&seckey).unwrap();
    ok(airlock(&[
        "keygen",
        "-o",
        s(&base),
        "--password-file",
        s(&pw),
    ]));

    let model = copy_tiny(dir.path(), "model.gguf");
    // No terminal and no password file: a clear error, not a hang.
    fails_with(
        &airlock(&["sign", s(&model), "--key", s(&seckey)]),
        "--password-file",
    );
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "battery staple").unwrap();
    fails_with(
        &airlock(&[
            "sign",
            s(&model),
            "--key",
            s(&seckey),
            "--password-file",
            s(&wrong),
        ]),
        "wrong password",
    );
    let o = ok(airlock(&[
        "sign",
        s(&model),
        "--key",
        s(&seckey),
        "--password-file",
        s(&pw),
    ]));
    for f in [
        "model.gguf.minisig",
        "model.gguf.manifest.json",
        "model.gguf.manifest.json.minisig",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing: {}", stderr(&o));
    }
    let o = ok(airlock(&[
        "verify",
        s(&model),
        "--pubkey",
        s(&pubkey),
        "--full",
    ]));
    let out = stdout(&o);
    assert!(out.contains("whole-file SHA-256 matches"), "{out}");
    assert!(out.contains("whole-file signature matches"), "{out}");
    assert!(out.contains("file:model.gguf"), "{out}");

    // `hash --json` prints the manifest `sign` wrote, and its first line is sha256sum's.
    let o = ok(airlock(&["hash", s(&model), "--json"]));
    let written = std::fs::read_to_string(dir.path().join("model.gguf.manifest.json")).unwrap();
    assert_eq!(stdout(&o), written);
    let o = ok(airlock(&["hash", s(&model)]));
    let sha = format!("{:x}", sha256_of(&model));
    assert_eq!(
        stdout(&o).lines().next().unwrap(),
        format!("{sha}  {}", model.display())
    );
    assert!(stdout(&o).contains("tensor blk.0.attn_q.weight"));
}

/// SHA-256 by the system's sha256sum, an implementation other than the one under test.
fn sha256_of(path: &Path) -> Hex {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(o.status.success());
    Hex(stdout(&o).split_whitespace().next().unwrap().to_string())
}

struct Hex(String);
impl std::fmt::LowerHex for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn minisign(args: &[&str]) -> Output {
    Command::new("minisign")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_minisign_tool_and_airlock_verify_each_others_signatures() {
    support::require("minisign");
    let dir = tempfile::tempdir().unwrap();
    let (pubkey, seckey) = keygen(dir.path(), "airlock");
    let model = copy_tiny(dir.path(), "model.gguf");
    ok(airlock(&["sign", s(&model), "--key", s(&seckey)]));

    // minisign verifies airlock's whole-file signature (prehashed, -H) and the manifest's.
    let o = minisign(&["-Vm", s(&model), "-p", s(&pubkey), "-H"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("file:model.gguf"), "{}", stdout(&o));
    let manifest = dir.path().join("model.gguf.manifest.json");
    let o = minisign(&["-Vm", s(&manifest), "-p", s(&pubkey)]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    // ...and refuses it once the model changed, as airlock does.
    let tampered = copy_tiny(dir.path(), "tampered.gguf");
    std::fs::copy(
        dir.path().join("model.gguf.minisig"),
        dir.path().join("tampered.gguf.minisig"),
    )
    .unwrap();
    flip_byte(&tampered, 4096);
    assert!(!minisign(&["-Vm", s(&tampered), "-p", s(&pubkey)])
        .status
        .success());

    // airlock verifies a signature made by minisign with minisign's own key.
    let (mpub, mkey) = (dir.path().join("tool.pub"), dir.path().join("tool.key"));
    let o = minisign(&["-G", "-W", "-p", s(&mpub), "-s", s(&mkey)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let other = copy_tiny(dir.path(), "by-tool.gguf");
    let o = minisign(&["-S", "-s", s(&mkey), "-m", s(&other)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ok(airlock(&["verify", s(&other), "--pubkey", s(&mpub)]));
    assert!(
        stdout(&o).contains("whole-file signature only"),
        "{}",
        stdout(&o)
    );
    fails_with(
        &airlock(&["verify", s(&other), "--pubkey", s(&pubkey)]),
        "another key",
    );
    flip_byte(&other, 100);
    fails_with(
        &airlock(&["verify", s(&other), "--pubkey", s(&mpub)]),
        "does not verify",
    );

    // airlock signs with minisign's key, and minisign verifies it.
    let third = copy_tiny(dir.path(), "third.gguf");
    ok(airlock(&["sign", s(&third), "--key", s(&mkey)]));
    let o = minisign(&["-Vm", s(&third), "-p", s(&mpub)]);
    assert!(o.status.success(), "{}", stderr(&o));
    ok(airlock(&[
        "verify",
        s(&third),
        "--pubkey",
        s(&mpub),
        "--full",
    ]));

    // The minisign tool signs with airlock's key.
    let fourth = copy_tiny(dir.path(), "fourth.gguf");
    let o = minisign(&["-S", "-s", s(&seckey), "-m", s(&fourth)]);
    assert!(o.status.success(), "{}", stderr(&o));
    ok(airlock(&["verify", s(&fourth), "--pubkey", s(&pubkey)]));

    // A legacy (not prehashed) signature is refused with a reason.
    let legacy = copy_tiny(dir.path(), "legacy.gguf");
    let o = minisign(&["-S", "-l", "-s", s(&mkey), "-m", s(&legacy)]);
    assert!(o.status.success(), "{}", stderr(&o));
    fails_with(
        &airlock(&["verify", s(&legacy), "--pubkey", s(&mpub)]),
        "legacy",
    );
}

#[test]
fn verify_names_what_changed_and_refuses_bad_files_with_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (pubkey, seckey) = keygen(dir.path(), "k");
    let (other_pub, _) = keygen(dir.path(), "other");
    let sign = |m: &Path| ok(airlock(&["sign", s(m), "--key", s(&seckey)]));
    let verify = |m: &Path| airlock(&["verify", s(m), "--pubkey", s(&pubkey)]);
    let tensor_at = |m: &Path, name: &str| {
        let f = airlock_engine::gguf::GgufFile::open(m).unwrap();
        let t = f.tensor(name).unwrap();
        (f.data_offset + t.offset + t.n_bytes / 2) as usize
    };

    // A flipped byte in a tensor, and one in the chat template.
    let m = copy_tiny(dir.path(), "a.gguf");
    sign(&m);
    ok(verify(&m));
    flip_byte(&m, tensor_at(&m, "blk.1.ffn_down.weight"));
    fails_with(&verify(&m), "tensor blk.1.ffn_down.weight (Q8_0");
    let m = copy_tiny(dir.path(), "b.gguf");
    sign(&m);
    let at = std::fs::read(&m)
        .unwrap()
        .windows(13)
        .position(|w| w == b"loop_messages")
        .unwrap();
    flip_byte(&m, at);
    fails_with(
        &verify(&m),
        "the metadata (header, key-value pairs such as the chat template",
    );

    // A truncated file.
    let m = copy_tiny(dir.path(), "c.gguf");
    sign(&m);
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&m, &bytes[..bytes.len() - 1000]).unwrap();
    fails_with(&verify(&m), "a cut copy");

    // A wrong key.
    let m = copy_tiny(dir.path(), "d.gguf");
    sign(&m);
    fails_with(
        &airlock(&["verify", s(&m), "--pubkey", s(&other_pub)]),
        "made by another key than",
    );

    // The signature of another file: d's manifest and signatures beside e, which differs.
    let e = dir.path().join("e.gguf");
    let mut other_bytes = std::fs::read(tiny_llama3()).unwrap();
    let last = other_bytes.len() - 1;
    other_bytes[last] ^= 0xff;
    std::fs::write(&e, other_bytes).unwrap();
    for suffix in [".manifest.json", ".manifest.json.minisig", ".minisig"] {
        std::fs::copy(
            dir.path().join(format!("d.gguf{suffix}")),
            dir.path().join(format!("e.gguf{suffix}")),
        )
        .unwrap();
    }
    fails_with(&verify(&e), "does not match its signed manifest");
    fails_with(
        &airlock(&["verify", s(&e), "--pubkey", s(&pubkey), "--full"]),
        "e.gguf",
    );
    // A whole-file signature of another file.
    std::fs::remove_file(dir.path().join("e.gguf.manifest.json")).unwrap();
    fails_with(&verify(&e), "e.gguf.minisig does not verify");

    // A manifest that does not describe the file's tensor table, signed by the right key
    // (`airlock sign` on a JSON file writes exactly its .minisig).
    let m = copy_tiny(dir.path(), "f.gguf");
    sign(&m);
    let mpath = dir.path().join("f.gguf.manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(
        &mpath,
        text.replace("blk.0.ffn_up.weight", "blk.0.ffn_gate.weight"),
    )
    .unwrap();
    sign(&mpath);
    fails_with(&verify(&m), "does not describe the tensor table");

    // Malformed manifest, signature and key files.
    std::fs::write(&mpath, "{\"format\": 3}").unwrap();
    sign(&mpath);
    fails_with(
        &verify(&m),
        "f.gguf.manifest.json is not a valid airlock manifest",
    );
    let msig = dir.path().join("f.gguf.manifest.json.minisig");
    std::fs::write(&msig, "untrusted comment: x\nnot base64\n").unwrap();
    fails_with(
        &verify(&m),
        "f.gguf.manifest.json.minisig is not a valid minisign signature",
    );
    let bad_key = dir.path().join("bad.pub");
    std::fs::write(&bad_key, "untrusted comment: x\nAAAA\n").unwrap();
    fails_with(
        &airlock(&["verify", s(&m), "--pubkey", s(&bad_key)]),
        "bad.pub is not a valid minisign public key",
    );
    fails_with(
        &airlock(&["verify", s(&m), "--pubkey", "/dev/zero"]),
        "/dev/zero",
    );
    fails_with(
        &airlock(&["sign", s(&m), "--key", s(&bad_key)]),
        "bad.pub is not a minisign secret key",
    );
    fails_with(
        &airlock(&["sign", s(&m), "--key", "/dev/zero"]),
        "/dev/zero",
    );
    // An unsigned file.
    let m = copy_tiny(dir.path(), "g.gguf");
    fails_with(&verify(&m), "g.gguf is not signed");
}

#[test]
fn require_signature_refuses_an_unsigned_model_before_generating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (pubkey, seckey) = keygen(dir.path(), "k");
    let (other_pub, _) = keygen(dir.path(), "other");
    // A link to the real model: signing writes its files beside the link, not in models/.
    let model = dir.path().join("smollm2.gguf");
    std::os::unix::fs::symlink(support::model(), &model).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "-m",
            s(&model),
            "-p",
            "The capital of France is",
            "-n",
            "4",
        ];
        args.extend_from_slice(&["--temp", "0", "-c", "64"]);
        args.extend_from_slice(extra);
        airlock(&args)
    };
    let o = run(&["--require-signature", s(&pubkey)]);
    fails_with(&o, "smollm2.gguf is not signed");
    assert!(stderr(&o).contains("airlock sign"), "{}", stderr(&o));
    assert!(o.stdout.is_empty(), "generated before the check");
    // The environment default, for a user's shell.
    let o = command(&["run", "-m", s(&model), "-p", "Hi", "-n", "2", "-c", "64"])
        .env("AIRLOCK_REQUIRE_SIGNATURE", &pubkey)
        .output()
        .unwrap();
    fails_with(&o, "is not signed");
    assert!(o.stdout.is_empty());

    ok(airlock(&["sign", s(&model), "--key", s(&seckey)]));
    let plain = ok(run(&[]));
    let signed = ok(run(&["--require-signature", s(&pubkey)]));
    assert_eq!(stdout(&signed), stdout(&plain));
    assert!(!stdout(&signed).is_empty());
    assert!(
        stderr(&signed).contains("signature: ")
            && stderr(&signed).contains("matches its signed manifest"),
        "{}",
        stderr(&signed)
    );
    let o = run(&["--require-signature", s(&other_pub)]);
    fails_with(&o, "another key");
    assert!(o.stdout.is_empty());

    // A --tokenizer override must be signed too.
    let tok = dir.path().join("tokenizer.json");
    std::fs::copy(
        support::root().join("tests/fixtures/smollm2/hf/tokenizer.json"),
        &tok,
    )
    .unwrap();
    let o = run(&["--require-signature", s(&pubkey), "--tokenizer", s(&tok)]);
    fails_with(&o, "tokenizer.json.minisig");
    assert!(o.stdout.is_empty());
    ok(airlock(&["sign", s(&tok), "--key", s(&seckey)]));
    ok(run(&[
        "--require-signature",
        s(&pubkey),
        "--tokenizer",
        s(&tok),
    ]));
    let mut t = std::fs::read(&tok).unwrap();
    t.push(b'\n');
    std::fs::write(&tok, t).unwrap();
    fails_with(
        &run(&["--require-signature", s(&pubkey), "--tokenizer", s(&tok)]),
        "does not verify",
    );
    // --chat-template takes only the binary's built-in names: a template file (signed or not)
    // is never read, so no unsigned template reaches a signed model.
    let jinja = dir.path().join("evil.jinja");
    std::fs::write(&jinja, "{{ 'injected' }}").unwrap();
    let o = run(&[
        "--require-signature",
        s(&pubkey),
        "--chat-template",
        s(&jinja),
    ]);
    fails_with(&o, "evil.jinja");
    assert!(o.stdout.is_empty());
}

#[test]
fn every_model_loading_command_takes_require_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (pubkey, _) = keygen(dir.path(), "k");
    let m = copy_tiny(dir.path(), "tiny.gguf");
    let out = dir.path().join("out");
    let k = s(&pubkey);
    let text = support::root().join("tests/fixtures/text/eval.txt");
    let task = support::root().join("examples/tasks/security-mcq.jsonl");
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", "-m", s(&m), "-p", "hi", "-n", "1"],
        vec!["chat", "-m", s(&m)],
        vec!["bench", "-m", s(&m), "-p", "8", "-n", "1", "-r", "1"],
        vec!["batched-bench", "-m", s(&m)],
        vec!["perplexity", "-m", s(&m), "-f", s(&text)],
        vec!["tokenize", "-m", s(&m), "hello"],
        vec!["quantize", s(&m), "-o", s(&out), "--type", "q8_0"],
        vec!["export", s(&m), "-o", s(&out)],
        vec!["serve", "-m", s(&m), "--port", "0"],
        vec!["eval", "-m", s(&m), "--task", s(&task)],
        vec!["compare", s(&m), "-f", s(&text), "-o", s(&out)],
    ];
    for mut args in cases {
        args.extend_from_slice(&["--require-signature", k]);
        let o = airlock(&args);
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "{args:?} loaded an unsigned model: {err}"
        );
        assert!(err.contains("tiny.gguf is not signed"), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: {}", stdout(&o));
        assert!(!out.exists(), "{args:?} wrote its output");
    }
}

#[test]
fn eval_and_compare_check_every_file_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (pubkey, seckey) = keygen(dir.path(), "k");
    let signed = copy_tiny(dir.path(), "signed.gguf");
    ok(airlock(&["sign", s(&signed), "--key", s(&seckey)]));
    let unsigned = copy_tiny(dir.path(), "unsigned.gguf");
    let text = support::root().join("tests/fixtures/text/eval.txt");
    let task = support::root().join("examples/tasks/security-mcq.jsonl");
    let report = dir.path().join("report");
    let k = s(&pubkey);

    // The environment default applies to eval as the flag does.
    let o = command(&[
        "eval",
        "-m",
        s(&unsigned),
        "--task",
        s(&task),
        "--limit",
        "2",
    ])
    .env("AIRLOCK_REQUIRE_SIGNATURE", k)
    .output()
    .unwrap();
    fails_with(&o, "unsigned.gguf is not signed");
    assert!(o.stdout.is_empty());
    assert!(!stderr(&o).contains("eval: "), "{}", stderr(&o));
    let o = ok(airlock(&[
        "eval",
        "-m",
        s(&signed),
        "--task",
        s(&task),
        "--limit",
        "2",
        "--require-signature",
        k,
    ]));
    assert!(
        stderr(&o).contains("matches its signed manifest"),
        "{}",
        stderr(&o)
    );

    // A signed base with an unsigned variant: refused before the base is measured (no report
    // directory), whichever way the key is given.
    let args = [
        "compare",
        s(&signed),
        s(&unsigned),
        "-f",
        s(&text),
        "-o",
        s(&report),
        "--chunks",
        "1",
        "-c",
        "32",
    ];
    let mut flagged = args.to_vec();
    flagged.extend_from_slice(&["--require-signature", k]);
    fails_with(&airlock(&flagged), "unsigned.gguf is not signed");
    let o = command(&args)
        .env("AIRLOCK_REQUIRE_SIGNATURE", k)
        .output()
        .unwrap();
    fails_with(&o, "unsigned.gguf is not signed");
    assert!(o.stdout.is_empty());
    assert!(!report.exists(), "compare wrote a report");
    // Both signed: it runs.
    let signed2 = copy_tiny(dir.path(), "signed2.gguf");
    ok(airlock(&["sign", s(&signed2), "--key", s(&seckey)]));
    let mut both = args.to_vec();
    both[2] = s(&signed2);
    both.extend_from_slice(&[
        "--bench-prompt",
        "8",
        "--bench-gen",
        "2",
        "--mem-ctx",
        "64",
        "-q",
        "--require-signature",
        k,
    ]);
    ok(airlock(&both));
    assert!(report.join("report.md").is_file());
    std::fs::remove_dir_all(&report).unwrap();
    // A checkpoint directory cannot be signed, so it is refused as BASE under a requirement.
    let hf = support::root().join("tests/fixtures/smollm2/hf");
    fails_with(
        &airlock(&[
            "compare",
            s(&hf),
            "--types",
            "q8_0",
            "-f",
            s(&text),
            "-o",
            s(&report),
            "--require-signature",
            k,
        ]),
        "Hugging Face checkpoint, which a signature cannot cover",
    );
    assert!(!report.exists(), "compare wrote a report");
}

#[test]
fn quantize_and_convert_sign_their_output_once_it_is_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (pubkey, seckey) = keygen(dir.path(), "k");
    let src = copy_tiny(dir.path(), "src.gguf");
    ok(airlock(&["sign", s(&src), "--key", s(&seckey)]));
    let out = dir.path().join("out.gguf");
    let o = ok(airlock(&[
        "quantize",
        s(&src),
        "-o",
        s(&out),
        "--type",
        "q8_0",
        "--require-signature",
        s(&pubkey),
        "--sign",
        s(&seckey),
        "-q",
    ]));
    assert!(stderr(&o).contains("signed "), "{}", stderr(&o));
    ok(airlock(&[
        "verify",
        s(&out),
        "--pubkey",
        s(&pubkey),
        "--full",
    ]));
    // export under the requirement, then convert back with --sign.
    let hf = dir.path().join("hf");
    ok(airlock(&[
        "export",
        s(&out),
        "-o",
        s(&hf),
        "--require-signature",
        s(&pubkey),
        "-q",
    ]));
    let converted = dir.path().join("converted.gguf");
    let o = ok(airlock(&[
        "convert",
        s(&hf),
        "-o",
        s(&converted),
        "--type",
        "q8_0",
        "--sign",
        s(&seckey),
        "-q",
    ]));
    assert!(stderr(&o).contains("signed "), "{}", stderr(&o));
    ok(airlock(&[
        "verify",
        s(&converted),
        "--pubkey",
        s(&pubkey),
        "--full",
    ]));

    // A key that cannot be used stops the run before any work, leaving nothing.
    let out2 = dir.path().join("out2.gguf");
    fails_with(
        &airlock(&[
            "quantize",
            s(&src),
            "-o",
            s(&out2),
            "--type",
            "q8_0",
            "--sign",
            s(&pubkey),
        ]),
        "not a minisign secret key",
    );
    assert!(!out2.exists());
}
