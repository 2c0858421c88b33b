//! Fuzz the GGUF reader: any byte string must either be refused with a typed error or yield a
//! file whose every tensor slice and metadata value can be touched without a panic.
#![no_main]

use airlock_engine::gguf::{Array, GgufFile, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let validated = GgufFile::validate(data);
    let parsed = GgufFile::from_bytes(data.to_vec());
    assert_eq!(
        validated.is_ok(),
        parsed.is_ok(),
        "validate and from_bytes disagree"
    );
    match parsed {
        Err(e) => {
            // Every error must format (the message names what and where).
            let msg = e.to_string();
            assert!(!msg.is_empty());
        }
        Ok(f) => touch(&f, data.len()),
    }
});

fn touch(f: &GgufFile, len: usize) {
    let mut sum = 0u64;
    for t in f.tensors() {
        let d = f.tensor_data(t);
        assert_eq!(
            d.len() as u64,
            t.n_bytes,
            "tensor {:?} slice has the wrong length",
            t.name
        );
        assert!(f.data_offset + t.offset + t.n_bytes <= len as u64);
        assert!(std::ptr::eq(f.tensor(&t.name).unwrap(), t));
        sum = sum.wrapping_add(d.first().copied().unwrap_or(0) as u64);
        sum = sum.wrapping_add(d.last().copied().unwrap_or(0) as u64);
        sum = sum.wrapping_add(t.n_rows()).wrapping_add(t.row_len());
    }
    for e in f.metadata() {
        assert!(std::ptr::eq(f.get(&e.key).unwrap(), &e.value));
        sum = sum.wrapping_add(value(&e.value));
        let _ = (
            f.get_str(&e.key),
            f.get_u32(&e.key),
            f.get_u64(&e.key),
            f.get_f32(&e.key),
        );
        let _ = (
            f.get_bool(&e.key),
            f.get_str_array(&e.key),
            f.get_i32_array(&e.key),
        );
    }
    std::hint::black_box(sum);
}

fn value(v: &Value) -> u64 {
    let _ = (
        v.as_i128(),
        v.as_u32(),
        v.as_u64(),
        v.as_f32(),
        v.as_bool(),
        v.as_str(),
    );
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => array(a),
        _ => v.value_type().id() as u64,
    }
}

fn array(a: &Array) -> u64 {
    let mut sum = a.len() as u64;
    let _ = a.to_i64_vec();
    match a {
        Array::String(s) => {
            for x in s.iter() {
                sum = sum.wrapping_add(x.len() as u64);
            }
        }
        Array::Array(v) => {
            for x in v {
                sum = sum.wrapping_add(array(x));
            }
        }
        _ => {
            for i in 0..a.len() {
                sum = sum.wrapping_add(a.get(i).map(|v| value(&v)).unwrap_or(0));
            }
        }
    }
    sum
}
