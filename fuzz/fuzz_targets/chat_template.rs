//! Fuzz chat-template rendering as airlock does it for a template from a model file: parsed
//! in-process (the instrumented part), rendered in the render worker with its address-space
//! limit. Whatever the template, the fuzzing process must get a rendering or a ChatError,
//! never a crash or an allocation of its own that grows with the template's values; a worker
//! that dies is reported as MemoryExceeded (or TimeExceeded) and replaced.
//!
//! Needs the airlock binary as the worker: AIRLOCK_BIN=/path/to/airlock (see fuzz/README.md).
//! Input: the template, then optionally a NUL byte and the user message's content.
#![no_main]

use std::sync::Once;

use airlock_engine::chat::{ChatError, ChatLimits, ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

/// Small enough that memory-growing inputs die fast; the mechanism is the product's.
const LIMIT: u64 = 128 << 20;

static INSTALL: Once = Once::new();

fn install() {
    INSTALL.call_once(|| {
        let Some(bin) = std::env::var_os("AIRLOCK_BIN") else {
            eprintln!("set AIRLOCK_BIN to the airlock binary (the render worker)");
            std::process::exit(2);
        };
        airlock_engine::render::install(
            bin.into(),
            vec![airlock_engine::render::WORKER_ARG.into()],
            LIMIT,
        );
    });
}

fuzz_target!(|data: &[u8]| {
    install();
    let (src, content) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"hi"[..]),
    };
    let (Ok(src), Ok(content)) = (std::str::from_utf8(src), std::str::from_utf8(content)) else {
        return;
    };
    // Less fuel than the default, so slow inputs cost the fuzzer less; the bound under test
    // is memory.
    let limits = ChatLimits {
        fuel: 1_000_000,
        ..ChatLimits::default()
    };
    let Ok(t) = ChatTemplate::new("fuzz", src, "<s>", "</s>", limits) else {
        return;
    };
    let msgs = [ChatMessage::system("sys"), ChatMessage::user(content)];
    match t.render_segments(&msgs, true) {
        Ok(segs) => {
            let text: String = segs.iter().map(|s| s.text()).collect();
            assert!(text.len() <= limits.max_output_bytes);
        }
        Err(e @ ChatError::MemoryExceeded { .. }) => {
            assert!(e.to_string().contains("128 MiB"), "{e}");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
});
