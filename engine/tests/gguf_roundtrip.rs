//! The writer against the reader: reader(writer(x)) == x for every value type, nested arrays,
//! every tensor type and several alignments; byte-exact determinism; atomic file writes; and the
//! real llama.cpp-written model re-written byte-identically from its parsed contents.

mod gguf_support;

use std::io::Write;

use airlock_engine::gguf::{Array, GgufFile, GgufWriter, TensorSpec, Value, WriteError};
use airlock_engine::output::{write_file, Inputs};
use airlock_kernels::types::GgmlType;
use gguf_support::*;

fn parse(bytes: Vec<u8>) -> GgufFile {
    GgufFile::from_bytes(bytes).unwrap_or_else(|e| panic!("writer output refused: {e}"))
}

fn assert_round_trip(
    metadata: &[(String, Value)],
    specs: &[TensorSpec],
    bytes: Vec<u8>,
) -> GgufFile {
    let f = parse(bytes);
    let got: Vec<(String, Value)> = f
        .metadata()
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    assert_eq!(got, metadata, "metadata differs after the round trip");
    for (k, v) in metadata {
        assert_eq!(f.get(k), Some(v), "lookup of {k}");
    }
    assert_eq!(f.tensors().len(), specs.len());
    for (i, (t, s)) in f.tensors().iter().zip(specs).enumerate() {
        assert_eq!((&t.name, &t.dims, t.ty), (&s.name, &s.dims, s.ty));
        assert_eq!(f.tensor(&s.name), Some(t));
        assert_eq!(t.offset % f.alignment, 0, "{}", t.name);
        assert_eq!(
            f.tensor_data(t),
            filler(i, n_bytes(s)),
            "data of {}",
            t.name
        );
    }
    // llama.cpp's layout: offsets are the running padded sum, and the file ends padded.
    let mut expect = 0;
    for t in f.tensors() {
        assert_eq!(
            t.offset, expect,
            "{} is not at the running padded offset",
            t.name
        );
        expect += t.n_bytes.div_ceil(f.alignment) * f.alignment;
    }
    assert_eq!(f.data_offset % f.alignment, 0);
    assert_eq!(f.file_size(), f.data_offset + expect);
    f
}

#[test]
fn every_value_type_and_every_tensor_type_round_trip() {
    let metadata = every_value_metadata();
    let specs = tensor_of_each_type();
    assert!(specs.iter().any(|s| s.ty.can_compute()));
    assert_eq!(specs.len(), airlock_kernels::types::all().len());
    let f = assert_round_trip(&metadata, &specs, build(&metadata, &specs));
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    // Typed accessors see what was written.
    assert_eq!(f.get_u32("t.u32"), Some(4_000_000_000));
    assert_eq!(f.get_str("t.string.empty"), Some(""));
    assert_eq!(f.get_bool("t.bool.true"), Some(true));
    assert_eq!(f.get_i32_array("t.arr.i32"), Some(vec![1, 2, 3, -4]));
    let strs: Vec<&str> = f.get_str_array("t.arr.string").unwrap().iter().collect();
    assert_eq!(strs, ["a", "", "héllo ▁world", "\u{0}nul"]);
}

#[test]
fn every_computable_type_alone_round_trips() {
    for &ty in airlock_kernels::types::all()
        .iter()
        .filter(|t| t.can_compute())
    {
        let specs = vec![spec("w", ty, 3), spec("v", ty, 1)];
        let metadata = vec![kv("general.architecture", Value::String("llama".into()))];
        assert_round_trip(&metadata, &specs, build(&metadata, &specs));
    }
}

#[test]
fn several_alignments_round_trip() {
    for a in [1u32, 2, 8, 16, 32, 64, 256, 4096, 65536] {
        let mut metadata = every_value_metadata();
        metadata.insert(1, kv("general.alignment", Value::U32(a)));
        let specs = tensor_of_each_type();
        let f = assert_round_trip(&metadata, &specs, build(&metadata, &specs));
        assert_eq!(f.alignment, a as u64);
    }
}

#[test]
fn version_2_round_trips() {
    let metadata = every_value_metadata();
    let specs = vec![spec("a", GgmlType::Q4_1, 2)];
    let bytes = build_version(2, &metadata, &specs);
    assert_eq!(&bytes[4..8], &2u32.to_le_bytes());
    let f = assert_round_trip(&metadata, &specs, bytes);
    assert_eq!(f.version, 2);
}

#[test]
fn no_tensors_and_no_metadata() {
    let bytes = build(&[], &[]);
    // Header (24 bytes) padded to 32, as llama.cpp pads the data section unconditionally.
    assert_eq!(bytes.len(), 32);
    let f = assert_round_trip(&[], &[], bytes);
    assert!(f.metadata().is_empty() && f.tensors().is_empty());
}

#[test]
fn output_is_deterministic() {
    let a = build(&every_value_metadata(), &tensor_of_each_type());
    let b = build(&every_value_metadata(), &tensor_of_each_type());
    assert_eq!(a, b);
    // Re-writing a parsed file gives the same bytes again.
    let f = parse(a.clone());
    assert_eq!(rewrite(&f, Vec::new()), a);
}

/// Writes `f`'s metadata and tensors (with its data) through the writer into `out`.
fn rewrite<W: Write>(f: &GgufFile, out: W) -> W {
    let metadata: Vec<(String, Value)> = f
        .metadata()
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    let specs: Vec<TensorSpec> = f
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let mut w = GgufWriter::with_version(out, f.version, &metadata, &specs).unwrap();
    assert_eq!(w.data_offset(), f.data_offset);
    for t in f.tensors() {
        w.write_tensor_data(f.tensor_data(t)).unwrap();
    }
    w.finish().unwrap()
}

/// A sink that checks each written byte against the expected file as it streams, so the 98 MB
/// model is never copied.
struct Compare<'a> {
    expected: &'a [u8],
    pos: usize,
}

impl Write for Compare<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let end = self.pos + buf.len();
        assert!(
            end <= self.expected.len(),
            "writer produced more than the original's {} bytes",
            self.expected.len()
        );
        if let Some(i) = (0..buf.len()).find(|&i| buf[i] != self.expected[self.pos + i]) {
            panic!(
                "first difference at byte {}: wrote {:#04x}, original has {:#04x}",
                self.pos + i,
                buf[i],
                self.expected[self.pos + i]
            );
        }
        self.pos = end;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn real_model_is_rewritten_byte_identical() {
    let f = GgufFile::open(model_path()).unwrap();
    assert_eq!(f.tensors().len(), 272);
    let out = rewrite(
        &f,
        Compare {
            expected: f.bytes(),
            pos: 0,
        },
    );
    assert_eq!(
        out.pos,
        f.bytes().len(),
        "writer produced fewer bytes than the original"
    );
}

#[test]
fn tiny_copy_of_real_model_round_trips() {
    let f = GgufFile::open(model_path()).unwrap();
    let bytes = tiny_copy_of(&f);
    let g = parse(bytes);
    assert_eq!(g.metadata(), f.metadata());
    assert_eq!(g.tensors().len(), 272);
}

fn writer_err(metadata: &[(String, Value)], specs: &[TensorSpec]) -> String {
    match GgufWriter::new(Vec::new(), metadata, specs) {
        Ok(_) => panic!("writer accepted bad input"),
        Err(e) => {
            assert!(matches!(e, WriteError::Invalid(_)), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn writer_refuses_what_the_reader_would_refuse() {
    let a = || kv("a", Value::U8(1));
    assert!(writer_err(&[a(), a()], &[]).contains("\"a\" appears twice"));
    assert!(writer_err(&[kv("", Value::U8(1))], &[]).contains("key"));
    for bad in [
        Value::U32(0),
        Value::U32(3),
        Value::U64(32),
        Value::U32(1 << 17),
    ] {
        assert!(writer_err(&[kv("general.alignment", bad)], &[]).contains("general.alignment"));
    }
    let deep = Array::Array(vec![Array::Array(vec![Array::Array(vec![Array::U8(
        vec![],
    )])])]);
    assert!(writer_err(&[kv("d", Value::Array(deep))], &[]).contains("nested"));
    let t = |name: &str, dims: Vec<u64>, ty| TensorSpec {
        name: name.into(),
        dims,
        ty,
    };
    let f32 = GgmlType::F32;
    assert!(writer_err(&[], &[t("x", vec![1], f32), t("x", vec![1], f32)]).contains("twice"));
    assert!(writer_err(&[], &[t("", vec![1], f32)]).contains("name"));
    assert!(writer_err(&[], &[t(&"n".repeat(64), vec![1], f32)]).contains("name"));
    assert!(writer_err(&[], &[t("x", vec![], f32)]).contains("dims"));
    assert!(writer_err(&[], &[t("x", vec![1; 5], f32)]).contains("dims"));
    assert!(writer_err(&[], &[t("x", vec![4, 0], f32)]).contains("dims"));
    assert!(writer_err(&[], &[t("x", vec![1 << 40, 1 << 40], f32)]).contains("overflows"));
    assert!(writer_err(&[], &[t("x", vec![33], GgmlType::Q4_0)]).contains("block size"));
}

#[test]
fn writer_checks_tensor_data_order_and_sizes() {
    let specs = vec![spec("a", GgmlType::F32, 1), spec("b", GgmlType::Q8_0, 1)];
    let mut w = GgufWriter::new(Vec::new(), &[], &specs).unwrap();
    let e = w.write_tensor_data(&[0; 7]).unwrap_err();
    assert!(e.to_string().contains("\"a\" takes 8 bytes, got 7"), "{e}");
    w.write_tensor_data(&[0; 8]).unwrap();
    let e = GgufWriter::new(Vec::new(), &[], &specs)
        .unwrap()
        .finish()
        .unwrap_err();
    assert!(e.to_string().contains("finish after 0 of 2"), "{e}");
    w.write_tensor_data(&[0; 68]).unwrap();
    let e = w.write_tensor_data(&[]).unwrap_err();
    assert!(e.to_string().contains("already written"), "{e}");
    parse(w.finish().unwrap());
}

type BoxError = Box<dyn std::error::Error>;

#[test]
fn the_output_helper_leaves_the_file_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let specs = vec![spec("a", GgmlType::F32, 1)];
    let files = || {
        let mut v: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };

    // Failure half-way: nothing at the target, no temporary left.
    let r = write_file(&path, Inputs::default(), false, |out| {
        let mut w = GgufWriter::new(out, &[], &specs)?;
        w.write_tensor_data(&[1; 3])?;
        Ok::<_, BoxError>(())
    });
    assert!(r.is_err());
    assert!(files().is_empty(), "{:?}", files());

    // Success: exactly the file.
    write_file(&path, Inputs::default(), false, |out| {
        let mut w = GgufWriter::new(out, &[], &specs)?;
        w.write_tensor_data(&[1; 8])?;
        w.finish()?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(files(), ["m.gguf"]);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor_data(&f.tensors()[0]), [1; 8]);

    // A failed rewrite keeps the old file intact.
    let before = std::fs::read(&path).unwrap();
    let r: Result<(), BoxError> = write_file(&path, Inputs::default(), true, |out| {
        out.write_all(b"GGUF partial")?;
        Err(WriteError::Invalid("converter gave up".into()).into())
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(files(), ["m.gguf"]);

    // A panic in the closure also cleans up.
    let other = dir.path().join("p.gguf");
    let caught = std::panic::catch_unwind(|| {
        let _ = write_file(
            &other,
            Inputs::default(),
            false,
            |_| -> Result<(), BoxError> { panic!("boom") },
        );
    });
    assert!(caught.is_err());
    assert_eq!(files(), ["m.gguf"]);
}
