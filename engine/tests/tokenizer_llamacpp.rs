//! Token ids must equal llama.cpp's (`llama-tokenize` defaults: BOS per
//! `add_bos_token`, special tokens parsed) for every fixture string.

use std::path::PathBuf;

use airlock_engine::gguf::GgufFile;
use airlock_engine::tokenizer::{PreTokenizerKind, TokenStreamDecoder, Tokenizer, VocabSpec};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ has a parent")
        .to_path_buf()
}

fn load(rel: &str, hint: &str) -> Tokenizer {
    let path = repo_root().join(rel);
    assert!(path.exists(), "{} is missing: {hint}", path.display());
    let f = GgufFile::open(&path).expect("open gguf");
    let spec = VocabSpec::from_gguf(&f).expect("vocab spec");
    Tokenizer::from_spec(&spec).expect("tokenizer")
}

fn smollm2() -> Tokenizer {
    load(
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "run scripts/fetch-models.sh",
    )
}

fn llama3() -> Tokenizer {
    load(
        "tests/fixtures/llama3/tiny-llama3-q8_0.gguf",
        "copy it from shared/fixtures/llama3/ (see tests/fixtures/README.md)",
    )
}

fn fixture(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/fixtures/llamacpp").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture json")
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Compares every case; reports all mismatches at once.
fn check_cases(tok: &Tokenizer, cases: &[(String, Vec<u32>)]) {
    let mut failures = Vec::new();
    for (text, want) in cases {
        let got = tok
            .encode(text, tok.add_bos_default(), true)
            .expect("encode");
        if &got != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn cases_list(name: &str) -> Vec<(String, Vec<u32>)> {
    fixture(name)["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            (
                c["text"].as_str().expect("text").to_string(),
                ids_of(&c["ids"]),
            )
        })
        .collect()
}

#[test]
fn smollm2_matches_llama_tokenize() {
    let tok = smollm2();
    assert_eq!(tok.pre_tokenizer(), PreTokenizerKind::Smollm);
    assert!(!tok.add_bos_default());
    let cases = cases_list("tokenize-smollm2.json");
    assert!(cases.len() > 100);
    check_cases(&tok, &cases);
}

#[test]
fn smollm2_examples_match_llama_tokenize() {
    let tok = smollm2();
    let cases: Vec<(String, Vec<u32>)> = fixture("tokenize-smollm2-examples.json")
        .as_object()
        .expect("object")
        .values()
        .map(|c| {
            (
                c["string"].as_str().expect("string").to_string(),
                ids_of(&c["ids"]),
            )
        })
        .collect();
    assert_eq!(cases.len(), 12);
    check_cases(&tok, &cases);
}

#[test]
fn llama3_matches_llama_tokenize() {
    let tok = llama3();
    assert_eq!(tok.pre_tokenizer(), PreTokenizerKind::Llama3);
    assert!(tok.add_bos_default());
    assert_eq!(tok.bos(), Some(128000));
    let cases = cases_list("tokenize-llama3.json");
    assert!(cases.len() > 100);
    check_cases(&tok, &cases);
}

#[test]
fn special_parsing_on_and_off() {
    let tok = llama3();
    let on = tok.encode("a<|eot_id|>b", false, true).unwrap();
    assert!(on.contains(&128009));
    let off = tok.encode("a<|eot_id|>b", false, false).unwrap();
    assert!(off.iter().all(|&id| id < 128000), "{off:?}");
    assert_eq!(tok.decode(&off, false).unwrap(), "a<|eot_id|>b");

    let tok = smollm2();
    let on = tok.encode("<|im_end|>", false, true).unwrap();
    assert_eq!(on, vec![2]);
    let off = tok.encode("<|im_end|>", false, false).unwrap();
    assert!(!off.contains(&2) && off.len() > 1, "{off:?}");
}

#[test]
fn eog_sets() {
    let tok = llama3();
    for id in [128001, 128008, 128009] {
        assert!(tok.is_eog(id), "{id}");
    }
    assert!(!tok.is_eog(128000));
    assert!(!tok.is_eog(791));
    let tok = smollm2();
    assert!(tok.is_eog(0) && tok.is_eog(2));
    assert!(!tok.is_eog(1));
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn decode_roundtrips_fixture_strings() {
    for (tok, name) in [
        (smollm2(), "tokenize-smollm2.json"),
        (llama3(), "tokenize-llama3.json"),
    ] {
        for (text, ids) in cases_list(name) {
            let skip = usize::from(tok.add_bos_default());
            let ids = &ids[skip..];
            // Control tokens rendered as text give the input back.
            assert_eq!(tok.decode(ids, true).unwrap(), text, "{name}");
            // Streaming, one token at a time, gives the same text.
            let mut d = TokenStreamDecoder::new(true);
            let mut s = String::new();
            for &id in ids {
                s.push_str(&d.push(&tok, id).unwrap());
            }
            s.push_str(&d.finish());
            assert_eq!(s, text, "{name} (streamed)");
        }
    }
}

#[test]
fn tokenizer_json_override_matches_llama_tokenize() {
    // The HF tokenizer.json of SmolLM2 (digit split restored) with the GGUF's
    // special ids must tokenize exactly as llama.cpp does from the GGUF.
    let path = repo_root().join("tests/fixtures/smollm2/hf/tokenizer.json");
    let f = GgufFile::open(repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .expect("run scripts/fetch-models.sh");
    let spec = VocabSpec::from_gguf(&f).unwrap();
    let tok = Tokenizer::from_tokenizer_json(&path, &spec).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    check_cases(&tok, &cases_list("tokenize-smollm2.json"));
    let off = tok.encode("<|im_end|>", false, false).unwrap();
    assert!(!off.contains(&2), "{off:?}");
    assert_eq!(tok.decode(&off, false).unwrap(), "<|im_end|>");
    assert!(tok.is_eog(2));
}

#[test]
fn hostile_tokenizer_json_is_refused_or_works_never_a_panic() {
    // `--tokenizer FILE` is hostile input: each key of SmolLM2's tokenizer.json (top level,
    // model, first added token, pre-tokenizer, decoder) set to each hostile JSON value in turn
    // is refused with an error or tokenizes and decodes, never a panic. The tokenizers crate
    // panicked on a continuing_subword_prefix that cuts a merge's first character.
    use serde_json::{json, Value};
    let bytes =
        std::fs::read(repo_root().join("tests/fixtures/smollm2/hf/tokenizer.json")).unwrap();
    let base: Value = serde_json::from_slice(&bytes).unwrap();
    let f = GgufFile::open(repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .expect("run scripts/fetch-models.sh");
    let spec = VocabSpec::from_gguf(&f).unwrap();
    let hostile = [
        json!(null),
        json!(-1),
        json!(0),
        json!(u32::MAX),
        json!(u64::MAX),
        json!(1e308),
        json!(""),
        json!("x"),
        json!("\u{120}"),
        json!([]),
        json!({}),
        json!([null]),
        json!({"a": 1}),
        json!(true),
    ];
    let mut paths: Vec<Vec<Value>> = Vec::new();
    for (section, obj) in [
        (None, &base),
        (Some("model"), &base["model"]),
        (Some("pre_tokenizer"), &base["pre_tokenizer"]),
        (Some("decoder"), &base["decoder"]),
    ] {
        for k in obj.as_object().into_iter().flat_map(|o| o.keys()) {
            let mut p: Vec<Value> = section.map(|s| json!(s)).into_iter().collect();
            p.push(json!(k));
            paths.push(p);
        }
    }
    for k in ["id", "content", "special"] {
        paths.push(vec![json!("added_tokens"), json!(0), json!(k)]);
    }
    // Two workers take every other path: about 500 tokenizer builds, each one thread's work,
    // were most of this file's time with a core idle.
    let sweep = |paths: Vec<&Vec<Value>>| {
        let (mut ok, mut refused) = (0, 0);
        for p in paths {
            for v in &hostile {
                let mut doc = base.clone();
                let mut at = &mut doc;
                for key in &p[..p.len() - 1] {
                    at = match key {
                        Value::Number(n) => &mut at[n.as_u64().unwrap() as usize],
                        k => &mut at[k.as_str().unwrap()],
                    };
                }
                match &p[p.len() - 1] {
                    Value::Number(n) => at[n.as_u64().unwrap() as usize] = v.clone(),
                    k => at[k.as_str().unwrap()] = v.clone(),
                }
                let bytes = serde_json::to_vec(&doc).unwrap();
                let what = format!("{p:?} = {v}");
                let got = std::panic::catch_unwind(|| {
                    let tok = Tokenizer::from_tokenizer_json_bytes(
                        std::path::Path::new("t.json"),
                        &bytes,
                        &spec,
                    )?;
                    let ids = tok.encode("hello world <|im_end|> 123", true, true)?;
                    tok.decode(&ids, true)
                });
                match got {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(_)) => refused += 1,
                    Err(_) => panic!("{what}: panicked"),
                }
            }
        }
        (ok, refused)
    };
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| sweep(paths.iter().step_by(2).collect()));
        let b = sweep(paths.iter().skip(1).step_by(2).collect());
        (a.join().unwrap_or_else(|e| std::panic::resume_unwind(e)), b)
    });
    let (ok, refused) = (a.0 + b.0, a.1 + b.1);
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
}
