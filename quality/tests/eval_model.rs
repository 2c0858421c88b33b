//! Multiple-choice scoring on the real SmolLM2 model: the batched scores (shared prefix
//! computed once, options from copies of its cache, several tasks per pass) equal a plain
//! computation written here (each option's whole sequence alone, f64 log-softmax), whatever the
//! grouping; and a task whose answer the prompt forces is answered right in every position.

use std::path::PathBuf;
use std::sync::Arc;

use airlock_engine::gguf::GgufFile;
use airlock_engine::llama::{KvType, LlamaModel, Logits, Precision, Session};
use airlock_engine::load::tokenizer_for;
use airlock_engine::signature::Requirement;
use airlock_engine::tokenizer::Tokenizer;
use airlock_quality::eval::{evaluate, EvalParams, Prompting, Score, Summary};
use airlock_quality::tasks::{load_tasks, Task, TaskFormat};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn smollm2() -> (LlamaModel, Tokenizer) {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    let f = Arc::new(GgufFile::open(&path).unwrap());
    let tok = tokenizer_for(&f, &path, None, &Requirement::none()).unwrap();
    (LlamaModel::load(f).unwrap(), tok)
}

fn ln_p(logits: &[f32], i: usize) -> f64 {
    let m = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    logits[i] as f64 - m - z.ln()
}

#[test]
fn batched_scores_equal_each_sequence_scored_alone() {
    let (model, tok) = smollm2();
    let tasks = load_tasks(
        &root().join("examples/tasks/security-mcq.jsonl"),
        TaskFormat::Jsonl,
    )
    .unwrap();
    let tasks = &tasks[..6];
    for score in [Score::Letter, Score::Option] {
        let p = Prompting {
            tokenizer: &tok,
            score,
            chat: None,
        };
        let prepared: Vec<_> = tasks.iter().map(|t| p.prepare(t).unwrap()).collect();
        // The plain way: every option's whole sequence in a fresh session, the log-probability
        // of each of its own tokens (after the shared prefix) summed, or averaged.
        let mut want = Vec::new();
        for t in &prepared {
            let mut s = Vec::new();
            for seq in &t.seqs {
                let mut sess = Session::new(&model, 512, KvType::F16, Precision::Fast);
                let rows = sess.forward(&model, seq, Logits::All).unwrap();
                let v = model.config.vocab_size;
                let lps: Vec<f64> = (t.common..seq.len())
                    .map(|k| ln_p(&rows[(k - 1) * v..k * v], seq[k] as usize))
                    .collect();
                let sum: f64 = lps.iter().sum();
                s.push(if t.mean { sum / lps.len() as f64 } else { sum });
            }
            want.push(s);
        }
        // Every token its own pass (prompts and options in pieces), a few tasks per pass, all
        // six in one, and a cache budget so small that the options go in waves.
        for (batch, n_ctx, positions) in [
            (7, 4096, None),
            (150, 4096, None),
            (4096, 4096, None),
            (150, 200, Some(200)),
        ] {
            let run = evaluate(
                &model,
                Precision::Fast,
                KvType::F16,
                &prepared,
                &EvalParams {
                    batch,
                    n_ctx,
                    max_cache_positions: positions,
                    ..EvalParams::default()
                },
                &mut |_| {},
            )
            .unwrap();
            let got: Vec<Vec<f64>> = run.results.iter().map(|r| r.scores.clone()).collect();
            // Bit for bit: the forward pass is batch-invariant and the cache copy exact.
            assert_eq!(got, want, "{score:?}, batch {batch}, cache {positions:?}");
        }
    }
}

/// Tasks whose prompt repeats the answer: the model copies it, whatever its position. (The
/// 135M demo model needs the example many times over: with 4 repetitions it copied the letter
/// in 2 of 4 positions, with 16 in all 4 by clear margins.)
fn forced(score: Score) -> Vec<Task> {
    let options = ["falcon", "table", "river", "orange"];
    (0..4)
        .map(|k| {
            // The right option rotates through every position.
            let opts: Vec<String> = (0..4)
                .map(|i| options[(i + 4 - k) % 4].to_string())
                .collect();
            let right = &options[0];
            let prefix = match score {
                Score::Option => format!("The code word is {right}. ").repeat(6),
                Score::Letter => {
                    let listed: String = opts
                        .iter()
                        .enumerate()
                        .map(|(i, o)| format!("{}. {o}\n", (b'A' + i as u8) as char))
                        .collect();
                    let letter = (b'A' + k as u8) as char;
                    format!("What is the code word?\n{listed}Answer: {letter}\n\n").repeat(16)
                }
            };
            Task {
                line: k + 1,
                id: None,
                prefix,
                question: match score {
                    Score::Option => "The code word is".into(),
                    Score::Letter => "What is the code word?".into(),
                },
                options: opts,
                answer: k,
                prompt: None,
            }
        })
        .collect()
}

#[test]
fn a_forced_answer_is_chosen_in_every_position() {
    let (model, tok) = smollm2();
    for score in [Score::Letter, Score::Option] {
        let tasks = forced(score);
        let p = Prompting {
            tokenizer: &tok,
            score,
            chat: None,
        };
        let prepared: Vec<_> = tasks.iter().map(|t| p.prepare(t).unwrap()).collect();
        let run = evaluate(
            &model,
            Precision::Fast,
            KvType::F16,
            &prepared,
            &EvalParams::default(),
            &mut |_| {},
        )
        .unwrap();
        let s = Summary::new(&run);
        assert_eq!(s.correct, 4, "{score:?}: {:?}", run.results);
        for (i, row) in s.confusion.iter().enumerate() {
            for (j, &n) in row.iter().enumerate() {
                assert_eq!(n, (i == j) as usize, "{score:?}: {:?}", s.confusion);
            }
        }
    }
}
