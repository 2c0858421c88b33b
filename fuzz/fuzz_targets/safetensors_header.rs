//! Fuzz the safetensors header parser `convert` trusts before mapping any tensor: any byte
//! string is either refused with an error naming the file, or every tensor it returns lies
//! inside the input, has a byte size that matches its dtype and shape, and overlaps no other.
#![no_main]

use std::path::Path;

use airlock_convert::checkpoint::parse_header;
use libfuzzer_sys::fuzz_target;

fn dtype_size(d: &str) -> u64 {
    match d {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        other => panic!("accepted unknown dtype {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    match parse_header(Path::new("fuzz.safetensors"), data) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz.safetensors"),
                "error names no file: {msg}"
            );
        }
        Ok(tensors) => {
            let header_end = 8 + u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
            let mut ranges = Vec::new();
            for (name, t) in &tensors {
                assert!(
                    t.start >= header_end && t.start <= t.end && t.end <= data.len(),
                    "{name}"
                );
                let n = t
                    .shape
                    .iter()
                    .try_fold(dtype_size(&t.dtype), |a, &d| a.checked_mul(d))
                    .expect("accepted an overflowing shape");
                assert_eq!(n, (t.end - t.start) as u64, "{name}");
                ranges.push((t.start, t.end));
            }
            ranges.sort();
            for w in ranges.windows(2) {
                assert!(w[0].1 <= w[1].0, "overlap accepted");
            }
            // The reference crate must not panic on what we accepted either.
            let _ = safetensors::SafeTensors::deserialize(data);
        }
    }
});
