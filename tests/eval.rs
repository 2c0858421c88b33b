//! `airlock eval`: every input format read (JSONL, CTIBench's cti-mcq.tsv, HellaSwag), a
//! malformed line reported by its line number, --limit and --shuffle-seed, the report lines,
//! and HellaSwag's acc_norm against llama-perplexity's on the same file.

mod support;
use support::{airlock, ok};

/// "accuracy: 62.50% +/- 7.75% (25 of 40 tasks; ...)": (accuracy, correct, tasks).
fn accuracy(out: &str) -> (f64, usize, usize) {
    let l = out
        .lines()
        .find_map(|l| l.strip_prefix("accuracy: "))
        .unwrap_or_else(|| panic!("no accuracy line in {out}"));
    let acc = l.split('%').next().unwrap().parse().unwrap();
    let paren = &l[l.find('(').unwrap() + 1..];
    let mut w = paren.split_whitespace();
    let correct = w.next().unwrap().parse().unwrap();
    w.next();
    let tasks = w.next().unwrap().parse().unwrap();
    (acc, correct, tasks)
}

#[test]
fn the_example_security_task_runs_in_both_scorings() {
    let model = support::model();
    let task = support::root().join("examples/tasks/security-mcq.jsonl");
    for score in ["letter", "option"] {
        let out = ok(&airlock(&[
            "eval",
            "-m",
            model.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--limit",
            "8",
            "--score",
            score,
        ]));
        let (acc, correct, tasks) = accuracy(&out);
        assert_eq!(tasks, 8, "{out}");
        assert_eq!(acc, 100.0 * correct as f64 / 8.0);
        assert!(
            out.contains("confusion (rows: right answer, columns: chosen):"),
            "{out}"
        );
        assert!(out.contains("tokens/s"), "{out}");
        // The confusion rows add up to the tasks.
        let cells: usize = out
            .lines()
            .filter(|l| l.starts_with("  "))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let row: Option<Vec<usize>> = w[1..].iter().map(|n| n.parse().ok()).collect();
                row.filter(|_| w[0].len() == 1)
            })
            .flatten()
            .sum();
        assert_eq!(cells, 8, "{out}");
    }
}

#[test]
fn every_format_is_read_and_a_bad_line_is_named() {
    let model = support::model();
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    // CTIBench's layout: tabs, literal quotes, no CSV quoting.
    let tsv = write(
        "cti-mcq.tsv",
        "URL\tQuestion\tOption A\tOption B\tOption C\tOption D\tPrompt\tGT\n\
         https://attack.mitre.org/techniques/T1566/\tWhich tactic is \"Phishing\"?\tImpact\tInitial Access\tDiscovery\tExfiltration\tYou are given a multiple-choice question. Which tactic is \"Phishing\"? A) Impact B) Initial Access C) Discovery D) Exfiltration. Answer with one letter.\tB\n\
         https://cwe.mitre.org/data/definitions/89.html\tWhich CWE is SQL injection?\tCWE-79\tCWE-89\tCWE-22\tCWE-787\tWhich CWE is SQL injection? A) CWE-79 B) CWE-89 C) CWE-22 D) CWE-787. Answer:\tB\n",
    );
    let out = ok(&airlock(&["eval", "-m", m, "--task", &tsv]));
    assert_eq!(accuracy(&out).2, 2);
    let out = ok(&airlock(&[
        "eval", "-m", m, "--task", &tsv, "--score", "option",
    ]));
    assert_eq!(accuracy(&out).2, 2);
    let hs = write(
        "hs.txt",
        "The firewall blocked\n0\nthe connection.\nthe banana.\na song.\nthe sky.\n",
    );
    let out = ok(&airlock(&["eval", "-m", m, "--task", &hs, "--hellaswag"]));
    assert_eq!(accuracy(&out).2, 1);
    // --chat wraps the prompt in the model's template.
    let out = ok(&airlock(&["eval", "-m", m, "--task", &tsv, "--chat"]));
    assert_eq!(accuracy(&out).2, 2);

    for (name, text, needle) in [
        (
            "bad.jsonl",
            "{\"question\":\"Q\",\"options\":[\"a\",\"b\"],\"answer\":\"A\"}\n\n{\"question\":\"Q\",\"options\":[\"a\",\"b\"],\"answer\":\"E\"}\n",
            "bad.jsonl line 3: the answer E is not one of the 2 options",
        ),
        ("broken.jsonl", "{\"question\": \"Q\", \n", "broken.jsonl line 1:"),
        (
            "bad.tsv",
            "URL\tQuestion\tOption A\tOption B\tOption C\tOption D\tPrompt\tGT\nu\tQ\ta\tb\tc\td\tP\tX\n",
            "bad.tsv line 2: GT: the answer X is not one of the 4 options",
        ),
        (
            "short.tsv",
            "URL\tQuestion\tOption A\tOption B\tOption C\tOption D\tPrompt\tGT\nu\tQ\ta\tb\n",
            "short.tsv line 2: 4 tab-separated fields, the header has 8",
        ),
        ("empty.jsonl", "", "holds no tasks"),
    ] {
        let p = write(name, text);
        let o = airlock(&["eval", "-m", m, "--task", &p]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let bad_hs = write("bad-hs.txt", "ctx\n7\na\nb\nc\nd\n");
    let o = airlock(&["eval", "-m", m, "--task", &bad_hs, "--hellaswag"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad-hs.txt line 2: the label \"7\""));
    let o = airlock(&["eval", "-m", m, "--task", &bad_hs]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--format"));
}

#[test]
fn limit_and_shuffle_seed_pick_the_tasks() {
    let model = support::model();
    let task = support::root().join("examples/tasks/security-mcq.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "-m",
            model.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--show-tasks",
            "--score",
            "option",
        ];
        args.extend_from_slice(extra);
        let out = ok(&airlock(&args));
        out.lines()
            .filter_map(|l| l.strip_prefix("line "))
            .map(|l| l.split(':').next().unwrap().parse::<usize>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(&["--limit", "3"]), [1, 2, 3]);
    let a = run(&["--limit", "3", "--shuffle-seed", "5"]);
    assert_eq!(a.len(), 3);
    assert_ne!(a, [1, 2, 3]);
    assert_eq!(run(&["--limit", "3", "--shuffle-seed", "5"]), a);
}

#[test]
fn hellaswag_acc_norm_matches_llama_perplexity() {
    let model = support::model();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            support::root().join("tests/fixtures/llamacpp/hellaswag-smollm2.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let task = support::root().join(fx["file"].as_str().unwrap());
    let out = ok(&airlock(&[
        "eval",
        "-m",
        model.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
        "--hellaswag",
    ]));
    let (acc, _, tasks) = accuracy(&out);
    assert_eq!(tasks as u64, fx["tasks"].as_u64().unwrap());
    let want = fx["acc_norm"].as_f64().unwrap();
    // The bound: within 0.5 points over all tasks (one task is 0.5 points here).
    assert!((acc - want).abs() <= 0.5, "airlock {acc}, llama.cpp {want}");
}
