//! Signed manifests: what a load under a signature requirement accepts and refuses, and the
//! host policy's ownership and permission rules. Signatures are made with the `minisign` crate
//! (what `airlock sign` uses); the engine verifies them with `minisign-verify`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use airlock_engine::gguf::GgufFile;
use airlock_engine::load::{load_with, open_gguf_checked, LoadError, LoadOptions};
use airlock_engine::signature::{
    manifest_path, signature_path, HostPolicy, Manifest, RangeKind, Requirement, SignatureError,
    TrustedKey,
};
use minisign::KeyPair;

fn tiny_llama3() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ has a parent")
        .join("tests/fixtures/llama3/tiny-llama3-q8_0.gguf")
}

/// A key pair, its public key written to `dir/NAME.pub`.
fn keypair(dir: &Path, name: &str) -> (KeyPair, PathBuf) {
    let kp = KeyPair::generate_unencrypted_keypair().unwrap();
    let path = dir.join(format!("{name}.pub"));
    std::fs::write(&path, kp.pk.to_box().unwrap().to_string()).unwrap();
    (kp, path)
}

fn sign_bytes(kp: &KeyPair, data: &[u8]) -> String {
    minisign::sign(
        Some(&kp.pk),
        &kp.sk,
        data,
        Some("timestamp:0\tfile:test"),
        None,
    )
    .unwrap()
    .into_string()
}

/// Write `text` as the manifest of `model`, signed by `kp`.
fn write_signed_manifest(model: &Path, kp: &KeyPair, text: &str) {
    let mpath = manifest_path(model);
    std::fs::write(&mpath, text).unwrap();
    std::fs::write(signature_path(&mpath), sign_bytes(kp, text.as_bytes())).unwrap();
}

/// Sign `model` as `airlock sign` does (manifest and its signature).
fn sign_model(model: &Path, kp: &KeyPair) -> Manifest {
    let f = GgufFile::open(model).unwrap();
    let m = Manifest::compute("model.gguf", &f);
    write_signed_manifest(model, kp, &m.to_json());
    m
}

/// A copy of the tiny model in `dir`.
fn copy_tiny(dir: &Path) -> PathBuf {
    let p = dir.join("model.gguf");
    std::fs::copy(tiny_llama3(), &p).unwrap();
    p
}

fn require(keys: &[&Path]) -> Requirement {
    Requirement::from_keys(keys.iter().map(|k| TrustedKey::read(k).unwrap()).collect())
}

fn open_err(model: &Path, req: &Requirement) -> SignatureError {
    match open_gguf_checked(model, false, req) {
        Err(LoadError::Signature(e)) => e,
        Err(e) => panic!("expected a signature error, got: {e}"),
        Ok(_) => panic!("{} was accepted", model.display()),
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// File offset of the middle of tensor `name`'s data.
fn tensor_middle(model: &Path, name: &str) -> u64 {
    let f = GgufFile::open(model).unwrap();
    let t = f.tensor(name).unwrap();
    f.data_offset + t.offset + t.n_bytes / 2
}

#[test]
fn the_manifest_covers_every_byte_once_and_a_signed_model_opens() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");
    let m = sign_model(&model, &kp);
    let size = std::fs::metadata(&model).unwrap().len();
    assert_eq!(m.size, size);
    assert_eq!(m.ranges[0].kind, RangeKind::Metadata);
    let mut pos = 0;
    for r in &m.ranges {
        assert_eq!(r.offset, pos, "ranges are contiguous");
        assert!(r.length > 0);
        pos += r.length;
    }
    assert_eq!(pos, size, "ranges cover the whole file");
    let f = GgufFile::open(&model).unwrap();
    let tensors = m
        .ranges
        .iter()
        .filter(|r| matches!(r.kind, RangeKind::Tensor { .. }))
        .count();
    assert_eq!(tensors, f.tensors().len());
    // The whole-file digest is the plain SHA-256 of the file (as sha256sum and Hugging Face).
    assert_eq!(
        m.sha256,
        airlock_engine::signature::sha256(&std::fs::read(&model).unwrap())
    );
    // The JSON reads back to the same manifest.
    assert_eq!(
        Manifest::parse(&manifest_path(&model), m.to_json().as_bytes()).unwrap(),
        m
    );

    let req = require(&[&pubkey]);
    for no_mmap in [false, true] {
        let (f, v) = open_gguf_checked(&model, no_mmap, &req).unwrap();
        assert_eq!(f.tensors().len(), tensors);
        assert_eq!(v.unwrap().manifest, m);
    }
    let loaded = load_with(
        &model,
        &LoadOptions {
            n_ctx: 32,
            ..LoadOptions::default()
        },
        &req,
    )
    .unwrap();
    assert!(loaded.report.signature.is_some());
}

#[test]
fn one_flipped_byte_in_a_tensor_is_caught_and_the_tensor_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");
    sign_model(&model, &kp);
    flip_byte(&model, tensor_middle(&model, "blk.0.attn_q.weight"));
    // The file is still a valid GGUF: only the signature can tell.
    GgufFile::open(&model).unwrap();
    let req = require(&[&pubkey]);
    for no_mmap in [false, true] {
        let e = match open_gguf_checked(&model, no_mmap, &req) {
            Err(LoadError::Signature(e)) => e,
            _ => panic!("a flipped byte was accepted"),
        };
        let SignatureError::Mismatch { ranges, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(ranges.len(), 1, "{e}");
        assert!(ranges[0].starts_with("tensor blk.0.attn_q.weight "), "{e}");
        assert!(e.to_string().contains("model.gguf"), "{e}");
    }
}

#[test]
fn a_flipped_byte_in_the_chat_template_is_caught_and_the_metadata_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");
    sign_model(&model, &kp);
    let bytes = std::fs::read(&model).unwrap();
    let at = bytes
        .windows(13)
        .position(|w| w == b"loop_messages")
        .expect("the tiny model has a chat template") as u64;
    flip_byte(&model, at + 2);
    let f = GgufFile::open(&model).unwrap();
    assert!(f
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("lonp_messages"));
    let e = open_err(&model, &require(&[&pubkey]));
    let SignatureError::Mismatch { ranges, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(ranges.len(), 1, "{e}");
    assert!(ranges[0].starts_with("the metadata"), "{e}");
    assert!(e.to_string().contains("chat template"), "{e}");
}

#[test]
fn a_cut_or_extended_file_is_refused_saying_where_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");
    sign_model(&model, &kp);
    let bytes = std::fs::read(&model).unwrap();
    let cut = tensor_middle(&model, "output_norm.weight");
    std::fs::write(&model, &bytes[..cut as usize]).unwrap();
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(matches!(e, SignatureError::SizeMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("inside tensor output_norm.weight"),
        "{e}"
    );

    let mut longer = bytes.clone();
    longer.extend_from_slice(b"appended");
    std::fs::write(&model, &longer).unwrap();
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(
        e.to_string().contains("8 bytes follow the signed end"),
        "{e}"
    );
}

#[test]
fn a_wrong_key_or_a_signature_of_another_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");
    let (_, other) = keypair(dir.path(), "other");
    let m = sign_model(&model, &kp);

    let e = open_err(&model, &require(&[&other]));
    assert!(matches!(e, SignatureError::WrongKey { .. }), "{e}");
    assert!(e.to_string().contains("other.pub"), "{e}");

    // Both keys required: the model signed by one of them is refused.
    let e = open_err(&model, &require(&[&pubkey, &other]));
    assert!(matches!(e, SignatureError::WrongKey { .. }), "{e}");

    // The signature of another manifest, by the right key.
    let mut other_manifest = m.clone();
    other_manifest.file = "another.gguf".into();
    let sig = sign_bytes(&kp, other_manifest.to_json().as_bytes());
    std::fs::write(signature_path(&manifest_path(&model)), sig).unwrap();
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(matches!(e, SignatureError::Invalid { .. }), "{e}");

    // A manifest edited after signing.
    sign_model(&model, &kp);
    let mpath = manifest_path(&model);
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(&mpath, text.replace("\"size\": ", "\"size\":  ")).unwrap();
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(matches!(e, SignatureError::Invalid { .. }), "{e}");
}

#[test]
fn a_signed_manifest_that_does_not_match_the_tensor_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");
    let m = sign_model(&model, &kp);
    // Digests right, a tensor renamed: signed by the right key, but it misdescribes the file.
    let renamed = m.to_json().replace(
        "\"name\":\"blk.0.attn_k.weight\"",
        "\"name\":\"blk.0.attn_v.weight\"",
    );
    assert_ne!(renamed, m.to_json());
    write_signed_manifest(&model, &kp, &renamed);
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(matches!(e, SignatureError::TableMismatch { .. }), "{e}");
    assert!(e.to_string().contains("blk.0.attn_k.weight"), "{e}");

    // Ranges merged differently: the metadata range taking in the first tensor.
    let mut merged = m.clone();
    let first = merged.ranges.remove(1);
    merged.ranges[0].length += first.length;
    let f = GgufFile::open(&model).unwrap();
    merged.ranges[0].sha256 =
        airlock_engine::signature::sha256(&f.bytes()[..merged.ranges[0].length as usize]);
    drop(f);
    write_signed_manifest(&model, &kp, &merged.to_json());
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(matches!(e, SignatureError::TableMismatch { .. }), "{e}");
}

#[test]
fn malformed_manifests_get_one_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");
    let good = sign_model(&model, &kp).to_json();
    let digest = "0".repeat(64);
    let cases: Vec<(&str, String)> = vec![
        ("not JSON", "{\"format\":".into()),
        ("empty", String::new()),
        (
            "format",
            good.replace("airlock-manifest/1", "airlock-manifest/9"),
        ),
        ("unknown field", good.replacen("\"size\"", "\"extra\": 1, \"size\"", 1)),
        ("bad hex", good.replacen(&good[good.find("\"sha256\": \"").unwrap() + 11..][..64], "XYZ", 1)),
        ("unknown kind", good.replacen("\"kind\":\"metadata\"", "\"kind\":\"code\"", 1)),
        ("no metadata first", good.replacen("\"kind\":\"metadata\"", "\"kind\":\"padding\"", 1)),
        ("gap", good.replacen("\"offset\":0,", "\"offset\":1,", 1)),
        (
            "size",
            good.replacen("\"size\": ", "\"size\": 1", 1),
        ),
        (
            "no ranges",
            format!(
                "{{\"format\":\"airlock-manifest/1\",\"file\":\"m\",\"size\":0,\"sha256\":\"{digest}\",\"ranges\":[]}}"
            ),
        ),
        (
            "empty range",
            format!(
                "{{\"format\":\"airlock-manifest/1\",\"file\":\"m\",\"size\":0,\"sha256\":\"{digest}\",\
                 \"ranges\":[{{\"kind\":\"metadata\",\"offset\":0,\"length\":0,\"sha256\":\"{digest}\"}}]}}"
            ),
        ),
        (
            "overflow",
            format!(
                "{{\"format\":\"airlock-manifest/1\",\"file\":\"m\",\"size\":10,\"sha256\":\"{digest}\",\
                 \"ranges\":[{{\"kind\":\"metadata\",\"offset\":0,\"length\":18446744073709551615,\"sha256\":\"{digest}\"}}]}}"
            ),
        ),
        (
            "tensor without shape",
            good.replacen(",\"shape\":[", ",\"shape_\":[", 1),
        ),
        ("deep nesting", "[".repeat(100_000)),
    ];
    let req = require(&[&pubkey]);
    for (what, text) in cases {
        write_signed_manifest(&model, &kp, &text);
        let e = open_err(&model, &req);
        assert!(matches!(e, SignatureError::Malformed { .. }), "{what}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("model.gguf.manifest.json"), "{what}: {msg}");
        assert!(
            msg.contains("not a valid airlock manifest"),
            "{what}: {msg}"
        );
    }
}

#[test]
fn missing_and_malformed_keys_and_signatures_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "k");

    // Unsigned; then with only a whole-file signature.
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(
        matches!(
            e,
            SignatureError::NotSigned {
                whole_file_only: false,
                ..
            }
        ),
        "{e}"
    );
    std::fs::write(signature_path(&model), "x").unwrap();
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(
        matches!(
            e,
            SignatureError::NotSigned {
                whole_file_only: true,
                ..
            }
        ),
        "{e}"
    );

    // Public keys.
    let bad_keys: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("one line", b"untrusted comment: x\n".to_vec()),
        ("not base64", b"untrusted comment: x\n!!!!\n".to_vec()),
        (
            "short key",
            b"untrusted comment: x\nRWQf6LRCGA9i53mlYecO4IzT\n".to_vec(),
        ),
        (
            "a secret key",
            kp.sk.to_box(None).unwrap().to_string().into_bytes(),
        ),
        ("binary", vec![0xff, 0xfe, 0, 1]),
        ("huge", vec![b'a'; 1 << 20]),
    ];
    for (what, bytes) in bad_keys {
        let p = dir.path().join("bad.pub");
        std::fs::write(&p, bytes).unwrap();
        let e = TrustedKey::read(&p).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("bad.pub"), "{what}: {msg}");
    }
    let e = TrustedKey::read(Path::new("/dev/zero")).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
    let e = TrustedKey::read(&dir.path().join("absent.pub")).unwrap_err();
    assert!(e.to_string().contains("absent.pub"), "{e}");

    // Signature files of the manifest.
    sign_model(&model, &kp);
    let sig = signature_path(&manifest_path(&model));
    let good = std::fs::read_to_string(&sig).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let bad_sigs: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("three lines", lines[..3].join("\n")),
        (
            "no comment prefix",
            good.replacen("untrusted comment:", "comment:", 1),
        ),
        (
            "bad trusted comment",
            good.replacen("trusted comment:", "trusted-comment:", 1),
        ),
        ("bad base64", good.replacen(lines[1], "@@@@", 1)),
        ("huge", "a".repeat(1 << 20)),
    ];
    for (what, text) in bad_sigs {
        std::fs::write(&sig, text).unwrap();
        let e = open_err(&model, &require(&[&pubkey]));
        let msg = e.to_string();
        assert!(
            msg.contains("model.gguf.manifest.json.minisig"),
            "{what}: {msg}"
        );
    }
    std::fs::remove_file(&sig).unwrap();
    let e = open_err(&model, &require(&[&pubkey]));
    assert!(matches!(e, SignatureError::Read { .. }), "{e}");
}

/// A policy key file in a private directory, owned by this user, with `mode`.
fn policy_file(dir: &Path, key: &Path, mode: u32) -> HostPolicy {
    let pdir = dir.join("policy");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::set_permissions(&pdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = pdir.join("require-signature.pub");
    std::fs::copy(key, &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    HostPolicy {
        path,
        owner: current_uid(dir),
    }
}

fn current_uid(dir: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    // A file this process just created belongs to its effective uid.
    let p = dir.join("uid-probe");
    std::fs::write(&p, "").unwrap();
    std::fs::metadata(&p).unwrap().uid()
}

#[test]
fn the_host_policy_requires_its_key_and_must_be_owned_and_unwritable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_tiny(dir.path());
    let (kp, pubkey) = keypair(dir.path(), "host");
    let opts = LoadOptions {
        n_ctx: 32,
        ..LoadOptions::default()
    };

    // No policy file: nothing required.
    let absent = HostPolicy {
        path: dir.path().join("no/such/require-signature.pub"),
        owner: 0,
    };
    assert!(!Requirement::resolve(None, &absent).unwrap().is_required());

    // A good policy: an unsigned model is refused before anything is parsed, whatever the
    // caller's own choice (no user key given).
    let policy = policy_file(dir.path(), &pubkey, 0o644);
    let req = Requirement::resolve(None, &policy).unwrap();
    assert_eq!(req.keys().len(), 1);
    match load_with(&model, &opts, &req) {
        Err(LoadError::Signature(SignatureError::NotSigned { .. })) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("an unsigned model loaded under the host policy"),
    }
    sign_model(&model, &kp);
    load_with(&model, &opts, &req).unwrap();

    // The same key given by the user too is checked once; another key is required as well.
    let req = Requirement::resolve(Some(&pubkey), &policy).unwrap();
    assert_eq!(req.keys().len(), 1);
    let (_, user) = keypair(dir.path(), "user");
    let req = Requirement::resolve(Some(&user), &policy).unwrap();
    assert_eq!(req.keys().len(), 2);
    assert!(load_with(&model, &opts, &req).is_err());

    // Untrustworthy policies refuse every load instead of being ignored.
    let expect_policy_error = |policy: &HostPolicy, needle: &str| {
        let e = Requirement::resolve(None, policy).unwrap_err();
        assert!(matches!(e, SignatureError::Policy { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(needle), "{msg}");
        assert!(msg.contains("require-signature.pub"), "{msg}");
    };
    expect_policy_error(&policy_file(dir.path(), &pubkey, 0o664), "writable");
    expect_policy_error(&policy_file(dir.path(), &pubkey, 0o646), "writable");
    let mut other_owner = policy_file(dir.path(), &pubkey, 0o644);
    other_owner.owner = other_owner.owner.wrapping_add(1);
    expect_policy_error(&other_owner, "belongs to uid");
    let policy = policy_file(dir.path(), &pubkey, 0o644);
    std::fs::set_permissions(
        policy.path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    expect_policy_error(&policy, "its directory");
    std::fs::set_permissions(
        policy.path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(&policy.path, "garbage\n").unwrap();
    expect_policy_error(&policy, "untrusted comment");
    std::fs::remove_file(&policy.path).unwrap();
    std::fs::create_dir(&policy.path).unwrap();
    expect_policy_error(&policy, "regular file");
}

#[test]
fn the_built_in_policy_path_is_the_documented_one() {
    // A build may set AIRLOCK_POLICY_PATH; the default build uses /etc/airlock.
    if option_env!("AIRLOCK_POLICY_PATH").is_none() {
        assert_eq!(
            airlock_engine::signature::POLICY_PATH,
            "/etc/airlock/require-signature.pub"
        );
    }
    let p = HostPolicy::system();
    assert_eq!(p.owner, 0);
    assert_eq!(p.path, Path::new(airlock_engine::signature::POLICY_PATH));
}

mod hostile_manifests {
    use super::*;
    use proptest::prelude::*;

    /// Hashed once for all cases.
    fn valid_json() -> &'static str {
        static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        JSON.get_or_init(|| {
            let f = GgufFile::open(tiny_llama3()).unwrap();
            Manifest::compute("m.gguf", &f).to_json()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes: a manifest or a `Malformed` error naming the file, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            match Manifest::parse(Path::new("x.manifest.json"), &bytes) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.to_string().contains("x.manifest.json")),
            }
        }

        /// A valid manifest with bytes changed: parsed or refused, and a parsed one still covers
        /// its size exactly and checks any data without panicking.
        #[test]
        fn mutated_manifests_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
        ) {
            let mut text = valid_json().as_bytes().to_vec();
            for (at, b) in edits {
                let i = at.index(text.len());
                text[i] = b;
            }
            if let Ok(m) = Manifest::parse(Path::new("x.manifest.json"), &text) {
                prop_assert_eq!(m.ranges.iter().map(|r| r.length).sum::<u64>(), m.size);
                let data = vec![0u8; 4096];
                let _ = m.check_bytes(Path::new("x"), &data);
            }
        }
    }
}
