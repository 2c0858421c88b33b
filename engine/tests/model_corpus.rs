//! Model files as `run` meets them (`model_fuzz::check`): the committed corpus of the fuzz target
//! `model_load` (`fuzz/corpus/model_load/`) and random mutations of the seed models' headers
//! are each refused with an error or loaded and run in both precisions, never a panic.
//!
//! `AIRLOCK_WRITE_SEEDS=1 cargo test -p airlock-engine --test model_corpus write_seeds` rewrites
//! the seed files from `model_fuzz::seeds`.

mod gguf_support;
mod model_fuzz;

use std::path::PathBuf;

use airlock_engine::gguf::{Array, GgufFile, Value};
use gguf_support::Rng;
use model_fuzz::{check, seed_parts, seeds, Outcome, Parts};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/model_load")
}

#[test]
fn write_seeds() {
    if std::env::var_os("AIRLOCK_WRITE_SEEDS").is_none() {
        return;
    }
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn every_seed_loads_and_runs() {
    for (name, bytes) in seeds() {
        assert!(bytes.len() <= 256 << 10, "{name}: {} bytes", bytes.len());
        assert_eq!(check(&bytes), Outcome::Ran, "{name}");
    }
}

#[test]
fn committed_seeds_are_the_builders() {
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(corpus_dir().join(name)).unwrap_or_else(|e| {
            panic!("{name}: {e} (AIRLOCK_WRITE_SEEDS=1 ... --test model_corpus write_seeds)")
        });
        assert!(on_disk == bytes, "{name} differs from its builder");
    }
}

#[test]
fn committed_corpus_never_panics() {
    let mut entries: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    assert!(entries.len() >= 3, "the corpus lost its seeds");
    let ran = entries
        .iter()
        .filter(|p| check(&std::fs::read(p).unwrap()) == Outcome::Ran)
        .count();
    // The seeds at least; a corpus of only refusals would test the reader, not the model.
    assert!(ran >= 3, "{ran} of {} files ran", entries.len());
}

#[test]
fn mutated_headers_never_panic() {
    // Values a count, dimension or id field turns hostile with: zero, one, off by one around
    // the seeds' sizes, powers of two and the extremes.
    let interesting: [u64; 12] = [
        0,
        1,
        2,
        3,
        15,
        17,
        31,
        33,
        255,
        1 << 16,
        u32::MAX as u64,
        u64::MAX,
    ];
    let bases: Vec<Vec<u8>> = seeds().into_iter().map(|(_, b)| b).collect();
    let headers: Vec<usize> = bases
        .iter()
        .map(|b| GgufFile::from_bytes(b.clone()).unwrap().data_offset as usize)
        .collect();
    let mut rng = Rng(0x0DE1_10AD);
    let (mut ran, mut refused) = (0, 0);
    for round in 0..600 {
        let which = round % bases.len();
        let mut data = bases[which].clone();
        for _ in 0..1 + rng.below(2) {
            let at = rng.below(headers[which]);
            match rng.below(3) {
                0 => data[at] = rng.next() as u8,
                _ => {
                    let v = interesting[rng.below(interesting.len())];
                    let w = [1usize, 4, 8][rng.below(3)];
                    let end = (at + w).min(data.len());
                    let n = end - at;
                    data[at..end].copy_from_slice(&v.to_le_bytes()[..n]);
                }
            }
        }
        let outcome = std::panic::catch_unwind(|| check(&data));
        match outcome {
            Ok(Outcome::Ran) => ran += 1,
            Ok(Outcome::Refused(_)) => refused += 1,
            Err(_) => panic!("round {round} (seed {which}) panicked"),
        }
    }
    // Both sides reached: mutations that keep the file valid (a name, a float) and ones that
    // break it.
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}

/// Runs `check` on an edited seed, turning a panic into a failure that names the edit.
/// `Refused` also where the writer refuses the edit ([`Parts::try_assemble`]).
fn survives(p: &Parts, what: &str) -> Outcome {
    let Some(bytes) = p.try_assemble() else {
        return Outcome::Refused("the writer refused it".into());
    };
    match std::panic::catch_unwind(|| check(&bytes)) {
        Ok(o) => o,
        Err(_) => panic!("{what}: panicked"),
    }
}

/// Numbers a count, size, id or factor turns hostile with, in each numeric value type.
fn hostile_values() -> Vec<Value> {
    let mut v = Vec::new();
    for x in [
        0u64,
        1,
        2,
        3,
        7,
        15,
        16,
        17,
        31,
        33,
        63,
        65,
        255,
        257,
        1 << 16,
        1 << 31,
    ] {
        v.push(Value::U32(x as u32));
        v.push(Value::U64(x));
    }
    v.extend([
        Value::U32(u32::MAX),
        Value::U64(u64::MAX),
        Value::I32(-1),
        Value::I32(i32::MIN),
        Value::I64(-1),
        Value::U8(0),
        Value::Bool(true),
        Value::Bool(false),
    ]);
    for x in [
        0.0f32,
        -0.0,
        -1.0,
        0.5,
        1e-30,
        1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ] {
        v.push(Value::F32(x));
        v.push(Value::F64(x as f64));
    }
    v.push(Value::String(String::new()));
    v.push(Value::Array(Array::U32(vec![0, 1])));
    v
}

#[test]
fn every_key_takes_every_hostile_value() {
    // Each key of the seeds, and the optional keys that change the computation, set to each
    // hostile value in turn: refused or run, never a panic.
    let extra = [
        "llama.rope.scaling.type",
        "llama.rope.scaling.factor",
        "llama.rope.freq_scale",
        "llama.attention.key_length",
        "llama.attention.value_length",
        "llama.expert_count",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.add_eos_token",
        "general.alignment",
    ];
    let (mut ran, mut refused) = (0, 0);
    for (name, base) in seed_parts() {
        let mut keys: Vec<String> = base.meta.iter().map(|(k, _)| k.clone()).collect();
        keys.extend(extra.iter().map(|k| k.to_string()));
        for key in &keys {
            for v in hostile_values() {
                let mut p = base.clone();
                match p.meta.iter_mut().find(|(k, _)| k == key) {
                    Some((_, old)) => *old = v.clone(),
                    None => p.meta.push((key.clone(), v.clone())),
                }
                // An alignment the writer itself refuses is the reader's business.
                if key == "general.alignment" && !matches!(v, Value::U32(1 | 2 | 16 | 32 | 256)) {
                    continue;
                }
                match survives(&p, &format!("{name}: {key} = {v:?}")) {
                    Outcome::Ran => ran += 1,
                    Outcome::Refused(_) => refused += 1,
                }
            }
        }
    }
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}

#[test]
fn every_tensor_takes_every_type() {
    // A tensor's type changed (its bytes resized and filled with a pattern that makes some f16
    // scales NaN and infinite): refused naming it, or run.
    let (mut ran, mut refused) = (0, 0);
    for (name, base) in seed_parts() {
        for i in 0..base.specs.len() {
            for &ty in airlock_kernels::types::all() {
                let mut p = base.clone();
                let n: u64 = p.specs[i].dims.iter().product();
                let Some(bytes) = ty.row_bytes(n) else {
                    continue;
                };
                p.specs[i].ty = ty;
                p.data[i] = (0..bytes).map(|j| (j * 151 % 256) as u8 | 0x7c).collect();
                let what = format!("{name}: {} as {ty:?}", p.specs[i].name);
                match survives(&p, &what) {
                    Outcome::Ran => ran += 1,
                    Outcome::Refused(_) => refused += 1,
                }
            }
        }
    }
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}

#[test]
fn every_tensor_takes_other_shapes() {
    // Each dimension of each tensor set to another size (the data resized to match), and a
    // dimension added or dropped: the shape checks must catch what the forward pass would
    // index out of.
    let mut refused = 0;
    for (name, base) in seed_parts() {
        for i in 0..base.specs.len() {
            let dims = base.specs[i].dims.clone();
            let mut shapes: Vec<Vec<u64>> = Vec::new();
            for d in 0..dims.len() {
                for x in [0, 1, 2, 16, 32, 256, dims[d] / 2, dims[d] * 2, dims[d] + 32] {
                    let mut s = dims.clone();
                    s[d] = x;
                    shapes.push(s);
                }
            }
            let mut more = dims.clone();
            more.push(2);
            shapes.push(more);
            shapes.push(dims[..dims.len() - 1].to_vec());
            shapes.push(vec![dims.iter().product()]);
            for s in shapes {
                if s == dims || s.is_empty() {
                    continue;
                }
                let mut p = base.clone();
                let ty = p.specs[i].ty;
                let n: u64 = s.iter().product();
                let Some(bytes) = ty.row_bytes(n) else {
                    continue;
                };
                if bytes > 4 << 20 {
                    continue;
                }
                p.specs[i].dims = s.clone();
                p.data[i] = (0..bytes).map(|j| (j * 37 % 251) as u8).collect();
                let what = format!("{name}: {} as {s:?}", p.specs[i].name);
                if let Outcome::Refused(_) = survives(&p, &what) {
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 0);
}

#[test]
fn tensors_dropped_duplicated_or_renamed_never_panic() {
    for (name, base) in seed_parts() {
        for i in 0..base.specs.len() {
            let mut p = base.clone();
            let t = p.specs.remove(i);
            p.data.remove(i);
            let _ = survives(&p, &format!("{name}: without {}", t.name));
            // The same tensor under another layer's name, or one past the last layer.
            let mut p = base.clone();
            p.specs[i].name = p.specs[i].name.replace("blk.0.", "blk.7.");
            let _ = survives(&p, &format!("{name}: {} moved to layer 7", t.name));
        }
    }
}
