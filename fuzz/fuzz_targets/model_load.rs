//! Fuzz model loading and running: any byte string is refused with an error by the reader or
//! by the checks `run` makes, or it loads, tokenizes, and runs a prompt and a decode step in both
//! precisions and every KV type, without a panic (`engine/tests/model_fuzz/mod.rs`, which the
//! corpus replay test `engine/tests/model_corpus.rs` shares).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../engine/tests/model_fuzz/mod.rs"]
mod model_fuzz;

fuzz_target!(|data: &[u8]| {
    let _ = model_fuzz::check(data);
});
