//! CLI arguments are hostile input too: every numeric or list flag of the commands that run the
//! model (run, bench, batched-bench, perplexity, serve), set to values that overflow, wrap, parse
//! oddly or make no sense, gets a clean outcome: success (for serve: listening), an error
//! (exit 1) or a usage error (exit 2), never a panic or a signal. The sweeps found three panics
//! or aborts (the sum of batched-bench's --npp and --ntg, serve's --grace, compare's
//! --bench-prompt), each with its own test below.

mod support;

use std::process::Command;

/// Values that break naive arithmetic on a count: zero, negative, past u32 and u64, not a
/// number, empty, lists with holes.
const HOSTILE: [&str; 10] = [
    "0",
    "-1",
    "4294967297",
    "18446744073709551615",
    "99999999999999999999",
    "nan",
    "inf",
    "",
    "1,,2",
    "2,0",
];

#[test]
fn hostile_numbers_in_every_flag_never_panic() {
    let model = support::model();
    let m = model.to_str().unwrap();
    let text = support::eval_txt();
    let t = text.as_str();
    // Each command with small, valid arguments, and the flags to replace in turn.
    let commands: [(&[&str], &[&str]); 4] = [
        (
            &[
                "run", "-m", m, "-p", "Hi", "-n", "2", "-c", "32", "--temp", "0",
            ],
            &[
                "-c",
                "-t",
                "-b",
                "-n",
                "--temp",
                "--top-k",
                "--top-p",
                "--min-p",
                "--repeat-penalty",
                "--repeat-last-n",
                "--seed",
            ],
        ),
        (
            &["bench", "-m", m, "-p", "8", "-n", "2", "-r", "1", "-t", "2"],
            &["-p", "-n", "-d", "-t", "-r", "-b"],
        ),
        (
            &[
                "batched-bench",
                "-m",
                m,
                "--npp",
                "8",
                "--ntg",
                "2",
                "--npl",
                "1,2",
                "-t",
                "2",
            ],
            &["--npp", "--ntg", "--npl", "-t", "-b"],
        ),
        (
            &[
                "perplexity",
                "-m",
                m,
                "-f",
                t,
                "-c",
                "64",
                "--chunks",
                "1",
                "-t",
                "2",
            ],
            &["-c", "-b", "--chunks", "-t"],
        ),
    ];
    let mut outcomes = [0usize; 3];
    for (base, flags) in commands {
        for flag in flags {
            // The base without this flag (and its value), then the flag with each value.
            let mut args: Vec<&str> = Vec::new();
            let mut i = 0;
            while i < base.len() {
                if base[i] == *flag {
                    i += 2;
                } else {
                    args.push(base[i]);
                    i += 1;
                }
            }
            for v in HOSTILE {
                let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
                    .args(&args)
                    .args([flag, &v])
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&o.stderr);
                let code = o.status.code();
                assert!(
                    matches!(code, Some(0..=2)) && !err.contains("panicked"),
                    "{} {flag} {v:?}: {:?}\n{err}",
                    args.join(" "),
                    o.status
                );
                outcomes[code.unwrap() as usize] += 1;
            }
        }
    }
    // The sweep reaches every kind of outcome (it is not all usage errors).
    assert!(outcomes.iter().all(|&n| n > 0), "{outcomes:?}");
}

#[test]
fn batched_bench_lengths_that_overflow_are_refused() {
    let model = support::model();
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["batched-bench", "-m"])
        .arg(&model)
        .args(["--npp", "18446744073709551615", "--ntg", "2", "--npl", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--npp") && err.contains("--ntg"), "{err}");
}

#[test]
fn serve_flags_with_hostile_numbers_start_or_are_refused() {
    // A server that starts is stopped as soon as it says it listens; one that does not must exit
    // 1 or 2 without a panic.
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let model = support::model();
    let m = model.to_str().unwrap();
    let flags = [
        "-c",
        "--port",
        "--parallel",
        "--queue",
        "--max-body",
        "--grace",
        "--timeout",
        "--max-tokens",
        "--temp",
        "--top-k",
        "--repeat-last-n",
    ];
    let (mut started, mut refused) = (0, 0);
    for flag in flags {
        for v in HOSTILE {
            let mut args = vec!["serve", "-m", m, "--port", "0", "-c", "64"];
            if let Some(i) = args.iter().position(|a| a == &flag) {
                args.drain(i..i + 2);
            }
            let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
                .args(&args)
                .args([flag, v])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = child.stderr.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut log = String::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening on http://") {
                        let _ = tx.send(None);
                    }
                    log.push_str(&line);
                    log.push('\n');
                }
                let _ = tx.send(Some(log));
            });
            let t0 = Instant::now();
            let what = format!("serve {flag} {v:?}");
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(None) => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    started += 1;
                }
                Ok(Some(log)) => {
                    let status = child.wait().unwrap();
                    assert!(
                        matches!(status.code(), Some(1 | 2)) && !log.contains("panicked"),
                        "{what}: {status:?}\n{log}"
                    );
                    refused += 1;
                }
                Err(_) => {
                    child.kill().unwrap();
                    panic!(
                        "{what}: neither listening nor exited after {:?}",
                        t0.elapsed()
                    );
                }
            }
        }
    }
    assert!(
        started > 0 && refused > 0,
        "started {started}, refused {refused}"
    );
}

#[test]
fn compare_bench_lengths_past_the_context_are_refused() {
    // Past the context, the speed test used to collect the prompt's ids first (an allocation
    // of 16 GiB for 2^32 tokens: an abort), and a sum past usize wrapped.
    let model = support::model();
    let text = support::eval_txt();
    let dir = tempfile::tempdir().unwrap();
    for (prompt, needle) in [
        ("4294967297", "tokens of context"),
        ("18446744073709551615", "more than any context"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .arg("compare")
            .arg(&model)
            .arg("-f")
            .arg(&text)
            .args(["--chunks", "1", "-c", "64", "--bench-gen", "2"])
            .args(["--bench-prompt", prompt, "-o"])
            .arg(dir.path().join(prompt))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{prompt}: {err}");
        assert!(
            err.contains("--bench-prompt") && err.contains(needle),
            "{err}"
        );
    }
}
