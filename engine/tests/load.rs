//! Loading a model to run, as every front end does: options, the memory check, repacking, the
//! tokenizer, and errors that name the file and no front end's flags.

use std::path::{Path, PathBuf};

use airlock_engine::gguf::{TensorSpec, Value};
use airlock_engine::llama::{KvType, Precision};
use airlock_engine::load::{load, open_gguf, LoadError, LoadOptions};

mod gguf_support;
use gguf_support::{rewrite_tiny, tiny_llama3};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ has a parent")
        .to_path_buf()
}

/// A copy of the tiny model, its metadata and tensors edited by `edit`.
fn rewrite(
    dir: &Path,
    edit: impl Fn(&mut Vec<(String, Value)>, &mut Vec<(TensorSpec, Vec<u8>)>),
) -> PathBuf {
    rewrite_tiny(dir, "edited.gguf", edit)
}

/// A copy of the tiny model with `llama.context_length` set to `n_ctx`.
fn with_context_length(dir: &Path, n_ctx: u32) -> PathBuf {
    rewrite(dir, |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "llama.context_length" {
                *v = Value::U32(n_ctx);
            }
        }
    })
}

/// Engine messages describe the problem; flags are the front end's to add.
fn assert_names_no_flag(msg: &str) {
    assert!(
        !msg.contains("--") && !msg.contains("-c ") && !msg.contains("-c/"),
        "names a CLI flag: {msg}"
    );
}

#[test]
fn loads_with_the_options_it_was_given() {
    let opts = LoadOptions {
        n_ctx: 64,
        kv_type: KvType::F32,
        ..LoadOptions::default()
    };
    let m = load(&tiny_llama3(), &opts).unwrap();
    assert_eq!(
        (m.n_ctx, m.kv_type, m.precision),
        (64, KvType::F32, Precision::Fast)
    );
    assert_eq!(m.tokenizer.vocab_size(), m.model.config.vocab_size);
    let s = m.session();
    assert_eq!(
        (s.n_ctx, s.kv_type(), s.precision),
        (64, KvType::F32, Precision::Fast)
    );
    // The report carries the estimate for this context and KV type.
    let est = m.report.estimate;
    assert_eq!(est.kv_cache, m.model.kv_cache_bytes(64, KvType::F32));
    // The fast path repacks the Q8_0 matrices wherever the SIMD path has packed kernels.
    let packs = airlock_kernels::packed::packed_kernels().is_some();
    assert_eq!(m.report.repacked_bytes > 0, packs);
    assert_eq!(m.model.weights.packed_bytes(), m.report.repacked_bytes);
    assert!(m.report.pre_tokenizer_warning.is_none());
    assert_eq!(m.path, tiny_llama3());
}

#[test]
fn the_context_is_capped_at_the_models_and_must_be_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = with_context_length(dir.path(), 100);
    let m = load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(m.n_ctx, 100);
    let opts = LoadOptions {
        n_ctx: 0,
        ..LoadOptions::default()
    };
    let e = load(&path, &opts).err().expect("n_ctx 0 loaded");
    assert!(matches!(e, LoadError::ZeroContext), "{e}");
    assert_names_no_flag(&e.to_string());
}

#[test]
fn the_exact_path_and_repack_off_keep_the_file_layout() {
    for opts in [
        LoadOptions {
            precision: Precision::Exact,
            ..LoadOptions::default()
        },
        LoadOptions {
            repack: false,
            ..LoadOptions::default()
        },
    ] {
        let m = load(&tiny_llama3(), &opts).unwrap();
        assert_eq!(m.report.repacked_bytes, 0);
        assert_eq!(m.model.weights.packed_bytes(), 0);
        assert_eq!(m.report.estimate.repacked_extra, 0);
        assert_eq!(m.precision, opts.precision);
    }
}

#[test]
fn a_run_that_does_not_fit_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    // 2 (K, V) x 2 layers x 2^30 positions x 32 x 2 bytes = 256 GiB of KV cache.
    let path = with_context_length(dir.path(), 1 << 30);
    let opts = LoadOptions {
        n_ctx: 1 << 30,
        ..LoadOptions::default()
    };
    let e = load(&path, &opts).err().expect("256 GiB run loaded");
    match &e {
        LoadError::TooLarge {
            path: p,
            estimate,
            n_ctx,
            ..
        } => {
            assert_eq!(p, &path);
            assert_eq!(*n_ctx, 1 << 30);
            assert_eq!(estimate.kv_cache, 256 << 30);
        }
        e => panic!("expected TooLarge, got {e}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("256.00 GiB"),
        "{msg}"
    );
    assert_names_no_flag(&msg);
    // Forced, it is still refused: 256 GiB of KV cache is more than this machine has at all
    // (memory and swap), and an allocation that cannot succeed is refused before it is made
    // instead of aborting the process (or being killed) when the session allocates it.
    let machine = airlock_engine::memory::machine_memory().expect("/proc/meminfo");
    assert!(
        machine < 256 << 30,
        "this test needs a machine with less than 256 GiB of memory and swap"
    );
    let forced = LoadOptions {
        force: true,
        ..opts
    };
    let e = load(&path, &forced)
        .err()
        .expect("forced 256 GiB run loaded");
    assert!(
        matches!(e, LoadError::BeyondMachine { need, .. } if need >= 256 << 30),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("forcing cannot help"), "{msg}");
    assert_names_no_flag(&msg);
}

#[test]
fn bad_files_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let e = load(&missing, &LoadOptions::default()).err().unwrap();
    assert!(
        matches!(&e, LoadError::Open { path, error } if path == &missing
            && error.kind() == std::io::ErrorKind::NotFound),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("cannot open ") && msg.contains("missing.gguf"),
        "{msg}"
    );
    assert_names_no_flag(&msg);

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text, long enough to have a header").unwrap();
    let e = open_gguf(&text, false).err().unwrap();
    assert!(matches!(e, LoadError::Gguf { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("notes.txt") && msg.contains("not a GGUF file"),
        "{msg}"
    );
    // The same refusal through load(), which opens with open_gguf.
    let e = load(&text, &LoadOptions::default()).err().unwrap();
    assert_eq!(e.to_string(), msg);
}

#[test]
fn a_tokenizer_that_does_not_match_the_embeddings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 256 fewer embedding rows (the output head is tied) than the vocabulary's 128256 tokens.
    let path = rewrite(dir.path(), |meta, tensors| {
        meta.retain(|(k, _)| k != "llama.vocab_size");
        for (spec, data) in tensors.iter_mut() {
            if spec.name == "token_embd.weight" {
                let row_bytes = data.len() / spec.dims[1] as usize;
                spec.dims[1] = 128000;
                data.truncate(128000 * row_bytes);
            }
        }
    });
    let e = load(&path, &LoadOptions::default()).err().unwrap();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            LoadError::VocabularyMismatch {
                vocab: 128256,
                rows: 128000,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert_names_no_flag(&msg);
}

#[test]
fn a_tokenizer_json_that_does_not_fit_the_model_is_refused_naming_both_files() {
    // SmolLM2's tokenizer.json has 49152 tokens, too few for Llama 3's special-token ids.
    let json = root().join("tests/fixtures/smollm2/hf/tokenizer.json");
    let opts = LoadOptions {
        tokenizer_json: Some(json.clone()),
        ..LoadOptions::default()
    };
    let e = load(&tiny_llama3(), &opts).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, LoadError::TokenizerJson { .. }), "{msg}");
    assert!(
        msg.contains(&json.display().to_string())
            && msg.contains(&tiny_llama3().display().to_string()),
        "{msg}"
    );
    assert_names_no_flag(&msg);
}

#[test]
fn a_zero_thread_count_is_refused() {
    let e = airlock_engine::load::init_threads(Some(0)).err().unwrap();
    assert!(matches!(e, LoadError::ZeroThreads));
    assert_names_no_flag(&e.to_string());
    assert!(airlock_engine::load::physical_cores() >= 1);
}

#[test]
fn a_thread_count_above_the_cap_is_refused_before_any_thread_starts() {
    let max = airlock_engine::load::MAX_THREADS;
    let e = airlock_engine::load::init_threads(Some(max + 1))
        .err()
        .unwrap();
    assert!(
        matches!(e, LoadError::TooManyThreads { threads, max: m } if threads == max + 1 && m == max),
        "{e}"
    );
    assert_names_no_flag(&e.to_string());
}
