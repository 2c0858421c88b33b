//! Replays the committed fuzz corpus (`fuzz/corpus/gguf_reader/`) through the reader under a
//! counting allocator, and throws random mutations of valid files at it: no panic, and no single
//! allocation during a parse larger than `K * input size + C`.
//!
//! `AIRLOCK_WRITE_SEEDS=1 cargo test -p airlock-engine --test gguf_corpus write_seeds` regenerates
//! the named seed files from the writer and the real model.

mod gguf_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;

use airlock_engine::gguf::{Array, GgufFile, MetadataEntry, StrArray, TensorInfo, Value};
use gguf_support::*;

/// Why the bound cannot be "<= file size" and what each constant covers:
///
/// K = 6: the reader keeps one `MetadataEntry` per metadata entry, in one Vec sized by the entry
/// count. An entry can take as few as 14 bytes on disk (8-byte key length, 1-byte key, 4-byte
/// type, 1-byte value) while `MetadataEntry` is 80 bytes on 64-bit targets (key `String` 24,
/// `Value` 48, offset 8), so a file of nothing but tiny entries needs 80/14 = 5.7 bytes of Vec
/// per byte of file. The other per-record structures are denser: `TensorInfo` 88 bytes per info
/// of at least 33 bytes (2.7x), a nested `Array` 48 bytes per array header of at least 12 bytes
/// (4x), sorted `u32` indices 4 bytes per entry of at least 14 bytes, numeric arrays and strings
/// 1x. The sizes are asserted
/// below so a struct that grows breaks this test rather than silently widening the bound.
///
/// C = 512: fixed-size allocations independent of the input. For a 0-byte or few-byte input the
/// only allocation is the error's description (`what`/`reason` strings such as "padding before the
/// tensor data section", or a key shown in an error, shortened to at most 80 characters plus
/// quoting and escaping), which is longer than the input itself.
const K: usize = 6;
const C: usize = 512;

struct Counting;

thread_local! {
    /// Largest single allocation (or reallocation) seen on this thread since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the thread-local may already be gone while a thread shuts down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

// SAFETY: every method forwards to `System` unchanged with the caller's layout and pointer, so the
// GlobalAlloc contract is exactly System's; the only addition is recording the size in a
// thread-local Cell, which does not allocate (const-initialised, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (i.e. from System) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from System with `layout`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests in this file run in parallel threads; the counter is per thread, so each measurement sees
/// only its own parse. The lock keeps the (rare) large seeds from running concurrently.
static SERIAL: Mutex<()> = Mutex::new(());

/// Parses `data` (a borrowed slice: the input itself is not counted) and returns the largest
/// single allocation the parse made, and whether it succeeded.
fn largest_allocation_parsing(data: &[u8]) -> (usize, bool) {
    LARGEST.with(|l| l.set(0));
    let ok = GgufFile::validate(data).is_ok();
    (LARGEST.with(|l| l.get()), ok)
}

fn bound(len: usize) -> usize {
    K * len + C
}

#[test]
fn struct_sizes_match_the_bound_derivation() {
    assert!(
        std::mem::size_of::<MetadataEntry>() <= K * 14,
        "MetadataEntry grew"
    );
    assert!(
        std::mem::size_of::<TensorInfo>() <= K * 33,
        "TensorInfo grew"
    );
    assert!(std::mem::size_of::<Array>() <= K * 12, "Array grew");
}

#[test]
fn committed_corpus_parses_within_the_allocation_bound() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = corpus_dir();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    assert!(
        entries.len() >= 5,
        "corpus at {} looks empty",
        dir.display()
    );
    let mut n_ok = 0;
    for p in &entries {
        let data = std::fs::read(p).unwrap();
        let (largest, ok) = largest_allocation_parsing(&data);
        n_ok += ok as usize;
        assert!(
            largest <= bound(data.len()),
            "{}: largest allocation {largest} bytes for a {}-byte input (bound {})",
            p.display(),
            data.len(),
            bound(data.len())
        );
        // The owning path must agree with the borrowing one.
        assert_eq!(GgufFile::from_bytes(data).is_ok(), ok, "{}", p.display());
    }
    assert!(n_ok >= 3, "only {n_ok} valid files in the corpus");
}

/// The worst case the bound is derived from: nothing but minimal metadata entries.
#[test]
fn many_tiny_entries_stay_within_the_bound() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Unique keys of 1 to 4 bytes, u8 values: 14 to 17 bytes per entry on disk.
    let metadata: Vec<_> = (0..5000u32)
        .map(|i| (format!("{i:x}"), Value::U8(i as u8)))
        .collect();
    let data = build(&metadata, &[]);
    let (largest, ok) = largest_allocation_parsing(&data);
    assert!(ok);
    assert!(
        largest <= bound(data.len()),
        "{largest} > {}",
        bound(data.len())
    );
    // Nested arrays of empty arrays: 12 bytes each on disk.
    let nested = Array::Array(vec![Array::U8(vec![]); 20000]);
    let data = build(&[kv("n", Value::Array(nested))], &[]);
    let (largest, ok) = largest_allocation_parsing(&data);
    assert!(ok);
    assert!(
        largest <= bound(data.len()),
        "{largest} > {}",
        bound(data.len())
    );
}

/// Random byte flips, interesting-value overwrites, truncations and splices of valid files: the
/// reader must never panic and must stay within the allocation bound.
#[test]
fn random_mutations_never_panic() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bases = [
        small_file(),
        build(&every_value_metadata(), &tensor_of_each_type()),
    ];
    let interesting: [u64; 10] = [
        0,
        1,
        4,
        5,
        0x7f,
        0xff,
        0xffff_ffff,
        1 << 31,
        1 << 60,
        u64::MAX,
    ];
    let mut rng = Rng(0x5EED_0FA1_10C4);
    let mut n_ok = 0;
    for round in 0..4000 {
        let mut data = bases[round % bases.len()].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(data.len());
            match rng.below(5) {
                0 => data[at] ^= 1 << rng.below(8),
                1 => data[at] = rng.next() as u8,
                2 => {
                    let v = interesting[rng.below(interesting.len())];
                    let w = [1usize, 4, 8][rng.below(3)];
                    let end = (at + w).min(data.len());
                    data[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
                3 => data.truncate(at),
                _ => {
                    let len = rng.below(64).min(data.len() - at);
                    let chunk = data[at..at + len].to_vec();
                    let to = rng.below(data.len());
                    data.splice(to..to, chunk);
                }
            }
            if data.is_empty() {
                break;
            }
        }
        let (largest, ok) = largest_allocation_parsing(&data);
        n_ok += ok as usize;
        assert!(
            largest <= bound(data.len()),
            "round {round}: {largest} > {}",
            bound(data.len())
        );
    }
    // Some mutations (in tensor data or padding) leave the file valid.
    assert!(n_ok > 0);
}

/// Regenerates the named seeds. Does nothing unless AIRLOCK_WRITE_SEEDS is set.
#[test]
fn write_seeds() {
    if std::env::var_os("AIRLOCK_WRITE_SEEDS").is_none() {
        return;
    }
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, data: &[u8]| std::fs::write(dir.join(name), data).unwrap();
    write("small.gguf", &small_file());
    let small_v2 = {
        let mut b = small_file();
        b[4] = 2;
        b
    };
    write("small_v2.gguf", &small_v2);
    write(
        "every_value_type.gguf",
        &build(&every_value_metadata(), &tensor_of_each_type()),
    );
    write("empty.gguf", &build(&[], &[]));
    let f = GgufFile::open(model_path()).unwrap();
    write("smollm2_header.gguf", &f.bytes()[..f.data_offset as usize]);
    // The real file's keys, types and tensor list re-created by the writer with one block per
    // tensor and the vocabulary cut to 64 entries: a valid llama.cpp-shaped file in 27 KB, which
    // the fuzzer mutates quickly. (The full-vocabulary copy, `tiny_copy_of`, is 1.8 MB and adds
    // nothing the header seed does not; gguf_roundtrip checks it round-trips.)
    let metadata: Vec<_> = f
        .metadata()
        .iter()
        .map(|e| {
            let v = match &e.value {
                Value::Array(Array::String(s)) => {
                    Value::Array(Array::String(s.iter().take(64).collect::<StrArray>()))
                }
                Value::Array(Array::I32(v)) => {
                    Value::Array(Array::I32(v[..64.min(v.len())].to_vec()))
                }
                Value::String(s) if s.len() > 256 => Value::String(s.chars().take(256).collect()),
                v => v.clone(),
            };
            (e.key.clone(), v)
        })
        .collect();
    let specs: Vec<_> = f
        .tensors()
        .iter()
        .map(|t| airlock_engine::gguf::TensorSpec {
            name: t.name.clone(),
            dims: vec![t.ty.block_size() as u64],
            ty: t.ty,
        })
        .collect();
    write("smollm2_short_vocab.gguf", &build(&metadata, &specs));
}
