//! One corrupt file per defect class, each made from a valid writer-built file by patching the
//! bytes of one field. Every case checks the error variant and that its message names what was
//! wrong (key or tensor) and the byte offset where it was found. Nothing may panic.

mod gguf_support;

use airlock_engine::gguf::{Array, GgufError, GgufFile, Value};
use airlock_kernels::types::GgmlType;
use gguf_support::*;

fn err(bytes: &[u8]) -> GgufError {
    let e = GgufFile::validate(bytes).expect_err("corrupt file accepted");
    // The owning path reports the same thing.
    let e2 = GgufFile::from_bytes(bytes.to_vec()).expect_err("corrupt file accepted");
    assert_eq!(e.to_string(), e2.to_string());
    e
}

/// Asserts the message mentions every fragment (a name, "offset N", ...).
fn says(e: &GgufError, fragments: &[&str]) {
    let msg = e.to_string();
    for f in fragments {
        assert!(msg.contains(f), "{msg:?} does not mention {f:?}");
    }
}

fn kv_at<'a>(pos: &'a [KvAt], key: &str) -> &'a KvAt {
    pos.iter().find(|k| k.key == key).unwrap()
}

fn base() -> Vec<u8> {
    small_file()
}

#[test]
fn the_base_file_is_valid() {
    let f = GgufFile::from_bytes(base()).unwrap();
    assert_eq!(f.tensors().len(), 3);
}

#[test]
fn every_prefix_fails_cleanly() {
    let b = base();
    let f = GgufFile::from_bytes(b.clone()).unwrap();
    // The last tensor's trailing padding is optional (llama.cpp's loader only needs the data), so
    // every cut up to the end of the last tensor's bytes must fail.
    let last = f.tensors().last().unwrap();
    let data_end = (f.data_offset + last.offset + last.n_bytes) as usize;
    assert!(data_end < b.len(), "the base file should end with padding");
    GgufFile::validate(&b[..data_end]).unwrap();
    for len in 0..data_end {
        let e = err(&b[..len]);
        let header = len < f.data_offset as usize;
        match e {
            GgufError::Truncated { offset, .. } => {
                assert!(offset <= b.len() as u64, "prefix {len}: {e}");
                says(&e, &["truncated", &format!("offset {offset}")]);
            }
            GgufError::BadMagic { .. } if header => says(&e, &["magic", "offset 0"]),
            _ => panic!("prefix of {len} bytes: unexpected {e:?}"),
        }
    }
    // The real model's header, cut anywhere in its first 64 KiB and at the end of every tensor
    // info, behaves the same.
    let real = GgufFile::open(model_path()).unwrap();
    let bytes = real.bytes();
    let mut cuts: Vec<usize> = (0..4096).chain((4096..65536).step_by(61)).collect();
    cuts.extend(real.tensors().iter().map(|t| t.info_offset as usize + 7));
    cuts.push(real.data_offset as usize - 1);
    cuts.push(real.data_offset as usize + 5);
    for len in cuts {
        match err(&bytes[..len]) {
            GgufError::Truncated { .. } | GgufError::BadMagic { .. } => {}
            e => panic!("real header cut at {len}: unexpected {e:?}"),
        }
    }
}

#[test]
fn bad_magic_and_version() {
    let mut b = base();
    b[0] = b'g';
    let e = err(&b);
    assert!(matches!(e, GgufError::BadMagic { found } if &found == b"gGUF"));
    says(&e, &["magic", "offset 0"]);
    for v in [0u32, 1, 4, 0x0300_0000] {
        let mut b = base();
        put_u32(&mut b, 4, v);
        let e = err(&b);
        assert!(matches!(e, GgufError::UnsupportedVersion { version } if version == v));
        says(&e, &[&format!("version {v}"), "offset 4"]);
    }
}

#[test]
fn huge_counts_fail_at_once() {
    for (at, what) in [(8, "tensor count"), (16, "metadata entry count")] {
        for n in [1u64 << 60, u64::MAX, 1 << 47] {
            let mut b = base();
            put_u64(&mut b, at, n);
            let e = err(&b);
            assert!(
                matches!(e, GgufError::CountTooLarge { count, .. } if count == n),
                "{e:?}"
            );
            says(&e, &[what, &format!("offset {at}"), &n.to_string()]);
        }
        // A count merely larger than this file holds: a truncated file.
        let mut b = base();
        put_u64(&mut b, at, 1000);
        let e = err(&b);
        assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
        says(&e, &[what, &format!("offset {at}")]);
    }
}

#[test]
fn huge_array_and_string_lengths() {
    let b = base();
    let pos = kv_positions(&b);
    // Array element count: after the element type.
    let scores = kv_at(&pos, "tokenizer.ggml.scores");
    for n in [1u64 << 60, u64::MAX] {
        let mut m = b.clone();
        put_u64(&mut m, scores.value_at + 4, n);
        let e = err(&m);
        assert!(
            matches!(e, GgufError::CountTooLarge { count, .. } if count == n),
            "{e:?}"
        );
        says(
            &e,
            &[
                "tokenizer.ggml.scores",
                &format!("offset {}", scores.value_at + 4),
            ],
        );
    }
    // Length of a string value.
    let arch = kv_at(&pos, "general.architecture");
    let mut m = b.clone();
    put_u64(&mut m, arch.value_at, 1 << 62);
    let e = err(&m);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e:?}");
    says(
        &e,
        &["general.architecture", &format!("offset {}", arch.value_at)],
    );
    // Length of a string inside a string array (after type and count).
    let tokens = kv_at(&pos, "tokenizer.ggml.tokens");
    let mut m = b.clone();
    put_u64(&mut m, tokens.value_at + 12, u64::MAX);
    let e = err(&m);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e:?}");
    says(
        &e,
        &[
            "string 0 of \"tokenizer.ggml.tokens\"",
            &format!("offset {}", tokens.value_at + 12),
        ],
    );
    // Length of a key.
    let mut m = b.clone();
    put_u64(&mut m, arch.start, 1 << 40);
    let e = err(&m);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e:?}");
    says(
        &e,
        &["key of metadata entry 0", &format!("offset {}", arch.start)],
    );
    // Length of a tensor name.
    let t = &tensor_positions(&b)[1];
    let mut m = b.clone();
    put_u64(&mut m, t.start, u64::MAX);
    let e = err(&m);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e:?}");
    says(&e, &["name of tensor 1", &format!("offset {}", t.start)]);
}

fn tensor_err(patch: impl Fn(&mut Vec<u8>, &TensorAt), which: usize) -> (GgufError, TensorAt) {
    let mut b = base();
    let t = tensor_positions(&b).remove(which);
    patch(&mut b, &t);
    (err(&b), t)
}

fn bad_tensor(patch: impl Fn(&mut Vec<u8>, &TensorAt), which: usize, reason: &str) {
    let (e, t) = tensor_err(patch, which);
    assert!(
        matches!(&e, GgufError::BadTensor { name, offset, .. } if *name == t.name && *offset == t.start as u64),
        "{e:?}"
    );
    says(&e, &[&t.name, &format!("offset {}", t.start), reason]);
}

#[test]
fn bad_dims() {
    // n_dims 0 and 5.
    bad_tensor(|b, t| put_u32(b, t.n_dims_at, 0), 0, "n_dims is 0");
    bad_tensor(|b, t| put_u32(b, t.n_dims_at, 5), 0, "n_dims is 5");
    bad_tensor(
        |b, t| put_u32(b, t.n_dims_at, u32::MAX),
        0,
        "n_dims is 4294967295",
    );
    // A zero dimension.
    bad_tensor(|b, t| put_u64(b, t.dims_at + 8, 0), 0, "dimension 1 is 0");
    // A dimension above i64::MAX.
    bad_tensor(|b, t| put_u64(b, t.dims_at, u64::MAX), 1, "dimension 0");
    // Dimensions whose product overflows.
    bad_tensor(|b, t| put_u64(b, t.dims_at + 8, 1 << 62), 0, "overflows");
    // Row length not a multiple of the block size (Q8_0: 32).
    bad_tensor(|b, t| put_u64(b, t.dims_at, 48), 0, "block size 32");
}

#[test]
fn unknown_tensor_type_is_named_by_number() {
    for id in [4u32, 5, 31, 42, 1000, u32::MAX] {
        let (e, t) = tensor_err(|b, t| put_u32(b, t.type_at, id), 2);
        assert!(
            matches!(&e, GgufError::UnknownTensorType { name, type_id, .. } if *name == t.name && *type_id == id),
            "{e:?}"
        );
        says(
            &e,
            &[
                &t.name,
                &format!("offset {}", t.start),
                &format!("ggml type {id}"),
            ],
        );
    }
}

#[test]
fn bad_offsets() {
    // Misaligned.
    bad_tensor(
        |b, t| put_u64(b, t.offset_at, 8),
        1,
        "not a multiple of the alignment 32",
    );
    // Far out of range (and overflowing).
    bad_tensor(
        |b, t| put_u64(b, t.offset_at, 1 << 55),
        2,
        "outside any possible data section",
    );
    bad_tensor(|b, t| put_u64(b, t.offset_at, u64::MAX - 31), 2, "outside");
    // Just past the end of the file: reported as a truncated file, naming the tensor.
    let (e, t) = tensor_err(|b, t| put_u64(b, t.offset_at, 4096), 2);
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    says(&e, &[&format!("data of tensor {:?}", t.name)]);
}

#[test]
fn overlapping_tensors() {
    let b = base();
    let ts = tensor_positions(&b);
    let mut m = b.clone();
    // Point the third tensor at the first one's data.
    put_u64(&mut m, ts[2].offset_at, 0);
    let e = err(&m);
    assert!(
        matches!(&e, GgufError::OverlappingTensors { first, second, offset, .. }
            if *first == ts[0].name && *second == ts[2].name && *offset == ts[2].start as u64),
        "{e:?}"
    );
    says(
        &e,
        &[&ts[0].name, &ts[2].name, &format!("offset {}", ts[2].start)],
    );
}

#[test]
fn unknown_value_types() {
    let b = base();
    let pos = kv_positions(&b);
    let k = kv_at(&pos, "llama.block_count");
    for id in [13u32, 99, u32::MAX] {
        let mut m = b.clone();
        put_u32(&mut m, k.type_at, id);
        let e = err(&m);
        assert!(
            matches!(&e, GgufError::UnknownValueType { type_id, .. } if *type_id == id),
            "{e:?}"
        );
        says(
            &e,
            &[
                "llama.block_count",
                &format!("offset {}", k.type_at),
                &format!("type {id}"),
            ],
        );
    }
    // As an array element type.
    let k = kv_at(&pos, "tokenizer.ggml.scores");
    let mut m = b.clone();
    put_u32(&mut m, k.value_at, 13);
    let e = err(&m);
    assert!(
        matches!(&e, GgufError::UnknownValueType { type_id: 13, .. }),
        "{e:?}"
    );
    says(
        &e,
        &["tokenizer.ggml.scores", &format!("offset {}", k.value_at)],
    );
}

#[test]
fn bad_utf8() {
    let b = base();
    let pos = kv_positions(&b);
    // In a key.
    let k = kv_at(&pos, "llama.block_count");
    let mut m = b.clone();
    m[k.start + 8] = 0xff;
    let e = err(&m);
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e:?}");
    let entry = pos.iter().position(|p| p.key == k.key).unwrap();
    says(
        &e,
        &[
            &format!("key of metadata entry {entry}"),
            &format!("offset {}", k.start + 8),
        ],
    );
    // In a string value.
    let k = kv_at(&pos, "general.architecture");
    let mut m = b.clone();
    m[k.value_at + 8 + 2] = 0xc3; // "ll\xc3ma": a lead byte without its continuation
    let e = err(&m);
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e:?}");
    says(
        &e,
        &[
            "general.architecture",
            &format!("offset {}", k.value_at + 10),
        ],
    );
    // In a string array element.
    let k = kv_at(&pos, "tokenizer.ggml.tokens");
    let mut m = b.clone();
    m[k.value_at + 12 + 8] = 0x80; // "<s>" -> "\x80s>"
    let e = err(&m);
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e:?}");
    says(
        &e,
        &[
            "tokenizer.ggml.tokens",
            &format!("offset {}", k.value_at + 20),
        ],
    );
    // In a tensor name.
    let t = &tensor_positions(&b)[1];
    let mut m = b.clone();
    m[t.start + 8] = 0xfe;
    let e = err(&m);
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e:?}");
    says(
        &e,
        &["name of tensor 1", &format!("offset {}", t.start + 8)],
    );
}

#[test]
fn duplicate_key_and_tensor() {
    // Two keys of equal length, then the last byte of the second patched to match the first.
    let metadata = vec![
        kv("general.architecture", Value::String("llama".into())),
        kv("general.architecturX", Value::String("llama".into())),
    ];
    let mut m = build(&metadata, &[spec("a", GgmlType::F32, 1)]);
    let second = kv_positions(&m)[1].start;
    let last = second + 8 + "general.architecturX".len() - 1;
    m[last] = b'e';
    let e = err(&m);
    assert!(
        matches!(&e, GgufError::DuplicateKey { key, offset } if key == "general.architecture" && *offset == second as u64),
        "{e:?}"
    );
    says(
        &e,
        &["general.architecture", &format!("offset {second}"), "twice"],
    );

    let mut m = build(
        &[],
        &[spec("w.a", GgmlType::F32, 1), spec("w.b", GgmlType::F32, 1)],
    );
    let ts = tensor_positions(&m);
    m[ts[1].start + 8 + 2] = b'a';
    let e = err(&m);
    assert!(
        matches!(&e, GgufError::DuplicateTensor { name, offset } if name == "w.a" && *offset == ts[1].start as u64),
        "{e:?}"
    );
    says(&e, &["w.a", &format!("offset {}", ts[1].start), "twice"]);
}

#[test]
fn bad_alignment() {
    let b = base();
    let pos = kv_positions(&b);
    let k = kv_at(&pos, "general.alignment");
    for a in [0u32, 3, 48, 1 << 20] {
        let mut m = b.clone();
        put_u32(&mut m, k.value_at, a);
        let e = err(&m);
        assert!(
            matches!(&e, GgufError::Invalid { what, .. } if what == "general.alignment"),
            "{e:?}"
        );
        says(
            &e,
            &[
                "general.alignment",
                &format!("offset {}", k.start),
                &a.to_string(),
            ],
        );
    }
    // Wrong type: an i32 (same size, so the rest of the file still parses).
    let mut m = b.clone();
    put_u32(&mut m, k.type_at, 5);
    let e = err(&m);
    assert!(
        matches!(&e, GgufError::WrongKeyType { key, expected: "u32", found: "i32", .. } if key == "general.alignment"),
        "{e:?}"
    );
    says(
        &e,
        &["general.alignment", &format!("offset {}", k.start), "i32"],
    );
}

#[test]
fn bad_bool_bytes() {
    let b = base();
    let pos = kv_positions(&b);
    let k = kv_at(&pos, "tokenizer.ggml.add_bos_token");
    for byte in [2u8, 0xff] {
        let mut m = b.clone();
        m[k.value_at] = byte;
        let e = err(&m);
        assert!(matches!(e, GgufError::Invalid { .. }), "{e:?}");
        says(
            &e,
            &[
                "tokenizer.ggml.add_bos_token",
                &format!("offset {}", k.value_at),
                &format!("byte {byte}"),
            ],
        );
    }
    // In a bool array.
    let metadata = vec![kv(
        "flags",
        Value::Array(Array::Bool(vec![true, false, true])),
    )];
    let mut m = build(&metadata, &[]);
    let k = &kv_positions(&m)[0];
    let second = k.value_at + 12 + 1;
    m[second] = 7;
    let e = err(&m);
    assert!(matches!(e, GgufError::Invalid { .. }), "{e:?}");
    says(&e, &["flags", &format!("offset {second}"), "byte 7"]);
}

#[test]
fn nesting_too_deep() {
    // Three levels are allowed (the writer checks too); a fourth is refused. Patch a depth-3
    // array's innermost element type to "array" with an empty count: depth 4.
    let inner = Array::Array(vec![Array::Array(vec![Array::U8(vec![])])]);
    let mut m = build(&[kv("deep", Value::Array(inner))], &[]);
    GgufFile::validate(&m).unwrap();
    let k = &kv_positions(&m)[0];
    // Layout: [9][1] [9][1] [0][0]: element types and counts at value_at, +12, +24.
    let innermost = k.value_at + 24;
    put_u32(&mut m, innermost, 9);
    // Give the new innermost array one element, which must itself be an array header.
    put_u64(&mut m, innermost + 4, 1);
    m.splice(innermost + 12..innermost + 12, [0u8; 12]);
    let e = err(&m);
    assert!(
        matches!(e, GgufError::NestingTooDeep { max_depth: 3, .. }),
        "{e:?}"
    );
    says(&e, &["deep", &format!("offset {}", innermost + 12)]);
}

#[test]
fn empty_key_and_long_or_empty_tensor_name() {
    let b = base();
    let pos = kv_positions(&b);
    // Zero the length of the first key: the key is empty and its bytes become garbage.
    let mut m = b.clone();
    put_u64(&mut m, pos[0].start, 0);
    let e = err(&m);
    assert!(matches!(e, GgufError::Invalid { .. }), "{e:?}");
    says(
        &e,
        &[
            "key of metadata entry 0",
            &format!("offset {}", pos[0].start),
            "empty",
        ],
    );
    // A 64-byte tensor name.
    let long = "n".repeat(64);
    let metadata = vec![];
    let mut m = build(&metadata, &[spec(&"n".repeat(63), GgmlType::F32, 1)]);
    let t = &tensor_positions(&m)[0];
    put_u64(&mut m, t.start, 64);
    m.insert(t.start + 8, b'n');
    let e = err(&m);
    assert!(matches!(e, GgufError::BadTensor { .. }), "{e:?}");
    says(&e, &[&long, &format!("offset {}", t.start), "64 bytes"]);
}

#[test]
fn very_long_names_are_shortened_in_messages() {
    let key = "k".repeat(5000);
    let mut m = build(&[kv(&key, Value::U32(1))], &[]);
    let k = &kv_positions(&m)[0];
    put_u32(&mut m, k.type_at, 77);
    let e = err(&m);
    let msg = e.to_string();
    assert!(msg.len() < 6000, "the message is the key plus a line");
    assert!(matches!(e, GgufError::UnknownValueType { type_id: 77, .. }));
}
