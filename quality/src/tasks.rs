//! Multiple-choice task files: airlock's JSONL, CTIBench's `cti-mcq.tsv` as published, and
//! llama-perplexity's HellaSwag text format. Every file is untrusted: it is read with a byte
//! limit, and a malformed line is reported with its line number.
//!
//! JSONL, one task per line (blank lines skipped):
//! `{"question": "...", "options": ["...", "..."], "answer": "B", "prefix": "...", "id": "..."}`
//! - `question`: the question text (required, not empty);
//! - `options`: 2 to 26 answer texts, lettered A, B, C, ... in order (required, none empty);
//! - `answer`: the correct option, as its letter (`"B"`) or its 0-based index (`1`);
//! - `prefix` (optional): text put before the question, e.g. a few solved examples;
//! - `id` (optional): a name for the task in reports.
//!
//! CTIBench `cti-mcq.tsv`: a header line naming the columns `URL`, `Question`, `Option A` ..
//! `Option D`, `Prompt` and `GT` (any order), then one task per line, fields separated by tabs,
//! no quoting; `GT` is the answer letter; `Prompt` is the full prompt CTIBench gives a model
//! (the question with its options and instructions) and is what `--score letter` continues.
//!
//! HellaSwag (llama-perplexity's `--hellaswag` file): six lines per task: the context, the
//! index (0-3) of the right ending, then the four endings.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The largest task file read (CTIBench's files are a few megabytes).
pub const MAX_TASK_FILE_BYTES: u64 = 64 << 20;
/// Most options per task: one letter each.
pub const MAX_OPTIONS: usize = 26;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} line {line}: {msg}")]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskFormat {
    Jsonl,
    CtiMcq,
    Hellaswag,
}

impl TaskFormat {
    /// The format a file name implies: `.jsonl` / `.json` and `.tsv`; None otherwise.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "json" => Some(TaskFormat::Jsonl),
            "tsv" => Some(TaskFormat::CtiMcq),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jsonl" => Some(TaskFormat::Jsonl),
            "cti-mcq" | "ctibench" => Some(TaskFormat::CtiMcq),
            "hellaswag" => Some(TaskFormat::Hellaswag),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TaskFormat::Jsonl => "jsonl",
            TaskFormat::CtiMcq => "cti-mcq",
            TaskFormat::Hellaswag => "hellaswag",
        }
    }
}

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// Line of the file where it starts (1-based).
    pub line: usize,
    pub id: Option<String>,
    /// Text before the question (few-shot examples); may be empty.
    pub prefix: String,
    /// The question (HellaSwag: the context to continue).
    pub question: String,
    pub options: Vec<String>,
    /// Index of the right option.
    pub answer: usize,
    /// A ready-made prompt that lists the options (CTIBench's `Prompt`), used by letter
    /// scoring instead of airlock's own layout.
    pub prompt: Option<String>,
}

/// The letter of option `i` (A, B, ...).
pub fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// Reads the tasks of `path` in `format`.
pub fn load_tasks(path: &Path, format: TaskFormat) -> Result<Vec<Task>, TaskError> {
    let text = airlock_engine::bounded::read_bounded_string(path, MAX_TASK_FILE_BYTES).map_err(
        |error| TaskError::Read {
            path: path.to_path_buf(),
            error,
        },
    )?;
    let tasks = parse_tasks(&text, format).map_err(|e| match e {
        ParseError::Line(line, msg) => TaskError::Line {
            path: path.to_path_buf(),
            line,
            msg,
        },
        ParseError::File(msg) => TaskError::File {
            path: path.to_path_buf(),
            msg,
        },
    })?;
    if tasks.is_empty() {
        return Err(TaskError::File {
            path: path.to_path_buf(),
            msg: "holds no tasks".into(),
        });
    }
    Ok(tasks)
}

#[derive(Debug, PartialEq)]
pub enum ParseError {
    Line(usize, String),
    File(String),
}

/// Parses a task file's text.
pub fn parse_tasks(text: &str, format: TaskFormat) -> Result<Vec<Task>, ParseError> {
    match format {
        TaskFormat::Jsonl => parse_jsonl(text),
        TaskFormat::CtiMcq => parse_cti_mcq(text),
        TaskFormat::Hellaswag => parse_hellaswag(text),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTask {
    question: String,
    options: Vec<String>,
    answer: serde_json::Value,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

fn check_options(options: &[String]) -> Result<(), String> {
    if options.len() < 2 || options.len() > MAX_OPTIONS {
        return Err(format!(
            "{} options; a task has 2 to {MAX_OPTIONS}",
            options.len()
        ));
    }
    if let Some(i) = options.iter().position(|o| o.trim().is_empty()) {
        return Err(format!("option {} is empty", letter(i)));
    }
    Ok(())
}

/// An answer given as a letter ("B", "b", " B ") or a 0-based index.
fn parse_answer(v: &serde_json::Value, n: usize) -> Result<usize, String> {
    let i = match v {
        serde_json::Value::String(s) => {
            let s = s.trim();
            let mut c = s.chars();
            match (c.next(), c.next()) {
                (Some(ch), None) if ch.is_ascii_alphabetic() => {
                    (ch.to_ascii_uppercase() as u8 - b'A') as usize
                }
                _ => return Err(format!("answer {s:?} is not an option letter")),
            }
        }
        serde_json::Value::Number(x) => match x.as_u64() {
            Some(i) => usize::try_from(i).unwrap_or(usize::MAX),
            None => return Err(format!("answer {x} is not an option index")),
        },
        other => return Err(format!("answer {other} is neither a letter nor an index")),
    };
    if i >= n {
        let label = match v {
            serde_json::Value::String(s) => s.trim().to_string(),
            other => other.to_string(),
        };
        return Err(format!("the answer {label} is not one of the {n} options"));
    }
    Ok(i)
}

fn parse_jsonl(text: &str) -> Result<Vec<Task>, ParseError> {
    let mut tasks = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| ParseError::Line(line, msg);
        let t: JsonTask = serde_json::from_str(l).map_err(|e| bad(e.to_string()))?;
        if t.question.trim().is_empty() {
            return Err(bad("the question is empty".into()));
        }
        check_options(&t.options).map_err(bad)?;
        let answer = parse_answer(&t.answer, t.options.len()).map_err(bad)?;
        tasks.push(Task {
            line,
            id: t.id,
            prefix: t.prefix.unwrap_or_default(),
            question: t.question,
            options: t.options,
            answer,
            prompt: None,
        });
    }
    Ok(tasks)
}

fn parse_cti_mcq(text: &str) -> Result<Vec<Task>, ParseError> {
    let mut lines = text.lines().enumerate();
    let Some((_, header)) = lines.next() else {
        return Err(ParseError::File("is empty".into()));
    };
    let cols: Vec<&str> = header.split('\t').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                ParseError::Line(
                    1,
                    format!(
                        "the header has no {name:?} column (CTIBench's cti-mcq.tsv has URL, \
                     Question, Option A, Option B, Option C, Option D, Prompt, GT)"
                    ),
                )
            })
    };
    let q = col("Question")?;
    let opts = [
        col("Option A")?,
        col("Option B")?,
        col("Option C")?,
        col("Option D")?,
    ];
    let gt = col("GT")?;
    let prompt = col("Prompt").ok();
    let url = col("URL").ok();
    let mut tasks = Vec::new();
    for (i, l) in lines {
        let line = i + 1;
        let l = l.strip_suffix('\r').unwrap_or(l);
        if l.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| ParseError::Line(line, msg);
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() != cols.len() {
            return Err(bad(format!(
                "{} tab-separated fields, the header has {}",
                f.len(),
                cols.len()
            )));
        }
        let question = f[q].trim().to_string();
        if question.is_empty() {
            return Err(bad("the question is empty".into()));
        }
        let options: Vec<String> = opts.iter().map(|&c| f[c].trim().to_string()).collect();
        check_options(&options).map_err(bad)?;
        let answer = parse_answer(&serde_json::Value::String(f[gt].to_string()), 4)
            .map_err(|e| bad(format!("GT: {e}")))?;
        tasks.push(Task {
            line,
            id: url
                .map(|c| f[c].trim().to_string())
                .filter(|s| !s.is_empty()),
            prefix: String::new(),
            question,
            options,
            answer,
            prompt: prompt
                .map(|c| f[c].to_string())
                .filter(|s| !s.trim().is_empty()),
        });
    }
    Ok(tasks)
}

fn parse_hellaswag(text: &str) -> Result<Vec<Task>, ParseError> {
    // llama-perplexity splits on '\n' only; a trailing newline ends the last line.
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .collect();
    if text.is_empty() {
        return Err(ParseError::File("is empty".into()));
    }
    if !lines.len().is_multiple_of(6) {
        return Err(ParseError::File(format!(
            "{} lines is not a multiple of 6 (HellaSwag: context, label, four endings per task)",
            lines.len()
        )));
    }
    let mut tasks = Vec::new();
    for (k, t) in lines.chunks_exact(6).enumerate() {
        let line = 6 * k + 1;
        let label = t[1].trim();
        let answer = match label.parse::<usize>() {
            Ok(i) if i < 4 => i,
            _ => {
                return Err(ParseError::Line(
                    line + 1,
                    format!("the label {label:?} is not 0, 1, 2 or 3"),
                ))
            }
        };
        tasks.push(Task {
            line,
            id: None,
            prefix: String::new(),
            question: t[0].to_string(),
            options: t[2..6].iter().map(|s| s.to_string()).collect(),
            answer,
            prompt: None,
        });
    }
    Ok(tasks)
}

/// The first `limit` tasks, or with `seed` a seeded random `limit` of them (all, shuffled,
/// without `limit`). The order is the same on every machine for a seed.
pub fn select(mut tasks: Vec<Task>, limit: Option<usize>, seed: Option<u64>) -> Vec<Task> {
    if let Some(seed) = seed {
        let mut rng = SplitMix64(seed);
        // Fisher-Yates.
        for i in (1..tasks.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            tasks.swap(i, j);
        }
    }
    if let Some(n) = limit {
        tasks.truncate(n);
    }
    tasks
}

/// A small seeded generator (splitmix64): reproducible selections need no more.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_reads_letters_and_indices_and_reports_bad_lines() {
        let t = parse_tasks(
            "{\"question\":\"Q1\",\"options\":[\"a\",\"b\",\"c\"],\"answer\":\"C\"}\n\n\
             {\"question\":\"Q2\",\"options\":[\"a\",\"b\"],\"answer\":0,\"prefix\":\"P\",\"id\":\"x\"}\n",
            TaskFormat::Jsonl,
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].answer, t[0].line), (2, 1));
        assert_eq!((t[1].answer, t[1].line, t[1].prefix.as_str()), (0, 3, "P"));
        assert_eq!(t[1].id.as_deref(), Some("x"));
        for (bad, needle) in [
            (
                "{\"question\":\"Q\",\"options\":[\"a\",\"b\"],\"answer\":\"C\"}",
                "answer C is not one of the 2",
            ),
            (
                "{\"question\":\"Q\",\"options\":[\"a\"],\"answer\":\"A\"}",
                "1 options",
            ),
            (
                "{\"question\":\"\",\"options\":[\"a\",\"b\"],\"answer\":\"A\"}",
                "empty",
            ),
            (
                "{\"question\":\"Q\",\"options\":[\"a\",\" \"],\"answer\":\"A\"}",
                "option B",
            ),
            (
                "{\"question\":\"Q\",\"options\":[\"a\",\"b\"],\"answer\":\"AB\"}",
                "letter",
            ),
            (
                "{\"question\":\"Q\",\"options\":[\"a\",\"b\"],\"answer\":-1}",
                "index",
            ),
            (
                "{\"question\":\"Q\",\"options\":[\"a\",\"b\"],\"answer\":\"A\",\"x\":1}",
                "unknown field",
            ),
            ("not json", "expected"),
        ] {
            let text =
                format!("{{\"question\":\"ok\",\"options\":[\"a\",\"b\"],\"answer\":1}}\n{bad}\n");
            match parse_tasks(&text, TaskFormat::Jsonl) {
                Err(ParseError::Line(2, msg)) => assert!(msg.contains(needle), "{bad}: {msg}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn cti_mcq_reads_the_published_columns() {
        let text = "URL\tQuestion\tOption A\tOption B\tOption C\tOption D\tPrompt\tGT\n\
                    https://x\tWhich \"port\"?\t22\t23\t25\t80\tPick one. Answer:\tC\n";
        let t = parse_tasks(text, TaskFormat::CtiMcq).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].question, "Which \"port\"?");
        assert_eq!(t[0].options, ["22", "23", "25", "80"]);
        assert_eq!(t[0].answer, 2);
        assert_eq!(t[0].prompt.as_deref(), Some("Pick one. Answer:"));
        assert_eq!(t[0].line, 2);
        let short = format!("{text}https://y\tQ\t1\t2\t3\tP\tA\n");
        assert_eq!(
            parse_tasks(&short, TaskFormat::CtiMcq),
            Err(ParseError::Line(
                3,
                "7 tab-separated fields, the header has 8".into()
            ))
        );
        let bad_gt = format!("{text}https://y\tQ\t1\t2\t3\t4\tP\tE\n");
        assert!(matches!(
            parse_tasks(&bad_gt, TaskFormat::CtiMcq),
            Err(ParseError::Line(3, _))
        ));
        assert!(matches!(
            parse_tasks("URL\tQuestion\n", TaskFormat::CtiMcq),
            Err(ParseError::Line(1, m)) if m.contains("Option A")
        ));
    }

    #[test]
    fn hellaswag_reads_six_lines_per_task() {
        let one = "A man is\n2\n e1\n e2\n e3\n e4\n";
        let t = parse_tasks(&one.repeat(2), TaskFormat::Hellaswag).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[1].line, t[1].answer), (7, 2));
        assert_eq!(t[0].options[3], " e4");
        assert!(matches!(
            parse_tasks("a\n1\nb\n", TaskFormat::Hellaswag),
            Err(ParseError::File(m)) if m.contains("multiple of 6")
        ));
        assert_eq!(
            parse_tasks(
                "c\n1\na\nb\nc\nd\nc\n9\na\nb\nc\nd\n",
                TaskFormat::Hellaswag
            ),
            Err(ParseError::Line(
                8,
                "the label \"9\" is not 0, 1, 2 or 3".into()
            ))
        );
    }

    #[test]
    fn selection_is_seeded() {
        let tasks: Vec<Task> = (0..10)
            .map(|i| Task {
                line: i,
                id: None,
                prefix: String::new(),
                question: i.to_string(),
                options: vec!["a".into(), "b".into()],
                answer: 0,
                prompt: None,
            })
            .collect();
        let lines = |t: &[Task]| t.iter().map(|t| t.line).collect::<Vec<_>>();
        assert_eq!(lines(&select(tasks.clone(), Some(3), None)), [0, 1, 2]);
        let a = select(tasks.clone(), Some(4), Some(7));
        let b = select(tasks.clone(), Some(4), Some(7));
        let c = select(tasks.clone(), Some(4), Some(8));
        assert_eq!(lines(&a), lines(&b));
        assert_ne!(lines(&a), lines(&c));
        let mut all = lines(&select(tasks, None, Some(7)));
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
