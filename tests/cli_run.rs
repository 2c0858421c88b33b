//! `airlock run`, `chat` and `tokenize` as a user runs them: the built binary, real files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use airlock_engine::gguf::Value;
use airlock_kernels::GgmlType;

mod support;
use support::{airlock, model as smollm2, root, stderr, tiny_llama3};

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn fixture(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures").join(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Copy of the tiny Llama 3 file at `dir/name` with its metadata and tensors passed through `edit`.
fn rewrite_tiny(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut support::Tensors),
) -> PathBuf {
    let path = dir.join(name);
    support::rewrite_gguf(&tiny_llama3(), &path, edit);
    path
}

#[test]
fn greedy_run_continues_the_prompt_like_the_reference() {
    // HF transformers' greedy continuation of this prompt starts " Paris." (fixture visible-1).
    let fx = fixture("smollm2/hf-logits/visible-1.json");
    let model = smollm2();
    let o = airlock(&[
        "run",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "4",
        "--temp",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let want: String = fx["greedy"]["text"]
        .as_str()
        .unwrap()
        .chars()
        .take(7)
        .collect();
    assert!(
        text.starts_with(&want),
        "got {text:?}, reference starts {want:?}"
    );
    let err = stderr(&o);
    assert!(
        err.contains("prompt: 5 tokens") && err.contains("generated: 4 tokens"),
        "{err}"
    );
}

#[test]
fn exact_run_matches_the_reference_greedy_text() {
    // The exact path follows HF float32's greedy choice token for token on this prompt.
    let fx = fixture("smollm2/hf-logits/visible-3.json");
    let model = smollm2();
    let prompt = fx["prompt"].as_str().unwrap();
    let n = fx["greedy"]["ids"].as_array().unwrap().len().to_string();
    let o = airlock(&[
        "run",
        "-m",
        model.to_str().unwrap(),
        "-p",
        prompt,
        "-n",
        &n,
        "--temp",
        "0",
        "--exact",
        "--kv-type",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end_matches('\n'),
        fx["greedy"]["text"].as_str().unwrap()
    );
}

#[test]
fn chat_run_answers_and_stops_at_end_of_turn() {
    let model = smollm2();
    let o = airlock(&[
        "run",
        "-m",
        model.to_str().unwrap(),
        "--chat",
        "-p",
        "What is phishing? Answer in one sentence.",
        "-n",
        "200",
        "--temp",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.to_lowercase().contains("phishing"), "{text}");
    // The reply ends at <|im_end|> well before 200 tokens and the control token is not printed.
    assert!(!text.contains("<|im_end|>"), "{text}");
    assert!(
        !stderr(&o).contains("generated: 200 tokens"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn chat_template_implies_chat_instead_of_being_ignored() {
    let model = smollm2();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "-m",
            model.to_str().unwrap(),
            "-n",
            "12",
            "--temp",
            "0",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-p", "What is phishing?"]);
        let o = airlock(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let implied = run(&["--chat-template", "chatml"]);
    assert_eq!(implied, run(&["--chat", "--chat-template", "chatml"]));
    // And it is not the raw prompt's continuation.
    assert_ne!(implied, run(&[]));
}

#[test]
fn stop_string_ends_generation_and_is_not_printed() {
    let model = smollm2();
    let o = airlock(&[
        "run",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "32",
        "--temp",
        "0",
        "--stop",
        ".",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(text.trim_end(), " Paris", "{text:?}");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = smollm2();
    let args = [
        "run",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "Once upon a time",
        "-n",
        "12",
        "--seed",
        "42",
        "--temp",
        "1.0",
    ];
    let a = airlock(&args);
    let b = airlock(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn prompt_from_file_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("prompt.txt");
    std::fs::write(&p, "The capital of France is").unwrap();
    let model = smollm2();
    let o = airlock(&[
        "run",
        "-m",
        model.to_str().unwrap(),
        "-f",
        p.to_str().unwrap(),
        "-n",
        "2",
        "--temp",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(" Paris"), "{}", stdout(&o));

    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "run",
            "-m",
            model.to_str().unwrap(),
            "-n",
            "2",
            "--temp",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"The capital of France is")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(" Paris"), "{}", stdout(&o));
}

#[test]
fn piped_chat_exits_nonzero_when_a_turn_failed() {
    let model = smollm2();
    let chat = |input: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args([
                "chat",
                "-m",
                model.to_str().unwrap(),
                "--temp",
                "0",
                "-n",
                "4",
            ])
            .args(["-c", "48"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    // Every turn is longer than the 48-token context: each fails, and so does the run.
    let long = "tell me about phishing ".repeat(20);
    let o = chat(format!("{long}\n{long}\n").as_bytes());
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("2 of 2 turns failed"), "{}", stderr(&o));
    // Turns that fit: exit 0.
    let o = chat(b"Hi\n");
    assert!(o.status.success(), "{}", stderr(&o));
    // A line past 64 MiB is an error before it is buffered whole (the chat may stop reading
    // before the writer is done: a broken pipe on this side is expected).
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["chat", "-m", model.to_str().unwrap(), "-n", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..65 {
            if input.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("longer than 67108864 bytes"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn chat_repl_keeps_history_and_exits_cleanly() {
    let model = smollm2();
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "chat",
            "-m",
            model.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "24",
            "-v",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi, my name is Ada.\nWhat is my name?\n/reset\nHello\n/exit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    // Per-turn stats: the second turn processes only its own new tokens, far fewer than the
    // whole conversation so far, and the context in use keeps growing.
    let turns: Vec<(usize, usize)> = err
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix('[')?;
            let new: usize = l.split_whitespace().next()?.parse().ok()?;
            let used: usize = l
                .split(", ")
                .last()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((new, used))
        })
        .collect();
    assert_eq!(turns.len(), 3, "{err}");
    assert!(
        turns[1].0 < turns[0].1,
        "second turn re-processed history: {turns:?}"
    );
    assert!(turns[1].1 > turns[0].1, "{turns:?}");
    // After /reset the context starts over.
    assert!(turns[2].1 < turns[1].1, "{turns:?}");
    assert!(err.contains("(conversation reset)"), "{err}");
}

#[test]
fn tokenize_ids_equal_llama_tokenize() {
    let fx = fixture("llamacpp/tokenize-smollm2-examples.json");
    let model = smollm2();
    let cases = fx
        .as_object()
        .map(|o| o.values().cloned().collect::<Vec<_>>())
        .unwrap_or_else(|| fx.as_array().unwrap().clone());
    let mut checked = 0;
    for case in cases.iter().take(4) {
        let (Some(text), Some(ids)) = (case["string"].as_str(), case["ids"].as_array()) else {
            continue;
        };
        let o = airlock(&["tokenize", "-m", model.to_str().unwrap(), "--ids", text]);
        assert!(o.status.success(), "{}", stderr(&o));
        let want: Vec<String> = ids.iter().map(|v| v.to_string()).collect();
        assert_eq!(
            stdout(&o).trim(),
            format!("[{}]", want.join(", ")),
            "{text:?}"
        );
        checked += 1;
    }
    assert!(checked > 0, "fixture format not understood");
}

#[test]
fn errors_are_one_clear_line_and_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[&str], needle: &str| {
        let o = airlock(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    };
    check(
        &["run", "-m", "/nonexistent/model.gguf", "-p", "hi"],
        "No such file",
    );

    let not_gguf = dir.path().join("notes.txt");
    std::fs::write(&not_gguf, "just some text, long enough to have a header").unwrap();
    check(
        &["run", "-m", not_gguf.to_str().unwrap(), "-p", "hi"],
        "not a GGUF file",
    );

    let gpt2 = rewrite_tiny(dir.path(), "gpt2.gguf", |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "general.architecture" {
                *v = Value::String("gpt2".into());
            }
        }
    });
    check(
        &["run", "-m", gpt2.to_str().unwrap(), "-p", "hi"],
        "unsupported architecture \"gpt2\"",
    );

    // IQ4_NL has 32-value blocks of 18 bytes: the file is valid, airlock cannot compute it yet.
    let iq = rewrite_tiny(dir.path(), "iq4.gguf", |_, tensors| {
        for (spec, data) in tensors.iter_mut() {
            if spec.name == "blk.0.ffn_down.weight" {
                spec.ty = GgmlType::IQ4_NL;
                let blocks = (spec.dims[0] * spec.dims[1] / 32) as usize;
                *data = vec![0u8; blocks * 18];
            }
        }
    });
    check(
        &["run", "-m", iq.to_str().unwrap(), "-p", "hi"],
        "type not supported yet",
    );
    check(
        &["run", "-m", iq.to_str().unwrap(), "-p", "hi"],
        "blk.0.ffn_down.weight",
    );

    let long_prompt = "word ".repeat(64);
    check(
        &[
            "run",
            "-m",
            tiny_llama3().to_str().unwrap(),
            "-c",
            "16",
            "-p",
            &long_prompt,
        ],
        "does not fit the context",
    );
    check(
        &[
            "run",
            "-m",
            tiny_llama3().to_str().unwrap(),
            "-t",
            "0",
            "-p",
            "hi",
        ],
        "threads",
    );
    // A prompt far larger than the context is refused before it is tokenized.
    let big = dir.path().join("big-prompt.txt");
    std::fs::write(&big, "x".repeat(8 << 20)).unwrap();
    check(
        &[
            "run",
            "-m",
            tiny_llama3().to_str().unwrap(),
            "-c",
            "64",
            "-f",
            big.to_str().unwrap(),
        ],
        "does not fit the context of 64",
    );
    // Endless inputs are read up to a limit, never until memory runs out.
    let model = smollm2();
    let m = model.to_str().unwrap();
    check(
        &["run", "-m", m, "-f", "/dev/zero"],
        "holds more than the limit",
    );
    check(
        &["run", "-m", m, "--tokenizer", "/dev/zero", "-p", "hi"],
        "holds more than the limit",
    );
    check(
        &["run", "-m", "/dev/zero", "--no-mmap", "-p", "hi"],
        "not a regular file",
    );
    // Above llama.cpp's cap of 512: refused at once, not minutes of spinning threads.
    check(
        &[
            "run",
            "-m",
            tiny_llama3().to_str().unwrap(),
            "-t",
            "10000",
            "-p",
            "hi",
        ],
        "above the cap of 512",
    );
}

#[test]
fn memory_estimate_refuses_what_does_not_fit_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    // A context of 2^30 tokens needs 2 (K,V) x 2 layers x 2^30 x 32 x 2 bytes = 256 GiB of KV
    // cache: more than any machine running this test has available.
    let huge = rewrite_tiny(dir.path(), "huge-ctx.gguf", |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "llama.context_length" {
                *v = Value::U32(1 << 30);
            }
        }
    });
    let o = airlock(&[
        "run",
        "-m",
        huge.to_str().unwrap(),
        "-c",
        "1073741824",
        "-p",
        "hi",
        "-n",
        "1",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("256.00 GiB") && err.contains("--force"),
        "{err}"
    );

    let o = airlock(&[
        "run",
        "-m",
        tiny_llama3().to_str().unwrap(),
        "-v",
        "-c",
        "64",
        "-p",
        "hi",
        "-n",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("KV cache 16.00 KiB"), "{}", stderr(&o));
}

#[test]
fn ctx_size_above_the_training_context_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    // A model trained on 64 positions.
    let short = rewrite_tiny(dir.path(), "ctx64.gguf", |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "llama.context_length" {
                *v = Value::U32(64);
            }
        }
    });
    let m = short.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "-m", m, "-v", "-p", "hi", "-n", "1"];
        args.extend_from_slice(extra);
        airlock(&args)
    };
    // No -c: the default (4096) is capped at the model's 64, as before.
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(64 positions of f16)"),
        "{}",
        stderr(&o)
    );
    // An explicit -c above it: refused with both numbers and the way out.
    let o = run(&["-c", "100"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("-c/--ctx-size 100 is above the 64 tokens") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Forced: used as given.
    let o = run(&["-c", "100", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(100 positions of f16)"),
        "{}",
        stderr(&o)
    );
    // At or below it: as asked.
    let o = run(&["-c", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn q8_0_kv_cache_runs_with_half_the_memory_and_is_refused_for_odd_heads() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let run = |kv: &str| {
        airlock(&[
            "run",
            "-m",
            m,
            "-v",
            "-c",
            "512",
            "--kv-type",
            kv,
            "--temp",
            "0",
            "-n",
            "12",
            "-p",
            "The capital of France is",
        ])
    };
    let (f16, q8) = (run("f16"), run("q8_0"));
    assert!(
        f16.status.success() && q8.status.success(),
        "{}",
        stderr(&q8)
    );
    // SmolLM2: 30 layers x 3 KV heads x 64, K and V, 512 positions: 11.25 MiB in f16;
    // Q8_0 stores 34 bytes per 32 values instead of 64.
    assert!(
        stderr(&f16).contains("KV cache 11.25 MiB (512 positions of f16)"),
        "{}",
        stderr(&f16)
    );
    assert!(
        stderr(&q8).contains("KV cache 5.98 MiB (512 positions of q8_0)"),
        "{}",
        stderr(&q8)
    );
    // Greedy text of a short prompt: the quantized cache starts the same answer.
    let (a, b) = (stdout(&f16), stdout(&q8));
    assert!(!b.trim().is_empty());
    assert_eq!(
        a.split_whitespace().next(),
        b.split_whitespace().next(),
        "{a:?} vs {b:?}"
    );
    // The tiny Llama 3 has heads of 16 values: not whole Q8_0 blocks of 32.
    let o = airlock(&[
        "run",
        "-m",
        tiny_llama3().to_str().unwrap(),
        "--kv-type",
        "q8_0",
        "-p",
        "hi",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("heads of 16 values") && err.contains("--kv-type f16"),
        "{err}"
    );
}

#[test]
fn chat_outgrowing_a_small_context_keeps_answering_with_the_system_prompt() {
    let model = smollm2();
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "chat",
            "-m",
            model.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "24",
            "-v",
        ])
        .args(["-c", "160", "--system", "You are a geography teacher."])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let questions = [
        "What is the capital of France?",
        "And of Germany?",
        "And of Italy?",
        "And of Spain?",
        "And of Portugal?",
    ];
    let input: String = questions.iter().map(|q| format!("{q}\n")).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    // Five turns of about 40 tokens each do not fit 160: the chat shifts instead of resetting
    // or failing, and every turn gets an answer.
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("conversation reset") && !err.contains("error"),
        "{err}"
    );
    let shifts: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("(context full:"))
        .collect();
    assert!(!shifts.is_empty(), "{err}");
    for s in &shifts {
        assert!(
            s.contains("dropped the oldest") && s.contains("kept the system prompt"),
            "{s}"
        );
    }
    let stats = err.lines().filter(|l| l.starts_with('[')).count();
    assert_eq!(stats, questions.len(), "{err}");
    let answers = stdout(&o);
    let answered = answers
        .split("> ")
        .skip(1)
        .filter(|a| !a.trim().is_empty())
        .count();
    assert_eq!(answered, questions.len(), "{answers}");
    // The context in use never reaches 160, and drops after a shift.
    let used: Vec<usize> = err
        .lines()
        .filter(|l| l.starts_with('['))
        .filter_map(|l| {
            l.split(", ")
                .last()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(used.len(), questions.len(), "{err}");
    assert!(used.iter().all(|&u| u < 160), "{used:?}");
    assert!(used.windows(2).any(|w| w[1] < w[0]), "{used:?}");
}

#[test]
fn threads_beyond_the_cpus_warn_and_a_pool_that_cannot_start_is_an_error() {
    let tiny = tiny_llama3();
    let m = tiny.to_str().unwrap();
    // One more than this process may use: it runs, with a warning (spinning workers make
    // oversubscription slow, not wrong).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = (cpus + 1).to_string();
    let o = airlock(&[
        "run", "-m", m, "-t", &t, "-p", "hi", "-n", "1", "--temp", "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("warning: -t {t} is more than the {cpus} CPUs")),
        "{err}"
    );
    // airlock with these arguments under `ulimit -v` (KiB).
    let limited = |kib: u32, args: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v {kib}; exec '{}' {args}",
                env!("CARGO_BIN_EXE_airlock")
            ))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // Under an address-space limit 500 thread stacks (2 MiB each) cannot all be mapped: the
    // pool's failure is one error naming the thread count, not a panic. Before each thread the
    // pool checks that it leaves room to spare; without that check the stacks sometimes took
    // the last of the space and a starting worker's first allocation aborted the process
    // (seen in CI, and here about 1 run in 40 with the CPU busy).
    let o = limited(300_000, &format!("run -m '{m}' -t 500 -p hi -n 1"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot start 500 compute threads"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.stdout.is_empty());
    // bench builds a pool per thread count; its failure is the same one line. Which pool fails
    // first depends on the machine (the loader's pool has one thread per core), so the test
    // names no count.
    let o = limited(600_000, &format!("bench -m '{m}' -t 1,500 -p 8 -n 4"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("compute threads:").count(), 1, "{err}");
    assert_eq!(err.matches("address space").count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
