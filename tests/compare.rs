//! `airlock compare`: one row per input in report.md and report.json and one point per input in
//! a well-formed report.svg; --types makes variants from an unquantized base and deletes them
//! unless --keep; Ctrl-C leaves the report of the files finished.

mod support;
use support::{airlock, eval_txt, ok};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The demo model requantized to `ty` by airlock into `dir`.
fn requantized(dir: &Path, ty: &str) -> PathBuf {
    let out = dir.join(format!("smollm2-{ty}.gguf"));
    ok(&airlock(&[
        "quantize",
        "--allow-requantize",
        "-q",
        "--type",
        ty,
        support::model().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]));
    out
}

/// Every tag opened is closed, in order (enough to tell a complete SVG from a cut one).
fn well_formed(xml: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        let end = rest[i..].find('>').ok_or("unclosed <")? + i;
        let tag = &rest[i + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
            continue;
        }
        let name = tag
            .trim_start_matches('/')
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        if tag.starts_with('/') {
            match stack.pop() {
                Some(open) if open == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else {
            stack.push(name);
        }
    }
    if stack.is_empty() {
        Ok(())
    } else {
        Err(format!("unclosed: {stack:?}"))
    }
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn one_row_per_input_and_a_valid_chart() {
    let model = support::model();
    let dir = tempfile::tempdir().unwrap();
    let q8 = requantized(dir.path(), "q8_0");
    let q4 = requantized(dir.path(), "q4_0");
    let out = dir.path().join("report");
    let task = support::root().join("examples/tasks/security-mcq.jsonl");
    let md = ok(&airlock(&[
        "compare",
        model.to_str().unwrap(),
        q8.to_str().unwrap(),
        q4.to_str().unwrap(),
        "-f",
        &eval_txt(),
        "-c",
        "128",
        "--chunks",
        "2",
        "--task",
        task.to_str().unwrap(),
        "--limit",
        "4",
        "--bench-prompt",
        "32",
        "--bench-gen",
        "4",
        "-o",
        out.to_str().unwrap(),
    ]));
    let r = report(&out);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let names: Vec<&str> = rows.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["SmolLM2-135M-Instruct.Q4_1", "smollm2-q8_0", "smollm2-q4_0"]
    );
    assert_eq!(rows[0]["is_base"], true);
    assert!(rows[0]["kld_mean"].is_null());
    for row in &rows[1..] {
        // KLD against the base, a same-top rate, a PPL change; accuracy on the 4 tasks.
        assert!(row["kld_mean"].as_f64().unwrap() > 0.0, "{row}");
        let same = row["same_top_pct"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&same));
        assert!(row["delta_ppl_pct"].is_number());
        assert!(row["accuracy_pct"].is_number());
        assert!(row["gen_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    // q4_0 (requantized twice) drifts further from the base than q8_0.
    assert!(rows[2]["kld_mean"].as_f64() > rows[1]["kld_mean"].as_f64());
    // Sizes and bits per weight from the files.
    let size = std::fs::metadata(&q8).unwrap().len();
    assert_eq!(rows[1]["size_bytes"].as_u64().unwrap(), size);
    assert!(
        rows[1]["bits_per_weight"].as_f64().unwrap() > rows[2]["bits_per_weight"].as_f64().unwrap()
    );
    assert_eq!(r["interrupted"], false);
    // report.md (also printed): a table with one row per file.
    let file_md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(md, file_md);
    let table_rows = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| file"))
        .count();
    assert_eq!(table_rows, 3, "{md}");
    assert!(md.contains("| SmolLM2-135M-Instruct.Q4_1 (base) |"), "{md}");
    // report.svg: complete, one point per file, each named.
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    well_formed(&svg).unwrap();
    assert_eq!(svg.matches("<circle").count(), 3);
    for n in names {
        assert!(svg.contains(n), "{n}");
    }
    // No work directory is left behind.
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["report.json", "report.md", "report.svg"]);
}

#[test]
fn types_make_the_variants_and_delete_them_unless_kept() {
    let dir = tempfile::tempdir().unwrap();
    let f16 = requantized(dir.path(), "f16");
    let common = [
        "-f",
        &eval_txt(),
        "-c",
        "128",
        "--chunks",
        "2",
        "--bench-prompt",
        "16",
        "--bench-gen",
        "2",
    ];
    let run = |out: &Path, types: &str, keep: bool| {
        let mut args = vec!["compare", f16.to_str().unwrap(), "--types", types];
        args.extend_from_slice(&common);
        args.extend_from_slice(&["-o", out.to_str().unwrap()]);
        if keep {
            args.push("--keep");
        }
        ok(&airlock(&args));
        report(out)
    };
    let out = dir.path().join("a");
    let r = run(&out, "q8_0,q4_0", false);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1]["name"], "smollm2-f16-q8_0");
    assert_eq!(rows[1]["made_as"], "q8_0");
    assert_eq!(rows[2]["made_as"], "q4_0");
    let files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(files.iter().all(|f| f.starts_with("report.")), "{files:?}");

    let out = dir.path().join("b");
    let r = run(&out, "q4_0", true);
    assert_eq!(r["rows"].as_array().unwrap().len(), 2);
    assert!(out.join("smollm2-f16-q4_0.gguf").is_file());

    // A quantized base cannot be the source of --types (no silent double quantization).
    let o = airlock(&[
        "compare",
        support::model().to_str().unwrap(),
        "--types",
        "q4_0",
        "-f",
        &eval_txt(),
        "-o",
        dir.path().join("c").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--types makes variants from an unquantized base"),
        "{err}"
    );
}

#[test]
fn ctrl_c_leaves_the_report_of_the_files_finished() {
    let model = support::model();
    let dir = tempfile::tempdir().unwrap();
    let q8 = requantized(dir.path(), "q8_0");
    let out = dir.path().join("report");
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "compare",
            model.to_str().unwrap(),
            q8.to_str().unwrap(),
            q8.to_str().unwrap(),
            "-f",
            &eval_txt(),
            "-c",
            "512",
            // Three chunks, not the whole text: the interrupt only has to land in the next
            // file, which takes seconds even so.
            "--chunks",
            "3",
            "--bench-prompt",
            "16",
            "--bench-gen",
            "2",
            "-o",
            out.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The base is measured once its PPL line is printed; interrupt during the next file.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.trim_start().starts_with("PPL ") {
            break;
        }
        line.clear();
    }
    assert!(seen.contains("PPL "), "{seen}");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    let r = report(&out);
    let rows = r["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.len() < 3, "{r}");
    assert_eq!(r["interrupted"], true);
    assert!(!r["not_measured"].as_array().unwrap().is_empty());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Interrupted"), "{md}");
    well_formed(&std::fs::read_to_string(out.join("report.svg")).unwrap()).unwrap();
    // The work directory (the base's log-probabilities) is removed.
    assert!(std::fs::read_dir(&out).unwrap().all(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("report.")));
}

#[test]
fn a_hugging_face_directory_is_converted_then_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    ok(&airlock(&[
        "export",
        "-q",
        support::model().to_str().unwrap(),
        "-o",
        hf.to_str().unwrap(),
    ]));
    let out = dir.path().join("report");
    ok(&airlock(&[
        "compare",
        hf.to_str().unwrap(),
        "--types",
        "q8_0",
        "-f",
        &eval_txt(),
        "-c",
        "128",
        "--chunks",
        "2",
        "--bench-prompt",
        "16",
        "--bench-gen",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]));
    let r = report(&out);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // The base is the checkpoint converted to f16; the variant is made from it.
    assert_eq!(rows[0]["types"][0]["type"], "f16");
    assert_eq!(rows[1]["made_as"], "q8_0");
    assert!(rows[1]["kld_mean"].as_f64().unwrap() < 0.05, "{r}");
    // Neither the f16 file nor the variant is left without --keep.
    assert!(std::fs::read_dir(&out).unwrap().all(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("report.")));
    // A directory without --types says what to do.
    let o = airlock(&[
        "compare",
        hf.to_str().unwrap(),
        "-f",
        &eval_txt(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("give --types"));
}
